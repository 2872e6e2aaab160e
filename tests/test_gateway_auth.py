"""API keys from Secrets and login sessions."""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any

import pytest

from opkeeper import errors
from opkeeper.gateway import auth


def secret(
    *,
    key: str,
    name: str = "k1",
    namespace: str = "opkeeper-system",
    user: str = "alice",
    tenant: str = "team-a",
    labelled: bool = True,
) -> dict[str, Any]:
    """A Secret as the API server returns it (stringData turned into base64 data)."""
    manifest = auth.key_secret(name=name, namespace=namespace, key=key, user_id=user, tenant=tenant)
    data = {k: base64.b64encode(v.encode()).decode() for k, v in manifest["stringData"].items()}
    meta = dict(manifest["metadata"])
    if not labelled:
        meta["labels"] = {}
    return {"metadata": meta, "data": data}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


SIGNING_KEY = auth.FixedKey(value=b"k" * 32)


class Sync:
    """:class:`auth.Sessions` driven from synchronous tests."""

    def __init__(self, sessions: auth.Sessions) -> None:
        self.sessions = sessions

    def login(self, apikey: str, *, user_id: str | None = None) -> str:
        return asyncio.run(self.sessions.login(apikey, user_id=user_id))

    def resolve(self, token: str) -> auth.Identity:
        return asyncio.run(self.sessions.resolve(token))


def make(
    key: str,
    *,
    namespace: str | None = "opkeeper-system",
    signing_key: auth.SigningKey = SIGNING_KEY,
    **kw: Any,
) -> tuple[auth.KeyRing, Sync, Clock]:
    ring = auth.KeyRing(settings=auth.KeyRingSettings(namespace=namespace))
    ring.apply(event="ADDED", obj=secret(key=key, **kw))
    clock = Clock()
    sessions = auth.Sessions(
        keyring=ring,
        settings=auth.SessionSettings(ttl_seconds=60),
        signing_key=signing_key,
        clock=clock,
    )
    return ring, Sync(sessions), clock


def test_the_secret_stores_a_hash_not_the_key() -> None:
    key = auth.new_key()
    manifest = auth.key_secret(name="k", namespace="ns", key=key, user_id="u", tenant="t")
    assert key not in repr(manifest)
    assert manifest["stringData"]["keyHash"] == auth.hash_key(key)
    assert manifest["metadata"]["labels"][auth.LABEL]


