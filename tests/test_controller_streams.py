"""The controller's own watch streams (opkeeper.controller.streams), without a cluster.

Which namespaces a stream covers must match kopf's ``--namespace`` rules,
and a relist must report what vanished while the watch was down, or a
reconciler would keep (and act on) objects that no longer exist.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from opkeeper import errors, kube
from opkeeper.controller import streams


def test_namespace_scopes() -> None:
    plain = streams.scopes(namespaces=("a", "b"), all_namespaces=False)
    assert [scope.namespace for scope in plain] == ["a", "b"]
    (patterned,) = streams.scopes(namespaces=("team-*", "!team-x"), all_namespaces=False)
    assert patterned.namespace is None
    assert patterned.matches("team-a")
    assert not patterned.matches("team-x")
    assert not patterned.matches("other")
    (everything,) = streams.scopes(namespaces=(), all_namespaces=True)
    assert everything.namespace is None
    assert everything.matches("anything")


def body(name: str, namespace: str = "a", rv: int = 1) -> kube.Body:
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{namespace}-{name}",
            "resourceVersion": str(rv),
        }
    }


class ScriptedClient:
    """Plays scripted stream() runs; a run ending in an error is a broken watch."""

    def __init__(self, runs: list[list[kube.WatchEvent | Exception]]) -> None:
        self._runs = runs
        self.done = asyncio.Event()

    async def stream(
        self, resource: kube.Resource, *, namespace: str | None = None
    ) -> AsyncIterator[kube.WatchEvent]:
        if not self._runs:
            self.done.set()
            await asyncio.Event().wait()  # watch forever
        for item in self._runs.pop(0):
            if isinstance(item, Exception):
                raise item
            yield item


def test_a_relist_reports_what_vanished_and_filters_namespaces() -> None:
    seen: list[tuple[str | None, str]] = []

    def observer(*, event_type: str | None, body: kube.Body) -> None:
        seen.append((event_type, body["metadata"]["name"]))

    client = ScriptedClient(
        [
            [
                kube.WatchEvent(type="SYNC", objects=[body("x"), body("y"), body("z", "b")]),
                kube.WatchEvent(type="ADDED", object=body("w")),
                kube.WatchEvent(type="ADDED", object=body("v", "b")),
                kube.WatchEvent(type="MODIFIED", object=body("x", rv=2)),
                errors.Forbidden("RBAC not there yet"),
            ],
            [kube.WatchEvent(type="SYNC", objects=[body("x", rv=2), body("u")])],
        ]
    )
    scope = streams.Scope(namespace=None, matches=lambda namespace: namespace == "a")

    async def main() -> None:
        task = asyncio.create_task(
            streams.follow(
                client,  # type: ignore[arg-type]
                kube.OPERATIONS,
                scope=scope,
                observers=[observer, observer],
                retry_seconds=0,
            )
        )
        await asyncio.wait_for(client.done.wait(), 5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    expected: list[Any] = [
        (None, "x"),
        (None, "y"),
        ("ADDED", "w"),
        ("MODIFIED", "x"),
        # The relist after the broken watch: y and w are gone; x and u are listed.
        ("DELETED", "y"),
        ("DELETED", "w"),
        (None, "x"),
        (None, "u"),
    ]
    assert seen == [event for event in expected for _ in range(2)]
