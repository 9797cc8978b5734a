"""The QMP command table: argument checking, then the command, in QEMU 7.2's words.

Arguments are checked completely before a command has any effect, as QEMU's QAPI visitors do:
members in schema order (``Parameter 'x' is missing``, ``Invalid parameter type for 'x',
expected: T``, ``Parameter 'x' does not accept value 'v'``), then whatever is left over
(``Parameter 'x' is unexpected``). ``blockdev-add`` and ``blockdev-reopen`` check the
``BlockdevOptions`` union (base members, then the driver's members, children recursively) and
then hand the flattened options to the graph.

One :class:`QMPMonitor` serves every QMP session of a process: it holds what QEMU's monitor
holds (which nodes the monitor owns) and broadcasts events to the sessions.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from blockgraph.errors import BlockError, DeviceNotFound, IOFailure
from blockgraph.graph.create import create_image, create_line
from blockgraph.graph.layer import BlockLayer
from blockgraph.graph.node import BlockBackend, Node
from blockgraph.graph.reopen import reopen_many
from blockgraph.graph.snapshot import external_snapshot
from blockgraph.jobs.job import JobManager
from blockgraph.monitor.chardev import ChardevRegistry
from blockgraph.monitor.hmp import HMP
from blockgraph.monitor.qmp import exports, jobcmds, query
from blockgraph.monitor.qmp.encode import qdict_order
from blockgraph.monitor.qmp.protocol import version_info
from blockgraph.monitor.throttle import REQUIRED as THROTTLE_REQUIRED
from blockgraph.monitor.throttle import set_io_throttle
from blockgraph.objects import add_object
from blockgraph.objects.throttle import QMP_MEMBERS as THROTTLE_MEMBERS
from blockgraph.options.keyval import flatten

__all__ = ["QMPMonitor", "Flavour", "check_blockdev_options", "request_quit"]

Flavour = str  # "storage-daemon" or "system"

# -- QAPI-style types -------------------------------------------------------------------------


@dataclass(frozen=True)
class T:
    """A QAPI type: ``kind`` is str/bool/int/number/any/object/array/enum/ref/ref-or-null/struct."""

    kind: str
    values: tuple[str, ...] = ()  # enum values
    element: T | None = None  # array element type
    members: tuple[Member, ...] = ()  # struct members
    name: str = ""  # the type name used in "expected: ..." where QEMU names it


@dataclass(frozen=True)
class Member:
    name: str
    type: T
    optional: bool = True


STR = T("str")
BOOL = T("bool")
INT = T("int")
ANY = T("any")
OBJECT = T("object")


def enum(*values: str) -> T:
    return T("enum", values)


def array(element: T) -> T:
    return T("array", element=element)


def struct(*members: Member) -> T:
    return T("struct", members=members)


def req(name: str, type_: T) -> Member:
    return Member(name, type_, optional=False)


def opt(name: str, type_: T) -> Member:
    return Member(name, type_, optional=True)


BLOCKDEV_REF = T("ref", name="BlockdevRef")
BLOCKDEV_REF_OR_NULL = T("ref-or-null", name="BlockdevRefOrNull")
BLOCKDEV_OPTIONS = T("blockdev", name="BlockdevOptions")

# BlockdevDriver of QEMU 7.2.
DRIVERS = ("blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress",
           "copy-before-write", "copy-on-read", "dmg", "file", "snapshot-access", "ftp", "ftps",
           "gluster", "host_cdrom", "host_device", "http", "https", "iscsi", "luks", "nbd",
           "nfs", "null-aio", "null-co", "nvme", "parallels", "preallocate", "qcow", "qcow2",
           "qed", "quorum", "raw", "rbd", "replication", "ssh", "throttle", "vdi", "vhdx",
           "vmdk", "vpc", "vvfat")

_BASE_MEMBERS = (
    req("driver", enum(*DRIVERS)),
    opt("node-name", STR),
    opt("discard", enum("ignore", "unmap")),
    opt("cache", struct(opt("direct", BOOL), opt("no-flush", BOOL))),
    opt("read-only", BOOL),
    opt("auto-read-only", BOOL),
    opt("force-share", BOOL),
    opt("detect-zeroes", enum("off", "on", "unmap")),
)
_NULL_MEMBERS = (opt("size", INT), opt("latency-ns", INT), opt("read-zeroes", BOOL))
_DRIVER_MEMBERS: dict[str, tuple[Member, ...]] = {
    "file": (req("filename", STR), opt("pr-manager", STR), opt("locking", enum("off", "on", "auto")),
             opt("aio", enum("threads", "native", "io_uring")), opt("aio-max-batch", INT),
             opt("drop-cache", BOOL), opt("x-check-cache-dropped", BOOL)),
    "qcow2": (req("file", BLOCKDEV_REF), opt("backing", BLOCKDEV_REF_OR_NULL),
              opt("lazy-refcounts", BOOL), opt("pass-discard-request", BOOL),
              opt("pass-discard-snapshot", BOOL), opt("pass-discard-other", BOOL),
              opt("overlap-check", ANY), opt("cache-size", INT), opt("l2-cache-size", INT),
              opt("l2-cache-entry-size", INT), opt("refcount-cache-size", INT),
              opt("cache-clean-interval", INT), opt("encrypt", OBJECT),
              opt("data-file", BLOCKDEV_REF)),
    "raw": (req("file", BLOCKDEV_REF), opt("offset", INT), opt("size", INT)),
    "null-co": _NULL_MEMBERS,
    "null-aio": _NULL_MEMBERS,
    "blkdebug": (req("image", BLOCKDEV_REF), opt("config", STR), opt("align", INT),
                 opt("max-transfer", INT), opt("opt-write-zero", INT), opt("max-write-zero", INT),
                 opt("opt-discard", INT), opt("max-discard", INT),
                 opt("inject-error", array(OBJECT)), opt("set-state", array(OBJECT)),
                 opt("take-child-perms", array(STR)), opt("unshare-child-perms", array(STR))),
    "throttle": (req("throttle-group", STR), req("file", BLOCKDEV_REF)),
}

_EXPECTED = {"str": "string", "bool": "boolean", "int": "integer", "number": "number",
             "object": "object", "array": "array", "enum": "string", "struct": "object"}


def _path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _invalid(path: str, expected: str) -> BlockError:
    return BlockError(f"Invalid parameter type for '{path}', expected: {expected}")


def _check_value(type_: T, value: object, path: str) -> None:
    kind = type_.kind
    if kind == "any":
        return
    if kind == "str":
        ok = isinstance(value, str)
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif kind == "object":
        ok = isinstance(value, dict)
    elif kind == "enum":
        if not isinstance(value, str):
            raise _invalid(path, "string")
        if value not in type_.values:
            raise BlockError(f"Parameter '{path}' does not accept value '{value}'")
        return
    elif kind == "array":
        if not isinstance(value, list):
            raise _invalid(path, "array")
        assert type_.element is not None
        for index, element in enumerate(value):
            _check_value(type_.element, element, f"{path}[{index}]")
        return
    elif kind == "struct":
        if not isinstance(value, dict):
            raise _invalid(path, "object")
        check_members(type_.members, value, path)
        return
    elif kind in ("ref", "ref-or-null"):
        if isinstance(value, dict):
            check_blockdev_options(value, path)
            return
        ok = isinstance(value, str) or (kind == "ref-or-null" and value is None)
        if not ok:
            # QEMU's visitor names a mistyped alternate by its member name alone, not its path.
            raise _invalid(path.rsplit(".", 1)[-1], type_.name)
        return
    elif kind == "blockdev":
        if not isinstance(value, dict):
            raise _invalid(path, "object")
        check_blockdev_options(value, path)
        return
    else:  # pragma: no cover - a table error
        raise AssertionError(kind)
    if not ok:
        raise _invalid(path, _EXPECTED[kind])


def check_members(members: Sequence[Member], given: Mapping[str, object], prefix: str = "",
                  *, leftovers: bool = True) -> None:
    """Check ``given`` against ``members`` as a QAPI input visitor does.

    :raise BlockError: the first problem, in QEMU's words.
    """
    for member in members:
        path = _path(prefix, member.name)
        if member.name not in given:
            if not member.optional:
                raise BlockError(f"Parameter '{path}' is missing")
            continue
        _check_value(member.type, given[member.name], path)
    if leftovers:
        known = {m.name for m in members}
        for key in qdict_order(given.keys()):
            if key not in known:
                raise BlockError(f"Parameter '{_path(prefix, key)}' is unexpected")


def check_blockdev_options(options: Mapping[str, object], prefix: str = "") -> None:
    """Check one ``BlockdevOptions`` (the base, then the driver's members, children nested)."""
    check_members(_BASE_MEMBERS, options, prefix, leftovers=False)
    driver = options["driver"]
    assert isinstance(driver, str)
    variant = _DRIVER_MEMBERS.get(driver)
    if variant is None:
        return  # a driver QEMU knows and we don't: the graph reports it
    check_members(variant, options, prefix, leftovers=False)
    known = {m.name for m in _BASE_MEMBERS} | {m.name for m in variant}
    for key in qdict_order(options.keys()):
        if key not in known:
            raise BlockError(f"Parameter '{_path(prefix, key)}' is unexpected")


# -- the command table -------------------------------------------------------------------------

Handler = Callable[["QMPMonitor", dict[str, Any]], Awaitable[object]]


@dataclass(frozen=True)
class CommandSpec:
    name: str
    members: tuple[Member, ...]
    handler: Handler
    boxed: T | None = None  # the whole arguments object is this type (blockdev-add)
    flavours: tuple[str, ...] = ("storage-daemon", "system")


@dataclass
class QMPMonitor:
    """The QMP side of one process: its command table, its monitor-owned nodes, its events.

    :param layer: the graph the commands act on.
    :param flavour: ``storage-daemon`` (qemu-storage-daemon's command set: no
        ``human-monitor-command``... except ours, see below) or ``system``.
    :param output: where lines a command prints go (``Formatting ...`` of created images).
    :param on_quit: called when ``quit`` has been accepted.
    """

    layer: BlockLayer
    flavour: Flavour = "storage-daemon"
    output: Callable[[str], None] = lambda line: None
    on_quit: Callable[[], None] = lambda: None
    owned: set[str] = field(default_factory=set)
    chardevs: ChardevRegistry = field(default_factory=ChardevRegistry)
    listeners: list[Callable[[str, dict[str, object] | None], None]] = field(default_factory=list)
    quitting: bool = False
    jobs: JobManager = field(init=False)

    def __post_init__(self) -> None:
        self.jobs = JobManager(self.emit)
        # The graph's events (write threshold, I/O errors) reach every session.
        self.layer.event_listeners.append(lambda name, data: self.emit(name, data or None))

    # -- table ------------------------------------------------------------------------------

    def commands(self) -> list[CommandSpec]:
        return [spec for spec in COMMANDS if self.flavour in spec.flavours]

    def command_names(self) -> list[str]:
        return [spec.name for spec in self.commands()]

    def find(self, name: str) -> CommandSpec | None:
        return next((spec for spec in self.commands() if spec.name == name), None)

    # -- events -----------------------------------------------------------------------------

    def emit(self, name: str, data: dict[str, object] | None = None) -> None:
        """Send event ``name`` to every session in command mode."""
        for listener in list(self.listeners):
            listener(name, data)

    # -- execution --------------------------------------------------------------------------

    async def execute(self, name: str, arguments: dict[str, object]) -> object:
        """Check the arguments, then run the command.

        :return: the ``return`` value.
        :raise BlockError: with the QMP class and QEMU's message.
        """
        spec = self.find(name)
        if spec is None:
            raise BlockError(f"The command {name} has not been found", "CommandNotFound")
        if spec.boxed is not None:
            _check_value(spec.boxed, arguments, "")
        else:
            check_members(spec.members, arguments)
        try:
            return await spec.handler(self, dict(arguments))
        except IOFailure as exc:
            raise BlockError(str(exc)) from exc

    # -- helpers ----------------------------------------------------------------------------

    def lookup_bs(self, device: str | None, node_name: str | None) -> Node:
        """QEMU's ``bdrv_lookup_bs``: a BlockBackend's medium by name, else a node by name."""
        if device is not None:
            bb = self.layer.find_backend(device)
            if bb is not None:
                if bb.root is None:
                    raise BlockError(f"Device '{device}' has no medium")
                return bb.root
        if node_name is not None:
            node = self.layer.find_node(node_name)
            if node is not None:
                return node
        raise BlockError(f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'")

    def named_backends(self) -> list[BlockBackend]:
        return [bb for bb in self.layer.backends if bb.name]


# -- handlers ----------------------------------------------------------------------------------


async def _qmp_capabilities(mon: QMPMonitor, args: dict[str, Any]) -> object:
    # Reached only through the protocol core, which answers it itself.
    raise BlockError("Capabilities negotiation is already complete, command ignored",
                     "CommandNotFound")


async def _query_version(mon: QMPMonitor, args: dict[str, Any]) -> object:
    return version_info()


async def _query_commands(mon: QMPMonitor, args: dict[str, Any]) -> object:
    return [{"name": name} for name in mon.command_names()]


async def _object_add(mon: QMPMonitor, args: dict[str, Any]) -> object:
    add_object(mon.layer.objects, args, keyval=False)
    return {}


async def _object_del(mon: QMPMonitor, args: dict[str, Any]) -> object:
    ident = str(args["id"])
    if mon.layer.objects.get(ident) is None:
        raise BlockError(f"object '{ident}' not found")
    # Users keep what they hold (an NBD server keeps its credentials), as in QEMU.
    mon.layer.objects.remove(ident)
    return {}


def request_quit(mon: QMPMonitor) -> None:
    """``quit`` from QMP or HMP: the system emulator announces its shutdown first."""
    if mon.flavour == "system":
        mon.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
    mon.jobs.shutdown()
    mon.quitting = True
    mon.on_quit()


async def _quit(mon: QMPMonitor, args: dict[str, Any]) -> object:
    request_quit(mon)
    return {}


async def _query_status(mon: QMPMonitor, args: dict[str, Any]) -> object:
    # StatusInfo in schema order.
    return {"running": mon.layer.vm_running, "singlestep": False, "status": mon.layer.run_state}


async def _stop(mon: QMPMonitor, args: dict[str, Any]) -> object:
    mon.layer.vm_stop("paused")
    return {}


async def _cont(mon: QMPMonitor, args: dict[str, Any]) -> object:
    mon.layer.vm_resume()
    return {}


async def _query_chardev(mon: QMPMonitor, args: dict[str, Any]) -> object:
    return mon.chardevs.query()


async def _blockdev_add(mon: QMPMonitor, args: dict[str, Any]) -> object:
    if not isinstance(args.get("node-name"), str):
        raise BlockError("'node-name' must be specified for the root node")
    try:
        node = await mon.layer.open_node(None, flatten(args))
    except DeviceNotFound as exc:
        # A child referenced by a name that names nothing: bdrv_lookup_bs's GenericError.
        raise BlockError(exc.desc) from exc
    mon.owned.add(node.node_name)
    return {}


async def _blockdev_del(mon: QMPMonitor, args: dict[str, Any]) -> object:
    name = str(args["node-name"])
    node = mon.layer.find_node(name)
    if node is None:
        raise BlockError(f"Failed to find node with node-name='{name}'")
    if node.backends:
        raise BlockError(f"Node {name} is in use")
    backing_of = next((c.parent for c in node.parents if c.name == "backing"), None)
    if backing_of is not None:
        raise BlockError(f"Node '{name}' is busy: node is used as backing hd of "
                         f"'{backing_of.node_name}'")
    if name not in mon.owned:
        raise BlockError(f"Node {name} is not owned by the monitor")
    if node.parents:
        raise BlockError(f"Block device {name} is in use")
    # The monitor holds a reference to every node it added, so deleting a parent must not
    # close a monitor-owned child: hold those through anonymous BlockBackends meanwhile.
    holders: list[BlockBackend] = []
    for owned in mon.owned:
        child = mon.layer.find_node(owned)
        if child is not None and child is not node and not child.backends:
            holder = BlockBackend(mon.layer, "")
            holder.attach(child)
            holders.append(holder)
    try:
        await mon.layer.delete_node(node)
    finally:
        for holder in holders:
            holder.attach(None)
    mon.owned.discard(name)
    return {}


def _reopen_options(options: dict[str, Any]) -> dict[str, object]:
    """The flat options for the graph's reopen; children named by reference stay strings."""
    given = dict(options)
    given.pop("node-name", None)
    return flatten(given)


async def _blockdev_reopen(mon: QMPMonitor, args: dict[str, Any]) -> object:
    plan: list[tuple[Node, dict[str, object], bool]] = []
    for options in args["options"]:
        name = options.get("node-name")
        if not isinstance(name, str):
            raise BlockError("node-name not specified")
        node = mon.layer.find_node(name)
        if node is None:
            raise BlockError(f"Failed to find node with node-name='{name}'")
        if node.backing is not None and "backing" not in options:
            raise BlockError(f"backing is missing for '{name}'")
        plan.append((node, _reopen_options(options), False))
    # One transaction: omitted options go back to their defaults (QEMU's keep_old_opts=false).
    orphans = await reopen_many(plan)
    for orphan in orphans:
        # A replaced child that nothing holds any more goes, unless the monitor added it.
        if orphan.node_name not in mon.owned and not orphan.parents and not orphan.backends:
            await mon.layer.delete_node(orphan)
    return {}


async def _query_block(mon: QMPMonitor, args: dict[str, Any]) -> object:
    return [query.block_info(bb) for bb in mon.named_backends()]


async def _query_named_block_nodes(mon: QMPMonitor, args: dict[str, Any]) -> object:
    return query.named_block_nodes(mon.layer, flat=bool(args.get("flat", False)))


async def _query_blockstats(mon: QMPMonitor, args: dict[str, Any]) -> object:
    return query.blockstats(mon.layer, query_nodes=bool(args.get("query-nodes", False)))


async def _query_block_jobs(mon: QMPMonitor, args: dict[str, Any]) -> object:
    return []


async def _block_resize(mon: QMPMonitor, args: dict[str, Any]) -> object:
    node = mon.lookup_bs(args.get("device"), args.get("node-name"))
    size = int(args["size"])
    if size < 0:
        raise BlockError("Parameter 'size' expects a >0 size")
    if node.flags.read_only:
        raise BlockError("Block node is read-only")
    await node.truncate(size)
    return {}


async def _block_set_io_throttle(mon: QMPMonitor, args: dict[str, Any]) -> object:
    values = {k: int(v) for k, v in args.items() if k in THROTTLE_MEMBERS}
    set_io_throttle(mon.layer, args.get("device"), args.get("id"), values, args.get("group"))
    return {}


async def _human_monitor_command(mon: QMPMonitor, args: dict[str, Any]) -> object:
    text = await HMP(mon.layer, lambda: request_quit(mon), mon.chardevs).execute(
        str(args["command-line"]))
    return text.replace("\n", "\r\n")


async def _blockdev_snapshot_sync(mon: QMPMonitor, args: dict[str, Any]) -> object:
    old_top = mon.lookup_bs(args.get("device"), args.get("node-name"))
    filename = str(args["snapshot-file"])
    new_name = args.get("snapshot-node-name")
    fmt = str(args.get("format", "qcow2"))
    existing = args.get("mode", "absolute-paths") == "existing"
    if new_name is not None and (mon.layer.find_node(new_name) is not None
                                 or mon.layer.find_backend(new_name) is not None):
        raise BlockError("New overlay node-name already in use")
    if old_top.backends:
        await external_snapshot(mon.layer, old_top.backends[0], filename, fmt, existing=existing,
                                overlay_node_name=new_name, report=mon.output)
        return {}
    if old_top.parents:
        raise BlockError("blockdev-snapshot-sync below a parent node is not supported yet")
    # Nothing holds the node: QEMU creates the overlay, and drops it again at once.
    if not existing:
        options: dict[str, object] = {"backing_file": old_top.filename,
                                      "backing_fmt": old_top.driver_name}
        mon.output(create_line(filename, fmt, old_top.getlength(), options))
        await create_image(mon.layer, filename, fmt, old_top.getlength(), options)
    elif not os.path.exists(filename):
        raise BlockError(f"Could not open '{filename}': No such file or directory")
    return {}


_BLOCKDEV_ARRAY = array(BLOCKDEV_OPTIONS)

# In the order qemu-storage-daemon 7.2 lists them (query-commands).
COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec("human-monitor-command", (req("command-line", STR), opt("cpu-index", INT)),
                _human_monitor_command),
    CommandSpec("object-del", (req("id", STR),), _object_del),
    CommandSpec("object-add", (), _object_add, boxed=ANY),
    CommandSpec("quit", (), _quit),
    CommandSpec("query-commands", (), _query_commands),
    CommandSpec("query-version", (), _query_version),
    CommandSpec("qmp_capabilities", (opt("enable", array(enum("oob"))),), _qmp_capabilities),
    CommandSpec("query-block-exports", (), exports.query_block_exports),
    CommandSpec("block-export-del", (req("id", STR), opt("mode", enum("safe", "hard"))),
                exports.block_export_del),
    CommandSpec("block-export-add", (), exports.block_export_add, boxed=ANY),
    CommandSpec("nbd-server-stop", (), exports.nbd_server_stop),
    CommandSpec("nbd-server-remove", (req("name", STR), opt("mode", enum("safe", "hard"))),
                exports.nbd_server_remove),
    CommandSpec("nbd-server-add",
                (opt("name", STR), opt("description", STR), req("device", STR),
                 opt("writable", BOOL), opt("bitmap", STR)),
                exports.nbd_server_add),
    CommandSpec("nbd-server-start", (), exports.nbd_server_start, boxed=ANY),
    CommandSpec("query-jobs", (), jobcmds.query_jobs),
    CommandSpec("job-finalize", (req("id", STR),), jobcmds.job_finalize),
    CommandSpec("job-dismiss", (req("id", STR),), jobcmds.job_dismiss),
    CommandSpec("job-complete", (req("id", STR),), jobcmds.job_complete),
    CommandSpec("job-cancel", (req("id", STR),), jobcmds.job_cancel),
    CommandSpec("job-resume", (req("id", STR),), jobcmds.job_resume),
    CommandSpec("job-pause", (req("id", STR),), jobcmds.job_pause),
    CommandSpec("block-set-write-threshold", (req("node-name", STR), req("write-threshold", INT)),
                jobcmds.block_set_write_threshold),
    CommandSpec("blockdev-create", (req("job-id", STR), req("options", OBJECT)),
                jobcmds.blockdev_create),
    CommandSpec("blockdev-del", (req("node-name", STR),), _blockdev_del),
    CommandSpec("blockdev-reopen", (req("options", _BLOCKDEV_ARRAY),), _blockdev_reopen),
    CommandSpec("blockdev-add", (), _blockdev_add, boxed=BLOCKDEV_OPTIONS),
    CommandSpec("query-named-block-nodes", (opt("flat", BOOL),), _query_named_block_nodes),
    CommandSpec("blockdev-snapshot-sync",
                (opt("device", STR), opt("node-name", STR), req("snapshot-file", STR),
                 opt("snapshot-node-name", STR), opt("format", STR),
                 opt("mode", enum("existing", "absolute-paths"))),
                _blockdev_snapshot_sync),
    CommandSpec("block_set_io_throttle",
                (opt("device", STR), opt("id", STR),
                 *(req(m, INT) if m in THROTTLE_REQUIRED else opt(m, INT) for m in THROTTLE_MEMBERS),
                 opt("group", STR)),
                _block_set_io_throttle),
    CommandSpec("block_resize", (opt("device", STR), opt("node-name", STR), req("size", INT)),
                _block_resize),
    CommandSpec("query-block-jobs", (), _query_block_jobs),
    CommandSpec("query-blockstats", (opt("query-nodes", BOOL),), _query_blockstats),
    CommandSpec("query-block", (), _query_block),
    CommandSpec("query-chardev", (), _query_chardev),
    # Not in qemu-storage-daemon 7.2 (it has no VM to stop), but our storage daemon's --drive
    # exports can stop on an I/O error and need them.
    CommandSpec("query-status", (), _query_status),
    CommandSpec("stop", (), _stop),
    CommandSpec("cont", (), _cont),
)
