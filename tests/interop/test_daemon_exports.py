"""``blockgraph storage-daemon`` NBD exports, side by side with qemu-storage-daemon 7.2.

Daemons start with ``--daemonize --pidfile`` (the parent returns once everything listens) and
stop through QMP ``quit``; nothing here sleeps to synchronise.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BLOCKGRAPH = [sys.executable, "-m", "blockgraph", "storage-daemon"]
QSD = ["qemu-storage-daemon"]
MiB = 1 << 20


def _require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    if os.environ.get("BLOCKGRAPH_REQUIRE_ORACLES"):
        pytest.fail(f"{', '.join(missing)} required (BLOCKGRAPH_REQUIRE_ORACLES is set)")
    pytest.skip(f"{', '.join(missing)} not installed")


class QMP:
    """A minimal QMP client over a unix socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")
        self.events: list[dict[str, Any]] = []
        assert "QMP" in self._read()
        assert "return" in self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line, "QMP connection closed"
        message: dict[str, Any] = json.loads(line)
        return message

    def cmd(self, command: str, /, **arguments: Any) -> dict[str, Any]:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        return self.raw(request)

    def raw(self, request: dict[str, Any]) -> dict[str, Any]:
        self.file.write(json.dumps(request).encode() + b"\n")
        self.file.flush()
        while True:
            message = self._read()
            if "event" in message:
                self.events.append(message)
                continue
            return message

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class Daemon:
    def __init__(self, kind: str, tmp: Path, *args: str) -> None:
        self.kind = kind
        self.dir = tmp / kind
        self.dir.mkdir(exist_ok=True)
        self.qmp_path = self.dir / "qmp.sock"
        self.nbd_path = self.dir / "nbd.sock"
        self.pidfile = self.dir / "pid"
        exe = BLOCKGRAPH if kind == "ours" else QSD
        args = tuple(a.replace("@NBD@", str(self.nbd_path)).replace("@DIR@", str(self.dir))
                     for a in args)
        cmd = [*exe, *args, "--chardev", f"socket,path={self.qmp_path},server=on,wait=off,id=m0",
               "--monitor", "chardev=m0", "--pidfile", str(self.pidfile), "--daemonize"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        self.pid = int(self.pidfile.read_text())

    def qmp(self) -> QMP:
        return QMP(self.qmp_path)

    def stop(self) -> None:
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return
        try:
            try:
                client = self.qmp()
                client.cmd("quit")
                client.close()
            except OSError:
                os.kill(self.pid, signal.SIGTERM)
            if not select.select([fd], [], [], 20)[0]:
                os.kill(self.pid, signal.SIGKILL)
        finally:
            os.close(fd)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()


def _image(tmp: Path) -> Path:
    path = tmp / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"\x11" * 65536)
    return path


def _start(daemons: list[Daemon], kind: str, tmp: Path, *args: str) -> Daemon:
    daemon = Daemon(kind, tmp, *args)
    daemons.append(daemon)
    return daemon


def _nbdinfo(daemon: Daemon, name: str) -> str:
    uri = f"nbd+unix:///{name}?socket={daemon.nbd_path}"
    proc = subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True, timeout=60,
                          check=True)
    return proc.stdout.replace(str(daemon.nbd_path), "SOCKET")


def _base_args(image: Path) -> tuple[str, ...]:
    return ("--blockdev", f"driver=file,node-name=f0,filename={image}",
            "--blockdev", "driver=raw,node-name=r0,file=f0",
            "--nbd-server", "addr.type=unix,addr.path=@NBD@")


@pytest.mark.parametrize("export", [
    "type=nbd,id=e0,node-name=r0,name=disk,writable=on",
    "nbd,id=e0,node-name=r0",
    "type=nbd,id=e0,node-name=r0,name=disk,description=hello,allocation-depth=on",
])
def test_nbdinfo_matches_qsd(tmp_path: Path, daemons: list[Daemon], export: str) -> None:
    _require("qemu-storage-daemon", "nbdinfo")
    image = _image(tmp_path)
    name = "disk" if "name=disk" in export else "r0"
    outputs = [_nbdinfo(_start(daemons, kind, tmp_path, *_base_args(image), "--export", export),
                        name)
               for kind in ("qsd", "ours")]
    assert outputs[1] == outputs[0]


def test_max_connections_one_disables_multi_conn(tmp_path: Path, daemons: list[Daemon]) -> None:
    _require("qemu-storage-daemon", "nbdinfo")
    image = _image(tmp_path)
    args = ("--blockdev", f"driver=file,node-name=f0,filename={image}",
            "--nbd-server", "addr.type=unix,addr.path=@NBD@,max-connections=1",
            "--export", "type=nbd,id=e0,node-name=f0,writable=on")
    outputs = [_nbdinfo(_start(daemons, kind, tmp_path, *args), "f0") for kind in ("qsd", "ours")]
    assert outputs[1] == outputs[0]
    assert '"can_multi_conn": false' in outputs[1]


