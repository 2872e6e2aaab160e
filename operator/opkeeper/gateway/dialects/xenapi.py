"""The XenAPI dialect (``POST /xenapi``): sessions, the task class over Operations, events.

XenAPI is XML-RPC with its own envelope: every answer is a struct,
``{Status: Success, Value: ...}`` or ``{Status: Failure, ErrorDescription:
[CODE, params...]}``, never a fault (:mod:`.xenfaults` writes failures), so
this module has its own small call path instead of :class:`.rpc.Dispatcher`,
which answers with faults. It decodes with the same hardened codec, checks
argument counts and types, resolves the session, calls the one service and
logs the call like every dialect (credentials and session refs redacted).

A task is an Operation of the caller's namespace that has an id. Its uuid is
the Operation's uid and its ref ``OpaqueRef:<uid>`` (stable across gateway
restarts, see :mod:`.xenevents`); ``name_label``/``name_description`` are the
annotations :data:`.cache.NAME_LABEL_ANNOTATION` and
:data:`.cache.NAME_DESCRIPTION_ANNOTATION`, which kubectl and every dialect see;
``status`` comes from the one vocabulary table (:func:`opkeeper.states.legacy_status`).

Sessions are the gateway's signed tokens (:mod:`.auth`), sent as
``OpaqueRef:<token>``; ``session.logout`` revokes the token's nonce in the
shared list of :mod:`.revocations`, so it is invalid on every worker and
replica and after restarts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import functools
import json
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from opkeeper import errors, states
from opkeeper.gateway import (
    auth,
    cache,
    calllog,
    faults,
    revocations,
    rpc,
    service,
    xenevents,
    xenfaults,
    xmlrpc,
)

DIALECT = states.Dialect.XENAPI
REF_PREFIX = "OpaqueRef:"
NULL_REF = "OpaqueRef:NULL"
CLIENT_TASK_TYPE = "xenapi_task"
"""The Operation type of ``task.create``: client-side work, reported through the worker
path; its executor is the ``--executor`` policy's for this type (by default external)."""
API_VERSION_MAJOR = 2
API_VERSION_MINOR = 21
"""What ``session.API_version`` reads (``host.get_API_version_major/_minor``): the XenAPI
version whose task class and ``event.from`` this dialect follows."""
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
"""XenAPI's "no date" (an unknown eta, a task not finished)."""
_REF_NAMESPACE = uuid.UUID("6f0f6c1e-7d55-4d5e-9a59-0b3c1e8d2a41")
"""Derives the stable per-tenant pool and host uuids and the session uuids."""
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """The XenAPI dialect's bounds."""

    events: xenevents.Settings = dataclasses.field(default_factory=xenevents.Settings)
    revocations: revocations.Settings = dataclasses.field(default_factory=revocations.Settings)
    max_records: int = 10_000
    """Most task records one answer may carry (``task.get_all_records``, an ``event.from``
    that sends every task; default 10,000, about 10 MiB of XML): XenAPI has no paging,
    so a tenant with more tasks is refused rather than costing seconds of CPU and
    hundreds of MiB per call. ``task.get_all`` (refs only) and single records are
    always served."""


@dataclasses.dataclass(kw_only=True)
class Call:
    """One XenAPI call: its arguments (after the session) and what the log gets."""

    request: rpc.Request
    args: tuple[xmlrpc.Value, ...]
    ctx: xenfaults.Context
    identity: auth.Identity | None = None
    session: auth.Session | None = None
    logged_args: list[Any] = dataclasses.field(default_factory=list)
    logged_result: Any = None
    args_json: str = ""
    """The logged arguments already as JSON (shared by the waiters of one long poll)."""


