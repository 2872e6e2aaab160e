"""`make dev`: a local control plane, the controller, the gateway and demo data.

Everything started here keeps running after `make dev` returns (so you can
use kubectl, the gateway and your legacy scripts against it) and is stopped
by `make dev-down`. State, logs and the kubeconfig live in `.localcluster/`.

Set ``OPKEEPER_KUBECONFIG`` to use another cluster (for example a kind
cluster) instead of starting a local control plane. A plain ``KUBECONFIG``
is deliberately ignored so that demo data never lands in whatever cluster a
shell happens to point at.

The controller and the gateway are :class:`Component` s: a pid file and a log
in the state directory. `make dev` reports one that exits or does not answer
its readiness URL (with the end of its log) and fails; `make dev-down` sends
SIGTERM, then SIGKILL to what still runs after ``stop_timeout_seconds``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import enum
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence

import yaml

from opkeeper import localcluster

STATE_DIR = localcluster.DEFAULT_STATE_DIR
DEMO_NAMESPACE = "opkeeper-demo"
DEMO_USER = "demo"
"""User id of the API key `make dev` creates (the Gandi login of its snippet)."""
EXAMPLES = localcluster.REPO_ROOT / "examples"
LOG_TAIL_LINES = 20
"""Lines of a component's log shown when it fails to start."""
KILL_WAIT_SECONDS = 5.0
"""How long to wait for a process group to vanish after SIGKILL."""


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
    ready_timeout_seconds: float = 60.0
    """How long a started controller or gateway may take to answer its readiness URL."""
    stop_timeout_seconds: float = 10.0
    """How long `make dev-down` waits after SIGTERM before it sends SIGKILL."""


class StartFailed(Exception):
    """A component did not come up; the message says why, ending with its log's tail."""


class Stopped(enum.Enum):
    """What stopping a component took."""

    NOT_RUNNING = "not running"
    TERMINATED = "stopped"
    KILLED = "killed with SIGKILL"
    SURVIVED = "still running after SIGKILL"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Component:
    """A detached background process of `make dev`: ``<name>.pid`` and ``<name>.log``
    in ``state_dir``.

    It runs in a session of its own, so its pid is also its process group id:
    stopping signals the group, which reaches any process it started (the
    gateway's workers) even once it exited itself. The pid file also holds the
    process's start time where /proc has one, so that a pid the kernel has
    since given to an unrelated process (after a reboot, say) is never signalled.
    """

    name: str
    state_dir: pathlib.Path

    @property
    def pid_file(self) -> pathlib.Path:
        return self.state_dir / f"{self.name}.pid"

    @property
    def log(self) -> pathlib.Path:
        return self.state_dir / f"{self.name}.log"

    def pid(self) -> int | None:
        """The component's pid (and process group) while any process of it runs."""
        recorded = self._recorded()
        if recorded is None or not _group_alive(*recorded):
            return None
        return recorded[0]

    def _recorded(self) -> tuple[int, str | None] | None:
        try:
            fields = self.pid_file.read_text().split()
            return int(fields[0]), fields[1] if len(fields) > 1 else None
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def start(self, argv: Sequence[str], *, env: Mapping[str, str]) -> Launch:
        """Start the process unless it runs already; its output is appended to the log."""
        running = self.pid()
        if running is not None:
            return Launch(component=self, pid=running, process=None, log_offset=0)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            offset = log.seek(0, os.SEEK_END)
            process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        started = _start_time(process.pid)
        self.pid_file.write_text(f"{process.pid} {started or ''}".strip())
        return Launch(component=self, pid=process.pid, process=process, log_offset=offset)

    def stop(self, *, grace: float) -> Stopped:
        """SIGTERM to the component's process group, SIGKILL to whatever of it still runs
        ``grace`` seconds later. The pid file goes only once nothing of it runs, so a
        process that survives is never forgotten by the next `make dev-down`."""
        recorded = self._recorded()
        if recorded is None or not _group_alive(*recorded):
            self.pid_file.unlink(missing_ok=True)
            return Stopped.NOT_RUNNING
        pid = recorded[0]
        _signal_group(pid, signal.SIGTERM)
        if _wait_gone(*recorded, timeout=grace):
            result = Stopped.TERMINATED
        else:
            _signal_group(pid, signal.SIGKILL)
            if not _wait_gone(*recorded, timeout=KILL_WAIT_SECONDS):
                return Stopped.SURVIVED
            result = Stopped.KILLED
        self.pid_file.unlink(missing_ok=True)
        return result


