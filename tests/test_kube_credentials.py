"""Credentials that refresh and retries, against the real API server.

Tokens are real ServiceAccount tokens from the TokenRequest API. A "revoked"
token is one of a ServiceAccount deleted since, which the API server answers
with 401 as it would a rotated-out token. Exec plugins are a small script that
prints an ExecCredential and counts its runs. 429 and lost answers come from a
loopback proxy in front of the real API server (:class:`FaultyProxy`), which
answers the first matching requests itself; everything else it passes through.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import pathlib
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import kubernetes
import pytest
import yaml
from aiohttp import web

from opkeeper import errors, kube
from tests.helpers import ServerInThread

pytestmark = pytest.mark.cluster

CM = kube.CONFIGMAPS


def configmap(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}}


def service_account_token(api: kubernetes.client.ApiClient, namespace: str, name: str) -> str:
    """A token of a new ServiceAccount ``name`` that may edit ``namespace``."""
    core = kubernetes.client.CoreV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": name}})
    rbac = kubernetes.client.RbacAuthorizationV1Api(api)
    # Our own Role: the built-in "edit" is aggregated by a controller that is not running.
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": name},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["*"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
        },
    )
    answer = core.create_namespaced_service_account_token(
        name, namespace, {"spec": {"expirationSeconds": 600}}
    )
    token: str = answer.status.token
    return token


def revoked_token(api: kubernetes.client.ApiClient, namespace: str) -> str:
    """A token that was good until its ServiceAccount was deleted: the API server says 401."""
    token = service_account_token(api, namespace, "gone")
    kubernetes.client.CoreV1Api(api).delete_namespaced_service_account("gone", namespace)
    return token


@dataclasses.dataclass(frozen=True)
class Tokens:
    good: str
    revoked: str


@pytest.fixture
def tokens(api: kubernetes.client.ApiClient, namespace: str) -> Tokens:
    return Tokens(
        good=service_account_token(api, namespace, "reader"), revoked=revoked_token(api, namespace)
    )


def kubeconfig_parts(cluster: Any) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(pathlib.Path(cluster.kubeconfig).read_text())
    return config


def write_ca(cluster: Any, directory: pathlib.Path) -> pathlib.Path:
    ca = base64.b64decode(
        kubeconfig_parts(cluster)["clusters"][0]["cluster"]["certificate-authority-data"]
    )
    path = directory / "ca.crt"
    path.write_bytes(ca)
    return path


def in_cluster(cluster: Any, directory: pathlib.Path) -> kube.Credentials:
    host, port = cluster.server.removeprefix("https://").rsplit(":", 1)
    return kube.Credentials.in_cluster(
        token_path=directory / "token",
        ca_path=write_ca(cluster, directory),
        environ={"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port},
    )


# --- a service-account token file ------------------------------------------------------


def test_a_rotated_token_file_is_read_again_after_a_401(
    cluster: Any, namespace: str, tokens: Tokens, tmp_path: pathlib.Path, caplog: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    (tmp_path / "token").write_text(tokens.revoked)
    credentials = in_cluster(cluster, tmp_path)
    assert credentials.source is not None

    async def scenario() -> None:
        async with kube.Client(credentials) as client:
            # The file still holds the revoked token: one renewal, then a clear error.
            with pytest.raises(errors.Unauthenticated, match="rejects our credentials") as caught:
                await client.get(CM, namespace=namespace, name="x")
            assert client.retries["401"] == 1
            assert tokens.revoked not in str(caught.value)
            # The kubelet rotates the file: the next call gets a 401 with the cached token,
            # reads the file again and succeeds, without anyone restarting anything.
            (tmp_path / "token").write_text(tokens.good + "\n")
            created = await client.create(CM, configmap("after-rotation"), namespace=namespace)
            assert created["metadata"]["name"] == "after-rotation"
            assert client.retries["401"] == 2
            assert client.writes[("POST", "configmaps")] == 1

    asyncio.run(scenario())
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert tokens.good not in logged
    assert tokens.revoked not in logged


def test_a_stream_recovers_once_the_token_file_is_good_again(
    cluster: Any, namespace: str, tokens: Tokens, tmp_path: pathlib.Path
) -> None:
    (tmp_path / "token").write_text(tokens.revoked)
    credentials = in_cluster(cluster, tmp_path)

    async def scenario() -> None:
        async with kube.Client(credentials) as client:
            stream = client.stream(CM, namespace=namespace, retry_delay=0.05)
            first = asyncio.ensure_future(anext(stream))
            # The stream keeps trying (and logs the rejection) instead of dying.
            await asyncio.wait_for(asyncio.shield(_until(lambda: client.retries["401"] >= 2)), 10)
            assert not first.done()
            (tmp_path / "token").write_text(tokens.good)
            event = await asyncio.wait_for(first, 10)
            assert event.type == "SYNC"
            await client.create(CM, configmap("seen"), namespace=namespace)
            event = await asyncio.wait_for(anext(stream), 10)
            assert event.object is not None
            assert (event.type, event.object["metadata"]["name"]) == ("ADDED", "seen")
            await stream.aclose()

    asyncio.run(scenario())


async def _until(condition: Callable[[], bool]) -> None:
    """Wait for a condition another task of this loop makes true (a test-side poll)."""
    while not condition():  # noqa: ASYNC110 - the counter is the client's, not ours to signal
        await asyncio.sleep(0.02)


# --- exec plugins ----------------------------------------------------------------------

PLUGIN = """
import datetime, json, os, pathlib
home = pathlib.Path(os.environ["PLUGIN_HOME"])
runs = home / "runs"
count = int(runs.read_text()) if runs.exists() else 0
runs.write_text(str(count + 1))
plan = json.loads((home / "plan.json").read_text())
info = json.loads(os.environ["KUBERNETES_EXEC_INFO"])
status = {}
if plan.get("tokens"):
    status["token"] = plan["tokens"][min(count, len(plan["tokens"]) - 1)]
