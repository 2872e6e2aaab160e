"""The resources opkeeper keeps: `Operation` and `ScheduledTask`.

These pydantic models are the single source of truth for both resources:
`opkeeper crds` generates the CRD manifests in `crds/` from them (see
:mod:`opkeeper.crdgen`), and the controller and gateway parse and build
objects with them. Attribute docstrings become the CRD field descriptions
that `kubectl explain` shows, so write them for a platform engineer.

Nothing here has a default value that the API server would write into an
object: a defaulted field would make `kubectl apply` and GitOps tools see a
diff they did not make. Defaults live in code (`effective_*` helpers).
"""

from __future__ import annotations

import datetime
from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field
from pydantic.alias_generators import to_camel

from opkeeper import states

PRESERVE: dict[str, Any] = {"x-kubernetes-preserve-unknown-fields": True}
"""Schema marker for free-form fields (params, results, Job templates)."""

DNS_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

Name = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_NAME)]
FreeForm = Annotated[dict[str, Any], Field(json_schema_extra=PRESERVE)]


class _Model(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
        extra="ignore",
        frozen=False,
    )

    def to_k8s(self) -> dict[str, Any]:
        """The object as the API server stores it: camelCase, unset fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# --- Operation ---------------------------------------------------------------


class ObjectRef(_Model):
    """What an operation acts on (BDOM OBJECT/NAME, e.g. domain example.org)."""

    kind: str = Field(min_length=1, max_length=63)
    """The kind of object, e.g. `domain` or `vm`."""
    name: str = Field(min_length=1, max_length=253)
    """The object's name, e.g. `example.org`."""


class BuiltinExecutor(_Model):
    """Work done inside the controller, for demos, tests and benchmarks."""

    action: Literal["noop", "sleep", "fail"]
    """noop succeeds at once; sleep succeeds after `seconds`; fail fails internally."""
    seconds: float | None = Field(default=None, ge=0, le=86400)
    """How long `sleep` takes, in seconds (default 1)."""
    progress_steps: int | None = Field(default=None, ge=0, le=100)
    """How many progress reports `sleep` makes on the way (default 0: none)."""
    message: str | None = Field(default=None, max_length=1024)
    """The error text `fail` reports."""


class JobExecutor(_Model):
    """An in-cluster batch/v1 Job; waiting on it is waiting on us (INT)."""

    template: FreeForm
    """A batch/v1 Job template (`metadata` and `spec`). The operation's
    params are injected as the environment variable OPKEEPER_PARAMS (JSON)."""


class WebhookExecutor(_Model):
    """An external system called over HTTP; waiting on it is waiting on them (EXT)."""

    url: str = Field(min_length=1, max_length=2048, pattern=r"^https?://")
    """Where the operation is POSTed, with an Idempotency-Key header per attempt."""
    poll_url: str | None = Field(default=None, max_length=2048, pattern=r"^https?://")
    """Where the result is polled (with backoff) when no callback arrives."""
    cancel_url: str | None = Field(default=None, max_length=2048, pattern=r"^https?://")
    """Where a cancel is POSTed, if the external system supports it."""
    timeout_seconds: int | None = Field(default=None, ge=1, le=3600)
    """Per-request HTTP timeout in seconds (default 10)."""


class ExternalExecutor(_Model):
    """Nothing is started: an outside actor reports progress and the result."""


class Executor(_Model):
    """How the work runs: exactly one of builtin, job, webhook, external."""

    model_config = pydantic.ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "[has(self.builtin), has(self.job), has(self.webhook),"
                    " has(self.external)].filter(x, x).size() == 1",
                    "message": "exactly one executor kind (builtin, job, webhook, external)"
                    " must be set",
                }
            ]
        }
    )

    builtin: BuiltinExecutor | None = None
    job: JobExecutor | None = None
    webhook: WebhookExecutor | None = None
    external: ExternalExecutor | None = None

    def kind(self) -> Literal["builtin", "job", "webhook", "external"]:
        """The executor kind that is set."""
        if self.builtin is not None:
            return "builtin"
        if self.job is not None:
            return "job"
        if self.webhook is not None:
            return "webhook"
        return "external"


