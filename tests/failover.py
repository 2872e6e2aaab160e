"""Controller failover under load: two real controller processes, the leader SIGKILLed
again and again while Job, webhook and external operations are in flight.

Shared by tests/test_leader_failover.py (small, in the suite) and
bench/bench_failover.py (the issue's 1,000 operations and 10 kills). The world
around the controllers is real or plays a real part: the kube-apiserver of the
fixtures; a "kubelet" that completes each Job some time after it appears; an
external system that reports external operations' results through the status
subresource; a loopback webhook receiver that counts POSTs per Idempotency-Key
and the work it accepted per key (an idempotent receiver starts work once per key).

What is checked afterwards (:class:`Outcome`): every operation reached Succeeded
in its first attempt (none lost, none retried), one Job per operation attempt,
the Job recorded is the one that exists, one accepted piece of work per
idempotency key; per kill, the takeover time (from the SIGKILL to the Lease held
by another live replica), the time to the new leader's first recorded transition,
and the time until it got to work created after the kill.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import pathlib
import random
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import kubernetes
from aiohttp import web

from opkeeper import GROUP, VERSION
from opkeeper.executors import job
from tests.helpers import ControllerProcess, FakeExternalSystem, Ops, complete_job, wait_for

KINDS = ("job", "webhook", "external")
"""Executors in flight during the run (one in three operations each)."""
JOB_TEMPLATE = {
    "spec": {
        "backoffLimit": 0,
        "template": {
            "spec": {"restartPolicy": "Never", "containers": [{"name": "w", "image": "busybox"}]}
        },
    }
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """The size and pace of one failover run."""

    operations: int
    """Operations created, spread over the kills (one in three of each of :data:`KINDS`)."""
    kills: int
    """SIGKILLs of the leader."""
    lease_duration: float
    renew_deadline: float
    retry_period: float
    work_seconds: float = 1.0
    """How long each executor's work takes (Job, webhook job, external system)."""
    create_rate: float = 20.0
    """Operations created per second."""
    gap_seconds: float = 1.0
    """Time the new leader acts between a takeover and the next kill."""
    seed: int = 16


@dataclasses.dataclass(kw_only=True)
class Kill:
    victim: str
    """The identity SIGKILLed."""
    successor: str = ""
    takeover_seconds: float = 0.0
    """SIGKILL to the Lease held by another live replica."""
    first_write_seconds: float | None = None
    """SIGKILL to the earliest controller-written time (queuedAt, startedAt, updatedAt,
    finishedAt; wall clock, same machine) after it in any operation's final status:
    the new leader's first transition (None: none recorded)."""
    new_work_seconds: float | None = None
    """SIGKILL to the first status seen on an operation created after the kill (polled
    every 0.25 s): the new leader has listed and worked through what was queued."""
    killed_wall: float = 0.0
    """time.time() of the SIGKILL."""


@dataclasses.dataclass(kw_only=True)
class Outcome:
    operations: int
    final: dict[str, int]
    """Operations per state at the end."""
    lost: list[str]
    """Operations not Succeeded in time."""
    retried: list[str]
    """Operations past their first attempt (the executor was not supposed to fail)."""
    jobs_per_attempt: dict[str, int]
    """Attempts with more than one Job (should be empty)."""
    job_mismatch: list[str]
    """Operations whose recorded Job uid is not the Job that exists."""
    webhook_keys: int
    posts: int
    """POSTs received in all (a key POSTed again after a crash counts again)."""
    reposted_keys: int
    """Keys POSTed more than once: a leader killed between the POST and recording its
    acceptance; the receiver, idempotent per key, started nothing new."""
    work_per_key: dict[str, int]
    """Keys whose work was accepted more than once (should be empty)."""
    kills: list[Kill]
    seconds: float

    def takeover(self) -> dict[str, float]:
        times = sorted(k.takeover_seconds for k in self.kills)
        return _summary(times)

    def first_write(self) -> dict[str, float]:
        return _summary(
            sorted(k.first_write_seconds for k in self.kills if k.first_write_seconds is not None)
        )

    def new_work(self) -> dict[str, float]:
        return _summary(
            sorted(k.new_work_seconds for k in self.kills if k.new_work_seconds is not None)
        )


