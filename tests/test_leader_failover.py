"""Two real controller processes on one Lease: SIGKILL of the leader under load loses
nothing and starts nothing twice; SIGTERM hands over within about a retry period, and
each process's leader gauge and transition counter say who acts.

Short lease timings keep it fast (a SIGKILLed leader's Lease has to expire: the
takeover is about a lease duration). The issue's full run (1,000 operations, 10
kills, controller-runtime's timings) is bench/bench_failover.py.
"""

from __future__ import annotations

import pathlib
import socket
import time
import urllib.request
from typing import Any

import kubernetes
import prometheus_client.parser
import pytest

from tests import failover
from tests.helpers import Ops, wait_for

FAMILIES = ("opkeeper_controller_leader", "opkeeper_controller_leader_transitions")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def gauges(port: int) -> dict[str, float] | None:
    """The leader gauge and transition counters of one controller process (None: it
    does not answer yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return None
    found: dict[str, float] = {}
    for family in prometheus_client.parser.text_string_to_metric_families(text):
        if family.name not in FAMILIES:
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return found


pytestmark = pytest.mark.cluster

PLAN = failover.Plan(
    operations=150,
    kills=3,
    lease_duration=3,
    renew_deadline=2,
    retry_period=0.5,
    work_seconds=1.0,
    create_rate=15.0,
    gap_seconds=1.5,
)


def test_sigkill_of_the_leader_loses_nothing_and_starts_nothing_twice(
    cluster: Any, api: kubernetes.client.ApiClient, namespace: str, tmp_path: pathlib.Path
) -> None:
    outcome = failover.run(
        api=api,
        env=cluster.env,
        namespace=namespace,
        plan=PLAN,
        logs=tmp_path,
        settle_seconds=180,
    )
    logs = "\n".join(
        f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}"
        for log in sorted(tmp_path.glob("replica-*.log"))
    )
    assert len(outcome.kills) == PLAN.kills
    assert outcome.lost == [], (outcome.final, logs)
    assert outcome.retried == []
    assert outcome.jobs_per_attempt == {}, "one Job per operation attempt"
    assert outcome.job_mismatch == [], "the Job recorded is the Job that exists"
    assert outcome.webhook_keys == PLAN.operations // 3, "one idempotency key per attempt"
    assert outcome.work_per_key == {}, "work accepted once per idempotency key"
    for kill in outcome.kills:
        assert kill.successor != kill.victim
        # A SIGKILLed leader does not release: the Lease must expire first.
        assert PLAN.lease_duration - PLAN.retry_period <= kill.takeover_seconds < 15, kill
    assert "Traceback" not in logs, logs


def acting(replica: failover.Replica) -> dict[str, float]:
    """The replica's leader metrics once its gauge says it acts."""
    return wait_for(
        lambda: (
            (found := gauges(replica.metrics_port))
            and found.get("opkeeper_controller_leader") == 1.0
            and found
        ),
        timeout=30,
        what=f"{replica.identity} acting",
    )


def test_sigterm_releases_the_lease_and_the_standby_takes_over_within_a_retry_period(
    cluster: Any, api: kubernetes.client.ApiClient, namespace: str, tmp_path: pathlib.Path
) -> None:
    plan = failover.Plan(
        operations=0, kills=0, lease_duration=15, renew_deadline=10, retry_period=1
    )
    ops = Ops(api, namespace)
    replicas = [
        failover.Replica(
            slot=slot,
            plan=plan,
            env=cluster.env,
            namespace=namespace,
            logs=tmp_path,
            metrics_port=free_port(),
        )
        for slot in (0, 1)
    ]
    try:
        for replica in replicas:
            replica.start()
        first = wait_for(lambda: failover.holder(ops), timeout=60, what="a leader")
        leader = next(r for r in replicas if r.identity == first)
        standby = next(r for r in replicas if r is not leader)
        assert acting(leader) == {
            "opkeeper_controller_leader": 1.0,
            "opkeeper_controller_leader_transitions_total{to=leader}": 1.0,
        }
        standing_by = wait_for(
            lambda: gauges(standby.metrics_port), timeout=30, what="the standby's metrics"
        )
        assert standing_by == {"opkeeper_controller_leader": 0.0}
        stopped_at = time.monotonic()
        assert leader.process is not None
        leader.process.terminate()
        leader.process.wait(30)
        wait_for(
            lambda: failover.holder(ops) == standby.identity, timeout=10, what="the standby leads"
        )
        handover = time.monotonic() - stopped_at
        # Without the release it would take the lease duration (15 s).
        assert handover < 1 + plan.retry_period * (1 + 0.2) + 1.5, handover
        assert acting(standby) == {
            "opkeeper_controller_leader": 1.0,
            "opkeeper_controller_leader_transitions_total{to=leader}": 1.0,
        }
        ops.create("after", {"type": "t", "executor": {"builtin": {"action": "noop"}}})
        ops.wait_state("after", "Succeeded", timeout=30)
        log = (tmp_path / f"{leader.identity}.log").read_text()
        assert "released by" in log, log[-3000:]
    finally:
        for replica in replicas:
            replica.stop()
