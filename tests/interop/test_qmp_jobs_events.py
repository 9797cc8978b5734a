"""Jobs and block events over QMP, differential against QEMU 7.2.

* ``blockdev-create`` (drivers ``file`` and ``qcow2``), the ``job-*`` commands and
  ``block-set-write-threshold`` against ``qemu-storage-daemon``: the whole transcript (replies
  and events, ``JOB_STATUS_CHANGE`` sequences included) must be identical after filtering
  timestamps, paths and versions; every image must pass ``qemu-img check`` and equal QEMU's
  byte for byte.
* ``BLOCK_WRITE_THRESHOLD`` and the ``werror``/``rerror`` policies against
  ``qemu-system-x86_64 -machine none``: a write through the drive's BlockBackend with
  ``human-monitor-command qemu-io`` fires the threshold event; an injected error (blkdebug)
  under ``werror=stop`` emits no ``BLOCK_IO_ERROR``, stops nothing and query-block has no
  ``io-status``, because without a guest device nothing applies the policy (QEMU's devices
  call it, qemu-io does not).

Synchronisation is by events only: a step that waits reads until the event it names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")
BLOCKGRAPH = [sys.executable, "-m", "blockgraph"]
ENV = {**os.environ, "PYTHONPATH": SRC}


def _require(name: str) -> str:
    tool = shutil.which(name)
    if tool is not None:
        return tool
    if os.environ.get("BLOCKGRAPH_REQUIRE_ORACLES"):
        pytest.fail(f"{name} is required (BLOCKGRAPH_REQUIRE_ORACLES is set)")
    pytest.skip(f"{name} not installed")


class _Daemon:
    """A daemonized storage daemon (ours or QEMU's), stopped by its pid at the end."""

    def __init__(self, command: list[str], directory: Path) -> None:
        self.socket = str(directory / "qmp.sock")
        pidfile = directory / "daemon.pid"
        result = subprocess.run(
            [*command, "--chardev", f"socket,path={self.socket},server=on,wait=off,id=m0",
             "--monitor", "chardev=m0", "--pidfile", str(pidfile), "--daemonize"],
            capture_output=True, text=True, timeout=60, env=ENV)
        assert result.returncode == 0, result.stderr
        self.pid = int(pidfile.read_text())

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


Step = dict[str, object] | tuple[str, str]


def _converse(path: str, script: list[Step]) -> list[str]:
    """Send each command and read up to its reply; ``("wait", text)`` reads until a line
    containing ``text`` (unless it came already since the last command).

    :return: the lines read, a ``>>`` line before each command's.
    """
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)  # a bound on a missing message, never a synchronisation delay
    sock.connect(path)
    stream = sock.makefile("rb")
    out = [stream.readline().decode()]
    since_command: list[str] = []
    for step in script:
        if isinstance(step, tuple):
            _, text = step
            if any(text in line for line in since_command):
                continue
            while True:
                line = stream.readline().decode()
                out.append(line)
                since_command.append(line)
                if text in line:
                    break
            continue
        sock.sendall(json.dumps(step).encode())
        out.append(">> " + json.dumps(step))
        since_command = []
        while True:
            line = stream.readline().decode()
            assert line, "connection closed"
            out.append(line)
            since_command.append(line)
            if line.startswith(('{"return"', '{"error"')):
                break
    sock.close()
    return out


def _filter(text: str, directory: str) -> str:
    text = text.replace(directory, "TEST_DIR")
    text = re.sub(r'"timestamp": \{"seconds": \d+, "microseconds": \d+\}', "TIMESTAMP", text)
    text = re.sub(r'"micro": \d+, "minor": 2, "major": 7\}, "package": "[^"]*"', "VERSION", text)
    return re.sub(r"#block\d+", "#blockNNN", text)


