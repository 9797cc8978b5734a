"""VM state (``read -b`` / ``write -b``) in qcow2 images, across qemu-io and ``blockgraph io``.

QEMU keeps the VM state in the image's guest address space past the virtual disk, at the first
L1 entry the disk does not use. What one tool writes there the other must read back, with the
same L1 table (size and the entries in use), and images stay clean for ``qemu-img check``.
Internal snapshots carry the VM state along: ``qemu-img snapshot -c`` records a VM state size of
0 (it saves no VM) but keeps the area, ``savevm`` of the system emulator records its size, and
both tools list them alike (``snapshot -l`` and ``info``, text and JSON) and read them alike. The command output itself is compared in
``test_qemu_io_output.py`` (the ``vmstate*`` scenarios).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

QEMU_IO = shutil.which("qemu-io")
QEMU_IMG = shutil.which("qemu-img")
QEMU_SYSTEM = shutil.which("qemu-system-x86_64")
BLOCKGRAPH = Path(sys.executable).with_name("blockgraph")

if (QEMU_IO is None or QEMU_IMG is None) and not os.environ.get("BLOCKGRAPH_REQUIRE_ORACLES"):
    pytest.skip("qemu-io / qemu-img not installed", allow_module_level=True)

# (vmstate offset, length, pattern): cluster aligned, inside a cluster, far past the disk (the
# L1 table grows several times over).
WRITES = [(65536, 65536, 0x5A), (8192 + 512, 1024, 0x5B), (1 << 30, 4096, 0x5C), (100 << 30, 512, 0x5D)]


def _writes(options: str) -> list[tuple[int, int, int]]:
    if "cluster_size=512" in options:
        # An L1 entry maps only 32 KiB here: 100 GiB would need a 26 MB L1 table, which both
        # tools take their time to allocate, cluster by cluster.
        return WRITES[:-1]
    return WRITES


def _run(*args: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    assert "failed" not in proc.stdout, (args, proc.stdout)
    return proc.stdout


def _io(tool: str, image: Path, *commands: str) -> str:
    """Run qemu-io commands with ``tool`` ("qemu" or "ours"); every command must succeed."""
    argv = [QEMU_IO] if tool == "qemu" else [str(BLOCKGRAPH), "io"]
    assert argv[0] is not None
    for command in commands:
        argv += ["-c", command]
    out = _run(*argv, "-f", "qcow2", str(image))
    assert "Pattern verification failed" not in out, out
    return out


def _dump(tool: str, image: Path, command: str) -> list[str]:
    """The ``-v`` hex dump lines of one read (the report line's timing differs)."""
    return [line for line in _io(tool, image, command).splitlines()
            if re.match(r"[0-9a-f]{8}:  ", line)]


def _img(tool: str, *args: str) -> str:
    argv = [QEMU_IMG] if tool == "qemu" else [str(BLOCKGRAPH), "img"]
    assert argv[0] is not None
    return _run(*argv, *args)


def _create(path: Path, options: str, size: str = "3M") -> Path:
    assert QEMU_IMG is not None
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", options, str(path), size],
                   check=True)
    return path


def _l1_layout(path: Path) -> tuple[int, list[int]]:
    """The active L1 table's size and the indices of its non-empty entries."""
    data = path.read_bytes()
    l1_size, l1_offset = struct.unpack_from(">IQ", data, 36)
    entries = struct.unpack_from(f">{l1_size}Q", data, l1_offset)
    return l1_size, [i for i, e in enumerate(entries) if e & 0x00FFFFFFFFFFFE00]


def _check_clean(path: Path) -> None:
    assert "No errors were found on the image." in _img("qemu", "check", str(path))


OTHER = {"qemu": "ours", "ours": "qemu"}
OPTIONS = ["cluster_size=65536", "compat=0.10", "extended_l2=on,cluster_size=16k",
           "cluster_size=512", "lazy_refcounts=on"]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("writer", ["qemu", "ours"])
