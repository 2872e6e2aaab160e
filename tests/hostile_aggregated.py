"""The hostile-input suite's adapter for the aggregated API (``rpc.opkeeper.dev``).

The suite posts to the gateway's aggregated TLS listener itself, as
kube-apiserver's front proxy does: a client certificate of the cluster's
front-proxy CA (``pki/proxy-client.*`` of the local control plane, CN
``front-proxy-client``) and the ``X-Remote-User``/``X-Remote-Group`` headers
naming a Kubernetes user. Everything after kube-apiserver is real: the
front-proxy trust read from ``kube-system/extension-apiserver-authentication``,
SubjectAccessReviews against the API server's RBAC, the dispatcher, the
call log. Not through kube-apiserver itself: its aggregator refuses loopback
endpoints, so that path needs a network namespace and a control plane of its
own (tests/aggregated_netns.py, about a minute to start), while this suite
runs hundreds of calls against the session's shared control plane. What
kube-apiserver adds in front (authentication, ``create xmlrpc``) is covered
by tests/test_aggregated_api.py.

Tenants are Kubernetes users here: ``hostile-user-<ns>`` may do everything to
opkeeper objects in its namespace and nothing elsewhere (a Role and a
RoleBinding), ``hostile-reader-<ns>`` may only ``get``/``list`` there. The
cross-tenant matrix adds the Kubernetes terms to the Gandi and gocept cases:
every method in the other namespace is a 403 Status, a reader's writes are
403, and forged identity headers on a connection without the front-proxy
certificate are 401.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import pathlib
import socket
import ssl
import urllib.parse
import weakref
import xmlrpc.client
from collections.abc import Callable, Sequence
from typing import Any, cast

import kubernetes

from opkeeper import GROUP, netnscluster
from opkeeper.gateway import access, aggregated, server
from tests.gateway_support import RunningGateway
from tests.helpers import wait_for
from tests.hostile import (
    OBJECT,
    OPERATION_TYPE,
    Answer,
    GandiAdapter,
    GoceptAdapter,
    MatrixCase,
    Probe,
    RawReply,
    RawRequest,
    StoreProbe,
    Tenant,
    World,
    XmlRpcAdapter,
    classify_xmlrpc,
    connect,
    expect_errors,
    snapshot,
    valid_name,
)

FRONT_PROXY_CN = "front-proxy-client"
"""The CN the local control plane's ``--requestheader-allowed-names`` allows."""
GROUPS = "system:authenticated"
"""The group kube-apiserver adds for every authenticated user."""


def user_of(namespace: str) -> str:
    """The Kubernetes user that is the tenant of ``namespace`` (all opkeeper verbs there)."""
    return f"hostile-user-{namespace}"


def reader_of(namespace: str) -> str:
    """A user who may only read (``get``, ``list``) opkeeper objects in ``namespace``."""
    return f"hostile-reader-{namespace}"


def path_of(namespace: object) -> str:
    """The call's path; a hostile namespace is percent-encoded whole, as a client library
    would put any string into one path segment."""
    quoted = urllib.parse.quote(str(namespace), safe="")
    return f"/apis/{aggregated.GROUP_VERSION}/namespaces/{quoted}/{aggregated.RESOURCE}"


# --- the listener and the front proxy ------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class FrontProxy:
    """The aggregated listener's settings and what a client needs to reach it: the
    serving CA, and the front proxy's client certificate."""

    settings: aggregated.Settings
    serving_ca_pem: str
    client_cert: pathlib.Path
    client_key: pathlib.Path

    def context(self, *, as_front_proxy: bool) -> ssl.SSLContext:
        """A TLS client of the listener, with the front proxy's certificate or none."""
        context = ssl.create_default_context(cadata=self.serving_ca_pem)
        context.check_hostname = False  # the serving certificate names 127.0.0.1 only
        # TLS 1.3 servers send session tickets after the handshake, which the suite's
        # "has the server answered yet?" check (a readable socket) would take for an
        # early answer; TLS 1.2 sends nothing until the reply.
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        if as_front_proxy:
            context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


def front_proxy(kubeconfig: str, directory: pathlib.Path) -> FrontProxy | None:
    """A serving certificate for the aggregated listener on 127.0.0.1, and the control
    plane's front-proxy client certificate; None when the control plane is not the local
    one (``OPKEEPER_TEST_KUBECONFIG``: its front-proxy key is not ours to use)."""
    pki = pathlib.Path(kubeconfig).parent / "pki"
    client_cert, client_key = pki / "proxy-client.crt", pki / "proxy-client.key"
    if not (client_cert.exists() and client_key.exists()):
        return None
    serving_ca = netnscluster.issue("hostile-aggregated-ca")
    serving = netnscluster.issue("hostile-aggregated", by=serving_ca, ips=["127.0.0.1"])
    cert, key = serving.write(directory / "aggregated-serving")
    return FrontProxy(
        settings=aggregated.Settings(cert_file=str(cert), key_file=str(key), port=0),
        serving_ca_pem=serving_ca.cert_pem.decode(),
        client_cert=client_cert,
        client_key=client_key,
    )