class Retries(_Model):
    """How often a failed attempt is retried automatically."""

    limit: int = Field(ge=0, le=100)
    """How many retries after the first attempt."""
    backoff_seconds: int | None = Field(default=None, ge=1, le=86400)
    """Delay before the first retry, doubled each time (default 10)."""


class OperationSpec(_Model):
    """What is wanted; editable by users, GitOps and the gateway."""

    type: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    """The operation type, e.g. `domain_create` or `vm_deploy`."""
    object: ObjectRef | None = None
    params: FreeForm | None = None
    """Free-form parameters handed to the executor."""
    executor: Executor
    depends_on: list[Name] | None = Field(default=None, max_length=32)
    """Names of Operations in the same namespace that must succeed first."""
    deadline_seconds: int | None = Field(default=None, ge=1)
    """An attempt still unfinished after this many seconds fails internally."""
    retries: Retries | None = None
    cancel: bool | None = None
    """Set to true to cancel the operation (refused once it has finished)."""
    relaunch: int | None = Field(default=None, ge=0)
    """Bump this counter (usually with new params) to relaunch a finished operation."""
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)
    """Delete the operation this many seconds after it finished."""


class Result(_Model):
    """The outcome of a successful operation."""

    type: str = Field(min_length=1, max_length=63)
    """What `value` is, e.g. `domain` or `vm`."""
    value: Any = Field(default=None, json_schema_extra=PRESERVE)


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(_Model):
    """A Kubernetes-style condition (`kubectl wait --for=condition=...`)."""

    type: str = Field(min_length=1, max_length=316)
    status: ConditionStatus
    reason: str | None = Field(default=None, max_length=1024)
    message: str | None = Field(default=None, max_length=32768)
    last_transition_time: datetime.datetime | None = None
    observed_generation: int | None = Field(default=None, ge=0)


class AttemptRecord(_Model):
    """A finished earlier attempt, kept in `status.history`."""

    attempt: int = Field(ge=0)
    state: states.State
    started_at: datetime.datetime | None = None
    finished_at: datetime.datetime | None = None
    error_code: int | None = None
    error_info: list[Annotated[str, Field(max_length=1024)]] | None = Field(
        default=None, max_length=16
    )
    params: FreeForm | None = None
    """The params this attempt ran with."""


class ExecutorStatus(_Model):
    """What the current attempt started, so that a restarted controller finds it
    again instead of starting it a second time."""

    kind: Literal["builtin", "job", "webhook", "external"]
    job_name: str | None = Field(default=None, max_length=63)
    """The Job of this attempt (its name is derived from the operation and attempt)."""
    job_uid: str | None = Field(default=None, max_length=64)
    """The uid of that Job, to notice a Job deleted and re-created by someone else."""
    idempotency_key: str | None = Field(default=None, max_length=128)
    """The Idempotency-Key the webhook was called with (one per attempt)."""
    external_id: str | None = Field(default=None, max_length=256)
    """The id the external system gave the work, if it returned one."""
    accepted_at: datetime.datetime | None = None
    """When the external system accepted the work."""
    params: FreeForm | None = None
    """The params this attempt was started with (copied to history on relaunch)."""


HISTORY_LIMIT = 10
"""How many earlier attempts `status.history` keeps (bounded: etcd objects are capped)."""