def _summary(times: list[float]) -> dict[str, float]:
    if not times:
        return {}
    return {
        "min": round(times[0], 2),
        "p50": round(statistics.median(times), 2),
        "p99": round(times[min(len(times) - 1, round(0.99 * (len(times) - 1)))], 2),
        "max": round(times[-1], 2),
    }


class Receiver(FakeExternalSystem):
    """The webhook receiver: accepts per key (idempotent), reports succeeded on a poll
    once the work has run ``work_seconds``."""

    def __init__(self, *, work_seconds: float) -> None:
        super().__init__()
        self._work_seconds = work_seconds
        self.accepted_at: dict[str, float] = {}
        self.accepted: collections.Counter[str] = collections.Counter()
        """Work accepted per key (FakeExternalSystem keeps the first per key)."""

    async def _start(self, request: web.Request) -> web.Response:
        key = request.headers["Idempotency-Key"]
        new = key not in self.jobs
        response = await super()._start(request)
        if new and key in self.jobs:
            self.accepted[key] += 1
            self.accepted_at[self.jobs[key]["id"]] = time.monotonic()
        return response

    async def _poll(self, request: web.Request) -> web.Response:
        started = self.accepted_at.get(request.match_info["id"])
        if started is not None and time.monotonic() - started >= self._work_seconds:
            return web.json_response({"state": "succeeded", "result": {"type": "t", "value": 1}})
        return web.json_response({"state": "running"})


class Replica(ControllerProcess):
    """One ``opkeeper controller`` process of the pair, restarted under a new identity
    after each kill (what a Deployment does with a crashed pod)."""

    def __init__(
        self,
        *,
        slot: int,
        plan: Plan,
        env: dict[str, str],
        namespace: str,
        logs: pathlib.Path,
        metrics_port: int = 0,
    ) -> None:
        super().__init__(env=env, namespace=namespace, log=logs / "unstarted.log")
        self.slot = slot
        self.metrics_port = metrics_port
        self._plan = plan
        self._logs = logs
        self.generation = 0
        self.identity = ""

    def start(self) -> None:
        self.generation += 1
        self.identity = f"replica-{self.slot}-{self.generation}"
        self._log = self._logs / f"{self.identity}.log"
        self._args = [
            "--lease-namespace",
            self._namespace,
            "--identity",
            self.identity,
            "--lease-duration",
            str(self._plan.lease_duration),
            "--renew-deadline",
            str(self._plan.renew_deadline),
            "--retry-period",
            str(self._plan.retry_period),
            "--metrics-port",
            str(self.metrics_port),
            "--metrics-address",
            "127.0.0.1",
            "--log-level",
            "info",
        ]
        super().start()


def holder(ops: Ops) -> str:
    """The leader Lease's holder in ``ops``' namespace ("" if none)."""
    coordination = kubernetes.client.CoordinationV1Api(ops.custom.api_client)
    try:
        lease = coordination.read_namespaced_lease("opkeeper-controller", ops.namespace)
    except kubernetes.client.ApiException as exc:
        if exc.status == 404:
            return ""
        raise
    return lease.spec.holder_identity or ""


