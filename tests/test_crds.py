"""The CRDs as the real API server sees them: accepted, validating, GitOps-friendly."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
import yaml

from opkeeper import crdgen
from tests.conftest import Cluster

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))


def test_committed_crds_are_generated_from_the_models() -> None:
    for target in crdgen.TARGETS:
        for kind in crdgen.KINDS:
            path = target / crdgen.filename(kind)
            assert (ROOT / path).read_text() == crdgen.render(kind), (
                f"{path} is stale: run `make crds`"
            )


def _walk(schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths of schema nodes that break the structural rules we rely on."""
    bad = []
    if "type" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        bad.append(path or "<root>")
    for key in ("anyOf", "oneOf", "allOf", "$ref", "default"):
        if key in schema:
            bad.append(f"{path}:{key}")
    for name, sub in schema.get("properties", {}).items():
        bad += _walk(sub, f"{path}.{name}")
    if "items" in schema:
        bad += _walk(schema["items"], f"{path}[]")
    return bad


@pytest.mark.parametrize("kind", crdgen.KINDS, ids=lambda k: k.kind)
def test_schemas_are_structural_and_default_free(kind: crdgen.Kind) -> None:
    schema = crdgen.crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _walk(schema) == []


def test_both_crds_are_established(cluster: Cluster) -> None:
    for kind in crdgen.KINDS:
        out = cluster.kubectl("get", "crd", kind.name, "-o", "json").stdout
        conditions = {c["type"]: c["status"] for c in json.loads(out)["status"]["conditions"]}
        assert conditions.get("Established") == "True"
        assert conditions.get("NamesAccepted") == "True"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT / "examples")))
def test_every_example_applies(cluster: Cluster, namespace: str, path: pathlib.Path) -> None:
    out = cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", str(path))
    assert "serverside-applied" in out.stdout


def _operation(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"type": "domain_create", "executor": {"builtin": {"action": "noop"}}}
    base.update(spec)
    return {
        "apiVersion": "opkeeper.dev/v1alpha1",
        "kind": "Operation",
        "metadata": {"name": "bad"},
        "spec": {k: v for k, v in base.items() if v is not None},
    }


def _task(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "template": {"spec": {"type": "domain_delete", "executor": {"external": {}}}}
    }
    base.update(spec)
    return {
        "apiVersion": "opkeeper.dev/v1alpha1",
        "kind": "ScheduledTask",
        "metadata": {"name": "bad"},
        "spec": base,
    }


INVALID_MANIFESTS = {
    "missing-type": (_operation(type=None), ["spec.type", "Required value"]),
    "empty-type": (_operation(type=""), ["spec.type"]),
    "two-executor-kinds": (
        _operation(executor={"builtin": {"action": "noop"}, "external": {}}),
        ["spec.executor", "exactly one executor kind"],
    ),
    "no-executor-kind": (_operation(executor={}), ["spec.executor", "exactly one executor kind"]),
    "unknown-builtin-action": (
        _operation(executor={"builtin": {"action": "explode"}}),
        ["spec.executor.builtin.action", "Unsupported value"],
    ),
    "negative-relaunch": (_operation(relaunch=-1), ["spec.relaunch"]),
    "both-execat-and-schedule": (
        _task(execAt="2030-01-01T00:00:00Z", schedule="0 3 * * *"),
        ["spec", "exactly one of execAt and schedule"],
    ),
    "neither-execat-nor-schedule": (_task(), ["spec", "exactly one of execAt and schedule"]),
    "bad-concurrency-policy": (
        _task(schedule="* * * * *", concurrencyPolicy="Sometimes"),
        ["spec.concurrencyPolicy", "Unsupported value"],
    ),
}


@pytest.mark.parametrize("case", INVALID_MANIFESTS)
def test_invalid_manifest_is_rejected_naming_the_field(
    cluster: Cluster, namespace: str, case: str
) -> None:
    manifest, expected = INVALID_MANIFESTS[case]
    result = cluster.kubectl(
        "apply",
        "--server-side",
        "-n",
        namespace,
        "-f",
        "-",
        input=yaml.safe_dump(manifest),
        check=False,
    )
    assert result.returncode != 0, result.stdout
    for fragment in expected:
        assert fragment in result.stderr


STATUS_PATCHES = {
    "progress-120": ({"progress": 120}, ["status.progress", "less than or equal to 100"]),
    "unknown-state": ({"state": "Exploded"}, ["status.state", "Unsupported value"]),
    "negative-id": ({"id": 0}, ["status.id"]),
}


@pytest.mark.parametrize("case", STATUS_PATCHES)
def test_invalid_status_is_rejected_naming_the_field(
    cluster: Cluster, namespace: str, case: str
) -> None:
    cluster.kubectl(
        "apply",
        "--server-side",
        "-n",
        namespace,
        "-f",
        str(ROOT / "examples/operation-external.yaml"),
    )
    patch, expected = STATUS_PATCHES[case]
    result = cluster.kubectl(
        "patch",
        "-n",
        namespace,
        "operation",
        "transfer-example-com",
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": patch}),
        check=False,
    )
    assert result.returncode != 0, result.stdout
    for fragment in expected:
        assert fragment in result.stderr


def test_printer_columns(cluster: Cluster, namespace: str) -> None:
    for name in ("operation-noop.yaml", "scheduledtask-delete.yaml"):
        cluster.kubectl(
            "apply", "--server-side", "-n", namespace, "-f", str(ROOT / "examples" / name)
        )
    ops = cluster.kubectl("get", "ops", "-n", namespace).stdout.splitlines()
    assert ops[0].split() == ["NAME", "ID", "TYPE", "STATE", "PROGRESS", "AGE"]
    assert ops[1].split()[0] == "register-example-org"
    assert "domain_create" in ops[1].split()
    tasks = cluster.kubectl("get", "stask", "-n", namespace).stdout.splitlines()
    assert tasks[0].split() == [
        "NAME",
        "ID",
        "EXECAT",
        "SCHEDULE",
        "STATE",
        "NEXT",
        "RUN",
        "LAST",
        "OPERATION",
    ]
    assert tasks[1].startswith("delete-old-example-de")
    everything = cluster.kubectl("get", "opkeeper", "-n", namespace, "-o", "name").stdout
    assert "operation.opkeeper.dev/register-example-org" in everything
    assert "scheduledtask.opkeeper.dev/delete-old-example-de" in everything


@pytest.mark.parametrize(
    "path",
    [p for p in EXAMPLES if "scheduledtask" in p.name or "operation-noop" in p.name],
    ids=lambda p: p.name,
)
def test_server_side_apply_twice_changes_nothing(
    cluster: Cluster, namespace: str, path: pathlib.Path
) -> None:
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", str(path))
    name = yaml.safe_load(path.read_text())["metadata"]["name"]
    kind = yaml.safe_load(path.read_text())["kind"].lower()
    first = json.loads(cluster.kubectl("get", "-n", namespace, kind, name, "-o", "json").stdout)
    again = cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", str(path))
    assert "serverside-applied" in again.stdout
    second = json.loads(cluster.kubectl("get", "-n", namespace, kind, name, "-o", "json").stdout)
    assert second["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    assert second["spec"] == yaml.safe_load(path.read_text())["spec"]