def _groups(lines: list[str]) -> list[tuple[str, list[str]]]:
    """Per command: its reply and the events that came until the next command, in order.

    Where QEMU sends the reply relative to the events of a job the command started is not
    fixed (the monitor's output and the job's coroutine race), so only the order among the
    events and the reply itself are compared.
    """
    groups: list[tuple[str, list[str]]] = [("", [])]
    for line in lines:
        if line.startswith(">> "):
            groups.append(("", []))
        elif line.startswith(('{"return"', '{"error"')):
            groups[-1] = (line, groups[-1][1])
        else:
            groups[-1][1].append(line)
    return groups


def _concluded(job_id: str) -> tuple[str, str]:
    return ("wait", f'"status": "concluded", "id": "{job_id}"')


def _create_script(d: str) -> list[Step]:
    def create(job_id: str, options: dict[str, object]) -> dict[str, object]:
        return {"execute": "blockdev-create", "arguments": {"job-id": job_id,
                                                           "options": options}}

    def job(command: str, job_id: str) -> dict[str, object]:
        return {"execute": command, "arguments": {"id": job_id}}

    def add_file(name: str, filename: str) -> dict[str, object]:
        return {"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": name,
                                                        "filename": f"{d}/{filename}"}}

    script: list[Step] = [
        {"execute": "qmp_capabilities"},
        {"execute": "query-jobs"},
        create("f1", {"driver": "file", "filename": f"{d}/f.raw", "size": 1048576}),
        _concluded("f1"),
        {"execute": "query-jobs"},
        job("job-cancel", "f1"), job("job-pause", "f1"), job("job-resume", "f1"),
        job("job-complete", "f1"), job("job-finalize", "f1"),
        job("job-dismiss", "f1"), job("job-dismiss", "f1"), job("job-cancel", "nope"),
        create("f2", {"driver": "file", "filename": f"{d}/full.raw", "size": 65536,
                      "preallocation": "full"}),
        _concluded("f2"),
        create("f2", {"driver": "file", "filename": f"{d}/x.raw", "size": 0}),
        create("2f", {"driver": "file", "filename": f"{d}/x.raw", "size": 0}),
        job("job-dismiss", "f2"),
        # Argument errors are the command's; errors found before any I/O fail the job before
        # the command returns.
        {"execute": "blockdev-create", "arguments": {"options": {"driver": "file"}}},
        {"execute": "blockdev-create", "arguments": {"job-id": "e"}},
        create("e", {"size": 1}),
        create("e", {"driver": "file", "size": 1}),
        create("e", {"driver": "file", "filename": f"{d}/x", "size": 1, "bogus": 1}),
        create("e", {"driver": "file", "filename": f"{d}/x", "size": "1"}),
        create("e", {"driver": "raw", "file": "x", "size": 1}),
        create("e", {"driver": "raw"}),
        create("e", {"driver": "qcow2", "file": "x", "size": 1, "version": "v4"}),
        create("e1", {"driver": "file", "filename": f"{d}/no/such/dir", "size": 0}),
        _concluded("e1"),
        create("e2", {"driver": "qcow2", "file": "nope", "size": 1048576}),
        _concluded("e2"),
        {"execute": "query-jobs"},
        job("job-dismiss", "e1"), job("job-dismiss", "e2"),
    ]
    images: list[tuple[str, dict[str, object]]] = [
        ("q1", {"size": 16777216}),
        ("q2", {"size": 16777216, "version": "v2", "cluster-size": 4096,
                "backing-file": "base.qcow2", "backing-fmt": "qcow2"}),
        ("q3", {"size": 67108864, "cluster-size": 2097152, "extended-l2": True,
                "lazy-refcounts": True, "refcount-bits": 64, "compression-type": "zstd"}),
        ("q4", {"size": 4194304, "preallocation": "metadata", "refcount-bits": 1}),
    ]
    for name, _ in images:
        script += [
            create(f"c{name}", {"driver": "file", "filename": f"{d}/{name}.qcow2", "size": 0}),
            _concluded(f"c{name}"),
            job("job-dismiss", f"c{name}"),
            add_file(name, f"{name}.qcow2"),
        ]
    script += [
        {"execute": "block-set-write-threshold",
         "arguments": {"node-name": "q1", "write-threshold": 70000}},
        {"execute": "block-set-write-threshold",
         "arguments": {"node-name": "nope", "write-threshold": 1}},
        {"execute": "block-set-write-threshold", "arguments": {"node-name": "q1"}},
        {"execute": "query-named-block-nodes", "arguments": {"flat": True}},
    ]
    for name, options in images:
        script += [create(name, {"driver": "qcow2", "file": name, **options}),
                   _concluded(name)]
    script += [
        {"execute": "query-named-block-nodes", "arguments": {"flat": True}},
        {"execute": "query-jobs"},
        create("q5", {"driver": "qcow2", "file": "q1", "size": 1048576, "version": "v2",
                      "lazy-refcounts": True}),
        _concluded("q5"),
        {"execute": "query-jobs"},
        job("job-dismiss", "q1"), job("job-dismiss", "q2"), job("job-dismiss", "q3"),
        job("job-dismiss", "q4"),
        # Concluded jobs still there at quit are destroyed: "null" before the return.
        {"execute": "quit"},
    ]
    return script


