"""``blockgraph img`` against qemu-img 7.2, subcommand by subcommand.

Each case builds the same small images twice (with the real qemu-img/qemu-io), runs the same
command line once with qemu-img and once with ``blockgraph`` behind a symlink named
``qemu-img``, and compares stdout, stderr and exit status after filtering timings. Follow-up
commands, always run with the real qemu-img (``compare``, ``check``, ``map``, ``info``), check
what our command left on disk.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parents[2]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.oracle import require_qemu  # noqa: E402

BLOCKGRAPH = Path(sys.executable).with_name("blockgraph")

SETUP = [
    "qemu-img create -f qcow2 base.qcow2 4M",
    "qemu-io -c 'write -P 1 0 64k' -c 'write -P 2 1M 128k' base.qcow2",
    "qemu-img create -f qcow2 -b base.qcow2 -F qcow2 top.qcow2",
    "qemu-io -c 'write -P 3 32k 64k' -c 'write -z 2M 64k' -c 'write -P 5 3M 4k' top.qcow2",
    "qemu-img create -f raw r.raw 4M",
    "qemu-io -f raw -c 'write -P 1 1M 64k' -c 'write -P 9 3M 1k' r.raw",
    "qemu-img create -f qcow2 nb.qcow2 4M",
    "qemu-io -c 'write -P 7 1M 64k' nb.qcow2",
    "qemu-img create -f qcow2 e4.qcow2 4M",
    "qemu-img create -f qcow2 b5.qcow2 5M",
    "qemu-img create -f qcow2 -o compat=0.10 v2.qcow2 1M",
    "qemu-img create -f qcow2 zc.qcow2 4M",
    "qemu-io -c 'write -c -P 4 0 64k' zc.qcow2",
    "qemu-img create -f qcow2 e4z.qcow2 4M",
    "qemu-io -c 'write -z 0 64k' -c 'write -P 0 64k 64k' e4z.qcow2",
]

_TIMING = re.compile(r"Run completed in [0-9.]+ seconds\.")
_OFFSET = re.compile(r', "offset": \d+')
_DISK = re.compile(r'("actual-size": \d+|disk size: .*|Image end offset: \d+)')
# Allocation order and counts are the driver's business (and, for clusters whose file range
# is an unwritten extent, the file system's): check's statistics line is not compared.
_STATS = re.compile(r"\d+/\d+ = [0-9.]+% allocated, [0-9.]+% fragmented, [0-9.]+% compressed clusters")

# (qemu-img arguments, follow-up checks run with the real qemu-img)
CASES: list[tuple[str, list[str]]] = [
    # convert
    ("convert -O qcow2 top.qcow2 o.qcow2", ["compare top.qcow2 o.qcow2", "check o.qcow2",
                                            "map --output=json o.qcow2"]),
    ("convert -O raw top.qcow2 o.raw", ["compare -f qcow2 -F raw top.qcow2 o.raw",
                                        "map --output=json -f raw o.raw"]),
    ("convert -f raw -O qcow2 r.raw o.qcow2", ["compare -f raw -F qcow2 r.raw o.qcow2",
                                               "check o.qcow2", "map --output=json o.qcow2"]),
    ("convert -O qcow2 -c top.qcow2 o.qcow2", ["compare top.qcow2 o.qcow2", "check o.qcow2",
                                               "map --output=json o.qcow2"]),
    ("convert -O qcow2 -B base.qcow2 -F qcow2 top.qcow2 o.qcow2",
     ["compare top.qcow2 o.qcow2", "check o.qcow2", "map --output=json o.qcow2", "info o.qcow2"]),
    ("convert -O raw -S 0 top.qcow2 o.raw", ["compare -F raw top.qcow2 o.raw",
                                             "map --output=json -f raw o.raw"]),
    ("convert -O qcow2 -S 64k -o cluster_size=4k -t none -T none -W top.qcow2 o.qcow2",
     ["compare top.qcow2 o.qcow2", "check o.qcow2"]),
    ("convert -O qcow2 zc.qcow2 top.qcow2 o.qcow2", ["check o.qcow2", "info o.qcow2"]),
    ("convert -n -O qcow2 top.qcow2 nb.qcow2", ["compare top.qcow2 nb.qcow2", "check nb.qcow2"]),
    ("convert -p -O raw top.qcow2 o.raw", []),
    ("convert -c -O raw top.qcow2 o.raw", []),
    ("convert -O qcow2 -B base.qcow2 top.qcow2 o.qcow2", []),
    ("convert -O foo top.qcow2 o", []),
    ("convert -S 3 -O raw top.qcow2 o.raw", []),
    ("convert -O raw top.qcow2", []),
    ("convert -O raw nonexist.qcow2 o.raw", []),
    ("convert -O qcow2 -o cluster_size=4k,foo=bar top.qcow2 o.qcow2", []),
    # compare
    ("compare base.qcow2 top.qcow2", []),
    ("compare top.qcow2 top.qcow2", []),
    ("compare -p top.qcow2 top.qcow2", []),
    ("compare -s e4.qcow2 e4z.qcow2", []),
    ("compare e4.qcow2 e4z.qcow2", []),
    ("compare base.qcow2 b5.qcow2", []),
    ("compare e4.qcow2 b5.qcow2", []),
    ("compare -s e4.qcow2 b5.qcow2", []),
    ("compare -q base.qcow2 top.qcow2", []),
    ("compare -f qcow2 -F raw base.qcow2 base.qcow2", []),
    ("compare nonexist.qcow2 base.qcow2", []),
    ("compare -f raw -F raw r.raw r.raw", []),
    # map
    ("map top.qcow2", []),
    ("map --output=json top.qcow2", []),
    ("map --output=json base.qcow2", []),
    ("map -f raw r.raw", []),
    ("map --output=json -f raw r.raw", []),
    ("map --output=json zc.qcow2", []),
    ("map zc.qcow2", []),
    ("map --output=json --start-offset=1M --max-length=2M top.qcow2", []),
    ("map --output=xml top.qcow2", []),
    # measure
    ("measure -O qcow2 top.qcow2", []),
    ("measure --output=json -O qcow2 top.qcow2", []),
    ("measure -O qcow2 --size 1G", []),
    ("measure -O qcow2 -o cluster_size=4k --size 1G", []),
    ("measure -O qcow2 -o cluster_size=512,refcount_bits=1 --size 3G", []),
    ("measure -O raw top.qcow2", []),
    ("measure -f raw -O qcow2 r.raw", []),
    ("measure --output=json -O raw --size 1G", []),
    ("measure", []),
    # commit
    ("commit top.qcow2", ["compare base.qcow2 top.qcow2", "check base.qcow2", "check top.qcow2",
                          "map --output=json top.qcow2"]),
    ("commit -d top.qcow2", ["map --output=json top.qcow2", "check base.qcow2"]),
    ("commit -b base.qcow2 top.qcow2", ["map --output=json top.qcow2", "check base.qcow2"]),
    ("commit -b nonexist top.qcow2", []),
    ("commit base.qcow2", []),
    # rebase
    ("rebase -b nb.qcow2 -F qcow2 top.qcow2", ["info top.qcow2", "check top.qcow2",
                                               "map --output=json top.qcow2"]),
    ("rebase -b '' top.qcow2", ["info top.qcow2", "map --output=json top.qcow2"]),
    ("rebase -u -b nb.qcow2 -F qcow2 top.qcow2", ["info top.qcow2"]),
    ("rebase -u -b '' top.qcow2", ["info top.qcow2"]),
    ("rebase -b nb.qcow2 top.qcow2", []),
    ("rebase top.qcow2", []),
    ("rebase -b nonexist.qcow2 -F qcow2 top.qcow2", []),
    ("rebase -f raw -b nb.qcow2 -F qcow2 r.raw", []),
    # resize
    ("resize -f raw r.raw 8M", ["info r.raw"]),
    ("resize -f raw --shrink r.raw -- -1M", ["info r.raw"]),
    ("resize -f raw r.raw 2M", []),
    ("resize -f raw r.raw abc", []),
    ("resize -f raw r.raw -- -5M", []),
    ("resize -q -f raw r.raw +512", ["info r.raw"]),
    # dd
    ("dd if=top.qcow2 of=d.raw bs=64k count=3 skip=1", ["info d.raw"]),
    ("dd -O qcow2 if=top.qcow2 of=d.qcow2 bs=1M", ["compare d.qcow2 top.qcow2", "check d.qcow2"]),
    ("dd if=top.qcow2 of=d.raw count=1 skip=100", ["info d.raw"]),
    ("dd if=top.qcow2 of=d.raw bs=3000 count=2 skip=1", ["info d.raw"]),
    ("dd if=top.qcow2", []),
    ("dd if=top.qcow2 of=x bs=0", []),
    ("dd if=top.qcow2 of=x foo=1", []),
    # bench
    ("bench -c 100 top.qcow2", []),
    ("bench -c 100 -w -s 8k -S 64k -d 4 --pattern=5 -o 4k top.qcow2", ["check top.qcow2"]),
    ("bench -c 100 -w --flush-interval=64 -f raw r.raw", []),
    ("bench -c 10 -w --flush-interval=2 top.qcow2", []),
    ("bench -c 10 -n top.qcow2", []),
    # info
    ("info --backing-chain --output=json top.qcow2", []),
    ("info --backing-chain top.qcow2", []),
    ("info --output=json v2.qcow2", []),
    ("info v2.qcow2", []),
    ("info --output=json -f raw r.raw", []),
]


def _filter(text: str) -> str:
    text = _TIMING.sub("Run completed in X seconds.", text)
    text = _OFFSET.sub("", text)
    return _STATS.sub("STATS", _DISK.sub("DISK", text))


def _sh(cmd: str, cwd: Path) -> tuple[str, str, int]:
    proc = subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "LC_ALL": "C"})
    return proc.stdout, proc.stderr, proc.returncode


def _run_case(tmp_path: Path, impl: str, args: str, checks: list[str]) -> list[object]:
    work = tmp_path / impl
    work.mkdir()
    for cmd in SETUP:
        out, err, rc = _sh(cmd, work)
        assert rc == 0, (cmd, err)
    binary = "qemu-img"
    if impl == "ours":
        bindir = tmp_path / "bin"
        bindir.mkdir(exist_ok=True)
        link = bindir / "qemu-img"
        if not link.exists():
            link.symlink_to(BLOCKGRAPH)
        binary = str(link)
    out, err, rc = _sh(f"{binary} {args}", work)
    results: list[object] = [_filter(out), _filter(err), rc]
    for check in checks:
        results.append((check, *map(_filter, _sh(f"qemu-img {check}", work)[:2])))
    return results


@pytest.mark.parametrize("args,checks", CASES, ids=[c[0] for c in CASES])
def test_same_as_qemu_img(tmp_path: Path, args: str, checks: list[str]) -> None:
    require_qemu()
    expected = _run_case(tmp_path, "qemu", args, checks)
    got = _run_case(tmp_path, "ours", args, checks)
    assert got == expected


def test_convert_big_sparse_image(tmp_path: Path) -> None:
    """Runs across L2 tables and buffers: raw with data, holes and zero-filled data."""
    require_qemu()
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(64 << 20)
        for off, data in ((0, os.urandom(3 << 20)), (7 << 20, b"x" * 100),
                          (20 << 20, bytes(1 << 20)), (33 << 20, os.urandom(5000)),
                          ((64 << 20) - 4096, os.urandom(4096))):
            f.seek(off)
            f.write(data)
    for fmt, extra in (("qcow2", []), ("qcow2", ["-c"]), ("qcow2", ["-o", "cluster_size=512"]),
                       ("raw", [])):
        out = tmp_path / f"out.{fmt}"
        proc = subprocess.run([str(BLOCKGRAPH), "img", "convert", "-f", "raw", "-O", fmt, *extra,
                               str(raw), str(out)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", fmt, str(raw), str(out)],
                             capture_output=True, text=True)
        assert cmp.stdout == "Images are identical.\n", (extra, cmp.stdout)
        if fmt == "qcow2":
            chk = subprocess.run(["qemu-img", "check", str(out)], capture_output=True, text=True)
            assert chk.returncode == 0, chk.stdout + chk.stderr


def test_sigusr1_prints_one_progress_line(capsys: pytest.CaptureFixture[str]) -> None:
    from blockgraph.tools.img.common import Progress

    state = Progress(False, 1.0)
    with state.running():
        state.update(10, 100)
        os.kill(os.getpid(), signal.SIGUSR1)
        state.update(25, 0)
        state.update(30, 0)
    captured = capsys.readouterr()
    assert captured.err == "    (25.00/100%)\n"
    assert captured.out == ""


def test_progress_line_format(capsys: pytest.CaptureFixture[str]) -> None:
    from blockgraph.tools.img.common import Progress

    state = Progress(True, 2.0)
    state.update(0, 100)
    state.update(1, 100)
    state.update(50, 0)
    state.update(100, 0)
    state.end()
    assert capsys.readouterr().out == (
        "    (0.00/100%)\r    (50.00/100%)\r    (100.00/100%)\r\n")


def test_zero_runs() -> None:
    from blockgraph.tools.img.common import zero_runs

    buf = bytearray(64 * 1024)
    buf[5000] = 1
    buf[20000:20010] = b"x" * 10
    assert list(zero_runs(buf, 0, 0, len(buf), 4096)) == [
        (True, 0, 4608), (False, 4608, 8192), (True, 8192, 16384), (False, 16384, 20480),
        (True, 20480, 65536)]
    assert list(zero_runs(bytearray(b"\1" * 10000), 0, 0, 10000, 4096)) == [(False, 0, 10000)]
    assert list(zero_runs(bytearray(10000), 0, 0, 10000, 4096)) == [(True, 0, 10000)]


def test_no_qemu_needed_for_helpers() -> None:
    assert shutil.which("python3") is not None
