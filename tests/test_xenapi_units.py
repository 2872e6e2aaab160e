"""The XenAPI dialect's pure parts, without a cluster: the failure table against
docs/faults.md, the revocation plan, the task feed's change log and waiters, the record."""

from __future__ import annotations

import asyncio
import datetime
import inspect
import pathlib
import re
import time
import uuid
from typing import Any

import pytest

from opkeeper import errors, names, states
from opkeeper.gateway import auth, cache, calllog, revocations, rpc, xenevents, xenfaults
from opkeeper.gateway import xmlrpc as codec
from opkeeper.gateway.dialects import xenapi

DOC = pathlib.Path(__file__).parent.parent / "docs" / "faults.md"


def test_every_code_is_documented_and_every_documented_code_exists() -> None:
    section = DOC.read_text().split("## XenAPI failures", 1)[1]
    documented = re.findall(r"^\| `([A-Z_]+)` \|", section, flags=re.MULTILINE)
    assert sorted(documented) == xenfaults.codes()


def test_every_error_class_has_a_planned_code() -> None:
    classes = {
        cls
        for module in (errors, codec, names, xenfaults)
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, errors.OpkeeperError) and cls.__module__ == module.__name__
    }
    ctx = xenfaults.Context(method="task.get_record", session="OpaqueRef:s", ref="OpaqueRef:r")
    for cls in classes:
        row = xenfaults.row_for(cls.__new__(cls), ctx)
        assert row is not xenfaults.INTERNAL, cls
    assert xenfaults.row_for(errors.Unauthenticated("x"), ctx).code == "SESSION_INVALID"
    login = xenfaults.Context(method="session.login_with_password", user="alice")
    assert xenfaults.description(errors.Unauthenticated("unknown API key"), login) == [
        "SESSION_AUTHENTICATION_FAILED",
        "alice",
        "unknown API key",
    ]
    assert xenfaults.description(errors.NotFound("gone"), ctx) == [
        "HANDLE_INVALID",
        "task",
        "OpaqueRef:r",
    ]


def test_unplanned_errors_show_an_incident_and_long_params_are_cut() -> None:
    ctx = xenfaults.Context(method="task.get_all")
    code, text = xenfaults.description(KeyError("secret detail"), ctx)
    assert code == "INTERNAL_ERROR"
    assert "incident" in text
    assert "secret" not in text
    [_, cut] = xenfaults.description(xenfaults.MethodUnknown("m" * 5000), ctx)
    assert len(cut) < 600


def test_a_logout_adds_its_nonce_and_prunes_expired_entries_within_the_cap() -> None:
    revoked = {"old": 10.0, "live": 200.0}
    assert revocations.plan(
        revoked=revoked, nonce="new", expires=300.0, now=100.0, max_entries=10
    ) == {"old": None, "new": "300.0"}
    with pytest.raises(errors.Unavailable):
        revocations.plan(revoked=revoked, nonce="new", expires=300.0, now=5.0, max_entries=2)
    # Logging out twice is not refused by a full list.
    assert revocations.plan(revoked=revoked, nonce="live", expires=200.0, now=5.0, max_entries=2)
    assert revocations.parse({"a": "1.5", "b": "soon"}) == {"a": 1.5}


def _op(
    name: str, *, id_: int, rv: int, state: str = "Running", ns: str = "t", **extra: Any
) -> Any:
    uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{ns}/{name}"))
    return {
        "metadata": {
            "namespace": ns,
            "name": name,
            "uid": uid,
            "resourceVersion": str(rv),
            "labels": {cache.ID_LABEL: str(id_)},
            "creationTimestamp": "2026-01-01T00:00:00Z",
            **extra.pop("metadata", {}),
        },
        "spec": {"type": "t", **extra.pop("spec", {})},
        "status": {"state": state, **extra},
    }


