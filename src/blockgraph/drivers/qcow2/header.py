"""The qcow2 header (cluster 0) and its extensions: parsing, validation and serialisation.

Layout (``specs/qcow2-format.md`` §1, all big-endian)::

     0  magic "QFI\\xfb"          4  version (2|3)          8  backing_file_offset (u64)
    16  backing_file_size (u32)  20  cluster_bits          24  size (u64)
    32  crypt_method            36  l1_size                40  l1_table_offset (u64)
    48  refcount_table_offset   56  refcount_table_clusters 60 nb_snapshots
    64  snapshots_offset (u64)  -- end of v2 (72 bytes) --
    72  incompatible_features   80  compatible_features    88  autoclear_features
    96  refcount_order          100 header_length          104 compression_type (u8) + 7 pad

Extensions follow at ``header_length``: ``type (u32) | length (u32) | data | pad to 8``, ended by
type 0. The backing file name is stored after the end marker, still in cluster 0.

Everything here is pure (bytes in, values or bytes out); I/O lives in the driver.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from blockgraph.errors import BlockError

QCOW_MAGIC = 0x514649FB
QCOW_MAGIC_BYTES = b"QFI\xfb"

V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104  # the minimum a v3 header may declare
V3_HEADER_LENGTH_WRITTEN = 112  # what QEMU 7.2 writes: includes compression_type + padding

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_REFTABLE_SIZE = 8 * 1024 * 1024  # bytes (QCOW_MAX_REFTABLE_SIZE)
MAX_L1_SIZE = 32 * 1024 * 1024  # bytes (QCOW_MAX_L1_SIZE)
MAX_BACKING_FILE_NAME = 1023

QCOW_CRYPT_NONE = 0
QCOW_CRYPT_AES = 1
QCOW_CRYPT_LUKS = 2

# Incompatible feature bits.
QCOW2_INCOMPAT_DIRTY = 1 << 0
QCOW2_INCOMPAT_CORRUPT = 1 << 1
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
QCOW2_INCOMPAT_COMPRESSION = 1 << 3
QCOW2_INCOMPAT_EXTL2 = 1 << 4
QCOW2_INCOMPAT_MASK = (
    QCOW2_INCOMPAT_DIRTY
    | QCOW2_INCOMPAT_CORRUPT
    | QCOW2_INCOMPAT_DATA_FILE
    | QCOW2_INCOMPAT_COMPRESSION
    | QCOW2_INCOMPAT_EXTL2
)
# Compatible feature bits.
QCOW2_COMPAT_LAZY_REFCOUNTS = 1 << 0
# Autoclear feature bits.
QCOW2_AUTOCLEAR_BITMAPS = 1 << 0
QCOW2_AUTOCLEAR_DATA_FILE_RAW = 1 << 1
QCOW2_AUTOCLEAR_MASK = QCOW2_AUTOCLEAR_BITMAPS | QCOW2_AUTOCLEAR_DATA_FILE_RAW

QCOW2_COMPRESSION_TYPE_ZLIB = 0
QCOW2_COMPRESSION_TYPE_ZSTD = 1
COMPRESSION_TYPE_NAMES = {QCOW2_COMPRESSION_TYPE_ZLIB: "zlib", QCOW2_COMPRESSION_TYPE_ZSTD: "zstd"}

# Header extension types.
QCOW2_EXT_MAGIC_END = 0x00000000
QCOW2_EXT_MAGIC_BACKING_FORMAT = 0xE2792ACA
QCOW2_EXT_MAGIC_FEATURE_TABLE = 0x6803F857
QCOW2_EXT_MAGIC_CRYPTO_HEADER = 0x0537BE77
QCOW2_EXT_MAGIC_BITMAPS = 0x23852875
QCOW2_EXT_MAGIC_DATA_FILE = 0x44415441

QCOW2_FEAT_TYPE_INCOMPATIBLE = 0
QCOW2_FEAT_TYPE_COMPATIBLE = 1
QCOW2_FEAT_TYPE_AUTOCLEAR = 2

# The feature name table QEMU 7.2 writes, in its order: (type, bit, name).
FEATURE_TABLE: tuple[tuple[int, int, str], ...] = (
    (QCOW2_FEAT_TYPE_INCOMPATIBLE, 0, "dirty bit"),
    (QCOW2_FEAT_TYPE_INCOMPATIBLE, 1, "corrupt bit"),
    (QCOW2_FEAT_TYPE_INCOMPATIBLE, 2, "external data file"),
    (QCOW2_FEAT_TYPE_INCOMPATIBLE, 3, "compression type"),
    (QCOW2_FEAT_TYPE_INCOMPATIBLE, 4, "extended L2 entries"),
    (QCOW2_FEAT_TYPE_COMPATIBLE, 0, "lazy refcounts"),
    (QCOW2_FEAT_TYPE_AUTOCLEAR, 0, "bitmaps"),
    (QCOW2_FEAT_TYPE_AUTOCLEAR, 1, "raw external data"),
)
FEATURE_TABLE_ENTRY_SIZE = 48

# Field offsets used for in-place header updates (crash-safety rules 5, 6, 8 of §10).
HEADER_OFFSET_SIZE = 24
HEADER_OFFSET_L1 = 36  # l1_size (u32) + l1_table_offset (u64)
HEADER_OFFSET_REFTABLE = 48  # refcount_table_offset (u64) + refcount_table_clusters (u32)
HEADER_OFFSET_INCOMPAT = 72
HEADER_OFFSET_AUTOCLEAR = 88

_V2_FMT = ">IIQIIQIIQQIIQ"  # 72 bytes
_V3_FMT = ">QQQII"  # 32 bytes at offset 72
assert struct.calcsize(_V2_FMT) == V2_HEADER_LENGTH
assert struct.calcsize(_V3_FMT) == V3_HEADER_LENGTH - V2_HEADER_LENGTH


@dataclass
class BitmapsExt:
    """Bitmaps extension: ``nb_bitmaps u32 | reserved u32 | directory_size u64 | offset u64``."""

    nb_bitmaps: int
    bitmap_directory_size: int
    bitmap_directory_offset: int


@dataclass
class QcowHeader:
    """The decoded header plus its extensions, as far as this driver understands them."""

    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = QCOW_CRYPT_NONE
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V3_HEADER_LENGTH_WRITTEN
    compression_type: int = QCOW2_COMPRESSION_TYPE_ZLIB
    # Bytes of the header past the fields we know (``header_length`` > 112): kept on rewrite.
    unknown_header_fields: bytes = b""

    # Extensions.
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    bitmaps: BitmapsExt | None = None
    crypto_header: tuple[int, int] | None = None
    unknown_extensions: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & QCOW2_INCOMPAT_EXTL2)

    def pack_fixed(self) -> bytes:
        """The fixed header fields (72 bytes for v2, ``header_length`` bytes for v3)."""
        v2 = struct.pack(
            _V2_FMT,
            QCOW_MAGIC,
            self.version,
            self.backing_file_offset,
            self.backing_file_size,
            self.cluster_bits,
            self.size,
            self.crypt_method,
            self.l1_size,
            self.l1_table_offset,
            self.refcount_table_offset,
            self.refcount_table_clusters,
            self.nb_snapshots,
            self.snapshots_offset,
        )
        if self.version == 2:
            return v2
        v3 = struct.pack(
            _V3_FMT,
            self.incompatible_features,
            self.compatible_features,
            self.autoclear_features,
            self.refcount_order,
            self.header_length,
        )
        extra = bytes([self.compression_type]) + bytes(7) + self.unknown_header_fields
        return (v2 + v3 + extra)[: self.header_length]


def _read_string(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")


def unsupported_features_text(incompatible: int, feature_names: dict[tuple[int, int], str]) -> str:
    """QEMU's ``Unsupported qcow2 feature(s): ...`` listing: names from the table, then the rest."""
    parts: list[str] = []
    remaining = incompatible
    for bit in range(64):
        mask = 1 << bit
        if remaining & mask and (QCOW2_FEAT_TYPE_INCOMPATIBLE, bit) in feature_names:
            parts.append(feature_names[(QCOW2_FEAT_TYPE_INCOMPATIBLE, bit)])
            remaining &= ~mask
    if remaining:
        parts.append(f"Unknown incompatible feature: {remaining:x}")
    return "Unsupported qcow2 feature(s): " + ", ".join(parts)