def test_write_reads_back_through_second_connection(tmp_path: Path, daemons: list[Daemon]) -> None:
    _require("qemu-io")
    image = _image(tmp_path)
    daemon = _start(daemons, "ours", tmp_path, *_base_args(image),
                    "--export", "type=nbd,id=e0,node-name=r0,name=disk,writable=on")
    uri = f"nbd+unix:///disk?socket={daemon.nbd_path}"
    write = subprocess.run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x5a 0 64k"],
                           capture_output=True, text=True, timeout=60)
    assert write.returncode == 0 and "wrote 65536/65536 bytes" in write.stdout, write
    read = subprocess.run(["qemu-io", "-f", "raw", "-r", uri, "-c", "read -P 0x5a 0 64k",
                           "-c", "read -P 0x11 1M 64k"],
                          capture_output=True, text=True, timeout=60)
    assert read.returncode == 0 and "Pattern verification failed" not in read.stdout, read
    assert read.stdout.count("read 65536/65536 bytes") == 2


def test_runtime_export_add_and_delete(tmp_path: Path, daemons: list[Daemon]) -> None:
    _require("nbdinfo")
    image = _image(tmp_path)
    daemon = _start(daemons, "ours", tmp_path, *_base_args(image))
    qmp = daemon.qmp()
    try:
        assert qmp.cmd("query-block-exports") == {"return": []}
        assert qmp.cmd("block-export-add", type="nbd", id="x0", **{"node-name": "r0"},
                       name="live") == {"return": {}}
        assert qmp.cmd("query-block-exports") == {"return": [
            {"type": "nbd", "id": "x0", "node-name": "r0", "shutting-down": False}]}
        assert '"export-size": 4194304' in _nbdinfo(daemon, "live")
        assert qmp.cmd("block-export-del", id="x0") == {"return": {}}
        assert [e["event"] for e in qmp.events] == ["BLOCK_EXPORT_DELETED"]
        assert qmp.events[0]["data"] == {"id": "x0"}
        assert qmp.cmd("query-block-exports") == {"return": []}
        gone = subprocess.run(["nbdinfo", f"nbd+unix:///live?socket={daemon.nbd_path}"],
                              capture_output=True, text=True, timeout=60)
        assert gone.returncode != 0
    finally:
        qmp.close()


def test_hard_delete_drops_clients(tmp_path: Path, daemons: list[Daemon]) -> None:
    image = _image(tmp_path)
    daemon = _start(daemons, "ours", tmp_path, *_base_args(image),
                    "--export", "type=nbd,id=e0,node-name=r0,name=disk")
    qmp = daemon.qmp()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(30)
    try:
        client.connect(str(daemon.nbd_path))
        _nbd_go(client, b"disk")
        assert qmp.cmd("block-export-del", id="e0") == {
            "error": {"class": "GenericError", "desc": "export 'e0' still in use"}}
        assert qmp.cmd("block-export-del", id="e0", mode="hard") == {"return": {}}
        assert client.recv(1) == b""  # dropped by the server
        while not qmp.events:
            qmp.cmd("query-block-exports")
        assert qmp.events[0]["data"] == {"id": "e0"}
        assert qmp.cmd("query-block-exports") == {"return": []}
    finally:
        client.close()
        qmp.close()


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk
        data += chunk
    return data


def _nbd_go(sock: socket.socket, name: bytes) -> None:
    """Newstyle handshake up to transmission with NBD_OPT_GO."""
    greeting = _recv(sock, 18)
    assert greeting[:16] == b"NBDMAGICIHAVEOPT"
    sock.sendall((3).to_bytes(4, "big"))  # fixed newstyle, no zeroes
    payload = len(name).to_bytes(4, "big") + name + (0).to_bytes(2, "big")
    sock.sendall(b"IHAVEOPT" + (7).to_bytes(4, "big") + len(payload).to_bytes(4, "big") + payload)
    while True:
        header = _recv(sock, 20)
        reply = int.from_bytes(header[12:16], "big")
        _recv(sock, int.from_bytes(header[16:20], "big"))
        if reply == 1:  # NBD_REP_ACK
            return
        assert reply == 3, reply  # NBD_REP_INFO


