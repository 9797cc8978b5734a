"""``blockgraph nbd`` against the real NBD clients, side by side with qemu-nbd 7.2.

Servers start with ``--fork`` (the parent returns once the socket listens) and stop through
their pid file; nothing here sleeps to synchronise.
"""

from __future__ import annotations

import errno
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

BLOCKGRAPH = [sys.executable, "-m", "blockgraph"]
TOOLS = ("qemu-nbd", "qemu-img", "qemu-io", "nbdinfo", "nbdcopy", "fio")
LIBNBD_PATH = "/usr/lib/python3/dist-packages"
MiB = 1 << 20


def _require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    if os.environ.get("BLOCKGRAPH_REQUIRE_ORACLES"):
        pytest.fail(f"{', '.join(missing)} required (BLOCKGRAPH_REQUIRE_ORACLES is set)")
    pytest.skip(f"{', '.join(missing)} not installed")


def _run(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


def _wait_exit(pid: int, timeout: float = 10.0) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)


class Server:
    """One forked NBD server (ours or qemu-nbd) on a unix socket."""

    def __init__(self, kind: str, tmp: Path, image: Path, *args: str) -> None:
        self.kind = kind
        self.sock = tmp / f"{kind}-{os.getpid()}-{id(self)}.sock"
        self.pid_file = tmp / f"{kind}-{id(self)}.pid"
        exe = BLOCKGRAPH + ["nbd"] if kind == "ours" else ["qemu-nbd"]
        cmd = [*exe, "--fork", "--pid-file", str(self.pid_file), "-k", str(self.sock), *args, str(image)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2] / "src"),
                                             env.get("PYTHONPATH", "")])
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE if kind == "never" else subprocess.DEVNULL,
                              env=env, timeout=60)
        assert proc.returncode == 0, f"{cmd} failed"
        self.pid = int(self.pid_file.read_text())

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def export_uri(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.sock}"

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        _wait_exit(self.pid)


@pytest.fixture(autouse=True)
def _oracles() -> None:
    _require(*TOOLS)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(kind: str, image: Path, *args: str) -> Server:
        server = Server(kind, tmp_path, image, *args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _raw_image(tmp: Path, name: str = "disk.raw") -> Path:
    img = tmp / name
    _run("qemu-img", "create", "-q", "-f", "raw", str(img), "8M")
    _run("qemu-io", "-f", "raw", "-c", "write -P 0xab 0 64k", "-c", "write -P 0x11 1M 192k",
         "-c", "write -P 0x22 5M 4k", str(img))
    return img


def _qcow2_image(tmp: Path, name: str = "top.qcow2") -> Path:
    base = tmp / "base.qcow2"
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "8M")
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x55 0 1M", "-c", "write -P 0x66 6M 512k", str(base))
    top = tmp / name
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top), "8M")
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 2M 64k", "-c", "write -z 3M 128k",
         "-c", "write -z 6M 64k", "-c", "write -P 0x88 512k 4k", str(top))
    return top


def _nbdinfo(*args: str) -> str:
    out = _run("nbdinfo", *args).stdout
    return re.sub(r'"uri": "[^"]*"', '"uri": URI', out)


IMAGES: dict[str, tuple[Callable[[Path], Path], list[str]]] = {
    "raw": (_raw_image, ["-f", "raw"]),
    "qcow2": (_qcow2_image, ["-f", "qcow2"]),
}

CONFIGS = [
    [],
    ["-r"],
    ["-e", "2"],
    ["-x", "exp", "-D", "my description"],
    ["-A"],
    ["--cache=writethrough", "--discard=unmap", "--detect-zeroes=unmap"],
]


