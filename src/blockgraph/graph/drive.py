"""``-drive``: one BlockBackend and the node tree under it, from QemuOpts-style options.

This is QEMU's ``drive_new``/``blockdev_init``: it picks the BlockBackend's name, applies the
legacy ``cache=`` mode, moves ``cache.writeback`` to the BlockBackend, and opens the root node
as that BlockBackend's root so that the root, and only the root, may be writethrough.
"""

from __future__ import annotations

from blockgraph.errors import BlockError
from blockgraph.graph.inherit import AIO_FLAG
from blockgraph.graph.layer import BlockLayer
from blockgraph.graph.node import BlockBackend
from blockgraph.objects.throttle import LIMIT_KEYS, ThrottleLimits
from blockgraph.options.cache import apply_legacy_cache
from blockgraph.options.schema import parse_bool, parse_number

# Keys -drive handles itself; everything else goes to the root node.
_IF_TYPES = ("none", "ide", "scsi", "floppy", "pflash", "mtd", "sd", "virtio", "xen")
_WERROR = ("enospc", "report", "ignore", "stop")
_RERROR = ("report", "ignore", "stop")
_DRIVE_ONLY = ("if", "index", "bus", "unit", "media", "serial", "addr", "boot", "trans",
               "cyls", "heads", "secs", "copy-on-read", "snapshot", "werror", "rerror",
               "readonly")


# -drive's older spellings of the throttling options, renamed first, as QEMU does.
_LEGACY_NAMES = (
    *((f"{short}", f"throttling.{bucket}") for short, bucket in (
        ("bps", "bps-total"), ("bps_rd", "bps-read"), ("bps_wr", "bps-write"),
        ("iops", "iops-total"), ("iops_rd", "iops-read"), ("iops_wr", "iops-write"))),
    *((f"{short}_max", f"throttling.{bucket}-max") for short, bucket in (
        ("bps", "bps-total"), ("bps_rd", "bps-read"), ("bps_wr", "bps-write"),
        ("iops", "iops-total"), ("iops_rd", "iops-read"), ("iops_wr", "iops-write"))),
    ("iops_size", "throttling.iops-size"),
    ("group", "throttling.group"),
)


def _parse_throttling(opts: dict[str, str]) -> tuple[ThrottleLimits, str | None]:
    """Pop the ``throttling.*`` keys: the limits (checked) and the group, if named.

    :raise BlockError: QEMU's texts, a limit that is not a number first.
    """
    values: dict[str, int] = {}
    group: str | None = None
    for key in [k for k in opts if k.startswith("throttling.")]:
        name = key[len("throttling."):]
        if name == "group":
            group = opts.pop(key)
        elif name in LIMIT_KEYS:
            values[name] = parse_number(key, opts.pop(key))
        # Anything else is left for the root node, which reports it as unsupported.
    limits = ThrottleLimits(values)
    limits.check()
    return limits, group


async def drive_new(layer: BlockLayer, opts: dict[str, str]) -> BlockBackend:
    """Create the BlockBackend and nodes for one ``-drive``.

    :param opts: the parsed ``-drive`` options (flat, strings).
    :raise BlockError: with QEMU's message; nothing is left behind.
    """
    opts = dict(opts)
    for old, new in _LEGACY_NAMES:
        if old in opts:
            if new in opts:
                raise BlockError(f"'{new}' and its alias '{old}' can't be used at the same time")
            opts[new] = opts.pop(old)
    if_type = opts.pop("if", "ide")
    if if_type not in _IF_TYPES:
        raise BlockError(f"unsupported bus type '{if_type}'")
    # QEMU numbers drives per interface, counting those with an id= too.
    index = layer.drive_counts.get(if_type, 0)
    layer.drive_counts[if_type] = index + 1
    # QEMU names a drive without id= after its interface and index ("none0", "ide0-hd0").
    default_name = f"ide{index // 2}-hd{index % 2}" if if_type == "ide" else f"{if_type}{index}"
    name = opts.pop("id", None) or default_name
    apply_legacy_cache(opts)
    # -drive gives the root its cache options explicitly, defaults included, so they beat any
    # inside a json: filename (options given directly win over json: ones).
    opts.setdefault("cache.writeback", "on")
    opts.setdefault("cache.direct", "off")
    opts.setdefault("cache.no-flush", "off")
    aio = opts.pop("aio", None)
    if aio is not None and aio not in ("threads", "native", "io_uring"):
        raise BlockError("invalid aio option")
    werror = opts.pop("werror", "enospc")
    if werror not in _WERROR:
        raise BlockError(f"'{werror}' invalid write error action")
    rerror = opts.pop("rerror", "report")
    if rerror not in _RERROR:
        raise BlockError(f"'{rerror}' invalid read error action")
    read_only = parse_bool("read-only", opts.pop("read-only", "off"))
    if "readonly" in opts:
        read_only = parse_bool("readonly", opts.pop("readonly")) or read_only
    snapshot = parse_bool("snapshot", opts.pop("snapshot", "off"))
    for key in _DRIVE_ONLY:
        opts.pop(key, None)
    throttle = _parse_throttling(opts)
    filename = opts.pop("file", None)
    fmt = opts.pop("format", None)
    if fmt is not None:
        if "driver" in opts:
            raise BlockError("Cannot specify both 'driver' and 'format'")
        opts["driver"] = fmt
    options: dict[str, object] = dict(opts)
    if aio is not None and aio != "threads":
        options[AIO_FLAG] = aio
    if read_only:
        options["read-only"] = "on"
    bb = layer.new_backend(name)
    bb.werror, bb.rerror, bb.read_only = werror, rerror, read_only
    limits, group = throttle
    bb.set_io_limits(limits, group)
    if filename is None and not any(k == "driver" or k.startswith("file.") for k in options):
        # An empty drive: a BlockBackend with no medium (removable media insert one later).
        return bb
    try:
        await layer.open_node(filename, options, backend=bb)
        if snapshot:
            from blockgraph.graph.snapshot import temporary_snapshot

            await temporary_snapshot(layer, bb)
    except BaseException:
        await layer.remove_backend(bb)
        raise
    return bb
