"""An in-cluster batch/v1 Job per attempt; waiting on it is waiting on us (INT).

Exactly-once start: the Job's name is derived from the operation and the
attempt, so a second create (after a controller crash between creating the
Job and recording it) meets AlreadyExists and adopts the Job that is there.
The Job is owned by the Operation (ownerReference), so deleting the
Operation lets the garbage collector delete the Job.

The controller learns about Job changes from a watch on Jobs labelled
:data:`OPERATION_UID_LABEL`; :meth:`JobExecutor.observe` keeps the latest
version of each such Job so that polling costs no API read.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from typing import Any

from opkeeper import errors, kube, models, states
from opkeeper.executors import base

OPERATION_LABEL = "opkeeper.dev/operation"
OPERATION_UID_LABEL = "opkeeper.dev/operation-uid"
ATTEMPT_LABEL = "opkeeper.dev/attempt"
NAME_LIMIT = 63
"""Job names end up in the pods' job-name label, which is limited to 63 characters."""


def job_name(*, operation: str, uid: str, attempt: int) -> str:
    """The Job of one attempt: deterministic, unique per attempt, at most 63 characters."""
    name = f"{operation}-{attempt}"
    if len(name) <= NAME_LIMIT:
        return name
    suffix = f"-{hashlib.sha256(uid.encode()).hexdigest()[:8]}-{attempt}"
    return operation[: NAME_LIMIT - len(suffix)].rstrip("-.") + suffix


