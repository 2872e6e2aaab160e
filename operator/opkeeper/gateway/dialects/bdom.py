"""The BDOM dialect: a REST task API, ``/bdom/task/OPCODE/TASK_ID/STATUS/OBJECT/NAME/USER_ID/``.

BDOM clients (curl scripts, mostly) read tasks with GET and write with POST
of small XML documents; ``-`` is the wildcard in every path segment. This
module is a thin adapter over the one domain service, like the XML-RPC
dialects, but it speaks HTTP itself: the status code is part of the answer.

* ``status`` lists Operations: ``task_id`` is ``status.id``, ``status`` the
  operation state's BDOM word from :data:`opkeeper.states.VOCABULARY`,
  ``object``/``name`` are ``spec.object``, ``opcode`` is ``spec.type``
  without its ``<object>_`` prefix (BDOM's ``transfer-in`` on a domain is
  the type ``domain_transfer-in``), ``date`` the creation time.
* ``scheduled`` lists the caller's ScheduledTasks that have not fired.
* ``delete`` takes the seed's ``Task.xsd`` body and deletes the listed
  tasks, all or nothing (:meth:`.service.Service.delete_tasks`).
* ``create`` (ours) takes :data:`CREATE_XSD`: without ``exec-date`` an
  Operation starts now, with it a one-shot ScheduledTask creates it then.

The path is parsed from the raw request target, segment by segment, each
percent-decoded on its own and checked with :mod:`opkeeper.names` (an
encoded slash or a ``..`` is a bad segment, never a different path).
Bodies are parsed by defusedxml's parser (no DTDs, entities or external
references) into a tree bounded in depth and element count, then validated
with a real XSD validator (``xmlschema``). Errors become HTTP statuses with
an XML body through the one table :data:`FAULTS`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import math
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal
from xml.sax import saxutils

import defusedxml
import defusedxml.ElementTree
import xmlschema

from opkeeper import apikeys, errors, names, states
from opkeeper.gateway import auth, cache, calllog, faults, rpc, service, xmlrpc

DIALECT = states.Dialect.BDOM
PREFIX = "/bdom/task/"
WILDCARD = "-"
CONTENT_TYPE = "text/xml"
REALM = 'Basic realm="opkeeper BDOM", charset="UTF-8"'
"""The ``WWW-Authenticate`` challenge of a 401: the API key as the Basic password."""

Opcode = Literal["status", "scheduled", "delete", "create"]
OPCODES: Mapping[str, str] = {
    "status": "GET",
    "scheduled": "GET",
    "delete": "POST",
    "create": "POST",
}
"""Each opcode and the one HTTP method it is served on."""

LABEL_CLASS = "bdom.opkeeper.dev/class"
"""The ScheduledTask label that ``scheduled`` shows as ``class``."""
LABEL_TYPE = "bdom.opkeeper.dev/type"
"""The ScheduledTask label that ``scheduled`` shows as ``type``."""
DEFAULT_CLASS = "RELAUNCH"
"""``class`` of a task without the label: the value BDOM's scheduled deletes carry."""
DEFAULT_TYPE = "COMPLEX"
"""``type`` of a task without the label: the value BDOM's scheduled deletes carry."""
TLD_PARAM = "tld_id"
"""The template param that ``scheduled`` shows as ``tld_id`` (an int; the executor
needs it too, which is why it is a param and not a label)."""

DATE = "%Y-%m-%d %H:%M:%S"
DAY = "%Y-%m-%d"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Limits:
    """What one BDOM request may cost."""

    max_body_bytes: int = 64 * 1024
    """Largest POST body (default 64 KiB: a delete of 100 ids is about 3 KiB)."""
    max_depth: int = 8
    """Deepest element nesting of a body (default 8; the schemas need 4)."""
    max_elements: int = 1000
    """Most elements in a body (default 1,000)."""
    max_attributes: int = 8
    """Most attributes on one element (default 8; the schemas allow one, and a
    validator's cost grows faster than linearly with them)."""
    max_name_chars: int = 64
    """Longest element or attribute name (default 64; the schemas' longest is 9)."""
    max_segment_chars: int = 253
    """Longest path segment, raw (default 253, the longest DNS name)."""
    max_ids: int = 100
    """Most task ids one delete may list (default 100, gocept apply's batch bound)."""


