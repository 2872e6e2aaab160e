"""Id allocation against the real API server: concurrent writers, restarts."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from opkeeper import ids, kube


async def _draw(
    *, kubeconfig: str, namespace: str, allocators: int, each: int, block_size: int
) -> list[list[int]]:
    async with kube.Client(kube.Credentials.from_kubeconfig(kubeconfig)) as client:
        pool = [
            ids.IdAllocator(client, namespace=namespace, block_size=block_size)
            for _ in range(allocators)
        ]

        async def draw(allocator: ids.IdAllocator) -> list[int]:
            return [await allocator.allocate() for _ in range(each)]

        return list(await asyncio.gather(*(draw(a) for a in pool)))


def test_concurrent_allocators_never_hand_out_an_id_twice(cluster: Any, namespace: str) -> None:
    # Small blocks force many conflicting counter writes among 8 writers.
    drawn = asyncio.run(
        _draw(
            kubeconfig=cluster.kubeconfig, namespace=namespace, allocators=8, each=60, block_size=7
        )
    )
    flat = [i for batch in drawn for i in batch]
    assert len(flat) == len(set(flat)) == 480
    for batch in drawn:
        assert batch == sorted(batch), "monotonic within an allocator"


def test_no_id_is_reused_after_a_restart(cluster: Any, namespace: str) -> None:
    first = asyncio.run(
        _draw(
            kubeconfig=cluster.kubeconfig, namespace=namespace, allocators=2, each=3, block_size=100
        )
    )
    # New allocators (a restarted process) skip the unused rest of the old blocks.
    second = asyncio.run(
        _draw(
            kubeconfig=cluster.kubeconfig, namespace=namespace, allocators=2, each=3, block_size=100
        )
    )
    assert min(i for b in second for i in b) > max(i for b in first for i in b)


def test_counter_is_created_with_its_namespace(cluster: Any, namespace: str) -> None:
    system = f"{namespace}-sys"
    [[value]] = asyncio.run(
        _draw(kubeconfig=cluster.kubeconfig, namespace=system, allocators=1, each=1, block_size=10)
    )
    assert value == 1
    out = cluster.kubectl(
        "get", "configmap", ids.CONFIGMAP, "-n", system, "-o", "jsonpath={.data.next}"
    )
    assert out.stdout == "11"


def test_block_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="block_size"):
        ids.IdAllocator(None, block_size=0)  # type: ignore[arg-type]
