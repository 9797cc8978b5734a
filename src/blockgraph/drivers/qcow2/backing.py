"""What qcow2 does when its relation to the backing file changes: ``make_empty`` (commit
empties the top image) and ``change_backing_file`` (rebase writes a new name in the header).

Functions here take the driver and its metadata lock themselves; the caller holds no lock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from blockgraph.drivers.qcow2.header import build_header_cluster
from blockgraph.errors import BlockError

if TYPE_CHECKING:
    from blockgraph.drivers.qcow2.driver import Qcow2Driver


async def make_empty(drv: Qcow2Driver) -> None:
    """Drop every cluster of the active L1 table, one L2 table at a time.

    The clusters are freed by the ordinary L2 update, which passes their discards down as
    QEMU's ``pass-discard-snapshot`` category (the one ``bdrv_make_empty`` uses).
    """
    async with drv._lock:
        drv._discard_type = "snapshot"
        try:
            for l1_index, l1_entry in enumerate(list(drv.l1_table)):
                if not l1_entry:
                    continue
                nb = drv.l2_size
                entries = [e for e, _ in await drv._l2_entries(l1_index, 0, nb)]
                if not any(entries):
                    continue
                l2_offset = await drv._get_l2_for_write(l1_index)
                await drv._update_entries(l2_offset, 0, entries, [0] * nb)
            await drv._write_caches()
        finally:
            drv._discard_type = "other"


async def change_backing_file(drv: Qcow2Driver, backing_file: str | None,
                              backing_format: str | None) -> None:
    """Rewrite the header cluster with a new backing file name and format.

    :raise BlockError: ``Operation not supported`` without a file child; the header's own
        message when the name does not fit in the header cluster (nothing is changed then).
    """
    if drv.file is None:
        raise BlockError("Operation not supported")
    # Under the metadata lock from the first look at the header to its write: a guest write
    # meanwhile could set the dirty bit or move the L1 table, and a header built before that
    # would undo it on disk.
    async with drv._lock:
        h = drv.header
        saved = (h.backing_file, h.backing_format, h.backing_file_offset, h.backing_file_size)
        h.backing_file = backing_file or None
        h.backing_format = backing_format if backing_file else None
        try:
            cluster = build_header_cluster(h)
        except BlockError:
            h.backing_file, h.backing_format, h.backing_file_offset, h.backing_file_size = saved
            raise
        # The header must not point at tables that are not on disk yet.
        await drv._write_caches()
        await drv.file.flush()
        await drv.file.pwritev(0, memoryview(cluster))
        await drv.file.flush()
