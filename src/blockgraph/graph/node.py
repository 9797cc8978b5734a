"""Nodes, the edges between them (children with roles), and BlockBackends.

A :class:`Node` is one driver instance in the graph with its options and flags; it is also the
request layer for everything below it (it derives from :class:`~blockgraph.io.request.IONode`).
A :class:`Child` is an edge from a parent node to a child node with a name (``file``,
``backing``, ``image``, ...) and QEMU's role bits; it is what a driver holds to do I/O on its
children. A :class:`BlockBackend` is a root attachment: the only place writethrough lives.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from blockgraph.drivers.base import (
    BlockDriver,
    BlockStatus,
    ChildRole,
    FileRange,
    NodeFlags,
    PreallocMode,
    RequestFlags,
)
from blockgraph.errors import IOFailure
from blockgraph.io.request import IONode, with_fua
from blockgraph.objects.throttle import ThrottleLimits, ThrottleMember

if TYPE_CHECKING:
    from blockgraph.graph.layer import BlockLayer

log = logging.getLogger(__name__)

_PRIMARY = int(ChildRole.PRIMARY)  # tested on int(role): IntFlag's & runs in Python


class Child:
    """An edge parent → child; implements the drivers' ``ChildAccess`` view."""

    def __init__(self, name: str, role: ChildRole, parent: Node, node: Node) -> None:
        self._name = name
        self._role = role
        self.parent = parent
        self.node = node

    def __repr__(self) -> str:
        return f"<Child {self.parent.node_name}.{self._name} -> {self.node.node_name}>"

    @property
    def name(self) -> str:
        return self._name

    @property
    def role(self) -> ChildRole:
        return self._role

    @role.setter
    def role(self, role: ChildRole) -> None:
        self._role = role

    @property
    def node_name(self) -> str:
        return self.node.node_name

    @property
    def filename(self) -> str:
        return self.node.filename

    @property
    def driver_name(self) -> str:
        return self.node.driver_name

    def getlength(self) -> int:
        return self.node.getlength()

    # The hot three hand out the node's coroutine instead of wrapping it in one of their own:
    # awaiting the result is the same, minus a coroutine and a frame per request and hop.
    def preadv(self, offset: int, buf: memoryview,
               flags: RequestFlags = RequestFlags.NONE) -> Coroutine[Any, Any, None]:
        return self.node.preadv(offset, buf, flags)

    def pwritev(self, offset: int, buf: memoryview,
                flags: RequestFlags = RequestFlags.NONE) -> Coroutine[Any, Any, None]:
        return self.node.pwritev(offset, buf, flags)

    async def pwrite_zeroes(self, offset: int, length: int, flags: RequestFlags = RequestFlags.NONE) -> None:
        await self.node.pwrite_zeroes(offset, length, flags)

    async def pdiscard(self, offset: int, length: int) -> None:
        await self.node.pdiscard(offset, length)

    async def flush(self) -> None:
        await self.node.flush()

    async def truncate(self, length: int, prealloc: PreallocMode = "off") -> None:
        await self.node.truncate(length, prealloc)

    def block_status(self, offset: int, length: int) -> Coroutine[Any, Any, BlockStatus]:
        return self.node.block_status(offset, length)

    def map_read(self, offset: int, length: int) -> FileRange | None:
        return self.node.map_read(offset, length)

    @property
    def debug_event(self) -> Callable[[str], Awaitable[None]] | None:
        """The child's driver's handler of blkdebug events (``BLKDBG_EVENT``), None when it has
        none: a parent (raw, on every request) then has nothing to await."""
        handler: Callable[[str], Awaitable[None]] | None = getattr(self.node.driver, "debug_event", None)
        return handler


