"""Writes and discards on images with extended L2 entries (``specs/qcow2-format.md`` §5).

Each 128-bit entry is the standard descriptor plus a bitmap: bit *i* = subcluster *i*
allocated, bit 32+*i* = subcluster *i* reads as zeros. Rules of this module:

* A subcluster is marked allocated only once all of its bytes are valid in the host cluster:
  a write that covers part of an unallocated subcluster fills the rest of it (COW per
  subcluster) from what it read as before (backing file or zeros).
* A cluster that cannot be written in place (no host cluster, shared with a snapshot, or
  compressed) gets a new host cluster. From an unallocated cluster only the written
  subclusters are written; from a shared or compressed one the whole cluster is copied.
* Ordering is the driver's: refcount up, data (and COW), then the L2 entry (flush dependency
  when COW happened), then the old cluster's reference is dropped.

Functions take the driver and expect its metadata lock to be held.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from blockgraph.drivers.qcow2.tables import (
    L2E_OFFSET_MASK,
    L2E_SIZE_EXTENDED,
    QCOW_L2_BITMAP_ALL_ZEROES,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    SUBCLUSTERS_PER_CLUSTER,
    ClusterType,
)

if TYPE_CHECKING:
    from blockgraph.drivers.qcow2.driver import Qcow2Driver


def _mask(first: int, last: int) -> int:
    """Allocation bits of subclusters ``first..last`` (inclusive)."""
    return ((1 << (last + 1)) - 1) & ~((1 << first) - 1)


async def _read_guest(drv: Qcow2Driver, entry: int, bitmap: int, start: int, end: int) -> bytes:
    """Guest bytes ``[start, end)`` of one cluster as its old (entry, bitmap) maps them."""
    out = bytearray(end - start)
    for seg in drv._segments(start, end - start, [(entry, bitmap)]):
        a = seg.guest_offset - start
        await drv._read_segment(seg, memoryview(out)[a : a + seg.length])
    return bytes(out)


async def write_slice_ext(drv: Qcow2Driver, offset: int, data: memoryview, l1_index: int,
                          l2_index: int, nb: int) -> None:
    """Write ``data`` at guest ``offset``: ``nb`` clusters inside one L2 table."""
    cs = drv.cluster_size
    sc = drv.subcluster_size
    entries = await drv._l2_entries(l1_index, l2_index, nb)
    cluster_base = offset & ~(cs - 1)
    end = offset + len(data)
    l2_offset = 0
    for i, (entry, bitmap) in enumerate(entries):
        cstart = cluster_base + i * cs
        lo = max(cstart, offset)
        hi = min(cstart + cs, end)
        piece = data[lo - offset : hi - offset]
        first = (lo - cstart) // sc
        last = (hi - 1 - cstart) // sc
        written = _mask(first, last)
        ctype = drv._ctype(entry & ~QCOW_OFLAG_ZERO)
        host = entry & L2E_OFFSET_MASK
        inplace = ctype is ClusterType.NORMAL and bool(entry & QCOW_OFLAG_COPIED)
        whole_copy = not inplace and (ctype is ClusterType.COMPRESSED or bool(host))
        if whole_copy:
            span_lo, span_hi = cstart, cstart + cs
        else:
            span_lo, span_hi = cstart + first * sc, cstart + (last + 1) * sc
        cow = False
        if span_lo < lo or hi < span_hi:
            if inplace and bitmap & (1 << first) and bitmap & (1 << last):
                span_lo, span_hi = lo, hi  # both edges already hold valid data
            else:
                cow = True
        if cow:
            buf = bytearray(await _read_guest(drv, entry, bitmap, span_lo, span_hi))
            buf[lo - span_lo : hi - span_lo] = piece
            payload = memoryview(buf)
        else:
            payload = piece
        if inplace:
            await drv._data.pwritev(host + (span_lo - cstart), payload)
            new_bitmap = (bitmap | written) & ~(written << SUBCLUSTERS_PER_CLUSTER)
            if new_bitmap == bitmap:
                continue
            new_entry = entry
        else:
            if not l2_offset:
                l2_offset = await drv._get_l2_for_write(l1_index)
            host = await drv._alloc_data(cstart, cs)
            await drv._data.pwritev(host + (span_lo - cstart), payload)
            if ctype is ClusterType.COMPRESSED:
                old_alloc = (1 << SUBCLUSTERS_PER_CLUSTER) - 1
                old_zero = 0
            else:
                old_alloc = bitmap & ((1 << SUBCLUSTERS_PER_CLUSTER) - 1)
                old_zero = bitmap >> SUBCLUSTERS_PER_CLUSTER
            new_bitmap = (old_alloc | written) | ((old_zero & ~written) << SUBCLUSTERS_PER_CLUSTER)
            new_entry = host | QCOW_OFLAG_COPIED
        if cow or drv.external_data:
            drv.l2_cache.set_depends_on_flush()
        if not l2_offset:
            l2_offset = await drv._get_l2_for_write(l1_index)
        await drv._l2_depends_on_refcounts()
        table = await drv.l2_cache.get(l2_offset)
        struct.pack_into(">QQ", table, (l2_index + i) * L2E_SIZE_EXTENDED, new_entry, new_bitmap)
        drv.l2_cache.mark_dirty(l2_offset)
        if not inplace:
            await drv._free_any_cluster(entry)


async def discard_slice_ext(drv: Qcow2Driver, l1_index: int, l2_index: int, nb: int,
                            full: bool = False) -> None:
    """Discard ``nb`` whole clusters: host clusters dropped; zero bits where needed.

    With a backing file (or over allocated data) the subclusters become "reads as zeros", so
    nothing older shows through; ``full`` makes them plainly unallocated.
    """
    entries = await drv._l2_entries(l1_index, l2_index, nb)
    has_backing = drv.backing is not None
    new: list[tuple[int, int]] = []
    for entry, bitmap in entries:
        allocated = bool(entry & L2E_OFFSET_MASK) or bool(bitmap)
        if full or not (has_backing or allocated):
            new.append((0, 0))
        else:
            new.append((0, QCOW_L2_BITMAP_ALL_ZEROES))
    if new == entries:
        return
    l2_offset = await drv._get_l2_for_write(l1_index)
    table = await drv.l2_cache.get(l2_offset)
    words = [w for pair in new for w in pair]
    struct.pack_into(f">{len(words)}Q", table, l2_index * L2E_SIZE_EXTENDED, *words)
    drv.l2_cache.mark_dirty(l2_offset)
    for entry, _bitmap in entries:
        await drv._free_any_cluster(entry)
