"""blkdebug: filename syntax, config files, option lists, and when injected errors fire.

Every expected message and every failing/succeeding request sequence here was first observed
with QEMU 7.2's qemu-io (``blkdebug:CONF:IMG`` and ``--image-opts driver=raw,file.driver=
blkdebug,...``); the comments name the qemu-io command where it helps.
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

from tests.support.memchild import DriverChild, FakeOpenContext, MemChild  # noqa: E402

from blockgraph.drivers.base import BlockStatusFlags, ChildRole, RequestFlags  # noqa: E402
from blockgraph.drivers.blkdebug import (  # noqa: E402
    BLKDEBUG_EVENTS,
    BlkdebugDriver,
    parse_config_text,
    parse_qemuopts_number,
)
from blockgraph.drivers.raw import RawDriver  # noqa: E402
from blockgraph.errors import BlockError, IOFailure, OptionError  # noqa: E402

MiB = 1 << 20


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def open_blkdebug(
    options: dict[str, Any] | None = None,
    *,
    child: MemChild | None = None,
    image_options: bool = True,
) -> tuple[BlkdebugDriver, MemChild, FakeOpenContext]:
    image = child if child is not None else MemChild(MiB, name="image")
    ctx = FakeOpenContext(children={"image": image})
    if image_options:
        ctx.child_options.add("image")
    drv = BlkdebugDriver()
    run(drv.open(ctx, dict(options or {})))
    return drv, image, ctx


def open_raw_over_blkdebug(
    options: dict[str, Any] | None = None,
) -> tuple[RawDriver, BlkdebugDriver, MemChild]:
    """``driver=raw,file.driver=blkdebug,file.image.filename=...``: raw fires read/write_aio."""
    blkdebug, image, _ = open_blkdebug(options)
    raw = RawDriver()
    run(raw.open(FakeOpenContext(children={"file": DriverChild(blkdebug)}), {}))
    return raw, blkdebug, image


def outcome(coro: Any) -> str:
    """``ok`` or the errno name, like qemu-io's "read failed: ..." lines."""
    try:
        run(coro)
    except IOFailure as exc:
        return errno.errorcode[exc.errno]
    return "ok"


def read(drv: RawDriver | BlkdebugDriver, offset: int = 0, length: int = 512) -> str:
    return outcome(drv.preadv(offset, memoryview(bytearray(length)), RequestFlags.NONE))


def write(drv: RawDriver | BlkdebugDriver, offset: int = 0, length: int = 512) -> str:
    return outcome(drv.pwritev(offset, memoryview(bytearray(length)), RequestFlags.NONE))


# --- filename syntax --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("blkdebug::/tmp/x.raw", {"x-image": "/tmp/x.raw"}),
        ("blkdebug:/tmp/c.conf:/tmp/x.raw", {"config": "/tmp/c.conf", "x-image": "/tmp/x.raw"}),
        # Only the first colon after the config separates: the image keeps the rest.
        ("blkdebug::nbd:unix:/s", {"x-image": "nbd:unix:/s"}),
        # Accepted here; the file driver then says "The 'file' block driver requires a file name".
        ("blkdebug::", {"x-image": ""}),
    ],
)
def test_parse_filename(filename: str, expected: dict[str, str]) -> None:
    options: dict[str, Any] = {}
    BlkdebugDriver.parse_filename(filename, options)
    assert options == expected


@pytest.mark.parametrize("filename", ["blkdebug:/tmp/x.raw", "blkdebug:"])
def test_parse_filename_needs_two_colons(filename: str) -> None:
    with pytest.raises(BlockError, match="^blkdebug requires both config file and image path$"):
        BlkdebugDriver.parse_filename(filename, {})


def test_image_child_is_opened_with_x_image_and_no_driver() -> None:
    drv, _, ctx = open_blkdebug({"x-image": "/tmp/x.raw"}, image_options=False)
    assert ctx.requests == [
        {"name": "image", "role": ChildRole.FILTERED_PRIMARY, "filename": "/tmp/x.raw",
         "driver": None, "allow_none": False, "read_only": None}
    ]
    assert drv.getlength() == MiB


def test_missing_image() -> None:
    ctx = FakeOpenContext()
    with pytest.raises(BlockError, match='^A block device must be specified for "image"$'):
        run(BlkdebugDriver().open(ctx, {}))


