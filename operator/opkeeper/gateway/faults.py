"""The tables from errors to XML-RPC faults, one per way of writing them.

Clients branch on ``faultCode``, so a code, once published, never changes
meaning. :data:`XMLRPC` is the gateway's own table, for the gocept dialect
and for every fault raised before a method is known (a body that does not
parse, an unknown method): protocol problems use the XML-RPC "fault code
interoperability" codes (-32700 and neighbours) that several client
libraries know, domain errors small positive codes that echo the HTTP status
a REST API would give. :data:`GANDI` is Gandi API v1's six-digit scheme
(qualification, object, cause; ``ServerError: ...`` / ``DataError: ...
[element: value]``), which unmodified Gandi clients classify. docs/faults.md
documents every row of both; a test keeps page and code in step.

A new error class gets one row per table. Nothing else in the gateway builds a
fault code.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable

from opkeeper import errors, names
from opkeeper.gateway import xmlrpc

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Row:
    """One published fault code."""

    error: type[Exception]
    code: int
    name: str
    """A short stable name, used as a metrics label and in docs/faults.md."""


XMLRPC_ROWS: tuple[Row, ...] = (
    # Most specific first: the first row whose class matches wins.
    Row(error=xmlrpc.MalformedXml, code=-32700, name="parse_error"),
    Row(error=xmlrpc.ForbiddenXml, code=-32701, name="forbidden_xml"),
    Row(error=xmlrpc.BodyTooLarge, code=-32702, name="body_too_large"),
    Row(error=xmlrpc.LimitExceeded, code=-32703, name="limit_exceeded"),
    Row(error=xmlrpc.InvalidRequest, code=-32600, name="invalid_request"),
    Row(error=xmlrpc.UnknownMethod, code=-32601, name="unknown_method"),
    Row(error=xmlrpc.BadParams, code=-32602, name="bad_params"),
    Row(error=xmlrpc.NotRepresentable, code=-32604, name="not_representable"),
    Row(error=errors.InvalidArgument, code=400, name="invalid_argument"),
    Row(error=errors.Unauthenticated, code=401, name="unauthenticated"),
    Row(error=errors.Forbidden, code=403, name="forbidden"),
    Row(error=errors.NotFound, code=404, name="not_found"),
    Row(error=errors.Conflict, code=409, name="conflict"),
    Row(error=errors.IllegalTransition, code=422, name="illegal_transition"),
    Row(error=errors.RateLimited, code=429, name="rate_limited"),
    Row(error=errors.Unavailable, code=503, name="unavailable"),
    Row(error=errors.OpkeeperError, code=500, name="error"),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fault:
    """A fault ready to encode."""

    code: int
    name: str
    message: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Table:
    """One way of turning errors into faults: rows, most specific first, the row for
    anything unplanned, and how a row's faultString is written."""

    name: str
    """For docs/faults.md and tests (``xmlrpc``, ``gandi``)."""
    rows: tuple[Row, ...]
    internal: Row
    """Anything unplanned: the client gets an incident id, the log the traceback."""
    text: Callable[[Row, str, errors.OpkeeperError | None], str] = lambda row, message, exc: message
    """The faultString of a row for a message (and the error, for its element)."""

    def row_for(self, exc: BaseException) -> Row:
        """The row of an exception (:attr:`internal` for anything unplanned)."""
        for row in self.rows:
            if isinstance(exc, row.error):
                return row
        return self.internal

    def fault_for(self, exc: Exception) -> Fault:
        """Turn any exception into a fault; unplanned ones are logged, never shown."""
        row = self.row_for(exc)
        if row is self.internal:
            incident = uuid.uuid4().hex[:12]
            log.error("internal error, incident %s", incident, exc_info=exc)
            message = f"internal error (incident {incident}); the server log has the details"
            return Fault(code=row.code, name=row.name, message=self.text(row, message, None))
        message = str(exc) or row.name.replace("_", " ")
        if len(message) > MESSAGE_MAX:
            # Messages quote client input (shortened where they do); this is the backstop.
            message = message[:MESSAGE_MAX] + "...(cut)"
        known = exc if isinstance(exc, errors.OpkeeperError) else None
        return Fault(code=row.code, name=row.name, message=self.text(row, message, known))

    def encode(self, exc: Exception) -> tuple[Fault, bytes]:
        """The fault for ``exc`` and its encoded methodResponse."""
        fault = self.fault_for(exc)
        return fault, xmlrpc.encode_fault(code=fault.code, message=fault.message)


MESSAGE_MAX = 512
"""Longest faultString text (before a dialect's prefix): a fault never echoes a large
input back."""

XMLRPC = Table(
    name="xmlrpc",
    rows=XMLRPC_ROWS,
    internal=Row(error=Exception, code=-32603, name="internal_error"),
)


def _gandi_text(row: Row, message: str, exc: errors.OpkeeperError | None) -> str:
    if row.code // 100_000 == GANDI_SERVER:
        return f"ServerError: {message}"
    element = exc.element if exc is not None else None
    return f"DataError: {message}" + (f" [{element[0]}: {element[1]}]" if element else "")


GANDI_SERVER = 1
"""Gandi's qualification digit for the server's side (``ServerError``); 5 is Data, the
caller's input (``DataError``)."""

GANDI = Table(
    name="gandi",
    rows=(
        # Data (5): object 000 the request, 001 the credentials, 100 the operation;
        # causes in Gandi's validation order: 10 type, 20 syntax, 30 value,
        # 40 existence, 50 privileges, 60 state.
        Row(error=xmlrpc.BadParams, code=500010, name="bad_params"),
        Row(error=names.InvalidName, code=500020, name="invalid_name"),
        Row(error=errors.InvalidArgument, code=500030, name="invalid_argument"),
        Row(error=errors.Unauthenticated, code=500130, name="unauthenticated"),
        Row(error=errors.NotFound, code=510040, name="not_found"),
        Row(error=errors.Forbidden, code=510050, name="forbidden"),
        Row(error=errors.IllegalTransition, code=510060, name="illegal_transition"),
        # Server (1): object 100 the store (the API server), 500 the application.
        Row(error=errors.RateLimited, code=110030, name="rate_limited"),
        Row(error=errors.Unavailable, code=110010, name="unavailable"),
        Row(error=errors.Conflict, code=110020, name="conflict"),
        Row(error=xmlrpc.NotRepresentable, code=150010, name="not_representable"),
        Row(error=errors.OpkeeperError, code=150000, name="error"),
    ),
    internal=Row(error=Exception, code=150000, name="internal_error"),
    text=_gandi_text,
)

TABLES: tuple[Table, ...] = (XMLRPC, GANDI)
"""Every table (docs/faults.md documents each)."""
