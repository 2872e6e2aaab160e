"""CPU per API write and per watch event: our client against lightkube and kubernetes_asyncio.

Issue #16 asks whether kube.py's hand-written request layer should move onto a
maintained async client. This measures what each costs the calling process
for the same work against the same real kube-apiserver:

* writes: ``count`` ConfigMap creates, then ``count`` merge patches, 8 in
  flight, timed with ``time.process_time()`` (this process only: the API
  server's CPU is not ours to count);
* watch events: a watcher in a thread of its own (``time.thread_time()``) reads
  ``count`` ADDED events while another thread's client makes them.

The clients: ``opkeeper-main`` (kube.py as on the ``main`` branch, loaded from
git: the request layer before credentials that refresh and retries),
``opkeeper`` (this tree), ``lightkube`` (AsyncClient, its models) and
``kubernetes_asyncio`` (the generated async client, its models), each used as
its documentation shows. Clients not installed are skipped and said so
(``pip install lightkube kubernetes_asyncio``).

    python bench/bench_kubeclient.py [--kubeconfig PATH] [--count 1000] [--rounds 3]

Without ``--kubeconfig`` a local control plane is started for the run.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import functools
import importlib.util
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
import uuid
from collections.abc import Callable
from typing import Any

import common
from opkeeper import kube, localcluster

CONCURRENCY = 8
"""Writes in flight at once (the controller's workers make several at a time)."""
DATA = {f"key{i:02d}": "v" * 40 for i in range(16)}
"""The payload of each ConfigMap (about 1 KiB with its metadata)."""
WARMUP = 20
"""Writes before measuring: connections, imports and caches settle."""


class Adapter(abc.ABC):
    """One client library doing the benchmark's three things."""

    name: str

    @abc.abstractmethod
    async def create(self, namespace: str, name: str, labels: dict[str, str]) -> None: ...

    @abc.abstractmethod
    async def patch(self, namespace: str, name: str) -> None: ...

    @abc.abstractmethod
    async def watch(self, namespace: str, selector: str, version: str, count: int) -> None:
        """Return once ``count`` ADDED events (of ``selector``, from ``version``) were read."""

    @abc.abstractmethod
    async def close(self) -> None: ...


def _body(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels},
        "data": DATA,
    }


class Ours(Adapter):
    def __init__(self, module: types.ModuleType, kubeconfig: str, name: str) -> None:
        self.name = name
        self._module = module
        self._client = module.Client(module.Credentials.from_kubeconfig(kubeconfig))

    async def create(self, namespace: str, name: str, labels: dict[str, str]) -> None:
        await self._client.create(self._module.CONFIGMAPS, _body(name, labels), namespace=namespace)

    async def patch(self, namespace: str, name: str) -> None:
        await self._client.patch(
            self._module.CONFIGMAPS,
            namespace=namespace,
            name=name,
            body={"metadata": {"labels": {"patched": "yes"}}},
        )

    async def watch(self, namespace: str, selector: str, version: str, count: int) -> None:
        seen = 0
        async for kind, _ in self._client.watch(
            self._module.CONFIGMAPS,
            namespace=namespace,
            label_selector=selector,
            resource_version=version,
        ):
            seen += kind == "ADDED"
            if seen == count:
                return

    async def close(self) -> None:
        await self._client.close()


class Lightkube(Adapter):
    name = "lightkube"

    def __init__(self, kubeconfig: str) -> None:
        import lightkube

        self._lightkube = lightkube
        config = lightkube.KubeConfig.from_file(kubeconfig)
        self._client = lightkube.AsyncClient(config=config, field_manager="bench")
        from lightkube.resources.core_v1 import ConfigMap

        self._cm = ConfigMap

    async def create(self, namespace: str, name: str, labels: dict[str, str]) -> None:
        from lightkube.models.meta_v1 import ObjectMeta

        await self._client.create(
            self._cm(metadata=ObjectMeta(name=name, namespace=namespace, labels=labels), data=DATA)
        )

    async def patch(self, namespace: str, name: str) -> None:
        from lightkube.types import PatchType

        await self._client.patch(
            self._cm,
            name,
            {"metadata": {"labels": {"patched": "yes"}}},
            namespace=namespace,
            patch_type=PatchType.MERGE,
        )

    async def watch(self, namespace: str, selector: str, version: str, count: int) -> None:
        key, _, value = selector.partition("=")
        seen = 0
        async for kind, _ in self._client.watch(
            self._cm, namespace=namespace, labels={key: value}, resource_version=version
        ):
            seen += kind == "ADDED"
            if seen == count:
                return

    async def close(self) -> None:
        await self._client.close()


