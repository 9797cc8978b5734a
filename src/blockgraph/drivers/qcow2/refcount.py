"""Host cluster allocation: the refcount table, refcount blocks, allocation and freeing.

Refcount table entry (64 bits)::

    bits 0-8   reserved (0)
    bits 9-63  offset of the refcount block (cluster aligned); 0 = not allocated (all refcounts 0)

A refcount block is one cluster of ``refcount_bits = 1 << refcount_order`` wide unsigned entries:
big-endian integers for widths ≥ 8, packed LSB-first inside each byte below 8::

    refcount_block_entries = cluster_size * 8 / refcount_bits
    block_index = (host_offset / cluster_size) % refcount_block_entries
    table_index = (host_offset / cluster_size) / refcount_block_entries

Ordering (``specs/qcow2-format.md`` §10): a new refcount block is written and flushed before
the table entry that points at it (write + sync); a new table is written and synced before the
header points at it; a decrement only reaches the disk after the L2/L1 change that dropped the
reference (the refcount cache is made to depend on the L2 cache).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from blockgraph.drivers.base import ChildAccess
from blockgraph.drivers.qcow2.header import HEADER_OFFSET_REFTABLE, MAX_REFTABLE_SIZE
from blockgraph.drivers.qcow2.tables import (
    REFT_OFFSET_MASK,
    REFTABLE_ENTRY_SIZE,
    Qcow2Cache,
)
from blockgraph.errors import EINVAL, ENOSPC, IOFailure

_WIDE_FORMATS = {3: ">B", 4: ">H", 5: ">I", 6: ">Q"}


class RefcountAgain(Exception):
    """A new refcount block was placed where the caller may have meant to allocate: retry."""


def get_refcount_entry(block: bytearray, index: int, order: int) -> int:
    if order >= 3:
        return int(struct.unpack_from(_WIDE_FORMATS[order], block, index << (order - 3))[0])
    bits = 1 << order
    bit = index * bits
    return (block[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1)


def set_refcount_entry(block: bytearray, index: int, order: int, value: int) -> None:
    if order >= 3:
        struct.pack_into(_WIDE_FORMATS[order], block, index << (order - 3), value)
        return
    bits = 1 << order
    bit = index * bits
    mask = ((1 << bits) - 1) << (bit & 7)
    block[bit >> 3] = (block[bit >> 3] & ~mask & 0xFF) | ((value << (bit & 7)) & mask)


class Refcounts:
    """The refcount structure of one open image.

    :param file: the image file child.
    :param cache: the refcount block cache.
    :param refcount_table: the in-memory copy of the refcount table (entries as ints).
    """

    def __init__(
        self,
        file: ChildAccess,
        cache: Qcow2Cache,
        cluster_bits: int,
        refcount_order: int,
        refcount_table_offset: int,
        refcount_table: list[int],
    ) -> None:
        self.file = file
        self.cache = cache
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.refcount_order = refcount_order
        self.refcount_max = (1 << (1 << refcount_order)) - 1
        self.refcount_block_bits = cluster_bits + 3 - refcount_order
        self.refcount_block_size = 1 << self.refcount_block_bits
        self.refcount_table_offset = refcount_table_offset
        # Bumped whenever the table changes, so that the overlap check can keep the sorted
        # block offsets instead of comparing the whole table (thousands of entries) per write.
        self.table_version = 0
        self._refcount_table = refcount_table
        self.free_cluster_index = 0
        # Where the next compressed cluster may start (inside a partly used host cluster); 0 = none.
        self.free_byte_offset = 0
        # Called with (offset, length) of host ranges whose refcount dropped to 0.
        self.on_free: Callable[[int, int], None] | None = None
        # The L2 cache, set by the driver: decrements depend on it.
        self.l2_cache: Qcow2Cache | None = None

    @property
    def refcount_table(self) -> list[int]:
        """The refcount table's entries. Replace it by assignment or change one entry with
        :meth:`set_table_entry`; never mutate the list in place (see ``table_version``)."""
        return self._refcount_table

    @refcount_table.setter
    def refcount_table(self, table: list[int]) -> None:
        self._refcount_table = table
        self.table_version += 1

    def set_table_entry(self, table_index: int, value: int) -> None:
        self._refcount_table[table_index] = value
        self.table_version += 1

    @property
    def refcount_table_size(self) -> int:
        return len(self.refcount_table)

    def _block_offset(self, table_index: int) -> int:
        if table_index >= len(self.refcount_table):
            return 0
        return self.refcount_table[table_index] & REFT_OFFSET_MASK

    async def get_refcount(self, cluster_index: int) -> int:
        table_index = cluster_index >> self.refcount_block_bits
        block_offset = self._block_offset(table_index)
        if not block_offset:
            return 0
        block = await self.cache.get(block_offset)
        return get_refcount_entry(
            block, cluster_index & (self.refcount_block_size - 1), self.refcount_order
        )

    async def _alloc_clusters_noref(self, nb_clusters: int) -> int:
        """Find ``nb_clusters`` contiguous free clusters from ``free_cluster_index`` on."""
        index = self.free_cluster_index
        block_mask = self.refcount_block_size - 1
        order = self.refcount_order
        cache = self.cache
        while True:
            start = index
            count = 0
            # First fit, cluster by cluster, but each refcount block looked up once per
            # stretch of clusters it covers rather than once per cluster.
            while count < nb_clusters:
                block_offset = self._block_offset(index >> self.refcount_block_bits)
                stretch = min(nb_clusters - count, block_mask + 1 - (index & block_mask))
                if not block_offset:
                    index += stretch  # no block: all free
                    count += stretch
                    continue
                block = cache.lookup(block_offset) or await cache.get(block_offset)
                stop = index + stretch
                while index < stop and not get_refcount_entry(block, index & block_mask, order):
                    index += 1
                count += stretch - (stop - index)
                if index < stop:
                    break  # a used cluster at ``index``
            if count == nb_clusters:
                self.free_cluster_index = start + nb_clusters
                return start << self.cluster_bits
            index += 1

    async def alloc_clusters(self, size: int) -> int:
        """Allocate contiguous clusters for ``size`` bytes with refcount 1; return the offset."""
        nb_clusters = (size + self.cluster_size - 1) >> self.cluster_bits
        while True:
            offset = await self._alloc_clusters_noref(nb_clusters)
            try:
                await self.update_refcount(offset, nb_clusters << self.cluster_bits, 1)
            except RefcountAgain:
                continue
            return offset

    async def free_clusters(self, offset: int, size: int) -> None:
        await self.update_refcount(offset, size, -1)

    async def alloc_bytes(self, size: int) -> int:
        """Allocate ``size`` (< one cluster) bytes for compressed data, packed back to back.

        Compressed clusters share host clusters: each one adds 1 to the refcount of every host
        cluster its bytes touch. The next allocation continues where this one ended, in the
        same cluster or spilling into the following one when that one is free.
        """
        cs = self.cluster_size
        offset = self.free_byte_offset
        if offset and await self.get_refcount(offset >> self.cluster_bits) >= self.refcount_max:
            offset = 0
        free_in_cluster = cs - (offset & (cs - 1)) if offset else 0
        while True:
            if not offset or free_in_cluster < size:
                new_cluster = (await self._alloc_clusters_noref(1))
                if not offset or -(-offset // cs) * cs != new_cluster:
                    offset = new_cluster
                    free_in_cluster = cs
                else:
                    free_in_cluster += cs
            try:
                await self.update_refcount(offset, size, 1)
            except RefcountAgain:
                # A refcount block took the cluster we meant: start a fresh one.
                offset = 0
                continue
            break
        end = offset + size
        self.free_byte_offset = end if end & (cs - 1) else 0
        return offset

    async def update_refcount(self, offset: int, length: int, addend: int) -> None:
        """Add ``addend`` to the refcount of every cluster touched by ``[offset, offset+length)``.

        On failure the clusters already changed are changed back (QEMU does the same), so a
        retry after :class:`RefcountAgain` starts from a consistent state.
        """
        if length <= 0:
            return
        decrease = addend < 0
        if decrease and self.l2_cache is not None:
            # The reference must be gone on disk before the lower refcount is (§10 rule 3).
            await self.cache.set_dependency(self.l2_cache)
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        cluster_index = first
        try:
            while cluster_index <= last:
                table_index = cluster_index >> self.refcount_block_bits
                block_offset = self._block_offset(table_index)
                if not block_offset:
                    await self._alloc_refcount_block(cluster_index)
                    block_offset = self._block_offset(table_index)
                block = await self.cache.get(block_offset)
                # Every cluster of this block in the range, without re-looking up the block.
                block_end = min(last, ((table_index + 1) << self.refcount_block_bits) - 1)
                freed_start = -1
                for ci in range(cluster_index, block_end + 1):
                    block_index = ci & (self.refcount_block_size - 1)
                    refcount = get_refcount_entry(block, block_index, self.refcount_order)
                    new = refcount + addend
                    if new < 0 or new > self.refcount_max:
                        raise IOFailure(EINVAL, "refcount overflow or underflow")
                    set_refcount_entry(block, block_index, self.refcount_order, new)
                    if new == 0:
                        if ci < self.free_cluster_index:
                            self.free_cluster_index = ci
                        if freed_start < 0:
                            freed_start = ci
                    elif freed_start >= 0:
                        self._freed(freed_start, ci)
                        freed_start = -1
                    cluster_index = ci + 1
                if freed_start >= 0:
                    self._freed(freed_start, block_end + 1)
                self.cache.mark_dirty(block_offset)
        except BaseException:
            if cluster_index > first:
                await self.update_refcount(
                    first << self.cluster_bits, (cluster_index - first) << self.cluster_bits,
                    -addend,
                )
            raise

    def _freed(self, start: int, end: int) -> None:
        if start <= self.free_byte_offset >> self.cluster_bits < end:
            self.free_byte_offset = 0  # that cluster may now be allocated to someone else
        if self.on_free is not None:
            self.on_free(start << self.cluster_bits, (end - start) << self.cluster_bits)
            # A freed cluster is reused from the cache only via get_empty; drop stale copies.
        for ci in range(start, end):
            self.cache.discard(ci << self.cluster_bits)

    async def _alloc_refcount_block(self, cluster_index: int) -> None:
        """Allocate the refcount block covering ``cluster_index``, then raise RefcountAgain."""
        table_index = cluster_index >> self.refcount_block_bits
        if table_index >= len(self.refcount_table):
            await self._grow_refcount_table(table_index)
            raise RefcountAgain()

        new_block = await self._alloc_clusters_noref(1)
        if new_block == 0:
            raise IOFailure(ENOSPC, "refcount block allocated at offset 0")
        if (new_block >> self.cluster_bits) >> self.refcount_block_bits == table_index:
            # The block describes itself.
            block = await self.cache.get_empty(new_block)
            set_refcount_entry(
                block,
                (new_block >> self.cluster_bits) & (self.refcount_block_size - 1),
                self.refcount_order,
                1,
            )
        else:
            # Counted elsewhere: can recurse, but ends at a block that describes itself.
            await self.update_refcount(new_block, self.cluster_size, 1)
            await self.cache.flush()
            await self.cache.get_empty(new_block)
        self.cache.mark_dirty(new_block)
        await self.cache.flush()
        # Only now may the table point at it.
        await self.file.pwritev(
            self.refcount_table_offset + table_index * REFTABLE_ENTRY_SIZE,
            memoryview(struct.pack(">Q", new_block)),
        )
        await self.file.flush()
        self.set_table_entry(table_index, new_block)
        raise RefcountAgain()

    async def _grow_refcount_table(self, table_index: int) -> None:
        """Build a self-describing area (refcount blocks + a larger table) and switch to it.

        The area starts at the first cluster covered by ``table_index``: nothing there is in
        use, since no refcount block covers it yet.
        """
        cs = self.cluster_size
        area_start = (table_index << self.refcount_block_bits) << self.cluster_bits
        # 50 % headroom, as QEMU: tables grow rarely but each switch costs a sync.
        entries = max(len(self.refcount_table), table_index + 1)
        nb_blocks = 1
        while True:
            new_entries = entries + nb_blocks
            new_entries += new_entries // 2
            table_clusters = -(-new_entries * REFTABLE_ENTRY_SIZE // cs)
            area_clusters = nb_blocks + table_clusters
            need_blocks = -(-area_clusters // self.refcount_block_size)
            if need_blocks <= nb_blocks and table_index + need_blocks <= new_entries:
                break
            nb_blocks = need_blocks
        if table_clusters * cs > MAX_REFTABLE_SIZE:
            raise IOFailure(ENOSPC, "refcount table too large")
        new_entries = table_clusters * cs // REFTABLE_ENTRY_SIZE

        # Refcount blocks of the area: each cluster of the area (blocks + table) has refcount 1.
        blocks = bytearray(nb_blocks * cs)
        area_first = area_start >> self.cluster_bits
        for i in range(area_clusters):
            ci = area_first + i
            block_no = i >> self.refcount_block_bits
            _set_in(blocks, block_no * cs, ci & (self.refcount_block_size - 1),
                    self.refcount_order)
        # Outstanding refcount changes must not race with the switch.
        await self.cache.flush()
        await self.file.pwritev(area_start, memoryview(blocks))
        await self.file.flush()

        new_table = list(self.refcount_table) + [0] * (new_entries - len(self.refcount_table))
        for b in range(nb_blocks):
            new_table[table_index + b] = area_start + b * cs
        table_offset = area_start + nb_blocks * cs
        table_bytes = struct.pack(f">{new_entries}Q", *new_table)
        await self.file.pwritev(table_offset, memoryview(table_bytes))
        await self.file.flush()

        await self.file.pwritev(
            HEADER_OFFSET_REFTABLE, memoryview(struct.pack(">QI", table_offset, table_clusters))
        )
        await self.file.flush()

        old_offset = self.refcount_table_offset
        old_size = len(self.refcount_table) * REFTABLE_ENTRY_SIZE
        self.refcount_table_offset = table_offset
        self.refcount_table = new_table
        await self.free_clusters(old_offset, old_size)


def _set_in(buf: bytearray, base: int, index: int, order: int) -> None:
    """Set entry ``index`` to 1 in the refcount block starting at ``buf[base]``."""
    if order >= 3:
        struct.pack_into(_WIDE_FORMATS[order], buf, base + (index << (order - 3)), 1)
        return
    bits = 1 << order
    bit = index * bits
    buf[base + (bit >> 3)] |= 1 << (bit & 7)

