"""What only the SQLite call log has (processes sharing the file, its thread, the file's
mode), the redaction rule and what a dialect does when a write fails; what every store
must do is tests/test_gateway_calllog_contract.py."""

from __future__ import annotations

import asyncio
import datetime
import multiprocessing
import pathlib
import stat
import threading

import pytest

from opkeeper.gateway import calllog, calllog_sqlite

UTC = datetime.UTC


async def _open(path: pathlib.Path, **kw: int) -> calllog_sqlite.SqliteCallLog:
    store = calllog_sqlite.SqliteCallLog(
        settings=calllog_sqlite.SqliteSettings(path=str(path), **kw)
    )
    await store.open()
    return store


def _append_from_another_process(path: str, start: threading.Barrier, count: int) -> list[int]:
    async def main() -> list[int]:
        store = await _open(pathlib.Path(path), batch_max=5)
        # Both processes start writing together, each with its store already open.
        await asyncio.get_running_loop().run_in_executor(None, start.wait, 60)
        try:
            return list(
                await asyncio.gather(
                    *(
                        store.append(tenant="t", method="m", args_json=str(i), result_json="")
                        for i in range(count)
                    )
                )
            )
        finally:
            await store.close()

    return asyncio.run(main())


def test_two_processes_sharing_the_file_keep_serials_gapless(tmp_path: pathlib.Path) -> None:
    """``gateway --workers N``: every worker appends to one file."""
    path = str(tmp_path / "log.sqlite3")
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(2) as pool:
        start = manager.Barrier(2)
        results = pool.starmap(_append_from_another_process, [(path, start, 400)] * 2)
    assert sorted(results[0] + results[1]) == list(range(1, 801))
    assert all(len(set(r)) == 400 for r in results)

    async def read() -> list[int]:
        store = await _open(tmp_path / "log.sqlite3")
        try:
            return [e.serial for e in await store.since(tenant="t", serial=0, limit=1000)]
        finally:
            await store.close()

    assert asyncio.run(read()) == list(range(1, 801))


def test_the_event_loop_never_waits_on_sqlite(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        store = await _open(tmp_path / "log.sqlite3")
        loop_thread = threading.get_ident()
        touched: set[int] = set()
        original = store._write_batch

        def spy(rows: list[calllog_sqlite._Row]) -> list[calllog.Serial]:
            touched.add(threading.get_ident())
            return original(rows)

        store._write_batch = spy  # type: ignore[method-assign]
        try:
            await store.append(tenant="t", method="m", args_json="", result_json="")
        finally:
            await store.close()
        assert touched
        assert loop_thread not in touched

    asyncio.run(main())


def test_the_file_is_owner_only(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "log.sqlite3"
    path.touch(mode=0o644)  # an older install's file is tightened too

    async def main() -> None:
        store = await _open(path)
        try:
            await store.append(tenant="t", method="m", args_json="[]", result_json="1")
        finally:
            await store.close()

    asyncio.run(main())
    for file in tmp_path.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file.name


@pytest.mark.parametrize(
    "name",
    [
        "auth_code",
        "authCode",
        "password",
        "db_password",
        "dbpassword",
        "api-key",
        "apiKey",
        "x-token",
        "secret",
        "client_secret",
        "privateKey",
        "key",
        "otp",
    ],
)
def test_secret_looking_names(name: str) -> None:
    assert calllog.is_secret_name(name)


@pytest.mark.parametrize("name", ["years", "domain", "type", "name", "state", "monkey", "keyword"])
def test_ordinary_names(name: str) -> None:
    assert not calllog.is_secret_name(name)


def test_redact_reaches_every_depth() -> None:
    value = [1, {"auth_code": "abab", "nested": [{"Password": "p", "ok": "v"}], "years": 2}]
    assert calllog.redact(value) == [
        1,
        {
            "auth_code": calllog.REDACTED,
            "nested": [{"Password": calllog.REDACTED, "ok": "v"}],
            "years": 2,
        },
    ]


class _Failing(calllog.CallLog):
    """A store whose every write fails with ``error`` (the rest is never called)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def _append(self, **entry: object) -> calllog.Serial:
        raise self.error

    async def since(self, *, tenant: str, serial: int, limit: int) -> list[calllog.Entry]:
        raise NotImplementedError

    async def latest(self, *, tenant: str, n: int) -> list[calllog.Entry]:
        raise NotImplementedError

    async def purge(self, *, older_than: datetime.datetime) -> int:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


@pytest.mark.parametrize(
    ("error", "logged"),
    [
        (calllog.Deferred("buffered"), False),
        (calllog.Unstored("dropped"), True),
        (OSError("disk full"), True),
    ],
)
def test_a_failed_write_is_counted_and_never_raised(
    error: Exception, logged: bool, caplog: pytest.LogCaptureFixture
) -> None:
    failures: list[None] = []
    store = _Failing(error)
    asyncio.run(
        store.record(
            on_failure=lambda: failures.append(None),
            tenant="t",
            method="task.get_record",
            args_json="[]",
            result_json="null",
        )
    )
    assert len(failures) == 1
    # A Deferred entry is the store's outage, which the store reports once, not per call.
    assert ("call log write failed for t task.get_record" in caplog.text) is logged
