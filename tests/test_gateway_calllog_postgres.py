"""What only the PostgreSQL store has: DSNs logged without their password, retry
decisions, the idempotent retry of a group whose commit answer was lost, and the
bounded buffer while the database is down (the ``postgres`` fixture, restarted)."""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import time

import asyncpg
import pytest

from opkeeper import errors, localpostgres
from opkeeper.gateway import calllog, calllog_postgres, calllogs


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        (
            "postgresql://app:s3cr%40t@db.example:5432/log",
            "postgresql://app:***@db.example:5432/log",
        ),
        (
            "postgresql://app@db/log?password=s3cret&sslmode=require",
            "postgresql://app@db/log?password=***&sslmode=require",
        ),
        ("postgres://db/log", "postgres://db/log"),
        ("postgresql:///log?host=/run/pg&port=5432", "postgresql:///log?host=/run/pg&port=5432"),
    ],
)
def test_a_dsn_is_shown_without_its_password(dsn: str, shown: str) -> None:
    assert calllogs.shown(dsn) == shown


def test_a_path_is_sqlite_and_shown_as_is() -> None:
    assert not calllogs.is_postgres("/var/lib/opkeeper/calllog.sqlite3")
    assert calllogs.shown("calllog.sqlite3") == "calllog.sqlite3"
    assert calllogs.is_postgres("PostgreSQL://db/log")


def test_retries_back_off_up_to_the_cap() -> None:
    settings = calllog_postgres.PostgresSettings(
        dsn="postgresql:///x", retry_min_seconds=0.05, retry_max_seconds=1.0
    )
    delays = [calllog_postgres.retry_delay(failures=n, settings=settings) for n in range(1, 9)]
    assert delays[:4] == [0.05, 0.1, 0.2, 0.4]
    assert delays[-1] == 1.0
    assert calllog_postgres.retry_delay(failures=10_000, settings=settings) == 1.0


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionRefusedError(), True),
        (TimeoutError(), True),
        (asyncpg.exceptions.ConnectionDoesNotExistError("gone"), True),
        (asyncpg.exceptions.AdminShutdownError("shutdown"), True),
        (asyncpg.exceptions.CannotConnectNowError("starting"), True),
        (asyncpg.exceptions.DeadlockDetectedError("deadlock"), True),
        (asyncpg.exceptions.InternalClientError("cannot switch to state 12"), True),
        (asyncpg.exceptions.UniqueViolationError("dup"), False),
        (asyncpg.exceptions.UndefinedTableError("no table"), False),
        (ValueError(), False),
    ],
)
def test_which_failures_are_retried(exc: BaseException, transient: bool) -> None:
    assert calllog_postgres.is_transient(exc) is transient


def test_clean_replaces_what_a_store_refuses() -> None:
    assert calllog.clean("plain") == "plain"
    assert calllog.clean("é ü") == "é ü"
    assert calllog.clean("a\x00b") == "a\ufffdb"
    assert calllog.clean("x\ud800y") == "x?y"


def test_a_retried_group_whose_commit_happened_is_not_stored_twice(
    postgres: localpostgres.Server,
) -> None:
    dsn = postgres.new_database()

    async def main() -> None:
        store = calllog_postgres.PostgresCallLog(
            settings=calllog_postgres.PostgresSettings(dsn=dsn)
        )
        await store.open()
        try:
            loop = asyncio.get_running_loop()
            group = [
                calllog_postgres._Pending(
                    entry_id=calllog_postgres.uuid.uuid4(),
                    tenant=tenant,
                    when=datetime.datetime.now(datetime.UTC),
                    method="m",
                    args_json="[]",
                    result_json="null",
                    exception="",
                    address="",
                    user="",
                    done=loop.create_future(),
                    size=0,
                )
                for tenant in ("a", "b", "a")
            ]
            first = await store._write(group)  # committed; say its answer was lost
            for pending in group:
                pending.retried = True
            assert await store._write(group) == first == [1, 1, 2]
            assert [e.serial for e in await store.since(tenant="a", serial=0, limit=9)] == [1, 2]
            assert await store.append(tenant="a", method="m", args_json="", result_json="") == 3
        finally:
            await store.close()

    asyncio.run(main())


