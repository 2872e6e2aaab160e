"""ScheduledTask benchmark: firing lateness, API writes while waiting, controller peak RSS.

N one-shot ScheduledTasks (default 10,000) are created with ``execAt`` spread
evenly over ``--spread`` seconds, starting after every task has been armed
and then left waiting for ``--wait`` seconds. The controller runs as its own
process (``opkeeper controller``, as in production: the Operation controller
in the same process executes the created builtin noop Operations).

Measured:

* lateness per run, two ways: the controller's ``opkeeper.dev/fired-at``
  annotation (ms) minus the run's scheduled time (what the controller did;
  creationTimestamp has only whole seconds), and the time this process saw
  the Operation on its watch minus the scheduled time (end to end);
* API writes to ScheduledTasks while every task waits, from the API server's
  own ``apiserver_request_total`` (target: 0), plus the ScheduledTask watch
  events seen in that window (a write would show up there too);
* writes per run over the whole firing phase, by resource;
* CPU seconds per run while firing, by process (controller, and the API
  server and etcd when started here; utime + stime from /proc), and how busy
  the whole machine was: lateness on 2 shared cores is queueing, and CPU per
  run says who the cores worked for;
* the controller's peak RSS (VmHWM) and its RSS while 10,000 tasks wait.

Usage: python bench/bench_scheduledtasks.py [--tasks 10000] [--spread 180] [--append]
       [--wait 60] [--kubeconfig PATH] [--out bench/results]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import common  # bench/common.py: the script's directory is on sys.path
from opkeeper import API_VERSION, errors, kube, localcluster, schedule

NAMESPACE = "bench-scheduledtasks"


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "count": len(values),
        "p50_ms": round(percentile(values, 0.50) * 1000, 1),
        "p90_ms": round(percentile(values, 0.90) * 1000, 1),
        "p99_ms": round(percentile(values, 0.99) * 1000, 1),
        "max_ms": round(max(values) * 1000, 1),
        "mean_ms": round(statistics.fmean(values) * 1000, 1),
    }


def verb_and_resource(labels: dict[str, str]) -> str:
    """Write counts keyed like "PATCH scheduledtasks/status"."""
    resource = labels.get("resource", "")
    if labels.get("subresource"):
        resource += "/" + labels["subresource"]
    return f"{labels['verb']} {resource}"


async def api_writes(client: kube.Client) -> dict[str, int]:
    """Successful writes per verb and resource, from the API server's own metrics."""
    return await common.apiserver_writes(client, verb_and_resource)


class Observer:
    """Watches ScheduledTasks and their Operations the way a client would."""

    def __init__(self, client: kube.Client) -> None:
        self.client = client
        self.armed: set[str] = set()
        self.task_changes = 0
        """ScheduledTask ADDED/MODIFIED events seen (a write anywhere shows up here)."""
        self.seen: dict[str, float] = {}
        """Operation name -> time this process first saw it."""
        self.lateness_fired: list[float] = []
        self.lateness_seen: list[float] = []
        self.changed = asyncio.Event()

    async def watch_tasks(self) -> None:
        async for event in self.client.stream(kube.SCHEDULED_TASKS, namespace=NAMESPACE):
            for body in event.objects or ([event.object] if event.object else []):
                if event.type in ("ADDED", "MODIFIED"):
                    self.task_changes += 1
                status = body.get("status") or {}
                name = body["metadata"]["name"]
                if status.get("nextRunAt") or status.get("lastScheduleTime"):
                    self.armed.add(name)
            self.changed.set()

    async def completed(self) -> int:
        """How many tasks are Completed (one list: cheaper than watching every change)."""
        listed = await self.client.list(kube.SCHEDULED_TASKS, namespace=NAMESPACE)
        return sum((b.get("status") or {}).get("state") == "Completed" for b in listed.items)

    async def watch_operations(self) -> None:
        async for event in self.client.stream(
            kube.OPERATIONS, namespace=NAMESPACE, label_selector=schedule.LABEL_TASK
        ):
            now = time.time()
            for body in event.objects or ([event.object] if event.object else []):
                name = body["metadata"]["name"]
                if name in self.seen or event.type == "DELETED":
                    continue
                self.seen[name] = now
                annotations = body["metadata"].get("annotations") or {}
                scheduled = datetime.datetime.fromisoformat(
                    annotations[schedule.ANNOTATION_SCHEDULED_TIME]
                ).timestamp()
                fired = datetime.datetime.fromisoformat(
                    annotations[schedule.ANNOTATION_FIRED_AT]
                ).timestamp()
                self.lateness_fired.append(fired - scheduled)
                self.lateness_seen.append(now - scheduled)
            self.changed.set()

    async def until(self, predicate: Any, *, limit: float, what: str) -> None:
        async def loop() -> None:
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

        try:
            await asyncio.wait_for(loop(), limit)
        except TimeoutError:
            raise SystemExit(f"timed out after {limit:.0f}s waiting for {what}") from None


