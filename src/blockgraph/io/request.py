"""The request layer every node shares (QEMU's ``block/io.c``).

Everything a request goes through between a parent and a driver lives here, once for all
drivers: bounds checks, padding to the driver's ``request_alignment`` with read-modify-write
for unaligned writes, serialisation of overlapping requests while such a read-modify-write is
in flight, FUA emulation by a flush, the flush walk with ``cache.no-flush``, zero-write
fallback, and per-node statistics.

Drivers see only aligned, in-bounds requests. Nothing here knows graph structure beyond
:meth:`IONode.io_children`, which the graph layer supplies.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blockgraph.drivers.base import (
    MAX_LENGTH,
    BlockDriver,
    BlockStatus,
    BlockStatusFlags,
    FileRange,
    NodeFlags,
    PreallocMode,
    RequestFlags,
)
from blockgraph.errors import IOFailure

if TYPE_CHECKING:
    from blockgraph.drivers.bitmap import DirtyBitmap

# Bounce buffers for zero writes that the driver cannot do natively are written in pieces of
# this size, so a huge write_zeroes does not allocate a huge buffer.
_ZERO_CHUNK = 1 << 20
# The most one copy-on-read step holds in memory.
_PREFETCH_CHUNK = 1024 * 1024

# Every RequestFlags value, indexed by its int. IntFlag's & and | run in Python (each builds
# its result through the enum's constructor), several times per request on the write path:
# the hot path computes on ints and maps the result back through this table.
_REQUEST_FLAGS: tuple[RequestFlags, ...] = tuple(
    RequestFlags(value) for value in range(sum(int(flag) for flag in RequestFlags) + 1))
_FUA = int(RequestFlags.FUA)



def with_fua(flags: RequestFlags) -> RequestFlags:
    """``flags | RequestFlags.FUA``, without IntFlag's arithmetic."""
    return _REQUEST_FLAGS[int(flags) | _FUA]


@dataclass
class NodeStats:
    """Counters of the requests that reached one node (and of flushes it passed to the disk)."""

    rd_operations: int = 0
    wr_operations: int = 0
    rd_bytes: int = 0
    wr_bytes: int = 0
    flush_operations: int = 0
    # Disk flushes this node's driver performed (``flush_to_disk``), the thing ``cache.no-flush``
    # suppresses; tests count these to prove writethrough really flushes.
    disk_flushes: int = 0
    discard_operations: int = 0
    zero_operations: int = 0


class _Tracked:
    """A request in flight on a node. Compared by identity (``list.remove`` must not call a
    field-by-field ``__eq__``); the event is made only when another request waits on it."""

    __slots__ = ("start", "end", "serialising", "done")

    def __init__(self, start: int, end: int, serialising: bool) -> None:
        self.start = start
        self.end = end
        self.serialising = serialising
        self.done: asyncio.Event | None = None


