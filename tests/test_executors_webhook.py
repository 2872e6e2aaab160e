"""The webhook executor against a real HTTP server on loopback and the real API server."""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest
from aiohttp import web

from opkeeper.executors import webhook
from tests.helpers import (
    FakeExternalSystem,
    Ops,
    ServerInThread,
    controller_in_thread,
    wait_for,
)

LOOPBACK = ("127.0.0.1/32",)
"""The allow-list the tests' controllers need: their webhook servers listen on loopback,
which the default policy refuses."""


@pytest.fixture
def external() -> Iterator[FakeExternalSystem]:
    with FakeExternalSystem() as server:
        yield server


@pytest.fixture
def ops(cluster: Any, api: kubernetes.client.ApiClient, namespace: str) -> Iterator[Ops]:
    # Fast webhook backoff so polling tests take a second, not a minute.
    with controller_in_thread(
        kubeconfig=cluster.kubeconfig,
        namespace=namespace,
        webhook_initial_delay=0.2,
        webhook_max_delay=1.0,
        webhook_allow=LOOPBACK,
    ):
        yield Ops(api, namespace)


def hook(server: FakeExternalSystem, *, poll: bool = True, **extra: Any) -> dict[str, Any]:
    webhook: dict[str, Any] = {
        "url": f"{server.url}/start",
        "cancelUrl": f"{server.url}/cancel/{{id}}",
    }
    if poll:
        webhook["pollUrl"] = f"{server.url}/poll/{{id}}"
    return {
        "type": "domain_transfer",
        "params": {"domain": "example.org"},
        "executor": {"webhook": webhook},
        **extra,
    }


def test_accepted_work_waits_externally_then_succeeds_by_polling(
    ops: Ops, external: FakeExternalSystem
) -> None:
    op = ops.create("transfer", hook(external))
    status = ops.wait_state("transfer", "WaitingExternal")
    key = f"{op['metadata']['uid']}-0"
    assert status["executor"]["idempotencyKey"] == key
    assert status["executor"]["externalId"] == "ext-1"
    sent = external.jobs[key]["operation"]
    assert (sent["name"], sent["params"], sent["id"]) == (
        "transfer",
        {"domain": "example.org"},
        status["id"],
    )
    external.replies["ext-1"] = {"state": "running", "progress": 40}
    wait_for(lambda: ops.status("transfer").get("progress") == 40, what="polled progress")
    external.replies["ext-1"] = {
        "state": "succeeded",
        "result": {"type": "domain", "value": "example.org"},
    }
    done = ops.wait_state("transfer", "Succeeded")
    assert done["result"] == {"type": "domain", "value": "example.org"}
    assert external.posts[key] == 1


def test_external_failure_is_failed_external(ops: Ops, external: FakeExternalSystem) -> None:
    ops.create("refused", hook(external))
    ops.wait_state("refused", "WaitingExternal")
    external.replies["ext-1"] = {"state": "failed", "error": {"code": 510, "info": ["taken"]}}
    status = ops.wait_state("refused", "FailedExternal")
    assert (status["errorCode"], status["errorInfo"]) == (510, ["taken"])


def test_a_rejected_call_fails_externally(ops: Ops, external: FakeExternalSystem) -> None:
    external.start_status = 422
    ops.create("rejected", hook(external))
    status = ops.wait_state("rejected", "FailedExternal")
    assert status["reason"] == "WebhookRejected"
    assert status["errorCode"] == 422


def test_callback_result_without_polling(ops: Ops, external: FakeExternalSystem) -> None:
    ops.create("callback", hook(external, poll=False))
    ops.wait_state("callback", "WaitingExternal")
    ops.patch_status("callback", {"result": {"type": "domain", "value": {"ok": True}}})
    assert ops.wait_state("callback", "Succeeded")["result"]["value"] == {"ok": True}


