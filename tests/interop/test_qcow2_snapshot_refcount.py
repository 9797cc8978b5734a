"""Internal snapshots that would overflow a refcount: they fail and leave the image as it was.

With ``refcount_bits=4`` (refcount max 15) compressed clusters packed into one host cluster add
one reference each, so a snapshot raises that host cluster's refcount by the number of compressed
clusters in it and can overflow. QEMU 7.2 fails such a snapshot with EINVAL too (``qemu-img:
Could not create snapshot 's4': -22 (Invalid argument)``) but leaks the L1 copy and the
increments done so far; we must leave nothing behind: ``qemu-img check`` clean, the snapshot
list unchanged, the data unchanged, and a later snapshot that fits still works.
"""

from __future__ import annotations

import asyncio
import errno
import json
import sys
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parents[2]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.filechild import FileChild, open_image  # noqa: E402
from tests.support.oracle import require_qemu, run  # noqa: E402

from blockgraph.drivers.base import RequestFlags  # noqa: E402
from blockgraph.drivers.qcow2 import qcow2_create  # noqa: E402
from blockgraph.errors import IOFailure  # noqa: E402

NONE = RequestFlags.NONE
CS = 512


@pytest.fixture(autouse=True)
def _oracles() -> None:
    require_qemu()


def _check_clean(path: Path) -> None:
    r = run("qemu-img", "check", str(path), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No errors were found on the image." in r.stdout


def _compare(path: Path, model: bytes, tmp: Path) -> None:
    raw = tmp / "model.raw"
    raw.write_bytes(model)
    r = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(path), str(raw), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def _snapshot_names(path: Path) -> list[str]:
    out = run("qemu-img", "snapshot", "-l", str(path)).stdout.splitlines()
    return [line.split()[1] for line in out[2:]]


def _host_offset(path: Path, offset: int) -> int:
    for ext in json.loads(run("qemu-img", "map", "--output=json", str(path)).stdout):
        if ext["start"] <= offset < ext["start"] + ext["length"]:
            return int(ext["offset"]) + offset - int(ext["start"])
    raise AssertionError(f"offset {offset} not mapped")


async def _create(path: Path, size: int) -> None:
    path.write_bytes(b"")
    f = FileChild(str(path))
    try:
        await qcow2_create(f, size, cluster_size=CS, compat="1.1", refcount_bits=4,
                           compression_type="zlib")
    finally:
        f.close()


def test_snapshot_overflowing_compressed_refcount_leaves_image_clean(tmp_path: Path) -> None:
    # The sequence the Hypothesis state machine found: four zero clusters compressed into one
    # host cluster between snapshots; the fourth snapshot would take that cluster to 16.
    img = tmp_path / "img.qcow2"
    model = bytearray(4 * CS)

    async def main() -> None:
        await _create(img, len(model))
        drv, ctx = await open_image(str(img))
        try:
            async def compressed(cluster: int) -> None:
                await drv.pdiscard(cluster * CS, CS)
                await drv.pwritev(cluster * CS, memoryview(bytes(CS)), RequestFlags.COMPRESSED)

            await compressed(0)
            await compressed(3)
            await drv.snapshot_create("snap1")
            await compressed(2)
            await drv.snapshot_create("snap2")
            await drv.snapshot_create("snap3")
            await compressed(1)
            with pytest.raises(IOFailure) as info:
                await drv.snapshot_create("snap4")
            assert info.value.errno == errno.EINVAL
            assert [sn.name for sn in drv.snapshots] == ["snap1", "snap2", "snap3"]
            buf = bytearray(len(model))
            await drv.preadv(0, memoryview(buf), NONE)
            assert buf == model
        finally:
            await ctx.close_all(drv)

    asyncio.run(main())
    _check_clean(img)
    assert _snapshot_names(img) == ["snap1", "snap2", "snap3"]
    _compare(img, bytes(model), tmp_path)

    async def after() -> None:
        # Dropping snap1 frees two references to the shared host cluster: now a snapshot fits.
        drv, ctx = await open_image(str(img))
        try:
            await drv.snapshot_delete(None, "snap1")
            await drv.snapshot_create("snap4")
        finally:
            await ctx.close_all(drv)

    asyncio.run(after())
    _check_clean(img)
    assert _snapshot_names(img) == ["snap2", "snap3", "snap4"]
    _compare(img, bytes(model), tmp_path)


def test_snapshot_overflow_in_later_l2_table_keeps_copied_flags(tmp_path: Path) -> None:
    # The first L2 table is processed (its data cluster raised to 2, OFLAG_COPIED cleared)
    # before the overflow in the second one: undoing the refcounts alone would leave a data
    # cluster with refcount 1 and no OFLAG_COPIED, which qemu-img check reports as an error.
    img = tmp_path / "img.qcow2"
    l2_span = CS // 8 * CS  # 64 clusters per L2 table
    model = bytearray(2 * l2_span)

    async def main() -> None:
        await _create(img, len(model))
        drv, ctx = await open_image(str(img))
        try:
            await drv.pwritev(0, memoryview(b"\x11" * CS), NONE)
            model[:CS] = b"\x11" * CS
            # 15 compressed clusters fill one host cluster's refcount (then a new one starts).
            for cluster in range(64, 80):
                await drv.pwritev(cluster * CS, memoryview(bytes(CS)), RequestFlags.COMPRESSED)
            with pytest.raises(IOFailure) as info:
                await drv.snapshot_create("snap1")
            assert info.value.errno == errno.EINVAL
            assert drv.snapshots == []
        finally:
            await ctx.close_all(drv)
    asyncio.run(main())
    _check_clean(img)
    assert _snapshot_names(img) == []
    _compare(img, bytes(model), tmp_path)

    async def overwrite() -> None:
        drv, ctx = await open_image(str(img))
        try:
            await drv.pwritev(0, memoryview(b"\x22" * CS), NONE)
        finally:
            await ctx.close_all(drv)

    # The data cluster is still the active layer's own: overwritten in place.
    before = _host_offset(img, 0)
    asyncio.run(overwrite())
    model[:CS] = b"\x22" * CS
    assert _host_offset(img, 0) == before
    _check_clean(img)
    _compare(img, bytes(model), tmp_path)


def test_snapshot_apply_overflowing_refcount_changes_nothing(tmp_path: Path) -> None:
    # Applying raises what the snapshot reaches before dropping the active references: four
    # compressed clusters in one host cluster, two snapshots (refcount 12), +4 overflows.
    img = tmp_path / "img.qcow2"
    model = bytes(4 * CS)

    async def main() -> None:
        await _create(img, len(model))
        drv, ctx = await open_image(str(img))
        try:
            for cluster in range(4):
                await drv.pwritev(cluster * CS, memoryview(bytes(CS)), RequestFlags.COMPRESSED)
            await drv.snapshot_create("snap1")
            await drv.snapshot_create("snap2")
            with pytest.raises(IOFailure) as info:
                await drv.snapshot_goto("snap1")
            assert info.value.errno == errno.EINVAL
        finally:
            await ctx.close_all(drv)

    asyncio.run(main())
    _check_clean(img)
    assert _snapshot_names(img) == ["snap1", "snap2"]
    _compare(img, model, tmp_path)