Handler = Callable[["Endpoint", Call], Awaitable[Any]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
    """One served method: its argument names after the session, and its handler."""

    handler: Handler
    args: tuple[str, ...] = ()
    optional: int = 0
    """How many trailing ``args`` may be left out."""
    session: bool = True
    """Whether the first argument is the session ref."""
    cls: str = "task"
    long_poll: bool = False
    """Whether the answer leaves without waiting for its call-log entry's commit: a long
    poll answers a crowd of waiters at once, and waiting for their entries' group commit
    would put that commit between a change and every waiter's answer."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Encoded:
    """A success envelope already encoded: a task record kept with the cache entry it came
    from, or an event.from answer shared by the waiters of one change."""

    body: bytes
    result_json: str


class _Answers:
    """Encoded event.from answers for the feed's current token only (a change makes them
    all stale), at most :data:`ANSWERS_KEPT` of them."""

    def __init__(self) -> None:
        self._now = -1
        self._kept: dict[tuple[str, str, tuple[str, ...], int], Encoded] = {}

    def get(self, key: tuple[str, str, tuple[str, ...], int]) -> Encoded | None:
        return self._kept.get(key) if key[3] == self._now else None

    def put(self, key: tuple[str, str, tuple[str, ...], int], answer: Encoded, *, now: int) -> None:
        if now != self._now or len(self._kept) >= ANSWERS_KEPT:
            self._kept, self._now = {}, now
        self._kept[key] = answer


ANSWERS_KEPT = 256
"""Distinct event.from answers (tenant, token, classes) kept for the current token."""


def _envelope(value: Any) -> dict[str, Any]:
    return {"Status": "Success", "Value": value}


class Endpoint:
    """``POST /xenapi``: decode, check, authenticate, run, log, encode."""

    def __init__(
        self,
        *,
        svc: service.Service,
        sessions: auth.Sessions,
        keyring: auth.KeyRing,
        revoked: revocations.Revocations,
        feed: xenevents.TaskFeed,
        settings: Settings | None = None,
        limits: xmlrpc.Limits = xmlrpc.DEFAULT_LIMITS,
        on_log_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self.svc = svc
        self.sessions = sessions
        self.keyring = keyring
        self.revoked = revoked
        self.feed = feed
        self.settings = settings or Settings()
        self.limits = limits
        self.on_log_failure = on_log_failure
        self.event_answers = _Answers()
        self.registrations = xenevents.Registrations(settings=self.settings.events)
        self._logging: set[asyncio.Task[None]] = set()
        """Call-log writes of long polls still in flight (kept referenced until done)."""

    async def handle(self, *, body: bytes | Exception, request: rpc.Request) -> rpc.Outcome:
        """Answer one request (``body`` is the error when the body could not be read)."""
        ctx = xenfaults.Context(method="")
        call: Call | None = None
        long_poll = False
        try:
            if isinstance(body, Exception):
                raise body
            decoded = xmlrpc.decode_call(body, limits=self.limits)
            ctx = xenfaults.Context(method=decoded.method)
            method = METHODS.get(decoded.method)
            if method is None:
                raise xenfaults.MethodUnknown(decoded.method)
            params = decoded.params
            expected = len(method.args) + (1 if method.session else 0)
            if not expected - method.optional <= len(params) <= expected:
                raise xenfaults.ParameterCountMismatch(
                    decoded.method, expected=expected, received=len(params)
                )
            long_poll = method.long_poll
            call = Call(request=request, args=params[1:] if method.session else params, ctx=ctx)
            if method.session:
                await self._authenticate(call, params[0])
            value = await method.handler(self, call)
            # An answer the standard types cannot carry is a failure like any other.
            answer = (
                value.body
                if isinstance(value, Encoded)
                else xmlrpc.encode_response(_envelope(value), bare_strings=True)
            )
        except Exception as exc:
            ctx = call.ctx if call is not None else ctx
            failure = xenfaults.description(exc, ctx)
            answer = _encode({"Status": "Failure", "ErrorDescription": failure})
            if call is not None:
                await self._log(call, failure=failure)
            known = ctx.method if ctx.method in METHODS else "unknown"
            return rpc.Outcome(
                body=answer,
                dialect=DIALECT.value if known != "unknown" else "none",
                method=known,
                fault=_metric_fault(failure),
            )
        if long_poll:
            task = asyncio.create_task(self._log(call, failure=None))
            self._logging.add(task)
            task.add_done_callback(self._logging.discard)
        else:
            await self._log(call, failure=None)
        return rpc.Outcome(body=answer, dialect=DIALECT.value, method=call.ctx.method)

    async def _authenticate(self, call: Call, ref: Any) -> None:
        if not isinstance(ref, str):
            raise xenfaults.FieldTypeError("session_id")
        call.ctx.session = ref
        if not ref.startswith(REF_PREFIX):
            raise errors.Unauthenticated("not a session reference")
        session = await self.sessions.verify(ref[len(REF_PREFIX) :])
        if self.revoked.revoked(session.nonce):
            raise xenfaults.SessionRevoked("the session was logged out")
        call.session, call.identity = session, session.identity
        call.logged_args = [rpc.REDACTED_SESSION, *call.args]

    async def _log(self, call: Call, *, failure: list[str] | None) -> None:
        """Log the call like every dialect; a store failure never changes the answer."""
        if call.identity is None:
            return
        if failure is not None:
            # A SESSION_INVALID quotes the session: never into the log.
            shown = [rpc.REDACTED_SESSION if p == call.ctx.session else p for p in failure]
            exception, result_json = " ".join(shown), "null"
        elif isinstance(call.logged_result, Encoded):
            exception, result_json = "", call.logged_result.result_json
        else:
            exception, result_json = "", rpc.to_json(calllog.redact(call.logged_result))
        await self.svc.call_log.record(
            on_failure=self.on_log_failure,
            tenant=call.identity.tenant,
            method=call.ctx.method,
            args_json=call.args_json
            or rpc.to_json({"args": calllog.redact(call.logged_args), "kw": {}}),
            result_json=result_json,
            exception=exception,
            address=call.request.address,
            when=call.request.now,
            user=call.identity.user_id,
        )


def _encode(value: Any) -> bytes:
    """The answer as XenAPI's own server writes it (strings untyped, ``<value>x</value>``);
    a value no XML-RPC type carries becomes a failure envelope."""
    try:
        return xmlrpc.encode_response(value, bare_strings=True)
    except xmlrpc.NotRepresentable as exc:
        failure = xenfaults.description(exc, xenfaults.Context(method=""))
        return xmlrpc.encode_response(
            {"Status": "Failure", "ErrorDescription": failure}, bare_strings=True
        )


def _metric_fault(failure: list[str]) -> faults.Fault:
    """The failure as the request metrics count it (outcome label: the code, lower case;
    XenAPI codes are strings, so the numeric code is 0)."""
    return faults.Fault(code=0, name=failure[0].lower(), message=" ".join(failure[1:]))


# --- arguments -----------------------------------------------------------------------


def _str(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise xenfaults.FieldTypeError(field)
    return value


def _who(call: Call) -> auth.Identity:
    assert call.identity is not None, "session methods are authenticated before they run"
    return call.identity


def _task(ep: Endpoint, call: Call, value: Any, field: str = "self") -> cache.OperationEntry:
    """The caller's task a ref names, or HANDLE_INVALID (never a hint that another tenant
    has it)."""
    ref = _str(value, field)
    call.ctx.cls, call.ctx.ref = "task", ref
    uid = ref[len(REF_PREFIX) :] if ref.startswith(REF_PREFIX) else ""
    entry = ep.feed.task(_who(call).tenant, uid) if _UUID.match(uid) else None
    if entry is None:
        raise xenfaults.HandleInvalid("task", ref)
    return entry


def _id(entry: cache.OperationEntry) -> cache.OpId:
    assert entry.id is not None, "tasks are Operations with an id"
    return entry.id


def task_ref(entry: cache.OperationEntry) -> str:
    return REF_PREFIX + entry.uid


def derived_ref(tenant: str, kind: str) -> tuple[str, str]:
    """The stable uuid and ref of the tenant's one pool or host."""
    value = str(uuid.uuid5(_REF_NAMESPACE, f"{kind}:{tenant}"))
    return value, REF_PREFIX + value


