"""What every ``img`` subcommand shares.

The failure type and qemu-img's size syntax; opening images as qemu-img does (cache modes,
``Could not open`` texts); the walk of block status down a backing chain; zero detection on
buffers; and qemu-img's progress line (``-p``, and one line on stderr per SIGUSR1).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

from blockgraph.drivers.base import BlockStatusFlags, ChildAccess
from blockgraph.errors import BlockError, OptionError
from blockgraph.graph.layer import BlockLayer
from blockgraph.graph.node import BlockBackend, Node
from blockgraph.objects import TOOL_OBJECT_TYPES, add_object, object_help
from blockgraph.options.cache import CACHE_MODES
from blockgraph.options.keyval import parse_drive_opts
from blockgraph.options.schema import parse_bool, parse_size

# qemu-img copies and compares through buffers of this size (its IO_BUF_SIZE).
IO_BUF_SIZE = 2 << 20
SECTOR_SIZE = 512

F = BlockStatusFlags


class Fail(Exception):
    """qemu-img's error line(s), already formatted (without the program name).

    :param code: the exit status (1 for most commands; ``compare`` uses 2 for errors).
    :param tail: further lines qemu-img prints without its name in front.
    """

    def __init__(self, message: str, code: int = 1, tail: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.tail = tail  # lines printed after the message without the program name


def size_arg(text: str) -> int:
    """A size argument as qemu-img parses it (k/M/G/T/P/E suffixes)."""
    try:
        return parse_size("size", text)
    except OptionError:
        raise Fail("Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
                   "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.") from None


_INT_CREATE_OPTIONS = ("cluster_size", "refcount_bits")
_BOOL_CREATE_OPTIONS = ("lazy_refcounts", "extended_l2", "data_file_raw")


def typed_create_option(key: str, value: str) -> object:
    """A ``-o key=value`` creation option with the type ``create_image`` wants."""
    if key in _INT_CREATE_OPTIONS:
        return parse_size(key, value)
    if key in _BOOL_CREATE_OPTIONS:
        return parse_bool(key, value)
    return value


def cache_options(mode: str, *, source: bool) -> tuple[dict[str, object], bool]:
    """Node options and BlockBackend write-cache flag for qemu-img's ``-t``/``-T`` mode.

    :raise Fail: ``Invalid cache option`` / ``Invalid source cache option`` as qemu-img.
    """
    found = CACHE_MODES.get(mode)
    if found is None:
        raise Fail(f"Invalid {'source ' if source else ''}cache option: {mode}")
    return ({"cache.direct": found.direct, "cache.no-flush": found.no_flush}, found.writeback)


def warn(prog: str, text: str) -> None:
    """qemu-img's ``warn_report``: ``prog: warning: text`` on stderr."""
    sys.stderr.write(f"{prog}: warning: {text}\n")
    sys.stderr.flush()


def parse_image_opts(text: str, prog: str) -> dict[str, object]:
    """An ``--image-opts`` argument: QemuOpts syntax, as qemu-img parses it.

    A leading element without ``=`` is the implied ``file`` key, which the block layer takes
    as a reference to a node name (hence QEMU's ``Cannot find device=... nor node-name=...``
    for a plain file name). Later bare words are short-form booleans, with QEMU's warning.
    """
    name_end = 0
    while name_end < len(text) and text[name_end] not in "=,":
        name_end += 1
    if name_end == len(text) or text[name_end] != "=":
        text = "file=" + text
    warnings: list[str] = []
    try:
        options: dict[str, object] = dict(parse_drive_opts(text, warnings))
    except OptionError as exc:
        raise Fail(str(exc)) from None
    for text_warning in warnings:
        warn(prog, text_warning)
    return options


def open_image(
    layer: BlockLayer,
    filename: str,
    fmt: str | None,
    *,
    read_only: bool,
    cache: str = "writeback",
    source_cache: bool = False,
    extra: dict[str, object] | None = None,
    fail_code: int = 1,
    image_opts: bool = False,
    prog: str = "qemu-img",
) -> BlockBackend:
    """Open ``filename`` as the root of a new anonymous BlockBackend, as qemu-img's img_open.

    With ``image_opts`` the name is a QemuOpts option string (``--image-opts``) rather than
    a file name; a format may not be given with it.

    :raise Fail: ``Could not open 'FILE': reason`` with exit status ``fail_code``.
    """
    options: dict[str, object] = {"read-only": read_only}
    open_name: str | None = filename
    if image_opts:
        if fmt:
            raise Fail("--image-opts and --format are mutually exclusive", fail_code)
        options.update(parse_image_opts(filename, prog))
        open_name = None
    elif fmt:
        options["driver"] = fmt
    node_opts, writeback = cache_options(cache, source=source_cache)
    options.update(node_opts)
    if extra:
        options.update(extra)
    bb = layer.new_backend("")
    bb.write_cache = writeback
    try:
        layer.run(layer.open_node(open_name, options, backend=bb))
    except BlockError as exc:
        layer.run(layer.remove_backend(bb))
        raise open_failure(filename, exc, fail_code) from None
    return bb


