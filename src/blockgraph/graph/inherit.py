"""What a child node inherits from its parent, by role (``specs/qemu-cache-model.md`` b.5).

Inheritance only fills in defaults: an option the user set on the child always wins. The same
function serves open and reopen, so a child follows its parent the same way in both.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

from blockgraph.drivers.base import ChildRole

# -drive's aio= travels down the whole tree as an open flag, not as an option any node could
# be given; the key cannot be typed on a command line.
AIO_FLAG = "\0aio"

# Options a child copies from its parent when it has no value of its own.
_COPIED = ("cache.direct", "cache.no-flush", "force-share", AIO_FLAG)


def inherit_options(
    role: ChildRole, parent_options: Mapping[str, object], child_options: MutableMapping[str, object]
) -> None:
    """Fill ``child_options`` with the defaults a child of ``role`` takes from its parent."""
    for key in _COPIED:
        if key not in child_options and key in parent_options:
            child_options[key] = parent_options[key]
    if role & ChildRole.COW:
        # Backing files are read-only, and always writeback: only a root can be writethrough.
        child_options.setdefault("read-only", True)
        child_options.setdefault("auto-read-only", False)
    else:
        for key in ("read-only", "auto-read-only"):
            if key not in child_options and key in parent_options:
                child_options[key] = parent_options[key]
    child_options.setdefault("discard", "unmap")


def child_is_protocol(role: ChildRole, parent_is_format: bool, parent_is_protocol: bool) -> bool:
    """Whether a child is opened without format probing (QEMU's ``BDRV_O_PROTOCOL``).

    A format node's non-backing children and every metadata child hold raw bytes of an image,
    so they get a protocol driver; a backing file is an image of its own and is probed; a filter
    passes its parent's level down.
    """
    if parent_is_format and not role & ChildRole.COW:
        return True
    if role & ChildRole.METADATA:
        return True
    if role & ChildRole.COW:
        return False
    return parent_is_protocol
