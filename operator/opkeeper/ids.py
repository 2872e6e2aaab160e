"""Cluster-unique integer ids (Gandi opid, CloudStack jobid, BDOM task_id).

Legacy clients want small integers, Kubernetes has only names and UIDs. The
counter lives in one ConfigMap (``opkeeper-ids`` in the system namespace) so
that every writer — the controller and any number of gateway replicas — can
draw from it without a leader: each allocator reserves a *block* of ids with
one optimistic-concurrency write (conditional on the ConfigMap's
resourceVersion; a 409 means another writer won, so it reads again and
retries) and hands them out from memory. A block costs one API write per
``block_size`` ids; ids left in a block when a process stops are skipped,
never reused, because the counter only ever moves forward.

Ids are unique cluster-wide and increase within one allocator; two
allocators interleave by blocks (a block size of 1 makes them globally
ordered, at one write per id).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from opkeeper import errors, kube

logger = logging.getLogger(__name__)

CONFIGMAP = "opkeeper-ids"
KEY = "next"
"""The ConfigMap key holding the first id no allocator has reserved yet."""
LABEL = "opkeeper.dev/id"
"""The label carrying an object's id, for selectors and for the gateway's lookups."""


class IdAllocator:
    """Hands out ids from blocks reserved in the counter ConfigMap."""

    def __init__(
        self,
        client: kube.Client,
        *,
        namespace: str = "opkeeper-system",
        block_size: int = 100,
        max_attempts: int = 50,
    ) -> None:
        if block_size < 1:
            raise ValueError("block_size must be at least 1")
        self._client = client
        self._namespace = namespace
        self._block_size = block_size
        self._max_attempts = max_attempts
        self._next = 0
        self._end = 0  # exclusive: the block is [_next, _end)
        self._lock = asyncio.Lock()

    async def allocate(self) -> int:
        """The next id; reserves a new block when the current one is used up."""
        async with self._lock:
            if self._next >= self._end:
                self._next, self._end = await self._reserve()
            value = self._next
            self._next += 1
            return value

    async def _reserve(self) -> tuple[int, int]:
        for _ in range(self._max_attempts):
            try:
                current = await self._client.get(
                    kube.CONFIGMAPS, namespace=self._namespace, name=CONFIGMAP
                )
            except errors.NotFound:
                if await self._create_counter():
                    return 1, 1 + self._block_size
                continue
            start = int(current.get("data", {}).get(KEY, "1"))
            end = start + self._block_size
            try:
                await self._client.patch(
                    kube.CONFIGMAPS,
                    namespace=self._namespace,
                    name=CONFIGMAP,
                    body={
                        "metadata": {"resourceVersion": current["metadata"]["resourceVersion"]},
                        "data": {KEY: str(end)},
                    },
                )
            except errors.Conflict:
                continue  # another writer took a block first; read its result and try again
            logger.debug("reserved ids [%d, %d)", start, end)
            return start, end
        raise errors.Unavailable(
            f"could not reserve ids after {self._max_attempts} conflicting attempts"
        )

    async def _create_counter(self) -> bool:
        """Create the counter holding our first block; False if someone else created it."""
        await self._ensure_namespace()
        try:
            await self._client.create(
                kube.CONFIGMAPS,
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {
                        "name": CONFIGMAP,
                        "labels": {"app.kubernetes.io/part-of": "opkeeper"},
                    },
                    "data": {KEY: str(1 + self._block_size)},
                },
                namespace=self._namespace,
            )
        except kube.AlreadyExists:
            return False
        return True

    async def _ensure_namespace(self) -> None:
        with contextlib.suppress(kube.AlreadyExists):
            await self._client.create(
                kube.NAMESPACES,
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self._namespace}},
            )
