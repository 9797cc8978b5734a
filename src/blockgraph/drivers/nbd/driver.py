"""The ``nbd`` protocol driver: an NBD client over a unix or TCP socket (QEMU's block/nbd.c).

One connection carries every request; each waits on its own cookie, so several are in flight
at once. When the connection drops, requests wait up to ``reconnect-delay`` seconds for a new
one (and are sent again on it); after that, or with no delay, they fail with EIO and each new
request makes one attempt to reconnect.

With ``tls-creds`` (a ``tls-creds-x509`` object for the client endpoint) every connection starts
TLS before any other option; the server's certificate is checked against ``tls-hostname``, or
the TCP host when that is not given, as QEMU does.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from blockgraph.drivers.base import (
    BlockDriver,
    BlockStatus,
    BlockStatusFlags,
    OpenContext,
    RequestFlags,
)
from blockgraph.drivers.nbd import wire as W
from blockgraph.drivers.nbd.client import (
    ClientConnection,
    ConnectionFailed,
    Event,
    ExportInfo,
    Extents,
    HandshakeDone,
    ReadData,
    ReadHole,
    RequestDone,
    StartTLS,
)
from blockgraph.errors import BlockError, IOFailure, OptionError
from blockgraph.objects.tls import TlsCredsX509, verify_error_text
from blockgraph.options.schema import OptionSpec, OptType, opt

DEFAULT_PORT = 10809
_EXPORT_NAME_OPT = ":exportname="
_MAX_RECONNECT_BACKOFF = 1.0
_log = logging.getLogger(__name__)


def _parse_uri(filename: str, options: dict[str, Any]) -> bool:
    """``nbd[+tcp]://host[:port]/export`` or ``nbd+unix:///export?socket=PATH``."""
    try:
        uri = urllib.parse.urlsplit(filename)
        port = uri.port
    except ValueError:
        return False
    if uri.scheme not in ("nbd", "nbd+tcp", "nbd+unix"):
        return False
    is_unix = uri.scheme == "nbd+unix"
    export = urllib.parse.unquote(uri.path[1:] if uri.path.startswith("/") else uri.path)
    query = [p for p in uri.query.split("&") if p] if uri.query else []
    if len(query) > 1 or (is_unix and not query) or (not is_unix and query):
        return False
    if export:
        options["export"] = export
    if is_unix:
        name, _, value = query[0].partition("=")
        if uri.netloc or name != "socket":
            return False
        options["server.type"] = "unix"
        options["server.path"] = urllib.parse.unquote(value)
    else:
        if not uri.hostname:
            return False
        options["server.type"] = "inet"
        options["server.host"] = uri.hostname
        options["server.port"] = str(port or DEFAULT_PORT)
    return True


@dataclass
class _Pending:
    """One request waiting for its reply."""

    future: asyncio.Future[RequestDone]
    buf: memoryview | None = None  # a read's destination
    base: int = 0  # the export offset of buf[0]
    extents: list[tuple[int, int]] = field(default_factory=list)


class _ConnectionLost(Exception):
    pass


