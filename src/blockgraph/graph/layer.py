"""The BlockLayer: one process's nodes and BlockBackends, and how nodes are opened.

Everything that creates, names, links or reopens nodes lives here, so that the cache model's
rules are applied in one place:

* options given for a node win over what it inherits; inheritance follows the child's role;
* a node referenced by name inherits nothing and is never reopened through its parent;
* ``cache.writeback`` on a node that is not the root of a BlockBackend may only be ``on``
  (a no-op): ``off`` fails with ``Can't set writethrough mode except for the root``;
* an open or reopen that fails leaves the graph exactly as it was.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from blockgraph.drivers.base import BlockDriver, ChildAccess, ChildRole, NodeFlags
from blockgraph.drivers.registry import find_protocol, get_driver, probe_format
from blockgraph.errors import BlockError, DeviceNotFound, OptionError
from blockgraph.graph.inherit import AIO_FLAG, child_is_protocol, inherit_options
from blockgraph.graph.node import BlockBackend, Child, Node
from blockgraph.objects import ObjectRegistry
from blockgraph.options.keyval import extract_subdict, parse_json_filename
from blockgraph.options.schema import OptionSpec, OptType, convert_option, opt

log = logging.getLogger(__name__)

T = TypeVar("T")

WRITETHROUGH_ERROR = "Can't set writethrough mode except for the root"
BACKING_PREFIX = "Could not open backing file: "

# Options every node understands, whatever its driver (QEMU's bdrv_runtime_opts).
GENERIC_OPTIONS: dict[str, OptionSpec] = {
    "node-name": opt(OptType.STRING),
    "driver": opt(OptType.STRING),
    "cache.direct": opt(OptType.BOOL, False),
    "cache.no-flush": opt(OptType.BOOL, False),
    # Not a node property: at a root it sets the BlockBackend's mode; elsewhere only "on".
    "cache.writeback": opt(OptType.BOOL),
    "read-only": opt(OptType.BOOL, False),
    "auto-read-only": opt(OptType.BOOL, False),
    "discard": opt(OptType.STRING, "ignore"),
    "detect-zeroes": opt(OptType.STRING, "off", ("off", "on", "unmap")),
    "force-share": opt(OptType.BOOL, False),
}

DISCARD_MODES = {"ignore": False, "off": False, "unmap": True, "on": True}
_NODE_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,30}\Z")
_MISSING = object()


class _Opener:
    """The ``OpenContext`` a driver sees while its node opens."""

    def __init__(
        self,
        layer: BlockLayer,
        node: Node,
        options: dict[str, object],
        preopened: dict[str, Node],
        protocol: bool,
    ) -> None:
        self.layer = layer
        self.node = node
        self.options = options  # leftovers: what the driver has not consumed yet
        self.preopened = preopened
        self.protocol = protocol
        self.new_children: list[Node] = []

    @property
    def node_name(self) -> str:
        return self.node.node_name

    @property
    def flags(self) -> NodeFlags:
        return self.node.flags

    @property
    def objects(self) -> ObjectRegistry:
        return self.layer.objects

    def has_child_options(self, name: str) -> bool:
        prefix = name + "."
        return name in self.options or any(k.startswith(prefix) for k in self.options)

    def drop_child_options(self, name: str) -> None:
        extract_subdict(self.options, name)
        self.options.pop(name, None)

    def set_child_role(self, name: str, role: ChildRole) -> None:
        child = self.node.child(name)
        if child is not None:
            child.role = role

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
        pre = self.preopened.pop(name, None)
        if pre is not None:
            return self.layer.link(self.node, name, role, pre)
        # A backing file opened by the name in the image header (not by the user's reference or
        # filename) is "implicit": the node is then described by its plain filename.
        implicit = bool(role & ChildRole.COW) and name not in self.options and (
            f"{name}.filename" not in self.options)
        try:
            if role & ChildRole.COW and filename is not None and f"{name}.filename" not in self.options:
                self.layer._check_backing_loop(filename)
            child = await self.layer._open_child_node(
                self.options, self.node.options, self.node.driver.is_format, name, role, filename, driver,
                allow_none, self.protocol,
            )
        except BlockError as exc:
            if role & ChildRole.COW:
                raise exc.prepend(BACKING_PREFIX) from exc
            raise
        if child is None:
            return None
        node, is_new = child
        if is_new:
            self.new_children.append(node)
        if implicit:
            self.node.auto_backing_file = node.filename
        return self.layer.link(self.node, name, role, node)


class BlockLayer:
    """Owns the nodes, BlockBackends (and later jobs, exports, monitors) of one process.

    There are no globals: tests make as many layers as they like.
    """

    def __init__(self) -> None:
        self.nodes: list[Node] = []  # in the order they were named
        self.objects = ObjectRegistry()  # --object / object-add: secrets, TLS credentials
        self.backends: list[BlockBackend] = []
        self._auto_counter = 0
        self.drive_counts: dict[str, int] = {}  # -drive's per-interface index
        self.warnings: list[str] = []
        self.warn: Callable[[str], None] = self.warnings.append
        self._loop: asyncio.AbstractEventLoop | None = None
        # (real path, read-only) of the image files whose format nodes are opening right now:
        # a backing file naming one of them would make the chain endless.
        self._opening_images: list[tuple[str, bool]] = []
        # Event sink: monitors subscribe here; the graph never imports them.
        self.event_listeners: list[Callable[[str, dict[str, object]], None]] = []
        # The VM run state (QEMU's RunState): QMP stop/cont and an I/O error under the
        # ``stop`` policy change it; requests of a drive's device wait while it is not running.
        self.run_state = "running"
        self._resume_waiters: list[asyncio.Future[None]] = []

    def emit_event(self, name: str, data: dict[str, object]) -> None:
        """Hand event ``name`` to every subscriber (QMP monitors)."""
        for listener in list(self.event_listeners):
            listener(name, data)

    @property
    def vm_running(self) -> bool:
        return self.run_state == "running"

    def vm_stop(self, state: str) -> None:
        """Stop the VM in run state ``state`` (``paused``, ``io-error``) and emit ``STOP``.

        A VM that is not running stays in its state and nothing is emitted, as QEMU's
        ``vm_stop`` does.
        """
        if not self.vm_running:
            return
        self.run_state = state
        self.emit_event("STOP", {})

    def vm_resume(self) -> None:
        """QMP ``cont``: forget the BlockBackends' I/O errors, run again, emit ``RESUME``.

        Requests held in :meth:`wait_running` go on (a request that failed under the ``stop``
        policy is retried by its device).
        """
        for backend in self.backends:
            backend.iostatus_reset()
        if self.vm_running:
            return
        self.run_state = "running"
        self.emit_event("RESUME", {})
        waiters, self._resume_waiters = self._resume_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_running(self) -> None:
        """Return once the VM runs (at once if it does)."""
        while not self.vm_running:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._resume_waiters.append(waiter)
            await waiter

    # -- sync facade ------------------------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run one coroutine to completion on this layer's event loop (for sync callers)."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(coro)

    def close(self) -> None:
        """Close every BlockBackend and node."""
        for bb in list(self.backends):
            self.run(self.remove_backend(bb))
        for node in reversed(list(self.nodes)):
            if not node.parents and not node.backends:
                self.run(self._close_tree(node))
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    # -- lookup -----------------------------------------------------------------------------

    def find_node(self, name: str) -> Node | None:
        return next((n for n in self.nodes if n.node_name == name), None)

    def find_backend(self, name: str) -> BlockBackend | None:
        return next((b for b in self.backends if b.name == name), None)

    def lookup_bs(self, name: str) -> Node:
        """A node by BlockBackend name (its root) or by node name, as ``bdrv_lookup_bs``."""
        bb = self.find_backend(name)
        if bb is not None and bb.root is not None:
            return bb.root
        node = self.find_node(name)
        if node is None:
            raise DeviceNotFound(f"Cannot find device='{name}' nor node-name='{name}'")
        return node

    # -- naming -----------------------------------------------------------------------------

    def _generate_name(self) -> str:
        # QEMU's id_generate: '#block', a counter, two random digits (never a valid user name).
        name = f"#block{self._auto_counter}{random.randrange(100):02d}"
        self._auto_counter += 1
        return name

    def _register(self, node: Node) -> None:
        if not node.auto_named:
            if self.find_node(node.node_name) is not None:
                raise BlockError(f"Duplicate nodes with node-name='{node.node_name}'")
            if self.find_backend(node.node_name) is not None:
                raise BlockError(f"node-name={node.node_name} is conflicting with a device id")
        self.nodes.append(node)

    def _check_backing_loop(self, filename: str) -> None:
        """Refuse a backing file that is an image of the chain being opened (a→b→a).

        QEMU fails on its image locks when the top is writable and recurses forever when it is
        read-only; we give the lock error in the first case and qemu-img's loop error otherwise.
        """
        if filename.startswith("json:") or not os.path.exists(filename):
            return
        real = os.path.realpath(filename)
        for path, read_only in self._opening_images:
            if path == real:
                if not read_only:
                    raise BlockError('Failed to get shared "write" lock\n'
                                     f"Is another process using the image [{filename}]?")
                raise BlockError(f"Backing file '{filename}' creates an infinite loop.")

    def check_node_name(self, name: str) -> None:
        if not _NODE_NAME_RE.match(name):
            raise BlockError(f"Invalid node-name: '{name}'")

    # -- BlockBackends ------------------------------------------------------------------------

    def new_backend(self, name: str) -> BlockBackend:
        if name and self.find_backend(name) is not None:
            raise BlockError(f"Duplicate ID '{name}' for drive")
        if name and self.find_node(name) is not None:
            raise BlockError(f"Device name '{name}' conflicts with an existing node name")
        bb = BlockBackend(self, name)
        self.backends.append(bb)
        return bb

    async def remove_backend(self, bb: BlockBackend) -> None:
        # Requests still running finish first; throttled ones stop waiting (QEMU's drain).
        bb.set_io_limits(None)
        await bb.drain()
        root = bb.root
        bb.attach(None)
        self.backends.remove(bb)
        if root is not None and not root.parents and not root.backends:
            await self._close_tree(root)

    # -- open -------------------------------------------------------------------------------

    async def open_node(
        self,
        filename: str | None,
        options: dict[str, object],
        *,
        backend: BlockBackend | None = None,
        check: bool = False,
        no_io: bool = False,
    ) -> Node:
        """Open a node (and its children) as a root; with ``backend``, as that BB's root.

        ``options`` are flat (dotted keys), values strings or typed JSON values. The node is
        attached to ``backend`` on success. ``check`` opens the root for an image check
        (QEMU's ``BDRV_O_CHECK``); ``no_io`` only to describe it (``BDRV_O_NO_IO``).

        :raise BlockError: with QEMU's message; the graph is unchanged.
        """
        node = await self._open(filename, dict(options), parent_options=None, role=None,
                                protocol=False, backend=backend, check=check, no_io=no_io)
        if backend is not None:
            backend.attach(node)
        return node

    async def _open_child_node(
        self,
        parent_options: dict[str, object],
        inherit_from: Mapping[str, object],
        parent_is_format: bool,
        name: str,
        role: ChildRole,
        filename: str | None,
        driver: str | None,
        allow_none: bool,
        parent_protocol: bool,
    ) -> tuple[Node, bool] | None:
        """Open or look up child ``name`` from ``parent_options`` (its keys are consumed).

        ``inherit_from`` holds the parent's options the child inherits defaults from.

        :return: the node and whether it was opened here (False for a reference), or None.
        """
        child_opts = extract_subdict(parent_options, name)
        ref = parent_options.pop(name, _MISSING)
        if ref is None:
            if role & ChildRole.COW:
                return None  # "backing": null — explicitly no backing file
            raise OptionError(f"Invalid parameter type for '{name}', expected: string")
        if isinstance(ref, str):
            if child_opts or (filename is not None and role & ChildRole.PRIMARY and name == "file"):
                raise BlockError(
                    "Cannot reference an existing block device with additional options or a new filename"
                )
            return self.lookup_bs(ref), False
        if ref is not _MISSING:
            raise OptionError(f"Invalid parameter type for '{name}', expected: string")
        child_filename = child_opts.pop("filename", None) if "filename" in child_opts else filename
        if child_filename is not None and not isinstance(child_filename, str):
            raise OptionError(f"Invalid parameter type for '{name}.filename', expected: string")
        if child_filename is None and not child_opts:
            if allow_none:
                return None
            raise BlockError(f'A block device must be specified for "{name}"')
        if driver is not None and "driver" not in child_opts:
            child_opts["driver"] = driver
        protocol = child_is_protocol(role, parent_is_format, parent_protocol)
        node = await self._open(child_filename, child_opts, parent_options=inherit_from, role=role,
                                protocol=protocol, backend=None)
        return node, True

    def link(self, parent: Node, name: str, role: ChildRole, node: Node) -> Child:
        child = Child(name, role, parent, node)
        parent.children.append(child)
        node.parents.append(child)
        return child

    def unlink(self, child: Child) -> None:
        child.parent.children.remove(child)
        child.node.parents.remove(child)

    async def _open(
        self,
        filename: str | None,
        options: dict[str, object],
        *,
        parent_options: Mapping[str, object] | None,
        role: ChildRole | None,
        protocol: bool,
        backend: BlockBackend | None,
        check: bool = False,
        no_io: bool = False,
    ) -> Node:
        if filename is not None and filename.startswith("json:"):
            # Options given directly beat those inside the json: string.
            for key, value in parse_json_filename(filename).items():
                options.setdefault(key, value)
            filename = None
        if "filename" in options:
            value = options.pop("filename")
            if not isinstance(value, str):
                raise OptionError("Invalid parameter type for 'filename', expected: string")
            filename = value
        explicit = dict(options)
        if parent_options is not None and role is not None:
            inherit_options(role, parent_options, options)
        drv_name = options.get("driver")
        preopened: dict[str, Node] = {}
        fresh: list[Node] = []  # children opened here (not referenced): they inherit from us
        cls: type[BlockDriver] | None
        if drv_name is not None:
            if not isinstance(drv_name, str):
                raise OptionError("Invalid parameter type for 'driver', expected: string")
            cls = get_driver(drv_name)
        elif protocol:
            if not filename:
                raise BlockError("The 'file' block driver requires a file name")
            cls = find_protocol(filename)
        else:
            cls = None
        try:
            has_file = "file" in options or any(k.startswith("file.") for k in options)
            if cls is None or (cls.is_format and (filename is not None or has_file)):
                # A format node's file child is opened (and named) before the node itself, as
                # QEMU does, and the format is probed from its contents if none was given.
                if cls is None and filename is None and not has_file:
                    raise BlockError("Must specify either driver or filename")
                opened = await self._open_child_node(options, options, True, "file", ChildRole.IMAGE,
                                                     filename, None, False, protocol)
                assert opened is not None
                file_node, is_new = opened
                preopened["file"] = file_node
                if is_new:
                    fresh.append(file_node)
                if cls is None:
                    header = bytearray(2048)
                    length = min(len(header), file_node.getlength())
                    await file_node.preadv(0, memoryview(header)[:length])
                    cls = probe_format(bytes(header[:length]), file_node.filename)
                    if cls.format_name == "raw":
                        self.warn(
                            f"Image format was not specified for '{file_node.filename}' and probing guessed raw.\n"
                            "         Automatically detecting the format is dangerous for raw images, "
                            "write operations on block 0 will be restricted.\n"
                            "         Specify the 'raw' format explicitly to remove the restrictions."
                        )
                filename = None
            elif filename is not None:
                cls.parse_filename(filename, options)
            node = await self._open_with_driver(cls, options, explicit, preopened, fresh, backend,
                                                protocol, check, no_io)
        except BaseException:
            for pre in fresh:
                if not pre.parents and not pre.backends:
                    await self._close_tree(pre)
            raise
        return node

    async def _open_with_driver(
        self,
        cls: type[BlockDriver],
        options: dict[str, object],
        explicit: dict[str, object],
        preopened: dict[str, Node],
        fresh: list[Node],
        backend: BlockBackend | None,
        protocol: bool,
        check: bool = False,
        no_io: bool = False,
    ) -> Node:
        options.pop("driver", None)
        generic = self._consume(options, GENERIC_OPTIONS)
        writeback = generic.pop("cache.writeback", None)
        if writeback is False and backend is None:
            raise BlockError(WRITETHROUGH_ERROR)
        node_name = generic.pop("node-name", None)
        if node_name is not None:
            self.check_node_name(str(node_name))
        discard = str(generic["discard"])
        if discard not in DISCARD_MODES:
            raise BlockError("Invalid discard option")
        aio = options.pop(AIO_FLAG, None)
        flags = NodeFlags(
            read_only=bool(generic["read-only"]) or (backend is not None and backend.read_only),
            direct=bool(generic["cache.direct"]),
            no_flush=bool(generic["cache.no-flush"]),
            discard_unmap=DISCARD_MODES[discard],
            aio=str(aio) if aio is not None else None,
            check=check,
            no_io=no_io,
        )
        if aio is not None:
            generic[AIO_FLAG] = aio
        generic["read-only"] = flags.read_only
        runtime = self._consume(options, cls.runtime_options)
        for key in [k for k in options if any(k == p or k.startswith(p + ".")
                                              for p in cls.runtime_option_prefixes)]:
            runtime[key] = options.pop(key)
        driver = cls()
        auto = node_name is None
        node = Node(self, str(node_name) if node_name else self._generate_name(), auto, driver, flags)
        node.options = generic
        node.explicit_options = {
            k: convert_option(k, GENERIC_OPTIONS[k], v) if k in GENERIC_OPTIONS else v
            for k, v in explicit.items()
            if (k in GENERIC_OPTIONS and k not in ("driver", "node-name")) or k in cls.runtime_options
        }
        node.explicit_options.pop("cache.writeback", None)
        self._register(node)
        opener = _Opener(self, node, options, preopened, protocol)
        image = preopened.get("file")
        marker = (os.path.realpath(image.filename), flags.read_only) if (
            image is not None and cls.is_format and image.filename
            and not image.filename.startswith("json:")) else None
        if marker is not None:
            self._opening_images.append(marker)
        try:
            await driver.open(opener, runtime)
            for unused in opener.preopened.values():
                if unused in fresh:
                    await self._close_tree(unused)
            opener.preopened.clear()
            if options:
                key = next(iter(options))
                kind = "format" if cls.is_format else "protocol"
                verb = "does not support" if cls.is_format else "doesn't support"
                raise BlockError(f"Block {kind} '{cls.format_name}' {verb} the option '{key}'")
        except BaseException:
            await driver.close()
            for child in list(node.children):
                self.unlink(child)
                if not child.node.parents and not child.node.backends:
                    await self._close_tree(child.node)
            self.nodes.remove(node)
            raise
        finally:
            if marker is not None:
                self._opening_images.remove(marker)
        for child in node.children:
            if child.node in fresh or child.node in opener.new_children:
                child.node.inherits_from = node
        if cls.supports_backing and node.auto_backing_file is None:
            node.auto_backing_file = driver.info().backing_file
        if backend is not None and writeback is not None:
            backend.write_cache = bool(writeback)
        return node

    def _consume(self, options: dict[str, object], schema: Mapping[str, OptionSpec]) -> dict[str, Any]:
        """Pop the keys of ``schema`` from ``options``, typed, with defaults filled in."""
        out: dict[str, object] = {}
        for key, spec in schema.items():
            if key in options:
                out[key] = convert_option(key, spec, options.pop(key))
            elif spec.default is not None:
                out[key] = spec.default
        return out

    # -- close ------------------------------------------------------------------------------

    async def _close_tree(self, node: Node) -> None:
        """Close ``node`` and every child only it holds (once: a closed node is unregistered)."""
        if node not in self.nodes:
            return
        self.nodes.remove(node)
        await node.driver.close()
        for child in list(node.children):
            self.unlink(child)
            if not child.node.parents and not child.node.backends:
                await self._close_tree(child.node)

    async def delete_node(self, node: Node) -> None:
        if node.parents or node.backends:
            raise BlockError(f"Node '{node.node_name}' is busy: node is used as "
                             f"{'backing hd' if node.parents else 'root'}")
        await self._close_tree(node)
