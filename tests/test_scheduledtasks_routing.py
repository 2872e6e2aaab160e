"""How the ScheduledTask controller routes watch events, without a cluster.

Which events lead to a reconcile is what keeps a run at two reconciles and
waiting at none, so it is pinned here; what a reconcile then does is
tested in test_schedule_plan.py and, against the API server, in
test_scheduledtasks.py.
"""

from __future__ import annotations

import copy
from typing import Any

from opkeeper import ids, kube, schedule
from opkeeper.controller.events import EventPoster
from opkeeper.controller.scheduledtasks import Reconciler, _TaskCache


def reconciler() -> Reconciler:
    client = kube.Client(kube.Credentials(server="http://127.0.0.1:1", ssl_context=False))
    return Reconciler(
        client=client,
        allocator=ids.IdAllocator(client),
        seal=ids.IdSeal(client, namespace="opkeeper-system"),
        events=EventPoster(client, enabled=False),
        workers=1,
        error_max_delay=1,
    )


def task(rv: int, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {
            "name": "t",
            "namespace": "a",
            "uid": "task-uid",
            "resourceVersion": str(rv),
            "generation": 1,
        },
        "spec": {"execAt": "2030-01-01T00:00:00Z", "template": {"spec": {}}},
        "status": {},
    }
    for key, value in changes.items():
        body[key] = value
    return body


def operation(name: str, state: str | None = None, rv: int = 1) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "a",
            "uid": f"uid-{name}",
            "resourceVersion": str(rv),
            "creationTimestamp": "2030-01-01T00:00:00Z",
            "annotations": {schedule.ANNOTATION_TASK_UID: "task-uid"},
        },
        "status": {"state": state} if state else {},
    }


def drain(r: Reconciler) -> int:
    """How many keys are queued (and empty the queue)."""
    count = len(r.queue)
    r.queue._queued.clear()
    r.queue._ready.clear()
    r.queue._later.clear()
    return count


def test_task_events() -> None:
    r = reconciler()
    r.observe_task(event_type=None, body=task(1))
    assert drain(r) == 1
    # An older or equal version (the echo of a write whose response came first): nothing.
    r.observe_task(event_type="MODIFIED", body=task(1))
    assert drain(r) == 0
    # Only the status moved (our own write, echo ahead of the response): stored, no reconcile.
    r.observe_task(event_type="MODIFIED", body=task(2, status={"state": "Scheduled"}))
    assert drain(r) == 0
    assert r._bodies["task-uid"]["metadata"]["resourceVersion"] == "2"
    # A spec edit: reconcile.
    edited = task(3, status={"state": "Scheduled"})
    edited["spec"]["suspend"] = True
    edited["metadata"]["generation"] = 2
    r.observe_task(event_type="MODIFIED", body=edited)
    assert drain(r) == 1
    # A label change by a user: reconcile too (metadata other than the version moved).
    labelled = copy.deepcopy(edited)
    labelled["metadata"]["resourceVersion"] = "4"
    labelled["metadata"]["labels"] = {"team": "x"}
    r.observe_task(event_type="MODIFIED", body=labelled)
    assert drain(r) == 1


def test_deleting_a_task_cancels_its_timer() -> None:
    r = reconciler()
    r.observe_task(event_type=None, body=task(1))
    r.timers.schedule("task-uid", 1e12)
    r.observe_task(event_type="DELETED", body=task(2))
    assert "task-uid" not in r.timers
    assert "task-uid" not in r._bodies


def test_operation_events() -> None:
    r = reconciler()
    r.observe_task(event_type=None, body=task(1))
    drain(r)
    cache = r._caches.setdefault("task-uid", _TaskCache())  # made by the first reconcile
    # One we just created: its ADDED changes nothing.
    cache.in_flight.add("t-1")
    r.observe_operation(event_type="ADDED", body=operation("t-1"))
    assert drain(r) == 0
    assert "t-1" not in cache.in_flight
    # Progress of an active one: nothing. Finishing: reconcile.
    r.observe_operation(event_type="MODIFIED", body=operation("t-1", "Running", 2))
    assert drain(r) == 0
    r.observe_operation(event_type="MODIFIED", body=operation("t-1", "Succeeded", 3))
    assert drain(r) == 1
    # One we did not create (seen after a restart): reconcile. Deleted: reconcile.
    r.observe_operation(event_type=None, body=operation("t-0", "Running"))
    assert drain(r) == 1
    r.observe_operation(event_type="DELETED", body=operation("t-0", "Running"))
    assert drain(r) == 1
    assert cache.gone == {"t-0"}
    # Not made by a task: ignored.
    stranger = operation("x")
    del stranger["metadata"]["annotations"]
    r.observe_operation(event_type="ADDED", body=stranger)
    assert drain(r) == 0


def test_operations_of_deleted_tasks_do_not_accumulate() -> None:
    r = reconciler()
    r.observe_operation(event_type=None, body=operation("t-0", "Succeeded"))
    assert "task-uid" in r._caches  # kept: its task may simply not be listed yet
    r.observe_operation(event_type="DELETED", body=operation("t-0", "Succeeded"))
    assert "task-uid" not in r._caches
