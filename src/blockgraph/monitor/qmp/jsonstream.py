"""QEMU's JSON dialect as a byte stream: the lexer, the message splitter and the parser of QMP.

QMP input is a stream of bytes with no framing: a message ends where its brackets balance.
Everything here works byte by byte, so a message may arrive in any number of pieces. The rules,
as QEMU 7.2 applies them (each observed on the wire):

* the lexer sees bytes, not characters; strings may be ``"double"`` or ``'single'`` quoted;
  bytes below 0x20 and the bytes 0xFE/0xFF never appear in a token;
* a lexical error (``JSON parse error, stray '<token so far>'``) throws away the message being
  collected, then the lexer skips input until a structural character (``{}[]:,``), a control
  character other than tab, or 0xFE/0xFF: a client resynchronises by sending one of those;
* numbers, keywords and strings are tokens; a number or keyword ends only at the next byte
  that cannot continue it (so ``1`` alone waits for more input);
* tokens are grouped into one message by counting ``{}`` and ``[]``; a group is parsed as soon
  as both counts are back to zero, or either went negative (a stray closer);
* limits: 1024 levels of nesting, 2**21 tokens, 64 MiB of token text per message.

The parser reports the first problem it meets, in QEMU's words (``expecting value``,
``missing : in object pair``, ``duplicate key``, ``invalid UTF-8 sequence in string``...).
Everything that changes lexer or splitter state lives in :class:`JSONStream`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["JSONStream", "ParseError", "Message"]

PARSE_ERROR = "JSON parse error, "
MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20
MAX_NESTING = 1 << 10

_INT64_MIN = -(1 << 63)
_UINT64_LIMIT = 1 << 64

_WHITESPACE = frozenset(b" \t\n\r")
_STRUCTURAL = frozenset(b"{}[]:,")
_DIGITS = frozenset(b"0123456789")
_NONZERO = frozenset(b"123456789")
_LOWER = frozenset(range(ord("a"), ord("z") + 1))
_HEX = frozenset(b"0123456789abcdefABCDEF")
_SIMPLE_ESCAPES = {ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/", ord("b"): "\b",
                   ord("f"): "\f", ord("n"): "\n", ord("r"): "\r", ord("t"): "\t"}
_KEYWORDS: dict[str, object] = {"true": True, "false": False, "null": None}


class Tok(enum.Enum):
    LCURLY = "{"
    RCURLY = "}"
    LSQUARE = "["
    RSQUARE = "]"
    COLON = ":"
    COMMA = ","
    STRING = "string"
    INTEGER = "integer"
    FLOAT = "float"
    KEYWORD = "keyword"


_PUNCTUATION = {ord("{"): Tok.LCURLY, ord("}"): Tok.RCURLY, ord("["): Tok.LSQUARE,
                ord("]"): Tok.RSQUARE, ord(":"): Tok.COLON, ord(","): Tok.COMMA}


class _St(enum.Enum):
    START = enum.auto()
    RECOVERY = enum.auto()
    STRING = enum.auto()
    ESCAPE = enum.auto()
    NEG = enum.auto()  # after '-'
    ZERO = enum.auto()  # a leading 0: only '.' may follow
    INT = enum.auto()
    DOT = enum.auto()  # after '.', a digit must follow
    FRAC = enum.auto()
    EXP = enum.auto()  # after 'e'/'E'
    EXP_SIGN = enum.auto()
    EXP_DIGITS = enum.auto()
    KEYWORD = enum.auto()


# Number states: byte class -> next state. A byte not listed either ends the token (the
# state is terminal: ``_TERMINAL``) or is a lexical error that the stray text includes.
_NUMBER_TABLE: dict[_St, dict[str, _St]] = {
    _St.NEG: {"0": _St.ZERO, "1-9": _St.INT},
    _St.ZERO: {".": _St.DOT},
    _St.INT: {"0": _St.INT, "1-9": _St.INT, ".": _St.DOT, "e": _St.EXP},
    _St.DOT: {"0": _St.FRAC, "1-9": _St.FRAC},
    _St.FRAC: {"0": _St.FRAC, "1-9": _St.FRAC, "e": _St.EXP},
    _St.EXP: {"0": _St.EXP_DIGITS, "1-9": _St.EXP_DIGITS, "+": _St.EXP_SIGN},
    _St.EXP_SIGN: {"0": _St.EXP_DIGITS, "1-9": _St.EXP_DIGITS},
    _St.EXP_DIGITS: {"0": _St.EXP_DIGITS, "1-9": _St.EXP_DIGITS},
}
_TERMINAL: dict[_St, Tok] = {_St.ZERO: Tok.INTEGER, _St.INT: Tok.INTEGER, _St.FRAC: Tok.FLOAT,
                             _St.EXP_DIGITS: Tok.FLOAT}


def _byte_class(byte: int) -> str:
    if byte == 0x30:
        return "0"
    if byte in _NONZERO:
        return "1-9"
    if byte in (0x65, 0x45):  # e E
        return "e"
    if byte in (0x2B, 0x2D):  # + -
        return "+"
    if byte == 0x2E:
        return "."
    return ""


class ParseError(Exception):
    """One message could not be parsed; ``desc`` is QEMU's text."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


