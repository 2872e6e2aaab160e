"""The hostile-input suite: every gateway dialect, through one adapter each (tests/hostile.py).

A new dialect adds one :class:`tests.hostile.DialectAdapter` subclass to
``ADAPTERS`` and runs every test below. One gateway serves the module (in a
thread, on 127.0.0.1, with a short read timeout for the slow-body tests);
two tenants with look-alike data are built once. Nothing sleeps to
synchronise: waits are conditions with timeouts, and the slow-body test
paces its trickle by waiting for the answer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opkeeper.gateway import server, service, xenevents
from opkeeper.gateway import xmlrpc as codec
from opkeeper.gateway.dialects import cloudstack, xenapi
from tests import hostile_aggregated
from tests.gateway_support import RunningGateway, module_gateway
from tests.hostile import (
    STORE_TENANT_OPERATIONS,
    Answer,
    BdomAdapter,
    DialectAdapter,
    GandiAdapter,
    GoceptAdapter,
    MatrixCase,
    Probe,
    StoreProbe,
    Tenant,
    World,
    XenApiAdapter,
    build_tenant,
    build_world,
    call_log_count,
    closed_by_peer,
    free_form_values,
    hostile_values,
    object_counts,
    read_reply,
    readable,
    snapshot,
)
from tests.hostile_aggregated import AggregatedAdapter
from tests.hostile_cloudstack import CloudStackAdapter

ADAPTERS: list[type[DialectAdapter[Any]]] = [
    GandiAdapter,
    GoceptAdapter,
    BdomAdapter,
    CloudStackAdapter,
    XenApiAdapter,
    AggregatedAdapter,
]
"""Every dialect the gateway serves. A dialect added later adds its adapter here."""

READ_TIMEOUT = 2.0
"""The gateway's body read timeout in this module (the slow-body tests wait on it)."""
CPU_BUDGET = 1.0
"""CPU seconds (the whole process: the gateway runs in a thread of it) one worst-case
body may cost; about 10 ms today, and the quadratic number pattern once took 7 s."""
LIMIT = codec.DEFAULT_LIMITS.max_body_bytes
REFUSED = ("bad_argument", "limit", "not_found")
"""What a hostile name or id may get: refused as a bad argument (or by the codec's limits,
e.g. a struct member name over 256 characters), or not found."""


