"""The NBD server protocol, sans I/O: bytes in, events out, bytes out (h11 style).

Rules of this module:

* Everything that changes the connection's state lives here: the phase (:class:`Phase`) moves
  only through :data:`TRANSITIONS`, a table; what the parser waits for next is
  :class:`Expect`, whose fixed sizes are in :data:`EXPECT_SIZE`.
* No I/O: :meth:`ServerConnection.receive_data` buffers bytes (``b""`` is EOF),
  :meth:`ServerConnection.next_event` parses at most one event, :meth:`ServerConnection.data_to_send`
  hands out the bytes to write. The caller owns sockets, tasks and the block layer.
* The handshake is answered here entirely, from the :class:`ExportInfo` catalogue the caller
  gives: option haggling produces no events, only replies, until transmission begins
  (:class:`TransmissionStarted`) or the connection ends (:class:`ConnectionClosed`).
* In transmission, requests that fail validation (length, bounds, flags, read-only, meta context)
  are answered here with QEMU 7.2's errors and never reach the caller; valid ones come out as
  :class:`Request` events, and the caller answers each cookie once through the ``reply_*``
  methods, in any order.
* TLS (``tls=True``: the server has credentials) is required before anything else, as qemu-nbd
  does: other options get ``REP_ERR_TLS_REQD`` (``EXPORT_NAME``, which cannot carry an error,
  and a client without fixed newstyle are dropped; ``ABORT`` is refused and then ends the
  connection). ``STARTTLS`` is acknowledged and yields :class:`StartTLS`: the caller runs the
  handshake on its socket and calls :meth:`ServerConnection.tls_established`; until then no
  byte is parsed, and from then on the bytes fed and taken are the decrypted stream.
* Traffic that breaks the protocol ends the connection: a :class:`ConnectionClosed` event
  carrying QEMU's message, after any reply QEMU gives in that case. Nothing raises out of
  ``next_event`` for bad peer input; :class:`LocalProtocolError` is for a caller's misuse.

Constants keep the spec's names without the ``NBD_`` prefix (``OPT_GO``, ``REP_ERR_UNSUP``,
``CMD_FLAG_FUA``); all numbers on the wire are big-endian.
"""

# ruff: noqa: F405
from __future__ import annotations

import enum
import errno as _errno
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from blockgraph.drivers.base import FileRange

# The spec constants live in a lower layer, for the client driver; re-exported from here.
from blockgraph.drivers.nbd.wire import *  # noqa: F403

# What the protocol hands its caller to write: bytes, or the file range of a read's data,
# which this sans-IO core only passes on (the caller sends it).
Outgoing = bytes | bytearray | memoryview | FileRange

# qemu:dirty-bitmap:NAME (exported bitmap i has context id 2 + i, as in QEMU 7.2).
STATE_DIRTY = 1 << 0
META_ID_DIRTY_BITMAP = 2
CONTEXT_DIRTY_BITMAP = "qemu:dirty-bitmap:"

# QEMU's nbd_cmd_lookup names, used in its error texts (option names live in wire).
COMMAND_NAMES: dict[int, str] = {
    CMD_READ: "read",
    CMD_WRITE: "write",
    CMD_DISC: "disconnect",
    CMD_FLUSH: "flush",
    CMD_TRIM: "trim",
    CMD_CACHE: "cache",
    CMD_WRITE_ZEROES: "write zeroes",
    CMD_BLOCK_STATUS: "block status",
}


def command_name(command: int) -> str:
    return COMMAND_NAMES.get(command, "<unknown>")


_ERRNO_TO_NBD: dict[int, int] = {
    _errno.EPERM: EPERM,
    _errno.EROFS: EPERM,
    _errno.EIO: EIO,
    _errno.ENOMEM: ENOMEM,
    _errno.EDQUOT: ENOSPC,
    _errno.EFBIG: ENOSPC,
    _errno.ENOSPC: ENOSPC,
    _errno.EOVERFLOW: EOVERFLOW,
    _errno.ENOTSUP: ENOTSUP,
    _errno.EOPNOTSUPP: ENOTSUP,
    _errno.ESHUTDOWN: ESHUTDOWN,
}


def errno_to_nbd(err: int) -> int:
    """A POSIX errno as the NBD error QEMU sends for it (anything unknown is EINVAL)."""
    return _ERRNO_TO_NBD.get(err, EINVAL)


# -- wire layouts (golden-tested) --------------------------------------------------------------

_GREETING = struct.Struct(">QQH")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_EXTENT = struct.Struct(">II")
_REQUEST_SIZE = _REQUEST.size


