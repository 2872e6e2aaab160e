"""The contract between the controller and the executors.

An executor answers three questions about one attempt of one operation —
start it, how is it going, stop it — and answers with an :data:`Outcome`.
It never writes the Operation itself: the controller folds every outcome
into at most one status write, which is how the write budget stays small.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any, Protocol

from opkeeper import kube, models, states


@dataclasses.dataclass(frozen=True, kw_only=True)
class Context:
    """One attempt of one operation, as the controller sees it right now."""

    op: models.Operation
    """The parsed operation (latest known version)."""
    body: kube.Body
    """The raw object (for owner references and resourceVersion)."""
    id: int
    """The operation's cluster-unique id."""
    attempt: int
    now: datetime.datetime
    """The controller's clock for this reconcile (timezone-aware UTC)."""

    @property
    def name(self) -> str:
        name: str = self.body["metadata"]["name"]
        return name

    @property
    def namespace(self) -> str:
        namespace: str = self.body["metadata"]["namespace"]
        return namespace

    @property
    def uid(self) -> str:
        uid: str = self.body["metadata"]["uid"]
        return uid

    @property
    def key(self) -> str:
        """The identity of this attempt: stable across restarts, unique per attempt."""
        return f"{self.uid}-{self.attempt}"

    def describe(self) -> dict[str, Any]:
        """What an outside worker is told about the operation (JSON)."""
        spec = self.op.spec
        return {
            "apiVersion": self.body.get("apiVersion"),
            "kind": "Operation",
            "name": self.name,
            "namespace": self.namespace,
            "uid": self.uid,
            "id": self.id,
            "attempt": self.attempt,
            "type": spec.type,
            "object": spec.object.to_k8s() if spec.object else None,
            "params": spec.params or {},
        }


@dataclasses.dataclass(frozen=True, kw_only=True)
class Running:
    """The attempt is under way."""

    executor: models.ExecutorStatus | None = None
    """What was started, to record (set by :meth:`Executor.start`)."""
    waiting_external: bool = False
    """The work now waits on an external system (state WaitingExternal)."""
    progress: int | None = None
    eta: datetime.datetime | None = None
    wake_at: datetime.datetime | None = None
    """When to look again; None: when the operation or its Job changes."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class NotStarted:
    """A start failed transiently (the external system is unreachable): nothing is
    recorded, the controller tries again at ``wake_at`` with the same idempotency key."""

    wake_at: datetime.datetime
    message: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Finished:
    """The attempt is over; ``event`` is SUCCEED, FAIL_INTERNAL or FAIL_EXTERNAL."""

    event: states.Event
    reason: str
    """CamelCase, e.g. JobFailed, WebhookRejected (goes to status.reason)."""
    message: str = ""
    result: models.Result | None = None
    error_code: int | None = None
    error_info: list[str] | None = None
    executor: models.ExecutorStatus | None = None


Outcome = Running | NotStarted | Finished


class Executor(Protocol):
    """One executor kind (builtin, job, webhook, external)."""

    async def start(self, ctx: Context) -> Outcome:
        """Start the attempt. Must be idempotent per ``ctx.key``: after a crash the
        controller may call it again for an attempt that did start."""

    async def poll(self, ctx: Context) -> Outcome:
        """How the started attempt is going (called on changes and at ``wake_at``)."""

    async def cancel(self, ctx: Context) -> None:
        """Stop the attempt's work if it can be stopped (best effort, idempotent)."""

    def forget(self, uid: str) -> None:
        """Drop in-memory state about an operation (deleted, or its attempt ended)."""


def reported(ctx: Context, *, failure: states.Event) -> Finished | None:
    """The outcome a worker reported in the status (a result, or an error), if any.

    Workers write ``result`` or ``errorCode``/``errorInfo`` through the status
    subresource (or the gateway's callback); the controller turns that report
    into the transition. ``failure`` is the failure kind a reported error means
    for this executor (external for webhook/external workers).
    """
    status = ctx.op.status
    if status.error_code is not None or status.error_info:
        info = list(status.error_info or [])
        return Finished(
            event=failure,
            reason="WorkerReportedError",
            message=info[0] if info else f"error code {status.error_code}",
            error_code=status.error_code if status.error_code is not None else 1,
            error_info=info,
        )
    if status.result is not None:
        return Finished(
            event=states.Event.SUCCEED, reason="WorkerReportedResult", result=status.result
        )
    return None
