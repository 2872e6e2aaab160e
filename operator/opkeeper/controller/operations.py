"""The Operation reconciler: one event-driven state machine per operation.

Operation watch events come from the controller's own list+watch stream
(:mod:`opkeeper.controller.streams`), not from kopf, whose per-event
processing was about 30% of the controller's CPU per Operation (see
docs/controller.md); kopf never sees, let alone writes, an Operation. Only
the events of Jobs this controller started still come through a kopf
``on.event`` handler. Everything else is ours:
a cache of the latest version of each Operation, a keyed work queue with
in-memory timers, and one reconcile function that reads the cached
object, asks :mod:`opkeeper.states` for every state change, lets the
executor act, and then writes at most one status patch (conditional on the
resourceVersion it read) plus, once, the id label.

Write budget of a builtin noop (see docs/controller.md): the create, one
status write (id, Pending -> Running -> Succeeded and the condition in one
patch), one label write. Stale watch events (older than our own last write)
are dropped by resourceVersion, so our writes do not echo into more writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import os
from collections.abc import Mapping
from typing import Any, Literal

import kopf
import pydantic

from opkeeper import errors, ids, kube, models, states
from opkeeper.controller import metrics
from opkeeper.controller.events import EventPoster
from opkeeper.controller.settings import Settings
from opkeeper.controller.workqueue import WorkQueue
from opkeeper.executors import base, builtin, external, job, webhook

logger = logging.getLogger(__name__)

REPORT_FIELDS = ("progress", "eta", "result", "errorCode", "errorInfo")
"""Status fields workers may write; every other status field is the controller's."""
SUCCEEDED = "Succeeded"
"""The condition ``kubectl wait --for=condition=Succeeded`` waits for."""
CANCEL_REFUSED = "CancelRefused"
_IN_FLIGHT = frozenset({states.State.RUNNING, states.State.WAITING_EXTERNAL})
_DEPENDENCY_FAILED = frozenset(s.value for s in states.TERMINAL - {states.State.SUCCEEDED})
"""Dependency states that fail the dependents (the BDOM rule)."""
RELAUNCH_REFUSED = "RelaunchRefused"


_TERMINAL = frozenset(s.value for s in states.TERMINAL)


def _settled(body: kube.Body) -> bool:
    """Finished, and nothing asked of it since: its Succeeded condition observed the
    current generation (a relaunch after the end bumps it)."""
    status = body.get("status") or {}
    if status.get("state") not in _TERMINAL:
        return False
    generation = body["metadata"].get("generation")
    return any(
        c.get("type") == SUCCEEDED and c.get("observedGeneration") == generation
        for c in status.get("conditions") or []
    )


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def merge_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns ``old`` into ``new``."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            nested = merge_diff(before, value)
            if nested:
                patch[key] = nested
        elif value != before:
            patch[key] = value
    return patch


@dataclasses.dataclass(frozen=True, kw_only=True)
class Transition:
    before: states.State
    after: states.State
    reason: str
    message: str


@dataclasses.dataclass(kw_only=True)
class Plan:
    """What one reconcile decided: the new status and what to tell the world."""

    body: kube.Body
    op: models.Operation
    now: datetime.datetime
    status: models.OperationStatus
    transitions: list[Transition] = dataclasses.field(default_factory=list)
    warnings: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    wake_at: datetime.datetime | None = None
    deleted: bool = False

    def wake(self, when: datetime.datetime | None) -> None:
        """Look at this operation again at ``when`` (the earliest request wins)."""
        if when is not None and (self.wake_at is None or when < self.wake_at):
            self.wake_at = when

    def go(self, event: states.Event, *, reason: str, message: str = "") -> None:
        """Apply ``event`` through the state machine (the only way a state changes)."""
        before = self.status.state
        assert before is not None
        after = states.transition(before, event)
        self.status.state = after
        self.status.reason = reason
        self.status.message = message[:4096] or None
        self.transitions.append(
            Transition(before=before, after=after, reason=reason, message=message)
        )


