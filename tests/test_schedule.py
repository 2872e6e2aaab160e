"""Cron, time zones and daylight saving, missed runs and run names (opkeeper.schedule).

The daylight-saving cases are pinned to real transitions (Europe/Berlin and
America/New_York in 2026, Australia/Lord_Howe's half hour, Samoa's skipped
day in 2011); croniter, evaluated on naive wall clock, is the independent
oracle for the cron grammar itself.
"""

from __future__ import annotations

import datetime
import re
import time

import croniter
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from opkeeper import errors, models, schedule

UTC = datetime.UTC
BERLIN = schedule.zone("Europe/Berlin")
NEW_YORK = schedule.zone("America/New_York")


def at(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime.datetime:
    return datetime.datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


def table(expression: str, tz: str | None = "UTC") -> schedule.CronTimetable:
    return schedule.CronTimetable(cron=schedule.parse_cron(expression), tz=schedule.zone(tz))


def runs(expression: str, tz: str, start: datetime.datetime, count: int) -> list[str]:
    """The next ``count`` runs after ``start``, as local ISO times."""
    timetable, zone, out = table(expression, tz), schedule.zone(tz), []
    moment = start
    for _ in range(count):
        moment = timetable.next_after(moment)
        out.append(moment.astimezone(zone).isoformat())
    return out


# --- grammar -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "minutes", "hours"),
    [
        ("* * * * *", tuple(range(60)), tuple(range(24))),
        ("0 3 * * *", (0,), (3,)),
        ("*/15 */6 * * *", (0, 15, 30, 45), (0, 6, 12, 18)),
        ("5-10/2 1,2,23 * * *", (5, 7, 9), (1, 2, 23)),
        ("50/5 0 * * *", (50, 55), (0,)),
        ("0,30 9-17 * * *", (0, 30), tuple(range(9, 18))),
        ("@hourly", (0,), tuple(range(24))),
        ("@DAILY", (0,), (0,)),
    ],
)
def test_minutes_and_hours(
    expression: str, minutes: tuple[int, ...], hours: tuple[int, ...]
) -> None:
    cron = schedule.parse_cron(expression)
    assert cron.minutes == minutes
    assert cron.hours == hours


def test_names_and_sunday_seven() -> None:
    cron = schedule.parse_cron("0 0 * jan-mar,DEC sat,SUN")
    assert cron.months == {1, 2, 3, 12}
    assert cron.weekdays == {0, 6}
    assert cron.any_day
    assert not cron.any_weekday
    assert schedule.parse_cron("0 0 * * fri-7").weekdays == {5, 6, 0}
    with pytest.raises(errors.InvalidArgument, match="runs backwards"):
        schedule.parse_cron("0 0 * * sat-sun")


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        # Both day fields restricted: either matches (the 13th OR any Friday).
        ("0 0 13 * 5", {"2026-02-06", "2026-02-13", "2026-02-20", "2026-02-27"}),
        # Only the day of month restricted.
        ("0 0 13 * *", {"2026-02-13"}),
        ("0 0 13 * ?", {"2026-02-13"}),
        # Only the weekday restricted.
        ("0 0 * * fri", {"2026-02-06", "2026-02-13", "2026-02-20", "2026-02-27"}),
        # A stepped star is a restriction, as in Kubernetes CronJob: OR applies.
        ("0 0 */1 * fri", {"2026-02-06", "2026-02-13", "2026-02-20", "2026-02-27"}),
        ("0 0 1-31 * fri", {f"2026-02-{d:02}" for d in range(1, 29)}),
        ("0 0 */10 * mon", {"2026-02-01", "2026-02-02", "2026-02-09", "2026-02-11",
                            "2026-02-16", "2026-02-21", "2026-02-23"}),
    ],
)  # fmt: skip
def test_day_of_month_and_weekday(expression: str, expected: set[str]) -> None:
    cron = schedule.parse_cron(expression)
    february = [datetime.date(2026, 2, d) for d in range(1, 29)]
    assert {d.isoformat() for d in february if cron.day_matches(d)} == expected


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("", "expected 5 fields"),
        ("* * * *", "expected 5 fields"),
        ("0 * * * * *", "expected 5 fields"),
        ("60 * * * *", "outside 0-59"),
        ("* 24 * * *", "outside 0-23"),
        ("* * 0 * *", "outside 1-31"),
        ("* * * 13 *", "outside 1-12"),
        ("* * * * 8", "outside 0-7"),
        ("10-5 * * * *", "runs backwards"),
        ("*/0 * * * *", "step must be at least 1"),
        ("? * * * *", "only allowed in the day fields"),
        ("x * * * *", "not a valid minute"),
        ("* * * foo *", "not a valid month"),
        ("1,,2 * * * *", "cannot read minute"),
        ("L * * * *", "not a valid minute"),
        ("@reboot", "unknown macro"),
        ("@every 5m", "unknown macro"),
        ("TZ=UTC 0 * * * *", "spec.timeZone"),
        ("CRON_TZ=Europe/Berlin 0 * * * *", "spec.timeZone"),
        ("0 0 30 2 *", "never run"),
        ("0 0 31 4,6,9,11 *", "never run"),
    ],
)
def test_invalid_expressions(expression: str, message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=message):
        schedule.parse_cron(expression)


