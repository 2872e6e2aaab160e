"""A control plane with the gateway registered as an aggregated API, inside a network namespace.

kube-apiserver refuses to proxy to loopback endpoint addresses (Endpoints and
EndpointSlices may not hold them), so the gateway listens on a TEST-NET-1
address (:data:`ADDRESS`, RFC 5737: never routed, never a real machine's)
added to the ``lo`` of a network namespace of its own. :func:`enter_netns`
only checks that the caller already is in a fresh one (``unshare -n``) and
sets it up; nothing here ever touches the host's network.

Used by tests/aggregated_netns.py (the checks) and bench/bench_aggregated.py; it
needs the dev extra (cryptography) and is never imported by the operator or gateway.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import ipaddress
import json
import os
import pathlib
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from opkeeper import localcluster
from opkeeper.gateway import aggregated

ADDRESS = "192.0.2.10"
"""The gateway's address in the namespace (TEST-NET-1)."""
SYSTEM_NAMESPACE = "opkeeper-system"
SERVICE = "opkeeper-aggregated"
SERVICE_ACCOUNT = "opkeeper-gateway"
AGGREGATED_PORT = 8443
DIRECT_PORT = 8480


def enter_netns() -> None:
    """Bring up ``lo`` with :data:`ADDRESS`; refuses unless this is a fresh network
    namespace (no interface but ``lo``), so the host's network is never changed."""
    # Not /sys/class/net: sysfs still shows the namespace it was mounted in.
    listed = subprocess.run(
        ["ip", "-o", "link", "show"], check=True, capture_output=True, text=True
    )
    names = [line.split(":")[1].strip() for line in listed.stdout.splitlines() if ":" in line]
    others = sorted(n for n in names if n != "lo")
    if others:
        raise RuntimeError(f"not in a fresh network namespace (interfaces: {others})")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "addr", "add", f"{ADDRESS}/32", "dev", "lo"], check=True)


# --- certificates ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, stem: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
        """``stem.crt`` and ``stem.key``; the key first, so a reader that sees the new
        certificate finds its key."""
        cert, key = stem.with_suffix(".crt"), stem.with_suffix(".key")
        key.write_bytes(self.key_pem)
        key.chmod(0o600)
        cert.write_bytes(self.cert_pem)
        return cert, key


def issue(
    cn: str,
    *,
    by: Issued | None = None,
    ca: bool = False,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    client: bool = False,
) -> Issued:
    """A throw-away certificate (a CA when ``by`` is None), valid for a day."""
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(by.cert.subject if by else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca or by is None, path_length=None), critical=True)
    )
    if by is None:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if names or client:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    cert = builder.sign(by.key if by else key, hashes.SHA256())
    return Issued(cert=cert, key=key)


# --- the environment -------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class Environment:
    """Everything the checks and the benchmark use."""

    cluster: localcluster.LocalCluster
    workdir: pathlib.Path
    serving_ca: Issued
    gateway: subprocess.Popen[bytes]
    call_log: pathlib.Path

    @property
    def pki(self) -> pathlib.Path:
        return self.cluster.state_dir / "pki"

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [localcluster.kubectl_path(), f"--kubeconfig={self.cluster.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def apply(self, objects: Sequence[dict[str, Any]]) -> None:
        docs = yaml.safe_dump_all(list(objects))
        self.kubectl(
            "apply", "--server-side", "--force-conflicts", "-f", "-", input=docs, check=True
        )

    def admin_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        context.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return context

    def api_get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(
                self.cluster.server + path, context=self.admin_context(), timeout=30
            ) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def direct_context(self, *, client: Issued | None = None) -> ssl.SSLContext:
        """A TLS client of the gateway's aggregated port itself (not through the API
        server), trusting its serving CA, with ``client`` as its certificate."""
        context = ssl.create_default_context(cadata=self.serving_ca.cert_pem.decode())
        context.check_hostname = False
        if client is not None:
            stem = self.workdir / f"client-{client.cert.serial_number}"
            cert, key = client.write(stem)
            context.load_cert_chain(str(cert), str(key))
        return context


def wait_until(what: str, check: Any, *, timeout: float, interval: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy; the value, or TimeoutError."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # a component still starting: keep waiting
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)  # polling another process's state; nothing to wait on
    raise TimeoutError(f"{what}: not within {timeout:g} s (last: {last!r})")


@contextlib.contextmanager
def environment(
    workdir: pathlib.Path,
    *,
    direct_port: int = DIRECT_PORT,
    controllers: tuple[str, ...] = ("namespace-controller",),
    gateway_args: Sequence[str] = (),
) -> Iterator[Environment]:
    """A control plane (with ``controllers`` of kube-controller-manager), the gateway on
    :data:`ADDRESS` with both listeners, and the aggregated API registered and Available."""
    with localcluster.LocalCluster(
        state_dir=workdir / "cluster", controllers=controllers
    ) as cluster:
        localcluster.install_crds(kubeconfig=cluster.kubeconfig)
        serving_ca = issue("opkeeper-aggregated-ca")
        serving = issue(
            "opkeeper-aggregated",
            by=serving_ca,
            dns=[f"{SERVICE}.{SYSTEM_NAMESPACE}.svc"],
            ips=[ADDRESS],
        )
        cert, key = serving.write(workdir / "serving")
        env = Environment(
            cluster=cluster,
            workdir=workdir,
            serving_ca=serving_ca,
            gateway=None,  # type: ignore[arg-type]  # started below
            call_log=workdir / "calllog.sqlite3",
        )
        env.kubectl("create", "namespace", SYSTEM_NAMESPACE, check=True)
        env.kubectl("create", "serviceaccount", SERVICE_ACCOUNT, "-n", SYSTEM_NAMESPACE, check=True)
        registration = aggregated.registration(
            namespace=SYSTEM_NAMESPACE,
            service=SERVICE,
            service_account=SERVICE_ACCOUNT,
            ca_bundle_pem=serving_ca.cert_pem,
            target_port=AGGREGATED_PORT,
            selector=None,
        )
        # The APIService last, once the gateway answers: registered earlier, the
        # aggregator would (rightly) log that it cannot reach it yet.
        api_service = [o for o in registration if o["kind"] == "APIService"]
        env.apply([o for o in registration if o["kind"] != "APIService"])
        env.apply(endpoints() + _gateway_rbac())
        gateway_kubeconfig = _service_account_kubeconfig(env)
        log_path = workdir / "gateway.log"
        with log_path.open("wb") as log:
            env.gateway = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "opkeeper.cli",
                    "gateway",
                    f"--kubeconfig={gateway_kubeconfig}",
                    f"--host={ADDRESS}",
                    f"--port={direct_port}",
                    f"--key-namespace={SYSTEM_NAMESPACE}",
                    f"--call-log={env.call_log}",
                    f"--aggregated-cert={cert}",
                    f"--aggregated-key={key}",
                    f"--aggregated-host={ADDRESS}",
                    f"--aggregated-port={AGGREGATED_PORT}",
                    *gateway_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={k: v for k, v in os.environ.items() if k != "KUBECONFIG"},
            )
        try:
            wait_until(
                "the gateway's /readyz",
                lambda: _ready(env, log_path, f"http://{ADDRESS}:{direct_port}/readyz"),
                timeout=60,
            )
            env.apply(api_service)
            wait_until("APIService Available", lambda: available(env), timeout=90)
            yield env
        finally:
            env.gateway.send_signal(signal.SIGTERM)
            try:
                env.gateway.wait(30)
            except subprocess.TimeoutExpired:
                env.gateway.kill()
                env.gateway.wait()


