"""The in-process timer queue (opkeeper.schedule.TimerQueue).

A fake clock drives ordering, rescheduling and cancelling; one test uses
short real times. Tests never sleep to synchronise: they wait for a
condition with a timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from opkeeper import schedule


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    """A queue on a fake clock that records which keys came due, in order."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.fired: list[str] = []
        self.changed = asyncio.Event()
        self.queue: schedule.TimerQueue[str] = schedule.TimerQueue(
            on_due=self._on_due, clock=self.clock, max_sleep=3600
        )

    def _on_due(self, key: str) -> None:
        self.fired.append(key)
        self.changed.set()

    async def advance_to(self, moment: float, *, expect: list[str]) -> None:
        """Move the clock and wait until exactly ``expect`` has fired (in that order)."""
        self.clock.now = moment
        self.queue.poke()
        await wait_for(lambda: len(self.fired) >= len(expect), self.changed)
        assert self.fired == expect

    async def quiet_until(self, moment: float) -> None:
        """Move the clock to ``moment`` and prove nothing else came due by then: a sentinel
        key due at ``moment`` fires after every earlier one, so waiting for it suffices."""
        before = list(self.fired)
        self.queue.schedule("sentinel", moment)
        await self.advance_to(moment, expect=[*before, "sentinel"])
        self.fired.remove("sentinel")


async def wait_for(condition: Callable[[], bool], changed: asyncio.Event) -> None:
    async with asyncio.timeout(5):
        while not condition():
            changed.clear()
            await changed.wait()


def run(scenario: Callable[[Harness], Awaitable[None]]) -> None:
    async def main() -> None:
        harness = Harness()
        task = asyncio.create_task(harness.queue.run())
        try:
            await scenario(harness)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


def test_fires_in_time_order() -> None:
    async def scenario(h: Harness) -> None:
        h.queue.schedule("c", 1030)
        h.queue.schedule("a", 1010)
        h.queue.schedule("b", 1020)
        assert len(h.queue) == 3
        await h.quiet_until(1005)
        assert h.fired == []
        await h.advance_to(1010, expect=["a"])
        await h.advance_to(1035, expect=["a", "b", "c"])
        assert len(h.queue) == 0

    run(scenario)


def test_reschedule_and_cancel() -> None:
    async def scenario(h: Harness) -> None:
        h.queue.schedule("a", 1010)
        h.queue.schedule("b", 1020)
        h.queue.schedule("a", 1030)  # moved later: must not fire at 1010
        assert h.queue.when("a") == 1030
        assert h.queue.cancel("b")
        assert not h.queue.cancel("b")
        assert "b" not in h.queue
        await h.quiet_until(1025)
        assert h.fired == []
        await h.advance_to(1030, expect=["a"])

    run(scenario)


def test_an_earlier_key_wakes_the_sleeping_queue() -> None:
    async def scenario(h: Harness) -> None:
        h.queue.schedule("late", 5000)
        await h.quiet_until(1001)
        h.queue.schedule("now", 1000)  # already due: no poke needed
        await wait_for(lambda: h.fired == ["now"], h.changed)

    run(scenario)


def test_one_key_fires_once() -> None:
    async def scenario(h: Harness) -> None:
        h.queue.schedule("a", 1010)
        h.queue.schedule("a", 1010)
        await h.advance_to(1010, expect=["a"])
        await h.quiet_until(2000)
        assert h.fired == ["a"]

    run(scenario)


def test_churn_keeps_the_heap_bounded() -> None:
    async def scenario(h: Harness) -> None:
        for round_ in range(50):
            for key in range(100):
                h.queue.schedule(str(key), 2000 + round_ + key)
        assert len(h.queue) == 100
        assert len(h.queue._heap) <= 2 * 100 + 100
        for key in range(100):
            h.queue.cancel(str(key))
        assert len(h.queue._heap) <= 64
        await h.quiet_until(10_000)
        assert h.fired == []

    run(scenario)


def test_real_time_lateness_is_small() -> None:
    async def main() -> None:
        fired: dict[str, float] = {}
        changed = asyncio.Event()

        def on_due(key: str) -> None:
            fired[key] = time.time()
            changed.set()

        queue: schedule.TimerQueue[str] = schedule.TimerQueue(on_due=on_due)
        task = asyncio.create_task(queue.run())
        start = time.time()
        due = {f"k{i}": start + 0.05 + i * 0.01 for i in range(20)}
        for key, moment in due.items():
            queue.schedule(key, moment)
        try:
            await wait_for(lambda: len(fired) == len(due), changed)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        lateness = [fired[k] - due[k] for k in due]
        assert min(lateness) >= 0
        # Generous for a loaded 2-core CI machine; typical is about a millisecond.
        assert max(lateness) < 0.5

    asyncio.run(main())
