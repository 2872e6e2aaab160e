"""API keys and login sessions: who is calling, and which one namespace they may use.

A key lives in a Secret labelled ``opkeeper.dev/api-key`` whose data holds
``keyHash`` (``sha256:<hex>`` of the key), ``userId`` and ``namespace``. The
key itself is never stored or logged: keys are 256-bit random strings, so a
plain SHA-256 is as hard to reverse as the key is to guess, and a lookup by
hash (unlike a slow password hash) costs nothing per call, which matters for
the gocept dialect that authenticates every request.

Which Secrets count is a security decision: by default only those in the
gateway's own namespace, where tenants cannot write. When the gateway is told
to read keys from every namespace, a Secret may only grant the namespace it
lives in; otherwise anyone allowed to create a Secret could mint a key for a
neighbour's namespace.

Sessions are random, opaque and expiring; they are kept in memory under the
hash of the token, die when their key is deleted or rotated, and are the only
thing a gateway restart loses.
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NewType

from opkeeper import errors

log = logging.getLogger(__name__)

LABEL = "opkeeper.dev/api-key"
"""The label that marks a Secret as an API key (any value)."""

KeyHash = NewType("KeyHash", str)
Tenant = NewType("Tenant", str)
"""The one namespace a caller may see and change."""

_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def new_key() -> str:
    """A fresh API key: 256 random bits, URL-safe, with a recognisable prefix."""
    return "opk_" + secrets.token_urlsafe(32)


def hash_key(key: str) -> KeyHash:
    """The form a key is stored in."""
    return KeyHash("sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest())


@dataclasses.dataclass(frozen=True, kw_only=True)
class Identity:
    """An authenticated caller."""

    user_id: str
    tenant: Tenant
    key_hash: KeyHash
    """Which key the caller used (sessions die with it)."""


def key_secret(*, name: str, namespace: str, key: str, user_id: str, tenant: str) -> dict[str, Any]:
    """The Secret manifest that grants ``key`` to ``user_id`` on namespace ``tenant``."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {LABEL: "true", "app.kubernetes.io/part-of": "opkeeper"},
        },
        "type": "Opaque",
        "stringData": {"keyHash": hash_key(key), "userId": user_id, "namespace": tenant},
    }


def _data(secret: Mapping[str, Any], field: str) -> str | None:
    raw = (secret.get("data") or {}).get(field)
    if not isinstance(raw, str):
        return None
    try:
        return base64.b64decode(raw, validate=True).decode("utf-8").strip()
    except (binascii.Error, UnicodeDecodeError):
        return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class KeyRingSettings:
    """Which Secrets are API keys."""

    namespace: str | None = "opkeeper-system"
    """Namespace whose labelled Secrets are keys (default ``opkeeper-system``, the
    gateway's own). None reads every namespace; then a key may only grant the
    namespace its Secret lives in."""


