"""Big file I/O in worker threads (QEMU's aio=threads): the fd an operation runs on stays open
until it finished, whatever closes or reopens the node meanwhile; a cancelled request still
waits for its operation; size changes wait for writes in flight; the pool survives a fork.

An operation is held inside its worker thread by a gate (a threading.Event) wrapped around the
module's blocking function, so that the test knows it is in flight.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

if str(Path(__file__).resolve().parents[2]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from blockgraph.drivers import file as file_mod  # noqa: E402
from blockgraph.drivers import workers  # noqa: E402
from blockgraph.drivers.base import BlockStatusFlags, RequestFlags  # noqa: E402
from blockgraph.drivers.file import OFFLOAD_MIN, FileDriver  # noqa: E402
from blockgraph.graph.layer import BlockLayer  # noqa: E402
from blockgraph.graph.node import Node  # noqa: E402
from blockgraph.graph.reopen import reopen  # noqa: E402

BIG = max(OFFLOAD_MIN, 256 * 1024)
TIMEOUT = 30


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "img"
    path.write_bytes(bytes(4 * BIG))
    return path


def _open(layer: BlockLayer, path: Path, **options: Any) -> tuple[Node, FileDriver]:
    node = layer.run(layer.open_node(str(path), {"driver": "file", **options}))
    assert isinstance(node.driver, FileDriver)
    return node, node.driver


class _Gate:
    """Wraps a blocking function of the file module: the call signals that it started, then
    waits until the test opens the gate."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()
        self.fds: list[int] = []
        real: Callable[..., Any] = getattr(file_mod, name)

        def gated(fd: int, *args: Any) -> Any:
            self.fds.append(fd)
            self.entered.set()
            assert self.open.wait(TIMEOUT)
            return real(fd, *args)

        monkeypatch.setattr(file_mod, name, gated)

    def wait_entered(self) -> None:
        assert self.entered.wait(TIMEOUT)


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


async def _until_entered(gate: _Gate) -> None:
    # Let the request start (it submits its job and waits), then wait for the worker.
    await asyncio.sleep(0)
    await asyncio.get_running_loop().run_in_executor(None, gate.wait_entered)


def test_big_requests_round_trip(layer: BlockLayer, image: Path) -> None:
    _, drv = _open(layer, image)
    data = os.urandom(BIG)
    layer.run(drv.pwritev(BIG, memoryview(data), RequestFlags.NONE))
    out = bytearray(BIG)
    layer.run(drv.preadv(BIG, memoryview(out), RequestFlags.NONE))
    assert out == data
    # Past the end: the file grows; the size cache follows the write done in a thread.
    layer.run(drv.pwritev(4 * BIG, memoryview(data), RequestFlags.NONE))
    assert drv.getlength() == os.path.getsize(image) == 5 * BIG
    # A read that runs past the end gets zeroes there.
    out = bytearray(2 * BIG)
    layer.run(drv.preadv(4 * BIG, memoryview(out), RequestFlags.NONE))
    assert out == data + bytes(BIG)


