"""qemu-io's command language, run against one BlockBackend.

Shared by the ``io`` tool and the HMP ``qemu-io`` command, so both print exactly the same
text. Output goes through callbacks (``out`` for what qemu-io prints on stdout, ``err`` for
error reports, which the tool prefixes with the program name, ``raw_err`` for the plain
messages qemu-io writes to stderr unprefixed), so the caller decides where it lands.

Everything qemu-io prints is modelled on qemu-io 7.2's observed behaviour: argument counts are
checked on the raw words (options included) before any option is parsed, a command line is
split on spaces only (no quoting), numbers follow ``cvtnum`` (``qemu_strtosz``) rules.

Asynchronous requests (``aio_read``/``aio_write``) run concurrently as tasks; their reports
are printed in submission order when they are collected: at ``aio_flush``, ``close``, the end
of the session, or (over HMP, where no later command would collect them) at the end of the
command that started them.
"""

from __future__ import annotations

import asyncio
import getopt
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blockgraph.drivers.base import PREALLOC_MODES, BlockStatusFlags, PreallocMode, RequestFlags
from blockgraph.errors import ENOTSUP, BlockError, IOFailure, OptionError
from blockgraph.graph.inherit import AIO_FLAG
from blockgraph.graph.node import BlockBackend, Node
from blockgraph.graph.reopen import reopen
from blockgraph.options.cache import parse_cache_mode
from blockgraph.options.keyval import parse_drive_opts

if TYPE_CHECKING:
    from blockgraph.graph.layer import BlockLayer

# BDRV_REQUEST_MAX_BYTES: the largest single request the block layer takes.
REQUEST_MAX_BYTES = 0x7FFFFFFF & ~511
_INT64_MAX = (1 << 63) - 1
_SECTOR = 512

_UNITS = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}


