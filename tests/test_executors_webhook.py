"""The webhook executor against a real HTTP server on loopback and the real API server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest

from tests.helpers import FakeExternalSystem, Ops, controller_in_thread, wait_for


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
