"""The CloudStack dialect: ``GET``/``POST /client/api?command=...``, signed, XML or JSON.

CloudStack clients (the ``cs`` package, CloudMonkey, libcloud) submit an
async command, get ``{jobid, id}`` at once, and poll ``queryAsyncJobResult``
until ``jobstatus`` leaves 0. Here a job is an Operation: an async command
named in :attr:`Settings.commands` creates one through the service (its
parameters become ``params``, the executor comes from the ``--executor``
policy), and the job fields are read from the watch-fed cache like every
other dialect's reads. ``jobstatus`` comes from the one vocabulary table
(:func:`opkeeper.states.legacy`, cloudstack column).

Requests are signed as CloudStack checks them (:func:`canonical`,
:meth:`Api.authenticate`): HMAC-SHA1 with the caller's secret key over the
parameters (``signature`` left out) sorted by name, each ``name=value`` with
the value URL-encoded, joined by ``&`` and lower-cased; with
``signatureVersion=3`` the ``expires`` time must not have passed. Nothing per
key is stored for this: the apiKey is the key's SHA-256 (the hash the key
Secret already holds, in base64url) and the secretKey is an HMAC of that hash
under a master key every gateway process shares through a Secret
(:data:`MASTER_KEY_SECRET`, an :class:`opkeeper.keys.KeyedSecret`). So
revoking the key Secret ends CloudStack access at once, like every other
dialect's (docs/gateway.md weighs this against storing secret keys).

Errors are CloudStack's ``errorresponse`` with ``errorcode`` equal to the HTTP
status, from one table (:data:`ERRORS`, docs/faults.md). XML is written here
with escaping and never with a client's or a result's key as an element name
unless it is a plain XML name (:func:`to_xml`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import functools
import hashlib
import hmac
import json
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from xml.sax import saxutils

from opkeeper import errors, names, states
from opkeeper.gateway import auth, cache, calllog, faults, service, xmlrpc

DIALECT = states.Dialect.CLOUDSTACK

MASTER_KEY_SECRET = "opkeeper-cloudstack-key"
"""The Secret (system namespace) holding the master key that secret keys derive from."""
VERSION = "4.19.0.0"
"""What the XML root's ``cloud-stack-version`` attribute says (CloudStack writes its own
version there; clients only show it)."""
MAX_PAGE_SIZE = 500
"""Largest ``pagesize`` of a list command (CloudStack's default ``default.page.size``);
also the page size when none is given."""
DEFAULT_MAX_PARAMETERS = 100
"""Most parameters one request may carry (default 100)."""
DEFAULT_MAX_VALUE_CHARS = 64 * 1024
"""Longest parameter value in characters (default 64 KiB, the largest spec anyway)."""
RESULT_DEPTH_MAX = 32
"""Deepest nesting of a job result written as structure; deeper parts are sent as their
JSON text, so no stored result can make an answer recurse without bound."""

JSON_TYPE = "application/json"
XML_TYPE = "text/xml"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """What the CloudStack dialect serves and how much one request may carry."""

    commands: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Async commands: CloudStack command name -> Operation type (``deployVirtualMachine``
    -> ``vm_deploy``). Each creates an Operation of that type with the request's other
    parameters as ``params``. Command names are matched without regard to case, as
    CloudStack does."""
    max_parameters: int = DEFAULT_MAX_PARAMETERS
    """Most parameters one request may carry (query string and form body together)."""
    max_value_chars: int = DEFAULT_MAX_VALUE_CHARS
    """Longest parameter value, in characters."""


def commands_from(pairs: Sequence[str]) -> dict[str, str]:
    """Parse ``COMMAND=TYPE`` settings from the command line (``--cloudstack-command``)."""
    out: dict[str, str] = {}
    for pair in pairs:
        command, sep, type_ = pair.partition("=")
        if not sep or not _COMMAND.fullmatch(command) or not type_:
            raise ValueError(f"--cloudstack-command wants COMMAND=TYPE, got {pair!r}")
        if command.lower() in _BUILTIN or command.lower() in (c.lower() for c in out):
            raise ValueError(f"--cloudstack-command: {command} is served already")
        out[command] = type_
    return out


# --- errors -------------------------------------------------------------------------


class UnknownCommand(errors.InvalidArgument):
    """The command is not served (CloudStack's 432)."""


class BadParameter(errors.InvalidArgument):
    """A parameter is missing, repeated, malformed or too large (CloudStack's 431)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ErrorRow:
    """One row of :data:`ERRORS`: an error class, its HTTP status (= ``errorcode``) and
    the ``cserrorcode`` CloudStack uses for the matching Java exception."""

    row: faults.Row
    cserrorcode: int


ERROR_ROWS: tuple[ErrorRow, ...] = (
    # Most specific first: the first row whose class matches wins.
    ErrorRow(row=faults.Row(error=xmlrpc.BodyTooLarge, code=413, name="body_too_large"),
             cserrorcode=4350),
    ErrorRow(row=faults.Row(error=UnknownCommand, code=432, name="unknown_command"),
             cserrorcode=9999),
    ErrorRow(row=faults.Row(error=errors.Unauthenticated, code=401, name="unauthenticated"),
             cserrorcode=4290),
    ErrorRow(row=faults.Row(error=errors.NotFound, code=431, name="not_found"),
             cserrorcode=4350),
    ErrorRow(row=faults.Row(error=errors.IllegalTransition, code=431, name="illegal_transition"),
             cserrorcode=4350),
    ErrorRow(row=faults.Row(error=errors.InvalidArgument, code=431, name="invalid_parameter"),
             cserrorcode=4350),
    ErrorRow(row=faults.Row(error=errors.Forbidden, code=531, name="forbidden"),
             cserrorcode=4365),
    ErrorRow(row=faults.Row(error=errors.Conflict, code=530, name="conflict"),
             cserrorcode=4300),
    ErrorRow(row=faults.Row(error=errors.RateLimited, code=429, name="rate_limited"),
             cserrorcode=4380),
    ErrorRow(row=faults.Row(error=errors.Unavailable, code=534, name="unavailable"),
             cserrorcode=4380),
    ErrorRow(row=faults.Row(error=errors.OpkeeperError, code=530, name="error"),
             cserrorcode=9999),
)  # fmt: skip
INTERNAL = ErrorRow(
    row=faults.Row(error=Exception, code=530, name="internal_error"), cserrorcode=9999
)
ERRORS = faults.Table(
    name="cloudstack", rows=tuple(r.row for r in ERROR_ROWS), internal=INTERNAL.row
)
"""Errors -> CloudStack error codes; docs/faults.md lists every row."""
_CSERRORCODES = {r.row.name: r.cserrorcode for r in (*ERROR_ROWS, INTERNAL)}


def cserrorcode(fault: faults.Fault) -> int:
    return _CSERRORCODES[fault.name]


# --- credentials ----------------------------------------------------------------------

_HASH_PREFIX = "sha256:"
_SECRET_CONTEXT = b"opkeeper cloudstack secretKey v1\x00"


def api_key(key_hash: auth.KeyHash) -> str:
    """The apiKey of an API key: its SHA-256 (as the key Secret stores it) in base64url.
    Not a secret: session tokens carry the same hash, and it reveals nothing of the key."""
    raw = bytes.fromhex(key_hash.removeprefix(_HASH_PREFIX))
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@functools.lru_cache(maxsize=4096)
def key_hash_of(apikey: str) -> auth.KeyHash | None:
    """The key hash an apiKey stands for, or None if it is not one (remembered: every
    request of a client carries the same apiKey)."""
    if len(apikey) != 43:
        return None
    try:
        raw = base64.urlsafe_b64decode(apikey + "=")
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 32 or api_key(auth.KeyHash(_HASH_PREFIX + raw.hex())) != apikey:
        return None  # only the one canonical spelling names a key
    return auth.KeyHash(_HASH_PREFIX + raw.hex())


def secret_key(*, master: bytes, key_hash: auth.KeyHash) -> str:
    """The secretKey of an API key: HMAC-SHA256 of its hash under the master key, in
    base64url. Whoever holds the master key can compute it; nothing per key is stored."""
    digest = hmac.new(master, _SECRET_CONTEXT + key_hash.encode("ascii"), hashlib.sha256)
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode("ascii")


# --- parameters and signatures ------------------------------------------------------

_COMMAND = re.compile(r"[A-Za-z][A-Za-z0-9]{0,127}")
_PARAM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\[\]-]{0,127}")
"""Parameter names as CloudStack's are (``zoneid``, ``details[0].key``): ASCII, so the
signed text lower-cases the same way in every language."""
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_PROTOCOL = frozenset({"command", "apikey", "signature", "signatureversion", "expires", "response"})
"""Parameters that are the request's envelope, never a command's argument."""
_JAVA_SAFE = "*"
"""What java.net.URLEncoder leaves as it is besides letters, digits, ``.``, ``-``, ``_``;
it encodes ``~`` (which Python's quote keeps) and writes a space as ``+`` (sent as
``%20`` by CloudStack's signer)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Params:
    """A request's parameters, checked: each name once (regardless of case)."""

    pairs: tuple[tuple[str, str], ...]
    """As sent (names in their case), for the signature."""
    by_name: Mapping[str, str]
    """Lower-cased name -> value, for everything else."""

    def get(self, name: str) -> str | None:
        return self.by_name.get(name)

    @property
    def json(self) -> bool:
        return (self.by_name.get("response") or "").lower() == "json"

    def arguments(self) -> dict[str, str]:
        """The command's own parameters (lower-cased names), without the envelope."""
        return {k: v for k, v in self.by_name.items() if k not in _PROTOCOL}


def parse(*, query: str, body: bytes, form: bool, settings: Settings) -> Params:
    """The parameters of the query string and (for a form POST) the body, or
    :class:`BadParameter`: more than ``max_parameters``, a name that is not a plain
    ASCII name, a value that is not UTF-8 or holds control characters, one longer than
    ``max_value_chars``, or a name given twice (``jobid`` and ``jobId`` included:
    which one the signature and which one the command read must never differ)."""
    sources = [query]
    if body:
        if not form:
            raise BadParameter("a POST body must be application/x-www-form-urlencoded parameters")
        try:
            sources.append(body.decode("ascii"))
        except UnicodeDecodeError:
            raise BadParameter("a form body is ASCII (values percent-encoded)") from None
    pairs: list[tuple[str, str]] = []
    fields = [field for text in sources if text for field in _fields(text, settings=settings)]
    if len(fields) > settings.max_parameters:
        raise BadParameter(f"more than {settings.max_parameters} parameters")
    for field in fields:
        name, _, value = field.partition("=")
        pairs.append((_unquote(name), _unquote(value)))
    by_name: dict[str, str] = {}
    for name, value in pairs:
        if not _PARAM_NAME.fullmatch(name):
            raise BadParameter(f"parameter name {names.shown(name)} is not a valid name")
        if len(value) > settings.max_value_chars:
            raise BadParameter(
                f"parameter {name} is longer than {settings.max_value_chars} characters"
            )
        if _CONTROL.search(value):
            raise BadParameter(f"parameter {name} holds control characters")
        lower = name.lower()
        if lower in by_name:
            raise BadParameter(f"parameter {name} is given more than once")
        by_name[lower] = value
    return Params(pairs=tuple(pairs), by_name=by_name)


def _fields(text: str, *, settings: Settings) -> list[str]:
    """The non-empty ``name=value`` fields of a query string or form body; counted before
    splitting, so a megabyte of ``&`` costs one count, not a million strings."""
    if text.count("&") >= 2 * settings.max_parameters:
        raise BadParameter(f"more than {settings.max_parameters} parameters")
    return [field for field in text.split("&") if field]


def _unquote(text: str) -> str:
    """Form decoding (``+`` is a space, ``%XX`` a UTF-8 byte), strict about UTF-8."""
    if "%" not in text and "+" not in text:
        return text
    try:
        return urllib.parse.unquote(text.replace("+", " "), errors="strict")
    except UnicodeDecodeError:
        raise BadParameter("a parameter is not UTF-8") from None


_UNRESERVED = re.compile(r"[A-Za-z0-9._*-]*")
"""Values both encoders leave as they are (most values: ids, dates without offsets...)."""


def canonical(pairs: Sequence[tuple[str, str]], *, java: bool) -> bytes:
    """The text CloudStack signs: every parameter but ``signature``, sorted by name (as
    Java sorts strings; names are ASCII, where that is Python's order too),
    ``name=value`` with the value URL-encoded, joined with ``&``, lower-cased. ``java``
    encodes as java.net.URLEncoder does (``~`` as ``%7E``), otherwise as the ``cs``
    package does (``~`` kept): CloudStack accepts the first, its best-known client
    sends the second."""
    encoded = []
    for name, value in sorted(pairs):
        if name.lower() == "signature":
            continue
        if _UNRESERVED.fullmatch(value):
            encoded.append(f"{name}={value}")
            continue
        quoted = urllib.parse.quote(value, safe=_JAVA_SAFE)
        if java:
            quoted = quoted.replace("~", "%7E")
        encoded.append(f"{name}={quoted}")
    return "&".join(encoded).lower().encode("ascii")


def sign(pairs: Sequence[tuple[str, str]], *, secret: str, java: bool = False) -> str:
    """The signature of ``pairs`` under ``secret`` (base64 HMAC-SHA1)."""
    mac = hmac.new(secret.encode("utf-8"), canonical(pairs, java=java), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode("ascii")


EXPIRES_MAX_CHARS = 40
_EXPIRES = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(Z|[+-]\d\d:?\d\d)")


@functools.lru_cache(maxsize=1024)
def parse_expires(text: str) -> datetime.datetime:
    """``expires`` as CloudStack writes it (``2011-03-10T18:20:25-0800``; also with a
    ``+08:00`` or ``Z`` offset), or :class:`errors.Unauthenticated` (remembered: a client
    sends the same value for every request of a second)."""
    if len(text) <= EXPIRES_MAX_CHARS and _EXPIRES.fullmatch(text):
        try:
            return datetime.datetime.fromisoformat(text)
        except ValueError:
            pass
    raise errors.Unauthenticated("expires is not a date like 2011-03-10T18:20:25-0800")


def check_signature(params: Params, *, secret: str, now: datetime.datetime) -> None:
    """Raise :class:`errors.Unauthenticated` unless the request is signed with ``secret``
    and, with ``signatureVersion=3`` (or any ``expires``), not expired. Pure: no I/O."""
    given = params.get("signature")
    if not given:
        raise errors.Unauthenticated("the request is not signed (no signature parameter)")
    version = params.get("signatureversion")
    if version not in (None, "3"):
        raise errors.Unauthenticated(f"signatureVersion {names.shown(version)} is not supported")
    expires = params.get("expires")
    if version == "3" and expires is None:
        raise errors.Unauthenticated("signatureVersion 3 needs an expires parameter")
    try:
        mac = base64.b64decode(given, validate=True)
    except (binascii.Error, ValueError):
        raise errors.Unauthenticated(_BAD_SIGNATURE) from None
    key = secret.encode("utf-8")
    forms = [False, True] if any("~" in v for _, v in params.pairs) else [False]
    matched = False
    for java in forms:
        expected = hmac.new(key, canonical(params.pairs, java=java), hashlib.sha1).digest()
        matched |= hmac.compare_digest(mac, expected)
    if not matched:
        raise errors.Unauthenticated(_BAD_SIGNATURE)
    # After the signature: an expiry is believed only once it is known to be the caller's.
    if expires is not None and parse_expires(expires) <= now:
        raise errors.Unauthenticated("the request has expired (expires is in the past)")


_BAD_SIGNATURE = "unable to verify user credentials and/or request signature"


# --- answers ---------------------------------------------------------------------------

_XML_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,127}")


def _element(name: str) -> tuple[str, str]:
    """Opening and closing tags for a key: the key itself when it is a plain XML name,
    else a ``<property name="...">`` element carrying it escaped (a stored result's keys
    are data, never markup)."""
    if _XML_NAME.fullmatch(name) and not name.lower().startswith("xml"):
        return f"<{name}>", f"</{name}>"
    quoted = saxutils.quoteattr(xmlrpc.printable(name))
    return f"<property name={quoted}>", "</property>"


def _xml_value(name: str, value: Any, out: list[str], depth: int) -> None:
    if value is None:
        return
    if isinstance(value, list | tuple):
        # CloudStack's XML repeats the element for each item of a list.
        for item in value:
            _xml_value(name, item, out, depth + 1)
        return
    start, end = _element(name)
    out.append(start)
    if isinstance(value, dict):
        for key, inner in value.items():
            _xml_value(str(key), inner, out, depth + 1)
    elif isinstance(value, bool):
        out.append("true" if value else "false")
    else:
        out.append(saxutils.escape(xmlrpc.printable(str(value))))
    out.append(end)


def to_xml(root: str, value: Mapping[str, Any]) -> bytes:
    """``value`` as CloudStack's XML: ``<root cloud-stack-version="...">`` with one
    element per member, lists as repeated elements, nulls left out."""
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<{root} cloud-stack-version="{VERSION}">',
    ]
    for key, inner in value.items():
        _xml_value(key, inner, out, 1)
    out.append(f"</{root}>")
    return "".join(out).encode("utf-8")


_JSON = json.JSONEncoder(separators=(",", ":"), default=str)


def to_json(root: str, value: Mapping[str, Any]) -> bytes:
    return _JSON.encode({root: value}).encode("utf-8")


def clipped(value: Any, depth: int = 0) -> Any:
    """Stored data made safe to write: nesting beyond :data:`RESULT_DEPTH_MAX` becomes
    its JSON text, keys become strings."""
    if isinstance(value, dict | list | tuple) and depth >= RESULT_DEPTH_MAX:
        return _JSON.encode(value)
    if isinstance(value, dict):
        return {str(k): clipped(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clipped(v, depth + 1) for v in value]
    return value


def date(value: datetime.datetime) -> str:
    """A time as CloudStack writes it: ``2011-03-10T18:20:25-0800`` (here always UTC)."""
    return value.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S+0000")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Reply:
    """One answer, for the HTTP layer and its metrics."""

    status: int
    body: bytes
    content_type: str
    command: str
    """The served command's name, or ``unknown`` (a bounded metrics label)."""
    outcome: str
    """``ok`` or the error row's name."""
    error_text: str = ""
    """``errortext`` of an error answer (for the call log)."""


def encode(*, root: str, value: Mapping[str, Any], as_json: bool) -> bytes:
    return to_json(root, value) if as_json else to_xml(root, value)


def reply(*, body: bytes, as_json: bool, command: str) -> Reply:
    return Reply(
        status=200,
        body=body,
        content_type=JSON_TYPE if as_json else XML_TYPE,
        command=command,
        outcome="ok",
    )


def error_reply(exc: Exception, *, as_json: bool, command: str) -> Reply:
    """``errorresponse`` for ``exc``: ``errorcode`` is the HTTP status, ``cserrorcode``
    CloudStack's code for the kind of error, ``errortext`` the message."""
    fault = ERRORS.fault_for(exc)
    value: dict[str, Any] = {
        "uuidList": [],
        "errorcode": fault.code,
        "cserrorcode": cserrorcode(fault),
        "errortext": fault.message,
    }
    body = to_json("errorresponse", value) if as_json else to_xml("errorresponse", value)
    return Reply(
        status=fault.code,
        body=body,
        content_type=JSON_TYPE if as_json else XML_TYPE,
        command=command,
        outcome=fault.name,
        error_text=fault.message,
    )


# --- jobs ---------------------------------------------------------------------------

_FAILURE_CODE = 530
"""``jobresultcode`` of a failed job that has no ``errorCode`` of its own (CloudStack's
INTERNAL_ERROR, which its failed jobs carry too)."""


def job(entry: cache.OperationEntry, *, cmd: str) -> dict[str, Any]:
    """The job fields of an Operation, in the order CloudStack writes them."""
    status = entry.status
    jobstatus = states.legacy(entry.state, DIALECT)
    annotations = entry.metadata.get("annotations") or {}
    out: dict[str, Any] = {
        "jobid": entry.id,
        "accountid": entry.namespace,
        "userid": str(annotations.get(cache.CREATED_BY_USER_ANNOTATION) or ""),
        "cmd": cmd,
        "jobstatus": jobstatus,
        "jobprocstatus": _int(status.get("progress")),
        "jobresultcode": 0,
    }
    if entry.state is states.State.SUCCEEDED:
        result = status.get("result")
        out["jobresulttype"] = "object"
        out["jobresult"] = clipped(result) if isinstance(result, dict) else {}
    elif states.is_terminal(entry.state):
        out["jobresultcode"] = _int(status.get("errorCode")) or _FAILURE_CODE
        out["jobresulttype"] = "text"
        out["jobresult"] = _failure_text(entry)
    if entry.object_kind and entry.object_name:
        out["jobinstancetype"] = entry.object_kind
        out["jobinstanceid"] = entry.object_name
    else:
        out["jobinstancetype"] = "Operation"
        out["jobinstanceid"] = entry.id
    out["created"] = date(entry.date_created)
    finished = cache.parse_time(status.get("finishedAt"))
    if finished is not None and states.is_terminal(entry.state):
        out["completed"] = date(finished)
    return out


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return int(value)


def _failure_text(entry: cache.OperationEntry) -> str:
    info = entry.status.get("errorInfo")
    if isinstance(info, list) and info:
        return "; ".join(str(i) for i in info)
    return str(entry.status.get("message") or entry.state.value)


def parse_startdate(text: str) -> datetime.datetime:
    """``startdate`` of listAsyncJobs: ``2011-03-10``, ``2011-03-10 18:20:25`` or
    ``2011-03-10T18:20:25`` with an optional offset (``-0800``, ``+08:00``, ``Z``);
    without one, UTC."""
    if len(text) <= EXPIRES_MAX_CHARS:
        for pattern in ("%Y-%m-%d", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S"):
            for zone in ("", "%z"):
                try:
                    parsed = datetime.datetime.strptime(text, pattern + zone)
                except ValueError:
                    continue
                return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)
    raise BadParameter(
        f"startdate {names.shown(text)} is not a date like 2011-03-10 or 2011-03-10T18:20:25"
    )


def _positive(params: Params, name: str, *, default: int, high: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,10}", raw) or not 1 <= int(raw) <= high:
        raise BadParameter(f"{name} must be a whole number from 1 to {high}")
    return int(raw)


def job_id(params: Params) -> cache.OpId:
    """``jobid`` (also spelt ``jobId``): an operation id."""
    raw = params.get("jobid")
    if raw is None:
        raise BadParameter("missing parameter jobid")
    if not re.fullmatch(r"[0-9]{1,10}", raw):
        raise BadParameter(f"jobid {names.shown(raw)} is not a job id (a whole number)")
    return cache.OpId(names.int_id(int(raw), what="jobid"))


# --- the API ------------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class Call:
    """One request as the command handlers see it."""

    params: Params
    who: auth.Identity
    now: datetime.datetime
    name: str
    """The command as served (``queryAsyncJobResult``), whatever case it was sent in."""
    as_json: bool
    logged_result: Any = None

    @property
    def root(self) -> str:
        """The answer's root element or key: ``queryasyncjobresultresponse``."""
        return f"{self.name.lower()}response"


Handler = Callable[["Api", Call], Awaitable[Mapping[str, Any] | bytes]]
"""A command: its answer's value, or its answer already encoded (a kept job answer)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Command:
    """One served command: its handler, and what listApis says about it."""

    handler: Handler
    description: str
    is_async: bool
    params: tuple[tuple[str, str, bool, str], ...] = ()
    """(name, type, required, description) of each parameter listApis lists."""


class SecretSource:
    """The master key, as :class:`opkeeper.gateway.auth.SigningKey` gives it, remembered
    for whoever needs it without I/O (tests build client credentials from it)."""

    def __init__(self, key: auth.SigningKey) -> None:
        self._key = key
        self.loaded: bytes | None = None

    async def master(self) -> bytes:
        self.loaded = await self._key.key()
        return self.loaded

    async def reload(self) -> bytes | None:
        fresh = await self._key.reload()
        if fresh is not None:
            self.loaded = fresh
        return fresh


class Api:
    """``/client/api``: parse, authenticate, run the command, log it, answer."""

    def __init__(
        self,
        *,
        svc: service.Service,
        keyring: auth.KeyRing,
        master_key: auth.SigningKey,
        settings: Settings,
        on_log_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self.svc = svc
        self.keyring = keyring
        self.secrets = SecretSource(master_key)
        self.settings = settings
        self.on_log_failure = on_log_failure
        self.commands: dict[str, tuple[str, Command]] = {
            name.lower(): (name, command) for name, command in BUILTIN.items()
        }
        for name, type_ in settings.commands.items():
            # Checked here too (not only on the command line): a name becomes the answer's
            # root element, and a mapped command must not hide a served one.
            if not _COMMAND.fullmatch(name) or name.lower() in self.commands:
                raise ValueError(f"CloudStack command {name!r} cannot be mapped")
            self.commands[name.lower()] = (name, _async_command(type_))
        self._secret_keys: dict[auth.KeyHash, tuple[bytes, str]] = {}
        """Secret keys derived, with the master key they were derived with, for known keys
        only (bounded by the key ring)."""
        self._cmd_of_type: dict[str, str] = {}
        for name, type_ in settings.commands.items():
            self._cmd_of_type.setdefault(type_, name)

    def cmd_of(self, type_: str) -> str:
        """A job's ``cmd``: the first async command mapped to its type, else the type."""
        return self._cmd_of_type.get(type_, type_)

    async def handle(
        self,
        *,
        query: str,
        body: bytes | Exception,
        form: bool,
        address: str,
        now: datetime.datetime,
    ) -> Reply:
        """Answer one request; never raises."""
        try:
            if isinstance(body, Exception):
                raise body
            params = parse(query=query, body=body, form=form, settings=self.settings)
        except Exception as exc:
            # Parameters that do not parse may still have asked for JSON.
            as_json = "response=json" in query.lower() or (
                isinstance(body, bytes) and b"response=json" in body.lower()
            )
            return error_reply(exc, as_json=as_json, command="unknown")
        as_json = params.json
        try:
            who = await self.authenticate(params, now=now)
            command_name = params.get("command")
            if not command_name:
                raise BadParameter("missing parameter command")
            served = self.commands.get(command_name.lower())
            if served is None:
                raise UnknownCommand(
                    f"The given command {names.shown(command_name)} does not exist or it is"
                    " not available for user"
                )
        except Exception as exc:
            return error_reply(exc, as_json=as_json, command="unknown")
        name, command = served
        call = Call(params=params, who=who, now=now, name=name, as_json=as_json)
        try:
            value = await command.handler(self, call)
            if not isinstance(value, bytes):
                value = encode(root=call.root, value=value, as_json=as_json)
        except Exception as exc:
            answer = error_reply(exc, as_json=as_json, command=name)
            await self._log(call, address=address, error=answer)
            return answer
        await self._log(call, address=address, error=None)
        return reply(body=value, as_json=as_json, command=name)

    async def authenticate(self, params: Params, *, now: datetime.datetime) -> auth.Identity:
        """The caller behind ``apiKey``, once the signature (and expiry) checks out; one
        answer for an unknown key and a wrong signature, so keys cannot be probed."""
        apikey = params.get("apikey")
        if not apikey:
            raise errors.Unauthenticated("missing apiKey; sign requests with your API key pair")
        key_hash = key_hash_of(apikey)
        identity = self.keyring.by_hash(key_hash) if key_hash is not None else None
        if identity is None or key_hash is None:
            # The checks a known key gets, so the text never tells an unknown key apart.
            check_signature(params, secret="", now=now)
            raise errors.Unauthenticated(_BAD_SIGNATURE)
        master = await self.secrets.master()
        try:
            secret = self._secret_key(master=master, key_hash=key_hash)
            check_signature(params, secret=secret, now=now)
        except errors.Unauthenticated:
            # Another process may have created the master key after this one read its own
            # (re-read at most every 30 s, so forged signatures cost no API traffic).
            fresh = await self.secrets.reload()
            if fresh is None or fresh == master:
                raise
            check_signature(
                params, secret=self._secret_key(master=fresh, key_hash=key_hash), now=now
            )
        return identity

    def _secret_key(self, *, master: bytes, key_hash: auth.KeyHash) -> str:
        """A known key's secret key, derived once per master key."""
        kept = self._secret_keys.get(key_hash)
        if kept is not None and kept[0] == master:
            return kept[1]
        if len(self._secret_keys) > max(2 * len(self.keyring), 64):
            self._secret_keys.clear()  # revoked keys' entries: drop them all now and then
        secret = secret_key(master=master, key_hash=key_hash)
        self._secret_keys[key_hash] = (master, secret)
        return secret

    async def _log(self, call: Call, *, address: str, error: Reply | None) -> None:
        """Into the tenant's call log, with apiKey and signature redacted; a store failure
        never changes the answer (the call happened)."""
        # Flat string values: a name-by-name redaction, with the verdict per name kept.
        arguments = {
            k: calllog.REDACTED if _secret_name(k) else v
            for k, v in call.params.by_name.items()
            if k != "command"
        }
        exception = "" if error is None else f"{error.status}: {error.error_text}"
        await self.svc.call_log.record(
            on_failure=self.on_log_failure,
            tenant=call.who.tenant,
            method=call.name,
            args_json=_JSON.encode({"args": [], "kw": arguments}),
            # Results are the handlers' own summaries (ids, states, counts): no secrets.
            result_json="null" if error else _JSON.encode(call.logged_result),
            exception=exception,
            address=address,
            when=call.now,
            user=call.who.user_id,
        )


_secret_name = functools.lru_cache(maxsize=1024)(calllog.is_secret_name)
"""calllog's rule for secret-looking names, remembered per name (every call of a client
sends the same names)."""


# --- commands ---------------------------------------------------------------------------


_KEPT = "cloudstack_job"
"""Where a job's encoded answers are kept in :attr:`cache.OperationEntry.derived`."""


async def _query_async_job_result(api: Api, call: Call) -> bytes:
    """The job's answer, encoded once per entry version and format: like Gandi's details,
    it depends on the entry alone (``cmd`` comes from this process's fixed settings)."""
    entry = api.svc.operation(who=call.who, id_=job_id(call.params))
    kept: dict[bool, bytes] = entry.derived.setdefault(_KEPT, {})
    call.logged_result = {
        "jobid": entry.id,
        "jobstatus": states.legacy(entry.state, DIALECT),
    }
    body = kept.get(call.as_json)
    if body is None:
        value = job(entry, cmd=api.cmd_of(entry.type))
        body = kept[call.as_json] = encode(root=call.root, value=value, as_json=call.as_json)
    return body


async def _list_async_jobs(api: Api, call: Call) -> Mapping[str, Any]:
    page = _positive(call.params, "page", default=1, high=2**31 - 1)
    size = _positive(call.params, "pagesize", default=MAX_PAGE_SIZE, high=MAX_PAGE_SIZE)
    raw_start = call.params.get("startdate")
    start = parse_startdate(raw_start) if raw_start is not None else None
    ids = api.svc.job_ids(who=call.who, created_after=start)
    chosen = [api.svc.operation(who=call.who, id_=i) for i in ids[(page - 1) * size : page * size]]
    jobs = [job(e, cmd=api.cmd_of(e.type)) for e in chosen]
    call.logged_result = {"count": len(ids), "jobids": [j["jobid"] for j in jobs]}
    # CloudStack leaves an empty list out, and the count too when there is nothing at all.
    if not ids:
        return {}
    return {"count": len(ids), "asyncjobs": jobs} if jobs else {"count": len(ids)}


async def _list_apis(api: Api, call: Call) -> Mapping[str, Any]:
    wanted = call.params.get("name")
    listed = []
    for name, command in sorted(api.commands.values()):
        if wanted is not None and wanted.lower() != name.lower():
            continue
        listed.append(
            {
                "name": name,
                "description": command.description,
                "isasync": command.is_async,
                "related": "queryAsyncJobResult" if command.is_async else "",
                "since": "",
                "type": "",
                "params": [
                    {
                        "name": p_name,
                        "description": p_description,
                        "type": p_type,
                        "length": 255,
                        "required": required,
                    }
                    for p_name, p_type, required, p_description in command.params
                ],
                "response": (
                    [{"name": "jobid", "description": "the job to poll", "type": "long"}]
                    if command.is_async
                    else []
                ),
            }
        )
    call.logged_result = {"count": len(listed)}
    if not listed:
        return {}
    return {"count": len(listed), "api": listed}


def _async_command(type_: str) -> Command:
    async def submit(api: Api, call: Call) -> Mapping[str, Any]:
        id_ = int(
            await api.svc.create(
                who=call.who, type_=type_, params=call.params.arguments(), object_=None
            )
        )
        call.logged_result = {"jobid": id_, "id": id_}
        return {"jobid": id_, "id": id_}

    return Command(
        handler=submit,
        description=f"Creates an operation of type {type_}; poll it with queryAsyncJobResult",
        is_async=True,
    )


BUILTIN: Mapping[str, Command] = {
    "queryAsyncJobResult": Command(
        handler=_query_async_job_result,
        description="Retrieves the current status of an asynchronous job",
        is_async=False,
        params=(("jobid", "long", True, "the ID of the asynchronous job"),),
    ),
    "listAsyncJobs": Command(
        handler=_list_async_jobs,
        description="Lists all pending asynchronous jobs for the account",
        is_async=False,
        params=(
            ("startdate", "date", False, "jobs created at or after this date"),
            ("page", "integer", False, "the page, from 1"),
            ("pagesize", "integer", False, f"jobs per page (at most {MAX_PAGE_SIZE})"),
        ),
    ),
    "listApis": Command(
        handler=_list_apis,
        description="lists all available apis on the server",
        is_async=False,
        params=(("name", "string", False, "API name"),),
    ),
}
"""The commands served whatever the settings map."""
_BUILTIN = frozenset(name.lower() for name in BUILTIN)
