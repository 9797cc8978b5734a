"""STARTTLS in the sans-IO NBD cores (server and client), whole messages and byte by byte."""

from __future__ import annotations

import struct

import pytest

from blockgraph.drivers.nbd import wire as W
from blockgraph.drivers.nbd.client import (
    ClientConnection,
    ConnectionFailed,
    HandshakeDone,
    StartTLS,
    reply_error_text,
)
from blockgraph.drivers.nbd.client import LocalProtocolError as ClientMisuse
from blockgraph.export.nbd import protocol as P

EXPORT = P.ExportInfo("", 1 << 20)


def _opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", P.IHAVEOPT, option, len(data)) + data


def _go(name: bytes = b"") -> bytes:
    return _opt(P.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))


def _tls_conn() -> P.ServerConnection:
    conn = P.ServerConnection(exports={"": EXPORT}, tls=True)
    conn.data_to_send()
    return conn


def _feed(conn: P.ServerConnection, data: bytes, bytewise: bool) -> list[P.Event]:
    events: list[P.Event] = []
    for piece in ([data[i : i + 1] for i in range(len(data))] if bytewise else [data]):
        conn.receive_data(piece)
        while not isinstance(event := conn.next_event(), P.NeedData):
            events.append(event)
    return events


def _replies(conn: P.ServerConnection) -> list[tuple[int, int, bytes]]:
    data = b"".join(bytes(b) for b in conn.data_to_send())
    out = []
    while data:
        _, option, reply, length = struct.unpack(">QIII", data[:20])
        out.append((option, reply, data[20 : 20 + length]))
        data = data[20 + length :]
    return out


BYTEWISE = pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])


# -- server ---------------------------------------------------------------------------------------


@BYTEWISE
def test_server_refuses_options_until_tls(bytewise: bool) -> None:
    conn = _tls_conn()
    messages = (struct.pack(">I", 3) + _opt(P.OPT_LIST) + _opt(P.OPT_STRUCTURED_REPLY) + _go()
                + _opt(P.OPT_INFO, b"\0\0\0\0\0\0") + _opt(99, b"abc"))
    assert _feed(conn, messages, bytewise) == []
    assert _replies(conn) == [
        (option, P.REP_ERR_TLS_REQD, f"Option 0x{option:x} not permitted before TLS".encode())
        for option in (P.OPT_LIST, P.OPT_STRUCTURED_REPLY, P.OPT_GO, P.OPT_INFO, 99)
    ]
    assert conn.phase is P.Phase.OPTIONS and not conn.structured


def test_server_abort_before_tls_is_refused_then_ends() -> None:
    conn = _tls_conn()
    events = _feed(conn, struct.pack(">I", 3) + _opt(P.OPT_ABORT), False)
    assert events == [P.ConnectionClosed(None)]
    assert _replies(conn) == [(P.OPT_ABORT, P.REP_ERR_TLS_REQD, b"Option 0x2 not permitted before TLS")]


@pytest.mark.parametrize(("flags", "message", "reason"), [
    (3, _opt(P.OPT_EXPORT_NAME, b""), "Option 0x1 not permitted before TLS"),
    (0, _opt(P.OPT_EXPORT_NAME, b""), "Unsupported option 0x1"),
    (0, _opt(P.OPT_LIST), "Unsupported option 0x3"),
])
def test_server_drops_what_cannot_be_refused(flags: int, message: bytes, reason: str) -> None:
    conn = _tls_conn()
    assert _feed(conn, struct.pack(">I", flags) + message, False) == [P.ConnectionClosed(reason)]
    assert _replies(conn) == []


def test_server_starttls_with_data_is_fatal_before_tls() -> None:
    conn = _tls_conn()
    events = _feed(conn, struct.pack(">I", 3) + _opt(P.OPT_STARTTLS, b"xx") + _opt(P.OPT_LIST), False)
    assert events == [P.ConnectionClosed("option 'starttls' has unexpected length")]
    assert _replies(conn) == [(P.OPT_STARTTLS, P.REP_ERR_INVALID, b"option 'starttls' has unexpected length")]


