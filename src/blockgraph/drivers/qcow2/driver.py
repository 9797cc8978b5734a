"""The qcow2 block driver: open, read, write, zeroes, discard, flush, block status.

Rules of this module:

* Every metadata change (L1, L2 caches, refcounts, header) happens under ``self._lock``, the
  equivalent of QEMU's ``s->lock`` (a :class:`~blockgraph.drivers.qcow2.inflight.MetadataLock`).
  Guest data reads run outside it once mapped. As in QEMU, writes run their data outside it:
  an allocating write allocates and registers its clusters under the mutex, writes data and
  COW without it, and takes it again to set the L2 entries; a request overlapping an
  allocation in flight waits for it, so two requests never allocate the same cluster, and a
  cluster is only mapped once its data is written. ``async with self._lock`` (everything that
  may free or share clusters) also waits until no write is in flight.
* On-disk ordering is QEMU's (``specs/qcow2-format.md`` §10): refcount ↑ before the L2 entry
  (the L2 cache depends on the refcount cache unless lazy refcounts are on); data and COW
  before the L2 entry (flush dependency when COW happened); new L2 tables written and synced
  before the L1 entry (write + sync); L2/L1 changes before refcount ↓ (the refcount cache
  depends on the L2 cache); the dirty bit synced before the first update that relies on it.
* Requests come aligned to :attr:`request_alignment` (512) and inside the disk: the request
  layer above guarantees both.
* With an external data file (the ``data-file`` child) guest clusters live there at host
  offset == guest offset and are not refcounted; ``file`` holds only metadata. L2 entries
  still map every cluster (bit 63 set, which makes host offset 0 a valid cluster), and the
  data file is flushed before an L2 table pointing at new clusters in it is written. With
  ``data_file_raw`` the data file is itself the disk: zeroes are written there too.

Extension points for the next step: :meth:`Qcow2Driver._read_compressed` (the compressed write
path goes next to it), ``header.nb_snapshots``/``snapshots_offset``/``bitmaps`` are parsed and
kept, and :attr:`Qcow2Driver.overlap_check` is stored for the overlap-check hook of
:class:`~blockgraph.drivers.qcow2.tables.Qcow2Cache`.
"""

from __future__ import annotations

import bisect
import logging
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from blockgraph.drivers.base import (
    BlockDriver,
    BlockStatus,
    BlockStatusFlags,
    ChildAccess,
    ChildRole,
    DriverInfo,
    NodeFlags,
    OpenContext,
    PreallocMode,
    RequestFlags,
    resolve_backing_filename,
)
from blockgraph.drivers.bitmap import DirtyBitmap
from blockgraph.drivers.qcow2.bitmaps import Qcow2Bitmaps
from blockgraph.drivers.qcow2.header import (
    COMPRESSION_TYPE_NAMES,
    HEADER_OFFSET_AUTOCLEAR,
    HEADER_OFFSET_INCOMPAT,
    QCOW2_AUTOCLEAR_BITMAPS,
    QCOW2_AUTOCLEAR_DATA_FILE_RAW,
    QCOW2_COMPAT_LAZY_REFCOUNTS,
    QCOW2_INCOMPAT_CORRUPT,
    QCOW2_INCOMPAT_DATA_FILE,
    QCOW2_INCOMPAT_DIRTY,
    QCOW_CRYPT_NONE,
    QCOW_MAGIC_BYTES,
    QcowHeader,
    parse_header,
)
from blockgraph.drivers.qcow2.inflight import MetadataLock
from blockgraph.drivers.qcow2.refcount import Refcounts
from blockgraph.drivers.qcow2.snapshot import Snapshot, read_snapshots
from blockgraph.drivers.qcow2.tables import (
    L1E_OFFSET_MASK,
    L1E_SIZE,
    L2E_OFFSET_MASK,
    L2E_SIZE_EXTENDED,
    L2E_SIZE_NORMAL,
    QCOW2_COMPRESSED_SECTOR_SIZE,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    REFT_OFFSET_MASK,
    REFTABLE_ENTRY_SIZE,
    SUBCLUSTERS_PER_CLUSTER,
    ClusterType,
    Qcow2Cache,
    cluster_type,
)
from blockgraph.errors import EINVAL, EIO, ENOMEDIUM, ENOTSUP, BlockError, IOFailure
from blockgraph.options.schema import OptionSpec, OptType, opt

if TYPE_CHECKING:
    # check, compress (zlib) and subcluster are imported where they are used: most opens need
    # none of them, and every tool start would pay for their import.
    from blockgraph.drivers.qcow2.check import CheckResult

log = logging.getLogger(__name__)

DEFAULT_L2_CACHE_MAX_SIZE = 32 * 1024 * 1024  # QEMU 7.2 on Linux
MIN_L2_CACHE_SIZE = 2  # clusters
MIN_REFCOUNT_CACHE_SIZE = 4  # clusters
MAX_CACHE_CLEAN_INTERVAL = (1 << 32) - 1

OVERLAP_CHECK_TEMPLATES = ("none", "constant", "cached", "all")
OVERLAP_CHECK_KINDS = (
    "main-header",
    "active-l1",
    "active-l2",
    "refcount-table",
    "refcount-block",
    "snapshot-table",
    "inactive-l1",
    "inactive-l2",
    "bitmap-directory",
)
# QEMU's QCOW2_OL_CONSTANT / _CACHED / _ALL.
_OL_CONSTANT = ("main-header", "active-l1", "refcount-table", "snapshot-table", "bitmap-directory")
_OL_CACHED = (*_OL_CONSTANT, "active-l2", "refcount-block", "inactive-l1")
OVERLAP_TEMPLATE_KINDS: dict[str, tuple[str, ...]] = {
    "none": (), "constant": _OL_CONSTANT, "cached": _OL_CACHED, "all": (*_OL_CACHED, "inactive-l2"),
}

# What qcow2 in QEMU 7.2 accepts at open (``qemu-io --image-opts`` rejects anything else).
QCOW2_RUNTIME_OPTIONS: dict[str, OptionSpec] = {
    "lazy-refcounts": opt(OptType.BOOL),
    "pass-discard-request": opt(OptType.BOOL),
    "pass-discard-snapshot": opt(OptType.BOOL),
    "pass-discard-other": opt(OptType.BOOL),
    "overlap-check": opt(OptType.STRING),
    "overlap-check.template": opt(OptType.STRING),
    **{f"overlap-check.{kind}": opt(OptType.BOOL) for kind in OVERLAP_CHECK_KINDS},
    "cache-size": opt(OptType.SIZE),
    "l2-cache-size": opt(OptType.SIZE),
    "l2-cache-entry-size": opt(OptType.SIZE),
    "refcount-cache-size": opt(OptType.SIZE),
    "cache-clean-interval": opt(OptType.NUMBER),
    "encrypt.format": opt(OptType.STRING),
    "encrypt.key-secret": opt(OptType.STRING),
}

_ZERO_CHUNK = bytes(1 << 20)
_L2_ENTRY = struct.Struct(">Q")

# Block status answers, combined once: IntFlag arithmetic runs in Python on every use.
_STATUS_DATA = BlockStatusFlags.DATA | BlockStatusFlags.OFFSET_VALID | BlockStatusFlags.ALLOCATED
_STATUS_ZERO_ALLOC = (
    BlockStatusFlags.ZERO | BlockStatusFlags.OFFSET_VALID | BlockStatusFlags.ALLOCATED
)
_STATUS_COMPRESSED = BlockStatusFlags.DATA | BlockStatusFlags.ALLOCATED
_STATUS_ZERO = BlockStatusFlags.ZERO | BlockStatusFlags.ALLOCATED
_STATUS_UNALLOCATED = BlockStatusFlags(0)
# An L2 entry with exactly QCOW_OFLAG_COPIED of these is a normal cluster with refcount 1.
_INPLACE_FLAGS = QCOW_OFLAG_COPIED | QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO
# Allocating writes with COW up to this size write head, data and tail in one request.
_MERGE_COW_MAX = 1 << 20


def _fill_zero(buf: memoryview) -> None:
    for pos in range(0, len(buf), len(_ZERO_CHUNK)):
        n = min(len(_ZERO_CHUNK), len(buf) - pos)
        buf[pos : pos + n] = _ZERO_CHUNK[:n]


def _hits(offset: int, end: int, start: int, size: int) -> bool:
    """Whether ``[offset, end)`` overlaps the ``size`` bytes at ``start``."""
    return size > 0 and start < end and offset < start + size


@dataclass
class _Seg:
    """One run of a mapped guest range that a single child request can serve."""

    kind: str  # "data" | "zero" | "backing" | "compressed"
    guest_offset: int
    length: int
    host_offset: int = 0  # data: host offset of guest_offset; compressed: the L2 entry


