"""The table of drivers by name, format probing and protocol lookup by filename prefix."""

from __future__ import annotations

import importlib
from functools import cache

from blockgraph.drivers.base import BlockDriver
from blockgraph.errors import BlockError

# name -> "module:Class"; imported on first use so that a tool pays only for what it opens.
_DRIVER_TABLE: dict[str, str] = {
    "file": "blockgraph.drivers.file:FileDriver",
    "raw": "blockgraph.drivers.raw:RawDriver",
    "qcow2": "blockgraph.drivers.qcow2:Qcow2Driver",
    "blkdebug": "blockgraph.drivers.blkdebug:BlkdebugDriver",
    "null-co": "blockgraph.drivers.null:NullCoDriver",
    "null-aio": "blockgraph.drivers.null:NullAioDriver",
    "nbd": "blockgraph.drivers.nbd.driver:NbdDriver",
    "throttle": "blockgraph.drivers.throttle:ThrottleDriver",
}


def driver_names() -> list[str]:
    return sorted(_DRIVER_TABLE)


@cache
def get_driver(name: str) -> type[BlockDriver]:
    """Return the driver class for ``driver=name``.

    :raise BlockError: ``Unknown driver 'name'`` as QEMU says it.
    """
    target = _DRIVER_TABLE.get(name)
    if target is None:
        raise BlockError(f"Unknown driver '{name}'")
    module_name, _, class_name = target.partition(":")
    cls: type[BlockDriver] = getattr(importlib.import_module(module_name), class_name)
    return cls


def find_protocol(filename: str) -> type[BlockDriver]:
    """The protocol driver a filename selects: ``prefix:rest`` if a driver claims the prefix,
    the ``file`` driver otherwise (QEMU treats paths with an unknown prefix as plain files only
    when the prefix contains a slash or there is none).

    :raise BlockError: ``Unknown protocol 'x'``.
    """
    colon = filename.find(":")
    slash = filename.find("/")
    if colon <= 0 or (0 <= slash < colon):
        return get_driver("file")
    prefix = filename[:colon]
    for name in _DRIVER_TABLE:
        cls = get_driver(name)
        if prefix in cls.protocol_prefixes:
            return cls
    raise BlockError(f"Unknown protocol '{prefix}'")


# The drivers that implement probe(); every other one scores 0 and can never win, so probing
# need not import them (blkdebug, nbd, ... cost start-up time). tests/unit/test_null_raw.py
# checks this list against the drivers.
PROBING_DRIVERS = ("raw", "qcow2")


def probe_format(header: bytes, filename: str) -> type[BlockDriver]:
    """The format driver whose probe scores ``header`` highest (raw, at 1, if none claims it)."""
    best: type[BlockDriver] = get_driver("raw")
    best_score = 0
    for name in PROBING_DRIVERS:
        cls = get_driver(name)
        if not cls.is_format:
            continue
        score = cls.probe(header, filename)
        if score > best_score:
            best, best_score = cls, score
    return best
