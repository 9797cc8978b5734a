"""Resizing a qcow2 image: the L1 table, ``truncate`` (grow and shrink) and preallocation.

Rules of this module (``specs/qcow2-format.md`` §10):

* A larger L1 table is written to new clusters and synced, then the header's ``l1_size`` and
  ``l1_table_offset`` (12 contiguous bytes at 36) are switched in one write + sync, and only then
  is the old table freed.
* Shrinking drops every cluster past the new end (L2 entries cleared, references dropped),
  zeroes the L1 entries past the new L1 size on disk before their L2 tables are freed, writes
  the new size, and finally cuts the file after its last used cluster.
* Growing never lets old bytes show through: the tail of a partial last cluster and anything a
  longer backing file would show in the new area are zeroed.

Functions here take the driver and expect its metadata lock to be held unless they say
otherwise.
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING

from blockgraph.drivers.base import PREALLOC_MODES, RequestFlags
from blockgraph.drivers.qcow2.header import HEADER_OFFSET_L1, HEADER_OFFSET_SIZE, MAX_L1_SIZE
from blockgraph.drivers.qcow2.tables import (
    L1E_OFFSET_MASK,
    L1E_SIZE,
    L2E_OFFSET_MASK,
    ClusterType,
)
from blockgraph.errors import ENOTSUP, BlockError, IOFailure

if TYPE_CHECKING:
    from blockgraph.drivers.qcow2.driver import Qcow2Driver

_ZERO_CHUNK = 1 << 20


def l1_size_for(drv: Qcow2Driver, size: int) -> int:
    """Number of L1 entries needed for a disk of ``size`` bytes."""
    return -(-size // (drv.cluster_size * drv.l2_size))


async def grow_l1_table(drv: Qcow2Driver, min_size: int) -> None:
    """Make the active L1 table hold at least ``min_size`` entries (exactly that many if new)."""
    h = drv.header
    if min_size <= h.l1_size:
        return
    if min_size * L1E_SIZE > MAX_L1_SIZE:
        raise IOFailure(errno.EFBIG, "Active L1 table too large")
    new_offset = await drv.refcounts.alloc_clusters(min_size * L1E_SIZE)
    await drv.refcount_cache.flush()
    table = list(drv.l1_table) + [0] * (min_size - len(drv.l1_table))
    await drv._file.pwritev(new_offset, memoryview(struct.pack(f">{min_size}Q", *table)))
    await drv._file.flush()
    await drv._file.pwritev(HEADER_OFFSET_L1, memoryview(struct.pack(">IQ", min_size, new_offset)))
    await drv._file.flush()
    old_offset, old_size = h.l1_table_offset, h.l1_size
    drv.l1_table = table
    h.l1_size = min_size
    h.l1_table_offset = new_offset
    if old_size:
        await drv.refcounts.free_clusters(old_offset, old_size * L1E_SIZE)


async def _drop_clusters(drv: Qcow2Driver, start: int, end: int) -> None:
    """Clear the L2 entries of guest clusters ``[start, end)`` and drop their references."""
    cs = drv.cluster_size
    esize = drv.l2_entry_size
    pos = start
    while pos < end:
        l1_index, l2_index, nb = drv._split(pos, end - pos)
        pos += nb * cs
        if l1_index >= len(drv.l1_table) or not drv.l1_table[l1_index] & L1E_OFFSET_MASK:
            continue
        entries = await drv._l2_entries(l1_index, l2_index, nb)
        if not any(e or b for e, b in entries):
            continue
        l2_offset = await drv._get_l2_for_write(l1_index)
        table = await drv.l2_cache.get(l2_offset)
        table[l2_index * esize : (l2_index + nb) * esize] = bytes(nb * esize)
        drv.l2_cache.mark_dirty(l2_offset)
        for entry, _bitmap in entries:
            await drv._free_any_cluster(entry)


async def _shrink_l1_table(drv: Qcow2Driver, new_l1_size: int) -> None:
    """Free the L2 tables past ``new_l1_size``; their L1 entries are zeroed on disk first."""
    h = drv.header
    if new_l1_size >= h.l1_size:
        return
    await drv._write_caches()
    nb = h.l1_size - new_l1_size
    await drv._file.pwritev(h.l1_table_offset + new_l1_size * L1E_SIZE, memoryview(bytes(nb * 8)))
    await drv._file.flush()
    for i in range(new_l1_size, h.l1_size):
        l2_offset = drv.l1_table[i] & L1E_OFFSET_MASK
        drv.l1_table[i] = 0
        if l2_offset:
            await drv.refcounts.free_clusters(l2_offset, drv.cluster_size)


async def _last_used_cluster_end(drv: Qcow2Driver) -> int:
    cs = drv.cluster_size
    index = -(-drv._file.getlength() // cs) - 1
    while index > 0 and await drv.refcounts.get_refcount(index) == 0:
        index -= 1
    return (index + 1) * cs


async def _zero_range(drv: Qcow2Driver, offset: int, length: int) -> None:
    """Make guest ``[offset, offset+length)`` read as zeros (no lock held by the caller)."""
    if length <= 0:
        return
    try:
        await drv.pwrite_zeroes(offset, length, RequestFlags.NONE)
        return
    except IOFailure as exc:
        if exc.errno != ENOTSUP:
            raise
    zeros = bytes(min(length, _ZERO_CHUNK))
    pos = offset
    while pos < offset + length:
        n = min(len(zeros), offset + length - pos)
        await drv.pwritev(pos, memoryview(zeros)[:n], RequestFlags.NONE)
        pos += n


async def preallocate(drv: Qcow2Driver, offset: int, length: int, mode: str) -> None:
    """Allocate guest ``[offset, offset+length)`` (cluster aligned start) as ``mode`` asks.

    ``metadata``: L2 tables and host clusters; ``falloc``: also reserve the file space;
    ``full``: also write zeros to it. No lock held by the caller.
    """
    if mode == "off" or length <= 0:
        return
    await drv.preallocate_metadata(offset, length)
    if mode == "metadata":
        return
    # The data clusters just allocated: reserve (falloc) or write (full) their file space.
    cs = drv.cluster_size
    runs: list[list[int]] = []
    pos = offset
    end = offset + length
    async with drv._lock:
        while pos < end:
            l1_index, l2_index, nb = drv._split(pos, end - pos)
            for entry, _bitmap in await drv._l2_entries(l1_index, l2_index, nb):
                host = entry & L2E_OFFSET_MASK
                if drv._ctype(entry) is not ClusterType.NORMAL:
                    continue  # (host 0 is a data cluster in an external data file)
                if runs and runs[-1][1] == host:
                    runs[-1][1] += cs
                else:
                    runs.append([host, host + cs])
            pos += nb * cs
    zeros = bytes(min(length, _ZERO_CHUNK))
    data = drv._data
    for start, stop in runs:
        if mode == "falloc":
            await data.pwrite_zeroes(start, stop - start)
            continue
        while start < stop:
            n = min(len(zeros), stop - start)
            await data.pwritev(start, memoryview(zeros)[:n])
            start += n
    await data.flush()


async def truncate(drv: Qcow2Driver, length: int, prealloc: str = "off") -> None:
    """Resize the virtual disk to ``length`` bytes (``qcow2_co_truncate``); no lock held.

    :raise BlockError: QEMU's messages for sizes and modes it refuses.
    """
    h = drv.header
    cs = drv.cluster_size
    if length % 512:
        raise BlockError("The new size must be a multiple of 512")
    if prealloc not in PREALLOC_MODES:
        raise BlockError(f"Unsupported preallocation mode '{prealloc}'")
    old = h.size
    if length == old:
        return
    if h.version < 3 and drv.snapshots:
        # v2 snapshot entries need not record their disk size: QEMU refuses too.
        raise BlockError("Can't resize a v2 image which has snapshots")
    new_l1_size = l1_size_for(drv, length)
    if new_l1_size * L1E_SIZE > MAX_L1_SIZE:
        raise BlockError("The image size is too large for file format 'qcow2'")
    if length < old:
        if prealloc != "off":
            raise BlockError("Preallocation can't be used for shrinking an image")
        async with drv._lock:
            await _drop_clusters(drv, -(-length // cs) * cs, -(-old // cs) * cs)
            await _shrink_l1_table(drv, new_l1_size)
            await drv._write_caches()
            await drv._file.flush()
            await _write_size(drv, length)
            end = await _last_used_cluster_end(drv)
            if end < drv._file.getlength():
                await drv._file.truncate(end)
            if drv.external_data:
                await drv._data.truncate(length)
        return

    if drv.external_data:
        # The data file grows with the disk (QEMU resizes it too); a raw one must describe
        # the whole disk, so its new clusters are mapped as well.
        await drv._data.truncate(length)
        if drv.data_file_raw and prealloc == "off":
            prealloc = "metadata"

    async with drv._lock:
        await grow_l1_table(drv, new_l1_size)
    aligned_old = -(-old // cs) * cs
    await preallocate(drv, aligned_old, length - aligned_old, prealloc)
    async with drv._lock:
        await drv._write_caches()
        await drv._file.flush()
        await _write_size(drv, length)
        # The new area must read as zeros: stale bytes past the old end of the last cluster,
        # or a backing file longer than the old disk, would show through otherwise.
        tail_dirty = old % cs != 0 and not await drv._is_zero(old, aligned_old - old)
    if tail_dirty:
        await _zero_range(drv, old, min(aligned_old, length) - old)
    if drv.backing is not None and drv.backing.getlength() > old and prealloc in ("off", "metadata"):
        # As QEMU does when a backing file reaches past the old end: the whole new area gets
        # zero clusters (preallocated ones stay allocated), not just the part the backing
        # file covers. falloc and full already wrote zeroes into their clusters.
        await _zero_range(drv, old, length - old)


async def _write_size(drv: Qcow2Driver, length: int) -> None:
    await drv._file.pwritev(HEADER_OFFSET_SIZE, memoryview(struct.pack(">Q", length)))
    await drv._file.flush()
    drv.header.size = length
