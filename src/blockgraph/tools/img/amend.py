"""``img amend``: change qcow2 header options of an existing image."""

from __future__ import annotations

import getopt
import sys

from blockgraph.errors import BlockError, IOFailure, OptionError
from blockgraph.options.keyval import parse_drive_opts
from blockgraph.tools.img.common import Fail as _Fail
from blockgraph.tools.img.common import new_layer, open_failure


def cmd_amend(prog: str, args: list[str]) -> int:
    try:
        opts, rest = getopt.gnu_getopt(args, "ho:f:t:pq", ["object=", "image-opts", "force",
                                                           "help"])
    except getopt.GetoptError as exc:
        raise _Fail(exc.msg) from None
    fmt: str | None = None
    raw_options: dict[str, str] = {}
    have_options = False
    for flag, value in opts:
        if flag == "-f":
            fmt = value
        elif flag == "-o":
            have_options = True
            try:
                raw_options.update(parse_drive_opts(value))
            except OptionError as exc:
                raise _Fail(str(exc)) from None
    if not have_options:
        sys.stderr.write(f"{prog}: Must specify options (-o)\n"
                         f"Try '{prog} --help' for more information\n")
        return 1
    if len(rest) != 1:
        raise _Fail("Expecting one image file name")
    filename = rest[0]
    layer = new_layer(opts)
    try:
        options: dict[str, object] = {"read-only": False}
        if fmt:
            options["driver"] = fmt
        try:
            node = layer.run(layer.open_node(filename, options))
        except BlockError as exc:
            raise open_failure(filename, exc) from None
        from blockgraph.drivers.qcow2.amend import amend
        from blockgraph.drivers.qcow2.driver import Qcow2Driver

        drv = node.driver
        if not isinstance(drv, Qcow2Driver):
            raise _Fail(f"Format driver '{node.driver_name}' does not support option amendment")
        try:
            layer.run(amend(drv, raw_options))
        except (BlockError, IOFailure) as exc:
            # Hints after the first line go out without the program name, as qemu-img's do.
            first, _, more = str(exc).partition("\n")
            sys.stderr.write(f"{prog}: {first}\n" + (more + "\n" if more else ""))
            return 1
    finally:
        layer.close()
    return 0
