"""A small async Kubernetes client on aiohttp, shared by the controller and the gateway.

Why not the official client: it is synchronous (a thread per call would cap
throughput and hide where time goes), and its async sibling brings another
code generator's worth of models we never use. We need a handful of verbs on
a handful of resources, every patch flavour (merge, JSON, server-side apply),
the status subresource, preconditions, and a list+watch stream with
bookmarks that the gateway's cache and the ID allocator can share. Each HTTP
error becomes an :mod:`opkeeper.errors` exception, so callers branch on
meaning, not on status codes. Every write is counted by verb and resource,
so "API writes per operation" is measured, not guessed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
import random
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal

import aiohttp

from opkeeper import API_VERSION, GROUP, VERSION, errors, kubeauth, kuberetry, names

logger = logging.getLogger(__name__)

Body = dict[str, Any]
PatchType = Literal["merge", "json", "strategic", "apply"]

_CONTENT_TYPES: Mapping[PatchType, str] = {
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
    "strategic": "application/strategic-merge-patch+json",
    "apply": "application/apply-patch+yaml",
}


class AlreadyExists(errors.Conflict):
    """A create found an object of that name (409 with reason AlreadyExists)."""


class Expired(errors.OpkeeperError):
    """A watch's resourceVersion is too old (410 Gone): list again."""


class Throttled(errors.Unavailable):
    """The API server shed the call (429) longer than the retry budget allows."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        """Seconds the server asked us to wait (``Retry-After``), if it said."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Resource:
    """One API resource: where it lives on the API server."""

    group: str
    """API group; empty for the core group (``/api/v1``)."""
    version: str
    plural: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(
        self,
        *,
        namespace: str | None = None,
        name: str | None = None,
        subresource: str | None = None,
    ) -> str:
        """The URL path of the collection, or of one object (and a subresource).

        Every segment is checked (:func:`opkeeper.names.path_segment`): a value that
        is not a valid name raises :class:`opkeeper.names.InvalidName` instead of
        becoming a path the server would resolve (``..``, ``/``, ``%2F``, ``?``).
        """
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace is not None:
            base += f"/namespaces/{names.path_segment(namespace, kind='namespace')}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{names.path_segment(name, kind='name')}"
            if subresource is not None:
                base += f"/{names.path_segment(subresource, kind='subresource')}"
        return base


OPERATIONS = Resource(group=GROUP, version=VERSION, plural="operations")
SCHEDULED_TASKS = Resource(group=GROUP, version=VERSION, plural="scheduledtasks")
CONFIGMAPS = Resource(group="", version="v1", plural="configmaps")
NAMESPACES = Resource(group="", version="v1", plural="namespaces", namespaced=False)
EVENTS = Resource(group="", version="v1", plural="events")
JOBS = Resource(group="batch", version="v1", plural="jobs")
SECRETS = Resource(group="", version="v1", plural="secrets")
LEASES = Resource(group="coordination.k8s.io", version="v1", plural="leases")

assert OPERATIONS.api_version == API_VERSION


