"""``img convert``: copy one or more images (concatenated) into a new or existing target.

The source is walked by block status in runs; data runs are read into one 2 MiB buffer and
split into zero and data runs by C-speed searches (``-S``, default 4 KiB): zero runs are
skipped on a zero-initialised target, written as zeroes otherwise, data runs are written in
one request each. With ``-c`` whole clusters go to the target with the COMPRESSED flag.

Options around the copy: ``--salvage`` turns unreadable sectors into zeroes (and sectors whose
block status fails into data), warning for each; ``--bitmaps`` copies the persistent bitmaps
once the data is written; ``-r`` throttles the target's writes. The copy runs in order, one
request at a time, so ``-m`` and ``-W`` are validated only, and ``-C`` (copy offloading)
copies through the same loop. Option errors come in qemu-img's order: everything that can be
checked without the images is checked before a source is opened.
"""

from __future__ import annotations

import getopt
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from blockgraph.drivers.base import RequestFlags
from blockgraph.drivers.bitmap import DirtyBitmap
from blockgraph.drivers.qcow2.bitmaps import Qcow2Bitmaps
from blockgraph.drivers.registry import get_driver
from blockgraph.errors import BlockError, IOFailure, OptionError
from blockgraph.graph.create import create_image
from blockgraph.graph.layer import BlockLayer
from blockgraph.graph.node import BlockBackend, Node
from blockgraph.objects.throttle import ThrottleLimits
from blockgraph.options.keyval import parse_drive_opts
from blockgraph.options.schema import parse_size
from blockgraph.tools.img.common import (
    IO_BUF_SIZE,
    SECTOR_SIZE,
    ChainStatus,
    F,
    Fail,
    Progress,
    chain_status,
    is_zero,
    new_layer,
    open_image,
    root,
    size_arg,
    typed_create_option,
    warn,
    zero_runs,
)

_MAX_SPARSE = 16 << 20  # qemu-img's largest -S (32768 sectors)
_SPARSE_ERROR = ("Invalid buffer size for sparse output specified. Valid sizes are multiples of "
                 "512 up to 16777216. Select 0 to disable sparse detection (fully allocates "
                 "output).")