# --- config file ------------------------------------------------------------------------------

CONFIG_ERRORS = [
    ('[inject-error]\nevent = "foo"\n', "invalid parameter value: foo"),
    ('[inject-error]\nerrno = "5"\n', "Missing event name for rule"),
    ('[set-state]\nnew_state = "1"\n', "Missing event name for rule"),
    ('[inject-error]\nevent = "read_aio"\nfoo = "5"\n', "Invalid parameter 'foo'"),
    ('[foo]\nevent = "read_aio"\n', "There is no option group 'foo'"),
    ('[inject-error\n', "There is no option group 'inject-error\n'"),
    ("garbage\n", "no group defined"),
    ('[inject-error]\nevent = "read_aio"\n   \n', "parse error"),
    ('[inject-error]\nevent = "read_aio"\n  # indented\n', "Invalid parameter '#'"),
    ('[inject-error]\nevent="read_aio"\n', "Invalid parameter 'event=\"read_aio\"'"),
    # Unquoted values read as empty ones.
    ("[inject-error]\nevent = read_aio\nerrno = 28\n", "Parameter 'errno' expects a number"),
    ('[inject-error]\nevent "read_aio"\n', "invalid parameter value: "),
    ('[inject-error]\nevent = "read_aio"\nerrno = "abc"\n', "Parameter 'errno' expects a number"),
    ('[inject-error]\nevent = "read_aio"\nerrno = "5k"\n', "Parameter 'errno' expects a number"),
    ('[inject-error]\nevent = "read_aio"\nsector = "1k"\n', "Parameter 'sector' expects a number"),
    ('[inject-error]\nevent = "read_aio"\nonce = "maybe"\n', "Parameter 'once' expects 'on' or 'off'"),
    ('[set-state]\nevent = "read_aio"\nstate = "abc"\nnew_state="1"\n', "Parameter 'state' expects a number"),
    ('[inject-error]\nevent = "read_aio"\ntake-child-perms = "on"\n', "Invalid parameter 'take-child-perms'"),
    ('[inject-error "a"]\nevent = "read_aio"\n[inject-error "a"]\nevent = "read_aio"\n', "Duplicate ID 'a' for inject-error"),
    ('[inject-error]\nevent = "read_aio"\niotype = "foo"\n', "invalid parameter value: foo"),
    # Syntax and key errors of the whole file come before event names...
    ('[set-state]\nevent = "read_aio"\nstate="1"\n[inject-error]\nevent = "foo"\n', "Invalid parameter 'state=\"1\"'"),
    # ... a section is checked when the next one starts ...
    ('[inject-error]\nevent = "read_aio"\nerrno = "x"\n[foo]\n', "Parameter 'errno' expects a number"),
    # ... and inject-error rules are examined before set-state rules.
    ('[set-state]\nevent = "bar"\n[inject-error]\n', "Missing event name for rule"),
]


@pytest.mark.parametrize(("text", "message"), CONFIG_ERRORS)
def test_config_errors(tmp_path: Path, text: str, message: str) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text(text)
    with pytest.raises(BlockError) as info:
        open_blkdebug({"config": str(conf)})
    assert str(info.value) == message


def test_config_file_missing() -> None:
    with pytest.raises(BlockError) as info:
        open_blkdebug({"config": "/nonexistent/c.conf"})
    assert str(info.value) == "Could not read blkdebug config file: No such file or directory"


def test_config_accepts_comments_ids_and_repeated_keys() -> None:
    sections = parse_config_text(
        '# comment\n\n[inject-error "x"]\nevent = "write_aio"\nerrno = "x"\n'
        'errno = "0x1c"\nevent = "read_aio"\nonce = "yes"\n'
    )
    assert [(s.group, s.ident, s.values) for s in sections] == [
        ("inject-error", "x", {"event": "read_aio", "errno": "0x1c", "once": "yes"})
    ]


@pytest.mark.parametrize(
    ("text", "value"),
    [("5", 5), (" 3", 3), ("0x1c", 28), ("010", 8), ("0", 0), ("-1", (1 << 64) - 1), ("+7", 7)],
)
def test_qemuopts_numbers(text: str, value: int) -> None:
    assert parse_qemuopts_number("n", text) == value


