"""``img resize --preallocation`` and the ``img convert`` options, against qemu-img 7.2.

Each case builds the same small images twice (with the real qemu-img/qemu-io), runs the same
command line once with qemu-img and once with ``blockgraph`` behind a symlink named
``qemu-img``, and compares stdout, stderr and exit status. Follow-up shell commands, which use
only the real tools (``qemu-img compare``/``check``/``map``/``info``, ``du``, ``stat``), check
what the command left on disk; their output must be the same after both runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parents[2]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.oracle import require_qemu  # noqa: E402

BLOCKGRAPH = Path(sys.executable).with_name("blockgraph")

SETUP = [
    "qemu-img create -f raw r.raw 1M",
    "qemu-io -f raw -c 'write -P 1 0 64k' r.raw",
    "qemu-img create -f qcow2 q.qcow2 1M",
    "qemu-io -c 'write -P 2 64k 64k' q.qcow2",
    "qemu-img create -f qcow2 -b q.qcow2 -F qcow2 ov.qcow2",
    # Whole clusters: a partial one would leave an unwritten extent whose SEEK_DATA answer
    # (and so qemu-img map's "zero") depends on the kernel's writeback, not on us.
    "qemu-io -c 'write -P 3 128k 64k' ov.qcow2",
]

# The exact cluster layout is the driver's business; what is allocated and how is not.
_OFFSET = re.compile(r', "offset": \d+')
_STATS = re.compile(r"\d+/\d+ = [0-9.]+% allocated, [0-9.]+% fragmented, [0-9.]+% compressed clusters")
_DISK = re.compile(r'("actual-size": \d+|disk size: .*|Image end offset: \d+)')

# Shown after a resize: size, allocation (du) and the map of what is data and what reads zero.
# For qcow2 the file's size and du depend on where the driver puts its metadata (QEMU may
# allocate a refcount block more): the map shows what is preallocated, and how.
_RAW_ALLOC = ["stat -c %s r.raw", "du -k r.raw", "qemu-img map --output=json -f raw r.raw"]
_QCOW2_ALLOC = ["qemu-img map --output=json q.qcow2", "qemu-img check q.qcow2",
                "qemu-img info q.qcow2"]
_OV_ALLOC = ["qemu-img map --output=json ov.qcow2", "qemu-img check ov.qcow2"]

# (qemu-img arguments, follow-up shell commands)
RESIZE_CASES: list[tuple[str, list[str]]] = [
    *[(f"resize -f raw --preallocation={m} r.raw 3M", _RAW_ALLOC)
      for m in ("off", "metadata", "falloc", "full")],
    *[(f"resize -f qcow2 --preallocation={m} q.qcow2 3M", _QCOW2_ALLOC)
      for m in ("off", "metadata", "falloc", "full")],
    ("resize -f raw --preallocation=full r.raw +1000", _RAW_ALLOC),
    ("resize -f raw --preallocation=falloc r.raw +1536", _RAW_ALLOC),
    ("resize -f qcow2 --preallocation=falloc q.qcow2 +1536", _QCOW2_ALLOC),
    ("resize -f qcow2 --preallocation=full q.qcow2 +1000", _QCOW2_ALLOC),
    ("resize --preallocation=metadata ov.qcow2 2M", _OV_ALLOC),
    ("resize --preallocation=full ov.qcow2 3M", _OV_ALLOC),
    # Errors: bad mode (before the size is even parsed), no growth, shrink.
    ("resize --preallocation=bogus r.raw 3M", []),
    ("resize --preallocation= r.raw 3M", []),
    ("resize --preallocation=bogus r.raw 3X", []),
    ("resize --preallocation=falloc nonexist 3M", []),
    ("resize -f raw --preallocation=full r.raw 1M", _RAW_ALLOC),
    ("resize -f raw --preallocation=falloc r.raw +0", _RAW_ALLOC),
    ("resize -f raw --preallocation=falloc r.raw 512K", _RAW_ALLOC),
    ("resize -f raw --shrink --preallocation=metadata r.raw 512K", _RAW_ALLOC),
    ("resize -f qcow2 --shrink --preallocation=full q.qcow2 512K", _QCOW2_ALLOC),
    ("resize -f qcow2 --preallocation=falloc q.qcow2 -- -512K", _QCOW2_ALLOC),
    ("resize -f raw --preallocation=falloc r.raw -- -2M", []),
    ("resize -f raw --preallocation=falloc --preallocation=off r.raw 2M", _RAW_ALLOC),
    ("resize -f raw --shrink --preallocation=off r.raw 512K", _RAW_ALLOC),
]


def _filter(text: str) -> str:
    text = _OFFSET.sub("", text)
    return _STATS.sub("STATS", _DISK.sub("DISK", text))


def _sh(cmd: str, cwd: Path) -> tuple[str, str, int]:
    proc = subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "LC_ALL": "C"})
    return proc.stdout, proc.stderr, proc.returncode


def _binary(tmp_path: Path, impl: str) -> str:
    if impl == "qemu":
        return "qemu-img"
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    link = bindir / "qemu-img"
    if not link.exists():
        link.symlink_to(BLOCKGRAPH)
    return str(link)


def run_case(tmp_path: Path, impl: str, args: str, checks: list[str],
             setup: list[str] = SETUP) -> list[object]:
    """Run ``args`` with qemu-img or ours in a fresh directory; return outputs and checks."""
    work = tmp_path / impl
    work.mkdir()
    for cmd in setup:
        out, err, rc = _sh(cmd, work)
        assert rc == 0, (cmd, err)
    out, err, rc = _sh(f"{_binary(tmp_path, impl)} {args}", work)
    results: list[object] = [_filter(out), _filter(err), rc]
    for check in checks:
        c_out, c_err, c_rc = _sh(check, work)
        results.append((check, _filter(c_out), _filter(c_err), c_rc))
    return results


def same_as_qemu(tmp_path: Path, args: str, checks: list[str], setup: list[str] = SETUP) -> None:
    require_qemu()
    expected = run_case(tmp_path, "qemu", args, checks, setup)
    got = run_case(tmp_path, "ours", args, checks, setup)
    assert "Traceback" not in str(got[1])
    assert got == expected


@pytest.mark.parametrize("args,checks", RESIZE_CASES, ids=[c[0] for c in RESIZE_CASES])
def test_resize_preallocation(tmp_path: Path, args: str, checks: list[str]) -> None:
    same_as_qemu(tmp_path, args, checks)


def test_resize_preallocation_content(tmp_path: Path) -> None:
    """The grown images hold the same bytes as qemu-img's (old data kept, new area zero)."""
    require_qemu()
    for mode in ("off", "falloc", "full"):
        for fmt, name in (("raw", "r.raw"), ("qcow2", "q.qcow2"), ("qcow2", "ov.qcow2")):
            case = tmp_path / f"{mode}-{name}"
            case.mkdir()
            for impl in ("qemu", "ours"):
                run_case(case, impl, f"resize -f {fmt} --preallocation={mode} {name} 5M", [])
            out, err, rc = _sh(f"qemu-img compare -f {fmt} -F {fmt} qemu/{name} ours/{name}", case)
            assert (out, rc) == ("Images are identical.\n", 0), (mode, name, out, err)
