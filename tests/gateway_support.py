"""Shared support for the tests that run a real gateway against the real API server.

A plain module, not a conftest: test modules import what they use, so a
fixture's origin is visible where it is used. A gateway runs in a thread
with its own event loop, as a separate process would, talking HTTP on
loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
import xmlrpc.client
from collections.abc import Callable, Iterator
from typing import Any

import kubernetes
import pytest

from opkeeper import kube
from opkeeper.gateway import auth, server
from tests.helpers import wait_for


@dataclasses.dataclass(kw_only=True)
class RunningGateway:
    gateway: server.Gateway
    port: int
    key_namespace: str
    settings: server.Settings

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def proxy(self) -> xmlrpc.client.ServerProxy:
        return xmlrpc.client.ServerProxy(f"{self.base}/xmlrpc")

    def gocept(self, key: str) -> xmlrpc.client.ServerProxy:
        """gocept clients put the key into the URL; xmlrpc.client sends it as Basic auth."""
        return xmlrpc.client.ServerProxy(f"http://user:{key}@127.0.0.1:{self.port}/xmlrpc")

    def post(self, body: bytes, *, path: str = "/xmlrpc") -> tuple[int, bytes]:
        request = urllib.request.Request(
            self.base + path, data=body, headers={"Content-Type": "text/xml"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


@contextlib.contextmanager
def gateway_in_thread(*, kubeconfig: str, settings: server.Settings) -> Iterator[RunningGateway]:
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def main() -> None:
        stop = asyncio.Event()
        holder["stop"] = stop
        credentials = kube.Credentials.from_kubeconfig(kubeconfig)
        async with (
            kube.Client(credentials, field_manager="opkeeper-gateway") as client,
            server.running(settings=settings, kube_client=client) as (gateway, port),
        ):
            holder["gateway"], holder["port"] = gateway, port
            started.set()
            await stop.wait()

    def target() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as exc:
            holder["error"] = exc
            started.set()
        finally:
            # What asyncio.run does before closing: cancel what is left (a connection
            # aiohttp still lingers on after a refused body), so nothing is destroyed pending.
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()

            async def drain() -> None:
                await asyncio.gather(*left, return_exceptions=True)
                await loop.shutdown_asyncgens()

            loop.run_until_complete(drain())
            loop.close()

    thread = threading.Thread(target=target, name="gateway", daemon=True)
    thread.start()
    assert started.wait(60), "the gateway did not start"
    if "error" in holder:
        raise holder["error"]
    running = RunningGateway(
        gateway=holder["gateway"],
        port=holder["port"],
        key_namespace=settings.keyring.namespace or "",
        settings=settings,
    )
    wait_for(lambda: running.get("/readyz")[0] == 200, timeout=60, what="gateway /readyz")
    try:
        yield running
    finally:
        loop.call_soon_threadsafe(holder["stop"].set)
        thread.join(30)


@contextlib.contextmanager
def module_gateway(
    *,
    cluster: Any,
    api: kubernetes.client.ApiClient,
    tmp_path_factory: pytest.TempPathFactory,
    **overrides: Any,
) -> Iterator[RunningGateway]:
    """What a test module's ``gw`` fixture runs: a key namespace of its own (so keys of
    other modules never count), a fresh call log file, and ``server.Settings`` with
    ``overrides`` (``port`` is always 0: any free port on 127.0.0.1)."""
    key_namespace = f"gw-keys-{uuid.uuid4().hex[:6]}"
    kubernetes.client.CoreV1Api(api).create_namespace({"metadata": {"name": key_namespace}})
    settings = server.Settings(
        **{
            "call_log_path": str(tmp_path_factory.mktemp("calllog") / "log.sqlite3"),
            "keyring": auth.KeyRingSettings(namespace=key_namespace),
            **overrides,
            "port": 0,
        }
    )
    with gateway_in_thread(kubeconfig=cluster.kubeconfig, settings=settings) as running:
        yield running


def make_key(api: kubernetes.client.ApiClient, gw: RunningGateway, tenant: str) -> str:
    """A fresh API key for ``tenant``, usable once the gateway's watch has seen it."""
    key = auth.new_key()
    manifest = auth.key_secret(
        name=f"key-{uuid.uuid4().hex[:8]}",
        namespace=gw.key_namespace,
        key=key,
        user_id=f"user-{tenant}",
        tenant=tenant,
    )
    kubernetes.client.CoreV1Api(api).create_namespaced_secret(gw.key_namespace, manifest)

    def works() -> bool:
        try:
            gw.proxy().login(key)
        except xmlrpc.client.Fault:
            return False
        return True

    wait_for(works, what="the key to reach the gateway")
    return key


def other_namespace(api: kubernetes.client.ApiClient, *, prefix: str = "gw-other") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    kubernetes.client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})
    return name


def fault_of(call: Callable[[], Any]) -> xmlrpc.client.Fault:
    with pytest.raises(xmlrpc.client.Fault) as caught:
        call()
    return caught.value


def raw_call(method: str, params_xml: str = "") -> bytes:
    return (
        f"<?xml version='1.0'?><methodCall><methodName>{method}</methodName>"
        f"<params>{params_xml}</params></methodCall>"
    ).encode()


def parse_fault(body: bytes) -> int:
    with pytest.raises(xmlrpc.client.Fault) as caught:
        xmlrpc.client.loads(body)
    return int(caught.value.faultCode)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GatewayProcess:
    """``opkeeper gateway`` running as a process of its own."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: pathlib.Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def gateway_process(
    cluster: Any, tmp_path: pathlib.Path, key_namespace: str, *extra: str
) -> Iterator[GatewayProcess]:
    """``opkeeper gateway`` on a free port, ready (``/readyz``) when yielded; its output
    goes to ``tmp_path/gateway.log``. Unless the test stopped it already, SIGTERM at the
    end must stop it cleanly (exit 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "opkeeper.cli",
                "gateway",
                "--kubeconfig",
                cluster.kubeconfig,
                "--key-namespace",
                key_namespace,
                "--port",
                str(port),
                "--call-log",
                str(tmp_path / "calllog.sqlite3"),
                *extra,
            ],
            env=cluster.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    running = GatewayProcess(process=process, port=port, log_path=log_path)
    try:

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{running.url}/readyz", timeout=5) as response:
                    return response.status == 200
            except OSError:
                return process.poll() is not None  # died: the exit code below says so

        wait_for(ready, timeout=60, what="opkeeper gateway /readyz")
        assert process.poll() is None, log_path.read_text()
        yield running
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            assert process.wait(60) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