def greeting(handshake_flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> bytes:
    """The server's first 18 bytes::

        S: 64  NBDMAGIC
        S: 64  IHAVEOPT
        S: 16  handshake flags
    """
    return _GREETING.pack(NBDMAGIC, IHAVEOPT, handshake_flags)


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    """One option reply::

        S: 64  0x3e889045565a9
        S: 32  option being answered
        S: 32  reply type
        S: 32  length of data
        S: ... data
    """
    return _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def simple_reply(error: int, cookie: int) -> bytes:
    """A simple reply header (a successful READ's data follows it)::

        S: 32  0x67446698
        S: 32  error
        S: 64  cookie
    """
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(flags: int, reply_type: int, cookie: int, length: int) -> bytes:
    """A structured reply chunk header (the payload follows)::

        S: 32  0x668e33ef
        S: 16  flags (REPLY_FLAG_DONE)
        S: 16  type
        S: 64  cookie
        S: 32  payload length
    """
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, reply_type, cookie, length)


def error_chunk(cookie: int, error: int, message: bytes, flags: int = REPLY_FLAG_DONE) -> bytes:
    """``REPLY_TYPE_ERROR``: 32-bit error, 16-bit message length, message."""
    payload = struct.pack(">IH", error, len(message)) + message
    return chunk_header(flags, REPLY_TYPE_ERROR, cookie, len(payload)) + payload


def hole_chunk(cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    """``REPLY_TYPE_OFFSET_HOLE``: 64-bit offset, 32-bit hole size."""
    return chunk_header(flags, REPLY_TYPE_OFFSET_HOLE, cookie, 12) + struct.pack(">QI", offset, length)


def request_header(cookie: int, command: int, offset: int, length: int, flags: int = 0) -> bytes:
    """A client request (used by tests and tools)::

        C: 32  0x25609513
        C: 16  command flags
        C: 16  type
        C: 64  cookie
        C: 64  offset
        C: 32  length
    """
    return _REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)


# -- what the caller tells us about its exports ---------------------------------------------


@dataclass(frozen=True)
class ExportInfo:
    """What the handshake needs to know about one export.

    :param name: the export name ("" is the default export).
    :param size: bytes, already rounded down to 512 as QEMU does.
    :param multi_conn: advertise ``FLAG_CAN_MULTI_CONN`` (QEMU: max connections != 1).
    """

    name: str
    size: int
    read_only: bool = False
    multi_conn: bool = False
    description: str = ""
    allocation_depth: bool = False
    bitmaps: tuple[str, ...] = ()
    min_block: int = 1
    preferred_block: int = PREFERRED_BLOCK_SIZE
    max_block: int = MAX_BUFFER_SIZE

    @property
    def flags(self) -> int:
        """QEMU 7.2's transmission flags, without ``SEND_DF`` (that one depends on the client)."""
        flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE
        if self.multi_conn:
            flags |= FLAG_CAN_MULTI_CONN
        if self.read_only:
            flags |= FLAG_READ_ONLY
        else:
            flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO
        return flags

    def contexts(self) -> list[tuple[int, str]]:
        """The meta contexts this export offers, with QEMU's fixed ids, in QEMU's order."""
        out = [(META_ID_BASE_ALLOCATION, CONTEXT_BASE_ALLOCATION)]
        if self.allocation_depth:
            out.append((META_ID_ALLOCATION_DEPTH, CONTEXT_ALLOCATION_DEPTH))
        out += [(META_ID_DIRTY_BITMAP + i, CONTEXT_DIRTY_BITMAP + name) for i, name in enumerate(self.bitmaps)]
        return out


# -- events ----------------------------------------------------------------------------------


