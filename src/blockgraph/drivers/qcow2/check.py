"""``qemu-img check`` for qcow2: rebuild the refcounts from the metadata and compare.

Rules of this module (``specs/qcow2-format.md`` §3, §10, §13):

* The references are counted into one in-memory array of integers, one per host cluster
  (QEMU's "in-memory refcount table"): the header cluster, the active L1 and every L2 table
  and data cluster it reaches (compressed data: every host cluster its sector span touches),
  each snapshot's L1 walk, the snapshot table, the refcount table, the encryption header, the
  bitmap directory, bitmap tables and bitmap data, and every refcount block.
* The array grows when a reference points past the end of the file, so such a reference is
  compared (on-disk refcount 0 < 1) and reported as a corruption.
* On-disk refcount > references is a *leak*, < is a *corruption*; an on-disk refcount of 0
  for a referenced cluster can only be fixed by rebuilding the whole refcount structure.
* Repairs keep the crash-safe order: refcount blocks are written and flushed before the
  table that points at them, the new table before the header (write + flush), and the old
  structure is only freed (as leaks) after the switch.
* Every line QEMU prints on stderr while checking is collected in
  :attr:`CheckResult.messages`, with QEMU's text; this module never prints.

Work per table is done on ``array`` objects decoded in one go; per-cluster Python work is
limited to the clusters that are actually referenced.
"""

from __future__ import annotations

import struct
import sys
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from blockgraph.drivers.qcow2.header import (
    HEADER_OFFSET_REFTABLE,
    MAX_L1_SIZE,
    QCOW2_AUTOCLEAR_BITMAPS,
    QCOW2_INCOMPAT_CORRUPT,
    QCOW2_INCOMPAT_DATA_FILE,
    QCOW2_INCOMPAT_DIRTY,
)
from blockgraph.drivers.qcow2.tables import (
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK,
    QCOW_L2_BITMAP_ALL_ALLOC,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    REFT_OFFSET_MASK,
    REFTABLE_ENTRY_SIZE,
)
from blockgraph.errors import IOFailure

if TYPE_CHECKING:
    from blockgraph.drivers.qcow2.driver import Qcow2Driver

FIX_LEAKS = 1
FIX_ERRORS = 2
FIX_ALL = FIX_LEAKS | FIX_ERRORS

REFT_RESERVED_MASK = 0x1FF
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE
BME_TABLE_ENTRY_FLAG_ALL_ONES = 1
BITMAP_DIR_ENTRY_SIZE = 24
SNAPSHOT_ENTRY_SIZE = 40

_BIG_ENDIAN_HOST = sys.byteorder == "big"
_WIDE_TYPECODES = {3: "B", 4: "H", 5: "I", 6: "Q"}


