"""The QAPI shapes of the block queries: ``BlockDeviceInfo``, ``ImageInfo``, ``BlockInfo``,
``BlockStats``, built from graph objects.

Dictionaries are built in QAPI schema order (QEMU's insertion order); the encoder puts them in
QEMU's output order. Optional members are left out exactly where QEMU leaves them out.
"""

from __future__ import annotations

from blockgraph.drivers.base import ChildRole, SnapshotInfo
from blockgraph.graph.layer import BlockLayer
from blockgraph.graph.node import BlockBackend, Node
from blockgraph.graph.query import ImageInfo, image_info
from blockgraph.objects.throttle import QMP_MEMBERS

# ImageInfoSpecificQCow2 members in schema order.
_QCOW2_SPECIFIC_ORDER = ("compat", "data-file", "data-file-raw", "extended-l2", "lazy-refcounts",
                         "corrupt", "refcount-bits", "encrypt", "bitmaps", "compression-type")
# query-block's throttling members: the averages always, the rest when set.
_THROTTLE_BASE = tuple(QMP_MEMBERS)[:6]
_THROTTLE_EXTRA = tuple(QMP_MEMBERS)[6:]


def _snapshot(sn: SnapshotInfo) -> dict[str, object]:
    secs, nsec = divmod(sn.vm_clock_nsec, 1_000_000_000)
    out: dict[str, object] = {"id": sn.id_str, "name": sn.name, "vm-state-size": sn.vm_state_size,
                              "date-sec": sn.date_sec, "date-nsec": sn.date_nsec,
                              "vm-clock-sec": secs, "vm-clock-nsec": nsec}
    if sn.icount >= 0:
        out["icount"] = sn.icount
    return out


def _image(info: ImageInfo) -> dict[str, object]:
    out: dict[str, object] = {
        "filename": info.filename,
        "format": info.format,
        "dirty-flag": info.dirty_flag,
    }
    if info.actual_size is not None:
        out["actual-size"] = info.actual_size
    out["virtual-size"] = info.virtual_size
    if info.cluster_size:
        out["cluster-size"] = info.cluster_size
    if info.encrypted:
        out["encrypted"] = True
    if info.backing_filename:
        out["backing-filename"] = info.backing_filename
        if info.full_backing_filename:
            out["full-backing-filename"] = info.full_backing_filename
        if info.backing_filename_format:
            out["backing-filename-format"] = info.backing_filename_format
    if info.snapshots:
        out["snapshots"] = [_snapshot(sn) for sn in info.snapshots]
    if info.backing_image is not None:
        out["backing-image"] = _image(info.backing_image)
    if info.format_specific and info.format == "qcow2":
        data = {k: info.format_specific[k] for k in _QCOW2_SPECIFIC_ORDER
                if k in info.format_specific}
        out["format-specific"] = {"type": "qcow2", "data": data}
    return out


def _backing_file(node: Node) -> str | None:
    # Only an attached backing node counts: with ``backing: null`` (at open or by a reopen)
    # QEMU reports none, whatever the header names.
    return node.backing.filename if node.backing is not None else None


def block_device_info(node: Node, backend: BlockBackend | None = None, *,
                      flat: bool = False) -> dict[str, object]:
    """``BlockDeviceInfo`` of ``node``; with ``backend``, as the medium of that BlockBackend.

    Without ``flat`` the image info nests the backing chain (``backing-image``) and
    ``backing_file_depth`` counts it; with ``flat`` both stop at the node itself.
    """
    throttled = backend.io_limits.group if backend is not None and backend.io_limits else None
    limits = throttled.limits.query() if throttled is not None else {}
    out: dict[str, object] = {
        "file": node.filename,
        "node-name": node.node_name,
        "ro": node.flags.read_only,
        "drv": node.driver_name,
    }
    backing_file = _backing_file(node)
    if backing_file:
        out["backing_file"] = backing_file
    out["backing_file_depth"] = 0 if flat else node.backing_chain_depth()
    out["encrypted"] = node.driver.info().encrypted
    out["detect_zeroes"] = str(node.options.get("detect-zeroes", "off"))
    for key in _THROTTLE_BASE:
        out[key] = int(limits.get(key, 0))
    out["image"] = _image(image_info(node, chain=not flat))
    if throttled is not None:
        # Bursts, their lengths and the iops size appear only when set, as in QEMU.
        for key in _THROTTLE_EXTRA:
            if key in limits:
                out[key] = limits[key]
        out["group"] = throttled.name
    out["cache"] = {
        "writeback": backend.write_cache if backend is not None else True,
        "direct": node.flags.direct,
        "no-flush": node.flags.no_flush,
    }
    out["write_threshold"] = node.write_threshold
    return out