DEFAULT_LIMITS = Limits()


# --- errors and the one table -------------------------------------------------------


class MethodNotAllowed(errors.InvalidArgument):
    """The opcode is served on another HTTP method."""

    def __init__(self, message: str, *, allow: str) -> None:
        super().__init__(message)
        self.allow = allow


class UnknownOpcode(errors.NotFound):
    """No such opcode."""


class InvalidBody(errors.InvalidArgument):
    """Well-formed XML that its schema refuses, or values the schema cannot check."""


FAULTS = faults.Table(
    name="bdom",
    rows=(
        # Most specific first; code is the HTTP status.
        faults.Row(error=xmlrpc.BodyTooLarge, code=413, name="body_too_large"),
        faults.Row(error=xmlrpc.MalformedXml, code=400, name="malformed_xml"),
        faults.Row(error=xmlrpc.ForbiddenXml, code=400, name="forbidden_xml"),
        faults.Row(error=xmlrpc.LimitExceeded, code=400, name="limit_exceeded"),
        faults.Row(error=xmlrpc.InvalidRequest, code=400, name="invalid_request"),
        faults.Row(error=InvalidBody, code=400, name="invalid_body"),
        faults.Row(error=MethodNotAllowed, code=405, name="method_not_allowed"),
        faults.Row(error=names.InvalidName, code=400, name="invalid_name"),
        faults.Row(error=errors.InvalidArgument, code=400, name="invalid_argument"),
        faults.Row(error=errors.Unauthenticated, code=401, name="unauthenticated"),
        faults.Row(error=errors.Forbidden, code=403, name="forbidden"),
        faults.Row(error=UnknownOpcode, code=404, name="unknown_opcode"),
        faults.Row(error=errors.NotFound, code=404, name="not_found"),
        faults.Row(error=errors.Conflict, code=409, name="conflict"),
        faults.Row(error=errors.IllegalTransition, code=409, name="illegal_transition"),
        faults.Row(error=errors.RateLimited, code=429, name="rate_limited"),
        faults.Row(error=errors.Unavailable, code=503, name="unavailable"),
        faults.Row(error=errors.OpkeeperError, code=500, name="error"),
    ),
    internal=faults.Row(error=Exception, code=500, name="internal_error"),
)
"""Every error as an HTTP status (docs/faults.md, "BDOM"); a client's mistake is 4xx."""


# --- the path ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Path:
    """A parsed ``/bdom/task/...`` path; None is the wildcard."""

    opcode: Opcode
    task_id: cache.OpId | None = None
    states: frozenset[states.State] | None = None
    object_kind: str | None = None
    name: str | None = None
    user_id: str | None = None


_SEGMENTS = ("TASK_ID", "STATUS", "OBJECT", "NAME", "USER_ID")
_DIGITS_MAX = 10


def _segment(raw: str, *, what: str, limits: Limits) -> str | None:
    """One raw segment, percent-decoded on its own; None for the wildcard."""
    if len(raw) > limits.max_segment_chars:
        raise names.InvalidName(
            f"{what} is longer than {limits.max_segment_chars} characters", what=what, value=raw
        )
    try:
        value = urllib.parse.unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise names.InvalidName(f"{what} is not UTF-8", what=what, value=raw) from None
    if value == WILDCARD:
        return None
    if not value:
        raise names.InvalidName(f"{what} is empty; '-' is the wildcard", what=what, value=value)
    return value


