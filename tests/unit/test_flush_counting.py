"""Writethrough really flushes: counted at the file node and at the ``fdatasync`` syscall.

The cache model (``DESIGN.md``; ``specs/qemu-cache-model.md`` c.2, c.4): a writethrough
BlockBackend completes a write only once it is stable (FUA, emulated by a flush), a writeback one
leaves flushing to its user, and ``cache.no-flush`` skips a node's disk flush while the flush walk
still goes on down (a child with an explicit ``cache.no-flush=off`` still flushes to disk).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

if str(Path(__file__).resolve().parents[2]) not in sys.path:
    # Lets ``tests.support`` import under a bare ``pytest`` run (no rootdir on sys.path).
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.graphutil import make_qcow2, make_raw, walk  # noqa: E402

from blockgraph.graph.layer import BlockLayer  # noqa: E402
from blockgraph.graph.node import BlockBackend, Node  # noqa: E402

N = 6
CLUSTER = 65536


def _image(tmp_path: Path, fmt: str) -> str:
    if fmt == "raw":
        return make_raw(tmp_path / "img.raw", 1 << 20)
    return make_qcow2(tmp_path / "img.qcow2", 1 << 20)


def _open(layer: BlockLayer, tmp_path: Path, fmt: str, **options: str) -> tuple[BlockBackend, Node]:
    """Open an image as drive0's root; return the BlockBackend and the protocol (file) node."""
    filename = _image(tmp_path, fmt)
    bb = layer.new_backend("drive0")
    root = layer.run(layer.open_node(filename, {"driver": fmt, **options}, backend=bb))
    assert bb.root is root
    leaves = [n for n in walk(root) if n.driver_name == "file"]
    assert len(leaves) == 1
    file_node = leaves[0]
    assert root.file is file_node
    return bb, file_node


def _preallocate(layer: BlockLayer, bb: BlockBackend) -> None:
    """Write every cluster the test will touch once, so later writes allocate nothing."""
    for i in range(N):
        layer.run(bb.pwritev(i * CLUSTER, memoryview(b"\0" * CLUSTER)))
    layer.run(bb.flush())


def _writes(layer: BlockLayer, bb: BlockBackend, count: int = N) -> None:
    for i in range(count):
        # Unaligned on purpose: the request layer's read-modify-write must not lose the flush.
        layer.run(bb.pwritev(i * CLUSTER + 7, memoryview(bytes([i + 1]) * 1000)))


def _reset(file_node: Node) -> tuple[int, int]:
    return file_node.stats.disk_flushes, file_node.stats.flush_operations


