"""XenAPI's view of the Operation cache: tasks by uuid, and a change feed for ``event.from``.

XenAPI clients wait for a task by calling ``event.from(classes, token,
timeout)`` in a loop: the call returns the changes since ``token`` (all
current objects for an empty token) and a new token, or waits until there is
one or the timeout passes. Polling the API server for that would cost a
request per client per second; instead :class:`TaskFeed` observes the
watch-fed :class:`.cache.OperationCache` (:class:`.cache.Observer`) and keeps,
per tenant, the last :attr:`Settings.max_changes_per_tenant` changes in
resourceVersion order. A token is a resourceVersion: the change's own, or
the cache's watched version when answering, so it means the same on every
worker and replica (they all follow one etcd history). A waiter costs one
future; a change wakes only its own tenant's waiters, and their number is
capped per tenant, so a crowd of waiting clients is a bounded amount of
memory and no CPU while nothing changes.

When a token is older than what the feed still holds (more changes than it
keeps, or a relist of the cache), the answer is every current task as a
``mod`` event: the client's view is complete again, only deletions in the
gap are not reported as such.

Refs are ``OpaqueRef:<uid>`` and uuids the Operation's uid: stable across
restarts of the gateway, unique per object, and the index here answers them
without a scan.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Literal

from opkeeper import errors
from opkeeper.gateway import cache

EventOp = Literal["add", "mod", "del"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """How ``event.from`` waits."""

    max_changes_per_tenant: int = 1000
    """Changes kept per tenant for ``event.from`` tokens (default 1,000); a client further
    behind gets every current task instead."""
    max_waiters_per_tenant: int = 256
    """``event.from`` calls that may wait at once per tenant (default 256); one more is
    refused (``OPERATION_NOT_ALLOWED``) rather than queued."""
    max_wait_seconds: float = 60.0
    """Longest wait of one ``event.from`` call, whatever timeout the client asks for
    (default 60 s: below common proxy idle timeouts; clients call again)."""
    max_registrations_per_tenant: int = 256
    """Sessions of one tenant with an ``event.register`` kept at once (default 256); one
    more evicts the tenant's least recently used registration, whose next ``event.next``
    answers ``SESSION_NOT_REGISTERED`` (the client registers again)."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Change:
    """One change of one tenant's task."""

    version: int
    operation: EventOp
    entry: cache.OperationEntry
    """The task after the change (before it, for ``del``)."""


