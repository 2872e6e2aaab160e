"""The XML-RPC method table: the Gandi and gocept facades.

A facade checks a method's signature, turns wire values into the service's
arguments and the service's answer into wire values, and nothing else: it
decides no state (state words come from :func:`opkeeper.states.legacy` and
:func:`opkeeper.states.states_for`) and builds no fault (errors are raised
and :mod:`.faults` encodes them).

The two dialects authenticate differently because their signatures do:
Gandi methods take a session string as the first argument (from
``login(apikey)``); gocept's ``apply``/``query``/``log`` take none, so the
API key comes with HTTP Basic auth (the password; the user name is free),
as gocept's own clients send it.

Every authenticated call except ``log`` itself goes into the tenant's call
log, with credentials (API keys, session strings) replaced by placeholders.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

from opkeeper import errors, names, states
from opkeeper.gateway import auth, cache, calllog, faults, records, service, xmlrpc

log = logging.getLogger(__name__)

Dialect = Literal["gandi", "gocept"]
"""Which dialect a method belongs to (a metrics label)."""

REDACTED_KEY = "<api key>"
REDACTED_SESSION = "<session>"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Request:
    """What the HTTP layer knows about a call besides its body."""

    address: str
    """The peer's IP address (logged in the call log)."""
    authorization: str | None
    """The Authorization header, for the gocept dialect's Basic auth."""
    now: datetime.datetime
    """When the call arrived (eta is computed against it)."""


@dataclasses.dataclass(kw_only=True)
class Outcome:
    """The result of one call, for the HTTP layer and its metrics."""

    body: bytes
    dialect: str
    method: str
    """The method name, or ``unknown`` (metrics labels must stay bounded)."""
    fault: faults.Fault | None = None


@dataclasses.dataclass(kw_only=True)
class _Call:
    """Per-call state a handler fills in for the call log."""

    request: Request
    params: tuple[xmlrpc.Value, ...]
    identity: auth.Identity | None = None
    logged_args: list[Any] = dataclasses.field(default_factory=list)
    logged_result: Any = None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _Encoded:
    """A result a handler already encoded, for the answer and for the call log (a
    reused answer: encoding is most of a read's cost)."""

    body: bytes
    result_json: str