# --- the task record -----------------------------------------------------------------

_RECORD = "xenapi_record"
_RECORD_BODY = "xenapi_record_body"


def _time(value: Any, fallback: datetime.datetime) -> datetime.datetime:
    return cache.parse_time(value) or fallback


def task_record(entry: cache.OperationEntry) -> dict[str, Any]:
    """The task record of one entry version (kept with the entry: it depends on nothing
    else, not even the time of the call)."""
    kept = entry.derived.get(_RECORD)
    if isinstance(kept, dict):
        return kept
    record = _build_record(entry)
    entry.derived[_RECORD] = record
    return record


def _build_record(entry: cache.OperationEntry) -> dict[str, Any]:
    """The record, already sendable: only the free-form values (names, type, result, error
    info) can hold characters XML cannot carry or integers beyond 32 bits, so only they go
    through :func:`.xmlrpc.printable` / :func:`.rpc.wire` (the whole record through
    ``rpc.wire`` cost as much as encoding it)."""
    status, spec = entry.status, entry.spec
    annotations = entry.metadata.get("annotations") or {}
    finished = states.is_terminal(entry.state)
    cancel_requested = bool(spec.get("cancel"))
    end = _time(status.get("finishedAt"), entry.date_updated) if finished else EPOCH
    failed = entry.state in states.FAILED
    if failed:
        info = [_text(i) for i in status.get("errorInfo") or []] or [
            _text(status.get("message") or entry.state.value)
        ]
    elif entry.state is states.State.CANCELLED:
        info = ["TASK_CANCELLED", task_ref(entry)]
    else:
        info = []
    code = status.get("errorCode")
    result = status.get("result")
    allowed = ["destroy"] if finished else ([] if cancel_requested else ["cancel"])
    kind = _text(entry.type)
    return {
        "uuid": _text(entry.uid),
        "name_label": _text(annotations.get(cache.NAME_LABEL_ANNOTATION, kind)),
        "name_description": _text(annotations.get(cache.NAME_DESCRIPTION_ANNOTATION, "")),
        "status": states.legacy_status(entry.state, DIALECT, cancel_requested=cancel_requested),
        "progress": 100 if finished else min(100, max(0, int(status.get("progress") or 0))),
        "eta": end if finished else _time(status.get("eta"), EPOCH),
        "type": kind,
        "result": _text(json.dumps(result, sort_keys=True))
        if entry.state is states.State.SUCCEEDED and result
        else "",
        "error_code": rpc.wire(int(code)) if isinstance(code, int) and code else int(failed),
        "error_info": info,
        "created": entry.date_created,
        "finished": end,
        "allowed_operations": allowed,
        "current_operations": {},
        "resident_on": NULL_REF,
        "subtask_of": NULL_REF,
        "subtasks": [],
        "other_config": {
            "opkeeper_id": str(entry.id),
            "opkeeper_name": _text(entry.name),
            "opkeeper_state": entry.state.value,
        },
    }


