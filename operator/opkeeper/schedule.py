"""When a ScheduledTask runs: cron, time zones, missed runs, run names, the timer queue.

Everything here is pure (no Kubernetes, no kopf) so the rules that decide
*whether* and *when* an Operation is created can be tested exhaustively
without a cluster; :mod:`opkeeper.controller.scheduledtasks` only carries
out what :func:`plan` decides.

Why our own cron evaluator instead of croniter: the daylight-saving rule
below must hold exactly, and croniter (7.x, time-zone aware mode) runs a
wall-clock time of a fall-back fold twice; evaluating cron on naive wall
clock and mapping to instants ourselves keeps that rule in one 20-line
function. The grammar is also deliberately the one of Kubernetes CronJob
(five fields, names, ranges, steps, ``@daily``-style macros), where croniter
accepts seconds and year fields, ``L``/``W``/``#``/``H`` that a CronJob
manifest would reject. croniter stays useful as an independent oracle in
the tests.

Daylight saving (documented in docs/scheduling.md): a schedule names wall
clock times in ``timeZone``; each named wall-clock time runs exactly once.

* A time that does not exist (spring-forward gap, e.g. 02:30 on
  2026-03-29 in Europe/Berlin) runs at the first instant after the gap
  (03:00 local). Several such times collapse into that one run. A daily
  02:30 job therefore still runs every day, only late on one of them;
  skipping it (what Kubernetes CronJob does) silently loses a run.
* A time that occurs twice (fall-back fold, e.g. 02:30 on 2026-10-25 in
  Europe/Berlin) runs once, at its first occurrence (02:30 CEST). This is
  Vixie cron's rule for fixed-time jobs; Kubernetes CronJob runs it twice.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import datetime
import hashlib
import heapq
import itertools
import re
import time
import zoneinfo
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Generic, Literal, Protocol, TypeVar

from opkeeper import errors, models, states

UTC = datetime.UTC
ONE_MINUTE = datetime.timedelta(minutes=1)
_ONE_DAY = datetime.timedelta(days=1)
_SEARCH_DAYS = datetime.timedelta(days=366 * 9)
"""How far a cron search looks: Feb 29 (the rarest valid date) can be 8 years apart."""

MISSED_COUNT_CAP = 1000
"""Missed runs are counted one by one up to this many; beyond it the count is a lower bound.

