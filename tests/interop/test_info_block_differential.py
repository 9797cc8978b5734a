"""``info block`` text, differential: the same command lines and HMP commands are given to
``qemu-system-x86_64 -machine none`` and to ``blockgraph system``, and the outputs must be
equal once QEMU's readline echo, the version, automatic node names and paths are filtered.

Only cases where QEMU 7.2 and the seed agree are here (the others are in tests/golden with the
seed's rules written down).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BLOCKGRAPH = Path(sys.executable).parent / "blockgraph"
QEMU = shutil.which("qemu-system-x86_64")
QEMU_IMG = shutil.which("qemu-img")

_ESCAPES = re.compile(r"\x1b\[[0-9]*[A-Z]")


def _oracles() -> None:
    if QEMU is None or QEMU_IMG is None:
        if os.environ.get("BLOCKGRAPH_REQUIRE_ORACLES"):
            pytest.fail("qemu-system-x86_64 / qemu-img missing", pytrace=False)
        pytest.skip("qemu-system-x86_64 / qemu-img missing")


def _render_echo(line: str) -> str:
    """What a terminal shows for QEMU's readline redraws (ESC[K erase, ESC[D back)."""
    if "\x1b[" not in line:
        return line
    out = ""
    for chunk in re.split(r"(\x1b\[[0-9]*[A-Z])", line):
        if chunk == "\x1b[D":
            out = out[:-1] if out else out
        elif chunk == "\x1b[K" or _ESCAPES.fullmatch(chunk):
            continue
        else:
            out += chunk
    return out


def _normalise(text: str, tmp: Path) -> str:
    lines = []
    for line in text.replace("\r", "").split("\n"):
        line = _render_echo(line) if line.startswith("(qemu) ") else line
        # Readline redraws leave "(qemu) " + the prefixes typed so far: keep the final command.
        line = re.sub(r"^QEMU [0-9.]+ monitor", "QEMU X.Y.Z monitor", line)
        line = re.sub(r"#block[0-9]+", "#blockNNN", line)
        line = line.replace(str(tmp), "TMP")
        # snapshot=on overlays are temporary files with random names
        line = re.sub(r"/var/tmp/vl\.[A-Za-z0-9_]+", "VLTMP", line)
        line = re.sub(r"^disk size: .*", "disk size: SIZE", line)
        line = re.sub(r"[0-9]+ ops; .*", "X ops; TIME", line)  # qemu-io's rate line
        lines.append(line)
    return "\n".join(lines)


def _run(program: Path | str, tmp: Path, drives: list[str], commands: list[str]) -> str:
    argv = [str(program), "-nodefaults", "-display", "none", "-machine", "none"]
    for drive in drives:
        argv += ["-drive", drive]
    argv += ["-monitor", "stdio"]
    proc = subprocess.run(argv, input="".join(c + "\n" for c in commands + ["quit"]),
                          capture_output=True, text=True, timeout=60, cwd=tmp)
    return _normalise(proc.stdout + proc.stderr, tmp)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    _oracles()
    assert QEMU_IMG is not None
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), "64M"],
                   check=True)
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", str(tmp_path / "base.qcow2"),
                    "-F", "qcow2", str(tmp_path / "top.qcow2")], check=True)
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "raw", str(tmp_path / "disk.raw"), "1M"],
                   check=True)
    return tmp_path


ALL = ["info block", "info block -n", "info block -v", "info block -n -v"]

CASES = {
    "chain-default": (["if=none,file=TMP/top.qcow2,node-name=image"], ALL),
    "chain-named": (["if=none,file=TMP/top.qcow2,node-name=image,file.node-name=file,"
                     "backing.node-name=backing,backing.file.node-name=backing-file,cache=none"],
                    ALL + ["info block image", "info block backing", "info block none0",
                           "info block nosuch"]),
    "legacy-modes": ([f"if=none,id=d{i},file=TMP/disk.raw,format=raw,cache={mode}"
                      for i, mode in enumerate(["none", "directsync", "writeback", "unsafe",
                                                "writethrough"])], ["info block", "info block -n"]),
    "empty-and-readonly": (["if=none,id=empty",
                            "if=none,file=TMP/top.qcow2,read-only=on,detect-zeroes=on"], ALL),
    "explicit-children": (["if=none,file=TMP/top.qcow2,cache.no-flush=on,"
                           "file.cache.no-flush=off,backing.cache.direct=on"], ALL),
    "snapshot-on": (["if=none,file=TMP/top.qcow2,snapshot=on,cache=writethrough"],
                    ["info block", "info block -n", 'qemu-io none0 "write -P 0x22 0 4k"',
                     'qemu-io none0 "read -P 0x22 0 4k"']),
    "snapshot-relative": (["if=none,file=top.qcow2,cache=writethrough"],
                          ["snapshot_blkdev none0 snap.qcow2", "info block", "info block -n -v"]),
    "reopen": (["if=none,file=TMP/top.qcow2,node-name=image,cache=writethrough"],
               ['qemu-io none0 "reopen -c none"', "info block", "info block -n",
                'qemu-io none0 "reopen -o cache.direct=off,file.cache.no-flush=on"',
                "info block -n", 'qemu-io none0 "reopen -r"', "info block"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_info_block_matches_qemu(images: Path, case: str) -> None:
    drives, commands = CASES[case]
    drives = [d.replace("TMP", str(images)) for d in drives]
    assert QEMU is not None
    expected = _run(QEMU, images, drives, commands)
    ours = _run(blockgraph_system(images), images, drives, commands)
    assert ours == expected


def blockgraph_system(tmp: Path) -> Path:
    """A ``qemu-system-x86_64`` symlink to blockgraph, so messages carry QEMU's program name."""
    link = tmp / "bin" / "qemu-system-x86_64"
    link.parent.mkdir(exist_ok=True)
    if not link.exists():
        link.symlink_to(BLOCKGRAPH)
    return link
