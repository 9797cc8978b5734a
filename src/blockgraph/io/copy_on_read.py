"""Copy on read: what a prefetch (NBD_CMD_CACHE) does to a node with a backing chain.

QEMU serves NBD_CMD_CACHE as a read with ``BDRV_REQ_COPY_ON_READ | BDRV_REQ_PREFETCH``: every
cluster the node itself has not allocated is read through the chain and written into the node,
so later reads no longer go down the chain. The range is widened to whole clusters; a cluster
that reads as zeroes is written as zeroes (a zero cluster in qcow2), and nothing goes back to
the caller. A read-only node cannot take the copy: the request fails with EPERM, as in QEMU,
unless the node already holds the whole range.
"""

from __future__ import annotations

import errno

from blockgraph.drivers.base import BlockStatusFlags
from blockgraph.errors import IOFailure
from blockgraph.io.request import IONode

# The most one copy step holds in memory.
_MAX_CHUNK = 1024 * 1024


def _cluster_size(node: IONode) -> int:
    size = node.driver.info().extra.get("cluster-size")
    return int(str(size)) if size else 512


async def prefetch(node: IONode, offset: int, length: int) -> None:
    """Copy what ``node`` does not hold of ``[offset, offset + length)`` into it.

    :raise IOFailure: a failed read or write; EPERM when a copy is needed on a read-only node.
    """
    cluster = _cluster_size(node)
    size = node.getlength()
    pos = offset - offset % cluster
    end = min(size, -(-(offset + length) // cluster) * cluster)
    chunk_limit = max(cluster, _MAX_CHUNK - _MAX_CHUNK % cluster)
    while pos < end:
        status = await node.block_status(pos, min(end - pos, chunk_limit))
        if status.length <= 0:
            break
        step = status.length
        if not status.flags & BlockStatusFlags.ALLOCATED:
            if node.flags.read_only:
                raise IOFailure(errno.EPERM)
            data = bytearray(step)
            view = memoryview(data)
            await node.preadv(pos, view)
            if data.count(0) == step:
                await node.pwrite_zeroes(pos, step)
            else:
                await node.pwritev(pos, view)
        pos += step
