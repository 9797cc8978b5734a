"""The qcow2 driver against a bytearray model, over real files, without QEMU."""

from __future__ import annotations

import asyncio
import os
import random
import struct
import sys
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parents[2]) not in sys.path:
    # Lets ``tests.support`` import under a bare ``pytest`` run (no rootdir on sys.path).
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.filechild import FileChild, open_image  # noqa: E402

from blockgraph.drivers.base import BlockStatusFlags, RequestFlags  # noqa: E402
from blockgraph.drivers.qcow2 import qcow2_create  # noqa: E402
from blockgraph.errors import BlockError  # noqa: E402

NONE = RequestFlags.NONE


async def _create(path: Path, size: int, **kw: object) -> None:
    path.write_bytes(b"")
    f = FileChild(str(path))
    try:
        await qcow2_create(f, size, **kw)  # type: ignore[arg-type]
    finally:
        f.close()


async def _read_all(drv: object, size: int) -> bytes:
    buf = bytearray(size)
    await drv.preadv(0, memoryview(buf), NONE)  # type: ignore[attr-defined]
    return bytes(buf)


def test_write_read_model(tmp_path: Path) -> None:
    async def main() -> None:
        size = 8 << 20
        img = tmp_path / "a.qcow2"
        # Tiny clusters and caches: L2 and refcount block eviction, many refcount blocks.
        await _create(img, size, cluster_size=512, refcount_bits=16)
        model = bytearray(size)
        rng = random.Random(1)
        drv, ctx = await open_image(str(img), options={"l2-cache-size": 1024})
        for _ in range(300):
            off = rng.randrange(0, size // 512) * 512
            length = min(rng.randrange(1, 64) * 512, size - off)
            op = rng.random()
            if op < 0.7:
                data = bytes([rng.randrange(256)]) * length
                await drv.pwritev(off, memoryview(data), NONE)
                model[off:off + length] = data
            elif op < 0.85:
                await drv.pwrite_zeroes(off, length, RequestFlags.MAY_UNMAP)
                model[off:off + length] = bytes(length)
            else:
                await drv.pdiscard(off, length)
                model[off:off + length] = bytes(length)
        assert await _read_all(drv, size) == bytes(model)
        await ctx.close_all(drv)
        drv, ctx = await open_image(str(img), read_only=True)
        assert await _read_all(drv, size) == bytes(model)
        await ctx.close_all(drv)

    asyncio.run(main())


def test_refcount_table_growth(tmp_path: Path) -> None:
    async def main() -> None:
        # 512-byte clusters, 64-bit refcounts: one refcount block covers 64 clusters and the
        # one-cluster table 64 blocks, so 2 MiB of data outgrows the table.
        size = 4 << 20
        img = tmp_path / "g.qcow2"
        await _create(img, size, cluster_size=512, refcount_bits=64)
        drv, ctx = await open_image(str(img))
        data = os.urandom(size)
        for off in range(0, size, 256 << 10):
            await drv.pwritev(off, memoryview(data[off:off + (256 << 10)]), NONE)
        assert drv.header.refcount_table_clusters == 1
        assert drv.refcounts.refcount_table_offset != 512
        await ctx.close_all(drv)
        drv, ctx = await open_image(str(img), read_only=True)
        assert drv.header.refcount_table_clusters > 1
        assert await _read_all(drv, size) == data
        await ctx.close_all(drv)

    asyncio.run(main())


def test_backing_chain_cow(tmp_path: Path) -> None:
    async def main() -> None:
        size = 1 << 20
        base = tmp_path / "base.raw"
        base_data = os.urandom(size - 4096)  # shorter than the overlay: zeros past its end
        base.write_bytes(base_data)
        top = tmp_path / "top.qcow2"
        await _create(top, size, backing_file="base.raw", backing_format="raw")
        drv, ctx = await open_image(str(top))
        assert drv.backing is not None and drv.backing.filename == str(base)
        expected = bytearray(base_data + bytes(4096))
        assert await _read_all(drv, size) == bytes(expected)
        await drv.pwritev(70000 // 512 * 512, memoryview(b"\x55" * 1024), NONE)
        expected[70000 // 512 * 512:70000 // 512 * 512 + 1024] = b"\x55" * 1024
        await drv.pdiscard(0, 65536)  # hides the backing data: reads zeros
        expected[0:65536] = bytes(65536)
        assert await _read_all(drv, size) == bytes(expected)
        st = await drv.block_status(0, size)
        assert st.flags == BlockStatusFlags.ZERO | BlockStatusFlags.ALLOCATED
        st = await drv.block_status(65536, size - 65536)
        assert st.flags & BlockStatusFlags.DATA and st.offset is not None
        st = await drv.block_status(131072, size - 131072)
        assert st.flags == BlockStatusFlags(0)
        assert drv.info().backing_file == "base.raw" and drv.info().backing_format == "raw"
        await ctx.close_all(drv)

    asyncio.run(main())


def test_no_backing_when_null(tmp_path: Path) -> None:
    async def main() -> None:
        (tmp_path / "b.raw").write_bytes(b"\x11" * 65536)
        top = tmp_path / "t.qcow2"
        await _create(top, 65536, backing_file="b.raw", backing_format="raw")
        drv, ctx = await open_image(str(top), backing=None)
        assert drv.backing is None
        assert await _read_all(drv, 65536) == bytes(65536)
        await ctx.close_all(drv)

    asyncio.run(main())


def test_ordering_refcount_before_l2(tmp_path: Path) -> None:
    async def main() -> None:
        img = tmp_path / "o.qcow2"
        await _create(img, 1 << 20)
        drv, ctx = await open_image(str(img))
        file = ctx.children[0]
        file.writes.clear()
        await drv.pwritev(0, memoryview(b"\1" * 512), NONE)
        await drv.flush_to_os()
        l2_table = drv.l1_table[0] & 0x00FFFFFFFFFFFE00
        offsets = [o for o, _ in file.writes]
        # L2 table allocation: refblock, then the (empty) table, then the L1 entry; data and
        # COW, then refblock again before the final L2 table write.
        assert offsets.index(0x20000) < offsets.index(l2_table) < offsets.index(0x30000)
        last_l2 = len(offsets) - 1 - offsets[::-1].index(l2_table)
        assert offsets.index(0x50000) < last_l2
        await ctx.close_all(drv)

    asyncio.run(main())


def test_lazy_refcounts_dirty_bit(tmp_path: Path) -> None:
    async def main() -> None:
        img = tmp_path / "l.qcow2"
        await _create(img, 1 << 20, lazy_refcounts=True)
        drv, ctx = await open_image(str(img))
        await drv.pwritev(0, memoryview(b"\1" * 512), NONE)
        with open(img, "rb") as f:
            f.seek(72)
            assert struct.unpack(">Q", f.read(8))[0] & 1
        await ctx.close_all(drv)
        with open(img, "rb") as f:
            f.seek(72)
            assert struct.unpack(">Q", f.read(8))[0] & 1 == 0

    asyncio.run(main())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cache-size": 1 << 20, "l2-cache-size": 1 << 20, "refcount-cache-size": 65536},
         "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"),
        ({"l2-cache-entry-size": 1000},
         "L2 cache entry size must be a power of two between 512 and the cluster size (65536)"),
        ({"cache-clean-interval": -1}, "Cache clean interval too big"),
        ({"overlap-check": "zzz"},
         "Unsupported value 'zzz' for qcow2 option 'overlap-check'. Allowed are any of the "
         "following: none, constant, cached, all"),
        ({"overlap-check": "none", "overlap-check.template": "all"},
         "Conflicting values for qcow2 options 'overlap-check' ('none') and "
         "'overlap-check.template' ('all')"),
        ({"encrypt.format": "zzz"},
         "No encryption in image header, but options specified format 'zzz'"),
    ],
)
def test_option_errors(tmp_path: Path, options: dict[str, object], message: str) -> None:
    async def main() -> None:
        img = tmp_path / "e.qcow2"
        await _create(img, 1 << 20)
        with pytest.raises(BlockError) as exc:
            await open_image(str(img), options=options)
        assert str(exc.value) == message

    asyncio.run(main())