_ATTACHED: weakref.WeakKeyDictionary[server.Gateway, tuple[FrontProxy, Any]] = (
    weakref.WeakKeyDictionary()
)


def attach(gw: RunningGateway, proxy: FrontProxy | None, api: kubernetes.client.ApiClient) -> None:
    """Tell the adapter how to reach ``gw``'s aggregated listener (the module's ``gw``
    fixture started it with ``proxy.settings``), and the API client it grants RBAC with."""
    if proxy is not None:
        _ATTACHED[gw.gateway] = (proxy, api)


def _rule(verbs: Sequence[str]) -> dict[str, Any]:
    return {
        "apiGroups": [GROUP],
        "resources": [access.OPERATIONS, access.SCHEDULED_TASKS],
        "verbs": list(verbs),
    }


def grant(api: kubernetes.client.ApiClient, namespace: str) -> None:
    """The namespace's two users and their Roles; returns once RBAC answers for both
    (a review asked earlier would be cached as denied for 30 s)."""
    rbac = kubernetes.client.RbacAuthorizationV1Api(api)
    everything = ["get", "list", "watch", "create", "update", "patch", "delete"]
    for user, verbs in ((user_of(namespace), everything), (reader_of(namespace), ["get", "list"])):
        role = {"metadata": {"name": user}, "rules": [_rule(verbs)]}
        binding = {
            "metadata": {"name": user},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": user},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
        }
        for create, body in (
            (rbac.create_namespaced_role, role),
            (rbac.create_namespaced_role_binding, binding),
        ):
            try:
                create(namespace, body)
            except kubernetes.client.ApiException as exc:
                if exc.status != 409:  # granted before: this namespace's second client
                    raise
    reviews = kubernetes.client.AuthorizationV1Api(api)

    def allowed(user: str, verb: str) -> bool:
        answer = reviews.create_subject_access_review(
            {
                "spec": {
                    "user": user,
                    "groups": [GROUPS],
                    "resourceAttributes": {
                        "namespace": namespace,
                        "verb": verb,
                        "group": GROUP,
                        "resource": access.OPERATIONS,
                    },
                }
            }
        )
        return bool(answer.status.allowed)

    wait_for(
        lambda: allowed(user_of(namespace), "create") and allowed(reader_of(namespace), "list"),
        what=f"RBAC for {namespace}'s users",
    )


# --- answers --------------------------------------------------------------------------------

_STATUS_CLASSES = {
    400: "bad_argument",
    401: "unauthenticated",
    403: "forbidden",
    429: "server",  # the write budget, as the XML-RPC dialects' 429 / 110030 faults class it
}


def classify(reply: RawReply) -> Answer:
    """A call's answer: XML-RPC (HTTP 200, faults included), or a Kubernetes ``Status``
    for what is refused before the call (400, 401, 403) or by the write budget (429); a
    404 is the router's answer for a path that is not a call (a namespace with a ``/``
    in it)."""
    if reply.error is not None or reply.status == 200:
        return classify_xmlrpc(reply)
    if reply.status == 404:
        return Answer(outcome="error", error="not_found", code="404", text=reply.body.decode())
    error = _STATUS_CLASSES.get(reply.status)
    if error is None:
        return Answer(outcome="broken", code=f"HTTP {reply.status}", text=repr(reply.body[:200]))
    try:
        status = json.loads(reply.body)
    except ValueError:
        return Answer(outcome="broken", code=f"HTTP {reply.status}", text="not a Status")
    if status.get("kind") != "Status" or status.get("code") != reply.status:
        return Answer(outcome="broken", code=f"HTTP {reply.status}", text=f"{status!r}")
    return Answer(
        outcome="error", error=error, code=str(reply.status), text=str(status.get("message"))
    )


