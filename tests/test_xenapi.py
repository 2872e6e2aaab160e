"""The XenAPI dialect through the real ``XenAPI`` package, against the real API server and
controller.

One gateway runs for the module; every test gets fresh namespaces and keys.
Operations are created through the Gandi dialect (the quickest way to get one
in each state with the configured builtin executors) and read, renamed,
cancelled, destroyed and waited for through ``XenAPI.Session``. Raw
``xmlrpc.client`` calls check that every error path answers with the XenAPI
envelope, never a fault. Nothing sleeps to synchronise.
"""

from __future__ import annotations

import datetime
import uuid
import xmlrpc.client
from collections.abc import Callable, Iterator
from typing import Any

import kubernetes
import pytest
import XenAPI

from opkeeper.gateway import cache, server, service
from tests.gateway_support import (
    RunningGateway,
    gateway_in_thread,
    make_key,
    module_gateway,
    other_namespace,
    raw_call,
)
from tests.helpers import Ops, controller_in_thread, wait_for

pytestmark = pytest.mark.cluster

EXECUTORS: dict[str, dict[str, Any]] = {
    "test_noop": {"builtin": {"action": "noop"}},
    "test_fail": {"builtin": {"action": "fail", "message": "boom"}},
    "test_sleep": {"builtin": {"action": "sleep", "seconds": 600}},
    "test_short": {"builtin": {"action": "sleep", "seconds": 1}},
}


