"""What the graph reports about a node's image (QEMU's ``ImageInfo``).

The one place that gathers these facts, for ``qemu-img info``, HMP ``info block -v`` and the
QMP queries alike; the printing lives with each front end.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from blockgraph.drivers.base import SnapshotInfo, resolve_backing_filename
from blockgraph.graph.node import Node


@dataclass
class ImageInfo:
    """One image of a backing chain, as ``query-block`` / ``qemu-img info`` describe it."""

    filename: str
    format: str
    virtual_size: int
    actual_size: int | None
    cluster_size: int | None = None
    backing_filename: str | None = None  # as the image header names it
    full_backing_filename: str | None = None  # resolved (the backing node's filename)
    backing_filename_format: str | None = None
    dirty_flag: bool = False
    encrypted: bool = False
    format_specific: dict[str, object] = field(default_factory=dict)
    snapshots: Sequence[SnapshotInfo] = ()
    backing_image: ImageInfo | None = None


def _allocated_bytes(node: Node) -> int | None:
    """Bytes the image occupies on the host (``disk size``), from its bottom file node."""
    bottom: Node | None = node
    while bottom is not None and bottom.driver_name != "file":
        bottom = bottom.primary_io_child()
    if bottom is None:
        return None
    try:
        return os.stat(bottom.filename).st_blocks * 512
    except OSError:
        return None


def _resolved(node: Node, name: str | None) -> str | None:
    """The header's backing file name taken relative to the image, as QEMU resolves it."""
    if not name or node.file is None:
        return name
    return resolve_backing_filename(node.file.filename, name)


def image_info(node: Node, *, chain: bool = False) -> ImageInfo:
    """The ImageInfo of ``node``; with ``chain``, its backing images linked below it."""
    info = node.driver.info()
    cluster = info.extra.get("cluster-size")
    header_backing = info.backing_file
    backing = node.backing
    specific = {k: v for k, v in info.extra.items() if k != "cluster-size"}
    if specific.get("compat") == "0.10":
        # A v2 header has none of the v3 feature bits: QEMU leaves them out.
        specific = {k: v for k, v in specific.items()
                    if k in ("compat", "compression-type", "refcount-bits")}
    header = getattr(node.driver, "header", None)
    dirty = bool(int(getattr(header, "incompatible_features", 0)) & 1)  # the qcow2 dirty bit
    result = ImageInfo(
        filename=node.filename,
        format=node.driver_name,
        virtual_size=node.getlength(),
        actual_size=_allocated_bytes(node),
        cluster_size=int(str(cluster)) if cluster else None,
        backing_filename=header_backing or (backing.filename if backing is not None else None),
        full_backing_filename=(backing.filename if backing is not None
                               and not (header_backing and node.backing_overridden())
                               else _resolved(node, header_backing)),
        backing_filename_format=info.backing_format,
        encrypted=info.encrypted,
        dirty_flag=dirty,
        format_specific=specific,
        snapshots=list(node.driver.snapshot_list()),
    )
    if chain and backing is not None:
        result.backing_image = image_info(backing, chain=True)
    return result
