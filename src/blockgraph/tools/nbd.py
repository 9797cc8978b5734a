"""``blockgraph nbd``: qemu-nbd 7.2's command line for serving one image over NBD.

Options are checked in the order they are given, and errors use qemu-nbd's texts and exit
status 1. Without ``-k`` the server listens on TCP (``0.0.0.0:10809`` unless ``-b``/``-p``), as
qemu-nbd does. With ``--fork`` the parent returns only once the socket is listening (or with the
child's error), so a script can connect right away.
"""

from __future__ import annotations

import asyncio
import contextlib
import getopt
import os
import signal
import socket
import sys
from dataclasses import dataclass, field

from blockgraph.errors import BlockError, OptionError
from blockgraph.export.nbd.protocol import MAX_STRING_SIZE
from blockgraph.export.nbd.server import NBDExport, NBDServer, inet_listener, unix_listener
from blockgraph.graph.inherit import AIO_FLAG
from blockgraph.graph.layer import BlockLayer
from blockgraph.objects import ObjectRegistry, add_object, object_help
from blockgraph.objects.tls import TlsCredsX509
from blockgraph.options.cache import parse_cache_mode
from blockgraph.options.keyval import parse_drive_opts

_SHORT = "hVb:o:p:rsnc:dvk:e:f:tl:x:T:D:AB:L"
_LONG = [
    "help", "version", "bind=", "port=", "socket=", "offset=", "read-only", "allocation-depth",
    "snapshot", "bitmap=", "load-snapshot=", "nocache", "cache=", "aio=", "discard=", "connect=",
    "disconnect", "shared=", "format=", "persistent", "verbose", "export-name=", "description=",
    "detect-zeroes=", "image-opts", "trace=", "fork", "pid-file=", "object=", "tls-creds=",
    "tls-authz=", "tls-hostname=", "list", "selinux-label=",
]
_HELP = """\
Usage: qemu-nbd [OPTIONS] FILE
  or:  qemu-nbd -L [OPTIONS]
QEMU Disk Network Block Device Utility (blockgraph)

  -h, --help                display this help and exit
  -V, --version             output version information and exit

Connection properties:
  -p, --port=PORT           port to listen on (default `10809')
  -b, --bind=IFACE          interface to bind to (default `0.0.0.0')
  -k, --socket=PATH         path to the unix socket
  -e, --shared=NUM          device can be shared by NUM clients (default '1')
  -t, --persistent          don't exit on the last connection
  -v, --verbose             display extra debugging information
  -x, --export-name=NAME    expose export by name (default is empty string)
  -D, --description=TEXT    export a human-readable description

Exposing part of the image:
  -A, --allocation-depth    expose the allocation depth

General purpose options:
  --object type,id=ID,...   define an object such as 'secret'
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
  --fork                    fork off the server process and exit the parent
                            once the server is running
  --pid-file=PATH           store the server's process ID in the given file

Block device options:
  -f, --format=FORMAT       set image format (raw, qcow2, ...)
  -r, --read-only           export read-only
  -s, --snapshot            use FILE as an external snapshot, create a temporary
                            file with backing_file=FILE, redirect the write to
                            the temporary one
  -n, --nocache             disable host cache
      --cache=MODE          set cache mode used to access the disk image, the
                            valid options are: 'none', 'writeback' (default),
                            'writethrough', 'directsync' and 'unsafe'
      --aio=MODE            set AIO mode (native, io_uring or threads)
      --discard=MODE        set discard mode (ignore, unmap)
      --detect-zeroes=MODE  set detect-zeroes mode (off, on, unmap)
      --image-opts          treat FILE as a full set of image options
"""


