"""``blockgraph system``: the block options of ``qemu-system-x86_64``, with no guest.

Accepts and ignores the machine/display options a block test passes; builds the graph from
``-blockdev`` (first, as QEMU does) and ``-drive``; runs the human monitor on stdio. Without a
monitor it waits, as QEMU would, until it is killed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from blockgraph.errors import BlockError
from blockgraph.graph.drive import drive_new
from blockgraph.graph.layer import BlockLayer
from blockgraph.monitor.hmp import HMP
from blockgraph.monitor.qmp.commands import QMPMonitor
from blockgraph.monitor.qmp.server import QMPServer
from blockgraph.objects import ObjectCreationError, add_object
from blockgraph.options.keyval import parse_blockdev, parse_drive_opts
from blockgraph.version import QEMU_VERSION_STRING

# Options taking an argument that have no effect without a guest.
_IGNORED_WITH_ARG = {"machine", "M", "accel", "display", "m", "smp", "cpu", "name", "serial",
                     "parallel", "vga", "boot", "rtc", "chardev", "device", "global",
                     "L", "bios", "kernel", "initrd", "append", "netdev", "net", "audiodev"}
_IGNORED_FLAGS = {"nodefaults", "nographic", "S", "no-shutdown", "no-reboot", "enable-kvm",
                  "snapshot", "daemonize"}


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def main(prog: str, args: list[str]) -> int:
    """Run; return the exit code."""
    drives: list[str] = []
    blockdevs: list[str] = []
    monitors: list[str] = []
    qmps: list[str] = []
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
        if name in ("drive", "blockdev", "monitor", "qmp", "object") or name in _IGNORED_WITH_ARG:
            if i + 1 >= len(args):
                sys.stderr.write(f"{prog}: {arg}: requires an argument\n")
                return 1
            value = args[i + 1]
            if name == "drive":
                drives.append(value)
            elif name == "blockdev":
                blockdevs.append(value)
            elif name == "monitor":
                monitors.append(value)
            elif name == "qmp":
                qmps.append(value)
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

    stdio_monitor = any(m.split(",")[0] == "stdio" for m in monitors)
    try:
        if qmps:
            if stdio_monitor:
                sys.stderr.write(f"{prog}: -qmp with -monitor stdio is not available yet\n")
                return 1
            return _run_qmp(prog, layer, qmps)
        if stdio_monitor:
            return _run_stdio_monitor(layer)
        signal.pause()
        return 0
    finally:
        layer.close()


def _run_qmp(prog: str, layer: BlockLayer, specs: list[str]) -> int:
    """Serve QMP (``-qmp stdio`` / ``-qmp unix:PATH,server=on,wait=off``) until ``quit``."""
    monitor = QMPMonitor(layer, "system")
    server = QMPServer(monitor)
    stdio = False
    paths: list[str] = []
    for spec in specs:
        if spec == "stdio":
            if stdio:
                sys.stderr.write(f"{prog}: -qmp stdio: cannot use stdio by multiple character devices\n")
                return 1
            stdio = True
        elif spec.startswith("unix:"):
            path, _, options = spec[len("unix:"):].partition(",")
            if "server=on" not in options.split(",") and "server" not in options.split(","):
                sys.stderr.write(f"{prog}: -qmp {spec}: client mode sockets are not available yet\n")
                return 1
            paths.append(path)
        else:
            sys.stderr.write(f"{prog}: -qmp {spec}: only 'stdio' and 'unix:' are available\n")
            return 1

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for path in paths:
            await server.serve_unix(path)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signum, server.quit.set)
        try:
            if stdio:
                await server.serve_stdio()
            else:
                await server.quit.wait()
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            await server.close()

    layer.run(run())
    return 0


def _run_stdio_monitor(layer: BlockLayer) -> int:
    out = sys.stdout.buffer
    quitting = False

    def on_quit() -> None:
        nonlocal quitting
        quitting = True

    hmp = HMP(layer, on_quit)
    echo = not os.isatty(sys.stdin.fileno())

    def write(text: str) -> None:
        # QEMU's monitor ends its lines with CR LF.
        out.write(text.replace("\n", "\r\n").encode())
        out.flush()

    write(f"QEMU {QEMU_VERSION_STRING} monitor - type 'help' for more information\n")
    while not quitting:
        write("(qemu) ")
        line = sys.stdin.readline()
        if not line:
            break
        command = line.rstrip("\r\n")
        if echo:
            # A terminal echoes what is typed; without one, print the line as QEMU's readline
            # shows it once its cursor escapes are applied.
            write(command + "\n")
        write(layer.run(hmp.execute(command)))
    return 0
