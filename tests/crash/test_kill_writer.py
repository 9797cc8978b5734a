"""Crash safety: a writer killed with SIGKILL at a random point leaves a consistent qcow2.

The writer is a subprocess using the library (BlockLayer + BlockBackend). It reports each
completed operation on a pipe; the test kills it after a random number of them, with no
sleeps. Then the real ``qemu-img check`` must find no corruption (leaks are allowed) — for
lazy refcounts after our read-write open repaired the dirty image, as QEMU's open does — the
image must open with our driver, and with a writethrough BlockBackend every write reported
complete must read back.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

if str(Path(__file__).resolve().parents[2]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.oracle import require_qemu, run  # noqa: E402

from blockgraph.graph.layer import BlockLayer  # noqa: E402

SIZE = 8 << 20
CS = 65536

WRITER = r"""
import json, sys
from blockgraph.drivers.base import RequestFlags
from blockgraph.graph.layer import BlockLayer

path, cache, ops = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
modes = {"writethrough": ({}, False), "writeback": ({}, True),
         "none": ({"cache.direct": True}, True), "unsafe": ({"cache.no-flush": True}, True)}
node_opts, write_cache = modes[cache]
layer = BlockLayer()
bb = layer.new_backend("w")
bb.write_cache = write_cache
layer.run(layer.open_node(path, {"driver": "qcow2", **node_opts}, backend=bb))
out = sys.stdout
out.write("ready\n")
out.flush()
for i, (kind, off, length, pattern) in enumerate(ops):
    if kind == "write":
        layer.run(bb.pwritev(off, memoryview(bytes([pattern]) * length)))
    elif kind == "zero":
        layer.run(bb.pwrite_zeroes(off, length, RequestFlags.MAY_UNMAP))
    else:
        layer.run(bb.pdiscard(off, length))
    out.write(f"{i}\n")
    out.flush()
out.write("done\n")
out.flush()
sys.stdin.read()  # wait to be killed
"""


def _ops(rng: random.Random, n: int) -> list[tuple[str, int, int, int]]:
    ops = []
    for _ in range(n):
        kind = rng.choices(["write", "zero", "discard"], [6, 2, 2])[0]
        off = rng.randrange(0, SIZE // 512 - 1) * 512
        length = min(rng.choice([512, 4096, CS, 3 * CS + 512, 5 * CS]), SIZE - off)
        ops.append((kind, off, length, rng.randrange(1, 256)))
    return ops


def _expected(ops: list[tuple[str, int, int, int]], done: int, backing: bytes | None
              ) -> tuple[bytearray, bytearray]:
    """Expected contents after ops[:done], and a mask of bytes whose content is known."""
    data = bytearray(backing if backing is not None else bytes(SIZE))
    known = bytearray(b"\x01" * SIZE)
    for i, (kind, off, length, pattern) in enumerate(ops):
        if i < done:
            if kind == "write":
                data[off:off + length] = bytes([pattern]) * length
                known[off:off + length] = b"\x01" * length
            elif kind == "zero":
                data[off:off + length] = bytes(length)
                known[off:off + length] = b"\x01" * length
            else:  # discard: the content is unspecified
                known[off:off + length] = bytes(length)
        else:
            # Not reported before the kill: in flight, or done but its report still unread (the
            # writer runs ahead of the test's reads). Either way anything goes there.
            known[off:off + length] = bytes(length)
    return data, known


async def _read_all(layer: BlockLayer, path: Path) -> bytes:
    node = await layer.open_node(str(path), {"driver": "qcow2", "read-only": True})
    buf = bytearray(SIZE)
    await node.preadv(0, memoryview(buf))
    await layer.delete_node(node)
    return bytes(buf)


CASES = [
    (cache, backing, lazy)
    for cache in ("writethrough", "writeback", "none", "unsafe")
    for backing in (False, True)
    for lazy in (False, True)
    if not (lazy and cache in ("none", "unsafe") and backing)
]


def run_and_kill(img: Path, cache: str, ops: list[Any], kill_after: int) -> int:
    """Run the writer on ``img`` and SIGKILL it once ``kill_after`` operations have been
    reported complete (or when it finishes first).

    :return: how many operations it reported complete.
    """
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(img), cache, json.dumps(ops)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    done = 0
    try:
        line = proc.stdout.readline()
        assert line == "ready\n", proc.stderr.read() if proc.stderr else line
        while done < kill_after:
            line = proc.stdout.readline()
            if not line or line == "done\n":
                break
            done = int(line) + 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return done


@pytest.mark.parametrize("cache,backing,lazy", CASES)
def test_kill_writer(tmp_path: Path, cache: str, backing: bool, lazy: bool) -> None:
    require_qemu()
    seed = zlib.crc32(f"{cache}-{backing}-{lazy}".encode())
    rng = random.Random(seed)
    img = tmp_path / "t.qcow2"
    base_data: bytes | None = None
    create = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if lazy:
        create += ["-o", "lazy_refcounts=on"]
    if backing:
        base = tmp_path / "base.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(SIZE))
        run("qemu-io", "-c", "write -P 0x5a 0 3M", "-c", "write -P 0x33 5M 1M", str(base))
        base_data = bytes([0x5A]) * (3 << 20) + bytes(2 << 20) + bytes([0x33]) * (1 << 20)
        base_data += bytes(SIZE - len(base_data))
        create += ["-b", str(base), "-F", "qcow2"]
    run(*create, str(img), str(SIZE))

    ops = _ops(rng, 60)
    kill_after = rng.randrange(1, len(ops))
    done = run_and_kill(img, cache, ops, kill_after)

    if lazy:
        # QEMU repairs a dirty image at read-write open; so do we (and silently for reads).
        layer = BlockLayer()
        node = layer.run(layer.open_node(str(img), {"driver": "qcow2"}))
        layer.run(layer.delete_node(node))
        layer.close()
    chk = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert chk.returncode in (0, 3), chk.stdout + chk.stderr
    assert "ERROR" not in chk.stderr

    layer = BlockLayer()
    try:
        content = layer.run(_read_all(layer, img))
    finally:
        layer.close()
    if cache == "writethrough":
        expected, known = _expected(ops, done, base_data)
        # Compare to plain booleans: pytest's diff of two 64 KiB byte strings takes minutes.
        for off in range(0, SIZE, CS):
            mask = known[off:off + CS]
            if mask == b"\x01" * CS:
                same = content[off:off + CS] == expected[off:off + CS]
                assert same, f"cluster at {off} differs after {done} completed writes"
            else:
                wrong = [i for i in range(off, off + CS) if known[i] and content[i] != expected[i]]
                assert not wrong, f"byte {wrong[:1]} differs after {done} completed writes"
