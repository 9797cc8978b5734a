"""``blockgraph system``: the block options of ``qemu-system-x86_64``, with no guest.

Accepts and ignores the machine/display options a block test passes; builds the graph from
``-blockdev`` (first, as QEMU does) and ``-drive``; serves QMP (``-qmp``, ``-chardev`` +
``-mon mode=control``) on sockets or stdio and the human monitor on stdio (``-monitor stdio``),
all at once: ``quit`` from any of them ends the process. Without a monitor it waits, as QEMU
would, until it is killed.

A stdio monitor whose input ends ends the process too (QEMU would keep running unmonitored).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from blockgraph.errors import BlockError
from blockgraph.graph.drive import drive_new
from blockgraph.graph.layer import BlockLayer
from blockgraph.monitor.chardev import Chardev, ChardevError, parse_chardev, parse_legacy, qemu_opts
from blockgraph.monitor.hmp import HMP
from blockgraph.monitor.qmp.commands import QMPMonitor, request_quit
from blockgraph.monitor.qmp.server import QMPServer
from blockgraph.objects import ObjectCreationError, add_object
from blockgraph.options.keyval import parse_blockdev, parse_drive_opts
from blockgraph.version import QEMU_VERSION_STRING

# Options taking an argument that have no effect without a guest.
_IGNORED_WITH_ARG = {"machine", "M", "accel", "display", "m", "smp", "cpu", "name", "serial",
                     "parallel", "vga", "boot", "rtc", "device", "global",
                     "L", "bios", "kernel", "initrd", "append", "netdev", "net", "audiodev"}
_IGNORED_FLAGS = {"nodefaults", "nographic", "no-shutdown", "no-reboot", "enable-kvm",
                  "snapshot", "daemonize"}


@dataclass
class _Monitor:
    chardev: Chardev
    control: bool  # QMP; else the human monitor
    pretty: bool = False


class _Fail(Exception):
    """A command-line error, reported as ``prog: option value: message`` (one line each)."""

    def __init__(self, option: str, value: str, *messages: str) -> None:
        super().__init__(messages[0])
        self.option = option
        self.value = value
        self.messages = messages


def main(prog: str, args: list[str]) -> int:
    """Run; return the exit code."""
    drives: list[str] = []
    blockdevs: list[str] = []
    chardevs: list[str] = []
    monitors: list[tuple[str, str]] = []  # -qmp, -monitor, -mon in command-line order
    prelaunch = False
    objects: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-"):
            # A bare argument is the legacy hda image.
            drives.append(f"index=0,media=disk,file={arg.replace(',', ',,')}")
            i += 1
            continue
        name = arg.lstrip("-")
        if name in _IGNORED_FLAGS:
            i += 1
            continue
        if name == "S":
            prelaunch = True
            i += 1
            continue
        if name in ("drive", "blockdev", "monitor", "qmp", "mon", "chardev", "object") or name in _IGNORED_WITH_ARG:
            if i + 1 >= len(args):
                sys.stderr.write(f"{prog}: {arg}: requires an argument\n")
                return 1
            value = args[i + 1]
            if name == "drive":
                drives.append(value)
            elif name == "blockdev":
                blockdevs.append(value)
            elif name == "chardev":
                chardevs.append(value)
            elif name in ("monitor", "qmp", "mon"):
                monitors.append((name, value))
            elif name == "object":
                objects.append(value)
            i += 2
            continue
        if name in ("version", "h", "help"):
            sys.stdout.write(f"QEMU emulator version {QEMU_VERSION_STRING} (blockgraph)\n")
            return 0
        sys.stderr.write(f"{prog}: {arg}: invalid option\n")
        return 1

    layer = BlockLayer()
    if prelaunch:
        layer.run_state = "prelaunch"  # -S: the VM waits for cont
    monitor = QMPMonitor(layer, "system")

    def fail(option: str, value: str, message: str) -> int:
        sys.stderr.write(f"{prog}: {option} {value}: {message}\n")
        return 1

    for value in objects:
        # Secrets and TLS credentials exist before any block device, as in QEMU.
        try:
            add_object(layer.objects, value)
        except ObjectCreationError as exc:
            sys.stderr.write(f"{prog}: {exc}\n")
            layer.close()
            return 1
        except BlockError as exc:
            layer.close()
            return fail("-object", value, str(exc))
    try:
        wanted = _monitors(prog, monitor, chardevs, monitors)
    except _Fail as exc:
        for message in exc.messages:
            fail(f"-{exc.option}", exc.value, message)
        monitor.chardevs.close()
        return 1
    try:
        for value in blockdevs:
            try:
                options = parse_blockdev(value)
                if any(k == "cache.writeback" for k in options):
                    raise BlockError("Parameter 'cache.writeback' is unexpected")
                if "cache" in options:
                    raise BlockError("Invalid parameter type for 'cache', expected: object")
                if "driver" not in options:
                    raise BlockError("Parameter 'driver' is missing")
                if "node-name" not in options:
                    raise BlockError("'node-name' must be specified for the root node")
                layer.run(layer.open_node(None, options))
            except BlockError as exc:
                return fail("-blockdev", value, str(exc))
        for value in drives:
            warnings: list[str] = []
            try:
                opts = parse_drive_opts(value, warnings)
                for warning in warnings:
                    sys.stderr.write(f"{prog}: -drive {value}: warning: {warning}\n")
                layer.warnings.clear()
                layer.run(drive_new(layer, opts))
                for warning in layer.warnings:
                    sys.stderr.write(f"WARNING: {warning}\n")
            except BlockError as exc:
                return fail("-drive", value, str(exc))
        layer.run(_serve(monitor, wanted))
        return 0
    finally:
        monitor.chardevs.close()
        layer.close()


def _monitors(prog: str, monitor: QMPMonitor, chardevs: list[str],
              specs: list[tuple[str, str]]) -> list[_Monitor]:
    """Create the chardevs (``-chardev`` first, as QEMU does), then the monitors in order.

    :raise _Fail: QEMU's text for the first bad option.
    """
    registry = monitor.chardevs

    def add(option: str, value: str, chardev: Chardev) -> None:
        if chardev.backend == "stdio" and any(c.backend == "stdio" for c in registry):
            raise _Fail(option, value, "cannot use stdio by multiple character devices")

        def info(text: str) -> None:
            sys.stderr.write(f"{prog}: -{option} {value}: info: {text}\n")

        try:
            chardev.open(info)
        except ChardevError as exc:
            raise _Fail(option, value, *exc.messages) from None
        registry.add(chardev)

    for value in chardevs:
        warnings: list[str] = []
        try:
            chardev = parse_chardev(value, warnings)
        except ChardevError as exc:
            raise _Fail("chardev", value, *exc.messages) from None
        finally:
            for warning in warnings:
                sys.stderr.write(f"{prog}: -chardev {value}: warning: {warning}\n")
        if chardev.label in registry:
            raise _Fail("chardev", value, f"Duplicate ID '{chardev.label}' for chardev")
        add("chardev", value, chardev)

    wanted: list[_Monitor] = []
    compat = 0
    for option, value in specs:
        if option == "mon":
            wanted.append(_mon(registry.get, value))
            continue
        if option == "monitor" and value == "none":
            continue
        try:
            chardev = parse_legacy(value, f"compat_monitor{compat}")
        except ChardevError as exc:
            raise _Fail(option, value, *exc.messages) from None
        compat += 1
        add(option, value, chardev)
        chardev.in_use = True
        wanted.append(_Monitor(chardev, control=option == "qmp"))
    return wanted


def _mon(find: Callable[[str], Chardev | None], value: str) -> _Monitor:
    """``-mon [chardev=]NAME[,mode=readline|control][,pretty=on|off]``."""
    try:
        opts = qemu_opts(value, "chardev")
    except ChardevError as exc:
        raise _Fail("mon", value, *exc.messages) from None
    for key in opts:
        if key not in ("chardev", "mode", "pretty", "id"):
            raise _Fail("mon", value, f"Invalid parameter '{key}'")
    pretty = opts.get("pretty", "off")
    if pretty not in ("on", "off"):
        raise _Fail("mon", value, "Parameter 'pretty' expects 'on' or 'off'")
    name = opts.get("chardev")
    if name is None:
        raise _Fail("mon", value, "Parameter 'chardev' is missing")
    mode = opts.get("mode", "readline")
    if mode not in ("readline", "control"):
        raise _Fail("mon", value, f"Parameter 'mode' does not accept value '{mode}'")
    chardev = find(name)
    if chardev is None:
        raise _Fail("mon", value, f'chardev "{name}" not found')
    if chardev.in_use:
        raise _Fail("mon", value, f"Device '{name}' is in use")
    chardev.in_use = True
    return _Monitor(chardev, control=mode == "control", pretty=pretty == "on")


async def _serve(monitor: QMPMonitor, wanted: list[_Monitor]) -> None:
    """Serve every monitor until ``quit`` (from any of them) or a signal."""
    server = QMPServer(monitor)
    loop = asyncio.get_running_loop()
    hmp_task: asyncio.Future[None] | None = None
    for entry in wanted:
        if entry.control:
            server.serve_chardev(entry.chardev, pretty=entry.pretty)
            continue
        hmp = HMP(monitor.layer, lambda: request_quit(monitor), monitor.chardevs)
        if entry.chardev.backend == "stdio":
            hmp_task = asyncio.ensure_future(_hmp_stdio(hmp, server.quit))
        else:
            server.serve_chardev(entry.chardev, hmp=hmp.execute)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, server.quit.set)
    try:
        await server.quit.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        if hmp_task is not None:
            hmp_task.cancel()
        await server.close()


async def _hmp_stdio(hmp: HMP, quit: asyncio.Event) -> None:
    """The human monitor on stdin/stdout, next to whatever else the event loop serves."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[bytes] = asyncio.Queue()
    fd = sys.stdin.fileno()
    echo = not os.isatty(fd)

    def reader() -> None:
        # A thread, so that stdin may be a pipe, a tty or a regular file alike.
        pending = b""
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if not data:
                if pending:
                    loop.call_soon_threadsafe(lines.put_nowait, pending)
                loop.call_soon_threadsafe(lines.put_nowait, b"")
                return
            pending += data
            while b"\n" in pending:
                line, _, pending = pending.partition(b"\n")
                loop.call_soon_threadsafe(lines.put_nowait, line + b"\n")

    threading.Thread(target=reader, name="hmp-stdin", daemon=True).start()
    out = sys.stdout.buffer

    def write(text: str) -> None:
        # QEMU's monitor ends its lines with CR LF.
        out.write(text.replace("\n", "\r\n").encode())
        out.flush()

    write(f"QEMU {QEMU_VERSION_STRING} monitor - type 'help' for more information\n")
    while not quit.is_set():
        write("(qemu) ")
        line = await lines.get()
        if not line:
            break
        command = line.decode(errors="replace").rstrip("\r\n")
        if echo:
            # A terminal echoes what is typed; without one, print the line as QEMU's readline
            # shows it once its cursor escapes are applied.
            write(command + "\n")
        write(await hmp.execute(command))
    quit.set()
