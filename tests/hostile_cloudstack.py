"""The CloudStack dialect's adapter for the hostile-input suite (tests/hostile.py).

Calls go through the real ``cs`` client (which signs them); raw bodies are
form POSTs to ``/client/api``. Everything on this wire is a string, so a
hostile id is sent as its text (``True`` as ``true``, ``1.5`` as ``1.5``),
as ``cs`` writes it. Errors are classified by ``errorcode`` (which must equal
the HTTP status); CloudStack reports an unknown job as a parameter error
(431), so the error text tells not-found from other parameter errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import urllib.parse
import uuid
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import cs
import kubernetes
import requests
from hypothesis import strategies as st

from opkeeper import GROUP, VERSION, errors
from opkeeper.gateway import xmlrpc as codec
from opkeeper.gateway.dialects import cloudstack
from tests.cloudstack_support import Pair, pair
from tests.hostile import (
    OPERATION_STATES,
    OPERATION_TYPE,
    Answer,
    DialectAdapter,
    ErrorClass,
    MatrixCase,
    Probe,
    RawReply,
    RawRequest,
    StoreProbe,
    Tenant,
    World,
    expect_ok_or_errors,
)

ASYNC_COMMAND = "deployVirtualMachine"
COMMANDS = {ASYNC_COMMAND: OPERATION_TYPE}
"""What the hostile suite's gateway serves as async commands (its ``cloudstack`` setting)."""

_CLASSES: Mapping[int, ErrorClass] = {
    401: "unauthenticated",
    413: "too_large",
    431: "bad_argument",
    432: "unknown_method",
    531: "forbidden",
}
_PARAM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\[\]-]{0,127}")
"""CloudStack-style parameter names (``zoneid``, ``details[0].key``): a hostile name that
is one of these is a legitimate parameter and would create an operation, so it is not
sent. Independent of the code under test on purpose."""


def _error(status: int, error: object) -> Answer:
    if not isinstance(error, dict):
        return Answer(outcome="broken", code=f"HTTP {status}", text=f"not an error: {error!r}")
    code, text = error.get("errorcode"), error.get("errortext")
    if code != status or not isinstance(text, str) or not isinstance(error.get("cserrorcode"), int):
        return Answer(outcome="broken", code=f"HTTP {status}", text=f"malformed error {error!r}")
    kind: ErrorClass = _CLASSES.get(status, "server")
    if status == 431 and "not found" in text:
        kind = "not_found"
    return Answer(outcome="error", error=kind, code=str(status), text=text)


def _wire(value: object) -> object:
    """A value as ``cs`` can send it: its own types as they are, anything else as text."""
    if isinstance(value, str | bool | int | float | list | tuple | dict) or value is None:
        return value
    return str(value)


@dataclasses.dataclass(kw_only=True)
class CsClient:
    get: cs.CloudStack
    post: cs.CloudStack
    """For values too large for a query string (over 8 KiB the HTTP layer refuses the
    request line, as CloudStack's Tomcat does)."""

    def call(self, command: str, *, by_post: bool = False, **params: object) -> Answer:
        client = self.post if by_post else self.get
        try:
            value = getattr(client, command)(**{k: _wire(v) for k, v in params.items()})
        except cs.CloudStackApiException as exc:
            return _error(exc.response.status_code, exc.error)
        except (cs.CloudStackException, requests.RequestException, ValueError) as exc:
            return Answer(outcome="broken", text=repr(exc))
        return Answer(outcome="ok", value=value)


def _ids(value: object) -> set[object]:
    found: set[object] = set()
    if isinstance(value, dict):
        for key, inner in value.items():
            if key in ("jobid", "id", "jobinstanceid"):
                found.add(inner)
            found |= _ids(inner)
    elif isinstance(value, list):
        for inner in value:
            found |= _ids(inner)
    return found


def _victim_jobs(c: CsClient, w: World) -> list[Answer]:
    return [
        *(c.call("queryAsyncJobResult", jobid=i) for i in w.victim.ids.values()),
        *(c.call("queryAsyncJobResult", jobId=i) for i in w.victim.ids.values()),
    ]


def _lists(c: CsClient, w: World) -> list[Answer]:
    return [
        c.call("listAsyncJobs"),
        c.call("listAsyncJobs", page=1, pagesize=500),
        c.call("listAsyncJobs", page=2, pagesize=1),
        c.call("listAsyncJobs", startdate="2000-01-01"),
    ]


