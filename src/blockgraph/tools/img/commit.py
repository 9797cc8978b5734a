"""``img commit``: write what an image holds above its base into the base.

The ranges allocated above the base are found by block status in runs and copied through a
2 MiB buffer into a writable BlockBackend on the base. Without ``-d`` (and ``-b``, which
implies it) the top image is emptied afterwards, so that it reads through to the base.
"""

from __future__ import annotations

import getopt
import os
import sys

from blockgraph.drivers.base import RequestFlags
from blockgraph.errors import BlockError, IOFailure
from blockgraph.graph.node import Node
from blockgraph.tools.img.common import (
    IO_BUF_SIZE,
    F,
    Fail,
    Progress,
    chain_status,
    new_layer,
    open_image,
    root,
)


def _same_file(node: Node, name: str, top: Node) -> bool:
    if node.filename == name:
        return True
    candidate = name if os.path.isabs(name) else os.path.join(os.path.dirname(top.filename), name)
    try:
        return os.path.realpath(candidate) == os.path.realpath(node.filename)
    except (OSError, ValueError):
        return False


def cmd_commit(prog: str, args: list[str]) -> int:
    try:
        opts, rest = getopt.gnu_getopt(args, "f:ht:b:dpqr:", ["help", "object=", "image-opts"])
    except getopt.GetoptError as exc:
        raise Fail(exc.msg) from None
    fmt: str | None = None
    cache = "unsafe"
    base_name: str | None = None
    drop = progress = quiet = False
    for flag, value in opts:
        if flag == "-f":
            fmt = value
        elif flag == "-t":
            cache = value
        elif flag == "-b":
            base_name = value
            drop = True  # -b implies -d
        elif flag == "-d":
            drop = True
        elif flag == "-p":
            progress = True
        elif flag == "-q":
            quiet = True
    if quiet:
        progress = False
    if len(rest) != 1:
        raise Fail("Expecting one image file name")
    filename = rest[0]
    layer = new_layer(opts)
    state = Progress(progress, 1.0)
    try:
        bb = open_image(layer, filename, fmt, read_only=False, cache=cache)
        top = root(bb)
        if top.backing is None:
            raise Fail("Image does not have a backing file")
        base: Node | None = top.backing
        if base_name is not None:
            found: Node | None = top.backing
            while found is not None and not _same_file(found, base_name, top):
                found = found.backing
            if found is None:
                raise Fail(f"Did not find '{base_name}' in the backing chain of '{filename}'")
            base = found
        assert base is not None
        base_bb = open_image(layer, base.filename, base.driver_name, read_only=False, cache=cache)
        size = bb.getlength()
        with state.running():
            state.update(0, 100)
            try:
                if base_bb.getlength() < size:
                    layer.run(root(base_bb).truncate(size))
                buf = bytearray(IO_BUF_SIZE)
                view = memoryview(buf)
                pos = 0
                while pos < size:
                    st = layer.run(chain_status(top, pos, min(size - pos, 1 << 30), base))
                    if st.flags & F.ZERO and st.flags & F.ALLOCATED:
                        layer.run(base_bb.pwrite_zeroes(pos, st.length, RequestFlags.MAY_UNMAP))
                    elif st.flags & F.ALLOCATED:
                        end = pos + st.length
                        cur = pos
                        while cur < end:
                            n = min(end - cur, IO_BUF_SIZE)
                            layer.run(bb.preadv(cur, view[:n]))
                            layer.run(base_bb.pwritev(cur, view[:n]))
                            cur += n
                    pos += st.length
                    state.update(100.0 * pos / size if size else 100.0, 0)
                layer.run(base_bb.flush())
                if not drop:
                    layer.run(top.make_empty())
                    layer.run(top.flush())
            except IOFailure as exc:
                raise Fail(f"Block job failed: {exc}") from None
            except BlockError as exc:
                raise Fail(f"Block job failed: {exc}") from None
            state.update(100, 0)
            state.end()
        if not quiet:
            sys.stdout.write("Image committed.\n")
    finally:
        layer.close()
    return 0