@dataclasses.dataclass(frozen=True, kw_only=True)
class Credentials:
    """Where the API server is and how to authenticate to it."""

    server: str
    """Base URL, e.g. ``https://127.0.0.1:6443``."""
    ssl_context: ssl.SSLContext | bool
    """TLS settings (CA, client certificate); False only for plain-HTTP test servers."""
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Extra headers, e.g. ``Authorization: Bearer ...``."""
    ca_path: str | None = None
    """The CA file behind ``ssl_context`` (for handing the same login to kopf)."""
    cert_path: str | None = None
    key_path: str | None = None
    insecure: bool = False
    source: kubeauth.TokenSource | None = None
    """Where a changing ``Authorization`` comes from (a token file, an exec plugin);
    asked before every request, told about every 401 (:mod:`opkeeper.kubeauth`)."""

    @classmethod
    def from_kubeconfig(cls, path: str | None = None, *, context: str | None = None) -> Credentials:
        """Credentials of a kubeconfig (default: ``$KUBECONFIG`` or ``~/.kube/config``).

        The official client's loader parses clusters, certificates and static
        tokens as kubectl would. A user's ``tokenFile`` and ``exec`` plugin are
        taken out of its hands: it would read or run them once, and we refresh
        them (:class:`kubeauth.TokenFile`, :class:`kubeauth.ExecPlugin`).
        """
        import kubernetes  # a heavy import, needed only here
        from kubernetes.config import kube_config

        merged = kube_config.KubeConfigMerger(  # type: ignore[no-untyped-call]
            path or os.environ.get("KUBECONFIG", "~/.kube/config")
        ).config
        if merged is None:
            raise kubernetes.config.ConfigException(
                "Invalid kube-config file. No configuration found."
            )
        stanza, base = _kubeconfig_user(merged, context)
        file_source: str | None = None
        exec_stanza: dict[str, Any] | None = None
        if stanza is not None and not {"auth-provider", "token"} & set(stanza):
            if stanza.get("tokenFile"):
                file_source = os.path.join(base or "", os.path.expanduser(stanza.pop("tokenFile")))
            elif stanza.get("exec"):
                exec_stanza = stanza.pop("exec")
        config = kubernetes.client.Configuration()
        kube_config.KubeConfigLoader(  # type: ignore[no-untyped-call]
            config_dict=merged, active_context=context, config_base_path=None
        ).load_and_set(config)
        credentials = cls._from_configuration(config)
        if file_source is not None:
            tokens = kubeauth.TokenFile(file_source)
            tokens.read()  # a missing file is an error now, not at the first call
            return dataclasses.replace(credentials, source=tokens)
        if exec_stanza is not None:
            plugin = kubeauth.ExecPlugin(
                kubeauth.ExecConfig.from_kubeconfig(exec_stanza, base=base),
                ssl_context=credentials.ssl_context
                if isinstance(credentials.ssl_context, ssl.SSLContext)
                else None,
            )
            return dataclasses.replace(credentials, source=plugin)
        return credentials

    @classmethod
    def in_cluster(
        cls,
        *,
        token_path: str | os.PathLike[str] = kubeauth.SERVICE_ACCOUNT_DIR / "token",
        ca_path: str | os.PathLike[str] = kubeauth.SERVICE_ACCOUNT_DIR / "ca.crt",
        environ: Mapping[str, str] = os.environ,
    ) -> Credentials:
        """Credentials of the pod's service account; the token file is re-read every
        minute and after a 401, as the kubelet rotates it."""
        import kubernetes

        server = kubeauth.in_cluster_server(environ)
        if server is None:
            raise kubernetes.config.ConfigException(
                "not in a cluster: KUBERNETES_SERVICE_HOST/PORT are not set"
            )
        tokens = kubeauth.TokenFile(token_path)
        try:
            tokens.read()
        except errors.Unauthenticated as exc:
            raise kubernetes.config.ConfigException(str(exc)) from None
        return cls(
            server=server,
            ssl_context=ssl.create_default_context(cafile=str(ca_path)),
            ca_path=str(ca_path),
            source=tokens,
        )

    @classmethod
    def auto(cls, kubeconfig: str | None = None) -> Credentials:
        """The kubeconfig if given or present, else the service account."""
        import kubernetes

        if kubeconfig is not None:
            return cls.from_kubeconfig(kubeconfig)
        try:
            return cls.from_kubeconfig()
        except kubernetes.config.ConfigException:
            return cls.in_cluster()

    @classmethod
    def _from_configuration(cls, config: Any) -> Credentials:
        context: ssl.SSLContext | bool
        if config.host.startswith("http://"):
            context = False
        else:
            context = ssl.create_default_context(cafile=config.ssl_ca_cert)
            if not config.verify_ssl:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if config.cert_file:
                context.load_cert_chain(config.cert_file, config.key_file)
        headers: dict[str, str] = {}
        # The official client keeps a kubeconfig's or a service account's token under
        # "BearerToken" (older releases: "authorization").
        token = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix(
            "authorization"
        )
        if token:
            headers["Authorization"] = token
        return cls(
            server=config.host.rstrip("/"),
            ssl_context=context,
            headers=headers,
            ca_path=config.ssl_ca_cert,
            cert_path=config.cert_file,
            key_path=config.key_file,
            insecure=not config.verify_ssl,
        )


def _kubeconfig_user(merged: Any, context: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """The current context's ``user`` stanza (the dict inside the merged config, so
    that removing a key hides it from the official loader) and its file's directory."""
    name = context or merged["current-context"]
    user_name = merged["contexts"].get_with_name(name)["context"].safe_get("user")
    if not user_name or not merged.safe_get("users"):
        return None, None
    user = merged["users"].get_with_name(user_name, safe=True)
    if user is None or not isinstance(user.safe_get("user"), dict):
        return None, None
    base = os.path.dirname(os.path.abspath(user.path)) if user.path else None
    stanza: dict[str, Any] = user["user"].value
    return stanza, base


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObjectList:
    """The result of a list: the items and the collection's resourceVersion to watch from."""

    items: list[Body]
    resource_version: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class WatchEvent:
    """One change seen by :meth:`Client.stream`.

    ``SYNC`` carries the complete list (``objects``) after a (re)list: a cache
    replaces its content with it, which is how it learns of deletions missed
    while the watch was down. The other types carry one ``object``.
    """

    type: Literal["SYNC", "ADDED", "MODIFIED", "DELETED"]
    object: Body | None = None
    objects: list[Body] | None = None


