"""The one interface every block driver implements, and what a driver may see of the graph.

Drivers sit below the graph and the request layer (``shared/DESIGN.md``): they never import
them. A driver receives two narrow views instead:

* :class:`OpenContext` while it opens: its node's name and flags, and a way to open children
  (the graph implements it, applying the inheritance rules of the child's role);
* :class:`ChildAccess` for each child afterwards: the child node's request layer.

All I/O methods are ``async``: QEMU's coroutines become coroutines here. Offsets and lengths
are in bytes. A driver's I/O methods are only ever called with requests already aligned to its
:attr:`BlockDriver.request_alignment` and inside the node's length, because the request layer
above does the padding and the bounds checks once for every driver.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

from blockgraph.errors import ENOTSUP, BlockError, IOFailure
from blockgraph.objects import ObjectRegistry
from blockgraph.options.schema import OptionSpec

# QEMU's BDRV_MAX_LENGTH: no request may reach past this byte (INT64_MAX rounded down to the
# largest alignment a node can have, 1 GiB), so that no driver's arithmetic overflows.
MAX_LENGTH = ((1 << 63) - 1) & ~((1 << 30) - 1)


class ChildRole(enum.IntFlag):
    """QEMU's ``BDRV_CHILD_*`` role bits (``specs/qemu-cache-model.md`` b.5)."""

    DATA = 1 << 0
    METADATA = 1 << 1
    FILTERED = 1 << 2
    COW = 1 << 3
    PRIMARY = 1 << 4

    # The combinations the drivers here use.
    IMAGE = PRIMARY | DATA | METADATA  # qcow2's file, without a data-file
    FILTERED_PRIMARY = PRIMARY | FILTERED  # raw's file, blkdebug's image
    BACKING = COW


class RequestFlags(enum.IntFlag):
    """Per-request flags (``BDRV_REQ_*``)."""

    NONE = 0
    FUA = 1 << 0
    MAY_UNMAP = 1 << 1
    NO_FALLBACK = 1 << 2
    COMPRESSED = 1 << 3  # write -c: qcow2 stores whole clusters compressed


# QEMU's PreallocMode: how a truncate that grows a node allocates the new area. ``off`` leaves
# it sparse; ``metadata`` (formats only) allocates tables and clusters without touching data;
# ``falloc`` also reserves the space in the file; ``full`` also writes zeroes to it.
PreallocMode = Literal["off", "metadata", "falloc", "full"]
PREALLOC_MODES: dict[str, PreallocMode] = {
    "off": "off", "metadata": "metadata", "falloc": "falloc", "full": "full",
}


class BlockStatusFlags(enum.IntFlag):
    """``BDRV_BLOCK_*``: what a block status query says of a range."""

    DATA = 1 << 0
    ZERO = 1 << 1
    OFFSET_VALID = 1 << 2
    ALLOCATED = 1 << 4
    EOF = 1 << 5


@dataclass(frozen=True)
class BlockStatus:
    """The answer to one block status query: ``length`` bytes from the query's offset."""

    flags: BlockStatusFlags
    length: int
    offset: int | None = None  # host offset in ``file`` when OFFSET_VALID
    file: ChildAccess | None = None
    # Whether a caller refining zeroes may ask ``file`` about the host range (the opposite of
    # QEMU's BDRV_BLOCK_RECURSE default: qcow2 never has it asked of an external data file).
    recurse: bool = True


@dataclass
class NodeFlags:
    """The open flags of one node that drivers act on."""

    read_only: bool = False
    direct: bool = False  # cache.direct: O_DIRECT on the file driver
    no_flush: bool = False  # cache.no-flush: skip this node's disk flush
    discard_unmap: bool = False  # discard=unmap rather than ignore
    no_backing: bool = False
    # -drive's aio= mode, which every node of the drive inherits as its default (QEMU's
    # BDRV_O_NATIVE_AIO / BDRV_O_IO_URING open flags); None = threads.
    aio: str | None = None
    # Opened for an image check (QEMU's BDRV_O_CHECK): a corrupt or dirty qcow2 image opens
    # read-write without the automatic repair, so that the check can report and fix it.
    check: bool = False
    # Opened only to describe the image (QEMU's BDRV_O_NO_IO, ``qemu-img info``): a qcow2
    # node then leaves the external data file its header names unopened.
    no_io: bool = False


