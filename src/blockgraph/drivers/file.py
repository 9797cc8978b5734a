"""The ``file`` protocol driver: a POSIX file (QEMU's file-posix).

``cache.direct=on`` opens the file with ``O_DIRECT``. The kernel then wants offsets, lengths
and buffer addresses aligned; the request alignment is probed at open (and again when a reopen
switches ``O_DIRECT`` on), the request layer pads requests to it, and this driver bounces data
through page-aligned buffers, since Python buffers have no alignment guarantee.
"""

from __future__ import annotations

import errno
import mmap
import os
from typing import TYPE_CHECKING, Any, ClassVar

from blockgraph.drivers.base import (
    BlockDriver,
    BlockStatus,
    BlockStatusFlags,
    NodeFlags,
    OpenContext,
    PreallocMode,
    RequestFlags,
)
from blockgraph.errors import BlockError, IOFailure
from blockgraph.options.schema import OptionSpec, OptType, opt

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

if TYPE_CHECKING:
    import ctypes

# libc's fallocate(2), bound on first use: ctypes costs start-up time, and
# ctypes.util.find_library("c") runs ``ldconfig -p`` in a subprocess (~15 ms CPU, more wall
# time, at every tool start). dlopen(NULL) gives the libc the interpreter already runs on.
_libc: ctypes.CDLL | None = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes

    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        _libc = libc
    if _libc.fallocate(fd, mode, offset, length) != 0:
        raise IOFailure(ctypes.get_errno())


# Block status answers, combined once (IntFlag arithmetic runs in Python).
_DATA_AT = BlockStatusFlags.DATA | BlockStatusFlags.OFFSET_VALID
_ZERO_AT = BlockStatusFlags.ZERO | BlockStatusFlags.OFFSET_VALID

# The alignments tried when probing O_DIRECT, smallest first (QEMU tries the same range).
_PROBE_ALIGNMENTS = (512, 1024, 2048, 4096)


def _probe_direct_alignment(fd: int) -> int:
    """Find the smallest request size the kernel accepts with O_DIRECT on ``fd``.

    :raise BlockError: when none works, with QEMU's text.
    """
    buf = mmap.mmap(-1, max(_PROBE_ALIGNMENTS))
    try:
        for align in _PROBE_ALIGNMENTS:
            try:
                os.preadv(fd, [memoryview(buf)[:align]], 0)
                return align
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    return align  # reading works; the error is not about alignment
    finally:
        buf.close()
    raise BlockError("Could not find working O_DIRECT alignment. Try cache.direct=off.")


