"""The gateway's HTTP server: POST /xmlrpc, /healthz, /readyz and /metrics.

This layer owns what HTTP owns: reading a body without trusting its
Content-Length (it stops at the limit and answers with a fault instead of
buffering whatever arrives), a read deadline against slow senders, the
peer address, and metrics by dialect, method and outcome. XML-RPC clients
expect HTTP 200 with a fault for every error, so that is what every
/xmlrpc answer is; only a request that is not a POST gets a plain 405.
:class:`Connections` bounds the connections themselves: how many are open,
how long a new one may take to send its first request, how long an idle one
is kept; a stop cancels what is still running after ``shutdown_timeout_seconds``.

:class:`Gateway` wires the parts together and runs the list+watch feeds of
Operations, ScheduledTasks and API-key Secrets plus the call log's daily
purge. /readyz turns 200 once every feed has delivered its first complete
list.

:func:`serve` with ``workers`` above one runs that many gateway processes on
one port (``SO_REUSEPORT``: the kernel spreads connections over them) under
a parent that only starts, watches and stops them; a process is what it
takes to use more than one core, since the gateway is CPU-bound in Python.
Each worker runs its own feeds and cache. What they share goes through the
API server (ids, the session key) or the call log file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

import prometheus_client
import prometheus_client.core
import prometheus_client.multiprocess
import prometheus_client.registry
from aiohttp import web

from opkeeper import ids, keys, kube, logs
from opkeeper.gateway import (
    aggregated,
    auth,
    cache,
    calllog,
    calllogs,
    dialects,
    faults,
    kubeio,
    revocations,
    rpc,
    service,
    xenevents,
    xmlrpc,
)
from opkeeper.gateway.dialects import bdom, cloudstack, xenapi

log = logging.getLogger(__name__)

XML = "text/xml"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything ``opkeeper gateway`` can be told."""

    host: str = "127.0.0.1"
    """Address to listen on (default loopback; a Pod sets its own address or 0.0.0.0)."""
    port: int = 8480
    """TCP port (default 8480)."""
    call_log_path: str = "opkeeper-calllog.sqlite3"
    """The call log: a SQLite file (on a persistent volume in a cluster), or a
    ``postgresql://`` DSN shared by several replicas (:mod:`.calllogs`)."""
    system_namespace: str = "opkeeper-system"
    """Where the id counter lives (shared with the controller)."""
    keyring: auth.KeyRingSettings = dataclasses.field(default_factory=auth.KeyRingSettings)
    sessions: auth.SessionSettings = dataclasses.field(default_factory=auth.SessionSettings)
    service: service.Settings = dataclasses.field(default_factory=service.Settings)
    limits: xmlrpc.Limits = xmlrpc.DEFAULT_LIMITS
    cloudstack: cloudstack.Settings = dataclasses.field(default_factory=cloudstack.Settings)
    """The CloudStack dialect's async commands (command -> Operation type) and limits."""
    read_timeout_seconds: float = 10.0
    """Longest time a request body may take to arrive (default 10 s), so a client that
    trickles bytes cannot hold a connection and a buffer forever."""
    header_timeout_seconds: float = 10.0
    """Longest time a new connection may take to deliver its first request line and
    headers (default 10 s); a connection that sends nothing, or trickles its headers,
    is closed then. Later requests on a kept-alive connection are bounded by
    ``keepalive_timeout_seconds`` instead."""
    keepalive_timeout_seconds: float = 15.0
    """How long a connection is kept open after a response while no complete next
    request arrives (default 15 s; aiohttp's own default is an hour). aiohttp cannot
    tell an idle connection from one trickling its next headers, so this bounds both.
    A load balancer in front should time idle connections out earlier than this."""
    max_connections: int = 1024
    """Connections open at once per process (default 1024); a connection beyond it is
    closed as soon as it is accepted, so a flood of connections runs into this limit
    rather than into the file descriptor limit or memory."""
    shutdown_timeout_seconds: float = 5.0
    """On SIGTERM or SIGINT, how long requests in flight may take to finish before they
    are cancelled (default 5 s; aiohttp's default is 60 s); aiohttp then gives the
    cancelled handlers as long again. Idle connections are closed at once."""
    lingering_seconds: float = 2.0
    """After answering a request whose body was not read to the end (too large), how
    long the rest is read and dropped before the connection closes (default 2 s;
    aiohttp's 10 s): long enough for the client to read the fault, short enough that
    abandoned uploads do not hold connections."""
    purge_interval_seconds: float = 3600.0
    """How often entries older than the 30-day retention are deleted (default hourly)."""
    id_block_size: int = 100
    """Ids reserved per counter write (default 100); see :mod:`opkeeper.ids`."""
    workers: int = 1
    """Gateway processes sharing the port (default 1); above one, each binds it with
    ``SO_REUSEPORT`` and keeps its own watches and cache (N watches, N times the
    cache memory)."""
    xenapi: xenapi.Settings = dataclasses.field(default_factory=xenapi.Settings)
    """The XenAPI dialect's bounds (event.from waiters, logged-out sessions kept)."""
    aggregated: aggregated.Settings | None = None
    """The aggregated API's TLS listener (:mod:`opkeeper.gateway.aggregated`); None
    (the default) serves no aggregated API."""


MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
"""The environment variable that switches prometheus_client to multiprocess mode."""


class Metrics:
    """The gateway's Prometheus metrics, in registries of their own (one set per server).

    Counters and histograms are summed over every worker: under ``--workers``
    the parent sets :data:`MULTIPROC_DIR` before the workers import
    prometheus_client, each worker's values go to files there, and a scrape of
    any worker merges them. The cache sizes are read from the answering worker
    at scrape time instead: every worker caches the same objects, so one
    worker's count is the answer and a sum would be N times it.
    """

    def __init__(self, *, cached: Callable[[], Mapping[str, int]]) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        self.requests = prometheus_client.Counter(
            "opkeeper_gateway_requests",
            "XML-RPC calls by dialect, method and outcome (ok or the fault name).",
            ["dialect", "method", "outcome"],
            registry=self.registry,
        )
        self.latency = prometheus_client.Histogram(
            "opkeeper_gateway_request_seconds",
            "Time from the first body byte to the encoded answer.",
            ["dialect", "method"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.call_log_failures = prometheus_client.Counter(
            "opkeeper_gateway_calllog_failures",
            "Calls answered although their call log entry could not be stored.",
            registry=self.registry,
        )
        self.writes_not_visible = prometheus_client.Counter(
            "opkeeper_gateway_writes_not_visible",
            "Writes answered as done before the next read could see them (the watch or the"
            " controller took longer than write_visible_timeout_seconds).",
            ["write"],
            registry=self.registry,
        )
        summed = self.registry
        shared = os.environ.get(MULTIPROC_DIR)
        if shared:
            summed = prometheus_client.CollectorRegistry()
            prometheus_client.multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
                summed, path=shared
            )
        local = prometheus_client.CollectorRegistry()
        local.register(_CacheSizes(cached))
        self._exposed = (summed, local)
        # The labelled children, looked up once: ``labels()`` validates and hashes its
        # arguments under a lock on every call. The label sets are bounded (methods are a
        # fixed table, outcomes the fault names), so these stay small.
        self._counted: dict[tuple[str, str, str], prometheus_client.Counter] = {}
        self._timed: dict[tuple[str, str], prometheus_client.Histogram] = {}

    def exposition(self) -> bytes:
        """The text a scrape of /metrics gets."""
        return b"".join(prometheus_client.generate_latest(r) for r in self._exposed)

    def record(self, *, dialect: str, method: str, outcome: str, seconds: float) -> None:
        """Count one XML-RPC call and observe its latency."""
        counter = self._counted.get((dialect, method, outcome))
        if counter is None:
            counter = self._counted[(dialect, method, outcome)] = self.requests.labels(
                dialect, method, outcome
            )
        counter.inc()
        histogram = self._timed.get((dialect, method))
        if histogram is None:
            histogram = self._timed[(dialect, method)] = self.latency.labels(dialect, method)
        histogram.observe(seconds)


class _CacheSizes(prometheus_client.registry.Collector):
    """``opkeeper_gateway_cached_objects``, counted when scraped."""

    def __init__(self, cached: Callable[[], Mapping[str, int]]) -> None:
        self._cached = cached

    def collect(self) -> Iterable[prometheus_client.Metric]:
        family = prometheus_client.core.GaugeMetricFamily(
            "opkeeper_gateway_cached_objects", "Objects in the watch-fed caches.", labels=["kind"]
        )
        for kind, count in self._cached().items():
            family.add_metric([kind], count)
        yield family


class Gateway:
    """The running gateway: caches, feeds, service, dispatcher, HTTP app."""

    def __init__(
        self,
        *,
        settings: Settings,
        kube_client: kube.Client,
        call_log: calllog.CallLog,
        id_allocator: service.Ids | None = None,
        id_seal: service.Seal | None = None,
        session_key: auth.SigningKey | None = None,
        cloudstack_key: auth.SigningKey | None = None,
    ) -> None:
        self.settings = settings
        self.connections = Connections(settings=settings)
        self.kube = kube_client
        self.operations = cache.OperationCache()
        self.tasks = cache.TaskCache()
        self.keyring = auth.KeyRing(settings=settings.keyring)
        self.sessions = auth.Sessions(
            keyring=self.keyring,
            settings=settings.sessions,
            signing_key=session_key
            or keys.KeyedSecret(
                kube_client, namespace=settings.system_namespace, name=auth.SESSION_KEY_SECRET
            ),
        )
        self.call_log = call_log
        self.metrics = Metrics(
            cached=lambda: {"operation": len(self.operations), "scheduledtask": len(self.tasks)}
        )
        self.service = service.Service(
            operations=self.operations,
            tasks=self.tasks,
            kube_client=kubeio.Upstream(kube_client),
            dry_run=kubeio.DryRun(kube_client),
            id_allocator=id_allocator
            or ids.IdAllocator(
                kube_client,
                namespace=settings.system_namespace,
                block_size=settings.id_block_size,
            ),
            id_seal=id_seal or ids.IdSeal(kube_client, namespace=settings.system_namespace),
            call_log=call_log,
            settings=settings.service,
            on_write_not_visible=lambda write: self.metrics.writes_not_visible.labels(write).inc(),
        )
        self.dispatcher = rpc.Dispatcher(
            svc=self.service,
            sessions=self.sessions,
            keyring=self.keyring,
            methods=dialects.xmlrpc_methods(),
            limits=settings.limits,
            on_log_failure=self.metrics.call_log_failures.inc,
        )
        self.cloudstack = cloudstack.Api(
            svc=self.service,
            keyring=self.keyring,
            master_key=cloudstack_key
            or keys.KeyedSecret(
                kube_client, namespace=settings.system_namespace, name=cloudstack.MASTER_KEY_SECRET
            ),
            settings=settings.cloudstack,
            on_log_failure=self.metrics.call_log_failures.inc,
        )
        self.bdom = bdom.Endpoint(
            svc=self.service,
            keyring=self.keyring,
            on_log_failure=self.metrics.call_log_failures.inc,
        )
        self.revocations = revocations.Revocations(
            kube_client=kubeio.Upstream(kube_client),
            namespace=settings.keyring.namespace or settings.system_namespace,
            settings=settings.xenapi.revocations,
        )
        self.task_feed = xenevents.TaskFeed(
            operations=self.operations, settings=settings.xenapi.events
        )
        self.xenapi_endpoint = xenapi.Endpoint(
            svc=self.service,
            sessions=self.sessions,
            keyring=self.keyring,
            revoked=self.revocations,
            feed=self.task_feed,
            settings=settings.xenapi,
            limits=settings.limits,
            on_log_failure=self.metrics.call_log_failures.inc,
        )
        self.synced = {name: asyncio.Event() for name in ("operations", "scheduledtasks", "keys")}
        self.synced["revocations"] = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.aggregated = (
            None
            if settings.aggregated is None
            else aggregated.API(
                settings=settings.aggregated,
                dispatcher=self.dispatcher,
                kube_client=kube_client,
                read_body=self._read_body,
                finish=self._finish,
                ready=lambda: self.ready,
            )
        )
        self.aggregated_port = 0
        """The aggregated API's TLS port once it listens."""

    @property
    def ready(self) -> bool:
        return all(event.is_set() for event in self.synced.values())

    def start_feeds(self) -> None:
        """Start the list+watch feeds and the purge loop (call inside the event loop)."""
        feeds: dict[str, tuple[AsyncIterator[kube.WatchEvent], kubeio.Fed]] = {
            "operations": (self.kube.stream(kube.OPERATIONS), self.operations),
            "scheduledtasks": (self.kube.stream(kube.SCHEDULED_TASKS), self.tasks),
            "keys": (
                self.kube.stream(
                    kubeio.SECRETS,
                    namespace=self.settings.keyring.namespace,
                    label_selector=auth.LABEL,
                ),
                self.keyring,
            ),
            "revocations": (
                self.kube.stream(
                    kube.CONFIGMAPS,
                    namespace=self.revocations.namespace,
                    label_selector=revocations.LABEL,
                ),
                self.revocations,
            ),
        }
        for name, (stream, target) in feeds.items():
            self._spawn(f"feed-{name}", kubeio.feed(stream, into=target, synced=self.synced[name]))
        self._spawn("calllog-purge", self._purge_forever())

    def _spawn(self, name: str, coro: Any) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._crashed)
        self._tasks.append(task)

    @staticmethod
    def _crashed(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("gateway task %s died", task.get_name(), exc_info=task.exception())

    async def _purge_forever(self) -> None:
        while True:
            cutoff = datetime.datetime.now(datetime.UTC) - calllog.RETENTION
            try:
                removed = await self.call_log.purge(older_than=cutoff)
                log.info("call log purge removed %d entries", removed)
            except Exception:
                log.exception("call log purge failed; retrying at the next interval")
            await asyncio.sleep(self.settings.purge_interval_seconds)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    # --- HTTP handlers -----------------------------------------------------------

    async def xmlrpc(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        body_or_error = await self._read_body(request)
        if isinstance(body_or_error, Exception):
            fault, encoded = faults.XMLRPC.encode(body_or_error)
            outcome = rpc.Outcome(body=encoded, dialect="none", method="unknown", fault=fault)
        else:
            outcome = await self.dispatcher.handle(
                body=body_or_error,
                request=rpc.Request(
                    address=request.remote or "",
                    authorization=request.headers.get("Authorization"),
                    now=datetime.datetime.now(datetime.UTC),
                ),
            )
        return self._finish(
            web.Response(body=outcome.body, content_type=XML, charset="utf-8"),
            body=body_or_error,
            dialect=outcome.dialect,
            method=outcome.method,
            outcome="ok" if outcome.fault is None else outcome.fault.name,
            started=started,
        )

    def _finish(
        self,
        response: web.Response,
        *,
        body: bytes | Exception,
        dialect: str,
        method: str,
        outcome: str,
        started: float,
    ) -> web.Response:
        """Count and time the call; a body left unread (too large, too slow) means the
        connection cannot be reused."""
        self.metrics.record(
            dialect=dialect, method=method, outcome=outcome, seconds=time.perf_counter() - started
        )
        if isinstance(body, Exception):
            response.force_close()
        return response

    async def xenapi(self, request: web.Request) -> web.StreamResponse:
        """``POST /xenapi``: every answer, errors included, is HTTP 200 with the XenAPI
        envelope (:mod:`.dialects.xenapi`)."""
        started = time.perf_counter()
        body_or_error = await self._read_body(request)
        outcome = await self.xenapi_endpoint.handle(
            body=body_or_error,
            request=rpc.Request(
                address=request.remote or "",
                authorization=None,
                now=datetime.datetime.now(datetime.UTC),
            ),
        )
        return self._finish(
            web.Response(body=outcome.body, content_type=XML, charset="utf-8"),
            body=body_or_error,
            dialect=outcome.dialect,
            method=outcome.method,
            outcome="ok" if outcome.fault is None else outcome.fault.name,
            started=started,
        )

    async def cloudstack_api(self, request: web.Request) -> web.StreamResponse:
        """``/client/api``: the query string, and for a POST the form body (read within
        the same size limit and deadline as an XML-RPC body)."""
        started = time.perf_counter()
        body: bytes | Exception = b""
        if request.method == "POST":
            body = await self._read_body(request)
        answer = await self.cloudstack.handle(
            query=request.rel_url.raw_query_string,
            body=body,
            form=request.content_type == "application/x-www-form-urlencoded",
            address=request.remote or "",
            now=datetime.datetime.now(datetime.UTC),
        )
        return self._finish(
            web.Response(
                status=answer.status,
                body=answer.body,
                content_type=answer.content_type,
                charset="utf-8",
            ),
            body=body,
            dialect=cloudstack.DIALECT.value,
            method=answer.command,
            outcome=answer.outcome,
            started=started,
        )

    async def _read_body(
        self, request: web.Request, *, limit: int | None = None
    ) -> bytes | Exception:
        limit = self.settings.limits.max_body_bytes if limit is None else limit
        too_large = xmlrpc.BodyTooLarge(f"request body larger than {limit} bytes")
        if request.content_length is not None and request.content_length > limit:
            return too_large
        if request.content_length is not None and request.content.is_eof():
            # The usual case: a small call arrived with its headers. Nothing to wait for,
            # so no deadline timer either (a timer per call is measurable at this rate).
            return await request.read()
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.settings.read_timeout_seconds):
                async for chunk in request.content.iter_any():
                    size += len(chunk)
                    if size > limit:
                        return too_large
                    chunks.append(chunk)
        except TimeoutError:
            return xmlrpc.InvalidRequest(
                f"request body not received within {self.settings.read_timeout_seconds} s"
            )
        return b"".join(chunks)

    async def bdom_task(self, request: web.Request) -> web.StreamResponse:
        """``/bdom/task/...``: the BDOM REST dialect (:mod:`.dialects.bdom`)."""
        started = time.perf_counter()
        body: bytes | Exception = b""
        if request.method == "POST":
            body = await self._read_body(request, limit=self.bdom.limits.max_body_bytes)
        reply = await self.bdom.handle(
            bdom.Request(
                method=request.method,
                raw_path=request.raw_path,
                authorization=request.headers.get("Authorization"),
                body=body,
                now=datetime.datetime.now(datetime.UTC),
                address=request.remote or "",
            )
        )
        return self._finish(
            web.Response(
                status=reply.status,
                body=reply.body,
                content_type=bdom.CONTENT_TYPE,
                charset="utf-8",
                headers=reply.headers,
            ),
            body=body,
            dialect=bdom.DIALECT.value,
            method=reply.opcode,
            outcome=reply.outcome,
            started=started,
        )

    async def healthz(self, request: web.Request) -> web.Response:
        dead = [t.get_name() for t in self._tasks if t.done()]
        if dead:
            return web.Response(status=500, text=f"stopped: {', '.join(dead)}\n")
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        if not self.ready:
            waiting = [name for name, event in self.synced.items() if not event.is_set()]
            return web.Response(status=503, text=f"waiting for: {', '.join(waiting)}\n")
        return web.Response(text="ok\n")

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.exposition(),
            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST},
        )

    def app(self) -> web.Application:
        # aiohttp's own body limit stays above ours: _read_body enforces ours and answers
        # with a fault instead of aiohttp's plain 413.
        application = web.Application(
            client_max_size=self.settings.limits.max_body_bytes + 1,
            middlewares=[self.connections.middleware],
        )
        application.add_routes(
            [
                web.post("/xmlrpc", self.xmlrpc),
                # No HEAD: a CloudStack GET may create an operation, a HEAD never should.
                web.get("/client/api", self.cloudstack_api, allow_head=False),
                web.post("/client/api", self.cloudstack_api),
                # Any path under /bdom/, newlines included (a decoded %0A), so that every
                # malformed BDOM path gets the dialect's XML error, never aiohttp's 404.
                web.route("*", "/bdom/{tail:[\\s\\S]*}", self.bdom_task),
                web.post("/xenapi", self.xenapi),
                web.get("/healthz", self.healthz),
                web.get("/readyz", self.readyz),
                web.get("/metrics", self.prometheus),
            ]
        )
        return application


