"""The controller's own list+watch streams: Operations and ScheduledTasks, per namespace scope.

Why not ``kopf.on.event``: kopf spends about 1.4 ms of CPU on every watch
event before a handler sees it (it deep-copies the body for its diff base,
builds per-handler kwargs and loggers; ``process_resource_event`` was ~4 s
of the controller's 14 s in bench/results/operations-profile.txt), while
our reconcilers only want the raw object. Every Operation costs at least two
events (its creation and the echo of its status write), and a ScheduledTask
run adds an Operation: that per-event cost was the largest single item of
firing a run. Here an event costs a JSON parse and a few dict lookups.

One stream per resource and scope feeds every consumer of that resource
(Operations: the Operation reconciler and the ScheduledTask reconciler,
which follows the Operations its tasks created), so each event is read and
parsed once.

A stream also makes relists whole: after every (re)list, objects the stream
had delivered that are no longer listed are handed on as ``DELETED`` (what
the watch would have said had it not been down), and every listed object as
seen while listing (event type ``None``). Consumers already drop versions
they hold, so a relist re-reconciles only what changed. Such a ``DELETED``
carries only the object's identity, labels and annotations as last seen
(:func:`skeleton`): keeping whole bodies for it would hold a second copy of
every object (status, managedFields) besides the reconcilers' caches, which
cost 85 MiB for 10,000 waiting ScheduledTasks.

kopf keeps the operator frame: login, peering, liveness, and the events of
Jobs the job executor started (few, and only while a Job runs). kopf's
peering pauses only kopf's own watches, not these streams.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from opkeeper import errors, kube

logger = logging.getLogger(__name__)

RETRY_SECONDS = 10.0
"""Pause after a stream failed for a reason a retry may cure (e.g. Forbidden while RBAC
is being rolled out); connection losses are retried by kube.Client.stream itself."""


class Observer(Protocol):
    """Takes one watch event; ``event_type`` None: seen while listing."""

    def __call__(self, *, event_type: str | None, body: kube.Body) -> None: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scope:
    """One stream's reach: a namespace, or cluster-wide with a namespace filter."""

    namespace: str | None
    """The namespace to list and watch; None: every namespace."""
    matches: Callable[[str], bool]
    """Whether an object in this namespace is served (a cluster-wide stream sees all)."""


def scopes(*, namespaces: Sequence[str], all_namespaces: bool) -> list[Scope]:
    """What to watch for the controller's ``--namespace``/``--all-namespaces``, as kopf would:
    one stream per plain namespace; one cluster-wide stream, filtered here, for
    ``--all-namespaces`` or kopf-style patterns (``ns-*``, ``!ns``)."""
    if not all_namespaces and not any(set(p) & set("*?[!") for p in namespaces):
        return [Scope(namespace=namespace, matches=lambda _: True) for namespace in namespaces]
    include = [p for p in namespaces if not p.startswith("!")]
    exclude = [p[1:] for p in namespaces if p.startswith("!")]

    def matches(namespace: str) -> bool:
        wanted = all_namespaces or any(fnmatch.fnmatch(namespace, p) for p in include)
        return wanted and not any(fnmatch.fnmatch(namespace, p) for p in exclude)

    return [Scope(namespace=None, matches=matches)]


_IDENTITY = ("name", "namespace", "uid", "resourceVersion", "labels", "annotations")


def skeleton(body: kube.Body) -> kube.Body:
    """What a ``DELETED`` made up after a relist carries: the object's identity."""
    meta = body["metadata"]
    return {"metadata": {key: meta[key] for key in _IDENTITY if key in meta}}


async def follow(
    client: kube.Client,
    resource: kube.Resource,
    *,
    scope: Scope,
    observers: Sequence[Observer],
    retry_seconds: float = RETRY_SECONDS,
) -> None:
    """Hand every change of ``resource`` within ``scope`` to each observer, forever."""
    delivered: dict[str, kube.Body] = {}
    """uid -> the skeleton of the last version handed on: what a relist accounts for."""

    def tell(event_type: str | None, body: kube.Body) -> None:
        for observer in observers:
            observer(event_type=event_type, body=body)

    while True:
        try:
            async for event in client.stream(resource, namespace=scope.namespace):
                if event.type == "SYNC":
                    listed = [
                        body
                        for body in event.objects or ()
                        if scope.matches(body["metadata"]["namespace"])
                    ]
                    uids = {body["metadata"]["uid"] for body in listed}
                    for uid, gone in delivered.items():
                        if uid not in uids:
                            tell("DELETED", gone)
                    delivered = {body["metadata"]["uid"]: skeleton(body) for body in listed}
                    for body in listed:
                        tell(None, body)
                elif event.object is not None and scope.matches(
                    event.object["metadata"]["namespace"]
                ):
                    body = event.object
                    if event.type == "DELETED":
                        delivered.pop(body["metadata"]["uid"], None)
                    else:
                        delivered[body["metadata"]["uid"]] = skeleton(body)
                    tell(event.type, body)
        except errors.OpkeeperError as exc:
            logger.error(
                "watching %s failed, retrying in %.0fs: %s", resource.plural, retry_seconds, exc
            )
            await asyncio.sleep(retry_seconds)


class Streams:
    """The background tasks of :func:`follow`, one per resource and scope."""

    def __init__(self, client: kube.Client, *, scopes: Sequence[Scope]) -> None:
        self._client = client
        self._scopes = tuple(scopes)
        self._tasks: list[asyncio.Task[None]] = []

    def follow(self, resource: kube.Resource, *observers: Observer) -> None:
        """Start following ``resource`` in every scope, for ``observers``."""
        self._tasks += [
            asyncio.create_task(
                follow(self._client, resource, scope=scope, observers=observers),
                name=f"watch-{resource.plural}",
            )
            for scope in self._scopes
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
