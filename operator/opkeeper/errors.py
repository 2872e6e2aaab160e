"""The one exception hierarchy of opkeeper.

Domain code raises these; each protocol facade maps them to its own error
shape (XML-RPC fault, XenAPI ErrorDescription, CloudStack errorcode, HTTP
status) in exactly one table, so a new error needs one class here and one
row per facade, never an ad-hoc ``except`` in a handler.
"""

from __future__ import annotations


class OpkeeperError(Exception):
    """Base of every error opkeeper raises on purpose."""

    element: tuple[str, str] | None = None
    """The faulty parameter and a short form of its value, where one is to blame
    (Gandi's faultString ends with ``[element: value]``)."""


class InvalidArgument(OpkeeperError):
    """The caller sent something malformed: a wrong type, a bad value."""


class NotFound(OpkeeperError):
    """The named operation, task or session does not exist (for this caller)."""


class Unauthenticated(OpkeeperError):
    """No valid credentials: unknown API key, expired or unknown session."""


class Forbidden(OpkeeperError):
    """Valid credentials, but the caller may not do this."""


class Conflict(OpkeeperError):
    """The object changed underneath the caller, or already exists."""


class IllegalTransition(OpkeeperError):
    """A state change the state machine does not allow (e.g. cancel a finished operation)."""


class Unavailable(OpkeeperError):
    """A dependency (API server, store) is not reachable right now; retrying may help."""


class RateLimited(Unavailable):
    """The caller's namespace is over its write budget; retrying after ``retry_after``
    seconds will do. Each protocol answers it as its "temporarily unavailable"."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
