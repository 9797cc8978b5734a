"""The NBD client protocol, sans I/O: bytes in, events out, bytes out.

Rules of this module:

* Everything that changes the connection's state lives here. The phase moves only through
  :data:`TRANSITIONS`; the caller owns the socket and feeds :meth:`ClientConnection.receive_data`
  (``b""`` is EOF), takes events from :meth:`ClientConnection.next_event` and writes what
  :meth:`ClientConnection.data_to_send` returns.
* The handshake is fixed newstyle only, one option at a time. With ``tls``, ``NBD_OPT_STARTTLS``
  comes first: once the server accepts it, :class:`StartTLS` asks the caller to run the TLS
  handshake on its socket and to call :meth:`ClientConnection.tls_established`, after which the
  bytes fed and taken are the decrypted stream. Then ``NBD_OPT_STRUCTURED_REPLY``, then
  ``NBD_OPT_SET_META_CONTEXT`` for the wanted contexts (only with structured replies), then
  ``NBD_OPT_GO`` asking for ``NBD_INFO_BLOCK_SIZE`` (``NBD_OPT_EXPORT_NAME`` if the server does not
  know ``GO``). It ends in :class:`HandshakeDone` or :class:`ConnectionFailed`.
* In transmission, :meth:`ClientConnection.send_request` queues a request and returns its cookie;
  replies come out as chunk events (:class:`ReadData`, :class:`ReadHole`, :class:`Extents`) and
  exactly one :class:`RequestDone` per cookie, in whatever order the server answers.
* Traffic that breaks the protocol ends the connection with :class:`ConnectionFailed`; nothing
  raises out of ``next_event`` for bad peer input.
"""

from __future__ import annotations

import enum
import errno as _errno
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from blockgraph.drivers.nbd import wire as W

OLDSTYLE_MAGIC = 0x0000420281861253

_GREETING = struct.Struct(">QQH")
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_U32 = struct.Struct(">I")

# NBD error numbers as POSIX errnos (anything else reads as EINVAL, as the spec advises).
_NBD_TO_ERRNO: dict[int, int] = {
    W.EPERM: _errno.EPERM,
    W.EIO: _errno.EIO,
    W.ENOMEM: _errno.ENOMEM,
    W.EINVAL: _errno.EINVAL,
    W.ENOSPC: _errno.ENOSPC,
    W.EOVERFLOW: _errno.EOVERFLOW,
    W.ENOTSUP: _errno.ENOTSUP,
    W.ESHUTDOWN: _errno.ESHUTDOWN,
}


def nbd_to_errno(error: int) -> int:
    return _NBD_TO_ERRNO.get(error, _errno.EINVAL)


def reply_error_text(option: int, reply: int, message: str = "") -> str:
    """QEMU's text for an error reply to ``option``, with its hints on further lines."""
    which = f"option {option} ({W.option_name(option)})"
    texts = {
        W.REP_ERR_UNSUP: f"Unsupported {which}",
        W.REP_ERR_POLICY: f"Denied by server for {which}",
        W.REP_ERR_INVALID: f"Invalid parameters for {which}",
        W.REP_ERR_PLATFORM: f"Server lacks support for {which}",
        W.REP_ERR_TLS_REQD: f"TLS negotiation required before {which}\n"
                            "Did you forget a valid tls-creds?",
        W.REP_ERR_UNKNOWN: "Requested export not available",
        W.REP_ERR_SHUTDOWN: f"Server shutting down before {which}",
        W.REP_ERR_BLOCK_SIZE_REQD: f"Server requires INFO_BLOCK_SIZE for {which}",
        W.REP_ERR_TOO_BIG: f"{which} payload is too long",
    }
    text = texts.get(reply, f"Unknown error code when asking for {which}")
    if message:
        text += f"\nserver reported: {message}"
    return text


class Phase(enum.Enum):
    GREETING = "greeting"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.GREETING: frozenset({Phase.OPTIONS, Phase.CLOSED}),
    Phase.OPTIONS: frozenset({Phase.TRANSMISSION, Phase.CLOSED}),
    Phase.TRANSMISSION: frozenset({Phase.CLOSED}),
    Phase.CLOSED: frozenset(),
}


class LocalProtocolError(Exception):
    """The caller used the connection in a way its phase does not allow."""


