"""``opkeeper apikey create | list | revoke`` (:mod:`opkeeper.apikeys`).

The pure parts (user ids, Secret names, parsing, the JSON and the snippets)
are tested without a cluster. The command itself runs as a subprocess
against the real API server, and what it prints is used against a real
gateway the way a client would: the JSON's Gandi credentials log in through
``xmlrpc.client``, its gocept credentials call ``query`` with Basic auth,
and the text (what ``make dev`` shows) is executed as it is. Nothing sleeps
to synchronise: the gateway's key ring follows a watch, and tests wait for
the outcome with :func:`tests.helpers.wait_for`.
"""

from __future__ import annotations

import base64
import json
import pathlib
import re
import subprocess
import sys
import urllib.parse
import uuid
import xmlrpc.client
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest

from opkeeper import apikeys, devenv, errors, names, states
from opkeeper.gateway import auth, faults, server
from tests.gateway_support import (
    RunningGateway,
    fault_of,
    gateway_process,
    module_gateway,
)
from tests.helpers import wait_for

GANDI_UNAUTHENTICATED = faults.GANDI.row_for(errors.Unauthenticated()).code
GOCEPT_UNAUTHENTICATED = faults.XMLRPC.row_for(errors.Unauthenticated()).code


def _key(**overrides: str) -> apikeys.NewKey:
    fields = {
        "name": "apikey-alice-0a1b2c",
        "key_namespace": "opkeeper-system",
        "namespace": "team-a",
        "user_id": "alice",
        "api_key": auth.new_key(),
        **overrides,
    }
    return apikeys.NewKey(**fields)


def _as_served(manifest: dict[str, Any], *, created: str = "2026-11-24T10:00:00Z") -> Any:
    """A manifest as the API server returns it: stringData moved into base64 data."""
    data = {k: base64.b64encode(v.encode()).decode() for k, v in manifest["stringData"].items()}
    meta = {**manifest["metadata"], "creationTimestamp": created, "uid": str(uuid.uuid4())}
    return {
        **{k: v for k, v in manifest.items() if k != "stringData"},
        "metadata": meta,
        "data": data,
    }


# --- the pure parts ------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["alice", "a", "jo.doe@example.org", "svc_deploy-2", "x" * 253])
def test_user_ids_of_the_allowed_characters_are_accepted(value: str) -> None:
    assert apikeys.user_id(value) == value


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("", "must not be empty"),
        ("x" * 254, "longer than 253"),
        ("al ice", "may hold only"),
        ("a:b", "may hold only"),  # would end the user name in Basic auth and in a URL
        ("a\nINFO forged log line", "may hold only"),
        ("a/b", "may hold only"),
        ("a%40b", "may hold only"),
        ("ålice", "may hold only"),
        (7, "must be a string"),
    ],
)
def test_other_user_ids_are_refused_with_the_reason(value: object, says: str) -> None:
    with pytest.raises(names.InvalidName, match=says):
        apikeys.user_id(value)


@pytest.mark.parametrize(
    ("user", "slug"),
    [
        ("alice", "alice"),
        ("Jo.Doe@Example.org", "jo-doe-example-org"),
        ("__x__", "x"),
        ("x" * 253, "x" * 40),
        ("...", None),
    ],
)
def test_secret_names_carry_the_user_and_six_random_hex_digits(user: str, slug: str | None) -> None:
    name = apikeys.secret_name(user=user)
    stem = f"apikey-{slug}-" if slug else "apikey-"
    assert re.fullmatch(re.escape(stem) + "[0-9a-f]{6}", name), name
    assert names.object_name(name) == name
    assert len(name) <= names.LABEL_MAX
    assert apikeys.secret_name(user=user) != name


def test_a_listed_key_secret_parses_into_a_record_and_the_gateway_reads_the_same_secret() -> None:
    key = auth.new_key()
    manifest = auth.key_secret(
        name="apikey-alice-0a1b2c",
        namespace="opkeeper-system",
        key=key,
        user_id="alice@example.org",
        tenant="team-a",
    )
    served = _as_served(manifest)
    record = apikeys.parse(served)
    assert record == apikeys.ApiKey(
        name="apikey-alice-0a1b2c",
        namespace="team-a",
        user_id="alice@example.org",
        created="2026-11-24T10:00:00Z",
    )
    assert record.to_json() == {
        "name": "apikey-alice-0a1b2c",
        "namespace": "team-a",
        "userId": "alice@example.org",
        "created": "2026-11-24T10:00:00Z",
    }
    keyring = auth.KeyRing(settings=auth.KeyRingSettings())
    keyring.apply(event="ADDED", obj=served)
    assert keyring.lookup(key).user_id == "alice@example.org"


