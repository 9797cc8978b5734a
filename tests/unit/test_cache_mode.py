"""Legacy cache= modes (qemu-cache-model.md section a)."""

from __future__ import annotations

import pytest

from blockgraph.errors import OptionError
from blockgraph.options.cache import CacheMode, apply_legacy_cache, parse_cache_mode


@pytest.mark.parametrize(("mode", "expected"), [
    ("none", CacheMode(writeback=True, direct=True, no_flush=False)),
    ("off", CacheMode(writeback=True, direct=True, no_flush=False)),
    ("directsync", CacheMode(writeback=False, direct=True, no_flush=False)),
    ("writeback", CacheMode(writeback=True, direct=False, no_flush=False)),
    ("unsafe", CacheMode(writeback=True, direct=False, no_flush=True)),
    ("writethrough", CacheMode(writeback=False, direct=False, no_flush=False)),
])
def test_modes(mode: str, expected: CacheMode) -> None:
    assert parse_cache_mode(mode) == expected


@pytest.mark.parametrize("mode", ["bogus", "", "None", "WRITEBACK", " none", "on"])
def test_invalid_mode(mode: str) -> None:
    with pytest.raises(OptionError) as info:
        parse_cache_mode(mode)
    assert info.value.desc == "invalid cache option"


def test_cache_mode_is_frozen() -> None:
    mode = parse_cache_mode("none")
    with pytest.raises(AttributeError):
        mode.direct = False  # type: ignore[misc]


def test_apply_fills_all_three() -> None:
    opts = {"file": "x", "cache": "unsafe"}
    apply_legacy_cache(opts)
    assert opts == {"file": "x", "cache.writeback": "on", "cache.direct": "off",
                    "cache.no-flush": "on"}


def test_explicit_keys_win() -> None:
    opts = {"cache": "writethrough", "cache.writeback": "on"}
    apply_legacy_cache(opts)
    assert opts == {"cache.writeback": "on", "cache.direct": "off", "cache.no-flush": "off"}
    opts = {"cache.direct": "off", "cache": "none"}
    apply_legacy_cache(opts)
    assert opts == {"cache.direct": "off", "cache.writeback": "on", "cache.no-flush": "off"}


def test_no_cache_key_changes_nothing() -> None:
    opts = {"file": "x", "cache.direct": "on"}
    apply_legacy_cache(opts)
    assert opts == {"file": "x", "cache.direct": "on"}


def test_invalid_mode_leaves_options_alone() -> None:
    opts = {"cache": "bogus", "file": "x"}
    with pytest.raises(OptionError) as info:
        apply_legacy_cache(opts)
    assert info.value.desc == "invalid cache option"
    assert opts == {"cache": "bogus", "file": "x"}
