"""An external system called over HTTP; waiting on it is waiting on them (EXT).

Start: POST the operation (JSON) to ``url`` with an ``Idempotency-Key`` that
is the same for every try of one attempt and different for the next
attempt, so the receiver can make our retries — including the one after a
controller crash between the POST and recording its acceptance — a no-op.

Results: the external system either writes ``result`` / ``errorCode`` into
the status (directly or through the gateway's callback), or is polled at
``pollUrl`` with exponential backoff. The reply to a start or a poll is JSON
``{"id": ..., "state": "accepted|running|succeeded|failed", "progress": n,
"result": {"type": ..., "value": ...}, "error": {"code": n, "info": [...]}}``;
every key is optional. ``pollUrl`` and ``cancelUrl`` may contain ``{id}``
(the external id) and ``{key}`` (the idempotency key).

A 4xx reply to the start is a refusal (FailedExternal); 5xx, timeouts and
refused connections are retried with backoff until the deadline.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from typing import Any

import aiohttp

from opkeeper import models, states
from opkeeper.executors import base

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 10


@dataclasses.dataclass
class _Backoff:
    next_at: datetime.datetime
    delay: float


class WebhookExecutor:
    """Calls the webhook once per attempt, then waits for a callback or polls."""

    def __init__(self, *, initial_delay: float = 1.0, max_delay: float = 60.0) -> None:
        self._initial = initial_delay
        self._max = max_delay
        self._session: aiohttp.ClientSession | None = None
        self._backoff: dict[str, _Backoff] = {}
        """Per attempt key: when to retry the start or poll next (restarts begin afresh)."""

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _spec(self, ctx: base.Context) -> models.WebhookExecutor:
        spec = ctx.op.spec.executor.webhook
        assert spec is not None
        return spec

    def _timeout(self, ctx: base.Context) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=self._spec(ctx).timeout_seconds or DEFAULT_TIMEOUT_SECONDS
        )

    def _delay(self, key: str, now: datetime.datetime) -> datetime.datetime:
        """The next try after a failed or inconclusive one: 1 s, 2 s, 4 s ... capped."""
        previous = self._backoff.get(key)
        delay = self._initial if previous is None else min(previous.delay * 2, self._max)
        wake = now + datetime.timedelta(seconds=delay)
        self._backoff[key] = _Backoff(next_at=wake, delay=delay)
        return wake

    async def start(self, ctx: base.Context) -> base.Outcome:
        spec = self._spec(ctx)
        record = models.ExecutorStatus(
            kind="webhook", idempotency_key=ctx.key, params=ctx.op.spec.params
        )
        try:
            async with self.session.post(
                spec.url,
                json=ctx.describe(),
                headers={"Idempotency-Key": ctx.key},
                timeout=self._timeout(ctx),
            ) as response:
                text = await response.text()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            return base.NotStarted(wake_at=self._delay(ctx.key, ctx.now), message=repr(exc))
        if status >= 500 or status in (408, 429):
            return base.NotStarted(
                wake_at=self._delay(ctx.key, ctx.now), message=f"HTTP {status}: {text[:200]}"
            )
        if status >= 400:
            return base.Finished(
                event=states.Event.FAIL_EXTERNAL,
                reason="WebhookRejected",
                message=f"{spec.url} answered HTTP {status}: {text[:200]}",
                error_code=status,
                error_info=[text[:1000]],
                executor=record,
            )
        self._backoff.pop(ctx.key, None)
        reply = _json(text)
        record = record.model_copy(
            update={"external_id": _str(reply.get("id")), "accepted_at": ctx.now}
        )
        outcome = self._interpret(ctx, reply)
        if isinstance(outcome, base.Finished):
            return dataclasses.replace(outcome, executor=record)
        return base.Running(
            executor=record,
            waiting_external=True,
            progress=_progress(reply),
            wake_at=self._delay(ctx.key, ctx.now) if spec.poll_url else None,
        )

    async def poll(self, ctx: base.Context) -> base.Outcome:
        reported = base.reported(ctx, failure=states.Event.FAIL_EXTERNAL)
        if reported is not None:
            return reported
        spec = self._spec(ctx)
        if spec.poll_url is None:
            return base.Running()
        backoff = self._backoff.get(ctx.key)
        if backoff is not None and ctx.now < backoff.next_at:
            return base.Running(wake_at=backoff.next_at)
        url = self._fill(spec.poll_url, ctx)
        try:
            async with self.session.get(
                url, headers={"Idempotency-Key": ctx.key}, timeout=self._timeout(ctx)
            ) as response:
                text = await response.text()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.info("poll of %s failed: %r", url, exc)
            return base.Running(wake_at=self._delay(ctx.key, ctx.now))
        if status >= 400:
            logger.info("poll of %s answered HTTP %d", url, status)
            return base.Running(wake_at=self._delay(ctx.key, ctx.now))
        reply = _json(text)
        outcome = self._interpret(ctx, reply)
        if isinstance(outcome, base.Finished):
            self._backoff.pop(ctx.key, None)
            return outcome
        return base.Running(progress=_progress(reply), wake_at=self._delay(ctx.key, ctx.now))

    async def cancel(self, ctx: base.Context) -> None:
        spec = self._spec(ctx)
        self._backoff.pop(ctx.key, None)
        if spec.cancel_url is None:
            return
        url = self._fill(spec.cancel_url, ctx)
        try:
            async with self.session.post(
                url,
                json=ctx.describe(),
                headers={"Idempotency-Key": ctx.key},
                timeout=self._timeout(ctx),
            ) as response:
                if response.status >= 400:
                    logger.warning("cancel at %s answered HTTP %d", url, response.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The operation is cancelled on our side either way; the log says theirs may run on.
            logger.warning("cancel at %s failed: %r", url, exc)

    def forget(self, uid: str) -> None:
        for key in [k for k in self._backoff if k.startswith(f"{uid}-")]:
            del self._backoff[key]

    @staticmethod
    def _fill(template: str, ctx: base.Context) -> str:
        record = ctx.op.status.executor
        external = record.external_id if record and record.external_id else ""
        return template.replace("{id}", external).replace("{key}", ctx.key)

    @staticmethod
    def _interpret(ctx: base.Context, reply: dict[str, Any]) -> base.Finished | None:
        state = str(reply.get("state", "")).lower()
        if state == "succeeded":
            result = reply.get("result")
            return base.Finished(
                event=states.Event.SUCCEED,
                reason="ExternalSucceeded",
                result=models.Result.model_validate(result) if isinstance(result, dict) else None,
            )
        if state == "failed":
            error = reply.get("error") if isinstance(reply.get("error"), dict) else {}
            assert isinstance(error, dict)
            info = [str(i)[:1000] for i in error.get("info") or []][:16]
            return base.Finished(
                event=states.Event.FAIL_EXTERNAL,
                reason="ExternalFailed",
                message=info[0] if info else "the external system reported a failure",
                error_code=int(error.get("code") or 1),
                error_info=info,
            )
        return None


def _json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _str(value: object) -> str | None:
    return None if value is None else str(value)[:256]


def _progress(reply: dict[str, Any]) -> int | None:
    value = reply.get("progress")
    return max(0, min(100, int(value))) if isinstance(value, int | float) else None