def _text(value: Any) -> str:
    return xmlrpc.printable(str(value))


TASK_FIELDS = (
    "uuid",
    "name_label",
    "name_description",
    "status",
    "progress",
    "eta",
    "type",
    "result",
    "error_code",
    "error_info",
    "created",
    "finished",
    "allowed_operations",
    "current_operations",
    "resident_on",
    "subtask_of",
    "subtasks",
    "other_config",
)
"""A task record's members, each also served as ``task.get_<field>``."""
RECORD_FIELDS = (*TASK_FIELDS, "opkeeper_id", "opkeeper_name", "opkeeper_state")
"""Every member name a task record has (other_config's included): none looks secret to
:func:`.calllog.is_secret_name` (a unit test checks), so the record goes into the call
log without a :func:`.calllog.redact` walk, which cost more than the rest of the build."""


LOGGED_RECORD_FIELDS = (
    "uuid",
    "name_label",
    "status",
    "progress",
    "result",
    "error_code",
    "error_info",
)
"""What the call log keeps of a ``get_record`` answer: what the client learnt. The rest
of the record is constant (``resident_on``, ``subtasks``, ...) or follows from these,
and clients poll ``get_record`` in loops: the full record was 60% more bytes per entry
than a Gandi ``operation_details`` entry, which showed in the read rate."""


def _record_answer(entry: cache.OperationEntry) -> Encoded:
    """The encoded ``get_record`` answer, built once per entry version."""
    kept = entry.derived.get(_RECORD_BODY)
    if isinstance(kept, Encoded):
        return kept
    record = task_record(entry)
    logged = {field: record[field] for field in LOGGED_RECORD_FIELDS}
    answer = Encoded(body=_encode(_envelope(record)), result_json=rpc.to_json(logged))
    entry.derived[_RECORD_BODY] = answer
    return answer


# --- session, pool, host -------------------------------------------------------------


