"""QMP output as QEMU writes it: compact JSON with ``", "`` and ``": "``, ASCII only, members
in the order QEMU's QDict iterates them.

QEMU keeps an object's members in a 512-bucket hash table and writes them bucket by bucket,
the newest member first within a bucket. The hash is the classic TDB string hash. Producing
the same order lets a byte-for-byte comparison with QEMU's replies work; clients must not rely
on it (``qmp-spec``), but diff-based tests do. Build dictionaries in QAPI schema order: that is
QEMU's insertion order, which decides between members that share a bucket.

Strings: ``"``, ``\\``, ``\\b \\f \\n \\r \\t`` as short escapes; other controls, DEL and
everything above ASCII as ``\\uXXXX`` (upper-case hex; UTF-16 surrogate pairs above U+FFFF).
Floats as C's ``%.17g`` (so ``inf`` can appear, as in QEMU).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache

__all__ = ["encode", "qdict_order"]

_BUCKETS = 512
_MASK = 0xFFFFFFFF
_SHORT = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
          "\t": "\\t"}


@lru_cache(maxsize=4096)
def _bucket(key: str) -> int:
    data = key.encode("utf-8", "surrogatepass")
    value = (0x238F13AF * len(data)) & _MASK
    for index, byte in enumerate(data):
        value = (value + (byte << (index * 5 % 24))) & _MASK
    return ((1103515243 * value + 12345) & _MASK) % _BUCKETS


def qdict_order(keys: Iterable[str]) -> list[str]:
    """``keys`` (in insertion order) in the order QEMU's QDict would write them."""
    indexed = [(_bucket(key), -index, key) for index, key in enumerate(keys)]
    indexed.sort()
    return [key for _, _, key in indexed]


def _string(text: str) -> str:
    out = ['"']
    for char in text:
        code = ord(char)
        if 0x20 <= code < 0x7F:
            out.append(_SHORT.get(char, char))
        elif char in _SHORT:
            out.append(_SHORT[char])
        elif code > 0xFFFF:
            code -= 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04X}\\u{0xDC00 + (code & 0x3FF):04X}")
        else:
            out.append(f"\\u{code:04X}")
    out.append('"')
    return "".join(out)


def _scalar(value: object) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.17g}"
    if isinstance(value, str):
        return _string(value)
    raise TypeError(f"cannot encode {type(value).__name__} for QMP")


def encode(value: object, *, pretty: bool = False) -> str:
    """Serialise ``value`` (dicts, lists, str, int, float, bool, None) as QEMU does.

    With ``pretty`` (a monitor's ``pretty=on``) every member and element goes on a line of
    its own, indented by four spaces per level, and an empty container still spans two lines
    (``{`` then ``}`` at its own level), as QEMU's pretty printer writes them; lines end in
    ``\n`` (the server sends them as CR LF).

    Iterative, so that a 1024-deep ``id`` echoed back does not exhaust Python's stack.
    """
    out: list[str] = []
    # Work items: (is a literal, a value to write or a literal string, nesting level).
    stack: list[tuple[bool, object, int]] = [(False, value, 0)]
    while stack:
        literal, item, level = stack.pop()
        if literal:
            out.append(str(item))
            continue
        if isinstance(item, Mapping | list | tuple):
            is_map = isinstance(item, Mapping)
            opening, closing = ("{", "}") if is_map else ("[", "]")
            if not item:
                out.append(f"{opening}\n{'    ' * level}{closing}" if pretty
                           else opening + closing)
                continue
            if pretty:
                separator, first, end = ",\n" + "    " * (level + 1), "\n" + "    " * (level + 1), (
                    "\n" + "    " * level)
            else:
                separator, first, end = ", ", "", ""
            pending: list[tuple[bool, object, int]] = [(True, opening + first, level)]
            if isinstance(item, Mapping):
                for index, key in enumerate(qdict_order(item.keys())):
                    prefix = separator if index else ""
                    pending.append((True, f"{prefix}{_string(key)}: ", level))
                    pending.append((False, item[key], level + 1))
            else:
                for index, element in enumerate(item):
                    if index:
                        pending.append((True, separator, level))
                    pending.append((False, element, level + 1))
            pending.append((True, end + closing, level))
            stack.extend(reversed(pending))
        else:
            out.append(_scalar(item))
    return "".join(out)
