"""drivers/qcow2 layer: the qcow2 format driver and image creation."""

from typing import TYPE_CHECKING

from blockgraph.drivers.qcow2.driver import Qcow2Driver

if TYPE_CHECKING:
    from blockgraph.drivers.qcow2.create import qcow2_create, qcow2_create_line, raw_create_line

__all__ = ["Qcow2Driver", "qcow2_create", "qcow2_create_line", "raw_create_line"]

# Image creation is imported on first use: opening an image (every tool, the daemons) does not
# need it, and its import is paid at every start.
_CREATE_NAMES = ("qcow2_create", "qcow2_create_line", "raw_create_line")


def __getattr__(name: str) -> object:
    if name in _CREATE_NAMES:
        from blockgraph.drivers.qcow2 import create

        return getattr(create, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
