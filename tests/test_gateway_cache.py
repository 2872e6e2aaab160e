"""The watch-fed cache: indexes stay right through adds, updates and deletes, and the
plan-choosing list query agrees with a brute-force filter."""

from __future__ import annotations

import datetime
import gc
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from opkeeper import states
from opkeeper.gateway import cache
from opkeeper.gateway.dialects import gandi, xenapi

UTC = datetime.UTC
T0 = datetime.datetime(2024, 1, 1, tzinfo=UTC)


def op(
    id_: int,
    *,
    ns: str = "a",
    type_: str = "domain_create",
    state: str | None = "Running",
    updated: int = 0,
    name: str | None = None,
    label_only: bool = False,
    rv: int = 1,
    obj: tuple[str, str] | None = None,
) -> dict[str, Any]:
    status: dict[str, Any] = {"updatedAt": (T0 + datetime.timedelta(seconds=updated)).isoformat()}
    if state is not None:
        status["state"] = state
    if not label_only:
        status["id"] = id_
    spec: dict[str, Any] = {"type": type_, "executor": {"external": {}}}
    if obj is not None:
        spec["object"] = {"kind": obj[0], "name": obj[1]}
    return {
        "metadata": {
            "name": name or f"op-{id_}",
            "namespace": ns,
            "uid": f"uid-{id_}",
            "resourceVersion": str(rv),
            "labels": {cache.ID_LABEL: str(id_)},
            "creationTimestamp": T0.isoformat(),
            "managedFields": [{"big": "x" * 100}],
            "annotations": {"kopf": "x" * 100},
        },
        "spec": spec,
        "status": status,
    }


def test_entry_fields() -> None:
    entry = cache.OperationEntry.from_object(op(7, updated=30, obj=("domain", "example.org")))
    assert entry.id == 7
    assert entry.state is states.State.RUNNING
    assert entry.date_updated == T0 + datetime.timedelta(seconds=30)
    assert (entry.object_kind, entry.object_name) == ("domain", "example.org")
    assert "managedFields" not in entry.metadata
    assert "annotations" not in entry.metadata


def test_defaults_before_the_controller_wrote_status() -> None:
    raw = op(3, state=None, label_only=True)
    del raw["status"]
    entry = cache.OperationEntry.from_object(raw)
    assert entry.id == 3  # from the label the gateway sets at create time
    assert entry.state is states.State.PENDING
    assert entry.date_updated == entry.date_created == T0


def test_apply_add_modify_delete_keeps_indexes_right() -> None:
    c = cache.OperationCache()
    c.reset([op(1), op(2, state="Succeeded")])
    assert c.list_ids("a", states_=frozenset({states.State.RUNNING})) == [1]
    c.apply(event="MODIFIED", obj=op(1, state="Failed" + "External", updated=10, rv=6))
    assert c.list_ids("a", states_=frozenset({states.State.RUNNING})) == []
    assert c.list_ids("a", states_=states.states_for(states.Dialect.GANDI, "ERROR")) == [1]
    assert c.list_ids("a", updated_after=T0 + datetime.timedelta(seconds=5)) == [1]
    c.apply(event="DELETED", obj=op(1, rv=7))
    assert c.get_id("a", cache.OpId(1)) is None
    assert c.list_ids("a") == [2]
    assert len(c) == 1
    assert c.names("a", "state", states.State.FAILED_EXTERNAL) == set()


def test_ids_are_namespace_scoped() -> None:
    c = cache.OperationCache()
    c.reset([op(1, ns="a"), op(2, ns="b")])
    assert c.get_id("a", cache.OpId(2)) is None
    assert c.get_id("b", cache.OpId(2)) is not None
    assert c.list_ids("a") == [1]
    assert c.list_ids("c") == []


def test_a_copied_id_label_never_shadows_anything() -> None:
    c = cache.OperationCache()
    c.reset([op(1, ns="a", state="Succeeded")])
    # another namespace labels its object with a's id: both stay answerable, separately
    c.apply(event="ADDED", obj=op(1, ns="b", state="Running", name="copy"))
    entry = c.get_id("a", cache.OpId(1))
    assert entry is not None
    assert entry.state is states.State.SUCCEEDED
    assert c.list_ids("a", states_=frozenset({states.State.SUCCEEDED})) == [1]
    # a second object with the same id in the same namespace: the first keeps the id
    c.apply(event="ADDED", obj=op(1, ns="a", state="Running", name="dup"))
    assert c.get_id("a", cache.OpId(1)) is entry
    assert c.list_ids("a") == [1]
    assert c.get("a", "dup") is not None
    c.apply(event="DELETED", obj=op(1, ns="a", name="dup"))
    assert c.list_ids("a") == [1]
    assert c.get_id("a", cache.OpId(1)) is entry


