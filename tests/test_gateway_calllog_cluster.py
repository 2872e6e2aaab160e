"""Call log hygiene end to end: a real gateway, the real API server, Python's xmlrpc.client.

What a tenant can make the gateway store is bounded and scrubbed, and a
store that fails never turns a completed call into an error (a client told
"error" would retry, and a retried create makes a second operation).
"""

from __future__ import annotations

import datetime
import json
import pathlib
import stat
import uuid
from collections.abc import Iterator
from typing import Any

import kubernetes
import prometheus_client.parser
import pytest

from opkeeper import GROUP, VERSION
from opkeeper.gateway import calllog, service
from tests.gateway_support import RunningGateway, fault_of, make_key, module_gateway

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def gw(
    cluster: Any, api: kubernetes.client.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    with module_gateway(
        cluster=cluster,
        api=api,
        tmp_path_factory=tmp_path_factory,
        service=service.Settings(executors={"test_noop": {"builtin": {"action": "noop"}}}),
    ) as running:
        yield running


def _log(gw: RunningGateway, key: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = gw.gocept(key).log(0)
    return entries


def test_secrets_in_params_are_stored_redacted(
    api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    key = make_key(api, gw, namespace)
    proxy = gw.proxy()
    session = proxy.login(key)
    code = f"auth-{uuid.uuid4().hex}"
    opid = proxy.operation_create(session, "test_noop", {"auth_code": code, "years": 1})
    proxy.operation_details(session, opid)
    gw.gocept(key).query("operation", {"id": opid})
    entries = _log(gw, key)[-4:]  # make_key logged in once before
    assert [e["method"] for e in entries] == [
        "login",
        "operation_create",
        "operation_details",
        "query",
    ]
    for entry in entries:
        json.loads(entry["args"])
        json.loads(entry["result"])
        assert code not in entry["args"] + entry["result"]
        assert key not in entry["args"] + entry["result"]
    create, details, query = entries[1:]
    assert json.loads(create["args"])["args"][2] == {"auth_code": calllog.REDACTED, "years": 1}
    assert json.loads(details["result"])["params"]["auth_code"] == calllog.REDACTED
    assert json.loads(query["result"])[0]["params"]["auth_code"] == calllog.REDACTED


def test_a_huge_argument_is_stored_cut_and_echoed_short(
    api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    key = make_key(api, gw, namespace)
    fault = fault_of(lambda: gw.gocept(key).query("Q" * 60_000))
    assert fault.faultCode == 400
    assert len(fault.faultString) < 200
    [entry] = [e for e in _log(gw, key) if e["method"] == "query"]
    assert entry["result"] == "null"  # a faulted call's result is JSON too
    assert len(entry["args"]) <= calllog.JSON_FIELD_MAX
    assert json.loads(entry["args"])["__cut__"]["length"] > 60_000
    assert len(entry["exception"]) < 300


def test_the_call_log_file_is_owner_only(gw: RunningGateway) -> None:
    path = pathlib.Path(gw.gateway.settings.call_log_path)
    for file in path.parent.glob(path.name + "*"):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file.name


class _BrokenStore(calllog.CallLog):
    """A store whose every write fails, as a full disk or a lost database would."""

    def __init__(self, inner: calllog.CallLog) -> None:
        self.inner = inner

    async def _append(self, **entry: Any) -> calllog.Serial:
        raise OSError("disk full")

    async def since(self, *, tenant: str, serial: int, limit: int) -> list[calllog.Entry]:
        return await self.inner.since(tenant=tenant, serial=serial, limit=limit)

    async def latest(self, *, tenant: str, n: int) -> list[calllog.Entry]:
        return await self.inner.latest(tenant=tenant, n=n)

    async def purge(self, *, older_than: datetime.datetime) -> int:
        return 0

    async def close(self) -> None:
        return None


def _failures(gw: RunningGateway) -> float:
    _, text = gw.get("/metrics")
    for family in prometheus_client.parser.text_string_to_metric_families(text):
        if family.name == "opkeeper_gateway_calllog_failures":
            return sum(s.value for s in family.samples if s.name.endswith("_total"))
    raise AssertionError("no opkeeper_gateway_calllog_failures metric")


def test_a_failing_store_never_turns_a_create_into_an_error(
    api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    key = make_key(api, gw, namespace)
    proxy = gw.proxy()
    session = proxy.login(key)
    healthy = gw.gateway.service.call_log
    gw.gateway.service.call_log = _BrokenStore(healthy)
    before = _failures(gw)
    try:
        opid = proxy.operation_create(session, "test_noop", {})
    finally:
        gw.gateway.service.call_log = healthy
    assert isinstance(opid, int)
    assert _failures(gw) == before + 1
    listed = kubernetes.client.CustomObjectsApi(api).list_namespaced_custom_object(
        GROUP, VERSION, namespace, "operations"
    )
    assert [o["metadata"]["name"] for o in listed["items"]] == [f"op-{opid}"]