@pytest.mark.parametrize("text", ["", "abc", "5k", "08", "0x", "3 ", "1_0", str(1 << 64)])
def test_qemuopts_numbers_bad(text: str) -> None:
    with pytest.raises(OptionError, match="^Parameter 'n' expects a number$"):
        parse_qemuopts_number("n", text)


def write_conf(tmp_path: Path, text: str) -> str:
    conf = tmp_path / "c.conf"
    conf.write_text(text)
    return str(conf)


def test_config_rule_fails_reads_and_later_writes(tmp_path: Path) -> None:
    # qemu-io -c 'read 0 512' -c 'write 0 512' -c 'read 0 512' blkdebug:c.conf:x.raw
    conf = write_conf(tmp_path, '[inject-error]\nevent = "read_aio"\nerrno = "28"\n')
    raw, _, _ = open_raw_over_blkdebug({"config": conf})
    assert [read(raw), write(raw), read(raw)] == ["ENOSPC", "ENOSPC", "ENOSPC"]


def test_once_rule_fires_once(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, '# comment\n\n[inject-error]\nevent = "read_aio"\nonce = "on"\n')
    raw, _, _ = open_raw_over_blkdebug({"config": conf})
    assert [read(raw), write(raw), read(raw)] == ["EIO", "ok", "ok"]


def test_first_defined_rule_wins(tmp_path: Path) -> None:
    conf = write_conf(
        tmp_path,
        '[inject-error]\nevent = "read_aio"\nerrno = "28"\n'
        '[inject-error]\nevent = "read_aio"\nerrno = "5"\n',
    )
    raw, _, _ = open_raw_over_blkdebug({"config": conf})
    assert read(raw) == "ENOSPC"


def test_config_rules_come_before_option_rules(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, '[inject-error]\nevent = "read_aio"\nerrno = "28"\nonce = "on"\n')
    raw, _, _ = open_raw_over_blkdebug({"config": conf, "inject-error.event": "read_aio"})
    assert [read(raw), read(raw)] == ["ENOSPC", "EIO"]


def test_set_state_in_config(tmp_path: Path) -> None:
    conf = write_conf(
        tmp_path,
        '[set-state]\nevent = "read_aio"\nnew_state = "2"\n'
        '[inject-error]\nevent = "write_aio"\nstate = "2"\n',
    )
    raw, blkdebug, _ = open_raw_over_blkdebug({"config": conf})
    assert blkdebug.state == 1
    # The read moves to state 2; the write then activates the rule, which stays active.
    assert [read(raw), write(raw), read(raw)] == ["ok", "EIO", "EIO"]
    assert blkdebug.state == 2


# --- -blockdev / json: options ----------------------------------------------------------------


def test_flat_list_options() -> None:
    raw, _, _ = open_raw_over_blkdebug(
        {"inject-error.0.event": "read_aio", "inject-error.0.once": "on",
         "inject-error.0.errno": "28"}
    )
    assert [read(raw), read(raw)] == ["ENOSPC", "ok"]


def test_json_list_options_take_typed_and_string_values() -> None:
    for entry in ({"event": "read_aio", "errno": 28, "once": True},
                  {"event": "read_aio", "errno": "28", "once": "on"}):
        raw, _, _ = open_raw_over_blkdebug({"inject-error": [entry]})
        assert [read(raw), read(raw)] == ["ENOSPC", "ok"]


