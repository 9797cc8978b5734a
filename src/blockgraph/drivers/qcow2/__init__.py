"""drivers/qcow2 layer: the qcow2 format driver and image creation."""

from blockgraph.drivers.qcow2.create import qcow2_create, qcow2_create_line, raw_create_line
from blockgraph.drivers.qcow2.driver import Qcow2Driver

__all__ = ["Qcow2Driver", "qcow2_create", "qcow2_create_line", "raw_create_line"]