@dataclass(frozen=True)
class Token:
    kind: Tok
    raw: bytes


@dataclass(frozen=True)
class Message:
    """The outcome of one complete group of tokens: a value, or the error that replaced it."""

    value: object = None
    error: str | None = None


class JSONStream:
    """Feed bytes, iterate over complete messages (QEMU's json-lexer plus json-streamer)."""

    def __init__(self) -> None:
        self._state = _St.START
        self._token = bytearray()
        self._quote = 0
        self._tokens: list[Token] = []
        self._token_size = 0
        self._braces = 0
        self._brackets = 0
        self._out: list[Message] = []

    def feed(self, data: bytes) -> list[Message]:
        """Consume ``data``; return the messages it completed, in order."""
        for byte in data:
            self._feed_byte(byte)
        out, self._out = self._out, []
        return out

    # -- lexer --------------------------------------------------------------------------------

    def _feed_byte(self, byte: int) -> None:
        while True:
            state = self._state
            if state is _St.START:
                self._start(byte)
                return
            if state is _St.RECOVERY:
                if byte in _STRUCTURAL or (byte < 0x20 and byte != 0x09) or byte >= 0xFE:
                    self._state = _St.START
                    continue  # the byte is looked at again
                return
            if state is _St.STRING or state is _St.ESCAPE:
                self._string_byte(byte)
                return
            if state is _St.KEYWORD:
                if byte in _LOWER:
                    self._token.append(byte)
                    return
                self._emit(Tok.KEYWORD)
                continue
            nxt = _NUMBER_TABLE[state].get(_byte_class(byte))
            if nxt is not None:
                self._token.append(byte)
                self._state = nxt
                return
            kind = _TERMINAL.get(state)
            if kind is not None and not (state is _St.ZERO and byte in _DIGITS):
                self._emit(kind)
                continue
            self._token.append(byte)
            self._lex_error()
            return

    def _start(self, byte: int) -> None:
        if byte in _WHITESPACE:
            return
        punct = _PUNCTUATION.get(byte)
        if punct is not None:
            self._token = bytearray((byte,))
            self._emit(punct)
        elif byte in (0x22, 0x27):
            self._token = bytearray((byte,))
            self._quote = byte
            self._state = _St.STRING
        elif byte == 0x2D:
            self._token = bytearray((byte,))
            self._state = _St.NEG
        elif byte == 0x30:
            self._token = bytearray((byte,))
            self._state = _St.ZERO
        elif byte in _NONZERO:
            self._token = bytearray((byte,))
            self._state = _St.INT
        elif byte in _LOWER:
            self._token = bytearray((byte,))
            self._state = _St.KEYWORD
        else:
            self._token = bytearray((byte,))
            self._lex_error()

    def _string_byte(self, byte: int) -> None:
        self._token.append(byte)
        if byte < 0x20 or byte >= 0xFE:
            self._lex_error()
        elif self._state is _St.ESCAPE:
            self._state = _St.STRING
        elif byte == 0x5C:
            self._state = _St.ESCAPE
        elif byte == self._quote:
            self._emit(Tok.STRING)
        elif len(self._token) > MAX_TOKEN_SIZE:
            # QEMU would buffer without end; stop at the message limit instead.
            self._flush("JSON token size limit exceeded")
            self._state = _St.RECOVERY

    def _lex_error(self) -> None:
        text = bytes(self._token).decode("utf-8", "replace")
        self._flush(f"{PARSE_ERROR}stray '{text}'")
        self._state = _St.RECOVERY

    # -- streamer -----------------------------------------------------------------------------

    def _emit(self, kind: Tok) -> None:
        raw = bytes(self._token)
        self._token = bytearray()
        self._state = _St.START
        if kind is Tok.LCURLY:
            self._braces += 1
        elif kind is Tok.RCURLY:
            self._braces -= 1
        elif kind is Tok.LSQUARE:
            self._brackets += 1
        elif kind is Tok.RSQUARE:
            self._brackets -= 1
        if self._token_size + len(raw) + 1 > MAX_TOKEN_SIZE:
            self._flush("JSON token size limit exceeded")
            return
        if len(self._tokens) + 1 > MAX_TOKEN_COUNT:
            self._flush("JSON token count limit exceeded")
            return
        if self._braces + self._brackets > MAX_NESTING:
            self._flush("JSON nesting depth limit exceeded")
            return
        self._tokens.append(Token(kind, raw))
        self._token_size += len(raw)
        if (self._braces > 0 or self._brackets > 0) and self._braces >= 0 and self._brackets >= 0:
            return
        tokens = self._tokens
        try:
            value = parse_tokens(tokens)
        except ParseError as err:
            self._flush(err.desc)
        else:
            self._reset()
            self._out.append(Message(value=value))

    def _flush(self, error: str) -> None:
        self._reset()
        self._out.append(Message(error=error))

    def _reset(self) -> None:
        self._tokens = []
        self._token_size = 0
        self._braces = self._brackets = 0