def parse_path(raw_path: str, *, limits: Limits = DEFAULT_LIMITS) -> Path:
    """The path of a request target (its query, if any, is ignored), checked segment by
    segment: unknown opcode 404 (:class:`UnknownOpcode`), anything else malformed 400."""
    path = raw_path.partition("?")[0]
    if not path.startswith(PREFIX):
        raise errors.InvalidArgument(f"BDOM paths start with {PREFIX}")
    rest = path[len(PREFIX) :]
    if len(rest) > (limits.max_segment_chars + 1) * 8:
        raise errors.InvalidArgument("the path is too long")
    parts = rest.split("/")
    if parts and parts[-1] == "":
        parts.pop()  # the trailing slash of every BDOM path (optional here)
    if not parts:
        raise errors.InvalidArgument(f"expected {PREFIX}OPCODE/{'/'.join(_SEGMENTS)}/")
    opcode = _segment(parts[0], what="OPCODE", limits=limits)
    if opcode not in OPCODES:
        raise UnknownOpcode(
            f"unknown opcode {names.shown(opcode)}; expected one of {', '.join(OPCODES)}"
        )
    if len(parts) != 6:
        raise errors.InvalidArgument(
            f"expected {PREFIX}{opcode}/{'/'.join(_SEGMENTS)}/ ('-' for any), got"
            f" {len(parts) - 1} segments after the opcode"
        )
    task, status, kind, name, user = (
        _segment(raw, what=what, limits=limits)
        for raw, what in zip(parts[1:], _SEGMENTS, strict=True)
    )
    if name is not None and kind is None:
        raise errors.InvalidArgument("NAME needs OBJECT: to search by name, give the object too")
    return Path(
        opcode=opcode,  # type: ignore[arg-type]  # checked against OPCODES above
        task_id=None if task is None else _task_id(task, what="TASK_ID"),
        states=None if status is None else _states(status),
        object_kind=None if kind is None else names.label_value(kind, what="OBJECT"),
        name=None if name is None else names.object_name(name, what="NAME"),
        user_id=None if user is None else apikeys.user_id(user),
    )


def _task_id(text: str, *, what: str) -> cache.OpId:
    if not text.isascii() or not text.isdigit() or len(text) > _DIGITS_MAX:
        raise names.InvalidName(
            f"{what} {names.shown(text)} is not a task id", what=what, value=text
        )
    return cache.OpId(names.int_id(int(text), what=what))


def _states(word: str) -> frozenset[states.State]:
    if len(word) > 32:
        raise names.InvalidName(
            f"STATUS {names.shown(word)} is too long", what="STATUS", value=word
        )
    return states.states_for(DIALECT, word)


def only_user(path: Path) -> None:
    """``scheduled`` takes no STATUS (a task that has not fired has none); ``delete``
    and ``create`` take no filter at all (their bodies say what they act on)."""
    given = ["STATUS"] if path.states is not None else []
    if path.opcode in ("delete", "create"):
        given += [
            what
            for what, value in (
                ("TASK_ID", path.task_id),
                ("OBJECT", path.object_kind),
                ("NAME", path.name),
            )
            if value is not None
        ]
    if given:
        raise errors.InvalidArgument(f"{path.opcode} takes '-' for {', '.join(given)}")


# --- identity ------------------------------------------------------------------------------


def identity(*, authorization: str | None, keyring: auth.KeyRing, path: Path) -> auth.Identity:
    """The caller, from HTTP Basic auth (the API key is the password; the user name is
    free); the path's USER_ID must be the key's user id (``-``: the caller's own)."""
    scheme, _, encoded = (authorization or "").partition(" ")
    if scheme.lower() != "basic" or not encoded:
        raise errors.Unauthenticated("send the API key with HTTP Basic auth (the key as password)")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise errors.Unauthenticated("malformed Basic auth header") from None
    who = keyring.lookup(decoded.partition(":")[2])
    if path.user_id is not None and path.user_id != who.user_id:
        raise errors.Forbidden(
            f"USER_ID {names.shown(path.user_id)} is not the user of this API key"
        )
    return who


# --- reading ----------------------------------------------------------------------------------


def opcode_of(type_: str, kind: str | None) -> str:
    """BDOM's opcode of an operation type: the type without its ``<object>_`` prefix."""
    prefix = f"{kind}_" if kind else ""
    return (
        type_[len(prefix) :] if prefix and type_.startswith(prefix) and type_ != prefix else type_
    )


def type_of(*, opcode: str, kind: str) -> str:
    """The operation type of a BDOM opcode on an object kind (``domain_delete``)."""
    return f"{kind}_{opcode}"


def _matches(entry: cache.OperationEntry, path: Path) -> bool:
    return (
        (path.states is None or entry.state in path.states)
        and (path.object_kind is None or entry.object_kind == path.object_kind)
        and (path.name is None or entry.object_name == path.name)
    )