def test_newest_first_and_limited() -> None:
    c = cache.OperationCache()
    c.reset([op(i) for i in range(1, 501)])
    got = c.list_ids("a", limit=300)
    assert got == list(range(500, 200, -1))


def test_select_by_exact_fields() -> None:
    c = cache.OperationCache()
    c.reset([op(1, obj=("domain", "x.org")), op(2, type_="vm_deploy"), op(3, name="custom")])
    assert [e.id for e in c.select("a", {"object": ("domain", "x.org")})] == [1]
    assert [e.id for e in c.select("a", {"name": "op-1", "object": ("domain", "x.org")})] == [1]
    assert [e.id for e in c.select("a", {"type": "vm_deploy"})] == [2]
    assert [e.id for e in c.select("a", {"name": "custom"})] == [3]
    assert [e.id for e in c.select("a", {"name": "custom", "type": "vm_deploy"})] == []
    assert len(list(c.select("a", {}))) == 3


def test_task_entries() -> None:
    t = cache.TaskCache()
    t.reset(
        [
            {
                "metadata": {"name": "nightly", "namespace": "a", "resourceVersion": "1"},
                "spec": {"schedule": "0 3 * * *", "template": {"spec": {"type": "backup"}}},
                "status": {"id": 9, "state": "Suspended"},
            }
        ]
    )
    entry = t.get_id("a", cache.OpId(9))
    assert entry is not None
    assert entry.type == "backup"
    assert entry.state is states.TaskState.SUSPENDED


STATES = list(states.State)
TYPES = ["t1", "t2", "t3"]


@st.composite
def populations(draw: st.DrawFn) -> list[dict[str, Any]]:
    n = draw(st.integers(min_value=0, max_value=120))
    return [
        op(
            i + 1,
            ns=draw(st.sampled_from(["a", "b"])),
            type_=draw(st.sampled_from(TYPES)),
            state=draw(st.sampled_from(STATES)).value,
            updated=draw(st.integers(min_value=0, max_value=50)),
        )
        for i in range(n)
    ]


@settings(max_examples=200, deadline=None)
@given(
    objs=populations(),
    state_set=st.none() | st.frozensets(st.sampled_from(STATES), min_size=1, max_size=3),
    type_=st.none() | st.sampled_from(TYPES),
    after=st.none() | st.integers(min_value=0, max_value=50),
    before=st.none() | st.integers(min_value=0, max_value=50),
    limit=st.sampled_from([1, 5, 300]),
    churn=st.lists(st.integers(min_value=1, max_value=120), max_size=10),
)
def test_list_ids_matches_brute_force(
    objs: list[dict[str, Any]],
    state_set: frozenset[states.State] | None,
    type_: str | None,
    after: int | None,
    before: int | None,
    limit: int,
    churn: list[int],
) -> None:
    c = cache.OperationCache()
    c.reset(objs)
    live = {o["status"]["id"]: o for o in objs}
    for id_ in churn:  # updates and deletes after the initial list, as a watch brings them
        if id_ in live:
            if id_ % 2:
                c.apply(event="DELETED", obj=live.pop(id_))
            else:
                live[id_] = op(
                    id_,
                    ns=live[id_]["metadata"]["namespace"],
                    state="Cancelled",
                    updated=id_ % 50,
                    type_="t1",
                )
                c.apply(event="MODIFIED", obj=live[id_])
    a = T0 + datetime.timedelta(seconds=after) if after is not None else None
    b = T0 + datetime.timedelta(seconds=before) if before is not None else None
    got = c.list_ids(
        "a", states_=state_set, type_=type_, updated_after=a, updated_before=b, limit=limit
    )
    expected = sorted(
        (
            e.id
            for e in (cache.OperationEntry.from_object(o) for o in live.values())
            if e.namespace == "a"
            and e.id is not None
            and (state_set is None or e.state in state_set)
            and (type_ is None or e.type == type_)
            and (a is None or e.date_updated >= a)
            and (b is None or e.date_updated < b)
        ),
        reverse=True,
    )[:limit]
    assert got == expected


def test_replaced_entries_leave_nothing_for_the_collector() -> None:
    """Entries (with their kept answers) hold no reference cycles, so one that is replaced
    is freed by reference counting even after kubeio.settle_heap froze it."""
    operations = cache.OperationCache()
    operations.reset(op(i, state="Succeeded") for i in range(1, 501))
    for entry in list(operations.by_key.values()):
        gandi._details_answer(entry, now=T0)
        xenapi._record_answer(entry)
    gc.collect()
    gc.disable()  # an automatic collection would hide a cycle from the count below
    try:
        for i in range(1, 501):
            operations.apply(event="MODIFIED", obj=op(i, rv=2))
        operations.reset(op(i, rv=3) for i in range(1, 501))
        assert gc.collect() == 0
    finally:
        gc.enable()
