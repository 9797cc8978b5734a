"""Character devices a monitor runs on: QEMU 7.2's ``-chardev socket|stdio`` and the legacy
``-qmp``/``-monitor`` spellings (``tcp:H:P,server=on,wait=off``, ``unix:PATH,...``, ``stdio``).

Everything here is what QEMU does before a monitor speaks a byte: parsing the options (QemuOpts
syntax, short-form booleans with QEMU's deprecation warning), checking them in QEMU's order
and words, and opening the socket (listening, or connected when ``server=off``). Serving the
monitor on it is :mod:`blockgraph.monitor.qmp.server`'s job.

Observed on qemu-storage-daemon and qemu-system-x86_64 7.2:

* a listening chardev serves one client at a time; the next connection waits in the backlog
  (``listen(1)``) and gets its greeting once the previous client has gone;
* ``port=0`` binds a free port; ``to=N`` tries ``port`` .. ``N`` in turn; ``info chardev`` and
  ``query-chardev`` show the bound address (``disconnected:tcp:127.0.0.1:44135,server=on``,
  and ``tcp:H:P,server=on <-> PEER:PPORT`` while a client is connected);
* ``wait`` defaults to on for a server: startup blocks until the first client connects;
* ``fd=N`` takes an inherited socket (listening when ``server=on``);
* the legacy ``-qmp``/``-monitor`` syntax accepts ``server``/``nowait`` without a warning,
  ``-chardev`` warns about every short-form boolean.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from blockgraph.errors import OptionError
from blockgraph.options.keyval import parse_qemu_opts
from blockgraph.options.schema import parse_bool

__all__ = ["Chardev", "ChardevError", "ChardevRegistry", "parse_chardev", "parse_legacy",
           "qemu_opts"]

# Every key QEMU's chardev QemuOpts list accepts, whatever the backend (qemu_chardev_opts):
# a key another backend uses is accepted and ignored, as in QEMU.
_KNOWN_KEYS = frozenset((
    "backend", "path", "host", "port", "fd", "localaddr", "localport", "to", "ipv4", "ipv6",
    "wait", "server", "delay", "nodelay", "reconnect", "telnet", "tn3270", "websocket",
    "tls-creds", "tls-authz", "width", "height", "cols", "rows", "mux", "signal", "name",
    "debug", "size", "chardev", "append", "logfile", "logappend", "mouse", "tight",
    "abstract", "id"))
_BOOL_KEYS = frozenset(("ipv4", "ipv6", "wait", "server", "delay", "nodelay", "telnet", "tn3270",
                        "websocket", "mux", "signal", "append", "logappend", "tight",
                        "abstract", "mouse"))
_NUMBER_KEYS = frozenset(("to", "reconnect", "width", "height", "cols", "rows", "size",
                          "debug"))
_BACKENDS = ("socket", "stdio")


class ChardevError(Exception):
    """A chardev QEMU refuses; ``messages`` are its lines (the legacy syntax adds a second)."""

    def __init__(self, *messages: str) -> None:
        super().__init__(messages[0])
        self.messages = messages


def qemu_opts(text: str, implied: str | None, warnings: list[str] | None = None) -> dict[str, str]:
    """:func:`~blockgraph.options.keyval.parse_qemu_opts`, its error as a :class:`ChardevError`."""
    try:
        return parse_qemu_opts(text, implied, warnings)
    except OptionError as exc:
        raise ChardevError(str(exc)) from None


def _check_types(opts: dict[str, str]) -> None:
    for key, value in opts.items():
        if key not in _KNOWN_KEYS:
            raise ChardevError(f"Invalid parameter '{key}'")
        if key in _BOOL_KEYS:
            try:
                parse_bool(key, value)  # QemuOpts' words, y and n included
            except OptionError as exc:
                raise ChardevError(str(exc)) from None
        if key in _NUMBER_KEYS and not value.isdigit():
            raise ChardevError(f"Parameter '{key}' expects a number")


def _on(opts: dict[str, str], key: str, default: bool) -> bool:
    value = opts.get(key)
    if value is None:
        return default
    return parse_bool(key, value)


def _strerror(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


@dataclass
class Chardev:
    """One character device a monitor can use.

    :param label: its id (``compat_monitorN`` for ``-qmp``/``-monitor``).
    :param backend: ``socket`` or ``stdio``.
    :param opts: the options as given (strings).
    """

    label: str
    backend: str
    opts: dict[str, str] = field(default_factory=dict)
    listener: socket.socket | None = None
    # A connection made at open: the client a wait=on server waited for, or a client-mode
    # socket. It is served first.
    first: socket.socket | None = None
    peer: str | None = None
    in_use: bool = False
    _address: str = ""
    _unix_path: str | None = None

    @property
    def server(self) -> bool:
        return _on(self.opts, "server", False)

    def check(self) -> None:
        """The backend's own checks (``qemu_chr_parse_socket``), before anything is opened."""
        _check_types(self.opts)
        if self.backend != "socket":
            return
        opts = self.opts
        given = [k for k in ("path", "fd", "host") if k in opts]
        if len(given) > 1:
            raise ChardevError("None or one of 'path', 'fd' or 'host' option required.")
        if "host" in opts and "port" not in opts:
            raise ChardevError("chardev: socket: no port given")
        if not given and not self.server:
            raise ChardevError("Unable to parse FD number ")
        if "fd" in opts and not opts["fd"].isdigit():
            raise ChardevError(f"Unable to parse FD number {opts['fd']}")
        if "fd" in opts and int(opts["fd"]) > 2**31 - 1:
            # QEMU parses it into an int: a bigger number is out of range there.
            raise ChardevError(f"Unable to parse FD number {opts['fd']}: Numerical result out of range")
        if self.server and "reconnect" in opts:
            raise ChardevError("'reconnect' option is incompatible with socket in server listen mode")
        if not self.server and "wait" in opts:
            raise ChardevError("'wait' option is incompatible with socket in client connect mode")
        if "tls-creds" in opts:
            raise ChardevError(f"No TLS credentials with id '{opts['tls-creds']}'")

    def open(self, info: Callable[[str], None] | None = None) -> None:
        """Open the socket: listen (and, with ``wait``, accept the first client), or connect.

        :param info: where QEMU's "waiting for connection" notice goes.
        :raise ChardevError: QEMU's text for the failure.
        """
        if self.backend != "socket":
            return
        opts = self.opts
        if "fd" in opts:
            self._adopt_fd(int(opts["fd"]))
        elif "path" in opts:
            path = opts["path"]
            self._address = f"unix:{path}"
            if self.server:
                self.listener = _listen_unix(path)
                self._unix_path = path
            else:
                self.first = _connect(socket.AF_UNIX, path, path)
        elif "host" in opts:
            if self.server:
                self.listener = _listen_inet(opts["host"], opts["port"], opts.get("to"),
                                             _family(opts))
                host, port = self.listener.getsockname()[:2]
                self._address = f"tcp:{host}:{port}"
            else:
                self.first = _connect_inet(opts["host"], opts["port"], _family(opts))
                self._address = f"tcp:{opts['host']}:{opts['port']}"
        if self.listener is not None:
            self.listener.setblocking(False)
        if self.server and self.listener is not None and _on(opts, "wait", True):
            if info is not None:
                info(f"QEMU waiting for connection on: {self.filename()}")
            self.listener.setblocking(True)
            try:
                self.first, _ = self.listener.accept()
            finally:
                self.listener.setblocking(False)

    def _adopt_fd(self, fd: int) -> None:
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise OSError(errno.ENOTSOCK, "not a socket")
            sock = socket.socket(fileno=fd)
        except OSError:
            raise ChardevError(f"File descriptor '{fd}' is not a socket") from None
        if self.server:
            self.listener = sock
            name = sock.getsockname()
            if sock.family == socket.AF_UNIX:
                self._address = f"unix:{name}"
            else:
                self._address = f"tcp:{name[0]}:{name[1]}"
        else:
            self.first = sock

    def filename(self) -> str:
        """The ``filename`` of ``query-chardev`` / ``info chardev``."""
        if self.backend == "stdio":
            return "stdio"
        suffix = ",server=on" if self.server else ""
        address = self._address
        if not address:
            # Not open yet: the address as given (open() replaces it by the bound one).
            if "path" in self.opts:
                address = f"unix:{self.opts['path']}"
            elif "host" in self.opts:
                address = f"tcp:{self.opts['host']}:{self.opts.get('port', '')}"
        if self.peer is not None:
            return f"{address}{suffix}{self.peer}"
        return f"disconnected:{address}{suffix}"

    def connected(self, sock: socket.socket) -> None:
        """A client is being served on ``sock`` (for :meth:`filename`)."""
        peer = ""
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                host, port = sock.getpeername()[:2]
                peer = f" <-> {host}:{port}"
        self.peer = peer

    def disconnected(self) -> None:
        self.peer = None

    def close(self) -> None:
        """Stop listening; a unix socket file this chardev made is removed, as QEMU does."""
        for sock in (self.listener, self.first):
            if sock is not None:
                sock.close()
        self.listener = self.first = None
        if self._unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._unix_path)
            self._unix_path = None


