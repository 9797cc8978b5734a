"""QMP monitors on TCP, against the real clients and the real QEMU 7.2.

* ``qemu.qmp`` connects over TCP to ``blockgraph storage-daemon`` and runs a small scenario;
* the differential transcript of ``test_qmp_client`` goes over TCP to qemu-storage-daemon and
  to ours (plus ``query-chardev``, several clients in turn, and ``pretty=on``);
* ``blockgraph system -qmp tcp:... -monitor stdio`` against ``qemu-system-x86_64``: the port
  is read from ``info chardev``, both monitors are active at once and ``quit`` from either
  ends the process;
* bad chardev and monitor options give QEMU's texts (and the deprecation warnings of
  ``server,nowait``).

No test picks a port and hopes it stays free: the daemons get a socket the test has bound
and listens on (``--chardev socket,fd=N,server=on``; a client can connect before the daemon
serves, the connection waits in the backlog), and the system emulator binds port 0 and says
which port it got in ``info chardev``.
"""

from __future__ import annotations

import asyncio
import os
import re
import select
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

if str(Path(__file__).resolve().parents[2]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.interop.test_qmp_client import _filter, _make_chain, _require, _script  # noqa: E402

SRC = str(Path(__file__).resolve().parents[2] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC}
OURS_DAEMON = [sys.executable, "-m", "blockgraph", "storage-daemon"]
OURS_SYSTEM = [sys.executable, "-m", "blockgraph", "system"]
TIMEOUT = 30  # a bound on a missing reply, never a synchronisation delay


def _qsd() -> list[str]:
    return [_require(shutil.which("qemu-storage-daemon"), "qemu-storage-daemon")]


def _qemu_system() -> list[str]:
    return [_require(shutil.which("qemu-system-x86_64"), "qemu-system-x86_64")]


class _TCPDaemon:
    """A storage daemon whose QMP monitor serves a TCP socket the test bound and listens on."""

    def __init__(self, command: list[str], *extra: str, monitor: str = "chardev=m0") -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        self.port = listener.getsockname()[1]
        self.proc = subprocess.Popen(
            [*command, *extra, "--chardev",
             f"socket,id=m0,fd={listener.fileno()},server=on,wait=off", "--monitor", monitor],
            pass_fds=[listener.fileno()], env=ENV, stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        listener.close()

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
        return sock

    def wait(self) -> int:
        code = self.proc.wait(timeout=60)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.wait()


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[Path]:
    _make_chain(tmp_path)
    yield tmp_path


def test_qemu_qmp_client_over_tcp(chain: Path) -> None:
    qmp = pytest.importorskip("qemu.qmp")
    daemon = _TCPDaemon(OURS_DAEMON)

    async def scenario() -> None:
        client = qmp.QMPClient("blockgraph-tcp")
        await client.connect(("127.0.0.1", daemon.port))
        assert client.greeting is not None
        await client.execute("blockdev-add", {
            "driver": "qcow2", "node-name": "top",
            "file": {"driver": "file", "filename": str(chain / "top.qcow2")}})
        nodes = await client.execute("query-named-block-nodes", {"flat": True})
        assert sorted(n["drv"] for n in nodes) == ["file", "file", "qcow2", "qcow2"]
        top = next(n for n in nodes if n["node-name"] == "top")
        assert top["backing_file"] == str(chain / "base.qcow2")
        with pytest.raises(qmp.ExecuteError) as err:
            await client.execute("blockdev-del", {"node-name": "nope"})
        assert str(err.value) == "Failed to find node with node-name='nope'"
        chardevs = await client.execute("query-chardev")
        local = client._writer.get_extra_info("sockname")  # noqa: SLF001 - the peer we are
        assert chardevs == [{"label": "m0", "frontend-open": True,
                             "filename": f"tcp:127.0.0.1:{daemon.port},server=on <-> "
                                         f"127.0.0.1:{local[1]}"}]
        await client.execute("quit")
        await client.disconnect()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 60))
        assert daemon.wait() == 0
    finally:
        daemon.kill()


def _converse(sock: socket.socket, script: list[bytes],
              stream: BinaryIO | None = None) -> list[str]:
    """The greeting (unless ``stream`` is given: read from it already) and a reply per request."""
    out = []
    if stream is None:
        stream = sock.makefile("rb")
        out.append(stream.readline().decode("ascii"))
    for request in script:
        sock.sendall(request)
        out.append(stream.readline().decode("ascii"))
    return out