class KubernetesAsyncio(Adapter):
    name = "kubernetes_asyncio"

    def __init__(self, kubeconfig: str) -> None:
        self._kubeconfig = kubeconfig
        self._api: Any = None
        self._client: Any = None

    async def _core(self) -> Any:
        if self._api is None:
            from kubernetes_asyncio import client, config

            configuration = client.Configuration()
            await config.load_kube_config(
                config_file=self._kubeconfig, client_configuration=configuration
            )
            self._client = client.ApiClient(configuration)
            self._api = client.CoreV1Api(self._client)
        return self._api

    async def create(self, namespace: str, name: str, labels: dict[str, str]) -> None:
        core = await self._core()
        await core.create_namespaced_config_map(namespace, _body(name, labels))

    async def patch(self, namespace: str, name: str) -> None:
        core = await self._core()
        await core.patch_namespaced_config_map(
            name,
            namespace,
            {"metadata": {"labels": {"patched": "yes"}}},
            _content_type="application/merge-patch+json",
        )

    async def watch(self, namespace: str, selector: str, version: str, count: int) -> None:
        from kubernetes_asyncio import watch

        core = await self._core()
        seen = 0
        async with watch.Watch() as stream:
            async for event in stream.stream(
                core.list_namespaced_config_map,
                namespace,
                label_selector=selector,
                resource_version=version,
            ):
                seen += event["type"] == "ADDED"
                if seen == count:
                    return

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


def main_kube_module(ref: str) -> types.ModuleType | None:
    """kube.py as on ``ref`` (the request layer before this branch), as its own module."""
    shown = subprocess.run(
        ["git", "show", f"{ref}:operator/opkeeper/kube.py"],
        capture_output=True,
        text=True,
        check=False,
        cwd=common.RESULTS.parent.parent,
    )
    if shown.returncode != 0:
        return None
    path = pathlib.Path(tempfile.mkdtemp()) / "kube_before.py"
    path.write_text(shown.stdout)
    spec = importlib.util.spec_from_file_location("kube_before", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kube_before"] = module
    spec.loader.exec_module(module)
    return module


def adapters(kubeconfig: str, ref: str) -> tuple[dict[str, Callable[[], Adapter]], list[str]]:
    """The clients to measure (makers, so each is built in the loop that uses it)."""
    made: dict[str, Callable[[], Adapter]] = {}
    skipped: list[str] = []
    before = main_kube_module(ref)
    if before is not None:
        made[f"opkeeper-{ref}"] = lambda: Ours(before, kubeconfig, f"opkeeper-{ref}")
    else:
        skipped.append(f"opkeeper-{ref} (git show failed)")
    made["opkeeper"] = lambda: Ours(kube, kubeconfig, "opkeeper")
    for name, maker in (("lightkube", Lightkube), ("kubernetes_asyncio", KubernetesAsyncio)):
        if importlib.util.find_spec(name) is None:
            skipped.append(f"{name} (not installed)")
        else:
            made[name] = functools.partial(maker, kubeconfig)
    return made, skipped


async def _in_flight(calls: list[Callable[[], Any]]) -> None:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(call: Callable[[], Any]) -> None:
        async with gate:
            await call()

    await asyncio.gather(*(one(c) for c in calls))


async def measure_writes(adapter: Adapter, namespace: str, count: int) -> dict[str, float]:
    stem = uuid.uuid4().hex[:6]
    await _in_flight(
        [functools.partial(adapter.create, namespace, f"w-{stem}-{i}", {}) for i in range(WARMUP)]
    )
    result: dict[str, float] = {}
    for phase in ("create", "patch"):
        names = [f"{stem}-{i}" for i in range(count)]
        calls: list[Callable[[], Any]]
        if phase == "create":
            calls = [
                functools.partial(adapter.create, namespace, n, {"bench": stem}) for n in names
            ]
        else:
            calls = [functools.partial(adapter.patch, namespace, n) for n in names]
        cpu, wall = time.process_time(), time.perf_counter()
        await _in_flight(calls)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        result[f"{phase}_cpu_us"] = round(cpu / count * 1e6, 1)
        result[f"{phase}_per_s"] = round(count / wall, 1)
    return result


def measure_watch(
    make: Callable[[], Adapter], kubeconfig: str, namespace: str, count: int
) -> dict[str, float]:
    """The watcher's thread CPU for ``count`` events that this tree's client writes."""
    selector_value = uuid.uuid4().hex[:8]
    ready = threading.Event()
    out: dict[str, Any] = {}

    async def fresh_version() -> str:
        async with kube.Client(kube.Credentials.from_kubeconfig(kubeconfig)) as client:
            listed = await client.list(kube.CONFIGMAPS, namespace=namespace, page_size=1)
            return listed.resource_version

    version = asyncio.run(fresh_version())

    def watcher() -> None:
        async def run() -> None:
            adapter = make()
            try:
                task = asyncio.ensure_future(
                    adapter.watch(namespace, f"watched={selector_value}", version, count)
                )
                ready.set()
                cpu = time.thread_time()
                await asyncio.wait_for(task, 600)
                out["cpu"] = time.thread_time() - cpu
            finally:
                await adapter.close()

        try:
            asyncio.run(run())
        except BaseException as exc:  # reported by the main thread
            out["error"] = exc
            ready.set()

    thread = threading.Thread(target=watcher)
    thread.start()
    ready.wait(60)

    async def write() -> None:
        async with kube.Client(kube.Credentials.from_kubeconfig(kubeconfig)) as client:
            labels = {"watched": selector_value}
            await _in_flight(
                [
                    functools.partial(
                        client.create,
                        kube.CONFIGMAPS,
                        _body(f"e-{selector_value}-{i}", labels),
                        namespace=namespace,
                    )
                    for i in range(count)
                ]
            )

    asyncio.run(write())
    thread.join(600)
    if "error" in out:
        raise out["error"]
    return {"watch_event_cpu_us": round(out["cpu"] / count * 1e6, 1)}


def run(
    kubeconfig: str, count: int, ref: str, *, rounds: int, only: list[str] | None
) -> dict[str, Any]:
    """Each client ``rounds`` times, in an order that turns each round (a shared machine's
    load drifts); each figure is the median over the rounds, every round kept."""
    makers, skipped = adapters(kubeconfig, ref)
    if only:
        makers = {name: make for name, make in makers.items() if name in only}
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in makers}
    order = list(makers)
    for round_ in range(rounds):
        turned = order[round_ % len(order) :] + order[: round_ % len(order)]
        for name in turned:
            make = makers[name]
            namespace = f"bench-kubeclient-{uuid.uuid4().hex[:6]}"

            async def setup(namespace: str = namespace) -> None:
                async with kube.Client(kube.Credentials.from_kubeconfig(kubeconfig)) as client:
                    await kube.ensure_namespace(client, namespace)

            asyncio.run(setup())

            async def writes(
                namespace: str = namespace, make: Callable[[], Adapter] = make
            ) -> dict[str, float]:
                adapter = make()
                try:
                    return await measure_writes(adapter, namespace, count)
                finally:
                    await adapter.close()

            sample = asyncio.run(writes())
            sample.update(measure_watch(make, kubeconfig, namespace, count))
            samples[name].append(sample)
            print(name, sample, flush=True)
    results = {
        name: {key: statistics.median(s[key] for s in runs) for key in runs[0]}
        for name, runs in samples.items()
    }
    return {
        "count": count,
        "concurrency": CONCURRENCY,
        "rounds": rounds,
        "clients": results,
        "samples": samples,
        "skipped": skipped,
    }


