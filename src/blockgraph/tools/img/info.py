"""``img info``."""

from __future__ import annotations

import getopt
import json
import sys

from blockgraph.errors import BlockError
from blockgraph.graph.query import image_info
from blockgraph.monitor.imageinfo import format_image_info, image_info_json
from blockgraph.options.keyval import parse_drive_opts
from blockgraph.tools.img.common import Fail as _Fail
from blockgraph.tools.img.common import new_layer, open_failure


def cmd_info(prog: str, args: list[str]) -> int:
    try:
        opts, rest = getopt.gnu_getopt(args, "f:hU", ["output=", "backing-chain", "image-opts",
                                                     "force-share", "object=", "help"])
    except getopt.GetoptError as exc:
        raise _Fail(exc.msg) from None
    fmt = None
    output = "human"
    chain = False
    image_opts = False
    for flag, value in opts:
        if flag == "-f":
            fmt = value
        elif flag == "--output":
            output = value
        elif flag == "--backing-chain":
            chain = True
        elif flag == "--image-opts":
            image_opts = True
    if output not in ("human", "json"):
        raise _Fail("--output must be used with human or json as argument.")
    if not rest:
        raise _Fail("Expecting one image file name")
    filename = rest[0]
    layer = new_layer(opts)
    try:
        options: dict[str, object] = {"read-only": True}
        open_name: str | None = filename
        if image_opts:
            try:
                options.update(parse_drive_opts(filename))
            except BlockError as exc:
                raise _Fail(str(exc)) from None
            open_name = None
        elif fmt:
            options["driver"] = fmt
        try:
            node = layer.run(layer.open_node(open_name, options, no_io=True))
        except BlockError as exc:
            raise open_failure(filename, exc) from None
        nodes = [node]
        while chain and nodes[-1].backing is not None:
            backing = nodes[-1].backing
            assert backing is not None
            nodes.append(backing)
        infos = [image_info(n) for n in nodes]
        if output == "json":
            data = [image_info_json(i) for i in infos]
            payload: object = data if chain else data[0]
            sys.stdout.write(json.dumps(payload, indent=4) + "\n")
        else:
            sys.stdout.write("\n".join(format_image_info(i) for i in infos))
    finally:
        layer.close()
    return 0


