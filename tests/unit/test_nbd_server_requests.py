"""How the NBD server runs requests: eagerly in its read loop, in a task only once one suspends.

A request that completes without waiting is run and answered from the read loop itself; one
that waits (here: a file driver held on an event the test controls) goes on in a task, from
where it stopped, and must then behave as it did as a task of its own: answered once it
completes, failures thrown into it answered as errors, cancellation reaching it, at most
``MAX_REQUESTS`` in flight, and the connection closing only after it was answered.

The server runs in this process on a unix socket; the client speaks the wire protocol
directly. Nothing sleeps to synchronise: the test waits for the driver to be entered.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

if str(Path(__file__).resolve().parents[2]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.graphutil import cachestat_works, make_raw  # noqa: E402

from blockgraph.drivers.base import FileRange, RequestFlags  # noqa: E402
from blockgraph.errors import IOFailure  # noqa: E402
from blockgraph.export.nbd import protocol as P  # noqa: E402
from blockgraph.export.nbd import server as S  # noqa: E402
from blockgraph.graph.layer import BlockLayer  # noqa: E402
from blockgraph.graph.node import BlockBackend, Node  # noqa: E402

SIZE = 1 << 20
_REPLY = struct.Struct(">IIQ")


class Client:
    """A bare NBD client: fixed newstyle, no structured replies, simple replies only."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: str, structured: bool = False) -> Client:
        reader, writer = await asyncio.open_unix_connection(path)
        await reader.readexactly(18)  # greeting
        name = b"disk"
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        writer.write(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES))
        if structured:
            writer.write(struct.pack(">QII", P.IHAVEOPT, P.OPT_STRUCTURED_REPLY, 0))
            _magic, _option, reply_type, length = struct.unpack(">QIII", await reader.readexactly(20))
            assert reply_type == P.REP_ACK and length == 0
        writer.write(struct.pack(">QII", P.IHAVEOPT, P.OPT_GO, len(data)) + data)
        while True:
            _magic, _option, reply_type, length = struct.unpack(">QIII", await reader.readexactly(20))
            await reader.readexactly(length)
            if reply_type == P.REP_ACK:
                return cls(reader, writer)
            assert reply_type == P.REP_INFO

    def send(self, cookie: int, command: int, offset: int, length: int, payload: bytes = b"") -> None:
        self.writer.write(P.request_header(cookie, command, offset, length) + payload)

    async def reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        """(cookie, error, data) of the next reply; ``read_length``: data follows a good one."""
        magic, error, cookie = _REPLY.unpack(await self.reader.readexactly(_REPLY.size))
        assert magic == P.SIMPLE_REPLY_MAGIC
        data = await self.reader.readexactly(read_length) if read_length and not error else b""
        return cookie, error, data

    async def chunks(self) -> list[tuple[int, int, bytes | int]]:
        """The structured reply to a READ: (type, offset, data or hole length) per chunk."""
        out: list[tuple[int, int, bytes | int]] = []
        while True:
            magic, flags, kind, _cookie, length = struct.unpack(">IHHQI", await self.reader.readexactly(20))
            assert magic == P.STRUCTURED_REPLY_MAGIC
            payload = await self.reader.readexactly(length)
            if kind == P.REPLY_TYPE_OFFSET_DATA:
                out.append((kind, struct.unpack(">Q", payload[:8])[0], payload[8:]))
            elif kind == P.REPLY_TYPE_OFFSET_HOLE:
                offset, size = struct.unpack(">QI", payload)
                out.append((kind, offset, size))
            else:
                assert kind == P.REPLY_TYPE_NONE, kind
            if flags & P.REPLY_FLAG_DONE:
                return out

    async def close(self) -> None:
        self.send(0, P.CMD_DISC, 0, 0)
        await self.writer.drain()
        assert await self.reader.read() == b""  # the server closes after DISC
        self.writer.close()
        await self.writer.wait_closed()


class Gate:
    """Holds the file driver's writes at offsets in ``held`` until released."""

    def __init__(self, file_node: Node, held: set[int]) -> None:
        self.held = held
        self.entered: asyncio.Queue[int] = asyncio.Queue()
        self.release = asyncio.Event()
        self.fail: IOFailure | None = None
        self.cancelled: list[int] = []
        driver = file_node.driver
        original = driver.pwritev

        async def pwritev(offset: int, buf: memoryview, flags: RequestFlags) -> None:
            if offset in self.held:
                self.entered.put_nowait(offset)
                try:
                    await self.release.wait()
                except asyncio.CancelledError:
                    self.cancelled.append(offset)
                    raise
                if self.fail is not None:
                    raise self.fail
            await original(offset, buf, flags)

        driver.pwritev = pwritev  # type: ignore[method-assign]


