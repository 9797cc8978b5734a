"""``img compare``: whether two images read the same (exit 0), differ (1), or fail (2).

Both chains are walked by block status in runs: ranges that read as zeroes in both are not
read at all; ranges allocated in only one are checked for zeroes; the rest is read in 2 MiB
buffers and compared with one bytes comparison (a bisection finds the first difference).
"""

from __future__ import annotations

import getopt
import os
import sys

from blockgraph.errors import IOFailure
from blockgraph.graph.node import BlockBackend
from blockgraph.tools.img.common import (
    IO_BUF_SIZE,
    SECTOR_SIZE,
    F,
    Fail,
    Progress,
    chain_status,
    first_difference,
    first_nonzero,
    new_layer,
    open_image,
    root,
)

_ERROR = 2
_STATUS_BITS = F.DATA | F.ZERO | F.OFFSET_VALID | F.ALLOCATED


class _Mismatch(Exception):
    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class _Compare:
    def __init__(self, bb1: BlockBackend, name1: str, bb2: BlockBackend, name2: str,
                 strict: bool, progress: Progress) -> None:
        self.bb1, self.bb2 = bb1, bb2
        self.name1, self.name2 = name1, name2
        self.strict = strict
        self.progress = progress
        self.buf1 = bytearray(IO_BUF_SIZE)
        self.buf2 = bytearray(IO_BUF_SIZE)
        self.base = max(bb1.getlength(), bb2.getlength()) or 1

    async def _read(self, bb: BlockBackend, name: str, offset: int, view: memoryview) -> None:
        try:
            await bb.preadv(offset, view)
        except IOFailure as exc:
            raise Fail(f"Error while reading offset {offset} of {name}: {os.strerror(exc.errno)}",
                       4) from None

    async def _check_zero(self, bb: BlockBackend, name: str, offset: int, length: int) -> None:
        end = offset + length
        pos = offset
        while pos < end:
            n = min(end - pos, IO_BUF_SIZE)
            view = memoryview(self.buf1)[:n]
            await self._read(bb, name, pos, view)
            nz = first_nonzero(view)
            if nz < n:
                where = pos + nz
                raise _Mismatch(f"Content mismatch at offset {where - where % SECTOR_SIZE}!")
            pos += n

    async def _compare_data(self, offset: int, length: int) -> None:
        end = offset + length
        pos = offset
        while pos < end:
            n = min(end - pos, IO_BUF_SIZE)
            v1 = memoryview(self.buf1)[:n]
            v2 = memoryview(self.buf2)[:n]
            await self._read(self.bb1, self.name1, pos, v1)
            await self._read(self.bb2, self.name2, pos, v2)
            if v1 != v2:
                where = pos + first_difference(v1, v2)
                raise _Mismatch(f"Content mismatch at offset {where - where % SECTOR_SIZE}!")
            pos += n

    def _advance(self, n: int) -> None:
        self.progress.update(n / self.base * 100, 100)

    async def run(self) -> str:
        size1, size2 = self.bb1.getlength(), self.bb2.getlength()
        if self.strict and size1 != size2:
            raise _Mismatch("Strict mode: Image size mismatch!")
        n1, n2 = root(self.bb1), root(self.bb2)
        common = min(size1, size2)
        self.progress.update(0, 100)
        pos = 0
        while pos < common:
            want = min(common - pos, 1 << 30)
            s1 = await chain_status(n1, pos, want)
            s2 = await chain_status(n2, pos, want)
            chunk = min(s1.length, s2.length)
            if self.strict and (s1.flags & _STATUS_BITS) != (s2.flags & _STATUS_BITS):
                raise _Mismatch(f"Strict mode: Offset {pos} block status mismatch!")
            alloc1 = bool(s1.flags & F.ALLOCATED)
            alloc2 = bool(s2.flags & F.ALLOCATED)
            if s1.flags & F.ZERO and s2.flags & F.ZERO:
                pass
            elif alloc1 and alloc2:
                await self._compare_data(pos, chunk)
            elif alloc1 or alloc2:
                if alloc1 and not s1.flags & F.ZERO:
                    await self._check_zero(self.bb1, self.name1, pos, chunk)
                elif alloc2 and not s2.flags & F.ZERO:
                    await self._check_zero(self.bb2, self.name2, pos, chunk)
                else:
                    await self._compare_data(pos, chunk)
            else:
                # Neither chain has the range: both read from nothing, i.e. zeroes, unless a
                # node's own answer said otherwise.
                await self._compare_data(pos, chunk)
            pos += chunk
            self._advance(chunk)
        lines = ""
        if size1 != size2:
            lines = "Warning: Image size mismatch!\n"
            bb, name = (self.bb1, self.name1) if size1 > size2 else (self.bb2, self.name2)
            node = root(bb)
            end = max(size1, size2)
            while pos < end:
                st = await chain_status(node, pos, min(end - pos, 1 << 30))
                if st.flags & F.ALLOCATED and not st.flags & F.ZERO:
                    try:
                        await self._check_zero(bb, name, pos, st.length)
                    except _Mismatch as exc:
                        raise _Mismatch(lines + exc.text) from None
                pos += st.length
                self._advance(st.length)
        return lines + "Images are identical."


def cmd_compare(prog: str, args: list[str]) -> int:
    try:
        opts, rest = getopt.gnu_getopt(args, "hf:F:T:pqsU",
                                       ["help", "object=", "image-opts", "force-share"])
    except getopt.GetoptError as exc:
        raise Fail(exc.msg, _ERROR) from None
    fmt1: str | None = None
    fmt2: str | None = None
    cache = "writeback"
    progress = quiet = strict = False
    for flag, value in opts:
        if flag == "-f":
            fmt1 = value
        elif flag == "-F":
            fmt2 = value
        elif flag == "-T":
            cache = value
        elif flag == "-p":
            progress = True
        elif flag == "-q":
            quiet = True
        elif flag == "-s":
            strict = True
    if quiet:
        progress = False
    if len(rest) != 2:
        raise Fail("Expecting two image file names", _ERROR)
    name1, name2 = rest
    fmt2 = fmt2 or fmt1
    layer = new_layer(opts)
    state = Progress(progress, 2.0)
    try:
        try:
            bb1 = open_image(layer, name1, fmt1, read_only=True, cache=cache, source_cache=True,
                             fail_code=_ERROR)
            bb2 = open_image(layer, name2, fmt2, read_only=True, cache=cache, source_cache=True,
                             fail_code=_ERROR)
        except Fail as exc:
            exc.code = _ERROR
            raise
        with state.running():
            try:
                text = layer.run(_Compare(bb1, name1, bb2, name2, strict, state).run())
                code = 0
            except _Mismatch as exc:
                text, code = exc.text, 1
            if not quiet:
                sys.stdout.write(text + "\n")
            state.end()
    finally:
        layer.close()
    return code
