"""The job executor against the real API server; tests play the kubelet's part.

No kubelet or job controller runs locally, so a test moves a Job to Complete
or Failed by patching its status the way the job controller would (with the
SuccessCriteriaMet / FailureTarget conditions that current validation requires).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest

from opkeeper.executors import job
from tests.helpers import Ops, complete_job, controller_in_thread, fail_job, wait_for

TEMPLATE = {
    "metadata": {"labels": {"app": "worker"}},
    "spec": {
        "backoffLimit": 0,
        "template": {
            "spec": {
                "restartPolicy": "Never",
                "containers": [
                    {"name": "work", "image": "busybox", "env": [{"name": "KEEP", "value": "me"}]}
                ],
            }
        },
    },
}


def job_spec(**extra: Any) -> dict[str, Any]:
    return {
        "type": "test_job",
        "params": {"domain": "example.org"},
        "executor": {"job": {"template": TEMPLATE}},
        **extra,
    }


@pytest.fixture
def ops(cluster: Any, api: kubernetes.client.ApiClient, namespace: str) -> Iterator[Ops]:
    with controller_in_thread(kubeconfig=cluster.kubeconfig, namespace=namespace):
        yield Ops(api, namespace)


def jobs_of(ops: Ops, uid: str) -> list[Any]:
    return list(
        ops.batch.list_namespaced_job(
            ops.namespace, label_selector=f"{job.OPERATION_UID_LABEL}={uid}"
        ).items
    )


def test_job_is_created_once_with_params_and_owner_then_completes(ops: Ops) -> None:
    op = ops.create("deploy", job_spec())
    status = ops.wait_state("deploy", "Running")
    [created] = jobs_of(ops, op["metadata"]["uid"])
    assert created.metadata.name == "deploy-0" == status["executor"]["jobName"]
    assert created.metadata.uid == status["executor"]["jobUid"]
    owner = created.metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.uid, owner.controller) == (
        "Operation",
        "deploy",
        op["metadata"]["uid"],
        True,
    )
    env = {e.name: e.value for e in created.spec.template.spec.containers[0].env}
    assert json.loads(env["OPKEEPER_PARAMS"]) == {"domain": "example.org"}
    assert env["KEEP"] == "me"
    assert env["OPKEEPER_ID"] == str(status["id"])
    assert created.metadata.labels["app"] == "worker"
    # A worker reports a result through the status subresource, then the Job completes.
    ops.patch_status("deploy", {"progress": 50, "result": {"type": "vm", "value": {"ip": "1"}}})
    complete_job(ops, "deploy-0")
    done = ops.wait_state("deploy", "Succeeded")
    assert done["reason"] == "JobComplete"
    assert done["result"] == {"type": "vm", "value": {"ip": "1"}}
    assert len(jobs_of(ops, op["metadata"]["uid"])) == 1


def test_failed_job_fails_internally(ops: Ops) -> None:
    ops.create("broken", job_spec())
    ops.wait_state("broken", "Running")
    fail_job(ops, "broken-0")
    status = ops.wait_state("broken", "FailedInternal")
    assert status["reason"] == "JobFailed"
    assert "BackoffLimitExceeded" in status["message"]


def test_cancel_deletes_the_job(ops: Ops) -> None:
    op = ops.create("stopped", job_spec())
    ops.wait_state("stopped", "Running")
    ops.patch("stopped", {"spec": {"cancel": True}})
    ops.wait_state("stopped", "Cancelled")
    wait_for(lambda: not jobs_of(ops, op["metadata"]["uid"]), what="the Job deleted")


def test_relaunch_creates_one_new_job_for_the_new_attempt(ops: Ops) -> None:
    op = ops.create("twice", job_spec())
    ops.wait_state("twice", "Running")
    fail_job(ops, "twice-0")
    ops.wait_state("twice", "FailedInternal")
    ops.patch("twice", {"spec": {"relaunch": 1, "params": {"domain": "example.net"}}})
    wait_for(
        lambda: (
            ops.status("twice").get("attempt") == 1
            and ops.status("twice").get("state") == "Running"
        ),
        what="attempt 1 running",
    )
    names = sorted(j.metadata.name for j in jobs_of(ops, op["metadata"]["uid"]))
    assert names == ["twice-0", "twice-1"]
    complete_job(ops, "twice-1")
    status = ops.wait_state("twice", "Succeeded")
    assert status["history"][0]["params"] == {"domain": "example.org"}


def test_deleted_job_fails_the_attempt(ops: Ops) -> None:
    ops.create("orphaned", job_spec())
    ops.wait_state("orphaned", "Running")
    ops.batch.delete_namespaced_job("orphaned-0", ops.namespace)
    assert ops.wait_state("orphaned", "FailedInternal")["reason"] == "JobMissing"


def test_long_names_are_shortened_deterministically() -> None:
    name = job.job_name(operation="x" * 80, uid="u-1", attempt=3)
    assert len(name) <= 63
    assert name == job.job_name(operation="x" * 80, uid="u-1", attempt=3)
    assert name != job.job_name(operation="x" * 80, uid="u-1", attempt=4)
