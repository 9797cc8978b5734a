"""``img snapshot``: list, create, apply and delete internal snapshots."""

from __future__ import annotations

import getopt
import os
import sys

from blockgraph.errors import BlockError, IOFailure
from blockgraph.monitor.imageinfo import format_snapshot_list
from blockgraph.tools.img.common import Fail as _Fail
from blockgraph.tools.img.common import new_layer, open_failure

_ACTIONS = {"-l": "list", "-a": "apply", "-c": "create", "-d": "delete"}
_VERBS = {"apply": "apply", "create": "create", "delete": "delete"}


def cmd_snapshot(prog: str, args: list[str]) -> int:
    try:
        opts, rest = getopt.gnu_getopt(args, "la:c:d:f:hqU",
                                       ["object=", "image-opts", "force-share", "help"])
    except getopt.GetoptError as exc:
        raise _Fail(exc.msg) from None
    fmt: str | None = None
    action: str | None = None
    name = ""
    force_share = False
    for flag, value in opts:
        if flag in _ACTIONS:
            if action is not None:
                sys.stderr.write(f"{prog}: Cannot mix '-l', '-a', '-c', '-d'\n"
                                 f"Try '{prog} --help' for more information\n")
                return 1
            action = _ACTIONS[flag]
            name = value
        elif flag == "-f":
            fmt = value
        elif flag in ("-U", "--force-share"):
            force_share = True
    if len(rest) != 1:
        raise _Fail("Expecting one image file name")
    filename = rest[0]
    if action is None:
        return 0
    layer = new_layer(opts)
    try:
        options: dict[str, object] = {"read-only": action == "list"}
        if fmt:
            options["driver"] = fmt
        if force_share:
            options["force-share"] = True
        try:
            node = layer.run(layer.open_node(filename, options))
        except BlockError as exc:
            raise open_failure(filename, exc) from None
        drv = node.driver
        if action == "list":
            sys.stdout.write(format_snapshot_list(drv.snapshot_list()))
            return 0
        from blockgraph.drivers.qcow2.driver import Qcow2Driver

        if not isinstance(drv, Qcow2Driver):
            raise _Fail(f"Could not {_VERBS[action]} snapshot '{name}': -95 (Operation not "
                        "supported)")
        try:
            if action == "create":
                layer.run(drv.snapshot_create(name))
            elif action == "apply":
                layer.run(drv.snapshot_goto(name))
            else:
                layer.run(drv.snapshot_delete(None, name))
        except BlockError as exc:
            raise _Fail(f"Could not {_VERBS[action]} snapshot '{name}': {exc}") from None
        except IOFailure as exc:
            # qemu-img prints a bare errno as "-N (text)".
            raise _Fail(f"Could not {_VERBS[action]} snapshot '{name}': -{exc.errno} "
                        f"({os.strerror(exc.errno)})") from None
    finally:
        layer.close()
    return 0
