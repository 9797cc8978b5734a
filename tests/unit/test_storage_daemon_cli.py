"""``blockgraph storage-daemon``'s command-line errors, as qemu-storage-daemon 7.2 words them."""

from __future__ import annotations

import pytest

from blockgraph.tools.storage_daemon import main

PROG = "qemu-storage-daemon"


@pytest.mark.parametrize(("args", "message"), [
    (["--bogus"], "qemu-storage-daemon: unrecognized option '--bogus'\n"),
    (["-x"], "qemu-storage-daemon: invalid option -- 'x'\n"),
    (["foo"], "qemu-storage-daemon: foo: Unexpected argument\n"),
    (["--pidfile"], "qemu-storage-daemon: option '--pidfile' requires an argument\n"),
    (["--blockdev", "driver=qcow3,node-name=x"],
     "qemu-storage-daemon: --blockdev driver=qcow3,node-name=x: Parameter 'driver' does not accept value 'qcow3'\n"),
    (["--blockdev", "node-name=x"],
     "qemu-storage-daemon: --blockdev node-name=x: Parameter 'driver' is missing\n"),
    (["--blockdev", "driver=file,filename=/nonexist,node-name=a"],
     "qemu-storage-daemon: --blockdev driver=file,filename=/nonexist,node-name=a: Could not open '/nonexist': No such file or directory\n"),
    (["--blockdev", '{"driver":"null-co"}'],
     "qemu-storage-daemon: --blockdev {\"driver\":\"null-co\"}: 'node-name' must be specified for the root node\n"),
    (["--object", "foo,id=x"],
     "qemu-storage-daemon: --object foo,id=x: Parameter 'qom-type' does not accept value 'foo'\n"),
    (["--object", "secret,id=s0"],
     "qemu-storage-daemon: --object secret,id=s0: Either 'file' or 'data' must be provided\n"),
    (["--monitor", "chardev=nope"], "qemu-storage-daemon: --monitor chardev=nope: chardev \"nope\" not found\n"),
    (["--chardev", "socket,path=/tmp/x.sock,server=on,wait=off"],
     "qemu-storage-daemon: --chardev socket,path=/tmp/x.sock,server=on,wait=off: chardev: no id specified\n"),
    (["--chardev", "stdio,id=c", "--monitor", "chardev=c,bogus=1"],
     "qemu-storage-daemon: --monitor chardev=c,bogus=1: Parameter 'bogus' is unexpected\n"),
    (["--chardev", "stdio,id=c", "--monitor", "chardev=c,mode=readline"],
     "qemu-storage-daemon: --monitor chardev=c,mode=readline: Only QMP is supported\n"),
])
def test_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(PROG, args) == 1
    assert capsys.readouterr().err == message


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(PROG, ["-h"]) == 0
    assert capsys.readouterr().out.startswith("Usage: qemu-storage-daemon [options]\nQEMU storage daemon\n")
    assert main(PROG, ["-V"]) == 0
    assert capsys.readouterr().out.startswith("qemu-storage-daemon version 7.2.0")