FORMATS = ["raw", "qcow2"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_writethrough_flushes_every_write(layer: BlockLayer, tmp_path: Path, fmt: str) -> None:
    bb, file_node = _open(layer, tmp_path, fmt)
    bb.write_cache = False
    for i in range(N):
        before = file_node.stats.disk_flushes
        layer.run(bb.pwritev(i * CLUSTER + 7, memoryview(b"w" * 1000)))
        assert file_node.stats.disk_flushes >= before + 1, f"write {i} completed without a disk flush"
    assert file_node.stats.flush_operations >= N
    assert file_node.stats.wr_operations >= N


@pytest.mark.parametrize("fmt", [
    "raw",
    "qcow2",
])
def test_writethrough_zero_writes_flush(layer: BlockLayer, tmp_path: Path, fmt: str) -> None:
    bb, file_node = _open(layer, tmp_path, fmt)
    bb.write_cache = False
    for i in range(N):
        before = file_node.stats.disk_flushes
        layer.run(bb.pwrite_zeroes(i * CLUSTER, 4096))
        assert file_node.stats.disk_flushes >= before + 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_writeback_no_flush_until_asked(layer: BlockLayer, tmp_path: Path, fmt: str) -> None:
    bb, file_node = _open(layer, tmp_path, fmt)
    assert bb.write_cache is True
    _preallocate(layer, bb)
    disk0, ops0 = _reset(file_node)
    _writes(layer, bb)
    assert file_node.stats.disk_flushes == disk0
    assert file_node.stats.flush_operations == ops0
    layer.run(bb.flush())
    assert file_node.stats.disk_flushes == disk0 + 1
    assert file_node.stats.flush_operations == ops0 + 1


def test_writeback_raw_fresh_image_zero_flushes(layer: BlockLayer, tmp_path: Path) -> None:
    bb, file_node = _open(layer, tmp_path, "raw")
    _writes(layer, bb)
    assert (file_node.stats.disk_flushes, file_node.stats.flush_operations) == (0, 0)
    layer.run(bb.flush())
    assert file_node.stats.disk_flushes == 1


def test_writeback_qcow2_allocating_writes_zero_flushes(layer: BlockLayer, tmp_path: Path) -> None:
    # Allocating an L2 table syncs (refcounts, table, L1 entry: QEMU's l2_allocate does the
    # same). After that, allocating data clusters under the table only dirties the caches: QEMU
    # writes them back (with their ordering flushes) at flush time or on eviction.
    bb, file_node = _open(layer, tmp_path, "qcow2")
    layer.run(bb.pwritev(0, memoryview(b"a" * 512)))
    disk0, ops0 = _reset(file_node)
    for i in range(1, N):
        layer.run(bb.pwritev(i * CLUSTER + 7, memoryview(b"b" * 1000)))
    assert (file_node.stats.disk_flushes, file_node.stats.flush_operations) == (disk0, ops0)
    layer.run(bb.flush())
    assert file_node.stats.disk_flushes > disk0


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_flush_on_root_reaches_file(layer: BlockLayer, tmp_path: Path, fmt: str) -> None:
    bb, file_node = _open(layer, tmp_path, fmt, **{"cache.no-flush": "on"})
    assert file_node.flags.no_flush, "cache.no-flush was not inherited by the file child"
    bb.write_cache = False
    _writes(layer, bb)
    layer.run(bb.flush())
    assert file_node.stats.disk_flushes == 0
    # The flush walk still goes down: no-flush is not an early return.
    assert file_node.stats.flush_operations >= N + 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_flush_on_root_but_not_on_file(layer: BlockLayer, tmp_path: Path, fmt: str) -> None:
    bb, file_node = _open(
        layer, tmp_path, fmt, **{"cache.no-flush": "on", "file.cache.no-flush": "off"}
    )
    root = bb.root
    assert root is not None and root.flags.no_flush
    assert not file_node.flags.no_flush
    bb.write_cache = False
    _writes(layer, bb)
    assert file_node.stats.disk_flushes >= N
    assert root.stats.disk_flushes == 0


def test_qcow2_no_flush_still_writes_metadata(layer: BlockLayer, tmp_path: Path) -> None:
    # no-flush skips only the disk flush: qcow2's cached metadata must still reach the file,
    # so another reader sees the data after bb.flush().
    bb, file_node = _open(layer, tmp_path, "qcow2", **{"cache.no-flush": "on"})
    layer.run(bb.pwritev(CLUSTER, memoryview(b"m" * 512)))
    layer.run(bb.flush())
    other = BlockLayer()
    try:
        bb2 = other.new_backend("peek")
        other.run(other.open_node(file_node.filename, {"driver": "qcow2", "read-only": "on"},
                                  backend=bb2))
        buf = bytearray(512)
        other.run(bb2.preadv(CLUSTER, memoryview(buf)))
        assert buf == b"m" * 512
    finally:
        other.close()


def test_qcow2_writethrough_in_place_flushes_disk_once_per_write(layer: BlockLayer,
                                                                  tmp_path: Path) -> None:
    # Rewrites of allocated clusters leave qcow2's caches clean: the flush after each write
    # has no metadata to write, but the file's disk flush must still happen, once.
    bb, file_node = _open(layer, tmp_path, "qcow2")
    _preallocate(layer, bb)
    root = bb.root
    assert root is not None
    drv: Any = root.driver
    assert not drv.l2_cache.dirty and not drv.refcount_cache.dirty
    bb.write_cache = False
    for i in range(N):
        before = file_node.stats.disk_flushes
        layer.run(bb.pwritev(i * CLUSTER + 7, memoryview(b"r" * 1000)))
        assert file_node.stats.disk_flushes == before + 1


def test_qcow2_flush_waits_for_metadata_lock_holder(layer: BlockLayer, tmp_path: Path) -> None:
    # Clean caches do not let a flush pass a holder of the metadata lock: what the holder
    # changes before it lets go is written by that flush.
    bb, _ = _open(layer, tmp_path, "qcow2")
    _preallocate(layer, bb)
    root = bb.root
    assert root is not None
    drv: Any = root.driver
    assert not drv.l2_cache.dirty and not drv.refcount_cache.dirty
    l2_offset = drv.l1_table[0] & 0x00FFFFFFFFFFFE00

    async def scenario() -> None:
        await drv._lock.relock()
        flush = bb.flush()
        try:
            flush.send(None)  # runs until it waits for the lock
            waited = True
        except StopIteration:
            waited = False
        drv.l2_cache.mark_dirty(l2_offset)  # the holder's change
        drv._lock.release()
        assert waited, "the flush did not wait for the metadata lock"
        with pytest.raises(StopIteration):
            while True:
                flush.send(None)
        assert not drv.l2_cache.dirty, "the flush did not write what the holder changed"

    layer.run(scenario())


@pytest.mark.parametrize("fmt", FORMATS)
def test_writethrough_after_switch_back_to_writeback(layer: BlockLayer, tmp_path: Path, fmt: str) -> None:
    bb, file_node = _open(layer, tmp_path, fmt)
    _preallocate(layer, bb)
    bb.write_cache = False
    disk0, _ = _reset(file_node)
    _writes(layer, bb, 2)
    assert file_node.stats.disk_flushes >= disk0 + 2
    bb.write_cache = True
    disk1, _ = _reset(file_node)
    _writes(layer, bb, 2)
    assert file_node.stats.disk_flushes == disk1


@pytest.mark.parametrize("fmt", FORMATS)
def test_writethrough_from_cache_writeback_off(layer: BlockLayer, tmp_path: Path, fmt: str) -> None:
    bb, file_node = _open(layer, tmp_path, fmt, **{"cache.writeback": "off"})
    assert bb.write_cache is False
    _writes(layer, bb)
    assert file_node.stats.disk_flushes >= N


# -- syscall level ---------------------------------------------------------------------------


class _SyncCounter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[int] = []
        real = os.fdatasync

        def counting(fd: int) -> None:
            self.calls.append(fd)
            real(fd)

        monkeypatch.setattr(os, "fdatasync", counting)

    def on(self, fd: int) -> int:
        return sum(1 for c in self.calls if c == fd)


CASES = [
    # (options on the root, write_cache, expect fdatasync per write on the file's fd)
    ({}, False, True),
    ({}, True, False),
    ({"cache.no-flush": "on"}, False, False),
    ({"cache.no-flush": "on", "file.cache.no-flush": "off"}, False, True),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("options", "write_cache", "syncs"), CASES)
def test_fdatasync_syscalls(
    layer: BlockLayer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
    options: dict[str, str],
    write_cache: bool,
    syncs: bool,
) -> None:
    bb, file_node = _open(layer, tmp_path, fmt, **options)
    _preallocate(layer, bb)
    disk0 = file_node.stats.disk_flushes
    counter = _SyncCounter(monkeypatch)
    bb.write_cache = write_cache
    fd = file_node.driver.fd
    assert fd >= 0
    _writes(layer, bb)
    if syncs:
        assert counter.on(fd) >= N
    else:
        assert counter.on(fd) == 0
    # Every disk flush the file node counts is one real fdatasync on its descriptor.
    assert counter.on(fd) == file_node.stats.disk_flushes - disk0
    layer.run(bb.flush())
    file_flushes = options.get("cache.no-flush") != "on" or options.get("file.cache.no-flush") == "off"
    assert (counter.on(fd) > 0) == file_flushes
    assert counter.on(fd) == file_node.stats.disk_flushes - disk0
    # No fdatasync on a file descriptor other than the image's.
    assert set(counter.calls) <= {fd}
