"""The CloudStack dialect, through the real ``cs`` client against the real API server.

Pure parts first (signing against ``cs``'s own signer, the error table and
docs/faults.md, XML writing, parameter limits), then one gateway for the
module with the controller running for the tests that need jobs to finish.
``cs`` does every signature of the client tests; raw requests cover the
edge cases no client sends. Nothing sleeps to synchronise: polls are
``tests.helpers.wait_for`` or ``cs``'s own ``fetch_result`` loop.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import json
import pathlib
import re
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from typing import Any

import cs
import kubernetes
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opkeeper import GROUP, VERSION, apikeys, errors, kube, names
from opkeeper.gateway import auth, service
from opkeeper.gateway import cli as gateway_cli
from opkeeper.gateway import xmlrpc as codec
from opkeeper.gateway.dialects import cloudstack
from tests.cloudstack_support import Pair, pair, signed_url
from tests.gateway_support import RunningGateway, make_key, module_gateway
from tests.helpers import controller_in_thread, wait_for

DOC = pathlib.Path(__file__).parent.parent / "docs" / "faults.md"
CREATED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+0000")

# --- pure: signatures -------------------------------------------------------------------


_SIGNER = cs.CloudStack(endpoint="http://127.0.0.1:1/client/api", key="k", secret="s")


def _cs_signature(params: dict[str, str], secret: str) -> str:
    _SIGNER.secret = secret
    data = dict(params)
    _SIGNER._sign(data)
    return str(data["signature"])


_VALUES = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=20
) | st.sampled_from(["a b", "a+b", "~x", "*", "a/b=c&d", "\u00e9t\u00e9", "\U0001f600", "%41"])


@settings(max_examples=200, deadline=None)
@given(
    params=st.dictionaries(st.from_regex(r"[A-Za-z][A-Za-z0-9]{0,8}", fullmatch=True), _VALUES),
    secret=st.text(min_size=1, max_size=10),
)
def test_our_signer_is_cs_signer(params: dict[str, str], secret: str) -> None:
    assert cloudstack.sign(list(params.items()), secret=secret) == _cs_signature(params, secret)


def _params(pairs: list[tuple[str, str]]) -> cloudstack.Params:
    query = urllib.parse.urlencode(pairs)
    return cloudstack.parse(query=query, body=b"", form=False, settings=cloudstack.Settings())


NOW = datetime.datetime(2026, 12, 1, 3, 0, tzinfo=datetime.UTC)


def test_signatures_cs_and_java_encodings_both_verify_and_nothing_else() -> None:
    base = [("command", "listApis"), ("apiKey", "k"), ("name", "a~b c*")]
    for java in (False, True):
        signature = cloudstack.sign(base, secret="s", java=java)
        cloudstack.check_signature(_params([*base, ("signature", signature)]), secret="s", now=NOW)
    signature = cloudstack.sign(base, secret="s")
    with pytest.raises(errors.Unauthenticated):
        cloudstack.check_signature(_params([*base, ("signature", signature)]), secret="t", now=NOW)
    changed = [*base[:2], ("name", "a~b c")]
    with pytest.raises(errors.Unauthenticated):
        cloudstack.check_signature(
            _params([*changed, ("signature", signature)]), secret="s", now=NOW
        )
    with pytest.raises(errors.Unauthenticated, match="not signed"):
        cloudstack.check_signature(_params(base), secret="s", now=NOW)
    with pytest.raises(errors.Unauthenticated):
        cloudstack.check_signature(_params([*base, ("signature", "!!")]), secret="s", now=NOW)


@pytest.mark.parametrize(
    ("extra", "ok"),
    [
        ([("signatureVersion", "3"), ("expires", "2026-12-01T03:10:00+0000")], True),
        ([("signatureVersion", "3"), ("expires", "2026-12-01T04:05:00+01:00")], True),
        ([("signatureVersion", "3"), ("expires", "2026-12-01T02:59:59+0000")], False),
        ([("signatureVersion", "3"), ("expires", "2026-12-01T03:30:00+0100")], False),
        ([("signatureVersion", "3")], False),
        ([("signatureVersion", "3"), ("expires", "tomorrow")], False),
        ([("signatureVersion", "2")], False),
        ([("expires", "2026-12-01T02:00:00+0000")], False),
    ],
)
def test_expiry(extra: list[tuple[str, str]], ok: bool) -> None:
    pairs = [("command", "listApis"), ("apiKey", "k"), *extra]
    params = _params([*pairs, ("signature", cloudstack.sign(pairs, secret="s"))])
    if ok:
        cloudstack.check_signature(params, secret="s", now=NOW)
    else:
        with pytest.raises(errors.Unauthenticated):
            cloudstack.check_signature(params, secret="s", now=NOW)


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("command=a&command=b", "more than once"),
        ("jobid=1&jobId=1", "more than once"),
        ("x=%ff", "not UTF-8"),
        ("x=%00", "control characters"),
        ("a%20b=1", "not a valid name"),
        ("%C3%A9=1", "not a valid name"),
        ("x=" + "y" * (cloudstack.DEFAULT_MAX_VALUE_CHARS + 1), "longer than"),
        ("&".join(f"p{i}=1" for i in range(101)), "more than 100"),
    ],
)
def test_hostile_parameters_are_refused(query: str, says: str) -> None:
    with pytest.raises(cloudstack.BadParameter, match=says):
        cloudstack.parse(query=query, body=b"", form=False, settings=cloudstack.Settings())


def test_a_non_form_body_is_refused() -> None:
    with pytest.raises(cloudstack.BadParameter, match="form"):
        cloudstack.parse(query="", body=b"<x/>", form=False, settings=cloudstack.Settings())


def test_api_keys_round_trip_and_only_the_canonical_spelling_names_a_key() -> None:
    key_hash = auth.hash_key(auth.new_key())
    api_key = cloudstack.api_key(key_hash)
    assert cloudstack.key_hash_of(api_key) == key_hash
    assert cloudstack.key_hash_of(api_key + "A") is None
    assert cloudstack.key_hash_of("!" * 43) is None
    assert cloudstack.key_hash_of(api_key[:-1] + ("B" if api_key[-1] == "A" else "A")) != key_hash
    one = cloudstack.secret_key(master=b"m" * 32, key_hash=key_hash)
    assert one == cloudstack.secret_key(master=b"m" * 32, key_hash=key_hash)
    assert one != cloudstack.secret_key(master=b"n" * 32, key_hash=key_hash)


def test_xml_never_takes_markup_from_data() -> None:
    body = cloudstack.to_xml(
        "queryasyncjobresultresponse",
        {
            "jobresult": {
                "<evil>": "x",
                "a b": [1, 2],
                "xmlns": "y",
                "ok": "</ok><injected/>",
                "flag": True,
                "none": None,
                "nul": "a\x00b",
            }
        },
    )
    root = ElementTree.fromstring(body)
    assert root.tag == "queryasyncjobresultresponse"
    assert root.get("cloud-stack-version") == cloudstack.VERSION
    result = root.find("jobresult")
    assert result is not None
    props = {p.get("name"): p.text for p in result.findall("property")}
    assert props["<evil>"] == "x"
    assert props["xmlns"] == "y"
    assert [p.text for p in result.findall("property") if p.get("name") == "a b"] == ["1", "2"]
    assert result.findtext("ok") == "</ok><injected/>"
    assert result.findtext("flag") == "true"
    assert result.find("none") is None
    assert result.findtext("nul") == "a\ufffdb"
    deep: Any = "leaf"
    for _ in range(200):
        deep = {"d": deep}
    ElementTree.fromstring(cloudstack.to_xml("r", {"jobresult": cloudstack.clipped(deep)}))


def test_error_table_and_docs_agree() -> None:
    section = DOC.read_text().split("# CloudStack error codes", 1)[1]
    # name first: the XML-RPC tables' test reads rows that start with a number.
    rows = re.findall(r"^\| ([a-z_]+) \| (\d+) \| (\d+) \|", section, flags=re.MULTILINE)
    documented = {name: (int(code), int(cs_code)) for name, code, cs_code in rows}
    in_code = {
        r.row.name: (r.row.code, r.cserrorcode)
        for r in (*cloudstack.ERROR_ROWS, cloudstack.INTERNAL)
    }
    assert documented == in_code
    assert cloudstack.ERRORS.row_for(errors.Unauthenticated()).code == 401
    assert cloudstack.ERRORS.row_for(cloudstack.BadParameter()).code == 431
    assert cloudstack.ERRORS.row_for(names.InvalidName("x", what="x", value=1)).code == 431
    assert cloudstack.ERRORS.row_for(cloudstack.UnknownCommand()).code == 432
    assert cloudstack.ERRORS.row_for(codec.BodyTooLarge()).code == 413
    assert cloudstack.ERRORS.row_for(RuntimeError()).code == 530


def test_command_settings_parse() -> None:
    assert cloudstack.commands_from(["deployVirtualMachine=vm_deploy"]) == {
        "deployVirtualMachine": "vm_deploy"
    }
    for bad in ("deployVirtualMachine", "=x", "a b=x", "queryAsyncJobResult=x"):
        with pytest.raises(ValueError, match="cloudstack-command"):
            cloudstack.commands_from([bad])
    with pytest.raises(ValueError, match="served already"):
        cloudstack.commands_from(["deployVm=a", "DEPLOYVM=b"])


@pytest.mark.parametrize("name", ["queryasyncjobresult", "listApis", "bad name", "x>y"])
def test_a_mapped_command_cannot_hide_a_served_one_or_break_the_xml(name: str) -> None:
    with pytest.raises(ValueError, match="cannot be mapped"):
        cloudstack.Api(
            svc=None,  # type: ignore[arg-type]  # refused before anything is used
            keyring=auth.KeyRing(settings=auth.KeyRingSettings()),
            master_key=auth.FixedKey(value=b"k"),
            settings=cloudstack.Settings(commands={name: "t"}),
        )


def test_the_gateway_command_line_maps_commands() -> None:
    parser = argparse.ArgumentParser()
    gateway_cli.add_arguments(parser)
    args = parser.parse_args(
        ["--cloudstack-command", "deployVirtualMachine=vm_deploy", "--cloudstack-command", "a=b"]
    )
    settings = gateway_cli.settings_from(args)
    assert settings.cloudstack.commands == {"deployVirtualMachine": "vm_deploy", "a": "b"}
    assert gateway_cli.settings_from(parser.parse_args([])).cloudstack.commands == {}


def test_new_key_json_and_snippet_carry_cloudstack_credentials() -> None:
    key = apikeys.NewKey(
        name="apikey-alice-0a1b2c",
        key_namespace="opkeeper-system",
        namespace="team-a",
        user_id="alice",
        api_key=auth.new_key(),
        cloudstack_secret="s3cret",
    )
    member = key.to_json()["cloudstack"]
    assert member == {
        "apiKey": cloudstack.api_key(auth.hash_key(key.api_key)),
        "secretKey": "s3cret",
    }
    text = key.text(url="http://gw.example:8480")
    assert "endpoint='http://gw.example:8480/client/api'" in text
    assert "secret='s3cret'" in text
    compile(text, "snippet", "exec")
    assert "s3cret" not in repr(key)


# --- against the real API server ------------------------------------------------------------

EXECUTORS: dict[str, dict[str, Any]] = {
    "cs_noop": {"builtin": {"action": "noop"}},
    "cs_fail": {"builtin": {"action": "fail", "message": "boom"}},
}
COMMANDS = {
    "deployVirtualMachine": "cs_noop",
    "destroyVirtualMachine": "cs_fail",
    "createSnapshot": "cs_external",
}


@pytest.fixture(scope="module")
def gw(
    cluster: Any, api: kubernetes.client.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    with module_gateway(
        cluster=cluster,
        api=api,
        tmp_path_factory=tmp_path_factory,
        service=service.Settings(executors=EXECUTORS),
        cloudstack=cloudstack.Settings(commands=COMMANDS),
    ) as running:
        yield running


def _client(gw: RunningGateway, creds: Pair, **options: Any) -> cs.CloudStack:
    return cs.CloudStack(
        endpoint=f"{gw.base}/client/api",
        key=creds.api_key,
        secret=creds.secret,
        poll_interval=0.05,
        job_timeout=60,
        **options,
    )


def _api_error(call: Any) -> cs.CloudStackApiException:
    with pytest.raises(cs.CloudStackApiException) as caught:
        call()
    return caught.value


@pytest.mark.cluster
def test_jobs_through_cs_with_the_controller(
    cluster: Any, api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    creds = pair(gw, make_key(api, gw, namespace))
    client = _client(gw, creds)
    with controller_in_thread(kubeconfig=cluster.kubeconfig, namespace=namespace):
        submitted = client.deployVirtualMachine(zoneId="1", serviceOfferingId="2", name="a b~c")
        assert set(submitted) == {"jobid", "id"}
        ok = submitted["jobid"]
        assert isinstance(ok, int)
        assert submitted["id"] == ok
        # Read-your-writes: the next query knows the job, whatever state it is in.
        assert client.queryAsyncJobResult(jobid=ok)["jobid"] == ok
        obj: Any = kubernetes.client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, namespace, "operations", f"op-{ok}"
        )
        assert obj["spec"]["type"] == "cs_noop"
        assert obj["spec"]["params"] == {"zoneid": "1", "serviceofferingid": "2", "name": "a b~c"}
        assert obj["spec"]["executor"] == EXECUTORS["cs_noop"]

        done = wait_for(
            lambda: (j := client.queryAsyncJobResult(jobid=ok))["jobstatus"] == 1 and j,
            what="job succeeded",
        )
        assert done["jobresultcode"] == 0
        assert done["jobresulttype"] == "object"
        assert isinstance(done["jobresult"], dict)
        assert done["cmd"] == "deployVirtualMachine"
        assert done["accountid"] == namespace
        assert done["userid"] == f"user-{namespace}"
        assert done["jobinstancetype"] == "Operation"
        assert done["jobinstanceid"] == ok
        assert CREATED.fullmatch(done["created"])
        assert CREATED.fullmatch(done["completed"])
        assert client.queryAsyncJobResult(jobId=ok) == done  # camel case, as the seed spells it

        xml_text = client.queryAsyncJobResult(jobid=ok, json=False)
        root = ElementTree.fromstring(xml_text)
        assert root.tag == "queryasyncjobresultresponse"
        assert root.findtext("jobid") == str(ok)
        assert root.findtext("jobstatus") == "1"
        assert root.findtext("jobresultcode") == "0"

        failed = client.destroyVirtualMachine(id="7")["jobid"]
        bad = wait_for(
            lambda: (j := client.queryAsyncJobResult(jobid=failed))["jobstatus"] == 2 and j,
            what="job failed",
        )
        assert bad["jobresultcode"] == 1
        assert bad["jobresulttype"] == "text"
        assert bad["jobresult"] == "boom"
        root = ElementTree.fromstring(client.queryAsyncJobResult(jobid=failed, json=False))
        assert root.findtext("jobstatus") == "2"
        assert root.findtext("jobresult") == "boom"

        # An outside system reports a failure with its own code, as in the seed.
        external = client.createSnapshot(volumeid="9")["jobid"]
        assert client.queryAsyncJobResult(jobid=external)["jobstatus"] == 0

        def report() -> bool:
            try:
                kubernetes.client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    namespace,
                    "operations",
                    f"op-{external}",
                    {"status": {"errorCode": 551, "errorInfo": ["not enough capacity"]}},
                )
            except kubernetes.client.ApiException:
                return False
            return client.queryAsyncJobResult(jobid=external)["jobstatus"] == 2

        wait_for(report, what="the external job to fail")
        external_job = client.queryAsyncJobResult(jobid=external)
        assert external_job["jobresultcode"] == 551
        assert external_job["jobresult"] == "not enough capacity"

        # cs's own polling, to success and to failure; and as a form POST.
        assert isinstance(client.deployVirtualMachine(zoneId="1", fetch_result=True), dict)
        failure = _api_error(lambda: client.destroyVirtualMachine(id="8", fetch_result=True))
        assert failure.error == "boom"
        posted = _client(gw, creds, method="post").deployVirtualMachine(
            zoneId="1", fetch_result=True
        )
        assert isinstance(posted, dict)

        # listAsyncJobs: the caller's jobs, newest first; pages; startdate.
        listed = client.listAsyncJobs()
        ids = [j["jobid"] for j in listed["asyncjobs"]]
        assert listed["count"] == len(ids) == 6
        assert ids == sorted(ids, reverse=True)
        assert {ok, failed, external} <= set(ids)
        assert client.listAsyncJobs(page=2, pagesize=2)["asyncjobs"] == listed["asyncjobs"][2:4]
        assert [j["jobid"] for j in client.listAsyncJobs(fetch_list=True)] == ids
        assert client.listAsyncJobs(startdate="2999-01-01") == {}
        assert client.listAsyncJobs(startdate="2000-01-01 00:00:00")["count"] == 6
        xml_list = ElementTree.fromstring(client.listAsyncJobs(json=False, pagesize=2))
        assert xml_list.findtext("count") == "6"
        assert len(xml_list.findall("asyncjobs")) == 2


@pytest.mark.cluster
def test_errors_in_cloudstacks_form(
    api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    key = make_key(api, gw, namespace)
    creds = pair(gw, key)
    client = _client(gw, creds)

    unknown_job = _api_error(lambda: client.queryAsyncJobResult(jobid=2**31 - 1))
    assert unknown_job.response.status_code == 431
    assert unknown_job.error["errorcode"] == 431
    assert unknown_job.error["cserrorcode"] == 4350
    assert "not found" in unknown_job.error["errortext"]
    xml_error = _api_error(lambda: client.queryAsyncJobResult(jobid=2**31 - 1, json=False))
    root = ElementTree.fromstring(xml_error.error)
    assert root.tag == "errorresponse"
    assert root.findtext("errorcode") == "431"

    for missing in (
        lambda: client.queryAsyncJobResult(),
        lambda: client.queryAsyncJobResult(jobid="x"),
    ):
        assert _api_error(missing).error["errorcode"] == 431
    assert _api_error(lambda: client.listAsyncJobs(pagesize=501)).error["errorcode"] == 431
    assert _api_error(lambda: client.listAsyncJobs(startdate="soon")).error["errorcode"] == 431

    unknown = _api_error(lambda: client.rebootVirtualMachine(id="1"))
    assert unknown.response.status_code == 432
    assert unknown.error["errorcode"] == 432

    wrong = _client(gw, Pair(api_key=creds.api_key, secret=creds.secret + "x"))
    assert _api_error(lambda: wrong.listApis()).response.status_code == 401
    unsigned = _client(gw, Pair(api_key=creds.api_key, secret=""))
    assert _api_error(lambda: unsigned.listApis()).error["errorcode"] == 401
    stranger = _client(gw, Pair(api_key=cloudstack.api_key(auth.hash_key("x")), secret="s"))
    assert _api_error(lambda: stranger.listApis()).error["errorcode"] == 401
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=5)
    expired = _api_error(
        lambda: client.listApis(signatureVersion="3", expires=past.strftime("%Y-%m-%dT%H:%M:%S%z"))
    )
    assert expired.error["errorcode"] == 401
    assert "expired" in expired.error["errortext"]

    apis = client.listApis()
    assert {a["name"] for a in apis["api"]} == {
        "queryAsyncJobResult",
        "listAsyncJobs",
        "listApis",
        *COMMANDS,
    }
    assert apis["count"] == 3 + len(COMMANDS)
    [query_api] = client.listApis(name="queryasyncjobresult")["api"]
    assert query_api["isasync"] is False
    assert query_api["params"][0]["name"] == "jobid"

    # Every call with a known caller is in the call log; no credential is.
    with sqlite3.connect(f"file:{gw.settings.call_log_path}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT method, args, exception FROM calls WHERE tenant = ?", (namespace,)
        ).fetchall()
    assert {r[0] for r in rows} >= {"queryAsyncJobResult", "listAsyncJobs", "listApis"}
    text = repr(rows)
    assert creds.api_key not in text
    assert creds.secret not in text
    assert '"signature":"<redacted>"' in text
    assert '"apikey":"<redacted>"' in text

    # Revoking the key Secret ends CloudStack access too.
    core = kubernetes.client.CoreV1Api(api)
    for secret in core.list_namespaced_secret(gw.key_namespace).items:
        tenant = (secret.data or {}).get("namespace")
        if tenant and base64.b64decode(tenant).decode() == namespace:
            core.delete_namespaced_secret(secret.metadata.name, gw.key_namespace)
    wait_for(
        lambda: _status(signed_url(gw.base, _listapis(creds), secret=creds.secret)) == 401,
        what="the revoked key refused",
    )


def _listapis(creds: Pair) -> dict[str, str]:
    return {"command": "listApis", "apiKey": creds.api_key, "response": "json"}


def _error_text(url: str) -> str:
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(url, timeout=30)
    return str(json.loads(caught.value.read())["errorresponse"]["errortext"])


def _status(url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.mark.cluster
def test_raw_signature_edge_cases(
    api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    creds = pair(gw, make_key(api, gw, namespace))
    base = _listapis(creds)
    texts: dict[str | None, set[str]] = {}
    for value in ("a b", "a+b", "~", "*", "a/b?c=d&e", "\u00e9\U0001f600", "%20", ""):
        params = {**base, "name": value}
        assert _status(signed_url(gw.base, params, secret=creds.secret)) == 200, value
        # As CloudStack's own Java encoder writes it ('~' as %7E): accepted too.
        signature = cloudstack.sign(list(params.items()), secret=creds.secret, java=True)
        query = urllib.parse.urlencode({**params, "signature": signature})
        assert _status(f"{gw.base}/client/api?{query}") == 200, value
    # Names are signed as sent, sorted case-sensitively, then lower-cased.
    mixed = {"COMMAND": "listApis", "apiKey": creds.api_key, "Response": "json"}
    assert _status(signed_url(gw.base, mixed, secret=creds.secret)) == 200
    signature = cloudstack.sign(list(base.items()), secret=creds.secret)
    # A signature whose '+' is sent raw reads as a space: refused, never a 5xx.
    raw = urllib.parse.urlencode(base) + "&signature=" + signature.replace("/", "%2F")
    assert _status(f"{gw.base}/client/api?{raw}") in (200, 401)
    tampered = urllib.parse.urlencode({**base, "signature": signature, "name": "x"})
    assert _status(f"{gw.base}/client/api?{tampered}") == 401
    repeated = urllib.parse.urlencode({**base, "signature": signature}) + "&apiKey=x"
    assert _status(f"{gw.base}/client/api?{repeated}") == 431
    assert _status(f"{gw.base}/client/api?command=listApis&x=%ff") == 431
    assert _status(f"{gw.base}/client/api?command=listApis&x=" + "y" * 20000) in (400, 414, 431)
    assert _status(f"{gw.base}/client/api") == 401
    # An unknown apiKey is told exactly what a known one would be told.
    stranger = {**base, "apiKey": cloudstack.api_key(auth.hash_key("not a key"))}
    for params, secret in ((base, "wrong"), (stranger, "wrong"), (base, None), (stranger, None)):
        url = (
            signed_url(gw.base, params, secret=secret)
            if secret
            else f"{gw.base}/client/api?" + urllib.parse.urlencode(params)
        )
        texts.setdefault(secret, set()).add(_error_text(url))
    assert all(len(seen) == 1 for seen in texts.values()), texts
    head = urllib.request.Request(signed_url(gw.base, base, secret=creds.secret), method="HEAD")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(head, timeout=30)
    assert refused.value.code == 405  # a GET may create an operation; a HEAD never does
    # A form POST: signed body; a body that is not a form; one over the size limit.
    form = urllib.parse.urlencode({**base, "signature": signature}).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    assert _status(f"{gw.base}/client/api", data=form, headers=headers) == 200
    assert (
        _status(f"{gw.base}/client/api", data=b"<x/>", headers={"Content-Type": "text/xml"}) == 431
    )
    huge = b"x=" + b"y" * (codec.DEFAULT_LIMITS.max_body_bytes + 10)
    assert _status(f"{gw.base}/client/api", data=huge, headers=headers) == 413


@pytest.mark.cluster
def test_apikey_create_gives_working_cloudstack_credentials(
    cluster: Any, api: kubernetes.client.ApiClient, namespace: str, gw: RunningGateway
) -> None:
    async def create() -> apikeys.NewKey:
        credentials = kube.Credentials.from_kubeconfig(cluster.kubeconfig)
        async with kube.Client(credentials, field_manager="test") as client:
            return await apikeys.create(
                client, key_namespace=gw.key_namespace, tenant=namespace, user="carol"
            )

    made = asyncio.run(create())
    creds = made.to_json()["cloudstack"]
    client = _client(gw, Pair(api_key=creds["apiKey"], secret=creds["secretKey"]))

    def works() -> bool:
        try:
            client.listAsyncJobs()
        except cs.CloudStackApiException:
            return False
        return True

    wait_for(works, what="the new key to reach the gateway")