def test_uncached_read_goes_to_a_thread(layer: BlockLayer, image: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Reads try RWF_NOWAIT inline first; what the page cache does not hold is read by a worker.
    data = os.urandom(BIG)
    with open(image, "r+b") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    used: list[int] = []
    real = file_mod._read_full

    def counting(fd: int, offset: int, buf: memoryview) -> int:
        used.append(threading.get_ident())
        return real(fd, offset, buf)

    monkeypatch.setattr(file_mod, "_read_full", counting)
    _, drv = _open(layer, image)
    out = bytearray(BIG)
    layer.run(drv.preadv(0, memoryview(out), RequestFlags.NONE))
    assert out == data
    if os.path.exists("/proc/sys/vm/drop_caches") and used:
        assert threading.get_ident() not in used


def test_close_while_write_in_flight(layer: BlockLayer, image: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    node, drv = _open(layer, image)
    gate = _Gate(monkeypatch, "_write_full")
    data = os.urandom(BIG)
    other = tmp_path / "other"
    other.write_bytes(bytes(BIG))

    async def scenario() -> None:
        write = asyncio.create_task(drv.pwritev(0, memoryview(data), RequestFlags.NONE))
        await _until_entered(gate)
        fd = gate.fds[0]
        await drv.close()
        # The write still holds the fd: it is open, and a new open cannot get its number.
        assert _fd_open(fd)
        new_fd = os.open(other, os.O_RDWR)
        try:
            assert new_fd != fd
            gate.open.set()
            await write
        finally:
            os.close(new_fd)
        # The last user closed it.
        assert not _fd_open(fd) or fd == new_fd

    layer.run(scenario())
    assert image.read_bytes()[:BIG] == data
    assert other.read_bytes() == bytes(BIG)
    node.driver = FileDriver()  # closed already: nothing for the layer to close


def test_reopen_while_read_in_flight(layer: BlockLayer, image: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(BIG)
    image.write_bytes(data + bytes(3 * BIG))
    node, drv = _open(layer, image, **{"cache.direct": "on"})
    gate = _Gate(monkeypatch, "_read_direct")
    out = bytearray(BIG)

    async def scenario() -> None:
        read = asyncio.create_task(drv.preadv(0, memoryview(out), RequestFlags.NONE))
        await _until_entered(gate)
        old = gate.fds[0]
        await reopen(node, {"cache.direct": "off"})
        assert drv.fd != old
        assert _fd_open(old)  # retired, but the read still uses it
        gate.open.set()
        await read
        assert not _fd_open(old) or old == drv.fd

    layer.run(scenario())
    assert out == data


def test_cancelled_request_waits_for_its_write(layer: BlockLayer, image: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _, drv = _open(layer, image)
    gate = _Gate(monkeypatch, "_write_full")
    data = os.urandom(BIG)

    async def scenario() -> None:
        write = asyncio.create_task(drv.pwritev(0, memoryview(data), RequestFlags.NONE))
        await _until_entered(gate)
        write.cancel()
        for _ in range(5):
            await asyncio.sleep(0)
        assert not write.done()  # the operation still runs: the request is not over
        gate.open.set()
        with pytest.raises(asyncio.CancelledError):
            await write

    layer.run(scenario())
    assert image.read_bytes()[:BIG] == data


def test_truncate_waits_for_writes_in_flight(layer: BlockLayer, image: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _, drv = _open(layer, image)
    gate = _Gate(monkeypatch, "_write_full")
    data = os.urandom(BIG)

    async def scenario() -> None:
        write = asyncio.create_task(drv.pwritev(4 * BIG, memoryview(data), RequestFlags.NONE))
        await _until_entered(gate)
        shrink = asyncio.create_task(drv.truncate(BIG))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not shrink.done()
        gate.open.set()
        await write
        await shrink

    layer.run(scenario())
    # The write landed first, the truncate cut it off: the size is the truncate's.
    assert os.path.getsize(image) == BIG
    assert drv.getlength() == BIG


def test_size_cache_after_zero_write_beyond_end(layer: BlockLayer, image: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # A zero write past the end grows the file by ftruncate: it must not cut off a write in
    # flight that extends the file further.
    _, drv = _open(layer, image)
    gate = _Gate(monkeypatch, "_write_full")
    data = os.urandom(BIG)

    async def scenario() -> None:
        write = asyncio.create_task(drv.pwritev(6 * BIG, memoryview(data), RequestFlags.NONE))
        await _until_entered(gate)
        zero = asyncio.create_task(drv.pwrite_zeroes(5 * BIG, 4096, RequestFlags.NONE))
        for _ in range(5):
            await asyncio.sleep(0)
        gate.open.set()
        await write
        await zero

    layer.run(scenario())
    assert os.path.getsize(image) == 7 * BIG
    assert drv.getlength() == 7 * BIG
    assert image.read_bytes()[6 * BIG:] == data


def test_block_status_cache_forgets_discarded_data(layer: BlockLayer, image: Path) -> None:
    _, drv = _open(layer, image, discard="unmap")
    data = os.urandom(BIG)
    layer.run(drv.pwritev(0, memoryview(data), RequestFlags.NONE))
    layer.run(drv.flush_to_disk())
    status = layer.run(drv.block_status(0, BIG))
    if not status.flags & BlockStatusFlags.DATA:
        pytest.skip("the file system reports no data extents")
    layer.run(drv.pdiscard(0, BIG))
    status = layer.run(drv.block_status(0, BIG))
    assert status.flags & BlockStatusFlags.ZERO
    layer.run(drv.pwritev(0, memoryview(data), RequestFlags.NONE))
    layer.run(drv.block_status(0, BIG))
    layer.run(drv.pwrite_zeroes(0, BIG, RequestFlags.MAY_UNMAP))
    assert layer.run(drv.block_status(0, BIG)).flags & BlockStatusFlags.ZERO


def test_pool_works_in_a_forked_child(layer: BlockLayer, image: Path) -> None:
    _, drv = _open(layer, image)
    data = os.urandom(BIG)
    layer.run(drv.pwritev(0, memoryview(data), RequestFlags.NONE))  # the pool exists now
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        status = 1
        try:
            signal.alarm(TIMEOUT)  # a pool whose threads stayed in the parent would hang
            out = bytearray(BIG)

            async def child() -> None:
                await workers.run(file_mod._read_full, drv.fd, 0, memoryview(out))

            asyncio.run(child())
            status = 0 if out == data else 2
        finally:
            os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0
