"""Call log benchmark: what the store costs the gateway, SQLite against PostgreSQL in
the same run, on Gandi operation_details (every call logged).

The gateway runs in its own process with N Operations in its cache (filled
directly, as ``bench_gateway.py --fill direct`` does) and the call log named by
``--call-log``: a SQLite file in a temp dir, or a database on a throw-away
PostgreSQL server from Debian's packages (:mod:`opkeeper.localpostgres`, Unix
socket, ``fsync=off``: the figures are the log's CPU and round trips, not the
disk's). The load generator is bench_gateway's (raw asyncio HTTP/1.1,
keep-alive, real XML-RPC bodies). The stores alternate, ``--repeat`` rounds of
each, so a busy neighbour on a shared machine hits both; the HTTP-only ceiling
is measured once for context.

Per run: req/s, p50/p99, the gateway's CPU per call, PostgreSQL's CPU per call
(its processes, from /proc), and a check that every answered call is in the log
(the last serial equals the login, warm-up and measured calls).

Usage: python bench/bench_calllog.py [--size 10000] [--duration 10]
       [--concurrency 32] [--repeat 2] [--out bench/results] [--note TEXT]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import statistics
import tempfile
import xmlrpc.client
from typing import Any

import bench_gateway  # bench/bench_gateway.py: the gateway process and load generator
import common  # bench/common.py: the script's directory is on sys.path
from opkeeper import localpostgres
from opkeeper.gateway import calllogs, server

WARMUP_SECONDS = 2.0
"""Load before each measured run (connections, caches, the store's first groups)."""
STORES = ("sqlite", "postgresql")


def _cpu_of(postgres: localpostgres.Server | None) -> float:
    """CPU seconds of the PostgreSQL server's processes so far (0 without one)."""
    total = 0.0
    for pid in postgres.pids() if postgres is not None else []:
        try:
            total += common.cpu_seconds(pid)
        except OSError:
            continue  # a backend that ended meanwhile
    return total


async def _last_serial(location: str) -> int:
    store = await calllogs.open_store(location=location)
    try:
        latest = await store.latest(tenant=bench_gateway.NAMESPACE, n=1)
        return int(latest[0].serial) if latest else 0
    finally:
        await store.close()


async def run_store(
    *,
    store: str,
    location: str,
    postgres: localpostgres.Server | None,
    size: int,
    duration: float,
    concurrency: int,
) -> dict[str, Any]:
    """One gateway on ``location``'s call log, under the details load."""
    loop = asyncio.get_running_loop()
    settings = server.Settings(port=0, call_log_path=location)
    with tempfile.TemporaryDirectory() as workdir:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        process = ctx.Process(
            target=bench_gateway.gateway_process, args=(child, size, None, workdir, settings)
        )
        process.start()
        info = await loop.run_in_executor(None, parent.recv)
        port = info["port"]
        proxy = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{port}/xmlrpc")
        session = str(proxy.login(bench_gateway.KEY))
        rnd = random.Random(42)
        details = [
            xmlrpc.client.dumps((session, rnd.randrange(1, size + 1)), "operation_details").encode()
            for _ in range(2000)
        ]
        warm = await bench_gateway.load(
            port, details, duration=WARMUP_SECONDS, concurrency=concurrency
        )
        parent.send("cpu")
        gateway_cpu = await loop.run_in_executor(None, parent.recv)
        postgres_cpu = _cpu_of(postgres)
        result = await bench_gateway.load(port, details, duration=duration, concurrency=concurrency)
        parent.send("cpu")
        gateway_cpu = await loop.run_in_executor(None, parent.recv) - gateway_cpu
        postgres_cpu = _cpu_of(postgres) - postgres_cpu
        parent.send("stop")
        peak = await loop.run_in_executor(None, parent.recv)
        process.join(60)
        logged = await _last_serial(location)
    calls = 1 + warm.requests + result.requests
    return {
        "store": store,
        **result.summary(),
        "gateway_cpu_us_per_call": round(gateway_cpu / result.requests * 1e6),
        "postgres_cpu_us_per_call": round(postgres_cpu / result.requests * 1e6),
        "calls_answered": calls,
        "calls_logged": logged,
        "peak_rss_mib": round(int(peak["peak_rss_bytes"]) / 2**20, 1),
    }


async def bench(
    *,
    size: int,
    duration: float,
    concurrency: int,
    repeat: int,
    postgres: localpostgres.Server,
    databases: list[str],
) -> dict[str, Any]:
    """``repeat`` rounds of each store; ``databases``: a fresh one per PostgreSQL run."""
    assert postgres.process is not None
    runs = []
    with tempfile.TemporaryDirectory() as workdir:
        for round_ in range(repeat):
            for store in STORES:
                location = (
                    os.path.join(workdir, f"calllog-{round_}.sqlite3")
                    if store == "sqlite"
                    else databases[round_]
                )
                run = await run_store(
                    store=store,
                    location=location,
                    postgres=postgres if store == "postgresql" else None,
                    size=size,
                    duration=duration,
                    concurrency=concurrency,
                )
                print(run, flush=True)
                runs.append(run)
    http_only = await bench_gateway.baseline(duration=duration, concurrency=concurrency)
    rate = {s: statistics.mean(r["req_per_s"] for r in runs if r["store"] == s) for s in STORES}
    p99 = {s: statistics.mean(r["p99_ms"] for r in runs if r["store"] == s) for s in STORES}
    return {
        "operations": size,
        "concurrency": concurrency,
        "duration": duration,
        "repeat": repeat,
        "runs": runs,
        "http_only": http_only,
        "mean_req_per_s": {s: round(v, 1) for s, v in rate.items()},
        "mean_p99_ms": {s: round(v, 2) for s, v in p99.items()},
        "postgresql_of_sqlite": round(rate["postgresql"] / rate["sqlite"], 3),
        # CPU per call: steadier than req/s when other jobs share the machine.
        "mean_cpu_us_per_call": _cpu_per_call(runs),
        "of_http_only": {s: round(v / http_only["req_per_s"], 3) for s, v in rate.items()},
        "every_call_logged": all(r["calls_logged"] == r["calls_answered"] for r in runs),
    }


def _cpu_per_call(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per store: the gateway's and PostgreSQL's mean CPU µs per call."""
    return {
        store: {
            side: round(statistics.mean(r[f"{side}_cpu_us_per_call"] for r in mine))
            for side in ("gateway", "postgres")
        }
        for store in STORES
        if (mine := [r for r in runs if r["store"] == store])
    }


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    result = report["result"]
    lines = [
        "# Call log benchmark: SQLite vs PostgreSQL",
        "",
        f"Run {report['when']} on {m['cpu']} ({m['cpus']} CPUs, {m['memory_mib']} MiB),"
        f" Python {m['python']}, {m['platform']}, PostgreSQL {report['postgresql']};"
        f" load average at the end {', '.join(f'{x:.1f}' for x in m['load_average_at_end'])}.",
        "",
        f"Gandi `operation_details` on {result['operations']:,} cached Operations,"
        f" {result['concurrency']} keep-alive clients, {result['duration']:g} s per run, every"
        " call logged; gateway, PostgreSQL and load generator share the machine.",
        "",
        "| run | store | req/s | p50 ms | p99 ms | gateway CPU µs/call"
        " | PostgreSQL CPU µs/call | calls answered / logged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, run in enumerate(result["runs"], 1):
        lines.append(
            f"| {n} | {run['store']} | {run['req_per_s']:,.1f} | {run['p50_ms']} | {run['p99_ms']}"
            f" | {run['gateway_cpu_us_per_call']} | {run['postgres_cpu_us_per_call']}"
            f" | {run['calls_answered']:,} / {run['calls_logged']:,} |"
        )
    rate, p99 = result["mean_req_per_s"], result["mean_p99_ms"]
    cpu = result["mean_cpu_us_per_call"]
    lines += [
        "",
        f"- Mean req/s: SQLite {rate['sqlite']:,.1f}, PostgreSQL {rate['postgresql']:,.1f}:"
        f" PostgreSQL at **{result['postgresql_of_sqlite']:.2f}** of SQLite's rate"
        f" (p99 {p99['sqlite']} ms vs {p99['postgresql']} ms).",
        f"- Mean CPU µs per call: SQLite {cpu['sqlite']['gateway']} (gateway);"
        f" PostgreSQL {cpu['postgresql']['gateway']} (gateway)"
        f" + {cpu['postgresql']['postgres']} (PostgreSQL's processes).",
        f"- HTTP-only ceiling in the same run: {result['http_only']['req_per_s']:,.1f} req/s;"
        f" of it: SQLite {result['of_http_only']['sqlite']:.2f},"
        f" PostgreSQL {result['of_http_only']['postgresql']:.2f}.",
        f"- Every answered call in the log (last serial = calls): {result['every_call_logged']}.",
        *report["notes"],
        "",
    ]
    earlier = report.get("history", [])
    if earlier:
        lines += ["## Earlier runs", ""]
        for old in earlier:
            r = old["result"]
            lines.append(
                f"- {old['when']}: SQLite {r['mean_req_per_s']['sqlite']:,.1f} req/s,"
                f" PostgreSQL {r['mean_req_per_s']['postgresql']:,.1f} req/s"
                f" ({r['postgresql_of_sqlite']:.2f}); {r['repeat']} rounds of"
                f" {r['duration']:g} s; load average at the end"
                f" {old['machine']['load_average_at_end'][0]:.1f}."
            )
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2, help="rounds of each store")
    parser.add_argument("--note", action="append", default=[], help="a line under the table")
    common.add_output_arguments(parser, name="calllog")
    args = parser.parse_args()
    with localpostgres.started() as postgres:
        version = postgres.bin_dir.parent.name
        result = asyncio.run(
            bench(
                size=args.size,
                duration=args.duration,
                concurrency=args.concurrency,
                repeat=args.repeat,
                postgres=postgres,
                databases=[postgres.new_database() for _ in range(args.repeat)],
            )
        )
    report = {
        "when": common.now(),
        "machine": bench_gateway.machine(),
        "postgresql": version,
        "result": result,
        "notes": [f"- {note}" for note in args.note],
        # Earlier runs are kept, newest first, so a re-run never erases its comparison.
        "history": bench_gateway.history(args.out, args.name),
    }
    common.write_results(args.out, args.name, report, markdown(report))
    return 0 if result["every_call_logged"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
