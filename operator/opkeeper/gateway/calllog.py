"""The gocept call log: every call of a tenant, numbered without gaps, kept 30 days.

``log(serial)`` promises a client that walking serials upwards never skips
an entry. That needs two things from a store: serials allocated per tenant
inside the same transaction that inserts the entry, and commits that become
visible in serial order. This module is what every store shares: the
:class:`CallLog` interface the gateway uses, the rules applied before any
store sees an entry (byte caps, redaction of secret-looking names) and the
page bound of reads. The stores are :mod:`.calllog_sqlite` (the embedded
default, one file) and :mod:`.calllog_postgres` (several gateway replicas);
:mod:`.calllogs` picks one from the ``--call-log`` value.
"""

from __future__ import annotations

import abc
import dataclasses
import datetime
import json
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any, NewType

log = logging.getLogger(__name__)

Serial = NewType("Serial", int)
"""A position in one tenant's log, 1, 2, 3, ... with no gaps."""

RETENTION = datetime.timedelta(days=30)
"""How long entries are kept (the gocept promise)."""

JSON_FIELD_MAX = 8 * 1024
"""Most characters kept of an entry's ``args`` or ``result`` JSON (default 8 KiB);
a longer one is stored as a marked cut (:func:`cap_json`), still valid JSON."""
TEXT_FIELD_MAX = 1024
"""Most characters kept of an entry's exception text, method and address."""
PAGE_MAX_BYTES = 1024 * 1024
"""Most bytes of entries one ``since`` or ``latest`` page returns (at least one entry),
so ``log()`` answers stay bounded whatever the page length."""
REDACTED = "<redacted>"
"""What a secret-looking parameter's value is stored as."""

_SECRET_WORDS = frozenset(
    {
        "apikey",
        "auth",
        "authcode",
        "authkey",
        "cookie",
        "credential",
        "credentials",
        "key",
        "otp",
        "passphrase",
        "passwd",
        "password",
        "pin",
        "privatekey",
        "pwd",
        "secret",
        "session",
        "signature",
        "token",
    }
)
_SECRET_PARTS = ("password", "passwd", "secret", "token", "apikey", "authcode", "privatekey")
_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")


def is_secret_name(name: str) -> bool:
    """Whether a parameter named ``name`` likely holds a secret: one of its words
    (split at ``_``, ``-``, ``.`` and camelCase) is a secret word (``auth_code``,
    ``password``, ``apiKey``, ``x-token``), or it contains one (``dbpassword``)."""
    if len(name) > 256:
        return True  # no real parameter has such a name: keep nothing of it
    words = [w.lower() for w in _WORD_SPLIT.split(name) if w]
    if any(w in _SECRET_WORDS for w in words) or "".join(words) in _SECRET_WORDS:
        return True
    flat = "".join(words)
    return any(part in flat for part in _SECRET_PARTS)


def redact(value: Any) -> Any:
    """``value`` with every struct member whose name looks secret replaced by
    :data:`REDACTED`, at any depth (args and results alike: details echo params)."""
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and is_secret_name(k) else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def cap_json(text: str, *, limit: int = JSON_FIELD_MAX) -> str:
    """``text`` (JSON) if it fits ``limit``, else a JSON object marking the cut:
    ``{"__cut__": {"length": N, "head": "<the first characters>"}}``."""
    if len(text) <= limit:
        return text
    head = text[: max(0, limit - 100)]
    return json.dumps({"__cut__": {"length": len(text), "head": head}}, separators=(",", ":"))


def clean(text: str) -> str:
    """``text`` as every store takes it: NUL characters (PostgreSQL's ``text`` refuses
    them) and lone surrogates (not UTF-8) replaced, which a client can smuggle into a
    method name or address: one hostile entry must never fail the group it is
    committed with."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def cap_text(text: str, *, limit: int = TEXT_FIELD_MAX) -> str:
    """``text`` cut to ``limit`` characters, marked when cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...(cut, {len(text)} characters)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Entry:
    """One logged call."""

    serial: Serial
    timestamp: datetime.datetime
    """When the call was logged (aware, UTC)."""
    method: str
    args_json: str
    """The call's arguments as JSON, credentials already redacted."""
    result_json: str
    """The result as JSON; `null` when the call failed."""
    exception: str
    """The fault string when the call failed; empty otherwise."""
    address: str
    """The caller's IP address."""
    user: str = ""
    """Who called: the API key's user, or the Kubernetes user of an aggregated API call."""