class _Exit(Exception):
    def __init__(self, message: str | None, status: int = 1, hint: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.hint = hint


@dataclass
class _Settings:
    fmt: str | None = None
    cache: str = "writeback"
    aio: str | None = None
    discard: str | None = None
    detect_zeroes: str | None = None
    socket_path: str | None = None
    port: str = "10809"
    bind: str = "0.0.0.0"
    name: str = ""
    description: str = ""
    read_only: bool = False
    snapshot: bool = False
    shared: int = 1
    persistent: bool = False
    allocation_depth: bool = False
    bitmaps: list[str] = field(default_factory=list)
    load_snapshot: str | None = None
    fork: bool = False
    pid_file: str | None = None
    image_opts: bool = False
    tls_creds: str | None = None
    tls_authz: str | None = None
    tls_hostname: str | None = None
    tls: TlsCredsX509 | None = None
    objects: ObjectRegistry = field(default_factory=ObjectRegistry)
    offset: int | None = None
    connect: str | None = None
    list_mode: bool = False


def _getopt_message(exc: getopt.GetoptError) -> str:
    opt = exc.opt
    long = len(opt) > 1
    if "not recognized" in exc.msg:
        return f"unrecognized option '--{opt}'" if long else f"invalid option -- '{opt}'"
    if "requires argument" in exc.msg:
        return f"option '--{opt}' requires an argument" if long else f"option requires an argument -- '{opt}'"
    if "must not have an argument" in exc.msg:
        return f"option '--{opt}' doesn't allow an argument"
    if "not a unique prefix" in exc.msg:
        return f"option '--{opt}' is ambiguous"
    return exc.msg


def _parse(args: list[str]) -> tuple[_Settings, list[str]]:
    try:
        opts, rest = getopt.gnu_getopt(args, _SHORT, _LONG)
    except getopt.GetoptError as exc:
        raise _Exit(_getopt_message(exc), hint=True) from None
    s = _Settings()
    for flag, value in opts:
        if flag in ("-h", "--help"):
            sys.stdout.write(_HELP)
            raise _Exit(None, 0)
        if flag in ("-V", "--version"):
            sys.stdout.write("qemu-nbd 7.2.0 (blockgraph)\n")
            raise _Exit(None, 0)
        if flag in ("-f", "--format"):
            s.fmt = value
        elif flag in ("-n", "--nocache"):
            s.cache = "none"
        elif flag == "--cache":
            try:
                parse_cache_mode(value)
            except OptionError:
                raise _Exit(f"Invalid cache mode `{value}'") from None
            s.cache = value
        elif flag == "--aio":
            if value not in ("threads", "native", "io_uring"):
                raise _Exit(f"Invalid aio mode '{value}'")
            s.aio = value
        elif flag == "--discard":
            if value not in ("ignore", "off", "unmap", "on"):
                raise _Exit(f"Invalid discard mode `{value}'")
            s.discard = value
        elif flag == "--detect-zeroes":
            if value not in ("off", "on", "unmap"):
                raise _Exit(f"Failed to parse detect_zeroes mode: invalid parameter value: {value}")
            if value == "unmap" and s.discard not in ("unmap", "on"):
                raise _Exit("setting detect-zeroes to unmap is not allowed without setting discard "
                            "operation to unmap")
            s.detect_zeroes = value
        elif flag in ("-k", "--socket"):
            if not value.startswith("/"):
                raise _Exit("socket path must be absolute")
            s.socket_path = value
        elif flag in ("-p", "--port"):
            s.port = value
        elif flag in ("-b", "--bind"):
            s.bind = value
        elif flag in ("-x", "--export-name"):
            if len(value.encode()) > MAX_STRING_SIZE:
                raise _Exit(f"export name '{value}' too long")
            s.name = value
        elif flag in ("-D", "--description"):
            if len(value.encode()) > MAX_STRING_SIZE:
                raise _Exit(f"description '{value}' too long")
            s.description = value
        elif flag in ("-r", "--read-only"):
            s.read_only = True
        elif flag in ("-s", "--snapshot"):
            s.snapshot = True
        elif flag in ("-e", "--shared"):
            try:
                s.shared = int(value, 0)
            except ValueError:
                raise _Exit(f"Invalid shared device number '{value}'") from None
            if s.shared < 0:
                raise _Exit(f"Invalid shared device number '{value}'")
        elif flag in ("-t", "--persistent"):
            s.persistent = True
        elif flag in ("-A", "--allocation-depth"):
            s.allocation_depth = True
        elif flag in ("-B", "--bitmap"):
            s.bitmaps.append(value)
        elif flag in ("-l", "--load-snapshot"):
            s.load_snapshot = value
        elif flag in ("-o", "--offset"):
            try:
                s.offset = int(value, 0)
            except ValueError:
                raise _Exit(f"Invalid offset '{value}'") from None
        elif flag == "--fork":
            s.fork = True
        elif flag == "--pid-file":
            s.pid_file = value
        elif flag == "--image-opts":
            s.image_opts = True
        elif flag == "--object":
            # Made as the option is met, as qemu-nbd does: a bad object ends the run here.
            lines = object_help(value)
            if lines is not None:
                sys.stdout.write("".join(line + "\n" for line in lines))
                raise _Exit(None, 0)
            try:
                add_object(s.objects, value)
            except BlockError as exc:
                raise _Exit(str(exc)) from None
        elif flag == "--tls-creds":
            s.tls_creds = value
        elif flag == "--tls-authz":
            s.tls_authz = value
        elif flag == "--tls-hostname":
            s.tls_hostname = value
        elif flag in ("-c", "--connect"):
            s.connect = value
        elif flag in ("-L", "--list"):
            s.list_mode = True
        # -v, -T/--trace, -d and --selinux-label change nothing here.
    return s, rest


def main(prog: str, args: list[str]) -> int:
    name = "qemu-nbd" if prog.endswith("qemu-nbd") else prog
    try:
        return _main(name, args)
    except _Exit as exc:
        if exc.message is not None:
            sys.stderr.write(f"{name}: {exc.message}\n")
        if exc.hint:
            sys.stderr.write(f"{name}: Try `qemu-nbd --help' for more information.\n")
        return exc.status


def _main(prog: str, args: list[str]) -> int:
    s, rest = _parse(args)
    if s.list_mode:
        raise _Exit("listing exports (-L) is not supported")
    if len(rest) != 1:
        sys.stderr.write(f"{prog}: Invalid number of arguments\nTry `qemu-nbd --help' for more information.\n")
        return 1
    if s.tls_creds is not None:
        if s.connect is not None:
            raise _Exit("TLS is not supported with a host device")
        if s.tls_hostname is not None and not s.list_mode:
            raise _Exit("TLS hostname is only supported with export list")
        try:
            s.tls = s.objects.tls_creds(s.tls_creds, "server")
        except BlockError as exc:
            raise _Exit(f"Failed to get TLS creds: {exc}") from None
    else:
        if s.tls_authz is not None:
            raise _Exit("--tls-authz is not permitted without --tls-creds")
        if s.tls_hostname is not None:
            raise _Exit("--tls-hostname is not permitted without --tls-creds")
    if s.connect is not None:
        raise _Exit(f"Failed to open {s.connect}: the kernel NBD client is not supported")
    if s.image_opts and s.fmt is not None:
        raise _Exit("--image-opts and -f are mutually exclusive")
    if not s.fork:
        return _serve(prog, s, rest[0], None)
    # The parent waits until the child listens (a NUL byte through the pipe) or fails (its
    # error text, then EOF), and relays what the child printed meanwhile.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        status = 1
        try:
            status = _serve(prog, s, rest[0], write_end)
        finally:
            os._exit(status)
    os.close(write_end)
    chunks = []
    while True:
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_end)
    data = b"".join(chunks)
    ready = data.endswith(b"\0")
    sys.stderr.buffer.write(data[:-1] if ready else data)
    sys.stderr.flush()
    if ready:
        return 0
    _, wait_status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(wait_status)
    return code if code > 0 else 1


