"""Run the golden scenarios of this directory (shared by the golden and interop tests).

A scenario is an executable bash script here, in QEMU iotests style, that
sources ``common.rc`` and prints filtered output. ``<name>.qemu.out`` is what
QEMU 7.2 prints (recorded by ``record``), ``<name>.out`` what blockgraph must
print (the same, with the seed's rules applied by ``seedify``).
"""

from __future__ import annotations

import difflib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).resolve().parent

#: The program names the scenarios call, through $QEMU_PROG, $QEMU_IMG, $QEMU_IO.
TOOL_NAMES = ("qemu-system-x86_64", "qemu-img", "qemu-io")

#: A whole scenario, not a single command. QEMU needs seconds; a hung monitor
#: (a scenario that forgot "quit") must not hang the test run.
SCENARIO_TIMEOUT = 900


@dataclass(frozen=True)
class Tools:
    """Paths of the three programs a scenario runs."""

    system: Path
    img: Path
    io: Path


def scenario_names(suffix: str) -> list[str]:
    """Scenarios that have an expected output file ``<name><suffix>``."""
    names = []
    for path in sorted(GOLDEN_DIR.glob(f"*{suffix}")):
        name = path.name[: -len(suffix)]
        if suffix == ".out" and name.endswith(".qemu"):
            continue
        if (GOLDEN_DIR / name).is_file():
            names.append(name)
    return names


def run_scenario(name: str, tools: Tools, test_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run scenario ``name`` with a fresh, empty ``test_dir`` as TEST_DIR."""
    test_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        QEMU_PROG=str(tools.system),
        QEMU_IMG=str(tools.img),
        QEMU_IO=str(tools.io),
        TEST_DIR=str(test_dir),
    )
    return subprocess.run(
        [str(GOLDEN_DIR / name)],
        cwd=test_dir,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=SCENARIO_TIMEOUT,
        check=False,
    )


def assert_output(result: subprocess.CompletedProcess[str], expected_file: Path) -> None:
    """Fail with a unified diff unless the scenario printed ``expected_file``."""
    expected = expected_file.read_text()
    if result.stdout == expected:
        return
    diff = "".join(
        difflib.unified_diff(
            expected.splitlines(keepends=True),
            result.stdout.splitlines(keepends=True),
            fromfile=str(expected_file.relative_to(GOLDEN_DIR.parent.parent)),
            tofile="actual output",
        )
    )
    message = f"output differs from {expected_file.name}:\n{diff}"
    if result.stderr:
        message += f"\nscenario stderr:\n{result.stderr}"
    pytest.fail(message, pytrace=False)
