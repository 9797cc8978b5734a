"""null-co / null-aio and raw: options, QEMU's messages, and how requests map onto the child.

Messages and defaults were observed with QEMU 7.2 (qemu-io --image-opts, and ``info block`` of
qemu-system-x86_64 -machine none for the filenames).
"""

from __future__ import annotations

import asyncio
import errno
import sys
from pathlib import Path
from typing import Any

import pytest

if str(Path(__file__).resolve().parents[2]) not in sys.path:
    # Lets ``tests.support`` import under a bare ``pytest`` run (no rootdir on sys.path).
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.memchild import FakeOpenContext, MemChild  # noqa: E402

from blockgraph.drivers.base import BlockStatusFlags, ChildRole, NodeFlags, RequestFlags  # noqa: E402
from blockgraph.drivers.null import NullAioDriver, NullCoDriver  # noqa: E402
from blockgraph.drivers.raw import RawDriver  # noqa: E402
from blockgraph.errors import BlockError, IOFailure, OptionError  # noqa: E402

MiB = 1 << 20


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def open_null(options: dict[str, Any], cls: type[NullCoDriver] = NullCoDriver) -> NullCoDriver:
    drv = cls()
    run(drv.open(FakeOpenContext(), dict(options)))
    return drv


# --- null -------------------------------------------------------------------------------------


def test_null_defaults() -> None:
    drv = open_null({})
    assert drv.getlength() == 1 << 30
    assert not drv.read_zeroes
    assert drv.filename() == "null-co://"
    assert not NullCoDriver.is_format
    assert open_null({}, NullAioDriver).filename() == "null-aio://"


def test_null_read_leaves_buffer_untouched_without_read_zeroes() -> None:
    # qemu-io -c 'read -P 0xab 0 512' null-co:// passes: qemu-io's buffer is pre-filled 0xab.
    buf = bytearray(b"\xab" * 512)
    run(open_null({}).preadv(0, memoryview(buf), RequestFlags.NONE))
    assert buf == b"\xab" * 512
    run(open_null({"read-zeroes": True}).preadv(0, memoryview(buf), RequestFlags.NONE))
    assert buf == bytes(512)


def test_null_writes_vanish() -> None:
    drv = open_null({"read-zeroes": True, "size": MiB})
    run(drv.pwritev(0, memoryview(b"x" * 512), RequestFlags.FUA))
    run(drv.pwrite_zeroes(0, 512, RequestFlags.NONE))
    run(drv.pdiscard(0, 512))
    run(drv.flush_to_disk())
    buf = bytearray(512)
    run(drv.preadv(0, memoryview(buf), RequestFlags.NONE))
    assert buf == bytes(512)
    assert drv.getlength() == MiB


def test_null_block_status() -> None:
    # qemu-io map: "not allocated" without read-zeroes, "allocated" (as zeroes) with it.
    status = run(open_null({}).block_status(4096, 512))
    assert status.flags == BlockStatusFlags.OFFSET_VALID and status.offset == 4096
    status = run(open_null({"read-zeroes": True}).block_status(0, 512))
    assert status.flags == BlockStatusFlags.OFFSET_VALID | BlockStatusFlags.ZERO


def test_null_latency() -> None:
    drv = open_null({"latency-ns": 1000})
    run(drv.preadv(0, memoryview(bytearray(512)), RequestFlags.NONE))
    with pytest.raises(BlockError, match="^latency-ns is invalid$"):
        open_null({"latency-ns": 1 << 63})
    with pytest.raises(BlockError, match="^latency-ns is invalid$"):
        open_null({"latency-ns": -1})


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"latency-ns": 5}, "null-co://"),
        ({"size": MiB}, None),
        ({"read-zeroes": False}, None),
        ({"read-zeroes": True, "latency-ns": 5}, None),
    ],
)
def test_null_filename(options: dict[str, Any], name: str | None) -> None:
    assert open_null(options).filename() == name


def test_null_parse_filename() -> None:
    options: dict[str, Any] = {}
    NullCoDriver.parse_filename("null-co://", options)
    assert options == {}
    with pytest.raises(OptionError) as info:
        NullCoDriver.parse_filename("null-co://foo", options)
    assert str(info.value) == "The only allowed filename for this driver is 'null-co://'"
    with pytest.raises(OptionError, match="'null-aio://'"):
        NullAioDriver.parse_filename("null-aio:", options)


# --- raw --------------------------------------------------------------------------------------


