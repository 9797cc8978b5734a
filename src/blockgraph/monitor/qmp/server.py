"""QMP over asyncio: a monitor on a chardev (a socket or stdio), one :class:`QMPConnection`
per client.

Thin by design: read bytes, hand them to the protocol core, run the commands it yields one
after the other (QEMU's in-band commands never overlap), write what comes back. A socket
chardev serves its clients one at a time, as QEMU's monitor does: the next client waits in the
listen backlog until the previous one has gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Awaitable, Callable

from blockgraph.errors import BlockError
from blockgraph.monitor.chardev import Chardev
from blockgraph.monitor.qmp.commands import QMPMonitor
from blockgraph.monitor.qmp.protocol import Command, QMPConnection
from blockgraph.monitor.readline import Readline
from blockgraph.version import QEMU_VERSION_STRING

log = logging.getLogger(__name__)

__all__ = ["QMPServer"]

_READ_SIZE = 65536


class QMPServer:
    """Serves ``monitor`` to any number of clients.

    :param monitor: the command table and graph every session shares.
    :param package: the ``package`` string of the greeting.
    """

    def __init__(self, monitor: QMPMonitor, *, package: str | None = None) -> None:
        self.monitor = monitor
        self.package = package
        self.quit = asyncio.Event()
        self._chardevs: list[Chardev] = []
        self._loops: set[asyncio.Task[None]] = set()
        self._quitting_writers: list[asyncio.StreamWriter] = []
        # Descriptors of connections whose client sent quit, left for the process exit.
        self.held_connections: list[int] = []
        previous = monitor.on_quit

        def on_quit() -> None:
            previous()
            self.quit.set()

        monitor.on_quit = on_quit

    async def session(self, read: Callable[[], Awaitable[bytes]],
                      write: Callable[[bytes], None],
                      drain: Callable[[], Awaitable[None]], *, pretty: bool = False) -> None:
        """Run one client session until it disconnects or ``quit`` is accepted."""
        conn = QMPConnection(self.monitor.command_names(), package=self.package, pretty=pretty)
        session_log = log.getChild(str(id(conn)))

        def on_event(name: str, data: dict[str, object] | None) -> None:
            write(conn.send_event(name, data))

        self.monitor.listeners.append(on_event)
        try:
            write(conn.greeting())
            await drain()
            while not self.quit.is_set():
                data = await read()
                if not data:
                    break
                for event in conn.receive_data(data):
                    if isinstance(event, Command):
                        write(await self._execute(conn, event, session_log))
                    else:
                        write(event.data)
                    if self.monitor.quitting:
                        break
                await drain()
                if self.monitor.quitting:
                    break
        finally:
            self.monitor.listeners.remove(on_event)
            conn.close()

    async def _execute(self, conn: QMPConnection, command: Command,
                       session_log: logging.Logger) -> bytes:
        try:
            value = await self.monitor.execute(command.name, command.arguments)
        except BlockError as exc:
            return conn.send_error(command, exc.qmp_class, exc.desc)
        except Exception as exc:  # a bug must not take the session down
            session_log.exception("command %s failed", command.name)
            return conn.send_error(command, "GenericError", str(exc) or type(exc).__name__)
        return conn.send_return(command, value)

    # -- chardevs -----------------------------------------------------------------------------

    def serve_chardev(self, chardev: Chardev, *, pretty: bool = False,
                      hmp: Callable[[str], Awaitable[str]] | None = None) -> None:
        """Serve QMP on ``chardev`` (already open) from now on, in the background; with
        ``hmp`` (a human monitor's ``execute``), serve that human monitor there instead.

        A stdio session that ends (end of input or ``quit``) ends the process, as it does in
        QEMU's ``-qmp stdio``.
        """
        chardev.in_use = True
        self._chardevs.append(chardev)
        if chardev.backend == "stdio":
            assert hmp is None, "the human monitor on stdio is the front end's"
            task = asyncio.ensure_future(self.serve_stdio(pretty=pretty))
        elif hmp is None:
            task = asyncio.ensure_future(
                self._accept_loop(chardev, lambda r, w: self._client(r, w, pretty)))
        else:
            task = asyncio.ensure_future(
                self._accept_loop(chardev, lambda r, w: self._hmp_client(r, w, hmp)))
        self._loops.add(task)
        task.add_done_callback(self._loops.discard)

    async def _accept_loop(
        self, chardev: Chardev,
        client: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    ) -> None:
        loop = asyncio.get_running_loop()
        while not self.quit.is_set():
            sock = chardev.first
            chardev.first = None
            if sock is None:
                if chardev.listener is None:
                    return  # a client-mode socket serves its one connection
                try:
                    sock, _ = await loop.sock_accept(chardev.listener)
                except OSError:
                    return
            chardev.connected(sock)
            try:
                sock.setblocking(False)
                reader, writer = await asyncio.open_connection(sock=sock)
                try:
                    await client(reader, writer)
                finally:
                    await self._hang_up(writer)
            finally:
                chardev.disconnected()

    async def _hang_up(self, writer: asyncio.StreamWriter) -> None:
        if self.monitor.quitting:
            # As in QEMU, the client that sent quit sees the connection end only when the
            # process exits (see close()), not right after the reply: clients such as
            # qemu.qmp disconnect cleanly only if they get there first.
            self._quitting_writers.append(writer)
            return
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, asyncio.CancelledError):
            pass

    async def _hmp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          execute: Callable[[str], Awaitable[str]]) -> None:
        """A human monitor session: QEMU's greeting, its line editor, its prompt."""
        editor = Readline()

        def send(data: bytes) -> None:
            # QEMU's monitor sends every line end as CR LF.
            if data and not writer.is_closing():
                writer.write(data.replace(b"\n", b"\r\n"))

        send(f"QEMU {QEMU_VERSION_STRING} monitor - type 'help' for more information\n".encode()
             + editor.prompt())
        while not self.quit.is_set():
            try:
                data = await reader.read(_READ_SIZE)
            except ConnectionError:
                data = b""
            if not data:
                return
            for ch in data:
                echo, line = editor.feed_byte(ch)
                send(echo)
                if line is None:
                    continue
                # Bytes that are not UTF-8 go through unchanged, as QEMU prints them back.
                command = line.decode("utf-8", "surrogateescape")
                if command.strip():
                    send((await execute(command)).encode("utf-8", "surrogateescape"))
                if self.monitor.quitting or self.quit.is_set():
                    return
                send(editor.prompt())
            try:
                await writer.drain()
            except ConnectionError:
                return

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      pretty: bool) -> None:
        async def read() -> bytes:
            try:
                return await reader.read(_READ_SIZE)
            except ConnectionError:
                return b""

        def write(data: bytes) -> None:
            if data and not writer.is_closing():
                writer.write(data)

        async def drain() -> None:
            try:
                await writer.drain()
            except ConnectionError:
                pass

        await self.session(read, write, drain, pretty=pretty)

    # -- stdio ----------------------------------------------------------------------------------

    async def serve_stdio(self, *, pretty: bool = False) -> None:
        """Serve one session on stdin/stdout; return when it ends (and set :attr:`quit`)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        fd = sys.stdin.fileno()

        def reader() -> None:
            # A thread, so that stdin may be a pipe, a tty or a regular file alike.
            while True:
                try:
                    data = os.read(fd, _READ_SIZE)
                except OSError:
                    data = b""
                loop.call_soon_threadsafe(queue.put_nowait, data)
                if not data:
                    return

        threading.Thread(target=reader, name="qmp-stdin", daemon=True).start()
        out = sys.stdout.buffer
        gone = False

        def write(data: bytes) -> None:
            nonlocal gone
            if data and not gone:
                try:
                    out.write(data)
                    out.flush()
                except OSError:
                    # The reader went away (a closed pipe): QEMU carries on silently.
                    gone = True

        async def drain() -> None:
            return None

        await self.session(queue.get, write, drain, pretty=pretty)
        self.quit.set()

    # -- shutdown -------------------------------------------------------------------------------

    async def close(self) -> None:
        """End every session, stop listening, remove the unix socket files."""
        for task in list(self._loops):
            task.cancel()
        for task in list(self._loops):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        for chardev in self._chardevs:
            chardev.close()
        self._chardevs.clear()
        for writer in self._quitting_writers:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                # A duplicate of the descriptor keeps the connection open until the process
                # exits; the operating system closes it then.
                with contextlib.suppress(OSError):
                    self.held_connections.append(os.dup(sock.fileno()))
            writer.close()
        self._quitting_writers.clear()
