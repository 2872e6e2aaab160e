"""The hostile-input suite's library: what every gateway dialect must withstand, and the
one adapter per dialect that tells the suite how to speak that dialect.

``tests/test_hostile.py`` runs the same tests for every class in its
``ADAPTERS`` list: hostile names and ids through every method that takes
one, a cross-tenant matrix over every method, free-form values of every
type, worst-case bodies under a CPU budget, oversized and slow bodies, and a
property-based fuzz of the decoder (in-process and over HTTP). A dialect
added later (XenAPI at ``/xenapi``, CloudStack at ``/client/api``, BDOM REST
at ``/bdom/task/...``) plugs in with one :class:`DialectAdapter` subclass
added to ``ADAPTERS``; nothing in the tests knows a dialect.

What an adapter provides, and why the suite needs it:

* :meth:`DialectAdapter.client`: a logged-in client for a tenant (a Gandi
  session, Basic auth for gocept, a XenAPI session, a CloudStack key pair).
* :meth:`DialectAdapter.probes`: every method that takes a name or an id,
  and how to call it with one hostile value in that place.
* :meth:`DialectAdapter.matrix`: every method, reading and writing, aimed
  at the other tenant's ids and names, with what a correct answer is.
* :meth:`DialectAdapter.store_probes`: every place that stores free-form
  data, written with a value of each standard type and read back.
* :meth:`DialectAdapter.raw_request` and :meth:`DialectAdapter.classify`:
  how to post a body no client library would send, and how to tell a
  well-formed answer from a well-formed protocol error (and its class) from
  a broken reply (a 5xx, a dropped connection, a reply the protocol's own
  clients could not parse).
* :meth:`DialectAdapter.worst_case_bodies`, :meth:`DialectAdapter.body`,
  :meth:`DialectAdapter.check_decoder` and :meth:`DialectAdapter.fuzz_bodies`:
  the dialect's bodies for the cost, size and fuzz tests.

Answers are compared by class (:data:`ErrorClass`), never by a dialect's
code, so the assertions read the same for a faultCode, a XenAPI
ErrorDescription or a CloudStack errorcode.
"""

from __future__ import annotations

import abc
import base64
import dataclasses
import datetime
import http.client
import re
import select
import socket
import sqlite3
import ssl
import urllib.parse
import uuid
import xml.etree.ElementTree as ET
import xml.parsers.expat
import xmlrpc.client
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Generic, Literal, TypeVar, cast

import kubernetes
from hypothesis import strategies as st

from opkeeper import GROUP, VERSION
from opkeeper.gateway import faults, xenfaults
from opkeeper.gateway import xmlrpc as codec
from opkeeper.gateway.dialects import bdom, xenapi
from tests.gateway_support import RunningGateway, make_key, other_namespace
from tests.helpers import wait_for

# --- answers ------------------------------------------------------------------------

ErrorClass = Literal[
    "bad_argument",  # the request or a value in it is wrong: malformed, wrong type, bad name
    "not_found",
    "unauthenticated",
    "forbidden",
    "too_large",  # the body is over the size limit
    "limit",  # the body is refused for its shape: too deep, too many elements, a DTD
    "unknown_method",
    "state",  # a conflict, or a transition the state machine refuses
    "server",  # the server's fault: internal error, unrepresentable answer, unavailable
]
"""What kind of error an answer is, whatever the dialect's own code for it."""
CLIENT_ERRORS: frozenset[str] = frozenset(
    {
        "bad_argument",
        "not_found",
        "unauthenticated",
        "forbidden",
        "too_large",
        "limit",
        "unknown_method",
        "state",
    }
)
"""Every class that blames the request, not the server."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Answer:
    """One reply, classified: a well-formed answer, a well-formed protocol error, or broken."""

    outcome: Literal["ok", "error", "broken"]
    value: Any = None
    """The decoded result of an ``ok`` answer."""
    error: ErrorClass | None = None
    code: str = ""
    """The dialect's own code (faultCode, ErrorDescription[0], errorcode, HTTP status)."""
    text: str = ""
    """The error's text, or what was broken."""

    @property
    def client_error(self) -> bool:
        return self.outcome == "error" and self.error in CLIENT_ERRORS

    @property
    def empty(self) -> bool:
        """An ``ok`` answer that carries nothing (a search that matched nothing)."""
        return self.outcome == "ok" and self.value in ([], {}, (), "")

    def describe(self) -> str:
        if self.outcome == "ok":
            return f"ok {_short(self.value)}"
        return f"{self.outcome} {self.error or ''} [{self.code}] {_short(self.text)}"


def _short(value: object, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...(cut)"


# --- the hostile table -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hostile:
    label: str
    value: object


def hostile_values(*, victim_namespace: str, victim_id: int, own_id: int) -> list[Hostile]:
    """Every hostile name and id, sent through every parameter that takes a name or an id
    (a name where an id is expected is hostile too, and the other way round).

    ``own_id`` is the id of the caller's ``shared-1``: as a double or a boolean it equals
    the id in Python (``11.0 == 11``, ``True == 1``) but is not an id on the wire."""
    names: list[tuple[str, str]] = [
        ("dot", "."),
        ("dotdot", ".."),
        ("dotdot-x", "../x"),
        ("traversal-to-victim", f"../../{victim_namespace}/operations/victim"),
        ("traversal-to-victim-status", f"../../{victim_namespace}/operations/victim/status"),
        (
            "encoded-traversal",
            f"..%2F..%2F{victim_namespace}%2Foperations%2Fvictim",
        ),
        ("dot-encoded", "%2e%2e"),
        ("slash", "a/b"),
        ("encoded-slash", "%2F"),
        ("encoded-slash-inside", "a%2Fb"),
        ("backslash", "\\"),
        ("backslash-inside", "a\\b"),
        ("question-mark", "?"),
        ("query", "x?watch=true"),
        ("query-dry-run", "victim?dryRun=All"),
        ("hash", "#"),
        ("fragment", "x#y"),
        ("300-chars", "a" * 300),
        ("empty", ""),
        ("space", "op 1"),
        ("cyrillic-lookalike", "\u043e\u0440-1"),  # "op-1" with Cyrillic o and er
        ("fullwidth", "\uff4f\uff50"),  # "op" in fullwidth letters
        ("zero-width-space", "op\u200b1"),
        ("uppercase", "OP-1"),
        ("leading-dash", "-op"),
        ("trailing-dash", "op-"),
        ("label-selector", "a,b=c"),
        ("wildcard", "*"),
        ("percent-nul", "%00"),
        # Characters XML 1.0 cannot carry reach an XML dialect as a malformed body (the
        # client library sends them raw); other dialects get them as they are.
        ("nul", "\x00"),
        ("nul-inside", "op\x00victim"),
        ("escape", "\x1b[2J"),
        ("tab", "op\t1"),
        ("newline", "op-1\n"),
        ("header-injection", "x\r\nX-Injected: 1"),
        ("del", "\x7f"),
    ]
    ids: list[tuple[str, object]] = [
        ("id-0", 0),
        ("id-minus-1", -1),
        ("id-min-int32", -(2**31)),
        ("id-max-int32-not-found", 2**31 - 1),
        ("id-of-the-victim", victim_id),
        ("id-as-string", "123"),
        ("victim-id-as-string", str(victim_id)),
        ("id-true", True),
        ("id-false", False),
        ("id-double", 1.5),
        ("own-id-as-double", float(own_id)),
        ("own-id-as-string", str(own_id)),
    ]
    return [Hostile(label=k, value=v) for k, v in [*names, *ids]]


def free_form_values() -> list[Hostile]:
    """Every standard XML-RPC type, at its edges, for the places that store free-form data
    (params, object references): each is refused as the client's fault, or stored and then
    read back without a server-side error."""
    nested: object = "leaf"
    for _ in range(28):  # with the call's own nesting, just within the depth limit
        nested = {"n": nested}
    return [
        Hostile(label=k, value=v)
        for k, v in [
            ("base64-with-nul", xmlrpc.client.Binary(b"\x00\x01")),
            ("base64-utf8-text", xmlrpc.client.Binary(b"hello")),
            ("base64-not-utf8", xmlrpc.client.Binary(b"\xff\xfe")),
            ("base64-empty", xmlrpc.client.Binary(b"")),
            ("datetime", xmlrpc.client.DateTime(datetime.datetime(2020, 1, 1))),
            ("datetime-year-1", xmlrpc.client.DateTime(datetime.datetime(1, 1, 1))),
            ("double", 1.5),
            ("double-huge", 1e308),
            ("double-negative-zero", -0.0),
            ("int-max", 2**31 - 1),
            ("int-min", -(2**31)),
            ("boolean", True),
            ("empty-string", ""),
            ("empty-member-name", {"": 1}),
            ("empty-array", []),
            ("mixed-array", [1, "a", {}, [], False]),
            ("nested-28-deep", nested),
            ("replacement-character", "\ufffd"),
            ("carriage-return", "a\rb"),
            ("astral-character", "\U0001f600"),
            ("string-64KiB", "x" * 65536),
        ]
    ]


# Independent of opkeeper.names on purpose: which values are legitimate for a parameter
# (and so not sent as hostile) must not be decided by the code under test.
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_OPERATION_TYPE = re.compile(r"[A-Za-z0-9_.:-]+")


def valid_name(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 253 and bool(_DNS_SUBDOMAIN.fullmatch(value))


def valid_label_value(value: object) -> bool:
    return value == "" or (
        isinstance(value, str) and len(value) <= 63 and bool(_LABEL_VALUE.fullmatch(value))
    )


def valid_label_key(value: object) -> bool:
    if not isinstance(value, str):
        return False
    prefix, slash, name = value.rpartition("/")
    return (not slash or valid_name(prefix)) and name != "" and valid_label_value(name)


def valid_operation_type(value: object) -> bool:
    """The Operation model's rule for ``spec.type``: a type is a token, not a name, so
    ``..`` or ``OP-1`` are fine types (they never reach a path)."""
    return isinstance(value, str) and len(value) <= 128 and bool(_OPERATION_TYPE.fullmatch(value))


def not_a_string(value: object) -> bool:
    """Struct member names can only be strings on the wire."""
    return not isinstance(value, str)


def never(value: object) -> bool:
    return False


# --- the two tenants ---------------------------------------------------------------------

OPERATION_STATES: Mapping[str, str | None] = {
    "shared-1": None,  # Pending: no status yet
    "shared-wait": "WaitingExternal",
    "shared-done": "Succeeded",
    "shared-failed": "FailedExternal",
}
"""Operations both tenants have, under the same names (look-alike data)."""
VICTIM_ONLY_STATES: Mapping[str, str | None] = {
    "victim": "WaitingExternal",
    "only-b-wait": "WaitingExternal",
    "only-b-failed": "FailedExternal",
    "only-b-done": "Succeeded",
}
"""Operations only the victim has (names the attacker can try to create or delete)."""
DOOMED = "shared-doomed"
"""An operation both tenants have, which the matrix deletes from the attacker's side."""
SHARED_TASKS = ("nightly", "doomed-task")
VICTIM_ONLY_TASKS = ("only-b-task",)
OBJECT = {"kind": "domain", "name": "example.org"}
"""The same object on both sides, so a query by object must still keep them apart."""
OPERATION_TYPE = "domain_transfer"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tenant:
    namespace: str
    key: str
    marker: str
    """A unique string in the params, status and results of every object of this tenant:
    found in another tenant's answer, it is a leak."""
    ids: Mapping[str, int]
    """Operation name -> id."""
    tasks: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.ids)


@dataclasses.dataclass(frozen=True, kw_only=True)
class World:
    """Two tenants with look-alike data, behind one running gateway."""

    api: kubernetes.client.ApiClient
    gateway: RunningGateway
    attacker: Tenant
    victim: Tenant
    """Holds ``victim``, the object the traversal names aim at."""

    @property
    def namespaces(self) -> tuple[str, str]:
        return self.attacker.namespace, self.victim.namespace


def build_world(api: kubernetes.client.ApiClient, gw: RunningGateway) -> World:
    """Create both tenants: keys, operations in every interesting state, tasks.

    Objects are created through the gateway's gocept ``apply`` (so they carry
    sealed ids from the shared allocator, as a tenant's would) and their states
    set through the status subresource, as a worker would; no controller runs.
    """
    shared = {**OPERATION_STATES, DOOMED: "Succeeded"}
    attacker = build_tenant(api, gw, prefix="hostile-a", operations=shared, tasks=SHARED_TASKS)
    victim = build_tenant(
        api,
        gw,
        prefix="hostile-b",
        operations={**shared, **VICTIM_ONLY_STATES},
        tasks=(*SHARED_TASKS, *VICTIM_ONLY_TASKS),
    )
    return World(api=api, gateway=gw, attacker=attacker, victim=victim)


def build_tenant(
    api: kubernetes.client.ApiClient,
    gw: RunningGateway,
    *,
    prefix: str,
    operations: Mapping[str, str | None],
    tasks: tuple[str, ...],
) -> Tenant:
    """A namespace, a key, and the named operations (in the given states) and tasks."""
    namespace = other_namespace(api, prefix=prefix)
    key = make_key(api, gw, namespace)
    marker = f"marker-{uuid.uuid4().hex}"
    records: list[dict[str, Any]] = [
        {
            "__type__": "operation",
            "name": name,
            "type": OPERATION_TYPE,
            "params": {"marker": marker, "auth_code": f"secret-{marker}"},
            "object": OBJECT,
        }
        for name in operations
    ]
    records += [
        {
            "__type__": "scheduledtask",
            "name": name,
            "schedule": "0 3 * * *",
            "suspend": True,
            "template": {"type": OPERATION_TYPE, "params": {"marker": marker}},
        }
        for name in tasks
    ]
    created = cast(list[dict[str, Any]], gw.gocept(key).apply(records))
    ids = {r["name"]: int(r["id"]) for r in created if r["__type__"] == "operation"}
    custom = kubernetes.client.CustomObjectsApi(api)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for name, state in operations.items():
        if state is None:
            continue
        status: dict[str, Any] = {"state": state, "message": f"{state} {marker}", "updatedAt": now}
        if state == "Succeeded":
            status |= {"progress": 100, "finishedAt": now, "result": {"type": "t", "value": marker}}
        elif state == "FailedExternal":
            status |= {"finishedAt": now, "errorCode": 7, "errorInfo": [marker]}
        custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, "operations", name, {"status": status}
        )

    def cached() -> bool:
        for name, state in operations.items():
            entry = gw.gateway.operations.get(namespace, name)
            if entry is None or entry.state.value != (state or "Pending"):
                return False
        return all(gw.gateway.tasks.get(namespace, name) is not None for name in tasks)

    wait_for(cached, what=f"{namespace}'s objects in the gateway's cache")
    return Tenant(namespace=namespace, key=key, marker=marker, ids=ids, tasks=tasks)