def open_failure(filename: str, exc: BlockError, code: int = 1) -> Fail:
    """``Could not open 'FILE': reason``; a reason's further lines (hints) get no program name."""
    first, _, more = str(exc).partition("\n")
    return Fail(f"Could not open '{filename}': {first}", code, tail=more + "\n" if more else "")


def new_layer(opts: list[tuple[str, str]]) -> BlockLayer:
    """A BlockLayer holding the ``--object`` objects among ``opts``, made in their order.

    :raise Fail: QEMU's text for a bad object.
    """
    layer = BlockLayer()
    for flag, value in opts:
        if flag != "--object":
            continue
        lines = object_help(value, TOOL_OBJECT_TYPES)
        if lines is not None:
            # qemu-img prints the help and exits successfully, whatever the command.
            layer.close()
            sys.stdout.write("".join(line + "\n" for line in lines))
            raise SystemExit(0)
        try:
            add_object(layer.objects, value, TOOL_OBJECT_TYPES)
        except BlockError as exc:
            layer.close()
            first, _, more = str(exc).partition("\n")
            raise Fail(first, tail=more + "\n" if more else "") from None
    return layer


def root(bb: BlockBackend) -> Node:
    assert bb.root is not None
    return bb.root


# -- block status down a chain ----------------------------------------------------------------


@dataclass(frozen=True)
class ChainStatus:
    """Block status of a range as seen through a backing chain (``bdrv_block_status_above``).

    ``depth`` counts backing links from the top to the node that answered (or to the bottom
    when no node has the range allocated); ``file`` is the child holding the data when
    ``offset`` is valid.
    """

    flags: BlockStatusFlags
    length: int
    depth: int
    offset: int | None
    file: ChildAccess | None


async def node_status(node: Node, offset: int, length: int) -> tuple[BlockStatusFlags, int, int | None,
                                                                     ChildAccess | None]:
    """One node's status with the generic layer's refinements.

    Data whose host range is a hole in the file below reads as zeroes (flag ZERO, length cut
    to the file's run); DATA or ZERO implies ALLOCATED; an unallocated range of a node without
    backing (or past its backing's end) reads as zeroes.
    """
    status = await node.block_status(offset, length)
    flags = status.flags & ~F.EOF
    n = status.length
    if n <= 0:
        return F.ZERO, length, None, None
    file = status.file
    if (flags & F.OFFSET_VALID and file is not None and status.offset is not None
            and status.recurse and flags & F.DATA and not flags & F.ZERO and file.node_name != node.node_name):
        below = await file.block_status(status.offset, n)
        if below.flags & F.EOF or below.length == 0:
            flags |= F.ZERO
        else:
            n = min(n, below.length)
            if below.flags & F.ZERO:
                flags |= F.ZERO
    if flags & (F.DATA | F.ZERO):
        flags |= F.ALLOCATED
    elif node.driver.supports_backing:
        backing = node.backing
        if backing is None or offset >= backing.getlength():
            flags |= F.ZERO
    return flags, n, status.offset if flags & F.OFFSET_VALID else None, file


async def chain_status(top: Node, offset: int, length: int, base: Node | None = None) -> ChainStatus:
    """Status of ``[offset, offset+length)`` from ``top`` down to (not including) ``base``.

    The answer covers a prefix of the range that is uniform all the way down.
    """
    node: Node | None = top
    depth = 0
    n = length
    flags = F(0)
    host: int | None = None
    file: ChildAccess | None = None
    while node is not None and node is not base:
        flags, got, host, file = await node_status(node, offset, n)
        n = min(n, got)
        if flags & F.ALLOCATED:
            return ChainStatus(flags, n, depth, host, file)
        nxt = node.backing
        if nxt is None or nxt is base:
            break
        if offset >= nxt.getlength():
            return ChainStatus(F.ZERO, n, depth, None, None)
        node = nxt
        depth += 1
    return ChainStatus(flags, n, depth, host, file)


# -- zero detection ---------------------------------------------------------------------------

_ZERO_BUF = bytes(IO_BUF_SIZE)


def _span_is_zero(view: memoryview, start: int, end: int) -> bool:
    # ``bytes.startswith`` with a buffer argument is a plain memcmp against the zero buffer,
    # without copying the slice; comparing memoryviews goes item by item and is ~50x slower.
    while start < end:
        n = min(end - start, IO_BUF_SIZE)
        if not _ZERO_BUF.startswith(view[start : start + n]):
            return False
        start += n
    return True


