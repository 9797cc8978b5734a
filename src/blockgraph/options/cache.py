"""The legacy ``cache=MODE`` shorthand of ``-drive`` (and qemu-img/qemu-io ``-t``).

A mode names a combination of the three cache options: ``cache.writeback`` (a property of the
BlockBackend), ``cache.direct`` and ``cache.no-flush`` (per-node options). The table is data;
the spec (``qemu-cache-model.md`` section a) is the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

from blockgraph.errors import OptionError

__all__ = ["CACHE_OPTION_KEYS", "CacheMode", "apply_legacy_cache", "parse_cache_mode"]


@dataclass(frozen=True)
class CacheMode:
    """What one ``cache=`` mode sets.

    :param writeback: the BlockBackend's write cache is enabled (else writethrough).
    :param direct: ``cache.direct``, O_DIRECT on the file driver.
    :param no_flush: ``cache.no-flush``, flushes stop at the node.
    """

    writeback: bool
    direct: bool
    no_flush: bool

    def as_options(self) -> dict[str, str]:
        """The mode as ``-drive`` option strings, keyed by their option names."""
        return {
            "cache.writeback": _on_off(self.writeback),
            "cache.direct": _on_off(self.direct),
            "cache.no-flush": _on_off(self.no_flush),
        }


CACHE_MODES: dict[str, CacheMode] = {
    "none": CacheMode(writeback=True, direct=True, no_flush=False),
    "off": CacheMode(writeback=True, direct=True, no_flush=False),
    "directsync": CacheMode(writeback=False, direct=True, no_flush=False),
    "writeback": CacheMode(writeback=True, direct=False, no_flush=False),
    "unsafe": CacheMode(writeback=True, direct=False, no_flush=True),
    "writethrough": CacheMode(writeback=False, direct=False, no_flush=False),
}

CACHE_OPTION_KEYS = ("cache.writeback", "cache.direct", "cache.no-flush")


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"


def parse_cache_mode(mode: str) -> CacheMode:
    """Look up a legacy cache mode.

    :param mode: ``none`` (alias ``off``), ``directsync``, ``writeback``, ``unsafe`` or
        ``writethrough``; matched exactly, as QEMU does.
    :raise OptionError: ``invalid cache option`` for anything else.
    """
    try:
        return CACHE_MODES[mode]
    except KeyError:
        raise OptionError("invalid cache option") from None


def apply_legacy_cache(opts: dict[str, str]) -> None:
    """Replace ``cache=MODE`` in ``-drive`` options by the three options it implies.

    Explicit ``cache.*`` keys win over the mode (``cache=writethrough,cache.writeback=on`` is
    writeback), so a value is only filled in where the key is absent. Without ``cache`` the
    options are left alone.

    :param opts: flat ``-drive`` options, modified in place.
    :raise OptionError: ``invalid cache option``; ``opts`` is then unchanged.
    """
    if "cache" not in opts:
        return
    implied = parse_cache_mode(opts["cache"]).as_options()
    del opts["cache"]
    for key in CACHE_OPTION_KEYS:
        opts.setdefault(key, implied[key])
