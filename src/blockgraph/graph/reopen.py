"""Reopen: change the options of nodes and of the children that inherit from them.

A reopen is a queue of nodes, built as QEMU builds it, then prepared and committed as one
transaction: every node is prepared, and either all commit or, if any refuses, all abort and
nothing has changed.

Each queued node's new options, highest precedence first:

1. options given for it (for a child: the ``child.key`` ones);
2. with *keep-old* (qemu-io's and HMP's reopen, a snapshot's): the node's explicit options;
3. what it inherits from its parent's new options (by role) -- only keys present there, so a
   default the parent falls back to in ``blockdev-reopen`` does not reach the child;
4. with keep-old: the node's old effective options; without (``blockdev-reopen``): defaults,
   except runtime options the user never set, which were defaults already.

Only children whose ``inherits_from`` is the parent are queued with it; a node referenced by
name keeps its options. A child named by reference to itself (``"file": "f"``) is queued with
keep-old, so it keeps what it has and can still inherit. A node queued twice takes the options
of its last queueing. A writable node needs writable file and data children.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
    # Children given another node (or, for backing, null): name -> new node or None.
    replace: dict[str, Node | None] = field(default_factory=dict)
    prepared: bool = False


def _typed(key: str, value: object) -> object:
    spec = GENERIC_OPTIONS.get(key)
    return convert_option(key, spec, value) if spec is not None else value


def _queue(
    node: Node,
    given: dict[str, object],
    parent_given: Mapping[str, object] | None,
    role: ChildRole | None,
    entries: dict[Node, _Entry],
    keep_old: bool,
) -> None:
    driver = node.driver
    known = set(GENERIC_OPTIONS) | set(driver.runtime_options)
    own = dict(given)
    referenced: set[str] = set()
    replace: dict[str, Node | None] = {}
    names = [c.name for c in node.children]
    if driver.supports_backing and "backing" not in names:
        names.append("backing")
    for name in names:
        if name not in own:
            continue
        value = own.pop(name)
        current_child = node.child(name)
        if current_child is not None and value == current_child.node.node_name:
            referenced.add(name)
        elif name in ("file", "backing"):
            replace[name] = _new_child(node, name, value)
        else:
            # QEMU re-parses only these two; any other child (data-file) stays as it is.
            raise BlockError(f"Cannot change the option '{name}'")
    if not keep_old:
        for child in node.children:
            if (child.name not in given and child.node.inherits_from is node
                    and not extract_subdict(dict(given), child.name)):
                # An implicit child left out of blockdev-reopen would be reopened with no
                # options at all; QEMU refuses that at its first option.
                raise BlockError("Option 'driver' cannot be reset to its default value")
    child_given = {c.name: extract_subdict(own, c.name) for c in node.children}
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
    explicit = {**node.explicit_options, **typed_own} if keep_old else typed_own
    new: dict[str, object] = dict(explicit)
    if parent_given is not None and role is not None:
        inherit_options(role, parent_given, new)
    if keep_old:
        for key, value in node.options.items():
            new.setdefault(key, value)
    # What the children inherit from: this node's options, old values included, defaults not.
    passed_down = dict(new)
    if not keep_old:
        for key, value in node.options.items():
            spec = GENERIC_OPTIONS.get(key)
            if key == AIO_FLAG or (spec is None and key not in node.explicit_options):
                # Fixed at open, or a runtime option that was never set: still its default.
                new.setdefault(key, value)
            elif spec is not None and spec.default is not None:
                new.setdefault(key, spec.default)
        for key in node.explicit_options:
            spec = driver.runtime_options.get(key)
            if key not in new and spec is not None and spec.default is not None:
                new[key] = spec.default
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
    # Queued again: the last queueing's options win, the place in the queue stays.
    entries[node] = _Entry(node, generic, explicit, runtime, flags, write_cache, replace)
    for child in node.children:
        if child.node.inherits_from is node and child.name not in replace:
            _queue(child.node, child_given[child.name], passed_down, child.role, entries,
                   keep_old or child.name in referenced)


def _new_child(node: Node, name: str, value: object) -> Node | None:
    """The node that ``name: value`` makes the child ``name`` of ``node`` (checked)."""
    if value is None:
        if name != "backing":
            raise BlockError(f"Cannot change the option '{name}'")
        return None
    if not isinstance(value, str):
        raise BlockError(f"Invalid parameter type for '{name}', expected: BlockdevRef")
    target = node.layer.find_node(value)
    if target is None:
        raise BlockError(f"Cannot find device='' nor node-name='{value}'")
    pending = [target]
    while pending:
        below = pending.pop()
        if below is node:
            kind = "backing" if name == "backing" else "file"
            raise BlockError(f"Making '{value}' a {kind} child of '{node.node_name}' "
                             "would create a cycle")
        pending.extend(below.io_children())
    return target


def _check_writable_children(entries: Mapping[Node, _Entry]) -> None:
    """A node that writes needs its file and data children to accept writes (QEMU's perms)."""
    for entry in entries.values():
        if entry.flags.read_only:
            # Going (or staying) read-only: no parent outside the queue may still write here.
            for edge in entry.node.parents:
                if edge.parent in entries or not edge.role & (ChildRole.DATA | ChildRole.METADATA):
                    continue
                if not edge.parent.flags.read_only:
                    raise BlockError(f"Read-only block node '{entry.node.node_name}' cannot "
                                     "support read-write users")
            continue
        for child in entry.node.children:
            if not child.role & (ChildRole.DATA | ChildRole.METADATA):
                continue
            target = entry.replace.get(child.name, child.node)
            if target is None:
                continue
            queued = entries.get(target)
            child_flags = queued.flags if queued is not None else target.flags
            if child_flags.read_only:
                raise BlockError("Block node is read-only")


def _replace_children(entry: _Entry, orphans: list[Node]) -> None:
    """Point the entry's children at their new nodes; a node left without parents is noted."""
    node = entry.node
    layer = node.layer
    for name, target in entry.replace.items():
        child = node.child(name)
        if child is not None:
            orphans.append(child.node)
        if target is None:
            if child is not None:
                layer.unlink(child)
                node.driver.set_backing(None)
        elif child is None:
            node.driver.set_backing(layer.link(node, name, ChildRole.COW, target))
        else:
            # The driver keeps its Child; only the node behind it changes.
            child.node.parents.remove(child)
            child.node = target
            target.parents.append(child)


async def reopen_many(requests: Sequence[tuple[Node, Mapping[str, object], bool]]) -> list[Node]:
    """Reopen several nodes in one transaction (``blockdev-reopen``).

    :param requests: per node, its flat options and whether omitted options keep their old
        values (*keep-old*) or go back to their defaults. A child given as another node's name
        (or ``backing`` as None) is replaced.
    :return: the nodes that lost a parent to a replacement; the caller decides whether those
        left without users are closed (the monitor keeps the ones it owns).
    :raise BlockError: QEMU's message; then no node has changed.
    """
    entries: dict[Node, _Entry] = {}
    for node, options, keep_old in requests:
        _queue(node, dict(options), None, None, entries, keep_old)
    _check_writable_children(entries)
    # As QEMU drains the queue's nodes: requests in flight finish first (a write whose data is
    # on its way would otherwise link its cluster into a cache that a read-only node never
    # writes back), then whatever a node going read-only caches reaches its image. Prepare and
    # commit below do not yield, so nothing can start between the last check and them.
    while True:
        for entry in entries.values():
            await entry.node.drain()
        for entry in entries.values():
            if entry.flags.read_only and not entry.node.flags.read_only:
                await entry.node.flush()
        if not any(entry.node.busy for entry in entries.values()):
            break
    try:
        for entry in entries.values():
            entry.node.driver.reopen_prepare(entry.runtime, entry.flags)
            entry.prepared = True
    except BaseException:
        for entry in entries.values():
            if entry.prepared:
                entry.node.driver.reopen_abort()
        raise
    orphans: list[Node] = []
    for entry in entries.values():
        entry.node.driver.reopen_commit()
        _replace_children(entry, orphans)
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
    return orphans


async def reopen(node: Node, options: Mapping[str, object], *, read_only: bool | None = None) -> None:
    """Reopen ``node`` with ``options`` (flat; strings or typed), keeping old values of the rest.

    :raise BlockError: QEMU's message; then no node has changed.
    """
    given = dict(options)
    if read_only is not None:
        given.setdefault("read-only", read_only)
    await reopen_many([(node, given, True)])
