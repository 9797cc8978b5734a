"""The human text of an ImageInfo, shared by ``qemu-img info`` and HMP ``info block -v``."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from blockgraph.drivers.base import SnapshotInfo
from blockgraph.graph.query import ImageInfo

# qcow2's format-specific keys in the order QEMU prints them.
_QCOW2_ORDER = ("compat", "compression-type", "lazy-refcounts", "bitmaps", "refcount-bits",
                "data-file", "data-file-raw", "corrupt", "extended-l2")


_SIZE_PREFIXES = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")


def size_to_str(size: int) -> str:
    """A size with three significant digits and a binary unit: ``64 MiB``, ``196 KiB``.

    QEMU's ``size_to_str`` moves to the next unit at 1000 of the smaller one, not 1024, so
    that three digits always suffice: 1000 bytes print as ``0.977 KiB``, never ``1e+03 B``.
    """
    exponent = math.frexp(size * 1024 / 1000)[1]
    index = min(max(exponent - 1, 0) // 10, len(_SIZE_PREFIXES) - 1)
    return f"{size / (1 << (10 * index)):.3g} {_SIZE_PREFIXES[index]}B"


def format_snapshot_list(snapshots: Sequence[SnapshotInfo]) -> str:
    """``Snapshot list:`` and its table, as ``qemu-img snapshot -l`` and ``info`` print it;
    empty without snapshots."""
    if not snapshots:
        return ""
    lines = ["Snapshot list:",
             f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"]
    for sn in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn.date_sec))
        secs, nsec = divmod(sn.vm_clock_nsec, 1_000_000_000)
        clock = (f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}."
                 f"{nsec // 1_000_000:03d}")
        icount = "" if sn.icount < 0 else str(sn.icount)
        lines.append(f"{sn.id_str:<9} {sn.name:<16} {size_to_str(sn.vm_state_size):>8}"
                     f"{date:>20}{clock:>13}{icount:>11}")
    return "".join(line + "\n" for line in lines)


def _snapshot_json(sn: SnapshotInfo) -> dict[str, object]:
    # QEMU's output order (its dictionary's hash order), not the schema's.
    data: dict[str, object] = {}
    if sn.icount >= 0:
        data["icount"] = sn.icount
    secs, nsec = divmod(sn.vm_clock_nsec, 1_000_000_000)
    data.update({"vm-clock-nsec": nsec, "name": sn.name, "date-sec": sn.date_sec,
                 "date-nsec": sn.date_nsec, "vm-clock-sec": secs, "id": sn.id_str,
                 "vm-state-size": sn.vm_state_size})
    return data


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def specific_lines(key: str, value: object, indent: int) -> list[str]:
    """One format-specific member as QEMU's human printer shows it: lists as ``[i]:``
    items, dicts as nested keys, each level four spaces deeper."""
    pad = " " * indent
    if isinstance(value, list):
        lines = [f"{pad}{key}:"]
        for i, item in enumerate(value):
            if isinstance(item, (list, dict)):
                lines += specific_lines(f"[{i}]", item, indent + 4)
            else:
                lines.append(f"{pad}    [{i}]: {_value(item)}")
        return lines
    if isinstance(value, dict):
        lines = [f"{pad}{key}:"]
        for k, v in value.items():
            lines += specific_lines(k.replace("-", " ") if not k.startswith("[") else k, v, indent + 4)
        return lines
    return [f"{pad}{key}: {_value(value)}"]


def format_image_info(info: ImageInfo) -> str:
    """``image: ...`` to the end of ``Format specific information`` for one image."""
    lines = [f"image: {info.filename}", f"file format: {info.format}",
             f"virtual size: {size_to_str(info.virtual_size)} ({info.virtual_size} bytes)",
             f"disk size: {size_to_str(info.actual_size) if info.actual_size is not None else 'unavailable'}"]
    if info.encrypted:
        lines.append("encrypted: yes")
    if info.cluster_size:
        lines.append(f"cluster_size: {info.cluster_size}")
    if info.backing_filename:
        text = f"backing file: {info.backing_filename}"
        if info.full_backing_filename and info.full_backing_filename != info.backing_filename:
            text += f" (actual path: {info.full_backing_filename})"
        lines.append(text)
    if info.backing_filename_format:
        lines.append(f"backing file format: {info.backing_filename_format}")
    text = "".join(line + "\n" for line in lines) + format_snapshot_list(info.snapshots)
    lines = []
    if info.format_specific:
        lines.append("Format specific information:")
        keys = [k for k in _QCOW2_ORDER if k in info.format_specific]
        keys += [k for k in info.format_specific if k not in keys]
        for key in keys:
            lines += specific_lines(key.replace("-", " "), info.format_specific[key], 4)
    return text + "".join(line + "\n" for line in lines)


def image_info_json(info: ImageInfo) -> dict[str, object]:
    """An ImageInfo as ``qemu-img info --output=json`` prints it (QEMU's member order)."""
    data: dict[str, object] = {}
    if info.backing_filename_format:
        data["backing-filename-format"] = info.backing_filename_format
    if info.snapshots:
        data["snapshots"] = [_snapshot_json(sn) for sn in info.snapshots]
    data["virtual-size"] = info.virtual_size
    data["filename"] = info.filename
    if info.cluster_size:
        data["cluster-size"] = info.cluster_size
    data["format"] = info.format
    data["actual-size"] = info.actual_size if info.actual_size is not None else 0
    if info.format_specific:
        keys = [k for k in _QCOW2_ORDER if k in info.format_specific]
        keys += [k for k in info.format_specific if k not in keys]
        data["format-specific"] = {"type": info.format,
                                   "data": {k: info.format_specific[k] for k in keys}}
    if info.backing_filename and info.full_backing_filename:
        data["full-backing-filename"] = info.full_backing_filename
        data["backing-filename"] = info.backing_filename
    data["dirty-flag"] = info.dirty_flag
    return data


def format_image_chain(info: ImageInfo) -> str:
    """Every image of a chain, top first, as ``info block -v`` lists them."""
    out: list[str] = []
    current: ImageInfo | None = info
    while current is not None:
        out.append(format_image_info(current))
        current = current.backing_image
    return "".join(out)
