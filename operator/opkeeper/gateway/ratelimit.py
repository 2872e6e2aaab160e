"""Per-tenant write budgets, so one tenant's loop of creates cannot take the API server
from the others: every legacy write becomes etcd writes (ours, then the controller's).

A token bucket per tenant namespace in each gateway process: ``burst`` writes at once
after a quiet spell, ``writes_per_second`` sustained. Reads are served from the cache and
bounded by the connection limits instead. Over budget, a write is refused before it does
anything, with :class:`opkeeper.errors.RateLimited` (each dialect's "temporarily
unavailable, retry" fault), so nothing is half-applied.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from opkeeper import errors

DEFAULT_WRITES_PER_SECOND = 50.0
DEFAULT_BURST = 500
TRACKED_TENANTS_MAX = 10_000
"""Buckets kept before full ones (tenants idle long enough) are forgotten."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """A tenant's write budget in one gateway process."""

    writes_per_second: float = DEFAULT_WRITES_PER_SECOND
    """Sustained writes per tenant namespace (0: no limit)."""
    burst: int = DEFAULT_BURST
    """Writes a tenant may make at once after a quiet spell; a batch (gocept ``apply``)
    counts each record, and one larger than this waits for a full bucket."""


@dataclasses.dataclass(frozen=True)
class Bucket:
    tokens: float
    at: float
    """Clock reading when ``tokens`` was right."""


def take(
    bucket: Bucket | None, *, cost: int, now: float, settings: Settings
) -> tuple[Bucket, float]:
    """Charge ``cost`` writes at ``now``: the bucket after it and 0.0, or the bucket
    (refilled, not charged) and the seconds until it could pay."""
    full = float(settings.burst)
    rate = settings.writes_per_second
    tokens = full if bucket is None else min(full, bucket.tokens + (now - bucket.at) * rate)
    price = min(float(cost), full)
    if price <= tokens:
        return Bucket(tokens - price, now), 0.0
    return Bucket(tokens, now), (price - tokens) / rate


class Limiter:
    """The buckets of every tenant this process has seen write."""

    def __init__(self, *, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._buckets: dict[str, Bucket] = {}

    def charge(self, *, tenant: str, cost: int = 1) -> None:
        """Take ``cost`` writes from ``tenant``'s budget or raise RateLimited."""
        if self.settings.writes_per_second <= 0:
            return
        now = self._clock()
        bucket, wait = take(self._buckets.get(tenant), cost=cost, now=now, settings=self.settings)
        if len(self._buckets) >= TRACKED_TENANTS_MAX and tenant not in self._buckets:
            self._forget_full(now)
        self._buckets[tenant] = bucket
        if wait > 0:
            raise errors.RateLimited(
                f"namespace {tenant} is writing faster than"
                f" {self.settings.writes_per_second:g} per second (burst {self.settings.burst});"
                f" retry in {wait:.1f} s",
                retry_after=wait,
            )

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled: forgetting one changes nothing."""
        for tenant, bucket in list(self._buckets.items()):
            refilled, _ = take(bucket, cost=0, now=now, settings=self.settings)
            if refilled.tokens >= self.settings.burst:
                del self._buckets[tenant]
