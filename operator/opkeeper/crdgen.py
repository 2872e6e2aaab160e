"""Generate the CRD manifests in ``crds/`` from :mod:`opkeeper.models`.

Kubernetes wants *structural* OpenAPI v3 schemas: every field typed, no
``$ref``/``anyOf`` for optional fields, free-form parts marked with
``x-kubernetes-preserve-unknown-fields``. Pydantic emits JSON Schema, so this
module translates one into the other; the models stay the only place where a
field, bound or enum is written down. ``tests/test_crdgen.py`` fails when the
committed files differ from what this module produces.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import pydantic
import yaml

from opkeeper import GROUP, VERSION, models

_KEEP = {
    "type",
    "format",
    "description",
    "enum",
    "properties",
    "required",
    "items",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "nullable",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Kind:
    """One custom resource kind and how kubectl shows it."""

    kind: str
    plural: str
    short_names: Sequence[str]
    spec: type[pydantic.BaseModel]
    status: type[pydantic.BaseModel]
    description: str
    columns: Sequence[Mapping[str, Any]]

    @property
    def name(self) -> str:
        return f"{self.plural}.{GROUP}"


def _column(name: str, type_: str, path: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": type_, "jsonPath": path, **extra}


KINDS: Sequence[Kind] = (
    Kind(
        kind="Operation",
        plural="operations",
        short_names=("op", "ops"),
        spec=models.OperationSpec,
        status=models.OperationStatus,
        description=models.Operation.__doc__ or "",
        columns=(
            _column("ID", "integer", ".status.id"),
            _column("Type", "string", ".spec.type"),
            _column("State", "string", ".status.state"),
            _column("Progress", "integer", ".status.progress"),
            _column("Age", "date", ".metadata.creationTimestamp"),
        ),
    ),
    Kind(
        kind="ScheduledTask",
        plural="scheduledtasks",
        short_names=("stask",),
        spec=models.ScheduledTaskSpec,
        status=models.ScheduledTaskStatus,
        description=models.ScheduledTask.__doc__ or "",
        columns=(
            _column("ID", "integer", ".status.id"),
            _column("ExecAt", "string", ".spec.execAt"),
            _column("Schedule", "string", ".spec.schedule"),
            _column("State", "string", ".status.state"),
            _column("Next Run", "string", ".status.nextRunAt"),
            _column("Last Operation", "string", ".status.lastOperation"),
        ),
    ),
)


def structural(model: type[pydantic.BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of ``model`` (as the API server wants it)."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    defs = schema.pop("$defs", {})
    return _convert(schema, defs)


def _convert(node: Mapping[str, Any], defs: Mapping[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _convert(merged, defs)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express a union as a structural schema: {node}")
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        return _convert({**options[0], **rest}, defs)

    out: dict[str, Any] = {}
    if "const" in node:
        out["enum"] = [node["const"]]
    for key, value in node.items():
        if key == "properties":
            out["properties"] = {k: _convert(v, defs) for k, v in value.items()}
        elif key == "items":
            out["items"] = _convert(value, defs)
        elif key == "additionalProperties" and isinstance(value, Mapping) and value:
            out["additionalProperties"] = _convert(value, defs)
        elif key in _KEEP or key.startswith("x-kubernetes-"):
            out[key] = value

    if out.get("x-kubernetes-preserve-unknown-fields"):
        # A free-form field keeps its type (if any) but no inner schema.
        out.pop("properties", None)
        out.pop("additionalProperties", None)
    elif "type" not in out and "enum" in out:
        out["type"] = "string"
    elif (
        node.get("type") == "object"
        and "properties" not in out
        and "additionalProperties" not in out
    ):
        if node.get("additionalProperties") is True:
            out["x-kubernetes-preserve-unknown-fields"] = True
        else:
            out["properties"] = {}
    if "type" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        raise ValueError(f"structural schemas need a type: {node}")
    return out


def crd(kind: Kind) -> dict[str, Any]:
    """The CustomResourceDefinition manifest of ``kind``."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": kind.name,
            "labels": {
                "app.kubernetes.io/name": "opkeeper",
                "app.kubernetes.io/part-of": "opkeeper",
            },
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.kind.lower(),
                "shortNames": list(kind.short_names),
                "categories": ["opkeeper"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [dict(c) for c in kind.columns],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": kind.description.strip(),
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": structural(kind.spec),
                                "status": structural(kind.status),
                            },
                        }
                    },
                }
            ],
        },
    }


HEADER = "# Generated by `make crds` from operator/opkeeper/models.py. Do not edit.\n"


def render(kind: Kind) -> str:
    return HEADER + yaml.safe_dump(crd(kind), sort_keys=False, width=100)


def filename(kind: Kind) -> str:
    return f"{kind.name}.yaml"


TARGETS = (pathlib.Path("crds"), pathlib.Path("charts/opkeeper/crds"))
"""Where the CRDs are written, relative to the repository root: the plain manifests
and the Helm chart's crds/ folder (Helm installs that folder before any template)."""


def write(root: pathlib.Path) -> list[pathlib.Path]:
    """Write every CRD into each of :data:`TARGETS` below ``root``; return the paths."""
    paths = []
    for target in TARGETS:
        directory = root / target
        directory.mkdir(parents=True, exist_ok=True)
        for kind in KINDS:
            path = directory / filename(kind)
            path.write_text(render(kind))
            paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m opkeeper.crdgen [ROOT]`: write the CRDs below ROOT (default: .)."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    for path in write(pathlib.Path(args[0] if args else ".")):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
