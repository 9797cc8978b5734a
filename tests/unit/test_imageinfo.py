"""The text helpers shared by ``img info``, ``img snapshot -l`` and HMP (no QEMU needed)."""

from __future__ import annotations

from dataclasses import dataclass

from blockgraph.monitor.imageinfo import format_snapshot_list, size_to_str


def test_size_to_str_changes_unit_at_1000() -> None:
    # qemu-img prints a 1047552-byte disk as "0.999 MiB": the unit changes at 1000 of the
    # smaller one, so three significant digits never need an exponent.
    cases = {0: "0 B", 1: "1 B", 765: "765 B", 999: "999 B", 1000: "0.977 KiB",
             1023: "0.999 KiB", 1024: "1 KiB", 1047552: "0.999 MiB", 1 << 20: "1 MiB",
             1536 << 20: "1.5 GiB", 1 << 62: "4 EiB", (1 << 64) - 1: "16 EiB"}
    assert {size: size_to_str(size) for size in cases} == cases


@dataclass
class _Snap:
    id_str: str = "1"
    name: str = "s1"
    vm_state_size: int = 765
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 3_723_456_000_000
    icount: int = -1


def test_snapshot_list_columns() -> None:
    assert format_snapshot_list([]) == ""
    text = format_snapshot_list([_Snap(), _Snap(id_str="2", name="x", vm_state_size=0, vm_clock_nsec=0, icount=0)])
    lines = text.splitlines()
    assert lines[:2] == ["Snapshot list:",
                         "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT"]
    assert lines[2].startswith("1         s1                  765 B ")
    assert lines[2].endswith(" 01:02:03.456           ")
    assert lines[3].startswith("2         x                     0 B ")
    assert lines[3].endswith(" 00:00:00.000          0")
