"""XML-RPC through the Kubernetes API server: the aggregated API ``rpc.opkeeper.dev/v1alpha1``.

kubectl and in-cluster clients reach the Gandi and gocept methods with their
own Kubernetes identity instead of an API key:
``POST /apis/rpc.opkeeper.dev/v1alpha1/namespaces/{ns}/xmlrpc`` on the API
server, which authenticates the caller, checks that it may ``create``
``xmlrpc`` in ``{ns}`` and proxies the request here (an APIService). This
listener is TLS of its own (the API server verifies its certificate against
the APIService's ``caBundle``).

- Who calls: :mod:`.frontproxy` (the request headers, believed only from the
  API server's proxy client certificate).
- What they may do: :mod:`.access` (a SubjectAccessReview per permission the
  method needs, cached).
- The call itself: the same :class:`rpc.Dispatcher` path and dialect methods as
  ``POST /xmlrpc``, with the Kubernetes user as the call's identity
  (:attr:`rpc.Request.identity`) and ``{ns}`` as its namespace. Gandi's session
  argument is accepted (any string) and ignored; ``login`` answers a fault
  saying so.

Discovery (``/apis``, the group, the version's APIResourceList, and the
aggregated ``apidiscovery.k8s.io/v2`` form kube-apiserver asks for first),
OpenAPI v2 and v3 and the health endpoints answer every TLS client, with no
dependency on the API server or the caches: an aggregated API whose
discovery fails makes the namespace controller stop deleting namespaces in the
whole cluster, so discovery must keep answering whatever else is unwell.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import ipaddress
import json
import logging
import math
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from opkeeper import errors, kube, names
from opkeeper.gateway import access, auth, faults, frontproxy, kubeio, rpc
from opkeeper.gateway.dialects import gandi, gocept

log = logging.getLogger(__name__)

GROUP = "rpc.opkeeper.dev"
VERSION = "v1alpha1"
GROUP_VERSION = f"{GROUP}/{VERSION}"
RESOURCE = "xmlrpc"
KIND = "XMLRPC"
CALL_PATH = f"/apis/{GROUP_VERSION}/namespaces/{{namespace}}/{RESOURCE}"
KUBERNETES_IDENTITY = auth.KeyHash("kubernetes")
"""The ``key_hash`` of identities the aggregation layer vouches for (no API key)."""

DISCOVERY_V2 = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
DISCOVERY_V2BETA1 = "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList"
_AGGREGATED = {"v2": DISCOVERY_V2, "v2beta1": DISCOVERY_V2BETA1}
XML = "text/xml"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """The aggregated API's listener (``opkeeper gateway --aggregated-port ...``)."""

    cert_file: str
    """Serving certificate (PEM); its CA goes into the APIService's ``caBundle`` and it
    must name ``<service>.<namespace>.svc``, the name kube-apiserver checks."""
    key_file: str
    """The serving certificate's private key (PEM)."""
    host: str = "127.0.0.1"
    """Listen address (default loopback, like the gateway's own listener; a Pod passes
    its own address, which the API server reaches over the Pod network)."""
    port: int = 8443
    """TLS port (default 8443); the Service's targetPort."""
    access: access.Settings = dataclasses.field(default_factory=access.Settings)
    trust_wait_seconds: float = 10.0
    """How long startup waits for the first read of the front-proxy ConfigMap before
    listening anyway (default 10 s); until it is read every call is 401."""
    keepalive_timeout_seconds: float = 120.0
    """How long an idle connection is kept open (default 120 s). Longer than
    kube-apiserver's proxy keeps its idle connections to us (Go's 90 s), so the API
    server closes them, never we: a connection we close just as it sends the next call
    on it fails that call, and every reopened one costs a TLS handshake."""


# --- discovery and OpenAPI (pure) ----------------------------------------------------

_VERSION_REF = {"groupVersion": GROUP_VERSION, "version": VERSION}


def api_group() -> dict[str, Any]:
    return {
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": GROUP,
        "versions": [_VERSION_REF],
        "preferredVersion": _VERSION_REF,
    }


def api_group_list() -> dict[str, Any]:
    group = api_group()
    del group["kind"], group["apiVersion"]
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [group]}


def api_resource_list() -> dict[str, Any]:
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": GROUP_VERSION,
        "resources": [
            {
                "name": RESOURCE,
                "singularName": RESOURCE,
                "namespaced": True,
                "kind": KIND,
                "verbs": ["create"],
            }
        ],
    }