def test_negative_or_zero_errno_does_not_fail() -> None:
    raw, _, _ = open_raw_over_blkdebug({"inject-error": [{"event": "read_aio", "errno": -28}]})
    assert read(raw) == "ok"
    raw, _, _ = open_raw_over_blkdebug({"inject-error.0.event": "read_aio", "inject-error.0.errno": "0"})
    assert read(raw) == "ok"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"inject-error.0.errno": "5"}, "Missing event name for rule"),
        ({"inject-error.0.event": "foo"}, "invalid parameter value: foo"),
        ({"inject-error.0.event": "read_aio", "inject-error.0.foo": "1"},
         "[inject-error] section doesn't support the option 'foo'"),
        ({"inject-error.1.event": "read_aio"}, "Unused option '1.event' for [inject-error]"),
        ({"inject-error.event": "read_aio", "inject-error.foo": "1"},
         "Unknown option 'foo' for [inject-error]"),
        ({"inject-error.foo": "1"}, "Unused option 'foo' for [inject-error]"),
        ({"inject-error.event": "read_aio", "inject-error.0.event": "read_aio"},
         "Unknown option '0.event' for [inject-error]"),
        ({"inject-error.0.event": "read_aio", "inject-error.0.errno": "x"},
         "Parameter 'errno' expects a number"),
        ({"inject-error.0.event": "read_aio", "inject-error.0.iotype": "foo"},
         "invalid parameter value: foo"),
        ({"set-state.0.event": "read_aio", "set-state.0.new_state": "x"},
         "Parameter 'new_state' expects a number"),
        ({"inject-error": [5]}, "[inject-error] section (index 0) does not consist of keys"),
        ({"inject-error": [{"event": "read_aio", "errno": True}]},
         "Parameter 'errno' expects a number"),
        ({"take-child-perms.0": "foo"}, "Parameter 'null' does not accept value 'foo'"),
        ({"align": 3}, "Cannot meet constraints with align 3"),
        ({"align": 1 << 31}, "Cannot meet constraints with align 2147483648"),
        ({"max-transfer": (1 << 31) - 1}, "Cannot meet constraints with max-transfer 2147483647"),
        ({"align": 4096, "max-transfer": 1024}, "Cannot meet constraints with max-transfer 1024"),
        ({"align": 512, "opt-write-zero": 1000}, "Cannot meet constraints with opt-write-zero 1000"),
        ({"align": 512, "opt-write-zero": 1024, "max-write-zero": 1536},
         "Cannot meet constraints with max-write-zero 1536"),
        ({"align": 512, "opt-discard": 1000}, "Cannot meet constraints with opt-discard 1000"),
        ({"align": 512, "opt-discard": 1024, "max-discard": 1536},
         "Cannot meet constraints with max-discard 1536"),
        ({"max-transfer": 3, "opt-write-zero": 1 << 31},
         "Cannot meet constraints with opt-write-zero 2147483648"),
        # Rule errors come before the alignment checks.
        ({"align": 3, "inject-error.0.event": "foo"}, "invalid parameter value: foo"),
    ],
)
def test_option_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(BlockError) as info:
        open_blkdebug(options)
    assert str(info.value) == message


def test_accepted_limits() -> None:
    drv, _, _ = open_blkdebug(
        {"align": 512, "max-transfer": 4096, "opt-write-zero": 1024, "max-write-zero": 2048,
         "opt-discard": 512, "max-discard": 1 << 20, "take-child-perms": ["resize"],
         "unshare-child-perms.0": "write"}
    )
    assert drv.request_alignment == 512
    assert (drv.max_transfer, drv.max_write_zero, drv.max_discard) == (4096, 2048, 1 << 20)
    assert drv.take_child_perms == ("resize",)
    assert drv.unshare_child_perms == ("write",)
    # With no align, max-transfer needs only be a multiple of 1 (qemu-io accepts 3).
    drv, _, _ = open_blkdebug({"align": 0, "max-transfer": 3, "opt-discard": 3})
    assert drv.request_alignment == 1


# --- when rules fire --------------------------------------------------------------------------


def test_event_list() -> None:
    assert len(BLKDEBUG_EVENTS) == len(set(BLKDEBUG_EVENTS))
    for name in ("l1_update", "read_aio", "write_aio", "flush_to_os", "flush_to_disk",
                 "pwritev", "pwritev_zero", "pwritev_done", "cluster_alloc_space", "none"):
        assert name in BLKDEBUG_EVENTS


def test_requests_on_blkdebug_do_not_fire_read_aio_themselves() -> None:
    # qemu-io --image-opts driver=blkdebug,image.filename=x,inject-error.0.event=read_aio
    #   -c 'read 0 512': succeeds.
    drv, _, _ = open_blkdebug({"inject-error.0.event": "read_aio"})
    assert read(drv) == "ok"
    run(drv.debug_event("read_aio"))
    assert read(drv) == "EIO"


def test_pwritev_event_from_the_request_layer() -> None:
    drv, image, _ = open_blkdebug({"inject-error.0.event": "pwritev"})
    assert read(drv) == "ok"
    run(drv.debug_event("pwritev"))
    assert write(drv) == "EIO"
    assert [c[0] for c in image.calls] == ["preadv"]


