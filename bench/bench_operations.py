"""Controller benchmark: builtin-noop Operations from create to Succeeded.

Measures, against a real kube-apiserver + etcd on this machine:

1. the API server's raw write ceiling here: concurrent conditional status
   merge patches per second on Operations nobody reconciles (the same kind
   of write the controller makes);
2. throughput: N noop Operations created as fast as the API server takes
   them, each timed from the start of its create to the moment a watch sees
   it Succeeded; the run's throughput is N / (last Succeeded - first create);
3. latency at an offered rate (default 100/s, paced creates), p50/p99;
4. API writes per operation, from the API server's own request counters
   (``apiserver_request_total``), split into writes on Operations, Events
   and the id counter;
5. the controller's peak RSS (VmHWM of its process);
6. CPU seconds used during the throughput run by the controller, the API
   server, etcd (when this script started them) and the load generator
   (utime + stime from /proc/<pid>/stat), i.e. who the 2 cores worked for.

With --profile PATH the controller runs under cProfile (timer: the main
thread's CPU time, so waiting costs nothing), switched on for the
throughput run only; PATH gets the top functions by cumulative and by own
CPU time as text; the raw stats (for pstats/snakeviz) go to the temporary
directory, <name>-controller.prof, not next to the results. Profiling
slows the controller down: take the throughput figures from a run without it.

The controller runs as a real ``opkeeper controller`` subprocess. Without
--kubeconfig a local control plane is started (opkeeper.localcluster).

Throughput is also reported as a ratio to the bound ceiling / writes-per-op:
a controller that wastes no time between writes reaches 1.0.

Usage: python bench/bench_operations.py [--n 1000] [--rate 100] [--events]
       [--kubeconfig PATH] [--out bench/results] [--profile PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import pathlib
import pstats
import signal
import statistics
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import common  # bench/common.py: the script's directory is on sys.path
from opkeeper import API_VERSION, errors, kube, localcluster

THROUGHPUT_NS = "bench-throughput"
LATENCY_NS = "bench-latency"
CEILING_NS = "bench-ceiling"
SYSTEM_NS = "bench-system"

PROFILED_CONTROLLER = """\
import cProfile, signal, sys, time
from opkeeper import cli
out = sys.argv.pop(1)
profile = cProfile.Profile(time.thread_time)
signal.signal(signal.SIGUSR1, lambda *_: profile.enable())
signal.signal(signal.SIGUSR2, lambda *_: profile.disable())
try:
    cli.main(sys.argv[1:])
finally:
    profile.disable()
    profile.dump_stats(out)