def _family(opts: dict[str, str]) -> int:
    ipv4, ipv6 = _on(opts, "ipv4", False), _on(opts, "ipv6", False)
    if ipv4 and not ipv6:
        return socket.AF_INET
    if ipv6 and not ipv4:
        return socket.AF_INET6
    return socket.AF_UNSPEC


def _resolve(host: str, port: str, family: int, passive: bool) -> list[tuple[int, object]]:
    try:
        infos = socket.getaddrinfo(host or None, port or "0", family, socket.SOCK_STREAM, 0,
                                   socket.AI_PASSIVE if passive else 0)
    except (socket.gaierror, UnicodeError) as exc:
        text = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise ChardevError(f"address resolution failed for {host}:{port}: {text}") from None
    return [(info[0], info[4]) for info in infos]


def _listen_inet(host: str, port: str, to: str | None, family: int) -> socket.socket:
    infos = _resolve(host, port, family, passive=True)
    first = int(port) if port.isdigit() else None
    last_error: OSError | None = None
    for af, address in infos:
        assert isinstance(address, tuple)
        ports = [address[1]]
        if first is not None and to is not None and int(to) > first:
            ports = list(range(address[1], address[1] + int(to) - first + 1))
        for number in ports:
            sock = socket.socket(af, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if af == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address[0], number, *address[2:]))
                # QEMU's monitor chardevs listen with a backlog of one.
                sock.listen(1)
                return sock
            except OSError as exc:
                sock.close()
                last_error = exc
                if exc.errno != errno.EADDRINUSE:
                    raise ChardevError(f"Failed to bind socket: {_strerror(exc)}") from None
    reason = _strerror(last_error) if last_error is not None else "Address already in use"
    raise ChardevError(f"Failed to find an available port: {reason}")


