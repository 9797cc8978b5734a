"""NBD server and block exports: qemu-storage-daemon 7.2's QMP commands and command-line options.

``nbd-server-start``/``-stop``, ``block-export-add``/``-del``, ``query-block-exports`` and the
legacy ``nbd-server-add``/``-remove`` act on one :class:`ExportState` per monitor: at most one
NBD server, and the exports in creation order. Every export does its I/O through a BlockBackend
of its own (writeback unless ``writethrough``). Checks run in QEMU's order with QEMU's texts.

``--nbd-server`` and ``--export`` (keyval or JSON) go through the same code: their keyval
strings are first turned into typed values, as QEMU's keyval input visitor does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from blockgraph.errors import BlockError
from blockgraph.export.nbd.protocol import MAX_STRING_SIZE
from blockgraph.export.nbd.server import NBDExport, NBDServer, inet_listener, unix_listener
from blockgraph.export.nbd.status import find_bitmap
from blockgraph.graph.node import BlockBackend, Node
from blockgraph.options.schema import parse_bool, parse_int

if TYPE_CHECKING:
    from blockgraph.monitor.qmp.commands import Member, QMPMonitor

__all__ = [
    "ExportState", "state", "nbd_server_start", "nbd_server_stop", "block_export_add",
    "block_export_del", "query_block_exports", "nbd_server_add", "nbd_server_remove",
    "cli_nbd_server", "cli_export", "shutdown",
]

_UINT32_MAX = (1 << 32) - 1
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")


@dataclass
class BlockExport:
    id: str
    node: Node
    nbd: NBDExport
    shutting_down: bool = False


@dataclass
class ExportState:
    server: NBDServer | None = None
    exports: list[BlockExport] = field(default_factory=list)  # creation order
    pending: set[asyncio.Task[None]] = field(default_factory=set)

    def find(self, ident: str) -> BlockExport | None:
        return next((e for e in self.exports if e.id == ident), None)


_STATES: dict[int, ExportState] = {}


def state(mon: QMPMonitor) -> ExportState:
    """The export state of ``mon`` (created on first use, dropped with the monitor)."""
    key = id(mon)
    found = _STATES.get(key)
    if found is None:
        found = _STATES[key] = ExportState()
        weakref.finalize(mon, _STATES.pop, key, None)
    return found


# -- argument checking -------------------------------------------------------------------------


def _members() -> dict[str, tuple[Member, ...]]:
    from blockgraph.monitor.qmp.commands import BOOL, INT, STR, opt, req

    return {
        "inet": (req("host", STR), req("port", STR), opt("numeric", BOOL), opt("to", INT),
                 opt("ipv4", BOOL), opt("ipv6", BOOL), opt("keep-alive", BOOL),
                 opt("mptcp", BOOL)),
        "unix": (req("path", STR), opt("abstract", BOOL), opt("tight", BOOL)),
        "vsock": (req("cid", STR), req("port", STR)),
        "fd": (req("str", STR),),
    }


def _check(members: tuple[Member, ...], given: Mapping[str, object], prefix: str = "",
           leftovers: bool = True) -> None:
    from blockgraph.monitor.qmp.commands import check_members

    check_members(members, given, prefix, leftovers=leftovers)


def _leftovers(known: set[str], given: Mapping[str, object], prefix: str = "") -> None:
    from blockgraph.monitor.qmp.encode import qdict_order

    for key in qdict_order(given.keys()):
        if key not in known:
            path = f"{prefix}.{key}" if prefix else key
            raise BlockError(f"Parameter '{path}' is unexpected")


def _check_addr(addr: Mapping[str, object], prefix: str, legacy: bool) -> tuple[str, dict[str, Any]]:
    """Check a SocketAddress (flat) or SocketAddressLegacy (``data`` wrapped)."""
    from blockgraph.monitor.qmp.commands import OBJECT, STR, req

    variants = _members()
    _check((req("type", STR),), addr, prefix, leftovers=False)
    kind = str(addr["type"])
    if kind not in variants:
        # QEMU names a union discriminator without its path here.
        raise BlockError(f"Parameter 'type' does not accept value '{kind}'")
    if legacy:
        _check((req("data", OBJECT),), addr, prefix, leftovers=False)
        _leftovers({"type", "data"}, addr, prefix)
        data = addr["data"]
        assert isinstance(data, dict)
        _check(variants[kind], data, f"{prefix}.data")
        return kind, dict(data)
    _check(variants[kind], addr, prefix, leftovers=False)
    _leftovers({"type"} | {m.name for m in variants[kind]}, addr, prefix)
    return kind, {k: v for k, v in addr.items() if k != "type"}


def _check_uint32(args: Mapping[str, object], name: str) -> None:
    value = args.get(name)
    if isinstance(value, int) and not 0 <= value <= _UINT32_MAX:
        raise BlockError(f"Parameter '{name}' expects uint32_t")


def _server_args(args: Mapping[str, object], legacy: bool) -> tuple[str, dict[str, Any]]:
    from blockgraph.monitor.qmp.commands import INT, OBJECT, STR, opt, req

    _check((req("addr", OBJECT),), args, leftovers=False)
    addr = args["addr"]
    assert isinstance(addr, dict)
    kind, data = _check_addr(addr, "addr", legacy)
    rest = (opt("tls-creds", STR), opt("tls-authz", STR), opt("max-connections", INT))
    _check(rest, args, leftovers=False)
    _check_uint32(args, "max-connections")
    _leftovers({"addr"} | {m.name for m in rest}, args)
    return kind, data


def _export_members() -> tuple[tuple[Member, ...], dict[str, tuple[Member, ...]]]:
    from blockgraph.monitor.qmp.commands import ANY, BOOL, INT, OBJECT, STR, array, enum, opt, req

    base = (req("type", enum("nbd", "vhost-user-blk", "fuse", "vduse-blk")), req("id", STR),
            opt("fixed-iothread", BOOL), opt("iothread", STR), req("node-name", STR),
            opt("writable", BOOL), opt("writethrough", BOOL))
    variants = {
        "nbd": (opt("name", STR), opt("description", STR), opt("bitmaps", array(ANY)),
                opt("allocation-depth", BOOL)),
        "vhost-user-blk": (req("addr", OBJECT), opt("logical-block-size", INT),
                           opt("num-queues", INT)),
        "fuse": (req("mountpoint", STR), opt("growable", BOOL), opt("allow-other", STR)),
        "vduse-blk": (req("name", STR), opt("num-queues", INT), opt("queue-size", INT),
                      opt("logical-block-size", INT), opt("serial", STR)),
    }
    return base, variants


def _check_export(args: Mapping[str, object]) -> None:
    base, variants = _export_members()
    _check(base, args, leftovers=False)
    variant = variants[str(args["type"])]
    _check(variant, args, leftovers=False)
    _leftovers({m.name for m in base} | {m.name for m in variant}, args)


# -- the server --------------------------------------------------------------------------------


def _listen(kind: str, data: Mapping[str, Any], from_cli: bool) -> socket.socket:
    if kind == "unix":
        path = str(data["path"])
        try:
            return unix_listener(path)
        except OSError as exc:
            raise BlockError(f"Failed to bind socket to {path}: {os.strerror(exc.errno or 0)}") from None
    if kind == "inet":
        return inet_listener(str(data["host"]), str(data["port"]))
    if kind == "fd":
        if not from_cli:
            raise BlockError("only QEMU supports file descriptor passing")
        text = str(data["str"])
        if not text.isdigit():
            raise BlockError(f"Invalid file descriptor number '{text}'")
        try:
            return socket.socket(fileno=int(text))
        except OSError as exc:
            raise BlockError(f"Failed to use socket fd {text}: {os.strerror(exc.errno or 0)}") from None
    raise BlockError("vsock addresses are not supported by blockgraph")


async def _start(mon: QMPMonitor, kind: str, data: Mapping[str, Any], args: Mapping[str, object],
                 from_cli: bool) -> None:
    st = state(mon)
    if st.server is not None:
        raise BlockError("NBD server already running")
    sock = _listen(kind, data, from_cli)
    creds_id = args.get("tls-creds")
    creds = None
    if creds_id is not None:
        try:
            creds = mon.layer.objects.tls_creds(str(creds_id), "server")
        except BlockError:
            sock.close()
            raise
    max_connections = args.get("max-connections", 0)
    assert isinstance(max_connections, int)
    authz = args.get("tls-authz")
    server = NBDServer([], max_connections=max_connections, tls_creds=creds,
                       tls_authz=None if authz is None else str(authz), objects=mon.layer.objects)
    await server.listen_socket(sock)
    st.server = server


async def nbd_server_start(mon: QMPMonitor, args: dict[str, Any]) -> object:
    kind, data = _server_args(args, legacy=True)
    await _start(mon, kind, data, args, from_cli=False)
    return {}


async def nbd_server_stop(mon: QMPMonitor, args: dict[str, Any]) -> object:
    st = state(mon)
    if st.server is None:
        raise BlockError("NBD server not running")
    await _stop(mon, st)
    return {}


async def _stop(mon: QMPMonitor, st: ExportState) -> None:
    server = st.server
    if server is None:
        return
    for export in list(st.exports):
        await _remove(mon, st, export)
    st.server = None
    await server.close()


# -- exports -----------------------------------------------------------------------------------


def _drive(mon: QMPMonitor, name: str) -> BlockBackend | None:
    """The drive (a named BlockBackend with a medium) called ``name``, if any.

    Exporting a drive by its id makes the export that drive's device (its rerror/werror
    policy applies; a blockgraph addition: QEMU 7.2 exports only take node names).
    """
    backend = mon.layer.find_backend(name)
    return backend if backend is not None and backend.root is not None else None


async def _add(mon: QMPMonitor, args: Mapping[str, Any], node: Node | None = None,
               device: BlockBackend | None = None) -> None:
    """``blk_exp_add``: ``args`` are checked BlockExportOptions."""
    st = state(mon)
    ident = str(args["id"])
    if not _ID_RE.match(ident):
        raise BlockError("Invalid block export id")
    if st.find(ident) is not None:
        raise BlockError(f"Block export id '{ident}' is already in use")
    if node is None:
        device = _drive(mon, str(args["node-name"]))
        node = device.root if device is not None else None
    if node is None:
        node = mon.lookup_bs(None, str(args["node-name"]))
    writable = bool(args.get("writable", False))
    if writable and node.flags.read_only:
        raise BlockError("Cannot export read-only node as writable")
    if "iothread" in args:
        raise BlockError(f"iothread \"{args['iothread']}\" not found")
    kind = str(args["type"])
    if kind != "nbd":
        raise BlockError(f"Export type '{kind}' is not supported by blockgraph")
    server = st.server
    if server is None:
        raise BlockError("NBD server not running")
    name = str(args.get("name", args["node-name"]))
    if len(name.encode()) > MAX_STRING_SIZE:
        raise BlockError(f"export name '{name}' too long")
    description = str(args.get("description", ""))
    if len(description.encode()) > MAX_STRING_SIZE:
        raise BlockError(f"description '{description}' too long")
    if name in server.exports:
        raise BlockError(f"NBD server already has export named '{name}'")
    bitmaps: list[str] = []
    for item in args.get("bitmaps", []):
        if isinstance(item, dict):
            bitmap_name = str(item.get("name", ""))
            holder = mon.lookup_bs(None, str(item.get("node", "")))
        else:
            bitmap_name = str(item)
            holder = node
        bitmap = find_bitmap(holder, bitmap_name)
        if bitmap is None:
            raise BlockError(f"Bitmap '{bitmap_name}' is not found")
        if bitmap.inconsistent:
            raise BlockError(f"Bitmap '{bitmap_name}' is inconsistent and cannot be used")
        bitmaps.append(bitmap_name)
    backend = BlockBackend(mon.layer, "")
    backend.write_cache = not bool(args.get("writethrough", False))
    backend.read_only = not writable
    backend.attach(node)
    nbd = NBDExport(name, backend, description=description, read_only=not writable,
                    allocation_depth=bool(args.get("allocation-depth", False)), bitmaps=bitmaps,
                    device=device)
    if device is not None:
        # As a guest device does, the export turns on the drive's I/O status.
        device.iostatus_enabled = True
    server.exports[name] = nbd
    st.exports.append(BlockExport(ident, node, nbd))


async def _remove(mon: QMPMonitor, st: ExportState, export: BlockExport) -> None:
    """Drop ``export`` now (its clients included) and emit BLOCK_EXPORT_DELETED."""
    export.shutting_down = True
    server = st.server
    if server is not None:
        if server.exports.get(export.nbd.name) is export.nbd:
            del server.exports[export.nbd.name]
        for task in server.disconnect(export.nbd):
            with contextlib.suppress(BaseException):
                await task
    with contextlib.suppress(Exception):
        await export.nbd.backend.flush()
    export.nbd.backend.attach(None)
    device = export.nbd.device
    if device is not None and not any(e.nbd.device is device for e in st.exports
                                      if e is not export):
        device.iostatus_enabled = False
    if export in st.exports:
        st.exports.remove(export)
    mon.emit("BLOCK_EXPORT_DELETED", {"id": export.id})


async def _delete(mon: QMPMonitor, ident: str, mode: str) -> None:
    st = state(mon)
    export = st.find(ident)
    if export is None:
        raise BlockError(f"Export '{ident}' is not found")
    if export.shutting_down:
        raise BlockError(f"Export '{ident}' is already shutting down")
    in_use = st.server is not None and st.server.users(export.nbd) > 0
    if mode == "safe" and in_use:
        raise BlockError(f"export '{ident}' still in use")
    if in_use:
        # As QEMU: the command returns at once, the event follows once the clients are gone.
        export.shutting_down = True
        task = asyncio.ensure_future(_remove(mon, st, export))
        st.pending.add(task)
        task.add_done_callback(st.pending.discard)
        return
    await _remove(mon, st, export)


async def block_export_add(mon: QMPMonitor, args: dict[str, Any]) -> object:
    _check_export(args)
    await _add(mon, args)
    return {}


async def block_export_del(mon: QMPMonitor, args: dict[str, Any]) -> object:
    await _delete(mon, str(args["id"]), str(args.get("mode", "safe")))
    return {}


async def query_block_exports(mon: QMPMonitor, args: dict[str, Any]) -> object:
    return [{"type": "nbd", "id": e.id, "node-name": e.node.node_name,
             "shutting-down": e.shutting_down} for e in reversed(state(mon).exports)]


async def nbd_server_add(mon: QMPMonitor, args: dict[str, Any]) -> object:
    st = state(mon)
    if st.server is None:
        raise BlockError("NBD server not running")
    device = str(args["device"])
    node = mon.lookup_bs(device, device)
    drive = _drive(mon, device)
    name = str(args.get("name", device))
    options: dict[str, Any] = {"type": "nbd", "id": name, "node-name": node.node_name,
                               "name": name,
                               "writable": bool(args.get("writable", False))
                               and not node.flags.read_only}
    if "description" in args:
        options["description"] = args["description"]
    if "bitmap" in args:
        options["bitmaps"] = [args["bitmap"]]
    await _add(mon, options, node, drive if drive is not None and drive.root is node else None)
    return {}


async def nbd_server_remove(mon: QMPMonitor, args: dict[str, Any]) -> object:
    await _delete(mon, str(args["name"]), str(args.get("mode", "safe")))
    return {}


async def shutdown(mon: QMPMonitor) -> None:
    """End every export and the NBD server (the daemon is exiting)."""
    st = state(mon)
    for task in list(st.pending):
        with contextlib.suppress(BaseException):
            await task
    await _stop(mon, st)


# -- command line ------------------------------------------------------------------------------



def _typed(members: tuple[Member, ...], given: dict[str, object], prefix: str = "") -> None:
    """Turn keyval strings into the members' types in place (QEMU's keyval visitor texts)."""
    for member in members:
        value = given.get(member.name)
        if not isinstance(value, str):
            continue
        path = f"{prefix}.{member.name}" if prefix else member.name
        kind = member.type.kind
        if kind == "bool":
            given[member.name] = parse_bool(path, value)
        elif kind == "int":
            given[member.name] = parse_int(path, value)


def _parse_cli(text: str, implied: str | None) -> tuple[dict[str, object], bool]:
    from blockgraph.options.keyval import crumple, parse_keyval
    from blockgraph.options.qjson import parse_json

    if text.startswith("{"):
        parsed = parse_json(text)
        if not isinstance(parsed, dict):
            raise BlockError("JSON argument must be an object")
        return dict(parsed), False
    return crumple(parse_keyval(text, implied_key=implied)), True


async def cli_nbd_server(mon: QMPMonitor, text: str) -> None:
    """``--nbd-server``: NbdServerOptions (flat SocketAddress ``addr``)."""
    from blockgraph.monitor.qmp.commands import INT, opt

    args, keyval = _parse_cli(text, None)
    if keyval:
        addr = args.get("addr")
        if isinstance(addr, dict) and isinstance(addr.get("type"), str):
            variant = _members().get(str(addr["type"]))
            if variant is not None:
                _typed(variant, addr, "addr")
        _typed((opt("max-connections", INT),), args)
    kind, data = _server_args(args, legacy=False)
    await _start(mon, kind, data, args, from_cli=True)


async def cli_export(mon: QMPMonitor, text: str) -> None:
    """``--export``: BlockExportOptions, ``type`` implied."""
    args, keyval = _parse_cli(text, "type")
    if keyval:
        base, variants = _export_members()
        _typed(base, args)
        variant = variants.get(str(args.get("type")))
        if variant is not None:
            _typed(variant, args)
    _check_export(args)
    await _add(mon, args)
