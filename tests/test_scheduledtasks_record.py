"""A fired run is created first and recorded once, against a fake API server.

What a run costs the task is the point of issue #4's benchmark: the
Operation is created without a status write before it, and the run is
recorded by the next reconcile in a single conditional write that also
carries the Operation's finish when it came first. The cluster tests
(test_scheduledtasks.py) show the outcome; these pin the writes.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
from typing import Any

from opkeeper import errors, ids, kube, schedule
from opkeeper.controller.events import EventPoster
from opkeeper.controller.scheduledtasks import Reconciler

DUE = "2026-01-01T12:00:00Z"
NAME = "once-202601011200"
UID = "task-uid"
NOOP = {"type": "noop", "executor": {"builtin": {"action": "noop"}}}


class FakeApi(kube.Client):
    """Just enough of the API server: a ScheduledTask, Operations, the id key and counter."""

    def __init__(self) -> None:
        super().__init__(kube.Credentials(server="http://127.0.0.1:1", ssl_context=False))
        self.version = 1
        self.task: kube.Body = {
            "metadata": {
                "name": "once",
                "namespace": "a",
                "uid": UID,
                "resourceVersion": "1",
                "generation": 1,
                "creationTimestamp": "2025-12-31T00:00:00Z",
            },
            "spec": {"execAt": DUE, "template": {"spec": NOOP}},
            "status": {"id": 5, "observedGeneration": 1, "nextRunAt": DUE, "state": "Scheduled"},
        }
        self.operations: dict[str, kube.Body] = {}
        self.status_writes: list[dict[str, Any]] = []
        self.creates: list[str] = []

    def bump(self) -> None:
        self.version += 1
        self.task["metadata"]["resourceVersion"] = str(self.version)

    async def get(
        self,
        resource: kube.Resource,
        *,
        name: str,
        namespace: str | None = None,
        subresource: str | None = None,
    ) -> kube.Body:
        if resource == ids.SECRETS:
            return {"data": {"key": base64.b64encode(b"k" * 32).decode()}}
        if resource == kube.CONFIGMAPS:
            return {"metadata": {"resourceVersion": "1"}, "data": {"next": "100"}}
        if resource == kube.SCHEDULED_TASKS:
            return copy.deepcopy(self.task)
        if name not in self.operations:
            raise errors.NotFound(name)
        return copy.deepcopy(self.operations[name])

    async def create(
        self,
        resource: kube.Resource,
        body: kube.Body,
        *,
        namespace: str | None = None,
        dry_run: bool = False,
    ) -> kube.Body:
        name = body["metadata"]["name"]
        if name in self.operations:
            raise kube.AlreadyExists(name)
        self.creates.append(name)
        created = copy.deepcopy(body)
        created["metadata"].update(
            namespace=namespace, uid=f"uid-{name}", creationTimestamp=DUE, resourceVersion="1"
        )
        self.operations[name] = created
        return created

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
    ) -> kube.Body:
        if resource == kube.CONFIGMAPS:
            return {}
        assert resource == kube.SCHEDULED_TASKS
        assert subresource == "status"
        if body["metadata"]["resourceVersion"] != self.task["metadata"]["resourceVersion"]:
            raise errors.Conflict(name)
        self.status_writes.append(body["status"])
        for key, value in body["status"].items():
            if value is None:
                self.task["status"].pop(key, None)
            else:
                self.task["status"][key] = value
        self.bump()
        return copy.deepcopy(self.task)


def reconciler(api: FakeApi) -> Reconciler:
    return Reconciler(
        client=api,
        allocator=ids.IdAllocator(api),
        seal=ids.IdSeal(api, namespace="opkeeper-system"),
        events=EventPoster(api, enabled=False),
        workers=1,
        error_max_delay=1,
        record_delay=1,
    )


def finished(api: FakeApi) -> kube.Body:
    body = copy.deepcopy(api.operations[NAME])
    body["metadata"]["resourceVersion"] = "2"
    body["status"] = {"state": "Succeeded"}
    return body


def test_a_run_is_created_first_and_recorded_with_its_finish_in_one_write() -> None:
    async def scenario() -> None:
        api = FakeApi()
        r = reconciler(api)
        r.observe_task(event_type=None, body=copy.deepcopy(api.task))
        before = datetime.datetime.now(datetime.UTC).timestamp()
        await r._reconcile_key(UID)
        r.queue._queued.clear()  # the reconcile is called here, not by the queue's workers
        # Created, sealed, nothing written to the task yet; woken to record it.
        assert api.creates == [NAME]
        assert api.status_writes == []
        operation = api.operations[NAME]
        seal = ids.IdSeal(api, namespace="opkeeper-system")
        await seal.load()
        assert seal.verify(operation) == ids.label_id(operation)
        assert operation["metadata"]["annotations"][schedule.ANNOTATION_TASK_UID] == UID
        record_at = r.timers.when(UID)
        assert record_at is not None
        assert before + 0.9 < record_at < before + 2
        # Its ADDED event is ours: no reconcile. Finishing within the delay: one
        # write records the run and its finish.
        r.observe_operation(event_type="ADDED", body=copy.deepcopy(operation))
        assert UID not in r.queue._queued
        r.observe_operation(event_type="MODIFIED", body=finished(api))
        await r._reconcile_key(UID)
        # (active: the run's name, then empty; the stored status never listed it)
        assert api.status_writes == [
            {
                "lastScheduleTime": DUE,
                "lastOperation": NAME,
                "state": "Completed",
                "nextRunAt": None,
            }
        ]
        assert r.timers.when(UID) is None

    asyncio.run(scenario())


def test_a_conflicting_record_is_kept_and_written_after_a_re_read() -> None:
    async def scenario() -> None:
        api = FakeApi()
        r = reconciler(api)
        r.observe_task(event_type=None, body=copy.deepcopy(api.task))
        await r._reconcile_key(UID)
        r.queue._queued.clear()
        # A second controller, which created the same run (AlreadyExists), recorded it
        # first: only the status moved, and our version is stale.
        api.task["status"].pop("nextRunAt")
        api.task["status"].update(
            lastScheduleTime=DUE, lastOperation=NAME, active=[NAME], state="Triggered"
        )
        api.bump()
        r.observe_operation(event_type="ADDED", body=copy.deepcopy(api.operations[NAME]))
        r.observe_operation(event_type="MODIFIED", body=finished(api))
        await r._reconcile_key(UID)
        assert api.status_writes == []
        assert UID in r.queue._queued  # re-planned on the re-read version
        await r._reconcile_key(UID)
        assert api.status_writes == [{"active": None, "state": "Completed"}]
        # Planned on the status overlaid with the unrecorded run: not fired twice.
        assert api.task["status"]["state"] == "Completed"
        assert api.task["status"]["lastOperation"] == NAME
        assert "active" not in api.task["status"]
        assert api.creates == [NAME]

    asyncio.run(scenario())
