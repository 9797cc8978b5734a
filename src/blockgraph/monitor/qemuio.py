"""qemu-io's command language, run against one BlockBackend.

Shared by the ``io`` tool and the HMP ``qemu-io`` command, so both print exactly the same
text. Output goes through two callbacks (``out`` for what qemu-io prints on stdout, ``err``
for error reports), so the caller decides where it lands.
"""

from __future__ import annotations

import getopt
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass

from blockgraph.errors import BlockError, IOFailure, OptionError
from blockgraph.graph.node import BlockBackend
from blockgraph.graph.reopen import reopen
from blockgraph.options.cache import parse_cache_mode
from blockgraph.options.keyval import parse_drive_opts

_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}


def cvtnum(text: str) -> int:
    """qemu-io's number syntax: decimal/hex/octal with an optional binary unit suffix."""
    body, mult = text, 1
    if text and text[-1].lower() in _UNITS:
        body, mult = text[:-1], _UNITS[text[-1].lower()]
    elif text and text[-1].lower() == "b":
        body = text[:-1]
    try:
        value = float(body) if "." in body else int(body, 0)
    except ValueError:
        raise ValueError(text) from None
    return int(value * mult)


def cvtstr(value: float) -> str:
    """A byte count as qemu-io prints it: ``512 bytes``, ``4 KiB``, ``1.500 KiB``."""
    for shift, unit in ((60, "EiB"), (50, "PiB"), (40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if value >= 1 << shift:
            text = f"{value / (1 << shift):.3f}"
            return f"{text[:-4] if text.endswith('.000') else text} {unit}"
    text = f"{value:.3f}"
    return f"{text[:-4] if text.endswith('.000') else text} bytes"


def _timestr(seconds: float) -> str:
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{int(hours)}:{int(minutes):02d}:{secs:05.2f}"
    if minutes:
        return f"{int(minutes)}:{secs:05.2f}"
    return f"{secs:05.2f} sec"


@dataclass
class _Command:
    name: str
    usage: str
    summary: str
    argmin: int
    argmax: int  # -1 = unlimited


_COMMANDS = {
    c.name: c
    for c in (
        _Command("read", "[-abCqv] [-P pattern [-s off] [-l len]] off len",
                 "reads a number of bytes at a specified offset", 2, -1),
        _Command("write", "[-bcCfnquz] [-P pattern | -s source_file] off len",
                 "writes a number of bytes at a specified offset", 2, -1),
        _Command("discard", "[-Cq] off len", "discards a number of bytes at a specified offset", 2, -1),
        _Command("flush", "", "flush all in-core file state to disk", 0, 0),
        _Command("aio_flush", "", "completes all outstanding aio requests", 0, 0),
        _Command("length", "", "gets the length of the current file", 0, 0),
        _Command("info", "", "prints information about the current file", 0, 0),
        _Command("reopen", "[(-r|-w)] [-c cache] [-o options]",
                 "reopens an image with new options", 0, -1),
        _Command("help", "[command]", "help for one or all commands", 0, 1),
    )
}


class QemuIO:
    """Runs qemu-io commands on ``bb``.

    :param out: receives each line qemu-io prints on stdout (without newline).
    :param err: receives each error report (without the program prefix).
    :param device_attached: whether a guest device uses ``bb`` (then ``reopen -c`` may not
        change the write cache mode).
    """

    def __init__(self, bb: BlockBackend, out: Callable[[str], None], err: Callable[[str], None],
                 *, device_attached: bool = False) -> None:
        self.bb = bb
        self.out = out
        self.err = err
        self.device_attached = device_attached

    # -- entry ------------------------------------------------------------------------------

    async def run(self, line: str) -> bool:
        """Run one command line. :return: False if the command failed."""
        try:
            argv = shlex.split(line)
        except ValueError:
            argv = line.split()
        if not argv:
            return True
        cmd = _COMMANDS.get(argv[0])
        if cmd is None:
            self.err(f'command "{argv[0]}" not found')
            return False
        handler: Callable[[list[str]], object] = getattr(self, f"_cmd_{cmd.name}")
        result = handler(argv)
        if hasattr(result, "__await__"):
            result = await result
        return result is not False

    def _args(self, argv: list[str], optstring: str) -> tuple[list[tuple[str, str]], list[str]] | None:
        cmd = _COMMANDS[argv[0]]
        try:
            opts, args = getopt.getopt(argv[1:], optstring)
        except getopt.GetoptError as exc:
            problem = "option requires an argument" if "requires argument" in exc.msg else "invalid option"
            self.out(f"{argv[0]}: {problem} -- '{exc.opt}'")
            self._usage(cmd)
            return None
        if len(args) < cmd.argmin or (cmd.argmax >= 0 and len(args) > cmd.argmax):
            self.out(f"bad argument count {len(args)} to {cmd.name}, expected "
                     + (f"at least {cmd.argmin}" if cmd.argmax < 0 else f"between {cmd.argmin} and {cmd.argmax}")
                     + " arguments")
            return None
        return opts, args

    def _usage(self, cmd: _Command) -> None:
        self.out(f"{cmd.name} {cmd.usage} -- {cmd.summary}")

    def _num(self, text: str) -> int | None:
        try:
            return cvtnum(text)
        except ValueError:
            self.out(f"Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {text}")
            return None

    def _report(self, verb: str, offset: int, count: int, total: int, ops: int, elapsed: float,
                quiet: bool, machine: bool) -> None:
        if quiet:
            return
        elapsed = max(elapsed, 1e-9)
        if machine:
            self.out(f"{verb}: {total}, {ops}, {_timestr(elapsed)}, ...")
            return
        self.out(f"{verb} {count}/{count} bytes at offset {offset}")
        self.out(f"{cvtstr(total)}, {ops} ops; {_timestr(elapsed)} "
                 f"({cvtstr(total / elapsed)}/sec and {ops / elapsed:.4f} ops/sec)")

    # -- commands ---------------------------------------------------------------------------

    def _pattern(self, text: str) -> int | None:
        try:
            value = int(text, 0)
        except ValueError:
            value = -1
        if not 0 <= value <= 0xFF:
            self.out(f"{text} is not a valid pattern byte")
            return None
        return value

    async def _cmd_read(self, argv: list[str]) -> bool:
        parsed = self._args(argv, "abCqvP:s:l:p")
        if parsed is None:
            return False
        opts, args = parsed
        flags = dict(opts)
        offset, count = self._num(args[0]), self._num(args[1])
        if offset is None or count is None:
            return False
        pattern = None
        if "-P" in flags:
            pattern = self._pattern(flags["-P"])
            if pattern is None:
                return False
        buf = bytearray(count)
        start = time.monotonic()
        try:
            await self.bb.preadv(offset, memoryview(buf))
        except IOFailure as exc:
            self.out(f"read failed: {exc}")
            return False
        elapsed = time.monotonic() - start
        if pattern is not None:
            pat_off = cvtnum(flags.get("-s", "0"))
            pat_len = cvtnum(flags["-l"]) if "-l" in flags else count - pat_off
            region = buf[pat_off : pat_off + pat_len]
            if region != bytes([pattern]) * len(region):
                self.out(f"Pattern verification failed at offset {offset + pat_off}, {pat_len} bytes")
        if "-v" in flags:
            self._dump(buf, offset)
        self._report("read", offset, count, count, 1, elapsed, "-q" in flags, "-C" in flags)
        return True

    def _dump(self, buf: bytes | bytearray, offset: int) -> None:
        for pos in range(0, len(buf), 16):
            chunk = buf[pos : pos + 16]
            hexpart = "".join(f"{b:02x} " for b in chunk).ljust(48)
            text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
            self.out(f"{offset + pos:08x}:  {hexpart} {text}")

    async def _cmd_write(self, argv: list[str]) -> bool:
        parsed = self._args(argv, "bcCfnpquzP:s:")
        if parsed is None:
            return False
        opts, args = parsed
        flags = dict(opts)
        offset, count = self._num(args[0]), self._num(args[1])
        if offset is None or count is None:
            return False
        if count < 0:
            self._usage(_COMMANDS["write"])
            return False
        if "-z" in flags and "-P" in flags:
            self.out("-z and -P cannot be specified at the same time")
            return False
        pattern = 0xCD
        if "-P" in flags:
            value = self._pattern(flags["-P"])
            if value is None:
                return False
            pattern = value
        start = time.monotonic()
        try:
            if "-z" in flags:
                from blockgraph.drivers.base import RequestFlags

                await self.bb.pwrite_zeroes(offset, count,
                                            RequestFlags.MAY_UNMAP if "-u" in flags else RequestFlags.NONE)
            else:
                await self.bb.pwritev(offset, memoryview(bytes([pattern]) * count))
        except IOFailure as exc:
            self.out(f"write failed: {exc}")
            return False
        self._report("wrote", offset, count, count, 1, time.monotonic() - start,
                     "-q" in flags, "-C" in flags)
        return True

    async def _cmd_discard(self, argv: list[str]) -> bool:
        parsed = self._args(argv, "Cq")
        if parsed is None:
            return False
        opts, args = parsed
        offset, count = self._num(args[0]), self._num(args[1])
        if offset is None or count is None:
            return False
        start = time.monotonic()
        try:
            await self.bb.pdiscard(offset, count)
        except IOFailure as exc:
            self.out(f"discard failed: {exc}")
            return False
        flags = dict(opts)
        self._report("discard", offset, count, count, 1, time.monotonic() - start,
                     "-q" in flags, "-C" in flags)
        return True

    async def _cmd_flush(self, argv: list[str]) -> bool:
        try:
            await self.bb.flush()
        except IOFailure as exc:
            self.out(f"flush failed: {exc}")
            return False
        return True

    async def _cmd_aio_flush(self, argv: list[str]) -> bool:
        return await self._cmd_flush(argv)

    def _cmd_length(self, argv: list[str]) -> bool:
        try:
            self.out(cvtstr(self.bb.getlength()))
        except IOFailure as exc:
            self.out(f"getlength: {exc}")
            return False
        return True

    def _cmd_info(self, argv: list[str]) -> bool:
        root = self.bb.root
        if root is None:
            return False
        self.out(f"format name: {root.driver_name}")
        cluster = getattr(root.driver, "cluster_size", 0)
        self.out(f"cluster size: {cvtstr(cluster)}")
        self.out(f"vm state offset: {cvtstr(0)}")
        return True

    def _cmd_help(self, argv: list[str]) -> bool:
        if len(argv) > 1:
            cmd = _COMMANDS.get(argv[1])
            if cmd is None:
                self.out(f"command {argv[1]} not found")
                return False
            self._usage(cmd)
            return True
        for cmd in sorted(_COMMANDS.values(), key=lambda c: c.name):
            self.out(f"{cmd.name} {cmd.usage} -- {cmd.summary}".replace("  --", " --"))
        self.out("")
        self.out("Use 'help commandname' for extended help.")
        return True

    async def _cmd_reopen(self, argv: list[str]) -> bool:
        parsed = self._args(argv, "c:o:rw")
        if parsed is None:
            return False
        opts, _args = parsed
        root = self.bb.root
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
        if write_cache is not None and write_cache != self.bb.write_cache and self.device_attached:
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
            self.bb.write_cache = write_cache
        return True