def aggregated_discovery(version: str) -> dict[str, Any]:
    """The ``APIGroupDiscoveryList`` (``apidiscovery.k8s.io/<version>``) for ``/apis``."""
    return {
        "kind": "APIGroupDiscoveryList",
        "apiVersion": f"apidiscovery.k8s.io/{version}",
        "metadata": {},
        "items": [
            {
                "metadata": {"name": GROUP},
                "versions": [
                    {
                        "version": VERSION,
                        "resources": [
                            {
                                "resource": RESOURCE,
                                "responseKind": {"group": GROUP, "version": VERSION, "kind": KIND},
                                "scope": "Namespaced",
                                "singularResource": RESOURCE,
                                "verbs": ["create"],
                            }
                        ],
                        "freshness": "Current",
                    }
                ],
            }
        ],
    }


def aggregated_version(accept: str) -> str | None:
    """The aggregated discovery version an Accept header asks for first (``v2`` or
    ``v2beta1``), or None when it asks for the plain ``APIGroupList``."""
    for media_range in accept.split(","):
        kind, *raw = (part.strip() for part in media_range.split(";"))
        if kind not in ("application/json", "*/*"):
            continue
        params = dict(p.partition("=")[::2] for p in raw)
        if params.get("g") == "apidiscovery.k8s.io" and params.get("as") == "APIGroupDiscoveryList":
            version = params.get("v", "")
            if version in _AGGREGATED:
                return version
    return None


_DESCRIPTION = (
    "Run one XML-RPC call (Gandi operation_* methods, gocept apply/query/log) in the"
    " namespace, as the calling Kubernetes user. The body is an XML-RPC methodCall;"
    " the answer is its methodResponse (a fault is a 200 too). Gandi's session argument"
    " is ignored (send any string)."
)


