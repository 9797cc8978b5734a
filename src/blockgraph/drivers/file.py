"""The ``file`` protocol driver: a POSIX file (QEMU's file-posix).

``cache.direct=on`` opens the file with ``O_DIRECT``. The kernel then wants offsets, lengths
and buffer addresses aligned; the request alignment is probed at open (and again when a reopen
switches ``O_DIRECT`` on), the request layer pads requests to it, and this driver bounces data
through page-aligned buffers, since Python buffers have no alignment guarantee.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
from typing import TYPE_CHECKING, Any, ClassVar

from blockgraph.drivers import workers
from blockgraph.drivers.base import (
    BlockDriver,
    BlockStatus,
    BlockStatusFlags,
    FileRange,
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


_PAGE = mmap.PAGESIZE
# cachestat(2) (Linux 6.5): how many pages of a file range the page cache holds. 451 in the
# generic system call table, which every architecture but alpha and mips numbers by.
_SYS_CACHESTAT = None if os.uname().machine.startswith(("alpha", "mips")) else 451
_cachestat_types: tuple[Any, Any] | None = None


class _CacheProbe:
    """Asks cachestat(2) about one file. Each driver has its own: the call fills buffers, and
    drivers of different BlockLayers may run in different threads."""

    def __init__(self) -> None:
        import ctypes

        global _libc, _cachestat_types
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        if _cachestat_types is None:

            class Range(ctypes.Structure):
                _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]

            class Stat(ctypes.Structure):
                _fields_ = [(name, ctypes.c_uint64) for name in (
                    "nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]

            _cachestat_types = (Range, Stat)
        range_type, stat_type = _cachestat_types
        self._syscall = _libc.syscall
        self._span = range_type()
        self._stat = stat_type()
        self._args = (ctypes.c_long(_SYS_CACHESTAT or -1), ctypes.byref(self._span),
                      ctypes.byref(self._stat), ctypes.c_uint(0))
        self._int = ctypes.c_int

    def cached_pages(self, fd: int, offset: int, length: int) -> int | None:
        """Pages of ``[offset, offset + length)`` (page-aligned) in the page cache; None
        when the kernel cannot tell (no cachestat, or not for this file)."""
        if _SYS_CACHESTAT is None:
            return None
        self._span.off = offset
        self._span.len = length
        number, span, stat, flags = self._args
        if self._syscall(number, self._int(fd), span, stat, flags) != 0:
            return None
        return int(self._stat.nr_cache)


# Requests from this size on run in a worker thread (QEMU's aio=threads); smaller ones run
# inline: the hand-off costs more than the system call of a 4 KiB request (see workers). Above
# one default qcow2 cluster: a fresh cluster's 64 KiB COW write inline was measured twice as
# fast as in a thread (qcow2 rand write 4k, qd16 ~90 -> ~165 MB/s; qd1 writethrough 4.3 -> 7.9).
OFFLOAD_MIN = 128 * 1024
# preadv2(RWF_NOWAIT): read only what is in the page cache, never wait (Linux 4.14).
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)


class _Fd:
    """A file descriptor that operations in worker threads hold a reference on.

    The number of a closed fd is reused by the next ``open``: a worker thread must never run
    on an fd that was closed under it (it would read or write another file). Close and reopen
    retire the fd instead; the last operation to finish closes it.
    """

    __slots__ = ("fd", "users", "retired")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.retired = False

    def retire(self) -> None:
        self.retired = True
        if not self.users:
            os.close(self.fd)

    def release(self) -> None:
        self.users -= 1
        if self.retired and not self.users:
            os.close(self.fd)


def _read_full(fd: int, offset: int, buf: memoryview) -> int:
    done = 0
    while done < len(buf):
        try:
            n = os.preadv(fd, [buf[done:]], offset + done)
        except OSError as exc:
            raise IOFailure(exc.errno or errno.EIO) from exc
        if n == 0:
            break
        done += n
    return done


def _read_direct(fd: int, offset: int, buf: memoryview) -> int:
    # O_DIRECT wants an aligned buffer: read into a page-aligned bounce buffer.
    length = len(buf)
    bounce = mmap.mmap(-1, max(length, 1))
    try:
        with memoryview(bounce) as view:
            got = _read_full(fd, offset, view[:length])
            buf[:got] = view[:got]
    finally:
        bounce.close()
    return got


def _write_full(fd: int, offset: int, buf: memoryview) -> None:
    done = 0
    while done < len(buf):
        try:
            done += os.pwritev(fd, [buf[done:]], offset + done)
        except OSError as exc:
            raise IOFailure(exc.errno or errno.EIO) from exc


def _write_direct(fd: int, offset: int, buf: memoryview) -> None:
    bounce = mmap.mmap(-1, max(len(buf), 1))
    try:
        with memoryview(bounce) as view:
            view[: len(buf)] = buf
            _write_full(fd, offset, view[: len(buf)])
    finally:
        bounce.close()


def _datasync(fd: int) -> None:
    try:
        os.fdatasync(fd)
    except OSError as exc:
        raise IOFailure(exc.errno or errno.EIO) from exc


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
        # Bumped whenever the size may change other than by a write growing the file: a write
        # that ran in a worker thread meanwhile does not know where the file ends.
        self._size_epoch = 0
        # The fd again, for operations in worker threads (see _Fd); None while closed.
        self._fd: _Fd | None = None
        # Writes running in worker threads, and the event that tells when none is left.
        self._writing = 0
        self._writes_done: asyncio.Event | None = None
        self.flags = NodeFlags()
        self.request_alignment = 1
        self._pending: tuple[int, int] | None = None  # (fd, alignment) prepared by reopen
        # The last data extent block status found, [start, end) (QEMU's block_status_cache):
        # an NBD server asks before every read, two lseeks each time. Writes only add data;
        # zero writes, discards and size changes forget it.
        self._data_extent: tuple[int, int] | None = None
        # Whether reads may try RWF_NOWAIT first (cleared when the file system refuses it).
        self._nowait = _RWF_NOWAIT != 0
        # What map_read asks about the page cache (made on first use); False once the kernel
        # could not answer.
        self._cache_probe: _CacheProbe | bool = True
        self._probe_byte = bytearray(1)

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
        self._fd = _Fd(self.fd)

    async def close(self) -> None:
        if self._fd is not None:
            # Operations still running in a worker thread close it when they are done.
            self._fd.retire()
            self._fd = None
            self.fd = -1
            self._forget_size()

    def _forget_size(self) -> None:
        self._size = None
        self._size_epoch += 1
        self._data_extent = None

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

    def _hold_fd(self) -> _Fd:
        fd = self._fd
        if fd is None:
            raise IOFailure(errno.EBADF)
        fd.users += 1
        return fd

    async def preadv(self, offset: int, buf: memoryview, flags: RequestFlags) -> None:
        length = len(buf)
        if self.flags.direct:
            read = _read_direct
        else:
            read = _read_full
            if length >= OFFLOAD_MIN and self._nowait:
                # Data in the page cache is copied in ~20 us per 256 KiB: less than a hand-off
                # to a thread costs. Only what the kernel would have to wait for goes there.
                try:
                    got = os.preadv(self.fd, [buf], offset, _RWF_NOWAIT)
                except BlockingIOError:
                    got = 0
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise IOFailure(exc.errno or errno.EIO) from exc
                    self._nowait = False  # not on this file system
                    got = 0
                if got == length:
                    return
                if got:
                    # Short: part of it is not cached (or the file ends).
                    offset += got
                    buf = buf[got:]
                    length -= got
        if length < OFFLOAD_MIN:
            got = read(self.fd, offset, buf)
        else:
            fd = self._hold_fd()
            try:
                got = await workers.run(read, fd.fd, offset, buf)
            finally:
                fd.release()
        if got < length:
            # Past the end of a file reads as zeroes, as a hole would.
            buf[got:] = bytes(length - got)

    def map_read(self, offset: int, length: int) -> FileRange | None:
        # Only what the page cache holds in full: sendfile of anything else would wait for
        # the disk on the event loop's thread (preadv sends that to a worker thread).
        # O_DIRECT files bypass the cache; past the end preadv makes the zeroes.
        probe = self._cache_probe
        if self.flags.direct or probe is False or self._fd is None:
            return None
        if offset + length > self.getlength():
            return None
        if probe is True:
            probe = self._cache_probe = _CacheProbe()
        first = offset - offset % _PAGE
        end = -(-(offset + length) // _PAGE) * _PAGE
        cached = probe.cached_pages(self.fd, first, end - first)
        if cached is None:
            self._cache_probe = False
            return None
        if cached < (end - first) // _PAGE:
            return None
        # cachestat counts pages that readahead has put in the cache and is still reading:
        # the last one, read without waiting, tells whether all have arrived.
        if self._nowait:
            try:
                os.preadv(self.fd, [self._probe_byte], offset + length - 1, _RWF_NOWAIT)
            except OSError:
                return None
        fd = self._hold_fd()
        return FileRange(fd.fd, offset, length, fd.release)

    async def pwritev(self, offset: int, buf: memoryview, flags: RequestFlags) -> None:
        write = _write_direct if self.flags.direct else _write_full
        end = offset + len(buf)
        if len(buf) < OFFLOAD_MIN:
            try:
                write(self.fd, offset, buf)
            except IOFailure:
                self._forget_size()  # a partial write may have extended the file
                raise
            self._grown_to(end)
            return
        fd = self._hold_fd()
        epoch = self._size_epoch
        self._writing += 1
        try:
            await workers.run(write, fd.fd, offset, buf)
        except BaseException:
            self._forget_size()
            raise
        finally:
            fd.release()
            self._writing -= 1
            if not self._writing and self._writes_done is not None:
                self._writes_done.set()
                self._writes_done = None
        if epoch == self._size_epoch:
            self._grown_to(end)
        else:
            # A truncate or zero write changed the size while this write ran: which came
            # first is unknown, the kernel knows.
            self._forget_size()

    async def _wait_writes(self) -> None:
        """Wait until no write runs in a worker thread (before the size changes: a write in
        flight past the new end would extend the file again, or be cut off)."""
        while self._writing:
            if self._writes_done is None:
                self._writes_done = asyncio.Event()
            await self._writes_done.wait()

    def _write_full(self, offset: int, buf: memoryview) -> None:
        try:
            _write_full(self.fd, offset, buf)
        except IOFailure:
            self._forget_size()
            raise
        self._grown_to(offset + len(buf))

    async def pwrite_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        size = self.getlength()
        if offset >= size and self._writing:
            await self._wait_writes()
            size = self.getlength()
        if offset >= size:
            # Beyond the end, growing the file is enough: the new range reads as zeroes.
            self._forget_size()
            os.ftruncate(self.fd, offset + length)
            return
        mode = (
            _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
            if flags & RequestFlags.MAY_UNMAP
            else _FALLOC_FL_ZERO_RANGE
        )
        # FALLOC_FL_ZERO_RANGE without KEEP_SIZE extends a file it runs past the end of.
        self._forget_size()
        try:
            _fallocate(self.fd, mode, offset, length)
        except IOFailure as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise IOFailure(errno.ENOTSUP) from exc
            raise

    async def pdiscard(self, offset: int, length: int) -> None:
        self._data_extent = None
        try:
            _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        except IOFailure as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise

    async def flush_to_disk(self) -> None:
        # Inline: in a worker thread the hand-off cost ~50 us of CPU per flush, and a
        # writethrough client at queue depth 1 (a flush after every write) got no faster.
        _datasync(self.fd)

    async def truncate(self, length: int, prealloc: PreallocMode = "off") -> None:
        await self._wait_writes()
        try:
            await self._truncate(length, prealloc)
        finally:
            # Whatever happened, the size is now the kernel's to tell.
            self._forget_size()

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
        extent = self._data_extent
        if extent is not None and extent[0] <= offset < extent[1]:
            return BlockStatus(_DATA_AT, min(length, extent[1] - offset), offset)
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
        self._data_extent = (offset, hole)
        return BlockStatus(
            _DATA_AT, min(length, hole - offset), offset
        )

    # -- reopen ---------------------------------------------------------------------------------

    def reopen_prepare(self, options: dict[str, Any], flags: NodeFlags) -> None:
        if flags.direct != self.flags.direct or flags.read_only != self.flags.read_only:
            self._pending = self._open_fd(flags)

    def reopen_commit(self) -> None:
        if self._pending is not None:
            # Operations still running in a worker thread on the old fd close it when done.
            if self._fd is not None:
                self._fd.retire()
            self.fd, self.request_alignment = self._pending
            self._fd = _Fd(self.fd)
            self._forget_size()
            self._pending = None

    def reopen_abort(self) -> None:
        if self._pending is not None:
            os.close(self._pending[0])
            self._pending = None
