"""One contract for every call log store: SQLite and PostgreSQL pass the same tests.

What the gateway and the dialects rely on: serials 1, 2, 3, ... per tenant
without gaps whoever writes (several writers at once), a page walk that never
skips, fields read back as stored (gocept's ``log`` shows them), the byte
caps and the page bound, redacted arguments, and the purge that keeps the
counter. The PostgreSQL store runs against a real server (``postgres``
fixture), a fresh database per test.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import pathlib
from collections.abc import Awaitable, Callable, Iterator

import pytest

from opkeeper import localpostgres
from opkeeper.gateway import calllog, calllogs

UTC = datetime.UTC

Opener = Callable[[], Awaitable[calllog.CallLog]]
"""Opens one more store on the same log (several writers share one log)."""


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[str]:
    """Where one test's log lives: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield str(tmp_path / "log.sqlite3")
        return
    server: localpostgres.Server = request.getfixturevalue("postgres")
    yield server.new_database()


@pytest.fixture
def open_store(location: str) -> Opener:
    async def opener() -> calllog.CallLog:
        return await calllogs.open_store(location=location)

    return opener


def _run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(main())


def test_the_location_picks_the_store(location: str) -> None:
    assert calllogs.is_postgres(location) == location.startswith("postgresql://")


def test_entries_read_back_as_stored_oldest_first(open_store: Opener) -> None:
    when = datetime.datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)

    async def main() -> None:
        store = await open_store()
        try:
            for i in range(15):
                serial = await store.append(
                    tenant="t",
                    method=f"m{i}",
                    args_json='{"args": ["é", 1], "kw": {}}',
                    result_json="[]",
                    exception="" if i else "404: gone",
                    address="127.0.0.1",
                    when=when,
                    user="alice",
                )
                assert serial == i + 1
            latest = await store.latest(tenant="t", n=10)
            assert [e.serial for e in latest] == list(range(6, 16))
            first = (await store.since(tenant="t", serial=0, limit=1))[0]
            assert first == calllog.Entry(
                serial=calllog.Serial(1),
                timestamp=when,
                method="m0",
                args_json='{"args": ["é", 1], "kw": {}}',
                result_json="[]",
                exception="404: gone",
                address="127.0.0.1",
                user="alice",
            )
            assert first.timestamp.utcoffset() == datetime.timedelta(0)
            assert [e.serial for e in await store.since(tenant="t", serial=13, limit=10)] == [
                14,
                15,
            ]
            assert await store.latest(tenant="other", n=10) == []
            assert await store.since(tenant="other", serial=0, limit=10) == []
        finally:
            await store.close()

    _run(main)


def test_serials_are_gapless_per_tenant_under_concurrency(open_store: Opener) -> None:
    async def main() -> None:
        store = await open_store()
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
                mine = [(s, i) for i, s in enumerate(results) if i % 3 == t]
                assert sorted(s for s, _ in mine) == list(range(1, 201))
                entries = await store.since(tenant=f"t{t}", serial=0, limit=1000)
                assert [e.serial for e in entries] == list(range(1, 201))
                # Each entry is under the serial its append returned.
                by_serial = {e.serial: e.args_json for e in entries}
                assert all(by_serial[s] == f'["{i}"]' for s, i in mine)
        finally:
            await store.close()

    _run(main)


def test_several_writers_share_one_gapless_log(open_store: Opener) -> None:
    """Several stores on one log at once (gateway workers or replicas)."""

    async def main() -> None:
        stores = [await open_store() for _ in range(3)]
        try:
            results = await asyncio.gather(
                *(
                    stores[i % 3].append(
                        tenant=f"t{i % 2}", method="m", args_json=str(i), result_json=""
                    )
                    for i in range(600)
                )
            )
            for t in range(2):
                assert sorted(s for i, s in enumerate(results) if i % 2 == t) == list(range(1, 301))
                for store in stores:
                    entries = await store.since(tenant=f"t{t}", serial=0, limit=1000)
                    assert [e.serial for e in entries] == list(range(1, 301))
        finally:
            for store in stores:
                await store.close()

    _run(main)


def test_walking_with_pages_while_two_writers_write_never_skips(open_store: Opener) -> None:
    async def main() -> None:
        writers = [await open_store(), await open_store()]
        reader_store = await open_store()
        seen: list[int] = []
        done = asyncio.Event()

        async def writer(store: calllog.CallLog, count: int) -> None:
            for i in range(count):
                await store.append(tenant="t", method="m", args_json=str(i), result_json="")

        async def write_all() -> None:
            await asyncio.gather(writer(writers[0], 150), writer(writers[1], 150))
            done.set()

        async def reader() -> None:
            last = 0
            while True:
                finished = done.is_set()
                page = await reader_store.since(tenant="t", serial=last, limit=17)
                for entry in page:
                    seen.append(entry.serial)
                    last = entry.serial
                if finished and not page:
                    return
                await asyncio.sleep(0)  # let the writers run: a yield, not a wait

        try:
            await asyncio.gather(write_all(), reader())
        finally:
            for store in [*writers, reader_store]:
                await store.close()
        assert seen == list(range(1, 301))

    _run(main)


