"""``blockgraph storage-daemon``: qemu-storage-daemon 7.2's command line.

Options are processed in order, as QEMU does: ``--blockdev`` opens nodes (owned by the
monitor), ``--drive`` (ours, not qemu-storage-daemon's: qemu-system's ``-drive``) makes a named
BlockBackend, ``--chardev socket,...`` (unix or TCP, see :mod:`blockgraph.monitor.chardev`) or
``--chardev stdio`` and ``--monitor chardev=X`` serve QMP, ``--object`` makes secrets and TLS
credentials (other object types only take their id), ``--pidfile`` is written once everything
listens (the "started" signal), ``--daemonize`` returns in the parent only after that. ``quit``
or SIGINT/SIGTERM/SIGHUP end the daemon, removing the pid file and the sockets.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from blockgraph.errors import BlockError
from blockgraph.graph.drive import drive_new
from blockgraph.graph.layer import BlockLayer
from blockgraph.monitor.chardev import ChardevError, parse_chardev
from blockgraph.monitor.qmp import exports
from blockgraph.monitor.qmp.commands import DRIVERS, QMPMonitor, check_blockdev_options
from blockgraph.monitor.qmp.server import QMPServer
from blockgraph.objects import add_object, object_help
from blockgraph.options.keyval import crumple, parse_blockdev, parse_drive_opts, parse_keyval
from blockgraph.options.qjson import parse_json
from blockgraph.version import QEMU_VERSION_STRING

_HELP = """\
Usage: {prog} [options]
QEMU storage daemon

  -h, --help             display this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         specify tracing options
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         configure a block backend

  --chardev <options>    configure a character device backend
                         (see the qemu(1) man page for possible options)

  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmap=<name>]
                         export the specified block node over NBD
                         (requires --nbd-server)

  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                         configure a QMP monitor

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
                         start an NBD server for exporting block nodes

  --object help          list object types that can be added
  --object <type>,help   list properties for the given object type
  --object <type>[,<property>=<value>...]
                         create a new object of type <type>, setting
                         properties in the order they are specified. Note
                         that the 'id' property must be set.

  --pidfile <path>       write process ID to a file after startup

"""

# long option -> takes an argument
_LONG = {"help": False, "version": False, "trace": True, "blockdev": True, "drive": True,
         "chardev": True,
         "export": True, "monitor": True, "nbd-server": True, "object": True, "pidfile": True,
         "daemonize": False}
_SHORT = {"h": "help", "V": "version", "T": "trace"}


class _Fail(Exception):
    """A command-line error: the message is printed after the program name."""


@dataclass
class _Config:
    actions: list[tuple[str, str]] = field(default_factory=list)
    pidfile: str | None = None
    daemonize: bool = False


def _parse_argv(prog: str, args: list[str]) -> _Config | int:
    """getopt_long's view of ``args``; returns an exit code for -h/-V and syntax errors."""
    config = _Config()
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            matches = [o for o in _LONG if o == name] or [o for o in _LONG if o.startswith(name)]
            if len(matches) != 1:
                kind = "ambiguous" if len(matches) > 1 else "unrecognized"
                sys.stderr.write(f"{prog}: {kind} option '{arg}'\n")
                return 1
            name = matches[0]
            if _LONG[name]:
                if not eq:
                    if i >= len(args):
                        sys.stderr.write(f"{prog}: option '--{name}' requires an argument\n")
                        return 1
                    value = args[i]
                    i += 1
            elif eq:
                sys.stderr.write(f"{prog}: option '--{name}' doesn't allow an argument\n")
                return 1
        elif arg.startswith("-") and len(arg) > 1 and arg != "--":
            letter = arg[1]
            if letter not in _SHORT:
                sys.stderr.write(f"{prog}: invalid option -- '{letter}'\n")
                return 1
            name = _SHORT[letter]
            value = arg[2:]
            if _LONG[name] and not value:
                if i >= len(args):
                    sys.stderr.write(f"{prog}: option requires an argument -- '{letter}'\n")
                    return 1
                value = args[i]
                i += 1
        else:
            sys.stderr.write(f"{prog}: {arg}: Unexpected argument\n")
            return 1
        if name == "help":
            sys.stdout.write(_HELP.format(prog=prog))
            return 0
        if name == "version":
            sys.stdout.write(f"{prog} version {QEMU_VERSION_STRING} (blockgraph)\n"
                             "Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project "
                             "developers\n")
            return 0
        if name == "daemonize":
            config.daemonize = True
        elif name == "pidfile":
            config.pidfile = value
        elif name == "trace":
            pass  # tracing is accepted and has no effect
        else:
            config.actions.append((name, value))
    return config