def test_secrets_that_are_not_usable_keys_parse_to_none() -> None:
    manifest = auth.key_secret(
        name="k", namespace="opkeeper-system", key=auth.new_key(), user_id="u", tenant="t"
    )
    served = _as_served(manifest)
    unlabelled = {**served, "metadata": {**served["metadata"], "labels": {}}}
    no_user = {**served, "data": {k: v for k, v in served["data"].items() if k != "userId"}}
    not_base64 = {**served, "data": {**served["data"], "namespace": "!!"}}
    assert [apikeys.parse(s) for s in (unlabelled, no_user, not_base64)] == [None, None, None]


def test_the_json_has_the_key_and_each_dialects_credentials_in_its_own_words() -> None:
    key = _key()
    assert key.to_json() == {
        "name": "apikey-alice-0a1b2c",
        "namespace": "team-a",
        "userId": "alice",
        "apiKey": key.api_key,
        "gandi": {"login": "alice", "password": key.api_key},
        "gocept": {"username": "alice", "password": key.api_key},
        "cloudstack": {"apiKey": key.cloudstack_api_key, "secretKey": key.cloudstack_secret},
        "bdom": {
            "username": "alice",
            "password": key.api_key,
            "statusPath": "/bdom/task/status/-/-/-/-/alice/",
        },
        "xenapi": {"username": "alice", "password": key.api_key},
    }
    assert {form.dialect for form in apikeys.CLIENT_FORMS} <= set(states.Dialect)
    assert key.api_key not in repr(key)


def test_the_text_is_python_with_the_credentials_in_comments_and_a_snippet_per_dialect() -> None:
    key = _key(user_id="jo@example.org")
    text = key.text(url="https://gw.example.net:8443/legacy")
    compile(text, "<apikey create>", "exec")
    assert f"#   API key: {key.api_key}" in text
    assert "#   user id: jo@example.org" in text
    assert "gandi.login('jo@example.org', " in text
    assert "ServerProxy('https://gw.example.net:8443/legacy/xmlrpc')" in text
    for form in apikeys.CLIENT_FORMS:
        assert f"# {form.title}\n" in text


def test_the_gocept_url_carries_user_and_key_as_xmlrpc_client_sends_them() -> None:
    key = _key(user_id="jo@example.org")
    url = re.search(r"ServerProxy\('([^']+)'\)", apikeys._gocept_snippet(key=key, url="http://h:1"))
    assert url is not None
    parts = urllib.parse.urlsplit(url.group(1))
    # xmlrpc.client percent-decodes the user:password it finds before the last '@'.
    user, _, password = urllib.parse.unquote(parts.netloc.rpartition("@")[0]).partition(":")
    assert (user, password, parts.hostname, parts.port, parts.path) == (
        "jo@example.org",
        key.api_key,
        "h",
        1,
        "/xmlrpc",
    )


