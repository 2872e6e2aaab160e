"""The BDOM dialect against the real API server and controller.

The seed's examples (6.2 to 6.7) are sent with ``curl`` and their answers
read with ``xmllint``, as BDOM's shell clients do; every filter combination,
the delete body variants, identity and errors, and a scheduled operation
that fires at its exec-date go through a small Python HTTP client
(tests/bdom_support.py). One gateway serves the module; each test has its
own namespace and starts the controller for it where states must move.
Nothing sleeps to synchronise: waits are conditions with timeouts.
"""

from __future__ import annotations

import datetime
import itertools
import pathlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest

from opkeeper import GROUP, VERSION
from opkeeper.gateway import service
from opkeeper.gateway.dialects import bdom
from tests.bdom_support import Client, create_body, delete_body, make_user_key, request
from tests.gateway_support import RunningGateway, module_gateway, other_namespace
from tests.helpers import Ops, controller_in_thread, wait_for

pytestmark = pytest.mark.cluster

EXECUTORS: dict[str, dict[str, Any]] = {
    "domain_noop": {"builtin": {"action": "noop"}},
    "domain_fail": {"builtin": {"action": "fail", "message": "refused by policy"}},
    "vm_sleep": {"builtin": {"action": "sleep", "seconds": 600}},
    "domain_delete": {"builtin": {"action": "noop"}},
}
"""Everything else (``domain_transfer-in``) is ``external``: it waits, PENDING_EXT."""

DATE = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")
STATUS_TAGS = ["date", "name", "object", "opcode", "status", "task_id", "user_id"]
SCHEDULED_TAGS = [
    "class",
    "exec-date",
    "name",
    "object",
    "opcode",
    "task_id",
    "time",
    "tld_id",
    "type",
]