def test_lazy_refcounts_v2_rejected(tmp_path: Path) -> None:
    async def main() -> None:
        img = tmp_path / "v2.qcow2"
        await _create(img, 1 << 20, compat="0.10")
        with pytest.raises(BlockError, match="Lazy refcounts require a qcow2 image with at "
                           "least qemu 1.1 compatibility level"):
            await open_image(str(img), options={"lazy-refcounts": True})

    asyncio.run(main())


def test_l2_cache_size_option(tmp_path: Path) -> None:
    async def main() -> None:
        img = tmp_path / "c.qcow2"
        await _create(img, 1 << 30)
        drv, ctx = await open_image(str(img), options={"l2-cache-size": 4 << 16})
        assert drv.l2_cache.capacity == 4
        await ctx.close_all(drv)
        drv, ctx = await open_image(str(img))
        # Default: enough for the whole disk (1 GiB needs 2 tables), at least 2.
        assert drv.l2_cache.capacity == 2
        await ctx.close_all(drv)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cluster_size": 1000}, "Cluster size must be a power of two between 512 and 2048k"),
        ({"refcount_bits": 3},
         "Refcount width must be a power of two and may not exceed 64 bits"),
        ({"extended_l2": True, "cluster_size": 8192},
         "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"),
        ({"compat": "x"}, "Parameter 'version' does not accept value 'x'"),
        ({"backing_format": "raw"}, "Backing format cannot be used without backing file"),
        ({"compat": "0.10", "lazy_refcounts": True},
         "Lazy refcounts only supported with compatibility level 1.1 and above (use "
         "version=v3 or greater)"),
    ],
)
def test_create_errors(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    async def main() -> None:
        with pytest.raises(BlockError) as exc:
            await _create(tmp_path / "x.qcow2", 1 << 20, **kwargs)
        assert str(exc.value) == message

    asyncio.run(main())
