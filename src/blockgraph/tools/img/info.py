"""``img info``."""

from __future__ import annotations

import getopt
import json
import os
import sys

from blockgraph.errors import BlockError
from blockgraph.graph.layer import BlockLayer
from blockgraph.graph.node import Node
from blockgraph.monitor.imageinfo import specific_lines
from blockgraph.monitor.qemuio import cvtstr
from blockgraph.tools.img.common import Fail as _Fail


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
        order = ["compat", "compression-type", "lazy-refcounts", "bitmaps", "refcount-bits", "corrupt",
                 "extended-l2"]
        if specific.get("compat") == "0.10":
            # A v2 header has none of the v3 feature bits: qemu-img leaves them out.
            order = ["compat", "compression-type", "refcount-bits"]
        data["format-specific"] = {"type": "qcow2",
                                   "data": {k: specific[k] for k in order if k in specific}}
    if info.backing_file:
        full = node.backing.filename if node.backing is not None else info.backing_file
        data["full-backing-filename"] = full
        data["backing-filename"] = info.backing_file
    data["dirty-flag"] = _dirty(node)
    return data


def _dirty(node: Node) -> bool:
    header = getattr(node.driver, "header", None)
    incompatible = getattr(header, "incompatible_features", 0)
    return bool(int(incompatible) & 1)  # QCOW2_INCOMPAT_DIRTY


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
            lines += specific_lines(key.replace("-", " "), value, 4)
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


