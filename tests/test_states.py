"""The state machine and the legacy vocabulary, exhaustively and by property."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from opkeeper import errors, states

State, Event = states.State, states.Event


def test_every_transition_is_in_the_table_and_nothing_else() -> None:
    for state, event in itertools.product(State, Event):
        if event in states.TRANSITIONS[state]:
            assert states.transition(state, event) is states.TRANSITIONS[state][event]
            assert states.allowed(state, event)
        else:
            assert not states.allowed(state, event)
            with pytest.raises(errors.IllegalTransition):
                states.transition(state, event)


def test_terminal_states_leave_only_through_relaunch_to_pending() -> None:
    for state in states.TERMINAL:
        assert dict(states.TRANSITIONS[state]) == {Event.RELAUNCH: State.PENDING}


def test_cancel_of_a_terminal_state_is_refused_with_a_clear_message() -> None:
    for state in states.TERMINAL:
        with pytest.raises(errors.IllegalTransition, match="cannot be cancelled"):
            states.transition(state, Event.CANCEL)


def test_every_active_state_can_be_cancelled_and_failed_internally() -> None:
    for state in states.ACTIVE:
        assert states.transition(state, Event.CANCEL) is State.CANCELLED
        assert states.transition(state, Event.FAIL_INTERNAL) is State.FAILED_INTERNAL


def test_every_state_is_reachable_from_pending() -> None:
    seen, frontier = {State.PENDING}, [State.PENDING]
    while frontier:
        for nxt in states.TRANSITIONS[frontier.pop()].values():
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert seen == set(State)


@given(st.lists(st.sampled_from(list(Event)), max_size=40))
def test_random_event_sequences_only_take_allowed_steps(events: list[Event]) -> None:
    """Whatever happens, the machine only moves along TRANSITIONS; a terminal state
    changes only by relaunch, and an illegal event leaves the state as it was."""
    state = State.PENDING
    for event in events:
        try:
            nxt = states.transition(state, event)
        except errors.IllegalTransition:
            assert event not in states.TRANSITIONS[state]
            continue
        assert nxt is states.TRANSITIONS[state][event]
        if state in states.TERMINAL:
            assert event is Event.RELAUNCH
        state = nxt


@pytest.mark.parametrize("dialect", list(states.Dialect))
def test_every_state_has_a_word_in_every_dialect(dialect: states.Dialect) -> None:
    for state in State:
        word = states.legacy(state, dialect)
        assert word is not None
        assert state in states.states_for(dialect, word)


def test_vocabulary_matches_design_section_3() -> None:
    table = {
        State.PENDING: ("RUN", "pending", 0, "PENDING_INT"),
        State.RUNNING: ("RUN", "pending", 0, "PENDING_INT"),
        State.WAITING_EXTERNAL: ("WAIT", "pending", 0, "PENDING_EXT"),
        State.SUCCEEDED: ("DONE", "success", 1, "SUCCESS"),
        State.FAILED_INTERNAL: ("ERROR", "failure", 2, "FAILED_INT"),
        State.FAILED_EXTERNAL: ("ERROR", "failure", 2, "FAILED_EXT"),
        State.CANCELLED: ("CANCEL", "cancelled", 2, "FAILED_INT"),
    }
    dialects = (
        states.Dialect.GANDI,
        states.Dialect.XENAPI,
        states.Dialect.CLOUDSTACK,
        states.Dialect.BDOM,
    )
    for state, words in table.items():
        assert tuple(states.legacy(state, d) for d in dialects) == words
    assert states.SCHEDULED_WORDS.gandi == "SCHEDULED"


def test_unknown_legacy_word_is_an_invalid_argument() -> None:
    with pytest.raises(errors.InvalidArgument, match="expected one of"):
        states.states_for(states.Dialect.GANDI, "NOPE")
