"""Persistent dirty bitmaps side by side with qemu-img / qemu-io / qemu-nbd 7.2 and nbdinfo.

Bitmaps qemu-img creates (and qemu-io dirties) read back identically through us and survive
our read-write open; bitmaps we add / clear / merge are what qemu-img makes of the same
commands; ``blockgraph nbd -B`` serves ``qemu:dirty-bitmap:NAME`` as qemu-nbd does.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from blockgraph.graph.layer import BlockLayer

BLOCKGRAPH = [sys.executable, "-m", "blockgraph"]
TOOLS = ("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
MiB = 1 << 20


@pytest.fixture(autouse=True)
def _oracles() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not missing:
        return
    if os.environ.get("BLOCKGRAPH_REQUIRE_ORACLES"):
        pytest.fail(f"{', '.join(missing)} required (BLOCKGRAPH_REQUIRE_ORACLES is set)")
    pytest.skip(f"{', '.join(missing)} not installed")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2] / "src"),
                                         env.get("PYTHONPATH", "")])
    return env


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=60,
                          env=_env())


def _ours(*args: str) -> subprocess.CompletedProcess[str]:
    return _run(*BLOCKGRAPH, *args, check=False)


def _bitmaps(image: Path) -> Any:
    info = json.loads(_run("qemu-img", "info", "-U", "--output=json", str(image)).stdout)
    return info["format-specific"]["data"].get("bitmaps")


def _check_clean(image: Path) -> None:
    res = _run("qemu-img", "check", str(image), check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "No errors were found" in res.stdout


def _image(tmp: Path, name: str = "disk.qcow2") -> Path:
    img = tmp / name
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "10M")
    _run("qemu-img", "bitmap", "--add", str(img), "b0")
    _run("qemu-img", "bitmap", "--add", "-g", "128k", "--disable", str(img), "b1")
    # qemu-io loads the persistent bitmaps: the enabled one records these writes.
    _run("qemu-io", "-f", "qcow2", "-c", "write 0 64k", "-c", "write 1M 200k", str(img))
    _run("qemu-img", "bitmap", "--enable", str(img), "b1")
    _run("qemu-io", "-f", "qcow2", "-c", "write 7M 4k", "-c", "write 9M 512", str(img))
    return img


def _map(kind: str, tmp: Path, image: Path, bitmap: str) -> str:
    sock = tmp / f"{kind}.sock"
    pid_file = tmp / f"{kind}.pid"
    exe = [*BLOCKGRAPH, "nbd"] if kind == "ours" else ["qemu-nbd"]
    # The forked server keeps its stdio: don't capture it, or the run waits for the server.
    started = subprocess.run([*exe, "--fork", "--pid-file", str(pid_file), "-r", "-B", bitmap,
                              "-k", str(sock), "-f", "qcow2", str(image)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=_env(), timeout=60, check=False)
    assert started.returncode == 0
    pid = int(pid_file.read_text())
    try:
        return _run("nbdinfo", f"--map=qemu:dirty-bitmap:{bitmap}",
                    f"nbd+unix:///?socket={sock}").stdout
    finally:
        _stop(pid)


def _stop(pid: int) -> None:
    """SIGTERM the server and wait for it to exit (pidfd: no polling); SIGKILL if it hangs."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            if select.select([pidfd], [], [], 30)[0]:
                return
    finally:
        os.close(pidfd)


def _open_close(image: Path, write: tuple[int, int] | None = None) -> None:
    layer = BlockLayer()
    try:
        node = layer.run(layer.open_node(str(image), {"driver": "qcow2", "read-only": False}))
        if write is not None:
            layer.run(node.pwritev(write[0], memoryview(b"\x5a" * write[1])))
    finally:
        layer.close()


def test_qemu_bitmaps_survive_our_read_write_open(tmp_path: Path) -> None:
    img = _image(tmp_path)
    before = _bitmaps(img)
    maps = {b: _map("qemu", tmp_path, img, b) for b in ("b0", "b1")}
    assert "dirty" in maps["b0"] and "dirty" in maps["b1"]
    _open_close(img)
    assert _bitmaps(img) == before
    _check_clean(img)
    for name, expected in maps.items():
        assert _map("qemu", tmp_path, img, name) == expected


def test_bitmaps_in_use_while_open_read_write(tmp_path: Path) -> None:
    img = _image(tmp_path)
    layer = BlockLayer()
    try:
        layer.run(layer.open_node(str(img), {"driver": "qcow2", "read-only": False}))
        flags = [b["flags"] for b in _bitmaps(img)]
        assert flags == [["in-use", "auto"], ["in-use", "auto"]]
    finally:
        layer.close()
    assert [b["flags"] for b in _bitmaps(img)] == [["auto"], ["auto"]]


