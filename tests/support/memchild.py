"""An in-memory :class:`~blockgraph.drivers.base.ChildAccess` and a fake OpenContext.

``MemChild`` stands for a child node's request layer over a ``bytearray``: it does the bounds
checks the real request layer does and records every call, so driver tests can see what a
driver asked of its child. ``DriverChild`` wraps a driver instance as a child (so raw can sit on
blkdebug in a test) and forwards ``debug_event`` the way the graph's child view is expected to.
``FakeOpenContext`` hands out prepared children by name.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any

from blockgraph.drivers.base import (
    BlockDriver,
    BlockStatus,
    BlockStatusFlags,
    ChildAccess,
    ChildRole,
    NodeFlags,
    PreallocMode,
    RequestFlags,
)
from blockgraph.errors import BlockError, IOFailure
from blockgraph.objects import ObjectRegistry


class MemChild:
    """A child whose node is ``data``; ``calls`` logs ``(method, offset, length, flags)``."""

    def __init__(
        self,
        data: bytes | bytearray | int = 0,
        *,
        name: str = "file",
        role: ChildRole = ChildRole.FILTERED_PRIMARY,
        node_name: str = "mem0",
        filename: str = "/tmp/mem.raw",
        driver_name: str = "file",
    ) -> None:
        self.data = bytearray(data)  # an int: that many zero bytes
        self._name = name
        self._role = role
        self._node_name = node_name
        self._filename = filename
        self._driver_name = driver_name
        self.calls: list[tuple[str, int, int, RequestFlags]] = []
        self.events: list[str] = []  # debug events fired at this child, if any
        self.flushes = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def role(self) -> ChildRole:
        return self._role

    @property
    def node_name(self) -> str:
        return self._node_name

    @property
    def filename(self) -> str:
        return self._filename

    @property
    def driver_name(self) -> str:
        return self._driver_name

    def getlength(self) -> int:
        return len(self.data)

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > len(self.data):
            raise IOFailure(errno.EIO)

    async def preadv(
        self, offset: int, buf: memoryview, flags: RequestFlags = RequestFlags.NONE
    ) -> None:
        self._check(offset, len(buf))
        self.calls.append(("preadv", offset, len(buf), flags))
        buf[:] = self.data[offset : offset + len(buf)]

    async def pwritev(
        self, offset: int, buf: memoryview, flags: RequestFlags = RequestFlags.NONE
    ) -> None:
        self._check(offset, len(buf))
        self.calls.append(("pwritev", offset, len(buf), flags))
        self.data[offset : offset + len(buf)] = buf

    async def pwrite_zeroes(
        self, offset: int, length: int, flags: RequestFlags = RequestFlags.NONE
    ) -> None:
        self._check(offset, length)
        self.calls.append(("pwrite_zeroes", offset, length, flags))
        self.data[offset : offset + length] = bytes(length)

    async def pdiscard(self, offset: int, length: int) -> None:
        self._check(offset, length)
        self.calls.append(("pdiscard", offset, length, RequestFlags.NONE))

    async def flush(self) -> None:
        self.calls.append(("flush", 0, 0, RequestFlags.NONE))
        self.flushes += 1

    async def truncate(self, length: int, prealloc: PreallocMode = "off") -> None:
        self.calls.append(("truncate", length, 0, RequestFlags.NONE))
        if length < len(self.data):
            del self.data[length:]
        else:
            self.data.extend(bytes(length - len(self.data)))

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        self._check(offset, length)
        self.calls.append(("block_status", offset, length, RequestFlags.NONE))
        # Like a file: data everywhere, mapped 1:1 onto itself (file=None: "this node").
        return BlockStatus(
            BlockStatusFlags.DATA | BlockStatusFlags.OFFSET_VALID | BlockStatusFlags.ALLOCATED,
            length,
            offset=offset,
        )

    async def debug_event(self, event: str) -> None:
        self.events.append(event)


class DriverChild:
    """An opened driver seen as a child: no request layer, just the driver's methods."""

    def __init__(
        self, driver: BlockDriver, *, name: str = "file", node_name: str = "drv0"
    ) -> None:
        self.driver = driver
        self._name = name
        self._node_name = node_name
        self.flushes = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def role(self) -> ChildRole:
        return ChildRole.FILTERED_PRIMARY

    @property
    def node_name(self) -> str:
        return self._node_name

    @property
    def filename(self) -> str:
        return self.driver.filename() or "json:{}"

    @property
    def driver_name(self) -> str:
        return self.driver.format_name

    def getlength(self) -> int:
        return self.driver.getlength()

    async def preadv(
        self, offset: int, buf: memoryview, flags: RequestFlags = RequestFlags.NONE
    ) -> None:
        await self.driver.preadv(offset, buf, flags)

    async def pwritev(
        self, offset: int, buf: memoryview, flags: RequestFlags = RequestFlags.NONE
    ) -> None:
        await self.driver.pwritev(offset, buf, flags)

    async def pwrite_zeroes(
        self, offset: int, length: int, flags: RequestFlags = RequestFlags.NONE
    ) -> None:
        await self.driver.pwrite_zeroes(offset, length, flags)

    async def pdiscard(self, offset: int, length: int) -> None:
        await self.driver.pdiscard(offset, length)

    async def flush(self) -> None:
        self.flushes += 1
        await self.driver.flush_to_os()
        await self.driver.flush_to_disk()

    async def truncate(self, length: int, prealloc: PreallocMode = "off") -> None:
        await self.driver.truncate(length, prealloc)

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        return await self.driver.block_status(offset, length)

    async def debug_event(self, event: str) -> None:
        handler = getattr(self.driver, "debug_event", None)
        if handler is not None:
            await handler(event)


@dataclass
class FakeOpenContext:
    """Opens children from ``children`` by name; records what was asked for."""

    children: dict[str, ChildAccess] = field(default_factory=dict)
    node_name: str = "node0"
    flags: NodeFlags = field(default_factory=NodeFlags)
    child_options: set[str] = field(default_factory=set)
    requests: list[dict[str, Any]] = field(default_factory=list)
    objects: ObjectRegistry = field(default_factory=ObjectRegistry)

    async def open_child(
        self,
        name: str,
        role: ChildRole,
        *,
        filename: str | None = None,
        driver: str | None = None,
        allow_none: bool = False,
        read_only: bool | None = None,
    ) -> ChildAccess | None:
        self.requests.append(
            {"name": name, "role": role, "filename": filename, "driver": driver,
             "allow_none": allow_none, "read_only": read_only}
        )
        child = self.children.get(name)
        if child is None and not allow_none:
            raise BlockError(f'A block device must be specified for "{name}"')
        return child

    def has_child_options(self, name: str) -> bool:
        return name in self.child_options
