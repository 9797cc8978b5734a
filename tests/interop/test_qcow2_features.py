"""qcow2 features against qemu-img / qemu-io 7.2: compression, snapshots, bitmaps, extended L2,
preallocation, refcount widths, resize. qemu-img's images read back identically; ours pass
``qemu-img check`` (no errors, no leaks) and ``qemu-img compare``.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import subprocess
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
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _oracles() -> None:
    require_qemu()


def _mixed_data(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        out += bytes([rng.randrange(4)]) * rng.randrange(1000, 70000) + rng.randbytes(
            rng.randrange(0, 3000))
    return bytes(out[:size])


async def _read_all(path: Path) -> bytes:
    drv, ctx = await open_image(str(path), read_only=True)
    try:
        buf = bytearray(drv.getlength())
        chunk = 3 * 65536 + 512 * 7
        for off in range(0, len(buf), chunk):
            await drv.preadv(off, memoryview(buf)[off:off + chunk], NONE)
        return bytes(buf)
    finally:
        await ctx.close_all(drv)


def _qemu_raw(path: Path, tmp: Path) -> bytes:
    out = tmp / (path.name + ".raw")
    run("qemu-img", "convert", "-O", "raw", str(path), str(out))
    return out.read_bytes()


def _check_clean(path: Path) -> None:
    r = run("qemu-img", "check", str(path), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No errors were found" in r.stdout
    assert "leaked" not in r.stdout


def _compare(path: Path, model: bytes, tmp: Path) -> None:
    raw = tmp / "model.raw"
    raw.write_bytes(model)
    r = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(path), str(raw), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


async def _create(path: Path, size: int, **opts: object) -> None:
    path.write_bytes(b"")
    child = FileChild(str(path))
    try:
        await qcow2_create(child, size, **opts)  # type: ignore[arg-type]
    finally:
        child.close()


# ------------------------------------------------------------------ qemu-img's images, read back

@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cluster_size", ["512", "4096", "65536"])
def test_read_qemu_compressed(tmp_path: Path, ctype: str, cluster_size: str) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(_mixed_data(3 << 20, 7))
    img = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o",
        f"compression_type={ctype},cluster_size={cluster_size}", str(src), str(img))
    assert asyncio.run(_read_all(img)) == src.read_bytes()


@pytest.mark.parametrize("create_opts", [
    "extended_l2=on", "extended_l2=on,cluster_size=16k", "preallocation=metadata",
    "preallocation=falloc", "preallocation=full", "refcount_bits=1", "refcount_bits=2",
    "refcount_bits=8", "refcount_bits=64", "lazy_refcounts=on",
])
def test_read_qemu_feature_images(tmp_path: Path, create_opts: str) -> None:
    img = tmp_path / "f.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", create_opts, str(img), "3M")
    run("qemu-io", "-c", "write -P 0xab 0 70k", "-c", "write -P 0xcd 1000k 3k",
        "-c", "write -z 2M 64k", "-c", "write -P 7 2100k 100k", "-c", "discard 2100k 64k",
        str(img))
    assert asyncio.run(_read_all(img)) == _qemu_raw(img, tmp_path)


def test_read_qemu_snapshots_and_bitmaps(tmp_path: Path) -> None:
    img = tmp_path / "s.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "2M")
    run("qemu-io", "-c", "write -P 1 0 1M", str(img))
    run("qemu-img", "snapshot", "-c", "one", str(img))
    run("qemu-io", "-c", "write -P 2 64k 64k", "-c", "write -c -P 3 1M 64k", str(img))
    run("qemu-img", "snapshot", "-c", "two", str(img))
    run("qemu-io", "-c", "write -P 4 0 4k", str(img))
    run("qemu-img", "bitmap", "--add", str(img), "bm0")
    assert asyncio.run(_read_all(img)) == _qemu_raw(img, tmp_path)

    async def snapshots() -> list[tuple[str, str]]:
        drv, ctx = await open_image(str(img), read_only=True)
        try:
            return [(s.id_str, s.name) for s in drv.snapshot_list()]
        finally:
            await ctx.close_all(drv)

    assert asyncio.run(snapshots()) == [("1", "one"), ("2", "two")]


# ------------------------------------------------------------------ our images, qemu-img checks

@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("opts", [{"cluster_size": 65536}, {"cluster_size": 512},
                                  {"cluster_size": 4096, "refcount_bits": 1},
                                  {"cluster_size": 16384, "extended_l2": True},
                                  {"cluster_size": 2 << 20}])
def test_compressed_writes(tmp_path: Path, ctype: str, opts: dict[str, object]) -> None:
    img = tmp_path / "c.qcow2"
    size = 8 << 20 if opts["cluster_size"] == 2 << 20 else (1 << 20) + 512 * 3
    model = bytearray(size)

    async def main() -> None:
        await _create(img, size, compression_type=ctype, **opts)
        drv, ctx = await open_image(str(img))
        cs = drv.cluster_size
        try:
            data = _mixed_data(size, 11)
            for i, off in enumerate(range(0, size, cs)):
                if i % 4 == 3:
                    continue
                n = min(cs, size - off)
                piece = os.urandom(n) if i % 5 == 0 else data[off:off + n]
                await drv.pwritev(off, memoryview(piece), RequestFlags.COMPRESSED)
                model[off:off + n] = piece
            # Compression never overwrites an allocated cluster (QEMU: EIO).
            with pytest.raises(IOFailure):
                await drv.pwritev(0, memoryview(bytes(cs)), RequestFlags.COMPRESSED)
            # Normal writes over compressed clusters (the partial one needs COW).
            await drv.pwritev(cs + 512, memoryview(b"\x55" * 1024), NONE)
            model[cs + 512:cs + 1536] = b"\x55" * 1024
            await drv.pdiscard(cs * 2, cs)
            model[cs * 2:cs * 3] = bytes(cs)
        finally:
            await ctx.close_all(drv)

    asyncio.run(main())
    _check_clean(img)
    _compare(img, bytes(model), tmp_path)
    assert asyncio.run(_read_all(img)) == bytes(model)


def test_compressed_uses_packing_and_header_type(tmp_path: Path) -> None:
    img = tmp_path / "c.qcow2"

    async def main() -> None:
        await _create(img, 1 << 20, compression_type="zstd")
        drv, ctx = await open_image(str(img))
        try:
            for off in range(0, 1 << 20, 65536):
                await drv.pwritev(off, memoryview(bytes([off >> 16]) * 65536),
                                  RequestFlags.COMPRESSED)
        finally:
            await ctx.close_all(drv)

    asyncio.run(main())
    _check_clean(img)
    # Sixteen tiny compressed clusters share one host cluster.
    r = run("qemu-img", "check", str(img))
    assert "100.00% compressed" in r.stdout
    assert os.path.getsize(img) <= 6 * 65536
    info = run("qemu-img", "info", str(img)).stdout
    assert "compression type: zstd" in info


@pytest.mark.parametrize("mode", ["off", "metadata", "falloc", "full"])
@pytest.mark.parametrize("opts", [{}, {"cluster_size": 512}, {"extended_l2": True},
                                  {"compat": "0.10"}])
def test_create_preallocation(tmp_path: Path, mode: str, opts: dict[str, object]) -> None:
    img = tmp_path / "p.qcow2"
    asyncio.run(_create(img, 3 << 20, preallocation=mode, **opts))
    _check_clean(img)
    _compare(img, bytes(3 << 20), tmp_path)
    if mode in ("falloc", "full"):
        assert os.stat(img).st_blocks * 512 >= 3 << 20


@pytest.mark.parametrize("mode", ["off", "metadata", "falloc", "full"])
@pytest.mark.parametrize("cluster_size", [512, 65536])
def test_resize(tmp_path: Path, mode: str, cluster_size: int) -> None:
    img = tmp_path / "r.qcow2"
    model = bytearray(1 << 20)

    async def main() -> None:
        await _create(img, 1 << 20, cluster_size=cluster_size)
        drv, ctx = await open_image(str(img))
        try:
            data = _mixed_data(1 << 20, 5)
            await drv.pwritev(0, memoryview(data), NONE)
            model[:] = data
            await drv.truncate((1 << 20) - 1536)  # shrink into a cluster
            del model[(1 << 20) - 1536:]
            await drv.truncate(40 << 20, mode)  # grow: the L1 table moves
            model.extend(bytes((40 << 20) - len(model)))
            await drv.pwritev(39 << 20, memoryview(b"\x77" * 4096), NONE)
            model[39 << 20:(39 << 20) + 4096] = b"\x77" * 4096
        finally:
            await ctx.close_all(drv)

    asyncio.run(main())
    _check_clean(img)
    _compare(img, bytes(model), tmp_path)
    info = run("qemu-img", "info", str(img)).stdout
    assert f"({40 << 20} bytes)" in info

    async def shrink() -> None:
        drv, ctx = await open_image(str(img))
        try:
            await drv.truncate(512 << 10)
        finally:
            await ctx.close_all(drv)

    size_before = os.path.getsize(img)
    asyncio.run(shrink())
    _check_clean(img)
    _compare(img, bytes(model[:512 << 10]), tmp_path)
    assert os.path.getsize(img) < size_before


def test_resize_refuses_like_qemu(tmp_path: Path) -> None:
    img = tmp_path / "r.qcow2"

    async def main() -> list[str]:
        await _create(img, 1 << 20)
        drv, ctx = await open_image(str(img))
        errors = []
        try:
            for length, mode in ((1000, "off"), (512 << 10, "full"), (2 << 20, "bogus")):
                try:
                    await drv.truncate(length, mode)
                except Exception as exc:
                    errors.append(str(exc))
        finally:
            await ctx.close_all(drv)
        return errors

    assert asyncio.run(main()) == [
        "The new size must be a multiple of 512",
        "Preallocation can't be used for shrinking an image",
        "Unsupported preallocation mode 'bogus'",
    ]


@pytest.mark.parametrize("opts", [{}, {"cluster_size": 512}, {"compat": "0.10"},
                                  {"refcount_bits": 4, "cluster_size": 4096},
                                  {"extended_l2": True}])
def test_snapshots_written_by_us(tmp_path: Path, opts: dict[str, object]) -> None:
    img = tmp_path / "s.qcow2"
    size = 2 << 20
    states: dict[str, bytes] = {}
    model = bytearray(size)

    async def main() -> None:
        await _create(img, size, **opts)
        drv, ctx = await open_image(str(img))
        try:
            await drv.pwritev(0, memoryview(b"\x01" * (1 << 20)), NONE)
            model[:1 << 20] = b"\x01" * (1 << 20)
            await drv.snapshot_create("one")
            states["one"] = bytes(model)
            await drv.pwritev(64 << 10, memoryview(b"\x02" * 8192), NONE)
            model[64 << 10:(64 << 10) + 8192] = b"\x02" * 8192
            await drv.pdiscard(1 << 19, 1 << 19)
            model[1 << 19:1 << 20] = bytes(1 << 19)
            await drv.snapshot_create("two")
            states["two"] = bytes(model)
            if drv.header.version >= 3:  # QEMU: "Can't resize a v2 image which has snapshots"
                await drv.truncate(3 << 20)
                model.extend(bytes(1 << 20))
            await drv.pwritev(0, memoryview(b"\x03" * 4096), NONE)
            model[:4096] = b"\x03" * 4096
        finally:
            await ctx.close_all(drv)

    asyncio.run(main())
    _check_clean(img)
    _compare(img, bytes(model), tmp_path)
    listing = run("qemu-img", "snapshot", "-l", str(img)).stdout
    assert re.search(r"^1 +one ", listing, re.M) and re.search(r"^2 +two ", listing, re.M)

    # qemu-img applies our snapshots; we apply them and qemu-io sees the data.
    work = tmp_path / "w.qcow2"
    work.write_bytes(img.read_bytes())
    run("qemu-img", "snapshot", "-a", "one", str(work))
    assert asyncio.run(_read_all(work)) == states["one"]

    async def apply(name: str) -> None:
        drv, ctx = await open_image(str(img))
        try:
            await drv.snapshot_goto(name)
        finally:
            await ctx.close_all(drv)

    asyncio.run(apply("two"))
    _check_clean(img)
    _compare(img, states["two"], tmp_path)
    r = run("qemu-io", "-c", "read -P 1 0 64k", "-c", "read -P 0 512k 512k", str(img),
            check=False)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout
    asyncio.run(apply("one"))
    r = run("qemu-io", "-c", "read -P 1 0 1M", str(img), check=False)
    assert "Pattern verification failed" not in r.stdout, r.stdout

    async def delete() -> None:
        drv, ctx = await open_image(str(img))
        try:
            await drv.snapshot_delete(None, "one")
            await drv.snapshot_delete(None, "two")
        finally:
            await ctx.close_all(drv)

    asyncio.run(delete())
    _check_clean(img)
    _compare(img, states["one"], tmp_path)
    assert run("qemu-img", "snapshot", "-l", str(img)).stdout == ""


def _blockgraph(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blockgraph.tools.main", *args],
                          capture_output=True, text=True, cwd=str(ROOT),
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


_DATE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def test_img_snapshot_cli_matches_qemu(tmp_path: Path) -> None:
    ours = tmp_path / "ours.qcow2"
    ref = tmp_path / "ref.qcow2"
    for img in (ours, ref):
        run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M")
        run("qemu-io", "-c", "write -P 9 0 128k", str(img))
    names = ["first", "first", "a_very_long_snapshot_name_beyond_the_column", "x"]
    for name in names:
        r = _blockgraph("img", "snapshot", "-c", name, str(ours))
        assert r.returncode == 0, r.stderr
        run("qemu-img", "snapshot", "-c", name, str(ref))
    _check_clean(ours)
    mine = _blockgraph("img", "snapshot", "-l", str(ours)).stdout
    theirs = run("qemu-img", "snapshot", "-l", str(ref)).stdout
    assert _DATE.sub("DATE", mine) == _DATE.sub("DATE", theirs)
    # Our listing of qemu-img's image, and qemu-img's of ours.
    assert _DATE.sub("DATE", _blockgraph("img", "snapshot", "-l", str(ref)).stdout) == \
        _DATE.sub("DATE", theirs)
    assert _DATE.sub("DATE", run("qemu-img", "snapshot", "-l", str(ours)).stdout) == \
        _DATE.sub("DATE", theirs)

    run("qemu-io", "-c", "write -P 8 0 64k", str(ours))
    assert _blockgraph("img", "snapshot", "-a", "x", str(ours)).returncode == 0
    r = run("qemu-io", "-c", "read -P 9 0 128k", str(ours))
    assert "Pattern verification failed" not in r.stdout
    assert _blockgraph("img", "snapshot", "-d", "first", str(ours)).returncode == 0
    run("qemu-img", "snapshot", "-d", "first", str(ref))
    assert _DATE.sub("DATE", _blockgraph("img", "snapshot", "-l", str(ours)).stdout) == \
        _DATE.sub("DATE", run("qemu-img", "snapshot", "-l", str(ref)).stdout)
    _check_clean(ours)

    for args in (["-d", "nope"], ["-a", "nope"], ["-l", "-c", "y"]):
        mine_r = _blockgraph("img", "snapshot", *args, str(ours))
        ref_r = run("qemu-img", "snapshot", *args, str(ref), check=False)
        assert mine_r.returncode == ref_r.returncode
        assert mine_r.stderr.replace("blockgraph-img", "qemu-img") == ref_r.stderr


@pytest.mark.parametrize("cluster_size", [16384, 65536])
@pytest.mark.parametrize("with_backing", [False, True])
def test_extended_l2_writes(tmp_path: Path, cluster_size: int, with_backing: bool) -> None:
    """Subcluster writes, COW per subcluster, discards, over a backing file or not."""
    size = 2 << 20
    base = tmp_path / "base.qcow2"
    img = tmp_path / "x.qcow2"
    model = bytearray(size)
    if with_backing:
        run("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(size))
        run("qemu-io", "-c", "write -P 0x11 0 2M", str(base))
        model[:] = b"\x11" * size
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", "-o",
            f"extended_l2=on,cluster_size={cluster_size}", str(img))
    else:
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
            f"extended_l2=on,cluster_size={cluster_size}", str(img), str(size))
    rng = random.Random(cluster_size + with_backing)

    async def main() -> None:
        drv, ctx = await open_image(str(img))
        try:
            for step in range(60):
                off = rng.randrange(size // 512) * 512
                length = min(rng.randrange(1, 80) * 512, size - off)
                op = rng.random()
                if op < 0.75:
                    data = bytes([step + 1]) * length
                    await drv.pwritev(off, memoryview(data), NONE)
                    model[off:off + length] = data
                elif op < 0.9:
                    await drv.pwritev(off, memoryview(bytes(length)), NONE)
                    model[off:off + length] = bytes(length)
                else:
                    await drv.pdiscard(off, length)
                    cs = drv.cluster_size
                    start = -(-off // cs) * cs
                    end = (off + length) // cs * cs
                    if end > start:
                        model[start:end] = bytes(end - start)
                if step == 30:
                    await drv.snapshot_create("mid")
        finally:
            await ctx.close_all(drv)

    asyncio.run(main())
    _check_clean(img)
    assert asyncio.run(_read_all(img)) == bytes(model)
    assert _qemu_raw(img, tmp_path) == bytes(model)


# ------------------------------------------------------------------ amend

@pytest.mark.parametrize("opts", ["compat=0.10,refcount_bits=8", "refcount_bits=3",
                                  "cluster_size=4096", "compat=0.10,lazy_refcounts=on",
                                  "bogus=1", "compat=2.0", "lazy_refcounts=maybe"])
def test_img_amend_errors_match_qemu(tmp_path: Path, opts: str) -> None:
    ours = tmp_path / "ours.qcow2"
    ref = tmp_path / "ref.qcow2"
    for img in (ours, ref):
        run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M")
    mine = _blockgraph("img", "amend", "-f", "qcow2", "-o", opts, str(ours))
    theirs = run("qemu-img", "amend", "-f", "qcow2", "-o", opts, str(ref), check=False)
    assert mine.returncode == theirs.returncode == 1
    assert mine.stderr.replace("blockgraph-img", "qemu-img") == theirs.stderr
    assert ours.read_bytes() == ref.read_bytes()


def test_img_amend_changes(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "2M")
    run("qemu-io", "-c", "write -P 1 0 300k", "-c", "write -z 400k 64k",
        "-c", "write -c -P 2 768k 64k", str(img))
    run("qemu-img", "snapshot", "-c", "s", str(img))
    run("qemu-io", "-c", "write -P 3 0 64k", str(img))
    want = _qemu_raw(img, tmp_path)
    for opts, key, value in (("refcount_bits=4", "refcount bits", "4"),
                             ("refcount_bits=64", "refcount bits", "64"),
                             ("refcount_bits=16", "refcount bits", "16"),
                             ("lazy_refcounts=on", "lazy refcounts", "true"),
                             ("lazy_refcounts=off", "lazy refcounts", "false"),
                             ("size=3M", "virtual size", "3 MiB")):
        r = _blockgraph("img", "amend", "-f", "qcow2", "-o", opts, str(img))
        assert r.returncode == 0, r.stderr
        _check_clean(img)
        assert f"{key}: {value}" in run("qemu-img", "info", str(img)).stdout
    assert _qemu_raw(img, tmp_path) == want + bytes(1 << 20)
    r = _blockgraph("img", "amend", "-f", "qcow2", "-o", "refcount_bits=1", str(img))
    theirs = run("qemu-img", "amend", "-f", "qcow2", "-o", "refcount_bits=1", str(img),
                 check=False)
    assert r.returncode == theirs.returncode == 1
    assert r.stderr.replace("blockgraph-img", "qemu-img") == theirs.stderr


def test_img_amend_downgrade_and_upgrade(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M")
    run("qemu-io", "-c", "write -P 5 0 128k", "-c", "write -z 64k 64k", "-c", "write -z 512k 64k",
        str(img))
    want = _qemu_raw(img, tmp_path)
    assert _blockgraph("img", "amend", "-f", "qcow2", "-o", "compat=0.10", str(img)).returncode == 0
    _check_clean(img)
    assert "compat: 0.10" in run("qemu-img", "info", str(img)).stdout
    assert _qemu_raw(img, tmp_path) == want
    assert _blockgraph("img", "amend", "-f", "qcow2", "-o", "compat=1.1", str(img)).returncode == 0
    _check_clean(img)
    assert "compat: 1.1" in run("qemu-img", "info", str(img)).stdout
    assert _qemu_raw(img, tmp_path) == want
    for opts in ("extended_l2=on", "refcount_bits=8"):
        other = tmp_path / "o.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(other), "1M")
        mine = _blockgraph("img", "amend", "-f", "qcow2", "-o", "compat=0.10", str(other))
        theirs = run("qemu-img", "amend", "-f", "qcow2", "-o", "compat=0.10", str(other),
                     check=False)
        assert mine.returncode == theirs.returncode == 1
        assert mine.stderr.replace("blockgraph-img", "qemu-img") == theirs.stderr