A minutely task whose controller was down for a month has 43,200 missed
runs; counting them exactly would cost ~0.1 s per such task on every
restart. 1000 keeps the worst case to a few milliseconds per task.
"""

DEFAULT_HISTORY_LIMIT = 10
"""How many finished Operations of a task are kept when ``spec.historyLimit`` is unset."""


# --- cron --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Field:
    name: str
    low: int
    high: int
    names: Mapping[str, int]


_MONTH_NAMES = {
    name: number
    for number, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
        start=1,
    )
}
_DAY_NAMES = {
    name: number for number, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))
}
_FIELDS = (
    _Field(name="minute", low=0, high=59, names={}),
    _Field(name="hour", low=0, high=23, names={}),
    _Field(name="day of month", low=1, high=31, names={}),
    _Field(name="month", low=1, high=12, names=_MONTH_NAMES),
    # 7 is Sunday too, as in Vixie cron; folded onto 0 after parsing.
    _Field(name="day of week", low=0, high=7, names=_DAY_NAMES),
)
_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MAX_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_ITEM = re.compile(r"^(?P<range>\*|\?|[a-z0-9]+(?:-[a-z0-9]+)?)(?:/(?P<step>[0-9]+))?$")


def _invalid(expression: str, why: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(f"invalid schedule {expression!r}: {why}")


def _value(expression: str, field: _Field, token: str) -> int:
    if token in field.names:
        return field.names[token]
    if not token.isdigit():
        raise _invalid(expression, f"{token!r} is not a valid {field.name}")
    number = int(token)
    if not field.low <= number <= field.high:
        raise _invalid(expression, f"{field.name} {number} is outside {field.low}-{field.high}")
    return number


def _parse_field(expression: str, field: _Field, text: str) -> tuple[frozenset[int], bool]:
    """The values one field allows, and whether it was written as ``*``/``?`` (unrestricted)."""
    values: set[int] = set()
    unrestricted = False
    for item in text.split(","):
        match = _ITEM.match(item)
        if match is None:
            raise _invalid(expression, f"cannot read {field.name} {item!r}")
        span, step_text = match["range"], match["step"]
        if span == "?" and field.name not in ("day of month", "day of week"):
            raise _invalid(expression, f"'?' is only allowed in the day fields, not {field.name}")
        if span in ("*", "?"):
            low, high = field.low, field.high
        elif "-" in span:
            first, last = span.split("-")
            low, high = _value(expression, field, first), _value(expression, field, last)
            if low > high:
                raise _invalid(expression, f"{field.name} range {span} runs backwards")
        else:
            low = _value(expression, field, span)
            # "N/step" means N to the end of the range, as in Kubernetes CronJob.
            high = field.high if step_text is not None else low
        step = int(step_text) if step_text is not None else 1
        if step < 1:
            raise _invalid(expression, f"{field.name} step must be at least 1")
        values.update(range(low, high + 1, step))
        # The day-of-month/day-of-week OR rule looks at the written star, as
        # Kubernetes CronJob (robfig/cron) does: "*", "?" and "*/1" leave the
        # field unrestricted, "*/2" and "1-31" restrict it.
        unrestricted = unrestricted or (span in ("*", "?") and step == 1)
    return frozenset(values), unrestricted


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cron:
    """A parsed five-field cron expression, evaluated on naive wall-clock time."""

    expression: str
    """The expression as written in the spec."""
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    """Days of the month."""
    months: frozenset[int]
    weekdays: frozenset[int]
    """Days of the week, 0 = Sunday."""
    any_day: bool
    """Day of month was ``*``: only the weekday restricts the day."""
    any_weekday: bool
    """Day of week was ``*``: only the day of month restricts the day."""

    def day_matches(self, day: datetime.date) -> bool:
        if day.month not in self.months:
            return False
        in_days = day.day in self.days
        in_weekdays = (day.weekday() + 1) % 7 in self.weekdays
        if self.any_day or self.any_weekday:
            return in_days and in_weekdays
        # Both restricted: either one suffices (Vixie cron, Kubernetes CronJob).
        return in_days or in_weekdays

    def next_wall(self, start: datetime.datetime) -> datetime.datetime:
        """The first slot at or after ``start`` (naive wall-clock, whole minute)."""
        day, hour, minute = start.date(), start.hour, start.minute
        limit = day + _SEARCH_DAYS
        while day <= limit:
            if day.month not in self.months:
                day = (day.replace(day=1) + datetime.timedelta(days=32)).replace(day=1)
                hour = minute = 0
                continue
            if self.day_matches(day):
                found = _at_or_after(self.hours, self.minutes, hour, minute)
                if found is not None:
                    return datetime.datetime.combine(day, datetime.time(*found))
            day, hour, minute = day + _ONE_DAY, 0, 0
        raise AssertionError(f"{self.expression!r} has no slot within 9 years")  # pragma: no cover

    def prev_wall(self, start: datetime.datetime) -> datetime.datetime | None:
        """The last slot at or before ``start``, or None if there is none in 9 years."""
        day, hour, minute = start.date(), start.hour, start.minute
        limit = day - _SEARCH_DAYS
        while day >= limit:
            if day.month not in self.months:
                day = day.replace(day=1) - _ONE_DAY
                hour, minute = 23, 59
                continue
            if self.day_matches(day):
                found = _at_or_before(self.hours, self.minutes, hour, minute)
                if found is not None:
                    return datetime.datetime.combine(day, datetime.time(*found))
            day, hour, minute = day - _ONE_DAY, 23, 59
        return None


def _at_or_after(
    hours: Sequence[int], minutes: Sequence[int], hour: int, minute: int
) -> tuple[int, int] | None:
    i = bisect.bisect_left(hours, hour)
    if i < len(hours) and hours[i] == hour:
        j = bisect.bisect_left(minutes, minute)
        if j < len(minutes):
            return hour, minutes[j]
        i += 1
    return (hours[i], minutes[0]) if i < len(hours) else None


def _at_or_before(
    hours: Sequence[int], minutes: Sequence[int], hour: int, minute: int
) -> tuple[int, int] | None:
    i = bisect.bisect_right(hours, hour) - 1
    if i >= 0 and hours[i] == hour:
        j = bisect.bisect_right(minutes, minute) - 1
        if j >= 0:
            return hour, minutes[j]
        i -= 1
    return (hours[i], minutes[-1]) if i >= 0 else None


def parse_cron(expression: str) -> Cron:
    """Parse a Kubernetes-CronJob-style expression; raise :class:`errors.InvalidArgument`."""
    text = expression.strip().lower()
    if text.startswith(("tz=", "cron_tz=")):
        raise _invalid(expression, "set the time zone in spec.timeZone, not in the schedule")
    if text.startswith("@"):
        if text not in _MACROS:
            raise _invalid(expression, f"unknown macro; use one of {', '.join(sorted(_MACROS))}")
        text = _MACROS[text]
    parts = text.split()
    if len(parts) != 5:
        raise _invalid(
            expression, f"expected 5 fields (minute hour day month weekday), got {len(parts)}"
        )
    parsed = [_parse_field(expression, f, p) for f, p in zip(_FIELDS, parts, strict=True)]
    (minutes, _), (hours, _), (days, any_day), (months, _), (weekdays, any_weekday) = parsed
    cron = Cron(
        expression=expression,
        minutes=tuple(sorted(minutes)),
        hours=tuple(sorted(hours)),
        days=days,
        months=months,
        weekdays=frozenset(d % 7 for d in weekdays),
        any_day=any_day,
        any_weekday=any_weekday,
    )
    only_days = not any_day and any_weekday
    if only_days and not any(min(days) <= _MAX_DAYS_IN_MONTH[m - 1] for m in months):
        raise _invalid(expression, "no month of the schedule has that day, it would never run")
    return cron


# --- time zones and instants -------------------------------------------------


def zone(name: str | None) -> zoneinfo.ZoneInfo:
    """The IANA zone ``name`` (UTC when unset); unknown names raise InvalidArgument."""
    try:
        return zoneinfo.ZoneInfo(name or "UTC")
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise errors.InvalidArgument(f"unknown time zone {name!r}; use an IANA name") from None


def aware(moment: datetime.datetime) -> datetime.datetime:
    """``moment`` in UTC; a naive value is taken to be UTC (as Kubernetes writes them)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def instant(wall: datetime.datetime, tz: zoneinfo.ZoneInfo) -> datetime.datetime:
    """When the wall-clock time ``wall`` in ``tz`` runs (UTC), by the daylight-saving rule.

    An ambiguous wall time maps to its first occurrence (fold=0 is the earlier
    one in zoneinfo); a nonexistent one to the first instant after its gap.
    """
    first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if first.astimezone(tz).replace(tzinfo=None) == wall:
        return first
    return _gap_end(wall, tz)