"""
"""``python -c`` wrapper: the controller CLI, profiled between SIGUSR1 and SIGUSR2."""


def noop(name: str) -> kube.Body:
    return {
        "apiVersion": API_VERSION,
        "kind": "Operation",
        "metadata": {"name": name},
        "spec": {"type": "bench_noop", "executor": {"builtin": {"action": "noop"}}},
    }


async def ceiling(
    client: kube.Client, *, objects: int, seconds: float, workers: int, meter: CpuMeter
) -> tuple[float, dict[str, Any]]:
    """Conditional status merge patches per second on Operations no controller watches."""
    await common.ensure_namespace(client, CEILING_NS)
    sem = asyncio.Semaphore(workers)

    async def make(i: int) -> str:
        async with sem:
            body = await client.create(kube.OPERATIONS, noop(f"c-{i}"), namespace=CEILING_NS)
        return str(body["metadata"]["resourceVersion"])

    versions = list(await asyncio.gather(*(make(i) for i in range(objects))))
    done = 0
    stop_at = time.monotonic() + seconds

    async def worker(index: int) -> None:
        nonlocal done
        # Each worker patches its own objects: no 409s, as with distinct operations.
        mine = list(range(index, objects, workers))
        i = 0
        while time.monotonic() < stop_at:
            slot = mine[i % len(mine)]
            body = await client.patch(
                kube.OPERATIONS,
                namespace=CEILING_NS,
                name=f"c-{slot}",
                subresource="status",
                body={
                    "metadata": {"resourceVersion": versions[slot]},
                    "status": {"state": "Running", "progress": done % 100},
                },
            )
            versions[slot] = body["metadata"]["resourceVersion"]
            done += 1
            i += 1

    started = time.monotonic()
    meter.start()
    await asyncio.gather(*(worker(w) for w in range(workers)))
    return done / (time.monotonic() - started), meter.stop()


class Watcher:
    """Records when each Operation in a namespace is first seen Succeeded."""

    def __init__(self, client: kube.Client, namespace: str) -> None:
        self.succeeded: dict[str, float] = {}
        self._client = client
        self._namespace = namespace
        self._task: asyncio.Task[None] | None = None
        self.synced = asyncio.Event()

    async def _run(self) -> None:
        async for event in self._client.stream(kube.OPERATIONS, namespace=self._namespace):
            now = time.monotonic()
            for obj in event.objects or ([event.object] if event.object else []):
                if (obj.get("status") or {}).get("state") == "Succeeded":
                    self.succeeded.setdefault(obj["metadata"]["name"], now)
            self.synced.set()

    async def __aenter__(self) -> Watcher:
        self._task = asyncio.create_task(self._run())
        await self.synced.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def wait(self, names: set[str], seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while missing := names - self.succeeded.keys():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(missing)} of {len(names)} did not succeed")
            await asyncio.sleep(0.05)  # sampling a counter the watch task fills


async def run_batch(
    client: kube.Client,
    *,
    namespace: str,
    n: int,
    rate: float | None,
    workers: int,
    prefix: str,
) -> dict[str, Any]:
    """Create n noops (paced at ``rate``/s, or as fast as possible) and time them."""
    await common.ensure_namespace(client, namespace)
    created: dict[str, float] = {}
    async with Watcher(client, namespace) as watcher:
        sem = asyncio.Semaphore(workers)

        async def create(i: int) -> None:
            if rate:
                await asyncio.sleep(max(0.0, begin + i / rate - time.monotonic()))
            async with sem:
                name = f"{prefix}-{i}"
                created[name] = time.monotonic()
                await client.create(kube.OPERATIONS, noop(name), namespace=namespace)

        begin = time.monotonic()
        await asyncio.gather(*(create(i) for i in range(n)))
        await watcher.wait(set(created), seconds=120 + n / 10)
    latencies = sorted(watcher.succeeded[k] - created[k] for k in created)
    first, last = min(created.values()), max(watcher.succeeded.values())
    return {
        "n": n,
        "offered_rate": rate,
        "throughput_per_s": round(n / (last - first), 1),
        "latency_p50_s": round(statistics.median(latencies), 4),
        "latency_p99_s": round(latencies[max(0, int(len(latencies) * 0.99) - 1)], 4),
        "latency_max_s": round(latencies[-1], 4),
    }


class CpuMeter:
    """CPU seconds used by given processes (and this one) between start() and stop()."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._before: dict[str, float] = {}
        self._machine: tuple[int, int] = (0, 0)
        self._wall = 0.0

    def _now(self) -> dict[str, float]:
        now = {name: common.cpu_seconds(pid) for name, pid in self.pids.items()}
        now["load generator (this script)"] = time.process_time()
        return now

    def start(self) -> None:
        self._before = self._now()
        self._machine = common.machine_busy_ticks()
        self._wall = time.monotonic()

    def stop(self) -> dict[str, Any]:
        wall = time.monotonic() - self._wall
        used = {k: v - self._before[k] for k, v in self._now().items()}
        busy, total = common.machine_busy_ticks()
        share = (busy - self._machine[0]) / max(1, total - self._machine[1])
        return {
            "wall_s": round(wall, 2),
            "cpu_s": {name: round(seconds, 2) for name, seconds in used.items()},
            "cores_busy": round(sum(used.values()) / wall, 2),
            "machine_cores_busy": round(share * (os.cpu_count() or 1), 2),
        }


def profile_summary(raw: pathlib.Path, *, top: int = 60) -> str:
    """The top functions by cumulative and by own time, as text."""
    out = io.StringIO()
    stats = pstats.Stats(str(raw), stream=out)
    total = stats.total_tt  # type: ignore[attr-defined]
    out.write(
        f"controller CPU time profiled (main thread, cProfile): {total:.2f} s\n"
        "cumtime includes callees; for coroutines each resumption counts as a call.\n\n"
    )
    for key, title in (("cumulative", "cumulative"), ("tottime", "own (tottime)")):
        out.write(f"=== top {top} by {title} time ===\n")
        stats.sort_stats(key).print_stats(top)
    text = out.getvalue()
    # Shorter, machine-independent paths: site-packages/x, <stdlib>/x, operator/opkeeper/x.
    prefixes = {
        sysconfig.get_paths()["purelib"] + "/": "",
        sysconfig.get_paths()["platlib"] + "/": "",
        sysconfig.get_paths()["stdlib"] + "/": "<stdlib>/",
        str(pathlib.Path(__file__).resolve().parent.parent) + "/": "",
    }
    for prefix, short in prefixes.items():
        text = text.replace(prefix, short)
    return text


def raw_profile_path(args: argparse.Namespace) -> pathlib.Path:
    return pathlib.Path(tempfile.gettempdir()) / f"{args.name}-controller.prof"


def machine(server_version: str) -> dict[str, Any]:
    """common.info() under the keys these results have always used ("nproc": cores)."""
    facts = common.info(kube_apiserver=server_version)
    return {("nproc" if key == "cores" else key): value for key, value in facts.items()}


