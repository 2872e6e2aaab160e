"""Random HMAC keys shared by every opkeeper process through Secrets.

Two things opkeeper signs must verify in any of its processes: the id seal
(:mod:`opkeeper.ids`, made by the gateway or the ScheduledTask controller,
checked by the Operation controller) and the gateway's session tokens (made
by one replica or worker, checked by another). Each key lives in one Secret
of the system namespace, created by the first process that needs it, so
there is nothing to provision and nothing to configure.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import time

from opkeeper import errors, kube


class KeyedSecret:
    """A random HMAC key shared by every opkeeper process through one Secret.

    The key is read from (or, by the first process that needs it, created in)
    the Secret ``name`` of the system namespace, which only opkeeper's own
    processes read. Whoever verifies a MAC with it and fails calls
    :meth:`reload`: the Secret may have been replaced since this process read
    it, and a re-read (at most once per ``reload_interval`` seconds, so that a
    flood of forged MACs costs no API traffic) makes the processes agree again.
    """

    def __init__(
        self, client: kube.Client, *, namespace: str, name: str, reload_interval: float = 30.0
    ) -> None:
        self._client = client
        self._namespace = namespace
        self._name = name
        self._reload_interval = reload_interval
        self._key: bytes | None = None
        self._loaded_at = 0.0
        self._lock = asyncio.Lock()

    @property
    def loaded(self) -> bytes | None:
        """The key as last read, without I/O (None before the first :meth:`key`)."""
        return self._key

    async def key(self) -> bytes:
        """The key, read (or created) on first use."""
        if self._key is not None:  # every gateway call comes here: no lock once loaded
            return self._key
        async with self._lock:
            if self._key is None:
                await self._read()
            assert self._key is not None
            return self._key

    async def reload(self) -> bytes | None:
        """The key read again, or None if it was read less than ``reload_interval`` ago."""
        async with self._lock:
            if self._key is not None and (
                time.monotonic() - self._loaded_at < self._reload_interval
            ):
                return None
            await self._read()
            return self._key

    async def _read(self) -> None:
        self._key = await self._get_or_create()
        self._loaded_at = time.monotonic()

    async def _get_or_create(self) -> bytes:
        for _ in range(3):
            with contextlib.suppress(errors.NotFound):
                secret = await self._client.get(
                    kube.SECRETS, namespace=self._namespace, name=self._name
                )
                return base64.b64decode(secret["data"]["key"])
            key = secrets.token_bytes(32)
            await kube.ensure_namespace(self._client, self._namespace)
            try:
                await self._client.create(
                    kube.SECRETS,
                    {
                        "apiVersion": "v1",
                        "kind": "Secret",
                        "metadata": {
                            "name": self._name,
                            "labels": {"app.kubernetes.io/part-of": "opkeeper"},
                        },
                        "data": {"key": base64.b64encode(key).decode()},
                    },
                    namespace=self._namespace,
                )
            except kube.AlreadyExists:
                continue  # another process created it first: read theirs
            return key
        raise errors.Unavailable(f"could not read or create the Secret {self._name}")