Handler = Callable[["Dispatcher", _Call], Awaitable[Any]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
    dialect: Dialect
    handler: Handler
    logged: bool = True
    """Whether calls go into the call log (all but ``log`` itself)."""


class Dispatcher:
    """Decodes a call, runs its facade, logs it and encodes the answer."""

    def __init__(
        self,
        *,
        svc: service.Service,
        sessions: auth.Sessions,
        keyring: auth.KeyRing,
        limits: xmlrpc.Limits = xmlrpc.DEFAULT_LIMITS,
        on_log_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self.svc = svc
        self.sessions = sessions
        self.keyring = keyring
        self.limits = limits
        self.on_log_failure = on_log_failure
        """Called when the call log could not store an entry (a metric counts it)."""

    async def handle(self, *, body: bytes, request: Request) -> Outcome:
        try:
            call = xmlrpc.decode_call(body, limits=self.limits)
        except Exception as exc:
            fault, encoded = faults.encode(exc)
            return Outcome(body=encoded, dialect="none", method="unknown", fault=fault)
        method = METHODS.get(call.method)
        if method is None:
            fault, encoded = faults.encode(
                xmlrpc.UnknownMethod(f"unknown method {names.shown(call.method)}")
            )
            return Outcome(body=encoded, dialect="none", method="unknown", fault=fault)
        state = _Call(request=request, params=call.params)
        try:
            result = await method.handler(self, state)
            if isinstance(result, _Encoded):
                encoded = result.body
            else:
                encoded = xmlrpc.encode_response(result)
        except Exception as exc:
            fault, encoded = faults.encode(exc)
            await self._log(call.method, method, state, fault=fault)
            return Outcome(body=encoded, dialect=method.dialect, method=call.method, fault=fault)
        await self._log(call.method, method, state, fault=None)
        return Outcome(body=encoded, dialect=method.dialect, method=call.method)

    async def _log(
        self, name: str, method: Method, call: _Call, *, fault: faults.Fault | None
    ) -> None:
        """Log the call; a store failure never changes the answer: the call already
        happened, and a client told otherwise would retry it (a second create)."""
        if not method.logged or call.identity is None:
            return
        if fault is not None:
            result_json = "null"  # always JSON: a client parses every entry's result
        elif isinstance(call.logged_result, _Encoded):
            result_json = call.logged_result.result_json
        else:
            result_json = _json(calllog.redact(call.logged_result))
        try:
            await self.svc.call_log.append(
                tenant=call.identity.tenant,
                method=name,
                args_json=_json({"args": calllog.redact(call.logged_args), "kw": {}}),
                result_json=result_json,
                exception="" if fault is None else f"{fault.code}: {fault.message}",
                address=call.request.address,
                when=call.request.now,
            )
        except Exception:
            self.on_log_failure()
            log.exception("call log write failed for %s.%s", call.identity.tenant, name)

    # --- authentication ----------------------------------------------------------

    async def session_identity(self, call: _Call, token: Any) -> auth.Identity:
        if not isinstance(token, str):
            raise xmlrpc.BadParams("the first argument is the session string from login()")
        call.identity = await self.sessions.resolve(token)
        return call.identity

    def basic_identity(self, call: _Call) -> auth.Identity:
        header = call.request.authorization or ""
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic" or not encoded:
            raise errors.Unauthenticated(
                "send the API key with HTTP Basic auth (any user name, the key as password)"
            )
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise errors.Unauthenticated("malformed Basic auth header") from None
        _, _, key = decoded.partition(":")
        call.identity = self.keyring.lookup(key)
        return call.identity


# --- argument checking -------------------------------------------------------------


def _arity(call: _Call, *, low: int, high: int, signature: str) -> None:
    if not low <= len(call.params) <= high:
        raise xmlrpc.BadParams(f"expected {signature}, got {len(call.params)} arguments")


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise xmlrpc.BadParams(f"{what} must be an int")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise xmlrpc.BadParams(f"{what} must be a string")
    return value


def _struct(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise xmlrpc.BadParams(f"{what} must be a struct")
    return value


def _opid(value: Any) -> cache.OpId:
    return cache.OpId(names.int_id(_int(value, "opid"), what="opid"))


# --- wire formatting ---------------------------------------------------------------


def wire(value: Any) -> Any:
    """Free-form data (params, results) made sendable with the standard types.

    Nulls have no standard type: struct members holding one are left out and
    array items become empty strings. Integers beyond 32 bits are sent as
    their decimal string rather than refusing the whole answer. Characters XML
    1.0 cannot carry (stored through kubectl, e.g. a NUL) become U+FFFD, so one
    such object never makes a whole list or query unanswerable.
    """
    if isinstance(value, dict):
        return {wire(str(k)): wire(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return ["" if v is None else wire(v) for v in value]
    if isinstance(value, str):
        return xmlrpc.printable(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not xmlrpc.I4_MIN <= value <= xmlrpc.I4_MAX:
        return str(value)
    return value


def _json_default(obj: Any) -> Any:
    if isinstance(obj, datetime.datetime):
        return obj.isoformat()
    if isinstance(obj, bytes):
        return base64.b64encode(obj).decode("ascii")
    return str(obj)


# One encoder for every call: json.dumps with options builds a new one per call.
_JSON = json.JSONEncoder(default=_json_default, sort_keys=True, separators=(",", ":"))


def _json(value: Any) -> str:
    return _JSON.encode(value)


def _eta_seconds(entry: cache.OperationEntry, *, now: datetime.datetime) -> int:
    """Gandi's ``eta``: seconds until ``status.eta``, 0 once finished, -1 when unknown.
    The one detail that depends on the time of the call."""
    if states.is_terminal(entry.state):
        return 0
    eta = cache.parse_time(entry.status.get("eta"))
    if eta is None:
        return -1
    return max(0, int((eta - now).total_seconds()))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _Details:
    """The encoded details of one entry version, for one ``eta`` value."""

    eta_seconds: int
    answer: _Encoded


_DETAILS = "gandi_details"
"""Where the encoded details are kept in :attr:`cache.OperationEntry.derived`."""


def _details_answer(entry: cache.OperationEntry, *, now: datetime.datetime) -> _Encoded:
    """The encoded details, built once per entry version and ``eta`` value.

    Details are a function of the entry and ``eta`` alone, so an answer kept with the
    entry is exact as long as ``eta`` is the same: always for finished operations and
    those without an eta, and within the same second otherwise.
    """
    eta_seconds = _eta_seconds(entry, now=now)
    kept = entry.derived.get(_DETAILS)
    if isinstance(kept, _Details) and kept.eta_seconds == eta_seconds:
        return kept.answer
    details = _gandi_details(entry, eta_seconds=eta_seconds)
    answer = _Encoded(
        body=xmlrpc.encode_response(details), result_json=_json(calllog.redact(details))
    )
    entry.derived[_DETAILS] = _Details(eta_seconds=eta_seconds, answer=answer)
    return answer


def _gandi_details(entry: cache.OperationEntry, *, eta_seconds: int) -> dict[str, Any]:
    status = entry.status
    last_error = "; ".join(status.get("errorInfo") or [])
    if not last_error and entry.state in states.FAILED:
        last_error = str(status.get("message") or entry.state.value)
    details: dict[str, Any] = {
        "id": entry.id,
        "name": entry.name,
        "type": entry.type,
        "state": states.legacy(entry.state, states.Dialect.GANDI),
        "date_created": entry.date_created,
        "date_updated": entry.date_updated,
        "params": wire(entry.spec.get("params") or {}),
        "eta": eta_seconds,
        "progress": int(
            status.get("progress") or (100 if entry.state is states.State.SUCCEEDED else 0)
        ),
        "last_error": last_error,
        "error_code": int(status.get("errorCode") or 0),
    }
    if entry.object_kind and entry.object_name:
        details["object"] = {"kind": entry.object_kind, "name": entry.object_name}
    result = status.get("result")
    if isinstance(result, dict):
        details["result"] = wire(result)
    return details


# --- Gandi ------------------------------------------------------------------------


async def _login(d: Dispatcher, call: _Call) -> str:
    """Gandi API v1's ``login(login, password[, safe])`` (login: the key's user id,
    password: the API key; ``safe`` is accepted and changes nothing), and the shorter
    ``login(apikey)``."""
    _arity(call, low=1, high=3, signature="login(login, password[, safe]) or login(apikey)")
    if len(call.params) == 1:
        user_id, key = None, _str(call.params[0], "apikey")
        call.logged_args = [REDACTED_KEY]
    else:
        user_id = _str(call.params[0], "login")
        key = _str(call.params[1], "password")
        if len(call.params) == 3 and not isinstance(call.params[2], bool):
            raise xmlrpc.BadParams("safe must be a boolean")
        call.logged_args = [user_id, REDACTED_KEY, *call.params[2:]]
    token = await d.sessions.login(key, user_id=user_id)
    call.identity = d.keyring.lookup(key)
    call.logged_result = REDACTED_SESSION
    return token


_LIST_FILTER_KEYS = frozenset({"updated_after", "updated_before", "state", "type"})


async def _operation_list(d: Dispatcher, call: _Call) -> list[int]:
    _arity(call, low=1, high=2, signature="operation_list(session[, filter])")
    who = await d.session_identity(call, call.params[0])
    raw = _struct(call.params[1], "filter") if len(call.params) == 2 else {}
    unknown = sorted(set(raw) - _LIST_FILTER_KEYS)
    if unknown:
        raise errors.InvalidArgument(
            f"unknown filter keys {', '.join(names.shown(k) for k in unknown[:5])};"
            f" known: {', '.join(sorted(_LIST_FILTER_KEYS))}"
        )
    for key in ("updated_after", "updated_before"):
        if key in raw and not isinstance(raw[key], datetime.datetime):
            raise xmlrpc.BadParams(f"filter {key} must be a dateTime.iso8601")
    state_word = _str(raw["state"], "filter state") if "state" in raw else None
    filter_ = service.ListFilter(
        states=states.states_for(states.Dialect.GANDI, state_word) if state_word else None,
        type=_str(raw["type"], "filter type") if "type" in raw else None,
        updated_after=raw.get("updated_after"),
        updated_before=raw.get("updated_before"),
    )
    ids = [int(i) for i in d.svc.list_operations(who=who, filter_=filter_)]
    call.logged_args = [REDACTED_SESSION, *call.params[1:]]
    call.logged_result = ids
    return ids


async def _operation_details(d: Dispatcher, call: _Call) -> _Encoded:
    _arity(call, low=2, high=2, signature="operation_details(session, opid)")
    who = await d.session_identity(call, call.params[0])
    call.logged_args = [REDACTED_SESSION, call.params[1]]
    entry = d.svc.operation(who=who, id_=_opid(call.params[1]))
    answer = _details_answer(entry, now=call.request.now)
    call.logged_result = answer
    return answer


async def _operation_relaunch(d: Dispatcher, call: _Call) -> bool:
    _arity(call, low=3, high=3, signature="operation_relaunch(session, opid, params)")
    who = await d.session_identity(call, call.params[0])
    call.logged_args = [REDACTED_SESSION, *call.params[1:]]
    params = _struct(call.params[2], "params")
    await d.svc.relaunch(who=who, id_=_opid(call.params[1]), params=params)
    call.logged_result = True
    return True


async def _operation_cancel(d: Dispatcher, call: _Call) -> bool:
    _arity(call, low=2, high=2, signature="operation_cancel(session, opid)")
    who = await d.session_identity(call, call.params[0])
    call.logged_args = [REDACTED_SESSION, call.params[1]]
    await d.svc.cancel(who=who, id_=_opid(call.params[1]))
    call.logged_result = True
    return True


async def _operation_create(d: Dispatcher, call: _Call) -> int:
    _arity(call, low=3, high=4, signature="operation_create(session, type, params[, object])")
    who = await d.session_identity(call, call.params[0])
    call.logged_args = [REDACTED_SESSION, *call.params[1:]]
    type_ = _str(call.params[1], "type")
    params = _struct(call.params[2], "params")
    object_ = _struct(call.params[3], "object") if len(call.params) == 4 else None
    id_ = int(await d.svc.create(who=who, type_=type_, params=params, object_=object_))
    call.logged_result = id_
    return id_


# --- gocept -----------------------------------------------------------------------


async def _apply(d: Dispatcher, call: _Call) -> list[records.Record]:
    who = d.basic_identity(call)
    _arity(call, low=1, high=1, signature="apply([record, ...])")
    call.logged_args = list(call.params)
    batch = call.params[0]
    if not isinstance(batch, list):
        raise xmlrpc.BadParams("apply takes one array of records")
    result = [wire(r) for r in await d.svc.apply(who=who, batch=batch)]
    call.logged_result = result
    return result


async def _query(d: Dispatcher, call: _Call) -> list[records.Record]:
    who = d.basic_identity(call)
    _arity(call, low=1, high=2, signature="query(type[, filter])")
    call.logged_args = list(call.params)
    type_ = _str(call.params[0], "type")
    exact = _struct(call.params[1], "filter") if len(call.params) == 2 else {}
    result = [wire(r) for r in d.svc.query(who=who, type_=type_, exact=exact)]
    call.logged_result = result
    return result


def _entry(entry: calllog.Entry, tenant: str) -> dict[str, Any]:
    return {
        "serial": int(entry.serial),
        "timestamp": entry.timestamp.strftime("%Y-%m-%d %H:%M:%S"),
        "method": entry.method,
        "args": entry.args_json,
        "result": entry.result_json,
        "exception": entry.exception,
        "ipaddress": entry.address,
        "resource_group": tenant,
    }


async def _call_log(d: Dispatcher, call: _Call) -> list[dict[str, Any]]:
    who = d.basic_identity(call)
    _arity(call, low=0, high=1, signature="log([serial])")
    serial = _int(call.params[0], "serial") if call.params else None
    return [_entry(e, who.tenant) for e in await d.svc.log(who=who, serial=serial)]


METHODS: Mapping[str, Method] = {
    "login": Method(dialect="gandi", handler=_login),
    "operation_list": Method(dialect="gandi", handler=_operation_list),
    "operation_details": Method(dialect="gandi", handler=_operation_details),
    "operation_relaunch": Method(dialect="gandi", handler=_operation_relaunch),
    "operation_cancel": Method(dialect="gandi", handler=_operation_cancel),
    "operation_create": Method(dialect="gandi", handler=_operation_create),
    "apply": Method(dialect="gocept", handler=_apply),
    "query": Method(dialect="gocept", handler=_query),
    "log": Method(dialect="gocept", handler=_call_log, logged=False),
}
"""Every served method; anything else is an unknown-method fault."""
