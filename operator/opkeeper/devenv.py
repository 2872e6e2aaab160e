"""`make dev`: a local control plane, the controller, the gateway and demo data.

Everything started here keeps running after `make dev` returns (so you can
use kubectl, the gateway and your legacy scripts against it) and is stopped
by `make dev-down`. State, logs and the kubeconfig live in `.localcluster/`.

Set ``OPKEEPER_KUBECONFIG`` to use another cluster (for example a kind
cluster) instead of starting a local control plane. A plain ``KUBECONFIG``
is deliberately ignored so that demo data never lands in whatever cluster a
shell happens to point at.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import yaml

from opkeeper import localcluster

STATE_DIR = localcluster.DEFAULT_STATE_DIR
DEMO_NAMESPACE = "opkeeper-demo"
EXAMPLES = localcluster.REPO_ROOT / "examples"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DevSettings:
    """Knobs of `make dev` (environment variables in brackets)."""

    gateway_port: int = int(os.environ.get("OPKEEPER_GATEWAY_PORT", "8480"))
    """Loopback port of the gateway [OPKEEPER_GATEWAY_PORT], default 8480."""
    metrics_port: int = int(os.environ.get("OPKEEPER_METRICS_PORT", "8481"))
    """Loopback port of the controller's Prometheus metrics [OPKEEPER_METRICS_PORT]."""
    settle_seconds: float = 90.0
    """How long to show the demo operations progressing before returning."""
    schedule_in_seconds: int = 20
    """The demo ScheduledTask fires this many seconds after `make dev` applies it."""


class _Process:
    """A detached background process with a pid file and a log in STATE_DIR."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pid_file = STATE_DIR / f"{name}.pid"
        self.log = STATE_DIR / f"{name}.log"

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
            os.kill(pid, 0)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None
        return pid

    def start(self, argv: Sequence[str], *, env: dict[str, str]) -> None:
        if self.pid() is not None:
            print(f"{self.name}: already running (pid {self.pid()}), log {self.log}")
            return
        with open(self.log, "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self.pid_file.write_text(str(proc.pid))
        print(f"{self.name}: started (pid {proc.pid}), log {self.log}")

    def stop(self) -> None:
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            print(f"{self.name}: stopped")
        self.pid_file.unlink(missing_ok=True)


CONTROLLER = _Process("controller")
GATEWAY = _Process("gateway")


def _kubectl(kubeconfig: pathlib.Path, *args: str, input: str | None = None) -> str:
    result = subprocess.run(
        [localcluster.kubectl_path(), "--kubeconfig", str(kubeconfig), *args],
        input=input,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def _demo_manifests(settings: DevSettings) -> str:
    docs = [yaml.safe_load(p.read_text()) for p in sorted(EXAMPLES.glob("*.yaml"))]
    fire_at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(
        seconds=settings.schedule_in_seconds
    )
    docs.append(
        {
            "apiVersion": "opkeeper.dev/v1alpha1",
            "kind": "ScheduledTask",
            "metadata": {"name": "demo-scheduled-delete"},
            "spec": {
                "execAt": fire_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "template": {
                    "spec": {
                        "type": "domain_delete",
                        "object": {"kind": "domain", "name": "expired-example.org"},
                        "executor": {"builtin": {"action": "noop"}},
                    }
                },
            },
        }
    )
    return yaml.safe_dump_all(docs)


def _watch_progress(kubeconfig: pathlib.Path, settings: DevSettings) -> None:
    """Print the demo table whenever it changes, until everything that can finish has."""
    deadline = time.monotonic() + settings.settle_seconds
    last = ""
    while time.monotonic() < deadline:
        table = _kubectl(kubeconfig, "get", "ops,stask", "-n", DEMO_NAMESPACE)
        if table != last:
            print(f"--- {datetime.datetime.now().strftime('%H:%M:%S')}\n{table}", flush=True)
            last = table
        ops = json.loads(_kubectl(kubeconfig, "get", "ops", "-n", DEMO_NAMESPACE, "-o", "json"))
        states = [o.get("status", {}).get("state") for o in ops["items"]]
        scheduled_fired = any(
            o["metadata"].get("labels", {}).get("opkeeper.dev/scheduledtask") for o in ops["items"]
        )
        if scheduled_fired and all(
            s in ("Succeeded", "FailedInternal", "FailedExternal", "Cancelled", "WaitingExternal")
            for s in states
        ):
            return
        time.sleep(2)  # a human-paced refresh of the table, not test synchronisation


def up(settings: DevSettings) -> int:
    STATE_DIR.mkdir(exist_ok=True)
    external = os.environ.get("OPKEEPER_KUBECONFIG")
    if external:
        kubeconfig = pathlib.Path(external)
        localcluster.install_crds(kubeconfig=kubeconfig)
    else:
        kubeconfig = localcluster.up(STATE_DIR)
    env = {**os.environ, "KUBECONFIG": str(kubeconfig.resolve())}
    opkeeper = str(pathlib.Path(sys.executable).parent / "opkeeper")
    CONTROLLER.start(
        [opkeeper, "controller", "--all-namespaces", "--metrics-port", str(settings.metrics_port)],
        env=env,
    )
    gateway = [opkeeper, "gateway", "--host", "127.0.0.1", "--port", str(settings.gateway_port)]
    GATEWAY.start(
        [
            *gateway,
            "--call-log",
            str((STATE_DIR / "calllog.sqlite3").resolve()),
        ],
        env=env,
    )
    with contextlib.suppress(subprocess.CalledProcessError):
        _kubectl(kubeconfig, "create", "namespace", DEMO_NAMESPACE)
    # A fresh demo each time: what a previous `make dev` left would hide the progress.
    _kubectl(kubeconfig, "delete", "ops,stask", "--all", "-n", DEMO_NAMESPACE, "--timeout=60s")
    _kubectl(
        kubeconfig,
        "apply",
        "--server-side",
        "-n",
        DEMO_NAMESPACE,
        "-f",
        "-",
        input=_demo_manifests(settings),
    )
    _watch_progress(kubeconfig, settings)
    demo = subprocess.run(
        [*gateway, "--demo-key", DEMO_NAMESPACE], env=env, capture_output=True, text=True
    )
    print(demo.stdout if demo.returncode == 0 else f"demo API key failed:\n{demo.stderr}")
    print(
        f"\nThe control plane, controller and gateway keep running (`make dev-down` stops them).\n"
        f"  export KUBECONFIG={kubeconfig.resolve()}\n"
        f"  kubectl get ops,stask -n {DEMO_NAMESPACE}\n"
        f"  controller metrics: http://127.0.0.1:{settings.metrics_port}/metrics\n"
        f"  gateway: http://127.0.0.1:{settings.gateway_port}/xmlrpc\n"
    )
    return 0


def down() -> int:
    GATEWAY.stop()
    CONTROLLER.stop()
    print("control plane: " + ("stopped" if localcluster.down(STATE_DIR) else "not running"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["up"]:
        return up(DevSettings())
    if args == ["down"]:
        return down()
    print("usage: python -m opkeeper.devenv {up,down}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
