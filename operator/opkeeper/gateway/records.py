"""gocept resource records <-> Operation and ScheduledTask resources.

gocept's API speaks flat, snake_case records with ``__type__`` and
``__action__`` keys and a primary key (here ``name``). This module is the
one translation between those records and the resources: which keys a
client may write (they map onto ``spec``), which are read-only (status,
ids, dates), and how a sparse record is laid over the current spec. The
resource models in :mod:`opkeeper.models` do the validation, so a record is
refused with the same rules the API server would apply, only earlier and
with a message naming the record.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Mapping
from typing import Any, Literal

import pydantic

from opkeeper import errors, models, names
from opkeeper.gateway import cache

RecordType = Literal["operation", "scheduledtask"]
Action = Literal["set", "delete"]
TYPES: tuple[RecordType, ...] = ("operation", "scheduledtask")

Record = dict[str, Any]
Executor = dict[str, Any]
"""An executor as ``spec.executor`` holds it (camelCase or snake_case keys)."""

OPERATION_WRITABLE = frozenset(
    {
        "type",
        "object",
        "params",
        "depends_on",
        "deadline_seconds",
        "retries",
        "cancel",
        "relaunch",
        "ttl_seconds_after_finished",
    }
)
OPERATION_READONLY = frozenset(
    {
        "executor",
        "id",
        "state",
        "reason",
        "message",
        "progress",
        "eta",
        "result",
        "error_code",
        "error_info",
        "attempt",
        "date_created",
        "date_updated",
        "date_finished",
    }
)
TASK_WRITABLE = frozenset(
    {
        "exec_at",
        "schedule",
        "time_zone",
        "suspend",
        "concurrency_policy",
        "starting_deadline_seconds",
        "history_limit",
        "template",
    }
)
TASK_READONLY = frozenset(
    {
        "id",
        "state",
        "next_run_at",
        "last_schedule_time",
        "active",
        "last_operation",
        "missed_runs",
        "date_created",
    }
)
_META = frozenset({"__type__", "__action__", "name"})


def writable(type_: RecordType) -> frozenset[str]:
    return OPERATION_WRITABLE if type_ == "operation" else TASK_WRITABLE


def readonly(type_: RecordType) -> frozenset[str]:
    return OPERATION_READONLY if type_ == "operation" else TASK_READONLY


@dataclasses.dataclass(frozen=True, kw_only=True)
class Parsed:
    """One apply record, checked for shape (not yet against the current object)."""

    index: int
    """Position in the batch, for error messages."""
    type: RecordType
    action: Action
    name: str
    values: Mapping[str, Any]
    """Every key except __type__, __action__ and name."""


def parse(index: int, record: Any) -> Parsed:
    """Check one record's shape: a struct with a known type, action and a name."""
    where = f"record {index + 1}"
    if not isinstance(record, dict):
        raise errors.InvalidArgument(f"{where}: a record is a struct")
    type_ = record.get("__type__")
    if type_ not in TYPES:
        raise errors.InvalidArgument(
            f"{where}: __type__ must be one of {', '.join(TYPES)}, not {names.shown(type_)}"
        )
    action = record.get("__action__", "set")
    if action not in ("set", "delete"):
        raise errors.InvalidArgument(f"{where}: __action__ must be set or delete")
    if "name" not in record:
        raise errors.InvalidArgument(f"{where}: the primary key `name` is required")
    name = names.object_name(record["name"], what=f"{where}: name")
    values = {k: v for k, v in record.items() if k not in _META}
    unknown = sorted(set(values) - writable(type_) - readonly(type_))
    if unknown:
        shown = ", ".join(names.shown(k) for k in unknown[:5])
        raise errors.InvalidArgument(f"{where}: unknown keys for {type_}: {shown}")
    return Parsed(index=index, type=type_, action=action, name=name, values=values)