def build_job(ctx: base.Context, *, name: str) -> kube.Body:
    """The Job for ``ctx``'s attempt: the template, with identity, owner and params injected."""
    spec = ctx.op.spec.executor.job
    assert spec is not None
    template = copy.deepcopy(spec.template)
    metadata: dict[str, Any] = dict(template.get("metadata") or {})
    metadata.pop("generateName", None)
    metadata["name"] = name
    metadata["namespace"] = ctx.namespace
    metadata["labels"] = {
        **(metadata.get("labels") or {}),
        OPERATION_LABEL: ctx.name,
        OPERATION_UID_LABEL: ctx.uid,
        ATTEMPT_LABEL: str(ctx.attempt),
    }
    metadata["ownerReferences"] = [
        {
            "apiVersion": ctx.body["apiVersion"],
            "kind": "Operation",
            "name": ctx.name,
            "uid": ctx.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    job_spec: dict[str, Any] = template.get("spec") or {}
    pod_spec: dict[str, Any] = job_spec.get("template", {}).get("spec", {})
    injected = {
        "OPKEEPER_PARAMS": json.dumps(ctx.op.spec.params or {}),
        "OPKEEPER_OPERATION": ctx.name,
        "OPKEEPER_NAMESPACE": ctx.namespace,
        "OPKEEPER_ID": str(ctx.id),
        "OPKEEPER_ATTEMPT": str(ctx.attempt),
    }
    for container in [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]:
        env = [e for e in container.get("env", []) if e.get("name") not in injected]
        container["env"] = env + [{"name": k, "value": v} for k, v in injected.items()]
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}


def _condition(job: kube.Body, kind: str) -> dict[str, Any] | None:
    for condition in job.get("status", {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            found: dict[str, Any] = condition
            return found
    return None


class JobExecutor:
    """Creates one Job per attempt and follows its conditions."""

    def __init__(self, client: kube.Client) -> None:
        self._client = client
        self._jobs: dict[tuple[str, str], kube.Body] = {}

    def observe(self, *, event_type: str | None, job: kube.Body) -> str | None:
        """Keep the latest version of a watched Job; return its operation's uid."""
        meta = job["metadata"]
        key = (meta["namespace"], meta["name"])
        if event_type == "DELETED":
            self._jobs.pop(key, None)
        else:
            self._hold(key, job)
        uid: str | None = (meta.get("labels") or {}).get(OPERATION_UID_LABEL)
        return uid

    def _hold(self, key: tuple[str, str], job: kube.Body) -> kube.Body:
        """Keep ``job`` unless a newer version is held, and return the version held: a
        create's or a GET's answer can arrive after the watch event of the Job's next
        change (it completed meanwhile), and that event is the last one the Job sends."""
        held = self._jobs.get(key)
        if kube.is_newer(job, than=held):
            self._jobs[key] = job
            return job
        assert held is not None
        return held

    async def start(self, ctx: base.Context) -> base.Outcome:
        name = job_name(operation=ctx.name, uid=ctx.uid, attempt=ctx.attempt)
        try:
            job = await self._client.create(
                kube.JOBS, build_job(ctx, name=name), namespace=ctx.namespace
            )
        except kube.AlreadyExists:
            job = await self._client.get(kube.JOBS, namespace=ctx.namespace, name=name)
            if (job["metadata"].get("labels") or {}).get(OPERATION_UID_LABEL) != ctx.uid:
                return base.Finished(
                    event=states.Event.FAIL_INTERNAL,
                    reason="JobNameTaken",
                    message=f"a Job named {name} exists and belongs to something else",
                )
        except errors.InvalidArgument as exc:
            return base.Finished(
                event=states.Event.FAIL_INTERNAL, reason="InvalidJobTemplate", message=str(exc)
            )
        self._hold((ctx.namespace, name), job)
        return base.Running(
            executor=models.ExecutorStatus(
                kind="job",
                job_name=name,
                job_uid=job["metadata"]["uid"],
                params=ctx.op.spec.params,
            )
        )

    async def poll(self, ctx: base.Context) -> base.Outcome:
        record = ctx.op.status.executor
        name = (
            record.job_name
            if record and record.job_name
            else job_name(operation=ctx.name, uid=ctx.uid, attempt=ctx.attempt)
        )
        job = self._jobs.get((ctx.namespace, name))
        if job is None:
            try:
                job = await self._client.get(kube.JOBS, namespace=ctx.namespace, name=name)
            except errors.NotFound:
                return base.Finished(
                    event=states.Event.FAIL_INTERNAL,
                    reason="JobMissing",
                    message=f"the Job {name} of this attempt was deleted",
                )
            job = self._hold((ctx.namespace, name), job)
        if record and record.job_uid and job["metadata"]["uid"] != record.job_uid:
            return base.Finished(
                event=states.Event.FAIL_INTERNAL,
                reason="JobReplaced",
                message=f"the Job {name} was replaced by another object",
            )
        if _condition(job, "Complete") is not None:
            return base.Finished(
                event=states.Event.SUCCEED, reason="JobComplete", result=ctx.op.status.result
            )
        failed = _condition(job, "Failed")
        if failed is not None:
            why = failed.get("reason") or "Failed"
            return base.Finished(
                event=states.Event.FAIL_INTERNAL,
                reason="JobFailed",
                message=f"Job {name} failed: {why}: {failed.get('message') or ''}".rstrip(": "),
                error_code=ctx.op.status.error_code or 1,
                error_info=list(ctx.op.status.error_info or [f"Job {name}: {why}"]),
            )
        if job["metadata"].get("deletionTimestamp"):
            # Being deleted (the garbage collector may take a while): it will not finish.
            return base.Finished(
                event=states.Event.FAIL_INTERNAL,
                reason="JobMissing",
                message=f"the Job {name} of this attempt is being deleted",
            )
        return base.Running()

    async def cancel(self, ctx: base.Context) -> None:
        record = ctx.op.status.executor
        if record is None or record.job_name is None:
            return
        # NotFound: already gone; Conflict: a different object now has that name.
        with contextlib.suppress(errors.NotFound, errors.Conflict):
            await self._client.delete(
                kube.JOBS,
                namespace=ctx.namespace,
                name=record.job_name,
                uid=record.job_uid,
                propagation="Background",
            )

    def forget(self, uid: str) -> None:
        """Job versions are dropped when the Job's watch says DELETED."""