def _expect_own_jobs(answers: list[Answer], w: World) -> list[str]:
    problems = expect_ok_or_errors()(answers, w)
    own = {w.attacker.ids[name] for name in OPERATION_STATES}
    first = answers[0]
    if first.outcome != "ok" or not own <= _ids(first.value):
        problems.append(f"the attacker's own jobs {sorted(own)} missing from {first.describe()}")
    return problems


def _apis(c: CsClient, w: World) -> list[Answer]:
    return [c.call("listApis"), c.call("listApis", name="queryAsyncJobResult")]


def _submit(c: CsClient, w: World) -> list[Answer]:
    return [c.call(ASYNC_COMMAND, marker=w.attacker.marker, jobid=w.victim.ids["victim"])]


def _expect_created_in_own_namespace(answers: list[Answer], w: World) -> list[str]:
    [answer] = answers
    if answer.outcome != "ok" or not isinstance(answer.value.get("jobid"), int):
        return [f"expected a job id, got {answer.describe()}"]
    custom = kubernetes.client.CustomObjectsApi(w.api)
    obj: Any = custom.get_namespaced_custom_object(
        GROUP, VERSION, w.attacker.namespace, "operations", f"op-{answer.value['jobid']}"
    )
    if obj["spec"]["params"].get("marker") != w.attacker.marker:
        return [f"the new job in the attacker's namespace has {obj['spec']['params']}"]
    return []


def _expect_not_found(answers: list[Answer], w: World) -> list[str]:
    return [
        f"answer {i}: expected not found, got {a.describe()}"
        for i, a in enumerate(answers)
        if not (a.outcome == "error" and a.error == "not_found")
    ]


