"""Persistent dirty bitmaps in qcow2 (``specs/qcow2-format.md`` §2.2 and §9).

Directory entry (big-endian, padded to a multiple of 8)::

     0  bitmap_table_offset (u64)   8  bitmap_table_size (u32)   12  flags (u32)
    16  type (u8)                  17  granularity_bits (u8)     18  name_size (u16)
    20  extra_data_size (u32)      24  extra data, name (no NUL), padding

Bitmap table entry: bits 9-55 the host offset of one cluster of bitmap data; 0 with bit 0
clear = all zeroes, bit 0 set = all ones.

Rules of this module:

* Opening read-write marks every loaded bitmap ``in_use`` on disk (directory rewritten in
  place, then flushed) before the first guest write can make the stored contents stale.
* Storing (on close) writes new data clusters and new tables, then the new directory, and
  syncs them with their refcounts *before* the header extension points at the new directory
  (one write + sync of cluster 0); only then are the old directory, tables and data freed.
* Bitmaps found ``in_use`` are inconsistent: kept on disk as they are (same table, same
  flags) until removed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from blockgraph.drivers.bitmap import DirtyBitmap, valid_granularity
from blockgraph.drivers.qcow2.header import (
    QCOW2_AUTOCLEAR_BITMAPS,
    BitmapsExt,
    build_header_cluster,
)
from blockgraph.errors import BlockError

if TYPE_CHECKING:
    from blockgraph.drivers.qcow2.driver import Qcow2Driver

BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
BME_RESERVED_FLAGS = ~0x7 & 0xFFFFFFFF
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ENTRY_FLAG_ALL_ONES = 1
BITMAP_TYPE_DIRTY_TRACKING = 1
BITMAP_MAX_NAME_SIZE = 1023
QCOW2_MAX_BITMAPS = 65535
_ENTRY_FMT = ">QIIBBHI"
_ENTRY_SIZE = struct.calcsize(_ENTRY_FMT)  # 24


@dataclass
class StoredBitmap:
    """Where a bitmap lives on disk, as read from the directory (or last stored)."""

    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: str
    extra_data: bytes = b""
    table: list[int] = field(default_factory=list)


def parse_directory(raw: bytes, nb_bitmaps: int) -> list[StoredBitmap]:
    """Decode the bitmap directory.

    :raise BlockError: on a truncated directory or an entry QEMU refuses.
    """
    out: list[StoredBitmap] = []
    pos = 0
    for _ in range(nb_bitmaps):
        if pos + _ENTRY_SIZE > len(raw):
            raise BlockError("Bitmap directory is truncated")
        t_off, t_size, flags, btype, gran_bits, name_size, extra_size = struct.unpack_from(
            _ENTRY_FMT, raw, pos)
        body = pos + _ENTRY_SIZE
        end = body + extra_size + name_size
        if end > len(raw) or not name_size:
            raise BlockError("Bitmap directory is corrupt")
        extra = bytes(raw[body : body + extra_size])
        name = bytes(raw[body + extra_size : end]).decode("utf-8", "replace")
        out.append(StoredBitmap(t_off, t_size, flags, btype, gran_bits, name, extra))
        pos = (end + 7) & ~7
    return out


def build_directory(entries: list[StoredBitmap]) -> bytes:
    out = bytearray()
    for e in entries:
        name = e.name.encode()
        entry = struct.pack(_ENTRY_FMT, e.table_offset, e.table_size, e.flags, e.type,
                            e.granularity_bits, len(name), len(e.extra_data)) + e.extra_data + name
        out += entry + bytes(-len(entry) % 8)
    return bytes(out)


def table_size(disk_size: int, granularity: int, cluster_size: int) -> int:
    return -(-DirtyBitmap.byte_length(disk_size, granularity) // cluster_size)


class Qcow2Bitmaps:
    """The persistent bitmaps of one open qcow2 image."""

    def __init__(self, drv: Qcow2Driver) -> None:
        self.drv = drv
        # name -> on-disk location, for bitmaps that exist in the image's directory.
        self.stored: dict[str, StoredBitmap] = {}
        self.changed = False

    @property
    def bitmaps(self) -> list[DirtyBitmap]:
        return self.drv.dirty_bitmaps

    def find(self, name: str) -> DirtyBitmap | None:
        return next((b for b in self.bitmaps if b.name == name), None)

    # -- open -------------------------------------------------------------------------------

    async def load(self) -> None:
        """Read the directory and the data of every consistent bitmap."""
        drv = self.drv
        h = drv.header
        ext = h.bitmaps
        if ext is None or not ext.nb_bitmaps or not h.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS:
            return
        raw = bytearray(ext.bitmap_directory_size)
        await drv._file.preadv(ext.bitmap_directory_offset, memoryview(raw))
        for entry in parse_directory(bytes(raw), ext.nb_bitmaps):
            await self._load_one(entry)

    async def _load_one(self, entry: StoredBitmap) -> None:
        drv = self.drv
        cs = drv.cluster_size
        raw = bytearray(entry.table_size * 8)
        if raw:
            await drv._file.preadv(entry.table_offset, memoryview(raw))
        entry.table = list(struct.unpack(f">{entry.table_size}Q", raw))
        self.stored[entry.name] = entry
        granularity = 1 << entry.granularity_bits
        usable = (entry.type == BITMAP_TYPE_DIRTY_TRACKING and valid_granularity(granularity)
                  and not entry.flags & BME_RESERVED_FLAGS
                  and (not entry.extra_data or entry.flags & BME_FLAG_EXTRA_DATA_COMPATIBLE))
        bitmap = DirtyBitmap(entry.name, drv.header.size,
                             granularity if valid_granularity(granularity) else 65536,
                             enabled=bool(entry.flags & BME_FLAG_AUTO), persistent=True,
                             inconsistent=bool(entry.flags & BME_FLAG_IN_USE) or not usable)
        self.bitmaps.append(bitmap)
        if bitmap.inconsistent:
            return
        nbytes = len(bitmap.bits)
        cluster = bytearray(cs)
        for i, te in enumerate(entry.table):
            start = i * cs
            if start >= nbytes:
                break
            n = min(cs, nbytes - start)
            off = te & BME_TABLE_ENTRY_OFFSET_MASK
            if off:
                await drv._file.preadv(off, memoryview(cluster))
                bitmap.bits[start : start + n] = cluster[:n]
            elif te & BME_TABLE_ENTRY_FLAG_ALL_ONES:
                bitmap.bits[start : start + n] = b"\xff" * n
        bitmap.resize(bitmap.size)  # drops stray bits past the end

    async def mark_in_use(self) -> None:
        """Read-write open: set ``in_use`` on disk before anything can change the guest data."""
        if not self.stored:
            return
        for entry in self.stored.values():
            entry.flags |= BME_FLAG_IN_USE
        ext = self.drv.header.bitmaps
        assert ext is not None
        directory = build_directory(list(self.stored.values()))
        # Same names, same sizes: the directory keeps its length and is rewritten in place.
        await self.drv._file.pwritev(ext.bitmap_directory_offset, memoryview(directory))
        await self.drv._file.flush()
        self.changed = True

    # -- operations -------------------------------------------------------------------------

    def add(self, name: str, granularity: int, enabled: bool = True) -> DirtyBitmap:
        """Create a persistent bitmap (QMP ``block-dirty-bitmap-add`` with ``persistent``)."""
        if not name:
            raise BlockError("Bitmap name cannot be empty")
        if len(name.encode()) > BITMAP_MAX_NAME_SIZE:
            raise BlockError("Bitmap name is too long")
        if self.find(name) is not None:
            raise BlockError(f"Bitmap already exists: {name}")
        if not valid_granularity(granularity):
            raise BlockError("Granularity must be power of 2 and at least 512")
        if self.drv.read_only:
            raise BlockError("Cannot add bitmap to a read-only image")
        if len(self.bitmaps) >= QCOW2_MAX_BITMAPS:
            raise BlockError(f"Can't make bitmap '{name}' persistent: Maximum number of "
                             "persistent bitmaps is already reached")
        bitmap = DirtyBitmap(name, self.drv.header.size, granularity, enabled=enabled,
                             persistent=True)
        self.bitmaps.append(bitmap)
        self.changed = True
        return bitmap

    def lookup(self, name: str) -> DirtyBitmap:
        bitmap = self.find(name)
        if bitmap is None:
            raise BlockError(f"Dirty bitmap '{name}' not found")
        return bitmap

    def usable(self, name: str) -> DirtyBitmap:
        bitmap = self.lookup(name)
        if bitmap.inconsistent:
            raise BlockError(f"Bitmap '{name}' is inconsistent and cannot be used\n"
                             "Try block-dirty-bitmap-remove to delete this bitmap from disk")
        return bitmap

    def remove(self, name: str) -> None:
        bitmap = self.lookup(name)
        self.bitmaps.remove(bitmap)
        self.changed = True

    def clear(self, name: str) -> None:
        self.usable(name).clear()
        self.changed = True

    def enable(self, name: str, enabled: bool) -> None:
        self.usable(name).enabled = enabled
        self.changed = True

    def merge(self, target: str, source: DirtyBitmap) -> None:
        if source.inconsistent:
            raise BlockError(f"Bitmap '{source.name}' is inconsistent and cannot be used\n"
                             "Try block-dirty-bitmap-remove to delete this bitmap from disk")
        self.usable(target).merge(source)
        self.changed = True

    # -- close ------------------------------------------------------------------------------

    async def store(self) -> None:
        """Write every persistent bitmap and switch the header to a new directory."""
        if not self.changed:
            return
        drv = self.drv
        h = drv.header
        refcounts = drv.refcounts
        cs = drv.cluster_size
        new_entries: list[StoredBitmap] = []
        to_free: list[tuple[int, int]] = []
        kept: set[str] = set()
        for bitmap in self.bitmaps:
            if not bitmap.persistent:
                continue
            old = self.stored.get(bitmap.name)
            if bitmap.inconsistent and old is not None:
                new_entries.append(old)  # left exactly as found
                kept.add(bitmap.name)
                continue
            new_entries.append(await self._write_bitmap(bitmap))
        for name, old in self.stored.items():
            if name in kept:
                continue
            to_free.extend((te & BME_TABLE_ENTRY_OFFSET_MASK, cs) for te in old.table
                           if te & BME_TABLE_ENTRY_OFFSET_MASK)
            if old.table_size:
                to_free.append((old.table_offset, old.table_size * 8))
        old_ext = h.bitmaps
        directory = build_directory(new_entries)
        new_ext: BitmapsExt | None = None
        if new_entries:
            dir_offset = await refcounts.alloc_clusters(len(directory))
            await drv._file.pwritev(dir_offset, memoryview(directory))
            new_ext = BitmapsExt(len(new_entries), len(directory), dir_offset)
        # Data, tables, directory and their refcounts are stable before the header names them.
        await drv._write_caches()
        await drv._file.flush()
        h.bitmaps = new_ext
        if new_ext is not None:
            h.autoclear_features |= QCOW2_AUTOCLEAR_BITMAPS
        else:
            h.autoclear_features &= ~QCOW2_AUTOCLEAR_BITMAPS
        await drv._file.pwritev(0, memoryview(build_header_cluster(h)))
        await drv._file.flush()
        if old_ext is not None and old_ext.nb_bitmaps and old_ext.bitmap_directory_offset:
            to_free.append((old_ext.bitmap_directory_offset, old_ext.bitmap_directory_size))
        for offset, length in to_free:
            await refcounts.free_clusters(offset, length)
        self.stored = {e.name: e for e in new_entries}
        self.changed = False

    async def _write_bitmap(self, bitmap: DirtyBitmap) -> StoredBitmap:
        drv = self.drv
        cs = drv.cluster_size
        nb_entries = table_size(bitmap.size, bitmap.granularity, cs)
        table: list[int] = []
        view = memoryview(bitmap.bits)
        for i in range(nb_entries):
            chunk = view[i * cs : (i + 1) * cs]
            if chunk.tobytes().count(0) == len(chunk):
                table.append(0)
                continue
            offset = await drv.refcounts.alloc_clusters(cs)
            data = bytes(chunk) + bytes(cs - len(chunk))
            await drv._overlap_check(offset, cs)
            await drv._file.pwritev(offset, memoryview(data))
            table.append(offset)
        table_offset = 0
        if nb_entries:
            raw = struct.pack(f">{nb_entries}Q", *table)
            table_offset = await drv.refcounts.alloc_clusters(len(raw))
            await drv._file.pwritev(table_offset, memoryview(raw))
        flags = BME_FLAG_AUTO if bitmap.enabled else 0
        return StoredBitmap(table_offset, nb_entries, flags, BITMAP_TYPE_DIRTY_TRACKING,
                            bitmap.granularity.bit_length() - 1, bitmap.name, b"", table)
