"""The gateway against the real API server, through Python's stdlib xmlrpc.client.

One gateway runs for the module (in a thread with its own event loop, as a
separate process would, talking HTTP on loopback); every test gets fresh
namespaces and API keys. Tests that need operations to move start the
controller for their namespace. Nothing sleeps to synchronise: tests wait
on conditions with timeouts.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import functools
import json
import pathlib
import urllib.error
import urllib.request
import xmlrpc.client
from collections.abc import Iterator
from typing import Any

import kubernetes
import prometheus_client.parser
import pytest

from opkeeper import GROUP, VERSION, kube
from opkeeper.gateway import auth, calllog_sqlite, server, service
from tests.gateway_support import (
    RunningGateway,
    fault_of,
    gateway_in_thread,
    gateway_process,
    make_key,
    module_gateway,
    other_namespace,
    parse_fault,
    raw_call,
)
from tests.helpers import Ops, controller_in_thread, wait_for

pytestmark = pytest.mark.cluster

EXECUTORS: dict[str, dict[str, Any]] = {
    "test_noop": {"builtin": {"action": "noop"}},
    "test_fail": {"builtin": {"action": "fail", "message": "boom"}},
    "test_sleep": {"builtin": {"action": "sleep", "seconds": 600}},
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


# --- the Gandi dialect, the seed's scenarios ----------------------------------------


def test_seed_scenarios_with_the_controller(
    cluster: Any, api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    key = make_key(api, gw, namespace)
    ops = Ops(api, namespace)
    proxy = gw.proxy()
    with controller_in_thread(kubeconfig=cluster.kubeconfig, namespace=namespace):
        session = proxy.login(key)
        noop = proxy.operation_create(session, "test_noop", {"x": 1})
        failing = proxy.operation_create(
            session,
            "test_fail",
            {"auth_code": "old", "keep": "me"},
            {"kind": "domain", "name": "example.org"},
        )
        external = proxy.operation_create(session, "domain_create", {"domain": "example.org"})
        # Read-your-writes: details right after create, before any watch event.
        assert proxy.operation_details(session, external)["id"] == external
        assert all(isinstance(i, int) for i in (noop, failing, external))
        assert ops.get(f"op-{external}")["spec"]["executor"] == {"external": {}}

        def state(opid: int) -> str:
            return str(proxy.operation_details(session, opid)["state"])

        wait_for(lambda: state(noop) == "DONE", what="noop DONE")
        wait_for(lambda: state(failing) == "ERROR", what="fail ERROR")
        wait_for(lambda: state(external) == "WAIT", what="external WAIT")

        # operation_list: no filter, each filter, and the seed's own example
        assert proxy.operation_list(session) == [external, failing, noop]
        assert proxy.operation_list(session, {}) == [external, failing, noop]
        assert proxy.operation_list(session, {"state": "DONE"}) == [noop]
        assert proxy.operation_list(session, {"state": "ERROR"}) == [failing]
        assert proxy.operation_list(session, {"state": "WAIT"}) == [external]
        assert proxy.operation_list(session, {"state": "RUN"}) == []
        assert proxy.operation_list(session, {"type": "domain_create"}) == [external]
        seed_filter = {
            "updated_after": xmlrpc.client.DateTime("2006-01-01"),
            "updated_before": xmlrpc.client.DateTime("2006-02-01"),
            "state": "DONE",
            "type": "domain_create",
        }
        assert proxy.operation_list(session, seed_filter) == []
        hour_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
        in_an_hour = hour_ago + datetime.timedelta(hours=2)
        window = {
            "updated_after": xmlrpc.client.DateTime(hour_ago),
            "updated_before": xmlrpc.client.DateTime(in_an_hour),
        }
        assert proxy.operation_list(session, window) == [external, failing, noop]
        assert proxy.operation_list(session, {**window, "state": "DONE", "type": "test_noop"}) == [
            noop
        ]
        assert (
            proxy.operation_list(session, {"updated_before": xmlrpc.client.DateTime(hour_ago)})
            == []
        )

        # operation_details: the DESIGN section 4 struct, standard types only
        details = proxy.operation_details(session, failing)
        assert details["id"] == failing
        assert details["type"] == "test_fail"
        assert details["state"] == "ERROR"
        assert isinstance(details["date_created"], xmlrpc.client.DateTime)
        assert isinstance(details["date_updated"], xmlrpc.client.DateTime)
        assert details["params"] == {"auth_code": "old", "keep": "me"}
        assert details["eta"] == 0
        assert isinstance(details["progress"], int)
        assert details["last_error"] == "boom"
        assert details["object"] == {"kind": "domain", "name": "example.org"}
        assert proxy.operation_details(session, noop)["progress"] == 100

        # operation_relaunch, exactly as in the seed
        assert proxy.operation_relaunch(session, failing, {"auth_code": "abababab"}) is True
        spec = ops.get(f"op-{failing}")["spec"]
        assert spec["params"] == {"auth_code": "abababab", "keep": "me"}
        assert spec["relaunch"] == 1
        wait_for(lambda: ops.status(f"op-{failing}").get("attempt") == 1, what="a new attempt")
        wait_for(lambda: state(failing) == "ERROR", what="the relaunched attempt to fail")
        assert proxy.operation_details(session, failing)["params"]["auth_code"] == "abababab"

        # operation_cancel: true for a waiting one, a fault for a finished one
        assert proxy.operation_cancel(session, external) is True
        wait_for(lambda: state(external) == "CANCEL", what="CANCEL")
        fault = fault_of(lambda: proxy.operation_cancel(session, noop))
        assert fault.faultCode == 510060
        assert "cannot be cancelled" in fault.faultString
        assert "cancel" not in ops.get(f"op-{noop}")["spec"]
        assert fault_of(lambda: proxy.operation_cancel(session, external)).faultCode == 510060
        # relaunch of an active operation is refused the same way
        running = proxy.operation_create(session, "test_sleep", {})
        wait_for(lambda: state(running) == "RUN", what="sleep RUN")
        assert fault_of(lambda: proxy.operation_relaunch(session, running, {})).faultCode == 510060


def test_created_operations_use_the_configured_executor(
    api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    key = make_key(api, gw, namespace)
    proxy = gw.proxy()
    session = proxy.login(key)
    ops = Ops(api, namespace)
    opid = proxy.operation_create(session, "test_noop", {})
    obj = ops.get(f"op-{opid}")
    assert obj["spec"]["executor"] == EXECUTORS["test_noop"]
    assert obj["metadata"]["labels"]["opkeeper.dev/id"] == str(opid)
    bad = fault_of(lambda: proxy.operation_create(session, "not a type!", {}))
    assert bad.faultCode == 500030
    assert fault_of(lambda: proxy.operation_create(session, "t", "params")).faultCode == 500010
    wrong_object = fault_of(lambda: proxy.operation_create(session, "t", {}, {"kind": "x"}))
    assert wrong_object.faultCode == 500030


# --- faults ------------------------------------------------------------------------


def test_faults_for_bad_input(
    api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    key = make_key(api, gw, namespace)
    proxy = gw.proxy()
    session = proxy.login(key)

    # bad ids
    assert fault_of(lambda: proxy.operation_details(session, 2_000_000_000)).faultCode == 510040
    # not an id at all: a bad argument, not a missing operation
    assert fault_of(lambda: proxy.operation_details(session, 0)).faultCode == 500020
    assert fault_of(lambda: proxy.operation_details(session, -5)).faultCode == 500020
    assert fault_of(lambda: proxy.operation_details(session, "12")).faultCode == 500010
    status, body = gw.post(
        raw_call(
            "operation_details",
            f"<param><value>{session}</value></param>"
            "<param><value><int>2147483648</int></value></param>",
        )
    )
    assert status == 200
    assert parse_fault(body) == -32600
    status, body = gw.post(
        raw_call(
            "operation_details",
            f"<param><value>{session}</value></param><param><value><i8>5</i8></value></param>",
        )
    )
    assert parse_fault(body) == -32600

    # bad sessions and keys
    assert fault_of(lambda: proxy.operation_list("not-a-session")).faultCode == 500130
    assert fault_of(lambda: proxy.operation_list(42)).faultCode == 500010
    assert fault_of(lambda: proxy.login("opk_wrong")).faultCode == 500130
    # Gandi API v1's login(login, password[, safe]): the key's user id and the key
    user = f"user-{namespace}"
    for token in (proxy.login(user, key), proxy.login(user, key, True)):
        assert isinstance(proxy.operation_list(token), list)
    assert fault_of(lambda: proxy.login("someone-else", key)).faultCode == 500130
    assert fault_of(lambda: proxy.login(user, "opk_wrong")).faultCode == 500130
    assert fault_of(lambda: proxy.login(user, key, "yes")).faultCode == 500010
    assert fault_of(lambda: gw.gocept("opk_wrong").query("operation")).faultCode == 401
    assert fault_of(lambda: proxy.query("operation")).faultCode == 401  # no Basic auth

    # bad types and arity
    assert fault_of(lambda: proxy.operation_list(session, "DONE")).faultCode == 500010
    assert (
        fault_of(lambda: proxy.operation_list(session, {"state": "FINISHED"})).faultCode == 500030
    )
    assert fault_of(lambda: proxy.operation_list(session, {"colour": "red"})).faultCode == 500030
    assert (
        fault_of(lambda: proxy.operation_list(session, {"updated_after": "2006-01-01"})).faultCode
        == 500010
    )
    assert fault_of(lambda: proxy.operation_details(session)).faultCode == 500010
    assert fault_of(lambda: proxy.operation_relaunch(session, 1, [])).faultCode == 500010

    # unknown methods
    fault = fault_of(lambda: proxy.operation_frobnicate(session))
    assert fault.faultCode == -32601
    assert "operation_frobnicate" in fault.faultString
    assert fault_of(lambda: proxy.system.listMethods()).faultCode == -32601

    # malformed, oversized, entity expansion
    status, body = gw.post(b"<methodCall><methodName>login</methodName>")
    assert (status, parse_fault(body)) == (200, -32700)
    status, body = gw.post(b"")
    assert parse_fault(body) == -32700
    huge = raw_call("login", "<param><value>" + "x" * (2 * 1024 * 1024) + "</value></param>")
    status, body = gw.post(huge)
    assert (status, parse_fault(body)) == (200, -32702)
    # the same without a Content-Length (chunked): the stream is cut off at the limit
    chunks = iter([huge[i : i + 65536] for i in range(0, len(huge), 65536)])
    status, body = gw.post(chunks)  # type: ignore[arg-type]
    assert (status, parse_fault(body)) == (200, -32702)
    small = iter([raw_call("operation_list", f"<param><value>{session}</value></param>")])
    assert xmlrpc.client.loads(gw.post(small)[1])[0] == ([],)  # type: ignore[arg-type]
    laughs = (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        b'<!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
        b'<!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">'
        b'<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">'
        b'<!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">'
        b'<!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">'
        b'<!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">'
        b'<!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">'
        b'<!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">'
        b'<!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">]>'
        b"<methodCall><methodName>login</methodName><params><param><value>&lol9;</value>"
        b"</param></params></methodCall>"
    )
    status, body = gw.post(laughs)
    assert (status, parse_fault(body)) == (200, -32701)
    deep = raw_call(
        "login",
        "<param>" + "<value><array><data>" * 100 + "</data></array></value>" * 100 + "</param>",
    )
    assert parse_fault(gw.post(deep)[1]) == -32703
    # the gateway is still fine afterwards
    assert proxy.operation_list(session) == []
    # only POST
    assert gw.get("/xmlrpc")[0] == 405


def test_an_id_beyond_32_bits_is_a_clear_fault(
    api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    key = make_key(api, gw, namespace)
    ops = Ops(api, namespace)
    ops.create(
        "huge",
        {"type": "t", "executor": {"external": {}}},
        labels={"opkeeper.dev/id": "3000000000"},
    )
    wait_for(lambda: gw.gateway.operations.get(namespace, "huge"), what="the cache")
    session = gw.proxy().login(key)
    fault = fault_of(lambda: gw.proxy().operation_list(session))
    assert fault.faultCode == 150010
    assert "3000000000" in fault.faultString


# --- the gocept dialect --------------------------------------------------------------


def test_gocept_apply_query_and_all_or_nothing(
    api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    key = make_key(api, gw, namespace)
    server_ = gw.gocept(key)
    ops = Ops(api, namespace)
    custom = kubernetes.client.CustomObjectsApi(api)

    created = server_.apply(
        [
            {
                "__type__": "operation",
                "name": "gc-1",
                "type": "domain_renew",
                "params": {"years": 1},
                "object": {"kind": "domain", "name": "example.org"},
            },
            {
                "__type__": "scheduledtask",
                "name": "nightly",
                "schedule": "0 3 * * *",
                "template": {"type": "backup", "params": {"full": True}},
            },
            {"__type__": "operation", "__action__": "delete", "name": "never-existed"},
        ]
    )
    assert len(created) == 2
    op_record, task_record = created
    assert op_record["__type__"] == "operation"
    assert op_record["name"] == "gc-1"
    assert isinstance(op_record["id"], int)
    assert op_record["state"] == "Pending"
    assert op_record["executor"] == {"external": {}}
    assert task_record["template"]["type"] == "backup"
    assert task_record["schedule"] == "0 3 * * *"

    # sparse update: only params change, the rest is kept
    [updated] = server_.apply([{"__type__": "operation", "name": "gc-1", "params": {"years": 2}}])
    assert updated["params"] == {"years": 2}
    assert updated["type"] == "domain_renew"
    assert updated["object"] == {"kind": "domain", "name": "example.org"}
    assert ops.get("gc-1")["spec"]["object"] == {"kind": "domain", "name": "example.org"}
    # a record read with query can be sent back unchanged
    [queried] = server_.query("operation", {"name": "gc-1"})
    assert server_.apply([queried])[0]["params"] == {"years": 2}
    # but a read-only key with another value is refused
    assert (
        fault_of(
            lambda: server_.apply([{"__type__": "operation", "name": "gc-1", "state": "Succeeded"}])
        ).faultCode
        == 400
    )

    # all or nothing: the third record fails validation only on the server (the CRD's
    # CEL rule "exactly one of execAt and schedule"), so neither the create nor the
    # update happens
    before = ops.get("gc-1")
    fault = fault_of(
        lambda: server_.apply(
            [
                {"__type__": "operation", "name": "gc-2", "type": "domain_renew"},
                {"__type__": "operation", "name": "gc-1", "params": {"years": 3}},
                {
                    "__type__": "scheduledtask",
                    "name": "gc-bad",
                    "exec_at": datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC),
                    "schedule": "0 3 * * *",
                    "template": {"type": "backup"},
                },
            ]
        )
    )
    assert fault.faultCode == 400
    assert "record 3" in fault.faultString
    with pytest.raises(kubernetes.client.ApiException) as missing:
        ops.get("gc-2")
    assert missing.value.status == 404
    assert ops.get("gc-1")["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    # locally invalid records are refused before anything is sent
    for bad in (
        {"__type__": "virtualmachine", "name": "x"},
        {"__type__": "operation"},
        {"__type__": "operation", "name": "new-one"},  # no type: required on create
        {"__type__": "operation", "name": "gc-1", "colour": "red"},
        {"__type__": "operation", "name": "Bad_Name", "type": "t"},
        {"__type__": "operation", "__action__": "explode", "name": "gc-1"},
    ):
        assert fault_of(lambda b=bad: server_.apply([b])).faultCode == 400, bad
    assert fault_of(lambda: server_.apply("records")).faultCode == -32602

    # cancel through apply follows the state machine
    ops.patch_status("gc-1", {"state": "Succeeded"})
    wait_for(
        lambda: server_.query("operation", {"name": "gc-1"})[0]["state"] == "Succeeded",
        what="the reported state in the cache",
    )
    fault = fault_of(
        lambda: server_.apply([{"__type__": "operation", "name": "gc-1", "cancel": True}])
    )
    assert fault.faultCode == 422

    # query: exact matches on indexed and other keys
    assert [r["name"] for r in server_.query("operation")] == ["gc-1"]
    assert (
        server_.query("operation", {"type": "domain_renew", "state": "Succeeded"})[0]["name"]
        == "gc-1"
    )
    assert server_.query("operation", {"type": "domain_create"}) == []
    assert len(server_.query("operation", {"params": {"years": 2}})) == 1
    by_object = server_.query("operation", {"object": {"kind": "domain", "name": "example.org"}})
    assert [r["name"] for r in by_object] == ["gc-1"]
    assert server_.query("scheduledtask", {"name": "nightly"})[0]["template"]["params"] == {
        "full": True
    }
    assert fault_of(lambda: server_.query("virtualmachine")).faultCode == 400
    assert fault_of(lambda: server_.query("operation", {"colour": "red"})).faultCode == 400

    # delete; deleting again is not an error
    assert (
        server_.apply([{"__type__": "scheduledtask", "__action__": "delete", "name": "nightly"}])
        == []
    )
    assert (
        server_.apply([{"__type__": "scheduledtask", "__action__": "delete", "name": "nightly"}])
        == []
    )
    tasks = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "scheduledtasks")
    assert tasks["items"] == []


def test_gocept_log_is_gapless_and_never_logs_itself(
    api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    key = make_key(api, gw, namespace)  # make_key logs in (logged calls)
    server_ = gw.gocept(key)
    proxy = gw.proxy()
    session = proxy.login(key)
    for i in range(12):
        server_.query("operation", {"name": f"n{i}"})
    fault_of(lambda: proxy.operation_details(session, 12345))
    latest = server_.log()
    assert len(latest) == 10
    serials = [e["serial"] for e in latest]
    assert serials == sorted(serials)
    assert serials == list(range(serials[0], serials[0] + 10))
    last = latest[-1]
    assert last["method"] == "operation_details"
    assert last["exception"].startswith("510040: DataError: operation")
    assert json.loads(last["args"]) == {"args": ["<session>", 12345], "kw": {}}
    assert last["ipaddress"] == "127.0.0.1"
    assert last["resource_group"] == namespace
    query_entry = latest[-2]
    assert query_entry["method"] == "query"
    assert json.loads(query_entry["args"]) == {"args": ["operation", {"name": "n11"}], "kw": {}}
    assert json.loads(query_entry["result"]) == []
    # walk everything from 0: no gaps, no log() calls, no key or session anywhere
    walked: list[dict[str, Any]] = []
    serial = 0
    while page := server_.log(serial):
        walked.extend(page)
        serial = page[-1]["serial"]
    assert [e["serial"] for e in walked] == list(range(1, len(walked) + 1))
    assert all(e["method"] != "log" for e in walked)
    logins = [e for e in walked if e["method"] == "login"]
    assert logins
    assert all(json.loads(e["args"])["args"] == ["<api key>"] for e in logins)
    assert key not in json.dumps(walked)
    assert session not in json.dumps(walked)
    assert server_.log(serial) == []
    assert fault_of(lambda: server_.log("x")).faultCode == -32602
    assert fault_of(lambda: server_.log(-1)).faultCode == 400


# --- tenancy: every method -------------------------------------------------------------


def test_a_caller_never_sees_or_touches_another_namespace(
    api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    other = other_namespace(api)
    key_a = make_key(api, gw, namespace)
    key_b = make_key(api, gw, other)
    proxy = gw.proxy()
    a, b = proxy.login(key_a), proxy.login(key_b)
    ops_a, ops_b = Ops(api, namespace), Ops(api, other)
    mine = proxy.operation_create(a, "domain_create", {"secret": "a"})
    gw.gocept(key_a).apply(
        [
            {"__type__": "operation", "name": "shared-name", "type": "t"},
            {
                "__type__": "scheduledtask",
                "name": "task-a",
                "schedule": "0 3 * * *",
                "template": {"type": "t"},
            },
        ]
    )
    before = ops_a.get(f"op-{mine}")

    # login: B's session is B's
    assert asyncio.run(gw.gateway.sessions.resolve(b)).tenant == other
    # operation_list
    assert mine not in proxy.operation_list(b)
    assert proxy.operation_list(b) == []
    # operation_details / relaunch / cancel: "not found", exactly like a missing id
    for call in (
        lambda: proxy.operation_details(b, mine),
        lambda: proxy.operation_relaunch(b, mine, {"secret": "b"}),
        lambda: proxy.operation_cancel(b, mine),
    ):
        fault = fault_of(call)
        assert fault.faultCode == 510040
        assert fault.faultString == f"DataError: operation {mine} not found"
    # operation_create: lands in B's namespace
    theirs = proxy.operation_create(b, "domain_create", {})
    ops_b.get(f"op-{theirs}")
    with pytest.raises(kubernetes.client.ApiException):
        ops_a.get(f"op-{theirs}")
    assert fault_of(lambda: proxy.operation_details(a, theirs)).faultCode == 510040
    # gocept query
    gb = gw.gocept(key_b)
    assert [r["name"] for r in gb.query("operation")] == [f"op-{theirs}"]
    assert gb.query("operation", {"name": "shared-name"}) == []
    assert gb.query("operation", {"id": mine}) == []
    assert gb.query("scheduledtask") == []
    # gocept apply: the same name is B's own object; deleting it never touches A's
    [record] = gb.apply([{"__type__": "operation", "name": "shared-name", "type": "other"}])
    assert record["type"] == "other"
    assert ops_a.get("shared-name")["spec"]["type"] == "t"
    gb.apply(
        [
            {"__type__": "operation", "__action__": "delete", "name": "shared-name"},
            {"__type__": "scheduledtask", "__action__": "delete", "name": "task-a"},
        ]
    )
    assert ops_a.get("shared-name")["spec"]["type"] == "t"
    assert gw.gocept(key_a).query("scheduledtask", {"name": "task-a"})
    # gocept log: B sees only B's calls
    b_log = gb.log(0)
    assert b_log
    assert all(e["resource_group"] == other for e in b_log)
    assert '"secret":"a"' not in json.dumps(b_log)
    a_log = gw.gocept(key_a).log(0)
    assert all(e["resource_group"] == namespace for e in a_log)
    assert not {"operation_relaunch", "operation_cancel"} & {e["method"] for e in a_log}
    # A's operation is exactly as it was
    after = ops_a.get(f"op-{mine}")
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


# --- several gateways ------------------------------------------------------------------


def test_a_session_from_one_gateway_works_on_another(
    cluster: Any,
    api: kubernetes.client.ApiClient,
    namespace: str,
    gw: RunningGateway,
    tmp_path: pathlib.Path,
) -> None:
    """Two replicas share the session key Secret: login on one, call the other; a
    tampered token is an unknown session on both, and revoking the key ends it on both."""
    settings = server.Settings(
        port=0,
        call_log_path=str(tmp_path / "log.sqlite3"),
        keyring=auth.KeyRingSettings(namespace=gw.key_namespace),
    )
    with gateway_in_thread(kubeconfig=cluster.kubeconfig, settings=settings) as other:
        key = make_key(api, gw, namespace)
        wait_for(lambda: _logs_in(other, key), what="the key to reach the second gateway")
        session = gw.proxy().login(key)
        assert other.proxy().operation_list(session) == []
        assert gw.proxy().operation_list(other.proxy().login(key)) == []
        payload, _, mac = session.partition(".")
        tampered = f"{payload[:-1]}{'A' if payload[-1] != 'A' else 'B'}.{mac}"
        for replica in (gw, other):
            fault = fault_of(functools.partial(replica.proxy().operation_list, tampered))
            assert (fault.faultCode, fault.faultString) == (
                500130,
                "DataError: unknown session; log in again",
            )
        secret = next(
            s
            for s in kubernetes.client.CoreV1Api(api).list_namespaced_secret(gw.key_namespace).items
            if s.data["keyHash"] == base64.b64encode(auth.hash_key(key).encode()).decode()
        )
        kubernetes.client.CoreV1Api(api).delete_namespaced_secret(
            secret.metadata.name, gw.key_namespace
        )
        for replica in (gw, other):
            wait_for(
                functools.partial(_revoked, replica, session),
                what="the revocation to reach every gateway",
            )


def _logs_in(gateway: RunningGateway, key: str) -> bool:
    try:
        gateway.proxy().login(key)
    except xmlrpc.client.Fault:
        return False
    return True


def _revoked(gateway: RunningGateway, session: str) -> bool:
    try:
        gateway.proxy().operation_list(session)
    except xmlrpc.client.Fault as fault:
        return "revoked" in fault.faultString
    return False


# --- probes and metrics ------------------------------------------------------------------


def test_health_readiness_and_metrics(
    api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    key = make_key(api, gw, namespace)
    proxy = gw.proxy()
    session = proxy.login(key)
    proxy.operation_list(session)
    fault_of(lambda: proxy.operation_details(session, 777777))
    fault_of(lambda: proxy.nope())
    assert gw.get("/healthz") == (200, "ok\n")
    assert gw.get("/readyz") == (200, "ok\n")
    status, text = gw.get("/metrics")
    assert status == 200
    assert 'opkeeper_gateway_requests_total{dialect="gandi",method="login",outcome="ok"}' in text
    assert (
        'opkeeper_gateway_requests_total{dialect="gandi",method="operation_details",'
        'outcome="not_found"}' in text
    )
    assert 'opkeeper_gateway_requests_total{dialect="none",method="unknown",' in text
    assert "opkeeper_gateway_request_seconds_bucket" in text
    assert 'opkeeper_gateway_cached_objects{kind="operation"}' in text


def test_readyz_waits_for_the_first_list(cluster: Any, tmp_path: pathlib.Path) -> None:
    async def main() -> tuple[bool, bool]:
        credentials = kube.Credentials.from_kubeconfig(cluster.kubeconfig)
        store = calllog_sqlite.SqliteCallLog(
            settings=calllog_sqlite.SqliteSettings(path=str(tmp_path / "log.sqlite3"))
        )
        await store.open()
        async with kube.Client(credentials) as client:
            gateway = server.Gateway(settings=server.Settings(), kube_client=client, call_log=store)
            before = gateway.ready
            gateway.start_feeds()
            await asyncio.wait_for(
                asyncio.gather(*(e.wait() for e in gateway.synced.values())), timeout=60
            )
            after = gateway.ready
            await gateway.stop()
        await store.close()
        return before, after

    assert asyncio.run(main()) == (False, True)


def test_workers_share_the_port_the_sessions_and_the_metrics(
    cluster: Any, api: kubernetes.client.ApiClient, namespace: str, tmp_path: pathlib.Path
) -> None:
    key_namespace = other_namespace(api)
    logins = 0
    with gateway_process(cluster, tmp_path, key_namespace, "--workers", "2") as gateway:
        url = gateway.url

        def login(key: str) -> str:
            # A new proxy is a new connection, which the kernel gives to either worker.
            nonlocal logins
            session = str(xmlrpc.client.ServerProxy(f"{url}/xmlrpc").login(key))
            logins += 1
            return session

        key = auth.new_key()
        kubernetes.client.CoreV1Api(api).create_namespaced_secret(
            key_namespace,
            auth.key_secret(
                name="key", namespace=key_namespace, key=key, user_id="u", tenant=namespace
            ),
        )

        def every_worker_knows_the_key() -> bool:
            try:
                for _ in range(10):
                    login(key)
            except (OSError, xmlrpc.client.Fault):
                return False
            return True

        wait_for(every_worker_knows_the_key, timeout=60, what="both workers to know the key")
        sessions = [login(key) for _ in range(20)]
        for session in sessions:
            assert xmlrpc.client.ServerProxy(f"{url}/xmlrpc").operation_list(session) == []
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            text = response.read().decode()
        counted = {
            sample.labels["outcome"]: sample.value
            for family in prometheus_client.parser.text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "opkeeper_gateway_requests_total"
            and sample.labels["method"] == "login"
        }
        assert counted["ok"] == logins  # the sum over both workers, not the one scraped
        assert 'opkeeper_gateway_cached_objects{kind="operation"}' in text
    assert (tmp_path / "gateway.log").read_text().count("gateway stopped") == 2