class CallLog(abc.ABC):
    """Where the gateway keeps the call log; every method is safe to call concurrently."""

    async def append(
        self,
        *,
        tenant: str,
        method: str,
        args_json: str,
        result_json: str,
        exception: str = "",
        address: str = "",
        when: datetime.datetime | None = None,
        user: str = "",
    ) -> Serial:
        """Log one call; returns its serial once the entry is durable and visible.

        Every field is capped and cleaned here, whatever the store, so no caller can
        make an entry larger than a few KiB or one a store refuses. A store that
        cannot write now may raise :class:`Deferred` (kept, written later) or
        :class:`Unstored` (dropped); either way the call itself is answered as usual.
        """
        return await self._append(
            tenant=tenant,
            method=clean(cap_text(method, limit=128)),
            args_json=clean(cap_json(args_json)),
            result_json=clean(cap_json(result_json)),
            exception=clean(cap_text(exception)),
            address=clean(cap_text(address, limit=64)),
            when=when or datetime.datetime.now(datetime.UTC),
            user=clean(cap_text(user, limit=256)),
        )

    async def record(
        self,
        *,
        on_failure: Callable[[], None],
        tenant: str,
        method: str,
        args_json: str,
        result_json: str,
        exception: str = "",
        address: str = "",
        when: datetime.datetime | None = None,
        user: str = "",
    ) -> None:
        """:meth:`append` for a dialect answering a call: a store failure never changes
        the answer (the call already happened, and a client told otherwise would retry
        it: a second create). Every failure is counted (``on_failure``); a
        :class:`Deferred` entry is not logged again (the store logs its outage once)."""
        try:
            await self.append(
                tenant=tenant,
                method=method,
                args_json=args_json,
                result_json=result_json,
                exception=exception,
                address=address,
                when=when,
                user=user,
            )
        except Deferred:
            on_failure()
        except Exception:
            on_failure()
            log.exception("call log write failed for %s %s", tenant, method)

    @abc.abstractmethod
    async def _append(
        self,
        *,
        tenant: str,
        method: str,
        args_json: str,
        result_json: str,
        exception: str,
        address: str,
        when: datetime.datetime,
        user: str,
    ) -> Serial:
        """Store one entry whose fields are already capped."""

    @abc.abstractmethod
    async def since(self, *, tenant: str, serial: int, limit: int) -> list[Entry]:
        """Entries with a serial above ``serial``, oldest first, at most ``limit``."""

    @abc.abstractmethod
    async def latest(self, *, tenant: str, n: int) -> list[Entry]:
        """The newest ``n`` entries, oldest first."""

    @abc.abstractmethod
    async def purge(self, *, older_than: datetime.datetime) -> int:
        """Delete entries logged before ``older_than``; returns how many went."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish pending appends and release connections."""


class Deferred(Exception):
    """The entry is buffered, not yet stored: the store is unreachable right now and
    writes it (with its serial) once it is back. The call itself happened; callers
    count this like any store failure and answer the call as usual."""


class Unstored(Exception):
    """The entry was dropped: the store is unreachable and its buffer is full."""


def entry_size(entry: Entry) -> int:
    """What an entry counts against :data:`PAGE_MAX_BYTES` (its JSON and text, plus a
    fixed allowance for the other fields and the XML-RPC struct around them)."""
    return len(entry.args_json) + len(entry.result_json) + len(entry.exception) + 200


def page(entries: Iterable[Entry]) -> list[Entry]:
    """The leading ``entries`` that fit :data:`PAGE_MAX_BYTES`, at least one; stops
    consuming ``entries`` at the first that does not fit (the client continues from
    the last serial it got)."""
    kept: list[Entry] = []
    size = 0
    for entry in entries:
        size += entry_size(entry)
        if kept and size > PAGE_MAX_BYTES:
            break
        kept.append(entry)
    return kept