def test_active_rule_stays_until_another_event_activates_rules() -> None:
    # read_aio activates; write_aio has no rules, so the write fails too (qemu-io: yes).
    raw, blkdebug, _ = open_raw_over_blkdebug({"inject-error.0.event": "read_aio"})
    assert [write(raw), read(raw), write(raw)] == ["ok", "EIO", "EIO"]
    run(blkdebug.debug_event("l2_load"))  # no rules for it: still active
    assert write(raw) == "EIO"


def test_sector_rules_only_hit_overlapping_requests() -> None:
    raw, _, _ = open_raw_over_blkdebug(
        {"inject-error.0.event": "read_aio", "inject-error.0.sector": "3"}
    )
    assert [read(raw, 0, 512), read(raw, 512, 1024), read(raw, 1536, 512), read(raw, 2048, 512),
            read(raw, 1024, 4096)] == ["ok", "ok", "EIO", "ok", "EIO"]


def test_sector_minus_one_means_everywhere() -> None:
    raw, _, _ = open_raw_over_blkdebug(
        {"inject-error.0.event": "read_aio", "inject-error.0.sector": "-1"}
    )
    assert read(raw, 4096, 512) == "EIO"


def test_state_machine() -> None:
    # read_aio fails only in state 2; write_aio moves 1 -> 2.
    raw, blkdebug, _ = open_raw_over_blkdebug(
        {"inject-error.0.event": "read_aio", "inject-error.0.state": "2",
         "set-state.0.event": "write_aio", "set-state.0.state": "1",
         "set-state.0.new_state": "2"}
    )
    assert [read(raw), write(raw), read(raw), write(raw)] == ["ok", "ok", "EIO", "EIO"]
    assert blkdebug.state == 2


def test_set_state_rules_see_the_old_state() -> None:
    drv, _, _ = open_blkdebug(
        {"set-state": [{"event": "l1_update", "state": 1, "new_state": 2},
                       {"event": "l1_update", "state": 2, "new_state": 3}]}
    )
    run(drv.debug_event("l1_update"))
    assert drv.state == 2
    run(drv.debug_event("l1_update"))
    assert drv.state == 3


def test_first_defined_set_state_wins() -> None:
    drv, _, _ = open_blkdebug(
        {"set-state": [{"event": "cluster_alloc", "new_state": 5},
                       {"event": "cluster_alloc", "new_state": 7}]}
    )
    run(drv.debug_event("cluster_alloc"))
    assert drv.state == 5


def test_iotype() -> None:
    raw, _, _ = open_raw_over_blkdebug(
        {"inject-error.0.event": "read_aio", "inject-error.0.iotype": "read"}
    )
    assert [read(raw), write(raw), read(raw)] == ["EIO", "ok", "EIO"]


def test_default_iotypes_cover_zeroes_and_discard_but_not_block_status() -> None:
    raw, blkdebug, _ = open_raw_over_blkdebug({"inject-error.0.event": "read_aio"})
    assert read(raw) == "EIO"
    assert outcome(raw.pwrite_zeroes(0, 512, RequestFlags.NONE)) == "EIO"
    assert outcome(raw.pdiscard(0, 512)) == "EIO"
    assert outcome(raw.block_status(0, 512)) == "ok"
    assert outcome(blkdebug.flush_to_disk()) == "EIO"


def test_block_status_iotype() -> None:
    drv, _, _ = open_blkdebug(
        {"inject-error.0.event": "read_aio", "inject-error.0.iotype": "block-status"}
    )
    run(drv.debug_event("read_aio"))
    assert outcome(drv.block_status(0, 512)) == "EIO"
    assert read(drv) == "ok"


def test_flush_is_never_hit_by_sector_rules() -> None:
    drv, _, _ = open_blkdebug(
        {"inject-error.0.event": "flush_to_disk", "inject-error.0.sector": "0"}
    )
    run(drv.debug_event("flush_to_disk"))
    assert outcome(drv.flush_to_disk()) == "ok"
    assert write(drv) == "EIO"


def test_internal_events_from_a_format_driver() -> None:
    drv, _, _ = open_blkdebug(
        {"inject-error.0.event": "l2_update", "inject-error.0.errno": "28",
         "inject-error.0.once": "on", "inject-error.0.immediately": "on"}
    )
    run(drv.debug_event("l1_update"))
    assert write(drv) == "ok"
    run(drv.debug_event("l2_update"))
    assert [write(drv), write(drv)] == ["ENOSPC", "ok"]


