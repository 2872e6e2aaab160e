"""The BDOM dialect's pure parts, without a cluster: paths, bodies, the answers' XML, the
selection over a fed cache, and the error table against docs/faults.md."""

from __future__ import annotations

import datetime
import itertools
import pathlib
import re
from typing import Any

import pytest

from opkeeper import errors, names, states
from opkeeper.gateway import cache, faults, xmlrpc
from opkeeper.gateway.dialects import bdom

DOC = pathlib.Path(__file__).parent.parent / "docs" / "faults.md"
NOW = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC)


# --- the error table ----------------------------------------------------------------------


def test_the_error_table_is_documented() -> None:
    section = DOC.read_text().split("## BDOM (HTTP statuses)", 1)[1]
    documented = set(re.findall(r"^\| HTTP (\d+) \| (\w+) \|", section, flags=re.MULTILINE))
    in_code = {(str(r.code), r.name) for r in (*bdom.FAULTS.rows, bdom.FAULTS.internal)}
    assert documented == in_code


def test_the_error_table_maps_every_error_to_a_status() -> None:
    rows = bdom.FAULTS.rows
    for i, row in enumerate(rows):
        assert 400 <= row.code < 600
        for later in rows[i + 1 :]:
            assert not issubclass(later.error, row.error), f"{later.error} after {row.error}"
    assert len({r.name for r in rows}) == len(rows)
    raised: list[Exception] = [
        cls("x")
        for cls in (
            errors.InvalidArgument,
            errors.NotFound,
            errors.Unauthenticated,
            errors.Forbidden,
            errors.Conflict,
            errors.IllegalTransition,
            errors.Unavailable,
            xmlrpc.BodyTooLarge,
            xmlrpc.MalformedXml,
            xmlrpc.ForbiddenXml,
            xmlrpc.LimitExceeded,
            xmlrpc.InvalidRequest,
        )
    ]
    raised.append(names.InvalidName("x", what="id", value="x"))
    for exc in raised:
        row = bdom.FAULTS.row_for(exc)
        assert row is not bdom.FAULTS.internal, exc
        # A client's mistake is never a 5xx.
        assert row.code < 500 or isinstance(exc, errors.Unavailable), exc


def test_an_unplanned_error_hides_its_details(caplog: pytest.LogCaptureFixture) -> None:
    fault = bdom.FAULTS.fault_for(RuntimeError("secret internals"))
    assert (fault.code, fault.name) == (500, "internal_error")
    assert "secret internals" not in fault.message
    body = bdom.error_document(fault)
    assert b"<code>500</code><name>internal_error</name>" in body
    assert "secret internals" in caplog.text


def test_error_messages_are_escaped() -> None:
    fault = faults.Fault(code=400, name="invalid_name", message="bad <x> & \x00")
    assert bdom.error_document(fault) == (
        b"<error><code>400</code><name>invalid_name</name>"
        b"<message>bad &lt;x&gt; &amp; \xef\xbf\xbd</message></error>\n"
    )


# --- paths ------------------------------------------------------------------------------------


