"""When to try an API server call again, and after how long: pure decisions.

The API server sheds load with 429 and a ``Retry-After`` (API Priority and
Fairness), answers 5xx while etcd or itself restarts, and refuses connections
while it is down. :func:`decide` turns one failed attempt into "retry after N
seconds" or "give up", with bounded attempts and a bounded total wait, so a
caller (the gateway answering a legacy client) gets a clear "unavailable" in
seconds instead of hanging. It is a function of its arguments only (jitter is
passed in), so tests/test_kube_retry.py checks every branch without I/O.

What may be repeated depends on whether the server may already have acted:

- 429, and a connection that was never made: the server did nothing; any
  request may be sent again.
- A 5xx, a timeout, a connection lost mid-call: the request may have taken
  effect. Reads, and writes that come out the same when applied twice, are
  repeated (see :func:`repeatable`); a create is not (a second attempt would
  say AlreadyExists about our own object), nor a JSON patch (``add`` to a
  list twice is two items): the caller gets :class:`opkeeper.errors.Unavailable`
  and retries at its own level, where it knows what the write meant.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import math

MAX_ATTEMPTS = 6
"""Attempts per call, the first included."""
BASE_DELAY = 0.2
"""Seconds before the first repeat after a 5xx or a connection error."""
MAX_DELAY = 5.0
"""Longest single backoff (exponential growth stops here)."""
BUDGET = 10.0
"""Longest total wait within one call; beyond it the call fails as unavailable."""
STREAM_MAX_DELAY = 30.0
"""Longest wait between a watch stream's reconnects (streams never give up)."""

REPEATABLE_STATUSES = frozenset({500, 502, 503, 504})
"""5xx answers after which a repeatable request is tried again (501 would not change)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Policy:
    """How hard one call tries."""

    max_attempts: int = MAX_ATTEMPTS
    """Attempts per call, the first included; 1 turns retries off."""
    base_delay: float = BASE_DELAY
    """Seconds before the first repeat; doubled each time, with full jitter."""
    max_delay: float = MAX_DELAY
    """Longest single backoff."""
    budget: float = BUDGET
    """Longest total wait in one call, Retry-After included."""


DEFAULT_POLICY = Policy()
"""The policy of a client that names none."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Failure:
    """One failed attempt, as far as the decision needs it."""

    status: int | None
    """The HTTP status; None when no answer came (connection error, timeout)."""
    sent: bool = True
    """False when the connection was never made: the server cannot have acted."""
    retry_after: str | None = None
    """The ``Retry-After`` header, if any (seconds or an HTTP date)."""


def retry_after_seconds(value: str | None, *, now: float) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date); None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return max(0.0, moment.timestamp() - now)


def backoff(*, attempt: int, base: float, cap: float, jitter: float) -> float:
    """Exponential backoff with full jitter: uniform in (0, min(cap, base * 2**(attempt-1))].

    ``jitter`` is a number in [0, 1) the caller drew (``random.random()``), which
    keeps this pure. Full jitter spreads many clients reconnecting to a
    restarted API server instead of having them arrive together.
    """
    ceiling = min(cap, base * math.pow(2, max(0, attempt - 1)))
    return ceiling * (1.0 - jitter)


def decide(
    failure: Failure,
    *,
    repeatable: bool,
    attempt: int,
    waited: float,
    policy: Policy,
    jitter: float,
    now: float,
) -> float | None:
    """Seconds to wait before attempt ``attempt + 1``, or None to give up.

    ``attempt`` counts the attempts made so far (1 after the first), ``waited``
    the seconds already spent waiting in this call, ``repeatable`` whether the
    request is safe to send again when the server may have acted on it.
    """
    if attempt >= policy.max_attempts:
        return None
    not_acted = failure.status == 429 or (failure.status is None and not failure.sent)
    may_have_acted = failure.status is None or failure.status in REPEATABLE_STATUSES
    if not (not_acted or (repeatable and may_have_acted)):
        return None
    delay = retry_after_seconds(failure.retry_after, now=now)
    if delay is None:
        delay = backoff(
            attempt=attempt, base=policy.base_delay, cap=policy.max_delay, jitter=jitter
        )
    if waited + delay > policy.budget:
        return None
    return delay


def stream_delay(*, failures: int, base: float, retry_after: float | None, jitter: float) -> float:
    """How long a list+watch stream waits before reconnecting after ``failures`` in a row.

    Streams retry forever (a controller without its watch is blind), but back off
    exponentially from ``base`` to :data:`STREAM_MAX_DELAY` and honour a 429's
    Retry-After. Half the delay is jittered: a stream always waits at least half.
    """
    if retry_after is not None:
        return min(retry_after, STREAM_MAX_DELAY)
    return backoff(attempt=failures, base=base, cap=STREAM_MAX_DELAY, jitter=jitter * 0.5)


def repeatable(*, method: str, patch_type: str | None = None) -> bool:
    """Whether sending the request twice has the effect of sending it once.

    GET and DELETE (a repeat finds it gone: NotFound after a lost answer is
    treated as done by the client), PUT (it carries the resourceVersion it
    replaces: a repeat after success is a Conflict, never a double write),
    merge/strategic/apply patches (they set fields to values). Not POST (a
    create) and not JSON patches (``add``/``remove`` act twice).
    """
    if method in ("GET", "DELETE", "PUT"):
        return True
    if method == "PATCH":
        return patch_type in ("merge", "strategic", "apply")
    return False