def test_while_the_database_is_down_entries_wait_in_a_bounded_buffer(
    postgres: localpostgres.Server,
) -> None:
    dsn = postgres.new_database()
    settings = calllog_postgres.PostgresSettings(
        dsn=dsn, append_wait_seconds=0.5, buffer_max_bytes=20 * 1024, close_timeout_seconds=1.0
    )

    async def main() -> None:
        store = calllog_postgres.PostgresCallLog(settings=settings)
        await store.open()
        await store.append(tenant="t", method="m", args_json="", result_json="")
        postgres.stop()
        try:
            # The first append after the outage waits its bound, then the store knows.
            with pytest.raises(calllog.Deferred):
                await store.append(tenant="t", method="m", args_json="", result_json="")
            assert store.down
            started = time.monotonic()
            deferred = 0

            async def fill() -> None:
                nonlocal deferred
                for _ in range(1000):  # 20 KiB of ~1 KiB entries, then the buffer is full
                    try:
                        await store.append(
                            tenant="t", method="m", args_json="x" * 800, result_json=""
                        )
                    except calllog.Deferred:
                        deferred += 1

            with pytest.raises(calllog.Unstored):
                await fill()
            assert 5 < deferred < 30
            assert time.monotonic() - started < 0.5, "appends must not wait while down"
            with pytest.raises(errors.Unavailable):
                await store.since(tenant="t", serial=0, limit=10)
        finally:
            postgres.start()
        # Back: the buffer is written in order, after the entry from before the outage.
        await asyncio.wait_for(store._idle.wait(), 30)
        serials = [e.serial for e in await store.since(tenant="t", serial=0, limit=1000)]
        assert serials == list(range(1, deferred + 3))
        assert not store.down
        await store.close()

    asyncio.run(main())


def test_close_gives_up_on_a_dead_database_in_bounded_time(
    postgres: localpostgres.Server,
) -> None:
    dsn = postgres.new_database()
    settings = calllog_postgres.PostgresSettings(
        dsn=dsn, append_wait_seconds=0.2, close_timeout_seconds=0.5
    )

    async def main() -> None:
        store = calllog_postgres.PostgresCallLog(settings=settings)
        await store.open()
        postgres.stop(mode="immediate")
        try:
            with pytest.raises(calllog.Deferred):
                await store.append(tenant="t", method="m", args_json="", result_json="")
            started = time.monotonic()
            await store.close()
            assert time.monotonic() - started < 5
        finally:
            postgres.start()

    asyncio.run(main())


def test_a_hanging_database_defers_callers_after_the_wait(
    postgres: localpostgres.Server,
) -> None:
    """A database that stops answering (SIGSTOP: a network black hole, a frozen VM)
    costs a call at most ``append_wait_seconds``, then nothing until it answers."""
    dsn = postgres.new_database()
    settings = calllog_postgres.PostgresSettings(dsn=dsn, append_wait_seconds=0.3)

    async def main() -> None:
        store = calllog_postgres.PostgresCallLog(settings=settings)
        await store.open()
        await store.append(tenant="t", method="m", args_json="", result_json="")
        frozen = postgres.pids()
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(calllog.Deferred):
                await store.append(tenant="t", method="m", args_json="", result_json="")
            assert 0.25 < time.monotonic() - started < 5
            started = time.monotonic()
            with pytest.raises(calllog.Deferred):
                await store.append(tenant="t", method="m", args_json="", result_json="")
            assert time.monotonic() - started < 0.1
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
        await asyncio.wait_for(store._idle.wait(), 30)
        assert [e.serial for e in await store.since(tenant="t", serial=0, limit=9)] == [1, 2, 3]
        assert await store.append(tenant="t", method="m", args_json="", result_json="") == 4
        await store.close()

    asyncio.run(main())


class _Bug(BaseException):
    """What a bug in the writer would raise (not an Exception: nothing catches it)."""


def test_a_writer_that_dies_leaves_nobody_waiting(postgres: localpostgres.Server) -> None:
    dsn = postgres.new_database()

    async def main() -> None:
        store = calllog_postgres.PostgresCallLog(
            settings=calllog_postgres.PostgresSettings(dsn=dsn)
        )
        await store.open()

        async def broken(group: object) -> list[calllog.Serial]:
            raise _Bug

        store._write = broken  # type: ignore[method-assign]
        try:
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        store.append(tenant="t", method="m", args_json="", result_json="")
                        for _ in range(5)
                    ),
                    return_exceptions=True,
                ),
                10,
            )
            assert all(isinstance(r, calllog.Unstored) for r in results)
            with pytest.raises(RuntimeError):
                await store.append(tenant="t", method="m", args_json="", result_json="")
        finally:
            await store.close()

    asyncio.run(main())