# -- parser -------------------------------------------------------------------------------------


def _number(token: Token) -> object:
    text = token.raw.decode("ascii")
    if token.kind is Tok.FLOAT:
        return float(text)
    value = int(text)
    if _INT64_MIN <= value < _UINT64_LIMIT:
        return value
    return float(text)


def _utf8_char(body: bytes, pos: int) -> tuple[str, int]:
    """Decode one UTF-8 sequence at ``body[pos]`` (QEMU also takes C0 80 for U+0000)."""
    lead = body[pos]
    if lead < 0x80:
        return chr(lead), pos + 1
    if body[pos:pos + 2] == b"\xc0\x80":
        return "\x00", pos + 2
    if 0xC2 <= lead < 0xE0:
        length = 2
    elif 0xE0 <= lead < 0xF0:
        length = 3
    elif 0xF0 <= lead < 0xF5:
        length = 4
    else:
        raise ParseError(PARSE_ERROR + "invalid UTF-8 sequence in string")
    try:
        return body[pos:pos + length].decode("utf-8"), pos + length
    except UnicodeDecodeError:
        raise ParseError(PARSE_ERROR + "invalid UTF-8 sequence in string") from None


def _hex4(body: bytes, pos: int) -> int | None:
    digits = body[pos + 2:pos + 6]
    if len(digits) == 4 and all(d in _HEX for d in digits):
        return int(digits, 16)
    return None


def _bad_unicode(raw: bytes, pos: int) -> ParseError:
    # QEMU shows up to four bytes after "\u" of the raw token, closing quote included.
    shown = raw[1 + pos + 2:1 + pos + 6].decode("utf-8", "replace")
    return ParseError(f"{PARSE_ERROR}\\u{shown} is not a valid Unicode character")


def _string(token: Token) -> str:
    raw = token.raw
    body = raw[1:-1]
    out: list[str] = []
    pos = 0
    while pos < len(body):
        byte = body[pos]
        if byte != 0x5C:
            char, pos = _utf8_char(body, pos)
            out.append(char)
            continue
        escape = body[pos + 1]
        simple = _SIMPLE_ESCAPES.get(escape)
        if simple is not None:
            out.append(simple)
            pos += 2
            continue
        if escape != 0x75:  # u
            raise ParseError(PARSE_ERROR + "invalid escape sequence in string")
        code = _hex4(body, pos)
        if code is None:
            raise _bad_unicode(raw, pos)
        start = pos
        pos += 6
        if 0xD800 <= code < 0xDC00:
            low = _hex4(body, pos) if body[pos:pos + 2] == b"\\u" else None
            if low is None or not 0xDC00 <= low < 0xE000:
                raise _bad_unicode(raw, start)
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
            pos += 6
        elif 0xDC00 <= code < 0xE000:
            raise _bad_unicode(raw, start)
        out.append(chr(code))
    return "".join(out)