def _pending(sock: socket.socket) -> bool:
    """Whether ``sock`` has data to read right now."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def test_differential_over_tcp_against_qemu_storage_daemon(tmp_path: Path) -> None:
    """Two clients in turn on one monitor: the second is served once the first has gone."""
    runs: list[list[str]] = []
    for name, command in (("qemu", _qsd()), ("ours", OURS_DAEMON)):
        directory = tmp_path / name
        _make_chain(directory)
        daemon = _TCPDaemon(command)
        try:
            first = daemon.connect()
            stream = first.makefile("rb")
            replies = [stream.readline().decode("ascii")]
            # Only once the monitor serves the first client: two connections queued before
            # the daemon runs make QEMU accept and drop the second now and then.
            second = daemon.connect()  # accepted by the kernel, not yet by the monitor
            script = _script(str(directory))
            quit_request = script.pop()
            replies += _converse(first, [*script, b'{"execute": "query-chardev", "id": "c"}'],
                                 stream)
            # A whole conversation later the second client still has no greeting.
            assert not _pending(second)
            port = first.getsockname()[1]
            replies[-1] = replies[-1].replace(f"127.0.0.1:{port}", "127.0.0.1:CLIENT_PORT")
            stream.close()  # the file object holds the socket open too
            first.close()
            replies += _converse(second, [b'{"execute": "qmp_capabilities"}',
                                          b'{"execute": "query-named-block-nodes", "arguments": {"flat": true}}',
                                          quit_request])
            second.close()
            assert daemon.wait() == 0
        finally:
            daemon.kill()
        runs.append([_filter(reply.replace(f":{daemon.port},", ":PORT,"), str(directory))
                     for reply in replies])
    qemu, ours = runs
    for index, (theirs, mine) in enumerate(zip(qemu, ours, strict=True)):
        assert mine == theirs, f"reply {index} differs"
    assert '"filename": "tcp:127.0.0.1:PORT,server=on <-> 127.0.0.1:CLIENT_PORT"' in ours[-5]


def test_pretty_monitor_against_qemu_storage_daemon(tmp_path: Path) -> None:
    script = [b'{"execute": "qmp_capabilities"}',
              b'{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r0", '
              b'"file": {"driver": "file", "filename": "DIR/disk.raw", "node-name": "f0"}}}',
              b'{"execute": "query-block-exports", "id": [1, {"a": {}}]}',
              b'{"execute": "blockdev-del", "arguments": {"node-name": "x"}}',
              b'{"execute": "query-named-block-nodes"}',
              b'{"execute": "quit"}']
    outputs = []
    for name, command in (("qemu", _qsd()), ("ours", OURS_DAEMON)):
        directory = tmp_path / name
        _make_chain(directory)
        daemon = _TCPDaemon(command, monitor="chardev=m0,pretty=on")
        try:
            sock = daemon.connect()
            stream = sock.makefile("rb")
            messages = []
            for request in [b"", *script]:
                sock.sendall(request.replace(b"DIR", str(directory).encode()))
                # A pretty message ends with a line holding only its closing brace.
                lines: list[bytes] = []
                try:
                    lines.append(stream.readline())
                    while lines[-1] != b"}\r\n":
                        assert lines[-1], "connection closed"
                        lines.append(stream.readline())
                except TimeoutError:
                    pytest.fail(f"{name}: no complete reply to {request!r} in {TIMEOUT} s, "
                                f"got {lines!r}")
                messages.append(b"".join(lines).decode("ascii"))
            sock.close()
            assert daemon.wait() == 0
        finally:
            daemon.kill()
        outputs.append([_filter(re.sub(r'"micro": \d+,\s+"minor": 2,\s+"major": 7\s+\},\s+'
                                       r'"package": "[^"]*"', "VERSION", m), str(directory))
                        for m in messages])
    assert outputs[1] == outputs[0]
    assert outputs[1][2] == '{\r\n    "return": {\r\n    }\r\n}\r\n'


# -- qemu-system: -qmp tcp: with -monitor stdio ------------------------------------------------

class _System:
    """A system emulator with a human monitor on stdio and QMP on a TCP port it chose."""

    def __init__(self, command: list[str], directory: Path) -> None:
        self.proc = subprocess.Popen(
            [*command, "-machine", "none", "-nodefaults", "-display", "none",
             "-drive", "if=none,id=d0,file=top.qcow2,node-name=n1",
             "-qmp", "tcp:127.0.0.1:0,server=on,wait=off", "-monitor", "stdio"],
            cwd=directory, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        self.hmp("")  # the banner and the first prompt

    def hmp(self, line: str) -> str:
        """Type ``line``; return what the monitor printed up to its next prompt, without the
        echo (QEMU's readline echo is full of cursor escapes, ours is plain)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if line:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        out = b""
        while not out.endswith(b"(qemu) "):
            data = self.proc.stdout.read1(65536)
            assert data, f"monitor ended early: {out!r}"
            out += data
        text = out[: -len(b"(qemu) ")].decode()
        if line:
            text = text.split("\r\n", 1)[1]  # the echoed line
        return text

    def qmp_port(self) -> int:
        found = re.search(r"compat_monitor0: filename=disconnected:tcp:127\.0\.0\.1:(\d+),server=on",
                          self.hmp("info chardev"))
        assert found is not None
        return int(found.group(1))


def _system_session(command: list[str], directory: Path, quit_from: str) -> list[str]:
    system = _System(command, directory)
    try:
        port = system.qmp_port()
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        stream = sock.makefile("rb")
        out = [stream.readline().decode()]

        def qmp(request: bytes, events: int = 0) -> None:
            sock.sendall(request)
            for _ in range(events + 1):
                out.append(stream.readline().decode())

        qmp(b'{"execute": "qmp_capabilities"}')
        qmp(b'{"execute": "query-status"}')
        qmp(b'{"execute": "query-block"}')
        qmp(b'{"execute": "stop"}', events=1)
        out.append("HMP " + system.hmp("info status"))
        qmp(b'{"execute": "query-status"}')
        system.hmp("cont")
        out.append(stream.readline().decode())  # RESUME, emitted by the HMP command
        out.append("HMP " + system.hmp("info status"))
        out.append("HMP " + system.hmp("info block"))
        # QEMU lists chardevs in the order of a hash table; we list them as created.
        listing = sorted(system.hmp("info chardev").splitlines())
        out.append("HMP " + "\n".join(listing).replace(f":{port},", ":PORT,").replace(
            f"127.0.0.1:{sock.getsockname()[1]}", "127.0.0.1:CLIENT"))
        if quit_from == "qmp":
            qmp(b'{"execute": "quit"}', events=1)
        else:
            assert system.proc.stdin is not None
            system.proc.stdin.write(b"quit\n")
            system.proc.stdin.flush()
            out.append(stream.readline().decode())  # SHUTDOWN
        assert stream.readline() == b""  # the monitor went away with the process
        sock.close()
        assert system.proc.wait(timeout=60) == 0
        assert system.proc.stdout is not None and system.proc.stderr is not None
        system.proc.stdout.close()
        system.proc.stderr.close()
    finally:
        if system.proc.poll() is None:
            system.proc.kill()
            system.proc.wait()
    text = "".join(out)
    text = re.sub(r'"seconds": \d+, "microseconds": \d+', "TIMESTAMP", text)
    return _filter(text, str(directory)).splitlines()


@pytest.mark.parametrize("quit_from", ["qmp", "hmp"])
def test_system_qmp_tcp_with_monitor_stdio(tmp_path: Path, quit_from: str) -> None:
    outputs = []
    for name, command in (("qemu", _qemu_system()), ("ours", OURS_SYSTEM)):
        directory = tmp_path / name
        _make_chain(directory)
        outputs.append(_system_session(command, directory, quit_from))
    theirs, mine = outputs
    assert mine == theirs
    assert '{"timestamp": {TIMESTAMP}, "event": "STOP"}' in mine
    assert "HMP VM status: paused" in mine
    assert "HMP compat_monitor0: filename=tcp:127.0.0.1:PORT,server=on <-> 127.0.0.1:CLIENT" in mine
    assert any('"event": "SHUTDOWN"' in line and '"host-qmp-quit"' in line for line in mine)


@pytest.mark.parametrize("tool", ["daemon", "system"])
def test_wait_on_blocks_startup_until_a_client_connects(tmp_path: Path, tool: str) -> None:
    """``server=on`` without ``wait=off``: startup waits for the first client, who is served."""
    transcripts = []
    for name in ("qemu", "ours"):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        chardev = f"socket,id=m0,fd={listener.fileno()},server=on"
        if tool == "daemon":
            command = [*(_qsd() if name == "qemu" else OURS_DAEMON),
                       "--chardev", chardev, "--monitor", "m0"]
            prog = "qemu-storage-daemon" if name == "qemu" else "blockgraph-storage-daemon"
        else:
            command = [*(_qemu_system() if name == "qemu" else OURS_SYSTEM), "-S",
                       "-machine", "none", "-nodefaults", "-display", "none",
                       "-chardev", chardev, "-mon", "chardev=m0,mode=control"]
            prog = "qemu-system-x86_64" if name == "qemu" else "blockgraph-system"
        proc = subprocess.Popen(command, pass_fds=[listener.fileno()], env=ENV,
                                stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        listener.close()
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            requests = [b'{"execute": "qmp_capabilities"}']
            if tool == "system":
                requests += [b'{"execute": "query-status"}', b'{"execute": "cont"}',
                             b'{"execute": "query-status"}']
            requests.append(b'{"execute": "quit"}')
            stream = sock.makefile("rb")
            replies = [stream.readline().decode()]
            for request in requests:
                sock.sendall(request)
                # cont is answered after its RESUME event, quit after SHUTDOWN (system).
                lines = 2 if tool == "system" and request.endswith((b'"cont"}', b'"quit"}')) else 1
                replies += [stream.readline().decode() for _ in range(lines)]
            sock.close()
            assert proc.wait(timeout=60) == 0
            assert proc.stderr is not None
            stderr = proc.stderr.read().decode()
            proc.stderr.close()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        text = "".join(replies) + stderr.replace(prog, "PROG").replace(str(port), "PORT")
        text = re.sub(r'"seconds": \d+, "microseconds": \d+', "TIMESTAMP", text)
        text = re.sub(r"fd=\d+", "fd=N", text)
        transcripts.append(_filter(text, str(tmp_path)))
    assert transcripts[1] == transcripts[0]
    assert "info: QEMU waiting for connection on: disconnected:tcp:127.0.0.1:PORT,server=on" in (
        transcripts[1])


# -- option errors -----------------------------------------------------------------------------

_DAEMON_ERRORS = [
    ["--chardev", "socket,id=c0,host=127.0.0.1,server=on,wait=off"],
    ["--chardev", "socket,id=c0,host=127.0.0.1,port=abc,server=on,wait=off"],
    ["--chardev", "socket,id=c0,host=127.0.0.1,port=0,path=/tmp/x,server=on,wait=off"],
    ["--chardev", "socket,id=c0,host=127.0.0.1,port=0,server=on,wait=off,ipv6=on"],
    ["--chardev", "socket,id=c0,host=127.0.0.1,port=0,server=on,wait=off,bogus=1"],
    ["--chardev", "socket,id=c0,host=127.0.0.1,port=0,server=on,wait=off,numeric=on"],
    ["--chardev", "socket,id=c0,host=127.0.0.1,port=0,server=on,wait=maybe"],
    ["--chardev", "socket,id=c0,host=127.0.0.1,port=0,server=on,wait=off,to=abc"],
    ["--chardev", "socket,id=c0,host=127.0.0.1,port=0,server=on,wait=off,reconnect=1"],
    ["--chardev", "socket,id=c0,host=127.0.0.1,port=0,server=on,wait=off,server=off"],
    ["--chardev", "socket,id=c0,host=nosuchhost.invalid,port=0,server=on,wait=off"],
    ["--chardev", "socket,id=c0,fd=abc,server=on,wait=off"],
    ["--chardev", "socket,id=c0,fd=0,server=on,wait=off"],
    ["--chardev", "socket,id=c0"],
    ["--chardev", "socket,id=c0,path=DIR/none/qmp.sock,server=on,wait=off"],
    ["--chardev", "socket,id=c0,path=DIR/nothing-listens.sock"],
    ["--chardev", "socket,id=c0,host=127.0.0.1,port=0,server=on,wait=off,tls-creds=x"],
    ["--chardev", "socket,id=c0,host=127.0.0.1,port=0,server,nowait", "--monitor", "nope"],
    ["--chardev", "socket,id=c0,host=127.0.0.1,port=0,server=on,wait=off,ipv4,nodelay,delay,notelnet",
     "--monitor", "nope"],
    ["--chardev", "socket,id=c0,host=127.0.0.1,port=0,server=on,wait=off",
     "--chardev", "socket,id=c0,path=DIR/a.sock,server=on,wait=off"],
    ["--chardev", "socket,id=c0,host=127.0.0.1,port=0,server=on,wait=off",
     "--monitor", "chardev=c0,pretty=maybe"],
    ["--chardev", "socket,id=c0,host=127.0.0.1,port=0,server=on,wait=off",
     "--monitor", "c0", "--monitor", "c0"],
    ["--chardev", "socket,id=c0,host=127.0.0.1,port=BUSY,server=on,wait=off"],
    ["--chardev", "socket,id=c0,host=127.0.0.1,port=BUSY,to=BUSY,server=on,wait=off"],
    # QemuOpts' id: it must be an identifier, and the first one counts.
    ["--chardev", "socket,id=1x,host=127.0.0.1,port=0,server=on,wait=off"],
    ["--chardev", "socket,id=c0,id=c1,host=127.0.0.1,port=0,server=on,wait=off",
     "--monitor", "c1"],
]

_SYSTEM_ERRORS = [
    ["-qmp", "tcp:127.0.0.1"],
    ["-qmp", "tcp:127.0.0.1:abc,server=on,wait=off"],
    ["-qmp", "tcp:127.0.0.1:0,server=on,wait=off,bogus=1"],
    ["-qmp", "tcp:127.0.0.1:0,server=on,wait=maybe"],
    ["-qmp", "tcp:127.0.0.1:0,server=on,wait=off,pretty=on"],
    ["-qmp", "tcp:127.0.0.1:BUSY,server=on,wait=off"],
    ["-qmp", "unix:DIR/none/qmp.sock,server=on,wait=off"],
    ["-qmp", "bogus:foo"],
    ["-qmp", "none"],
    ["-qmp", "stdio", "-monitor", "stdio"],
    ["-mon", "chardev=nope,mode=control"],
    ["-mon", "mode=control"],
    ["-chardev", "socket,id=c0,host=127.0.0.1,port=0,server=on,wait=off",
     "-mon", "chardev=c0,mode=bogus"],
    ["-chardev", "socket,id=c0,host=127.0.0.1,port=0,server=on,wait=off",
     "-mon", "chardev=c0,mode=control,pretty=maybe"],
    ["-chardev", "socket,id=c0,host=127.0.0.1,port=0,server=on,wait=off",
     "-mon", "chardev=c0,mode=control,bogus=1"],
    ["-chardev", "socket,id=c0,host=127.0.0.1,port=0,server=on,wait=off",
     "-mon", "chardev=c0,mode=control", "-mon", "chardev=c0,mode=control"],
    ["-chardev", "socket,id=c0,host=127.0.0.1,port=0,server=on,wait=off",
     "-chardev", "socket,id=c0,host=127.0.0.1,port=0,server=on,wait=off"],
    ["-chardev", "socket,host=127.0.0.1,port=0,server=on,wait=off"],
    ["-chardev", "socket,id=c0,host=127.0.0.1,port=0,server,nowait", "-mon", "chardev=nope"],
    ["-chardev", "socket,id=1x,host=127.0.0.1,port=0,server=on,wait=off"],
    ["-chardev", "socket,id=c0,id=c1,host=127.0.0.1,port=0,server=on,wait=off",
     "-mon", "chardev=c1"],
    ["-mon", "chardev=nope,id=1y"],
]


def _errors(command: list[str], args: list[str], directory: Path, prog: str,
            busy: int) -> tuple[int, str]:
    argv = [a.replace("DIR", str(directory)).replace("BUSY", str(busy)) for a in args]
    result = subprocess.run([*command, *argv], env=ENV, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60)
    return result.returncode, result.stderr.replace(prog, "PROG").replace(
        str(directory), "DIR").replace(str(busy), "BUSY")


@pytest.mark.parametrize(("tool", "args"),
                         [("daemon", a) for a in _DAEMON_ERRORS]
                         + [("system", a) for a in _SYSTEM_ERRORS])
def test_option_errors_against_qemu(tmp_path: Path, tool: str, args: list[str]) -> None:
    if tool == "daemon":
        pairs = [(_qsd(), "qemu-storage-daemon"), (OURS_DAEMON, "blockgraph-storage-daemon")]
    else:
        machine = ["-machine", "none", "-nodefaults", "-display", "none", "-monitor", "none"]
        if "-monitor" in args:
            machine = machine[:-2]
        pairs = [([*_qemu_system(), *machine], "qemu-system-x86_64"),
                 ([*OURS_SYSTEM, *machine], "blockgraph-system")]
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        results = [_errors(command, args, tmp_path, prog, busy.getsockname()[1])
                   for command, prog in pairs]
    finally:
        busy.close()
    theirs, mine = results
    assert theirs[0] == 1
    assert mine == theirs