class Node(IONode):
    """One node of the graph.

    :param layer: the :class:`BlockLayer` that owns it.
    :param node_name: its name (given, or ``#blockNNN`` generated).
    :param driver: the driver instance (not yet opened when the node is made).
    :param flags: the open flags, shared with the driver and updated in place by reopen.
    """

    def __init__(
        self, layer: BlockLayer, node_name: str, auto_named: bool, driver: BlockDriver, flags: NodeFlags
    ) -> None:
        super().__init__(driver, flags)
        self.layer = layer
        self.node_name = node_name
        self.auto_named = auto_named
        self.driver_name = driver.format_name
        # Effective options of this node alone (child subtrees removed; a child opened here is
        # recorded as a reference under its name), and the subset the user set explicitly.
        self.options: dict[str, object] = {}
        self.explicit_options: dict[str, object] = {}
        self.children: list[Child] = []
        self.parents: list[Child] = []
        self.backends: list[BlockBackend] = []
        # The parent whose options this node inherits on reopen (None for referenced nodes).
        self.inherits_from: Node | None = None
        self.log = log.getChild(node_name.lstrip("#"))
        # What the node's backing file is called when nothing overrides it: the backing node's
        # filename if it was opened from the image header, else the header's name (QEMU's
        # auto_backing_file). A different backing node makes the node's filename json:.
        self.auto_backing_file: str | None = None

    def __repr__(self) -> str:
        return f"<Node {self.node_name} ({self.driver_name})>"

    def io_children(self) -> Iterable[Node]:
        # A leaf (the file node, flushed after every write of a writethrough export) makes no
        # generator.
        children = self.children
        if not children:
            return ()
        return (c.node for c in children)

    def primary_io_child(self) -> Node | None:
        # A plain loop on int roles: next() over a generator testing IntFlag's & (which runs
        # in Python) cost ~1 us per call, and every flush asks twice.
        for c in self.children:
            if int(c.role) & _PRIMARY:
                return c.node
        return None

    def child(self, name: str) -> Child | None:
        return next((c for c in self.children if c.name == name), None)

    @property
    def file(self) -> Node | None:
        c = self.child("file")
        return c.node if c else None

    @property
    def backing(self) -> Node | None:
        c = self.child("backing")
        return c.node if c else None

    @property
    def filename(self) -> str:
        """The node's filename as ``info block`` shows it (QEMU's refreshed filename).

        A plain name when the node is fully described by it; otherwise ``json:`` and the
        options that describe it, keys sorted, as QEMU prints them.
        """
        if not self.backing_overridden():
            own = self.driver.filename()
            if own is not None:
                return own
        return "json:" + json.dumps(self.full_open_options(), sort_keys=True)

    def backing_overridden(self) -> bool:
        """Whether the backing node differs from what the image itself names."""
        if not self.driver.supports_backing:
            return False
        backing = self.backing
        if backing is None:
            return bool(self.driver.info().backing_file)
        return (self.auto_backing_file or "") != backing.filename

    def full_open_options(self) -> dict[str, object]:
        """The options that would open this node again (QEMU's ``full_open_options``)."""
        options: dict[str, object] = {"driver": self.driver_name}
        options.update(self.driver.open_options())
        overridden = self.backing_overridden()
        for c in self.children:
            if c.role & ChildRole.COW and not overridden:
                continue
            options[c.name] = c.node.full_open_options()
        if overridden and self.backing is None:
            options["backing"] = None  # the header names one, but none is attached
        return options

    def write_threshold_exceeded(self, end: int) -> None:
        threshold = self.write_threshold
        self.write_threshold = 0
        self.layer.emit_event("BLOCK_WRITE_THRESHOLD", {
            "node-name": self.node_name, "amount-exceeded": end - threshold,
            "write-threshold": threshold})

    async def make_empty(self) -> None:
        """Drop everything this node's image holds, so that it reads through to its backing
        file (QEMU's ``bdrv_make_empty``). The caller flushes when it wants it stable.

        :raise IOFailure: ``EPERM`` on a read-only node, ``ENOTSUP`` if the format cannot.
        """
        self._check_writable()
        await self.driver.make_empty()

    async def change_backing_file(self, backing_file: str | None, backing_format: str | None) -> None:
        """Write a new backing file name (and format) into the image's metadata.

        QEMU's ``bdrv_change_backing_file``: only the image changes, the graph does not.

        :raise BlockError: ``Operation not supported`` for formats without a backing file, or
            when the new name does not fit.
        """
        self._check_writable()
        await self.driver.change_backing_file(backing_file, backing_format)

    def backing_chain_depth(self) -> int:
        depth = 0
        node = self.backing
        while node is not None:
            depth += 1
            node = node.backing
        return depth


@dataclass
class BlockBackendStats:
    """I/O accounting at the BlockBackend (what ``query-blockstats`` reports)."""

    rd_operations: int = 0
    wr_operations: int = 0
    flush_operations: int = 0
    rd_bytes: int = 0
    wr_bytes: int = 0
    failed_rd_operations: int = 0
    failed_wr_operations: int = 0


