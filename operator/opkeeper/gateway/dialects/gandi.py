"""The Gandi dialect: Gandi API v1's ``login`` and ``operation_*`` methods.

Methods take the session string from ``login`` as their first argument;
ids are ``<int>``; states are Gandi's words (RUN, WAIT, DONE, ERROR,
CANCEL) from :mod:`opkeeper.states`; errors are Gandi's six-digit faults
(:data:`opkeeper.gateway.faults.GANDI`).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any

from opkeeper import errors, names, states
from opkeeper.gateway import cache, calllog, faults, rpc, service, xmlrpc

DIALECT = states.Dialect.GANDI


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
    answer: rpc.Encoded


_DETAILS = "gandi_details"
"""Where the encoded details are kept in :attr:`cache.OperationEntry.derived`."""


def _details_answer(entry: cache.OperationEntry, *, now: datetime.datetime) -> rpc.Encoded:
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
    answer = rpc.Encoded(
        body=xmlrpc.encode_response(details), result_json=rpc.to_json(calllog.redact(details))
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
        "params": rpc.wire(entry.spec.get("params") or {}),
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
        details["result"] = rpc.wire(result)
    return details


# --- methods ---------------------------------------------------------------------


async def _login(d: rpc.Dispatcher, call: rpc.Call) -> str:
    """Gandi API v1's ``login(login, password[, safe])`` (login: the key's user id,
    password: the API key; ``safe`` is accepted and changes nothing), and the shorter
    ``login(apikey)``."""
    rpc.arity(call, low=1, high=3, signature="login(login, password[, safe]) or login(apikey)")
    if len(call.params) == 1:
        user_id, key = None, rpc.str_arg(call.params[0], "apikey")
        call.logged_args = [rpc.REDACTED_KEY]
    else:
        user_id = rpc.str_arg(call.params[0], "login")
        key = rpc.str_arg(call.params[1], "password")
        if len(call.params) == 3 and not isinstance(call.params[2], bool):
            raise xmlrpc.BadParams("safe must be a boolean")
        call.logged_args = [user_id, rpc.REDACTED_KEY, *call.params[2:]]
    token = await d.sessions.login(key, user_id=user_id)
    call.identity = d.keyring.lookup(key)
    call.logged_result = rpc.REDACTED_SESSION
    return token


_LIST_FILTER_KEYS = frozenset({"updated_after", "updated_before", "state", "type"})


async def _operation_list(d: rpc.Dispatcher, call: rpc.Call) -> list[int]:
    rpc.arity(call, low=1, high=2, signature="operation_list(session[, filter])")
    who = await d.session_identity(call, call.params[0])
    raw = rpc.struct_arg(call.params[1], "filter") if len(call.params) == 2 else {}
    unknown = sorted(set(raw) - _LIST_FILTER_KEYS)
    if unknown:
        raise errors.InvalidArgument(
            f"unknown filter keys {', '.join(names.shown(k) for k in unknown[:5])};"
            f" known: {', '.join(sorted(_LIST_FILTER_KEYS))}"
        )
    for key in ("updated_after", "updated_before"):
        if key in raw and not isinstance(raw[key], datetime.datetime):
            raise xmlrpc.BadParams(f"filter {key} must be a dateTime.iso8601")
    state_word = rpc.str_arg(raw["state"], "filter state") if "state" in raw else None
    filter_ = service.ListFilter(
        states=states.states_for(states.Dialect.GANDI, state_word) if state_word else None,
        type=rpc.str_arg(raw["type"], "filter type") if "type" in raw else None,
        updated_after=raw.get("updated_after"),
        updated_before=raw.get("updated_before"),
    )
    ids = [int(i) for i in d.svc.list_operations(who=who, filter_=filter_)]
    call.logged_args = [rpc.REDACTED_SESSION, *call.params[1:]]
    call.logged_result = ids
    return ids


async def _operation_details(d: rpc.Dispatcher, call: rpc.Call) -> rpc.Encoded:
    rpc.arity(call, low=2, high=2, signature="operation_details(session, opid)")
    who = await d.session_identity(call, call.params[0])
    call.logged_args = [rpc.REDACTED_SESSION, call.params[1]]
    entry = d.svc.operation(who=who, id_=rpc.opid(call.params[1]))
    answer = _details_answer(entry, now=call.request.now)
    call.logged_result = answer
    return answer


async def _operation_relaunch(d: rpc.Dispatcher, call: rpc.Call) -> bool:
    rpc.arity(call, low=3, high=3, signature="operation_relaunch(session, opid, params)")
    who = await d.session_identity(call, call.params[0])
    call.logged_args = [rpc.REDACTED_SESSION, *call.params[1:]]
    params = rpc.struct_arg(call.params[2], "params")
    await d.svc.relaunch(who=who, id_=rpc.opid(call.params[1]), params=params)
    call.logged_result = True
    return True


async def _operation_cancel(d: rpc.Dispatcher, call: rpc.Call) -> bool:
    rpc.arity(call, low=2, high=2, signature="operation_cancel(session, opid)")
    who = await d.session_identity(call, call.params[0])
    call.logged_args = [rpc.REDACTED_SESSION, call.params[1]]
    await d.svc.cancel(who=who, id_=rpc.opid(call.params[1]))
    call.logged_result = True
    return True


async def _operation_create(d: rpc.Dispatcher, call: rpc.Call) -> int:
    rpc.arity(call, low=3, high=4, signature="operation_create(session, type, params[, object])")
    who = await d.session_identity(call, call.params[0])
    call.logged_args = [rpc.REDACTED_SESSION, *call.params[1:]]
    type_ = rpc.str_arg(call.params[1], "type")
    params = rpc.struct_arg(call.params[2], "params")
    object_ = rpc.struct_arg(call.params[3], "object") if len(call.params) == 4 else None
    id_ = int(await d.svc.create(who=who, type_=type_, params=params, object_=object_))
    call.logged_result = id_
    return id_


def _method(handler: rpc.Handler) -> rpc.Method:
    return rpc.Method(dialect=DIALECT, faults=faults.GANDI, handler=handler)


METHODS: Mapping[str, rpc.Method] = {
    "login": _method(_login),
    "operation_list": _method(_operation_list),
    "operation_details": _method(_operation_details),
    "operation_relaunch": _method(_operation_relaunch),
    "operation_cancel": _method(_operation_cancel),
    "operation_create": _method(_operation_create),
}