def test_the_feed_logs_changes_per_tenant_coalesces_and_detects_gaps() -> None:
    ops = cache.OperationCache()
    feed = xenevents.TaskFeed(operations=ops, settings=xenevents.Settings(max_changes_per_tenant=3))
    ops.reset([])
    ops.apply(event="ADDED", obj=_op("a", id_=1, rv=10))
    ops.apply(event="ADDED", obj=_op("b", id_=2, rv=11, ns="other"))
    ops.apply(event="MODIFIED", obj=_op("a", id_=1, rv=12, state="Succeeded"))
    changes = feed.since("t", 0)
    assert changes is not None
    assert [(c.operation, c.version) for c in changes] == [("add", 10), ("mod", 12)]
    assert feed.since("t", 12) == []
    assert feed.since("other", 10) is not None
    events = xenapi._coalesced(changes)
    assert [(e["operation"], e["snapshot"]["status"]) for e in events] == [("add", "success")]
    ops.apply(event="DELETED", obj=_op("a", id_=1, rv=13, state="Succeeded"))
    assert xenapi._coalesced(feed.since("t", 0) or []) == []  # added and gone: nothing
    assert [c.operation for c in feed.since("t", 12) or []] == ["del"]
    ops.apply(event="ADDED", obj=_op("c", id_=3, rv=14))
    ops.apply(event="MODIFIED", obj=_op("c", id_=3, rv=15))
    assert feed.since("t", 9) is None  # the first change is no longer kept
    ops.reset([_op("c", id_=3, rv=15)])
    assert feed.since("t", 14) is None  # a relist: changes in between are unknown
    assert feed.task("t", ops.get("t", "c").uid) is not None  # type: ignore[union-attr]
    assert feed.task("other", ops.get("t", "c").uid) is None  # type: ignore[union-attr]


def test_waiters_wake_on_their_tenants_change_and_are_bounded() -> None:
    async def scenario() -> None:
        ops = cache.OperationCache()
        feed = xenevents.TaskFeed(
            operations=ops, settings=xenevents.Settings(max_waiters_per_tenant=2)
        )
        ops.reset([])
        first = asyncio.create_task(feed.wait("t", token=0, seconds=30))
        second = asyncio.create_task(feed.wait("t", token=0, seconds=30))
        other = asyncio.create_task(feed.wait("u", token=0, seconds=0.05))
        # One turn of the loop (a yield, not a delay): each new task runs until it waits.
        await asyncio.sleep(0)
        assert feed.waiting() == 3
        with pytest.raises(errors.Forbidden):
            await feed.wait("t", token=0, seconds=30)
        ops.apply(event="ADDED", obj=_op("a", id_=1, rv=5))
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        await other  # not woken by another tenant's change: its own timeout ends it
        assert feed.waiting() == 0

    asyncio.run(scenario())


def test_the_record_has_the_seeds_types_and_the_vocabulary_words() -> None:
    now = "2026-01-01T00:05:00Z"
    running = cache.OperationEntry.from_object(_op("r", id_=1, rv=1, progress=40))
    done = cache.OperationEntry.from_object(
        _op("d", id_=2, rv=2, state="Succeeded", finishedAt=now, result={"k": "v"})
    )
    failed = cache.OperationEntry.from_object(
        _op("f", id_=3, rv=3, state="FailedExternal", finishedAt=now, errorCode=7)
    )
    cancelling = cache.OperationEntry.from_object(
        _op(
            "c",
            id_=4,
            rv=4,
            spec={"cancel": True},
            metadata={"annotations": {cache.NAME_LABEL_ANNOTATION: "Zürich"}},
        )
    )
    r, d, f, c = map(xenapi.task_record, (running, done, failed, cancelling))
    assert (r["status"], r["progress"], r["error_info"], r["eta"].year) == ("pending", 40, [], 1970)
    assert (d["status"], d["progress"], d["error_code"], d["result"]) == (
        "success",
        100,
        0,
        '{"k": "v"}',
    )
    assert d["eta"] == d["finished"] == datetime.datetime(2026, 1, 1, 0, 5, tzinfo=datetime.UTC)
    assert (f["status"], f["error_code"], f["error_info"]) == ("failure", 7, ["FailedExternal"])
    assert (c["status"], c["allowed_operations"], c["name_label"]) == ("cancelling", [], "Zürich")
    assert (
        states.legacy_status(states.State.CANCELLED, states.Dialect.XENAPI, cancel_requested=True)
        == "cancelled"
    )
    assert (
        states.legacy_status(states.State.RUNNING, states.Dialect.GANDI, cancel_requested=True)
        == "RUN"
    )
    codec.encode_response(xenapi._envelope(r))  # standard types only


