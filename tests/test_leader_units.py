"""Leader election's decisions, without I/O: who acquires, renews, stands by, and when a
leader must stop acting (the effects against the API server: tests/test_leader.py)."""

from __future__ import annotations

import datetime

import pytest

from opkeeper.controller import leader

NOW = datetime.datetime(2026, 12, 1, 6, 0, 0, 123456, tzinfo=datetime.UTC)


def record(holder: str = "a-1", *, duration: int = 15, renew: str = "t1") -> leader.Record:
    return leader.Record(holder=holder, duration_seconds=duration, renew_time=renew, transitions=0)


def test_no_lease_is_created() -> None:
    assert leader.decide(record=None, observed_at=0, now=0, identity="b") is leader.Action.CREATE


def test_our_own_lease_is_renewed_even_when_it_looks_expired() -> None:
    assert (
        leader.decide(record=record("b"), observed_at=0, now=1000, identity="b")
        is leader.Action.RENEW
    )


def test_a_live_lease_of_another_is_waited_on_until_it_went_unrenewed_for_its_duration() -> None:
    held = record("a-1", duration=15)
    assert leader.decide(record=held, observed_at=100, now=100, identity="b") is (
        leader.Action.STANDBY
    )
    assert leader.decide(record=held, observed_at=100, now=114.9, identity="b") is (
        leader.Action.STANDBY
    )
    assert leader.decide(record=held, observed_at=100, now=115, identity="b") is (
        leader.Action.ACQUIRE
    )


def test_a_released_lease_is_taken_at_once() -> None:
    free = record("", duration=1)
    assert leader.decide(record=free, observed_at=100, now=100, identity="b") is (
        leader.Action.ACQUIRE
    )


def test_the_leader_acts_only_while_its_last_renewal_is_younger_than_the_renew_deadline() -> None:
    assert leader.leading(renewed_at=100, now=109.9, renew_deadline=10)
    assert not leader.leading(renewed_at=100, now=110, renew_deadline=10)


def test_a_leader_stops_before_any_standby_may_take_over() -> None:
    """The standby counts from when it saw the renewal, which is after it was sent."""
    timing = leader.Timing(lease_duration=15, renew_deadline=10, retry_period=2)
    sent = 100.0
    seen = sent + 0.001
    stops = next(
        t / 10
        for t in range(1000, 2000)
        if not leader.leading(renewed_at=sent, now=t / 10, renew_deadline=timing.renew_deadline)
    )
    takes = next(
        t / 10
        for t in range(1000, 2000)
        if leader.decide(record=record("a"), observed_at=seen, now=t / 10, identity="b")
        is leader.Action.ACQUIRE
    )
    assert takes - stops >= timing.lease_duration - timing.renew_deadline - 0.1


def test_creating_holds_the_lease_with_no_transition_yet() -> None:
    body = leader.lease_body(
        name="l", namespace="ns", identity="b", duration_seconds=15, now=NOW, current=None
    )
    assert body["metadata"] == {"name": "l", "namespace": "ns"}
    assert body["spec"] == {
        "holderIdentity": "b",
        "leaseDurationSeconds": 15,
        "renewTime": "2026-12-01T06:00:00.123456Z",
        "acquireTime": "2026-12-01T06:00:00.123456Z",
        "leaseTransitions": 0,
    }


def current(holder: str) -> dict[str, object]:
    return {
        "metadata": {"name": "l", "namespace": "ns", "resourceVersion": "42"},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 15,
            "acquireTime": "2026-12-01T05:00:00.000000Z",
            "renewTime": "2026-12-01T05:59:58.000000Z",
            "leaseTransitions": 3,
        },
    }


def test_renewing_keeps_acquire_time_and_transitions_and_is_conditional() -> None:
    body = leader.lease_body(
        name="l", namespace="ns", identity="b", duration_seconds=15, now=NOW, current=current("b")
    )
    assert body["metadata"]["resourceVersion"] == "42"
    assert body["spec"]["acquireTime"] == "2026-12-01T05:00:00.000000Z"
    assert body["spec"]["renewTime"] == "2026-12-01T06:00:00.123456Z"
    assert body["spec"]["leaseTransitions"] == 3


def test_taking_over_counts_a_transition_and_is_conditional() -> None:
    body = leader.lease_body(
        name="l", namespace="ns", identity="b", duration_seconds=15, now=NOW, current=current("a")
    )
    assert body["metadata"]["resourceVersion"] == "42"
    assert body["spec"]["holderIdentity"] == "b"
    assert body["spec"]["acquireTime"] == "2026-12-01T06:00:00.123456Z"
    assert body["spec"]["leaseTransitions"] == 4


def test_releasing_empties_the_holder_and_is_conditional() -> None:
    body = leader.released_body(current("b"), now=NOW)
    assert body["metadata"]["resourceVersion"] == "42"
    assert body["spec"]["holderIdentity"] == ""
    assert body["spec"]["leaseDurationSeconds"] == leader.RELEASED_DURATION_SECONDS
    assert body["spec"]["leaseTransitions"] == 3
    assert leader.Record.of(body).holder == ""


def test_a_record_without_a_spec_reads_as_free() -> None:
    assert leader.Record.of({"metadata": {}}) == leader.Record(
        holder="", duration_seconds=0, renew_time="", transitions=0
    )


@pytest.mark.parametrize(
    ("duration", "deadline", "retry"), [(15, 15, 2), (15, 10, 10), (15, 20, 2), (15, 10, 0)]
)
def test_timings_that_allow_two_leaders_are_refused(
    duration: float, deadline: float, retry: float
) -> None:
    with pytest.raises(ValueError, match="retry period < renew deadline < lease duration"):
        leader.Timing(lease_duration=duration, renew_deadline=deadline, retry_period=retry)


def test_the_identity_is_the_pod_name_and_a_random_suffix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POD_NAME", "opkeeper-controller-7d9f-abcde")
    first, second = leader.default_identity(), leader.default_identity()
    assert first.startswith("opkeeper-controller-7d9f-abcde-")
    assert first != second