@pytest.fixture(scope="module")
def gw(
    cluster: Any, api: kubernetes.client.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    # The aggregated API's listener, when the control plane is the local one (its
    # front-proxy client key signs the suite's calls as kube-apiserver's would).
    front_proxy = hostile_aggregated.front_proxy(
        cluster.kubeconfig, tmp_path_factory.mktemp("aggregated")
    )
    with module_gateway(
        cluster=cluster,
        api=api,
        tmp_path_factory=tmp_path_factory,
        aggregated=None if front_proxy is None else front_proxy.settings,
        read_timeout_seconds=READ_TIMEOUT,
        # No controller runs here: a relaunch or cancel would wait out the default bound.
        service=service.Settings(write_visible_timeout_seconds=0.2),
        cloudstack=cloudstack.Settings(commands=CloudStackAdapter.commands),
        # A generated event.from may carry a future token and a long timeout: bounded here.
        xenapi=xenapi.Settings(events=xenevents.Settings(max_wait_seconds=1.0)),
    ) as running:
        hostile_aggregated.attach(running, front_proxy, api)
        yield running


@pytest.fixture(scope="module")
def world(api: kubernetes.client.ApiClient, gw: RunningGateway) -> Iterator[World]:
    built = build_world(api, gw)
    yield built
    core = kubernetes.client.CoreV1Api(api)
    for namespace in built.namespaces:
        core.delete_namespace(namespace)


@pytest.fixture(scope="module")
def store_tenant(api: kubernetes.client.ApiClient, gw: RunningGateway) -> Iterator[Tenant]:
    """A tenant of its own for the free-form values: a value it stores may break its reads,
    and must not break the other tests'."""
    tenant = build_tenant(api, gw, prefix="hostile-c", operations=STORE_TENANT_OPERATIONS, tasks=())
    yield tenant
    kubernetes.client.CoreV1Api(api).delete_namespace(tenant.namespace)


def _params(
    items: list[tuple[type[DialectAdapter[Any]], Any, str]],
) -> list[Any]:
    return [pytest.param(cls, item, id=f"{cls.name}-{label}") for cls, item, label in items]


# --- a. hostile names and ids ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("adapter_cls", "probe"),
    _params([(cls, p, p.label) for cls in ADAPTERS for p in cls.probes()]),
)
def test_hostile_names_and_ids(
    adapter_cls: type[DialectAdapter[Any]],
    probe: Probe[Any],
    api: kubernetes.client.ApiClient,
    gw: RunningGateway,
    world: World,
) -> None:
    """Every hostile value in this argument gets a bad-argument or not-found error (a
    search may also answer with nothing), and nothing changes anywhere."""
    client = adapter_cls(gw).client(world.attacker)
    values = hostile_values(
        victim_namespace=world.victim.namespace,
        victim_id=world.victim.ids["victim"],
        own_id=world.attacker.ids["shared-1"],
    )
    before = {ns: snapshot(api, ns) for ns in world.namespaces}
    counts = object_counts(api)
    wrong: list[str] = []
    sent = 0
    for hostile in values:
        if probe.skip(hostile.value):
            continue
        sent += 1
        answer = probe.run(client, hostile.value)
        refused = answer.outcome == "error" and answer.error in REFUSED
        if not (refused or (probe.search and answer.empty)):
            wrong.append(f"{hostile.label} {hostile.value!r}: {answer.describe()}")
    assert sent, "no hostile value was sent"
    assert not wrong, f"{probe.method} ({probe.what}):\n" + "\n".join(wrong)
    assert {ns: snapshot(api, ns) for ns in world.namespaces} == before
    assert object_counts(api) == counts


# --- b. the cross-tenant matrix ----------------------------------------------------------------


def test_every_method_is_in_the_matrix() -> None:
    """A dialect's matrix covers each of its methods (a method added later must be too)."""
    for cls in ADAPTERS:
        assert {case.method for case in cls.matrix()} == set(cls.methods), cls.name


@pytest.mark.parametrize(
    ("adapter_cls", "case"),
    _params([(cls, c, c.label) for cls in ADAPTERS for c in cls.matrix()]),
)
def test_cross_tenant_matrix(
    adapter_cls: type[DialectAdapter[Any]],
    case: MatrixCase[Any],
    api: kubernetes.client.ApiClient,
    gw: RunningGateway,
    world: World,
) -> None:
    """The attacker calls the method against the victim's ids and names: no answer shows
    the victim's data, the victim's objects and call log stay exactly as they were."""
    adapter = adapter_cls(gw)
    client = adapter.client(world.attacker)
    victim = world.victim
    before = snapshot(api, victim.namespace)
    logged = call_log_count(gw, victim.namespace)
    answers = case.run(client, world)
    assert answers, "the case made no call"
    problems = case.expect(answers, world)
    for i, answer in enumerate(answers):
        if answer.outcome == "broken" or answer.error == "server":
            problems.append(f"answer {i} is the server's fault: {answer.describe()}")
        if victim.marker in repr(answer.value) or victim.marker in answer.text:
            problems.append(f"answer {i} shows the victim's data: {answer.describe()}")
        if foreign := adapter.foreign_ids(answer, victim):
            problems.append(f"answer {i} shows the victim's ids {foreign}: {answer.describe()}")
    assert not problems, f"{case.method} ({case.what}):\n" + "\n".join(problems)
    assert snapshot(api, victim.namespace) == before, "the victim's objects changed"
    assert call_log_count(gw, victim.namespace) == logged, "the victim's call log changed"


