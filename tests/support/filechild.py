"""A test-only :class:`ChildAccess` over a real file and an :class:`OpenContext` around it.

They let a format driver run without the graph: the ``file`` child is the image file, and a
``backing`` child is opened recursively (qcow2 or raw over a file, probed like QEMU does).
"""

from __future__ import annotations

import os
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
from blockgraph.errors import BlockError


class FileChild:
    """``ChildAccess`` over a file with os.pread/os.pwrite; short reads are zero-filled."""

    def __init__(self, path: str, *, name: str = "file", role: ChildRole = ChildRole.IMAGE,
                 read_only: bool = False) -> None:
        self.path = path
        self._name = name
        self._role = role
        self.read_only = read_only
        self.fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        self.flushes = 0
        self.writes: list[tuple[int, int]] = []

    @property
    def name(self) -> str:
        return self._name

    @property
    def role(self) -> ChildRole:
        return self._role

    @property
    def node_name(self) -> str:
        return f"#file-{os.path.basename(self.path)}"

    @property
    def filename(self) -> str:
        return self.path

    @property
    def driver_name(self) -> str:
        return "file"

    def getlength(self) -> int:
        return os.fstat(self.fd).st_size

    async def preadv(self, offset: int, buf: memoryview, flags: RequestFlags = RequestFlags.NONE) -> None:
        n = os.preadv(self.fd, [buf], offset)
        if n < len(buf):
            buf[n:] = bytes(len(buf) - n)

    async def pwritev(self, offset: int, buf: memoryview, flags: RequestFlags = RequestFlags.NONE) -> None:
        assert not self.read_only, "write to a read-only child"
        self.writes.append((offset, len(buf)))
        os.pwritev(self.fd, [buf], offset)

    async def pwrite_zeroes(self, offset: int, length: int, flags: RequestFlags = RequestFlags.NONE) -> None:
        await self.pwritev(offset, memoryview(bytes(length)))

    async def pdiscard(self, offset: int, length: int) -> None:
        pass

    async def flush(self) -> None:
        self.flushes += 1
        os.fdatasync(self.fd)

    async def truncate(self, length: int, prealloc: PreallocMode = "off") -> None:
        os.ftruncate(self.fd, length)

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        return BlockStatus(BlockStatusFlags.DATA | BlockStatusFlags.ALLOCATED, length)

    def close(self) -> None:
        os.close(self.fd)


class DriverChild:
    """``ChildAccess`` over an opened format driver (a qcow2 backing file)."""

    def __init__(self, driver: BlockDriver, ctx: TestOpenContext, name: str,
                 role: ChildRole) -> None:
        self.driver = driver
        self.ctx = ctx
        self._name = name
        self._role = role

    @property
    def name(self) -> str:
        return self._name

    @property
    def role(self) -> ChildRole:
        return self._role

    @property
    def node_name(self) -> str:
        return f"#{self.driver.format_name}-{os.path.basename(self.ctx.path)}"

    @property
    def filename(self) -> str:
        return self.ctx.path

    @property
    def driver_name(self) -> str:
        return self.driver.format_name

    def getlength(self) -> int:
        return self.driver.getlength()

    async def preadv(self, offset: int, buf: memoryview, flags: RequestFlags = RequestFlags.NONE) -> None:
        await self.driver.preadv(offset, buf, flags)

    async def pwritev(self, offset: int, buf: memoryview, flags: RequestFlags = RequestFlags.NONE) -> None:
        await self.driver.pwritev(offset, buf, flags)

    async def pwrite_zeroes(self, offset: int, length: int, flags: RequestFlags = RequestFlags.NONE) -> None:
        await self.driver.pwrite_zeroes(offset, length, flags)

    async def pdiscard(self, offset: int, length: int) -> None:
        await self.driver.pdiscard(offset, length)

    async def flush(self) -> None:
        await self.driver.flush_to_os()

    async def truncate(self, length: int, prealloc: PreallocMode = "off") -> None:
        await self.driver.truncate(length, prealloc)

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        return await self.driver.block_status(offset, length)

    async def close(self) -> None:
        await self.ctx.close_all(self.driver)


def probe_format(path: str) -> str:
    from blockgraph.drivers.qcow2 import Qcow2Driver

    with open(path, "rb") as f:
        head = f.read(2048)
    return "qcow2" if Qcow2Driver.probe(head, path) else "raw"


class TestOpenContext:
    """``OpenContext`` for one node whose file child is ``path``."""

    __test__ = False  # not a pytest class

    def __init__(self, path: str, *, read_only: bool = False,
                 backing: str | None | bool = True, backing_format: str | None = None) -> None:
        """:param backing: True = follow the header; None = ``backing: null``; str = override."""
        self.path = path
        self._flags = NodeFlags(read_only=read_only)
        self.backing = backing
        self.backing_format = backing_format
        self.children: list[Any] = []

    @property
    def node_name(self) -> str:
        return "test-node"

    @property
    def flags(self) -> NodeFlags:
        return self._flags

    def has_child_options(self, name: str) -> bool:
        return name == "backing" and self.backing is not True

    async def open_child(self, name: str, role: ChildRole, *, filename: str | None = None,
                         driver: str | None = None, allow_none: bool = False,
                         read_only: bool | None = None) -> ChildAccess | None:
        if name == "file":
            child = FileChild(self.path, read_only=self._flags.read_only)
            self.children.append(child)
            return child
        if name != "backing":
            raise BlockError(f"unexpected child {name}")
        if self.backing is None:
            return None
        if isinstance(self.backing, str):
            filename, driver = self.backing, self.backing_format
        if filename is None:
            if allow_none:
                return None
            raise BlockError("no backing filename")
        if not os.path.exists(filename):
            raise BlockError(f"Could not open backing file: Could not open '{filename}': "
                             "No such file or directory")
        fmt = driver or probe_format(filename)
        if fmt == "raw":
            raw = FileChild(filename, name="backing", role=role, read_only=True)
            self.children.append(raw)
            return raw
        from blockgraph.drivers.qcow2 import Qcow2Driver

        sub = TestOpenContext(filename, read_only=True)
        drv = Qcow2Driver()
        await drv.open(sub, {})
        dchild = DriverChild(drv, sub, "backing", role)
        self.children.append(dchild)
        return dchild

    async def close_all(self, driver: BlockDriver) -> None:
        await driver.close()
        for child in self.children:
            if isinstance(child, DriverChild):
                await child.close()
            else:
                child.close()
        self.children = []


async def open_image(path: str, *, read_only: bool = False,
                     options: dict[str, Any] | None = None, backing: str | None | bool = True,
                     backing_format: str | None = None) -> tuple[Any, TestOpenContext]:
    """Open ``path`` with the qcow2 driver; returns (driver, ctx). Close with ctx.close_all."""
    from blockgraph.drivers.qcow2 import Qcow2Driver

    ctx = TestOpenContext(path, read_only=read_only, backing=backing,
                          backing_format=backing_format)
    drv = Qcow2Driver()
    try:
        await drv.open(ctx, options or {})
    except BaseException:
        for child in ctx.children:
            if isinstance(child, FileChild):
                child.close()
        raise
    return drv, ctx