def _listen_unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)
        sock.bind(path)
        sock.listen(1)
    except OSError as exc:
        sock.close()
        raise ChardevError(f"Failed to bind socket to {path}: {_strerror(exc)}") from None
    return sock


def _connect(family: int, address: object, shown: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.connect(address)  # type: ignore[arg-type]
    except OSError as exc:
        sock.close()
        raise ChardevError(f"Failed to connect to '{shown}': {_strerror(exc)}") from None
    return sock


def _connect_inet(host: str, port: str, family: int) -> socket.socket:
    last: ChardevError | None = None
    for af, address in _resolve(host, port, family, passive=False):
        try:
            return _connect(af, address, f"{host}:{port}")
        except ChardevError as exc:
            last = exc
    assert last is not None
    raise last


def parse_chardev(text: str, warnings: list[str] | None = None) -> Chardev:
    """``-chardev`` / ``--chardev``: QemuOpts with the backend as the implied first word.

    :raise ChardevError: syntax, missing id, unknown backend, the socket backend's checks.
    """
    opts = qemu_opts(text, "backend", warnings)
    _check_types(opts)
    ident = opts.pop("id", None)
    if ident is None:
        raise ChardevError("chardev: no id specified")
    backend = opts.pop("backend", "")
    if backend not in _BACKENDS:
        raise ChardevError(f"'{backend}' is not a valid char driver name" if backend
                           else 'chardev: "" missing backend')
    chardev = Chardev(ident, backend, opts)
    chardev.check()
    return chardev


def parse_legacy(text: str, label: str) -> Chardev:
    """The ``-qmp``/``-monitor`` spelling (QEMU's ``qemu_chr_parse_compat``).

    :raise ChardevError: with QEMU's second line ``parse error: TEXT`` where QEMU prints one.
    """
    def parse_error(*first: str) -> ChardevError:
        return ChardevError(*first, f"parse error: {text}")

    if text == "stdio":
        return Chardev(label, "stdio")
    kind, colon, rest = text.partition(":")
    if not colon or kind not in ("tcp", "unix"):
        if kind in ("tcp", "unix"):
            raise parse_error()
        raise parse_error(f"'{text}' is not a valid char driver")
    address, _, options = rest.partition(",")
    opts: dict[str, str] = {}
    if kind == "tcp":
        host, colon, port = address.rpartition(":")
        if not colon:
            raise parse_error()
        opts = {"host": host, "port": port}
    else:
        opts = {"path": address}
    try:
        # The legacy parser takes short-form booleans silently.
        extra = qemu_opts(options, None) if options else {}
        _check_types(extra)
    except ChardevError as exc:
        raise parse_error(*exc.messages) from None
    opts.update(extra)
    chardev = Chardev(label, "socket", opts)
    chardev.check()
    return chardev


class ChardevRegistry:
    """The chardevs of one process, in creation order (QEMU lists them in hash order)."""

    def __init__(self) -> None:
        self._devices: dict[str, Chardev] = {}

    def __iter__(self) -> Iterator[Chardev]:
        return iter(self._devices.values())

    def __contains__(self, label: object) -> bool:
        return label in self._devices

    def get(self, label: str) -> Chardev | None:
        return self._devices.get(label)

    def add(self, chardev: Chardev) -> None:
        self._devices[chardev.label] = chardev

    def query(self) -> list[dict[str, object]]:
        """``query-chardev``."""
        return [{"label": c.label, "filename": c.filename(), "frontend-open": c.in_use}
                for c in self]

    def info(self) -> str:
        """HMP ``info chardev``."""
        return "".join(f"{c.label}: filename={c.filename()}\n" for c in self)

    def close(self) -> None:
        for chardev in self:
            chardev.close()