async def _login(ep: Endpoint, call: Call) -> str:
    user = _str(call.args[0], "username")
    call.ctx.user = user
    password = _str(call.args[1], "password")
    for value, field in zip(call.args[2:], ("version", "originator"), strict=False):
        _str(value, field)
    if len(call.args) == 3:
        raise xenfaults.ParameterCountMismatch(call.ctx.method, expected=4, received=3)
    token = await ep.sessions.login(password, user_id=user)
    call.identity = ep.keyring.lookup(password)
    call.logged_args = [user, rpc.REDACTED_KEY, *call.args[2:]]
    call.logged_result = rpc.REDACTED_SESSION
    return REF_PREFIX + token


async def _logout(ep: Endpoint, call: Call) -> str:
    assert call.session is not None
    await ep.revoked.revoke(nonce=call.session.nonce, expires=call.session.expires)
    ep.registrations.drop(tenant=_who(call).tenant, nonce=call.session.nonce)
    call.logged_result = ""
    return ""


async def _session_uuid(ep: Endpoint, call: Call) -> str:
    assert call.session is not None
    self_ref = _str(call.args[0], "self")
    if self_ref != call.ctx.session:
        raise xenfaults.HandleInvalid("session", self_ref)
    value = str(uuid.uuid5(_REF_NAMESPACE, f"session:{call.session.nonce}"))
    call.logged_result = value
    return value


async def _session_this_host(ep: Endpoint, call: Call) -> str:
    self_ref = _str(call.args[0], "self")
    if self_ref != call.ctx.session:
        raise xenfaults.HandleInvalid("session", self_ref)
    return derived_ref(_who(call).tenant, "host")[1]


def _check_derived(call: Call, kind: str) -> str:
    ref = _str(call.args[0], "self")
    uuid_, expected = derived_ref(_who(call).tenant, kind)
    if ref != expected:
        call.ctx.cls, call.ctx.ref = kind, ref
        raise xenfaults.HandleInvalid(kind, ref)
    return uuid_


async def _pool_all(ep: Endpoint, call: Call) -> list[str]:
    return [derived_ref(_who(call).tenant, "pool")[1]]


async def _pool_master(ep: Endpoint, call: Call) -> str:
    _check_derived(call, "pool")
    return derived_ref(_who(call).tenant, "host")[1]


async def _pool_uuid(ep: Endpoint, call: Call) -> str:
    return _check_derived(call, "pool")


async def _host_all(ep: Endpoint, call: Call) -> list[str]:
    return [derived_ref(_who(call).tenant, "host")[1]]


async def _host_uuid(ep: Endpoint, call: Call) -> str:
    return _check_derived(call, "host")


async def _host_major(ep: Endpoint, call: Call) -> int:
    _check_derived(call, "host")
    return API_VERSION_MAJOR


async def _host_minor(ep: Endpoint, call: Call) -> int:
    _check_derived(call, "host")
    return API_VERSION_MINOR


# --- task --------------------------------------------------------------------------


async def _task_all(ep: Endpoint, call: Call) -> list[str]:
    refs = [task_ref(e) for e in ep.feed.tasks(_who(call).tenant)]
    call.logged_result = f"{len(refs)} refs"
    return refs


def _check_records(ep: Endpoint, tenant: str, what: str) -> None:
    count = ep.feed.count(tenant)
    if count > ep.settings.max_records:
        raise errors.Forbidden(
            f"{what} would send all {count} tasks, more than {ep.settings.max_records};"
            " use task.get_all with task.get_record, or event.from on task/<ref> classes"
        )


async def _task_all_records(ep: Endpoint, call: Call) -> dict[str, Any]:
    _check_records(ep, _who(call).tenant, "task.get_all_records")
    records = {task_ref(e): task_record(e) for e in ep.feed.tasks(_who(call).tenant)}
    call.logged_result = f"{len(records)} records"
    return records


async def _task_record(ep: Endpoint, call: Call) -> Encoded:
    entry = _task(ep, call, call.args[0])
    answer = _record_answer(entry)
    call.args_json = _ref_args(task_ref(entry))
    call.logged_result = answer
    return answer


