"""Nothing is started: an outside actor does the work and reports in the status.

The operation waits in WaitingExternal (BDOM PENDING_EXT) until someone
writes ``result`` (Succeeded) or ``errorCode``/``errorInfo``
(FailedExternal) through the status subresource or the gateway.
"""

from __future__ import annotations

from opkeeper import models, states
from opkeeper.executors import base


class ExternalExecutor:
    """Arms the operation and turns reports into outcomes."""

    async def start(self, ctx: base.Context) -> base.Outcome:
        return base.Running(
            executor=models.ExecutorStatus(kind="external", params=ctx.op.spec.params),
            waiting_external=True,
        )

    async def poll(self, ctx: base.Context) -> base.Outcome:
        return base.reported(ctx, failure=states.Event.FAIL_EXTERNAL) or base.Running()

    async def cancel(self, ctx: base.Context) -> None:
        """Nothing of ours runs; the outside actor sees spec.cancel if it cares."""

    def forget(self, uid: str) -> None:
        """No in-memory state."""