def test_unreachable_system_is_retried_with_the_same_key(
    ops: Ops, external: FakeExternalSystem
) -> None:
    external.start_status = 503
    op = ops.create("retried", hook(external))
    key = f"{op['metadata']['uid']}-0"
    wait_for(lambda: external.posts[key] >= 2, what="a retried POST")
    assert ops.status("retried")["state"] == "Pending"
    external.start_status = 202
    ops.wait_state("retried", "WaitingExternal")
    assert list(external.jobs) == [key]


def test_cancel_calls_the_cancel_url(ops: Ops, external: FakeExternalSystem) -> None:
    ops.create("cancel-me", hook(external))
    ops.wait_state("cancel-me", "WaitingExternal")
    ops.patch("cancel-me", {"spec": {"cancel": True}})
    ops.wait_state("cancel-me", "Cancelled")
    wait_for(lambda: external.cancelled == ["ext-1"], what="the cancel call")


def test_relaunch_uses_a_new_key_per_attempt(ops: Ops, external: FakeExternalSystem) -> None:
    op = ops.create("relaunched", hook(external))
    ops.wait_state("relaunched", "WaitingExternal")
    external.replies["ext-1"] = {"state": "failed", "error": {"code": 2, "info": ["x"]}}
    ops.wait_state("relaunched", "FailedExternal")
    ops.patch("relaunched", {"spec": {"relaunch": 1}})
    wait_for(
        lambda: (
            ops.status("relaunched").get("attempt") == 1
            and ops.status("relaunched").get("state") == "WaitingExternal"
        ),
        what="attempt 1",
    )
    uid = op["metadata"]["uid"]
    assert sorted(external.jobs) == [f"{uid}-0", f"{uid}-1"]
    assert all(count == 1 for count in external.posts.values())


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int
    body: str = ""
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


class ScriptedServer(ServerInThread):
    """An HTTP server on 127.0.0.1 answering each path with a fixed reply, and recording
    every request it gets (method, path)."""

    def __init__(self) -> None:
        super().__init__()
        self.replies: dict[str, Reply] = {}
        self.requests: list[tuple[str, str]] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self._handle)

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path))
        reply = self.replies.get(request.path, Reply(404))
        return web.Response(status=reply.status, text=reply.body, headers=reply.headers)


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    with ScriptedServer() as server:
        yield server


def _webhook(url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "domain_transfer", "executor": {"webhook": {"url": url, **extra}}}


def _calls_refused_by_the_api_server(cluster: Any) -> float:
    """Connections the API server dropped or refused: a failed TLS handshake (a client
    that does not trust its CA, as the webhook client would not, or plain HTTP) or an
    unauthorized request (a client without credentials)."""
    metrics = cluster.kubectl("get", "--raw", "/metrics").stdout
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("apiserver_tls_handshake_errors_total")
        or (line.startswith("authorization_attempts_total") and 'result="allowed"' not in line)
    )


def test_the_api_server_is_never_called_even_on_an_allowed_address(cluster: Any, ops: Ops) -> None:
    # The API server listens on 127.0.0.1, inside the controller's allow-list: its own
    # endpoint is refused anyway, by literal address and by a name resolving to it.
    port = int(cluster.server.rsplit(":", 1)[1])
    path = f"/apis/opkeeper.dev/v1alpha1/namespaces/{ops.namespace}/operations"
    before = _calls_refused_by_the_api_server(cluster)
    for name, host in (("by-address", "127.0.0.1"), ("by-name", "localhost")):
        ops.create(name, _webhook(f"https://{host}:{port}{path}"))
        status = ops.wait_state(name, "FailedInternal")
        assert status["reason"] == "WebhookNotAllowed"
        assert f"webhook destination {host} is not allowed" in status["message"]
    assert _calls_refused_by_the_api_server(cluster) == before, "a call reached the API server"
    # The count does see such a call: the same POST sent directly, as the webhook client
    # would have sent it (no credentials, the system's CAs), is counted.
    direct = urllib.request.Request(f"https://127.0.0.1:{port}{path}", data=b"{}", method="POST")
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(direct, timeout=10)
    wait_for(
        lambda: _calls_refused_by_the_api_server(cluster) > before, what="the direct POST counted"
    )