if plan.get("certificate"):
    status["clientCertificateData"], status["clientKeyData"] = plan["certificate"]
if plan.get("ttl") is not None:
    moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=plan["ttl"])
    status["expirationTimestamp"] = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
print(json.dumps({"apiVersion": info["apiVersion"], "kind": "ExecCredential", "status": status}))
"""


class Plugin:
    """The plugin's files: what it answers (``plan``) and how often it ran."""

    def __init__(self, cluster: Any, home: pathlib.Path, *, api_version: str) -> None:
        self.home = home
        (home / "plugin.py").write_text(PLUGIN)
        config = kubeconfig_parts(cluster)
        config["users"] = [
            {
                "name": "plugin",
                "user": {
                    "exec": {
                        "apiVersion": api_version,
                        "command": sys.executable,
                        "args": ["plugin.py"],
                        "env": [{"name": "PLUGIN_HOME", "value": str(home)}],
                        "interactiveMode": "Never",
                    }
                },
            }
        ]
        config["contexts"][0]["context"]["user"] = "plugin"
        self.kubeconfig = home / "kubeconfig"
        self.kubeconfig.write_text(yaml.safe_dump(config))

    def plan(self, **plan: Any) -> None:
        (self.home / "plan.json").write_text(json.dumps(plan))

    @property
    def runs(self) -> int:
        path = self.home / "runs"
        return int(path.read_text()) if path.exists() else 0


@pytest.mark.parametrize(
    "api_version", ["client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1"]
)
def test_an_exec_plugin_runs_again_on_expiry_and_after_a_401(
    cluster: Any, namespace: str, tokens: Tokens, tmp_path: pathlib.Path, api_version: str
) -> None:
    plugin = Plugin(cluster, tmp_path, api_version=api_version)
    plugin.plan(tokens=[tokens.good], ttl=3600)
    credentials = kube.Credentials.from_kubeconfig(str(plugin.kubeconfig))
    assert plugin.runs == 0  # runs at the first call, in the event loop, not at load

    async def scenario() -> None:
        async with kube.Client(credentials) as client:
            await client.create(CM, configmap("a"), namespace=namespace)
            await client.get(CM, namespace=namespace, name="a")
            assert plugin.runs == 1  # an unexpired credential is reused
            # A credential within the renewal margin of its expiry is renewed before use.
            plugin.plan(tokens=[tokens.good], ttl=5)
            await client.get(CM, namespace=namespace, name="a")  # the old one is good for 1h
            assert plugin.runs == 1
            source = credentials.source
            assert source is not None
            await source.rejected(await source.header())
            assert plugin.runs == 2  # now holds a 5 s credential: every call renews it
            await client.get(CM, namespace=namespace, name="a")
            await client.get(CM, namespace=namespace, name="a")
            assert plugin.runs == 4
            # The plugin hands out a token the server rejects (its 5th run), then a good
            # one: one 401, one more run, and the call succeeds.
            plugin.plan(tokens=[tokens.revoked] * 5 + [tokens.good], ttl=3600)
            await client.get(CM, namespace=namespace, name="a")
            assert plugin.runs == 6
            assert client.retries["401"] == 1
            await client.get(CM, namespace=namespace, name="a")
            assert plugin.runs == 6

    asyncio.run(scenario())


