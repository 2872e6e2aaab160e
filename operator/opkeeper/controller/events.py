"""Kubernetes Events for operation transitions, posted in the background.

An Event is an API write like any other, so posting must never delay a
transition: the reconciler drops them into a bounded queue and one task
posts them. When the queue is full (an API server in trouble), Events are
dropped and counted in the log rather than piling up in memory.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from typing import Literal

from opkeeper import errors, kube

logger = logging.getLogger(__name__)

COMPONENT = "opkeeper-controller"


class EventPoster:
    """Posts core/v1 Events about objects, one background task, bounded queue."""

    def __init__(self, client: kube.Client, *, enabled: bool, limit: int = 10000) -> None:
        self._client = client
        self._enabled = enabled
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
            self._dropped += 1
            if self._dropped % 1000 == 1:
                logger.warning("event queue full; %d events dropped so far", self._dropped)

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