def test_blockdev_create_against_qemu_storage_daemon(tmp_path: Path) -> None:
    qsd = _require("qemu-storage-daemon")
    qemu_img = _require("qemu-img")
    transcripts = []
    for name, command in (("qemu", [qsd]), ("ours", [*BLOCKGRAPH, "storage-daemon"])):
        directory = tmp_path / name
        directory.mkdir()
        # The backing file q2 names (blockdev-create does not open it; qemu-img check does).
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(directory / "base.qcow2"),
                        "16M"], check=True)
        daemon = _Daemon(command, directory)
        try:
            lines = _converse(daemon.socket, _create_script(str(directory)))
        finally:
            daemon.stop()
        transcripts.append([_filter(line, str(directory)) for line in lines])
    qemu, ours = transcripts
    commands = [line for line in ours if line.startswith(">> ")]
    for index, (theirs, mine) in enumerate(zip(_groups(qemu), _groups(ours), strict=True)):
        assert mine == theirs, commands[index - 1] if index else "greeting"

    def statuses(job_id: str) -> list[str]:
        return re.findall(r'"status": "(\w+)", "id": "' + job_id + '"', "".join(ours))

    assert statuses("q1") == ["created", "running", "waiting", "pending", "concluded", "null"]
    assert any('"BLOCK_WRITE_THRESHOLD"' in line for line in ours)
    # A failure found before any I/O concludes the job before the command returns (in QEMU
    # as here; checked on ours, whose order is fixed).
    start = next(i for i, line in enumerate(ours) if '"job-id": "e2"' in line)
    assert [line.split('"data": ')[-1] for line in ours[start + 1:start + 6]] == [
        '{"status": "created", "id": "e2"}}\r\n', '{"status": "running", "id": "e2"}}\r\n',
        '{"status": "aborting", "id": "e2"}}\r\n', '{"status": "concluded", "id": "e2"}}\r\n',
        '{"return": {}}\r\n']

    for image in ("f.raw", "full.raw", "q1.qcow2", "q2.qcow2", "q3.qcow2", "q4.qcow2"):
        theirs_path, mine_path = tmp_path / "qemu" / image, tmp_path / "ours" / image
        assert theirs_path.read_bytes() == mine_path.read_bytes(), image
        subprocess.run(["cmp", str(theirs_path), str(mine_path)], check=True)
        if image.endswith(".qcow2"):
            check = subprocess.run([qemu_img, "check", "-f", "qcow2", str(mine_path)],
                                   capture_output=True, text=True)
            assert check.returncode == 0, check.stdout + check.stderr
            assert "No errors were found on the image." in check.stdout


# -- qemu-system: write threshold and I/O error policies ---------------------------------------


