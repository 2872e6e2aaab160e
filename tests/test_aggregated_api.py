"""The aggregated API through a real kube-apiserver's aggregation layer.

kube-apiserver will not proxy to a loopback address, so the whole set-up (etcd,
kube-apiserver, the namespace controller, the gateway on 192.0.2.10, kubectl)
runs in a network namespace this test creates with ``unshare -n`` (root only;
CI runs as root): tests/aggregated_netns.py does the work there and reports
each check as JSON, asserted one by one below. Without root or ``unshare`` the
tests skip and say why.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
from typing import Any

import pytest

from opkeeper import localcluster

CHECKS = (
    "discovery_kubectl",
    "discovery_aggregated",
    "openapi",
    "bob_creates",
    "alice_reads_with_kubectl",
    "alice_reads_with_xmlrpc_client",
    "forbidden",
    "direct_connections_refused",
    "call_log_user",
    "namespace_deletion",
    "deletion_blocked_while_unavailable",
    "ca_rotation",
)
TIMEOUT_SECONDS = 600
"""Bound on the whole run (the checks themselves take about a minute; a cold
kube-controller-manager build takes longer, and happens once per machine)."""


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (unshare -n); CI runs as root"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare or ip (util-linux, iproute2) not installed"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare -n refused here: {probe.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    localcluster.find_binaries()
    localcluster.find_controller_manager()  # built outside the timed run on a cold cache
    out = tmp_path_factory.mktemp("aggregated") / "results.json"
    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run(
        ["unshare", "-n", sys.executable, "-m", "tests.aggregated_netns", str(out)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
    )
    if not out.exists():
        pytest.fail(f"the checks did not report (exit {done.returncode}):\n{done.stderr[-5000:]}")
    report: dict[str, Any] = json.loads(out.read_text())
    environment = report["checks"].get("environment")
    if environment is not None:
        pytest.fail(f"set-up failed: {environment['detail']}\n{done.stderr[-5000:]}")
    return report


@pytest.mark.parametrize("name", CHECKS)
def test_through_kube_apiserver(results: dict[str, Any], name: str) -> None:
    check = results["checks"].get(name)
    assert check is not None, f"{name} did not run"
    assert check["ok"], check["detail"]
