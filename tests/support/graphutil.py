"""Helpers for tests that open real graphs through a :class:`BlockLayer`.

Images are made with ``qemu-img`` when it is installed (so a bug in our own creation code
cannot hide behind the code under test), else with blockgraph's own creator.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

from tests.support.oracle import HAVE_QEMU, run

from blockgraph.graph.layer import BlockLayer
from blockgraph.graph.node import Node


def make_raw(path: os.PathLike[str] | str, size: int = 1 << 20) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def make_qcow2(
    path: os.PathLike[str] | str,
    size: int = 1 << 20,
    *,
    backing: str | None = None,
    backing_fmt: str = "qcow2",
    cluster_size: int = 65536,
) -> str:
    path = str(path)
    if HAVE_QEMU:
        args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}"]
        if backing is not None:
            args += ["-b", backing, "-F", backing_fmt]
        run(*args, path, str(size))
        return path
    from blockgraph.graph.create import create_image

    layer = BlockLayer()
    opts: dict[str, object] = {"cluster_size": cluster_size}
    if backing is not None:
        opts["backing_file"] = backing
        opts["backing_fmt"] = backing_fmt
    try:
        layer.run(create_image(layer, path, "qcow2", size, opts))
    finally:
        layer.close()
    return path


def walk(node: Node) -> Iterator[Node]:
    """``node`` and every node below it, each once, parents first."""
    seen: set[int] = set()
    stack = [node]
    while stack:
        n = stack.pop(0)
        if id(n) in seen:
            continue
        seen.add(id(n))
        yield n
        stack.extend(c.node for c in n.children)


def child_path(node: Node, path: str) -> Node:
    """The node at ``path`` below ``node`` ("file", "backing.file", "" for itself)."""
    for name in filter(None, path.split(".")):
        child = node.child(name)
        assert child is not None, f"{node!r} has no child {name!r}"
        node = child.node
    return node


def cachestat_works(path: os.PathLike[str] | str) -> bool:
    """Whether the kernel answers cachestat(2) for ``path`` (Linux 6.5 and later): without
    it the file driver never maps a read (see FileDriver.map_read)."""
    from blockgraph.drivers.file import _CacheProbe

    fd = os.open(path, os.O_RDONLY)
    try:
        return _CacheProbe().cached_pages(fd, 0, 4096) is not None
    finally:
        os.close(fd)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def node_state(node: Node) -> dict[str, Any]:
    """Everything a reopen may change on ``node``, deep-copied for before/after comparison."""
    drv = node.driver
    return {
        "flags": dataclasses.asdict(node.flags),
        "options": copy.deepcopy(node.options),
        "explicit": copy.deepcopy(node.explicit_options),
        "fd": getattr(drv, "fd", None),
        "align": drv.request_alignment,
        "write_cache": [bb.write_cache for bb in node.backends],
    }


def graph_state(layer: BlockLayer) -> dict[str, dict[str, Any]]:
    return {n.node_name: node_state(n) for n in layer.nodes}
