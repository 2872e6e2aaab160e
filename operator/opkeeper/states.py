"""The state machine of Operations and ScheduledTasks, and the legacy vocabulary.

This module is the only place that decides a state. Everything else asks it:
the controller computes a new state with :func:`transition`, and every
protocol facade turns a state into its dialect's word with :func:`legacy`
(and a dialect's filter word back into states with :func:`states_for`).

Waiting on us (``Pending``/``Running``, BDOM ``PENDING_INT``) and waiting on
an external system (``WaitingExternal``, ``PENDING_EXT``) are distinct states,
and so are internal and external failures, because legacy clients branch on
them.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

from opkeeper import errors


class State(enum.StrEnum):
    """The state of an Operation (``status.state``)."""

    PENDING = "Pending"
    RUNNING = "Running"
    WAITING_EXTERNAL = "WaitingExternal"
    SUCCEEDED = "Succeeded"
    FAILED_INTERNAL = "FailedInternal"
    FAILED_EXTERNAL = "FailedExternal"
    CANCELLED = "Cancelled"


class Event(enum.StrEnum):
    """What happened to an Operation; the input of :func:`transition`."""

    START = "start"
    """The executor was started (or, for ``external``, the operation was armed)."""
    WAIT_EXTERNAL = "wait_external"
    """An external system accepted the work; we now wait on it."""
    RESUME = "resume"
    """The external system handed the work back to us."""
    SUCCEED = "succeed"
    FAIL_INTERNAL = "fail_internal"
    """Our side failed: a Job failed, a deadline passed, a dependency failed."""
    FAIL_EXTERNAL = "fail_external"
    """The external system reported a failure."""
    CANCEL = "cancel"
    RETRY = "retry"
    """A failed attempt with retries left goes back to Pending for a new attempt."""
    RELAUNCH = "relaunch"
    """A user relaunched a finished operation (``spec.relaunch`` was bumped)."""


TERMINAL: frozenset[State] = frozenset(
    {State.SUCCEEDED, State.FAILED_INTERNAL, State.FAILED_EXTERNAL, State.CANCELLED}
)
ACTIVE: frozenset[State] = frozenset(State) - TERMINAL
FAILED: frozenset[State] = frozenset({State.FAILED_INTERNAL, State.FAILED_EXTERNAL})

_NOT_FINISHED_EXITS: Mapping[Event, State] = {
    Event.SUCCEED: State.SUCCEEDED,
    Event.FAIL_INTERNAL: State.FAILED_INTERNAL,
    Event.FAIL_EXTERNAL: State.FAILED_EXTERNAL,
    Event.CANCEL: State.CANCELLED,
}

TRANSITIONS: Mapping[State, Mapping[Event, State]] = {
    State.PENDING: {
        Event.START: State.RUNNING,
        # A dependency failed or the deadline passed before the start.
        Event.FAIL_INTERNAL: State.FAILED_INTERNAL,
        Event.CANCEL: State.CANCELLED,
    },
    State.RUNNING: {
        Event.WAIT_EXTERNAL: State.WAITING_EXTERNAL,
        Event.RETRY: State.PENDING,
        **_NOT_FINISHED_EXITS,
    },
    State.WAITING_EXTERNAL: {
        Event.RESUME: State.RUNNING,
        Event.RETRY: State.PENDING,
        **_NOT_FINISHED_EXITS,
    },
    State.SUCCEEDED: {Event.RELAUNCH: State.PENDING},
    State.FAILED_INTERNAL: {Event.RELAUNCH: State.PENDING},
    State.FAILED_EXTERNAL: {Event.RELAUNCH: State.PENDING},
    State.CANCELLED: {Event.RELAUNCH: State.PENDING},
}
"""Every allowed transition: ``TRANSITIONS[state][event]`` is the next state."""


def transition(state: State, event: Event) -> State:
    """Return the state that ``event`` leads to from ``state``.

    Raises :class:`errors.IllegalTransition` for anything not in
    :data:`TRANSITIONS`, with a message a legacy client can show as is.
    """
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        if state in TERMINAL and event is Event.CANCEL:
            raise errors.IllegalTransition(
                f"the operation is already finished ({state.value}) and cannot be cancelled"
            ) from None
        if state in TERMINAL:
            raise errors.IllegalTransition(
                f"the operation is finished ({state.value}); only a relaunch changes it"
            ) from None
        raise errors.IllegalTransition(
            f"cannot {event.value} an operation in state {state.value}"
        ) from None


def allowed(state: State, event: Event) -> bool:
    """Whether ``event`` is allowed in ``state`` (no exception)."""
    return event in TRANSITIONS[state]


def is_terminal(state: State) -> bool:
    return state in TERMINAL


class TaskState(enum.StrEnum):
    """The state of a ScheduledTask (``status.state``)."""

    SCHEDULED = "Scheduled"
    SUSPENDED = "Suspended"
    TRIGGERED = "Triggered"
    COMPLETED = "Completed"
    FAILED = "Failed"
    MISSED = "Missed"


class Dialect(enum.StrEnum):
    """A legacy protocol whose state words we speak."""

    GANDI = "gandi"
    GOCEPT = "gocept"
    XENAPI = "xenapi"
    CLOUDSTACK = "cloudstack"
    BDOM = "bdom"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LegacyWords:
    """One row of the legacy vocabulary table (DESIGN section 3)."""

    gandi: str
    """Gandi ``state``: RUN, WAIT, DONE, ERROR, CANCEL, SCHEDULED."""
    gocept: str
    """gocept records carry the resource's own state names (Pending, WaitingExternal, ...)."""
    xenapi: str
    """XenAPI task ``status``: pending, success, failure, cancelled (and ``cancelling``,
    from :data:`CANCELLING_WORDS`)."""
    cloudstack: int
    """CloudStack ``jobstatus``: 0 pending, 1 succeeded, 2 failed."""
    bdom: str | None
    """BDOM ``status``; None where BDOM lists the thing elsewhere (scheduled tasks)."""

    def word(self, dialect: Dialect) -> str | int | None:
        value: str | int | None = getattr(self, dialect.value)
        return value


