"""options layer: command-line option syntaxes, json: filenames, cache modes, schemas."""

from blockgraph.options.cache import CacheMode, apply_legacy_cache, parse_cache_mode
from blockgraph.options.keyval import (
    crumple,
    extract_subdict,
    flatten,
    parse_blockdev,
    parse_drive_opts,
    parse_json_filename,
    parse_keyval,
)

__all__ = [
    "CacheMode",
    "apply_legacy_cache",
    "crumple",
    "extract_subdict",
    "flatten",
    "parse_blockdev",
    "parse_cache_mode",
    "parse_drive_opts",
    "parse_json_filename",
    "parse_keyval",
]