def validation_message(exc: pydantic.ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "record"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def _snake(model: pydantic.BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="python", exclude_none=True)


def spec_values(*, type_: RecordType, spec: Mapping[str, Any]) -> dict[str, Any]:
    """A stored spec (camelCase) as record values (snake_case)."""
    model: pydantic.BaseModel
    if type_ == "operation":
        model = models.OperationSpec.model_validate(spec)
        return _snake(model)
    model = models.ScheduledTaskSpec.model_validate(spec)
    values = _snake(model)
    template = values.pop("template")
    flat = dict(template.get("spec") or {})
    labels = (template.get("metadata") or {}).get("labels")
    if labels:
        flat["labels"] = labels
    values["template"] = flat
    return values


def build_spec(
    *, parsed: Parsed, current: Mapping[str, Any] | None, executor_for: Callable[[str], Executor]
) -> dict[str, Any]:
    """The full spec (camelCase) after laying ``parsed`` over ``current`` (None: a create).

    Read-only keys are refused on a create and must equal the current value on
    an update, so a record read with ``query`` can be sent back unchanged.

    The executor (of an Operation, or of a ScheduledTask's template) is read-only
    here: a legacy caller never chooses how work runs. A new object gets the
    operator's policy for its type (``executor_for``); an update keeps the current
    executor, unless it changes the type, which takes the new type's policy.
    """
    where = f"record {parsed.index + 1} ({parsed.type} {parsed.name})"
    given_ro = {k: v for k, v in parsed.values.items() if k in readonly(parsed.type)}
    if current is None and given_ro:
        raise errors.InvalidArgument(f"{where}: read-only keys: {', '.join(sorted(given_ro))}")
    base = {} if current is None else spec_values(type_=parsed.type, spec=current)
    updates = {
        k: v if k == "exec_at" else storable(v, where=f"{where}: {k}")
        for k, v in parsed.values.items()
        if k in writable(parsed.type)
    }
    values = {**base, **updates}
    try:
        if parsed.type == "operation":
            values["executor"] = _executor(base, values, executor_for=executor_for)
            return models.OperationSpec.model_validate(values).to_k8s()
        base_template = base.get("template") or {}
        template = values.get("template")
        if not isinstance(template, dict):
            raise errors.InvalidArgument(f"{where}: template must be a struct")
        template = dict(template)
        if "executor" in template and template["executor"] != base_template.get("executor"):
            raise errors.InvalidArgument(
                f"{where}: template.executor is read-only (the operator's policy for the"
                " template's type decides how its operations run)"
            )
        template["executor"] = _executor(base_template, template, executor_for=executor_for)
        labels = template.pop("labels", None)
        if labels is not None:
            labels = names.labels(labels, what=f"{where}: template.labels")
        values["template"] = {"spec": template, "metadata": {"labels": labels} if labels else None}
        return models.ScheduledTaskSpec.model_validate(values).to_k8s()
    except pydantic.ValidationError as exc:
        raise errors.InvalidArgument(f"{where}: {validation_message(exc)}") from None


def _executor(
    before: Mapping[str, Any], after: Mapping[str, Any], *, executor_for: Callable[[str], Executor]
) -> Executor:
    """The executor a gateway write leaves on a spec: the current one, or the policy's
    for the type when the object is new or its type changed."""
    if before.get("executor") and before.get("type") == after.get("type"):
        return dict(before["executor"])
    type_ = after.get("type")
    return executor_for(type_ if isinstance(type_, str) else "")


def check_readonly(*, parsed: Parsed, current_record: Mapping[str, Any]) -> None:
    """Refuse read-only keys whose value differs from the current record (type included:
    ``1.0`` or ``true`` is not the id ``1``)."""
    for key in sorted(readonly(parsed.type) & set(parsed.values)):
        if not _same(parsed.values[key], current_record.get(key)):
            raise errors.InvalidArgument(
                f"record {parsed.index + 1} ({parsed.type} {parsed.name}): {key} is read-only"
            )


def _same(a: Any, b: Any) -> bool:
    """Equality that also compares types, at every depth (Python's ``1.0 == 1``,
    ``True == 1``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def storable(value: Any, *, where: str) -> Any:
    """A decoded wire value as a spec may store it (JSON): a dateTime becomes its ISO
    8601 text in UTC; base64 is refused (params are text, and bytes that are not UTF-8,
    or hold a NUL, could be stored but never sent back in XML)."""
    if isinstance(value, dict):
        return {str(k): storable(v, where=where) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable(v, where=where) for v in value]
    if isinstance(value, datetime.datetime):
        return value.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if value is None or isinstance(value, str | bool | int | float):
        return value
    raise errors.InvalidArgument(
        f"{where}: a {type(value).__name__} value cannot be stored; send it as a string"
    )


def _time(value: Any) -> datetime.datetime | None:
    return cache.parse_time(value)


def _put(record: Record, key: str, value: Any) -> None:
    if value is not None:
        record[key] = value


def operation_record(entry: cache.OperationEntry) -> Record:
    """The full gocept record of an Operation."""
    record: Record = {"__type__": "operation", "name": entry.name}
    _put(record, "id", entry.id)
    record.update(spec_values(type_="operation", spec=entry.spec))
    status = entry.status
    record["state"] = entry.state.value
    for key, field in (
        ("reason", "reason"),
        ("message", "message"),
        ("progress", "progress"),
        ("error_code", "errorCode"),
        ("error_info", "errorInfo"),
        ("attempt", "attempt"),
        ("result", "result"),
    ):
        _put(record, key, status.get(field))
    _put(record, "eta", _time(status.get("eta")))
    record["date_created"] = entry.date_created
    record["date_updated"] = entry.date_updated
    _put(record, "date_finished", _time(status.get("finishedAt")))
    return record


def task_record(entry: cache.TaskEntry) -> Record:
    """The full gocept record of a ScheduledTask."""
    record: Record = {"__type__": "scheduledtask", "name": entry.name}
    _put(record, "id", entry.id)
    record.update(spec_values(type_="scheduledtask", spec=entry.spec))
    status = entry.status
    record["state"] = entry.state.value
    _put(record, "next_run_at", _time(status.get("nextRunAt")))
    _put(record, "last_schedule_time", _time(status.get("lastScheduleTime")))
    _put(record, "active", status.get("active"))
    _put(record, "last_operation", status.get("lastOperation"))
    _put(record, "missed_runs", status.get("missedRuns"))
    record["date_created"] = entry.date_created
    return record