VOCABULARY: Mapping[State, LegacyWords] = {
    State.PENDING: LegacyWords(
        gandi="RUN", gocept="Pending", xenapi="pending", cloudstack=0, bdom="PENDING_INT"
    ),
    State.RUNNING: LegacyWords(
        gandi="RUN", gocept="Running", xenapi="pending", cloudstack=0, bdom="PENDING_INT"
    ),
    State.WAITING_EXTERNAL: LegacyWords(
        gandi="WAIT", gocept="WaitingExternal", xenapi="pending", cloudstack=0, bdom="PENDING_EXT"
    ),
    State.SUCCEEDED: LegacyWords(
        gandi="DONE", gocept="Succeeded", xenapi="success", cloudstack=1, bdom="SUCCESS"
    ),
    State.FAILED_INTERNAL: LegacyWords(
        gandi="ERROR", gocept="FailedInternal", xenapi="failure", cloudstack=2, bdom="FAILED_INT"
    ),
    State.FAILED_EXTERNAL: LegacyWords(
        gandi="ERROR", gocept="FailedExternal", xenapi="failure", cloudstack=2, bdom="FAILED_EXT"
    ),
    State.CANCELLED: LegacyWords(
        gandi="CANCEL", gocept="Cancelled", xenapi="cancelled", cloudstack=2, bdom="FAILED_INT"
    ),
}
"""The legacy word of every Operation state in every dialect."""

SCHEDULED_WORDS = LegacyWords(
    gandi="SCHEDULED", gocept="Scheduled", xenapi="pending", cloudstack=0, bdom=None
)
"""How a ScheduledTask that has not fired yet looks to legacy clients."""


CANCELLING_WORDS: Mapping[Dialect, str] = {Dialect.XENAPI: "cancelling"}
"""The word of an unfinished Operation whose cancel was asked for (``spec.cancel``) and
not yet acted on, in the dialects that have one (XenAPI's task ``status``); the other
dialects show the state's own word until the controller cancels."""


def legacy_status(state: State, dialect: Dialect, *, cancel_requested: bool) -> str | int:
    """The word ``dialect`` uses for ``state``, given whether a cancel is pending."""
    if cancel_requested and state not in TERMINAL and dialect in CANCELLING_WORDS:
        return CANCELLING_WORDS[dialect]
    return legacy(state, dialect)


def legacy(state: State, dialect: Dialect) -> str | int:
    """The word ``dialect`` uses for ``state``."""
    word = VOCABULARY[state].word(dialect)
    assert word is not None, "every Operation state has a word in every dialect"
    return word


def states_for(dialect: Dialect, word: str | int) -> frozenset[State]:
    """All states a dialect's word stands for (for filters: Gandi RUN is Pending or Running).

    An unknown word raises :class:`errors.InvalidArgument` naming the known ones.
    """
    found = frozenset(s for s, row in VOCABULARY.items() if row.word(dialect) == word)
    if not found:
        known = sorted({str(row.word(dialect)) for row in VOCABULARY.values()})
        raise errors.InvalidArgument(
            f"unknown {dialect.value} state {word!r}; expected one of {', '.join(known)}"
        )
    return found
