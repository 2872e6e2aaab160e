"""The aggregated API's decisions without a cluster: permission mapping, the decision
cache, the front-proxy trust (including a real TLS handshake before and after a CA
rotation), discovery negotiation, and the answers a caller gets before any call runs.

The end-to-end checks through a real kube-apiserver are in test_aggregated_api.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import pathlib
import ssl
import xmlrpc.client as xmlrpc_client
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from opkeeper import errors, kube, netnscluster
from opkeeper.gateway import access, aggregated, auth, frontproxy, server, xmlrpc

ALICE = frontproxy.User(name="alice", groups=("system:authenticated",))


# --- permissions --------------------------------------------------------------------------


def test_fixed_methods_map_to_operation_verbs() -> None:
    def verbs(method: str, *params: Any) -> list[tuple[str, str]]:
        return [(c.verb, c.resource) for c in access.checks(method, params)]

    assert verbs("operation_list", "") == [("list", "operations")]
    assert verbs("operation_details", "", 1) == [("get", "operations")]
    assert verbs("operation_create", "", "noop", {}) == [("create", "operations")]
    assert verbs("operation_relaunch", "", 1, {}) == [("patch", "operations")]
    assert verbs("operation_cancel", "", 1) == [("patch", "operations")]
    assert verbs("log") == [("list", "operations")]
    assert verbs("login", "a", "b") == []


def test_query_and_apply_depend_on_their_arguments() -> None:
    def verbs(method: str, *params: Any) -> list[tuple[str, str]]:
        return [(c.verb, c.resource) for c in access.checks(method, params)]

    assert verbs("query", "scheduledtask") == [("list", "scheduledtasks")]
    assert verbs("query", "operation") == [("list", "operations")]
    assert verbs("query", 42) == [("list", "operations")]
    batch = [
        {"__type__": "operation", "name": "a", "type": "noop"},
        {"__type__": "scheduledtask", "__action__": "delete", "name": "t"},
        {"__type__": "nonsense", "name": "x"},
        "not a record",
    ]
    assert verbs("apply", batch) == [
        ("create", "operations"),
        ("delete", "scheduledtasks"),
        ("patch", "operations"),
    ]
    assert verbs("apply", "not a list") == []


def test_a_method_without_a_mapping_is_never_served() -> None:
    assert set(aggregated.methods()) == access.SERVED
    with pytest.raises(KeyError):
        access.checks("VM.destroy", ())


def test_review_names_the_user_groups_extra_and_namespace() -> None:
    user = frontproxy.User(name="bob", groups=("g1", "g2"), extra=(("scopes", ("a", "b")),))
    body = access.review(
        user=user, namespace="team-a", check=access.Check(verb="get", resource="operations")
    )
    assert body["spec"] == {
        "user": "bob",
        "groups": ["g1", "g2"],
        "extra": {"scopes": ["a", "b"]},
        "resourceAttributes": {
            "namespace": "team-a",
            "verb": "get",
            "group": "opkeeper.dev",
            "resource": "operations",
        },
    }


# --- the decision cache ---------------------------------------------------------------------


class FakeReviews:
    """Answers SubjectAccessReviews from a set of allowed (user, verb, namespace)."""

    def __init__(self, allowed: set[tuple[str, str, str]]) -> None:
        self.allowed = allowed
        self.asked = 0
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None

    async def create(
        self, resource: kube.Resource, body: dict[str, Any], *, namespace: str | None = None
    ) -> dict[str, Any]:
        assert resource == access.SUBJECT_ACCESS_REVIEWS
        self.asked += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        spec = body["spec"]
        attrs = spec["resourceAttributes"]
        key = (spec["user"], attrs["verb"], attrs["namespace"])
        return {"status": {"allowed": key in self.allowed}}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


GET = access.Check(verb="get", resource="operations")
CREATE = access.Check(verb="create", resource="operations")


def test_allowed_is_cached_five_minutes_denied_thirty_seconds() -> None:
    asyncio.run(_allowed_is_cached_five_minutes_denied_thirty_seconds())


async def _allowed_is_cached_five_minutes_denied_thirty_seconds() -> None:
    reviews, clock = FakeReviews({("alice", "get", "a")}), Clock()
    authorizer = access.Authorizer(reviews=reviews, settings=access.Settings(), clock=clock)
    assert await authorizer.allowed(user=ALICE, namespace="a", check=GET)
    assert not await authorizer.allowed(user=ALICE, namespace="a", check=CREATE)
    assert reviews.asked == 2
    clock.now += 29
    assert await authorizer.allowed(user=ALICE, namespace="a", check=GET)
    assert not await authorizer.allowed(user=ALICE, namespace="a", check=CREATE)
    assert reviews.asked == 2
    reviews.allowed.add(("alice", "create", "a"))
    clock.now += 2  # past the denied TTL: a new RoleBinding counts
    assert await authorizer.allowed(user=ALICE, namespace="a", check=CREATE)
    assert await authorizer.allowed(user=ALICE, namespace="a", check=GET)
    assert reviews.asked == 3
    reviews.allowed.clear()
    clock.now += 300  # past the allowed TTL: a removed RoleBinding counts
    assert not await authorizer.allowed(user=ALICE, namespace="a", check=GET)
    assert reviews.asked == 4


def test_the_cache_is_bounded_and_keyed_by_groups_and_namespace() -> None:
    asyncio.run(_the_cache_is_bounded_and_keyed_by_groups_and_namespace())


async def _the_cache_is_bounded_and_keyed_by_groups_and_namespace() -> None:
    reviews = FakeReviews(set())
    authorizer = access.Authorizer(reviews=reviews, settings=access.Settings(max_entries=3))
    other_groups = frontproxy.User(name="alice", groups=("system:masters",))
    for user, ns in [(ALICE, "a"), (ALICE, "b"), (other_groups, "a"), (ALICE, "c")]:
        await authorizer.allowed(user=user, namespace=ns, check=GET)
    assert reviews.asked == 4
    assert len(authorizer) == 3
    await authorizer.allowed(user=ALICE, namespace="a", check=GET)  # the oldest went first
    assert reviews.asked == 5


def test_identical_questions_at_once_share_one_review() -> None:
    asyncio.run(_identical_questions_at_once_share_one_review())


async def _identical_questions_at_once_share_one_review() -> None:
    reviews = FakeReviews({("alice", "get", "a")})
    reviews.gate = asyncio.Event()
    authorizer = access.Authorizer(reviews=reviews, settings=access.Settings())
    asked = [
        asyncio.create_task(authorizer.allowed(user=ALICE, namespace="a", check=GET))
        for _ in range(20)
    ]
    await asyncio.sleep(0)  # let every task reach the pending review
    reviews.gate.set()
    assert all(await asyncio.gather(*asked))
    assert reviews.asked == 1


def test_require_names_the_missing_permission_and_gateway_refusals_are_unavailable() -> None:
    asyncio.run(_require_names_the_missing_permission_and_gateway_refusals_are_unavailable())


async def _require_names_the_missing_permission_and_gateway_refusals_are_unavailable() -> None:
    reviews = FakeReviews({("alice", "get", "a")})
    authorizer = access.Authorizer(reviews=reviews, settings=access.Settings())
    await authorizer.require(user=ALICE, namespace="a", method="operation_details", needed=[GET])
    with pytest.raises(access.Denied) as denied:
        await authorizer.require(
            user=ALICE, namespace="a", method="operation_create", needed=[GET, CREATE]
        )
    assert 'User "alice" cannot create resource "operations"' in str(denied.value)
    assert "operation_create" in str(denied.value)
    reviews.fail = errors.Forbidden("no system:auth-delegator")
    with pytest.raises(errors.Unavailable):
        await authorizer.allowed(user=ALICE, namespace="z", check=GET)


# --- front-proxy trust ----------------------------------------------------------------------


def _headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_trust_from_the_configmap() -> None:
    assert frontproxy.trust_from({}) is None
    assert frontproxy.trust_from({"requestheader-client-ca-file": "garbage"}) is None
    pem = netnscluster.issue("ca").cert_pem.decode()
    trust = frontproxy.trust_from(
        {
            "requestheader-client-ca-file": pem,
            "requestheader-allowed-names": '["front-proxy-client"]',
            "requestheader-username-headers": '["X-Remote-User"]',
            "requestheader-group-headers": "not json",
            "requestheader-extra-headers-prefix": '["X-Remote-Extra-"]',
        }
    )
    assert trust is not None
    assert trust.allowed_names == frozenset({"front-proxy-client"})
    assert trust.group_headers == frontproxy.DEFAULT_GROUP_HEADERS


def test_user_from_headers() -> None:
    trust = frontproxy.Trust(ca_pem="", allowed_names=frozenset())
    user = frontproxy.user_from(
        trust,
        _headers(
            ("X-Remote-User", "alice"),
            ("X-Remote-Group", "g1"),
            ("x-remote-group", "g2"),
            ("X-Remote-Extra-Acme.com%2Fproject", "p1"),
            ("X-Remote-Extra-Scopes", "s1"),
            ("X-Remote-Extra-Scopes", "s2"),
        ),
    )
    assert user == frontproxy.User(
        name="alice",
        groups=("g1", "g2"),
        extra=(("acme.com/project", ("p1",)), ("scopes", ("s1", "s2"))),
    )
    with_uid = dataclasses.replace(trust, uid_headers=("X-Remote-Uid",))
    named = frontproxy.user_from(
        with_uid, _headers(("X-Remote-User", "bob"), ("X-Remote-Uid", "u-1"))
    )
    assert named is not None
    assert named.uid == "u-1"
    assert access.review(user=named, namespace="a", check=GET)["spec"]["uid"] == "u-1"
    assert frontproxy.user_from(trust, _headers(("X-Remote-Group", "g1"))) is None
    assert frontproxy.user_from(trust, _headers(("X-Remote-User", " "))) is None


def test_user_from_kube_apiserver_headers_is_built_once() -> None:
    """What kube-apiserver 1.36 sends for a client-certificate user (its credential-id
    extra among the X-Forwarded-* headers): one User for the same identity headers,
    whatever else differs, and another as soon as one of them does."""
    trust = frontproxy.Trust(ca_pem="", allowed_names=frozenset())

    def sent(audit_id: str, group: str = "system:authenticated") -> CIMultiDictProxy[str]:
        return _headers(
            ("User-Agent", "kubectl/v1.36.3"),
            ("Audit-Id", audit_id),
            ("X-Forwarded-For", "192.0.2.1"),
            ("X-Remote-Group", group),
            ("X-Remote-User", "alice"),
            ("X-Remote-Extra-Authentication.kubernetes.io%2fcredential-Id", "X509SHA256=ab"),
        )

    first = frontproxy.user_from(trust, sent("1"))
    assert first == frontproxy.User(
        name="alice",
        groups=("system:authenticated",),
        extra=(("authentication.kubernetes.io/credential-id", ("X509SHA256=ab",)),),
    )
    assert frontproxy.user_from(trust, sent("2")) is first
    other = frontproxy.user_from(trust, sent("3", group="team-a"))
    assert other is not None
    assert other.groups == ("team-a",)


def test_allowed_names() -> None:
    cert = {"subject": ((("commonName", "front-proxy-client"),),)}
    anyone = frontproxy.Trust(ca_pem="", allowed_names=frozenset())
    named = frontproxy.Trust(ca_pem="", allowed_names=frozenset({"front-proxy-client"}))
    other = frontproxy.Trust(ca_pem="", allowed_names=frozenset({"aggregator"}))
    assert frontproxy.name_allowed(anyone, cert)
    assert frontproxy.name_allowed(named, cert)
    assert not frontproxy.name_allowed(other, cert)
    assert not frontproxy.name_allowed(anyone, None)
    assert not frontproxy.name_allowed(anyone, {})


def _tls_client(
    tmp_path: pathlib.Path, server_ca: netnscluster.Issued, client: netnscluster.Issued | None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=server_ca.cert_pem.decode())
    context.check_hostname = False
    if client is not None:
        cert, key = client.write(tmp_path / f"client-{client.cert.serial_number}")
        context.load_cert_chain(str(cert), str(key))
    return context


def test_a_rotated_ca_is_used_from_the_next_handshake(tmp_path: pathlib.Path) -> None:
    asyncio.run(_a_rotated_ca_is_used_from_the_next_handshake(tmp_path))


async def _a_rotated_ca_is_used_from_the_next_handshake(tmp_path: pathlib.Path) -> None:
    server_ca = netnscluster.issue("serving-ca")
    cert, key = netnscluster.issue("server", by=server_ca, ips=["127.0.0.1"]).write(
        tmp_path / "serving"
    )
    store = frontproxy.TrustStore(
        serving=frontproxy.ServingCert(cert_file=str(cert), key_file=str(key))
    )
    old_ca, new_ca = netnscluster.issue("old-ca"), netnscluster.issue("new-ca")
    old_client = netnscluster.issue("front-proxy-client", by=old_ca, client=True)
    new_client = netnscluster.issue("front-proxy-client", by=new_ca, client=True)
    seen: list[Any] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("peercert"))
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=store.listener)
    port = server.sockets[0].getsockname()[1]

    async def connect(client: netnscluster.Issued | None) -> Any:
        seen.clear()
        context = _tls_client(tmp_path, server_ca, client)
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        await writer.wait_closed()
        return seen[0] if seen else None

    async def refused(client: netnscluster.Issued) -> bool:
        try:
            await connect(client)
        except (ssl.SSLError, ConnectionError):
            return True
        return not seen  # the server dropped the handshake before serving

    try:
        assert await connect(None) is None  # no trust yet: anonymous connections still work
        store.set(frontproxy.Trust(ca_pem=old_ca.cert_pem.decode(), allowed_names=frozenset()))
        assert frontproxy.common_name(await connect(old_client)) == "front-proxy-client"
        assert await refused(new_client)
        store.set(frontproxy.Trust(ca_pem=new_ca.cert_pem.decode(), allowed_names=frozenset()))
        assert frontproxy.common_name(await connect(new_client)) == "front-proxy-client"
        assert await refused(old_client)
    finally:
        server.close()
        await server.wait_closed()


def test_the_store_follows_the_configmap(tmp_path: pathlib.Path) -> None:
    server_ca = netnscluster.issue("serving-ca")
    cert, key = netnscluster.issue("server", by=server_ca, ips=["127.0.0.1"]).write(
        tmp_path / "serving"
    )
    store = frontproxy.TrustStore(
        serving=frontproxy.ServingCert(cert_file=str(cert), key_file=str(key))
    )
    pem = netnscluster.issue("ca").cert_pem.decode()
    configmap = {
        "metadata": {"name": frontproxy.CONFIGMAP_NAME},
        "data": {"requestheader-client-ca-file": pem},
    }
    store.reset([configmap])
    assert store.trust is not None
    store.apply(event="MODIFIED", obj={"metadata": {"name": "other"}, "data": {}})
    assert store.trust is not None
    store.apply(event="DELETED", obj=configmap)
    assert store.trust is None


# --- discovery and the answers before a call runs ------------------------------------------


def test_aggregated_discovery_is_what_the_accept_header_asks_for() -> None:
    v2, v2beta1 = aggregated.DISCOVERY_V2, aggregated.DISCOVERY_V2BETA1
    assert aggregated.aggregated_version(f"{v2},{v2beta1}") == "v2"
    assert aggregated.aggregated_version(f"{v2beta1},{v2}") == "v2beta1"
    assert aggregated.aggregated_version("application/json") is None
    assert aggregated.aggregated_version("") is None
    assert aggregated.aggregated_version(v2.replace("v=v2", "v=v9")) is None
    listed = aggregated.aggregated_discovery("v2")
    resource = listed["items"][0]["versions"][0]["resources"][0]
    assert resource["resource"] == "xmlrpc"
    assert resource["scope"] == "Namespaced"


class _NoKube:
    """Stands in for the Kubernetes client where these tests never reach it."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"kube.Client.{name} called")


