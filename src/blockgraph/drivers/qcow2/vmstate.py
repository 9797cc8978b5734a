"""qcow2's VM state area: where ``savevm`` (and qemu-io's ``read -b`` / ``write -b``) keep it.

QEMU stores the VM state in the image's own guest address space, past the virtual disk: it
starts at the first L1 entry that the disk does not use (``l1_vm_state_index``), so it is
mapped by ordinary L2 tables and data clusters, and an internal snapshot taken afterwards
copies it along with the L1 table. Reads and writes are ordinary guest reads and writes at
that offset; a write first grows the L1 table far enough (by half its size at a time, as QEMU
grows it for anything but a resize), which is why a 1 MiB image has two L1 entries after its
first ``write -b``.

Functions here take the driver's metadata lock themselves; the caller holds no lock.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from blockgraph.drivers.base import MAX_LENGTH, RequestFlags
from blockgraph.drivers.qcow2.header import MAX_L1_SIZE
from blockgraph.drivers.qcow2.resize import grow_l1_table, l1_size_for
from blockgraph.drivers.qcow2.tables import L1E_SIZE
from blockgraph.errors import EIO, IOFailure

if TYPE_CHECKING:
    from blockgraph.drivers.qcow2.driver import Qcow2Driver


def vm_state_offset(drv: Qcow2Driver) -> int:
    """Guest offset of the VM state area: the first L1 entry past the virtual disk."""
    return l1_size_for(drv, drv.header.size) << (drv.cluster_bits + drv.l2_bits)


def _guest_range(drv: Qcow2Driver, pos: int, length: int) -> int:
    offset = vm_state_offset(drv) + pos
    if offset + length > MAX_LENGTH:
        raise IOFailure(EIO)
    return offset


async def load_vmstate(drv: Qcow2Driver, pos: int, buf: memoryview) -> None:
    """Read VM state; what was never written reads as zeroes (or as the backing file there)."""
    await drv.preadv(_guest_range(drv, pos, len(buf)), buf, RequestFlags.NONE)


async def save_vmstate(drv: Qcow2Driver, pos: int, buf: memoryview) -> None:
    """Write VM state, growing the L1 table first if it does not reach that far.

    :raise IOFailure: ``EFBIG`` when the L1 table would exceed qcow2's limit.
    """
    offset = _guest_range(drv, pos, len(buf))
    if not len(buf):
        return
    need = ((offset + len(buf) - 1) >> (drv.cluster_bits + drv.l2_bits)) + 1
    async with drv._lock:
        size = drv.header.l1_size
        if need > size:
            size = max(size, 1)
            while size < need:
                size = -(-size * 3 // 2)
            if size * L1E_SIZE > MAX_L1_SIZE:
                raise IOFailure(errno.EFBIG)
            await grow_l1_table(drv, size)
    await drv.pwritev(offset, buf, RequestFlags.NONE)
