"""The gateway's read side: Operations and ScheduledTasks kept in memory from a watch.

Legacy clients poll (``operation_list`` every few seconds is normal), and a
LIST per call would put the API server's read path under every script. So
the gateway lists once, then follows the watch, and answers every read from
here, through indexes sized for the filters the dialects offer:

* by id (cluster-wide) and by namespace/name;
* per namespace, exact-match sets for state, type and object;
* per namespace, id-ordered lists and id sets for state and type, the ids in
  order (``operation_list`` returns the newest 300) and ``(date_updated, id)``
  in order (the updated_after/before range).

:meth:`OperationCache.list_ids` picks its plan from the index sizes: it walks
an id-ordered index newest-first and checks each entry when the filters match
many operations (it stops after ``limit`` hits), and gathers the smallest
candidate set when they match few, so neither a broad nor a narrow filter
costs a scan of the namespace.

Entries keep ``spec`` and ``status`` as the API server sent them (minus
managedFields and annotations, which can be large and no read needs), so the
facades can build full records without another request. The cache is fed by
:func:`.kubeio.feed`; it has no I/O of its own, which keeps it testable and
benchmarkable without a cluster.

Only the watch changes the cache, and a writer waits for it
(:meth:`_Table.wait`): the service answers a write once the watch has
brought the resourceVersion the write produced and, for a relaunch or a
cancel, the controller's answer to it. Every event wakes the writers waiting
on the kind; each checks its own condition, so nothing polls.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import datetime
import logging
import math
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import Any, Generic, NewType, Protocol, TypeVar

from opkeeper import GROUP, kube, states

log = logging.getLogger(__name__)

OpId = NewType("OpId", int)
"""The cluster-unique number of an Operation or ScheduledTask (``status.id``)."""

ID_LABEL = f"{GROUP}/id"
"""The label that carries the id before the status does (set at create time)."""

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def parse_time(value: Any) -> datetime.datetime | None:
    """An RFC 3339 timestamp from the API server as an aware datetime (None if absent/bad)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def _id_of(obj: Mapping[str, Any]) -> OpId | None:
    raw = (obj.get("status") or {}).get("id")
    if raw is None:
        raw = ((obj.get("metadata") or {}).get("labels") or {}).get(ID_LABEL)
    try:
        number = int(raw) if raw is not None else None
    except (TypeError, ValueError):
        return None
    return OpId(number) if number is not None and number > 0 else None


NAME_LABEL_ANNOTATION = f"{GROUP}/name-label"
"""A short human-readable name of an Operation (XenAPI's task ``name_label``), stored as an
annotation so that every dialect and ``kubectl`` see it without a CRD change."""
NAME_DESCRIPTION_ANNOTATION = f"{GROUP}/name-description"
"""A longer human-readable note on an Operation (XenAPI's task ``name_description``)."""
CREATED_BY_USER_ANNOTATION = "opkeeper.dev/created-by-user"
"""The user whose call created the Operation (CloudStack's ``userid``)."""
KEPT_ANNOTATIONS = frozenset(
    {NAME_LABEL_ANNOTATION, NAME_DESCRIPTION_ANNOTATION, CREATED_BY_USER_ANNOTATION}
)
"""The annotations entries keep (all others are dropped: they can be large, no read needs
them)."""