def test_purge_removes_old_entries_and_keeps_the_counter(open_store: Opener) -> None:
    async def main() -> None:
        store = await open_store()
        other = await open_store()
        old = datetime.datetime.now(UTC) - datetime.timedelta(days=31)
        try:
            for _ in range(3):
                await store.append(tenant="t", method="m", args_json="", result_json="", when=old)
            await store.append(tenant="u", method="m", args_json="", result_json="", when=old)
            await store.append(tenant="t", method="m", args_json="", result_json="")
            cutoff = datetime.datetime.now(UTC) - calllog.RETENTION
            # Two replicas purging at once: together they remove each old entry once.
            removed = await asyncio.gather(
                store.purge(older_than=cutoff), other.purge(older_than=cutoff)
            )
            assert sum(removed) == 4
            assert await store.purge(older_than=cutoff) == 0
            serial = await store.append(tenant="t", method="m", args_json="", result_json="")
            assert serial == 5
            assert [e.serial for e in await store.since(tenant="t", serial=0, limit=10)] == [4, 5]
            assert await store.latest(tenant="u", n=10) == []
        finally:
            await store.close()
            await other.close()

    _run(main)


def test_survives_a_reopen(open_store: Opener) -> None:
    async def main() -> None:
        store = await open_store()
        await store.append(tenant="t", method="m", args_json="", result_json="")
        await store.close()
        store = await open_store()
        try:
            assert await store.append(tenant="t", method="m", args_json="", result_json="") == 2
        finally:
            await store.close()

    _run(main)


def test_close_flushes_queued_appends(open_store: Opener) -> None:
    async def main() -> None:
        store = await open_store()
        pending = [
            asyncio.ensure_future(
                store.append(tenant="t", method="m", args_json="", result_json="")
            )
            for _ in range(50)
        ]
        await asyncio.sleep(0)  # the appends are queued: a yield, not a wait
        await store.close()
        assert sorted(await asyncio.gather(*pending)) == list(range(1, 51))

    _run(main)


def test_stored_fields_are_capped_and_cuts_stay_json(open_store: Opener) -> None:
    async def main() -> None:
        store = await open_store()
        try:
            await store.append(
                tenant="t",
                method="m" * 1000,
                args_json=json.dumps({"args": ["Q" * 500_000], "kw": {}}),
                result_json=json.dumps(["R" * 100_000]),
                exception="E" * 100_000,
                address="a" * 1000,
                user="u" * 1000,
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
        assert len(entry.user) < 300

    _run(main)


def test_pages_are_capped_by_bytes_and_stay_gapless(open_store: Opener) -> None:
    big = json.dumps(["x" * (calllog.JSON_FIELD_MAX - 20)])

    async def main() -> None:
        store = await open_store()
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
                assert page
                assert sum(calllog.entry_size(e) for e in page) <= calllog.PAGE_MAX_BYTES
                seen.extend(e.serial for e in page)
            assert seen == list(range(1, 201))
            latest = await store.latest(tenant="t", n=1000)
            assert latest[-1].serial == 200
            assert [e.serial for e in latest] == list(range(latest[0].serial, 201))
            assert sum(calllog.entry_size(e) for e in latest) <= calllog.PAGE_MAX_BYTES
        finally:
            await store.close()

    _run(main)


def test_redacted_arguments_are_what_is_stored(open_store: Opener) -> None:
    """The callers redact before appending; the store keeps exactly that."""
    args = {"args": [{"auth_code": "s3cr3t", "nested": [{"apiKey": "k"}], "years": 1}], "kw": {}}

    async def main() -> None:
        store = await open_store()
        try:
            await store.append(
                tenant="t",
                method="operation_create",
                args_json=json.dumps(calllog.redact(args)),
                result_json=json.dumps(calllog.redact({"password": "p", "id": 7})),
            )
            [entry] = await store.since(tenant="t", serial=0, limit=10)
        finally:
            await store.close()
        assert "s3cr3t" not in entry.args_json
        assert json.loads(entry.args_json)["args"][0] == {
            "auth_code": calllog.REDACTED,
            "nested": [{"apiKey": calllog.REDACTED}],
            "years": 1,
        }
        assert json.loads(entry.result_json) == {"password": calllog.REDACTED, "id": 7}

    _run(main)


def test_hostile_text_never_fails_the_entries_committed_with_it(open_store: Opener) -> None:
    """A NUL or a lone surrogate a client smuggles into a method name or address is
    stored replaced; the other entries of its group are stored as usual."""

    async def main() -> None:
        store = await open_store()
        try:
            serials = await asyncio.gather(
                store.append(tenant="t", method="a\x00b", args_json="[]", result_json=""),
                store.append(
                    tenant="t", method="m", args_json="[]", result_json="", address="\ud800"
                ),
                store.append(tenant="t", method="ok", args_json="[]", result_json=""),
            )
            stored = await store.since(tenant="t", serial=0, limit=10)
        finally:
            await store.close()
        assert sorted(serials) == [e.serial for e in stored] == [1, 2, 3]
        assert {e.method for e in stored} == {"a\ufffdb", "m", "ok"}
        assert [e.address for e in stored if e.method == "m"] == ["?"]

    _run(main)
