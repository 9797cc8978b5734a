"""The ``nbd`` client driver against qemu-nbd, nbdkit and our own ``blockgraph nbd``.

Servers start with ``--fork`` (qemu-nbd, ours) or ``nbdkit -f --exit-with-parent`` followed by a
bounded poll-connect; nothing sleeps to synchronise.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blockgraph.drivers.base import BlockStatusFlags, RequestFlags
from blockgraph.graph.layer import BlockLayer

BLOCKGRAPH = [sys.executable, "-m", "blockgraph"]
SRC = str(Path(__file__).resolve().parents[2] / "src")
MiB = 1 << 20


def _require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    if os.environ.get("BLOCKGRAPH_REQUIRE_ORACLES"):
        pytest.fail(f"{', '.join(missing)} required (BLOCKGRAPH_REQUIRE_ORACLES is set)")
    pytest.skip(f"{', '.join(missing)} not installed")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, env.get("PYTHONPATH", "")])
    return env


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=120, env=_env())


def _wait_listening(sock: Path, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(2000):  # bounded: the server either listens or dies
        if proc.poll() is not None:
            raise AssertionError("server exited")
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(sock))
                return
            except OSError:
                select.select([], [], [], 0.005)
    raise AssertionError("server never listened")


class Server:
    def __init__(self, kind: str, tmp: Path, image: Path | None, sock: Path | None = None) -> None:
        self.kind = kind
        self.sock = sock or tmp / f"{kind}-{id(self)}.sock"
        self.pid_file = tmp / f"{kind}-{id(self)}.pid"
        self.proc: subprocess.Popen[bytes] | None = None
        if kind == "nbdkit":
            self.proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U", str(self.sock),
                                          "memory", "8M"], stdin=subprocess.DEVNULL)
            _wait_listening(self.sock, self.proc)
            self.pid = self.proc.pid
            return
        assert image is not None
        exe = [*BLOCKGRAPH, "nbd"] if kind == "ours" else ["qemu-nbd"]
        cmd = [*exe, "--fork", "-t", "--pid-file", str(self.pid_file), "-k", str(self.sock),
               "-f", "raw", str(image)]
        subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env=_env(), timeout=60)
        self.pid = int(self.pid_file.read_text())

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        if self.proc is not None:
            self.proc.wait(10)
            return
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return
        try:
            select.select([fd], [], [], 10)
        finally:
            os.close(fd)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(kind: str, image: Path | None = None, sock: Path | None = None) -> Server:
        _require("qemu-img", "qemu-io", "nbdkit" if kind == "nbdkit" else "qemu-nbd")
        server = Server(kind, tmp_path, image, sock)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _image(tmp: Path) -> Path:
    _require("qemu-img", "qemu-io")
    img = tmp / "disk.raw"
    _run("qemu-img", "create", "-q", "-f", "raw", str(img), "8M")
    _run("qemu-io", "-f", "raw", "-c", "write -P 0xab 0 64k", "-c", "write -P 0x11 1M 192k", str(img))
    return img


KINDS = ["qemu-nbd", "nbdkit", "ours"]


@pytest.mark.parametrize("kind", KINDS)
def test_library_round_trip(kind: str, tmp_path: Path, servers: Callable[..., Server]) -> None:
    server = servers(kind, _image(tmp_path))
    layer = BlockLayer()
    try:
        bb = layer.new_backend("drive0")
        layer.run(layer.open_node(server.uri, {"driver": "raw"}, backend=bb))
        size = bb.getlength()
        assert size == 8 * MiB
        # several requests in flight on one connection, one of them larger than 32 MiB would split
        payloads = [bytes([i + 1]) * 65536 for i in range(8)]

        async def parallel() -> None:
            import asyncio

            await asyncio.gather(*[bb.pwritev(2 * MiB + i * 65536, memoryview(p), RequestFlags.FUA
                                              if i % 2 else RequestFlags.NONE)
                                   for i, p in enumerate(payloads)])

        layer.run(parallel())
        layer.run(bb.pwrite_zeroes(4 * MiB, MiB))
        layer.run(bb.flush())
        buf = bytearray(len(payloads) * 65536)
        layer.run(bb.preadv(2 * MiB, memoryview(buf)))
        assert bytes(buf) == b"".join(payloads)
        assert bb.root is not None
        status = layer.run(bb.root.block_status(4 * MiB, MiB))
        assert status.flags & BlockStatusFlags.ZERO
    finally:
        layer.close()
    # qemu-io sees what we wrote
    for i in range(8):
        _run("qemu-io", "-f", "raw", "-c", f"read -P {i + 1} {2 * MiB + i * 65536} 64k", server.uri)
    _run("qemu-io", "-f", "raw", "-c", f"read -P 0 {4 * MiB} 1M", server.uri)


@pytest.mark.parametrize("kind", KINDS)
def test_blockgraph_io_matches_qemu_io(kind: str, tmp_path: Path, servers: Callable[..., Server]) -> None:
    server = servers(kind, _image(tmp_path))
    cmds = ["write -P 0x5a 4k 8k", "write -z 1M 64k", "read -P 0 1M 64k", "read -P 0x5a 4k 8k",
            "discard 2M 64k", "flush"]
    args: list[str] = []
    for c in cmds:
        args += ["-c", c]
    ours = _run(*BLOCKGRAPH, "io", "-f", "raw", *args, server.uri, check=False)
    assert ours.returncode == 0, ours.stdout + ours.stderr
    assert "verification failed" not in ours.stdout
    # now compare views of the whole disk, byte for byte, through both clients
    _run("qemu-io", "-f", "raw", "-c", "read -P 0x5a 4k 8k", "-c", "read -P 0 1M 64k", server.uri)
    ours_dump = tmp_path / "ours.raw"
    theirs_dump = tmp_path / "theirs.raw"
    _run(*BLOCKGRAPH, "img", "convert", "-f", "raw", "-O", "raw", server.uri, str(ours_dump))
    _run("qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri, str(theirs_dump))
    assert ours_dump.read_bytes() == theirs_dump.read_bytes()


def test_map_matches_qemu_io(tmp_path: Path, servers: Callable[..., Server]) -> None:
    server = servers("qemu-nbd", _image(tmp_path))
    ours = _run(*BLOCKGRAPH, "io", "-f", "raw", "-c", "map", server.uri).stdout
    theirs = _run("qemu-io", "-f", "raw", "-c", "map", server.uri).stdout
    assert ours == theirs


def test_info_and_errors(tmp_path: Path, servers: Callable[..., Server]) -> None:
    server = servers("qemu-nbd", _image(tmp_path))
    ours = _run(*BLOCKGRAPH, "img", "info", "-f", "raw", server.uri).stdout.splitlines()
    assert ours[0] == f"image: nbd+unix://?socket={server.sock}"
    assert "virtual size: 8 MiB (8388608 bytes)" in ours
    for bad in ("nbd://", f"nbd+unix:///nosuch?socket={server.sock}", f"nbd+unix:///?socket={tmp_path}/x"):
        theirs = _run("qemu-img", "info", bad, check=False)
        mine = _run(*BLOCKGRAPH, "img", "info", bad, check=False)
        assert mine.returncode == theirs.returncode == 1
        first = theirs.stderr.splitlines()[0].replace("qemu-img:", "")
        assert first in mine.stderr


def test_qcow2_overlay_on_remote_base(tmp_path: Path, servers: Callable[..., Server]) -> None:
    server = servers("qemu-nbd", _image(tmp_path))
    overlay = tmp_path / "ov.qcow2"
    # A relative overlay name: ``img create`` still joins a protocol backing name to the
    # overlay's directory (QEMU treats ``nbd+unix:`` names as absolute).
    subprocess.run([*BLOCKGRAPH, "img", "create", "-f", "qcow2", "-b", server.uri, "-F", "raw",
                    overlay.name], check=True, cwd=tmp_path, env=_env(), capture_output=True, timeout=60)
    _run(*BLOCKGRAPH, "io", "-c", "read -P 0xab 0 64k", "-c", "write -P 0x77 64k 4k",
         "-c", "read -P 0x11 1M 192k", str(overlay))
    _run("qemu-io", "-c", "read -P 0x77 64k 4k", "-c", "read -P 0xab 0 64k", str(overlay))


def test_reconnect_delay(tmp_path: Path, servers: Callable[..., Server]) -> None:
    image = _image(tmp_path)
    first = servers("qemu-nbd", image)
    layer = BlockLayer()
    try:
        bb = layer.new_backend("drive0")
        layer.run(layer.open_node(None, {"driver": "raw", "file.driver": "nbd",
                                         "file.server.type": "unix", "file.server.path": str(first.sock),
                                         "file.reconnect-delay": "30"}, backend=bb))
        buf = bytearray(4096)
        layer.run(bb.preadv(0, memoryview(buf)))
        assert buf == b"\xab" * 4096
        first.stop()
        first.sock.unlink(missing_ok=True)

        async def read_during_restart() -> bytes:
            import asyncio

            out = bytearray(4096)
            task = asyncio.get_running_loop().create_task(bb.preadv(0, memoryview(out)))
            await asyncio.sleep(0)  # let the request find the connection gone
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: servers("qemu-nbd", image, first.sock))
            await task
            return bytes(out)

        assert layer.run(read_during_restart()) == b"\xab" * 4096
    finally:
        layer.close()


def test_no_reconnect_delay_fails_with_eio(tmp_path: Path, servers: Callable[..., Server]) -> None:
    server = servers("qemu-nbd", _image(tmp_path))
    layer = BlockLayer()
    try:
        bb = layer.new_backend("drive0")
        layer.run(layer.open_node(server.uri, {"driver": "raw"}, backend=bb))
        server.stop()
        server.sock.unlink(missing_ok=True)
        from blockgraph.errors import IOFailure

        with pytest.raises(IOFailure) as info:
            layer.run(bb.preadv(0, memoryview(bytearray(4096))))
        assert info.value.errno == 5
    finally:
        layer.close()
