"""The embedded call log store: one SQLite file on a volume (the default).

Several processes on one machine (``opkeeper gateway --workers N``) may share
the file: each takes SQLite's write lock (``BEGIN IMMEDIATE``, waiting up to
``busy_timeout_ms`` for another's) before it reads the tenant counter, so
serials stay gapless and commit in order across processes too. Replicas on
different machines use :mod:`.calllog_postgres` instead.

SQLite calls block, so they run in threads and the event loop never waits on
disk: one writer thread owns the write connection and commits appends in
groups (one transaction for everything that arrived while the previous group
was being written, which is what keeps a logged call cheap under load), and
one reader thread serves ``since`` and ``latest`` from a second connection,
which WAL lets read while the writer writes.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import datetime
import functools
import itertools
import os
import sqlite3
from collections.abc import Iterator

from opkeeper.gateway import calllog

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    tenant TEXT NOT NULL,
    serial INTEGER NOT NULL,
    ts REAL NOT NULL,
    method TEXT NOT NULL,
    args TEXT NOT NULL,
    result TEXT NOT NULL,
    exception TEXT NOT NULL,
    address TEXT NOT NULL,
    user TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (tenant, serial)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS calls_ts ON calls (ts);
CREATE TABLE IF NOT EXISTS serials (
    tenant TEXT PRIMARY KEY,
    last INTEGER NOT NULL
) WITHOUT ROWID;
"""

