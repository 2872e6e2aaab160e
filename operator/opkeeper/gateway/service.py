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
moment ago. After a write, the returned object goes into the cache at once
(unless the watch already brought something newer), so a client that
creates and then immediately asks for details finds its operation.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

import pydantic

from opkeeper import API_VERSION, errors, ids, kube, models, names, states
from opkeeper.gateway import auth, cache, calllog, records

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
    ) -> None:
        self.operations = operations
        self.tasks = tasks
        self._kube = kube_client
        self._dry_run = dry_run
        self._ids = id_allocator
        self._seal = id_seal
        self.call_log = call_log
        self.settings = settings

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
    ) -> cache.OpId:
        """Create an Operation named ``op-<id>`` with the type's configured executor."""
        try:
            spec = models.OperationSpec.model_validate(
                {
                    "type": type_,
                    "params": records.storable(params, where="params"),
                    "object": records.storable(object_, where="object"),
                    "executor": self.settings.executor_for(type_),
                }
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
                    **stamp.annotations,
                    "opkeeper.dev/created-by-user": who.user_id,
                },
            },
            "spec": spec.to_k8s(),
        }
        created = await self._kube.create(kube.OPERATIONS, body, namespace=who.tenant)
        self._remember(self.operations, created, based_on=None)
        return id_

    async def relaunch(
        self, *, who: auth.Identity, id_: cache.OpId, params: Mapping[str, Any]
    ) -> None:
        """Merge ``params`` into the operation's params and bump ``spec.relaunch``."""

        def plan(entry: cache.OperationEntry) -> Body | None:
            states.transition(entry.state, states.Event.RELAUNCH)
            merged = {
                **(entry.spec.get("params") or {}),
                **records.storable(params, where="params"),
            }
            self._check_size({"params": merged}, where=f"operation {id_}")
            return {
                "spec": {"params": merged, "relaunch": int(entry.spec.get("relaunch") or 0) + 1}
            }

        await self._conditional_patch(who=who, id_=id_, plan=plan)

    async def cancel(self, *, who: auth.Identity, id_: cache.OpId) -> None:
        """Set ``spec.cancel``; refused (IllegalTransition) once the operation finished."""

        def plan(entry: cache.OperationEntry) -> Body | None:
            states.transition(entry.state, states.Event.CANCEL)
            return None if entry.spec.get("cancel") else {"spec": {"cancel": True}}

        await self._conditional_patch(who=who, id_=id_, plan=plan)

    async def _conditional_patch(
        self,
        *,
        who: auth.Identity,
        id_: cache.OpId,
        plan: Callable[[cache.OperationEntry], Body | None],
    ) -> None:
        entry = self.operation(who=who, id_=id_)
        for _ in range(self.settings.write_attempts):
            patch: Body | None = plan(entry)
            if patch is None:
                return
            patch["metadata"] = {"resourceVersion": entry.resource_version}
            try:
                updated = await self._kube.patch(
                    kube.OPERATIONS, name=entry.name, namespace=entry.namespace, body=patch
                )
            except errors.Conflict:
                fresh = await self._kube.get(
                    kube.OPERATIONS, name=entry.name, namespace=entry.namespace
                )
                entry = cache.OperationEntry.from_object(fresh)
                continue
            except errors.NotFound:
                raise errors.NotFound(f"operation {id_} not found") from None
            self._remember(self.operations, updated, based_on=entry.resource_version)
            return
        raise errors.Conflict(f"operation {id_} keeps changing; try again")

    def _check_size(self, spec: Mapping[str, Any], *, where: str) -> None:
        size = len(json.dumps(spec, separators=(",", ":"), default=str))
        if size > self.settings.max_spec_bytes:
            raise errors.InvalidArgument(
                f"{where}: the spec is {size} bytes as JSON; at most"
                f" {self.settings.max_spec_bytes} are stored"
            )

    @staticmethod
    def _remember(
        table: cache.OperationCache | cache.TaskCache, obj: Body, *, based_on: str | None
    ) -> None:
        """Put our write's result into the cache unless the watch is already past it."""
        meta = obj.get("metadata") or {}
        current = table.get(str(meta.get("namespace")), str(meta.get("name")))
        if (current is None and based_on is None) or (
            current is not None and current.resource_version == based_on
        ):
            table.apply(event="MODIFIED", obj=obj)

    # --- gocept apply ------------------------------------------------------------

    async def apply(self, *, who: auth.Identity, batch: Sequence[Any]) -> list[records.Record]:
        """All-or-nothing: validate every record (locally, then by server-side dry run),
        write, and undo the earlier writes if a later one still fails."""
        if len(batch) > self.settings.apply_max_records:
            raise errors.InvalidArgument(
                f"apply takes at most {self.settings.apply_max_records} records per call,"
                f" got {len(batch)}"
            )
        parsed = [records.parse(i, record) for i, record in enumerate(batch)]
        seen: set[tuple[str, str]] = set()
        for p in parsed:
            if (p.type, p.name) in seen:
                raise errors.InvalidArgument(
                    f"record {p.index + 1}: {p.type} {p.name} appears twice in the batch"
                )
            seen.add((p.type, p.name))
        steps = [s for p in parsed if (s := await self._plan(who=who, parsed=p)) is not None]
        for step in steps:
            await self._validate(who=who, step=step)
        # Deletes last: they are the one write an undo cannot restore exactly.
        ordered = [s for s in steps if s.verb != "delete"] + [
            s for s in steps if s.verb == "delete"
        ]
        done: list[_Step] = []
        try:
            for step in ordered:
                await self._write(who=who, step=step)
                done.append(step)
        except Exception as exc:
            await self._undo(who=who, done=done)
            failed = ordered[len(done)].parsed
            raise _rewrap(exc, f"record {failed.index + 1} ({failed.type} {failed.name})") from exc
        results: list[records.Record] = []
        by_record = {step.parsed.index: step for step in steps}
        for p in parsed:
            if p.action == "delete":
                continue
            planned = by_record.get(p.index)
            obj = planned.after if planned is not None else None
            if obj is None:
                obj = await self._kube.get(_resource(p.type), name=p.name, namespace=who.tenant)
            results.append(_record_of(p.type, obj))
        return results

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
        annotations = {"opkeeper.dev/created-by-user": who.user_id}
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
        table = self.operations if step.parsed.type == "operation" else self.tasks
        if step.verb == "create":
            step.after = await self._kube.create(step.resource, step.body, namespace=who.tenant)
            self._remember(table, step.after, based_on=None)
        elif step.verb == "patch":
            step.after = await self._kube.patch(
                step.resource, name=step.parsed.name, namespace=who.tenant, body=step.body
            )
            assert step.before is not None
            self._remember(table, step.after, based_on=step.before["metadata"]["resourceVersion"])
        else:
            assert step.before is not None
            await self._kube.delete(
                step.resource,
                name=step.parsed.name,
                namespace=who.tenant,
                uid=step.before["metadata"]["uid"],
            )

    async def _undo(self, *, who: auth.Identity, done: list[_Step]) -> None:
        """Reverse completed writes, newest first; failures are logged, not raised."""
        for step in reversed(done):
            try:
                if step.verb == "create" and step.after is not None:
                    await self._kube.delete(
                        step.resource,
                        name=step.parsed.name,
                        namespace=who.tenant,
                        uid=step.after["metadata"]["uid"],
                    )
                elif step.verb == "patch" and step.before is not None and step.after is not None:
                    reverse = _merge_patch(
                        step.after.get("spec") or {}, step.before.get("spec") or {}
                    )
                    await self._kube.patch(
                        step.resource,
                        name=step.parsed.name,
                        namespace=who.tenant,
                        body={"spec": reverse},
                    )
                elif step.verb == "delete" and step.before is not None:
                    meta = step.before["metadata"]
                    await self._kube.create(
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
            except Exception:
                log.exception(
                    "undo of %s %s/%s failed; the batch may be half applied",
                    step.verb,
                    who.tenant,
                    step.parsed.name,
                )


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
