"""What every benchmark does first."""

from __future__ import annotations

import compileall
from pathlib import Path

import blockgraph


def precompile() -> None:
    """Byte-compile blockgraph, as a regular (non-editable) install does at install time.

    The venv is an editable install, and with PYTHONDONTWRITEBYTECODE set (it is on these
    machines) every tool start would compile all its modules from source again: about a third
    of ``img info``'s start-up. QEMU's side of a ratio pays no such cost either.
    """
    compileall.compile_dir(str(Path(blockgraph.__file__).parent), quiet=1)
