"""The controller: our reconcilers on our own watch streams, inside kopf's operator frame.

:func:`run` builds the two reconcilers (Operations, :mod:`.operations`;
ScheduledTasks, :mod:`.scheduledtasks`) and feeds them from our own
list+watch streams (:mod:`.streams`): one stream of Operations per
namespace scope, shared by both reconcilers, and one of ScheduledTasks.
kopf's per-event processing (a deep copy of every body for its diff base,
per-handler kwargs) cost about 1.4 ms of CPU per event, the largest item of
an Operation's controller CPU, for nothing our handlers used.

Only one replica acts: the holder of a Lease (:mod:`.leader`); a standby
runs no reconciler and no stream, and gains them all afresh (:class:`_Term`)
when it takes over. kopf keeps the operator frame: login, liveness, and the
watch of Jobs the job executor starts (:func:`build_registry`), whose few
events go to the acting Operation reconciler through kopf's ``memo``. kopf's
peering stays off: it would only pause kopf's own Job watch. kopf writes nothing of
its own: no progress annotation, no diff-base, no finalizer, no Events for
handler logs. Storage prefix and finalizer still use ``opkeeper.dev`` so
that any changing handler added later never has to migrate from kopf's
default keys.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import datetime
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, cast

import kopf

from opkeeper import ids, kube, kubeauth
from opkeeper.controller import leader, metrics, operations, scheduledtasks, streams
from opkeeper.controller.events import EventPoster
from opkeeper.controller.settings import Settings

__all__ = ["DiffBaseStorage", "Settings", "build_registry", "kopf_settings", "run"]

STORAGE_PREFIX = "opkeeper.dev"
_SYSTEM = frozenset({"apiVersion", "kind", "metadata", "status"})
"""Top-level stanzas kopf leaves out of an object's essence."""


def build_registry(
    *, login: kube.Credentials, cleanup: Callable[[], Awaitable[None]]
) -> kopf.OperatorRegistry:
    """A fresh registry with kopf's part: the login, ``cleanup`` and the Job events."""
    registry = kopf.OperatorRegistry()

    given: list[str | None] = []

    @kopf.on.login(registry=registry)
    async def _login(**_: Any) -> kopf.ConnectionInfo:
        if login.source is None:
            return _connection_info(login)
        # kopf logs in again after a 401 or past `expiration`: the header it had is stale.
        if given:
            await login.source.rejected(given[-1])
        given[:] = [await login.source.header()]
        return _refreshed_connection_info(login, login.source, given[0])

    @kopf.on.cleanup(registry=registry)
    async def _cleanup(**_: Any) -> None:
        # kopf runs this as soon as a stop is requested; its own shutdown can take
        # seconds more, during which no timer of ours may fire a run.
        await cleanup()

    operations.register(registry)
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
    result.peering.standalone = True
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


def _refreshed_connection_info(
    credentials: kube.Credentials, source: kubeauth.TokenSource, header: str | None
) -> kopf.ConnectionInfo:
    """kopf's login from a refreshing source: the header and certificate it has now,
    and when kopf should ask again."""
    scheme, _, value = (header or "").partition(" ")
    until = source.valid_until()
    certificate = source.certificate()
    return kopf.ConnectionInfo(
        server=credentials.server,
        ca_path=credentials.ca_path,
        insecure=credentials.insecure or None,
        certificate_path=None if certificate else credentials.cert_path,
        private_key_path=None if certificate else credentials.key_path,
        certificate_data=certificate[0] if certificate else None,
        private_key_data=certificate[1] if certificate else None,
        scheme=scheme or None,
        token=value or None,
        expiration=None
        if until is None
        else datetime.datetime.fromtimestamp(until, tz=datetime.UTC),
    )


class _Term:
    """Everything that acts, built afresh for each term of leadership: the reconcilers,
    their streams and the Event poster. A new term starts from a fresh list (no cache
    of a previous term's world); stopping cancels in-flight reconciles, which is safe
    for the same reasons a crash is (conditional writes, idempotent executor starts)."""

    def __init__(
        self, *, settings: Settings, client: kube.Client, credentials: kube.Credentials
    ) -> None:
        allocator = ids.IdAllocator(
            client, namespace=settings.system_namespace, block_size=settings.id_block_size
        )
        seal = ids.IdSeal(client, namespace=settings.system_namespace)
        self.poster = EventPoster(
            client,
            enabled=settings.post_events,
            qps=settings.event_qps,
            burst=settings.event_burst,
        )
        self.reconciler = operations.Reconciler(
            client=client,
            allocator=allocator,
            seal=seal,
            settings=settings,
            events=self.poster,
            api_server=credentials.server,
        )
        self.tasks = scheduledtasks.Reconciler(
            client=client,
            allocator=allocator,
            seal=seal,
            events=self.poster,
            workers=settings.workers,
            error_max_delay=settings.error_max_delay,
        )
        self.watches = streams.Streams(
            client,
            scopes=streams.scopes(
                namespaces=settings.namespaces, all_namespaces=settings.all_namespaces
            ),
        )

    def start(self) -> None:
        self.reconciler.start()
        self.tasks.start()
        self.poster.start()
        self.watches.follow(kube.OPERATIONS, self.reconciler.observe, self.tasks.observe_operation)
        self.watches.follow(kube.SCHEDULED_TASKS, self.tasks.observe_task)

    async def stop(self) -> None:
        await self.watches.stop()
        await self.tasks.stop()
        await self.reconciler.stop()
        await self.poster.stop()


