"""The PostgreSQL call log under faults: a database restart under load, and two
gateway replicas killed alternately behind one port.

Real parts only: the kube-apiserver from the fixtures, Debian's PostgreSQL
(``postgres`` fixture), gateways as threads or ``opkeeper gateway`` processes,
Python's xmlrpc.client as the Gandi client. Every call carries a marker of its
own (an ``operation_list`` type filter, logged with the call), so the log can
be checked against the calls the clients saw answered: each exactly once, under
serials 1..n without a gap.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import pathlib
import signal
import socket
import threading
import uuid
import xmlrpc.client
from collections.abc import Callable
from typing import Any

import kubernetes
import pytest

from opkeeper import localpostgres
from opkeeper.gateway import auth, calllog_postgres, server
from tests.gateway_support import (
    GatewayProcess,
    RunningGateway,
    gateway_in_thread,
    gateway_process,
    make_key,
)
from tests.helpers import wait_for

pytestmark = pytest.mark.cluster

_PASSWORD = "pw-never-in-the-output-7f3"
UNAVAILABLE = 503
"""The XML-RPC fault code of errors.Unavailable (faults.XMLRPC)."""


class Load:
    """Client threads calling ``operation_list`` with a fresh marker each time until
    stopped; they record which markers were answered, and every other outcome."""

    def __init__(self, *, call: Callable[[str], Any], threads: int) -> None:
        self._call = call
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.answered: list[str] = []
        self.lost: list[str] = []
        """Calls without an answer (connection cut by a killed replica)."""
        self.faults: list[str] = []
        self._threads = [
            threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def count(self) -> int:
        with self._lock:
            return len(self.answered)

    def _run(self, n: int) -> None:
        for i in itertools.count():
            if self._stop.is_set():
                return
            marker = f"m-{n}-{i}"
            try:
                self._call(marker)
            except xmlrpc.client.Fault as fault:
                with self._lock:
                    self.faults.append(f"{marker}: {fault.faultCode} {fault.faultString}")
                continue
            except (OSError, http.client.HTTPException):
                with self._lock:
                    self.lost.append(marker)
                continue
            with self._lock:
                self.answered.append(marker)

    def progressed(self, by: int, *, timeout: float = 60.0, what: str = "calls") -> None:
        target = self.count() + by
        wait_for(lambda: self.count() >= target, timeout=timeout, what=what)


def _markers(entries: list[dict[str, Any]]) -> list[str]:
    """The markers of the logged ``operation_list`` calls, in log order."""
    out = []
    for entry in entries:
        if entry["method"] == "operation_list":
            out.append(json.loads(entry["args"])["args"][1]["type"])
    return out


def _walk(gocept: xmlrpc.client.ServerProxy) -> list[dict[str, Any]]:
    """The whole log, walked page by page as a gocept client does."""
    entries: list[dict[str, Any]] = []
    while True:
        page: list[dict[str, Any]] = gocept.log(entries[-1]["serial"] if entries else 0)
        if not page:
            return entries
        entries.extend(page)


def _check_exactly_once(entries: list[dict[str, Any]], load: Load) -> None:
    assert [e["serial"] for e in entries] == list(range(1, len(entries) + 1))
    logged = _markers(entries)
    assert len(logged) == len(set(logged)), "a call was logged twice"
    assert not set(load.answered) - set(logged), "an answered call is missing from the log"
    # Logged but not answered: only calls cut by a kill (their entry was committed).
    assert set(logged) - set(load.answered) <= set(load.lost)


class _OneTry(xmlrpc.client.Transport):
    """xmlrpc.client's transport without its silent second try of a call whose
    connection was reset: that second try is a second call (logged as one), and this
    test counts the calls its clients made."""

    def request(self, host: Any, handler: str, request_body: bytes, verbose: bool = False) -> Any:
        return self.single_request(host, handler, request_body, verbose)


@pytest.fixture
def key_namespace(api: kubernetes.client.ApiClient) -> str:
    name = f"gw-keys-{uuid.uuid4().hex[:6]}"
    kubernetes.client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})
    return name


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restart_under_load_loses_and_doubles_nothing(
    mode: str,
    cluster: Any,
    api: kubernetes.client.ApiClient,
    postgres: localpostgres.Server,
    key_namespace: str,
) -> None:
    settings = server.Settings(
        port=0,
        call_log_path=postgres.new_database(),
        keyring=auth.KeyRingSettings(namespace=key_namespace),
    )
    with gateway_in_thread(kubeconfig=cluster.kubeconfig, settings=settings) as gw:
        store = gw.gateway.call_log
        assert isinstance(store, calllog_postgres.PostgresCallLog)
        key = make_key(api, gw, f"tenant-{uuid.uuid4().hex[:6]}")
        session = gw.proxy().login(key)
        local = threading.local()

        def call(marker: str) -> None:
            if not hasattr(local, "proxy"):
                local.proxy = gw.proxy()
            local.proxy.operation_list(session, {"type": marker})

        with Load(call=call, threads=2) as load:
            load.progressed(50, what="calls before the restart")
            postgres.stop(mode=mode)  # immediate: a crash, recovery at the start
            try:
                wait_for(lambda: store.down, timeout=30, what="the store to notice the outage")
                load.progressed(30, what="calls answered during the outage")
                with pytest.raises(xmlrpc.client.Fault) as caught:
                    gw.gocept(key).log(0)
                assert caught.value.faultCode == UNAVAILABLE
                assert store.buffered > 0
            finally:
                postgres.start()
            load.progressed(50, what="calls after the restart")
        wait_for(lambda: not store.down and store.buffered == 0, what="the log to catch up")
        assert load.faults == []
        assert load.lost == []
        _check_exactly_once(_walk(gw.gocept(key)), load)


class _Proxy:
    """One loopback port in front of the replicas: each connection goes to the next
    replica that accepts it (a killed one refuses), bytes piped both ways."""

    def __init__(self) -> None:
        self.backends: list[int] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._turn = itertools.count()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        backends = list(self.backends)
        start = next(self._turn)
        for n in range(len(backends)):
            port = backends[(start + n) % len(backends)]
            try:
                upstream = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                continue
        if upstream is None:
            client.close()
            return
        upstream.settimeout(None)

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := src.recv(65536):
                    dst.sendall(data)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        back = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
        back.start()
        pipe(client, upstream)
        back.join(60)
        client.close()
        upstream.close()


def test_two_replicas_killed_alternately_log_every_answered_call_once(
    cluster: Any,
    api: kubernetes.client.ApiClient,
    postgres: localpostgres.Server,
    key_namespace: str,
    tmp_path: pathlib.Path,
) -> None:
    # With a password (trust auth ignores it): it must appear in no replica's output.
    dsn = postgres.new_database().replace(
        f"{localpostgres.USER}@", f"{localpostgres.USER}:{_PASSWORD}@"
    )
    proxy = _Proxy()
    with contextlib.ExitStack() as stack:
        replicas: list[GatewayProcess] = []

        def start(n: int) -> GatewayProcess:
            workdir = tmp_path / f"replica-{n}-{uuid.uuid4().hex[:4]}"
            workdir.mkdir()
            return stack.enter_context(
                gateway_process(cluster, workdir, key_namespace, "--call-log", dsn)
            )

        replicas = [start(0), start(1)]
        proxy.backends = [r.port for r in replicas]
        front = RunningGateway(
            gateway=None,  # type: ignore[arg-type]  # only its HTTP side is used
            port=proxy.port,
            key_namespace=key_namespace,
            settings=server.Settings(),
        )
        key = make_key(api, front, f"tenant-{uuid.uuid4().hex[:6]}")
        session = front.proxy().login(key)

        def call(marker: str) -> None:
            # A connection per call, so the proxy spreads calls over both replicas and a
            # session made by one is used on the other.
            client = xmlrpc.client.ServerProxy(f"{front.base}/xmlrpc", transport=_OneTry())
            client.operation_list(session, {"type": marker})

        with Load(call=call, threads=3) as load:
            load.progressed(20, what="calls before the first kill")
            for round_ in range(4):
                victim = round_ % 2
                replicas[victim].process.send_signal(signal.SIGKILL)
                replicas[victim].process.wait(10)
                load.progressed(20, what=f"calls with replica {victim} dead (round {round_})")
                replicas[victim] = start(victim)
                proxy.backends = [r.port for r in replicas]
                load.progressed(20, what=f"calls with both replicas (round {round_})")
        proxy.close()
        assert load.faults == []
        for n, replica in enumerate(replicas):  # the first session, on each replica directly
            marker = f"direct-{n}"
            client = xmlrpc.client.ServerProxy(f"{replica.url}/xmlrpc", transport=_OneTry())
            assert client.operation_list(session, {"type": marker}) == []
            load.answered.append(marker)
        for replica in replicas:
            direct = xmlrpc.client.ServerProxy(f"http://user:{key}@127.0.0.1:{replica.port}/xmlrpc")
            entries = _walk(direct)
            _check_exactly_once(entries, load)
        assert len(load.answered) >= 20 + 4 * 40
    for output in tmp_path.glob("replica-*/gateway.log"):
        text = output.read_text(errors="replace")
        assert "call log: postgresql://" in text
        assert _PASSWORD not in text