def select_operations(
    operations: cache.OperationCache, namespace: str, path: Path, *, limit: int
) -> list[cache.OperationEntry]:
    """The newest ``limit`` Operations matching the path's filters, in id order, from
    the cache's indexes: by id, by object and name, or the cache's own plan for "the
    newest N in these states" (``list_ids``), checked for OBJECT alone in growing
    batches, so no filter costs a walk in Python over the whole namespace."""
    if path.task_id is not None:
        entry = operations.get_id(namespace, path.task_id)
        if entry is None:
            raise errors.NotFound(f"task {path.task_id} not found")
        return [entry] if _matches(entry, path) else []
    if path.object_kind is not None and path.name is not None:
        found = [
            e
            for e in operations.select(namespace, {"object": (path.object_kind, path.name)})
            if e.id is not None and _matches(e, path)
        ]
        found.sort(key=lambda e: e.id or 0)
        return found[-limit:]
    by_id = operations.by_id
    kind = path.object_kind
    want = limit
    while True:
        ids = operations.list_ids(namespace, states_=path.states, limit=want)
        picked = [
            e
            for id_ in ids
            if (e := by_id.get((namespace, id_))) is not None
            and (kind is None or e.object_kind == kind)
        ]
        if len(picked) >= limit or len(ids) < want:
            picked = picked[:limit]
            picked.reverse()
            return picked
        # OBJECT matched only some: look further back, twice as far each time (the
        # total work stays within about twice what the answer needed).
        want *= 2


def next_run(task: cache.TaskEntry) -> datetime.datetime | None:
    """When a task fires next: ``spec.execAt`` of a one-shot task, ``status.nextRunAt``
    of a cron task (None while the controller has not computed it)."""
    if task.spec.get("execAt"):
        return cache.parse_time(task.spec["execAt"])
    return cache.parse_time(task.status.get("nextRunAt"))


_WAITING = frozenset({states.TaskState.SCHEDULED, states.TaskState.SUSPENDED})


def select_scheduled(
    tasks: cache.TaskCache,
    namespace: str,
    path: Path,
    *,
    now: datetime.datetime,
    limit: int,
) -> list[cache.TaskEntry]:
    """The ScheduledTasks that have not fired: waiting (Scheduled or Suspended) with a
    next run still ahead of ``now``, and an id; filtered by TASK_ID, OBJECT and NAME."""
    found: list[cache.TaskEntry] = []
    for task in tasks.select(namespace, {}):
        run = next_run(task)
        if task.id is None or task.state not in _WAITING or run is None or run <= now:
            continue
        ref = _template(task).get("object") or {}
        if (
            (path.task_id is None or task.id == path.task_id)
            and (path.object_kind is None or ref.get("kind") == path.object_kind)
            and (path.name is None or ref.get("name") == path.name)
        ):
            found.append(task)
    found.sort(key=lambda t: t.id or 0)
    return found[-limit:]


def _template(task: cache.TaskEntry) -> Mapping[str, Any]:
    spec: Mapping[str, Any] = (task.spec.get("template") or {}).get("spec") or {}
    return spec


# --- writing XML --------------------------------------------------------------------------


def _text(value: object) -> str:
    return saxutils.escape(xmlrpc.printable(str(value)))


def _element(tag: str, value: object) -> str:
    return f"<{tag}>{_text(value)}</{tag}>"


def _time(value: datetime.datetime, fmt: str = DATE) -> str:
    return value.astimezone(datetime.UTC).strftime(fmt)


_DERIVED = "bdom-status"


def status_fields(entry: cache.OperationEntry) -> str:
    """A status ``<response>``'s elements up to ``task_id`` (``user_id`` is the caller's),
    kept on the entry: it changes only with a new version, which is a new entry."""
    kept: str | None = entry.derived.get(_DERIVED)
    if kept is None:
        kept = "".join(
            (
                _element("date", _time(entry.date_created)),
                _element("name", entry.object_name or ""),
                _element("object", entry.object_kind or ""),
                _element("opcode", opcode_of(entry.type, entry.object_kind)),
                _element("status", states.legacy(entry.state, DIALECT)),
                _element("task_id", entry.id),
            )
        )
        entry.derived[_DERIVED] = kept
    return kept


def user_tail(user_id: str) -> str:
    """The end of every status ``<response>`` to one caller (built once per request)."""
    return _element("user_id", user_id) + "</response>"


def status_response(entry: cache.OperationEntry, *, tail: str) -> str:
    return "<response>" + status_fields(entry) + tail


