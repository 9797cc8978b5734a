"""``blockgraph io`` against the real qemu-io 7.2: same commands, same output, same exit code.

Each scenario runs twice on identical fresh images made by qemu-img (one copy per tool, in
directories of their own so the relative paths in messages agree): once with ``qemu-io`` and
once with a symlink named ``qemu-io`` to the ``blockgraph`` console script, so messages carry
the same program name. stdout, stderr and the exit code must agree after the iotests-style
timing filter.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

QEMU_IO = shutil.which("qemu-io")
QEMU_IMG = shutil.which("qemu-img")
BLOCKGRAPH = Path(sys.executable).with_name("blockgraph")

if (QEMU_IO is None or QEMU_IMG is None) and not os.environ.get("BLOCKGRAPH_REQUIRE_ORACLES"):
    pytest.skip("qemu-io / qemu-img not installed", allow_module_level=True)

_TIMING = re.compile(r"[0-9]+ ops; [0-9:. ]+(sec )?\(.*$")
_MACHINE = re.compile(r"^([0-9]+),([0-9]+),[0-9]+:[0-9]{2}:[0-9]{2}\.[0-9]{2},[0-9.inf]+,[0-9.inf]+$")


def filter_timing(text: str) -> str:
    """iotests' timing filter: the rate and time fields of every report line become fixed."""
    lines = []
    for line in text.split("\n"):
        line = _TIMING.sub("X ops; ...", line)
        line = _MACHINE.sub(r"\1,\2,TIME,RATE,RATE", line)
        lines.append(line)
    return "\n".join(lines)


def test_filter_timing() -> None:
    assert filter_timing("4 KiB, 1 ops; 00.00 sec (9.583 MiB/sec and 2453.2352 ops/sec)") == (
        "4 KiB, X ops; ...")
    assert filter_timing("2 GiB, 1 ops; 0:00:04.84 (423.153 MiB/sec and 0.2066 ops/sec)") == (
        "2 GiB, X ops; ...")
    assert filter_timing("4096,1,0:00:00.00,325881136.129,79560.824") == "4096,1,TIME,RATE,RATE"


@dataclass
class Scenario:
    name: str
    args: list[str]
    fmt: str = "qcow2"
    size: str = "1M"
    create: list[str] = field(default_factory=list)
    stdin: str | None = None
    image: bool = True  # pass the image as the file argument


def _c(*commands: str) -> list[str]:
    out: list[str] = []
    for command in commands:
        out += ["-c", command]
    return out