async def _serve(tmp_path: Path, test: Callable[[Client, Gate, S.NBDServer, Node], Awaitable[None]],
                 held: set[int] | None = None, structured: bool = False) -> None:
    layer = BlockLayer()
    image = make_raw(tmp_path / "disk.raw", SIZE)
    root = await layer.open_node(image, {"driver": "raw"})
    file_node = root.file
    assert file_node is not None
    backend = BlockBackend(layer, "")
    backend.attach(root)
    server = S.NBDServer([S.NBDExport("disk", backend)])
    sock = str(tmp_path / "sock")
    await server.listen_unix(sock)
    gate = Gate(file_node, held or set())
    client = await Client.connect(sock, structured)
    try:
        await test(client, gate, server, file_node)
    finally:
        gate.release.set()
        await server.close()
        for bb in list(layer.backends):
            bb.attach(None)


def _run(tmp_path: Path, test: Callable[[Client, Gate, S.NBDServer, Node], Awaitable[None]],
         held: set[int] | None = None, structured: bool = False) -> None:
    asyncio.run(_serve(tmp_path, test, held, structured))


def test_eager_requests_answer_while_a_suspended_one_waits(tmp_path: Path) -> None:
    async def test(client: Client, gate: Gate, server: S.NBDServer, file_node: Node) -> None:
        client.send(1, P.CMD_WRITE, 0, 4096, b"\x11" * 4096)  # held in the driver
        client.send(2, P.CMD_WRITE, 8192, 4096, b"\x22" * 4096)
        client.send(3, P.CMD_READ, 8192, 4096)
        assert await gate.entered.get() == 0
        # The read sees the write sent before it, which completed without waiting.
        assert await client.reply() == (2, 0, b"")
        assert await client.reply(4096) == (3, 0, b"\x22" * 4096)
        gate.release.set()
        assert await client.reply() == (1, 0, b"")
        client.send(4, P.CMD_READ, 0, 4096)
        assert await client.reply(4096) == (4, 0, b"\x11" * 4096)
        await client.close()

    _run(tmp_path, test, held={0})


def test_failure_after_suspending_is_answered_as_an_error(tmp_path: Path) -> None:
    async def test(client: Client, gate: Gate, server: S.NBDServer, file_node: Node) -> None:
        client.send(7, P.CMD_WRITE, 4096, 4096, b"\x33" * 4096)
        assert await gate.entered.get() == 4096
        gate.fail = IOFailure(errno.ENOSPC)
        gate.release.set()
        assert await client.reply() == (7, P.ENOSPC, b"")
        await client.close()

    _run(tmp_path, test, held={4096})


def test_suspended_requests_count_against_the_window(tmp_path: Path) -> None:
    held = {i * 4096 for i in range(S.MAX_REQUESTS + 4)}

    async def test(client: Client, gate: Gate, server: S.NBDServer, file_node: Node) -> None:
        for i in range(S.MAX_REQUESTS + 4):
            client.send(100 + i, P.CMD_WRITE, i * 4096, 4096, bytes([i]) * 4096)
        started = [await gate.entered.get() for _ in range(S.MAX_REQUESTS)]
        assert started == [i * 4096 for i in range(S.MAX_REQUESTS)]
        # The rest waits for a slot: a flush (which never suspends) sent now is not parsed yet.
        client.send(999, P.CMD_FLUSH, 0, 0)
        await client.writer.drain()
        assert gate.entered.empty()
        gate.release.set()
        cookies = {(await client.reply())[0] for _ in range(S.MAX_REQUESTS + 5)}
        assert cookies == {100 + i for i in range(S.MAX_REQUESTS + 4)} | {999}
        for i in range(S.MAX_REQUESTS + 4):
            client.send(200 + i, P.CMD_READ, i * 4096, 4096)
            assert await client.reply(4096) == (200 + i, 0, bytes([i]) * 4096)
        await client.close()

    _run(tmp_path, test, held=held)