def test_one_value_range() -> None:
    assert schedule.parse_cron("0 0 * * 1-1").weekdays == {1}
    assert table("0 0 * * 1-1").next_after(at(2000, 1, 1)) == at(2000, 1, 3)


def test_february_29_is_found_across_a_century_gap() -> None:
    # 2100 is no leap year: the run after 2096-02-29 is 2104-02-29.
    assert table("0 0 29 2 *").next_after(at(2096, 3, 1)) == at(2104, 2, 29)
    assert table("0 0 29 2 *").latest(at_or_before=at(2104, 2, 28), after=at(2000, 1, 1)) == at(
        2096, 2, 29
    )


def test_unknown_time_zone() -> None:
    with pytest.raises(errors.InvalidArgument, match="unknown time zone"):
        schedule.zone("Mars/Olympus_Mons")
    with pytest.raises(errors.InvalidArgument, match="unknown time zone"):
        schedule.zone("../../etc/passwd")
    assert schedule.zone(None).key == "UTC"


_field_items = {
    "minute": (0, 59),
    "hour": (0, 23),
    "day": (1, 28),
    "month": (1, 12),
    "weekday": (0, 6),
}


@st.composite
def cron_fields(draw: st.DrawFn, low: int, high: int) -> str:
    def item() -> str:
        kind = draw(st.sampled_from(["star", "value", "range", "step", "rangestep"]))
        a = draw(st.integers(low, high - 1))
        # b > a: croniter 7 reads a one-value range such as "1-1" as "*".
        b = draw(st.integers(a + 1, high))
        step = draw(st.integers(1, 10))
        return {
            "star": "*",
            "value": str(a),
            "range": f"{a}-{b}",
            # croniter 7 reads "*/1" as "*" in one day field and as a list in the other.
            "step": f"*/{step + 1}",
            "rangestep": f"{a}-{b}/{step}",
        }[kind]

    items = draw(st.lists(st.builds(item), min_size=1, max_size=3))
    return "*" if "*" in items else ",".join(items)


@st.composite
def cron_expressions(draw: st.DrawFn) -> str:
    return " ".join(draw(cron_fields(*span)) for span in _field_items.values())


@settings(max_examples=300, deadline=None)
@given(
    expression=cron_expressions(),
    start=st.datetimes(
        min_value=datetime.datetime(2000, 1, 1), max_value=datetime.datetime(2090, 1, 1)
    ),
)
def test_next_and_prev_agree_with_croniter(expression: str, start: datetime.datetime) -> None:
    """On naive wall clock our cron is croniter's (the DST rule is applied on top)."""
    cron = schedule.parse_cron(expression)
    # croniter reads any full range ("1-31", "0-6") as "*"; Kubernetes only "*", "?", "*/1".
    assume(cron.any_day or len(cron.days) < 31)
    assume(cron.any_weekday or len(cron.weekdays) < 7)
    start = start.replace(second=0, microsecond=0)
    oracle = croniter.croniter(expression, start - schedule.ONE_MINUTE)
    assert cron.next_wall(start) == oracle.get_next(datetime.datetime)
    oracle = croniter.croniter(expression, start + schedule.ONE_MINUTE)
    assert cron.prev_wall(start) == oracle.get_prev(datetime.datetime)


