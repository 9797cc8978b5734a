"""Per-driver option schemas and QEMU's texts for options of the wrong type.

Options arrive either as strings (``-drive``, ``-blockdev`` keyval, ``reopen -o``) or already
typed (``json:`` filenames, QMP). :func:`convert_option` turns both into Python values and
raises :class:`~blockgraph.errors.OptionError` with QEMU's message when it cannot.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

from blockgraph.errors import OptionError


class OptType(enum.Enum):
    STRING = "string"
    BOOL = "boolean"
    NUMBER = "number"
    SIZE = "size"


@dataclass(frozen=True)
class OptionSpec:
    """One option a driver (or the generic block layer) consumes."""

    type: OptType
    default: Any = None
    choices: tuple[str, ...] | None = None  # a QAPI enum: the accepted strings


def opt(type_: OptType, default: Any = None, choices: tuple[str, ...] | None = None) -> OptionSpec:
    return OptionSpec(type_, default, choices)


_SIZE_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
                  "p": 1 << 50, "e": 1 << 60}

# QEMU's boolean words (case-sensitive); the message only names on/off.
_TRUE_WORDS = ("on", "yes", "true", "y")
_FALSE_WORDS = ("off", "no", "false", "n")

# Decimal (optionally with a fraction, which needs a suffix) or hex, then an optional suffix.
# Leading blanks are skipped like strtoull does; trailing ones are an error.
_SIZE_RE = re.compile(r"\s*\+?(?:(?P<hex>0[xX][0-9a-fA-F]+)|(?P<dec>[0-9]+(?:\.[0-9]+)?))"
                      r"(?P<suffix>[bBkKmMgGtTpPeE]?)\Z")
_NUMBER_RE = re.compile(r"\s*[+-]?(?:0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z")


def parse_bool(key: str, value: str) -> bool:
    """QemuOpts / keyval boolean: on, yes, true, y or off, no, false, n.

    :raise OptionError: ``Parameter 'KEY' expects 'on' or 'off'``.
    """
    if value in _TRUE_WORDS:
        return True
    if value in _FALSE_WORDS:
        return False
    raise OptionError(f"Parameter '{key}' expects 'on' or 'off'")


def parse_size(key: str, value: str) -> int:
    """QemuOpts size syntax: a number with an optional b/k/M/G/T/P/E suffix (binary units).

    Decimal or ``0x`` hex; a fraction (``1.5k``) only with a suffix, as in QEMU.

    :raise OptionError: QEMU's three-line message for malformed sizes, or
        ``Value 'VALUE' is out of range for parameter 'KEY'`` for 2^64 and above.
    """
    match = _SIZE_RE.match(value)
    malformed = OptionError(
        f"Parameter '{key}' expects a non-negative number below 2^64\n"
        "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
        "and exabytes, respectively."
    )
    if match is None:
        raise malformed
    multiplier = _SIZE_SUFFIXES[match["suffix"].lower()]
    if match["hex"] is not None:
        size = int(match["hex"], 16) * multiplier
    else:
        number = match["dec"]
        if "." in number and not match["suffix"]:
            raise malformed
        whole, _, fraction = number.partition(".")
        size = int(whole) * multiplier
        if fraction:
            size += int(int(fraction) * multiplier // 10 ** len(fraction))
    if size >= 1 << 64:
        raise OptionError(f"Value '{value}' is out of range for parameter '{key}'")
    return size


def parse_number(key: str, value: str) -> int:
    """QemuOpts number syntax: strtoull with base 0 (decimal, ``0x`` hex, ``0`` octal).

    :raise OptionError: ``Parameter 'KEY' expects a number``.
    """
    if _NUMBER_RE.match(value) is None:
        raise OptionError(f"Parameter '{key}' expects a number")
    return _c_integer(value)


def parse_int(key: str, value: str) -> int:
    """A keyval integer (QEMU's ``qemu_strtoi64`` with base 0): decimal, ``0x`` hex or ``0``
    octal, signed, within 64 bits.

    :raise OptionError: ``Parameter 'KEY' expects integer``.
    """
    if _NUMBER_RE.match(value) is None:
        raise OptionError(f"Parameter '{key}' expects integer")
    number = _c_integer(value)
    if not -(1 << 63) <= number < 1 << 63:
        raise OptionError(f"Parameter '{key}' expects integer")
    return number


def _c_integer(value: str) -> int:
    # What strtoll/strtoull with base 0 make of text _NUMBER_RE accepted.
    text = value.strip()
    negative = text.startswith("-")
    digits = text.lstrip("+-")
    if digits.lower().startswith("0x"):
        number = int(digits, 16)
    elif digits.startswith("0") and len(digits) > 1:
        number = int(digits, 8)
    else:
        number = int(digits)
    return -number if negative else number


def convert_option(key: str, spec: OptionSpec, value: object) -> Any:
    """Convert ``value`` (a string from a command line, or a JSON value) to ``spec.type``.

    :raise OptionError: with QEMU's text for the mismatch.
    """
    if spec.type is OptType.BOOL:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return parse_bool(key, value)
        raise OptionError(f"Invalid parameter type for '{key}', expected: boolean")
    if spec.type in (OptType.NUMBER, OptType.SIZE):
        if isinstance(value, bool):
            raise OptionError(f"Invalid parameter type for '{key}', expected: integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            if spec.type is OptType.SIZE:
                return parse_size(key, value)
            return parse_number(key, value)
        raise OptionError(f"Invalid parameter type for '{key}', expected: integer")
    # STRING (and enums)
    if isinstance(value, bool | int) and not isinstance(value, str):
        value = ("on" if value else "off") if isinstance(value, bool) else str(value)
    if not isinstance(value, str):
        raise OptionError(f"Invalid parameter type for '{key}', expected: string")
    if spec.choices is not None and value not in spec.choices:
        raise OptionError(f"Parameter '{key}' does not accept value '{value}'")
    return value