@pytest.mark.parametrize(
    "url", ["ftp://h", "h:8480", "http://", "http://u:p@h", "http://h/?x=1", "http://h/#f"]
)
def test_gateway_urls_without_a_host_or_with_credentials_are_refused(url: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        apikeys.gateway_url(url)


def test_the_defaults_are_the_gateways() -> None:
    assert apikeys.gateway_url("http://127.0.0.1:8480/") == apikeys.DEFAULT_URL
    assert f"http://127.0.0.1:{server.Settings().port}" == apikeys.DEFAULT_URL
    assert auth.KeyRingSettings().namespace == apikeys.DEFAULT_KEY_NAMESPACE


def test_the_list_table_aligns_its_columns() -> None:
    keys = [
        apikeys.ApiKey(name="apikey-a-000000", namespace="t", user_id="a", created="c1"),
        apikeys.ApiKey(name="apikey-bob-000000", namespace="team", user_id="bob", created="c2"),
    ]
    assert apikeys.table(keys).splitlines() == [
        "NAME                NAMESPACE   USER   CREATED",
        "apikey-a-000000     t           a      c1",
        "apikey-bob-000000   team        bob    c2",
    ]


# --- the command against the real API server and a real gateway ----------------------------


@pytest.fixture(scope="module")
def gw(
    cluster: Any, api: kubernetes.client.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    with module_gateway(cluster=cluster, api=api, tmp_path_factory=tmp_path_factory) as running:
        yield running


def apikey(cluster: Any, *args: str) -> subprocess.CompletedProcess[str]:
    """``opkeeper apikey ARGS`` as a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "opkeeper.cli", "apikey", *args],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def _gandi_login(gw: RunningGateway, login: str, password: str) -> str | int:
    """A session, or the fault code of the refusal."""
    try:
        return str(gw.proxy().login(login, password))
    except xmlrpc.client.Fault as fault:
        return int(fault.faultCode)


def test_create_prints_working_credentials_list_hides_the_key_and_revoke_ends_it(
    cluster: Any, gw: RunningGateway, namespace: str
) -> None:
    where = ["--key-namespace", gw.key_namespace]
    created = json.loads(
        _ok(
            apikey(
                cluster,
                "create",
                *where,
                "-n",
                namespace,
                "--user",
                "ops@example.org",
                "-o",
                "json",
            )
        )
    )
    key = created["apiKey"]
    assert created["namespace"] == namespace
    assert created["userId"] == "ops@example.org"
    assert re.fullmatch(r"apikey-ops-example-org-[0-9a-f]{6}", created["name"])

    gandi = created["gandi"]

    def session() -> str | None:
        login = _gandi_login(gw, gandi["login"], gandi["password"])
        return login if isinstance(login, str) else None

    token = wait_for(session, what="the new key to reach the gateway")
    assert gw.proxy().operation_list(token, {}) == []
    gocept = created["gocept"]
    url = f"http://{gocept['username']}:{gocept['password']}@127.0.0.1:{gw.port}/xmlrpc"
    assert xmlrpc.client.ServerProxy(url).query("operation", {}) == []

    listed_json = _ok(apikey(cluster, "list", *where, "-n", namespace, "-o", "json"))
    listed_text = _ok(apikey(cluster, "list", *where, "-n", namespace))
    record = {k: created[k] for k in ("name", "namespace", "userId")}
    assert [{k: r[k] for k in record} for r in json.loads(listed_json)] == [record]
    assert created["name"] in listed_text
    assert "ops@example.org" in listed_text
    for output in (listed_json, listed_text):
        assert key not in output
        assert key[4:] not in output
        assert base64.b64encode(key.encode()).decode() not in output

    revoked = _ok(apikey(cluster, "revoke", *where, created["name"]))
    assert revoked == f"revoked {created['name']} (user ops@example.org, namespace {namespace})\n"
    wait_for(
        lambda: _gandi_login(gw, gandi["login"], gandi["password"]) == GANDI_UNAUTHENTICATED,
        what="the revoked key to be refused",
    )
    # The session of the revoked key ends with it, and gocept's Basic auth is refused.
    unauthenticated = fault_of(lambda: gw.proxy().operation_list(token, {}))
    assert unauthenticated.faultCode == GANDI_UNAUTHENTICATED
    refused = fault_of(lambda: xmlrpc.client.ServerProxy(url).query("operation", {}))
    assert refused.faultCode == GOCEPT_UNAUTHENTICATED
    assert json.loads(_ok(apikey(cluster, "list", *where, "-n", namespace, "-o", "json"))) == []


def test_revoke_by_user_deletes_exactly_that_users_keys_for_that_namespace(
    cluster: Any, api: kubernetes.client.ApiClient, gw: RunningGateway, namespace: str
) -> None:
    where = ["--key-namespace", gw.key_namespace]
    other_tenant = f"{namespace[:50]}-other"

    def create(tenant: str, user: str) -> str:
        made = _ok(apikey(cluster, "create", *where, "-n", tenant, "--user", user, "-o", "json"))
        return str(json.loads(made)["name"])

    bobs = {create(namespace, "bob"), create(namespace, "bob")}
    kept = {create(namespace, "carol"), create(other_tenant, "bob")}

    revoked = json.loads(
        _ok(apikey(cluster, "revoke", *where, "--user", "bob", "-n", namespace, "-o", "json"))
    )
    assert {r["name"] for r in revoked} == bobs
    listed = {r["name"] for r in json.loads(_ok(apikey(cluster, "list", *where, "-o", "json")))}
    assert kept <= listed
    assert not bobs & listed
    core = kubernetes.client.CoreV1Api(api)
    secrets = {s.metadata.name for s in core.list_namespaced_secret(gw.key_namespace).items}
    assert kept <= secrets
    assert not bobs & secrets


def test_revoking_nothing_is_an_error_and_a_secret_that_is_no_key_is_never_deleted(
    cluster: Any, api: kubernetes.client.ApiClient, gw: RunningGateway, namespace: str
) -> None:
    where = ["--key-namespace", gw.key_namespace]
    core = kubernetes.client.CoreV1Api(api)
    core.create_namespaced_secret(
        gw.key_namespace, {"metadata": {"name": "not-a-key"}, "stringData": {"x": "y"}}
    )

    by_name = apikey(cluster, "revoke", *where, "not-a-key")
    assert by_name.returncode == 2
    assert by_name.stdout == ""
    assert by_name.stderr == (
        f"opkeeper apikey revoke: no API key named not-a-key in {gw.key_namespace};"
        " nothing revoked\n"
    )
    assert core.read_namespaced_secret("not-a-key", gw.key_namespace).metadata.name == "not-a-key"

    by_user = apikey(cluster, "revoke", *where, "--user", "nobody", "-n", namespace)
    assert by_user.returncode == 2
    assert f"no API key of user nobody for namespace {namespace}" in by_user.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["create", "-n", "Team_A", "--user", "u"], "argument -n/--namespace: namespace 'Team_A'"),
        (["create", "-n", "ok", "--user", "a b"], "argument --user: user id 'a b' may hold only"),
        (["create", "-n", "ok", "--user", ""], "argument --user: user id must not be empty"),
        (["create", "-n", "ok", "--user", "u", "--url", "ftp://h"], "argument --url: URL"),
        (["list", "-n", "../x"], "argument -n/--namespace: namespace '../x'"),
        (["revoke", "../etc"], "argument name: name '../etc' is not a valid name"),
        (["revoke", "--user", "u"], "give either NAME, or --user and --namespace"),
        (["revoke", "k", "--user", "u", "-n", "ns"], "give either NAME, or --user and --namespace"),
        (["create", "--key-namespace", "*", "-n", "ok", "--user", "u"], "argument --key-namespace"),
    ],
)
def test_bad_namespaces_users_and_names_are_refused_with_exit_code_2(
    cluster: Any, api: kubernetes.client.ApiClient, gw: RunningGateway, args: list[str], says: str
) -> None:
    before = kubernetes.client.CoreV1Api(api).list_namespaced_secret(gw.key_namespace).items
    refused = apikey(cluster, *args[:1], "--key-namespace", gw.key_namespace, *args[1:])
    assert refused.returncode == 2
    assert refused.stdout == ""
    assert f"opkeeper apikey {args[0]}: error: {says}" in refused.stderr
    after = kubernetes.client.CoreV1Api(api).list_namespaced_secret(gw.key_namespace).items
    assert len(after) == len(before)


def test_make_devs_demo_key_prints_snippets_that_work_as_pasted(
    cluster: Any, api: kubernetes.client.ApiClient, tmp_path: pathlib.Path
) -> None:
    # make dev's gateway reads keys from the default key namespace, as this one does.
    with gateway_process(cluster, tmp_path, apikeys.DEFAULT_KEY_NAMESPACE) as gateway:
        settings = devenv.DevSettings(gateway_port=gateway.port)
        demo = subprocess.run(
            devenv.demo_key_command(settings),
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        text = _ok(demo)
        assert all(f"# {form.title}\n" in text for form in apikeys.CLIENT_FORMS)
        assert "#   curl -sS -u 'demo:" in text  # BDOM's ready-to-paste curl lines

        def runs() -> bool:
            try:
                exec(text, {})  # everything make dev prints, pasted as it is
            except xmlrpc.client.Fault:
                return False  # the gateway's watch has not brought the key yet
            return True

        try:
            wait_for(runs, what="make dev's printed snippets to run against the gateway")
        finally:
            cleanup = apikey(
                cluster,
                "revoke",
                "--user",
                devenv.DEMO_USER,
                "-n",
                devenv.DEMO_NAMESPACE,
            )
            assert cleanup.returncode == 0, cleanup.stderr
    assert "gateway stopped" in gateway.log_path.read_text()