# Requests sent unchanged to both daemons; @DIR@ is each daemon's own directory.
_TRANSCRIPT: list[dict[str, Any]] = [
    {"execute": "query-block-exports"},
    {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "f0"}},
    {"execute": "nbd-server-add", "arguments": {"device": "f0"}},
    {"execute": "nbd-server-remove", "arguments": {"name": "f0"}},
    {"execute": "nbd-server-stop"},
    {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "nope"}},
    {"execute": "block-export-add",
     "arguments": {"type": "nbd", "id": "e0", "node-name": "ro", "writable": True}},
    {"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "path": "@DIR@/n.sock"}}},
    {"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {}}}},
    {"execute": "nbd-server-start", "arguments": {"addr": {"type": "zzz", "data": {}}}},
    {"execute": "nbd-server-start",
     "arguments": {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": 1}}}},
    {"execute": "nbd-server-start",
     "arguments": {"addr": {"type": "unix", "data": {"path": "@DIR@/n.sock"}}, "max-connections": -1}},
    {"execute": "nbd-server-start",
     "arguments": {"addr": {"type": "unix", "data": {"path": "@DIR@/n.sock"}}, "tls-creds": "t0"}},
    {"execute": "nbd-server-start",
     "arguments": {"addr": {"type": "unix", "data": {"path": "/nonexistent/dir/n.sock"}}}},
    {"execute": "nbd-server-start",
     "arguments": {"addr": {"type": "fd", "data": {"str": "99"}}}},
    {"execute": "nbd-server-start",
     "arguments": {"addr": {"type": "unix", "data": {"path": "@DIR@/n.sock"}}}},
    {"execute": "nbd-server-start",
     "arguments": {"addr": {"type": "unix", "data": {"path": "@DIR@/n2.sock"}}}},
    {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "f0"}},
    {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "f0"}},
    {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "nope"}},
    {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e1", "node-name": "f0"}},
    {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "1e", "node-name": "f0"}},
    {"execute": "block-export-add", "arguments": {"id": "e1", "node-name": "f0"}},
    {"execute": "block-export-add",
     "arguments": {"type": "nbd", "id": "e1", "node-name": "f0", "bogus": True}},
    {"execute": "block-export-add",
     "arguments": {"type": "nbd", "id": "e1", "node-name": "f0", "writable": "yes"}},
    {"execute": "block-export-add",
     "arguments": {"type": "nbd", "id": "e1", "node-name": "f0", "name": "x" * 4097}},
    {"execute": "block-export-add",
     "arguments": {"type": "nbd", "id": "e1", "node-name": "f0", "name": "d",
                   "description": "y" * 4097}},
    {"execute": "block-export-add",
     "arguments": {"type": "nbd", "id": "e1", "node-name": "f0", "name": "d", "bitmaps": ["b0"]}},
    {"execute": "block-export-add",
     "arguments": {"type": "nbd", "id": "e1", "node-name": "f0", "name": "d", "writable": True,
                   "writethrough": True, "description": "hi", "allocation-depth": True}},
    {"execute": "block-export-add",
     "arguments": {"type": "nbd", "id": "e2", "node-name": "ro", "name": "r"}},
    {"execute": "query-block-exports"},
    {"execute": "block-export-del", "arguments": {"id": "nope"}},
    {"execute": "block-export-del", "arguments": {"id": "e1", "mode": "soft"}},
    {"execute": "block-export-del", "arguments": {}},
    {"execute": "block-export-del", "arguments": {"id": "e1"}},
    {"execute": "block-export-del", "arguments": {"id": "e1"}},
    {"execute": "nbd-server-add", "arguments": {"device": "nope", "name": "leg"}},
    {"execute": "nbd-server-add", "arguments": {"device": "f0"}},
    {"execute": "nbd-server-add", "arguments": {"device": "f0", "name": "f 0"}},
    {"execute": "nbd-server-add", "arguments": {"device": "f0", "name": "e2"}},
    {"execute": "nbd-server-add", "arguments": {"device": "ro", "name": "leg", "writable": True}},
    {"execute": "query-block-exports"},
    {"execute": "nbd-server-remove", "arguments": {"name": "leg", "mode": "hard"}},
    {"execute": "nbd-server-remove", "arguments": {"name": "leg"}},
    {"execute": "blockdev-del", "arguments": {"node-name": "f0"}},
    {"execute": "nbd-server-stop"},
    {"execute": "query-block-exports"},
    {"execute": "nbd-server-stop"},
    {"execute": "nbd-server-start",
     "arguments": {"addr": {"type": "unix", "data": {"path": "@DIR@/n.sock"}}}},
    {"execute": "nbd-server-stop"},
]


def _substitute(value: Any, directory: str) -> Any:
    if isinstance(value, str):
        return value.replace("@DIR@", directory)
    if isinstance(value, dict):
        return {k: _substitute(v, directory) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, directory) for v in value]
    return value


