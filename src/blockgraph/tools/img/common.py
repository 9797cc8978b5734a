"""What every ``img`` subcommand shares: the failure type and qemu-img's size syntax."""

from __future__ import annotations

from blockgraph.errors import OptionError
from blockgraph.options.schema import parse_size


class Fail(Exception):
    """qemu-img's error line(s), already formatted (without the program name); exit 1."""


def size_arg(text: str) -> int:
    """A size argument as qemu-img parses it (k/M/G/T/P/E suffixes)."""
    try:
        return parse_size("size", text)
    except OptionError:
        raise Fail("Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
                   "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.") from None