@pytest.mark.parametrize(
    ("adapter_cls", "probe"),
    _params([(cls, p, p.label) for cls in ADAPTERS for p in cls.store_probes()]),
)
def test_free_form_values_are_refused_or_read_back(
    adapter_cls: type[DialectAdapter[Any]],
    probe: StoreProbe[Any],
    gw: RunningGateway,
    store_tenant: Tenant,
) -> None:
    """Free-form data (params, object names) of every standard type: refused as the
    client's fault, or stored and read back; never a server-side error, now or later
    (a value accepted but unanswerable would break every later read of the object)."""
    client = adapter_cls(gw).client(store_tenant)
    wrong: list[str] = []
    for value in free_form_values():
        answers = probe.run(client, store_tenant, value.value)
        if any(a.outcome == "broken" or a.error == "server" for a in answers):
            wrong.append(f"{value.label}: {' then '.join(a.describe() for a in answers)}")
    assert not wrong, f"{probe.method} ({probe.what}):\n" + "\n".join(wrong)


# --- c. worst-case bodies ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("adapter_cls", "kind"),
    _params([(cls, kind, kind) for cls in ADAPTERS for kind in cls.worst_case_bodies()]),
)
def test_worst_case_body_within_a_cpu_budget(
    adapter_cls: type[DialectAdapter[Any]], kind: str, gw: RunningGateway, world: World
) -> None:
    adapter = adapter_cls(gw)
    body = adapter_cls.worst_case_bodies()[kind]()
    request = adapter.raw_request(body, world.attacker)
    cpu, wall = time.process_time(), time.monotonic()
    reply = adapter.exchange(request)
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    answer = adapter.classify(reply)
    assert answer.client_error, f"{kind} ({len(body)} bytes): {answer.describe()}"
    if len(body) > LIMIT:
        assert answer.error == "too_large", answer.describe()
    assert cpu < CPU_BUDGET, f"{kind}: {cpu:.3f} s of CPU ({wall:.3f} s wall)"


# --- d. oversized and slow bodies ----------------------------------------------------------


def _frame(piece: bytes, *, chunked: bool) -> bytes:
    return b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("adapter_cls", ADAPTERS, ids=[cls.name for cls in ADAPTERS])
def test_oversized_body_is_refused_and_the_connection_closed(
    adapter_cls: type[DialectAdapter[Any]], chunked: bool, gw: RunningGateway, world: World
) -> None:
    """A client that sends a body over the limit, all of it, gets the too-large error and
    the connection closed (its rest was never read as a request)."""
    adapter = adapter_cls(gw)
    request = adapter.raw_request(adapter_cls.body(padding=LIMIT + 64 * 1024), world.attacker)
    with adapter.connect() as sock:
        try:
            sock.sendall(request.head(adapter.port, chunked=chunked))
            for start in range(0, len(request.body), 64 * 1024):
                sock.sendall(_frame(request.body[start : start + 64 * 1024], chunked=chunked))
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # closed while sending: the answer must be there all the same
        answer = adapter.classify(read_reply(sock))
        assert answer.error == "too_large", answer.describe()
        assert closed_by_peer(sock, within=5), "the connection stayed open"


LINGER = server.Settings().lingering_seconds
"""The gateway's lingering close: after answering a request whose body it did not read,
it reads and discards for up to this long before closing."""


def test_abandoned_oversized_bodies_are_answered_and_closed(
    gw: RunningGateway, world: World
) -> None:
    """A client that announces or starts an oversized body and then stops sending gets the
    too-large error at once and its connection closed within a bound. One test for every
    adapter and framing at once, so the bound is waited for only once."""
    open_: list[tuple[str, Any, Any]] = []
    try:
        for cls in ADAPTERS:
            adapter = cls(gw)
            request = adapter.raw_request(cls.body(padding=LIMIT + 64 * 1024), world.attacker)
            for chunked in (False, True):
                sock = adapter.connect()
                open_.append((f"{cls.name}, chunked={chunked}", adapter, sock))
                sock.sendall(request.head(adapter.port, chunked=chunked))
                sent = 0
                # Until the server answers: from the headers alone with a Content-Length,
                # at the limit without one.
                while not readable(sock, 0) and sent < LIMIT + 1:
                    sock.sendall(_frame(request.body[sent : sent + 64 * 1024], chunked=chunked))
                    sent += 64 * 1024
                assert readable(sock, 10), f"{open_[-1][0]}: no answer after {sent} bytes"
        answered = time.monotonic()
        for what, adapter, sock in open_:
            answer = adapter.classify(read_reply(sock))
            assert answer.error == "too_large", f"{what}: {answer.describe()}"
        for what, _, sock in open_:
            left = answered + LINGER + 5 - time.monotonic()
            assert closed_by_peer(sock, within=max(left, 0.1)), f"{what}: still open"
    finally:
        for _, _, sock in open_:
            sock.close()