def _gap_end(wall: datetime.datetime, tz: zoneinfo.ZoneInfo) -> datetime.datetime:
    # In a gap, fold=0 reads the wall time with the offset before the jump and
    # fold=1 with the one after: the jump itself lies between the two instants.
    a = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    b = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    low, high = min(a, b), max(a, b)
    after = high.astimezone(tz).utcoffset()
    second = datetime.timedelta(seconds=1)
    while high - low > second:
        middle = low + (high - low) // 2
        middle -= datetime.timedelta(microseconds=middle.microsecond)
        if middle.astimezone(tz).utcoffset() == after:
            high = middle
        else:
            low = middle
    return high


class Timetable(Protocol):
    """The instants a task runs at: a cron schedule or a single execAt."""

    def next_after(self, moment: datetime.datetime) -> datetime.datetime | None:
        """The first run strictly after ``moment``, or None."""

    def latest(
        self, *, at_or_before: datetime.datetime, after: datetime.datetime
    ) -> datetime.datetime | None:
        """The last run in ``(after, at_or_before]``, or None."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class CronTimetable:
    """A cron expression in a time zone: runs are UTC instants."""

    cron: Cron
    tz: zoneinfo.ZoneInfo

    def next_after(self, moment: datetime.datetime) -> datetime.datetime:
        local = aware(moment).astimezone(self.tz)
        wall = local.replace(tzinfo=None, second=0, microsecond=0) + ONE_MINUTE
        while True:
            wall = self.cron.next_wall(wall)
            run = instant(wall, self.tz)
            # Only after a fold's second occurrence can an earlier instant turn
            # up here (the fold's walls map to their first occurrence): skip them.
            if run > moment:
                return run
            wall += ONE_MINUTE

    def latest(
        self, *, at_or_before: datetime.datetime, after: datetime.datetime
    ) -> datetime.datetime | None:
        at = aware(at_or_before)
        local = at.astimezone(self.tz)
        wall = local.replace(tzinfo=None, second=0, microsecond=0)
        if local.fold:
            # In a fold's second occurrence, later walls of the fold ran earlier
            # (at their first occurrence): start the search from the fold's end.
            offset = local.utcoffset()
            first_offset = local.replace(fold=0).utcoffset()
            assert offset is not None
            assert first_offset is not None
            wall += first_offset - offset
        while True:
            found = self.cron.prev_wall(wall)
            if found is None:
                return None
            run = instant(found, self.tz)
            if run <= after:
                return None
            if run <= at:
                return run
            wall = found - ONE_MINUTE


@dataclasses.dataclass(frozen=True, kw_only=True)
class OnceTimetable:
    """A single run at ``at`` (execAt)."""

    at: datetime.datetime

    def next_after(self, moment: datetime.datetime) -> datetime.datetime | None:
        return self.at if self.at > moment else None

    def latest(
        self, *, at_or_before: datetime.datetime, after: datetime.datetime
    ) -> datetime.datetime | None:
        return self.at if after < self.at <= at_or_before else None


def timetable(spec: models.ScheduledTaskSpec) -> CronTimetable | OnceTimetable:
    """The timetable of a spec; a bad schedule or time zone raises InvalidArgument."""
    if spec.exec_at is not None:
        return OnceTimetable(at=aware(spec.exec_at))
    if spec.schedule is None:
        raise errors.InvalidArgument("exactly one of execAt and schedule must be set")
    return CronTimetable(cron=parse_cron(spec.schedule), tz=zone(spec.time_zone))


# --- missed runs -------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Due:
    """What is owed between the last accounted run and now."""

    run: datetime.datetime | None
    """The run to start now: the most recent one, if it is still within the starting deadline."""
    missed: int
    """Runs that will never start (older ones, or all of them past the deadline)."""
    latest_missed: datetime.datetime | None
    """The most recent of the missed runs."""
    capped: bool
    """``missed`` reached :data:`MISSED_COUNT_CAP`: the true number is larger."""


def within_deadline(
    *, run: datetime.datetime, now: datetime.datetime, deadline_seconds: int | None
) -> bool:
    """Whether ``run`` may still start at ``now`` (lateness in whole seconds, like the field)."""
    if deadline_seconds is None:
        return True
    return int((now - run).total_seconds()) <= deadline_seconds


def due(
    *,
    table: Timetable,
    after: datetime.datetime,
    now: datetime.datetime,
    deadline_seconds: int | None,
    cap: int = MISSED_COUNT_CAP,
) -> Due:
    """The runs in ``(after, now]``: at most one to start (the latest), the rest missed.

    This is the whole catch-up rule, for the timer path and after an outage
    alike: only the most recent run may start, and only within the deadline.
    """
    latest = table.latest(at_or_before=now, after=after)
    if latest is None:
        return Due(run=None, missed=0, latest_missed=None, capped=False)
    start = within_deadline(run=latest, now=now, deadline_seconds=deadline_seconds)
    # Count the runs in (after, latest): the ones superseded by the latest.
    missed, capped, cursor, previous = 0, False, after, None
    while True:
        following = table.next_after(cursor)
        if following is None or following >= latest:
            break
        if missed == cap:
            capped = True
            break
        missed, previous, cursor = missed + 1, following, following
    if start:
        return Due(run=latest, missed=missed, latest_missed=previous, capped=capped)
    return Due(run=None, missed=missed + 1, latest_missed=latest, capped=capped)


# --- names -------------------------------------------------------------------

LABEL_TASK = "opkeeper.dev/scheduledtask"
"""Label on every Operation a task created; the value is :func:`label_value` of its name."""
ANNOTATION_TASK_UID = "opkeeper.dev/scheduledtask-uid"
"""The uid of the creating task: a task re-created under the same name is another task."""
ANNOTATION_SCHEDULED_TIME = "opkeeper.dev/scheduled-time"
"""The run the Operation is for (RFC 3339, UTC)."""
ANNOTATION_FIRED_AT = "opkeeper.dev/fired-at"
"""When the controller created the Operation, in milliseconds (creationTimestamp has seconds)."""

_NAME_LIMIT = 253
_LABEL_LIMIT = 63
_HASH_LENGTH = 8


def _shorten(text: str, limit: int) -> str:
    """``text`` if it fits in ``limit``, else a prefix plus a hash of the whole (stays unique)."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:_HASH_LENGTH]
    # Cutting may leave '-' or '.' at the end, which DNS names do not allow before '-'.
    prefix = text[: limit - _HASH_LENGTH - 1].rstrip("-.")
    return f"{prefix}-{digest}"


