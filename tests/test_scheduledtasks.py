"""ScheduledTasks against the real API server, with the controller running.

Most tests schedule a one-shot ``execAt`` a few seconds ahead, because a
cron run is at most once a minute; one test waits for a real cron minute.
Concurrency and history are exercised by editing ``execAt`` after a run
(each edit is a new one-shot run) while the earlier run's Operation is
still active. Absence ("it did not run") is proven with a sentinel task due
later: once the sentinel has fired, the controller has passed the time.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest

from opkeeper import GROUP, VERSION, schedule
from tests.conftest import Cluster
from tests.helpers import ControllerProcess, Ops, controller_in_thread, wait_for

NOOP: dict[str, Any] = {"type": "test_noop", "executor": {"builtin": {"action": "noop"}}}


def sleeping(seconds: float) -> dict[str, Any]:
    return {"type": "test_sleep", "executor": {"builtin": {"action": "sleep", "seconds": seconds}}}


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def iso(moment: datetime.datetime) -> str:
    return schedule.timestamp(moment.replace(microsecond=0))


def soon(seconds: float) -> datetime.datetime:
    """A whole second at least ``seconds`` from now."""
    return (utcnow() + datetime.timedelta(seconds=seconds + 1)).replace(microsecond=0)


class Tasks:
    """ScheduledTasks in one namespace, through the official sync client."""

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str) -> None:
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.core = kubernetes.client.CoreV1Api(api)
        self.namespace = namespace
        self.ops = Ops(api, namespace)

    def create(self, name: str, *, template: dict[str, Any] | None = None, **spec: Any) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ScheduledTask",
            "metadata": {"name": name},
            "spec": {"template": {"spec": template or NOOP}, **spec},
        }
        self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "scheduledtasks", body
        )

    def get(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "scheduledtasks", name
        )
        return result

    def status(self, name: str) -> dict[str, Any]:
        status: dict[str, Any] = self.get(name).get("status") or {}
        return status

    def patch(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "scheduledtasks", name, {"spec": spec}
        )

    def patch_status(self, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.namespace, "scheduledtasks", name, {"status": status}
        )

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "scheduledtasks", name
        )

    def operations(self, task: str) -> dict[str, dict[str, Any]]:
        items = self.custom.list_namespaced_custom_object(
            GROUP,
            VERSION,
            self.namespace,
            "operations",
            label_selector=f"{schedule.LABEL_TASK}={schedule.label_value(task)}",
        )["items"]
        return {item["metadata"]["name"]: item for item in items}

    def wait_status(self, name: str, what: str, predicate: Any, timeout: float = 30) -> Any:
        return wait_for(
            lambda: predicate(s := self.status(name)) and s, timeout=timeout, what=f"{name}: {what}"
        )

    def wait_operations(self, task: str, count: int, timeout: float = 30) -> dict[str, Any]:
        return wait_for(
            lambda: len(found := self.operations(task)) >= count and found,
            timeout=timeout,
            what=f"{count} operation(s) of {task}",
        )

    def reasons(self, name: str) -> list[str]:
        items = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name}"
        ).items
        return [e.reason for e in sorted(items, key=lambda e: e.metadata.creation_timestamp)]

    def sentinel(self, name: str, at: datetime.datetime) -> None:
        """Create a one-shot due at ``at`` and wait until it fired: time has passed for
        the controller too (it processes runs in time order)."""
        self.create(name, execAt=iso(at))
        self.wait_operations(name, 1, timeout=(at - utcnow()).total_seconds() + 30)


@pytest.fixture
def tasks(cluster: Cluster, api: kubernetes.client.ApiClient, namespace: str) -> Iterator[Tasks]:
    with controller_in_thread(kubeconfig=cluster.kubeconfig, namespace=namespace):
        yield Tasks(api, namespace)


def test_one_shot_fires_once_with_a_deterministic_name(tasks: Tasks) -> None:
    due = soon(3)
    tasks.create("once", execAt=iso(due))
    waiting = tasks.wait_status("once", "armed", lambda s: s.get("nextRunAt"))
    assert waiting["state"] == "Scheduled"
    assert waiting["id"] >= 1
    assert waiting["nextRunAt"] == iso(due)

    found = tasks.wait_operations("once", 1)
    name = f"once-{due.strftime('%Y%m%d%H%M%S' if due.second else '%Y%m%d%H%M')}"
    assert list(found) == [name]
    op = found[name]
    annotations = op["metadata"]["annotations"]
    assert annotations[schedule.ANNOTATION_SCHEDULED_TIME] == iso(due)
    fired = datetime.datetime.fromisoformat(annotations[schedule.ANNOTATION_FIRED_AT])
    assert datetime.timedelta(0) <= fired - due < datetime.timedelta(seconds=1)
    assert "ownerReferences" not in op["metadata"]

    done = tasks.wait_status("once", "Completed", lambda s: s.get("state") == "Completed")
    assert done["lastOperation"] == name
    assert done["lastScheduleTime"] == iso(due)
    assert "nextRunAt" not in done
    assert "active" not in done
    assert tasks.ops.status(name)["state"] == "Succeeded"
    wait_for(lambda: "Triggered" in tasks.reasons("once"), what="a Triggered Event")
    assert len(tasks.operations("once")) == 1


def test_cron_fires_on_the_minute_and_waiting_writes_nothing(tasks: Tasks) -> None:
    tasks.create("minutely", schedule="* * * * *", timeZone="Europe/Berlin")
    armed = tasks.wait_status("minutely", "armed", lambda s: s.get("nextRunAt"))
    next_run = datetime.datetime.fromisoformat(armed["nextRunAt"])
    assert next_run.second == 0
    if next_run - utcnow() < datetime.timedelta(seconds=5):
        # Too close to the minute to watch it wait: take the following one.
        tasks.wait_operations("minutely", 1, timeout=70)
        armed = tasks.wait_status(
            "minutely", "re-armed", lambda s: s.get("nextRunAt") != armed["nextRunAt"]
        )
        wait_for(lambda: not tasks.status("minutely").get("active"), what="the run to finish")
        next_run = datetime.datetime.fromisoformat(armed["nextRunAt"])
    before = len(tasks.operations("minutely"))
    version = tasks.get("minutely")["metadata"]["resourceVersion"]
    # Waiting: the object does not change at all until a second before the run.
    while utcnow() < next_run - datetime.timedelta(seconds=1):
        assert tasks.get("minutely")["metadata"]["resourceVersion"] == version
        time.sleep(0.5)
    found = tasks.wait_operations("minutely", before + 1, timeout=30)
    name = f"minutely-{next_run.strftime('%Y%m%d%H%M')}"
    assert name in found
    status = tasks.wait_status("minutely", "fired", lambda s: s.get("lastOperation") == name)
    assert status["lastScheduleTime"] == iso(next_run)
    assert status["nextRunAt"] == iso(next_run + datetime.timedelta(minutes=1))


def test_deleted_before_it_fires_never_runs(tasks: Tasks) -> None:
    due = soon(4)
    tasks.create("doomed", execAt=iso(due))
    tasks.wait_status("doomed", "armed", lambda s: s.get("nextRunAt"))
    tasks.delete("doomed")
    tasks.sentinel("sentinel", due + datetime.timedelta(seconds=1))
    assert tasks.operations("doomed") == {}


def test_deleting_a_task_leaves_its_operations(tasks: Tasks) -> None:
    tasks.create("fired", execAt=iso(soon(2)))
    name = next(iter(tasks.wait_operations("fired", 1)))
    tasks.delete("fired")
    tasks.sentinel("sentinel", soon(2))
    assert tasks.ops.wait_state(name, "Succeeded")


def test_suspend_holds_the_run_and_resume_catches_up(tasks: Tasks) -> None:
    due = soon(3)
    tasks.create("paused", execAt=iso(due), suspend=True)
    tasks.wait_status("paused", "suspended", lambda s: s.get("state") == "Suspended")
    tasks.sentinel("sentinel", due + datetime.timedelta(seconds=1))
    assert tasks.operations("paused") == {}
    tasks.patch("paused", {"suspend": False})
    # No starting deadline: the one-shot runs late, once.
    assert len(tasks.wait_operations("paused", 1)) == 1
    tasks.wait_status("paused", "Completed", lambda s: s.get("state") == "Completed")


def test_forbid_holds_the_next_run_until_the_active_one_finished(tasks: Tasks) -> None:
    tasks.create("forbid", execAt=iso(soon(2)), concurrencyPolicy="Forbid", template=sleeping(8))
    first = next(iter(tasks.wait_operations("forbid", 1)))
    tasks.ops.wait_state(first, "Running")
    second_due = soon(1)
    tasks.patch("forbid", {"execAt": iso(second_due)})
    wait_for(lambda: "RunHeld" in tasks.reasons("forbid"), what="a RunHeld Event")
    assert list(tasks.operations("forbid")) == [first]
    assert tasks.ops.status(first)["state"] == "Running"
    # When the first finishes, the held run starts (no deadline: however late).
    found = tasks.wait_operations("forbid", 2, timeout=40)
    second = next(n for n in found if n != first)
    assert tasks.ops.status(first)["state"] == "Succeeded"
    started = datetime.datetime.fromisoformat(found[second]["metadata"]["creationTimestamp"])
    finished = datetime.datetime.fromisoformat(tasks.ops.status(first)["finishedAt"])
    assert started >= finished.replace(microsecond=0)


def test_replace_cancels_the_active_run(tasks: Tasks) -> None:
    tasks.create("replace", execAt=iso(soon(2)), concurrencyPolicy="Replace", template=sleeping(60))
    first = next(iter(tasks.wait_operations("replace", 1)))
    tasks.ops.wait_state(first, "Running")
    tasks.patch("replace", {"execAt": iso(soon(1))})
    found = tasks.wait_operations("replace", 2)
    # The cancel is written right after the create: it may not be visible yet.
    wait_for(lambda: tasks.ops.get(first)["spec"].get("cancel") is True, what="the cancel")
    tasks.ops.wait_state(first, "Cancelled")
    second = next(n for n in found if n != first)
    # The cancelled run counts as active until it has stopped, then only the new one is.
    tasks.wait_status("replace", "only the new run active", lambda s: s.get("active") == [second])
    wait_for(lambda: "Replaced" in tasks.reasons("replace"), what="a Replaced Event")


def test_allow_runs_concurrently(tasks: Tasks) -> None:
    tasks.create("allow", execAt=iso(soon(2)), template=sleeping(60))
    first = next(iter(tasks.wait_operations("allow", 1)))
    tasks.ops.wait_state(first, "Running")
    tasks.patch("allow", {"execAt": iso(soon(1))})
    found = tasks.wait_operations("allow", 2)
    status = tasks.wait_status("allow", "two active", lambda s: len(s.get("active") or []) == 2)
    assert sorted(status["active"]) == sorted(found)


def test_history_limit_removes_old_finished_operations(tasks: Tasks) -> None:
    tasks.create("history", execAt=iso(soon(2)), historyLimit=1)
    seen: list[str] = []
    for round_ in range(3):
        if round_:
            tasks.patch("history", {"execAt": iso(soon(1))})
        name = wait_for(
            lambda: next((n for n in tasks.operations("history") if n not in seen), None),
            what=f"run {round_ + 1}",
        )
        seen.append(name)
        tasks.ops.wait_state(name, "Succeeded")
        tasks.wait_status("history", "finished", lambda s: s.get("state") == "Completed")
    wait_for(lambda: list(tasks.operations("history")) == seen[-1:], what="only the last kept")


def test_missed_while_the_controller_was_stopped(
    cluster: Cluster, api: kubernetes.client.ApiClient, namespace: str
) -> None:
    tasks = Tasks(api, namespace)
    due = soon(4)
    with controller_in_thread(kubeconfig=cluster.kubeconfig, namespace=namespace):
        tasks.create("lenient", execAt=iso(due), startingDeadlineSeconds=3600)
        tasks.create("strict", execAt=iso(due), startingDeadlineSeconds=1)
        for name in ("lenient", "strict"):
            tasks.wait_status(name, "armed", lambda s: s.get("nextRunAt"))
    # The controller is down across the due time (and then some, past "strict"'s deadline).
    wait_for(lambda: utcnow() > due + datetime.timedelta(seconds=3), what="the due time to pass")
    assert tasks.operations("lenient") == {}
    with controller_in_thread(kubeconfig=cluster.kubeconfig, namespace=namespace):
        # Within its deadline: caught up once.
        assert len(tasks.wait_operations("lenient", 1)) == 1
        lenient = tasks.wait_status("lenient", "done", lambda s: s.get("state") == "Completed")
        assert lenient["lastScheduleTime"] == iso(due)
        # Past its deadline: counted, with a Warning Event, never run.
        strict = tasks.wait_status("strict", "missed", lambda s: s.get("state") == "Missed")
        assert strict["missedRuns"] == 1
        assert strict["lastMissedTime"] == iso(due)
        wait_for(lambda: "MissedRun" in tasks.reasons("strict"), what="a MissedRun Event")
        assert tasks.operations("strict") == {}
        assert len(tasks.operations("lenient")) == 1


def test_cron_outage_catches_up_the_latest_run_once(
    cluster: Cluster, api: kubernetes.client.ApiClient, namespace: str
) -> None:
    tasks = Tasks(api, namespace)
    # Armed by an earlier controller 5 minutes ago, which then went away: the
    # status says so; the new controller must catch up once and count the rest.
    armed = (utcnow() - datetime.timedelta(minutes=5)).replace(second=0, microsecond=0)
    tasks.create("hourly", schedule="* * * * *", startingDeadlineSeconds=90)
    tasks.patch_status("hourly", {"nextRunAt": iso(armed), "state": "Scheduled", "id": 999999})
    with controller_in_thread(kubeconfig=cluster.kubeconfig, namespace=namespace):
        found = tasks.wait_operations("hourly", 1)
        status = tasks.wait_status("hourly", "caught up", lambda s: s.get("lastScheduleTime"))
    latest = datetime.datetime.fromisoformat(status["lastScheduleTime"])
    assert list(found) == [f"hourly-{latest.strftime('%Y%m%d%H%M')}"]
    assert utcnow() - latest < datetime.timedelta(seconds=90)
    slots = int((latest - armed).total_seconds() // 60)
    assert status["missedRuns"] == slots  # every slot from `armed` up to the latest, exclusive
    assert status["id"] == 999999


def test_a_second_controller_never_creates_a_run_twice(
    cluster: Cluster, api: kubernetes.client.ApiClient, namespace: str, tmp_path: Any
) -> None:
    tasks = Tasks(api, namespace)
    other = ControllerProcess(env=cluster.env, namespace=namespace, log=tmp_path / "other.log")
    other.start()
    try:
        with controller_in_thread(kubeconfig=cluster.kubeconfig, namespace=namespace):
            due = soon(6)
            names = [f"race-{i}" for i in range(5)]
            for name in names:
                tasks.create(name, execAt=iso(due))
            for name in names:
                tasks.wait_status(name, "done", lambda s: s.get("state") == "Completed")
            tasks.sentinel("sentinel", soon(2))
            for name in names:
                assert len(tasks.operations(name)) == 1
                assert "missedRuns" not in tasks.status(name)
    finally:
        other.stop()
