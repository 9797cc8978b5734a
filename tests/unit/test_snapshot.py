"""External snapshots: the BlockBackend keeps its cache mode on the new root, the old top
becomes the read-only backing node, direct/no-flush carry over, and the data and the image are
right (checked with qemu-img / qemu-io as oracles).

``specs/qemu-cache-model.md`` g ("External snapshot"), observed in QEMU 7.2 [B6, B12].
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parents[2]) not in sys.path:
    # Lets ``tests.support`` import under a bare ``pytest`` run (no rootdir on sys.path).
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.graphutil import fd_count, make_qcow2, make_raw, walk  # noqa: E402
from tests.support.oracle import require_qemu, run  # noqa: E402

from blockgraph.errors import BlockError, IOFailure  # noqa: E402
from blockgraph.graph.drive import drive_new  # noqa: E402
from blockgraph.graph.layer import BlockLayer  # noqa: E402
from blockgraph.graph.node import BlockBackend, Node  # noqa: E402
from blockgraph.graph.snapshot import external_snapshot  # noqa: E402
from blockgraph.monitor.hmp import format_block_info  # noqa: E402

MiB = 1 << 20


@pytest.fixture
def layer() -> Iterator[BlockLayer]:
    lay = BlockLayer()
    lay.run(asyncio.sleep(0))
    yield lay
    try:
        lay.close()
    except IOFailure:
        # Tests that care close the layer themselves and assert on it; a second close after
        # such a failure only repeats it.
        pass


def _drive(layer: BlockLayer, filename: str, fmt: str, cache: str) -> BlockBackend:
    return layer.run(drive_new(layer, {"if": "none", "id": "drive0", "file": filename,
                                       "format": fmt, "cache": cache}))


def _read(layer: BlockLayer, bb: BlockBackend, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    layer.run(bb.preadv(offset, memoryview(buf)))
    return bytes(buf)


def _snapshot(layer: BlockLayer, bb: BlockBackend, path: Path) -> tuple[Node, Node]:
    old_top = bb.root
    assert old_top is not None
    overlay = layer.run(external_snapshot(layer, bb, str(path), "qcow2"))
    return old_top, overlay


@pytest.mark.parametrize(("cache", "write_cache", "direct", "no_flush"), [
    ("writethrough", False, False, False),
    ("directsync", False, True, False),
    ("none", True, True, False),
    ("unsafe", True, False, True),
    ("writeback", True, False, False),
])
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_cache_mode_moves_to_overlay(layer: BlockLayer, tmp_path: Path, cache: str,
                                     write_cache: bool, direct: bool, no_flush: bool,
                                     fmt: str) -> None:
    base = (make_qcow2(tmp_path / "base.qcow2", MiB) if fmt == "qcow2"
            else make_raw(tmp_path / "base.raw", MiB))
    bb = _drive(layer, base, fmt, cache)
    assert bb.write_cache is write_cache
    old_top, overlay = _snapshot(layer, bb, tmp_path / "snap.qcow2")
    assert bb.root is overlay
    assert bb.write_cache is write_cache
    assert overlay.backends == [bb] and old_top.backends == []
    assert overlay.backing is old_top
    assert old_top.flags.read_only
    assert all(n.flags.read_only for n in walk(old_top))
    assert not overlay.flags.read_only and overlay.file is not None
    assert not overlay.file.flags.read_only
    for node in (overlay, overlay.file):
        assert (node.flags.direct, node.flags.no_flush) == (direct, no_flush), node
    mode = "writeback" if write_cache else "writethrough"
    info = format_block_info(bb, overlay)
    assert f"Cache mode:       {mode}" in info
    # Node queries say writeback, for the overlay and for the old top alike.
    for node in walk(overlay):
        assert "Cache mode:       writeback" in format_block_info(None, node)
    assert f"({fmt}, read-only)" in format_block_info(None, old_top)


def test_writethrough_overlay_really_flushes(layer: BlockLayer, tmp_path: Path) -> None:
    bb = _drive(layer, make_qcow2(tmp_path / "base.qcow2", MiB), "qcow2", "writethrough")
    _, overlay = _snapshot(layer, bb, tmp_path / "snap.qcow2")
    assert overlay.file is not None
    for i in range(4):
        before = overlay.file.stats.disk_flushes
        layer.run(bb.pwritev(i * 65536 + 1, memoryview(b"t" * 100)))
        assert overlay.file.stats.disk_flushes > before


def test_unsafe_overlay_ignores_flushes(layer: BlockLayer, tmp_path: Path) -> None:
    bb = _drive(layer, make_qcow2(tmp_path / "base.qcow2", MiB), "qcow2", "unsafe")
    _, overlay = _snapshot(layer, bb, tmp_path / "snap.qcow2")
    assert overlay.file is not None
    layer.run(bb.pwritev(0, memoryview(b"u" * 4096)))
    layer.run(bb.flush())
    assert overlay.file.stats.flush_operations >= 1
    assert overlay.file.stats.disk_flushes == 0


def test_old_top_rejects_writes(layer: BlockLayer, tmp_path: Path) -> None:
    bb = _drive(layer, make_qcow2(tmp_path / "base.qcow2", MiB), "qcow2", "writeback")
    old_top, _ = _snapshot(layer, bb, tmp_path / "snap.qcow2")
    with pytest.raises(IOFailure):
        layer.run(old_top.pwritev(0, memoryview(b"x" * 512)))


@pytest.mark.parametrize(("fmt", "cache"), [
    ("qcow2", "writethrough"),
    ("qcow2", "none"),
    ("qcow2", "writeback"),
    ("raw", "writethrough"),
    ("raw", "none"),
])
def test_data_before_and_after(layer: BlockLayer, tmp_path: Path, fmt: str, cache: str) -> None:
    require_qemu()
    base = (make_qcow2(tmp_path / "base.qcow2", MiB) if fmt == "qcow2"
            else make_raw(tmp_path / "base.raw", MiB))
    snap = tmp_path / "snap.qcow2"
    bb = _drive(layer, base, fmt, cache)
    layer.run(bb.pwritev(0, memoryview(b"A" * 8192)))
    layer.run(bb.pwritev(100_000, memoryview(b"B" * 777)))  # unaligned, inside a cluster
    _snapshot(layer, bb, snap)
    layer.run(bb.pwritev(4096, memoryview(b"C" * 8192)))  # overlaps the "A" range
    layer.run(bb.pwritev(100_500, memoryview(b"D" * 100)))  # partial overwrite of "B"
    layer.run(bb.pwritev(700_001, memoryview(b"E" * 3)))
    expected = bytearray(MiB)
    expected[0:8192] = b"A" * 8192
    expected[100_000:100_777] = b"B" * 777
    expected[4096:12288] = b"C" * 8192
    expected[100_500:100_600] = b"D" * 100
    expected[700_001:700_004] = b"EEE"
    assert _read(layer, bb, 0, MiB) == bytes(expected)
    layer.run(bb.flush())
    layer.close()

    # The overlay is a valid image over the old top, and reads back the same in QEMU.
    run("qemu-img", "check", str(snap))
    info = json.loads(run("qemu-img", "info", "--output=json", str(snap)).stdout)
    assert info["backing-filename"] == base
    assert info["virtual-size"] == MiB
    want = tmp_path / "want.raw"
    want.write_bytes(bytes(expected))
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(snap), str(want))
    # The old top holds only what was written before the snapshot.
    before = bytearray(MiB)
    before[0:8192] = b"A" * 8192
    before[100_000:100_777] = b"B" * 777
    want.write_bytes(bytes(before))
    run("qemu-img", "compare", "-f", fmt, "-F", "raw", base, str(want))
    if fmt == "qcow2":
        run("qemu-img", "check", base)


def test_snapshot_of_snapshot(layer: BlockLayer, tmp_path: Path) -> None:
    require_qemu()
    bb = _drive(layer, make_qcow2(tmp_path / "base.qcow2", MiB), "qcow2", "directsync")
    layer.run(bb.pwritev(0, memoryview(b"1" * 512)))
    _snapshot(layer, bb, tmp_path / "s1.qcow2")
    layer.run(bb.pwritev(512, memoryview(b"2" * 512)))
    _, top = _snapshot(layer, bb, tmp_path / "s2.qcow2")
    layer.run(bb.pwritev(1024, memoryview(b"3" * 512)))
    assert bb.write_cache is False
    assert top.backing_chain_depth() == 2
    assert top.flags.direct and top.backing is not None and top.backing.flags.direct
    assert _read(layer, bb, 0, 1536) == b"1" * 512 + b"2" * 512 + b"3" * 512
    layer.close()
    for name in ("s1.qcow2", "s2.qcow2"):
        run("qemu-img", "check", str(tmp_path / name))
    out = run("qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x33 1024 512",
              "-c", "read -P 0x31 0 512", str(tmp_path / "s2.qcow2")).stdout
    assert "Pattern verification failed" not in out
    assert out.count("read 512/512 bytes") == 2


def test_failed_snapshot_changes_nothing(layer: BlockLayer, tmp_path: Path) -> None:
    bb = _drive(layer, make_qcow2(tmp_path / "base.qcow2", MiB), "qcow2", "writethrough")
    root = bb.root
    assert root is not None
    nodes = list(layer.nodes)
    fds = fd_count()
    with pytest.raises(BlockError):
        layer.run(external_snapshot(layer, bb, str(tmp_path / "nodir" / "snap.qcow2"), "qcow2"))
    assert bb.root is root and bb.write_cache is False
    assert layer.nodes == nodes
    assert not root.flags.read_only
    assert fd_count() == fds
    layer.run(bb.pwritev(0, memoryview(b"still writable")))
