"""The Helm chart with a real helm and a real kube-apiserver.

No kubelet runs locally, so no Pod of the chart starts. The chart's RBAC is proven
instead by running the controller and the gateway as local processes with tokens of
the chart's own ServiceAccounts and driving a whole scenario through them: a permission
the chart forgot fails that test.
"""

from __future__ import annotations

import base64
import contextlib
import json
import pathlib
import re
import socket
import subprocess
import sys
import uuid
import xmlrpc.client
from collections.abc import Iterator, Sequence
from typing import Any

import cs
import kubernetes
import prometheus_client.parser
import pytest
import XenAPI
import yaml

from opkeeper import localcluster
from opkeeper.gateway import server
from tests import bdom_support
from tests.gateway_support import gateway_in_thread
from tests.helpers import Ops, complete_job, controller_in_thread, wait_for

REPO = pathlib.Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "opkeeper"
HERE = pathlib.Path(__file__).parent / "chart"
ALL_ON = HERE / "all-on.yaml"
EXPECTED_PERMISSIONS = HERE / "permissions.txt"
TIMEOUT = 120


INSTALL = ("--force-conflicts",)
"""The suite applied the CRDs already (server-side, as field manager opkeeper); helm 4
applies them server-side too, and takes them over instead of stopping on a conflict."""


def helm(*args: str, kubeconfig: str | None = None, check: bool = True) -> str:
    command = [str(localcluster.find_helm()), *args]
    if kubeconfig:
        command += ["--kubeconfig", kubeconfig]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)
    if check:
        assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout if done.returncode == 0 else done.stderr