def _system_run(command: list[str], directory: Path, drive: str, requests: list[object]
                ) -> list[dict[str, object]]:
    """The QMP messages (JSON lines only) of one ``-qmp stdio`` session."""
    stdin = "".join(json.dumps(r) + "\n" for r in requests)
    proc = subprocess.Popen([*command, "-machine", "none", "-nodefaults", "-display", "none",
                             "-drive", drive, "-qmp", "stdio"], cwd=directory, env=ENV,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(stdin)
    proc.stdin.flush()
    messages: list[dict[str, object]] = []
    replies = 0
    # QEMU must not see the end of its input before it has answered (it would exit early).
    while replies < len(requests) + 1:
        line = proc.stdout.readline()
        assert line, "qemu-system ended early"
        if not line.startswith("{"):
            continue  # QEMU prints qemu-io's text on stdout, outside QMP
        message = json.loads(line)
        message.pop("timestamp", None)
        messages.append(message)
        if "return" in message or "error" in message or "QMP" in message:
            replies += 1
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
    return messages


def _summary(messages: list[dict[str, object]]) -> list[object]:
    """Events, and what matters of the replies: write thresholds and I/O statuses."""
    out: list[object] = []
    for message in messages:
        if "event" in message:
            out.append(message)
        elif "QMP" in message:
            out.append("greeting")
        elif isinstance(message.get("return"), list):
            entries = message["return"]
            assert isinstance(entries, list)
            for entry in entries:
                if "device" in entry:  # query-block
                    out.append({"device": entry["device"], "io-status": entry.get("io-status"),
                                "write_threshold": entry["inserted"]["write_threshold"]})
                else:
                    out.append({"node-name": re.sub(r"#block\d+", "#blockNNN",
                                                    str(entry["node-name"])),
                                "write_threshold": entry["write_threshold"]})
        else:
            out.append("return" if "return" in message else message)
    return out


@pytest.mark.parametrize("policy", ["stop", "enospc", "report", "ignore"])
def test_write_threshold_and_io_errors_against_qemu_system(tmp_path: Path, policy: str) -> None:
    qemu = _require("qemu-system-x86_64")
    qemu_img = _require("qemu-img")
    rerror = "stop" if policy == "enospc" else policy  # enospc is not a read policy
    drive = (f"if=none,id=d0,werror={policy},rerror={rerror},node-name=n1,format=raw,"
             "file.driver=blkdebug,file.node-name=dbg,file.config=/dev/null,"
             "file.inject-error.0.event=write_aio,file.inject-error.0.errno=28,"
             "file.inject-error.0.sector=0,"
             "file.inject-error.1.event=read_aio,file.inject-error.1.errno=5,"
             "file.image.driver=file,file.image.filename=d.raw")

    def hmp(line: str) -> dict[str, object]:
        return {"execute": "human-monitor-command", "arguments": {"command-line": line}}

    requests: list[object] = [
        {"execute": "qmp_capabilities"},
        {"execute": "block-set-write-threshold",
         "arguments": {"node-name": "n1", "write-threshold": 524288}},
        {"execute": "query-named-block-nodes", "arguments": {"flat": True}},
        hmp('qemu-io d0 "write 262144 64k"'),
        hmp('qemu-io d0 "write 786432 64k"'),
        hmp('qemu-io d0 "write 917504 64k"'),
        hmp('qemu-io d0 "write 0 4k"'),
        hmp('qemu-io d0 "read 0 4k"'),
        {"execute": "query-block"},
        {"execute": "quit"},
    ]
    summaries = []
    for name, command in (("qemu", [qemu]), ("ours", [*BLOCKGRAPH, "system"])):
        directory = tmp_path / name
        directory.mkdir()
        subprocess.run([qemu_img, "create", "-q", "-f", "raw", str(directory / "d.raw"), "1M"],
                       check=True)
        summaries.append(_summary(_system_run(command, directory, drive, requests)))
    theirs, mine = summaries
    assert mine == theirs
    assert {"event": "BLOCK_WRITE_THRESHOLD",
            "data": {"node-name": "n1", "amount-exceeded": 327680,
                     "write-threshold": 524288}} in mine
    assert not any(isinstance(m, dict) and m.get("event") in ("BLOCK_IO_ERROR", "STOP")
                   for m in mine)