def test_vmstate_reads_back_across_tools(tmp_path: Path, writer: str, options: str) -> None:
    images = {tool: _create(tmp_path / f"{tool}.qcow2", options) for tool in ("qemu", "ours")}
    for tool, image in images.items():
        _io(tool, image, *(f"write -b -P {p:#x} {off} {n}" for off, n, p in _writes(options)))
        _check_clean(image)
    # Both tools lay the area out alike: past the disk, the L1 table grown the same way.
    assert _l1_layout(images["qemu"]) == _l1_layout(images["ours"])
    _, used = _l1_layout(images["ours"])
    assert used and min(used) >= 1  # nothing in the L1 entry that maps the 3 MiB disk
    image = images[writer]
    reads = [f"read -b -P {p:#x} {off} {n}" for off, n, p in _writes(options)]
    reads += ["read -b -P 0 8192 512", "read -b -P 0 512M 4k", "read -P 0 0 3M"]
    for reader in ("qemu", "ours"):
        _io(reader, image, *reads)
    # The hex dump around the small write is the same through both tools.
    dumps = {tool: _dump(tool, image, "read -b -v 8k 2k") for tool in ("qemu", "ours")}
    assert dumps["qemu"] == dumps["ours"]
    assert len(dumps["ours"]) == 128 and "5b 5b 5b 5b" in dumps["ours"][32]


def _snapshot_rows(text: str) -> list[list[str]]:
    """``snapshot -l`` rows without the date (the two images are made at different times)."""
    rows = []
    for line in text.splitlines()[2:]:
        line = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "DATE", line)
        rows.append(line.split())
    return rows


@pytest.mark.parametrize("creator", ["qemu", "ours"])
def test_snapshot_keeps_vmstate_written_by_qemu_io(tmp_path: Path, creator: str) -> None:
    image = _create(tmp_path / "a.qcow2", "cluster_size=65536", "1M")
    _io("qemu", image, "write -b -P 0x5a 0 128k", "write -P 0x11 0 64k")
    _img(creator, "snapshot", "-c", "snap1", str(image))
    _check_clean(image)
    # A snapshot taken by the image tool saves no VM: its VM state size is 0 in both tools'
    # listings, though the area written before stays in the image (and in the snapshot).
    listings = {tool: _img(tool, "snapshot", "-l", str(image)) for tool in ("qemu", "ours")}
    assert listings["qemu"] == listings["ours"]
    assert _snapshot_rows(listings["ours"]) == [["1", "snap1", "0", "B", "DATE", "00:00:00.000",
                                                 "0"]]
    [snapshot] = _info(image)["snapshots"]
    assert (snapshot["vm-state-size"], snapshot["icount"]) == (0, 0)
    for tool in ("qemu", "ours"):
        _io(tool, image, "read -b -P 0x5a 0 128k")
    # Overwrite the area, then go back to the snapshot: the old VM state is back.
    _io(OTHER[creator], image, "write -b -P 0x77 0 64k")
    _img(creator, "snapshot", "-a", "snap1", str(image))
    _check_clean(image)
    for tool in ("qemu", "ours"):
        _io(tool, image, "read -b -P 0x5a 0 128k", "read -P 0x11 0 64k")


def _info(image: Path) -> dict[str, Any]:
    """``img info --output=json`` of ``image``, once both tools printed ``info`` alike."""
    human = {tool: _img(tool, "info", str(image)) for tool in ("qemu", "ours")}
    assert human["qemu"] == human["ours"]
    assert "Snapshot list:" in human["ours"]
    text = {tool: _img(tool, "info", "--output=json", str(image)) for tool in ("qemu", "ours")}
    assert text["qemu"] == text["ours"]
    data: dict[str, Any] = json.loads(text["ours"])
    return data


