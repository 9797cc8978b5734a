"""The golden recordings still match QEMU 7.2.

Runs every scenario of ``tests/golden`` against the real QEMU binaries and
checks the output still equals ``<name>.qemu.out``, so that a changed scenario,
filter or QEMU build cannot silently leave stale expectations behind.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "golden"


def _load_runner() -> ModuleType:
    module = sys.modules.get("golden_runner")
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location("golden_runner", GOLDEN_DIR / "golden_runner.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["golden_runner"] = module
    spec.loader.exec_module(module)
    return module


runner = _load_runner()


@pytest.fixture
def qemu_tools() -> object:
    paths = {tool: shutil.which(tool) for tool in runner.TOOL_NAMES}
    missing = [tool for tool, path in paths.items() if path is None]
    if missing:
        if os.environ.get("BLOCKGRAPH_REQUIRE_ORACLES"):
            pytest.fail(f"oracle missing: {', '.join(missing)}", pytrace=False)
        pytest.skip(f"oracle missing: {', '.join(missing)}")
    return runner.Tools(
        system=Path(str(paths["qemu-system-x86_64"])),
        img=Path(str(paths["qemu-img"])),
        io=Path(str(paths["qemu-io"])),
    )


@pytest.mark.parametrize("name", runner.scenario_names(".qemu.out"))
def test_golden_recording_matches_qemu(name: str, qemu_tools: object, tmp_path: Path) -> None:
    result = runner.run_scenario(name, qemu_tools, tmp_path / "test")
    runner.assert_output(result, GOLDEN_DIR / f"{name}.qemu.out")
