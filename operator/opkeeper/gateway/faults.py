"""The one table from errors to XML-RPC faults.

Clients branch on ``faultCode``, so a code, once published, never changes
meaning. Protocol-level problems use the codes of the XML-RPC "fault code
interoperability" convention (-32700 and neighbours) that several client
libraries already know; domain errors use small positive codes that echo the
HTTP status a REST API would give (404 not found, 401 unauthenticated, ...).
docs/faults.md documents every row; a test keeps the two in step.

A new error class gets one row here. Nothing else in the gateway builds a
fault code.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid

from opkeeper import errors
from opkeeper.gateway import xmlrpc

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Row:
    """One published fault code."""

    error: type[Exception]
    code: int
    name: str
    """A short stable name, used as a metrics label and in docs/faults.md."""


TABLE: tuple[Row, ...] = (
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
    Row(error=errors.Unavailable, code=503, name="unavailable"),
    Row(error=errors.OpkeeperError, code=500, name="error"),
)

MESSAGE_MAX = 512
"""Longest faultString sent (and logged): a fault never echoes a large input back."""

INTERNAL = Row(error=Exception, code=-32603, name="internal_error")
"""Anything unexpected: the client gets an incident id, the log gets the traceback."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fault:
    """A fault ready to encode."""

    code: int
    name: str
    message: str


def row_for(exc: BaseException) -> Row:
    """The table row of an exception (:data:`INTERNAL` for anything unplanned)."""
    for row in TABLE:
        if isinstance(exc, row.error):
            return row
    return INTERNAL


def fault_for(exc: Exception) -> Fault:
    """Turn any exception into a fault; unplanned ones are logged, never shown."""
    row = row_for(exc)
    if row is INTERNAL:
        incident = uuid.uuid4().hex[:12]
        log.error("internal error, incident %s", incident, exc_info=exc)
        return Fault(
            code=row.code,
            name=row.name,
            message=f"internal error (incident {incident}); the server log has the details",
        )
    message = str(exc) or row.name.replace("_", " ")
    if len(message) > MESSAGE_MAX:
        # Messages quote client input (shortened where they do); this is the backstop.
        message = message[:MESSAGE_MAX] + "...(cut)"
    return Fault(code=row.code, name=row.name, message=message)


def encode(exc: Exception) -> tuple[Fault, bytes]:
    """The fault for ``exc`` and its encoded methodResponse."""
    fault = fault_for(exc)
    return fault, xmlrpc.encode_fault(code=fault.code, message=fault.message)