# --- daylight saving -----------------------------------------------------------


def test_berlin_spring_forward_runs_a_skipped_time_at_the_end_of_the_gap() -> None:
    # 2026-03-29: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist.
    assert runs("30 2 * * *", "Europe/Berlin", at(2026, 3, 28, 12), 3) == [
        "2026-03-29T03:00:00+02:00",
        "2026-03-30T02:30:00+02:00",
        "2026-03-31T02:30:00+02:00",
    ]


def test_berlin_fall_back_runs_a_repeated_time_once_at_its_first_occurrence() -> None:
    # 2026-10-25: 03:00 CEST falls back to 02:00 CET; 02:30 happens twice.
    assert runs("30 2 * * *", "Europe/Berlin", at(2026, 10, 24, 12), 3) == [
        "2026-10-25T02:30:00+02:00",
        "2026-10-26T02:30:00+01:00",
        "2026-10-27T02:30:00+01:00",
    ]


def test_new_york_spring_forward_and_fall_back() -> None:
    # 2026-03-08 02:00 EST -> 03:00 EDT; 2026-11-01 02:00 EDT -> 01:00 EST.
    assert runs("30 2 * * *", "America/New_York", at(2026, 3, 7, 12), 2) == [
        "2026-03-08T03:00:00-04:00",
        "2026-03-09T02:30:00-04:00",
    ]
    assert runs("30 1 * * *", "America/New_York", at(2026, 10, 31, 12), 2) == [
        "2026-11-01T01:30:00-04:00",
        "2026-11-02T01:30:00-05:00",
    ]


def test_several_skipped_times_collapse_into_one_run() -> None:
    # 02:00..02:45 do not exist; they and 03:00 are one run at 03:00 CEST.
    assert runs("*/15 * * * *", "Europe/Berlin", at(2026, 3, 29, 0, 40), 4) == [
        "2026-03-29T01:45:00+01:00",
        "2026-03-29T03:00:00+02:00",
        "2026-03-29T03:15:00+02:00",
        "2026-03-29T03:30:00+02:00",
    ]


def test_a_frequent_schedule_does_not_repeat_the_fold() -> None:
    # Each wall-clock time once: the second 02:00..02:59 (CET) has no runs.
    assert runs("*/30 * * * *", "Europe/Berlin", at(2026, 10, 24, 23, 40), 4) == [
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:30:00+02:00",
        "2026-10-25T03:00:00+01:00",
        "2026-10-25T03:30:00+01:00",
    ]


def test_starting_inside_the_second_occurrence_of_a_fold() -> None:
    # 02:15 CET (the second 02:15): 02:30 already ran at 02:30 CEST.
    second = datetime.datetime(2026, 10, 25, 2, 15, tzinfo=BERLIN, fold=1)
    assert table("30 2 * * *", "Europe/Berlin").next_after(second) == at(2026, 10, 26, 1, 30)
    assert table("30 2 * * *", "Europe/Berlin").latest(
        at_or_before=second, after=at(2026, 10, 1)
    ) == at(2026, 10, 25, 0, 30)


def test_half_hour_daylight_saving_lord_howe() -> None:
    # 2026-10-04: 02:00 +10:30 jumps to 02:30 +11:00.
    assert runs("15 2 * * *", "Australia/Lord_Howe", at(2026, 10, 3), 2) == [
        "2026-10-04T02:30:00+11:00",
        "2026-10-05T02:15:00+11:00",
    ]
    # 2026-04-05: 02:00 +11:00 falls back to 01:30 +10:30; 01:45 happens twice.
    assert runs("45 1 * * *", "Australia/Lord_Howe", at(2026, 4, 4), 2) == [
        "2026-04-05T01:45:00+11:00",
        "2026-04-06T01:45:00+10:30",
    ]