@contextlib.contextmanager
def control_plane(kubeconfig: str | None) -> Iterator[tuple[str, dict[str, int]]]:
    """A kubeconfig, and the pids of the API server and etcd when started here."""
    if kubeconfig:
        localcluster.install_crds(kubeconfig=kubeconfig)
        yield kubeconfig, {}
        return
    with tempfile.TemporaryDirectory() as tmp, localcluster.started(pathlib.Path(tmp)) as local:
        state = localcluster.running(pathlib.Path(tmp)) or {}
        pids = state.get("pids")
        assert isinstance(pids, list)
        yield str(local.kubeconfig), {common.process_name(int(pid)): int(pid) for pid in pids}


@contextlib.contextmanager
def controller(
    kubeconfig: str, *, events: bool, log: pathlib.Path, profile: pathlib.Path | None
) -> Iterator[int]:
    with common.controller(
        kubeconfig,
        namespaces=(THROUGHPUT_NS, LATENCY_NS),
        log=log,
        options=["--system-namespace", SYSTEM_NS, *([] if events else ["--no-events"])],
        python=["-c", PROFILED_CONTROLLER, str(profile)] if profile else ["-m", "opkeeper.cli"],
    ) as process:
        yield process.pid


async def bench(
    args: argparse.Namespace, kubeconfig: str, server_pids: dict[str, int]
) -> dict[str, Any]:
    client = kube.Client(kube.Credentials.from_kubeconfig(kubeconfig), connection_limit=64)
    try:
        async with client.session.get("/version") as reply:
            server_version = (await reply.json())["gitVersion"]
        print("measuring the API server's write ceiling ...", flush=True)
        ceiling_rate, ceiling_cpu = await ceiling(
            client,
            objects=200,
            seconds=args.ceiling_seconds,
            workers=args.workers,
            meter=CpuMeter(server_pids),
        )
        print(f"  ceiling: {ceiling_rate:.0f} status writes/s; CPU: {ceiling_cpu}", flush=True)
        for namespace in (THROUGHPUT_NS, LATENCY_NS):
            await common.ensure_namespace(client, namespace)
        log = pathlib.Path(tempfile.gettempdir()) / f"{args.name}-controller.log"
        raw_profile = raw_profile_path(args) if args.profile else None
        with controller(kubeconfig, events=args.events, log=log, profile=raw_profile) as pid:
            # Warm-up: the controller is up and has reserved its first id block.
            await run_batch(client, namespace=LATENCY_NS, n=5, rate=None, workers=5, prefix="warm")
            before = await common.apiserver_writes(client)
            meter = CpuMeter({"controller": pid, **server_pids})
            meter.start()
            if raw_profile:
                os.kill(pid, signal.SIGUSR1)
            print(f"throughput: {args.n} noop operations ...", flush=True)
            throughput = await run_batch(
                client,
                namespace=THROUGHPUT_NS,
                n=args.n,
                rate=None,
                workers=args.workers,
                prefix="op",
            )
            if raw_profile:
                os.kill(pid, signal.SIGUSR2)
            throughput_cpu = meter.stop()
            after = await common.apiserver_writes(client)
            print(f"  {throughput}", flush=True)
            print(f"  CPU: {throughput_cpu}", flush=True)
            print(f"latency at {args.rate}/s offered ...", flush=True)
            meter.start()
            latency = await run_batch(
                client,
                namespace=LATENCY_NS,
                n=args.latency_n,
                prefix="lat",
                rate=args.rate,
                workers=args.workers,
            )
            latency_cpu = meter.stop()
            print(f"  {latency}", flush=True)
            print(f"  CPU: {latency_cpu}", flush=True)
            rss = common.peak_rss_mib(pid)
    finally:
        await client.close()
    writes = common.delta(after, before)
    per_op = {resource: round(count / args.n, 3) for resource, count in writes.items()}
    op_writes = per_op.get("operations", 0.0)
    bound = ceiling_rate / op_writes if op_writes else None
    return {
        "machine": machine(server_version),
        "config": {
            "n": args.n,
            "latency_n": args.latency_n,
            "rate": args.rate,
            "events": args.events,
            "workers": args.workers,
        },
        "ceiling_status_writes_per_s": round(ceiling_rate, 1),
        "writes_per_operation": per_op,
        "writes_on_operations_per_operation": op_writes,
        "throughput": throughput,
        "bound_ops_per_s": round(bound, 1) if bound else None,
        "throughput_to_bound": round(throughput["throughput_per_s"] / bound, 3) if bound else None,
        "latency_at_offered_rate": latency,
        "controller_peak_rss_mib": rss,
        "ceiling_cpu": ceiling_cpu,
        "throughput_run_cpu": {
            **throughput_cpu,
            "cpu_ms_per_operation": {
                name: round(1000 * seconds / args.n, 2)
                for name, seconds in throughput_cpu["cpu_s"].items()
            },
        },
        "latency_run_cpu": {
            **latency_cpu,
            "cpu_ms_per_operation": {
                name: round(1000 * seconds / args.latency_n, 2)
                for name, seconds in latency_cpu["cpu_s"].items()
            },
        },
        "profiled": bool(args.profile),
    }


