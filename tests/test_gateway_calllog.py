"""The SQLite call log: gapless per-tenant serials under concurrency, paging, retention."""

from __future__ import annotations

import asyncio
import datetime
import json
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


def test_serials_are_gapless_per_tenant_under_concurrency(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        store = await _open(tmp_path / "log.sqlite3", batch_max=7)
        try:
            results = await asyncio.gather(
                *(
                    store.append(
                        tenant=f"t{i % 3}", method="m", args_json=f'["{i}"]', result_json="1"
                    )
                    for i in range(600)
                )
            )
            for t in range(3):
                serials = sorted(s for i, s in enumerate(results) if i % 3 == t)
                assert serials == list(range(1, 201))
                entries = await store.since(tenant=f"t{t}", serial=0, limit=1000)
                assert [e.serial for e in entries] == list(range(1, 201))
        finally:
            await store.close()

    asyncio.run(main())


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


def test_walking_with_pages_while_writing_never_skips(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        store = await _open(tmp_path / "log.sqlite3")
        seen: list[int] = []
        done = asyncio.Event()

        async def writer() -> None:
            for i in range(300):
                await store.append(tenant="t", method="m", args_json=str(i), result_json="")
            done.set()

        async def reader() -> None:
            last = 0
            while True:
                finished = done.is_set()
                page = await store.since(tenant="t", serial=last, limit=17)
                for entry in page:
                    seen.append(entry.serial)
                    last = entry.serial
                if finished and not page:
                    return
                await asyncio.sleep(0)

        try:
            await asyncio.gather(writer(), reader())
        finally:
            await store.close()
        assert seen == list(range(1, 301))

    asyncio.run(main())


def test_latest_is_oldest_first_and_entries_keep_their_fields(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        store = await _open(tmp_path / "log.sqlite3")
        when = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
        try:
            for i in range(15):
                await store.append(
                    tenant="t",
                    method=f"m{i}",
                    args_json='{"args": []}',
                    result_json="[]",
                    exception="" if i else "404: gone",
                    address="127.0.0.1",
                    when=when,
                )
            latest = await store.latest(tenant="t", n=10)
            assert [e.serial for e in latest] == list(range(6, 16))
            first = (await store.since(tenant="t", serial=0, limit=1))[0]
            assert first == calllog.Entry(
                serial=calllog.Serial(1),
                timestamp=when,
                method="m0",
                args_json='{"args": []}',
                result_json="[]",
                exception="404: gone",
                address="127.0.0.1",
            )
            assert await store.latest(tenant="other", n=10) == []
        finally:
            await store.close()

    asyncio.run(main())


def test_purge_keeps_the_counter(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        store = await _open(tmp_path / "log.sqlite3")
        old = datetime.datetime.now(UTC) - datetime.timedelta(days=31)
        try:
            await store.append(tenant="t", method="m", args_json="", result_json="", when=old)
            await store.append(tenant="t", method="m", args_json="", result_json="")
            cutoff = datetime.datetime.now(UTC) - calllog.RETENTION
            assert await store.purge(older_than=cutoff) == 1
            serial = await store.append(tenant="t", method="m", args_json="", result_json="")
            assert serial == 3
            assert [e.serial for e in await store.since(tenant="t", serial=0, limit=10)] == [2, 3]
        finally:
            await store.close()

    asyncio.run(main())


def test_survives_a_restart(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        path = tmp_path / "log.sqlite3"
        store = await _open(path)
        await store.append(tenant="t", method="m", args_json="", result_json="")
        await store.close()
        store = await _open(path)
        try:
            assert await store.append(tenant="t", method="m", args_json="", result_json="") == 2
        finally:
            await store.close()

    asyncio.run(main())


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


def test_close_flushes_queued_appends(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        path = tmp_path / "log.sqlite3"
        store = await _open(path)
        pending = [
            asyncio.ensure_future(
                store.append(tenant="t", method="m", args_json="", result_json="")
            )
            for _ in range(50)
        ]
        await asyncio.sleep(0)
        await store.close()
        assert sorted(await asyncio.gather(*pending)) == list(range(1, 51))

    asyncio.run(main())


# --- hygiene: bounded entries and pages, secrets redacted, owner-only file ----------


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


def test_stored_fields_are_capped_and_cuts_stay_json(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        store = await _open(tmp_path / "log.sqlite3")
        try:
            await store.append(
                tenant="t",
                method="m" * 1000,
                args_json=json.dumps({"args": ["Q" * 500_000], "kw": {}}),
                result_json=json.dumps(["R" * 100_000]),
                exception="E" * 100_000,
                address="a" * 1000,
            )
            [entry] = await store.latest(tenant="t", n=10)
        finally:
            await store.close()
        assert len(entry.args_json) <= calllog.JSON_FIELD_MAX
        cut = json.loads(entry.args_json)["__cut__"]
        assert cut["length"] > 500_000
        assert cut["head"].startswith('{"args": ["QQQ')
        assert json.loads(entry.result_json)["__cut__"]["length"] > 100_000
        assert len(entry.exception) < calllog.TEXT_FIELD_MAX + 50
        assert "cut" in entry.exception
        assert len(entry.method) < 200
        assert len(entry.address) < 100

    asyncio.run(main())


def test_pages_are_capped_by_bytes_and_stay_gapless(tmp_path: pathlib.Path) -> None:
    big = json.dumps(["x" * (calllog.JSON_FIELD_MAX - 20)])

    async def main() -> None:
        store = await _open(tmp_path / "log.sqlite3")
        try:
            await asyncio.gather(
                *(
                    store.append(tenant="t", method="m", args_json=big, result_json=big)
                    for _ in range(200)
                )
            )
            seen: list[int] = []
            while len(seen) < 200:
                page = await store.since(tenant="t", serial=seen[-1] if seen else 0, limit=1000)
                size = sum(len(e.args_json) + len(e.result_json) for e in page)
                assert page
                assert size <= calllog.PAGE_MAX_BYTES
                seen.extend(e.serial for e in page)
            assert seen == list(range(1, 201))
        finally:
            await store.close()

    asyncio.run(main())


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