def test_a_skipped_day_samoa_2011() -> None:
    # Samoa skipped 2011-12-30 entirely: its noon runs at the first instant after.
    assert runs("0 12 * * *", "Pacific/Apia", at(2011, 12, 28), 4) == [
        "2011-12-28T12:00:00-10:00",
        "2011-12-29T12:00:00-10:00",
        "2011-12-31T00:00:00+14:00",
        "2011-12-31T12:00:00+14:00",
    ]


def test_latest_around_a_fold() -> None:
    timetable = table("*/30 * * * *", "Europe/Berlin")
    since = at(2026, 10, 24)
    expected = {
        (0, 0): (0, 0),
        (0, 10): (0, 0),
        (0, 30): (0, 30),
        (1, 0): (0, 30),  # 02:00 CET: the 02:00 wall time already ran (at 02:00 CEST)
        (1, 40): (0, 30),
        (2, 0): (2, 0),  # 03:00 CET
    }
    for (h, m), (eh, em) in expected.items():
        assert timetable.latest(at_or_before=at(2026, 10, 25, h, m), after=since) == at(
            2026, 10, 25, eh, em
        )


ZONES = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "Australia/Sydney",
    "America/Santiago",
    "Asia/Kolkata",
    "Pacific/Apia",
]


@settings(max_examples=300, deadline=None)
@given(
    expression=cron_expressions(),
    tz=st.sampled_from(ZONES),
    start=st.datetimes(
        min_value=datetime.datetime(2010, 1, 1), max_value=datetime.datetime(2030, 1, 1)
    ),
)
def test_next_and_latest_are_consistent(expression: str, tz: str, start: datetime.datetime) -> None:
    """next_after and latest describe the same strictly increasing sequence of instants."""
    timetable = table(expression, tz)
    moment = start.replace(tzinfo=UTC)
    first = timetable.next_after(moment)
    second = timetable.next_after(first)
    assert moment < first < second
    assert timetable.latest(at_or_before=first, after=moment) == first
    assert timetable.latest(at_or_before=second, after=moment) == second
    tick = datetime.timedelta(microseconds=1)
    assert timetable.latest(at_or_before=second - tick, after=moment) == first
    assert timetable.latest(at_or_before=first - tick, after=moment) is None


@settings(max_examples=200, deadline=None)
@given(
    expression=cron_expressions(),
    tz=st.sampled_from(ZONES),
    day=st.dates(min_value=datetime.date(2010, 1, 1), max_value=datetime.date(2030, 1, 1)),
)
def test_every_wall_clock_time_runs_exactly_once(
    expression: str, tz: str, day: datetime.date
) -> None:
    """Over two days, the runs are exactly the instants of the named wall-clock times."""
    timetable, zone = table(expression, tz), schedule.zone(tz)
    start = datetime.datetime.combine(day, datetime.time())
    walls, wall = [], timetable.cron.next_wall(start)
    while wall < start + datetime.timedelta(days=2):
        walls.append(wall)
        wall = timetable.cron.next_wall(wall + schedule.ONE_MINUTE)
    expected = sorted({schedule.instant(w, zone) for w in walls})
    if not expected:
        return
    found, moment = [], expected[0] - datetime.timedelta(microseconds=1)
    while (moment := timetable.next_after(moment)) <= expected[-1]:
        found.append(moment)
    assert found == expected
    for w, run in zip(walls, [schedule.instant(w, zone) for w in walls], strict=True):
        local = run.astimezone(zone).replace(tzinfo=None)
        # Existing wall times run at that wall time; missing ones right after their gap.
        assert local == w or (local > w and local - w <= datetime.timedelta(days=1))


# --- execAt, missed runs -------------------------------------------------------


