"""null-co / null-aio: a protocol driver with nothing behind it.

Writes vanish. Reads fill the buffer with zeroes only with ``read-zeroes=on``; QEMU 7.2's
default is off, and then a read leaves the caller's buffer exactly as it was (``qemu-io read -P
0xab`` passes, because qemu-io pre-fills its buffers with 0xab). That is deterministic for a
given buffer, which is what tests need.

The two drivers differ only in how QEMU completes requests (coroutine vs. AIO callback); here
both are coroutines.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, ClassVar

from blockgraph.drivers.base import (
    BlockDriver,
    BlockStatus,
    BlockStatusFlags,
    OpenContext,
    RequestFlags,
)
from blockgraph.errors import BlockError, OptionError
from blockgraph.options.schema import OptionSpec, OptType, opt

DEFAULT_SIZE = 1 << 30
_INT64_MAX = (1 << 63) - 1


class NullCoDriver(BlockDriver):
    """``null-co``: every read and write succeeds at once (after ``latency-ns``)."""

    format_name: ClassVar[str] = "null-co"
    is_format: ClassVar[bool] = False
    protocol_prefixes: ClassVar[tuple[str, ...]] = ("null-co",)
    runtime_options: ClassVar[Mapping[str, OptionSpec]] = {
        "size": opt(OptType.SIZE, DEFAULT_SIZE),
        "latency-ns": opt(OptType.NUMBER, 0),
        "read-zeroes": opt(OptType.BOOL, False),
    }
    supported_write_flags: ClassVar[RequestFlags] = (
        RequestFlags.FUA | RequestFlags.MAY_UNMAP | RequestFlags.NO_FALLBACK
    )

    def __init__(self) -> None:
        self.size = DEFAULT_SIZE
        self.latency_ns = 0
        self.read_zeroes = False
        # ``size``/``read-zeroes`` given by the user turn the node's name into json:{...};
        # ``latency-ns`` does not (observed in ``info block``).
        self._plain_name = True

    @classmethod
    def parse_filename(cls, filename: str, options: dict[str, Any]) -> None:
        """Only ``null-co://`` itself is a valid filename; it adds no options."""
        if filename != f"{cls.format_name}://":
            raise OptionError(
                f"The only allowed filename for this driver is '{cls.format_name}://'"
            )

    async def open(self, ctx: OpenContext, options: dict[str, Any]) -> None:
        size = options.get("size")
        latency = options.get("latency-ns")
        read_zeroes = options.get("read-zeroes")
        self._plain_name = size is None and read_zeroes is None
        self.size = DEFAULT_SIZE if size is None else int(size)
        self.latency_ns = 0 if latency is None else int(latency)
        # The number arrives as an unsigned 64-bit value; QEMU refuses what doesn't fit int64
        # (so "-1", which wraps, is refused too).
        if self.latency_ns < 0 or self.latency_ns > _INT64_MAX:
            raise BlockError("latency-ns is invalid")
        self.read_zeroes = bool(read_zeroes)

    def getlength(self) -> int:
        return self.size

    async def _delay(self) -> None:
        if self.latency_ns:
            await asyncio.sleep(self.latency_ns / 1e9)

    async def preadv(self, offset: int, buf: memoryview, flags: RequestFlags) -> None:
        await self._delay()
        if self.read_zeroes:
            buf[:] = bytes(len(buf))

    async def pwritev(self, offset: int, buf: memoryview, flags: RequestFlags) -> None:
        await self._delay()

    async def pwrite_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        await self._delay()

    async def flush_to_disk(self) -> None:
        await self._delay()

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        # The node maps onto itself (file=None: this node); only read-zeroes promises zeroes,
        # and without it QEMU reports the range as unallocated.
        flags = BlockStatusFlags.OFFSET_VALID
        if self.read_zeroes:
            flags |= BlockStatusFlags.ZERO
        return BlockStatus(flags, length, offset=offset)

    def filename(self) -> str | None:
        return f"{self.format_name}://" if self._plain_name else None


class NullAioDriver(NullCoDriver):
    """``null-aio``: the same as ``null-co`` to a caller."""

    format_name: ClassVar[str] = "null-aio"
    protocol_prefixes: ClassVar[tuple[str, ...]] = ("null-aio",)
