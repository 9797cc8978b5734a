"""Internal snapshots (``specs/qcow2-format.md`` §8): the snapshot table, create, apply, delete.

Snapshot table entry (big-endian, padded to a multiple of 8)::

     0  l1_table_offset (u64)     8  l1_size (u32)        12  id_str_size (u16)
    14  name_size (u16)          16  date_sec (u32)      20  date_nsec (u32)
    24  vm_clock_nsec (u64)      32  vm_state_size (u32) 36  extra_data_size (u32)
    40  extra data: vm_state_size_large (u64), disk_size (u64), icount (u64), unknown...
    ..  id string, name (no NUL), padding

Rules of this module (crash safety, §10 rule 7): a snapshot L1 copy and every refcount it adds
reach the disk before the snapshot table that names it; a new table is written to new clusters
and flushed, then ``nb_snapshots`` + ``snapshots_offset`` (12 bytes at 60) switch in one
write + sync, and only then is the old table freed. Refcounts are raised before any L1 table
points at what they count, and lowered only after the L1 table stopped pointing there.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blockgraph.drivers.qcow2.tables import (
    L1E_OFFSET_MASK,
    L1E_SIZE,
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    ClusterType,
    cluster_type,
)
from blockgraph.errors import ENOTSUP, BlockError, IOFailure

if TYPE_CHECKING:
    from blockgraph.drivers.qcow2.driver import Qcow2Driver

HEADER_OFFSET_SNAPSHOTS = 60  # nb_snapshots (u32) + snapshots_offset (u64)
QCOW_MAX_SNAPSHOTS = 65536
SNAPSHOT_EXTRA_DATA_SIZE = 24  # what QEMU writes: vm_state_size_large, disk_size, icount
_ENTRY_FMT = ">QIHHIIQII"
_ENTRY_SIZE = struct.calcsize(_ENTRY_FMT)  # 40


@dataclass
class Snapshot:
    """One snapshot table entry."""

    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    disk_size: int = 0
    icount: int = -1
    unknown_extra_data: bytes = b""


def parse_snapshot_table(buf: bytes, nb_snapshots: int,
                         disk_size: int) -> tuple[list[Snapshot], int]:
    """Decode ``nb_snapshots`` entries from ``buf``; also return the table's size in bytes.

    :raise BlockError: when an entry runs past the buffer.
    """
    out: list[Snapshot] = []
    pos = 0
    for _ in range(nb_snapshots):
        if pos + _ENTRY_SIZE > len(buf):
            raise BlockError("Snapshot table is truncated")
        (l1_offset, l1_size, id_size, name_size, date_sec, date_nsec, vm_clock, vm_state32,
         extra_size) = struct.unpack_from(_ENTRY_FMT, buf, pos)
        pos += _ENTRY_SIZE
        extra = bytes(buf[pos : pos + extra_size])
        pos += extra_size
        sn = Snapshot(l1_offset, l1_size, "", "", date_sec, date_nsec, vm_clock, vm_state32,
                      disk_size)
        if len(extra) >= 8:
            sn.vm_state_size = struct.unpack_from(">Q", extra, 0)[0]
        if len(extra) >= 16:
            sn.disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if len(extra) >= 24:
            icount = struct.unpack_from(">Q", extra, 16)[0]
            sn.icount = -1 if icount == (1 << 64) - 1 else icount
        sn.unknown_extra_data = extra[SNAPSHOT_EXTRA_DATA_SIZE:]
        if pos + id_size + name_size > len(buf):
            raise BlockError("Snapshot table is truncated")
        sn.id_str = buf[pos : pos + id_size].decode("utf-8", "surrogateescape")
        pos += id_size
        sn.name = buf[pos : pos + name_size].decode("utf-8", "surrogateescape")
        pos += name_size
        pos = (pos + 7) & ~7
        out.append(sn)
    return out, pos


def build_snapshot_table(snapshots: list[Snapshot]) -> bytes:
    parts: list[bytes] = []
    for sn in snapshots:
        id_b = sn.id_str.encode("utf-8", "surrogateescape")
        name_b = sn.name.encode("utf-8", "surrogateescape")
        extra = struct.pack(">QQQ", sn.vm_state_size, sn.disk_size,
                            sn.icount & ((1 << 64) - 1)) + sn.unknown_extra_data
        vm_state32 = sn.vm_state_size if sn.vm_state_size < (1 << 32) else 0
        entry = struct.pack(_ENTRY_FMT, sn.l1_table_offset, sn.l1_size, len(id_b), len(name_b),
                            sn.date_sec, sn.date_nsec, sn.vm_clock_nsec, vm_state32,
                            len(extra)) + extra + id_b + name_b
        parts.append(entry + bytes(-len(entry) % 8))
    return b"".join(parts)


async def read_snapshots(drv: Qcow2Driver) -> tuple[list[Snapshot], int]:
    """The snapshot table of the image and its size in bytes."""
    h = drv.header
    if not h.nb_snapshots:
        return [], 0
    if h.snapshots_offset % drv.cluster_size:
        raise BlockError("Snapshot table offset invalid")
    if h.nb_snapshots > QCOW_MAX_SNAPSHOTS:
        raise BlockError("Too many snapshots")
    # Entries are variable-sized: read in steps until every one is complete.
    size = max(drv.cluster_size, 1024)
    while True:
        buf = bytearray(size)
        await drv._file.preadv(h.snapshots_offset, memoryview(buf))
        try:
            return parse_snapshot_table(bytes(buf), h.nb_snapshots, h.size)
        except BlockError:
            if size >= 64 * 1024 * 1024 or h.snapshots_offset + size > drv._file.getlength():
                raise
            size *= 2


def find_snapshot(drv: Qcow2Driver, id_str: str | None, name: str | None) -> int:
    """Index of the first snapshot matching both given keys, or -1."""
    for i, sn in enumerate(drv.snapshots):
        if (id_str is None or sn.id_str == id_str) and (name is None or sn.name == name):
            return i
    return -1


def find_snapshot_by_id_or_name(drv: Qcow2Driver, id_or_name: str) -> int:
    index = find_snapshot(drv, id_or_name, None)
    return index if index >= 0 else find_snapshot(drv, None, id_or_name)


async def _write_snapshots(drv: Qcow2Driver) -> None:
    """Write the in-memory snapshot list as a new table and switch the header to it."""
    h = drv.header
    table = build_snapshot_table(drv.snapshots)
    new_offset = 0
    if drv.snapshots:
        new_offset = await drv.refcounts.alloc_clusters(len(table))
        await drv._file.pwritev(new_offset, memoryview(table))
    # The table, its refcounts and the L1 copies it names are stable before the header.
    await drv._write_caches()
    await drv._file.flush()
    old_offset, old_nb, old_size = h.snapshots_offset, h.nb_snapshots, drv.snapshots_size
    await drv._file.pwritev(HEADER_OFFSET_SNAPSHOTS, memoryview(
        struct.pack(">IQ", len(drv.snapshots), new_offset)))
    await drv._file.flush()
    h.nb_snapshots = len(drv.snapshots)
    h.snapshots_offset = new_offset
    drv.snapshots_size = len(table)
    if old_nb and old_offset:
        await drv.refcounts.free_clusters(old_offset, max(old_size, 1))


async def update_snapshot_refcount(drv: Qcow2Driver, l1: list[int], addend: int) -> list[int]:
    """Add ``addend`` to every L2 table and data cluster reached from ``l1``; fix COPIED bits.

    Returns ``l1`` with bit 63 recomputed. L2 entries have theirs recomputed in place (harmless
    in tables that only snapshots reach: the bit means nothing there).
    """
    cs = drv.cluster_size
    rc = drv.refcounts
    ext = drv.extended_l2
    step = 2 if ext else 1
    out = list(l1)
    done: list[tuple[int, int]] = []
    try:
        for i, l1_entry in enumerate(l1):
            l2_offset = l1_entry & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            table = await drv.l2_cache.get(l2_offset)
            words = list(struct.unpack_from(f">{drv.l2_size * step}Q", table))
            changed = False
            for j in range(0, len(words), step):
                entry = words[j]
                new = entry & ~QCOW_OFLAG_COPIED
                ctype = cluster_type(new & ~QCOW_OFLAG_ZERO if ext else new)
                if ctype is ClusterType.COMPRESSED:
                    if addend:
                        coffset, csize = drv._compressed_range(new)
                        await rc.update_refcount(coffset, csize, addend)
                        if addend > 0:
                            done.append((coffset, csize))
                    refcount = 2  # compressed clusters are never written in place
                elif ctype in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
                    offset = new & L2E_OFFSET_MASK
                    if offset % cs:
                        raise IOFailure(5, "qcow2: data cluster offset is not cluster aligned")
                    if addend:
                        await rc.update_refcount(offset, cs, addend)
                        if addend > 0:
                            done.append((offset, cs))
                    refcount = await rc.get_refcount(offset >> drv.cluster_bits)
                else:
                    refcount = 0
                if refcount == 1:
                    new |= QCOW_OFLAG_COPIED
                if new != entry:
                    words[j] = new
                    changed = True
            if changed:
                if addend > 0:
                    await drv._l2_depends_on_refcounts()
                table = await drv.l2_cache.get(l2_offset)
                struct.pack_into(f">{len(words)}Q", table, 0, *words)
                drv.l2_cache.mark_dirty(l2_offset)
            if addend:
                await rc.update_refcount(l2_offset, cs, addend)
                if addend > 0:
                    done.append((l2_offset, cs))
            refcount = await rc.get_refcount(l2_offset >> drv.cluster_bits)
            out[i] = l2_offset | (QCOW_OFLAG_COPIED if refcount == 1 else 0)
    except BaseException:
        for offset, length in reversed(done):
            await rc.update_refcount(offset, length, -addend)
        if addend > 0 and done:
            # The tables done so far had OFLAG_COPIED cleared for the raised refcounts, which
            # are now back to 1 where they were: set it again, or qemu-img check reports
            # corruption and writes COW clusters that are not shared. The lowered refcounts
            # reach the disk before the flags (the same ordering as for a raise).
            await drv._l2_depends_on_refcounts()
            await update_snapshot_refcount(drv, l1, 0)
        raise
    return out


async def _write_active_l1(drv: Qcow2Driver) -> None:
    """Rewrite the whole active L1 table (write + sync), after the tables it points at."""
    await drv._write_caches()
    await drv._file.flush()
    h = drv.header
    await drv._file.pwritev(h.l1_table_offset, memoryview(
        struct.pack(f">{h.l1_size}Q", *drv.l1_table)))
    await drv._file.flush()


async def _read_l1(drv: Qcow2Driver, offset: int, size: int) -> list[int]:
    raw = bytearray(size * L1E_SIZE)
    await drv._file.preadv(offset, memoryview(raw))
    return list(struct.unpack(f">{size}Q", raw))


async def snapshot_create(drv: Qcow2Driver, name: str, *, id_str: str | None = None,
                          date: float | None = None, vm_clock_nsec: int = 0,
                          vm_state_size: int = 0, icount: int = 0) -> Snapshot:
    """Take an internal snapshot of the active state (``qcow2_snapshot_create``).

    :raise BlockError: for a duplicate id or too many snapshots.
    """
    if drv.external_data:
        # Snapshots would share data clusters, which a data file cannot refcount.
        raise IOFailure(ENOTSUP)
    if date is None:
        date = time.time()
    async with drv._lock:
        if len(drv.snapshots) >= QCOW_MAX_SNAPSHOTS:
            raise BlockError("Too many snapshots")
        if not id_str:
            top = 0
            for sn in drv.snapshots:
                try:
                    top = max(top, int(sn.id_str))
                except ValueError:
                    pass
            id_str = str(top + 1)
        elif find_snapshot(drv, id_str, None) >= 0:
            raise BlockError("File exists")
        h = drv.header
        l1 = list(drv.l1_table)
        l1_bytes = max(h.l1_size, 1) * L1E_SIZE
        sn_l1_offset = await drv.refcounts.alloc_clusters(l1_bytes)
        try:
            if h.l1_size:
                await drv._file.pwritev(sn_l1_offset,
                                        memoryview(struct.pack(f">{h.l1_size}Q", *l1)))
            # Every cluster the active L1 reaches is now shared with the snapshot. This fails
            # (EINVAL, as in QEMU) when a refcount would overflow, typically a host cluster
            # holding many compressed clusters with small refcount_bits; the raises done so
            # far are undone by update_snapshot_refcount.
            drv.l1_table = await update_snapshot_refcount(drv, l1, 1)
            if drv.l1_table != l1:
                await _write_active_l1(drv)
        except BaseException:
            # Nothing on disk names the L1 copy yet (the snapshot table comes later): QEMU
            # leaks it here, we give it back.
            await drv.refcounts.free_clusters(sn_l1_offset, l1_bytes)
            raise
        sec = int(date)
        sn = Snapshot(sn_l1_offset, h.l1_size, id_str, name, sec, int((date - sec) * 1e9),
                      vm_clock_nsec, vm_state_size, h.size, icount)
        drv.snapshots.append(sn)
        try:
            await _write_snapshots(drv)
        except BaseException:
            drv.snapshots.pop()
            raise
        return sn


async def snapshot_goto(drv: Qcow2Driver, id_or_name: str) -> None:
    """Revert the active state to a snapshot (``qcow2_snapshot_goto``).

    :raise BlockError: ``Failed to load snapshot: No such file or directory`` when unknown
        (qemu-img's text for ``snapshot -a``).
    """
    index = find_snapshot_by_id_or_name(drv, id_or_name)
    if index < 0:
        raise BlockError("Failed to load snapshot: No such file or directory")
    sn = drv.snapshots[index]
    if sn.disk_size != drv.header.size:
        from blockgraph.drivers.qcow2.resize import truncate

        try:
            await truncate(drv, sn.disk_size)
        except BlockError as exc:
            drv.log.error("%s", exc)
            raise BlockError("Failed to load snapshot: Operation not supported") from exc
    async with drv._lock:
        from blockgraph.drivers.qcow2.resize import grow_l1_table

        await grow_l1_table(drv, sn.l1_size)
        h = drv.header
        new_l1 = await _read_l1(drv, sn.l1_table_offset, sn.l1_size)
        new_l1 += [0] * (h.l1_size - len(new_l1))
        # Raise what the snapshot reaches before the active L1 points there.
        await update_snapshot_refcount(drv, new_l1, 1)
        old_l1 = drv.l1_table
        drv.l1_table = [e & ~QCOW_OFLAG_COPIED for e in new_l1]
        await _write_active_l1(drv)
        await update_snapshot_refcount(drv, old_l1, -1)
        drv.l1_table = await update_snapshot_refcount(drv, drv.l1_table, 0)
        await _write_active_l1(drv)


async def snapshot_delete(drv: Qcow2Driver, id_str: str | None, name: str | None) -> None:
    """Delete the first snapshot matching ``id_str`` and ``name`` (``qcow2_snapshot_delete``).

    :raise BlockError: ``snapshot not found``.
    """
    async with drv._lock:
        index = find_snapshot(drv, id_str, name)
        if index < 0:
            raise BlockError("snapshot not found")
        sn = drv.snapshots.pop(index)
        try:
            await _write_snapshots(drv)
        except BaseException:
            drv.snapshots.insert(index, sn)
            raise
        # From here on a failure only leaks clusters.
        sn_l1 = await _read_l1(drv, sn.l1_table_offset, sn.l1_size)
        await update_snapshot_refcount(drv, sn_l1, -1)
        await drv.refcounts.free_clusters(sn.l1_table_offset, max(sn.l1_size, 1) * L1E_SIZE)
        new_l1 = await update_snapshot_refcount(drv, drv.l1_table, 0)
        if new_l1 != drv.l1_table:
            drv.l1_table = new_l1
            await _write_active_l1(drv)
        await drv._write_caches()