def openapi_v2() -> dict[str, Any]:
    return {
        "swagger": "2.0",
        "info": {"title": "opkeeper aggregated XML-RPC", "version": VERSION},
        "paths": {
            CALL_PATH: {
                "parameters": [
                    {
                        "name": "namespace",
                        "in": "path",
                        "required": True,
                        "type": "string",
                        "uniqueItems": True,
                        "description": "the namespace whose operations the call sees",
                    }
                ],
                "post": {
                    "operationId": "createRpcOpkeeperDevV1alpha1NamespacedXMLRPC",
                    "description": _DESCRIPTION,
                    "consumes": [XML],
                    "produces": [XML, "application/json"],
                    "schemes": ["https"],
                    "tags": ["rpcOpkeeperDev_v1alpha1"],
                    "parameters": [
                        {
                            "name": "body",
                            "in": "body",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": {"description": "the methodResponse", "schema": {"type": "string"}},
                        "401": {"description": "Unauthorized"},
                        "403": {"description": "Forbidden (a Kubernetes Status)"},
                    },
                    "x-kubernetes-action": "post",
                    "x-kubernetes-group-version-kind": {
                        "group": GROUP,
                        "version": VERSION,
                        "kind": KIND,
                    },
                },
            }
        },
        "definitions": {},
    }


def openapi_v3() -> dict[str, Any]:
    """The OpenAPI 3 document of ``rpc.opkeeper.dev/v1alpha1``."""
    return {
        "openapi": "3.0.0",
        "info": {"title": "opkeeper aggregated XML-RPC", "version": VERSION},
        "paths": {
            CALL_PATH: {
                "parameters": [
                    {
                        "name": "namespace",
                        "in": "path",
                        "required": True,
                        "description": "the namespace whose operations the call sees",
                        "schema": {"type": "string", "uniqueItems": True},
                    }
                ],
                "post": {
                    "operationId": "createRpcOpkeeperDevV1alpha1NamespacedXMLRPC",
                    "description": _DESCRIPTION,
                    "tags": ["rpcOpkeeperDev_v1alpha1"],
                    "requestBody": {
                        "required": True,
                        "content": {XML: {"schema": {"type": "string"}}},
                    },
                    "responses": {
                        "200": {
                            "description": "the methodResponse",
                            "content": {XML: {"schema": {"type": "string"}}},
                        },
                        "401": {"description": "Unauthorized"},
                        "403": {"description": "Forbidden (a Kubernetes Status)"},
                    },
                    "x-kubernetes-action": "post",
                    "x-kubernetes-group-version-kind": {
                        "group": GROUP,
                        "version": VERSION,
                        "kind": KIND,
                    },
                },
            }
        },
        "components": {"schemas": {}},
    }


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


_V3_BODY = _json(openapi_v3())
_V3_HASH = hashlib.sha512(_V3_BODY).hexdigest()[:32].upper()


def openapi_v3_root() -> dict[str, Any]:
    return {
        "paths": {
            f"apis/{GROUP_VERSION}": {
                "serverRelativeURL": f"/openapi/v3/apis/{GROUP_VERSION}?hash={_V3_HASH}"
            }
        }
    }


def status(
    code: int, reason: str, message: str, *, retry_after: float | None = None
) -> web.Response:
    """A Kubernetes ``Status`` answer (what kubectl and client libraries parse); with
    ``retry_after``, the seconds (whole, at least 1) in ``details.retryAfterSeconds`` and
    the ``Retry-After`` header, as kube-apiserver sends with a 429."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    headers: dict[str, str] = {}
    if retry_after is not None:
        seconds = max(1, math.ceil(retry_after))
        body["details"] = {"retryAfterSeconds": seconds}
        headers["Retry-After"] = str(seconds)
    return web.Response(
        status=code, body=_json(body), content_type="application/json", headers=headers
    )


# --- the methods served here -----------------------------------------------------------


async def _login(d: rpc.Dispatcher, call: rpc.Call) -> str:
    raise errors.InvalidArgument(
        "no login through the Kubernetes API: your Kubernetes identity is the session;"
        " pass any string (e.g. an empty one) as the session argument"
    )


def methods() -> dict[str, rpc.Method]:
    """The Gandi and gocept methods :mod:`.access` has a permission mapping for, and a
    ``login`` that explains it is not needed. Nothing else is served here: a method
    without a mapping would run unchecked."""
    table = {
        name: method
        for module in (gandi, gocept)
        for name, method in module.METHODS.items()
        if name in access.SERVED
    }
    table["login"] = rpc.Method(
        dialect=gandi.DIALECT, faults=faults.GANDI, handler=_login, logged=False
    )
    return table


def forwarded_address(header: str | None, peer: str) -> str:
    """The original client's address from the front proxy's X-Forwarded-For (its first
    entry, if it is an IP address), else the peer's (the API server's)."""
    return _address((header or "").split(",")[0].strip()) or peer


ADDRESS_CACHE_SIZE = 1024
"""Distinct X-Forwarded-For addresses whose parsed form is kept (the same few clients
call again and again; parsing one costs more than the rest of the header handling)."""


@functools.lru_cache(maxsize=ADDRESS_CACHE_SIZE)
def _address(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


ReadBody = Callable[[web.Request], Awaitable[bytes | Exception]]


class Finish(Protocol):
    """How a call's answer leaves: :meth:`opkeeper.gateway.server.Gateway._finish`, the
    one place every dialect's calls are counted and timed (and a connection whose body
    was left unread is closed)."""

    def __call__(
        self,
        response: web.Response,
        *,
        body: bytes | Exception,
        dialect: str,
        method: str,
        outcome: str,
        started: float,
    ) -> web.Response: ...


class API:
    """The aggregated API server: its front-proxy trust, authorizer and HTTP routes."""

    def __init__(
        self,
        *,
        settings: Settings,
        dispatcher: rpc.Dispatcher,
        kube_client: kube.Client,
        read_body: ReadBody,
        finish: Finish,
        ready: Callable[[], bool],
    ) -> None:
        self.settings = settings
        self.trust = frontproxy.TrustStore(
            serving=frontproxy.ServingCert(cert_file=settings.cert_file, key_file=settings.key_file)
        )
        self.authorizer = access.Authorizer(reviews=kube_client, settings=settings.access)
        self.dispatcher = rpc.Dispatcher(
            svc=dispatcher.svc,
            sessions=dispatcher.sessions,
            keyring=dispatcher.keyring,
            methods=methods(),
            limits=dispatcher.limits,
            on_log_failure=dispatcher.on_log_failure,
        )
        self._kube = kube_client
        self._read_body = read_body
        self._finish = finish
        self._peer_names: weakref.WeakKeyDictionary[asyncio.BaseTransport, str | None] = (
            weakref.WeakKeyDictionary()
        )
        """Each TLS connection's client certificate CN: fixed at its handshake, and
        decoding the certificate again for every call on it is measurable."""
        self._ready = ready
        self.trust_synced = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Watch the front-proxy ConfigMap; return once it was read (or after
        ``trust_wait_seconds``, logged: calls are 401 until it is read)."""
        stream = self._kube.stream(
            kube.CONFIGMAPS,
            namespace=frontproxy.CONFIGMAP_NAMESPACE,
            field_selector=f"metadata.name={frontproxy.CONFIGMAP_NAME}",
        )
        task = asyncio.create_task(
            kubeio.feed(stream, into=self.trust, synced=self.trust_synced), name="feed-frontproxy"
        )
        task.add_done_callback(_crashed)
        self._tasks.append(task)
        try:
            async with asyncio.timeout(self.settings.trust_wait_seconds):
                await self.trust_synced.wait()
        except TimeoutError:
            log.error(
                "%s/%s not read within %g s (does the gateway's account have the"
                " extension-apiserver-authentication-reader Role?); aggregated calls are"
                " refused until it is",
                frontproxy.CONFIGMAP_NAMESPACE,
                frontproxy.CONFIGMAP_NAME,
                self.settings.trust_wait_seconds,
            )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    # --- HTTP -------------------------------------------------------------------------

    def app(self, *, middlewares: tuple[Any, ...] = (), client_max_size: int) -> web.Application:
        application = web.Application(client_max_size=client_max_size, middlewares=middlewares)
        application.add_routes(
            [
                web.post(CALL_PATH, self.call),
                web.get("/apis", self.apis),
                web.get(f"/apis/{GROUP}", self.group),
                web.get(f"/apis/{GROUP_VERSION}", self.resources),
                web.get("/openapi/v2", self.openapi_v2),
                web.get("/openapi/v3", self.openapi_v3_root),
                web.get(f"/openapi/v3/apis/{GROUP_VERSION}", self.openapi_v3),
                web.get("/healthz", self.healthz),
                web.get("/livez", self.healthz),
                web.get("/readyz", self.readyz),
            ]
        )
        return application

    async def apis(self, request: web.Request) -> web.Response:
        version = aggregated_version(request.headers.get("Accept", ""))
        if version is None:
            body, content_type = _json(api_group_list()), "application/json"
        else:
            body, content_type = _json(aggregated_discovery(version)), _AGGREGATED[version]
        return web.Response(body=body, headers={"Content-Type": content_type, "Vary": "Accept"})

    async def group(self, request: web.Request) -> web.Response:
        return web.json_response(api_group())

    async def resources(self, request: web.Request) -> web.Response:
        return web.json_response(api_resource_list())

    async def openapi_v2(self, request: web.Request) -> web.Response:
        return web.Response(body=_json(openapi_v2()), content_type="application/json")

    async def openapi_v3_root(self, request: web.Request) -> web.Response:
        return web.Response(body=_json(openapi_v3_root()), content_type="application/json")

    async def openapi_v3(self, request: web.Request) -> web.Response:
        return web.Response(
            body=_V3_BODY,
            content_type="application/json",
            headers={"Cache-Control": "public, immutable", "Etag": f'"{_V3_HASH}"'},
        )

    async def healthz(self, request: web.Request) -> web.Response:
        dead = [t.get_name() for t in self._tasks if t.done()]
        if dead:
            return web.Response(status=500, text=f"stopped: {', '.join(dead)}\n")
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        waiting = [
            what
            for what, done in (
                ("front-proxy trust", self.trust.trust is not None),
                ("caches", self._ready()),
            )
            if not done
        ]
        if waiting:
            return web.Response(status=503, text=f"waiting for: {', '.join(waiting)}\n")
        return web.Response(text="ok\n")

    def _caller(self, request: web.Request) -> frontproxy.User | None:
        """The user a verified front proxy names, or None (the answer is then 401)."""
        trust = self.trust.trust
        transport = request.transport
        if trust is None or transport is None:
            return None
        try:
            name = self._peer_names[transport]
        except KeyError:
            name = self._peer_names[transport] = frontproxy.common_name(
                transport.get_extra_info("peercert")
            )
        if not frontproxy.cn_allowed(trust, name):
            return None
        return frontproxy.user_from(trust, request.headers)

    async def call(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        answer, body, outcome = await self._answer(request)
        return self._finish(
            answer,
            body=body,
            dialect="none" if outcome is None else outcome.dialect,
            method="unknown" if outcome is None else outcome.method,
            outcome=_outcome(answer, outcome),
            started=started,
        )

    async def _answer(
        self, request: web.Request
    ) -> tuple[web.Response, bytes | Exception, rpc.Outcome | None]:
        """The answer to one call, the body as read (an exception when it was not: too
        large, too slow) and the dispatcher's outcome when the call got that far."""
        user = self._caller(request)
        if user is None:
            answer = status(
                401,
                "Unauthorized",
                "call through the Kubernetes API server: only its front proxy is believed here",
            )
            return answer, b"", None
        try:
            namespace = names.namespace(request.match_info["namespace"])
        except names.InvalidName as exc:
            return status(400, "BadRequest", str(exc)), b"", None
        body = await self._read_body(request)
        if isinstance(body, Exception):
            fault, encoded = faults.XMLRPC.encode(body)
            outcome = rpc.Outcome(body=encoded, dialect="none", method="unknown", fault=fault)
            return web.Response(body=encoded, content_type=XML, charset="utf-8"), body, outcome

        async def admit(method: str, call: rpc.Call) -> None:
            await self.authorizer.require(
                user=user,
                namespace=namespace,
                method=method,
                needed=access.checks(method, call.params),
            )

        identity = auth.Identity(
            user_id=user.name, tenant=auth.Tenant(namespace), key_hash=KUBERNETES_IDENTITY
        )
        try:
            outcome = await self.dispatcher.handle(
                body=body,
                request=rpc.Request(
                    address=forwarded_address(
                        request.headers.get("X-Forwarded-For"), request.remote or ""
                    ),
                    authorization=None,
                    now=datetime.datetime.now(datetime.UTC),
                    identity=identity,
                ),
                admit=admit,
            )
        except access.Denied as exc:
            return status(403, "Forbidden", str(exc)), body, None
        except errors.Unavailable as exc:
            log.warning("authorization unavailable: %s", exc)
            return status(503, "ServiceUnavailable", str(exc)), body, None
        if outcome.retry_after is not None and outcome.fault is not None:
            message, wait = outcome.fault.message, outcome.retry_after
            return status(429, "TooManyRequests", message, retry_after=wait), body, outcome
        return web.Response(body=outcome.body, content_type=XML, charset="utf-8"), body, outcome


_STATUS_OUTCOMES = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    503: "ServiceUnavailable",
}
"""The metrics outcome of an answer that is a Kubernetes Status (no XML-RPC outcome)."""