def markdown(report: dict[str, Any]) -> str:
    facts = report["machine"]
    lines = [
        "# Kubernetes client: CPU per write and per watch event",
        "",
        common.markdown_header(facts),
        "",
        f"{report['count']} ConfigMaps (~1 KiB) per phase, {report['concurrency']} writes in"
        " flight; CPU of the calling process only (the API server's is not counted);"
        f" medians of {report['rounds']} rounds, the clients' order turning each round.",
        "",
        "| client | create µs CPU | patch µs CPU | watch event µs CPU | creates/s | patches/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in report["clients"].items():
        lines.append(
            f"| {name} | {r['create_cpu_us']} | {r['patch_cpu_us']} | {r['watch_event_cpu_us']}"
            f" | {r['create_per_s']} | {r['patch_per_s']} |"
        )
    if report["skipped"]:
        lines += ["", "Skipped: " + ", ".join(report["skipped"]) + "."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kubeconfig", help="an existing cluster (default: start one)")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--before", default="main", help="git ref of the 'before' kube.py")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", help="comma-separated subset, e.g. opkeeper-main,opkeeper")
    common.add_output_arguments(parser, name="kubeclient")
    args = parser.parse_args()
    only = args.clients.split(",") if args.clients else None
    options = {"rounds": args.rounds, "only": only}
    if args.kubeconfig:
        report = run(args.kubeconfig, args.count, args.before, **options)
    else:
        with localcluster.started(pathlib.Path(tempfile.mkdtemp())) as local:
            report = run(str(local.kubeconfig), args.count, args.before, **options)
    report["machine"] = common.info()
    common.write_results(args.out, args.name, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