class TaskFeed:
    """Tasks by uid and the per-tenant change log, kept current by the cache's watch."""

    def __init__(self, *, operations: cache.OperationCache, settings: Settings) -> None:
        self._operations = operations
        self.settings = settings
        self._by_uid: dict[str, cache.OperationEntry] = {}
        self._changes: dict[str, collections.deque[Change]] = {}
        self._horizon: dict[str, int] = {}
        """Per tenant: the newest version of a change no longer kept."""
        self._reloaded_at = 0
        """The watched version at the last relist: older tokens may have missed changes."""
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        operations.observers.append(self)
        self.reloaded()

    # --- cache.Observer ------------------------------------------------------------

    def changed(
        self,
        *,
        old: cache.OperationEntry | None,
        new: cache.OperationEntry | None,
        version: int,
    ) -> None:
        if old is not None and (new is None or new.uid != old.uid):
            self._by_uid.pop(old.uid, None)
            if old.id is not None:
                self._record(old.namespace, Change(version=version, operation="del", entry=old))
        if new is not None:
            self._by_uid[new.uid] = new
            if new.id is not None:
                known = old is not None and old.uid == new.uid and old.id is not None
                self._record(
                    new.namespace,
                    Change(version=version, operation="mod" if known else "add", entry=new),
                )

    def reloaded(self) -> None:
        self._by_uid = {e.uid: e for e in self._operations.by_key.values()}
        self._changes.clear()
        self._horizon.clear()
        self._reloaded_at = self._operations.watched_version
        for tenant in list(self._waiters):
            self._wake(tenant)

    def _record(self, tenant: str, change: Change) -> None:
        log = self._changes.get(tenant)
        if log is None:
            log = self._changes[tenant] = collections.deque()
        if len(log) >= self.settings.max_changes_per_tenant:
            self._horizon[tenant] = log.popleft().version
        log.append(change)
        self._wake(tenant)

    def _wake(self, tenant: str) -> None:
        for waiter in self._waiters.get(tenant, ()):
            if not waiter.done():
                waiter.set_result(None)

    # --- reads -----------------------------------------------------------------------

    @property
    def token(self) -> int:
        """The version every change up to which is in (the token an answer carries)."""
        return self._operations.watched_version

    def task(self, tenant: str, uid: str) -> cache.OperationEntry | None:
        """The task with ``uid`` if it is the tenant's (else None: no hint it exists)."""
        entry = self._by_uid.get(uid)
        if entry is None or entry.namespace != tenant or entry.id is None:
            return None
        return entry

    def tasks(self, tenant: str) -> Iterator[cache.OperationEntry]:
        """The tenant's tasks, oldest id first."""
        by_id = self._operations.by_id
        for id_ in self._operations.ns_ids.get(tenant, []):
            yield by_id[(tenant, id_)]

    def count(self, tenant: str) -> int:
        """How many tasks the tenant has."""
        return len(self._operations.ns_ids.get(tenant, []))

    def since(self, tenant: str, token: int) -> list[Change] | None:
        """The tenant's changes after ``token``, oldest first; None when some of them are
        no longer kept (the caller then sends every current task)."""
        if token < self._reloaded_at or token < self._horizon.get(tenant, 0):
            return None
        log = self._changes.get(tenant)
        if not log or log[-1].version <= token:
            return []
        found: list[Change] = []
        for change in reversed(log):
            if change.version <= token:
                break
            found.append(change)
        found.reverse()
        return found

    async def wait(self, tenant: str, *, token: int, seconds: float) -> None:
        """Return once the tenant has a change after ``token``, or after ``seconds``
        (capped by :attr:`Settings.max_wait_seconds`). A waiter beyond
        :attr:`Settings.max_waiters_per_tenant` is refused (:class:`errors.Forbidden`)."""
        if self.since(tenant, token) != []:
            return
        waiters = self._waiters.setdefault(tenant, set())
        if len(waiters) >= self.settings.max_waiters_per_tenant:
            raise errors.Forbidden(
                f"{len(waiters)} event.from calls of this tenant are waiting already, the"
                " most allowed; wait on fewer connections"
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.add(waiter)
        try:
            async with asyncio.timeout(min(max(seconds, 0.0), self.settings.max_wait_seconds)):
                await waiter
        except TimeoutError:
            pass
        finally:
            waiters.discard(waiter)
            if not waiters:
                del self._waiters[tenant]

    def waiting(self) -> int:
        """``event.from`` calls waiting now (all tenants)."""
        return sum(map(len, self._waiters.values()))


@dataclasses.dataclass(kw_only=True)
class Registration:
    """One session's ``event.register``: the classes it wants and how far it has read."""

    tenant: str
    classes: set[str]
    token: int
    """The version every change up to which ``event.next`` has delivered."""
    expires: float
    """The session's expiry (``time.time()``): a registration never outlives its session."""


class Registrations:
    """XenAPI's older event API's per-session state (``event.register``/``event.next``),
    kept in this gateway process, bounded per tenant, keyed by the session's nonce (unique
    per login, so no two tenants or logins share an entry)."""

    def __init__(self, *, settings: Settings, clock: Callable[[], float] = time.time):
        self.settings = settings
        self._clock = clock
        self._by_tenant: dict[str, collections.OrderedDict[str, Registration]] = {}

    def register(
        self, *, tenant: str, nonce: str, classes: set[str], token: int, expires: float
    ) -> None:
        """Add ``classes`` to the session's registration (a new one starts at ``token``)."""
        kept = self._by_tenant.setdefault(tenant, collections.OrderedDict())
        found = kept.get(nonce)
        if found is not None:
            found.classes |= classes
            kept.move_to_end(nonce)
            return
        now = self._clock()
        for stale in [n for n, r in kept.items() if r.expires <= now]:
            del kept[stale]
        while len(kept) >= self.settings.max_registrations_per_tenant:
            kept.popitem(last=False)
        kept[nonce] = Registration(
            tenant=tenant, classes=set(classes), token=token, expires=expires
        )

    def unregister(self, *, tenant: str, nonce: str, classes: set[str]) -> None:
        """Remove ``classes`` from the session's registration (none: nothing happens)."""
        kept = self._by_tenant.get(tenant)
        found = kept.get(nonce) if kept is not None else None
        if found is not None:
            found.classes -= classes

    def get(self, *, tenant: str, nonce: str) -> Registration | None:
        """The session's registration, if this process has one and it has not expired."""
        kept = self._by_tenant.get(tenant)
        found = kept.get(nonce) if kept is not None else None
        if found is None or found.expires <= self._clock():
            return None
        assert kept is not None
        kept.move_to_end(nonce)
        return found

    def drop(self, *, tenant: str, nonce: str) -> None:
        """Forget the session's registration (``session.logout``)."""
        kept = self._by_tenant.get(tenant)
        if kept is not None:
            kept.pop(nonce, None)
            if not kept:
                del self._by_tenant[tenant]

    def count(self) -> int:
        """Registrations kept (all tenants)."""
        return sum(map(len, self._by_tenant.values()))