def _tld_id(template: Mapping[str, Any]) -> int | None:
    raw = (template.get("params") or {}).get(TLD_PARAM)
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) <= _DIGITS_MAX:
        return int(raw)
    return None


def scheduled_response(task: cache.TaskEntry) -> str:
    template = _template(task)
    ref = template.get("object") or {}
    labels = task.metadata.get("labels") or {}
    run = next_run(task)
    tld = _tld_id(template)
    parts = [
        _element("class", labels.get(LABEL_CLASS) or DEFAULT_CLASS),
        _element("exec-date", _time(run, DAY) if run else ""),
        _element("name", ref.get("name") or ""),
        _element("object", ref.get("kind") or ""),
        _element("opcode", opcode_of(task.type, ref.get("kind"))),
        _element("task_id", task.id),
        _element("time", _time(task.date_created)),
        *([_element("tld_id", tld)] if tld is not None else []),
        _element("type", labels.get(LABEL_TYPE) or DEFAULT_TYPE),
    ]
    return f"<response>{''.join(parts)}</response>"


def document(responses: Sequence[str]) -> bytes:
    """One match: its ``<response>``; none or several: a ``<multiresponse>`` of them."""
    if len(responses) == 1:
        return (responses[0] + "\n").encode("utf-8")
    return ("<multiresponse>" + "".join(responses) + "</multiresponse>\n").encode("utf-8")


def error_document(fault: faults.Fault) -> bytes:
    return (
        "<error>"
        + _element("code", fault.code)
        + _element("name", fault.name)
        + _element("message", fault.message)
        + "</error>\n"
    ).encode("utf-8")


DELETED = b"<response>delete ok</response>\n"


def error_message(body: bytes) -> str:
    """The message of an error document this module wrote (for the call log)."""
    start, end = body.find(b"<message>"), body.rfind(b"</message>")
    text = body[start + len(b"<message>") : end] if 0 <= start < end else b""
    return saxutils.unescape(text.decode("utf-8", "replace"))


# --- bodies ---------------------------------------------------------------------------------

TASK_XSD = """<?xml version="1.0" encoding="UTF-8"?>
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" elementFormDefault="unqualified">
  <xs:element name="request">
    <xs:complexType>
      <xs:all>
        <xs:element name="delete" minOccurs="0" maxOccurs="1">
          <xs:complexType>
            <xs:sequence>
              <xs:element name="task_id" type="xs:int" maxOccurs="unbounded"/>
            </xs:sequence>
          </xs:complexType>
        </xs:element>
      </xs:all>
    </xs:complexType>
  </xs:element>
</xs:schema>
"""
"""BDOM's Task.xsd (the seed's Example 6.1): what a delete body must satisfy."""

CREATE_XSD = """<?xml version="1.0" encoding="UTF-8"?>
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" elementFormDefault="unqualified">
  <xs:simpleType name="word">
    <xs:restriction base="xs:string">
      <xs:pattern value="[a-z0-9]([a-z0-9_.\\-]{0,61}[a-z0-9])?"/>
    </xs:restriction>
  </xs:simpleType>
  <xs:simpleType name="labelValue">
    <xs:restriction base="xs:string">
      <xs:pattern value="[A-Za-z0-9]([A-Za-z0-9_.\\-]{0,61}[A-Za-z0-9])?"/>
    </xs:restriction>
  </xs:simpleType>
  <xs:simpleType name="execDate">
    <xs:restriction base="xs:string">
      <xs:pattern value="[0-9]{4}-[0-9]{2}-[0-9]{2}( [0-9]{2}:[0-9]{2}:[0-9]{2})?"/>
    </xs:restriction>
  </xs:simpleType>
  <xs:element name="request">
    <xs:complexType>
      <xs:all>
        <xs:element name="create" minOccurs="1" maxOccurs="1">
          <xs:complexType>
            <xs:all>
              <xs:element name="opcode" type="word"/>
              <xs:element name="object" type="word"/>
              <xs:element name="name">
                <xs:simpleType>
                  <xs:restriction base="xs:string">
                    <xs:minLength value="1"/>
                    <xs:maxLength value="253"/>
                  </xs:restriction>
                </xs:simpleType>
              </xs:element>
              <xs:element name="exec-date" type="execDate" minOccurs="0"/>
              <xs:element name="tld_id" type="xs:int" minOccurs="0"/>
              <xs:element name="class" type="labelValue" minOccurs="0"/>
              <xs:element name="type" type="labelValue" minOccurs="0"/>
              <xs:element name="params" minOccurs="0">
                <xs:complexType>
                  <xs:sequence>
                    <xs:element name="param" minOccurs="0" maxOccurs="64">
                      <xs:complexType>
                        <xs:simpleContent>
                          <xs:extension base="xs:string">
                            <xs:attribute name="name" type="word" use="required"/>
                          </xs:extension>
                        </xs:simpleContent>
                      </xs:complexType>
                    </xs:element>
                  </xs:sequence>
                </xs:complexType>
              </xs:element>
            </xs:all>
          </xs:complexType>
        </xs:element>
      </xs:all>
    </xs:complexType>
  </xs:element>
</xs:schema>
"""
"""TaskCreate.xsd, ours, in Task.xsd's style: what a create body must satisfy."""