class CloudStackAdapter(DialectAdapter[CsClient]):
    """CloudStack: signed GETs through ``cs``; form POSTs for raw bodies."""

    name = "cloudstack"
    methods: ClassVar[tuple[str, ...]] = (
        "queryAsyncJobResult",
        "listAsyncJobs",
        "listApis",
        ASYNC_COMMAND,
    )
    endpoint = "/client/api"
    commands: ClassVar[Mapping[str, str]] = COMMANDS
    """The async commands its gateway must serve (the `cloudstack` setting)."""

    def pair(self, tenant: Tenant) -> Pair:
        return pair(self.gateway, tenant.key)

    def client(self, tenant: Tenant) -> CsClient:
        creds = self.pair(tenant)
        return CsClient(
            **{
                method: cs.CloudStack(
                    endpoint=f"{self.gateway.base}{self.endpoint}",
                    key=creds.api_key,
                    secret=creds.secret,
                    timeout=30,
                    method=method,
                )
                for method in ("get", "post")
            }
        )

    @classmethod
    def probes(cls) -> Sequence[Probe[CsClient]]:
        def digits(value: object) -> bool:
            # An id's text is a fair question (the caller's own id answers); ints cover it.
            return isinstance(value, str) and value.isdigit()

        return [
            Probe(
                method="queryAsyncJobResult",
                what="jobid",
                run=lambda c, v: c.call("queryAsyncJobResult", jobid=v),
                skip=digits,
            ),
            Probe(
                method="queryAsyncJobResult",
                what="jobId",
                run=lambda c, v: c.call("queryAsyncJobResult", jobId=v),
                skip=digits,
            ),
            Probe(
                method="listAsyncJobs",
                what="startdate",
                run=lambda c, v: c.call("listAsyncJobs", startdate=v),
                search=True,
            ),
            Probe(
                method="listAsyncJobs",
                what="page",
                run=lambda c, v: c.call("listAsyncJobs", page=v, pagesize=1),
                # Any page from 1 up is a fair question (past the end it lists nothing).
                skip=lambda v: (
                    (isinstance(v, int) and not isinstance(v, bool) and v >= 1)
                    or (isinstance(v, str) and v.isdigit() and int(v) >= 1)
                ),
            ),
            Probe(
                method="listApis",
                what="name",
                run=lambda c, v: c.call("listApis", name=v),
                search=True,
            ),
            Probe(
                method=ASYNC_COMMAND,
                what="parameter name",
                run=lambda c, v: c.call(ASYNC_COMMAND, **{str(v): "x"}),
                skip=lambda v: not isinstance(v, str) or bool(_PARAM_NAME.fullmatch(v)),
            ),
        ]

    @classmethod
    def store_probes(cls) -> Sequence[StoreProbe[CsClient]]:
        def submitted(c: CsClient, t: Tenant, v: object) -> list[Answer]:
            made = c.call(ASYNC_COMMAND, by_post=True, v=v, name=f"free-{uuid.uuid4().hex[:8]}")
            if made.outcome != "ok":
                return [made]
            jobid = made.value["jobid"]
            return [
                made,
                c.call("queryAsyncJobResult", jobid=jobid),
                c.call("listAsyncJobs", pagesize=5),
            ]

        return [StoreProbe(method=ASYNC_COMMAND, what="parameter value", run=submitted)]

    @classmethod
    def matrix(cls) -> Sequence[MatrixCase[CsClient]]:
        return [
            MatrixCase(
                method="queryAsyncJobResult",
                what="victim ids",
                writes=False,
                run=_victim_jobs,
                expect=_expect_not_found,
            ),
            MatrixCase(
                method="listAsyncJobs",
                what="every page",
                writes=False,
                run=_lists,
                expect=_expect_own_jobs,
            ),
            MatrixCase(
                method="listApis",
                what="all and by name",
                writes=False,
                run=_apis,
                expect=expect_ok_or_errors(),
            ),
            MatrixCase(
                method=ASYNC_COMMAND,
                what="naming the victim's job",
                writes=True,
                run=_submit,
                expect=_expect_created_in_own_namespace,
            ),
        ]

    def foreign_ids(self, answer: Answer, victim: Tenant) -> set[object]:
        if answer.outcome != "ok":
            return set()
        return _ids(answer.value) & set(victim.ids.values())

    def raw_request(self, body: bytes, tenant: Tenant | None) -> RawRequest:
        # A CloudStack request authenticates inside its parameters: the body's own
        # business (the fuzz signs some of its bodies as the attacker).
        return RawRequest(
            path=self.endpoint,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            body=body,
        )

    def classify(self, reply: RawReply) -> Answer:
        if reply.error is not None:
            return Answer(outcome="broken", text=f"connection: {reply.error}")
        content_type = reply.headers.get("content-type", "")
        try:
            if content_type.startswith(cloudstack.JSON_TYPE):
                [(root, value)] = json.loads(reply.body).items()
            elif content_type.startswith(cloudstack.XML_TYPE):
                element = ElementTree.fromstring(reply.body)
                root = element.tag
                value = {child.tag: child.text for child in element}
                for key in ("errorcode", "cserrorcode"):
                    if key in value:
                        value[key] = int(value[key] or "")
            else:
                return Answer(outcome="broken", code=f"HTTP {reply.status}", text=content_type)
        except (ValueError, ElementTree.ParseError) as exc:
            return Answer(outcome="broken", code=f"HTTP {reply.status}", text=repr(exc))
        if reply.status == 200:
            return Answer(outcome="ok", value=value)
        if root != "errorresponse":
            return Answer(outcome="broken", text=f"error under {root!r}")
        return _error(reply.status, value)

    @classmethod
    def worst_case_bodies(cls) -> Mapping[str, Callable[[], bytes]]:
        limit = codec.DEFAULT_LIMITS.max_body_bytes
        room = limit - 1024
        head = b"command=listApis&response=json&"
        return {
            "value-1MiB": lambda: head + b"x=" + b"y" * room,
            "name-1MiB": lambda: head + b"n" * room + b"=1",
            "percent-escapes-1MiB": lambda: head + b"x=" + b"%41" * (room // 3),
            "invalid-utf8-1MiB": lambda: head + b"x=" + b"%ff" * (room // 3),
            "nul-escapes-1MiB": lambda: head + b"x=" + b"%00" * (room // 3),
            "100000-parameters": lambda: head + b"&".join(b"p%d=1" % i for i in range(100_000)),
            "repeated-parameter": lambda: head + b"&".join([b"a=1"] * (room // 4)),
            "ampersands-1MiB": lambda: head + b"&" * room,
            "equals-1MiB": lambda: head + b"=" * room,
            "not-ascii-1MiB": lambda: head + b"x=" + b"\xc3\xa9" * (room // 2),
            "value-over-the-size-limit": lambda: head + b"x=" + b"y" * (limit + 1),
        }

    @classmethod
    def body(cls, *, padding: int = 0) -> bytes:
        return b"command=listApis&response=json&x=" + b"y" * padding

    @classmethod
    def check_decoder(cls, body: bytes) -> None:
        """parse either gives parameters or refuses them as a parameter error; the error
        answer is well-formed XML and JSON; a parsed request's signature check only ever
        says unauthenticated."""
        settings = cloudstack.Settings()
        try:
            params = cloudstack.parse(query="", body=body, form=True, settings=settings)
        except errors.InvalidArgument as exc:
            for as_json in (False, True):
                reply = cloudstack.error_reply(exc, as_json=as_json, command="unknown")
                if reply.status != 431:
                    raise AssertionError(f"{exc!r} answered {reply.status}") from exc
                if as_json:
                    json.loads(reply.body)
                else:
                    ElementTree.fromstring(reply.body)
            return
        with contextlib.suppress(errors.Unauthenticated):
            cloudstack.check_signature(params, secret="s", now=_NOW)

    def fuzz_seeds(self, world: World) -> Sequence[tuple[str, tuple[Any, ...]]]:
        creds = self.pair(world.attacker)
        ids = world.attacker.ids
        base = {"apiKey": creds.api_key, "response": "json"}
        return [
            ("queryAsyncJobResult", ({**base, "jobid": str(ids["shared-done"])}, creds.secret)),
            ("queryAsyncJobResult", ({**base, "jobId": str(ids["shared-failed"])}, creds.secret)),
            ("listAsyncJobs", ({**base, "page": "1", "pagesize": "2"}, creds.secret)),
            ("listAsyncJobs", ({**base, "startdate": "2000-01-01"}, creds.secret)),
            ("listApis", ({**base}, creds.secret)),
            (ASYNC_COMMAND, ({**base, "zoneid": "1", "marker": "fuzz"}, creds.secret)),
        ]

    @classmethod
    def fuzz_bodies(cls, seeds: Sequence[tuple[str, tuple[Any, ...]]]) -> st.SearchStrategy[bytes]:
        return _fuzzed(seeds, cls.methods)


_NOW = cloudstack.parse_expires("2026-12-01T03:00:00+0000")
_FUZZ_TEXT = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", "0", "-1", "2147483648", "1e3", "true", "%", "%zz", "~", "a+b", "\x00"]),
)


@st.composite
def _fuzzed(
    draw: st.DrawFn, seeds: Sequence[tuple[str, tuple[Any, ...]]], methods: Sequence[str]
) -> bytes:
    """A seed's parameters with up to four changes (a value replaced, a parameter added,
    dropped or repeated, a name's case changed), then signed or not, then encoded, with
    up to two bytes inserted into the encoded body."""
    command, args = draw(st.sampled_from(list(seeds)))
    params: dict[str, str] = {}
    secret = "s"
    if len(args) == 2 and isinstance(args[0], dict) and isinstance(args[1], str):
        params, secret = dict(args[0]), args[1]
    params["command"] = draw(st.sampled_from([command, *methods, "noSuchCommand"]))
    pairs = list(params.items())
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        kind = draw(st.sampled_from(["value", "add", "drop", "repeat", "case"]))
        at = draw(st.integers(min_value=0, max_value=max(len(pairs) - 1, 0)))
        if kind == "value" and pairs:
            pairs[at] = (pairs[at][0], draw(_FUZZ_TEXT))
        elif kind == "add":
            pairs.append((draw(st.sampled_from(["x", "jobid", "JOBID", "page", "é", ""])),
                          draw(_FUZZ_TEXT)))  # fmt: skip
        elif kind == "drop" and pairs:
            del pairs[at]
        elif kind == "repeat" and pairs:
            pairs.append(pairs[at])
        elif kind == "case" and pairs:
            pairs[at] = (pairs[at][0].swapcase(), pairs[at][1])
    if draw(st.booleans()):
        # A name that is not ASCII cannot be signed: the body goes unsigned then.
        with contextlib.suppress(UnicodeEncodeError):
            pairs.append(("signature", cloudstack.sign(pairs, secret=secret)))
    body = bytearray(urllib.parse.urlencode(pairs).encode("ascii"))
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        at = draw(st.integers(min_value=0, max_value=len(body)))
        body[at:at] = draw(st.binary(min_size=1, max_size=3))
    return bytes(body)