class OperationStatus(_Model):
    """Owned by the controller; workers write only progress, eta, result and error*."""

    id: int | None = Field(default=None, ge=1)
    """Cluster-unique number legacy APIs use (Gandi opid, CloudStack jobid, BDOM task_id)."""
    state: states.State | None = None
    reason: str | None = Field(default=None, max_length=256)
    """Why the operation is in its state, in CamelCase (e.g. DependencyFailed)."""
    message: str | None = Field(default=None, max_length=4096)
    progress: int | None = Field(default=None, ge=0, le=100)
    """Percent complete, 0..100."""
    eta: datetime.datetime | None = None
    """When the work is expected to finish."""
    result: Result | None = None
    error_code: int | None = None
    error_info: list[Annotated[str, Field(max_length=1024)]] | None = Field(
        default=None, max_length=16
    )
    attempt: int | None = Field(default=None, ge=0)
    """The current attempt, counted from 0; retries and relaunches add one."""
    retries_used: int | None = Field(default=None, ge=0)
    """Automatic retries made since the last relaunch (bounded by spec.retries.limit)."""
    executor: ExecutorStatus | None = None
    queued_at: datetime.datetime | None = None
    """When the current attempt was queued; deadlineSeconds counts from here."""
    next_attempt_at: datetime.datetime | None = None
    """A retried attempt does not start before this time (backoff)."""
    observed_relaunch: int | None = Field(default=None, ge=0)
    """The spec.relaunch value the current attempt answers."""
    created_at: datetime.datetime | None = None
    started_at: datetime.datetime | None = None
    updated_at: datetime.datetime | None = None
    finished_at: datetime.datetime | None = None
    observed_generation: int | None = Field(default=None, ge=0)
    history: list[AttemptRecord] | None = Field(default=None, max_length=HISTORY_LIMIT)
    conditions: list[Condition] | None = Field(default=None, max_length=8)


class Operation(_Model):
    """A long-running asynchronous operation."""

    api_version: str | None = None
    kind: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: OperationSpec
    status: OperationStatus = Field(default_factory=OperationStatus)


# --- ScheduledTask -----------------------------------------------------------


class OperationTemplate(_Model):
    """The Operation a ScheduledTask creates on each run."""

    metadata: TemplateMetadata | None = None
    spec: OperationSpec


class TemplateMetadata(_Model):
    """Labels and annotations copied onto each created Operation."""

    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


OperationTemplate.model_rebuild()

ConcurrencyPolicy = Literal["Allow", "Forbid", "Replace"]


class ScheduledTaskSpec(_Model):
    """When to run which Operation: exactly one of execAt and schedule."""

    model_config = pydantic.ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.execAt) != has(self.schedule)",
                    "message": "exactly one of execAt and schedule must be set",
                }
            ]
        }
    )

    exec_at: datetime.datetime | None = None
    """Run once at this time (the BDOM exec-date)."""
    schedule: str | None = Field(default=None, min_length=1, max_length=128)
    """A cron expression (five fields, e.g. `0 3 * * *`), evaluated in `timeZone`."""
    time_zone: str | None = Field(default=None, min_length=1, max_length=64)
    """IANA time zone of `schedule` (default UTC)."""
    suspend: bool | None = None
    """While true, no new runs start (missed ones are counted)."""
    concurrency_policy: ConcurrencyPolicy | None = None
    """What to do when a run is due while the previous one is active (default Allow)."""
    starting_deadline_seconds: int | None = Field(default=None, ge=0)
    """A run may start at most this late (e.g. after a controller outage); else it is missed."""
    history_limit: int | None = Field(default=None, ge=0, le=1000)
    """How many finished Operations of this task to keep (default 10)."""
    template: OperationTemplate


class ScheduledTaskStatus(_Model):
    """Owned by the controller."""

    id: int | None = Field(default=None, ge=1)
    """Same counter as Operation ids."""
    state: states.TaskState | None = None
    next_run_at: datetime.datetime | None = None
    """The next run; while suspended or held (Forbid), the first run not yet started or missed."""
    last_schedule_time: datetime.datetime | None = None
    """The scheduled time of the latest run that created an Operation."""
    active: list[Name] | None = Field(default=None, max_length=100)
    """Names of this task's Operations that have not finished."""
    last_operation: str | None = Field(default=None, max_length=253)
    """The Operation of the latest run."""
    missed_runs: int | None = Field(default=None, ge=0)
    """Runs that never started (controller down, suspended, held past the starting deadline)."""
    last_missed_time: datetime.datetime | None = None
    """The scheduled time of the latest missed run."""
    observed_generation: int | None = Field(default=None, ge=0)
    conditions: list[Condition] | None = Field(default=None, max_length=8)


class ScheduledTask(_Model):
    """Creates an Operation at a time or on a cron schedule."""

    api_version: str | None = None
    kind: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: ScheduledTaskSpec
    status: ScheduledTaskStatus = Field(default_factory=ScheduledTaskStatus)
