"""The human monitor (HMP): the block commands of QEMU's monitor, with its exact text.

:meth:`HMP.execute` takes one command line and returns what the monitor prints, with ``\\n``
line ends (the transport turns them into the ``\\r\\n`` QEMU's monitor sends). Errors print as
``Error: <message>`` as in QEMU 7.2.
"""

from __future__ import annotations

import logging
import operator
import re
import shlex
from collections.abc import Callable

from blockgraph.errors import BlockError
from blockgraph.graph.layer import BlockLayer
from blockgraph.graph.node import BlockBackend, Node
from blockgraph.graph.query import image_info
from blockgraph.graph.snapshot import external_snapshot
from blockgraph.monitor.chardev import ChardevRegistry
from blockgraph.monitor.imageinfo import format_image_chain
from blockgraph.monitor.qemuio import QemuIO
from blockgraph.monitor.throttle import REQUIRED as THROTTLE_REQUIRED
from blockgraph.monitor.throttle import set_io_throttle
from blockgraph.objects.throttle import QMP_MEMBERS

log = logging.getLogger(__name__)

_HELP = {
    "cont": "cont|c  -- resume emulation",
    "stop": "stop|s  -- stop emulation",
    "help": "help|? [cmd] -- show the help",
    "info": "info [subcommand] -- show various information about the system state",
    "qemu-io": 'qemu-io [-d] [device] "[command]" -- run a qemu-io command on a block device',
    "quit": "quit|q  -- quit the emulator",
    "block_set_io_throttle": "block_set_io_throttle device bps bps_rd bps_wr iops iops_rd "
                             "iops_wr -- change I/O throttle limits for a block drive",
    "snapshot_blkdev": "snapshot_blkdev [-n] device [new-image-file] [format] -- initiates a live "
                       "snapshot\n\t\t\tof device. If a new image file is specified, the\n\t\t\t"
                       "new image file will become the new root image.\n\t\t\tIf format is "
                       "specified, the snapshot file will\n\t\t\tbe created in that format.\n\t\t\t"
                       "The default format is qcow2.  The -n flag requests QEMU\n\t\t\tto reuse "
                       "the image found in new-image-file, instead of\n\t\t\trecreating it from "
                       "scratch.",
}


class _ExprError(Exception):
    """An HMP expression QEMU refuses; the text is its message."""