def snapshot(api: kubernetes.client.ApiClient, namespace: str) -> dict[tuple[str, str], str]:
    """Every Operation and ScheduledTask of a namespace with its resourceVersion."""
    custom = kubernetes.client.CustomObjectsApi(api)
    out: dict[tuple[str, str], str] = {}
    for plural in ("operations", "scheduledtasks"):
        listed: Any = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)
        for item in listed["items"]:
            out[(plural, item["metadata"]["name"])] = item["metadata"]["resourceVersion"]
    return out


def object_counts(api: kubernetes.client.ApiClient) -> dict[str, int]:
    """Operations and ScheduledTasks in the whole cluster (nothing may appear anywhere)."""
    custom = kubernetes.client.CustomObjectsApi(api)
    counts: dict[str, int] = {}
    for plural in ("operations", "scheduledtasks"):
        listed: Any = custom.list_cluster_custom_object(GROUP, VERSION, plural)
        counts[plural] = len(listed["items"])
    return counts


def call_log_count(gw: RunningGateway, tenant: str) -> int:
    """Entries in a tenant's call log, read from the store itself (read-only), so the
    check does not depend on any dialect's ``log`` method."""
    path = gw.settings.call_log_path
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        (count,) = db.execute("SELECT count(*) FROM calls WHERE tenant = ?", (tenant,)).fetchone()
    return int(count)


# --- probes and the matrix -------------------------------------------------------------

