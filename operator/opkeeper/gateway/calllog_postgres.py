"""The PostgreSQL call log store: one database shared by several gateway replicas.

Gapless per-tenant serials across processes come from a counter row per tenant
that the inserting transaction upserts: the upsert locks the row until commit,
so another replica's append for that tenant waits and takes the next serial
only once this one is visible (commit order = serial order per tenant). An
aborted transaction rolls its counter update back with its rows: no hole.
Counter rows are taken in tenant order, so two groups never deadlock.

Appends are group-committed by one writer task per process (as in the SQLite
store). When PostgreSQL is unreachable, entries stay in a bounded in-memory
buffer and the writer retries with backoff; the caller gets
:class:`calllog.Deferred` after at most ``append_wait_seconds`` (at once while
the store is known down), so a call is answered during an outage and its
entry is written, in order, when the store is back. Every entry carries a
random id (unique index), so a group whose commit answer was lost is not
written twice on retry. Reads that cannot reach the store raise
:class:`errors.Unavailable` (a "temporarily unavailable" fault).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import itertools
import logging
import urllib.parse
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg

from opkeeper import errors
from opkeeper.gateway import calllog

log = logging.getLogger(__name__)

SCHEMES = ("postgresql", "postgres")
"""URL schemes of a ``--call-log`` value that names a PostgreSQL database."""

_SCHEMA_LOCK = 0x6F706B_01
"""Advisory lock key held while creating the schema (replicas starting together)."""
_PURGE_LOCK = 0x6F706B_02
"""Advisory lock key of a purge round: one replica purges, the others skip."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS opkeeper_calls (
    tenant text NOT NULL,
    serial bigint NOT NULL,
    ts timestamptz NOT NULL,
    method text NOT NULL,
    args text NOT NULL,
    result text NOT NULL,
    exception text NOT NULL,
    address text NOT NULL,
    "user" text NOT NULL DEFAULT '',
    entry_id uuid NOT NULL,
    PRIMARY KEY (tenant, serial)
);
CREATE INDEX IF NOT EXISTS opkeeper_calls_ts ON opkeeper_calls (ts);
CREATE UNIQUE INDEX IF NOT EXISTS opkeeper_calls_entry ON opkeeper_calls (entry_id);
CREATE TABLE IF NOT EXISTS opkeeper_call_serials (
    tenant text PRIMARY KEY,
    last bigint NOT NULL
);
"""

_TAKE_SERIALS = """
INSERT INTO opkeeper_call_serials AS s (tenant, last)
SELECT t, n FROM unnest($1::text[], $2::bigint[]) AS u(t, n) ORDER BY t
ON CONFLICT (tenant) DO UPDATE SET last = s.last + excluded.last
RETURNING tenant, last
"""
"""Reserves n serials for each tenant (counter rows locked in tenant order until
commit); returns each tenant's last reserved serial."""
_INSERT = """
INSERT INTO opkeeper_calls
    (tenant, serial, ts, method, args, result, exception, address, "user", entry_id)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::timestamptz[], $4::text[], $5::text[],
                     $6::text[], $7::text[], $8::text[], $9::text[], $10::uuid[])
"""
_APPEND = """
WITH
  rows AS (
    SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::text[],
                         $6::text[], $7::text[], $8::text[], $9::uuid[])
      WITH ORDINALITY AS u(tenant, ts, method, args, result, exception, address, usr, id, ord)
  ),
  wanted AS (SELECT tenant, count(*) AS n FROM rows GROUP BY tenant),
  taken AS (
    INSERT INTO opkeeper_call_serials AS s (tenant, last)
    SELECT tenant, n FROM wanted ORDER BY tenant
    ON CONFLICT (tenant) DO UPDATE SET last = s.last + excluded.last
    RETURNING tenant, last
  )
INSERT INTO opkeeper_calls
    (tenant, serial, ts, method, args, result, exception, address, "user", entry_id)
SELECT rows.tenant,
       taken.last - wanted.n + row_number() OVER (PARTITION BY rows.tenant ORDER BY rows.ord),
       ts, method, args, result, exception, address, usr, id
FROM rows JOIN wanted USING (tenant) JOIN taken USING (tenant)
RETURNING entry_id, serial
"""
"""A fresh group in one statement, so one round trip (its own transaction): the same
counter upsert (rows locked in tenant order until commit) and numbered insert as
:data:`_TAKE_SERIALS` + :data:`_INSERT`, which a retried group uses."""
_ALREADY = "SELECT entry_id, serial FROM opkeeper_calls WHERE entry_id = ANY($1::uuid[])"
"""Which entries of a retried group a lost commit did store."""
_COLUMNS = 'serial, ts, method, args, result, exception, address, "user"'
_SINCE = (
    f"SELECT {_COLUMNS} FROM opkeeper_calls WHERE tenant = $1 AND serial > $2"
    " ORDER BY serial LIMIT $3"
)
_LATEST = f"SELECT {_COLUMNS} FROM opkeeper_calls WHERE tenant = $1 ORDER BY serial DESC LIMIT $2"
_PURGE_ROUND = """
DELETE FROM opkeeper_calls WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM opkeeper_calls WHERE ts < $1 LIMIT $2))
"""