_CHANGES: Mapping[str, Literal["ADDED", "MODIFIED", "DELETED"]] = {
    "ADDED": "ADDED",
    "MODIFIED": "MODIFIED",
    "DELETED": "DELETED",
}


def resource_version_of(body: Mapping[str, Any]) -> int:
    """The object's resourceVersion as a number (etcd revisions are integers).

    Kubernetes calls resourceVersions opaque; every etcd-backed server hands out
    integers, and comparing them is how we drop watch events older than our own
    last write. A non-numeric value compares as 0 (always "older or unknown").
    """
    raw = body.get("metadata", {}).get("resourceVersion", "")
    return int(raw) if isinstance(raw, str) and raw.isdigit() else 0


def is_newer(body: Mapping[str, Any], *, than: Mapping[str, Any] | None) -> bool:
    """Whether ``body`` is a later version of the object than ``than`` (None: nothing held).

    A write's answer can reach a controller after the watch events of later writes by
    others, so a held body is replaced only by a newer one, whichever path brought it.
    """
    return than is None or resource_version_of(body) > resource_version_of(than)


class Client:
    """An async client for the few resources opkeeper touches."""

    def __init__(
        self,
        credentials: Credentials,
        *,
        timeout: float = 30.0,
        field_manager: str = "opkeeper",
        connection_limit: int = 100,
        retry: kuberetry.Policy = kuberetry.DEFAULT_POLICY,
    ) -> None:
        self._credentials = credentials
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._field_manager = field_manager
        self._connection_limit = connection_limit
        self._retry = retry
        self._session: aiohttp.ClientSession | None = None
        self._retired: list[aiohttp.ClientSession] = []
        self._generation = 0
        self.retries: collections.Counter[str] = collections.Counter()
        """Repeated attempts by cause (``429``, ``503``, ``connect``, ``401``...), for metrics."""
        self.writes: collections.Counter[tuple[str, str]] = collections.Counter()
        """Writes made by this client, by (verb, resource[/subresource]); for metrics and bench."""

    @property
    def session(self) -> aiohttp.ClientSession:
        # Created lazily: an aiohttp session must be made inside the running loop.
        source = self._credentials.source
        if source is not None and source.generation != self._generation:
            # A new client certificate: connections made with the old one are stale;
            # calls still on them finish, the session closes with the client.
            self._generation = source.generation
            if self._session is not None:
                self._retired.append(self._session)
                self._session = None
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                base_url=self._credentials.server,
                headers=dict(self._credentials.headers),
                connector=aiohttp.TCPConnector(
                    ssl=self._credentials.ssl_context, limit=self._connection_limit
                ),
                timeout=self._timeout,
            )
        return self._session

    async def close(self) -> None:
        for session in (*self._retired, self._session):
            if session is not None:
                await session.close()
        self._retired.clear()

    async def _authorization(self) -> str | None:
        source = self._credentials.source
        return None if source is None else await source.header()

    async def _refresh(self, rejected: str | None, what: str) -> None:
        """A 401 with our current credential: renew it (once per call)."""
        source = self._credentials.source
        assert source is not None
        self.retries["401"] += 1
        logger.info("%s: 401 from the API server; renewing %s", what, source.describe())
        await source.rejected(rejected)

    def _rejected(self, what: str, payload: bytes) -> errors.Unauthenticated:
        source = self._credentials.source
        where = f" (renewed from {source.describe()})" if source is not None else ""
        return errors.Unauthenticated(
            f"{what}: the API server rejects our credentials{where}: {_message_of(payload)}"
        )

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        content_type: str = "application/json",
        counted_as: str | None = None,
        patch_type: PatchType | None = None,
    ) -> Any:
        """One call, with a renewed credential after a 401 (once) and the retries of
        :func:`kuberetry.decide` after 429, 5xx and connection errors."""
        data = None if json_body is None else json.dumps(json_body)
        what = f"{method} {path}"
        repeatable = kuberetry.repeatable(method=method, patch_type=patch_type)
        attempt, waited, renewed, ambiguous = 0, 0.0, False, False
        while True:
            attempt += 1
            headers = {"Content-Type": content_type} if data is not None else {}
            authorization = await self._authorization()
            if authorization is not None:
                headers["Authorization"] = authorization
            failure: kuberetry.Failure
            try:
                async with self.session.request(
                    method, path, params=params, data=data, headers=headers
                ) as response:
                    payload = await response.read()
                    status = response.status
                    retry_after = response.headers.get("Retry-After")
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem: errors.OpkeeperError = errors.Unavailable(_unreachable(what, exc))
                if isinstance(exc, aiohttp.ClientConnectorCertificateError):
                    raise problem from exc  # a certificate does not mend in seconds
                sent = not isinstance(exc, aiohttp.ClientConnectorError)
                failure = kuberetry.Failure(status=None, sent=sent)
                cause = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            else:
                if status == 401 and self._credentials.source is not None and not renewed:
                    renewed = True
                    await self._refresh(authorization, what)
                    attempt -= 1  # a renewal is not a failed attempt
                    continue
                if status < 300:
                    if counted_as is not None:
                        self.writes[(method, counted_as)] += 1
                    return json.loads(payload) if payload else None
                if status == 404 and method == "DELETE" and ambiguous:
                    return None  # our earlier attempt deleted it; its answer was lost
                if status == 401:
                    raise self._rejected(what, payload)
                failure = kuberetry.Failure(status=status, retry_after=retry_after)
                problem = _error(status, payload, what, retry_after=retry_after)
                cause = str(status)
                if not isinstance(problem, errors.Unavailable):
                    raise problem
            delay = kuberetry.decide(
                failure,
                repeatable=repeatable,
                attempt=attempt,
                waited=waited,
                policy=self._retry,
                jitter=random.random(),
                now=time.time(),
            )
            if delay is None:
                raise problem
            ambiguous = ambiguous or (failure.sent and failure.status != 429)
            self.retries[cause] += 1
            logger.debug("%s failed (%s); attempt %d in %.2fs", what, cause, attempt + 1, delay)
            await asyncio.sleep(delay)
            waited += delay

    @staticmethod
    def _counted(resource: Resource, subresource: str | None = None) -> str:
        return resource.plural + (f"/{subresource}" if subresource else "")

    async def get(
        self,
        resource: Resource,
        *,
        name: str,
        namespace: str | None = None,
        subresource: str | None = None,
    ) -> Body:
        path = resource.path(namespace=namespace, name=name, subresource=subresource)
        result: Body = await self._request("GET", path)
        return result

    async def list(
        self,
        resource: Resource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        page_size: int = 500,
    ) -> ObjectList:
        """All matching objects, fetched in pages of ``page_size``."""
        items: list[Body] = []
        params: dict[str, str] = {"limit": str(page_size)}
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        while True:
            page = await self._request("GET", resource.path(namespace=namespace), params=params)
            items.extend(page.get("items") or [])
            token = page.get("metadata", {}).get("continue")
            if not token:
                return ObjectList(items=items, resource_version=page["metadata"]["resourceVersion"])
            params["continue"] = token

    async def create(
        self,
        resource: Resource,
        body: Body,
        *,
        namespace: str | None = None,
        dry_run: bool = False,
    ) -> Body:
        """Create ``body``; :class:`AlreadyExists` when the name is taken."""
        params = {"fieldManager": self._field_manager}
        if dry_run:
            params["dryRun"] = "All"
        result: Body = await self._request(
            "POST",
            resource.path(namespace=namespace),
            params=params,
            json_body=body,
            counted_as=None if dry_run else self._counted(resource),
        )
        return result

    async def patch(
        self,
        resource: Resource,
        *,
        name: str,
        body: Any,
        namespace: str | None = None,
        patch_type: PatchType = "merge",
        subresource: str | None = None,
        force: bool = False,
    ) -> Body:
        """Patch one object (or its ``status``); put ``metadata.resourceVersion`` into a
        merge patch to make it conditional (:class:`errors.Conflict` if it moved on)."""
        params = {"fieldManager": self._field_manager}
        if force:
            params["force"] = "true"
        result: Body = await self._request(
            "PATCH",
            resource.path(namespace=namespace, name=name, subresource=subresource),
            params=params,
            json_body=body,
            content_type=_CONTENT_TYPES[patch_type],
            counted_as=self._counted(resource, subresource),
            patch_type=patch_type,
        )
        return result

    async def replace(
        self,
        resource: Resource,
        body: Body,
        *,
        name: str,
        namespace: str | None = None,
        subresource: str | None = None,
    ) -> Body:
        """PUT the whole object; conditional on the resourceVersion it carries."""
        result: Body = await self._request(
            "PUT",
            resource.path(namespace=namespace, name=name, subresource=subresource),
            params={"fieldManager": self._field_manager},
            json_body=body,
            counted_as=self._counted(resource, subresource),
        )
        return result

    async def delete(
        self,
        resource: Resource,
        *,
        name: str,
        namespace: str | None = None,
        uid: str | None = None,
        resource_version: str | None = None,
        propagation: Literal["Background", "Foreground", "Orphan"] | None = None,
    ) -> None:
        """Delete one object, optionally only if it still is that uid / resourceVersion."""
        options: Body = {"kind": "DeleteOptions", "apiVersion": "v1"}
        preconditions = {
            k: v for k, v in (("uid", uid), ("resourceVersion", resource_version)) if v
        }
        if preconditions:
            options["preconditions"] = preconditions
        if propagation:
            options["propagationPolicy"] = propagation
        await self._request(
            "DELETE",
            resource.path(namespace=namespace, name=name),
            json_body=options,
            counted_as=self._counted(resource),
        )

    async def watch(
        self,
        resource: Resource,
        *,
        resource_version: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        timeout_seconds: int = 300,
        field_selector: str | None = None,
    ) -> AsyncIterator[tuple[str, Body]]:
        """Raw watch events (type, object) from ``resource_version``, bookmarks included.

        Raises :class:`Expired` when the server says the version is too old.
        """
        params = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        path = resource.path(namespace=namespace)
        what = f"WATCH {path}"
        timeout = aiohttp.ClientTimeout(total=None, sock_read=timeout_seconds + 30)
        renewed = False
        try:
            while True:
                headers = {}
                authorization = await self._authorization()
                if authorization is not None:
                    headers["Authorization"] = authorization
                async with self.session.get(
                    path, params=params, timeout=timeout, headers=headers
                ) as response:
                    if response.status == 401 and self._credentials.source is not None:
                        if not renewed:
                            renewed = True
                            await self._refresh(authorization, what)
                            continue
                        raise self._rejected(what, await response.read())
                    if response.status >= 300:
                        raise _error(
                            response.status,
                            await response.read(),
                            what,
                            retry_after=response.headers.get("Retry-After"),
                        )
                    buffer = b""
                    # Objects can be larger than aiohttp's line limit: split lines ourselves.
                    async for chunk in response.content.iter_any():
                        buffer += chunk
                        while b"\n" in buffer:
                            line, buffer = buffer.split(b"\n", 1)
                            if not line.strip():
                                continue
                            event = json.loads(line)
                            if event["type"] == "ERROR":
                                status = event["object"]
                                raise _error(
                                    int(status.get("code", 500)),
                                    json.dumps(status).encode(),
                                    what,
                                )
                            yield event["type"], event["object"]
                    return
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise errors.Unavailable(_unreachable(what, exc)) from exc

    async def stream(
        self,
        resource: Resource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        retry_delay: float = 1.0,
        field_selector: str | None = None,
    ) -> AsyncIterator[WatchEvent]:
        """List, then watch forever: a ``SYNC`` after every (re)list, then single changes.

        Bookmarks only move the resume point; an expired version (410) or a
        broken connection leads to a fresh list, never to a silent gap. Failures
        in a row back off from ``retry_delay`` exponentially (with jitter, to
        :data:`kuberetry.STREAM_MAX_DELAY`), a 429's Retry-After is honoured, and
        credentials the server keeps rejecting are reported and retried, since a
        rotated token file or a fixed plugin makes them good again.
        """
        failures = 0

        async def pause(exc: errors.OpkeeperError) -> None:
            nonlocal failures
            failures += 1
            delay = kuberetry.stream_delay(
                failures=failures,
                base=retry_delay,
                retry_after=exc.retry_after if isinstance(exc, Throttled) else None,
                jitter=random.random(),
            )
            log = logger.error if isinstance(exc, errors.Unauthenticated) else logger.warning
            log("%s of %s failed, again in %.1fs: %s", "stream", resource.plural, delay, exc)
            await asyncio.sleep(delay)

        while True:
            try:
                listed = await self.list(
                    resource,
                    namespace=namespace,
                    label_selector=label_selector,
                    field_selector=field_selector,
                )
            except (errors.Unavailable, errors.Unauthenticated) as exc:
                await pause(exc)
                continue
            failures = 0
            yield WatchEvent(type="SYNC", objects=listed.items)
            version = listed.resource_version
            try:
                while True:
                    async for kind, obj in self.watch(
                        resource,
                        namespace=namespace,
                        label_selector=label_selector,
                        resource_version=version,
                        field_selector=field_selector,
                    ):
                        version = obj.get("metadata", {}).get("resourceVersion", version)
                        change = _CHANGES.get(kind)
                        if change is not None:  # BOOKMARK only moved the resume point
                            yield WatchEvent(type=change, object=obj)
            except Expired:
                logger.info("watch of %s expired; listing again", resource.plural)
            except (errors.Unavailable, errors.Unauthenticated) as exc:
                await pause(exc)