def parse_header(buf: bytes, file_length: int) -> QcowHeader:
    """Decode and validate cluster 0 (``buf`` holds at least its first bytes, up to one cluster).

    :raise BlockError: with QEMU's message for each malformed field.
    """
    if len(buf) < V2_HEADER_LENGTH:
        raise BlockError("Could not read qcow2 header: Input/output error")
    fields = struct.unpack_from(_V2_FMT, buf, 0)
    if fields[0] != QCOW_MAGIC:
        raise BlockError("Image is not in qcow2 format")
    h = QcowHeader(
        version=fields[1],
        backing_file_offset=fields[2],
        backing_file_size=fields[3],
        cluster_bits=fields[4],
        size=fields[5],
        crypt_method=fields[6],
        l1_size=fields[7],
        l1_table_offset=fields[8],
        refcount_table_offset=fields[9],
        refcount_table_clusters=fields[10],
        nb_snapshots=fields[11],
        snapshots_offset=fields[12],
    )
    if h.version not in (2, 3):
        raise BlockError(f"Unsupported qcow2 version {h.version}")
    if h.cluster_bits < MIN_CLUSTER_BITS or h.cluster_bits > MAX_CLUSTER_BITS:
        raise BlockError(f"Unsupported cluster size: 2^{h.cluster_bits}")
    cluster_size = h.cluster_size

    if h.version == 2:
        h.refcount_order = 4
        h.header_length = V2_HEADER_LENGTH
    else:
        if len(buf) < V3_HEADER_LENGTH:
            raise BlockError("qcow2 header too short")
        (
            h.incompatible_features,
            h.compatible_features,
            h.autoclear_features,
            h.refcount_order,
            h.header_length,
        ) = struct.unpack_from(_V3_FMT, buf, V2_HEADER_LENGTH)
        if h.header_length < V3_HEADER_LENGTH:
            raise BlockError("qcow2 header too short")
        if h.header_length > cluster_size:
            raise BlockError("qcow2 header exceeds cluster size")
        if h.header_length > V3_HEADER_LENGTH:
            h.compression_type = buf[V3_HEADER_LENGTH]
            h.unknown_header_fields = bytes(buf[V3_HEADER_LENGTH_WRITTEN : h.header_length])

    if h.refcount_order > 6:
        raise BlockError("Reference count entry width too large; may not exceed 64 bits")

    # Extensions come before the feature check: the feature table names the unknown bits.
    ext_end = h.backing_file_offset if h.backing_file_offset else cluster_size
    _parse_extensions(h, buf, h.header_length, min(ext_end, cluster_size, len(buf)))

    unknown = h.incompatible_features & ~QCOW2_INCOMPAT_MASK
    if unknown:
        raise BlockError(unsupported_features_text(unknown, h.feature_names))

    if h.incompatible_features & QCOW2_INCOMPAT_COMPRESSION:
        if h.compression_type == QCOW2_COMPRESSION_TYPE_ZLIB:
            raise BlockError("qcow2: Compression type incompatible feature bit must not be set")
    elif h.compression_type != QCOW2_COMPRESSION_TYPE_ZLIB:
        raise BlockError("qcow2: Compression type incompatible feature bit must be set")
    if h.compression_type not in COMPRESSION_TYPE_NAMES:
        raise BlockError(f"qcow2: unknown compression type: {h.compression_type}")

    if h.extended_l2 and h.cluster_bits < 14:
        raise BlockError("Extended L2 entries are only supported with cluster sizes of at least "
                         "16384 bytes")

    reftable_bytes = h.refcount_table_clusters * cluster_size
    if reftable_bytes > MAX_REFTABLE_SIZE:
        raise BlockError("Reference count table too large")
    if h.refcount_table_clusters == 0:
        raise BlockError("Image does not contain a reference count table")
    if h.refcount_table_offset % cluster_size or h.refcount_table_offset == 0:
        raise BlockError("Reference count table offset invalid")

    if h.crypt_method > QCOW_CRYPT_LUKS:
        raise BlockError(f"Unsupported encryption method {h.crypt_method}")

    l2_entry_size = 16 if h.extended_l2 else 8
    l2_bits = h.cluster_bits - (4 if h.extended_l2 else 3)
    if h.l1_size > MAX_L1_SIZE // 8:
        raise BlockError("Active L1 table too large")
    # The largest guest size the L1 table can describe, and QEMU's overall limit.
    if h.size > (1 << 62) - 1 or (h.size >> (h.cluster_bits + l2_bits)) >= (1 << 32) - 1:
        raise BlockError("Image is too big")
    min_l1 = -(-h.size // (cluster_size * (cluster_size // l2_entry_size)))
    if h.l1_size < min_l1:
        raise BlockError("L1 table is too small")
    if h.l1_table_offset % cluster_size:
        raise BlockError("Active L1 table offset invalid")

    if h.backing_file_offset:
        if h.backing_file_size > MAX_BACKING_FILE_NAME or h.backing_file_size >= cluster_size:
            raise BlockError("Backing file name too long")
        start = h.backing_file_offset
        end = start + h.backing_file_size
        if end > len(buf):
            raise BlockError("Backing file name too long")
        h.backing_file = _read_string(bytes(buf[start:end]))
    return h


def _parse_extensions(h: QcowHeader, buf: bytes, offset: int, end: int) -> None:
    """Walk the extension area ``[offset, end)``; stop at the end marker."""
    while offset + 8 <= end:
        ext_type, ext_len = struct.unpack_from(">II", buf, offset)
        offset += 8
        if ext_type == QCOW2_EXT_MAGIC_END:
            return
        if ext_len > end - offset:
            raise BlockError("Header extension too large")
        data = bytes(buf[offset : offset + ext_len])
        if ext_type == QCOW2_EXT_MAGIC_BACKING_FORMAT:
            if ext_len > 15:
                raise BlockError(f"ERROR: ext_backing_format: len={ext_len} too large (>=16)")
            h.backing_format = _read_string(data)
        elif ext_type == QCOW2_EXT_MAGIC_FEATURE_TABLE:
            for pos in range(0, ext_len - FEATURE_TABLE_ENTRY_SIZE + 1, FEATURE_TABLE_ENTRY_SIZE):
                name = data[pos + 2 : pos + FEATURE_TABLE_ENTRY_SIZE].split(b"\0", 1)[0]
                h.feature_names[(data[pos], data[pos + 1])] = _read_string(name)
        elif ext_type == QCOW2_EXT_MAGIC_DATA_FILE:
            h.data_file = _read_string(data)
        elif ext_type == QCOW2_EXT_MAGIC_BITMAPS:
            if ext_len != 24:
                raise BlockError("bitmaps_ext: Invalid extension length")
            nb, _reserved, dir_size, dir_offset = struct.unpack(">IIQQ", data)
            h.bitmaps = BitmapsExt(nb, dir_size, dir_offset)
        elif ext_type == QCOW2_EXT_MAGIC_CRYPTO_HEADER:
            if ext_len != 16:
                raise BlockError("Unable to read CRYPTO header extension")
            off, length = struct.unpack(">QQ", data)
            h.crypto_header = (off, length)
        else:
            h.unknown_extensions.append((ext_type, data))
        offset += (ext_len + 7) & ~7


def _ext(ext_type: int, data: bytes) -> bytes:
    pad = (-len(data)) % 8
    return struct.pack(">II", ext_type, len(data)) + data + bytes(pad)


def feature_table_bytes() -> bytes:
    return b"".join(
        bytes([t, bit]) + name.encode().ljust(FEATURE_TABLE_ENTRY_SIZE - 2, b"\0")
        for t, bit, name in FEATURE_TABLE
    )


def build_header_cluster(h: QcowHeader) -> bytes:
    """Serialise ``h`` into a full cluster 0, in the extension order QEMU 7.2 writes.

    Sets ``backing_file_offset``/``backing_file_size`` in ``h`` to where the name lands.

    :raise BlockError: when everything does not fit in one cluster.
    """
    cluster_size = h.cluster_size
    exts: list[bytes] = []
    if h.backing_format:
        exts.append(_ext(QCOW2_EXT_MAGIC_BACKING_FORMAT, h.backing_format.encode()))
    if h.crypto_header is not None:
        exts.append(_ext(QCOW2_EXT_MAGIC_CRYPTO_HEADER, struct.pack(">QQ", *h.crypto_header)))
    if h.data_file:
        exts.append(_ext(QCOW2_EXT_MAGIC_DATA_FILE, h.data_file.encode()))
    # QEMU 7.2 leaves the feature table out for cluster sizes below 8 KiB (observed).
    if h.version >= 3 and cluster_size >= 8192:
        exts.append(_ext(QCOW2_EXT_MAGIC_FEATURE_TABLE, feature_table_bytes()))
    if h.bitmaps is not None:
        b = h.bitmaps
        exts.append(_ext(QCOW2_EXT_MAGIC_BITMAPS, struct.pack(
            ">IIQQ", b.nb_bitmaps, 0, b.bitmap_directory_size, b.bitmap_directory_offset)))
    for ext_type, data in h.unknown_extensions:
        exts.append(_ext(ext_type, data))
    exts.append(_ext(QCOW2_EXT_MAGIC_END, b""))

    if h.version == 2:
        header_len = V2_HEADER_LENGTH
    else:
        header_len = h.header_length
    body_len = header_len + sum(len(e) for e in exts)
    backing = h.backing_file.encode() if h.backing_file else b""
    if backing:
        h.backing_file_offset = body_len
        h.backing_file_size = len(backing)
    else:
        h.backing_file_offset = 0
        h.backing_file_size = 0
    if body_len + len(backing) > cluster_size:
        raise BlockError("Header extensions and backing file name do not fit in the first cluster")
    out = bytearray(cluster_size)
    fixed = h.pack_fixed()
    out[: len(fixed)] = fixed
    pos = header_len
    for e in exts:
        out[pos : pos + len(e)] = e
        pos += len(e)
    out[pos : pos + len(backing)] = backing
    return bytes(out)