def _strip(meta: Mapping[str, Any]) -> dict[str, Any]:
    stripped = {k: v for k, v in meta.items() if k not in ("managedFields", "annotations")}
    annotations = meta.get("annotations") or {}
    kept = {k: v for k, v in annotations.items() if k in KEPT_ANNOTATIONS}
    if kept:
        stripped["annotations"] = kept
    return stripped


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class OperationEntry:
    """One Operation as the gateway sees it."""

    namespace: str
    name: str
    uid: str
    resource_version: str
    id: OpId | None
    type: str
    state: states.State
    """``status.state``, or Pending while the controller has not written one yet."""
    object_kind: str | None
    object_name: str | None
    date_created: datetime.datetime
    date_updated: datetime.datetime
    """``status.updatedAt``, else the creation time: what Gandi's date filters compare."""
    updated_ts: float
    """``date_updated`` as a POSIX timestamp, computed once for the date index."""
    metadata: Mapping[str, Any]
    spec: Mapping[str, Any]
    status: Mapping[str, Any]
    derived: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    """Answers readers computed from this version, kept for the next reader (the encoded
    ``operation_details`` struct). A change of the object replaces the entry rather than
    changing it, so nothing kept here can outlive the version it was computed from."""

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> OperationEntry:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        created = (
            parse_time(status.get("createdAt")) or parse_time(meta.get("creationTimestamp"))
        ) or _EPOCH
        updated = parse_time(status.get("updatedAt")) or created
        try:
            state = states.State(status.get("state") or states.State.PENDING)
        except ValueError:
            state = states.State.PENDING
        ref = spec.get("object") or {}
        return cls(
            namespace=str(meta.get("namespace", "")),
            name=str(meta.get("name", "")),
            uid=str(meta.get("uid", "")),
            resource_version=str(meta.get("resourceVersion", "")),
            id=_id_of(obj),
            type=str(spec.get("type", "")),
            state=state,
            object_kind=ref.get("kind"),
            object_name=ref.get("name"),
            date_created=created,
            date_updated=updated,
            updated_ts=updated.timestamp(),
            metadata=_strip(meta),
            spec=spec,
            status=status,
        )

    def index_values(self) -> dict[str, Hashable]:
        return {
            "state": self.state,
            "type": self.type,
            "object": (self.object_kind, self.object_name),
        }


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TaskEntry:
    """One ScheduledTask as the gateway sees it."""

    namespace: str
    name: str
    uid: str
    resource_version: str
    id: OpId | None
    state: states.TaskState
    """``status.state``, or Scheduled while the controller has not written one yet."""
    type: str
    """The type of the Operations the task creates."""
    date_created: datetime.datetime
    date_updated: datetime.datetime
    updated_ts: float
    metadata: Mapping[str, Any]
    spec: Mapping[str, Any]
    status: Mapping[str, Any]

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> TaskEntry:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        created = parse_time(meta.get("creationTimestamp")) or _EPOCH
        try:
            state = states.TaskState(status.get("state") or states.TaskState.SCHEDULED)
        except ValueError:
            state = states.TaskState.SCHEDULED
        template_spec = (spec.get("template") or {}).get("spec") or {}
        updated = parse_time(status.get("lastScheduleTime")) or created
        return cls(
            namespace=str(meta.get("namespace", "")),
            name=str(meta.get("name", "")),
            uid=str(meta.get("uid", "")),
            resource_version=str(meta.get("resourceVersion", "")),
            id=_id_of(obj),
            state=state,
            type=str(template_spec.get("type", "")),
            date_created=created,
            date_updated=updated,
            updated_ts=updated.timestamp(),
            metadata=_strip(meta),
            spec=spec,
            status=status,
        )

    def index_values(self) -> dict[str, Hashable]:
        return {"state": self.state, "type": self.type}


E = TypeVar("E", OperationEntry, TaskEntry)
E_contra = TypeVar("E_contra", OperationEntry, TaskEntry, contravariant=True)


class Observer(Protocol[E_contra]):
    """Told of every change the watch brings (the XenAPI event feed keeps its own
    per-tenant change log from this)."""

    def changed(self, *, old: E_contra | None, new: E_contra | None, version: int) -> None:
        """One object changed: added (``old`` None), modified, or deleted (``new`` None);
        ``version`` is the resourceVersion of the change."""

    def reloaded(self) -> None:
        """Everything was replaced by a fresh list: changes in between are unknown."""


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class _Waiter(Generic[E]):
    """A writer waiting until the watch shows its write (see :meth:`_Table.wait`)."""

    key: tuple[str, str]
    version: int
    holds: Callable[[E | None], bool]
    done: asyncio.Future[None]