_TASK_SCHEMA = xmlschema.XMLSchema10(TASK_XSD)
_CREATE_SCHEMA = xmlschema.XMLSchema10(CREATE_XSD)


class _Bounded(ET.TreeBuilder):
    """A tree builder that stops at the depth and element limits, so no body builds
    more than a bounded tree (the parser calls it element by element)."""

    def __init__(self, limits: Limits) -> None:
        super().__init__()
        self._limits = limits
        self._depth = 0
        self._count = 0

    def start(self, tag: str, attrs: dict[str, str]) -> ET.Element:
        self._depth += 1
        self._count += 1
        if self._depth > self._limits.max_depth:
            raise xmlrpc.LimitExceeded(f"elements nested deeper than {self._limits.max_depth}")
        if self._count > self._limits.max_elements:
            raise xmlrpc.LimitExceeded(f"more than {self._limits.max_elements} XML elements")
        if len(attrs) > self._limits.max_attributes:
            raise xmlrpc.LimitExceeded(
                f"more than {self._limits.max_attributes} attributes on one element"
            )
        longest = max((len(tag), *map(len, attrs)))
        if longest > self._limits.max_name_chars:
            raise xmlrpc.LimitExceeded(
                f"an element or attribute name is longer than {self._limits.max_name_chars}"
            )
        return super().start(tag, attrs)

    def end(self, tag: str) -> ET.Element:
        self._depth -= 1
        return super().end(tag)


def parse_xml(body: bytes, *, limits: Limits = DEFAULT_LIMITS) -> ET.Element:
    """A body as an element tree, safely: the size checked first, DTDs, entities and
    external references refused (defusedxml), depth and element count bounded."""
    if len(body) > limits.max_body_bytes:
        raise xmlrpc.BodyTooLarge(f"request body larger than {limits.max_body_bytes} bytes")
    if not body.strip():
        raise xmlrpc.MalformedXml("the request has no body; send the XML document")
    parser = defusedxml.ElementTree.DefusedXMLParser(
        target=_Bounded(limits), forbid_dtd=True, forbid_entities=True, forbid_external=True
    )
    try:
        parser.feed(body)
        root: ET.Element = parser.close()
    except defusedxml.DefusedXmlException as exc:
        raise xmlrpc.ForbiddenXml(
            f"DTDs, entity declarations and external references are refused ({type(exc).__name__})"
        ) from None
    except ET.ParseError as exc:
        raise xmlrpc.MalformedXml(f"not well-formed XML: {exc}") from None
    except (LookupError, UnicodeError) as exc:  # an encoding the declaration names wrongly
        raise xmlrpc.MalformedXml(f"cannot decode the XML: {names.shown(str(exc))}") from None
    return root


def _validate(schema: xmlschema.XMLSchema10, root: ET.Element, *, what: str) -> None:
    for error in schema.iter_errors(root):
        reason = error.reason or "invalid"
        where = error.path or "/"
        raise InvalidBody(f"the body is not a valid {what}: {where}: {reason}"[:400])


def delete_ids(body: bytes, *, limits: Limits = DEFAULT_LIMITS) -> list[cache.OpId]:
    """The task ids of a delete body (Task.xsd), in order, each checked as an id."""
    root = parse_xml(body, limits=limits)
    _validate(_TASK_SCHEMA, root, what="Task.xsd request")
    found = root.findall("./delete/task_id")
    if not found:
        raise InvalidBody("the request has no <delete> with <task_id> elements")
    if len(found) > limits.max_ids:
        raise InvalidBody(f"at most {limits.max_ids} task ids per delete, got {len(found)}")
    return [_task_id_value((e.text or "").strip()) for e in found]


