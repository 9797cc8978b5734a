"""``BLOCK_IO_ERROR`` and the rerror/werror policies on NBD exports of drives.

A blockgraph addition (QEMU 7.2 applies the policies only in guest devices, and
qemu-storage-daemon has neither devices nor ``--drive``): an export of a ``--drive`` made by
the drive's id acts as that drive's device. Errors are injected with blkdebug; the NBD client
is python libnbd. Every case checks the events, what the client got, the run state and
``io-status``; the ``stop`` cases check that requests are held until ``cont`` and then complete.
An export of a node (``--blockdev``, or the drive's node by its node name) keeps QEMU's
behaviour: the client gets the error, no event is emitted.

Nothing waits for time: the daemon gets already listening sockets (QMP and NBD), events are
read until the one expected, and the absence of an event is checked on the QMP stream after
a later command's reply (the daemon emits an I/O error event before it answers the client).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.append("/usr/lib/python3/dist-packages")
nbd = pytest.importorskip("nbd")

SRC = str(Path(__file__).resolve().parents[2] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC}
DAEMON = [sys.executable, "-m", "blockgraph", "storage-daemon"]
SIZE = 1 << 20


def _blkdebug(image: Path, event: str, error: int, once: bool) -> str:
    return ("file.driver=blkdebug,file.node-name=dbg,file.config=/dev/null,"
            f"file.inject-error.0.event={event},file.inject-error.0.errno={error},"
            f"file.inject-error.0.once={'on' if once else 'off'},"
            f"file.image.driver=file,file.image.filename={image}")


class _Daemon:
    """A daemon (or system emulator) started with an already listening QMP socket: the QMP
    session to it, the events seen so far, NBD clients of its export ``disk``."""

    def __init__(self, proc: subprocess.Popen[bytes], qmp_path: Path, nbd_path: Path) -> None:
        self.proc = proc
        self.nbd_path = str(nbd_path)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)  # a bound on a missing message, never a synchronisation delay
        self.sock.connect(str(qmp_path))
        self.stream = self.sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        assert "QMP" in self._message()
        self.command("qmp_capabilities")

    def _message(self) -> dict[str, Any]:
        line = self.stream.readline()
        assert line, "the daemon closed QMP"
        message = json.loads(line)
        assert isinstance(message, dict)
        return message

    def command(self, execute: str, /, **arguments: object) -> Any:
        """Run a command; events that come before its reply are kept in :attr:`events`."""
        self.sock.sendall(json.dumps({"execute": execute, "arguments": arguments}).encode())
        while True:
            message = self._message()
            if "event" in message:
                message.pop("timestamp")
                self.events.append(message)
            elif "error" in message:
                raise AssertionError(message["error"])
            else:
                return message["return"]

    def wait_event(self, name: str) -> dict[str, Any]:
        """The next event called ``name`` (events before it are kept too)."""
        for event in self.events:
            if event["event"] == name:
                self.events.remove(event)
                return event
        while True:
            message = self._message()
            assert "event" in message, message
            message.pop("timestamp")
            if message["event"] == name:
                return message
            self.events.append(message)

    def client(self) -> Any:
        handle = nbd.NBD()
        handle.set_export_name("disk")
        handle.connect_unix(self.nbd_path)
        return handle

    def io_status(self) -> str | None:
        blocks = self.command("query-block")
        assert [b["device"] for b in blocks] == ["d0"]
        status = blocks[0].get("io-status")
        assert status is None or isinstance(status, str)
        return status

    def quit(self) -> None:
        self.command("quit")
        assert self.proc.wait(timeout=60) == 0
        self.stream.close()
        self.sock.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stream.close()
        self.sock.close()


@pytest.fixture
def image(tmp_path: Path) -> Iterator[Path]:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None and os.environ.get("BLOCKGRAPH_REQUIRE_ORACLES"):
        pytest.fail("qemu-img is required (BLOCKGRAPH_REQUIRE_ORACLES is set)")
    path = tmp_path / "d.raw"
    path.write_bytes(b"\0" * SIZE)
    yield path


def _drive(image: Path, policy: str, event: str, error: int, once: bool = False) -> str:
    option = "rerror" if event == "read_aio" else "werror"
    return (f"if=none,id=d0,{option}={policy},node-name=n1,format=raw,"
            + _blkdebug(image, event, error, once))


def _io_error(operation: str, action: str, error: int) -> dict[str, object]:
    return {"event": "BLOCK_IO_ERROR",
            "data": {"device": "d0", "node-name": "n1", "operation": operation,
                     "action": action, "nospace": error == errno.ENOSPC,
                     "reason": os.strerror(error)}}


@pytest.fixture
def daemons() -> Iterator[list[_Daemon]]:
    started: list[_Daemon] = []
    yield started
    for daemon in started:
        daemon.kill()


def _listening(path: Path, backlog: int = 1) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.listen(backlog)
    return sock


def _start(daemons: list[_Daemon], directory: Path, exported: str, *options: str) -> _Daemon:
    """Our storage daemon with ``options``, exporting ``exported`` as ``disk`` (writable)."""
    qmp = _listening(directory / "qmp.sock")
    export = _listening(directory / "nbd.sock", 16)
    proc = subprocess.Popen(
        [*DAEMON, *options, "--nbd-server", f"addr.type=fd,addr.str={export.fileno()}",
         "--export", f"type=nbd,id=e0,node-name={exported},name=disk,writable=on",
         "--chardev", f"socket,id=m0,fd={qmp.fileno()},server=on,wait=off",
         "--monitor", "chardev=m0"],
        pass_fds=[qmp.fileno(), export.fileno()], env=ENV, stdin=subprocess.DEVNULL)
    qmp.close()
    export.close()
    try:
        daemon = _Daemon(proc, directory / "qmp.sock", directory / "nbd.sock")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    daemons.append(daemon)
    return daemon


@pytest.mark.parametrize(("policy", "error"), [("stop", errno.EIO), ("enospc", errno.ENOSPC)])
def test_write_error_stops_until_cont(daemons: list[_Daemon], tmp_path: Path, image: Path,
                                      policy: str, error: int) -> None:
    daemon = _start(daemons, tmp_path, "d0",
                    "--drive", _drive(image, policy, "write_aio", error, once=True))
    assert daemon.io_status() == "ok"
    client = daemon.client()
    data = b"\x5a" * 65536
    write = client.aio_pwrite(data, 0)
    assert daemon.wait_event("BLOCK_IO_ERROR") == _io_error("write", "stop", error)
    assert daemon.wait_event("STOP") == {"event": "STOP"}
    assert daemon.command("query-status") == {"status": "io-error", "singlestep": False,
                                              "running": False}
    assert daemon.io_status() == ("nospace" if error == errno.ENOSPC else "failed")
    # A request that comes while the VM is stopped is held as well.
    buf = nbd.Buffer(65536)
    read = client.aio_pread(buf, 0)
    client.poll(0)
    assert daemon.command("query-status")["status"] == "io-error"
    client.poll(0)
    assert not client.aio_command_completed(write)
    assert not client.aio_command_completed(read)
    assert daemon.command("cont") == {}
    assert daemon.wait_event("RESUME") == {"event": "RESUME"}
    while not client.aio_command_completed(write):
        client.poll(-1)
    while not client.aio_command_completed(read):
        client.poll(-1)
    # The retried write happened (the held read ran concurrently with it: either content).
    assert bytes(buf.to_bytearray()) in (data, b"\0" * 65536)
    assert client.pread(65536, 0) == data
    assert daemon.io_status() == "ok"
    assert daemon.command("query-status")["running"] is True
    client.shutdown()
    assert daemon.events == []
    daemon.quit()
    assert image.read_bytes()[:65536] == data


@pytest.mark.parametrize(("policy", "error"), [("report", errno.ENOSPC), ("enospc", errno.EIO)])
def test_write_error_reported(daemons: list[_Daemon], tmp_path: Path, image: Path, policy: str,
                              error: int) -> None:
    daemon = _start(daemons, tmp_path, "d0", "--drive", _drive(image, policy, "write_aio", error))
    client = daemon.client()
    with pytest.raises(nbd.Error) as failure:
        client.pwrite(b"\x5a" * 4096, 0)
    assert failure.value.errnum == error
    assert daemon.command("query-status")["status"] == "running"
    assert daemon.events == [_io_error("write", "report", error)]
    assert daemon.io_status() == "ok"
    client.shutdown()
    daemon.quit()


def test_write_error_ignored(daemons: list[_Daemon], tmp_path: Path, image: Path) -> None:
    daemon = _start(daemons, tmp_path, "d0",
                    "--drive", _drive(image, "ignore", "write_aio", errno.EIO))
    client = daemon.client()
    client.pwrite(b"\x5a" * 4096, 0)  # the client hears of no error
    assert daemon.command("query-status")["status"] == "running"
    assert daemon.events == [_io_error("write", "ignore", errno.EIO)]
    client.shutdown()
    daemon.quit()
    assert image.read_bytes()[:4096] == b"\0" * 4096  # nothing was written


@pytest.mark.parametrize("policy", ["report", "ignore", "stop"])
def test_read_error_policies(daemons: list[_Daemon], tmp_path: Path, image: Path,
                             policy: str) -> None:
    image.write_bytes(b"\x11" * SIZE)
    daemon = _start(daemons, tmp_path, "d0",
                    "--drive", _drive(image, policy, "read_aio", errno.EIO, once=True))
    client = daemon.client()
    if policy == "report":
        with pytest.raises(nbd.Error) as failure:
            client.pread(4096, 0)
        assert failure.value.errnum == errno.EIO
        assert daemon.command("query-status")["status"] == "running"
        assert daemon.events == [_io_error("read", "report", errno.EIO)]
    elif policy == "ignore":
        assert client.pread(4096, 0) == b"\0" * 4096  # success, without the data
        assert daemon.command("query-status")["status"] == "running"
        assert daemon.events == [_io_error("read", "ignore", errno.EIO)]
    else:
        buf = nbd.Buffer(4096)
        read = client.aio_pread(buf, 0)
        assert daemon.wait_event("BLOCK_IO_ERROR") == _io_error("read", "stop", errno.EIO)
        daemon.wait_event("STOP")
        assert daemon.io_status() == "failed"
        assert daemon.command("cont") == {}
        daemon.wait_event("RESUME")
        while not client.aio_command_completed(read):
            client.poll(-1)
        assert buf.to_bytearray() == b"\x11" * 4096  # the retry read the data
    client.shutdown()
    daemon.quit()


@pytest.mark.parametrize("setup", ["blockdev", "drive-node"])
def test_node_export_emits_nothing(daemons: list[_Daemon], tmp_path: Path, image: Path,
                                   setup: str) -> None:
    """QEMU's behaviour for an export of a node: the client gets the error, nothing else."""
    if setup == "blockdev":
        options = ["--blockdev", "driver=raw,node-name=n1,file.driver=blkdebug,"
                   "file.config=/dev/null,file.inject-error.0.event=write_aio,"
                   f"file.inject-error.0.errno={errno.ENOSPC},"
                   f"file.image.driver=file,file.image.filename={image}"]
    else:
        # The drive's own node, exported by its node name: not the drive's device.
        options = ["--drive", _drive(image, "stop", "write_aio", errno.ENOSPC)]
    daemon = _start(daemons, tmp_path, "n1", *options)
    client = daemon.client()
    with pytest.raises(nbd.Error) as failure:
        client.pwrite(b"\x5a" * 4096, 0)
    assert failure.value.errnum == errno.ENOSPC
    assert daemon.command("query-status")["status"] == "running"
    blocks = daemon.command("query-block")
    assert all("io-status" not in b for b in blocks)
    assert daemon.events == []
    client.shutdown()
    daemon.quit()