def test_once() -> None:
    once = schedule.OnceTimetable(at=at(2026, 5, 1, 12))
    assert once.next_after(at(2026, 5, 1)) == at(2026, 5, 1, 12)
    assert once.next_after(at(2026, 5, 1, 12)) is None
    assert once.latest(at_or_before=at(2026, 5, 1, 12), after=at(2026, 1, 1)) == at(2026, 5, 1, 12)
    assert once.latest(at_or_before=at(2026, 5, 1, 11), after=at(2026, 1, 1)) is None
    assert once.latest(at_or_before=at(2026, 6, 1), after=at(2026, 5, 1, 12)) is None


def test_timetable_of_spec() -> None:
    template = {"spec": {"type": "t", "executor": {"builtin": {"action": "noop"}}}}
    once = models.ScheduledTaskSpec.model_validate(
        {"execAt": "2026-05-01T12:00:00", "template": template}
    )
    # A naive execAt is UTC.
    assert schedule.timetable(once) == schedule.OnceTimetable(at=at(2026, 5, 1, 12))
    cron = models.ScheduledTaskSpec.model_validate(
        {"schedule": "0 3 * * *", "timeZone": "Europe/Berlin", "template": template}
    )
    timetable = schedule.timetable(cron)
    assert isinstance(timetable, schedule.CronTimetable)
    assert timetable.tz.key == "Europe/Berlin"
    neither = models.ScheduledTaskSpec.model_validate({"template": template})
    with pytest.raises(errors.InvalidArgument):
        schedule.timetable(neither)


def test_nothing_due() -> None:
    owed = schedule.due(
        table=table("0 * * * *"), after=at(2026, 1, 1, 10), now=at(2026, 1, 1, 10, 59),
        deadline_seconds=None,
    )  # fmt: skip
    assert owed == schedule.Due(run=None, missed=0, latest_missed=None, capped=False)


def test_due_on_time() -> None:
    owed = schedule.due(
        table=table("0 * * * *"), after=at(2026, 1, 1, 10), now=at(2026, 1, 1, 11, 0, 0, 3000),
        deadline_seconds=0,
    )  # fmt: skip
    assert owed == schedule.Due(run=at(2026, 1, 1, 11), missed=0, latest_missed=None, capped=False)


def test_outage_catches_up_the_latest_run_within_the_deadline_once() -> None:
    # Down from 10:30 to 13:20: 11:00, 12:00 missed; 13:00 is 20 minutes late.
    owed = schedule.due(
        table=table("0 * * * *"), after=at(2026, 1, 1, 10, 30), now=at(2026, 1, 1, 13, 20),
        deadline_seconds=3600,
    )  # fmt: skip
    assert owed == schedule.Due(
        run=at(2026, 1, 1, 13), missed=2, latest_missed=at(2026, 1, 1, 12), capped=False
    )


def test_outage_past_the_deadline_counts_every_run_as_missed() -> None:
    owed = schedule.due(
        table=table("0 * * * *"), after=at(2026, 1, 1, 10, 30), now=at(2026, 1, 1, 13, 20),
        deadline_seconds=600,
    )  # fmt: skip
    assert owed == schedule.Due(run=None, missed=3, latest_missed=at(2026, 1, 1, 13), capped=False)


def test_without_deadline_the_latest_run_always_starts() -> None:
    owed = schedule.due(
        table=table("0 0 * * *"), after=at(2025, 1, 1), now=at(2026, 1, 1, 5),
        deadline_seconds=None,
    )  # fmt: skip
    assert owed.run == at(2026, 1, 1)
    assert owed.missed == 364  # 2025-01-02 .. 2025-12-31: `after` itself already ran


def test_deadline_counts_whole_seconds() -> None:
    run = at(2026, 1, 1, 11)
    second = datetime.timedelta(seconds=1)
    assert schedule.within_deadline(run=run, now=run + 10.9 * second, deadline_seconds=10)
    assert not schedule.within_deadline(run=run, now=run + 11 * second, deadline_seconds=10)
    assert schedule.within_deadline(run=run, now=run + 0.5 * second, deadline_seconds=0)


