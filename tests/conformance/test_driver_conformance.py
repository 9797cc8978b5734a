"""One conformance suite over every driver configuration, through a BlockBackend.

Each configuration is opened as the root of a BlockBackend, so every request goes through the
request layer (bounds, alignment padding, read-modify-write, zero fallback, FUA emulation) before
it reaches a driver. A ``bytearray`` model says what every read must return. Discard is
advisory: a discarded byte reads either as before or as zero, and the model follows what the
device reports (while bytes outside the range must not change).
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if str(Path(__file__).resolve().parents[2]) not in sys.path:
    # Lets ``tests.support`` import under a bare ``pytest`` run (no rootdir on sys.path).
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.graphutil import make_qcow2  # noqa: E402
from tests.support.oracle import HAVE_QEMU, run  # noqa: E402

from blockgraph.drivers.base import BlockStatusFlags, RequestFlags  # noqa: E402
from blockgraph.errors import BlockError, IOFailure  # noqa: E402
from blockgraph.graph.layer import BlockLayer  # noqa: E402
from blockgraph.graph.node import BlockBackend  # noqa: E402

SIZE = 256 * 1024


def _random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@dataclass
class Config:
    """How to build one driver configuration in a directory, and what to expect of it."""

    id: str
    # dir -> (filename, options, initial contents, the image file to check with qemu-img)
    build: Callable[[Path, int], tuple[str | None, dict[str, object], bytes, str | None]]
    retains: bool = True  # writes read back (null-co forgets them)
    truncate: bool = True  # the node can be resized
    truncate_sectors: bool = False  # new sizes must be whole sectors (qcow2, as QEMU)
    persistent: bool = True  # data survives close + reopen
    growable_root: bool = False  # a protocol root over a file (no range check of its own)


def _file(d: Path, size: int, name: str = "img.raw") -> tuple[str, bytes]:
    data = _random_bytes(size, 1)
    path = d / name
    path.write_bytes(data)
    return str(path), data


def _build_file(d: Path, size: int) -> tuple[str | None, dict[str, object], bytes, str | None]:
    path, data = _file(d, size)
    return None, {"driver": "file", "filename": path}, data, None


def _build_file_direct(d: Path, size: int) -> tuple[str | None, dict[str, object], bytes, str | None]:
    path, data = _file(d, size)
    return None, {"driver": "file", "filename": path, "cache.direct": "on"}, data, None


def _build_raw(d: Path, size: int) -> tuple[str | None, dict[str, object], bytes, str | None]:
    path, data = _file(d, size)
    return None, {"driver": "raw", "file.driver": "file", "file.filename": path}, data, None


def _build_blkdebug(d: Path, size: int) -> tuple[str | None, dict[str, object], bytes, str | None]:
    path, data = _file(d, size)
    return None, {"driver": "blkdebug", "image.driver": "file", "image.filename": path}, data, None


def _build_null(d: Path, size: int) -> tuple[str | None, dict[str, object], bytes, str | None]:
    return None, {"driver": "null-co", "size": str(size), "read-zeroes": "on"}, bytes(size), None


def _build_qcow2(d: Path, size: int, cluster_size: int = 65536) -> tuple[str | None, dict[str, object], bytes, str | None]:
    path = make_qcow2(d / "img.qcow2", size, cluster_size=cluster_size)
    return path, {"driver": "qcow2"}, bytes(size), path


def _build_qcow2_small(d: Path, size: int) -> tuple[str | None, dict[str, object], bytes, str | None]:
    return _build_qcow2(d, size, cluster_size=4096)


def _build_qcow2_backing(d: Path, size: int, cluster_size: int = 65536) -> tuple[str | None, dict[str, object], bytes, str | None]:
    base, data = _file(d, size, "base.raw")
    path = make_qcow2(d / "img.qcow2", size, backing=base, backing_fmt="raw",
                      cluster_size=cluster_size)
    return path, {"driver": "qcow2"}, data, path


def _build_qcow2_backing_small(d: Path, size: int) -> tuple[str | None, dict[str, object], bytes, str | None]:
    return _build_qcow2_backing(d, size, cluster_size=4096)


def _build_qcow2_data_file(d: Path, size: int, raw: bool = False,
                          cluster_size: int = 65536) -> tuple[str | None, dict[str, object], bytes, str | None]:
    from blockgraph.graph.create import create_image

    path = str(d / "img.qcow2")
    layer = BlockLayer()
    try:
        # An absolute name: the data file is found whatever the working directory.
        layer.run(create_image(layer, path, "qcow2", size, {
            "cluster_size": cluster_size, "data_file": str(d / "img.data"),
            "data_file_raw": raw}))
    finally:
        layer.close()
    return path, {"driver": "qcow2"}, bytes(size), path


def _build_qcow2_data_file_raw(d: Path, size: int) -> tuple[str | None, dict[str, object], bytes, str | None]:
    return _build_qcow2_data_file(d, size, raw=True)


def _build_qcow2_data_file_small(d: Path, size: int) -> tuple[str | None, dict[str, object], bytes, str | None]:
    return _build_qcow2_data_file(d, size, cluster_size=4096)


def _build_qcow2_data_file_raw_small(d: Path, size: int) -> tuple[str | None, dict[str, object], bytes, str | None]:
    return _build_qcow2_data_file(d, size, raw=True, cluster_size=4096)


CONFIGS = [
    Config("file", _build_file, growable_root=True),
    Config("raw-file", _build_raw),
    Config("qcow2", _build_qcow2, truncate_sectors=True),
    Config("qcow2-backing", _build_qcow2_backing, truncate_sectors=True),
    Config("qcow2-data-file", _build_qcow2_data_file, truncate_sectors=True),
    Config("qcow2-data-file-raw", _build_qcow2_data_file_raw, truncate_sectors=True),
    Config("null-co", _build_null, retains=False, truncate=False, persistent=False),
    Config("blkdebug-file", _build_blkdebug),
    Config("file-direct", _build_file_direct, growable_root=True),
]
BY_ID = {c.id: c for c in CONFIGS}


class Device:
    """One opened configuration plus its model."""

    def __init__(self, config: Config, directory: Path, size: int = SIZE,
                 builder: Callable[..., Any] | None = None,
                 extra_options: dict[str, object] | None = None) -> None:
        self.config = config
        self.extra_options = extra_options or {}
        self.dir = directory
        self.filename, self.options, initial, self.image = (builder or config.build)(directory, size)
        self.model = bytearray(initial)
        self.layer = BlockLayer()
        self.bb = self._open(self.layer)

    def _open(self, layer: BlockLayer) -> BlockBackend:
        bb = layer.new_backend("drive0")
        layer.run(layer.open_node(self.filename, {**self.options, "discard": "unmap", **self.extra_options}, backend=bb))
        return bb

    @property
    def root(self) -> Any:
        assert self.bb.root is not None
        return self.bb.root

    def close(self) -> None:
        self.layer.close()

    # -- operations, each checked against the model --------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.layer.run(self.bb.preadv(offset, memoryview(buf)))
        return bytes(buf)

    def check(self, offset: int, length: int) -> None:
        got = self.read(offset, length)
        want = bytes(self.model[offset:offset + length])
        if got != want:
            first = next(i for i in range(length) if got[i] != want[i])
            pytest.fail(f"{self.config.id}: read {offset}+{length} differs from the model at "
                        f"byte {offset + first}: got {got[first]:#x}, want {want[first]:#x}")

    def check_all(self) -> None:
        self.check(0, len(self.model))

    def write(self, offset: int, data: bytes) -> None:
        self.layer.run(self.bb.pwritev(offset, memoryview(data)))
        if self.config.retains:
            self.model[offset:offset + len(data)] = data

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        flags = RequestFlags.MAY_UNMAP if unmap else RequestFlags.NONE
        self.layer.run(self.bb.pwrite_zeroes(offset, length, flags))
        if self.config.retains:
            self.model[offset:offset + length] = bytes(length)

    def discard(self, offset: int, length: int) -> None:
        outside_before = bytes(self.model)
        self.layer.run(self.bb.pdiscard(offset, length))
        got = self.read(offset, length)
        for i, b in enumerate(got):
            if b != 0 and b != self.model[offset + i]:
                pytest.fail(f"{self.config.id}: discarded byte {offset + i} reads {b:#x}, "
                            f"neither its old value {self.model[offset + i]:#x} nor zero")
        self.model[offset:offset + length] = got
        assert bytes(self.model[:offset]) == outside_before[:offset]

    def flush(self) -> None:
        self.layer.run(self.bb.flush())

    def block_status_walk(self) -> None:
        """Cover the whole device with block status answers; ZERO must mean zeroes."""
        size = self.bb.getlength()
        pos = 0
        while pos < size:
            status = self.layer.run(self.root.block_status(pos, size - pos))
            assert 0 < status.length <= size - pos, (pos, status)
            if status.flags & BlockStatusFlags.ZERO:
                assert not any(self.model[pos:pos + status.length]), (
                    f"{self.config.id}: block status says zero at {pos}+{status.length}")
            pos += status.length
        eof = self.layer.run(self.root.block_status(size, 512))
        assert eof.length == 0 and eof.flags & BlockStatusFlags.EOF

    def reopen_and_check(self) -> None:
        """Close, open the same configuration in a fresh layer, and compare with the model."""
        self.flush()
        self.layer.close()
        self.layer = BlockLayer()
        self.bb = self._open(self.layer)
        self.check_all()


@pytest.fixture(params=CONFIGS, ids=lambda c: c.id)
def device(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Device]:
    dev = Device(request.param, tmp_path)
    yield dev
    dev.close()


# -- the deterministic suite -----------------------------------------------------------------------


def test_getlength(device: Device) -> None:
    assert device.bb.getlength() == SIZE
    assert device.root.getlength() == SIZE


def test_initial_contents(device: Device) -> None:
    device.check_all()


RANGES = [
    (0, 0), (0, 1), (1, 1), (1, 511), (0, 512), (511, 2), (513, 1000), (4095, 4098),
    (65535, 2), (65536 - 700, 1500), (3 * 65536 - 1, 65536 + 1), (SIZE - 1, 1), (SIZE - 513, 513),
    (SIZE - 4096, 4096), (0, SIZE),
]


@pytest.mark.parametrize(("offset", "length"), RANGES)
def test_write_read(device: Device, offset: int, length: int) -> None:
    data = _random_bytes(length, offset + 7)
    device.write(offset, data)
    device.check(max(0, offset - 600), min(SIZE, offset + length + 600) - max(0, offset - 600))
    device.check_all()


def test_overlapping_writes(device: Device) -> None:
    for i, (offset, length) in enumerate(RANGES[:-1]):
        device.write(offset, bytes([i + 1]) * length)
    device.check_all()


@pytest.mark.parametrize("unmap", [False, True])
@pytest.mark.parametrize(("offset", "length"), [
    (0, 512), (1, 1), (100, 5000), (65536, 65536), (65536 - 3, 65536 + 6), (SIZE - 700, 700),
    (0, SIZE),
])
def test_write_zeroes(device: Device, offset: int, length: int, unmap: bool) -> None:
    device.write(0, _random_bytes(SIZE, 3))
    device.write_zeroes(offset, length, unmap)
    device.check_all()


@pytest.mark.parametrize(("offset", "length"), [
    (0, 512), (3, 1000), (65536, 65536), (65536 - 3, 2 * 65536 + 6), (SIZE - 4096, 4096),
    (0, SIZE),
])
def test_discard(device: Device, offset: int, length: int) -> None:
    device.write(0, _random_bytes(SIZE, 4))
    device.discard(offset, length)
    device.check_all()
    # Writes after a discard land as usual.
    device.write(offset, b"\x5a" * min(length, 1000))
    device.check_all()


def test_flush_and_persistence(device: Device) -> None:
    device.write(1000, _random_bytes(70000, 5))
    device.write_zeroes(200_000, 9000)
    device.flush()
    device.flush()  # a second flush with nothing new is fine
    if device.config.persistent:
        device.reopen_and_check()
    else:
        device.check_all()


def test_block_status(device: Device) -> None:
    device.block_status_walk()
    device.write(70_000, _random_bytes(20_000, 6))
    device.write_zeroes(131_072, 65536)
    device.block_status_walk()


def test_truncate(device: Device) -> None:
    if not device.config.truncate:
        with pytest.raises(IOFailure) as info:
            device.layer.run(device.root.truncate(SIZE + 65536))
        assert info.value.errno == errno.ENOTSUP
        assert device.bb.getlength() == SIZE
        device.check_all()
        return
    for new_size in (SIZE + 65536, SIZE // 2, SIZE // 2 + 1000, SIZE):
        if device.config.truncate_sectors and new_size % 512:
            with pytest.raises(BlockError, match="The new size must be a multiple of 512"):
                device.layer.run(device.root.truncate(new_size))
            continue
        device.layer.run(device.root.truncate(new_size))
        old = len(device.model)
        if new_size < old:
            del device.model[new_size:]
        else:
            device.model.extend(bytes(new_size - old))
        # Nodes are measured in whole sectors, as in QEMU: the tail of the last one reads as
        # zeroes.
        sectors = -(-new_size // 512) * 512
        device.model.extend(bytes(sectors - new_size))
        assert device.bb.getlength() == sectors
        device.check_all()
    device.write(SIZE - 11, b"end-of-disk")
    device.check_all()


@pytest.mark.parametrize(("what", "offset", "length"), [
    ("read", SIZE, 1), ("read", SIZE - 1, 2), ("write", SIZE, 512), ("write", SIZE - 100, 200),
    ("zero", SIZE, 512),
])
def test_out_of_range(request: pytest.FixtureRequest, device: Device, what: str, offset: int,
                      length: int) -> None:
    with pytest.raises(IOFailure) as info:
        if what == "read":
            device.read(offset, length)
        elif what == "write":
            device.write(offset, b"x" * length)
        else:
            device.write_zeroes(offset, length)
    assert info.value.errno == errno.EIO
    assert device.bb.getlength() == SIZE
    device.check_all()


def test_discard_then_rewrite_survives_flush(request: pytest.FixtureRequest,
                                             device: Device) -> None:
    device.write(0, _random_bytes(2 * 65536, 8))
    device.discard(0, 65536)
    device.write(0, b"\x01" * 512)
    device.write(70_000, b"\x02" * 512)
    device.check_all()
    device.flush()
    device.check_all()


def test_concurrent_unaligned_writes(device: Device) -> None:
    # Overlapping read-modify-writes in flight together must not lose each other's bytes.
    async def many() -> None:
        await asyncio.gather(*(
            device.bb.pwritev(4096 * (i // 4) + 100 * i + 1, memoryview(bytes([i + 1]) * 90))
            for i in range(32)))

    device.layer.run(many())
    if device.config.retains:
        for i in range(32):
            off = 4096 * (i // 4) + 100 * i + 1
            device.model[off:off + 90] = bytes([i + 1]) * 90
    device.check_all()


def test_qcow2_images_pass_check(tmp_path: Path) -> None:
    if not HAVE_QEMU:
        if os.environ.get("BLOCKGRAPH_REQUIRE_ORACLES"):
            pytest.fail("qemu-img is required (BLOCKGRAPH_REQUIRE_ORACLES is set)")
        pytest.skip("qemu-img not installed")
    for config in (BY_ID["qcow2"], BY_ID["qcow2-backing"], BY_ID["qcow2-data-file"],
                   BY_ID["qcow2-data-file-raw"]):
        d = tmp_path / config.id
        d.mkdir()
        dev = Device(config, d)
        try:
            for offset, length in RANGES:
                dev.write(offset, _random_bytes(length, offset))
            dev.write_zeroes(65536, 65536, unmap=True)
            dev.discard(131072, 65536)
        finally:
            dev.close()
        assert dev.image is not None
        run("qemu-img", "check", dev.image)
        want = d / "want.raw"
        want.write_bytes(bytes(dev.model))
        run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", dev.image, str(want))


# -- random operation sequences ------------------------------------------------------------------

HSIZE = 64 * 1024

_offsets = st.integers(0, HSIZE - 1)
_op = st.one_of(
    st.tuples(st.just("write"), _offsets, st.integers(1, 9000), st.integers(1, 255)),
    st.tuples(st.just("zero"), _offsets, st.integers(1, 20000), st.booleans()),
    st.tuples(st.just("discard"), _offsets, st.integers(1, 20000), st.just(0)),
    st.tuples(st.just("read"), _offsets, st.integers(1, 9000), st.just(0)),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
)

HYPOTHESIS_CONFIGS = {
    "file": _build_file,
    "file-direct": _build_file_direct,
    "raw-file": _build_raw,
    "qcow2": _build_qcow2_small,
    "qcow2-backing": _build_qcow2_backing_small,
    "qcow2-data-file": _build_qcow2_data_file_small,
    "qcow2-data-file-raw": _build_qcow2_data_file_raw_small,
}


@pytest.mark.parametrize("config_id", list(HYPOTHESIS_CONFIGS))
@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(_op, min_size=1, max_size=25))
def test_random_operations(config_id: str, ops: list[tuple[str, int, int, Any]]) -> None:
    config = BY_ID[config_id]
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as d:
        # qcow2's pass-through of discards to its file loses data (see
        # test_discard_then_rewrite_survives_flush): keep it off here so the random sequences
        # look for other bugs; the qcow2 discard itself still runs.
        extra: dict[str, object] = {"file.discard": "ignore"} if config_id.startswith("qcow2") else {}
        dev = Device(config, Path(d), HSIZE, HYPOTHESIS_CONFIGS[config_id], extra)
        try:
            for kind, offset, length, arg in ops:
                length = min(length, HSIZE - offset)
                if kind == "write":
                    dev.write(offset, bytes([arg]) * length)
                elif kind == "zero":
                    dev.write_zeroes(offset, length, bool(arg))
                elif kind == "discard":
                    dev.discard(offset, length)
                elif kind == "read":
                    dev.check(offset, length)
                else:
                    dev.flush()
            dev.check_all()
            dev.block_status_walk()
            dev.reopen_and_check()
        finally:
            dev.close()
        if dev.image is not None and HAVE_QEMU:
            run("qemu-img", "check", dev.image)