@BYTEWISE
def test_server_starttls_then_negotiation_goes_on(bytewise: bool) -> None:
    conn = _tls_conn()
    events = _feed(conn, struct.pack(">I", 3) + _opt(P.OPT_STARTTLS), bytewise)
    assert events == [P.StartTLS()]
    assert _replies(conn) == [(P.OPT_STARTTLS, P.REP_ACK, b"")]
    assert conn.expect is P.Expect.TLS_HANDSHAKE
    # Nothing is parsed until the caller says the handshake is done.
    assert conn.next_event() is P.NEED_DATA
    conn.tls_established()
    assert conn.tls_active
    events = _feed(conn, _opt(P.OPT_STARTTLS) + _opt(P.OPT_STARTTLS, b"x") + _opt(P.OPT_STRUCTURED_REPLY)
                   + _go(), bytewise)
    assert [type(e) for e in events] == [P.TransmissionStarted]
    replies = _replies(conn)
    assert replies[:3] == [
        (P.OPT_STARTTLS, P.REP_ERR_INVALID, b"TLS already enabled"),
        (P.OPT_STARTTLS, P.REP_ERR_INVALID, b"option 'starttls' has unexpected length"),
        (P.OPT_STRUCTURED_REPLY, P.REP_ACK, b""),
    ]
    assert replies[-1] == (P.OPT_GO, P.REP_ACK, b"")


def test_server_eof_during_handshake_closes() -> None:
    conn = _tls_conn()
    assert _feed(conn, struct.pack(">I", 3) + _opt(P.OPT_STARTTLS), False) == [P.StartTLS()]
    conn.receive_data(b"")
    assert conn.next_event() == P.ConnectionClosed(None)


def test_server_bytes_pipelined_after_starttls_end_the_connection() -> None:
    conn = _tls_conn()
    events = _feed(conn, struct.pack(">I", 3) + _opt(P.OPT_STARTTLS) + b"\x16\x03\x01", False)
    assert events == [P.ConnectionClosed("Unexpected data after option 'starttls'")]
    assert _replies(conn) == []


def test_server_tls_established_needs_a_pending_handshake() -> None:
    conn = _tls_conn()
    with pytest.raises(P.LocalProtocolError):
        conn.tls_established()


def test_server_without_creds_refuses_starttls_and_goes_on() -> None:
    conn = P.ServerConnection(exports={"": EXPORT})
    conn.data_to_send()
    events = _feed(conn, struct.pack(">I", 3) + _opt(P.OPT_STARTTLS) + _opt(P.OPT_STARTTLS, b"xx")
                   + _go(), False)
    assert [type(e) for e in events] == [P.TransmissionStarted]
    assert _replies(conn)[:2] == [
        (P.OPT_STARTTLS, P.REP_ERR_POLICY, b"TLS not configured"),
        (P.OPT_STARTTLS, P.REP_ERR_INVALID, b"option 'starttls' has unexpected length"),
    ]


# -- client ---------------------------------------------------------------------------------------

GREETING = struct.pack(">QQH", W.NBDMAGIC, W.IHAVEOPT, W.FLAG_FIXED_NEWSTYLE | W.FLAG_NO_ZEROES)


def _reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", W.OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def _events(conn: ClientConnection, data: bytes, bytewise: bool) -> list[object]:
    events: list[object] = []
    for piece in ([data[i : i + 1] for i in range(len(data))] if bytewise else [data]):
        conn.receive_data(piece)
        while (event := conn.next_event()) is not None:
            events.append(event)
    return events


def _options_sent(data: bytes) -> list[int]:
    out = []
    while data:
        _, option, length = struct.unpack(">QII", data[:16])
        out.append(option)
        data = data[16 + length :]
    return out