# -- events ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportInfo:
    """What the handshake learnt about the export."""

    size: int
    flags: int
    structured: bool
    contexts: dict[str, int] = field(default_factory=dict)  # context name -> server's id
    min_block: int = 0  # 0: not advertised
    preferred_block: int = 0
    max_block: int = 0


@dataclass(frozen=True)
class HandshakeDone:
    info: ExportInfo


@dataclass(frozen=True)
class StartTLS:
    """The server accepted STARTTLS: hand the socket to TLS, then call ``tls_established``."""


@dataclass(frozen=True)
class ConnectionFailed:
    """The connection is unusable; ``message`` is QEMU's text for why."""

    message: str


@dataclass(frozen=True)
class ReadData:
    cookie: int
    offset: int  # absolute offset in the export
    data: bytes


@dataclass(frozen=True)
class ReadHole:
    cookie: int
    offset: int
    length: int


@dataclass(frozen=True)
class Extents:
    cookie: int
    context_id: int
    extents: tuple[tuple[int, int], ...]  # (length, flags)


@dataclass(frozen=True)
class RequestDone:
    """The final reply of a request; ``error`` is a POSIX errno, 0 on success."""

    cookie: int
    error: int
    message: str = ""


Event = HandshakeDone | StartTLS | ConnectionFailed | ReadData | ReadHole | Extents | RequestDone


@dataclass
class _InFlight:
    command: int
    offset: int
    length: int
    error: int = 0
    message: str = ""


class _Step(enum.Enum):
    STARTTLS = "starttls"
    TLS_HANDSHAKE = "tls-handshake"  # the caller's turn: no bytes are parsed
    STRUCTURED = "structured"
    META = "meta"
    GO = "go"
    EXPORT_NAME = "export-name"


