"""``img bench``: ``count`` reads or writes of ``buffer_size`` bytes, ``depth`` in flight."""

from __future__ import annotations

import asyncio
import getopt
import os
import sys
import time

from blockgraph.errors import IOFailure
from blockgraph.graph.node import BlockBackend
from blockgraph.tools.img.common import Fail, new_layer, open_image, size_arg


class _Bench:
    def __init__(self, bb: BlockBackend, *, count: int, depth: int, bufsize: int, offset: int,
                 step: int, write: bool, flush_interval: int, drain_on_flush: bool,
                 pattern: int) -> None:
        self.bb = bb
        self.count = count
        self.depth = depth
        self.bufsize = bufsize
        self.start = offset
        self.offset = offset
        self.step = step
        self.write = write
        self.flush_interval = flush_interval
        self.drain_on_flush = drain_on_flush
        self.image_size = bb.getlength()
        self.buffers = [memoryview(bytearray([pattern]) * bufsize) for _ in range(depth)]
        self.issued = 0
        self.error: IOFailure | None = None

    def _next_offset(self) -> int:
        off = self.offset
        self.offset += self.step
        if self.offset + self.bufsize > self.image_size:
            self.offset = 0
        return off

    async def _worker(self, buf: memoryview) -> None:
        while self.issued < self.count and self.error is None:
            self.issued += 1
            off = self._next_offset()
            try:
                if self.write:
                    await self.bb.pwritev(off, buf)
                else:
                    await self.bb.preadv(off, buf)
                if self.flush_interval and self.issued % self.flush_interval == 0:
                    await self.bb.flush()
            except IOFailure as exc:
                self.error = exc

    async def run(self) -> None:
        await asyncio.gather(*(self._worker(self.buffers[i]) for i in range(self.depth)))
        if self.error is not None:
            raise Fail(f"Failed request: {os.strerror(self.error.errno)}")


def _int_arg(text: str, what: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise Fail(f"Invalid {what} specified") from None
    if value <= 0:
        raise Fail(f"Invalid {what} specified")
    return value


def cmd_bench(prog: str, args: list[str]) -> int:
    try:
        opts, rest = getopt.gnu_getopt(
            args, "hc:d:f:ni:o:qs:S:t:wU",
            ["help", "flush-interval=", "image-opts", "pattern=", "no-drain", "force-share"])
    except getopt.GetoptError as exc:
        raise Fail(exc.msg) from None
    count = 75000
    depth = 64
    fmt: str | None = None
    aio: str | None = None
    offset = 0
    write = False
    bufsize = 4096
    step = 0
    cache = "writeback"
    flush_interval = 0
    drain = True
    pattern = 0
    for flag, value in opts:
        if flag == "-c":
            count = _int_arg(value, "request count")
        elif flag == "-d":
            depth = _int_arg(value, "queue depth")
        elif flag == "-f":
            fmt = value
        elif flag == "-n":
            aio = "native"
        elif flag == "-i":
            if value not in ("threads", "native", "io_uring"):
                raise Fail(f"Invalid aio option: {value}")
            aio = value
        elif flag == "-o":
            try:
                offset = size_arg(value)
            except Fail:
                raise Fail("Invalid offset specified") from None
        elif flag == "-q":
            pass
        elif flag == "-s":
            try:
                bufsize = size_arg(value)
            except Fail:
                raise Fail("Invalid buffer size specified") from None
            if bufsize <= 0 or bufsize > (1 << 31) - 1:
                raise Fail("Invalid buffer size specified")
        elif flag == "-S":
            try:
                step = size_arg(value)
            except Fail:
                raise Fail("Invalid step size specified") from None
        elif flag == "-t":
            cache = value
        elif flag == "-w":
            write = True
        elif flag == "--flush-interval":
            try:
                flush_interval = int(value, 0)
            except ValueError:
                raise Fail("Invalid flush interval specified") from None
        elif flag == "--no-drain":
            drain = False
        elif flag == "--pattern":
            try:
                pattern = int(value, 0)
            except ValueError:
                pattern = -1
            if not 0 <= pattern <= 0xFF:
                raise Fail("Invalid pattern byte specified")
    if len(rest) != 1:
        raise Fail("Expecting one image file name")
    if flush_interval and flush_interval < depth:
        raise Fail("Flush interval can't be smaller than depth")
    if not drain and not flush_interval:
        raise Fail("--no-drain requires --flush-interval")
    if not write and flush_interval:
        raise Fail("--flush-interval is only available in write tests")
    step = step or bufsize
    filename = rest[0]
    layer = new_layer(opts)
    try:
        extra: dict[str, object] = {"file.aio": aio} if aio else {}
        bb = open_image(layer, filename, fmt, read_only=not write, cache=cache, extra=extra)
        # qemu-img 7.2 takes -q for bench but prints these lines all the same.
        sys.stdout.write(f"Sending {count} {'write' if write else 'read'} requests, {bufsize} "
                         f"bytes each, {depth} in parallel (starting at offset {offset}, step "
                         f"size {step})\n")
        if flush_interval:
            sys.stdout.write(f"Sending flush every {flush_interval} requests\n")
        sys.stdout.flush()
        bench = _Bench(bb, count=count, depth=depth, bufsize=bufsize, offset=offset, step=step,
                       write=write, flush_interval=flush_interval, drain_on_flush=drain,
                       pattern=pattern)
        t0 = time.monotonic()
        layer.run(bench.run())
        elapsed = time.monotonic() - t0
        sys.stdout.write(f"Run completed in {elapsed:3.3f} seconds.\n")
    finally:
        layer.close()
    return 0
