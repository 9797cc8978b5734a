"""Allocation as an NBD export reports it: block status down the whole backing chain.

QEMU's server asks ``bdrv_block_status_above(bs, NULL)``: a region the top node does not
allocate is looked up in its backing node, and so on down the chain; the answer says whether
the data reads as zeroes and at which depth it is allocated. The graph's per-node
``block_status`` answers for one node only, so the walk down ``Node.backing`` is done here,
from public node attributes.
"""

from __future__ import annotations

from typing import NamedTuple

from blockgraph.drivers.base import BlockStatusFlags
from blockgraph.drivers.bitmap import DirtyBitmap
from blockgraph.export.nbd.protocol import (
    CONTEXT_DIRTY_BITMAP,
    MAX_BLOCK_STATUS_EXTENTS,
    STATE_DIRTY,
    STATE_HOLE,
    STATE_ZERO,
)
from blockgraph.graph.node import Node

# Plain ints, tested against int(flags): IntFlag's & runs in Python (three calls per test), and
# these tests run for every NBD read.
_ALLOCATED = int(BlockStatusFlags.DATA | BlockStatusFlags.ZERO | BlockStatusFlags.ALLOCATED)
_EOF = int(BlockStatusFlags.EOF)
_NOT_EOF = ~BlockStatusFlags.EOF
_EXTENT_MAX = 0xFFFFFFFF


class ChainStatus(NamedTuple):
    """``length`` bytes that share one status (immutable; a NamedTuple rather than a frozen
    dataclass, whose construction costs three times as much, once per NBD read).

    :param depth: 1 for the top node, 2 for its backing node, ...; 0 if no layer allocates them.
    """

    flags: BlockStatusFlags
    length: int
    depth: int

    @property
    def nbd_allocation(self) -> int:
        """The ``base:allocation`` flags: HOLE unless data, ZERO if it reads as zeroes."""
        return (0 if self.flags & BlockStatusFlags.DATA else STATE_HOLE) | (
            STATE_ZERO if self.flags & BlockStatusFlags.ZERO else 0
        )


def _without_eof(flags: BlockStatusFlags) -> BlockStatusFlags:
    return flags & _NOT_EOF if int(flags) & _EOF else flags


async def chain_status(top: Node, offset: int, length: int) -> ChainStatus:
    """The status of the bytes at ``offset`` seen through ``top``'s backing chain.

    ``length`` must be positive and the range inside ``top``.
    """
    status = await top.block_status(offset, length)
    if status.length == 0:
        return ChainStatus(BlockStatusFlags.ZERO, length, 0)
    flags = status.flags
    if int(flags) & _ALLOCATED:  # the common case (every read of allocated data), inline
        return ChainStatus(flags & _NOT_EOF if int(flags) & _EOF else flags, status.length, 1)
    length = status.length
    depth = 1
    node = top
    while True:
        if not node.driver.supports_backing:
            return ChainStatus(status.flags, length, 0)
        backing = node.backing
        if backing is None:
            # Unallocated with no backing file: reads as zeroes.
            return ChainStatus(BlockStatusFlags.ZERO, length, 0)
        node = backing
        depth += 1
        status = await node.block_status(offset, length)
        if status.length == 0:
            # The backing file is shorter: what lies past its end reads as zeroes, and counts
            # as allocated at its depth.
            return ChainStatus(BlockStatusFlags.ZERO | BlockStatusFlags.ALLOCATED, length, depth)
        if int(status.flags) & _ALLOCATED:
            return ChainStatus(_without_eof(status.flags), status.length, depth)
        length = status.length


async def extents(top: Node, offset: int, length: int, context: str, max_extents: int = MAX_BLOCK_STATUS_EXTENTS,
                  ) -> list[tuple[int, int]]:
    """The (length, flags) extents of one meta context over the range, merged as QEMU does.

    ``context`` is ``base:allocation`` or ``qemu:allocation-depth``. Adjacent extents with the
    same flags merge (while their length fits in 32 bits); at most ``max_extents`` are made.
    """
    out: list[tuple[int, int]] = []
    if context.startswith(CONTEXT_DIRTY_BITMAP):
        return bitmap_extents(top, context[len(CONTEXT_DIRTY_BITMAP):], offset, length, max_extents)
    depth_context = context == "qemu:allocation-depth"
    while length > 0:
        status = await chain_status(top, offset, length)
        n = min(status.length, length)
        flags = status.depth if depth_context else status.nbd_allocation
        if out and out[-1][1] == flags and out[-1][0] + n <= _EXTENT_MAX:
            out[-1] = (out[-1][0] + n, flags)
        elif len(out) >= max_extents:
            break
        else:
            out.append((n, flags))
        offset += n
        length -= n
    return out


def find_bitmap(top: Node, name: str) -> DirtyBitmap | None:
    """The bitmap ``name`` of ``top`` or of a node below it in its backing chain (as qemu-nbd
    ``-B`` looks it up)."""
    node: Node | None = top
    while node is not None:
        found = next((b for b in node.dirty_bitmaps if b.name == name), None)
        if found is not None:
            return found
        node = node.backing if node.driver.supports_backing else None
    return None


def bitmap_extents(top: Node, name: str, offset: int, length: int,
                   max_extents: int = MAX_BLOCK_STATUS_EXTENTS) -> list[tuple[int, int]]:
    """``qemu:dirty-bitmap:NAME`` extents: ``STATE_DIRTY`` where the bitmap is set, 0 elsewhere,
    inside the requested range (a bitmap that vanished reads as clean)."""
    bitmap = find_bitmap(top, name)
    if bitmap is None:
        return [(min(length, _EXTENT_MAX), 0)]
    out: list[tuple[int, int]] = []
    for _start, n, dirty in bitmap.runs(offset, length):
        flags = STATE_DIRTY if dirty else 0
        while n > 0:
            if out and out[-1][1] == flags and out[-1][0] + n <= _EXTENT_MAX:
                out[-1] = (out[-1][0] + n, flags)
                break
            if len(out) >= max_extents:
                return out
            piece = min(n, _EXTENT_MAX // 512 * 512)
            out.append((piece, flags))
            n -= piece
    covered = sum(n for n, _ in out)
    if covered < length and len(out) < max_extents and offset + covered < top.getlength():
        out.append((min(length - covered, _EXTENT_MAX), 0))
    return out