@pytest.fixture(scope="module")
def gw(
    cluster: Any, api: kubernetes.client.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    with module_gateway(
        cluster=cluster,
        api=api,
        tmp_path_factory=tmp_path_factory,
        service=service.Settings(executors=EXECUTORS),
    ) as running:
        yield running


def _state_of(client: Client, task_id: int) -> str:
    reply = client.status(task_id)
    return reply.responses()[0]["status"] if reply.status == 200 else f"HTTP {reply.status}"


def _created_id(reply: Any) -> int:
    assert reply.status == 200, reply.body
    return int(reply.responses()[0]["task_id"])


# --- the seed's examples, with curl and xmllint ------------------------------------------


@pytest.fixture(scope="module")
def tools() -> None:
    for tool in ("curl", "xmllint"):
        if shutil.which(tool) is None:
            pytest.fail(
                f"{tool} is missing: `make clients` installs it (Debian curl, libxml2-utils)"
            )


class Curl:
    """curl as a BDOM shell script runs it; every answer checked with xmllint."""

    def __init__(self, *, gw: RunningGateway, client: Client, workdir: pathlib.Path) -> None:
        self.base = f"{gw.base}"
        self.client = client
        self.workdir = workdir
        self.count = 0

    def __call__(self, path: str, *, data: bytes | None = None) -> tuple[int, str, pathlib.Path]:
        """Status, content type and the body file of one request (``-d @file`` for data)."""
        self.count += 1
        out = self.workdir / f"answer-{self.count}.xml"
        args = ["curl", "-sS", "-u", f"{self.client.user_id}:{self.client.key}", "-o", str(out)]
        args += ["-w", "%{http_code} %{content_type}"]
        if data is not None:
            sent = self.workdir / f"request-{self.count}.xml"
            sent.write_bytes(data)
            args += ["-H", "Content-Type: text/xml", "--data-binary", f"@{sent}"]
        done = subprocess.run(
            [*args, self.base + path], capture_output=True, text=True, timeout=60, check=True
        )
        code, _, content_type = done.stdout.partition(" ")
        subprocess.run(["xmllint", "--noout", str(out)], check=True, timeout=30)
        return int(code), content_type, out


def xpath(file: pathlib.Path, expression: str) -> str:
    done = subprocess.run(
        ["xmllint", "--xpath", expression, str(file)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.stdout.strip()


def responses(file: pathlib.Path) -> list[list[tuple[str, str]]]:
    """Every ``<response>`` as its (tag, text) children in document order, as xmllint
    reads the file (``--noblanks`` and one element per line from ``--format``)."""
    formatted = subprocess.run(
        ["xmllint", "--noblanks", "--format", str(file)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    out: list[list[tuple[str, str]]] = []
    for line in formatted.splitlines():
        line = line.strip()
        if line == "<response>":
            out.append([])
        elif m := re.fullmatch(r"<([\w-]+)>(.*)</\1>", line):
            out[-1].append((m.group(1), m.group(2)))
    return out


def test_seed_examples_with_curl_and_xmllint(
    cluster: Any,
    api: kubernetes.client.ApiClient,
    namespace: str,
    gw: RunningGateway,
    tools: None,
    tmp_path: pathlib.Path,
) -> None:
    client = make_user_key(api, gw, tenant=namespace, user_id="13048")
    curl = Curl(gw=gw, client=client, workdir=tmp_path)
    with controller_in_thread(kubeconfig=cluster.kubeconfig, namespace=namespace):
        older = _created_id(client.create(opcode="transfer-in", name="examples-nic-domain.de"))
        newer = _created_id(client.create(opcode="transfer-in", name="nic-domain-example.de"))
        for id_ in (older, newer):
            wait_for(lambda i=id_: _state_of(client, i) == "PENDING_EXT", what=f"{id_} waits")

        def expected(id_: int, name: str) -> list[tuple[str, str]]:
            return [
                ("date", "DATE"),
                ("name", name),
                ("object", "domain"),
                ("opcode", "transfer-in"),
                ("status", "PENDING_EXT"),
                ("task_id", str(id_)),
                ("user_id", "13048"),
            ]

        def dated(found: list[list[tuple[str, str]]]) -> list[list[tuple[str, str]]]:
            for response in found:
                assert DATE.fullmatch(dict(response)["date"]), response
            return [[(t, "DATE" if t == "date" else v) for t, v in r] for r in found]

        both = [
            expected(older, "examples-nic-domain.de"),
            expected(newer, "nic-domain-example.de"),
        ]
        # Example 6.4: all tasks of the user.
        code, content_type, out = curl("/bdom/task/status/-/-/-/-/13048/")
        assert (code, content_type) == (200, "text/xml; charset=utf-8")
        assert xpath(out, "count(/multiresponse/response)") == "2"
        assert dated(responses(out)) == both
        # Example 6.5: one task.
        code, _, out = curl(f"/bdom/task/status/{newer}/-/-/-/13048/")
        assert code == 200
        assert xpath(out, "count(/response)") == "1"
        assert dated(responses(out)) == [both[1]]
        # Example 6.6: by domain (object and name).
        code, _, out = curl("/bdom/task/status/-/-/domain/nic-domain-example.de/13048/")
        assert code == 200
        assert xpath(out, "string(/response/task_id)") == str(newer)
        assert dated(responses(out)) == [both[1]]
        # Example 6.7: by status.
        code, _, out = curl("/bdom/task/status/-/PENDING_EXT/-/-/13048/")
        assert code == 200
        assert dated(responses(out)) == both

        # Example 6.2: scheduled deletes (exec-dates ahead, so they have not fired).
        first = _created_id(
            client.create(
                opcode="delete", name="nic-domain-example.de", exec_date="2040-01-17", tld_id=7
            )
        )
        second = _created_id(
            client.create(
                opcode="delete", name="examples-nic-domain.de", exec_date="2040-02-21", tld_id=7
            )
        )
        code, _, out = curl("/bdom/task/scheduled/-/-/-/-/13048/")
        assert code == 200
        assert xpath(out, "count(/multiresponse/response)") == "2"
        found = responses(out)
        assert [[t for t, _ in r] for r in found] == [SCHEDULED_TAGS, SCHEDULED_TAGS]
        for response, (id_, day, name) in zip(
            found,
            [
                (first, "2040-01-17", "nic-domain-example.de"),
                (second, "2040-02-21", "examples-nic-domain.de"),
            ],
            strict=True,
        ):
            values = dict(response)
            assert DATE.fullmatch(values.pop("time"))
            assert values == {
                "class": "RELAUNCH",
                "exec-date": day,
                "name": name,
                "object": "domain",
                "opcode": "delete",
                "task_id": str(id_),
                "tld_id": "7",
                "type": "COMPLEX",
            }
        # The controller kept the id the create answered with.
        custom = kubernetes.client.CustomObjectsApi(api)
        wait_for(
            lambda: (
                (
                    custom.get_namespaced_custom_object(
                        GROUP, VERSION, namespace, "scheduledtasks", f"stask-{first}"
                    ).get("status", {})
                ).get("id")
                == first
            ),
            what="the controller's status.id",
        )

        # Example 6.3: delete both, the seed's body; the XSD accepts it (xmllint agrees).
        body = delete_body(second, first)
        schema = tmp_path / "Task.xsd"
        schema.write_text(bdom.TASK_XSD)
        sent = tmp_path / "delete.xml"
        sent.write_bytes(body)
        subprocess.run(
            ["xmllint", "--noout", "--schema", str(schema), str(sent)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        code, _, out = curl("/bdom/task/delete/-/-/-/-/13048/", data=body)
        assert code == 200
        assert out.read_bytes().strip() == b"<response>delete ok</response>"
        # Read-your-writes: gone on the very next read.
        code, _, out = curl("/bdom/task/scheduled/-/-/-/-/13048/")
        assert code == 200
        assert xpath(out, "count(//response)") == "0"
        # An error is XML too, with a 4xx.
        code, content_type, out = curl("/bdom/task/status/999999999/-/-/-/13048/")
        assert (code, content_type) == (404, "text/xml; charset=utf-8")
        assert xpath(out, "string(/error/name)") == "not_found"


# --- every filter, alone and combined -------------------------------------------------


def test_every_filter_combination(
    cluster: Any, api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    client = make_user_key(api, gw, tenant=namespace, user_id="filters")
    ops = Ops(api, namespace)
    with controller_in_thread(kubeconfig=cluster.kubeconfig, namespace=namespace):
        waiting = _created_id(client.create(opcode="transfer-in", name="a.example"))
        done = _created_id(client.create(opcode="noop", name="b.example"))
        failed = _created_id(client.create(opcode="fail", name="a.example"))
        running = _created_id(client.create(opcode="sleep", object_="vm", name="vm1"))
        external = _created_id(client.create(opcode="transfer-in", name="c.example"))
        wait_for(lambda: _state_of(client, external) == "PENDING_EXT", what="external waits")
        # The registry refuses: the worker reports the external failure.
        ops.patch_status(f"op-{external}", {"errorCode": 7, "errorInfo": ["registry: no"]})
        # A dependent of the externally failed operation fails internally (the BDOM rule).
        ops.create(
            "dependent",
            {
                "type": "domain_update",
                "object": {"kind": "domain", "name": "d.example"},
                "executor": {"external": {}},
                "dependsOn": [f"op-{external}"],
            },
        )
        dependent = int(ops.wait_state("dependent", "FailedInternal")["id"])
        assert ops.status("dependent")["reason"] == "DependencyFailed"
        truth = {
            waiting: ("PENDING_EXT", "domain", "a.example", "transfer-in"),
            done: ("SUCCESS", "domain", "b.example", "noop"),
            failed: ("FAILED_INT", "domain", "a.example", "fail"),
            running: ("PENDING_INT", "vm", "vm1", "sleep"),
            external: ("FAILED_EXT", "domain", "c.example", "transfer-in"),
            dependent: ("FAILED_INT", "domain", "d.example", "update"),
        }
        for id_, (word, *_) in truth.items():
            wait_for(lambda i=id_, w=word: _state_of(client, i) == w, what=f"{id_} is {word}")

    unknown = max(truth) + 10_000
    checked = 0
    for task, status, obj in itertools.product(
        ["-", *truth, unknown],
        ["-", "SUCCESS", "PENDING_INT", "PENDING_EXT", "FAILED_INT", "FAILED_EXT"],
        ["-", "domain", "vm", "host"],
    ):
        for name in ["-"] if obj == "-" else ["-", "a.example", "b.example", "vm1", "x.example"]:
            reply = client.status(task, status, obj, name)
            checked += 1
            where = f"status/{task}/{status}/{obj}/{name}"
            assert reply.headers["content-type"] == "text/xml; charset=utf-8", where
            if task == unknown:
                assert reply.status == 404, where
                continue
            expected = sorted(
                id_
                for id_, (word, kind, object_name, _) in truth.items()
                if task in ("-", id_)
                and status in ("-", word)
                and obj in ("-", kind)
                and name in ("-", object_name)
            )
            assert reply.status == 200, (where, reply.body)
            root = reply.xml.tag
            assert root == ("response" if len(expected) == 1 else "multiresponse"), where
            found = reply.responses()
            assert [int(r["task_id"]) for r in found] == expected, where
            assert reply.tags() == [STATUS_TAGS] * len(expected), where
            for r in found:
                word, kind, object_name, opcode = truth[int(r["task_id"])]
                assert (r["status"], r["object"], r["name"], r["opcode"]) == (
                    word,
                    kind,
                    object_name,
                    opcode,
                ), where
                assert r["user_id"] == "filters", where
                assert DATE.fullmatch(r["date"]), where
    assert checked > 500
    # NAME only with OBJECT (the seed's rule).
    reply = client.status("-", "-", "-", "a.example")
    assert reply.status == 400
    assert b"NAME needs OBJECT" in reply.body


# --- delete: every body variant ---------------------------------------------------------------


def _scheduled_ids(client: Client) -> list[int]:
    reply = client.scheduled()
    assert reply.status == 200, reply.body
    return [int(r["task_id"]) for r in reply.responses()]


def _objects(api: kubernetes.client.ApiClient, namespace: str) -> set[tuple[str, str]]:
    custom = kubernetes.client.CustomObjectsApi(api)
    found: set[tuple[str, str]] = set()
    for plural in ("operations", "scheduledtasks"):
        listed: Any = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)
        found |= {(plural, item["metadata"]["name"]) for item in listed["items"]}
    return found


def test_delete_body_variants(
    cluster: Any, api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    client = make_user_key(api, gw, tenant=namespace, user_id="deleter")
    other_ns = other_namespace(api, prefix="bdom-other")
    other = make_user_key(api, gw, tenant=other_ns, user_id="other")
    ahead = "2040-06-01"
    tasks = [
        _created_id(client.create(opcode="delete", name=f"t{i}.example", exec_date=ahead))
        for i in range(4)
    ]
    foreign = _created_id(other.create(opcode="delete", name="t0.example", exec_date=ahead))
    waiting = _created_id(client.create(opcode="transfer-in", name="w.example"))
    assert _scheduled_ids(client) == tasks
    before, others_before = _objects(api, namespace), _objects(api, other_ns)

    def unchanged(reply: Any, status: int, text: bytes) -> None:
        assert reply.status == status, reply.body
        assert text in reply.body, reply.body
        assert reply.headers["content-type"] == "text/xml; charset=utf-8"
        assert _objects(api, namespace) == before
        assert _objects(api, other_ns) == others_before
        assert _scheduled_ids(client) == tasks

    # Invalid against Task.xsd: nothing deleted, a 400 naming the problem.
    for body in (
        b"<request><delete><task_id>abc</task_id></delete></request>",
        b"<request><delete/></request>",
        b"<request><remove><task_id>1</task_id></remove></request>",
        b"<request><delete><task_id>1</task_id></delete><delete/></request>",
        f"<request><delete><task_id>{tasks[0]}</task_id><x/></delete></request>".encode(),
        b"<request><delete><task_id>99999999999</task_id></delete></request>",
        b"<response>delete ok</response>",
    ):
        unchanged(client.delete(body), 400, b"Task.xsd")
    # An empty request is valid XML for the XSD, but deletes nothing: a clear 400 too.
    unchanged(client.delete(b"<request/>"), 400, b"no &lt;delete&gt;")
    unchanged(client.delete(delete_body(0)), 400, b"out of range")
    unchanged(client.delete(b"<request><delete>"), 400, b"not well-formed")
    unchanged(client.delete(b""), 400, b"no body")
    entity = (
        b'<!DOCTYPE r [<!ENTITY e "x">]><request><delete><task_id>&e;</task_id></delete></request>'
    )
    unchanged(client.delete(entity), 400, b"DTDs")
    unchanged(client.delete(b"<request>" + b"<a>" * 20 + b"</request>"), 400, b"deeper")
    unchanged(client.delete(b"<request>" + b" " * (70 * 1024) + b"</request>"), 413, b"larger")
    # Unknown and foreign ids: 404 naming the id; the valid ids beside them stay.
    unknown = max(tasks) + 100_000
    unchanged(client.delete(delete_body(tasks[0], unknown)), 404, f"task {unknown}".encode())
    unchanged(client.delete(delete_body(tasks[1], foreign)), 404, f"task {foreign}".encode())
    # An operation that has not finished: refused (cancel it first), nothing deleted.
    unchanged(client.delete(delete_body(tasks[0], waiting)), 409, b"cancel it first")

    # Valid: two tasks, one of them twice (a repeated id counts once).
    reply = client.delete(delete_body(tasks[0], tasks[1], tasks[0]))
    assert (reply.status, reply.body) == (200, b"<response>delete ok</response>\n")
    assert _scheduled_ids(client) == tasks[2:]  # read-your-writes
    assert ("scheduledtasks", f"stask-{tasks[0]}") not in _objects(api, namespace)
    assert _scheduled_ids(other) == [foreign]
    # The same ids again: they are unknown now.
    assert client.delete(delete_body(tasks[0])).status == 404

    # A finished operation is a record: deleting it removes it from status.
    ops = Ops(api, namespace)
    with controller_in_thread(kubeconfig=cluster.kubeconfig, namespace=namespace):
        wait_for(lambda: _state_of(client, waiting) == "PENDING_EXT", what="armed")
        ops.patch_status(f"op-{waiting}", {"errorCode": 3, "errorInfo": ["gone"]})
        wait_for(lambda: _state_of(client, waiting) == "FAILED_EXT", what="failed externally")
    reply = client.delete(delete_body(waiting, tasks[2]))
    assert reply.status == 200, reply.body
    assert client.status(waiting).status == 404
    assert _scheduled_ids(client) == tasks[3:]


# --- identity, paths and methods -------------------------------------------------------------


def test_identity_paths_and_methods(
    api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    client = make_user_key(api, gw, tenant=namespace, user_id="alice")
    mine = _created_id(client.create(opcode="transfer-in", name="mine.example"))
    port = gw.port

    def get(path: str, authorization: str | None = client.authorization) -> Any:
        return request(port, "GET", path, authorization=authorization)

    # 401 with a challenge: no credentials, another scheme, a wrong key, a malformed header.
    for authorization in (None, "Bearer x", "Basic !!!", f"Basic {'eA=='}"):
        reply = get("/bdom/task/status/-/-/-/-/alice/", authorization)
        assert reply.status == 401, authorization
        assert reply.headers["www-authenticate"].startswith("Basic realm=")
        assert reply.xml.findtext("name") == "unauthenticated"
    wrong = Client(port=port, user_id="alice", key="opk_not-a-key")
    assert wrong.status().status == 401
    # USER_ID: the key's own (or '-'); another user's is 403, whatever the key.
    assert get("/bdom/task/status/-/-/-/-/-/").responses()[0]["task_id"] == str(mine)
    assert get("/bdom/task/status/-/-/-/-/-/").responses()[0]["user_id"] == "alice"
    reply = get("/bdom/task/status/-/-/-/-/bob/")
    assert reply.status == 403
    assert reply.xml.findtext("name") == "forbidden"
    # Unknown opcode 404; malformed paths 400; wrong method 405 with Allow.
    assert get("/bdom/task/frobnicate/-/-/-/-/alice/").status == 404
    for path in (
        "/bdom/task/status/-/-/-/alice/",  # a segment short
        "/bdom/task/status/-/-/-/-/alice/extra/",
        "/bdom/task/status/abc/-/-/-/alice/",
        "/bdom/task/status/0/-/-/-/alice/",
        "/bdom/task/status/-/DONE/-/-/alice/",
        "/bdom/task/status/-/-/domain/Mine.Example/alice/",
        "/bdom/task/status/-/-/domain/a%2Fb/alice/",
        "/bdom/task/status/-/-/-/-/al%2Fice/",
        "/bdom/task/status/-/-/%2e%2e/-/alice/",
        "/bdom/task/status/-/-/../-/alice/",
        "/bdom/task/status/../../../../../alice/",
        "/bdom/task/status/-/-/domain/a%0Ab/alice/",
        "/bdom/task/status//-/-/-/alice/",
        "/bdom/task/status/-/-/-/-/" + "a" * 300 + "/",
        "/bdom/task/scheduled/-/SUCCESS/-/-/alice/",
        "/bdom/task/delete/1/-/-/-/alice/",
        "/bdom/task/status/-/-/-/-/%ff/",
    ):
        reply = get(path)
        assert reply.status == 400, (path, reply.status, reply.body)
        assert reply.xml.tag == "error"
    reply = get("/bdom/task/delete/-/-/-/-/alice/")
    assert (reply.status, reply.headers["allow"]) == (405, "POST")
    reply = request(
        port,
        "POST",
        "/bdom/task/status/-/-/-/-/alice/",
        authorization=client.authorization,
        body=b"",
    )
    assert (reply.status, reply.headers["allow"]) == (405, "GET")
    # The query string is not part of the path.
    assert get("/bdom/task/status/-/-/-/-/alice/?x=1").status == 200


def test_create_bodies(
    api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    client = make_user_key(api, gw, tenant=namespace, user_id="creator")
    ops = Ops(api, namespace)
    made = _created_id(
        client.create(opcode="transfer-in", name="p.example", params={"auth_code": "xyz"})
    )
    # The call is in the tenant's call log (gocept's log shows it), its secret redacted.
    [entry] = [e for e in gw.gocept(client.key).log() if e["method"] == "bdom.create"]
    assert '"auth_code":"<redacted>"' in entry["args"]
    assert "xyz" not in entry["args"]
    assert entry["result"] == str(made)
    assert entry["exception"] == ""
    spec = ops.get(f"op-{made}")["spec"]
    # The executor comes from the gateway's policy, never from the caller.
    assert spec["executor"] == {"external": {}}
    assert spec["type"] == "domain_transfer-in"
    assert spec["params"] == {"auth_code": "xyz"}
    smuggled = create_body(opcode="noop", name="q.example", params={"executor": "job"})
    assert ops.get(
        f"op-{_created_id(client.post('/bdom/task/create/-/-/-/-/creator/', smuggled))}"
    )["spec"]["executor"] == {"builtin": {"action": "noop"}}
    # A scheduled one too: its template gets the policy's executor, its labels class/type.
    later = _created_id(
        client.create(
            opcode="noop", name="r.example", exec_date="2040-01-01", type="SIMPLE", tld_id=9
        )
    )
    task = kubernetes.client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, "scheduledtasks", f"stask-{later}"
    )
    assert task["spec"]["execAt"] == "2040-01-01T00:00:00Z"
    assert task["spec"]["template"]["spec"]["executor"] == {"builtin": {"action": "noop"}}
    assert task["spec"]["template"]["spec"]["params"] == {"tld_id": 9}
    assert task["metadata"]["labels"][bdom.LABEL_TYPE] == "SIMPLE"
    [listed] = client.scheduled().responses()
    assert (listed["type"], listed["class"], listed["tld_id"]) == ("SIMPLE", "RELAUNCH", "9")
    for body, text in (
        (create_body(opcode="Bad Opcode", name="x.example"), b"TaskCreate.xsd"),
        (create_body(opcode="noop", name="Not_A_Domain"), b"not a valid name"),
        (create_body(opcode="noop", name="x.example", exec_date="2030-13-01"), b"not a date"),
        (create_body(opcode="noop", name="x.example", exec_date="tomorrow"), b"TaskCreate.xsd"),
        (create_body(opcode="noop", name="x.example", **{"class": "RELAUNCH"}), b"exec-date"),
        (b"<request/>", b"TaskCreate.xsd"),
        (
            b"<request><create><opcode>a</opcode><object>domain</object><name>x.example</name>"
            b'<params><param name="k">1</param><param name="k">2</param></params>'
            b"</create></request>",
            b"twice",
        ),
    ):
        reply = client.post("/bdom/task/create/-/-/-/-/creator/", body)
        assert reply.status == 400, (body, reply.body)
        assert text in reply.body, (body, reply.body)
    reply = client.post(
        "/bdom/task/create/-/-/domain/-/creator/", create_body(opcode="a", name="x.example")
    )
    refused = gw.gocept(client.key).log()[-1]
    assert refused["method"] == "bdom.create"
    assert refused["exception"].startswith("400: create takes '-' for OBJECT")
    assert reply.status == 400
    assert b"takes '-' for OBJECT" in reply.body


# --- a scheduled operation fires at its exec-date ------------------------------------------


def test_scheduled_operation_fires_at_its_exec_date_and_leaves_the_list(
    cluster: Any, api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    client = make_user_key(api, gw, tenant=namespace, user_id="scheduler")
    with controller_in_thread(kubeconfig=cluster.kubeconfig, namespace=namespace):
        # Whole seconds (the exec-date's precision), two to three seconds ahead.
        at = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(
            seconds=3
        )
        reply = client.create(
            opcode="delete", name="soon.example", exec_date=at.strftime("%Y-%m-%d %H:%M:%S")
        )
        task = _created_id(reply)
        assert reply.responses()[0]["exec-date"] == at.strftime("%Y-%m-%d")
        assert _scheduled_ids(client) == [task]  # read-your-writes: listed at once
        assert client.status().responses() == []  # nothing has run yet

        def fired() -> list[dict[str, str]]:
            found = client.status("-", "SUCCESS", "domain", "soon.example")
            return found.responses() if found.status == 200 else []

        [run] = wait_for(fired, timeout=30, what="the scheduled delete to run")
        assert run["opcode"] == "delete"
        assert int(run["task_id"]) != task
        ran_at = datetime.datetime.strptime(run["date"], "%Y-%m-%d %H:%M:%S").replace(
            tzinfo=datetime.UTC
        )
        assert ran_at >= at  # not before its exec-date
        assert _scheduled_ids(client) == []


def test_the_controller_keeps_only_a_sealed_task_id(
    cluster: Any, api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    """A ScheduledTask's id label is believed only with the gateway's seal: a tenant who
    labels a task with someone else's id gets a fresh id from the controller."""
    client = make_user_key(api, gw, tenant=namespace, user_id="sealer")
    sealed = _created_id(client.create(opcode="delete", name="s.example", exec_date="2040-01-01"))
    custom = kubernetes.client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "scheduledtasks",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ScheduledTask",
            "metadata": {"name": "forged", "labels": {"opkeeper.dev/id": str(sealed)}},
            "spec": {
                "execAt": "2040-01-01T00:00:00Z",
                "template": {"spec": {"type": "domain_delete", "executor": {"external": {}}}},
            },
        },
    )

    def status_id(name: str) -> int | None:
        status = custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, "scheduledtasks", name
        ).get("status", {})
        return status.get("id")

    with controller_in_thread(kubeconfig=cluster.kubeconfig, namespace=namespace):
        wait_for(lambda: status_id(f"stask-{sealed}") == sealed, what="the sealed id kept")
        forged = wait_for(lambda: status_id("forged"), what="the forged task's own id")
    assert forged != sealed
    # The gateway serves the sealed task under its id, never the forged copy.
    assert _scheduled_ids(client) == sorted([sealed, forged])
