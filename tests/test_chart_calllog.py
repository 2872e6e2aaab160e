"""The chart's PostgreSQL call log values, rendered with the real helm (no cluster):
the DSN comes from a Secret into the environment, never into values or arguments."""

from __future__ import annotations

from typing import Any

import yaml

from tests.test_chart import CHART, helm


def _gateway(*sets: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The gateway Deployment and every rendered object, with ``--set`` values."""
    args = ["template", "x", str(CHART)]
    for each in sets:
        args += ["--set", each]
    objects = [o for o in yaml.safe_load_all(helm(*args)) if o]
    [deployment] = [
        o
        for o in objects
        if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-gateway")
    ]
    return deployment, objects


def test_postgresql_takes_the_dsn_from_the_secret_into_the_environment() -> None:
    deployment, objects = _gateway(
        "gateway.callLog.store=postgresql",
        "gateway.callLog.postgresql.dsnSecret=calllog-db",
        "gateway.replicas=2",
    )
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert not any(a.startswith("--call-log") for a in container["args"])
    assert {
        "name": "OPKEEPER_CALL_LOG",
        "valueFrom": {"secretKeyRef": {"name": "calllog-db", "key": "dsn"}},
    } in container["env"]
    assert deployment["spec"]["replicas"] == 2
    assert "strategy" not in deployment["spec"]  # no volume to hand over: rolling updates
    assert not any(o["kind"] == "PersistentVolumeClaim" for o in objects)


def test_sqlite_stays_the_default_on_its_volume() -> None:
    deployment, objects = _gateway()
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert "--call-log=/var/lib/opkeeper/calllog.sqlite3" in container["args"]
    assert "env" not in container
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert any(o["kind"] == "PersistentVolumeClaim" for o in objects)


def test_postgresql_without_a_secret_is_refused() -> None:
    out = helm(
        "template", "x", str(CHART), "--set", "gateway.callLog.store=postgresql", check=False
    )
    assert "dsnSecret" in out