def test_qmp_stop_holds_drive_export(daemons: list[_Daemon], tmp_path: Path,
                                     image: Path) -> None:
    """QMP ``stop`` pauses the drive's device: its requests wait for ``cont``."""
    daemon = _start(daemons, tmp_path, "d0",
                    "--drive", _drive(image, "report", "read_aio", errno.EIO))
    client = daemon.client()
    assert daemon.command("stop") == {}
    assert daemon.wait_event("STOP") == {"event": "STOP"}
    assert daemon.command("query-status") == {"status": "paused", "singlestep": False,
                                              "running": False}
    write = client.aio_pwrite(b"\x33" * 4096, 8192)
    client.poll(0)
    assert daemon.command("stop") == {}  # no second STOP
    client.poll(0)
    assert not client.aio_command_completed(write)
    assert daemon.command("cont") == {}
    daemon.wait_event("RESUME")
    while not client.aio_command_completed(write):
        client.poll(-1)
    assert daemon.command("cont") == {}  # running already: no RESUME
    client.shutdown()
    assert daemon.events == []
    daemon.quit()
    assert image.read_bytes()[8192:12288] == b"\x33" * 4096


def test_system_drive_export_stops(daemons: list[_Daemon], tmp_path: Path,
                                   image: Path) -> None:
    """``blockgraph system -drive ...,werror=stop`` exported over QMP by the drive's id."""
    qmp = _listening(tmp_path / "qmp.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "blockgraph", "system", "-machine", "none", "-nodefaults",
         "-display", "none", "-drive", _drive(image, "stop", "write_aio", errno.EIO, once=True),
         "-chardev", f"socket,id=m0,fd={qmp.fileno()},server=on,wait=off",
         "-mon", "chardev=m0,mode=control"],
        pass_fds=[qmp.fileno()], env=ENV, stdin=subprocess.DEVNULL)
    qmp.close()
    try:
        daemon = _Daemon(proc, tmp_path / "qmp.sock", tmp_path / "nbd.sock")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    daemons.append(daemon)
    assert daemon.io_status() is None  # no device yet
    daemon.command("nbd-server-start", addr={"type": "unix", "data": {"path": daemon.nbd_path}})
    daemon.command("block-export-add", type="nbd", id="e0", **{"node-name": "d0"},
                   name="disk", writable=True)
    assert daemon.io_status() == "ok"
    client = daemon.client()
    write = client.aio_pwrite(b"\x42" * 4096, 4096)
    assert daemon.wait_event("BLOCK_IO_ERROR") == _io_error("write", "stop", errno.EIO)
    daemon.wait_event("STOP")
    assert daemon.command("query-status")["status"] == "io-error"
    assert daemon.io_status() == "failed"
    client.poll(0)
    assert not client.aio_command_completed(write)
    daemon.command("cont")
    daemon.wait_event("RESUME")
    while not client.aio_command_completed(write):
        client.poll(-1)
    client.shutdown()
    daemon.command("quit")
    assert daemon.wait_event("SHUTDOWN")["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert proc.wait(timeout=60) == 0
    assert image.read_bytes()[4096:8192] == b"\x42" * 4096


def test_quit_while_stopped(daemons: list[_Daemon], tmp_path: Path, image: Path) -> None:
    """A request held for a stopped VM does not keep the daemon from quitting."""
    daemon = _start(daemons, tmp_path, "d0",
                    "--drive", _drive(image, "stop", "write_aio", errno.EIO))
    client = daemon.client()
    client.aio_pwrite(b"\x5a" * 4096, 0)
    daemon.wait_event("BLOCK_IO_ERROR")
    daemon.wait_event("STOP")
    daemon.quit()
    with pytest.raises(nbd.Error):
        while True:
            client.poll(-1)  # the connection ends, the write unanswered


@pytest.mark.parametrize("ending", ["quit", "nbd-server-stop"])
def test_full_request_window_held_while_stopped(daemons: list[_Daemon], tmp_path: Path,
                                               image: Path, ending: str) -> None:
    """Sixteen held writes fill the connection's request window; quit and nbd-server-stop
    still end it (the read loop waiting for a slot is cancelled, the held writes dropped)."""
    daemon = _start(daemons, tmp_path, "d0",
                    "--drive", _drive(image, "stop", "write_aio", errno.EIO, once=False))
    client = daemon.client()
    for i in range(16):
        client.aio_pwrite(b"\x5a" * 4096, i * 4096)
    daemon.wait_event("STOP")
    if ending == "quit":
        daemon.quit()  # asserts the daemon exits with status 0
    else:
        assert daemon.command("nbd-server-stop") == {}
        assert daemon.command("query-block-exports") == []
    with pytest.raises(nbd.Error):
        while True:
            client.poll(-1)  # the connection ends, the writes unanswered