def test_unknown_event_is_a_programming_error() -> None:
    drv, _, _ = open_blkdebug({})
    with pytest.raises(ValueError):
        run(drv.debug_event("READ_AIO"))


def test_requests_reach_the_image_unchanged() -> None:
    drv, image, _ = open_blkdebug({})
    image.data[4096:4100] = b"abcd"
    buf = bytearray(512)
    run(drv.preadv(4096, memoryview(buf), RequestFlags.NONE))
    assert buf[:4] == b"abcd"
    run(drv.pwritev(0, memoryview(b"x" * 512), RequestFlags.FUA))
    run(drv.pwrite_zeroes(512, 512, RequestFlags.MAY_UNMAP))
    run(drv.pdiscard(1024, 512))
    status = run(drv.block_status(0, 512))
    run(drv.truncate(2 * MiB))
    assert [c[:3] for c in image.calls] == [
        ("preadv", 4096, 512), ("pwritev", 0, 512), ("pwrite_zeroes", 512, 512),
        ("pdiscard", 1024, 512), ("block_status", 0, 512), ("truncate", 2 * MiB, 0)]
    assert image.calls[1][3] == RequestFlags.FUA
    assert status.flags & BlockStatusFlags.OFFSET_VALID and status.file is image
    assert drv.getlength() == 2 * MiB


# --- filename as info block shows it ----------------------------------------------------------


def test_filename(tmp_path: Path) -> None:
    drv, _, _ = open_blkdebug({"x-image": "/tmp/mem.raw"}, image_options=False)
    assert drv.filename() == "blkdebug::/tmp/mem.raw"
    conf = write_conf(tmp_path, "")
    drv, _, _ = open_blkdebug({"config": conf})
    assert drv.filename() == f"blkdebug:{conf}:/tmp/mem.raw"
    # take-child-perms keeps the plain name; rules and limits make it json:.
    drv, _, _ = open_blkdebug({"take-child-perms.0": "resize"})
    assert drv.filename() == "blkdebug::/tmp/mem.raw"
    for options in ({"inject-error.0.event": "read_aio"}, {"max-transfer": 4096}, {"align": 4096}):
        drv, _, _ = open_blkdebug(options)
        assert drv.filename() is None
    drv, _, _ = open_blkdebug({}, child=MemChild(MiB, filename='json:{"driver": "null-co"}'))
    assert drv.filename() is None
    drv, _, _ = open_blkdebug({}, child=MemChild(MiB, filename="null-co://"))
    assert drv.filename() == "blkdebug::null-co://"


def test_class_attributes() -> None:
    assert BlkdebugDriver.format_name == "blkdebug"
    assert not BlkdebugDriver.is_format
    assert BlkdebugDriver.is_filter
    assert BlkdebugDriver.protocol_prefixes == ("blkdebug",)
    assert set(BlkdebugDriver.runtime_options) == {
        "config", "x-image", "align", "max-transfer", "opt-write-zero", "max-write-zero",
        "opt-discard", "max-discard"}


def test_none_event_fires_at_open() -> None:
    # qemu-io -c 'read 0 512' 'json:{"driver":"blkdebug","inject-error":[{"event":"none",
    #   "iotype":"read","errno":5}],"image":{...}}': read failed: Input/output error
    drv, _, _ = open_blkdebug({"inject-error.0.event": "none", "inject-error.0.iotype": "read"})
    assert read(drv) == "EIO"


def test_none_event_set_state_at_open_and_rules_replaced_by_later_events() -> None:
    # set-state on none moves 1 -> 2 at open: a read_aio rule for state 2 fires at once.
    raw, blkdebug, _ = open_raw_over_blkdebug({
        "set-state.0.event": "none", "set-state.0.state": "1", "set-state.0.new_state": "2",
        "inject-error.0.event": "read_aio", "inject-error.0.state": "2"})
    assert blkdebug.state == 2
    assert [read(raw), read(raw)] == ["EIO", "EIO"]
    # A none rule is active until read_aio activates its own (qemu-io: read, read, write ok).
    raw, _, _ = open_raw_over_blkdebug({
        "inject-error.0.event": "none", "inject-error.0.iotype": "write",
        "inject-error.1.event": "read_aio", "inject-error.1.iotype": "read",
        "inject-error.1.sector": "100"})
    assert [read(raw), read(raw), write(raw)] == ["ok", "ok", "ok"]