class _Frame:
    """One open container while parsing (an explicit stack: nesting goes to 1024)."""

    __slots__ = ("container", "key", "expect")

    def __init__(self, container: dict[str, object] | list[object]) -> None:
        self.container = container
        self.key: str | None = None
        # dict: "key-or-end", "key", "colon", "value", "sep"; list: "value-or-end", "value", "sep"
        self.expect = "key-or-end" if isinstance(container, dict) else "value-or-end"


def parse_tokens(tokens: list[Token]) -> object:
    """Parse one value from a complete group of tokens.

    :raise ParseError: QEMU's message for the first problem met.
    """
    it: Iterator[Token] = iter(tokens)
    stack: list[_Frame] = []

    def take() -> Token:
        token = next(it, None)
        if token is None:
            raise ParseError(PARSE_ERROR + "premature EOI")
        return token

    while True:
        frame = stack[-1] if stack else None
        if frame is not None and frame.expect in ("sep", "colon", "key-or-end", "key",
                                                  "value-or-end"):
            token = take()
            container = frame.container
            if frame.expect == "sep":
                closer = Tok.RCURLY if isinstance(container, dict) else Tok.RSQUARE
                if token.kind is closer:
                    value: object = container
                    stack.pop()
                    if not stack:
                        return value
                    _store(stack[-1], value)
                    continue
                if token.kind is not Tok.COMMA:
                    kind = "dict" if isinstance(container, dict) else "list"
                    raise ParseError(f"{PARSE_ERROR}expected separator in {kind}")
                frame.expect = "key" if isinstance(container, dict) else "value"
                continue
            if frame.expect == "colon":
                if token.kind is not Tok.COLON:
                    raise ParseError(PARSE_ERROR + "missing : in object pair")
                frame.expect = "value"
                continue
            if frame.expect == "value-or-end" and token.kind is Tok.RSQUARE:
                stack.pop()
                if not stack:
                    return container
                _store(stack[-1], container)
                continue
            if frame.expect == "key-or-end" and token.kind is Tok.RCURLY:
                stack.pop()
                if not stack:
                    return container
                _store(stack[-1], container)
                continue
            if frame.expect in ("key-or-end", "key"):
                if token.kind is Tok.STRING:
                    frame.key = _string(token)
                    frame.expect = "colon"
                    continue
                # QEMU parses the key as a value first: that error, if any, comes first.
                _scalar_or_open(token)
                raise ParseError(PARSE_ERROR + "key is not a string in object")
            # "value-or-end" with a value token: fall through to parse it
            frame.expect = "value"
            scalar = _scalar_or_open(token)
        else:
            scalar = _scalar_or_open(take())
        if isinstance(scalar, _Open):
            stack.append(_Frame({} if scalar.kind is Tok.LCURLY else []))
            if len(stack) > MAX_NESTING + 1:  # the streamer's limit makes this unreachable
                raise ParseError("JSON nesting depth limit exceeded")
            continue
        if not stack:
            return scalar
        _store(stack[-1], scalar)


@dataclass(frozen=True)
class _Open:
    kind: Tok


def _scalar_or_open(token: Token) -> object:
    kind = token.kind
    if kind is Tok.LCURLY or kind is Tok.LSQUARE:
        return _Open(kind)
    if kind is Tok.STRING:
        return _string(token)
    if kind is Tok.INTEGER or kind is Tok.FLOAT:
        return _number(token)
    if kind is Tok.KEYWORD:
        text = token.raw.decode("ascii")
        if text not in _KEYWORDS:
            raise ParseError(f"{PARSE_ERROR}invalid keyword '{text}'")
        return _KEYWORDS[text]
    raise ParseError(PARSE_ERROR + "expecting value")


def _store(frame: _Frame, value: object) -> None:
    container = frame.container
    if isinstance(container, dict):
        assert frame.key is not None
        if frame.key in container:
            raise ParseError(PARSE_ERROR + "duplicate key")
        container[frame.key] = value
    else:
        container.append(value)
    frame.expect = "sep"