_COROUTINES_ERROR = "Invalid number of coroutines. Allowed number of coroutines is between 1 and 16"
_MAX_COROUTINES = 16
_RATE_ERROR = ("Invalid rate limit specified. You may use k, M, G, T, P or E suffixes for\n"
               "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
_KNOWN_FORMATS = ("raw", "qcow2", "file")
_CREATE_OPTIONS = {
    "raw": ("preallocation",),
    "file": ("preallocation",),
    "qcow2": ("backing_file", "backing_fmt", "cluster_size", "compat", "lazy_refcounts",
              "refcount_bits", "extended_l2", "compression_type", "preallocation", "data_file",
              "data_file_raw"),
}


@dataclass
class _Source:
    bb: BlockBackend
    filename: str
    size: int


class _Converter:
    """One conversion: sources, target and the copy loop."""

    def __init__(self, layer: BlockLayer, sources: list[_Source], target: BlockBackend,
                 *, min_sparse: int, compress: bool, zero_init: bool, target_has_backing: bool,
                 progress: Progress, salvage: bool = False,
                 warn: Callable[[str], None] | None = None) -> None:
        self.layer = layer
        # --salvage: read errors become zeroes (and block status errors data) with a warning.
        self.salvage = salvage
        self.warn = warn or (lambda text: None)
        self.sources = sources
        self.target = target
        self.min_sparse = min_sparse
        self.compress = compress
        self.zero_init = zero_init
        self.target_has_backing = target_has_backing
        self.progress = progress
        self.buf = bytearray(IO_BUF_SIZE)
        self.view = memoryview(self.buf)
        info = root(target).driver.info().extra
        self.cluster_size = int(info.get("cluster-size", 65536)) if compress else 0
        self.total_work = 0
        self.work_done = 0

    def _base(self, node: Node) -> Node | None:
        # With a target backing file only what the source's top layer holds is copied.
        return node.backing if self.target_has_backing else None

    async def _runs(self, src: _Source) -> list[tuple[str, int, int]]:
        """(kind, offset, length) runs of a source; kind is data / zero / backing."""
        node = root(src.bb)
        base = self._base(node)
        runs: list[tuple[str, int, int]] = []
        pos = 0
        # A salvaging run asks in buffer-sized pieces as qemu-img does, so that a bad sector
        # costs single-sector retries only within its own piece.
        limit = IO_BUF_SIZE if self.salvage else 1 << 30
        while pos < src.size:
            st = await self._status(node, pos, min(src.size - pos, limit), base)
            if st is None:
                # Unknown status, salvaged: one sector copied as data, asked again when copied.
                kind = "salvaged"
                n = min(SECTOR_SIZE, src.size - pos)
                runs.append((kind, pos, n))
                pos += n
                continue
            if st.flags & F.ZERO:
                kind = "zero"
            elif st.flags & F.DATA:
                kind = "data"
            elif self.target_has_backing:
                kind = "backing"
            else:
                kind = "zero"
            if runs and runs[-1][0] == kind != "salvaged":
                k, o, n = runs[-1]
                runs[-1] = (k, o, n + st.length)
            else:
                runs.append((kind, pos, st.length))
            pos += st.length
        return runs

    async def _status(self, node: Node, offset: int, length: int,
                      base: Node | None) -> ChainStatus | None:
        """Block status for the copy plan; None when salvaging a sector whose status fails.

        :raise Fail: qemu-img's error when the status cannot be read (and not salvaged).
        """
        try:
            return await chain_status(node, offset, length, base)
        except IOFailure as exc:
            if not self.salvage:
                raise Fail(f"error while reading block status at offset {offset}: "
                           f"{os.strerror(exc.errno)}") from None
        # qemu-img retries a failed query for one sector before it gives up on it.
        try:
            return await chain_status(node, offset, min(SECTOR_SIZE, length), base)
        except IOFailure as exc:
            self.warn(f"error while reading block status at offset {offset}: "
                      f"{os.strerror(exc.errno)}")
            return None

    async def run(self) -> None:
        plans = [await self._runs(src) for src in self.sources]
        for plan in plans:
            for kind, _off, length in plan:
                if kind in ("data", "salvaged") or (kind == "zero" and self.min_sparse == 0):
                    self.total_work += length
        self.progress.update(0, 100)
        target_pos = 0
        for src, plan in zip(self.sources, plans, strict=True):
            for kind, off, length in plan:
                if kind == "salvaged":
                    # qemu-img's copy pass asks for the status again (its first pass only
                    # counted), and warns again if it still fails.
                    await self._status(root(src.bb), off, length, self._base(root(src.bb)))
                    await self._copy_data(src, off, length, target_pos + off)
                elif kind == "data":
                    await self._copy_data(src, off, length, target_pos + off)
                elif kind == "zero":
                    await self._zero(target_pos + off, length)
            target_pos += src.size
        self.progress.update(100, 0)

    def _advance(self, n: int) -> None:
        self.work_done += n
        if self.total_work:
            self.progress.update(100.0 * self.work_done / self.total_work, 0)

    async def _zero(self, offset: int, length: int) -> None:
        if self.min_sparse == 0 and not self.compress:
            # -S 0: the target is fully allocated, zeroes are written as data.
            end = offset + length
            zeros = memoryview(bytes(min(length, IO_BUF_SIZE)))
            pos = offset
            while pos < end:
                n = min(len(zeros), end - pos)
                await self._write(pos, zeros[:n])
                pos += n
                self._advance(n)
            return
        if self.zero_init:
            return
        try:
            await self.target.pwrite_zeroes(offset, length, RequestFlags.MAY_UNMAP)
        except IOFailure as exc:
            raise Fail(f"error while writing at byte {offset}: {os.strerror(exc.errno)}") from None

    async def _read(self, src: _Source, offset: int, view: memoryview) -> None:
        try:
            await src.bb.preadv(offset, view)
        except IOFailure as exc:
            if not self.salvage:
                raise Fail(f"error while reading at byte {offset}: {os.strerror(exc.errno)}") from None
            await self._salvage_read(src, offset, view)

    async def _salvage_read(self, src: _Source, offset: int, view: memoryview) -> None:
        """Read ``view`` again sector by sector; sectors that still fail read as zeroes."""
        for start in range(0, len(view), SECTOR_SIZE):
            piece = view[start : start + SECTOR_SIZE]
            try:
                await src.bb.preadv(offset + start, piece)
            except IOFailure as exc:
                self.warn(f"error while reading offset {offset + start}: {os.strerror(exc.errno)}")
                piece[:] = bytes(len(piece))

    async def _write(self, offset: int, view: memoryview, flags: RequestFlags = RequestFlags.NONE) -> None:
        try:
            await self.target.pwritev(offset, view, flags)
        except IOFailure as exc:
            # Formats that cannot compress at all were refused before: here it is the image
            # (a qcow2 data file), and qemu-img reports the failed write.
            raise Fail(f"error while writing at byte {offset}: {os.strerror(exc.errno)}") from None

    async def _copy_data(self, src: _Source, offset: int, length: int, target_offset: int) -> None:
        if self.compress:
            await self._copy_compressed(src, offset, length, target_offset)
            return
        end = offset + length
        pos = offset
        while pos < end:
            # Chunks end on IO_BUF_SIZE boundaries so that later chunks stay aligned.
            n = min(end - pos, IO_BUF_SIZE - pos % IO_BUF_SIZE)
            view = self.view[:n]
            await self._read(src, pos, view)
            shift = target_offset - offset
            if self.min_sparse == 0:
                await self._write(pos + shift, view)
            else:
                for zero, a, b in zero_runs(self.buf, pos + shift, 0, n, self.min_sparse):
                    if zero:
                        if not self.zero_init:
                            try:
                                await self.target.pwrite_zeroes(pos + shift + a, b - a,
                                                                RequestFlags.MAY_UNMAP)
                            except IOFailure as exc:
                                raise Fail(f"error while writing at byte {pos + shift + a}: "
                                           f"{os.strerror(exc.errno)}") from None
                    else:
                        await self._write(pos + shift + a, view[a:b])
            pos += n
            self._advance(n)

    async def _copy_compressed(self, src: _Source, offset: int, length: int,
                               target_offset: int) -> None:
        """Whole target clusters, compressed; all-zero clusters are not written."""
        cs = self.cluster_size
        tsize = self.target.getlength()
        shift = target_offset - offset
        # Widen to the target clusters the run touches; the bytes read around the run are the
        # source's own (zero or backing) data, so the clusters stay correct.
        lo = max(0, (target_offset // cs) * cs - shift)
        hi = min(src.size, -(-(target_offset + length) // cs) * cs - shift)
        step = max(cs, IO_BUF_SIZE // cs * cs)
        pos = lo
        while pos < hi:
            n = min(hi - pos, step)
            view = self.view[:n]
            await self._read(src, pos, view)
            # Runs of non-zero clusters go out in one compressed request each.
            run_start = -1
            for c in range(0, n + cs, cs):
                zero = c >= n or is_zero(view[c : c + cs])
                if not zero and run_start < 0:
                    run_start = c
                elif zero and run_start >= 0:
                    t = pos + shift + run_start
                    e = min(c, n)
                    if t + e - run_start > tsize:
                        e = tsize - t + run_start
                    await self._write(t, view[run_start:e], RequestFlags.COMPRESSED)
                    run_start = -1
            pos += n
            self._advance(min(n, length))


def _parse_sparse(text: str) -> int:
    try:
        value = size_arg(text)
    except Fail:
        raise Fail(_SPARSE_ERROR) from None
    if value % SECTOR_SIZE or value > _MAX_SPARSE:
        raise Fail(_SPARSE_ERROR)
    return value


def _parse_coroutines(text: str) -> int:
    """``-m``: a whole C integer (strtol base 0: ``010`` is octal, ``0x8`` hex), 1 to 16."""
    body = text.lstrip(" \t\n\v\f\r")
    sign = -1 if body[:1] == "-" else 1
    body = body[1:] if body[:1] in "+-" else body
    try:
        if body[:2].lower() == "0x":
            value = int(body[2:], 16) if body[2:].isascii() and body[2:].isalnum() else -1
        elif body[:1] == "0" and len(body) > 1:
            value = int(body[1:], 8) if body[1:].isdigit() else -1
        else:
            value = int(body) if body.isascii() and body.isdigit() else -1
    except ValueError:
        value = -1
    if value < 0 or not 1 <= sign * value <= _MAX_COROUTINES:
        raise Fail(_COROUTINES_ERROR)
    return sign * value


def _parse_rate(text: str) -> int:
    try:
        return parse_size("rate limit", text)
    except OptionError:
        raise Fail(_RATE_ERROR) from None


def _bitmap_store(bb: BlockBackend) -> Qcow2Bitmaps | None:
    """The node's persistent bitmap store if it can hold bitmaps (qcow2 v3)."""
    driver = root(bb).driver
    store = getattr(driver, "persistent_bitmaps", None)
    if not isinstance(store, Qcow2Bitmaps) or store.drv.header.version < 3:
        return None
    return store


def _check_source_bitmaps(src: BlockBackend, skip_broken: bool) -> None:
    """Before the target is made: the source must have bitmap support and no broken bitmaps.

    QEMU walks a node's bitmaps newest first, so the last bitmap of the directory is the
    first reported.
    """
    store = _bitmap_store(src)
    if store is None:
        raise Fail("Source lacks bitmap support")
    if skip_broken:
        return
    for bitmap in reversed(store.bitmaps):
        if bitmap.persistent and bitmap.inconsistent:
            raise Fail(f"Cannot copy inconsistent bitmap '{bitmap.name}'",
                       tail="Try --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to "
                            "delete it\n")


def _copy_bitmaps(src: BlockBackend, dst: BlockBackend, skip_broken: bool, prog: str) -> None:
    """After the data: every persistent source bitmap into the target (QEMU's order).

    QEMU creates them newest first and inserts each at the head of the target's list; what
    the target stores is its old bitmaps, then the new ones in the source's order. A bitmap
    that cannot be created ends the copy, the ones created so far stay.
    """
    src_store = _bitmap_store(src)
    dst_store = _bitmap_store(dst)
    assert src_store is not None and dst_store is not None
    added: list[DirtyBitmap] = []
    try:
        for bitmap in reversed(src_store.bitmaps):
            if not bitmap.persistent:
                continue
            if bitmap.inconsistent and skip_broken:
                warn(prog, f"Skipping inconsistent bitmap '{bitmap.name}'")
                continue
            try:
                new = dst_store.add(bitmap.name, bitmap.granularity, bitmap.enabled)
            except BlockError as exc:
                raise Fail(f"Failed to create bitmap {bitmap.name}: {exc}") from None
            added.append(new)
            try:
                if new.size != bitmap.size:
                    raise BlockError(f"Bitmaps are of different sizes (destination size is "
                                     f"{new.size}, source size is {bitmap.size}) and can't be "
                                     "merged")
                dst_store.merge(bitmap.name, bitmap)
            except BlockError as exc:
                # qemu-img's target then holds no trace of the bitmap it could not fill.
                dst_store.remove(bitmap.name)
                added.remove(new)
                raise Fail(f"Failed to populate bitmap {bitmap.name}: {exc}") from None
    finally:
        bitmaps = dst_store.bitmaps
        bitmaps[:] = [b for b in bitmaps if all(b is not a for a in added)] + added[::-1]


def cmd_convert(prog: str, args: list[str]) -> int:
    try:
        opts, rest = getopt.gnu_getopt(
            args, "hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:",
            ["help", "object=", "image-opts", "target-image-opts", "salvage", "target-is-zero",
             "bitmaps", "skip-broken-bitmaps", "force-share"])
    except getopt.GetoptError as exc:
        raise Fail(exc.msg) from None
    fmt: str | None = None
    out_fmt: str | None = None
    out_base: str | None = None
    out_base_fmt: str | None = None
    compress = progress = quiet = skip_create = target_is_zero = False
    copy_range = explicit_sparse = False
    salvage = bitmaps = skip_broken = image_opts = target_image_opts = False
    rate_limit = 0
    options_given = False
    min_sparse = 4096
    cache = "unsafe"
    src_cache = "writeback"
    raw_options: dict[str, str] = {}
    for flag, value in opts:
        if flag == "-f":
            fmt = value
        elif flag == "-O":
            out_fmt = value
        elif flag == "-B":
            out_base = value
        elif flag == "-F":
            out_base_fmt = value
        elif flag == "-c":
            compress = True
        elif flag == "-o":
            options_given = True
            if value in ("help", "?"):
                raise Fail("Listing creation options is not supported")
            try:
                raw_options.update(parse_drive_opts(value))
            except OptionError as exc:
                raise Fail(str(exc)) from None
        elif flag == "-S":
            min_sparse = _parse_sparse(value)
            explicit_sparse = True
        elif flag == "-C":
            # Copy offloading (copy_file_range) moves the same bytes; the copy loop is used.
            copy_range = True
        elif flag == "-p":
            progress = True
        elif flag == "-t":
            cache = value
        elif flag == "-T":
            src_cache = value
        elif flag == "-q":
            quiet = True
        elif flag == "-n":
            skip_create = True
        elif flag == "--target-is-zero":
            target_is_zero = True
        elif flag == "-m":
            # Our copy runs in order, one request at a time; the number is only validated.
            _parse_coroutines(value)
        elif flag == "-W":
            pass  # out-of-order writes are allowed; in-order writes are one of the orders
        elif flag == "-r":
            rate_limit = _parse_rate(value)
        elif flag == "--salvage":
            salvage = True
        elif flag == "--bitmaps":
            bitmaps = True
        elif flag == "--skip-broken-bitmaps":
            skip_broken = True
        elif flag == "--image-opts":
            image_opts = True
        elif flag == "--target-image-opts":
            target_image_opts = True
    if quiet:
        progress = False
    if skip_broken and not bitmaps:
        raise Fail("Use of --skip-broken-bitmaps requires --bitmaps")
    if copy_range and compress:
        raise Fail("Cannot enable copy offloading when -c is used")
    if copy_range and explicit_sparse:
        raise Fail("Cannot enable copy offloading when -S is used")
    if copy_range and salvage:
        raise Fail("Cannot use copy offloading in salvaging mode")
    if target_image_opts and not skip_create:
        raise Fail("--target-image-opts requires use of -n flag")
    if skip_create and options_given:
        raise Fail("-o has no effect when skipping image creation")
    if target_is_zero and not skip_create:
        raise Fail("--target-is-zero requires use of -n flag")
    if len(rest) < 2:
        raise Fail("Must specify image file name")
    out_filename = rest[-1]
    src_names = rest[:-1]
    backing_from_options = raw_options.pop("backing_file", None)
    if out_base is None:
        out_base = backing_from_options
    if out_base_fmt is None:
        out_base_fmt = raw_options.pop("backing_fmt", None)
    # qemu-img checks the target format and its creation options before it opens a source.
    if not target_image_opts:
        out_fmt = out_fmt or "raw"
        if out_fmt not in _KNOWN_FORMATS and not skip_create:
            # With -n the format is only looked up when the target is opened.
            raise Fail(f"Unknown file format '{out_fmt}'")
    allowed = _CREATE_OPTIONS.get(out_fmt or "", ())
    if not skip_create:
        bad = next((k for k in raw_options if k not in allowed), None)
        if bad is None and backing_from_options is not None and "backing_file" not in allowed:
            bad = "backing_file"
        if bad is not None:
            raise Fail(f"Invalid parameter '{bad}'")
        if out_base is not None and "backing_file" not in allowed:
            raise Fail(f"Backing file not supported for file format '{out_fmt}'")
    if out_base is not None and len(src_names) > 1:
        raise Fail("Having a backing file for the target makes no sense when concatenating "
                   "multiple input images")
    if bitmaps and len(src_names) > 1:
        raise Fail("Copying bitmaps only possible with single source")
    if out_base is not None and out_base_fmt is None and not skip_create:
        raise Fail("Use of backing file requires explicit backing format")
    create_opts: dict[str, object] = {}
    for key, value in raw_options.items():
        try:
            create_opts[key] = typed_create_option(key, value)
        except OptionError as exc:
            first, _, more = str(exc).partition("\n")
            raise Fail(first, tail=more + "\n" if more else "") from None
    if compress and out_fmt in _KNOWN_FORMATS:
        if not get_driver(out_fmt).supported_write_flags & RequestFlags.COMPRESSED:
            raise Fail("Compression not supported for this file format")

    layer = new_layer(opts)
    prog_state = Progress(progress, 1.0)
    try:
        sources: list[_Source] = []
        for name in src_names:
            bb = open_image(layer, name, fmt, read_only=True, cache=src_cache, source_cache=True,
                            image_opts=image_opts, prog=prog)
            sources.append(_Source(bb, name, bb.getlength()))
        total = sum(s.size for s in sources)
        if bitmaps:
            _check_source_bitmaps(sources[0].bb, skip_broken)
        if not skip_create:
            assert out_fmt is not None
            if out_base is not None:
                create_opts["backing_file"] = out_base
                create_opts["backing_fmt"] = out_base_fmt
            try:
                layer.run(create_image(layer, out_filename, out_fmt, total, create_opts))
            except BlockError as exc:
                raise Fail(f"{out_filename}: error while converting {out_fmt}: {exc}") from None
        target = open_image(layer, out_filename, out_fmt, read_only=False, cache=cache,
                            image_opts=target_image_opts, prog=prog)
        target_node = root(target)
        if compress and not target_node.driver.supported_write_flags & RequestFlags.COMPRESSED:
            raise Fail("Compression not supported for this file format")
        if bitmaps and _bitmap_store(target) is None:
            raise Fail(f"Format driver '{target_node.driver_name}' does not support bitmaps")
        if target_is_zero and out_base is not None:
            # qemu-img reports this and stops, but leaves with status 0 (its error path
            # does not set the status here); users' scripts see exactly that.
            sys.stderr.write(f"{prog}: Cannot use --target-is-zero when the destination image "
                             "has a backing file\n")
            return 0
        has_backing = out_base is not None or (skip_create and target_node.backing is not None)
        zero_init = target_is_zero or (not skip_create and out_base is None)
        conv = _Converter(layer, sources, target, min_sparse=min_sparse, compress=compress,
                          zero_init=zero_init, target_has_backing=has_backing,
                          progress=prog_state, salvage=salvage,
                          warn=lambda text: warn(prog, text))
        if rate_limit:
            # As qemu-img: the target's BlockBackend gets a bps-write limit (QEMU's leaky
            # bucket; a single write is never held back).
            target.set_io_limits(ThrottleLimits({"bps-write": rate_limit}), "convert")
        with prog_state.running():
            layer.run(conv.run())
            try:
                layer.run(target.flush())
            except IOFailure as exc:
                raise Fail(f"error while flushing: {os.strerror(exc.errno)}") from None
            prog_state.end()
        if bitmaps:
            _copy_bitmaps(sources[0].bb, target, skip_broken, prog)
    finally:
        layer.close()
    return 0