def _owned(status: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in status.items() if k not in REPORT_FIELDS}


def _since(status: Mapping[str, Any]) -> datetime.datetime | None:
    """When an operation this process did not see move entered its state, at the latest:
    its attempt's start, else its queueing."""
    for field in ("startedAt", "queuedAt", "createdAt"):
        value = status.get(field)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return datetime.datetime.fromisoformat(value)
    return None


def _others_wrote(*, before: kube.Body, after: kube.Body) -> bool:
    """Whether ``after`` (the answer to our id-label patch of ``before``) holds more than
    that label: a write of someone else's landed between the two."""

    def rest(body: kube.Body) -> dict[str, Any]:
        meta = dict(body["metadata"])
        for volatile in ("resourceVersion", "managedFields", "labels"):
            meta.pop(volatile, None)
        labels = {k: v for k, v in (body["metadata"].get("labels") or {}).items() if k != ids.LABEL}
        return {**body, "metadata": meta, "labels": labels}

    return rest(before) != rest(after)


def _reports(status: Mapping[str, Any]) -> dict[str, Any]:
    return {k: status[k] for k in REPORT_FIELDS if k in status}


class Reconciler:
    """Keeps every watched Operation moving through the state machine."""

    def __init__(
        self,
        *,
        client: kube.Client,
        allocator: ids.IdAllocator,
        seal: ids.IdSeal,
        settings: Settings,
        events: EventPoster,
        api_server: str,
    ) -> None:
        """``api_server`` is the URL of the controller's own credentials: no webhook may
        call it (executors/webhook.py, ``Policy``)."""
        self._client = client
        self._ids = allocator
        self._seal = seal
        self._settings = settings
        self._events = events
        self.jobs = job.JobExecutor(client)
        self._webhook = webhook.WebhookExecutor(
            policy=webhook.Policy.build(
                allow=settings.webhook_allow, api_server=api_server, environ=os.environ
            ),
            initial_delay=settings.webhook_initial_delay,
            max_delay=settings.webhook_max_delay,
        )
        self._executors: Mapping[str, base.Executor] = {
            "builtin": builtin.BuiltinExecutor(),
            "job": self.jobs,
            "webhook": self._webhook,
            "external": external.ExternalExecutor(),
        }
        self.queue = WorkQueue(self._reconcile_key, workers=settings.workers)
        self._bodies: dict[str, kube.Body] = {}
        self._names: dict[tuple[str, str], str] = {}
        self._dependents: dict[tuple[str, str], set[str]] = {}
        self._depends: dict[str, set[tuple[str, str]]] = {}
        self._owned: dict[str, dict[str, Any]] = {}
        """Controller-owned status fields as we last wrote them (to undo foreign writes)."""
        self._reported: dict[str, dict[str, Any]] = {}
        """Worker-report fields as last acknowledged (to coalesce updatedAt bumps)."""
        self._last_write: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._entered: dict[str, datetime.datetime] = {}
        """When each operation entered its state, as this process saw it happen."""

    # --- input -----------------------------------------------------------------

    def observe(self, *, event_type: str | None, body: kube.Body) -> None:
        """Take a watch event (``None`` type: seen while listing)."""
        meta = body["metadata"]
        uid: str = meta["uid"]
        key = (meta["namespace"], meta["name"])
        if event_type == "DELETED":
            self._drop(uid, key)
        elif self._remember(body):
            # Listed (a start, a new term): the finished wait until the rest is done.
            self.queue.add(uid, background=event_type is None and _settled(body))
        else:
            logger.debug(
                "%s/%s: dropped %s event at resourceVersion %s, not newer than the one held",
                key[0],
                key[1],
                event_type or "listed",
                meta["resourceVersion"],
            )
            return  # typically the echo of our own write
        self._wake_dependents(key)

    def _wake_dependents(self, key: tuple[str, str]) -> None:
        for dependent in self._dependents.get(key, ()):
            self.queue.add(dependent)

    def observe_job(self, *, event_type: str | None, body: kube.Body) -> None:
        """Take a watch event of a Job an operation started."""
        uid = self.jobs.observe(event_type=event_type, job=body)
        if uid is not None and uid in self._bodies:
            self.queue.add(uid)

    def counts(self) -> dict[str, int]:
        """Operations per state (for the gauge)."""
        result: dict[str, int] = {}
        for body in self._bodies.values():
            state = (body.get("status") or {}).get("state") or "New"
            result[state] = result.get(state, 0) + 1
        return result

    def oldest(self) -> dict[str, float]:
        """Per unfinished state, the seconds the longest-waiting operation has been in it
        (for the stuck-waiting alert)."""
        now = utcnow()
        result: dict[str, float] = {}
        for uid, body in self._bodies.items():
            status = body.get("status") or {}
            state = status.get("state")
            if state is None or states.is_terminal(states.State(state)):
                continue
            since = self._entered.get(uid) or _since(status)
            if since is not None:
                result[state] = max(result.get(state, 0.0), (now - since).total_seconds())
        return result

    def _remember(self, body: kube.Body) -> bool:
        """Hold ``body`` unless what we hold is as new (False then): holding an older
        write answer would hide later writes by others from the next reconcile."""
        meta = body["metadata"]
        uid: str = meta["uid"]
        key = (meta["namespace"], meta["name"])
        if not kube.is_newer(body, than=self._bodies.get(uid)):
            return False
        self._bodies[uid] = body
        self._names[key] = uid
        wanted = {(key[0], name) for name in (body.get("spec") or {}).get("dependsOn") or []}
        for old in self._depends.get(uid, set()) - wanted:
            self._dependents.get(old, set()).discard(uid)
        for new in wanted:
            self._dependents.setdefault(new, set()).add(uid)
        self._depends[uid] = wanted
        return True

    def _drop(self, uid: str, key: tuple[str, str]) -> None:
        self._bodies.pop(uid, None)
        if self._names.get(key) == uid:
            del self._names[key]
        for dependency in self._depends.pop(uid, set()):
            self._dependents.get(dependency, set()).discard(uid)
        for table in (self._owned, self._reported, self._last_write, self._failures, self._entered):
            table.pop(uid, None)
        self.queue.forget(uid)
        for executor in self._executors.values():
            executor.forget(uid)

    # --- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self.queue.start()

    async def stop(self) -> None:
        await self.queue.stop()
        await self._webhook.close()

    # --- the reconcile ---------------------------------------------------------

    async def _reconcile_key(self, uid: str) -> None:
        body = self._bodies.get(uid)
        if body is None:
            return
        loop = asyncio.get_running_loop()
        try:
            plan = await self._reconcile(body)
        except errors.Conflict:
            # Someone (a worker's report) wrote in between: read it and decide again.
            metrics.RECONCILES.labels("conflict").inc()
            await self._refetch(body)
            return
        except errors.NotFound:
            return  # deleted meanwhile; the DELETED event cleans up
        except Exception as exc:
            metrics.RECONCILES.labels("error").inc()
            failures = self._failures.get(uid, 0) + 1
            self._failures[uid] = failures
            delay = min(self._settings.error_max_delay, 0.5 * 2**failures)
            log = logger.warning if isinstance(exc, errors.OpkeeperError) else logger.exception
            log(
                "reconcile of %s/%s failed (retry in %.1fs): %s",
                body["metadata"]["namespace"],
                body["metadata"]["name"],
                delay,
                exc,
            )
            self.queue.schedule(uid, loop.time() + delay)
            return
        metrics.RECONCILES.labels("ok").inc()
        self._failures.pop(uid, None)
        if plan is None or plan.wake_at is None or plan.deleted:
            self.queue.schedule(uid, None)
        else:
            delay = max(0.0, (plan.wake_at - utcnow()).total_seconds())
            self.queue.schedule(uid, loop.time() + delay)

    async def _refetch(self, body: kube.Body) -> None:
        meta = body["metadata"]
        try:
            fresh = await self._client.get(
                kube.OPERATIONS, namespace=meta["namespace"], name=meta["name"]
            )
        except errors.NotFound:
            return
        if fresh["metadata"]["uid"] == meta["uid"]:
            self._remember(fresh)
            self.queue.add(meta["uid"])

    async def _reconcile(self, body: kube.Body) -> Plan | None:
        """Decide and act for one operation; None when it is being deleted."""
        if body["metadata"].get("deletionTimestamp"):
            return None
        try:
            op = models.Operation.model_validate(body)
        except pydantic.ValidationError as exc:
            # The API server validated the schema; this is a status someone broke.
            logger.error("cannot parse operation %s: %s", body["metadata"]["name"], exc)
            raise errors.InvalidArgument(str(exc)) from exc
        now = utcnow()
        plan = Plan(body=body, op=op, now=now, status=op.status.model_copy(deep=True))
        await self._identity(plan)
        self._validate_reports(plan)
        begin = plan.status.state
        if begin is None:
            self._new_attempt(plan, attempt=0)
            plan.status.state = states.State.PENDING
            plan.status.created_at = now
            plan.status.observed_relaunch = op.spec.relaunch or 0
            plan.status.retries_used = 0
        await self._relaunch_or_cancel(plan)
        state = plan.status.state
        if state is states.State.PENDING:
            await self._pending(plan)
        elif state in _IN_FLIGHT and not plan.transitions:
            await self._active(plan)
        elif state is not None and states.is_terminal(state) and not plan.transitions:
            await self._ttl(plan)
        if plan.deleted:
            return plan
        self._conditions(plan)
        self._coalesce_reports(plan)
        await self._write(plan)
        return plan

    async def _identity(self, plan: Plan) -> None:
        if plan.status.id is None:
            # A label id set at creation is kept only when opkeeper sealed it
            # (docs/resources.md, "Ids"); a tenant's own label is replaced.
            plan.status.id = await self._seal.trusted_id(plan.body) or await self._ids.allocate()

    def _validate_reports(self, plan: Plan) -> None:
        """Undo writes by others to controller-owned status fields, and keep progress
        from going backwards within an attempt (workers own only the report fields)."""
        uid = plan.body["metadata"]["uid"]
        seen = plan.op.status.to_k8s()
        mine = self._owned.setdefault(uid, _owned(seen))
        if _owned(seen) != mine:
            changed = sorted(k for k in set(mine) | set(_owned(seen)) if mine.get(k) != seen.get(k))
            restored = models.OperationStatus.model_validate({**mine, **_reports(seen)})
            plan.status = restored
            plan.warnings.append(
                (
                    "StatusOverwritten",
                    f"status fields {', '.join(changed)} belong to the controller; restored",
                )
            )
        previous = (self._reported.get(uid) or {}).get("progress")
        current = plan.status.progress
        if previous is not None and current is not None and current < previous:
            plan.status.progress = previous
            plan.warnings.append(("ProgressWentBack", f"progress {current} < {previous} ignored"))

    def _new_attempt(self, plan: Plan, *, attempt: int) -> None:
        status = plan.status
        status.attempt = attempt
        status.queued_at = plan.now
        status.next_attempt_at = None
        status.started_at = None
        status.finished_at = None
        status.executor = None
        status.progress = None
        status.eta = None
        status.result = None
        status.error_code = None
        status.error_info = None
        status.conditions = [
            c for c in status.conditions or [] if c.type not in (CANCEL_REFUSED, RELAUNCH_REFUSED)
        ] or None

    def _archive(self, plan: Plan, *, state: states.State) -> None:
        """Keep the attempt that just ended in the bounded history."""
        status = plan.status
        record = models.AttemptRecord(
            attempt=status.attempt or 0,
            state=state,
            started_at=status.started_at,
            finished_at=status.finished_at or plan.now,
            error_code=status.error_code,
            error_info=status.error_info,
            params=status.executor.params if status.executor else None,
        )
        status.history = [*(status.history or []), record][-models.HISTORY_LIMIT :]

    def _refuse(self, plan: Plan, *, condition: str, reason: str, message: str) -> None:
        """Refuse a request visibly: a condition (once) and a Warning Event."""
        present = any(c.type == condition for c in plan.status.conditions or [])
        if not present:
            plan.status.conditions = [
                *(plan.status.conditions or []),
                models.Condition(
                    type=condition,
                    status="True",
                    reason=reason,
                    message=message,
                    last_transition_time=plan.now,
                ),
            ]
            plan.warnings.append((condition, message))

    def _executor(self, plan: Plan) -> base.Executor:
        return self._executors[plan.op.spec.executor.kind()]

    def _context(self, plan: Plan) -> base.Context:
        assert plan.status.id is not None
        return base.Context(
            op=plan.op.model_copy(update={"status": plan.status}),
            body=plan.body,
            id=plan.status.id,
            attempt=plan.status.attempt or 0,
            now=plan.now,
        )

    async def _relaunch_or_cancel(self, plan: Plan) -> None:
        spec, status = plan.op.spec, plan.status
        assert status.state is not None
        wanted = spec.relaunch or 0
        if wanted != (status.observed_relaunch or 0):
            status.observed_relaunch = wanted
            if states.is_terminal(status.state):
                self._archive(plan, state=status.state)
                plan.go(
                    states.Event.RELAUNCH,
                    reason="Relaunched",
                    message=f"relaunch {wanted} requested",
                )
                self._new_attempt(plan, attempt=(status.attempt or 0) + 1)
                status.retries_used = 0
            else:
                self._refuse(
                    plan,
                    condition=RELAUNCH_REFUSED,
                    reason="OperationActive",
                    message=f"relaunch {wanted} refused: the operation is still "
                    f"{status.state.value}; relaunch it once it has finished",
                )
        if not spec.cancel:
            return
        if not states.is_terminal(status.state):
            if status.executor is not None:
                await self._executor(plan).cancel(self._context(plan))
            plan.go(
                states.Event.CANCEL, reason="CancelRequested", message="cancelled by spec.cancel"
            )
            status.finished_at = plan.now
        elif status.state is not states.State.CANCELLED and not plan.transitions:
            try:
                states.transition(status.state, states.Event.CANCEL)
            except errors.IllegalTransition as exc:
                self._refuse(
                    plan, condition=CANCEL_REFUSED, reason="AlreadyFinished", message=str(exc)
                )

    def _deadline(self, plan: Plan) -> datetime.datetime | None:
        seconds = plan.op.spec.deadline_seconds
        queued = plan.status.queued_at
        if seconds is None or queued is None:
            return None
        return queued + datetime.timedelta(seconds=seconds)

    async def _pending(self, plan: Plan) -> None:
        status = plan.status
        deadline = self._deadline(plan)
        if deadline is not None and plan.now >= deadline:
            self._fail(
                plan,
                base.Finished(
                    event=states.Event.FAIL_INTERNAL,
                    reason="DeadlineExceeded",
                    message=f"not started within deadlineSeconds={plan.op.spec.deadline_seconds}",
                ),
            )
            return
        plan.wake(deadline)
        if status.next_attempt_at is not None and plan.now < status.next_attempt_at:
            plan.wake(status.next_attempt_at)
            return
        blocked = self._dependencies(plan)
        if blocked == "wait":
            return
        if blocked is not None:
            self._fail(plan, blocked)
            return
        outcome = await self._executor(plan).start(self._context(plan))
        if isinstance(outcome, base.NotStarted):
            logger.info("start of %s deferred: %s", plan.body["metadata"]["name"], outcome.message)
            plan.wake(outcome.wake_at)
            return
        status.started_at = plan.now
        status.next_attempt_at = None
        status.executor = outcome.executor
        plan.go(states.Event.START, reason="Started")
        self._apply(plan, outcome)

    def _dependencies(self, plan: Plan) -> base.Finished | Literal["wait"] | None:
        """None: free to start; "wait": a dependency has not succeeded yet; else a failure."""
        names = plan.op.spec.depends_on or []
        if not names:
            return None
        namespace, me = plan.body["metadata"]["namespace"], plan.body["metadata"]["name"]
        cycle = self._cycle(namespace, me)
        if cycle:
            return base.Finished(
                event=states.Event.FAIL_INTERNAL,
                reason="DependencyCycle",
                message="dependsOn forms a cycle: " + " -> ".join(cycle),
            )
        waiting = False
        for name in names:
            uid = self._names.get((namespace, name))
            dependency = self._bodies.get(uid) if uid else None
            state = ((dependency or {}).get("status") or {}).get("state")
            if state in _DEPENDENCY_FAILED:
                return base.Finished(
                    event=states.Event.FAIL_INTERNAL,
                    reason="DependencyFailed",
                    message=f"dependency {name} is {state}",
                )
            if state != states.State.SUCCEEDED.value:
                waiting = True
        return "wait" if waiting else None

    def _cycle(self, namespace: str, start: str) -> list[str]:
        """A dependsOn path from ``start`` back to itself, or [] (depth-first, cached objects)."""
        path: list[str] = []
        seen: set[str] = set()

        def visit(name: str) -> bool:
            path.append(name)
            uid = self._names.get((namespace, name))
            body = self._bodies.get(uid) if uid else None
            for nxt in ((body or {}).get("spec") or {}).get("dependsOn") or []:
                if nxt == start:
                    path.append(nxt)
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    if visit(nxt):
                        return True
            path.pop()
            return False

        return path if visit(start) else []

    async def _active(self, plan: Plan) -> None:
        deadline = self._deadline(plan)
        ctx = self._context(plan)
        if deadline is not None and plan.now >= deadline:
            await self._executor(plan).cancel(ctx)
            self._fail(
                plan,
                base.Finished(
                    event=states.Event.FAIL_INTERNAL,
                    reason="DeadlineExceeded",
                    message=f"not finished within deadlineSeconds={plan.op.spec.deadline_seconds}",
                ),
            )
            return
        plan.wake(deadline)
        self._apply(plan, await self._executor(plan).poll(ctx))

    def _apply(self, plan: Plan, outcome: base.Outcome) -> None:
        """Fold an executor's outcome into the plan."""
        status = plan.status
        if isinstance(outcome, base.NotStarted):
            plan.wake(outcome.wake_at)
            return
        if isinstance(outcome, base.Finished):
            if outcome.executor is not None:
                status.executor = outcome.executor
            if outcome.event is states.Event.SUCCEED:
                plan.go(states.Event.SUCCEED, reason=outcome.reason, message=outcome.message)
                status.result = outcome.result or status.result
                status.progress = 100
                status.finished_at = plan.now
            else:
                self._fail(plan, outcome)
            return
        if outcome.executor is not None:
            status.executor = outcome.executor
        if outcome.waiting_external and status.state is states.State.RUNNING:
            plan.go(
                states.Event.WAIT_EXTERNAL,
                reason="WaitingExternal",
                message="waiting on the external system",
            )
        if outcome.progress is not None and outcome.progress > (status.progress or 0):
            status.progress = outcome.progress
        if outcome.eta is not None:
            status.eta = outcome.eta
        plan.wake(outcome.wake_at)

    def _fail(self, plan: Plan, outcome: base.Finished) -> None:
        """End the attempt as failed, or queue a retry when retries are left."""
        status = plan.status
        assert status.state is not None
        retries = plan.op.spec.retries
        used = status.retries_used or 0
        status.error_code = outcome.error_code if outcome.error_code is not None else 1
        status.error_info = (outcome.error_info or [outcome.message or outcome.reason])[:16]
        if retries and used < retries.limit and states.allowed(status.state, states.Event.RETRY):
            failed = states.transition(status.state, outcome.event)
            status.finished_at = plan.now
            self._archive(plan, state=failed)
            plan.go(
                states.Event.RETRY,
                reason="Retrying",
                message=f"attempt {status.attempt} {failed.value} ({outcome.reason}: "
                f"{outcome.message}); retry {used + 1} of {retries.limit}",
            )
            backoff = retries.backoff_seconds or self._settings.default_retry_backoff_seconds
            self._new_attempt(plan, attempt=(status.attempt or 0) + 1)
            status.retries_used = used + 1
            status.next_attempt_at = plan.now + datetime.timedelta(seconds=backoff * 2**used)
            plan.wake(status.next_attempt_at)
            return
        plan.go(outcome.event, reason=outcome.reason, message=outcome.message)
        status.finished_at = plan.now

    async def _ttl(self, plan: Plan) -> None:
        ttl = plan.op.spec.ttl_seconds_after_finished
        finished = plan.status.finished_at
        if ttl is None or finished is None:
            return
        at = finished + datetime.timedelta(seconds=ttl)
        if plan.now < at:
            plan.wake(at)
            return
        meta = plan.body["metadata"]
        # Conditional on uid and resourceVersion: never delete a relaunched operation.
        with contextlib.suppress(errors.NotFound):
            await self._client.delete(
                kube.OPERATIONS,
                namespace=meta["namespace"],
                name=meta["name"],
                uid=meta["uid"],
                resource_version=meta["resourceVersion"],
                propagation="Background",
            )
        plan.deleted = True
        logger.info(
            "deleted %s/%s: ttlSecondsAfterFinished=%d passed", meta["namespace"], meta["name"], ttl
        )

    def _conditions(self, plan: Plan) -> None:
        """Keep the Succeeded condition in step with the state."""
        status = plan.status
        assert status.state is not None
        if status.state is states.State.SUCCEEDED:
            truth: models.ConditionStatus = "True"
        elif states.is_terminal(status.state):
            truth = "False"
        else:
            truth = "Unknown"
        reason = status.state.value if truth == "Unknown" else (status.reason or status.state.value)
        others = [c for c in status.conditions or [] if c.type != SUCCEEDED]
        current = next((c for c in status.conditions or [] if c.type == SUCCEEDED), None)
        generation = plan.body["metadata"].get("generation")
        if (
            current is not None
            and current.status == truth
            and current.reason == reason
            and current.observed_generation == generation
        ):
            return
        changed = current is None or current.status != truth
        status.conditions = [
            models.Condition(
                type=SUCCEEDED,
                status=truth,
                reason=reason,
                message=status.message,
                last_transition_time=plan.now
                if changed or current is None
                else current.last_transition_time,
                observed_generation=generation,
            ),
            *others,
        ]

    def _coalesce_reports(self, plan: Plan) -> None:
        """A worker's report changes ``updatedAt``, at most once per coalescing window."""
        uid = plan.body["metadata"]["uid"]
        seen = _reports(plan.op.status.to_k8s())
        if uid not in self._reported:
            self._reported[uid] = seen
            return
        if seen == self._reported[uid] or plan.transitions:
            return
        loop_now = asyncio.get_running_loop().time()
        due = self._last_write.get(uid, 0.0) + self._settings.coalesce_seconds
        if loop_now >= due:
            plan.status.updated_at = plan.now
        else:
            plan.wake(plan.now + datetime.timedelta(seconds=due - loop_now))

    async def _write(self, plan: Plan) -> None:
        """At most one status write (conditional), then the id label if missing."""
        meta = plan.body["metadata"]
        uid: str = meta["uid"]
        old = plan.op.status.to_k8s()
        diff = merge_diff(old, plan.status.to_k8s())
        body = plan.body
        loop_now = asyncio.get_running_loop().time()
        due = self._last_write.get(uid, -1e9) + self._settings.coalesce_seconds
        if (
            diff
            and not plan.transitions
            and not plan.warnings
            and set(diff) <= {"progress", "eta", "updatedAt"}
            and loop_now < due
        ):
            # Progress only, too soon after the last write: fold it into a later one.
            plan.wake(plan.now + datetime.timedelta(seconds=due - loop_now))
            diff = {}
        # The status we answer for: what we wrote, or else what we read and accepted.
        ours: Mapping[str, Any] = body.get("status") or {}
        if diff or plan.warnings:
            plan.status.updated_at = plan.now
            body = await self._client.patch(
                kube.OPERATIONS,
                namespace=meta["namespace"],
                name=meta["name"],
                subresource="status",
                body={
                    "metadata": {"resourceVersion": meta["resourceVersion"]},
                    "status": merge_diff(old, plan.status.to_k8s()),
                },
            )
            ours = body.get("status") or {}
            self._last_write[uid] = loop_now
            self._after_write(plan, body)
        assert plan.status.id is not None
        if ids.label_id(body) != plan.status.id:
            before = body
            body = await self._client.patch(
                kube.OPERATIONS,
                namespace=meta["namespace"],
                name=meta["name"],
                body={"metadata": {"labels": {ids.LABEL: str(plan.status.id)}}},
            )
            if _others_wrote(before=before, after=body):
                # Someone wrote between our two patches (a cancel, a report). The label
                # patch's answer carries their write, and its watch events are now stale:
                # judge it in another reconcile instead of taking it as ours.
                self.queue.add(uid)
        if body is not plan.body:
            self._remember(body)
            # The echo of our own write is dropped as stale: tell the dependents now.
            self._wake_dependents((meta["namespace"], meta["name"]))
            written = models.OperationStatus.model_validate(ours).to_k8s()
            self._owned[uid] = _owned(written)
            self._reported[uid] = _reports(written)

    def _after_write(self, plan: Plan, body: kube.Body) -> None:
        """Tell the world about what was just written: logs, Events, metrics."""
        name = f"{body['metadata']['namespace']}/{body['metadata']['name']}"
        for reason, message in plan.warnings:
            logger.warning(
                "%s: %s: %s", name, reason, message, extra={"operation": name, "reason": reason}
            )
            self._events.post(body, type="Warning", reason=reason, message=message)
        uid = body["metadata"]["uid"]
        for t in plan.transitions:
            metrics.TRANSITIONS.labels(t.before.value, t.after.value).inc()
            entered = self._entered.get(uid)
            if entered is not None:
                metrics.TIME_IN_STATE.labels(t.before.value).observe(
                    (plan.now - entered).total_seconds()
                )
            self._entered[uid] = plan.now
            failed = t.after in states.FAILED
            text = f"{t.before.value} -> {t.after.value}" + (f": {t.message}" if t.message else "")
            logger.info(
                "%s: %s (%s)",
                name,
                text,
                t.reason,
                extra={
                    "operation": name,
                    "id": plan.status.id,
                    "attempt": plan.status.attempt,
                    "from": t.before.value,
                    "to": t.after.value,
                    "reason": t.reason,
                },
            )
            self._events.post(
                body, type="Warning" if failed else "Normal", reason=t.reason, message=text
            )
            if states.is_terminal(t.after) and plan.status.queued_at is not None:
                metrics.DURATION.labels(plan.op.spec.type, t.after.value).observe(
                    (plan.now - plan.status.queued_at).total_seconds()
                )


def register(registry: kopf.OperatorRegistry) -> None:
    """Route the watch events of Jobs an operation started to the reconciler in
    ``memo.operations`` (Operations themselves come from :mod:`.streams`)."""

    @kopf.on.event(
        "batch", "v1", "jobs", labels={job.OPERATION_UID_LABEL: kopf.PRESENT}, registry=registry
    )
    async def job_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        memo.operations.observe_job(event_type=event["type"], body=event["object"])
