"""``img convert``: copy one or more images (concatenated) into a new or existing target.

The source is walked by block status in runs; data runs are read into one 2 MiB buffer and
split into zero and data runs by C-speed searches (``-S``, default 4 KiB): zero runs are
skipped on a zero-initialised target, written as zeroes otherwise, data runs are written in
one request each. With ``-c`` whole clusters go to the target with the COMPRESSED flag.
"""

from __future__ import annotations

import errno
import getopt
import os
from dataclasses import dataclass

from blockgraph.drivers.base import RequestFlags
from blockgraph.drivers.registry import get_driver
from blockgraph.errors import BlockError, IOFailure, OptionError
from blockgraph.graph.create import create_image
from blockgraph.graph.layer import BlockLayer
from blockgraph.graph.node import BlockBackend, Node
from blockgraph.options.keyval import parse_drive_opts
from blockgraph.tools.img.common import (
    IO_BUF_SIZE,
    SECTOR_SIZE,
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
    zero_runs,
)

_MAX_SPARSE = 16 << 20  # qemu-img's largest -S (32768 sectors)
_SPARSE_ERROR = ("Invalid buffer size for sparse output specified. Valid sizes are multiples of "
                 "512 up to 16777216. Select 0 to disable sparse detection (fully allocates "
                 "output).")
_KNOWN_FORMATS = ("raw", "qcow2", "file")
_CREATE_OPTIONS = {
    "raw": ("preallocation",),
    "file": ("preallocation",),
    "qcow2": ("backing_file", "backing_fmt", "cluster_size", "compat", "lazy_refcounts",
              "refcount_bits", "extended_l2", "compression_type", "preallocation"),
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
                 progress: Progress) -> None:
        self.layer = layer
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
        while pos < src.size:
            st = await chain_status(node, pos, min(src.size - pos, 1 << 30), base)
            if st.flags & F.ZERO:
                kind = "zero"
            elif st.flags & F.DATA:
                kind = "data"
            elif self.target_has_backing:
                kind = "backing"
            else:
                kind = "zero"
            if runs and runs[-1][0] == kind:
                k, o, n = runs[-1]
                runs[-1] = (k, o, n + st.length)
            else:
                runs.append((kind, pos, st.length))
            pos += st.length
        return runs

    async def run(self) -> None:
        plans = [await self._runs(src) for src in self.sources]
        for plan in plans:
            for kind, _off, length in plan:
                if kind == "data" or (kind == "zero" and self.min_sparse == 0):
                    self.total_work += length
        self.progress.update(0, 100)
        target_pos = 0
        for src, plan in zip(self.sources, plans, strict=True):
            for kind, off, length in plan:
                if kind == "data":
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
            raise Fail(f"error while reading at byte {offset}: {os.strerror(exc.errno)}") from None

    async def _write(self, offset: int, view: memoryview, flags: RequestFlags = RequestFlags.NONE) -> None:
        try:
            await self.target.pwritev(offset, view, flags)
        except IOFailure as exc:
            if flags & RequestFlags.COMPRESSED and exc.errno == errno.ENOTSUP:
                raise Fail("Compression not supported for this file format") from None
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
            if value in ("help", "?"):
                raise Fail("Listing creation options is not supported")
            try:
                raw_options.update(parse_drive_opts(value))
            except OptionError as exc:
                raise Fail(str(exc)) from None
        elif flag == "-S":
            min_sparse = _parse_sparse(value)
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
    if quiet:
        progress = False
    if len(rest) < 2:
        raise Fail("Must specify image file name")
    out_filename = rest[-1]
    src_names = rest[:-1]
    if out_base is None:
        out_base = raw_options.pop("backing_file", None)
    else:
        raw_options.pop("backing_file", None)
    if out_base_fmt is None:
        out_base_fmt = raw_options.pop("backing_fmt", None)
    if out_base is not None and skip_create:
        raise Fail("Specifying backing image makes no sense when not creating target image")
    if target_is_zero and not skip_create:
        raise Fail("--target-is-zero requires use of -n flag")
    out_fmt = out_fmt or "raw"
    if out_fmt not in _KNOWN_FORMATS:
        raise Fail(f"Unknown file format '{out_fmt}'")

    layer = new_layer(opts)
    prog_state = Progress(progress, 1.0)
    try:
        sources: list[_Source] = []
        for name in src_names:
            bb = open_image(layer, name, fmt, read_only=True, cache=src_cache, source_cache=True)
            sources.append(_Source(bb, name, bb.getlength()))
        total = sum(s.size for s in sources)
        drv_cls = get_driver(out_fmt)
        if compress and not drv_cls.supported_write_flags & RequestFlags.COMPRESSED:
            raise Fail("Compression not supported for this file format")
        if out_base is not None and out_base_fmt is None:
            raise Fail("Use of backing file requires explicit backing format")
        create_opts: dict[str, object] = {}
        for key, value in raw_options.items():
            try:
                create_opts[key] = typed_create_option(key, value)
            except OptionError as exc:
                raise Fail(f"{out_filename}: {exc}") from None
        allowed = _CREATE_OPTIONS.get(out_fmt, ())
        bad = next((k for k in create_opts if k not in allowed), None)
        if bad is not None:
            raise Fail(f"Invalid parameter '{bad}'")
        if not skip_create:
            if out_base is not None:
                create_opts["backing_file"] = out_base
                create_opts["backing_fmt"] = out_base_fmt
            try:
                layer.run(create_image(layer, out_filename, out_fmt, total, create_opts))
            except BlockError as exc:
                raise Fail(f"{out_filename}: error while converting {out_fmt}: {exc}") from None
        target = open_image(layer, out_filename, out_fmt, read_only=False, cache=cache)
        target_node = root(target)
        has_backing = out_base is not None or (skip_create and target_node.backing is not None)
        zero_init = target_is_zero or (not skip_create and out_base is None)
        conv = _Converter(layer, sources, target, min_sparse=min_sparse, compress=compress,
                          zero_init=zero_init, target_has_backing=has_backing,
                          progress=prog_state)
        with prog_state.running():
            layer.run(conv.run())
            try:
                layer.run(target.flush())
            except IOFailure as exc:
                raise Fail(f"error while flushing: {os.strerror(exc.errno)}") from None
            prog_state.end()
    finally:
        layer.close()
    return 0
