"""The XML-RPC call path every XML-RPC dialect shares: decode, route, log, encode.

A dialect module (:mod:`opkeeper.gateway.dialects`) is a table of
:class:`Method` entries: each checks a method's signature, turns wire
values into the service's arguments and the service's answer into wire
values, and nothing else. It decides no state (state words come from
:func:`opkeeper.states.legacy`) and builds no fault: errors are raised, and
the method's dialect's table in :mod:`.faults` writes them. Faults raised
before a method is known (a body that does not parse, an unknown method) use
the gateway's own :data:`.faults.XMLRPC` table.

Every authenticated call except those marked ``logged=False`` goes into the
tenant's call log, with credentials (API keys, session strings) replaced by
placeholders and secret-looking parameters redacted.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from opkeeper import errors, names, states
from opkeeper.gateway import auth, cache, calllog, faults, service, xmlrpc

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
    identity: auth.Identity | None = None
    """A caller the transport already authenticated (the Kubernetes aggregation layer,
    :mod:`opkeeper.gateway.aggregated`): the call's own credentials are then not asked
    for; a Gandi session argument must still be a string and is ignored."""


@dataclasses.dataclass(kw_only=True)
class Outcome:
    """The result of one call, for the HTTP layer and its metrics."""

    body: bytes
    dialect: str
    """The method's dialect, or ``none`` before a method is known (a metrics label)."""
    method: str
    """The method name, or ``unknown`` (metrics labels must stay bounded)."""
    fault: faults.Fault | None = None
    retry_after: float | None = None
    """Set when the tenant's write budget refused the call (nothing was written): seconds
    until a retry will do, for a transport with its own way to say so (the aggregated
    API answers a Kubernetes 429 with ``Retry-After``, which client-go waits out)."""


@dataclasses.dataclass(kw_only=True)
class Call:
    """Per-call state a handler fills in for the call log."""

    request: Request
    params: tuple[xmlrpc.Value, ...]
    identity: auth.Identity | None = None
    logged_args: list[Any] = dataclasses.field(default_factory=list)
    logged_result: Any = None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Encoded:
    """A result a handler already encoded, for the answer and for the call log (a
    reused answer: encoding is most of a read's cost)."""

    body: bytes
    result_json: str


Handler = Callable[["Dispatcher", Call], Awaitable[Any]]
Admit = Callable[[str, Call], Awaitable[None]]
"""A check run once the method is known and before its handler (the aggregated API's
authorization); what it raises is not a fault: it leaves :meth:`Dispatcher.handle`."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
    """One served method: its dialect, its handler and how its errors are written."""

    dialect: states.Dialect
    faults: faults.Table
    """The dialect's fault table (Gandi's six-digit codes, or the gateway's own)."""
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
        methods: Mapping[str, Method],
        limits: xmlrpc.Limits = xmlrpc.DEFAULT_LIMITS,
        on_log_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self.svc = svc
        self.sessions = sessions
        self.keyring = keyring
        self.methods = methods
        self.limits = limits
        self.on_log_failure = on_log_failure
        """Called when the call log could not store an entry (a metric counts it)."""

    async def handle(self, *, body: bytes, request: Request, admit: Admit | None = None) -> Outcome:
        try:
            call = xmlrpc.decode_call(body, limits=self.limits)
        except Exception as exc:
            fault, encoded = faults.XMLRPC.encode(exc)
            return Outcome(body=encoded, dialect="none", method="unknown", fault=fault)
        method = self.methods.get(call.method)
        if method is None:
            fault, encoded = faults.XMLRPC.encode(
                xmlrpc.UnknownMethod(f"unknown method {names.shown(call.method)}")
            )
            return Outcome(body=encoded, dialect="none", method="unknown", fault=fault)
        state = Call(request=request, params=call.params)
        if admit is not None:
            await admit(call.method, state)
        try:
            result = await method.handler(self, state)
            encoded = result.body if isinstance(result, Encoded) else xmlrpc.encode_response(result)
        except Exception as exc:
            fault, encoded = method.faults.encode(exc)
            await self._log(call.method, method, state, fault=fault)
            return Outcome(
                body=encoded,
                dialect=method.dialect.value,
                method=call.method,
                fault=fault,
                retry_after=exc.retry_after if isinstance(exc, errors.RateLimited) else None,
            )
        await self._log(call.method, method, state, fault=None)
        return Outcome(body=encoded, dialect=method.dialect.value, method=call.method)

    async def _log(
        self, name: str, method: Method, call: Call, *, fault: faults.Fault | None
    ) -> None:
        """Log the call; a store failure never changes the answer: the call already
        happened, and a client told otherwise would retry it (a second create)."""
        if not method.logged or call.identity is None:
            return
        if fault is not None:
            result_json = "null"  # always JSON: a client parses every entry's result
        elif isinstance(call.logged_result, Encoded):
            result_json = call.logged_result.result_json
        else:
            result_json = to_json(calllog.redact(call.logged_result))
        await self.svc.call_log.record(
            on_failure=self.on_log_failure,
            tenant=call.identity.tenant,
            method=name,
            args_json=to_json({"args": calllog.redact(call.logged_args), "kw": {}}),
            result_json=result_json,
            exception="" if fault is None else f"{fault.code}: {fault.message}",
            address=call.request.address,
            when=call.request.now,
            user=call.identity.user_id,
        )

    # --- authentication ----------------------------------------------------------

    async def session_identity(self, call: Call, token: Any) -> auth.Identity:
        if not isinstance(token, str):
            raise xmlrpc.BadParams("the first argument is the session string from login()")
        if call.request.identity is not None:
            call.identity = call.request.identity
            return call.identity
        call.identity = await self.sessions.resolve(token)
        return call.identity

    def basic_identity(self, call: Call) -> auth.Identity:
        if call.request.identity is not None:
            call.identity = call.request.identity
            return call.identity
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


def arity(call: Call, *, low: int, high: int, signature: str) -> None:
    if not low <= len(call.params) <= high:
        raise xmlrpc.BadParams(f"expected {signature}, got {len(call.params)} arguments")


def int_arg(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise xmlrpc.BadParams(f"{what} must be an int")
    return value


def str_arg(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise xmlrpc.BadParams(f"{what} must be a string")
    return value


def struct_arg(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise xmlrpc.BadParams(f"{what} must be a struct")
    return value


def opid(value: Any) -> cache.OpId:
    return cache.OpId(names.int_id(int_arg(value, "opid"), what="opid"))


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


def to_json(value: Any) -> str:
    return _JSON.encode(value)
