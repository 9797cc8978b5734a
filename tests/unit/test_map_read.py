"""map_read: where a read's bytes lie in a file, for a caller that copies them in the kernel
(the NBD server's sendfile). Only data the page cache holds whole is mapped; the range keeps
its file open until released; every layer that must see or change a read refuses to map.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

if str(Path(__file__).resolve().parents[2]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.graphutil import cachestat_works  # noqa: E402

from blockgraph.drivers.base import FileRange  # noqa: E402
from blockgraph.graph.layer import BlockLayer  # noqa: E402
from blockgraph.graph.node import BlockBackend, Node  # noqa: E402
from blockgraph.objects.throttle import ThrottleLimits  # noqa: E402

SIZE = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "img"
    data = os.urandom(SIZE)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # clean pages: posix_fadvise can drop them
    with open(path, "rb") as f:
        f.read()  # all of it in the page cache
    return path, data


@pytest.fixture(autouse=True)
def _needs_cachestat(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.write_bytes(b"x")
    if not cachestat_works(probe):
        pytest.skip("no cachestat(2) (Linux < 6.5): the file driver maps nothing")


def _open(layer: BlockLayer, path: Path, **options: Any) -> Node:
    return layer.run(layer.open_node(str(path), options))


def _bytes_of(piece: FileRange) -> bytes:
    return os.pread(piece.fd, piece.length, piece.offset)


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_cached_data_maps_to_the_file(layer: BlockLayer, image: tuple[Path, bytes]) -> None:
    path, data = image
    node = _open(layer, path, driver="raw")
    piece = node.map_read(4096, 256 * 1024)
    assert piece is not None
    try:
        assert len(piece) == 256 * 1024
        assert _bytes_of(piece) == data[4096 : 4096 + 256 * 1024]
    finally:
        piece.release()
    # A mapped range is a read of every node it went through.
    assert node.stats.rd_operations == 1 and node.stats.rd_bytes == 256 * 1024
    file_node = node.file
    assert file_node is not None
    assert file_node.stats.rd_operations == 1


def test_a_raw_window_shifts_the_range(layer: BlockLayer, image: tuple[Path, bytes]) -> None:
    path, data = image
    node = _open(layer, path, driver="raw", offset=65536, size=512 * 1024)
    piece = node.map_read(8192, 65536)
    assert piece is not None
    try:
        assert piece.offset == 65536 + 8192
        assert _bytes_of(piece) == data[65536 + 8192 : 65536 + 8192 + 65536]
    finally:
        piece.release()
    # Past the window: not mapped (the read itself fails its range check).
    assert node.map_read(512 * 1024 - 4096, 8192) is None


def test_data_not_in_the_page_cache_is_not_mapped(layer: BlockLayer,
                                                  image: tuple[Path, bytes]) -> None:
    path, _ = image
    node = _open(layer, path, driver="raw")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert node.map_read(0, 65536) is None  # sendfile would wait for the disk
        os.pread(fd, 65536, 0)
        # Cached again; one page short of the range is not enough.
        piece = node.map_read(0, 65536)
        assert piece is not None
        piece.release()
        os.posix_fadvise(fd, 65536 - 4096, 4096, os.POSIX_FADV_DONTNEED)
        assert node.map_read(0, 65536) is None
    finally:
        os.close(fd)
    assert node.stats.rd_operations == 1  # only the mapped one counts


def test_past_the_end_of_the_file_is_not_mapped(layer: BlockLayer, tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"\x01" * 1000)  # the node is 1024 bytes long: the tail reads as zeroes
    node = _open(layer, path, driver="file")
    assert node.map_read(0, 1024) is None


def test_a_range_keeps_its_file_open_until_released(layer: BlockLayer,
                                                    image: tuple[Path, bytes]) -> None:
    path, data = image
    node = _open(layer, path, driver="file")
    piece = node.map_read(0, 65536)
    assert piece is not None
    layer.run(node.driver.close())
    # The node let its fd go, but the range still holds it: the bytes are still these.
    assert _fd_open(piece.fd)
    assert _bytes_of(piece) == data[:65536]
    piece.release()
    assert not _fd_open(piece.fd)
    piece.release()  # a second release does nothing


def test_layers_that_must_see_the_read_do_not_map(layer: BlockLayer,
                                                   image: tuple[Path, bytes]) -> None:
    path, _ = image
    # A blkdebug node below raw wants to see (and may fail) every read.
    debug = layer.run(layer.open_node(None, {"driver": "raw", "file.driver": "blkdebug",
                                             "file.image.filename": str(path)}))
    assert debug.map_read(0, 65536) is None
    # O_DIRECT bypasses the page cache.
    direct = _open(layer, path, driver="raw", **{"cache.direct": True})
    assert direct.map_read(0, 65536) is None


def test_backend_maps_unless_throttled(layer: BlockLayer, image: tuple[Path, bytes]) -> None:
    path, data = image
    node = _open(layer, path, driver="raw")
    bb = BlockBackend(layer, "bb")
    bb.attach(node)
    try:
        piece = bb.map_read(0, 65536)
        assert piece is not None
        assert _bytes_of(piece) == data[:65536]
        piece.release()
        assert bb.stats.rd_operations == 1 and bb.stats.rd_bytes == 65536
        assert bb.map_read(SIZE - 4096, 8192) is None  # past the end of the disk
        # A throttled read waits for its turn in preadv.
        bb.set_io_limits(ThrottleLimits({"bps-read": 1 << 20}))
        assert bb.map_read(0, 65536) is None
    finally:
        bb.set_io_limits(None)
        bb.attach(None)