@contextlib.asynccontextmanager
async def serving(tmp_path: pathlib.Path) -> AsyncIterator[dict[str, Any]]:
    """The aggregated listener as server.Gateway wires it (its body reader and limits),
    with a fake reviewer and no API server: nothing here may reach one."""
    server_ca = netnscluster.issue("serving-ca")
    cert, key = netnscluster.issue("server", by=server_ca, ips=["127.0.0.1"]).write(
        tmp_path / "serving"
    )
    limits = dataclasses.replace(xmlrpc.DEFAULT_LIMITS, max_body_bytes=4096)
    gateway = server.Gateway(
        settings=server.Settings(
            limits=limits,
            aggregated=aggregated.Settings(cert_file=str(cert), key_file=str(key), port=0),
        ),
        kube_client=_NoKube(),  # type: ignore[arg-type]
        call_log=_NoKube(),  # type: ignore[arg-type]
        session_key=auth.FixedKey(value=b"k" * 32),
    )
    api = gateway.aggregated
    assert api is not None
    proxy_ca = netnscluster.issue("front-proxy-ca")
    api.trust.set(
        frontproxy.Trust(
            ca_pem=proxy_ca.cert_pem.decode(), allowed_names=frozenset({"front-proxy-client"})
        )
    )
    reviews = FakeReviews({("alice", "get", "team-a")})
    api.authorizer = access.Authorizer(reviews=reviews, settings=access.Settings())
    runner = web.AppRunner(api.app(client_max_size=limits.max_body_bytes + 1))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=api.trust.listener)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield {
            "port": port,
            "server_ca": server_ca,
            "proxy_ca": proxy_ca,
            "tmp": tmp_path,
            "gateway": gateway,
        }
    finally:
        await runner.cleanup()