_TRANSIENT = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # A connection left in a state asyncpg cannot go on from (a shutdown notice that
    # arrived while it was idle): the connection is dropped and the write retried.
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.exceptions.TooManyConnectionsError,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PostgresSettings:
    """Where the shared call log lives and how the gateway rides out its outages."""

    dsn: str
    """``postgresql://user:password@host:port/db`` (or ``?host=/socket/dir``); give it
    through the environment from a Secret, never on a command line others can read."""
    pool_min: int = 1
    """Connections kept open (default 1)."""
    pool_max: int = 4
    """Most connections per gateway process (default 4): one writer, the rest for reads
    and the purge."""
    batch_max: int = 512
    """Most appends committed in one transaction (default 512)."""
    append_wait_seconds: float = 2.0
    """Longest an append waits for its commit before the entry is left to the buffer and
    the caller gets :class:`calllog.Deferred` (default 2 s): bounds a call's extra
    latency when the store stops answering."""
    buffer_max_bytes: int = 32 * 1024 * 1024
    """Most bytes of entries buffered while the store is unreachable (default 32 MiB,
    thousands of entries); an entry beyond it is dropped (:class:`calllog.Unstored`)."""
    connect_timeout_seconds: float = 5.0
    """Longest a new connection may take (default 5 s)."""
    command_timeout_seconds: float = 10.0
    """Longest one statement may take (default 10 s)."""
    retry_min_seconds: float = 0.05
    """First wait before a failed group is retried (default 50 ms); doubles per failure."""
    retry_max_seconds: float = 1.0
    """Longest wait between retries (default 1 s): how late the log catches up after
    the store is back."""
    close_timeout_seconds: float = 10.0
    """On close, how long buffered entries may take to be written (default 10 s)."""
    purge_round_max: int = 10_000
    """Most rows one purge transaction deletes (default 10,000), so a purge never holds
    a long transaction."""