@dataclasses.dataclass(frozen=True, kw_only=True)
class Launch:
    """A component as this `make dev` started it, or found it running."""

    component: Component
    pid: int
    process: subprocess.Popen[bytes] | None
    """The process if this run started it (its exit code is known then); else None."""
    log_offset: int
    """Where this run's output begins in the component's log."""

    def ended(self) -> str | None:
        """None while the component runs; otherwise how it ended."""
        if self.process is None:
            return None if self.component.pid() is not None else "exited"
        code = self.process.poll()
        if code is None:
            return None
        if code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"

    def failure(self, reason: str) -> StartFailed:
        """A StartFailed naming the component and ``reason``, with the end of its log."""
        log = self.component.log
        return StartFailed(
            f"{self.component.name} {reason}; last lines of {log}:\n"
            f"{_tail(log, offset=self.log_offset, lines=LOG_TAIL_LINES)}"
        )


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), if known."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count the fields
    # after its closing parenthesis, which start at field 3; the start time is field 22.
    return stat.rpartition(")")[2].split()[19]


def _group_alive(pid: int, started: str | None) -> bool:
    """Whether process group ``pid`` still has a member, and is the group that the
    process started at ``started`` leads (or led)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaps it if it is an exited child of ours
    try:
        os.killpg(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # While a group has members the kernel gives its number to no new process, so a
    # process with this pid is either the leader we started (same start time) or an
    # unrelated group leader that got the number after our group was gone.
    now = _start_time(pid)
    return now is None or started is None or now == started


def _signal_group(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signum)


def _wait_gone(pid: int, started: str | None, *, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for process group ``pid`` to end; True if it did."""
    deadline = time.monotonic() + timeout
    while _group_alive(pid, started):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)  # polling: the group's processes need not be our children
    return True


def _tail(path: pathlib.Path, *, offset: int, lines: int) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.strip().splitlines()[-lines:]) or "(nothing logged)"


def ensure_port_free(*, port: int, component: str, setting: str) -> None:
    """Raise StartFailed if something already listens on 127.0.0.1:``port``: a
    component started anyway would die on "address already in use", or worse, its
    readiness probe would be answered by the other process."""
    with socket.socket() as probe:
        probe.settimeout(2)
        if probe.connect_ex(("127.0.0.1", port)) != 0:
            return
    raise StartFailed(
        f"{component}: something is already listening on 127.0.0.1:{port}; stop it"
        f" (`ss -ltnp 'sport = :{port}'` shows which process) or set {setting} to"
        " another port"
    )


def wait_ready(launch: Launch, *, url: str, timeout: float) -> None:
    """Wait until ``url`` answers 200 while the component's process is alive.

    Raises StartFailed, with the tail of the component's log, if the process ends
    or ``url`` does not answer 200 within ``timeout`` seconds.
    """
    # No proxy: an http_proxy in the environment must not answer for a loopback port.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        ended = launch.ended()
        if ended is not None:
            raise launch.failure(f"{ended} during startup")
        try:
            with opener.open(url, timeout=5) as reply:
                if reply.status == 200:
                    break
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        if time.monotonic() >= deadline:
            raise launch.failure(f"did not answer 200 on {url} within {timeout:g} s ({last})")
        time.sleep(0.25)  # polling a server that is starting
    # Once more: the answer may have come from another process that took the port
    # while ours was failing to bind it.
    ended = launch.ended()
    if ended is not None:
        raise launch.failure(f"{ended} during startup")


def start(
    component: Component,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    port: int,
    setting: str,
    ready_url: str,
    timeout: float,
) -> Launch:
    """Start ``component`` (unless it runs already) and wait until it is ready; raises
    StartFailed if its port is taken by something else or it does not come up."""
    if component.pid() is None:
        ensure_port_free(port=port, component=component.name, setting=setting)
    launch = component.start(argv, env=env)
    wait_ready(launch, url=ready_url, timeout=timeout)
    how = "started" if launch.process is not None else "already running"
    print(f"{component.name}: {how} and ready (pid {launch.pid}), log {component.log}")
    return launch


def _opkeeper() -> str:
    return str(pathlib.Path(sys.executable).parent / "opkeeper")


def start_controller(
    settings: DevSettings, *, state_dir: pathlib.Path, env: Mapping[str, str]
) -> Launch:
    """The controller, ready once its /metrics answers (``opkeeper controller`` serves
    no other probe; kopf's liveness endpoint is not switched on)."""
    port = settings.metrics_port
    return start(
        Component(name="controller", state_dir=state_dir),
        [
            _opkeeper(),
            "controller",
            "--all-namespaces",
            "--metrics-port",
            str(port),
            "--metrics-address",
            "127.0.0.1",
        ],
        env=env,
        port=port,
        setting="OPKEEPER_METRICS_PORT",
        ready_url=f"http://127.0.0.1:{port}/metrics",
        timeout=settings.ready_timeout_seconds,
    )


