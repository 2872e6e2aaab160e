"""Read-your-writes: a legacy write returns once the next read sees its effect.

Against the real API server and the real controller, the sequence relaunch ->
details -> cancel -> details -> list(state=CANCEL) runs with no pause between
calls through Python's xmlrpc.client, Perl's XMLRPC::Lite and PHP's xmlrpc
extension (the scripts in tests/clients/, installed by ``make clients``): each
answer must already show the write before it. Fault codes belong to the fault
table (docs/faults.md), so the one refused call is checked only for being a
fault. Then the same for gocept's apply, two replicas, the bound when the
controller never answers, and (with the in-memory API server of
test_gateway_service) the service's waits one by one.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime
import json
import pathlib
import subprocess
import time
import xmlrpc.client
from collections.abc import Callable, Iterator
from typing import Any

import kubernetes
import pytest

from opkeeper import errors, kube, states
from opkeeper.gateway import auth, cache, server, service
from tests import test_gateway_service as fakes
from tests.gateway_support import RunningGateway, gateway_in_thread, make_key, module_gateway
from tests.helpers import Ops, controller_in_thread, wait_for

CLIENTS = pathlib.Path(__file__).parent / "clients"
TRANSFER = "ryw_transfer"
"""An operation type run by the external executor: it waits in WaitingExternal until the
test reports, so a relaunched attempt stays active and can be cancelled."""


@pytest.fixture(scope="module")
def gw(
    cluster: Any, api: kubernetes.client.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    with module_gateway(
        cluster=cluster,
        api=api,
        tmp_path_factory=tmp_path_factory,
        service=service.Settings(executors={TRANSFER: {"external": {}}}),
    ) as running:
        yield running


def failed_transfer(proxy: xmlrpc.client.ServerProxy, session: str, ops: Ops) -> int:
    """An operation created through the gateway whose attempt the registry refused
    (FailedExternal), as the controller sees it: the starting point of a relaunch."""
    opid = int(proxy.operation_create(session, TRANSFER, {"domain": "example.com"}))
    ops.wait_state(f"op-{opid}", "WaitingExternal")
    ops.patch_status(f"op-{opid}", {"errorCode": 402, "errorInfo": ["bad auth code"]})
    ops.wait_state(f"op-{opid}", "FailedExternal")
    wait_for(
        lambda: proxy.operation_details(session, opid)["state"] == "ERROR",
        what="the failure in the gateway's cache",
    )
    return opid


def python_client(url: str, user: str, key: str, opid: int) -> dict[str, Any]:
    """The sequence the Perl and PHP scripts run (the seed's samples, ported), through
    Python's xmlrpc.client, in the same shape as their output."""
    proxy = xmlrpc.client.ServerProxy(url)
    steps: list[dict[str, Any]] = []

    def step(name: str, call: Callable[[], Any]) -> bool:
        started = time.perf_counter()
        try:
            result: dict[str, Any] = {"result": call()}
        except xmlrpc.client.Fault as fault:
            result = {"fault": {"code": fault.faultCode, "string": fault.faultString}}
        steps.append({"step": name, "seconds": time.perf_counter() - started, **result})
        return "fault" not in result

    if not step("login", lambda: proxy.login(user, key)):
        return {"client": "python xmlrpc.client", "steps": steps}
    session = steps[0]["result"]
    now = datetime.datetime.now(datetime.UTC)
    seed_filter = {
        "updated_after": xmlrpc.client.DateTime(now - datetime.timedelta(days=1)),
        "updated_before": xmlrpc.client.DateTime(now + datetime.timedelta(days=1)),
        "state": "ERROR",
        "type": TRANSFER,
    }
    sequence: list[tuple[str, Callable[[], Any]]] = [
        ("list (the seed's filter)", lambda: proxy.operation_list(session, seed_filter)),
        ("relaunch", lambda: proxy.operation_relaunch(session, opid, {"auth_code": "abababab"})),
        ("details after relaunch", lambda: proxy.operation_details(session, opid)),
        ("cancel", lambda: proxy.operation_cancel(session, opid)),
        ("details after cancel", lambda: proxy.operation_details(session, opid)),
        ("list cancelled", lambda: proxy.operation_list(session, {"state": "CANCEL"})),
    ]
    if all(step(name, call) for name, call in sequence):
        step("cancel again", lambda: proxy.operation_cancel(session, opid))
    return {"client": "python xmlrpc.client", "steps": steps}


def script_client(command: list[str]) -> Callable[[str, str, str, int], dict[str, Any]]:
    def run(url: str, user: str, key: str, opid: int) -> dict[str, Any]:
        done = subprocess.run(
            [*command, url, user, key, str(opid), TRANSFER],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        output: dict[str, Any] = json.loads(done.stdout)
        return output

    return run


CLIENT_RUNS: dict[str, Callable[[str, str, str, int], dict[str, Any]]] = {
    "python": python_client,
    "perl": script_client(["perl", str(CLIENTS / "relaunch_cancel.pl")]),
    "php": script_client(["php", str(CLIENTS / "relaunch_cancel.php")]),
}


@pytest.mark.parametrize("client", sorted(CLIENT_RUNS))
def test_relaunch_then_cancel_with_no_pause_between_calls(
    cluster: Any,
    api: kubernetes.client.ApiClient,
    namespace: str,
    gw: RunningGateway,
    client: str,
) -> None:
    key = make_key(api, gw, namespace)
    ops = Ops(api, namespace)
    proxy = gw.proxy()
    with controller_in_thread(kubeconfig=cluster.kubeconfig, namespace=namespace):
        opid = failed_transfer(proxy, proxy.login(key), ops)
        run = CLIENT_RUNS[client](f"{gw.base}/xmlrpc", f"user-{namespace}", key, opid)
    steps = {s["step"]: s for s in run["steps"]}
    answers = {name: s.get("result", s.get("fault")) for name, s in steps.items()}
    assert list(steps) == [
        "login",
        "list (the seed's filter)",
        "relaunch",
        "details after relaunch",
        "cancel",
        "details after cancel",
        "list cancelled",
        "cancel again",
    ], answers
    assert opid in [int(i) for i in steps["list (the seed's filter)"]["result"]], answers
    for name in ("relaunch", "cancel"):
        # <boolean>1</boolean>: Perl's XMLRPC::Lite decodes it as 1, the others as true
        assert steps[name].get("result") in (True, 1, "1"), answers
    relaunched = steps["details after relaunch"]["result"]
    assert relaunched["state"] in ("RUN", "WAIT"), answers
    assert relaunched["params"]["auth_code"] == "abababab"
    assert int(relaunched["id"]) == opid
    assert steps["details after cancel"]["result"]["state"] == "CANCEL", answers
    assert opid in [int(i) for i in steps["list cancelled"]["result"]], answers
    # A cancelled operation cannot be cancelled again: some fault (its code is the fault
    # table's business), not a success.
    assert "fault" in steps["cancel again"], answers
    assert ops.status(f"op-{opid}")["state"] == "Cancelled"
    print(
        f"\n{run['client']}: "
        + ", ".join(f"{s['step']} {s['seconds'] * 1000:.0f} ms" for s in run["steps"])
    )


def test_gocept_apply_set_cancel_and_delete_are_read_at_once(
    cluster: Any, api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    gocept = gw.gocept(make_key(api, gw, namespace))
    with controller_in_thread(kubeconfig=cluster.kubeconfig, namespace=namespace):
        gocept.apply([{"__type__": "operation", "name": "renew", "type": TRANSFER}])
        [created] = gocept.query("operation", {"name": "renew"})
        assert created["type"] == TRANSFER
        gocept.apply([{"__type__": "operation", "name": "renew", "params": {"years": 2}}])
        assert gocept.query("operation", {"name": "renew"})[0]["params"] == {"years": 2}
        gocept.apply([{"__type__": "operation", "name": "renew", "cancel": True}])
        assert gocept.query("operation", {"name": "renew"})[0]["state"] == "Cancelled"
        task = {"__type__": "scheduledtask", "name": "nightly", "schedule": "0 3 * * *"}
        gocept.apply([{**task, "template": {"type": TRANSFER}}])
        assert [t["name"] for t in gocept.query("scheduledtask")] == ["nightly"]
        gocept.apply(
            [
                {"__type__": "operation", "__action__": "delete", "name": "renew"},
                {"__type__": "scheduledtask", "__action__": "delete", "name": "nightly"},
            ]
        )
        assert gocept.query("operation") == []
        assert gocept.query("scheduledtask") == []


def test_writes_on_one_replica_and_the_next_call_on_another(
    cluster: Any,
    api: kubernetes.client.ApiClient,
    namespace: str,
    gw: RunningGateway,
    tmp_path: pathlib.Path,
) -> None:
    """Each replica has its own watch. A write waits only for its own replica's, so a
    write sent to the other replica right after may meet a cache that has not seen the
    operation yet, or not yet the controller's answer: it must then decide on the API
    server's object, never answer "not found" or "already finished" from a lagging
    cache. Reads on the other replica are not promised; how often they lag is printed."""
    settings = dataclasses.replace(gw.settings, port=0, call_log_path=str(tmp_path / "log.sqlite3"))
    with (
        gateway_in_thread(kubeconfig=cluster.kubeconfig, settings=settings) as other,
        controller_in_thread(kubeconfig=cluster.kubeconfig, namespace=namespace),
    ):
        key = make_key(api, gw, namespace)
        wait_for(lambda: _logs_in(other, key), what="the key on the second replica")
        a, b = gw.proxy(), other.proxy()
        session = a.login(key)
        stale = 0
        rounds = 10
        for _ in range(rounds):
            opid = int(a.operation_create(session, TRANSFER, {}))
            stale += b.operation_list(session)[:1] != [opid]
            assert b.operation_cancel(session, opid) is True  # may be a miss on b
            stale += a.operation_details(session, opid)["state"] != "CANCEL"
            assert b.operation_details(session, opid)["state"] == "CANCEL"
            assert b.operation_relaunch(session, opid, {"try": 2}) is True
            assert a.operation_cancel(session, opid) is True  # a may not have seen it
            assert a.operation_details(session, opid)["state"] == "CANCEL"
            assert opid in a.operation_list(session, {"state": "CANCEL"})
        print(f"\nreads on the other replica right after a write: {stale} of {2 * rounds} stale")


def _logs_in(gateway: RunningGateway, key: str) -> bool:
    try:
        gateway.proxy().login(key)
    except xmlrpc.client.Fault:
        return False
    return True


def test_past_the_bound_the_write_stands_and_the_call_succeeds(
    cluster: Any,
    api: kubernetes.client.ApiClient,
    namespace: str,
    gw: RunningGateway,
    tmp_path: pathlib.Path,
) -> None:
    """No controller runs for this namespace, so nobody acts on the relaunch: the call
    answers true after the bound, the write is in the API server and the gateway's
    cache, and the metric counts the late write."""
    settings = server.Settings(
        port=0,
        call_log_path=str(tmp_path / "log.sqlite3"),
        keyring=auth.KeyRingSettings(namespace=gw.key_namespace),
        service=service.Settings(write_visible_timeout_seconds=0.5),
    )
    ops = Ops(api, namespace)
    ops.create("stuck", {"type": TRANSFER, "executor": {"external": {}}})
    # As the controller would have left it: an id and a failed attempt.
    ops.patch_status("stuck", {"id": 4242, "state": "FailedExternal"})
    with gateway_in_thread(kubeconfig=cluster.kubeconfig, settings=settings) as late:
        key = make_key(api, late, namespace)
        proxy = late.proxy()
        session = proxy.login(key)
        opid = 4242
        wait_for(
            lambda: proxy.operation_list(session, {"state": "ERROR"}) == [opid],
            what="the failed operation in the cache",
        )
        started = time.monotonic()
        assert proxy.operation_relaunch(session, opid, {"auth_code": "x"}) is True
        took = time.monotonic() - started
        assert 0.5 <= took < 5, took
        assert ops.get("stuck")["spec"]["relaunch"] == 1
        details = proxy.operation_details(session, opid)
        assert details["params"] == {"auth_code": "x"}
        assert details["state"] == "ERROR"  # the truth: nobody relaunched it
        text = late.get("/metrics")[1]
        assert 'opkeeper_gateway_writes_not_visible_total{write="relaunch"} 1.0' in text


# --- the service's waits, one by one (in-memory API server) ---------------------------


def test_a_wait_ends_when_the_watch_brings_the_version_and_the_condition() -> None:
    async def main() -> None:
        table = cache.OperationCache()
        obj = {
            "metadata": {"namespace": "a", "name": "x", "uid": "u", "resourceVersion": "5"},
            "spec": {"type": "t"},
        }
        table.reset([])
        waiting = asyncio.create_task(
            table.wait(
                "a", "x", version=7, holds=lambda e: e is not None and e.state.value == "Cancelled"
            )
        )
        table.apply(event="ADDED", obj=obj)
        await asyncio.sleep(0)  # let the waiter look (it must not be done)
        assert not waiting.done()
        newer = copy.deepcopy(obj)
        newer["metadata"]["resourceVersion"] = "7"
        table.apply(event="MODIFIED", obj=newer)
        await asyncio.sleep(0)
        assert not waiting.done()  # version reached, condition not yet
        newer["metadata"]["resourceVersion"] = "9"
        newer["status"] = {"state": "Cancelled"}
        table.reset([newer])  # a re-list wakes the waiters too
        await asyncio.wait_for(waiting, timeout=5)
        # Already true: no wait at all.
        await asyncio.wait_for(table.wait("a", "x", version=3, holds=lambda e: True), 0.01)

    asyncio.run(main())


def build(
    late: list[service.WriteKind],
    dry_run: Callable[[fakes.FakeKube], service.DryRun] = fakes.FakeDryRun,
) -> tuple[service.Service, fakes.FakeKube]:
    ops, tasks = cache.OperationCache(), cache.TaskCache()
    fake = fakes.FakeKube(ops, tasks)
    svc = service.Service(
        operations=ops,
        tasks=tasks,
        kube_client=fake,
        dry_run=dry_run(fake),
        id_allocator=fakes.Counter(),
        id_seal=fakes.FixedSeal(),
        call_log=fakes.MemoryCallLog(),
        settings=service.Settings(write_visible_timeout_seconds=0.2),
        on_write_not_visible=late.append,
    )
    return svc, fake


def act_like_the_controller(fake: fakes.FakeKube, namespace: str, name: str) -> None:
    """After the write returned: status as the controller writes it for spec."""
    obj = fake.objects[("operations", namespace, name)]
    status = obj.setdefault("status", {})
    if obj["spec"].get("cancel"):
        status["state"] = states.State.CANCELLED.value
    relaunch = obj["spec"].get("relaunch")
    if relaunch and status.get("observedRelaunch") != relaunch:
        status.update(observedRelaunch=relaunch, state=states.State.PENDING.value)
    fake.set_state(namespace, name, status["state"])


def test_relaunch_and_cancel_wait_for_the_controller_and_not_longer() -> None:
    late: list[service.WriteKind] = []
    svc, fake = build(late)
    fakes.seed(fake, "a", "x")
    fake.set_state("a", "x", states.State.FAILED_EXTERNAL.value)
    entry = svc.operations.get("a", "x")
    assert entry is not None
    assert entry.id is not None
    opid = entry.id

    async def main() -> None:
        loop = asyncio.get_running_loop()
        # The controller answers after the write's own watch event, as a real one does.
        for write in (
            svc.relaunch(who=fakes.A, id_=opid, params={}),
            svc.cancel(who=fakes.A, id_=opid),
        ):
            loop.call_soon(act_like_the_controller, fake, "a", "x")
            await write
            assert not late
            after = svc.operations.get("a", "x")
            assert after is not None
            assert after.state in (states.State.PENDING, states.State.CANCELLED)
        assert svc.operation(who=fakes.A, id_=opid).state is states.State.CANCELLED

    asyncio.run(main())


def test_past_the_bound_the_write_stands_and_is_reported() -> None:
    late: list[service.WriteKind] = []
    svc, fake = build(late)
    fakes.seed(fake, "a", "x")
    entry = svc.operations.get("a", "x")
    assert entry is not None
    assert entry.id is not None
    started = time.monotonic()
    asyncio.run(svc.cancel(who=fakes.A, id_=entry.id))  # no controller: never Cancelled
    assert 0.2 <= time.monotonic() - started < 2
    assert late == ["cancel"]
    assert fake.objects[("operations", "a", "x")]["spec"]["cancel"] is True


def test_a_write_decides_on_the_api_server_when_the_cache_lags() -> None:
    """A cache that has not seen the operation yet, or still shows it finished after
    the controller relaunched it (another replica's write): the write asks the API
    server instead of answering "not found" or "already finished"."""
    late: list[service.WriteKind] = []
    svc, fake = build(late)
    fakes.seed(fake, "a", "x")
    fake.set_state("a", "x", states.State.FAILED_EXTERNAL.value)
    entry = svc.operations.get("a", "x")
    assert entry is not None
    assert entry.id is not None
    opid = entry.id
    # The controller relaunched it, but this cache has not seen that yet.
    obj = fake.objects[("operations", "a", "x")]
    obj["status"].update(state=states.State.WAITING_EXTERNAL.value, observedRelaunch=1)
    obj["spec"]["relaunch"] = 1
    fake._bump(obj)
    assert svc.operation(who=fakes.A, id_=opid).state is states.State.FAILED_EXTERNAL

    async def main() -> None:
        asyncio.get_running_loop().call_soon(act_like_the_controller, fake, "a", "x")
        await svc.cancel(who=fakes.A, id_=opid)

    asyncio.run(main())
    assert late == []
    assert svc.operation(who=fakes.A, id_=opid).state is states.State.CANCELLED
    # A cache that never saw the operation: found through the API server by its id.
    fakes.seed(fake, "a", "y")
    fake.set_state("a", "y", states.State.FAILED_EXTERNAL.value)
    unseen = svc.operations.get("a", "y")
    assert unseen is not None
    assert unseen.id is not None
    unseen_id = unseen.id
    svc.operations.apply(event="DELETED", obj=fake.objects[("operations", "a", "y")])
    with pytest.raises(errors.NotFound):
        svc.operation(who=fakes.A, id_=unseen.id)

    async def relaunch() -> None:
        asyncio.get_running_loop().call_soon(act_like_the_controller, fake, "a", "y")
        await svc.relaunch(who=fakes.A, id_=unseen_id, params={"v": 1})

    asyncio.run(relaunch())
    assert late == []
    assert svc.operation(who=fakes.A, id_=unseen.id).status["observedRelaunch"] == 1
    with pytest.raises(errors.NotFound):
        asyncio.run(svc.cancel(who=fakes.A, id_=cache.OpId(999)))
    # and never another namespace's
    with pytest.raises(errors.NotFound):
        asyncio.run(svc.cancel(who=fakes.B, id_=unseen.id))


class RacingDryRun(fakes.FakeDryRun):
    """The controller writes status between the apply's read and its first dry run."""

    raced = False

    async def patch(
        self, resource: kube.Resource, *, name: str, namespace: str, body: fakes.Body
    ) -> fakes.Body:
        if not self.raced:
            self.raced = True
            self.fake.set_state(namespace, name, states.State.WAITING_EXTERNAL.value)
            raise errors.Conflict("the object has been modified")
        return await super().patch(resource, name=name, namespace=namespace, body=body)


def test_apply_plans_again_when_a_dry_run_meets_a_changed_object() -> None:
    late: list[service.WriteKind] = []
    svc, fake = build(late, dry_run=RacingDryRun)
    fakes.seed(fake, "a", "x", params={"v": 1})
    [record] = asyncio.run(
        svc.apply(who=fakes.A, batch=[{"__type__": "operation", "name": "x", "params": {"v": 2}}])
    )
    assert record["params"] == {"v": 2}
    assert record["state"] == "WaitingExternal"
    assert fake.writes.count(("patch", "x")) == 1
    assert late == []


def test_apply_prepares_a_record_again_when_its_write_meets_a_changed_object() -> None:
    late: list[service.WriteKind] = []
    svc, fake = build(late)
    fakes.seed(fake, "a", "x", params={"v": 1})
    raced: list[str] = []

    def controller_first(verb: str, name: str) -> Exception | None:
        if verb != "patch" or raced:
            return None
        raced.append(name)
        fake.set_state("a", name, states.State.WAITING_EXTERNAL.value)
        return errors.Conflict("the object has been modified")

    fake.fail = controller_first
    batch = [
        {"__type__": "operation", "name": "new", "type": "t"},
        {"__type__": "operation", "name": "x", "params": {"v": 2}},
    ]
    created, updated = asyncio.run(svc.apply(who=fakes.A, batch=batch))
    assert raced == ["x"]
    assert created["name"] == "new"
    assert (updated["params"], updated["state"]) == ({"v": 2}, "WaitingExternal")
    assert svc.query(who=fakes.A, type_="operation", exact={"name": "x"}) == [updated]
    assert late == []