def _serve(prog: str, s: _Settings, filename: str, ready_fd: int | None) -> int:
    saved_stderr: int | None = None
    if ready_fd is not None:
        # Like qemu-nbd's child: a session of its own, errors to the parent until ready.
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.close(devnull)
        saved_stderr = os.dup(2)
        os.dup2(ready_fd, 2)
    layer = BlockLayer()
    layer.objects = s.objects
    listener: socket.socket | None = None
    try:
        try:
            export, listener = _setup(prog, s, filename, layer)
        except _Exit as exc:
            if exc.message is not None:
                sys.stderr.write(f"{prog}: {exc.message}\n")
            sys.stderr.flush()
            return exc.status
        if s.pid_file is not None:
            try:
                with open(s.pid_file, "w") as f:
                    f.write(f"{os.getpid()}\n")
            except OSError as exc:
                sys.stderr.write(f"{prog}: Could not create '{s.pid_file}': {os.strerror(exc.errno or 0)}\n")
                return 1
        if ready_fd is not None and saved_stderr is not None:
            sys.stderr.flush()
            os.write(ready_fd, b"\0")
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
            os.close(ready_fd)
        layer.run(_run_server(s, export, listener))
        return 0
    finally:
        if listener is not None:
            listener.close()
            if s.socket_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(s.socket_path)
        layer.close()