class _Table(Generic[E]):
    """Entries of one kind plus their indexes; every change goes through apply/reset."""

    ORDERED: tuple[str, ...] = ()
    """Fields whose per-value index is also kept as an id-ordered list, for "the newest
    N with field = value" in O(N) instead of a scan."""

    def __init__(self, build: Callable[[Mapping[str, Any]], E]) -> None:
        self._build: Callable[[Mapping[str, Any]], E] = build
        self.by_key: dict[tuple[str, str], E] = {}
        self.by_id: dict[tuple[str, OpId], E] = {}
        """Keyed by namespace too: ids are cluster-unique when the allocator hands them
        out, but anyone who can create an object can also label it with any id, and such
        a copy must never shadow another namespace's operation."""
        self.eq: dict[tuple[str, str, Hashable], set[str]] = {}
        self.ordered: dict[tuple[str, str, Hashable], list[OpId]] = {}
        self.id_sets: dict[tuple[str, str, Hashable], set[OpId]] = {}
        """The same ids as :attr:`ordered`, as sets: membership tests and intersections
        at C speed."""
        self.ns_names: dict[str, set[str]] = {}
        self.ns_ids: dict[str, list[OpId]] = {}
        self.ns_times: dict[str, list[tuple[float, OpId]]] = {}
        self.ns_time_ids: dict[str, list[OpId]] = {}
        """The ids of :attr:`ns_times` in the same order: a date window's ids are then one
        C-level slice instead of a comprehension over tuples."""
        self.watched_version = 0
        """The highest resourceVersion the watch has brought. One watch delivers a kind's
        changes in resourceVersion order, so every change up to this version is in."""
        self._waiters: list[_Waiter[E]] = []
        self.observers: list[Observer[E]] = []
        """Told of every change after it is applied (see :class:`Observer`)."""

    def __len__(self) -> int:
        return len(self.by_key)

    def reset(self, objects: Iterable[Mapping[str, Any]]) -> None:
        """Replace everything by a fresh LIST (bulk: sorts once instead of per insert)."""
        self.by_key, self.by_id, self.eq, self.ordered, self.id_sets = {}, {}, {}, {}, {}
        self.ns_names, self.ns_ids, self.ns_times, self.ns_time_ids = {}, {}, {}, {}
        # The list is at least as new as anything watched before it; its newest object is
        # a lower bound of its resourceVersion (a SYNC does not carry the list's own).
        newest = self.watched_version
        for obj in objects:
            entry = self._build(obj)
            self.by_key[(entry.namespace, entry.name)] = entry
            self._index(entry, bulk=True)
            newest = max(newest, kube.resource_version_of(obj))
        for sorted_list in (*self.ns_ids.values(), *self.ordered.values()):
            sorted_list.sort()
        for ns, times in self.ns_times.items():
            times.sort()
            self.ns_time_ids[ns] = [id_ for _, id_ in times]
        self.watched_version = newest
        for observer in self.observers:
            observer.reloaded()
        self._wake()

    def apply(self, *, event: str, obj: Mapping[str, Any]) -> None:
        """One watch event: ADDED, MODIFIED or DELETED."""
        meta = obj.get("metadata") or {}
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        old = self.by_key.pop(key, None)
        if old is not None:
            self._unindex(old)
        entry = None
        if event != "DELETED":
            entry = self._build(obj)
            self.by_key[key] = entry
            self._index(entry, bulk=False)
        version = kube.resource_version_of(obj)
        self.watched_version = max(self.watched_version, version)
        for observer in self.observers:
            observer.changed(old=old, new=entry, version=version)
        if self._waiters:
            self._wake()

    async def wait(
        self, namespace: str, name: str, *, version: int, holds: Callable[[E | None], bool]
    ) -> None:
        """Return once the watch has brought ``version`` of this kind (or a newer one) and
        ``holds`` is true of the entry of ``namespace``/``name`` (None: no such object).

        Waits as long as it takes: the caller bounds it (``asyncio.timeout``)."""
        key = (namespace, name)
        if self.watched_version >= version and holds(self.by_key.get(key)):
            return
        waiter: _Waiter[E] = _Waiter(
            key=key,
            version=version,
            holds=holds,
            done=asyncio.get_running_loop().create_future(),
        )
        self._waiters.append(waiter)
        try:
            await waiter.done
        finally:
            self._waiters.remove(waiter)

    def _wake(self) -> None:
        # As many waiters as writes in flight on this process: a short list.
        for waiter in self._waiters:
            if (
                not waiter.done.done()
                and self.watched_version >= waiter.version
                and waiter.holds(self.by_key.get(waiter.key))
            ):
                waiter.done.set_result(None)

    def _index(self, entry: E, *, bulk: bool) -> None:
        ns = entry.namespace
        # No per-name index: names are unique per namespace, by_key answers them.
        self.ns_names.setdefault(ns, set()).add(entry.name)
        values = entry.index_values()
        for field, value in values.items():
            self.eq.setdefault((ns, field, value), set()).add(entry.name)
        if entry.id is None:
            return
        holder = self.by_id.get((ns, entry.id))
        if holder is not None and holder.name != entry.name:
            # A second object claims this id in the same namespace: the first keeps it,
            # the copy is served by name only (gocept) until the first is gone.
            log.warning("%s/%s claims id %s of %s", ns, entry.name, entry.id, holder.name)
            return
        self.by_id[(ns, entry.id)] = entry
        add = list.append if bulk else bisect.insort
        add(self.ns_ids.setdefault(ns, []), entry.id)
        stamp = (entry.updated_ts, entry.id)
        if not bulk:  # bulk loads build ns_time_ids after sorting
            times = self.ns_times.setdefault(ns, [])
            at = bisect.bisect_left(times, stamp)
            times.insert(at, stamp)
            self.ns_time_ids.setdefault(ns, []).insert(at, entry.id)
        else:
            self.ns_times.setdefault(ns, []).append(stamp)
        for field in self.ORDERED:
            add(self.ordered.setdefault((ns, field, values[field]), []), entry.id)
            self.id_sets.setdefault((ns, field, values[field]), set()).add(entry.id)

    def _unindex(self, entry: E) -> None:
        ns = entry.namespace
        self.ns_names[ns].discard(entry.name)
        values = entry.index_values()
        for field, value in values.items():
            self._discard((ns, field, value), entry.name)
        if entry.id is None or self.by_id.get((ns, entry.id)) is not entry:
            return
        del self.by_id[(ns, entry.id)]
        _remove_sorted(self.ns_ids[ns], entry.id)
        times = self.ns_times[ns]
        at = bisect.bisect_left(times, (entry.updated_ts, entry.id))
        if at < len(times) and times[at] == (entry.updated_ts, entry.id):
            del times[at]
            del self.ns_time_ids[ns][at]
        for field in self.ORDERED:
            _remove_sorted(self.ordered[(ns, field, values[field])], entry.id)
            self.id_sets[(ns, field, values[field])].discard(entry.id)

    def _discard(self, key: tuple[str, str, Hashable], name: str) -> None:
        names = self.eq.get(key)
        if names is not None:
            names.discard(name)
            if not names:
                del self.eq[key]

    def names(self, namespace: str, field: str, value: Hashable) -> set[str]:
        """Names in ``namespace`` whose ``field`` equals ``value`` (an index hit, no scan)."""
        if field == "name":
            return (
                {value} if isinstance(value, str) and (namespace, value) in self.by_key else set()
            )
        return self.eq.get((namespace, field, value), set())

    def all_names(self, namespace: str) -> set[str]:
        return self.ns_names.get(namespace, set())

    def get(self, namespace: str, name: str) -> E | None:
        return self.by_key.get((namespace, name))

    def get_id(self, namespace: str, id_: OpId) -> E | None:
        """The entry with ``id_`` if it is in ``namespace`` (else None: no hint it exists)."""
        return self.by_id.get((namespace, id_))

    def select(self, namespace: str, exact: Mapping[str, Hashable]) -> Iterator[E]:
        """Entries matching every indexed exact filter (smallest index set first)."""
        if not exact:
            candidates: Iterable[str] = sorted(self.all_names(namespace))
        else:
            sets = sorted(
                (self.names(namespace, field, value) for field, value in exact.items()), key=len
            )
            candidates = sorted(set.intersection(*sets)) if sets[0] else []
        for name in candidates:
            entry = self.by_key.get((namespace, name))
            if entry is not None:
                yield entry


