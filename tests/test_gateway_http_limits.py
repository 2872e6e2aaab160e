"""The gateway's connection bounds and its stop, over raw sockets on 127.0.0.1.

Two gateways for the module, started as tests/test_gateway_cluster.py starts
its own: one with short timeouts for the timing tests, one that allows only a
few connections. A process test runs ``opkeeper gateway`` and stops it with
SIGTERM while hostile connections are open. Tests wait on conditions (a
socket being closed, a counter, a process exiting) with timeouts; the only
clock is the pace of a deliberate trickle.
"""

from __future__ import annotations

import contextlib
import pathlib
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest

from opkeeper.gateway import auth, server
from tests.gateway_support import RunningGateway, gateway_in_thread, gateway_process, make_key
from tests.helpers import wait_for

pytestmark = pytest.mark.cluster

HEADER_TIMEOUT = 1.5
KEEPALIVE_TIMEOUT = 4.5
"""Well apart from HEADER_TIMEOUT: aiohttp's keep-alive timer also runs from a
connection's start, so only a close well before it shows the header timeout at work."""
SLACK = 3.0
"""Scheduling slack on a loaded two-core machine, on top of a timeout."""
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def _gateway(
    api: kubernetes.client.ApiClient, kubeconfig: str, directory: pathlib.Path, **limits: Any
) -> Iterator[RunningGateway]:
    key_namespace = f"gw-limits-{uuid.uuid4().hex[:6]}"
    kubernetes.client.CoreV1Api(api).create_namespace({"metadata": {"name": key_namespace}})
    settings = server.Settings(
        port=0,
        call_log_path=str(directory / "log.sqlite3"),
        keyring=auth.KeyRingSettings(namespace=key_namespace),
        **limits,
    )
    with gateway_in_thread(kubeconfig=kubeconfig, settings=settings) as running:
        yield running


@pytest.fixture(scope="module")
def quick(
    cluster: Any, api: kubernetes.client.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    """A gateway with short header and keep-alive timeouts."""
    yield from _gateway(
        api,
        cluster.kubeconfig,
        tmp_path_factory.mktemp("quick"),
        header_timeout_seconds=HEADER_TIMEOUT,
        keepalive_timeout_seconds=KEEPALIVE_TIMEOUT,
    )


@pytest.fixture(scope="module")
def few(
    cluster: Any, api: kubernetes.client.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    """A gateway that allows four connections, with timeouts no test reaches."""
    yield from _gateway(
        api,
        cluster.kubeconfig,
        tmp_path_factory.mktemp("few"),
        max_connections=4,
        header_timeout_seconds=60.0,
        keepalive_timeout_seconds=60.0,
    )


def _connect(gw: RunningGateway) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.port), timeout=30)


def _read_response(sock: socket.socket) -> bytes:
    """One HTTP response (the gateway always sends a Content-Length): head and body."""
    sock.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")[1:]
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection inside a body"
        body += chunk
    return head + b"\r\n\r\n" + body


