"""Copy on read (``IONode.prefetch``, NBD_CMD_CACHE): what it copies, and that it serialises."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from blockgraph.errors import IOFailure
from blockgraph.graph.create import create_image
from blockgraph.graph.layer import BlockLayer
from blockgraph.graph.node import Node

MiB = 1 << 20
CLUSTER = 65536


def _overlay(tmp_path: Path, layer: BlockLayer, read_only: bool = False) -> Node:
    base = tmp_path / "base.raw"
    base.write_bytes(b"A" * MiB)
    top = tmp_path / "top.qcow2"
    layer.run(create_image(layer, str(top), "qcow2", 2 * MiB,
                           {"backing_file": str(base), "backing_fmt": "raw"}))
    return layer.run(layer.open_node(str(top), {"driver": "qcow2", "read-only": read_only}))


def test_prefetch_copies_whole_clusters_and_zeroes(tmp_path: Path) -> None:
    layer = BlockLayer()
    node = _overlay(tmp_path, layer)

    async def scenario() -> list[tuple[int, int, bool]]:
        await node.prefetch(CLUSTER + 100, 10)  # one byte range inside the second cluster
        await node.prefetch(MiB + 5, 1)  # past the backing file's data: zeroes
        out = []
        for offset in (0, CLUSTER, 2 * CLUSTER, MiB):
            status = await node.block_status(offset, CLUSTER)
            out.append((offset, status.length, bool(status.flags & status.flags.ALLOCATED)))
        return out

    assert layer.run(scenario()) == [(0, CLUSTER, False), (CLUSTER, CLUSTER, True),
                                     (2 * CLUSTER, CLUSTER, False), (MiB, CLUSTER, True)]
    buf = bytearray(CLUSTER)
    layer.run(node.preadv(CLUSTER, memoryview(buf)))
    assert bytes(buf) == b"A" * CLUSTER
    layer.run(node.preadv(MiB, memoryview(buf)))
    assert bytes(buf) == bytes(CLUSTER)
    layer.close()


def test_prefetch_on_read_only_node_fails_only_when_a_copy_is_needed(tmp_path: Path) -> None:
    layer = BlockLayer()
    node = _overlay(tmp_path, layer)
    layer.run(node.prefetch(0, CLUSTER))
    layer.close()
    layer = BlockLayer()
    node = layer.run(layer.open_node(str(tmp_path / "top.qcow2"),
                                     {"driver": "qcow2", "read-only": True}))
    layer.run(node.prefetch(0, CLUSTER))  # already held: nothing to copy
    with pytest.raises(IOFailure) as info:
        layer.run(node.prefetch(CLUSTER, CLUSTER))
    assert info.value.errno == 1  # EPERM
    layer.close()


def test_write_during_prefetch_is_not_overwritten(tmp_path: Path) -> None:
    """A guest write to a cluster being copied waits for the copy, then wins."""
    layer = BlockLayer()
    node = _overlay(tmp_path, layer)
    backing = node.backing
    assert backing is not None
    entered = asyncio.Event()
    release = asyncio.Event()
    real_preadv = backing.preadv

    async def gated_preadv(*args: Any, **kwargs: Any) -> None:
        # The copy's read through the chain stops here until the test lets it go on.
        entered.set()
        await release.wait()
        await real_preadv(*args, **kwargs)

    backing.preadv = gated_preadv  # type: ignore[method-assign]

    async def scenario() -> bytes:
        copy = asyncio.ensure_future(node.prefetch(0, CLUSTER))
        await entered.wait()
        write = asyncio.ensure_future(node.pwritev(0, memoryview(b"B" * 4096)))
        for _ in range(20):
            await asyncio.sleep(0)  # let the write go as far as it can
        assert not write.done()  # it waits for the copy of its cluster
        release.set()
        await asyncio.gather(copy, write)
        buf = bytearray(8192)
        await node.preadv(0, memoryview(buf))
        return bytes(buf)

    assert layer.run(scenario()) == b"B" * 4096 + b"A" * 4096
    layer.close()
