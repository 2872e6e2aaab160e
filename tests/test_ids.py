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


# --- seals: a label id is believed only when opkeeper set it ---------------------------


def _object(stamp: ids.Stamp, *, namespace: str, name: str) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": namespace,
            "name": name,
            "labels": dict(stamp.labels),
            "annotations": dict(stamp.annotations),
        }
    }


async def _seal_round_trip(kubeconfig: str, system: str) -> None:
    async with kube.Client(kube.Credentials.from_kubeconfig(kubeconfig)) as client:
        allocator = ids.IdAllocator(client, namespace=system)
        # Two processes loading the key for the first time at once agree on one key.
        gateway, controller = (ids.IdSeal(client, namespace=system) for _ in range(2))
        stamps = await asyncio.gather(
            gateway.stamp(await allocator.allocate(), namespace="tenant-a", name="op-1"),
            controller.stamp(await allocator.allocate(), namespace="tenant-a", name="op-2"),
        )
        first = _object(stamps[0], namespace="tenant-a", name="op-1")
        assert await controller.trusted_id(first) == stamps[0].id
        assert await gateway.trusted_id(_object(stamps[1], namespace="tenant-a", name="op-2"))

        # A tenant's guesses: a bare label, a seal copied to another object or
        # namespace, a label changed under a valid seal.
        bare = {"metadata": {"namespace": "tenant-b", "name": "x", "labels": {ids.LABEL: "1"}}}
        assert await controller.trusted_id(bare) is None
        assert (
            await controller.trusted_id(_object(stamps[0], namespace="tenant-b", name="op-1"))
            is None
        )
        assert (
            await controller.trusted_id(_object(stamps[0], namespace="tenant-a", name="op-9"))
            is None
        )
        bumped = _object(stamps[0], namespace="tenant-a", name="op-1")
        bumped["metadata"]["labels"][ids.LABEL] = str(stamps[0].id + 1)
        assert await controller.trusted_id(bumped) is None
        assert await controller.trusted_id({"metadata": {"name": "y"}}) is None

        # The I/O-free check (the gateway's cache) knows nothing before the key is loaded.
        fresh = ids.IdSeal(client, namespace=system)
        assert fresh.verify(first) is None
        await fresh.load()
        assert fresh.verify(first) == stamps[0].id
        assert fresh.verify(bumped) is None


def test_seal_verifies_only_what_opkeeper_stamped(cluster: Any, namespace: str) -> None:
    asyncio.run(_seal_round_trip(cluster.kubeconfig, f"{namespace}-sys"))


async def _replaced_key(kubeconfig: str, system: str) -> None:
    async with kube.Client(kube.Credentials.from_kubeconfig(kubeconfig)) as client:
        allocator = ids.IdAllocator(client, namespace=system)
        old = ids.IdSeal(client, namespace=system, reload_interval=0)
        await old.stamp(await allocator.allocate(), namespace="t", name="before")
        await client.delete(kube.SECRETS, namespace=system, name=ids.KEY_SECRET)
        # A process started after the Secret was deleted creates a new key ...
        new = ids.IdSeal(client, namespace=system)
        stamp = await new.stamp(await allocator.allocate(), namespace="t", name="after")
        # ... and one that still holds the old key reads the Secret again on a mismatch.
        assert await old.trusted_id(_object(stamp, namespace="t", name="after")) == stamp.id


def test_seal_key_is_read_again_after_it_was_replaced(cluster: Any, namespace: str) -> None:
    asyncio.run(_replaced_key(cluster.kubeconfig, f"{namespace}-sys"))
