"""The QEMU release whose interfaces blockgraph speaks, and blockgraph's own version."""

QEMU_VERSION = (7, 2, 0)
QEMU_VERSION_STRING = ".".join(str(part) for part in QEMU_VERSION)
BLOCKGRAPH_VERSION = "0.1.0"
