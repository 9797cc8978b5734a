"""qcow2 external data files (``data_file``, ``data_file_raw``) against qemu-img / qemu-io 7.2.

qemu-img's images read back identically; the same qemu-io commands leave the same qcow2 file
and the same data file with us as with QEMU; images we create and write pass ``qemu-img check``
and ``qemu-img compare``, and a raw data file is the guest disk itself. Texts (info, map,
check, errors) are compared with the real tools' output.

QEMU 7.2 opens the data file under the name the header records *as written*, i.e. relative to
the working directory (not to the image, unlike backing files), so the tools run with the test
directory as their working directory.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parents[2]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.oracle import require_qemu  # noqa: E402

from blockgraph.drivers.base import ChildRole, RequestFlags  # noqa: E402
from blockgraph.errors import BlockError, IOFailure  # noqa: E402
from blockgraph.graph.create import create_image  # noqa: E402
from blockgraph.graph.layer import BlockLayer  # noqa: E402
from blockgraph.jobs.create import CreateJob  # noqa: E402
from blockgraph.jobs.job import JobManager  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20

# A mix that touches every path: partial writes into new clusters (COW), whole clusters,
# zeroes over allocated and unallocated clusters, with and without unmap, discards, and the
# cluster at host offset 0 (which only bit 63 tells from an unallocated one).
QEMU_IO_OPS = [
    "write -P 0xab 4k 8k", "write -P 0xcd 512k 64k", "write -z 128k 64k", "write -P 0x22 128k 4k",
    "write -z 512k 64k", "write -P 0x11 0 512", "discard 192k 64k", "write -z -u 256k 64k",
    "write -P 0x33 960k 64k", "write -z 0 64k", "write -P 0x44 0 4k", "write -P 0x55 700k 100k",
    "discard 768k 64k",
]


@pytest.fixture(autouse=True)
def _oracles() -> None:
    require_qemu()


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, cwd=str(cwd))


def _qemu(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    r = _run(cwd, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _bg(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blockgraph.tools.main", *args],
                          capture_output=True, text=True, cwd=str(cwd),
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


def _ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _io_args(ops: list[str]) -> list[str]:
    return [a for op in ops for a in ("-c", op)]


def _check_clean(cwd: Path, image: str) -> None:
    r = _run(cwd, "qemu-img", "check", image)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No errors were found" in r.stdout and "leaked" not in r.stdout


def _compare(cwd: Path, image: str, model: bytes) -> None:
    (cwd / "model.bin").write_bytes(model)
    _qemu(cwd, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, "model.bin")


def _raw_opt(raw: bool) -> str:
    return f"data_file=d.raw,data_file_raw={'on' if raw else 'off'}"


# ------------------------------------------------------------------ qemu's images, read by us

@pytest.mark.parametrize("raw", [True, False], ids=["raw", "nonraw"])
@pytest.mark.parametrize("cluster_size", ["65536", "4096"])
def test_qemu_image_reads_identically(tmp_path: Path, raw: bool, cluster_size: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _qemu(tmp_path, "qemu-img", "create", "-q", "-f", "qcow2", "-o",
          f"{_raw_opt(raw)},cluster_size={cluster_size}", "x.qcow2", "1M")
    _qemu(tmp_path, "qemu-io", *_io_args(QEMU_IO_OPS), "x.qcow2")
    _qemu(tmp_path, "qemu-img", "convert", "-O", "raw", "x.qcow2", "qemu.out")
    expected = (tmp_path / "qemu.out").read_bytes()
    _ok(_bg(tmp_path, "img", "convert", "-O", "raw", "x.qcow2", "ours.out"))
    assert (tmp_path / "ours.out").read_bytes() == expected
    if raw:
        assert (tmp_path / "d.raw").read_bytes() == expected

    # In process, through the graph; from elsewhere the data file is named as an option.
    monkeypatch.chdir("/")
    layer = BlockLayer()
    try:
        node = layer.run(layer.open_node(str(tmp_path / "x.qcow2"), {
            "driver": "qcow2", "read-only": True,
            "data-file.filename": str(tmp_path / "d.raw")}))
        data = node.child("data-file")
        assert data is not None and data.role == ChildRole.DATA
        buf = bytearray(MiB)
        layer.run(node.preadv(0, memoryview(buf)))
        assert bytes(buf) == expected
        st = layer.run(node.block_status(4096, 4096))
        assert st.file is not None and st.file.filename == str(tmp_path / "d.raw")
    finally:
        layer.close()


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "nonraw"])
def test_same_files_as_qemu(tmp_path: Path, raw: bool) -> None:
    """The same creation and qemu-io commands leave byte-identical qcow2 and data files."""
    qdir, odir = tmp_path / "qemu", tmp_path / "ours"
    qdir.mkdir()
    odir.mkdir()
    _qemu(qdir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", _raw_opt(raw), "x.qcow2", "1M")
    _ok(_bg(odir, "img", "create", "-q", "-f", "qcow2", "-o", _raw_opt(raw), "x.qcow2", "1M"))
    assert (odir / "x.qcow2").read_bytes() == (qdir / "x.qcow2").read_bytes()
    assert (odir / "d.raw").stat().st_size == (qdir / "d.raw").stat().st_size == MiB
    _qemu(qdir, "qemu-io", *_io_args(QEMU_IO_OPS), "x.qcow2")
    _ok(_bg(odir, "io", *_io_args(QEMU_IO_OPS), "x.qcow2"))
    assert (odir / "x.qcow2").read_bytes() == (qdir / "x.qcow2").read_bytes()
    assert (odir / "d.raw").read_bytes() == (qdir / "d.raw").read_bytes()
    _check_clean(odir, "x.qcow2")


@pytest.mark.parametrize("opts", [
    "data_file=d.raw,backing_file=base.qcow2,backing_fmt=qcow2",
    "data_file=d.raw,lazy_refcounts=on",
    "data_file=d.raw,extended_l2=on",
    "data_file=d.raw,data_file_raw=on,extended_l2=on",
    "data_file=d.raw,data_file_raw=on,cluster_size=512",
])
def test_feature_combinations(tmp_path: Path, opts: str) -> None:
    """With a backing file (COW from it into the data file), lazy refcounts, extended L2
    entries, small clusters: the same guest content as QEMU, a clean image, and where the data
    file is raw, the same data file. Without extended L2 entries also the same qcow2 file."""
    qdir, odir = tmp_path / "qemu", tmp_path / "ours"
    for d in (qdir, odir):
        d.mkdir()
        _qemu(d, "qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "1M")
        _qemu(d, "qemu-io", "-c", "write -P 0x77 0 1M", "base.qcow2")
    ops = [*QEMU_IO_OPS, "write -P 0x66 70k 2k"]
    _qemu(qdir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "x.qcow2", "1M")
    _qemu(qdir, "qemu-io", *_io_args(ops), "x.qcow2")
    _ok(_bg(odir, "img", "create", "-q", "-f", "qcow2", "-o", opts, "x.qcow2", "1M"))
    _ok(_bg(odir, "io", *_io_args(ops), "x.qcow2"))
    _check_clean(odir, "x.qcow2")
    _qemu(qdir, "qemu-img", "convert", "-O", "raw", "x.qcow2", "guest.out")
    _qemu(odir, "qemu-img", "convert", "-O", "raw", "x.qcow2", "guest.out")
    guest = (qdir / "guest.out").read_bytes()
    assert (odir / "guest.out").read_bytes() == guest
    if "data_file_raw=on" in opts:
        assert (odir / "d.raw").read_bytes() == (qdir / "d.raw").read_bytes() == guest
    if "extended_l2" not in opts and "cluster_size" not in opts:
        assert (odir / "x.qcow2").read_bytes() == (qdir / "x.qcow2").read_bytes()
        assert (odir / "d.raw").read_bytes() == (qdir / "d.raw").read_bytes()


def test_data_file_by_reference(tmp_path: Path) -> None:
    """``data-file`` naming an existing node (blockdev-add style) instead of a filename."""
    _qemu(tmp_path, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=d.raw",
          "x.qcow2", "1M")
    _qemu(tmp_path, "qemu-io", "-c", "write -P 0x3c 60k 10k", "x.qcow2")
    layer = BlockLayer()
    try:
        df = layer.run(layer.open_node(None, {"driver": "file", "node-name": "df",
                                              "filename": str(tmp_path / "d.raw")}))
        node = layer.run(layer.open_node(None, {
            "driver": "qcow2", "node-name": "q",
            "file.driver": "file", "file.filename": str(tmp_path / "x.qcow2"),
            "data-file": "df"}))
        child = node.child("data-file")
        assert child is not None and child.node is df and child.role == ChildRole.DATA
        layer.run(node.pwritev(1024, memoryview(b"\x5b" * 2048)))
        buf = bytearray(128 * 1024)
        layer.run(node.preadv(0, memoryview(buf)))
        expected = bytearray(128 * 1024)
        expected[1024:3072] = b"\x5b" * 2048
        expected[60 * 1024:70 * 1024] = b"\x3c" * 10240
        assert buf == expected
    finally:
        layer.close()
    _check_clean(tmp_path, "x.qcow2")
    _compare(tmp_path, "x.qcow2", bytes(expected) + bytes(MiB - len(expected)))


# ------------------------------------------------------------------ our images, checked by qemu

async def _random_writes(node: object, size: int, seed: int, model: bytearray) -> None:
    rng = random.Random(seed)
    for _ in range(60):
        off = rng.randrange(0, size // 512) * 512
        length = min(size - off, rng.randrange(1, 300) * 512)
        op = rng.randrange(4)
        if op <= 1:
            payload = rng.randbytes(length)
            await node.pwritev(off, memoryview(payload))  # type: ignore[attr-defined]
            model[off:off + length] = payload
        elif op == 2:
            flags = RequestFlags.MAY_UNMAP if rng.randrange(2) else RequestFlags.NONE
            await node.pwrite_zeroes(off, length, flags)  # type: ignore[attr-defined]
            model[off:off + length] = bytes(length)
        else:
            # Discarded whole clusters read as zeros (no backing file); edges keep data.
            await node.pdiscard(off, length)  # type: ignore[attr-defined]
            cs = 65536
            lo, hi = -(-off // cs) * cs, (off + length) // cs * cs
            if hi > lo:
                model[lo:hi] = bytes(hi - lo)
    await node.flush()  # type: ignore[attr-defined]


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "nonraw"])
def test_our_writes_pass_check_and_compare(tmp_path: Path, raw: bool,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    size = 3 * MiB
    model = bytearray(size)
    layer = BlockLayer()
    try:
        layer.run(create_image(layer, "x.qcow2", "qcow2", size,
                               {"data_file": "d.raw", "data_file_raw": raw}))
        node = layer.run(layer.open_node("x.qcow2", {"driver": "qcow2", "discard": "unmap"}))
        layer.run(_random_writes(node, size, 5 + raw, model))
    finally:
        layer.close()
    _check_clean(tmp_path, "x.qcow2")
    _compare(tmp_path, "x.qcow2", bytes(model))
    if raw:
        assert (tmp_path / "d.raw").read_bytes() == bytes(model)
    # And what we read back through our own tool is the same.
    _ok(_bg(tmp_path, "img", "convert", "-O", "raw", "x.qcow2", "back.raw"))
    assert (tmp_path / "back.raw").read_bytes() == bytes(model)


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
def test_preallocation_like_qemu(tmp_path: Path, mode: str) -> None:
    qdir, odir = tmp_path / "qemu", tmp_path / "ours"
    qdir.mkdir()
    odir.mkdir()
    opts = f"data_file=d.raw,preallocation={mode}"
    _qemu(qdir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "x.qcow2", "1M")
    _ok(_bg(odir, "img", "create", "-q", "-f", "qcow2", "-o", opts, "x.qcow2", "1M"))
    assert (odir / "x.qcow2").read_bytes() == (qdir / "x.qcow2").read_bytes()
    assert (odir / "d.raw").stat().st_size == MiB
    allocated = (odir / "d.raw").stat().st_blocks * 512
    assert allocated >= MiB if mode != "metadata" else allocated < MiB
    _check_clean(odir, "x.qcow2")


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "nonraw"])
def test_resize_like_qemu(tmp_path: Path, raw: bool) -> None:
    qdir, odir = tmp_path / "qemu", tmp_path / "ours"
    for d, tool in ((qdir, "qemu"), (odir, "ours")):
        d.mkdir()
        _qemu(d, "qemu-img", "create", "-q", "-f", "qcow2", "-o", _raw_opt(raw), "x.qcow2", "1M")
        _qemu(d, "qemu-io", "-c", "write -P 7 900k 124k", "x.qcow2")
        if tool == "qemu":
            _qemu(d, "qemu-img", "resize", "-q", "x.qcow2", "2M")
        else:
            _ok(_bg(d, "img", "resize", "-q", "x.qcow2", "2M"))
        assert (d / "d.raw").stat().st_size == 2 * MiB
    assert (odir / "x.qcow2").read_bytes() == (qdir / "x.qcow2").read_bytes()
    _check_clean(odir, "x.qcow2")
    _ok(_bg(odir, "img", "resize", "-q", "--shrink", "x.qcow2", "960k"))
    _qemu(qdir, "qemu-img", "resize", "-q", "--shrink", "x.qcow2", "960k")
    assert (odir / "d.raw").stat().st_size == 960 * 1024
    assert (odir / "x.qcow2").read_bytes() == (qdir / "x.qcow2").read_bytes()
    _check_clean(odir, "x.qcow2")


def test_convert_to_data_file(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    rng = random.Random(3)
    content = bytearray(2 * MiB)
    for _ in range(20):
        off = rng.randrange(0, 2 * MiB - 70000)
        content[off:off + 70000] = rng.randbytes(70000)
    src.write_bytes(bytes(content))
    for raw in ("on", "off"):
        out = f"c{raw}.qcow2"
        _ok(_bg(tmp_path, "img", "convert", "-O", "qcow2", "-o",
                f"data_file=c{raw}.data,data_file_raw={raw}", "src.raw", out))
        _check_clean(tmp_path, out)
        _compare(tmp_path, out, bytes(content))
        if raw == "on":
            assert (tmp_path / "con.data").read_bytes() == bytes(content)


def test_blockdev_create(tmp_path: Path) -> None:
    layer = BlockLayer()
    manager = JobManager(lambda name, data: None)
    for name in ("q.qcow2", "d.raw"):
        (tmp_path / name).touch()

    async def scenario() -> None:
        await layer.open_node(None, {"driver": "file", "filename": str(tmp_path / "q.qcow2"),
                                     "node-name": "qf"})
        await layer.open_node(None, {"driver": "file", "filename": str(tmp_path / "d.raw"),
                                     "node-name": "df"})
        job = CreateJob(manager, "q", layer, {"driver": "qcow2", "file": "qf", "data-file": "df",
                                              "data-file-raw": True, "size": MiB})
        manager.add(job)
        job.start()
        await job.wait()
        assert job.error is None
        # Inline data-file options, and QEMU's refusals before any I/O.
        (tmp_path / "e.raw").touch()
        job = CreateJob(manager, "r", layer, {
            "driver": "qcow2", "size": MiB,
            "file": {"driver": "file", "filename": str(tmp_path / "r.qcow2")},
            "data-file": {"driver": "file", "filename": str(tmp_path / "e.raw")}})
        (tmp_path / "r.qcow2").touch()
        manager.add(job)
        job.start()
        await job.wait()
        assert job.error is None
        refusals: list[tuple[dict[str, object], str]] = [
            ({"data-file-raw": True}, "data-file-raw requires data-file"),
            ({"data-file": "df", "version": "v2"},
             "External data files are only supported with compatibility level 1.1 and above "
             "(use version=v3 or greater)"),
        ]
        for opts, text in refusals:
            bad = CreateJob(manager, "bad", layer, {"driver": "qcow2", "file": "qf",
                                                    "size": MiB, **opts})
            with pytest.raises(BlockError) as exc:
                bad.prepare()
            assert str(exc.value) == text

    try:
        layer.run(scenario())
    finally:
        layer.close()
    assert (tmp_path / "d.raw").stat().st_size == MiB
    info = json.loads(_qemu(tmp_path, "qemu-img", "info", "--output=json", "q.qcow2").stdout)
    assert info["format-specific"]["data"]["data-file"] == str(tmp_path / "d.raw")
    assert info["format-specific"]["data"]["data-file-raw"] is True
    _check_clean(tmp_path, "q.qcow2")
    _check_clean(tmp_path, "r.qcow2")
    _qemu(tmp_path, "qemu-io", "-c", "write -P 9 0 100k", "q.qcow2")
    assert (tmp_path / "d.raw").read_bytes()[:102400] == b"\x09" * 102400


def _qsd() -> str:
    qsd = shutil.which("qemu-storage-daemon")
    if qsd is None:
        if os.environ.get("BLOCKGRAPH_REQUIRE_ORACLES"):
            pytest.fail("qemu-storage-daemon is required (BLOCKGRAPH_REQUIRE_ORACLES is set)")
        pytest.skip("qemu-storage-daemon not installed")
    return qsd


def _daemon_create(command: list[str], cwd: Path, jobs: list[dict[str, object]]) -> list[object]:
    """Run blockdev-create jobs over a stdio QMP monitor; the final query-jobs reply."""
    proc = subprocess.Popen([*command, "--chardev", "stdio,id=m", "--monitor", "chardev=m"],
                            cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.stdin is not None and proc.stdout is not None

    def send(execute: str, arguments: dict[str, object] | None = None) -> None:
        msg: dict[str, object] = {"execute": execute}
        if arguments is not None:
            msg["arguments"] = arguments
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(msg) + "\n")
        proc.stdin.flush()

    def reply() -> dict[str, object]:
        # The next reply; events (job status changes) are read past.
        while True:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
            msg = json.loads(line)
            if "event" not in msg:
                return dict(msg)

    try:
        proc.stdout.readline()  # greeting
        send("qmp_capabilities")
        reply()
        for node, name in (("qf", "q.qcow2"), ("df", "d.raw")):
            send("blockdev-add", {"driver": "file", "node-name": node, "filename": name})
            assert reply() == {"return": {}}
        for job in jobs:
            send("blockdev-create", {"job-id": job["job-id"], "options": job["options"]})
            assert reply() == {"return": {}}
            # Done when the job has concluded: poll with query-jobs (each answer is a
            # synchronisation point, no sleeping).
            while True:
                send("query-jobs")
                states = reply()["return"]
                assert isinstance(states, list)
                if all(j["status"] == "concluded" for j in states):
                    break
        send("query-jobs")
        result = reply()["return"]
        send("quit")
        reply()
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    assert isinstance(result, list)
    return result


def test_blockdev_create_against_qemu_storage_daemon(tmp_path: Path) -> None:
    """The same QMP blockdev-create jobs: same results and errors, byte-identical images."""
    qsd = _qsd()
    jobs: list[dict[str, object]] = [
        {"job-id": "bad1", "options": {"driver": "qcow2", "file": "qf", "size": MiB,
                                       "data-file-raw": True}},
        {"job-id": "bad2", "options": {"driver": "qcow2", "file": "qf", "size": MiB,
                                       "data-file": "df", "version": "v2"}},
        {"job-id": "ok", "options": {"driver": "qcow2", "file": "qf", "size": MiB,
                                     "data-file": "df", "data-file-raw": True}},
    ]
    results = []
    for name, command in (("qemu", [qsd]), ("ours", [sys.executable, "-m", "blockgraph",
                                                      "storage-daemon"])):
        d = tmp_path / name
        d.mkdir()
        (d / "q.qcow2").touch()
        (d / "d.raw").touch()
        results.append(_daemon_create(command, d, jobs))
    assert results[1] == results[0]
    assert (tmp_path / "ours" / "q.qcow2").read_bytes() == \
        (tmp_path / "qemu" / "q.qcow2").read_bytes()
    assert (tmp_path / "ours" / "d.raw").stat().st_size == MiB


# ------------------------------------------------------------------ texts: info, map, check

@pytest.mark.parametrize("raw", [True, False], ids=["raw", "nonraw"])
def test_info_map_check_texts(tmp_path: Path, raw: bool) -> None:
    _qemu(tmp_path, "qemu-img", "create", "-q", "-f", "qcow2", "-o", _raw_opt(raw), "x.qcow2", "1M")
    _qemu(tmp_path, "qemu-io", *_io_args(QEMU_IO_OPS), "x.qcow2")
    for cmd in (["info"], ["info", "--output=json"], ["map"], ["map", "--output=json"],
                ["check"], ["check", "--output=json"]):
        theirs = _run(tmp_path, "qemu-img", *cmd, "x.qcow2")
        ours = _bg(tmp_path, "img", *cmd, "x.qcow2")
        if cmd[0] == "info":
            # "disk size" depends on how the file system allocated the file.
            assert _no_disk_size(ours.stdout) == _no_disk_size(theirs.stdout)
        else:
            assert ours.stdout == theirs.stdout, cmd
        assert ours.returncode == theirs.returncode, cmd


def _no_disk_size(text: str) -> str:
    return "\n".join(line for line in text.splitlines()
                     if not line.startswith("disk size:") and '"actual-size"' not in line)


def test_info_does_not_open_the_data_file(tmp_path: Path) -> None:
    """qemu-img info never opens the data file (an untrusted image may name any file)."""
    _qemu(tmp_path, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=gone.raw",
          "x.qcow2", "1M")
    (tmp_path / "gone.raw").unlink()
    theirs = _qemu(tmp_path, "qemu-img", "info", "x.qcow2").stdout
    ours = _ok(_bg(tmp_path, "img", "info", "x.qcow2")).stdout
    assert _no_disk_size(ours) == _no_disk_size(theirs)
    assert "data file: gone.raw" in ours
    # Nor one the user names (QEMU drops the option), nor does it refuse one.
    _qemu(tmp_path, "qemu-img", "create", "-q", "-f", "qcow2", "n.qcow2", "1M")
    for image in ("x.qcow2", "n.qcow2"):
        opts = f"driver=qcow2,file.filename={image},data-file.filename=missing.raw"
        theirs = _qemu(tmp_path, "qemu-img", "info", "--image-opts", opts).stdout
        ours = _ok(_bg(tmp_path, "img", "info", "--image-opts", opts)).stdout
        assert _no_disk_size(ours) == _no_disk_size(theirs)
    # Without the name in the header, info still works and shows only "data file raw".
    (tmp_path / "gone.raw").touch()
    _qemu(tmp_path, "qemu-img", "amend", "-o", "data_file=", "x.qcow2")
    theirs = _qemu(tmp_path, "qemu-img", "info", "x.qcow2").stdout
    ours = _ok(_bg(tmp_path, "img", "info", "x.qcow2")).stdout
    assert _no_disk_size(ours) == _no_disk_size(theirs)
    assert "data file:" not in ours and "data file raw: false" in ours


def _system_qemu() -> str:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        if os.environ.get("BLOCKGRAPH_REQUIRE_ORACLES"):
            pytest.fail("qemu-system-x86_64 is required (BLOCKGRAPH_REQUIRE_ORACLES is set)")
        pytest.skip("qemu-system-x86_64 not installed")
    return qemu


def _system_qmp(cwd: Path, argv: list[str], requests: bytes, count: int) -> list[bytes]:
    """Send ``requests`` to a system emulator's ``-qmp stdio`` and read ``count`` lines.

    stdin stays open until they have come: QEMU would exit at its end before answering.
    """
    proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(requests)
    proc.stdin.flush()
    lines = [proc.stdout.readline() for _ in range(count)]
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
    return lines


def _system_filter(text: str) -> str:
    text = re.sub(r"#block\d+", "#blockNNN", text)
    text = re.sub(r'"seconds": \d+, "microseconds": \d+', "TIMESTAMP", text)
    text = re.sub(r'"actual-size": \d+', "ACTUAL", text)
    text = re.sub(r"disk size: [^\\]*", "disk size: SIZE", text)  # up to the escaped \r\n
    text = re.sub(r'"micro": \d+, "minor": 2, "major": 7\}, "package": "[^"]*"', "VERSION", text)
    return re.sub(r"QEMU [0-9.]+ monitor", "QEMU monitor", text)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "nonraw"])
def test_qmp_and_hmp_show_the_data_file(tmp_path: Path, raw: bool) -> None:
    """query-named-block-nodes, query-block (the data file is a node of its own, listed first)
    and ``info block -v``, from ``qemu-system-x86_64 -machine none`` and ``blockgraph system``."""
    qemu = _system_qemu()
    _qemu(tmp_path, "qemu-img", "create", "-q", "-f", "qcow2", "-o", _raw_opt(raw), "x.qcow2", "1M")
    requests = (b'{"execute": "qmp_capabilities"}\n'
                b'{"execute": "query-named-block-nodes", "arguments": {"flat": true}}\n'
                b'{"execute": "query-block"}\n'
                b'{"execute": "human-monitor-command", "arguments": '
                b'{"command-line": "info block -v"}}\n'
                b'{"execute": "quit"}\n')
    common = ["-machine", "none", "-nodefaults", "-display", "none", "-drive",
              "if=none,id=d0,file=x.qcow2,node-name=n1", "-qmp", "stdio"]
    outputs = []
    for command in ([qemu], [sys.executable, "-m", "blockgraph", "system"]):
        # Greeting, 4 replies, SHUTDOWN, the reply to quit.
        lines = _system_qmp(tmp_path, [*command, *common], requests, 7)
        outputs.append(_system_filter(b"".join(lines).decode("ascii")))
    assert outputs[1] == outputs[0]
    assert '"data-file": "d.raw"' in outputs[1]
    assert f"data file raw: {'true' if raw else 'false'}" in outputs[1]


def test_blockstats_parent_is_the_data_file(tmp_path: Path) -> None:
    """``file`` holds no data once a data file is open (QEMU drops its DATA role), so
    query-blockstats names the data file as the qcow2 node's "parent"."""
    qemu = _system_qemu()
    _qemu(tmp_path, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=d.raw",
          "x.qcow2", "1M")
    requests = (b'{"execute": "qmp_capabilities"}\n'
                b'{"execute": "query-blockstats", "arguments": {"query-nodes": true}}\n'
                b'{"execute": "quit"}\n')
    common = ["-machine", "none", "-nodefaults", "-display", "none",
              "-blockdev", "driver=file,filename=x.qcow2,node-name=xf",
              "-blockdev", "driver=file,filename=d.raw,node-name=df",
              "-blockdev", "driver=qcow2,file=xf,data-file=df,node-name=q", "-qmp", "stdio"]
    replies = []
    for command in ([qemu], [sys.executable, "-m", "blockgraph", "system"]):
        lines = _system_qmp(tmp_path, [*command, *common], requests, 5)
        replies.append(json.loads(lines[2]))
    assert replies[1] == replies[0]
    stats = {s["node-name"]: s for s in replies[1]["return"]}
    assert stats["q"]["parent"]["node-name"] == "df"


