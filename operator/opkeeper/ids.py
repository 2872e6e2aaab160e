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

Whoever creates an Operation and must answer with its id at once (the
gateway's ``operation_create``, the ScheduledTask controller) sets the id
label at creation, which also spares the controller a label write. Anyone
allowed to create Operations can set that label too, so a label alone must
not be believed: a tenant could claim another tenant's id and shadow their
operation in every id lookup. :class:`IdSeal` signs the label (an HMAC over
namespace, name and id, with a key kept in a Secret of the system
namespace that only opkeeper's own processes read) and the controller keeps
a label id only when its seal verifies; otherwise it draws a fresh id.
The key is a :class:`opkeeper.keys.KeyedSecret`, as is the one that signs
the gateway's session tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
from collections.abc import Mapping
from typing import Any

from opkeeper import errors, keys, kube

logger = logging.getLogger(__name__)

CONFIGMAP = "opkeeper-ids"
KEY = "next"
"""The ConfigMap key holding the first id no allocator has reserved yet."""
LABEL = "opkeeper.dev/id"
"""The label carrying an object's id, for selectors and for the gateway's lookups."""
SEAL = "opkeeper.dev/id-seal"
"""The annotation proving that the id label was set by opkeeper (see :class:`IdSeal`)."""
KEY_SECRET = "opkeeper-id-key"
"""The Secret (system namespace) holding the seal's HMAC key."""


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
        await kube.ensure_namespace(self._client, self._namespace)
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stamp:
    """An id with the metadata that carries it on a new object."""

    id: int
    labels: Mapping[str, str]
    annotations: Mapping[str, str]


class IdSeal:
    """Signs id labels set at creation and checks them on objects read back.

    The key is the :class:`opkeeper.keys.KeyedSecret` :data:`KEY_SECRET`.
    """

    def __init__(
        self, client: kube.Client, *, namespace: str, reload_interval: float = 30.0
    ) -> None:
        self._secret = keys.KeyedSecret(
            client, namespace=namespace, name=KEY_SECRET, reload_interval=reload_interval
        )

    async def stamp(self, value: int, *, namespace: str, name: str) -> Stamp:
        """The id ``value`` (freshly allocated) sealed for the object ``namespace/name``
        about to be created."""
        key = await self._secret.key()
        return Stamp(
            id=value,
            labels={LABEL: str(value)},
            annotations={SEAL: _mac(key, namespace=namespace, name=name, value=value)},
        )

    async def load(self) -> None:
        """Read (or create) the key now, e.g. before :meth:`verify` is first needed."""
        await self._secret.key()

    async def trusted_id(self, body: Mapping[str, Any]) -> int | None:
        """The object's label id if opkeeper set it (its seal verifies), else None."""
        if label_id(body) is None:
            return None
        await self._secret.key()
        value = self.verify(body)
        if value is not None or await self._secret.reload() is None:
            return value
        return self.verify(body)

    def verify(self, body: Mapping[str, Any]) -> int | None:
        """:meth:`trusted_id` with the key as loaded, without I/O (None before :meth:`load`)."""
        meta = body.get("metadata") or {}
        value = label_id(body)
        seal = (meta.get("annotations") or {}).get(SEAL)
        key = self._secret.loaded
        if value is None or not isinstance(seal, str) or key is None:
            return None
        expected = _mac(
            key, namespace=meta.get("namespace", ""), name=meta.get("name", ""), value=value
        )
        return value if hmac.compare_digest(seal, expected) else None


def label_id(body: Mapping[str, Any]) -> int | None:
    """The id in the object's label, if it is a positive integer (believed or not)."""
    raw = ((body.get("metadata") or {}).get("labels") or {}).get(LABEL, "")
    return int(raw) if isinstance(raw, str) and raw.isdigit() and int(raw) > 0 else None


def _mac(key: bytes, *, namespace: str, name: str, value: int) -> str:
    message = f"{namespace}/{name}/{value}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:32]
