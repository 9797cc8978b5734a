"""The asyncio NBD server around :mod:`blockgraph.export.nbd.protocol`.

One connection is one :class:`~blockgraph.export.nbd.protocol.ServerConnection`; this module
only moves bytes and runs requests. Every export does its I/O through its own
:class:`~blockgraph.graph.node.BlockBackend` (writeback unless its user asked for writethrough),
passing ``RequestFlags.FUA`` for FUA requests. Requests of one connection run concurrently (up
to :data:`MAX_REQUESTS`) and are answered as they complete. A failing connection is closed and
logged; the server goes on.

With TLS credentials, the connection is upgraded in place when the protocol asks for it
(:class:`~blockgraph.export.nbd.protocol.StartTLS`), with asyncio's ``start_tls``; a failed
handshake closes that connection only.

An export may act as the device of a drive (:attr:`NBDExport.device`, a blockgraph addition):
then a failed request goes through the drive's rerror/werror policy
(:meth:`~blockgraph.graph.node.BlockBackend.handle_io_error`) before the client hears of it,
and while the VM is stopped requests wait, the one that stopped it included, to be retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import socket
import ssl
import sys
from asyncio import selector_events
from collections.abc import Callable, Coroutine, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any

from blockgraph.drivers.base import BlockStatusFlags, FileRange, RequestFlags
from blockgraph.errors import BlockError, IOFailure
from blockgraph.export.nbd import protocol as P
from blockgraph.export.nbd.status import chain_status, extents
from blockgraph.graph.node import BlockBackend, Node
from blockgraph.objects import ObjectRegistry
from blockgraph.objects.tls import TlsCredsX509, peer_distinguished_name

log = logging.getLogger(__name__)

# Requests of one connection in flight at once (QEMU's NBD_MAX_REQUESTS... is 16).
MAX_REQUESTS = 16
# The scratch buffer that receives everything but WRITE payloads (see _Stream).
_READ_SIZE = 256 * 1024
_HEADER_SIZE = P.EXPECT_SIZE[P.Expect.REQUEST_HEADER]
_ZERO = int(BlockStatusFlags.ZERO)
# Reply buffers below this size are joined before they are written (see _Client.flush).
_JOIN_LIMIT = 64 * 1024
# Bytes of write payload buffers one connection keeps for reuse (see _PayloadBuffers).
_PAYLOAD_BUFFER_BYTES = 16 * 1024 * 1024
# Big reads (see _JOIN_LIMIT) of one connection that hold a buffer at once.
_BIG_READS = 8
# The send buffer asked for on unix sockets (the kernel doubles it, caps it at wmem_max).
_SEND_BUFFER = 1024 * 1024
# The plain socket transport, whose socket _Stream writes to itself (see _Stream.send).
_PLAIN_TRANSPORT: type | None = getattr(selector_events, "_SelectorSocketTransport", None)
# What a failed send() says when the peer is gone (the connection cannot go on).
_SOCKET_GONE = frozenset((errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN))
# The most buffers one writev() takes (IOV_MAX on Linux).
_IOV_MAX = 1024
# Whether a buffer passed to the transport's write() is free again once write() returned:
# asyncio's plain socket transport sends what it can at once and copies the rest into its own
# buffer (CPython 3.11, selector_events._SelectorSocketTransport.write); 3.12 keeps a
# reference instead, and the TLS transport queues it.
_COPYING_TRANSPORT: type | None = (getattr(selector_events, "_SelectorSocketTransport", None)
                                   if sys.version_info < (3, 12) else None)


class _ReadBuffers:
    """Reply buffers of big reads of one connection, kept for the next read of the same size.

    A fresh 256 KiB bytearray is zeroed, and its pages are faulted in by the first read into
    it: the most expensive part of a big read after the copy itself. A buffer is given back
    once the transport took its bytes (see ``_COPYING_TRANSPORT``). What a read into a reused
    buffer does not fill is not sent (hole chunks); only a driver that leaves a read's buffer
    as it was (``null-co`` without ``read-zeroes``, QEMU's "uninitialised data") sends what the
    buffer held: zeroes, or data this connection read earlier, as QEMU's unzeroed buffers do.
    """

    __slots__ = ("size", "free")

    def __init__(self) -> None:
        self.size = 0
        self.free: list[bytearray] = []

    def take(self, size: int) -> bytearray:
        if size == self.size and self.free:
            return self.free.pop()
        return bytearray(size)

    def give(self, buf: bytearray) -> None:
        size = len(buf)
        if size != self.size:
            # Clients read with one size (nbdcopy 256 KiB, fio its bs): keep that one only.
            self.size = size
            self.free.clear()
        if len(self.free) < _BIG_READS:
            self.free.append(buf)


class _PayloadBuffers:
    """Payload buffers of big writes of one connection, kept for the next write of the size.

    A fresh 1 MiB bytearray was zeroed (malloc reuses freed heap memory for it) and its pages
    faulted in again by the receive: ~15% of the loop thread's time for 1 MiB writes. A buffer
    is given back once its write completed, and taken again only once nothing else holds it
    (its reference count says so): a worker thread drops its last job's arguments only when
    it takes the next job, and a node that kept the buffer, or a view of it, keeps it for
    good (it ages out of the list). The protocol fills a taken buffer whole before the
    request comes out, so nothing of the previous write leaks.
    """

    __slots__ = ("size", "free", "limit")

    def __init__(self) -> None:
        self.size = 0
        self.free: list[bytearray] = []
        self.limit = 0

    def take(self, size: int) -> bytearray:
        if size == self.size:
            free = self.free
            for i in range(len(free)):
                # References: the list's and getrefcount's argument.
                if sys.getrefcount(free[i]) == 2:
                    return free.pop(i)
        return bytearray(size)

    def give(self, buf: bytearray) -> None:
        size = len(buf)
        if size != self.size:
            # Clients write with one size (nbdcopy 256 KiB, fio its bs): keep that one only.
            self.size = size
            self.free.clear()
            self.limit = min(MAX_REQUESTS, _PAYLOAD_BUFFER_BYTES // size)
        self.free.append(buf)
        if len(self.free) > self.limit:
            del self.free[0]


@dataclass
class NBDExport:
    """One export: a name and the BlockBackend its I/O goes through.

    :param allocation_depth: offer the ``qemu:allocation-depth`` meta context (``-A``).
    """

    name: str
    backend: BlockBackend
    description: str = ""
    read_only: bool = False
    allocation_depth: bool = False
    bitmaps: list[str] = field(default_factory=list)
    # The drive this export is the device of (exported by the drive's id): its error policy
    # applies to failed requests. None for an export of a node: errors go to the client only.
    device: BlockBackend | None = None

    @property
    def root(self) -> Node:
        root = self.backend.root
        if root is None:
            raise IOFailure(errno.ENOMEDIUM)
        return root

    def size(self) -> int:
        # QEMU exports whole sectors only.
        return self.backend.getlength() // 512 * 512


class NBDServer:
    """Serve ``exports`` to any number of connections.

    :param max_connections: clients served at once (qemu-nbd ``-e``); 0 = no limit. Clients
        beyond it wait until a slot frees. Multi-conn is advertised unless it is 1, as QEMU does.
    :param tls_creds: server credentials: every client must start TLS first.
    :param tls_authz: the id of a QAuthZ object in ``objects`` that must accept a TLS client's
        distinguished name (looked up for each client, as QEMU does).
    """

    def __init__(self, exports: list[NBDExport], *, max_connections: int = 0,
                 tls_creds: TlsCredsX509 | None = None, tls_authz: str | None = None,
                 objects: ObjectRegistry | None = None) -> None:
        self.exports = {e.name: e for e in exports}
        self.max_connections = max_connections
        self.tls_creds = tls_creds
        self.tls_authz = tls_authz
        self.objects = objects if objects is not None else ObjectRegistry()
        self._slots = asyncio.Semaphore(max_connections) if max_connections > 0 else None
        self._servers: list[asyncio.AbstractServer] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self.clients = 0
        self.served = 0
        self._active: set[_Client] = set()
        # Called whenever the last connected client went away (qemu-nbd exits then unless
        # --persistent).
        self.on_idle: Callable[[], None] | None = None

    # -- catalogue ---------------------------------------------------------------------------

    def info(self, export: NBDExport) -> P.ExportInfo:
        return P.ExportInfo(
            name=export.name,
            size=export.size(),
            read_only=export.read_only,
            multi_conn=self.max_connections != 1,
            description=export.description,
            allocation_depth=export.allocation_depth,
            bitmaps=tuple(export.bitmaps),
        )

    def _lookup(self, name: str) -> P.ExportInfo | None:
        export = self.exports.get(name)
        return self.info(export) if export is not None else None

    def _listing(self) -> list[P.ExportInfo]:
        return [self.info(e) for e in self.exports.values()]

    def users(self, export: NBDExport) -> int:
        """How many connections are in transmission on ``export``."""
        return sum(1 for c in self._active if c.export is export)

    def disconnect(self, export: NBDExport) -> list[asyncio.Task[Any]]:
        """Drop the connections on ``export``; return the tasks that end with them."""
        tasks: list[asyncio.Task[Any]] = []
        for c in list(self._active):
            if c.export is export:
                c.writer.close()
                if c.task is not None:
                    # Its read loop may be waiting for a request slot that held requests keep
                    # (a stopped VM): only cancelling it ends the connection for sure.
                    c.task.cancel()
                    tasks.append(c.task)
        return tasks

    # -- listening ---------------------------------------------------------------------------

    def _stream(self) -> _Stream:
        return _Stream(self._accept)

    async def listen_unix(self, path: str) -> None:
        server = await asyncio.get_running_loop().create_unix_server(self._stream, path=path)
        self._servers.append(server)

    async def listen_tcp(self, host: str | None, port: int) -> None:
        server = await asyncio.get_running_loop().create_server(self._stream, host=host, port=port,
                                                                reuse_address=True)
        self._servers.append(server)

    async def listen_socket(self, sock: socket.socket) -> None:
        """Serve on an already bound and listening socket."""
        loop = asyncio.get_running_loop()
        if sock.family == socket.AF_UNIX:
            server = await loop.create_unix_server(self._stream, sock=sock)
        else:
            server = await loop.create_server(self._stream, sock=sock)
        self._servers.append(server)

    async def close(self) -> None:
        """Stop listening and end every connection."""
        for server in self._servers:
            server.close()
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(BaseException):
                await task
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    async def _accept(self, stream: _Stream) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            if self._slots is not None:
                async with self._slots:
                    await self._serve(stream)
            else:
                await self._serve(stream)
        except asyncio.CancelledError:
            # Ended by close() or disconnect(), which wait for us.
            pass
        finally:
            self._connections.discard(task)

    async def _serve(self, writer: _Stream) -> None:
        number = next(self._ids)
        self.clients += 1
        self.served += 1
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        elif sock is not None and sock.family == socket.AF_UNIX:
            # A unix socket's send buffer (~200 KiB) is smaller than a 256 KiB read reply:
            # each big reply was sent in two parts, the rest copied into the transport's buffer
            # meanwhile. TCP sizes its buffers itself.
            with contextlib.suppress(OSError):
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < _SEND_BUFFER:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
        client = _Client(self, writer, log.getChild(f"client{number}"))
        client.task = asyncio.current_task()
        self._active.add(client)
        try:
            await client.run()
        except Exception:  # one broken connection must never stop the server
            client.log.exception("connection failed")
        finally:
            await client.close()
            self._active.discard(client)
            self.clients -= 1
            if self.clients == 0 and self.on_idle is not None:
                self.on_idle()


def _release_ranges(items: Iterable[P.Outgoing]) -> None:
    """Let go the file ranges among ``items`` that will not be sent."""
    for item in items:
        if type(item) is FileRange:
            item.release()


class _Stream(asyncio.BufferedProtocol):
    """One connection's transport: receives into the protocol's buffers, and offers what the
    server used of asyncio's StreamWriter (write, drain, close, wait_closed, start_tls).

    A WRITE's payload is received straight into the request's buffer
    (:meth:`~blockgraph.export.nbd.protocol.ServerConnection.payload_target`): the kernel copies
    it once. A StreamReader copied it three times (into its buffer, out of it, into the
    request's), on the loop's only thread. Everything else lands in a scratch buffer and is
    fed to the protocol from there.

    Reading goes on in the background while the read loop (:meth:`_Client.run`) waits for
    data, and while a payload is being received. When the loop is busy elsewhere (a full
    request window, a backed-up socket, a TLS upgrade) and bytes arrive, one request header at
    most is read and then reading pauses until the loop wants data again: the rest waits in the
    socket, whose buffer holds back the client, and its payload is then received in place.

    Sending (:meth:`send`) on a plain socket writes to the socket itself while the transport
    has nothing buffered: the buffers of several replies in one ``writev``, and the file
    ranges of read replies with ``sendfile``, which copies page-cache pages to the socket
    without the bytes ever coming into this process (QEMU reads them into memory first, then
    sends them: two copies). What the socket does not take at once goes to the transport,
    which buffers it (a file range is read for it), and everything after it too, until the
    transport has sent its buffer: that keeps the order. TLS goes through the transport.
    """

    def __init__(self, accept: Callable[[_Stream], Coroutine[Any, Any, None]]) -> None:
        self._accept = accept
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # connection_made
        self._loop = asyncio.get_running_loop()
        self._conn: P.ServerConnection | None = None
        self._scratch = memoryview(bytearray(_READ_SIZE))
        self._target = 0  # the size of the payload target get_buffer() returned, or 0
        self._target_big = False
        self._header_next = False  # see get_buffer
        self._fed = False  # bytes (or EOF) went to conn since the read loop last looked
        self._eof = False
        self._early = bytearray()  # received before attach() (never, with reading paused)
        self._waiter: asyncio.Future[None] | None = None  # the read loop waits for data
        # The read loop's handler of bytes that arrive while it waits (_Client._on_data): True
        # when it took them itself and waits on.
        self.on_data: Callable[[], bool] | None = None
        self._reading = True
        self._lost = False
        self._lost_error: Exception | None = None
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._task: asyncio.Task[None] | None = None
        # The socket, written to directly (see send); -1: everything goes through the
        # transport (TLS).
        self._fd = -1

    # -- asyncio protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if type(transport) is _PLAIN_TRANSPORT:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                self._fd = sock.fileno()
        # Nothing is read before the read loop asks (a client waiting for a connection slot
        # waits in the socket).
        self.pause_reading()
        self._task = self._loop.create_task(self._accept(self))

    def get_buffer(self, sizehint: int) -> memoryview:
        conn = self._conn
        if conn is not None:
            target = conn.payload_target()
            if target is not None:
                # Only the end of a payload too big for the scratch buffer makes the next
                # read a header's (see below): smaller writes would all be read in two parts
                # then, each part a loop iteration.
                self._target = len(target)
                self._target_big = conn.payload_length >= _READ_SIZE
                return target
        self._target = 0
        if self._header_next or (self._waiter is None and conn is not None):
            # A request header only. Either the read loop is busy (see the class docstring),
            # or a payload just ended in place: the next request is probably another big
            # write, whose payload would otherwise be read into the scratch buffer with its
            # header, and copied from there twice (into the protocol's buffer, then into the
            # request's); the read loop parses the header before the next read.
            return self._scratch[:_HEADER_SIZE]
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        conn = self._conn
        if conn is None:
            self._early += self._scratch[:nbytes]
            return
        if self._target:
            conn.payload_received(nbytes)
            self._header_next = self._target_big and nbytes == self._target
        else:
            conn.receive_data(self._scratch[:nbytes])
            self._header_next = False
        self._fed = True
        waiter = self._waiter
        if waiter is not None:
            if not waiter.done():
                on_data = self.on_data
                # Not once closing: a TLS transport's close() hands over what it decrypted
                # still, and those requests must not start (an export being removed).
                if on_data is not None and not self.transport.is_closing():
                    if on_data():
                        self._fed = False
                        return
                if not waiter.done():  # (whatever on_data ran may have cancelled run())
                    waiter.set_result(None)
        elif conn.payload_target() is None:
            self.pause_reading()

    def eof_received(self) -> bool:
        self._end()
        # Keep the transport open for the replies still due (asyncio's StreamReaderProtocol
        # does the same); TLS cannot half-close.
        return self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._fd = -1  # the socket closes after this returns: its number may come back
        self._lost = True
        self._lost_error = exc
        self._end()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _end(self) -> None:
        if self._eof:
            return
        self._eof = True
        if self._conn is not None:
            self._conn.receive_data(b"")
        self._fed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- the read loop's side ---------------------------------------------------------------------

    def attach(self, conn: P.ServerConnection) -> None:
        """Feed ``conn`` from now on."""
        self._conn = conn
        if self._early:
            conn.receive_data(self._early)
            self._early.clear()
            self._fed = True
        if self._eof:
            conn.receive_data(b"")
            self._fed = True

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self.transport.pause_reading()

    async def received(self) -> None:
        """Return once bytes or EOF went to the connection since the last call."""
        if not self._fed:
            if not self._reading and not self._eof:
                self._reading = True
                self.transport.resume_reading()
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self._fed = False

    # -- what the server used of asyncio.StreamWriter -----------------------------------------------

    @property
    def sends_files(self) -> bool:
        """Whether :meth:`send` takes file ranges (a plain socket, not TLS)."""
        return self._fd >= 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.transport.write(data)

    def send(self, items: list[P.Outgoing]) -> None:
        """Send ``items`` in order; what the socket does not take at once is buffered.

        A caller may reuse a buffer once this returned only where the transport copies what it
        buffers (see ``_COPYING_TRANSPORT``). Every file range is released.
        """
        transport = self.transport
        fd = self._fd
        if fd < 0 or transport.is_closing() or transport.get_write_buffer_size():
            self._to_transport(items, 0)
            return
        count = len(items)
        i = 0
        while i < count:
            item = items[i]
            if type(item) is FileRange:
                try:
                    done = self._sendfile(item)
                except OSError:
                    self._send_failed(items, i)
                    return
                if not done:
                    self._to_transport(items, i)
                    return
                i += 1
                continue
            # The buffers up to the next file range, in one system call.
            j = i + 1
            while j < count and type(items[j]) is not FileRange and j - i < _IOV_MAX:
                j += 1
            try:
                if j == i + 1:
                    sent = os.write(fd, item)  # type: ignore[arg-type]
                else:
                    sent = os.writev(fd, items[i:j])  # type: ignore[arg-type]
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._send_failed(items, i)
                return
            while i < j:
                n = len(items[i])
                if sent < n:
                    break
                sent -= n
                i += 1
            if i < j:
                # The socket is full: the rest goes through the transport.
                if sent:
                    items[i] = memoryview(items[i])[sent:]  # type: ignore[arg-type]
                self._to_transport(items, i)
                return

    def _sendfile(self, piece: FileRange) -> bool:
        """Send ``piece`` from its file; False when the socket did not take all of it (the
        range then holds what is left).

        :raise OSError: the socket failed (the file's errors leave the rest to the copy in
            _to_transport, which reports them).
        """
        try:
            while piece.length:
                n = os.sendfile(self._fd, piece.fd, piece.offset, piece.length)
                if not n:
                    return False  # the file ends early: the copy pads it with zeroes
                piece.offset += n
                piece.length -= n
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            if exc.errno in _SOCKET_GONE:
                raise
            return False
        piece.release()
        return True

    def _send_failed(self, items: list[P.Outgoing], start: int) -> None:
        # The peer is gone: what is left is neither read nor sent, and the connection ends
        # (as asyncio's transport ends it when its own send() fails).
        _release_ranges(itertools.islice(items, start, None))
        self.transport.abort()

    def _to_transport(self, items: list[P.Outgoing], start: int) -> None:
        transport = self.transport
        if transport.is_closing():
            # Nothing more goes out (asyncio's transport drops it too): the files go unread.
            _release_ranges(itertools.islice(items, start, None))
            return
        for item in itertools.islice(items, start, None):
            if type(item) is not FileRange:
                transport.write(item)  # type: ignore[arg-type]
                continue
            try:
                data = item.read()
            except OSError as exc:
                # The reply's header went out already: nothing can be said any more.
                log.warning("Disconnect client, due to: read failed: %s", os.strerror(exc.errno or 0))
                transport.abort()
                _release_ranges(itertools.islice(items, start, None))
                return
            finally:
                item.release()
            transport.write(data)

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def close(self) -> None:
        self.on_data = None  # nothing more is started for this connection (see buffer_updated)
        self.transport.close()

    async def wait_closed(self) -> None:
        await self._closed

    async def drain(self) -> None:
        """As StreamWriter.drain: wait while the transport's buffer is over its high mark.

        :raise ConnectionResetError: the connection is lost.
        """
        if self.transport.is_closing():
            # Let connection_lost() come first (as StreamWriter does): then drain() fails.
            await asyncio.sleep(0)
        if self._lost:
            raise ConnectionResetError("Connection lost")
        if not self._write_paused:
            return
        waiter = self._loop.create_future()
        self._drain_waiters.append(waiter)
        try:
            await waiter
        finally:
            self._drain_waiters.remove(waiter)
        if self._lost_error is not None:
            # Lost with an error while waiting (a clean loss lets the waiter go, as there).
            raise ConnectionResetError(str(self._lost_error))

    async def start_tls(self, context: ssl.SSLContext) -> None:
        """Upgrade to TLS as the server side; this protocol then receives the clear text."""
        await self.drain()
        self._fd = -1  # from now on everything goes through the TLS layer
        transport = await self._loop.start_tls(self.transport, self, context, server_side=True)
        assert transport is not None
        self.transport = transport
        self._reading = transport.is_reading()


class _Client:
    """One connection: feeds the protocol, runs its requests, writes the replies."""

    def __init__(self, server: NBDServer, writer: _Stream, logger: logging.Logger) -> None:
        self.server = server
        self.writer = writer
        self.log = logger
        self._payload_buffers = _PayloadBuffers()
        self.conn = P.ServerConnection(lookup=server._lookup, listing=server._listing,
                                       tls=server.tls_creds is not None,
                                       payload_buffer=self._take_payload_buffer)
        writer.attach(self.conn)
        self.export: NBDExport | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.broken = False
        self.task: asyncio.Task[Any] | None = None
        self._loop = asyncio.get_running_loop()
        self._flush_scheduled = False
        # True while run() starts a request in its own frame (see _start): replies then wait
        # for run()'s next flush instead of scheduling one; _eager_replies bounds how many.
        self._eager = False
        self._eager_replies = 0
        self._slot_waiter: asyncio.Future[None] | None = None
        self._big_reply_lock = asyncio.Lock()
        self._read_buffers = _ReadBuffers()
        self._big_reads = asyncio.Semaphore(_BIG_READS)
        # Requests waiting for a stopped VM to run again (drive exports only), and whether the
        # connection is ending: then such requests are dropped instead of held.
        self.held: set[asyncio.Task[None]] = set()
        self.closing = False
        # What _on_data took and left to run(): an event other than a request, or an error.
        self._pending_event: P.Event | None = None
        self._pending_error: BaseException | None = None

    def _take_payload_buffer(self, size: int) -> bytearray:
        if size < _JOIN_LIMIT:
            return bytearray(size)
        return self._payload_buffers.take(size)

    def flush(self) -> None:
        self._flush_scheduled = False
        self._eager_replies = 0
        if self.broken or self.writer.is_closing():
            _release_ranges(self.conn.data_to_send())
            return
        if self.writer.sends_files:
            out = self.conn.data_to_send()
            if out:
                self.writer.send(out)
            return
        # Small buffers (reply headers, 4 KiB reads, the replies of every request that
        # completed in this loop iteration) are joined into one write: each write() is a
        # send() syscall when the socket is not backed up. Big payloads go out as they are,
        # so they are not copied.
        batch: list[bytes | bytearray | memoryview] = []
        size = 0
        for buf in self.conn.data_to_send():
            assert not isinstance(buf, FileRange)  # mapped only when sends_files
            n = len(buf)
            if n >= _JOIN_LIMIT:
                if batch:
                    self.writer.write(b"".join(batch) if len(batch) > 1 else batch[0])
                    batch, size = [], 0
                self.writer.write(buf)
                continue
            batch.append(buf)
            size += n
            if size >= _JOIN_LIMIT:
                self.writer.write(b"".join(batch))
                batch, size = [], 0
        if batch:
            self.writer.write(b"".join(batch) if len(batch) > 1 else batch[0])

    def _schedule_flush(self) -> None:
        # Replies of requests that complete in the same loop iteration leave in one write.
        if self._eager:
            return  # run() flushes before it waits for anything (see _start)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError):
            self.broken = True

    async def run(self) -> None:
        self.flush()
        await self.drain()
        conn = self.conn
        while True:
            if len(self.tasks) >= MAX_REQUESTS:
                # Checked before parsing, not only before reading: requests already buffered
                # (nbdcopy sends 64 at once) would otherwise all start, each with its buffer.
                # One future that the next finishing request completes: cheaper than
                # asyncio.wait(), which adds and removes a callback on every task each time.
                self.flush()
                self._slot_waiter = self._loop.create_future()
                # (Bytes that arrive meanwhile wait in the socket, see _Stream.get_buffer.)
                try:
                    await self._slot_waiter
                finally:
                    self._slot_waiter = None
                continue
            event: P.Event | P.NeedData | None = self._pending_event
            if event is None:
                event = conn.next_event()
            else:
                self._pending_event = None
            if type(event) is P.Request:
                self._start(event)
            elif isinstance(event, P.NeedData):
                self.flush()
                if self.writer.transport.get_write_buffer_size():  # see the end of the loop
                    await self.drain()
                # The transport feeds conn itself (see _Stream); a lost connection is EOF.
                await self.writer.received()
                error = self._pending_error
                if error is not None:
                    self._pending_error = None
                    raise error
                if self.writer.transport.get_write_buffer_size():
                    # _on_data handed over because the socket is backed up: no request
                    # starts before it took what is buffered (see the end of the loop).
                    await self.drain()
                continue
            elif isinstance(event, P.TransmissionStarted):
                self.export = self.server.exports[event.export.name]
                self.writer.on_data = self._on_data
                self.log.debug("transmission on export %r (structured=%s, contexts=%s)",
                               event.export.name, event.structured, event.contexts)
            elif isinstance(event, P.StartTLS):
                # What the client sends from now on is for the TLS layer.
                self.writer.pause_reading()
                self.flush()
                await self.drain()
                if not await self._start_tls():
                    break
            elif isinstance(event, P.ConnectionClosed):
                if event.reason is not None:
                    self.log.warning("Disconnect client, due to: %s", event.reason)
                break
            # No flush here: replies queued while parsing (errors for invalid requests) go
            # out with the next flush, at the latest before the next read (NeedData above).
            # But no new request starts while the socket is backed up: that would only pile
            # more replies into the transport's buffer (copies, memory). With nothing
            # buffered the transport cannot be paused: no drain() (three coroutines) then.
            if self.writer.transport.get_write_buffer_size():
                await self.drain()
        self.flush()

    def _on_data(self) -> bool:
        """What run() does with bytes that arrive while it waits for them in ``received()``,
        called by the transport as they arrive (during transmission).

        Saves a loop iteration per request (the wake-up of run()'s task): at queue depth 1,
        ~3.5 us of ~21 us CPU per 4 KiB write. Requests start eagerly here as in run() (see
        _start) and their replies go out once the buffer is parsed. Anything else wakes
        run() (False): a full request window, a backed-up socket, an event other than a
        request (left for run() to take), an error (raised by run(), as if it had met it).
        """
        conn = self.conn
        transport = self.writer.transport
        try:
            while len(self.tasks) < MAX_REQUESTS and not transport.get_write_buffer_size():
                event = conn.next_event()
                if type(event) is P.Request:
                    self._start(event)
                elif isinstance(event, P.NeedData):
                    self.flush()
                    return not transport.get_write_buffer_size()
                else:
                    self._pending_event = event
                    return False
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # a cancellation too: run() meets it as it would have
            self._pending_error = exc
        return False

    def _start(self, request: P.Request) -> None:
        """Run ``request`` in this frame as far as it goes without waiting (eager start).

        Most requests (a 4 KiB read or write on raw or a cached qcow2 cluster) never suspend:
        a Task for each cost a Task object, a done callback and two more loop iterations
        (the task's first step, then the scheduled reply flush). Only a request that does
        suspend goes on in a Task (see :class:`_Resumed`), from where it stopped. Replies of
        requests that completed here wait for run()'s next flush, which comes before run()
        waits for anything.

        Requests of an export that is a drive's device always get their own Task from the
        start: they may be held while the VM is stopped, which needs their task's identity
        (close() cancels held tasks). For the same reason nothing on the request path may
        rely on ``asyncio.current_task()`` (``asyncio.timeout`` does): during the first step
        it is the connection's task, or none at all (started from :meth:`_on_data`).
        """
        export = self.export
        assert export is not None
        if export.device is not None:
            task = self._loop.create_task(self._request(request))
        else:
            coro = self._node_request(export, request)
            self._eager = True
            try:
                yielded = coro.send(None)
            except StopIteration:
                # Completed. Bound what waits for run()'s flush (reads of 4 KiB each, when
                # many requests arrived at once).
                self._eager_replies += 1
                if self._eager_replies >= MAX_REQUESTS:
                    self.flush()
                return
            finally:
                self._eager = False
            task = self._loop.create_task(_Resumed(coro, yielded))
        self.tasks.add(task)
        task.add_done_callback(self._request_done)

    async def _start_tls(self) -> bool:
        """Upgrade the connection; False (logged) when the handshake fails."""
        creds = self.server.tls_creds
        assert creds is not None
        if self.broken:
            return False
        try:
            await self.writer.start_tls(creds.context)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            self.broken = True
            self.log.warning("Disconnect client, due to: TLS handshake failed: %s", exc)
            return False
        ssl_object = self.writer.get_extra_info("ssl_object")
        refusal = "No certificate peer" if creds.peer_certificate_missing(ssl_object) else None
        # QEMU checks authz inside its peer-certificate check, which verify-peer=off skips.
        if refusal is None and self.server.tls_authz is not None and creds.verify_peer:
            refusal = self.server.objects.authorize(self.server.tls_authz,
                                                    peer_distinguished_name(ssl_object))
        if refusal is not None:
            # As QEMU: the socket just closes, without a TLS alert.
            self.broken = True
            self.writer.transport.abort()
            self.log.warning("Disconnect client, due to: %s", refusal)
            return False
        self.conn.tls_established()
        return True

    def _request_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        waiter = self._slot_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def close(self) -> None:
        self.closing = True
        if self.tasks:
            # Requests held for a stopped VM would wait for a cont that may never come: they
            # go with the connection, unanswered. Requests doing I/O are never cut short.
            for task in self.held:
                task.cancel()
            # Outstanding requests finish (and are answered) before the socket closes.
            await asyncio.gather(*self.tasks, return_exceptions=True)
        self.flush()
        await self.drain()
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    # -- requests -------------------------------------------------------------------------------

    async def _request(self, request: P.Request) -> None:
        export = self.export
        assert export is not None
        device = export.device
        while True:
            if device is not None and not device.layer.vm_running:
                # A device does no I/O while the VM is stopped.
                if self.closing:
                    return  # the client is gone: dropped, unanswered
                task = asyncio.current_task()
                assert task is not None
                self.held.add(task)
                try:
                    await device.layer.wait_running()
                finally:
                    self.held.discard(task)
            try:
                await COMMAND_HANDLERS[request.command](self, export, request)
            except IOFailure as exc:
                is_read = _POLICY.get(request.command)
                if device is not None and is_read is not None:
                    action = device.handle_io_error(is_read, exc.errno)
                    if action == "stop":
                        continue  # held until cont (or dropped if the client is gone), retried
                    if action == "ignore":
                        self._ignored(request)
                        break
                self.conn.reply_error(request.cookie, P.errno_to_nbd(exc.errno),
                                      _FAILURE_TEXT[request.command])
            except Exception:
                self.log.exception("request %d failed", request.command)
                self.conn.reply_error(request.cookie, P.EIO, _FAILURE_TEXT[request.command])
            break
        await self._completed(request)

    async def _node_request(self, export: NBDExport, request: P.Request) -> None:
        """A request on an export of a node: no error policy applies, failures go to the
        client. Started by :meth:`_start`."""
        try:
            await COMMAND_HANDLERS[request.command](self, export, request)
        except IOFailure as exc:
            self.conn.reply_error(request.cookie, P.errno_to_nbd(exc.errno), _FAILURE_TEXT[request.command])
        except Exception:
            self.log.exception("request %d failed", request.command)
            self.conn.reply_error(request.cookie, P.EIO, _FAILURE_TEXT[request.command])
        # _completed, inline: one coroutine less per request.
        if not self._eager:
            self._schedule_flush()
        if request.command == P.CMD_READ and request.length >= _JOIN_LIMIT:
            await self.drain()

    async def _completed(self, request: P.Request) -> None:
        # Small replies of the requests that complete in this loop iteration leave in one
        # write (an error reply of a big read too). Back-pressure is the read loop's: it drains
        # before reading more requests.
        self._schedule_flush()
        if request.command == P.CMD_READ and request.length >= _JOIN_LIMIT:
            # A big reply went out in _read; the request keeps its slot until the socket
            # took it.
            await self.drain()

    def _ignored(self, request: P.Request) -> None:
        """The ``ignore`` policy: the request completes as if it had succeeded (a read returns
        zeroes where the data could not be read)."""
        if request.command == P.CMD_READ:
            buf = memoryview(bytearray(request.length))
            self.conn.reply_read(request.cookie, request.offset,
                                 [(request.offset, buf)] if request.length else [])
        else:
            self.conn.reply_ok(request.cookie)

    async def _read(self, export: NBDExport, request: P.Request) -> None:
        if request.flags & P.CMD_FLAG_FUA:
            await export.backend.flush()
        runs = await self._runs(export, request)
        if runs is None:
            return
        if request.length < _JOIN_LIMIT:
            await self._read_into(export, request, bytearray(request.length), runs, False)
            return
        if self.writer.sends_files and export.device is None:
            if await self._read_mapped(export.backend, request, runs):
                return
        # Big reads hold their buffers until the socket took them: a few at a time keep the
        # disk busy (reads the page cache cannot serve run in worker threads), more only pile
        # up buffers behind the socket (peak memory).
        async with self._big_reads:
            data = self._read_buffers.take(request.length)
            await self._read_into(export, request, data, runs, True)
            if type(self.writer.transport) is _COPYING_TRANSPORT:
                self._read_buffers.give(data)

    async def _runs(self, export: NBDExport, request: P.Request) -> list[tuple[int, int, bool]] | None:
        """The read's range in runs of (offset, length, reads as zeroes), in order.

        With structured replies (and without DF) runs that read as zeroes become hole chunks,
        without reading them; otherwise the range is one data run. Neighbouring holes are
        merged; data runs are not: each is read on its own, one read per extent as QEMU counts
        them. None: finding the holes failed, and the error is answered.
        """
        if not self.conn.structured or request.flags & P.CMD_FLAG_DF:
            return [(request.offset, request.length, False)]
        runs: list[tuple[int, int, bool]] = []
        pos = request.offset
        end = request.offset + request.length
        while pos < end:
            try:
                status = await chain_status(export.root, pos, end - pos)
            except IOFailure as exc:
                self.conn.reply_error(request.cookie, P.errno_to_nbd(exc.errno), "unable to check for holes")
                return None
            n = min(status.length, end - pos)
            zero = bool(int(status.flags) & _ZERO)  # int: IntFlag's & runs in Python
            if zero and runs and runs[-1][2]:
                runs[-1] = (runs[-1][0], runs[-1][1] + n, zero)
            else:
                runs.append((pos, n, zero))
            pos += n
        return runs

    async def _read_mapped(self, bb: BlockBackend, request: P.Request,
                           runs: list[tuple[int, int, bool]]) -> bool:
        """Answer a big read with the file ranges that hold its data (sent by the kernel from
        the page cache, see _Stream.send); False when no data run maps (nothing was done).

        Mapped once the transport has room, and sent at once: no range is held while this
        waits, so none goes stale (a page evicted meanwhile), and a drain of the BlockBackend
        does not end while a mapped read waits to be sent. The rare run that does not map
        (not all in the page cache) among runs that do is read into memory meanwhile.
        """
        async with self._big_reply_lock:
            await self.drain()
            pieces: list[tuple[int, memoryview | int | FileRange]] = []
            unmapped: list[int] = []
            try:
                for offset, n, zero in runs:
                    mapped = None if zero else bb.map_read(offset, n)
                    if not zero and mapped is None:
                        unmapped.append(len(pieces))
                    pieces.append((offset, n if mapped is None else mapped))
                if not any(type(piece) is FileRange for _, piece in pieces):
                    return False  # nothing mapped: read with a buffer
                for i in unmapped:
                    offset, n = runs[i][:2]
                    buf = memoryview(bytearray(n))
                    await bb.preadv(offset, buf)
                    pieces[i] = (offset, buf)
                self.conn.reply_read(request.cookie, request.offset, pieces)
                self.flush()
            finally:
                # Sent or dropped (a lost connection, a failed read, a cancelled request).
                for _, piece in pieces:
                    if type(piece) is FileRange:
                        piece.release()
        return True

    async def _read_into(self, export: NBDExport, request: P.Request, data: bytearray,
                         runs: list[tuple[int, int, bool]], big: bool) -> None:
        bb = export.backend
        buf = memoryview(data)
        pieces: list[tuple[int, memoryview | int | FileRange]] = []
        for offset, n, zero in runs:
            if zero:
                pieces.append((offset, n))
                continue
            pos = offset - request.offset
            await bb.preadv(offset, buf[pos : pos + n])
            last = pieces[-1] if pieces else None
            if last is not None and isinstance(last[1], memoryview):
                # One chunk for neighbouring data runs: they lie side by side in the buffer.
                pieces[-1] = (last[0], buf[last[0] - request.offset : pos + n])
            elif n:
                pieces.append((offset, buf[pos : pos + n]))
        if not big:
            self.conn.reply_read(request.cookie, request.offset, pieces)
            return
        # A big reply is queued and written only once the transport has room, one at a time:
        # asyncio copies whatever the socket does not take at once into its buffer, and with
        # every finished read writing there at once, that buffer grew to tens of MiB (nbdcopy:
        # ~30 MiB of 80) and cost a copy per reply.
        async with self._big_reply_lock:
            await self.drain()
            self.conn.reply_read(request.cookie, request.offset, pieces)
            self.flush()

    async def _write(self, export: NBDExport, request: P.Request) -> None:
        data = request.data
        assert data is not None
        flags = RequestFlags.FUA if request.flags & P.CMD_FLAG_FUA else RequestFlags.NONE
        await export.backend.pwritev(request.offset, memoryview(data), flags)
        self.conn.reply_ok(request.cookie)
        if len(data) >= _JOIN_LIMIT:
            request.data = None
            self._payload_buffers.give(data)

    async def _write_zeroes(self, export: NBDExport, request: P.Request) -> None:
        flags = RequestFlags.NONE
        if request.flags & P.CMD_FLAG_FUA:
            flags |= RequestFlags.FUA
        if not request.flags & P.CMD_FLAG_NO_HOLE:
            flags |= RequestFlags.MAY_UNMAP
        if request.flags & P.CMD_FLAG_FAST_ZERO:
            flags |= RequestFlags.NO_FALLBACK
        await export.backend.pwrite_zeroes(request.offset, request.length, flags)
        self.conn.reply_ok(request.cookie)

    async def _flush(self, export: NBDExport, request: P.Request) -> None:
        await export.backend.flush()
        self.conn.reply_ok(request.cookie)

    async def _trim(self, export: NBDExport, request: P.Request) -> None:
        await export.backend.pdiscard(request.offset, request.length)
        if request.flags & P.CMD_FLAG_FUA:
            await export.backend.flush()
        self.conn.reply_ok(request.cookie)

    async def _cache(self, export: NBDExport, request: P.Request) -> None:
        # A prefetch, as qemu-nbd does it: copy on read into the export's node, nothing returned.
        if request.length:
            await export.root.prefetch(request.offset, request.length)
        self.conn.reply_ok(request.cookie)

    async def _block_status(self, export: NBDExport, request: P.Request) -> None:
        limit = 1 if request.flags & P.CMD_FLAG_REQ_ONE else P.MAX_BLOCK_STATUS_EXTENTS
        answers = []
        for context_id, name in self.conn.contexts:
            try:
                found = await extents(export.root, request.offset, request.length, name, limit)
            except IOFailure as exc:
                self.conn.reply_error(request.cookie, P.errno_to_nbd(exc.errno), "can't get block status")
                return
            answers.append((context_id, found))
        self.conn.reply_block_status(request.cookie, answers)


class _Resumed(Coroutine[Any, None, None]):
    """A request coroutine whose first step ran outside any task (eager start), as the
    coroutine of the task that runs the rest of it.

    A task's first step hands it what the coroutine yielded in that step: the future it waits
    for (or None for a bare yield), which the task then waits for and resumes the coroutine
    after, as if it had run the step itself. Everything the task sends or throws afterwards
    goes to the coroutine, a cancellation too, even one that comes before the task's first
    step: it reaches the coroutine where it waits, as it would in a task of its own.
    """

    __slots__ = ("_coro", "_first", "_started")

    def __init__(self, coro: Coroutine[Any, None, None], yielded: Any) -> None:
        self._coro = coro
        self._first = yielded
        self._started = False

    def send(self, value: None) -> Any:
        if not self._started:
            self._started = True
            first, self._first = self._first, None
            return first
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        self._started = True
        self._first = None
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, None]:
        raise TypeError("a resumed request runs as a task's coroutine only")


COMMAND_HANDLERS = {
    P.CMD_READ: _Client._read,
    P.CMD_WRITE: _Client._write,
    P.CMD_WRITE_ZEROES: _Client._write_zeroes,
    P.CMD_FLUSH: _Client._flush,
    P.CMD_TRIM: _Client._trim,
    P.CMD_CACHE: _Client._cache,
    P.CMD_BLOCK_STATUS: _Client._block_status,
}

# The requests a device submits and which of its policies applies (True: rerror, a read;
# False: werror). Block status is a query, not I/O: its errors only go to the client.
_POLICY = {
    P.CMD_READ: True,
    P.CMD_CACHE: True,
    P.CMD_WRITE: False,
    P.CMD_WRITE_ZEROES: False,
    P.CMD_TRIM: False,
    P.CMD_FLUSH: False,
}

# QEMU's texts for a command that failed in the block layer.
_FAILURE_TEXT = {
    P.CMD_READ: "reading from file failed",
    P.CMD_WRITE: "writing to file failed",
    P.CMD_WRITE_ZEROES: "writing to file failed",
    P.CMD_FLUSH: "flush failed",
    P.CMD_TRIM: "discard failed",
    P.CMD_CACHE: "reading from file failed",
    P.CMD_BLOCK_STATUS: "can't get block status",
}


def unix_listener(path: str) -> socket.socket:
    """A listening unix socket at ``path`` (replacing a stale socket file)."""
    with contextlib.suppress(FileNotFoundError):
        if os.path.exists(path) and not os.path.isdir(path):
            import stat

            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def inet_listener(host: str, port: str) -> socket.socket:
    """A listening TCP socket on the first address ``host``:``port`` resolves to that binds.

    :raise BlockError: QEMU's texts for a name that does not resolve or a failed bind.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        text = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise BlockError(f"address resolution failed for {host}:{port}: {text}") from None
    last: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    reason = os.strerror(last.errno or 0) if last is not None else "unknown error"
    raise BlockError(f"Failed to bind socket: {reason}")
