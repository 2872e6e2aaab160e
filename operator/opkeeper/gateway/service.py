"""The gateway's one domain service: what every facade calls, whatever its dialect.

Facades decode arguments and format answers; everything that matters
happens here, once: the caller's namespace scopes every read and write (an
id from another namespace is "not found", never "forbidden", so existence
does not leak), reads come from the watch-fed cache, and writes are creates
and patches of the resources. The service decides no state: it asks
:mod:`opkeeper.states` whether a cancel or a relaunch is allowed and lets
the controller do the rest.

Writes are conditional on the resourceVersion the decision was based on; if
the object moved on meanwhile (a 409), the service reads it fresh and
decides again, so a cancel can never slip past an operation that finished a
moment ago. A refusal is decided on the API server's current object, never
on a cache that may lag behind it.

Read-your-writes: legacy clients were written against systems whose writes
were synchronous, so a write returns only once the next read sees it: once
this process's watch has brought the resourceVersion the write produced
and, for a relaunch or a cancel, the controller's answer (a new attempt, or
the operation finished). The wait is on the watch feed
(:meth:`.cache._Table.wait`) and bounded by
:attr:`Settings.write_visible_timeout_seconds`; past the bound the write
stands and the call succeeds anyway (a log line and ``on_write_not_visible``
say so), because a failure answer would make a client repeat a write that
happened.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

import pydantic

from opkeeper import API_VERSION, errors, ids, kube, models, names, states
from opkeeper.gateway import auth, cache, calllog, ratelimit, records

log = logging.getLogger(__name__)

Body = dict[str, Any]


class Kube(Protocol):
    """The part of :class:`opkeeper.kube.Client` the service writes with."""

    async def get(
        self,
        resource: kube.Resource,
        *,
        name: str,
        namespace: str | None = None,
        subresource: str | None = None,
    ) -> Body: ...

    async def list(
        self,
        resource: kube.Resource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
    ) -> kube.ObjectList: ...

    async def create(
        self,
        resource: kube.Resource,
        body: Body,
        *,
        namespace: str | None = None,
        dry_run: bool = False,
    ) -> Body: ...

    async def patch(
        self,
        resource: kube.Resource,
        *,
        name: str,
        body: Any,
        namespace: str | None = None,
        patch_type: kube.PatchType = "merge",
        subresource: str | None = None,
        force: bool = False,
    ) -> Body: ...

    async def delete(
        self,
        resource: kube.Resource,
        *,
        name: str,
        namespace: str | None = None,
        uid: str | None = None,
        resource_version: str | None = None,
        propagation: Literal["Background", "Foreground", "Orphan"] | None = None,
    ) -> None: ...


class DryRun(Protocol):
    """Server-side dry runs of the writes an apply batch will make."""

    async def patch(
        self, resource: kube.Resource, *, name: str, namespace: str, body: Body
    ) -> Body: ...

    async def delete(
        self, resource: kube.Resource, *, name: str, namespace: str, uid: str
    ) -> None: ...


class Ids(Protocol):
    """Where new operation ids come from (:class:`opkeeper.ids.IdAllocator`)."""

    async def allocate(self) -> int: ...


class Seal(Protocol):
    """Seals an id for the object it labels (:class:`opkeeper.ids.IdSeal`), so the
    controller keeps the id the gateway already answered with."""

    async def stamp(self, value: int, *, namespace: str, name: str) -> ids.Stamp: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """How the service creates and lists operations."""

    executors: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    """The executor (as in ``spec.executor``) of operations created through the gateway,
    per operation type. Legacy create calls name only a type and params, so the
    platform team decides here how each type runs."""
    default_executor: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: {"external": {}}
    )
    """The executor for types not in :attr:`executors` (default ``external``: nothing
    starts and an outside actor reports, the safe choice for an unknown type)."""
    list_limit: int = 300
    """How many ids ``operation_list`` returns, newest first (Gandi's documented 300)."""
    log_page: int = 1000
    """Most log entries one ``log(serial)`` call returns; a client continues from the
    highest serial it got, so paging keeps the log gapless."""
    log_latest: int = 10
    """Entries ``log()`` without a serial returns (gocept's documented 10)."""
    write_attempts: int = 3
    """Attempts of a conditional write when the object keeps changing underneath."""
    apply_max_records: int = 100
    """Most records one ``apply`` call may carry (default 100): each costs API calls
    (a read, a dry run, a write), so a batch is bounded like any other request."""
    max_spec_bytes: int = 64 * 1024
    """Largest spec (params included, as JSON) a legacy write may store (default 64 KiB):
    every byte goes to etcd and into every watcher's cache."""
    write_visible_timeout_seconds: float = 10.0
    """Longest time a write (create, relaunch, cancel, apply) waits before it answers
    until the next read will see it: the watch has brought the version it wrote and, for
    a relaunch or a cancel, the controller has acted on it (default 10 s). Past it the
    write stands and the call answers success anyway; a line is logged and
    ``opkeeper_gateway_writes_not_visible_total`` counts it."""
    writes: ratelimit.Settings = dataclasses.field(default_factory=ratelimit.Settings)
    """Each tenant namespace's write budget in this process (every write method charges
    it first; an ``apply`` batch one per record)."""

    def executor_for(self, type_: str) -> dict[str, Any]:
        return dict(self.executors.get(type_, self.default_executor))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ListFilter:
    """``operation_list``'s filter, already turned into states and datetimes."""

    states: frozenset[states.State] | None = None
    type: str | None = None
    updated_after: datetime.datetime | None = None
    updated_before: datetime.datetime | None = None


@dataclasses.dataclass(kw_only=True)
class _Step:
    """One planned write of an apply batch, with what undoes it."""

    parsed: records.Parsed
    verb: Literal["create", "patch", "delete"]
    resource: kube.Resource
    before: Body | None
    """The object as it was (None for a create)."""
    body: Body
    after: Body | None = None
    """The object as the API server returned it."""


WriteKind = Literal["create", "relaunch", "cancel", "apply", "annotate", "destroy"]
"""The writes whose visibility is waited for (the label of the not-visible metric)."""

Shown = Callable[[], Awaitable[None]]
"""A wait (not yet started) that ends once a write is visible in the cache."""


def _ignore(write: WriteKind) -> None:
    """The default ``on_write_not_visible``: the log line is the only trace."""


class Service:
    """Lists, details, creates, relaunches, cancels, applies, queries and logs."""

    def __init__(
        self,
        *,
        operations: cache.OperationCache,
        tasks: cache.TaskCache,
        kube_client: Kube,
        dry_run: DryRun,
        id_allocator: Ids,
        id_seal: Seal,
        call_log: calllog.CallLog,
        settings: Settings,
        on_write_not_visible: Callable[[WriteKind], None] = _ignore,
    ) -> None:
        self.operations = operations
        self.tasks = tasks
        self._kube = kube_client
        self._dry_run = dry_run
        self._ids = id_allocator
        self._seal = id_seal
        self.call_log = call_log
        self.settings = settings
        self._on_write_not_visible = on_write_not_visible
        self._budget = ratelimit.Limiter(settings=settings.writes)

    # --- reads ---------------------------------------------------------------

    def list_operations(self, *, who: auth.Identity, filter_: ListFilter) -> list[cache.OpId]:
        return self.operations.list_ids(
            who.tenant,
            states_=filter_.states,
            type_=filter_.type,
            updated_after=filter_.updated_after,
            updated_before=filter_.updated_before,
            limit=self.settings.list_limit,
        )

    def operation(self, *, who: auth.Identity, id_: cache.OpId) -> cache.OperationEntry:
        entry = self.operations.get_id(who.tenant, id_)
        if entry is None:
            raise errors.NotFound(f"operation {id_} not found")
        return entry

    def job_ids(
        self, *, who: auth.Identity, created_after: datetime.datetime | None
    ) -> list[cache.OpId]:
        """Every operation id of the caller's namespace, newest first, or those created at
        or after ``created_after`` (CloudStack's listAsyncJobs pages through them). The
        date index is on the update time, which is never before the creation time, so
        it narrows the candidates and the creation time decides."""
        ids = self.operations.list_ids(
            who.tenant, updated_after=created_after, limit=len(self.operations)
        )
        if created_after is None:
            return ids
        out = []
        for id_ in ids:
            entry = self.operations.get_id(who.tenant, id_)
            if entry is not None and entry.date_created >= created_after:
                out.append(id_)
        return out

    def query(
        self, *, who: auth.Identity, type_: str, exact: Mapping[str, Any]
    ) -> list[records.Record]:
        """Records of ``type_`` whose values equal every filter value."""
        if type_ not in records.TYPES:
            raise errors.InvalidArgument(
                f"unknown type {names.shown(type_)}; expected one of {', '.join(records.TYPES)}"
            )
        known = records.writable(type_) | records.readonly(type_) | {"name"}
        unknown = sorted(set(exact) - known)
        if unknown:
            shown = ", ".join(names.shown(k) for k in unknown[:5])
            raise errors.InvalidArgument(f"unknown filter keys for {type_}: {shown}")
        if "name" in exact:
            names.object_name(exact["name"], what="filter name")
        if "id" in exact:
            names.int_id(exact["id"], what="filter id")
        # Use the indexes for what they cover; compare the rest on the built record.
        indexed: dict[str, Any] = {}
        for key in ("name", "type", "state"):
            if key in exact and isinstance(exact[key], str):
                indexed[key] = _state_key(type_, exact[key]) if key == "state" else exact[key]
        ref = exact.get("object")
        if type_ == "operation" and isinstance(ref, dict) and set(ref) == {"kind", "name"}:
            indexed["object"] = (ref["kind"], ref["name"])
        if "id" in exact:
            found = self._by_id(type_, who.tenant, cache.OpId(exact["id"]))
            candidates = [found] if found is not None else []
        elif type_ == "operation":
            candidates = list(self.operations.select(who.tenant, indexed))
        else:
            candidates = list(self.tasks.select(who.tenant, indexed))
        out = []
        for entry in candidates:
            record = _record(entry)
            if all(record.get(key) == value for key, value in exact.items()):
                out.append(record)
        return out

    def _by_id(
        self, type_: str, namespace: str, id_: cache.OpId
    ) -> cache.OperationEntry | cache.TaskEntry | None:
        if type_ == "operation":
            return self.operations.get_id(namespace, id_)
        return self.tasks.get_id(namespace, id_)

    async def log(self, *, who: auth.Identity, serial: int | None) -> list[calllog.Entry]:
        if serial is None:
            return await self.call_log.latest(tenant=who.tenant, n=self.settings.log_latest)
        if serial < 0:
            raise errors.InvalidArgument("serial must be 0 or more")
        return await self.call_log.since(
            tenant=who.tenant, serial=serial, limit=self.settings.log_page
        )

    # --- writes ----------------------------------------------------------------

    async def create(
        self,
        *,
        who: auth.Identity,
        type_: str,
        params: Mapping[str, Any],
        object_: Mapping[str, Any] | None,
        annotations: Mapping[str, str] | None = None,
    ) -> cache.OpId:
        """Create an Operation named ``op-<id>`` with the type's configured executor
        (and ``annotations``: only :data:`.cache.KEPT_ANNOTATIONS`, e.g. XenAPI's name
        label and description)."""
        self._budget.charge(tenant=who.tenant)
        extra = _kept_annotations(annotations or {})
        try:
            spec = models.OperationSpec.model_validate(
                self._legacy_spec(type_=type_, params=params, object_=object_)
            )
        except pydantic.ValidationError as exc:
            raise errors.InvalidArgument(records.validation_message(exc)) from None
        self._check_size(spec.to_k8s(), where="operation")
        id_ = cache.OpId(await self._ids.allocate())
        stamp = await self._seal.stamp(id_, namespace=who.tenant, name=f"op-{id_}")
        body: Body = {
            "apiVersion": API_VERSION,
            "kind": "Operation",
            "metadata": {
                "name": f"op-{id_}",
                "namespace": who.tenant,
                "labels": {**stamp.labels, "app.kubernetes.io/created-by": "opkeeper-gateway"},
                "annotations": {
                    **extra,
                    **stamp.annotations,
                    cache.CREATED_BY_USER_ANNOTATION: who.user_id,
                },
            },
            "spec": spec.to_k8s(),
        }
        created = await self._kube.create(kube.OPERATIONS, body, namespace=who.tenant)
        await self._until_visible(
            write="create",
            subject=f"{who.tenant}/op-{id_}",
            waits=[self._shown_operation(created)],
        )
        return id_

    async def relaunch(
        self, *, who: auth.Identity, id_: cache.OpId, params: Mapping[str, Any]
    ) -> None:
        """Merge ``params`` into the operation's params, bump ``spec.relaunch`` and withdraw
        an earlier ``spec.cancel`` (still present, it would cancel the new attempt)."""
        self._budget.charge(tenant=who.tenant)

        def plan(entry: cache.OperationEntry) -> Body | None:
            states.transition(entry.state, states.Event.RELAUNCH)
            merged = {
                **(entry.spec.get("params") or {}),
                **records.storable(params, where="params"),
            }
            self._check_size({"params": merged}, where=f"operation {id_}")
            spec: Body = {"params": merged, "relaunch": int(entry.spec.get("relaunch") or 0) + 1}
            if entry.spec.get("cancel"):
                spec["cancel"] = None  # merge patch: remove the key
            return {"spec": spec}

        await self._conditional_patch(
            who=who,
            id_=id_,
            write="relaunch",
            plan=plan,
            acted=lambda op: _relaunch_answered(
                uid=op.uid, relaunch=int(op.spec.get("relaunch") or 0)
            ),
        )

    async def cancel(self, *, who: auth.Identity, id_: cache.OpId) -> None:
        """Set ``spec.cancel``; refused (IllegalTransition) once the operation finished."""
        self._budget.charge(tenant=who.tenant)

        def plan(entry: cache.OperationEntry) -> Body | None:
            states.transition(entry.state, states.Event.CANCEL)
            return None if entry.spec.get("cancel") else {"spec": {"cancel": True}}

        # Also when spec.cancel was set already: the caller is told "cancelled" once the
        # next read says so.
        await self._conditional_patch(
            who=who,
            id_=id_,
            write="cancel",
            plan=plan,
            acted=lambda op: _finished(uid=op.uid),
        )

    async def annotate(
        self, *, who: auth.Identity, id_: cache.OpId, annotations: Mapping[str, str]
    ) -> None:
        """Set annotations of :data:`.cache.KEPT_ANNOTATIONS` on an operation in any state
        (a merge patch: nothing else changes, so no version condition is needed); answers
        once the next read shows them."""
        self._budget.charge(tenant=who.tenant)
        patch = {"metadata": {"annotations": _kept_annotations(annotations)}}
        entry = self.operations.get_id(who.tenant, id_) or await self._fetch_id(who=who, id_=id_)
        try:
            updated = await self._kube.patch(
                kube.OPERATIONS, name=entry.name, namespace=entry.namespace, body=patch
            )
        except errors.NotFound:
            raise errors.NotFound(f"operation {id_} not found") from None
        await self._until_visible(
            write="annotate",
            subject=f"{entry.namespace}/{entry.name}",
            waits=[self._shown_operation(updated)],
        )

    async def destroy(self, *, who: auth.Identity, id_: cache.OpId) -> None:
        """Delete a finished operation (an unfinished one must be cancelled first, so no
        work runs on without a record); answers once the next read no longer shows it."""
        self._budget.charge(tenant=who.tenant)
        entry = self.operations.get_id(who.tenant, id_) or await self._fetch_id(who=who, id_=id_)
        if not states.is_terminal(entry.state):
            entry = await self._fetch(entry, id_=id_)  # the cache may lag behind
            if not states.is_terminal(entry.state):
                raise errors.IllegalTransition(
                    f"operation {id_} is not finished ({entry.state.value}); cancel it first"
                )
        try:
            await self._kube.delete(
                kube.OPERATIONS, name=entry.name, namespace=entry.namespace, uid=entry.uid
            )
        except errors.NotFound:
            raise errors.NotFound(f"operation {id_} not found") from None
        except errors.Conflict:
            # The uid precondition failed: the name now holds another operation.
            raise errors.NotFound(f"operation {id_} not found") from None
        await self._until_visible(
            write="destroy",
            subject=f"{entry.namespace}/{entry.name}",
            waits=[
                functools.partial(
                    self.operations.wait,
                    entry.namespace,
                    entry.name,
                    version=kube.resource_version_of({"metadata": entry.metadata}),
                    holds=_gone(uid=entry.uid),
                )
            ],
        )

    async def _conditional_patch(
        self,
        *,
        who: auth.Identity,
        id_: cache.OpId,
        write: WriteKind,
        plan: Callable[[cache.OperationEntry], Body | None],
        acted: Callable[[cache.OperationEntry], Callable[[cache.OperationEntry | None], bool]],
    ) -> None:
        """Write ``plan``'s patch on the version it was decided on, then wait until the
        controller has ``acted`` on the written version (a predicate of the entry)."""
        entry = self.operations.get_id(who.tenant, id_)
        fresh = entry is None
        if entry is None:
            entry = await self._fetch_id(who=who, id_=id_)
        for _ in range(self.settings.write_attempts):
            try:
                patch: Body | None = plan(entry)
            except errors.IllegalTransition:
                if fresh:
                    raise
                # This process's watch may lag behind the API server (the controller acted
                # on another worker's write a moment ago): refuse only what the current
                # object refuses.
                entry, fresh = await self._fetch(entry, id_=id_), True
                continue
            if patch is None:
                written = entry
                break
            patch["metadata"] = {"resourceVersion": entry.resource_version}
            try:
                updated = await self._kube.patch(
                    kube.OPERATIONS, name=entry.name, namespace=entry.namespace, body=patch
                )
            except errors.Conflict:
                entry, fresh = await self._fetch(entry, id_=id_), True
                continue
            except errors.NotFound:
                raise errors.NotFound(f"operation {id_} not found") from None
            written = cache.OperationEntry.from_object(updated)
            break
        else:
            raise errors.Conflict(f"operation {id_} keeps changing; try again")
        await self._until_visible(
            write=write,
            subject=f"{written.namespace}/{written.name}",
            waits=[
                functools.partial(
                    self.operations.wait,
                    written.namespace,
                    written.name,
                    version=kube.resource_version_of({"metadata": written.metadata}),
                    holds=acted(written),
                )
            ],
        )

    async def _fetch(self, entry: cache.OperationEntry, *, id_: cache.OpId) -> cache.OperationEntry:
        """The operation as the API server has it now."""
        try:
            fresh = await self._kube.get(
                kube.OPERATIONS, name=entry.name, namespace=entry.namespace
            )
        except errors.NotFound:
            raise errors.NotFound(f"operation {id_} not found") from None
        return cache.OperationEntry.from_object(fresh)

    async def _fetch_id(self, *, who: auth.Identity, id_: cache.OpId) -> cache.OperationEntry:
        """The operation with ``id_`` from the API server, for a write this process's cache
        cannot find: its watch may not have brought an operation that another worker or
        replica created a moment ago, and "not found" would be wrong. One LIST by the id
        label, in the caller's namespace only."""
        listed = await self._kube.list(
            kube.OPERATIONS, namespace=who.tenant, label_selector=f"{cache.ID_LABEL}={id_}"
        )
        found = [e for e in map(cache.OperationEntry.from_object, listed.items) if e.id == id_]
        if not found:
            raise errors.NotFound(f"operation {id_} not found")
        # As in the cache: the first object with an id keeps it, a labelled copy does not.
        return min(found, key=lambda e: (e.date_created, e.name))

    async def _until_visible(
        self, *, write: WriteKind, subject: str, waits: Sequence[Shown]
    ) -> None:
        """Return once every wait has ended, or once the bound has passed: the write stands
        either way, and a failure answer would make the client repeat it."""
        bound = self.settings.write_visible_timeout_seconds
        try:
            async with asyncio.timeout(bound):
                for wait in waits:
                    await wait()
        except TimeoutError:
            log.warning(
                "%s of %s made but not visible after %.1f s (the watch or the controller is"
                " behind); answered as done",
                write,
                subject,
                bound,
            )
            self._on_write_not_visible(write)

    def _shown_operation(self, obj: Body) -> Shown:
        """Wait for the watch to bring this version of an Operation (or a newer one)."""
        meta = obj["metadata"]
        return functools.partial(
            self.operations.wait,
            meta["namespace"],
            meta["name"],
            version=kube.resource_version_of(obj),
            holds=_anything,
        )

    def _legacy_spec(self, *, type_: str, params: Any, object_: Any) -> dict[str, Any]:
        """An Operation's spec as a legacy call asks for it; the executor comes from the
        policy, never from the caller."""
        return {
            "type": type_,
            "params": records.storable(params, where="params"),
            "object": records.storable(object_, where="object"),
            "executor": self.settings.executor_for(type_),
        }

    def _check_size(self, spec: Mapping[str, Any], *, where: str) -> None:
        size = len(json.dumps(spec, separators=(",", ":"), default=str))
        if size > self.settings.max_spec_bytes:
            raise errors.InvalidArgument(
                f"{where}: the spec is {size} bytes as JSON; at most"
                f" {self.settings.max_spec_bytes} are stored"
            )

    # --- BDOM: scheduled operations and task deletes -------------------------------

    async def schedule(
        self,
        *,
        who: auth.Identity,
        type_: str,
        params: Mapping[str, Any],
        object_: Mapping[str, Any] | None,
        exec_at: datetime.datetime,
        labels: Mapping[str, str],
    ) -> cache.OpId:
        """Create a one-shot ScheduledTask named ``stask-<id>`` that creates the Operation
        (with the type's configured executor) at ``exec_at``. The id is allocated and
        sealed here, as for :meth:`create`, so the caller is answered with it at once and
        the controller keeps it."""
        self._budget.charge(tenant=who.tenant)
        try:
            spec = models.ScheduledTaskSpec.model_validate(
                {
                    "execAt": exec_at,
                    "template": {
                        "spec": self._legacy_spec(type_=type_, params=params, object_=object_)
                    },
                }
            )
        except pydantic.ValidationError as exc:
            raise errors.InvalidArgument(records.validation_message(exc)) from None
        self._check_size(spec.to_k8s(), where="scheduled task")
        id_ = cache.OpId(await self._ids.allocate())
        name = f"stask-{id_}"
        stamp = await self._seal.stamp(id_, namespace=who.tenant, name=name)
        body: Body = {
            "apiVersion": API_VERSION,
            "kind": "ScheduledTask",
            "metadata": {
                "name": name,
                "namespace": who.tenant,
                "labels": {
                    **names.labels(dict(labels)),
                    **stamp.labels,
                    "app.kubernetes.io/created-by": "opkeeper-gateway",
                },
                "annotations": {**stamp.annotations, cache.CREATED_BY_USER_ANNOTATION: who.user_id},
            },
            "spec": spec.to_k8s(),
        }
        created = await self._kube.create(kube.SCHEDULED_TASKS, body, namespace=who.tenant)
        meta = created["metadata"]
        await self._until_visible(
            write="create",
            subject=f"{who.tenant}/{name}",
            waits=[
                functools.partial(
                    self.tasks.wait,
                    meta["namespace"],
                    meta["name"],
                    version=kube.resource_version_of(created),
                    holds=_anything,
                )
            ],
        )
        return id_

    async def delete_tasks(self, *, who: auth.Identity, ids_: Sequence[cache.OpId]) -> None:
        """Delete the ScheduledTasks and finished Operations with these ids, all or
        nothing: every id must name one of the caller's tasks or finished operations
        (else NotFound or IllegalTransition naming it, and nothing is deleted); the
        deletes then go through :meth:`apply` (dry run first, undo on a late failure,
        answered once the next read no longer shows them). A repeated id counts once.

        An Operation that has not finished is refused: deleting it would abandon work
        its executor is doing (cancel it first); a finished one is only a record."""
        batch: list[Body] = []
        for id_ in dict.fromkeys(ids_):
            task = self.tasks.get_id(who.tenant, id_)
            if task is not None:
                batch.append(
                    {"__type__": "scheduledtask", "__action__": "delete", "name": task.name}
                )
                continue
            entry = self.operations.get_id(who.tenant, id_)
            if entry is None:
                # Not in this process's watch (yet): ask the API server, by the id label.
                listed = await self._kube.list(
                    kube.SCHEDULED_TASKS,
                    namespace=who.tenant,
                    label_selector=f"{cache.ID_LABEL}={id_}",
                )
                fresh = [cache.TaskEntry.from_object(obj) for obj in listed.items]
                if any(t.id == id_ for t in fresh):
                    name = min(t.name for t in fresh if t.id == id_)
                    batch.append(
                        {"__type__": "scheduledtask", "__action__": "delete", "name": name}
                    )
                    continue
                try:
                    entry = await self._fetch_id(who=who, id_=id_)
                except errors.NotFound:
                    raise errors.NotFound(f"task {id_} not found") from None
            if not states.is_terminal(entry.state):
                # The watch may lag behind a finish: refuse only what the API server refuses.
                entry = await self._fetch(entry, id_=id_)
            if not states.is_terminal(entry.state):
                raise errors.IllegalTransition(
                    f"task {id_} is an operation that has not finished ({entry.state.value});"
                    " cancel it first"
                )
            batch.append({"__type__": "operation", "__action__": "delete", "name": entry.name})
        await self.apply(who=who, batch=batch)

    # --- gocept apply ------------------------------------------------------------

    async def apply(self, *, who: auth.Identity, batch: Sequence[Any]) -> list[records.Record]:
        """All-or-nothing: validate every record (locally, then by server-side dry run),
        write, and undo the earlier writes if a later one still fails."""
        if len(batch) > self.settings.apply_max_records:
            raise errors.InvalidArgument(
                f"apply takes at most {self.settings.apply_max_records} records per call,"
                f" got {len(batch)}"
            )
        self._budget.charge(tenant=who.tenant, cost=max(1, len(batch)))
        parsed = [records.parse(i, record) for i, record in enumerate(batch)]
        seen: set[tuple[str, str]] = set()
        for p in parsed:
            if (p.type, p.name) in seen:
                raise errors.InvalidArgument(
                    f"record {p.index + 1}: {p.type} {p.name} appears twice in the batch"
                )
            seen.add((p.type, p.name))
        steps = [s for p in parsed if (s := await self._prepare(who=who, parsed=p)) is not None]
        # Deletes last: they are the one write an undo cannot restore exactly.
        ordered = [s for s in steps if s.verb != "delete"] + [
            s for s in steps if s.verb == "delete"
        ]
        done: list[_Step] = []
        try:
            for step in ordered:
                written = await self._write_fresh(who=who, step=step)
                if written is not None:
                    done.append(written)
        except Exception:
            undone = await self._undo(who=who, done=done)
            # The fault, too, is answered once the next read shows the batch undone.
            await self._until_visible(write="apply", subject=f"undo in {who.tenant}", waits=undone)
            raise
        await self._until_visible(
            write="apply",
            subject=f"{len(done)} records in {who.tenant}",
            waits=[self._shown_step(who=who, step=step) for step in done],
        )
        results: list[records.Record] = []
        by_record = {step.parsed.index: step for step in done}
        for p in parsed:
            if p.action == "delete":
                continue
            planned = by_record.get(p.index)
            obj = planned.after if planned is not None else None
            if obj is None:
                obj = await self._kube.get(_resource(p.type), name=p.name, namespace=who.tenant)
            results.append(_record_of(p.type, obj))
        return results

    async def _prepare(self, *, who: auth.Identity, parsed: records.Parsed) -> _Step | None:
        """Plan a record's write and validate it by dry run; None when nothing changes."""
        for _ in range(self.settings.write_attempts - 1):
            step = await self._plan(who=who, parsed=parsed)
            if step is None:
                return None
            try:
                await self._validate(who=who, step=step)
            except errors.Conflict:
                # The object changed between its read and its dry run (the controller
                # writes status after every spec change, so an apply right after another
                # write meets this): plan again on a fresh read.
                continue
            return step
        step = await self._plan(who=who, parsed=parsed)
        if step is not None:
            await self._validate(who=who, step=step)
        return step

    async def _write_fresh(self, *, who: auth.Identity, step: _Step) -> _Step | None:
        """Write a prepared step; if its object changed since it was read (409), prepare
        the record again on a fresh read and write that. Returns the step written, None
        when the fresh read needs no write. Errors name the record."""
        where = f"record {step.parsed.index + 1} ({step.parsed.type} {step.parsed.name})"
        for _ in range(self.settings.write_attempts - 1):
            try:
                await self._write(who=who, step=step)
                return step
            except errors.Conflict:
                again = await self._prepare(who=who, parsed=step.parsed)
                if again is None:
                    return None
                step = again
            except Exception as exc:
                raise _rewrap(exc, where) from exc
        try:
            await self._write(who=who, step=step)
        except Exception as exc:
            raise _rewrap(exc, where) from exc
        return step

    async def _plan(self, *, who: auth.Identity, parsed: records.Parsed) -> _Step | None:
        resource = _resource(parsed.type)
        try:
            current: Body | None = await self._kube.get(
                resource, name=parsed.name, namespace=who.tenant
            )
        except errors.NotFound:
            current = None
        where = f"record {parsed.index + 1} ({parsed.type} {parsed.name})"
        if parsed.action == "delete":
            if current is None:
                return None  # deleting what does not exist is not an error
            return _Step(parsed=parsed, verb="delete", resource=resource, before=current, body={})
        executor_for = self.settings.executor_for
        if current is None:
            spec = records.build_spec(parsed=parsed, current=None, executor_for=executor_for)
            self._check_size(spec, where=where)
            return _Step(
                parsed=parsed,
                verb="create",
                resource=resource,
                before=None,
                body=await self._new_body(who=who, parsed=parsed, spec=spec),
            )
        records.check_readonly(parsed=parsed, current_record=_record_of(parsed.type, current))
        spec = records.build_spec(
            parsed=parsed, current=current.get("spec") or {}, executor_for=executor_for
        )
        self._check_size(spec, where=where)
        if parsed.type == "operation":
            self._check_operation_change(where=where, current=current, spec=spec)
        patch = _merge_patch(current.get("spec") or {}, spec)
        if not patch:
            return None
        return _Step(
            parsed=parsed,
            verb="patch",
            resource=resource,
            before=current,
            body={
                "metadata": {"resourceVersion": current["metadata"]["resourceVersion"]},
                "spec": patch,
            },
        )

    @staticmethod
    def _check_operation_change(*, where: str, current: Body, spec: Body) -> None:
        """Cancels and relaunches through apply follow the same state rules as Gandi's."""
        old_spec = current.get("spec") or {}
        state = cache.OperationEntry.from_object(current).state
        try:
            if spec.get("cancel") and not old_spec.get("cancel"):
                states.transition(state, states.Event.CANCEL)
            if int(spec.get("relaunch") or 0) > int(old_spec.get("relaunch") or 0):
                states.transition(state, states.Event.RELAUNCH)
        except errors.IllegalTransition as exc:
            raise errors.IllegalTransition(f"{where}: {exc}") from None

    async def _new_body(self, *, who: auth.Identity, parsed: records.Parsed, spec: Body) -> Body:
        labels = {"app.kubernetes.io/created-by": "opkeeper-gateway"}
        annotations = {cache.CREATED_BY_USER_ANNOTATION: who.user_id}
        kind = "ScheduledTask"
        if parsed.type == "operation":
            kind = "Operation"
            value = await self._ids.allocate()
            stamp = await self._seal.stamp(value, namespace=who.tenant, name=parsed.name)
            labels.update(stamp.labels)
            annotations.update(stamp.annotations)
        return {
            "apiVersion": API_VERSION,
            "kind": kind,
            "metadata": {
                "name": parsed.name,
                "namespace": who.tenant,
                "labels": labels,
                "annotations": annotations,
            },
            "spec": spec,
        }

    async def _validate(self, *, who: auth.Identity, step: _Step) -> None:
        where = f"record {step.parsed.index + 1} ({step.parsed.type} {step.parsed.name})"
        try:
            if step.verb == "create":
                await self._kube.create(
                    step.resource, step.body, namespace=who.tenant, dry_run=True
                )
            elif step.verb == "patch":
                await self._dry_run.patch(
                    step.resource, name=step.parsed.name, namespace=who.tenant, body=step.body
                )
            else:
                assert step.before is not None
                await self._dry_run.delete(
                    step.resource,
                    name=step.parsed.name,
                    namespace=who.tenant,
                    uid=step.before["metadata"]["uid"],
                )
        except errors.OpkeeperError as exc:
            raise _rewrap(exc, where) from exc

    async def _write(self, *, who: auth.Identity, step: _Step) -> None:
        if step.verb == "create":
            step.after = await self._kube.create(step.resource, step.body, namespace=who.tenant)
        elif step.verb == "patch":
            step.after = await self._kube.patch(
                step.resource, name=step.parsed.name, namespace=who.tenant, body=step.body
            )
        else:
            assert step.before is not None
            await self._kube.delete(
                step.resource,
                name=step.parsed.name,
                namespace=who.tenant,
                uid=step.before["metadata"]["uid"],
            )

    def _shown_step(self, *, who: auth.Identity, step: _Step) -> Shown:
        """Wait until the cache shows an apply step: the version it wrote (or a newer one),
        the object gone after a delete, and a cancel or a relaunch answered by the
        controller, exactly as for Gandi's operation_cancel and operation_relaunch."""
        if step.verb == "delete":
            assert step.before is not None
            return self._shown_in(
                who=who,
                step=step,
                version=kube.resource_version_of(step.before),
                holds=_gone(uid=step.before["metadata"]["uid"]),
            )
        assert step.after is not None
        version = kube.resource_version_of(step.after)
        if step.parsed.type == "operation" and step.before is not None:
            old, new = step.before.get("spec") or {}, step.after.get("spec") or {}
            uid = step.after["metadata"]["uid"]
            acted: Callable[[cache.OperationEntry | None], bool] | None = None
            if new.get("cancel") and not old.get("cancel"):
                acted = _finished(uid=uid)
            elif int(new.get("relaunch") or 0) > int(old.get("relaunch") or 0):
                acted = _relaunch_answered(uid=uid, relaunch=int(new["relaunch"]))
            if acted is not None:
                return functools.partial(
                    self.operations.wait, who.tenant, step.parsed.name, version=version, holds=acted
                )
        return self._shown_in(who=who, step=step, version=version, holds=_anything)

    def _shown_in(
        self,
        *,
        who: auth.Identity,
        step: _Step,
        version: int,
        holds: Callable[[cache.OperationEntry | cache.TaskEntry | None], bool],
    ) -> Shown:
        table = self.operations if step.parsed.type == "operation" else self.tasks
        return functools.partial(
            table.wait, who.tenant, step.parsed.name, version=version, holds=holds
        )

    async def _undo(self, *, who: auth.Identity, done: list[_Step]) -> list[Shown]:
        """Reverse completed writes, newest first; failures are logged, not raised.
        Returns the waits for the undo to show in the cache."""
        shown: list[Shown] = []
        for step in reversed(done):
            try:
                if step.verb == "create" and step.after is not None:
                    await self._kube.delete(
                        step.resource,
                        name=step.parsed.name,
                        namespace=who.tenant,
                        uid=step.after["metadata"]["uid"],
                    )
                    shown.append(
                        self._shown_in(
                            who=who,
                            step=step,
                            version=kube.resource_version_of(step.after),
                            holds=_gone(uid=step.after["metadata"]["uid"]),
                        )
                    )
                elif step.verb == "patch" and step.before is not None and step.after is not None:
                    reverse = _merge_patch(
                        step.after.get("spec") or {}, step.before.get("spec") or {}
                    )
                    restored = await self._kube.patch(
                        step.resource,
                        name=step.parsed.name,
                        namespace=who.tenant,
                        body={"spec": reverse},
                    )
                    shown.append(
                        self._shown_in(
                            who=who,
                            step=step,
                            version=kube.resource_version_of(restored),
                            holds=_anything,
                        )
                    )
                elif step.verb == "delete" and step.before is not None:
                    meta = step.before["metadata"]
                    recreated = await self._kube.create(
                        step.resource,
                        {
                            "apiVersion": API_VERSION,
                            "kind": step.before.get("kind"),
                            "metadata": {
                                "name": meta["name"],
                                "labels": meta.get("labels") or {},
                                "annotations": meta.get("annotations") or {},
                            },
                            "spec": step.before.get("spec") or {},
                        },
                        namespace=who.tenant,
                    )
                    shown.append(
                        self._shown_in(
                            who=who,
                            step=step,
                            version=kube.resource_version_of(recreated),
                            holds=_anything,
                        )
                    )
            except Exception:
                log.exception(
                    "undo of %s %s/%s failed; the batch may be half applied",
                    step.verb,
                    who.tenant,
                    step.parsed.name,
                )
        return shown


def _anything(entry: cache.OperationEntry | cache.TaskEntry | None) -> bool:
    """Any entry, or none: the version reached is all a plain write waits for (an object
    deleted since then is gone for the next read too, which is the truth)."""
    return True


def _gone(*, uid: str) -> Callable[[cache.OperationEntry | cache.TaskEntry | None], bool]:
    """The deleted object (``uid``) is no longer in the cache."""

    def holds(entry: cache.OperationEntry | cache.TaskEntry | None) -> bool:
        return entry is None or entry.uid != uid

    return holds


def _relaunch_answered(*, uid: str, relaunch: int) -> Callable[[cache.OperationEntry | None], bool]:
    """The controller has seen ``spec.relaunch`` = ``relaunch`` (``status.observedRelaunch``):
    it started a new attempt, so the state is no longer the old finished one (or it
    refused visibly, with a condition). An operation deleted or replaced since is past it."""

    def holds(entry: cache.OperationEntry | None) -> bool:
        return (
            entry is None
            or entry.uid != uid
            or int(entry.status.get("observedRelaunch") or 0) >= relaunch
        )

    return holds


def _finished(*, uid: str) -> Callable[[cache.OperationEntry | None], bool]:
    """The cancelled operation has finished: Cancelled, or finished otherwise meanwhile (the
    controller then refuses the cancel with a condition). Gone or replaced counts too."""

    def holds(entry: cache.OperationEntry | None) -> bool:
        return entry is None or entry.uid != uid or states.is_terminal(entry.state)

    return holds


def _kept_annotations(annotations: Mapping[str, str]) -> dict[str, str]:
    """Only the annotations a legacy caller may set (:data:`.cache.KEPT_ANNOTATIONS`),
    each bounded: they live in etcd and in every watcher's cache."""
    out: dict[str, str] = {}
    for key, value in annotations.items():
        if key not in cache.KEPT_ANNOTATIONS:
            raise errors.InvalidArgument(f"annotation {names.shown(key)} cannot be set")
        if len(value.encode("utf-8")) > ANNOTATION_MAX_BYTES:
            raise errors.InvalidArgument(
                f"{key}: at most {ANNOTATION_MAX_BYTES} bytes (UTF-8) are stored"
            )
        out[key] = value
    return out


ANNOTATION_MAX_BYTES = 4096
"""Longest name label or description a legacy caller may store, in UTF-8 bytes."""


def _resource(type_: records.RecordType) -> kube.Resource:
    return kube.OPERATIONS if type_ == "operation" else kube.SCHEDULED_TASKS


def _record(entry: cache.OperationEntry | cache.TaskEntry) -> records.Record:
    if isinstance(entry, cache.OperationEntry):
        return records.operation_record(entry)
    return records.task_record(entry)


def _record_of(type_: records.RecordType, obj: Body) -> records.Record:
    if type_ == "operation":
        return records.operation_record(cache.OperationEntry.from_object(obj))
    return records.task_record(cache.TaskEntry.from_object(obj))


def _state_key(type_: str, word: str) -> states.State | states.TaskState | str:
    """A state filter value as the index keys it (unknown words simply match nothing)."""
    try:
        return states.State(word) if type_ == "operation" else states.TaskState(word)
    except ValueError:
        return word


def _merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> Body:
    """The JSON merge patch (RFC 7386) that turns ``old`` into ``new``."""
    patch: Body = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            inner = _merge_patch(before, value)
            if inner:
                patch[key] = inner
        elif key not in old or before != value:
            patch[key] = value
    return patch


def _rewrap(exc: BaseException, where: str) -> errors.OpkeeperError:
    """The same error class with the failing record named; unknown errors become Unavailable."""
    if isinstance(exc, errors.OpkeeperError):
        cls = type(exc)
        # Subclasses with their own constructors (codec errors) keep their base meaning.
        for base in cls.__mro__:
            if base.__module__ == errors.__name__ and issubclass(base, errors.OpkeeperError):
                return base(f"{where}: {exc}")
    return errors.Unavailable(f"{where}: {exc}")
