"""The reconciliation plan of a ScheduledTask (opkeeper.schedule.plan), without a cluster.

Each test drives a task through time by applying the plan's status patch
the way the API server would (JSON merge patch) and planning again: this is
also how "waiting costs no writes" is pinned down at the unit level — a
re-plan before the next run must produce an empty patch.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

import pytest

from opkeeper import models, schedule, states

UTC = datetime.UTC


def at(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime.datetime:
    return datetime.datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


CREATED = at(2026, 1, 1, 9, 30)
TEMPLATE = {"spec": {"type": "noop", "executor": {"builtin": {"action": "noop"}}}}


@dataclasses.dataclass
class Task:
    """A task as the API server holds it, advanced by applying plans."""

    spec: dict[str, Any]
    status: dict[str, Any] = dataclasses.field(default_factory=dict)
    name: str = "nightly"
    created: datetime.datetime = CREATED
    generation: int = 1
    operations: dict[str, schedule.OperationInfo] = dataclasses.field(default_factory=dict)
    in_flight: set[str] = dataclasses.field(default_factory=set)
    gone: set[str] = dataclasses.field(default_factory=set)

    def view(self) -> schedule.TaskView:
        return schedule.TaskView(
            name=self.name,
            created=self.created,
            generation=self.generation,
            spec=models.ScheduledTaskSpec.model_validate({"template": TEMPLATE, **self.spec}),
            status=models.ScheduledTaskStatus.model_validate(self.status),
        )

    def plan(self, now: datetime.datetime) -> schedule.Plan:
        return schedule.plan(
            task=self.view(),
            operations=self.operations.values(),
            in_flight=frozenset(self.in_flight),
            gone=frozenset(self.gone),
            now=now,
        )

    def step(self, now: datetime.datetime) -> schedule.Plan:
        """Plan and carry it out: patch status, create the Operation (seen at once)."""
        result = self.plan(now)
        for key, value in result.status.items():
            if value is None:
                self.status.pop(key, None)
            else:
                self.status[key] = value
        if result.fire is not None:
            self.operations[result.fire.name] = schedule.OperationInfo(
                name=result.fire.name, state=None, created=now, run=result.fire.run
            )
        for name in result.delete:
            del self.operations[name]
        return result

    def finish(self, name: str, state: states.State = states.State.SUCCEEDED) -> None:
        self.operations[name] = dataclasses.replace(self.operations[name], state=state)

    def edit(self, **spec: Any) -> None:
        self.spec.update(spec)
        self.generation += 1


def cron(**extra: Any) -> Task:
    return Task(spec={"schedule": "0 * * * *", **extra})


def test_fresh_task_waits_and_costs_nothing_until_due() -> None:
    task = cron()
    first = task.step(at(2026, 1, 1, 9, 30, 1))
    assert first.status == {
        "observedGeneration": 1,
        "nextRunAt": "2026-01-01T10:00:00Z",
        "state": "Scheduled",
    }
    assert first.fire is None
    assert first.wake_at == at(2026, 1, 1, 10)
    # Waiting: any number of re-plans before the run write nothing.
    for minute in (31, 45, 59):
        again = task.step(at(2026, 1, 1, 9, minute, 59))
        assert again.status == {}
        assert again.fire is None
        assert again.notices == ()
        assert again.wake_at == at(2026, 1, 1, 10)


def test_due_run_fires_with_a_deterministic_name() -> None:
    task = cron()
    task.step(at(2026, 1, 1, 9, 30, 1))
    fired = task.step(at(2026, 1, 1, 10, 0, 0, 2000))
    assert fired.fire == schedule.Fire(
        run=at(2026, 1, 1, 10), name="nightly-202601011000", recovery=False
    )
    assert fired.status == {
        "nextRunAt": "2026-01-01T11:00:00Z",
        "lastScheduleTime": "2026-01-01T10:00:00Z",
        "lastOperation": "nightly-202601011000",
        "active": ["nightly-202601011000"],
        "state": "Triggered",
    }
    assert [n.reason for n in fired.notices] == ["Triggered"]
    assert fired.wake_at == at(2026, 1, 1, 11)
    # The same decision again (a restart, a second controller) names the same Operation.
    assert task.step(at(2026, 1, 1, 10, 0, 1)).fire is None
    task.finish("nightly-202601011000")
    done = task.step(at(2026, 1, 1, 10, 5))
    assert done.status == {"active": None, "state": "Scheduled"}


def test_one_shot_lifecycle() -> None:
    task = Task(spec={"execAt": "2026-01-01T12:00:00Z"})
    waiting = task.step(at(2026, 1, 1, 9, 30, 1))
    assert waiting.status["nextRunAt"] == "2026-01-01T12:00:00Z"
    assert waiting.status["state"] == "Scheduled"
    assert waiting.wake_at == at(2026, 1, 1, 12)
    fired = task.step(at(2026, 1, 1, 12, 0, 0, 500))
    assert fired.fire is not None
    assert fired.fire.name == "nightly-202601011200"
    assert fired.status["state"] == "Triggered"
    assert fired.status["nextRunAt"] is None
    assert fired.wake_at is None
    task.finish("nightly-202601011200")
    assert task.step(at(2026, 1, 1, 12, 1)).status == {"active": None, "state": "Completed"}
    # Never again, however often it is looked at.
    later = task.step(at(2027, 1, 1))
    assert later.fire is None
    assert later.status == {}


def test_one_shot_failure() -> None:
    task = Task(spec={"execAt": "2026-01-01T12:00:00Z"})
    task.step(at(2026, 1, 1, 12))
    task.finish("nightly-202601011200", states.State.FAILED_EXTERNAL)
    assert task.step(at(2026, 1, 1, 12, 1)).status["state"] == "Failed"


def test_one_shot_in_the_past_runs_at_once_without_deadline() -> None:
    # BDOM: an exec-date that has passed means "run now".
    task = Task(spec={"execAt": "2025-06-01T00:00:00Z"}, created=at(2026, 1, 1))
    fired = task.step(at(2026, 1, 1, 0, 0, 1))
    assert fired.fire is not None
    assert fired.fire.run == at(2025, 6, 1)


def test_one_shot_past_the_deadline_is_missed_once() -> None:
    task = Task(spec={"execAt": "2026-01-01T12:00:00Z", "startingDeadlineSeconds": 60})
    missed = task.step(at(2026, 1, 1, 12, 5))
    assert missed.fire is None
    assert missed.status == {
        "observedGeneration": 1,
        "missedRuns": 1,
        "lastMissedTime": "2026-01-01T12:00:00Z",
        "state": "Missed",
    }
    assert [(n.type, n.reason) for n in missed.notices] == [("Warning", "MissedRun")]
    assert task.step(at(2026, 1, 1, 13)).status == {}
    assert task.step(at(2026, 1, 1, 13)).notices == ()


def test_editing_exec_at_schedules_a_new_run() -> None:
    task = Task(spec={"execAt": "2026-01-01T12:00:00Z"})
    task.step(at(2026, 1, 1, 12))
    task.finish("nightly-202601011200")
    task.step(at(2026, 1, 1, 12, 1))
    task.edit(execAt="2026-01-02T12:00:00Z")
    again = task.step(at(2026, 1, 1, 13))
    assert again.status["state"] == "Scheduled"
    assert again.status["nextRunAt"] == "2026-01-02T12:00:00Z"
    assert task.step(at(2026, 1, 2, 12)).fire is not None


def test_outage_catch_up_once_within_the_deadline() -> None:
    task = cron(startingDeadlineSeconds=1800)
    task.step(at(2026, 1, 1, 9, 30, 1))
    # The controller was down from 09:31 to 12:10: 10:00 and 11:00 are lost, 12:00 catches up.
    back = task.step(at(2026, 1, 1, 12, 10))
    assert back.fire is not None
    assert back.fire.run == at(2026, 1, 1, 12)
    assert back.status["missedRuns"] == 2
    assert back.status["lastMissedTime"] == "2026-01-01T11:00:00Z"
    assert back.status["nextRunAt"] == "2026-01-01T13:00:00Z"
    assert [n.reason for n in back.notices] == ["MissedRun", "Triggered"]
    assert task.step(at(2026, 1, 1, 12, 11)).fire is None


def test_outage_past_the_deadline_counts_and_does_not_run() -> None:
    task = cron(startingDeadlineSeconds=300)
    task.step(at(2026, 1, 1, 9, 30, 1))
    back = task.step(at(2026, 1, 1, 12, 10))
    assert back.fire is None
    assert back.status == {
        "missedRuns": 3,
        "lastMissedTime": "2026-01-01T12:00:00Z",
        "nextRunAt": "2026-01-01T13:00:00Z",
    }
    assert back.notices[0].type == "Warning"
    assert "3 run(s) missed" in back.notices[0].message
    # Counted once: looking again adds nothing.
    assert task.step(at(2026, 1, 1, 12, 11)).status == {}


def test_a_task_created_while_the_controller_was_down() -> None:
    task = cron(startingDeadlineSeconds=3600)
    first = task.step(at(2026, 1, 1, 10, 20))  # created at 09:30, first seen at 10:20
    assert first.fire is not None
    assert first.fire.run == at(2026, 1, 1, 10)


def test_suspend_holds_runs_and_unsuspend_catches_up_like_after_an_outage() -> None:
    task = cron(startingDeadlineSeconds=1800)
    task.step(at(2026, 1, 1, 9, 30, 1))
    task.edit(suspend=True)
    suspended = task.step(at(2026, 1, 1, 9, 40))
    assert suspended.status == {"observedGeneration": 2, "state": "Suspended"}
    assert suspended.wake_at is None
    # Suspended: no run, no write, whatever the time.
    assert task.step(at(2026, 1, 1, 11, 50)).status == {}
    assert task.step(at(2026, 1, 1, 11, 50)).fire is None
    task.edit(suspend=False)
    resumed = task.step(at(2026, 1, 1, 12, 10))
    assert resumed.fire is not None
    assert resumed.fire.run == at(2026, 1, 1, 12)
    assert resumed.status["missedRuns"] == 2


def test_forbid_holds_the_run_until_the_active_one_finishes() -> None:
    task = cron(concurrencyPolicy="Forbid", startingDeadlineSeconds=600)
    task.step(at(2026, 1, 1, 9, 30, 1))
    task.step(at(2026, 1, 1, 10))
    held = task.step(at(2026, 1, 1, 11))
    assert held.fire is None
    assert held.held == at(2026, 1, 1, 11)
    assert held.status == {}
    # Woken when the deadline passes (or by the Operation finishing).
    assert held.wake_at == at(2026, 1, 1, 11, 10, 1)
    task.finish("nightly-202601011000")
    started = task.step(at(2026, 1, 1, 11, 5))
    assert started.fire is not None
    assert started.fire.name == "nightly-202601011100"
    assert started.status["active"] == ["nightly-202601011100"]


def test_forbid_past_the_deadline_is_missed() -> None:
    task = cron(concurrencyPolicy="Forbid", startingDeadlineSeconds=600)
    task.step(at(2026, 1, 1, 9, 30, 1))
    task.step(at(2026, 1, 1, 10))
    task.step(at(2026, 1, 1, 11))
    expired = task.step(at(2026, 1, 1, 11, 10, 1))
    assert expired.fire is None
    assert expired.status["missedRuns"] == 1
    assert expired.status["nextRunAt"] == "2026-01-01T12:00:00Z"
    assert expired.notices[0].reason == "MissedRun"


def test_replace_cancels_the_active_run() -> None:
    task = cron(concurrencyPolicy="Replace")
    task.step(at(2026, 1, 1, 9, 30, 1))
    task.step(at(2026, 1, 1, 10))
    replaced = task.step(at(2026, 1, 1, 11))
    assert replaced.cancel == ("nightly-202601011000",)
    assert replaced.fire is not None
    # The cancelled run is active until the Operation controller has stopped it.
    assert replaced.status["active"] == ["nightly-202601011000", "nightly-202601011100"]
    task.finish("nightly-202601011000", states.State.CANCELLED)
    assert task.step(at(2026, 1, 1, 11, 0, 1)).status == {"active": ["nightly-202601011100"]}
    assert [n.reason for n in replaced.notices] == ["Replaced", "Triggered"]


def test_allow_runs_concurrently() -> None:
    task = cron()
    task.step(at(2026, 1, 1, 9, 30, 1))
    task.step(at(2026, 1, 1, 10))
    allowed = task.step(at(2026, 1, 1, 11))
    assert allowed.cancel == ()
    assert allowed.status["active"] == ["nightly-202601011000", "nightly-202601011100"]


@pytest.mark.parametrize(("limit", "kept"), [(None, 10), (3, 3), (0, 0)])
def test_history_limit_deletes_the_oldest_finished(limit: int | None, kept: int) -> None:
    task = cron(**({} if limit is None else {"historyLimit": limit}))
    task.step(at(2026, 1, 1, 9, 30, 1))
    for hour in range(10, 22):
        fired = task.step(at(2026, 1, 1, hour))
        assert fired.fire is not None
        task.finish(fired.fire.name)
    task.step(at(2026, 1, 1, 22, 0, 0, 1))  # fires 22:00, still active
    finished = sorted(n for n, op in task.operations.items() if op.finished)
    assert len(finished) == kept
    assert finished == [f"nightly-20260101{h}00" for h in range(22 - kept, 22)]
    assert "nightly-202601012200" in task.operations


def test_in_flight_and_gone_operations() -> None:
    task = cron()
    task.step(at(2026, 1, 1, 9, 30, 1))
    task.step(at(2026, 1, 1, 10))
    # Created but not yet seen on the watch: still active, not re-created.
    name = "nightly-202601011000"
    del task.operations[name]
    task.in_flight.add(name)
    assert task.plan(at(2026, 1, 1, 10, 0, 1)).status == {}
    assert task.plan(at(2026, 1, 1, 10, 0, 1)).fire is None
    # Seen deleted: no longer active.
    task.in_flight.clear()
    task.gone.add(name)
    assert task.plan(at(2026, 1, 1, 10, 0, 1)).status == {"active": None, "state": "Scheduled"}


def test_a_run_recorded_but_not_created_is_recreated_within_the_deadline() -> None:
    task = cron(startingDeadlineSeconds=600)
    task.step(at(2026, 1, 1, 9, 30, 1))
    task.step(at(2026, 1, 1, 10))
    # The controller crashed between the status write and the create.
    del task.operations["nightly-202601011000"]
    recovered = task.plan(at(2026, 1, 1, 10, 3))
    assert recovered.fire == schedule.Fire(
        run=at(2026, 1, 1, 10), name="nightly-202601011000", recovery=True
    )
    assert recovered.status == {}
    assert recovered.wake_at == at(2026, 1, 1, 10, 3)
    too_late = task.plan(at(2026, 1, 1, 10, 20))
    assert too_late.fire is None
    assert too_late.status == {"active": None, "state": "Scheduled"}


def test_recovery_does_not_swallow_runs_owed_after_it() -> None:
    task = cron()
    task.step(at(2026, 1, 1, 9, 30, 1))
    task.step(at(2026, 1, 1, 10))
    del task.operations["nightly-202601011000"]
    # Down until 12:30: first the recorded 10:00 run, then the owed 12:00 one.
    first = task.step(at(2026, 1, 1, 12, 30))
    assert first.fire is not None
    assert first.fire.recovery
    assert "nextRunAt" not in first.status
    second = task.step(at(2026, 1, 1, 12, 30))
    assert second.fire is not None
    assert second.fire.run == at(2026, 1, 1, 12)
    assert second.status["missedRuns"] == 1


def test_invalid_schedule_is_reported_once() -> None:
    task = cron(schedule="0 25 * * *")
    bad = task.step(at(2026, 1, 1, 9, 30, 1))
    assert bad.fire is None
    assert bad.wake_at is None
    assert bad.status["conditions"][0]["reason"] == "InvalidSchedule"
    assert "outside 0-23" in bad.status["conditions"][0]["message"]
    assert [n.reason for n in bad.notices] == ["InvalidSchedule"]
    assert task.step(at(2026, 1, 1, 9, 40)).status == {}
    assert task.step(at(2026, 1, 1, 9, 40)).notices == ()
    task.edit(schedule="0 * * * *")
    fixed = task.step(at(2026, 1, 1, 9, 50))
    assert fixed.status == {
        "observedGeneration": 2,
        "conditions": None,
        "nextRunAt": "2026-01-01T10:00:00Z",
        "state": "Scheduled",
    }


def test_bad_time_zone_is_an_invalid_schedule() -> None:
    task = cron(timeZone="Europe/Atlantis")
    assert "unknown time zone" in task.step(at(2026, 1, 1)).notices[0].message


def test_changing_the_schedule_does_not_count_past_runs_of_the_new_one() -> None:
    task = Task(spec={"schedule": "0 3 * * *"})
    task.step(at(2026, 1, 1, 9, 30, 1))
    task.edit(schedule="*/5 * * * *")
    changed = task.step(at(2026, 1, 1, 10, 2))
    assert changed.fire is None
    assert "missedRuns" not in changed.status
    assert changed.status["nextRunAt"] == "2026-01-01T10:05:00Z"


def test_time_zone_and_daylight_saving_in_a_plan() -> None:
    task = Task(
        spec={"schedule": "30 2 * * *", "timeZone": "Europe/Berlin"}, created=at(2026, 3, 28)
    )
    waiting = task.step(at(2026, 3, 28, 12))
    assert waiting.status["nextRunAt"] == "2026-03-29T01:00:00Z"  # 03:00 CEST
    fired = task.step(at(2026, 3, 29, 1))
    assert fired.fire is not None
    assert fired.fire.name == "nightly-202603290100"
    assert fired.status["nextRunAt"] == "2026-03-30T00:30:00Z"


def test_a_known_operation_wins_over_in_flight() -> None:
    # Created again after a restart (409, ours) while the watch already shows it finished.
    task = cron()
    task.step(at(2026, 1, 1, 9, 30, 1))
    task.step(at(2026, 1, 1, 10))
    task.finish("nightly-202601011000")
    task.in_flight.add("nightly-202601011000")
    assert task.plan(at(2026, 1, 1, 10, 1)).status == {"active": None, "state": "Scheduled"}


def crashed_before_recording(task: Task, now: datetime.datetime) -> str:
    """Fire at ``now`` the way the controller does (create first), then lose the record:
    the Operation exists, the status is as before the run."""
    before = dict(task.status)
    fired = task.step(now)
    assert fired.fire is not None
    task.status = before
    return fired.fire.name


@pytest.mark.parametrize("late", [datetime.timedelta(seconds=30), datetime.timedelta(hours=2)])
def test_a_created_but_unrecorded_one_shot_counts_as_started(late: datetime.timedelta) -> None:
    # Within the deadline (30 s) and past it (2 h): never created again, never missed.
    task = Task(spec={"execAt": "2026-01-01T12:00:00Z", "startingDeadlineSeconds": 60})
    task.step(at(2026, 1, 1, 9, 30, 1))
    name = crashed_before_recording(task, at(2026, 1, 1, 12))
    restarted = task.step(at(2026, 1, 1, 12) + late)
    assert restarted.fire is None
    assert restarted.notices == ()
    assert restarted.status == {
        "lastScheduleTime": "2026-01-01T12:00:00Z",
        "lastOperation": name,
        "active": [name],
        "state": "Triggered",
        "nextRunAt": None,
    }
    task.finish(name)
    assert task.step(at(2026, 1, 1, 14, 1)).status == {"active": None, "state": "Completed"}


@pytest.mark.parametrize("late", [datetime.timedelta(seconds=30), datetime.timedelta(minutes=20)])
def test_a_created_but_unrecorded_cron_run_counts_as_started(late: datetime.timedelta) -> None:
    task = cron(startingDeadlineSeconds=60, concurrencyPolicy="Forbid")
    task.step(at(2026, 1, 1, 9, 30, 1))
    name = crashed_before_recording(task, at(2026, 1, 1, 10))
    task.finish(name)
    restarted = task.step(at(2026, 1, 1, 10) + late)
    assert restarted.fire is None
    assert restarted.notices == ()
    assert restarted.status == {
        "lastScheduleTime": "2026-01-01T10:00:00Z",
        "lastOperation": name,
        "nextRunAt": "2026-01-01T11:00:00Z",
    }


def test_runs_after_an_unrecorded_one_are_owed_and_it_is_not_held_by_itself() -> None:
    # Created 10:00, not recorded, controller down until 12:00:30: 10:00 was started,
    # 11:00 was superseded (missed), 12:00 starts; Forbid does not hold 10:00 for itself
    # but does hold 12:00 while 10:00 runs.
    task = cron(concurrencyPolicy="Forbid")
    task.step(at(2026, 1, 1, 9, 30, 1))
    name = crashed_before_recording(task, at(2026, 1, 1, 10))
    held = task.step(at(2026, 1, 1, 12, 0, 30))
    assert held.fire is None
    assert held.held == at(2026, 1, 1, 12)
    assert held.status["lastOperation"] == name
    assert held.status["active"] == [name]
    task.finish(name)
    started = task.step(at(2026, 1, 1, 12, 0, 31))
    assert started.fire is not None
    assert started.fire.run == at(2026, 1, 1, 12)
    assert started.status["missedRuns"] == 1
    assert started.status["lastMissedTime"] == "2026-01-01T11:00:00Z"
    assert started.status["nextRunAt"] == "2026-01-01T13:00:00Z"
    assert [n.reason for n in started.notices] == ["MissedRun", "Triggered"]


def test_an_operation_of_an_earlier_exec_at_is_not_taken_for_the_new_run() -> None:
    task = Task(spec={"execAt": "2026-01-01T12:00:00Z"})
    task.step(at(2026, 1, 1, 9, 30, 1))
    crashed_before_recording(task, at(2026, 1, 1, 12))
    task.edit(execAt="2026-01-01T12:30:00Z")
    fired = task.step(at(2026, 1, 1, 12, 30))
    assert fired.fire is not None
    assert fired.fire.name == "nightly-202601011230"
