"""qcow2 external data files without QEMU: entry classification, the flush dependency, the
layout of what we write (metadata in ``file``, data at guest offsets in ``data-file``), and the
open-time refusals."""

from __future__ import annotations

import random
import struct
import sys
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parents[2]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from blockgraph.drivers.base import BlockStatusFlags, RequestFlags  # noqa: E402
from blockgraph.drivers.qcow2.header import parse_header  # noqa: E402
from blockgraph.drivers.qcow2.tables import ClusterType, Qcow2Cache, cluster_type  # noqa: E402
from blockgraph.errors import BlockError  # noqa: E402
from blockgraph.graph.create import create_image  # noqa: E402
from blockgraph.graph.layer import BlockLayer  # noqa: E402

MiB = 1 << 20
COPIED = 1 << 63


@pytest.mark.parametrize(("entry", "plain", "with_data_file"), [
    (0, ClusterType.UNALLOCATED, ClusterType.UNALLOCATED),
    (COPIED, ClusterType.UNALLOCATED, ClusterType.NORMAL),  # host offset 0 in the data file
    (COPIED | 1, ClusterType.ZERO_PLAIN, ClusterType.ZERO_PLAIN),
    (COPIED | 0x10000, ClusterType.NORMAL, ClusterType.NORMAL),
    (COPIED | 0x10001, ClusterType.ZERO_ALLOC, ClusterType.ZERO_ALLOC),
    (1, ClusterType.ZERO_PLAIN, ClusterType.ZERO_PLAIN),
])
def test_cluster_type(entry: int, plain: ClusterType, with_data_file: ClusterType) -> None:
    assert cluster_type(entry) is plain
    assert cluster_type(entry, True) is with_data_file


class _Recorder:
    """A child that records what is done to it (enough of ``ChildAccess`` for the cache)."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    async def preadv(self, offset: int, buf: memoryview, flags: object = None) -> None:
        buf[:] = bytes(len(buf))

    async def pwritev(self, offset: int, buf: memoryview, flags: object = None) -> None:
        self.log.append(f"{self.name} write {offset:#x}")

    async def flush(self) -> None:
        self.log.append(f"{self.name} flush")


def test_cache_flush_dependency_covers_the_data_file() -> None:
    import asyncio

    log: list[str] = []
    file, data = _Recorder("file", log), _Recorder("data", log)
    cache = Qcow2Cache("l2", file, 512, 4)  # type: ignore[arg-type]
    cache.data_file = data  # type: ignore[assignment]

    async def scenario() -> None:
        await cache.get_empty(0x1000)
        cache.mark_dirty(0x1000)
        cache.set_depends_on_flush()
        await cache.write()
        await cache.get_empty(0x2000)
        cache.mark_dirty(0x2000)
        await cache.write()  # no dependency any more: no flush

    asyncio.run(scenario())
    assert log == ["data flush", "file flush", "file write 0x1000", "file write 0x2000"]


def _layout(tmp_path: Path, raw: bool) -> tuple[bytes, bytes, bytes]:
    layer = BlockLayer()
    rng = random.Random(11)
    payload = rng.randbytes(100 * 1024)
    try:
        layer.run(create_image(layer, str(tmp_path / "x.qcow2"), "qcow2", MiB,
                               {"data_file": str(tmp_path / "d.raw"), "data_file_raw": raw}))
        node = layer.run(layer.open_node(str(tmp_path / "x.qcow2"), {"driver": "qcow2"}))
        layer.run(node.pwritev(300 * 1024, memoryview(payload)))
        st = layer.run(node.block_status(300 * 1024, 4096))
        assert st.flags & BlockStatusFlags.OFFSET_VALID and st.offset == 300 * 1024
        assert st.file is not None and st.file.filename == str(tmp_path / "d.raw")
        assert not st.recurse
        layer.run(node.flush())
    finally:
        layer.close()
    return ((tmp_path / "x.qcow2").read_bytes(), (tmp_path / "d.raw").read_bytes(), payload)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "nonraw"])
def test_data_at_guest_offsets_metadata_in_file(tmp_path: Path, raw: bool) -> None:
    image, data, payload = _layout(tmp_path, raw)
    h = parse_header(image[:65536], len(image))
    assert h.data_file == str(tmp_path / "d.raw")
    assert h.incompatible_features & 4
    assert bool(h.autoclear_features & 2) == raw
    assert len(data) == MiB
    assert data[300 * 1024:400 * 1024] == payload
    # The image holds header, refcount table and block, L1, one L2 table: no data clusters.
    assert len(image) == 5 * 65536
    l2 = image[4 * 65536:5 * 65536]
    entries = struct.unpack(">16Q", l2[:128])
    written = range(300 * 1024 // 65536, (400 * 1024 - 1) // 65536 + 1)
    for i, entry in enumerate(entries):
        if raw or i in written:
            assert entry == COPIED | (i * 65536), i  # host offset == guest offset
        else:
            assert entry == 0, i


def test_open_refusals(tmp_path: Path) -> None:
    layer = BlockLayer()
    try:
        layer.run(create_image(layer, str(tmp_path / "n.qcow2"), "qcow2", MiB, {}))
        (tmp_path / "e.raw").touch()
        with pytest.raises(BlockError) as exc:
            layer.run(layer.open_node(str(tmp_path / "n.qcow2"), {
                "driver": "qcow2", "data-file.filename": str(tmp_path / "e.raw")}))
        assert str(exc.value) == ("'data-file' can only be set for images with an external "
                                  "data file")
        assert layer.nodes == []  # nothing left half-open
        layer.run(create_image(layer, str(tmp_path / "x.qcow2"), "qcow2", MiB,
                               {"data_file": str(tmp_path / "d.raw")}))
        (tmp_path / "d.raw").unlink()
        with pytest.raises(BlockError) as exc:
            layer.run(layer.open_node(str(tmp_path / "x.qcow2"), {"driver": "qcow2"}))
        assert str(exc.value) == f"Could not open '{tmp_path / 'd.raw'}': No such file or directory"
        assert layer.nodes == []
        # Described without I/O, the missing data file does not matter.
        node = layer.run(layer.open_node(str(tmp_path / "x.qcow2"),
                                         {"driver": "qcow2", "read-only": True}, no_io=True))
        assert node.child("data-file") is None
        assert node.driver.info().extra["data-file"] == str(tmp_path / "d.raw")
    finally:
        layer.close()


def test_compressed_write_refused(tmp_path: Path) -> None:
    from blockgraph.errors import IOFailure

    layer = BlockLayer()
    try:
        layer.run(create_image(layer, str(tmp_path / "x.qcow2"), "qcow2", MiB,
                               {"data_file": str(tmp_path / "d.raw")}))
        node = layer.run(layer.open_node(str(tmp_path / "x.qcow2"), {"driver": "qcow2"}))
        with pytest.raises(IOFailure) as exc:
            layer.run(node.pwritev(0, memoryview(bytes(65536)), RequestFlags.COMPRESSED))
        assert exc.value.errno == 95
    finally:
        layer.close()
