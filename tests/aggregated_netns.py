"""The aggregated API's end-to-end checks, run inside a network namespace of their own.

tests/test_aggregated_api.py starts this as ``unshare -n python -m
tests.aggregated_netns OUT.json``; it brings up the environment of
:mod:`opkeeper.netnscluster` (real etcd, kube-apiserver, the namespace
controller, the gateway registered as an APIService) and runs every check in
order, each recorded as ``{"ok": bool, "detail": str}`` in OUT.json, which
the test then asserts one by one. One check failing does not stop the others.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import re
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import xmlrpc.client
from collections.abc import Callable, Iterator
from typing import Any

from opkeeper import localcluster, netnscluster
from opkeeper.gateway import aggregated

NS_A = "team-a"
NS_B = "team-b"
NS_DELETED = "team-gone"
CALL = "/apis/rpc.opkeeper.dev/v1alpha1/namespaces/{ns}/xmlrpc"


def rbac() -> list[dict[str, Any]]:
    """alice may read operations in team-a; bob may read and write them there; both
    may pass kube-apiserver's own check anywhere (so team-b is refused by the gateway)."""

    def role(name: str, verbs: list[str]) -> dict[str, Any]:
        return {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": name, "namespace": NS_A},
            "rules": [{"apiGroups": ["opkeeper.dev"], "resources": ["operations"], "verbs": verbs}],
        }

    def binding(
        kind: str, name: str, role: str, user: str, namespace: str | None
    ) -> dict[str, Any]:
        metadata = {"name": name} | ({"namespace": namespace} if namespace else {})
        return {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": kind,
            "metadata": metadata,
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role" if kind == "RoleBinding" else "ClusterRole",
                "name": role,
            },
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
        }

    caller = aggregated.CALLER_CLUSTER_ROLE
    return [
        role("reader", ["get", "list"]),
        role("writer", ["get", "list", "create", "patch"]),
        binding("RoleBinding", "alice-reads", "reader", "alice", NS_A),
        binding("RoleBinding", "bob-writes", "writer", "bob", NS_A),
        binding("ClusterRoleBinding", "alice-calls", caller, "alice", None),
        binding("ClusterRoleBinding", "bob-calls", caller, "bob", None),
    ]