def _with_server(
    tmp_path: pathlib.Path, body: Callable[[dict[str, Any]], Coroutine[Any, Any, None]]
) -> None:
    async def run() -> None:
        async with serving(tmp_path) as setup:
            await body(setup)

    asyncio.run(run())


async def _request(
    setup: dict[str, Any],
    method: str,
    path: str,
    *,
    client: netnscluster.Issued | None = None,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    import aiohttp

    context = _tls_client(setup["tmp"], setup["server_ca"], client)
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            f"https://127.0.0.1:{setup['port']}{path}",
            ssl=context,
            headers=headers or {},
            data=body,
        ) as reply,
    ):
        return reply.status, dict(reply.headers), await reply.read()


def test_discovery_openapi_and_health_answer_anyone(tmp_path: pathlib.Path) -> None:
    _with_server(tmp_path, _discovery_openapi_and_health_answer_anyone)


async def _discovery_openapi_and_health_answer_anyone(api_server: dict[str, Any]) -> None:
    status, headers, body = await _request(
        api_server, "GET", "/apis", headers={"Accept": aggregated.DISCOVERY_V2}
    )
    assert status == 200
    assert headers["Content-Type"] == aggregated.DISCOVERY_V2
    assert json.loads(body)["kind"] == "APIGroupDiscoveryList"
    status, _, body = await _request(api_server, "GET", "/apis")
    assert json.loads(body)["kind"] == "APIGroupList"
    status, _, body = await _request(api_server, "GET", "/apis/rpc.opkeeper.dev/v1alpha1")
    assert json.loads(body)["resources"][0]["name"] == "xmlrpc"
    for path in ("/openapi/v2", "/openapi/v3", "/openapi/v3/apis/rpc.opkeeper.dev/v1alpha1"):
        status, _, body = await _request(api_server, "GET", path)
        assert status == 200, path
        assert json.loads(body), path
    assert (await _request(api_server, "GET", "/healthz"))[0] == 200  # no feed started
    status, _, body = await _request(api_server, "GET", "/readyz")
    assert status == 503
    assert b"caches" in body


