"""qcow2 against the real qemu-img / qemu-io 7.2: reading their images, their checking ours."""

from __future__ import annotations

import asyncio
import os
import random
import re
import struct
import sys
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parents[2]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.filechild import FileChild, open_image  # noqa: E402
from tests.support.oracle import require_qemu, run  # noqa: E402

from blockgraph.drivers.base import RequestFlags  # noqa: E402
from blockgraph.drivers.qcow2 import qcow2_create  # noqa: E402
from blockgraph.errors import BlockError  # noqa: E402

NONE = RequestFlags.NONE


@pytest.fixture(autouse=True)
def _oracles() -> None:
    require_qemu()


async def _read_all(path: Path) -> bytes:
    drv, ctx = await open_image(str(path), read_only=True)
    try:
        buf = bytearray(drv.getlength())
        # Odd-sized chunks: runs that start and end inside clusters and L2 tables.
        chunk = 3 * 65536 + 512 * 7
        for off in range(0, len(buf), chunk):
            view = memoryview(buf)[off:off + chunk]
            await drv.preadv(off, view, NONE)
        return bytes(buf)
    finally:
        await ctx.close_all(drv)


def _qemu_raw(path: Path, tmp: Path) -> bytes:
    out = tmp / (path.name + ".raw")
    run("qemu-img", "convert", "-O", "raw", str(path), str(out))
    return out.read_bytes()


QEMU_IO_SCRIPTS = [
    ["write -P 0xab 0 64k", "write -P 0xcd 100k 10k", "write -z 1M 64k", "write -P 1 2M 1M",
     "discard 2M 64k"],
    ["write -P 0x11 512 512", "write -P 0x22 3M 1", "write -P 0x33 4095k 1k"],
]


@pytest.mark.parametrize("create_opts", ["cluster_size=65536", "cluster_size=512",
                                         "compat=0.10", "refcount_bits=1,cluster_size=4096",
                                         "extended_l2=on", "cluster_size=2M"])
@pytest.mark.parametrize("script", range(len(QEMU_IO_SCRIPTS)))
def test_read_qemu_images(tmp_path: Path, create_opts: str, script: int) -> None:
    img = tmp_path / "q.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", create_opts, str(img), "4M")
    args = [a for cmd in QEMU_IO_SCRIPTS[script] for a in ("-c", cmd)]
    run("qemu-io", *args, str(img))
    assert asyncio.run(_read_all(img)) == _qemu_raw(img, tmp_path)


def test_read_compressed(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    rng = random.Random(3)
    data = bytearray()
    for _ in range(40):
        data += bytes([rng.randrange(4)]) * 50000 + os.urandom(1000)
    data += bytes((-len(data)) % 512)
    src.write_bytes(data)
    img = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", str(src), str(img))
    assert asyncio.run(_read_all(img)) == bytes(data)


def test_read_backing_chain_and_snapshot(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    mid = tmp_path / "mid.qcow2"
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "2M")
    run("qemu-io", "-c", "write -P 1 0 2M", str(base))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(mid),
        "3M")
    run("qemu-io", "-c", "write -P 2 64k 64k", "-c", "write -z 256k 64k", str(mid))
    run("qemu-img", "snapshot", "-c", "snap", str(mid))
    run("qemu-io", "-c", "write -P 4 64k 4k", str(mid))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", str(top), "4M")
    run("qemu-io", "-c", "write -P 3 100k 1k", str(top))
    assert asyncio.run(_read_all(top)) == _qemu_raw(top, tmp_path)


