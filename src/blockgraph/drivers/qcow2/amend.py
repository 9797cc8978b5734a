"""``qemu-img amend`` for qcow2: compat level, lazy refcounts, refcount width, size, backing.

Order as QEMU's ``qcow2_amend_options``: options are validated first, an upgrade happens
first (later changes may need v3), a downgrade last (after what it needs removed is gone).

Rules of this module:

* Header changes rewrite the fixed header and its extensions in one write of cluster 0,
  synced, after everything they describe is on disk.
* A refcount width change rebuilds the whole refcount structure from the references found by
  walking the metadata (header, L1/L2 tables of the active state and of every snapshot, the
  snapshot table, bitmaps): new refcount blocks and table are written after the end of the
  file and synced, then the header switches to them in one write. The old structure is not
  counted in the new one, so it is free from that moment on.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from blockgraph.drivers.qcow2.header import (
    QCOW2_AUTOCLEAR_BITMAPS,
    QCOW2_COMPAT_LAZY_REFCOUNTS,
    QCOW2_INCOMPAT_DIRTY,
    V2_HEADER_LENGTH,
    V3_HEADER_LENGTH_WRITTEN,
    build_header_cluster,
)
from blockgraph.drivers.qcow2.refcount import Refcounts, set_refcount_entry
from blockgraph.drivers.qcow2.tables import (
    L1E_OFFSET_MASK,
    L1E_SIZE,
    L2E_OFFSET_MASK,
    QCOW_OFLAG_ZERO,
    REFTABLE_ENTRY_SIZE,
    ClusterType,
    Qcow2Cache,
    cluster_type,
)
from blockgraph.errors import BlockError

if TYPE_CHECKING:
    from blockgraph.drivers.qcow2.driver import Qcow2Driver

_COMPAT = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
AMEND_OPTIONS = ("compat", "lazy_refcounts", "refcount_bits", "size", "backing_file",
                 "backing_fmt", "data_file", "data_file_raw")
CREATE_ONLY_OPTIONS = ("cluster_size", "extended_l2", "compression_type", "preallocation",
                       "encryption", "encrypt.format")


def _parse_bool(key: str, value: str) -> bool:
    if value == "on":
        return True
    if value == "off":
        return False
    raise BlockError(f"Parameter '{key}' expects 'on' or 'off'")


async def amend(drv: Qcow2Driver, options: dict[str, str]) -> None:
    """Apply qemu-img ``-o`` ``options`` (strings, as typed) to the open image.

    :raise BlockError: with qemu-img's messages.
    """
    from blockgraph.options.schema import parse_size

    for key in options:
        if key in CREATE_ONLY_OPTIONS:
            raise BlockError(f"Invalid parameter '{key}'\n"
                             "This option is only supported for image creation")
        if key not in AMEND_OPTIONS:
            raise BlockError(f"Invalid parameter '{key}'")
    h = drv.header
    new_version = h.version
    if "compat" in options:
        if options["compat"] not in _COMPAT:
            raise BlockError(f"Unknown compatibility level {options['compat']}")
        new_version = _COMPAT[options["compat"]]
    lazy: bool | None = None
    if "lazy_refcounts" in options:
        lazy = _parse_bool("lazy_refcounts", options["lazy_refcounts"])
    refcount_bits: int | None = None
    if "refcount_bits" in options:
        try:
            refcount_bits = parse_size("refcount_bits", options["refcount_bits"])
        except Exception:
            refcount_bits = -1
        if refcount_bits <= 0 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
            raise BlockError("Refcount width must be a power of two and may not exceed 64 bits")
    new_size: int | None = None
    if "size" in options:
        new_size = parse_size("size", options["size"])
    if "data_file" in options and not drv.external_data:
        raise BlockError("data-file can only be set for images that use an external data file")
    if "data_file_raw" in options and (
            _parse_bool("data_file_raw", options["data_file_raw"]) != drv.data_file_raw):
        raise BlockError("data-file-raw cannot be set on existing images")

    old_version = h.version
    if new_version > old_version:
        await _set_version(drv, new_version)
    if refcount_bits is not None and refcount_bits != 1 << h.refcount_order:
        if new_version < 3:
            raise BlockError("Refcount widths other than 16 bits require compatibility level "
                             "1.1 or above (use compat=1.1 or greater)")
        await change_refcount_order(drv, refcount_bits.bit_length() - 1)
    if "backing_file" in options or "backing_fmt" in options:
        h.backing_file = options.get("backing_file", h.backing_file) or None
        h.backing_format = options.get("backing_fmt", h.backing_format) or None
        await _rewrite_header(drv)
    if "data_file" in options:
        # Only the name changes (an empty one drops it: the user must then name the file at
        # every open); the open data file stays what it is.
        h.data_file = options["data_file"] or None
        await _rewrite_header(drv)
    if lazy is not None:
        if lazy and new_version < 3:
            raise BlockError("Lazy refcounts only supported with compatibility level 1.1 and "
                             "above (use compat=1.1 or greater)")
        await _set_lazy_refcounts(drv, lazy)
    if new_size is not None and new_size != h.size:
        await drv.truncate(new_size)
    if new_version < old_version:
        await _downgrade(drv)


async def _rewrite_header(drv: Qcow2Driver) -> None:
    async with drv._lock:
        await drv._write_caches()
        await drv._file.flush()
        cluster0 = build_header_cluster(drv.header)
        await drv._file.pwritev(0, memoryview(cluster0))
        await drv._file.flush()


async def _set_version(drv: Qcow2Driver, version: int) -> None:
    h = drv.header
    h.version = version
    if version >= 3:
        h.header_length = V3_HEADER_LENGTH_WRITTEN
    else:
        h.header_length = V2_HEADER_LENGTH
        h.compatible_features = h.incompatible_features = h.autoclear_features = 0
        h.refcount_order = 4
    await _rewrite_header(drv)


async def _set_lazy_refcounts(drv: Qcow2Driver, lazy: bool) -> None:
    h = drv.header
    if lazy == bool(h.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS):
        drv.lazy_refcounts = lazy
        return
    if lazy:
        h.compatible_features |= QCOW2_COMPAT_LAZY_REFCOUNTS
    else:
        # Refcounts become exact again before the image stops saying they may be stale.
        h.compatible_features &= ~QCOW2_COMPAT_LAZY_REFCOUNTS
        h.incompatible_features &= ~QCOW2_INCOMPAT_DIRTY
    drv.lazy_refcounts = lazy
    await _rewrite_header(drv)


async def _downgrade(drv: Qcow2Driver) -> None:
    """To compat=0.10: only when nothing v3-only is left, zero clusters expanded first."""
    h = drv.header
    if drv.external_data:
        raise BlockError("Cannot downgrade an image with a data file")
    if h.refcount_order != 4:
        raise BlockError("compat=0.10 requires refcount_bits=16")
    if h.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS:
        await _set_lazy_refcounts(drv, False)
    remaining = h.incompatible_features & ~QCOW2_INCOMPAT_DIRTY
    if remaining:
        raise BlockError(f"Cannot downgrade an image with incompatible features "
                         f"{remaining:#x} set")
    await _expand_zero_clusters(drv)
    await _set_version(drv, 2)


async def _expand_zero_clusters(drv: Qcow2Driver) -> None:
    """v2 has no zero flag: turn zero clusters into unallocated ones or real zeros."""
    from blockgraph.drivers.base import RequestFlags

    cs = drv.cluster_size
    async with drv._lock:
        for sn in drv.snapshots:
            raw = bytearray(sn.l1_size * L1E_SIZE)
            await drv._file.preadv(sn.l1_table_offset, memoryview(raw))
            for l1e in struct.unpack(f">{sn.l1_size}Q", raw):
                l2_offset = l1e & L1E_OFFSET_MASK
                if not l2_offset:
                    continue
                table = await drv.l2_cache.get(l2_offset)
                if any(e & QCOW_OFLAG_ZERO for e in struct.unpack(f">{drv.l2_size}Q", table)):
                    raise BlockError("Cannot downgrade an image whose internal snapshots "
                                     "contain zero clusters")
        zero_runs: list[int] = []
        for l1_index, l1e in enumerate(drv.l1_table):
            if not l1e & L1E_OFFSET_MASK:
                continue
            entries = await drv._l2_entries(l1_index, 0, drv.l2_size)
            for j, (e, _bitmap) in enumerate(entries):
                if e & QCOW_OFLAG_ZERO and cluster_type(e) is not ClusterType.COMPRESSED:
                    zero_runs.append((l1_index * drv.l2_size + j) * cs)
    zeros = bytes(cs)
    for guest in zero_runs:
        if guest >= drv.header.size:
            continue
        n = min(cs, drv.header.size - guest)
        async with drv._lock:
            l1_index, l2_index, _ = drv._split(guest, n)
            [(entry, _b)] = await drv._l2_entries(l1_index, l2_index, 1)
            if entry & L2E_OFFSET_MASK == 0 and drv.backing is None:
                # Unallocated reads as zeros just as well.
                l2_offset = await drv._get_l2_for_write(l1_index)
                table = await drv.l2_cache.get(l2_offset)
                struct.pack_into(">Q", table, l2_index * 8, 0)
                drv.l2_cache.mark_dirty(l2_offset)
                continue
        # Real zeros in a cluster of its own (a new one when the old one is shared).
        await drv.pwritev(guest, memoryview(zeros)[:n], RequestFlags.NONE)
    async with drv._lock:
        await drv._write_caches()
        await drv._file.flush()


# ------------------------------------------------------------------ refcount rebuild

async def compute_references(drv: Qcow2Driver) -> dict[int, int]:
    """Cluster index -> number of references, walking every metadata structure but refcounts."""
    cs = drv.cluster_size
    bits = drv.cluster_bits
    h = drv.header
    refs: dict[int, int] = {}

    def add(offset: int, length: int) -> None:
        if length <= 0:
            return
        for ci in range(offset >> bits, ((offset + length - 1) >> bits) + 1):
            refs[ci] = refs.get(ci, 0) + 1

    add(0, cs)
    l1s: list[tuple[int, list[int]]] = [(h.l1_table_offset, list(drv.l1_table))]
    for sn in drv.snapshots:
        raw = bytearray(sn.l1_size * L1E_SIZE)
        await drv._file.preadv(sn.l1_table_offset, memoryview(raw))
        l1s.append((sn.l1_table_offset, list(struct.unpack(f">{sn.l1_size}Q", raw))))
    step = 2 if drv.extended_l2 else 1
    for l1_offset, l1 in l1s:
        add(l1_offset, len(l1) * L1E_SIZE)
        for l1e in l1:
            l2_offset = l1e & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            add(l2_offset, cs)
            table = await drv.l2_cache.get(l2_offset)
            words = struct.unpack(f">{drv.l2_size * step}Q", table)
            for e in words[0::step]:
                ctype = drv._ctype(e & ~QCOW_OFLAG_ZERO if drv.extended_l2 else e)
                if ctype is ClusterType.COMPRESSED:
                    coffset, csize = drv._compressed_range(e)
                    add(coffset, csize)
                elif ctype in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC) and (
                        not drv.external_data):  # data clusters there are not refcounted
                    add(e & L2E_OFFSET_MASK, cs)
    if h.nb_snapshots and h.snapshots_offset:
        add(h.snapshots_offset, drv.snapshots_size)
    if h.crypto_header is not None:
        add(h.crypto_header[0], h.crypto_header[1])
    if h.bitmaps is not None and h.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS:
        await _add_bitmap_refs(drv, add)
    return refs


async def _add_bitmap_refs(drv: Qcow2Driver, add: object) -> None:
    from collections.abc import Callable

    assert callable(add)
    adder: Callable[[int, int], None] = add
    ext = drv.header.bitmaps
    assert ext is not None
    raw = bytearray(ext.bitmap_directory_size)
    await drv._file.preadv(ext.bitmap_directory_offset, memoryview(raw))
    adder(ext.bitmap_directory_offset, ext.bitmap_directory_size)
    pos = 0
    for _ in range(ext.nb_bitmaps):
        table_offset, table_size = struct.unpack_from(">QI", raw, pos)
        name_size, extra_size = struct.unpack_from(">HI", raw, pos + 18)
        pos += (24 + extra_size + name_size + 7) & ~7
        if not table_offset:
            continue
        adder(table_offset, table_size * 8)
        traw = bytearray(table_size * 8)
        await drv._file.preadv(table_offset, memoryview(traw))
        for entry in struct.unpack(f">{table_size}Q", traw):
            if entry & L2E_OFFSET_MASK:
                adder(entry & L2E_OFFSET_MASK, drv.cluster_size)


async def change_refcount_order(drv: Qcow2Driver, new_order: int) -> None:
    """Rebuild the refcount structure with ``1 << new_order`` bit entries."""
    cs = drv.cluster_size
    bits = drv.cluster_bits
    async with drv._lock:
        await drv._write_caches()
        await drv._file.flush()
        refs = await compute_references(drv)
        top = max(refs) + 1 if refs else 1
        top = max(top, -(-drv._file.getlength() // cs))
        limit = (1 << (1 << new_order)) - 1
        over = sorted(ci for ci, v in refs.items() if v > limit)
        if over:
            raise BlockError(f"Cannot decrease refcount entry width to {1 << new_order} bits: "
                             f"Cluster at offset {over[0] << bits:#x} has a refcount of "
                             f"{refs[over[0]]}")
        block_entries = (cs * 8) >> new_order
        # The new blocks and table go after everything; they must describe themselves too.
        nb_blocks = 1
        while True:
            table_clusters = -(-nb_blocks * REFTABLE_ENTRY_SIZE // cs)
            end = top + nb_blocks + table_clusters
            need = -(-end // block_entries)
            if need <= nb_blocks:
                break
            nb_blocks = need
        for ci in range(top, top + nb_blocks + table_clusters):
            refs[ci] = 1
        blocks = [bytearray(cs) for _ in range(nb_blocks)]
        for ci, count in refs.items():
            set_refcount_entry(blocks[ci // block_entries], ci % block_entries, new_order, count)
        table_len = table_clusters * cs // REFTABLE_ENTRY_SIZE
        table = [0] * table_len
        for b in range(nb_blocks):
            table[b] = (top + b) << bits
        await drv._file.pwritev(top << bits, memoryview(b"".join(blocks)))
        table_offset = (top + nb_blocks) << bits
        await drv._file.pwritev(table_offset, memoryview(struct.pack(f">{table_len}Q", *table)))
        await drv._file.flush()
        h = drv.header
        h.refcount_order = new_order
        h.refcount_table_offset = table_offset
        h.refcount_table_clusters = table_clusters
        await drv._file.pwritev(0, memoryview(build_header_cluster(h)))
        await drv._file.flush()
        drv.refcount_cache = Qcow2Cache("refcount", drv._file, cs, drv.refcount_cache.capacity)
        old = drv.refcounts
        drv.refcounts = Refcounts(drv._file, drv.refcount_cache, bits, new_order, table_offset,
                                  table)
        drv.refcounts.l2_cache = old.l2_cache
        drv.refcounts.on_free = old.on_free
        drv.l2_cache.depends = None
        await drv._write_caches()
        await drv._file.flush()
