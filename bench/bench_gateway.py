"""Gateway benchmark: Gandi operation_details and gocept query throughput (each also as a
fraction of the HTTP-only ceiling measured in the same run), operation_list p99, peak RSS;
BDOM's single-task status rate and filtered-list p99 against Gandi's details and list.
CloudStack queryAsyncJobResult (signed, JSON and XML) against the Gandi details rate.
XenAPI task.get_record throughput (against Gandi details of the same run), task.get_all
cost, and event.from with many waiting clients (memory, delay from change to answer).

The gateway runs in its own process (as in production) with N Operations in
its cache; a load generator in this process drives it over loopback HTTP with
concurrent keep-alive connections sending real XML-RPC bodies (encoded by
xmlrpc.client) and checking every answer is HTTP 200 and not a fault.

The load generator is a raw asyncio protocol, one per connection: each
request (headers and body) is built once, written whole, and the answer is
read by its Content-Length. aiohttp's client cost about as much CPU per call
as the gateway itself, and the two share the machine's cores, so it capped
what the gateway could be shown to do. Both sides' CPU per call are reported
(``gateway_cpu_us_per_call`` from the gateway process, ``client_cpu_us_per_call``
from this one), so a reader can tell which side a result was bound by.

Two ways to fill the cache:

* ``--fill direct`` (default, and the only practical one for 100,000): the
  gateway process builds the objects itself and loads them with the same
  ``reset`` a watch SYNC uses. No API server is involved in reads anyway,
  which is the point of the cache.
* ``--fill apiserver``: a real local kube-apiserver is started, N Operations
  are created through it, and the gateway fills its cache from its real
  list+watch. Slower to prepare; proves the same numbers hold with the real feed.

Every call is also written to the call log (SQLite, group-committed), as in
production.

``--workers N`` runs N gateway processes on one port (``SO_REUSEPORT``, as
``opkeeper gateway --workers N`` does, metrics in multiprocess mode), each
with the same synthetic fill and one shared call log file; the gateway CPU
per call and the peak RSS are summed over them.

XenAPI (``/xenapi``): ``task.get_record`` is driven like Gandi's details and reported
as a fraction of the details rate of the same run (the median of alternating short
loads of each, :data:`COMPARE_PAIRS`); ``task.get_all`` (every ref of the
tenant) by one client. For ``event.from``, ``--waiters`` connections each wait with
the current token; every gateway process then changes one Operation in its cache (as a
watch event would) and reports the moment (``time.monotonic``, one clock for every
process on the machine); each waiter's delay is from the earliest of those moments to
its answer's arrival. The gateways' RSS (summed) is read before the waiters connect and
while they wait. With ``--workers N`` the waiters' connections are spread over the
workers by ``SO_REUSEPORT``, as in production.

Results go to <out>/<name>.{json,md}; the runs already there are kept under
"history" (and "Earlier runs" in the markdown), newest first, so a re-run never
erases the numbers it is compared with. ``--note`` adds a line under the table
(what changed since the previous run).

Usage: python bench/bench_gateway.py [--sizes 10000,100000] [--fill direct]
       [--duration 10] [--concurrency 32] [--workers 1] [--out bench/results] [--note TEXT]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import datetime
import json
import multiprocessing
import multiprocessing.connection
import os
import pathlib
import platform
import random
import shutil
import statistics
import tempfile
import time
import urllib.parse
import xmlrpc.client
from typing import Any

import aiohttp

import common  # bench/common.py: the script's directory is on sys.path
from opkeeper import kube
from opkeeper.gateway import auth, kubeio, server, xenevents
from opkeeper.gateway.dialects import cloudstack, xenapi

NAMESPACE = "bench"
KEY = "opk_bench-key-not-secret"
SESSION_KEY = auth.FixedKey(value=b"bench-session-key-not-secret-32b")
"""Shared by every worker, as the session key Secret is in a cluster."""
CLOUDSTACK_KEY = auth.FixedKey(value=b"bench-cloudstack-master-not-secret")
"""The CloudStack master key, shared by every worker as its Secret is in a cluster."""
TYPES = ["domain_create", "domain_renew", "domain_transfer", "vm_deploy", "dns_update"]
STATES = [
    "Pending",
    "Running",
    "WaitingExternal",
    "Succeeded",
    "FailedInternal",
    "FailedExternal",
    "Cancelled",
]
T0 = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
SPAN_SECONDS = 30 * 86400
"""Synthetic date_updated values spread over 30 days."""


def synthetic(i: int) -> dict[str, Any]:
    """Operation number ``i`` as the API server would return it (deterministic)."""
    rnd = random.Random(i)
    created = T0 + datetime.timedelta(seconds=i * SPAN_SECONDS // 200_000)
    updated = created + datetime.timedelta(seconds=rnd.randrange(3600))
    return {
        "apiVersion": "opkeeper.dev/v1alpha1",
        "kind": "Operation",
        "metadata": {
            "name": f"op-{i}",
            "namespace": NAMESPACE,
            "uid": f"00000000-0000-0000-0000-{i:012d}",
            "resourceVersion": str(1000 + i),
            "creationTimestamp": created.isoformat().replace("+00:00", "Z"),
            "labels": {"opkeeper.dev/id": str(i)},
        },
        "spec": {
            "type": TYPES[i % len(TYPES)],
            "object": {"kind": "domain", "name": f"example-{i}.org"},
            "params": {"domain": f"example-{i}.org", "years": 1 + i % 3, "owner": "ACME-1"},
            "executor": {"external": {}},
        },
        "status": {
            "id": i,
            "state": STATES[rnd.randrange(len(STATES))],
            "progress": rnd.randrange(101),
            "attempt": 0,
            "createdAt": created.isoformat().replace("+00:00", "Z"),
            "updatedAt": updated.isoformat().replace("+00:00", "Z"),
        },
    }


def key_secret() -> dict[str, Any]:
    manifest = auth.key_secret(
        name="bench-key", namespace="opkeeper-system", key=KEY, user_id="bench", tenant=NAMESPACE
    )
    data = {k: base64.b64encode(v.encode()).decode() for k, v in manifest["stringData"].items()}
    return {"metadata": manifest["metadata"], "data": data}


# --- the gateway process ---------------------------------------------------------------


def gateway_process(
    conn: multiprocessing.connection.Connection,
    size: int,
    kubeconfig: str | None,
    workdir: str,
    settings: server.Settings,
) -> None:
    asyncio.run(_gateway_main(conn, size, kubeconfig, workdir, settings))


async def _gateway_main(
    conn: multiprocessing.connection.Connection,
    size: int,
    kubeconfig: str | None,
    workdir: str,
    settings: server.Settings,
) -> None:
    credentials = (
        kube.Credentials.from_kubeconfig(kubeconfig)
        if kubeconfig
        else kube.Credentials(server="http://127.0.0.1:9", ssl_context=False)  # never called
    )
    async with (
        kube.Client(credentials) as client,
        server.running(
            settings=settings,
            kube_client=client,
            session_key=SESSION_KEY,
            feeds=kubeconfig is not None,
            cloudstack_key=CLOUDSTACK_KEY,
        ) as (gateway, port),
    ):
        started = time.perf_counter()
        if kubeconfig is None:
            # No feeds: the cache is filled here, with the same reset a watch SYNC does.
            gateway.operations.reset(synthetic(i) for i in range(1, size + 1))
            gateway.tasks.reset([])
            kubeio.settle_heap()  # as feed() does after a SYNC
            for event in gateway.synced.values():
                event.set()
        else:
            await asyncio.wait_for(
                asyncio.gather(*(e.wait() for e in gateway.synced.values())), timeout=600
            )
            # Everything was created before the gateway started: the first list has it all.
        gateway.keyring.apply(event="ADDED", obj=key_secret())
        fill_seconds = time.perf_counter() - started
        conn.send(
            {
                "port": port,
                "cached": len(gateway.operations),
                "fill_seconds": fill_seconds,
                "token": gateway.operations.watched_version,
            }
        )
        loop = asyncio.get_running_loop()
        # Answer the parent's questions until it says stop; "cpu" is this process's CPU
        # time, so the parent can compute CPU per call (independent of other load).
        while (message := await loop.run_in_executor(None, conn.recv)) != "stop":
            conn.send(_answer(gateway, message))
        conn.send({"peak_rss_bytes": common.memory_of("self").get("VmHWM", 0) * 1024})


def _answer(gateway: server.Gateway, message: str) -> Any:
    """The gateway process's side of the pipe: CPU time, RSS, waiting event.from calls,
    or a change of op-1 applied to the cache as a watch event (when, on the monotonic
    clock every process shares)."""
    if message == "cpu":
        return time.process_time()
    if message == "rss":
        return common.memory_of("self").get("VmRSS", 0) * 1024
    if message == "waiting":
        return gateway.task_feed.waiting()
    assert message == "touch", message
    entry = gateway.operations.get(NAMESPACE, "op-1")
    assert entry is not None
    obj = synthetic(1)
    version = gateway.operations.watched_version + 1
    obj["metadata"]["resourceVersion"] = str(version)
    obj["status"]["progress"] = version % 100
    gateway.operations.apply(event="MODIFIED", obj=obj)
    return {"at": time.monotonic(), "token": version}


def baseline_process(conn: multiprocessing.connection.Connection) -> None:
    """An aiohttp app that answers every POST with a fixed XML-RPC response: the ceiling
    of HTTP alone on this machine, measured the same way, for context."""
    from aiohttp import web

    answer = xmlrpc.client.dumps(({"id": 1, "state": "DONE"},), methodresponse=True).encode()

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=answer, content_type="text/xml")

    async def main() -> None:
        app = web.Application()
        app.add_routes([web.post("/xmlrpc", handler)])
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host="127.0.0.1", port=0)
        await site.start()
        conn.send(runner.addresses[0][1])
        loop = asyncio.get_running_loop()
        while await loop.run_in_executor(None, conn.recv) == "cpu":
            conn.send(time.process_time())
        await runner.cleanup()

    asyncio.run(main())


async def baseline(*, duration: float, concurrency: int) -> dict[str, float]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=baseline_process, args=(child,))
    process.start()
    port = await asyncio.get_running_loop().run_in_executor(None, parent.recv)
    body = xmlrpc.client.dumps(("s", 1), "operation_details").encode()
    loop = asyncio.get_running_loop()
    parent.send("cpu")
    cpu_before = await loop.run_in_executor(None, parent.recv)
    result = await load(port, [body], duration=duration, concurrency=concurrency)
    parent.send("cpu")
    cpu_used = await loop.run_in_executor(None, parent.recv) - cpu_before
    parent.send("stop")
    process.join(30)
    return {**result.summary(), "server_cpu_us_per_call": round(cpu_used / result.requests * 1e6)}


# --- the load generator -----------------------------------------------------------------


@dataclasses.dataclass
class Result:
    requests: int
    seconds: float
    latencies: list[float]
    faults: int
    client_cpu_seconds: float
    """CPU time the load generator (this process) used while the load ran."""

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds

    @classmethod
    def merged(cls, results: list[Result]) -> Result:
        """Several loads of the same calls as one (their requests over their time)."""
        return cls(
            requests=sum(r.requests for r in results),
            seconds=sum(r.seconds for r in results),
            latencies=[t for r in results for t in r.latencies],
            faults=sum(r.faults for r in results),
            client_cpu_seconds=sum(r.client_cpu_seconds for r in results),
        )

    def summary(self) -> dict[str, float]:
        lat = sorted(self.latencies)
        q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else lat * 99
        return {
            "requests": self.requests,
            "req_per_s": round(self.rate, 1),
            "p50_ms": round(q[49] * 1000, 2),
            "p99_ms": round(q[98] * 1000, 2),
            "max_ms": round(lat[-1] * 1000, 2),
            "faults": self.faults,
            "client_cpu_us_per_call": round(self.client_cpu_seconds / self.requests * 1e6),
        }


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that sends one request at a time.

    A raw protocol instead of aiohttp's client: the client costs as much CPU per call
    as the gateway, and both share the machine, so an expensive client caps what the
    gateway can be shown to do. Responses are read by their Content-Length (the
    gateway always sends one; anything else fails the run).
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[bytes, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc or ConnectionError("the server closed the connection"))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0 or self._waiter is None:
            return
        head = bytes(self._buffer[:end])
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            self._waiter.set_exception(RuntimeError(f"no Content-Length in {head!r}"))
            return
        if len(self._buffer) < end + 4 + length:
            return
        body = bytes(self._buffer[end + 4 : end + 4 + length])
        del self._buffer[: end + 4 + length]
        self._waiter.set_result((head.split(b"\r\n", 1)[0], body))

    async def call(self, request: bytes) -> tuple[bytes, bytes]:
        """Send one complete request; returns the status line and the body."""
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self._waiter


def http_post(
    host: str,
    port: int,
    body: bytes,
    *,
    authorization: str | None = None,
    path: str = "/xmlrpc",
) -> bytes:
    """A complete HTTP/1.1 POST of an XML-RPC body to ``path``, built once and reused."""
    auth = f"Authorization: {authorization}\r\n" if authorization else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: text/xml\r\n"
        f"{auth}Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


async def load(
    port: int,
    bodies: list[bytes],
    *,
    duration: float,
    concurrency: int,
    authorization: str | None = None,
    prepared: list[bytes] | None = None,
    path: str = "/xmlrpc",
    failure: bytes = b"<fault>",
) -> Result:
    """``concurrency`` connections, each sending a random body of ``bodies`` as soon as
    the previous answer is in, until ``duration`` seconds have passed. Every answer
    must be HTTP 200 without ``failure`` (a ``<fault>``; XenAPI's ``Failure``); the CPU
    this process used is reported. ``prepared`` are complete requests to send instead
    (BDOM's GETs, CloudStack's signed calls)."""
    requests = prepared or [
        http_post("127.0.0.1", port, body, authorization=authorization, path=path)
        for body in bodies
    ]
    latencies: list[float] = []
    faults = 0
    loop = asyncio.get_running_loop()
    connections = []
    for _ in range(concurrency):
        _, protocol = await loop.create_connection(_Connection, "127.0.0.1", port)
        connections.append(protocol)
    deadline = time.perf_counter() + duration

    async def worker(connection: _Connection, seed: int) -> None:
        nonlocal faults
        rnd = random.Random(seed)
        while time.perf_counter() < deadline:
            request = requests[rnd.randrange(len(requests))]
            t0 = time.perf_counter()
            status, payload = await connection.call(request)
            latencies.append(time.perf_counter() - t0)
            if not status.startswith(b"HTTP/1.1 200 ") or failure in payload:
                faults += 1

    cpu_before = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(worker(c, i) for i, c in enumerate(connections)))
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_before
    for connection in connections:
        assert connection.transport is not None
        connection.transport.close()
    return Result(
        requests=len(latencies),
        seconds=seconds,
        latencies=latencies,
        faults=faults,
        client_cpu_seconds=cpu,
    )


async def warm(port: int, bodies: list[bytes], *, concurrency: int, path: str) -> None:
    """Send each distinct body once (split over ``concurrency`` connections), so a load
    measured next finds every answer it reuses already built, as a timed warm-up with
    random picks does not guarantee (it left a quarter of the XenAPI records cold)."""
    requests = [http_post("127.0.0.1", port, body, path=path) for body in dict.fromkeys(bodies)]
    loop = asyncio.get_running_loop()

    async def send(share: list[bytes]) -> None:
        _, connection = await loop.create_connection(_Connection, "127.0.0.1", port)
        for request in share:
            status, _ = await connection.call(request)
            assert status.startswith(b"HTTP/1.1 200 "), status
        assert connection.transport is not None
        connection.transport.close()

    await asyncio.gather(*(send(requests[i::concurrency]) for i in range(concurrency)))


def http_get(host: str, port: int, path: str, *, authorization: str) -> bytes:
    """A complete HTTP/1.1 GET (BDOM's reads), built once and reused."""
    head = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: {authorization}\r\n\r\n"
    return head.encode("ascii")


BDOM_WORDS = ["SUCCESS", "PENDING_INT", "PENDING_EXT", "FAILED_INT", "FAILED_EXT"]


def bdom_list_paths(size: int) -> list[str]:
    """BDOM status lists with every filter, alone and combined (the newest 1,000 matches
    of a broad filter, a single task for a domain, a domain in a state)."""
    paths = ["/bdom/task/status/-/-/-/-/bench/", "/bdom/task/status/-/-/domain/-/bench/"]
    for i in range(40):
        rnd = random.Random(i)
        name = f"example-{rnd.randrange(1, size + 1)}.org"
        word = rnd.choice(BDOM_WORDS)
        paths += [
            f"/bdom/task/status/-/{word}/-/-/bench/",
            f"/bdom/task/status/-/-/domain/{name}/bench/",
            f"/bdom/task/status/-/{word}/domain/{name}/bench/",
            f"/bdom/task/status/-/{word}/domain/-/bench/",
        ]
    return paths


def list_bodies(session: str) -> list[bytes]:
    """operation_list calls with every filter Gandi offers, alone and combined."""
    filters: list[dict[str, Any]] = [{}]
    for i in range(40):
        rnd = random.Random(i)
        start = T0 + datetime.timedelta(seconds=rnd.randrange(SPAN_SECONDS))
        window = {
            "updated_after": xmlrpc.client.DateTime(start),
            "updated_before": xmlrpc.client.DateTime(start + datetime.timedelta(days=2)),
        }
        filters += [
            {"state": rnd.choice(["RUN", "WAIT", "DONE", "ERROR", "CANCEL"])},
            {"type": rnd.choice(TYPES)},
            window,
            {**window, "state": "DONE", "type": rnd.choice(TYPES)},
            {"state": "ERROR", "type": rnd.choice(TYPES)},
        ]
    return [xmlrpc.client.dumps((session, f), "operation_list").encode() for f in filters]


def cloudstack_requests(port: int, size: int, *, as_json: bool) -> list[bytes]:
    """Signed ``queryAsyncJobResult`` GETs (signatureVersion 3, as ``cs`` sends them) for
    random job ids, built once: the gateway checks each signature on every call."""
    key_hash = auth.hash_key(KEY)
    secret = cloudstack.secret_key(master=CLOUDSTACK_KEY.value, key_hash=key_hash)
    rnd = random.Random(7)
    out = []
    for _ in range(2000):
        params = {
            "command": "queryAsyncJobResult",
            "jobid": str(rnd.randrange(1, size + 1)),
            "apiKey": cloudstack.api_key(key_hash),
            "signatureVersion": "3",
            "expires": "2999-01-01T00:00:00+0000",
            **({"response": "json"} if as_json else {}),
        }
        signature = cloudstack.sign(list(params.items()), secret=secret)
        query = urllib.parse.urlencode({**params, "signature": signature})
        out.append(
            f"GET /client/api?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode("ascii")
        )
    return out


class Gateways:
    """The gateway process(es) under test, each answering on its own pipe."""

    def __init__(self, *, size: int, kubeconfig: str | None, workdir: str, workers: int) -> None:
        self._reserved = None
        port = 0
        if workers > 1:
            self._reserved = server.reserve_port(host="127.0.0.1", port=0)
            port = self._reserved.getsockname()[1]
            os.environ[server.MULTIPROC_DIR] = os.path.join(workdir, "metrics")
            os.mkdir(os.environ[server.MULTIPROC_DIR])
        settings = server.Settings(
            port=port,
            workers=workers,
            call_log_path=os.path.join(workdir, "calllog.sqlite3"),
            # The event.from load: every waiter is one tenant's, one process's.
            xenapi=xenapi.Settings(
                events=xenevents.Settings(max_waiters_per_tenant=EVENT_WAITERS_MAX)
            ),
        )
        ctx = multiprocessing.get_context("spawn")
        self._pipes = []
        self._processes = []
        for _ in range(workers):
            parent, child = ctx.Pipe()
            process = ctx.Process(
                target=gateway_process, args=(child, size, kubeconfig, workdir, settings)
            )
            process.start()
            self._pipes.append(parent)
            self._processes.append(process)

    async def _ask(self, message: str | None) -> list[Any]:
        loop = asyncio.get_running_loop()
        if message is not None:
            for pipe in self._pipes:
                pipe.send(message)
        answers = (loop.run_in_executor(None, pipe.recv) for pipe in self._pipes)
        return list(await asyncio.gather(*answers))

    async def started(self) -> dict[str, Any]:
        """The first worker's port, cache size and fill time (the slowest fill)."""
        infos = await self._ask(None)
        return {**infos[0], "fill_seconds": max(i["fill_seconds"] for i in infos)}

    async def ask_all(self, message: str) -> list[Any]:
        """One question to every worker (each applies an event.from touch to its cache, as
        each worker's own watch would)."""
        return await self._ask(message)

    async def cpu(self) -> float:
        """CPU seconds used so far, summed over the workers."""
        return float(sum(await self._ask("cpu")))

    async def stop(self) -> int:
        """Stop every worker; returns their peak RSS in bytes, summed."""
        peaks = await self._ask("stop")
        for process in self._processes:
            process.join(30)
        if self._reserved is not None:
            self._reserved.close()
            shutil.rmtree(os.environ.pop(server.MULTIPROC_DIR), ignore_errors=True)
        return sum(int(p["peak_rss_bytes"]) for p in peaks)


COMPARE_PAIRS = 4
"""Alternating details / get_record loads (each half the --duration) behind the ratio."""
EVENT_WAITERS_MAX = 10_000
"""The per-tenant event.from waiter bound in the benchmark (above ``--waiters``)."""
XEN_FAILURE = b"<string>Failure</string>"


def xen_body(method: str, *params: Any) -> bytes:
    return xmlrpc.client.dumps(params, method).encode()


async def bench_xenapi(
    gateways: Gateways,
    port: int,
    *,
    size: int,
    token: int,
    duration: float,
    concurrency: int,
    waiters: int,
    rounds: int,
    details: list[bytes],
) -> dict[str, Any]:
    """XenAPI: task.get_record loads alternating with Gandi details loads of the same
    length (the rate it is compared with: the machine is shared, so only adjacent loads
    compare), task.get_all by one client, event.from waiters."""
    proxy = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{port}/xenapi")
    login: Any = proxy.session.login_with_password("bench", KEY)
    assert login["Status"] == "Success", login
    session = login["Value"]
    rnd = random.Random(7)
    records = [
        xen_body(
            "task.get_record",
            session,
            f"OpaqueRef:{synthetic(rnd.randrange(1, size + 1))['metadata']['uid']}",
        )
        for _ in range(2000)
    ]
    await warm(port, records, concurrency=concurrency, path="/xenapi")
    await load(
        port, records, duration=2, concurrency=concurrency, path="/xenapi", failure=XEN_FAILURE
    )  # warm-up
    # Alternating short loads, details then get_record: the machine is shared, so a
    # drift during the run falls on both sides of each pair, and the median pair decides.
    adjacent_runs: list[Result] = []
    record_runs: list[Result] = []
    cpu = {"details": 0.0, "record": 0.0}
    for _ in range(COMPARE_PAIRS):
        cpu_before = await gateways.cpu()
        adjacent_runs.append(
            await load(port, details, duration=duration / 2, concurrency=concurrency)
        )
        cpu_between = await gateways.cpu()
        record_runs.append(
            await load(
                port,
                records,
                duration=duration / 2,
                concurrency=concurrency,
                path="/xenapi",
                failure=XEN_FAILURE,
            )
        )
        cpu["details"] += cpu_between - cpu_before
        cpu["record"] += await gateways.cpu() - cpu_between
    adjacent, record_result = Result.merged(adjacent_runs), Result.merged(record_runs)
    adjacent_cpu_us = cpu["details"] / adjacent.requests * 1e6
    record_cpu_us = cpu["record"] / record_result.requests * 1e6
    pair_ratios = [r.rate / d.rate for d, r in zip(adjacent_runs, record_runs, strict=True)]
    cpu_before = await gateways.cpu()
    all_result = await load(
        port,
        [xen_body("task.get_all", session)],
        duration=duration / 2,
        concurrency=1,
        path="/xenapi",
        failure=XEN_FAILURE,
    )
    all_cpu_us = (await gateways.cpu() - cpu_before) / all_result.requests * 1e6
    events = await bench_event_from(
        gateways, port, session=session, token=token, waiters=waiters, rounds=rounds
    )
    return {
        "get_record": {**record_result.summary(), "gateway_cpu_us_per_call": round(record_cpu_us)},
        "gandi_details_adjacent": {
            **adjacent.summary(),
            "gateway_cpu_us_per_call": round(adjacent_cpu_us),
        },
        # The target: at least the Gandi details rate, measured in alternation with it.
        "get_record_of_gandi_details": round(statistics.median(pair_ratios), 3),
        "get_record_of_gandi_details_pairs": [round(r, 3) for r in pair_ratios],
        "get_all": {**all_result.summary(), "gateway_cpu_us_per_call": round(all_cpu_us)},
        "event_from": events,
    }


async def _wait_event(connection: _Connection, request: bytes, arrived: list[float]) -> None:
    """One event.from call; its answer's arrival time goes to ``arrived``."""
    status, payload = await connection.call(request)
    arrived.append(time.monotonic())
    assert status.startswith(b"HTTP/1.1 200 "), status
    assert XEN_FAILURE not in payload, payload[:300]
    assert b"<name>ref</name>" in payload, payload[:300]


async def bench_event_from(
    gateways: Gateways, port: int, *, session: str, token: int, waiters: int, rounds: int
) -> dict[str, Any]:
    """``waiters`` connections wait in event.from; one change per round wakes them all."""
    loop = asyncio.get_running_loop()
    connections: list[_Connection] = []
    rss_before = sum(await gateways.ask_all("rss"))
    for _ in range(waiters):
        _, protocol = await loop.create_connection(_Connection, "127.0.0.1", port)
        connections.append(protocol)
    delays: list[float] = []
    rss_waiting = 0
    for _ in range(rounds):
        body = xen_body("event.from", session, ["task"], str(token), 60.0)
        request = http_post("127.0.0.1", port, body, path="/xenapi")
        arrived: list[float] = []

        calls = [asyncio.create_task(_wait_event(c, request, arrived)) for c in connections]
        deadline = time.monotonic() + 60
        while sum(await gateways.ask_all("waiting")) < waiters:  # a condition, not a nap
            assert time.monotonic() < deadline, "the waiters did not all arrive"
        rss_waiting = max(rss_waiting, sum(await gateways.ask_all("rss")))
        # Every worker gets the change (with --workers N the waiters are spread over them
        # by SO_REUSEPORT); delays count from the earliest worker's change.
        touches = await gateways.ask_all("touch")
        await asyncio.gather(*calls)
        delays += [t - min(x["at"] for x in touches) for t in arrived]
        token = touches[0]["token"]
    for connection in connections:
        assert connection.transport is not None
        connection.transport.close()
    delays.sort()
    q = statistics.quantiles(delays, n=100)
    return {
        "waiters": waiters,
        "rounds": rounds,
        "delay_p50_ms": round(q[49] * 1000, 1),
        "delay_p99_ms": round(q[98] * 1000, 1),
        "delay_max_ms": round(delays[-1] * 1000, 1),
        "rss_before_mib": round(rss_before / 2**20, 1),
        "rss_waiting_mib": round(rss_waiting / 2**20, 1),
        "kib_per_waiter": round((rss_waiting - rss_before) / waiters / 1024, 1),
    }


async def bench_size(
    size: int,
    *,
    duration: float,
    concurrency: int,
    list_concurrency: int,
    kubeconfig: str | None,
    workers: int,
    waiters: int = 1000,
    rounds: int = 3,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir:
        gateways = Gateways(size=size, kubeconfig=kubeconfig, workdir=workdir, workers=workers)
        info = await gateways.started()
        port = info["port"]
        session = str(xmlrpc.client.ServerProxy(f"http://127.0.0.1:{port}/xmlrpc").login(KEY))
        rnd = random.Random(42)
        details = [
            xmlrpc.client.dumps((session, rnd.randrange(1, size + 1)), "operation_details").encode()
            for _ in range(2000)
        ]

        await load(port, details, duration=2, concurrency=concurrency)  # warm-up
        cpu_before = await gateways.cpu()
        details_result = await load(port, details, duration=duration, concurrency=concurrency)
        details_cpu_us = (await gateways.cpu() - cpu_before) / details_result.requests * 1e6
        http_only = await baseline(duration=duration, concurrency=concurrency)
        # gocept's read: query by id, authenticated per call with Basic auth.
        queries = [
            xmlrpc.client.dumps(("operation", {"id": rnd.randrange(1, size + 1)}), "query").encode()
            for _ in range(2000)
        ]
        basic = "Basic " + base64.b64encode(f"bench:{KEY}".encode()).decode("ascii")
        cpu_before = await gateways.cpu()
        query_result = await load(
            port, queries, duration=duration, concurrency=concurrency, authorization=basic
        )
        query_cpu_us = (await gateways.cpu() - cpu_before) / query_result.requests * 1e6
        cpu_before = await gateways.cpu()
        list_result = await load(
            port, list_bodies(session), duration=duration, concurrency=list_concurrency
        )
        list_cpu_us = (await gateways.cpu() - cpu_before) / list_result.requests * 1e6
        list_serial = await load(port, list_bodies(session), duration=duration / 2, concurrency=1)
        # BDOM: single-task status (as Gandi details) and filtered lists (as operation_list).
        statuses = [
            http_get(
                "127.0.0.1",
                port,
                f"/bdom/task/status/{rnd.randrange(1, size + 1)}/-/-/-/bench/",
                authorization=basic,
            )
            for _ in range(2000)
        ]
        cpu_before = await gateways.cpu()
        bdom_status = await load(
            port, [], duration=duration, concurrency=concurrency, prepared=statuses
        )
        bdom_status_cpu_us = (await gateways.cpu() - cpu_before) / bdom_status.requests * 1e6
        bdom_lists = [
            http_get("127.0.0.1", port, path, authorization=basic) for path in bdom_list_paths(size)
        ]
        cpu_before = await gateways.cpu()
        bdom_list = await load(
            port, [], duration=duration, concurrency=list_concurrency, prepared=bdom_lists
        )
        bdom_list_cpu_us = (await gateways.cpu() - cpu_before) / bdom_list.requests * 1e6
        # CloudStack's poll: queryAsyncJobResult, signature checked on every call.
        cloudstack_runs: dict[str, dict[str, Any]] = {}
        for form in ("json", "xml"):
            signed = cloudstack_requests(port, size, as_json=form == "json")
            cpu_before = await gateways.cpu()
            polled = await load(
                port, [], duration=duration, concurrency=concurrency, prepared=signed
            )
            cpu_us = (await gateways.cpu() - cpu_before) / polled.requests * 1e6
            cloudstack_runs[form] = {
                **polled.summary(),
                "gateway_cpu_us_per_call": round(cpu_us),
                "of_gandi_details": round(polled.rate / details_result.rate, 3),
            }
        xen = await bench_xenapi(
            gateways,
            port,
            size=size,
            token=info["token"],
            duration=duration,
            concurrency=concurrency,
            waiters=waiters,
            rounds=rounds,
            details=details,
        )
        rss = await gateways.stop()
    return {
        "operations": size,
        "workers": workers,
        "cached": info["cached"],
        "fill": "apiserver" if kubeconfig else "direct",
        "fill_seconds": round(info["fill_seconds"], 2),
        "concurrency": concurrency,
        "list_concurrency": list_concurrency,
        "details": {**details_result.summary(), "gateway_cpu_us_per_call": round(details_cpu_us)},
        "gocept_query": {
            **query_result.summary(),
            "gateway_cpu_us_per_call": round(query_cpu_us),
        },
        # Each dialect's read rate as a fraction of HTTP alone, measured in the same run:
        # the figure to compare across machines and runs.
        "of_http_only": {
            "gandi_details": round(details_result.rate / http_only["req_per_s"], 3),
            "gocept_query": round(query_result.rate / http_only["req_per_s"], 3),
        },
        "cloudstack_query": cloudstack_runs,
        "list": {**list_result.summary(), "gateway_cpu_us_per_call": round(list_cpu_us)},
        "xenapi": xen,
        "list_one_client": list_serial.summary(),
        "bdom_status": {
            **bdom_status.summary(),
            "gateway_cpu_us_per_call": round(bdom_status_cpu_us),
        },
        "bdom_list": {**bdom_list.summary(), "gateway_cpu_us_per_call": round(bdom_list_cpu_us)},
        # Targets: at least Gandi's details rate and no worse than its list p99, same run.
        "bdom_vs_gandi": {
            "status_rate": round(bdom_status.rate / details_result.rate, 3),
            "list_p99": round(
                bdom_list.summary()["p99_ms"] / max(list_result.summary()["p99_ms"], 1e-3), 3
            ),
        },
        "peak_rss_mib": round(rss / 2**20, 1),
        "http_only": http_only,
    }


async def create_operations(kubeconfig: str, size: int) -> float:
    """Create ``size`` synthetic Operations through the API server; returns seconds."""
    started = time.perf_counter()
    async with kube.Client(kube.Credentials.from_kubeconfig(kubeconfig)) as client:
        await common.ensure_namespace(client, NAMESPACE)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(1, size + 1):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                obj = synthetic(queue.get_nowait())
                status = obj.pop("status")
                for server_owned in ("uid", "resourceVersion", "creationTimestamp"):
                    del obj["metadata"][server_owned]
                created = await client.create(kube.OPERATIONS, obj, namespace=NAMESPACE)
                await client.patch(
                    kube.OPERATIONS,
                    name=created["metadata"]["name"],
                    namespace=NAMESPACE,
                    body={"status": status},
                    subresource="status",
                )

        await asyncio.gather(*(worker() for _ in range(32)))
    return time.perf_counter() - started


def machine() -> dict[str, Any]:
    return {
        "cpu": common.cpu_model(),
        "cpus": os.cpu_count(),
        "memory_mib": common.memory_kib() // 1024,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "aiohttp": aiohttp.__version__,
        "load_average_at_end": os.getloadavg(),
    }


def table(report: dict[str, Any]) -> list[str]:
    """One report's runs as a markdown table (earlier reports lack the client column)."""
    lines = [
        "| operations | gateway workers | cache fill | details clients | details req/s"
        " | details p50 ms | details p99 ms | list clients | list req/s | list p50 ms | list p99 ms"
        " | list p99 ms (1 client) | gateway CPU µs per details / list call"
        " | load generator CPU µs per details / list call | peak RSS MiB"
        " | HTTP-only req/s (server CPU µs per call)"
        " | gocept query req/s (gateway CPU µs per call)"
        " | of HTTP-only: Gandi details / gocept query |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        d, li, l1 = r["details"], r["list"], r["list_one_client"]
        client = (
            f"{d['client_cpu_us_per_call']} / {li['client_cpu_us_per_call']}"
            if "client_cpu_us_per_call" in d
            else "not measured"
        )
        lines.append(
            f"| {r['operations']:,} | {r.get('workers', 1)}"
            f" | {r['fill']} ({r['fill_seconds']} s) | {r['concurrency']}"
            f" | {d['req_per_s']:,} | {d['p50_ms']} | {d['p99_ms']} | {r['list_concurrency']}"
            f" | {li['req_per_s']:,}"
            f" | {li['p50_ms']} | {li['p99_ms']} | {l1['p99_ms']}"
            f" | {d['gateway_cpu_us_per_call']} / {li['gateway_cpu_us_per_call']} | {client}"
            f" | {r['peak_rss_mib']}"
            f" | {r['http_only']['req_per_s']:,} ({r['http_only']['server_cpu_us_per_call']})"
            f" | {_query_column(r)} | {_ratio_column(r)} |"
        )
    return lines


def bdom_table(report: dict[str, Any]) -> list[str]:
    """BDOM's reads against Gandi's of the same run (empty for runs before BDOM)."""
    runs = [r for r in report["runs"] if "bdom_status" in r]
    if not runs:
        return []
    lines = [
        "| operations | BDOM status req/s (p99 ms) | Gandi details req/s | status / details"
        " | BDOM list req/s (p99 ms) | Gandi list p99 ms | list p99 BDOM / Gandi"
        " | gateway CPU µs per BDOM status / list call |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        s, li, ratio = r["bdom_status"], r["bdom_list"], r["bdom_vs_gandi"]
        lines.append(
            f"| {r['operations']:,} | {s['req_per_s']:,} ({s['p99_ms']})"
            f" | {r['details']['req_per_s']:,} | {ratio['status_rate']:.2f}"
            f" | {li['req_per_s']:,} ({li['p99_ms']}) | {r['list']['p99_ms']}"
            f" | {ratio['list_p99']:.2f}"
            f" | {s['gateway_cpu_us_per_call']} / {li['gateway_cpu_us_per_call']} |"
        )
    return [*lines, ""]


def xenapi_table(report: dict[str, Any]) -> list[str]:
    """The XenAPI figures of a report's runs (none for runs from before the dialect)."""
    runs = [r for r in report["runs"] if "xenapi" in r]
    if not runs:
        return []
    lines = [
        "| operations | task.get_record req/s | p50 ms | p99 ms | gateway CPU µs per call"
        " | of Gandi details (median of alternating pairs)"
        " | task.get_all req/s (1 client) | p99 ms | gateway CPU µs per call"
        " | event.from waiters | delay p50 / p99 / max ms | RSS before / waiting MiB"
        " | KiB per waiter |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        x = r["xenapi"]
        g, a, e = x["get_record"], x["get_all"], x["event_from"]
        lines.append(
            f"| {r['operations']:,} | {g['req_per_s']:,} | {g['p50_ms']} | {g['p99_ms']}"
            f" | {g['gateway_cpu_us_per_call']} | {x['get_record_of_gandi_details']:.2f}"
            f" | {a['req_per_s']:,} | {a['p99_ms']} | {a['gateway_cpu_us_per_call']:,}"
            f" | {e['waiters']:,} ({e['rounds']} rounds)"
            f" | {e['delay_p50_ms']} / {e['delay_p99_ms']} / {e['delay_max_ms']}"
            f" | {e['rss_before_mib']} / {e['rss_waiting_mib']} | {e['kib_per_waiter']} |"
        )
    return lines


def _query_column(run: dict[str, Any]) -> str:
    query = run.get("gocept_query")
    if query is None:
        return "not measured"
    return f"{query['req_per_s']:,} ({query['gateway_cpu_us_per_call']})"


def _ratio_column(run: dict[str, Any]) -> str:
    ratios = run.get("of_http_only")
    if ratios is None:  # earlier runs: derived from the same run's figures
        return f"{run['details']['req_per_s'] / run['http_only']['req_per_s']:.2f} / -"
    return f"{ratios['gandi_details']:.2f} / {ratios['gocept_query']:.2f}"


def cloudstack_table(report: dict[str, Any]) -> list[str]:
    """CloudStack queryAsyncJobResult of each run (runs before it have none)."""
    runs = [r for r in report["runs"] if "cloudstack_query" in r]
    if not runs:
        return []
    lines = [
        "CloudStack `queryAsyncJobResult` (signed GETs, `signatureVersion=3`, the signature"
        " checked on every call; same clients as details):",
        "",
        "| operations | answer | req/s | p50 ms | p99 ms | gateway CPU µs per call"
        " | of Gandi details req/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        for form, q in r["cloudstack_query"].items():
            lines.append(
                f"| {r['operations']:,} | {form.upper()} | {q['req_per_s']:,} | {q['p50_ms']}"
                f" | {q['p99_ms']} | {q['gateway_cpu_us_per_call']} | {q['of_gandi_details']:.2f} |"
            )
    return [*lines, ""]


def heading(report: dict[str, Any]) -> str:
    m = report["machine"]
    return (
        f"Run {report['when']} on {m['cpu']} ({m['cpus']} CPUs, {m['memory_mib']} MiB),"
        f" Python {m['python']}, {m['platform']}; load average at the end"
        f" {', '.join(f'{x:.1f}' for x in m['load_average_at_end'])}."
    )


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Gateway benchmark",
        "",
        heading(report),
        "",
        "Gateway in its own process(es); load generator in another process on the same"
        " machine (they share the CPUs), loopback HTTP keep-alive, real XML-RPC bodies. Every"
        " call is also written to the SQLite call log. With several gateway workers, their"
        " CPU per call and peak RSS are summed.",
        "",
        *table(report),
        "",
        *bdom_table(report),
        *cloudstack_table(report),
        *xenapi_table(report),
        "",
        *report["notes"],
    ]
    if report.get("history"):
        lines += ["", "## Earlier runs"]
        for earlier in report["history"]:
            lines += ["", f"### {earlier['when']}", "", heading(earlier), "", *table(earlier)]
            lines += ["", *earlier["notes"]]
    return "\n".join([*lines, ""])


def history(out: str, name: str) -> list[dict[str, Any]]:
    """The reports already in <out>/<name>.json, newest first (empty if none)."""
    path = pathlib.Path(out) / f"{name}.json"
    if not path.exists():
        return []
    previous: dict[str, Any] = json.loads(path.read_text())
    earlier = previous.pop("history", [])
    return [previous, *earlier]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--fill", choices=("direct", "apiserver"), default="direct")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32, help="details clients")
    parser.add_argument("--list-concurrency", type=int, default=4, help="list clients")
    parser.add_argument("--workers", type=int, default=1, help="gateway processes sharing the port")
    parser.add_argument("--waiters", type=int, default=1000, help="XenAPI event.from clients")
    common.add_output_arguments(parser, name="gateway")
    parser.add_argument(
        "--note",
        action="append",
        default=[],
        help="a line under the table, e.g. what changed since the previous run (repeatable)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per size (every run is reported: the machine may be shared)",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    knobs: dict[str, Any] = {
        "duration": args.duration,
        "concurrency": args.concurrency,
        "list_concurrency": args.list_concurrency,
        "workers": args.workers,
        "waiters": args.waiters,
    }
    notes: list[str] = []
    runs = []
    for size in sizes:
        if args.fill == "apiserver":
            from opkeeper import localcluster

            with (
                tempfile.TemporaryDirectory() as state,
                localcluster.started(pathlib.Path(state)) as cluster,
            ):
                seconds = asyncio.run(create_operations(str(cluster.kubeconfig), size))
                notes.append(
                    f"- {size:,} Operations created through the API server (create +"
                    f" status patch each) in {seconds:.0f} s."
                )
                for _ in range(args.repeat):
                    runs.append(
                        asyncio.run(bench_size(size, kubeconfig=str(cluster.kubeconfig), **knobs))
                    )
                    print(json.dumps(runs[-1]), flush=True)
        else:
            for _ in range(args.repeat):
                runs.append(asyncio.run(bench_size(size, kubeconfig=None, **knobs)))
                print(json.dumps(runs[-1]), flush=True)
    if args.fill == "direct":
        notes.append(
            "- Cache filled directly in each gateway process (the same `reset` a watch"
            " SYNC performs), not through the API server."
        )
    notes.append(
        "- HTTP-only: an aiohttp handler that returns a fixed answer (no XML-RPC, no cache,"
        " no call log), driven the same way right after the details load: the ceiling of"
        " HTTP alone on this machine at that moment (other jobs share the CPUs)."
    )
    notes.append(
        "- Load generator CPU: this process's CPU time during a load divided by its calls"
        " (raw asyncio HTTP/1.1 connections; see the script's docstring)."
    )
    report = {
        "when": common.now(),
        "machine": machine(),
        "targets": {"details_req_per_s": 3000, "list_p99_ms_at_100k": 20},
        "runs": runs,
        "notes": [*notes, *(f"- {note}" for note in args.note)],
        "history": history(args.out, args.name),
    }
    common.write_results(args.out, args.name, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