class FileDriver(BlockDriver):
    """Driver ``file``."""

    format_name = "file"
    is_format = False
    growable = True
    protocol_prefixes = ("file",)
    runtime_options: ClassVar[dict[str, OptionSpec]] = {
        "filename": opt(OptType.STRING),
        "aio": opt(OptType.STRING, None, ("threads", "native", "io_uring")),
        "aio-max-batch": opt(OptType.NUMBER, 0),
        "locking": opt(OptType.STRING, "auto", ("auto", "on", "off")),
        "pr-manager": opt(OptType.STRING),
        "x-check-cache-dropped": opt(OptType.BOOL, False),
        "drop-cache": opt(OptType.BOOL, True),
    }

    def __init__(self) -> None:
        self.fd = -1
        self.path = ""
        # The file's size as this driver last saw or made it (None: ask fstat). QEMU caches it
        # the same way (total_sectors): every request checks it several times on its way down
        # (BlockBackend, raw's node, block status), and an fstat each time was ~10 % of an NBD
        # 4 KiB read. Kept up to date by our writes, truncates and zero writes; forgotten
        # after any failure and on reopen.
        self._size: int | None = None
        self.flags = NodeFlags()
        self.request_alignment = 1
        self._pending: tuple[int, int] | None = None  # (fd, alignment) prepared by reopen

    @classmethod
    def parse_filename(cls, filename: str, options: dict[str, Any]) -> None:
        if filename.startswith("file:"):
            filename = filename[len("file:") :]
        options["filename"] = filename

    def _open_fd(self, flags: NodeFlags) -> tuple[int, int]:
        mode = os.O_RDONLY if flags.read_only else os.O_RDWR
        if flags.direct:
            mode |= os.O_DIRECT
        try:
            fd = os.open(self.path, mode | os.O_CLOEXEC)
        except OSError as exc:
            raise BlockError(f"Could not open '{self.path}': {os.strerror(exc.errno or 0)}") from exc
        try:
            align = _probe_direct_alignment(fd) if flags.direct else 1
        except BlockError:
            os.close(fd)
            raise
        return fd, align

    async def open(self, ctx: OpenContext, options: dict[str, Any]) -> None:
        path = options.get("filename")
        if not path:
            raise BlockError("The 'file' block driver requires a file name")
        aio = options.get("aio") or ctx.flags.aio or "threads"
        if aio == "native" and not ctx.flags.direct:
            raise BlockError(
                "aio=native was specified, but it requires cache.direct=on, which was not specified."
            )
        self.path = path
        self.flags = ctx.flags
        self.fd, self.request_alignment = self._open_fd(ctx.flags)

    async def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self._size = None

    def filename(self) -> str | None:
        return self.path

    def open_options(self) -> dict[str, object]:
        return {"filename": self.path}

    def getlength(self) -> int:
        size = self._size
        if size is None:
            size = self._size = os.fstat(self.fd).st_size
        return size

    def _grown_to(self, end: int) -> None:
        # A successful write up to ``end`` extends the file to at least there.
        if self._size is not None and end > self._size:
            self._size = end

    # -- data path ----------------------------------------------------------------------------

    def _bounce(self, length: int) -> mmap.mmap:
        return mmap.mmap(-1, max(length, 1))

    async def preadv(self, offset: int, buf: memoryview, flags: RequestFlags) -> None:
        length = len(buf)
        if self.flags.direct:
            bounce = self._bounce(length)
            try:
                got = self._read_full(offset, memoryview(bounce)[:length])
                buf[:got] = memoryview(bounce)[:got]
            finally:
                bounce.close()
        else:
            got = self._read_full(offset, buf)
        if got < length:
            # Past the end of a file reads as zeroes, as a hole would.
            buf[got:] = bytes(length - got)

    def _read_full(self, offset: int, buf: memoryview) -> int:
        done = 0
        while done < len(buf):
            try:
                n = os.preadv(self.fd, [buf[done:]], offset + done)
            except OSError as exc:
                raise IOFailure(exc.errno or errno.EIO) from exc
            if n == 0:
                break
            done += n
        return done

    async def pwritev(self, offset: int, buf: memoryview, flags: RequestFlags) -> None:
        if self.flags.direct:
            bounce = self._bounce(len(buf))
            try:
                memoryview(bounce)[: len(buf)] = buf
                self._write_full(offset, memoryview(bounce)[: len(buf)])
            finally:
                bounce.close()
        else:
            self._write_full(offset, buf)

    def _write_full(self, offset: int, buf: memoryview) -> None:
        done = 0
        while done < len(buf):
            try:
                done += os.pwritev(self.fd, [buf[done:]], offset + done)
            except OSError as exc:
                self._size = None  # a partial write may have extended the file
                raise IOFailure(exc.errno or errno.EIO) from exc
        self._grown_to(offset + done)

    async def pwrite_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        size = self.getlength()
        if offset >= size:
            # Beyond the end, growing the file is enough: the new range reads as zeroes.
            self._size = None
            os.ftruncate(self.fd, offset + length)
            return
        mode = (
            _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
            if flags & RequestFlags.MAY_UNMAP
            else _FALLOC_FL_ZERO_RANGE
        )
        # FALLOC_FL_ZERO_RANGE without KEEP_SIZE extends a file it runs past the end of.
        self._size = None
        try:
            _fallocate(self.fd, mode, offset, length)
        except IOFailure as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise IOFailure(errno.ENOTSUP) from exc
            raise

    async def pdiscard(self, offset: int, length: int) -> None:
        try:
            _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        except IOFailure as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise

    async def flush_to_disk(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise IOFailure(exc.errno or errno.EIO) from exc

    async def truncate(self, length: int, prealloc: PreallocMode = "off") -> None:
        try:
            await self._truncate(length, prealloc)
        finally:
            # Whatever happened, the size is now the kernel's to tell.
            self._size = None

    async def _truncate(self, length: int, prealloc: PreallocMode) -> None:
        if prealloc == "off":
            try:
                os.ftruncate(self.fd, length)
            except OSError as exc:
                raise IOFailure(exc.errno or errno.EIO) from exc
            return
        # QEMU's file-posix checks for a shrink before it looks at the mode: 'metadata' on a
        # shrink is reported as a shrink.
        current = self.getlength()
        if length < current:
            raise IOFailure(errno.ENOTSUP, "Cannot use preallocation for shrinking files")
        if prealloc == "falloc":
            if length > current:
                try:
                    os.posix_fallocate(self.fd, current, length - current)
                except OSError as exc:
                    raise IOFailure(exc.errno or errno.EIO,
                                    f"Could not preallocate new data: {os.strerror(exc.errno or errno.EIO)}"
                                    ) from exc
        elif prealloc == "full":
            try:
                os.ftruncate(self.fd, length)
            except OSError as exc:
                raise IOFailure(exc.errno or errno.EIO,
                                f"Could not resize file: {os.strerror(exc.errno or errno.EIO)}") from exc
            try:
                self._write_zeroes_data(current, length - current)
            except IOFailure as exc:
                raise IOFailure(exc.errno,
                                f"Could not write zeros for preallocation: {os.strerror(exc.errno)}"
                                ) from exc
        else:
            raise IOFailure(errno.ENOTSUP, f"Unsupported preallocation mode: {prealloc}")

    def _write_zeroes_data(self, offset: int, length: int) -> None:
        """Write real zero bytes (``preallocation=full`` wants the blocks written, not a hole)."""
        chunk = self._bounce(min(length, 1 << 20))
        try:
            with memoryview(chunk) as view:
                end = offset + length
                while offset < end:
                    n = min(len(view), end - offset)
                    with view[:n] as piece:
                        self._write_full(offset, piece)
                    offset += n
        finally:
            chunk.close()

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole until the end
                return BlockStatus(_ZERO_AT, length, offset)
            return BlockStatus(_DATA_AT, length, offset)
        if data > offset:
            return BlockStatus(
                _ZERO_AT, min(length, data - offset), offset
            )
        hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        return BlockStatus(
            _DATA_AT, min(length, hole - offset), offset
        )

    # -- reopen ---------------------------------------------------------------------------------

    def reopen_prepare(self, options: dict[str, Any], flags: NodeFlags) -> None:
        if flags.direct != self.flags.direct or flags.read_only != self.flags.read_only:
            self._pending = self._open_fd(flags)

    def reopen_commit(self) -> None:
        if self._pending is not None:
            os.close(self.fd)
            self.fd, self.request_alignment = self._pending
            self._size = None
            self._pending = None

    def reopen_abort(self) -> None:
        if self._pending is not None:
            os.close(self._pending[0])
            self._pending = None
