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

Sessions are signed tokens, not server state: a token carries the key's
hash, the tenant, the user, an expiry and a random nonce, MACed with a key
that every gateway process and replica shares (:data:`SESSION_KEY_SECRET`,
an :class:`opkeeper.keys.KeyedSecret`). So a client may log in on one replica
and call another, and a restart loses nothing. A token is believed only
while its API key still grants the same thing, so deleting or rotating the
key Secret ends its sessions on every replica at once.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NewType, Protocol

from opkeeper import errors, names

log = logging.getLogger(__name__)

LABEL = "opkeeper.dev/api-key"
"""The label that marks a Secret as an API key (any value)."""
SESSION_KEY_SECRET = "opkeeper-session-key"
"""The Secret (system namespace) holding the key that signs session tokens."""

KeyHash = NewType("KeyHash", str)
Tenant = NewType("Tenant", str)
"""The one namespace a caller may see and change."""

_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")


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


def secret_field(secret: Mapping[str, Any], field: str) -> str | None:
    """A text field of a Secret as the API server returns it (base64), or None."""
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
        key_hash = secret_field(secret, "keyHash")
        user_id = secret_field(secret, "userId")
        tenant = secret_field(secret, "namespace")
        if key_hash is None or not _HASH.match(key_hash) or not user_id or not tenant:
            log.warning(
                "API key Secret %s ignored: needs keyHash (sha256:<hex>), userId, namespace", where
            )
            return None
        try:
            names.namespace(tenant)
        except names.InvalidName:
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

    def by_hash(self, key_hash: KeyHash) -> Identity | None:
        """The identity of a key known by its hash (CloudStack's apiKey), or None."""
        return self._by_hash.get(key_hash)

    def valid(self, identity: Identity) -> bool:
        """Whether the key behind ``identity`` still grants the same thing."""
        return self._by_hash.get(identity.key_hash) == identity

    def __len__(self) -> int:
        return len(self._by_hash)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SessionSettings:
    """How login sessions behave."""

    ttl_seconds: float = 12 * 3600.0
    """How long a session lives after login, in seconds (default 12 hours, what Gandi's
    API v1 promised its clients; a client logs in again when it gets an unauthenticated
    fault).
    Tokens are not stored, so there is no per-key cap on live sessions: the TTL is
    what bounds a token, and revoking its key is what ends it early."""


class SigningKey(Protocol):
    """Where the session MAC key comes from (:class:`opkeeper.keys.KeyedSecret`)."""

    async def key(self) -> bytes:
        """The key, loaded on first use."""

    async def reload(self) -> bytes | None:
        """The key read again after a failed check, or None if it is too soon to."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class FixedKey:
    """A key given up front, for processes without an API server (tests, benchmarks)."""

    value: bytes

    async def key(self) -> bytes:
        return self.value

    async def reload(self) -> bytes | None:
        return None


_UNKNOWN = "unknown session; log in again"

VERIFIED_KEPT = 4096
"""Valid session tokens each process remembers (the oldest goes first): a client's every
call carries its token, and checking the MAC and decoding it again cost about a tenth of
a cheap read. Only a token that verified is kept, so a flood of forged ones adds
nothing."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Session:
    """What a valid session token says."""

    identity: Identity
    expires: float
    """Wall-clock expiry (POSIX seconds)."""
    nonce: str
    """The token's random part: names this one session (XenAPI's logout revokes it)."""


class Sessions:
    """Login sessions as signed, expiring tokens (``<payload>.<mac>``, both base64url).

    The payload is JSON ``[key hash, tenant, user, expiry, nonce]``; the MAC is
    HMAC-SHA256 over the payload's base64 text. The expiry is wall-clock time
    because another process checks it.
    """

    def __init__(
        self,
        *,
        keyring: KeyRing,
        settings: SessionSettings,
        signing_key: SigningKey,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keyring = keyring
        self._settings = settings
        self._signing_key = signing_key
        self._clock = clock
        self._verified: dict[str, tuple[bytes, Session]] = {}
        """Tokens whose MAC checked out, with the key that checked them (a new signing
        key makes them unchecked again), oldest first."""

    async def login(self, apikey: str, *, user_id: str | None = None) -> str:
        """A new session for a valid key, or :class:`errors.Unauthenticated`; with
        ``user_id`` (Gandi's ``login(login, password)``) the key must be that user's."""
        identity = self._keyring.lookup(apikey)
        if user_id is not None and not hmac.compare_digest(
            user_id.encode("utf-8"), identity.user_id.encode("utf-8")
        ):
            # One answer for a wrong user and a wrong key: no probing which was wrong.
            raise errors.Unauthenticated("unknown API key")
        claims = [
            identity.key_hash,
            identity.tenant,
            identity.user_id,
            self._clock() + self._settings.ttl_seconds,
            secrets.token_urlsafe(12),
        ]
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{payload}.{_b64(_sign(await self._signing_key.key(), payload))}"

    async def resolve(self, token: str) -> Identity:
        """The caller behind a session, or :class:`errors.Unauthenticated`."""
        return (await self.verify(token)).identity

    async def verify(self, token: str) -> Session:
        """The session a token stands for (caller, expiry, nonce), or
        :class:`errors.Unauthenticated`."""
        key = await self._signing_key.key()
        kept = self._verified.get(token)
        if kept is not None and kept[0] == key:
            session = kept[1]
        else:
            session = await self._decode(token)
            if len(self._verified) >= VERIFIED_KEPT:
                del self._verified[next(iter(self._verified))]
            self._verified[token] = (await self._signing_key.key(), session)
        # Checked on every call, remembered or not: expiry and a revoked key end a session.
        if session.expires <= self._clock():
            raise errors.Unauthenticated("session expired; log in again")
        if not self._keyring.valid(session.identity):
            raise errors.Unauthenticated("the API key of this session was revoked")
        return session

    async def _decode(self, token: str) -> Session:
        payload, _, mac = token.partition(".")
        if not await self._signed(payload, mac):
            raise errors.Unauthenticated(_UNKNOWN)
        try:
            key_hash, tenant, user_id, expires, nonce = json.loads(_unb64(payload))
        except ValueError:
            # Signed by us yet unreadable: only a token format this version does not know.
            raise errors.Unauthenticated(_UNKNOWN) from None
        identity = Identity(user_id=user_id, tenant=Tenant(tenant), key_hash=KeyHash(key_hash))
        return Session(identity=identity, expires=float(expires), nonce=str(nonce))

    async def _signed(self, payload: str, mac: str) -> bool:
        try:
            given = _unb64(mac)
        except ValueError:  # binascii.Error, or characters outside ASCII
            return False
        if hmac.compare_digest(given, _sign(await self._signing_key.key(), payload)):
            return True
        # Another replica may have signed with a key created after this one read its own.
        fresh = await self._signing_key.reload()
        return fresh is not None and hmac.compare_digest(given, _sign(fresh, payload))


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(key: bytes, payload: str) -> bytes:
    return hmac.new(key, payload.encode("ascii", "replace"), hashlib.sha256).digest()