def kubectl(kubeconfig: str, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [localcluster.kubectl_path(), "--kubeconfig", kubeconfig, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, f"kubectl {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def rendered(*extra: str, namespace: str = "opkeeper-system") -> list[dict[str, Any]]:
    text = helm("template", "opk", str(CHART), "--namespace", namespace, *extra)
    return [doc for doc in yaml.safe_load_all(text) if doc]


# --- without a cluster --------------------------------------------------------------------


@pytest.mark.parametrize("values", [[], ["-f", str(ALL_ON)]], ids=["defaults", "all-on"])
def test_lint_is_clean_in_strict_mode(values: list[str]) -> None:
    helm("lint", "--strict", str(CHART), *values)


def test_a_typo_in_the_values_fails_at_install_time() -> None:
    said = helm("template", "opk", str(CHART), "--set", "controller.replica=2", check=False)
    assert "additional properties 'replica' not allowed" in said.lower(), said


def test_the_default_release_is_least_privilege_and_hardened() -> None:
    objects = rendered()
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
    ]
    for role in (o for o in objects if o["kind"] in ("Role", "ClusterRole")):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], role["metadata"]["name"]
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        (container,) = pod["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert "--log-format=json" in container["args"]
        assert container["livenessProbe"]
        assert container["readinessProbe"]


def test_the_dockerfile_copies_only_what_exists_and_runs_as_non_root() -> None:
    """No image can be built here (no registry reachable for a base image): the
    Dockerfile is kept honest instead."""
    text = (REPO / "Dockerfile").read_text()
    copies = re.findall(r"^COPY (?!--from)(.+)$", text, flags=re.MULTILINE)
    assert copies
    for line in copies:
        *sources, _target = line.split()
        for source in sources:
            assert (REPO / source).exists(), source
    assert re.search(r"^USER 10001:10001$", text, flags=re.MULTILINE)
    assert 'ENTRYPOINT ["opkeeper"]' in text


def test_the_values_reference_in_the_docs_is_the_schema() -> None:
    """docs/install.md's table is generated from values.schema.json: regenerate it with
    ``python -m tests.test_chart`` when this fails."""
    docs = (REPO / "docs" / "install.md").read_text()
    start, end = "<!-- values:begin -->\n", "<!-- values:end -->"
    assert start in docs
    assert end in docs
    current = docs[docs.index(start) + len(start) : docs.index(end)]
    assert current == values_table()


def values_table() -> str:
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    rows = ["| key | type | default | what it is |", "|---|---|---|---|"]

    def walk(props: dict[str, Any], values: dict[str, Any], prefix: str) -> None:
        for key, spec in props.items():
            path, value = f"{prefix}{key}", values.get(key)
            if spec.get("type") == "object" and "properties" in spec:
                walk(spec["properties"], value or {}, f"{path}.")
                continue
            kind = spec.get("type", "object")
            shown = json.dumps(value) if value not in (None, "") else '`""`'
            if value not in (None, ""):
                shown = f"`{shown}`"
            what = spec.get("description", "").replace("|", "\\|")
            rows.append(f"| `{path}` | {kind} | {shown} | {what} |")

    walk(schema["properties"], defaults, "")
    return "\n".join(rows) + "\n"


# --- with the API server ------------------------------------------------------------------


def test_every_rendered_object_passes_the_api_servers_dry_run(
    cluster: Any, api: kubernetes.client.ApiClient
) -> None:
    core = kubernetes.client.CoreV1Api(api)
    release_ns = f"chart-dry-{uuid.uuid4().hex[:6]}"
    for name in (release_ns, "tenant-a", "tenant-b"):
        with contextlib.suppress(kubernetes.client.ApiException):
            core.create_namespace({"metadata": {"name": name}})
    kubectl(cluster.kubeconfig, "apply", "--server-side", "-f", str(HERE / "monitoring-crds.yaml"))
    kubectl(
        cluster.kubeconfig,
        "wait",
        "--for=condition=Established",
        "crd/servicemonitors.monitoring.coreos.com",
        "crd/prometheusrules.monitoring.coreos.com",
    )
    for values in ([], ["-f", str(ALL_ON)]):
        manifest = yaml.safe_dump_all(rendered(*values, namespace=release_ns))
        out = kubectl(
            cluster.kubeconfig,
            "apply",
            "--dry-run=server",
            "--server-side",
            "-f",
            "-",
            stdin=manifest,
        )
        assert "serverside-applied (server dry run)" in out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_every_metric_the_dashboard_and_alerts_use_is_exported(
    cluster: Any, api: kubernetes.client.ApiClient, namespace: str, tmp_path: pathlib.Path
) -> None:
    objects = rendered("-f", str(ALL_ON))
    text = json.dumps([o for o in objects if o["kind"] in ("PrometheusRule", "ConfigMap")])
    used = set(re.findall(r"\bopkeeper_[a-z_]+", text))
    assert len(used) >= 8, used
    port = free_port()
    exported: set[str] = set()
    with controller_in_thread(
        kubeconfig=cluster.kubeconfig, namespace=namespace, metrics_port=port
    ):
        exported |= scrape(f"http://127.0.0.1:{port}/metrics")
    settings = server.Settings(call_log_path=str(tmp_path / "log.sqlite3"), port=0)
    with gateway_in_thread(kubeconfig=cluster.kubeconfig, settings=settings) as gateway:
        exported |= scrape(f"{gateway.base}/metrics")
    assert used <= exported, sorted(used - exported)


def scrape(url: str) -> set[str]:
    """The sample names a Prometheus scrape of ``url`` can yield."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    names: set[str] = set()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    for family in prometheus_client.parser.text_string_to_metric_families(text):
        names |= {family.name + s for s in suffixes.get(family.type, [""])}
    return names


RELEASE = "opk"
FULLNAME = "opk-opkeeper"


@pytest.fixture(scope="module")
def release(cluster: Any, api: kubernetes.client.ApiClient) -> Iterator[str]:
    """The chart installed with its defaults into a namespace of its own; its name."""
    name = f"chart-{uuid.uuid4().hex[:6]}"
    kubernetes.client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})
    helm(
        "install", RELEASE, str(CHART), "--namespace", name, *INSTALL, kubeconfig=cluster.kubeconfig
    )
    yield name
    helm("uninstall", RELEASE, "--namespace", name, kubeconfig=cluster.kubeconfig, check=False)


def test_install_creates_every_object_and_the_crds_are_established(
    cluster: Any, release: str
) -> None:
    manifest = helm(
        "get", "manifest", RELEASE, "--namespace", release, kubeconfig=cluster.kubeconfig
    )
    objects = [o for o in yaml.safe_load_all(manifest) if o]
    assert len(objects) >= 15
    found = kubectl(cluster.kubeconfig, "get", "-f", "-", "-o", "name", stdin=manifest).split()
    assert len(found) == len(objects)
    for crd in ("operations.opkeeper.dev", "scheduledtasks.opkeeper.dev"):
        kubectl(cluster.kubeconfig, "wait", "--for=condition=Established", f"crd/{crd}")


def token_kubeconfig(cluster: Any, *, release: str, account: str, path: pathlib.Path) -> str:
    """A kubeconfig that authenticates as the chart's ServiceAccount ``account``."""
    token = kubectl(
        cluster.kubeconfig, "create", "token", account, "--namespace", release, "--duration=1h"
    ).strip()
    admin = yaml.safe_load(pathlib.Path(cluster.kubeconfig).read_text())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [
            {"name": account, "context": {"cluster": admin["clusters"][0]["name"], "user": account}}
        ],
        "current-context": account,
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return str(path)


@contextlib.contextmanager
def process(command: Sequence[str], *, log: pathlib.Path, env: dict[str, str]) -> Iterator[None]:
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_the_charts_service_accounts_can_run_a_whole_scenario(
    cluster: Any,
    api: kubernetes.client.ApiClient,
    release: str,
    namespace: str,
    tmp_path: pathlib.Path,
) -> None:
    import os

    controller = token_kubeconfig(
        cluster, release=release, account=f"{FULLNAME}-controller", path=tmp_path / "controller"
    )
    gateway = token_kubeconfig(
        cluster, release=release, account=f"{FULLNAME}-gateway", path=tmp_path / "gateway"
    )
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    try:
        _scenario(cluster, api, release, namespace, tmp_path, controller, gateway, env)
    except AssertionError as exc:
        logs = "\n".join(
            f"--- {name}\n{(tmp_path / name).read_text(errors='replace')[-3000:]}"
            for name in ("controller.log", "gateway.log")
        )
        raise AssertionError(f"{exc}\n{logs}") from None
    for log in ("controller.log", "gateway.log"):
        text = (tmp_path / log).read_text()
        assert "forbidden" not in text.lower(), text[-4000:]


def _scenario(
    cluster: Any,
    api: kubernetes.client.ApiClient,
    release: str,
    namespace: str,
    tmp_path: pathlib.Path,
    controller: str,
    gateway: str,
    env: dict[str, str],
) -> None:
    import urllib.request

    port = free_port()
    cli = [sys.executable, "-m", "opkeeper.cli"]
    with (
        process(
            [
                *cli,
                "controller",
                "--kubeconfig",
                controller,
                "--all-namespaces",
                # Leader election as the chart runs it: the chart's Lease permissions.
                "--lease-name",
                f"{FULLNAME}-controller",
                "--lease-namespace",
                release,
                "--system-namespace",
                release,
                "--log-format",
                "json",
            ],
            log=tmp_path / "controller.log",
            env=env,
        ),
        process(
            [
                *cli,
                "gateway",
                "--kubeconfig",
                gateway,
                "--port",
                str(port),
                "--key-namespace",
                release,
                "--system-namespace",
                release,
                "--call-log",
                str(tmp_path / "calllog.sqlite3"),
                "--log-format",
                "json",
                "--executor",
                'domain_check={"builtin": {"action": "noop"}}',
            ],
            log=tmp_path / "gateway.log",
            env=env,
        ),
    ):

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
                    return r.status == 200
            except OSError:
                return False

        try:
            wait_for(ready, timeout=60, what="the gateway, as its ServiceAccount, to be ready")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\n{(tmp_path / 'gateway.log').read_text()[-4000:]}"
            ) from None
        ops = Ops(api, namespace)
        # The controller: a builtin operation, a Job, a ScheduledTask that fires.
        ops.create("noop", {"type": "t", "executor": {"builtin": {"action": "noop"}}})
        ops.wait_state("noop", "Succeeded")
        job = {
            "type": "t",
            "executor": {
                "job": {
                    "template": {
                        "spec": {
                            "template": {
                                "spec": {
                                    "restartPolicy": "Never",
                                    "containers": [
                                        {"name": "work", "image": "busybox", "command": ["true"]}
                                    ],
                                }
                            }
                        }
                    }
                }
            },
        }
        ops.create("job", job)
        wait_for(lambda: ops.batch.list_namespaced_job(namespace).items, what="the Job")
        complete_job(ops, ops.batch.list_namespaced_job(namespace).items[0].metadata.name)
        ops.wait_state("job", "Succeeded")
        kubernetes.client.CustomObjectsApi(api).create_namespaced_custom_object(
            "opkeeper.dev",
            "v1alpha1",
            namespace,
            "scheduledtasks",
            {
                "apiVersion": "opkeeper.dev/v1alpha1",
                "kind": "ScheduledTask",
                "metadata": {"name": "soon"},
                "spec": {
                    "execAt": _in_seconds(2),
                    "template": {
                        "spec": {"type": "t", "executor": {"builtin": {"action": "noop"}}}
                    },
                },
            },
        )
        wait_for(
            lambda: any(
                (o.get("status") or {}).get("state") == "Succeeded"
                for o in ops.custom.list_namespaced_custom_object(
                    "opkeeper.dev", "v1alpha1", namespace, "operations"
                )["items"]
                if o["metadata"]["name"].startswith("soon-")
            ),
            what="the ScheduledTask's run to succeed",
        )
        # The gateway: a key minted by an administrator, then Gandi and gocept calls.
        minted = json.loads(
            subprocess.run(
                [
                    *cli,
                    "apikey",
                    "create",
                    "--kubeconfig",
                    cluster.kubeconfig,
                    "--key-namespace",
                    release,
                    "--system-namespace",
                    release,
                    "-n",
                    namespace,
                    "--user",
                    "demo",
                    "-o",
                    "json",
                ],
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
                check=True,
                env=env,
            ).stdout
        )
        gandi = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{port}/xmlrpc")
        session = wait_for(
            lambda: _login(gandi, minted["userId"], minted["apiKey"]), what="the key to work"
        )
        opid = gandi.operation_create(session, "domain_transfer", {"domain": "example.com"})
        wait_for(
            lambda: gandi.operation_details(session, opid)["state"] == "WAIT",
            what="the transfer to wait on the registry",
        )
        assert opid in gandi.operation_list(session, {"state": "WAIT"})
        assert gandi.operation_cancel(session, opid) is True
        assert gandi.operation_details(session, opid)["state"] == "CANCEL"
        done = gandi.operation_create(session, "domain_check", {})
        wait_for(lambda: gandi.operation_details(session, done)["state"] == "DONE", what="noop")
        gocept = xmlrpc.client.ServerProxy(
            f"http://demo:{minted['apiKey']}@127.0.0.1:{port}/xmlrpc"
        )
        applied = gocept.apply([{"__type__": "operation", "name": "via-gocept", "type": "t"}])
        assert applied[0]["name"] == "via-gocept"
        assert any(e["method"] == "apply" for e in gocept.log(0))
        # BDOM schedules (a ScheduledTask with a sealed id), XenAPI logs out (a shared
        # revocation), CloudStack signs with a key derived from the shared master key.
        tomorrow = _in_seconds(86400)[:10]
        created = urllib.request.urlopen(
            urllib.request.Request(
                f"http://127.0.0.1:{port}/bdom/task/create/-/-/-/-/demo/",
                data=bdom_support.create_body(
                    opcode="delete", name="x.example", exec_date=tomorrow
                ),
                headers={
                    "Authorization": "Basic "
                    + base64.b64encode(f"demo:{minted['apiKey']}".encode()).decode(),
                    "Content-Type": "application/xml",
                },
            ),
            timeout=30,
        )
        assert created.status == 200
        xen = XenAPI.Session(f"http://127.0.0.1:{port}/xenapi")
        xen.xenapi.login_with_password("demo", minted["apiKey"], "2.21", "chart-test")
        assert len(xen.xenapi.task.get_all()) >= 4
        xen.xenapi.session.logout()  # the revocation ConfigMap in the key namespace
        stack = cs.CloudStack(
            endpoint=f"http://127.0.0.1:{port}/client/api",
            key=minted["cloudstack"]["apiKey"],
            secret=minted["cloudstack"]["secretKey"],
        )
        assert "asyncjobs" in stack.listAsyncJobs() or stack.listAsyncJobs() == {}


