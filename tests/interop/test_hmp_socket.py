"""The human monitor on a socket chardev, byte for byte against qemu-system-x86_64 7.2.

QEMU's line editor echoes and redraws each typed byte with terminal escapes; a client sees
exactly those bytes. The same keystrokes go to both emulators and everything the client
receives is compared, after the greeting's version and the socket names are filtered.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parents[2]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.interop.test_qmp_client import _require  # noqa: E402

SRC = str(Path(__file__).resolve().parents[2] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC}
OURS_SYSTEM = [sys.executable, "-m", "blockgraph", "system"]
TIMEOUT = 30  # a bound on a missing reply, never a synchronisation delay
MACHINE = ["-machine", "none", "-nodefaults", "-display", "none", "-S", "-monitor", "none"]

# Editing keys, history, control bytes, UTF-8, commands with and without output; every
# byte is handled on its own, so the whole script can go at once.
KEYSTROKES = (
    b"ab\x7fc"            # insert, backspace
    b"\x01X"              # Ctrl-A, insert at the start
    b"\x05Y\x1b[DZ"       # Ctrl-E, left arrow, insert in the middle
    b"\x1b[3~"            # Delete
    b"\x1b[1~W\x1b[4~"    # Home, End (CSI)
    b"\x1bOHQ\x1bOF"      # Home, End (SS3)
    b"\x04\x17"           # Ctrl-D at the end of line, Ctrl-W
    b"\r"                 # empty line
    b"info block\n"
    b"\x1b[A\x1b[A\x1b[B\x1b[B\n"  # history up past the oldest, down past the newest
    b"\x1b[A\n"           # history recalled and run
    b"abc\x08\x08\x03\x0c\x15\n"  # BS, ignored Ctrl-C and Ctrl-U, Ctrl-L redraw
    b"x\xc3\xa9y\n"       # UTF-8 goes through byte by byte
    b"info chardev\r\n"   # CR LF: a line, then an empty line
    b"help quit\n"
    b"nosuchcmd arg\n"
    b"quit\n"
)


def _qemu_system() -> list[str]:
    return [_require(shutil.which("qemu-system-x86_64"), "qemu-system-x86_64")]


def _session(command: list[str], family: int, directory: Path) -> bytes:
    if family == socket.AF_UNIX:
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(directory / "hmp.sock"))
    else:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    address = listener.getsockname()
    proc = subprocess.Popen(
        [*command, *MACHINE, "-chardev", f"socket,id=h0,fd={listener.fileno()},server=on,wait=off",
         "-mon", "chardev=h0,mode=readline"],
        pass_fds=[listener.fileno()], env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    listener.close()
    try:
        with socket.socket(family) as client:
            client.settimeout(TIMEOUT)
            client.connect(address)
            client.sendall(KEYSTROKES)
            received = bytearray()
            # The connection ends when the emulator exits after quit.
            while chunk := client.recv(65536):
                received += chunk
        assert proc.wait(timeout=TIMEOUT) == 0
        return bytes(received)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def _filter(data: bytes, directory: Path) -> bytes:
    data = data.replace(str(directory).encode(), b"DIR")
    first, _, rest = data.partition(b"\r\n")
    assert first.startswith(b"QEMU 7.2.") and first.endswith(
        b" monitor - type 'help' for more information")
    # The chardev's filename names the address: a unix path or a TCP port.
    lines = [b"CHARDEV" if b"h0: filename=" in line else line for line in rest.split(b"\r\n")]
    return b"QEMU VERSION monitor\r\n" + b"\r\n".join(lines)


@pytest.mark.parametrize("family", [socket.AF_UNIX, socket.AF_INET], ids=["unix", "tcp"])
def test_hmp_socket_session_matches_qemu(tmp_path: Path, family: int) -> None:
    outputs = []
    for name, command in (("qemu", _qemu_system()), ("ours", OURS_SYSTEM)):
        directory = tmp_path / name
        directory.mkdir()
        outputs.append(_filter(_session(command, family, directory), directory))
    theirs, mine = outputs
    assert mine == theirs
    # Not vacuous: the redraws, the recalled line and the command output are there.
    assert b"\x1b[D\x1b[DXac\x1b[K" in mine
    assert b"\x1b[2J\x1b[1;1H(qemu) a\x1b[K" in mine
    assert b"unknown command: 'nosuchcmd'" in mine