def named_block_nodes(layer: BlockLayer, *, flat: bool = False) -> list[dict[str, object]]:
    """``query-named-block-nodes``: every node, newest first (as QEMU lists them)."""
    return [block_device_info(node, flat=flat) for node in reversed(layer.nodes)]


def block_info(backend: BlockBackend) -> dict[str, object]:
    """``BlockInfo`` of one named BlockBackend without a guest device (``-drive if=none``)."""
    out: dict[str, object] = {
        "device": backend.name,
        "type": "unknown",
        "removable": backend.removable,
        "locked": backend.locked,
    }
    if backend.root is not None:
        out["inserted"] = block_device_info(backend.root, backend)
    if backend.iostatus_enabled:
        out["io-status"] = backend.iostatus
    return out


def _device_stats(*, rd_bytes: int = 0, wr_bytes: int = 0, rd_operations: int = 0,
                  wr_operations: int = 0, flush_operations: int = 0,
                  failed_rd_operations: int = 0, failed_wr_operations: int = 0,
                  accounted: bool = False) -> dict[str, object]:
    return {
        "rd_bytes": rd_bytes, "wr_bytes": wr_bytes, "unmap_bytes": 0,
        "rd_operations": rd_operations, "wr_operations": wr_operations,
        "flush_operations": flush_operations, "unmap_operations": 0,
        "rd_merged": 0, "wr_merged": 0, "unmap_merged": 0, "wr_highest_offset": 0,
        "rd_total_time_ns": 0, "wr_total_time_ns": 0, "flush_total_time_ns": 0,
        "unmap_total_time_ns": 0,
        "failed_rd_operations": failed_rd_operations,
        "failed_wr_operations": failed_wr_operations,
        "failed_flush_operations": 0, "failed_unmap_operations": 0,
        "invalid_rd_operations": 0, "invalid_wr_operations": 0, "invalid_flush_operations": 0,
        "invalid_unmap_operations": 0,
        "account_invalid": accounted, "account_failed": accounted,
        "timed_stats": [],
    }


def _data_child(node: Node) -> Node | None:
    """The primary child if it holds data (or is filtered), else the one child holding data."""
    primary = next((c for c in node.children if c.role & ChildRole.PRIMARY), None)
    if primary is not None and primary.role & (ChildRole.DATA | ChildRole.FILTERED):
        return primary.node
    holders = [c.node for c in node.children if c.role & ChildRole.DATA]
    return holders[0] if len(holders) == 1 else None


def _node_stats(node: Node, backend: BlockBackend | None) -> dict[str, object]:
    out: dict[str, object] = {}
    if backend is not None:
        out["device"] = backend.name
    out["node-name"] = node.node_name
    if backend is not None:
        s = backend.stats
        out["stats"] = _device_stats(
            rd_bytes=s.rd_bytes, wr_bytes=s.wr_bytes, rd_operations=s.rd_operations,
            wr_operations=s.wr_operations, flush_operations=s.flush_operations,
            failed_rd_operations=s.failed_rd_operations,
            failed_wr_operations=s.failed_wr_operations, accounted=True)
    else:
        out["stats"] = _device_stats()
    child = _data_child(node)
    if child is not None:
        out["parent"] = _node_stats(child, None)
    if backend is not None and node.backing is not None:
        out["backing"] = _node_stats(node.backing, None)
    if node.driver_name == "file":
        out["driver-specific"] = {"driver": "file", "discard-nb-ok": 0, "discard-nb-failed": 0,
                                  "discard-bytes-ok": 0}
    return out


def blockstats(layer: BlockLayer, *, query_nodes: bool = False) -> list[dict[str, object]]:
    """``query-blockstats``: per named BlockBackend, or (``query-nodes``) per node, oldest first."""
    if query_nodes:
        return [_node_stats(node, None) for node in layer.nodes]
    out: list[dict[str, object]] = []
    for backend in layer.backends:
        if not backend.name:
            continue
        if backend.root is None:
            out.append({"device": backend.name, "stats": _device_stats(accounted=True)})
        else:
            out.append(_node_stats(backend.root, backend))
    return out