@functools.lru_cache(maxsize=4096)
def _ref_args(ref: str) -> str:
    """The call-log arguments of a read of one task, by its ref: only a ref that named a
    task gets here (short, nothing to redact), and polling clients read the same tasks
    again and again."""
    return rpc.to_json({"args": [rpc.REDACTED_SESSION, ref], "kw": {}})


async def _task_by_uuid(ep: Endpoint, call: Call) -> str:
    value = _str(call.args[0], "uuid")
    entry = ep.feed.task(_who(call).tenant, value) if _UUID.match(value) else None
    if entry is None:
        call.ctx.cls, call.ctx.ref = "task", value
        raise xenfaults.HandleInvalid("task", value)
    call.logged_result = task_ref(entry)
    return task_ref(entry)


async def _task_by_name_label(ep: Endpoint, call: Call) -> list[str]:
    label = _str(call.args[0], "label")
    refs = [
        task_ref(e)
        for e in ep.feed.tasks(_who(call).tenant)
        if task_record(e)["name_label"] == label
    ]
    call.logged_result = refs
    return refs


def _getter(field: str) -> Handler:
    async def get(ep: Endpoint, call: Call) -> Any:
        entry = _task(ep, call, call.args[0])
        value = task_record(entry)[field]
        call.args_json = _ref_args(task_ref(entry))
        call.logged_result = value
        return value

    return get


def _setter(annotation: str) -> Handler:
    async def set_(ep: Endpoint, call: Call) -> str:
        entry = _task(ep, call, call.args[0])
        value = _str(call.args[1], "value")
        await ep.svc.annotate(who=_who(call), id_=_id(entry), annotations={annotation: value})
        call.logged_result = ""
        return ""

    return set_


async def _task_cancel(ep: Endpoint, call: Call) -> str:
    entry = _task(ep, call, call.args[0], "task")
    await ep.svc.cancel(who=_who(call), id_=_id(entry))
    call.logged_result = ""
    return ""


async def _task_destroy(ep: Endpoint, call: Call) -> str:
    entry = _task(ep, call, call.args[0])
    await ep.svc.destroy(who=_who(call), id_=_id(entry))
    call.logged_result = ""
    return ""


async def _task_create(ep: Endpoint, call: Call) -> str:
    label = _str(call.args[0], "label")
    description = _str(call.args[1], "description")
    who = _who(call)
    id_ = await ep.svc.create(
        who=who,
        type_=CLIENT_TASK_TYPE,
        params={},
        object_=None,
        annotations={
            cache.NAME_LABEL_ANNOTATION: label,
            cache.NAME_DESCRIPTION_ANNOTATION: description,
        },
    )
    ref = task_ref(ep.svc.operation(who=who, id_=id_))
    call.logged_result = ref
    return ref


# --- event -------------------------------------------------------------------------

_TOKEN = re.compile(r"^[0-9]{1,20}\Z")


async def _event_from(ep: Endpoint, call: Call) -> Encoded:
    given = call.args[0]
    if not isinstance(given, list) or not all(isinstance(c, str) for c in given):
        raise xenfaults.FieldTypeError("classes")
    classes = [str(c) for c in given]
    token_text = _str(call.args[1], "token")
    timeout = call.args[2]
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise xenfaults.FieldTypeError("timeout")
    if token_text and not _TOKEN.match(token_text):
        raise errors.InvalidArgument(
            "token: pass back the token of the previous event.from answer, or an empty string"
        )
    tenant = _who(call).tenant
    wanted_all = any(c in ("task", "*") for c in classes)
    wanted = {c[len("task/") :] for c in classes if c.startswith("task/")}
    changes: list[xenevents.Change] | None = None
    if token_text:
        token = int(token_text)
        changes = ep.feed.since(tenant, token)
        if changes == [] or not (wanted_all or wanted):
            await ep.feed.wait(tenant, token=token, seconds=float(timeout))
            changes = ep.feed.since(tenant, token)
    now = ep.feed.token
    call.logged_args = [rpc.REDACTED_SESSION, classes, token_text, timeout]
    if len(classes) <= _SHARED_ARGS_CLASSES:
        call.args_json = _event_from_args(tuple(classes), token_text, timeout)
    # Every client waiting with the same token wakes for the same change and gets the same
    # answer: it is built and encoded once (a crowd of waiters costs one encoding).
    key = (tenant, token_text, tuple(classes), now)
    kept = ep.event_answers.get(key)
    if kept is not None:
        call.logged_result = kept
        return kept
    events: list[dict[str, Any]] = []
    if wanted_all or wanted:
        if changes is None:
            operation: xenevents.EventOp = "mod" if token_text else "add"
            tasks = ep.feed.tasks(tenant)
            if not wanted_all:  # single refs: only those, looked up
                found = (ep.feed.task(tenant, r.removeprefix(REF_PREFIX)) for r in wanted)
                tasks = iter(sorted((e for e in found if e is not None), key=_id))
            else:
                _check_records(ep, tenant, "event.from with this token")
            events = [_event(e, operation, now) for e in tasks]
        else:
            events = _coalesced(changes)
        if not wanted_all:
            events = [e for e in events if e["ref"] in wanted]
    answer = Encoded(
        body=_encode(_envelope({"events": events, "valid_ref_counts": {}, "token": str(now)})),
        result_json=rpc.to_json(f"{len(events)} events, token {now}"),
    )
    ep.event_answers.put(key, answer, now=now)
    call.logged_result = answer
    return answer