def test_an_exec_plugin_that_keeps_failing_is_a_clear_error(
    cluster: Any, namespace: str, tokens: Tokens, tmp_path: pathlib.Path
) -> None:
    plugin = Plugin(cluster, tmp_path, api_version="client.authentication.k8s.io/v1")
    plugin.plan(tokens=[tokens.revoked], ttl=3600)
    credentials = kube.Credentials.from_kubeconfig(str(plugin.kubeconfig))

    async def scenario() -> None:
        async with kube.Client(credentials) as client:
            with pytest.raises(errors.Unauthenticated, match="exec plugin") as caught:
                await client.get(CM, namespace=namespace, name="a")
            assert tokens.revoked not in str(caught.value)
            assert plugin.runs == 2  # the first run and one renewal: no loop
            (tmp_path / "plan.json").write_text("{broken")
            (tmp_path / "runs").unlink()
            source = credentials.source
            assert source is not None
            current = await source.header()
            with pytest.raises(errors.Unauthenticated, match="exited with code 1"):
                await source.rejected(current)

    asyncio.run(scenario())


def test_an_exec_plugin_may_answer_a_client_certificate(
    cluster: Any, namespace: str, tmp_path: pathlib.Path
) -> None:
    admin = kubeconfig_parts(cluster)["users"][0]["user"]
    certificate = [
        base64.b64decode(admin["client-certificate-data"]).decode(),
        base64.b64decode(admin["client-key-data"]).decode(),
    ]
    plugin = Plugin(cluster, tmp_path, api_version="client.authentication.k8s.io/v1")
    plugin.plan(certificate=certificate)
    credentials = kube.Credentials.from_kubeconfig(str(plugin.kubeconfig))

    async def scenario() -> None:
        async with kube.Client(credentials) as client:
            await client.create(CM, configmap("by-cert"), namespace=namespace)
            assert plugin.runs == 1

    asyncio.run(scenario())


# --- 429, 5xx and lost answers, through a proxy in front of the real API server --------


@dataclasses.dataclass
class Rule:
    """Answer the next request that matches instead of the API server (or after it)."""

    method: str
    status: int
    retry_after: str | None = None
    watch: bool = False
    after_upstream: bool = False
    """Pass the request on, then drop the answer and say ``status``: the server acted."""


class FaultyProxy(ServerInThread):
    """Plain HTTP on loopback to the real API server (as the admin), with scripted faults."""

    def __init__(self, cluster: Any) -> None:
        super().__init__()
        self._upstream_credentials = kube.Credentials.from_kubeconfig(cluster.kubeconfig)
        self._session: aiohttp.ClientSession | None = None
        self.rules: list[Rule] = []
        self._handlers: set[asyncio.Task[Any]] = set()
        self.seen: list[tuple[str, bool, int | None]] = []
        """(method, is a watch, status the proxy made up or None if passed through)."""

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self._forward)

    def __exit__(self, *exc: object) -> None:
        # Watches passed through stay open upstream (aiohttp does not cancel a handler
        # whose client left): cancel what is still running, then close upstream.
        async def close() -> None:
            for task in self._handlers:
                task.cancel()
            if self._session is not None:
                await self._session.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        super().__exit__(*exc)

    def _rule_for(self, request: web.Request) -> Rule | None:
        watch = request.query.get("watch") == "true"
        for rule in self.rules:
            if rule.method == request.method and rule.watch == watch:
                self.rules.remove(rule)
                return rule
        return None

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            return await self._answer(request)
        finally:
            self._handlers.discard(task)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        rule = self._rule_for(request)
        watch = request.query.get("watch") == "true"
        self.seen.append((request.method, watch, rule.status if rule else None))
        made_up = web.json_response(
            {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "injected"},
            status=rule.status if rule else 500,
            headers={"Retry-After": rule.retry_after} if rule and rule.retry_after else None,
        )
        if rule is not None and not rule.after_upstream:
            return made_up
        if self._session is None:
            ssl_context = self._upstream_credentials.ssl_context
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_context))
        body = await request.read()
        async with self._session.request(
            request.method,
            self._upstream_credentials.server + request.path_qs,
            data=body or None,
            headers={k: v for k, v in request.headers.items() if k == "Content-Type"},
        ) as upstream:
            if rule is not None:
                await upstream.read()
                return made_up
            reply = web.StreamResponse(
                status=upstream.status,
                headers={"Content-Type": upstream.headers.get("Content-Type", "")},
            )
            await reply.prepare(request)
            async for chunk in upstream.content.iter_any():
                await reply.write(chunk)
            await reply.write_eof()
            return reply


@pytest.fixture
def proxy(cluster: Any) -> Iterator[FaultyProxy]:
    with FaultyProxy(cluster) as running:
        yield running


def through(proxy: FaultyProxy) -> kube.Credentials:
    return kube.Credentials(server=proxy.url, ssl_context=False)