class ClientConnection:
    """One client connection to an NBD server.

    :param export: the export name to ask for.
    :param contexts: meta contexts to negotiate (``base:allocation``, a dirty bitmap).
    :param tls: start TLS before any other option.
    """

    def __init__(self, export: str = "", contexts: Sequence[str] = (), tls: bool = False) -> None:
        self.export = export
        self.wanted_contexts = tuple(contexts)
        self.tls = tls
        self.phase = Phase.GREETING
        self._in = bytearray()
        self._out: list[bytes] = []
        self._eof = False
        self._step = _Step.STRUCTURED
        self._no_zeroes = False
        self._structured = False
        self._contexts: dict[str, int] = {}
        self._size = -1
        self._flags = 0
        self._blocks = (0, 0, 0)
        self._next_cookie = 1
        self._inflight: dict[int, _InFlight] = {}
        self._events: list[Event] = []

    # -- plumbing ------------------------------------------------------------------------------

    def _move(self, phase: Phase) -> None:
        if phase not in TRANSITIONS[self.phase]:
            raise LocalProtocolError(f"cannot move from {self.phase.value} to {phase.value}")
        self.phase = phase

    def receive_data(self, data: bytes) -> None:
        if data:
            self._in += data
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def info(self) -> ExportInfo:
        return ExportInfo(self._size, self._flags, self._structured, dict(self._contexts),
                          *self._blocks)

    def _fail(self, message: str) -> ConnectionFailed:
        if self.phase is not Phase.CLOSED:
            self._move(Phase.CLOSED)
        self._inflight.clear()
        return ConnectionFailed(message)

    def _take(self, n: int) -> bytes | None:
        if len(self._in) < n:
            return None
        data = bytes(self._in[:n])
        del self._in[:n]
        return data

    def next_event(self) -> Event | None:
        """The next event, or ``None`` when more bytes are needed."""
        while True:
            if self._events:
                return self._events.pop(0)
            if self.phase is Phase.CLOSED or self._step is _Step.TLS_HANDSHAKE:
                return None
            before = len(self._in)
            if self.phase is Phase.GREETING:
                event = self._parse_greeting()
            elif self.phase is Phase.OPTIONS:
                event = self._parse_option_reply()
            else:
                event = self._parse_reply()
            if event is not None:
                return event
            if len(self._in) == before and not self._events:
                if self._eof:
                    return self._fail("Connection closed by the server" if self.phase is
                                      Phase.TRANSMISSION else "Failed to read initial magic: "
                                      "Unexpected end-of-file before all data were read")
                return None

    # -- handshake -----------------------------------------------------------------------------

    def _parse_greeting(self) -> Event | None:
        if len(self._in) < 16:
            return None
        magic, second = struct.unpack(">QQ", self._in[:16])
        if magic != W.NBDMAGIC:
            return self._fail("Bad initial magic received")
        if second == OLDSTYLE_MAGIC:
            return self._fail("Server does not support the fixed newstyle handshake")
        if second != W.IHAVEOPT:
            return self._fail("Bad server magic received")
        if len(self._in) < _GREETING.size:
            return None
        _, _, flags = _GREETING.unpack(self._take(_GREETING.size) or b"")
        if not flags & W.FLAG_FIXED_NEWSTYLE:
            return self._fail("Server does not support the fixed newstyle handshake")
        self._no_zeroes = bool(flags & W.FLAG_NO_ZEROES)
        client_flags = W.FLAG_C_FIXED_NEWSTYLE | (W.FLAG_C_NO_ZEROES if self._no_zeroes else 0)
        self._out.append(_U32.pack(client_flags))
        self._move(Phase.OPTIONS)
        if self.tls:
            self._step = _Step.STARTTLS
            self._send_option(W.OPT_STARTTLS)
        else:
            self._send_option(W.OPT_STRUCTURED_REPLY)
        return None

    def tls_established(self) -> None:
        """The TLS handshake succeeded: negotiation goes on, inside TLS.

        :raise LocalProtocolError: when no TLS handshake was due.
        """
        if self._step is not _Step.TLS_HANDSHAKE or self.phase is not Phase.OPTIONS:
            raise LocalProtocolError("no TLS handshake is pending")
        self._step = _Step.STRUCTURED
        self._send_option(W.OPT_STRUCTURED_REPLY)

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self._out.append(struct.pack(">QII", W.IHAVEOPT, option, len(data)) + data)

    def _name(self) -> bytes:
        name = self.export.encode()
        return _U32.pack(len(name)) + name

    def _send_meta_or_go(self) -> None:
        if self._structured and self.wanted_contexts:
            self._step = _Step.META
            body = self._name() + _U32.pack(len(self.wanted_contexts))
            for context in self.wanted_contexts:
                raw = context.encode()
                body += _U32.pack(len(raw)) + raw
            self._send_option(W.OPT_SET_META_CONTEXT, body)
        else:
            self._send_go()

    def _send_go(self) -> None:
        self._step = _Step.GO
        self._send_option(W.OPT_GO, self._name() + struct.pack(">HH", 1, W.INFO_BLOCK_SIZE))

    def _parse_option_reply(self) -> Event | None:
        if self._step is _Step.EXPORT_NAME:
            need = 10 if self._no_zeroes else 134
            data = self._take(need)
            if data is None:
                return None
            self._size, self._flags = struct.unpack(">QH", data[:10])
            return self._finish_handshake()
        if len(self._in) < _OPTION_REPLY.size:
            return None
        magic, option, reply, length = _OPTION_REPLY.unpack(self._in[: _OPTION_REPLY.size])
        if magic != W.OPTION_REPLY_MAGIC:
            return self._fail("Unexpected option reply magic")
        if length > W.MAX_BUFFER_SIZE:
            return self._fail("server's option reply is too long")
        if len(self._in) < _OPTION_REPLY.size + length:
            return None
        del self._in[: _OPTION_REPLY.size]
        data = self._take(length) or b""
        expected = {_Step.STARTTLS: W.OPT_STARTTLS, _Step.STRUCTURED: W.OPT_STRUCTURED_REPLY,
                    _Step.META: W.OPT_SET_META_CONTEXT, _Step.GO: W.OPT_GO}[self._step]
        if option != expected:
            return self._fail(f"Unexpected option type {option}, expected {expected}")
        if reply & (1 << 31):
            return self._option_error(option, reply, data)
        if self._step is _Step.STARTTLS:
            if reply != W.REP_ACK:
                return self._fail(f"Server rejected request to start TLS {reply:x}")
            if self._in:
                # Whatever follows the ACK must be the server's TLS handshake, which cannot
                # start before the client's.
                return self._fail("Unexpected data after the reply to starttls")
            self._step = _Step.TLS_HANDSHAKE
            return StartTLS()
        if self._step is _Step.STRUCTURED:
            if reply != W.REP_ACK:
                return self._fail(f"Unexpected reply type {reply} to structured reply")
            self._structured = True
            self._send_meta_or_go()
        elif self._step is _Step.META:
            if reply == W.REP_META_CONTEXT:
                if length < 4:
                    return self._fail("Bad meta context reply")
                (context_id,) = _U32.unpack(data[:4])
                name = data[4:].decode(errors="replace")
                if name not in self.wanted_contexts:
                    return self._fail(f"Unexpected context name {name}")
                self._contexts[name] = context_id
            elif reply == W.REP_ACK:
                self._send_go()
            else:
                return self._fail(f"Unexpected reply type {reply} to set meta context")
        else:
            if reply == W.REP_INFO:
                return self._parse_info(data)
            if reply == W.REP_ACK:
                if self._size < 0:
                    return self._fail("broken server omitted NBD_INFO_EXPORT")
                return self._finish_handshake()
            return self._fail(f"Unexpected reply type {reply} to go")
        return None

    def _parse_info(self, data: bytes) -> Event | None:
        if len(data) < 2:
            return self._fail("Bad info reply")
        (info_type,) = struct.unpack(">H", data[:2])
        if info_type == W.INFO_EXPORT:
            if len(data) != 12:
                return self._fail("Bad info export length")
            self._size, self._flags = struct.unpack(">QH", data[2:])
        elif info_type == W.INFO_BLOCK_SIZE:
            if len(data) != 14:
                return self._fail("Bad info block size length")
            minimum, preferred, maximum = struct.unpack(">III", data[2:])
            if minimum & (minimum - 1) or minimum > 64 * 1024:
                return self._fail(f"server minimum block size {minimum} is not a power of two")
            if preferred < minimum or preferred & (preferred - 1):
                return self._fail(f"server preferred block size {preferred} is not valid")
            if maximum < minimum or (minimum and maximum % minimum):
                return self._fail(f"server maximum block size {maximum} is not valid")
            self._blocks = (minimum, preferred, maximum)
        return None

    def _option_error(self, option: int, reply: int, data: bytes) -> Event | None:
        message = data.decode(errors="replace")
        if self._step is _Step.STRUCTURED:
            self._send_meta_or_go()  # unstructured replies, and no meta contexts
            return None
        if self._step is _Step.META:
            self._send_go()
            return None
        if reply == W.REP_ERR_UNSUP and self._step is _Step.GO:
            # An old server: the export name option still works, without block sizes.
            self._step = _Step.EXPORT_NAME
            self._out.append(struct.pack(">QII", W.IHAVEOPT, W.OPT_EXPORT_NAME,
                                         len(self.export.encode())) + self.export.encode())
            return None
        return self._fail(reply_error_text(option, reply, message))

    def _finish_handshake(self) -> Event:
        minimum = self._blocks[0]
        if minimum and self._size % minimum:
            self._size -= self._size % minimum  # a partial last block cannot be addressed
        self._move(Phase.TRANSMISSION)
        return HandshakeDone(self.info)

    # -- transmission --------------------------------------------------------------------------

    def send_request(self, command: int, offset: int, length: int, flags: int = 0,
                     data: bytes | memoryview | None = None) -> int:
        """Queue one request; returns its cookie.

        :raise LocalProtocolError: outside transmission, or a bad payload for the command.
        """
        if self.phase is not Phase.TRANSMISSION:
            raise LocalProtocolError(f"cannot send a request in phase {self.phase.value}")
        if (command == W.CMD_WRITE) != (data is not None) or (data is not None and len(data) != length):
            raise LocalProtocolError("only a write carries a payload, of the request's length")
        cookie = self._next_cookie
        self._next_cookie += 1
        self._out.append(_REQUEST.pack(W.REQUEST_MAGIC, flags, command, cookie, offset, length))
        if data is not None:
            self._out.append(bytes(data))
        if command != W.CMD_DISC:
            self._inflight[cookie] = _InFlight(command, offset, length)
        return cookie

    def send_disconnect(self) -> None:
        if self.phase is Phase.TRANSMISSION:
            self.send_request(W.CMD_DISC, 0, 0)
            self._move(Phase.CLOSED)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def _parse_reply(self) -> Event | None:
        if len(self._in) < 4:
            return None
        (magic,) = _U32.unpack(self._in[:4])
        if magic == W.SIMPLE_REPLY_MAGIC:
            return self._parse_simple()
        if magic == W.STRUCTURED_REPLY_MAGIC:
            return self._parse_chunk()
        return self._fail(f"invalid magic (got 0x{magic:x})")

    def _parse_simple(self) -> Event | None:
        if len(self._in) < _SIMPLE_REPLY.size:
            return None
        _, error, cookie = _SIMPLE_REPLY.unpack(self._in[: _SIMPLE_REPLY.size])
        request = self._inflight.get(cookie)
        if request is None:
            return self._fail(f"Unexpected cookie 0x{cookie:x}")
        if self._structured and request.command == W.CMD_READ and not error:
            return self._fail("Unexpected simple reply to a read with structured replies")
        payload = request.length if request.command == W.CMD_READ and not error else 0
        if len(self._in) < _SIMPLE_REPLY.size + payload:
            return None
        del self._in[: _SIMPLE_REPLY.size]
        del self._inflight[cookie]
        if payload:
            self._events.append(ReadData(cookie, request.offset, self._take(payload) or b""))
        self._events.append(RequestDone(cookie, nbd_to_errno(error) if error else 0))
        return None

    def _parse_chunk(self) -> Event | None:
        if len(self._in) < _CHUNK.size:
            return None
        _, flags, reply_type, cookie, length = _CHUNK.unpack(self._in[: _CHUNK.size])
        if not self._structured:
            return self._fail("Unexpected structured reply")
        request = self._inflight.get(cookie)
        if request is None:
            return self._fail(f"Unexpected cookie 0x{cookie:x}")
        if length > W.MAX_BUFFER_SIZE + 8:
            return self._fail("Structured reply chunk is too long")
        if len(self._in) < _CHUNK.size + length:
            return None
        del self._in[: _CHUNK.size]
        payload = self._take(length) or b""
        event = self._chunk_event(request, cookie, reply_type, payload)
        if isinstance(event, ConnectionFailed):
            return event
        if flags & W.REPLY_FLAG_DONE:
            del self._inflight[cookie]
            if event is not None:
                self._events.append(event)
            self._events.append(RequestDone(cookie, request.error, request.message))
            return None
        return event

    def _chunk_event(self, request: _InFlight, cookie: int, reply_type: int,
                     payload: bytes) -> Event | None:
        end = request.offset + request.length
        if reply_type == W.REPLY_TYPE_NONE:
            if payload:
                return self._fail("Unexpected payload in NBD_REPLY_TYPE_NONE")
            return None
        if reply_type & (1 << 15):  # an error chunk
            if len(payload) < 6:
                return self._fail("Protocol error: invalid payload for NBD_REPLY_TYPE_ERROR")
            error, msg_len = struct.unpack(">IH", payload[:6])
            if not error or 6 + msg_len > len(payload):
                return self._fail("Protocol error: invalid error chunk")
            if not request.error:
                request.error = nbd_to_errno(error)
                request.message = payload[6 : 6 + msg_len].decode(errors="replace")
            return None
        if reply_type == W.REPLY_TYPE_OFFSET_DATA and request.command == W.CMD_READ:
            if len(payload) < 9:
                return self._fail("Protocol error: invalid payload for NBD_REPLY_TYPE_OFFSET_DATA")
            (offset,) = struct.unpack(">Q", payload[:8])
            if offset < request.offset or offset + len(payload) - 8 > end:
                return self._fail("Protocol error: server sent chunk exceeding requested region")
            return ReadData(cookie, offset, payload[8:])
        if reply_type == W.REPLY_TYPE_OFFSET_HOLE and request.command == W.CMD_READ:
            if len(payload) != 12:
                return self._fail("Protocol error: invalid payload for NBD_REPLY_TYPE_OFFSET_HOLE")
            offset, hole = struct.unpack(">QI", payload)
            if not hole or offset < request.offset or offset + hole > end:
                return self._fail("Protocol error: server sent chunk exceeding requested region")
            return ReadHole(cookie, offset, hole)
        if reply_type == W.REPLY_TYPE_BLOCK_STATUS and request.command == W.CMD_BLOCK_STATUS:
            if len(payload) < 12 or (len(payload) - 4) % 8:
                return self._fail("Protocol error: invalid payload for NBD_REPLY_TYPE_BLOCK_STATUS")
            (context_id,) = _U32.unpack(payload[:4])
            extents = tuple(struct.iter_unpack(">II", payload[4:]))
            return Extents(cookie, context_id, extents)
        return self._fail(f"Unexpected reply type {reply_type} for command {request.command}")
