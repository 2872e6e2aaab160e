"""Fault: the API server stops and starts again in the middle of a run of operations.

A control plane of its own (etcd + kube-apiserver, :class:`localcluster.LocalCluster`),
so stopping its API server disturbs no other test. The controller and the gateway
run against it; operations use the webhook executor, whose external system counts
POSTs per idempotency key, so "no executor started twice" is counted, not assumed.

The run: operations are created through the gateway and left running externally;
the API server stops; every dialect, asked for a write meanwhile, answers its
"temporarily unavailable" fault (never an HTTP 500 or a traceback); the API server
starts again on the same port; the gateway recovers by itself (no restart), more
operations are created, all finish, and each operation exists once and had its
executor started once.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import pathlib
import time
import xmlrpc.client
from collections.abc import Callable, Iterator
from typing import Any

import cs
import kubernetes
import prometheus_client
import pytest
import XenAPI
from aiohttp import web

from opkeeper import GROUP, VERSION, localcluster
from opkeeper.gateway import auth, server, service
from opkeeper.gateway.dialects import cloudstack
from tests import bdom_support, cloudstack_support
from tests.gateway_support import RunningGateway, gateway_in_thread, make_key
from tests.helpers import FakeExternalSystem, controller_in_thread, wait_for

TYPE = "domain_transfer"
BATCH = 8
"""Operations created before the outage, and again after it."""


class External(FakeExternalSystem):
    """The external system; its jobs run until :attr:`finish` is set, then succeed."""

    finish = False

    async def _poll(self, request: web.Request) -> web.Response:
        if self.finish:
            return web.json_response(
                {"state": "succeeded", "result": {"type": "domain", "value": "example.org"}}
            )
        return web.json_response({"state": "running"})


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[localcluster.LocalCluster]:
    if os.environ.get("OPKEEPER_TEST_KUBECONFIG"):
        pytest.skip("stops and starts an API server: needs the local control plane")
    with localcluster.LocalCluster(state_dir=tmp_path_factory.mktemp("restarted")) as local:
        localcluster.install_crds(kubeconfig=local.kubeconfig)
        yield local


def operations(api: kubernetes.client.ApiClient, namespace: str) -> list[dict[str, Any]]:
    listed = kubernetes.client.CustomObjectsApi(api).list_namespaced_custom_object(
        GROUP, VERSION, namespace, "operations"
    )
    items: list[dict[str, Any]] = listed["items"]
    return items


def test_the_api_server_restarts_mid_run(
    control_plane: localcluster.LocalCluster, tmp_path: pathlib.Path
) -> None:
    started = time.monotonic()
    kubeconfig = str(control_plane.kubeconfig)
    api = kubernetes.config.new_client_from_config(config_file=kubeconfig)
    core = kubernetes.client.CoreV1Api(api)
    namespace, keys = "restart-run", "restart-keys"
    for name in (namespace, keys):
        core.create_namespace({"metadata": {"name": name}})
    with External() as external:
        hook = {
            "webhook": {
                "url": f"{external.url}/start",
                "pollUrl": f"{external.url}/poll/{{id}}",
            }
        }
        settings = server.Settings(
            call_log_path=str(tmp_path / "calllog.sqlite3"),
            keyring=auth.KeyRingSettings(namespace=keys),
            service=service.Settings(executors={TYPE: hook}),
            cloudstack=cloudstack.Settings(commands={"deployVirtualMachine": TYPE}),
            port=0,
        )
        with (
            gateway_in_thread(kubeconfig=kubeconfig, settings=settings) as gw,
            controller_in_thread(
                kubeconfig=kubeconfig,
                namespace=namespace,
                webhook_initial_delay=0.2,
                webhook_max_delay=1.0,
                webhook_allow=("127.0.0.1/32",),
                # As installed: leader election on, with short timings so that the outage
                # (at least the dialects' retry budget) outlasts the renew deadline: the
                # leader stops acting and takes the Lease again after the restart.
                standalone=False,
                lease_duration_seconds=6.0,
                renew_deadline_seconds=4.0,
                retry_period_seconds=1.0,
            ),
        ):
            key = make_key(api, gw, namespace)
            callers = Callers(gw, api, namespace=namespace, key=key)
            gandi = gw.proxy()
            session = gandi.login(key)
            created: list[int] = []

            def states() -> collections.Counter[str]:
                return collections.Counter(
                    o.get("status", {}).get("state", "") for o in operations(api, namespace)
                )

            def create(seq: int) -> None:
                created.append(gandi.operation_create(session, TYPE, {"seq": seq}))

            for seq in range(BATCH):
                create(seq)
            # Started and recorded: an acceptance the controller could not record is POSTed
            # again with the same key once it can (by design, the external system keeps one
            # job per key); waiting for the record keeps the POST count exact.
            wait_for(
                lambda: states()["WaitingExternal"] == BATCH,
                timeout=30,
                what="executors all started and recorded",
            )

            terms = _leader_transitions()
            control_plane.stop_apiserver()
            outage = time.monotonic()
            # Every dialect's write, at once (each spends the client's retry budget).
            with concurrent.futures.ThreadPoolExecutor(len(callers.during_outage)) as pool:
                answers = dict(
                    zip(
                        callers.during_outage,
                        pool.map(lambda call: call(), callers.during_outage.values()),
                        strict=True,
                    )
                )
            for dialect, (ok, detail) in answers.items():
                assert ok, f"{dialect}: {detail}"
            control_plane.start_apiserver()
            outage_seconds = time.monotonic() - outage

            # Recovered by itself: the same gateway, the same session, no restart.
            def recovered() -> bool:
                try:
                    create(BATCH)
                except xmlrpc.client.Fault as fault:
                    if fault.faultCode != 110010:  # anything but "unavailable" is a failure
                        raise
                    return False
                return True

            wait_for(recovered, timeout=60, what="the gateway to write again")
            # The leader stopped acting during the outage and acts again.
            wait_for(
                # Stopped at least once, and acting now (a busy machine may see it flap).
                lambda: (
                    (t := _leader_transitions())[1] > terms[1]
                    and t[0] - t[1] == terms[0] - terms[1]
                ),
                timeout=30,
                what="the controller to lead again",
            )
            recovery_seconds = time.monotonic() - outage - outage_seconds
            for seq in range(BATCH + 1, 2 * BATCH):
                create(seq)
            wait_for(
                lambda: len(external.posts) == 2 * BATCH,
                timeout=60,
                what="every executor started",
            )
            external.finish = True

            try:
                wait_for(
                    lambda: states()["Succeeded"] == 2 * BATCH,
                    timeout=60,
                    what="every operation to succeed",
                )
            except AssertionError as exc:
                raise AssertionError(f"{exc}; states: {dict(states())}") from None

            items = operations(api, namespace)
            seqs = sorted(o["spec"]["params"]["seq"] for o in items)
            assert seqs == list(range(2 * BATCH)), "an operation is missing or duplicated"
            assert len(set(created)) == 2 * BATCH
            # One POST per idempotency key, one key per operation (attempt 0).
            assert set(external.posts.values()) == {1}
            assert len(external.jobs) == 2 * BATCH
            uids = {o["metadata"]["uid"] for o in items}
            assert {key.rsplit("-", 1)[0] for key in external.posts} == uids
    api.close()
    print(
        f"outage {outage_seconds:.1f}s, recovered {recovery_seconds:.1f}s after the restart,"
        f" whole run {time.monotonic() - started:.1f}s"
    )


def _leader_transitions() -> tuple[float, float]:
    """How often this process's controller became leader, and standby (its metric)."""

    def count(to: str) -> float:
        value = prometheus_client.REGISTRY.get_sample_value(
            "opkeeper_controller_leader_transitions_total", {"to": to}
        )
        return value or 0.0

    return count("leader"), count("standby")


