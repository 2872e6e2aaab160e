"""The external executor and worker reports: validation and coalescing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import kubernetes
import prometheus_client
import pytest

from opkeeper import kube
from opkeeper.controller import operations
from tests.helpers import Ops, controller_in_thread, wait_for

EXTERNAL: dict[str, Any] = {"type": "domain_delete", "executor": {"external": {}}}


@pytest.fixture
def ops(cluster: Any, api: kubernetes.client.ApiClient, namespace: str) -> Iterator[Ops]:
    with controller_in_thread(
        kubeconfig=cluster.kubeconfig, namespace=namespace, coalesce_seconds=1.0
    ):
        yield Ops(api, namespace)


def status_writes() -> float:
    return (
        prometheus_client.REGISTRY.get_sample_value(
            "opkeeper_api_writes_total", {"verb": "PATCH", "resource": "operations/status"}
        )
        or 0.0
    )


def test_external_waits_then_succeeds_on_a_reported_result(ops: Ops) -> None:
    ops.create("ext", EXTERNAL)
    status = ops.wait_state("ext", "WaitingExternal")
    assert status["executor"]["kind"] == "external"
    ops.patch_status("ext", {"progress": 30})
    ops.patch_status("ext", {"result": {"type": "domain", "value": "gone"}})
    done = ops.wait_state("ext", "Succeeded")
    assert done["result"] == {"type": "domain", "value": "gone"}
    assert done["reason"] == "WorkerReportedResult"


def test_reported_error_is_failed_external(ops: Ops) -> None:
    ops.create("ext-err", EXTERNAL)
    ops.wait_state("ext-err", "WaitingExternal")
    ops.patch_status("ext-err", {"errorCode": 42, "errorInfo": ["registry says no"]})
    status = ops.wait_state("ext-err", "FailedExternal")
    assert status["message"] == "registry says no"


def test_cancel_external(ops: Ops) -> None:
    ops.create("ext-cancel", EXTERNAL)
    ops.wait_state("ext-cancel", "WaitingExternal")
    ops.patch("ext-cancel", {"spec": {"cancel": True}})
    ops.wait_state("ext-cancel", "Cancelled")


def test_a_cancel_between_the_status_write_and_the_id_label_is_not_lost(
    cluster: Any,
    api: kubernetes.client.ApiClient,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first reconcile writes the status, then the id label. A cancel that lands in
    between comes back in the label patch's answer; when its watch event arrives after
    that answer (a busy machine), the event is older than what the controller holds and
    is dropped, so the controller must notice the cancel in the answer itself."""
    patch, observe = kube.Client.patch, operations.Reconciler.observe
    # "before" -> "holding" its events from our first status write -> "after" the label.
    phase = {"racy": "before"}
    held: list[tuple[operations.Reconciler, str | None, kube.Body]] = []

    def late(self: operations.Reconciler, *, event_type: str | None, body: kube.Body) -> None:
        if body["metadata"]["name"] == "racy" and phase["racy"] == "holding":
            held.append((self, event_type, body))
        else:
            observe(self, event_type=event_type, body=body)

    def deliver() -> None:
        phase["racy"] = "after"
        for reconciler, event_type, body in held:
            observe(reconciler, event_type=event_type, body=body)

    async def racing(self: kube.Client, resource: kube.Resource, **kwargs: Any) -> kube.Body:
        if kwargs.get("name") != "racy" or phase["racy"] == "after":
            return await patch(self, resource, **kwargs)
        if kwargs.get("subresource") == "status":
            phase["racy"] = "holding"
            return await patch(self, resource, **kwargs)
        cancel = {"spec": {"cancel": True}}
        await patch(self, resource, namespace=namespace, name="racy", body=cancel)
        answer = await patch(self, resource, **kwargs)
        # Runs once the reconcile has taken the answer as what it holds.
        asyncio.get_running_loop().call_soon(deliver)
        return answer

    monkeypatch.setattr(kube.Client, "patch", racing)
    monkeypatch.setattr(operations.Reconciler, "observe", late)
    with controller_in_thread(kubeconfig=cluster.kubeconfig, namespace=namespace):
        ops = Ops(api, namespace)
        ops.create("racy", EXTERNAL)
        ops.wait_state("racy", "Cancelled", timeout=15)
    assert held, "the cancel's watch event came late, as on a busy machine"