class KeyRing:
    """The known API keys, fed by a watch on labelled Secrets."""

    def __init__(self, *, settings: KeyRingSettings) -> None:
        self._settings = settings
        self._by_secret: dict[tuple[str, str], Identity] = {}
        self._by_hash: dict[KeyHash, Identity] = {}

    def _parse(self, secret: Mapping[str, Any]) -> Identity | None:
        meta = secret.get("metadata") or {}
        where = f"{meta.get('namespace')}/{meta.get('name')}"
        key_hash = _data(secret, "keyHash")
        user_id = _data(secret, "userId")
        tenant = _data(secret, "namespace")
        if key_hash is None or not _HASH.match(key_hash) or not user_id or not tenant:
            log.warning(
                "API key Secret %s ignored: needs keyHash (sha256:<hex>), userId, namespace", where
            )
            return None
        if not _DNS_LABEL.match(tenant):
            log.warning("API key Secret %s ignored: namespace is not a valid name", where)
            return None
        if self._settings.namespace is None and tenant != meta.get("namespace"):
            log.warning("API key Secret %s ignored: it may only grant its own namespace", where)
            return None
        return Identity(user_id=user_id, tenant=Tenant(tenant), key_hash=KeyHash(key_hash))

    def _relevant(self, secret: Mapping[str, Any]) -> bool:
        meta = secret.get("metadata") or {}
        if LABEL not in (meta.get("labels") or {}):
            return False
        return self._settings.namespace in (None, meta.get("namespace"))

    def reset(self, secrets_: Iterable[Mapping[str, Any]]) -> None:
        """Replace everything with a fresh list (a re-list after a watch gap)."""
        self._by_secret.clear()
        self._by_hash.clear()
        for secret in secrets_:
            self.apply(event="ADDED", obj=secret)

    def apply(self, *, event: str, obj: Mapping[str, Any]) -> None:
        """Apply one watch event (ADDED, MODIFIED, DELETED)."""
        meta = obj.get("metadata") or {}
        ref = (str(meta.get("namespace")), str(meta.get("name")))
        old = self._by_secret.pop(ref, None)
        if old is not None and self._by_hash.get(old.key_hash) == old:
            del self._by_hash[old.key_hash]
        if event == "DELETED" or not self._relevant(obj):
            return
        identity = self._parse(obj)
        if identity is not None:
            self._by_secret[ref] = identity
            self._by_hash[identity.key_hash] = identity

    def lookup(self, key: str) -> Identity:
        """The identity of an API key, or :class:`errors.Unauthenticated`."""
        identity = self._by_hash.get(hash_key(key))
        if identity is None:
            raise errors.Unauthenticated("unknown API key")
        return identity

    def valid(self, identity: Identity) -> bool:
        """Whether the key behind ``identity`` still grants the same thing."""
        return self._by_hash.get(identity.key_hash) == identity

    def __len__(self) -> int:
        return len(self._by_hash)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SessionSettings:
    """How login sessions behave."""

    ttl_seconds: float = 3600.0
    """How long a session lives after login, in seconds (default one hour, a working
    session of a script; a client logs in again when it gets an unauthenticated fault)."""
    max_per_key: int = 64
    """Most live sessions per API key (default 64); the oldest goes first, so a client
    that logs in per call cannot grow the table without bound."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Session:
    identity: Identity
    expires: float


class Sessions:
    """Login sessions, in memory, keyed by the hash of the token."""

    def __init__(
        self,
        *,
        keyring: KeyRing,
        settings: SessionSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keyring = keyring
        self._settings = settings
        self._clock = clock
        self._sessions: dict[str, _Session] = {}
        self._per_key: dict[KeyHash, collections.deque[str]] = {}

    @staticmethod
    def _token_id(token: str) -> str:
        # Keyed by a hash so that dict lookups leak nothing useful about live tokens.
        return hashlib.sha256(token.encode("utf-8")).hexdigest()

    def login(self, apikey: str) -> str:
        """A new session for a valid key, or :class:`errors.Unauthenticated`."""
        identity = self._keyring.lookup(apikey)
        now = self._clock()
        token = secrets.token_urlsafe(32)
        token_id = self._token_id(token)
        self._sessions[token_id] = _Session(
            identity=identity, expires=now + self._settings.ttl_seconds
        )
        queue = self._per_key.setdefault(identity.key_hash, collections.deque())
        queue.append(token_id)
        while queue and (len(queue) > self._settings.max_per_key or self._expired(queue[0], now)):
            self._sessions.pop(queue.popleft(), None)
        return token

    def _expired(self, token_id: str, now: float) -> bool:
        session = self._sessions.get(token_id)
        return session is None or session.expires <= now

    def resolve(self, token: str) -> Identity:
        """The caller behind a session, or :class:`errors.Unauthenticated`."""
        token_id = self._token_id(token)
        session = self._sessions.get(token_id)
        if session is None:
            raise errors.Unauthenticated("unknown session; log in again")
        if session.expires <= self._clock():
            self._sessions.pop(token_id, None)
            raise errors.Unauthenticated("session expired; log in again")
        if not self._keyring.valid(session.identity):
            self._sessions.pop(token_id, None)
            raise errors.Unauthenticated("the API key of this session was revoked")
        return session.identity

    def __len__(self) -> int:
        return len(self._sessions)