def open_raw(options: dict[str, Any], size: int = MiB) -> tuple[RawDriver, MemChild]:
    child = MemChild(bytes(range(256)) * (size // 256), name="file")
    drv = RawDriver()
    run(drv.open(FakeOpenContext(children={"file": child}), dict(options)))
    return drv, child


def test_raw_class() -> None:
    assert RawDriver.format_name == "raw" and RawDriver.is_format
    assert RawDriver.probe(b"QFI\xfb" + bytes(508), "x") == 1
    assert RawDriver.probe(b"", "x") == 1
    assert RawDriver.supported_write_flags & RequestFlags.FUA


def test_raw_opens_file_as_filtered_primary() -> None:
    child = MemChild(MiB)
    ctx = FakeOpenContext(children={"file": child})
    run(RawDriver().open(ctx, {}))
    assert ctx.requests[0]["name"] == "file"
    assert ctx.requests[0]["role"] == ChildRole.FILTERED_PRIMARY


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"offset": MiB + 1},
         "Offset (1048577) cannot be greater than size of the containing file (1048576)"),
        ({"offset": 2 * MiB, "size": 3},
         "Offset (2097152) cannot be greater than size of the containing file (1048576)"),
        ({"size": MiB + 1},
         "The sum of offset (0) and size (1048577) has to be smaller or equal to the  actual "
         "size of the containing file (1048576)"),
        ({"offset": 512, "size": MiB},
         "The sum of offset (512) and size (1048576) has to be smaller or equal to the  actual "
         "size of the containing file (1048576)"),
        ({"size": 2 * MiB + 3},
         "The sum of offset (0) and size (2097155) has to be smaller or equal to the  actual "
         "size of the containing file (1048576)"),
        ({"size": 3}, "Specified size is not multiple of 512"),
        ({"size": 1000}, "Specified size is not multiple of 512"),
    ],
)
def test_raw_window_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(BlockError) as info:
        open_raw(options)
    assert str(info.value) == message


def test_raw_lengths() -> None:
    assert open_raw({})[0].getlength() == MiB
    assert open_raw({"offset": 512})[0].getlength() == MiB - 512
    assert open_raw({"offset": MiB})[0].getlength() == 0
    assert open_raw({"offset": 512, "size": 4096})[0].getlength() == 4096
    # An odd offset is allowed (qemu-io opens offset=3).
    assert open_raw({"offset": 3})[0].getlength() == MiB - 3


def test_raw_follows_a_growing_file_without_size() -> None:
    drv, child = open_raw({"offset": 512})
    run(drv.truncate(2 * MiB))
    assert child.getlength() == 2 * MiB + 512
    assert drv.getlength() == 2 * MiB


def test_raw_truncate_with_size_fails() -> None:
    drv, _ = open_raw({"size": 512})
    with pytest.raises(IOFailure) as info:
        run(drv.truncate(MiB))
    assert info.value.errno == errno.ENOTSUP
    assert str(info.value) == "Cannot resize fixed-size raw disks"


def test_raw_io_is_shifted_by_offset() -> None:
    drv, child = open_raw({"offset": 3, "size": 4096})
    buf = bytearray(4)
    run(drv.preadv(0, memoryview(buf), RequestFlags.NONE))
    assert buf == bytes([3, 4, 5, 6])
    run(drv.pwritev(1, memoryview(b"xy"), RequestFlags.FUA))
    assert child.data[3:7] == b"\x03xy\x06"
    run(drv.pwrite_zeroes(512, 512, RequestFlags.MAY_UNMAP))
    run(drv.pdiscard(1024, 512))
    assert [c for c in child.calls] == [
        ("preadv", 3, 4, RequestFlags.NONE),
        ("pwritev", 4, 2, RequestFlags.FUA),
        ("pwrite_zeroes", 515, 512, RequestFlags.MAY_UNMAP),
        ("pdiscard", 1027, 512, RequestFlags.NONE),
    ]
    # raw fires read_aio / write_aio at its file (for a blkdebug node there).
    assert child.events == ["read_aio", "write_aio"]


def test_raw_block_status_maps_into_the_file() -> None:
    drv, child = open_raw({"offset": 4096})
    status = run(drv.block_status(512, 1024))
    assert status.offset == 4096 + 512
    assert status.length == 1024
    assert status.file is child
    assert status.flags & BlockStatusFlags.DATA


def test_raw_filename() -> None:
    assert open_raw({})[0].filename() == "/tmp/mem.raw"
    assert open_raw({"offset": 512})[0].filename() is None
    assert open_raw({"size": 512})[0].filename() is None
    drv = RawDriver()
    child = MemChild(MiB, filename='json:{"driver": "null-co", "size": "1M"}')
    run(drv.open(FakeOpenContext(children={"file": child}), {}))
    assert drv.filename() is None


def test_raw_reopen() -> None:
    drv, _ = open_raw({"offset": 512})
    with pytest.raises(BlockError, match="^Specified size is not multiple of 512$"):
        drv.reopen_prepare({"size": 3}, NodeFlags())
    assert (drv.offset, drv.size) == (512, None)
    drv.reopen_prepare({"size": 4096}, NodeFlags())
    assert (drv.offset, drv.size) == (512, None)
    drv.reopen_commit()
    assert (drv.offset, drv.size) == (0, 4096)
    drv.reopen_prepare({}, NodeFlags())
    drv.reopen_abort()
    drv.reopen_commit()
    assert (drv.offset, drv.size) == (0, 4096)


def test_probing_drivers_are_those_that_implement_probe() -> None:
    # probe_format only imports and asks these; a driver with its own probe() must be listed.
    from blockgraph.drivers.base import BlockDriver
    from blockgraph.drivers.registry import PROBING_DRIVERS, driver_names, get_driver

    implementing = {name for name in driver_names()
                    if get_driver(name).probe.__func__ is not BlockDriver.probe.__func__}  # type: ignore[attr-defined]
    assert implementing == set(PROBING_DRIVERS)
