"""``blockgraph io``: qemu-io's command line around the shared qemu-io command engine."""

from __future__ import annotations

import getopt
import sys

from blockgraph.errors import BlockError, OptionError
from blockgraph.graph.layer import BlockLayer
from blockgraph.graph.node import BlockBackend
from blockgraph.monitor.qemuio import QemuIO
from blockgraph.options.cache import parse_cache_mode
from blockgraph.options.keyval import parse_drive_opts

_SHORT = "hc:d:f:rsnmkt:T:UqVi:o:"
_LONG = ["help", "cmd=", "format=", "read-only", "snapshot", "nocache", "misalign", "native-aio",
         "discard=", "cache=", "trace=", "object=", "image-opts", "force-share", "quiet", "version",
         "aio="]


def main(prog: str, args: list[str]) -> int:
    try:
        opts, rest = getopt.gnu_getopt(args, _SHORT, _LONG)
    except getopt.GetoptError as exc:
        sys.stderr.write(f"{prog}: {exc.msg}\n")
        return 1
    commands: list[str] = []
    fmt: str | None = None
    read_only = False
    image_opts = False
    cache = "writeback"
    for flag, value in opts:
        if flag in ("-c", "--cmd"):
            commands.append(value)
        elif flag in ("-f", "--format"):
            fmt = value
        elif flag in ("-r", "--read-only"):
            read_only = True
        elif flag in ("-n", "--nocache"):
            cache = "none"
        elif flag in ("-t", "--cache"):
            cache = value
        elif flag == "--image-opts":
            image_opts = True
        elif flag in ("-V", "--version"):
            sys.stdout.write("qemu-io version 7.2.0 (blockgraph)\n")
            return 0
    try:
        mode = parse_cache_mode(cache)
    except OptionError:
        sys.stderr.write(f"{prog}: Invalid cache option: {cache}\n")
        return 1
    layer = BlockLayer()
    bb: BlockBackend | None = None
    status = 0

    def out(line: str) -> None:
        sys.stdout.write(line + "\n")

    def err(line: str) -> None:
        sys.stdout.flush()
        sys.stderr.write(f"{prog}: {line}\n")

    try:
        if rest:
            filename = rest[0]
            options: dict[str, object] = {}
            if image_opts:
                if fmt is not None:
                    sys.stderr.write(f"{prog}: --image-opts and 'format' are mutually exclusive\n")
                    return 1
                options.update(parse_drive_opts(filename))
                file_arg: str | None = None
            else:
                file_arg = filename
                if fmt is not None:
                    options["driver"] = fmt
            options.setdefault("cache.direct", mode.direct)
            options.setdefault("cache.no-flush", mode.no_flush)
            if read_only:
                options["read-only"] = True
            bb = layer.new_backend("")
            bb.write_cache = mode.writeback
            try:
                layer.run(layer.open_node(file_arg, options, backend=bb))
            except BlockError as exc:
                sys.stderr.write(f"{prog}: can't open device {filename}: {exc}\n")
                return 1
            for warning in layer.warnings:
                sys.stderr.write(f"WARNING: {warning}\n")
        if bb is None:
            return 0
        engine = QemuIO(bb, out, err)
        lines = commands if commands else [line.rstrip("\n") for line in sys.stdin]
        for line in lines:
            if line.strip() in ("quit", "q"):
                break
            if not layer.run(engine.run(line)):
                status = 1
        sys.stdout.flush()
        return status
    finally:
        layer.close()