class Connections:
    """The bounds on one gateway process's connections.

    At most ``max_connections`` are open: a connection beyond that is closed as
    soon as it is accepted. A new connection must deliver its first request
    line and headers within ``header_timeout_seconds``, whether it sends nothing
    or trickles them: one timer per connection, armed when it opens and
    cancelled by :meth:`middleware` once aiohttp hands that request to the
    application. A kept-alive connection's later requests cost no timer (at
    about 2,000 calls/s per core a timer per call is measurable): after a
    response, aiohttp's keep-alive timer bounds the wait for the next request's
    headers, and :meth:`Gateway._read_body` bounds every body.

    aiohttp has no hook for either bound (a new connection that sends nothing is
    only closed by its keep-alive timer, and only since aiohttp 3.14.4), so
    :meth:`protocols` wraps aiohttp's protocol for each connection and
    :class:`_BoundedSite` listens with it.
    """

    def __init__(self, *, settings: Settings) -> None:
        self._limit = settings.max_connections
        self._header_timeout = settings.header_timeout_seconds
        self._first_request: dict[web.RequestHandler, asyncio.TimerHandle] = {}
        self._next_warning = 0.0
        self.open = 0
        """Connections accepted and not closed yet."""

    def protocols(self, server: web.Server) -> Callable[[], asyncio.BaseProtocol]:
        """The protocol factory for ``loop.create_server``: ``server``'s protocol for
        each accepted connection, within the bounds."""

        def accept() -> asyncio.BaseProtocol:
            if self.open >= self._limit:
                self._warn_full()
                return _Refused()
            # Counted here, not in connection_made: a burst of accepts creates several
            # protocols before the first connection_made runs.
            self.open += 1
            return _Bounded(server(), connections=self)

        return accept

    def opened(self, handler: web.RequestHandler) -> None:
        self._first_request[handler] = asyncio.get_running_loop().call_later(
            self._header_timeout, self._too_slow, handler
        )

    def closed(self, handler: web.RequestHandler) -> None:
        self.open -= 1
        timer = self._first_request.pop(handler, None)
        if timer is not None:
            timer.cancel()

    def _too_slow(self, handler: web.RequestHandler) -> None:
        del self._first_request[handler]
        handler.force_close()

    def _warn_full(self) -> None:
        # Once a minute at most: a flood would otherwise flood the log as well.
        now = time.monotonic()
        if now >= self._next_warning:
            self._next_warning = now + 60.0
            log.warning(
                "%d connections open, the most max_connections allows: closing new ones",
                self.open,
            )

    @web.middleware
    async def middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Ends the connection's first-request deadline: its headers are complete."""
        timer = self._first_request.pop(request.protocol, None)
        if timer is not None:
            timer.cancel()
        return await handler(request)