def _first_nonzero(view: memoryview, start: int, end: int) -> int:
    """Index of the first non-zero byte of ``view[start:end]``, or ``end``.

    Galloping memcmp probes (512 bytes, doubling) find the block holding the byte, a bisection
    narrows it down to 64 bytes: a handful of C-speed compares per call, where a regex search
    walks zero runs one byte at a time.
    """
    pos = start
    step = 512
    while pos < end:
        n = min(step, end - pos)
        if not _ZERO_BUF.startswith(view[pos : pos + n]):
            lo, hi = pos, pos + n
            while hi - lo > 64:
                mid = (lo + hi) // 2
                if _ZERO_BUF.startswith(view[lo:mid]):
                    lo = mid
                else:
                    hi = mid
            for i in range(lo, hi):
                if view[i]:
                    return i
            return hi  # pragma: no cover - the probe saw a non-zero byte in [lo, hi)
        pos += n
        step = min(step * 2, IO_BUF_SIZE)
    return end


def is_zero(buf: memoryview | bytes | bytearray) -> bool:
    """Whether a buffer is all zeroes (compared in C against a zero buffer)."""
    view = memoryview(buf).cast("B")
    return _span_is_zero(view, 0, len(view))


def first_nonzero(buf: memoryview | bytes | bytearray, start: int = 0) -> int:
    """Index of the first non-zero byte at or after ``start``, or ``len(buf)``."""
    view = memoryview(buf).cast("B")
    return _first_nonzero(view, start, len(view))


def first_difference(a: memoryview, b: memoryview) -> int:
    """Index of the first byte where ``a`` and ``b`` differ (they must differ somewhere)."""
    lo, hi = 0, len(a)
    # Bisect with slice comparisons: O(log n) comparisons, each done in C.
    while hi - lo > 4096:
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if a[i] != b[i]:
            return i
    return hi


def zero_runs(buf: bytearray | bytes, base: int, start: int, end: int,
              granularity: int) -> Iterator[tuple[bool, int, int]]:
    """Split ``buf[start:end]`` into (is_zero, run_start, run_end) runs, relative to ``buf``.

    As qemu-img: zeroes at the start of the range form a zero run of any length (whole
    sectors); further on, a zero run is made of whole ``granularity`` blocks aligned in guest
    offsets (``base`` is the guest offset of ``buf[0]``), or reaches ``end``. Runs are found
    with C-speed searches (``find`` of a zero block, memcmp probes for the next non-zero byte),
    never a loop per block.
    """
    needle = bytes(granularity)
    view = memoryview(buf)
    pos = search = start
    lead = _first_nonzero(view, start, end)
    if lead < end:
        lead -= (base + lead) % SECTOR_SIZE
    if lead > start:
        yield True, start, lead
        pos = search = lead
    while search < end:
        z = buf.find(needle, search, end)
        if z < 0:
            break
        q = z + (-(base + z) % granularity)
        if q >= end:
            break
        nz = _first_nonzero(view, q, end)
        zend = end if nz == end else nz - (base + nz) % granularity
        if zend - q >= granularity:
            if q > pos:
                yield False, pos, q
            yield True, q, zend
            pos = search = zend
        else:
            search = nz
    if pos < end:
        yield False, pos, end


# -- progress ---------------------------------------------------------------------------------


class Progress:
    """qemu-img's progress line.

    With ``-p``: ``    (x.xx/100%)\\r`` on stdout whenever the value moved more than
    ``min_skip`` (and at 0 and 100), ``\\n`` at the end. Without it, each SIGUSR1 asks for one
    ``    (x.xx/100%)\\n`` on stderr at the next update.
    """

    def __init__(self, enabled: bool, min_skip: float) -> None:
        self.enabled = enabled
        self.min_skip = min_skip
        self.current = 0.0
        self.last_print = 0.0
        self._pending = False
        self._old_handler: object = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._pending = True

    @contextmanager
    def running(self) -> Iterator[Progress]:
        """Install the SIGUSR1 handler while the command runs; print the final newline."""
        installed = False
        if not self.enabled and hasattr(signal, "SIGUSR1"):
            try:
                self._old_handler = signal.signal(signal.SIGUSR1, self._on_signal)
                installed = True
            except ValueError:  # not the main thread
                pass
        try:
            yield self
        finally:
            if installed:
                signal.signal(signal.SIGUSR1, self._old_handler)  # type: ignore[arg-type]

    def end(self) -> None:
        if self.enabled:
            sys.stdout.write("\n")
            sys.stdout.flush()

    def update(self, delta: float, maximum: float = 100.0) -> None:
        """Advance by ``delta`` percent of ``maximum`` (``maximum == 0``: set to ``delta``)."""
        current = delta if maximum == 0 else self.current + delta / 100 * maximum
        current = min(current, 100.0)
        self.current = current
        if self._pending:
            self._pending = False
            sys.stderr.write(f"    ({current:3.2f}/100%)\n")
            sys.stderr.flush()
        if not self.enabled:
            return
        if (current > self.last_print + self.min_skip or current < self.last_print - self.min_skip
                or current == 100.0 or current == 0.0):
            self.last_print = current
            sys.stdout.write(f"    ({current:3.2f}/100%)\r")
            sys.stdout.flush()