@pytest.mark.parametrize("fmt", sorted(IMAGES))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: " ".join(c) or "default")
def test_nbdinfo_json_equal(tmp_path: Path, servers: Callable[..., Server], fmt: str, config: list[str]) -> None:
    make, fmt_args = IMAGES[fmt]
    img = make(tmp_path)
    name = config[config.index("-x") + 1] if "-x" in config else ""
    outputs = []
    for kind in ("qemu", "ours"):
        server = servers(kind, img, "-t", *fmt_args, *config)
        outputs.append(_nbdinfo("--json", server.export_uri(name)))
        if "-x" in config:
            outputs.append(_nbdinfo("--list", "--json", server.uri))
    assert outputs[: len(outputs) // 2] == outputs[len(outputs) // 2 :]


@pytest.mark.parametrize("fmt", sorted(IMAGES))
@pytest.mark.parametrize("context", ["base:allocation", "qemu:allocation-depth"])
def test_nbdinfo_map_equal(tmp_path: Path, servers: Callable[..., Server], fmt: str, context: str) -> None:
    make, fmt_args = IMAGES[fmt]
    img = make(tmp_path)
    maps = []
    for kind in ("qemu", "ours"):
        server = servers(kind, img, "-t", "-r", "-A", *fmt_args)
        maps.append(_nbdinfo(f"--map={context}", server.uri))
        maps.append(_nbdinfo(f"--map={context}", "--totals", server.uri))
    assert maps[:2] == maps[2:]
    assert maps[0].strip()


@pytest.mark.parametrize("fmt", sorted(IMAGES))
def test_qemu_img_map_compare_convert(tmp_path: Path, servers: Callable[..., Server], fmt: str) -> None:
    make, fmt_args = IMAGES[fmt]
    img = make(tmp_path)
    maps = []
    for kind in ("qemu", "ours"):
        server = servers(kind, img, "-t", "-r", *fmt_args)
        maps.append(_run("qemu-img", "map", "--output=json", "-f", "raw", server.uri).stdout)
        _run("qemu-img", "compare", "-f", "raw", "-F", fmt, server.uri, str(img))
        out = tmp_path / f"{kind}.raw"
        _run("qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri, str(out))
        _run("qemu-img", "compare", "-f", "raw", "-F", fmt, str(out), str(img))
    assert maps[0] == maps[1]


def test_qemu_img_convert_into_export(tmp_path: Path, servers: Callable[..., Server]) -> None:
    src = _qcow2_image(tmp_path)
    dst = tmp_path / "dst.qcow2"
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(dst), "8M")
    server = servers("ours", dst, "-t", "-f", "qcow2")
    _run("qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", str(src), server.uri)
    server.stop()
    _run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(src), str(dst))
    assert "No errors" in _run("qemu-img", "check", str(dst)).stdout


@pytest.mark.parametrize("fmt", sorted(IMAGES))
def test_nbdcopy_both_ways(tmp_path: Path, servers: Callable[..., Server], fmt: str) -> None:
    make, fmt_args = IMAGES[fmt]
    img = make(tmp_path)
    expected = tmp_path / "expected.raw"
    _run("qemu-img", "convert", "-f", fmt, "-O", "raw", str(img), str(expected))
    server = servers("ours", img, "-t", "-e", "4", *fmt_args)
    out = tmp_path / "copy.raw"
    _run("nbdcopy", server.uri, str(out))
    assert out.read_bytes() == expected.read_bytes()
    # Into an export: new content, several connections (multi-conn is advertised).
    data = bytearray(os.urandom(8 * MiB))
    data[2 * MiB : 3 * MiB] = bytes(MiB)
    src = tmp_path / "src.raw"
    src.write_bytes(data)
    _run("nbdcopy", "--connections=4", str(src), server.uri)
    back = tmp_path / "back.raw"
    _run("nbdcopy", server.uri, str(back))
    assert back.read_bytes() == bytes(data)
    server.stop()
    _run("qemu-img", "compare", "-f", "raw", "-F", fmt, str(src), str(img))
    if fmt == "qcow2":
        assert "No errors" in _run("qemu-img", "check", str(img)).stdout


