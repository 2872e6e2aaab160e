"""The ScheduledTask controller: watch, sleep in one timer queue, create the due Operation.

Why it is built this way:

* Waiting must cost no API write. kopf's own ways of waiting (timers,
  daemons, ``TemporaryError(delay=...)``) keep their state in annotations and
  touch every waiting object with a PATCH at least every 10 minutes; 10,000
  tasks would be 17 writes per second of pure waiting. So nothing of kopf's
  touches a ScheduledTask (no handler that changes it: no progress
  annotation, no diff-base, no finalizer), and the waiting is one heap entry
  per task in a single :class:`opkeeper.schedule.TimerQueue`. After a restart
  every task is seen again on the initial listing and re-armed from its status.
* Watch events come from the controller's own list+watch streams
  (:mod:`opkeeper.controller.streams`), not ``kopf.on.event``: kopf spends
  about 1.4 ms of CPU per event, and every run brings events of the task
  (the echoes of its two status writes) and of its Operation (creation,
  status write); that made kopf the bottleneck of firing 10,000 runs over
  three minutes (bench/bench_scheduledtasks.py). The one Operation stream
  feeds both this reconciler (:meth:`Reconciler.observe_operation`) and the
  Operation reconciler, and a relist reports deletions missed while
  disconnected.
* Exactly once, created first and recorded once. A due run's Operation is
  created at once under the name :func:`opkeeper.schedule.operation_name`
  derives from the task and the run; the status fields that record the run
  (lastScheduleTime, lastOperation, active, state, nextRunAt) are kept in
  memory (:attr:`_TaskCache.unrecorded`) and written by the next reconcile,
  :data:`RECORD_DELAY` later or as soon as the Operation finishes, in one
  write conditional on the resourceVersion together with whatever the
  finish changed. A noop run thus costs the task one status write instead
  of two (claim, then finish): one API write of the four a run cost, where
  at 56 runs/s on 2 cores the API server's CPU sets the pace
  (bench/results/scheduledtasks.md). The name
  is what makes it exactly once, not the order: a second controller that
  decides the same run gets 409 AlreadyExists (taken as success when the
  existing Operation carries this task's uid) and records the same fields,
  and its write loses with 409 if the other's came first; a controller that
  dies between create and record leaves the status as it was, so the next
  one owes the same run again, finds its Operation (on the watch: counted
  as started even past the starting deadline, see
  :func:`opkeeper.schedule.plan`; else AlreadyExists) and records it then.
  Claim-first had the same exposure from the other side: a controller dying
  between claim and create re-created the run on restart, i.e. both orders
  rely on the deterministic name, and neither can tell an Operation deleted
  by hand while no controller ran from one never created.
* Deleting a task before it fires means it never runs: there is no
  finalizer and the DELETED event cancels the timer. A delete that reaches
  the API server in the very instant the run fires, before the controller
  saw it, may still get its Operation (the create does not depend on the
  task's version; Kubernetes CronJob has the same race); the record then
  fails with 404 and changes nothing. Operations already created stay: they
  have no ownerReference to the task (so no garbage collection), only the
  ``opkeeper.dev/scheduledtask`` label and the task's uid as an
  annotation.

All decisions are in :func:`opkeeper.schedule.plan`; this module feeds it
from the caches and carries out what it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import time
from typing import Any

import prometheus_client
import pydantic

from opkeeper import API_VERSION, errors, ids, kube, models, schedule, states
from opkeeper.controller.events import EventPoster
from opkeeper.controller.workqueue import WorkQueue

logger = logging.getLogger(__name__)

RUNS = prometheus_client.Counter(
    "opkeeper_scheduledtask_runs_total",
    "Runs of ScheduledTasks: triggered (an Operation was created) or missed.",
    ["result"],
)
LATENESS = prometheus_client.Histogram(
    "opkeeper_scheduledtask_lateness_seconds",
    "How late after its scheduled time a run's Operation was created.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 600),
)


RECORD_DELAY = 1.0
"""Seconds a fired run waits to be recorded in the task's status.

