"""External snapshots: a new overlay becomes the BlockBackend's root over the old top.

The overlay is opened without a BlockBackend, so it is opened writeback, as every non-root
node is; the BlockBackend is then moved onto it and keeps its own write cache mode, which is
how "the original cache mode moves to the new root". ``cache.direct`` and ``cache.no-flush``
are carried from the old top to the overlay, as QEMU carries the old top's open flags.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping

from blockgraph.drivers.base import ChildRole
from blockgraph.errors import BlockError
from blockgraph.graph.create import create_image, create_line
from blockgraph.graph.layer import BlockLayer
from blockgraph.graph.node import BlockBackend, Node
from blockgraph.graph.reopen import reopen


async def external_snapshot(
    layer: BlockLayer,
    bb: BlockBackend,
    overlay_filename: str,
    fmt: str = "qcow2",
    *,
    existing: bool = False,
    overlay_node_name: str | None = None,
    report: Callable[[str], None] | None = None,
    cache_options: Mapping[str, object] | None = None,
) -> Node:
    """Put a new overlay ``overlay_filename`` on top of ``bb``'s root.

    :param existing: the overlay file exists already (``-n`` / ``mode=existing``); otherwise it
        is created with the old top as its backing file.
    :param report: receives the ``Formatting ...`` line of a created overlay.
    :param cache_options: the overlay's cache options, instead of the old top's.
    :raise BlockError: QEMU's message; then the graph is unchanged.
    """
    old_top = bb.root
    if old_top is None:
        raise BlockError(f"Device '{bb.name}' has no medium")
    if not existing:
        options: dict[str, object] = {"backing_file": old_top.filename,
                                      "backing_fmt": old_top.driver_name}
        line = create_line(overlay_filename, fmt, old_top.getlength(), options)
        if report is not None:
            report(line)
        await create_image(layer, overlay_filename, fmt, old_top.getlength(), options)
    overlay_options: dict[str, object] = {
        "driver": fmt,
        # The old top is attached as the backing node below; opening the header's backing file
        # would open the same image a second time.
        "backing": None,
        "cache.direct": old_top.flags.direct,
        "cache.no-flush": old_top.flags.no_flush,
    }
    if cache_options is not None:
        overlay_options.update(cache_options)
    if overlay_node_name is not None:
        overlay_options["node-name"] = overlay_node_name
    overlay = await layer.open_node(overlay_filename, overlay_options)
    # The user's explicit "backing: null" was ours, not theirs: forget it, so a later reopen
    # does not see it as an option to keep.
    overlay.explicit_options.pop("backing", None)
    try:
        await reopen(old_top, {}, read_only=True)
    except BaseException:
        await layer.delete_node(overlay)
        raise
    overlay.driver.set_backing(layer.link(overlay, "backing", ChildRole.COW, old_top))
    for backend in list(old_top.backends):
        backend.attach(overlay)
    return overlay


async def temporary_snapshot(layer: BlockLayer, bb: BlockBackend) -> None:
    """``snapshot=on``: writes go to a temporary qcow2 overlay that is deleted on close.

    As in QEMU, the overlay's header names no backing file (the old top is attached directly)
    and it is opened ``cache=unsafe``-like: its content never needs to reach the disk.
    """
    if bb.root is None:
        return
    fd, path = tempfile.mkstemp(prefix="vl.", dir=os.environ.get("TMPDIR", "/var/tmp"))
    os.close(fd)
    try:
        await create_image(layer, path, "qcow2", bb.root.getlength(), {})
        await external_snapshot(layer, bb, path, "qcow2", existing=True,
                                cache_options={"cache.direct": False, "cache.no-flush": True})
    finally:
        os.unlink(path)