class _Acting:
    """The current term, if this process acts; what kopf's Job events and the metrics
    collector reach through (a standby drops Job events: the leader gets its own)."""

    def __init__(
        self, *, settings: Settings, client: kube.Client, credentials: kube.Credentials
    ) -> None:
        self._settings = settings
        self._client = client
        self._credentials = credentials
        self.term: _Term | None = None

    async def start(self) -> None:
        if self.term is None:
            self.term = _Term(
                settings=self._settings, client=self._client, credentials=self._credentials
            )
            self.term.start()
            leader.LEADER.set(1)
            leader.TRANSITIONS.labels("leader").inc()

    async def stop(self) -> None:
        term, self.term = self.term, None
        if term is not None:
            await term.stop()
            leader.LEADER.set(0)
            leader.TRANSITIONS.labels("standby").inc()

    def observe_job(self, *, event_type: str | None, body: kube.Body) -> None:
        if self.term is not None:
            self.term.reconciler.observe_job(event_type=event_type, body=body)

    def counts(self) -> dict[str, int]:
        return self.term.reconciler.counts() if self.term is not None else {}

    def oldest(self) -> dict[str, float]:
        return self.term.reconciler.oldest() if self.term is not None else {}


def _elector(
    *, settings: Settings, credentials: kube.Credentials, acting: _Acting
) -> leader.InThread:
    """The Lease's elector, on a client and a thread of its own: a renewal never queues
    behind the reconcilers' requests or their CPU-bound parsing."""
    client = kube.Client(
        credentials,
        field_manager="opkeeper-controller",
        timeout=settings.renew_deadline_seconds,
        connection_limit=2,
    )
    return leader.InThread(
        client,
        name=settings.lease_name,
        namespace=settings.lease_namespace or settings.system_namespace,
        identity=settings.identity or leader.default_identity(),
        timing=leader.Timing(
            lease_duration=settings.lease_duration_seconds,
            renew_deadline=settings.renew_deadline_seconds,
            retry_period=settings.retry_period_seconds,
        ),
        on_start=acting.start,
        on_stop=acting.stop,
    )


async def run(
    *,
    settings: Settings,
    credentials: kube.Credentials,
    stop_flag: asyncio.Event | None = None,
    ready_flag: asyncio.Event | None = None,
) -> None:
    """Run the controller until ``stop_flag`` is set (or the task is cancelled): act at
    once if ``settings.standalone``, else while this process holds the leader Lease."""
    client = kube.Client(credentials, field_manager="opkeeper-controller")
    acting = _Acting(settings=settings, client=client, credentials=credentials)
    elector: leader.InThread | None = None

    def writes() -> collections.Counter[tuple[str, str]]:
        return client.writes + (elector.elector.writes if elector else collections.Counter())

    collector = metrics.StateCollector(
        states=acting.counts, oldest=acting.oldest, writes=writes, retries=lambda: client.retries
    )
    metrics.serve(port=settings.metrics_port, address=settings.metrics_address, collector=collector)
    # Started before kopf: kopf cancels, on exit, the tasks created after it started.
    if settings.standalone:
        await acting.start()
    else:
        elector = _elector(settings=settings, credentials=credentials, acting=acting)
        elector.start()

    async def stop() -> None:
        # The elector stops acting first, then releases the Lease: never two leaders.
        if elector is not None:
            await elector.stop()
        await acting.stop()

    try:
        await kopf.operator(
            registry=build_registry(login=credentials, cleanup=stop),
            settings=kopf_settings(settings),
            # Leader election (or --standalone) decides who acts: kopf's peering would
            # only pause its Job watch, on whichever replica it chose.
            standalone=True,
            namespaces=list(settings.namespaces),
            clusterwide=settings.all_namespaces,
            memo=kopf.Memo(operations=acting),
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        await stop()  # again, for a cancelled run (no cleanup): stopping twice is harmless
        await client.close()
        metrics.unserve(collector)
