"""Our storage daemon's QMP against real clients and the real daemon.

* ``qemu.qmp``'s ``QMPClient`` (the library QEMU's own tests use) drives
  ``blockgraph storage-daemon`` through a scenario;
* a differential run: the same bytes go to ``qemu-storage-daemon`` 7.2 and to ours, and the
  replies must be identical after filters (versions, ``#blockNNN`` names, paths).

The daemons are started with ``--daemonize --pidfile``: the command returns only once the QMP
socket listens, so no test waits for it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

BLOCKGRAPH = [sys.executable, "-m", "blockgraph", "storage-daemon"]
QSD = shutil.which("qemu-storage-daemon")
QEMU_IMG = shutil.which("qemu-img")


def _require(tool: str | None, name: str) -> str:
    if tool is not None:
        return tool
    if os.environ.get("BLOCKGRAPH_REQUIRE_ORACLES"):
        pytest.fail(f"{name} is required (BLOCKGRAPH_REQUIRE_ORACLES is set)")
    pytest.skip(f"{name} not installed")


def _make_chain(directory: Path) -> None:
    img = _require(QEMU_IMG, "qemu-img")
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run([img, "create", "-q", "-f", "qcow2", str(directory / "base.qcow2"), "16M"],
                   check=True)
    subprocess.run([img, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                    str(directory / "top.qcow2"), "16M"], check=True)
    subprocess.run([img, "create", "-q", "-f", "raw", str(directory / "disk.raw"), "1M"],
                   check=True)


class _Daemon:
    """A daemonized storage daemon (ours or QEMU's), stopped by its pid at the end."""

    def __init__(self, command: list[str], directory: Path) -> None:
        self.socket = str(directory / "qmp.sock")
        self.pidfile = directory / "daemon.pid"
        result = subprocess.run(
            [*command, "--chardev", f"socket,path={self.socket},server=on,wait=off,id=m0",
             "--monitor", "chardev=m0", "--pidfile", str(self.pidfile), "--daemonize"],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")},
        )
        assert result.returncode == 0, result.stderr
        self.pid = int(self.pidfile.read_text())

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


@pytest.fixture
def ours(tmp_path: Path) -> Iterator[_Daemon]:
    _make_chain(tmp_path)
    daemon = _Daemon(BLOCKGRAPH, tmp_path)
    yield daemon
    daemon.stop()


def test_qemu_qmp_client_scenario(ours: _Daemon, tmp_path: Path) -> None:
    qmp = pytest.importorskip("qemu.qmp")

    async def scenario() -> None:
        client = qmp.QMPClient("blockgraph-test")
        await client.connect(ours.socket)
        assert client.greeting is not None
        version = await client.execute("query-version")
        assert version["qemu"] == {"major": 7, "minor": 2, "micro": 0}
        await client.execute("blockdev-add", {
            "driver": "qcow2", "node-name": "top",
            "file": {"driver": "file", "filename": str(tmp_path / "top.qcow2")}})
        nodes = await client.execute("query-named-block-nodes")
        by_name = {n["node-name"]: n for n in nodes}
        top = by_name["top"]
        assert top["backing_file_depth"] == 1
        assert top["image"]["backing-image"]["filename"] == str(tmp_path / "base.qcow2")
        assert top["cache"] == {"writeback": True, "direct": False, "no-flush": False}
        assert len(nodes) == 4  # top, its file, the backing image and its file
        flat = await client.execute("query-named-block-nodes", {"flat": True})
        assert all("backing-image" not in n["image"] for n in flat)
        text = await client.execute("human-monitor-command", {"command-line": "info block"})
        assert text == ""  # no BlockBackends in a storage daemon
        text = await client.execute("human-monitor-command", {"command-line": "info block -n"})
        assert f"top: {tmp_path / 'top.qcow2'} (qcow2)\r\n" in text
        with pytest.raises(qmp.ExecuteError) as err:
            await client.execute("blockdev-del", {"node-name": "nope"})
        assert str(err.value) == "Failed to find node with node-name='nope'"
        await client.execute("blockdev-del", {"node-name": "top"})
        assert await client.execute("query-named-block-nodes") == []
        await client.execute("quit")
        await client.disconnect()

    asyncio.run(asyncio.wait_for(scenario(), 60))


# -- differential ------------------------------------------------------------------------------

def _script(directory: str) -> list[bytes]:
    d = directory
    return [line.replace("DIR", d).encode() for line in [
        '{"execute": "query-version", "id": "early"}',
        '{"execute": "qmp_capabilities", "id": 1}',
        '{"execute": "qmp_capabilities", "id": 2}',
        '{ "execute": }\n',
        '[1, 2]\n',
        '{"arguments": {}}',
        '{"execute": "no-such-command", "id": 4}',
        '{"execute": "query-version", "arguments": {"bogus": 1}, "id": 5}',
        '{"execute": "blockdev-del", "arguments": {}, "id": 6}',
        '{"execute": "blockdev-del", "arguments": {"node-name": 42}, "id": 7}',
        '{"execute": "blockdev-del", "arguments": {"node-name": "nonexistent"}, "id": 8}',
        "{'execute': 'query-version', 'id': 'single-quoted'}",
        '{"execute": "query-version", "id": {"a": [1.5, "\\u00e9/\\ud83d\\ude00", null]}}',
        '{"exec-oob": "query-version", "id": 9}',
        '{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "top-file", "filename": "DIR/top.qcow2"}, "id": 10}',
        '{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "top", "file": "top-file"}, "id": 11}',
        '{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "top", "file": "top-file"}, "id": 12}',
        '{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r0", "file": {"driver": "file", "filename": "DIR/disk.raw"}}, "id": 13}',
        '{"execute": "blockdev-add", "arguments": {"driver": "qcow3", "node-name": "x"}, "id": 14}',
        '{"execute": "blockdev-add", "arguments": {"node-name": "x"}, "id": 15}',
        '{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "file": "top-file"}, "id": 16}',
        '{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "x", "file": 5}, "id": 17}',
        '{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "x", "file": "nope"}, "id": 18}',
        '{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "x", "bogus": 1, "file": "nope"}, "id": 19}',
        '{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "x", "filename": "DIR/base.qcow2", "read-only": "on"}, "id": 20}',
        '{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "x", "filename": "DIR/base.qcow2", "cache": {"writeback": false}}, "id": 21}',
        '{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "x", "file": {"driver": "file"}}, "id": 22}',
        '{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n", "size": "1"}, "id": 23}',
        '{"execute": "query-named-block-nodes", "id": 30}',
        '{"execute": "query-named-block-nodes", "arguments": {"flat": true}, "id": 31}',
        '{"execute": "query-named-block-nodes", "arguments": {"flat": "yes"}, "id": 32}',
        '{"execute": "query-block", "id": 33}',
        '{"execute": "query-blockstats", "id": 34}',
        '{"execute": "query-block-jobs", "id": 35}',
        '{"execute": "block_resize", "arguments": {"device": "nonexistent", "size": 1}, "id": 40}',
        '{"execute": "block_resize", "arguments": {"size": 1}, "id": 41}',
        '{"execute": "block_resize", "arguments": {"node-name": "top"}, "id": 42}',
        '{"execute": "block_resize", "arguments": {"node-name": "top", "size": -1}, "id": 43}',
        '{"execute": "block_resize", "arguments": {"node-name": "top", "size": 1000}, "id": 44}',
        '{"execute": "block_resize", "arguments": {"node-name": "top", "size": 33554432}, "id": 45}',
        '{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "top", "read-only": true, "file": "top-file"}]}, "id": 46}',
        '{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "rf", "filename": "DIR/disk.raw"}, "id": 47}',
        '{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r1", "file": "rf"}, "id": 48}',
        '{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "r1", "read-only": true}]}, "id": 49}',
        '{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "r1", "read-only": true, "file": "rf"}]}, "id": 49}',
        '{"execute": "query-named-block-nodes", "arguments": {"flat": true}, "id": 49}',
        '{"execute": "blockdev-del", "arguments": {"node-name": "r1"}, "id": 49}',
        '{"execute": "blockdev-del", "arguments": {"node-name": "rf"}, "id": 49}',
        '{"execute": "blockdev-del", "arguments": {"node-name": "top-file"}, "id": 50}',
        '{"execute": "blockdev-del", "arguments": {"node-name": "top"}, "id": 51}',
        '{"execute": "blockdev-del", "arguments": {"node-name": "top-file"}, "id": 52}',
        '{"execute": "query-named-block-nodes", "id": 53}',
        '{"execute": "quit", "id": 99}',
    ]]


def _filter(text: str, directory: str) -> str:
    text = text.replace(directory, "TEST_DIR")
    text = re.sub(r'"micro": \d+, "minor": 2, "major": 7\}, "package": "[^"]*"', "VERSION", text)
    text = re.sub(r"#block\d+", "#blockNNN", text)
    return text


def _converse(path: str, script: list[bytes]) -> list[str]:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)  # a bound on a missing reply, never a synchronisation delay
    sock.connect(path)
    stream = sock.makefile("rb")
    out = [stream.readline().decode("ascii")]
    for request in script:
        sock.sendall(request)
        out.append(stream.readline().decode("ascii"))
    sock.close()
    return out