class Qcow2Driver(BlockDriver):
    """qcow2 v2/v3 images over a ``file`` child, with an optional ``backing`` child."""

    format_name = "qcow2"
    is_format = True
    supports_backing = True
    runtime_options: ClassVar[Mapping[str, OptionSpec]] = QCOW2_RUNTIME_OPTIONS
    supported_write_flags = RequestFlags.COMPRESSED

    request_alignment = 512

    def __init__(self) -> None:
        self.log = log
        self.file: ChildAccess | None = None
        self.backing: ChildAccess | None = None
        # The external data file (``data-file`` child): guest data lives there, at host offset
        # == guest offset, and only metadata in ``file``. ``external_data`` is the header's
        # incompatible bit; ``data_file`` stays None with it only when opened without I/O.
        self.data_file: ChildAccess | None = None
        self.external_data = False
        self.data_file_raw = False
        self.header = QcowHeader()
        self.options: dict[str, Any] = {}
        self.read_only = False
        self._pending_read_only = False
        # Overlap check: id(table) -> (copy of the table, its sorted metadata offsets).
        self._overlap_tables: dict[int, tuple[list[int], list[int]]] = {}
        self._overlap_kinds_cache: dict[tuple[str, str | None], frozenset[str]] = {}
        self._overlap_reftable: tuple[list[int], int, list[int]] | None = None
        # (key, copy of the L1 table, starts, ends): see _data_overlaps_metadata.
        self._overlap_index: tuple[tuple[Any, ...], list[int], list[int], list[int]] | None = None
        self._lock = MetadataLock()
        self.l1_table: list[int] = []
        self.lazy_refcounts = False
        self.discard_passthrough = {"request": False, "snapshot": True, "other": False}
        self.overlap_check = "cached"
        self.l2_cache_size = 0
        self.refcount_cache_size = 0
        self.l2_cache_entry_size = 0
        self.cache_clean_interval = 600
        self._pending_discards: list[tuple[int, int]] = []
        self._discard_type = "other"
        self._discard_unmap = False
        self._broken = False
        self._corruption_reported = False
        self.snapshots: list[Snapshot] = []
        self.snapshots_size = 0  # bytes of the snapshot table on disk
        # Shared with the node's request layer, which marks the enabled ones on every write.
        self.dirty_bitmaps: list[DirtyBitmap] = []
        self.persistent_bitmaps = Qcow2Bitmaps(self)

    # ------------------------------------------------------------------ probing and opening

    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        if len(header) >= 8 and header[:4] == QCOW_MAGIC_BYTES:
            version = struct.unpack_from(">I", header, 4)[0]
            if version >= 2:
                return 100
        return 0

    async def open(self, ctx: OpenContext, options: dict[str, Any]) -> None:
        file = await ctx.open_child("file", ChildRole.IMAGE)
        if file is None:  # pragma: no cover - the graph never returns None without allow_none
            raise BlockError("qcow2 needs a file child")
        self.file = file
        self.read_only = ctx.flags.read_only
        self._discard_unmap = ctx.flags.discard_unmap
        self.options = {k: v for k, v in options.items() if v is not None}

        cluster0 = bytearray(min(max(file.getlength(), 0), 1 << 21))
        if len(cluster0) < 72:
            raise BlockError("Image is not in qcow2 format")
        await file.preadv(0, memoryview(cluster0))
        h = parse_header(bytes(cluster0), file.getlength())
        self.header = h
        self._setup_geometry()

        if h.crypt_method != QCOW_CRYPT_NONE:
            raise BlockError("qcow2: encrypted images are not supported")
        enc_fmt = self.options.get("encrypt.format")
        if enc_fmt is not None:
            raise BlockError(
                f"No encryption in image header, but options specified format '{enc_fmt}'"
            )
        await self._open_data_file(ctx)
        checking = ctx.flags.check
        if h.incompatible_features & QCOW2_INCOMPAT_CORRUPT and not self.read_only and not checking:
            raise BlockError("qcow2: Image is corrupt; cannot be opened read/write")

        self._apply_options()

        # L1 table.
        if h.l1_size:
            raw = bytearray(h.l1_size * L1E_SIZE)
            await file.preadv(h.l1_table_offset, memoryview(raw))
            self.l1_table = list(struct.unpack(f">{h.l1_size}Q", raw))
        self.snapshots, self.snapshots_size = await read_snapshots(self)
        # Refcount table.
        nb_reftable = h.refcount_table_clusters * self.cluster_size // REFTABLE_ENTRY_SIZE
        raw = bytearray(nb_reftable * REFTABLE_ENTRY_SIZE)
        await file.preadv(h.refcount_table_offset, memoryview(raw))
        reftable = list(struct.unpack(f">{nb_reftable}Q", raw))

        self.l2_cache = Qcow2Cache(
            "l2", file, self.cluster_size, self.l2_cache_size // self.cluster_size
        )
        self.refcount_cache = Qcow2Cache(
            "refcount", file, self.cluster_size,
            max(MIN_REFCOUNT_CACHE_SIZE, self.refcount_cache_size // self.cluster_size),
        )
        self.refcounts = Refcounts(
            file, self.refcount_cache, self.cluster_bits, h.refcount_order,
            h.refcount_table_offset, reftable,
        )
        self.refcounts.l2_cache = self.l2_cache
        self.l2_cache.data_file = self.data_file
        self.refcounts.on_free = self._on_free
        self.l2_cache.pre_write = lambda o, n: self._overlap_check(o, n, "active-l2")
        self.refcount_cache.pre_write = lambda o, n: self._overlap_check(o, n, "refcount-block")

        await self.persistent_bitmaps.load()
        if not self.read_only:
            # Autoclear bits this implementation does not maintain must go before any write:
            # that tells other readers that e.g. unknown extensions may be stale now. The
            # bitmaps bit stays: the bitmaps are kept consistent (in_use while open).
            keep = h.autoclear_features & (QCOW2_AUTOCLEAR_DATA_FILE_RAW | QCOW2_AUTOCLEAR_BITMAPS)
            if h.version >= 3 and h.autoclear_features != keep:
                h.autoclear_features = keep
                await file.pwritev(HEADER_OFFSET_AUTOCLEAR, memoryview(struct.pack(">Q", keep)))
                await file.flush()
            if h.incompatible_features & QCOW2_INCOMPAT_DIRTY and not checking:
                await self._repair_dirty()
            if not checking:
                await self.persistent_bitmaps.mark_in_use()

        if h.backing_file is not None or ctx.has_child_options("backing"):
            if not ctx.flags.no_backing:
                filename = None
                if h.backing_file is not None:
                    filename = resolve_backing_filename(file.filename, h.backing_file)
                self.backing = await ctx.open_child(
                    "backing", ChildRole.COW, filename=filename, driver=h.backing_format,
                    allow_none=True,
                )

    async def _open_data_file(self, ctx: OpenContext) -> None:
        h = self.header
        self.external_data = bool(h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE)
        self.data_file_raw = bool(h.autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW)
        if ctx.flags.no_io:
            # qemu-img info never opens a data file (the image's or the user's): an untrusted
            # image can be inspected without touching the files it points at.
            ctx.drop_child_options("data-file")
            return
        given = ctx.has_child_options("data-file")
        if not self.external_data:
            if given:
                raise BlockError(
                    "'data-file' can only be set for images with an external data file")
            if self.data_file_raw:
                raise BlockError("data-file-raw requires a data file")
            return
        # The name is used as written, relative to the working directory: QEMU 7.2 does not
        # combine it with the image's directory (unlike backing file names).
        self.data_file = await ctx.open_child("data-file", ChildRole.DATA,
                                              filename=h.data_file or None, allow_none=True)
        if self.data_file is None:
            raise BlockError("'data-file' is required for this image")
        # No guest data in ``file`` now: QEMU's role bits say so (query-blockstats then
        # reports the data file as the node's "parent").
        ctx.set_child_role("file", ChildRole.PRIMARY | ChildRole.METADATA)

    def _setup_geometry(self) -> None:
        h = self.header
        self.cluster_bits = h.cluster_bits
        self.cluster_size = 1 << h.cluster_bits
        self.extended_l2 = h.extended_l2
        self.l2_entry_size = L2E_SIZE_EXTENDED if self.extended_l2 else L2E_SIZE_NORMAL
        self.l2_size = self.cluster_size // self.l2_entry_size
        self.l2_bits = self.l2_size.bit_length() - 1
        self.subcluster_size = self.cluster_size // (
            SUBCLUSTERS_PER_CLUSTER if self.extended_l2 else 1
        )
        self.csize_shift = 62 - (self.cluster_bits - 8)
        self.csize_mask = (1 << (self.cluster_bits - 8)) - 1
        self.cluster_offset_mask = (1 << self.csize_shift) - 1

    def _apply_options(self) -> None:
        o = self.options
        h = self.header
        cs = self.cluster_size

        lazy = o.get("lazy-refcounts", bool(h.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS))
        if lazy and h.version < 3:
            raise BlockError(
                "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
            )
        self.lazy_refcounts = bool(lazy)

        # Cache sizes, as read_cache_sizes() in QEMU.
        combined = o.get("cache-size")
        l2_size = o.get("l2-cache-size")
        rc_size = o.get("refcount-cache-size")
        if combined is not None and l2_size is not None and rc_size is not None:
            raise BlockError(
                "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"
            )
        max_l2_cache = -(-h.size // (self.l2_size * cs)) * cs
        min_rc = MIN_REFCOUNT_CACHE_SIZE * cs
        if combined is not None:
            if l2_size is not None:
                if l2_size > combined:
                    raise BlockError("l2-cache-size may not exceed cache-size")
                rc_size = combined - l2_size
            elif rc_size is not None:
                if rc_size > combined:
                    raise BlockError("refcount-cache-size may not exceed cache-size")
                l2_size = combined - rc_size
            else:
                l2_size = min(max_l2_cache, max(combined - min_rc, 0))
                rc_size = combined - l2_size
        else:
            if l2_size is None:
                l2_size = min(max_l2_cache, DEFAULT_L2_CACHE_MAX_SIZE)
            if rc_size is None:
                rc_size = min_rc
        self.l2_cache_size = max(l2_size, MIN_L2_CACHE_SIZE * cs)
        self.refcount_cache_size = max(rc_size, min_rc)

        entry = o.get("l2-cache-entry-size", cs)
        if entry < 512 or entry > cs or entry & (entry - 1):
            raise BlockError(
                f"L2 cache entry size must be a power of two between 512 and the cluster size ({cs})"
            )
        self.l2_cache_entry_size = entry

        interval = o.get("cache-clean-interval", 600)
        if interval < 0 or interval > MAX_CACHE_CLEAN_INTERVAL:
            raise BlockError("Cache clean interval too big")
        self.cache_clean_interval = interval

        template = o.get("overlap-check.template")
        main = o.get("overlap-check")
        if main is not None and template is not None and main != template:
            raise BlockError(
                f"Conflicting values for qcow2 options 'overlap-check' ('{main}') and "
                f"'overlap-check.template' ('{template}')"
            )
        value = main if main is not None else template
        if value is not None and value not in OVERLAP_CHECK_TEMPLATES:
            raise BlockError(
                f"Unsupported value '{value}' for qcow2 option 'overlap-check'. Allowed are any "
                "of the following: none, constant, cached, all"
            )
        self.overlap_check = value or "cached"

        self.discard_passthrough = {
            "request": bool(o.get("pass-discard-request", self._discard_unmap)),
            "snapshot": bool(o.get("pass-discard-snapshot", True)),
            "other": bool(o.get("pass-discard-other", False)),
        }

    # ------------------------------------------------------------------ resize and snapshots

    async def truncate(self, length: int, prealloc: PreallocMode = "off") -> None:
        """Grow or shrink the disk; ``prealloc`` is off, metadata, falloc or full."""
        from blockgraph.drivers.qcow2.resize import truncate

        await truncate(self, length, prealloc)

    async def snapshot_create(self, name: str, **kwargs: Any) -> Snapshot:
        from blockgraph.drivers.qcow2.snapshot import snapshot_create

        return await snapshot_create(self, name, **kwargs)

    async def snapshot_goto(self, id_or_name: str) -> None:
        from blockgraph.drivers.qcow2.snapshot import snapshot_goto

        await snapshot_goto(self, id_or_name)

    async def snapshot_delete(self, id_str: str | None, name: str | None) -> None:
        from blockgraph.drivers.qcow2.snapshot import snapshot_delete

        await snapshot_delete(self, id_str, name)

    def snapshot_list(self) -> list[Snapshot]:
        return list(self.snapshots)

    # ------------------------------------------------------------------ VM state and backing

    has_vmstate = True

    async def load_vmstate(self, pos: int, buf: memoryview) -> None:
        from blockgraph.drivers.qcow2.vmstate import load_vmstate

        await load_vmstate(self, pos, buf)

    async def save_vmstate(self, pos: int, buf: memoryview) -> None:
        from blockgraph.drivers.qcow2.vmstate import save_vmstate

        await save_vmstate(self, pos, buf)

    async def make_empty(self) -> None:
        from blockgraph.drivers.qcow2.backing import make_empty

        await make_empty(self)

    async def change_backing_file(self, backing_file: str | None, backing_format: str | None) -> None:
        from blockgraph.drivers.qcow2.backing import change_backing_file

        await change_backing_file(self, backing_file, backing_format)

    async def close(self) -> None:
        if self.file is None or self.read_only or self._broken or not hasattr(self, "refcounts"):
            return  # never opened far enough to have metadata caches, or unusable
        async with self._lock:
            await self.persistent_bitmaps.store()
            await self._write_caches()
            await self.file.flush()
            if self.data_file is not None:
                await self.data_file.flush()
            if self.header.incompatible_features & QCOW2_INCOMPAT_DIRTY:
                await self._set_incompat(self.header.incompatible_features & ~QCOW2_INCOMPAT_DIRTY)

    # ------------------------------------------------------------------ check and corruption

    async def check(self, fix: int = 0, res: CheckResult | None = None) -> CheckResult:
        """``qemu-img check`` (``fix``: :data:`~blockgraph.drivers.qcow2.check.FIX_LEAKS` /
        ``FIX_ERRORS``); the stderr lines QEMU prints are in the result's ``messages`` (in
        ``res``, if given, also when the check fails with :class:`IOFailure`)."""
        from blockgraph.drivers.qcow2.check import check_image

        async with self._lock:
            return await check_image(self, fix, res)

    async def _repair_dirty(self) -> None:
        """A dirty image (lazy refcounts, not closed cleanly) is repaired at read-write open;
        QEMU prints the check's lines on stderr meanwhile."""
        from blockgraph.drivers.qcow2.check import FIX_ALL, CheckResult, check_image

        res = CheckResult()
        try:
            await check_image(self, FIX_ALL, res)
        except IOFailure as exc:
            raise BlockError(f"Could not repair dirty image: {exc}") from exc
        finally:
            for line in res.messages:
                self.log.warning("%s", line)
        if res.check_errors:
            raise BlockError("Could not repair dirty image: Input/output error")

    def _overlap_kinds(self, ignore: str | None) -> frozenset[str]:
        """The metadata kinds checked, from the template and the per-kind options.

        Cached: this runs before every data and metadata write, and what it depends on
        (``options``, ``overlap_check``) only changes at open.
        """
        key = (self.overlap_check, ignore)
        cached = self._overlap_kinds_cache.get(key)
        if cached is not None:
            return cached
        enabled = set(OVERLAP_TEMPLATE_KINDS[self.overlap_check])
        for kind in OVERLAP_CHECK_KINDS:
            value = self.options.get(f"overlap-check.{kind}")
            if value is not None:
                (enabled.add if value else enabled.discard)(kind)
        enabled.discard(ignore or "")
        kinds = frozenset(enabled)
        self._overlap_kinds_cache[key] = kinds
        return kinds

    def _table_overlaps(self, entries: list[int], mask: int, offset: int, end: int) -> bool:
        # Per write this must not walk the table in Python: the sorted offsets are cached
        # and revalidated by a C-speed list comparison.
        cached = self._overlap_tables.get(id(entries))
        if cached is None or cached[0] != entries:
            cached = (list(entries), sorted({e & mask for e in entries if e & mask}))
            self._overlap_tables[id(entries)] = cached
        return self._offsets_overlap(cached[1], offset, end)

    def _refcount_blocks_overlap(self, offset: int, end: int) -> bool:
        # The refcount table has thousands of entries even for small images: its sorted block
        # offsets are revalidated by the table's version, not by comparing the table.
        # The cache holds the table itself, so a new table can never pass for it by id.
        table = self.refcounts.refcount_table
        version = self.refcounts.table_version
        cached = self._overlap_reftable
        if cached is None or cached[0] is not table or cached[1] != version:
            offsets = sorted({e & REFT_OFFSET_MASK for e in table if e & REFT_OFFSET_MASK})
            cached = (table, version, offsets)
            self._overlap_reftable = cached
        return self._offsets_overlap(cached[2], offset, end)

    def _offsets_overlap(self, offsets: list[int], offset: int, end: int) -> bool:
        """Whether a cluster starting at one of the sorted ``offsets`` meets [offset, end)."""
        i = bisect.bisect_left(offsets, offset - self.cluster_size + 1)
        return i < len(offsets) and offsets[i] < end

    def _overlap_index_key(self) -> tuple[Any, ...]:
        """Everything the overlap check reads apart from the L1 table's contents."""
        h = self.header
        rc = self.refcounts
        bitmaps = h.bitmaps
        return (
            self.overlap_check, h.l1_table_offset, h.l1_size, rc.refcount_table_offset,
            id(rc.refcount_table), rc.table_version, h.snapshots_offset, self.snapshots_size,
            tuple((sn.l1_table_offset, sn.l1_size) for sn in self.snapshots)
            if self.snapshots else (),
            (bitmaps.bitmap_directory_offset, bitmaps.bitmap_directory_size)
            if bitmaps is not None else None,
        )

    def _data_overlaps_metadata(self, offset: int, end: int) -> bool:
        """Whether ``[offset, end)`` meets any checked metadata (no ``ignore``).

        The check runs before every guest data write: one bisect in the union of the checked
        metadata ranges, rebuilt whenever anything it was built from changes (the L1 table
        compared as a list, at C speed, the rest by :meth:`_overlap_index_key`).
        """
        key = self._overlap_index_key()
        index = self._overlap_index
        if index is None or index[0] != key or index[1] != self.l1_table:
            index = self._build_overlap_index(key)
        starts = index[2]
        j = bisect.bisect_left(starts, end) - 1
        return j >= 0 and index[3][j] > offset

    def _build_overlap_index(
        self, key: tuple[Any, ...],
    ) -> tuple[tuple[Any, ...], list[int], list[int], list[int]]:
        enabled = self._overlap_kinds(None)
        cs = self.cluster_size
        h = self.header
        rc = self.refcounts
        ranges: list[tuple[int, int]] = []
        if "main-header" in enabled:
            ranges.append((0, cs))
        if "active-l1" in enabled:
            ranges.append((h.l1_table_offset, h.l1_size * L1E_SIZE))
        if "active-l2" in enabled:
            ranges += [(e & L1E_OFFSET_MASK, cs) for e in self.l1_table if e & L1E_OFFSET_MASK]
        if "refcount-table" in enabled:
            ranges.append((rc.refcount_table_offset, len(rc.refcount_table) * REFTABLE_ENTRY_SIZE))
        if "refcount-block" in enabled:
            ranges += [(e & REFT_OFFSET_MASK, cs) for e in rc.refcount_table
                       if e & REFT_OFFSET_MASK]
        if "snapshot-table" in enabled:
            ranges.append((h.snapshots_offset, self.snapshots_size))
        if "inactive-l1" in enabled:
            ranges += [(sn.l1_table_offset, sn.l1_size * L1E_SIZE) for sn in self.snapshots]
        if "bitmap-directory" in enabled and h.bitmaps is not None:
            ranges.append((h.bitmaps.bitmap_directory_offset, h.bitmaps.bitmap_directory_size))
        # The union as disjoint sorted ranges: the last one starting before a write's end is
        # the only one that can overlap it.
        starts: list[int] = []
        ends: list[int] = []
        for start, size in sorted(r for r in ranges if r[1] > 0):
            if ends and start <= ends[-1]:
                ends[-1] = max(ends[-1], start + size)
            else:
                starts.append(start)
                ends.append(start + size)
        index = (key, list(self.l1_table), starts, ends)
        self._overlap_index = index
        return index

    def overlapping_metadata(self, offset: int, length: int, ignore: str | None = None) -> str | None:
        """The first kind of metadata ``[offset, offset+length)`` overlaps (QEMU's order)."""
        if length <= 0 or self.overlap_check == "none" and not self.options:
            return None
        if ignore is None and not self._data_overlaps_metadata(offset, offset + length):
            return None
        enabled = self._overlap_kinds(ignore)
        end = offset + length
        h = self.header
        # One test per kind, in QEMU's order; written out rather than as a table of closures,
        # which cost more to build than the tests themselves.
        if "main-header" in enabled and _hits(offset, end, 0, self.cluster_size):
            return "main header"
        if "active-l1" in enabled and _hits(offset, end, h.l1_table_offset, h.l1_size * L1E_SIZE):
            return "active L1 table"
        if "active-l2" in enabled and self._table_overlaps(self.l1_table, L1E_OFFSET_MASK,
                                                           offset, end):
            return "active L2 table"
        refcounts = self.refcounts
        if "refcount-table" in enabled and _hits(
                offset, end, refcounts.refcount_table_offset,
                len(refcounts.refcount_table) * REFTABLE_ENTRY_SIZE):
            return "refcount table"
        if "refcount-block" in enabled and self._refcount_blocks_overlap(offset, end):
            return "refcount block"
        if "snapshot-table" in enabled and _hits(offset, end, h.snapshots_offset,
                                                 self.snapshots_size):
            return "snapshot table"
        if "inactive-l1" in enabled and self.snapshots and any(
                _hits(offset, end, sn.l1_table_offset, sn.l1_size * L1E_SIZE)
                for sn in self.snapshots):
            return "inactive L1 table"
        if "bitmap-directory" in enabled and h.bitmaps is not None and _hits(
                offset, end, h.bitmaps.bitmap_directory_offset, h.bitmaps.bitmap_directory_size):
            return "bitmap directory"
        return None

    async def _overlap_check(self, offset: int, length: int, ignore: str | None = None) -> None:
        """Refuse a write over metadata: mark the image corrupt and fail with EIO."""
        kind = self.overlapping_metadata(offset, length, ignore)
        if kind is None:
            return
        await self._signal_corruption(f"Preventing invalid write on metadata (overlaps with {kind})")
        raise IOFailure(EIO)

    async def _signal_corruption(self, what: str) -> None:
        """QEMU's ``qcow2_signal_corruption``: read-write, mark the image corrupt and make the
        node unusable; read-only, only report it (once)."""
        if self.read_only:
            if not self._corruption_reported:
                self._corruption_reported = True
                self.log.error("qcow2: Image is corrupt: %s; further non-fatal corruption events "
                               "will be suppressed", what)
            return
        if self._broken:
            return
        self.log.error("qcow2: Marking image as corrupt: %s; further corruption events will be "
                       "suppressed", what)
        self._broken = True
        try:
            await self._set_incompat(self.header.incompatible_features | QCOW2_INCOMPAT_CORRUPT)
        except IOFailure:
            pass

    def _check_usable(self) -> None:
        if self._broken:  # QEMU makes the node unusable after a fatal corruption
            raise IOFailure(ENOMEDIUM)

    # ------------------------------------------------------------------ small helpers

    @property
    def _file(self) -> ChildAccess:
        assert self.file is not None
        return self.file

    @property
    def _data(self) -> ChildAccess:
        """Where guest data clusters live: the external data file, else ``file``."""
        if self.external_data:
            if self.data_file is None:
                raise IOFailure(EIO)  # opened without I/O (qemu-img info)
            return self.data_file
        return self._file

    def _ctype(self, l2_entry: int) -> ClusterType:
        return cluster_type(l2_entry, self.external_data)

    async def _alloc_data(self, guest_offset: int, length: int) -> int:
        """Host offset for new data clusters at ``guest_offset`` (cluster aligned).

        In an external data file a cluster's place is its guest offset (QEMU does so with
        and without ``data_file_raw``) and nothing is refcounted.
        """
        if self.external_data:
            return guest_offset
        return await self.refcounts.alloc_clusters(length)

    def getlength(self) -> int:
        return self.header.size

    def reopen_prepare(self, options: dict[str, Any], flags: NodeFlags) -> None:
        self._pending_read_only = flags.read_only

    def reopen_commit(self) -> None:
        # The graph flushed this node before taking write access away, so nothing is cached.
        self.read_only = self._pending_read_only

    def reopen_abort(self) -> None:
        self._pending_read_only = self.read_only

    def set_backing(self, child: ChildAccess | None) -> None:
        self.backing = child

    def info(self) -> DriverInfo:
        h = self.header
        extra: dict[str, Any] = {
            "compat": "0.10" if h.version == 2 else "1.1",
            "cluster-size": self.cluster_size,
            "compression-type": COMPRESSION_TYPE_NAMES.get(h.compression_type, "zlib"),
            "refcount-bits": 1 << h.refcount_order,
            "corrupt": bool(h.incompatible_features & QCOW2_INCOMPAT_CORRUPT),
            "extended-l2": h.extended_l2,
        }
        if h.version >= 3:
            extra["lazy-refcounts"] = bool(h.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS)
        if self.external_data:
            if h.data_file:
                extra["data-file"] = h.data_file
            extra["data-file-raw"] = self.data_file_raw
        bitmaps = [b for b in self.dirty_bitmaps if b.persistent]
        if bitmaps:
            # QEMU reports the directory on disk: bitmaps stored there are in_use while the
            # image is open read-write.
            stored = self.persistent_bitmaps.stored if not self.read_only else {}
            extra["bitmaps"] = [{"flags": (["in-use"] if b.name in stored and not b.inconsistent
                                           else []) + b.info_flags(),
                                 "name": b.name, "granularity": b.granularity} for b in bitmaps]
        return DriverInfo(backing_file=h.backing_file, backing_format=h.backing_format,
                          encrypted=h.crypt_method != QCOW_CRYPT_NONE, extra=extra)

    def filename(self) -> str | None:
        # A qcow2 node is named after its file, when that has a plain name; the graph decides
        # separately whether a non-default backing node forces a json: description.
        name = self.file.filename if self.file is not None else None
        return None if not name or name.startswith("json:") else name

    def _on_free(self, offset: int, length: int) -> None:
        for ci in range(offset, offset + length, self.cluster_size):
            self.l2_cache.discard(ci)
        if self.discard_passthrough.get(self._discard_type, False):
            self._pending_discards.append((offset, length))

    async def _set_incompat(self, value: int) -> None:
        await self._file.pwritev(HEADER_OFFSET_INCOMPAT, memoryview(struct.pack(">Q", value)))
        await self._file.flush()
        self.header.incompatible_features = value

    async def _mark_dirty(self) -> None:
        """With lazy refcounts: the dirty bit reaches the disk before anything relying on it."""
        h = self.header
        if self.lazy_refcounts and not h.incompatible_features & QCOW2_INCOMPAT_DIRTY:
            await self._file.flush()
            await self._set_incompat(h.incompatible_features | QCOW2_INCOMPAT_DIRTY)

    async def _l2_depends_on_refcounts(self) -> None:
        if self.lazy_refcounts:
            await self._mark_dirty()
        elif self.l2_cache.depends is not self.refcount_cache or self.refcount_cache.depends:
            # (Already in place, as after every allocation but the first: nothing to do.)
            await self.l2_cache.set_dependency(self.refcount_cache)

    def _split(self, offset: int, length: int) -> tuple[int, int, int]:
        """(l1_index, l2_index, nb_clusters) for the part of the range inside one L2 table."""
        cluster = offset >> self.cluster_bits
        l2_index = cluster & (self.l2_size - 1)
        l1_index = cluster >> self.l2_bits
        last = (offset + length - 1) >> self.cluster_bits
        nb = min(last - cluster + 1, self.l2_size - l2_index)
        return l1_index, l2_index, nb

    async def _l2_entries(self, l1_index: int, l2_index: int, nb: int) -> list[tuple[int, int]]:
        """``nb`` (entry, bitmap) pairs from one L2 table; all zero where no table exists."""
        l2_offset = self.l1_table[l1_index] & L1E_OFFSET_MASK if l1_index < len(self.l1_table) else 0
        if not l2_offset:
            return [(0, 0)] * nb
        if l2_offset % self.cluster_size:
            await self._signal_corruption(
                f"L2 table offset {l2_offset:#x} unaligned (L1 index: {l1_index})")
            raise IOFailure(EIO)
        table = await self.l2_cache.get(l2_offset)
        if self.extended_l2:
            words = struct.unpack_from(f">{2 * nb}Q", table, l2_index * L2E_SIZE_EXTENDED)
            return list(zip(words[0::2], words[1::2], strict=True))
        return [(e, 0) for e in struct.unpack_from(f">{nb}Q", table, l2_index * L2E_SIZE_NORMAL)]

    async def _l2_std_entries(self, l1_index: int, l2_index: int, nb: int) -> tuple[int, ...]:
        """:meth:`_l2_entries` of a standard L2 table: the entries alone, as unpacked."""
        l2_offset = self.l1_table[l1_index] & L1E_OFFSET_MASK if l1_index < len(self.l1_table) else 0
        if l2_offset and not l2_offset & (self.cluster_size - 1):
            table = self.l2_cache.lookup(l2_offset) or await self.l2_cache.get(l2_offset)
            return struct.unpack_from(f">{nb}Q", table, l2_index * L2E_SIZE_NORMAL)
        return tuple(e for e, _ in await self._l2_entries(l1_index, l2_index, nb))

    def _compressed_range(self, l2_entry: int) -> tuple[int, int]:
        coffset = l2_entry & self.cluster_offset_mask
        nb_csectors = ((l2_entry >> self.csize_shift) & self.csize_mask) + 1
        csize = nb_csectors * QCOW2_COMPRESSED_SECTOR_SIZE - (coffset & 511)
        return coffset, csize

    # ------------------------------------------------------------------ mapping and reads

    def _segments(self, offset: int, length: int, entries: list[tuple[int, int]]) -> list[_Seg]:
        """Turn L2 entries into runs that each need one child request (merged when adjacent)."""
        segs: list[_Seg] = []
        cs = self.cluster_size
        end = offset + length
        cluster_start = offset & ~(cs - 1)
        # Unallocated space reads from the backing file, or as zeros without one.
        unalloc = "backing"
        for i, (entry, bitmap) in enumerate(entries):
            cstart = cluster_start + i * cs
            lo = max(cstart, offset)
            hi = min(cstart + cs, end)
            ctype = self._ctype(entry & ~QCOW_OFLAG_ZERO if self.extended_l2 else entry)
            if ctype is ClusterType.COMPRESSED:
                segs.append(_Seg("compressed", lo, hi - lo, entry))
                continue
            if self.extended_l2:
                self._ext_segments(segs, lo, hi, cstart, entry, bitmap, unalloc)
                continue
            if ctype is ClusterType.NORMAL:
                host = (entry & L2E_OFFSET_MASK) + (lo - cstart)
                self._append(segs, "data", lo, hi - lo, host)
            elif ctype is ClusterType.UNALLOCATED:
                self._append(segs, unalloc, lo, hi - lo, 0)
            elif ctype is ClusterType.ZERO_ALLOC:
                host = (entry & L2E_OFFSET_MASK) + (lo - cstart)
                self._append(segs, "zeroalloc", lo, hi - lo, host)
            else:
                self._append(segs, "zero", lo, hi - lo, 0)
        return segs

    def _ext_segments(self, segs: list[_Seg], lo: int, hi: int, cstart: int, entry: int,
                      bitmap: int, unalloc: str) -> None:
        sc = self.subcluster_size
        host_base = entry & L2E_OFFSET_MASK
        pos = lo
        while pos < hi:
            idx = (pos - cstart) // sc
            sc_end = min(cstart + (idx + 1) * sc, hi)
            if bitmap & (1 << idx):
                self._append(segs, "data", pos, sc_end - pos, host_base + (pos - cstart))
            elif bitmap & (1 << (32 + idx)):
                self._append(segs, "zero", pos, sc_end - pos, 0)
            else:
                self._append(segs, unalloc, pos, sc_end - pos, 0)
            pos = sc_end

    @staticmethod
    def _append(segs: list[_Seg], kind: str, guest: int, length: int, host: int) -> None:
        if segs:
            last = segs[-1]
            if last.kind == kind and last.guest_offset + last.length == guest and (
                kind not in ("data", "zeroalloc") or last.host_offset + last.length == host
            ):
                last.length += length
                return
        segs.append(_Seg(kind, guest, length, host))

    def _cached_l2_entry(self, offset: int, length: int) -> int | None:
        """The standard L2 entry mapping ``[offset, offset+length)`` when that range lies in one
        cluster and the entry can be had without waiting: metadata lock free, L2 table cached.

        None sends the caller down the general path. Nothing here awaits, so reading the entry
        without taking the lock is the same as taking it, reading and releasing it: no other
        coroutine runs in between (the general path holds the lock for just that).
        """
        if self._lock.locked():
            return None
        return self._l2_entry_if_cached(offset, length)

    def _l2_entry_if_cached(self, offset: int, length: int) -> int | None:
        """:meth:`_cached_l2_entry` for a caller that holds the metadata lock."""
        cs = self.cluster_size
        # Extended L2 and external data files (where data lives in another child and an
        # offset-0 entry can be a real cluster) take the general path.
        if self.extended_l2 or self.external_data or length <= 0 or (offset & (cs - 1)) + length > cs:
            return None
        cluster = offset >> self.cluster_bits
        l1_index = cluster >> self.l2_bits
        if l1_index >= len(self.l1_table):
            return 0  # no L2 table: unallocated, as _l2_entries says
        l2_offset = self.l1_table[l1_index] & L1E_OFFSET_MASK
        if not l2_offset:
            return 0
        if l2_offset & (cs - 1):
            return None  # the corruption the general path reports
        table = self.l2_cache.lookup(l2_offset)
        if table is None:
            return None
        entry: int = _L2_ENTRY.unpack_from(table, (cluster & (self.l2_size - 1)) * L2E_SIZE_NORMAL)[0]
        return entry

    async def preadv(self, offset: int, buf: memoryview, flags: RequestFlags) -> None:
        self._check_usable()
        total = len(buf)
        entry = self._cached_l2_entry(offset, total)
        if entry is not None and not entry & QCOW_OFLAG_COMPRESSED:
            # Fast path for a read inside one cluster (every 4 KiB read of an NBD client):
            # what _segments and _read_segment make of one normal, zero or unallocated entry
            # without a backing file, without building segments. Compressed clusters and
            # reads from a backing file take the general path.
            if entry & QCOW_OFLAG_ZERO:
                _fill_zero(buf)
                return
            if entry & L2E_OFFSET_MASK:
                host = (entry & L2E_OFFSET_MASK) + (offset & (self.cluster_size - 1))
                await self._file.preadv(host, buf)
                return
            if self.backing is None:
                _fill_zero(buf)  # unallocated without a backing file reads as zeroes
                return
        pos = 0
        while pos < total:
            cur = offset + pos
            l1_index, l2_index, nb = self._split(cur, total - pos)
            chunk = min(total - pos, ((cur >> self.cluster_bits) + nb) * self.cluster_size - cur)
            # Only the mapping needs the mutex: a write in flight maps its clusters only once
            # their data is written, so reads never wait for it.
            await self._lock.relock()
            try:
                entries = await self._l2_entries(l1_index, l2_index, nb)
            finally:
                self._lock.release()
            for seg in self._segments(cur, chunk, entries):
                start = seg.guest_offset - offset
                await self._read_segment(seg, buf[start : start + seg.length])
            pos += chunk

    async def _read_segment(self, seg: _Seg, view: memoryview) -> None:
        if seg.kind == "data":
            await self._data.preadv(seg.host_offset, view)
        elif seg.kind in ("zero", "zeroalloc"):
            _fill_zero(view)
        elif seg.kind == "backing":
            await self._read_backing(seg.guest_offset, view)
        else:
            data = await self._read_compressed(seg.host_offset)
            start = seg.guest_offset & (self.cluster_size - 1)
            view[:] = data[start : start + len(view)]

    async def _read_backing(self, offset: int, view: memoryview) -> None:
        backing = self.backing
        if backing is None:
            _fill_zero(view)
            return
        blen = backing.getlength()
        n = max(0, min(len(view), blen - offset))
        if n:
            await backing.preadv(offset, view[:n])
        if n < len(view):
            _fill_zero(view[n:])

    async def _read_compressed(self, l2_entry: int) -> bytes:
        coffset, csize = self._compressed_range(l2_entry)
        raw = bytearray(csize)
        await self._file.preadv(coffset, memoryview(raw))
        from blockgraph.drivers.qcow2.compress import decompress_cluster

        try:
            return decompress_cluster(self.header.compression_type, raw, self.cluster_size)
        except IOFailure as exc:
            self.log.debug("%s", exc)
            raise IOFailure(exc.errno) from exc  # QEMU reports only the errno

    # ------------------------------------------------------------------ allocation and writes

    async def _write_l1_entry(self, l1_index: int) -> None:
        data = struct.pack(">Q", self.l1_table[l1_index])
        await self._overlap_check(self.header.l1_table_offset + l1_index * L1E_SIZE, L1E_SIZE,
                                  "active-l1")
        await self._file.pwritev(self.header.l1_table_offset + l1_index * L1E_SIZE,
                                 memoryview(data))
        await self._file.flush()

    async def _get_l2_for_write(self, l1_index: int) -> int:
        """Return the offset of a writable (refcount 1) L2 table for ``l1_index``.

        Allocates a zeroed table, or copies a shared one (``l2_allocate``): refcount, then the
        table contents (write + sync), then the L1 entry (write + sync).
        """
        if l1_index >= len(self.l1_table):
            raise IOFailure(EIO, "qcow2: guest offset beyond the L1 table")
        l1_entry = self.l1_table[l1_index]
        old_offset = l1_entry & L1E_OFFSET_MASK
        if old_offset and l1_entry & QCOW_OFLAG_COPIED:
            return old_offset
        await self._l2_depends_on_refcounts()
        new_offset = await self.refcounts.alloc_clusters(self.cluster_size)
        await self.refcount_cache.flush()
        if old_offset:
            old = bytes(await self.l2_cache.get(old_offset))
            table = await self.l2_cache.get_empty(new_offset)
            table[:] = old
        else:
            await self.l2_cache.get_empty(new_offset)
        self.l2_cache.mark_dirty(new_offset)
        await self.l2_cache.flush()
        self.l1_table[l1_index] = new_offset | QCOW_OFLAG_COPIED
        await self._write_l1_entry(l1_index)
        if old_offset:
            await self.refcounts.free_clusters(old_offset, self.cluster_size)
        return new_offset

    async def _free_any_cluster(self, l2_entry: int) -> None:
        """Drop the reference an L2 entry held (normal, preallocated zero, or compressed)."""
        ctype = self._ctype(l2_entry & ~QCOW_OFLAG_ZERO if self.extended_l2 else l2_entry)
        if ctype is ClusterType.COMPRESSED:
            coffset, csize = self._compressed_range(l2_entry)
            await self.refcounts.free_clusters(coffset, csize)
        elif ctype in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
            if self.external_data:
                # Data clusters there are not refcounted: dropping one only passes the
                # discard on. Now, under the lock: the guest offset may be written next.
                if self.data_file is not None and self.discard_passthrough.get(
                        self._discard_type, False):
                    try:
                        await self.data_file.pdiscard(l2_entry & L2E_OFFSET_MASK,
                                                      self.cluster_size)
                    except IOFailure:
                        pass  # advisory
                return
            await self.refcounts.free_clusters(l2_entry & L2E_OFFSET_MASK, self.cluster_size)

    async def _read_old(self, cluster_offset: int, l2_entry: int, start: int, end: int) -> bytes:
        """Guest bytes ``[start, end)`` of one cluster as mapped by its old entry (for COW)."""
        out = bytearray(end - start)
        await self._read_old_into(memoryview(out), l2_entry, start)
        return bytes(out)

    async def _read_old_into(self, view: memoryview, l2_entry: int, start: int) -> None:
        """Read the guest bytes at ``start`` (inside one cluster, mapped by its old entry)
        into ``view``."""
        for seg in self._segments(start, len(view), [(l2_entry, 0)]):
            a = seg.guest_offset - start
            await self._read_segment(seg, view[a : a + seg.length])

    async def pwritev(self, offset: int, buf: memoryview, flags: RequestFlags) -> None:
        if self._broken:
            raise IOFailure(ENOMEDIUM)  # QEMU makes the node unusable after a fatal corruption
        if flags and flags & RequestFlags.COMPRESSED:
            await self._write_compressed(offset, buf)
            return
        lock = self._lock
        if not lock.locked():
            # Fast path: a write inside one cluster that is allocated with refcount 1 changes
            # no metadata; like QEMU it runs without the mutex. Nothing awaits between the
            # lookup and the in-place count, and every operation that could free or share the
            # cluster waits for that count (MetadataLock's barrier).
            entry = self._l2_entry_if_cached(offset, len(buf))
            if (entry is not None and entry & _INPLACE_FLAGS == QCOW_OFLAG_COPIED
                    and entry & L2E_OFFSET_MASK):
                host = entry & L2E_OFFSET_MASK
                if self.overlapping_metadata(host, self.cluster_size) is None:
                    lock.inplace += 1
                    try:
                        await self._file.pwritev(host + (offset & (self.cluster_size - 1)), buf)
                    finally:
                        lock.end_inplace()
                    return
        total = len(buf)
        pos = 0
        while pos < total:
            cur = offset + pos
            l1_index, l2_index, nb = self._split(cur, total - pos)
            chunk = min(total - pos, ((cur >> self.cluster_bits) + nb) * self.cluster_size - cur)
            if self.extended_l2:
                from blockgraph.drivers.qcow2.subcluster import write_slice_ext

                # Extended L2 writes keep the mutex throughout: no write of such an image
                # is ever in flight outside it.
                await lock.start_write()
                try:
                    self._discard_type = "other"
                    await write_slice_ext(self, cur, buf[pos : pos + chunk], l1_index,
                                          l2_index, nb)
                finally:
                    lock.release()
            else:
                await self._write_slice(cur, buf[pos : pos + chunk], l1_index, l2_index, nb)
            pos += chunk

    async def _write_compressed(self, offset: int, buf: memoryview) -> None:
        """``write -c``: whole clusters (or the disk's last, partial one), one at a time."""
        cs = self.cluster_size
        if self.external_data:
            raise IOFailure(ENOTSUP)  # a data file holds clusters at their guest offsets only
        if offset & (cs - 1):
            raise IOFailure(EINVAL, "qcow2: compressed writes must be cluster aligned")
        pos = 0
        while pos < len(buf):
            n = min(cs, len(buf) - pos)
            if n < cs and offset + pos + n != self.header.size:
                raise IOFailure(EINVAL, "qcow2: compressed writes must cover whole clusters")
            await self._write_compressed_cluster(offset + pos, buf[pos : pos + n])
            pos += n

    async def _write_compressed_cluster(self, offset: int, data: memoryview) -> None:
        cs = self.cluster_size
        padded = bytes(data) if len(data) == cs else bytes(data) + bytes(cs - len(data))
        # Compressing needs no lock; QEMU stores the cluster plainly when it would not shrink.
        from blockgraph.drivers.qcow2.compress import compress_cluster

        out = compress_cluster(self.header.compression_type, padded)
        if out is None:
            await self.pwritev(offset, data, RequestFlags.NONE)
            return
        async with self._lock:
            self._discard_type = "other"
            l1_index, l2_index, _ = self._split(offset, cs)
            [(entry, _bitmap)] = await self._l2_entries(l1_index, l2_index, 1)
            if entry & L2E_OFFSET_MASK:
                # As QEMU: compression never overwrites an allocated cluster.
                raise IOFailure(EIO)
            l2_offset = await self._get_l2_for_write(l1_index)
            host = await self.refcounts.alloc_bytes(len(out))
            nb_csectors = ((host + len(out) - 1) >> 9) - (host >> 9)
            new_entry = host | QCOW_OFLAG_COMPRESSED | (nb_csectors << self.csize_shift)
            await self._file.pwritev(host, memoryview(out))
            await self._l2_depends_on_refcounts()
            table = await self.l2_cache.get(l2_offset)
            if self.extended_l2:
                struct.pack_into(">QQ", table, l2_index * L2E_SIZE_EXTENDED, new_entry, 0)
            else:
                struct.pack_into(">Q", table, l2_index * L2E_SIZE_NORMAL, new_entry)
            self.l2_cache.mark_dirty(l2_offset)

    def _reads_as_zero(self, l2_entry: int) -> bool:
        """Whether a cluster mapped by ``l2_entry`` reads as zeros (standard entries)."""
        if l2_entry & QCOW_OFLAG_COMPRESSED:
            return False
        if l2_entry & QCOW_OFLAG_ZERO:
            return True  # ZERO_PLAIN or ZERO_ALLOC
        return self.backing is None and self._ctype(l2_entry) is ClusterType.UNALLOCATED

    async def _write_slice(self, offset: int, data: memoryview, l1_index: int, l2_index: int,
                           nb: int) -> None:
        """Write ``data`` at guest ``offset``: ``nb`` clusters inside one L2 table.

        QEMU's allocating write: under the mutex the clusters are mapped, an allocation is
        registered for them (a write overlapping one in flight waits for it first) and host
        clusters are allocated run by run; each run's data and COW are written without the
        mutex, then the mutex is taken again to set its L2 entries and drop the old references.
        """
        cs = self.cluster_size
        lock = self._lock
        first_cluster = offset >> self.cluster_bits
        await lock.start_write()
        held = True
        inflight = None
        try:
            while True:
                dep = lock.dependency(first_cluster, first_cluster + nb)
                if dep is None:
                    break
                lock.release()
                held = False
                await dep.wait()
                await lock.start_write()
                held = True
            self._discard_type = "other"
            entries = await self._l2_std_entries(l1_index, l2_index, nb)
            # Runs: [kind, first, count, host] with kind "inplace" / "reuse" / "new".
            runs: list[list[Any]] = []
            allocating = False
            for i, entry in enumerate(entries):
                host = entry & L2E_OFFSET_MASK
                flags_ = entry & _INPLACE_FLAGS
                if flags_ == QCOW_OFLAG_COPIED and (host or self.external_data):
                    kind = "inplace"
                elif flags_ == QCOW_OFLAG_COPIED | QCOW_OFLAG_ZERO and host:
                    kind = "reuse"  # a preallocated zero cluster, written in place
                else:
                    kind, host = "new", 0
                if kind != "inplace":
                    allocating = True
                if runs:
                    last = runs[-1]
                    if last[0] == kind and (kind == "new" or last[3] + last[2] * cs == host):
                        last[2] += 1
                        continue
                runs.append([kind, i, 1, host])
            if not allocating and len(runs) == 1:
                # Nothing to allocate: the in-place count keeps barriers off it, as in the
                # fast path of pwritev.
                host = runs[0][3]
                if not self.external_data:
                    await self._overlap_check(host, nb * cs)
                lock.inplace += 1
                lock.release()
                held = False
                try:
                    await self._data.pwritev(host + (offset & (cs - 1)), data)
                finally:
                    lock.end_inplace()
                return
            if allocating:
                await self._get_l2_for_write(l1_index)
            inflight = lock.register(first_cluster, first_cluster + nb)
            cluster_base = first_cluster << self.cluster_bits
            end = offset + len(data)
            for kind, first, count, host in runs:
                run_start = cluster_base + first * cs
                run_end = run_start + count * cs
                lo = max(run_start, offset)
                hi = min(run_end, end)
                piece = data[lo - offset : hi - offset]
                if not held:
                    await lock.relock()
                    held = True
                if kind == "new":
                    host = await self._alloc_data(run_start, count * cs)
                if not self.external_data and self.overlapping_metadata(host, count * cs):
                    try:
                        await self._overlap_check(host, count * cs)
                    except IOFailure:
                        if kind == "new":
                            await self.refcounts.free_clusters(host, count * cs)
                        raise
                lock.release()
                held = False
                try:
                    cow = await self._write_run_data(kind, host, run_start, run_end, lo, hi,
                                                     piece, entries, first, count)
                except BaseException:
                    if kind == "new" and not self.external_data:
                        # Never mapped: give the clusters back (a leak at worst on a crash).
                        await lock.relock()
                        held = True
                        await self.refcounts.free_clusters(host, count * cs)
                    raise
                if kind == "inplace":
                    continue
                await lock.relock()
                held = True
                await self._link_run(l1_index, l2_index + first, count, host, cow,
                                     kind == "new")
        finally:
            if inflight is not None:
                lock.finish(inflight)
            if held:
                lock.release()

    async def _write_run_data(self, kind: str, host: int, run_start: int, run_end: int,
                              lo: int, hi: int, piece: memoryview, entries: tuple[int, ...],
                              first: int, count: int) -> bool:
        """Write one run's data (and COW unless in place); return whether COW happened."""
        cs = self.cluster_size
        data_child = self._data
        if kind == "inplace":
            await data_child.pwritev(host + (lo - run_start), piece)
            return False
        cow = lo > run_start or hi < run_end
        if cow and count * cs <= _MERGE_COW_MAX:
            # QEMU's merge_cow: the COW head, the new data and the COW tail of a small run go
            # out in one write (one syscall instead of three). Ordering is the same: all of it
            # lands before the L2 entry. The buffer starts zeroed, so COW regions that read as
            # zeros (no backing file, zero clusters) need no read.
            merged = memoryview(bytearray(run_end - run_start))
            if lo > run_start and not self._reads_as_zero(entries[first]):
                await self._read_old_into(merged[: lo - run_start], entries[first], run_start)
            merged[lo - run_start : hi - run_start] = piece
            if hi < run_end and not self._reads_as_zero(entries[first + count - 1]):
                await self._read_old_into(merged[hi - run_start :], entries[first + count - 1],
                                          hi)
            await data_child.pwritev(host, merged)
        else:
            if lo > run_start:
                head = await self._read_old(run_start, entries[first], run_start, lo)
                await data_child.pwritev(host, memoryview(head))
            await data_child.pwritev(host + (lo - run_start), piece)
            if hi < run_end:
                tail = await self._read_old(run_end - cs, entries[first + count - 1], hi, run_end)
                await data_child.pwritev(host + (hi - run_start), memoryview(tail))
        return cow

    async def _link_run(self, l1_index: int, l2_index: int, count: int, host: int, cow: bool,
                        new: bool) -> None:
        """Map ``count`` clusters at ``l2_index`` to the written ``host`` clusters (QEMU's
        ``qcow2_alloc_cluster_link_l2``), then drop the references the old entries held."""
        cs = self.cluster_size
        if cow or self.external_data:
            self.l2_cache.set_depends_on_flush()
        if (self.lazy_refcounts or self.l2_cache.depends is not self.refcount_cache
                or self.refcount_cache.depends):
            await self._l2_depends_on_refcounts()
        # The L2 table is looked up again: it may have been evicted while the data was written.
        l1_entry = self.l1_table[l1_index]
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if not (l2_offset and l1_entry & QCOW_OFLAG_COPIED):
            l2_offset = await self._get_l2_for_write(l1_index)
        table = self.l2_cache.lookup(l2_offset) or await self.l2_cache.get(l2_offset)
        pos = l2_index * L2E_SIZE_NORMAL
        # The entries as they are now: the references to drop are the ones held at linking.
        old = struct.unpack_from(f">{count}Q", table, pos)
        struct.pack_into(f">{count}Q", table, pos,
                         *[(host + k * cs) | QCOW_OFLAG_COPIED for k in range(count)])
        self.l2_cache.mark_dirty(l2_offset)
        if new and not self.external_data:
            # (In a data file the new cluster is the old one's place, guest offset == host
            # offset: "freeing" it would discard the data just written.)
            for entry in old:
                if entry:
                    await self._free_any_cluster(entry)

    async def _is_zero(self, offset: int, length: int) -> bool:
        """Whether ``[offset, offset+length)`` already reads as zeros, from metadata alone."""
        end = min(offset + length, self.header.size)
        pos = offset
        while pos < end:
            l1_index, l2_index, nb = self._split(pos, end - pos)
            chunk = min(end - pos, ((pos >> self.cluster_bits) + nb) * self.cluster_size - pos)
            for seg in self._segments(pos, chunk, await self._l2_entries(l1_index, l2_index, nb)):
                if seg.kind in ("zero", "zeroalloc"):
                    continue
                if seg.kind == "backing" and (
                    self.backing is None or seg.guest_offset >= self.backing.getlength()
                ):
                    continue
                return False
            pos += chunk
        return True

    async def pwrite_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        self._check_usable()
        cs = self.cluster_size
        async with self._lock:
            head = offset & (cs - 1)
            end = offset + length
            tail_end = min(-(-end // cs) * cs, -(-self.header.size // cs) * cs)
            start = offset - head
            if head and not await self._is_zero(start, head):
                raise IOFailure(ENOTSUP)
            if end < tail_end and end < self.header.size and not await self._is_zero(
                end, tail_end - end
            ):
                raise IOFailure(ENOTSUP)
            if self.data_file_raw and self.data_file is not None:
                # The data file must stay a valid raw image of the disk: zero it there first,
                # before the L2 entries say so.
                await self.data_file.pwrite_zeroes(
                    start, min(tail_end, self.header.size) - start,
                    flags & RequestFlags.MAY_UNMAP)
            if self.header.version < 3 or self.extended_l2:
                # No zero flag: fine only if it reads as zeros already.
                if await self._is_zero(start, tail_end - start):
                    return
                raise IOFailure(ENOTSUP)
            self._discard_type = "request"
            try:
                pos = start
                while pos < tail_end:
                    l1_index, l2_index, nb = self._split(pos, tail_end - pos)
                    await self._zero_slice(l1_index, l2_index, nb, flags)
                    pos += nb * cs
                if self._pending_discards:
                    await self._write_caches()  # see pdiscard: before the clusters are reused
            finally:
                self._discard_type = "other"

    async def _zero_slice(self, l1_index: int, l2_index: int, nb: int,
                          flags: RequestFlags) -> None:
        entries = [e for e, _ in await self._l2_entries(l1_index, l2_index, nb)]
        new_entries: list[int] = []
        for entry in entries:
            ctype = self._ctype(entry)
            unmap = ctype is ClusterType.COMPRESSED or (
                bool(flags & RequestFlags.MAY_UNMAP)
                and ctype in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC)
            )
            new_entries.append((0 if unmap else entry) | QCOW_OFLAG_ZERO)
        if new_entries == entries:
            return
        l2_offset = await self._get_l2_for_write(l1_index)
        await self._update_entries(l2_offset, l2_index, entries, new_entries)

    async def _update_entries(self, l2_offset: int, l2_index: int, old: list[int],
                              new: list[int]) -> None:
        """Write new L2 entries, then drop the references the replaced ones held."""
        table = await self.l2_cache.get(l2_offset)
        struct.pack_into(f">{len(new)}Q", table, l2_index * L2E_SIZE_NORMAL, *new)
        self.l2_cache.mark_dirty(l2_offset)
        keeps = (ClusterType.NORMAL, ClusterType.ZERO_ALLOC)

        def holds(entry: int) -> bool:
            # In a data file, bit 63 marks host offset 0 as held even on a zero entry.
            return self._ctype(entry) in keeps or (
                self.external_data and bool(entry & QCOW_OFLAG_COPIED))

        for o, n in zip(old, new, strict=True):
            if o == n:
                continue
            same_cluster = (
                holds(o) and holds(n) and (o & L2E_OFFSET_MASK) == (n & L2E_OFFSET_MASK)
            )
            if not same_cluster:
                await self._free_any_cluster(o)

    async def pdiscard(self, offset: int, length: int) -> None:
        if self.read_only:
            return
        cs = self.cluster_size
        start = -(-offset // cs) * cs
        end = (offset + length) // cs * cs
        if offset + length >= self.header.size:
            end = max(end, -(-self.header.size // cs) * cs)  # the partial last cluster
        if end <= start:
            return
        async with self._lock:
            self._discard_type = "request"
            try:
                pos = start
                while pos < end:
                    l1_index, l2_index, nb = self._split(pos, end - pos)
                    await self._discard_slice(l1_index, l2_index, nb)
                    pos += nb * cs
                if self._pending_discards:
                    # Pass the discards down now, while the lock keeps the freed clusters from
                    # being reused: punching a hole later could hit new data in a reused cluster.
                    await self._write_caches()
            finally:
                self._discard_type = "other"

    async def _discard_slice(self, l1_index: int, l2_index: int, nb: int) -> None:
        if self.extended_l2:
            from blockgraph.drivers.qcow2.subcluster import discard_slice_ext

            await discard_slice_ext(self, l1_index, l2_index, nb)
            return
        entries = [e for e, _ in await self._l2_entries(l1_index, l2_index, nb)]
        has_backing = self.backing is not None
        zero = QCOW_OFLAG_ZERO if self.header.version >= 3 else 0
        new_entries = []
        for entry in entries:
            ctype = self._ctype(entry)
            allocated = ctype in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC,
                                  ClusterType.COMPRESSED)
            # With a backing file a zero entry keeps the backing data hidden.
            new_entries.append(zero if has_backing or allocated else 0)
        if not any(new_entries) and not any(entries):
            return
        if new_entries == entries:
            return
        l2_offset = await self._get_l2_for_write(l1_index)
        await self._update_entries(l2_offset, l2_index, entries, new_entries)

    # ------------------------------------------------------------------ flush and status

    async def _write_caches(self) -> None:
        # L2 tables first: their dependency writes the refcount blocks (and syncs) before them.
        await self.l2_cache.write()
        await self.refcount_cache.write()
        if self._pending_discards:
            await self._file.flush()
            pending, self._pending_discards = self._pending_discards, []
            for off, length in pending:
                try:
                    await self._file.pdiscard(off, length)
                except IOFailure:
                    pass  # advisory

    async def flush_to_os(self) -> None:
        if self.file is None or self.read_only:
            return
        lock = self._lock
        if (not self.l2_cache.dirty and not self.refcount_cache.dirty
                and not self._pending_discards and not lock.locked()):
            # Nothing to write (a writethrough client rewriting allocated clusters flushes
            # after every write): what the locked path below would do, minus the lock. A
            # table leaves ``dirty`` only once written, so clean caches mean that no other
            # flush still has metadata on its way.
            return
        # Writes in flight are not waited for: flush covers completed writes, and an allocation
        # in flight has only its refcount in the caches (a leak at worst after a crash).
        await lock.relock()
        try:
            await self._write_caches()
        finally:
            lock.release()

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        entry = self._cached_l2_entry(offset, length)
        if entry is not None:
            # A query inside one cluster (an NBD read asks one per request): the answer of the
            # general path below for a single entry, without building segments.
            in_cluster = offset & (self.cluster_size - 1)
            ctype = cluster_type(entry)
            if ctype is ClusterType.NORMAL:
                return BlockStatus(_STATUS_DATA, length, (entry & L2E_OFFSET_MASK) + in_cluster,
                                   self.file)
            if ctype is ClusterType.ZERO_ALLOC:
                return BlockStatus(_STATUS_ZERO_ALLOC, length,
                                   (entry & L2E_OFFSET_MASK) + in_cluster, self.file)
            if ctype is ClusterType.COMPRESSED:
                return BlockStatus(_STATUS_COMPRESSED, length)
            if ctype is ClusterType.ZERO_PLAIN:
                return BlockStatus(_STATUS_ZERO, length)
            return BlockStatus(_STATUS_UNALLOCATED, length)
        l1_index, l2_index, nb = self._split(offset, length)
        chunk = min(length, ((offset >> self.cluster_bits) + nb) * self.cluster_size - offset)
        await self._lock.relock()
        try:
            entries = await self._l2_entries(l1_index, l2_index, nb)
        finally:
            self._lock.release()
        # Only the first run is answered: classify a growing prefix of the table until that run
        # ends inside it, rather than the whole table on every call.
        probe = min(nb, 64)
        while True:
            part = min(chunk, probe * self.cluster_size - (offset & (self.cluster_size - 1)))
            segs = self._segments(offset, part, entries[:probe])
            first = segs[0]
            n = first.length
            # "data"/"zeroalloc" runs are already merged where host offsets are contiguous.
            for seg in segs[1:]:
                if seg.kind != first.kind or seg.kind in ("data", "zeroalloc"):
                    break
                n += seg.length
            if n < part or probe == nb:
                break
            probe = min(nb, probe * 8)
        # QEMU only looks below qcow2 for zeroes when it detects metadata preallocation from
        # the refcounts of ``file``; data file clusters are not refcounted, so it never does.
        recurse = not self.external_data
        if first.kind == "data":
            return BlockStatus(_STATUS_DATA, n, first.host_offset, self._data, recurse)
        if first.kind == "zeroalloc":
            return BlockStatus(_STATUS_ZERO_ALLOC, n, first.host_offset, self._data, recurse)
        if first.kind == "compressed":
            return BlockStatus(_STATUS_COMPRESSED, n)
        if first.kind == "zero":
            return BlockStatus(_STATUS_ZERO, n)
        return BlockStatus(_STATUS_UNALLOCATED, n)

    async def preallocate_metadata(self, offset: int, length: int) -> None:
        """``preallocation=metadata``: L2 tables and data clusters allocated, data untouched.

        Per L2 table, as QEMU does: the table first, then its data clusters in one run; the
        file is then extended to cover the last cluster, so reads never go past its end.
        """
        cs = self.cluster_size
        end = -(-(offset + length) // cs) * cs
        pos = offset & ~(cs - 1)
        last_end = 0
        async with self._lock:
            while pos < end:
                l1_index, l2_index, nb = self._split(pos, end - pos)
                l2_offset = await self._get_l2_for_write(l1_index)
                host = await self._alloc_data(pos, nb * cs)
                await self._l2_depends_on_refcounts()
                table = await self.l2_cache.get(l2_offset)
                if self.extended_l2:
                    words: list[int] = []
                    for k in range(nb):
                        words += [(host + k * cs) | QCOW_OFLAG_COPIED, 0]
                    struct.pack_into(f">{2 * nb}Q", table, l2_index * L2E_SIZE_EXTENDED, *words)
                else:
                    struct.pack_into(f">{nb}Q", table, l2_index * L2E_SIZE_NORMAL,
                                     *[(host + k * cs) | QCOW_OFLAG_COPIED for k in range(nb)])
                self.l2_cache.mark_dirty(l2_offset)
                last_end = max(last_end, host + nb * cs)
                pos += nb * cs
            await self._write_caches()
            if last_end > self._data.getlength():
                await self._data.truncate(last_end)