def markdown(report: dict[str, Any]) -> str:
    m, t, lat = report["machine"], report["throughput"], report["latency_at_offered_rate"]
    writes = ", ".join(f"{k} {v}" for k, v in sorted(report["writes_per_operation"].items()))
    rows = [
        ("API server write ceiling (status patches/s)", report["ceiling_status_writes_per_s"]),
        (
            "API writes per operation on Operations (target <= 3)",
            report["writes_on_operations_per_operation"],
        ),
        ("all API writes per operation, by resource", writes),
        ("bound = ceiling / writes per operation (ops/s)", report["bound_ops_per_s"]),
        (f"throughput, {t['n']} ops created at once (ops/s)", t["throughput_per_s"]),
        ("throughput / bound (target >= 0.5)", report["throughput_to_bound"]),
        (
            "latency create -> Succeeded, burst: p50 / p99 (s)",
            f"{t['latency_p50_s']} / {t['latency_p99_s']}",
        ),
        (
            f"latency at {lat['offered_rate']}/s offered, {lat['n']} ops: p50 / p99 (s)"
            " (target p99 < 1)",
            f"{lat['latency_p50_s']} / {lat['latency_p99_s']}",
        ),
        ("controller peak RSS (MiB)", report["controller_peak_rss_mib"]),
    ]
    top, usage = report["ceiling_cpu"], report["throughput_run_cpu"]
    rows += [
        (
            f"cores busy while measuring the ceiling: these processes / whole machine"
            f" (of {m['nproc']})",
            f"{top['cores_busy']} / {top['machine_cores_busy']}",
        ),
        (
            f"cores busy in the throughput run: these processes / whole machine (of {m['nproc']})",
            f"{usage['cores_busy']} / {usage['machine_cores_busy']}",
        ),
        (
            "CPU ms per operation in the throughput run, by process",
            ", ".join(f"{k} {v}" for k, v in usage["cpu_ms_per_operation"].items()),
        ),
        (
            f"cores busy in the {lat['offered_rate']}/s run: these processes / whole machine",
            f"{report['latency_run_cpu']['cores_busy']}"
            f" / {report['latency_run_cpu']['machine_cores_busy']}",
        ),
        (
            f"CPU ms per operation in the {lat['offered_rate']}/s run, by process",
            ", ".join(
                f"{k} {v}" for k, v in report["latency_run_cpu"]["cpu_ms_per_operation"].items()
            ),
        ),
    ]
    lines = [
        "# Controller benchmark: builtin-noop Operations",
        "",
        common.markdown_header(m) + " Controller, API server, etcd and load"
        " generator share the machine. Kubernetes Events per transition:"
        f" {'on' if report['config']['events'] else 'off'}."
        + (
            " Controller profiled (cProfile): slower than unprofiled." if report["profiled"] else ""
        ),
        "",
        "| measure | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
        "Reproduce: `python bench/bench_operations.py --n "
        f"{report['config']['n']}{' --events' if report['config']['events'] else ''}`.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=1000, help="operations in the throughput run")
    parser.add_argument(
        "--latency-n", type=int, default=500, help="operations in the offered-rate run"
    )
    parser.add_argument("--rate", type=float, default=100.0, help="offered creates per second")
    parser.add_argument("--workers", type=int, default=32, help="concurrent client requests")
    parser.add_argument("--ceiling-seconds", type=float, default=10.0)
    parser.add_argument(
        "--events", action="store_true", help="let the controller post an Event per transition"
    )
    parser.add_argument("--kubeconfig", help="use this cluster instead of a local one")
    common.add_output_arguments(parser, name="operations")
    parser.add_argument(
        "--profile",
        metavar="PATH",
        help="profile the controller during the throughput run: summary to PATH",
    )
    args = parser.parse_args()
    with control_plane(args.kubeconfig) as (kubeconfig, server_pids):
        try:
            report = asyncio.run(bench(args, kubeconfig, server_pids))
        except errors.OpkeeperError as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
    if args.profile:
        raw = raw_profile_path(args)
        pathlib.Path(args.profile).write_text(profile_summary(raw))
        print(f"profile: {args.profile} (raw: {raw})")
    common.write_results(args.out, args.name, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
