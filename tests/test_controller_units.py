"""Pure parts of the controller: merge patches, the work queue, builtin progress,
kopf's diff-base storage, the Event rate limit."""

from __future__ import annotations

import asyncio
import copy
import datetime
from collections.abc import Callable
from typing import Any, cast

import kopf
import pytest

from opkeeper import kube, models, states
from opkeeper.controller import STORAGE_PREFIX, DiffBaseStorage, metrics, operations
from opkeeper.controller.events import EventPoster
from opkeeper.controller.operations import merge_diff
from opkeeper.controller.workqueue import WorkQueue
from opkeeper.executors import base, builtin, job


def test_merge_diff_is_an_rfc7386_patch() -> None:
    old = {"a": 1, "b": {"x": 1, "y": 2}, "c": [1], "gone": True}
    new = {"a": 1, "b": {"x": 1, "z": 3}, "c": [1, 2], "new": "n"}
    assert merge_diff(old, new) == {"b": {"y": None, "z": 3}, "c": [1, 2], "gone": None, "new": "n"}
    assert merge_diff(new, new) == {}


def test_workqueue_runs_background_keys_when_nothing_else_waits() -> None:
    async def scenario() -> list[str]:
        seen: list[str] = []
        done = asyncio.Event()

        async def handler(key: str) -> None:
            seen.append(key)
            if key == "late":
                queue.add("new")  # arrives while background keys still wait: goes first
            if len(seen) == 5:
                done.set()

        queue = WorkQueue(handler, workers=1)
        for key in ("old-1", "late", "old-2"):
            queue.add(key, background=True)
        queue.add("first")
        queue.add("late")  # moved up: runs once, before the other background keys
        queue.add("first", background=True)  # already in the foreground: stays there
        queue.start()
        await asyncio.wait_for(done.wait(), 5)
        await queue.stop()
        return seen

    assert asyncio.run(scenario()) == ["first", "late", "new", "old-1", "old-2"]


def test_workqueue_serialises_a_key_and_reruns_it_after_a_change() -> None:
    async def scenario() -> list[str]:
        seen: list[str] = []
        gate, started, three = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def handler(key: str) -> None:
            seen.append(key)
            started.set()
            if len(seen) == 1:
                await gate.wait()
            if len(seen) == 3:
                three.set()

        queue = WorkQueue(handler, workers=4)
        queue.start()
        queue.add("a")
        await started.wait()
        queue.add("a")  # while "a" runs: once more afterwards, not concurrently
        queue.add("a")
        gate.set()
        loop = asyncio.get_running_loop()
        queue.schedule("b", loop.time() + 0.05)
        queue.schedule("c", loop.time() + 0.01)
        queue.schedule("c", None)  # cancelled
        await asyncio.wait_for(three.wait(), 5)
        await queue.stop()
        return seen

    assert asyncio.run(scenario()) == ["a", "a", "b"]


def test_sleep_progress_steps_are_computed_from_started_at() -> None:
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    op = models.Operation.model_validate(
        {
            "metadata": {"name": "s", "namespace": "n", "uid": "u"},
            "spec": {
                "type": "t",
                "executor": {"builtin": {"action": "sleep", "seconds": 4, "progressSteps": 3}},
            },
            "status": {"startedAt": start.isoformat()},
        }
    )

    def poll(after: float) -> base.Outcome:
        ctx = base.Context(
            op=op, body=op.metadata, id=1, attempt=0, now=start + datetime.timedelta(seconds=after)
        )
        return asyncio.run(builtin.BuiltinExecutor().poll(ctx))

    early, middle, end = poll(0.5), poll(2.1), poll(4.0)
    assert isinstance(early, base.Running)
    assert early.progress == 0
    assert isinstance(middle, base.Running)
    assert middle.progress == 50
    assert middle.wake_at == start + datetime.timedelta(seconds=3)
    assert isinstance(end, base.Finished)
    assert end.event is states.Event.SUCCEED


def _operation_body(**metadata: Any) -> dict[str, Any]:
    """An Operation as the API server returns it after the controller finished it."""
    return {
        "apiVersion": "opkeeper.dev/v1alpha1",
        "kind": "Operation",
        "metadata": {
            "name": "op",
            "namespace": "ns",
            "uid": "u-1",
            "resourceVersion": "7",
            "generation": 1,
            "managedFields": [{"manager": "opkeeper", "fieldsV1": {"f:spec": {".": {}}}}],
            **metadata,
        },
        "spec": {"type": "t", "executor": {"builtin": {"action": "noop"}}, "params": {"a": [1]}},
        "status": {"state": "Succeeded", "conditions": [{"type": "Succeeded", "status": "True"}]},
    }