def test_calls_are_401_unless_a_front_proxy_sends_them(tmp_path: pathlib.Path) -> None:
    _with_server(tmp_path, _calls_are_401_unless_a_front_proxy_sends_them)


async def _calls_are_401_unless_a_front_proxy_sends_them(api_server: dict[str, Any]) -> None:
    path = "/apis/rpc.opkeeper.dev/v1alpha1/namespaces/team-a/xmlrpc"
    forged = {"X-Remote-User": "alice", "X-Remote-Group": "system:masters"}
    status, _, body = await _request(api_server, "POST", path, headers=forged, body=b"<x/>")
    assert status == 401
    assert json.loads(body)["reason"] == "Unauthorized"
    wrong_name = netnscluster.issue("someone", by=api_server["proxy_ca"], client=True)
    status, _, _ = await _request(
        api_server, "POST", path, client=wrong_name, headers=forged, body=b"<x/>"
    )
    assert status == 401
    proxy = netnscluster.issue("front-proxy-client", by=api_server["proxy_ca"], client=True)
    status, _, _ = await _request(api_server, "POST", path, client=proxy, body=b"<x/>")
    assert status == 401  # a front proxy that names no user


def test_forbidden_is_a_kubernetes_status(tmp_path: pathlib.Path) -> None:
    _with_server(tmp_path, _forbidden_is_a_kubernetes_status)


