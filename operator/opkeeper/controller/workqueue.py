"""A keyed work queue with timers, in the manner of client-go's workqueue.

Why not let kopf call the reconciler directly: wake-ups (a sleep's progress
step, a deadline, a retry backoff, a TTL, a webhook poll) must run through
the same per-object serialisation as watch events, and kopf's own timers
cost a PATCH per wake-up and survive restarts only as annotations. Here a
wake-up is an in-memory heap entry: waiting costs no API write, and after a
restart every object is reconciled once from its status, which re-arms its
timer.

Guarantees: a key is processed by at most one worker at a time; adding a key
that is queued is a no-op; adding a key that is being processed makes it run
once more afterwards (so no change is lost); each key has at most one timer
(scheduling replaces it).

Two lanes: a key added as ``background`` runs only when nothing else waits. A
new leader lists every operation, most of them long finished; reconciling
those first put new work behind them (a minute and a half at the p99 of the
failover benchmark). Adding a background key in the foreground moves it up.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import logging
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)


class WorkQueue:
    """Runs ``handler(key)`` for queued keys on ``workers`` concurrent workers."""

    def __init__(self, handler: Callable[[str], Awaitable[None]], *, workers: int) -> None:
        self._handler = handler
        self._workers = workers
        self._ready: collections.deque[str] = collections.deque()
        self._later: collections.deque[str] = collections.deque()
        self._queued: dict[str, bool] = {}
        """Queued keys: True in the foreground lane, False in the background one."""
        self._has_work = asyncio.Event()
        self._active: set[str] = set()
        self._again: set[str] = set()
        self._timers: list[tuple[float, int, str]] = []
        self._timer_at: dict[str, float] = {}
        self._sequence = 0
        self._timer_changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def add(self, key: str, *, background: bool = False) -> None:
        """Process ``key`` soon; ``background``: once no foreground key waits."""
        if key in self._active:
            self._again.add(key)
            return
        lane = self._queued.get(key)
        if lane is None:
            self._queued[key] = not background
            (self._later if background else self._ready).append(key)
            self._has_work.set()
        elif not lane and not background:
            # Moved up; its entry in the background lane is skipped when reached.
            self._queued[key] = True
            self._ready.append(key)
            self._has_work.set()

    def _next(self) -> str | None:
        """The next key to process (foreground first), or None if none waits."""
        while self._ready:
            key = self._ready.popleft()
            if self._queued.get(key) is True:
                return key
        while self._later:
            key = self._later.popleft()
            if self._queued.get(key) is False:
                return key
        return None

    def schedule(self, key: str, when: float | None) -> None:
        """Process ``key`` at loop time ``when`` (replacing its timer); None cancels it."""
        if when is None:
            self._timer_at.pop(key, None)
            return
        if self._timer_at.get(key) == when:
            return
        self._timer_at[key] = when
        self._sequence += 1
        heapq.heappush(self._timers, (when, self._sequence, key))
        self._timer_changed.set()

    def forget(self, key: str) -> None:
        """Drop the key's timer (the object is gone)."""
        self._timer_at.pop(key, None)

    def __len__(self) -> int:
        return len(self._queued) + len(self._active)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._work(), name=f"workqueue-{i}") for i in range(self._workers)
        ]
        self._tasks.append(asyncio.create_task(self._tick(), name="workqueue-timers"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _work(self) -> None:
        while True:
            key = self._next()
            if key is None:
                self._has_work.clear()
                await self._has_work.wait()
                continue
            del self._queued[key]
            self._active.add(key)
            try:
                await self._handler(key)
            except Exception:
                # The handler owns its retries; this only keeps a bug from killing a worker.
                logger.exception("reconcile of %s failed unexpectedly", key)
            finally:
                self._active.discard(key)
                if key in self._again:
                    self._again.discard(key)
                    self.add(key)

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._timer_changed.clear()
            now = loop.time()
            while self._timers and self._timers[0][0] <= now:
                when, _, key = heapq.heappop(self._timers)
                if self._timer_at.get(key) == when:
                    del self._timer_at[key]
                    self.add(key)
            delay = self._timers[0][0] - now if self._timers else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._timer_changed.wait(), timeout=delay)
