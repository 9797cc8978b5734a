"""``img check [-f fmt] [-r leaks|all] [-T cache] [--output=human|json] [-q] [-U] [--image-opts] FILE``.

Exit codes as qemu-img 7.2: 0 consistent, 1 check failed, 2 corruptions, 3 only leaks,
63 the format has no check. The checker's own lines (``Leaked cluster ...``, ``ERROR ...``,
``Repairing ...``) go to stderr, the report to stdout.
"""

from __future__ import annotations

import getopt
import json
import os
import sys

from blockgraph.drivers.qcow2.check import FIX_ERRORS, FIX_LEAKS, CheckResult
from blockgraph.drivers.qcow2.driver import Qcow2Driver
from blockgraph.errors import BlockError, IOFailure
from blockgraph.graph.layer import BlockLayer
from blockgraph.tools.img.common import (
    Fail,
    cache_options,
    new_layer,
    open_failure,
    parse_image_opts,
)

# ImageCheck members in the order QEMU's visitor inserts them into its QDict.
_JSON_FIELDS = ("filename", "format", "check-errors", "image-end-offset", "corruptions", "leaks",
                "corruptions-fixed", "leaks-fixed", "total-clusters", "allocated-clusters",
                "fragmented-clusters", "compressed-clusters")
_ALWAYS = ("filename", "format", "check-errors")


def _qdict_bucket(key: str) -> int:
    """The hash bucket of ``key`` in QEMU's QDict, which decides the JSON member order."""
    value = (0x238F13AF * len(key)) & 0xFFFFFFFF
    for i, ch in enumerate(key.encode()):
        value = (value + (ch << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % 512


def qdict_order(keys: list[str]) -> list[str]:
    """Keys in the order QEMU prints a QDict: by bucket, later insertions first in a bucket."""
    return sorted(keys, key=lambda k: (_qdict_bucket(k), -keys.index(k)))


def _fields(res: CheckResult, filename: str, fmt: str) -> dict[str, object]:
    values: dict[str, object] = {
        "filename": filename, "format": fmt, "check-errors": res.check_errors,
        "image-end-offset": res.image_end_offset, "corruptions": res.corruptions,
        "leaks": res.leaks, "corruptions-fixed": res.corruptions_fixed,
        "leaks-fixed": res.leaks_fixed, "total-clusters": res.total_clusters,
        "allocated-clusters": res.allocated_clusters,
        "fragmented-clusters": res.fragmented_clusters,
        "compressed-clusters": res.compressed_clusters,
    }
    return {k: values[k] for k in _JSON_FIELDS if k in _ALWAYS or values[k]}


def json_report(res: CheckResult, filename: str, fmt: str) -> str:
    fields = _fields(res, filename, fmt)
    ordered = {k: fields[k] for k in qdict_order(list(fields))}
    return json.dumps(ordered, indent=4) + "\n"


def human_report(res: CheckResult) -> str:
    out: list[str] = []
    if not (res.corruptions or res.leaks or res.check_errors):
        out.append("No errors were found on the image.\n")
    else:
        if res.corruptions:
            out.append(f"\n{res.corruptions} errors were found on the image.\n"
                       "Data may be corrupted, or further writes to the image may corrupt it.\n")
        if res.leaks:
            out.append(f"\n{res.leaks} leaked clusters were found on the image.\n"
                       "This means waste of disk space, but no harm to data.\n")
        if res.check_errors:
            out.append(f"\n{res.check_errors} internal errors have occurred during the check.\n")
    if res.total_clusters and res.allocated_clusters:
        alloc = res.allocated_clusters
        out.append(f"{alloc}/{res.total_clusters} = {alloc * 100.0 / res.total_clusters:.2f}% "
                   f"allocated, {res.fragmented_clusters * 100.0 / alloc:.2f}% fragmented, "
                   f"{res.compressed_clusters * 100.0 / alloc:.2f}% compressed clusters\n")
    if res.image_end_offset:
        out.append(f"Image end offset: {res.image_end_offset}\n")
    return "".join(out)


def _run_check(layer: BlockLayer, drv: Qcow2Driver, fix: int) -> tuple[CheckResult, str | None]:
    res = CheckResult()
    try:
        layer.run(drv.check(fix, res))
        error = None
    except IOFailure as exc:
        error = os.strerror(exc.errno) if exc.errno else str(exc)
    for line in res.messages:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()
    return res, error


def cmd_check(prog: str, args: list[str]) -> int:
    try:
        opts, rest = getopt.gnu_getopt(args, "hf:r:T:qU", ["output=", "object=", "image-opts",
                                                          "force-share", "help"])
    except getopt.GetoptError as exc:
        raise Fail(exc.msg) from None
    fmt: str | None = None
    output = "human"
    fix = 0
    quiet = image_opts = False
    cache = "writeback"
    for flag, value in opts:
        if flag == "-f":
            fmt = value
        elif flag == "-r":
            if value == "leaks":
                fix = FIX_LEAKS
            elif value == "all":
                fix = FIX_LEAKS | FIX_ERRORS
            else:
                raise Fail(f"Unknown option value for -r (expecting 'leaks' or 'all'): {value}",
                           tail=f"Try '{prog} --help' for more information\n")
        elif flag == "-T":
            cache = value
        elif flag == "-q":
            quiet = True
        elif flag == "--output":
            output = value
        elif flag == "--image-opts":
            image_opts = True
    if output not in ("human", "json"):
        raise Fail("--output must be used with human or json as argument.")
    if len(rest) != 1:
        raise Fail("Expecting one image file name")
    filename = rest[0]
    if image_opts and fmt:
        raise Fail("--image-opts and --format are mutually exclusive")

    layer = new_layer(opts)
    try:
        options: dict[str, object] = {}
        open_name: str | None = filename
        if image_opts:
            options.update(parse_image_opts(filename, prog))
            open_name = None
        elif fmt:
            options["driver"] = fmt
        node_opts, writeback = cache_options(cache, source=False)
        options.update(node_opts)
        options["read-only"] = not fix
        bb = layer.new_backend("")
        bb.write_cache = writeback
        try:
            node = layer.run(layer.open_node(open_name, options, backend=bb, check=True))
        except BlockError as exc:
            raise open_failure(filename, exc) from None
        drv = node.driver
        if not isinstance(drv, Qcow2Driver):
            raise Fail("This image format does not support checks", 63)
        shown_name = filename
        res, error = _run_check(layer, drv, fix)
        if error is None and (res.corruptions_fixed or res.leaks_fixed):
            if output == "human" and not quiet:
                sys.stdout.write("The following inconsistencies were found and repaired:\n\n"
                                 f"    {res.leaks_fixed} leaked clusters\n"
                                 f"    {res.corruptions_fixed} corruptions\n\n"
                                 "Double checking the fixed image now...\n")
            fixed = (res.leaks_fixed, res.corruptions_fixed)
            res, error = _run_check(layer, drv, 0)
            res.leaks_fixed, res.corruptions_fixed = fixed
        if error is None and not quiet:
            if output == "json":
                sys.stdout.write(json_report(res, shown_name, node.driver_name))
            else:
                sys.stdout.write(human_report(res))
        sys.stdout.flush()
        if error is not None:
            raise Fail(f"Check failed: {error}")
        if res.check_errors:
            raise Fail("Check failed")
        if res.corruptions:
            return 2
        return 3 if res.leaks else 0
    finally:
        layer.close()