C = TypeVar("C")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Case:
    """Something the suite does with one method, named for test ids and messages."""

    method: str
    what: str
    """Which argument or which use of the method."""

    @property
    def label(self) -> str:
        return f"{self.method}-{self.what}".replace(" ", "-")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Probe(_Case, Generic[C]):
    """One method's name or id parameter, and how to put a hostile value there."""

    run: Callable[[C, object], Answer]
    search: bool = False
    """A search: an empty answer is as correct as a not-found error."""
    skip: Callable[[object], bool] = never
    """Values that are legitimate here (an ``OP-1`` operation type) or that the wire
    cannot carry in this place (a non-string struct key); they are not sent."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class MatrixCase(_Case, Generic[C]):
    """One method called by the attacker against the victim's ids or names."""

    writes: bool
    run: Callable[[C, World], list[Answer]]
    expect: Callable[[list[Answer], World], list[str]]
    """Problems with the answers beyond the generic checks (the victim's marker and ids
    absent, the victim's objects and call log unchanged, nothing broken)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class StoreProbe(_Case, Generic[C]):
    """One place that stores free-form data: write a value there, then read it back."""

    run: Callable[[C, Tenant, object], list[Answer]]
    """The answers of the write and (if it was accepted) of the read."""


STORE_TENANT_OPERATIONS: Mapping[str, str | None] = {"relaunchable": "FailedExternal"}
"""What the free-form tenant starts with: an operation a relaunch may target."""


def expect_errors(*classes: str) -> Callable[[list[Answer], World], list[str]]:
    def check(answers: list[Answer], world: World) -> list[str]:
        return [
            f"answer {i}: expected an error of class {'/'.join(classes)}, got {a.describe()}"
            for i, a in enumerate(answers)
            if not (a.outcome == "error" and a.error in classes)
        ]

    return check


def expect_ok_or_errors(*classes: str) -> Callable[[list[Answer], World], list[str]]:
    def check(answers: list[Answer], world: World) -> list[str]:
        return [
            f"answer {i}: expected ok or an error of class {'/'.join(classes)}, got {a.describe()}"
            for i, a in enumerate(answers)
            if not (a.outcome == "ok" or (a.outcome == "error" and a.error in classes))
        ]

    return check


def expect_empty(answers: list[Answer], world: World) -> list[str]:
    return [
        f"answer {i}: expected an empty answer, got {a.describe()}"
        for i, a in enumerate(answers)
        if not a.empty
    ]


# --- raw HTTP ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class RawRequest:
    method: str = "POST"
    path: str
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    body: bytes = b""

    def head(self, port: int, *, content_length: int | None = None, chunked: bool = False) -> bytes:
        """Request line and headers; ``content_length`` overrides the body's length."""
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        if chunked:
            lines.append("Transfer-Encoding: chunked")
        else:
            length = len(self.body) if content_length is None else content_length
            lines.append(f"Content-Length: {length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RawReply:
    status: int = 0
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Lower-cased names."""
    body: bytes = b""
    error: str | None = None
    """What went wrong on the connection (dropped, reset, timed out); None if a reply came."""


def connect(port: int, *, timeout: float = 30.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_reply(sock: socket.socket) -> RawReply:
    response = http.client.HTTPResponse(sock)
    try:
        response.begin()
        body = response.read()
    except (http.client.HTTPException, OSError) as exc:
        return RawReply(error=repr(exc))
    headers = {k.lower(): v for k, v in response.getheaders()}
    return RawReply(status=response.status, headers=headers, body=body)


def exchange(
    port: int,
    request: RawRequest,
    *,
    timeout: float = 30.0,
    opener: Callable[[float], socket.socket] | None = None,
) -> RawReply:
    """Send one request on a fresh connection (``opener(timeout)``'s, by default a plain
    one to ``port``) and read the reply, whatever it is."""
    with (opener or (lambda t: connect(port, timeout=t)))(timeout) as sock:
        try:
            sock.sendall(request.head(port))
            body = memoryview(request.body)
            for start in range(0, len(body), 64 * 1024):
                # A server that refuses early (an oversized body) answers and closes
                # without reading the rest; stop sending then, or the unread bytes make
                # its kernel reset the connection before the answer is read.
                if readable(sock, 0):
                    break
                sock.sendall(body[start : start + 64 * 1024])
        except OSError:
            pass  # closed while sending: the reply (or its absence) tells the rest
        return read_reply(sock)


def readable(sock: socket.socket, within: float) -> bool:
    """Whether the peer has sent something (or closed) within ``within`` seconds."""
    ready, _, _ = select.select([sock], [], [], within)
    return bool(ready)


def closed_by_peer(sock: socket.socket, *, within: float) -> bool:
    """Whether the server closes the connection within ``within`` seconds (EOF or reset)."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, ssl.SSLEOFError):
        return True
    except TimeoutError:
        return False


# --- the adapter interface ----------------------------------------------------------------


class DialectAdapter(abc.ABC, Generic[C]):
    """How the suite speaks one dialect. A new dialect subclasses this once."""

    name: ClassVar[str]
    """Short name (test ids)."""
    methods: ClassVar[tuple[str, ...]]
    """Every method of the dialect (the fuzz calls them; the matrix covers each)."""

    def __init__(self, gateway: RunningGateway) -> None:
        self.gateway = gateway

    @property
    def port(self) -> int:
        """Where the dialect listens: the gateway's port, unless it has a listener of its
        own (the aggregated API's TLS port)."""
        return self.gateway.port

    def connect(self, *, timeout: float = 30.0) -> socket.socket:
        """A fresh connection to :attr:`port` (TLS where the dialect's listener is)."""
        return connect(self.port, timeout=timeout)

    def exchange(self, request: RawRequest, *, timeout: float = 30.0) -> RawReply:
        """:func:`exchange` on a connection of :meth:`connect`."""
        return exchange(
            self.port, request, timeout=timeout, opener=lambda t: self.connect(timeout=t)
        )

    @abc.abstractmethod
    def client(self, tenant: Tenant) -> C:
        """A logged-in client for ``tenant``."""

    @classmethod
    @abc.abstractmethod
    def probes(cls) -> Sequence[Probe[C]]:
        """Every method that takes a name or an id, once per such argument."""

    @classmethod
    @abc.abstractmethod
    def matrix(cls) -> Sequence[MatrixCase[C]]:
        """Every method, aimed at the victim's ids and names."""

    @classmethod
    @abc.abstractmethod
    def store_probes(cls) -> Sequence[StoreProbe[C]]:
        """Every method that stores free-form data (params, object references), once per
        such argument, writing a value and reading the object back. They run as a tenant of
        their own (:data:`STORE_TENANT_OPERATIONS`): what they store may break its reads."""

    @abc.abstractmethod
    def foreign_ids(self, answer: Answer, victim: Tenant) -> set[object]:
        """The victim's ids that appear in ``answer`` as ids (not as echoed arguments)."""

    @abc.abstractmethod
    def raw_request(self, body: bytes, tenant: Tenant | None) -> RawRequest:
        """The request that posts ``body`` to the dialect's endpoint, authenticated as
        ``tenant`` if the dialect authenticates outside the body."""

    @abc.abstractmethod
    def classify(self, reply: RawReply) -> Answer:
        """A raw reply as an answer, an error of some class, or broken."""

    @classmethod
    @abc.abstractmethod
    def worst_case_bodies(cls) -> Mapping[str, Callable[[], bytes]]:
        """Bodies of every costly kind (numbers, dates, strings, deep, wide), built on
        demand (each is up to the body limit), each to be refused as the client's fault."""

    @classmethod
    @abc.abstractmethod
    def body(cls, *, padding: int = 0) -> bytes:
        """An ordinary request body of this dialect, ``padding`` bytes larger than it
        needs to be (the oversized and slow tests)."""

    @classmethod
    @abc.abstractmethod
    def check_decoder(cls, body: bytes) -> None:
        """Run the dialect's decoder in-process on ``body``; raise AssertionError (or let
        anything unplanned escape) unless it is decoded or refused as the client's fault."""

    @abc.abstractmethod
    def fuzz_seeds(self, world: World) -> Sequence[tuple[str, tuple[Any, ...]]]:
        """Valid calls (method, arguments) for ``world.attacker``, the fuzz's starting points."""

    @classmethod
    @abc.abstractmethod
    def fuzz_bodies(cls, seeds: Sequence[tuple[str, tuple[Any, ...]]]) -> st.SearchStrategy[bytes]:
        """Generated bodies: mutations of valid calls and random calls."""


# --- XML-RPC dialects -------------------------------------------------------------------

_XMLRPC_CLASSES: Mapping[int, ErrorClass] = {
    -32700: "bad_argument",
    -32600: "bad_argument",
    -32602: "bad_argument",
    400: "bad_argument",
    -32701: "limit",
    -32703: "limit",
    -32702: "too_large",
    -32601: "unknown_method",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    409: "state",
    422: "state",
    # Gandi's six-digit codes (the Gandi methods)
    500010: "bad_argument",
    500020: "bad_argument",
    500030: "bad_argument",
    500130: "unauthenticated",
    510040: "not_found",
    510050: "forbidden",
    510060: "state",
    110020: "state",
}
"""faultCode -> class (docs/faults.md, both tables); anything else (-32603, -32604, 500,
503, 110010, 150000, 150010) is the server's fault."""


def fault_answer(code: object, text: object) -> Answer:
    if not isinstance(code, int) or isinstance(code, bool) or not isinstance(text, str):
        return Answer(outcome="broken", text=f"malformed fault {code!r} {text!r}")
    return Answer(
        outcome="error", error=_XMLRPC_CLASSES.get(code, "server"), code=str(code), text=text
    )


def invoke(proxy: xmlrpc.client.ServerProxy, method: str, *args: Any) -> Answer:
    """Call ``method`` with Python's own client; whatever happens becomes an Answer."""
    try:
        value = getattr(proxy, method)(*args)
    except xmlrpc.client.Fault as fault:
        return fault_answer(fault.faultCode, fault.faultString)
    except xmlrpc.client.ProtocolError as exc:
        return Answer(outcome="broken", code=f"HTTP {exc.errcode}", text=str(exc.errmsg))
    except (
        OSError,
        http.client.HTTPException,
        xml.parsers.expat.ExpatError,
        xmlrpc.client.ResponseError,
    ) as exc:
        return Answer(outcome="broken", text=repr(exc))
    return Answer(outcome="ok", value=value)


def classify_xmlrpc(reply: RawReply) -> Answer:
    """XML-RPC answers every call with HTTP 200 and text/xml, a fault included."""
    if reply.error is not None:
        return Answer(outcome="broken", text=f"connection: {reply.error}")
    if reply.status != 200:
        return Answer(outcome="broken", code=f"HTTP {reply.status}", text=_short(reply.body))
    if not reply.headers.get("content-type", "").startswith("text/xml"):
        return Answer(outcome="broken", text=f"content type {reply.headers.get('content-type')}")
    try:
        params, _ = xmlrpc.client.loads(reply.body)
    except xmlrpc.client.Fault as fault:
        return fault_answer(fault.faultCode, fault.faultString)
    except Exception as exc:  # whatever the reference client cannot parse is broken
        return Answer(outcome="broken", text=f"not XML-RPC: {exc!r}")
    if len(params) != 1:
        return Answer(outcome="broken", text=f"{len(params)} params in a methodResponse")
    return Answer(outcome="ok", value=params[0])


def xmlrpc_ids(value: object) -> set[object]:
    """Ids in an XML-RPC answer: a list of ints (a list of ids) or ``id`` members."""
    found: set[object] = set()
    if isinstance(value, list):
        found |= {v for v in value if isinstance(v, int) and not isinstance(v, bool)}
        for item in value:
            found |= xmlrpc_ids(item)
    elif isinstance(value, dict):
        if "id" in value:
            found.add(value["id"])
        for item in value.values():
            if isinstance(item, dict | list):
                found |= xmlrpc_ids(item)
    return found


def _param(value_xml: bytes) -> bytes:
    return b"<param>" + value_xml + b"</param>"


def xmlrpc_worst_case_bodies(
    wrap: Callable[[bytes], bytes], *, limit: int
) -> dict[str, Callable[[], bytes]]:
    """The costly kinds for any XML-RPC dialect, each built only when asked for (most are
    about ``limit`` bytes). ``wrap`` puts one ``<value>`` into a call of the dialect.
    Each is refused as the client's fault; only the 50,000-member struct is over
    ``limit`` (50,000 distinct members do not fit into 1 MiB)."""
    room = limit - 1024  # what the dialect's wrapper leaves
    depth = codec.DEFAULT_LIMITS.max_depth + 1
    fit = room // len(b"<member><name>xxxxx</name><value/></member>")
    duplicate = b"<member><name>m</name><value/></member>"

    def numbers(tag: bytes, text: bytes) -> bytes:
        return b"<value><%s>%s</%s></value>" % (tag, text, tag)

    values: dict[str, Callable[[], bytes]] = {
        # numbers: each must be refused by length before any pattern or int() runs
        "int-1MiB-of-digits": lambda: numbers(b"int", b"1" * room),
        "int-5000-digits-past-pythons-limit": lambda: numbers(b"int", b"9" * 5000),
        "double-1MiB-of-digits": lambda: numbers(b"double", b"1" * room),
        "double-16000-digits-then-a-non-digit": lambda: numbers(b"double", b"1" * 16_000 + b"x"),
        "double-1MiB-of-digits-and-a-dot": lambda: numbers(b"double", b"1" * room + b"."),
        # dates
        "datetime-1MiB": lambda: numbers(b"dateTime.iso8601", b"1" * room),
        "datetime-offset-+99:00": lambda: numbers(b"dateTime.iso8601", b"20060101T00:00:00+99:00"),
        "datetime-year-0001-+01:00": lambda: numbers(
            b"dateTime.iso8601", b"00010101T00:00:00+01:00"
        ),
        "datetime-year-9999--01:00": lambda: numbers(
            b"dateTime.iso8601", b"99991231T23:59:59-01:00"
        ),
        # strings
        "string-1MiB": lambda: numbers(b"string", b"Q" * room),
        "untyped-string-1MiB": lambda: b"<value>" + b"Q" * room + b"</value>",
        "base64-1MiB": lambda: numbers(b"base64", b"QUFB" * (room // 4)),
        "character-references-1MiB": lambda: numbers(b"string", b"&#x51;" * (room // 6)),
        "invalid-utf8-1MiB": lambda: numbers(b"string", b"\xff" * room),
        "member-name-1MiB": lambda: (
            b"<value><struct><member><name>" + b"n" * room + b"</name><value>1</value>"
            b"</member></struct></value>"
        ),
        "element-name-1MiB": lambda: b"<value><" + b"e" * room + b"/></value>",
        "attributes-1MiB": lambda: (
            b"<value " + b" ".join(b"a%d='x'" % i for i in range(room // 12)) + b"><int>x</int>"
            b"</value>"
        ),
        "whitespace-1MiB-inside-a-struct": lambda: (
            b"<value><struct>" + b" " * room + b"</struct></value>"
        ),
        # deep
        "deep-20000-unclosed-arrays": lambda: b"<value><array><data>" * 20_000,
        "deep-just-past-the-limit": lambda: (
            b"<value><array><data>" * depth + b"</data></array></value>" * depth
        ),
        "deep-structs": lambda: b"<value><struct><member><name>m</name>" * 10_000,
        # wide
        "wide-130000-empty-values": lambda: (
            b"<value><array><data>" + b"<value/>" * (room // 8) + b"</data></array></value>"
        ),
        "wide-38000-ints": lambda: (
            b"<value><array><data>"
            + b"<value><int>1</int></value>" * (room // 27)
            + b"</data></array></value>"
        ),
        "struct-50000-members-over-the-size-limit": lambda: (
            b"<value><struct>"
            + b"".join(b"<member><name>%x</name><value/></member>" % i for i in range(50_000))
            + b"</struct></value>"
        ),
        f"struct-{fit}-members": lambda: (
            b"<value><struct>"
            + b"".join(b"<member><name>%05x</name><value/></member>" % i for i in range(fit))
            + b"</struct></value>"
        ),
        "struct-duplicate-members": lambda: (
            b"<value><struct>" + duplicate * (room // len(duplicate)) + b"</struct></value>"
        ),
    }

    def wrapped(build: Callable[[], bytes]) -> Callable[[], bytes]:
        return lambda: wrap(build())

    return {kind: wrapped(build) for kind, build in values.items()}


# --- fuzz strategies ------------------------------------------------------------------

_I4 = st.integers(min_value=codec.I4_MIN, max_value=codec.I4_MAX)
_SCALARS: st.SearchStrategy[Any] = st.one_of(
    _I4,
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
    st.binary(max_size=20).map(xmlrpc.client.Binary),
    st.datetimes(
        min_value=datetime.datetime(1, 1, 1), max_value=datetime.datetime(9999, 12, 31)
    ).map(xmlrpc.client.DateTime),
)
xmlrpc_values: st.SearchStrategy[Any] = st.recursive(
    _SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
"""Random XML-RPC value trees, as ``xmlrpc.client.dumps`` writes them."""

_SCALAR_TEXTS: st.SearchStrategy[str] = st.one_of(
    st.text(max_size=40),
    st.from_regex(r"[+-]?[0-9]{0,80}(\.[0-9]{0,40})?([eE][+-]?[0-9]{1,6})?", fullmatch=True),
    st.sampled_from(
        [
            "",
            " ",
            "1e309",
            "-1e309",
            "nan",
            "inf",
            "0x10",
            "2147483648",
            "-2147483649",
            "9" * 5000,
            "1" * 70,
            "20060101T00:00:00+99:00",
            "00010101T00:00:00+01:00",
            "99991231T23:59:59-01:00",
            "20061301T00:00:00",
            "2006-02-30",
            "====",
            "AAA",
            "..",
            "../../x",
        ]
    ),
)
_TAGS = (
    b"<value>",
    b"</value>",
    b"<value/>",
    b"<struct>",
    b"</struct>",
    b"<array><data>",
    b"</data></array>",
    b"<member><name>m</name>",
    b"<i8>1</i8>",
    b"<nil/>",
    b"<int>",
    b"</int>",
    b"<double>1e999</double>",
    b"<boolean>2</boolean>",
    b"<dateTime.iso8601>x</dateTime.iso8601>",
    b"<base64>!</base64>",
    b'<!DOCTYPE m [<!ENTITY e "x">]>',
    b"&e;",
    b"&#0;",
    b"&#x1F;",
    b"&amp;",
    b"<![CDATA[<]]>",
    b"<?pi x?>",
    b"<!-- c -->",
    b'<ex:nil xmlns:ex="http://ws.apache.org/xmlrpc/namespaces/extensions"/>',
    b"<methodName>login</methodName>",
    b"<params>",
    b"</params>",
    b"\xff\xfe",
    b"\x00",
)
_SCALAR_ELEMENT = re.compile(
    rb"<(int|i4|double|string|boolean|dateTime\.iso8601|base64|name|methodName)>([^<]*)</\1>"
)


@st.composite
def mutated(draw: st.DrawFn, bodies: st.SearchStrategy[bytes]) -> bytes:
    """A body with 0 to 4 mutations: bytes inserted, deleted or replaced, a random tag
    inserted, a scalar's text replaced."""
    body = bytearray(draw(bodies))
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        # Weighted towards changes that keep the XML well-formed, so most bodies get past
        # the parser into the grammar, the scalar parsers and the dialect's methods.
        kind = draw(st.sampled_from(["text"] * 4 + ["tag"] * 2 + ["insert", "delete", "replace"]))
        at = draw(st.integers(min_value=0, max_value=len(body)))
        if kind == "insert":
            body[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            body[at : at + draw(st.integers(min_value=1, max_value=16))] = b""
        elif kind == "replace" and at < len(body):
            body[at] = draw(st.integers(min_value=0, max_value=255))
        elif kind == "tag":
            body[at:at] = draw(st.sampled_from(_TAGS))
        elif kind == "text":
            scalars = list(_SCALAR_ELEMENT.finditer(bytes(body)))
            if scalars:
                chosen = draw(st.sampled_from(scalars))
                text = draw(_SCALAR_TEXTS)
                if draw(st.integers(min_value=0, max_value=3)):  # mostly escaped
                    text = text.replace("&", "&amp;").replace("<", "&lt;")
                body[chosen.start(2) : chosen.end(2)] = text.encode("utf-8")
    return bytes(body)


@st.composite
def xmlrpc_calls(
    draw: st.DrawFn, seeds: Sequence[tuple[str, tuple[Any, ...]]], methods: Sequence[str]
) -> bytes:
    """A call as Python's client writes it: a seed, a seed with one argument replaced by
    a random value tree, or one of the dialect's methods (or an unknown one) with
    random arguments."""
    choice = draw(st.integers(min_value=0, max_value=2))
    if choice < 2 and seeds:
        method, args = draw(st.sampled_from(list(seeds)))
        params = list(args)
        if choice == 1 and params:
            params[draw(st.integers(min_value=0, max_value=len(params) - 1))] = draw(xmlrpc_values)
    else:
        method = draw(st.sampled_from([*methods, "system.listMethods", "no_such_method"]))
        params = draw(st.lists(xmlrpc_values, max_size=4))
    return xmlrpc.client.dumps(tuple(params), method).encode("utf-8")


class XmlRpcAdapter(DialectAdapter[C]):
    """What every XML-RPC dialect shares: the endpoint, the codec, faults as errors."""

    endpoint: ClassVar[str] = "/xmlrpc"

    @classmethod
    @abc.abstractmethod
    def wrap(cls, value_xml: bytes) -> bytes:
        """A call of this dialect whose (first non-session) argument is ``value_xml``."""

    def classify(self, reply: RawReply) -> Answer:
        return classify_xmlrpc(reply)

    def foreign_ids(self, answer: Answer, victim: Tenant) -> set[object]:
        if answer.outcome != "ok":
            return set()
        return xmlrpc_ids(answer.value) & set(victim.ids.values())

    @classmethod
    def worst_case_bodies(cls) -> Mapping[str, Callable[[], bytes]]:
        return xmlrpc_worst_case_bodies(cls.wrap, limit=codec.DEFAULT_LIMITS.max_body_bytes)

    @classmethod
    def body(cls, *, padding: int = 0) -> bytes:
        return cls.wrap(b"<value><string>" + b"x" * padding + b"</string></value>")

    @classmethod
    def check_decoder(cls, body: bytes) -> None:
        """decode_call either decodes or raises a CodecError; the fault for it is never the
        internal error and is what Python's client parses as a fault; decoded arguments
        echoed back (apply and query return what the client stored) encode or are
        refused as not representable, nothing else."""
        try:
            call = codec.decode_call(body)
        except codec.CodecError as exc:
            fault, encoded = faults.XMLRPC.encode(exc)
            if fault.code == faults.XMLRPC.internal.code:
                raise AssertionError(f"{exc!r} became an internal error") from exc
            answer = classify_xmlrpc(
                RawReply(status=200, headers={"content-type": "text/xml"}, body=encoded)
            )
            if answer.code != str(fault.code):
                raise AssertionError(f"the fault for {exc!r} reads as {answer.describe()}") from exc
            return
        try:
            codec.encode_response(list(call.params))
        except codec.NotRepresentable as exc:
            if faults.XMLRPC.encode(exc)[0].code == faults.XMLRPC.internal.code:
                raise AssertionError(f"{exc!r} became an internal error") from exc

    @classmethod
    def fuzz_bodies(cls, seeds: Sequence[tuple[str, tuple[Any, ...]]]) -> st.SearchStrategy[bytes]:
        return mutated(xmlrpc_calls(seeds, cls.methods))


# --- Gandi ---------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class GandiClient:
    proxy: xmlrpc.client.ServerProxy
    session: str

    def call(self, method: str, *args: Any) -> Answer:
        return invoke(self.proxy, method, *args)


def _gandi_each_victim_id(method: str, *extra: Any) -> Callable[[GandiClient, World], list[Answer]]:
    def run(c: GandiClient, w: World) -> list[Answer]:
        return [c.call(method, c.session, id_, *extra) for id_ in w.victim.ids.values()]

    return run


def _gandi_login_as_victim(c: GandiClient, w: World) -> list[Answer]:
    # Gandi v1's login(login, password): the victim's user id with the attacker's key.
    victim_user = f"user-{w.victim.namespace}"  # as make_key names users
    return [
        c.call("login", victim_user, w.attacker.key),
        c.call("login", victim_user, w.attacker.key, True),
    ]


def _gandi_login(c: GandiClient, w: World) -> list[Answer]:
    login = c.call("login", w.attacker.key)
    if login.outcome != "ok":
        return [login]
    return [login, c.call("operation_list", login.value)]


def _gandi_lists(c: GandiClient, w: World) -> list[Answer]:
    hour = datetime.timedelta(hours=1)
    now = datetime.datetime.now(datetime.UTC)
    filters: list[dict[str, Any]] = [
        {},
        {"type": OPERATION_TYPE},
        {"updated_after": xmlrpc.client.DateTime(now - hour)},
        {
            "updated_after": xmlrpc.client.DateTime(now - hour),
            "updated_before": xmlrpc.client.DateTime(now + hour),
        },
        *({"state": word} for word in ("RUN", "WAIT", "DONE", "ERROR", "CANCEL")),
    ]
    return [
        c.call("operation_list", c.session),
        *(c.call("operation_list", c.session, f) for f in filters),
    ]


def _own_ids_listed(answer: Answer, w: World) -> list[str]:
    """Not vacuous: an unfiltered list shows the attacker's own (never deleted) operations."""
    own = {w.attacker.ids[name] for name in OPERATION_STATES}
    if answer.outcome == "ok" and own <= set(answer.value):
        return []
    return [f"the attacker's own ids {sorted(own)} missing from {answer.describe()}"]


def _expect_login_then_own_list(answers: list[Answer], w: World) -> list[str]:
    problems = expect_ok_or_errors()(answers, w)
    return problems + _own_ids_listed(answers[-1], w)


def _expect_lists(answers: list[Answer], w: World) -> list[str]:
    return expect_ok_or_errors()(answers, w) + _own_ids_listed(answers[0], w)


def _gandi_create(c: GandiClient, w: World) -> list[Answer]:
    return [
        c.call(
            "operation_create",
            c.session,
            OPERATION_TYPE,
            {"marker": w.attacker.marker},
            OBJECT,
        )
    ]


def _expect_created_in_own_namespace(answers: list[Answer], w: World) -> list[str]:
    [answer] = answers
    if answer.outcome != "ok" or not isinstance(answer.value, int):
        return [f"expected a new id, got {answer.describe()}"]
    custom = kubernetes.client.CustomObjectsApi(w.api)
    obj: Any = custom.get_namespaced_custom_object(
        GROUP, VERSION, w.attacker.namespace, "operations", f"op-{answer.value}"
    )
    if obj["spec"]["params"] != {"marker": w.attacker.marker}:
        return [f"op-{answer.value} in the attacker's namespace has {obj['spec']['params']}"]
    return []


class GandiAdapter(XmlRpcAdapter[GandiClient]):
    """Gandi: ``login(apikey)`` gives a session string, the first argument of every call."""

    name = "gandi"
    methods = (
        "login",
        "operation_list",
        "operation_details",
        "operation_relaunch",
        "operation_cancel",
        "operation_create",
    )

    def client(self, tenant: Tenant) -> GandiClient:
        proxy = self.gateway.proxy()
        return GandiClient(proxy=proxy, session=str(proxy.login(tenant.key)))

    @classmethod
    def probes(cls) -> Sequence[Probe[GandiClient]]:
        # operation_create's object {kind, name} names something outside the cluster (a
        # domain) and is stored as data, never used as a path: not a probe here.
        return [
            Probe(
                method="operation_details",
                what="opid",
                run=lambda c, v: c.call("operation_details", c.session, v),
            ),
            Probe(
                method="operation_relaunch",
                what="opid",
                run=lambda c, v: c.call("operation_relaunch", c.session, v, {"x": "y"}),
            ),
            Probe(
                method="operation_cancel",
                what="opid",
                run=lambda c, v: c.call("operation_cancel", c.session, v),
            ),
            Probe(
                method="operation_create",
                what="type",
                run=lambda c, v: c.call("operation_create", c.session, v, {}),
                skip=valid_operation_type,
            ),
            Probe(
                method="operation_list",
                what="filter type",
                run=lambda c, v: c.call("operation_list", c.session, {"type": v}),
                search=True,
            ),
        ]

    @classmethod
    def store_probes(cls) -> Sequence[StoreProbe[GandiClient]]:
        def created(
            *args: Callable[[object], Any],
        ) -> Callable[[GandiClient, Tenant, object], list[Answer]]:
            def run(c: GandiClient, t: Tenant, v: object) -> list[Answer]:
                made = c.call("operation_create", c.session, "free_form", *(a(v) for a in args))
                if made.outcome != "ok":
                    return [made]
                return [made, c.call("operation_details", c.session, made.value)]

            return run

        def relaunched(c: GandiClient, t: Tenant, v: object) -> list[Answer]:
            # The same key every time: each value replaces the one before.
            opid = t.ids["relaunchable"]
            done = c.call("operation_relaunch", c.session, opid, {"v": v})
            if done.outcome != "ok":
                return [done]
            return [done, c.call("operation_details", c.session, opid)]

        return [
            StoreProbe(method="operation_create", what="params", run=created(lambda v: {"v": v})),
            StoreProbe(
                method="operation_create",
                what="object name",
                run=created(lambda v: {}, lambda v: {"kind": "domain", "name": v}),
            ),
            StoreProbe(method="operation_relaunch", what="params", run=relaunched),
        ]

    @classmethod
    def matrix(cls) -> Sequence[MatrixCase[GandiClient]]:
        return [
            MatrixCase(
                method="login",
                what="own key then list",
                writes=False,
                run=_gandi_login,
                expect=_expect_login_then_own_list,
            ),
            MatrixCase(
                method="login",
                what="victim's user with own key",
                writes=False,
                run=_gandi_login_as_victim,
                expect=expect_errors("unauthenticated"),
            ),
            MatrixCase(
                method="operation_list",
                what="every filter",
                writes=False,
                run=_gandi_lists,
                expect=_expect_lists,
            ),
            MatrixCase(
                method="operation_details",
                what="victim ids",
                writes=False,
                run=_gandi_each_victim_id("operation_details"),
                expect=expect_errors("not_found"),
            ),
            MatrixCase(
                method="operation_relaunch",
                what="victim ids",
                writes=True,
                run=_gandi_each_victim_id("operation_relaunch", {"marker": "relaunched"}),
                expect=expect_errors("not_found"),
            ),
            MatrixCase(
                method="operation_cancel",
                what="victim ids",
                writes=True,
                run=_gandi_each_victim_id("operation_cancel"),
                expect=expect_errors("not_found"),
            ),
            MatrixCase(
                method="operation_create",
                what="same type and object as the victim's",
                writes=True,
                run=_gandi_create,
                expect=_expect_created_in_own_namespace,
            ),
        ]

    def raw_request(self, body: bytes, tenant: Tenant | None) -> RawRequest:
        return RawRequest(path=self.endpoint, headers={"Content-Type": "text/xml"}, body=body)

    @classmethod
    def wrap(cls, value_xml: bytes) -> bytes:
        return (
            b"<?xml version='1.0'?><methodCall><methodName>operation_details</methodName>"
            b"<params>"
            + _param(b"<value><string>session</string></value>")
            + _param(value_xml)
            + b"</params></methodCall>"
        )

    def fuzz_seeds(self, world: World) -> Sequence[tuple[str, tuple[Any, ...]]]:
        session = self.client(world.attacker).session
        ids = world.attacker.ids
        return [
            ("login", (world.attacker.key,)),
            ("login", (f"user-{world.attacker.namespace}", world.attacker.key, False)),
            ("operation_list", (session,)),
            (
                "operation_list",
                (
                    session,
                    {
                        "state": "DONE",
                        "type": OPERATION_TYPE,
                        "updated_after": xmlrpc.client.DateTime("2006-01-01"),
                    },
                ),
            ),
            ("operation_details", (session, ids["shared-done"])),
            ("operation_cancel", (session, ids["shared-wait"])),
            ("operation_relaunch", (session, ids["shared-failed"], {"k": "v"})),
            ("operation_create", (session, "fuzz", {"k": 1}, OBJECT)),
        ]


# --- gocept ----------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class GoceptClient:
    proxy: xmlrpc.client.ServerProxy

    def call(self, method: str, *args: Any) -> Answer:
        return invoke(self.proxy, method, *args)

    def apply(self, *records: dict[str, Any]) -> Answer:
        return self.call("apply", list(records))


def _op(name: object, **values: Any) -> dict[str, Any]:
    return {"__type__": "operation", "name": name, **values}


def _task(name: object, **values: Any) -> dict[str, Any]:
    return {
        "__type__": "scheduledtask",
        "name": name,
        "schedule": "0 3 * * *",
        "suspend": True,
        "template": {"type": "hostile"},
        **values,
    }


def _gocept_queries(c: GoceptClient, w: World) -> list[Answer]:
    return [
        c.call("query", "operation"),
        *(c.call("query", "operation", {"name": n}) for n in w.victim.names),
        *(c.call("query", "operation", {"id": i}) for i in w.victim.ids.values()),
        *(
            c.call("query", "operation", {"state": s})
            for s in ("Pending", "WaitingExternal", "Succeeded", "FailedExternal")
        ),
        c.call("query", "operation", {"type": OPERATION_TYPE}),
        c.call("query", "operation", {"object": OBJECT}),
        c.call("query", "scheduledtask"),
        *(c.call("query", "scheduledtask", {"name": n}) for n in w.victim.tasks),
    ]


def _expect_own_records(answers: list[Answer], w: World) -> list[str]:
    problems = expect_ok_or_errors()(answers, w)
    first = answers[0]
    names = {r.get("name") for r in first.value} if first.outcome == "ok" else set()
    if not set(OPERATION_STATES) <= names:
        problems.append(f"the attacker's own records missing from {first.describe()}")
    return problems


def _gocept_ids_of_victim(c: GoceptClient, w: World) -> list[Answer]:
    return [c.call("query", "operation", {"id": i}) for i in w.victim.ids.values()] + [
        c.call("query", "scheduledtask", {"id": i}) for i in w.victim.ids.values()
    ]


def _gocept_log(c: GoceptClient, w: World) -> list[Answer]:
    return [c.call("log"), c.call("log", 0)]


def _expect_own_log(answers: list[Answer], w: World) -> list[str]:
    problems = expect_ok_or_errors()(answers, w)
    for answer in answers:
        if answer.outcome == "ok":
            problems += [
                f"log entry of {e.get('resource_group')!r}: {_short(e)}"
                for e in answer.value
                if e.get("resource_group") != w.attacker.namespace
            ]
    return problems


def _apply_each_victim_name(
    record: Callable[[str, World], dict[str, Any]],
    *,
    tasks: bool = False,
    destructive: bool = False,
) -> Callable[[GoceptClient, World], list[Answer]]:
    """One apply per victim name; ``destructive`` ones leave out the names the attacker
    has too (deleting the attacker's own look-alikes would empty the world for the other
    tests), except the doomed ones that exist for exactly this."""

    def run(c: GoceptClient, w: World) -> list[Answer]:
        names = w.victim.tasks if tasks else w.victim.names
        if destructive:
            kept = set(SHARED_TASKS) - {"doomed-task"} if tasks else set(OPERATION_STATES)
            names = tuple(n for n in names if n not in kept)
        return [c.apply(record(n, w)) for n in names]

    return run


def _expect_own_or_refused(answers: list[Answer], w: World) -> list[str]:
    """A write by name is the attacker's own object (same name, the attacker's marker)
    or refused; never the victim's."""
    problems: list[str] = []
    for i, answer in enumerate(answers):
        if answer.outcome == "error" and answer.error in ("bad_argument", "state", "not_found"):
            continue
        if answer.outcome != "ok":
            problems.append(f"answer {i}: {answer.describe()}")
            continue
        for record in answer.value:
            params = record.get("params") or (record.get("template") or {}).get("params") or {}
            if params.get("marker") not in (w.attacker.marker, None):
                problems.append(f"answer {i}: a record that is not the attacker's: {record}")
    return problems


def _apply_with_victim_ids(c: GoceptClient, w: World) -> list[Answer]:
    # The attacker's own shared-1 record, carrying the victim's id (a read-only key).
    return [
        c.apply(_op("shared-1", id=i, cancel=True, params={"marker": w.attacker.marker}))
        for i in w.victim.ids.values()
    ]


class GoceptAdapter(XmlRpcAdapter[GoceptClient]):
    """gocept: ``apply``/``query``/``log``, the API key as the Basic auth password."""

    name = "gocept"
    methods = ("apply", "query", "log")

    def client(self, tenant: Tenant) -> GoceptClient:
        return GoceptClient(proxy=self.gateway.gocept(tenant.key))

    @classmethod
    def probes(cls) -> Sequence[Probe[GoceptClient]]:
        def query(type_: str, key: str) -> Callable[[GoceptClient, object], Answer]:
            return lambda c, v: c.call("query", type_, {key: v})

        def apply(
            make: Callable[[object], dict[str, Any]],
        ) -> Callable[[GoceptClient, object], Answer]:
            return lambda c, v: c.apply(make(v))

        # Valid names are not hostile (and would create objects): they are not sent.
        by_name: dict[str, Callable[[GoceptClient, object], Answer]] = {
            "operation name filter": query("operation", "name"),
            "task name filter": query("scheduledtask", "name"),
        }
        writes_by_name: dict[str, Callable[[object], dict[str, Any]]] = {
            "create operation name": lambda v: _op(v, type="hostile"),
            "delete operation name": lambda v: _op(v, __action__="delete"),
            "cancel operation name": lambda v: _op(v, cancel=True),
            "relaunch operation name": lambda v: _op(v, relaunch=1),
            "create task name": lambda v: _task(v),
            "delete task name": lambda v: _task(v, __action__="delete"),
            "depends_on name": lambda v: _op("hostile-dep", type="hostile", depends_on=[v]),
        }
        return [
            Probe(method="query", what="type", run=lambda c, v: c.call("query", v)),
            *(
                Probe(method="query", what=what, run=run, search=True, skip=valid_name)
                for what, run in by_name.items()
            ),
            Probe(
                method="query",
                what="operation id filter",
                run=query("operation", "id"),
                search=True,
            ),
            Probe(
                method="query", what="task id filter", run=query("scheduledtask", "id"), search=True
            ),
            Probe(
                method="query",
                what="filter key",
                run=lambda c, v: c.call("query", "operation", {v: "x"}),
                skip=not_a_string,  # struct member names are strings on the wire
            ),
            *(
                Probe(method="apply", what=what, run=apply(make), skip=valid_name)
                for what, make in writes_by_name.items()
            ),
            Probe(
                method="apply",
                what="template label value",
                run=apply(
                    lambda v: _task("hostile-label", template={"type": "t", "labels": {"k": v}})
                ),
                skip=valid_label_value,
            ),
            Probe(
                method="apply",
                what="template label key",
                run=apply(
                    lambda v: _task("hostile-label", template={"type": "t", "labels": {v: "x"}})
                ),
                skip=lambda v: not_a_string(v) or valid_label_key(v),
            ),
            Probe(
                method="apply",
                what="operation type",
                run=apply(lambda v: _op("hostile-type", type=v)),
                skip=valid_operation_type,
            ),
            Probe(
                method="apply", what="__type__", run=apply(lambda v: {"__type__": v, "name": "x"})
            ),
            Probe(
                method="apply",
                what="__action__",
                run=apply(lambda v: _op("shared-1", __action__=v)),
                skip=lambda v: v in ("set", "delete"),
            ),
            Probe(
                method="apply",
                what="read-only id",
                run=apply(lambda v: _op("shared-1", id=v, cancel=True)),
            ),
            Probe(
                method="log",
                what="serial",
                run=lambda c, v: c.call("log", v),
                search=True,
                # Any serial from 0 up is a fair question; its answer is the caller's own.
                skip=lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
            ),
        ]

    @classmethod
    def store_probes(cls) -> Sequence[StoreProbe[GoceptClient]]:
        def applied(
            type_: str, make: Callable[[str, object], dict[str, Any]]
        ) -> Callable[[GoceptClient, Tenant, object], list[Answer]]:
            def run(c: GoceptClient, t: Tenant, v: object) -> list[Answer]:
                name = f"free-{uuid.uuid4().hex[:8]}"
                done = c.apply(make(name, v))
                if done.outcome != "ok":
                    return [done]
                return [done, c.call("query", type_, {"name": name})]

            return run

        return [
            StoreProbe(
                method="apply",
                what="operation params",
                run=applied("operation", lambda n, v: _op(n, type="free_form", params={"v": v})),
            ),
            StoreProbe(
                method="apply",
                what="operation object name",
                run=applied(
                    "operation",
                    lambda n, v: _op(n, type="free_form", object={"kind": "domain", "name": v}),
                ),
            ),
            StoreProbe(
                method="apply",
                what="task template params",
                run=applied(
                    "scheduledtask",
                    lambda n, v: _task(n, template={"type": "free_form", "params": {"v": v}}),
                ),
            ),
        ]

    @classmethod
    def matrix(cls) -> Sequence[MatrixCase[GoceptClient]]:
        return [
            MatrixCase(
                method="query",
                what="by every key",
                writes=False,
                run=_gocept_queries,
                expect=_expect_own_records,
            ),
            MatrixCase(
                method="query",
                what="victim ids",
                writes=False,
                run=_gocept_ids_of_victim,
                expect=expect_empty,
            ),
            MatrixCase(
                method="log",
                what="latest and all",
                writes=False,
                run=_gocept_log,
                expect=_expect_own_log,
            ),
            MatrixCase(
                method="apply",
                what="set params by victim names",
                writes=True,
                run=_apply_each_victim_name(
                    lambda n, w: _op(n, params={"marker": w.attacker.marker})
                ),
                expect=_expect_own_or_refused,
            ),
            MatrixCase(
                method="apply",
                what="cancel by victim names",
                writes=True,
                run=_apply_each_victim_name(lambda n, w: _op(n, cancel=True)),
                expect=_expect_own_or_refused,
            ),
            MatrixCase(
                method="apply",
                what="relaunch by victim names",
                writes=True,
                run=_apply_each_victim_name(lambda n, w: _op(n, relaunch=1)),
                expect=_expect_own_or_refused,
            ),
            MatrixCase(
                method="apply",
                what="create under victim-only names",
                writes=True,
                run=_apply_each_victim_name(
                    lambda n, w: _op(n, type=OPERATION_TYPE, params={"marker": w.attacker.marker})
                ),
                expect=_expect_own_or_refused,
            ),
            MatrixCase(
                method="apply",
                what="delete by victim names",
                writes=True,
                run=_apply_each_victim_name(
                    lambda n, w: _op(n, __action__="delete"), destructive=True
                ),
                expect=_expect_own_or_refused,
            ),
            MatrixCase(
                method="apply",
                what="set task by victim names",
                writes=True,
                run=_apply_each_victim_name(
                    lambda n, w: _task(
                        n, template={"type": "t", "params": {"marker": w.attacker.marker}}
                    ),
                    tasks=True,
                ),
                expect=_expect_own_or_refused,
            ),
            MatrixCase(
                method="apply",
                what="delete task by victim names",
                writes=True,
                run=_apply_each_victim_name(
                    lambda n, w: {"__type__": "scheduledtask", "__action__": "delete", "name": n},
                    tasks=True,
                    destructive=True,
                ),
                expect=_expect_own_or_refused,
            ),
            MatrixCase(
                method="apply",
                what="own record carrying victim ids",
                writes=True,
                run=_apply_with_victim_ids,
                expect=expect_errors("bad_argument"),
            ),
        ]

    def raw_request(self, body: bytes, tenant: Tenant | None) -> RawRequest:
        headers = {"Content-Type": "text/xml"}
        if tenant is not None:
            token = base64.b64encode(f"user:{tenant.key}".encode()).decode("ascii")
            headers["Authorization"] = f"Basic {token}"
        return RawRequest(path=self.endpoint, headers=headers, body=body)

    @classmethod
    def wrap(cls, value_xml: bytes) -> bytes:
        return (
            b"<?xml version='1.0'?><methodCall><methodName>query</methodName><params>"
            + _param(value_xml)
            + b"</params></methodCall>"
        )

    def fuzz_seeds(self, world: World) -> Sequence[tuple[str, tuple[Any, ...]]]:
        return [
            ("query", ("operation",)),
            ("query", ("operation", {"name": "shared-1", "state": "Pending"})),
            ("query", ("scheduledtask", {"name": "nightly"})),
            ("log", ()),
            ("log", (0,)),
            ("apply", ([_op("fuzz-op", type="fuzz", params={"k": 1}, object=OBJECT)],)),
            ("apply", ([_task("fuzz-task")],)),
            ("apply", ([_op("shared-wait", cancel=True)],)),
        ]


# --- BDOM REST -------------------------------------------------------------------------------

_BDOM_CLASSES: Mapping[str, ErrorClass] = {
    "body_too_large": "too_large",
    "forbidden_xml": "limit",
    "limit_exceeded": "limit",
    "malformed_xml": "bad_argument",
    "invalid_request": "bad_argument",
    "invalid_body": "bad_argument",
    "invalid_name": "bad_argument",
    "invalid_argument": "bad_argument",
    "method_not_allowed": "bad_argument",
    "unauthenticated": "unauthenticated",
    "forbidden": "forbidden",
    "unknown_opcode": "unknown_method",
    "not_found": "not_found",
    "conflict": "state",
    "illegal_transition": "state",
}
"""The BDOM error names (docs/faults.md, "BDOM") -> class; anything else is the server's."""
_FAR_ID = 2_000_000_000
"""A task id far above any the tests allocate (the fuzz mutates ids; it must not reach one
of the attacker's own)."""


def classify_bdom(reply: RawReply) -> Answer:
    """BDOM answers with the HTTP status and an XML body: ``<response>`` or
    ``<multiresponse>`` for 200, ``<error>`` with a matching ``code`` otherwise."""
    if reply.error is not None:
        return Answer(outcome="broken", text=f"connection: {reply.error}")
    if not reply.headers.get("content-type", "").startswith("text/xml"):
        return Answer(
            outcome="broken",
            code=f"HTTP {reply.status}",
            text=f"content type {reply.headers.get('content-type')}: {_short(reply.body)}",
        )
    try:
        root = ET.fromstring(reply.body)
    except ET.ParseError as exc:
        return Answer(outcome="broken", text=f"not XML: {exc!r}")
    if reply.status == 200:
        if root.tag == "response" and len(root) == 0:
            return Answer(outcome="ok", value=root.text or "")
        items = [root] if root.tag == "response" else list(root)
        if root.tag not in ("response", "multiresponse"):
            return Answer(outcome="broken", text=f"200 with <{root.tag}>")
        return Answer(outcome="ok", value=[{c.tag: c.text or "" for c in item} for item in items])
    name, code = root.findtext("name") or "", root.findtext("code") or ""
    if root.tag != "error" or code != str(reply.status):
        return Answer(outcome="broken", text=f"HTTP {reply.status}: {_short(reply.body)}")
    error = _BDOM_CLASSES.get(name, "server") if reply.status < 500 else "server"
    return Answer(
        outcome="error", error=error, code=f"{reply.status} {name}", text=root.findtext("message")
    )


@dataclasses.dataclass(kw_only=True)
class BdomClient:
    port: int
    user_id: str
    key: str

    def request(self, method: str, path: str, body: bytes | None = None) -> Answer:
        headers = {
            "Authorization": "Basic "
            + base64.b64encode(f"{self.user_id}:{self.key}".encode()).decode("ascii")
        }
        if body is not None:
            headers["Content-Type"] = "text/xml"
        reply = exchange(
            self.port, RawRequest(method=method, path=path, headers=headers, body=body or b"")
        )
        return classify_bdom(reply)

    def status(self, *segments: object, user: str = "-") -> Answer:
        return self.request("GET", _bdom_path("status", *segments, user=user))

    def scheduled(self, *segments: object, user: str = "-") -> Answer:
        return self.request("GET", _bdom_path("scheduled", *segments, user=user))

    def delete(self, *ids: object, user: str = "-") -> Answer:
        return self.request("POST", _bdom_path("delete", user=user), _bdom_delete(*ids))

    def create(self, user: str = "-", **fields: object) -> Answer:
        return self.request("POST", _bdom_path("create", user=user), _bdom_create(**fields))


def _bdom_segment(value: object) -> str:
    """A value as one path segment, percent-encoded (a ``/`` never splits it)."""
    return urllib.parse.quote(str(value), safe="")


def _bdom_path(opcode: str, *segments: object, user: str = "-") -> str:
    filled = [*segments, *["-"] * (4 - len(segments))]
    return "/bdom/task/" + "/".join(_bdom_segment(s) for s in (opcode, *filled, user)) + "/"


def _xml_text(value: object) -> str:
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _bdom_delete(*ids: object) -> bytes:
    items = "".join(f"<task_id>{_xml_text(i)}</task_id>" for i in ids)
    return f"<request><delete>{items}</delete></request>".encode("utf-8", "surrogatepass")


def _bdom_create(
    *,
    opcode: object = "transfer-in",
    object_: object = "domain",
    name: object = "example.org",
    params: Mapping[str, object] | None = None,
) -> bytes:
    param_xml = "".join(
        f'<param name="{_xml_text(k)}">{_xml_text(v)}</param>' for k, v in (params or {}).items()
    )
    return (
        f"<request><create><opcode>{_xml_text(opcode)}</opcode>"
        f"<object>{_xml_text(object_)}</object><name>{_xml_text(name)}</name>"
        f"<params>{param_xml}</params></create></request>"
    ).encode("utf-8", "surrogatepass")


_USER_ID = re.compile(r"[A-Za-z0-9._@-]{1,253}")
_BDOM_WORD = re.compile(r"[a-z0-9]([a-z0-9_.-]{0,61}[a-z0-9])?")
"""An opcode, object kind or param name as TaskCreate.xsd allows it (legitimate, not sent)."""


def valid_user_id(value: object) -> bool:
    """A user id another key may have (apikeys' rule): asking for it is forbidden, not
    malformed, so it is not a hostile value for USER_ID."""
    return isinstance(value, str) and bool(_USER_ID.fullmatch(value))


def digits(value: object) -> bool:
    """A decimal id in a path or an XML body is a legitimate id (the victim's are the
    matrix's business; the caller's own would be found)."""
    return isinstance(value, str) and value.isascii() and value.isdigit()


def _bdom_victim_ids(
    call: Callable[[BdomClient, int], Answer],
) -> Callable[[BdomClient, World], list[Answer]]:
    def run(c: BdomClient, w: World) -> list[Answer]:
        return [call(c, id_) for id_ in w.victim.ids.values()]

    return run


def _bdom_victim_user(
    call: Callable[[BdomClient, str], Answer],
) -> Callable[[BdomClient, World], list[Answer]]:
    def run(c: BdomClient, w: World) -> list[Answer]:
        return [call(c, f"user-{w.victim.namespace}")]  # as make_key names users

    return run


def _bdom_lists(c: BdomClient, w: World) -> list[Answer]:
    words = ("SUCCESS", "PENDING_INT", "PENDING_EXT", "FAILED_INT", "FAILED_EXT")
    return [
        c.status(),
        *(c.status("-", word) for word in words),
        c.status("-", "-", OBJECT["kind"]),
        c.status("-", "-", OBJECT["kind"], OBJECT["name"]),
        c.status("-", "PENDING_EXT", OBJECT["kind"], OBJECT["name"]),
    ]


def _expect_own_status(answers: list[Answer], w: World) -> list[str]:
    problems = expect_ok_or_errors()(answers, w)
    first = answers[0]
    own = {w.attacker.ids[name] for name in OPERATION_STATES}
    listed = {int(r["task_id"]) for r in first.value} if first.outcome == "ok" else set()
    if not own <= listed:
        problems.append(f"the attacker's own ids {sorted(own)} missing from {first.describe()}")
    return problems


def _bdom_create_like_victim(c: BdomClient, w: World) -> list[Answer]:
    return [c.create(name=OBJECT["name"], params={"marker": w.attacker.marker})]


def _expect_bdom_created_in_own_namespace(answers: list[Answer], w: World) -> list[str]:
    [answer] = answers
    if answer.outcome != "ok" or not answer.value:
        return [f"expected the new task, got {answer.describe()}"]
    id_ = int(answer.value[0]["task_id"])
    custom = kubernetes.client.CustomObjectsApi(w.api)
    obj: Any = custom.get_namespaced_custom_object(
        GROUP, VERSION, w.attacker.namespace, "operations", f"op-{id_}"
    )
    if obj["spec"]["params"] != {"marker": w.attacker.marker}:
        return [f"op-{id_} in the attacker's namespace has {obj['spec']['params']}"]
    return []


class BdomAdapter(DialectAdapter[BdomClient]):
    """BDOM REST: ``/bdom/task/OPCODE/TASK_ID/STATUS/OBJECT/NAME/USER_ID/``, the API key as
    the Basic auth password, hostile values in every path segment and body element."""

    name = "bdom"
    methods = ("status", "scheduled", "delete", "create")

    def client(self, tenant: Tenant) -> BdomClient:
        return BdomClient(
            port=self.gateway.port, user_id=f"user-{tenant.namespace}", key=tenant.key
        )

    @classmethod
    def probes(cls) -> Sequence[Probe[BdomClient]]:
        return [
            Probe(method="status", what="TASK_ID", run=lambda c, v: c.status(v), skip=digits),
            Probe(method="status", what="STATUS", run=lambda c, v: c.status("-", v)),
            Probe(
                method="status",
                what="OBJECT",
                run=lambda c, v: c.status("-", "-", v),
                search=True,
            ),
            Probe(
                method="status",
                what="NAME",
                run=lambda c, v: c.status("-", "-", "domain", v),
                search=True,
            ),
            Probe(
                method="status",
                what="USER_ID",
                run=lambda c, v: c.status(user=str(v)),
                skip=lambda v: valid_user_id(str(v)),
            ),
            Probe(
                method="scheduled",
                what="TASK_ID",
                run=lambda c, v: c.scheduled(v),
                search=True,
            ),
            Probe(
                method="scheduled",
                what="NAME",
                run=lambda c, v: c.scheduled("-", "-", "domain", v),
                search=True,
            ),
            Probe(
                method="scheduled",
                what="USER_ID",
                run=lambda c, v: c.scheduled(user=str(v)),
                skip=lambda v: valid_user_id(str(v)),
            ),
            Probe(method="delete", what="task_id", run=lambda c, v: c.delete(v), skip=digits),
            Probe(
                method="delete",
                what="USER_ID",
                run=lambda c, v: c.delete(_FAR_ID, user=str(v)),
                skip=lambda v: valid_user_id(str(v)),
            ),
            Probe(
                method="create",
                what="name",
                run=lambda c, v: c.create(name=v),
                skip=lambda v: valid_name(str(v)),
            ),
            Probe(
                method="create",
                what="object",
                run=lambda c, v: c.create(object_=v),
                skip=lambda v: bool(_BDOM_WORD.fullmatch(str(v))),
            ),
            Probe(
                method="create",
                what="param name",
                run=lambda c, v: c.create(params={str(v): "x"}),
                skip=lambda v: bool(_BDOM_WORD.fullmatch(str(v))),
            ),
        ]

    @classmethod
    def store_probes(cls) -> Sequence[StoreProbe[BdomClient]]:
        def created(
            make: Callable[[object], dict[str, Any]],
        ) -> Callable[[BdomClient, Tenant, object], list[Answer]]:
            def run(c: BdomClient, t: Tenant, v: object) -> list[Answer]:
                made = c.create(**make(v))
                if made.outcome != "ok":
                    return [made]
                return [made, c.status(made.value[0]["task_id"])]

            return run

        return [
            StoreProbe(method="create", what="param", run=created(lambda v: {"params": {"v": v}})),
            StoreProbe(method="create", what="object name", run=created(lambda v: {"name": v})),
        ]

    @classmethod
    def matrix(cls) -> Sequence[MatrixCase[BdomClient]]:
        return [
            MatrixCase(
                method="status",
                what="every filter",
                writes=False,
                run=_bdom_lists,
                expect=_expect_own_status,
            ),
            MatrixCase(
                method="status",
                what="victim ids",
                writes=False,
                run=_bdom_victim_ids(lambda c, i: c.status(i)),
                expect=expect_errors("not_found"),
            ),
            MatrixCase(
                method="status",
                what="victim's user",
                writes=False,
                run=_bdom_victim_user(lambda c, u: c.status(user=u)),
                expect=expect_errors("forbidden"),
            ),
            MatrixCase(
                method="scheduled",
                what="own and victim ids",
                writes=False,
                run=lambda c, w: [
                    c.scheduled(),
                    *(c.scheduled(i) for i in w.victim.ids.values()),
                ],
                expect=expect_ok_or_errors(),
            ),
            MatrixCase(
                method="scheduled",
                what="victim's user",
                writes=False,
                run=_bdom_victim_user(lambda c, u: c.scheduled(user=u)),
                expect=expect_errors("forbidden"),
            ),
            MatrixCase(
                method="delete",
                what="victim ids",
                writes=True,
                run=_bdom_victim_ids(lambda c, i: c.delete(i)),
                expect=expect_errors("not_found"),
            ),
            MatrixCase(
                method="delete",
                what="victim ids beside a far id",
                writes=True,
                run=lambda c, w: [c.delete(*w.victim.ids.values())],
                expect=expect_errors("not_found"),
            ),
            MatrixCase(
                method="delete",
                what="victim's user",
                writes=True,
                run=_bdom_victim_user(lambda c, u: c.delete(_FAR_ID, user=u)),
                expect=expect_errors("forbidden"),
            ),
            MatrixCase(
                method="create",
                what="same object as the victim's",
                writes=True,
                run=_bdom_create_like_victim,
                expect=_expect_bdom_created_in_own_namespace,
            ),
            MatrixCase(
                method="create",
                what="victim's user",
                writes=True,
                run=_bdom_victim_user(lambda c, u: c.create(user=u)),
                expect=expect_errors("forbidden"),
            ),
        ]

    def foreign_ids(self, answer: Answer, victim: Tenant) -> set[object]:
        if answer.outcome != "ok" or not isinstance(answer.value, list):
            return set()
        shown = {r.get("task_id") for r in answer.value}
        return {i for i in victim.ids.values() if str(i) in shown}

    def raw_request(self, body: bytes, tenant: Tenant | None) -> RawRequest:
        headers = {"Content-Type": "text/xml"}
        user = "-"
        if tenant is not None:
            user = f"user-{tenant.namespace}"
            token = base64.b64encode(f"{user}:{tenant.key}".encode()).decode("ascii")
            headers["Authorization"] = f"Basic {token}"
        return RawRequest(path=_bdom_path("delete", user=user), headers=headers, body=body)

    def classify(self, reply: RawReply) -> Answer:
        return classify_bdom(reply)

    @classmethod
    def worst_case_bodies(cls) -> Mapping[str, Callable[[], bytes]]:
        room = 60 * 1024  # under the BDOM limit (64 KiB): these reach the parser
        big = codec.DEFAULT_LIMITS.max_body_bytes - 1024

        def delete(inner: bytes) -> bytes:
            return b"<request><delete>" + inner + b"</delete></request>"

        return {
            "task-id-60KiB-of-digits": lambda: delete(b"<task_id>" + b"9" * room + b"</task_id>"),
            "task-id-1MiB-of-digits": lambda: delete(b"<task_id>" + b"9" * big + b"</task_id>"),
            "task-id-character-references": lambda: delete(
                b"<task_id>" + b"&#x39;" * (room // 6) + b"</task_id>"
            ),
            "3000-task-ids": lambda: delete(b"<task_id>1</task_id>" * 3000),
            "1000-task-ids": lambda: delete(b"<task_id>1</task_id>" * 998),
            "deep-10000-unclosed": lambda: b"<request>" + b"<delete>" * 10_000,
            "deep-just-past-the-limit": lambda: (
                b"<request>" + b"<a>" * 8 + b"</a>" * 8 + b"</request>"
            ),
            "attributes-5000": lambda: (
                b"<request " + b" ".join(b'a%d="x"' % i for i in range(5000)) + b"/>"
            ),
            "attribute-value-60KiB": lambda: b'<request a="' + b"x" * room + b'"/>',
            "element-name-60KiB": lambda: b"<" + b"e" * room + b"/>",
            "namespaces-1000": lambda: (
                b"<request "
                + b" ".join(b'xmlns:n%d="urn:%d"' % (i, i) for i in range(1000))
                + b"/>"
            ),
            "billion-laughs": lambda: (
                b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaaaaaaaa">'
                b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
                b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]><request>&c;</request>'
            ),
            "external-entity": lambda: (
                b'<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                b"<request><delete><task_id>&x;</task_id></delete></request>"
            ),
            "comments-60KiB": lambda: b"<request>" + b"<!-- c -->" * (room // 10) + b"</request>",
            "whitespace-1MiB": lambda: b"<request>" + b" " * big + b"</request>",
            "invalid-utf8": lambda: delete(b"<task_id>\xff\xfe</task_id>"),
            "utf16-declared-utf8": lambda: "<request><delete/></request>".encode("utf-16"),
        }

    @classmethod
    def body(cls, *, padding: int = 0) -> bytes:
        return b"<request>" + b" " * padding + _bdom_delete(_FAR_ID)[9:]

    @classmethod
    def check_decoder(cls, body: bytes) -> None:
        """The delete and create parsers either decode or raise an error of the table that
        is a client's (4xx), never anything unplanned."""
        for parse in (bdom.delete_ids, bdom.create_request):
            try:
                parse(body)
            except Exception as exc:
                fault = bdom.FAULTS.fault_for(exc)
                if not 400 <= fault.code < 500:
                    raise AssertionError(f"{exc!r} became {fault.code} {fault.name}") from exc

    def fuzz_seeds(self, world: World) -> Sequence[tuple[str, tuple[Any, ...]]]:
        return [
            ("delete", (_bdom_delete(_FAR_ID),)),
            ("delete", (_bdom_delete(_FAR_ID, _FAR_ID + 1),)),
            ("create", (_bdom_create(params={"k": "v"}),)),
        ]

    @classmethod
    def fuzz_bodies(cls, seeds: Sequence[tuple[str, tuple[Any, ...]]]) -> st.SearchStrategy[bytes]:
        bodies = [args[0] for _, args in seeds if args and isinstance(args[0], bytes)]
        bodies += [
            _bdom_delete(_FAR_ID),
            _bdom_create(params={"k": "v"}),
            b'<?xml version="1.0" encoding="UTF-8"?><request xmlns:xsi='
            b'"http://www.w3.org/2001/XMLSchema-instance"><delete><task_id>2000000000</task_id>'
            b"</delete></request>",
        ]
        return mutated(st.sampled_from(bodies))


# --- XenAPI ----------------------------------------------------------------------------

_XENAPI_CLASSES: Mapping[str, ErrorClass] = {
    "MESSAGE_METHOD_UNKNOWN": "unknown_method",
    "MESSAGE_PARAMETER_COUNT_MISMATCH": "bad_argument",
    "FIELD_TYPE_ERROR": "bad_argument",
    "INVALID_VALUE": "bad_argument",
    "XMLRPC_UNMARSHAL_FAILURE": "bad_argument",
    "XMLRPC_REQUEST_TOO_LARGE": "too_large",
    "XMLRPC_REQUEST_REFUSED": "limit",
    "SESSION_AUTHENTICATION_FAILED": "unauthenticated",
    "SESSION_INVALID": "unauthenticated",
    "HANDLE_INVALID": "not_found",
    "OPERATION_NOT_ALLOWED": "state",
}
"""ErrorDescription[0] -> class (docs/faults.md); anything else (INTERNAL_ERROR) is the
server's fault."""


def xenapi_answer(value: object) -> Answer:
    """A decoded XenAPI reply: the envelope, or broken (a fault is broken too: XenAPI
    clients never expect one)."""
    if not isinstance(value, dict) or value.get("Status") not in ("Success", "Failure"):
        return Answer(outcome="broken", text=f"no XenAPI envelope: {_short(value)}")
    if value["Status"] == "Success":
        if set(value) != {"Status", "Value"}:
            return Answer(outcome="broken", text=f"success without a Value: {_short(value)}")
        return Answer(outcome="ok", value=value["Value"])
    description = value.get("ErrorDescription")
    if (
        set(value) != {"Status", "ErrorDescription"}
        or not isinstance(description, list)
        or not description
        or not all(isinstance(part, str) for part in description)
    ):
        return Answer(outcome="broken", text=f"malformed failure: {_short(value)}")
    code = description[0]
    return Answer(
        outcome="error",
        error=_XENAPI_CLASSES.get(code, "server"),
        code=code,
        text=" ".join(description[1:]),
    )


def classify_xenapi(reply: RawReply) -> Answer:
    answer = classify_xmlrpc(reply)
    if answer.outcome == "error":
        return Answer(outcome="broken", text=f"an XML-RPC fault: {answer.describe()}")
    if answer.outcome != "ok":
        return answer
    return xenapi_answer(answer.value)


@dataclasses.dataclass(kw_only=True)
class XenClient:
    proxy: xmlrpc.client.ServerProxy
    session: str
    user: str

    def call(self, method: str, *args: Any) -> Answer:
        answer = invoke(self.proxy, method, *args)
        if answer.outcome == "error":
            return Answer(outcome="broken", text=f"an XML-RPC fault: {answer.describe()}")
        if answer.outcome != "ok":
            return answer
        return xenapi_answer(answer.value)

    def task(self, method: str, *args: Any) -> Answer:
        return self.call(f"task.{method}", self.session, *args)


_XEN_REF_READS = ("get_record", *(f"get_{field}" for field in xenapi.TASK_FIELDS))
"""The task methods that take one task ref and change nothing."""


def _xen_refs(gw: RunningGateway, tenant: Tenant) -> dict[str, str]:
    """A tenant's task refs (``OpaqueRef:<uid>``), by operation name, from the cache."""
    out: dict[str, str] = {}
    for name in tenant.names:
        entry = gw.gateway.operations.get(tenant.namespace, name)
        if entry is not None:
            out[name] = f"OpaqueRef:{entry.uid}"
    return out


def _xen_derived(tenant: Tenant, kind: str) -> str:
    """The tenant's pool or host ref, derived as the gateway derives it (so the attacker
    can compute the victim's)."""
    return xenapi.derived_ref(tenant.namespace, kind)[1]


def _xen_each_victim_ref(method: str, *extra: Any) -> Callable[[XenClient, World], list[Answer]]:
    def run(c: XenClient, w: World) -> list[Answer]:
        return [c.task(method, ref, *extra) for ref in _xen_refs(w.gateway, w.victim).values()]

    return run


def _xen_victim_uuids(c: XenClient, w: World) -> list[Answer]:
    return [
        c.task("get_by_uuid", ref.removeprefix("OpaqueRef:"))
        for ref in _xen_refs(w.gateway, w.victim).values()
    ]


def _xen_login_as_victim(c: XenClient, w: World) -> list[Answer]:
    victim_user = f"user-{w.victim.namespace}"
    return [
        c.call("session.login_with_password", victim_user, w.attacker.key),
        c.call("session.login_with_password", victim_user, w.attacker.key, "2.21", "hostile"),
    ]


def _xen_logout_own(c: XenClient, w: World) -> list[Answer]:
    fresh = c.call("session.login_with_password", c.user, w.attacker.key)
    if fresh.outcome != "ok":
        return [fresh]
    return [fresh, c.call("session.logout", fresh.value), c.call("task.get_all", fresh.value)]


def _expect_logged_out(answers: list[Answer], w: World) -> list[str]:
    if len(answers) == 3 and answers[1].outcome == "ok" and answers[2].code == "SESSION_INVALID":
        return []
    return [f"login, logout, reuse: {[a.describe() for a in answers]}"]


def _xen_pool_host(method: str, kind: str) -> Callable[[XenClient, World], list[Answer]]:
    def run(c: XenClient, w: World) -> list[Answer]:
        return [c.call(method, c.session, _xen_derived(w.victim, kind))]

    return run


def _xen_lists(method: str) -> Callable[[XenClient, World], list[Answer]]:
    def run(c: XenClient, w: World) -> list[Answer]:
        return [c.call(method, c.session)]

    return run


def _xen_own_session(method: str) -> Callable[[XenClient, World], list[Answer]]:
    def run(c: XenClient, w: World) -> list[Answer]:
        return [c.call(method, c.session, c.session)]

    return run


def _xen_expect_own_tasks(answers: list[Answer], w: World) -> list[str]:
    problems = expect_ok_or_errors()(answers, w)
    own = set(_xen_refs(w.gateway, w.attacker).values())
    value = answers[0].value
    listed = set(value) if isinstance(value, list | dict) else set()
    if not own <= listed:
        problems.append(f"the attacker's own tasks missing from {answers[0].describe()}")
    return problems


def _xen_by_label(c: XenClient, w: World) -> list[Answer]:
    return [c.task("get_by_name_label", OPERATION_TYPE), c.task("get_by_name_label", "victim")]


def _xen_events(c: XenClient, w: World) -> list[Answer]:
    victim_refs = [f"task/{r}" for r in _xen_refs(w.gateway, w.victim).values()]
    return [
        c.call("event.from", c.session, ["task"], "", 0.0),
        c.call("event.from", c.session, victim_refs, "", 0.0),
        c.call("event.from", c.session, ["*"], "1", 0.0),
    ]


def _xen_expect_own_events(answers: list[Answer], w: World) -> list[str]:
    problems = expect_ok_or_errors()(answers, w)
    own = set(_xen_refs(w.gateway, w.attacker).values())
    first = answers[0].value if answers[0].outcome == "ok" else {}
    if not own <= {e.get("ref") for e in first.get("events", [])}:
        problems.append(f"the attacker's own tasks missing from {answers[0].describe()}")
    if answers[1].outcome != "ok" or answers[1].value.get("events"):
        problems.append(f"events of the victim's refs: {answers[1].describe()}")
    return problems


def _xen_register_next(c: XenClient, w: World) -> list[Answer]:
    """event.register on every class and the victim's refs, an own change (so event.next
    answers at once), event.next, event.unregister."""
    classes = ["*", "task", *(f"task/{r}" for r in _xen_refs(w.gateway, w.victim).values())]
    return [
        c.call("event.register", c.session, classes),
        c.task("create", "hostile-next", w.attacker.marker),
        c.call("event.next", c.session),
        c.call("event.unregister", c.session, classes),
    ]


def _xen_expect_own_next(answers: list[Answer], w: World) -> list[str]:
    problems = expect_ok_or_errors()(answers, w)
    if any(a.outcome != "ok" for a in answers):
        return [*problems, f"expected every call to succeed: {[a.describe() for a in answers]}"]
    events = answers[2].value
    if not events:
        problems.append("event.next did not report the attacker's own new task")
    victim = set(_xen_refs(w.gateway, w.victim).values())
    for event in events:
        uid = str(event.get("ref", "")).removeprefix("OpaqueRef:")
        if (
            event.get("ref") in victim
            or w.gateway.gateway.task_feed.task(w.attacker.namespace, uid) is None
        ):
            problems.append(f"event.next reported a task not the attacker's: {event}")
    return problems


def _xen_create(c: XenClient, w: World) -> list[Answer]:
    return [c.task("create", "hostile", w.attacker.marker)]


def _xen_expect_created(answers: list[Answer], w: World) -> list[str]:
    [answer] = answers
    if answer.outcome != "ok" or not str(answer.value).startswith("OpaqueRef:"):
        return [f"expected a new task ref, got {answer.describe()}"]
    uid = str(answer.value).removeprefix("OpaqueRef:")
    entry = w.gateway.gateway.task_feed.task(w.attacker.namespace, uid)
    if entry is None:
        return [f"{answer.value} is not a task of the attacker"]
    return []


class XenApiAdapter(DialectAdapter[XenClient]):
    """XenAPI at ``/xenapi``: ``session.login_with_password`` gives a session ref, the first
    argument of every call; every answer is the ``{Status, Value | ErrorDescription}``
    envelope."""

    name = "xenapi"
    endpoint: ClassVar[str] = "/xenapi"
    methods = (
        "session.login_with_password",
        "session.logout",
        "session.get_uuid",
        "session.get_this_host",
        "pool.get_all",
        "pool.get_master",
        "pool.get_uuid",
        "host.get_all",
        "host.get_uuid",
        "host.get_API_version_major",
        "host.get_API_version_minor",
        "task.get_all",
        "task.get_all_records",
        "task.get_by_uuid",
        "task.get_by_name_label",
        *(f"task.{m}" for m in _XEN_REF_READS),
        "task.set_name_label",
        "task.set_name_description",
        "task.cancel",
        "task.destroy",
        "task.create",
        "event.from",
        "event.register",
        "event.unregister",
        "event.next",
    )

    def client(self, tenant: Tenant) -> XenClient:
        proxy = xmlrpc.client.ServerProxy(f"{self.gateway.base}{self.endpoint}")
        user = f"user-{tenant.namespace}"
        answer = xenapi_answer(proxy.session.login_with_password(user, tenant.key))
        assert answer.outcome == "ok", answer.describe()
        return XenClient(proxy=proxy, session=str(answer.value), user=user)

    @classmethod
    def probes(cls) -> Sequence[Probe[XenClient]]:
        def ref_probe(method: str, *extra: Any, prefixed: bool) -> Probe[XenClient]:
            def run(c: XenClient, v: object) -> Answer:
                value = f"OpaqueRef:{v}" if prefixed and isinstance(v, str) else v
                return c.task(method, value, *extra)

            return Probe(
                method=f"task.{method}", what="ref" if not prefixed else "ref uuid", run=run
            )

        probes: list[Probe[XenClient]] = []
        for prefixed in (False, True):
            probes += [ref_probe(m, prefixed=prefixed) for m in _XEN_REF_READS]
            probes += [
                ref_probe("set_name_label", "x", prefixed=prefixed),
                ref_probe("set_name_description", "x", prefixed=prefixed),
                ref_probe("cancel", prefixed=prefixed),
                ref_probe("destroy", prefixed=prefixed),
            ]
        return [
            *probes,
            Probe(
                method="task.get_by_uuid", what="uuid", run=lambda c, v: c.task("get_by_uuid", v)
            ),
            Probe(
                method="task.get_by_name_label",
                what="label",
                run=lambda c, v: c.task("get_by_name_label", v),
                search=True,
            ),
            Probe(
                method="event.from",
                what="token",
                run=lambda c, v: c.call("event.from", c.session, ["task"], v, 0.0),
                # Digits are a fair token (a resourceVersion): the answer is the caller's own.
                skip=lambda v: isinstance(v, str) and (v == "" or v.isdecimal()),
            ),
            Probe(
                method="event.from",
                what="class ref",
                run=lambda c, v: _xen_events_only(
                    c.call("event.from", c.session, [f"task/{v}"], "", 0.0)
                ),
                search=True,
                skip=not_a_string,
            ),
            Probe(
                method="pool.get_master",
                what="pool ref",
                run=lambda c, v: c.call("pool.get_master", c.session, v),
            ),
            Probe(
                method="host.get_API_version_major",
                what="host ref",
                run=lambda c, v: c.call("host.get_API_version_major", c.session, v),
            ),
        ]

    @classmethod
    def store_probes(cls) -> Sequence[StoreProbe[XenClient]]:
        def renamed(method: str) -> Callable[[XenClient, Tenant, object], list[Answer]]:
            def run(c: XenClient, t: Tenant, v: object) -> list[Answer]:
                entry = c.task("get_all")
                if entry.outcome != "ok" or not entry.value:
                    return [entry]
                ref = entry.value[0]
                done = c.task(method, ref, v)
                if done.outcome != "ok":
                    return [done]
                return [done, c.task("get_record", ref), c.task("get_all_records")]

            return run

        def created(c: XenClient, t: Tenant, v: object) -> list[Answer]:
            made = c.task("create", v, v)
            if made.outcome != "ok":
                return [made]
            return [made, c.task("get_record", made.value)]

        return [
            StoreProbe(method="task.set_name_label", what="value", run=renamed("set_name_label")),
            StoreProbe(
                method="task.set_name_description",
                what="value",
                run=renamed("set_name_description"),
            ),
            StoreProbe(method="task.create", what="label and description", run=created),
        ]

    @classmethod
    def matrix(cls) -> Sequence[MatrixCase[XenClient]]:
        return [
            MatrixCase(
                method="session.login_with_password",
                what="victim's user with own key",
                writes=False,
                run=_xen_login_as_victim,
                expect=expect_errors("unauthenticated"),
            ),
            MatrixCase(
                method="session.logout",
                what="own fresh session",
                writes=True,
                run=_xen_logout_own,
                expect=_expect_logged_out,
            ),
            *(
                MatrixCase(
                    method=m,
                    what="own session",
                    writes=False,
                    run=_xen_own_session(m),
                    expect=expect_ok_or_errors(),
                )
                for m in ("session.get_uuid", "session.get_this_host")
            ),
            *(
                MatrixCase(
                    method=m,
                    what="own list",
                    writes=False,
                    run=_xen_lists(m),
                    expect=expect_ok_or_errors(),
                )
                for m in ("pool.get_all", "host.get_all")
            ),
            *(
                MatrixCase(
                    method=m,
                    what="victim's ref",
                    writes=False,
                    run=_xen_pool_host(m, m.partition(".")[0]),
                    expect=expect_errors("not_found"),
                )
                for m in (
                    "pool.get_master",
                    "pool.get_uuid",
                    "host.get_uuid",
                    "host.get_API_version_major",
                    "host.get_API_version_minor",
                )
            ),
            *(
                MatrixCase(
                    method=m,
                    what="own tasks",
                    writes=False,
                    run=_xen_lists(m),
                    expect=_xen_expect_own_tasks,
                )
                for m in ("task.get_all", "task.get_all_records")
            ),
            MatrixCase(
                method="task.get_by_uuid",
                what="victim uuids",
                writes=False,
                run=_xen_victim_uuids,
                expect=expect_errors("not_found"),
            ),
            MatrixCase(
                method="task.get_by_name_label",
                what="shared and victim labels",
                writes=False,
                run=_xen_by_label,
                expect=expect_ok_or_errors(),
            ),
            *(
                MatrixCase(
                    method=f"task.{m}",
                    what="victim refs",
                    writes=False,
                    run=_xen_each_victim_ref(m),
                    expect=expect_errors("not_found"),
                )
                for m in _XEN_REF_READS
            ),
            *(
                MatrixCase(
                    method=f"task.{m}",
                    what="victim refs",
                    writes=True,
                    run=_xen_each_victim_ref(m, *extra),
                    expect=expect_errors("not_found"),
                )
                for m, extra in (
                    ("set_name_label", ("mine",)),
                    ("set_name_description", ("mine",)),
                    ("cancel", ()),
                    ("destroy", ()),
                )
            ),
            MatrixCase(
                method="task.create",
                what="own namespace",
                writes=True,
                run=_xen_create,
                expect=_xen_expect_created,
            ),
            MatrixCase(
                method="event.from",
                what="all, victim refs, old token",
                writes=False,
                run=_xen_events,
                expect=_xen_expect_own_events,
            ),
            *(
                MatrixCase(
                    method=m,
                    what="every class and victim refs, then an own change",
                    writes=True,
                    run=_xen_register_next,
                    expect=_xen_expect_own_next,
                )
                for m in ("event.register", "event.unregister", "event.next")
            ),
        ]

    def foreign_ids(self, answer: Answer, victim: Tenant) -> set[object]:
        """The victim's refs, uuids and ids (``other_config.opkeeper_id``) in an answer."""
        if answer.outcome != "ok":
            return set()
        refs = _xen_refs(self.gateway, victim)
        theirs: set[str] = set(refs.values()) | {
            r.removeprefix("OpaqueRef:") for r in refs.values()
        }
        theirs |= {str(i) for i in victim.ids.values()}
        return _strings(answer.value) & theirs

    def raw_request(self, body: bytes, tenant: Tenant | None) -> RawRequest:
        return RawRequest(path=self.endpoint, headers={"Content-Type": "text/xml"}, body=body)

    def classify(self, reply: RawReply) -> Answer:
        return classify_xenapi(reply)

    @classmethod
    def wrap(cls, value_xml: bytes) -> bytes:
        return (
            b"<?xml version='1.0'?><methodCall><methodName>task.get_record</methodName>"
            b"<params>"
            + _param(b"<value><string>OpaqueRef:session</string></value>")
            + _param(value_xml)
            + b"</params></methodCall>"
        )

    @classmethod
    def worst_case_bodies(cls) -> Mapping[str, Callable[[], bytes]]:
        return xmlrpc_worst_case_bodies(cls.wrap, limit=codec.DEFAULT_LIMITS.max_body_bytes)

    @classmethod
    def body(cls, *, padding: int = 0) -> bytes:
        return cls.wrap(b"<value><string>" + b"x" * padding + b"</string></value>")

    @classmethod
    def check_decoder(cls, body: bytes) -> None:
        """decode_call decodes or raises a CodecError, whose failure is never
        INTERNAL_ERROR and reads back as the same code through the envelope."""
        try:
            codec.decode_call(body)
        except codec.CodecError as exc:
            description = xenfaults.description(exc, xenfaults.Context(method=""))
            if description[0] == "INTERNAL_ERROR":
                raise AssertionError(f"{exc!r} became an internal error") from exc
            encoded = codec.encode_response({"Status": "Failure", "ErrorDescription": description})
            answer = classify_xenapi(
                RawReply(status=200, headers={"content-type": "text/xml"}, body=encoded)
            )
            if answer.code != description[0]:
                raise AssertionError(
                    f"the failure for {exc!r} reads as {answer.describe()}"
                ) from exc

    def fuzz_seeds(self, world: World) -> Sequence[tuple[str, tuple[Any, ...]]]:
        c = self.client(world.attacker)
        ref = _xen_refs(self.gateway, world.attacker)["shared-done"]
        return [
            ("session.login_with_password", (c.user, world.attacker.key)),
            ("session.login_with_password", (c.user, world.attacker.key, "2.21", "fuzz")),
            ("task.get_all", (c.session,)),
            ("task.get_record", (c.session, ref)),
            ("task.get_by_uuid", (c.session, ref.removeprefix("OpaqueRef:"))),
            ("task.get_by_name_label", (c.session, OPERATION_TYPE)),
            ("task.set_name_label", (c.session, ref, "fuzz")),
            ("event.from", (c.session, ["task"], "", 0.0)),
        ]

    @classmethod
    def fuzz_bodies(cls, seeds: Sequence[tuple[str, tuple[Any, ...]]]) -> st.SearchStrategy[bytes]:
        return mutated(xmlrpc_calls(seeds, cls.methods))


def _xen_events_only(answer: Answer) -> Answer:
    """An event.from answer as its events alone (empty when nothing matched)."""
    if answer.outcome != "ok":
        return answer
    return dataclasses.replace(answer, value=answer.value.get("events"))


def _strings(value: object) -> set[str]:
    """Every string in a decoded answer (keys included)."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        found: set[str] = set()
        for k, v in value.items():
            found |= _strings(k) | _strings(v)
        return found
    if isinstance(value, list):
        return set().union(*map(_strings, value)) if value else set()
    return set()
