"""Per-tenant write budgets: the bucket's arithmetic without I/O, then a Gandi client over
its budget against the real API server (refused before anything is written; other
tenants and reads unaffected)."""

from __future__ import annotations

import argparse
import json
import xmlrpc.client
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest

from opkeeper import GROUP, VERSION, errors
from opkeeper.gateway import cli as gateway_cli
from opkeeper.gateway import ratelimit, service
from opkeeper.gateway.dialects import bdom
from tests import hostile_aggregated
from tests.gateway_support import (
    RunningGateway,
    fault_of,
    make_key,
    module_gateway,
    other_namespace,
)
from tests.helpers import Ops
from tests.hostile import Tenant

SMALL = ratelimit.Settings(writes_per_second=2.0, burst=3)


def test_a_fresh_bucket_pays_a_burst_then_refills_at_the_rate() -> None:
    bucket = None
    for _ in range(3):
        bucket, wait = ratelimit.take(bucket, cost=1, now=10.0, settings=SMALL)
        assert wait == 0.0
    assert bucket is not None
    refused, wait = ratelimit.take(bucket, cost=1, now=10.0, settings=SMALL)
    assert wait == pytest.approx(0.5)
    assert refused == bucket, "a refused write is not charged"
    paid, wait = ratelimit.take(refused, cost=1, now=10.5, settings=SMALL)
    assert (wait, paid.tokens) == (0.0, pytest.approx(0.0))


def test_a_batch_larger_than_the_burst_waits_for_a_full_bucket() -> None:
    empty = ratelimit.Bucket(tokens=0.0, at=0.0)
    _, wait = ratelimit.take(empty, cost=100, now=0.0, settings=SMALL)
    assert wait == pytest.approx(1.5)
    paid, wait = ratelimit.take(empty, cost=100, now=1.5, settings=SMALL)
    assert (wait, paid.tokens) == (0.0, 0.0)


def test_the_limiter_refuses_per_tenant_and_forgets_refilled_buckets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [0.0]
    limiter = ratelimit.Limiter(settings=SMALL, clock=lambda: now[0])
    for _ in range(3):
        limiter.charge(tenant="a")
    with pytest.raises(errors.RateLimited) as caught:
        limiter.charge(tenant="a")
    assert isinstance(caught.value, errors.Unavailable)
    assert caught.value.retry_after == pytest.approx(0.5)
    assert "retry in 0.5 s" in str(caught.value)
    limiter.charge(tenant="b")
    monkeypatch.setattr(ratelimit, "TRACKED_TENANTS_MAX", 2)
    now[0] = 100.0
    limiter.charge(tenant="c")
    assert set(limiter._buckets) == {"c"}, "full buckets go once the table is full"


def test_no_limit_when_the_rate_is_zero() -> None:
    limiter = ratelimit.Limiter(settings=ratelimit.Settings(writes_per_second=0, burst=1))
    for _ in range(10):
        limiter.charge(tenant="a")


def test_the_budget_is_a_command_line_setting() -> None:
    parser = argparse.ArgumentParser()
    gateway_cli.add_arguments(parser)
    default = gateway_cli.settings_from(parser.parse_args([])).service.writes
    assert default == ratelimit.Settings()
    args = parser.parse_args(["--tenant-write-rate", "5", "--tenant-write-burst", "20"])
    assert gateway_cli.settings_from(args).service.writes == ratelimit.Settings(
        writes_per_second=5.0, burst=20
    )
    with pytest.raises(SystemExit):
        gateway_cli.settings_from(parser.parse_args(["--tenant-write-burst", "0"]))


@pytest.fixture(scope="module")
def gw(
    cluster: Any, api: kubernetes.client.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    budget = ratelimit.Settings(writes_per_second=0.01, burst=2)
    front_proxy = hostile_aggregated.front_proxy(
        cluster.kubeconfig, tmp_path_factory.mktemp("aggregated")
    )
    with module_gateway(
        cluster=cluster,
        api=api,
        tmp_path_factory=tmp_path_factory,
        aggregated=None if front_proxy is None else front_proxy.settings,
        service=service.Settings(writes=budget),
    ) as running:
        hostile_aggregated.attach(running, front_proxy, api)
        yield running


@pytest.mark.cluster
def test_a_tenant_over_its_budget_is_told_to_retry_and_nothing_is_written(
    api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    proxy = gw.proxy()
    session = proxy.login(make_key(api, gw, namespace))
    first = proxy.operation_create(session, "domain_create", {"n": 1})
    proxy.operation_create(session, "domain_create", {"n": 2})
    fault = fault_of(lambda: proxy.operation_create(session, "domain_create", {"n": 3}))
    assert fault.faultCode == 110030  # rate_limited: a ServerError, so clients retry later
    assert f"namespace {namespace} is writing faster than" in fault.faultString
    listed = Ops(api, namespace).custom.list_namespaced_custom_object(
        GROUP, VERSION, namespace, "operations"
    )
    assert len(listed["items"]) == 2, "the refused create wrote nothing"
    fault = fault_of(lambda: proxy.operation_cancel(session, first))
    assert fault.faultCode == 110030
    assert proxy.operation_details(session, first)["id"] == first, "reads are not charged"
    other = other_namespace(api)
    other_session = proxy.login(make_key(api, gw, other))
    assert proxy.operation_create(other_session, "domain_create", {})


@pytest.mark.cluster
def test_the_aggregated_api_answers_a_kubernetes_429_with_retry_after(
    api: kubernetes.client.ApiClient, gw: RunningGateway
) -> None:
    """Through kube-apiserver, a 429 Status with Retry-After is what client-go waits out
    and retries by itself (an XML-RPC fault in a 200 it would hand to the caller)."""
    namespace = other_namespace(api)
    client = hostile_aggregated.AggregatedAdapter(gw).client(
        Tenant(namespace=namespace, key="", marker="", ids={}, tasks=())
    )
    create = xmlrpc.client.dumps(("", "domain_create", {"n": 1}), "operation_create").encode()
    assert client.post(create).status == 200
    assert client.post(create).status == 200
    refused = client.post(create)
    assert refused.status == 429
    status = json.loads(refused.body)
    assert (status["kind"], status["code"], status["reason"]) == ("Status", 429, "TooManyRequests")
    assert f"namespace {namespace} is writing faster than" in status["message"]
    assert int(refused.headers["retry-after"]) == status["details"]["retryAfterSeconds"] >= 1
    listed = Ops(api, namespace).custom.list_namespaced_custom_object(
        GROUP, VERSION, namespace, "operations"
    )
    assert len(listed["items"]) == 2, "the refused create wrote nothing"
    details = xmlrpc.client.dumps(("", 1), "operation_details").encode()
    assert client.post(details).status == 200, "reads are not charged"


def test_bdom_answers_429_with_retry_after_in_whole_seconds() -> None:
    endpoint = bdom.Endpoint(svc=None, keyring=None)  # type: ignore[arg-type]  # unused
    reply = endpoint._error(errors.RateLimited("slow down", retry_after=0.3), opcode="create")
    assert (reply.status, reply.outcome) == (429, "rate_limited")
    assert reply.headers["Retry-After"] == "1"
