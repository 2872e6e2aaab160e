"""The controller against the real API server, with the builtin executor.

Covers the life of an operation that needs nothing outside the controller:
ids and labels, the Succeeded condition and Events, progress steps, failure,
cancel (and its visible refusal), relaunch with history, dependencies,
deadlines, retries with backoff, TTL, `kubectl wait` and the metrics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import kubernetes
import prometheus_client
import pytest

from opkeeper import ids, kube
from tests.helpers import Ops, controller_in_thread, wait_for

NOOP: dict[str, Any] = {"type": "test_noop", "executor": {"builtin": {"action": "noop"}}}
FAIL: dict[str, Any] = {
    "type": "test_fail",
    "executor": {"builtin": {"action": "fail", "message": "boom"}},
}


def sleep(seconds: float, steps: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "type": "test_sleep",
        "executor": {"builtin": {"action": "sleep", "seconds": seconds, "progressSteps": steps}},
        **extra,
    }


@pytest.fixture
def ops(cluster: Any, api: kubernetes.client.ApiClient, namespace: str) -> Iterator[Ops]:
    with controller_in_thread(kubeconfig=cluster.kubeconfig, namespace=namespace):
        yield Ops(api, namespace)


def condition(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), None)


def test_noop_succeeds_with_id_label_condition_and_events(ops: Ops) -> None:
    ops.create("noop-1", NOOP)
    status = ops.wait_state("noop-1", "Succeeded")
    assert status["id"] >= 1
    # The label is the reconcile's second write, just after the status.
    op = wait_for(
        lambda: (o := ops.get("noop-1"))["metadata"].get("labels", {}).get("opkeeper.dev/id") and o,
        what="the id label",
    )
    assert op["metadata"]["labels"]["opkeeper.dev/id"] == str(status["id"])
    assert status["attempt"] == 0
    assert status["progress"] == 100
    assert {"createdAt", "startedAt", "finishedAt", "updatedAt"} <= set(status)
    succeeded = condition(status, "Succeeded")
    assert succeeded is not None
    assert succeeded["status"] == "True"
    wait_for(
        lambda: {e.reason for e in ops.events("noop-1")} >= {"Started", "Completed"},
        what="an Event per transition",
    )


def _sealed(kubeconfig: str, *, namespace: str, name: str) -> ids.Stamp:
    """An id stamped as the gateway stamps one (same key Secret as the controller's)."""

    async def stamp() -> ids.Stamp:
        async with kube.Client(kube.Credentials.from_kubeconfig(kubeconfig)) as client:
            allocator = ids.IdAllocator(client, namespace="opkeeper-system")
            seal = ids.IdSeal(client, namespace="opkeeper-system")
            return await seal.stamp(await allocator.allocate(), namespace=namespace, name=name)

    return asyncio.run(stamp())


def test_ids_are_unique_and_only_a_sealed_preset_label_is_kept(cluster: Any, ops: Ops) -> None:
    for i in range(5):
        ops.create(f"many-{i}", NOOP)
    found = [ops.wait_state(f"many-{i}", "Succeeded")["id"] for i in range(5)]
    assert len(set(found)) == 5
    stamp = _sealed(cluster.kubeconfig, namespace=ops.namespace, name="sealed")
    ops.create("sealed", NOOP, labels=dict(stamp.labels), annotations=dict(stamp.annotations))
    assert ops.wait_state("sealed", "Succeeded")["id"] == stamp.id
    # A tenant claiming an existing id with a bare label, or by copying a seal made for
    # another object, gets a fresh id, and the label is corrected to it.
    ops.create("claims-many-0", NOOP, labels={ids.LABEL: str(found[0])})
    ops.create(
        "copied-seal",
        NOOP,
        labels={ids.LABEL: str(stamp.id)},
        annotations=dict(stamp.annotations),
    )
    for name in ("claims-many-0", "copied-seal"):
        given = ops.wait_state(name, "Succeeded")["id"]
        assert given not in (*found, stamp.id)
        wait_for(
            lambda n=name, g=given: ops.get(n)["metadata"]["labels"][ids.LABEL] == str(g),
            what=f"the label of {name} corrected to its id",
        )


def test_sleep_reports_progress_steps_then_succeeds(ops: Ops) -> None:
    ops.create("sleepy", sleep(3, steps=2))
    seen = wait_for(
        lambda: (
            (s := ops.status("sleepy")).get("state") == "Running"
            and s.get("progress") in (33, 66)
            and s
        ),
        what="an intermediate progress step",
    )
    assert seen["eta"]
    assert ops.wait_state("sleepy", "Succeeded")["progress"] == 100


def test_fail_fails_internally_with_error_and_condition(ops: Ops) -> None:
    ops.create("failing", FAIL)
    status = ops.wait_state("failing", "FailedInternal")
    assert status["errorCode"] == 1
    assert status["errorInfo"] == ["boom"]
    assert condition(status, "Succeeded")["status"] == "False"  # type: ignore[index]
    assert condition(status, "Succeeded")["reason"] == "BuiltinFail"  # type: ignore[index]


def test_cancel_stops_a_running_operation(ops: Ops) -> None:
    ops.create("long", sleep(600))
    ops.wait_state("long", "Running")
    ops.patch("long", {"spec": {"cancel": True}})
    status = ops.wait_state("long", "Cancelled")
    assert status["reason"] == "CancelRequested"
    assert condition(status, "Succeeded")["status"] == "False"  # type: ignore[index]


def test_cancel_of_a_finished_operation_is_refused_visibly(ops: Ops) -> None:
    ops.create("done", NOOP)
    ops.wait_state("done", "Succeeded")
    ops.patch("done", {"spec": {"cancel": True}})
    refused = wait_for(
        lambda: condition(ops.status("done"), "CancelRefused"), what="CancelRefused condition"
    )
    assert refused["status"] == "True"
    assert "cannot be cancelled" in refused["message"]
    assert ops.status("done")["state"] == "Succeeded"
    wait_for(
        lambda: any(
            e.type == "Warning" and e.reason == "CancelRefused" for e in ops.events("done")
        ),
        what="a Warning Event",
    )


def test_relaunch_starts_a_new_attempt_and_keeps_history(ops: Ops) -> None:
    ops.create("again", {**FAIL, "params": {"try": 1}})
    first = ops.wait_state("again", "FailedInternal")
    ops.patch(
        "again",
        {
            "spec": {
                "relaunch": 1,
                "params": {"try": 2},
                "executor": {"builtin": {"action": "noop"}},
            }
        },
    )
    status = ops.wait_state("again", "Succeeded")
    assert status["attempt"] == 1
    assert status["observedRelaunch"] == 1
    assert status["id"] == first["id"]
    assert "errorCode" not in status
    [previous] = status["history"]
    assert previous["attempt"] == 0
    assert previous["state"] == "FailedInternal"
    assert previous["params"] == {"try": 1}
    assert status["executor"]["params"] == {"try": 2}


def test_relaunch_of_an_active_operation_is_refused_visibly(ops: Ops) -> None:
    ops.create("busy", sleep(600))
    ops.wait_state("busy", "Running")
    ops.patch("busy", {"spec": {"relaunch": 1}})
    refused = wait_for(
        lambda: condition(ops.status("busy"), "RelaunchRefused"), what="RelaunchRefused"
    )
    assert refused["reason"] == "OperationActive"
    assert ops.status("busy")["attempt"] == 0


def test_dependencies_wait_then_run(ops: Ops) -> None:
    ops.create("child", {**NOOP, "dependsOn": ["parent"]})
    ops.wait_state("child", "Pending")
    ops.create("parent", sleep(0.5))
    parent = ops.wait_state("parent", "Succeeded")
    child = ops.wait_state("child", "Succeeded")
    assert child["startedAt"] >= parent["finishedAt"]


def test_a_failed_dependency_fails_its_dependents_internally(ops: Ops) -> None:
    ops.create("base", FAIL)
    ops.create("on-base", {**NOOP, "dependsOn": ["base"]})
    ops.create("on-on-base", {**NOOP, "dependsOn": ["on-base"]})
    status = ops.wait_state("on-base", "FailedInternal")
    assert status["reason"] == "DependencyFailed"
    assert "base is FailedInternal" in status["message"]
    assert "on-base is FailedInternal" in ops.wait_state("on-on-base", "FailedInternal")["message"]


def test_a_cancelled_dependency_fails_its_dependents(ops: Ops) -> None:
    ops.create("slow", sleep(600))
    ops.create("after-slow", {**NOOP, "dependsOn": ["slow"]})
    ops.wait_state("slow", "Running")
    ops.patch("slow", {"spec": {"cancel": True}})
    assert "slow is Cancelled" in ops.wait_state("after-slow", "FailedInternal")["message"]


def test_dependency_cycles_are_rejected(ops: Ops) -> None:
    ops.create("cyc-a", {**NOOP, "dependsOn": ["cyc-b"]})
    ops.create("cyc-b", {**NOOP, "dependsOn": ["cyc-a"]})
    for name in ("cyc-a", "cyc-b"):
        status = ops.wait_state(name, "FailedInternal")
        assert status["reason"] in ("DependencyCycle", "DependencyFailed")
    assert "cycle" in ops.status("cyc-a")["message"] + ops.status("cyc-b")["message"]


def test_deadline_fails_a_running_attempt(ops: Ops) -> None:
    ops.create("late", sleep(600, deadlineSeconds=1))
    status = ops.wait_state("late", "FailedInternal", timeout=20)
    assert status["reason"] == "DeadlineExceeded"


def test_retries_back_off_then_give_up(ops: Ops) -> None:
    ops.create("flaky", {**FAIL, "retries": {"limit": 2, "backoffSeconds": 1}})
    status = ops.wait_state("flaky", "FailedInternal", timeout=30)
    assert status["attempt"] == 2
    assert status["retriesUsed"] == 2
    assert [h["state"] for h in status["history"]] == ["FailedInternal", "FailedInternal"]
    first, second = status["history"]
    # backoff 1 s then 2 s: attempt 1 started >= 1 s after attempt 0 ended
    assert second["startedAt"] > first["finishedAt"]


def test_ttl_deletes_a_finished_operation(ops: Ops) -> None:
    ops.create("short-lived", {**NOOP, "ttlSecondsAfterFinished": 1})
    ops.wait_state("short-lived", "Succeeded")

    def gone() -> bool:
        try:
            ops.get("short-lived")
        except kubernetes.client.ApiException as exc:
            return exc.status == 404
        return False

    wait_for(gone, timeout=20, what="TTL deletion")


def test_kubectl_wait_for_the_succeeded_condition(cluster: Any, ops: Ops) -> None:
    ops.create("waited", sleep(1))
    result = cluster.kubectl(
        "wait", "-n", ops.namespace, "--for=condition=Succeeded", "op/waited", "--timeout=30s"
    )
    assert "condition met" in result.stdout


def test_metrics_count_transitions_and_writes(ops: Ops) -> None:
    def sample(name: str, **labels: str) -> float:
        return prometheus_client.REGISTRY.get_sample_value(name, labels) or 0.0

    def succeeded() -> float:
        return sample(
            "opkeeper_operation_transitions_total", from_state="Running", to_state="Succeeded"
        )

    before = succeeded()
    writes_before = sample("opkeeper_api_writes_total", verb="PATCH", resource="operations/status")
    for i in range(10):
        ops.create(f"counted-{i}", NOOP)
    for i in range(10):
        ops.wait_state(f"counted-{i}", "Succeeded")
    # The controller counts a transition once its write's answer is in, a moment after the
    # API server (and so this test) can see it.
    wait_for(lambda: succeeded() - before >= 10, what="10 transitions counted")
    assert succeeded() - before == 10
    # One status write per noop operation (plus one label write): the budget.
    writes = (
        sample("opkeeper_api_writes_total", verb="PATCH", resource="operations/status")
        - writes_before
    )
    assert writes == 10
    assert (
        sample("opkeeper_operation_duration_seconds_count", type="test_noop", outcome="Succeeded")
        >= 10
    )
    assert sample("opkeeper_operations", state="Succeeded") >= 10