@BYTEWISE
def test_client_starts_tls_first(bytewise: bool) -> None:
    conn = ClientConnection("", [W.CONTEXT_BASE_ALLOCATION], tls=True)
    assert _events(conn, GREETING, bytewise) == []
    sent = conn.data_to_send()
    assert sent[:4] == struct.pack(">I", W.FLAG_C_FIXED_NEWSTYLE | W.FLAG_C_NO_ZEROES)
    assert _options_sent(sent[4:]) == [W.OPT_STARTTLS]
    assert _events(conn, _reply(W.OPT_STARTTLS, W.REP_ACK), bytewise) == [StartTLS()]
    assert conn.data_to_send() == b""
    assert conn.next_event() is None
    conn.tls_established()
    assert _options_sent(conn.data_to_send()) == [W.OPT_STRUCTURED_REPLY]
    with pytest.raises(ClientMisuse):
        conn.tls_established()
    # The rest of the handshake is the usual one, now inside TLS.
    events = _events(conn, _reply(W.OPT_STRUCTURED_REPLY, W.REP_ACK), bytewise)
    assert events == [] and _options_sent(conn.data_to_send()) == [W.OPT_SET_META_CONTEXT]
    events = _events(conn, _reply(W.OPT_SET_META_CONTEXT, W.REP_ACK), bytewise)
    assert _options_sent(conn.data_to_send()) == [W.OPT_GO]
    info = struct.pack(">HQH", W.INFO_EXPORT, 1 << 20, W.FLAG_HAS_FLAGS)
    events = _events(conn, _reply(W.OPT_GO, W.REP_INFO, info) + _reply(W.OPT_GO, W.REP_ACK), bytewise)
    assert len(events) == 1 and isinstance(events[0], HandshakeDone)
    assert events[0].info.size == 1 << 20 and events[0].info.structured


@pytest.mark.parametrize(("reply", "data", "text"), [
    (W.REP_ERR_POLICY, b"TLS not configured",
     "Denied by server for option 5 (starttls)\nserver reported: TLS not configured"),
    (W.REP_ERR_POLICY, b"", "Denied by server for option 5 (starttls)"),
    (W.REP_ERR_UNSUP, b"", "Unsupported option 5 (starttls)"),
    (W.REP_INFO, b"xx", "Server rejected request to start TLS 3"),
])
def test_client_starttls_refused(reply: int, data: bytes, text: str) -> None:
    conn = ClientConnection("", tls=True)
    events = _events(conn, GREETING + _reply(W.OPT_STARTTLS, reply, data), False)
    assert events == [ConnectionFailed(text)]


def test_client_data_right_after_the_starttls_ack_fails() -> None:
    conn = ClientConnection("", tls=True)
    events = _events(conn, GREETING + _reply(W.OPT_STARTTLS, W.REP_ACK) + b"\x16\x03", False)
    assert events == [ConnectionFailed("Unexpected data after the reply to starttls")]


def test_plain_client_against_tls_server_gets_qemus_text() -> None:
    conn = ClientConnection("")
    refusal = b"Option 0x%x not permitted before TLS"
    events = _events(conn, GREETING + _reply(W.OPT_STRUCTURED_REPLY, W.REP_ERR_TLS_REQD, refusal % 8)
                     + _reply(W.OPT_GO, W.REP_ERR_TLS_REQD, refusal % 7), False)
    assert events == [ConnectionFailed(
        "TLS negotiation required before option 7 (go)\nDid you forget a valid tls-creds?\n"
        "server reported: Option 0x7 not permitted before TLS")]


def test_reply_error_texts() -> None:
    assert reply_error_text(W.OPT_GO, W.REP_ERR_UNKNOWN, "export 'x' not present") == \
        "Requested export not available\nserver reported: export 'x' not present"
    assert reply_error_text(W.OPT_GO, W.REP_ERR_SHUTDOWN) == "Server shutting down before option 7 (go)"
    assert reply_error_text(99, (1 << 31) + 77) == "Unknown error code when asking for option 99 (<unknown>)"
