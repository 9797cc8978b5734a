"""``blockgraph img``: qemu-img's command line (``create`` and ``info`` so far)."""

from __future__ import annotations

import getopt
import json
import os
import sys
from collections.abc import Callable

from blockgraph.drivers.qcow2.create import qcow2_create_line, raw_create_line
from blockgraph.errors import BlockError, OptionError
from blockgraph.graph.create import create_image
from blockgraph.graph.layer import BlockLayer
from blockgraph.graph.node import Node
from blockgraph.monitor.qemuio import cvtstr
from blockgraph.options.keyval import parse_drive_opts
from blockgraph.options.schema import parse_size

_INT_OPTIONS = ("cluster_size", "refcount_bits")
_BOOL_OPTIONS = ("lazy_refcounts", "extended_l2")


class _Fail(Exception):
    """qemu-img's error line(s), already formatted; exit 1."""


def _size_arg(text: str) -> int:
    try:
        return parse_size("size", text)
    except OptionError:
        raise _Fail("Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
                    "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.") from None


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
    layer = BlockLayer()
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
                if not os.path.isabs(path) and not path.startswith("json:"):
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


def _disk_size(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def _image_info(node: Node) -> dict[str, object]:
    info = node.driver.info()
    data: dict[str, object] = {}
    if info.backing_format:
        data["backing-filename-format"] = info.backing_format
    data["virtual-size"] = node.getlength()
    data["filename"] = node.filename
    cluster = info.extra.get("cluster-size")
    if cluster:
        data["cluster-size"] = cluster
    data["format"] = node.driver_name
    data["actual-size"] = _disk_size(node.filename)
    if node.driver_name == "qcow2":
        specific = {k: v for k, v in info.extra.items() if k != "cluster-size"}
        order = ["compat", "compression-type", "lazy-refcounts", "refcount-bits", "corrupt", "extended-l2"]
        data["format-specific"] = {"type": "qcow2",
                                   "data": {k: specific[k] for k in order if k in specific}}
    if info.backing_file:
        full = node.backing.filename if node.backing is not None else info.backing_file
        data["full-backing-filename"] = full
        data["backing-filename"] = info.backing_file
    data["dirty-flag"] = False
    return data


def _human_info(data: dict[str, object]) -> str:
    size = int(str(data["virtual-size"]))
    lines = [f"image: {data['filename']}", f"file format: {data['format']}",
             f"virtual size: {cvtstr(size)} ({size} bytes)",
             f"disk size: {cvtstr(int(str(data['actual-size'])))}"]
    if "cluster-size" in data:
        lines.append(f"cluster_size: {data['cluster-size']}")
    if "backing-filename" in data:
        backing = str(data["backing-filename"])
        full = str(data["full-backing-filename"])
        lines.append(f"backing file: {backing}" + (f" (actual path: {full})" if full != backing else ""))
    if "backing-filename-format" in data:
        lines.append(f"backing file format: {data['backing-filename-format']}")
    specific = data.get("format-specific")
    if isinstance(specific, dict):
        lines.append("Format specific information:")
        for key, value in specific["data"].items():
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            lines.append(f"    {key.replace('-', ' ')}: {text}")
    return "".join(line + "\n" for line in lines)


def cmd_info(prog: str, args: list[str]) -> int:
    try:
        opts, rest = getopt.gnu_getopt(args, "f:hU", ["output=", "backing-chain", "image-opts",
                                                     "force-share", "object=", "help"])
    except getopt.GetoptError as exc:
        raise _Fail(exc.msg) from None
    fmt = None
    output = "human"
    chain = False
    for flag, value in opts:
        if flag == "-f":
            fmt = value
        elif flag == "--output":
            output = value
        elif flag == "--backing-chain":
            chain = True
    if output not in ("human", "json"):
        raise _Fail("--output must be used with human or json as argument.")
    if not rest:
        raise _Fail("Expecting one image file name")
    filename = rest[0]
    layer = BlockLayer()
    try:
        options: dict[str, object] = {"read-only": True}
        if fmt:
            options["driver"] = fmt
        try:
            node = layer.run(layer.open_node(filename, options))
        except BlockError as exc:
            raise _Fail(f"Could not open '{filename}': {exc}") from None
        nodes = [node]
        while chain and nodes[-1].backing is not None:
            backing = nodes[-1].backing
            assert backing is not None
            nodes.append(backing)
        infos = [_image_info(n) for n in nodes]
        if output == "json":
            payload: object = infos if chain else infos[0]
            sys.stdout.write(json.dumps(payload, indent=4) + "\n")
        else:
            sys.stdout.write("\n".join(_human_info(i) for i in infos))
    finally:
        layer.close()
    return 0


_COMMANDS: dict[str, Callable[[str, list[str]], int]] = {"create": cmd_create, "info": cmd_info}


def main(prog: str, args: list[str]) -> int:
    if not args:
        sys.stderr.write(f"{prog}: Not enough arguments\nTry '{prog} --help' for more information\n")
        return 1
    command = _COMMANDS.get(args[0])
    if command is None:
        sys.stderr.write(f"{prog}: Command not found: {args[0]}\n")
        return 1
    try:
        return command(prog, args[1:])
    except _Fail as exc:
        sys.stderr.write("".join(f"{prog}: {line}\n" for line in str(exc).split("\n")))
        return 1
