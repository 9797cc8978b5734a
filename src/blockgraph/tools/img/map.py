"""``img map``: the image's allocation, merged into runs, as qemu-img prints it."""

from __future__ import annotations

import getopt
import sys
from dataclasses import dataclass

from blockgraph.errors import IOFailure
from blockgraph.tools.img.common import F, Fail, chain_status, new_layer, open_image, root, size_arg


@dataclass
class _Entry:
    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None
    filename: str | None

    def mergeable(self, nxt: _Entry) -> bool:
        if (self.depth, self.present, self.zero, self.data, self.offset is None, self.filename) != (
                nxt.depth, nxt.present, nxt.zero, nxt.data, nxt.offset is None, nxt.filename):
            return False
        return self.offset is None or nxt.offset == self.offset + self.length

    def json(self) -> str:
        b = {True: "true", False: "false"}
        text = (f'{{ "start": {self.start}, "length": {self.length}, "depth": {self.depth}, '
                f'"present": {b[self.present]}, "zero": {b[self.zero]}, "data": {b[self.data]}')
        if self.offset is not None:
            text += f', "offset": {self.offset}'
        return text + "}"


def _hex(value: int) -> str:
    return f"{value:#x}" if value else "0"


class _Printer:
    def __init__(self, json_out: bool) -> None:
        self.json = json_out
        self.first = True

    def emit(self, entry: _Entry) -> None:
        if self.json:
            sys.stdout.write(("[" if self.first else ",\n") + entry.json())
            self.first = False
            return
        if entry.data and entry.offset is None:
            sys.stdout.flush()
            raise Fail("File contains external, encrypted or compressed clusters.")
        if entry.data:
            sys.stdout.write(f"{_hex(entry.start):<16}{_hex(entry.length):<16}"
                             f"{_hex(entry.offset or 0):<16}{entry.filename}\n")

    def finish(self) -> None:
        if self.json:
            sys.stdout.write("]\n")


def cmd_map(prog: str, args: list[str]) -> int:
    try:
        opts, rest = getopt.gnu_getopt(args, "hf:U", ["help", "output=", "object=", "image-opts",
                                                      "force-share", "start-offset=",
                                                      "max-length="])
    except getopt.GetoptError as exc:
        raise Fail(exc.msg) from None
    fmt: str | None = None
    output = "human"
    start = 0
    max_length: int | None = None
    for flag, value in opts:
        if flag == "-f":
            fmt = value
        elif flag == "--output":
            output = value
        elif flag == "--start-offset":
            start = _offset_arg(value, "start offset")
        elif flag == "--max-length":
            max_length = _offset_arg(value, "max length")
    if output not in ("human", "json"):
        raise Fail("--output must be used with human or json as argument.")
    if not rest:
        raise Fail("Expecting one image file name")
    filename = rest[-1]
    layer = new_layer(opts)
    try:
        bb = open_image(layer, filename, fmt, read_only=True)
        node = root(bb)
        length = bb.getlength()
        end = length if max_length is None else min(length, start + max_length)
        printer = _Printer(output == "json")
        if output == "human":
            sys.stdout.write(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n")
        current: _Entry | None = None
        pos = start
        while pos < end:
            try:
                st = layer.run(chain_status(node, pos, min(end - pos, 1 << 30)))
            except IOFailure as exc:
                raise Fail(f"Could not read file metadata: {exc}") from None
            entry = _Entry(pos, st.length, st.depth, bool(st.flags & F.ALLOCATED),
                           bool(st.flags & F.ZERO), bool(st.flags & F.DATA), st.offset,
                           st.file.filename if st.file is not None and st.offset is not None
                           else None)
            if current is not None and current.mergeable(entry):
                current.length += entry.length
            else:
                if current is not None:
                    printer.emit(current)
                current = entry
            pos += st.length
        if current is not None:
            printer.emit(current)
        printer.finish()
    finally:
        sys.stdout.flush()
        layer.close()
    return 0


def _offset_arg(text: str, what: str) -> int:
    try:
        return size_arg(text)
    except Fail:
        raise Fail(f"Invalid {what} specified! You may use k, M, G, T, P or E suffixes for ") \
            from None
