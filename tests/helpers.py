"""Test helpers: waiting on conditions, and running the controller in or out of process.

Tests never sleep to synchronise: they wait for a condition with a timeout
(:func:`wait_for`), so a slow machine makes them slower, not flaky.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Self, TypeVar

import kubernetes
from aiohttp import web

from opkeeper import GROUP, VERSION, kube

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T | None],
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy; return it.

    Raises AssertionError naming ``what`` and the last value after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


class Ops:
    """Operations in one namespace through the official sync client (the test's side)."""

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str) -> None:
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.batch = kubernetes.client.BatchV1Api(api)
        self.core = kubernetes.client.CoreV1Api(api)
        self.namespace = namespace

    def create(self, name: str, spec: dict[str, Any], **metadata: Any) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Operation",
            "metadata": {"name": name, **metadata},
            "spec": spec,
        }
        result: dict[str, Any] = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "operations", body
        )
        return result

    def get(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "operations", name
        )
        return result

    def patch(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "operations", name, body
        )
        return result

    def patch_status(self, name: str, status: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.namespace, "operations", name, {"status": status}
        )
        return result

    def status(self, name: str) -> dict[str, Any]:
        status: dict[str, Any] = self.get(name).get("status") or {}
        return status

    def wait_state(self, name: str, *states: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the operation is in one of ``states``; return its status."""
        return wait_for(
            lambda: (s := self.status(name)) and s.get("state") in states and s,
            timeout=timeout,
            what=f"{name} in {states}",
        )

    def events(self, name: str) -> list[Any]:
        items = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name}"
        ).items
        return list(items)


@contextlib.contextmanager
def controller_in_thread(*, kubeconfig: str, namespace: str, **overrides: Any) -> Iterator[None]:
    """Run the controller for ``namespace`` in a thread of this process until the block ends."""
    from opkeeper import controller

    settings = controller.Settings(
        **{
            "namespaces": (namespace,),
            "standalone": True,
            "metrics_address": "127.0.0.1",
            **overrides,
        }
    )
    credentials = kube.Credentials.from_kubeconfig(kubeconfig)
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    stop: asyncio.Event | None = None
    failure: list[BaseException] = []

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        ready_flag = asyncio.Event()
        task = asyncio.create_task(
            controller.run(
                settings=settings, credentials=credentials, stop_flag=stop, ready_flag=ready_flag
            )
        )
        await asyncio.wait(
            {task, asyncio.create_task(ready_flag.wait())}, return_when=asyncio.FIRST_COMPLETED
        )
        ready.set()
        await task

    def target() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as exc:  # surfaced to the test below
            failure.append(exc)
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=target, name="controller", daemon=True)
    thread.start()
    assert ready.wait(60), "the controller did not become ready"
    if failure:
        raise failure[0]
    try:
        yield
    finally:
        if stop is not None:
            loop.call_soon_threadsafe(stop.set)
        thread.join(30)
    if failure:
        raise failure[0]


class ControllerProcess:
    """The controller as a subprocess (`opkeeper controller`), for kill -9 tests."""

    def __init__(
        self,
        *,
        env: dict[str, str],
        namespace: str,
        log: pathlib.Path,
        args: Sequence[str] = ("--standalone", "--log-level", "debug"),
    ) -> None:
        self._env = env
        self._namespace = namespace
        self._log = log
        self._args = list(args)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self._log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "opkeeper.cli",
                    "controller",
                    "-n",
                    self._namespace,
                    *self._args,
                    # The tests' webhook servers listen on loopback, which is refused by default.
                    "--webhook-allow",
                    "127.0.0.1/32",
                ],
                env={**self._env, "PYTHONUNBUFFERED": "1"},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        """SIGKILL: no cleanup, exactly what a node failure looks like to the controller."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self._log.read_text(errors="replace")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def complete_job(ops: Ops, name: str) -> None:
    """Mark a Job Complete as the job controller would (kubelet and all)."""
    now = _now()
    ops.batch.patch_namespaced_job_status(
        name,
        ops.namespace,
        {
            "status": {
                "startTime": now,
                "completionTime": now,
                "succeeded": 1,
                "conditions": [
                    {"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": now},
                    {"type": "Complete", "status": "True", "lastTransitionTime": now},
                ],
            }
        },
    )


def fail_job(ops: Ops, name: str) -> None:
    """Mark a Job Failed as the job controller would."""
    now = _now()
    ops.batch.patch_namespaced_job_status(
        name,
        ops.namespace,
        {
            "status": {
                "startTime": now,
                "failed": 1,
                "conditions": [
                    {
                        "type": "FailureTarget",
                        "status": "True",
                        "reason": "BackoffLimitExceeded",
                        "lastTransitionTime": now,
                    },
                    {
                        "type": "Failed",
                        "status": "True",
                        "reason": "BackoffLimitExceeded",
                        "message": "Job has reached the specified backoff limit",
                        "lastTransitionTime": now,
                    },
                ],
            }
        },
    )


class ServerInThread:
    """An aiohttp server on 127.0.0.1 with its own event loop in a thread, for tests that
    need a peer to talk to while they run synchronously. Subclasses add their routes."""

    def __init__(self) -> None:
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        async def serve() -> None:
            app = web.Application()
            self.routes(app)
            self._runner = web.AppRunner(app)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self._ready.set()

        def run() -> None:
            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def down() -> None:
            assert self._runner is not None
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(down(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)


class FakeExternalSystem(ServerInThread):
    """An idempotent external API: one job per Idempotency-Key, pollable and cancellable."""

    def __init__(self) -> None:
        super().__init__()
        self.posts: collections.Counter[str] = collections.Counter()
        """POSTs received per idempotency key (a retry with the same key counts again)."""
        self.jobs: dict[str, dict[str, Any]] = {}
        """Work accepted, by key: what a real system would have started (once per key)."""
        self.replies: dict[str, dict[str, Any]] = {}
        """What a poll of an external id answers (the test sets it)."""
        self.cancelled: list[str] = []
        self.start_status = 202

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/start", self._start)
        app.router.add_get("/poll/{id}", self._poll)
        app.router.add_post("/cancel/{id}", self._cancel)

    async def _start(self, request: web.Request) -> web.Response:
        key = request.headers["Idempotency-Key"]
        self.posts[key] += 1
        if self.start_status >= 400:
            return web.json_response({"error": "no"}, status=self.start_status)
        job = self.jobs.setdefault(
            key, {"id": f"ext-{len(self.jobs) + 1}", "operation": await request.json()}
        )
        return web.json_response({"id": job["id"], "state": "accepted"}, status=202)

    async def _poll(self, request: web.Request) -> web.Response:
        return web.json_response(self.replies.get(request.match_info["id"], {"state": "running"}))

    async def _cancel(self, request: web.Request) -> web.Response:
        self.cancelled.append(request.match_info["id"])
        return web.json_response({})