class FileRange:
    """Where the bytes of a read lie: ``length`` bytes at ``offset`` of the open file ``fd``.

    A caller that only passes a read's data on (an NBD server sending it to a socket) can
    have the kernel copy it from the page cache with ``sendfile``, instead of reading it into
    memory and sending it from there: one copy of every byte instead of two, none of them on
    the event loop's thread in Python. The range keeps the file open (a close or reopen of
    its node retires the fd only) until :meth:`release`, which the holder must call once,
    when done with it.

    The bytes are taken no earlier than when they are sent (on a unix socket, the kernel
    copies them only when the peer receives them), not when the range was made: a write
    that completed before the range was made is always seen; one that runs concurrently may
    or may not be, as with any read racing a write. A file that shrank meanwhile reads as
    zeroes past its new end. A read error comes only when the bytes are sent, after the
    reply's header: the sender can only end its connection then (a file range is made only
    for data in the page cache, where such errors are rare).
    """

    __slots__ = ("fd", "offset", "length", "_release")

    def __init__(self, fd: int, offset: int, length: int, release: Callable[[], None]) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length
        self._release: Callable[[], None] | None = release

    def __len__(self) -> int:
        return self.length

    def read(self) -> bytearray:
        """The bytes, read from the file now (zeroes past its end), for a caller that cannot
        have the kernel copy them.

        :raise OSError: the read failed.
        """
        data = bytearray(self.length)
        view = memoryview(data)
        done = 0
        while done < self.length:
            n = os.preadv(self.fd, [view[done:]], self.offset + done)
            if not n:
                break
            done += n
        return data

    def release(self) -> None:
        """Let the file go (once; later calls do nothing)."""
        release, self._release = self._release, None
        if release is not None:
            release()


class ChildAccess(Protocol):
    """A driver's view of one child: that child node's request layer."""

    @property
    def name(self) -> str: ...

    @property
    def role(self) -> ChildRole: ...

    @property
    def node_name(self) -> str: ...

    @property
    def filename(self) -> str: ...

    @property
    def driver_name(self) -> str: ...

    def getlength(self) -> int: ...

    async def preadv(self, offset: int, buf: memoryview, flags: RequestFlags = RequestFlags.NONE) -> None: ...

    async def pwritev(self, offset: int, buf: memoryview, flags: RequestFlags = RequestFlags.NONE) -> None: ...

    async def pwrite_zeroes(self, offset: int, length: int, flags: RequestFlags = RequestFlags.NONE) -> None: ...

    async def pdiscard(self, offset: int, length: int) -> None: ...

    async def flush(self) -> None: ...

    async def truncate(self, length: int, prealloc: PreallocMode = "off") -> None: ...

    async def block_status(self, offset: int, length: int) -> BlockStatus: ...

    def map_read(self, offset: int, length: int) -> FileRange | None: ...


async def fire_debug_event(child: ChildAccess | None, event: str) -> None:
    """Fire ``event`` at ``child``'s node, for a parent driver (QEMU's ``BLKDBG_EVENT``).

    Only child views that implement ``debug_event`` (a blkdebug node below) react; for all others
    this does nothing, as events do in QEMU on nodes without a handler. It lives here rather
    than in the blkdebug module so that raw, which fires events on every request, does not
    import blkdebug at start-up.
    """
    if child is None:
        return
    handler = getattr(child, "debug_event", None)
    if handler is not None:
        await handler(event)


