"""qcow2 writes whose data is in flight outside the metadata lock (QEMU's dependencies).

The image file is wrapped so that a chosen data write suspends until the test lets it go:
while it is parked, the test runs other requests against the same driver and looks at what
they see. Every scenario ends with the driver's own check (corruptions, leaks), the same
check after reopening and, when QEMU is installed, ``qemu-img check``.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parents[2]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.filechild import FileChild, open_image  # noqa: E402

from blockgraph.drivers.base import RequestFlags  # noqa: E402
from blockgraph.drivers.qcow2 import qcow2_create  # noqa: E402
from blockgraph.errors import IOFailure  # noqa: E402

NONE = RequestFlags.NONE
CS = 65536
SIZE = 64 << 20
MARK = b"\xa5" * 512  # every parked write carries this pattern


class Gate:
    """Parks the next write to the file whose buffer holds :data:`MARK` while armed."""

    def __init__(self, child: FileChild) -> None:
        self.armed = False
        self.fail = False
        self.parked: list[tuple[int, int]] = []
        self.release = asyncio.Event()
        self._orig = child.pwritev
        child.pwritev = self._pwritev  # type: ignore[method-assign]

    async def _pwritev(self, offset: int, buf: memoryview,
                       flags: RequestFlags = RequestFlags.NONE) -> None:
        if self.armed and MARK in bytes(buf):
            self.armed = False
            self.parked.append((offset, len(buf)))
            await self.release.wait()
            if self.fail:
                raise IOFailure(5)
        await self._orig(offset, buf, flags)


async def until(cond: Callable[[], bool]) -> None:
    """Let the other tasks run until ``cond`` holds (loop iterations, never wall time)."""
    for _ in range(1000):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def _setup(tmp_path: Path) -> tuple[object, object, Gate]:
    img = tmp_path / "a.qcow2"
    img.write_bytes(b"")
    f = FileChild(str(img))
    try:
        await qcow2_create(f, SIZE)  # type: ignore[arg-type]
    finally:
        f.close()
    drv, ctx = await open_image(str(img))
    # The L2 table exists before the test starts: the next file write of a guest write to a
    # fresh cluster is its data write.
    await drv.pwritev(40 * CS, memoryview(b"\1" * 512), NONE)
    return drv, ctx, Gate(ctx.children[0])


async def _read(drv: object, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await drv.preadv(offset, memoryview(buf), NONE)  # type: ignore[attr-defined]
    return bytes(buf)


async def _finish(drv: object, ctx: object, tmp_path: Path) -> None:
    res = await drv.check()  # type: ignore[attr-defined]
    assert (res.corruptions, res.leaks, res.check_errors) == (0, 0, 0), res.messages
    await ctx.close_all(drv)  # type: ignore[attr-defined]
    img = str(tmp_path / "a.qcow2")
    drv, ctx = await open_image(img, read_only=True)
    res = await drv.check()  # type: ignore[attr-defined]
    assert (res.corruptions, res.leaks, res.check_errors) == (0, 0, 0), res.messages
    await ctx.close_all(drv)  # type: ignore[attr-defined]
    if shutil.which("qemu-img"):
        out = subprocess.run(["qemu-img", "check", img], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


def _data_clusters(drv: object) -> int:
    return len({e & 0x00FFFFFFFFFFFE00 for e in _entries(drv) if e & 0x00FFFFFFFFFFFE00})


def _entries(drv: object) -> list[int]:
    import struct

    l2 = drv.l1_table[0] & 0x00FFFFFFFFFFFE00  # type: ignore[attr-defined]
    table = drv.l2_cache.peek(l2)  # type: ignore[attr-defined]
    return list(struct.unpack(f">{CS // 8}Q", table))


def test_second_write_to_a_cluster_being_allocated_waits(tmp_path: Path) -> None:
    """Two writes to one unallocated cluster: one allocation, the second waits, both land;
    a read meanwhile sees the cluster as it was (zeros), never the half-written one."""

    async def main() -> None:
        drv, ctx, gate = await _setup(tmp_path)
        gate.armed = True
        a = asyncio.ensure_future(drv.pwritev(5 * CS, memoryview(MARK * 8), NONE))
        await until(lambda: bool(gate.parked))
        assert gate.parked == [(gate.parked[0][0], CS)]  # data merged with its zero COW
        b = asyncio.ensure_future(drv.pwritev(5 * CS + 4096, memoryview(b"\xbb" * 4096), NONE))
        inflight = drv._lock.writes
        await until(lambda: inflight[0].done is not None)  # b waits for a's allocation
        assert not b.done()
        assert await _read(drv, 5 * CS, CS) == bytes(CS)
        before = _data_clusters(drv)
        gate.release.set()
        await asyncio.gather(a, b)
        assert _data_clusters(drv) == before + 1
        assert await _read(drv, 5 * CS, CS) == MARK * 8 + b"\xbb" * 4096 + bytes(CS - 8192)
        await _finish(drv, ctx, tmp_path)

    asyncio.run(main())


def test_writes_to_other_clusters_proceed_meanwhile(tmp_path: Path) -> None:
    """An allocation in flight does not hold up writes elsewhere (adjacent cluster, same L2
    table): they allocate their own cluster and complete first."""

    async def main() -> None:
        drv, ctx, gate = await _setup(tmp_path)
        gate.armed = True
        a = asyncio.ensure_future(drv.pwritev(5 * CS + 512, memoryview(MARK), NONE))
        await until(lambda: bool(gate.parked))
        await drv.pwritev(6 * CS, memoryview(b"\xcc" * 8192), NONE)  # completes while a waits
        await drv.pwritev(40 * CS, memoryview(b"\xdd" * 512), NONE)  # in place
        assert not a.done()
        entries = _entries(drv)
        assert entries[5] == 0 and entries[6] != 0
        gate.release.set()
        await a
        entries = _entries(drv)
        assert entries[5] & 0x00FFFFFFFFFFFE00 not in (0, entries[6] & 0x00FFFFFFFFFFFE00)
        assert await _read(drv, 5 * CS, 2 * CS) == (
            bytes(512) + MARK + bytes(CS - 1024) + b"\xcc" * 8192 + bytes(CS - 8192))
        assert await _read(drv, 40 * CS, 512) == b"\xdd" * 512
        await _finish(drv, ctx, tmp_path)

    asyncio.run(main())


@pytest.mark.parametrize("op", ["discard", "zero", "zero-unmap"])
def test_discard_and_zero_wait_for_an_allocation_in_flight(tmp_path: Path, op: str) -> None:
    """A discard or zero write of a cluster being allocated waits until the allocation is
    linked, then applies to it: no cluster is freed twice or leaked."""

    async def main() -> None:
        drv, ctx, gate = await _setup(tmp_path)
        gate.armed = True
        a = asyncio.ensure_future(drv.pwritev(5 * CS, memoryview(MARK * 2), NONE))
        await until(lambda: bool(gate.parked))
        if op == "discard":
            coro = drv.pdiscard(5 * CS, CS)
        else:
            coro = drv.pwrite_zeroes(
                5 * CS, CS, RequestFlags.MAY_UNMAP if op == "zero-unmap" else NONE)
        d = asyncio.ensure_future(coro)
        await until(lambda: drv._lock._barriers == 1)
        # A new write meanwhile queues behind the waiting barrier.
        c = asyncio.ensure_future(drv.pwritev(7 * CS, memoryview(b"\xee" * 512), NONE))
        await until(lambda: drv._lock._no_barrier is not None)
        assert not d.done() and not c.done()
        gate.release.set()
        await asyncio.gather(a, d, c)
        assert await _read(drv, 5 * CS, CS) == bytes(CS)
        assert await _read(drv, 7 * CS, 512) == b"\xee" * 512
        await _finish(drv, ctx, tmp_path)

    asyncio.run(main())


def test_discard_waits_for_an_in_place_write(tmp_path: Path) -> None:
    """An in-place write runs without the mutex; a discard of its cluster waits for it, so
    the cluster is not freed (and reused) under the write."""

    async def main() -> None:
        drv, ctx, gate = await _setup(tmp_path)
        await drv.pwritev(5 * CS, memoryview(b"\1" * CS), NONE)
        gate.armed = True
        a = asyncio.ensure_future(drv.pwritev(5 * CS + 4096, memoryview(MARK), NONE))
        await until(lambda: bool(gate.parked))
        assert drv._lock.inplace == 1 and not drv._lock.writes  # the lock-free fast path
        d = asyncio.ensure_future(drv.pdiscard(5 * CS, CS))
        await until(lambda: drv._lock._barriers == 1)
        # The barrier keeps the next in-place write off the fast path, behind it.
        c = asyncio.ensure_future(drv.pwritev(40 * CS, memoryview(b"\2" * 512), NONE))
        await until(lambda: drv._lock._no_barrier is not None)
        assert not d.done() and not c.done()
        gate.release.set()
        await asyncio.gather(a, d, c)
        assert await _read(drv, 5 * CS, CS) == bytes(CS)
        assert _entries(drv)[5] & 0x00FFFFFFFFFFFE00 == 0
        await _finish(drv, ctx, tmp_path)

    asyncio.run(main())


def test_failed_data_write_gives_the_clusters_back(tmp_path: Path) -> None:
    """An allocating write whose data write fails leaves the cluster unmapped and frees its
    host cluster (QEMU's qcow2_alloc_cluster_abort); a waiting write then allocates anew."""

    async def main() -> None:
        drv, ctx, gate = await _setup(tmp_path)
        gate.armed = True
        gate.fail = True
        a = asyncio.ensure_future(drv.pwritev(5 * CS, memoryview(MARK), NONE))
        await until(lambda: bool(gate.parked))
        b = asyncio.ensure_future(drv.pwritev(5 * CS + 512, memoryview(b"\xbb" * 512), NONE))
        await until(lambda: drv._lock.writes[0].done is not None)
        gate.release.set()
        with pytest.raises(IOFailure):
            await a
        await b
        assert await _read(drv, 5 * CS, 1024) == bytes(512) + b"\xbb" * 512
        await _finish(drv, ctx, tmp_path)

    asyncio.run(main())


def test_many_concurrent_writers_model(tmp_path: Path) -> None:
    """Random concurrent writes (same, adjacent and spanning clusters) while every data
    write yields to the loop: the result matches a model and the image checks clean."""
    import random

    async def main() -> None:
        drv, ctx, gate = await _setup(tmp_path)
        model = bytearray(16 * CS)
        orig = ctx.children[0].pwritev

        async def yielding(offset: int, buf: memoryview,
                           flags: RequestFlags = RequestFlags.NONE) -> None:
            await asyncio.sleep(0)
            await orig(offset, buf, flags)

        ctx.children[0].pwritev = yielding
        rng = random.Random(7)
        ops = []
        for i in range(200):
            length = rng.choice([512, 4096, CS, CS + 4096, 3 * CS]) if i % 3 else 4096
            off = rng.randrange(0, (16 * CS - length) // 512 + 1) * 512
            # Writes overlapping each other in flight have no defined order: each byte
            # range is written by one request only, so the model is exact.
            ops.append((off, length))
        used = bytearray(16 * CS)
        tasks = []
        for n, (off, length) in enumerate(ops):
            if any(used[off:off + length]):
                continue
            used[off:off + length] = b"\1" * length
            data = bytes([n % 251 + 1]) * length
            model[off:off + length] = data
            tasks.append(drv.pwritev(off, memoryview(data), NONE))
        await asyncio.gather(*tasks)
        assert await _read(drv, 0, 16 * CS) == bytes(model)
        await _finish(drv, ctx, tmp_path)

    asyncio.run(main())