def test_answers_with_every_task_are_bounded() -> None:
    ops = cache.OperationCache()
    feed = xenevents.TaskFeed(operations=ops, settings=xenevents.Settings())
    ops.reset([_op(f"op-{i}", id_=i, rv=i) for i in range(1, 4)])
    none: Any = None
    endpoint = xenapi.Endpoint(
        svc=none,
        sessions=none,
        keyring=none,
        revoked=none,
        feed=feed,
        settings=xenapi.Settings(max_records=3),
    )
    xenapi._check_records(endpoint, "t", "task.get_all_records")  # 3 tasks: within
    endpoint.settings = xenapi.Settings(max_records=2)
    with pytest.raises(errors.Forbidden, match=r"task\.get_record"):
        xenapi._check_records(endpoint, "t", "task.get_all_records")
    assert xenfaults.row_for(errors.Forbidden("x"), xenfaults.Context(method="")).code == (
        "OPERATION_NOT_ALLOWED"
    )


def test_the_kept_record_answer_is_sendable_and_logged_without_a_redact_walk() -> None:
    failed = cache.OperationEntry.from_object(
        _op(
            "x",
            id_=5,
            rv=5,
            state="FailedExternal",
            errorCode=2**40,
            errorInfo=["bad\x00byte", 3],
            spec={"type": "t\x01"},
            metadata={"annotations": {cache.NAME_DESCRIPTION_ANNOTATION: "a\x02<b>&"}},
        )
    )
    record = xenapi.task_record(failed)
    names_used = {*record, *record["other_config"]}
    assert names_used == set(xenapi.RECORD_FIELDS)
    assert not [n for n in xenapi.RECORD_FIELDS if calllog.is_secret_name(n)]
    # Free-form values are made sendable as rpc.wire would: U+FFFD, big ints as strings.
    assert record["error_code"] == str(2**40)
    assert record["error_info"] == ["bad\ufffdbyte", "3"]
    assert (record["type"], record["name_description"]) == ("t\ufffd", "a\ufffd<b>&")
    assert record == rpc.wire(record)
    answer = xenapi._record_answer(failed)
    assert xenapi._record_answer(failed) is answer  # kept with the entry version
    assert answer.body == codec.encode_response(xenapi._envelope(record), bare_strings=True)
    # Logged: what the client learnt, nothing secret-looking among it.
    logged = {f: record[f] for f in xenapi.LOGGED_RECORD_FIELDS}
    assert answer.result_json == rpc.to_json(calllog.redact(logged))
    ref = xenapi.task_ref(failed)
    generic = rpc.to_json({"args": calllog.redact([rpc.REDACTED_SESSION, ref]), "kw": {}})
    assert xenapi._ref_args(ref) == generic


def test_registrations_are_per_session_bounded_per_tenant_and_expire() -> None:
    now = [1000.0]
    kept = xenevents.Registrations(
        settings=xenevents.Settings(max_registrations_per_tenant=2), clock=lambda: now[0]
    )
    kept.register(tenant="t", nonce="a", classes={"task"}, token=5, expires=2000)
    kept.register(tenant="t", nonce="b", classes={"*"}, token=6, expires=1500)
    kept.register(tenant="u", nonce="c", classes={"task"}, token=7, expires=2000)
    assert kept.get(tenant="u", nonce="a") is None  # another tenant never sees it
    a = kept.get(tenant="t", nonce="a")  # now the most recently used
    assert a is not None
    assert (a.classes, a.token) == ({"task"}, 5)
    kept.register(tenant="t", nonce="a", classes={"task/OpaqueRef:x"}, token=99, expires=2000)
    assert (a.classes, a.token) == ({"task", "task/OpaqueRef:x"}, 5)  # added, not reset
    kept.unregister(tenant="t", nonce="a", classes={"task"})
    assert a.classes == {"task/OpaqueRef:x"}
    kept.register(tenant="t", nonce="d", classes={"task"}, token=8, expires=2000)
    assert kept.get(tenant="t", nonce="b") is None  # the least recently used went
    assert kept.count() == 3
    now[0] = 1999.0
    kept.register(tenant="u", nonce="e", classes={"task"}, token=9, expires=1999)
    assert kept.get(tenant="u", nonce="e") is None  # expired with its session
    kept.drop(tenant="t", nonce="a")
    kept.drop(tenant="t", nonce="d")
    assert kept.count() == 2  # u's c and e (e goes at u's next registration)