# ------------------------------------------------------------------ refusals, with QEMU's texts

def _stderr_text(r: subprocess.CompletedProcess[str]) -> str:
    """stderr without the program's name prefix (qemu-img: / blockgraph-img: ...)."""
    return "\n".join(line.split(": ", 1)[1] if ": " in line else line
                     for line in r.stderr.strip().splitlines())


def _same_failure(cwd: Path, qemu: list[str], ours: list[str]) -> str:
    theirs = _run(cwd, *qemu)
    mine = _bg(cwd, *ours)
    assert theirs.returncode != 0 and mine.returncode == theirs.returncode, (
        theirs.stderr, mine.stderr)
    assert _stderr_text(mine) == _stderr_text(theirs)
    return _stderr_text(mine)


def test_open_errors(tmp_path: Path) -> None:
    _qemu(tmp_path, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=d.raw",
          "x.qcow2", "1M")
    _qemu(tmp_path, "qemu-img", "create", "-q", "-f", "qcow2", "n.qcow2", "1M")
    # The header's name is relative to the working directory, as QEMU 7.2 opens it.
    sub = tmp_path / "sub"
    sub.mkdir()
    text = _same_failure(sub, ["qemu-io", "-c", "read 0 1", "../x.qcow2"],
                         ["io", "-c", "read 0 1", "../x.qcow2"])
    assert text.endswith("Could not open 'd.raw': No such file or directory")
    # A data-file option on an image without one.
    (tmp_path / "e.raw").touch()
    opts = "driver=qcow2,file.filename=n.qcow2,data-file.filename=e.raw"
    theirs = _run(tmp_path, "qemu-io", "--image-opts", "-c", "read 0 1", opts)
    mine = _bg(tmp_path, "io", "--image-opts", "-c", "read 0 1", opts)
    wanted = "'data-file' can only be set for images with an external data file"
    assert wanted in theirs.stderr and wanted in mine.stderr and mine.returncode != 0
    # The raw bit without a data file (autoclear bit 1 set by hand); info does not mind.
    with open(tmp_path / "n.qcow2", "r+b") as f:
        f.seek(88)
        f.write((2).to_bytes(8, "big"))
    text = _same_failure(tmp_path, ["qemu-io", "-c", "read 0 1", "n.qcow2"],
                         ["io", "-c", "read 0 1", "n.qcow2"])
    assert text.endswith("data-file-raw requires a data file")
    _ok(_bg(tmp_path, "img", "info", "n.qcow2"))
    # No name in the header: the user must give it.
    _qemu(tmp_path, "qemu-img", "amend", "-o", "data_file=", "x.qcow2")
    text = _same_failure(tmp_path, ["qemu-io", "-c", "read 0 1", "x.qcow2"],
                         ["io", "-c", "read 0 1", "x.qcow2"])
    assert text.endswith("'data-file' is required for this image")
    r = _ok(_bg(tmp_path, "io", "--image-opts", "-c", "read 0 1",
                "driver=qcow2,file.filename=x.qcow2,data-file.filename=d.raw"))
    assert r.stdout.startswith("read 1/1 bytes at offset 0")