def test_missed_count_is_capped_and_cheap() -> None:
    began = time.perf_counter()
    owed = schedule.due(
        table=table("* * * * *"), after=at(2016, 1, 1), now=at(2026, 1, 1, 0, 0, 30),
        deadline_seconds=60,
    )  # fmt: skip
    assert time.perf_counter() - began < 1.0
    assert owed.run == at(2026, 1, 1)
    assert owed.missed == schedule.MISSED_COUNT_CAP
    assert owed.capped
    assert owed.latest_missed is not None


def test_one_shot_due_once() -> None:
    once = schedule.OnceTimetable(at=at(2026, 5, 1, 12))
    before = schedule.due(
        table=once, after=at(1, 1, 1), now=at(2026, 5, 1, 11), deadline_seconds=None
    )
    assert before.run is None
    assert before.missed == 0
    late = schedule.due(table=once, after=at(1, 1, 1), now=at(2026, 5, 2), deadline_seconds=None)
    assert late.run == at(2026, 5, 1, 12)
    assert late.missed == 0
    missed = schedule.due(table=once, after=at(1, 1, 1), now=at(2026, 5, 2), deadline_seconds=60)
    assert missed == schedule.Due(
        run=None, missed=1, latest_missed=at(2026, 5, 1, 12), capped=False
    )


# --- names ---------------------------------------------------------------------

DNS_SUBDOMAIN = re.compile(models.DNS_NAME)
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def test_operation_name() -> None:
    assert schedule.operation_name(task="backup", run=at(2026, 3, 29, 1)) == "backup-202603290100"
    # Seconds only when the run is not on a whole minute (execAt).
    assert (
        schedule.operation_name(task="backup", run=at(2026, 3, 29, 1, 0, 30, 999))
        == "backup-20260329010030"
    )
    # The two 02:30 of a fold would be two different names (UTC), if both ran.
    first = datetime.datetime(2026, 10, 25, 2, 30, tzinfo=BERLIN)
    second = first.replace(fold=1)
    assert schedule.operation_name(task="t", run=first) != schedule.operation_name(
        task="t", run=second
    )


def test_long_task_names_are_shortened_with_a_hash() -> None:
    long_a = "a" * 240 + ".b-c"
    long_b = "a" * 240 + ".b-d"
    name_a = schedule.operation_name(task=long_a, run=at(2026, 1, 1))
    name_b = schedule.operation_name(task=long_b, run=at(2026, 1, 1))
    assert len(name_a) == 253
    assert name_a != name_b
    assert DNS_SUBDOMAIN.match(name_a)
    assert name_a == schedule.operation_name(task=long_a, run=at(2026, 1, 1))


dns_label = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?", fullmatch=True)
dns_names = (
    st.lists(dns_label, min_size=1, max_size=8).map(".".join).filter(lambda n: len(n) <= 253)
)


@settings(max_examples=300, deadline=None)
@given(task=dns_names, run=st.datetimes(timezones=st.just(UTC)))
def test_names_are_valid_and_deterministic(task: str, run: datetime.datetime) -> None:
    name = schedule.operation_name(task=task, run=run)
    assert len(name) <= 253
    assert DNS_SUBDOMAIN.match(name), name
    assert name.endswith(schedule.run_stamp(run))
    assert name == schedule.operation_name(task=task, run=run)
    label = schedule.label_value(task)
    assert len(label) <= 63
    assert LABEL_VALUE.match(label), label


def test_timestamps() -> None:
    assert schedule.timestamp(at(2026, 1, 1)) == "2026-01-01T00:00:00Z"
    assert schedule.millis(at(2026, 1, 1, 0, 0, 1, 234567)) == "2026-01-01T00:00:01.234Z"
    naive = datetime.datetime(2026, 1, 1)
    assert schedule.aware(naive) == at(2026, 1, 1)
    assert schedule.aware(datetime.datetime(2026, 1, 1, 1, tzinfo=BERLIN)) == at(2026, 1, 1)
