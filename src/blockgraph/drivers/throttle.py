"""The ``throttle`` filter: the I/O passing through waits for the limits of a throttle group.

``driver=throttle,throttle-group=ID,file=NODE``: ID names a throttle group, a
``throttle-group`` object or the group of a ``-drive throttling.group``, whose limits every
member shares (:mod:`blockgraph.objects.throttle`). Reads wait as reads; writes, zero writes
and discards wait as writes, as in QEMU. A ``throttle-group`` object cannot be deleted while a
node uses it; ``blockdev-reopen`` may move the node to another group.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Mapping
from typing import Any, ClassVar

from blockgraph.drivers.base import (
    BlockDriver,
    BlockStatus,
    BlockStatusFlags,
    ChildAccess,
    ChildRole,
    DriverInfo,
    NodeFlags,
    OpenContext,
    PreallocMode,
    RequestFlags,
)
from blockgraph.errors import BlockError, IOFailure
from blockgraph.objects import ObjectRegistry
from blockgraph.objects.throttle import ThrottleMember
from blockgraph.options.schema import OptionSpec, OptType, opt


class ThrottleDriver(BlockDriver):
    """Driver ``throttle``."""

    format_name: ClassVar[str] = "throttle"
    is_format: ClassVar[bool] = True
    is_filter: ClassVar[bool] = True
    runtime_options: ClassVar[Mapping[str, OptionSpec]] = {
        "throttle-group": opt(OptType.STRING),
    }
    # The child's request layer emulates what its driver lacks, so every flag can pass through.
    supported_write_flags: ClassVar[RequestFlags] = (
        RequestFlags.FUA | RequestFlags.MAY_UNMAP | RequestFlags.NO_FALLBACK
    )

    def __init__(self) -> None:
        self.file: ChildAccess | None = None
        self.member: ThrottleMember | None = None
        self._objects: ObjectRegistry | None = None
        self._pending: str | None = None  # the group a reopen moves to

    @staticmethod
    def _group_name(objects: ObjectRegistry, options: Mapping[str, Any]) -> str:
        name = options.get("throttle-group")
        if name is None:
            raise BlockError("Please specify a throttle group")
        if str(name) not in objects.throttle_groups:
            raise BlockError(f"Throttle group '{name}' does not exist")
        return str(name)

    async def open(self, ctx: OpenContext, options: dict[str, Any]) -> None:
        name = self._group_name(ctx.objects, options)
        self.file = await ctx.open_child("file", ChildRole.FILTERED_PRIMARY)
        if self.file is None:
            raise BlockError('A block device must be specified for "file"')
        self.member = ctx.objects.join_throttle_group(name, None)
        self._objects = ctx.objects

    async def close(self) -> None:
        if self.member is not None and self._objects is not None:
            self._objects.leave_throttle_group(self.member)
        self.member = None
        self.file = None

    def reopen_prepare(self, options: dict[str, Any], flags: NodeFlags) -> None:
        assert self._objects is not None
        self._pending = self._group_name(self._objects, options)

    def reopen_commit(self) -> None:
        name, self._pending = self._pending, None
        if name is None or self._objects is None or self.member is None:
            return
        if name != self.member.group.name:
            old = self.member
            self.member = self._objects.join_throttle_group(name, None)
            self._objects.leave_throttle_group(old)

    def reopen_abort(self) -> None:
        self._pending = None

    def _child(self) -> ChildAccess:
        if self.file is None:
            raise IOFailure(errno.ENOMEDIUM)
        return self.file

    async def _wait(self, is_write: bool, nbytes: int) -> None:
        member = self.member
        if member is not None:
            await member.group.intercept(member, is_write, nbytes)

    def getlength(self) -> int:
        return self._child().getlength()

    async def preadv(self, offset: int, buf: memoryview, flags: RequestFlags) -> None:
        await self._wait(False, len(buf))
        await self._child().preadv(offset, buf, flags)

    async def pwritev(self, offset: int, buf: memoryview, flags: RequestFlags) -> None:
        await self._wait(True, len(buf))
        await self._child().pwritev(offset, buf, flags)

    async def pwrite_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        await self._wait(True, length)
        await self._child().pwrite_zeroes(offset, length, flags)

    async def pdiscard(self, offset: int, length: int) -> None:
        await self._wait(True, length)
        await self._child().pdiscard(offset, length)

    async def truncate(self, length: int, prealloc: PreallocMode = "off") -> None:
        await self._child().truncate(length, prealloc)

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        status = await self._child().block_status(offset, length)
        if status.file is None and status.flags & BlockStatusFlags.OFFSET_VALID:
            # The child answered about itself; as our answer, it must name the child.
            status = dataclasses.replace(status, file=self.file)
        return status

    def info(self) -> DriverInfo:
        return DriverInfo()

    def open_options(self) -> dict[str, object]:
        return {"throttle-group": self.member.group.name if self.member is not None else ""}
