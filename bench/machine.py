"""Machine facts recorded next to every benchmark result.

Benchmark figures mean nothing without the machine they came from, so every
bench script stores these facts beside its numbers (JSON) and as the header
of its markdown table.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata
from typing import Any

from opkeeper import localcluster


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return 0.0


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def info() -> dict[str, Any]:
    """What the results were measured on."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit or "unknown",
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "kopf": _version("kopf"),
        "aiohttp": _version("aiohttp"),
        "kube_apiserver": localcluster.KUBE_VERSION,
        "etcd": localcluster.ETCD_VERSION,
    }


def markdown_header(facts: dict[str, Any]) -> str:
    """A one-paragraph machine description for a results table."""
    return (
        f"Measured {facts['date']} at commit {facts['commit']} on {facts['cores']} cores"
        f" ({facts['cpu']}), {facts['memory_gib']} GiB RAM, Linux {facts['kernel']},"
        f" Python {facts['python']}, kopf {facts['kopf']}, kube-apiserver"
        f" {facts['kube_apiserver']}, etcd {facts['etcd']} (local, --unsafe-no-fsync).\n"
    )
