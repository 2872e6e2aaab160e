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
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal

import aiohttp

from opkeeper import API_VERSION, GROUP, VERSION, errors, names

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

    @classmethod
    def from_kubeconfig(cls, path: str | None = None, *, context: str | None = None) -> Credentials:
        """Credentials of a kubeconfig (default: ``$KUBECONFIG`` or ``~/.kube/config``).

        The official client's loader does the parsing, so exec plugins, embedded
        and file-based certificates all work as kubectl would have them.
        """
        import kubernetes  # a heavy import, needed only here

        config = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=path, context=context, client_configuration=config
        )
        return cls._from_configuration(config)

    @classmethod
    def in_cluster(cls) -> Credentials:
        """Credentials of the pod's service account."""
        import kubernetes

        config = kubernetes.client.Configuration()
        kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=config
        )
        return cls._from_configuration(config)

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
    ) -> None:
        self._credentials = credentials
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._field_manager = field_manager
        self._connection_limit = connection_limit
        self._session: aiohttp.ClientSession | None = None
        self.writes: collections.Counter[tuple[str, str]] = collections.Counter()
        """Writes made by this client, by (verb, resource[/subresource]); for metrics and bench."""

    @property
    def session(self) -> aiohttp.ClientSession:
        # Created lazily: an aiohttp session must be made inside the running loop.
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
        if self._session is not None:
            await self._session.close()

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
    ) -> Any:
        data = None if json_body is None else json.dumps(json_body)
        headers = {"Content-Type": content_type} if data is not None else {}
        try:
            async with self.session.request(
                method, path, params=params, data=data, headers=headers
            ) as response:
                payload = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise errors.Unavailable(f"{method} {path}: {exc!r}") from exc
        if counted_as is not None and status < 300:
            self.writes[(method, counted_as)] += 1
        if status >= 300:
            raise _error(status, payload, f"{method} {path}")
        return json.loads(payload) if payload else None

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
        timeout = aiohttp.ClientTimeout(total=None, sock_read=timeout_seconds + 30)
        try:
            async with self.session.get(path, params=params, timeout=timeout) as response:
                if response.status >= 300:
                    raise _error(response.status, await response.read(), f"WATCH {path}")
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
                                f"WATCH {path}",
                            )
                        yield event["type"], event["object"]
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise errors.Unavailable(f"WATCH {path}: {exc!r}") from exc

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
        broken connection leads to a fresh list, never to a silent gap.
        """
        while True:
            try:
                listed = await self.list(
                    resource,
                    namespace=namespace,
                    label_selector=label_selector,
                    field_selector=field_selector,
                )
            except errors.Unavailable as exc:
                logger.warning("list of %s failed, retrying: %s", resource.plural, exc)
                await asyncio.sleep(retry_delay)
                continue
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
            except errors.Unavailable as exc:
                logger.warning("watch of %s broke, listing again: %s", resource.plural, exc)
                await asyncio.sleep(retry_delay)


def _error(status: int, payload: bytes, what: str) -> errors.OpkeeperError:
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
    return errors.Unavailable(f"HTTP {status} {message}")


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