def _transcript(daemon: Daemon) -> list[dict[str, Any]]:
    qmp = daemon.qmp()
    out: list[dict[str, Any]] = []
    try:
        for request in _TRANSCRIPT:
            reply = qmp.raw(_substitute(request, str(daemon.dir)))
            for event in qmp.events:
                out.append({"event": event["event"], "data": event.get("data")})
            qmp.events.clear()
            out.append(reply)
    finally:
        qmp.close()
    filtered: list[dict[str, Any]] = json.loads(json.dumps(out).replace(str(daemon.dir), "DIR"))
    return filtered


def test_qmp_transcript_matches_qsd(tmp_path: Path, daemons: list[Daemon]) -> None:
    _require("qemu-storage-daemon")
    image = _image(tmp_path)
    args = ("--blockdev", f"driver=file,node-name=f0,filename={image}",
            "--blockdev", f"driver=file,node-name=ro,filename={image},read-only=on")
    transcripts = [_transcript(_start(daemons, kind, tmp_path, *args)) for kind in ("qsd", "ours")]
    for index, (theirs, ours) in enumerate(zip(transcripts[0], transcripts[1], strict=True)):
        assert ours == theirs, f"message {index}"


_CLI_CASES: list[tuple[str, ...]] = [
    ("--export", "type=nbd,id=e0,node-name=f0"),
    ("--nbd-server", "addr.type=unix,addr.path=@NBD@", "--export", "type=nbd,id=e0,node-name=nope"),
    ("--nbd-server", "addr.type=unix,addr.path=@NBD@", "--export", "nbd,id=e0,node-name=f0,bogus=1"),
    ("--nbd-server", "addr.type=unix,addr.path=@NBD@",
     "--export", "nbd,id=e0,node-name=f0,writable=maybe"),
    ("--nbd-server", "addr.type=unix,addr.path=@NBD@",
     "--export", "nbd,id=e0,node-name=f0", "--export", "nbd,id=e0,node-name=f0"),
    ("--nbd-server", "addr.type=unix,addr.path=@NBD@",
     "--export", "nbd,id=e0,node-name=f0", "--export", "nbd,id=e1,node-name=f0"),
    ("--nbd-server", "addr.type=unix,addr.path=@NBD@", "--nbd-server", "addr.type=unix,addr.path=@NBD@2"),
    ("--nbd-server", "addr.type=unix"),
    ("--nbd-server", "addr.path=x"),
    ("--nbd-server", "addr.type=zzz,addr.path=x"),
    ("--nbd-server", "addr.type=inet,addr.host=127.0.0.1"),
    ("--nbd-server", "addr.type=inet,addr.host=127.0.0.1,addr.port=notaport"),
    ("--nbd-server", "addr.type=unix,addr.path=@NBD@,max-connections=x"),
    ("--nbd-server", "addr.type=unix,addr.path=@NBD@,max-connections=-1"),
    ("--nbd-server", "addr.type=unix,addr.path=@NBD@,tls-creds=t0"),
    ("--nbd-server", "addr.type=unix,addr.path=@NBD@,foo=1"),
    ("--nbd-server", "addr.type=unix,addr.path=/nonexistent/dir/n.sock"),
    ("--nbd-server", "addr.type=unix,addr.path=@NBD@", "--export", "id=e0,node-name=f0"),
    ("--nbd-server", "addr.type=unix,addr.path=@NBD@", "--export", "type=nbd,id=1e,node-name=f0"),
    ("--nbd-server", '{"addr": {"type": "unix", "path": "@NBD@"}}',
     "--export", '{"type": "nbd", "id": "e0", "node-name": "f0", "writable": 1}'),
]


@pytest.mark.parametrize("case", _CLI_CASES, ids=[" ".join(c) for c in _CLI_CASES])
def test_command_line_errors_match_qsd(tmp_path: Path, case: tuple[str, ...]) -> None:
    _require("qemu-storage-daemon")
    image = _image(tmp_path)
    results = []
    for exe in (QSD, BLOCKGRAPH):
        nbd = tmp_path / "nbd.sock"
        args = [a.replace("@NBD@", str(nbd)) for a in case]
        proc = subprocess.run([*exe, "--blockdev", f"driver=file,node-name=f0,filename={image}",
                               *args], capture_output=True, text=True, timeout=60)
        results.append((proc.returncode, proc.stderr.partition(": ")[2].replace(str(tmp_path), "T")))
        for leftover in tmp_path.glob("nbd.sock*"):
            leftover.unlink()
    assert results[1] == results[0]
    assert results[0][0] == 1