@dataclass
class CheckResult:
    """QEMU's ``BdrvCheckResult`` plus the fragmentation info and the stderr lines."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = field(default_factory=list)


def be64_array(raw: bytes | bytearray | memoryview) -> array[int]:
    """Big-endian 64-bit table entries, decoded in one go."""
    a = array("Q")
    a.frombytes(bytes(raw[: len(raw) // 8 * 8]))
    if not _BIG_ENDIAN_HOST:
        a.byteswap()
    return a


def decode_refblock(raw: bytes | bytearray, order: int) -> array[int]:
    """All entries of one refcount block as an ``array('Q')``."""
    if order >= 3:
        narrow = array(_WIDE_TYPECODES[order])
        narrow.frombytes(bytes(raw))
        if not _BIG_ENDIAN_HOST and order > 3:
            narrow.byteswap()
        return array("Q", narrow)
    table = _narrow_decode_table(order)
    out = array("Q")
    for b in raw:
        out.extend(table[b])
    return out


def encode_refblock(values: array[int], order: int) -> bytes:
    """The on-disk bytes of one refcount block holding ``values``."""
    if order >= 3:
        narrow = array(_WIDE_TYPECODES[order], values)
        if not _BIG_ENDIAN_HOST and order > 3:
            narrow.byteswap()
        return narrow.tobytes()
    bits = 1 << order
    per_byte = 8 // bits
    out = bytearray(len(values) // per_byte)
    for j in range(per_byte):
        shift = j * bits
        for i, v in enumerate(values[j::per_byte]):
            if v:
                out[i] |= v << shift
    return bytes(out)


_NARROW_TABLES: dict[int, list[tuple[int, ...]]] = {}


def _narrow_decode_table(order: int) -> list[tuple[int, ...]]:
    table = _NARROW_TABLES.get(order)
    if table is None:
        bits = 1 << order
        mask = (1 << bits) - 1
        table = [tuple((b >> s) & mask for s in range(0, 8, bits)) for b in range(256)]
        _NARROW_TABLES[order] = table
    return table


class _Checker:
    """One run of the check (QEMU's ``qcow2_co_check_locked``) over an open driver."""

    def __init__(self, drv: Qcow2Driver, res: CheckResult) -> None:
        self.drv = drv
        self.file = drv._file
        self.h = drv.header
        self.res = res
        self.cluster_bits = drv.cluster_bits
        self.cluster_size = drv.cluster_size
        self.order = self.h.refcount_order
        self.refcount_max = (1 << (1 << self.order)) - 1
        self.rb_bits = self.cluster_bits + 3 - self.order
        self.rb_size = 1 << self.rb_bits
        self.data_file = bool(self.h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE)
        self.refs: array[int] = array("Q")
        # On-disk refcounts, decoded per refcount block index; dirty ones are written back.
        self.disk_blocks: dict[int, array[int]] = {}
        self.dirty_blocks: set[int] = set()
        self.reftable: array[int] = array("Q")
        self.next_contiguous = 0

    def msg(self, text: str) -> None:
        self.res.messages.append(text)

    # -- I/O --------------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        if length:
            await self.file.preadv(offset, memoryview(buf))
        return buf

    async def load_reftable(self) -> None:
        cs = self.cluster_size
        n = self.h.refcount_table_clusters * cs // REFTABLE_ENTRY_SIZE
        self.reftable = be64_array(await self.read(self.h.refcount_table_offset, n * 8))
        self.disk_blocks.clear()
        self.dirty_blocks.clear()

    async def disk_block(self, index: int) -> array[int] | None:
        if index >= len(self.reftable):
            return None
        off = self.reftable[index] & REFT_OFFSET_MASK
        if not off:
            return None
        block = self.disk_blocks.get(index)
        if block is None:
            block = decode_refblock(await self.read(off, self.cluster_size), self.order)
            self.disk_blocks[index] = block
        return block

    async def disk_refcount(self, cluster: int) -> int:
        block = await self.disk_block(cluster >> self.rb_bits)
        return 0 if block is None else block[cluster & (self.rb_size - 1)]

    async def write_dirty_blocks(self) -> None:
        for index in sorted(self.dirty_blocks):
            off = self.reftable[index] & REFT_OFFSET_MASK
            raw = encode_refblock(self.disk_blocks[index], self.order)
            await self.file.pwritev(off, memoryview(raw))
        if self.dirty_blocks:
            await self.file.flush()
        self.dirty_blocks.clear()

    # -- the in-memory refcount table -------------------------------------------------------

    def _grow(self, n: int) -> None:
        if n > len(self.refs):
            self.refs.extend(array("Q", bytes(8 * (n - len(self.refs)))))

    def inc(self, offset: int, size: int) -> None:
        """+1 for every cluster touched by ``[offset, offset + size)``."""
        if size <= 0:
            return
        if offset + size - self.file.getlength() >= self.cluster_size:
            self._beyond_eof(offset, size)
            return
        first = offset >> self.cluster_bits
        last = (offset + size - 1) >> self.cluster_bits
        self._grow(last + 1)
        refs = self.refs
        for k in range(first, last + 1):
            v = refs[k]
            if v >= self.refcount_max:
                self.msg(f"ERROR: overflow cluster offset=0x{k << self.cluster_bits:x}")
                self.res.corruptions += 1
                continue
            refs[k] = v + 1

    def _beyond_eof(self, offset: int, size: int) -> None:
        self.msg("ERROR: counting reference for region exceeding the end of the file by one "
                 f"cluster or more: offset 0x{offset:x} size 0x{size:x}")
        self.res.corruptions += 1

    def inc_clusters(self, clusters: list[int]) -> None:
        """+1 for each (whole) cluster index in ``clusters``."""
        if not clusters:
            return
        limit = -(-self.file.getlength() // self.cluster_size)
        if max(clusters) >= limit:
            for k in [k for k in clusters if k >= limit]:
                self._beyond_eof(k << self.cluster_bits, self.cluster_size)
            clusters = [k for k in clusters if k < limit]
            if not clusters:
                return
        self._grow(max(clusters) + 1)
        refs = self.refs
        rmax = self.refcount_max
        for k in clusters:
            v = refs[k]
            if v >= rmax:
                self.msg(f"ERROR: overflow cluster offset=0x{k << self.cluster_bits:x}")
                self.res.corruptions += 1
                continue
            refs[k] = v + 1

    # -- walking the metadata ---------------------------------------------------------------

    async def calculate_refs(self, fix: int) -> None:
        res = self.res
        h = self.h
        cs = self.cluster_size
        self.inc(0, cs)
        await self.check_l1(h.l1_table_offset, h.l1_size, frag=True, fix=fix, active=True)
        snapshots, snapshots_size = await self.read_snapshots()
        if self.data_file and snapshots:
            self.msg(f"ERROR {len(snapshots)} snapshots in image with data file")
            res.corruptions += 1
        for sn_id, sn_name, l1_offset, l1_size in snapshots:
            if l1_offset & (cs - 1):
                self.msg(f"ERROR snapshot {sn_id} ({sn_name}) l1_offset={l1_offset:#x}: L1 table "
                         "is not cluster aligned; snapshot table entry corrupted")
                res.corruptions += 1
                continue
            if l1_size > MAX_L1_SIZE // 8:
                self.msg(f"ERROR snapshot {sn_id} ({sn_name}) l1_size={l1_size:#x}: L1 table is "
                         "too large; snapshot table entry corrupted")
                res.corruptions += 1
                continue
            await self.check_l1(l1_offset, l1_size, frag=False, fix=fix, active=False)
        self.inc(h.snapshots_offset, snapshots_size)
        self.inc(h.refcount_table_offset, h.refcount_table_clusters * cs)
        if h.crypto_header is not None:
            self.inc(h.crypto_header[0], h.crypto_header[1])
        await self.bitmap_refs()
        await self.check_refblocks(fix)

    async def read_snapshots(self) -> tuple[list[tuple[str, str, int, int]], int]:
        """(id, name, l1_offset, l1_size) of every snapshot, and the table's size in bytes."""
        h = self.h
        out: list[tuple[str, str, int, int]] = []
        if not h.nb_snapshots:
            return out, 0
        known = getattr(self.drv, "snapshots", None)
        if known is not None and len(known) == h.nb_snapshots:
            return ([(sn.id_str, sn.name, sn.l1_table_offset, sn.l1_size) for sn in known],
                    int(getattr(self.drv, "snapshots_size", 0)))
        pos = h.snapshots_offset
        flen = self.file.getlength()
        for _ in range(h.nb_snapshots):
            if pos + SNAPSHOT_ENTRY_SIZE > flen:
                break
            fixed = await self.read(pos, SNAPSHOT_ENTRY_SIZE)
            l1_offset, l1_size, id_len, name_len = struct.unpack_from(">QIHH", fixed)
            extra = struct.unpack_from(">I", fixed, 36)[0]
            strings = await self.read(pos + SNAPSHOT_ENTRY_SIZE + extra, id_len + name_len)
            sn_id = strings[:id_len].decode("utf-8", "replace")
            sn_name = strings[id_len:].decode("utf-8", "replace")
            out.append((sn_id, sn_name, l1_offset, l1_size))
            size = SNAPSHOT_ENTRY_SIZE + extra + id_len + name_len
            pos += (size + 7) & ~7
        return out, pos - h.snapshots_offset

    async def check_l1(self, l1_offset: int, l1_size: int, *, frag: bool, fix: int,
                       active: bool) -> None:
        if not l1_size:
            return
        self.inc(l1_offset, l1_size * 8)
        try:
            l1 = be64_array(await self.read(l1_offset, l1_size * 8))
        except IOFailure:
            self.msg("ERROR: I/O error in check_refcounts_l1")
            self.res.check_errors += 1
            return
        cs = self.cluster_size
        for entry in l1:
            if not entry:
                continue
            if entry & L1E_RESERVED_MASK:
                self.msg(f"ERROR found L1 entry with reserved bits set: {entry:x}")
                self.res.corruptions += 1
            l2_offset = entry & L1E_OFFSET_MASK
            self.inc(l2_offset, cs)
            if l2_offset & (cs - 1):
                self.msg(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; "
                         "L1 entry corrupted")
                self.res.corruptions += 1
            await self.check_l2(l2_offset, frag=frag, fix=fix, active=active)

    async def check_l2(self, l2_offset: int, *, frag: bool, fix: int, active: bool) -> None:
        drv = self.drv
        cs = self.cluster_size
        raw = await self.read(l2_offset, cs)
        if not any(raw):
            return
        self.next_contiguous = 0
        words = be64_array(raw)
        ext = drv.extended_l2
        entries = words[0::2] if ext else words
        bitmaps = words[1::2] if ext else None
        res = self.res
        data_clusters: list[int] = []
        bits = self.cluster_bits
        for i in [i for i, e in enumerate(entries) if e or (bitmaps is not None and bitmaps[i])]:
            entry = entries[i]
            bitmap = bitmaps[i] if bitmaps is not None else 0
            if entry & QCOW_OFLAG_COMPRESSED:
                if self.data_file:
                    self.msg(f"ERROR compressed cluster {i} with data file, entry=0x{entry:x}")
                    res.corruptions += 1
                    continue
                if entry & QCOW_OFLAG_COPIED:
                    self.msg(f"ERROR: coffset=0x{entry & drv.cluster_offset_mask:x}: copied flag "
                             "must never be set for compressed clusters")
                    res.corruptions += 1
                if ext and bitmap:
                    self.msg(f"ERROR compressed cluster {i} with non-zero subcluster allocation "
                             f"bitmap, entry=0x{entry:x}")
                    res.corruptions += 1
                    continue
                coffset, csize = drv._compressed_range(entry)
                self.inc(coffset, csize)
                if frag:
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    # Compressed clusters are fragmented by nature: sector-granular re-reads.
                    res.fragmented_clusters += 1
                continue
            if entry & L2E_STD_RESERVED_MASK:
                self.msg(f"ERROR found l2 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            offset = entry & L2E_OFFSET_MASK
            zero_flag = bool(entry & QCOW_OFLAG_ZERO) and not ext
            # Host offset 0 is a data cluster in an external data file (bit 63 set there).
            if not offset and not (self.data_file and entry & QCOW_OFLAG_COPIED and not zero_flag):
                if ext and not entry & (1 << 63) and bitmap & QCOW_L2_BITMAP_ALL_ALLOC:
                    res.corruptions += 1
                    self.msg("ERROR: Unallocated cluster has non-zero subcluster allocation map")
                continue
            # Normal or preallocated zero cluster.
            if ext and (bitmap >> 32) & bitmap:
                res.corruptions += 1
                self.msg(f"ERROR offset={offset:x}: Allocated cluster has corrupted subcluster "
                         "allocation bitmap")
            if offset & (cs - 1):
                res.corruptions += 1
                contains_data = bool(bitmap & QCOW_L2_BITMAP_ALL_ALLOC) if ext else not zero_flag
                if not contains_data:
                    repair = bool(fix & FIX_ERRORS)
                    self.msg(f"{'Repairing' if repair else 'ERROR'} offset={offset:x}: Preallocated "
                             "cluster is not properly aligned; L2 entry corrupted.")
                    if repair:
                        new = 0 if ext else QCOW_OFLAG_ZERO
                        await self.file.pwritev(l2_offset + i * drv.l2_entry_size,
                                                memoryview(struct.pack(">Q", new)))
                        await self.file.flush()
                        res.corruptions -= 1
                        res.corruptions_fixed += 1
                        continue
                else:
                    self.msg(f"ERROR offset={offset:x}: Data cluster is not properly aligned; "
                             "L2 entry corrupted.")
            if frag:
                res.allocated_clusters += 1
                if self.next_contiguous and offset != self.next_contiguous:
                    res.fragmented_clusters += 1
                self.next_contiguous = offset + cs
            if self.data_file:
                continue
            if offset & (cs - 1):
                self.inc(offset, cs)  # a misaligned cluster touches two host clusters
            else:
                data_clusters.append(offset >> bits)
        self.inc_clusters(data_clusters)

    async def bitmap_refs(self) -> None:
        h = self.h
        ext = h.bitmaps
        if ext is None or not ext.nb_bitmaps or not h.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS:
            return
        cs = self.cluster_size
        self.inc(ext.bitmap_directory_offset, ext.bitmap_directory_size)
        raw = await self.read(ext.bitmap_directory_offset, ext.bitmap_directory_size)
        pos = 0
        tables: list[tuple[int, int]] = []
        for _ in range(ext.nb_bitmaps):
            if pos + BITMAP_DIR_ENTRY_SIZE > len(raw):
                self.res.corruptions += 1
                return
            t_off, t_size, _flags, _type, _gran, name_size, extra = struct.unpack_from(
                ">QIIBBHI", raw, pos)
            tables.append((t_off, t_size))
            pos += (BITMAP_DIR_ENTRY_SIZE + extra + name_size + 7) & ~7
        for t_off, t_size in tables:
            self.inc(t_off, t_size * 8)
            if t_off & (cs - 1):
                self.res.corruptions += 1
                break
            clusters: list[int] = []
            for entry in be64_array(await self.read(t_off, t_size * 8)):
                off = entry & BME_TABLE_ENTRY_OFFSET_MASK
                if entry & BME_TABLE_ENTRY_RESERVED_MASK or off & (cs - 1) or (
                    off and entry & BME_TABLE_ENTRY_FLAG_ALL_ONES
                ):
                    self.res.corruptions += 1
                    continue
                if off:
                    clusters.append(off >> self.cluster_bits)
            self.inc_clusters(clusters)

    async def check_refblocks(self, fix: int) -> bool:
        """Count the refcount blocks; return whether the structure must be rebuilt."""
        rebuild = False
        cs = self.cluster_size
        for i, entry in enumerate(self.reftable):
            offset = entry & REFT_OFFSET_MASK
            cluster = offset >> self.cluster_bits
            if entry & REFT_RESERVED_MASK:
                self.msg(f"ERROR refcount table entry {i} has reserved bits set")
                self.res.corruptions += 1
                rebuild = True
                continue
            if cluster >= self.nb_clusters():
                self.res.corruptions += 1
                repair = bool(fix & FIX_ERRORS)
                self.msg(f"{'Repairing' if repair else 'ERROR'} refcount block {i} is outside image")
                if repair:
                    try:
                        await self.file.truncate(offset + cs)
                    except IOFailure as exc:
                        rebuild = True
                        self.msg(f"ERROR could not resize image: {exc}")
                        continue
                    self.res.corruptions -= 1
                    self.res.corruptions_fixed += 1
                    self._grow(cluster + 1)
                    self.inc(offset, cs)
                continue
            if offset:
                self.inc(offset, cs)
                if self.refs[cluster] != 1:
                    self.msg(f"ERROR refcount block {i} refcount={self.refs[cluster]}")
                    self.res.corruptions += 1
                    rebuild = True
        self.rebuild_needed = rebuild
        return rebuild

    def nb_clusters(self) -> int:
        return len(self.refs)

    # -- comparing --------------------------------------------------------------------------

    async def compare(self, fix: int) -> tuple[bool, int]:
        """Compare on-disk refcounts with the references; return (rebuild, highest cluster)."""
        res = self.res
        rebuild = False
        highest = -1
        refs = self.refs
        n = len(refs)
        for index in range(0, -(-n // self.rb_size)):
            base = index << self.rb_bits
            end = min(n, base + self.rb_size)
            block = await self.disk_block(index)
            mine = refs[base:end]
            theirs = block[: end - base] if block is not None else array("Q", bytes(8 * (end - base)))
            if mine == theirs:
                used = len(mine.tobytes().rstrip(b"\0"))
                if used:
                    highest = base + (used - 1) // 8
                continue
            for j in range(end - base):
                r1 = theirs[j]
                r2 = mine[j]
                if r1 or r2:
                    highest = base + j
                if r1 == r2:
                    continue
                fixed = False
                if r1 == 0:
                    rebuild = True
                elif r1 > r2 and fix & FIX_LEAKS:
                    fixed = True
                elif r1 < r2 and fix & FIX_ERRORS:
                    fixed = True
                word = "Repairing" if fixed else ("ERROR" if r1 < r2 else "Leaked")
                self.msg(f"{word} cluster {base + j} refcount={r1} reference={r2}")
                if fixed and block is not None:
                    block[j] = r2
                    self.dirty_blocks.add(index)
                    if r1 > r2:
                        res.leaks_fixed += 1
                    else:
                        res.corruptions_fixed += 1
                    continue
                if r1 < r2:
                    res.corruptions += 1
                else:
                    res.leaks += 1
        await self.write_dirty_blocks()
        return rebuild, highest

    async def check_oflag_copied(self, fix: int) -> None:
        res = self.res
        drv = self.drv
        if fix & FIX_ERRORS:
            repair = True
        elif fix & FIX_LEAKS:
            repair = not res.check_errors and not res.corruptions and not res.leaks
        else:
            repair = False
        word = "Repairing" if repair else "ERROR"
        bits = self.cluster_bits
        for i, l1_entry in enumerate(drv.l1_table):
            l2_offset = l1_entry & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            refcount = await self.disk_refcount(l2_offset >> bits)
            if (refcount == 1) != bool(l1_entry & QCOW_OFLAG_COPIED):
                res.corruptions += 1
                self.msg(f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} "
                         f"refcount={refcount}")
                if repair:
                    drv.l1_table[i] = (l1_entry | QCOW_OFLAG_COPIED if refcount == 1
                                       else l1_entry & ~QCOW_OFLAG_COPIED)
                    await drv._write_l1_entry(i)
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            raw = await self.read(l2_offset, self.cluster_size)
            if not any(raw):
                continue
            words = be64_array(raw)
            step = 2 if drv.extended_l2 else 1
            dirty = 0
            for j in range(0, len(words), step):
                entry = words[j]
                if entry & QCOW_OFLAG_COMPRESSED or not entry & L2E_OFFSET_MASK:
                    continue
                rc = 1 if self.data_file else await self.disk_refcount(
                    (entry & L2E_OFFSET_MASK) >> bits)
                if (rc == 1) != bool(entry & QCOW_OFLAG_COPIED):
                    res.corruptions += 1
                    self.msg(f"{word} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc}")
                    if repair:
                        words[j] = entry | QCOW_OFLAG_COPIED if rc == 1 else entry & ~QCOW_OFLAG_COPIED
                        dirty += 1
            if dirty:
                out = array("Q", words)
                if not _BIG_ENDIAN_HOST:
                    out.byteswap()
                await drv._overlap_check(l2_offset, self.cluster_size, ignore="active-l2")
                await self.file.pwritev(l2_offset, memoryview(out.tobytes()))
                await self.file.flush()
                res.corruptions -= dirty
                res.corruptions_fixed += dirty

    # -- rebuilding the refcount structure --------------------------------------------------

    def _alloc_in_memory(self, count: int, first_free: list[int]) -> int:
        """Find ``count`` free clusters in the in-memory table from ``first_free[0]``, take them."""
        refs = self.refs
        cluster = first_free[0]
        run = 0
        first_gap = True
        while cluster < len(refs) and run < count:
            if not refs[cluster]:
                run += 1
                if first_gap:
                    first_free[0] = cluster
                    first_gap = False
            else:
                run = 0
            cluster += 1
        if run < count:
            self._grow(cluster + count - run)
        start = cluster - run
        for k in range(start, start + count):
            refs[k] = 1
        return start << self.cluster_bits

    async def _write_refblocks(self, first: int, end: int, reftable: list[int]) -> bool:
        """Place and write the refblocks covering used clusters in ``[first, end)``."""
        grown = False
        first_free = [0]
        cs = self.cluster_size
        cluster = first
        while cluster < end:
            if cluster >= len(self.refs) or not self.refs[cluster]:
                cluster += 1
                continue
            index = cluster >> self.rb_bits
            start = index << self.rb_bits
            if index < len(reftable) and reftable[index]:
                block_offset = reftable[index]
            else:
                first_free[0] = max(first_free[0], start)
                block_offset = self._alloc_in_memory(1, first_free)
                if (block_offset >> self.cluster_bits) >= end:
                    end = (block_offset >> self.cluster_bits) + 1
                if len(reftable) <= index:
                    entries = -(-(index + 1) * REFTABLE_ENTRY_SIZE // cs) * cs // REFTABLE_ENTRY_SIZE
                    reftable.extend([0] * (entries - len(reftable)))
                    grown = True
                reftable[index] = block_offset
            values = self.refs[start : start + self.rb_size]
            if len(values) < self.rb_size:
                values.extend(array("Q", bytes(8 * (self.rb_size - len(values)))))
            await self.drv._overlap_check(block_offset, cs)
            await self.file.pwritev(block_offset, memoryview(encode_refblock(values, self.order)))
            cluster = start + self.rb_size
        return grown

    async def rebuild(self) -> None:
        """A new refcount structure from the in-memory table, then switch the header to it."""
        cs = self.cluster_size
        reftable: list[int] = []
        grown = await self._write_refblocks(0, len(self.refs), reftable)
        assert grown
        table_offset = -1
        table_clusters = 0
        while grown:
            table_clusters = -(-len(reftable) * REFTABLE_ENTRY_SIZE // cs)
            table_offset = self._alloc_in_memory(table_clusters, [0])
            first = table_offset >> self.cluster_bits
            grown = await self._write_refblocks(first, first + table_clusters, reftable)
        await self.file.flush()
        table_bytes = struct.pack(f">{len(reftable)}Q", *reftable)
        table_bytes += bytes(table_clusters * cs - len(table_bytes))
        await self.file.pwritev(table_offset, memoryview(table_bytes))
        await self.file.flush()
        await self.file.pwritev(HEADER_OFFSET_REFTABLE,
                                memoryview(struct.pack(">QI", table_offset, table_clusters)))
        await self.file.flush()
        self.h.refcount_table_offset = table_offset
        self.h.refcount_table_clusters = table_clusters
        drv = self.drv
        drv.refcounts.refcount_table_offset = table_offset
        drv.refcounts.refcount_table = list(reftable) + [0] * (
            table_clusters * cs // REFTABLE_ENTRY_SIZE - len(reftable))
        drv.refcounts.free_cluster_index = 0


async def _run(drv: Qcow2Driver, fix: int, res: CheckResult) -> None:
    """QEMU's ``qcow2_check_refcounts`` (plus the OFLAG_COPIED pass) into ``res``."""
    c = _Checker(drv, res)
    h = drv.header
    flen = c.file.getlength()
    res.total_clusters = -(-h.size // c.cluster_size)
    await c.load_reftable()
    c._grow(-(-flen // c.cluster_size))
    await c.calculate_refs(fix)
    pre = _copy(res)
    rebuild, highest = await c.compare(0)
    rebuild = rebuild or c.rebuild_needed
    if rebuild and fix & FIX_ERRORS:
        old = _copy(res)
        res.messages.append("Rebuilding refcount structure")
        await c.rebuild()
        res.corruptions = 0
        res.leaks = 0
        c2 = _Checker(drv, res)
        await c2.load_reftable()
        c2._grow(max(len(c.refs), -(-c.file.getlength() // c.cluster_size)))
        await c2.calculate_refs(fix)
        fresh_leaks = 0
        if fix & FIX_LEAKS:
            saved = _copy(res)
            scratch = CheckResult(messages=res.messages)
            c2.res = scratch
            again, highest = await c2.compare(FIX_LEAKS)
            if again or c2.rebuild_needed:
                res.messages.append("ERROR rebuilt refcount structure is still broken")
            fresh_leaks = scratch.leaks
            _restore(res, saved)
            c2.res = res
        else:
            _again, highest = await c2.compare(0)
        if res.corruptions < old.corruptions:
            res.corruptions_fixed += old.corruptions - res.corruptions
        if res.leaks < old.leaks:
            res.leaks_fixed += old.leaks - res.leaks
        res.leaks += fresh_leaks
        c = c2
    elif fix:
        if rebuild:
            res.messages.append("ERROR need to rebuild refcount structures")
            res.check_errors += 1
            raise IOFailure(5)
        if res.leaks or res.corruptions:
            _restore(res, pre)
            await c.load_reftable()
            _again, highest = await c.compare(fix)
    await c.check_oflag_copied(fix)
    res.image_end_offset = (highest + 1) * c.cluster_size


def _copy(res: CheckResult) -> CheckResult:
    return CheckResult(**{k: v for k, v in vars(res).items() if k != "messages"},
                       messages=res.messages)


def _restore(res: CheckResult, saved: CheckResult) -> None:
    for k, v in vars(saved).items():
        if k != "messages":
            setattr(res, k, v)


async def check_image(drv: Qcow2Driver, fix: int = 0,
                      res: CheckResult | None = None) -> CheckResult:
    """Check (and with ``fix``, repair) the image behind an open driver.

    The caller holds the driver's metadata lock. Cached metadata is written first and dropped
    afterwards, since the check reads and writes the tables on disk directly.

    :raise IOFailure: when the check could not complete (``check_errors`` tells why).
    """
    if res is None:
        res = CheckResult()
    if not drv.read_only:
        await drv._write_caches()
        await drv._file.flush()
    drv.l2_cache.tables.clear()
    drv.refcount_cache.tables.clear()
    try:
        await _run(drv, fix, res)
    finally:
        drv.l2_cache.tables.clear()
        drv.l2_cache.dirty.clear()
        drv.refcount_cache.tables.clear()
        drv.refcount_cache.dirty.clear()
        drv.refcounts.free_cluster_index = 0
    if fix and not res.check_errors and not res.corruptions:
        h = drv.header
        clean = h.incompatible_features & ~(QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT)
        if clean != h.incompatible_features:
            await drv._set_incompat(clean)
    return res
