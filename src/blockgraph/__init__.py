"""blockgraph: QEMU's block layer in Python."""