async def create_tasks(
    client: kube.Client, *, count: int, first: datetime.datetime, spread: float, concurrency: int
) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        due = first + datetime.timedelta(seconds=spread * i / max(1, count - 1))
        body = {
            "apiVersion": API_VERSION,
            "kind": "ScheduledTask",
            "metadata": {"name": f"task-{i:05d}"},
            "spec": {
                "execAt": schedule.millis(due),
                "template": {
                    "spec": {"type": "bench_noop", "executor": {"builtin": {"action": "noop"}}}
                },
            },
        }
        async with gate:
            for _ in range(5):
                try:
                    await client.create(kube.SCHEDULED_TASKS, body, namespace=NAMESPACE)
                    return
                except errors.Unavailable:
                    await asyncio.sleep(0.5)

    await asyncio.gather(*(one(i) for i in range(count)))


async def bench(
    *,
    kubeconfig: str,
    server_pids: dict[str, int],
    tasks: int,
    spread: float,
    wait: float,
    lead: float,
    workdir: pathlib.Path,
) -> dict[str, Any]:
    client = kube.Client(kube.Credentials.from_kubeconfig(kubeconfig), connection_limit=64)
    await common.ensure_namespace(client, NAMESPACE)
    observer = Observer(client)
    task_watch = asyncio.create_task(observer.watch_tasks())
    watchers = [task_watch, asyncio.create_task(observer.watch_operations())]
    log = workdir / "controller.log"
    with common.controller(kubeconfig, namespaces=[NAMESPACE], log=log) as process:
        began = time.time()
        first = utcnow() + datetime.timedelta(seconds=lead)
        await create_tasks(client, count=tasks, first=first, spread=spread, concurrency=32)
        created = time.time()
        await observer.until(
            lambda: len(observer.armed) >= tasks,
            limit=max(60.0, (first - utcnow()).total_seconds()),
            what="every task to be armed",
        )
        armed = time.time()
        window = first.timestamp() - 1 - armed
        if window < wait / 2:
            raise SystemExit(f"only {window:.0f}s of waiting before the first run: raise --lead")
        # The waiting window: every task armed, none due yet.
        writes_before = await api_writes(client)
        changes_before = observer.task_changes
        rss_waiting = common.memory_of(process.pid)
        await asyncio.sleep(first.timestamp() - 1 - time.time())
        writes_waiting = common.delta(await api_writes(client), writes_before)
        changes_waiting = observer.task_changes - changes_before
        # The firing phase; this process now watches only the Operations, so as
        # not to compete with the controller for the two cores more than a
        # client must.
        task_watch.cancel()
        firing_before = await api_writes(client)
        pids = {"controller": process.pid, **server_pids}
        cpu_before = {name: common.cpu_seconds(pid) for name, pid in pids.items()}
        cpu_before["load generator (this script)"] = time.process_time()
        machine_before = common.machine_busy_ticks()
        firing_began = time.monotonic()
        await observer.until(
            lambda: len(observer.seen) >= tasks,
            limit=spread + 300,
            what="every run's Operation",
        )
        settle = time.time() + 300
        while (done := await observer.completed()) < tasks:
            if time.time() > settle:
                raise SystemExit(f"only {done} of {tasks} tasks Completed after 300 s")
            await asyncio.sleep(2)
        firing = common.delta(await api_writes(client), firing_before)
        cpu_after = {name: common.cpu_seconds(pid) for name, pid in pids.items()}
        cpu_after["load generator (this script)"] = time.process_time()
        busy, total = common.machine_busy_ticks()
        firing_wall = time.monotonic() - firing_began
        load = os.getloadavg()[1]
        rss_end = common.memory_of(process.pid)
    for watcher in watchers:
        watcher.cancel()
    await asyncio.gather(*watchers, return_exceptions=True)
    await client.close()
    return {
        "tasks": tasks,
        "spread_s": spread,
        "create_s": round(created - began, 1),
        "armed_after_s": round(armed - began, 1),
        "waiting_window_s": round(window, 1),
        "writes_while_waiting": writes_waiting,
        "scheduledtask_writes_while_waiting": sum(
            v for k, v in writes_waiting.items() if "scheduledtasks" in k
        ),
        "scheduledtask_watch_events_while_waiting": changes_waiting,
        "lateness_fired": summary(observer.lateness_fired),
        "lateness_seen": summary(observer.lateness_seen),
        "writes_while_firing": firing,
        "writes_per_run": {k: round(v / tasks, 2) for k, v in firing.items()},
        "controller_cpu_ms_per_run": round(
            (cpu_after["controller"] - cpu_before["controller"]) / tasks * 1000, 2
        ),
        "cpu_ms_per_run": {
            name: round((cpu_after[name] - cpu_before[name]) / tasks * 1000, 2)
            for name in cpu_after
        },
        "firing_wall_s": round(firing_wall, 1),
        "machine_cores_busy_firing": round(
            (busy - machine_before[0]) / max(1, total - machine_before[1]) * (os.cpu_count() or 1),
            2,
        ),
        "load_average_5min_after_firing": round(load, 2),
        "controller_rss_waiting_mib": round(rss_waiting["VmRSS"] / 1024, 1),
        "controller_peak_rss_mib": round(rss_end["VmHWM"] / 1024, 1),
    }


