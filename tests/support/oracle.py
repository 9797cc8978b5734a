"""Helpers for tests that run the real QEMU tools (the oracles)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

HAVE_QEMU = shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None


def require_qemu() -> None:
    """Skip when qemu-img/qemu-io are missing, unless BLOCKGRAPH_REQUIRE_ORACLES is set."""
    if HAVE_QEMU:
        return
    if os.environ.get("BLOCKGRAPH_REQUIRE_ORACLES"):
        pytest.fail("qemu-img/qemu-io are required (BLOCKGRAPH_REQUIRE_ORACLES is set)")
    pytest.skip("qemu-img/qemu-io not installed")


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True)
