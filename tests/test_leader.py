"""Leader election's effects on the real API server: one leader of two, hand-over on
release, a stolen Lease, and a leader cut off from the API server stopping before
anyone else may start (its connection runs through a loopback TCP relay the test
freezes)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import pytest

from opkeeper import errors, kube
from opkeeper.controller import leader

pytestmark = pytest.mark.cluster

TIMING = leader.Timing(lease_duration=3, renew_deadline=2, retry_period=0.25)


class Candidate:
    """An elector and a log of when it started and stopped acting."""

    def __init__(
        self, client: kube.Client, *, identity: str, namespace: str, log: list[tuple[float, str]]
    ) -> None:
        self.acting = False
        self._log = log

        async def on_start() -> None:
            self.acting = True
            log.append((time.monotonic(), f"{identity} start"))

        async def on_stop() -> None:
            self.acting = False
            log.append((time.monotonic(), f"{identity} stop"))

        self.elector = leader.Elector(
            client,
            name="lease",
            namespace=namespace,
            identity=identity,
            timing=TIMING,
            on_start=on_start,
            on_stop=on_stop,
        )


async def until(predicate: Any, *, within: float, what: str) -> None:
    """Wait (polling) until ``predicate()`` holds, at most ``within`` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def clients(cluster: Any, count: int) -> AsyncIterator[list[kube.Client]]:
    credentials = kube.Credentials.from_kubeconfig(cluster.kubeconfig)
    made = [kube.Client(credentials, timeout=TIMING.renew_deadline) for _ in range(count)]
    try:
        yield made
    finally:
        for client in made:
            await client.close()


def test_one_of_two_leads_and_a_release_hands_over_at_once(cluster: Any, namespace: str) -> None:
    async def main() -> None:
        log: list[tuple[float, str]] = []
        async with clients(cluster, 3) as (a_client, b_client, reader):
            a = Candidate(a_client, identity="a", namespace=namespace, log=log)
            b = Candidate(b_client, identity="b", namespace=namespace, log=log)
            a.elector.start()
            b.elector.start()
            await until(lambda: a.acting or b.acting, within=20, what="a leader")
            first, second = (a, b) if a.acting else (b, a)
            await asyncio.sleep(TIMING.lease_duration)  # long enough for a wrong takeover
            assert first.acting, log
            assert not second.acting, log
            lease = await reader.get(kube.LEASES, name="lease", namespace=namespace)
            assert lease["spec"]["holderIdentity"] == first.elector.identity
            assert lease["spec"]["leaseDurationSeconds"] == 3
            transitions = lease["spec"]["leaseTransitions"]

            stopped = time.monotonic()
            await first.elector.stop()
            assert not first.acting
            released = await reader.get(kube.LEASES, name="lease", namespace=namespace)
            assert released["spec"]["holderIdentity"] in ("", second.elector.identity)
            await until(lambda: second.acting, within=10, what="the standby acting")
            assert time.monotonic() - stopped < TIMING.retry_period * (1 + leader.JITTER) + 1.0
            lease = await reader.get(kube.LEASES, name="lease", namespace=namespace)
            assert lease["spec"]["holderIdentity"] == second.elector.identity
            assert lease["spec"]["leaseTransitions"] == transitions + 1
            await second.elector.stop()
            # Every Lease write is conditional: a stale copy is refused.
            with pytest.raises(errors.Conflict):
                await reader.replace(kube.LEASES, released, name="lease", namespace=namespace)

    asyncio.run(main())


def test_a_leader_whose_lease_is_taken_stops_acting_and_does_not_overwrite(
    cluster: Any, namespace: str
) -> None:
    async def main() -> None:
        log: list[tuple[float, str]] = []
        async with clients(cluster, 2) as (a_client, thief):
            a = Candidate(a_client, identity="a", namespace=namespace, log=log)
            a.elector.start()
            await until(lambda: a.acting, within=20, what="a leading")
            lease = await thief.get(kube.LEASES, name="lease", namespace=namespace)
            lease["spec"] |= {"holderIdentity": "thief", "leaseDurationSeconds": 60}
            await thief.replace(kube.LEASES, lease, name="lease", namespace=namespace)
            await until(lambda: not a.acting, within=5, what="a stopping")
            for _ in range(3):  # a stands by: it never writes over the live Lease
                await asyncio.sleep(TIMING.retry_period)
                now = await thief.get(kube.LEASES, name="lease", namespace=namespace)
                assert now["spec"]["holderIdentity"] == "thief"
            await a.elector.stop()

    asyncio.run(main())


class Relay:
    """A loopback TCP relay to the API server that the test can freeze (bytes held, as
    on a partitioned node): the elector's TLS connection runs through it unchanged."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self.frozen = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    if self.frozen.is_set():
                        await asyncio.Event().wait()  # held for ever (until cancelled)
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


def test_a_leader_cut_off_stops_acting_before_the_lease_can_expire_for_another(
    cluster: Any, namespace: str
) -> None:
    async def main() -> None:
        log: list[tuple[float, str]] = []
        credentials = kube.Credentials.from_kubeconfig(cluster.kubeconfig)
        url = urllib.parse.urlsplit(credentials.server)
        relay = Relay((url.hostname or "127.0.0.1", url.port or 443))
        await relay.start()
        relayed = dataclasses.replace(
            credentials, server=f"{url.scheme}://{url.hostname}:{relay.port}"
        )
        a_client = kube.Client(relayed, timeout=TIMING.renew_deadline)
        async with clients(cluster, 1) as (b_client,):
            a = Candidate(a_client, identity="a", namespace=namespace, log=log)
            a.elector.start()
            await until(lambda: a.acting, within=20, what="a leading")
            b = Candidate(b_client, identity="b", namespace=namespace, log=log)
            b.elector.start()
            await asyncio.sleep(TIMING.retry_period * 3)  # b has seen a renewing
            assert a.acting
            assert not b.acting
            relay.frozen.set()
            frozen_at = time.monotonic()
            await until(lambda: b.acting, within=20, what="b taking over")
            events = [what for _, what in log]
            assert events == ["a start", "a stop", "b start"], log
            stopped = next(t for t, what in log if what == "a stop")
            started = next(t for t, what in log if what == "b start")
            assert stopped - frozen_at <= TIMING.renew_deadline + 0.5
            assert started - stopped >= TIMING.lease_duration - TIMING.renew_deadline - 0.5
            await b.elector.stop()
            a_task = asyncio.create_task(a.elector.stop())
            await asyncio.wait({a_task}, timeout=TIMING.renew_deadline + 3)
        await a_client.close()
        await relay.close()

    asyncio.run(main())