def test_keys_are_random_and_long() -> None:
    keys = {auth.new_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(len(k) > 40 for k in keys)


def test_login_and_resolve() -> None:
    key = auth.new_key()
    _, sessions, _ = make(key)
    token = sessions.login(key)
    assert key not in token
    who = sessions.resolve(token)
    assert (who.user_id, who.tenant) == ("alice", "team-a")


def test_gandi_login_with_user_and_key() -> None:
    """Gandi API v1's login(login, password): the key must be the named user's, and a
    wrong user is answered exactly like a wrong key."""
    key = auth.new_key()
    _, sessions, _ = make(key)
    assert sessions.resolve(sessions.login(key, user_id="alice")).user_id == "alice"
    with pytest.raises(errors.Unauthenticated, match=r"^unknown API key$"):
        sessions.login(key, user_id="bob")
    with pytest.raises(errors.Unauthenticated, match=r"^unknown API key$"):
        sessions.login("opk_wrong", user_id="alice")


def test_sessions_last_twelve_hours_by_default() -> None:
    assert auth.SessionSettings().ttl_seconds == 12 * 3600


def test_unknown_key_and_session() -> None:
    _, sessions, _ = make(auth.new_key())
    with pytest.raises(errors.Unauthenticated, match="unknown API key"):
        sessions.login("opk_wrong")
    with pytest.raises(errors.Unauthenticated, match="unknown session"):
        sessions.resolve("nope")


def test_sessions_expire() -> None:
    key = auth.new_key()
    _, sessions, clock = make(key)
    token = sessions.login(key)
    clock.now += 59
    sessions.resolve(token)
    clock.now += 1
    with pytest.raises(errors.Unauthenticated, match="expired"):
        sessions.resolve(token)


def test_deleting_or_rotating_the_key_kills_its_sessions() -> None:
    key = auth.new_key()
    ring, sessions, _ = make(key)
    token = sessions.login(key)
    rotated = auth.new_key()
    ring.apply(event="MODIFIED", obj=secret(key=rotated))
    with pytest.raises(errors.Unauthenticated, match="revoked"):
        sessions.resolve(token)
    with pytest.raises(errors.Unauthenticated):
        sessions.login(key)
    token = sessions.login(rotated)
    ring.apply(event="DELETED", obj=secret(key=rotated))
    with pytest.raises(errors.Unauthenticated, match="revoked"):
        sessions.resolve(token)


def test_a_session_works_on_every_gateway_sharing_the_signing_key() -> None:
    key = auth.new_key()
    _, here, _ = make(key)
    _, there, _ = make(key)
    token = here.login(key)
    assert there.resolve(token).tenant == "team-a"
    _, stranger, _ = make(key, signing_key=auth.FixedKey(value=b"x" * 32))
    with pytest.raises(errors.Unauthenticated, match="unknown session"):
        stranger.resolve(token)


def test_tampered_or_forged_sessions_are_unknown() -> None:
    key = auth.new_key()
    _, sessions, _ = make(key)
    token = sessions.login(key)
    payload, _, mac = token.partition(".")
    claims = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    other_tenant = claims.replace(b"team-a", b"team-b")
    forged = base64.urlsafe_b64encode(other_tenant).rstrip(b"=").decode()
    flipped = mac[:-2] + ("A" if mac[-2] != "A" else "B") + mac[-1]
    for bad in (f"{forged}.{mac}", f"{payload}.{flipped}", payload, f"{payload}.", "a.b.c", "é.é"):
        with pytest.raises(errors.Unauthenticated, match="unknown session"):
            sessions.resolve(bad)
    sessions.resolve(token)


def test_a_signing_key_that_changed_is_read_again_once() -> None:
    class Rotated:
        def __init__(self) -> None:
            self.current, self.reloads = b"old" * 11, 0

        async def key(self) -> bytes:
            return self.current

        async def reload(self) -> bytes | None:
            self.reloads += 1
            self.current = b"new" * 11
            return self.current

    key = auth.new_key()
    _, signer, _ = make(key, signing_key=auth.FixedKey(value=b"new" * 11))
    rotated = Rotated()
    _, checker, _ = make(key, signing_key=rotated)
    checker.resolve(signer.login(key))
    assert rotated.reloads == 1


def test_a_remembered_session_is_checked_again_under_a_new_signing_key() -> None:
    class Replaced:
        def __init__(self) -> None:
            self.current = b"old" * 11

        async def key(self) -> bytes:
            return self.current

        async def reload(self) -> bytes | None:
            return None

    key = auth.new_key()
    signing = Replaced()
    _, sessions, _ = make(key, signing_key=signing)
    token = sessions.login(key)
    sessions.resolve(token)  # verified once: remembered
    signing.current = b"new" * 11
    with pytest.raises(errors.Unauthenticated, match="unknown session"):
        sessions.resolve(token)


def test_only_verified_tokens_are_remembered_and_their_number_is_bounded() -> None:
    key = auth.new_key()
    _, sessions, _ = make(key)
    for n in range(100):
        with pytest.raises(errors.Unauthenticated):
            sessions.resolve(f"forged{n}.mac")
    tokens = [sessions.login(key) for _ in range(auth.VERIFIED_KEPT + 10)]
    for token in tokens:
        sessions.resolve(token)
    kept = sessions.sessions._verified
    assert len(kept) == auth.VERIFIED_KEPT
    assert tokens[-1] in kept
    assert tokens[0] not in kept
    assert sessions.resolve(tokens[0]).tenant == "team-a"  # forgotten, not refused


def test_only_the_key_namespace_counts() -> None:
    key = auth.new_key()
    ring = auth.KeyRing(settings=auth.KeyRingSettings(namespace="opkeeper-system"))
    ring.apply(event="ADDED", obj=secret(key=key, namespace="team-a"))
    ring.apply(event="ADDED", obj=secret(key=key, name="unlabelled", labelled=False))
    with pytest.raises(errors.Unauthenticated):
        ring.lookup(key)


def test_cluster_wide_keys_grant_only_their_own_namespace() -> None:
    key = auth.new_key()
    ring = auth.KeyRing(settings=auth.KeyRingSettings(namespace=None))
    ring.apply(event="ADDED", obj=secret(key=key, namespace="team-b", tenant="team-a"))
    with pytest.raises(errors.Unauthenticated):
        ring.lookup(key)
    ring.apply(event="ADDED", obj=secret(key=key, namespace="team-a", tenant="team-a"))
    assert ring.lookup(key).tenant == "team-a"


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"keyHash": "plain-text-key", "userId": "u", "namespace": "t"},
        {"keyHash": "sha256:" + "0" * 64, "userId": "", "namespace": "t"},
        {"keyHash": "sha256:" + "0" * 64, "userId": "u", "namespace": "Not_A_Name"},
    ],
)
def test_malformed_secrets_are_ignored(data: dict[str, str]) -> None:
    ring = auth.KeyRing(settings=auth.KeyRingSettings())
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    ring.apply(
        event="ADDED",
        obj={
            "metadata": {"name": "x", "namespace": "opkeeper-system", "labels": {auth.LABEL: "1"}},
            "data": encoded,
        },
    )
    assert len(ring) == 0


def test_reset_replaces_everything() -> None:
    old, new = auth.new_key(), auth.new_key()
    ring, _, _ = make(old)
    ring.reset([secret(key=new, name="k2")])
    with pytest.raises(errors.Unauthenticated):
        ring.lookup(old)
    assert ring.lookup(new).user_id == "alice"


def test_keys_never_reach_the_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    key = auth.new_key()
    ring, sessions, _ = make(key)
    token = sessions.login(key)
    ring.apply(event="ADDED", obj=secret(key=key, name="bad", tenant="Bad_Name"))
    with pytest.raises(errors.Unauthenticated):
        sessions.login(key + "x")
    assert key not in caplog.text
    assert token not in caplog.text
