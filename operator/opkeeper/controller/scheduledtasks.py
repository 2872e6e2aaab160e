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
* Exactly once. A due run is first *claimed* with a status write that is
  conditional on the resourceVersion we decided on (lastScheduleTime,
  lastOperation, active), then the Operation is created under the name
  :func:`opkeeper.schedule.operation_name` derives from the task and the run.
  A second controller loses the claim (409) or the create (409
  AlreadyExists, taken as success when the existing Operation is this
  task's); a controller that dies between claim and create re-creates the
  recorded run on restart (see :func:`opkeeper.schedule.plan`).
* Deleting a task before it fires means it never runs: there is no
  finalizer, the DELETED event cancels the timer, and a claim racing with
  the delete fails (404) before anything is created. Operations already
  created stay: they have no ownerReference to the task (so no garbage
  collection), only the ``opkeeper.dev/scheduledtask`` label and the task's
  uid as an annotation.

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
    failures: int = 0


def _parse_time(text: str) -> datetime.datetime:
    return schedule.aware(datetime.datetime.fromisoformat(text))


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
    info = schedule.OperationInfo(
        name=meta["name"], state=state, created=_parse_time(meta["creationTimestamp"])
    )
    return _Operation(info=info, uid=meta["uid"])


class Reconciler:
    """Keeps every watched ScheduledTask armed and fires its due runs."""

    def __init__(
        self,
        *,
        client: kube.Client,
        allocator: ids.IdAllocator,
        events: EventPoster,
        workers: int,
        error_max_delay: float,
    ) -> None:
        self._client = client
        self._ids = allocator
        self._events = events
        self._error_max_delay = error_max_delay
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
        if current is not None and kube.resource_version_of(body) <= kube.resource_version_of(
            current
        ):
            return  # older than what we hold: typically the echo of our own status write
        self._bodies[uid] = body
        if current is not None and _same_but_status(current, body):
            # Only the status moved: the controller's own write, whose echo can
            # beat the PATCH response here. Nothing to decide; the next
            # reconcile reads it (a conflicting claim would fail with 409 anyway).
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
        for body in self._bodies.values():
            state = (body.get("status") or {}).get("state") or "New"
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
            # claim): read it again and decide anew.
            await self._refetch(body)
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
        await self._resolve_unknown(uid, namespace, task.status, cache)
        now = utcnow()
        plan = schedule.plan(
            task=schedule.TaskView(
                name=name,
                created=_parse_time(meta["creationTimestamp"]),
                generation=int(meta.get("generation") or 0),
                spec=task.spec,
                status=task.status,
            ),
            operations=[op.info for op in cache.operations.values()],
            in_flight=frozenset(cache.in_flight),
            gone=frozenset(cache.gone),
            now=now,
        )
        status = dict(plan.status)
        if task.status.id is None:
            status["id"] = await self._ids.allocate()
        if status:
            # The claim: conditional on the version decided on, so a concurrent
            # edit, delete or second controller stops us before any create.
            body = await self._client.patch(
                kube.SCHEDULED_TASKS,
                namespace=namespace,
                name=name,
                subresource="status",
                body={"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": status},
            )
            self._bodies[uid] = body
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
        # Deleted names matter only while the status still lists them as active.
        cache.gone.intersection_update((body.get("status") or {}).get("active") or ())
        self._tell(body, plan, cache, now)
        if plan.wake_at is None:
            self.timers.cancel(uid)
        else:
            self.timers.schedule(uid, plan.wake_at.timestamp())

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
        fired_at = utcnow()
        # The id label set at creation spares the Operation controller its label write.
        op_id = await self._ids.allocate()
        operation = {
            "apiVersion": API_VERSION,
            "kind": "Operation",
            "metadata": {
                "name": fire.name,
                "labels": {
                    **(template_meta.get("labels") or {}),
                    schedule.LABEL_TASK: schedule.label_value(meta["name"]),
                    ids.LABEL: str(op_id),
                },
                "annotations": {
                    **(template_meta.get("annotations") or {}),
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
        self, body: kube.Body, plan: schedule.Plan, cache: _TaskCache, now: datetime.datetime
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
                f"{', '.join((body.get('status') or {}).get('active') or [])} to finish"
                " (concurrencyPolicy Forbid)",
            )