def _login(proxy: xmlrpc.client.ServerProxy, user: str, key: str) -> str | None:
    try:
        session: str = proxy.login(user, key)
    except xmlrpc.client.Fault:
        return None
    return session


def _in_seconds(seconds: int) -> str:
    import datetime

    moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def permissions(cluster: Any, *, release: str, tenant: str) -> str:
    """``kubectl auth can-i --list`` of each ServiceAccount, in the release's namespace
    and in a tenant's, with those names replaced (so the text is the same every run)."""
    out = []
    for account in ("controller", "gateway"):
        subject = f"system:serviceaccount:{release}:{FULLNAME}-{account}"
        for where, label in ((release, "RELEASE"), (tenant, "TENANT")):
            listed = kubectl(
                cluster.kubeconfig, "auth", "can-i", "--list", "--as", subject, "-n", where
            )
            header, *rows = listed.replace(release, "RELEASE").splitlines()
            # Whitespace-normalised and sorted: kubectl's column widths and row order
            # are not the point.
            lines = sorted({_sorted_verbs(" ".join(row.split())) for row in rows if row.strip()})
            out.append("\n".join([f"## {account} in {label}", " ".join(header.split()), *lines]))
    return "\n\n".join(out) + "\n"


def _sorted_verbs(row: str) -> str:
    """The verbs of a row in one order: kubectl merges rules in no fixed order."""
    return re.sub(r"\[([^\]]*)\]$", lambda m: f"[{' '.join(sorted(m[1].split()))}]", row)