def _remove_sorted(items: list[Any], value: Any) -> None:
    at = bisect.bisect_left(items, value)
    if at < len(items) and items[at] == value:
        del items[at]


_SET_COST = 0.2
"""Cost of one gathered entry relative to one entry walked and checked in Python
(measured: comprehensions, set intersections and a nearly-sorted sort are about five
times cheaper per entry)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Source:
    """One filter's index: the matching ids as id-sorted lists and as sets (one of each
    per indexed value; a Gandi state word can stand for several states)."""

    field: str
    lists: list[list[OpId]]
    sets: list[set[OpId]]

    @property
    def size(self) -> int:
        return sum(map(len, self.lists))

    def between(self, low: int, high: int) -> list[OpId]:
        """The matching ids in ``[low, high)``, ascending (slices of the sorted lists)."""
        found: list[OpId] = []
        for ids in self.lists:
            found += ids[bisect.bisect_left(ids, low) : bisect.bisect_left(ids, high)]
        if len(self.lists) > 1:
            found.sort()
        return found


def _members(ids: list[OpId], sources: Iterable[_Source]) -> list[OpId]:
    """The ids that every source matches, in no particular order (callers sort): set
    intersections only, so nothing runs in Python per id."""
    found: Iterable[OpId] = ids
    for source in sources:
        found = set().union(*(one.intersection(found) for one in source.sets))
    return list(found)


class OperationCache(_Table[OperationEntry]):
    """Operations, with the plan-choosing list query Gandi's operation_list needs."""

    ORDERED = ("state", "type")

    def __init__(self) -> None:
        super().__init__(OperationEntry.from_object)

    def list_ids(
        self,
        namespace: str,
        *,
        states_: frozenset[states.State] | None = None,
        type_: str | None = None,
        updated_after: datetime.datetime | None = None,
        updated_before: datetime.datetime | None = None,
        limit: int = 300,
    ) -> list[OpId]:
        """The newest ``limit`` ids matching every filter, newest first.

        ``updated_after`` is inclusive and ``updated_before`` exclusive, so
        consecutive windows never count an operation twice.

        Plan: every filter has an index giving its matches. State and type
        indexes are id-ordered, so walking the smallest newest-first and
        checking the others stops after about ``limit / selectivity`` entries.
        When a date window (or the smallest index) is small enough, its ids are
        gathered instead, filtered by set membership and sorted.
        """
        all_ids = self.ns_ids.get(namespace, [])
        if not all_ids or limit <= 0:
            return []
        total = len(all_ids)
        after = updated_after.timestamp() if updated_after else None
        before = updated_before.timestamp() if updated_before else None
        has_date = after is not None or before is not None
        sources: list[_Source] = []
        if states_ is not None:
            keys = [(namespace, "state", state) for state in states_]
            sources.append(
                _Source(
                    field="state",
                    lists=[self.ordered.get(key, []) for key in keys],
                    sets=[self.id_sets.get(key, set()) for key in keys],
                )
            )
        if type_ is not None:
            key = (namespace, "type", type_)
            sources.append(
                _Source(
                    field="type",
                    lists=[self.ordered.get(key, [])],
                    sets=[self.id_sets.get(key, set())],
                )
            )
        if not sources and not has_date:
            return all_ids[: -limit - 1 : -1]
        sources.sort(key=lambda source: source.size)  # most selective first
        if sources and sources[0].size == 0:
            return []
        window_size = total
        lo = hi = 0
        if has_date:
            times = self.ns_times.get(namespace, [])
            lo = 0 if after is None else bisect.bisect_left(times, (after, 0))
            hi = len(times) if before is None else bisect.bisect_left(times, (before, 0))
            window_size = max(hi - lo, 0)
            if window_size == 0:
                return []
        walk = sources[0] if sources else _Source(field="all", lists=[all_ids], sets=[])
        others = sources[1:]
        # Walking the smallest index newest-first and checking the other filters stops
        # after about limit / P(others match) entries, if the filters are independent.
        # Dates are not: ids grow with time, so an old window is reached only at the
        # end of a walk, and with a date filter the walk is costed as its whole index.
        selectivity = math.prod(source.size / total for source in others)
        expected = min(walk.size, limit / selectivity)
        walk_estimate = walk.size if has_date else expected
        set_base = window_size if has_date else walk.size
        if set_base * _SET_COST < walk_estimate:
            # The gather plan: membership tests against the id sets, then a sort, which
            # is nearly linear here because ids already grow with time.
            if has_date:
                gathered = _members(self.ns_time_ids[namespace][lo:hi], sources)
            else:
                gathered = _members(walk.between(0, all_ids[-1] + 1), others)
            gathered.sort()
            return gathered[: -limit - 1 : -1]
        return self._walk(
            namespace,
            walk=walk,
            others=others,
            span=math.ceil((all_ids[-1] + 1 - all_ids[0]) * min(1.0, 1.25 * expected / walk.size)),
            after=after,
            before=before,
            limit=limit,
        )

    def _walk(
        self,
        namespace: str,
        *,
        walk: _Source,
        others: list[_Source],
        span: int,
        after: float | None,
        before: float | None,
        limit: int,
    ) -> list[OpId]:
        """The walk plan, newest first, in id ranges: each range is cut from the sorted
        lists by bisection and filtered by C-level membership tests, so the Python work
        is per range, not per id. The first range is sized to hold about ``limit``
        matches; every further one is twice as wide, which bounds the work at about
        twice the ids that had to be looked at."""
        all_ids = self.ns_ids[namespace]
        bottom, top = all_ids[0], all_ids[-1] + 1
        found: list[OpId] = []
        while top > bottom and len(found) < limit:
            low = max(bottom, top - span)
            chunk = _members(walk.between(low, top), others)
            chunk.sort(reverse=True)
            if after is not None or before is not None:
                by_id = self.by_id
                chunk = [
                    id_
                    for id_ in chunk
                    if (after is None or by_id[(namespace, id_)].updated_ts >= after)
                    and (before is None or by_id[(namespace, id_)].updated_ts < before)
                ]
            found += chunk
            top = low
            span *= 2
        return found[:limit]


class TaskCache(_Table[TaskEntry]):
    """ScheduledTasks."""

    def __init__(self) -> None:
        super().__init__(TaskEntry.from_object)