@dataclass
class BlockBackend:
    """A root attachment through which a user, device, export or job does I/O.

    ``write_cache`` False means writethrough: every write completes only once it is stable.
    """

    layer: BlockLayer
    name: str
    root: Node | None = None
    write_cache: bool = True
    read_only: bool = False
    tray_open: bool = False
    locked: bool = False
    removable: bool = True
    rerror: str = "report"
    werror: str = "enospc"
    detect_zeroes: str = "off"
    stats: BlockBackendStats = field(default_factory=BlockBackendStats)
    # This BlockBackend's place in the throttle group whose limits its reads and writes wait
    # for (-drive throttling.*, block_set_io_throttle, qemu-img convert -r); None: none.
    io_limits: ThrottleMember | None = None
    # Requests between their start and their end, for drain().
    in_flight: int = 0
    _drained: asyncio.Event | None = None
    # The open flags a new medium gets (``change``), remembered from the drive's options.
    root_flags: NodeFlags = field(default_factory=NodeFlags)
    # I/O status: only a guest device enables it (QEMU's blk_iostatus_enable); without one,
    # query-block has no ``io-status``.
    iostatus_enabled: bool = False
    iostatus: str = "ok"

    def error_action(self, is_read: bool, error: int) -> str:
        """The rerror/werror policy's answer to a failed request (``blk_get_error_action``).

        :return: ``ignore``, ``report`` or ``stop``.
        """
        policy = self.rerror if is_read else self.werror
        if policy == "enospc":
            return "stop" if error == errno.ENOSPC else "report"
        return policy

    def handle_io_error(self, is_read: bool, error: int) -> str:
        """What a device does with a failed request: apply the policy, emit ``BLOCK_IO_ERROR``.

        With ``stop`` the I/O status records the failure (if enabled) and the VM stops
        (run state ``io-error``, event ``STOP``); the device holds the request until ``cont``
        and then retries it. qemu-io never comes here, as in QEMU: its errors go to its caller.

        QEMU 7.2 applies rerror/werror only in guest devices, and qemu-storage-daemon has
        none. blockgraph adds one case: an NBD export of a drive's BlockBackend (``-drive`` /
        ``--drive``, exported by the drive's id) acts as that drive's device and comes here
        for every failed request; an export of a node (``--blockdev``) keeps QEMU's behaviour
        and its errors only go to the NBD client.

        :return: the action taken.
        """
        action = self.error_action(is_read, error)
        if action == "stop" and self.iostatus_enabled and self.iostatus == "ok":
            self.iostatus = "nospace" if error == errno.ENOSPC else "failed"
        data: dict[str, object] = {"device": self.name}
        if self.root is not None:
            data["node-name"] = self.root.node_name
        data["operation"] = "read" if is_read else "write"
        data["action"] = action
        if self.iostatus_enabled:
            data["nospace"] = error == errno.ENOSPC
        data["reason"] = os.strerror(error)
        self.layer.emit_event("BLOCK_IO_ERROR", data)
        if action == "stop":
            self.layer.vm_stop("io-error")
        return action

    def iostatus_reset(self) -> None:
        """``cont`` / ``block_job_resume``: the error is forgotten."""
        self.iostatus = "ok"

    def set_io_limits(self, limits: ThrottleLimits | None, group: str | None = None) -> None:
        """Throttle reads and writes by ``limits`` in the throttle group ``group``, which
        other members share; no limits, or limits that limit nothing, end the throttling
        and let waiting requests go (QEMU's ``blk_io_limits_enable/update_group/disable``).

        Without ``group`` a throttled BlockBackend stays in its group, and one that was not
        throttled joins the group named after itself.
        """
        registry = self.layer.objects
        member = self.io_limits
        enabled = limits is not None and limits.enabled
        if member is not None and (not enabled or (group is not None
                                                   and group != member.group.name)):
            self.io_limits = None
            registry.leave_throttle_group(member)
            member = None
        if limits is None or not enabled:
            return
        if member is None:
            self.io_limits = registry.join_throttle_group(
                self.name if group is None else group, limits)
        else:
            member.group.configure(limits)

    async def drain(self) -> None:
        """Wait until no request is in flight (QEMU's ``blk_drain``); new ones may start
        afterwards. Requests waiting for throttle limits wait on: a caller that wants them to
        go ends the throttling first (:meth:`set_io_limits` with None)."""
        while self.in_flight:
            self._drained = self._drained or asyncio.Event()
            await self._drained.wait()

    def _end(self) -> None:
        self.in_flight -= 1
        if not self.in_flight and self._drained is not None:
            self._drained.set()
            self._drained = None

    def attach(self, node: Node | None) -> None:
        """Make ``node`` the root (or eject with None). The write cache mode stays with us."""
        if self.root is not None:
            self.root.backends.remove(self)
        self.root = node
        if node is not None:
            node.backends.append(self)

    def _root(self) -> Node:
        if self.root is None:
            raise IOFailure(errno.ENOMEDIUM)
        return self.root

    def _check(self, offset: int, length: int) -> Node:
        # Even over a growable protocol node, a user of the BlockBackend sees a fixed-size disk.
        root = self._root()
        if offset < 0 or length < 0 or offset + length > root.getlength():
            raise IOFailure(errno.EIO)
        return root

    # The hot two do _check inline and tell the root that the range is checked (after a
    # throttle wait, checked again): the root's request layer would otherwise measure the
    # node again (a call down to the file per hop).

    async def preadv(self, offset: int, buf: memoryview) -> None:
        root = self.root
        if root is None:
            raise IOFailure(errno.ENOMEDIUM)
        length = len(buf)
        if offset < 0 or length < 0 or offset + length > root.getlength():
            raise IOFailure(errno.EIO)
        stats = self.stats
        self.in_flight += 1
        try:
            member = self.io_limits
            if member is not None:
                await member.group.intercept(member, False, length)
                root = self._check(offset, length)  # the medium may have gone meanwhile
            try:
                await root.preadv(offset, buf, RequestFlags.NONE, True)
            except Exception:
                stats.failed_rd_operations += 1
                raise
        finally:
            self._end()
        stats.rd_operations += 1
        stats.rd_bytes += length

    def map_read(self, offset: int, length: int) -> FileRange | None:
        """Where the root's file holds ``[offset, offset + length)``, for a read that the
        caller copies in the kernel (see :meth:`IONode.map_read`); None: use :meth:`preadv`.

        Throttled reads are not mapped: they wait for their turn in preadv.
        """
        root = self.root
        if root is None or self.io_limits is not None:
            return None
        if offset < 0 or length <= 0 or offset + length > root.getlength():
            return None
        mapped = root.map_read(offset, length, True)
        if mapped is not None:
            stats = self.stats
            stats.rd_operations += 1
            stats.rd_bytes += length
        return mapped

    async def pwritev(self, offset: int, buf: memoryview, flags: RequestFlags = RequestFlags.NONE) -> None:
        """Write; a writethrough BlockBackend adds FUA so the data is stable on return."""
        root = self.root
        if root is None:
            raise IOFailure(errno.ENOMEDIUM)
        length = len(buf)
        if offset < 0 or length < 0 or offset + length > root.getlength():
            raise IOFailure(errno.EIO)
        if not self.write_cache:
            flags = with_fua(flags)
        stats = self.stats
        self.in_flight += 1
        try:
            member = self.io_limits
            if member is not None:
                await member.group.intercept(member, True, length)
                root = self._check(offset, length)  # the medium may have gone meanwhile
            try:
                await root.pwritev(offset, buf, flags, True)
            except Exception:
                stats.failed_wr_operations += 1
                raise
        finally:
            self._end()
        stats.wr_operations += 1
        stats.wr_bytes += length

    async def pwrite_zeroes(self, offset: int, length: int, flags: RequestFlags = RequestFlags.NONE) -> None:
        if not self.write_cache:
            flags = with_fua(flags)
        root = self._check(offset, length)
        self.in_flight += 1
        try:
            member = self.io_limits
            if member is not None:
                await member.group.intercept(member, True, length)
                root = self._check(offset, length)
            await root.pwrite_zeroes(offset, length, flags)
        finally:
            self._end()
        self.stats.wr_operations += 1
        self.stats.wr_bytes += length

    async def pdiscard(self, offset: int, length: int) -> None:
        root = self._check(offset, length)
        self.in_flight += 1
        try:
            await root.pdiscard(offset, length)
        finally:
            self._end()

    async def flush(self) -> None:
        self.stats.flush_operations += 1
        root = self._root()
        self.in_flight += 1
        try:
            await root.flush()
        finally:
            self._end()

    async def load_vmstate(self, offset: int, buf: memoryview) -> None:
        """Read the VM state area (``qemu-io read -b``); see :meth:`IONode.load_vmstate`."""
        await self._root().load_vmstate(offset, buf)

    async def save_vmstate(self, offset: int, buf: memoryview) -> None:
        """Write the VM state area (``qemu-io write -b``); stable on return when writethrough."""
        root = self._root()
        await root.save_vmstate(offset, buf)
        if not self.write_cache:
            await root.flush()

    def getlength(self) -> int:
        return self._root().getlength()
