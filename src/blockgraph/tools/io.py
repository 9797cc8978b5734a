"""``blockgraph io``: qemu-io's command line around the shared qemu-io command engine.

The commands run in order, from ``-c`` options or, without any, one per line from standard
input behind a ``qemu-io> `` prompt. The exit code is 1 if any command failed (or the image
could not be opened), 0 otherwise, as qemu-io's.
"""

from __future__ import annotations

import getopt
import os
import sys

from blockgraph.errors import BlockError, OptionError
from blockgraph.graph.layer import BlockLayer
from blockgraph.monitor.qemuio import OpenSpec, QemuIO
from blockgraph.objects import TOOL_OBJECT_TYPES, ObjectRegistry, add_object, object_help
from blockgraph.options.cache import parse_cache_mode
from blockgraph.options.keyval import parse_drive_opts

_SHORT = "hc:d:f:rsnCmkt:T:Uqi:V"
_LONG = ["help", "cmd=", "format=", "read-only", "snapshot", "nocache", "copy-on-read", "misalign",
         "native-aio", "discard=", "cache=", "trace=", "object=", "image-opts", "force-share",
         "quiet", "version", "aio="]

_USAGE = """\
Usage: {prog} [OPTIONS]... [-c STRING]... [file]
QEMU Disk exerciser

  --object OBJECTDEF   define an object such as 'secret' for
                       passwords and/or encryption keys
  --image-opts         treat file as option string
  -c, --cmd STRING     execute command with its arguments
                       from the given string
  -f, --format FMT     specifies the block driver to use
  -r, --read-only      export read-only
  -s, --snapshot       use snapshot file
  -n, --nocache        disable host cache, short for -t none
  -C, --copy-on-read   enable copy-on-read
  -m, --misalign       misalign allocations for O_DIRECT
  -k, --native-aio     use kernel AIO implementation
                       (Linux only, prefer use of -i)
  -i, --aio=MODE       use AIO mode (threads, native or io_uring)
  -t, --cache=MODE     use the given cache mode for the image
  -d, --discard=MODE   use the given discard mode for the image
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                       specify tracing options
                       see qemu-img(1) man page for full description
  -U, --force-share    force shared permissions
  -h, --help           display this help and exit
  -V, --version        output version information and exit

See '{prog} -c help' for information on available commands.

See <https://qemu.org/contribute/report-a-bug> for how to report bugs.
More information on the QEMU project at <https://qemu.org>.
"""

_VERSION = """\
qemu-io version 7.2.0 (blockgraph)
Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers
"""


def _getopt_error(prog: str, exc: getopt.GetoptError, args: list[str]) -> str:
    opt = exc.opt
    if len(opt) > 1 or any(a.startswith("--" + opt) for a in args):
        if "requires argument" in exc.msg:
            return f"{prog}: option '--{opt}' requires an argument"
        return f"{prog}: unrecognized option '--{opt}'"
    if "requires argument" in exc.msg:
        return f"{prog}: option requires an argument -- '{opt}'"
    return f"{prog}: invalid option -- '{opt}'"


def main(prog: str, args: list[str]) -> int:
    try:
        opts, rest = getopt.gnu_getopt(args, _SHORT, _LONG)
    except getopt.GetoptError as exc:
        # getopt names the program as it was invoked (argv[0], path included).
        invoked = sys.argv[0] if sys.argv and os.path.basename(sys.argv[0]) == prog else prog
        sys.stderr.write(_getopt_error(invoked, exc, args) + "\n")
        sys.stdout.write(_USAGE.format(prog=prog))
        return 1
    commands: list[str] = []
    spec = OpenSpec(None, {})
    image_opts = False
    objects = ObjectRegistry()
    for flag, value in opts:
        if flag == "--object":
            # Objects are made as the option is met, as qemu-io does: a bad one ends the run.
            lines = object_help(value, TOOL_OBJECT_TYPES)
            if lines is not None:
                sys.stdout.write("".join(line + "\n" for line in lines))
                return 0
            try:
                add_object(objects, value, TOOL_OBJECT_TYPES)
            except BlockError as exc:
                sys.stderr.write(f"{prog}: {exc}\n")
                return 1
        elif flag in ("-c", "--cmd"):
            commands.append(value)
        elif flag in ("-f", "--format"):
            spec.fmt = value
        elif flag in ("-r", "--read-only"):
            spec.read_only = True
        elif flag in ("-s", "--snapshot"):
            spec.snapshot = True
        elif flag in ("-n", "--nocache"):
            spec.cache = "none"
        elif flag in ("-k", "--native-aio"):
            spec.aio = "native"
        elif flag in ("-U", "--force-share"):
            spec.force_share = True
        elif flag in ("-t", "--cache"):
            try:
                parse_cache_mode(value)
            except OptionError:
                sys.stderr.write(f"{prog}: Invalid cache option: {value}\n")
                return 1
            spec.cache = value
        elif flag in ("-d", "--discard"):
            if value not in ("ignore", "off", "unmap", "on"):
                sys.stderr.write(f"{prog}: Invalid discard option: {value}\n")
                return 1
            spec.discard = value
        elif flag in ("-i", "--aio"):
            if value not in ("threads", "native", "io_uring"):
                sys.stderr.write(f"{prog}: Invalid aio option: {value}\n")
                return 1
            spec.aio = value
        elif flag == "--image-opts":
            image_opts = True
        elif flag in ("-h", "--help"):
            sys.stdout.write(_USAGE.format(prog=prog))
            return 0
        elif flag in ("-V", "--version"):
            sys.stdout.write(_VERSION)
            return 0
        # -C (copy-on-read), -m (misalign), -T (trace), -q: accepted, no effect here.
    if len(rest) > 1:
        sys.stdout.write(_USAGE.format(prog=prog))
        return 1
    if image_opts and spec.fmt is not None:
        sys.stderr.write(f"{prog}: --image-opts and -f are mutually exclusive\n")
        return 1

    def out(line: str) -> None:
        sys.stdout.write(line + "\n")

    def err(line: str) -> None:
        sys.stdout.flush()
        sys.stderr.write(f"{prog}: {line}\n")
        sys.stderr.flush()

    def raw_err(line: str) -> None:
        sys.stdout.flush()
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    layer = BlockLayer()
    layer.objects = objects
    engine = QemuIO(None, out, err, raw_err=raw_err, standalone=True, layer=layer)

    def warnings() -> None:
        for warning in layer.warnings:
            sys.stdout.flush()
            sys.stderr.write(f"WARNING: {warning}\n")
        layer.warnings.clear()

    status = 0
    try:
        if rest:
            if image_opts:
                try:
                    spec.options.update(parse_drive_opts(rest[0]))
                except BlockError as exc:
                    err(str(exc))
                    return 1
            else:
                spec.filename = rest[0]
            if not layer.run(engine.open_image(spec)):
                return 1
            warnings()
        if commands:
            for line in commands:
                if not layer.run(engine.run(line)):
                    status = 1
                warnings()
                if engine.quit_requested:
                    break
        else:
            prompt = f"{prog}> "
            while not engine.quit_requested:
                sys.stdout.write(prompt)
                sys.stdout.flush()
                line = sys.stdin.readline()
                if not line:
                    break
                if not layer.run(engine.run(line)):
                    status = 1
                warnings()
        layer.run(engine.close_image())
        sys.stdout.flush()
        return status
    finally:
        layer.close()
