"""``img resize``: grow or (with ``--shrink``) shrink an image to a new or relative size."""

from __future__ import annotations

import getopt
import sys

from blockgraph.drivers.base import PREALLOC_MODES, PreallocMode
from blockgraph.errors import BlockError, IOFailure, OptionError
from blockgraph.options.schema import parse_size
from blockgraph.tools.img.common import Fail, new_layer, open_image, root

_SHRINK_WARNING = ("warning: Shrinking an image will delete all data beyond the shrunken "
                   "image's end. Before performing such an operation, make sure there is no "
                   "important data there.")
_SIZE_ERROR = "Parameter 'size' expects a non-negative number below 2^64"
_SIZE_TAIL = ("Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
               "and exabytes, respectively.\n")


def cmd_resize(prog: str, args: list[str]) -> int:
    if not args:
        raise Fail("Expecting image file name and size")
    # The size goes last and may start with '-': take it before getopt sees it.
    size_text = args[-1]
    try:
        opts, rest = getopt.gnu_getopt(args[:-1], "f:hq", ["help", "object=", "image-opts",
                                                           "preallocation=", "shrink"])
    except getopt.GetoptError as exc:
        raise Fail(exc.msg) from None
    if rest and rest[-1] == "--":
        rest = rest[:-1]
    fmt: str | None = None
    quiet = shrink = image_opts = False
    prealloc: PreallocMode = "off"
    for flag, value in opts:
        if flag == "-f":
            fmt = value
        elif flag == "-q":
            quiet = True
        elif flag == "--shrink":
            shrink = True
        elif flag == "--image-opts":
            image_opts = True
        elif flag == "--preallocation":
            # Checked as the option is parsed: qemu-img reports it before a bad size.
            mode = PREALLOC_MODES.get(value)
            if mode is None:
                raise Fail(f"Invalid preallocation mode '{value}'")
            prealloc = mode
    if len(rest) != 1:
        raise Fail("Expecting image file name and size")
    filename = rest[0]
    relative = 0
    if size_text[:1] in "+-" and size_text:
        relative = 1 if size_text[0] == "+" else -1
        size_text = size_text[1:]
    try:
        size = parse_size("size", size_text)
    except OptionError:
        raise Fail(_SIZE_ERROR, tail=_SIZE_TAIL) from None
    layer = new_layer(opts)
    try:
        bb = open_image(layer, filename, fmt, read_only=False, image_opts=image_opts, prog=prog)
        current = bb.getlength()
        total = current + relative * size if relative else size
        if total <= 0:
            raise Fail("New image size must be positive")
        if prealloc != "off" and total <= current:
            raise Fail("Preallocation can only be used for growing images")
        if total < current and not shrink:
            sys.stderr.write(f"{prog}: Use the --shrink option to perform a shrink operation.\n"
                             f"{prog}: {_SHRINK_WARNING}\n")
            return 1
        node = root(bb)
        try:
            layer.run(node.truncate(total, prealloc))
            layer.run(node.flush())
        except IOFailure as exc:
            raise Fail(str(exc)) from None
        except BlockError as exc:
            raise Fail(str(exc)) from None
        if not quiet:
            sys.stdout.write("Image resized.\n")
    finally:
        layer.close()
    return 0
