"""``img dd``: copy ``count`` blocks of ``bs`` bytes from ``if``, skipping ``skip`` blocks.

As qemu-img 7.2 does, the output's size is the input size (or ``count * bs``) minus the
skipped bytes, and a skip past that size is reported but not an error.
"""

from __future__ import annotations

import getopt
import os
import sys

from blockgraph.errors import BlockError, IOFailure, OptionError
from blockgraph.graph.create import create_image
from blockgraph.options.schema import parse_size
from blockgraph.tools.img.common import IO_BUF_SIZE, Fail, new_layer, open_image

_INT_MAX = (1 << 31) - 1


def _number(key: str, value: str, *, suffixes: bool) -> int:
    try:
        return parse_size(key, value) if suffixes else int(value, 10)
    except (OptionError, ValueError):
        raise Fail(f"invalid number: '{value}'") from None


def cmd_dd(prog: str, args: list[str]) -> int:
    try:
        opts, rest = getopt.gnu_getopt(args, "hf:O:U", ["help", "image-opts", "force-share",
                                                        "object="])
    except getopt.GetoptError as exc:
        raise Fail(exc.msg) from None
    fmt: str | None = None
    out_fmt = "raw"
    for flag, value in opts:
        if flag == "-f":
            fmt = value
        elif flag == "-O":
            out_fmt = value
    in_name = out_name = None
    bs = 512
    count: int | None = None
    skip = 0
    for operand in rest:
        key, eq, value = operand.partition("=")
        if not eq or key not in ("if", "of", "bs", "count", "skip"):
            raise Fail(f"unrecognized operand {key}")
        if key == "if":
            in_name = value
        elif key == "of":
            out_name = value
        elif key == "bs":
            try:
                bs = parse_size("bs", value)
            except OptionError:
                bs = 0
            if not 1 <= bs <= _INT_MAX:
                raise Fail(f"Invalid bs specified. Must be between 1 and {_INT_MAX}.")
        elif key == "count":
            count = _number(key, value, suffixes=True)
        else:
            skip = _number(key, value, suffixes=True)
    if in_name is None or out_name is None:
        raise Fail("Must specify both input and output files")
    if out_fmt not in ("raw", "qcow2"):
        raise Fail(f"Unknown file format '{out_fmt}'")
    layer = new_layer(opts)
    try:
        src = open_image(layer, in_name, fmt, read_only=True)
        size = src.getlength()
        if count is not None and count * bs < size:
            size = count * bs
        offset = skip * bs
        in_pos = offset
        if skip and size < offset:
            sys.stderr.write(f"{prog}: {in_name}: cannot skip to specified offset\n")
            in_pos = size
        out_size = size - in_pos
        try:
            layer.run(create_image(layer, out_name, out_fmt, -(-out_size // 512) * 512, {}))
        except BlockError as exc:
            raise Fail(f"{out_name}: error while creating output image: {exc}") from None
        dst = open_image(layer, out_name, out_fmt, read_only=False, cache="unsafe")
        buf = bytearray(max(bs, IO_BUF_SIZE // bs * bs) if bs <= IO_BUF_SIZE else bs)
        view = memoryview(buf)
        pos = in_pos
        while pos < size:
            n = min(len(buf), size - pos)
            try:
                layer.run(src.preadv(pos, view[:n]))
            except IOFailure as exc:
                raise Fail(f"{in_name}: error while reading: {os.strerror(exc.errno)}") from None
            try:
                layer.run(dst.pwritev(pos - offset, view[:n]))
            except IOFailure as exc:
                raise Fail(f"{out_name}: error while writing: {os.strerror(exc.errno)}") from None
            pos += n
        layer.run(dst.flush())
    finally:
        layer.close()
    return 0
