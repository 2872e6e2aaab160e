"""The controller: kopf watches, our reconcilers act.

:func:`build_registry` collects the kopf handlers of every resource the
controller serves. Each resource module exposes ``register(registry)`` and
finds what it needs at run time in kopf's ``memo`` (see :class:`Runtime`),
so a module can be added without touching the others: Operations
(:mod:`.operations`) and, when present, ScheduledTasks (``.scheduledtasks``).

kopf is configured to write nothing of its own on Operations: only
``on.event`` handlers are registered for them, so there is no progress
annotation, no diff-base and no finalizer, and its own Event posting (for
handler logs) is off. Storage prefix and finalizer still use ``opkeeper.dev``
so that any changing handler added later (e.g. for ScheduledTasks) never
has to migrate from kopf's default keys.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import importlib
import importlib.util
from collections.abc import Iterable, Mapping
from typing import Any, cast

import kopf

from opkeeper import ids, kube
from opkeeper.controller import metrics, operations
from opkeeper.controller.events import EventPoster
from opkeeper.controller.settings import Settings

__all__ = ["DiffBaseStorage", "Runtime", "Settings", "build_registry", "kopf_settings", "run"]

STORAGE_PREFIX = "opkeeper.dev"
_SYSTEM = frozenset({"apiVersion", "kind", "metadata", "status"})
"""Top-level stanzas kopf leaves out of an object's essence."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Runtime:
    """What handlers reach through kopf's ``memo`` (``memo.runtime``)."""

    client: kube.Client
    """The shared async API client (its write counters feed the metrics)."""
    ids: ids.IdAllocator
    """The id allocator shared by every resource (one counter, one block at a time)."""
    settings: Settings
    events: EventPoster
    operations: operations.Reconciler


def build_registry(*, login: kube.Credentials) -> kopf.OperatorRegistry:
    """A fresh registry with the handlers of every served resource."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def _login(**_: Any) -> kopf.ConnectionInfo:
        return _connection_info(login)

    operations.register(registry)
    # The ScheduledTask module is written separately; use it when it is there, but
    # let a broken one fail loudly (find_spec, not a swallowed ImportError).
    if importlib.util.find_spec("opkeeper.controller.scheduledtasks") is not None:
        importlib.import_module("opkeeper.controller.scheduledtasks").register(registry)
    return registry


class DiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's annotation diff-base storage, with a fast path for the common case.

    On every watch event, whether or not any changing handler exists, kopf builds
    the object's *essence* (what changing handlers compare: the body without
    apiVersion, kind, metadata and status, plus labels, annotations and any extra
    fields handlers name) by deep-copying the whole body and walking it through
    its generic field machinery, and looks for a stored essence in annotations.
    On an Operation, status and ``metadata.managedFields`` are most of the body:
    this was the largest single cost of kopf's per-event processing (see the
    profile in docs/controller.md).

    When the object has no annotations (there is no stored essence and none to
    filter) and no extra or ignored fields are configured, the essence is just a
    copy of the other top-level stanzas plus the labels: computed here directly.
    Everything else goes to kopf's own code. tests/test_controller_units.py
    checks both paths against kopf's.
    """

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        if not _raw_metadata(body).get("annotations"):
            return None  # kopf stores the essence in an annotation
        return super().fetch(body=body)

    def build(
        self,
        *,
        body: kopf.Body,
        extra_fields: Iterable[str | tuple[str, ...] | list[str] | None] | None = None,
    ) -> kopf.BodyEssence:
        fields = list(extra_fields or ())
        metadata = _raw_metadata(body)
        if fields or self.ignored_fields or metadata.get("annotations"):
            return super().build(body=body, extra_fields=fields)
        essence = {key: copy.deepcopy(value) for key, value in body.items() if key not in _SYSTEM}
        if metadata.get("labels"):
            essence["metadata"] = {"labels": copy.deepcopy(metadata["labels"])}
        return cast(kopf.BodyEssence, essence)


def _raw_metadata(body: kopf.Body) -> Mapping[str, Any]:
    metadata = body.get("metadata")
    return metadata if isinstance(metadata, Mapping) else {}


def kopf_settings(settings: Settings) -> kopf.OperatorSettings:
    """kopf's settings for our use: quiet, and no writes of its own."""
    result = kopf.OperatorSettings()
    result.posting.enabled = False
    result.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=STORAGE_PREFIX)
    result.persistence.diffbase_storage = DiffBaseStorage(
        prefix=STORAGE_PREFIX, key="last-handled-configuration"
    )
    result.persistence.finalizer = f"{STORAGE_PREFIX}/finalizer"
    result.peering.standalone = settings.standalone
    result.peering.name = "opkeeper"
    # Server-side watch timeouts keep long-lived streams fresh behind proxies.
    result.watching.server_timeout = 300
    result.watching.client_timeout = 330
    result.networking.request_timeout = 60
    return result


def _connection_info(credentials: kube.Credentials) -> kopf.ConnectionInfo:
    """kopf's login from the same kubeconfig/service account our own client uses."""
    token = credentials.headers.get("Authorization", "")
    scheme, _, value = token.partition(" ")
    return kopf.ConnectionInfo(
        server=credentials.server,
        ca_path=credentials.ca_path,
        insecure=credentials.insecure or None,
        certificate_path=credentials.cert_path,
        private_key_path=credentials.key_path,
        scheme=scheme or None,
        token=value or None,
    )


async def run(
    *,
    settings: Settings,
    credentials: kube.Credentials,
    stop_flag: asyncio.Event | None = None,
    ready_flag: asyncio.Event | None = None,
) -> None:
    """Run the controller until ``stop_flag`` is set (or the task is cancelled)."""
    client = kube.Client(credentials, field_manager="opkeeper-controller")
    allocator = ids.IdAllocator(
        client, namespace=settings.system_namespace, block_size=settings.id_block_size
    )
    poster = EventPoster(client, enabled=settings.post_events)
    reconciler = operations.Reconciler(
        client=client, allocator=allocator, settings=settings, events=poster
    )
    runtime = Runtime(
        client=client, ids=allocator, settings=settings, events=poster, operations=reconciler
    )
    collector = metrics.StateCollector(states=reconciler.counts, writes=lambda: client.writes)
    metrics.serve(port=settings.metrics_port, collector=collector)
    # Started before kopf: kopf cancels, on exit, the tasks created after it started.
    reconciler.start()
    poster.start()
    try:
        await kopf.operator(
            registry=build_registry(login=credentials),
            settings=kopf_settings(settings),
            standalone=settings.standalone,
            namespaces=list(settings.namespaces),
            clusterwide=settings.all_namespaces,
            memo=kopf.Memo(runtime=runtime, operations=reconciler),
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        await reconciler.stop()
        await poster.stop()
        await client.close()
        metrics.unserve(collector)