class CvtnumError(ValueError):
    """A number qemu-io cannot take; ``too_large`` picks qemu-io's ERANGE message."""

    def __init__(self, text: str, too_large: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.too_large = too_large

    def message(self) -> str:
        if self.too_large:
            return f"Parsing error: argument too large -- {self.text}"
        return f"Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {self.text}"


def _digits_end(text: str, pos: int, digits: str) -> int:
    while pos < len(text) and text[pos] in digits:
        pos += 1
    return pos


def parse_size(text: str) -> tuple[int, bool]:
    """qemu-io's number syntax (``qemu_strtosz`` with bytes as the default unit).

    Decimal (``010`` is ten) or ``0x`` hex, an optional decimal fraction (needs a unit unless it
    is zero, no exponent, not on hex), an optional one-letter binary unit (``b k m g t p e``,
    any case), nothing after it; at most ``INT64_MAX``.

    :return: the value, and whether qemu-io warns that a unit on a hex number is deprecated.
    :raise CvtnumError: for anything else.
    """
    pos = 0
    if text[:1] == "+":
        pos = 1
    start = pos
    hexadecimal = text[pos : pos + 2].lower() == "0x"
    if hexadecimal:
        end = _digits_end(text, pos + 2, "0123456789abcdefABCDEF")
        if end == pos + 2:
            raise CvtnumError(text)
        value = int(text[pos + 2 : end], 16)
    else:
        end = _digits_end(text, pos, "0123456789")
        if end == start:
            raise CvtnumError(text)
        value = int(text[start:end])
    pos = end
    fraction = 0.0
    if pos < len(text) and text[pos] == ".":
        if hexadecimal:
            raise CvtnumError(text)
        frac_end = _digits_end(text, pos + 1, "0123456789")
        if frac_end < len(text) and text[frac_end] in "eE":
            raise CvtnumError(text)
        if frac_end > pos + 1:
            fraction = float("0" + text[pos:frac_end])
        pos = frac_end
    mult = 1
    has_unit = False
    if pos < len(text) and text[pos].lower() in _UNITS:
        mult = _UNITS[text[pos].lower()]
        has_unit = mult != 1
        pos += 1
    if pos != len(text):
        raise CvtnumError(text)
    if fraction and mult == 1:
        raise CvtnumError(text)
    if value >= 1 << 64:
        raise CvtnumError(text, too_large=True)
    total = value * mult + int(fraction * mult)
    if total > _INT64_MAX:
        raise CvtnumError(text, too_large=True)
    return total, hexadecimal and has_unit


def cvtnum(text: str) -> int:
    """qemu-io's number syntax; see :func:`parse_size`. :raise CvtnumError: bad input."""
    return parse_size(text)[0]


def cvtstr(value: float) -> str:
    """A byte count as qemu-io prints it: ``512 bytes``, ``4 KiB``, ``1.500 KiB``.

    Units take three decimals, bytes six (``1.339076 bytes``); the decimals are cut at the first
    ``.000`` (so ``1.000100 bytes`` prints as ``1 bytes``, as qemu-io does).
    """
    text, unit = f"{value:f}", "bytes"
    for shift, name in ((60, "EiB"), (50, "PiB"), (40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if value >= 1 << shift:
            text, unit = f"{value / (1 << shift):.3f}", name
            break
    cut = text.find(".000")
    if cut >= 0:
        text = text[:cut]
    return f"{text} {unit}"


def timestr(seconds: float, machine: bool = False) -> str:
    """An elapsed time as qemu-io prints it.

    Under a second, ``00.24 sec``; from one second on (and always in the ``-C`` format),
    ``H:MM:SS.cc``.
    """
    nanoseconds = round(seconds * 1e9)
    whole, fraction = divmod(nanoseconds, 1_000_000_000)
    if whole == 0 and not machine:
        return f"{seconds:05.2f} sec"
    centis = fraction // 10_000_000
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}.{centis:02d}"


def report_lines(verb: str, offset: int, total: int, count: int, ops: int, elapsed: float,
                 machine: bool) -> list[str]:
    """The statistics qemu-io prints after a request (``print_report``)."""
    elapsed = max(elapsed, 1e-9)
    if machine:
        return [f"{total},{ops},{timestr(elapsed, True)},{total / elapsed:.3f},{ops / elapsed:.3f}"]
    return [f"{verb} {total}/{count} bytes at offset {offset}",
            f"{cvtstr(total)}, {ops} ops; {timestr(elapsed)} "
            f"({cvtstr(total / elapsed)}/sec and {ops / elapsed:.4f} ops/sec)"]


# qemu-io shows a byte as itself only if it is a letter or digit (isalnum in the C locale);
# punctuation and spaces are dots too.
_DUMP_CHARS = "".join(chr(b) if chr(b).isascii() and chr(b).isalnum() else "." for b in range(256))


def dump_lines(buf: bytes | bytearray | memoryview, offset: int) -> list[str]:
    """``-v``: sixteen bytes a line, hex then the letters and digits among them."""
    lines = []
    data = bytes(buf)
    for pos in range(0, len(data), 16):
        chunk = data[pos : pos + 16]
        hexpart = "".join(f"{b:02x} " for b in chunk)
        text = "".join(_DUMP_CHARS[b] for b in chunk)
        lines.append(f"{offset + pos:08x}:  {hexpart} {text}")
    return lines


@dataclass(frozen=True)
class _Command:
    name: str
    args: str | None  # None: qemu-io prints no argument synopsis at all
    oneline: str
    argmin: int
    argmax: int  # -1 = unlimited
    needs_file: bool = True
    writes: bool = False  # needs write permission on the image
    standalone_only: bool = False  # the io tool has it, HMP's qemu-io does not

    def usage(self) -> str:
        if self.args is None:
            return f"{self.name} -- {self.oneline}"
        return f"{self.name} {self.args} -- {self.oneline}"


_COMMAND_LIST = (
    _Command("abort", None, "simulate a program crash using abort(3)", 0, 0, needs_file=False),
    _Command("aio_flush", None, "completes all outstanding aio requests", 0, 0),
    _Command("aio_read", "[-Ciqv] [-P pattern] off len [len..]",
             "asynchronously reads a number of bytes", 2, -1),
    _Command("aio_write", "[-Cfiquz] [-P pattern] off len [len..]",
             "asynchronously writes a number of bytes", 2, -1, writes=True),
    _Command("alloc", "offset [count]", "checks if offset is allocated in the file", 1, 2),
    _Command("break", "event tag", "sets a breakpoint on event and tags the stopped request as tag",
             2, 2),
    _Command("close", None, "close the current open file", 0, 0, standalone_only=True),
    _Command("discard", "[-Cq] off len", "discards a number of bytes at a specified offset",
             2, -1, writes=True),
    _Command("flush", None, "flush all in-core file state to disk", 0, 0),
    _Command("help", "[command]", "help for one or all commands", 0, 1, needs_file=False),
    _Command("info", None, "prints information about the current file", 0, 0),
    _Command("length", None, "gets the length of the current file", 0, 0),
    _Command("map", "", "prints the allocated areas of a file", 0, 0),
    _Command("open", "[-rsCnkU] [-t cache] [-d discard] [-o options] [path]",
             "open the file specified by path", 1, -1, needs_file=False, standalone_only=True),
    _Command("quit", None, "exit the program", 0, 0, needs_file=False, standalone_only=True),
    _Command("read", "[-abCqv] [-P pattern [-s off] [-l len]] off len",
             "reads a number of bytes at a specified offset", 2, -1),
    _Command("readv", "[-Cqv] [-P pattern] off len [len..]",
             "reads a number of bytes at a specified offset", 2, -1),
    _Command("remove_break", "tag", "remove a breakpoint by tag", 1, 1),
    _Command("reopen", "[(-r|-w)] [-c cache] [-o options]",
             "reopens an image with new options", 0, -1),
    _Command("resume", "tag", "resumes the request tagged as tag", 1, 1),
    _Command("sigraise", "signal", "raises a signal", 1, 1, needs_file=False),
    _Command("sleep", None, "waits for the given value in milliseconds", 1, 1, needs_file=False),
    _Command("truncate", "[-m prealloc_mode] off",
             "truncates the current file at the given offset", 1, 3, writes=True),
    _Command("wait_break", "tag", "waits for the suspension of a request", 1, 1),
    _Command("write", "[-bcCfnquz] [-P pattern | -s source_file] off len",
             "writes a number of bytes at a specified offset", 2, -1, writes=True),
    _Command("writev", "[-Cfq] [-P pattern] off len [len..]",
             "writes a number of bytes at a specified offset", 2, -1, writes=True),
)
_COMMANDS = {c.name: c for c in _COMMAND_LIST}

# The extended help of each command (after its usage line), as qemu-io 7.2 prints it.
_HELP: dict[str, tuple[str, ...]] = {
    'aio_read': (
        '',
        ' asynchronously reads a range of bytes from the given offset',
        '',
        ' Example:',
        " 'aio_read -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file",
        '',
        ' Reads a segment of the currently open file, optionally dumping it to the',
        ' standard output stream (with -v option) for subsequent inspection.',
        ' The read is performed asynchronously and the aio_flush command must be',
        ' used to ensure all outstanding aio requests have been completed.',
        ' Note that due to its asynchronous nature, this command will be',
        ' considered successful once the request is submitted, independently',
        ' of potential I/O errors or pattern mismatches.',
        ' -C, -- report statistics in a machine parsable format',
        ' -P, -- use a pattern to verify read data',
        ' -i, -- treat request as invalid, for exercising stats',
        ' -v, -- dump buffer to standard output',
        ' -q, -- quiet mode, do not show I/O statistics',
        '',
    ),
    'aio_write': (
        '',
        ' asynchronously writes a range of bytes from the given offset source',
        ' from multiple buffers',
        '',
        ' Example:',
        " 'aio_write 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file",
        '',
        ' Writes into a segment of the currently open file, using a buffer',
        ' filled with a set pattern (0xcdcdcdcd).',
        ' The write is performed asynchronously and the aio_flush command must be',
        ' used to ensure all outstanding aio requests have been completed.',
        ' Note that due to its asynchronous nature, this command will be',
        ' considered successful once the request is submitted, independently',
        ' of potential I/O errors or pattern mismatches.',
        ' -P, -- use different pattern to fill file',
        ' -C, -- report statistics in a machine parsable format',
        ' -f, -- use Force Unit Access semantics',
        ' -i, -- treat request as invalid, for exercising stats',
        ' -q, -- quiet mode, do not show I/O statistics',
        ' -u, -- with -z, allow unmapping',
        ' -z, -- write zeroes using blk_aio_pwrite_zeroes',
        '',
    ),
    'discard': (
        '',
        ' discards a range of bytes from the given offset',
        '',
        ' Example:',
        " 'discard 512 1k' - discards 1 kilobyte from 512 bytes into the file",
        '',
        ' Discards a segment of the currently open file.',
        ' -C, -- report statistics in a machine parsable format',
        ' -q, -- quiet mode, do not show I/O statistics',
        '',
    ),
    'open': (
        '',
        ' opens a new file in the requested mode',
        '',
        ' Example:',
        " 'open -n -o driver=raw /tmp/data' - opens raw data file read-write, uncached",
        '',
        ' Opens a file for subsequent use by all of the other qemu-io commands.',
        ' -r, -- open file read-only',
        ' -s, -- use snapshot file',
        ' -C, -- use copy-on-read',
        ' -n, -- disable host cache, short for -t none',
        ' -U, -- force shared permissions',
        ' -k, -- use kernel AIO implementation (Linux only, prefer use of -i)',
        ' -i, -- use AIO mode (threads, native or io_uring)',
        ' -t, -- use the given cache mode for the image',
        ' -d, -- use the given discard mode for the image',
        ' -o, -- options to be given to the block driver',
    ),
    'read': (
        '',
        ' reads a range of bytes from the given offset',
        '',
        ' Example:',
        " 'read -v 512 1k' - dumps 1 kilobyte read from 512 bytes into the file",
        '',
        ' Reads a segment of the currently open file, optionally dumping it to the',
        ' standard output stream (with -v option) for subsequent inspection.',
        ' -b, -- read from the VM state rather than the virtual disk',
        ' -C, -- report statistics in a machine parsable format',
        ' -l, -- length for pattern verification (only with -P)',
        ' -p, -- ignored for backwards compatibility',
        ' -P, -- use a pattern to verify read data',
        ' -q, -- quiet mode, do not show I/O statistics',
        ' -s, -- start offset for pattern verification (only with -P)',
        ' -v, -- dump buffer to standard output',
        '',
    ),
    'readv': (
        '',
        ' reads a range of bytes from the given offset into multiple buffers',
        '',
        ' Example:',
        " 'readv -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file",
        '',
        ' Reads a segment of the currently open file, optionally dumping it to the',
        ' standard output stream (with -v option) for subsequent inspection.',
        ' Uses multiple iovec buffers if more than one byte range is specified.',
        ' -C, -- report statistics in a machine parsable format',
        ' -P, -- use a pattern to verify read data',
        ' -v, -- dump buffer to standard output',
        ' -q, -- quiet mode, do not show I/O statistics',
        '',
    ),
    'reopen': (
        '',
        ' Changes the open options of an already opened image',
        '',
        ' Example:',
        " 'reopen -o lazy-refcounts=on' - activates lazy refcount writeback on a qcow2 image",
        '',
        ' -r, -- Reopen the image read-only',
        ' -w, -- Reopen the image read-write',
        ' -c, -- Change the cache mode to the given value',
        " -o, -- Changes block driver options (cf. 'open' command)",
        '',
    ),
    'sigraise': (
        '',
        ' raises the given signal',
        '',
        ' Example:',
        " 'sigraise 15' - raises SIGTERM",
        '',
        ' Invokes raise(signal), where "signal" is the mandatory integer argument',
        ' given to sigraise.',
        '',
    ),
    'write': (
        '',
        ' writes a range of bytes from the given offset',
        '',
        ' Example:',
        " 'write 512 1k' - writes 1 kilobyte at 512 bytes into the open file",
        '',
        ' Writes into a segment of the currently open file, using a buffer',
        ' filled with a set pattern (0xcdcdcdcd).',
        ' -b, -- write to the VM state rather than the virtual disk',
        ' -c, -- write compressed data with blk_write_compressed',
        ' -f, -- use Force Unit Access semantics',
        " -n, -- with -z, don't allow slow fallback",
        ' -p, -- ignored for backwards compatibility',
        ' -P, -- use different pattern to fill file',
        ' -s, -- use a pattern file to fill the write buffer',
        ' -C, -- report statistics in a machine parsable format',
        ' -q, -- quiet mode, do not show I/O statistics',
        ' -u, -- with -z, allow unmapping',
        ' -z, -- write zeroes using blk_co_pwrite_zeroes',
        '',
    ),
    'writev': (
        '',
        ' writes a range of bytes from the given offset source from multiple buffers',
        '',
        ' Example:',
        " 'writev 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file",
        '',
        ' Writes into a segment of the currently open file, using a buffer',
        ' filled with a set pattern (0xcdcdcdcd).',
        ' -P, -- use different pattern to fill file',
        ' -C, -- report statistics in a machine parsable format',
        ' -f, -- use Force Unit Access semantics',
        ' -q, -- quiet mode, do not show I/O statistics',
        '',
    ),
}


def _strtol(text: str) -> int | None:
    """C's ``strtol(text, &end, 0)`` that must consume everything; None if it does not."""
    sign = 1
    body = text
    if body[:1] in "+-" and body:
        sign = -1 if body[0] == "-" else 1
        body = body[1:]
    try:
        if body[:2].lower() == "0x":
            return sign * int(body[2:], 16) if body[2:] else None
        if body[:1] == "0" and len(body) > 1:
            return sign * int(body[1:], 8)
        return sign * int(body, 10)
    except ValueError:
        return None


_DISCARD_MODES = ("ignore", "off", "unmap", "on")
_AIO_MODES = ("threads", "native", "io_uring")


@dataclass
class OpenSpec:
    """What ``open`` (and the io tool's command line) asks for.

    :param cache: a legacy cache mode (``writeback``, ``none``, ...).
    :param discard: ``ignore``/``unmap`` (and aliases).
    :param aio: ``threads``, ``native`` or ``io_uring``.
    :param options: further block options (``-o`` / ``--image-opts``), flat dotted keys.
    """

    filename: str | None
    options: dict[str, object]
    read_only: bool = False
    snapshot: bool = False
    cache: str = "writeback"
    discard: str = "unmap"
    aio: str = "threads"
    force_share: bool = False
    fmt: str | None = None


class QemuIO:
    """Runs qemu-io commands on ``bb``.

    :param bb: the BlockBackend to work on; None until ``open`` (io tool only).
    :param out: receives each line qemu-io prints on stdout (without newline).
    :param err: receives each error report (without the program prefix).
    :param raw_err: receives what qemu-io writes to stderr without a prefix (bad argument
        counts, unknown commands, getopt complaints); defaults to ``err``.
    :param device_attached: whether a guest device uses ``bb`` (then ``reopen -c`` may not
        change the write cache mode).
    :param standalone: the io tool's command set (``open``, ``close``, ``quit``), with aio
        reports collected later rather than at the end of each command.
    :param layer: the BlockLayer ``open`` opens images in (default: ``bb``'s).
    """

    def __init__(self, bb: BlockBackend | None, out: Callable[[str], None],
                 err: Callable[[str], None], *, device_attached: bool = False,
                 standalone: bool = False, layer: BlockLayer | None = None,
                 raw_err: Callable[[str], None] | None = None) -> None:
        self.bb = bb
        self.out = out
        self.err = err
        self.raw_err = raw_err if raw_err is not None else err
        self.device_attached = device_attached
        self.standalone = standalone
        self.layer = layer if layer is not None else (bb.layer if bb is not None else None)
        self.quit_requested = False
        self._aio: list[asyncio.Task[list[str]]] = []
        self._commands = {name: c for name, c in _COMMANDS.items()
                          if standalone or not c.standalone_only}

    # -- entry ------------------------------------------------------------------------------

    async def run(self, line: str) -> bool:
        """Run one command line. :return: False if the command failed."""
        argv = [word for word in line.rstrip("\r\n").split(" ") if word]
        if not argv:
            return True
        cmd = self._commands.get(argv[0])
        if cmd is None:
            self.raw_err(f'command "{argv[0]}" not found')
            return False
        if cmd.needs_file and (self.bb is None or self.bb.root is None):
            self.raw_err("no file open, try 'help open'")
            return False
        argc = len(argv) - 1
        if argc < cmd.argmin or (cmd.argmax >= 0 and argc > cmd.argmax):
            if cmd.argmax < 0:
                expected = f"at least {cmd.argmin}"
            elif cmd.argmin == cmd.argmax:
                expected = f"{cmd.argmin}"
            else:
                expected = f"between {cmd.argmin} and {cmd.argmax}"
            self.raw_err(f"bad argument count {argc} to {cmd.name}, expected {expected} arguments")
            return False
        if cmd.writes and self.bb is not None and self.bb.root is not None and (
                self.bb.root.flags.read_only or self.bb.read_only):
            self.err("Block node is read-only")
            return False
        handler: Callable[[list[str]], Awaitable[bool]] = getattr(self, f"_cmd_{cmd.name}")
        ok = await handler(argv)
        if not self.standalone:
            await self.drain()
        return ok

    async def drain(self) -> None:
        """Wait for every outstanding aio request and print their reports in order."""
        while self._aio:
            task = self._aio.pop(0)
            for line in await task:
                self.out(line)

    # -- helpers ----------------------------------------------------------------------------

    @property
    def _bb(self) -> BlockBackend:
        assert self.bb is not None
        return self.bb

    @property
    def _root(self) -> Node:
        assert self.bb is not None and self.bb.root is not None
        return self.bb.root

    def _getopt(self, argv: list[str], optstring: str) -> tuple[list[tuple[str, str]], list[str]] | None:
        try:
            return getopt.gnu_getopt(argv[1:], optstring)
        except getopt.GetoptError as exc:
            problem = "option requires an argument" if "requires argument" in exc.msg else "invalid option"
            self.raw_err(f"{argv[0]}: {problem} -- '{exc.opt}'")
            self._usage(argv[0])
            return None

    def _usage(self, name: str) -> None:
        self.out(_COMMANDS[name].usage())

    def _num(self, text: str) -> int | None:
        try:
            value, warn = parse_size(text)
        except CvtnumError as exc:
            self.out(exc.message())
            return None
        if warn:
            self.err(f"warning: Using a multiplier suffix on hex numbers is deprecated: {text}")
        return value

    def _pattern(self, text: str) -> int | None:
        value = _strtol(text)
        if value is None or not 0 <= value <= 0xFF:
            self.out(f"{text} is not a valid pattern byte")
            return None
        return value

    def _lengths(self, words: list[str]) -> list[int] | None:
        """The lengths of a vectored request (``create_iovec``)."""
        lengths: list[int] = []
        total = 0
        for word in words:
            n = self._num(word)
            if n is None:
                return None
            if n > REQUEST_MAX_BYTES:
                self.out(f"Argument '{word}' exceeds maximum size {REQUEST_MAX_BYTES}")
                return None
            if total > REQUEST_MAX_BYTES - n:
                self.out(f"The total number of bytes exceed the maximum size {REQUEST_MAX_BYTES}")
                return None
            total += n
            lengths.append(n)
        return lengths

    def _sector_aligned(self, offset: int, count: int) -> bool:
        for value, what in ((offset, "offset"), (count, "count")):
            if value % _SECTOR:
                self.out(f"{value} is not a sector-aligned value for '{what}'")
                return False
        return True

    def _report(self, verb: str, offset: int, total: int, elapsed: float, flags: set[str],
                ops: int = 1) -> None:
        if "-q" not in flags:
            for line in report_lines(verb, offset, total, total, ops, elapsed, "-C" in flags):
                self.out(line)

    @staticmethod
    def _verify(buf: bytearray, start: int, length: int, pattern: int) -> bool:
        region = buf[start : start + length]
        return region == bytes([pattern]) * len(region)

    # -- read -------------------------------------------------------------------------------

    async def _cmd_read(self, argv: list[str]) -> bool:
        parsed = self._getopt(argv, "abCqvpP:s:l:")
        if parsed is None:
            return False
        opts, args = parsed
        flags: set[str] = set()
        pattern: int | None = None
        pat_off: int | None = None
        pat_len: int | None = None
        for flag, value in opts:
            if flag == "-P":
                pattern = self._pattern(value)
                if pattern is None:
                    return False
            elif flag in ("-s", "-l"):
                n = self._num(value)
                if n is None:
                    return False
                if flag == "-s":
                    pat_off = n
                else:
                    pat_len = n
            else:
                flags.add(flag)
        located = self._offset_count("read", args)
        if located is None:
            return False
        offset, count = located
        if pattern is None and (pat_off is not None or pat_len is not None):
            self._usage("read")
            return False
        start_off = pat_off or 0
        verify_len = pat_len if pat_len is not None else count - start_off
        if verify_len < 0 or start_off + verify_len > count:
            self.out("pattern verification range exceeds end of read data")
            return False
        if "-b" in flags and not self._sector_aligned(offset, count):
            return False
        buf = bytearray(count)
        start = time.perf_counter()
        try:
            if "-b" in flags:
                await self._bb.load_vmstate(offset, memoryview(buf))
            else:
                await self._bb.preadv(offset, memoryview(buf))
        except (IOFailure, BlockError) as exc:
            self.out(f"read failed: {exc}")
            return False
        elapsed = time.perf_counter() - start
        ok = True
        if pattern is not None and not self._verify(buf, start_off, verify_len, pattern):
            self.out(f"Pattern verification failed at offset {offset + start_off}, {verify_len} bytes")
            ok = False
        if "-v" in flags and "-q" not in flags:  # qemu-io: -q silences the dump too
            for line in dump_lines(buf, offset):
                self.out(line)
        self._report("read", offset, count, elapsed, flags)
        return ok

    def _offset_count(self, name: str, args: list[str]) -> tuple[int, int] | None:
        """``off len`` of read/discard, one request's worth at most; None once the error is
        printed."""
        if len(args) != 2:
            self._usage(name)
            return None
        offset = self._num(args[0])
        if offset is None:
            return None
        count = self._num(args[1])
        if count is None:
            return None
        if count > REQUEST_MAX_BYTES:
            self.out(f"length cannot exceed {REQUEST_MAX_BYTES}, given {args[1]}")
            return None
        return offset, count

    def _vector_opts(self, argv: list[str], optstring: str, name: str,
                     default_pattern: int | None) -> tuple[set[str], int | None, list[str]] | None:
        """Options, ``-P`` pattern and the remaining words of readv/writev/aio_read/aio_write,
        which share their option handling; None once the error has been printed."""
        parsed = self._getopt(argv, optstring)
        if parsed is None:
            return None
        opts, args = parsed
        pattern = default_pattern
        for flag, value in opts:
            if flag == "-P":
                pattern = self._pattern(value)
                if pattern is None:
                    return None
        if len(args) < 2:
            self._usage(name)
            return None
        return {f for f, _ in opts}, pattern, args

    def _offset_lengths(self, args: list[str]) -> tuple[int, list[int]] | None:
        """``off len [len...]``; None once the error has been printed."""
        offset = self._num(args[0])
        if offset is None:
            return None
        lengths = self._lengths(args[1:])
        if lengths is None:
            return None
        return offset, lengths

    async def _cmd_readv(self, argv: list[str]) -> bool:
        vector = self._vector_opts(argv, "CqvP:", "readv", None)
        if vector is None:
            return False
        flags, pattern, args = vector
        located = self._offset_lengths(args)
        if located is None:
            return False
        offset, lengths = located
        total = sum(lengths)
        buf = bytearray(total)
        start = time.perf_counter()
        try:
            await self._bb.preadv(offset, memoryview(buf))
        except (IOFailure, BlockError) as exc:
            self.out(f"readv failed: {exc}")
            return False
        elapsed = time.perf_counter() - start
        ok = True
        if pattern is not None and not self._verify(buf, 0, total, pattern):
            self.out(f"Pattern verification failed at offset {offset}, {total} bytes")
            ok = False
        if "-v" in flags and "-q" not in flags:
            for line in dump_lines(buf, offset):
                self.out(line)
        self._report("read", offset, total, elapsed, flags)
        return ok

    # -- write ------------------------------------------------------------------------------

    async def _cmd_write(self, argv: list[str]) -> bool:
        parsed = self._getopt(argv, "bcCfnpquzP:s:")
        if parsed is None:
            return False
        opts, args = parsed
        flags: set[str] = set()
        pattern = 0xCD
        source: str | None = None
        for flag, value in opts:
            if flag == "-P":
                parsed_pattern = self._pattern(value)
                if parsed_pattern is None:
                    return False
                pattern = parsed_pattern
            elif flag == "-s":
                source = value
            flags.add(flag)
        if len(args) != 2:
            self._usage("write")
            return False
        if len(flags & {"-z", "-P", "-s"}) > 1:
            self.out("Only one of -z, -P, and -s can be specified at the same time")
            return False
        if "-b" in flags and "-z" in flags:
            self.out("-b and -z cannot be specified at the same time")
            return False
        if "-f" in flags and ("-b" in flags or "-c" in flags):
            self.out("-f and -b or -c cannot be specified at the same time")
            return False
        if "-n" in flags and "-z" not in flags:
            self.out("-n requires -z to be specified")
            return False
        if "-u" in flags and "-z" not in flags:
            self.out("-u requires -z to be specified")
            return False
        offset = self._num(args[0])
        if offset is None:
            return False
        count = self._num(args[1])
        if count is None:
            return False
        if count > REQUEST_MAX_BYTES and "-n" not in flags:
            self.out(f"length cannot exceed {REQUEST_MAX_BYTES} without -n, given {args[1]}")
            return False
        if ("-b" in flags or "-c" in flags) and not self._sector_aligned(offset, count):
            return False
        req_flags = RequestFlags.FUA if "-f" in flags else RequestFlags.NONE
        buf = b""
        if "-z" not in flags:
            if source is not None:
                try:
                    with open(source, "rb") as f:
                        content = f.read(count)
                except OSError as exc:
                    self.raw_err(f"{source}: {os.strerror(exc.errno or 0)}")
                    return False
                buf = (content * (count // len(content) + 1))[:count] if content else bytes(count)
            else:
                buf = bytes([pattern]) * count
        start = time.perf_counter()
        try:
            if "-z" in flags:
                if "-u" in flags:
                    req_flags |= RequestFlags.MAY_UNMAP
                if "-n" in flags:
                    req_flags |= RequestFlags.NO_FALLBACK
                await self._bb.pwrite_zeroes(offset, count, req_flags)
            elif "-b" in flags:
                await self._bb.save_vmstate(offset, memoryview(buf))
            elif "-c" in flags:
                if not self._root.driver.supported_write_flags & RequestFlags.COMPRESSED:
                    raise IOFailure(ENOTSUP)
                await self._bb.pwritev(offset, memoryview(buf), RequestFlags.COMPRESSED)
            else:
                await self._bb.pwritev(offset, memoryview(buf), req_flags)
        except (IOFailure, BlockError) as exc:
            self.out(f"write failed: {exc}")
            return False
        self._report("wrote", offset, count, time.perf_counter() - start, flags)
        return True

    async def _cmd_writev(self, argv: list[str]) -> bool:
        vector = self._vector_opts(argv, "CfqP:", "writev", 0xCD)
        if vector is None:
            return False
        flags, fill, args = vector
        pattern = 0xCD if fill is None else fill
        located = self._offset_lengths(args)
        if located is None:
            return False
        offset, lengths = located
        total = sum(lengths)
        start = time.perf_counter()
        try:
            await self._bb.pwritev(offset, memoryview(bytes([pattern]) * total),
                                   RequestFlags.FUA if "-f" in flags else RequestFlags.NONE)
        except (IOFailure, BlockError) as exc:
            self.out(f"writev failed: {exc}")
            return False
        self._report("wrote", offset, total, time.perf_counter() - start, flags)
        return True

    # -- aio --------------------------------------------------------------------------------

    def _submit(self, coro: Awaitable[list[str]]) -> None:
        async def wrapped() -> list[str]:
            return await coro

        self._aio.append(asyncio.ensure_future(wrapped()))

    async def _cmd_aio_read(self, argv: list[str]) -> bool:
        vector = self._vector_opts(argv, "CiqvP:", "aio_read", None)
        if vector is None:
            return False
        flags, pattern, args = vector
        located = self._offset_lengths(args)
        if located is None:
            return False
        offset, lengths = located
        if "-i" in flags:
            self.out("injecting invalid read request")
            return True
        total = sum(lengths)
        bb = self._bb

        async def request() -> list[str]:
            buf = bytearray(total)
            start = time.perf_counter()
            try:
                await bb.preadv(offset, memoryview(buf))
            except (IOFailure, BlockError) as exc:
                return [f"readv failed: {exc}"]
            elapsed = time.perf_counter() - start
            lines = []
            if pattern is not None and not self._verify(buf, 0, total, pattern):
                lines.append(f"Pattern verification failed at offset {offset}, {total} bytes")
            if "-v" in flags and "-q" not in flags:
                lines += dump_lines(buf, offset)
            if "-q" not in flags:
                lines += report_lines("read", offset, total, total, 1, elapsed, "-C" in flags)
            return lines

        self._submit(request())
        return True

    async def _cmd_aio_write(self, argv: list[str]) -> bool:
        vector = self._vector_opts(argv, "CfiquzP:", "aio_write", 0xCD)
        if vector is None:
            return False
        flags, fill, args = vector
        pattern = 0xCD if fill is None else fill
        if "-u" in flags and "-z" not in flags:
            self.out("-u requires -z to be specified")
            return False
        if "-z" in flags and len(args) != 2:
            self.out("-z supports only a single length parameter")
            return False
        offset = self._num(args[0])
        if offset is None:
            return False
        if "-z" in flags:
            count = self._num(args[1])
            if count is None:
                return False
            lengths = [count]
        else:
            parsed_lengths = self._lengths(args[1:])
            if parsed_lengths is None:
                return False
            lengths = parsed_lengths
        if "-i" in flags:
            self.out("injecting invalid write request")
            return True
        total = sum(lengths)
        req_flags = RequestFlags.FUA if "-f" in flags else RequestFlags.NONE
        bb = self._bb

        async def request() -> list[str]:
            start = time.perf_counter()
            try:
                if "-z" in flags:
                    unmap = RequestFlags.MAY_UNMAP if "-u" in flags else RequestFlags.NONE
                    await bb.pwrite_zeroes(offset, total, req_flags | unmap)
                else:
                    await bb.pwritev(offset, memoryview(bytes([pattern]) * total), req_flags)
            except (IOFailure, BlockError) as exc:
                return [f"aio_write failed: {exc}"]
            if "-q" in flags:
                return []
            return report_lines("wrote", offset, total, total, 1, time.perf_counter() - start,
                                "-C" in flags)

        self._submit(request())
        return True

    async def _cmd_aio_flush(self, argv: list[str]) -> bool:
        await self.drain()
        return True

    # -- discard, flush, truncate -----------------------------------------------------------

    async def _cmd_discard(self, argv: list[str]) -> bool:
        parsed = self._getopt(argv, "Cq")
        if parsed is None:
            return False
        opts, args = parsed
        flags = {f for f, _ in opts}
        located = self._offset_count("discard", args)
        if located is None:
            return False
        offset, count = located
        start = time.perf_counter()
        try:
            await self._bb.pdiscard(offset, count)
        except (IOFailure, BlockError) as exc:
            self.out(f"discard failed: {exc}")
            return False
        self._report("discard", offset, count, time.perf_counter() - start, flags)
        return True

    async def _cmd_flush(self, argv: list[str]) -> bool:
        try:
            await self._bb.flush()
        except (IOFailure, BlockError):
            return False
        return True

    async def _cmd_truncate(self, argv: list[str]) -> bool:
        parsed = self._getopt(argv, "m:")
        if parsed is None:
            return False
        opts, args = parsed
        prealloc: PreallocMode = "off"
        for _flag, value in opts:
            mode = PREALLOC_MODES.get(value)
            if mode is None:
                self.err(f"Invalid preallocation mode '{value}'")
                return False
            prealloc = mode
        if not args:  # words after the size are ignored, as qemu-io does
            self._usage("truncate")
            return False
        length = self._num(args[0])
        if length is None:
            return False
        try:
            await self._root.truncate(length, prealloc)
        except (IOFailure, BlockError) as exc:
            self.err(str(exc))
            return False
        return True

    # -- information ------------------------------------------------------------------------

    async def _cmd_length(self, argv: list[str]) -> bool:
        try:
            self.out(cvtstr(self._bb.getlength()))
        except IOFailure as exc:
            self.out(f"getlength: {exc}")
            return False
        return True

    async def _allocated(self, offset: int, length: int) -> tuple[bool, int]:
        """Whether the top node itself holds ``offset`` (``bdrv_is_allocated``), and for how long."""
        root = self._root
        status = await root.block_status(offset, length)
        if status.length <= 0:
            return False, 0
        # A node without a backing file has no layer below to fall through to: all of it is
        # its own, as QEMU's block status reports for raw and file nodes.
        allocated = bool(status.flags & BlockStatusFlags.ALLOCATED) or not root.driver.supports_backing
        return allocated, min(status.length, length)

    async def _cmd_alloc(self, argv: list[str]) -> bool:
        offset = self._num(argv[1])
        if offset is None:
            return False
        count = _SECTOR
        if len(argv) > 2:
            parsed = self._num(argv[2])
            if parsed is None:
                return False
            count = parsed
        remaining, pos, allocated_bytes = count, offset, 0
        try:
            while remaining > 0:
                allocated, n = await self._allocated(pos, remaining)
                if n == 0:
                    break
                if allocated:
                    allocated_bytes += n
                pos += n
                remaining -= n
        except (IOFailure, BlockError) as exc:
            self.out(f"is_allocated failed: {exc}")
            return False
        self.out(f"{allocated_bytes}/{count - remaining} bytes allocated at offset {cvtstr(offset)}")
        return True

    async def _cmd_map(self, argv: list[str]) -> bool:
        length = self._root.getlength()
        offset = 0
        try:
            while offset < length:
                allocated, n = await self._allocated(offset, length - offset)
                if n == 0:
                    break
                while offset + n < length:
                    more_allocated, more = await self._allocated(offset + n, length - offset - n)
                    if more == 0 or more_allocated != allocated:
                        break
                    n += more
                state = "   " if allocated else "not"
                self.out(f"{cvtstr(n)} (0x{n:x}) bytes {state} allocated at offset "
                         f"{cvtstr(offset)} (0x{offset:x})")
                offset += n
        except (IOFailure, BlockError) as exc:
            self.out(f"map failed: {exc}")
            return False
        return True

    async def _cmd_info(self, argv: list[str]) -> bool:
        root = self._root
        self.out(f"format name: {root.driver_name}")
        driver = root.driver
        cluster_size = int(getattr(driver, "cluster_size", 0) or 0)
        vm_state_offset = 0
        l2_size = int(getattr(driver, "l2_size", 0) or 0)
        if cluster_size and l2_size:
            per_l1 = cluster_size * l2_size
            size = -(-root.getlength() // _SECTOR) * _SECTOR
            vm_state_offset = -(-size // per_l1) * per_l1
        self.out(f"cluster size: {cvtstr(cluster_size)}")
        self.out(f"vm state offset: {cvtstr(vm_state_offset)}")
        extra = driver.info().extra
        if root.driver_name == "qcow2" and "compat" in extra:
            keys = ["compat", "compression-type", "lazy-refcounts", "refcount-bits", "corrupt",
                    "extended-l2"]
            if extra["compat"] == "0.10":
                keys = ["compat", "compression-type", "refcount-bits"]
            self.out("Format specific information:")
            for key in keys:
                if key in extra:
                    value = extra[key]
                    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
                    self.out(f"    {key.replace('-', ' ')}: {text}")
        return True

    # -- session ----------------------------------------------------------------------------

    async def _cmd_help(self, argv: list[str]) -> bool:
        if len(argv) > 1:
            cmd = self._commands.get(argv[1])
            if cmd is None:
                self.out(f"command {argv[1]} not found")
                return False
            self.out(cmd.usage())
            for line in _HELP.get(cmd.name, ()):
                self.out(line)
            return True
        for cmd in sorted(self._commands.values(), key=lambda c: c.name):
            self.out(cmd.usage())
        self.out("")
        self.out("Use 'help commandname' for extended help.")
        return True

    async def _cmd_sleep(self, argv: list[str]) -> bool:
        ms = _strtol(argv[1])
        if ms is None or ms < 0:
            self.out(f"{argv[1]} is not a valid number")
            return False
        await asyncio.sleep(ms / 1000)
        return True

    async def _cmd_quit(self, argv: list[str]) -> bool:
        self.quit_requested = True
        return True

    async def _cmd_abort(self, argv: list[str]) -> bool:
        os.abort()

    async def _cmd_sigraise(self, argv: list[str]) -> bool:
        sig = self._num(argv[1])
        if sig is None:
            return False
        if sig > _INT64_MAX >> 32:
            self.out(f"signal argument '{argv[1]}' is too large to be a valid signal")
            return False
        try:
            signal.raise_signal(sig)
        except (OSError, ValueError):
            pass
        return True

    # blkdebug's breakpoints: no driver here implements them, so every node answers as a
    # QEMU node without breakpoint support does.

    async def _cmd_break(self, argv: list[str]) -> bool:
        self.out("Could not set breakpoint: Operation not supported")
        return False

    async def _cmd_remove_break(self, argv: list[str]) -> bool:
        self.out(f"Could not remove breakpoint {argv[1]}: Operation not supported")
        return False

    async def _cmd_resume(self, argv: list[str]) -> bool:
        self.out("Could not resume request: Operation not supported")
        return False

    async def _cmd_wait_break(self, argv: list[str]) -> bool:
        # QEMU waits for a suspension that can never come; returning keeps a script alive.
        return True

    # -- open, close ------------------------------------------------------------------------

    async def _cmd_open(self, argv: list[str]) -> bool:
        parsed = self._getopt(argv, "rsCnkUt:d:i:o:")
        if parsed is None:
            return False
        opts, args = parsed
        spec = OpenSpec(None, {})
        for flag, value in opts:
            if flag == "-r":
                spec.read_only = True
            elif flag == "-s":
                spec.snapshot = True
            elif flag == "-n":
                spec.cache = "none"
            elif flag == "-k":
                spec.aio = "native"
            elif flag == "-U":
                spec.force_share = True
            elif flag == "-t":
                try:
                    parse_cache_mode(value)
                except OptionError:
                    self.err(f"Invalid cache option: {value}")
                    return False
                spec.cache = value
            elif flag == "-d":
                if value not in _DISCARD_MODES:
                    self.err(f"Invalid discard option: {value}")
                    return False
                spec.discard = value
            elif flag == "-i":
                if value not in _AIO_MODES:
                    self.err(f"Invalid aio option: {value}")
                    return False
                spec.aio = value
            elif flag == "-o":
                try:
                    spec.options.update(parse_drive_opts(value))
                except BlockError as exc:
                    self.err(str(exc))
                    return False
        if len(args) == 1:
            spec.filename = args[0]
        elif args:
            self._usage("open")
            return False
        return await self.open_image(spec)

    async def open_image(self, spec: OpenSpec) -> bool:
        """Open ``spec`` as the image the commands work on; errors are reported, not raised."""
        if self.bb is not None:
            self.err("file open already, try 'help close'")
            return False
        layer = self.layer
        assert layer is not None
        where = f"can't open device {spec.filename}" if spec.filename is not None else "can't open"
        mode = parse_cache_mode(spec.cache)
        options: dict[str, object] = dict(spec.options)
        if spec.fmt is not None:
            options["driver"] = spec.fmt
        options.setdefault("cache.direct", mode.direct)
        options.setdefault("cache.no-flush", mode.no_flush)
        options.setdefault("discard", spec.discard)
        if spec.aio != "threads":
            options.setdefault(AIO_FLAG, spec.aio)
        if spec.read_only:
            options["read-only"] = True
        if spec.force_share and not spec.read_only:
            self.err(f"{where}: force-share=on can only be used with read-only images")
            return False
        bb = layer.new_backend("")
        bb.write_cache = mode.writeback
        try:
            await layer.open_node(spec.filename, options, backend=bb)
            if spec.snapshot:
                from blockgraph.graph.snapshot import temporary_snapshot

                await temporary_snapshot(layer, bb)
        except BlockError as exc:
            await layer.remove_backend(bb)
            self.err(f"{where}: {exc}")
            return False
        self.bb = bb
        return True

    async def _cmd_close(self, argv: list[str]) -> bool:
        await self.close_image()
        return True

    async def close_image(self) -> None:
        """Collect outstanding aio requests and close the image (if one is open)."""
        await self.drain()
        if self.bb is not None and self.layer is not None:
            bb, self.bb = self.bb, None
            await self.layer.remove_backend(bb)

    async def _cmd_reopen(self, argv: list[str]) -> bool:
        parsed = self._getopt(argv, "c:o:rw")
        if parsed is None:
            return False
        opts, args = parsed
        if args:
            self._usage("reopen")
            return False
        root = self._bb.root
        if root is None:
            self.err("Device has no medium")
            return False
        read_only: bool | None = None
        options: dict[str, object] = {}
        explicit: dict[str, object] = {}
        write_cache: bool | None = None
        for flag, value in opts:
            if flag == "-r":
                if read_only is False:
                    self.err("Only one -r/-w option may be given")
                    return False
                read_only = True
            elif flag == "-w":
                if read_only is True:
                    self.err("Only one -r/-w option may be given")
                    return False
                read_only = False
            elif flag == "-c":
                try:
                    mode = parse_cache_mode(value)
                except OptionError:
                    self.err(f"Invalid cache option: {value}")
                    return False
                write_cache = mode.writeback
                options.setdefault("cache.direct", mode.direct)
                options.setdefault("cache.no-flush", mode.no_flush)
            elif flag == "-o":
                try:
                    explicit.update(parse_drive_opts(value))
                except BlockError as exc:
                    self.err(str(exc))
                    return False
        if write_cache is not None and ("cache.direct" in explicit or "cache.no-flush" in explicit):
            self.err("Cannot set both -c and the cache options")
            return False
        if write_cache is not None and write_cache != self._bb.write_cache and self.device_attached:
            self.err("Cannot change cache.writeback: Device attached")
            return False
        options.update(explicit)
        if read_only is not None:
            options["read-only"] = read_only
        try:
            await reopen(root, options)
        except BlockError as exc:
            self.err(str(exc))
            return False
        if write_cache is not None:
            self._bb.write_cache = write_cache
        return True
