"""Work done inside the controller: noop, sleep (with progress steps) and fail.

For demos, tests and the benchmark. ``sleep`` keeps no in-memory state: its
progress and end are computed from ``status.startedAt``, so a restarted
controller continues the same attempt where it was instead of starting it
again.
"""

from __future__ import annotations

import dataclasses
import datetime
import math

from opkeeper import models, states
from opkeeper.executors import base

DEFAULT_SLEEP_SECONDS = 1.0


class BuiltinExecutor:
    """noop succeeds at once, sleep after ``seconds``, fail fails internally."""

    async def start(self, ctx: base.Context) -> base.Outcome:
        spec = self._spec(ctx)
        record = models.ExecutorStatus(kind="builtin", params=ctx.op.spec.params)
        if spec.action == "noop":
            return base.Finished(event=states.Event.SUCCEED, reason="Completed", executor=record)
        if spec.action == "fail":
            return base.Finished(
                event=states.Event.FAIL_INTERNAL,
                reason="BuiltinFail",
                message=spec.message or "the builtin fail action failed, as asked",
                error_code=1,
                error_info=[spec.message or "failed on purpose"],
                executor=record,
            )
        # A sleep of 0 s ends at once; otherwise this is the first progress report.
        return dataclasses.replace(self._progress(ctx, started=ctx.now), executor=record)

    async def poll(self, ctx: base.Context) -> base.Outcome:
        started = ctx.op.status.started_at or ctx.now
        return self._progress(ctx, started=started)

    async def cancel(self, ctx: base.Context) -> None:
        """Nothing runs outside the controller's timers, so there is nothing to stop."""

    def forget(self, uid: str) -> None:
        """Sleep keeps its state in the status, not in memory."""

    @staticmethod
    def _spec(ctx: base.Context) -> models.BuiltinExecutor:
        spec = ctx.op.spec.executor.builtin
        assert spec is not None
        return spec

    def _progress(
        self, ctx: base.Context, *, started: datetime.datetime
    ) -> base.Running | base.Finished:
        spec = self._spec(ctx)
        seconds = DEFAULT_SLEEP_SECONDS if spec.seconds is None else spec.seconds
        end = started + datetime.timedelta(seconds=seconds)
        if ctx.now >= end:
            return base.Finished(event=states.Event.SUCCEED, reason="Completed")
        steps = spec.progress_steps or 0
        if steps == 0:
            return base.Running(eta=end, wake_at=end)
        # progressSteps reports on the way: at k/(steps+1) of the time, k = 1..steps.
        slice_ = seconds / (steps + 1)
        elapsed = (ctx.now - started).total_seconds()
        done = min(steps, math.floor(elapsed / slice_)) if slice_ > 0 else steps
        wake = started + datetime.timedelta(seconds=(done + 1) * slice_)
        return base.Running(progress=done * 100 // (steps + 1), eta=end, wake_at=min(wake, end))