def start_gateway(
    settings: DevSettings, *, state_dir: pathlib.Path, env: Mapping[str, str]
) -> Launch:
    """The gateway, ready once its /readyz answers 200 (its caches are synced)."""
    port = settings.gateway_port
    return start(
        Component(name="gateway", state_dir=state_dir),
        [
            *_gateway_command(settings),
            "--call-log",
            str((state_dir / "calllog.sqlite3").resolve()),
        ],
        env=env,
        port=port,
        setting="OPKEEPER_GATEWAY_PORT",
        ready_url=f"http://127.0.0.1:{port}/readyz",
        timeout=settings.ready_timeout_seconds,
    )


def _gateway_command(settings: DevSettings) -> list[str]:
    return [_opkeeper(), "gateway", "--host", "127.0.0.1", "--port", str(settings.gateway_port)]


def demo_key_command(settings: DevSettings) -> list[str]:
    """``opkeeper apikey create`` for the demo namespace: it prints the key with a
    ready-to-paste snippet per dialect, pointing at this `make dev`'s gateway."""
    return [
        _opkeeper(),
        "apikey",
        "create",
        "--namespace",
        DEMO_NAMESPACE,
        "--user",
        DEMO_USER,
        "--url",
        f"http://127.0.0.1:{settings.gateway_port}",
    ]


def components(state_dir: pathlib.Path) -> list[Component]:
    """What `make dev-down` stops: the gateway first (so it accepts no write that the
    stopped controller would never act on), the controller, then any other pid file
    in ``state_dir`` (left by an older `make dev`)."""
    names = ["gateway", "controller"]
    names += sorted({p.stem for p in state_dir.glob("*.pid")} - set(names))
    return [Component(name=name, state_dir=state_dir) for name in names]


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


def _watch_progress(
    kubeconfig: pathlib.Path, settings: DevSettings, launches: Sequence[Launch]
) -> None:
    """Print the demo table whenever it changes, until everything that can finish has.
    Raises StartFailed if a component ends meanwhile."""
    deadline = time.monotonic() + settings.settle_seconds
    last = ""
    while time.monotonic() < deadline:
        for launch in launches:
            ended = launch.ended()
            if ended is not None:
                raise launch.failure(ended)
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


def up(settings: DevSettings, *, state_dir: pathlib.Path = STATE_DIR) -> int:
    state_dir.mkdir(exist_ok=True)
    try:
        external = os.environ.get("OPKEEPER_KUBECONFIG")
        if external:
            kubeconfig = pathlib.Path(external)
            localcluster.install_crds(kubeconfig=kubeconfig)
        else:
            kubeconfig = localcluster.up(state_dir)
        env = {**os.environ, "KUBECONFIG": str(kubeconfig.resolve())}
        launches = [
            start_controller(settings, state_dir=state_dir, env=env),
            start_gateway(settings, state_dir=state_dir, env=env),
        ]
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
        _watch_progress(kubeconfig, settings, launches)
    except (StartFailed, localcluster.LocalClusterError) as failed:
        print(f"make dev failed: {failed}\n`make dev-down` stops what did start.", file=sys.stderr)
        return 1
    demo = subprocess.run(demo_key_command(settings), env=env, capture_output=True, text=True)
    print(demo.stdout if demo.returncode == 0 else f"demo API key failed:\n{demo.stderr}")
    print(
        f"\nThe control plane, controller and gateway keep running (`make dev-down` stops them).\n"
        f"  export KUBECONFIG={kubeconfig.resolve()}\n"
        f"  kubectl get ops,stask -n {DEMO_NAMESPACE}\n"
        f"  controller metrics: http://127.0.0.1:{settings.metrics_port}/metrics\n"
        f"  gateway: http://127.0.0.1:{settings.gateway_port}/xmlrpc\n"
        f"  BDOM: http://127.0.0.1:{settings.gateway_port}/bdom/task/status/-/-/-/-/-/"
        " (curl lines above)\n"
        f"  XenAPI: http://127.0.0.1:{settings.gateway_port}/xenapi\n"
    )
    return 0


def down(settings: DevSettings, *, state_dir: pathlib.Path = STATE_DIR) -> int:
    """Stop every component, then the local control plane (localcluster stops it the
    same way: SIGTERM, SIGKILL after a grace period). Non-zero if a process survived."""
    survived = False
    for component in components(state_dir):
        result = component.stop(grace=settings.stop_timeout_seconds)
        if result is Stopped.KILLED:
            print(
                f"{component.name}: still running {settings.stop_timeout_seconds:g} s"
                " after SIGTERM; killed with SIGKILL"
            )
        else:
            print(f"{component.name}: {result.value}")
        survived |= result is Stopped.SURVIVED
    print("control plane: " + ("stopped" if localcluster.down(state_dir) else "not running"))
    return 1 if survived else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["up"]:
        return up(DevSettings())
    if args == ["down"]:
        return down(DevSettings())
    print("usage: python -m opkeeper.devenv {up,down}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