def _aligned_span(offset: int, length: int, align: int) -> tuple[int, int]:
    """The smallest ``align``-aligned ``[start, end)`` that holds ``[offset, offset+length)``."""
    return offset - offset % align, -(-(offset + length) // align) * align


def _overlaps(a_start: int, a_end: int, b_start: int, b_end: int) -> bool:
    return a_start < b_end and b_start < a_end


class IONode:
    """The request-layer half of a node; the graph's ``Node`` derives from it.

    :param driver: the opened driver instance.
    :param flags: the node's open flags (shared with the driver, updated by reopen).
    """

    def __init__(self, driver: BlockDriver, flags: NodeFlags) -> None:
        self.driver = driver
        self.flags = flags
        self.stats = NodeStats()
        self._in_flight: list[_Tracked] = []
        # How many of them serialise (read-modify-write): while none does, an aligned request
        # cannot be blocked and skips the overlap scan.
        self._serialising = 0
        # blkdebug listens to the request layer's events (QEMU's bdrv_debug_event); looked up
        # once so that other drivers pay nothing per request.
        self._debug_event: Callable[[str], Awaitable[None]] | None = getattr(driver, "debug_event", None)
        # The node's dirty bitmaps; a driver that persists bitmaps (qcow2) shares its list.
        shared = getattr(driver, "dirty_bitmaps", None)
        self.dirty_bitmaps: list[DirtyBitmap] = shared if isinstance(shared, list) else []
        # block-set-write-threshold: 0 = off; one-shot, checked before a write or discard.
        self.write_threshold = 0

    # -- graph hooks -----------------------------------------------------------------------

    def io_children(self) -> Iterable[IONode]:
        """Children a flush walks into after this node's own flush."""
        return ()

    def primary_io_child(self) -> IONode | None:
        """The child that holds this node's data or metadata (``file``, ``image``)."""
        return None

    # -- serialisation ----------------------------------------------------------------------

    async def _begin(self, start: int, end: int, serialising: bool) -> _Tracked:
        # A read-modify-write must not interleave with another request on the same aligned
        # blocks, or one of them would write back stale data.
        if serialising or self._serialising:
            await self._wait_overlapping(start, end, serialising)
        return self._track(start, end, serialising)

    async def _wait_overlapping(self, start: int, end: int, serialising: bool) -> None:
        while True:
            blocker = next(
                (
                    t
                    for t in self._in_flight
                    if (t.serialising or serialising) and _overlaps(t.start, t.end, start, end)
                ),
                None,
            )
            if blocker is None:
                return
            if blocker.done is None:
                blocker.done = asyncio.Event()
            await blocker.done.wait()

    def _track(self, start: int, end: int, serialising: bool) -> _Tracked:
        tracked = _Tracked(start, end, serialising)
        self._in_flight.append(tracked)
        if serialising:
            self._serialising += 1
        return tracked

    @property
    def busy(self) -> bool:
        """Whether a request is in flight on this node."""
        return bool(self._in_flight)

    async def drain(self) -> None:
        """Wait until the requests in flight on this node have finished (QEMU's drain, without
        holding new ones back: the caller checks :attr:`busy` after its own awaits)."""
        while self._in_flight:
            tracked = self._in_flight[0]
            if tracked.done is None:
                tracked.done = asyncio.Event()
            await tracked.done.wait()

    def _end(self, tracked: _Tracked) -> None:
        self._in_flight.remove(tracked)
        if tracked.serialising:
            self._serialising -= 1
        if tracked.done is not None:
            tracked.done.set()

    # -- checks -----------------------------------------------------------------------------

    def getlength(self) -> int:
        # QEMU measures every node in whole 512-byte sectors: a 1000-byte file is 1024 bytes
        # long to its users, the tail reading as zeroes.
        return -(-self.driver.getlength() // 512) * 512

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise IOFailure(errno.EINVAL)
        if not self.driver.growable and offset + length > self.getlength():
            raise IOFailure(errno.EIO)

    def _check_writable(self) -> None:
        if self.flags.read_only:
            raise IOFailure(errno.EPERM)

    # -- reads ------------------------------------------------------------------------------

    async def preadv(self, offset: int, buf: memoryview, flags: RequestFlags = RequestFlags.NONE,
                     in_range: bool = False) -> None:
        """Read ``len(buf)`` bytes at ``offset`` into ``buf``.

        :param in_range: the caller (a BlockBackend, on its root) checked already that the
            range lies inside this node: the same check is not made again.
        """
        # The checks of _check_range, inline: this runs at every node of every read.
        length = len(buf)
        driver = self.driver
        if not in_range:
            if offset < 0 or length < 0:
                raise IOFailure(errno.EINVAL)
            if not driver.growable and offset + length > self.getlength():
                raise IOFailure(errno.EIO)
        stats = self.stats
        stats.rd_operations += 1
        stats.rd_bytes += length
        if length == 0:
            return
        align = driver.request_alignment
        head = offset % align
        end = offset + length
        tail = -end % align
        if head == 0 and tail == 0:
            await driver.preadv(offset, buf, flags)
            return
        start = offset - head
        bounce = bytearray(head + length + tail)
        tracked = await self._begin(start, end + tail, serialising=False)
        try:
            await self.driver.preadv(start, memoryview(bounce), flags)
        finally:
            self._end(tracked)
        buf[:] = memoryview(bounce)[head : head + length]

    def map_read(self, offset: int, length: int, in_range: bool = False) -> FileRange | None:
        """Where the file holds ``[offset, offset + length)``, for a read whose caller copies
        it in the kernel (see :meth:`BlockDriver.map_read`); None: read it with
        :meth:`preadv`. A mapped range counts as a read of this node.

        As an aligned read does, it goes straight to the driver; one that needs padding to
        the driver's alignment is not mapped.
        """
        if length <= 0:
            return None
        driver = self.driver
        if not in_range and (offset < 0 or offset + length > self.getlength()):
            return None
        align = driver.request_alignment
        if offset % align or length % align:
            return None
        mapped = driver.map_read(offset, length)
        if mapped is not None:
            stats = self.stats
            stats.rd_operations += 1
            stats.rd_bytes += length
        return mapped

    # -- writes -----------------------------------------------------------------------------

    async def pwritev(self, offset: int, buf: memoryview, flags: RequestFlags = RequestFlags.NONE,
                      in_range: bool = False) -> None:
        """Write ``buf`` at ``offset``; with FUA the data is stable when this returns.

        :param in_range: as for :meth:`preadv`.
        """
        # The checks of _check_writable and _check_range, inline (as in preadv).
        if self.flags.read_only:
            raise IOFailure(errno.EPERM)
        length = len(buf)
        driver = self.driver
        if not in_range:
            if offset < 0 or length < 0:
                raise IOFailure(errno.EINVAL)
            if not driver.growable and offset + length > self.getlength():
                raise IOFailure(errno.EIO)
        stats = self.stats
        stats.wr_operations += 1
        stats.wr_bytes += length
        align = driver.request_alignment
        head = offset % align
        end = offset + length
        tail = -end % align
        if self.write_threshold and end + tail > self.write_threshold:
            self.write_threshold_exceeded(end + tail)
        bits = int(flags)  # see _REQUEST_FLAGS
        native = _REQUEST_FLAGS[bits & int(driver.supported_write_flags)] if bits else flags
        if self._debug_event is not None:
            await self._debug_event("pwritev")
        if length:
            if head == 0 and tail == 0:
                # Aligned: only waits when a read-modify-write is in flight (see _begin).
                if self._serialising:
                    await self._wait_overlapping(offset, end, False)
                # _track and _end, inline (not serialising).
                tracked = _Tracked(offset, end, False)
                in_flight = self._in_flight
                in_flight.append(tracked)
                try:
                    await driver.pwritev(offset, buf, native)
                finally:
                    in_flight.remove(tracked)
                    if tracked.done is not None:
                        tracked.done.set()
            else:
                await self._pwritev_unaligned(offset, buf, head, tail, native)
            if self.dirty_bitmaps:
                self._mark_dirty(offset, length)
        if self._debug_event is not None:
            await self._debug_event("pwritev_done")
        if bits & _FUA and not int(driver.supported_write_flags) & _FUA:
            await self.flush()  # FUA emulated (see _emulate_fua)

    async def _pwritev_unaligned(
        self, offset: int, buf: memoryview, head: int, tail: int, flags: RequestFlags
    ) -> None:
        start = offset - head
        end = offset + len(buf) + tail
        tracked = await self._begin(start, end, serialising=True)
        try:
            align = self.driver.request_alignment
            bounce = bytearray(end - start)
            view = memoryview(bounce)
            if head:
                await self.driver.preadv(start, view[:align], RequestFlags.NONE)
            if tail and (not head or end - start > align):
                await self.driver.preadv(end - align, view[-align:], RequestFlags.NONE)
            view[head : head + len(buf)] = buf
            await self.driver.pwritev(start, view, flags)
        finally:
            self._end(tracked)

    def write_threshold_exceeded(self, end: int) -> None:
        """A write or discard up to ``end`` passed the threshold: disarm it (one-shot).

        The graph's node overrides this to emit ``BLOCK_WRITE_THRESHOLD``.
        """
        self.write_threshold = 0

    def _mark_dirty(self, offset: int, length: int) -> None:
        # After a write that reached the driver (QEMU's bdrv_co_write_req_finish).
        for bitmap in self.dirty_bitmaps:
            bitmap.mark(offset, length)

    async def _emulate_fua(self, flags: RequestFlags) -> None:
        # A driver without native FUA gets the same guarantee from a flush after the write.
        if int(flags) & _FUA and not int(self.driver.supported_write_flags) & _FUA:
            await self.flush()

    async def prefetch(self, offset: int, length: int) -> None:
        """Copy on read (NBD_CMD_CACHE; QEMU's ``BDRV_REQ_COPY_ON_READ | BDRV_REQ_PREFETCH``).

        Every cluster of ``[offset, offset + length)`` this node has not allocated is read
        through its backing chain and written into it, so later reads stop going down the
        chain; a cluster that reads as zeroes is written as zeroes. Each step serialises over
        its whole clusters, as QEMU's copy-on-read requests do: a guest write landing between
        the copy's read and its write-back would otherwise be overwritten with the old data.

        :raise IOFailure: a failed read or write; EPERM when a copy is needed on a read-only
            node (nothing is needed when the node holds the whole range).
        """
        size_info = self.driver.info().extra.get("cluster-size")
        cluster = int(str(size_info)) if size_info else 512
        pos = offset - offset % cluster
        end = min(self.getlength(), -(-(offset + length) // cluster) * cluster)
        chunk = max(cluster, _PREFETCH_CHUNK - _PREFETCH_CHUNK % cluster)
        while pos < end:
            step_end = min(end, pos + chunk)
            tracked = await self._begin(pos, step_end, serialising=True)
            try:
                status = await self.block_status(pos, step_end - pos)
                step = status.length
                if step <= 0:
                    return
                if not status.flags & BlockStatusFlags.ALLOCATED:
                    self._check_writable()
                    data = bytearray(step)
                    view = memoryview(data)
                    # Straight to the driver: this request already holds the range.
                    await self.driver.preadv(pos, view, RequestFlags.NONE)
                    if data.count(0) == step:
                        await self.driver.pwrite_zeroes(pos, step, RequestFlags.NONE)
                    else:
                        await self.driver.pwritev(pos, view, RequestFlags.NONE)
                    if self.dirty_bitmaps:
                        self._mark_dirty(pos, step)
            finally:
                self._end(tracked)
            pos += step

    async def pwrite_zeroes(self, offset: int, length: int, flags: RequestFlags = RequestFlags.NONE) -> None:
        """Make ``length`` bytes at ``offset`` read as zeroes (unmapping them if MAY_UNMAP)."""
        self._check_writable()
        self._check_range(offset, length)
        self.stats.zero_operations += 1
        if not length:
            return
        if not self.flags.discard_unmap:
            flags &= ~RequestFlags.MAY_UNMAP
        if self.write_threshold and offset + length > self.write_threshold:
            self.write_threshold_exceeded(offset + length)
        if self._debug_event is not None:
            await self._debug_event("pwritev_zero")
        align = self.driver.request_alignment
        if offset % align == 0 and length % align == 0:
            tracked = await self._begin(offset, offset + length, serialising=False)
            try:
                native = flags & ~RequestFlags.FUA | flags & self.driver.supported_write_flags
                await self.driver.pwrite_zeroes(offset, length, native)
                self._mark_dirty(offset, length)
                await self._emulate_fua(flags)
                return
            except IOFailure as exc:
                if exc.errno != errno.ENOTSUP or flags & RequestFlags.NO_FALLBACK:
                    raise
            finally:
                self._end(tracked)
        elif flags & RequestFlags.NO_FALLBACK:
            raise IOFailure(errno.ENOTSUP)
        zeroes = memoryview(bytes(min(length, _ZERO_CHUNK)))
        pos = offset
        while pos < offset + length:
            n = min(len(zeroes), offset + length - pos)
            await self.pwritev(pos, zeroes[:n], flags & ~RequestFlags.FUA)
            pos += n
        await self._emulate_fua(flags)

    async def pdiscard(self, offset: int, length: int) -> None:
        """Discard is advisory: with ``discard=ignore`` (the default) nothing reaches the driver."""
        self._check_writable()
        self._check_range(offset, length)
        self.stats.discard_operations += 1
        if not self.flags.discard_unmap or not length:
            return
        if self.write_threshold and offset + length > self.write_threshold:
            self.write_threshold_exceeded(offset + length)
        align = self.driver.request_alignment
        start = -(-offset // align) * align
        end = (offset + length) // align * align
        if end > start:
            await self.driver.pdiscard(start, end - start)
            self._mark_dirty(start, end - start)

    async def truncate(self, length: int, prealloc: PreallocMode = "off") -> None:
        """Resize the node (QEMU's ``bdrv_co_truncate``); ``prealloc`` applies to growing."""
        self._check_writable()
        await self.driver.truncate(length, prealloc)
        for bitmap in self.dirty_bitmaps:
            bitmap.resize(self.getlength())

    # -- flush ------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Flush this node, then its children.

        ``cache.no-flush`` is not an early return: the driver still pushes its caches to the
        OS (qcow2 writes its metadata), only this node's disk flush is skipped, and the walk
        goes on to the children, which decide for themselves.
        """
        if self.flags.read_only:
            return
        self.stats.flush_operations += 1
        # The primary child's blkdebug events, fired without a helper coroutine: a
        # writethrough export flushes after every write.
        child = self.primary_io_child()
        if child is not None and child._debug_event is not None:
            await child._debug_event("flush_to_os")
        await self.driver.flush_to_os()
        if not self.flags.no_flush:
            self.stats.disk_flushes += 1
            child = self.primary_io_child()
            if child is not None and child._debug_event is not None:
                await child._debug_event("flush_to_disk")
            await self.driver.flush_to_disk()
        for node in self.io_children():
            await node.flush()

    # -- VM state ---------------------------------------------------------------------------
    #
    # The VM state area is a second address space next to the guest disk (QEMU's
    # bdrv_co_readv_vmstate / bdrv_co_writev_vmstate). It is not guest data: no bounds of the
    # disk, no statistics, no dirty bitmaps, no write threshold. A node whose driver keeps no
    # such area passes the request to its primary child, so filters and raw over qcow2 reach
    # qcow2's; at the bottom of the chain it fails with ENOTSUP.

    def _vmstate_node(self, offset: int, length: int) -> IONode:
        if offset < 0 or length < 0 or offset > MAX_LENGTH or length > MAX_LENGTH - offset:
            raise IOFailure(errno.EIO)
        node: IONode | None = self
        while node is not None and not node.driver.has_vmstate:
            node = node.primary_io_child()
        if node is None:
            raise IOFailure(errno.ENOTSUP)
        return node

    async def load_vmstate(self, offset: int, buf: memoryview) -> None:
        """Read ``len(buf)`` bytes at ``offset`` of the VM state area into ``buf``."""
        node = self._vmstate_node(offset, len(buf))
        if not len(buf):
            return
        start, end = _aligned_span(offset, len(buf), node.driver.request_alignment)
        if start == offset and end == offset + len(buf):
            await node.driver.load_vmstate(offset, buf)
            return
        bounce = bytearray(end - start)
        await node.driver.load_vmstate(start, memoryview(bounce))
        buf[:] = memoryview(bounce)[offset - start : offset - start + len(buf)]

    async def save_vmstate(self, offset: int, buf: memoryview) -> None:
        """Write ``buf`` at ``offset`` of the VM state area."""
        node = self._vmstate_node(offset, len(buf))
        node._check_writable()
        if not len(buf):
            return
        start, end = _aligned_span(offset, len(buf), node.driver.request_alignment)
        if start == offset and end == offset + len(buf):
            await node.driver.save_vmstate(offset, buf)
            return
        # Unaligned: read-modify-write of the aligned blocks around it. VM state is saved by
        # one writer in sequence (savevm), so nothing else can interleave here.
        bounce = bytearray(end - start)
        view = memoryview(bounce)
        await node.driver.load_vmstate(start, view)
        view[offset - start : offset - start + len(buf)] = buf
        await node.driver.save_vmstate(start, view)

    # -- status -----------------------------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        size = self.getlength()
        if offset >= size:
            return BlockStatus(BlockStatusFlags.EOF, 0)
        length = min(length, size - offset)
        return await self.driver.block_status(offset, length)