async def _forbidden_is_a_kubernetes_status(api_server: dict[str, Any]) -> None:
    proxy = netnscluster.issue("front-proxy-client", by=api_server["proxy_ca"], client=True)
    call = (
        b"<?xml version='1.0'?><methodCall><methodName>operation_create</methodName>"
        b"<params><param><value><string></string></value></param>"
        b"<param><value><string>noop</string></value></param>"
        b"<param><value><struct></struct></value></param></params></methodCall>"
    )
    path = "/apis/rpc.opkeeper.dev/v1alpha1/namespaces/team-a/xmlrpc"
    status, headers, body = await _request(
        api_server, "POST", path, client=proxy, headers={"X-Remote-User": "alice"}, body=call
    )
    assert status == 403
    assert headers["Content-Type"].startswith("application/json")
    answer = json.loads(body)
    assert answer["kind"] == "Status"
    assert answer["reason"] == "Forbidden"
    assert answer["code"] == 403
    assert 'User "alice" cannot create resource "operations"' in answer["message"]
    bad_ns = "/apis/rpc.opkeeper.dev/v1alpha1/namespaces/Not_A_Name/xmlrpc"
    status, _, body = await _request(
        api_server, "POST", bad_ns, client=proxy, headers={"X-Remote-User": "alice"}, body=call
    )
    assert status == 400
    assert json.loads(body)["reason"] == "BadRequest"