class Checks:
    def __init__(self, env: netnscluster.Environment) -> None:
        self.env = env
        self.results: dict[str, dict[str, Any]] = {}
        self.opid = 0

    def run(self, name: str, check: Callable[[], str]) -> None:
        started = time.monotonic()
        try:
            detail = check()
            ok = True
        except Exception as exc:
            detail, ok = f"{type(exc).__name__}: {exc}", False
        self.results[name] = {
            "ok": ok,
            "detail": detail[:4000],
            "seconds": round(time.monotonic() - started, 2),
        }
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail[:300]}", file=sys.stderr, flush=True)

    # --- helpers ---------------------------------------------------------------------

    def raw_call(self, user: str, ns: str, body: str) -> subprocess.CompletedProcess[str]:
        path = self.env.workdir / "call.xml"
        path.write_text(body)
        return self.env.kubectl(
            f"--as={user}", "create", "--raw", CALL.format(ns=ns), "-f", str(path)
        )

    def direct(
        self, *, headers: dict[str, str], client: netnscluster.Issued | None
    ) -> tuple[int, bytes]:
        """POST operation_list to the gateway's TLS port itself, not through the API server."""
        request = urllib.request.Request(
            f"https://{netnscluster.ADDRESS}:{netnscluster.AGGREGATED_PORT}{CALL.format(ns=NS_A)}",
            data=xmlrpc.client.dumps(("",), "operation_list").encode(),
            headers={"Content-Type": "text/xml", **headers},
        )
        context = self.env.direct_context(client=client)
        try:
            with urllib.request.urlopen(request, context=context, timeout=10) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    # --- the checks --------------------------------------------------------------------

    def discovery_kubectl(self) -> str:
        listed = self.env.kubectl("api-resources", "--api-group=rpc.opkeeper.dev", "-o=wide")
        assert listed.returncode == 0, listed.stderr
        assert re.search(
            r"^xmlrpc\s+rpc.opkeeper.dev/v1alpha1\s+true\s+XMLRPC", listed.stdout, re.M
        ), listed.stdout
        raw = self.env.kubectl("get", "--raw", "/apis/rpc.opkeeper.dev/v1alpha1")
        assert raw.returncode == 0, raw.stderr
        resources = json.loads(raw.stdout)
        assert resources["kind"] == "APIResourceList", resources
        assert [r["name"] for r in resources["resources"]] == ["xmlrpc"], resources
        group = json.loads(self.env.kubectl("get", "--raw", "/apis/rpc.opkeeper.dev").stdout)
        assert group["preferredVersion"]["version"] == "v1alpha1", group
        return listed.stdout.strip()

    def discovery_aggregated(self) -> str:
        """kube-apiserver's aggregated discovery lists the group, and the gateway itself
        answers the v2 form the aggregator asks for."""
        request = urllib.request.Request(
            self.env.cluster.server + "/apis",
            headers={"Accept": aggregated.DISCOVERY_V2},
        )
        with urllib.request.urlopen(request, context=self.env.admin_context(), timeout=30) as r:
            merged = json.loads(r.read())
            content_type = r.headers["Content-Type"]
        assert "apidiscovery.k8s.io" in content_type, content_type
        ours = [g for g in merged["items"] if g["metadata"]["name"] == aggregated.GROUP]
        assert ours, [g["metadata"]["name"] for g in merged["items"]]
        assert ours[0]["versions"][0]["resources"][0]["resource"] == "xmlrpc", ours
        direct = urllib.request.Request(
            f"https://{netnscluster.ADDRESS}:{netnscluster.AGGREGATED_PORT}/apis",
            headers={"Accept": f"{aggregated.DISCOVERY_V2},{aggregated.DISCOVERY_V2BETA1}"},
        )
        with urllib.request.urlopen(direct, context=self.env.direct_context(), timeout=10) as r:
            assert r.headers["Content-Type"] == aggregated.DISCOVERY_V2, r.headers
            assert json.loads(r.read())["kind"] == "APIGroupDiscoveryList"
        return f"merged discovery ({content_type}) lists {ours[0]['versions'][0]['resources']}"

    def openapi(self) -> str:
        def v2_has_path() -> bool:
            spec = json.loads(self.env.kubectl("get", "--raw", "/openapi/v2").stdout or "{}")
            return aggregated.CALL_PATH in spec.get("paths", {})

        def v3_lists_us() -> bool:
            root = json.loads(self.env.kubectl("get", "--raw", "/openapi/v3").stdout or "{}")
            return f"apis/{aggregated.GROUP_VERSION}" in root.get("paths", {})

        # kube-apiserver aggregates v2 and v3 in separate controllers: either may be first.
        netnscluster.wait_until(
            "our path in the aggregated /openapi/v2", v2_has_path, timeout=90, interval=1
        )
        netnscluster.wait_until(
            "our group in the /openapi/v3 list", v3_lists_us, timeout=90, interval=1
        )
        v3 = self.env.kubectl("get", "--raw", f"/openapi/v3/apis/{aggregated.GROUP_VERSION}")
        assert aggregated.CALL_PATH in json.loads(v3.stdout)["paths"], v3.stdout[:500]
        log = (self.env.cluster.state_dir / "kube-apiserver.log").read_text(errors="replace")
        errors = [
            line
            for line in log.splitlines()
            if "rpc.opkeeper.dev" in line and re.search(r"^E\d{4}|error|fail", line, re.I)
        ]
        assert not errors, "\n".join(errors[:5])
        return f"v2 and v3 list {aggregated.CALL_PATH}; kube-apiserver logged no error about us"

    def bob_creates(self) -> str:
        body = xmlrpc.client.dumps(("", "noop", {"domain": "example.org"}), "operation_create")
        done = self.raw_call("bob", NS_A, body)
        assert done.returncode == 0, done.stderr
        (self.opid,), _ = xmlrpc.client.loads(done.stdout)
        assert isinstance(self.opid, int), done.stdout
        assert self.opid > 0, done.stdout
        return f"kubectl --as bob create --raw: operation {self.opid}"

    def alice_reads_with_kubectl(self) -> str:
        done = self.raw_call(
            "alice", NS_A, xmlrpc.client.dumps(("", self.opid), "operation_details")
        )
        assert done.returncode == 0, done.stderr
        (details,), _ = xmlrpc.client.loads(done.stdout)
        assert details["id"] == self.opid, details
        assert details["type"] == "noop", details
        return f"details: state {details['state']}"

    @contextlib.contextmanager
    def proxy(self, user: str) -> Iterator[str]:
        """``kubectl proxy --as user`` on a free port; yields its base URL."""
        process = subprocess.Popen(
            [
                localcluster.kubectl_path(),
                f"--kubeconfig={self.env.cluster.kubeconfig}",
                f"--as={user}",
                "proxy",
                "--port=0",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            found = re.search(r"127\.0\.0\.1:(\d+)", line)
            assert found, line
            yield f"http://127.0.0.1:{found.group(1)}"
        finally:
            process.terminate()
            process.wait(10)

    def alice_reads_with_xmlrpc_client(self) -> str:
        with self.proxy("alice") as base:
            server = xmlrpc.client.ServerProxy(base + CALL.format(ns=NS_A))
            listed = server.operation_list("")
            assert self.opid in listed, listed  # type: ignore[operator]
            details = server.operation_details("", self.opid)
            assert details["id"] == self.opid, details  # type: ignore[index]
            records = server.query("operation")
            assert any(r["id"] == self.opid for r in records), records  # type: ignore[union-attr]
            fault = None
            try:
                server.login("alice", "anything")
            except xmlrpc.client.Fault as exc:
                fault = exc.faultString
            assert fault is not None
            assert "Kubernetes identity" in fault, fault
        return f"operation_list {listed}, query found it, login explains itself"

    def forbidden(self) -> str:
        """alice may not write in team-a; neither may call in team-b: Status 403 from us."""
        shown = []
        with self.proxy("alice") as alice, self.proxy("bob") as bob:
            cases = [
                (alice, NS_A, ("", "noop", {}), "operation_create"),
                (alice, NS_B, ("",), "operation_list"),
                (bob, NS_B, ("",), "operation_list"),
                (alice, NS_A, ([{"__type__": "operation", "name": "x", "type": "noop"}],), "apply"),
            ]
            for base, ns, params, method in cases:
                code, status = _post(base + CALL.format(ns=ns), xmlrpc.client.dumps(params, method))
                assert code == 403, (method, ns, code, status)
                assert status["kind"] == "Status", status
                assert status["reason"] == "Forbidden", status
                assert "through rpc.opkeeper.dev needs" in status["message"], status
                shown.append(status["message"])
            with contextlib.suppress(xmlrpc.client.ProtocolError):
                xmlrpc.client.ServerProxy(alice + CALL.format(ns=NS_A)).operation_cancel(
                    "", self.opid
                )
                raise AssertionError("alice's cancel was allowed")
        return "; ".join(shown)

    def direct_connections_refused(self) -> str:
        forged = {"X-Remote-User": "bob", "X-Remote-Group": "system:masters"}
        shown = []
        status, body = self.direct(headers=forged, client=None)
        assert status == 401, (status, body)
        assert json.loads(body)["reason"] == "Unauthorized", body
        shown.append("no client certificate: 401")
        proxy_ca = netnscluster.Issued(
            cert=_load_cert(self.env.pki / "proxy-ca.crt"),
            key=_load_key(self.env.pki / "proxy-ca.key"),
        )
        wrong_name = netnscluster.issue("not-the-front-proxy", by=proxy_ca, client=True)
        status, body = self.direct(headers=forged, client=wrong_name)
        assert status == 401, (status, body)
        shown.append("front-proxy CA, CN not allowed: 401")
        stranger = netnscluster.issue(
            "front-proxy-client", by=netnscluster.issue("some-other-ca"), client=True
        )
        try:
            status, body = self.direct(headers=forged, client=stranger)
        except (ssl.SSLError, urllib.error.URLError, ConnectionError) as exc:
            shown.append(f"another CA's certificate: handshake refused ({exc})")
        else:
            assert status == 401, (status, body)
            shown.append("another CA's certificate: 401")
        return "; ".join(shown)

    def call_log_user(self) -> str:
        def logged() -> list[tuple[str, str]]:
            with contextlib.closing(sqlite3.connect(self.env.call_log)) as db:
                return list(
                    db.execute(
                        "SELECT method, user FROM calls WHERE tenant = ? ORDER BY serial", (NS_A,)
                    )
                )

        rows = netnscluster.wait_until("call log entries", logged, timeout=10)
        assert ("operation_create", "bob") in rows, rows
        assert ("operation_details", "alice") in rows, rows
        return f"{rows}"

    def namespace_deletion(self) -> str:
        self.env.kubectl("create", "namespace", NS_DELETED, check=True)
        self.env.kubectl("create", "configmap", "x", "-n", NS_DELETED, check=True)
        self.env.kubectl("delete", "namespace", NS_DELETED, "--wait=false", check=True)
        netnscluster.wait_until(
            "the namespace to be gone",
            lambda: self.env.kubectl("get", "namespace", NS_DELETED).returncode != 0,
            timeout=90,
            interval=0.5,
        )
        still = self.env.kubectl("get", "apiservice", f"{aggregated.VERSION}.{aggregated.GROUP}")
        assert still.returncode == 0, still.stderr
        assert "True" in still.stdout, still.stdout
        return f"{NS_DELETED} deleted while the APIService is registered:\n{still.stdout}"

    def deletion_blocked_while_unavailable(self) -> str:
        """The failure mode docs/aggregated-api.md warns about, and the way out: with no
        endpoint the APIService is unavailable, the namespace controller cannot discover
        every API and a namespace deletion stalls; once it is back the deletion ends."""
        self.env.kubectl(
            "delete", "endpointslice", f"{netnscluster.SERVICE}-manual",
            "-n", netnscluster.SYSTEM_NAMESPACE, check=True,
        )  # fmt: skip
        netnscluster.wait_until(
            "the APIService unavailable", lambda: not netnscluster.available(self.env), timeout=60
        )
        name = f"{NS_DELETED}-2"
        self.env.kubectl("create", "namespace", name, check=True)
        self.env.kubectl("delete", "namespace", name, "--wait=false", check=True)

        def stalled() -> str:
            found = json.loads(self.env.kubectl("get", "namespace", name, "-o=json").stdout)
            for condition in found.get("status", {}).get("conditions", []):
                if condition["type"] == "NamespaceDeletionDiscoveryFailure":
                    return str(condition["message"]) if condition["status"] == "True" else ""
            return ""

        message = netnscluster.wait_until("the deletion to stall", stalled, timeout=60)
        assert "rpc.opkeeper.dev/v1alpha1" in message, message
        self.env.apply(netnscluster.endpoints())
        netnscluster.wait_until(
            "the APIService available", lambda: netnscluster.available(self.env), timeout=60
        )
        netnscluster.wait_until(
            "the namespace to be gone",
            lambda: self.env.kubectl("get", "namespace", name).returncode != 0,
            timeout=90,
            interval=0.5,
        )
        return f"stalled ({message}), then deleted once the APIService was available again"

    def ca_rotation(self) -> str:
        """A new front-proxy CA and client certificate for kube-apiserver; the gateway
        picks the CA up from the ConfigMap without a restart."""
        pid = self.env.gateway.pid
        new_ca = netnscluster.issue("opkeeper-front-proxy-ca-2")
        client = netnscluster.issue("front-proxy-client", by=new_ca, client=True)
        new_ca.write(self.env.pki / "proxy-ca")
        client.write(self.env.pki / "proxy-client")
        new_pem = new_ca.cert_pem.decode().strip()

        def published() -> bool:
            got = self.env.kubectl(
                "get",
                "configmap",
                "extension-apiserver-authentication",
                "-n",
                "kube-system",
                "-o=jsonpath={.data.requestheader-client-ca-file}",
            )
            return new_pem in got.stdout

        netnscluster.wait_until("the new CA in the ConfigMap", published, timeout=120, interval=1)
        trusted = netnscluster.wait_until(
            "the gateway to trust the new CA",
            lambda: self.direct(headers={"X-Remote-User": "bob"}, client=client)[0] == 200,
            timeout=30,
        )
        body = xmlrpc.client.dumps(("", self.opid), "operation_details")
        netnscluster.wait_until(
            "a call through the rotated proxy certificate",
            lambda: self.raw_call("bob", NS_A, body).returncode == 0,
            timeout=120,
            interval=1,
        )
        assert self.env.gateway.poll() is None
        assert self.env.gateway.pid == pid
        return f"new CA trusted ({trusted}) and used by kube-apiserver; gateway pid {pid} unchanged"


def _post(url: str, body: str) -> tuple[int, dict[str, Any]]:
    """POST ``body``; the HTTP status and the JSON answer (a refusal's Status)."""
    request = urllib.request.Request(url, data=body.encode(), headers={"Content-Type": "text/xml"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, {"body": reply.read().decode()}
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _load_cert(path: pathlib.Path) -> Any:
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes())


def _load_key(path: pathlib.Path) -> Any:
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def main() -> int:
    out = pathlib.Path(sys.argv[1])
    started = time.monotonic()
    netnscluster.enter_netns()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="opkeeper-aggregated-") as tmp:
        try:
            with netnscluster.environment(pathlib.Path(tmp)) as env:
                for ns in (NS_A, NS_B):
                    env.kubectl("create", "namespace", ns, check=True)
                env.apply(rbac())
                checks = Checks(env)
                for name in (
                    "discovery_kubectl",
                    "discovery_aggregated",
                    "openapi",
                    "bob_creates",
                    "alice_reads_with_kubectl",
                    "alice_reads_with_xmlrpc_client",
                    "forbidden",
                    "direct_connections_refused",
                    "call_log_user",
                    "namespace_deletion",
                    "deletion_blocked_while_unavailable",
                    "ca_rotation",
                ):
                    checks.run(name, getattr(checks, name))
                results = checks.results
        except Exception as exc:
            results["environment"] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"}
    out.write_text(
        json.dumps({"checks": results, "seconds": round(time.monotonic() - started, 1)}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
