"""Reopen: change the options of a node and of the children that inherit from it.

The new options of each node are decided in QEMU's order of precedence, highest first:

1. options given to this reopen (for a child: the ``child.key`` ones);
2. the node's explicit options from before;
3. what the child inherits from its parent's *new* options (by role);
4. the node's old effective options.

Only children whose ``inherits_from`` is the parent are reopened with it; a node referenced
by name keeps its options. The whole reopen is one transaction: every node is prepared, and
either all commit or, if any refuses, all abort and nothing has changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from blockgraph.drivers.base import ChildRole, NodeFlags
from blockgraph.errors import BlockError
from blockgraph.graph.inherit import AIO_FLAG, inherit_options
from blockgraph.graph.layer import DISCARD_MODES, GENERIC_OPTIONS, WRITETHROUGH_ERROR
from blockgraph.graph.node import Node
from blockgraph.options.keyval import extract_subdict
from blockgraph.options.schema import convert_option

# Options fixed at open: a reopen that tries to change them fails.
_IMMUTABLE = ("driver", "node-name", "filename")


@dataclass
class _Entry:
    node: Node
    options: dict[str, Any]
    explicit: dict[str, object]
    runtime: dict[str, Any]
    flags: NodeFlags
    write_cache: bool | None
    prepared: bool = False


def _typed(key: str, value: object) -> object:
    spec = GENERIC_OPTIONS.get(key)
    return convert_option(key, spec, value) if spec is not None else value


def _queue(
    node: Node,
    given: dict[str, object],
    parent_new: Mapping[str, object] | None,
    role: ChildRole | None,
    entries: list[_Entry],
) -> None:
    driver = node.driver
    known = set(GENERIC_OPTIONS) | set(driver.runtime_options)
    child_given = {c.name: extract_subdict(given, c.name) for c in node.children}
    own = dict(given)
    current = {"driver": node.driver_name, "node-name": node.node_name,
               "filename": driver.open_options().get("filename")}
    for child in node.children:
        if child.node.inherits_from is not node and child_given[child.name]:
            # A referenced node is not reopened through its parent.
            key = next(iter(child_given[child.name]))
            raise BlockError(f"Cannot change the option '{child.name}.{key}'")
    for key in list(own):
        if key in _IMMUTABLE and own[key] != current[key]:
            raise BlockError(f"Cannot change the option '{key}'")
        if key not in known and not any(
            key == p or key.startswith(p + ".") for p in driver.runtime_option_prefixes
        ):
            raise BlockError(f"Cannot change the option '{key}'")
    write_cache: bool | None = None
    if "cache.writeback" in own:
        writeback = bool(_typed("cache.writeback", own.pop("cache.writeback")))
        if node.backends:
            write_cache = writeback
        elif not writeback:
            raise BlockError(WRITETHROUGH_ERROR)
    for key in _IMMUTABLE:
        own.pop(key, None)
    typed_own = {k: _typed(k, v) for k, v in own.items()}
    explicit = {**node.explicit_options, **typed_own}
    new: dict[str, object] = dict(explicit)
    if parent_new is not None and role is not None:
        inherit_options(role, parent_new, new)
    for key, value in node.options.items():
        new.setdefault(key, value)
    new = {k: _typed(k, v) for k, v in new.items()}
    discard = str(new.get("discard", "ignore"))
    if discard not in DISCARD_MODES:
        raise BlockError("Invalid discard option")
    flags = NodeFlags(
        read_only=bool(new.get("read-only", False)),
        direct=bool(new.get("cache.direct", False)),
        no_flush=bool(new.get("cache.no-flush", False)),
        discard_unmap=DISCARD_MODES[discard],
        no_backing=node.flags.no_backing,
        aio=node.flags.aio,
    )
    generic = {k: v for k, v in new.items()
               if (k in GENERIC_OPTIONS or k == AIO_FLAG) and k not in _IMMUTABLE}
    runtime = {k: v for k, v in new.items() if k not in GENERIC_OPTIONS and k != AIO_FLAG}
    entries.append(_Entry(node, generic, explicit, runtime, flags, write_cache))
    for child in node.children:
        if child.node.inherits_from is node:
            _queue(child.node, child_given[child.name], generic, child.role, entries)


async def reopen(node: Node, options: Mapping[str, object], *, read_only: bool | None = None) -> None:
    """Reopen ``node`` with ``options`` (flat; strings or typed), optionally changing read-only.

    :raise BlockError: QEMU's message; then no node has changed.
    """
    given = dict(options)
    if read_only is not None:
        given.setdefault("read-only", read_only)
    entries: list[_Entry] = []
    _queue(node, given, None, None, entries)
    for entry in entries:
        if entry.flags.read_only and not entry.node.flags.read_only:
            # Whatever a node still caches must reach its image before write access ends.
            await entry.node.flush()
    try:
        for entry in entries:
            entry.node.driver.reopen_prepare(entry.runtime, entry.flags)
            entry.prepared = True
    except BaseException:
        for entry in entries:
            if entry.prepared:
                entry.node.driver.reopen_abort()
        raise
    for entry in entries:
        entry.node.driver.reopen_commit()
        target = entry.node.flags
        target.read_only = entry.flags.read_only
        target.direct = entry.flags.direct
        target.no_flush = entry.flags.no_flush
        target.discard_unmap = entry.flags.discard_unmap
        entry.node.options = entry.options
        entry.node.explicit_options = entry.explicit
        if entry.write_cache is not None:
            for bb in entry.node.backends:
                bb.write_cache = entry.write_cache
