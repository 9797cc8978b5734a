"""The chardev options of QEMU 7.2 (``-chardev``, ``-qmp``/``-monitor`` spellings), sans I/O,
and the ``pretty=on`` layout of QMP output. Texts observed on qemu-storage-daemon and
qemu-system-x86_64 7.2 (the interop tests compare them live)."""

from __future__ import annotations

import pytest

from blockgraph.monitor.chardev import ChardevError, parse_chardev, parse_legacy, qemu_opts
from blockgraph.monitor.qmp.protocol import Command, QMPConnection


def test_short_form_booleans_warn() -> None:
    warnings: list[str] = []
    opts = qemu_opts("socket,id=c0,server,nowait,nodelay,delay,notelnet", "backend", warnings)
    # QEMU strips "no" from every bare word: nodelay is delay=off, which the later delay undoes.
    assert opts == {"backend": "socket", "id": "c0", "server": "on", "wait": "off",
                    "delay": "on", "telnet": "off"}
    assert warnings == [
        "short-form boolean option 'server' deprecated\nPlease use server=on instead",
        "short-form boolean option 'nowait' deprecated\nPlease use wait=off instead",
        "short-form boolean option 'nodelay' deprecated\nPlease use nodelay=on instead",
        "short-form boolean option 'delay' deprecated\nPlease use nodelay=off instead",
        "short-form boolean option 'notelnet' deprecated\nPlease use telnet=off instead",
    ]


def test_id_must_be_an_identifier_and_the_first_counts() -> None:
    assert qemu_opts("socket,id=a,id=b", "backend")["id"] == "a"
    with pytest.raises(ChardevError) as info:
        qemu_opts("socket,id=1x", "backend")
    assert info.value.messages == ("Parameter 'id' expects an identifier\nIdentifiers consist of "
                                   "letters, digits, '-', '.', '_', starting with a letter.",)


def test_commas_escape_and_later_keys_win() -> None:
    assert qemu_opts("socket,path=/a,,b,server=on,server=off", "backend") == {
        "backend": "socket", "path": "/a,b", "server": "off"}


@pytest.mark.parametrize(("text", "message"), [
    ("socket,host=127.0.0.1,port=0,server=on,wait=off", "chardev: no id specified"),
    ("vc,id=c0", "'vc' is not a valid char driver name"),
    ("socket,id=c0,host=127.0.0.1,server=on,wait=off", "chardev: socket: no port given"),
    ("socket,id=c0,host=h,port=1,path=/p,server=on,wait=off",
     "None or one of 'path', 'fd' or 'host' option required."),
    ("socket,id=c0", "Unable to parse FD number "),
    ("socket,id=c0,fd=x,server=on", "Unable to parse FD number x"),
    ("socket,id=c0,fd=99999999999999,server=on",
     "Unable to parse FD number 99999999999999: Numerical result out of range"),
    ("socket,id=c0,path=/p,server=on,reconnect=1",
     "'reconnect' option is incompatible with socket in server listen mode"),
    ("socket,id=c0,path=/p,wait=off",
     "'wait' option is incompatible with socket in client connect mode"),
    ("socket,id=c0,path=/p,server=on,wait=maybe", "Parameter 'wait' expects 'on' or 'off'"),
    ("socket,id=c0,path=/p,server=on,to=x", "Parameter 'to' expects a number"),
    ("socket,id=c0,path=/p,server=on,numeric=on", "Invalid parameter 'numeric'"),
    ("socket,id=c0,path=/p,server=on,tls-creds=t", "No TLS credentials with id 't'"),
])
def test_chardev_errors(text: str, message: str) -> None:
    with pytest.raises(ChardevError) as err:
        parse_chardev(text)
    assert err.value.messages == (message,)


def test_y_and_n_are_booleans() -> None:
    chardev = parse_chardev("socket,id=c0,path=/p,server=y,wait=n")
    assert chardev.server and chardev.opts["wait"] == "n"  # and the open does not wait


def test_keys_of_other_backends_are_accepted() -> None:
    chardev = parse_chardev("socket,id=c0,path=/p,server=on,wait=off,width=3,mux=on")
    assert chardev.label == "c0" and chardev.server


@pytest.mark.parametrize(("text", "messages"), [
    ("tcp:127.0.0.1", ("parse error: tcp:127.0.0.1",)),
    ("none", ("'none' is not a valid char driver", "parse error: none")),
    ("tcp:h:1,server=on,pretty=on", ("Invalid parameter 'pretty'",
                                     "parse error: tcp:h:1,server=on,pretty=on")),
])
def test_legacy_errors(text: str, messages: tuple[str, ...]) -> None:
    with pytest.raises(ChardevError) as err:
        parse_legacy(text, "compat_monitor0")
    assert err.value.messages == messages


def test_legacy_spellings() -> None:
    tcp = parse_legacy("tcp:127.0.0.1:4444,server,nowait", "compat_monitor0")
    assert (tcp.backend, tcp.opts) == ("socket", {"host": "127.0.0.1", "port": "4444",
                                                  "server": "on", "wait": "off"})
    unix = parse_legacy("unix:/run/q.sock,server=on,wait=off", "compat_monitor1")
    assert unix.opts["path"] == "/run/q.sock" and unix.filename() == (
        "disconnected:unix:/run/q.sock,server=on")
    assert parse_legacy("stdio", "compat_monitor2").filename() == "stdio"


def test_pretty_output() -> None:
    conn = QMPConnection(["query-version"], pretty=True)
    assert conn.greeting().startswith(b'{\r\n    "QMP": {\r\n        "version": {\r\n')
    conn.receive_data(b'{"execute": "qmp_capabilities"}')
    command = Command("query-block-exports", {}, [1, {"a": {}}], True)
    assert conn.send_return(command, []) == (
        b'{\r\n    "return": [\r\n    ],\r\n    "id": [\r\n        1,\r\n        {\r\n'
        b'            "a": {\r\n            }\r\n        }\r\n    ]\r\n}\r\n')