def test_event_next_delivers_each_change_once_and_reports_lost_events() -> None:
    async def scenario() -> None:
        ops = cache.OperationCache()
        settings = xenevents.Settings(max_changes_per_tenant=2, max_wait_seconds=0.05)
        feed = xenevents.TaskFeed(operations=ops, settings=settings)
        ops.reset([])
        none: Any = None
        endpoint = xenapi.Endpoint(
            svc=none,
            sessions=none,
            keyring=none,
            revoked=none,
            feed=feed,
            settings=xenapi.Settings(events=settings),
        )

        def call(tenant: str, nonce: str, *args: Any) -> xenapi.Call:
            who = auth.Identity(user_id="u", tenant=auth.Tenant(tenant), key_hash=auth.KeyHash("h"))
            return xenapi.Call(
                request=none,
                args=args,
                ctx=xenfaults.Context(method="event.next"),
                identity=who,
                session=auth.Session(identity=who, expires=time.time() + 60, nonce=nonce),
            )

        with pytest.raises(xenfaults.SessionNotRegistered):
            await xenapi._event_next(endpoint, call("t", "s"))
        with pytest.raises(errors.InvalidArgument):
            await xenapi._event_register(
                endpoint, call("t", "s", [f"task/OpaqueRef:{uuid.uuid4()}" for _ in range(300)])
            )
        await xenapi._event_register(endpoint, call("t", "s", ["task", "VM"]))
        await xenapi._event_register(endpoint, call("u", "s2", ["*"]))
        assert endpoint.registrations.get(tenant="t", nonce="s").classes == {"task"}  # type: ignore[union-attr]
        waiting = asyncio.create_task(xenapi._event_next(endpoint, call("t", "s")))
        await asyncio.sleep(0)  # one loop turn: it waits
        ops.apply(event="ADDED", obj=_op("a", id_=1, rv=10))
        events = await asyncio.wait_for(waiting, 5)
        assert [(e["operation"], e["id"]) for e in events] == [("add", "10")]
        assert await xenapi._event_next(endpoint, call("t", "s")) == []  # nothing new
        assert await xenapi._event_next(endpoint, call("u", "s2")) == []  # not u's task
        for rv in (11, 12, 13):
            ops.apply(event="MODIFIED", obj=_op("a", id_=1, rv=rv, progress=rv))
        with pytest.raises(xenfaults.EventsLost):  # 3 changes, 2 kept
            await xenapi._event_next(endpoint, call("t", "s"))
        assert await xenapi._event_next(endpoint, call("t", "s")) == []  # re-armed
        ops.apply(event="MODIFIED", obj=_op("a", id_=1, rv=14, state="Succeeded"))
        (event,) = await xenapi._event_next(endpoint, call("t", "s"))
        assert (event["operation"], event["snapshot"]["status"]) == ("mod", "success")

    asyncio.run(scenario())


def test_shared_event_from_arguments_are_what_the_log_would_write() -> None:
    for timeout in (60, 60.0, 0.5):
        args = [rpc.REDACTED_SESSION, ["task", "task/OpaqueRef:x"], "17", timeout]
        assert xenapi._event_from_args(("task", "task/OpaqueRef:x"), "17", timeout) == (
            rpc.to_json({"args": calllog.redact(args), "kw": {}})
        )