@pytest.mark.parametrize("pace", ["silent", "trickle"])
@pytest.mark.parametrize("adapter_cls", ADAPTERS, ids=[cls.name for cls in ADAPTERS])
def test_slow_body_is_answered_within_the_read_timeout(
    adapter_cls: type[DialectAdapter[Any]], pace: str, gw: RunningGateway, world: World
) -> None:
    """A body that stops after a few bytes (silent), or arrives a byte at a time
    (trickle), gets an error once the read timeout has passed, not a held connection."""
    adapter = adapter_cls(gw)
    request = adapter.raw_request(adapter_cls.body(), world.attacker)
    with adapter.connect() as sock:
        sock.sendall(request.head(adapter.port) + request.body[:10])
        started = time.monotonic()
        deadline = started + READ_TIMEOUT + 5
        offset = 10
        # The trickle is paced by waiting for the answer: each wait that ends without one
        # sends the next byte.
        while not readable(sock, 0.25 if pace == "trickle" else 1.0):
            assert time.monotonic() < deadline, "no answer within the read timeout"
            if pace == "trickle" and offset < len(request.body) - 1:
                sock.sendall(request.body[offset : offset + 1])
                offset += 1
        elapsed = time.monotonic() - started
        answer = adapter.classify(read_reply(sock))
    assert answer.client_error, answer.describe()
    assert READ_TIMEOUT * 0.5 <= elapsed <= READ_TIMEOUT + 3, elapsed


# --- e. property-based fuzz of the decoder --------------------------------------------------


@pytest.mark.parametrize("adapter_cls", ADAPTERS, ids=[cls.name for cls in ADAPTERS])
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_decoder_fuzz_in_process(
    adapter_cls: type[DialectAdapter[Any]], data: st.DataObject
) -> None:
    """Mutated calls of the dialect: decoded, or refused with a client error; nothing else
    escapes, and no fault is the internal error."""
    seeds = [
        (method, ("session", 1, {"state": "DONE"}, [{"__type__": "operation", "name": "x"}]))
        for method in adapter_cls.methods
    ]
    adapter_cls.check_decoder(data.draw(adapter_cls.fuzz_bodies(seeds), label="body"))


@pytest.mark.parametrize("adapter_cls", ADAPTERS, ids=[cls.name for cls in ADAPTERS])
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_decoder_fuzz_over_http(
    adapter_cls: type[DialectAdapter[Any]], gw: RunningGateway, world: World, data: st.DataObject
) -> None:
    """Each generated body, posted as the attacker: a well-formed answer or a client error,
    never a 5xx, a dropped connection or a reply the protocol's clients cannot parse."""
    adapter = adapter_cls(gw)
    body = data.draw(adapter_cls.fuzz_bodies(_seeds(adapter, world)), label="body")
    answer: Answer = adapter.classify(adapter.exchange(adapter.raw_request(body, world.attacker)))
    assert answer.outcome == "ok" or answer.client_error, answer.describe()


_SEEDS: dict[str, Any] = {}


def _seeds(adapter: DialectAdapter[Any], world: World) -> Any:
    # Seeds log in once per dialect, not once per example.
    key = f"{adapter.name}/{world.attacker.namespace}"
    if key not in _SEEDS:
        _SEEDS[key] = adapter.fuzz_seeds(world)
    return _SEEDS[key]