SCENARIOS = [
    # -- read / write and their flags ------------------------------------------------------
    Scenario("write-read-pattern", _c(
        "write -P 0x41 0 100", "read -P 0x41 0 100", "read -P 65 0 100", "read -P 0101 0 100",
        "read -v 0 40", "read -v 10 20", "read -v -q 0 16", "write -P 0x5b 512 3",
        "write -P 0x20 515 1", "write -P 0x7a 516 1", "read -v 508 16", "read -P 0x41 -s 10 -l 20 0 100",
        "read -P 0x41 -s 90 0 100", "read -P 0x42 0 512", "read -q 0 512", "read -C 0 4k",
        "read -C -q 0 1", "read -p 0 1", "read 0 0", "write 0 0")),
    Scenario("write-flags", _c(
        "write 0 64k", "write -f 64k 4k", "write -z 128k 64k", "write -z -u 192k 64k",
        "write -z -n 256k 64k", "write -z -n 0 4k", "write -q 0 1", "write -C 0 1",
        "write -C -q 0 1", "write -p 0 1", "read -P 0 128k 64k", "map")),
    Scenario("write-errors", _c(
        "write -P 1 -z 0 1", "write -P 1 -s src.txt 0 1", "write -z -s src.txt 0 1",
        "write -b -z 0 1", "write -f -c 0 512", "write -f -b 0 512", "write -n 0 1",
        "write -u 0 1", "write -c 1 512", "write -c 0 100", "write 0 1 x", "write 2M 1",
        "write 1M 1", "write 0 3G", "write -z 0 3G", "write -z 1M 1", "write -P 300 0 1",
        "write -P x 0 1", "write -P -1 0 1", "write -x 0 1", "write -v 0 1", "write 0 1 -P",
        "write", "write 0", "write -s nonexist.txt 0 1")),
    Scenario("write-source-file", _c(
        "write -s src.txt 0 12", "read -v 0 16", "write -s src.txt 512 3", "read -v 512 16")),
    Scenario("read-errors", _c(
        "read", "read 0", "read a b", "read 0 b", "read -x 0 1", "read 0 1 -P", "read 0 1 -x",
        "read 0 512 x", "read -z 0 1", "read -s 0 0 512", "read -l 5 0 512",
        "read -P 0 -s x 0 512", "read -P 0 -l -5 0 512", "read -P 0 -s 600 0 512",
        "read -P 0x100 0 512", "read 2M 512", "read 1M 1", "read 0 3G", "read -P", "read 0 -5")),
    Scenario("raw-write-read", _c(
        "write -P 0xab 0 4k", "read -P 0xab 0 4k", "write -c 0 64k", "write -z -u 0 4k",
        "read -P 0 0 4k", "map", "alloc 0 1M", "info"), fmt="raw"),
    # -- VM state (-b) ------------------------------------------------------------------------
    Scenario("vmstate", _c(
        "read -b -P 0 0 64k", "write -b -P 0x5a 0 64k", "read -b -P 0x5a 0 64k",
        "read -b -P 0 64k 64k", "read -P 0 0 1M", "write -P 0x11 0 4k", "read -b -v 0 512",
        "write -b -c -P 0x5b 512 512", "read -b -P 0x5b 512 512", "write -b -q 1k 512",
        "read -b -C 0 512", "read -b -s 512 -l 512 -P 0x5b 0 1k", "write -b 1 512",
        "write -b 0 100", "read -b 1 512", "read -b 0 100", "write -b -z 0 512",
        "write -b -f 0 512", "write -b -P 3 1G 4k", "read -b -P 3 1G 4k",
        "read -b 0x7fffffff9ffffe00 512", "read -b 0x7fffffffa0000000 512",
        "write -b 0x7fffffffa0000000 512", "write -b 4P 512", "read -b 4P 512", "map",
        "alloc 0 1M",
        # Only read and write know -b.
        "readv -b 0 512", "writev -b 0 512", "aio_read -b 0 512", "aio_write -b 0 512",
        "aio_flush")),
    Scenario("vmstate-raw", _c("write -b 0 512", "read -b 0 512", "read -b 1 512"), fmt="raw"),
    Scenario("vmstate-read-only", ["-r", *_c("write -b 0 512", "read -b -P 0 0 512")]),
    Scenario("vmstate-writethrough", ["-t", "writethrough", *_c(
        "write -b -P 7 0 4k", "read -b -P 7 0 4k")]),
    Scenario("vmstate-backing", _c("read -b -P 0 0 64k", "write -b -P 9 0 512",
                                   "read -b -P 9 0 512", "read -P 0x11 0 64k"),
             create=["-b", "base.qcow2", "-F", "qcow2"]),
    Scenario("vmstate-extl2", _c("write -b -P 1 0 64k", "write -b -P 2 8k 512",
                                 "read -b -P 1 0 8k", "read -b -P 2 8k 512", "read -P 0 0 1M"),
             create=["-o", "extended_l2=on,cluster_size=16k"]),
    Scenario("vmstate-compat010", _c("write -b -P 1 0 64k", "read -b -P 1 0 64k"),
             create=["-o", "compat=0.10"]),
    # The area moves with the disk size; what was there becomes guest data (growing) or is
    # cut off with its L2 table (shrinking), in QEMU as here.
    Scenario("vmstate-truncate", _c("write -b -P 0x42 0 64k", "truncate 1G",
                                    "read -P 0x42 512M 64k", "read -b -P 0 0 64k",
                                    "write -b -P 0x43 0 64k", "truncate 512k",
                                    "read -b -P 0 0 64k")),
    Scenario("vmstate-empty-disk", _c("write -b -P 4 0 512", "read -b -P 4 0 512",
                                      "read 0 512"), size="0"),
    # -- readv / writev --------------------------------------------------------------------
    Scenario("readv-writev", _c(
        "writev -P 0x61 0 512 1k", "readv -P 0x61 0 512 1k", "readv -v 0 16 16",
        "readv -P 0x62 0 512", "readv -q 0 512", "readv -v -q 0 16", "writev -q 0 512", "writev -f 0 512",
        "writev -C 0 512 512", "readv -C 0 512 512", "writev -z 0 512", "readv", "readv 0",
        "writev 0", "readv 0 1x", "writev -P 300 0 1", "readv 2M 512", "writev 2M 512",
        "readv 0 3G", "readv 0 1G 1G 1G", "readv -x 0 1", "readv -q")),
    # -- aio -------------------------------------------------------------------------------
    Scenario("aio", _c(
        "aio_write -P 0x61 0 512 1k", "aio_flush", "aio_read -P 0x61 0 512", "aio_flush",
        "aio_read -v 0 16", "aio_flush", "aio_read -P 0x99 0 16", "aio_flush",
        "aio_read -q 0 16", "aio_flush", "aio_read -q -v 0 16", "aio_flush", "aio_write -f 0 1", "aio_flush", "aio_read -C 0 1",
        "aio_flush", "aio_write -q 0 1", "aio_flush", "aio_read -i 0 1", "aio_write -i 0 1",
        "aio_read 2M 512", "aio_flush", "aio_write 2M 512", "aio_flush", "aio_write -u 0 1",
        "aio_read 0 3G", "aio_read 0", "aio_write -z 0 512 512", "aio_read -x 0 1",
        "aio_write -P 0x62 64k 4k", "aio_flush", "read -P 0x62 64k 4k")),
    Scenario("aio-error-exit-status", _c("aio_read 2M 512", "aio_flush")),
    # -- discard, flush, truncate ------------------------------------------------------------
    Scenario("discard", _c(
        "write 0 128k", "discard 0 64k", "discard -q 64k 64k", "discard -C 0 512",
        "discard -C -q 0 512", "discard 0 3G", "discard 2M 1", "discard x 1", "discard 0 1 2",
        "discard -x 0 1", "discard 0", "read -P 0 0 64k", "flush", "aio_flush")),
    Scenario("truncate", _c(
        "truncate 2M", "length", "truncate -m bogus 3M", "truncate x", "truncate 1M", "length",
        "truncate -x 1", "truncate 1 2", "truncate", "truncate -m full 3M", "length")),
    Scenario("truncate-raw", _c(
        "truncate -m falloc 2M", "length", "truncate -m metadata 3M", "truncate 1M", "length"),
        fmt="raw"),
    Scenario("read-only", ["-r", *_c(
        "truncate 5M", "write 0 1", "writev 0 1", "aio_write 0 1", "discard 0 1", "flush",
        "write", "write -x", "read 0 1", "length")]),
    # -- map, alloc, length, info ------------------------------------------------------------
    Scenario("map-alloc", _c(
        "map", "write 64k 64k", "write -z 256k 64k", "map", "alloc 0", "alloc 64k",
        "alloc 0 1M", "alloc 0 1P", "alloc 1 1", "alloc 0x200 0x300", "alloc 1M", "alloc 2M",
        "alloc 64k 128k", "alloc 0 x", "alloc -1", "alloc 1 2 3", "alloc", "map x", "length",
        "length x")),
    Scenario("map-backing", ["-c", "map", "-c", "alloc 0 1M", "-c", "read -P 0 0 4k"],
             create=["-b", "base.qcow2", "-F", "qcow2"]),
    Scenario("info-qcow2", _c("info", "info x")),
    Scenario("info-compat010", _c("info"), create=["-o", "compat=0.10"]),
    Scenario("info-extl2", _c("info", "length"), size="3G",
             create=["-o", "extended_l2=on,lazy_refcounts=on,refcount_bits=64,cluster_size=128k"]),
    Scenario("info-raw", _c("info"), fmt="raw"),
    # -- numbers -----------------------------------------------------------------------------
    Scenario("cvtnum", _c(*(f"alloc {n} 1" for n in (
        "0x200", "010", "1.5k", "1.5", "512b", "512B", "1K", "1e3", "0x1k", "0x1.8k", "-0",
        "1.0", "0.5k", "1.25k", "1.3k", "1.0001k", "1P", "1E", "16E", "8E", "7E",
        "99999999999999999999", "9223372036854775807", "9223372036854775808", "1kk", "1Z",
        "1M5", "0xffffffffffffffff", "00x1", "0x", "1.k", ".5k", "+5", "1T", "0X10", "+0x10",
        "1.5b", "0x1b", "1.5e1k", "1.k5", "0xg")))),
    # -- sessions: open, close, quit, sleep, help -------------------------------------------
    Scenario("open-close", _c(
        "close", "length", "read 0 1", "close", "open t.qcow2", "open t.qcow2", "length",
        "close", "open -r -o driver=raw t.qcow2", "info", "write 0 1", "close", "open -x",
        "open -t bogus t.qcow2", "open -d bogus t.qcow2", "open -i bogus t.qcow2",
        "open /nonexist", "open -o foo=bar t.qcow2", "open", "open t.qcow2 x",
        "open -s t.qcow2", "write -P 7 0 1", "close", "open -r t.qcow2", "read -P 0 0 1",
        "close", "open -o driver=qcow2", "open -U t.qcow2",
        "open -n -k -C -d unmap -t none t.qcow2", "info", "close",
        "open -o driver=qcow2,file.filename=t.qcow2", "length"), image=False),
    Scenario("no-file", _c(
        "alloc 0", "map", "truncate 1", "sleep 1", "info", "flush", "aio_flush", "discard 0 1",
        "write 0 1", "help nosuch"), image=False),
    Scenario("sleep-quit", _c(
        "sleep 10", "sleep x", "sleep -5", "sleep 1k", "sleep", "sleep 1 2", "quit", "length")),
    Scenario("help", _c("help", *(f"help {c}" for c in (
        "abort", "aio_flush", "aio_read", "aio_write", "alloc", "break", "close", "discard",
        "flush", "help", "info", "length", "map", "open", "quit", "read", "readv",
        "remove_break", "reopen", "resume", "sigraise", "sleep", "truncate", "wait_break",
        "write", "writev")), "help nosuch", "help a b")),
    Scenario("blkdebug-commands", _c(
        "break write_aio A", "remove_break A", "resume A", "sigraise x", "bogus")),
    Scenario("reopen", _c(
        "reopen -r", "write 0 1", "reopen -w", "write 0 1", "reopen -c none", "reopen -c bogus",
        "reopen -r -w", "reopen -x", "reopen extra", "reopen -o cache.direct=on", "read 0 1")),
    Scenario("splitting", _c("read  0   512", "read\t0 512", "read '0' 512", "  length  ")),
    # -- the command line ---------------------------------------------------------------------
    Scenario("stdin", [], stdin="read 0 512\nlength\n\nbogus\nquit\nlength\n"),
    Scenario("stdin-eof-no-newline", [], stdin="length"),
    Scenario("stdin-failure-status", [], stdin="read 0 2M\n"),
    Scenario("snapshot", ["-s", *_c("write -P 5 0 4k", "read -P 5 0 4k")]),
    Scenario("snapshot-discarded", _c("read -P 0 0 4k")),
    Scenario("format-raw-on-qcow2", ["-f", "raw", *_c("length", "alloc 1M")]),
    Scenario("format-bogus", ["-f", "bogus", *_c("length")]),
    Scenario("cache-bogus", ["-t", "bogus"]),
    Scenario("cache-none", ["-t", "none", *_c("write 0 4k", "read 0 4k")]),
    Scenario("nocache", ["-n", *_c("write 0 4k", "read 0 4k")]),
    Scenario("discard-bogus", ["-d", "bogus"]),
    Scenario("aio-bogus", ["-i", "bogus"]),
    Scenario("aio-threads", ["-i", "threads", *_c("length")]),
    Scenario("force-share-rw", ["-U", *_c("length")]),
    Scenario("force-share-ro", ["-U", "-r", *_c("length")]),
    Scenario("invalid-option", ["-x"]),
    Scenario("help-option", ["-h"], image=False),
    Scenario("extra-argument", [*_c("length"), "t.qcow2"]),
    Scenario("missing-image", [*_c("length"), "nonexist.qcow2"], image=False),
    Scenario("image-opts", ["--image-opts", *_c("length", "info"), "driver=qcow2,file.filename=t.qcow2"],
             image=False),
    Scenario("image-opts-format", ["--image-opts", "-f", "qcow2", "t.qcow2"], image=False),
    Scenario("exit-status-ok", _c("read 0 1", "length")),
]


