"""``qemu-img create -f qcow2``: the same bytes as QEMU 7.2, and the same ``Formatting`` line.

A fresh image (``specs/qcow2-format.md`` §14)::

    0 * cs   header + extensions (+ backing file name), zero padded to a cluster
    1 * cs   refcount table: entry 0 = 2 * cs
    2 * cs   refcount block: clusters 0..2 and the L1 clusters have refcount 1
    3 * cs   L1 table, l1_size entries, all 0; the file ends right after it

Like QEMU, the first three clusters are written by hand and the rest (L1 table,
``preallocation=metadata``) goes through the driver's own allocator, so refcount block and
table growth follow one code path.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

from blockgraph.drivers.base import ChildAccess, ChildRole, NodeFlags
from blockgraph.drivers.qcow2.header import (
    HEADER_OFFSET_L1,
    HEADER_OFFSET_SIZE,
    MAX_L1_SIZE,
    QCOW2_AUTOCLEAR_DATA_FILE_RAW,
    QCOW2_COMPAT_LAZY_REFCOUNTS,
    QCOW2_COMPRESSION_TYPE_ZLIB,
    QCOW2_COMPRESSION_TYPE_ZSTD,
    QCOW2_INCOMPAT_COMPRESSION,
    QCOW2_INCOMPAT_DATA_FILE,
    QCOW2_INCOMPAT_EXTL2,
    V3_HEADER_LENGTH_WRITTEN,
    QcowHeader,
    build_header_cluster,
)
from blockgraph.drivers.qcow2.refcount import set_refcount_entry
from blockgraph.errors import BlockError
from blockgraph.objects import ObjectRegistry

_COMPAT_VERSIONS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
_PREALLOC_MODES = ("off", "metadata", "falloc", "full")

# QEMU 7.2's qcow2 create options, in the order ``Formatting ...`` prints them, and the
# defaults it prints even when not given.
QCOW2_CREATE_OPTION_ORDER = (
    "encryption",
    "encrypt.format",
    "encrypt.key-secret",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
    "encrypt.iter-time",
    "cluster_size",
    "extended_l2",
    "preallocation",
    "compression_type",
    "size",
    "compat",
    "backing_file",
    "backing_fmt",
    "data_file",
    "data_file_raw",
    "lazy_refcounts",
    "refcount_bits",
    # The file protocol's create options come after the format's.
    "nocow",
    "extent_size_hint",
)
QCOW2_CREATE_DEFAULTS: dict[str, str] = {
    "cluster_size": "65536",
    "extended_l2": "off",
    "compression_type": "zlib",
    "lazy_refcounts": "off",
    "refcount_bits": "16",
}
_SIZE_OPTIONS = ("size", "cluster_size", "extent_size_hint")
RAW_CREATE_OPTION_ORDER = ("size", "preallocation", "nocow", "extent_size_hint")


def _format_value(key: str, value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if key in _SIZE_OPTIONS and isinstance(value, str):
        from blockgraph.options.schema import parse_size

        return str(parse_size(key, value))
    return str(value)


def _create_line(filename: str, fmt: str, order: tuple[str, ...], defaults: Mapping[str, str],
                 options: Mapping[str, object]) -> str:
    parts = [f"Formatting '{filename}', fmt={fmt}"]
    for key in order:
        if key in options and options[key] is not None:
            parts.append(f"{key}={_format_value(key, options[key])}")
        elif key in defaults:
            parts.append(f"{key}={defaults[key]}")
    return " ".join(parts)


def qcow2_create_line(filename: str, options: Mapping[str, object]) -> str:
    """qemu-img's ``Formatting '...', fmt=qcow2 ...`` line.

    :param options: the ``-o`` options as given (``size`` included, ``backing_file`` from
        ``-b``, ``backing_fmt`` from ``-F``). Strings are printed as typed, except sizes, which
        qemu-img prints in bytes; Python bools print as ``on``/``off``.
    """
    return _create_line(filename, "qcow2", QCOW2_CREATE_OPTION_ORDER, QCOW2_CREATE_DEFAULTS,
                        options)


def raw_create_line(filename: str, options: Mapping[str, object]) -> str:
    """``Formatting 'x', fmt=raw size=N`` (+ ``preallocation=`` etc. when given)."""
    return _create_line(filename, "raw", RAW_CREATE_OPTION_ORDER, {}, options)


class _CreateContext:
    """The :class:`OpenContext` ``qcow2_create`` opens its fresh image with: its file and, if
    there is one, its external data file."""

    def __init__(self, file: ChildAccess, data_file: ChildAccess | None) -> None:
        self._file = file
        self._data_file = data_file
        self._flags = NodeFlags()

    @property
    def node_name(self) -> str:
        return ""

    @property
    def flags(self) -> NodeFlags:
        return self._flags

    @property
    def objects(self) -> ObjectRegistry:
        return ObjectRegistry()  # a fresh image refers to no object

    async def open_child(self, name: str, role: ChildRole, *, filename: str | None = None,
                         driver: str | None = None, allow_none: bool = False,
                         read_only: bool | None = None) -> ChildAccess | None:
        if name == "file":
            return self._file
        if name == "data-file":
            return self._data_file
        return None

    def has_child_options(self, name: str) -> bool:
        return name == "data-file" and self._data_file is not None

    def drop_child_options(self, name: str) -> None:
        pass  # nothing here comes from a user

    def set_child_role(self, name: str, role: ChildRole) -> None:
        pass  # the creator's children are its own


def check_options(size: int, version: int, cluster_size: int, refcount_bits: int,
                  extended_l2: bool, compression_type: str, lazy_refcounts: bool,
                  preallocation: str, backing_file: str | None,
                  backing_format: str | None, data_file: bool = False,
                  data_file_raw: bool = False) -> None:
    """Refuse qcow2 creation options QEMU refuses, with its messages, before anything is written.

    Shared by ``img create`` and the ``blockdev-create`` job, so both reject the same input.

    :raise BlockError: the first option QEMU would complain about.
    """
    if cluster_size < 512 or cluster_size > (2 << 20) or cluster_size & (cluster_size - 1):
        raise BlockError("Cluster size must be a power of two between 512 and 2048k")
    if refcount_bits < 1 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
        raise BlockError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3:
        if refcount_bits != 16:
            raise BlockError("Different refcount widths than 16 bits require compatibility "
                             "level 1.1 or above (use version=v3 or greater)")
        if extended_l2:
            raise BlockError("Extended L2 entries are only supported with compatibility level "
                             "1.1 and above (use version=v3 or greater)")
        if compression_type != "zlib":
            raise BlockError("Non-zlib compression type is only supported with compatibility "
                             "level 1.1 and above (use version=v3 or greater)")
        if lazy_refcounts:
            raise BlockError("Lazy refcounts only supported with compatibility level 1.1 and "
                             "above (use version=v3 or greater)")
    if extended_l2 and cluster_size < 16384:
        raise BlockError("Extended L2 entries are only supported with cluster sizes of at least "
                         "16384 bytes")
    if compression_type not in ("zlib", "zstd"):
        raise BlockError(f"Parameter 'compression-type' does not accept value "
                         f"'{compression_type}'")
    if preallocation not in _PREALLOC_MODES:
        raise BlockError(f"Parameter 'preallocation' does not accept value '{preallocation}'")
    if backing_format and not backing_file:
        raise BlockError("Backing format cannot be used without backing file")
    if backing_file and preallocation != "off" and not extended_l2:
        raise BlockError("Backing file and preallocation can only be used at the same time if "
                         "extended_l2 is on")
    if data_file_raw and not data_file:
        raise BlockError("data-file-raw requires data-file")
    if data_file_raw and backing_file:
        raise BlockError("Backing file and data-file-raw cannot be used at the same time")
    if data_file and version < 3:
        raise BlockError("External data files are only supported with compatibility level 1.1 "
                         "and above (use version=v3 or greater)")
    l2_entries = cluster_size // (16 if extended_l2 else 8)
    l1_size = -(-size // (cluster_size * l2_entries))
    if l1_size * 8 > MAX_L1_SIZE or size > (1 << 63) - 512:
        raise BlockError("The image size is too large for file format 'qcow2' (try using a "
                         "larger cluster size)")


async def qcow2_create(
    file: ChildAccess,
    size: int,
    *,
    backing_file: str | None = None,
    backing_format: str | None = None,
    cluster_size: int = 65536,
    compat: str = "1.1",
    lazy_refcounts: bool = False,
    refcount_bits: int = 16,
    extended_l2: bool = False,
    compression_type: str = "zlib",
    preallocation: str = "off",
    data_file: ChildAccess | None = None,
    data_file_name: str | None = None,
    data_file_raw: bool = False,
    **unsupported: Any,
) -> None:
    """Format ``file`` (an empty, writable child) as a qcow2 image of ``size`` bytes.

    :param data_file: a writable child for guest data (external data file), resized to
        ``size``; ``data_file_name`` is what the header records for it (omitted if None).
    :param data_file_raw: the data file stays a raw image of the disk (all clusters mapped).
    :raise BlockError: with qemu-img's text for invalid option combinations.
    """
    if unsupported:
        raise BlockError(f"qcow2 create option(s) not supported yet: "
                         f"{', '.join(sorted(unsupported))}")
    if compat not in _COMPAT_VERSIONS:
        raise BlockError(f"Parameter 'version' does not accept value '{compat}'")
    version = _COMPAT_VERSIONS[compat]
    size = (size + 511) & ~511  # qemu-img rounds the disk size up to whole sectors
    check_options(size, version, cluster_size, refcount_bits, extended_l2, compression_type,
                  lazy_refcounts, preallocation, backing_file, backing_format,
                  data_file is not None, data_file_raw)
    if data_file_raw and preallocation == "off":
        # Every guest cluster must be mapped to its place in the raw data file, or data
        # written there later would not be found through the L2 tables.
        preallocation = "metadata"

    cluster_bits = cluster_size.bit_length() - 1
    refcount_order = refcount_bits.bit_length() - 1
    h = QcowHeader(
        version=version,
        cluster_bits=cluster_bits,
        size=size,
        refcount_table_offset=cluster_size,
        refcount_table_clusters=1,
        refcount_order=refcount_order,
        header_length=V3_HEADER_LENGTH_WRITTEN if version >= 3 else 72,
        backing_file=backing_file,
        backing_format=backing_format if backing_file else None,
    )
    if lazy_refcounts:
        h.compatible_features |= QCOW2_COMPAT_LAZY_REFCOUNTS
    if extended_l2:
        h.incompatible_features |= QCOW2_INCOMPAT_EXTL2
    if data_file is not None:
        h.incompatible_features |= QCOW2_INCOMPAT_DATA_FILE
        h.data_file = data_file_name or None
        if data_file_raw:
            h.autoclear_features |= QCOW2_AUTOCLEAR_DATA_FILE_RAW
    if compression_type == "zstd":
        h.incompatible_features |= QCOW2_INCOMPAT_COMPRESSION
        h.compression_type = QCOW2_COMPRESSION_TYPE_ZSTD
    else:
        h.compression_type = QCOW2_COMPRESSION_TYPE_ZLIB

    # Like QEMU, the image starts empty and is then grown to ``size`` (L1 table, size field).
    h.size = 0
    header_cluster = build_header_cluster(h)
    reftable = bytearray(cluster_size)
    struct.pack_into(">Q", reftable, 0, 2 * cluster_size)
    refblock = bytearray(cluster_size)
    for i in range(3):
        set_refcount_entry(refblock, i, refcount_order, 1)
    await file.pwritev(0, memoryview(header_cluster + bytes(reftable) + bytes(refblock)))

    if data_file is not None:
        await data_file.truncate(size)
    l2_entries = cluster_size // (16 if extended_l2 else 8)
    l1_size = -(-size // (cluster_size * l2_entries))
    if l1_size == 0:
        await file.pwritev(HEADER_OFFSET_SIZE, memoryview(struct.pack(">Q", size)))
        await file.flush()
        return

    from blockgraph.drivers.qcow2.driver import Qcow2Driver

    drv = Qcow2Driver()
    # Lazy refcounts would mark the fresh image dirty: QEMU creates it with them off too.
    await drv.open(_CreateContext(file, data_file), {"lazy-refcounts": False})
    l1_bytes = l1_size * 8
    l1_offset = await drv.refcounts.alloc_clusters(l1_bytes)
    await drv.refcount_cache.flush()
    await file.pwritev(l1_offset, memoryview(bytes(l1_bytes)))
    await file.flush()
    await file.pwritev(HEADER_OFFSET_L1, memoryview(struct.pack(">IQ", l1_size, l1_offset)))
    await file.flush()
    await file.pwritev(HEADER_OFFSET_SIZE, memoryview(struct.pack(">Q", size)))
    await file.flush()
    drv.header.size = size
    drv.header.l1_size = l1_size
    drv.header.l1_table_offset = l1_offset
    drv.l1_table = [0] * l1_size

    if preallocation != "off":
        from blockgraph.drivers.qcow2.resize import preallocate

        await preallocate(drv, 0, size, preallocation)
    await drv.close()
