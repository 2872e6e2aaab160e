"""Gandi ``operation_details`` through the Kubernetes aggregation layer vs. straight to the gateway.

Both paths in the same run, against the same gateway process and the same
operations: ``direct`` posts to the gateway's ``/xmlrpc`` with a Gandi session;
``aggregated`` posts to kube-apiserver's
``/apis/rpc.opkeeper.dev/v1alpha1/namespaces/bench/xmlrpc`` as a user with a
client certificate, which kube-apiserver authenticates, authorizes (create
xmlrpc) and proxies over TLS to the gateway, which checks the front proxy
and asks a (cached) SubjectAccessReview; ``aggregated_token`` is the same
call as a ServiceAccount with a bearer token (what in-cluster clients send:
kube-apiserver caches token authentications, while it verifies a client
certificate's chain on every request, twice with a front proxy configured);
``front_proxy_only`` sends the aggregated path's requests, with the headers
kube-apiserver adds, straight to the gateway's TLS port with a front-proxy
certificate, so our part is measured without kube-apiserver's.
The target: the aggregated path reaches at least half the direct rate; the
added latency is the difference of the percentiles. The CPU per call of the
gateway, kube-apiserver and the load generator says where the time goes.

kube-apiserver will not proxy to loopback, so the script re-runs itself under
``unshare -n`` (root) in a network namespace of its own, where the gateway
listens on 192.0.2.10 (:mod:`opkeeper.netnscluster`). The load generator is
bench_gateway.py's raw keep-alive HTTP client (plus TLS for kube-apiserver),
one process, ``--concurrency`` connections per path.

    sudo .venv/bin/python bench/bench_aggregated.py [--duration 10] [--operations 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import random
import ssl
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from typing import Any

import bench_gateway  # bench/bench_gateway.py: the client and result types
import common  # bench/common.py: the script's directory is on sys.path
from opkeeper import localcluster, netnscluster
from opkeeper.gateway import aggregated, auth

IN_NETNS = "OPKEEPER_BENCH_IN_NETNS"
"""Set in the re-run under ``unshare -n``."""
USER = "bench-reader"
SERVICE_ACCOUNT = "bench-caller"
"""The in-cluster caller of ``aggregated_token`` (in the bench namespace)."""
KEY = "opk_bench-aggregated-key-not-secret"


def request(*, host: str, path: str, body: bytes, extra: str = "") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/xml\r\n"
        f"{extra}Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


async def load(
    *,
    host: str,
    port: int,
    requests: list[bytes],
    ssl_context: ssl.SSLContext | None,
    duration: float,
    concurrency: int,
    rate: float | None = None,
) -> bench_gateway.Result:
    """``concurrency`` keep-alive connections, each sending a random request as soon as
    the previous answer is in (or, with ``rate``, no sooner than its next slot of an
    even ``rate`` requests per second in all), for ``duration`` seconds; an answer that
    is not a 200 without ``<fault>`` counts as a fault."""
    loop = asyncio.get_running_loop()
    connections = []
    for _ in range(concurrency):
        _, protocol = await loop.create_connection(
            bench_gateway._Connection, host, port, ssl=ssl_context
        )
        connections.append(protocol)
    latencies: list[float] = []
    faults = 0
    deadline = time.perf_counter() + duration

    async def worker(connection: bench_gateway._Connection, seed: int) -> None:
        nonlocal faults
        rnd = random.Random(seed)
        interval = 0.0 if rate is None else concurrency / rate
        slot = time.perf_counter() + interval * seed / concurrency
        while time.perf_counter() < deadline:
            if interval:
                await asyncio.sleep(max(0.0, slot - time.perf_counter()))
                slot += interval
            t0 = time.perf_counter()
            status, payload = await connection.call(requests[rnd.randrange(len(requests))])
            latencies.append(time.perf_counter() - t0)
            if not status.startswith(b"HTTP/1.1 200 ") or b"<fault>" in payload:
                faults += 1

    cpu_before = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(worker(c, i) for i, c in enumerate(connections)))
    seconds = time.perf_counter() - started
    for connection in connections:
        assert connection.transport is not None
        connection.transport.close()
    return bench_gateway.Result(
        requests=len(latencies),
        seconds=seconds,
        latencies=latencies,
        faults=faults,
        client_cpu_seconds=time.process_time() - cpu_before,
    )


def prepare(env: netnscluster.Environment, *, operations: int) -> dict[str, Any]:
    """Operations, an API key (direct path), and a user who may read them (aggregated)."""
    created = asyncio.run(bench_gateway.create_operations(str(env.cluster.kubeconfig), operations))
    env.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": SERVICE_ACCOUNT, "namespace": bench_gateway.NAMESPACE},
            },
            auth.key_secret(
                name="bench-key",
                namespace=netnscluster.SYSTEM_NAMESPACE,
                key=KEY,
                user_id="bench",
                tenant=bench_gateway.NAMESPACE,
            ),
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": "bench-reader", "namespace": bench_gateway.NAMESPACE},
                "rules": [
                    {"apiGroups": ["opkeeper.dev"], "resources": ["operations"], "verbs": ["get"]}
                ],
            },
            _binding("RoleBinding", "bench-reader", bench_gateway.NAMESPACE),
            _binding("ClusterRoleBinding", aggregated.CALLER_CLUSTER_ROLE, None),
        ]
    )
    direct = xmlrpc.client.ServerProxy(
        f"http://{netnscluster.ADDRESS}:{netnscluster.DIRECT_PORT}/xmlrpc"
    )

    def visible() -> bool:
        # Every operation was created before this; the watch delivers them in order.
        session = direct.login(KEY)
        return all(direct.operation_details(session, i) for i in (1, operations))

    netnscluster.wait_until("the gateway to see every operation", visible, timeout=120)
    token = env.kubectl(
        "create",
        "token",
        SERVICE_ACCOUNT,
        "-n",
        bench_gateway.NAMESPACE,
        "--duration=2h",
        check=True,
    ).stdout.strip()
    return {"session": direct.login(KEY), "token": token, "create_seconds": round(created, 1)}


def _binding(kind: str, role: str, namespace: str | None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": f"bench-{role}"}
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": kind,
        "metadata": metadata,
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role" if kind == "RoleBinding" else "ClusterRole",
            "name": role,
        },
        "subjects": [
            {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": USER},
            {
                "kind": "ServiceAccount",
                "name": SERVICE_ACCOUNT,
                "namespace": bench_gateway.NAMESPACE,
            },
        ],
    }


def _ca(env: netnscluster.Environment, stem: str) -> netnscluster.Issued:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_pem_private_key((env.pki / f"{stem}.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert = x509.load_pem_x509_certificate((env.pki / f"{stem}.crt").read_bytes())
    return netnscluster.Issued(cert=cert, key=key)


def user_context(env: netnscluster.Environment) -> ssl.SSLContext:
    """A TLS client of kube-apiserver as :data:`USER` (a certificate of the cluster CA)."""
    issued = netnscluster.issue(USER, by=_ca(env, "ca"), client=True)
    cert, key_path = issued.write(env.workdir / "user")
    context = ssl.create_default_context(cafile=str(env.pki / "ca.crt"))
    context.load_cert_chain(str(cert), str(key_path))
    return context


def token_context(env: netnscluster.Environment) -> ssl.SSLContext:
    """A TLS client of kube-apiserver without a client certificate (a bearer token)."""
    return ssl.create_default_context(cafile=str(env.pki / "ca.crt"))


def front_proxy_headers(*, credential_id: str) -> str:
    """What kube-apiserver 1.36 adds when it proxies a client-certificate user's call
    (besides Content-Length and Host): the identity, its credential-id extra (the
    certificate's hash), the X-Forwarded-* trail, an Audit-Id."""
    return (
        f"User-Agent: bench_aggregated\r\nAccept-Encoding: gzip\r\n"
        f"Audit-Id: 7b0f8a52-9a55-4f55-a3f5-3c9a1e6c2d10\r\n"
        f"X-Forwarded-For: {netnscluster.ADDRESS}\r\n"
        f"X-Forwarded-Host: {netnscluster.ADDRESS}\r\nX-Forwarded-Proto: https\r\n"
        f"X-Forwarded-Uri: /apis/{aggregated.GROUP_VERSION}/namespaces/"
        f"{bench_gateway.NAMESPACE}/xmlrpc\r\n"
        f"X-Remote-Extra-Authentication.kubernetes.io%2fcredential-Id: {credential_id}\r\n"
        f"X-Remote-Group: system:authenticated\r\nX-Remote-User: {USER}\r\n"
    )


def accepted_connections() -> int:
    """Connections accepted so far in this network namespace (its own TCP counters):
    the load generator's to kube-apiserver or the gateway, and kube-apiserver's to the
    gateway's aggregated port (each a TLS handshake there)."""
    lines = [line.split() for line in pathlib.Path("/proc/net/snmp").read_text().splitlines()]
    names, values = [line for line in lines if line[0] == "Tcp:"][:2]
    return int(values[names.index("PassiveOpens")])


def front_proxy_context(env: netnscluster.Environment) -> ssl.SSLContext:
    """A TLS client of the gateway's aggregated port as kube-apiserver's front proxy
    would be (a certificate of the front-proxy CA named front-proxy-client)."""
    issued = netnscluster.issue("front-proxy-client", by=_ca(env, "proxy-ca"), client=True)
    cert, key_path = issued.write(env.workdir / "front-proxy")
    context = ssl.create_default_context(cadata=env.serving_ca.cert_pem.decode())
    context.check_hostname = False
    context.load_cert_chain(str(cert), str(key_path))
    return context


def measure(env: netnscluster.Environment, args: argparse.Namespace) -> dict[str, Any]:
    prepared = prepare(env, operations=args.operations)
    ids = range(1, args.operations + 1)
    direct = [
        bench_gateway.http_post(
            netnscluster.ADDRESS,
            netnscluster.DIRECT_PORT,
            xmlrpc.client.dumps((prepared["session"], i), "operation_details").encode(),
        )
        for i in ids
    ]
    api = env.cluster.server.removeprefix("https://")
    api_host, api_port = api.rsplit(":", 1)
    path = f"/apis/{aggregated.GROUP_VERSION}/namespaces/{bench_gateway.NAMESPACE}/xmlrpc"
    through = [
        request(
            host=api,
            path=path,
            body=xmlrpc.client.dumps(("", i), "operation_details").encode(),
        )
        for i in ids
    ]
    with_token = [
        request(
            host=api,
            path=path,
            body=xmlrpc.client.dumps(("", i), "operation_details").encode(),
            extra=f"Authorization: Bearer {prepared['token']}\r\n",
        )
        for i in ids
    ]
    headers = front_proxy_headers(credential_id="X509SHA256=" + "ab" * 32)
    as_front_proxy = [
        request(
            host=f"{netnscluster.ADDRESS}:{netnscluster.AGGREGATED_PORT}",
            path=path,
            body=xmlrpc.client.dumps(("", i), "operation_details").encode(),
            extra=headers,
        )
        for i in ids
    ]
    paths: dict[str, dict[str, Any]] = {
        "direct": {
            "host": netnscluster.ADDRESS,
            "port": netnscluster.DIRECT_PORT,
            "requests": direct,
            "ssl_context": None,
        },
        "front_proxy_only": {
            "host": netnscluster.ADDRESS,
            "port": netnscluster.AGGREGATED_PORT,
            "requests": as_front_proxy,
            "ssl_context": front_proxy_context(env),
        },
        "aggregated": {
            "host": api_host,
            "port": int(api_port),
            "requests": through,
            "ssl_context": user_context(env),
        },
        "aggregated_token": {
            "host": api_host,
            "port": int(api_port),
            "requests": with_token,
            "ssl_context": token_context(env),
        },
    }
    apiserver = json.loads((env.cluster.state_dir / "state.json").read_text())["pids"][1]
    processes = {"gateway": env.gateway.pid, "kube_apiserver": apiserver}
    # Our part again, paced to the aggregated path's rate of the same round: the
    # gateway's CPU per call depends on the rate it is offered (fewer calls share each
    # wake-up and each call log commit), so this separates "what kube-apiserver's
    # requests cost us" from "what a lower rate costs us".
    paths["front_proxy_at_aggregated_rate"] = dict(paths["front_proxy_only"])
    rounds: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        figures: dict[str, Any] = {}
        for name, target in paths.items():
            if name == "front_proxy_at_aggregated_rate":
                target = target | {"rate": figures["aggregated"]["req_per_s"]}
            duration = 1.0 if round_ == 0 and args.rounds > 1 else args.duration
            before = {p: common.cpu_seconds(pid) for p, pid in processes.items()}
            accepted = accepted_connections()
            load_average = os.getloadavg()[0]
            result = asyncio.run(load(**target, duration=duration, concurrency=args.concurrency))
            figures[name] = result.summary() | {
                f"{p}_cpu_us_per_call": round(
                    (common.cpu_seconds(pid) - before[p]) / max(1, result.requests) * 1e6
                )
                for p, pid in processes.items()
            }
            # Beyond the load generator's own: kube-apiserver's new connections to us.
            figures[name]["new_backend_connections"] = (
                accepted_connections() - accepted - args.concurrency
            )
            figures[name]["load_average_1m"] = round(load_average, 2)
        rounds.append(figures)
    measured = rounds[1:] if len(rounds) > 1 else rounds  # the first is a warm-up
    best = {name: max((r[name] for r in measured), key=lambda s: s["req_per_s"]) for name in paths}
    # Paced: its rate is the aggregated one's; the round of the best aggregated rate.
    best["front_proxy_at_aggregated_rate"] = max(
        measured, key=lambda r: r["aggregated"]["req_per_s"]
    )["front_proxy_at_aggregated_rate"]
    return {
        "operations": args.operations,
        "create_seconds": prepared["create_seconds"],
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "rounds": rounds,
        "best": best,
        "ratio": round(best["aggregated"]["req_per_s"] / best["direct"]["req_per_s"], 3),
        "token_ratio": round(
            best["aggregated_token"]["req_per_s"] / best["direct"]["req_per_s"], 3
        ),
        # What one gateway process can serve by each path when it is the bottleneck (the
        # API server on control-plane nodes of its own, as in a real cluster): the
        # inverse ratio of the gateway's CPU per call.
        "front_proxy_only_ratio": round(
            best["front_proxy_only"]["req_per_s"] / best["direct"]["req_per_s"], 3
        ),
        "gateway_capacity_ratio": round(
            best["direct"]["gateway_cpu_us_per_call"]
            / max(1, best["aggregated"]["gateway_cpu_us_per_call"]),
            3,
        ),
        "added_p50_ms": round(best["aggregated"]["p50_ms"] - best["direct"]["p50_ms"], 2),
        "added_p99_ms": round(best["aggregated"]["p99_ms"] - best["direct"]["p99_ms"], 2),
    }


def markdown(report: dict[str, Any]) -> str:
    run = report["run"]
    lines = [
        "# operation_details: through kube-apiserver's aggregation layer vs. direct",
        "",
        f"{report['machine']['cpu']} ({report['machine']['cpus']} CPUs), kube-apiserver"
        f" {report['machine']['kube_apiserver']}, {run['operations']} operations,"
        f" {run['concurrency']} connections per path, {run['duration_s']:g} s per measurement,"
        f" best of {len(run['rounds']) - 1} rounds after a warm-up; load average (1 min) at"
        f" the start: {report['load_average_1m']}",
        "",
        "| path | req/s | p50 ms | p99 ms | faults | CPU µs/call: gateway | kube-apiserver"
        " | load generator | new connections to the gateway | load average |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, f in run["best"].items():
        lines.append(
            f"| {name} | {f['req_per_s']} | {f['p50_ms']} | {f['p99_ms']} | {f['faults']}"
            f" | {f['gateway_cpu_us_per_call']} | {f['kube_apiserver_cpu_us_per_call']}"
            f" | {f['client_cpu_us_per_call']} | {f.get('new_backend_connections', '')}"
            f" | {f.get('load_average_1m', '')} |"
        )
    lines += [
        "",
        f"aggregated / direct rate: **{run['ratio']}** (target >= 0.5); added latency"
        f" p50 {run['added_p50_ms']} ms, p99 {run['added_p99_ms']} ms. The same call as a"
        f" ServiceAccount with a bearer token (`aggregated_token`): **{run['token_ratio']}**.",
        "",
        "Every process shares the machine's CPUs here, so the rates include kube-apiserver's"
        " own CPU per proxied call. The gateway's CPU per call by each path gives the ratio"
        " one gateway process would reach with the API server on other cores:"
        f" **{run['gateway_capacity_ratio']}**. `front_proxy_only` sends the aggregated"
        " path's requests, with the headers kube-apiserver adds, straight to the gateway's"
        " TLS port as the front proxy would (TLS, front-proxy check, cached"
        " SubjectAccessReview, no kube-apiserver): our part alone,"
        f" **{run['front_proxy_only_ratio']}** of the direct rate. New connections to the"
        " gateway: connections accepted in the benchmark's network namespace during the"
        " measurement beyond the load generator's own, i.e. TLS handshakes kube-apiserver's"
        " proxy made with the gateway. `front_proxy_at_aggregated_rate` is"
        " `front_proxy_only` paced to the aggregated path's rate (same round): the gateway's"
        " CPU per call at that rate, whoever sends the calls.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--operations", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="the first is a 1 s warm-up")
    common.add_output_arguments(parser, name="aggregated")
    args = parser.parse_args()
    if not os.environ.get(IN_NETNS):
        if os.geteuid() != 0:
            print("bench_aggregated: needs root for unshare -n", file=sys.stderr)
            return 2
        return subprocess.run(
            ["unshare", "-n", sys.executable, *sys.argv], env={**os.environ, IN_NETNS: "1"}
        ).returncode
    netnscluster.enter_netns()
    load_average = round(os.getloadavg()[0], 2)
    with (
        tempfile.TemporaryDirectory(prefix="opkeeper-bench-aggregated-") as tmp,
        netnscluster.environment(pathlib.Path(tmp), controllers=()) as env,
    ):
        run = measure(env, args)
    report = {
        "when": common.now(),
        "load_average_1m": load_average,
        "machine": {
            "cpu": common.cpu_model(),
            "cpus": os.cpu_count(),
            "kube_apiserver": localcluster.KUBE_VERSION,
        },
        "run": run,
    }
    common.write_results(args.out, args.name, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
