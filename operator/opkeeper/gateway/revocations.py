"""Logged-out sessions: a shared, persistent list of revoked session nonces.

Sessions are signed tokens (:mod:`.auth`), not server state, so a token is
valid on every worker and replica until it expires. XenAPI's
``session.logout`` must end one session everywhere at once and for good,
across restarts, without turning sessions into server state. So a logout
records the token's nonce and expiry in one ConfigMap in the key namespace
(:data:`CONFIGMAP`, where tenants cannot write), every gateway process
follows it with a list+watch like the keys, and a token whose nonce is
listed is refused. An entry is needed only until its token would have
expired anyway, so every logout also prunes the expired entries; the list is
therefore bounded by the logouts within one session TTL, and
:attr:`Settings.max_entries` caps it below the ConfigMap size limit.

Why a ConfigMap and not the session-key Secret: revocations are not secret
(a nonce alone is no credential) and change often; the signing key is secret
and changes never. A merge patch adds one key without a read-modify-write, so
concurrent logouts on several replicas never conflict.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opkeeper import GROUP, errors, kube
from opkeeper.gateway import service

log = logging.getLogger(__name__)

CONFIGMAP = "opkeeper-session-revocations"
"""The ConfigMap (key namespace) listing revoked session nonces and their expiry."""
LABEL = f"{GROUP}/session-revocations"
"""The label the gateway's watch selects the ConfigMap by."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """How many logged-out sessions are remembered."""

    max_entries: int = 20_000
    """Most unexpired revocations kept (default 20,000: about 0.7 MiB, below the 1 MiB
    limit of a ConfigMap). A logout beyond it is refused (the session then simply
    lives until its expiry) rather than silently not revoked."""


def parse(data: Mapping[str, Any]) -> dict[str, float]:
    """The revocations a ConfigMap's data lists (entries that are not a number are
    ignored: nobody but the gateway writes here)."""
    out: dict[str, float] = {}
    for nonce, raw in data.items():
        try:
            out[str(nonce)] = float(raw)
        except (TypeError, ValueError):
            log.warning("revocation entry %r ignored: its expiry is not a number", nonce)
    return out


def plan(
    *, revoked: Mapping[str, float], nonce: str, expires: float, now: float, max_entries: int
) -> dict[str, str | None]:
    """The ConfigMap data merge patch for one logout: add ``nonce``, drop expired entries.

    Raises :class:`errors.Unavailable` when the list is full of unexpired entries."""
    patch: dict[str, str | None] = {k: None for k, exp in revoked.items() if exp <= now}
    live = len(revoked) - len(patch)
    if nonce not in revoked and live >= max_entries:
        raise errors.Unavailable(
            f"{live} sessions are logged out and not yet expired, the most kept;"
            " the session stays valid until it expires"
        )
    patch[nonce] = repr(expires)
    return patch


class Revocations:
    """The revoked session nonces, fed by a watch on :data:`CONFIGMAP`."""

    def __init__(
        self,
        *,
        kube_client: service.Kube,
        namespace: str,
        settings: Settings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._kube = kube_client
        self.namespace = namespace
        self._settings = settings
        self._clock = clock
        self._revoked: dict[str, float] = {}
        self._own: dict[str, float] = {}
        """This process's logouts: a watch event of an older ConfigMap version may arrive
        after a logout answered, and must not bring its session back meanwhile."""

    def __len__(self) -> int:
        return len(self._revoked)

    def reset(self, objects: Iterable[Mapping[str, Any]]) -> None:
        self._revoked = {}
        for obj in objects:
            self.apply(event="ADDED", obj=obj)

    def apply(self, *, event: str, obj: Mapping[str, Any]) -> None:
        if (obj.get("metadata") or {}).get("name") != CONFIGMAP:
            return
        now = self._clock()
        self._own = {k: exp for k, exp in self._own.items() if exp > now}
        if event == "DELETED":
            # Someone with access to the key namespace removed the list on purpose.
            self._revoked = dict(self._own)
            return
        self._revoked = {**parse(obj.get("data") or {}), **self._own}

    def revoked(self, nonce: str) -> bool:
        return nonce in self._revoked

    async def revoke(self, *, nonce: str, expires: float) -> None:
        """Record a logout; refused on this process at once, on the others once their
        watch brings the change (milliseconds), and on every process after a restart."""
        data = plan(
            revoked=self._revoked,
            nonce=nonce,
            expires=expires,
            now=self._clock(),
            max_entries=self._settings.max_entries,
        )
        try:
            await self._kube.patch(
                kube.CONFIGMAPS, name=CONFIGMAP, namespace=self.namespace, body={"data": data}
            )
        except errors.NotFound:
            try:
                await self._kube.create(
                    kube.CONFIGMAPS,
                    {
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "metadata": {
                            "name": CONFIGMAP,
                            "labels": {LABEL: "true", "app.kubernetes.io/part-of": "opkeeper"},
                        },
                        "data": {k: v for k, v in data.items() if v is not None},
                    },
                    namespace=self.namespace,
                )
            except kube.AlreadyExists:
                # Another logout created it meanwhile: the merge patch now applies.
                await self._kube.patch(
                    kube.CONFIGMAPS, name=CONFIGMAP, namespace=self.namespace, body={"data": data}
                )
        self._revoked[nonce] = self._own[nonce] = expires
