"""Leader election on a ``coordination.k8s.io/v1`` Lease: only one controller replica acts.

Why our own: two controller replicas must not both reconcile Operations or fire
ScheduledTasks, and kopf's peering pauses only kopf's own watches (the Jobs),
not our streams (:mod:`.streams`). The rules are client-go's leader election:

* A replica that does not hold the Lease reads it every retry period. It takes
  the Lease over only when it is free (no holder: released on a clean shutdown)
  or when the record has not changed for ``leaseDurationSeconds`` as measured on
  this replica's own monotonic clock since it last saw the record change. The
  holder's ``renewTime`` is written for people, never compared across machines:
  clocks of two nodes may disagree, their rates do not much.
* The holder renews every retry period. It stops acting once its last renewal
  that went through was *sent* more than the renew deadline ago: as the renew
  deadline is shorter than the lease duration and another replica counts from
  when it *saw* that renewal, the old leader has stopped before anyone may start.
* Every write is a PUT carrying the resourceVersion it read: of two replicas
  racing for a free or expired Lease, exactly one wins; the other gets a
  Conflict and stays a standby.

The decisions (:func:`decide`, :func:`leading`, :func:`lease_body`) are pure and
tested without I/O (tests/test_leader_units.py); :class:`Elector` does the I/O and
calls ``on_start``/``on_stop`` around each term of leadership; :class:`InThread`
keeps it off the reconcilers' event loop.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import enum
import logging
import math
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import prometheus_client

from opkeeper import errors, kube

logger = logging.getLogger(__name__)

LEADER = prometheus_client.Gauge(
    "opkeeper_controller_leader",
    "1 while this controller process acts (holds the leader Lease, or --standalone), else 0.",
)
TRANSITIONS = prometheus_client.Counter(
    "opkeeper_controller_leader_transitions_total",
    "Times this controller process started (to=leader) or stopped (to=standby) acting.",
    ["to"],
)
RELEASED_DURATION_SECONDS = 1
"""``leaseDurationSeconds`` of a released Lease (the API wants a positive number; the
empty holder is what lets the next replica take it at once)."""
JITTER = 0.2
"""A standby waits between 1 and 1 + JITTER retry periods between reads, so that
standbys started together do not race on every read."""


class Action(enum.Enum):
    """What a replica does with the Lease after reading it."""

    CREATE = "create"
    """No Lease exists: create it, holding it."""
    ACQUIRE = "acquire"
    """Free or expired: take it over (a transition)."""
    RENEW = "renew"
    """Ours: renew it."""
    STANDBY = "standby"
    """Someone else holds a live Lease: wait."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Record:
    """The part of a Lease's spec leader election reads."""

    holder: str
    """``holderIdentity``; empty: released."""
    duration_seconds: int
    """``leaseDurationSeconds``."""
    renew_time: str
    """``renewTime`` as written (compared for change only, never as a time)."""
    transitions: int
    """``leaseTransitions``."""

    @classmethod
    def of(cls, lease: Mapping[str, Any]) -> Record:
        spec = lease.get("spec") or {}
        return cls(
            holder=spec.get("holderIdentity") or "",
            duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
            renew_time=str(spec.get("renewTime") or ""),
            transitions=int(spec.get("leaseTransitions") or 0),
        )


def decide(*, record: Record | None, observed_at: float, now: float, identity: str) -> Action:
    """What ``identity`` does with a Lease whose ``record`` it last saw change at
    ``observed_at`` (its monotonic clock), at ``now`` (same clock)."""
    if record is None:
        return Action.CREATE
    if record.holder == identity:
        return Action.RENEW
    if not record.holder or now >= observed_at + record.duration_seconds:
        return Action.ACQUIRE
    return Action.STANDBY


def leading(*, renewed_at: float, now: float, renew_deadline: float) -> bool:
    """Whether a holder whose last renewal that went through was sent at ``renewed_at``
    may still act at ``now``."""
    return now - renewed_at < renew_deadline


def lease_body(
    *,
    name: str,
    namespace: str,
    identity: str,
    duration_seconds: int,
    now: datetime.datetime,
    current: kube.Body | None,
) -> kube.Body:
    """The Lease ``identity`` writes to hold it from ``now``: created anew, renewed, or
    taken over from ``current`` (conditional on ``current``'s resourceVersion)."""
    stamp = _micro_time(now)
    spec: dict[str, Any] = {
        "holderIdentity": identity,
        "leaseDurationSeconds": duration_seconds,
        "renewTime": stamp,
    }
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if current is None:
        spec |= {"acquireTime": stamp, "leaseTransitions": 0}
    else:
        before = current.get("spec") or {}
        metadata["resourceVersion"] = current["metadata"]["resourceVersion"]
        transitions = int(before.get("leaseTransitions") or 0)
        if before.get("holderIdentity") == identity:
            spec |= {"acquireTime": before.get("acquireTime") or stamp}
        else:
            spec |= {"acquireTime": stamp}
            transitions += 1
        spec["leaseTransitions"] = transitions
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": metadata,
        "spec": spec,
    }