def test_the_seeds_paths() -> None:
    assert bdom.parse_path("/bdom/task/status/-/-/-/-/13048/") == bdom.Path(
        opcode="status", user_id="13048"
    )
    assert bdom.parse_path("/bdom/task/status/3151063/-/-/-/13048/").task_id == 3151063
    path = bdom.parse_path("/bdom/task/status/-/-/domain/nic-domain-example.de/13048/")
    assert (path.object_kind, path.name) == ("domain", "nic-domain-example.de")
    assert bdom.parse_path("/bdom/task/status/-/PENDING_EXT/-/-/13048/").states == frozenset(
        {states.State.WAITING_EXTERNAL}
    )
    assert bdom.parse_path("/bdom/task/status/-/PENDING_INT/-/-/-").states == frozenset(
        {states.State.PENDING, states.State.RUNNING}
    )
    assert bdom.parse_path("/bdom/task/scheduled/-/-/-/-/13048/?x=1").opcode == "scheduled"
    assert bdom.parse_path("/bdom/task/delete/-/-/-/-/-/").user_id is None


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/bdom/task/frobnicate/-/-/-/-/-/", bdom.UnknownOpcode),
        ("/bdom/task/", errors.InvalidArgument),
        ("/bdom/other/status/-/-/-/-/-/", errors.InvalidArgument),
        ("/bdom/task/status/-/-/-/-/", errors.InvalidArgument),
        ("/bdom/task/status/-/-/-/-/-/-/", errors.InvalidArgument),
        ("/bdom/task/status/-/-/-/x.example/-/", errors.InvalidArgument),
        ("/bdom/task/status/1.5/-/-/-/-/", names.InvalidName),
        ("/bdom/task/status/0/-/-/-/-/", names.InvalidName),
        ("/bdom/task/status/2147483648/-/-/-/-/", names.InvalidName),
        ("/bdom/task/status/%31/-/-/-/-/", None),
        ("/bdom/task/status/-/WAIT/-/-/-/", errors.InvalidArgument),
        ("/bdom/task/status/-/-/a%2Fb/-/-/", names.InvalidName),
        ("/bdom/task/status/-/-/domain/../-/", names.InvalidName),
        ("/bdom/task/status/-/-/domain/%2e%2e/-/", names.InvalidName),
        ("/bdom/task/status/-/-/-/-/a%20b/", names.InvalidName),
        ("/bdom/task/status/-/-/-/-/%ff/", names.InvalidName),
        ("/bdom/task/status//-/-/-/-/", names.InvalidName),
        ("/bdom/task/status/-/-/-/-/" + "a" * 254 + "/", names.InvalidName),
        ("/bdom/task/" + "x/" * 10_000, errors.InvalidArgument),
    ],
)
def test_bad_paths(path: str, error: type[Exception] | None) -> None:
    if error is None:
        assert bdom.parse_path(path).task_id == 1
        return
    with pytest.raises(error):
        bdom.parse_path(path)


def test_opcodes_and_types() -> None:
    assert bdom.opcode_of("domain_transfer-in", "domain") == "transfer-in"
    assert bdom.opcode_of("domain_transfer-in", None) == "domain_transfer-in"
    assert bdom.opcode_of("vm_deploy", "domain") == "vm_deploy"
    assert bdom.opcode_of("domain_", "domain") == "domain_"
    assert bdom.type_of(opcode="delete", kind="domain") == "domain_delete"


# --- bodies --------------------------------------------------------------------------------------

SEED_DELETE = (
    b'<?xml version="1.0" encoding="UTF-8"?> <request xmlns:xsi='
    b'"http://www.w3.org/2001/XMLSchema-instance"> <delete> <task_id>3315581</task_id>'
    b" <task_id>3190159</task_id> </delete> </request>"
)


def test_the_seeds_delete_body() -> None:
    assert bdom.delete_ids(SEED_DELETE) == [3315581, 3190159]
    assert bdom.delete_ids(b"<request><delete><task_id> +7 </task_id></delete></request>") == [7]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"", xmlrpc.MalformedXml),
        (b"<request>", xmlrpc.MalformedXml),
        (b'<?xml version="1.0" encoding="nope"?><request/>', xmlrpc.MalformedXml),
        (b'<!DOCTYPE r [<!ENTITY e "x">]><request/>', xmlrpc.ForbiddenXml),
        (b"<!DOCTYPE r><request/>", xmlrpc.ForbiddenXml),
        (b"<request>" + b"<a>" * 8 + b"</a>" * 8 + b"</request>", xmlrpc.LimitExceeded),
        (b"<request>" + b"<a/>" * 1000 + b"</request>", xmlrpc.LimitExceeded),
        (b"<request " + b" ".join(b'a%d="1"' % i for i in range(9)) + b"/>", xmlrpc.LimitExceeded),
        (b"<" + b"r" * 65 + b"/>", xmlrpc.LimitExceeded),
        (b"<request>" + b" " * (64 * 1024) + b"</request>", xmlrpc.BodyTooLarge),
        (b"<request/>", bdom.InvalidBody),
        (b"<request><delete/></request>", bdom.InvalidBody),
        (b"<request><delete><task_id>x</task_id></delete></request>", bdom.InvalidBody),
        (b"<request><delete><task_id>2147483648</task_id></delete></request>", bdom.InvalidBody),
        (
            b'<request xmlns="urn:x"><delete><task_id>1</task_id></delete></request>',
            bdom.InvalidBody,
        ),
        (b"<request><delete><task_id>0</task_id></delete></request>", names.InvalidName),
        (
            b"<request><delete>" + b"<task_id>1</task_id>" * 101 + b"</delete></request>",
            bdom.InvalidBody,
        ),
    ],
)
def test_bad_delete_bodies(body: bytes, error: type[Exception]) -> None:
    with pytest.raises(error) as caught:
        bdom.delete_ids(body)
    # Every one of them is a client's error.
    assert 400 <= bdom.FAULTS.fault_for(caught.value).code < 500