@pytest.mark.parametrize("fmt", sorted(IMAGES))
def test_qemu_io_over_nbd(tmp_path: Path, servers: Callable[..., Server], fmt: str) -> None:
    make, fmt_args = IMAGES[fmt]
    img = make(tmp_path)
    server = servers("ours", img, "-t", *fmt_args)
    cmds = ["write -P 0x42 4k 8k", "write -z 64k 64k", "write -z -u 128k 64k", "discard 1M 64k",
            "flush", "write -P 0x43 7M 1M", "aio_write -P 0x44 3M 4k", "aio_flush"]
    out = _run("qemu-io", "-f", "raw", *[a for c in cmds for a in ("-c", c)], server.uri).stdout
    assert "error" not in out.lower() and "failed" not in out.lower(), out
    reads = ["read -P 0x42 4k 8k", "read -P 0 64k 128k", "read -P 0x43 7M 1M", "read -P 0x44 3M 4k"]
    out = _run("qemu-io", "-f", "raw", *[a for c in reads for a in ("-c", c)], server.uri).stdout
    assert "Pattern verification failed" not in out, out
    server.stop()
    out = _run("qemu-io", "-f", fmt, *[a for c in reads for a in ("-c", c)], str(img)).stdout
    assert "Pattern verification failed" not in out, out