def released_body(current: kube.Body, *, now: datetime.datetime) -> kube.Body:
    """``current`` given up: no holder, so the next replica to read it takes it at once."""
    spec = dict(current.get("spec") or {})
    spec |= {
        "holderIdentity": "",
        "leaseDurationSeconds": RELEASED_DURATION_SECONDS,
        "renewTime": _micro_time(now),
    }
    metadata = {
        "name": current["metadata"]["name"],
        "namespace": current["metadata"]["namespace"],
        "resourceVersion": current["metadata"]["resourceVersion"],
    }
    return {**current, "metadata": metadata, "spec": spec}


def _micro_time(now: datetime.datetime) -> str:
    """Kubernetes' MicroTime: RFC 3339 with microseconds, in UTC."""
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def default_identity() -> str:
    """The pod's name (``POD_NAME`` from the downward API, else the host name) and a
    random suffix: a restarted container with the same name is a new candidate."""
    base = os.environ.get("POD_NAME") or socket.gethostname() or "opkeeper"
    return f"{base[:50]}-{secrets.token_hex(4)}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Timing:
    """client-go's three durations (see :class:`opkeeper.controller.Settings`)."""

    lease_duration: float
    renew_deadline: float
    retry_period: float

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError(
                "leader election needs 0 < retry period < renew deadline < lease duration,"
                f" got {self.retry_period}, {self.renew_deadline}, {self.lease_duration}"
            )


class Elector:
    """Holds or waits for the Lease; runs ``on_start`` when this process starts acting
    and ``on_stop`` (awaited before anything else happens) when it stops."""

    def __init__(
        self,
        client: kube.Client,
        *,
        name: str,
        namespace: str,
        identity: str,
        timing: Timing,
        on_start: Callable[[], Awaitable[None]],
        on_stop: Callable[[], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._name = name
        self._namespace = namespace
        self.identity = identity
        self._timing = timing
        self._on_start = on_start
        self._on_stop = on_stop
        self._clock = clock
        self._lease: kube.Body | None = None
        """The Lease as last read or written."""
        self._observed: tuple[Record | None, float] = (None, 0.0)
        """The record as last seen, and when it was first seen like that."""
        self._renewed_at: float | None = None
        """When the last renewal that went through was sent; None: not leading."""
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def is_leader(self) -> bool:
        return self._renewed_at is not None

    @property
    def writes(self) -> collections.Counter[tuple[str, str]]:
        """The Lease writes made so far (a copy: the elector may run on another thread)."""
        return collections.Counter(dict(self._client.writes))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="leader-election")

    async def stop(self) -> None:
        """Stop acting, then release the Lease (if held), so a standby takes over at once."""
        self._stopping.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._release()

    async def _run(self) -> None:
        duration = math.ceil(self._timing.lease_duration)
        with contextlib.suppress(errors.OpkeeperError):
            await kube.ensure_namespace(self._client, self._namespace)
        while not self._stopping.is_set():
            sent = self._clock()
            try:
                acted = await asyncio.wait_for(
                    self._try(duration=duration, sent=sent), timeout=self._attempt_timeout(sent)
                )
            except (errors.OpkeeperError, TimeoutError) as exc:
                logger.warning("leader election: %s failed: %s", self._name, exc or "timed out")
                acted = False
            except Exception:
                # Whatever went wrong counts as a failed round: ending this loop would
                # leave a leader acting without renewals.
                logger.exception("leader election: %s failed unexpectedly", self._name)
                acted = False
            if acted:  # our write went through: we hold the Lease as of ``sent``
                starting = not self.is_leader
                self._renewed_at = sent
                if starting:
                    await self._start_acting()
            elif self._renewed_at is not None:
                lost = self._holder() not in ("", self.identity)
                if lost or not leading(
                    renewed_at=self._renewed_at,
                    now=self._clock(),
                    renew_deadline=self._timing.renew_deadline,
                ):
                    await self._stop_acting(why="taken over" if lost else "renew deadline passed")
            await self._pause()
        if self.is_leader:
            await self._stop_acting(why="shutting down")

    def _attempt_timeout(self, sent: float) -> float:
        """A leader's attempt may last until its renew deadline; a standby's as long."""
        if self._renewed_at is None:
            return self._timing.renew_deadline
        return max(0.0, self._renewed_at + self._timing.renew_deadline - sent)

    async def _pause(self) -> None:
        if self.is_leader:
            wait = self._timing.retry_period
            assert self._renewed_at is not None
            # Retry a failed renewal no later than the deadline, so losing it is noticed
            # at the deadline, not a retry period after.
            deadline = self._renewed_at + self._timing.renew_deadline - self._clock()
            wait = max(0.0, min(wait, deadline))
        else:
            wait = self._timing.retry_period * (1 + JITTER * random.random())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=wait)

    def _holder(self) -> str:
        return Record.of(self._lease).holder if self._lease is not None else ""

    async def _try(self, *, duration: int, sent: float) -> bool:
        """One round: read the Lease unless we hold a fresh copy, decide, write. True if
        our write went through (we hold the Lease as of ``sent``)."""
        if not self.is_leader or self._lease is None:
            await self._read()
        record = Record.of(self._lease) if self._lease is not None else None
        action = decide(
            record=record, observed_at=self._observed[1], now=self._clock(), identity=self.identity
        )
        if action is Action.STANDBY:
            return False
        body = lease_body(
            name=self._name,
            namespace=self._namespace,
            identity=self.identity,
            duration_seconds=duration,
            now=datetime.datetime.now(datetime.UTC),
            current=self._lease if action is not Action.CREATE else None,
        )
        try:
            if action is Action.CREATE:
                written = await self._client.create(kube.LEASES, body, namespace=self._namespace)
            else:
                written = await self._client.replace(
                    kube.LEASES, body, name=self._name, namespace=self._namespace
                )
        except errors.Conflict:
            # Someone else wrote in between (took it, or created it): read again next round.
            await self._read()
            return False
        self._lease = written
        self._see(Record.of(written), at=sent)
        return True

    async def _read(self) -> None:
        try:
            self._lease = await self._client.get(
                kube.LEASES, name=self._name, namespace=self._namespace
            )
        except errors.NotFound:
            self._lease = None
        self._see(Record.of(self._lease) if self._lease is not None else None, at=self._clock())

    def _see(self, record: Record | None, *, at: float) -> None:
        if record != self._observed[0]:
            seen = self._observed[0].holder if self._observed[0] is not None else ""
            holder = record.holder if record is not None else ""
            if holder not in (seen, "", self.identity):
                logger.info("leader election: %s held by %s; standing by", self._name, holder)
            self._observed = (record, at)

    async def _start_acting(self) -> None:
        logger.info("leader election: %s acquired by %s; acting", self._name, self.identity)
        await self._on_start()

    async def _stop_acting(self, *, why: str) -> None:
        log = logger.info if self._stopping.is_set() else logger.warning
        log("leader election: %s: stopping acting (%s)", self._name, why)
        self._renewed_at = None
        await self._on_stop()

    async def _release(self) -> None:
        """Give the Lease up if the last copy we hold says it is ours (bounded in time:
        a failed release only means the standby waits for the lease to expire)."""
        if self._lease is None or self._holder() != self.identity:
            return
        body = released_body(self._lease, now=datetime.datetime.now(datetime.UTC))
        try:
            self._lease = await asyncio.wait_for(
                self._client.replace(kube.LEASES, body, name=self._name, namespace=self._namespace),
                timeout=self._timing.renew_deadline,
            )
            logger.info("leader election: %s released by %s", self._name, self.identity)
        except (errors.OpkeeperError, TimeoutError) as exc:
            logger.warning("leader election: releasing %s failed: %s", self._name, exc)


