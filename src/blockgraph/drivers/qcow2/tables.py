"""Guest → host mapping: L1/L2 entries, cluster types, and the metadata table cache.

L1 entry (64 bits)::

    bits 0-8   reserved (0)
    bits 9-55  offset of the L2 table (cluster aligned); 0 = unallocated
    bit  63    QCOW_OFLAG_COPIED (L2 table refcount == 1)

Standard L2 entry (64 bits)::

    bit  0     QCOW_OFLAG_ZERO (v3 only)
    bits 9-55  host cluster offset; 0 = unallocated
    bit  62    QCOW_OFLAG_COMPRESSED
    bit  63    QCOW_OFLAG_COPIED

Compressed descriptor: bits ``0 .. x-1`` host byte offset, ``x .. 61`` additional 512-byte
sectors, with ``x = 62 - (cluster_bits - 8)``. Extended L2 entries add a second 64-bit word:
bits 0-31 subcluster allocated, bits 32-63 subcluster reads as zeros.

:class:`Qcow2Cache` holds L2 tables and refcount blocks. Both caches are write-back; the order in
which they reach the disk is expressed as QEMU does: a cache may *depend on* another (that one is
written and the file flushed first) or *depend on flush* (the file is flushed first).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from blockgraph.drivers.base import ChildAccess

QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE

QCOW2_COMPRESSED_SECTOR_SIZE = 512

L1E_SIZE = 8
L2E_SIZE_NORMAL = 8
L2E_SIZE_EXTENDED = 16
REFTABLE_ENTRY_SIZE = 8

SUBCLUSTERS_PER_CLUSTER = 32
QCOW_L2_BITMAP_ALL_ALLOC = (1 << 32) - 1
QCOW_L2_BITMAP_ALL_ZEROES = QCOW_L2_BITMAP_ALL_ALLOC << 32


class ClusterType(enum.Enum):
    """QEMU's ``QCow2ClusterType``."""

    UNALLOCATED = 0
    ZERO_PLAIN = 1
    ZERO_ALLOC = 2
    NORMAL = 3
    COMPRESSED = 4


def cluster_type(l2_entry: int, data_file: bool = False) -> ClusterType:
    """Classify a standard L2 entry (the first word of an extended one).

    With extended L2 entries the zero bit is unused: callers look at the bitmap instead.
    With an external data file (``data_file``) host offset 0 is a valid data cluster: every
    cluster there has refcount 1, so ``QCOW_OFLAG_COPIED`` tells it from an unallocated one.
    """
    if l2_entry & QCOW_OFLAG_COMPRESSED:
        return ClusterType.COMPRESSED
    if l2_entry & QCOW_OFLAG_ZERO:
        return ClusterType.ZERO_ALLOC if l2_entry & L2E_OFFSET_MASK else ClusterType.ZERO_PLAIN
    if l2_entry & L2E_OFFSET_MASK or (data_file and l2_entry & QCOW_OFLAG_COPIED):
        return ClusterType.NORMAL
    return ClusterType.UNALLOCATED


class Qcow2CacheError(Exception):
    """A cache entry was requested while every slot holds a pinned table."""