async def _random_writes(path: Path, model: bytearray, seed: int, n: int) -> None:
    rng = random.Random(seed)
    drv, ctx = await open_image(str(path))
    size = len(model)
    try:
        for _ in range(n):
            off = rng.randrange(0, size // 512) * 512
            length = min(rng.randrange(1, 300) * 512, size - off)
            op = rng.random()
            if op < 0.7:
                data = os.urandom(16) * (length // 16)
                await drv.pwritev(off, memoryview(data), NONE)
                model[off:off + length] = data
            elif op < 0.85:
                flags = RequestFlags.MAY_UNMAP if rng.random() < 0.5 else NONE
                try:
                    await drv.pwrite_zeroes(off, length, flags)
                except Exception:
                    await drv.pwritev(off, memoryview(bytes(length)), NONE)
                model[off:off + length] = bytes(length)
            else:
                await drv.pdiscard(off, length)
                cs = drv.cluster_size
                start = -(-off // cs) * cs
                end = (off + length) // cs * cs
                if end > start:
                    # Discarded clusters read as zeros here (v3 or no backing).
                    model[start:end] = bytes(end - start)
            if rng.random() < 0.1:
                await drv.flush_to_os()
    finally:
        await ctx.close_all(drv)


def _check_clean(path: Path) -> None:
    r = run("qemu-img", "check", str(path), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No errors were found on the image." in r.stdout


@pytest.mark.parametrize("create_opts", [{}, {"cluster_size": 512}, {"compat": "0.10"},
                                         {"refcount_bits": 1, "cluster_size": 1024},
                                         {"refcount_bits": 64, "cluster_size": 512},
                                         {"lazy_refcounts": True}])
def test_written_images_check_and_compare(tmp_path: Path, create_opts: dict[str, object]) -> None:
    size = 6 << 20
    img = tmp_path / "w.qcow2"

    async def main() -> bytearray:
        img.write_bytes(b"")
        f = FileChild(str(img))
        await qcow2_create(f, size, **create_opts)  # type: ignore[arg-type]
        f.close()
        model = bytearray(size)
        await _random_writes(img, model, 7, 150)
        await _random_writes(img, model, 8, 50)
        return model

    model = asyncio.run(main())
    _check_clean(img)
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    r = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(img), str(raw), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert asyncio.run(_read_all(img)) == bytes(model)


def test_overlay_written_by_driver(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M")
    run("qemu-io", "-c", "write -P 0x5a 0 4M", str(base))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))

    async def main() -> None:
        drv, ctx = await open_image(str(top))
        await drv.pwritev(1000 * 512, memoryview(b"\1" * 4096), NONE)  # COW head and tail
        await drv.pdiscard(2 << 20, 128 << 10)  # zero clusters hide the backing data
        await drv.pwrite_zeroes(3 << 20, 64 << 10, NONE)
        await ctx.close_all(drv)

    asyncio.run(main())
    _check_clean(top)
    expected = bytearray(b"\x5a" * (4 << 20))
    expected[1000 * 512:1000 * 512 + 4096] = b"\1" * 4096
    expected[2 << 20:(2 << 20) + (128 << 10)] = bytes(128 << 10)
    expected[3 << 20:(3 << 20) + (64 << 10)] = bytes(64 << 10)
    raw = tmp_path / "exp.raw"
    raw.write_bytes(expected)
    r = run("qemu-img", "compare", "-F", "raw", str(top), str(raw), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    m = run("qemu-img", "map", "--output=json", str(top)).stdout
    assert '"zero": true' in m


def test_write_over_snapshot_cow(tmp_path: Path) -> None:
    img = tmp_path / "s.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M")
    run("qemu-io", "-c", "write -P 7 0 1M", str(img))
    run("qemu-img", "snapshot", "-c", "s1", str(img))

    async def main() -> None:
        drv, ctx = await open_image(str(img))
        await drv.pwritev(4096, memoryview(b"\2" * 512), NONE)
        await ctx.close_all(drv)

    asyncio.run(main())
    _check_clean(img)
    data = bytearray(b"\7" * (1 << 20))
    data[4096:4608] = b"\2" * 512
    assert _qemu_raw(img, tmp_path) == bytes(data)
    run("qemu-img", "snapshot", "-a", "s1", str(img))
    assert _qemu_raw(img, tmp_path) == b"\7" * (1 << 20)


CREATE_CASES = [
    ({}, 0), ({}, 1 << 20), ({}, 16 << 20), ({}, 10 << 30),
    ({"cluster_size": 512}, 1 << 20), ({"cluster_size": 2 << 20}, 1 << 30),
    ({"cluster_size": 4096}, 1 << 20), ({"cluster_size": 8192}, 1 << 20),
    ({"compat": "0.10"}, 1 << 20), ({"compat": "v3"}, 1 << 20),
    ({"refcount_bits": 1}, 1 << 20), ({"refcount_bits": 64}, 1 << 20),
    ({"lazy_refcounts": True}, 1 << 20), ({"extended_l2": True}, 1 << 20),
    ({"compression_type": "zstd"}, 1 << 20),
    ({"backing_file": "a.qcow2", "backing_format": "qcow2"}, 1 << 20),
    ({"backing_file": "/abs/b.raw", "backing_format": "raw", "cluster_size": 512}, 1 << 20),
    ({"preallocation": "metadata"}, 16 << 20),
    ({"preallocation": "metadata", "cluster_size": 4096}, 1 << 20),
    ({"preallocation": "metadata", "extended_l2": True}, 4 << 20),
    ({}, 1536 * 1024 + 512),
]


def _qemu_create_args(opts: dict[str, object]) -> list[str]:
    args: list[str] = []
    o: list[str] = []
    for k, v in opts.items():
        if k == "backing_file":
            args += ["-b", str(v), "-u"]
        elif k == "backing_format":
            args += ["-F", str(v)]
        else:
            o.append(f"{k}={'on' if v is True else v}")
    if o:
        args += ["-o", ",".join(o)]
    return args


@pytest.mark.parametrize(("opts", "size"), CREATE_CASES)
def test_create_byte_identical(tmp_path: Path, opts: dict[str, object], size: int) -> None:
    ours = tmp_path / "ours.qcow2"
    ref = tmp_path / "ref.qcow2"

    async def main() -> None:
        ours.write_bytes(b"")
        f = FileChild(str(ours))
        try:
            await qcow2_create(f, size, **opts)  # type: ignore[arg-type]
        finally:
            f.close()

    asyncio.run(main())
    run("qemu-img", "create", "-q", "-f", "qcow2", *_qemu_create_args(opts), str(ref), str(size))
    r = run("cmp", str(ours), str(ref), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("incompat", [1 << 20, (1 << 20) | (1 << 40)])
def test_unknown_feature_message_matches_qemu(tmp_path: Path, incompat: int) -> None:
    img = tmp_path / "f.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M")
    with open(img, "r+b") as f:
        f.seek(72)
        f.write(struct.pack(">Q", incompat))
    r = run("qemu-io", "-c", "read 0 512", str(img), check=False)
    m = re.search(r"can't open device [^:]+: (.*)", r.stderr)
    assert m is not None

    async def main() -> str:
        with pytest.raises(BlockError) as exc:
            await open_image(str(img), read_only=True)
        return str(exc.value)

    assert asyncio.run(main()) == m.group(1)