def _unreachable(what: str, exc: BaseException) -> str:
    """The message of a call that got no answer: says plainly it is temporary, and what
    happened in a few words (the exception's repr, with the server's address and the
    TLS details, goes to the debug log, not to a legacy caller's fault string)."""
    logger.debug("%s: %r", what, exc)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cause = "its certificate is not trusted"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        cause = "cannot connect"
    elif isinstance(exc, aiohttp.ServerDisconnectedError):
        cause = "the connection was closed"
    elif isinstance(exc, aiohttp.ClientPayloadError):
        cause = "the answer was cut short"
    elif isinstance(exc, TimeoutError):
        cause = "no answer in time"
    else:
        cause = type(exc).__name__
    return f"the Kubernetes API server is temporarily unavailable ({what}: {cause})"


def _message_of(payload: bytes) -> str:
    try:
        detail = json.loads(payload)
    except ValueError:
        detail = {}
    text = detail.get("message") if isinstance(detail, dict) else None
    return str(text or payload[:200].decode(errors="replace"))


def _error(
    status: int, payload: bytes, what: str, *, retry_after: str | None = None
) -> errors.OpkeeperError:
    """The opkeeper exception for an API server error response."""
    try:
        detail = json.loads(payload)
    except ValueError:
        detail = {}
    message = f"{what}: {detail.get('message') or payload[:200].decode(errors='replace')}"
    reason = detail.get("reason")
    if status == 404:
        return errors.NotFound(message)
    if status == 409:
        return AlreadyExists(message) if reason == "AlreadyExists" else errors.Conflict(message)
    if status == 410:
        return Expired(message)
    if status == 401:
        return errors.Unauthenticated(message)
    if status == 403:
        return errors.Forbidden(message)
    if status in (400, 422):
        return errors.InvalidArgument(message)
    if status == 429:
        return Throttled(
            f"the Kubernetes API server is temporarily overloaded (429): {message}",
            retry_after=kuberetry.retry_after_seconds(retry_after, now=time.time()),
        )
    return errors.Unavailable(
        f"the Kubernetes API server is temporarily unavailable (HTTP {status}): {message}"
    )


async def ensure_namespace(client: Client, name: str) -> None:
    """Create the namespace ``name`` unless it exists (for opkeeper's own objects).

    Forbidden counts as done: an installed opkeeper (the Helm chart) may not create
    namespaces, and its namespaces exist; were one missing, the create that follows
    says so.
    """
    with contextlib.suppress(AlreadyExists, errors.Forbidden):
        await client.create(
            NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        )
