"""``blockgraph`` and its subcommands; also a multi-call binary, busybox style.

Invoked under the name of a QEMU tool (a symlink ``qemu-img -> blockgraph``), it behaves as
that tool, so scripts that run QEMU's binaries by name can run ours unchanged, and error
messages begin with the same program name.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

_BY_PROGRAM = {
    "qemu-img": "img",
    "qemu-io": "io",
    "qemu-nbd": "nbd",
    "qemu-storage-daemon": "storage-daemon",
    "qemu-system-x86_64": "system",
}

_USAGE = """\
usage: blockgraph COMMAND [ARGS...]

commands:
  img             qemu-img compatible image tool
  io              qemu-io compatible I/O tester
  system          the block options of qemu-system-x86_64 (no guest)
  nbd             qemu-nbd compatible NBD server
  storage-daemon  qemu-storage-daemon compatible daemon (QMP monitor; NBD exports not yet)
"""


def _load(sub: str) -> Callable[[str, list[str]], int] | None:
    if sub == "img":
        from blockgraph.tools.img import main as img_main

        return img_main
    if sub == "io":
        from blockgraph.tools.io import main as io_main

        return io_main
    if sub == "system":
        from blockgraph.tools.system import main as system_main

        return system_main
    if sub == "nbd":
        from blockgraph.tools.nbd import main as nbd_main

        return nbd_main
    if sub == "storage-daemon":
        from blockgraph.tools.storage_daemon import main as storage_daemon_main

        return storage_daemon_main
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    prog = os.path.basename(argv[0]) if argv else "blockgraph"
    sub = _BY_PROGRAM.get(prog)
    args = argv[1:]
    if sub is None:
        if not args or args[0] in ("-h", "--help"):
            sys.stdout.write(_USAGE)
            return 0 if args else 1
        sub, args = args[0], args[1:]
        prog = f"blockgraph-{sub}"
    entry = _load(sub)
    if entry is None:
        sys.stderr.write(f"blockgraph: unknown command '{sub}'\n")
        return 1
    return entry(prog, args)


if __name__ == "__main__":
    raise SystemExit(main())