def test_a_create_body() -> None:
    create = bdom.create_request(
        b"<request><create><opcode>delete</opcode><object>domain</object>"
        b"<name>example.org</name><exec-date>2030-01-17 10:00:00</exec-date><tld_id>7</tld_id>"
        b'<class>RELAUNCH</class><params><param name="a">b</param></params></create></request>'
    )
    assert create == bdom.Create(
        opcode="delete",
        object_kind="domain",
        name="example.org",
        exec_at=datetime.datetime(2030, 1, 17, 10, tzinfo=datetime.UTC),
        params={"a": "b", "tld_id": 7},
        labels={bdom.LABEL_CLASS: "RELAUNCH"},
    )
    assert create.type == "domain_delete"
    assert bdom.parse_exec_date("2030-01-17") == datetime.datetime(2030, 1, 17, tzinfo=datetime.UTC)
    with pytest.raises(bdom.InvalidBody):
        bdom.parse_exec_date("2030-02-30")


# --- answers ----------------------------------------------------------------------------


def _operation(id_: int, state: str, kind: str | None, name: str | None, **extra: Any) -> Any:
    spec: dict[str, Any] = {"type": f"{kind or 'x'}_op", "executor": {"external": {}}}
    if kind is not None:
        spec["object"] = {"kind": kind, "name": name}
    return {
        "metadata": {
            "namespace": extra.get("namespace", "ns"),
            "name": f"op-{id_}",
            "uid": f"u{id_}",
            "resourceVersion": str(id_),
            "creationTimestamp": "2026-12-01T10:00:00Z",
        },
        "spec": spec,
        "status": {"id": id_, "state": state},
    }


def test_one_response_or_a_multiresponse() -> None:
    entry = cache.OperationEntry.from_object(_operation(7, "WaitingExternal", "domain", "a.de"))
    one = bdom.document([bdom.status_response(entry, tail=bdom.user_tail("13048"))])
    assert one == (
        b"<response><date>2026-12-01 10:00:00</date><name>a.de</name><object>domain</object>"
        b"<opcode>op</opcode><status>PENDING_EXT</status><task_id>7</task_id>"
        b"<user_id>13048</user_id></response>\n"
    )
    assert bdom.document([]) == b"<multiresponse></multiresponse>\n"
    two = bdom.document(["<response>a</response>", "<response>b</response>"])
    assert two == b"<multiresponse><response>a</response><response>b</response></multiresponse>\n"


