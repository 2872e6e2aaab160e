"""Controller failover: leader election's idle cost and takeover times (issue 16).

    python bench/bench_failover.py [--operations 1000] [--kills 10]
        [--lease-duration 15] [--renew-deadline 10] [--retry-period 2]
        [--idle-seconds 60] [--kubeconfig PATH] [--out bench/results]

Two real ``opkeeper controller`` processes on a fresh local control plane:

1. Idle: both running, nothing to do, for ``--idle-seconds``: the Lease writes
   both made (their own ``opkeeper_api_writes_total{resource="leases"}``), per
   minute. Expected: 60 / retry period from the leader, none from the standby.
2. Failover (tests/failover.py): ``--operations`` operations (Job, webhook and
   external executors, one in three each) created at a steady rate while the
   leader is SIGKILLed ``--kills`` times (and replaced, as a Deployment would);
   afterwards every operation must have Succeeded in its first attempt, with one
   Job per attempt and one accepted piece of work per idempotency key. Per kill:
   the takeover time (SIGKILL to the Lease held by another live replica), the time
   to the new leader's first recorded transition, and to its first status write on
   an operation created after the kill. A SIGKILLed leader does not release its
   Lease: the takeover is about a lease duration (minus up to a retry period since
   the last renewal, plus up to 1.2 retry periods of the standby's reading pace).

Defaults are controller-runtime's timings (the controller's own defaults).
Results: ``<out>/failover.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import pathlib
import socket
import sys
import tempfile
import time
import urllib.request
import uuid
from typing import Any

import kubernetes
import prometheus_client.parser

import common
from opkeeper import localcluster

# The run itself is tests/failover.py, shared with tests/test_leader_failover.py. Imported
# by name: the repository root is not on a bench script's path, and the tests are
# outside mypy's files (a static import would pull them in).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
failover: Any = importlib.import_module("tests.failover")
helpers: Any = importlib.import_module("tests.helpers")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def lease_writes(port: int) -> float:
    """The Lease writes one controller process made so far (its own counter)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for family in prometheus_client.parser.text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "opkeeper_api_writes_total"
                and sample.labels.get("resource") == "leases"
            ):
                total += sample.value
    return total


def idle(
    *,
    api: kubernetes.client.ApiClient,
    env: dict[str, str],
    plan: failover.Plan,
    seconds: float,
    logs: pathlib.Path,
) -> dict[str, Any]:
    """Both replicas idle for ``seconds``: Lease writes per minute, per role."""
    namespace = f"failover-idle-{uuid.uuid4().hex[:6]}"
    create_namespace(api, namespace)
    ops = helpers.Ops(api, namespace)
    replicas = [
        failover.Replica(
            slot=slot, plan=plan, env=env, namespace=namespace, logs=logs, metrics_port=free_port()
        )
        for slot in (0, 1)
    ]
    try:
        for replica in replicas:
            replica.start()
        leader_id = helpers.wait_for(lambda: failover.holder(ops), timeout=120, what="a leader")
        ports = {r.identity: r.metrics_port for r in replicas}
        helpers.wait_for(
            lambda: all(_answers(p) for p in ports.values()), timeout=60, what="metrics"
        )
        before = {who: lease_writes(port) for who, port in ports.items()}
        started = time.monotonic()
        time.sleep(seconds)  # the measurement window itself
        elapsed = time.monotonic() - started
        after = {who: lease_writes(port) for who, port in ports.items()}
    finally:
        for replica in replicas:
            replica.stop()
    per_minute = {who: (after[who] - before[who]) * 60 / elapsed for who in ports}
    return {
        "seconds": round(elapsed, 1),
        "leader_writes_per_minute": round(per_minute[leader_id], 1),
        "standby_writes_per_minute": round(
            sum(v for who, v in per_minute.items() if who != leader_id), 1
        ),
        "expected_per_minute": round(60 / plan.retry_period, 1),
    }


def create_namespace(api: kubernetes.client.ApiClient, name: str) -> None:
    kubernetes.client.CoreV1Api(api).create_namespace(
        kubernetes.client.V1Namespace(metadata=kubernetes.client.V1ObjectMeta(name=name))
    )


def _answers(port: int) -> bool:
    try:
        lease_writes(port)
    except OSError:
        return False
    return True


def flaps(logs: pathlib.Path) -> int:
    """Times a leader stopped acting for a late renewal (rather than being killed)."""
    return sum(
        log.read_text(errors="replace").count("renew deadline passed")
        for log in logs.glob("replica-*.log")
    )


