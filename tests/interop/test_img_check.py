"""``blockgraph img check`` against ``qemu-img check`` 7.2 on damaged and healthy images.

Images are made with the real qemu-img/qemu-io, then damaged by editing bytes. Each case runs
both tools on copies of the same file (our ``blockgraph`` behind a symlink named ``qemu-img``,
so the program name in messages is the same) and compares stdout, stderr and the exit status,
for the plain report, ``--output=json`` and both repair modes; a repaired image must then pass
the real ``qemu-img check`` exactly as QEMU's repaired copy does.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parents[2]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.oracle import require_qemu, run  # noqa: E402

BLOCKGRAPH = Path(sys.executable).with_name("blockgraph")
MB = 1 << 20
CS = 65536
REFBLOCK = 2 * CS  # where a fresh 64 KiB-cluster image keeps its refcount block
L1 = 3 * CS


@pytest.fixture(autouse=True)
def _oracles() -> None:
    require_qemu()


def _poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _peek_u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int(struct.unpack(">Q", f.read(8))[0])


def _base(path: Path, *cmds: str, opts: str = "") -> None:
    create = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if opts:
        create += ["-o", opts]
    run(*create, str(path), "64M")
    if cmds:
        run("qemu-io", *[a for c in cmds for a in ("-c", c)], str(path))


def _l2(path: Path) -> int:
    return _peek_u64(path, L1) & 0x00FFFFFFFFFFFE00


def healthy(p: Path) -> None:
    _base(p, "write -P 1 0 128k", "write -P 2 1M 64k", "write -P 3 40M 64k")


def leak_and_corruption(p: Path) -> None:
    healthy(p)
    _poke(p, REFBLOCK + 2 * 4, struct.pack(">H", 2))  # L2 table: refcount 2 (leak + COPIED)
    _poke(p, REFBLOCK + 2 * 6, struct.pack(">H", 0))  # data cluster: refcount 0


def unreferenced(p: Path) -> None:
    healthy(p)
    l2 = _l2(p)
    _poke(p, l2 + 8 * 16, bytes(8))  # forget the cluster at 1M: leaked


def too_low(p: Path) -> None:
    healthy(p)
    _poke(p, REFBLOCK + 2 * 5, struct.pack(">H", 0))


def misaligned_data(p: Path) -> None:
    healthy(p)
    l2 = _l2(p)
    entry = _peek_u64(p, l2 + 8)
    _poke(p, l2 + 8, struct.pack(">Q", entry | 0x200))


def misaligned_prealloc_zero(p: Path) -> None:
    _base(p, "write -P 1 0 128k", "write -z 0 64k")
    l2 = _l2(p)
    entry = _peek_u64(p, l2)
    _poke(p, l2, struct.pack(">Q", entry | 0x400))


def reserved_l1_bits(p: Path) -> None:
    healthy(p)
    _poke(p, L1, struct.pack(">Q", _peek_u64(p, L1) | 0x100))


def reserved_l2_bits(p: Path) -> None:
    healthy(p)
    l2 = _l2(p)
    _poke(p, l2, struct.pack(">Q", _peek_u64(p, l2) | 0x2))


def beyond_eof(p: Path) -> None:
    healthy(p)
    l2 = _l2(p)
    _poke(p, l2 + 8 * 100, struct.pack(">Q", (1 << 63) | (200 * CS)))


def copied_flag_wrong(p: Path) -> None:
    healthy(p)
    l2 = _l2(p)
    _poke(p, l2, struct.pack(">Q", _peek_u64(p, l2) & ~(1 << 63)))


def refblock_outside(p: Path) -> None:
    healthy(p)
    _poke(p, CS + 8, struct.pack(">Q", 500 * CS))  # a second refcount block past the end


def dirty_lazy(p: Path) -> None:
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(p), "64M")
    subprocess.run(["qemu-io", "-c", "write -P 7 0 192k", "-c", "abort", str(p)],
                   capture_output=True)


def snapshots(p: Path) -> None:
    healthy(p)
    run("qemu-img", "snapshot", "-c", "s1", str(p))
    run("qemu-io", "-c", "write -P 9 0 64k", "-c", "write -P 8 2M 64k", str(p))
    run("qemu-img", "snapshot", "-c", "s2", str(p))
    run("qemu-io", "-c", "write -P 6 64k 64k", str(p))


def snapshot_leak(p: Path) -> None:
    snapshots(p)
    l2 = _l2(p)
    # The active L2 table's first data cluster is shared with s1/s2: drop one reference.
    off = _peek_u64(p, l2 + 8 * 32) & 0x00FFFFFFFFFFFE00
    _poke(p, REFBLOCK + 2 * (off // CS), struct.pack(">H", 5))


def compressed(p: Path) -> None:
    raw = p.with_suffix(".raw")
    data = bytearray()
    for i in range(24):
        data += bytes([i]) * 30000 + os.urandom(2000) + bytes(32768 - 32000)
    raw.write_bytes(bytes(data))
    run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(p))
    run("qemu-io", "-c", "write -P 3 64k 64k", str(p))


def compressed_refcount_low(p: Path) -> None:
    compressed(p)
    _poke(p, REFBLOCK + 2 * 5, struct.pack(">H", 1))


def small_clusters(p: Path) -> None:
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=1",
        str(p), "4M")
    run("qemu-io", "-c", "write -P 1 0 3k", "-c", "write -P 2 1M 512", str(p))
    _poke(p, 0x400, bytes([0xFF]))  # refcount bits of clusters 0-7 all set: leaks


def v2_image(p: Path) -> None:
    _base(p, "write -P 1 0 64k", "write -P 2 3M 64k", opts="compat=0.10")
    _poke(p, REFBLOCK + 2 * 9, struct.pack(">H", 3))


MAKERS: dict[str, Callable[[Path], None]] = {
    f.__name__: f for f in (
        healthy, leak_and_corruption, unreferenced, too_low, misaligned_data,
        misaligned_prealloc_zero, reserved_l1_bits, reserved_l2_bits, beyond_eof,
        copied_flag_wrong, refblock_outside, dirty_lazy, snapshots, snapshot_leak, compressed,
        compressed_refcount_low, small_clusters, v2_image,
    )
}


# What ``-r all`` repairs completely (QEMU cannot fix misaligned data clusters, reserved bits
# or references past the end of the file either).
REPAIRABLE = {"healthy", "leak_and_corruption", "unreferenced", "too_low",
              "misaligned_prealloc_zero", "copied_flag_wrong", "refblock_outside", "dirty_lazy",
              "snapshots", "snapshot_leak", "compressed", "compressed_refcount_low",
              "small_clusters", "v2_image"}


def _ours(tmp: Path) -> str:
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    link = bindir / "qemu-img"
    if not link.exists():
        link.symlink_to(BLOCKGRAPH)
    return str(link)


def _check(binary: str, args: list[str], cwd: Path) -> tuple[str, str, int]:
    proc = subprocess.run([binary, "check", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=60)
    return proc.stdout, proc.stderr, proc.returncode


@pytest.mark.parametrize("maker", list(MAKERS))
def test_check_matches_qemu(tmp_path: Path, maker: str) -> None:
    src = tmp_path / "img.qcow2"
    MAKERS[maker](src)
    ours = _ours(tmp_path)
    for args in ([], ["--output=json"], ["-q"]):
        theirs = _check("qemu-img", [*args, src.name], tmp_path)
        mine = _check(ours, [*args, src.name], tmp_path)
        assert mine == theirs, args


@pytest.mark.parametrize("mode", ["leaks", "all"])
@pytest.mark.parametrize("maker", list(MAKERS))
def test_repair_matches_qemu(tmp_path: Path, maker: str, mode: str) -> None:
    src = tmp_path / "src.qcow2"
    MAKERS[maker](src)
    ours = _ours(tmp_path)
    results = []
    for name, binary in (("q.qcow2", "qemu-img"), ("o.qcow2", ours)):
        shutil.copy(src, tmp_path / name)
        out, err, rc = _check(binary, ["-r", mode, name], tmp_path)
        after = _check("qemu-img", [name], tmp_path)
        results.append((out, err.replace(name, "IMG"), rc, after[0], after[2]))
    assert results[1] == results[0]
    if mode == "all" and maker in REPAIRABLE:
        assert results[1][-1] == 0


def test_raw_has_no_check(tmp_path: Path) -> None:
    img = tmp_path / "r.raw"
    run("qemu-img", "create", "-q", "-f", "raw", str(img), "1M")
    ours = _ours(tmp_path)
    assert _check(ours, ["r.raw"], tmp_path) == _check("qemu-img", ["r.raw"], tmp_path)
    assert _check(ours, ["r.raw"], tmp_path)[2] == 63


@pytest.mark.parametrize("args", [["-r", "foo", "x"], ["--output=xml", "x"], ["nonexist.qcow2"]])
def test_usage_errors(tmp_path: Path, args: list[str]) -> None:
    ours = _ours(tmp_path)
    assert _check(ours, args, tmp_path) == _check("qemu-img", args, tmp_path)


def test_our_writes_check_clean_and_dirty_repair(tmp_path: Path) -> None:
    """A dirty lazy-refcount image is repaired by our read-write open, as QEMU's is."""
    results = []
    for name, io in (("q.qcow2", "qemu-io"), ("o.qcow2", None)):
        img = tmp_path / name
        dirty_lazy(img)
        if io is None:
            bindir = tmp_path / "bin"
            bindir.mkdir(exist_ok=True)
            link = bindir / "qemu-io"
            if not link.exists():
                link.symlink_to(BLOCKGRAPH)
            io = str(link)
        proc = subprocess.run([io, "-c", "read -P 7 0 192k", name], capture_output=True,
                              text=True, cwd=tmp_path)
        after = _check("qemu-img", [name], tmp_path)
        results.append((proc.stderr, proc.returncode, after))
    assert results[1] == results[0]
    assert results[0][2][2] == 0
