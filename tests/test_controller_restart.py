"""Restart safety: SIGKILL the controller with every executor kind in flight.

The controller runs as a real `opkeeper controller` subprocess. While it is
dead, the world moves on (the Job completes, the external system finishes,
an outside actor reports); after the restart every operation must reach its
terminal state, and no executor may have been started twice for one attempt:
one Job per attempt (same uid as recorded), one accepted webhook call per
idempotency key, the sleep continued rather than restarted.
"""

from __future__ import annotations

import pathlib
from typing import Any

import kubernetes

from opkeeper.executors import job
from tests.helpers import (
    ControllerProcess,
    FakeExternalSystem,
    Ops,
    complete_job,
)

TEMPLATE = {
    "spec": {
        "backoffLimit": 0,
        "template": {
            "spec": {"restartPolicy": "Never", "containers": [{"name": "w", "image": "busybox"}]}
        },
    }
}


def test_sigkill_with_every_executor_in_flight(
    cluster: Any, api: kubernetes.client.ApiClient, namespace: str, tmp_path: pathlib.Path
) -> None:
    ops = Ops(api, namespace)
    controller = ControllerProcess(
        env=cluster.env, namespace=namespace, log=tmp_path / "controller.log"
    )
    with FakeExternalSystem() as external:
        webhook = {"url": f"{external.url}/start", "pollUrl": f"{external.url}/poll/{{id}}"}
        specs: dict[str, dict[str, Any]] = {
            "sleep": {
                "executor": {"builtin": {"action": "sleep", "seconds": 6, "progressSteps": 2}}
            },
            "job": {"executor": {"job": {"template": TEMPLATE}}},
            "webhook": {"executor": {"webhook": webhook}},
            "external": {"executor": {"external": {}}},
            "after-job": {"executor": {"builtin": {"action": "noop"}}, "dependsOn": ["job"]},
        }
        controller.start()
        try:
            for name, spec in specs.items():
                ops.create(name, {"type": f"restart_{name}", **spec})
            in_flight = {
                "sleep": "Running",
                "job": "Running",
                "webhook": "WaitingExternal",
                "external": "WaitingExternal",
                "after-job": "Pending",
            }
            for name, state in in_flight.items():
                ops.wait_state(name, state, timeout=60)
            before = {name: ops.status(name) for name in specs}
            # A burst of creations, killed while it is being processed.
            for i in range(30):
                ops.create(
                    f"burst-{i}",
                    {"type": "restart_burst", "executor": {"builtin": {"action": "noop"}}},
                )
            controller.kill()

            # While the controller is dead, the world moves on.
            complete_job(ops, "job-0")
            external.replies["ext-1"] = {"state": "succeeded", "result": {"type": "t", "value": 1}}
            ops.patch_status("external", {"result": {"type": "t", "value": 2}})

            controller.start()
            finished = {name: ops.wait_state(name, "Succeeded", timeout=60) for name in specs}
            burst = [ops.wait_state(f"burst-{i}", "Succeeded", timeout=60) for i in range(30)]
        finally:
            controller.stop()
            log = controller.log()

        # Nothing was started twice for one attempt.
        for name in specs:
            assert finished[name]["attempt"] == 0, name
            assert finished[name]["id"] == before[name]["id"], name
        assert finished["sleep"]["startedAt"] == before["sleep"]["startedAt"]
        uid = ops.get("job")["metadata"]["uid"]
        jobs = ops.batch.list_namespaced_job(
            namespace, label_selector=f"{job.OPERATION_UID_LABEL}={uid}"
        ).items
        assert [j.metadata.name for j in jobs] == ["job-0"]
        assert jobs[0].metadata.uid == finished["job"]["executor"]["jobUid"]
        webhook_uid = ops.get("webhook")["metadata"]["uid"]
        assert list(external.jobs) == [f"{webhook_uid}-0"]
        assert external.posts[f"{webhook_uid}-0"] == 1, "accepted work is not POSTed again"
        assert finished["webhook"]["result"] == {"type": "t", "value": 1}
        assert finished["external"]["result"] == {"type": "t", "value": 2}
        ids = [s["id"] for s in burst] + [s["id"] for s in finished.values()]
        assert len(ids) == len(set(ids)), "ids are unique across the restart"
        assert "Traceback" not in log, log[-3000:]
