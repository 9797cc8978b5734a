"""``blockgraph img``: qemu-img's command line.

Each subcommand lives in a module of its own, named in :data:`COMMANDS` and imported only when
it runs; every one reports failure by raising :class:`~blockgraph.tools.img.common.Fail` with
qemu-img's text.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from blockgraph.tools.img.common import Fail

# subcommand -> "module:function" (the function takes the program name and the arguments).
COMMANDS: dict[str, str] = {
    "create": "blockgraph.tools.img.create:cmd_create",
    "info": "blockgraph.tools.img.info:cmd_info",
    "check": "blockgraph.tools.img.check:cmd_check",
    "snapshot": "blockgraph.tools.img.snapshot:cmd_snapshot",
    "amend": "blockgraph.tools.img.amend:cmd_amend",
    "convert": "blockgraph.tools.img.convert:cmd_convert",
    "compare": "blockgraph.tools.img.compare:cmd_compare",
    "map": "blockgraph.tools.img.map:cmd_map",
    "measure": "blockgraph.tools.img.measure:cmd_measure",
    "commit": "blockgraph.tools.img.commit:cmd_commit",
    "rebase": "blockgraph.tools.img.rebase:cmd_rebase",
    "resize": "blockgraph.tools.img.resize:cmd_resize",
    "dd": "blockgraph.tools.img.dd:cmd_dd",
    "bench": "blockgraph.tools.img.bench:cmd_bench",
    "bitmap": "blockgraph.tools.img.bitmap:cmd_bitmap",
}


def main(prog: str, args: list[str]) -> int:
    if not args:
        sys.stderr.write(f"{prog}: Not enough arguments\nTry '{prog} --help' for more information\n")
        return 1
    target = COMMANDS.get(args[0])
    if target is None:
        sys.stderr.write(f"{prog}: Command not found: {args[0]}\n")
        return 1
    module_name, _, function = target.partition(":")
    command: Callable[[str, list[str]], int] = getattr(importlib.import_module(module_name), function)
    try:
        return command(prog, args[1:])
    except Fail as exc:
        sys.stderr.write("".join(f"{prog}: {line}\n" for line in str(exc).split("\n")) + exc.tail)
        return exc.code
