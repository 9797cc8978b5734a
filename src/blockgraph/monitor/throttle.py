"""``block_set_io_throttle``, shared by QMP and HMP: new I/O limits for a drive."""

from __future__ import annotations

from collections.abc import Mapping

from blockgraph.errors import BlockError, DeviceNotFound
from blockgraph.graph.layer import BlockLayer
from blockgraph.objects.throttle import QUERY_NAMES, ThrottleLimits

# BlockIOThrottle's members (QMP's names) and the limits they set.
_MEMBER_KEYS: dict[str, str] = {
    **{name: bucket for bucket, name in QUERY_NAMES.items()},
    **{f"{name}_max": f"{bucket}-max" for bucket, name in QUERY_NAMES.items()},
    **{f"{name}_max_length": f"{bucket}-max-length" for bucket, name in QUERY_NAMES.items()},
    "iops_size": "iops-size",
}
# The order of QEMU's schema, which decides which missing member is reported.
MEMBERS = ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr",
           *(f"{n}_max" for n in ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")),
           *(f"{n}_max_length" for n in ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")),
           "iops_size")
REQUIRED = MEMBERS[:6]


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
    limits = ThrottleLimits({_MEMBER_KEYS[k]: v for k, v in values.items()})
    limits.check()
    bb.set_io_limits(limits, group)