def test_the_permissions_are_the_committed_list(cluster: Any, release: str, namespace: str) -> None:
    """A change in what the chart grants is a visible diff of tests/chart/permissions.txt
    (write it anew with OPKEEPER_UPDATE_PERMISSIONS=1)."""
    import os

    listed = permissions(cluster, release=release, tenant=namespace)
    if os.environ.get("OPKEEPER_UPDATE_PERMISSIONS"):
        EXPECTED_PERMISSIONS.write_text(listed)
    assert listed == EXPECTED_PERMISSIONS.read_text()


def test_upgrade_keeps_the_call_log_and_the_certificate_and_uninstall_leaves_only_the_crds(
    cluster: Any, api: kubernetes.client.ApiClient
) -> None:
    name = f"chart-up-{uuid.uuid4().hex[:6]}"
    core = kubernetes.client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name}})
    # A release name of its own: the module's release holds the cluster-wide names.
    release = "opk2"
    claim = f"{release}-opkeeper-gateway-calllog"
    # The aggregated API on: its generated serving certificate must survive the upgrade
    # (the APIService stays unavailable here, no gateway Pod runs; uninstall removes it).
    aggregated = ("--set", "aggregatedApi.enabled=true")
    helm(
        "install",
        release,
        str(CHART),
        "--namespace",
        name,
        *INSTALL,
        *aggregated,
        kubeconfig=cluster.kubeconfig,
    )
    before = core.read_namespaced_persistent_volume_claim(claim, name).metadata.uid
    (certificate,) = [
        s for s in core.list_namespaced_secret(name).items if s.type == "kubernetes.io/tls"
    ]
    helm(
        "upgrade",
        release,
        str(CHART),
        "--namespace",
        name,
        *aggregated,
        "--set",
        "logLevel=debug",
        kubeconfig=cluster.kubeconfig,
    )
    kept = core.read_namespaced_secret(certificate.metadata.name, name)
    assert kept.data == certificate.data
    service = kubernetes.client.ApiregistrationV1Api(api).read_api_service(
        "v1alpha1.rpc.opkeeper.dev"
    )
    assert service.spec.ca_bundle == certificate.data["ca.crt"]
    assert core.read_namespaced_persistent_volume_claim(claim, name).metadata.uid == before
    helm("uninstall", release, "--namespace", name, kubeconfig=cluster.kubeconfig)
    selector = f"app.kubernetes.io/instance={release}"
    kinds = "all,pvc,sa,role,rolebinding,pdb,configmap,secret"
    left = json.loads(
        kubectl(cluster.kubeconfig, "get", kinds, "-n", name, "-l", selector, "-o", "json")
    )["items"]
    left += json.loads(
        kubectl(
            cluster.kubeconfig,
            "get",
            "clusterrole,clusterrolebinding",
            "-l",
            selector,
            "-o",
            "json",
        )
    )["items"]
    # Deleted, but the claim's protection finalizer is removed by kube-controller-manager,
    # which does not run locally: being deleted is what uninstall can do.
    assert [
        f"{o['kind']}/{o['metadata']['name']}"
        for o in left
        if not o["metadata"].get("deletionTimestamp")
        or o["metadata"].get("finalizers") != ["kubernetes.io/pvc-protection"]
    ] == []
    with pytest.raises(kubernetes.client.ApiException) as gone:
        kubernetes.client.ApiregistrationV1Api(api).read_api_service("v1alpha1.rpc.opkeeper.dev")
    assert gone.value.status == 404
    kubectl(cluster.kubeconfig, "get", "crd", "operations.opkeeper.dev")


if __name__ == "__main__":
    # Regenerate docs/install.md's values table from the schema.
    docs = REPO / "docs" / "install.md"
    text = docs.read_text()
    start, end = "<!-- values:begin -->\n", "<!-- values:end -->"
    head, rest = text.split(start)
    _, tail = rest.split(end)
    docs.write_text(head + start + values_table() + end + tail)