class _Bounded(asyncio.Protocol):
    """aiohttp's protocol for one connection, reporting its opening and closing to
    :class:`Connections`; everything else passes straight through."""

    __slots__ = ("_connections", "_handler")

    def __init__(self, handler: web.RequestHandler, *, connections: Connections) -> None:
        self._handler = handler
        self._connections = connections

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._connections.opened(self._handler)
        self._handler.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.closed(self._handler)
        self._handler.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._handler.data_received(data)

    def eof_received(self) -> None:
        self._handler.eof_received()  # returns None: the transport closes on EOF

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()


class _Refused(asyncio.Protocol):
    """A connection beyond ``max_connections``: closed as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _BoundedSite(web.BaseSite):
    """aiohttp's ``TCPSite``, listening with :meth:`Connections.protocols` (``TCPSite``
    hands ``loop.create_server`` the bare aiohttp server)."""

    __slots__ = ("_connections", "_host", "_port", "_reuse_port", "_ssl_context", "_web_server")

    def __init__(
        self,
        runner: web.AppRunner,
        *,
        host: str,
        port: int,
        reuse_port: bool,
        connections: Connections,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner)  # refuses a runner whose setup() has not run
        assert runner.server is not None
        self._web_server = runner.server
        self._host = host
        self._port = port
        self._reuse_port = reuse_port
        self._connections = connections
        self._ssl_context = ssl_context

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        scheme = "http" if self._ssl_context is None else "https"
        return f"{scheme}://{host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        # BaseSite.stop() closes self._server and runner.addresses reads its sockets.
        self._server = await asyncio.get_running_loop().create_server(
            self._connections.protocols(self._web_server),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_port=self._reuse_port,
            ssl=self._ssl_context,
        )


@contextlib.asynccontextmanager
async def running(
    *,
    settings: Settings,
    kube_client: kube.Client,
    call_log: calllog.CallLog | None = None,
    id_allocator: service.Ids | None = None,
    session_key: auth.SigningKey | None = None,
    feeds: bool = True,
    cloudstack_key: auth.SigningKey | None = None,
) -> AsyncIterator[tuple[Gateway, int]]:
    """Run a gateway until the block ends; yields it and the port it listens on.

    ``feeds=False`` leaves the caches to the caller (benchmarks fill them directly).
    """
    store = call_log
    own_store = store is None
    if store is None:
        store = await calllogs.open_store(location=settings.call_log_path)
    gateway = Gateway(
        settings=settings,
        kube_client=kube_client,
        call_log=store,
        id_allocator=id_allocator,
        session_key=session_key,
        cloudstack_key=cloudstack_key,
    )
    runner = web.AppRunner(
        gateway.app(),
        access_log=None,
        keepalive_timeout=settings.keepalive_timeout_seconds,
        shutdown_timeout=settings.shutdown_timeout_seconds,
        lingering_time=settings.lingering_seconds,
    )
    # Everything after this point is undone on the way out, also when the port is taken:
    # a gateway that cannot listen must not leave its feeds and call log behind.
    try:
        if feeds:
            gateway.start_feeds()
            if settings.workers > 1:
                # The kernel hands a shared port's connections to every worker bound to
                # it, ready or not, and no /readyz can steer them: a worker binds once its
                # caches and keys are synced, so none answers "unknown API key" meanwhile.
                await asyncio.gather(*(event.wait() for event in gateway.synced.values()))
        await runner.setup()
        site = _BoundedSite(
            runner,
            host=settings.host,
            port=settings.port,
            reuse_port=settings.workers > 1,
            connections=gateway.connections,
        )
        await site.start()
        port = _bound_port(runner)
        log.info("gateway listening on %s:%d", settings.host, port)
        async with _aggregated(gateway, settings=settings):
            yield gateway, port
    finally:
        await runner.cleanup()
        await gateway.stop()
        if own_store:
            await store.close()


@contextlib.asynccontextmanager
async def _aggregated(gateway: Gateway, *, settings: Settings) -> AsyncIterator[None]:
    """The aggregated API's TLS listener, when there is one, for the block's duration."""
    api = gateway.aggregated
    if api is None or settings.aggregated is None:
        yield
        return
    runner = web.AppRunner(
        api.app(
            middlewares=(gateway.connections.middleware,),
            client_max_size=settings.limits.max_body_bytes + 1,
        ),
        access_log=None,
        keepalive_timeout=settings.aggregated.keepalive_timeout_seconds,
        shutdown_timeout=settings.shutdown_timeout_seconds,
        lingering_time=settings.lingering_seconds,
    )
    try:
        await api.start()
        await runner.setup()
        site = _BoundedSite(
            runner,
            host=settings.aggregated.host,
            port=settings.aggregated.port,
            reuse_port=settings.workers > 1,
            connections=gateway.connections,
            ssl_context=api.trust.listener,
        )
        await site.start()
        gateway.aggregated_port = _bound_port(runner)
        log.info(
            "aggregated API %s listening on %s:%d (TLS)",
            aggregated.GROUP_VERSION,
            settings.aggregated.host,
            gateway.aggregated_port,
        )
        yield
    finally:
        await runner.cleanup()
        await api.stop()


def _bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    raise RuntimeError("the gateway is not listening")


async def serve(*, settings: Settings, kubeconfig: str | None) -> None:
    """One gateway process: run until SIGTERM or SIGINT, then drain and close cleanly
    (pending call log entries are committed before the process exits)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with (
        kube.Client(kube.Credentials.auto(kubeconfig), field_manager="opkeeper-gateway") as client,
        running(settings=settings, kube_client=client),
    ):
        await stop.wait()
    log.info("gateway stopped")