@pytest.fixture(scope="module")
def gw(
    cluster: Any, api: kubernetes.client.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    with module_gateway(
        cluster=cluster,
        api=api,
        tmp_path_factory=tmp_path_factory,
        service=service.Settings(executors=EXECUTORS),
    ) as running:
        yield running


def xen(gw: RunningGateway) -> XenAPI.Session:
    return XenAPI.Session(f"{gw.base}/xenapi")


def login(gw: RunningGateway, namespace: str, key: str) -> XenAPI.Session:
    session = xen(gw)
    session.xenapi.login_with_password(f"user-{namespace}", key)
    return session


def failure(call: Callable[[], Any]) -> list[str]:
    with pytest.raises(XenAPI.Failure) as caught:
        call()
    details: list[str] = caught.value.details
    return details


def raw(gw: RunningGateway, method: str, *params: Any) -> dict[str, Any]:
    """One call with plain xmlrpc.client, answer unparsed: always a struct, never a fault."""
    proxy = xmlrpc.client.ServerProxy(f"{gw.base}/xenapi")
    answer: dict[str, Any] = getattr(proxy, method)(*params)
    return answer


def posted(gw: RunningGateway, body: bytes) -> dict[str, Any]:
    status, reply = gw.post(body, path="/xenapi")
    assert status == 200, reply
    (answer,), _ = xmlrpc.client.loads(reply)  # raises Fault on a fault: never expected
    assert isinstance(answer, dict)
    return answer


def test_login_with_two_and_four_arguments_and_what_the_client_calls_itself(
    api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    key = make_key(api, gw, namespace)
    two = login(gw, namespace, key)
    assert two.handle.startswith("OpaqueRef:")
    # The XenAPI package reads the API version through pool and host calls on its own.
    assert two.API_version == "2.21"
    [pool] = two.xenapi.pool.get_all()
    assert two.xenapi.pool.get_master(pool) == two.xenapi.session.get_this_host(two.handle)
    session_uuid = two.xenapi.session.get_uuid(two.handle)
    assert str(uuid.UUID(session_uuid)) == session_uuid

    four = xen(gw)
    four.login_with_password(f"user-{namespace}", key, "2.21", "opkeeper-tests")
    assert four.xenapi.task.get_all() == []
    assert four.xenapi.session.get_uuid(four.handle) != session_uuid

    for user, password in ((f"user-{namespace}", "opk_wrong"), ("someone-else", key)):
        details = failure(lambda u=user, p=password: xen(gw).xenapi.login_with_password(u, p))
        assert details[0] == "SESSION_AUTHENTICATION_FAILED"
        assert details[1] == user
    three = failure(lambda: xen(gw).xenapi.login_with_password(f"user-{namespace}", key, "2.21"))
    assert three == ["MESSAGE_PARAMETER_COUNT_MISMATCH", "session.login_with_password", "4", "3"]


def test_every_task_rpc_in_every_state(
    cluster: Any, api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    key = make_key(api, gw, namespace)
    gandi = gw.proxy()
    ops = Ops(api, namespace)
    with controller_in_thread(kubeconfig=cluster.kubeconfig, namespace=namespace):
        g = gandi.login(key)
        ids = {
            "success": gandi.operation_create(g, "test_noop", {}),
            "failure": gandi.operation_create(g, "test_fail", {}),
            "running": gandi.operation_create(g, "test_sleep", {}),
            "external": gandi.operation_create(g, "domain_create", {"domain": "example.org"}),
            "cancelled": gandi.operation_create(g, "test_sleep", {}),
        }
        gandi.operation_cancel(g, ids["cancelled"])
        for name, word in (("success", "DONE"), ("failure", "ERROR"), ("external", "WAIT")):
            wait_for(
                lambda i=ids[name], w=word: gandi.operation_details(g, i)["state"] == w,
                what=f"{name} {word}",
            )
        ops.wait_state(f"op-{ids['running']}", "Running")

        s = login(gw, namespace, key)
        task = s.xenapi.task
        records = task.get_all_records()
        refs = task.get_all()
        assert set(records) == set(refs)
        assert len(refs) == 5
        by_id = {int(r["other_config"]["opkeeper_id"]): ref for ref, r in records.items()}
        ref = {name: by_id[i] for name, i in ids.items()}
        assert refs == [by_id[i] for i in sorted(by_id)]  # oldest first

        expected = {
            "success": "success",
            "failure": "failure",
            "running": "pending",
            "external": "pending",
            "cancelled": "cancelled",
        }
        for name, status in expected.items():
            record = task.get_record(ref[name])
            assert record == records[ref[name]]
            assert record["status"] == status, name
            assert task.get_status(ref[name]) == status
            assert ref[name] == "OpaqueRef:" + record["uuid"]
            assert task.get_uuid(ref[name]) == record["uuid"]
            assert task.get_by_uuid(record["uuid"]) == ref[name]
            assert isinstance(task.get_progress(ref[name]), int)
            assert isinstance(task.get_eta(ref[name]), xmlrpc.client.DateTime)
            assert isinstance(task.get_error_code(ref[name]), int)
            info = task.get_error_info(ref[name])
            assert isinstance(info, list)
            assert all(isinstance(i, str) for i in info)
            for field in ("name_label", "name_description", "type", "result", "created"):
                assert getattr(task, f"get_{field}")(ref[name]) == record[field]
        assert records[ref["external"]]["other_config"]["opkeeper_state"] == "WaitingExternal"
        assert records[ref["running"]]["other_config"]["opkeeper_state"] == "Running"

        # Finished tasks: progress 100, eta the finish time; error_info only on failure.
        now = datetime.datetime.now(datetime.UTC)
        for name in ("success", "failure", "cancelled"):
            assert task.get_progress(ref[name]) == 100
            eta = _when(task.get_eta(ref[name]))
            assert abs((now - eta).total_seconds()) < 120
            assert _when(task.get_finished(ref[name])) == eta
        assert task.get_error_info(ref["success"]) == []
        assert task.get_error_info(ref["failure"]) == ["boom"]
        assert task.get_error_code(ref["failure"]) != 0
        assert task.get_error_info(ref["cancelled"]) == ["TASK_CANCELLED", ref["cancelled"]]
        for name in ("running", "external"):
            assert 0 <= task.get_progress(ref[name]) < 100
            assert task.get_error_info(ref[name]) == []
            assert _when(task.get_finished(ref[name])).year == 1970
        assert task.get_type(ref["external"]) == "domain_create"
        assert task.get_by_name_label("test_sleep") == [ref["running"], ref["cancelled"]]

        # name_label / name_description: non-ASCII round trip, visible to kubectl at once.
        label, description = "Zürich → 東京 ✓", 'naïve <xml> & "quotes" 🚀'
        task.set_name_label(ref["external"], label)
        task.set_name_description(ref["external"], description)
        assert task.get_name_label(ref["external"]) == label
        assert task.get_name_description(ref["external"]) == description
        assert task.get_by_name_label(label) == [ref["external"]]
        annotations = ops.get(f"op-{ids['external']}")["metadata"]["annotations"]
        assert annotations[cache.NAME_LABEL_ANNOTATION] == label
        assert annotations[cache.NAME_DESCRIPTION_ANNOTATION] == description

        # cancel: a running task is cancelled when the call returns; a finished one refuses.
        task.cancel(ref["running"])
        assert task.get_status(ref["running"]) == "cancelled"
        assert failure(lambda: task.cancel(ref["success"]))[0] == "OPERATION_NOT_ALLOWED"

        # create: a task for client-side work (external by policy); destroy once finished.
        mine = task.create("backup", "nightly backup of vm 42")
        assert task.get_status(mine) == "pending"
        assert task.get_name_label(mine) == "backup"
        assert task.get_name_description(mine) == "nightly backup of vm 42"
        assert task.get_type(mine) == "xenapi_task"
        assert failure(lambda: task.destroy(mine))[0] == "OPERATION_NOT_ALLOWED"
        task.cancel(mine)
        task.destroy(mine)
        assert failure(lambda: task.get_record(mine)) == ["HANDLE_INVALID", "task", mine]
        assert mine not in task.get_all()

        # Bad refs, another tenant's ref, unknown methods, wrong counts and types.
        other = other_namespace(api)
        other_key = make_key(api, gw, other)
        theirs = login(gw, other, other_key)
        assert theirs.xenapi.task.get_all() == []
        for bad in (
            ref["success"].replace("OpaqueRef:", "OpaqueRef:0"),
            "OpaqueRef:NULL",
            "not a ref",
            "OpaqueRef:" + str(uuid.uuid4()),
        ):
            assert failure(lambda b=bad: task.get_record(b)) == ["HANDLE_INVALID", "task", bad]
        for call in (
            lambda: theirs.xenapi.task.get_record(ref["success"]),
            lambda: theirs.xenapi.task.cancel(ref["running"]),
            lambda: theirs.xenapi.task.set_name_label(ref["success"], "mine now"),
            lambda: theirs.xenapi.task.destroy(ref["success"]),
        ):
            assert failure(call)[0] == "HANDLE_INVALID"
        assert failure(lambda: theirs.xenapi.task.get_by_uuid(records[ref["success"]]["uuid"]))[
            0
        ] == ("HANDLE_INVALID")
        assert failure(lambda: task.frobnicate(ref["success"])) == [
            "MESSAGE_METHOD_UNKNOWN",
            "task.frobnicate",
        ]
        assert failure(lambda: task.get_record()) == [
            "MESSAGE_PARAMETER_COUNT_MISMATCH",
            "task.get_record",
            "2",
            "1",
        ]
        assert failure(lambda: task.get_record(ref["success"], "extra"))[0] == (
            "MESSAGE_PARAMETER_COUNT_MISMATCH"
        )
        assert failure(lambda: task.get_record(42)) == ["FIELD_TYPE_ERROR", "self"]
        assert failure(lambda: task.set_name_label(ref["success"], 42)) == [
            "FIELD_TYPE_ERROR",
            "value",
        ]
        assert failure(lambda: task.set_name_label(ref["success"], "x" * 5000))[0] == (
            "INVALID_VALUE"
        )


def _when(value: xmlrpc.client.DateTime) -> datetime.datetime:
    return datetime.datetime.strptime(value.value, "%Y%m%dT%H:%M:%S").replace(tzinfo=datetime.UTC)


def event_from(session: XenAPI.Session, *args: Any) -> Any:
    """``event.from``: ``from`` is a Python keyword, so the proxy attribute is fetched."""
    return getattr(session.xenapi.event, "from")(*args)


def test_event_register_and_next_see_a_task_finish(
    cluster: Any, api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    key = make_key(api, gw, namespace)
    s = login(gw, namespace, key)
    assert failure(s.xenapi.event.next)[0] == "SESSION_NOT_REGISTERED"
    s.xenapi.event.register(["task", "vm"])
    with controller_in_thread(kubeconfig=cluster.kubeconfig, namespace=namespace):
        gandi = gw.proxy()
        opid = gandi.operation_create(gandi.login(key), "test_short", {})
        seen: list[dict[str, Any]] = []
        while not any(e["snapshot"]["status"] == "success" for e in seen):
            events = s.xenapi.event.next()
            assert events, "event.next answered with nothing before its wait ended"
            for event in events:
                assert event["class"] == "task"
                assert event["snapshot"]["other_config"]["opkeeper_id"] == str(opid)
            seen += events
    assert seen[0]["operation"] == "add"
    assert len({e["id"] for e in seen}) == len(seen)  # each change delivered once
    s.xenapi.event.unregister(["task"])
    s.xenapi.session.logout()
    again = login(gw, namespace, key)
    assert failure(again.xenapi.event.next)[0] == "SESSION_NOT_REGISTERED"  # per session
    assert failure(lambda: again.xenapi.event.register("task")) == [
        "FIELD_TYPE_ERROR",
        "classes",
    ]


def test_event_from_sees_a_task_finish(
    cluster: Any, api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    key = make_key(api, gw, namespace)
    s = login(gw, namespace, key)
    first = event_from(s, ["task"], "", 0.0)
    assert first["events"] == []
    assert first["token"]
    with controller_in_thread(kubeconfig=cluster.kubeconfig, namespace=namespace):
        gandi = gw.proxy()
        opid = gandi.operation_create(gandi.login(key), "test_short", {})
        token, seen = first["token"], []
        ref = None
        while not any(e["snapshot"]["status"] == "success" for e in seen):
            answer = event_from(s, ["task"], token, 30.0)
            assert answer["events"], "event.from answered with nothing before its timeout"
            assert int(answer["token"]) > int(token)
            token = answer["token"]
            for event in answer["events"]:
                assert event["class"] == "task"
                assert set(event) >= {"id", "class", "operation", "ref", "snapshot"}
                assert event["snapshot"]["other_config"]["opkeeper_id"] == str(opid)
                ref = ref or event["ref"]
                assert event["ref"] == ref
            seen += answer["events"]
        assert seen[0]["operation"] == "add"
        assert all(e["operation"] == "mod" for e in seen[1:])
    # A short timeout answers at once with whatever came after the token (nothing, or
    # late status writes of the finished task).
    late = event_from(s, ["task"], token, 0.2)
    assert all(e["ref"] == ref and e["operation"] == "mod" for e in late["events"])
    # An empty token lists every task as "add"; a class filter of one ref works.
    snapshot = event_from(s, [f"task/{ref}"], "", 0.0)["events"]
    assert [(e["operation"], e["ref"]) for e in snapshot] == [("add", ref)]
    assert event_from(s, ["vm"], "", 0.0)["events"] == []
    bad = failure(lambda: event_from(s, ["task"], "not-a-token", 0.0))
    assert bad[0] == "INVALID_VALUE"


def test_logout_ends_the_session_on_every_replica_and_after_restarts(
    cluster: Any,
    api: kubernetes.client.ApiClient,
    namespace: str,
    gw: RunningGateway,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    key = make_key(api, gw, namespace)
    settings = server.Settings(
        call_log_path=str(tmp_path_factory.mktemp("calllog2") / "log.sqlite3"),
        keyring=gw.settings.keyring,
        port=0,
    )
    kept = login(gw, namespace, key)
    with gateway_in_thread(kubeconfig=cluster.kubeconfig, settings=settings) as replica:
        s = login(gw, namespace, key)
        old = s.handle
        assert raw(replica, "task.get_all", old) == {"Status": "Success", "Value": []}
        s.xenapi.session.logout()
        assert raw(gw, "task.get_all", old) == {
            "Status": "Failure",
            "ErrorDescription": ["SESSION_INVALID", old],
        }
        wait_for(
            lambda: raw(replica, "task.get_all", old)["Status"] == "Failure",
            what="the replica to see the logout",
        )
        assert raw(replica, "task.get_all", old)["ErrorDescription"] == ["SESSION_INVALID", old]
        # The XenAPI package retries SESSION_INVALID by logging in again, and without a
        # login to repeat it gives up with its own fault.
        stale = xen(gw)
        stale._session = old
        with pytest.raises(xmlrpc.client.Fault, match="You must log in"):
            stale.xenapi.task.get_all()
    # A gateway started after the logout (a restart) knows it too; other sessions live on.
    with gateway_in_thread(kubeconfig=cluster.kubeconfig, settings=settings) as restarted:
        assert raw(restarted, "task.get_all", old)["ErrorDescription"] == ["SESSION_INVALID", old]
        assert raw(restarted, "task.get_all", kept.handle)["Status"] == "Success"
    assert kept.xenapi.task.get_all() == []


def test_every_error_path_answers_with_the_envelope(
    api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    key = make_key(api, gw, namespace)
    ok = raw(gw, "session.login_with_password", f"user-{namespace}", key)
    assert ok["Status"] == "Success"
    session = ok["Value"]

    def code(answer: dict[str, Any]) -> str:
        assert answer["Status"] == "Failure", answer
        assert set(answer) == {"Status", "ErrorDescription"}
        assert all(isinstance(part, str) for part in answer["ErrorDescription"])
        return str(answer["ErrorDescription"][0])

    assert code(raw(gw, "session.login_with_password", "u", "p")) == (
        "SESSION_AUTHENTICATION_FAILED"
    )
    assert code(raw(gw, "session.login_with_password", 1, 2)) == "FIELD_TYPE_ERROR"
    assert code(raw(gw, "session.login_with_password")) == "MESSAGE_PARAMETER_COUNT_MISMATCH"
    assert code(raw(gw, "no.such_method", session)) == "MESSAGE_METHOD_UNKNOWN"
    assert code(raw(gw, "task.get_all", "OpaqueRef:forged.token")) == "SESSION_INVALID"
    assert code(raw(gw, "task.get_all", "garbage")) == "SESSION_INVALID"
    assert code(raw(gw, "task.get_all", 7)) == "FIELD_TYPE_ERROR"
    assert code(raw(gw, "task.get_all", session, "extra")) == "MESSAGE_PARAMETER_COUNT_MISMATCH"
    assert code(raw(gw, "task.get_record", session, "OpaqueRef:x")) == "HANDLE_INVALID"
    assert code(raw(gw, "task.get_record", session, ["a list"])) == "FIELD_TYPE_ERROR"
    assert code(raw(gw, "event.from", session, "task", "", 0.0)) == "FIELD_TYPE_ERROR"
    assert code(raw(gw, "event.from", session, ["task"], "", "soon")) == "FIELD_TYPE_ERROR"
    assert code(raw(gw, "pool.get_master", session, "OpaqueRef:other")) == "HANDLE_INVALID"
    # Bodies no client library sends, which still reach the dialect.
    assert code(posted(gw, b"<methodCall><methodName>task.get_all")) == ("XMLRPC_UNMARSHAL_FAILURE")
    assert code(posted(gw, b"<?xml version='1.0'?><notACall/>")) == "XMLRPC_UNMARSHAL_FAILURE"
    assert code(posted(gw, raw_call("task.get_all", "<param><value><nil/></value></param>"))) == (
        "XMLRPC_UNMARSHAL_FAILURE"
    )
    assert code(posted(gw, raw_call("task.get_all", ""))) == "MESSAGE_PARAMETER_COUNT_MISMATCH"
    doctype = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]><methodCall/>'
    assert code(posted(gw, doctype)) == "XMLRPC_REQUEST_REFUSED"
    deep = raw_call("task.get_all", "<param>" + "<value><array><data>" * 40 + "</param>")
    assert code(posted(gw, deep)) == "XMLRPC_REQUEST_REFUSED"

    # The call log has the XenAPI calls, without the key or the session.
    entries = gw.gocept(key).log()
    methods = [e["method"] for e in entries]
    assert "session.login_with_password" in methods
    assert "task.get_record" in methods
    for entry in entries:
        text = f"{entry['args']} {entry['result']} {entry['exception']}"
        assert key not in text
        assert session not in text
        assert session.removeprefix("OpaqueRef:") not in text
    login_entry = next(e for e in entries if e["method"] == "session.login_with_password")
    assert "<api key>" in login_entry["args"]
