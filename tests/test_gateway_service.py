"""The domain service with an in-memory API server stand-in, for the paths a real API
server will not produce on demand: a write that fails after its dry run passed (the
undo of an apply batch) and an object that changes between the cache read and the
conditional write. The real API server covers everything else (test_gateway_cluster).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import datetime
from collections.abc import Callable
from typing import Any, Literal

import pytest

from opkeeper import API_VERSION, errors, ids, kube, states
from opkeeper.gateway import auth, cache, calllog, kubeio, service
from opkeeper.gateway import cli as gateway_cli

Body = dict[str, Any]
A = auth.Identity(user_id="alice", tenant=auth.Tenant("a"), key_hash=auth.hash_key("ka"))
B = auth.Identity(user_id="bob", tenant=auth.Tenant("b"), key_hash=auth.hash_key("kb"))


def merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


class FakeKube:
    """Objects in a dict, resourceVersions, preconditions, and injectable failures.

    Every successful write is fed to the caches like a watch event would be.
    """

    def __init__(self, ops: cache.OperationCache, tasks: cache.TaskCache) -> None:
        self.objects: dict[tuple[str, str, str], Body] = {}
        self.rv = 0
        self.fail: Callable[[str, str], Exception | None] = lambda verb, name: None
        self.writes: list[tuple[str, str]] = []
        self._caches = {"operations": ops, "scheduledtasks": tasks}

    def _bump(self, obj: Body) -> Body:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        return obj

    def _feed(self, plural: str, event: str, obj: Body) -> None:
        self._caches[plural].apply(event=event, obj=copy.deepcopy(obj))

    def _check(self, verb: str, name: str) -> None:
        exc = self.fail(verb, name)
        if exc is not None:
            raise exc

    async def get(
        self,
        resource: kube.Resource,
        *,
        name: str,
        namespace: str | None = None,
        subresource: str | None = None,
    ) -> Body:
        try:
            return copy.deepcopy(self.objects[(resource.plural, str(namespace), name)])
        except KeyError:
            raise errors.NotFound(f"{name} not found") from None

    async def list(
        self,
        resource: kube.Resource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
    ) -> kube.ObjectList:
        label, _, value = (label_selector or "").partition("=")
        items = [
            copy.deepcopy(obj)
            for (plural, ns, _), obj in self.objects.items()
            if plural == resource.plural
            and ns == namespace
            and (not label or obj["metadata"].get("labels", {}).get(label) == value)
        ]
        return kube.ObjectList(items=items, resource_version=str(self.rv))

    async def create(
        self,
        resource: kube.Resource,
        body: Body,
        *,
        namespace: str | None = None,
        dry_run: bool = False,
    ) -> Body:
        key = (resource.plural, str(namespace), body["metadata"]["name"])
        if key in self.objects:
            raise kube.AlreadyExists(f"{key} exists")
        if dry_run:
            return copy.deepcopy(body)
        self._check("create", key[2])
        obj = copy.deepcopy(body)
        obj["metadata"].update(namespace=namespace, uid=f"uid-{self.rv + 1}")
        self.objects[key] = self._bump(obj)
        self.writes.append(("create", key[2]))
        self._feed(resource.plural, "ADDED", obj)
        return copy.deepcopy(obj)

    async def patch(
        self,
        resource: kube.Resource,
        *,
        name: str,
        body: Any,
        namespace: str | None = None,
        patch_type: kube.PatchType = "merge",
        subresource: str | None = None,
        force: bool = False,
    ) -> Body:
        key = (resource.plural, str(namespace), name)
        current = self.objects.get(key)
        if current is None:
            raise errors.NotFound(name)
        wanted = (body.get("metadata") or {}).get("resourceVersion")
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            raise errors.Conflict("the object has been modified")
        self._check("patch", name)
        patch = {k: v for k, v in body.items() if k != "metadata"}
        obj = merge(current, patch)
        self.objects[key] = self._bump(obj)
        self.writes.append(("patch", name))
        self._feed(resource.plural, "MODIFIED", obj)
        return copy.deepcopy(obj)

    async def delete(
        self,
        resource: kube.Resource,
        *,
        name: str,
        namespace: str | None = None,
        uid: str | None = None,
        resource_version: str | None = None,
        propagation: Literal["Background", "Foreground", "Orphan"] | None = None,
    ) -> None:
        key = (resource.plural, str(namespace), name)
        if key not in self.objects:
            raise errors.NotFound(name)
        self._check("delete", name)
        obj = self.objects.pop(key)
        self.writes.append(("delete", name))
        self._feed(resource.plural, "DELETED", obj)

    def set_state(self, namespace: str, name: str, state: str) -> None:
        """What the controller does: a status write (a new resourceVersion)."""
        obj = self.objects[("operations", namespace, name)]
        obj.setdefault("status", {})["state"] = state
        self._bump(obj)
        self._feed("operations", "MODIFIED", obj)


class FakeDryRun:
    def __init__(self, fake: FakeKube) -> None:
        self.fake = fake

    async def patch(
        self, resource: kube.Resource, *, name: str, namespace: str, body: Body
    ) -> Body:
        return await self.fake.get(resource, name=name, namespace=namespace)

    async def delete(self, resource: kube.Resource, *, name: str, namespace: str, uid: str) -> None:
        await self.fake.get(resource, name=name, namespace=namespace)


class Counter:
    def __init__(self) -> None:
        self.n = 100

    async def allocate(self) -> int:
        self.n += 1
        return self.n


class FixedSeal:
    """Seals with a constant: the real HMAC is tested in test_ids.py."""

    async def stamp(self, value: int, *, namespace: str, name: str) -> ids.Stamp:
        return ids.Stamp(
            id=value, labels={ids.LABEL: str(value)}, annotations={ids.SEAL: "test-seal"}
        )


class MemoryCallLog(calllog.CallLog):
    """A second adapter of the store interface: a few lines, no change elsewhere."""

    def __init__(self) -> None:
        self.entries: dict[str, list[calllog.Entry]] = {}

    async def _append(
        self,
        *,
        tenant: str,
        method: str,
        args_json: str,
        result_json: str,
        exception: str,
        address: str,
        when: datetime.datetime,
        user: str = "",
    ) -> calllog.Serial:
        log = self.entries.setdefault(tenant, [])
        serial = calllog.Serial(len(log) + 1)
        log.append(
            calllog.Entry(
                serial=serial,
                timestamp=when,
                method=method,
                args_json=args_json,
                result_json=result_json,
                exception=exception,
                address=address,
                user=user,
            )
        )
        return serial

    async def since(self, *, tenant: str, serial: int, limit: int) -> list[calllog.Entry]:
        return [e for e in self.entries.get(tenant, []) if e.serial > serial][:limit]

    async def latest(self, *, tenant: str, n: int) -> list[calllog.Entry]:
        return self.entries.get(tenant, [])[-n:]

    async def purge(self, *, older_than: datetime.datetime) -> int:
        return 0

    async def close(self) -> None:
        return None


def build() -> tuple[service.Service, FakeKube]:
    ops, tasks = cache.OperationCache(), cache.TaskCache()
    fake = FakeKube(ops, tasks)
    svc = service.Service(
        operations=ops,
        tasks=tasks,
        kube_client=fake,
        dry_run=FakeDryRun(fake),
        id_allocator=Counter(),
        id_seal=FixedSeal(),
        call_log=MemoryCallLog(),
        # No controller here: a relaunch or a cancel waits this bound out and answers as
        # done; the cluster tests (test_read_your_writes) cover the controller's answer.
        settings=service.Settings(
            executors={"noop": {"builtin": {"action": "noop"}}},
            write_visible_timeout_seconds=0.05,
        ),
    )
    return svc, fake


def seed(fake: FakeKube, namespace: str, name: str, **spec: Any) -> None:
    asyncio.run(
        fake.create(
            kube.OPERATIONS,
            {
                "apiVersion": API_VERSION,
                "kind": "Operation",
                "metadata": {"name": name, "labels": {cache.ID_LABEL: str(len(fake.objects) + 1)}},
                "spec": {"type": "t", "executor": {"external": {}}, **spec},
            },
            namespace=namespace,
        )
    )


def test_create_names_by_id_uses_the_type_executor_and_reads_back_at_once() -> None:
    svc, fake = build()
    opid = asyncio.run(svc.create(who=A, type_="noop", params={"p": 1}, object_=None))
    obj = fake.objects[("operations", "a", f"op-{opid}")]
    assert obj["spec"]["executor"] == {"builtin": {"action": "noop"}}
    assert obj["metadata"]["labels"][cache.ID_LABEL] == str(opid)
    assert svc.operation(who=A, id_=opid).name == f"op-{opid}"
    with pytest.raises(errors.NotFound):
        svc.operation(who=B, id_=opid)
    other = asyncio.run(svc.create(who=A, type_="unknown", params={}, object_=None))
    assert fake.objects[("operations", "a", f"op-{other}")]["spec"]["executor"] == {"external": {}}


def test_cancel_decides_again_when_the_object_moved_on() -> None:
    svc, fake = build()
    seed(fake, "a", "x")
    entry = svc.operations.get("a", "x")
    assert entry is not None
    assert entry.id is not None
    # The controller finishes the operation, but the gateway's cache has not seen it yet.
    stale = copy.deepcopy(fake.objects[("operations", "a", "x")])
    fake.set_state("a", "x", "Succeeded")
    svc.operations.apply(event="MODIFIED", obj=stale)
    with pytest.raises(errors.IllegalTransition, match="cannot be cancelled"):
        asyncio.run(svc.cancel(who=A, id_=entry.id))
    assert "cancel" not in fake.objects[("operations", "a", "x")]["spec"]


def test_cancel_is_idempotent_and_relaunch_merges_params() -> None:
    svc, fake = build()
    seed(fake, "a", "x", params={"keep": 1, "auth_code": "old"})
    entry = svc.operations.get("a", "x")
    assert entry is not None
    assert entry.id is not None
    asyncio.run(svc.cancel(who=A, id_=entry.id))
    asyncio.run(svc.cancel(who=A, id_=entry.id))
    assert fake.writes.count(("patch", "x")) == 1
    with pytest.raises(errors.IllegalTransition):
        asyncio.run(svc.relaunch(who=A, id_=entry.id, params={}))
    fake.set_state("a", "x", states.State.FAILED_EXTERNAL.value)
    asyncio.run(svc.relaunch(who=A, id_=entry.id, params={"auth_code": "abababab"}))
    spec = fake.objects[("operations", "a", "x")]["spec"]
    assert spec["params"] == {"keep": 1, "auth_code": "abababab"}
    assert spec["relaunch"] == 1


def _batch() -> list[dict[str, Any]]:
    return [
        {"__type__": "operation", "name": "new", "type": "t"},
        {"__type__": "operation", "name": "old", "params": {"v": 2}},
        {"__type__": "operation", "__action__": "delete", "name": "doomed"},
    ]


@pytest.mark.parametrize("failing", [("patch", "old"), ("delete", "doomed")])
def test_apply_undoes_earlier_writes_when_a_later_one_fails(failing: tuple[str, str]) -> None:
    svc, fake = build()
    seed(fake, "a", "old", params={"v": 1, "gone": True})
    seed(fake, "a", "doomed")
    before = copy.deepcopy(fake.objects)
    fake.fail = lambda verb, name: (
        errors.Unavailable("etcd hiccup") if (verb, name) == failing else None
    )
    with pytest.raises(errors.Unavailable, match=f"record .* {failing[1]}"):
        asyncio.run(svc.apply(who=A, batch=_batch()))
    assert set(fake.objects) == set(before)
    assert (
        fake.objects[("operations", "a", "old")]["spec"]
        == before[("operations", "a", "old")]["spec"]
    )
    assert ("operations", "a", "new") not in fake.objects
    assert svc.operations.get("a", "new") is None


def test_apply_succeeds_with_full_records_and_sparse_updates() -> None:
    svc, fake = build()
    seed(fake, "a", "old", params={"v": 1}, object={"kind": "domain", "name": "x.org"})
    seed(fake, "a", "doomed")
    result = asyncio.run(svc.apply(who=A, batch=_batch()))
    assert [r["name"] for r in result] == ["new", "old"]
    assert result[1]["params"] == {"v": 2}
    assert result[1]["object"] == {"kind": "domain", "name": "x.org"}
    assert ("operations", "a", "doomed") not in fake.objects
    # deletes run last, after every create and update
    assert fake.writes[-1] == ("delete", "doomed")


def test_apply_refuses_a_record_twice() -> None:
    svc, _ = build()
    with pytest.raises(errors.InvalidArgument, match="twice"):
        asyncio.run(
            svc.apply(
                who=A,
                batch=[
                    {"__type__": "operation", "name": "n", "type": "t"},
                    {"__type__": "operation", "name": "n", "type": "u"},
                ],
            )
        )


def test_query_and_log_are_tenant_scoped() -> None:
    svc, fake = build()
    seed(fake, "a", "mine")
    seed(fake, "b", "theirs")
    assert [r["name"] for r in svc.query(who=A, type_="operation", exact={})] == ["mine"]
    theirs = svc.operations.get("b", "theirs")
    assert theirs is not None
    assert svc.query(who=A, type_="operation", exact={"id": theirs.id}) == []
    assert svc.query(who=A, type_="operation", exact={"state": "Pending"})[0]["name"] == "mine"
    assert svc.query(who=A, type_="operation", exact={"state": "Nonsense"}) == []

    async def log() -> tuple[list[calllog.Entry], list[calllog.Entry]]:
        await svc.call_log.append(tenant="a", method="m", args_json="[]", result_json="[]")
        return await svc.log(who=A, serial=None), await svc.log(who=B, serial=0)

    mine, theirs_log = asyncio.run(log())
    assert len(mine) == 1
    assert theirs_log == []


def test_the_api_server_refusing_the_gateway_is_not_the_callers_login_problem() -> None:
    class Refusing:
        async def get(self, resource: kube.Resource, **kw: Any) -> Body:
            raise errors.Unauthenticated("Unauthorized")

    upstream = kubeio.Upstream(Refusing())  # type: ignore[arg-type]
    with pytest.raises(errors.Unavailable, match="credentials"):
        asyncio.run(upstream.get(kube.OPERATIONS, name="x", namespace="a"))


# --- executors are the operator's policy, never the legacy caller's -----------------


@pytest.mark.parametrize(
    "record",
    [
        {"__type__": "operation", "name": "n", "type": "noop", "executor": {"external": {}}},
        {
            "__type__": "operation",
            "name": "n",
            "type": "noop",
            "executor": {"webhook": {"url": "http://127.0.0.1:6443/api"}},
        },
        {
            "__type__": "scheduledtask",
            "name": "n",
            "schedule": "0 3 * * *",
            "template": {"type": "noop", "executor": {"job": {"template": {}}}},
        },
    ],
)
def test_apply_refuses_an_executor_on_create(record: dict[str, Any]) -> None:
    svc, fake = build()
    with pytest.raises(errors.InvalidArgument, match="executor"):
        asyncio.run(svc.apply(who=A, batch=[record]))
    assert not fake.writes


def test_apply_takes_the_policy_and_keeps_it_on_update() -> None:
    svc, _ = build()
    [created] = asyncio.run(
        svc.apply(who=A, batch=[{"__type__": "operation", "name": "n", "type": "noop"}])
    )
    assert created["executor"] == {"builtin": {"action": "noop"}}
    # sent back unchanged (a record read with query) is fine; another executor is not
    asyncio.run(svc.apply(who=A, batch=[created]))
    evil = {**created, "executor": {"webhook": {"url": "http://169.254.169.254/"}}}
    with pytest.raises(errors.InvalidArgument, match="read-only"):
        asyncio.run(svc.apply(who=A, batch=[evil]))
    # a type change takes the new type's policy
    [changed] = asyncio.run(
        svc.apply(who=A, batch=[{"__type__": "operation", "name": "n", "type": "other"}])
    )
    assert changed["executor"] == {"external": {}}
    [task] = asyncio.run(
        svc.apply(
            who=A,
            batch=[
                {
                    "__type__": "scheduledtask",
                    "name": "t",
                    "schedule": "0 3 * * *",
                    "template": {"type": "noop", "labels": {"tier": "gold"}},
                }
            ],
        )
    )
    assert task["template"]["executor"] == {"builtin": {"action": "noop"}}
    assert task["template"]["labels"] == {"tier": "gold"}


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"__type__": "operation", "name": "../x", "type": "t"}, "not a valid name"),
        ({"__type__": "operation", "name": "", "type": "t"}, "empty"),
        ({"__type__": "operation", "name": 5, "type": "t"}, "string"),
        (
            {
                "__type__": "scheduledtask",
                "name": "t",
                "schedule": "0 3 * * *",
                "template": {"type": "t", "labels": {"../x": "v"}},
            },
            "label",
        ),
        (
            {"__type__": "operation", "name": "p", "type": "t", "params": {"x": "Q" * 70_000}},
            "KiB|bytes",
        ),
    ],
)
def test_apply_refuses_hostile_records_before_any_write(record: dict[str, Any], match: str) -> None:
    svc, fake = build()
    with pytest.raises(errors.InvalidArgument, match=match):
        asyncio.run(svc.apply(who=A, batch=[record]))
    assert not fake.writes


def test_apply_batches_are_bounded() -> None:
    svc, fake = build()
    batch = [{"__type__": "operation", "name": f"n{i}", "type": "t"} for i in range(101)]
    with pytest.raises(errors.InvalidArgument, match="at most 100"):
        asyncio.run(svc.apply(who=A, batch=batch))
    assert not fake.writes


def test_create_and_relaunch_bound_the_stored_params() -> None:
    svc, fake = build()
    with pytest.raises(errors.InvalidArgument, match="bytes"):
        asyncio.run(svc.create(who=A, type_="t", params={"x": "Q" * 70_000}, object_=None))
    seed(fake, "a", "x")
    fake.set_state("a", "x", states.State.FAILED_EXTERNAL.value)
    entry = svc.operations.get("a", "x")
    assert entry is not None
    assert entry.id is not None
    with pytest.raises(errors.InvalidArgument, match="bytes"):
        asyncio.run(svc.relaunch(who=A, id_=entry.id, params={"x": "Q" * 70_000}))
    assert fake.writes.count(("patch", "x")) == 0


def test_a_read_only_id_must_match_in_type_too() -> None:
    """1.0 and true equal 1 in Python; as a read-only id they are another value."""
    svc, fake = build()
    seed(fake, "a", "x")
    entry = svc.operations.get("a", "x")
    assert entry is not None
    for id_ in (float(entry.id or 0), True):
        with pytest.raises(errors.InvalidArgument, match="read-only"):
            asyncio.run(svc.apply(who=A, batch=[{"__type__": "operation", "name": "x", "id": id_}]))
    assert not [w for w in fake.writes if w[0] == "patch"]


def test_free_form_values_are_stored_as_json_or_refused() -> None:
    svc, fake = build()
    when = datetime.datetime(2020, 1, 1, 12, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))
    opid = asyncio.run(svc.create(who=A, type_="t", params={"at": when, "n": [when]}, object_=None))
    stored = fake.objects[("operations", "a", f"op-{opid}")]["spec"]["params"]
    assert stored == {"at": "2020-01-01T10:00:00Z", "n": ["2020-01-01T10:00:00Z"]}
    for bad in ({"v": b"\x00\x01"}, {"v": [b"\xff"]}):
        with pytest.raises(errors.InvalidArgument, match="bytes"):
            asyncio.run(svc.create(who=A, type_="t", params=bad, object_=None))
    with pytest.raises(errors.InvalidArgument, match="bytes"):
        asyncio.run(svc.create(who=A, type_="t", params={}, object_={"kind": "d", "name": b"\x00"}))


def test_the_read_your_writes_bound_is_a_command_line_setting() -> None:
    parser = argparse.ArgumentParser()
    gateway_cli.add_arguments(parser)
    default = gateway_cli.settings_from(parser.parse_args([]))
    assert default.service.write_visible_timeout_seconds == 10.0
    args = parser.parse_args(["--write-visible-timeout", "2.5"])
    assert gateway_cli.settings_from(args).service.write_visible_timeout_seconds == 2.5
