"""Opening graphs: inheritance by role, referenced nodes, the seed's writethrough check, node
names, unknown options, and that a failed open leaves nothing behind.

Expected behaviour and texts: ``specs/qemu-cache-model.md`` sections b (b.6 is what QEMU 7.2 does
with the 142 chain) and e, and the seed for ``cache.writeback=off`` below the root.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parents[2]) not in sys.path:
    # Lets ``tests.support`` import under a bare ``pytest`` run (no rootdir on sys.path).
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.graphutil import child_path, fd_count, make_qcow2, walk  # noqa: E402

from blockgraph.errors import BlockError  # noqa: E402
from blockgraph.graph.drive import drive_new  # noqa: E402
from blockgraph.graph.layer import BlockLayer  # noqa: E402
from blockgraph.graph.node import Node  # noqa: E402
from blockgraph.monitor.hmp import format_block_info  # noqa: E402

WRITETHROUGH = "Can't set writethrough mode except for the root"
BACKING_WRITETHROUGH = "Could not open backing file: " + WRITETHROUGH
PATHS = ("", "file", "backing", "backing.file")


@pytest.fixture
def layer() -> Iterator[BlockLayer]:
    lay = BlockLayer()
    # Create the event loop (its epoll fd and self-pipe) before any fd is counted.
    lay.run(asyncio.sleep(0))
    yield lay
    lay.close()


@pytest.fixture
def chain(tmp_path: Path) -> tuple[str, str]:
    """A qcow2 image over a qcow2 backing file: (top, base)."""
    base = make_qcow2(tmp_path / "base.qcow2")
    top = make_qcow2(tmp_path / "top.qcow2", backing=base)
    return top, base


def _open_chain(layer: BlockLayer, top: str, **options: str) -> Node:
    bb = layer.new_backend("drive0")
    return layer.run(layer.open_node(top, {"driver": "qcow2", **options}, backend=bb))


def _nodes_with(root: Node, attr: str) -> set[str]:
    return {p for p in PATHS if getattr(child_path(root, p).flags, attr)}


# -- inheritance by role ----------------------------------------------------------------------


def test_chain_shape(layer: BlockLayer, chain: tuple[str, str]) -> None:
    top, base = chain
    root = _open_chain(layer, top)
    assert [child_path(root, p).driver_name for p in PATHS] == ["qcow2", "file", "qcow2", "file"]
    assert child_path(root, "file").filename == top
    assert child_path(root, "backing.file").filename == base
    assert len(layer.nodes) == 4
    for p in PATHS[1:]:
        parent = child_path(root, p.rpartition(".")[0])
        assert child_path(root, p).inherits_from is parent


@pytest.mark.parametrize(("key", "attr"), [("cache.direct", "direct"),
                                           ("cache.no-flush", "no_flush")])
@pytest.mark.parametrize(("where", "reached"), [
    ("", set(PATHS)),
    ("file", {"file"}),
    ("backing", {"backing", "backing.file"}),
    ("backing.file", {"backing.file"}),
])
def test_inheritance_by_role(layer: BlockLayer, chain: tuple[str, str], key: str, attr: str,
                             where: str, reached: set[str]) -> None:
    option = f"{where}.{key}" if where else key
    root = _open_chain(layer, chain[0], **{option: "on"})
    assert _nodes_with(root, attr) == reached
    assert _nodes_with(root, "direct" if attr == "no_flush" else "no_flush") == set()


def test_explicit_child_option_beats_inherited(layer: BlockLayer, chain: tuple[str, str]) -> None:
    root = _open_chain(layer, chain[0], **{"cache.direct": "on", "file.cache.direct": "off",
                                           "cache.no-flush": "on",
                                           "backing.cache.no-flush": "off"})
    assert _nodes_with(root, "direct") == {"", "backing", "backing.file"}
    assert _nodes_with(root, "no_flush") == {"", "file"}


def test_backing_chain_is_read_only(layer: BlockLayer, chain: tuple[str, str]) -> None:
    root = _open_chain(layer, chain[0])
    assert _nodes_with(root, "read_only") == {"backing", "backing.file"}


def test_read_only_root_reaches_file(layer: BlockLayer, chain: tuple[str, str]) -> None:
    root = _open_chain(layer, chain[0], **{"read-only": "on"})
    assert _nodes_with(root, "read_only") == set(PATHS)


# -- referenced nodes ------------------------------------------------------------------------


def _open_referenced(layer: BlockLayer, top: str, base: str, **image_opts: str) -> dict[str, Node]:
    """The 142 "separate drives" graph: four roots, the image referencing the other three."""
    nodes = {
        "backing-file": layer.run(layer.open_node(
            None, {"driver": "file", "filename": base, "node-name": "backing-file"})),
    }
    nodes["backing"] = layer.run(layer.open_node(
        None, {"driver": "qcow2", "file": "backing-file", "node-name": "backing"}))
    nodes["file"] = layer.run(layer.open_node(
        None, {"driver": "file", "filename": top, "node-name": "file"}))
    bb = layer.new_backend("blk")
    nodes["image"] = layer.run(layer.open_node(
        None, {"driver": "qcow2", "file": "file", "backing": "backing", "node-name": "image",
               **image_opts}, backend=bb))
    return nodes


def test_referenced_nodes_inherit_nothing(layer: BlockLayer, chain: tuple[str, str]) -> None:
    top, base = chain
    nodes = _open_referenced(layer, top, base, **{"cache.direct": "on", "cache.no-flush": "on"})
    image = nodes["image"]
    assert image.file is nodes["file"]
    assert image.backing is nodes["backing"]
    assert nodes["backing"].file is nodes["backing-file"]
    assert image.flags.direct and image.flags.no_flush
    for name in ("file", "backing", "backing-file"):
        assert not nodes[name].flags.direct, name
        assert not nodes[name].flags.no_flush, name
        assert nodes[name].inherits_from is None, name
    assert len(layer.nodes) == 4


def test_referenced_backing_keeps_its_own_read_only(layer: BlockLayer,
                                                    chain: tuple[str, str]) -> None:
    # QEMU opens a referenced node with its own options; only an implicitly opened backing file
    # gets read-only=on by default.
    nodes = _open_referenced(layer, *chain)
    assert not nodes["backing"].flags.read_only
    assert not nodes["backing-file"].flags.read_only


def test_writethrough_allowed_on_each_separate_root(layer: BlockLayer,
                                                    chain: tuple[str, str]) -> None:
    top, _ = chain
    bb = layer.new_backend("none0")
    node = layer.run(layer.open_node(None, {"driver": "file", "filename": top, "node-name": "file",
                                            "cache.writeback": "off"}, backend=bb))
    assert bb.write_cache is False
    assert "Cache mode:       writeback\n" in format_block_info(None, node)


def test_reference_with_extra_options_fails(layer: BlockLayer, chain: tuple[str, str]) -> None:
    top, _ = chain
    layer.run(layer.open_node(None, {"driver": "file", "filename": top, "node-name": "f0"}))
    before = list(layer.nodes)
    with pytest.raises(BlockError) as info:
        layer.run(layer.open_node(None, {"driver": "qcow2", "file": "f0",
                                         "file.cache.direct": "on"}))
    assert info.value.desc == ("Cannot reference an existing block device with additional "
                               "options or a new filename")
    assert layer.nodes == before


def test_reference_to_unknown_node(layer: BlockLayer) -> None:
    with pytest.raises(BlockError) as info:
        layer.run(layer.open_node(None, {"driver": "qcow2", "file": "nosuch"}))
    assert info.value.desc == "Cannot find device='nosuch' nor node-name='nosuch'"
    assert layer.nodes == []


# -- cache.writeback: the seed's check -----------------------------------------------------------


@pytest.mark.parametrize(("option", "message"), [
    ("file.cache.writeback", WRITETHROUGH),
    ("backing.cache.writeback", BACKING_WRITETHROUGH),
    ("backing.file.cache.writeback", BACKING_WRITETHROUGH),
])
def test_writethrough_below_root_fails(layer: BlockLayer, chain: tuple[str, str], option: str,
                                       message: str) -> None:
    with pytest.raises(BlockError) as info:
        _open_chain(layer, chain[0], **{option: "off"})
    assert info.value.desc == message
    assert layer.nodes == []


def test_writethrough_on_root_without_backend_fails(layer: BlockLayer,
                                                    chain: tuple[str, str]) -> None:
    with pytest.raises(BlockError) as info:
        layer.run(layer.open_node(chain[0], {"driver": "qcow2", "cache.writeback": "off"}))
    assert info.value.desc == WRITETHROUGH
    assert layer.nodes == []


@pytest.mark.parametrize("where", ["file", "backing", "backing.file"])
def test_writeback_on_below_root_is_a_noop(layer: BlockLayer, chain: tuple[str, str],
                                           where: str) -> None:
    root = _open_chain(layer, chain[0], **{f"{where}.cache.writeback": "on"})
    bb = layer.find_backend("drive0")
    assert bb is not None and bb.write_cache is True
    for p in PATHS:
        node = child_path(root, p)
        assert not node.flags.direct and not node.flags.no_flush
        assert "cache.writeback" not in node.explicit_options
        assert "Cache mode:       writeback\n" in format_block_info(None, node)


def test_writeback_off_at_root_sets_backend(layer: BlockLayer, chain: tuple[str, str]) -> None:
    root = _open_chain(layer, chain[0], **{"cache.writeback": "off"})
    bb = layer.find_backend("drive0")
    assert bb is not None and bb.write_cache is False
    assert "Cache mode:       writethrough\n" in format_block_info(bb, root)
    # Node queries always say writeback: writethrough is not a node property.
    for node in walk(root):
        assert "Cache mode:       writeback\n" in format_block_info(None, node)


def test_writeback_on_at_root_keeps_backend_writeback(layer: BlockLayer,
                                                      chain: tuple[str, str]) -> None:
    _open_chain(layer, chain[0], **{"cache.writeback": "on"})
    bb = layer.find_backend("drive0")
    assert bb is not None and bb.write_cache is True


@pytest.mark.parametrize(("cache", "write_cache", "direct", "no_flush"), [
    ("writethrough", False, False, False),
    ("directsync", False, True, False),
    ("none", True, True, False),
    ("unsafe", True, False, True),
    ("writeback", True, False, False),
])
def test_drive_legacy_cache_modes(layer: BlockLayer, chain: tuple[str, str], cache: str,
                                  write_cache: bool, direct: bool, no_flush: bool) -> None:
    bb = layer.run(drive_new(layer, {"if": "none", "file": chain[0], "format": "qcow2",
                                     "cache": cache}))
    assert bb.write_cache is write_cache
    assert bb.root is not None
    for node in walk(bb.root):
        assert (node.flags.direct, node.flags.no_flush) == (direct, no_flush), node


# -- names ---------------------------------------------------------------------------------------


def test_auto_names(layer: BlockLayer, chain: tuple[str, str]) -> None:
    root = _open_chain(layer, chain[0])
    names = [n.node_name for n in walk(root)]
    assert len(set(names)) == 4
    for name in names:
        assert re.fullmatch(r"#block\d+", name), name


def test_given_node_names(layer: BlockLayer, chain: tuple[str, str]) -> None:
    root = _open_chain(layer, chain[0], **{"node-name": "image", "file.node-name": "file",
                                           "backing.node-name": "backing",
                                           "backing.file.node-name": "backing-file"})
    assert [child_path(root, p).node_name for p in PATHS] == ["image", "file", "backing",
                                                              "backing-file"]
    assert layer.find_node("backing") is root.backing


def test_duplicate_node_name_across_opens(layer: BlockLayer, chain: tuple[str, str]) -> None:
    top, base = chain
    layer.run(layer.open_node(base, {"driver": "qcow2", "node-name": "X"}))
    before = list(layer.nodes)
    fds = fd_count()
    with pytest.raises(BlockError) as info:
        layer.run(layer.open_node(top, {"driver": "qcow2", "node-name": "X"}))
    assert info.value.desc == "Duplicate nodes with node-name='X'"
    assert layer.nodes == before
    assert fd_count() == fds


def test_duplicate_node_name_inside_one_graph(layer: BlockLayer, chain: tuple[str, str]) -> None:
    fds = fd_count()
    with pytest.raises(BlockError) as info:
        _open_chain(layer, chain[0], **{"node-name": "X", "backing.file.node-name": "X"})
    assert "Duplicate nodes with node-name='X'" in info.value.desc
    assert layer.nodes == []
    assert fd_count() == fds


# -- unknown options ---------------------------------------------------------------------------


@pytest.mark.parametrize(("option", "message"), [
    ("foo", "Block format 'qcow2' does not support the option 'foo'"),
    ("file.foo", "Block protocol 'file' doesn't support the option 'foo'"),
    ("backing.foo",
     "Could not open backing file: Block format 'qcow2' does not support the option 'foo'"),
    ("backing.file.foo",
     "Could not open backing file: Block protocol 'file' doesn't support the option 'foo'"),
])
def test_unknown_option(layer: BlockLayer, chain: tuple[str, str], option: str,
                        message: str) -> None:
    with pytest.raises(BlockError) as info:
        _open_chain(layer, chain[0], **{option: "1"})
    assert info.value.desc == message


def test_unknown_option_on_plain_file_root(layer: BlockLayer, chain: tuple[str, str]) -> None:
    with pytest.raises(BlockError) as info:
        layer.run(layer.open_node(None, {"driver": "file", "filename": chain[0], "foo": "1"}))
    assert info.value.desc == "Block protocol 'file' doesn't support the option 'foo'"


# -- failed opens leave nothing behind ------------------------------------------------------------


FAILING = [
    {"foo": "1"},
    {"file.foo": "1"},
    {"backing.foo": "1"},
    {"backing.file.foo": "1"},
    {"file.cache.writeback": "off"},
    {"backing.cache.writeback": "off"},
    {"backing.file.cache.writeback": "off"},
    {"backing.node-name": "existing"},
    {"node-name": "dup", "backing.file.node-name": "dup"},
    {"cache.direct": "maybe"},
    {"backing.file.filename": "/nonexistent/base.qcow2"},
    {"backing.driver": "nosuchdriver"},
    {"file.aio": "native"},
    {"node-name": "bad name!"},
]


@pytest.mark.parametrize("options", FAILING, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_failed_open_leaves_graph_unchanged(layer: BlockLayer, chain: tuple[str, str],
                                            options: dict[str, str]) -> None:
    top, base = chain
    existing = layer.run(layer.open_node(base, {"driver": "qcow2", "node-name": "existing",
                                                "read-only": "on"}))
    bb_other = layer.new_backend("other")
    nodes = list(layer.nodes)
    backends = list(layer.backends)
    fds = fd_count()
    bb = layer.new_backend("drive0")
    with pytest.raises(BlockError):
        layer.run(layer.open_node(top, {"driver": "qcow2", **options}, backend=bb))
    assert bb.root is None
    layer.run(layer.remove_backend(bb))
    assert layer.nodes == nodes
    assert layer.backends == backends
    assert fd_count() == fds
    assert existing.parents == [] and bb_other.root is None
    # The graph still works afterwards: the same image opens fine.
    bb2 = layer.new_backend("drive1")
    layer.run(layer.open_node(top, {"driver": "qcow2"}, backend=bb2))
    assert bb2.root is not None and bb2.root.backing is not None


@pytest.mark.parametrize("options", FAILING[:8], ids=lambda o: ",".join(o))
def test_failed_drive_new_leaves_no_backend(layer: BlockLayer, chain: tuple[str, str],
                                            options: dict[str, str]) -> None:
    layer.run(layer.open_node(chain[1], {"driver": "qcow2", "node-name": "existing",
                                         "read-only": "on"}))
    nodes = list(layer.nodes)
    backends = list(layer.backends)
    fds = fd_count()
    with pytest.raises(BlockError):
        layer.run(drive_new(layer, {"if": "none", "id": "d0", "file": chain[0],
                                    "format": "qcow2", **options}))
    assert layer.nodes == nodes
    assert layer.backends == backends
    assert fd_count() == fds


def test_missing_backing_file_leaves_nothing(layer: BlockLayer, chain: tuple[str, str]) -> None:
    top, base = chain
    Path(base).unlink()
    fds = fd_count()
    with pytest.raises(BlockError) as info:
        _open_chain(layer, top)
    assert info.value.desc.startswith("Could not open backing file: ")
    assert layer.nodes == []
    assert fd_count() == fds
