"""Reopen: precedence of options, who follows the parent, the seed's writethrough check at
reopen, atomicity (a rejected reopen changes nothing on any node), and O_DIRECT really toggled.

``specs/qemu-cache-model.md`` b.4 gives QEMU's precedence (reopen options > the node's explicit
options > inherited from the parent's new options > old values) and that referenced nodes never
follow their parent.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if str(Path(__file__).resolve().parents[2]) not in sys.path:
    # Lets ``tests.support`` import under a bare ``pytest`` run (no rootdir on sys.path).
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.graphutil import (  # noqa: E402
    child_path,
    fd_count,
    graph_state,
    make_qcow2,
    make_raw,
    walk,
)

from blockgraph.drivers.file import FileDriver  # noqa: E402
from blockgraph.drivers.qcow2 import Qcow2Driver  # noqa: E402
from blockgraph.errors import BlockError, IOFailure  # noqa: E402
from blockgraph.graph.layer import BlockLayer  # noqa: E402
from blockgraph.graph.node import BlockBackend, Node  # noqa: E402
from blockgraph.graph.reopen import reopen  # noqa: E402
from blockgraph.monitor.hmp import format_block_info  # noqa: E402

WRITETHROUGH = "Can't set writethrough mode except for the root"
PATHS = ("", "file", "backing", "backing.file")


@pytest.fixture
def layer() -> Iterator[BlockLayer]:
    lay = BlockLayer()
    lay.run(asyncio.sleep(0))  # the event loop's fds exist before any fd is counted
    yield lay
    lay.close()


@pytest.fixture
def chain(tmp_path: Path) -> tuple[str, str]:
    base = make_qcow2(tmp_path / "base.qcow2")
    top = make_qcow2(tmp_path / "top.qcow2", backing=base)
    return top, base


def _open(layer: BlockLayer, filename: str, fmt: str = "qcow2", **options: Any) -> tuple[BlockBackend, Node]:
    bb = layer.new_backend("drive0")
    root = layer.run(layer.open_node(filename, {"driver": fmt, **options}, backend=bb))
    return bb, root


def _flag(root: Node, attr: str) -> set[str]:
    return {p for p in PATHS if getattr(child_path(root, p).flags, attr)}


def _without_driver(state: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    # A successful reopen records "driver" in a node's effective options (it was not there
    # after open); that is bookkeeping, not a change of the node.
    return {name: {**s, "options": {k: v for k, v in s["options"].items() if k != "driver"}}
            for name, s in state.items()}


def _direct(root: Node) -> set[str]:
    return {p for p in PATHS if child_path(root, p).flags.direct}


def _no_flush(root: Node) -> set[str]:
    return {p for p in PATHS if child_path(root, p).flags.no_flush}


def _o_direct(node: Node) -> bool:
    assert isinstance(node.driver, FileDriver)
    return bool(fcntl.fcntl(node.driver.fd, fcntl.F_GETFL) & os.O_DIRECT)


# -- children follow their parent ---------------------------------------------------------------


def test_reopen_direct_reaches_whole_chain(layer: BlockLayer, chain: tuple[str, str]) -> None:
    _, root = _open(layer, chain[0])
    assert _direct(root) == set()
    layer.run(reopen(root, {"cache.direct": "on"}))
    assert _direct(root) == set(PATHS)
    assert _o_direct(root.file) and _o_direct(child_path(root, "backing.file"))
    layer.run(reopen(root, {"cache.direct": "off"}))
    assert _direct(root) == set()
    assert not _o_direct(root.file) and not _o_direct(child_path(root, "backing.file"))


def test_reopen_no_flush_reaches_whole_chain(layer: BlockLayer, chain: tuple[str, str]) -> None:
    _, root = _open(layer, chain[0])
    layer.run(reopen(root, {"cache.no-flush": "on"}))
    assert _no_flush(root) == set(PATHS)


def test_child_explicit_at_open_does_not_follow(layer: BlockLayer, chain: tuple[str, str]) -> None:
    _, root = _open(layer, chain[0], **{"file.cache.direct": "off",
                                        "backing.file.cache.no-flush": "off"})
    layer.run(reopen(root, {"cache.direct": "on", "cache.no-flush": "on"}))
    assert _direct(root) == {"", "backing", "backing.file"}
    assert _no_flush(root) == {"", "file", "backing"}


def test_reopen_option_beats_child_explicit(layer: BlockLayer, chain: tuple[str, str]) -> None:
    _, root = _open(layer, chain[0], **{"file.cache.direct": "off"})
    layer.run(reopen(root, {"cache.direct": "on", "file.cache.direct": "on"}))
    assert _direct(root) == set(PATHS)
    # What this reopen set explicitly on the child now counts as the child's explicit option.
    layer.run(reopen(root, {"cache.direct": "off"}))
    assert _direct(root) == {"file"}


def test_child_keys_reach_only_that_child(layer: BlockLayer, chain: tuple[str, str]) -> None:
    _, root = _open(layer, chain[0])
    layer.run(reopen(root, {"file.cache.direct": "on"}))
    assert _direct(root) == {"file"}
    assert _o_direct(root.file)
    assert not _o_direct(child_path(root, "backing.file"))
    layer.run(reopen(root, {"backing.cache.no-flush": "on"}))
    assert _no_flush(root) == {"backing", "backing.file"}
    layer.run(reopen(root, {"backing.file.cache.direct": "on"}))
    assert _direct(root) == {"file", "backing.file"}


def test_inherited_beats_old_value(layer: BlockLayer, chain: tuple[str, str]) -> None:
    # Opened with direct on the root: the children inherited it. A reopen turning the root's
    # direct off takes the children with it (they never set it themselves).
    _, root = _open(layer, chain[0], **{"cache.direct": "on"})
    assert _direct(root) == set(PATHS)
    layer.run(reopen(root, {"cache.direct": "off"}))
    assert _direct(root) == set()


def test_parent_explicit_survives_unrelated_reopen(layer: BlockLayer,
                                                   chain: tuple[str, str]) -> None:
    _, root = _open(layer, chain[0], **{"cache.direct": "on"})
    layer.run(reopen(root, {"cache.no-flush": "on"}))
    assert _direct(root) == set(PATHS)
    assert _no_flush(root) == set(PATHS)


def test_old_values_kept_when_nothing_given(layer: BlockLayer, chain: tuple[str, str]) -> None:
    _, root = _open(layer, chain[0], **{"cache.direct": "on", "backing.cache.no-flush": "on"})
    state = graph_state(layer)
    layer.run(reopen(root, {}))
    assert _direct(root) == set(PATHS)
    assert _no_flush(root) == {"backing", "backing.file"}
    # Reopening a child on its own keeps what it inherited (old effective options).
    layer.run(reopen(root.file, {}))
    assert root.file.flags.direct
    after = graph_state(layer)
    assert {k: v["flags"] for k, v in after.items()} == {k: v["flags"] for k, v in state.items()}


def test_reopen_read_only_follows_file_not_backing(layer: BlockLayer,
                                                   chain: tuple[str, str]) -> None:
    bb, root = _open(layer, chain[0])
    layer.run(reopen(root, {}, read_only=True))
    assert _flag(root, "read_only") == set(PATHS)
    with pytest.raises(IOFailure):
        layer.run(bb.pwritev(0, memoryview(b"x" * 512)))
    layer.run(reopen(root, {}, read_only=False))
    # The backing chain stays read-only: it defaults to read-only whatever its parent says.
    assert _flag(root, "read_only") == {"backing", "backing.file"}
    layer.run(bb.pwritev(0, memoryview(b"x" * 512)))


def test_reopen_read_only_flushes_dirty_metadata(tmp_path: Path) -> None:
    path = make_qcow2(tmp_path / "img.qcow2", 1 << 20)
    lay = BlockLayer()
    try:
        bb = lay.new_backend("drive0")
        root = lay.run(lay.open_node(path, {"driver": "qcow2"}, backend=bb))
        lay.run(bb.pwritev(0, memoryview(b"Z" * 4096)))  # allocates: dirties L2 and refcounts
        lay.run(reopen(root, {}, read_only=True))
        # A second reader sees the data as soon as the node is read-only.
        other = BlockLayer()
        try:
            bb2 = other.new_backend("peek")
            other.run(other.open_node(path, {"driver": "qcow2", "read-only": "on"}, backend=bb2))
            buf = bytearray(4096)
            other.run(bb2.preadv(0, memoryview(buf)))
            assert buf == b"Z" * 4096
        finally:
            other.close()
    finally:
        lay.close()


# -- referenced nodes --------------------------------------------------------------------------


def _referenced(layer: BlockLayer, top: str) -> tuple[BlockBackend, Node, Node]:
    f0 = layer.run(layer.open_node(None, {"driver": "file", "filename": top, "node-name": "f0"}))
    bb = layer.new_backend("blk")
    root = layer.run(layer.open_node(None, {"driver": "qcow2", "file": "f0", "node-name": "img"},
                                     backend=bb))
    assert root.file is f0 and f0.inherits_from is None
    return bb, root, f0


def test_referenced_node_does_not_follow(layer: BlockLayer, chain: tuple[str, str]) -> None:
    _, root, f0 = _referenced(layer, chain[0])
    layer.run(reopen(root, {"cache.direct": "on", "cache.no-flush": "on"}))
    assert root.flags.direct and root.flags.no_flush
    assert not f0.flags.direct and not f0.flags.no_flush
    assert not _o_direct(f0)
    # The backing chain was opened from the header, so it does follow.
    assert child_path(root, "backing.file").flags.direct


def test_child_key_on_referenced_node_fails(layer: BlockLayer, chain: tuple[str, str]) -> None:
    _, root, f0 = _referenced(layer, chain[0])
    state = graph_state(layer)
    with pytest.raises(BlockError) as info:
        layer.run(reopen(root, {"file.cache.direct": "on"}))
    assert info.value.desc == "Cannot change the option 'file.cache.direct'"
    assert graph_state(layer) == state


def test_referenced_node_reopened_directly(layer: BlockLayer, chain: tuple[str, str]) -> None:
    _, root, f0 = _referenced(layer, chain[0])
    layer.run(reopen(f0, {"cache.direct": "on"}))
    assert f0.flags.direct and _o_direct(f0)
    assert not root.flags.direct


# -- cache.writeback at reopen ------------------------------------------------------------------


@pytest.mark.parametrize("key", ["file.cache.writeback", "backing.cache.writeback",
                                 "backing.file.cache.writeback"])
def test_writethrough_on_child_at_reopen_fails(layer: BlockLayer, chain: tuple[str, str],
                                               key: str) -> None:
    bb, root = _open(layer, chain[0])
    state = graph_state(layer)
    with pytest.raises(BlockError) as info:
        layer.run(reopen(root, {key: "off", "cache.direct": "on"}))
    assert info.value.desc == WRITETHROUGH
    assert graph_state(layer) == state
    assert bb.write_cache is True


def test_writethrough_at_reopen_of_non_root_node_fails(layer: BlockLayer,
                                                       chain: tuple[str, str]) -> None:
    _, root = _open(layer, chain[0])
    state = graph_state(layer)
    with pytest.raises(BlockError) as info:
        layer.run(reopen(root.file, {"cache.writeback": "off"}))
    assert info.value.desc == WRITETHROUGH
    assert graph_state(layer) == state


@pytest.mark.parametrize("key", ["file.cache.writeback", "backing.cache.writeback"])
def test_writeback_on_on_child_at_reopen_is_noop(layer: BlockLayer, chain: tuple[str, str],
                                                 key: str) -> None:
    bb, root = _open(layer, chain[0])
    state = graph_state(layer)
    layer.run(reopen(root, {key: "on"}))
    assert _without_driver(graph_state(layer)) == _without_driver(state)
    assert bb.write_cache is True


def test_writeback_off_at_root_reopen_sets_backend(layer: BlockLayer,
                                                   chain: tuple[str, str]) -> None:
    bb, root = _open(layer, chain[0])
    layer.run(reopen(root, {"cache.writeback": "off"}))
    assert bb.write_cache is False
    assert "Cache mode:       writethrough\n" in format_block_info(bb, root)
    for node in walk(root):
        assert "Cache mode:       writeback\n" in format_block_info(None, node)
        assert "cache.writeback" not in node.options
    layer.run(reopen(root, {"cache.writeback": "on"}))
    assert bb.write_cache is True


@pytest.mark.parametrize(("key", "value"), [("driver", "raw"), ("node-name", "foo")])
def test_reopen_cannot_change_driver_or_node_name(layer: BlockLayer, chain: tuple[str, str],
                                                  key: str, value: str) -> None:
    _, root = _open(layer, chain[0], **{"node-name": "img"})
    state = graph_state(layer)
    with pytest.raises(BlockError) as info:
        layer.run(reopen(root, {key: value, "cache.direct": "on"}))
    assert info.value.desc == f"Cannot change the option '{key}'"
    assert graph_state(layer) == state


@pytest.mark.parametrize(("key", "value"), [("driver", "qcow2"), ("node-name", "img")])
def test_reopen_with_same_driver_or_node_name_is_fine(layer: BlockLayer, chain: tuple[str, str],
                                                      key: str, value: str) -> None:
    _, root = _open(layer, chain[0], **{"node-name": "img"})
    layer.run(reopen(root, {key: value, "cache.direct": "on"}))
    assert root.flags.direct and root.node_name == "img" and root.driver_name == "qcow2"


# -- a rejected reopen changes nothing -------------------------------------------------------------


@pytest.mark.parametrize("options", [
    {"cache.direct": "maybe"},
    {"backing.file.cache.direct": "maybe"},
    {"cache.direct": "on", "foo": "1"},
    {"cache.direct": "on", "backing.foo": "1"},
    {"cache.direct": "on", "discard": "bogus"},
    {"cache.direct": "on", "file.cache.writeback": "off"},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_rejected_reopen_changes_nothing(layer: BlockLayer, chain: tuple[str, str],
                                         options: dict[str, str]) -> None:
    bb, root = _open(layer, chain[0], **{"cache.no-flush": "on"})
    state = graph_state(layer)
    fds = fd_count()
    with pytest.raises(BlockError):
        layer.run(reopen(root, options))
    assert graph_state(layer) == state
    assert fd_count() == fds
    assert not any(_o_direct(n) for n in walk(root) if n.driver_name == "file")


def _fail_on(monkeypatch: pytest.MonkeyPatch, cls: type, victim: object,
             calls: list[str]) -> None:
    real_prepare = cls.reopen_prepare
    real_abort = cls.reopen_abort
    real_commit = cls.reopen_commit

    def prepare(self: Any, options: dict[str, Any], flags: Any) -> None:
        calls.append("prepare")
        if self is victim:
            raise BlockError("injected reopen failure")
        real_prepare(self, options, flags)

    def abort(self: Any) -> None:
        calls.append("abort")
        real_abort(self)

    def commit(self: Any) -> None:
        calls.append("commit")
        real_commit(self)

    monkeypatch.setattr(cls, "reopen_prepare", prepare)
    monkeypatch.setattr(cls, "reopen_abort", abort)
    monkeypatch.setattr(cls, "reopen_commit", commit)


@pytest.mark.parametrize("victim_path", ["backing.file", "file", "backing"])
def test_failure_later_in_queue_changes_nothing(layer: BlockLayer, chain: tuple[str, str],
                                                monkeypatch: pytest.MonkeyPatch,
                                                victim_path: str) -> None:
    bb, root = _open(layer, chain[0])
    victim = child_path(root, victim_path)
    calls: list[str] = []
    _fail_on(monkeypatch, type(victim.driver), victim.driver, calls)
    state = graph_state(layer)
    fds = fd_count()
    with pytest.raises(BlockError) as info:
        layer.run(reopen(root, {"cache.direct": "on", "cache.no-flush": "on"}))
    assert info.value.desc == "injected reopen failure"
    assert "commit" not in calls
    assert graph_state(layer) == state
    # The O_DIRECT descriptors prepared for the nodes before the victim were closed again.
    assert fd_count() == fds
    for node in walk(root):
        if node.driver_name == "file":
            assert not _o_direct(node)
    # And the graph still works, and a later reopen goes through.
    monkeypatch.undo()
    layer.run(bb.pwritev(5, memoryview(b"ok")))
    layer.run(reopen(root, {"cache.direct": "on"}))
    assert _direct(root) == set(PATHS)


def test_failure_on_second_node_raw(layer: BlockLayer, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # raw over file: the root prepares first, then the file node refuses.
    _, root = _open(layer, make_raw(tmp_path / "r.img", 1 << 20), "raw")
    file_node = root.file
    assert file_node is not None
    calls: list[str] = []
    _fail_on(monkeypatch, FileDriver, file_node.driver, calls)
    state = graph_state(layer)
    with pytest.raises(BlockError):
        layer.run(reopen(root, {"cache.direct": "on"}))
    assert graph_state(layer) == state
    assert calls.count("commit") == 0


def test_qcow2_prepare_failure_is_atomic(layer: BlockLayer, chain: tuple[str, str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _, root = _open(layer, chain[0])
    backing = child_path(root, "backing")
    calls: list[str] = []
    _fail_on(monkeypatch, Qcow2Driver, backing.driver, calls)
    state = graph_state(layer)
    with pytest.raises(BlockError):
        layer.run(reopen(root, {"cache.direct": "on"}))
    assert graph_state(layer) == state
    # Every node prepared before the failure was aborted.
    assert calls.count("abort") == calls.count("prepare") - 1


# -- O_DIRECT really toggled ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_o_direct_toggled_and_unaligned_io_works(layer: BlockLayer, tmp_path: Path,
                                                 fmt: str) -> None:
    filename = (make_raw(tmp_path / "img.raw", 1 << 20) if fmt == "raw"
                else make_qcow2(tmp_path / "img.qcow2", 1 << 20))
    bb, root = _open(layer, filename, fmt)
    file_node = root.file
    assert file_node is not None
    assert not _o_direct(file_node)
    layer.run(bb.pwritev(3, memoryview(b"before-direct")))
    layer.run(reopen(root, {"cache.direct": "on"}))
    assert file_node.flags.direct and _o_direct(file_node)
    assert file_node.driver.request_alignment >= 512
    buf = bytearray(13)
    layer.run(bb.preadv(3, memoryview(buf)))
    assert buf == b"before-direct"
    layer.run(bb.pwritev(4097, memoryview(b"unaligned-under-O_DIRECT")))
    buf = bytearray(40)
    layer.run(bb.preadv(4090, memoryview(buf)))
    assert buf == bytes(7) + b"unaligned-under-O_DIRECT" + bytes(40 - 7 - 24)
    layer.run(bb.flush())
    layer.run(reopen(root, {"cache.direct": "off"}))
    assert not file_node.flags.direct and not _o_direct(file_node)
    assert file_node.driver.request_alignment == 1
    buf = bytearray(24)
    layer.run(bb.preadv(4097, memoryview(buf)))
    assert buf == b"unaligned-under-O_DIRECT"


def test_o_direct_reopen_keeps_data_visible_to_other_readers(layer: BlockLayer,
                                                             tmp_path: Path) -> None:
    path = make_raw(tmp_path / "img.raw", 1 << 16)
    bb, root = _open(layer, path, "raw", **{"cache.direct": "on"})
    assert _o_direct(root.file)
    layer.run(bb.pwritev(100, memoryview(b"direct-data")))
    layer.run(reopen(root, {"cache.direct": "off"}))
    with open(path, "rb") as f:
        f.seek(100)
        assert f.read(11) == b"direct-data"


def test_reopen_read_only_waits_for_a_write_in_flight(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A write whose data is still on its way when the node goes read-only (a live external
    snapshot does that to the old top) is finished and written back, not lost."""
    layer = BlockLayer()
    try:
        filename = make_qcow2(tmp_path / "img.qcow2", 1 << 20)
        bb = layer.new_backend("drive0")
        root = layer.run(layer.open_node(filename, {"driver": "qcow2"}, backend=bb))
        parked = asyncio.Event()
        release = asyncio.Event()
        original = FileDriver.pwritev

        async def gated(self: FileDriver, offset: int, buf: memoryview, flags: Any) -> None:
            if len(buf) >= 65536 and not release.is_set():  # the guest cluster's data write
                parked.set()
                await release.wait()
            await original(self, offset, buf, flags)

        monkeypatch.setattr(FileDriver, "pwritev", gated)

        async def scenario() -> None:
            write = asyncio.ensure_future(bb.pwritev(3 * 65536, memoryview(b"\xa5" * 65536)))
            await asyncio.wait_for(parked.wait(), 10)
            change = asyncio.ensure_future(reopen(root, {}, read_only=True))
            for _ in range(20):
                await asyncio.sleep(0)
            assert not change.done()  # the reopen waits for the write
            release.set()
            await asyncio.wait_for(asyncio.gather(write, change), 10)

        layer.run(scenario())
        assert root.flags.read_only
    finally:
        layer.close()
    reread = BlockLayer()
    try:
        bb = reread.new_backend("drive0")
        reread.run(reread.open_node(filename, {"driver": "qcow2", "read-only": "on"}, backend=bb))
        data = bytearray(65536)
        reread.run(bb.preadv(3 * 65536, memoryview(data)))
        assert data == b"\xa5" * 65536
    finally:
        reread.close()