def _closed_at(sock: socket.socket, *, timeout: float) -> float:
    """Wait until the server closes ``sock`` (at most ``timeout`` s); when it did."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for {timeout} s") from None
    return time.monotonic()


def _trickle(sock: socket.socket, *, every: float, until: float) -> tuple[float, int]:
    """Send one header byte per ``every`` s until the server closes the connection;
    returns when it did and how many bytes were sent. Fails at ``until`` (monotonic)."""
    sent = 0
    sock.settimeout(every)
    while time.monotonic() < until:
        try:
            sock.sendall(b"a")
            sent += 1
            if sock.recv(65536) == b"":
                return time.monotonic(), sent
        except TimeoutError:
            continue  # still open: the next byte is due
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic(), sent
    raise AssertionError(f"the server kept a trickling connection open ({sent} bytes sent)")


# --- timeouts ----------------------------------------------------------------------------


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    quick: RunningGateway,
) -> None:
    opened = time.monotonic()
    with _connect(quick) as sock:
        closed = _closed_at(sock, timeout=KEEPALIVE_TIMEOUT - 0.5)
    assert closed - opened >= HEADER_TIMEOUT - 0.1


def test_trickled_headers_are_cut_off_at_the_header_timeout(quick: RunningGateway) -> None:
    with _connect(quick) as sock:
        opened = time.monotonic()
        sock.sendall(b"POST /xmlrpc HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        closed, sent = _trickle(sock, every=0.5, until=opened + KEEPALIVE_TIMEOUT - 0.5)
    assert closed - opened >= HEADER_TIMEOUT - 0.1
    assert sent >= 2  # it was trickling, not silent


def test_a_kept_alive_connection_is_closed_after_the_keepalive_timeout(
    quick: RunningGateway,
) -> None:
    with _connect(quick) as sock:
        sock.sendall(HEALTHZ)
        assert _read_response(sock).startswith(b"HTTP/1.1 200 ")
        answered = time.monotonic()
        closed = _closed_at(sock, timeout=KEEPALIVE_TIMEOUT + SLACK)
    # the first-request deadline (HEADER_TIMEOUT) ended with the first request
    assert closed - answered >= KEEPALIVE_TIMEOUT - 0.1


def test_a_second_request_may_come_later_than_the_header_timeout(
    quick: RunningGateway,
) -> None:
    with _connect(quick) as sock:
        sock.sendall(HEALTHZ)
        assert _read_response(sock).startswith(b"HTTP/1.1 200 ")
        sock.settimeout(HEADER_TIMEOUT + 0.5)
        with pytest.raises(TimeoutError):
            sock.recv(1)  # the server must not close it meanwhile
        sock.sendall(HEALTHZ)
        assert _read_response(sock).startswith(b"HTTP/1.1 200 ")


def test_trickling_the_next_request_is_bounded_by_the_keepalive_timeout(
    quick: RunningGateway,
) -> None:
    with _connect(quick) as sock:
        sock.sendall(HEALTHZ)
        assert _read_response(sock).startswith(b"HTTP/1.1 200 ")
        answered = time.monotonic()
        sock.sendall(b"POST /xmlrpc HTTP/1.1\r\nX-Slow: ")
        closed, _ = _trickle(sock, every=0.5, until=answered + KEEPALIVE_TIMEOUT + SLACK)
    assert closed - answered >= KEEPALIVE_TIMEOUT - 0.1


def test_xmlrpc_client_works_and_reconnects_after_a_keepalive_close(
    api: kubernetes.client.ApiClient, namespace: str, quick: RunningGateway
) -> None:
    key = make_key(api, quick, namespace)
    proxy = quick.proxy()
    session = proxy.login(key)
    assert proxy.operation_list(session) == []
    wait_for(
        lambda: quick.gateway.connections.open == 0,
        timeout=KEEPALIVE_TIMEOUT + SLACK,
        what="the server to close the idle connections",
    )
    assert proxy.operation_list(session) == []  # xmlrpc.client retries on a fresh connection


# --- the connection limit ------------------------------------------------------------------


def test_connections_beyond_the_limit_are_closed_at_once(few: RunningGateway) -> None:
    connections = few.gateway.connections
    wait_for(lambda: connections.open == 0, what="earlier connections to be closed")
    held = [_connect(few) for _ in range(4)]
    try:
        wait_for(lambda: connections.open == 4, what="the gateway to count four connections")
        with _connect(few) as extra:
            tried = time.monotonic()
            assert _closed_at(extra, timeout=SLACK) - tried < 1.0
        held[0].sendall(HEALTHZ)  # a connection inside the limit still works
        assert _read_response(held[0]).startswith(b"HTTP/1.1 200 ")
        held.pop().close()
        wait_for(lambda: connections.open == 3, what="the gateway to count the close")
        with _connect(few) as again:
            again.sendall(HEALTHZ)
            assert _read_response(again).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in held:
            sock.close()


# --- stopping the process ----------------------------------------------------------------


def test_sigterm_stops_the_gateway_within_seconds_despite_hostile_connections(
    cluster: Any, api: kubernetes.client.ApiClient, tmp_path: pathlib.Path
) -> None:
    key_namespace = f"gw-limits-{uuid.uuid4().hex[:6]}"
    kubernetes.client.CoreV1Api(api).create_namespace({"metadata": {"name": key_namespace}})
    shutdown_timeout = 1.0
    with (
        contextlib.ExitStack() as hostile,
        gateway_process(
            cluster,
            tmp_path,
            key_namespace,
            # hostile connections must still be open when SIGTERM comes
            "--header-timeout",
            "120",
            "--keepalive-timeout",
            "120",
            "--shutdown-timeout",
            str(shutdown_timeout),
        ) as gateway,
    ):
        port, process, log_path = gateway.port, gateway.process, gateway.log_path
        for _ in range(3):  # silent
            hostile.enter_context(socket.create_connection(("127.0.0.1", port), timeout=30))
        for _ in range(3):  # headers begun, never finished
            sock = hostile.enter_context(socket.create_connection(("127.0.0.1", port), timeout=30))
            sock.sendall(b"POST /xmlrpc HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")
        for _ in range(2):  # idle after a request
            sock = hostile.enter_context(socket.create_connection(("127.0.0.1", port), timeout=30))
            sock.sendall(HEALTHZ)
            assert _read_response(sock).startswith(b"HTTP/1.1 200 ")
        for _ in range(3):  # large bodies, a quarter sent: their handlers are reading
            sock = hostile.enter_context(socket.create_connection(("127.0.0.1", port), timeout=30))
            sock.sendall(
                b"POST /xmlrpc HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\n"
                b"Content-Length: 1000000\r\n\r\n" + b"<" * 250_000
            )
        # one complete call after them: the gateway has taken in what came before
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(HEALTHZ)
            assert _read_response(sock).startswith(b"HTTP/1.1 200 ")

        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # The body read timeout (10 s) and aiohttp's default shutdown timeout (60 s)
        # are both far beyond this.
        assert process.wait(timeout=30) == 0, log_path.read_text()
        assert time.monotonic() - signalled < 2 * shutdown_timeout + 5.0
        assert "gateway stopped" in log_path.read_text()