# --- the client -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class AggregatedClient:
    """Calls as a Kubernetes user, in a namespace (the path's), through the front proxy.

    Duck-types the Gandi and gocept clients (``call``, ``session``, ``apply``), so their
    probes and matrix cases run here unchanged: the session argument is ignored."""

    proxy: FrontProxy
    port: int
    namespace: str
    user: str
    as_front_proxy: bool = True
    session: str = ""
    _kept: list[http.client.HTTPSConnection] = dataclasses.field(
        default_factory=list, init=False, compare=False, repr=False
    )
    """The kept-alive connection (kube-apiserver's proxy keeps its own too): a TLS
    handshake per call would make the suite's hundreds of calls slow."""

    def connect(self, timeout: float = 30.0) -> socket.socket:
        context = self.proxy.context(as_front_proxy=self.as_front_proxy)
        return context.wrap_socket(connect(self.port, timeout=timeout))

    def post(self, body: bytes, *, namespace: object = None) -> RawReply:
        path = path_of(self.namespace if namespace is None else namespace)
        headers = {"Content-Type": "text/xml", "X-Remote-User": self.user, "X-Remote-Group": GROUPS}
        for attempt in (1, 2):
            reused = bool(self._kept)
            if not reused:
                self._kept.append(
                    http.client.HTTPSConnection(
                        "127.0.0.1",
                        self.port,
                        timeout=30,
                        context=self.proxy.context(as_front_proxy=self.as_front_proxy),
                    )
                )
            connection = self._kept[0]
            try:
                connection.request("POST", path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
            except (http.client.HTTPException, OSError) as exc:
                connection.close()
                self._kept.clear()
                if reused and attempt == 1:
                    continue  # the server closed the kept connection meanwhile: a new one
                return RawReply(error=repr(exc))
            if response.will_close:
                connection.close()
                self._kept.clear()
            return RawReply(
                status=response.status,
                headers={k.lower(): v for k, v in response.getheaders()},
                body=data,
            )
        raise AssertionError("unreachable: the second attempt returns")

    def call(self, method: str, *args: Any) -> Answer:
        return classify(self.post(xmlrpc.client.dumps(args, method).encode()))

    def apply(self, *records: dict[str, Any]) -> Answer:
        return self.call("apply", list(records))

    def elsewhere(
        self, *, namespace: str | None = None, user: str | None = None, as_front_proxy: bool = True
    ) -> AggregatedClient:
        return dataclasses.replace(
            self,
            namespace=self.namespace if namespace is None else namespace,
            user=self.user if user is None else user,
            as_front_proxy=as_front_proxy,
        )


# --- the matrix in Kubernetes terms ------------------------------------------------------------


def _calls(c: AggregatedClient, w: World, method: str) -> list[Answer]:
    """``method`` with arguments that would be valid in the attacker's own namespace."""
    own = w.attacker.ids
    args: dict[str, tuple[Any, ...]] = {
        "login": ("",),
        "operation_list": ("",),
        "operation_details": ("", own["shared-done"]),
        "operation_relaunch": ("", own["shared-failed"], {"k": "v"}),
        "operation_cancel": ("", own["shared-wait"]),
        "operation_create": ("", OPERATION_TYPE, {"marker": w.attacker.marker}, OBJECT),
        "query": ("operation",),
        "log": (),
        "apply": ([{"__type__": "operation", "name": "shared-1", "type": OPERATION_TYPE}],),
    }
    return [c.call(method, *args[method])]


def _in_victims_namespace(method: str) -> Callable[[AggregatedClient, World], list[Answer]]:
    def run(c: AggregatedClient, w: World) -> list[Answer]:
        return _calls(c.elsewhere(namespace=w.victim.namespace), w, method)

    return run


def _as_reader(method: str) -> Callable[[AggregatedClient, World], list[Answer]]:
    """A reader of the attacker's own namespace writes there: refused, nothing changes."""

    def run(c: AggregatedClient, w: World) -> list[Answer]:
        before = snapshot(w.api, w.attacker.namespace)
        answers = _calls(c.elsewhere(user=reader_of(w.attacker.namespace)), w, method)
        if snapshot(w.api, w.attacker.namespace) != before:
            answers.append(Answer(outcome="broken", text="the reader changed the namespace"))
        return answers

    return run


def _forged(method: str) -> Callable[[AggregatedClient, World], list[Answer]]:
    """The victim's user named in the headers, on a connection without the front-proxy
    certificate (anyone who reaches the port): 401, whatever the headers say."""

    def run(c: AggregatedClient, w: World) -> list[Answer]:
        forged = c.elsewhere(
            namespace=w.victim.namespace, user=user_of(w.victim.namespace), as_front_proxy=False
        )
        return _calls(forged, w, method)

    return run


def _login_explains(c: AggregatedClient, w: World) -> list[Answer]:
    return [c.call("login", ""), c.call("login", w.attacker.key)]


WRITES = ("operation_relaunch", "operation_cancel", "operation_create", "apply")


def kubernetes_matrix() -> list[MatrixCase[AggregatedClient]]:
    methods = sorted(access.SERVED)
    cases: list[MatrixCase[AggregatedClient]] = [
        MatrixCase(
            method="login",
            what="any session",
            writes=False,
            run=_login_explains,
            expect=expect_errors("bad_argument"),
        )
    ]
    for method in methods:
        cases.append(
            MatrixCase(
                method=method,
                what="in the victim's namespace",
                writes=method in WRITES,
                run=_in_victims_namespace(method),
                # login needs no permission: it only answers that it is not needed
                expect=expect_errors("bad_argument" if method == "login" else "forbidden"),
            )
        )
        cases.append(
            MatrixCase(
                method=method,
                what="forged user without the front-proxy certificate",
                writes=method in WRITES,
                run=_forged(method),
                expect=expect_errors("unauthenticated"),
            )
        )
    cases += [
        MatrixCase(
            method=method,
            what="as a reader of the own namespace",
            writes=True,
            run=_as_reader(method),
            expect=expect_errors("forbidden"),
        )
        for method in WRITES
    ]
    return cases


def _namespace_probe(c: AggregatedClient, value: object) -> Answer:
    return classify(c.post(xmlrpc.client.dumps(("",), "operation_list").encode(), namespace=value))


def _not_gandi_login(case: MatrixCase[Any]) -> bool:
    return case.method != "login"  # Gandi's login cases need an API key; see above


class AggregatedAdapter(XmlRpcAdapter[AggregatedClient]):
    """``POST /apis/rpc.opkeeper.dev/v1alpha1/namespaces/{ns}/xmlrpc`` on the gateway's
    aggregated TLS listener, as kube-apiserver's front proxy."""

    name = "aggregated"
    methods = tuple(sorted(access.SERVED))

    def _front_proxy(self) -> tuple[FrontProxy, kubernetes.client.ApiClient]:
        attached = _ATTACHED.get(self.gateway.gateway)
        if attached is None:
            import pytest

            pytest.skip("no local control plane: its front-proxy client key is needed")
        return cast(tuple[FrontProxy, kubernetes.client.ApiClient], attached)

    @property
    def port(self) -> int:
        return self.gateway.gateway.aggregated_port

    def connect(self, *, timeout: float = 30.0) -> socket.socket:
        proxy, _ = self._front_proxy()
        return proxy.context(as_front_proxy=True).wrap_socket(connect(self.port, timeout=timeout))

    def client(self, tenant: Tenant) -> AggregatedClient:
        proxy, api = self._front_proxy()
        grant(api, tenant.namespace)
        return AggregatedClient(
            proxy=proxy, port=self.port, namespace=tenant.namespace, user=user_of(tenant.namespace)
        )

    @classmethod
    def probes(cls) -> Sequence[Probe[AggregatedClient]]:
        borrowed = cast(
            list[Probe[AggregatedClient]], [*GandiAdapter.probes(), *GoceptAdapter.probes()]
        )
        return [
            *borrowed,
            Probe(
                method="operation_list",
                what="namespace in the path",
                run=_namespace_probe,
                # A valid name is a namespace (someone's: RBAC answers, the matrix checks).
                skip=lambda v: not isinstance(v, str) or valid_name(v),
            ),
        ]

    @classmethod
    def store_probes(cls) -> Sequence[StoreProbe[AggregatedClient]]:
        return cast(
            list[StoreProbe[AggregatedClient]],
            [*GandiAdapter.store_probes(), *GoceptAdapter.store_probes()],
        )

    @classmethod
    def matrix(cls) -> Sequence[MatrixCase[AggregatedClient]]:
        borrowed = [
            case
            for case in [*GandiAdapter.matrix(), *GoceptAdapter.matrix()]
            if _not_gandi_login(case)
        ]
        return [*cast(list[MatrixCase[AggregatedClient]], borrowed), *kubernetes_matrix()]

    def raw_request(self, body: bytes, tenant: Tenant | None) -> RawRequest:
        namespace = "default" if tenant is None else tenant.namespace
        return RawRequest(
            path=path_of(namespace),
            headers={
                "Content-Type": "text/xml",
                "X-Remote-User": user_of(namespace),
                "X-Remote-Group": GROUPS,
            },
            body=body,
        )

    def classify(self, reply: RawReply) -> Answer:
        return classify(reply)

    @classmethod
    def wrap(cls, value_xml: bytes) -> bytes:
        return GandiAdapter.wrap(value_xml)

    def fuzz_seeds(self, world: World) -> Sequence[tuple[str, tuple[Any, ...]]]:
        self.client(world.attacker)  # its RBAC
        ids = world.attacker.ids
        return [
            ("login", ("",)),
            ("operation_list", ("", {"state": "DONE", "type": OPERATION_TYPE})),
            ("operation_details", ("", ids["shared-done"])),
            ("operation_cancel", ("", ids["shared-wait"])),
            ("operation_relaunch", ("", ids["shared-failed"], {"k": "v"})),
            ("operation_create", ("", "fuzz", {"k": 1}, OBJECT)),
            ("query", ("operation", {"name": "shared-1"})),
            ("log", (0,)),
            ("apply", ([{"__type__": "operation", "name": "fuzz-a", "type": "fuzz"}],)),
        ]