def test_differential_against_qemu_storage_daemon(tmp_path: Path) -> None:
    qsd = _require(QSD, "qemu-storage-daemon")
    runs: list[list[str]] = []
    for name, command in (("qemu", [qsd]), ("ours", BLOCKGRAPH)):
        directory = tmp_path / name
        _make_chain(directory)
        daemon = _Daemon(command, directory)
        try:
            replies = _converse(daemon.socket, _script(str(directory)))
        finally:
            daemon.stop()
        runs.append([_filter(reply, str(directory)) for reply in replies])
    qemu, ours = runs
    for index, (theirs, mine) in enumerate(zip(qemu, ours, strict=True)):
        assert mine == theirs, f"reply {index} differs"


def test_system_qmp_stdio_against_qemu_system(tmp_path: Path) -> None:
    """``-qmp stdio`` of ``blockgraph system`` and of ``qemu-system-x86_64 -machine none``."""
    qemu = _require(shutil.which("qemu-system-x86_64"), "qemu-system-x86_64")
    _make_chain(tmp_path)
    requests = (b'{"execute": "qmp_capabilities"}\n'
                b'{"execute": "query-block"}\n'
                b'{"execute": "human-monitor-command", "arguments": {"command-line": "info block"}}\n'
                b'{"execute": "query-named-block-nodes", "arguments": {"flat": true}}\n'
                b'{"execute": "quit"}\n')
    common = ["-machine", "none", "-nodefaults", "-display", "none", "-drive",
              "if=none,id=d0,file=top.qcow2,cache=writethrough,node-name=n1", "-qmp", "stdio"]
    outputs = []
    for command in ([qemu], [sys.executable, "-m", "blockgraph", "system"]):
        # QEMU must not see the end of its input before it has answered (it would exit early),
        # so stdin stays open until the reply to quit has come.
        proc = subprocess.Popen([*command, *common], cwd=tmp_path, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")})
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(requests)
        proc.stdin.flush()
        lines = [proc.stdout.readline() for _ in range(7)]  # greeting, 4 replies, SHUTDOWN, quit
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
        text = b"".join(lines).decode("ascii")
        text = re.sub(r'"seconds": \d+, "microseconds": \d+', "TIMESTAMP", text)
        outputs.append(_filter(text, str(tmp_path)))
    assert outputs[1] == outputs[0]
