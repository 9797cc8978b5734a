"""``img create``."""

from __future__ import annotations

import getopt
import os
import sys

from blockgraph.drivers.qcow2.create import qcow2_create_line, raw_create_line
from blockgraph.errors import BlockError, OptionError
from blockgraph.graph.create import create_image
from blockgraph.options.keyval import parse_drive_opts
from blockgraph.options.schema import parse_size
from blockgraph.tools.img.common import Fail as _Fail
from blockgraph.tools.img.common import new_layer
from blockgraph.tools.img.common import size_arg as _size_arg

_INT_OPTIONS = ("cluster_size", "refcount_bits")
_BOOL_OPTIONS = ("lazy_refcounts", "extended_l2", "data_file_raw")


def _typed_create_option(key: str, value: str) -> object:
    if key in _INT_OPTIONS:
        return parse_size(key, value)
    if key in _BOOL_OPTIONS:
        from blockgraph.options.schema import parse_bool

        return parse_bool(key, value)
    return value


def cmd_create(prog: str, args: list[str]) -> int:
    try:
        opts, rest = getopt.gnu_getopt(args, "F:b:f:ho:qu", ["object=", "help"])
    except getopt.GetoptError as exc:
        raise _Fail(exc.msg) from None
    fmt = "raw"
    backing_file = backing_fmt = None
    quiet = unsafe = False
    raw_options: dict[str, str] = {}
    for flag, value in opts:
        if flag == "-f":
            fmt = value
        elif flag == "-b":
            backing_file = value
        elif flag == "-F":
            backing_fmt = value
        elif flag == "-q":
            quiet = True
        elif flag == "-u":
            unsafe = True
        elif flag == "-o":
            raw_options.update(parse_drive_opts(value))
    if not rest:
        raise _Fail("Expecting image file name")
    filename = rest[0]
    if fmt not in ("raw", "qcow2"):
        raise _Fail(f"{filename}: Unknown file format '{fmt}'")
    options: dict[str, object] = {}
    layer = new_layer(opts)
    try:
        for key, value in raw_options.items():
            if key in ("backing_file", "backing_fmt"):
                if key == "backing_file":
                    backing_file = value
                else:
                    backing_fmt = value
                continue
            try:
                options[key] = _typed_create_option(key, value)
            except OptionError as exc:
                raise _Fail(f"{filename}: {exc}") from None
        size: int | None = _size_arg(rest[1]) if len(rest) > 1 else None
        if backing_file is not None:
            if backing_fmt is None:
                raise _Fail(f"{filename}: Backing file specified without backing format\n"
                            "Detected format of qcow2.")
            if not unsafe or size is None:
                path = backing_file
                # A name with a protocol prefix (json:, nbd+unix://) is not a path.
                if not os.path.isabs(path) and ":" not in path.split("/")[0]:
                    path = os.path.join(os.path.dirname(filename), path)
                try:
                    base = layer.run(layer.open_node(path, {"driver": backing_fmt, "read-only": True}))
                except BlockError as exc:
                    raise _Fail(f"{filename}: {exc}\nCould not open backing image.") from None
                if size is None:
                    size = base.getlength()
                layer.run(layer.delete_node(base))
        if size is None:
            raise _Fail(f"{filename}: Image creation needs a size parameter")
        line_opts: dict[str, object] = {"size": size, **options}
        if backing_file is not None:
            line_opts["backing_file"] = backing_file
            line_opts["backing_fmt"] = backing_fmt
        if fmt == "qcow2":
            line = qcow2_create_line(filename, {**line_opts, **{k: raw_options[k] for k in raw_options
                                                               if k not in ("backing_file", "backing_fmt")}})
        else:
            line = raw_create_line(filename, line_opts)
        if not quiet:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        create_options = dict(options)
        if backing_file is not None:
            create_options["backing_file"] = backing_file
            create_options["backing_fmt"] = backing_fmt
        try:
            layer.run(create_image(layer, filename, fmt, size, create_options))
        except BlockError as exc:
            raise _Fail(f"{filename}: {exc}") from None
    finally:
        layer.close()
    return 0