def _task_id_value(text: str) -> cache.OpId:
    # xs:int has been checked; an id is also at least 1.
    return cache.OpId(names.int_id(int(text), what="task_id"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Create:
    """A create body (:data:`CREATE_XSD`), checked."""

    opcode: str
    object_kind: str
    name: str
    exec_at: datetime.datetime | None
    params: Mapping[str, Any]
    labels: Mapping[str, str]

    @property
    def type(self) -> str:
        return type_of(opcode=self.opcode, kind=self.object_kind)


def parse_exec_date(text: str) -> datetime.datetime:
    """``YYYY-MM-DD`` (midnight UTC) or ``YYYY-MM-DD HH:MM:SS`` (UTC)."""
    fmt = DATE if " " in text else DAY
    try:
        return datetime.datetime.strptime(text, fmt).replace(tzinfo=datetime.UTC)
    except ValueError:
        raise InvalidBody(f"exec-date {names.shown(text)} is not a date") from None


def create_request(body: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Create:
    root = parse_xml(body, limits=limits)
    _validate(_CREATE_SCHEMA, root, what="TaskCreate.xsd request")
    create = root.find("create")
    assert create is not None  # the schema requires it

    def text(tag: str) -> str | None:
        # As sent: the schema's patterns refuse surrounding whitespace where it matters,
        # and a name is never trimmed into a different name.
        found = create.find(tag)
        return None if found is None else (found.text or "")

    params: dict[str, Any] = {}
    for param in create.findall("./params/param"):
        key = param.get("name", "")
        if key in params:
            raise InvalidBody(f"param {names.shown(key)} is given twice")
        params[key] = param.text or ""
    tld = text("tld_id")
    if tld is not None:
        params[TLD_PARAM] = int(tld)  # xs:int, checked
    exec_date = text("exec-date")
    labels = {
        label: value
        for label, value in ((LABEL_CLASS, text("class")), (LABEL_TYPE, text("type")))
        if value is not None
    }
    if labels and exec_date is None:
        raise InvalidBody("class and type describe scheduled tasks: they need an exec-date")
    name = text("name") or ""
    return Create(
        opcode=text("opcode") or "",
        object_kind=text("object") or "",
        name=names.object_name(name, what="name"),
        exec_at=None if exec_date is None else parse_exec_date(exec_date),
        params=params,
        labels=labels,
    )


# --- the endpoint ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Request:
    """What the HTTP layer hands over."""

    method: str
    raw_path: str
    authorization: str | None
    body: bytes | Exception
    """The body read within the limits, or why it could not be (too large, too slow)."""
    now: datetime.datetime
    address: str = ""
    """The peer's IP address (for the call log)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Reply:
    status: int
    body: bytes
    opcode: str
    """For metrics: a known opcode or ``unknown`` (labels stay bounded)."""
    outcome: str
    """``ok`` or the fault's name."""
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(kw_only=True)
class _Logged:
    """What one call's call log entry says: its arguments and its result, small."""

    args: dict[str, Any]
    result: Any = None


class Endpoint:
    """Serves ``/bdom/task/...`` over the service.

    Every authenticated call goes into the tenant's call log (gocept's ``log``
    shows it), as ``bdom.<opcode>`` with the path, the delete's ids or the
    create's fields (secret-looking params redacted) and a short result: the
    task ids answered, ``delete ok``, or the error."""

    def __init__(
        self,
        *,
        svc: service.Service,
        keyring: auth.KeyRing,
        limits: Limits = DEFAULT_LIMITS,
        on_log_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self.svc = svc
        self.keyring = keyring
        self.limits = limits
        self.on_log_failure = on_log_failure

    async def handle(self, request: Request) -> Reply:
        opcode = "unknown"
        who: auth.Identity | None = None
        logged = _Logged(args={"path": request.raw_path.partition("?")[0][:1024]})
        try:
            path = parse_path(request.raw_path, limits=self.limits)
            opcode = path.opcode
            who = identity(authorization=request.authorization, keyring=self.keyring, path=path)
            if path.opcode != "status":
                only_user(path)
            allowed = OPCODES[path.opcode]
            if request.method != allowed:
                raise MethodNotAllowed(
                    f"{path.opcode} is served on {allowed}, not {names.shown(request.method)}",
                    allow=allowed,
                )
            body = await self._run(path, who, request, logged)
        except Exception as exc:
            reply = self._error(exc, opcode=opcode)
            if who is not None:
                message = error_message(reply.body)
                await self._log(
                    who, opcode, request, logged, exception=f"{reply.status}: {message}"
                )
            return reply
        await self._log(who, opcode, request, logged, exception="")
        return Reply(status=200, body=body, opcode=opcode, outcome="ok")

    async def _run(
        self, path: Path, who: auth.Identity, request: Request, logged: _Logged
    ) -> bytes:
        if path.opcode == "status":
            found = select_operations(
                self.svc.operations, who.tenant, path, limit=self.svc.settings.list_limit
            )
            logged.result = [e.id for e in found]
            tail = user_tail(who.user_id)
            return document([status_response(e, tail=tail) for e in found])
        if path.opcode == "scheduled":
            tasks = select_scheduled(
                self.svc.tasks,
                who.tenant,
                path,
                now=request.now,
                limit=self.svc.settings.list_limit,
            )
            logged.result = [t.id for t in tasks]
            return document([scheduled_response(t) for t in tasks])
        if isinstance(request.body, Exception):
            raise request.body
        if path.opcode == "delete":
            ids_ = delete_ids(request.body, limits=self.limits)
            logged.args["task_id"] = ids_
            await self.svc.delete_tasks(who=who, ids_=ids_)
            logged.result = "delete ok"
            return DELETED
        create = create_request(request.body, limits=self.limits)
        logged.args["create"] = {
            "opcode": create.opcode,
            "object": create.object_kind,
            "name": create.name,
            "exec-date": create.exec_at.isoformat() if create.exec_at else None,
            "params": dict(create.params),
            "labels": dict(create.labels),
        }
        return await self._create(who, create, logged)

    async def _create(self, who: auth.Identity, create: Create, logged: _Logged) -> bytes:
        object_ = {"kind": create.object_kind, "name": create.name}
        if create.exec_at is None:
            id_ = await self.svc.create(
                who=who, type_=create.type, params=create.params, object_=object_
            )
            logged.result = id_
            entry = self.svc.operations.get_id(who.tenant, id_)
            if entry is None:  # past the visibility bound: answer with what was written
                return document([f"<response>{_element('task_id', id_)}</response>"])
            return document([status_response(entry, tail=user_tail(who.user_id))])
        id_ = await self.svc.schedule(
            who=who,
            type_=create.type,
            params=create.params,
            object_=object_,
            exec_at=create.exec_at,
            labels=create.labels,
        )
        logged.result = id_
        task = self.svc.tasks.get_id(who.tenant, id_)
        if task is None:
            return document([f"<response>{_element('task_id', id_)}</response>"])
        return document([scheduled_response(task)])

    async def _log(
        self,
        who: auth.Identity,
        opcode: str,
        request: Request,
        logged: _Logged,
        *,
        exception: str,
    ) -> None:
        """A store failure never changes the answer: the call happened (as in rpc.py)."""
        await self.svc.call_log.record(
            on_failure=self.on_log_failure,
            tenant=who.tenant,
            method=f"bdom.{opcode}",
            args_json=rpc.to_json({"args": [calllog.redact(logged.args)], "kw": {}}),
            result_json="null" if exception else rpc.to_json(logged.result),
            exception=exception,
            address=request.address,
            when=request.now,
            user=who.user_id,
        )

    def _error(self, exc: Exception, *, opcode: str) -> Reply:
        fault = FAULTS.fault_for(exc)
        headers: dict[str, str] = {}
        if fault.code == 401:
            headers["WWW-Authenticate"] = REALM
        if isinstance(exc, MethodNotAllowed):
            headers["Allow"] = exc.allow
        if isinstance(exc, errors.RateLimited):
            headers["Retry-After"] = str(math.ceil(exc.retry_after))
        return Reply(
            status=fault.code,
            body=error_document(fault),
            opcode=opcode,
            outcome=fault.name,
            headers=headers,
        )