def shown(dsn: str) -> str:
    """``dsn`` as it may be logged: any password (in the URL or a ``password``
    parameter) replaced by ``***``."""
    parts = urllib.parse.urlsplit(dsn)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    netloc = f"{user}:***@{hostport}" if at and colon else parts.netloc
    query = "&".join(
        f"{k}=***" if k.lower() in ("password", "sslpassword") else f"{k}={v}" if sep else k
        for k, sep, v in (pair.partition("=") for pair in parts.query.split("&") if pair)
    )
    return (
        f"{parts.scheme}://{netloc}{parts.path}"
        + (f"?{query}" if query else "")
        + (f"#{parts.fragment}" if parts.fragment else "")
    )


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` means "the store is unreachable or busy right now" (retry it),
    as opposed to an entry or statement PostgreSQL rejects (retrying cannot help)."""
    return isinstance(exc, _TRANSIENT)


def retry_delay(*, failures: int, settings: PostgresSettings) -> float:
    """How long to wait after ``failures`` failed attempts in a row (1 = the first)."""
    exponent = min(max(failures - 1, 0), 30)
    return float(min(settings.retry_max_seconds, settings.retry_min_seconds * 2**exponent))


@dataclasses.dataclass(kw_only=True)
class _Pending:
    """One append waiting for its commit."""

    entry_id: uuid.UUID
    tenant: str
    when: datetime.datetime
    method: str
    args_json: str
    result_json: str
    exception: str
    address: str
    user: str
    done: asyncio.Future[calllog.Serial]
    size: int
    retried: bool = False
    """A write of this entry failed before: its commit may have happened anyway."""


class PostgresCallLog(calllog.CallLog):
    """The shared store: PostgreSQL through an asyncpg pool, group-committed by one
    writer task per process, buffering while the database is unreachable."""

    def __init__(self, *, settings: PostgresSettings) -> None:
        self._settings = settings
        self._pool: Any = None
        self._conn: Any = None
        """The writer's connection, held between groups."""
        self._pending: collections.deque[_Pending] = collections.deque()
        self._buffered_bytes = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        """Set while nothing is buffered (close() waits for it)."""
        self._idle.set()
        self._writer: asyncio.Task[None] | None = None
        self._accepting = False
        self._down = False
        """Set while the last write failed for want of the store: appends do not wait."""
        self._stalled = False
        """Set while a write has taken longer than ``append_wait_seconds``: appends do
        not wait either (one timer per group, not one per append: logging stays cheap)."""
        self._writing: list[_Pending] = []
        """The group being written."""

    @property
    def buffered(self) -> int:
        """Entries appended but not yet committed."""
        return len(self._pending)

    @property
    def down(self) -> bool:
        """Whether the last write attempt could not reach the store."""
        return self._down

    async def open(self) -> None:
        """Connect, create the schema if needed; appends are accepted from now on."""
        settings = self._settings
        self._pool = await asyncpg.create_pool(
            dsn=settings.dsn,
            min_size=settings.pool_min,
            max_size=settings.pool_max,
            timeout=settings.connect_timeout_seconds,
            command_timeout=settings.command_timeout_seconds,
        )
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                # Replicas starting together: one creates, the others then see it made.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
                await conn.execute(_SCHEMA)
        except BaseException:
            await self._pool.close()
            raise
        self._accepting = True
        self._writer = asyncio.create_task(self._write_forever(), name="calllog-pg-writer")
        self._writer.add_done_callback(self._writer_ended)

    def _writer_ended(self, writer: asyncio.Task[None]) -> None:
        """A writer that died of a bug must not leave appends waiting forever: the store
        stops accepting (callers count a failure) and what was queued is failed."""
        if writer.cancelled() or writer.exception() is None:
            return
        log.error("the call log writer died", exc_info=writer.exception())
        self._accepting = False
        queued = list(self._pending)
        self._pending.clear()
        self._settle(queued, error=calllog.Unstored("the call log writer died"))
        self._idle.set()

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
    ) -> calllog.Serial:
        if not self._accepting:
            raise RuntimeError("PostgresCallLog is not open")
        size = len(args_json) + len(result_json) + len(exception) + len(method) + 200
        if self._buffered_bytes + size > self._settings.buffer_max_bytes:
            raise calllog.Unstored(
                f"call log store unreachable and {len(self._pending)} entries buffered"
            )
        pending = _Pending(
            entry_id=uuid.uuid4(),
            tenant=tenant,
            when=when,
            method=method,
            args_json=args_json,
            result_json=result_json,
            exception=exception,
            address=address,
            user=user,
            done=asyncio.get_running_loop().create_future(),
            size=size,
        )
        self._pending.append(pending)
        self._buffered_bytes += size
        self._idle.clear()
        self._wake.set()
        if self._down or self._stalled:
            self._defer(pending)
        return await pending.done

    @staticmethod
    def _defer(pending: _Pending) -> None:
        """Tell the caller the entry is left to the buffer (it stays queued)."""
        if not pending.done.done():
            pending.done.set_exception(
                calllog.Deferred("call log store unreachable; the entry is written when it is back")
            )

    async def _write_forever(self) -> None:
        failures = 0
        while True:
            while not self._pending:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
            count = min(len(self._pending), self._settings.batch_max)
            group = [self._pending.popleft() for _ in range(count)]
            self._writing = group
            watchdog = asyncio.get_running_loop().call_later(
                self._settings.append_wait_seconds, self._stall
            )
            try:
                serials = await self._write(group)
            except Exception as exc:
                if not is_transient(exc):
                    self._settle(group, error=exc)
                    continue
                failures += 1
                if not self._down:
                    log.warning(
                        "call log store unreachable (%s: %s); buffering entries",
                        type(exc).__name__,
                        exc,
                    )
                self._down = True
                for pending in group:
                    pending.retried = True
                self._pending.extendleft(reversed(group))  # first again: serial order kept
                for pending in self._pending:  # nobody waits for the store to come back
                    self._defer(pending)
                await asyncio.sleep(retry_delay(failures=failures, settings=self._settings))
                continue
            except BaseException:  # cancelled by close(), or a bug: nobody left waiting
                self._settle(group, error=calllog.Unstored("the call log writer stopped"))
                raise
            finally:
                watchdog.cancel()
                self._writing = []
            if self._down:
                log.info(
                    "call log store reachable again; writing %d buffered entries",
                    len(self._pending) + len(group),
                )
            failures = 0
            self._down = self._stalled = False
            self._settle(group, serials=serials)

    def _stall(self) -> None:
        """A write is taking too long: its callers and those queued behind it are told
        their entries are deferred (they stay queued), and new appends do not wait."""
        self._stalled = True
        for pending in itertools.chain(self._writing, self._pending):
            self._defer(pending)

    def _settle(
        self,
        group: list[_Pending],
        *,
        serials: Sequence[calllog.Serial] = (),
        error: BaseException | None = None,
    ) -> None:
        for n, pending in enumerate(group):
            self._buffered_bytes -= pending.size
            if not pending.done.done():
                if error is not None:
                    pending.done.set_exception(error)
                else:
                    pending.done.set_result(serials[n])
            elif error is not None:  # its caller was told "deferred": say it is lost
                log.error("a deferred call log entry could not be stored: %s", error)

    async def _write(self, group: list[_Pending]) -> list[calllog.Serial]:
        """Store ``group`` on the writer's connection (kept between groups: no pool
        round trip per group); a failed connection is given back and a new one taken
        at the next attempt."""
        if self._conn is None:
            self._conn = await self._pool.acquire()
        try:
            if any(p.retried for p in group):
                return await self._write_retried(self._conn, group)
            rows = await self._conn.fetch(
                _APPEND,
                [p.tenant for p in group],
                *_fields(group),
                [p.entry_id for p in group],
            )
        except Exception:
            await self._drop_connection()
            raise
        stored = {row[0]: int(row[1]) for row in rows}
        return [calllog.Serial(stored[p.entry_id]) for p in group]

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()  # a broken or unknown state: never reused
            with contextlib.suppress(Exception):
                await self._pool.release(conn)

    async def _write_retried(self, conn: Any, group: list[_Pending]) -> list[calllog.Serial]:
        """A group a failed attempt may have stored (its commit answer lost): what is
        already there keeps its serial, the rest is numbered and inserted."""
        async with conn.transaction():
            rows = await conn.fetch(_ALREADY, [p.entry_id for p in group])
            stored: dict[uuid.UUID, int] = {row[0]: int(row[1]) for row in rows}
            todo = [p for p in group if p.entry_id not in stored]
            wanted = collections.Counter(p.tenant for p in todo)
            if wanted:
                tenants = sorted(wanted)
                rows = await conn.fetch(_TAKE_SERIALS, tenants, [wanted[t] for t in tenants])
                following = {
                    str(row[0]): itertools.count(int(row[1]) - wanted[str(row[0])] + 1)
                    for row in rows
                }
                for p in todo:
                    stored[p.entry_id] = next(following[p.tenant])
                await conn.execute(
                    _INSERT,
                    [p.tenant for p in todo],
                    [stored[p.entry_id] for p in todo],
                    *_fields(todo),
                    [p.entry_id for p in todo],
                )
        return [calllog.Serial(stored[p.entry_id]) for p in group]

    async def since(self, *, tenant: str, serial: int, limit: int) -> list[calllog.Entry]:
        return await self._read(_SINCE, tenant, serial, limit, reverse=False)

    async def latest(self, *, tenant: str, n: int) -> list[calllog.Entry]:
        return await self._read(_LATEST, tenant, n, reverse=True)

    async def _read(self, sql: str, *args: object, reverse: bool) -> list[calllog.Entry]:
        # Twice at most: after a restart of the store the pool's first connection is a
        # dead one, which the second attempt replaces.
        for attempt in range(2):
            try:
                entries = await self._read_once(sql, args)
                return entries[::-1] if reverse else entries
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if attempt:
                    raise errors.Unavailable(
                        "the call log store is unreachable right now; retry later"
                    ) from exc
        raise AssertionError("unreachable")

    async def _read_once(self, sql: str, args: Sequence[object]) -> list[calllog.Entry]:
        async with self._pool.acquire() as conn, conn.transaction(readonly=True):
            # A cursor, so a page stops fetching once it holds PAGE_MAX_BYTES.
            entries: list[calllog.Entry] = []
            size = 0
            async for row in conn.cursor(sql, *args, prefetch=64):
                entry = calllog.Entry(
                    serial=calllog.Serial(int(row[0])),
                    timestamp=row[1],
                    method=row[2],
                    args_json=row[3],
                    result_json=row[4],
                    exception=row[5],
                    address=row[6],
                    user=row[7],
                )
                size += calllog.entry_size(entry)
                if entries and size > calllog.PAGE_MAX_BYTES:
                    break
                entries.append(entry)
            return entries

    async def purge(self, *, older_than: datetime.datetime) -> int:
        """Delete old entries in rounds; a replica finding another one purging skips
        (the counter table is kept: serials never restart)."""
        removed = 0
        while True:
            async with self._pool.acquire() as conn, conn.transaction():
                if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _PURGE_LOCK):
                    return removed
                status = await conn.execute(
                    _PURGE_ROUND, older_than, self._settings.purge_round_max
                )
            deleted = int(str(status).rsplit(" ", 1)[-1])
            removed += deleted
            if deleted < self._settings.purge_round_max:
                return removed

    async def close(self) -> None:
        self._accepting = False
        if self._writer is not None:
            try:
                await asyncio.wait_for(self._idle.wait(), self._settings.close_timeout_seconds)
            except TimeoutError:
                log.error("call log store unreachable at close: %d entries lost", self.buffered)
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
            self._writer = None
            lost = list(self._pending)
            self._pending.clear()
            self._settle(lost, error=calllog.Unstored("the gateway stopped first"))
        await self._drop_connection()
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), self._settings.close_timeout_seconds)
            except TimeoutError:
                self._pool.terminate()
            self._pool = None


def _fields(group: list[_Pending]) -> list[list[Any]]:
    """The entries' logged fields as one array per column, in the statements' order."""
    return [
        [p.when for p in group],
        [p.method for p in group],
        [p.args_json for p in group],
        [p.result_json for p in group],
        [p.exception for p in group],
        [p.address for p in group],
        [p.user for p in group],
    ]
