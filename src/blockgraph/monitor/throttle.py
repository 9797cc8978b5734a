"""``block_set_io_throttle``, shared by QMP and HMP: new I/O limits for a drive."""

from __future__ import annotations

from collections.abc import Mapping

from blockgraph.errors import BlockError, DeviceNotFound
from blockgraph.graph.layer import BlockLayer
from blockgraph.objects.throttle import QMP_MEMBERS, ThrottleLimits

# The members block_set_io_throttle requires: the six averages.
REQUIRED = tuple(QMP_MEMBERS)[:6]


def set_io_throttle(layer: BlockLayer, device: str | None, qdev_id: str | None,
                    values: Mapping[str, int], group: str | None = None) -> None:
    """Apply ``values`` (BlockIOThrottle members) to the drive ``device``.

    ``qdev_id`` names a guest device, which blockgraph has none of. Limits that are all zero
    end the drive's throttling.

    :raise BlockError: QEMU's texts, in its order (the drive first, then the limits).
    """
    if (device is None) == (qdev_id is None):
        raise BlockError("Need exactly one of 'device' and 'id'")
    name = device if device is not None else qdev_id
    bb = layer.find_backend(device) if device is not None else None
    if bb is None:
        raise DeviceNotFound(f"Device '{name}' not found")
    if bb.root is None:
        raise BlockError("Device has no medium")
    limits = ThrottleLimits({QMP_MEMBERS[k]: v for k, v in values.items()})
    limits.check()
    bb.set_io_limits(limits, group)
