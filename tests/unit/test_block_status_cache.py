"""The block-status cache of file nodes (QEMU's since 7.0; ``IONode.block_status``).

A file node remembers the last data extent its driver reported and answers queries inside it
without asking the driver (two lseeks each). The answers must stay those the driver gives,
and anything that turns data into zeroes through the node must drop what it remembers.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if str(Path(__file__).resolve().parents[2]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.graphutil import make_raw  # noqa: E402

from blockgraph.drivers.base import BlockStatus, BlockStatusFlags, RequestFlags  # noqa: E402
from blockgraph.graph.layer import BlockLayer  # noqa: E402
from blockgraph.graph.node import BlockBackend, Node  # noqa: E402

MiB = 1 << 20
DATA = BlockStatusFlags.DATA | BlockStatusFlags.OFFSET_VALID
ZERO = BlockStatusFlags.ZERO | BlockStatusFlags.OFFSET_VALID


@pytest.fixture
def layer() -> Iterator[BlockLayer]:
    lay = BlockLayer()
    yield lay
    lay.close()


def _open(layer: BlockLayer, tmp_path: Path, **options: str) -> tuple[BlockBackend, Node, list[tuple[int, int]]]:
    """A raw image whose first 256 KiB are data and the rest a hole; the BlockBackend, the
    file node, and a log of the queries that reached the file driver."""
    image = make_raw(tmp_path / "img.raw", 4 * MiB)
    with open(image, "r+b") as f:
        f.write(b"\x5a" * (256 << 10))
    bb = layer.new_backend("drive0")
    root = layer.run(layer.open_node(image, {"driver": "raw", **options}, backend=bb))
    file_node = root.file
    assert file_node is not None
    asked: list[tuple[int, int]] = []
    driver = file_node.driver
    original = driver.block_status

    async def block_status(offset: int, length: int) -> BlockStatus:
        asked.append((offset, length))
        return await original(offset, length)

    driver.block_status = block_status  # type: ignore[method-assign]
    return bb, file_node, asked


def _status(layer: BlockLayer, node: Node, offset: int, length: int) -> tuple[Any, ...]:
    status = layer.run(node.block_status(offset, length))
    return int(status.flags), status.length, status.offset


def test_answers_inside_the_data_extent_without_the_driver(layer: BlockLayer, tmp_path: Path) -> None:
    bb, file_node, asked = _open(layer, tmp_path)
    assert _status(layer, file_node, 0, 4096) == (DATA, 4096, 0)
    assert len(asked) == 1
    assert _status(layer, file_node, 8192, 4096) == (DATA, 4096, 8192)
    assert _status(layer, file_node, 200 << 10, 1 * MiB) == (DATA, 56 << 10, 200 << 10)
    assert len(asked) == 1
    # Past the extent the driver answers again: a hole, clamped to what was asked.
    assert _status(layer, file_node, 256 << 10, 4096) == (ZERO, 4096, 256 << 10)
    assert len(asked) == 2
    # Through the raw node above, the same.
    root = bb.root
    assert root is not None
    status = layer.run(root.block_status(4096, 4096))
    assert (int(status.flags), status.length, status.offset) == (DATA, 4096, 4096)
    assert len(asked) == 2


def test_cached_answers_equal_the_drivers(layer: BlockLayer, tmp_path: Path) -> None:
    bb, file_node, asked = _open(layer, tmp_path)
    original = file_node.driver.block_status
    for offset, length in [(0, 512), (4096, 300 << 10), (255 << 10, 4096), (1 * MiB, 4096),
                           (4 * MiB - 4096, 8192), (4 * MiB, 4096)]:
        cached = layer.run(file_node.block_status(offset, length))
        if offset < 4 * MiB:
            direct = layer.run(original(offset, min(length, 4 * MiB - offset)))
            assert (cached.flags, cached.length, cached.offset) == (direct.flags, direct.length, direct.offset)
        else:
            assert cached.flags == BlockStatusFlags.EOF


@pytest.mark.parametrize("how", ["zero-write", "discard", "truncate"])
def test_zeroing_through_the_node_drops_the_extent(layer: BlockLayer, tmp_path: Path, how: str) -> None:
    bb, file_node, asked = _open(layer, tmp_path, discard="unmap")
    assert _status(layer, file_node, 64 << 10, 4096)[0] == DATA
    if how == "zero-write":
        layer.run(bb.pwrite_zeroes(64 << 10, 64 << 10, RequestFlags.MAY_UNMAP))
    elif how == "discard":
        layer.run(bb.pdiscard(64 << 10, 64 << 10))
    else:
        layer.run(file_node.truncate(64 << 10))
        layer.run(file_node.truncate(4 * MiB))
    assert _status(layer, file_node, 64 << 10, 4096)[0] == ZERO
    # The data before it is still data.
    assert _status(layer, file_node, 0, 4096)[0] == DATA


def test_writes_keep_the_extent(layer: BlockLayer, tmp_path: Path) -> None:
    bb, file_node, asked = _open(layer, tmp_path)
    assert _status(layer, file_node, 0, 4096)[0] == DATA
    layer.run(bb.pwritev(4096, memoryview(b"\x01" * 4096)))
    assert _status(layer, file_node, 4096, 4096)[0] == DATA
    assert len(asked) == 1
    # A write into the hole makes data there: the driver is asked and says so.
    layer.run(bb.pwritev(1 * MiB, memoryview(b"\x01" * 4096)))
    assert _status(layer, file_node, 1 * MiB, 4096)[0] == DATA
    assert len(asked) == 2


def test_format_nodes_always_ask_their_driver(layer: BlockLayer, tmp_path: Path) -> None:
    bb, file_node, asked = _open(layer, tmp_path)
    root = bb.root
    assert root is not None
    calls: list[int] = []
    original = root.driver.block_status

    async def block_status(offset: int, length: int) -> BlockStatus:
        calls.append(offset)
        return await original(offset, length)

    root.driver.block_status = block_status  # type: ignore[method-assign]
    for _ in range(3):
        layer.run(root.block_status(0, 4096))
    assert calls == [0, 0, 0]
    assert len(asked) == 1
