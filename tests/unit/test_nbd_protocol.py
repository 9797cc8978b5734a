"""The sans-IO NBD server core: whole messages, byte by byte, golden bytes, and fuzzing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockgraph.export.nbd import protocol as P

MiB = 1 << 20
EXPORT = P.ExportInfo("", 8 * MiB)
NAMED = P.ExportInfo("exp", 8 * MiB, description="my description", allocation_depth=True)


def _opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", P.IHAVEOPT, option, len(data)) + data


def _go(name: bytes = b"", infos: tuple[int, ...] = (P.INFO_BLOCK_SIZE,), option: int = P.OPT_GO) -> bytes:
    return _opt(option, struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
                + b"".join(struct.pack(">H", i) for i in infos))


def _meta(option: int, *queries: bytes, name: bytes = b"") -> bytes:
    body = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    return _opt(option, body + b"".join(struct.pack(">I", len(q)) + q for q in queries))


def _conn(*exports: P.ExportInfo) -> P.ServerConnection:
    return P.ServerConnection(exports={e.name: e for e in (exports or (EXPORT,))})


def _feed(conn: P.ServerConnection, data: bytes, bytewise: bool = False) -> list[P.Event]:
    events: list[P.Event] = []
    pieces = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    for piece in pieces:
        conn.receive_data(piece)
        while True:
            event = conn.next_event()
            if isinstance(event, P.NeedData):
                break
            events.append(event)
    return events


def _sent(conn: P.ServerConnection) -> bytes:
    return b"".join(bytes(b) for b in conn.data_to_send())


def _option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while data:
        magic, option, reply, length = struct.unpack(">QIII", data[:20])
        assert magic == P.OPTION_REPLY_MAGIC
        out.append((option, reply, data[20 : 20 + length]))
        data = data[20 + length :]
    return out


def _transmission(structured: bool = True, read_only: bool = False, meta: bool = True,
                  ) -> P.ServerConnection:
    conn = _conn(P.ExportInfo("", 8 * MiB, read_only=read_only, allocation_depth=True))
    msgs = struct.pack(">I", 3)
    if structured:
        msgs += _opt(P.OPT_STRUCTURED_REPLY)
        if meta:
            msgs += _meta(P.OPT_SET_META_CONTEXT, b"base:allocation", b"qemu:allocation-depth")
    events = _feed(conn, msgs + _go())
    assert isinstance(events[-1], P.TransmissionStarted)
    conn.data_to_send()
    return conn


# -- golden bytes ------------------------------------------------------------------------------

GOLDEN = [
    (P.greeting(), "4e42444d41474943" "49484156454f5054" "0003"),
    (P.option_reply(P.OPT_GO, P.REP_ACK), "0003e889045565a9" "00000007" "00000001" "00000000"),
    (P.option_reply(P.OPT_LIST, P.REP_ERR_INVALID, b"x"),
     "0003e889045565a9" "00000003" "80000003" "00000001" "78"),
    (P.simple_reply(P.EINVAL, 0x1122334455667788), "67446698" "00000016" "1122334455667788"),
    (P.chunk_header(P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, 7, 0),
     "668e33ef" "0001" "0000" "0000000000000007" "00000000"),
    (P.hole_chunk(1, 4096, 512, P.REPLY_FLAG_DONE),
     "668e33ef" "0001" "0002" "0000000000000001" "0000000c" "0000000000001000" "00000200"),
    (P.error_chunk(2, P.EINVAL, b"bad"),
     "668e33ef" "0001" "8001" "0000000000000002" "00000009" "00000016" "0003" "626164"),
    (P.request_header(5, P.CMD_READ, 512, 4096, P.CMD_FLAG_FUA),
     "25609513" "0001" "0000" "0000000000000005" "0000000000000200" "00001000"),
]


@pytest.mark.parametrize(("wire", "golden"), GOLDEN)
def test_golden_bytes(wire: bytes, golden: str) -> None:
    assert wire.hex() == golden


def test_transmission_flags_are_qemus() -> None:
    # Observed qemu-nbd 7.2 values (spec §3): 0x0d6d writable, 0x048f read-only + DF.
    assert P.ExportInfo("", 0).flags == 0x0C6D
    assert P.ExportInfo("", 0, multi_conn=True).flags == 0x0D6D
    assert P.ExportInfo("", 0, read_only=True).flags | P.FLAG_SEND_DF == 0x048F


# -- handshake -------------------------------------------------------------------------------


@pytest.mark.parametrize("bytewise", [False, True])
def test_go_handshake(bytewise: bool) -> None:
    conn = _conn(NAMED)
    assert _sent(conn) == P.greeting()
    events = _feed(conn, struct.pack(">I", 3) + _opt(P.OPT_STRUCTURED_REPLY)
                   + _go(b"exp", (P.INFO_NAME, P.INFO_BLOCK_SIZE, P.INFO_DESCRIPTION)), bytewise)
    replies = _option_replies(_sent(conn))
    assert replies == [
        (P.OPT_STRUCTURED_REPLY, P.REP_ACK, b""),
        (P.OPT_GO, P.REP_INFO, struct.pack(">H", P.INFO_NAME) + b"exp"),
        (P.OPT_GO, P.REP_INFO, struct.pack(">H", P.INFO_DESCRIPTION) + b"my description"),
        (P.OPT_GO, P.REP_INFO, struct.pack(">HIII", P.INFO_BLOCK_SIZE, 1, 4096, 32 * MiB)),
        (P.OPT_GO, P.REP_INFO, struct.pack(">HQH", P.INFO_EXPORT, 8 * MiB, 0x0CED)),
        (P.OPT_GO, P.REP_ACK, b""),
    ]
    assert events == [P.TransmissionStarted(NAMED, True, ())]
    assert conn.phase is P.Phase.TRANSMISSION


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name(no_zeroes: bool) -> None:
    conn = _conn()
    conn.data_to_send()
    events = _feed(conn, struct.pack(">I", 3 if no_zeroes else 1) + _opt(P.OPT_EXPORT_NAME))
    assert _sent(conn) == struct.pack(">QH", 8 * MiB, 0x0C6D) + (b"" if no_zeroes else bytes(124))
    assert isinstance(events[0], P.TransmissionStarted)


@pytest.mark.parametrize(("messages", "reason"), [
    (struct.pack(">I", 7), "Unknown client flags 0x4 received"),
    (struct.pack(">I", 3) + b"X" * 16, "Bad magic received"),
    (struct.pack(">I", 0) + _go(), "Unsupported option 7 (go); no way to report error"),
    (struct.pack(">I", 3) + _opt(P.OPT_EXPORT_NAME, b"nope"), "export not found"),
    (struct.pack(">I", 3) + struct.pack(">QII", P.IHAVEOPT, 3, 64 * MiB),
     "len (67108864) is larger than max len (33554432)"),
])
def test_handshake_violations_close(messages: bytes, reason: str) -> None:
    conn = _conn()
    conn.data_to_send()
    events = _feed(conn, messages)
    assert events == [P.ConnectionClosed(reason)]
    assert conn.phase is P.Phase.CLOSED
    assert conn.next_event() is P.NEED_DATA


def test_option_errors_keep_haggling() -> None:
    conn = _conn()
    conn.data_to_send()
    _feed(conn, struct.pack(">I", 3) + _opt(99) + _opt(P.OPT_LIST, b"x") + _opt(P.OPT_STARTTLS)
          + _opt(P.OPT_INFO, struct.pack(">I", 5000)) + _go(b"nope") + _opt(P.OPT_INFO, b"\0\0")
          + _meta(P.OPT_SET_META_CONTEXT, b"base:allocation") + _opt(P.OPT_STRUCTURED_REPLY)
          + _opt(P.OPT_STRUCTURED_REPLY))
    replies = [(o, r, d.decode()) for o, r, d in _option_replies(_sent(conn))]
    assert replies == [
        (99, P.REP_ERR_UNSUP, "Unsupported option 99 (<unknown>)"),
        (P.OPT_LIST, P.REP_ERR_INVALID, "option 'list' has unexpected length"),
        (P.OPT_STARTTLS, P.REP_ERR_POLICY, "TLS not configured"),
        (P.OPT_INFO, P.REP_ERR_INVALID, "Invalid name length: 5000"),
        (P.OPT_GO, P.REP_ERR_UNKNOWN, "export 'nope' not present"),
        (P.OPT_INFO, P.REP_ERR_INVALID, "Inconsistent lengths in option info"),
        (P.OPT_SET_META_CONTEXT, P.REP_ERR_INVALID,
         "request option 'set meta context' when structured reply is not negotiated"),
        (P.OPT_STRUCTURED_REPLY, P.REP_ACK, ""),
        (P.OPT_STRUCTURED_REPLY, P.REP_ERR_INVALID, "structured reply already negotiated"),
    ]
    assert conn.phase is P.Phase.OPTIONS


def test_list_and_abort() -> None:
    conn = _conn(EXPORT, NAMED)
    conn.data_to_send()
    events = _feed(conn, struct.pack(">I", 3) + _opt(P.OPT_LIST) + _opt(P.OPT_ABORT))
    assert _option_replies(_sent(conn)) == [
        (P.OPT_LIST, P.REP_SERVER, b"\0\0\0\0"),
        (P.OPT_LIST, P.REP_SERVER, b"\0\0\0\3expmy description"),
        (P.OPT_LIST, P.REP_ACK, b""),
        (P.OPT_ABORT, P.REP_ACK, b""),
    ]
    assert events == [P.ConnectionClosed(None)]


def test_meta_contexts() -> None:
    conn = _conn(NAMED)
    conn.data_to_send()
    _feed(conn, struct.pack(">I", 3) + _opt(P.OPT_STRUCTURED_REPLY)
          + _meta(P.OPT_LIST_META_CONTEXT, name=b"exp")
          + _meta(P.OPT_LIST_META_CONTEXT, b"qemu:", name=b"exp")
          + _meta(P.OPT_SET_META_CONTEXT, b"x:y", b"qemu:allocation-depth", b"base:allocation", name=b"exp"))
    replies = _option_replies(_sent(conn))[1:]
    assert replies == [
        (9, P.REP_META_CONTEXT, b"\0\0\0\0base:allocation"),
        (9, P.REP_META_CONTEXT, b"\0\0\0\0qemu:allocation-depth"),
        (9, P.REP_ACK, b""),
        (9, P.REP_META_CONTEXT, b"\0\0\0\0qemu:allocation-depth"),
        (9, P.REP_ACK, b""),
        (10, P.REP_META_CONTEXT, b"\0\0\0\0base:allocation"),
        (10, P.REP_META_CONTEXT, b"\0\0\0\1qemu:allocation-depth"),
        (10, P.REP_ACK, b""),
    ]
    events = _feed(conn, _go(b"exp"))
    assert events == [P.TransmissionStarted(NAMED, True, ((0, "base:allocation"), (1, "qemu:allocation-depth")))]


# -- transmission ----------------------------------------------------------------------------


@pytest.mark.parametrize("bytewise", [False, True])
def test_write_request_whole_and_bytewise(bytewise: bool) -> None:
    conn = _transmission()
    payload = bytes(range(256)) * 2
    events = _feed(conn, P.request_header(9, P.CMD_WRITE, 4096, 512, P.CMD_FLAG_FUA) + payload
                   + P.request_header(10, P.CMD_FLUSH, 0, 0), bytewise)
    assert events == [P.Request(9, P.CMD_WRITE, P.CMD_FLAG_FUA, 4096, 512, bytearray(payload)),
                      P.Request(10, P.CMD_FLUSH, 0, 0, 0)]
    conn.reply_ok(10)
    conn.reply_ok(9)
    assert _sent(conn) == P.simple_reply(0, 10) + P.simple_reply(0, 9)
    assert _feed(conn, P.request_header(0, P.CMD_DISC, 0, 0)) == [P.ConnectionClosed(None)]


def test_read_replies() -> None:
    conn = _transmission()
    (request,) = _feed(conn, P.request_header(3, P.CMD_READ, 0, 2048))
    assert isinstance(request, P.Request)
    data = memoryview(b"\xaa" * 1024)
    conn.reply_read(3, 0, [(0, data), (1024, 1024)])
    assert _sent(conn) == (P.chunk_header(0, P.REPLY_TYPE_OFFSET_DATA, 3, 8 + 1024) + struct.pack(">Q", 0)
                           + bytes(data) + P.hole_chunk(3, 1024, 1024, P.REPLY_FLAG_DONE))
    _feed(conn, P.request_header(4, P.CMD_READ, 0, 0))
    conn.reply_read(4, 0, [])
    assert _sent(conn) == P.chunk_header(P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, 4, 0)
    simple = _transmission(structured=False)
    _feed(simple, P.request_header(5, P.CMD_READ, 0, 2048))
    simple.reply_read(5, 0, [(0, data), (1024, 1024)])
    assert _sent(simple) == P.simple_reply(0, 5) + bytes(data) + bytes(1024)


def test_block_status_reply() -> None:
    conn = _transmission()
    _feed(conn, P.request_header(6, P.CMD_BLOCK_STATUS, 0, 8 * MiB, P.CMD_FLAG_REQ_ONE))
    conn.reply_block_status(6, [(0, [(65536, 0)]), (1, [(65536, 1)])])
    assert _sent(conn).hex() == (
        "668e33ef" "0000" "0005" "0000000000000006" "0000000c" "00000000" "00010000" "00000000"
        "668e33ef" "0001" "0005" "0000000000000006" "0000000c" "00000001" "00010000" "00000001")
    with pytest.raises(P.LocalProtocolError):
        conn.reply_ok(6)


@pytest.mark.parametrize(("header", "message"), [
    (P.request_header(1, P.CMD_READ, 8 * MiB - 512, 1024),
     "operation past EOF; From: 8388096, Len: 1024, Size: 8388608"),
    (P.request_header(1, P.CMD_READ, 0, 64 * MiB), "len (67108864 ) is larger than max len (33554432)"),
    (P.request_header(1, P.CMD_READ, 0, 512, P.CMD_FLAG_REQ_ONE), "unsupported flags for command read (got 0x8)"),
    (P.request_header(1, 42, 0, 0), "invalid request type (42) received"),
    (P.request_header(1, P.CMD_BLOCK_STATUS, 0, 0), "need non-zero length"),
    (P.request_header(1, P.CMD_TRIM, 0, 512, P.CMD_FLAG_DF), "unsupported flags for command trim (got 0x4)"),
])
def test_invalid_requests_get_einval(header: bytes, message: str) -> None:
    conn = _transmission()
    assert _feed(conn, header) == []
    assert _sent(conn) == P.error_chunk(1, P.EINVAL, message.encode())
    assert conn.phase is P.Phase.TRANSMISSION


def test_invalid_requests_simple_and_read_only() -> None:
    conn = _transmission(structured=False, read_only=True)
    assert _feed(conn, P.request_header(1, P.CMD_WRITE, 0, 512) + b"x" * 512
                 + P.request_header(2, P.CMD_READ, 0, 512, P.CMD_FLAG_DF)
                 + P.request_header(3, P.CMD_BLOCK_STATUS, 0, 512)) == []
    assert _sent(conn) == P.simple_reply(P.EINVAL, 1) + P.simple_reply(P.EINVAL, 2) + P.simple_reply(P.EINVAL, 3)


def test_bad_request_magic_and_huge_write_close() -> None:
    conn = _transmission()
    events = _feed(conn, b"\xde\xad\xbe\xef" + P.request_header(7, 0, 0, 512)[4:])
    assert events == [P.ConnectionClosed("invalid magic (got 0xdeadbeef)")]
    assert _sent(conn) == P.error_chunk(7, P.EINVAL, b"invalid magic (got 0xdeadbeef)")
    conn = _transmission()
    events = _feed(conn, P.request_header(8, P.CMD_WRITE, 0, 64 * MiB))
    assert events == [P.ConnectionClosed("Request handling failed in intermediate state")]


def test_eof_mid_message() -> None:
    conn = _transmission()
    assert _feed(conn, P.request_header(1, P.CMD_WRITE, 0, 512) + b"x" * 10) == []
    conn.receive_data(b"")
    assert conn.next_event() == P.ConnectionClosed("Unexpected end-of-file before all data were read")


def test_errno_mapping() -> None:
    import errno

    assert P.errno_to_nbd(errno.EROFS) == P.EPERM
    assert P.errno_to_nbd(errno.EFBIG) == P.ENOSPC
    assert P.errno_to_nbd(errno.EOPNOTSUPP) == P.ENOTSUP
    assert P.errno_to_nbd(errno.EBADF) == P.EINVAL


# -- fuzzing: replies or a close, never an exception ---------------------------------------------


def _drain(conn: P.ServerConnection, data: bytes, chunking: list[int]) -> None:
    pos = 0
    sizes = chunking or [len(data) or 1]
    i = 0
    while pos < len(data):
        n = sizes[i % len(sizes)] or 1
        conn.receive_data(data[pos : pos + n])
        pos += n
        i += 1
        for _ in range(10000):
            event = conn.next_event()
            if isinstance(event, P.NeedData):
                break
            if isinstance(event, P.Request):
                # Answer like a server would, so cookies are retired.
                if event.command == P.CMD_READ:
                    conn.reply_read(event.cookie, event.offset, [(event.offset, event.length)] if event.length else [])
                elif event.command == P.CMD_BLOCK_STATUS:
                    conn.reply_block_status(event.cookie, [(cid, [(event.length, 0)]) for cid, _ in conn.contexts])
                else:
                    conn.reply_ok(event.cookie)
            if isinstance(event, P.ConnectionClosed):
                return
        conn.data_to_send()
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), (P.ConnectionClosed, P.NeedData))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(1, 64), max_size=8))
def test_fuzz_after_handshake(garbage: bytes, chunking: list[int]) -> None:
    conn = _transmission()
    _drain(conn, garbage, chunking)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(1, 64), max_size=8), st.sampled_from([0, 1, 2, 3]))
def test_fuzz_during_handshake(garbage: bytes, chunking: list[int], flags: int) -> None:
    conn = _conn(EXPORT, NAMED)
    _drain(conn, struct.pack(">I", flags) + garbage, chunking)


_MESSAGES = st.sampled_from([
    _opt(P.OPT_STRUCTURED_REPLY), _go(), _go(b"exp"), _opt(P.OPT_LIST), _opt(99), _opt(P.OPT_STARTTLS),
    _meta(P.OPT_SET_META_CONTEXT, b"base:allocation"), _meta(P.OPT_LIST_META_CONTEXT, b"qemu:"),
    _go(option=P.OPT_INFO), P.request_header(1, P.CMD_READ, 0, 512),
    P.request_header(2, P.CMD_WRITE, 0, 3) + b"abc", P.request_header(3, P.CMD_BLOCK_STATUS, 0, 4096),
    P.request_header(4, P.CMD_TRIM, 0, 4096, P.CMD_FLAG_FUA), P.request_header(5, 9, 0, 0),
])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_MESSAGES, st.binary(max_size=40)), max_size=12),
       st.lists(st.integers(1, 64), max_size=8))
def test_fuzz_message_soup(messages: list[bytes], chunking: list[int]) -> None:
    conn = _conn(EXPORT, NAMED)
    _drain(conn, struct.pack(">I", 3) + b"".join(messages), chunking)


# -- receiving payloads in place -----------------------------------------------------------------


def _run_in_place(conn: P.ServerConnection, data: bytes, chunking: list[int],
                  in_place: bool) -> tuple[list[P.Event], bytes, int]:
    """Feed ``data`` in chunks as the server does; ``in_place``: a WRITE's payload goes where
    :meth:`~P.ServerConnection.payload_target` says (at most a chunk at a time).
    Returns the events, the bytes sent and how many bytes were received in place."""
    events: list[P.Event] = []
    sent = b""
    pos = 0
    placed = 0
    i = 0
    sizes = chunking or [len(data) or 1]
    while pos < len(data):
        n = sizes[i % len(sizes)]
        i += 1
        target = conn.payload_target() if in_place else None
        if target is not None:
            n = min(n, len(target), len(data) - pos)
            target[:n] = data[pos : pos + n]
            conn.payload_received(n)
            placed += n
        else:
            conn.receive_data(data[pos : pos + n])
        pos += n
        while not isinstance(event := conn.next_event(), P.NeedData):
            events.append(event)
            if isinstance(event, P.Request) and event.command != P.CMD_READ:
                conn.reply_ok(event.cookie)
            elif isinstance(event, P.Request):
                conn.reply_read(event.cookie, event.offset, [(event.offset, event.length)])
        sent += _sent(conn)
    conn.receive_data(b"")
    while not isinstance(event := conn.next_event(), P.NeedData):
        events.append(event)
    return events, sent + _sent(conn), placed


_WRITES = st.sampled_from([
    P.request_header(1, P.CMD_WRITE, 0, 3) + b"abc",
    P.request_header(2, P.CMD_WRITE, 4096, 700) + bytes(range(100)) * 7,
    P.request_header(3, P.CMD_WRITE, 8 * MiB - 10, 20) + b"w" * 20,  # past EOF: an error reply
    P.request_header(4, P.CMD_WRITE, 0, 0),
    P.request_header(5, P.CMD_READ, 0, 512),
    P.request_header(6, P.CMD_FLUSH, 0, 0),
])


@settings(max_examples=300, deadline=None)
@given(st.lists(_WRITES, max_size=10), st.lists(st.integers(1, 900), max_size=8), st.booleans())
def test_payload_in_place_is_receive_data(messages: list[bytes], chunking: list[int],
                                          truncate: bool) -> None:
    data = b"".join(messages)
    if truncate and data:
        data = data[:-1]  # EOF inside the last message
    expected = _run_in_place(_transmission(), data, chunking, in_place=False)
    got = _run_in_place(_transmission(), data, chunking, in_place=True)
    assert got[:2] == expected[:2]
    assert expected[2] == 0


def test_payload_target_is_the_request_buffer() -> None:
    conn = _transmission()
    assert conn.payload_target() is None
    conn.receive_data(P.request_header(7, P.CMD_WRITE, 0, 1000) + b"a" * 100)
    assert isinstance(conn.next_event(), P.NeedData)
    target = conn.payload_target()
    assert target is not None and len(target) == 900
    target[:500] = b"b" * 500
    conn.payload_received(500)
    assert isinstance(conn.next_event(), P.NeedData)
    target = conn.payload_target()
    assert target is not None and len(target) == 400
    with pytest.raises(P.LocalProtocolError):
        conn.payload_received(401)
    target[:] = b"c" * 400
    conn.payload_received(400)
    assert conn.payload_target() is None
    assert conn.next_event() == P.Request(7, P.CMD_WRITE, 0, 0, 1000, bytearray(b"a" * 100 + b"b" * 500 + b"c" * 400))
    # Bytes buffered ahead of a payload keep it from being received in place.
    conn.receive_data(P.request_header(8, P.CMD_WRITE, 0, 10) + b"x")
    assert isinstance(conn.next_event(), P.NeedData)
    assert conn.payload_target() is not None
    conn.receive_data(b"y" * 9 + P.request_header(9, P.CMD_WRITE, 0, 10))
    assert conn.buffered == 28
    assert conn.payload_target() is None
    assert conn.next_event() == P.Request(8, P.CMD_WRITE, 0, 0, 10, bytearray(b"x" + b"y" * 9))
    assert isinstance(conn.next_event(), P.NeedData)
    assert conn.buffered == 0 and conn.payload_target() is not None


def test_payload_buffer_hook() -> None:
    taken: list[int] = []

    def take(size: int) -> bytearray:
        taken.append(size)
        return bytearray(b"\xff" * size)  # not zeroed: the payload overwrites it all

    conn = P.ServerConnection(exports={"": EXPORT}, payload_buffer=take)
    events = _feed(conn, struct.pack(">I", 3) + _go())
    assert isinstance(events[-1], P.TransmissionStarted)
    assert _feed(conn, P.request_header(1, P.CMD_WRITE, 0, 4) + b"ab") == []
    assert _feed(conn, b"cd") == [P.Request(1, P.CMD_WRITE, 0, 0, 4, bytearray(b"abcd"))]
    assert taken == [4]