class InThread:
    """An :class:`Elector` on a thread and event loop of its own.

    The reconcilers' loop can be busy for seconds (a term's first list parses every
    Operation; a burst of watch events is parsed on the loop): on that loop, renewals
    would wait behind them, and a loaded leader would lose its Lease for nothing. Here
    renewals only compete for the GIL, which a busy thread gives up every few
    milliseconds. ``on_start``/``on_stop`` still run on the caller's loop, and the
    elector waits for them to finish.
    """

    def __init__(
        self,
        client: kube.Client,
        *,
        name: str,
        namespace: str,
        identity: str,
        timing: Timing,
        on_start: Callable[[], Awaitable[None]],
        on_stop: Callable[[], Awaitable[None]],
    ) -> None:
        """Call from the loop ``on_start`` and ``on_stop`` belong to; ``client`` is
        used (and closed) only on the elector's own loop."""
        self._main = asyncio.get_running_loop()
        self._loop = asyncio.new_event_loop()
        self._client = client
        self.elector = Elector(
            client,
            name=name,
            namespace=namespace,
            identity=identity,
            timing=timing,
            on_start=self._on_main(on_start, wait=False),
            on_stop=self._on_main(on_stop, wait=True),
        )
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="leader-election", daemon=True
        )
        self._stopped = False

    def _on_main(
        self, callback: Callable[[], Awaitable[None]], *, wait: bool
    ) -> Callable[[], Awaitable[None]]:
        """``callback`` run on the caller's loop; awaited only if ``wait``: stopping must
        be over before a standby starts, but renewals must not wait for a busy loop to
        get round to starting (calls keep their order on that loop either way)."""

        async def call() -> None:
            async def run() -> None:
                await callback()

            future = asyncio.run_coroutine_threadsafe(run(), self._main)
            if wait:
                await asyncio.wrap_future(future)
            else:
                future.add_done_callback(_log_failure)

        return call

    def start(self) -> None:
        self._thread.start()
        self._loop.call_soon_threadsafe(self.elector.start)

    async def stop(self) -> None:
        """Stop acting, release the Lease, end the thread (a second call does nothing)."""
        if self._stopped or not self._thread.is_alive():
            return
        self._stopped = True

        async def down() -> None:
            await self.elector.stop()
            await self._client.close()

        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(down(), self._loop))
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join, 10)
        self._loop.close()


def _log_failure(future: concurrent.futures.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("leader election: starting to act failed", exc_info=future.exception())