_SHARED_ARGS_CLASSES = 8
"""event.from calls with at most this many classes share their call-log arguments' JSON
(a crowd waiting with the same arguments is logged with one encoding)."""


@functools.lru_cache(maxsize=64, typed=True)
def _event_from_args(classes: tuple[str, ...], token: str, timeout: float) -> str:
    """The call-log arguments of an event.from (lists of strings hold nothing to redact)."""
    return rpc.to_json({"args": [rpc.REDACTED_SESSION, list(classes), token, timeout], "kw": {}})


def _event(
    entry: cache.OperationEntry, operation: xenevents.EventOp, version: int
) -> dict[str, Any]:
    return {
        "id": str(version),
        "class": "task",
        "operation": operation,
        "ref": task_ref(entry),
        "obj_uuid": entry.uid,
        "snapshot": task_record(entry),
    }


def _coalesced(changes: list[xenevents.Change]) -> list[dict[str, Any]]:
    """One event per task, its latest, in the order of the latest changes (as XenAPI's
    event.from does): an add then mods is an add, an add then a del is nothing."""
    latest: dict[str, tuple[xenevents.EventOp, xenevents.Change]] = {}
    for change in changes:
        uid = change.entry.uid
        before = latest.pop(uid, None)
        operation = change.operation
        if before is not None and before[0] == "add":
            if operation == "del":
                continue
            operation = "add"
        latest[uid] = (operation, change)
    return [_event(c.entry, op, c.version) for op, c in latest.values()]


# --- event.register / event.next (XenAPI's older event API) --------------------------

MAX_REGISTERED_CLASSES = 256
"""Most classes one session may have registered: each is kept until logout or expiry."""
_TASK_CLASS = re.compile(r"^task/OpaqueRef:[0-9a-f-]{36}\Z")


def _registered_classes(value: Any) -> set[str]:
    """The classes of an event.register/unregister that can have events: ``task``, ``*``
    and ``task/<ref>`` (others never have any, so they are not kept)."""
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise xenfaults.FieldTypeError("classes")
    kept = {c for c in value if c in ("task", "*") or _TASK_CLASS.match(c)}
    if len(kept) > MAX_REGISTERED_CLASSES:
        raise errors.InvalidArgument(
            f"classes: at most {MAX_REGISTERED_CLASSES} task classes per session"
        )
    return kept


async def _event_register(ep: Endpoint, call: Call) -> str:
    assert call.session is not None
    classes = _registered_classes(call.args[0])
    registered = ep.registrations.get(tenant=_who(call).tenant, nonce=call.session.nonce)
    if registered is not None and len(registered.classes | classes) > MAX_REGISTERED_CLASSES:
        raise errors.InvalidArgument(
            f"classes: at most {MAX_REGISTERED_CLASSES} task classes per session"
        )
    ep.registrations.register(
        tenant=_who(call).tenant,
        nonce=call.session.nonce,
        classes=classes,
        token=ep.feed.token,
        expires=call.session.expires,
    )
    call.logged_result = ""
    return ""