class Callers:
    """One write per dialect, each checking that the answer is that dialect's
    "temporarily unavailable": (True, "") or (False, what came instead)."""

    def __init__(
        self, gw: RunningGateway, api: kubernetes.client.ApiClient, *, namespace: str, key: str
    ) -> None:
        self.gw = gw
        self.gandi_session = gw.proxy().login(key)
        self.gocept = gw.gocept(key)
        self.xen = XenAPI.Session(f"{gw.base}/xenapi")
        self.xen.xenapi.login_with_password(f"user-{namespace}", key)
        self.bdom = bdom_support.make_user_key(api, gw, tenant=namespace, user_id="4711")
        creds = cloudstack_support.pair(gw, make_key(api, gw, namespace))
        self.cloudstack = cs.CloudStack(
            endpoint=f"{gw.base}/client/api", key=creds.api_key, secret=creds.secret, timeout=60
        )
        self.during_outage: dict[str, Callable[[], tuple[bool, str]]] = {
            "gandi": self.gandi,
            "gocept": self.gocept_apply,
            "xenapi": self.xenapi,
            "cloudstack": self.cloudstack_deploy,
            "bdom": self.bdom_create,
        }

    def gandi(self) -> tuple[bool, str]:
        try:
            self.gw.proxy().operation_create(self.gandi_session, TYPE, {"seq": -1})
        except xmlrpc.client.Fault as fault:
            ok = fault.faultCode == 110010 and fault.faultString.startswith("ServerError:")
            return ok and "temporarily unavailable" in fault.faultString, repr(fault)
        return False, "no fault"

    def gocept_apply(self) -> tuple[bool, str]:
        try:
            self.gocept.apply([{"__type__": "operation", "name": "outage", "type": TYPE}])
        except xmlrpc.client.Fault as fault:
            return fault.faultCode == 503, repr(fault)
        return False, "no fault"

    def xenapi(self) -> tuple[bool, str]:
        try:
            self.xen.xenapi.task.create("outage", "created during the outage")
        except XenAPI.Failure as failure:
            details = failure.details
            ok = details[0] == "INTERNAL_ERROR" and "temporarily unavailable" in details[1]
            return ok, repr(details)
        return False, "no failure"

    def cloudstack_deploy(self) -> tuple[bool, str]:
        try:
            self.cloudstack.deployVirtualMachine(zoneId="1", serviceOfferingId="2", name="x")
        except cs.CloudStackApiException as exc:
            error = exc.error
            return (error.get("errorcode"), error.get("cserrorcode")) == (534, 4380), repr(error)
        return False, "no error"

    def bdom_create(self) -> tuple[bool, str]:
        reply = self.bdom.post(
            f"/bdom/task/create/-/-/-/-/{self.bdom.user_id}/",
            bdom_support.create_body(opcode=TYPE, name="outage.example"),
        )
        return reply.status == 503 and b"<" in reply.body, f"{reply.status} {reply.body[:300]!r}"
