"""QMP over asyncio: unix socket servers and stdio, one :class:`QMPConnection` per client.

Thin by design: read bytes, hand them to the protocol core, run the commands it yields one
after the other (QEMU's in-band commands never overlap), write what comes back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import Awaitable, Callable

from blockgraph.errors import BlockError
from blockgraph.monitor.qmp.commands import QMPMonitor
from blockgraph.monitor.qmp.protocol import Command, QMPConnection

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
        self._servers: list[tuple[asyncio.AbstractServer, str]] = []
        self._sessions: set[asyncio.Task[None]] = set()
        previous = monitor.on_quit

        def on_quit() -> None:
            previous()
            self.quit.set()

        monitor.on_quit = on_quit

    async def session(self, read: Callable[[], Awaitable[bytes]],
                      write: Callable[[bytes], None],
                      drain: Callable[[], Awaitable[None]]) -> None:
        """Run one client session until it disconnects or ``quit`` is accepted."""
        conn = QMPConnection(self.monitor.command_names(), package=self.package)
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

    # -- unix sockets ---------------------------------------------------------------------------

    async def serve_unix(self, path: str) -> None:
        """Listen on the unix socket ``path`` (an existing file there is replaced, as QEMU does).

        Returns once the socket accepts connections.
        """
        if os.path.exists(path):
            os.unlink(path)
        server = await asyncio.start_unix_server(self._client, path)
        self._servers.append((server, path))

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)

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

        try:
            await self.session(read, write, drain)
        finally:
            self._sessions.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, asyncio.CancelledError):
                pass

    # -- stdio ----------------------------------------------------------------------------------

    async def serve_stdio(self) -> None:
        """Serve one session on stdin/stdout; return when it ends."""
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

        def write(data: bytes) -> None:
            if data:
                out.write(data)
                out.flush()

        async def drain() -> None:
            return None

        await self.session(queue.get, write, drain)
        self.quit.set()

    # -- shutdown -------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop listening, end every session, remove the socket files."""
        for server, path in self._servers:
            server.close()
            try:
                os.unlink(path)
            except OSError:
                pass
        for task in list(self._sessions):
            task.cancel()
        for server, _ in self._servers:
            await server.wait_closed()
        self._servers.clear()