@contextlib.contextmanager
def world(ops: Ops, *, receiver: Receiver, work_seconds: float) -> Iterator[None]:
    """The kubelet (completes Jobs) and the external system (reports results), as a
    thread polling the API server, for as long as the block runs."""
    stop = threading.Event()
    seen: dict[str, float] = {}
    reported: set[str] = set()

    def loop() -> None:
        while not stop.wait(0.2):
            now = time.monotonic()
            with contextlib.suppress(kubernetes.client.ApiException):
                for item in ops.batch.list_namespaced_job(ops.namespace).items:
                    name = item.metadata.name
                    done = any(c.type == "Complete" for c in item.status.conditions or ())
                    if done:
                        continue
                    if now - seen.setdefault(name, now) >= work_seconds:
                        complete_job(ops, name)
                for op in ops.custom.list_namespaced_custom_object(
                    GROUP, VERSION, ops.namespace, "operations"
                )["items"]:
                    name = op["metadata"]["name"]
                    status = op.get("status") or {}
                    if (
                        name.startswith("external-")
                        and status.get("state") == "WaitingExternal"
                        and name not in reported
                        and now - seen.setdefault(name, now) >= work_seconds
                    ):
                        ops.patch_status(name, {"result": {"type": "t", "value": 2}})
                        reported.add(name)

    thread = threading.Thread(target=loop, name="world", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def run(
    *,
    api: kubernetes.client.ApiClient,
    env: dict[str, str],
    namespace: str,
    plan: Plan,
    logs: pathlib.Path,
    settle_seconds: float = 120.0,
) -> Outcome:
    """One failover run (see the module docstring); the controllers are stopped after."""
    ops = Ops(api, namespace)
    rng = random.Random(plan.seed)
    started = time.monotonic()
    replicas = [
        Replica(slot=slot, plan=plan, env=env, namespace=namespace, logs=logs) for slot in (0, 1)
    ]
    kills: list[Kill] = []
    kill_times: list[float] = []
    created_at: dict[str, float] = {}
    touched_at: dict[str, float] = {}
    finished_at: dict[str, float] = {}
    watcher_stop = threading.Event()
    with (
        Receiver(work_seconds=plan.work_seconds) as receiver,
        world(ops, receiver=receiver, work_seconds=plan.work_seconds),
    ):
        webhook = {"url": f"{receiver.url}/start", "pollUrl": f"{receiver.url}/poll/{{id}}"}
        specs: dict[str, dict[str, Any]] = {
            "job": {"executor": {"job": {"template": JOB_TEMPLATE}}},
            "webhook": {"executor": {"webhook": webhook}},
            "external": {"executor": {"external": {}}},
        }
        names = [f"{KINDS[i % 3]}-{i}" for i in range(plan.operations)]
        try:
            for replica in replicas:
                replica.start()
            wait_for(lambda: holder(ops), timeout=60, what="a first leader")
            creator = threading.Thread(
                target=_create, args=(ops, names, specs, plan.create_rate, created_at), daemon=True
            )
            creator.start()
            watcher = threading.Thread(
                target=_watch, args=(ops, touched_at, finished_at, watcher_stop), daemon=True
            )
            watcher.start()
            for _ in range(plan.kills):
                time.sleep(plan.gap_seconds * (0.5 + rng.random()))  # pacing, not syncing
                leader = wait_for(
                    lambda: _live_leader(ops, replicas), timeout=120, what="a live leader"
                )
                # Kill only once the other replica stands by (a replacement still starting
                # up would add its start-up to the takeover).
                wait_for(
                    lambda leader=leader: all(
                        "standing by" in r.log() for r in replicas if r is not leader
                    ),
                    timeout=120,
                    what="a standby",
                )
                killed_at = time.monotonic()
                leader.kill()
                kill = Kill(victim=leader.identity, killed_wall=time.time())
                leader.start()  # the Deployment's replacement pod
                kill.successor = wait_for(
                    lambda victim=kill.victim: (h := holder(ops)) not in ("", victim) and h,
                    timeout=120,
                    what=f"a successor of {kill.victim}",
                )
                kill.takeover_seconds = time.monotonic() - killed_at
                kills.append(kill)
                kill_times.append(killed_at)
            creator.join()
            wait_for(
                lambda: len(finished_at) >= plan.operations,
                timeout=settle_seconds,
                what="every operation Succeeded",
            )
        except AssertionError:
            pass  # the outcome below says what is missing
        finally:
            watcher_stop.set()
            for replica in replicas:
                replica.stop()
        for kill, killed_at in zip(kills, kill_times, strict=True):
            after = [t for name, t in touched_at.items() if created_at.get(name, 0) > killed_at]
            kill.new_work_seconds = min(after) - killed_at if after else None
        return _outcome(
            ops, names=names, receiver=receiver, kills=kills, seconds=time.monotonic() - started
        )


def _create(
    ops: Ops,
    names: list[str],
    specs: dict[str, dict[str, Any]],
    rate: float,
    created_at: dict[str, float],
) -> None:
    start = time.monotonic()
    for i, name in enumerate(names):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # a steady creation rate (pacing, not synchronisation)
        kind = name.split("-", 1)[0]
        created_at[name] = time.monotonic()
        ops.create(name, {"type": f"failover_{kind}", **specs[kind]})


def _watch(
    ops: Ops, touched_at: dict[str, float], finished_at: dict[str, float], stop: threading.Event
) -> None:
    """Note when each operation is first seen with a state, and Succeeded (polling)."""
    while not stop.wait(0.25):
        with contextlib.suppress(kubernetes.client.ApiException):
            items = ops.custom.list_namespaced_custom_object(
                GROUP, VERSION, ops.namespace, "operations"
            )["items"]
            now = time.monotonic()
            for op in items:
                state = (op.get("status") or {}).get("state")
                if state:
                    touched_at.setdefault(op["metadata"]["name"], now)
                if state == "Succeeded":
                    finished_at.setdefault(op["metadata"]["name"], now)


def _live_leader(ops: Ops, replicas: list[Replica]) -> Replica | None:
    current = holder(ops)
    for replica in replicas:
        if replica.identity == current and replica.process and replica.process.poll() is None:
            return replica
    return None


def _outcome(
    ops: Ops, *, names: list[str], receiver: Receiver, kills: list[Kill], seconds: float
) -> Outcome:
    items = {
        op["metadata"]["name"]: op
        for op in ops.custom.list_namespaced_custom_object(
            GROUP, VERSION, ops.namespace, "operations"
        )["items"]
    }
    final = collections.Counter(
        (items.get(name, {}).get("status") or {}).get("state") or "Missing" for name in names
    )
    status = {name: (items.get(name, {}).get("status") or {}) for name in names}
    jobs = ops.batch.list_namespaced_job(ops.namespace).items
    per_attempt = collections.Counter(
        (j.metadata.labels[job.OPERATION_LABEL], j.metadata.labels[job.ATTEMPT_LABEL]) for j in jobs
    )
    uids = {j.metadata.name: j.metadata.uid for j in jobs}
    job_mismatch = [
        name
        for name in names
        if name.startswith("job-")
        and (status[name].get("executor") or {}).get("jobUid")
        != uids.get((status[name].get("executor") or {}).get("jobName", ""))
    ]
    written = sorted(
        datetime.datetime.fromisoformat(value).timestamp()
        for state in status.values()
        for field in ("queuedAt", "startedAt", "updatedAt", "finishedAt")
        if isinstance(value := state.get(field), str)
    )
    for kill in kills:
        after = next((t for t in written if t > kill.killed_wall), None)
        kill.first_write_seconds = None if after is None else after - kill.killed_wall
    return Outcome(
        operations=len(names),
        final=dict(sorted(final.items())),
        lost=[name for name in names if status[name].get("state") != "Succeeded"],
        retried=[name for name in names if status[name].get("attempt", 0) != 0],
        jobs_per_attempt={f"{k[0]}#{k[1]}": n for k, n in per_attempt.items() if n > 1},
        job_mismatch=job_mismatch,
        webhook_keys=len(receiver.posts),
        posts=sum(receiver.posts.values()),
        reposted_keys=sum(1 for n in receiver.posts.values() if n > 1),
        work_per_key={k: n for k, n in receiver.accepted.items() if n > 1},
        kills=kills,
        seconds=seconds,
    )
