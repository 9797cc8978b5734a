"""Crash safety with an external data file: a writer killed with SIGKILL leaves an image that
``qemu-img check`` finds free of corruption, and with a writethrough BlockBackend every write
reported complete reads back (data reaches the data file before the L2 entry pointing at it).

The writer, the operations and the expectations are those of ``test_kill_writer``.
"""

from __future__ import annotations

import random
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parents[2]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.crash.test_kill_writer import CS, SIZE, _expected, _ops, run_and_kill  # noqa: E402
from tests.support.oracle import require_qemu, run  # noqa: E402

from blockgraph.graph.layer import BlockLayer  # noqa: E402

CASES = [
    (cache, raw, lazy)
    for cache in ("writethrough", "writeback")
    for raw in (False, True)
    for lazy in (False, True)
]


@pytest.mark.parametrize("cache,raw,lazy", CASES)
def test_kill_writer_with_data_file(tmp_path: Path, cache: str, raw: bool, lazy: bool) -> None:
    require_qemu()
    rng = random.Random(zlib.crc32(f"data-file-{cache}-{raw}-{lazy}".encode()))
    img = tmp_path / "t.qcow2"
    data = tmp_path / "t.data"
    opts = f"data_file={data},data_file_raw={'on' if raw else 'off'}"
    if lazy:
        opts += ",lazy_refcounts=on"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(img), str(SIZE))

    ops = _ops(rng, 60)
    kill_after = rng.randrange(1, len(ops))
    done = run_and_kill(img, cache, ops, kill_after)

    layer = BlockLayer()
    try:
        if lazy:
            # A dirty image is repaired at read-write open, as QEMU does.
            node = layer.run(layer.open_node(str(img), {"driver": "qcow2"}))
            layer.run(layer.delete_node(node))
        chk = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
        assert chk.returncode in (0, 3), chk.stdout + chk.stderr
        assert "ERROR" not in chk.stderr
        node = layer.run(layer.open_node(str(img), {"driver": "qcow2", "read-only": True}))
        buf = bytearray(SIZE)
        layer.run(node.preadv(0, memoryview(buf)))
        content = bytes(buf)
    finally:
        layer.close()
    if cache == "writethrough":
        expected, known = _expected(ops, done, None)
        _assert_known_bytes(content, expected, known, f"after {done} completed writes")
        if raw:
            # The raw data file is the disk: what was reported complete is there too.
            _assert_known_bytes(data.read_bytes(), expected, known, "in the data file")


def _assert_known_bytes(content: bytes, expected: bytearray, known: bytearray, what: str) -> None:
    # Per cluster, as plain booleans: pytest's diff of two 64 KiB byte strings takes minutes.
    for off in range(0, SIZE, CS):
        if known[off:off + CS] == b"\x01" * CS:
            same = content[off:off + CS] == expected[off:off + CS]
            assert same, f"cluster at {off} differs {what}"
        else:
            wrong = [i for i in range(off, off + CS) if known[i] and content[i] != expected[i]]
            assert not wrong, f"byte {wrong[:1]} differs {what}"