def _outcome(answer: web.Response, outcome: rpc.Outcome | None) -> str:
    """The metrics outcome: the XML-RPC one (``ok`` or the fault's name), else the
    Status's reason."""
    if outcome is not None:
        return "ok" if outcome.fault is None else outcome.fault.name
    return _STATUS_OUTCOMES.get(answer.status, str(answer.status))


def _crashed(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("aggregated API task %s died", task.get_name(), exc_info=task.exception())


# --- registration ------------------------------------------------------------------------

CALLER_CLUSTER_ROLE = "opkeeper-xmlrpc-caller"
"""The ClusterRole that lets a user through kube-apiserver's own check (``create`` on
``xmlrpc.rpc.opkeeper.dev``); what the call may then do is RBAC on opkeeper.dev."""


def registration(
    *,
    namespace: str,
    service: str,
    service_account: str,
    ca_bundle_pem: bytes,
    target_port: int,
    selector: dict[str, str] | None,
) -> list[dict[str, Any]]:
    """The objects that make kube-apiserver serve ``rpc.opkeeper.dev/v1alpha1`` from the
    gateway: the APIService (``caBundle``: the CA of the serving certificate), its
    Service (``selector`` None: endpoints are managed by hand, as in the tests), the
    ``system:auth-delegator`` ClusterRoleBinding (SubjectAccessReviews), the
    ``extension-apiserver-authentication-reader`` RoleBinding in kube-system (the
    front-proxy CA) and the callers' ClusterRole. The Helm chart's
    ``templates/aggregated-api.yaml`` renders the same registration (its Service is
    the gateway's own, its caller ClusterRole is named after the release)."""
    subject = {"kind": "ServiceAccount", "name": service_account, "namespace": namespace}
    spec: dict[str, Any] = {"ports": [{"name": "https", "port": 443, "targetPort": target_port}]}
    if selector is not None:
        spec["selector"] = selector
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": service, "namespace": namespace},
            "spec": spec,
        },
        {
            "apiVersion": "apiregistration.k8s.io/v1",
            "kind": "APIService",
            "metadata": {"name": f"{VERSION}.{GROUP}"},
            "spec": {
                "group": GROUP,
                "version": VERSION,
                "service": {"namespace": namespace, "name": service, "port": 443},
                "caBundle": base64.b64encode(ca_bundle_pem).decode("ascii"),
                "groupPriorityMinimum": 1000,
                "versionPriority": 15,
            },
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": f"{service}:system:auth-delegator"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:auth-delegator",
            },
            "subjects": [subject],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {
                "name": f"{service}:extension-apiserver-authentication-reader",
                "namespace": frontproxy.CONFIGMAP_NAMESPACE,
            },
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "extension-apiserver-authentication-reader",
            },
            "subjects": [subject],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": CALLER_CLUSTER_ROLE},
            "rules": [{"apiGroups": [GROUP], "resources": [RESOURCE], "verbs": ["create"]}],
        },
    ]
