"""``img bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
[-b source_file [-F source_fmt]] [-g granularity] [--object ...] [--image-opts | -f fmt]
filename bitmap``: change the persistent dirty bitmaps of an image, actions in the order given.

The image is opened read-write; the bitmaps reach the disk when it closes.
"""

from __future__ import annotations

import getopt
import sys

from blockgraph.drivers.bitmap import DirtyBitmap
from blockgraph.drivers.qcow2.bitmaps import Qcow2Bitmaps
from blockgraph.errors import BlockError, IOFailure, OptionError
from blockgraph.graph.layer import BlockLayer
from blockgraph.graph.node import Node
from blockgraph.options.schema import parse_size
from blockgraph.tools.img.common import (
    Fail,
    cache_options,
    new_layer,
    open_failure,
    parse_image_opts,
)

_LONG = ["help", "object=", "image-opts", "add", "remove", "clear", "enable", "disable",
         "merge=", "granularity=", "source-file=", "source-format="]
_ACTIONS = {"--add": "add", "--remove": "remove", "--clear": "clear", "--enable": "enable",
            "--disable": "disable", "--merge": "merge"}


def cmd_bitmap(prog: str, args: list[str]) -> int:
    try:
        opts, rest = getopt.gnu_getopt(args, "b:f:F:g:hq", _LONG)
    except getopt.GetoptError as exc:
        raise Fail(exc.msg) from None
    fmt: str | None = None
    src_file: str | None = None
    src_fmt: str | None = None
    granularity = 0
    image_opts = False
    actions: list[tuple[str, str]] = []
    for flag, value in opts:
        if flag in _ACTIONS:
            actions.append((_ACTIONS[flag], value))
        elif flag == "-f":
            fmt = value
        elif flag in ("-b", "--source-file"):
            src_file = value
        elif flag in ("-F", "--source-format"):
            src_fmt = value
        elif flag in ("-g", "--granularity"):
            try:
                granularity = parse_size("granularity", value)
            except OptionError:
                raise Fail("Invalid granularity specified. You may use k, M, G, T, P or E "
                           "suffixes for\nkilobytes, megabytes, gigabytes, terabytes, petabytes "
                           "and exabytes.") from None
        elif flag == "--image-opts":
            image_opts = True
    if not actions:
        raise Fail("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge")
    if granularity and not any(a == "add" for a, _ in actions):
        raise Fail("granularity only supported with --add")
    if src_fmt and not src_file:
        raise Fail("-F only supported with -b")
    if src_file and not any(a == "merge" for a, _ in actions):
        raise Fail("Merge bitmap source file only supported with --merge")
    if len(rest) != 2:
        raise Fail("Expecting filename and bitmap name")
    filename, name = rest
    if image_opts and fmt:
        raise Fail("--image-opts and --format are mutually exclusive")

    layer = new_layer(opts)
    try:
        node = _open(layer, filename, fmt, image_opts, read_only=False, prog=prog)
        src_node = None
        if src_file is not None:
            src_node = _open(layer, src_file, src_fmt, False, read_only=True, prog=prog)
        store = getattr(node.driver, "persistent_bitmaps", None)
        for action, value in actions:
            try:
                if not isinstance(store, Qcow2Bitmaps):
                    if action == "add":
                        raise BlockError(f"Can't store persistent bitmaps to {node.node_name}: "
                                         "Operation not supported")
                    raise BlockError(f"Dirty bitmap '{name}' not found")
                if action == "add":
                    store.add(name, granularity or _default_granularity(node.driver), True)
                elif action == "remove":
                    store.remove(name)
                elif action == "clear":
                    store.clear(name)
                elif action in ("enable", "disable"):
                    store.enable(name, action == "enable")
                else:
                    store.merge(name, _source(src_node, store, value))
            except (BlockError, IOFailure) as exc:
                raise Fail(f"Operation {action} on bitmap {name} failed: {exc}") from None
    finally:
        for warning in layer.warnings:
            sys.stderr.write(f"WARNING: {warning}\n")
        layer.warnings.clear()
        layer.close()
    return 0


def _default_granularity(driver: object) -> int:
    # QEMU's default: the cluster size, clamped to [4 KiB, 64 KiB].
    cluster = int(getattr(driver, "cluster_size", 65536))
    return min(max(cluster, 4096), 65536)


def _source(src_node: object, store: Qcow2Bitmaps, name: str) -> DirtyBitmap:
    if src_node is None:
        return store.lookup(name)
    bitmaps: list[DirtyBitmap] = list(getattr(src_node, "dirty_bitmaps", []))
    found = next((b for b in bitmaps if b.name == name), None)
    if found is None:
        raise BlockError(f"Dirty bitmap '{name}' not found")
    return found


def _open(layer: BlockLayer, filename: str, fmt: str | None, image_opts: bool, *,
          read_only: bool, prog: str) -> Node:
    options: dict[str, object] = {}
    open_name: str | None = filename
    if image_opts:
        options.update(parse_image_opts(filename, prog))
        open_name = None
    elif fmt:
        options["driver"] = fmt
    node_opts, writeback = cache_options("writeback", source=False)
    options.update(node_opts)
    options["read-only"] = read_only
    bb = layer.new_backend("")
    bb.write_cache = writeback
    try:
        return layer.run(layer.open_node(open_name, options, backend=bb))
    except BlockError as exc:
        raise open_failure(filename, exc) from None