async def _event_unregister(ep: Endpoint, call: Call) -> str:
    assert call.session is not None
    classes = _registered_classes(call.args[0])
    ep.registrations.unregister(tenant=_who(call).tenant, nonce=call.session.nonce, classes=classes)
    call.logged_result = ""
    return ""


def _wanted(classes: set[str], entry: cache.OperationEntry) -> bool:
    return "task" in classes or "*" in classes or f"task/{task_ref(entry)}" in classes


async def _event_next(ep: Endpoint, call: Call) -> list[dict[str, Any]]:
    """The registered classes' changes since the session's last event.next, waiting for
    one (as long as :attr:`.xenevents.Settings.max_wait_seconds` at most; then an empty
    list, and the client calls again). Waits count against the tenant's waiter bound."""
    assert call.session is not None
    tenant = _who(call).tenant
    registered = ep.registrations.get(tenant=tenant, nonce=call.session.nonce)
    if registered is None:
        raise xenfaults.SessionNotRegistered("call event.register first")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ep.feed.settings.max_wait_seconds
    while True:
        changes = ep.feed.since(tenant, registered.token)
        if changes is None:
            registered.token = ep.feed.token
            raise xenfaults.EventsLost("more changes than the gateway keeps; read the tasks again")
        if changes:
            registered.token = changes[-1].version
            events = [
                _event(c.entry, c.operation, c.version)
                for c in changes
                if _wanted(registered.classes, c.entry)
            ]
            if events:
                call.logged_result = f"{len(events)} events"
                return events
        remaining = deadline - loop.time()
        if remaining <= 0:
            call.logged_result = "0 events"
            return []
        await ep.feed.wait(tenant, token=registered.token, seconds=remaining)


METHODS: Mapping[str, Method] = {
    "session.login_with_password": Method(
        handler=_login,
        args=("username", "password", "version", "originator"),
        optional=2,
        session=False,
        cls="session",
    ),
    "session.logout": Method(handler=_logout, cls="session"),
    "session.get_uuid": Method(handler=_session_uuid, args=("self",), cls="session"),
    "session.get_this_host": Method(handler=_session_this_host, args=("self",), cls="session"),
    "pool.get_all": Method(handler=_pool_all, cls="pool"),
    "pool.get_master": Method(handler=_pool_master, args=("self",), cls="pool"),
    "pool.get_uuid": Method(handler=_pool_uuid, args=("self",), cls="pool"),
    "host.get_all": Method(handler=_host_all, cls="host"),
    "host.get_uuid": Method(handler=_host_uuid, args=("self",), cls="host"),
    "host.get_API_version_major": Method(handler=_host_major, args=("self",), cls="host"),
    "host.get_API_version_minor": Method(handler=_host_minor, args=("self",), cls="host"),
    "task.get_all": Method(handler=_task_all),
    "task.get_all_records": Method(handler=_task_all_records),
    "task.get_record": Method(handler=_task_record, args=("self",)),
    "task.get_by_uuid": Method(handler=_task_by_uuid, args=("uuid",)),
    "task.get_by_name_label": Method(handler=_task_by_name_label, args=("label",)),
    **{
        f"task.get_{field}": Method(handler=_getter(field), args=("self",)) for field in TASK_FIELDS
    },
    "task.set_name_label": Method(
        handler=_setter(cache.NAME_LABEL_ANNOTATION), args=("self", "value")
    ),
    "task.set_name_description": Method(
        handler=_setter(cache.NAME_DESCRIPTION_ANNOTATION), args=("self", "value")
    ),
    "task.cancel": Method(handler=_task_cancel, args=("task",)),
    "task.destroy": Method(handler=_task_destroy, args=("self",)),
    "task.create": Method(handler=_task_create, args=("label", "description")),
    "event.from": Method(
        handler=_event_from, args=("classes", "token", "timeout"), cls="event", long_poll=True
    ),
    "event.register": Method(handler=_event_register, args=("classes",), cls="event"),
    "event.unregister": Method(handler=_event_unregister, args=("classes",), cls="event"),
    "event.next": Method(handler=_event_next, cls="event", long_poll=True),
}
"""Every method served on ``POST /xenapi``, by name."""
