"""``img rebase``: give an image a new backing file.

Safe mode first copies into the image every range it does not hold itself where the old and
the new backing chains read differently (compared 64 KiB at a time inside 2 MiB buffers);
``-u`` only rewrites the header.
"""

from __future__ import annotations

import getopt
import os

from blockgraph.errors import BlockError, IOFailure
from blockgraph.graph.node import BlockBackend, Node
from blockgraph.tools.img.common import (
    IO_BUF_SIZE,
    F,
    Fail,
    Progress,
    new_layer,
    node_status,
    open_image,
    root,
)

_COMPARE_BLOCK = 64 * 1024


async def _read_backing(node: Node | None, offset: int, view: memoryview) -> None:
    """Read what a backing node shows at ``offset`` (zeroes past its end or without one)."""
    n = len(view)
    valid = 0 if node is None else max(0, min(n, node.getlength() - offset))
    if valid:
        assert node is not None
        await node.preadv(offset, view[:valid])
    if valid < n:
        view[valid:] = bytes(n - valid)


async def _safe_copy(bb: BlockBackend, old: Node | None, new: BlockBackend | None,
                     state: Progress) -> None:
    top = root(bb)
    size = bb.getlength()
    old_buf = bytearray(IO_BUF_SIZE)
    new_buf = bytearray(IO_BUF_SIZE)
    pos = 0
    new_node = root(new) if new is not None else None
    while pos < size:
        flags, n, _, _ = await node_status(top, pos, min(size - pos, 1 << 30))
        if not flags & F.ALLOCATED:
            end = pos + n
            cur = pos
            while cur < end:
                m = min(end - cur, IO_BUF_SIZE)
                ov = memoryview(old_buf)[:m]
                nv = memoryview(new_buf)[:m]
                await _read_backing(old, cur, ov)
                await _read_backing(new_node, cur, nv)
                if ov != nv:
                    # Only the blocks that differ are written, in runs.
                    run = -1
                    for b in range(0, m + _COMPARE_BLOCK, _COMPARE_BLOCK):
                        differs = b < m and ov[b : b + _COMPARE_BLOCK] != nv[b : b + _COMPARE_BLOCK]
                        if differs and run < 0:
                            run = b
                        elif not differs and run >= 0:
                            await bb.pwritev(cur + run, ov[run : min(b, m)])
                            run = -1
                cur += m
        pos += n
        state.update(100.0 * pos / size if size else 100.0, 0)


def cmd_rebase(prog: str, args: list[str]) -> int:
    try:
        opts, rest = getopt.gnu_getopt(args, "hf:F:b:upt:T:qU", ["help", "object=", "image-opts",
                                                                "force-share"])
    except getopt.GetoptError as exc:
        raise Fail(exc.msg) from None
    fmt: str | None = None
    new_fmt: str | None = None
    new_base: str | None = None
    unsafe = progress = quiet = False
    cache = "writeback"
    src_cache = "writeback"
    for flag, value in opts:
        if flag == "-f":
            fmt = value
        elif flag == "-F":
            new_fmt = value
        elif flag == "-b":
            new_base = value
        elif flag == "-u":
            unsafe = True
        elif flag == "-p":
            progress = True
        elif flag == "-t":
            cache = value
        elif flag == "-T":
            src_cache = value
        elif flag == "-q":
            quiet = True
    if quiet:
        progress = False
    if len(rest) != 1:
        raise Fail("Expecting one image file name")
    if new_base is None:
        raise Fail("Must specify backing file (-b) or use unsafe mode (-u)",
                   tail=f"Try '{prog} --help' for more information\n")
    filename = rest[0]
    layer = new_layer(opts)
    state = Progress(progress, 2.0)
    try:
        extra: dict[str, object] = {"backing": None} if unsafe else {}
        bb = open_image(layer, filename, fmt, read_only=False, cache=cache, extra=extra)
        top = root(bb)
        with state.running():
            state.update(0, 100)
            if not unsafe:
                old = top.backing
                new_bb: BlockBackend | None = None
                if new_base:
                    path = new_base
                    if not os.path.isabs(path) and not path.startswith("json:"):
                        path = os.path.join(os.path.dirname(filename), path)
                    try:
                        new_bb = open_image(layer, path, new_fmt, read_only=True, cache=src_cache,
                                            source_cache=True)
                    except Fail as exc:
                        msg = str(exc).partition(": ")[2]
                        raise Fail(f"Could not open new backing file '{new_base}': {msg}") from None
                if new_base and new_fmt is None:
                    raise Fail(f"Could not change the backing file to '{new_base}': "
                               "backing format must be specified")
                try:
                    layer.run(_safe_copy(bb, old, new_bb, state))
                except IOFailure as exc:
                    raise Fail(f"Error while writing image: {exc}") from None
            elif new_base and new_fmt is None:
                raise Fail(f"Could not change the backing file to '{new_base}': "
                           "backing format must be specified")
            try:
                layer.run(top.change_backing_file(new_base or None, new_fmt))
            except BlockError as exc:
                raise Fail(f"Could not change the backing file to '{new_base}': {exc}") from None
            state.update(100, 0)
            state.end()
    finally:
        layer.close()
    return 0