class Qcow2Cache:
    """A write-back cache of cluster-sized metadata tables, keyed by host offset, LRU order.

    Tables are ``bytearray`` objects handed out by reference: callers mutate them in place and
    call :meth:`mark_dirty`. A table is only evicted by :meth:`get`/:meth:`get_empty` on the same
    cache, and the driver holds at most one table of each cache across an ``await`` under its
    metadata lock, so a table in use is never evicted while it is being changed (QEMU counts
    references for the same purpose; a minimum size of two keeps one slot free).
    """

    def __init__(self, name: str, file: ChildAccess, table_size: int, capacity: int) -> None:
        self.name = name
        self.file = file
        self.table_size = table_size
        self.capacity = max(2, capacity)
        self.tables: OrderedDict[int, bytearray] = OrderedDict()
        self.dirty: set[int] = set()
        self.depends: Qcow2Cache | None = None
        self.depends_on_flush = False
        # Where the data clusters these tables point at live when that is not ``file`` (an
        # external data file): "depends on flush" must make that data stable too.
        self.data_file: ChildAccess | None = None
        # Called before each table write; raises to refuse it (the overlap check hook).
        self.pre_write: Callable[[int, int], Awaitable[None]] | None = None

    async def get(self, offset: int) -> bytearray:
        table = self.tables.get(offset)
        if table is not None:
            self.tables.move_to_end(offset)
            return table
        await self._make_room()
        table = bytearray(self.table_size)
        await self.file.preadv(offset, memoryview(table))
        self.tables[offset] = table
        return table

    async def get_empty(self, offset: int) -> bytearray:
        """A table for a freshly allocated cluster: zero-filled, not read from disk."""
        table = self.tables.get(offset)
        if table is None:
            await self._make_room()
            table = bytearray(self.table_size)
            self.tables[offset] = table
        else:
            table[:] = bytes(self.table_size)
            self.tables.move_to_end(offset)
        return table

    def peek(self, offset: int) -> bytearray | None:
        return self.tables.get(offset)

    def lookup(self, offset: int) -> bytearray | None:
        """The table if it is cached (marked most recently used, as :meth:`get` does), else
        None: a lookup that never waits."""
        table = self.tables.get(offset)
        if table is not None:
            self.tables.move_to_end(offset)
        return table

    def mark_dirty(self, offset: int) -> None:
        self.dirty.add(offset)

    def discard(self, offset: int) -> None:
        """Forget a table whose cluster was freed; its contents no longer matter."""
        self.tables.pop(offset, None)
        self.dirty.discard(offset)

    async def _make_room(self) -> None:
        if len(self.tables) < self.capacity:
            return
        # Prefer evicting a clean table; write back the least recently used one otherwise.
        for offset in self.tables:
            if offset not in self.dirty:
                del self.tables[offset]
                return
        victim = next(iter(self.tables))
        await self._write_tables([victim])
        del self.tables[victim]

    async def set_dependency(self, dependency: Qcow2Cache) -> None:
        """Record that this cache's tables may only be written after ``dependency`` is flushed.

        A dependency the other way round (or on a third cache) is resolved first by flushing,
        so the two caches never wait on each other.
        """
        if dependency.depends is not None:
            await dependency.flush_dependency()
        if self.depends is not None and self.depends is not dependency:
            await self.flush_dependency()
        self.depends = dependency

    def set_depends_on_flush(self) -> None:
        self.depends_on_flush = True

    async def flush_dependency(self) -> None:
        dep = self.depends
        if dep is not None:
            await dep.flush()
            self.depends = None
        if self.depends_on_flush and self.data_file is not None:
            await self.data_file.flush()
        self.depends_on_flush = False

    async def _before_write(self) -> None:
        if self.depends is not None:
            await self.flush_dependency()
        elif self.depends_on_flush:
            if self.data_file is not None:
                await self.data_file.flush()
            await self.file.flush()
            self.depends_on_flush = False

    async def _write_tables(self, offsets: list[int]) -> None:
        await self._before_write()
        for offset in sorted(offsets):
            table = self.tables[offset]
            if self.pre_write is not None:
                await self.pre_write(offset, self.table_size)
            await self.file.pwritev(offset, memoryview(table))
            self.dirty.discard(offset)

    async def write(self) -> None:
        """Write every dirty table (after what this cache depends on); no file flush."""
        if self.dirty:
            await self._write_tables(list(self.dirty))

    async def flush(self) -> None:
        """Write every dirty table, then flush the file (``qcow2_cache_flush``)."""
        await self.write()
        await self.file.flush()

    def clear(self) -> None:
        """Drop every clean table (``cache-clean-interval``); dirty ones stay."""
        for offset in [o for o in self.tables if o not in self.dirty]:
            del self.tables[offset]
