"""Session fixtures: one real control plane for the whole run, a fresh namespace per test.

The control plane is a real etcd + kube-apiserver on 127.0.0.1 (see
:mod:`opkeeper.localcluster`), started once per pytest session with the CRDs
installed. Set ``OPKEEPER_TEST_KUBECONFIG`` to run the suite against another
cluster instead (for example a kind cluster); plain ``KUBECONFIG`` is
deliberately not used, so a developer's production context is never touched
by accident.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import uuid
from collections.abc import Iterator

import kubernetes
import pytest
import yaml

from opkeeper import localcluster, localpostgres


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cluster:
    """The cluster under test, as tests and subprocesses see it."""

    kubeconfig: str
    """Path of a kubeconfig with admin rights."""
    server: str
    """The API server URL."""

    @property
    def env(self) -> dict[str, str]:
        """Environment for subprocesses (kubectl, the controller, the gateway)."""
        return {**os.environ, "KUBECONFIG": self.kubeconfig}

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the real kubectl against the cluster; output is text."""
        return subprocess.run(
            [localcluster.kubectl_path(), *args],
            env=self.env,
            check=check,
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )


def _server_of(kubeconfig: str) -> str:
    config = yaml.safe_load(pathlib.Path(kubeconfig).read_text())
    context = next(c for c in config["contexts"] if c["name"] == config["current-context"])
    cluster = next(c for c in config["clusters"] if c["name"] == context["context"]["cluster"])
    server: str = cluster["cluster"]["server"]
    return server


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    external = os.environ.get("OPKEEPER_TEST_KUBECONFIG")
    if external:
        localcluster.install_crds(kubeconfig=external)
        yield Cluster(kubeconfig=external, server=_server_of(external))
        return
    with localcluster.started(tmp_path_factory.mktemp("controlplane")) as local:
        yield Cluster(kubeconfig=str(local.kubeconfig), server=local.server)


@pytest.fixture(scope="session")
def api(cluster: Cluster) -> Iterator[kubernetes.client.ApiClient]:
    """The official (sync) client, for assertions and for patching as a kubelet would."""
    client = kubernetes.config.new_client_from_config(config_file=cluster.kubeconfig)
    yield client
    client.close()


@pytest.fixture
def namespace(request: pytest.FixtureRequest, api: kubernetes.client.ApiClient) -> Iterator[str]:
    """A fresh namespace for one test (deleted afterwards; with no namespace controller
    running locally it stays Terminating, which is harmless in a throw-away cluster)."""
    stem = request.node.name.lower().replace("_", "-")
    stem = "".join(ch for ch in stem if ch.isalnum() or ch == "-")[:40].strip("-")
    name = f"{stem}-{uuid.uuid4().hex[:6]}"
    core = kubernetes.client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name, "labels": {"opkeeper.dev/test": "true"}}})
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="session")
def postgres() -> Iterator[localpostgres.Server]:
    """A real PostgreSQL server (Debian's package) on a Unix socket in a temp dir;
    fails (never skips) when it is not installed."""
    try:
        bin_dir = localpostgres.binaries()
    except localpostgres.Missing as exc:
        pytest.fail(str(exc), pytrace=False)
    with localpostgres.started(bin_dir=bin_dir) as server:
        yield server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the control plane, so `-m "not cluster"` runs the rest."""
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)