def _setup(prog: str, s: _Settings, filename: str, layer: BlockLayer) -> tuple[NBDExport, socket.socket]:
    mode = parse_cache_mode(s.cache)
    options: dict[str, object] = {}
    file_arg: str | None = filename
    if s.image_opts:
        options.update(parse_drive_opts(filename))
        file_arg = None
    elif s.fmt is not None:
        options["driver"] = s.fmt
    options.setdefault("cache.direct", mode.direct)
    options.setdefault("cache.no-flush", mode.no_flush)
    if s.aio is not None and s.aio != "threads":
        options[AIO_FLAG] = s.aio
    if s.discard is not None:
        options["discard"] = s.discard
    if s.detect_zeroes is not None:
        options["detect-zeroes"] = s.detect_zeroes
    if s.read_only:
        options["read-only"] = True
    bb = layer.new_backend("")
    bb.write_cache = mode.writeback
    bb.read_only = s.read_only
    try:
        layer.run(layer.open_node(file_arg, options, backend=bb))
    except BlockError as exc:
        raise _Exit(f"Failed to blk_new_open '{filename}': {exc}") from None
    finally:
        for warning in layer.warnings:
            sys.stderr.write(f"WARNING: {warning}\n")
        layer.warnings.clear()
    if s.snapshot:
        from blockgraph.graph.snapshot import temporary_snapshot

        try:
            layer.run(temporary_snapshot(layer, bb))
        except BlockError as exc:
            raise _Exit(f"Failed to blk_new_open '{filename}': {exc}") from None
    root = bb.root
    assert root is not None
    if s.load_snapshot is not None:
        raise _Exit(f"Failed to load snapshot: Block format '{root.driver_name}' used by device '' "
                    "does not support temporarily loading internal snapshots")
    from blockgraph.export.nbd.status import find_bitmap

    for name in s.bitmaps:
        bitmap = find_bitmap(root, name)
        if bitmap is None:
            raise _Exit(f"Bitmap '{name}' is not found")
        if bitmap.inconsistent:
            raise _Exit(f"Bitmap '{name}' is inconsistent and cannot be used")
    if s.offset is not None:
        raise _Exit("-o/--offset is not supported yet")
    export = NBDExport(s.name, bb, description=s.description, read_only=s.read_only,
                       allocation_depth=s.allocation_depth, bitmaps=list(s.bitmaps))
    return export, _listen(s)


def _listen(s: _Settings) -> socket.socket:
    if s.socket_path is not None:
        try:
            return unix_listener(s.socket_path)
        except OSError as exc:
            raise _Exit(f"Failed to bind socket to {s.socket_path}: {os.strerror(exc.errno or 0)}") from None
    try:
        return inet_listener(s.bind, str(s.port))
    except BlockError as exc:
        raise _Exit(str(exc)) from None


async def _run_server(s: _Settings, export: NBDExport, listener: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    server = NBDServer([export], max_connections=s.shared, tls_creds=s.tls, tls_authz=s.tls_authz,
                       objects=s.objects)
    if not s.persistent:
        server.on_idle = stop.set
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, stop.set)
    await server.listen_socket(listener)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
            # We are already stopping: a signal now (a client's "kill" racing our own exit
            # after the last disconnect) must not cut the final flush and close short.
            signal.signal(signum, signal.SIG_IGN)
        await server.close()
        with contextlib.suppress(Exception):
            await export.backend.flush()
