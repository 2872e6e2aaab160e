"""The async client against the real API server: verbs, errors, preconditions, watch."""

from __future__ import annotations

import asyncio
import pathlib
from typing import Any

import pytest

from opkeeper import errors, kube, kuberetry

CM = kube.CONFIGMAPS


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def configmap(name: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}


def test_crud_and_error_mapping(cluster: Any, namespace: str) -> None:
    async def scenario() -> None:
        async with kube.Client(kube.Credentials.from_kubeconfig(cluster.kubeconfig)) as c:
            created = await c.create(CM, configmap("a", x="1"), namespace=namespace)
            with pytest.raises(kube.AlreadyExists):
                await c.create(CM, configmap("a"), namespace=namespace)
            got = await c.get(CM, namespace=namespace, name="a")
            assert got["data"] == {"x": "1"}
            patched = await c.patch(CM, namespace=namespace, name="a", body={"data": {"y": "2"}})
            assert patched["data"] == {"x": "1", "y": "2"}
            # A merge patch conditional on a stale resourceVersion is a Conflict.
            with pytest.raises(errors.Conflict):
                await c.patch(
                    CM,
                    namespace=namespace,
                    name="a",
                    body={
                        "metadata": {"resourceVersion": created["metadata"]["resourceVersion"]},
                        "data": {"z": "3"},
                    },
                )
            applied = await c.patch(
                CM,
                namespace=namespace,
                name="b",
                patch_type="apply",
                force=True,
                body=configmap("b", k="v"),
            )
            assert applied["data"] == {"k": "v"}
            json_patched = await c.patch(
                CM,
                namespace=namespace,
                name="b",
                patch_type="json",
                body=[{"op": "add", "path": "/data/j", "value": "1"}],
            )
            assert json_patched["data"]["j"] == "1"
            with pytest.raises(errors.InvalidArgument):
                await c.create(CM, configmap("Not_Valid"), namespace=namespace)
            listed = await c.list(CM, namespace=namespace, page_size=1)
            assert {"a", "b"} <= {i["metadata"]["name"] for i in listed.items}
            await c.delete(CM, namespace=namespace, name="a")
            with pytest.raises(errors.NotFound):
                await c.get(CM, namespace=namespace, name="a")
            with pytest.raises(errors.Conflict):
                await c.delete(CM, namespace=namespace, name="b", uid="not-its-uid")
            assert c.writes[("POST", "configmaps")] == 1
            assert c.writes[("DELETE", "configmaps")] == 1

    run(scenario())


def test_stream_lists_then_watches(cluster: Any, namespace: str) -> None:
    async def scenario() -> None:
        async with kube.Client(kube.Credentials.from_kubeconfig(cluster.kubeconfig)) as c:
            await c.create(CM, configmap("before"), namespace=namespace)
            stream = c.stream(CM, namespace=namespace)
            first = await anext(stream)
            assert first.type == "SYNC"
            assert first.objects is not None
            assert "before" in {o["metadata"]["name"] for o in first.objects}
            await c.create(CM, configmap("after"), namespace=namespace)
            await c.delete(CM, namespace=namespace, name="before")
            seen = []
            while len(seen) < 2:
                event = await asyncio.wait_for(anext(stream), 10)
                assert event.object is not None
                seen.append((event.type, event.object["metadata"]["name"]))
            assert seen == [("ADDED", "after"), ("DELETED", "before")]
            await stream.aclose()

    run(scenario())


def test_unreachable_server_is_unavailable() -> None:
    creds = kube.Credentials(server="http://127.0.0.1:9", ssl_context=False)

    async def scenario() -> None:
        # Refused connections are retried (the server did nothing); a small budget keeps
        # the test short.
        policy = kuberetry.Policy(budget=0.5)
        async with kube.Client(creds, timeout=2, retry=policy) as c:
            with pytest.raises(errors.Unavailable, match="temporarily unavailable"):
                await c.get(CM, namespace="x", name="y")

    run(scenario())


def test_paths() -> None:
    assert kube.OPERATIONS.path(namespace="n", name="o", subresource="status") == (
        "/apis/opkeeper.dev/v1alpha1/namespaces/n/operations/o/status"
    )
    assert kube.NAMESPACES.path(namespace="ignored", name="x") == "/api/v1/namespaces/x"
    assert kube.resource_version_of({"metadata": {"resourceVersion": "42"}}) == 42
    assert kube.resource_version_of({"metadata": {}}) == 0


def test_a_kubeconfig_token_is_sent_as_a_bearer_token(tmp_path: pathlib.Path) -> None:
    """As service-account tokens are (kubectl create token; the in-cluster loader keeps
    the token the same way): without it every call would be anonymous."""
    config = tmp_path / "kubeconfig"
    config.write_text(
        "apiVersion: v1\nkind: Config\n"
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:6443'}}]\n"
        "users: [{name: u, user: {token: abc.def}}]\n"
        "contexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n"
    )
    credentials = kube.Credentials.from_kubeconfig(str(config))
    assert credentials.headers == {"Authorization": "Bearer abc.def"}
