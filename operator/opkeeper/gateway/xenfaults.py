"""The table from errors to XenAPI failures: ``{Status: Failure, ErrorDescription: [...]}``.

XenAPI never answers with an XML-RPC fault: every error is a success at the
XML-RPC level carrying ``ErrorDescription``, a list of strings whose first
item is a code clients branch on (``XenAPI.Failure.details[0]``; the XenAPI
package itself logs in again on ``SESSION_INVALID``) and whose further items
are the code's parameters, in XenAPI's order. This is the one place that
turns an error into such a list; docs/faults.md documents every row, and a
test keeps page and table in step.

The parameters depend on the call (the session or object reference the
client sent), so a row computes them from the error and the call's
:class:`Context`. A few errors exist only here, to carry XenAPI's
parameters (a method name, counts, a field); they subclass the errors.py
classes whose meaning they have.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable

from opkeeper import errors
from opkeeper.gateway import xmlrpc

log = logging.getLogger(__name__)

PARAM_MAX = 512
"""Longest parameter string of an ErrorDescription: a failure never echoes a large input."""


class MethodUnknown(xmlrpc.UnknownMethod):
    """No such method (XenAPI's ``MESSAGE_METHOD_UNKNOWN [name]``)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown method {name}")
        self.name = name


class ParameterCountMismatch(xmlrpc.BadParams):
    """Wrong number of arguments (``MESSAGE_PARAMETER_COUNT_MISMATCH [name, expected, got]``)."""

    def __init__(self, name: str, *, expected: int, received: int) -> None:
        super().__init__(f"{name} takes {expected} arguments, got {received}")
        self.name = name
        self.expected = expected
        self.received = received


class FieldTypeError(xmlrpc.BadParams):
    """An argument of the wrong XML-RPC type (``FIELD_TYPE_ERROR [field]``)."""

    def __init__(self, field: str) -> None:
        super().__init__(f"{field} has the wrong type")
        self.field = field


class HandleInvalid(errors.NotFound):
    """A reference that names nothing this caller may see (``HANDLE_INVALID [class, ref]``)."""

    def __init__(self, cls: str, ref: str) -> None:
        super().__init__(f"no {cls} {ref}")
        self.cls = cls
        self.ref = ref


class SessionRevoked(errors.Unauthenticated):
    """The session was logged out (``SESSION_INVALID [ref]``)."""


class SessionNotRegistered(errors.Conflict):
    """``event.next`` on a session with no ``event.register`` in this gateway process
    (``SESSION_NOT_REGISTERED [session ref]``): register again, then call it."""


class EventsLost(errors.Conflict):
    """``event.next`` after more changes than the gateway keeps (``EVENTS_LOST``): the
    registration is re-armed at the current state; read the tasks again, then continue."""


@dataclasses.dataclass(kw_only=True, slots=True)
class Context:
    """What a failure's parameters may quote from the call (filled in as the call runs)."""

    method: str
    """The method name, or ``""`` before one is known."""
    session: str = ""
    """The session reference the client sent (``SESSION_INVALID`` quotes it)."""
    user: str = ""
    """The user name of a login (``SESSION_AUTHENTICATION_FAILED`` quotes it)."""
    cls: str = "task"
    """The class the call addresses (``HANDLE_INVALID``'s first parameter)."""
    ref: str = ""
    """The object reference the call addresses (``HANDLE_INVALID``'s second)."""

    @property
    def login(self) -> bool:
        return self.method.startswith("session.login")


Params = Callable[[BaseException, Context], list[str]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Row:
    """One published failure code."""

    error: type[BaseException]
    code: str
    params: Params
    login: bool | None = None
    """Only for login calls (True), only for the others (False), or for any (None)."""
    doc: str = ""
    """The parameters, as docs/faults.md lists them."""


def _message(exc: BaseException, ctx: Context) -> list[str]:
    return [str(exc) or type(exc).__name__]


def _element_message(exc: BaseException, ctx: Context) -> list[str]:
    element = exc.element if isinstance(exc, errors.OpkeeperError) else None
    return [element[0] if element else "", str(exc)]


def _method_unknown(exc: BaseException, ctx: Context) -> list[str]:
    return [exc.name if isinstance(exc, MethodUnknown) else ctx.method]


def _count(exc: BaseException, ctx: Context) -> list[str]:
    assert isinstance(exc, ParameterCountMismatch)
    return [exc.name, str(exc.expected), str(exc.received)]


def _field(exc: BaseException, ctx: Context) -> list[str]:
    return [exc.field if isinstance(exc, FieldTypeError) else str(exc)]


def _handle(exc: BaseException, ctx: Context) -> list[str]:
    if isinstance(exc, HandleInvalid):
        return [exc.cls, exc.ref]
    return [ctx.cls, ctx.ref]


ROWS: tuple[Row, ...] = (
    # Most specific first: the first row whose class (and login flag) matches wins.
    Row(error=MethodUnknown, code="MESSAGE_METHOD_UNKNOWN", params=_method_unknown, doc="method"),
    Row(
        error=ParameterCountMismatch,
        code="MESSAGE_PARAMETER_COUNT_MISMATCH",
        params=_count,
        doc="method, expected count, received count",
    ),
    Row(error=xmlrpc.BadParams, code="FIELD_TYPE_ERROR", params=_field, doc="field"),
    # XenAPI has no codes for a refused body: these two are opkeeper's own, so a client
    # can tell "too large" and "refused for its shape" from a malformed call.
    Row(
        error=xmlrpc.BodyTooLarge,
        code="XMLRPC_REQUEST_TOO_LARGE",
        params=_message,
        doc="the size limit",
    ),
    Row(
        error=xmlrpc.ForbiddenXml,
        code="XMLRPC_REQUEST_REFUSED",
        params=_message,
        doc="what the body uses that is refused (a DTD, an entity)",
    ),
    Row(
        error=xmlrpc.LimitExceeded,
        code="XMLRPC_REQUEST_REFUSED",
        params=_message,
        doc="the limit the body breaks (depth, elements)",
    ),
    Row(
        error=xmlrpc.CodecError,
        code="XMLRPC_UNMARSHAL_FAILURE",
        params=_message,
        doc="what is wrong with the body",
    ),
    Row(
        error=errors.Unauthenticated,
        code="SESSION_AUTHENTICATION_FAILED",
        params=lambda exc, ctx: [ctx.user, str(exc)],
        login=True,
        doc="user, message",
    ),
    Row(
        error=errors.Unauthenticated,
        code="SESSION_INVALID",
        params=lambda exc, ctx: [ctx.session],
        doc="session reference",
    ),
    Row(error=errors.NotFound, code="HANDLE_INVALID", params=_handle, doc="class, reference"),
    Row(
        error=SessionNotRegistered,
        code="SESSION_NOT_REGISTERED",
        params=lambda exc, ctx: [ctx.session],
        doc="session reference",
    ),
    Row(error=EventsLost, code="EVENTS_LOST", params=lambda exc, ctx: [], doc="none"),
    Row(
        error=errors.IllegalTransition,
        code="OPERATION_NOT_ALLOWED",
        params=_message,
        doc="message",
    ),
    Row(error=errors.Forbidden, code="OPERATION_NOT_ALLOWED", params=_message, doc="message"),
    Row(error=errors.Conflict, code="OPERATION_NOT_ALLOWED", params=_message, doc="message"),
    Row(
        error=errors.InvalidArgument,
        code="INVALID_VALUE",
        params=_element_message,
        doc="field (or empty), message",
    ),
    Row(error=errors.Unavailable, code="INTERNAL_ERROR", params=_message, doc="message"),
    Row(error=errors.OpkeeperError, code="INTERNAL_ERROR", params=_message, doc="message"),
)
"""Every error the gateway raises on purpose, as a XenAPI failure."""

INTERNAL = Row(error=Exception, code="INTERNAL_ERROR", params=_message, doc="incident id message")
"""Anything unplanned: the client gets an incident id, the log the traceback."""


def row_for(exc: BaseException, ctx: Context) -> Row:
    for row in ROWS:
        if isinstance(exc, row.error) and row.login in (None, ctx.login):
            return row
    return INTERNAL


def description(exc: BaseException, ctx: Context) -> list[str]:
    """The ErrorDescription of ``exc`` (code first); unplanned errors are logged, never
    shown."""
    row = row_for(exc, ctx)
    if row is INTERNAL:
        incident = uuid.uuid4().hex[:12]
        log.error("internal error, incident %s", incident, exc_info=exc)
        return [row.code, f"internal error (incident {incident}); the server log has the details"]
    params = [
        p if len(p) <= PARAM_MAX else p[:PARAM_MAX] + "...(cut)" for p in row.params(exc, ctx)
    ]
    return [row.code, *(xmlrpc.printable(p) for p in params)]


def codes() -> list[str]:
    """Every code a client can receive (docs/faults.md lists each)."""
    return sorted({row.code for row in (*ROWS, INTERNAL)})