def test_create_puts_the_data_file_where_qemu_img_does(tmp_path: Path) -> None:
    """``data_file=d.raw`` for ``sub/x.qcow2``: created (and later opened) relative to the
    working directory, and recorded as typed."""
    for name, tool in (("qemu", ["qemu-img"]), ("ours", None)):
        d = tmp_path / name
        (d / "sub").mkdir(parents=True)
        args = ["create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "sub/x.qcow2", "1M"]
        _ok(_run(d, *tool, *args) if tool else _bg(d, "img", *args))
        assert (d / "d.raw").stat().st_size == MiB and not (d / "sub" / "d.raw").exists()
    assert (tmp_path / "ours" / "sub" / "x.qcow2").read_bytes() == \
        (tmp_path / "qemu" / "sub" / "x.qcow2").read_bytes()


def test_compressed_write_and_snapshot_refused(tmp_path: Path) -> None:
    _qemu(tmp_path, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=d.raw",
          "x.qcow2", "1M")
    theirs = _run(tmp_path, "qemu-io", "-c", "write -c 0 64k", "x.qcow2")
    ours = _bg(tmp_path, "io", "-c", "write -c 0 64k", "x.qcow2")
    assert ours.stdout + ours.stderr == theirs.stdout + theirs.stderr
    assert "write failed: Operation not supported" in ours.stdout + ours.stderr
    (tmp_path / "s.raw").write_bytes(random.Random(1).randbytes(MiB))
    text = _same_failure(
        tmp_path, ["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "data_file=c.raw", "s.raw",
                   "c.qcow2"],
        ["img", "convert", "-c", "-O", "qcow2", "-o", "data_file=c.raw", "s.raw", "c.qcow2"])
    assert text == "error while writing at byte 0: Operation not supported"
    text = _same_failure(tmp_path, ["qemu-img", "snapshot", "-c", "s1", "x.qcow2"],
                         ["img", "snapshot", "-c", "s1", "x.qcow2"])
    assert text == "Could not create snapshot 's1': -95 (Operation not supported)"
    _check_clean(tmp_path, "x.qcow2")


@pytest.mark.parametrize("args", [
    ["-o", "data_file_raw=on", "a.qcow2", "1M"],
    ["-o", "data_file=a.raw,compat=0.10", "a.qcow2", "1M"],
    ["-o", "data_file=a.raw,data_file_raw=on", "-b", "base.qcow2", "-F", "qcow2", "a.qcow2",
     "1M"],
])
def test_create_errors(tmp_path: Path, args: list[str]) -> None:
    _qemu(tmp_path, "qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "1M")
    theirs = _run(tmp_path, "qemu-img", "create", "-f", "qcow2", *args)
    ours = _bg(tmp_path, "img", "create", "-f", "qcow2", *args)
    assert ours.returncode == theirs.returncode == 1
    assert ours.stdout == theirs.stdout
    assert _stderr_text(ours) == _stderr_text(theirs)


def test_amend(tmp_path: Path) -> None:
    qdir, odir = tmp_path / "qemu", tmp_path / "ours"
    for d in (qdir, odir):
        d.mkdir()
        _qemu(d, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=a.raw", "x.qcow2",
              "1M")
        _qemu(d, "qemu-img", "create", "-q", "-f", "qcow2", "n.qcow2", "1M")
        (d / "b.raw").write_bytes(bytes(MiB))  # the amended name is opened from then on
    for args in (["-o", "data_file=b.raw", "x.qcow2"], ["-o", "data_file_raw=off", "x.qcow2"]):
        _qemu(qdir, "qemu-img", "amend", *args)
        _ok(_bg(odir, "img", "amend", *args))
        assert (odir / "x.qcow2").read_bytes() == (qdir / "x.qcow2").read_bytes()
    for args in (["-o", "data_file_raw=on", "x.qcow2"], ["-o", "compat=0.10", "x.qcow2"],
                 ["-o", "data_file=c.raw", "n.qcow2"], ["-o", "data_file_raw=on", "n.qcow2"]):
        _same_failure(qdir, ["qemu-img", "amend", *args], ["img", "amend", *args])
        _same_failure(odir, ["qemu-img", "amend", *args], ["img", "amend", *args])
    assert (odir / "x.qcow2").read_bytes() == (qdir / "x.qcow2").read_bytes()
    _qemu(qdir, "qemu-img", "amend", "-o", "data_file=", "x.qcow2")
    _ok(_bg(odir, "img", "amend", "-o", "data_file=", "x.qcow2"))
    assert (odir / "x.qcow2").read_bytes() == (qdir / "x.qcow2").read_bytes()


def test_amend_refcount_width_and_size(tmp_path: Path) -> None:
    """Rebuilding the refcounts leaves data file clusters out; a size change resizes the data
    file too."""
    _qemu(tmp_path, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=d.raw",
          "x.qcow2", "4M")
    _qemu(tmp_path, "qemu-io", "-c", "write -P 1 0 3M", "x.qcow2")
    _ok(_bg(tmp_path, "img", "amend", "-o", "refcount_bits=8", "x.qcow2"))
    _check_clean(tmp_path, "x.qcow2")
    _ok(_bg(tmp_path, "img", "amend", "-o", "size=6M", "x.qcow2"))
    _check_clean(tmp_path, "x.qcow2")
    assert (tmp_path / "d.raw").stat().st_size == 6 * MiB
    _compare(tmp_path, "x.qcow2", b"\x01" * (3 * MiB) + bytes(3 * MiB))


# ------------------------------------------------------------------ crash-safe ordering

def test_data_reaches_the_data_file_before_the_l2_entry(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Data written to a new cluster is flushed in the data file before its L2 entry is
    written to the image file."""
    monkeypatch.chdir(tmp_path)
    layer = BlockLayer()
    events: list[str] = []
    try:
        layer.run(create_image(layer, "x.qcow2", "qcow2", MiB, {"data_file": "d.raw"}))
        node = layer.run(layer.open_node("x.qcow2", {"driver": "qcow2"}))
        data_node = node.child("data-file")
        file_node = node.child("file")
        assert data_node is not None and file_node is not None
        l2_offset = 4 * 65536  # the first L2 table of a fresh 64k-cluster image

        def spy(target: object, name: str, tag: str) -> None:
            orig = getattr(target, name)

            async def wrapper(*args: object, **kwargs: object) -> object:
                if name == "pwritev":
                    events.append(f"{tag} write {args[0]:#x}")
                else:
                    events.append(f"{tag} {name}")
                return await orig(*args, **kwargs)

            monkeypatch.setattr(target, name, wrapper)

        spy(data_node.node, "pwritev", "data")
        spy(data_node.node, "flush", "data")
        spy(file_node.node, "pwritev", "file")
        layer.run(node.pwritev(0x20000, memoryview(b"\x5a" * 65536)))
        layer.run(node.flush())
    finally:
        layer.close()
    first_data = events.index("data write 0x20000")
    data_flush = events.index("data flush", first_data)
    l2_write = events.index(f"file write {l2_offset:#x}", first_data)
    assert first_data < data_flush < l2_write, events
    _check_clean(tmp_path, "x.qcow2")


def test_no_data_file_io_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compressed writes through the driver fail with ENOTSUP, the image stays clean."""
    monkeypatch.chdir(tmp_path)
    layer = BlockLayer()
    try:
        layer.run(create_image(layer, "x.qcow2", "qcow2", MiB, {"data_file": "d.raw"}))
        node = layer.run(layer.open_node("x.qcow2", {"driver": "qcow2"}))
        with pytest.raises(IOFailure) as exc:
            layer.run(node.pwritev(0, memoryview(bytes(65536)), RequestFlags.COMPRESSED))
        assert exc.value.errno == 95
        with pytest.raises(IOFailure):
            layer.run(node.driver.snapshot_create("s"))  # type: ignore[attr-defined]
    finally:
        layer.close()
    _check_clean(tmp_path, "x.qcow2")


def test_raw_data_file_with_qemu_writes_after_ours(tmp_path: Path) -> None:
    """Both ways on one image: we write, qemu-io writes, we read what qemu-img reads."""
    _ok(_bg(tmp_path, "img", "create", "-q", "-f", "qcow2", "-o", _raw_opt(True), "x.qcow2",
            "2M"))
    _ok(_bg(tmp_path, "io", "-c", "write -P 1 0 1M", "-c", "write -z 64k 64k", "x.qcow2"))
    _qemu(tmp_path, "qemu-io", "-c", "write -P 2 512k 1M", "-c", "discard 0 64k", "x.qcow2")
    _ok(_bg(tmp_path, "io", "-c", "write -P 3 1536k 4k", "-c", "write -z -u 1600k 64k",
            "x.qcow2"))
    _check_clean(tmp_path, "x.qcow2")
    _qemu(tmp_path, "qemu-img", "convert", "-O", "raw", "x.qcow2", "q.out")
    expected = (tmp_path / "q.out").read_bytes()
    assert (tmp_path / "d.raw").read_bytes() == expected
    _ok(_bg(tmp_path, "img", "convert", "-O", "raw", "x.qcow2", "o.out"))
    assert (tmp_path / "o.out").read_bytes() == expected