The record is one status write; if the run's Operation finishes within this
window (a noop or other quick Operation), that same write also carries the
finish (``active`` emptied, the state), so the run costs one task write
instead of two. Longer delays save nothing more for long Operations and
leave ``kubectl get`` showing the previous run for longer.
"""


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Operation:
    """One Operation of a task as its watch last showed it."""

    info: schedule.OperationInfo
    uid: str
    """For conditional deletes (historyLimit): never delete a re-created namesake."""


@dataclasses.dataclass(kw_only=True)
class _TaskCache:
    """What the controller knows about one task besides its body."""

    operations: dict[str, _Operation] = dataclasses.field(default_factory=dict)
    in_flight: set[str] = dataclasses.field(default_factory=set)
    """Created by us, not yet seen on the watch."""
    gone: set[str] = dataclasses.field(default_factory=set)
    """Seen deleted (or taken by another task's Operation): no longer active."""
    held: datetime.datetime | None = None
    """The run whose hold (Forbid) was last reported, to post that Event once."""
    unrecorded: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Status fields of runs fired (their Operations created) but not yet written: a
    JSON merge patch (None removes) over the stored status, see :data:`RECORD_DELAY`."""
    failures: int = 0


def _parse_time(text: str) -> datetime.datetime:
    return schedule.aware(datetime.datetime.fromisoformat(text))


def _overlay(status: kube.Body, patch: dict[str, Any]) -> dict[str, Any]:
    """``status`` with the merge patch ``patch`` applied, as the API server would."""
    merged = {**status, **patch}
    return {k: v for k, v in merged.items() if v is not None}


def _same_but_status(old: kube.Body, new: kube.Body) -> bool:
    """Whether two versions of an object differ only in status and resourceVersion."""
    volatile = ("resourceVersion", "managedFields")
    old_meta = {k: v for k, v in old["metadata"].items() if k not in volatile}
    new_meta = {k: v for k, v in new["metadata"].items() if k not in volatile}
    return old_meta == new_meta and old.get("spec") == new.get("spec")


def _operation_of(body: kube.Body) -> _Operation:
    meta = body["metadata"]
    raw_state = (body.get("status") or {}).get("state")
    try:
        state = states.State(raw_state) if raw_state else None
    except ValueError:
        state = None
    scheduled = (meta.get("annotations") or {}).get(schedule.ANNOTATION_SCHEDULED_TIME)
    try:
        run = _parse_time(scheduled) if scheduled else None
    except ValueError:
        run = None
    info = schedule.OperationInfo(
        name=meta["name"], state=state, created=_parse_time(meta["creationTimestamp"]), run=run
    )
    return _Operation(info=info, uid=meta["uid"])


class Reconciler:
    """Keeps every watched ScheduledTask armed and fires its due runs."""

    def __init__(
        self,
        *,
        client: kube.Client,
        allocator: ids.IdAllocator,
        seal: ids.IdSeal,
        events: EventPoster,
        workers: int,
        error_max_delay: float,
        record_delay: float = RECORD_DELAY,
    ) -> None:
        self._client = client
        self._ids = allocator
        self._seal = seal
        self._events = events
        self._error_max_delay = error_max_delay
        self._record_delay = record_delay
        self.queue = WorkQueue(self._reconcile_key, workers=workers)
        self.timers: schedule.TimerQueue[str] = schedule.TimerQueue(on_due=self.queue.add)
        self._timers_task: asyncio.Task[None] | None = None
        self._bodies: dict[str, kube.Body] = {}
        self._caches: dict[str, _TaskCache] = {}

    # --- input ------------------------------------------------------------------

    def observe_task(self, *, event_type: str | None, body: kube.Body) -> None:
        """Take a ScheduledTask watch event (``None`` type: seen while listing)."""
        uid: str = body["metadata"]["uid"]
        if event_type == "DELETED":
            self._forget(uid)
            return
        current = self._bodies.get(uid)
        if not kube.is_newer(body, than=current):
            return  # older than what we hold: typically the echo of our own status write
        self._bodies[uid] = body
        if current is not None and _same_but_status(current, body):
            # Only the status moved: the controller's own write, whose echo can
            # beat the PATCH response here. Nothing to decide; the next reconcile
            # reads it (a record made on a stale version fails with 409 anyway).
            return
        self.queue.add(uid)

    def observe_operation(self, *, event_type: str | None, body: kube.Body) -> None:
        """Take a watch event of an Operation some task created."""
        meta = body["metadata"]
        task_uid = (meta.get("annotations") or {}).get(schedule.ANNOTATION_TASK_UID)
        if not task_uid:
            return
        live = task_uid in self._bodies
        # Kept for tasks not (yet) seen too: at startup an Operation may arrive
        # before its task. The cache of a deleted task then holds only
        # Operations that still exist, so memory follows the cluster.
        cache = self._caches.setdefault(task_uid, _TaskCache())
        name: str = meta["name"]
        before = cache.operations.get(name)
        if event_type == "DELETED":
            cache.operations.pop(name, None)
            if live:
                cache.gone.add(name)
            elif not cache.operations:
                del self._caches[task_uid]
            changed = True
        else:
            seen = _operation_of(body)
            cache.operations[name] = seen
            ours = name in cache.in_flight
            cache.in_flight.discard(name)
            cache.gone.discard(name)
            # Progress reports do not concern the task; finishing does, and so
            # does an Operation we did not just create ourselves.
            if before is None:
                changed = not ours or seen.info.finished
            else:
                changed = before.info.finished != seen.info.finished
        if changed and live:
            self.queue.add(task_uid)

    def _forget(self, uid: str) -> None:
        # Cancelling the timer is what makes "deleted before it fires" never run.
        self.timers.cancel(uid)
        self.queue.forget(uid)
        self._bodies.pop(uid, None)
        self._caches.pop(uid, None)

    def counts(self) -> dict[str, int]:
        """Tasks per state (for logs and the benchmark)."""
        result: dict[str, int] = {}
        for uid, body in self._bodies.items():
            cache = self._caches.get(uid)
            unrecorded = cache.unrecorded if cache is not None else {}
            state = unrecorded.get("state") or (body.get("status") or {}).get("state") or "New"
            result[state] = result.get(state, 0) + 1
        return result

    # --- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        self.queue.start()
        self._timers_task = asyncio.create_task(self.timers.run(), name="scheduledtask-timers")

    async def stop(self) -> None:
        if self._timers_task is not None:
            self._timers_task.cancel()
            await asyncio.gather(self._timers_task, return_exceptions=True)
        await self.queue.stop()

    # --- the reconcile ----------------------------------------------------------

    async def _reconcile_key(self, uid: str) -> None:
        body = self._bodies.get(uid)
        if body is None:
            return
        cache = self._caches.setdefault(uid, _TaskCache())
        try:
            await self._reconcile(uid, body, cache)
        except errors.Conflict:
            # The task changed after we read it (an edit, another controller's
            # record): read it again and decide anew. Queued even when only the
            # status moved (which observe_task lets pass): runs fired but not
            # yet recorded must still be written, and the timer re-armed.
            await self._refetch(body)
            self.queue.add(uid)
            return
        except errors.NotFound:
            return  # deleted meanwhile: nothing was created, the DELETED event cleans up
        except Exception as exc:
            cache.failures += 1
            delay = min(self._error_max_delay, 0.5 * 2**cache.failures)
            log = logger.warning if isinstance(exc, errors.OpkeeperError) else logger.exception
            meta = body["metadata"]
            log(
                "reconcile of scheduledtask %s/%s failed (retry in %.1fs): %s",
                meta["namespace"],
                meta["name"],
                delay,
                exc,
            )
            self.timers.schedule(uid, time.time() + delay)
            return
        cache.failures = 0

    async def _refetch(self, body: kube.Body) -> None:
        meta = body["metadata"]
        with contextlib.suppress(errors.NotFound):
            fresh = await self._client.get(
                kube.SCHEDULED_TASKS, namespace=meta["namespace"], name=meta["name"]
            )
            if fresh["metadata"]["uid"] == meta["uid"]:
                self.observe_task(event_type="MODIFIED", body=fresh)

    async def _reconcile(self, uid: str, body: kube.Body, cache: _TaskCache) -> None:
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        try:
            task = models.ScheduledTask.model_validate(body)
        except pydantic.ValidationError as exc:
            # The API server validated the spec; this is a status someone broke.
            logger.error("cannot parse scheduledtask %s/%s: %s", namespace, name, exc)
            return
        stored = body.get("status") or {}
        # Plan on the status as it will be once the fired runs are recorded: no
        # run is fired twice and the horizon is the one already decided.
        status = models.ScheduledTaskStatus.model_validate(_overlay(stored, cache.unrecorded))
        await self._resolve_unknown(uid, namespace, status, cache)
        now = utcnow()
        plan = schedule.plan(
            task=schedule.TaskView(
                name=name,
                created=_parse_time(meta["creationTimestamp"]),
                generation=int(meta.get("generation") or 0),
                spec=task.spec,
                status=status,
            ),
            operations=[op.info for op in cache.operations.values()],
            in_flight=frozenset(cache.in_flight),
            gone=frozenset(cache.gone),
            now=now,
        )
        # The plan's patch is relative to the overlaid status; what the API
        # server lacks is the unrecorded fields plus that patch.
        patch = {**cache.unrecorded, **plan.status}
        if status.id is None:
            # A sealed label id (the gateway's BDOM create answers with it) is kept, as
            # for Operations; anything else gets a fresh id.
            patch["id"] = await self._seal.trusted_id(body) or await self._ids.allocate()
        if plan.fire is not None and not plan.fire.recovery:
            await self._create(body, plan.fire, cache)
            # Recorded later, together with the finish if it comes soon enough.
            cache.unrecorded = patch
        else:
            changes = {k: v for k, v in patch.items() if stored.get(k) != v}
            if changes:
                # Conditional on the version decided on: a concurrent edit or a
                # second controller's record makes us re-read and re-plan (409),
                # keeping the unrecorded fields until a write has carried them.
                body = await self._client.patch(
                    kube.SCHEDULED_TASKS,
                    namespace=namespace,
                    name=name,
                    subresource="status",
                    body={
                        "metadata": {"resourceVersion": meta["resourceVersion"]},
                        "status": changes,
                    },
                )
                if kube.is_newer(body, than=self._bodies.get(uid)):
                    self._bodies[uid] = body
            cache.unrecorded = {}
            if plan.fire is not None:
                await self._create(body, plan.fire, cache)
        for operation in plan.cancel:
            with contextlib.suppress(errors.NotFound):
                await self._client.patch(
                    kube.OPERATIONS,
                    namespace=namespace,
                    name=operation,
                    body={"spec": {"cancel": True}},
                )
        for operation in plan.delete:
            await self._delete(namespace, cache, operation)
        effective = _overlay(body.get("status") or {}, cache.unrecorded)
        # Deleted names matter only while the status still lists them as active.
        cache.gone.intersection_update(effective.get("active") or ())
        self._tell(body, plan, cache, effective)
        wake_at = plan.wake_at.timestamp() if plan.wake_at is not None else None
        if cache.unrecorded:
            record_at = now.timestamp() + self._record_delay
            wake_at = record_at if wake_at is None else min(wake_at, record_at)
        if wake_at is None:
            self.timers.cancel(uid)
        else:
            self.timers.schedule(uid, wake_at)

    async def _resolve_unknown(
        self, uid: str, namespace: str, status: models.ScheduledTaskStatus, cache: _TaskCache
    ) -> None:
        """Look up recorded active Operations the watch has not shown (yet), e.g. right
        after a restart: found ones join the cache; missing ones stay unknown to the plan."""
        for name in status.active or ():
            if name in cache.operations or name in cache.in_flight or name in cache.gone:
                continue
            try:
                found = await self._client.get(kube.OPERATIONS, namespace=namespace, name=name)
            except errors.NotFound:
                continue
            annotations = found["metadata"].get("annotations") or {}
            if annotations.get(schedule.ANNOTATION_TASK_UID) == uid:
                cache.operations[name] = _operation_of(found)
            else:
                cache.gone.add(name)

    async def _create(self, task: kube.Body, fire: schedule.Fire, cache: _TaskCache) -> None:
        meta = task["metadata"]
        template = task["spec"]["template"]
        template_meta = template.get("metadata") or {}
        # The sealed id set at creation spares the Operation controller its label
        # write; the seal is what makes the controller believe the label.
        stamp = await self._seal.stamp(
            await self._ids.allocate(), namespace=meta["namespace"], name=fire.name
        )
        fired_at = utcnow()
        operation = {
            "apiVersion": API_VERSION,
            "kind": "Operation",
            "metadata": {
                "name": fire.name,
                "labels": {
                    **(template_meta.get("labels") or {}),
                    schedule.LABEL_TASK: schedule.label_value(meta["name"]),
                    **stamp.labels,
                },
                "annotations": {
                    **(template_meta.get("annotations") or {}),
                    **stamp.annotations,
                    schedule.ANNOTATION_TASK_UID: meta["uid"],
                    schedule.ANNOTATION_SCHEDULED_TIME: schedule.timestamp(fire.run),
                    schedule.ANNOTATION_FIRED_AT: schedule.millis(fired_at),
                },
            },
            "spec": template["spec"],
        }
        # In flight before the POST: its ADDED event can arrive before the response.
        cache.in_flight.add(fire.name)
        try:
            await self._client.create(kube.OPERATIONS, operation, namespace=meta["namespace"])
        except kube.AlreadyExists:
            existing = await self._client.get(
                kube.OPERATIONS, namespace=meta["namespace"], name=fire.name
            )
            owner = (existing["metadata"].get("annotations") or {}).get(
                schedule.ANNOTATION_TASK_UID
            )
            if owner != meta["uid"]:
                # A deleted task of the same name made it: this run cannot be created.
                cache.in_flight.discard(fire.name)
                cache.gone.add(fire.name)
                self._events.post(
                    task,
                    type="Warning",
                    reason="NameTaken",
                    message=f"Operation {fire.name} exists and belongs to another task"
                    " (an earlier task of this name?); the run was not started",
                )
                return
        except BaseException:
            cache.in_flight.discard(fire.name)
            raise
        else:
            LATENESS.observe((fired_at - fire.run).total_seconds())
            RUNS.labels("triggered").inc()
        if fire.name in cache.operations:
            cache.in_flight.discard(fire.name)  # already seen (or known from before a restart)
        logger.info(
            "scheduledtask %s/%s: created Operation %s for the run at %s%s",
            meta["namespace"],
            meta["name"],
            fire.name,
            schedule.timestamp(fire.run),
            " (re-created after a restart)" if fire.recovery else "",
        )

    async def _delete(self, namespace: str, cache: _TaskCache, name: str) -> None:
        operation = cache.operations.get(name)
        if operation is None:
            return
        # Conditional on uid: never delete a namesake created after we looked.
        with contextlib.suppress(errors.NotFound, errors.Conflict):
            await self._client.delete(
                kube.OPERATIONS, namespace=namespace, name=name, uid=operation.uid
            )
        cache.operations.pop(name, None)
        cache.gone.add(name)

    def _tell(
        self, body: kube.Body, plan: schedule.Plan, cache: _TaskCache, status: kube.Body
    ) -> None:
        """Events and metrics for what the plan did."""
        for notice in plan.notices:
            if notice.reason == "MissedRun":
                RUNS.labels("missed").inc()
            self._events.post(body, type=notice.type, reason=notice.reason, message=notice.message)
        if plan.held is not None and cache.held != plan.held:
            cache.held = plan.held
            self._events.post(
                body,
                type="Normal",
                reason="RunHeld",
                message=f"the run at {schedule.timestamp(plan.held)} waits for "
                f"{', '.join(status.get('active') or [])} to finish"
                " (concurrencyPolicy Forbid)",
            )