def _savevm(image: Path) -> None:
    """Take snapshot ``s1`` with HMP ``savevm`` in a guestless system emulator."""
    if QEMU_SYSTEM is None:
        if os.environ.get("BLOCKGRAPH_REQUIRE_ORACLES"):
            pytest.fail("qemu-system-x86_64 is required", pytrace=False)
        pytest.skip("qemu-system-x86_64 not installed")
    proc = subprocess.run(
        [QEMU_SYSTEM, "-machine", "none", "-nodefaults", "-display", "none",
         "-drive", f"file={image},if=none,id=d0,format=qcow2", "-monitor", "stdio"],
        input="savevm s1\nquit\n", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_savevm_snapshot_vm_size_and_state(tmp_path: Path) -> None:
    image = _create(tmp_path / "a.qcow2", "cluster_size=65536", "1M")
    _savevm(image)
    listings = {tool: _img(tool, "snapshot", "-l", str(image)) for tool in ("qemu", "ours")}
    assert listings["qemu"] == listings["ours"]
    [row] = _snapshot_rows(listings["ours"])
    assert row[1] == "s1" and row[2:4] != ["0", "B"]  # savevm recorded the state's size
    [snapshot] = _info(image)["snapshots"]
    assert snapshot["vm-state-size"] > 0 and "icount" not in snapshot
    # savevm leaves the active image without VM state; applying the snapshot brings it back.
    copies = {}
    for tool in ("qemu", "ours"):
        copies[tool] = tmp_path / f"{tool}.qcow2"
        shutil.copyfile(image, copies[tool])
        _io(tool, copies[tool], "read -b -P 0 0 64k")
        _img(tool, "snapshot", "-a", "s1", str(copies[tool]))
        _check_clean(copies[tool])
    # (The files are not byte-identical: QEMU's apply also clears the COPIED flags in the
    # snapshot's own L1 table and punches a hole where the freed L2 table was; neither
    # changes what the image holds.)
    dumps = [_dump(tool, copy, "read -b -v 0 1k") for tool in ("qemu", "ours")
             for copy in copies.values()]
    assert all(d == dumps[0] for d in dumps)
    assert "QEVM" in dumps[0][0]  # the migration stream's magic: the state really is there
    for tool in ("qemu", "ours"):
        for copy in copies.values():
            _io(tool, copy, "read -P 0 0 1M")


def test_qmp_and_hmp_list_snapshots_like_qemu_system(tmp_path: Path) -> None:
    """query-block and ``info block -v`` carry the snapshots with their VM state sizes."""
    image = _create(tmp_path / "a.qcow2", "cluster_size=65536", "1M")
    _savevm(image)  # VM state size recorded, no icount
    _img("qemu", "snapshot", "-c", "x", str(image))  # VM state size 0, icount 0
    assert QEMU_SYSTEM is not None
    requests = (b'{"execute": "qmp_capabilities"}\n'
                b'{"execute": "query-block"}\n'
                b'{"execute": "human-monitor-command",'
                b' "arguments": {"command-line": "info block -v"}}\n'
                b'{"execute": "quit"}\n')
    outputs = []
    for command in ([QEMU_SYSTEM], [str(BLOCKGRAPH), "system"]):
        proc = subprocess.Popen(
            [*command, "-machine", "none", "-nodefaults", "-display", "none",
             "-drive", "if=none,id=d0,file=a.qcow2,format=qcow2,read-only=on", "-qmp", "stdio"],
            cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(requests)
        proc.stdin.flush()
        # QEMU must not see the end of its input before it has answered: greeting, three
        # replies, SHUTDOWN, the reply to quit.
        lines = [proc.stdout.readline() for _ in range(6)]
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
        text = b"".join(lines[1:]).decode()  # the greeting names the program's version
        text = re.sub(r'"seconds": \d+, "microseconds": \d+', "TIMESTAMP", text)
        outputs.append(re.sub(r"#block\d+", "#blockN", text))
    assert outputs[1] == outputs[0]
    reply = json.loads(outputs[0].splitlines()[1])["return"][0]["inserted"]["image"]
    assert [(s["name"], s["vm-state-size"] > 0, "icount" in s) for s in reply["snapshots"]] == [
        ("s1", True, False), ("x", False, True)]
    assert outputs[0].count("Snapshot list:") == 1