def test_defaults_refuse_loopback(
    cluster: Any, api: kubernetes.client.ApiClient, namespace: str, scripted: ScriptedServer
) -> None:
    with controller_in_thread(kubeconfig=cluster.kubeconfig, namespace=namespace):
        ops = Ops(api, namespace)
        ops.create("loopback", _webhook(f"{scripted.url}/start"))
        status = ops.wait_state("loopback", "FailedInternal")
    assert status["reason"] == "WebhookNotAllowed"
    assert "127.0.0.1 is a loopback address" in status["message"]
    assert scripted.requests == []


def test_a_legacy_numeric_host_is_refused(ops: Ops, scripted: ScriptedServer) -> None:
    # 2130706433 is 127.0.0.1 to the C library: never handed to it.
    ops.create("numeric", _webhook(f"http://2130706433:{scripted.port}/start"))
    status = ops.wait_state("numeric", "FailedInternal")
    assert status["reason"] == "WebhookNotAllowed"
    assert scripted.requests == []


def test_a_redirect_is_not_followed(ops: Ops, scripted: ScriptedServer) -> None:
    with ScriptedServer() as target:
        target.replies["/start"] = Reply(202, '{"id": "x"}')
        scripted.replies["/start"] = Reply(302, headers={"Location": f"{target.url}/start"})
        ops.create("redirected", _webhook(f"{scripted.url}/start"))
        status = ops.wait_state("redirected", "FailedExternal")
        assert status["reason"] == "WebhookRedirect"
        assert scripted.requests == [("POST", "/start")]
        assert target.requests == []


def test_a_huge_reply_is_a_bad_reply(ops: Ops, scripted: ScriptedServer) -> None:
    # Valid JSON, only too long: the size alone makes it a bad reply.
    huge = json.dumps({"id": "x", "padding": "x" * (1 << 20)})
    scripted.replies["/start"] = Reply(202, huge)
    ops.create("huge", _webhook(f"{scripted.url}/start"))
    status = ops.wait_state("huge", "FailedExternal")
    assert status["reason"] == "WebhookBadReply"
    assert f"longer than {webhook.MAX_REPLY_BYTES} bytes" in status["message"]
    assert status["errorInfo"] == [huge[: webhook.MAX_COPIED_CHARS]]
    assert "x" * (webhook.MAX_COPIED_CHARS + 1) not in json.dumps(status)


@pytest.mark.parametrize(
    ("body", "why"),
    [("<html>all good</html>", "not JSON"), ('["accepted"]', "JSON that is not an object")],
)
def test_a_reply_that_is_not_a_json_object_is_a_bad_reply(
    ops: Ops, scripted: ScriptedServer, body: str, why: str
) -> None:
    scripted.replies["/start"] = Reply(200, body)
    ops.create("odd", _webhook(f"{scripted.url}/start"))
    status = ops.wait_state("odd", "FailedExternal")
    assert status["reason"] == "WebhookBadReply"
    assert why in status["message"]
    assert status["errorInfo"] == [body]
    assert scripted.requests == [("POST", "/start")], "a bad reply is not retried"


def test_a_bad_poll_reply_ends_the_attempt(ops: Ops, scripted: ScriptedServer) -> None:
    scripted.replies["/start"] = Reply(202, '{"id": "e1"}')
    scripted.replies["/poll/e1"] = Reply(200, "busy")
    urls = {"pollUrl": f"{scripted.url}/poll/{{id}}", "cancelUrl": f"{scripted.url}/stop/{{id}}"}
    ops.create("polled", _webhook(f"{scripted.url}/start", **urls))
    status = ops.wait_state("polled", "FailedExternal")
    assert status["reason"] == "WebhookBadReply"
    # The external system accepted the work: it is told to stop what nobody follows now.
    assert scripted.requests == [("POST", "/start"), ("GET", "/poll/e1"), ("POST", "/stop/e1")]