class NeedData:
    """Sentinel: no complete event in the buffer yet (``NEED_DATA``)."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


@dataclass(frozen=True)
class TransmissionStarted:
    """Option haggling ended with GO or EXPORT_NAME: requests for ``export`` follow."""

    export: ExportInfo
    structured: bool
    contexts: tuple[tuple[int, str], ...]


@dataclass(slots=True)
class Request:
    """One valid transmission request; answer it once with a ``reply_*`` method.

    ``data`` is the payload of a WRITE (None for other commands).
    """

    cookie: int
    command: int
    flags: int
    offset: int
    length: int
    data: bytearray | None = None


@dataclass(frozen=True)
class StartTLS:
    """The client asked for TLS and the ACK is queued: send it, then run the server handshake."""


@dataclass(frozen=True)
class ConnectionClosed:
    """The connection is over; send what is pending, then close.

    :param reason: QEMU's message for a protocol violation, None for an orderly end
        (client EOF between messages, ABORT, DISC).
    """

    reason: str | None = None


Event = TransmissionStarted | Request | StartTLS | ConnectionClosed


class LocalProtocolError(Exception):
    """The caller used the connection wrongly (replied twice, replied in the wrong phase)."""


# -- states and transitions -------------------------------------------------------------------


class Phase(enum.Enum):
    HANDSHAKE = "handshake"  # greeting sent, waiting for the client flags
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class Expect(enum.Enum):
    """What the parser waits for next."""

    CLIENT_FLAGS = "client-flags"
    OPTION_HEADER = "option-header"
    OPTION_DATA = "option-data"
    REQUEST_HEADER = "request-header"
    WRITE_PAYLOAD = "write-payload"
    TLS_HANDSHAKE = "tls-handshake"  # the caller's turn: nothing is parsed
    NOTHING = "nothing"


EXPECT_SIZE: dict[Expect, int] = {
    Expect.CLIENT_FLAGS: 4,
    Expect.OPTION_HEADER: _OPTION_HEADER.size,
    Expect.REQUEST_HEADER: _REQUEST.size,
}

TRANSITIONS: dict[tuple[Phase, str], Phase] = {
    (Phase.HANDSHAKE, "client-flags"): Phase.OPTIONS,
    (Phase.OPTIONS, "go"): Phase.TRANSMISSION,
    (Phase.OPTIONS, "export-name"): Phase.TRANSMISSION,
    (Phase.OPTIONS, "abort"): Phase.CLOSED,
    (Phase.TRANSMISSION, "disc"): Phase.CLOSED,
    **{(phase, "violation"): Phase.CLOSED for phase in Phase},
    **{(phase, "eof"): Phase.CLOSED for phase in Phase},
}

# Flags each command accepts beyond FUA (QEMU's valid_flags); DF needs structured replies.
COMMAND_EXTRA_FLAGS: dict[int, int] = {
    CMD_READ: CMD_FLAG_DF,
    CMD_WRITE_ZEROES: CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_REQ_ONE,
}
# The flags each command accepts (QEMU's valid_flags), with and without structured replies;
# commands missing here accept FUA only.
_VALID_FLAGS_STRUCTURED: dict[int, int] = {
    command: CMD_FLAG_FUA | COMMAND_EXTRA_FLAGS.get(command, 0) for command in COMMAND_NAMES
}
_VALID_FLAGS: dict[int, int] = {
    command: valid & ~CMD_FLAG_DF if command == CMD_READ else valid
    for command, valid in _VALID_FLAGS_STRUCTURED.items()
}
# Commands that carry or return a buffer: their length is capped at MAX_BUFFER_SIZE.
BUFFERED_COMMANDS = frozenset({CMD_READ, CMD_WRITE, CMD_CACHE})
WRITING_COMMANDS = frozenset({CMD_WRITE, CMD_WRITE_ZEROES, CMD_TRIM})


class _OptionInvalid(Exception):
    """Ends handling of one option with REP_ERR_INVALID (non-fatal)."""


class _Violation(Exception):
    """Ends the connection."""


class _OptionReader:
    """A cursor over one option's data, failing as QEMU's nbd_opt_read does."""

    def __init__(self, option: int, data: bytes) -> None:
        self.option = option
        self.data = data
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def read(self, n: int, check_nul: bool = False) -> bytes:
        if n > self.remaining:
            raise _OptionInvalid(f"Inconsistent lengths in option {option_name(self.option)}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        if check_nul and b"\0" in out:
            raise _OptionInvalid(f"Unexpected embedded NUL in option {option_name(self.option)}")
        return out

    def u16(self) -> int:
        value: int = struct.unpack(">H", self.read(2))[0]
        return value

    def u32(self) -> int:
        value: int = struct.unpack(">I", self.read(4))[0]
        return value

    def skip(self, n: int) -> None:
        self.read(n)

    def name(self) -> bytes:
        length = self.u32()
        if length > MAX_STRING_SIZE:
            raise _OptionInvalid(f"Invalid name length: {length}")
        return self.read(length, check_nul=True)


def _sanitize(name: bytes) -> str:
    # QEMU's nbd_sanitize_name: long names are cut in error messages.
    text = name.decode("utf-8", "replace")
    return text if len(name) < 80 else name[:80].decode("utf-8", "replace") + "..."


@dataclass
class _MetaSelection:
    export: str | None = None
    contexts: tuple[tuple[int, str], ...] = ()


@dataclass
class ServerConnection:
    """One client connection's protocol state (server side).

    :param exports: the export catalogue by name; read when the client asks.
    :param lookup: optional callable used instead of ``exports`` (exports added later).
    :param tls: TLS is required before any option but ``STARTTLS``.
    :param payload_buffer: allocates the buffer a WRITE's payload is received into when it
        does not arrive with its header (``bytearray``, zeroed, by default); every byte of it
        is written before the request comes out.
    """

    exports: Mapping[str, ExportInfo] = field(default_factory=dict)
    lookup: Callable[[str], ExportInfo | None] | None = None
    listing: Callable[[], Iterable[ExportInfo]] | None = None
    tls: bool = False
    payload_buffer: Callable[[int], bytearray] = bytearray

    phase: Phase = Phase.HANDSHAKE
    expect: Expect = Expect.CLIENT_FLAGS
    fixed_newstyle: bool = False
    no_zeroes: bool = False
    structured: bool = False
    export: ExportInfo | None = None
    close_reason: str | None = None
    tls_active: bool = False

    def __post_init__(self) -> None:
        self._in = bytearray()
        self._out: list[Outgoing] = [greeting()]
        self._meta = _MetaSelection()
        self._contexts: tuple[tuple[int, str], ...] = ()
        self._option = 0
        self._option_length = 0
        self._pending: Request | None = None  # a WRITE waiting for its payload
        self._payload_error: tuple[str, int] | None = None
        self._filled = 0
        self._eof = False
        self._in_flight: dict[int, int] = {}  # cookie -> requests awaiting a reply
        self._closed_event_sent = False
        self._queued: Event | None = None  # completed by receive_data, handed out by next_event

    # -- public I/O surface ---------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes from the client; ``b""`` means the client closed its side."""
        if not data:
            self._eof = True
            return
        if self.phase is Phase.CLOSED:
            return
        if self.expect is Expect.WRITE_PAYLOAD and not self._in:
            # The payload is copied once, straight into the request's buffer.
            event = self._fill_payload(memoryview(data))
            if event is not None:
                self._queued = event
            return
        self._in += data

    def payload_target(self) -> memoryview | None:
        """Where the next bytes from the client go when the caller can receive them in place:
        the rest of the payload of the WRITE being received, when nothing is buffered ahead of
        it; None otherwise (then :meth:`receive_data` takes the bytes).

        Receiving into it and reporting the count with :meth:`payload_received` is the same
        as passing those bytes to :meth:`receive_data`, without copying them.
        """
        request = self._pending
        if request is None or self._in or self.expect is not Expect.WRITE_PAYLOAD:
            return None
        assert request.data is not None
        return memoryview(request.data)[self._filled :]

    def payload_received(self, n: int) -> None:
        """``n`` bytes were written at the start of the last :meth:`payload_target`."""
        request = self._pending
        assert request is not None and self.expect is Expect.WRITE_PAYLOAD and not self._in
        if not 0 < n <= request.length - self._filled:
            raise LocalProtocolError(f"{n} bytes do not fit the payload")
        self._filled += n
        if self._filled == request.length:
            event = self._payload_done()
            if event is not None:
                self._queued = event

    @property
    def payload_length(self) -> int:
        """The length of the WRITE whose payload is being received (0: none)."""
        request = self._pending
        return request.length if request is not None else 0

    @property
    def buffered(self) -> int:
        """Bytes received and not parsed yet."""
        return len(self._in)

    def data_to_send(self) -> list[Outgoing]:
        """The buffers (and file ranges of read replies) to write, in order; the list is
        handed over (and cleared here)."""
        out, self._out = self._out, []
        return out

    @property
    def contexts(self) -> tuple[tuple[int, str], ...]:
        """The meta contexts selected for this connection's export, as (id, name)."""
        return self._contexts

    def next_event(self) -> Event | NeedData:
        """Parse the buffered bytes up to the next event."""
        if self._queued is not None:
            queued: Event = self._queued
            self._queued = None
            return queued
        if self.expect is Expect.REQUEST_HEADER:
            request = self._next_request()
            if request is not None:
                return request
            if not self._in and not self._eof and self.phase is not Phase.CLOSED:
                # All parsed (after every request of a client at queue depth 1): the general
                # parser's answer below, without its steps.
                return NEED_DATA
        while True:
            if self.phase is Phase.CLOSED:
                if self._closed_event_sent:
                    return NEED_DATA
                self._closed_event_sent = True
                return ConnectionClosed(self.close_reason)
            try:
                event = self._step()
            except _Violation as exc:
                self._change("violation")
                self.close_reason = str(exc)
                continue
            if event is not None:
                return event
            if self._need_more():
                if self._eof:
                    self._eof_reached()
                    continue
                return NEED_DATA

    # -- state changes ----------------------------------------------------------------------

    def _change(self, what: str) -> None:
        try:
            self.phase = TRANSITIONS[(self.phase, what)]
        except KeyError:
            raise LocalProtocolError(f"no transition {what!r} from {self.phase.value}") from None
        if self.phase is Phase.CLOSED:
            self.expect = Expect.NOTHING
            self._in.clear()

    def _eof_reached(self) -> None:
        partial = bool(self._in) or self.expect in (Expect.OPTION_DATA, Expect.WRITE_PAYLOAD)
        self._change("eof")
        if partial and self.close_reason is None:
            self.close_reason = "Unexpected end-of-file before all data were read"

    def _need_more(self) -> bool:
        if self.phase is Phase.CLOSED:
            return False
        if self.expect is Expect.TLS_HANDSHAKE:
            return True
        size = self._wanted()
        return size is not None and len(self._in) < size

    def _wanted(self) -> int | None:
        if self.expect is Expect.OPTION_DATA:
            return self._option_length
        if self.expect is Expect.WRITE_PAYLOAD:
            return 1  # anything at all: the payload is consumed piecewise
        return EXPECT_SIZE.get(self.expect)

    def _take(self, n: int) -> bytes:
        out = bytes(self._in[:n])
        del self._in[:n]
        return out

    def _step(self) -> Event | None:
        size = self._wanted()
        if size is None or len(self._in) < size:
            return None
        if self.expect is Expect.CLIENT_FLAGS:
            self._on_client_flags(self._take(4))
            return None
        if self.expect is Expect.OPTION_HEADER:
            self._on_option_header(self._take(EXPECT_SIZE[Expect.OPTION_HEADER]))
            return None
        if self.expect is Expect.OPTION_DATA:
            return self._on_option(self._take(self._option_length))
        if self.expect is Expect.REQUEST_HEADER:
            return self._on_request_header(self._take(EXPECT_SIZE[Expect.REQUEST_HEADER]))
        if self.expect is Expect.WRITE_PAYLOAD:
            return self._fill_payload_buffered()
        return None

    # -- handshake ----------------------------------------------------------------------------

    def _on_client_flags(self, raw: bytes) -> None:
        (flags,) = struct.unpack(">I", raw)
        self.fixed_newstyle = bool(flags & FLAG_C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        unknown = flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        if unknown:
            raise _Violation(f"Unknown client flags 0x{unknown:x} received")
        self._change("client-flags")
        self.expect = Expect.OPTION_HEADER

    def _on_option_header(self, raw: bytes) -> None:
        magic, option, length = _OPTION_HEADER.unpack(raw)
        if magic != IHAVEOPT:
            raise _Violation("Bad magic received")
        if length > MAX_BUFFER_SIZE:
            raise _Violation(f"len ({length}) is larger than max len ({MAX_BUFFER_SIZE})")
        if self.tls and not self.tls_active:
            if not self.fixed_newstyle:
                raise _Violation(f"Unsupported option 0x{option:x}")
            if option == OPT_EXPORT_NAME:
                # No way to send an error back: the client is dropped.
                raise _Violation(f"Option 0x{option:x} not permitted before TLS")
        if not self.fixed_newstyle and option != OPT_EXPORT_NAME:
            raise _Violation(f"Unsupported option {option} ({option_name(option)}); no way to report error")
        if option == OPT_EXPORT_NAME and length > MAX_STRING_SIZE:
            raise _Violation("Bad length received")
        self._option = option
        self._option_length = length
        self.expect = Expect.OPTION_DATA

    def _on_option(self, data: bytes) -> Event | None:
        option = self._option
        self.expect = Expect.OPTION_HEADER
        if self.tls and not self.tls_active and option != OPT_STARTTLS:
            self._rep_err(option, REP_ERR_TLS_REQD, f"Option 0x{option:x} not permitted before TLS")
            if option == OPT_ABORT:
                self._change("abort")
            return None
        handler = OPTION_HANDLERS.get(option, ServerConnection._opt_unsupported)
        try:
            return handler(self, option, data)
        except _OptionInvalid as exc:
            self._rep_err(option, REP_ERR_INVALID, str(exc))
            return None

    def _rep(self, option: int, reply_type: int, data: bytes = b"") -> None:
        self._out.append(option_reply(option, reply_type, data))

    def _rep_err(self, option: int, reply_type: int, message: str | bytes) -> None:
        text = message.encode("utf-8", "surrogateescape") if isinstance(message, str) else message
        self._rep(option, reply_type, text)

    def _find(self, name: bytes) -> ExportInfo | None:
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if self.lookup is not None:
            return self.lookup(text)
        return self.exports.get(text)

    def _all_exports(self) -> list[ExportInfo]:
        if self.listing is not None:
            return list(self.listing())
        return list(self.exports.values())

    def _opt_export_name(self, option: int, data: bytes) -> Event | None:
        export = self._find(data)
        if export is None:
            raise _Violation("export not found")
        flags = export.flags | (FLAG_SEND_DF if self.structured else 0)
        reply = struct.pack(">QH", export.size, flags)
        if not self.no_zeroes:
            reply += bytes(124)
        self._out.append(reply)
        return self._start(export, "export-name")

    def _opt_abort(self, option: int, data: bytes) -> Event | None:
        self._rep(option, REP_ACK)
        self._change("abort")
        return None

    def _opt_list(self, option: int, data: bytes) -> Event | None:
        if data:
            raise _OptionInvalid(f"option '{option_name(option)}' has unexpected length")
        for export in self._all_exports():
            name = export.name.encode()
            self._rep(option, REP_SERVER, struct.pack(">I", len(name)) + name + export.description.encode())
        self._rep(option, REP_ACK)
        return None

    def _opt_starttls(self, option: int, data: bytes) -> Event | None:
        unexpected = f"option '{option_name(option)}' has unexpected length"
        if self.tls and not self.tls_active:
            if data:
                # QEMU drops a client that cannot even start TLS correctly.
                self._rep_err(option, REP_ERR_INVALID, unexpected)
                raise _Violation(unexpected)
            if self._in:
                # The client must wait for the ACK; bytes already here cannot be handed to
                # the TLS layer, which reads the socket itself.
                raise _Violation("Unexpected data after option 'starttls'")
            self._rep(option, REP_ACK)
            self.expect = Expect.TLS_HANDSHAKE
            return StartTLS()
        if data:
            raise _OptionInvalid(unexpected)
        if self.tls:
            raise _OptionInvalid("TLS already enabled")
        self._rep_err(option, REP_ERR_POLICY, "TLS not configured")
        return None

    def tls_established(self) -> None:
        """The TLS handshake that :class:`StartTLS` asked for succeeded: options go on.

        :raise LocalProtocolError: when no handshake was due.
        """
        if self.expect is not Expect.TLS_HANDSHAKE or self.phase is not Phase.OPTIONS:
            raise LocalProtocolError("no TLS handshake is pending")
        self.tls_active = True
        self.expect = Expect.OPTION_HEADER
        # Nothing negotiated in clear text survives the upgrade.
        self.structured = False
        self._meta = _MetaSelection()

    def _opt_info(self, option: int, data: bytes) -> Event | None:
        reader = _OptionReader(option, data)
        name = reader.name()
        requests = reader.u16()
        send_name = False
        for _ in range(requests):
            request = reader.u16()
            if request == INFO_NAME:
                send_name = True
        if reader.remaining:
            raise _OptionInvalid(f"option '{option_name(option)}' has unexpected length")
        export = self._find(name)
        if export is None:
            self._rep_err(option, REP_ERR_UNKNOWN, f"export '{_sanitize(name)}' not present")
            return None
        if send_name:
            self._rep(option, REP_INFO, struct.pack(">H", INFO_NAME) + export.name.encode())
        if export.description:
            self._rep(option, REP_INFO, struct.pack(">H", INFO_DESCRIPTION) + export.description.encode())
        self._rep(option, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, export.min_block,
                                                max(export.preferred_block, export.min_block),
                                                export.max_block))
        flags = export.flags | (FLAG_SEND_DF if self.structured else 0)
        self._rep(option, REP_INFO, struct.pack(">HQH", INFO_EXPORT, export.size, flags))
        self._rep(option, REP_ACK)
        if option == OPT_GO:
            return self._start(export, "go")
        return None

    def _opt_structured_reply(self, option: int, data: bytes) -> Event | None:
        if data:
            raise _OptionInvalid(f"option '{option_name(option)}' has unexpected length")
        if self.structured:
            raise _OptionInvalid("structured reply already negotiated")
        self._rep(option, REP_ACK)
        self.structured = True
        return None

    def _opt_meta_context(self, option: int, data: bytes) -> Event | None:
        listing = option == OPT_LIST_META_CONTEXT
        if not listing:
            self._meta = _MetaSelection()  # SET replaces the selection, even when it fails
            if not self.structured:
                raise _OptionInvalid(f"request option '{option_name(option)}' when structured reply "
                                     "is not negotiated")
        reader = _OptionReader(option, data)
        name = reader.name()
        export = self._find(name)
        if export is None:
            self._rep_err(option, REP_ERR_UNKNOWN, f"export '{_sanitize(name)}' not present")
            return None
        available = dict((ctx_name, ctx_id) for ctx_id, ctx_name in export.contexts())
        queries = reader.u32()
        chosen: set[str] = set()
        if listing and queries == 0:
            chosen.update(available)
        for _ in range(queries):
            chosen.update(self._meta_query(reader, listing, available))
        selected = tuple((ctx_id, ctx_name) for ctx_id, ctx_name in export.contexts() if ctx_name in chosen)
        for ctx_id, ctx_name in selected:
            self._rep(option, REP_META_CONTEXT,
                      struct.pack(">I", 0 if listing else ctx_id) + ctx_name.encode())
        self._rep(option, REP_ACK)
        if not listing:
            self._meta = _MetaSelection(export.name, selected)
        return None

    def _meta_query(self, reader: _OptionReader, listing: bool, available: Mapping[str, int]) -> set[str]:
        length = reader.u32()
        if length > MAX_STRING_SIZE or length < 5:
            reader.skip(length)
            return set()
        query = reader.read(length, check_nul=True)
        try:
            text = query.decode("utf-8")
        except UnicodeDecodeError:
            return set()
        if text in available:
            return {text}
        if listing and text.endswith(":"):
            # "base:" and "qemu:" list every context of the namespace, "qemu:dirty-bitmap:" every bitmap.
            return {ctx for ctx in available
                    if ctx.startswith(text) and text in ("base:", "qemu:", CONTEXT_DIRTY_BITMAP)}
        return set()

    def _opt_unsupported(self, option: int, data: bytes) -> Event | None:
        self._rep_err(option, REP_ERR_UNSUP, f"Unsupported option {option} ({option_name(option)})")
        return None

    def _start(self, export: ExportInfo, how: str) -> Event:
        self._change(how)
        self.export = export
        self.expect = Expect.REQUEST_HEADER
        self._contexts = self._meta.contexts if self._meta.export == export.name else ()
        return TransmissionStarted(export, self.structured, self._contexts)

    # -- transmission ------------------------------------------------------------------------

    def _on_request_header(self, raw: bytes) -> Event | None:
        magic, flags, command, cookie, offset, length = _REQUEST.unpack(raw)
        if magic != REQUEST_MAGIC:
            # QEMU answers with the cookie it read, then drops the client.
            self._error_reply(cookie, EINVAL, f"invalid magic (got 0x{magic:x})")
            raise _Violation(f"invalid magic (got 0x{magic:x})")
        if command == CMD_DISC:
            self._change("disc")
            return None
        request = Request(cookie, command, flags, offset, length)
        if command in BUFFERED_COMMANDS and length > MAX_BUFFER_SIZE:
            message = f"len ({length} ) is larger than max len ({MAX_BUFFER_SIZE})"
            self._error_reply(cookie, EINVAL, message)
            if command == CMD_WRITE:
                raise _Violation("Request handling failed in intermediate state")
            return None
        if command == CMD_WRITE:
            request.data = self.payload_buffer(length)
            self._pending = request
            self._filled = 0
            self.expect = Expect.WRITE_PAYLOAD
            if length == 0:
                return self._payload_done()
            return None
        return self._validate(request)

    def _next_request(self) -> Request | None:
        """The fast path of transmission: the next valid request whose header (and a write's
        payload) is buffered whole; None when there is none, or when the next message needs
        anything else (a short buffer, a bad magic, DISC, an oversized request): then the
        general parser (:meth:`_step`) takes it, as it takes everything else.

        This is what every request of a busy connection goes through, so it does in one call
        what the general parser does in several steps; the outcome is the same.
        """
        buf = self._in
        while len(buf) >= _REQUEST_SIZE:
            magic, flags, command, cookie, offset, length = _REQUEST.unpack_from(buf)
            if magic != REQUEST_MAGIC or length > MAX_BUFFER_SIZE or command == CMD_DISC:
                return None
            if command == CMD_WRITE:
                end = _REQUEST_SIZE + length
                if len(buf) < end:
                    return None  # the payload is filled piecewise as it arrives
                request = Request(cookie, command, flags, offset, length, buf[_REQUEST_SIZE:end])
                del buf[:end]
            else:
                del buf[:_REQUEST_SIZE]
                request = Request(cookie, command, flags, offset, length)
            if self._validate(request) is not None:
                return request
        return None

    def _fill_payload(self, data: memoryview) -> Event | None:
        request = self._pending
        assert request is not None and request.data is not None
        n = min(len(data), request.length - self._filled)
        request.data[self._filled : self._filled + n] = data[:n]
        self._filled += n
        if n < len(data):
            self._in += data[n:]
        if self._filled == request.length:
            return self._payload_done()
        return None

    def _fill_payload_buffered(self) -> Event | None:
        # The payload's start arrived with its header: copy it once, straight from the input
        # buffer, and keep what follows it (more requests) where it is. Copying the whole
        # buffer out and the rest back in cost O(buffer) per request.
        request = self._pending
        assert request is not None and request.data is not None
        n = min(len(self._in), request.length - self._filled)
        view = memoryview(self._in)
        try:
            request.data[self._filled : self._filled + n] = view[:n]
        finally:
            view.release()
        del self._in[:n]
        self._filled += n
        if self._filled == request.length:
            return self._payload_done()
        return None

    def _payload_done(self) -> Event | None:
        request = self._pending
        assert request is not None
        self._pending = None
        self.expect = Expect.REQUEST_HEADER
        return self._validate(request)

    def _validate(self, request: Request) -> Event | None:
        export = self.export
        assert export is not None
        command = request.command
        offset = request.offset
        length = request.length
        size = export.size
        error: str | None = None
        if export.read_only and command in WRITING_COMMANDS:
            error = "Export is read-only"
        elif offset > size or length > size - offset:
            error = f"operation past EOF; From: {offset}, Len: {length}, Size: {size}"
        elif request.flags & ~(_VALID_FLAGS_STRUCTURED if self.structured else _VALID_FLAGS).get(
                command, CMD_FLAG_FUA):
            error = f"unsupported flags for command {command_name(command)} (got 0x{request.flags:x})"
        elif command not in COMMAND_NAMES:
            error = f"invalid request type ({command}) received"
        elif command == CMD_BLOCK_STATUS and not length:
            error = "need non-zero length"
        elif command == CMD_BLOCK_STATUS and not self._contexts:
            error = "CMD_BLOCK_STATUS not negotiated"
        if error is not None:
            self._error_reply(request.cookie, EINVAL, error)
            return None
        # Cookies are the client's business: QEMU does not insist on unique ones, so neither do we.
        in_flight = self._in_flight
        cookie = request.cookie
        in_flight[cookie] = in_flight.get(cookie, 0) + 1
        return request

    # -- replies --------------------------------------------------------------------------------

    def _error_reply(self, cookie: int, error: int, message: str) -> None:
        if self.structured:
            self._out.append(error_chunk(cookie, error, message.encode("utf-8", "replace")))
        else:
            self._out.append(simple_reply(error, cookie))

    def _finish(self, cookie: int) -> bool:
        """Retire ``cookie``; False when the connection is gone (the reply is then dropped)."""
        if cookie not in self._in_flight:
            if self.phase is Phase.CLOSED:
                return False
            raise LocalProtocolError(f"no request with cookie 0x{cookie:x} in flight")
        if self._in_flight[cookie] == 1:
            del self._in_flight[cookie]
        else:
            self._in_flight[cookie] -= 1
        return True

    @property
    def in_flight(self) -> int:
        return sum(self._in_flight.values())

    def reply_ok(self, cookie: int) -> None:
        """Success for a command without reply data (QEMU sends a simple reply even when structured)."""
        # _finish and simple_reply, inline for the common case: every write's reply.
        in_flight = self._in_flight
        if in_flight.get(cookie) == 1:
            del in_flight[cookie]
            self._out.append(_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie))
        elif self._finish(cookie):
            self._out.append(simple_reply(0, cookie))

    def reply_error(self, cookie: int, error: int, message: str) -> None:
        """Failure: an ``ERROR`` chunk with ``message`` when structured, else a simple reply.

        :param error: an NBD error value (see :func:`errno_to_nbd`).
        """
        if self._finish(cookie):
            self._error_reply(cookie, error, message)

    def reply_read(self, cookie: int, offset: int,
                   pieces: Sequence[tuple[int, memoryview | int | FileRange]],
                   df: bool = False) -> None:
        """Answer a READ of the range starting at ``offset``.

        ``pieces`` cover the request in order: each is (offset, data) or (offset, hole length);
        data may be a file range, which goes out as it is, for the caller to send.
        With structured replies data becomes ``OFFSET_DATA`` chunks and holes ``OFFSET_HOLE``
        chunks (``df``: the caller passes one data piece), the last flagged DONE; a zero-length
        read is a lone ``NONE`` chunk. Without, one simple reply followed by all the bytes.
        """
        if not self._finish(cookie):
            return
        out = self._out
        if not self.structured:
            out.append(simple_reply(0, cookie))
            for _, piece in pieces:
                out.append(bytes(piece) if isinstance(piece, int) else piece)
            return
        if not pieces:
            out.append(chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0))
            return
        last = len(pieces) - 1
        for i, (piece_offset, piece) in enumerate(pieces):
            flags = REPLY_FLAG_DONE if i == last else 0
            if isinstance(piece, int):
                out.append(hole_chunk(cookie, piece_offset, piece, flags))
            else:
                out.append(chunk_header(flags, REPLY_TYPE_OFFSET_DATA, cookie, 8 + len(piece))
                           + struct.pack(">Q", piece_offset))
                out.append(piece)

    def reply_block_status(self, cookie: int, answers: Sequence[tuple[int, Sequence[tuple[int, int]]]]) -> None:
        """Answer BLOCK_STATUS: per selected context (id, [(length, flags), ...]), in order.

        Each becomes one ``REPLY_TYPE_BLOCK_STATUS`` chunk (32-bit context id, then 32-bit
        length / 32-bit flags pairs); the last carries DONE.
        """
        if not self._finish(cookie):
            return
        last = len(answers) - 1
        for i, (context_id, extents) in enumerate(answers):
            payload = bytearray(struct.pack(">I", context_id))
            for length, flags in extents:
                payload += _EXTENT.pack(length, flags)
            self._out.append(chunk_header(REPLY_FLAG_DONE if i == last else 0, REPLY_TYPE_BLOCK_STATUS,
                                          cookie, len(payload)) + payload)


OPTION_HANDLERS: dict[int, Callable[[ServerConnection, int, bytes], Event | None]] = {
    OPT_EXPORT_NAME: ServerConnection._opt_export_name,
    OPT_ABORT: ServerConnection._opt_abort,
    OPT_LIST: ServerConnection._opt_list,
    OPT_STARTTLS: ServerConnection._opt_starttls,
    OPT_INFO: ServerConnection._opt_info,
    OPT_GO: ServerConnection._opt_info,
    OPT_STRUCTURED_REPLY: ServerConnection._opt_structured_reply,
    OPT_LIST_META_CONTEXT: ServerConnection._opt_meta_context,
    OPT_SET_META_CONTEXT: ServerConnection._opt_meta_context,
}