def test_our_writes_mark_enabled_bitmaps(tmp_path: Path) -> None:
    img = _image(tmp_path)
    _run("qemu-img", "bitmap", "--disable", str(img), "b1")
    ref = tmp_path / "ref.qcow2"
    shutil.copy(img, ref)
    _open_close(img, write=(3 * MiB + 4096, 70000))
    _run("qemu-io", "-f", "qcow2", "-c", f"write {3 * MiB + 4096} 70000", str(ref))
    _check_clean(img)
    assert _bitmaps(img) == _bitmaps(ref)
    for name in ("b0", "b1"):
        assert _map("qemu", tmp_path, img, name) == _map("qemu", tmp_path, ref, name)


COMMANDS = [
    ["--add", "X", "b0"],
    ["--add", "-g", "128k", "--disable", "X", "b1"],
    ["--add", "X", "b0"],
    ["--add", "-g", "100", "X", "b2"],
    ["--add", "X", ""],
    ["--clear", "X", "b0"],
    ["--merge", "b0", "X", "b1"],
    ["--merge", "nope", "X", "b1"],
    ["--enable", "X", "b1"],
    ["--remove", "X", "nope"],
    ["--add", "--remove", "X", "b5"],
    ["--add", "-g", "1G", "X", "big"],
    ["--disable", "--clear", "X", "big"],
    ["X", "b0"],
    ["--clear", "-g", "64k", "X", "b0"],
    ["--clear", "-b", "X", "X", "b0"],
    ["--merge", "b0", "-F", "raw", "X", "b1"],
    ["--add", "-g", "abc", "X", "b3"],
    ["--add", "X"],
    ["--remove", "X", "big"],
]


def _stderr(text: str) -> str:
    return re.sub(r"^(qemu-img|blockgraph-img): ", "PROG: ", text, flags=re.M)


def test_img_bitmap_matches_qemu_img(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs.qcow2"
    mine = tmp_path / "mine.qcow2"
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(theirs), "10M")
    _run("qemu-io", "-f", "qcow2", "-c", "write 2M 64k", str(theirs))
    shutil.copy(theirs, mine)
    for command in COMMANDS:
        q = _run("qemu-img", "bitmap", *[str(theirs) if a == "X" else a for a in command],
                 check=False)
        o = _ours("img", "bitmap", *[str(mine) if a == "X" else a for a in command])
        assert (o.returncode, _stderr(o.stderr.replace(str(mine), "IMG")), o.stdout) == (
            q.returncode, _stderr(q.stderr.replace(str(theirs), "IMG")), q.stdout), command
        assert _bitmaps(mine) == _bitmaps(theirs), command
    _check_clean(mine)
    # Same text in ``img info`` (the disk size line aside).
    mine_info = _ours("img", "info", "-f", "qcow2", str(mine)).stdout.splitlines()
    their_info = _run("qemu-img", "info", "-f", "qcow2", str(theirs)).stdout.splitlines()
    assert [line for line in mine_info[1:] if not line.startswith("disk size")] == [
        line for line in their_info[1:] if not line.startswith("disk size")]
    assert "    bitmaps:" in mine_info


def test_merge_from_another_image(tmp_path: Path) -> None:
    src = _image(tmp_path, "src.qcow2")
    results = []
    for name in ("theirs.qcow2", "mine.qcow2"):
        img = tmp_path / name
        _run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "10M")
        _run("qemu-img", "bitmap", "--add", str(img), "t")
        exe = ["qemu-img"] if name == "theirs.qcow2" else [*BLOCKGRAPH, "img"]
        _run(*exe, "bitmap", "--merge", "b0", "-b", str(src), "-F", "qcow2", str(img), "t")
        _check_clean(img)
        results.append((_bitmaps(img), _map("qemu", tmp_path, img, "t")))
    assert results[0] == results[1]
    assert "dirty" in results[0][1]


def test_nbd_dirty_bitmap_map_matches_qemu_nbd(tmp_path: Path) -> None:
    img = _image(tmp_path)
    _open_close(img, write=(5 * MiB, 3 * 65536 + 1))
    for name in ("b0", "b1"):
        assert _map("ours", tmp_path, img, name) == _map("qemu", tmp_path, img, name)
    _check_clean(img)


def test_nbd_unknown_bitmap(tmp_path: Path) -> None:
    img = _image(tmp_path)
    q = _run("qemu-nbd", "-r", "-B", "zz", "-k", str(tmp_path / "q.sock"), str(img), check=False)
    o = _ours("nbd", "-r", "-B", "zz", "-k", str(tmp_path / "o.sock"), str(img))
    assert o.returncode == q.returncode == 1
    assert o.stderr.split(": ", 1)[1] == q.stderr.split(": ", 1)[1]