def _make_dir(root: Path, scenario: Scenario) -> Path:
    assert QEMU_IMG is not None and QEMU_IO is not None
    path = root
    path.mkdir()
    (path / "src.txt").write_bytes(b"hello")
    if scenario.create and "base.qcow2" in scenario.create:
        subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(path / "base.qcow2"), scenario.size],
                       check=True)
        subprocess.run([QEMU_IO, "-c", "write -P 0x11 0 64k", str(path / "base.qcow2")], check=True,
                       capture_output=True)
    subprocess.run([QEMU_IMG, "create", "-q", "-f", scenario.fmt, *scenario.create,
                    str(path / f"t.{scenario.fmt}"), scenario.size], check=True)
    return path


def _run(program: str, cwd: Path, scenario: Scenario) -> tuple[str, str, int]:
    args = [program, *scenario.args]
    if scenario.image:
        args += ["-f", scenario.fmt, f"t.{scenario.fmt}"] if "-f" not in scenario.args else [
            f"t.{scenario.fmt}"]
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120,
                          input=scenario.stdin if scenario.stdin is not None else "")
    # getopt names the program by its path as invoked.
    stderr = proc.stderr.replace(f"{program}:", "qemu-io:")
    return filter_timing(proc.stdout), filter_timing(stderr), proc.returncode


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_same_output_as_qemu_io(scenario: Scenario, tmp_path: Path) -> None:
    assert QEMU_IO is not None
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "qemu-io").symlink_to(BLOCKGRAPH)
    ours = _run(str(bindir / "qemu-io"), _make_dir(tmp_path / "ours", scenario), scenario)
    theirs = _run(QEMU_IO, _make_dir(tmp_path / "qemu", scenario), scenario)
    # The real binary's basename is qemu-io too, so prefixes agree; compare as a whole so a
    # failure shows every difference at once.
    assert ours == theirs