def test_disconnect_waits_for_the_suspended_request(tmp_path: Path) -> None:
    async def test(client: Client, gate: Gate, server: S.NBDServer, file_node: Node) -> None:
        client.send(5, P.CMD_WRITE, 0, 4096, b"\x44" * 4096)
        client.send(0, P.CMD_DISC, 0, 0)
        assert await gate.entered.get() == 0
        gate.release.set()
        # Answered before the server closes the connection.
        assert await client.reply() == (5, 0, b"")
        assert await client.reader.read() == b""
        with open(file_node.driver.filename() or "", "rb") as f:
            assert f.read(4096) == b"\x44" * 4096

    _run(tmp_path, test, held={0})


def test_closing_the_server_cancels_into_the_suspended_request(tmp_path: Path) -> None:
    async def test(client: Client, gate: Gate, server: S.NBDServer, file_node: Node) -> None:
        client.send(5, P.CMD_WRITE, 0, 4096, b"\x55" * 4096)
        assert await gate.entered.get() == 0
        # Cancelling the request's task (as an event loop shutting down does) must reach the
        # coroutine waiting in the driver.
        (task,) = [t for c in server._active for t in c.tasks]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert gate.cancelled == [0]

    _run(tmp_path, test, held={0})


# -- a resumed coroutine in its task, alone ----------------------------------------------


def _resumed(coro: Coroutine[Any, None, None]) -> S._Resumed:
    """Run ``coro``'s first step outside any task, as the server does; the rest to give a task."""
    return S._Resumed(coro, coro.send(None))


def test_resumed_gets_results_failures_and_bare_yields() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        log: list[object] = []

        async def request(fut: asyncio.Future[int], bad: asyncio.Future[int]) -> None:
            log.append(await fut)
            await asyncio.sleep(0)  # a bare yield
            try:
                await bad
            except OSError as exc:
                log.append(exc.errno)

        fut: asyncio.Future[int] = loop.create_future()
        bad: asyncio.Future[int] = loop.create_future()
        task = loop.create_task(_resumed(request(fut, bad)))
        loop.call_soon(fut.set_result, 42)
        loop.call_soon(loop.call_soon, bad.set_exception, OSError(errno.EIO, "x"))
        await task
        assert log == [42, errno.EIO]

    asyncio.run(main())


@pytest.mark.parametrize("before_first_step", [True, False])
def test_resumed_passes_cancellation_into_the_coroutine(before_first_step: bool) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        seen: list[str] = []

        async def request(fut: asyncio.Future[None]) -> None:
            try:
                await fut
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise

        fut: asyncio.Future[None] = loop.create_future()
        task = loop.create_task(_resumed(request(fut)))
        if not before_first_step:
            await asyncio.sleep(0)  # the task waits for fut now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == ["cancelled"]
        assert fut.cancelled() is not before_first_step

    asyncio.run(main())


@pytest.mark.parametrize("after", [False, True])
def test_eager_request_failures_map_to_nbd_errors(tmp_path: Path, after: bool) -> None:
    """The same errno reaches the client whether the request failed before or after waiting."""
    held = {0} if after else set()

    async def test(client: Client, gate: Gate, server: S.NBDServer, file_node: Node) -> None:
        gate.fail = IOFailure(errno.EDQUOT)
        if not after:
            def failing(offset: int, buf: memoryview, flags: RequestFlags) -> Coroutine[Any, Any, None]:
                async def fail() -> None:
                    raise IOFailure(errno.EDQUOT)
                return fail()
            file_node.driver.pwritev = failing  # type: ignore[method-assign]
        client.send(9, P.CMD_WRITE, 0, 4096, b"\x66" * 4096)
        if after:
            assert await gate.entered.get() == 0
            gate.release.set()
        assert await client.reply() == (9, P.ENOSPC, b"")
        await client.close()

    _run(tmp_path, test, held=held)


def test_unexpected_exception_is_answered_with_eio(tmp_path: Path) -> None:
    async def test(client: Client, gate: Gate, server: S.NBDServer, file_node: Node) -> None:
        async def broken(offset: int, buf: memoryview, flags: RequestFlags) -> None:
            raise ValueError("a bug")
        file_node.driver.pwritev = broken  # type: ignore[method-assign]
        client.send(3, P.CMD_WRITE, 0, 4096, b"\x77" * 4096)
        assert await client.reply() == (3, P.EIO, b"")
        # The connection goes on.
        client.send(4, P.CMD_READ, 0, 4096)
        assert await client.reply(4096) == (4, 0, bytes(4096))
        await client.close()

    _run(tmp_path, test)




def _client_of(server: S.NBDServer) -> Any:
    (client,) = server._active
    return client