def test_the_selection_matches_a_brute_force_filter_for_every_combination() -> None:
    """Every plan (by id, by object, by state, the walk) against the obvious filter."""
    table = cache.OperationCache()
    kinds = [("domain", "a.de"), ("domain", "b.de"), ("vm", "v1"), (None, None)]
    all_states = list(states.State)
    objects = [
        _operation(i, all_states[i % len(all_states)].value, *kinds[i % len(kinds)])
        for i in range(1, 120)
    ]
    objects.append(_operation(500, "Succeeded", "domain", "a.de", namespace="other"))
    table.reset(objects)
    entries = [cache.OperationEntry.from_object(o) for o in objects[:-1]]
    words = [None, "SUCCESS", "PENDING_INT", "PENDING_EXT", "FAILED_INT", "FAILED_EXT"]
    for task, word, (kind, name), limit in itertools.product(
        [None, 5, 33],
        words,
        [(None, None), ("domain", None), ("vm", None), ("domain", "a.de"), ("vm", "a.de")],
        [1000, 3],
    ):
        path = bdom.Path(
            opcode="status",
            task_id=None if task is None else cache.OpId(task),
            states=None if word is None else states.states_for(states.Dialect.BDOM, word),
            object_kind=kind,
            name=name,
        )
        expected = [
            e.id
            for e in entries
            if (task is None or e.id == task)
            and (word is None or states.legacy(e.state, states.Dialect.BDOM) == word)
            and (kind is None or e.object_kind == kind)
            and (name is None or e.object_name == name)
        ]
        found = bdom.select_operations(table, "ns", path, limit=limit)
        assert [e.id for e in found] == expected[-limit:], path
    with pytest.raises(errors.NotFound):
        bdom.select_operations(
            table, "ns", bdom.Path(opcode="status", task_id=cache.OpId(500)), limit=10
        )


def _task(id_: int | None, state: str | None, **spec: Any) -> Any:
    labels = {"opkeeper.dev/id": str(id_)} if id_ else {}
    return {
        "metadata": {
            "namespace": "ns",
            "name": f"t{id_}",
            "uid": f"t{id_}",
            "resourceVersion": "1",
            "creationTimestamp": "2026-11-30T08:00:00Z",
            "labels": {**labels, **spec.pop("labels", {})},
        },
        "spec": {
            "template": {
                "spec": {
                    "type": "domain_delete",
                    "object": {"kind": "domain", "name": f"d{id_}.de"},
                    "params": spec.pop("params", {}),
                    "executor": {"external": {}},
                }
            },
            **spec,
        },
        "status": {"state": state} if state else {},
    }


def test_scheduled_lists_only_what_has_not_fired() -> None:
    tasks = cache.TaskCache()
    ahead, past = "2027-01-01T00:00:00Z", "2026-01-01T00:00:00Z"
    tasks.reset(
        [
            _task(1, None, execAt=ahead, params={"tld_id": 7}),
            _task(2, "Scheduled", execAt=past),
            _task(3, "Triggered", execAt=ahead),
            _task(
                4,
                "Suspended",
                execAt=ahead,
                labels={bdom.LABEL_CLASS: "X", bdom.LABEL_TYPE: "SIMPLE"},
            ),
            _task(None, "Scheduled", execAt=ahead),
            _task(5, "Scheduled", schedule="0 3 * * *"),
        ]
    )
    tasks.apply(
        event="MODIFIED",
        obj={**_task(6, "Scheduled", schedule="0 3 * * *"), "status": {"nextRunAt": ahead}},
    )
    found = bdom.select_scheduled(tasks, "ns", bdom.Path(opcode="scheduled"), now=NOW, limit=100)
    assert [t.id for t in found] == [1, 4, 6]
    assert bdom.scheduled_response(found[0]) == (
        "<response><class>RELAUNCH</class><exec-date>2027-01-01</exec-date><name>d1.de</name>"
        "<object>domain</object><opcode>delete</opcode><task_id>1</task_id>"
        "<time>2026-11-30 08:00:00</time><tld_id>7</tld_id><type>COMPLEX</type></response>"
    )
    assert "<class>X</class>" in bdom.scheduled_response(found[1])
    assert "<type>SIMPLE</type>" in bdom.scheduled_response(found[1])
    assert "tld_id" not in bdom.scheduled_response(found[1])
    by_name = bdom.Path(opcode="scheduled", object_kind="domain", name="d4.de")
    assert [t.id for t in bdom.select_scheduled(tasks, "ns", by_name, now=NOW, limit=9)] == [4]