def test_429_and_5xx_are_retried_as_the_server_asks(
    namespace: str, proxy: FaultyProxy, api: kubernetes.client.ApiClient
) -> None:
    kubernetes.client.CoreV1Api(api).create_namespaced_config_map(namespace, configmap("there"))

    async def scenario() -> None:
        async with kube.Client(through(proxy)) as client:
            proxy.rules = [Rule("GET", 429, retry_after="1"), Rule("GET", 503)]
            started = time.monotonic()
            got = await client.get(CM, namespace=namespace, name="there")
            assert got["metadata"]["name"] == "there"
            assert time.monotonic() - started >= 1.0  # Retry-After: 1 was honoured
            assert client.retries == {"429": 1, "503": 1}
            assert [s for _, _, s in proxy.seen] == [429, 503, None]
            # A Retry-After beyond the call's budget fails at once, saying how long.
            proxy.rules = [Rule("GET", 429, retry_after="120")]
            started = time.monotonic()
            with pytest.raises(kube.Throttled, match="temporarily overloaded") as caught:
                await client.get(CM, namespace=namespace, name="there")
            assert caught.value.retry_after == 120.0
            assert time.monotonic() - started < 1.0

    asyncio.run(scenario())


def test_writes_are_repeated_only_where_a_repeat_cannot_double_them(
    namespace: str, proxy: FaultyProxy, api: kubernetes.client.ApiClient
) -> None:
    core = kubernetes.client.CoreV1Api(api)

    async def scenario() -> None:
        async with kube.Client(through(proxy)) as client:
            # 429: the server did nothing; the create is sent again and made once.
            proxy.rules = [Rule("POST", 429, retry_after="0")]
            await client.create(CM, configmap("throttled"), namespace=namespace)
            assert client.writes[("POST", "configmaps")] == 1
            # The create reached the server but its answer was lost: not repeated (a
            # repeat would report AlreadyExists about our own object); the caller decides.
            proxy.rules = [Rule("POST", 503, after_upstream=True)]
            proxy.seen.clear()
            with pytest.raises(errors.Unavailable, match="temporarily unavailable"):
                await client.create(CM, configmap("lost"), namespace=namespace)
            assert [m for m, _, _ in proxy.seen] == ["POST"]
            assert core.read_namespaced_config_map("lost", namespace).metadata.name == "lost"
            # A merge patch is repeated (it sets values); a delete whose answer was lost
            # finds the object gone on the repeat, which is success.
            proxy.rules = [Rule("PATCH", 502, after_upstream=True)]
            patched = await client.patch(
                CM, namespace=namespace, name="lost", body={"data": {"k": "v"}}
            )
            assert patched["data"] == {"k": "v"}
            proxy.rules = [Rule("DELETE", 504, after_upstream=True)]
            proxy.seen.clear()
            await client.delete(CM, namespace=namespace, name="lost")
            assert [(m, s) for m, _, s in proxy.seen] == [("DELETE", 504), ("DELETE", None)]
            # A JSON patch is not repeated.
            proxy.rules = [Rule("PATCH", 503, after_upstream=True)]
            with pytest.raises(errors.Unavailable):
                await client.patch(
                    CM,
                    namespace=namespace,
                    name="throttled",
                    patch_type="json",
                    body=[{"op": "add", "path": "/data", "value": {"n": "1"}}],
                )

    asyncio.run(scenario())


def test_a_watch_told_429_waits_and_resumes(namespace: str, proxy: FaultyProxy) -> None:
    async def scenario() -> None:
        async with kube.Client(through(proxy)) as client:
            proxy.rules = [Rule("GET", 429, retry_after="1", watch=True)]
            stream = client.stream(CM, namespace=namespace, retry_delay=0.05)
            assert (await asyncio.wait_for(anext(stream), 10)).type == "SYNC"
            started = time.monotonic()
            # The watch was told to wait: the stream lists again after 1 s, then watches.
            assert (await asyncio.wait_for(anext(stream), 10)).type == "SYNC"
            assert time.monotonic() - started >= 0.9
            await client.create(CM, configmap("seen"), namespace=namespace)
            event = await asyncio.wait_for(anext(stream), 10)
            assert event.object is not None
            assert (event.type, event.object["metadata"]["name"]) == ("ADDED", "seen")
            assert ("GET", True, 429) in proxy.seen
            await stream.aclose()

    asyncio.run(scenario())


def test_an_untrusted_server_certificate_fails_at_once(cluster: Any) -> None:
    """Not retried: waiting does not make a certificate trusted."""
    credentials = kube.Credentials(server=cluster.server, ssl_context=ssl.create_default_context())

    async def scenario() -> None:
        async with kube.Client(credentials) as client:
            started = time.monotonic()
            with pytest.raises(errors.Unavailable, match="certificate is not trusted"):
                await client.get(CM, namespace="default", name="x")
            assert time.monotonic() - started < 2.0
            assert not client.retries

    asyncio.run(scenario())