class _Daemon:
    def __init__(self, prog: str, config: _Config) -> None:
        self.prog = prog
        self.config = config
        self.layer = BlockLayer()
        self.monitor = QMPMonitor(self.layer, "storage-daemon", output=self._print)
        self.server = QMPServer(self.monitor)
        self.chardevs = self.monitor.chardevs
        self.pidfile_fd: int | None = None
        self.warnings: list[str] = []

    @staticmethod
    def _print(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    # -- options ----------------------------------------------------------------------------

    async def apply(self, option: str, value: str) -> None:
        handler: dict[str, Callable[[str], object]] = {
            "blockdev": self._blockdev,
            "drive": self._drive,
            "chardev": self._chardev,
            "monitor": self._monitor,
            "object": self._object,
            "nbd-server": self._nbd_server,
            "export": self._export,
        }
        result = handler[option](value)
        if asyncio.iscoroutine(result):
            await result

    async def _nbd_server(self, value: str) -> None:
        await exports.cli_nbd_server(self.monitor, value)

    async def _export(self, value: str) -> None:
        await exports.cli_export(self.monitor, value)

    async def _blockdev(self, value: str) -> None:
        if value.startswith("{"):
            parsed = parse_json(value)
            assert isinstance(parsed, dict)
            check_blockdev_options(parsed)
            options = parse_blockdev(value)
        else:
            options = parse_blockdev(value)
            driver = options.get("driver")
            if driver is None:
                raise BlockError("Parameter 'driver' is missing")
            if driver not in DRIVERS:
                raise BlockError(f"Parameter 'driver' does not accept value '{driver}'")
            crumple(options)
        if "node-name" not in options:
            raise BlockError("'node-name' must be specified for the root node")
        node = await self.layer.open_node(None, options)
        self.monitor.owned.add(node.node_name)

    async def _drive(self, value: str) -> None:
        """``--drive``, a blockgraph addition: qemu-system's ``-drive`` (a named BlockBackend
        with its rerror/werror policy; an export of it by its id acts as its device)."""
        warnings: list[str] = []
        opts = parse_drive_opts(value, warnings)
        for warning in warnings:
            sys.stderr.write(f"{self.prog}: --drive {value}: warning: {warning}\n")
        self.layer.warnings.clear()
        await drive_new(self.layer, opts)
        for warning in self.layer.warnings:
            sys.stderr.write(f"WARNING: {warning}\n")

    async def _chardev(self, value: str) -> None:
        try:
            chardev = parse_chardev(value, self.warnings)
        except ChardevError as exc:
            raise _Fail("\n".join(exc.messages)) from None
        finally:
            self._warn("--chardev", value)
        if chardev.label in self.chardevs:
            raise _Fail("duplicate yank instance" if chardev.backend == "socket"
                        else f"attempt to add duplicate property '{chardev.label}' to object "
                             "(type 'container')")

        def info(text: str) -> None:
            sys.stderr.write(f"{self.prog}: --chardev {value}: info: {text}\n")

        try:
            chardev.open(info)
        except ChardevError as exc:
            raise _Fail("\n".join(exc.messages)) from None
        self.chardevs.add(chardev)

    def _warn(self, option: str, value: str) -> None:
        for warning in self.warnings:
            sys.stderr.write(f"{self.prog}: {option} {value}: warning: {warning}\n")
        self.warnings.clear()

    async def _monitor(self, value: str) -> None:
        opts = parse_keyval(value, implied_key="chardev")
        for key in opts:
            if key not in ("chardev", "mode", "pretty", "id"):
                raise _Fail(f"Parameter '{key}' is unexpected")
        mode = opts.get("mode", "control")
        if mode not in ("control", "readline"):
            raise _Fail(f"Parameter 'mode' does not accept value '{mode}'")
        pretty = opts.get("pretty", "off")
        if pretty not in ("on", "off"):
            raise _Fail("Parameter 'pretty' expects 'on' or 'off'")
        name = opts.get("chardev")
        if name is None:
            raise _Fail("Parameter 'chardev' is missing")
        chardev = self.chardevs.get(name)
        if chardev is None:
            raise _Fail(f'chardev "{name}" not found')
        if mode != "control":
            raise _Fail("Only QMP is supported")
        if chardev.in_use:
            raise _Fail(f"Device '{name}' is in use")
        self.server.serve_chardev(chardev, pretty=pretty == "on")

    def _object(self, value: str) -> None:
        lines = object_help(value)
        if lines is not None:
            for line in lines:
                self._print(line)
            raise SystemExit(0)
        add_object(self.layer.objects, value)

    # -- pid file ---------------------------------------------------------------------------

    def write_pidfile(self) -> None:
        path = self.config.pidfile
        if path is None:
            return
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise _Fail(f"Cannot open pid file: {exc.strerror}") from exc
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise _Fail(f"Cannot lock pid file: {exc.strerror}") from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.pidfile_fd = fd

    def remove_pidfile(self) -> None:
        if self.pidfile_fd is not None and self.config.pidfile is not None:
            try:
                os.unlink(self.config.pidfile)
            except OSError:
                pass
            os.close(self.pidfile_fd)
            self.pidfile_fd = None

    # -- run --------------------------------------------------------------------------------

    async def _abandon(self) -> None:
        """Startup failed: stop the monitors already serving (nodes stay as they are)."""
        await self.server.close()
        self.chardevs.close()

    async def run(self, started: Callable[[], None]) -> int:
        for option, value in self.config.actions:
            try:
                await self.apply(option, value)
            except (BlockError, _Fail) as exc:
                sys.stderr.write(f"{self.prog}: --{option} {value}: {exc}\n")
                await self._abandon()
                return 1
        try:
            self.write_pidfile()
        except _Fail as exc:
            sys.stderr.write(f"{self.prog}: {exc}\n")
            await self._abandon()
            return 1
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signum, self.server.quit.set)
        started()
        try:
            await self.server.quit.wait()
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(signum)
                # Stopping already: a second signal must not cut the final flushes short.
                signal.signal(signum, signal.SIG_IGN)
            await exports.shutdown(self.monitor)
            await self.server.close()
            self.chardevs.close()
            self.remove_pidfile()
        return 0


def _daemonize() -> Callable[[], None]:
    """Fork; the parent waits for the child's "started" byte and exits with its verdict.

    :return: in the child, the callback that tells the parent startup is complete.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        status = os.read(read_end, 1)
        if status == b"\0":
            os._exit(0)
        _, wait_status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(wait_status)
        os._exit(code or 1)
    os.close(read_end)
    os.setsid()

    def started() -> None:
        os.write(write_end, b"\0")
        os.close(write_end)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)

    return started


def _nothing() -> None:
    return None


def main(prog: str, args: list[str]) -> int:
    """Run the daemon; return its exit code."""
    parsed = _parse_argv(prog, args)
    if isinstance(parsed, int):
        return parsed
    config = parsed
    started = _daemonize() if config.daemonize else _nothing
    daemon = _Daemon(prog, config)
    try:
        return daemon.layer.run(daemon.run(started))
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        daemon.layer.close()