def test_every_answer_is_counted_through_the_gateway(tmp_path: pathlib.Path) -> None:
    _with_server(tmp_path, _every_answer_is_counted_through_the_gateway)


async def _every_answer_is_counted_through_the_gateway(api_server: dict[str, Any]) -> None:
    """401, 400, 403 and an oversized body: each counted by the gateway's one finishing
    path (the same metrics as every dialect's calls); the oversized one also closes."""
    proxy = netnscluster.issue("front-proxy-client", by=api_server["proxy_ca"], client=True)
    path = "/apis/rpc.opkeeper.dev/v1alpha1/namespaces/team-a/xmlrpc"
    as_alice = {"X-Remote-User": "alice"}
    assert (await _request(api_server, "POST", path, body=b"<x/>"))[0] == 401
    bad_ns = path.replace("team-a", "Not_A_Name")
    assert (await _request(api_server, "POST", bad_ns, client=proxy, headers=as_alice, body=b""))[
        0
    ] == 400
    create = xmlrpc_client.dumps(("", "noop", {}), "operation_create").encode()
    assert (await _request(api_server, "POST", path, client=proxy, headers=as_alice, body=create))[
        0
    ] == 403
    status, headers, body = await _request(
        api_server, "POST", path, client=proxy, headers=as_alice, body=b"x" * 5000
    )
    assert status == 200
    assert b"<fault>" in body
    assert headers.get("Connection", "").lower() == "close"
    exposition = api_server["gateway"].metrics.exposition().decode()
    for outcome in ("Unauthorized", "BadRequest", "Forbidden"):
        assert f'outcome="{outcome}"' in exposition, outcome


def test_registration_objects() -> None:
    objects = aggregated.registration(
        namespace="opkeeper-system",
        service="opkeeper-aggregated",
        service_account="opkeeper-gateway",
        ca_bundle_pem=b"PEM",
        target_port=8443,
        selector={"app": "gw"},
    )
    kinds = {o["kind"]: o for o in objects}
    assert kinds["APIService"]["metadata"]["name"] == "v1alpha1.rpc.opkeeper.dev"
    assert kinds["APIService"]["spec"]["caBundle"] == "UEVN"
    assert kinds["ClusterRoleBinding"]["roleRef"]["name"] == "system:auth-delegator"
    assert kinds["RoleBinding"]["metadata"]["namespace"] == "kube-system"
    assert kinds["Service"]["spec"]["selector"] == {"app": "gw"}


def test_hostile_bodies_get_the_gateways_faults(tmp_path: pathlib.Path) -> None:
    _with_server(tmp_path, _hostile_bodies_get_the_gateways_faults)


async def _hostile_bodies_get_the_gateways_faults(api_server: dict[str, Any]) -> None:
    """The aggregated path reads bodies with the gateway's own bounded reader and
    decodes them with the same codec: the same faults, before any review is asked."""
    proxy = netnscluster.issue("front-proxy-client", by=api_server["proxy_ca"], client=True)
    path = "/apis/rpc.opkeeper.dev/v1alpha1/namespaces/team-a/xmlrpc"
    cases = {
        b"<methodCall><methodName>x": -32700,
        b'<!DOCTYPE x [<!ENTITY a "aaaa">]><methodCall><methodName>&a;</methodName>'
        b"</methodCall>": -32701,
        b"<methodCall><methodName>" + b"x" * 5000 + b"</methodName></methodCall>": -32702,
        b"<methodCall><methodName>VM.destroy</methodName><params/></methodCall>": -32601,
    }
    for body, code in cases.items():
        status, _, answer = await _request(
            api_server, "POST", path, client=proxy, headers={"X-Remote-User": "alice"}, body=body
        )
        assert status == 200, body[:40]
        with pytest.raises(xmlrpc_client.Fault) as caught:
            xmlrpc_client.loads(answer)
        assert caught.value.faultCode == code, (body[:40], caught.value)
