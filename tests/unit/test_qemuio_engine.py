"""The qemu-io engine's number parsing and formatting, checked against what qemu-io 7.2 prints."""

from __future__ import annotations

import pytest

from blockgraph.monitor.qemuio import (
    CvtnumError,
    QemuIO,
    cvtnum,
    cvtstr,
    dump_lines,
    parse_size,
    report_lines,
    timestr,
)


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("512", 512), ("0x200", 512), ("0X10", 16), ("+0x10", 16), ("+5", 5),
    ("010", 10),  # decimal, not octal
    ("512b", 512), ("512B", 512), ("1k", 1024), ("1K", 1024), ("1M", 1 << 20),
    ("1T", 1 << 40), ("1P", 1 << 50), ("7E", 7 << 60), ("9223372036854775807", (1 << 63) - 1),
    ("1.5k", 1536), ("1.0", 1), ("0.5k", 512), ("1.25k", 1280), ("1.3k", 1331),
    ("1.0001k", 1024), ("1.k", 1024), ("0x1b", 27), ("0x1k", 1024),
])
def test_cvtnum_accepts(text: str, value: int) -> None:
    assert cvtnum(text) == value


def test_cvtnum_warns_on_hex_with_unit() -> None:
    assert parse_size("0x1k") == (1024, True)
    assert parse_size("0x10") == (16, False)


@pytest.mark.parametrize("text", [
    "1.5", "1e3", "0x1.8k", "-0", "-1", "1kk", "1Z", "1M5", "00x1", "0x", ".5k", "1,5", "1.5b",
    "0x1.0k", "1.5e1k", "1.k5", "0xg", "x", "",
])
def test_cvtnum_rejects(text: str) -> None:
    with pytest.raises(CvtnumError) as info:
        cvtnum(text)
    assert not info.value.too_large
    assert info.value.message() == (
        f"Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {text}")


@pytest.mark.parametrize("text", [
    "16E", "8E", "99999999999999999999", "18446744073709551615", "9223372036854775808",
    "0xffffffffffffffff", "0x8000000000000000",
])
def test_cvtnum_too_large(text: str) -> None:
    with pytest.raises(CvtnumError) as info:
        cvtnum(text)
    assert info.value.too_large
    assert info.value.message() == f"Parsing error: argument too large -- {text}"


@pytest.mark.parametrize(("value", "text"), [
    (0, "0 bytes"), (1, "1 bytes"), (512, "512 bytes"), (1023, "1023 bytes"),
    (1024, "1 KiB"), (1536, "1.500 KiB"), (4096, "4 KiB"), (1 << 20, "1 MiB"),
    (1.5 * (1 << 20), "1.500 MiB"), (3 << 30, "3 GiB"), (1 << 40, "1 TiB"), (1 << 50, "1 PiB"),
    (1 << 60, "1 EiB"), ((1 << 63) - 1, "8 EiB"), (384.5 * 1024, "384.500 KiB"),
    # bytes take six decimals, and everything from the first ".000" is cut
    (1.339076, "1.339076 bytes"), (632.032547, "632.032547 bytes"), (1.0001, "1 bytes"),
    (10.045, "10.045000 bytes"),
])
def test_cvtstr(value: float, text: str) -> None:
    assert cvtstr(value) == text


@pytest.mark.parametrize(("seconds", "human", "machine"), [
    (0.0, "00.00 sec", "0:00:00.00"),
    (0.004, "00.00 sec", "0:00:00.00"),
    (0.24, "00.24 sec", "0:00:00.24"),
    (4.84, "0:00:04.84", "0:00:04.84"),
    (75.5, "0:01:15.50", "0:01:15.50"),
    (3723.25, "1:02:03.25", "1:02:03.25"),
])
def test_timestr(seconds: float, human: str, machine: str) -> None:
    assert timestr(seconds) == human
    assert timestr(seconds, machine=True) == machine


def test_report_lines() -> None:
    assert report_lines("read", 0, 4096, 4096, 1, 0.5, False) == [
        "read 4096/4096 bytes at offset 0",
        "4 KiB, 1 ops; 00.50 sec (8 KiB/sec and 2.0000 ops/sec)",
    ]
    assert report_lines("wrote", 512, 1024, 1024, 1, 2.0, False)[1] == (
        "1 KiB, 1 ops; 0:00:02.00 (512 bytes/sec and 0.5000 ops/sec)")
    assert report_lines("read", 0, 4096, 4096, 1, 0.5, True) == ["4096,1,0:00:00.50,8192.000,2.000"]


def test_dump_lines() -> None:
    assert dump_lines(b"A" * 20, 10) == [
        "0000000a:  41 41 41 41 41 41 41 41 41 41 41 41 41 41 41 41  AAAAAAAAAAAAAAAA",
        "0000001a:  41 41 41 41  AAAA",
    ]
    assert dump_lines(b"\x00a\x7f", 0) == ["00000000:  00 61 7f  .a."]


async def _run(lines: list[str], standalone: bool = True) -> tuple[list[str], list[str], list[bool]]:
    out: list[str] = []
    err: list[str] = []
    engine = QemuIO(None, out.append, err.append, standalone=standalone)
    results = [await engine.run(line) for line in lines]
    return out, err, results


def test_engine_without_a_file() -> None:
    import asyncio

    out, err, results = asyncio.run(_run(["length", "help nosuch", "sleep x", "sleep 0", "bogus",
                                          "read", "quit"]))
    assert results == [False, False, False, True, False, False, True]
    assert out == ["command nosuch not found", "x is not a valid number"]
    assert err == ["no file open, try 'help open'", 'command "bogus" not found',
                   "no file open, try 'help open'"]


def test_hmp_engine_has_no_session_commands() -> None:
    import asyncio

    out, err, _ = asyncio.run(_run(["help open", "open x", "help"], standalone=False))
    assert out[0] == "command open not found"
    assert err == ['command "open" not found']
    assert not any(line.startswith(("open ", "close ", "quit ")) for line in out)
    assert out[-1] == "Use 'help commandname' for extended help."