def _write_inline(file_node: Node) -> None:
    """Writes of ``file_node`` done in the loop's thread: no worker thread keeps a reference
    to the last buffer it wrote (see _PayloadBuffers)."""
    path = file_node.driver.filename() or ""

    async def pwritev(offset: int, buf: memoryview, flags: RequestFlags) -> None:
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(buf)

    file_node.driver.pwritev = pwritev  # type: ignore[method-assign]


def test_big_write_payload_is_received_in_place_and_its_buffer_reused(tmp_path: Path) -> None:
    size = 256 * 1024

    async def test(client: Client, gate: Gate, server: S.NBDServer, file_node: Node) -> None:
        _write_inline(file_node)
        first = bytes(range(256)) * (size // 256)
        # In pieces: the header, part of the payload, the rest (each drained).
        message = P.request_header(1, P.CMD_WRITE, 0, size) + first
        for start, end in ((0, 28), (28, 1000), (1000, len(message))):
            client.writer.write(message[start:end])
            await client.writer.drain()
        assert await client.reply() == (1, 0, b"")
        buffers = _client_of(server)._payload_buffers
        assert len(buffers.free) == 1  # given back once the write completed
        assert buffers.free[0] == first
        # The next write of that size takes it (else it would still be in the list, beside
        # the new one); nothing of the first payload remains.
        second = b"\x5a" * size
        client.send(2, P.CMD_WRITE, size, size, second)
        assert await client.reply() == (2, 0, b"")
        assert len(buffers.free) == 1 and buffers.free[0] == second
        client.send(3, P.CMD_READ, 0, 2 * size)
        assert await client.reply(2 * size) == (3, 0, first + second)
        await client.close()

    _run(tmp_path, test)


def test_a_held_write_buffer_is_not_reused(tmp_path: Path) -> None:
    size = 128 * 1024
    kept: list[memoryview] = []

    async def test(client: Client, gate: Gate, server: S.NBDServer, file_node: Node) -> None:
        _write_inline(file_node)
        inline = file_node.driver.pwritev

        async def keeping(offset: int, buf: memoryview, flags: RequestFlags) -> None:
            kept.append(buf)  # a node that keeps what it was given
            await inline(offset, buf, flags)

        file_node.driver.pwritev = keeping  # type: ignore[method-assign]
        client.send(1, P.CMD_WRITE, 0, size, b"\x01" * size)
        assert await client.reply() == (1, 0, b"")
        client.send(2, P.CMD_WRITE, size, size, b"\x02" * size)
        assert await client.reply() == (2, 0, b"")
        assert bytes(kept[0]) == b"\x01" * size
        assert bytes(kept[1]) == b"\x02" * size
        client.send(3, P.CMD_READ, 0, 2 * size)
        assert await client.reply(2 * size) == (3, 0, b"\x01" * size + b"\x02" * size)
        await client.close()

    _run(tmp_path, test)


def test_reading_pauses_while_the_window_is_full(tmp_path: Path) -> None:
    held = {i * 4096 for i in range(S.MAX_REQUESTS)}
    size = 128 * 1024

    async def test(client: Client, gate: Gate, server: S.NBDServer, file_node: Node) -> None:
        for i in range(S.MAX_REQUESTS):
            client.send(100 + i, P.CMD_WRITE, i * 4096, 4096, bytes([i]) * 4096)
        for _ in range(S.MAX_REQUESTS):
            await gate.entered.get()
        payload = b"\x77" * size
        client.send(1, P.CMD_WRITE, 512 * 1024, size, payload)
        client.send(2, P.CMD_FLUSH, 0, 0)
        # Let the server's loop (this loop) run: it reads one request header at most and
        # stops reading; the payload waits in the socket.
        for _ in range(20):
            await asyncio.sleep(0)
        conn = _client_of(server).conn
        assert conn.buffered <= P.EXPECT_SIZE[P.Expect.REQUEST_HEADER]
        assert conn.payload_target() is None
        gate.release.set()
        cookies = {(await client.reply())[0] for _ in range(S.MAX_REQUESTS + 2)}
        assert cookies == {100 + i for i in range(S.MAX_REQUESTS)} | {1, 2}
        client.send(3, P.CMD_READ, 512 * 1024, size)
        assert await client.reply(size) == (3, 0, payload)
        await client.close()

    _run(tmp_path, test, held=held)


class _SendfileSpy:
    """Records what os.sendfile was asked and did; ``fallbacks`` counts file ranges that were
    read into memory instead (the socket was full, or the file ended early)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent = 0
        self.partial = 0
        self.fallbacks = 0
        real_sendfile = os.sendfile
        real_read = FileRange.read

        def sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
            try:
                n = real_sendfile(out_fd, in_fd, offset, count)
            except BlockingIOError:
                self.partial += 1
                raise
            self.sent += n
            if n < count:
                self.partial += 1
            return n

        def read_range(piece: FileRange) -> bytearray:
            self.fallbacks += 1
            return real_read(piece)

        monkeypatch.setattr(S.os, "sendfile", sendfile)
        monkeypatch.setattr(FileRange, "read", read_range)


def _skip_without_cachestat(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.write_bytes(b"x")
    if not cachestat_works(probe):
        pytest.skip("no cachestat(2) (Linux < 6.5): reads are never sent with sendfile")


def test_big_reads_are_sent_from_the_page_cache(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    _skip_without_cachestat(tmp_path)
    spy = _SendfileSpy(monkeypatch)
    size = 256 * 1024
    data = os.urandom(size)

    async def test(client: Client, gate: Gate, server: S.NBDServer, file_node: Node) -> None:
        client.send(1, P.CMD_WRITE, 4096, size, data)  # now in the page cache
        assert await client.reply() == (1, 0, b"")
        client.send(2, P.CMD_READ, 4096, size)
        assert await client.reply(size) == (2, 0, data)
        # Small reads are read into memory and joined with other replies.
        client.send(3, P.CMD_READ, 4096, 4096)
        assert await client.reply(4096) == (3, 0, data[:4096])
        await client.close()

    _run(tmp_path, test)
    assert spy.sent == size and spy.fallbacks == 0


def test_replies_stay_whole_and_in_order_when_the_socket_fills(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _skip_without_cachestat(tmp_path)
    spy = _SendfileSpy(monkeypatch)
    data = os.urandom(SIZE)
    count = 16  # 16 MiB of replies: far more than a unix socket's buffer

    async def test(client: Client, gate: Gate, server: S.NBDServer, file_node: Node) -> None:
        client.send(1, P.CMD_WRITE, 0, SIZE, data)
        assert await client.reply() == (1, 0, b"")
        for i in range(count):
            client.send(100 + i, P.CMD_READ, 0, SIZE)
        # The server answers them in its own turn of the loop, before this client reads any:
        # the socket fills, and what it does not take goes through the transport.
        for i in range(count):
            assert await client.reply(SIZE) == (100 + i, 0, data)
        await client.close()

    _run(tmp_path, test)
    assert spy.fallbacks >= 1
    assert spy.sent + spy.fallbacks * SIZE >= count * SIZE


def test_data_runs_outside_the_page_cache_are_read_and_counted_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _skip_without_cachestat(tmp_path)
    spy = _SendfileSpy(monkeypatch)
    run = 64 * 1024
    first, second = os.urandom(run), os.urandom(run)

    async def test(client: Client, gate: Gate, server: S.NBDServer, file_node: Node) -> None:
        # data, hole, data; the second run's pages leave the page cache.
        path = file_node.driver.filename() or ""
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, first, 0)
            os.pwrite(fd, second, 2 * run)
            os.fsync(fd)
            os.posix_fadvise(fd, 2 * run, run, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        (client_state,) = server._active
        backend = client_state.export.backend
        before = backend.stats.rd_operations, backend.stats.rd_bytes
        client.send(7, P.CMD_READ, 0, 3 * run)
        assert await client.chunks() == [(P.REPLY_TYPE_OFFSET_DATA, 0, first),
                                         (P.REPLY_TYPE_OFFSET_HOLE, run, run),
                                         (P.REPLY_TYPE_OFFSET_DATA, 2 * run, second)]
        # One read per data run: the mapped one and the one read into memory.
        assert (backend.stats.rd_operations - before[0], backend.stats.rd_bytes - before[1]) \
            == (2, 2 * run)
        await client.close()

    _run(tmp_path, test, structured=True)
    assert spy.sent == run and spy.fallbacks == 0


def test_a_file_range_past_the_end_of_its_file_is_sent_as_zeroes(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"\x07" * 6000)
    released: list[int] = []

    async def test() -> bytes:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()

        async def accept(stream: S._Stream) -> None:
            return None

        stream = S._Stream(accept)
        await loop.create_unix_connection(lambda: stream, sock=ours)
        assert stream.sends_files
        fd = os.open(path, os.O_RDONLY)
        # The file shrank after the range was made: what it no longer has reads as zeroes.
        stream.send([b"head", FileRange(fd, 4096, 8192, lambda: released.append(fd)),
                     b"tail"])
        stream.close()
        await stream.wait_closed()
        os.close(fd)
        received = bytearray()
        while chunk := theirs.recv(65536):
            received += chunk
        theirs.close()
        return bytes(received)

    received = asyncio.run(test())
    assert received == b"head" + b"\x07" * (6000 - 4096) + bytes(8192 - (6000 - 4096)) + b"tail"
    assert len(released) == 1


# -- bytes taken while the read loop waits ---------------------------------------------------


def test_requests_at_queue_depth_one_do_not_wake_the_read_loop(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Requests that arrive while run() waits for data are started and answered from the
    # transport's callback (_Client._on_data): run()'s task is not woken for each of them.
    wakeups = [0]
    original = S._Stream.received

    async def counting(self: S._Stream) -> None:
        await original(self)
        wakeups[0] += 1

    monkeypatch.setattr(S._Stream, "received", counting)

    async def test(client: Client, gate: Gate, server: S.NBDServer, file_node: Node) -> None:
        before = wakeups[0]
        for i in range(20):
            client.send(i, P.CMD_WRITE, i * 4096, 4096, bytes([i + 1]) * 4096)
            assert await client.reply() == (i, 0, b"")
        for i in range(20):
            client.send(100 + i, P.CMD_READ, i * 4096, 4096)
            assert await client.reply(4096) == (100 + i, 0, bytes([i + 1]) * 4096)
        assert wakeups[0] - before <= 1
        await client.close()

    _run(tmp_path, test)


def test_requests_then_disconnect_in_one_batch(tmp_path: Path) -> None:
    # The batch is parsed outside run(): the requests are answered, the disconnect that
    # follows them is left to run(), which then closes the connection.
    async def test(client: Client, gate: Gate, server: S.NBDServer, file_node: Node) -> None:
        client.writer.write(P.request_header(1, P.CMD_WRITE, 0, 4096) + b"\x99" * 4096
                            + P.request_header(2, P.CMD_READ, 0, 4096)
                            + P.request_header(0, P.CMD_DISC, 0, 0))
        # (A disconnect that run() never took would leave the socket open: bounded waits.)
        assert await asyncio.wait_for(client.reply(), 30) == (1, 0, b"")
        assert await asyncio.wait_for(client.reply(4096), 30) == (2, 0, b"\x99" * 4096)
        assert await asyncio.wait_for(client.reader.read(), 30) == b""

    _run(tmp_path, test)


def test_a_bug_while_run_waits_ends_the_connection_as_in_run(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    # An unexpected exception where run() would have met it (here: starting a request) ends
    # the connection as it did from run(): logged as a failed connection, the socket closed.
    def broken(self: Any, request: P.Request) -> None:
        raise RuntimeError("a bug")

    async def test(client: Client, gate: Gate, server: S.NBDServer, file_node: Node) -> None:
        monkeypatch.setattr(S._Client, "_start", broken)
        client.send(1, P.CMD_WRITE, 0, 4096, b"\x01" * 4096)
        assert await asyncio.wait_for(client.reader.read(), 30) == b""

    _run(tmp_path, test)
    assert any("connection failed" in r.getMessage() and r.exc_info is not None
               and "a bug" in str(r.exc_info[1]) for r in caplog.records)


def test_bytes_handed_over_while_closing_start_no_request(tmp_path: Path) -> None:
    # A TLS transport's close() passes on what it decrypted still, from inside close(): when
    # an export is being removed (disconnect), those requests must not start. Simulated on a
    # plain transport, whose close() is wrapped to hand over a WRITE the same way.
    async def test(client: Client, gate: Gate, server: S.NBDServer, file_node: Node) -> None:
        client.send(1, P.CMD_WRITE, 0, 4096, b"\x01" * 4096)
        assert await client.reply() == (1, 0, b"")
        stream = _client_of(server).writer
        transport = stream.transport
        real_close = transport.close
        late = P.request_header(2, P.CMD_WRITE, 0, 4096) + b"\x02" * 4096

        def close() -> None:
            target = stream.get_buffer(len(late))
            target[: len(late)] = late
            stream.buffer_updated(len(late))
            real_close()

        transport.close = close  # type: ignore[method-assign]
        export = server.exports["disk"]
        for task in server.disconnect(export):
            with contextlib.suppress(BaseException):
                await task
        with open(file_node.driver.filename() or "", "rb") as f:
            assert f.read(4096) == b"\x01" * 4096

    _run(tmp_path, test)
