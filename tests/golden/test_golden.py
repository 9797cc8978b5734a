"""Golden tests: the iotests-style scenarios of this directory, run against blockgraph.

blockgraph's single console script dispatches on the name it is called by
(busybox style), so symlinks named like QEMU's programs make the scenarios run
it unchanged, and its messages start with ``qemu-system-x86_64:`` as QEMU's do.
Each scenario's output must equal ``<name>.out`` byte for byte.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from golden_runner import GOLDEN_DIR, TOOL_NAMES, Tools, assert_output, run_scenario, scenario_names

BLOCKGRAPH = Path(sys.executable).parent / "blockgraph"


@pytest.fixture
def blockgraph_tools(tmp_path: Path) -> Tools:
    if not BLOCKGRAPH.exists():
        pytest.fail(f"blockgraph console script not found at {BLOCKGRAPH}", pytrace=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOL_NAMES:
        (bin_dir / tool).symlink_to(BLOCKGRAPH)
    return Tools(
        system=bin_dir / "qemu-system-x86_64",
        img=bin_dir / "qemu-img",
        io=bin_dir / "qemu-io",
    )


def test_every_scenario_has_expected_output() -> None:
    scenarios = {
        path.name
        for path in GOLDEN_DIR.iterdir()
        if path.is_file()
        and "." not in path.name
        and "common.rc" in path.read_text()
        and path.name != "record"
    }
    assert scenarios, "no scenarios found"
    assert scenarios == set(scenario_names(".out")), "run tests/golden/record"
    assert scenarios == set(scenario_names(".qemu.out")), "run tests/golden/record"


@pytest.mark.parametrize("name", scenario_names(".out"))
def test_golden(name: str, blockgraph_tools: Tools, tmp_path: Path) -> None:
    result = run_scenario(name, blockgraph_tools, tmp_path / "test")
    assert_output(result, GOLDEN_DIR / f"{name}.out")
