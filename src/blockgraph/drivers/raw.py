"""raw: the format that is no format, optionally a window (``offset``, ``size``) into its file.

raw is the prober's fallback (score 1): anything no other format claims opens as raw. Before
each read and write it fires ``read_aio`` / ``write_aio`` at its file child, as QEMU's raw does,
so that a blkdebug node below can fail the request.

Not here: QEMU restricts writes to the first sectors of a *probed* raw image (so a guest cannot
turn it into another format). The driver cannot tell that it was probed; the graph must do it.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Mapping
from typing import Any, ClassVar

from blockgraph.drivers.base import (
    BlockDriver,
    BlockStatus,
    BlockStatusFlags,
    ChildAccess,
    ChildRole,
    FileRange,
    NodeFlags,
    OpenContext,
    PreallocMode,
    RequestFlags,
)
from blockgraph.errors import EINVAL, ENOTSUP, BlockError, IOFailure
from blockgraph.options.schema import OptionSpec, OptType, opt

SECTOR_SIZE = 512
_OFFSET_VALID = int(BlockStatusFlags.OFFSET_VALID)  # tested on int(flags): IntFlag & is slow
_INT64_MAX = (1 << 63) - 1


class RawDriver(BlockDriver):
    """The ``raw`` format over its ``file`` child."""

    format_name: ClassVar[str] = "raw"
    is_format: ClassVar[bool] = True
    runtime_options: ClassVar[Mapping[str, OptionSpec]] = {
        "offset": opt(OptType.SIZE),
        "size": opt(OptType.SIZE),
    }
    # Passed straight to the file child, whose own request layer emulates what it lacks.
    supported_write_flags: ClassVar[RequestFlags] = (
        RequestFlags.FUA | RequestFlags.MAY_UNMAP | RequestFlags.NO_FALLBACK
    )

    def __init__(self) -> None:
        self.file: ChildAccess | None = None
        self.offset = 0
        self.size: int | None = None  # None: up to the end of the file, following it
        self._window_given = False  # offset/size given: the node needs a json: name
        self._pending: tuple[int, int | None] | None = None

    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        """Everything is raw, with the lowest score: any real format wins."""
        return 1

    async def open(self, ctx: OpenContext, options: dict[str, Any]) -> None:
        self.file = await ctx.open_child("file", ChildRole.FILTERED_PRIMARY)
        if self.file is None:
            raise BlockError('A block device must be specified for "file"')
        offset = options.get("offset")
        size = options.get("size")
        self._apply_window(0 if offset is None else int(offset), None if size is None else int(size))
        self._window_given = offset is not None or size is not None

    def _apply_window(self, offset: int, size: int | None) -> None:
        """Check ``offset``/``size`` against the file, in QEMU's order and with its texts."""
        file_size = self._child().getlength()
        if offset > file_size:
            raise BlockError(
                f"Offset ({offset}) cannot be greater than size of the containing file "
                f"({file_size})"
            )
        if size is not None and file_size - offset < size:
            # QEMU's message has two spaces before "actual"; kept for byte-exact output.
            raise BlockError(
                f"The sum of offset ({offset}) and size ({size}) has to be smaller or equal "
                f"to the  actual size of the containing file ({file_size})"
            )
        if size is not None and size % SECTOR_SIZE:
            raise BlockError("Specified size is not multiple of 512")
        self.offset = offset
        self.size = size

    def reopen_prepare(self, options: dict[str, Any], flags: NodeFlags) -> None:
        offset = options.get("offset")
        size = options.get("size")
        saved = (self.offset, self.size)
        try:
            self._apply_window(0 if offset is None else int(offset), None if size is None else int(size))
            self._pending = (self.offset, self.size)
        finally:
            self.offset, self.size = saved

    def reopen_commit(self) -> None:
        if self._pending is not None:
            self.offset, self.size = self._pending
            self._window_given = self.offset != 0 or self.size is not None
            self._pending = None

    def reopen_abort(self) -> None:
        self._pending = None

    def _child(self) -> ChildAccess:
        if self.file is None:
            raise IOFailure(_errno.ENOMEDIUM)
        return self.file

    def getlength(self) -> int:
        if self.size is not None:
            return self.size
        file = self.file  # _child(), inline: every request asks, several times
        if file is None:
            raise IOFailure(_errno.ENOMEDIUM)
        return max(0, file.getlength() - self.offset)

    def _check_range(self, offset: int, length: int) -> None:
        # The request layer bounds requests by getlength(); this guards the window arithmetic
        # against a file that shrank under a fixed ``size``.
        if offset < 0 or length < 0 or offset > _INT64_MAX - self.offset - length:
            raise IOFailure(EINVAL)

    def map_read(self, offset: int, length: int) -> FileRange | None:
        # Raw passes its window's bytes on unchanged. (A blkdebug child, which wants to see
        # the read_aio event and the read, maps nothing.)
        file = self.file
        if file is None or offset < 0 or offset > _INT64_MAX - self.offset - length:
            return None
        return file.map_read(offset + self.offset, length)

    # The event is fired here rather than through fire_debug_event: one coroutine less per
    # request when no blkdebug node listens, which is always but in tests.
    async def preadv(self, offset: int, buf: memoryview, flags: RequestFlags) -> None:
        if offset < 0 or offset > _INT64_MAX - self.offset - len(buf):  # _check_range, inline
            raise IOFailure(EINVAL)
        file = self.file  # _child(), inline
        if file is None:
            raise IOFailure(_errno.ENOMEDIUM)
        handler = getattr(file, "debug_event", None)
        if handler is not None:
            await handler("read_aio")
        await file.preadv(offset + self.offset, buf, flags)

    async def pwritev(self, offset: int, buf: memoryview, flags: RequestFlags) -> None:
        if offset < 0 or offset > _INT64_MAX - self.offset - len(buf):  # _check_range, inline
            raise IOFailure(EINVAL)
        file = self.file  # _child(), inline
        if file is None:
            raise IOFailure(_errno.ENOMEDIUM)
        handler = getattr(file, "debug_event", None)
        if handler is not None:
            await handler("write_aio")
        await file.pwritev(offset + self.offset, buf, flags)

    async def pwrite_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        self._check_range(offset, length)
        await self._child().pwrite_zeroes(offset + self.offset, length, flags)

    async def pdiscard(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        await self._child().pdiscard(offset + self.offset, length)

    async def truncate(self, length: int, prealloc: PreallocMode = "off") -> None:
        if self.size is not None:
            raise IOFailure(ENOTSUP, "Cannot resize fixed-size raw disks")
        if length > _INT64_MAX - self.offset:
            raise IOFailure(EINVAL, "Disk size too large for the chosen offset")
        await self._child().truncate(length + self.offset, prealloc)

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        """The file's answer for the same bytes; its host offsets already refer to its own file."""
        self._check_range(offset, length)
        status = await self._child().block_status(offset + self.offset, length)
        return attribute_status(status, self.file, length)

    def filename(self) -> str | None:
        """A raw node is described by its file's name, unless a window makes it json:."""
        if self.file is None or self._window_given:
            return None
        name = self.file.filename
        return None if name.startswith("json:") else name


def attribute_status(status: BlockStatus, child: ChildAccess | None, length: int) -> BlockStatus:
    """A child's block status as its parent's answer.

    ``file=None`` with a valid offset means "the node that answered"; once the answer is passed
    up, that node must be named, and the length must not run past what the parent asked.
    """
    # Built directly: dataclasses.replace() re-inspects the fields on every call, and this runs
    # for every block status query (an NBD read asks one).
    file = status.file
    if file is None and int(status.flags) & _OFFSET_VALID:
        file = child
    if file is not status.file or status.length > length:
        status = BlockStatus(status.flags, min(status.length, length), status.offset, file,
                             status.recurse)
    return status
