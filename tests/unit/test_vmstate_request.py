"""The VM state path (``qemu-io read -b`` / ``write -b``) through BlockBackend and request layer.

What qemu-io itself prints, and what QEMU's images look like, is checked against the real
tools in ``tests/interop/test_vmstate.py``; here: routing (qcow2 has an area, raw and null do
not, filters and raw over qcow2 pass the request down), the request layer's alignment, the
bounds, read-only nodes, and writethrough.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parents[2]) not in sys.path:
    # Lets ``tests.support`` import under a bare ``pytest`` run (no rootdir on sys.path).
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.graphutil import make_qcow2, make_raw  # noqa: E402

from blockgraph.drivers.base import MAX_LENGTH  # noqa: E402
from blockgraph.drivers.qcow2.driver import Qcow2Driver  # noqa: E402
from blockgraph.drivers.qcow2.vmstate import vm_state_offset  # noqa: E402
from blockgraph.errors import BlockError, IOFailure  # noqa: E402
from blockgraph.graph.layer import BlockLayer  # noqa: E402
from blockgraph.graph.node import BlockBackend, Node  # noqa: E402

MiB = 1 << 20


def _open(layer: BlockLayer, filename: str, options: dict[str, object]) -> tuple[BlockBackend, Node]:
    bb = layer.new_backend("drive0")
    root = layer.run(layer.open_node(filename, options, backend=bb))
    return bb, root


def _qcow2(layer: BlockLayer, tmp_path: Path, **options: object) -> tuple[BlockBackend, Node]:
    return _open(layer, make_qcow2(tmp_path / "a.qcow2", MiB), {"driver": "qcow2", **options})


def _read_vm(layer: BlockLayer, bb: BlockBackend, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    layer.run(bb.load_vmstate(offset, memoryview(buf)))
    return bytes(buf)


def test_qcow2_area_is_past_the_disk_and_apart_from_guest_data(
        layer: BlockLayer, tmp_path: Path) -> None:
    bb, root = _qcow2(layer, tmp_path)
    drv = root.driver
    assert isinstance(drv, Qcow2Driver)
    # 1 MiB disk, 64 KiB clusters: one L1 entry maps 512 MiB; the area starts at the second.
    assert vm_state_offset(drv) == 512 * MiB
    assert drv.header.l1_size == 1
    assert _read_vm(layer, bb, 0, 4096) == bytes(4096)  # never written: zeroes
    layer.run(bb.save_vmstate(0, memoryview(b"\x5a" * 65536)))
    assert drv.header.l1_size == 2  # grown (by half, rounded up) to reach the area
    assert _read_vm(layer, bb, 0, 65536) == b"\x5a" * 65536
    guest = bytearray(MiB)
    layer.run(bb.preadv(0, memoryview(guest)))
    assert guest == bytes(MiB)
    # Guest writes do not show up in the VM state either.
    layer.run(bb.pwritev(0, memoryview(b"\x11" * 65536)))
    assert _read_vm(layer, bb, 0, 65536) == b"\x5a" * 65536
    # VM state is not guest I/O: the BlockBackend's counters only saw the guest requests.
    assert (bb.stats.rd_operations, bb.stats.wr_operations) == (1, 1)


def test_l1_grows_by_half_until_it_reaches(layer: BlockLayer, tmp_path: Path) -> None:
    bb, root = _qcow2(layer, tmp_path)
    drv = root.driver
    assert isinstance(drv, Qcow2Driver)
    # VM state offset 1 GiB = guest 1.5 GiB = L1 index 3: 1 -> 2 -> 3 -> 5 entries.
    layer.run(bb.save_vmstate(1 << 30, memoryview(b"\x02" * 512)))
    assert drv.header.l1_size == 5
    assert _read_vm(layer, bb, 1 << 30, 512) == b"\x02" * 512


def test_unaligned_requests_are_padded(layer: BlockLayer, tmp_path: Path) -> None:
    bb, _root = _qcow2(layer, tmp_path)
    model = bytearray(4096)
    for offset, length, byte in ((7, 1000, 1), (1000, 30, 2), (0, 512, 3), (511, 2, 4),
                                 (3000, 1096, 5)):
        data = bytes([byte]) * length
        layer.run(bb.save_vmstate(offset, memoryview(data)))
        model[offset : offset + length] = data
    assert _read_vm(layer, bb, 0, 4096) == bytes(model)
    assert _read_vm(layer, bb, 509, 7) == bytes(model[509:516])


def test_formats_without_an_area_refuse(layer: BlockLayer, tmp_path: Path) -> None:
    bb, _root = _open(layer, make_raw(tmp_path / "r.raw"), {"driver": "raw"})
    for request in (bb.load_vmstate(0, memoryview(bytearray(512))),
                    bb.save_vmstate(0, memoryview(b"x" * 512))):
        with pytest.raises(IOFailure) as info:
            layer.run(request)
        assert info.value.errno == errno.ENOTSUP
        assert str(info.value) == "Operation not supported"


def test_raw_over_qcow2_reaches_the_qcow2_area(layer: BlockLayer, tmp_path: Path) -> None:
    img = make_qcow2(tmp_path / "a.qcow2", MiB)
    bb, root = _open(layer, img, {"driver": "raw", "file.driver": "qcow2"})
    assert root.driver_name == "raw"
    layer.run(bb.save_vmstate(512, memoryview(b"\x33" * 512)))
    assert _read_vm(layer, bb, 0, 1024) == bytes(512) + b"\x33" * 512
    qcow2 = root.file
    assert qcow2 is not None
    buf = bytearray(512)
    layer.run(qcow2.load_vmstate(512, memoryview(buf)))
    assert buf == b"\x33" * 512


def test_bounds(layer: BlockLayer, tmp_path: Path) -> None:
    bb, _root = _qcow2(layer, tmp_path)
    # The request itself must end by MAX_LENGTH, and so must its place in the image's guest
    # address space (512 MiB further): EIO either way, as QEMU.
    last = MAX_LENGTH - 512 * MiB - 512
    assert _read_vm(layer, bb, last, 512) == bytes(512)
    for offset in (last + 512, MAX_LENGTH - 512, MAX_LENGTH, -512):
        with pytest.raises(IOFailure) as info:
            layer.run(bb.load_vmstate(offset, memoryview(bytearray(512))))
        assert info.value.errno == errno.EIO
    # Reachable, but the L1 table would pass qcow2's 32 MiB limit.
    with pytest.raises(IOFailure) as info:
        layer.run(bb.save_vmstate(4 << 50, memoryview(b"x" * 512)))
    assert (info.value.errno, str(info.value)) == (errno.EFBIG, "File too large")


def test_read_only_node_refuses_writes(layer: BlockLayer, tmp_path: Path) -> None:
    bb, _root = _qcow2(layer, tmp_path, **{"read-only": True})
    with pytest.raises(IOFailure) as info:
        layer.run(bb.save_vmstate(0, memoryview(b"x" * 512)))
    assert info.value.errno == errno.EPERM
    assert _read_vm(layer, bb, 0, 512) == bytes(512)


@pytest.mark.parametrize("writethrough", [False, True])
def test_writethrough_makes_vmstate_stable(layer: BlockLayer, tmp_path: Path,
                                           writethrough: bool) -> None:
    bb, root = _qcow2(layer, tmp_path)
    bb.write_cache = not writethrough
    file_node = root.file
    assert file_node is not None
    layer.run(bb.save_vmstate(0, memoryview(b"x" * 65536)))  # allocates (syncs metadata)
    before = file_node.stats.disk_flushes
    layer.run(bb.save_vmstate(0, memoryview(b"y" * 65536)))  # in place: no metadata
    assert file_node.stats.disk_flushes - before == (1 if writethrough else 0)


def test_backing_changes_refused_by_formats_without_them(layer: BlockLayer, tmp_path: Path) -> None:
    _bb, root = _open(layer, make_raw(tmp_path / "r.raw"), {"driver": "raw"})
    with pytest.raises(IOFailure) as info:
        layer.run(root.make_empty())
    assert str(info.value) == "Operation not supported"
    with pytest.raises(BlockError) as exc:
        layer.run(root.change_backing_file("base.qcow2", "qcow2"))
    assert str(exc.value) == "Operation not supported"