_TAKE_SERIALS = (
    "INSERT INTO serials (tenant, last) VALUES (?, ?)"
    " ON CONFLICT (tenant) DO UPDATE SET last = last + excluded.last RETURNING last"
)
"""Reserves the next n serials of a tenant (n is the second parameter); returns the last."""
_ADD_USER = "ALTER TABLE calls ADD COLUMN user TEXT NOT NULL DEFAULT ''"
"""Files made before the user column get it (their entries' user is empty)."""
_INSERT = (
    "INSERT INTO calls (tenant, serial, ts, method, args, result, exception, address, user)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_COLUMNS = "serial, ts, method, args, result, exception, address, user"

_Row = tuple[str, float, str, str, str, str, str, str]
"""tenant, ts, method, args, result, exception, address, user: one queued append."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SqliteSettings:
    """Where and how the embedded call log is kept."""

    path: str
    """The database file (on a persistent volume in a cluster); ``:memory:`` is not
    supported because the reader and writer need to share the file."""
    batch_max: int = 512
    """Most appends committed in one transaction (default 512): bounds how long one
    commit holds the writer while still amortising its cost under load."""
    busy_timeout_ms: int = 5000
    """How long a connection waits on a lock held by another one, in ms (default 5000):
    the workers of ``--workers`` share the file, and a group commit waits for another
    worker's instead of failing (a commit holds the lock for milliseconds)."""


class SqliteCallLog(calllog.CallLog):
    """The embedded store: SQLite in WAL mode, group-committed by one writer thread."""

    def __init__(self, *, settings: SqliteSettings) -> None:
        self._settings = settings
        # One thread each: a sqlite3 connection must stay on the thread that uses it,
        # and one writer is what makes serial order equal commit order.
        self._writer_pool = concurrent.futures.ThreadPoolExecutor(1, "calllog-writer")
        self._reader_pool = concurrent.futures.ThreadPoolExecutor(1, "calllog-reader")
        self._write_conn: sqlite3.Connection | None = None
        self._read_conn: sqlite3.Connection | None = None
        self._pending: collections.deque[tuple[_Row, asyncio.Future[calllog.Serial]]] = (
            collections.deque()
        )
        self._idle = asyncio.Event()
        """Set while no group is scheduled or being written (close() waits for it)."""
        self._idle.set()
        self._accepting = False

    async def open(self) -> None:
        """Create the schema if needed; appends are accepted from now on."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer_pool, self._open_writer)
        await loop.run_in_executor(self._reader_pool, self._open_reader)
        self._accepting = True

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._settings.path, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(self._settings.busy_timeout_ms)}")
        return conn

    def _open_writer(self) -> None:
        # Owner-only before SQLite opens it (its -wal and -shm files take the same mode):
        # the log holds every tenant's calls.
        if self._settings.path != ":memory:":
            os.close(os.open(self._settings.path, os.O_RDWR | os.O_CREAT, 0o600))
            os.chmod(self._settings.path, 0o600)
        conn = self._connect()
        conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode syncs at checkpoints, not per commit: a power cut can lose
        # the last commits but never corrupts the file or reorders serials.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.executescript(_SCHEMA)
        if "user" not in {row[1] for row in conn.execute("PRAGMA table_info(calls)")}:
            conn.execute(_ADD_USER)
        self._write_conn = conn

    def _open_reader(self) -> None:
        self._read_conn = self._connect()

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
            raise RuntimeError("SqliteCallLog is not open")
        ts = when.timestamp()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[calllog.Serial] = loop.create_future()
        self._pending.append(
            ((tenant, ts, method, args_json, result_json, exception, address, user), done)
        )
        if self._idle.is_set():
            # Written at the end of this loop iteration, not now: every call answered in
            # the same iteration joins the group.
            self._idle.clear()
            loop.call_soon(self._write_next_group)
        return await done

    def _write_next_group(self) -> None:
        """Hand what is pending (up to ``batch_max``) to the writer thread; the group
        after it starts when this one is committed."""
        if not self._pending:
            self._idle.set()
            return
        count = min(len(self._pending), self._settings.batch_max)
        group = [self._pending.popleft() for _ in range(count)]
        writing = asyncio.get_running_loop().run_in_executor(
            self._writer_pool, self._write_batch, [row for row, _ in group]
        )
        writing.add_done_callback(functools.partial(self._written, group))

    def _written(
        self,
        group: list[tuple[_Row, asyncio.Future[calllog.Serial]]],
        writing: asyncio.Future[list[calllog.Serial]],
    ) -> None:
        exc = writing.exception()
        if exc is not None:  # the callers see the store's error; later groups still go
            for _, done in group:
                if not done.done():
                    done.set_exception(exc)
        else:
            for (_, done), serial in zip(group, writing.result(), strict=True):
                if not done.done():
                    done.set_result(serial)
        self._write_next_group()

    def _write_batch(self, rows: list[_Row]) -> list[calllog.Serial]:
        conn = self._write_conn
        assert conn is not None
        # One counter update per tenant and one executemany for the group: per-row
        # statements from Python cost more than the rest of the commit.
        wanted = collections.Counter(row[0] for row in rows)
        conn.execute("BEGIN IMMEDIATE")
        try:
            next_serial: dict[str, itertools.count[int]] = {}
            for tenant, n in wanted.items():
                (last,) = conn.execute(_TAKE_SERIALS, (tenant, n)).fetchone()
                next_serial[tenant] = itertools.count(int(last) - n + 1)
            serials = [calllog.Serial(next(next_serial[row[0]])) for row in rows]
            conn.executemany(
                _INSERT,
                [
                    (tenant, serial, ts, method, args, result, exception, address, user)
                    for (tenant, ts, method, args, result, exception, address, user), serial in zip(
                        rows, serials, strict=True
                    )
                ],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return serials

    async def since(self, *, tenant: str, serial: int, limit: int) -> list[calllog.Entry]:
        sql = (
            f"SELECT {_COLUMNS} FROM calls WHERE tenant = ? AND serial > ? ORDER BY serial LIMIT ?"
        )
        return await self._read(sql, (tenant, serial, limit), reverse=False)

    async def latest(self, *, tenant: str, n: int) -> list[calllog.Entry]:
        sql = f"SELECT {_COLUMNS} FROM calls WHERE tenant = ? ORDER BY serial DESC LIMIT ?"
        return await self._read(sql, (tenant, n), reverse=True)

    async def _read(
        self, sql: str, args: tuple[str | int, ...], *, reverse: bool
    ) -> list[calllog.Entry]:
        def rows() -> Iterator[calllog.Entry]:
            assert self._read_conn is not None
            for (
                serial,
                ts,
                method,
                args_json,
                result_json,
                exception,
                address,
                user,
            ) in self._read_conn.execute(sql, args):
                yield calllog.Entry(
                    serial=calllog.Serial(int(serial)),
                    timestamp=datetime.datetime.fromtimestamp(ts, datetime.UTC),
                    method=method,
                    args_json=args_json,
                    result_json=result_json,
                    exception=exception,
                    address=address,
                    user=user,
                )

        def run() -> list[calllog.Entry]:
            entries = calllog.page(rows())
            return entries[::-1] if reverse else entries

        return await asyncio.get_running_loop().run_in_executor(self._reader_pool, run)

    async def purge(self, *, older_than: datetime.datetime) -> int:
        def run() -> int:
            assert self._write_conn is not None
            # The serials table is kept: the counter must never restart after a purge.
            cursor = self._write_conn.execute(
                "DELETE FROM calls WHERE ts < ?", (older_than.timestamp(),)
            )
            return int(cursor.rowcount)

        return await asyncio.get_running_loop().run_in_executor(self._writer_pool, run)

    async def close(self) -> None:
        self._accepting = False
        await self._idle.wait()  # every append made so far is committed first
        loop = asyncio.get_running_loop()
        if self._write_conn is not None:
            await loop.run_in_executor(self._writer_pool, self._write_conn.close)
            self._write_conn = None
        if self._read_conn is not None:
            await loop.run_in_executor(self._reader_pool, self._read_conn.close)
            self._read_conn = None
        self._writer_pool.shutdown(wait=True)
        self._reader_pool.shutdown(wait=True)
