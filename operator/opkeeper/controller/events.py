"""Kubernetes Events for operation transitions, posted in the background.

An Event is an API write like any other, so posting must never delay a
transition: the reconciler drops them into a bounded queue and one task
posts them. When the queue is full (an API server in trouble), Events are
dropped and counted in the log rather than piling up in memory.

Events are also rate-limited as a whole: a token bucket of ``qps`` per
second with bursts of ``burst`` (``Settings.event_qps``/``event_burst``),
as the kubelet's ``--event-qps``/``--event-burst`` do. At 56 ScheduledTask
runs per second a run brings three Events (Triggered, Started, Succeeded),
each costing the API server about what a status write costs, on the cores
that must fire the runs on time. Beyond the rate they are dropped at once
rather than posted minutes later from a long queue.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from typing import Literal

from opkeeper import errors, kube

logger = logging.getLogger(__name__)

COMPONENT = "opkeeper-controller"


class EventPoster:
    """Posts core/v1 Events about objects, one background task, bounded queue."""

    def __init__(
        self,
        client: kube.Client,
        *,
        enabled: bool,
        qps: float = 10.0,
        burst: int = 100,
        limit: int = 10000,
    ) -> None:
        self._client = client
        self._enabled = enabled
        self._qps = qps
        self._burst = burst
        self._tokens = float(burst)
        self._refilled = time.monotonic()
        self._queue: asyncio.Queue[kube.Body] = asyncio.Queue(maxsize=limit)
        self._task: asyncio.Task[None] | None = None
        self._dropped = 0

    def post(
        self,
        body: kube.Body,
        *,
        type: Literal["Normal", "Warning"],
        reason: str,
        message: str,
    ) -> None:
        """Queue an Event about the object ``body``."""
        if not self._enabled:
            return
        if not self._take_token():
            self._drop("over the rate")
            return
        meta = body["metadata"]
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": body.get("apiVersion"),
                "kind": body.get("kind"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._drop("queue full")

    def _take_token(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._qps)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _drop(self, why: str) -> None:
        self._dropped += 1
        if self._dropped % 1000 == 1:
            logger.warning("event dropped (%s); %d dropped so far", why, self._dropped)

    def start(self) -> None:
        if self._enabled:
            self._task = asyncio.create_task(self._run(), name="event-poster")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self._client.create(
                    kube.EVENTS, event, namespace=event["metadata"]["namespace"]
                )
            except errors.OpkeeperError as exc:
                # An Event is a courtesy: never retry it at the expense of real work.
                logger.debug("posting an event failed: %s", exc)