class OpenContext(Protocol):
    """What a driver may ask of the graph while it is being opened."""

    @property
    def node_name(self) -> str: ...

    @property
    def flags(self) -> NodeFlags: ...

    @property
    def objects(self) -> ObjectRegistry:
        """The user-creatable objects (``--object``) a driver may refer to by id."""
        ...

    async def open_child(
        self,
        name: str,
        role: ChildRole,
        *,
        filename: str | None = None,
        driver: str | None = None,
        allow_none: bool = False,
        read_only: bool | None = None,
    ) -> ChildAccess | None:
        """Open (or look up, if referenced) the child ``name``; ``None`` only with ``allow_none``.

        ``filename``/``driver`` are defaults from the parent's metadata (a qcow2 header's backing
        file name); options the user gave for the child win over them.
        """
        ...

    def has_child_options(self, name: str) -> bool:
        """Whether the user gave any option (or a reference) for child ``name``."""
        ...

    def drop_child_options(self, name: str) -> None:
        """Forget what the user gave for child ``name``: that child will not be opened."""
        ...

    def set_child_role(self, name: str, role: ChildRole) -> None:
        """Give the already opened child ``name`` another role (what it holds turned out
        different: qcow2's ``file`` keeps no data once an external data file is open)."""
        ...


class SnapshotInfo(Protocol):
    """What a listing shows of one internal snapshot (QEMU's ``QEMUSnapshotInfo``)."""

    id_str: str
    name: str
    vm_state_size: int  # bytes of VM state saved with it; 0 when no VM was saved
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    icount: int  # -1: not recorded


