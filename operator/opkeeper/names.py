"""The one boundary for names, namespaces, label values and ids that come from outside.

Everything a client names (an apply record, a dependency, a label, an id)
is checked here where it enters, with Kubernetes' own rules, so a hostile
value is refused with a bad-argument error before it can reach a URL path,
a label selector or a store. :mod:`opkeeper.kube` checks every path segment
again with the same functions (defence in depth: a segment that is not a
valid name is refused, never quoted into something the server resolves).

Each check measures length before matching, so no pattern ever runs on
more than a few hundred characters.
"""

from __future__ import annotations

import re

from opkeeper import errors

SUBDOMAIN_MAX = 253
LABEL_MAX = 63
LABEL_KEY_PREFIX_MAX = 253
ID_MAX = 2**31 - 1
"""Ids travel as XML-RPC ``<int>`` (32 bits) in every dialect that has types."""

_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_SHOWN_MAX = 40


class InvalidName(errors.InvalidArgument):
    """A name, namespace, label or id that Kubernetes' rules refuse."""

    def __init__(self, message: str, *, what: str, value: object) -> None:
        super().__init__(message)
        text = value if isinstance(value, str) else repr(value)
        self.element = (what, text[:_SHOWN_MAX])


def shown(value: object, *, limit: int = _SHOWN_MAX) -> str:
    """A short, printable rendering of client input for an error message: at most
    ``limit`` characters of its repr, marked when cut, so a fault never echoes a
    megabyte back (or into a log)."""
    text = repr(value[: limit + 1] if isinstance(value, str | bytes) else value)
    return text if len(text) <= limit else text[:limit] + "...(cut)"


def _check(value: object, *, what: str, pattern: re.Pattern[str], max_len: int, rule: str) -> str:
    if not isinstance(value, str):
        raise InvalidName(f"{what} must be a string", what=what, value=value)
    if not value:
        raise InvalidName(f"{what} must not be empty", what=what, value=value)
    if len(value) > max_len:
        raise InvalidName(
            f"{what} {shown(value)} is longer than {max_len} characters", what=what, value=value
        )
    if not pattern.fullmatch(value):
        raise InvalidName(f"{what} {shown(value)} is not a valid {rule}", what=what, value=value)
    return value


def object_name(value: object, *, what: str = "name") -> str:
    """An object name: a DNS-1123 subdomain (lower-case alphanumerics, ``-`` and ``.``,
    at most 253 characters), what Operations, ScheduledTasks, Secrets and Jobs need."""
    return _check(
        value,
        what=what,
        pattern=_SUBDOMAIN,
        max_len=SUBDOMAIN_MAX,
        rule="name (lower-case letters, digits, '-' and '.', starting and ending alphanumeric)",
    )


def namespace(value: object, *, what: str = "namespace") -> str:
    """A namespace: a DNS-1123 label (at most 63 characters, no dots)."""
    return _check(
        value,
        what=what,
        pattern=_DNS_LABEL,
        max_len=LABEL_MAX,
        rule="namespace (lower-case letters, digits and '-', at most 63)",
    )


def label_value(value: object, *, what: str = "label value") -> str:
    """A label value: empty, or at most 63 alphanumerics, ``-``, ``_`` and ``.``,
    starting and ending alphanumeric."""
    if value == "":
        return ""
    return _check(
        value,
        what=what,
        pattern=_LABEL_VALUE,
        max_len=LABEL_MAX,
        rule="label value (letters, digits, '-', '_' and '.', at most 63)",
    )


def label_key(value: object, *, what: str = "label key") -> str:
    """A label key: an optional DNS subdomain prefix and ``/``, then a name part of at
    most 63 alphanumerics, ``-``, ``_`` and ``.``."""
    if not isinstance(value, str):
        raise InvalidName(f"{what} must be a string", what=what, value=value)
    prefix, slash, name = value.rpartition("/")
    if slash:
        object_name(prefix, what=f"{what} prefix")
    if not name:
        raise InvalidName(f"{what} {shown(value)} has an empty name part", what=what, value=value)
    label_value(name, what=what)
    return value


def labels(value: object, *, what: str = "labels") -> dict[str, str]:
    """A labels map: every key and value checked (at most 64 labels)."""
    if not isinstance(value, dict):
        raise InvalidName(f"{what} must be a struct of strings", what=what, value=value)
    if len(value) > 64:
        raise InvalidName(f"{what}: at most 64 labels", what=what, value=len(value))
    return {
        label_key(k, what=f"{what} key"): label_value(v, what=f"{what} value")
        for k, v in value.items()
    }


def int_id(value: object, *, what: str = "id") -> int:
    """An id: an integer from 1 to 2**31-1 (booleans are not ids)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidName(f"{what} must be an integer", what=what, value=value)
    if not 1 <= value <= ID_MAX:
        raise InvalidName(f"{what} {value} is out of range (1 to {ID_MAX})", what=what, value=value)
    return value


_SUBRESOURCES = frozenset({"status", "scale", "log", "binding"})


def path_segment(value: str, *, kind: str) -> str:
    """One URL path segment the Kubernetes client is about to send: refused unless it
    is a valid name of its kind (``name``, ``namespace`` or ``subresource``)."""
    if kind == "namespace":
        return namespace(value)
    if kind == "subresource":
        if value not in _SUBRESOURCES:
            raise InvalidName(
                f"unknown subresource {shown(value)}", what="subresource", value=value
            )
        return value
    return object_name(value)