def test_fio_verify(tmp_path: Path, servers: Callable[..., Server]) -> None:
    img = tmp_path / "fio.raw"
    _run("qemu-img", "create", "-q", "-f", "raw", str(img), "16M")
    server = servers("ours", img, "-t", "-f", "raw", "-e", "4")
    job = tmp_path / "job.fio"
    job.write_text(
        "[verify]\n"
        "ioengine=nbd\n"
        f"uri={server.uri}\n"
        "rw=randwrite\nbs=4k\nsize=16M\nio_size=4M\niodepth=8\n"
        "verify=crc32c\nverify_fatal=1\nrandrepeat=1\n"
    )
    proc = _run("fio", "--output-format=terse", str(job), check=False, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _libnbd() -> Any:
    if LIBNBD_PATH not in sys.path:
        sys.path.append(LIBNBD_PATH)
    try:
        import nbd  # type: ignore[import-not-found]
    except ImportError:
        _require("python3-libnbd (nbd module)")
    return nbd


def test_libnbd_every_command(tmp_path: Path, servers: Callable[..., Server]) -> None:
    nbd = _libnbd()
    img = _qcow2_image(tmp_path)
    server = servers("ours", img, "-t", "-f", "qcow2", "-A")
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.add_meta_context("qemu:allocation-depth")
    h.connect_uri(server.uri)
    try:
        size = h.get_size()
        assert size == 8 * MiB
        assert h.can_meta_context("base:allocation") and h.can_meta_context("qemu:allocation-depth")
        assert h.can_fua() and h.can_flush() and h.can_trim() and h.can_zero() and h.can_fast_zero()
        assert h.can_cache() and h.can_df() and not h.is_read_only()
        assert h.pread(4096, 0) == b"\x55" * 4096
        chunks: list[tuple[int, int, int]] = []

        def chunk(sub: bytes, offset: int, status: int, err: Any) -> int:
            chunks.append((offset, len(sub), status))
            return 0

        # The range spans top data, backing data and a zero cluster: DF asks for one data chunk.
        got = h.pread_structured(4 * MiB, 0, chunk, nbd.CMD_FLAG_DF)
        assert chunks == [(0, 4 * MiB, nbd.READ_DATA)]
        chunks.clear()
        assert got == h.pread_structured(4 * MiB, 0, chunk)
        assert any(status == nbd.READ_HOLE for _, _, status in chunks)
        assert got[512 * 1024 : 516 * 1024] == b"\x88" * 4096
        assert h.pread(65536, 3 * MiB) == bytes(65536)
        h.pwrite(b"\x99" * 8192, 4 * MiB, nbd.CMD_FLAG_FUA)
        assert h.pread(8192, 4 * MiB) == b"\x99" * 8192
        h.zero(4096, 4 * MiB, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
        h.pwrite(b"\x98" * 65536, 5 * MiB)
        h.zero(65536, 5 * MiB, nbd.CMD_FLAG_FAST_ZERO)  # whole clusters: qcow2 zeroes them cheaply
        assert h.pread(4096, 4 * MiB) == bytes(4096)
        assert h.pread(65536, 5 * MiB) == bytes(65536)
        h.trim(65536, 5 * MiB, nbd.CMD_FLAG_FUA)
        h.flush()
        h.cache(65536, 0)
        seen: dict[str, list[int]] = {}

        def callback(meta: str, offset: int, entries: list[int], err: Any) -> int:
            seen[meta] = list(entries)
            return 0

        h.block_status(8 * MiB, 0, callback)
        assert sum(seen["base:allocation"][0::2]) == 8 * MiB
        # CACHE copied the first cluster up from the backing file, as qemu-nbd does.
        assert seen["qemu:allocation-depth"][:4] == [65536, 1, 512 * 1024 - 65536, 2]
        seen.clear()
        h.block_status(2 * MiB, 0, callback, nbd.CMD_FLAG_REQ_ONE)
        assert len(seen["base:allocation"]) == 2 and len(seen["qemu:allocation-depth"]) == 2
        # Errors the server answers itself, with QEMU's EINVAL.
        with pytest.raises(nbd.Error) as info:
            h.pread(1024, size - 512)
        assert info.value.errno == "EINVAL" or "EINVAL" in str(info.value)
    finally:
        h.shutdown()
    server.stop()
    assert "No errors" in _run("qemu-img", "check", str(img)).stdout


def test_libnbd_read_only_and_errors(tmp_path: Path, servers: Callable[..., Server]) -> None:
    nbd = _libnbd()
    img = _raw_image(tmp_path)
    server = servers("ours", img, "-t", "-f", "raw", "-r")
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(server.uri)
    try:
        assert h.is_read_only()
        with pytest.raises(nbd.Error):
            h.pwrite(b"x" * 512, 0)
        with pytest.raises(nbd.Error):
            h.block_status(4096, 0, lambda *a: 0)  # no meta context selected
        assert h.pread(512, 0) == b"\xab" * 512
    finally:
        h.shutdown()


# -- raw byte conversations: our replies must equal qemu-nbd's ------------------------------


def _connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    return s


# What the client waits for after sending a message: nothing, the option's final reply, the
# EXPORT_NAME answer (with or without the 124 zero bytes), one request's whole reply, or EOF.
Step = tuple[bytes, tuple[Any, ...]]


def _recv_exactly(s: socket.socket, n: int, out: bytearray) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    out += data
    return bytes(data)


def _await_reply(s: socket.socket, expect: tuple[Any, ...], out: bytearray, structured: bool) -> None:
    kind = expect[0]
    if kind == "none":
        return
    if kind == "eof":
        while s.recv(65536):
            pass
        raise EOFError
    if kind == "export-name":
        _recv_exactly(s, 10 + (0 if expect[1] else 124), out)
        return
    if kind == "opt":
        while True:
            _, _, reply, length = struct.unpack(">QIII", _recv_exactly(s, 20, out))
            _recv_exactly(s, length, out)
            if reply == 1 or reply >= 1 << 31:
                return
    if kind == "req":
        read_length = expect[1]
        magic = struct.unpack(">I", _recv_exactly(s, 4, out))[0]
        if magic == 0x67446698:
            error = struct.unpack(">IQ", _recv_exactly(s, 12, out))[0]
            if not error:
                _recv_exactly(s, read_length, out)
            return
        while True:
            if magic is None:
                magic = struct.unpack(">I", _recv_exactly(s, 4, out))[0]
            flags, _, _, length = struct.unpack(">HHQI", _recv_exactly(s, 16, out))
            _recv_exactly(s, length, out)
            if flags & 1:
                return
            magic = None


def _talk(path: Path, steps: list[Step]) -> bytes:
    """Send each message and wait for its answer; the transcript ends at the server's close."""
    s = _connect(path)
    out = bytearray()
    try:
        _recv_exactly(s, 18, out)
        for message, expect in steps:
            try:
                s.sendall(message)
                _await_reply(s, expect, out, True)
            except (EOFError, ConnectionError):
                out += b"<closed>"
                break
            except TimeoutError:
                out += b"<timeout>"
                break
    finally:
        s.close()
    return bytes(out)


def _opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", 0x49484156454F5054, option, len(data)) + data


def _go(name: bytes = b"", infos: tuple[int, ...] = (3,)) -> bytes:
    return _opt(7, struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
                + b"".join(struct.pack(">H", i) for i in infos))


def _req(cmd: int, offset: int, length: int, flags: int = 0, cookie: int = 0x1234) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, flags, cmd, cookie, offset, length)


def _meta(option: int, *queries: bytes, name: bytes = b"") -> bytes:
    body = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    body += b"".join(struct.pack(">I", len(q)) + q for q in queries)
    return _opt(option, body)


NONE: tuple[Any, ...] = ("none",)
OPT: tuple[Any, ...] = ("opt",)
EOF: tuple[Any, ...] = ("eof",)


def R(length: int = 0) -> tuple[Any, ...]:
    return ("req", length)


FLAGS = (struct.pack(">I", 3), NONE)
SR = (_opt(8), OPT)
GO = (_go(), OPT)
ABORT = (_opt(2), OPT)
DISC = (_req(2, 0, 0), EOF)


def O(data: bytes) -> Step:  # noqa: E743
    return (data, OPT)


def Q(cmd: int, offset: int, length: int, flags: int = 0, payload: bytes = b"", reply: int = 0) -> Step:
    return (_req(cmd, offset, length, flags) + payload, R(reply))


CONVERSATIONS: dict[str, list[Step]] = {
    "bad-client-flags": [(struct.pack(">I", 7), EOF)],
    "plain-newstyle-go": [(struct.pack(">I", 0), NONE), (_go(), EOF)],
    "plain-newstyle-export-name": [(struct.pack(">I", 2), NONE), (_opt(1, b""), ("export-name", True)),
                                   Q(0, 0, 512, reply=512), DISC],
    "fixed-export-name-zeroes": [(struct.pack(">I", 1), NONE), (_opt(1, b""), ("export-name", False)),
                                 Q(0, 0, 512, reply=512), DISC],
    "export-name-unknown": [FLAGS, (_opt(1, b"nope"), EOF)],
    "bad-option-magic": [FLAGS, (b"X" * 16, EOF)],
    "option-too-long": [FLAGS, (struct.pack(">QII", 0x49484156454F5054, 3, 64 * MiB), EOF)],
    "list": [FLAGS, O(_opt(3)), O(_opt(3, b"x")), ABORT],
    "starttls": [FLAGS, O(_opt(5)), ABORT],
    "unknown-options": [FLAGS, O(_opt(99)), O(_opt(4)), O(_opt(11)), ABORT],
    "info-variants": [FLAGS, O(_opt(6, struct.pack(">IH", 0, 3) + b"\0\1\0\2\0\3")),
                      O(_opt(6, struct.pack(">I", 4) + b"nope" + b"\0\0")), O(_opt(6, b"\0\0")),
                      O(_opt(6, struct.pack(">I", 5000))), O(_opt(6, struct.pack(">IH", 0, 0) + b"z")),
                      O(_opt(6, struct.pack(">I", 100) + b"n" * 100 + b"\0\0")),
                      O(_opt(6, struct.pack(">I", 3) + b"a\0b" + b"\0\0")), ABORT],
    "structured-twice": [FLAGS, SR, SR, O(_opt(8, b"x")), ABORT],
    "meta-before-structured": [FLAGS, O(_meta(9)), O(_meta(10, b"base:allocation")), ABORT],
    "meta-lists": [FLAGS, SR, O(_meta(9)), O(_meta(9, b"base:")), O(_meta(9, b"qemu:")),
                   O(_meta(9, b"base:allocation", b"x")), O(_meta(9, name=b"nope")),
                   O(_meta(10, b"nothing:here", b"base:allocation")), O(_meta(10, b"qemu:allocation-depth")),
                   O(_meta(9, b"qemu:allocation-depth")), O(_opt(9, b"\0\0\0\0\0\0\0\1\0\0\0\x20abc")),
                   O(_meta(10, b"base:allocation") + b"trailing"), ABORT],
    "go-and-commands": [FLAGS, SR, O(_meta(10, b"base:allocation", b"qemu:allocation-depth")), GO,
                        Q(0, 0, 4096), Q(0, 0, 4096, flags=4), Q(0, 0, 0), Q(0, 0, 64 * MiB),
                        Q(0, 8 * MiB - 512, 1024), Q(0, 0, 512, flags=8), Q(42, 0, 0),
                        Q(7, 0, 8 * MiB), Q(7, 0, 8 * MiB, flags=8), Q(7, 0, 0), Q(7, 4096, 4096),
                        Q(1, 8 * MiB, 512, payload=b"w" * 512), Q(3, 0, 0, flags=1),
                        Q(5, 0, 4096, flags=1), Q(6, 8 * MiB - 512, 512, flags=0x1F),
                        Q(6, 2 * MiB, 4096, flags=0x13), Q(4, 4 * MiB, 4096, flags=1), Q(0, 2 * MiB, 8192),
                        Q(1, 6 * MiB, 1000, payload=b"v" * 1000, flags=1), Q(0, 6 * MiB - 24, 1048),
                        DISC],
    "simple-replies": [FLAGS, GO, Q(0, 0, 512, reply=512), Q(0, 0, 512, flags=4), Q(7, 0, 4096),
                       Q(0, 0, 64 * MiB), Q(1, 0, 512, flags=2, payload=b"x" * 512), DISC],
    "bad-request-magic": [FLAGS, SR, GO, (b"\xde\xad\xbe\xef" + _req(0, 0, 512)[4:], R()), (_req(0, 0, 512), EOF)],
    "write-too-big": [FLAGS, SR, GO, (_req(1, 0, 64 * MiB), R()), (_req(0, 0, 512), EOF)],
    "abort-with-data": [FLAGS, (_opt(2, b"abc"), OPT), (b"", EOF)],
    "set-then-go-other-name": [FLAGS, SR, O(_meta(10, b"base:allocation", name=b"x")), GO, Q(7, 0, 4096), DISC],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_conversation_equals_qemu(tmp_path: Path, servers: Callable[..., Server], name: str) -> None:
    replies = []
    for kind in ("qemu", "ours"):
        img = _raw_image(tmp_path, f"{kind}.raw")  # each server gets its own (writes happen)
        server = servers(kind, img, "-t", "-f", "raw", "-A")
        replies.append(_talk(server.sock, CONVERSATIONS[name]))
    assert replies[1] == replies[0]


def test_read_only_conversation_equals_qemu(tmp_path: Path, servers: Callable[..., Server]) -> None:
    img = _raw_image(tmp_path)
    talk = [FLAGS, SR, GO, Q(1, 0, 512, payload=b"w" * 512), Q(6, 0, 512), Q(4, 0, 512),
            Q(3, 0, 0), Q(0, 0, 512, flags=1), Q(7, 0, 512), DISC]
    replies = [_talk(servers(kind, img, "-t", "-f", "raw", "-r").sock, talk) for kind in ("qemu", "ours")]
    assert replies[1] == replies[0]


def test_hostile_client_does_not_hurt_others(tmp_path: Path, servers: Callable[..., Server]) -> None:
    nbd = _libnbd()
    img = _raw_image(tmp_path)
    server = servers("ours", img, "-t", "-f", "raw", "-e", "0")
    good = nbd.NBD()
    good.connect_uri(server.uri)
    try:
        hostile = _connect(server.sock)
        hostile.recv(18)
        hostile.sendall(FLAGS[0] + SR[0] + GO[0])
        reply = b""
        while not reply.endswith(struct.pack(">QIII", 0x3E889045565A9, 7, 1, 0)):
            chunk = hostile.recv(4096)
            assert chunk
            reply += chunk
        hostile.sendall(os.urandom(4096))
        leftovers = b""
        while True:
            chunk = hostile.recv(65536)
            if not chunk:
                break  # disconnected
            leftovers += chunk
        hostile.close()
        assert good.pread(512, 0) == b"\xab" * 512
        good.pwrite(b"\x01" * 512, 4096)
        assert good.pread(512, 4096) == b"\x01" * 512
        # A new connection is still served.
        again = nbd.NBD()
        again.connect_uri(server.uri)
        assert again.pread(512, 4096) == b"\x01" * 512
        again.shutdown()
    finally:
        good.shutdown()


def test_cli_errors_match_qemu_nbd(tmp_path: Path) -> None:
    img = _raw_image(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    cases = [
        [],
        [str(img), str(img)],
        ["--cache=bad", str(img)],
        ["--aio=bad", str(img)],
        ["--discard=bad", str(img)],
        ["--detect-zeroes=bad", str(img)],
        ["--detect-zeroes=unmap", str(img)],
        ["-e", "x", str(img)],
        ["-k", "relative.sock", str(img)],
        ["--image-opts", "-f", "raw", str(img)],
        ["-f", "qcow2", str(img)],
        ["-f", "raw", str(tmp_path / "missing.raw")],
        ["--bogus", str(img)],
        ["-k", str(tmp_path / "no" / "dir.sock"), "-f", "raw", str(img)],
        ["--fork", "-k", str(tmp_path / "f.sock"), "-f", "raw", str(tmp_path / "missing.raw")],
        ["-k", str(tmp_path / "b.sock"), "-f", "raw", "-B", "b0", str(img)],
    ]
    for args in cases:
        qemu = subprocess.run(["qemu-nbd", *args], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
        ours = subprocess.run([*BLOCKGRAPH, "nbd", *args], capture_output=True, text=True, timeout=30,
                              env=env, stdin=subprocess.DEVNULL)
        assert (ours.returncode, ours.stderr.replace("blockgraph-nbd", "qemu-nbd")) == (
            qemu.returncode, qemu.stderr), args


def test_fork_parent_returns_when_listening(tmp_path: Path, servers: Callable[..., Server]) -> None:
    img = _raw_image(tmp_path)
    server = servers("ours", img, "-f", "raw")
    # No retry: the socket must accept as soon as the parent has returned.
    s = _connect(server.sock)
    assert s.recv(18)[:8] == b"NBDMAGIC"
    s.close()
    # Not persistent: the server exits once its last client has gone.
    _wait_exit(server.pid)
    assert not Path(f"/proc/{server.pid}").exists() or _zombie(server.pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def test_persistent_serves_several_clients(tmp_path: Path, servers: Callable[..., Server]) -> None:
    img = _raw_image(tmp_path)
    server = servers("ours", img, "-t", "-f", "raw")
    for _ in range(3):
        info = json.loads(_run("nbdinfo", "--json", server.uri).stdout)
        assert info["exports"][0]["export-size"] == 8 * MiB


def test_cache_copies_on_read_like_qemu_nbd(tmp_path: Path, servers: Callable[..., Server]) -> None:
    """NBD_CMD_CACHE copies whole clusters from the backing file into the overlay, as qemu-nbd
    does, and fails with EPERM on a read-only export that would need a copy."""
    nbd = _libnbd()
    base = tmp_path / "base.qcow2"
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M")
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", str(base))
    maps = {}
    for kind in ("qemu", "ours"):
        results = []
        for mode in ("rw", "ro"):
            overlay = tmp_path / f"{kind}-{mode}.qcow2"
            _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                 str(overlay))
            server = servers(kind, overlay, "-f", "qcow2", *(["-r"] if mode == "ro" else []))
            h = nbd.NBD()
            h.connect_uri(server.uri)
            for count, offset in ((4096, 70000), (4096, 2 * MiB), (100, 3 * MiB + 5)):
                try:
                    h.cache(count, offset)
                    results.append("ok")
                except nbd.Error as exc:
                    results.append(f"errno {exc.errno}")
            # The copied data reads back as the base's, wherever it now comes from.
            assert h.pread(4096, 4096) == b"\x11" * 4096
            h.shutdown()
            server.stop()
        assert results == ["ok"] * 3 + [f"errno {errno.errorcode[errno.EPERM]}"] * 3
        rw = tmp_path / f"{kind}-rw.qcow2"
        check = _run("qemu-img", "check", str(rw))
        assert "No errors were found" in check.stdout
        mapped = json.loads(_run("qemu-img", "map", "--output=json", str(rw)).stdout)
        maps[kind] = [{k: v for k, v in m.items() if k != "offset"} for m in mapped]
        # Ro export: nothing was copied.
        ro_map = json.loads(_run("qemu-img", "map", "--output=json",
                                 str(tmp_path / f"{kind}-ro.qcow2")).stdout)
        assert all(m["depth"] >= 1 for m in ro_map)
    assert maps["ours"] == maps["qemu"]
    assert any(m["depth"] == 0 and m["data"] for m in maps["ours"])  # data was copied up
    assert any(m["depth"] == 0 and m["zero"] for m in maps["ours"])  # zeroes as zero clusters


def test_big_reads_reuse_buffers_without_leaking(tmp_path: Path, servers: Callable[..., Server]) -> None:
    # Big read replies come from per-connection buffers that are reused once the socket took
    # them. Reads of the same size over data, holes and data again must each return exactly
    # the file's bytes: nothing of an earlier read may show through a hole or a short file.
    nbd = _libnbd()
    img = tmp_path / "disk.raw"
    _run("qemu-img", "create", "-q", "-f", "raw", str(img), "8M")
    _run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 1M 64k",
         "-c", "write -P 0x33 1984k 64k", "-c", "write -P 0x44 4M 4M", str(img))
    expected = img.read_bytes()
    server = servers("ours", img, "-f", "raw")
    h = nbd.NBD()
    h.connect_uri(server.uri)
    try:
        size = 1 << 20
        for offset in (0, 1 << 20, 0, 3 << 20, 4 << 20, 1 << 20, 3 << 20):
            assert h.pread(size, offset) == expected[offset : offset + size], offset
            # DF: one data chunk, the hole read from the file.
            got = h.pread_structured(size, offset, lambda *_: 0, nbd.CMD_FLAG_DF)
            assert got == expected[offset : offset + size], offset
        # Many in flight at once, answered out of order from the pool's buffers.
        chunk = 256 * 1024
        reads = []
        for off in range(0, 8 << 20, chunk):
            buf = nbd.Buffer(chunk)
            reads.append((off, buf, h.aio_pread(buf, off)))
        for off, buf, cookie in reads:
            while not h.aio_command_completed(cookie):
                h.poll(-1)
            assert buf.to_bytearray() == expected[off : off + chunk], off
    finally:
        h.shutdown()