def bench(*, kubeconfig: str, args: argparse.Namespace, logs: pathlib.Path) -> dict[str, Any]:
    api = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=kubeconfig
    )
    env = {**os.environ, "KUBECONFIG": kubeconfig}
    # Creation spread over the kills: each kill costs about a lease duration.
    span = args.kills * (args.lease_duration + 1.2 * args.retry_period + 2.0)
    plan = failover.Plan(
        operations=args.operations,
        kills=args.kills,
        lease_duration=args.lease_duration,
        renew_deadline=args.renew_deadline,
        retry_period=args.retry_period,
        create_rate=max(1.0, args.operations / max(span, 1.0)),
        gap_seconds=2.0,
    )
    idle_logs = logs / "idle"
    idle_logs.mkdir()
    quiet = idle(api=api, env=env, plan=plan, seconds=args.idle_seconds, logs=idle_logs)
    namespace = f"failover-{uuid.uuid4().hex[:6]}"
    create_namespace(api, namespace)
    run_logs = logs / "run"
    run_logs.mkdir()
    outcome = failover.run(
        api=api, env=env, namespace=namespace, plan=plan, logs=run_logs, settle_seconds=600
    )
    api.close()
    return {
        "plan": dataclasses.asdict(plan),
        "idle": quiet,
        "operations": outcome.operations,
        "final": outcome.final,
        "lost": len(outcome.lost),
        "retried": len(outcome.retried),
        "jobs_started_twice": len(outcome.jobs_per_attempt),
        "job_mismatch": len(outcome.job_mismatch),
        "webhook_keys": outcome.webhook_keys,
        "webhook_posts": outcome.posts,
        "webhook_reposted_keys": outcome.reposted_keys,
        "webhook_work_started_twice": len(outcome.work_per_key),
        "kills": [dataclasses.asdict(k) for k in outcome.kills],
        "takeover_seconds": outcome.takeover(),
        "first_write_seconds": outcome.first_write(),
        "new_work_seconds": outcome.new_work(),
        "renew_deadline_flaps": flaps(run_logs),
        "run_seconds": round(outcome.seconds, 1),
    }


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _spread(times: dict[str, float]) -> str:
    return f"p50 {times.get('p50')} s, p99 {times.get('p99')} s, max {times.get('max')} s"


def markdown(report: dict[str, Any]) -> str:
    plan, quiet = report["plan"], report["idle"]
    rows = "\n".join(
        f"| {i + 1} | {k['victim']} | {k['successor']} | {k['takeover_seconds']:.2f} |"
        f" {_seconds(k['first_write_seconds'])} | {_seconds(k['new_work_seconds'])} |"
        for i, k in enumerate(report["kills"])
    )
    take, first, work = (
        report["takeover_seconds"],
        report["first_write_seconds"],
        report["new_work_seconds"],
    )
    return f"""# Controller failover (leader election)

{common.markdown_header(report["machine"])}

Two `opkeeper controller` processes; Lease timings (lease duration / renew deadline /
retry period): {plan["lease_duration"]:g} s / {plan["renew_deadline"]:g} s /
{plan["retry_period"]:g} s. Run by `python bench/bench_failover.py` (the run itself:
tests/failover.py).

## Idle cost

| over {quiet["seconds"]} s, nothing to do | Lease writes per minute |
|---|---|
| leader | {quiet["leader_writes_per_minute"]} |
| standby (it only reads) | {quiet["standby_writes_per_minute"]} |
| expected: 60 / retry period | {quiet["expected_per_minute"]} |

## {report["operations"]} operations, {len(report["kills"])} SIGKILLs of the leader

| | |
|---|---|
| operations Succeeded (first attempt) | {report["final"].get("Succeeded", 0)} |
| lost (not Succeeded at the end) | {report["lost"]} |
| retried | {report["retried"]} |
| Jobs started twice for one attempt | {report["jobs_started_twice"]} |
| recorded Job is not the Job that exists | {report["job_mismatch"]} |
| webhook idempotency keys / POSTs | {report["webhook_keys"]} / {report["webhook_posts"]} |
| keys POSTed more than once (killed between POST and record) | {report["webhook_reposted_keys"]} |
| webhook work accepted twice for one key | {report["webhook_work_started_twice"]} |
| leaders that stopped for a late renewal (not killed) | {report["renew_deadline_flaps"]} |
| takeover (SIGKILL to Lease taken) | {_spread(take)} |
| to the new leader's first recorded transition | {_spread(first)} |
| to its first write on an operation created after the kill | {_spread(work)} |
| run | {report["run_seconds"]} s |

Times are from the SIGKILL. The first recorded transition is the earliest
controller-written time (queuedAt, startedAt, updatedAt, finishedAt) after the kill
in any operation's final status (written with microseconds). Work
created after the kill waits for the new leader's full list and the queue it
rebuilds from it (every operation in the namespace, most of them finished).

| kill | victim | successor | takeover s | first transition s | new work s |
|---|---|---|---|---|---|
{rows}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--operations", type=int, default=1000)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--lease-duration", type=float, default=15.0)
    parser.add_argument("--renew-deadline", type=float, default=10.0)
    parser.add_argument("--retry-period", type=float, default=2.0)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--kubeconfig", help="use this cluster instead of a fresh local one")
    common.add_output_arguments(parser, name="failover")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state:
        workdir = pathlib.Path(state)
        logs = workdir / "logs"
        logs.mkdir()
        if args.kubeconfig:
            report = bench(kubeconfig=args.kubeconfig, args=args, logs=logs)
        else:
            with localcluster.started(workdir / "cluster") as cluster:
                report = bench(kubeconfig=str(cluster.kubeconfig), args=args, logs=logs)
    report["machine"] = common.info()
    common.write_results(args.out, args.name, report, markdown(report))
    failed = report["lost"] or report["jobs_started_twice"] or report["webhook_work_started_twice"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
