"""What every benchmark script shares, written once.

* machine facts: benchmark figures mean nothing without the machine they came
  from, so every bench script stores these facts beside its numbers (JSON) and
  the operations and ScheduledTask benchmarks as the header of their markdown;
* readings of a process from /proc: peak and current RSS, CPU seconds;
* the API server's own count of successful writes (``apiserver_request_total``);
* the namespace to work in and the ``opkeeper controller`` process to measure;
* the ``--out``/``--name`` options and writing ``<name>.json`` + ``<name>.md``.

The scripts run as ``python bench/bench_X.py``, so this directory is on
sys.path and ``import common`` finds this file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from typing import Any

from opkeeper import kube, localcluster

RESULTS = pathlib.Path(__file__).parent / "results"
WRITE_VERBS = frozenset({"POST", "PUT", "PATCH", "DELETE", "APPLY"})

# --- machine facts ------------------------------------------------------------------


def now() -> str:
    """The current UTC time, to the second, ISO 8601."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_kib() -> int:
    """The machine's total memory (MemTotal), in KiB; 0 when unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def info(*, kube_apiserver: str = localcluster.KUBE_VERSION) -> dict[str, Any]:
    """What the results were measured on (``kube_apiserver``: what the server reports)."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "date": now(),
        "commit": commit or "unknown",
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib() / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "kopf": _version("kopf"),
        "aiohttp": _version("aiohttp"),
        "kube_apiserver": kube_apiserver,
        "etcd": localcluster.ETCD_VERSION,
    }


def markdown_header(facts: dict[str, Any]) -> str:
    """A one-sentence machine description for a results table, from :func:`info`."""
    cores = facts.get("cores", facts.get("nproc"))  # "nproc": the operations results' key
    return (
        f"Measured {facts['date']} at commit {facts['commit']} on {cores} cores"
        f" ({facts['cpu']}), {facts['memory_gib']} GiB RAM, Linux {facts['kernel']},"
        f" Python {facts['python']}, kopf {facts['kopf']}, aiohttp {facts['aiohttp']},"
        f" kube-apiserver {facts['kube_apiserver']}, etcd {facts['etcd']}"
        " (local, loopback, --unsafe-no-fsync)."
    )


# --- a process, from /proc ---------------------------------------------------------


def memory_of(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    found: dict[str, int] = {}
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


def peak_rss_mib(pid: int | str = "self") -> float:
    return round(memory_of(pid).get("VmHWM", 0) / 1024, 1)


def process_name(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as comm:
        return comm.read().strip()


def machine_busy_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as stat:
        ticks = [int(v) for v in stat.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return sum(ticks) - idle, sum(ticks)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far."""
    # The command name (field 2) may hold spaces: count fields after its ")".
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the API server ----------------------------------------------------------------


def by_resource(labels: dict[str, str]) -> str:
    return labels.get("resource", "")


async def apiserver_writes(
    client: kube.Client, key: Callable[[dict[str, str]], str] = by_resource
) -> dict[str, int]:
    """Successful writes so far, summed by ``key(labels)``, from the API server's own
    ``apiserver_request_total`` counters."""
    async with client.session.get("/metrics") as response:
        text = await response.text()
    totals: dict[str, int] = {}
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
        if labels.get("verb") not in WRITE_VERBS or not labels.get("code", "").startswith("2"):
            continue
        name = key(labels)
        totals[name] = totals.get(name, 0) + int(float(line.rsplit(" ", 1)[1]))
    return totals


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """What changed between two :func:`apiserver_writes` readings, sorted, zeros left out."""
    keys = set(after) | set(before)
    changed = {k: after.get(k, 0) - before.get(k, 0) for k in keys}
    return {k: v for k, v in sorted(changed.items()) if v}


async def ensure_namespace(client: kube.Client, name: str) -> None:
    with contextlib.suppress(kube.AlreadyExists):
        await client.create(
            kube.NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        )


@contextlib.contextmanager
def controller(
    kubeconfig: str,
    *,
    namespaces: Sequence[str],
    log: pathlib.Path,
    options: Sequence[str] = (),
    python: Sequence[str] = ("-m", "opkeeper.cli"),
) -> Iterator[subprocess.Popen[bytes]]:
    """``opkeeper controller --standalone`` on ``namespaces`` in its own process, output
    to ``log``; ``python``: what runs the CLI (e.g. ``-c`` and a profiling wrapper)."""
    argv = [sys.executable, *python, "controller", "--standalone"]
    for namespace in namespaces:
        argv += ["-n", namespace]
    argv += [*options, "--log-level", "warning"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv,
            env={**os.environ, "KUBECONFIG": kubeconfig, "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            yield process
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


# --- results -----------------------------------------------------------------------


def add_output_arguments(parser: argparse.ArgumentParser, *, name: str) -> None:
    """``--out DIR`` (default bench/results) and ``--name STEM`` (default ``name``)."""
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--name", default=name, help="results file stem")


def write_results(out: str | pathlib.Path, name: str, report: dict[str, Any], text: str) -> None:
    """``report`` to <out>/<name>.json, the markdown ``text`` to <out>/<name>.md and stdout."""
    folder = pathlib.Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / f"{name}.md").write_text(text)
    print(text)