@pytest.mark.parametrize(
    "body",
    [
        _operation_body(),
        _operation_body(labels={"opkeeper.dev/id": "1"}),
        _operation_body(labels={}, annotations={}),
        _operation_body(labels=None),
        _operation_body(
            annotations={
                "opkeeper.dev/kopf-managed": "yes",
                "opkeeper.dev/last-handled-configuration": '{"spec": {"type": "old"}}',
                "kubectl.kubernetes.io/last-applied-configuration": "{}",
                "example.com/note": "kept",
            }
        ),
        _operation_body(ownerReferences=[{"kind": "ScheduledTask", "name": "st"}]),
        {"kind": "ConfigMap", "metadata": {"name": "c"}, "data": {}},
        {"metadata": {}},
    ],
)
@pytest.mark.parametrize("extra_fields", [None, [], ["status.state"], ["metadata.uid"]])
def test_diffbase_storage_matches_kopfs_own(
    body: dict[str, Any], extra_fields: list[str] | None
) -> None:
    """The fast path computes exactly the essence (and stored essence) kopf computes."""
    ours = DiffBaseStorage(prefix=STORAGE_PREFIX, key="last-handled-configuration")
    kopfs = kopf.AnnotationsDiffBaseStorage(prefix=STORAGE_PREFIX, key="last-handled-configuration")
    before = copy.deepcopy(body)
    view = kopf.Body(cast(kopf.RawBody, body))
    essence = ours.build(body=view, extra_fields=extra_fields)
    assert essence == kopfs.build(body=view, extra_fields=extra_fields)
    assert ours.fetch(body=view) == kopfs.fetch(body=view)
    assert body == before  # the event body is not touched ...
    for value in essence.values():  # ... and the essence shares nothing with it
        assert all(value is not v for v in body.values())


def test_events_beyond_the_burst_and_rate_are_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("opkeeper.controller.events.time.monotonic", lambda: clock[0])
    client = kube.Client(kube.Credentials(server="http://127.0.0.1:1", ssl_context=False))
    poster = EventPoster(client, enabled=True, qps=2.0, burst=3)
    about = {"metadata": {"name": "op", "namespace": "a", "uid": "u"}}

    def post(count: int) -> None:
        for _ in range(count):
            poster.post(about, type="Normal", reason="Started", message="")

    async def scenario() -> list[int]:
        post(5)  # the burst: 3 queued, 2 dropped
        queued = [poster._queue.qsize()]
        clock[0] += 1.0  # one second refills qps=2 tokens
        post(5)
        queued.append(poster._queue.qsize())
        return queued

    assert asyncio.run(scenario()) == [3, 5]


class _LateClient:
    """A client whose answers reach the executor after the watch event of the Job's next
    change (``on_call`` runs while the request is in flight)."""

    def __init__(self, answer: dict[str, Any], on_call: Callable[[], None]) -> None:
        self.answer, self.on_call = answer, on_call

    async def create(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.on_call()
        return self.answer

    async def get(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.on_call()
        return self.answer


_JOB_NAME = job.job_name(operation="s", uid="u", attempt=0)


def _job_body(*, rv: int, complete: bool) -> dict[str, Any]:
    conditions = [{"type": "Complete", "status": "True"}] if complete else []
    return {
        "metadata": {
            "name": _JOB_NAME,
            "namespace": "n",
            "uid": "job-uid",
            "resourceVersion": str(rv),
            "labels": {job.OPERATION_UID_LABEL: "u"},
        },
        "status": {"conditions": conditions},
    }


@pytest.mark.parametrize("late", ["create", "get"])
def test_a_late_job_answer_does_not_hide_its_completion(late: str) -> None:
    op = models.Operation.model_validate(
        {
            "metadata": {"name": "s", "namespace": "n", "uid": "u"},
            "spec": {"type": "t", "executor": {"job": {"template": {"spec": {}}}}},
            "status": {
                "executor": {"kind": "job", "jobName": _JOB_NAME, "jobUid": "job-uid"},
            },
        }
    )
    ctx = base.Context(
        op=op,
        body={
            "apiVersion": "opkeeper.dev/v1alpha1",
            "metadata": {"name": "s", "namespace": "n", "uid": "u"},
        },
        id=1,
        attempt=0,
        now=datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
    )
    completed = _job_body(rv=7, complete=True)
    client = _LateClient(
        _job_body(rv=5, complete=False),
        on_call=lambda: executor.observe(event_type="MODIFIED", job=completed),
    )
    executor = job.JobExecutor(client)  # type: ignore[arg-type]
    if late == "create":
        asyncio.run(executor.start(ctx))
    outcome = asyncio.run(executor.poll(ctx))
    assert isinstance(outcome, base.Finished)
    assert outcome.event is states.Event.SUCCEED


def test_the_collector_exports_writes_and_retries() -> None:
    collector = metrics.StateCollector(
        states=lambda: {"Running": 2},
        oldest=lambda: {"Running": 3.0},
        writes=lambda: {("PATCH", "operations/status"): 5},
        retries=lambda: {"503": 2, "timeout": 1},
    )
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in collector.collect()
        for s in family.samples
    }
    assert (
        samples[
            ("opkeeper_api_writes_total", (("resource", "operations/status"), ("verb", "PATCH")))
        ]
        == 5
    )
    assert samples[("opkeeper_api_retries_total", (("cause", "503"),))] == 2
    assert samples[("opkeeper_api_retries_total", (("cause", "timeout"),))] == 1


def test_a_listed_operation_waits_in_the_background_only_when_settled() -> None:
    def body(state: str, *, observed: int, generation: int = 2) -> dict[str, Any]:
        condition = {"type": "Succeeded", "status": "True", "observedGeneration": observed}
        return {
            "metadata": {"generation": generation},
            "status": {"state": state, "conditions": [condition]},
        }

    assert operations._settled(body("Succeeded", observed=2))
    assert operations._settled(body("Cancelled", observed=2))
    assert not operations._settled(body("Succeeded", observed=1)), "relaunched after the end"
    assert not operations._settled(body("Running", observed=2))
    assert not operations._settled({"metadata": {}, "status": {}})