def _ready(env: Environment, log_path: pathlib.Path, url: str) -> bool:
    if env.gateway.poll() is not None:
        raise RuntimeError(f"the gateway exited:\n{log_path.read_text()[-3000:]}")
    with urllib.request.urlopen(url, timeout=5) as reply:
        return bool(reply.status == 200)


def available(env: Environment) -> bool:
    found = env.kubectl("get", "apiservice", f"{aggregated.VERSION}.{aggregated.GROUP}", "-o=json")
    if found.returncode != 0:
        return False
    conditions = json.loads(found.stdout).get("status", {}).get("conditions", [])
    return any(c["type"] == "Available" and c["status"] == "True" for c in conditions)


def endpoints() -> list[dict[str, Any]]:
    """The Service's endpoint, by hand (no Pods, no endpoint controllers here)."""
    return [
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{SERVICE}-manual",
                "namespace": SYSTEM_NAMESPACE,
                "labels": {
                    "kubernetes.io/service-name": SERVICE,
                    "endpointslice.kubernetes.io/managed-by": "opkeeper-tests",
                },
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ADDRESS], "conditions": {"ready": True}}],
            "ports": [{"name": "https", "port": AGGREGATED_PORT, "protocol": "TCP"}],
        }
    ]


def _gateway_rbac() -> list[dict[str, Any]]:
    """What the gateway itself needs besides the aggregated API's registration: its
    resources, its key Secrets and id counter (the chart will ship its own)."""
    subject = {"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": SYSTEM_NAMESPACE}
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "opkeeper-gateway-test"},
            "rules": [
                {
                    "apiGroups": ["opkeeper.dev"],
                    "resources": ["operations", "scheduledtasks"],
                    "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"],
                },
                {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "create"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "opkeeper-gateway-test"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "opkeeper-gateway-test",
            },
            "subjects": [subject],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "opkeeper-gateway-test", "namespace": SYSTEM_NAMESPACE},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["secrets", "configmaps"],
                    "verbs": ["get", "list", "watch", "create", "patch", "update"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "opkeeper-gateway-test", "namespace": SYSTEM_NAMESPACE},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "opkeeper-gateway-test",
            },
            "subjects": [subject],
        },
    ]


def _service_account_kubeconfig(env: Environment) -> pathlib.Path:
    """A kubeconfig for the gateway's ServiceAccount (a TokenRequest token), so the
    registration's RBAC is what the gateway really runs with."""
    token = env.kubectl(
        "create", "token", SERVICE_ACCOUNT, "-n", SYSTEM_NAMESPACE, "--duration=2h", check=True
    ).stdout.strip()
    ca = base64.b64encode((env.pki / "ca.crt").read_bytes()).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "local",
                "cluster": {"server": env.cluster.server, "certificate-authority-data": ca},
            }
        ],
        "users": [{"name": "gateway", "user": {"token": token}}],
        "contexts": [{"name": "gateway", "context": {"cluster": "local", "user": "gateway"}}],
        "current-context": "gateway",
    }
    path = env.workdir / "gateway.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path
