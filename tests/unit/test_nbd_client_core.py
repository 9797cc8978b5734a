"""The sans-IO NBD client core, fed server bytes whole and byte by byte."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from blockgraph.drivers.nbd import wire as W
from blockgraph.drivers.nbd.client import (
    ClientConnection,
    ConnectionFailed,
    Event,
    Extents,
    HandshakeDone,
    ReadData,
    ReadHole,
    RequestDone,
)
from blockgraph.drivers.nbd.driver import NbdDriver
from blockgraph.errors import BlockError

Feed = Callable[[ClientConnection, bytes], list[Event]]


def _whole(conn: ClientConnection, data: bytes) -> list[Event]:
    conn.receive_data(data)
    return _drain(conn)


def _bytewise(conn: ClientConnection, data: bytes) -> list[Event]:
    events: list[Event] = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        events += _drain(conn)
    return events


def _drain(conn: ClientConnection) -> list[Event]:
    events: list[Event] = []
    while (event := conn.next_event()) is not None:
        events.append(event)
    return events


FEEDS = [pytest.param(_whole, id="whole"), pytest.param(_bytewise, id="bytewise")]


def _reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", W.OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def _chunk(flags: int, reply_type: int, cookie: int, payload: bytes) -> bytes:
    return struct.pack(">IHHQI", W.STRUCTURED_REPLY_MAGIC, flags, reply_type, cookie, len(payload)) + payload


GREETING = struct.pack(">QQH", W.NBDMAGIC, W.IHAVEOPT, W.FLAG_FIXED_NEWSTYLE | W.FLAG_NO_ZEROES)
EXPORT_FLAGS = W.FLAG_HAS_FLAGS | W.FLAG_SEND_FLUSH | W.FLAG_SEND_FUA | W.FLAG_SEND_WRITE_ZEROES


def _handshake(feed: Feed, conn: ClientConnection) -> list[Event]:
    server = (
        GREETING
        + _reply(W.OPT_STRUCTURED_REPLY, W.REP_ACK)
        + _reply(W.OPT_SET_META_CONTEXT, W.REP_META_CONTEXT, struct.pack(">I", 7) + b"base:allocation")
        + _reply(W.OPT_SET_META_CONTEXT, W.REP_ACK)
        + _reply(W.OPT_GO, W.REP_INFO, struct.pack(">HQH", W.INFO_EXPORT, 1 << 20, EXPORT_FLAGS))
        + _reply(W.OPT_GO, W.REP_INFO, struct.pack(">HIII", W.INFO_BLOCK_SIZE, 512, 4096, 1 << 20))
        + _reply(W.OPT_GO, W.REP_ACK)
    )
    return feed(conn, server)


@pytest.mark.parametrize("feed", FEEDS)
def test_handshake(feed: Feed) -> None:
    conn = ClientConnection("exp", ["base:allocation"])
    events = _handshake(feed, conn)
    assert len(events) == 1 and isinstance(events[0], HandshakeDone)
    info = events[0].info
    assert (info.size, info.flags, info.structured) == (1 << 20, EXPORT_FLAGS, True)
    assert info.contexts == {"base:allocation": 7}
    assert (info.min_block, info.preferred_block, info.max_block) == (512, 4096, 1 << 20)
    sent = conn.data_to_send()
    # client flags, then STRUCTURED_REPLY, SET_META_CONTEXT, GO (all in one buffer, in order)
    assert sent.startswith(struct.pack(">I", W.FLAG_C_FIXED_NEWSTYLE | W.FLAG_C_NO_ZEROES))
    assert struct.pack(">QII", W.IHAVEOPT, W.OPT_STRUCTURED_REPLY, 0) in sent
    assert b"base:allocation" in sent
    go = struct.pack(">QII", W.IHAVEOPT, W.OPT_GO, 4 + 3 + 2 + 2) + struct.pack(">I", 3) + b"exp"
    assert sent.endswith(go + struct.pack(">HH", 1, W.INFO_BLOCK_SIZE))


@pytest.mark.parametrize("feed", FEEDS)
def test_unknown_export(feed: Feed) -> None:
    conn = ClientConnection("nosuch")
    server = (GREETING + _reply(W.OPT_STRUCTURED_REPLY, W.REP_ACK)
              + _reply(W.OPT_GO, W.REP_ERR_UNKNOWN, b"export 'nosuch' not present"))
    events = feed(conn, server)
    assert events == [ConnectionFailed("Requested export not available\n"
                                       "server reported: export 'nosuch' not present")]


@pytest.mark.parametrize("feed", FEEDS)
def test_old_server_without_structured_or_go(feed: Feed) -> None:
    conn = ClientConnection("", ["base:allocation"])
    server = (GREETING + _reply(W.OPT_STRUCTURED_REPLY, W.REP_ERR_UNSUP)
              + _reply(W.OPT_GO, W.REP_ERR_UNSUP) + struct.pack(">QH", 4096, W.FLAG_HAS_FLAGS))
    events = feed(conn, server)
    assert len(events) == 1 and isinstance(events[0], HandshakeDone)
    assert events[0].info.size == 4096 and not events[0].info.structured
    assert not events[0].info.contexts


@pytest.mark.parametrize("feed", FEEDS)
def test_structured_read_out_of_order(feed: Feed) -> None:
    conn = ClientConnection("", ["base:allocation"])
    _handshake(feed, conn)
    conn.data_to_send()
    first = conn.send_request(W.CMD_READ, 0, 8)
    second = conn.send_request(W.CMD_READ, 4096, 16)
    assert len(conn.data_to_send()) == 2 * 28
    server = (
        _chunk(0, W.REPLY_TYPE_OFFSET_DATA, second, struct.pack(">Q", 4096) + b"A" * 8)
        + _chunk(W.REPLY_FLAG_DONE, W.REPLY_TYPE_OFFSET_DATA, first, struct.pack(">Q", 0) + b"B" * 8)
        + _chunk(0, W.REPLY_TYPE_OFFSET_HOLE, second, struct.pack(">QI", 4104, 8))
        + _chunk(W.REPLY_FLAG_DONE, W.REPLY_TYPE_NONE, second, b"")
    )
    assert feed(conn, server) == [
        ReadData(second, 4096, b"A" * 8),
        ReadData(first, 0, b"B" * 8),
        RequestDone(first, 0),
        ReadHole(second, 4104, 8),
        RequestDone(second, 0),
    ]
    assert conn.inflight == 0


@pytest.mark.parametrize("feed", FEEDS)
def test_error_chunk_and_block_status(feed: Feed) -> None:
    conn = ClientConnection("", ["base:allocation"])
    _handshake(feed, conn)
    read = conn.send_request(W.CMD_READ, 0, 512)
    status = conn.send_request(W.CMD_BLOCK_STATUS, 0, 8192, W.CMD_FLAG_REQ_ONE)
    server = (
        _chunk(W.REPLY_FLAG_DONE, W.REPLY_TYPE_ERROR, read, struct.pack(">IH", W.EIO, 4) + b"oops")
        + _chunk(W.REPLY_FLAG_DONE, W.REPLY_TYPE_BLOCK_STATUS, status,
                 struct.pack(">III", 7, 4096, W.STATE_HOLE | W.STATE_ZERO))
    )
    assert feed(conn, server) == [
        RequestDone(read, 5, "oops"),
        Extents(status, 7, ((4096, W.STATE_HOLE | W.STATE_ZERO),)),
        RequestDone(status, 0),
    ]


@pytest.mark.parametrize("feed", FEEDS)
def test_simple_replies(feed: Feed) -> None:
    conn = ClientConnection("")
    feed(conn, GREETING + _reply(W.OPT_STRUCTURED_REPLY, W.REP_ERR_UNSUP)
         + _reply(W.OPT_GO, W.REP_INFO, struct.pack(">HQH", W.INFO_EXPORT, 4096, W.FLAG_HAS_FLAGS))
         + _reply(W.OPT_GO, W.REP_ACK))
    write = conn.send_request(W.CMD_WRITE, 0, 4, data=b"abcd")
    read = conn.send_request(W.CMD_READ, 0, 4)
    assert conn.data_to_send().endswith(struct.pack(">IHHQQI", W.REQUEST_MAGIC, 0, W.CMD_READ, read, 0, 4))
    server = (struct.pack(">IIQ", W.SIMPLE_REPLY_MAGIC, 0, read) + b"wxyz"
              + struct.pack(">IIQ", W.SIMPLE_REPLY_MAGIC, W.ENOSPC, write))
    assert feed(conn, server) == [ReadData(read, 0, b"wxyz"), RequestDone(read, 0), RequestDone(write, 28)]


@pytest.mark.parametrize("feed", FEEDS)
def test_protocol_violations_close(feed: Feed) -> None:
    conn = ClientConnection("", ["base:allocation"])
    _handshake(feed, conn)
    read = conn.send_request(W.CMD_READ, 0, 8)
    bad = _chunk(W.REPLY_FLAG_DONE, W.REPLY_TYPE_OFFSET_DATA, read, struct.pack(">Q", 4) + b"x" * 8)
    events = feed(conn, bad)
    assert events == [ConnectionFailed("Protocol error: server sent chunk exceeding requested region")]
    conn2 = ClientConnection("", ["base:allocation"])
    _handshake(feed, conn2)
    events = feed(conn2, _chunk(W.REPLY_FLAG_DONE, W.REPLY_TYPE_NONE, 99, b""))
    assert events == [ConnectionFailed("Unexpected cookie 0x63")]


def test_bad_magic_and_eof() -> None:
    conn = ClientConnection("")
    conn.receive_data(b"X" * 18)
    assert conn.next_event() == ConnectionFailed("Bad initial magic received")
    conn = ClientConnection("", ["base:allocation"])
    _handshake(_whole, conn)
    conn.send_request(W.CMD_FLUSH, 0, 0)
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionFailed("Connection closed by the server")


@pytest.mark.parametrize(("filename", "expected"), [
    ("nbd+unix:///?socket=/s", {"server.type": "unix", "server.path": "/s"}),
    ("nbd+unix:///exp?socket=/s", {"server.type": "unix", "server.path": "/s", "export": "exp"}),
    ("nbd://h/e", {"server.type": "inet", "server.host": "h", "server.port": "10809", "export": "e"}),
    ("nbd+tcp://h:99", {"server.type": "inet", "server.host": "h", "server.port": "99"}),
    ("nbd://[::1]:7/e", {"server.type": "inet", "server.host": "::1", "server.port": "7", "export": "e"}),
    ("nbd:unix:/s:exportname=x", {"server.type": "unix", "server.path": "/s", "export": "x"}),
    ("nbd:h:12", {"server.type": "inet", "server.host": "h", "server.port": "12"}),
    ("nbd:", {}),
])
def test_parse_filename(filename: str, expected: dict[str, str]) -> None:
    options: dict[str, object] = {}
    NbdDriver.parse_filename(filename, options)
    assert options == expected


@pytest.mark.parametrize(("filename", "message"), [
    ("nbd://", "No valid URL specified"),
    ("nbd+unix:///x", "No valid URL specified"),
    ("nbd+unix://h/x?socket=a", "No valid URL specified"),
    ("nbd://h?socket=x", "No valid URL specified"),
    ("nbd+unix:///?socket=a&b=c", "No valid URL specified"),
    ("nbd:foo", "error parsing address 'foo'"),
])
def test_parse_filename_errors(filename: str, message: str) -> None:
    with pytest.raises(BlockError, match=f"^{message}$"):
        NbdDriver.parse_filename(filename, {})
