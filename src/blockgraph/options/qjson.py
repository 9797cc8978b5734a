"""QEMU's dialect of JSON, as accepted by ``json:`` filenames and ``-blockdev '{...}'``.

It differs from RFC 8259 (and from :mod:`json`) in ways users rely on, so the standard module
cannot be used:

* strings may be single-quoted (``{'driver': 'qcow2'}``), and ``\\'`` is an escape in both kinds;
* a duplicate key in an object is an error, not "last one wins";
* integers that fit neither int64 nor uint64 become floats, as QEMU's QNum does;
* every malformed input gets one of QEMU's messages, which the tools print verbatim.

How errors are chosen, as observed on QEMU 7.2: the lexer runs first and a lexical error
(``stray '...'``) is reported as soon as it is met, even inside an object that would also have
a syntax error earlier on. Tokens are grouped into top-level values by counting brackets, and a
group is parsed once it is complete, or at the end of the input; a parser that runs out of
tokens reports ``premature EOI``. The first problem wins; anything after a complete first value is
``Expecting at most one JSON value``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from blockgraph.errors import OptionError

__all__ = ["parse_json"]

_PARSE_ERROR = "JSON parse error, "
_WHITESPACE = " \t\n\r"
_KEYWORDS: dict[str, object] = {"true": True, "false": False, "null": None}
_SIMPLE_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "/": "/", "b": "\b", "f": "\f",
                   "n": "\n", "r": "\r", "t": "\t"}
_INT64_MIN = -(1 << 63)
_UINT64_LIMIT = 1 << 64


class _Tok(enum.Enum):
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


@dataclass(frozen=True)
class _Token:
    kind: _Tok
    text: str


class _LexError(Exception):
    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


_PUNCTUATION = {"{": _Tok.LCURLY, "}": _Tok.RCURLY, "[": _Tok.LSQUARE, "]": _Tok.RSQUARE,
                ":": _Tok.COLON, ",": _Tok.COMMA}


def _lex_string(text: str, start: int) -> tuple[_Token, int]:
    # Escapes are only delimited here; whether they are valid is the parser's business
    # (QEMU reports a bad escape as "invalid escape sequence", not as a stray token).
    quote = text[start]
    pos = start + 1
    while pos < len(text):
        char = text[pos]
        if char == quote:
            return _Token(_Tok.STRING, text[start:pos + 1]), pos + 1
        if ord(char) < 0x20:
            raise _LexError(text[start:pos + 1])
        if char == "\\":
            pos += 1
            if pos < len(text) and ord(text[pos]) < 0x20:
                raise _LexError(text[start:pos + 1])
        pos += 1
    raise _LexError(text[start:])


def _lex_number(text: str, start: int) -> tuple[_Token, int]:
    # The offending character is part of the stray text ("stray '1.}'"), except at the end of
    # the input, where the partial token is reported alone.
    pos = start
    end = len(text)

    def digits(at: int) -> int:
        while at < end and text[at].isdigit() and text[at].isascii():
            at += 1
        return at

    def fail(at: int) -> _LexError:
        return _LexError(text[start:at + 1])

    if text[pos] == "-":
        pos += 1
    if pos >= end or not (text[pos].isascii() and text[pos].isdigit()):
        raise fail(pos)
    if text[pos] == "0":
        pos += 1
        if pos < end and text[pos].isascii() and text[pos].isdigit():
            raise fail(pos)
    else:
        pos = digits(pos)
    kind = _Tok.INTEGER
    if pos < end and text[pos] == ".":
        kind = _Tok.FLOAT
        after = digits(pos + 1)
        if after == pos + 1:
            raise fail(pos + 1)
        pos = after
    if pos < end and text[pos] in "eE":
        kind = _Tok.FLOAT
        pos += 1
        if pos < end and text[pos] in "+-":
            pos += 1
        after = digits(pos)
        if after == pos:
            raise fail(pos)
        pos = after
    return _Token(kind, text[start:pos]), pos


def _tokens(text: str) -> list[_Token | _LexError]:
    """Split ``text`` into tokens; a lexical error ends the list (nothing after it matters)."""
    out: list[_Token | _LexError] = []
    pos = 0
    while pos < len(text):
        char = text[pos]
        try:
            if char in _WHITESPACE:
                pos += 1
                continue
            if char in _PUNCTUATION:
                out.append(_Token(_PUNCTUATION[char], char))
                pos += 1
            elif char in "\"'":
                token, pos = _lex_string(text, pos)
                out.append(token)
            elif char == "-" or (char.isascii() and char.isdigit()):
                token, pos = _lex_number(text, pos)
                out.append(token)
            elif "a" <= char <= "z":
                end = pos
                while end < len(text) and "a" <= text[end] <= "z":
                    end += 1
                out.append(_Token(_Tok.KEYWORD, text[pos:end]))
                pos = end
            else:
                raise _LexError(char)
        except _LexError as err:
            out.append(err)
            break
    return out


def _number_value(token: _Token) -> object:
    if token.kind is _Tok.FLOAT:
        return float(token.text)
    value = int(token.text)
    if _INT64_MIN <= value < _UINT64_LIMIT:
        return value
    return float(token.text)


def _decode_string(token: _Token) -> str:
    body = token.text[1:-1]
    out: list[str] = []
    pos = 0
    while pos < len(body):
        char = body[pos]
        if char != "\\":
            out.append(char)
            pos += 1
            continue
        escape = body[pos + 1]
        if escape in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[escape])
            pos += 2
            continue
        if escape != "u":
            raise OptionError(_PARSE_ERROR + "invalid escape sequence in string")
        code, pos = _unicode_escape(token, body, pos)
        if 0xD800 <= code < 0xDC00:
            # A high surrogate counts only when a low one follows; the error names the high.
            low = _unicode_escape(token, body, pos) if body.startswith("\\u", pos) else None
            if low is None or not 0xDC00 <= low[0] < 0xE000:
                raise OptionError(f"{_PARSE_ERROR}\\u{body[pos - 4:pos]} is not a valid "
                                  "Unicode character")
            code = 0x10000 + ((code - 0xD800) << 10) + (low[0] - 0xDC00)
            pos = low[1]
        elif 0xDC00 <= code < 0xE000:
            raise OptionError(f"{_PARSE_ERROR}\\u{body[pos - 4:pos]} is not a valid "
                              "Unicode character")
        out.append(chr(code))
    return "".join(out)


def _unicode_escape(token: _Token, body: str, pos: int) -> tuple[int, int]:
    """Decode ``\\uXXXX`` at ``body[pos]``; return the code point and the position after it."""
    hex_digits = body[pos + 2:pos + 6]
    if len(hex_digits) == 4 and all(c in "0123456789abcdefABCDEF" for c in hex_digits):
        return int(hex_digits, 16), pos + 6
    # QEMU shows up to four characters of the raw token, closing quote included.
    raw_start = 1 + pos + 2
    shown = token.text[raw_start:raw_start + 4]
    raise OptionError(f"{_PARSE_ERROR}\\u{shown} is not a valid Unicode character")


class _Parser:
    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.pos = 0

    def _next(self) -> _Token:
        if self.pos >= len(self.tokens):
            # Only a group cut short by the end of the input can run dry.
            raise OptionError(_PARSE_ERROR + "premature EOI")
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def value(self) -> object:
        token = self._next()
        if token.kind is _Tok.LCURLY:
            return self._object()
        if token.kind is _Tok.LSQUARE:
            return self._array()
        if token.kind is _Tok.STRING:
            return _decode_string(token)
        if token.kind in (_Tok.INTEGER, _Tok.FLOAT):
            return _number_value(token)
        if token.kind is _Tok.KEYWORD:
            if token.text not in _KEYWORDS:
                raise OptionError(f"{_PARSE_ERROR}invalid keyword '{token.text}'")
            return _KEYWORDS[token.text]
        raise OptionError(_PARSE_ERROR + "expecting value")

    def _object(self) -> dict[str, object]:
        result: dict[str, object] = {}
        if self.pos < len(self.tokens) and self.tokens[self.pos].kind is _Tok.RCURLY:
            self.pos += 1
            return result
        while True:
            key_pos = self.pos
            key = self.value()
            if not isinstance(key, str) or self.tokens[key_pos].kind is not _Tok.STRING:
                raise OptionError(_PARSE_ERROR + "key is not a string in object")
            colon = self._next()
            if colon.kind is not _Tok.COLON:
                raise OptionError(_PARSE_ERROR + "missing : in object pair")
            member = self.value()
            if key in result:
                raise OptionError(_PARSE_ERROR + "duplicate key")
            result[key] = member
            separator = self._next()
            if separator.kind is _Tok.RCURLY:
                return result
            if separator.kind is not _Tok.COMMA:
                raise OptionError(_PARSE_ERROR + "expected separator in dict")

    def _array(self) -> list[object]:
        result: list[object] = []
        if self.pos < len(self.tokens) and self.tokens[self.pos].kind is _Tok.RSQUARE:
            self.pos += 1
            return result
        while True:
            result.append(self.value())
            separator = self._next()
            if separator.kind is _Tok.RSQUARE:
                return result
            if separator.kind is not _Tok.COMMA:
                raise OptionError(_PARSE_ERROR + "expected separator in list")


def parse_json(text: str) -> object:
    """Parse exactly one JSON value in QEMU's dialect.

    :param text: the JSON text (without any ``json:`` prefix).
    :raise OptionError: with QEMU's message, e.g. ``JSON parse error, premature EOI``,
        ``Expecting at most one JSON value`` or ``Expecting a JSON value``.
    """
    have_value = False
    result: object = None
    group: list[_Token] = []
    braces = brackets = 0
    for item in _tokens(text):
        if have_value:
            raise OptionError("Expecting at most one JSON value")
        if isinstance(item, _LexError):
            raise OptionError(f"{_PARSE_ERROR}stray '{item.text}'")
        group.append(item)
        if item.kind is _Tok.LCURLY:
            braces += 1
        elif item.kind is _Tok.RCURLY:
            braces -= 1
        elif item.kind is _Tok.LSQUARE:
            brackets += 1
        elif item.kind is _Tok.RSQUARE:
            brackets -= 1
        # A group is handed to the parser once its brackets balance, or as soon as they
        # cannot balance any more (a stray closer).
        if (braces <= 0 and brackets <= 0) or braces < 0 or brackets < 0:
            parser = _Parser(group)
            result = parser.value()
            if parser.pos < len(group):
                raise OptionError("Expecting at most one JSON value")
            have_value = True
            group = []
            braces = brackets = 0
    if group:
        # QEMU parses what it has; a syntax error inside still beats "premature EOI".
        _Parser(group).value()
        raise OptionError(_PARSE_ERROR + "premature EOI")
    if not have_value:
        raise OptionError("Expecting a JSON value")
    return result