def markdown(report: dict[str, Any]) -> str:
    target = report["targets"]
    lines = [
        "# ScheduledTask benchmark",
        "",
        common.markdown_header(report["machine"]),
        "",
        "One-shot ScheduledTasks due evenly over the spread, after all of them waited armed."
        " The controller runs in its own process and also executes the created builtin noop"
        " Operations (the Operation controller shares the process). Lateness is measured by"
        " the controller's `opkeeper.dev/fired-at` annotation (ms) and by a client's watch.",
        "",
    ]
    for run in report["runs"]:
        fired, seen = run["lateness_fired"], run["lateness_seen"]
        rate = run["tasks"] / run["spread_s"]
        lines += [
            f"## {run['tasks']:,} tasks over {run['spread_s']:.0f} s ({rate:.0f} runs/s)",
            "",
            f"Command: `{run['command']}`",
            "",
            "| measure | result | target |",
            "|---|---|---|",
            f"| lateness p50 / p99 / max (controller, fired-at) | {fired['p50_ms']} /"
            f" {fired['p99_ms']} / {fired['max_ms']} ms | p99 < {target['p99_lateness_ms']} ms |",
            f"| lateness p50 / p99 / max (seen on a client's watch) | {seen['p50_ms']} /"
            f" {seen['p99_ms']} / {seen['max_ms']} ms | |",
            f"| ScheduledTask writes while {run['tasks']:,} tasks waited"
            f" {run['waiting_window_s']:.0f} s (apiserver_request_total) |"
            f" {run['scheduledtask_writes_while_waiting']} | {target['writes_while_waiting']} |",
            f"| ScheduledTask watch events in that window |"
            f" {run['scheduledtask_watch_events_while_waiting']} | 0 |",
            f"| controller RSS while waiting / peak RSS | {run['controller_rss_waiting_mib']} /"
            f" {run['controller_peak_rss_mib']} MiB | |",
            f"| controller CPU per run (incl. running the Operation) |"
            f" {run.get('controller_cpu_ms_per_run', 'n/a')} ms | |",
            f"| creating the tasks / all armed after | {run['create_s']} s /"
            f" {run['armed_after_s']} s | |",
            f"| CPU ms per run while firing, by process |"
            f" {', '.join(f'{k} {v}' for k, v in run.get('cpu_ms_per_run', {}).items()) or 'n/a'}"
            " | |",
            f"| cores busy while firing (whole machine, of {os.cpu_count()}) |"
            f" {run.get('machine_cores_busy_firing', 'n/a')} | |",
            f"| machine load average (5 min) after firing |"
            f" {run.get('load_average_5min_after_firing', 'n/a')} | 2 cores |",
            "",
            "All API writes while waiting: "
            + (", ".join(f"{k}: {v}" for k, v in run["writes_while_waiting"].items()) or "none")
            + ". API writes per run while firing: "
            + ", ".join(f"{k}: {v}" for k, v in run["writes_per_run"].items())
            + ".",
            "",
        ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--spread", type=float, default=180.0, help="seconds the runs span")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds all tasks wait armed")
    parser.add_argument(
        "--lead",
        type=float,
        default=None,
        help="seconds from start to the first run (default: enough to create and arm, + wait)",
    )
    parser.add_argument("--kubeconfig", help="use this cluster instead of a fresh local one")
    common.add_output_arguments(parser, name="scheduledtasks")
    parser.add_argument(
        "--append", action="store_true", help="add this run to the existing results file"
    )
    args = parser.parse_args()
    # Creating and arming runs at roughly 100-200 tasks/s on 2 cores.
    lead = args.lead if args.lead is not None else args.tasks / 80 + args.wait + 20
    with tempfile.TemporaryDirectory() as state:
        workdir = pathlib.Path(state)
        if args.kubeconfig:
            run = asyncio.run(
                bench(kubeconfig=args.kubeconfig, server_pids={}, tasks=args.tasks,
                      spread=args.spread, wait=args.wait, lead=lead, workdir=workdir)
            )  # fmt: skip
        else:
            with localcluster.started(workdir / "cluster") as cluster:
                facts = localcluster.running(workdir / "cluster") or {}
                listed = facts.get("pids")
                assert isinstance(listed, list)
                server_pids = {common.process_name(int(pid)): int(pid) for pid in listed}
                run = asyncio.run(
                    bench(kubeconfig=str(cluster.kubeconfig), server_pids=server_pids,
                          tasks=args.tasks, spread=args.spread, wait=args.wait, lead=lead,
                          workdir=workdir)
                )  # fmt: skip
    run["command"] = "python bench/bench_scheduledtasks.py " + " ".join(sys.argv[1:])
    previous = pathlib.Path(args.out) / f"{args.name}.json"
    runs = json.loads(previous.read_text())["runs"] if args.append and previous.exists() else []
    report = {
        "machine": common.info(),
        "targets": {"p99_lateness_ms": 1000, "writes_while_waiting": 0},
        "runs": [*runs, run],
    }
    common.write_results(args.out, args.name, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
