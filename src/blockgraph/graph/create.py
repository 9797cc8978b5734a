"""Creating image files (``qemu-img create``, ``snapshot_blkdev`` without ``-n``)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from blockgraph.drivers.base import ChildRole
from blockgraph.drivers.qcow2.create import qcow2_create, qcow2_create_line, raw_create_line
from blockgraph.errors import BlockError
from blockgraph.graph.layer import BlockLayer
from blockgraph.graph.node import Child

# qemu-img's -o names for qcow2 and the keyword qcow2_create takes for each.
_QCOW2_CREATE_KEYWORDS = {
    "backing_file": "backing_file",
    "backing_fmt": "backing_format",
    "cluster_size": "cluster_size",
    "compat": "compat",
    "lazy_refcounts": "lazy_refcounts",
    "refcount_bits": "refcount_bits",
    "extended_l2": "extended_l2",
    "compression_type": "compression_type",
    "preallocation": "preallocation",
    "data_file_raw": "data_file_raw",
}


def create_line(filename: str, fmt: str, size: int, options: Mapping[str, object]) -> str:
    """qemu-img's ``Formatting '...', fmt=...`` line for this creation.

    :raise BlockError: ``Unknown file format`` for a format that cannot be created.
    """
    if fmt == "qcow2":
        return qcow2_create_line(filename, {"size": size, **options})
    if fmt == "raw":
        return raw_create_line(filename, {"size": size, **options})
    raise BlockError(f"Unknown file format '{fmt}'")


def _create_file(filename: str, size: int) -> None:
    try:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise BlockError(f"Could not create '{filename}': {os.strerror(exc.errno or 0)}") from exc
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


async def create_image(
    layer: BlockLayer, filename: str, fmt: str, size: int, options: Mapping[str, object]
) -> None:
    """Create ``filename`` in format ``fmt`` with qemu-img's ``-o`` ``options`` (typed).

    :raise BlockError: qemu-img's message for the failure.
    """
    if fmt == "raw":
        _create_file(filename, size)
        return
    if fmt != "qcow2":
        raise BlockError(f"Unknown file format '{fmt}'")
    kwargs: dict[str, object] = {}
    data_file_name: str | None = None
    for key, value in options.items():
        if key == "size":
            continue
        if key == "data_file":
            data_file_name = str(value) if value else None
            continue
        if key not in _QCOW2_CREATE_KEYWORDS:
            raise BlockError(f"Invalid parameter '{key}'")
        kwargs[_QCOW2_CREATE_KEYWORDS[key]] = value
    data_node = None
    if data_file_name is not None:
        # As qemu-img: the data file is created (and later opened) under the name as given,
        # relative to the working directory, and that name goes into the header.
        _create_file(data_file_name, 0)
        data_node = await layer.open_node(data_file_name, {"driver": "file"})
        kwargs["data_file"] = Child("data-file", ChildRole.DATA, data_node, data_node)
        kwargs["data_file_name"] = data_file_name
    try:
        _create_file(filename, 0)
        node = await layer.open_node(filename, {"driver": "file"})
        try:
            # The new image is written through a writeback child of a parentless file node: a
            # creator knows when to flush (qcow2_create flushes where the format needs
            # ordering).
            child = Child("file", ChildRole.IMAGE, node, node)
            await qcow2_create(child, size, **kwargs)  # type: ignore[arg-type]
            await node.flush()
        finally:
            await layer.delete_node(node)
    finally:
        if data_node is not None:
            await data_node.flush()
            await layer.delete_node(data_node)
