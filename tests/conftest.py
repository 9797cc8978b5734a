"""Settings every test shares."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from blockgraph.graph.layer import BlockLayer

_LONG = 4096


@pytest.fixture
def layer() -> Iterator[BlockLayer]:
    """A BlockLayer for the test, closed after it (a test file that needs more, such as the
    event loop made before fds are counted, defines its own)."""
    from blockgraph.graph.layer import BlockLayer

    lay = BlockLayer()
    yield lay
    lay.close()


def _first_difference(left: bytes | bytearray | memoryview,
                      right: bytes | bytearray | memoryview) -> int:
    a, b = bytes(left), bytes(right)
    size = min(len(a), len(b))
    lo, hi = 0, size
    if a[:size] == b[:size]:
        return size
    # Bisect on slice equality (C speed) rather than walking byte by byte.
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    return lo


def pytest_assertrepr_compare(op: str, left: object, right: object) -> list[str] | None:
    """Explain a failed comparison of long byte strings in one line.

    pytest's own explanation diffs them element by element, which for two disk images takes
    longer than the whole test run.
    """
    kinds = (bytes, bytearray, memoryview)
    if op != "==" or not isinstance(left, kinds) or not isinstance(right, kinds):
        return None
    if max(len(left), len(right)) <= _LONG:
        return None
    offset = _first_difference(left, right)
    return [f"byte strings differ (lengths {len(left)} and {len(right)}), first at offset {offset}"]
