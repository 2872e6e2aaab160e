"""`make dev` and `make dev-down` process handling (:mod:`opkeeper.devenv`), with
stand-in processes in a state directory under tmp_path; no control plane.

Stand-ins print a line once they are set up (a SIGTERM handler installed, a
child started) and the tests wait for that line, never for a clock.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from opkeeper import devenv, localcluster
from tests.helpers import wait_for

IGNORES_SIGTERM = textwrap.dedent(
    """
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ignoring SIGTERM", flush=True)
    while True:
        signal.pause()
    """
)
WAITS = "import signal\nprint('waiting', flush=True)\nsignal.pause()"
LEAVES_A_CHILD = textwrap.dedent(
    f"""
    import signal, subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", {IGNORES_SIGTERM!r}])
    print("child", child.pid, flush=True)
    signal.pause()  # SIGTERM ends this process, not its child
    """
)


@pytest.fixture
def state_dir(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    yield tmp_path
    for component in devenv.components(tmp_path):
        component.stop(grace=1.0)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _started(component: devenv.Component, code: str, *, says: str) -> devenv.Launch:
    launch = component.start([sys.executable, "-c", code], env=os.environ)
    wait_for(lambda: says in component.log.read_text(), what=f"{component.name} to say {says!r}")
    return launch


def _gone(pid: int) -> bool:
    return not pathlib.Path(f"/proc/{pid}").exists()


# --- make dev-down -----------------------------------------------------------------------


def test_a_process_that_exits_on_sigterm_is_stopped_without_waiting_the_grace(
    state_dir: pathlib.Path,
) -> None:
    component = devenv.Component(name="polite", state_dir=state_dir)
    launch = _started(component, WAITS, says="waiting")
    began = time.monotonic()
    assert component.stop(grace=30.0) is devenv.Stopped.TERMINATED
    assert time.monotonic() - began < 10.0
    assert _gone(launch.pid)
    assert not component.pid_file.exists()


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace(
    state_dir: pathlib.Path,
) -> None:
    component = devenv.Component(name="stubborn", state_dir=state_dir)
    launch = _started(component, IGNORES_SIGTERM, says="ignoring SIGTERM")
    began = time.monotonic()
    assert component.stop(grace=1.0) is devenv.Stopped.KILLED
    took = time.monotonic() - began
    assert 1.0 <= took < 1.0 + devenv.KILL_WAIT_SECONDS
    assert _gone(launch.pid)
    assert component.pid() is None
    assert not component.pid_file.exists()


def test_a_child_left_behind_by_the_process_is_killed_too(state_dir: pathlib.Path) -> None:
    component = devenv.Component(name="parent", state_dir=state_dir)
    launch = _started(component, LEAVES_A_CHILD, says="ignoring SIGTERM")
    child = int(component.log.read_text().split("child ")[1].split()[0])
    assert component.stop(grace=1.0) is devenv.Stopped.KILLED
    assert _gone(launch.pid)
    assert _gone(child)


def test_a_stale_pid_file_is_removed_and_nothing_is_signalled(state_dir: pathlib.Path) -> None:
    component = devenv.Component(name="gone", state_dir=state_dir)
    launch = component.start([sys.executable, "-c", "pass"], env=os.environ)
    assert launch.process is not None
    launch.process.wait(30)
    assert component.pid_file.exists()
    assert component.stop(grace=1.0) is devenv.Stopped.NOT_RUNNING
    assert not component.pid_file.exists()


def test_a_pid_now_used_by_another_process_is_not_signalled(state_dir: pathlib.Path) -> None:
    # A group leader of its own, as an unrelated shell or daemon would be after a reboot.
    other = subprocess.Popen(
        [sys.executable, "-c", WAITS], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert other.stdout is not None
        assert other.stdout.readline() == b"waiting\n"
        component = devenv.Component(name="reused", state_dir=state_dir)
        component.pid_file.write_text(f"{other.pid} 1")  # started at another time
        assert component.pid() is None
        assert component.stop(grace=1.0) is devenv.Stopped.NOT_RUNNING
        assert other.poll() is None
    finally:
        other.kill()
        other.wait(30)


def test_dev_down_stops_every_component_and_names_the_one_that_needed_sigkill(
    state_dir: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    launches = [
        _started(devenv.Component(name="gateway", state_dir=state_dir), WAITS, says="waiting"),
        _started(
            devenv.Component(name="controller", state_dir=state_dir),
            IGNORES_SIGTERM,
            says="ignoring SIGTERM",
        ),
        # a pid file devenv no longer writes (an older make dev) is stopped as well
        _started(devenv.Component(name="leftover", state_dir=state_dir), WAITS, says="waiting"),
    ]
    capsys.readouterr()
    settings = devenv.DevSettings(stop_timeout_seconds=1.0)
    assert devenv.down(settings, state_dir=state_dir) == 0
    assert capsys.readouterr().out.splitlines() == [
        "gateway: stopped",
        "controller: still running 1 s after SIGTERM; killed with SIGKILL",
        "leftover: stopped",
        "control plane: not running",
    ]
    assert all(_gone(launch.pid) for launch in launches)
    assert not list(state_dir.glob("*.pid"))


# --- make dev: components that fail to start -----------------------------------------------


def test_a_component_that_exits_at_once_is_reported_with_its_log(state_dir: pathlib.Path) -> None:
    component = devenv.Component(name="gateway", state_dir=state_dir)
    component.log.write_text("a line from an earlier run\n")
    code = "import sys\nfor n in range(30):\n    print('line', n)\nsys.exit(3)"
    port = _free_port()
    with pytest.raises(devenv.StartFailed) as failed:
        devenv.start(
            component,
            [sys.executable, "-c", code],
            env=os.environ,
            port=port,
            setting="OPKEEPER_GATEWAY_PORT",
            ready_url=f"http://127.0.0.1:{port}/readyz",
            timeout=60.0,
        )
    message = str(failed.value)
    assert message.startswith("gateway exited with code 3 during startup; last lines of ")
    shown = message.splitlines()[1:]
    assert shown == [f"line {n}" for n in range(10, 30)]  # this run's last 20 lines


def test_a_component_that_never_becomes_ready_is_reported(state_dir: pathlib.Path) -> None:
    component = devenv.Component(name="controller", state_dir=state_dir)
    port = _free_port()
    with pytest.raises(devenv.StartFailed) as failed:
        devenv.start(
            component,
            [sys.executable, "-c", WAITS],
            env=os.environ,
            port=port,
            setting="OPKEEPER_METRICS_PORT",
            ready_url=f"http://127.0.0.1:{port}/metrics",
            timeout=1.0,
        )
    assert f"controller did not answer 200 on http://127.0.0.1:{port}/metrics within 1 s" in str(
        failed.value
    )


def test_a_port_something_listens_on_fails_before_anything_starts(
    state_dir: pathlib.Path,
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        settings = devenv.DevSettings(gateway_port=port, metrics_port=port)
        for start, setting in (
            (devenv.start_gateway, "OPKEEPER_GATEWAY_PORT"),
            (devenv.start_controller, "OPKEEPER_METRICS_PORT"),
        ):
            with pytest.raises(devenv.StartFailed) as failed:
                start(settings, state_dir=state_dir, env=os.environ)
            assert f"something is already listening on 127.0.0.1:{port}" in str(failed.value)
            assert setting in str(failed.value)
    assert not list(state_dir.glob("*.pid"))


def test_a_gateway_that_cannot_bind_its_port_is_reported_with_its_log(
    state_dir: pathlib.Path,
) -> None:
    # Bound but not listening, and without SO_REUSEADDR: the port check sees nothing
    # listening, and the gateway's own bind fails with "address already in use".
    kubeconfig = state_dir / "kubeconfig"
    kubeconfig.write_text(
        textwrap.dedent(
            """\
            apiVersion: v1
            kind: Config
            clusters:
            - name: nowhere
              cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}
            users:
            - name: nobody
              user: {token: none}
            contexts:
            - name: nowhere
              context: {cluster: nowhere, user: nobody}
            current-context: nowhere
            """
        )
    )
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        port = squatter.getsockname()[1]
        with pytest.raises(devenv.StartFailed) as failed:
            devenv.start_gateway(
                devenv.DevSettings(gateway_port=port),
                state_dir=state_dir,
                env={**os.environ, "KUBECONFIG": str(kubeconfig)},
            )
    message = str(failed.value)
    assert message.startswith("gateway exited with code 1 during startup; last lines of ")
    assert "address already in use" in message
    assert len(message.splitlines()) <= 1 + devenv.LOG_TAIL_LINES


def test_a_ready_component_is_started_once(
    state_dir: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    component = devenv.Component(name="web", state_dir=state_dir)
    port = _free_port()
    argv = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory"]
    argv += [str(state_dir), str(port)]

    def start() -> devenv.Launch:
        return devenv.start(
            component,
            argv,
            env=os.environ,
            port=port,
            setting="PORT",
            ready_url=f"http://127.0.0.1:{port}/",
            timeout=60.0,
        )

    first = start()
    again = start()  # its own port is taken by itself: that is no reason to fail
    assert first.process is not None
    assert again.process is None
    assert again.pid == first.pid
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"web: started and ready (pid {first.pid})")
    assert lines[1].startswith(f"web: already running and ready (pid {first.pid})")
    assert component.stop(grace=10.0) is devenv.Stopped.TERMINATED


def test_a_component_that_dies_later_is_noticed(state_dir: pathlib.Path) -> None:
    component = devenv.Component(name="controller", state_dir=state_dir)
    launch = _started(component, WAITS, says="waiting")
    assert launch.ended() is None
    os.kill(launch.pid, signal.SIGKILL)
    assert wait_for(launch.ended, what="the process to end") == "was killed by SIGKILL"


def test_cluster_down_stops_the_survivors_of_a_half_dead_control_plane(
    state_dir: pathlib.Path,
) -> None:
    """A kube-apiserver that crashed must not leave its etcd running after `down`."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    survivor = subprocess.Popen(
        [sys.executable, "-c", WAITS], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert survivor.stdout is not None
        assert survivor.stdout.readline().strip() == "waiting"
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "state.json").write_text(
            json.dumps({"pids": [survivor.pid, dead.pid], "kubeconfig": "unused"})
        )
        assert localcluster.running(state_dir) is None
        assert localcluster.down(state_dir)
        survivor.wait(timeout=30)  # raises if it still runs (down may have reaped it)
        assert not (state_dir / "state.json").exists()
    finally:
        if survivor.poll() is None:
            survivor.kill()
            survivor.wait()