def test_a_write_answer_older_than_a_watched_event_does_not_hide_it(
    cluster: Any,
    api: kubernetes.client.ApiClient,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The id label's answer can reach the controller after the watch event of a later
    write by someone else (here a cancel: all share one loop, and a busy machine delays
    the answer). The controller must keep the newer body it holds, not the answer."""
    patch, observe = kube.Client.patch, operations.Reconciler.observe
    seen: list[int] = []
    cancelled = {"late": False}

    def counting(self: operations.Reconciler, *, event_type: str | None, body: kube.Body) -> None:
        if body["metadata"]["name"] == "late":
            seen.append(kube.resource_version_of(body))
        observe(self, event_type=event_type, body=body)

    async def racing(self: kube.Client, resource: kube.Resource, **kwargs: Any) -> kube.Body:
        label = kwargs.get("name") == "late" and kwargs.get("subresource") is None
        if not label or cancelled["late"]:
            return await patch(self, resource, **kwargs)
        answer = await patch(self, resource, **kwargs)
        cancelled["late"] = True
        cancel = {"spec": {"cancel": True}}
        later = await patch(self, resource, namespace=namespace, name="late", body=cancel)
        deadline = asyncio.get_running_loop().time() + 10
        while max(seen, default=0) < kube.resource_version_of(later):
            assert asyncio.get_running_loop().time() < deadline, "the cancel was never watched"
            await asyncio.sleep(0.01)
        return answer

    monkeypatch.setattr(kube.Client, "patch", racing)
    monkeypatch.setattr(operations.Reconciler, "observe", counting)
    with controller_in_thread(kubeconfig=cluster.kubeconfig, namespace=namespace):
        ops = Ops(api, namespace)
        ops.create("late", EXTERNAL)
        ops.wait_state("late", "Cancelled", timeout=15)
    assert cancelled["late"]


def test_a_burst_of_reports_costs_few_controller_writes(ops: Ops) -> None:
    ops.create("chatty", EXTERNAL)
    ops.wait_state("chatty", "WaitingExternal")
    updated = ops.status("chatty")["updatedAt"]
    before = status_writes()
    for progress in range(1, 41):
        ops.patch_status("chatty", {"progress": progress})
    # The report burst is acknowledged (updatedAt moves) ...
    wait_for(lambda: ops.status("chatty")["updatedAt"] != updated, what="updatedAt bump")
    final = wait_for(lambda: (s := ops.status("chatty"))["progress"] == 40 and s, what="40")
    # ... with a write per coalescing window, not one per report.
    assert status_writes() - before <= 4
    assert final["state"] == "WaitingExternal"


def test_a_worker_cannot_move_the_state(ops: Ops) -> None:
    ops.create("sneaky", EXTERNAL)
    ops.wait_state("sneaky", "WaitingExternal")
    ops.patch_status("sneaky", {"state": "Succeeded", "reason": "IWish"})
    restored = ops.wait_state("sneaky", "WaitingExternal")
    assert restored["reason"] == "WaitingExternal"
    wait_for(
        lambda: any(e.reason == "StatusOverwritten" for e in ops.events("sneaky")),
        what="a Warning about the overwrite",
    )


def test_progress_does_not_go_backwards(ops: Ops) -> None:
    ops.create("forward", EXTERNAL)
    ops.wait_state("forward", "WaitingExternal")
    updated = ops.status("forward")["updatedAt"]
    ops.patch_status("forward", {"progress": 50})
    wait_for(lambda: ops.status("forward")["updatedAt"] != updated, what="report acknowledged")
    ops.patch_status("forward", {"progress": 20})
    wait_for(
        lambda: any(e.reason == "ProgressWentBack" for e in ops.events("forward")),
        what="a Warning about progress",
    )
    assert ops.status("forward")["progress"] == 50
