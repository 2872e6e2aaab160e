"""The external executor and worker reports: validation and coalescing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import kubernetes
import prometheus_client
import pytest

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
