"""DirtyBitmap against a per-chunk model: set, clear, runs, merge, resize."""

from __future__ import annotations

import random

import pytest

from blockgraph.drivers.bitmap import DirtyBitmap


def _model_runs(model: list[bool], g: int, size: int, offset: int, length: int) -> list[tuple[int, int, bool]]:
    out: list[tuple[int, int, bool]] = []
    end = min(offset + length, size)
    pos = offset
    while pos < end:
        dirty = model[pos // g]
        stop = min((pos // g + 1) * g, end)
        if out and out[-1][2] == dirty:
            out[-1] = (out[-1][0], out[-1][1] + stop - pos, dirty)
        else:
            out.append((pos, stop - pos, dirty))
        pos = stop
    return out


@pytest.mark.parametrize("seed", range(20))
def test_against_model(seed: int) -> None:
    rng = random.Random(seed)
    g = 1 << rng.randint(9, 13)
    size = rng.randint(1, 300) * 512
    bm = DirtyBitmap("b", size, g)
    model = [False] * (-(-size // g))
    for _ in range(30):
        off = rng.randrange(size)
        n = rng.randint(1, size - off)
        value = rng.random() < 0.6
        (bm.set_range if value else bm.clear_range)(off, n)
        for i in range(off // g, (off + n - 1) // g + 1):
            model[i] = value
        start = rng.randrange(size)
        span = rng.randint(1, size)
        assert list(bm.runs(start, span)) == _model_runs(model, g, size, start, span)
    assert bm.is_empty() == (not any(model))


def test_merge_resize_and_disabled() -> None:
    a = DirtyBitmap("a", 1 << 20, 65536)
    b = DirtyBitmap("b", 1 << 20, 4096)
    b.set_range(5000, 10)
    a.merge(b)
    assert list(a.dirty_runs(0, 1 << 20)) == [(0, 65536)]
    a.enabled = False
    a.mark(1 << 19, 1)
    assert a.count() == 65536
    a.resize(100000)
    a.set_range(0, 100000)
    assert a.count() == 100000
    a.resize(1 << 20)
    assert list(a.dirty_runs(0, 1 << 20)) == [(0, 131072)]
    with pytest.raises(ValueError):
        DirtyBitmap("x", 1, 1000)
