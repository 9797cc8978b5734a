"""qcow2 header parsing, validation texts, and the create line, without QEMU."""

from __future__ import annotations

import struct

import pytest

from blockgraph.drivers.qcow2 import Qcow2Driver, qcow2_create_line, raw_create_line
from blockgraph.drivers.qcow2.header import (
    QCOW2_EXT_MAGIC_BACKING_FORMAT,
    QcowHeader,
    build_header_cluster,
    parse_header,
)
from blockgraph.drivers.qcow2.refcount import get_refcount_entry, set_refcount_entry
from blockgraph.drivers.qcow2.tables import ClusterType, cluster_type
from blockgraph.errors import BlockError


def _header(**kw: object) -> bytearray:
    h = QcowHeader(size=16 << 20, l1_size=1, l1_table_offset=0x30000,
                   refcount_table_offset=0x10000, refcount_table_clusters=1)
    for k, v in kw.items():
        setattr(h, k, v)
    return bytearray(build_header_cluster(h))


def test_roundtrip_v3_with_backing() -> None:
    buf = _header(backing_file="base.qcow2", backing_format="qcow2")
    assert struct.unpack_from(">II", buf, 112) == (QCOW2_EXT_MAGIC_BACKING_FORMAT, 5)
    h = parse_header(bytes(buf), 1 << 20)
    assert h.version == 3 and h.cluster_size == 65536
    assert h.backing_file == "base.qcow2" and h.backing_format == "qcow2"
    assert (0, 0) in h.feature_names and h.feature_names[(0, 4)] == "extended L2 entries"


def test_roundtrip_v2() -> None:
    h = parse_header(bytes(_header(version=2, header_length=72)), 1 << 20)
    assert h.version == 2 and h.refcount_order == 4 and h.header_length == 72


def test_probe() -> None:
    assert Qcow2Driver.probe(bytes(_header()[:2048]), "x") == 100
    assert Qcow2Driver.probe(b"\0" * 2048, "x") == 0


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "message"),
    [
        (72, ">Q", 1 << 20, "Unsupported qcow2 feature(s): Unknown incompatible feature: 100000"),
        (4, ">I", 4, "Unsupported qcow2 version 4"),
        (20, ">I", 22, "Unsupported cluster size: 2^22"),
        (20, ">I", 8, "Unsupported cluster size: 2^8"),
        (100, ">I", 100, "qcow2 header too short"),
        (100, ">I", 0x10001, "qcow2 header exceeds cluster size"),
        (96, ">I", 7, "Reference count entry width too large; may not exceed 64 bits"),
        (32, ">I", 3, "Unsupported encryption method 3"),
        (40, ">Q", 0x30001, "Active L1 table offset invalid"),
        (48, ">Q", 0x10001, "Reference count table offset invalid"),
        (36, ">I", 0, "L1 table is too small"),
        (104, ">B", 1, "qcow2: Compression type incompatible feature bit must be set"),
        (72, ">Q", 1 << 3, "qcow2: Compression type incompatible feature bit must not be set"),
        (24, ">Q", 1 << 62, "Image is too big"),
        (56, ">I", 0x10000000, "Reference count table too large"),
    ],
)
def test_header_errors(offset: int, fmt: str, value: int, message: str) -> None:
    buf = _header()
    struct.pack_into(fmt, buf, offset, value)
    with pytest.raises(BlockError) as exc:
        parse_header(bytes(buf), 1 << 20)
    assert str(exc.value) == message


def test_unsupported_feature_names_from_table() -> None:
    buf = _header()
    struct.pack_into(">Q", buf, 72, (1 << 20) | (1 << 21))
    # Rename the table's first entry (dirty bit) to bit 20.
    buf[0x78:0x78 + 48] = bytes([0, 20]) + b"foo feature".ljust(46, b"\0")
    with pytest.raises(BlockError) as exc:
        parse_header(bytes(buf), 1 << 20)
    assert str(exc.value) == (
        "Unsupported qcow2 feature(s): foo feature, Unknown incompatible feature: 200000"
    )


@pytest.mark.parametrize("order", range(7))
def test_refcount_entries(order: int) -> None:
    block = bytearray(64)
    entries = 64 * 8 >> order
    maximum = (1 << (1 << order)) - 1
    for i in range(entries):
        set_refcount_entry(block, i, order, i % (maximum + 1))
    for i in range(entries):
        assert get_refcount_entry(block, i, order) == i % (maximum + 1)


def test_refcount_bits_lsb_first() -> None:
    block = bytearray(1)
    set_refcount_entry(block, 1, 0, 1)
    assert block[0] == 0b10


def test_cluster_types() -> None:
    assert cluster_type(0) is ClusterType.UNALLOCATED
    assert cluster_type(1) is ClusterType.ZERO_PLAIN
    assert cluster_type(0x8000000000060001) is ClusterType.ZERO_ALLOC
    assert cluster_type(0x8000000000050000) is ClusterType.NORMAL
    assert cluster_type(1 << 62 | 0x50000) is ClusterType.COMPRESSED


@pytest.mark.parametrize(
    ("options", "line"),
    [
        ({"size": 67108864},
         "Formatting 'x', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib "
         "size=67108864 lazy_refcounts=off refcount_bits=16"),
        ({"size": 16777216, "backing_file": "a.qcow2", "backing_fmt": "qcow2"},
         "Formatting 'x', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib "
         "size=16777216 backing_file=a.qcow2 backing_fmt=qcow2 lazy_refcounts=off "
         "refcount_bits=16"),
        ({"size": 1048576, "compat": "1.1", "lazy_refcounts": "on", "refcount_bits": "8",
          "cluster_size": "4k", "extended_l2": "on", "preallocation": "metadata"},
         "Formatting 'x', fmt=qcow2 cluster_size=4096 extended_l2=on preallocation=metadata "
         "compression_type=zlib size=1048576 compat=1.1 lazy_refcounts=on refcount_bits=8"),
        ({"size": 1048576, "nocow": "on", "extent_size_hint": "1M"},
         "Formatting 'x', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib "
         "size=1048576 lazy_refcounts=off refcount_bits=16 nocow=on extent_size_hint=1048576"),
    ],
)
def test_create_line(options: dict[str, object], line: str) -> None:
    assert qcow2_create_line("x", options) == line


def test_raw_create_line() -> None:
    assert raw_create_line("r.raw", {"size": 1048576}) == "Formatting 'r.raw', fmt=raw size=1048576"
    assert raw_create_line("r.raw", {"size": 1048576, "preallocation": "falloc"}) == (
        "Formatting 'r.raw', fmt=raw size=1048576 preallocation=falloc")
