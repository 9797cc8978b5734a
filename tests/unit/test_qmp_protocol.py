"""The sans-IO QMP core: whole messages, byte by byte, the negotiation state machine, and
fuzzing (QEMU-shaped replies or nothing: never an exception)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockgraph.monitor.qmp.encode import encode, qdict_order
from blockgraph.monitor.qmp.jsonstream import JSONStream
from blockgraph.monitor.qmp.protocol import Command, QMPConnection, Reply, State, StateError

KNOWN = ("query-version", "blockdev-del", "quit")


def negotiated() -> QMPConnection:
    conn = QMPConnection(KNOWN, package="P")
    (reply,) = conn.receive_data(b'{"execute": "qmp_capabilities"}')
    assert isinstance(reply, Reply) and reply.data == b'{"return": {}}\r\n'
    return conn


def replies(conn: QMPConnection, data: bytes, *, bytewise: bool = False) -> list[bytes | Command]:
    events = []
    chunks = [data[i:i + 1] for i in range(len(data))] if bytewise else [data]
    for chunk in chunks:
        events.extend(conn.receive_data(chunk))
    return [e.data if isinstance(e, Reply) else e for e in events]


def test_greeting_bytes() -> None:
    conn = QMPConnection(KNOWN, package="blockgraph 0.1.0")
    assert conn.greeting() == (
        b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, '
        b'"package": "blockgraph 0.1.0"}, "capabilities": ["oob"]}}\r\n')


# (input, expected output) pairs observed on qemu-storage-daemon 7.2 (specs/qmp-transcript.txt
# and probes), after capabilities negotiation.
GOLDEN = [
    (b'{ "execute": }\n',
     b'{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}\r\n'),
    (b'[1, 2]\n',
     b'{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}\r\n'),
    (b'{"arguments": {}}\n',
     b'{"error": {"class": "GenericError", "desc": "QMP input lacks member \'execute\'"}}\r\n'),
    (b'{"arguments": {}, "id": 5}',
     b'{"id": 5, "error": {"class": "GenericError", "desc": "QMP input lacks member \'execute\'"}}\r\n'),
    (b'{"execute": 5, "id": 6}',
     b'{"id": 6, "error": {"class": "GenericError", "desc": "QMP input member \'execute\' must be a string"}}\r\n'),
    (b'{"execute": "x", "arguments": 1, "id": 7}',
     b'{"id": 7, "error": {"class": "GenericError", "desc": "QMP input member \'arguments\' must be an object"}}\r\n'),
    (b'{"execute": "x", "bogus": 1, "id": 8}',
     b'{"id": 8, "error": {"class": "GenericError", "desc": "QMP input member \'bogus\' is unexpected"}}\r\n'),
    (b'{"execute": "no-such-command", "id": 4}',
     b'{"id": 4, "error": {"class": "CommandNotFound", "desc": "The command no-such-command has not been found"}}\r\n'),
    (b'{"execute": "qmp_capabilities", "id": 2}',
     b'{"id": 2, "error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}\r\n'),
    (b'{"exec-oob": "query-version", "id": 10}',
     b'{"id": 10, "error": {"class": "GenericError", "desc": "QMP input member \'exec-oob\' is unexpected"}}\r\n'),
    (b'{"execute" @ "x"}',
     b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'@\'"}}\r\n'
     b'{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}\r\n'),
    (b'{"execute": "query-version", "id": "\xff"}',
     b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\"\\uFFFD\'"}}\r\n'
     b'{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}\r\n'),
    (b'{"a": 1.}',
     b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'1.}\'"}}\r\n'),
    (b'{"a": 01}',
     b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'01\'"}}\r\n'
     b'{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}\r\n'),
    (b'{"a": "\\u12"}',
     b'{"error": {"class": "GenericError", "desc": "JSON parse error, \\\\u12\\" is not a valid Unicode character"}}\r\n'),
    (b'{"a": "\\ud800"}',
     b'{"error": {"class": "GenericError", "desc": "JSON parse error, \\\\ud800 is not a valid Unicode character"}}\r\n'),
    (b'{"execute": "query-version", "id": true, "id": false}',
     b'{"error": {"class": "GenericError", "desc": "JSON parse error, duplicate key"}}\r\n'),
    (b'{"a" "b"}',
     b'{"error": {"class": "GenericError", "desc": "JSON parse error, missing : in object pair"}}\r\n'),
    (b'{1: 2}',
     b'{"error": {"class": "GenericError", "desc": "JSON parse error, key is not a string in object"}}\r\n'),
    (b'[1 2]',
     b'{"error": {"class": "GenericError", "desc": "JSON parse error, expected separator in list"}}\r\n'),
    (b'{"a": 1 "b": 2}',
     b'{"error": {"class": "GenericError", "desc": "JSON parse error, expected separator in dict"}}\r\n'),
    (b'{"a": tRue}',
     b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'R\'"}}\r\n'
     b'{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}\r\n'),
    (b'{"execute":"query-version","id":"\xc3\xa9\xed\xa0\x80"}',
     b'{"error": {"class": "GenericError", "desc": "JSON parse error, invalid UTF-8 sequence in string"}}\r\n'),
    (b'{"execute": "query-version", "id": "a\\qb"}',
     b'{"error": {"class": "GenericError", "desc": "JSON parse error, invalid escape sequence in string"}}\r\n'),
    (b'@\x01',
     b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'@\'"}}\r\n'
     b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\u0001\'"}}\r\n'),
    (b'"abc" 2 [',
     b'{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}\r\n'
     b'{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}\r\n'),
]


@pytest.mark.parametrize("bytewise", [False, True])
@pytest.mark.parametrize(("data", "expected"), GOLDEN)
def test_golden_errors(data: bytes, expected: bytes, bytewise: bool) -> None:
    conn = negotiated()
    assert b"".join(r for r in replies(conn, data, bytewise=bytewise) if isinstance(r, bytes)) == expected


def test_nesting_limit() -> None:
    conn = negotiated()
    out = replies(conn, b"[" * 1025 + b"]")
    assert out == [b'{"error": {"class": "GenericError", "desc": "JSON nesting depth limit exceeded"}}\r\n',
                   b'{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}\r\n']
    ok = negotiated()
    assert replies(ok, b"[" * 1024 + b"]" * 1024) == [
        b'{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}\r\n']


def test_negotiation_state_machine() -> None:
    conn = QMPConnection(KNOWN)
    assert conn.state is State.NEGOTIATION
    assert conn.send_event("SHUTDOWN", {}) == b""  # no events before command mode
    assert replies(conn, b'{"execute": "query-version", "id": "early"}') == [
        b'{"id": "early", "error": {"class": "CommandNotFound", "desc": '
        b'"Expecting capabilities negotiation with \'qmp_capabilities\'"}}\r\n']
    assert replies(conn, b'{"execute": "qmp_capabilities", "arguments": {"enable": ["bogus-cap"]}, "id": "c0"}') == [
        b'{"id": "c0", "error": {"class": "GenericError", "desc": "Parameter \'null\' does not accept value \'bogus-cap\'"}}\r\n']
    assert replies(conn, b'{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}}') == [
        b'{"error": {"class": "GenericError", "desc": "Invalid parameter type for \'enable\', expected: array"}}\r\n']
    assert conn.state is State.NEGOTIATION
    assert replies(conn, b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}, "id": 1}') == [
        b'{"return": {}, "id": 1}\r\n']
    assert conn.state is State.COMMAND and conn.oob_enabled
    assert replies(conn, b'{"exec-oob": "query-version", "id": "oob1"}') == [
        b'{"id": "oob1", "error": {"class": "GenericError", "desc": "The command query-version does not support OOB"}}\r\n']
    conn.close()
    assert conn.state is State.CLOSED
    with pytest.raises(StateError):
        conn.receive_data(b"{}")


@pytest.mark.parametrize("bytewise", [False, True])
def test_commands_are_events_with_id_echoed(bytewise: bool) -> None:
    conn = negotiated()
    data = (b'{"execute":"query-version","id":{"a":[1,"x"]}}'
            b"{'execute': 'blockdev-del', 'arguments': {'node-name': 'n\\'1'}, 'id': null}")
    out = replies(conn, data, bytewise=bytewise)
    assert out == [Command("query-version", {}, {"a": [1, "x"]}, True),
                   Command("blockdev-del", {"node-name": "n'1"}, None, True)]
    assert isinstance(out[1], Command)
    assert conn.send_return(out[1], {}) == b'{"return": {}, "id": null}\r\n'
    assert conn.send_error(out[1], "GenericError", "x") == (
        b'{"id": null, "error": {"class": "GenericError", "desc": "x"}}\r\n')


def test_a_number_waits_for_its_end() -> None:
    conn = negotiated()
    assert replies(conn, b"1") == []
    assert replies(conn, b"\n") == [
        b'{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}\r\n']


def test_event_shape() -> None:
    conn = negotiated()
    assert conn.send_event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"},
                           timestamp=1795623367.960814) == (
        b'{"timestamp": {"seconds": 1795623367, "microseconds": 960814}, "event": "SHUTDOWN", '
        b'"data": {"guest": false, "reason": "host-qmp-quit"}}\r\n')


def test_encoder_matches_qemu() -> None:
    assert qdict_order(["file", "node-name", "ro", "drv", "backing_file_depth", "encrypted",
                        "detect_zeroes", "bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr",
                        "image", "cache", "write_threshold"]) == [
        "iops_rd", "detect_zeroes", "image", "iops_wr", "ro", "node-name", "backing_file_depth",
        "drv", "iops", "bps_wr", "write_threshold", "encrypted", "bps", "bps_rd", "cache", "file"]
    assert encode({"writeback": True, "direct": False, "no-flush": False}) == (
        '{"no-flush": false, "direct": false, "writeback": true}')
    assert encode(["x/y\u00e9\U0001F600\x01\x7f\n\"\\", 0.1, 1e400, -0.0, 10**19]) == (
        '["x/y\\u00E9\\uD83D\\uDE00\\u0001\\u007F\\n\\"\\\\", 0.10000000000000001, inf, -0, '
        '10000000000000000000]')
    deep: object = []
    for _ in range(1024):
        deep = [deep]
    assert encode(deep) == "[" * 1025 + "]" * 1025


def test_stream_accepts_overlong_nul() -> None:
    (message,) = JSONStream().feed(b'"\xc0\x80"')
    assert message.value == "\x00"


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
_QMPISH = st.fixed_dictionaries(
    {}, optional={"execute": st.sampled_from(["query-version", "qmp_capabilities", "x", ""]) | _JSON,
                  "exec-oob": st.sampled_from(["query-version"]) | _JSON,
                  "arguments": _JSON, "id": _JSON, "other": _JSON})


def _check_outcome(conn: QMPConnection, data: bytes, cut: int) -> None:
    for chunk in (data[:cut], data[cut:]):
        for event in conn.receive_data(chunk):
            if isinstance(event, Reply):
                for line in event.data.split(b"\r\n")[:-1]:
                    reply = json.loads(line.decode("ascii").replace("inf", "1e999"))
                    assert set(reply) <= {"return", "error", "id"}
                    if "error" in reply:
                        assert set(reply["error"]) == {"class", "desc"}
                        assert reply["error"]["class"] in ("GenericError", "CommandNotFound")
            else:
                assert isinstance(event, Command)
                assert event.name in KNOWN


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 200), st.booleans())
def test_fuzz_random_bytes(data: bytes, cut: int, negotiate: bool) -> None:
    conn = negotiated() if negotiate else QMPConnection(KNOWN)
    _check_outcome(conn, data, cut)


@settings(max_examples=300, deadline=None)
@given(st.lists(_QMPISH | _JSON, max_size=4), st.integers(0, 400), st.booleans())
def test_fuzz_random_json(messages: list[object], cut: int, single_quotes: bool) -> None:
    conn = QMPConnection(KNOWN)
    data = b"".join(json.dumps(m).encode() for m in messages)
    if single_quotes:
        data = data.replace(b'"', b"'")
    _check_outcome(conn, data, cut)