class NbdDriver(BlockDriver):
    """Driver ``nbd``."""

    format_name: ClassVar[str] = "nbd"
    is_format: ClassVar[bool] = False
    protocol_prefixes: ClassVar[tuple[str, ...]] = ("nbd", "nbd+tcp", "nbd+unix")
    runtime_options: ClassVar[Mapping[str, OptionSpec]] = {
        "server.type": opt(OptType.STRING, None, ("inet", "unix", "vsock", "fd")),
        "server.path": opt(OptType.STRING),
        "server.host": opt(OptType.STRING),
        "server.port": opt(OptType.STRING),
        "path": opt(OptType.STRING),
        "host": opt(OptType.STRING),
        "port": opt(OptType.STRING),
        "export": opt(OptType.STRING),
        "tls-creds": opt(OptType.STRING),
        "tls-hostname": opt(OptType.STRING),
        "x-dirty-bitmap": opt(OptType.STRING),
        "reconnect-delay": opt(OptType.NUMBER, 0),
        "open-timeout": opt(OptType.NUMBER, 0),
    }
    # FUA, MAY_UNMAP and NO_FALLBACK go on the wire when the server offers them; otherwise the
    # driver emulates FUA with a flush and refuses NO_FALLBACK zeroes, as QEMU does.
    supported_write_flags: ClassVar[RequestFlags] = (
        RequestFlags.FUA | RequestFlags.MAY_UNMAP | RequestFlags.NO_FALLBACK
    )

    def __init__(self) -> None:
        self.server_type = "unix"
        self.path = ""
        self.host = ""
        self.port = ""
        self.export: str | None = None
        self.context = W.CONTEXT_BASE_ALLOCATION
        self.reconnect_delay = 0
        self.open_timeout = 0
        self.request_alignment = 1
        self.max_transfer = W.MAX_BUFFER_SIZE
        self.export_info = ExportInfo(0, 0, False)
        self.tls: TlsCredsX509 | None = None
        self.tls_creds_id: str | None = None
        self.tls_hostname: str | None = None
        self._conn: ClientConnection | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, _Pending] = {}
        self._connect_lock = asyncio.Lock()
        self._deadline: float | None = None  # requests wait for a reconnect until then
        self._closing = False
        self._log = _log

    # -- options ---------------------------------------------------------------------------------

    @classmethod
    def parse_filename(cls, filename: str, options: dict[str, Any]) -> None:
        for key in options:
            if key in ("host", "port", "path", "export", "server") or key.startswith("server."):
                raise OptionError(f"Option '{key}' cannot be used with a file name")
        if "://" in filename:
            if not _parse_uri(filename, options):
                raise BlockError("No valid URL specified")
            return
        rest = filename
        pos = rest.find(_EXPORT_NAME_OPT)
        if pos >= 0:
            export = rest[pos + len(_EXPORT_NAME_OPT):]
            if not export:
                return
            rest = rest[:pos]
            options["export"] = export
        if not rest.startswith("nbd:"):
            raise BlockError("File name string for NBD must start with 'nbd:'")
        spec = rest[len("nbd:"):]
        if not spec:
            return
        if spec.startswith("unix:"):
            options["server.type"] = "unix"
            options["server.path"] = spec[len("unix:"):]
            return
        host, sep, port = spec.rpartition(":")
        if not sep or not host or not port:
            raise BlockError(f"error parsing address '{spec}'")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        options["server.type"] = "inet"
        options["server.host"] = host
        options["server.port"] = port

    async def open(self, ctx: OpenContext, options: dict[str, Any]) -> None:
        self._log = _log.getChild(ctx.node_name)
        server_type = options.get("server.type")
        legacy = {k: options.get(k) for k in ("path", "host", "port") if options.get(k) is not None}
        if server_type is None and legacy:
            server_type = "unix" if "path" in legacy else "inet"
            options["server.path"] = legacy.get("path")
            options["server.host"] = legacy.get("host")
            options["server.port"] = legacy.get("port") or str(DEFAULT_PORT)
        if server_type is None:
            if any(options.get(k) is not None for k in ("server.path", "server.host", "server.port")):
                raise BlockError("Parameter 'type' is missing")
            raise BlockError("NBD server address missing")
        if server_type in ("vsock", "fd"):
            raise BlockError(f"NBD server type '{server_type}' is not supported")
        self.server_type = str(server_type)
        if self.server_type == "unix":
            if options.get("server.path") is None:
                raise BlockError("Parameter 'path' is missing")
            self.path = str(options["server.path"])
        else:
            if options.get("server.host") is None:
                raise BlockError("Parameter 'host' is missing")
            if options.get("server.port") is None:
                raise BlockError("Parameter 'port' is missing")
            self.host, self.port = str(options["server.host"]), str(options["server.port"])
        creds = options.get("tls-creds")
        if creds is not None:
            self.tls_creds_id = str(creds)
            self.tls = ctx.objects.tls_creds(self.tls_creds_id, "client")
            # QEMU 7.2 ignores tls-hostname without tls-creds; with them, a TCP host is the default.
            hostname = options.get("tls-hostname")
            if hostname is None and self.server_type == "inet":
                hostname = self.host
            self.tls_hostname = None if hostname is None else str(hostname)
        export = options.get("export")
        self.export = None if export is None else str(export)
        bitmap = options.get("x-dirty-bitmap")
        if bitmap is not None:
            self.context = str(bitmap)
        self.reconnect_delay = int(options.get("reconnect-delay") or 0)
        self.open_timeout = int(options.get("open-timeout") or 0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.open_timeout
        backoff = 0.01
        while True:
            try:
                await self._connect()
                break
            except BlockError:
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(min(backoff, max(0.0, deadline - loop.time())))
                backoff = min(backoff * 2, _MAX_RECONNECT_BACKOFF)
        info = self.export_info
        if info.flags & W.FLAG_READ_ONLY and not ctx.flags.read_only:
            await self.close()
            raise BlockError("An NBD server that is read-only cannot be opened read-write")

    def _describe(self) -> str:
        return self.path if self.server_type == "unix" else f"{self.host}:{self.port}"

    # -- connection --------------------------------------------------------------------------

    async def _connect(self) -> None:
        """Connect and shake hands; raises BlockError with QEMU's text."""
        try:
            if self.server_type == "unix":
                reader, writer = await asyncio.open_unix_connection(self.path)
            else:
                reader, writer = await asyncio.open_connection(self.host, int(self.port))
        except OSError as exc:
            text = exc.strerror or str(exc)
            raise BlockError(f"Failed to connect to '{self._describe()}': {text}") from exc
        except ValueError as exc:
            raise BlockError(f"error parsing address '{self._describe()}'") from exc
        conn = ClientConnection(self.export or "", [self.context], tls=self.tls is not None)
        try:
            info = await self._handshake(conn, reader, writer)
        except BaseException:
            writer.close()
            raise
        old = self.export_info
        if self._conn is not None or old.size and info.size != old.size:
            writer.close()
            raise BlockError("Cannot reconnect: the export has changed")
        self.export_info = info
        minimum = info.min_block
        if not minimum:
            minimum = 1 if info.size % 512 or self.context in info.contexts else 512
        self.request_alignment = minimum
        maximum = min(W.MAX_BUFFER_SIZE, info.max_block or W.MAX_BUFFER_SIZE)
        self.max_transfer = maximum // minimum * minimum
        self._conn = conn
        self._writer = writer
        self._deadline = None
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop(conn, reader))

    async def _handshake(self, conn: ClientConnection, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> ExportInfo:
        # True from the TLS handshake until the server's first byte inside TLS.
        tls_unanswered = False
        while True:
            event = conn.next_event()
            if isinstance(event, HandshakeDone):
                return event.info
            if isinstance(event, ConnectionFailed):
                raise BlockError(event.message)
            if isinstance(event, StartTLS):
                await self._start_tls(writer)
                conn.tls_established()
                tls_unanswered = True
                continue
            try:
                out = conn.data_to_send()
                if out:
                    writer.write(out)
                    await writer.drain()
                data = await reader.read(65536)
            except OSError:  # ssl.SSLError included: a TLS alert ends the connection too
                data = b""
            if tls_unanswered and not data:
                # The server hung up right after the TLS handshake: with TLS 1.3 that is how
                # it refuses a missing or unwanted client certificate. GnuTLS notices it on
                # its next write, so QEMU words it that way.
                raise BlockError("Failed to send option request header: Cannot write to TLS "
                                 "channel: Input/output error")
            tls_unanswered = False
            conn.receive_data(data)

    async def _start_tls(self, writer: asyncio.StreamWriter) -> None:
        """Run the TLS handshake on the connection; BlockError with QEMU's text if it fails."""
        creds = self.tls
        assert creds is not None
        if creds.verify_peer and self.tls_hostname is None:
            raise BlockError("No hostname for certificate validation")
        try:
            await writer.start_tls(creds.context, server_hostname=self.tls_hostname)
        except ssl.SSLCertVerificationError as exc:
            raise BlockError(verify_error_text(exc, self.tls_hostname)) from exc
        except (ssl.SSLError, OSError) as exc:
            raise BlockError(f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}") from exc

    async def _read_loop(self, conn: ClientConnection, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                event = conn.next_event()
                if event is None:
                    try:
                        data = await reader.read(1 << 20)
                    except OSError:
                        data = b""
                    conn.receive_data(data)
                    continue
                if isinstance(event, ConnectionFailed):
                    self._log.warning("NBD connection lost: %s", event.message)
                    break
                self._dispatch(event)
        finally:
            self._lost(conn)

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, (ReadData, ReadHole, Extents, RequestDone)):
            pending = self._pending.get(event.cookie)
            if pending is None:
                return
            if isinstance(event, ReadData) and pending.buf is not None:
                start = event.offset - pending.base
                pending.buf[start : start + len(event.data)] = event.data
            elif isinstance(event, ReadHole) and pending.buf is not None:
                start = event.offset - pending.base
                pending.buf[start : start + event.length] = bytes(event.length)
            elif isinstance(event, Extents):
                if event.context_id == self.export_info.contexts.get(self.context):
                    pending.extents.extend(event.extents)
            elif isinstance(event, RequestDone):
                del self._pending[event.cookie]
                if not pending.future.done():
                    pending.future.set_result(event)

    def _lost(self, conn: ClientConnection) -> None:
        if self._conn is not conn:
            return
        self._conn = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.reconnect_delay and not self._closing:
            self._deadline = asyncio.get_running_loop().time() + self.reconnect_delay
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            if not waiter.future.done():
                waiter.future.set_exception(_ConnectionLost())

    async def _wait_connected(self) -> ClientConnection:
        loop = asyncio.get_running_loop()
        backoff = 0.01
        while self._conn is None:
            if self._closing:
                raise IOFailure(errno.EIO)
            async with self._connect_lock:
                if self._conn is not None:
                    break
                try:
                    await self._connect()
                    break
                except BlockError as exc:
                    self._log.debug("NBD reconnect failed: %s", exc)
            if self._deadline is None or loop.time() >= self._deadline:
                raise IOFailure(errno.EIO)
            await asyncio.sleep(min(backoff, max(0.0, self._deadline - loop.time())))
            backoff = min(backoff * 2, _MAX_RECONNECT_BACKOFF)
        assert self._conn is not None
        return self._conn

    async def _request(self, command: int, offset: int, length: int, flags: int = 0,
                       data: memoryview | None = None, buf: memoryview | None = None) -> _Pending:
        while True:
            conn = await self._wait_connected()
            future: asyncio.Future[RequestDone] = asyncio.get_running_loop().create_future()
            cookie = conn.send_request(command, offset, length, flags, data)
            pending = _Pending(future, buf, offset)
            self._pending[cookie] = pending
            assert self._writer is not None
            try:
                self._writer.write(conn.data_to_send())
                await self._writer.drain()
            except (OSError, RuntimeError):
                pass  # the read loop sees the loss and fails the future
            try:
                done = await future
            except _ConnectionLost:
                if self._deadline is None:
                    raise IOFailure(errno.EIO) from None
                continue
            if done.error:
                raise IOFailure(done.error, done.message or None)
            return pending

    async def close(self) -> None:
        self._closing = True
        conn, writer, task = self._conn, self._writer, self._reader_task
        if conn is not None and writer is not None:
            conn.send_disconnect()
            try:
                writer.write(conn.data_to_send())
                await writer.drain()
            except (OSError, RuntimeError):
                pass
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if writer is not None:
            writer.close()
        self._conn = None
        self._writer = None

    # -- data path -------------------------------------------------------------------------------

    def getlength(self) -> int:
        return self.export_info.size

    def _chunks(self, offset: int, length: int) -> list[tuple[int, int]]:
        step = self.max_transfer
        return [(pos, min(step, offset + length - pos)) for pos in range(offset, offset + length, step)]

    async def preadv(self, offset: int, buf: memoryview, flags: RequestFlags) -> None:
        jobs = [self._request(W.CMD_READ, pos, n, buf=buf[pos - offset : pos - offset + n])
                for pos, n in self._chunks(offset, len(buf))]
        await asyncio.gather(*jobs)

    def _fua(self, flags: RequestFlags) -> tuple[int, bool]:
        """The command flag for FUA, and whether a flush must follow instead."""
        if not flags & RequestFlags.FUA:
            return 0, False
        if self.export_info.flags & W.FLAG_SEND_FUA:
            return W.CMD_FLAG_FUA, False
        return 0, True

    async def pwritev(self, offset: int, buf: memoryview, flags: RequestFlags) -> None:
        cmd_flags, flush_after = self._fua(flags)
        jobs = [self._request(W.CMD_WRITE, pos, n, cmd_flags, data=buf[pos - offset : pos - offset + n])
                for pos, n in self._chunks(offset, len(buf))]
        await asyncio.gather(*jobs)
        if flush_after:
            await self.flush_to_disk()

    async def pwrite_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        info = self.export_info.flags
        if not info & W.FLAG_SEND_WRITE_ZEROES:
            raise IOFailure(errno.ENOTSUP)
        cmd_flags, flush_after = self._fua(flags)
        if not flags & RequestFlags.MAY_UNMAP:
            cmd_flags |= W.CMD_FLAG_NO_HOLE
        if flags & RequestFlags.NO_FALLBACK:
            if not info & W.FLAG_SEND_FAST_ZERO:
                raise IOFailure(errno.ENOTSUP)
            cmd_flags |= W.CMD_FLAG_FAST_ZERO
        await asyncio.gather(*[self._request(W.CMD_WRITE_ZEROES, pos, n, cmd_flags)
                               for pos, n in self._chunks(offset, length)])
        if flush_after:
            await self.flush_to_disk()

    async def pdiscard(self, offset: int, length: int) -> None:
        if not self.export_info.flags & W.FLAG_SEND_TRIM:
            return
        await asyncio.gather(*[self._request(W.CMD_TRIM, pos, n)
                               for pos, n in self._chunks(offset, length)])

    async def flush_to_disk(self) -> None:
        if not self.export_info.flags & W.FLAG_SEND_FLUSH:
            return
        await self._request(W.CMD_FLUSH, 0, 0)

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        if self.context not in self.export_info.contexts:
            return BlockStatus(BlockStatusFlags.DATA | BlockStatusFlags.OFFSET_VALID, length, offset)
        length = min(length, self.max_transfer)
        pending = await self._request(W.CMD_BLOCK_STATUS, offset, length, W.CMD_FLAG_REQ_ONE)
        if not pending.extents:
            raise IOFailure(errno.EIO, "Protocol error: no block status reply")
        extent_length, state = pending.extents[0]
        extent_length = min(extent_length, length)
        if extent_length <= 0:
            raise IOFailure(errno.EIO, "Protocol error: empty block status extent")
        status = BlockStatusFlags.OFFSET_VALID
        if not state & W.STATE_HOLE:
            status |= BlockStatusFlags.DATA
        if state & W.STATE_ZERO:
            status |= BlockStatusFlags.ZERO
        return BlockStatus(status, extent_length, offset)

    # -- description ---------------------------------------------------------------------------

    def filename(self) -> str | None:
        if self.server_type == "unix":
            if self.export is not None:
                return f"nbd+unix:///{self.export}?socket={self.path}"
            return f"nbd+unix://?socket={self.path}"
        if self.export is not None:
            return f"nbd://{self.host}:{self.port}/{self.export}"
        return f"nbd://{self.host}:{self.port}"

    def open_options(self) -> dict[str, object]:
        server: dict[str, object] = {"type": self.server_type}
        if self.server_type == "unix":
            server["path"] = self.path
        else:
            server["host"], server["port"] = self.host, self.port
        result: dict[str, object] = {"server": server}
        if self.export is not None:
            result["export"] = self.export
        if self.tls_creds_id is not None:
            result["tls-creds"] = self.tls_creds_id
        return result