def run_stamp(run: datetime.datetime) -> str:
    """The run's UTC time for names: yyyymmddhhmm, plus ss when not on a whole minute."""
    moment = aware(run)
    return moment.strftime("%Y%m%d%H%M%S" if moment.second else "%Y%m%d%H%M")


def operation_name(*, task: str, run: datetime.datetime) -> str:
    """The one name the Operation of ``task``'s run at ``run`` can have.

    Deterministic, so a restarted or second controller that decides the same
    run gets 409 AlreadyExists instead of a duplicate. UTC, so the two runs
    around a fall-back fold never share a name. Sub-second parts of execAt are
    dropped: two execAt values within one second are the same run.
    """
    suffix = "-" + run_stamp(run)
    return _shorten(task, _NAME_LIMIT - len(suffix)) + suffix


def label_value(task: str) -> str:
    """The task's name as a label value (at most 63 characters)."""
    return _shorten(task, _LABEL_LIMIT)


def timestamp(moment: datetime.datetime) -> str:
    """RFC 3339 UTC with a Z, as Kubernetes writes times (microseconds kept if present)."""
    return aware(moment).isoformat().replace("+00:00", "Z")


def millis(moment: datetime.datetime) -> str:
    """RFC 3339 UTC with milliseconds, for :data:`ANNOTATION_FIRED_AT`."""
    return aware(moment).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- the plan: what one reconciliation does ------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class OperationInfo:
    """What the controller knows about one Operation of a task (from its watch)."""

    name: str
    state: states.State | None
    """None until the Operation controller has set a state: the Operation is active."""
    created: datetime.datetime
    run: datetime.datetime | None = None
    """The run it was created for (:data:`ANNOTATION_SCHEDULED_TIME`), if readable."""

    @property
    def finished(self) -> bool:
        return self.state is not None and states.is_terminal(self.state)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskView:
    """The parts of a ScheduledTask a plan reads."""

    name: str
    created: datetime.datetime
    """metadata.creationTimestamp: runs before it are not owed."""
    generation: int
    spec: models.ScheduledTaskSpec
    status: models.ScheduledTaskStatus


