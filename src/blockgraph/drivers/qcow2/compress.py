"""Compressed cluster codecs (``specs/qcow2-format.md`` §6).

* type 0, "zlib": a raw deflate stream (no zlib header or trailer), window 2^12;
* type 1, "zstd": one zstd frame, no length prefix; needs the optional ``zstandard`` module.

Decompression stops as soon as one full cluster has been produced: the bytes QEMU reads for a
compressed cluster end on a sector boundary, so trailing garbage is normal. Compression (for
``write -c`` / ``convert -c``) is left to the next step; :func:`compress_cluster` is its hook.
"""

from __future__ import annotations

import zlib
from typing import Any

from blockgraph.drivers.qcow2.header import (
    QCOW2_COMPRESSION_TYPE_ZLIB,
    QCOW2_COMPRESSION_TYPE_ZSTD,
)
from blockgraph.errors import EIO, ENOTSUP, IOFailure


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def decompress_cluster(
    compression_type: int, data: bytes | bytearray | memoryview, cluster_size: int
) -> bytes:
    """Decompress one cluster; the result is exactly ``cluster_size`` bytes.

    :raise IOFailure: EIO for a corrupt stream, ENOTSUP for zstd without ``zstandard``.
    """
    if compression_type == QCOW2_COMPRESSION_TYPE_ZLIB:
        try:
            out = zlib.decompressobj(-12).decompress(data, cluster_size)
        except zlib.error:
            # Streams made with a larger window (other writers) still decode with 15.
            try:
                out = zlib.decompressobj(-15).decompress(data, cluster_size)
            except zlib.error as e:
                raise IOFailure(EIO, f"qcow2: compressed cluster is corrupt: {e}") from e
    elif compression_type == QCOW2_COMPRESSION_TYPE_ZSTD:
        zstandard = _zstd()
        if zstandard is None:
            raise IOFailure(
                ENOTSUP, "qcow2: zstd compressed clusters need the 'zstandard' Python module"
            )
        try:
            out = zstandard.ZstdDecompressor().decompressobj().decompress(bytes(data))
        except zstandard.ZstdError as e:
            raise IOFailure(EIO, f"qcow2: compressed cluster is corrupt: {e}") from e
        out = out[:cluster_size]
    else:
        raise IOFailure(ENOTSUP, f"qcow2: unknown compression type {compression_type}")
    if len(out) != cluster_size:
        raise IOFailure(EIO, "qcow2: compressed cluster is truncated")
    return out


def compress_cluster(compression_type: int, data: bytes | bytearray | memoryview) -> bytes | None:
    """Compress one cluster as QEMU does; ``None`` if the result would not be smaller."""
    if compression_type == QCOW2_COMPRESSION_TYPE_ZLIB:
        c = zlib.compressobj(-1, zlib.DEFLATED, -12, 9)
        out = c.compress(data) + c.flush()
    elif compression_type == QCOW2_COMPRESSION_TYPE_ZSTD:
        zstandard = _zstd()
        if zstandard is None:
            raise IOFailure(ENOTSUP, "qcow2: zstd compression needs the 'zstandard' Python module")
        out = zstandard.ZstdCompressor().compress(bytes(data))
    else:
        raise IOFailure(ENOTSUP, f"qcow2: unknown compression type {compression_type}")
    return out if len(out) < len(data) else None
