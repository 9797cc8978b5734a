"""``img measure``: the file size a conversion to ``-O`` would need.

For qcow2 the metadata (header, L1, L2 tables, refcount table and blocks covering themselves)
is computed from the geometry; the data part counts the clusters holding data in the source,
walked by block status in runs.
"""

from __future__ import annotations

import getopt
import json
import sys

from blockgraph.errors import OptionError
from blockgraph.options.keyval import parse_drive_opts
from blockgraph.tools.img.common import (
    F,
    Fail,
    chain_status,
    new_layer,
    open_image,
    root,
    size_arg,
    typed_create_option,
)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _align(a: int, b: int) -> int:
    return _ceil_div(a, b) * b


def refcount_metadata_size(covered: int, cluster_size: int, refcount_bits: int) -> int:
    """Bytes of refcount table and blocks needed for ``covered`` bytes plus themselves."""
    clusters = _ceil_div(covered, cluster_size)
    per_block = cluster_size * 8 // refcount_bits
    blocks = table = 0
    while True:
        total = clusters + blocks + table
        new_blocks = _ceil_div(total, per_block)
        new_table = _ceil_div(new_blocks * 8, cluster_size)
        if (new_blocks, new_table) == (blocks, table):
            return (blocks + table) * cluster_size
        blocks, table = new_blocks, new_table


def qcow2_metadata_size(size: int, cluster_size: int, refcount_bits: int, extended_l2: bool) -> int:
    """Header, L1, L2 and refcount structures of a fully allocated qcow2 image."""
    l2_entry = 16 if extended_l2 else 8
    aligned = _align(size, cluster_size)
    l2_entries = _align(aligned // cluster_size, cluster_size // l2_entry)
    meta = cluster_size + l2_entries * l2_entry
    l1_entries = _align(l2_entries * l2_entry // cluster_size, cluster_size // 8)
    meta += l1_entries * 8
    return meta + refcount_metadata_size(aligned + meta, cluster_size, refcount_bits)


def cmd_measure(prog: str, args: list[str]) -> int:
    try:
        opts, rest = getopt.gnu_getopt(args, "hf:O:o:l:U", ["help", "output=", "size=", "object=",
                                                            "image-opts", "force-share"])
    except getopt.GetoptError as exc:
        raise Fail(exc.msg) from None
    fmt: str | None = None
    out_fmt = "raw"
    output = "human"
    size: int | None = None
    raw_options: dict[str, str] = {}
    for flag, value in opts:
        if flag == "-f":
            fmt = value
        elif flag == "-O":
            out_fmt = value
        elif flag == "--output":
            output = value
        elif flag == "--size":
            try:
                size = size_arg(value)
            except Fail:
                raise Fail("Invalid image size specified. Must be between 0 and 9223372036854775807.") \
                    from None
        elif flag == "-o":
            try:
                raw_options.update(parse_drive_opts(value))
            except OptionError as exc:
                raise Fail(str(exc)) from None
    if output not in ("human", "json"):
        raise Fail("--output must be used with human or json as argument.")
    if size is None and not rest:
        raise Fail("Either --size N or one filename must be specified.")
    if size is not None and rest:
        raise Fail("--size N cannot be used together with a filename.")
    if len(rest) > 1:
        raise Fail("At most one filename argument is allowed.")
    if out_fmt not in ("raw", "qcow2"):
        raise Fail(f"Unknown file format '{out_fmt}'")
    options: dict[str, object] = {}
    for key, value in raw_options.items():
        try:
            options[key] = typed_create_option(key, value)
        except OptionError as exc:
            raise Fail(str(exc)) from None
    cluster_size = int(str(options.get("cluster_size", 65536)))
    refcount_bits = int(str(options.get("refcount_bits", 16)))
    extended_l2 = bool(options.get("extended_l2", False))
    prealloc = str(options.get("preallocation", "off"))
    layer = new_layer(opts)
    data = 0
    have_source = False
    source_bitmaps = False
    try:
        if rest:
            have_source = True
            bb = open_image(layer, rest[0], fmt, read_only=True)
            size = bb.getlength()
            node = root(bb)
            source_bitmaps = node.driver_name == "qcow2"
            pos = last_end = 0
            while pos < size:
                st = layer.run(chain_status(node, pos, min(size - pos, 1 << 30)))
                if st.flags & F.DATA and not st.flags & F.ZERO:
                    lo = pos // cluster_size * cluster_size
                    hi = _align(pos + st.length, cluster_size)
                    data += max(0, hi - max(lo, last_end))
                    last_end = max(last_end, hi)
                pos += st.length
    finally:
        layer.close()
    assert size is not None
    size = _align(size, 512)
    result: dict[str, int] = {}
    if out_fmt == "qcow2":
        meta = qcow2_metadata_size(size, cluster_size, refcount_bits, extended_l2)
        full = meta + _align(size, cluster_size)
        required = full if prealloc in ("falloc", "full") else meta + data
        if have_source and source_bitmaps:
            result["bitmaps"] = 0
    else:
        full = required = size
    result["required"] = required
    result["fully-allocated"] = full
    if output == "json":
        sys.stdout.write(json.dumps(result, indent=4) + "\n")
    else:
        sys.stdout.write(f"required size: {required}\nfully allocated size: {full}\n")
        if "bitmaps" in result:
            sys.stdout.write(f"bitmaps size: {result['bitmaps']}\n")
    return 0