@dataclass
class DriverInfo:
    """What ``info block`` and ``query-*`` report about a node, as its driver knows it."""

    backing_file: str | None = None
    backing_format: str | None = None
    encrypted: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class BlockDriver:
    """Base class of all drivers. Subclasses set the class attributes and override I/O methods.

    ``format_name`` is the ``driver=`` value. ``is_format`` picks which of QEMU's two
    unknown-option texts applies ("Block format ... does not support" vs "Block protocol ...
    doesn't support").
    """

    format_name: ClassVar[str] = ""
    is_format: ClassVar[bool] = True
    is_filter: ClassVar[bool] = False
    # URI-ish prefixes that select this driver from a filename ("blkdebug:", "nbd:").
    protocol_prefixes: ClassVar[tuple[str, ...]] = ()
    runtime_options: ClassVar[Mapping[str, OptionSpec]] = {}
    # List-valued options a schema cannot describe (``inject-error.0.event``): keys equal to or
    # under these prefixes reach ``open()`` untouched.
    runtime_option_prefixes: ClassVar[tuple[str, ...]] = ()
    # Write flags handled natively; the request layer emulates the others (FUA by a flush).
    supported_write_flags: ClassVar[RequestFlags] = RequestFlags.NONE
    supports_backing: ClassVar[bool] = False
    # Protocol drivers over growable storage (files) accept requests past their end: format
    # drivers above them extend the image that way. Every other node is range-checked.
    growable: ClassVar[bool] = False

    request_alignment: int = 1

    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        """Score how likely ``header`` (first 2 KiB of a file) is in this format; 0 = no."""
        return 0

    @classmethod
    def parse_filename(cls, filename: str, options: dict[str, Any]) -> None:
        """Turn a ``prefix:...`` filename into options (``blkdebug:CONF:FILE``); in place."""

    async def open(self, ctx: OpenContext, options: dict[str, Any]) -> None:
        """Open with ``options``: this driver's runtime options, typed and validated."""

    async def close(self) -> None:
        """Release what ``open`` took. Children are closed by the graph afterwards."""

    def getlength(self) -> int:
        raise NotImplementedError

    async def preadv(self, offset: int, buf: memoryview, flags: RequestFlags) -> None:
        raise IOFailure(ENOTSUP)

    async def pwritev(self, offset: int, buf: memoryview, flags: RequestFlags) -> None:
        raise IOFailure(ENOTSUP)

    def map_read(self, offset: int, length: int) -> FileRange | None:
        """The file range that holds ``[offset, offset + length)`` (see :class:`FileRange`),
        for a read that is to be copied in the kernel; None when the data does not lie whole
        in one range of a plain file whose pages are all in the page cache (then the caller
        reads with :meth:`preadv`, which may wait for the disk: this must not).

        Drivers that transform or check their data never map; the default does not.
        """
        return None

    async def pwrite_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        """Write zeroes natively; ``IOFailure(ENOTSUP)`` makes the request layer write a buffer."""
        raise IOFailure(ENOTSUP)

    async def pdiscard(self, offset: int, length: int) -> None:
        """Discard is advisory: the default does nothing, as QEMU does for drivers without it."""

    async def flush_to_os(self) -> None:
        """Push what the driver caches (metadata, buffers) down to its children."""

    async def flush_to_disk(self) -> None:
        """Make what reached this node stable (``fdatasync`` for files)."""

    async def truncate(self, length: int, prealloc: PreallocMode = "off") -> None:
        """Resize to ``length`` bytes; a growing truncate allocates the new area per ``prealloc``.

        A driver that cannot do a mode refuses it with QEMU's text (``Unsupported
        preallocation mode: ...``), so that no caller has to know which driver does what.
        """
        raise IOFailure(ENOTSUP)

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        """Default for drivers that know nothing better: all data, allocated."""
        return BlockStatus(BlockStatusFlags.DATA | BlockStatusFlags.ALLOCATED, length)

    # -- VM state ---------------------------------------------------------------------------
    #
    # A format that keeps a VM state area (qcow2 does, for savevm) sets ``has_vmstate`` and
    # overrides both methods. Without it the request layer passes the request on to the
    # node's primary child (a filter or raw over qcow2 still reaches it), as QEMU does.

    has_vmstate: ClassVar[bool] = False

    async def load_vmstate(self, pos: int, buf: memoryview) -> None:
        """Read ``len(buf)`` bytes at ``pos`` of the VM state area into ``buf``.

        Called with ``pos`` and the length aligned to :attr:`request_alignment`.
        """
        raise IOFailure(ENOTSUP)

    async def save_vmstate(self, pos: int, buf: memoryview) -> None:
        """Write ``buf`` at ``pos`` of the VM state area; aligned like :meth:`load_vmstate`."""
        raise IOFailure(ENOTSUP)

    # -- changes to the image's relation to its backing file ---------------------------------

    async def make_empty(self) -> None:
        """Drop everything the image holds, so that it reads through to its backing file.

        QEMU's ``bdrv_make_empty`` (``qemu-img commit`` without ``-d``).

        :raise IOFailure: ``ENOTSUP`` for formats that cannot, the default.
        """
        raise IOFailure(ENOTSUP)

    async def change_backing_file(self, backing_file: str | None, backing_format: str | None) -> None:
        """Record a new backing file name (and format) in the image's metadata.

        Only the metadata changes, not the graph (QEMU's ``bdrv_change_backing_file``).

        :raise BlockError: ``Operation not supported`` for formats without backing files (the
            default), or QEMU's message when the name does not fit.
        """
        raise BlockError("Operation not supported")

    def snapshot_list(self) -> Sequence[SnapshotInfo]:
        """The image's internal snapshots; none for formats without them."""
        return ()

    def info(self) -> DriverInfo:
        return DriverInfo()

    def filename(self) -> str | None:
        """The plain filename this node can be described by, or None if only json: works."""
        return None

    def open_options(self) -> dict[str, object]:
        """Options beyond ``driver`` and the children that a json: description must carry."""
        return {}

    def set_backing(self, child: ChildAccess | None) -> None:
        """The graph gave this node a new backing child (snapshot, commit, stream)."""
        raise BlockError(f"Driver '{self.format_name}' does not support backing files")

    def reopen_prepare(self, options: dict[str, Any], flags: NodeFlags) -> None:
        """Check that the driver can switch to ``options``/``flags``; change nothing yet."""

    def reopen_commit(self) -> None:
        """Apply what ``reopen_prepare`` accepted. Must not fail."""

    def reopen_abort(self) -> None:
        """Forget what ``reopen_prepare`` prepared."""


def resolve_backing_filename(base: str, backing: str) -> str:
    """QEMU's ``path_combine``: relative backing names are relative to the image's directory."""
    if backing.startswith("json:") or os.path.isabs(backing) or _is_protocol(backing):
        return backing
    if base.startswith("json:") or _is_protocol(base):
        return backing
    return os.path.join(os.path.dirname(base), backing)


def _is_protocol(name: str) -> bool:
    colon = name.find(":")
    slash = name.find("/")
    return colon > 0 and (slash < 0 or colon < slash)