def reserve_port(*, host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to ``host:port`` with ``SO_REUSEPORT``, so that
    workers can bind the same port; with ``port`` 0 it picks a free one. Keep it open
    while the workers run: it keeps that port from going to anyone else, and as it
    never listens the kernel hands it no connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def serve_workers(
    *, settings: Settings, kubeconfig: str | None, log_level: str, log_format: str
) -> int:
    """``opkeeper gateway --workers N``: start N gateway processes on one port, and stop
    them all on SIGTERM or SIGINT, or as soon as one of them exits.

    A worker that dies is not restarted here: the parent exits non-zero and the
    Pod's restart policy starts everything afresh, which is simpler to reason
    about than a half-restarted set. Returns the exit status.
    """
    shared = tempfile.mkdtemp(prefix="opkeeper-gateway-metrics-")
    # Spawned workers import prometheus_client after this, so they start in multiprocess mode.
    os.environ[MULTIPROC_DIR] = shared
    reserved = reserve_port(host=settings.host, port=settings.port)
    settings = dataclasses.replace(settings, port=reserved.getsockname()[1])
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(
            target=_worker,
            args=(settings, kubeconfig, log_level, log_format),
            name=f"gateway-{n}",
        )
        for n in range(settings.workers)
    ]
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for worker in workers:
            worker.start()
        log.info("%d gateway workers on %s:%d", len(workers), settings.host, settings.port)
        while not stopping and all(w.is_alive() for w in workers):
            multiprocessing.connection.wait([w.sentinel for w in workers], timeout=0.5)
        if not stopping:
            gone = ", ".join(str(w.name) for w in workers if not w.is_alive())
            log.error("gateway worker(s) %s exited; stopping the others", gone)
        for worker in workers:
            if worker.is_alive():
                worker.terminate()  # SIGTERM: the worker drains and commits its call log
        for worker in workers:
            worker.join(60)
            if worker.is_alive():
                worker.kill()
                worker.join()
        # A worker still starting when our SIGTERM came had no handler yet and died of
        # it: nothing was in flight there, so that is a clean stop too.
        clean = (0, -signal.SIGTERM)
        return 0 if stopping and all(w.exitcode in clean for w in workers) else 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        reserved.close()
        shutil.rmtree(shared, ignore_errors=True)
        del os.environ[MULTIPROC_DIR]


def _worker(settings: Settings, kubeconfig: str | None, log_level: str, log_format: str) -> None:
    logs.setup(level=log_level, fmt=log_format)
    asyncio.run(serve(settings=settings, kubeconfig=kubeconfig))


def executors_from(pairs: list[str]) -> Mapping[str, Mapping[str, Any]]:
    """Parse ``TYPE=JSON`` executor settings from the command line."""
    out: dict[str, Mapping[str, Any]] = {}
    for pair in pairs:
        type_, sep, raw = pair.partition("=")
        if not sep or not type_:
            raise ValueError(f"--executor wants TYPE=JSON, got {pair!r}")
        value = json.loads(raw)
        if not isinstance(value, dict):
            raise ValueError(f"--executor {type_}: the executor is a JSON object")
        out[type_] = value
    return out