@dataclasses.dataclass(frozen=True, kw_only=True)
class Notice:
    """A Kubernetes Event to post on the task."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fire:
    """Create the Operation of a run."""

    run: datetime.datetime
    name: str
    recovery: bool
    """Re-create a run the status records as active but no Operation exists for (an
    Operation deleted while no controller ran, or a run claimed by a controller version
    that recorded runs before creating them): no new status."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """What a reconciliation of one task does, in order: status, fire, cancel, delete, notices."""

    status: dict[str, Any]
    """A JSON merge patch of status (None removes a field); empty means no write."""
    fire: Fire | None
    cancel: tuple[str, ...]
    """Active Operations to cancel (concurrencyPolicy Replace)."""
    delete: tuple[str, ...]
    """Finished Operations beyond historyLimit, oldest first."""
    notices: tuple[Notice, ...]
    wake_at: datetime.datetime | None
    """When to reconcile again if nothing else happens."""
    held: datetime.datetime | None
    """A run due now that waits for the active Operation (Forbid)."""


def _merge(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in wanted.items() if current.get(k) != v}


def _task_state(
    *,
    spec: models.ScheduledTaskSpec,
    last_operation: str | None,
    fired: bool,
    active: Sequence[str],
    operations: Mapping[str, OperationInfo],
    one_shot_done: bool,
    recorded: states.TaskState | None,
) -> states.TaskState | None:
    if active:
        return states.TaskState.TRIGGERED
    if spec.suspend:
        return states.TaskState.SUSPENDED
    if not one_shot_done:
        return states.TaskState.SCHEDULED
    if not fired or last_operation is None:
        return states.TaskState.MISSED
    last = operations.get(last_operation)
    if last is None or last.state is None:
        # Removed by historyLimit or a user: keep what was recorded.
        return recorded
    if last.state is states.State.SUCCEEDED:
        return states.TaskState.COMPLETED
    return states.TaskState.FAILED


def _exec_at(spec: models.ScheduledTaskSpec) -> datetime.datetime | None:
    return aware(spec.exec_at) if spec.exec_at is not None else None


def _same(a: datetime.datetime | None, b: datetime.datetime | None) -> bool:
    return a is not None and b is not None and aware(a) == aware(b)


def _started_unrecorded(
    *,
    table: Timetable,
    task: str,
    operations: Iterable[OperationInfo],
    after: datetime.datetime,
    now: datetime.datetime,
) -> OperationInfo | None:
    """The Operation of the latest run in ``(after, now]`` that exists though the status
    does not record the run.

    The controller creates a run's Operation before it records the run (one status
    write per run instead of two, see :mod:`opkeeper.controller.scheduledtasks`); a
    controller that stops in between leaves such an Operation behind. Its run was
    started: it must be neither created again nor counted as missed, however late the
    next controller looks. Only the deterministic name of a run of the current
    timetable counts, so an Operation of an earlier ``execAt`` or schedule does not.
    """
    found: OperationInfo | None = None
    found_run: datetime.datetime | None = None
    for op in operations:
        run = op.run
        if run is None or not after < run <= now or (found_run is not None and run <= found_run):
            continue
        if op.name != operation_name(task=task, run=run):
            continue
        if table.latest(at_or_before=run, after=run - datetime.timedelta(microseconds=1)) != run:
            continue
        found, found_run = op, run
    return found


def plan(
    *,
    task: TaskView,
    operations: Iterable[OperationInfo],
    in_flight: frozenset[str],
    gone: frozenset[str],
    now: datetime.datetime,
) -> Plan:
    """Decide one reconciliation of ``task`` at ``now``.

    ``operations`` are the task's Operations the controller has seen;
    ``in_flight`` names ones it created but has not seen yet; ``gone`` names
    ones it saw deleted. A name in ``status.active`` in none of them is
    unknown: it was deleted while the controller was down (or a controller
    that recorded runs before creating them stopped in between); the last run
    is then re-created if still within the starting deadline (409 if it exists
    after all), others are dropped. The reverse, an Operation of an owed run
    that exists while the status does not record the run yet, counts as
    started (see :func:`_started_unrecorded`).
    """
    spec, status = task.spec, task.status
    current = status.to_k8s()
    known = {op.name: op for op in operations}
    notices: list[Notice] = []
    wanted: dict[str, Any] = {"observedGeneration": task.generation}

    try:
        table = timetable(spec)
    except errors.InvalidArgument as error:
        condition = _invalid_condition(str(error), now, current)
        wanted.update(nextRunAt=None, state=None, conditions=[condition])
        if current.get("conditions") != [condition]:
            notices.append(Notice(type="Warning", reason="InvalidSchedule", message=str(error)))
        return Plan(
            status=_merge(current, wanted),
            fire=None,
            cancel=(),
            delete=(),
            notices=tuple(notices),
            wake_at=None,
            held=None,
        )
    wanted["conditions"] = None

    # Which Operations are active, and whether an interrupted run must be re-created.
    recorded = list(status.active or ())
    unknown = [n for n in recorded if n not in known and n not in in_flight and n not in gone]
    fire: Fire | None = None
    if status.last_operation in unknown and status.last_schedule_time is not None:
        last_run = aware(status.last_schedule_time)
        if within_deadline(run=last_run, now=now, deadline_seconds=spec.starting_deadline_seconds):
            fire = Fire(run=last_run, name=status.last_operation, recovery=True)
    active = sorted(
        {op.name for op in known.values() if not op.finished}
        | {n for n in recorded if n in in_flight and n not in known}
        | ({fire.name} if fire else set())
    )

    one_shot = isinstance(table, OnceTimetable)
    exec_at = _exec_at(spec)
    one_shot_done = one_shot and (
        _same(status.last_schedule_time, exec_at) or _same(status.last_missed_time, exec_at)
    )
    if one_shot:
        after = datetime.datetime.min.replace(tzinfo=UTC)
    elif status.next_run_at is not None:
        # nextRunAt is the horizon: every run before it was started or counted.
        after = aware(status.next_run_at) - datetime.timedelta(microseconds=1)
    else:
        after = aware(task.created)

    cancel: tuple[str, ...] = ()
    held: datetime.datetime | None = None
    wake_at: datetime.datetime | None = None
    started: OperationInfo | None = None
    started_run: datetime.datetime | None = None
    if spec.suspend or one_shot_done or fire is not None:
        owed = Due(run=None, missed=0, latest_missed=None, capped=False)
    else:
        started = _started_unrecorded(
            table=table, task=task.name, operations=known.values(), after=after, now=now
        )
        started_run = started.run if started is not None else None
        owed = due(
            table=table,
            after=after if started_run is None else started_run,
            now=now,
            deadline_seconds=spec.starting_deadline_seconds,
        )
        if started_run is not None:
            # The runs before the started one were superseded by it when it fired.
            before = due(table=table, after=after, now=started_run, deadline_seconds=None)
            owed = Due(
                run=owed.run,
                missed=before.missed + owed.missed,
                latest_missed=owed.latest_missed or before.latest_missed,
                capped=before.capped or owed.capped,
            )
    next_run = table.next_after(now)

    if owed.run is not None and active and spec.concurrency_policy == "Forbid":
        # Keep the horizon: the run starts when the active one finishes, if
        # that is within the deadline; the next run or the deadline wakes us.
        held = owed.run
        owed = Due(run=None, missed=0, latest_missed=None, capped=False)
        deadline = spec.starting_deadline_seconds
        expiry = held + datetime.timedelta(seconds=deadline + 1) if deadline is not None else None
        following = table.next_after(held)
        wake_at = min((t for t in (expiry, following) if t is not None), default=None)

    if owed.missed:
        total = (status.missed_runs or 0) + owed.missed
        wanted.update(missedRuns=total, lastMissedTime=timestamp(owed.latest_missed or now))
        at_least = "at least " if owed.capped else ""
        notices.append(
            Notice(
                type="Warning",
                reason="MissedRun",
                message=f"{at_least}{owed.missed} run(s) missed, the latest at "
                f"{timestamp(owed.latest_missed or now)} (startingDeadlineSeconds: "
                f"{spec.starting_deadline_seconds}); {total} missed in all",
            )
        )
    if owed.run is not None:
        name = operation_name(task=task.name, run=owed.run)
        fire = Fire(run=owed.run, name=name, recovery=False)
        if active and spec.concurrency_policy == "Replace":
            cancel = tuple(active)
            notices.append(
                Notice(
                    type="Normal",
                    reason="Replaced",
                    message=f"cancelling {', '.join(active)} for the run at {timestamp(owed.run)}",
                )
            )
        # Cancelled runs stay active until they have actually stopped.
        active = sorted({*active, name})
        wanted.update(lastScheduleTime=timestamp(owed.run), lastOperation=name)
        late = (now - owed.run).total_seconds()
        notices.append(
            Notice(
                type="Normal",
                reason="Triggered",
                message=f"created Operation {name} for the run at {timestamp(owed.run)}"
                f" ({late:.3f} s late)",
            )
        )
        if one_shot:
            one_shot_done = True
    elif started is not None and started_run is not None:
        wanted.update(lastScheduleTime=timestamp(started_run), lastOperation=started.name)
        if one_shot:
            one_shot_done = True
    elif owed.missed and one_shot:
        one_shot_done = True

    if fire is not None and fire.recovery:
        # Re-create first, keep the horizon, and look at what else is owed
        # right after (a plain due() now would advance nextRunAt past it).
        wake_at = now
    elif held is None and not spec.suspend and not one_shot_done:
        wanted["nextRunAt"] = timestamp(next_run) if next_run is not None else None
        wake_at = next_run
    elif one_shot_done:
        wanted["nextRunAt"] = None
    wanted["active"] = active or None
    state = _task_state(
        spec=spec,
        last_operation=wanted.get("lastOperation", status.last_operation),
        fired=owed.run is not None
        or started is not None
        or _same(status.last_schedule_time, exec_at),
        active=active,
        operations=known,
        one_shot_done=one_shot_done,
        recorded=status.state,
    )
    if state is not None:
        wanted["state"] = state.value

    finished = sorted(
        (op for op in known.values() if op.finished and op.name not in gone),
        key=lambda op: (op.created, op.name),
    )
    limit = spec.history_limit if spec.history_limit is not None else DEFAULT_HISTORY_LIMIT
    delete = tuple(op.name for op in finished[: max(0, len(finished) - limit)])

    return Plan(
        status=_merge(current, wanted),
        fire=fire,
        cancel=cancel,
        delete=delete,
        notices=tuple(notices),
        wake_at=wake_at,
        held=held,
    )


def _invalid_condition(
    message: str, now: datetime.datetime, current: Mapping[str, Any]
) -> dict[str, Any]:
    """The Valid=False condition, keeping its transition time while the error persists."""
    previous = next((c for c in current.get("conditions") or () if c.get("type") == "Valid"), None)
    since = previous.get("lastTransitionTime") if previous else None
    return {
        "type": "Valid",
        "status": "False",
        "reason": "InvalidSchedule",
        "message": message,
        "lastTransitionTime": since or timestamp(now.replace(microsecond=0)),
    }


# --- the timer queue ---------------------------------------------------------

K = TypeVar("K", bound=Hashable)


class TimerQueue(Generic[K]):
    """One sleeping asyncio task that calls ``on_due(key)`` when a key's time comes.

    Every waiting task is one heap entry and one dict entry: waiting costs no
    API call, no per-object asyncio task and no kopf timer (whose delays kopf
    persists with a PATCH every 10 minutes). Rescheduling or cancelling a key
    leaves its old heap entry behind; it is skipped when popped, and the heap
    is rebuilt when stale entries outnumber live ones, so memory stays bounded
    under churn.

    Times are wall-clock seconds (``time.time``), because runs are UTC
    instants; sleeps are capped at ``max_sleep`` so a stepped system clock
    is noticed within that time.
    """

    def __init__(
        self,
        *,
        on_due: Callable[[K], None],
        clock: Callable[[], float] = time.time,
        max_sleep: float = 30.0,
    ) -> None:
        self._on_due = on_due
        self._clock = clock
        self._max_sleep = max_sleep
        self._heap: list[tuple[float, int, K]] = []
        self._entries: dict[K, tuple[float, int]] = {}
        self._counter = itertools.count()
        self._wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def when(self, key: K) -> float | None:
        """When ``key`` is due, or None if it is not queued."""
        entry = self._entries.get(key)
        return entry[0] if entry else None

    def schedule(self, key: K, at: float) -> None:
        """Queue ``key`` for ``at`` (replacing an earlier time for the same key)."""
        if self.when(key) == at:
            return
        entry = (at, next(self._counter))
        self._entries[key] = entry
        heapq.heappush(self._heap, (*entry, key))
        if self._heap[0][1] == entry[1]:
            self._wake.set()
        self._compact()

    def cancel(self, key: K) -> bool:
        """Forget ``key``; return whether it was queued."""
        found = self._entries.pop(key, None) is not None
        self._compact()
        return found

    def poke(self) -> None:
        """Re-read the clock now (tests with a fake clock call this after advancing it)."""
        self._wake.set()

    def _compact(self) -> None:
        if len(self._heap) > 64 and len(self._heap) > 2 * len(self._entries):
            self._heap = [(at, seq, key) for key, (at, seq) in self._entries.items()]
            heapq.heapify(self._heap)

    def _pop_due(self, now: float) -> list[K]:
        keys: list[K] = []
        while self._heap and self._heap[0][0] <= now:
            at, seq, key = heapq.heappop(self._heap)
            if self._entries.get(key) == (at, seq):
                del self._entries[key]
                keys.append(key)
        return keys

    def _next_time(self) -> float | None:
        while self._heap:
            at, seq, key = self._heap[0]
            if self._entries.get(key) == (at, seq):
                return at
            heapq.heappop(self._heap)
        return None

    async def run(self) -> None:
        """Fire due keys forever (cancel the task to stop)."""
        while True:
            self._wake.clear()
            for key in self._pop_due(self._clock()):
                self._on_due(key)
            upcoming = self._next_time()
            delay = self._max_sleep if upcoming is None else upcoming - self._clock()
            if delay <= 0:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=min(delay, self._max_sleep))
