"""Malformed qcow2 images: QEMU's exact error text, never a traceback or a hang.

Each image is crafted by editing the bytes of a qemu-img-made file; the same file is given to
the real ``qemu-io -c 'read 0 512'`` and ``qemu-img info`` and to ours (behind symlinks with the
same names), and stderr, stdout and exit status must agree.
"""

from __future__ import annotations

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
CS = 65536


def _poke(path: Path, offset: int, fmt: str, *values: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def _image(p: Path, *cmds: str, opts: str = "") -> None:
    create = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if opts:
        create += ["-o", opts]
    run(*create, str(p), "4M")
    if cmds:
        run("qemu-io", *[a for c in cmds for a in ("-c", c)], str(p))


def truncated_header(p: Path) -> None:
    _image(p)
    with open(p, "r+b") as f:
        f.truncate(60)


def truncated_v3_header(p: Path) -> None:
    _image(p)
    with open(p, "r+b") as f:
        f.truncate(90)


def bad_magic(p: Path) -> None:
    _image(p)
    _poke(p, 0, ">I", 0x12345678)


def bad_version(p: Path) -> None:
    _image(p)
    _poke(p, 4, ">I", 4)


def cluster_bits_huge(p: Path) -> None:
    _image(p)
    _poke(p, 20, ">I", 30)


def cluster_bits_tiny(p: Path) -> None:
    _image(p)
    _poke(p, 20, ">I", 8)


def l1_size_absurd(p: Path) -> None:
    _image(p)
    _poke(p, 36, ">I", 0x7FFFFFFF)


def l1_too_small(p: Path) -> None:
    _image(p)
    _poke(p, 24, ">Q", 1 << 40)


def l1_beyond_eof(p: Path) -> None:
    _image(p, "write -P 1 0 64k")
    _poke(p, 40, ">Q", 1000 * CS)


def l1_unaligned(p: Path) -> None:
    _image(p)
    _poke(p, 40, ">Q", 3 * CS + 512)


def reftable_clusters_absurd(p: Path) -> None:
    _image(p)
    _poke(p, 56, ">I", 0x100000)


def reftable_zero(p: Path) -> None:
    _image(p)
    _poke(p, 56, ">I", 0)


def reftable_unaligned(p: Path) -> None:
    _image(p)
    _poke(p, 48, ">Q", CS + 8)


def size_absurd(p: Path) -> None:
    _image(p)
    _poke(p, 24, ">Q", 1 << 63)


def refcount_order_absurd(p: Path) -> None:
    _image(p)
    _poke(p, 96, ">I", 7)


def header_length_absurd(p: Path) -> None:
    _image(p)
    _poke(p, 100, ">I", 2 * CS)


def backing_name_too_long(p: Path) -> None:
    _image(p)
    _poke(p, 8, ">QI", 0x300, 5000)


def unknown_incompat_bit(p: Path) -> None:
    _image(p)
    _poke(p, 72, ">Q", 1 << 40)


def l2_overlaps_header(p: Path) -> None:
    _image(p, "write -P 1 0 64k")
    _poke(p, 3 * CS, ">Q", (1 << 63) | 0)  # L1 entry 0 -> L2 at offset 0: the header


def l2_unaligned(p: Path) -> None:
    _image(p, "write -P 1 0 64k")
    _poke(p, 3 * CS, ">Q", (1 << 63) | (4 * CS + 512))


def data_overlaps_reftable(p: Path) -> None:
    _image(p, "write -P 1 0 64k")
    _poke(p, 4 * CS, ">Q", (1 << 63) | CS)  # reading works; writing would hit the reftable


def compressed_beyond_eof(p: Path) -> None:
    _image(p, "write -P 1 0 64k")
    _poke(p, 4 * CS, ">Q", (1 << 62) | (200 * CS))


def compressed_garbage(p: Path) -> None:
    _image(p, "write -P 1 0 64k")
    _poke(p, 4 * CS, ">Q", (1 << 62) | (3 << 54) | (5 * CS + 100))


def corrupt_bit(p: Path) -> None:
    _image(p, "write -P 1 0 64k")
    _poke(p, 72, ">Q", 2)


MAKERS: dict[str, Callable[[Path], None]] = {
    f.__name__: f for f in (
        truncated_header, truncated_v3_header, bad_magic, bad_version, cluster_bits_huge,
        cluster_bits_tiny, l1_size_absurd, l1_too_small, l1_beyond_eof, l1_unaligned,
        reftable_clusters_absurd, reftable_zero, reftable_unaligned, size_absurd,
        refcount_order_absurd, header_length_absurd, backing_name_too_long,
        unknown_incompat_bit, l2_overlaps_header, l2_unaligned, data_overlaps_reftable,
        compressed_beyond_eof, compressed_garbage, corrupt_bit,
    )
}

QEMU_ABORTS = {("l2_overlaps_header", "write")}

COMMANDS = {
    "read": ["qemu-io", "-f", "qcow2", "-c", "read 0 512"],
    "read-only": ["qemu-io", "-r", "-f", "qcow2", "-c", "read 0 512"],
    "write": ["qemu-io", "-f", "qcow2", "-c", "write 0 512"],
    "info": ["qemu-img", "info", "-f", "qcow2"],
}


def _run(tmp: Path, ours: bool, argv: list[str], image: str) -> tuple[str, str, int]:
    tool = argv[0]
    if ours:
        link = tmp / "bin" / tool
        link.parent.mkdir(exist_ok=True)
        if not link.exists():
            link.symlink_to(BLOCKGRAPH)
        tool = str(link)
    proc = subprocess.run([tool, *argv[1:], image], capture_output=True, text=True, cwd=tmp,
                          timeout=60)
    out = "\n".join(line for line in proc.stdout.splitlines()
                    if " ops; " not in line and not line.startswith("disk size:"))
    assert "Traceback" not in proc.stderr, proc.stderr
    return out, proc.stderr, proc.returncode


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("maker", list(MAKERS))
def test_malformed_like_qemu(tmp_path: Path, maker: str, command: str) -> None:
    require_qemu()
    src = tmp_path / "src.qcow2"
    MAKERS[maker](src)
    if (maker, command) in QEMU_ABORTS:
        # QEMU fails an assertion (L2 offset 0 with the COPIED flag); we take the entry as
        # unallocated, as reads do, and allocate a new L2 table.
        shutil.copy(src, tmp_path / "img.qcow2")
        out, err, rc = _run(tmp_path, True, COMMANDS[command], "img.qcow2")
        assert (rc, err) == (0, ""), out
        return
    results = []
    for ours in (False, True):
        shutil.copy(src, tmp_path / "img.qcow2")
        results.append(_run(tmp_path, ours, COMMANDS[command], "img.qcow2"))
    assert results[1] == results[0]


def test_backing_loop(tmp_path: Path) -> None:
    """a → b → a: QEMU's image locking stops a writable open; we do the same, never hang."""
    require_qemu()
    run("qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "a.qcow2"), "1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2",
        str(tmp_path / "b.qcow2"))
    run("qemu-img", "rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", str(tmp_path / "a.qcow2"))
    argv = ["qemu-io", "-c", "read 0 512"]
    assert _run(tmp_path, True, argv, "a.qcow2") == _run(tmp_path, False, argv, "a.qcow2")
    # Read-only, QEMU recurses until it runs out of memory; we refuse the loop.
    out, err, rc = _run(tmp_path, True, ["qemu-io", "-r", "-c", "read 0 512"], "a.qcow2")
    assert rc == 1
    assert "creates an infinite loop" in err


def test_self_backing(tmp_path: Path) -> None:
    require_qemu()
    run("qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "a.qcow2"), "1M")
    run("qemu-img", "rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", str(tmp_path / "a.qcow2"))
    argv = ["qemu-io", "-c", "read 0 512"]
    assert _run(tmp_path, True, argv, "a.qcow2") == _run(tmp_path, False, argv, "a.qcow2")