class _Args:
    """HMP's argument stream: integer arguments are expressions (``1024*1024``, ``(5+5)``,
    ``0x10``, ``010``), read one after another from the same line, as QEMU's monitor does.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def _skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def _peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def word(self) -> str | None:
        self._skip()
        start = self.pos
        while self.pos < len(self.text) and not self.text[self.pos].isspace():
            self.pos += 1
        return self.text[start:self.pos] or None

    def at_end(self) -> bool:
        self._skip()
        return self.pos >= len(self.text)

    def integer(self) -> int:
        """One expression, as a signed 64-bit value."""
        self._skip()
        value = self._sum()
        return (value + (1 << 63)) % (1 << 64) - (1 << 63)

    def _binary(self, operators: str, operand: Callable[[], int]) -> int:
        value = operand()
        while (op := self._peek()) and op in operators:
            self.pos += 1
            self._skip()
            right = operand()
            if op in "/%" and right == 0:
                raise _ExprError("division by zero")
            value = _OPERATORS[op](value, right)
        return value

    def _sum(self) -> int:
        return self._binary("+-", self._logic)

    def _logic(self) -> int:
        return self._binary("&|^", self._product)

    def _product(self) -> int:
        return self._binary("*/%", self._unary)

    def _unary(self) -> int:
        ch = self._peek()
        if not ch:
            raise _ExprError("unexpected end of expression")
        if ch in "+-~":
            self.pos += 1
            self._skip()
            value = self._unary()
            value = -value if ch == "-" else ~value if ch == "~" else value
        elif ch == "(":
            self.pos += 1
            self._skip()
            value = self._sum()
            if self._peek() != ")":
                raise _ExprError("')' expected")
            self.pos += 1
        elif ch == "$":
            raise _ExprError("unknown register")
        else:
            value = self._number()
        self._skip()
        return value

    def _number(self) -> int:
        # strtoull with base 0: the longest prefix that reads as a number ("0x" alone is 0
        # followed by an 'x'; "08" is 0 followed by an 8).
        match = _NUMBER.match(self.text, self.pos)
        if match is None:
            raise _ExprError(f"invalid char '{self._peek()}' in expression")
        digits = match.group()
        self.pos = match.end()
        if digits[:2].lower() == "0x":
            value = int(digits, 16)
        else:
            value = int(digits, 8 if len(digits) > 1 and digits[0] == "0" else 10)
        if value >= 1 << 64:
            raise _ExprError("number too large")
        return value


_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")


def _c_div(a: int, b: int) -> int:
    # C's division truncates toward zero; its remainder takes the dividend's sign.
    quotient = abs(a) // abs(b)
    return quotient if (a < 0) == (b < 0) else -quotient


_OPERATORS: dict[str, Callable[[int, int], int]] = {
    "+": operator.add, "-": operator.sub, "&": operator.and_, "|": operator.or_,
    "^": operator.xor, "*": operator.mul, "/": _c_div,
    "%": lambda a, b: a - _c_div(a, b) * b,
}


# info block's throttling line: the bps limits, the iops limits (no burst lengths), the iops
# size.
_THROTTLE_ORDER = (*(n for kind in ("bps", "iops") for n in QMP_MEMBERS
                     if n.split("_")[0] == kind and not n.endswith("_length")
                     and n != "iops_size"), "iops_size")


def _cache_mode(write_cache: bool, node: Node) -> str:
    text = "writeback" if write_cache else "writethrough"
    if node.flags.direct:
        text += ", direct"
    if node.flags.no_flush:
        text += ", ignore flushes"
    return text


def _backing_filename(node: Node) -> str | None:
    # QEMU shows the backing node's (refreshed) filename; the header's name only without one.
    if node.backing is not None:
        return node.backing.filename
    return node.driver.info().backing_file


def format_block_info(bb: BlockBackend | None, node: Node | None, verbose: bool = False) -> str:
    """One entry of ``info block``: a BlockBackend (with its root) or a named node.

    With ``verbose`` (``-v``), the image information of the whole backing chain follows.
    """
    lines: list[str] = []
    if bb is not None:
        if node is None:
            lines.append(f"{bb.name}: [not inserted]")
        else:
            lines.append(f"{bb.name} ({node.node_name}): {_header(node)}")
        if bb.removable:
            lock = "" if bb.locked else "not "
            lines.append(f"    Removable device: {lock}locked, tray {'open' if bb.tray_open else 'closed'}")
    elif node is not None:
        lines.append(f"{node.node_name}: {_header(node)}")
    if node is not None:
        lines.append(f"    Cache mode:       {_cache_mode(bb.write_cache if bb else True, node)}")
        backing = _backing_filename(node)
        if backing:
            lines.append(f"    Backing file:     {backing} (chain depth: {node.backing_chain_depth()})")
        detect = str(node.options.get("detect-zeroes", "off"))
        if detect != "off":
            lines.append(f"    Detect zeroes:    {detect}")
        throttled = bb.io_limits.group if bb is not None and bb.io_limits else None
        if throttled is not None:
            limits = throttled.limits.query()
            values = " ".join(f"{k}={limits.get(k, 0)}" for k in _THROTTLE_ORDER)
            lines.append(f"    I/O throttling:   {values} group={throttled.name}")
    text = "".join(line + "\n" for line in lines)
    if verbose and node is not None:
        text += "\nImages:\n" + format_image_chain(image_info(node, chain=True))
    return text


def _header(node: Node) -> str:
    extras = ", read-only" if node.flags.read_only else ""
    if node.driver.info().encrypted:
        extras += ", encrypted"
    return f"{node.filename} ({node.driver_name}{extras})"


class HMP:
    """One human monitor session on ``layer``.

    :param on_quit: called by ``quit``.
    :param chardevs: the process's chardevs (``info chardev``).
    """

    def __init__(self, layer: BlockLayer, on_quit: Callable[[], None] | None = None,
                 chardevs: ChardevRegistry | None = None) -> None:
        self.layer = layer
        self.on_quit = on_quit or (lambda: None)
        self.chardevs = chardevs if chardevs is not None else ChardevRegistry()

    async def execute(self, line: str) -> str:
        """Run one command line; return the text the monitor prints."""
        line = line.strip()
        if not line:
            return ""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        handler = {
            "info": self._info,
            "qemu-io": self._qemu_io,
            "snapshot_blkdev": self._snapshot_blkdev,
            "block_set_io_throttle": self._block_set_io_throttle,
            "quit": self._quit,
            "q": self._quit,
            "stop": self._stop,
            "s": self._stop,
            "cont": self._cont,
            "c": self._cont,
            "help": self._help,
            "?": self._help,
        }.get(name)
        if handler is None:
            return f"unknown command: '{name}'\n"
        try:
            return await handler(rest)
        except BlockError as exc:
            return f"Error: {exc}\n"
        except Exception as exc:  # a bug in one command must not end the monitor
            log.exception("HMP command %r failed", line)
            return f"Error: {exc}\n"

    async def _block_set_io_throttle(self, rest: str) -> str:
        usage = 'Try "help block_set_io_throttle" for more information\n'
        args = _Args(rest)
        device = args.word()
        if device is None:
            return "block_set_io_throttle: block device name expected\n" + usage
        values: dict[str, int] = {}
        try:
            for name in THROTTLE_REQUIRED:
                values[name] = args.integer()
        except _ExprError as exc:
            return f"{exc}\n" + usage
        if not args.at_end():
            return "block_set_io_throttle: extraneous characters at the end of line\n" + usage
        set_io_throttle(self.layer, device, None, values)
        return ""

    async def _quit(self, rest: str) -> str:
        self.on_quit()
        return ""

    async def _stop(self, rest: str) -> str:
        self.layer.vm_stop("paused")
        return ""

    async def _cont(self, rest: str) -> str:
        self.layer.vm_resume()
        return ""

    async def _help(self, rest: str) -> str:
        if rest:
            text = _HELP.get(rest)
            return f"{text}\n" if text else f"unknown command: '{rest}'\n"
        return "".join(_HELP[k] + "\n" for k in sorted(_HELP))

    async def _info(self, rest: str) -> str:
        words = rest.split()
        if not words:
            return "info block  -- show info of one block device or all block devices (-n: show named nodes; -v: show details)\n"
        if words[0] == "status":
            state = self.layer.run_state
            if state == "running":
                return "VM status: running\n"
            return "VM status: paused\n" if state == "paused" else f"VM status: paused ({state})\n"
        if words[0] == "chardev":
            return self.chardevs.info()
        if words[0] != "block":
            return f"unknown command: 'info {words[0]}'\n"
        nodes = verbose = False
        device: str | None = None
        for word in words[1:]:
            if word == "-n":
                nodes = True
            elif word == "-v":
                verbose = True
            elif device is None:
                device = word
        out: list[str] = []
        if not nodes:
            for index, bb in enumerate(self.layer.backends):
                if device is not None and bb.name != device:
                    continue
                if index:
                    out.append("\n")
                out.append(format_block_info(bb, bb.root, verbose))
        if nodes or device is not None:
            # QEMU lists named nodes newest first.
            named = list(reversed(self.layer.nodes))
            for index, node in enumerate(named):
                if device is not None and node.node_name != device:
                    continue
                if index:
                    out.append("\n")
                out.append(format_block_info(None, node, verbose))
        return "".join(out)

    async def _qemu_io(self, rest: str) -> str:
        try:
            args = shlex.split(rest)
        except ValueError as exc:
            raise BlockError(str(exc)) from exc
        by_node = False
        if args and args[0] == "-d":
            by_node = True
            args = args[1:]
        if len(args) > 2:
            return ('qemu-io: extraneous characters at the end of line\n'
                    'Try "help qemu-io" for more information\n')
        if len(args) < 2:
            what = "string" if args else "block device name"
            return f'qemu-io: {what} expected\nTry "help qemu-io" for more information\n'
        device, command = args
        bb = None if by_node else self.layer.find_backend(device)
        temporary = False
        if bb is None:
            node = self.layer.find_node(device)
            if node is None:
                if by_node:
                    raise BlockError(f"Device '{device}' not found")
                raise BlockError(f"Cannot find device='' nor node-name='{device}'")
            # Like QEMU, a node without a BlockBackend gets a temporary one for the command.
            bb = BlockBackend(self.layer, "")
            bb.attach(node)
            temporary = True
        out: list[str] = []
        try:
            io = QemuIO(bb, lambda s: out.append(s + "\n"), lambda s: out.append(s + "\n"))
            await io.run(command)
        finally:
            if temporary:
                bb.attach(None)
        return "".join(out)

    async def _snapshot_blkdev(self, rest: str) -> str:
        args = rest.split()
        existing = False
        if args and args[0] == "-n":
            existing = True
            args = args[1:]
        if not args:
            return ('snapshot_blkdev: block device name expected\n'
                    'Try "help snapshot_blkdev" for more information\n')
        device = args[0]
        if len(args) < 2:
            raise BlockError("Parameter 'snapshot-file' is missing")
        filename = args[1]
        fmt = args[2] if len(args) > 2 else "qcow2"
        bb = self.layer.find_backend(device)
        if bb is None:
            raise BlockError(f"Cannot find device='{device}' nor node-name=''")
        lines: list[str] = []
        await external_snapshot(self.layer, bb, filename, fmt, existing=existing,
                                report=lambda line: lines.append(line + "\n"))
        return "".join(lines)
