"""blkdebug: a filter that injects I/O errors when named debug events have fired.

The rules below are what QEMU 7.2 does, observed with ``qemu-io`` (see the tests):

* Events do not fail requests by themselves. An event (``read_aio``, ``l2_load``, ...) fired on
  this node *activates* the ``inject-error`` rules registered for it whose ``state`` matches
  (0 = any state); the active set is replaced only when an event activates at least one rule,
  so a rule stays active across later, unrelated events.
* Every request this node serves checks the active rules, in definition order; the first one
  whose I/O type matches and whose ``sector`` (if any) lies inside the request decides: it fails
  the request with its ``errno`` (0 or negative: the request succeeds), and a ``once`` rule is
  dropped when it fires. Flushes have no range, so rules with a ``sector`` never fail them.
* ``set-state`` rules fired by an event all see the state from before the event; the first
  defined one wins.
* Who fires events: format drivers on their ``file`` child (raw fires ``read_aio`` before a read
  and ``write_aio`` before a write; qcow2 its metadata events), the request layer on the node
  being written (``pwritev``, ``pwritev_zero``, ``pwritev_done``) and on a node's primary child
  around flushes (``flush_to_os``, ``flush_to_disk``). A request on a blkdebug node does not fire
  ``read_aio`` itself: ``driver=blkdebug`` at the top with a ``read_aio`` rule reads fine in QEMU.
  :func:`~blockgraph.drivers.base.fire_debug_event` is how a driver fires an event at a child.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from blockgraph.drivers.base import (
    BlockDriver,
    BlockStatus,
    BlockStatusFlags,
    ChildAccess,
    ChildRole,
    OpenContext,
    PreallocMode,
    RequestFlags,
)
from blockgraph.errors import BlockError, IOFailure, OptionError
from blockgraph.options.schema import OptionSpec, OptType, opt

log = logging.getLogger(__name__)

# QEMU 7.2's BlkdebugEvent enum, in its order (every name checked against qemu-io).
BLKDEBUG_EVENTS: tuple[str, ...] = (
    "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table",
    "l2_load", "l2_update", "l2_update_compressed", "l2_alloc_cow_read", "l2_alloc_write",
    "read_aio", "read_backing_aio", "read_compressed", "write_aio", "write_compressed",
    "vmstate_load", "vmstate_save", "cow_read", "cow_write",
    "reftable_load", "reftable_grow", "reftable_update",
    "refblock_load", "refblock_update", "refblock_update_part", "refblock_alloc",
    "refblock_alloc_hookup", "refblock_alloc_write", "refblock_alloc_write_blocks",
    "refblock_alloc_write_table", "refblock_alloc_switch_table",
    "cluster_alloc", "cluster_alloc_bytes", "cluster_free",
    "flush_to_os", "flush_to_disk",
    "pwritev_rmw_head", "pwritev_rmw_after_head", "pwritev_rmw_tail", "pwritev_rmw_after_tail",
    "pwritev", "pwritev_zero", "pwritev_done",
    "empty_image_prepare", "l1_shrink_write_table", "l1_shrink_free_l2_clusters",
    "cor_write", "cluster_alloc_space", "none",
)
_EVENT_SET = frozenset(BLKDEBUG_EVENTS)

# BlkdebugIOType. Without ``iotype`` a rule matches everything but block-status, which was
# added later and left out of the default so that old configurations kept their meaning.
IOTYPES: tuple[str, ...] = ("read", "write", "write-zeroes", "discard", "flush", "block-status")
DEFAULT_IOTYPES: frozenset[str] = frozenset(IOTYPES) - {"block-status"}

# BlockPermission, for take-child-perms / unshare-child-perms.
PERMISSIONS: tuple[str, ...] = ("consistent-read", "write", "write-unchanged", "resize")

SECTOR_SIZE = 512
_INT_MAX = (1 << 31) - 1
_U64 = 1 << 64

# The keys each config section (and each inject-error / set-state list entry) accepts.
_SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "inject-error": ("event", "state", "iotype", "errno", "sector", "once", "immediately"),
    "set-state": ("event", "state", "new_state"),
}
_NUMBER_KEYS = frozenset({"state", "errno", "sector", "new_state"})
_BOOL_KEYS = frozenset({"once", "immediately"})
_LIST_OPTIONS = ("inject-error", "set-state")
_PERM_OPTIONS = ("take-child-perms", "unshare-child-perms")


@dataclass
class InjectErrorRule:
    event: str
    state: int = 0  # 0: any state
    errno: int = _errno.EIO
    offset: int | None = None  # byte offset of ``sector``; None: any request
    once: bool = False
    immediately: bool = False
    iotypes: frozenset[str] = DEFAULT_IOTYPES

    def matches(self, offset: int, length: int, iotype: str) -> bool:
        if iotype not in self.iotypes:
            return False
        if self.offset is None:
            return True
        return length > 0 and offset <= self.offset < offset + length


@dataclass
class SetStateRule:
    event: str
    state: int = 0  # 0: any state
    new_state: int = 0


@dataclass
class BlkdebugConfig:
    """The rules of one node, in definition order (config file first, then options)."""

    inject_error: list[InjectErrorRule] = field(default_factory=list)
    set_state: list[SetStateRule] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Value parsing, as QemuOpts does it for config files and -blockdev list entries.

_C_SPACE = " \t\n\v\f\r"
_NUMBER_RE = re.compile(r"[+-]?(?:0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


def parse_qemuopts_number(key: str, text: str) -> int:
    """A ``strtoull(text, base 0)`` that must consume everything; negatives wrap to u64.

    :raise OptionError: ``Parameter 'KEY' expects a number``.
    """
    digits = text.lstrip(_C_SPACE)
    if _NUMBER_RE.fullmatch(digits) is None:
        raise OptionError(f"Parameter '{key}' expects a number")
    negative = digits.startswith("-")
    body = digits.lstrip("+-")
    if body[:2] in ("0x", "0X"):
        value = int(body[2:], 16)
    elif body.startswith("0"):
        value = int(body, 8)
    else:
        value = int(body, 10)
    if value >= _U64:
        raise OptionError(f"Parameter '{key}' expects a number")
    return (-value) % _U64 if negative else value


def _to_signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def parse_qemuopts_bool(key: str, text: str) -> bool:
    """QemuOpts booleans accept more spellings than ``on``/``off``."""
    if text in ("on", "yes", "true", "y"):
        return True
    if text in ("off", "no", "false", "n"):
        return False
    raise OptionError(f"Parameter '{key}' expects 'on' or 'off'")


def _scalar_text(value: object, key: str) -> str:
    """JSON scalars reach QemuOpts as text: booleans as on/off, numbers in decimal."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | str):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    raise OptionError(f"Invalid parameter type for '{key}', expected: string")


# ---------------------------------------------------------------------------------------------
# The config file.


def _sscanf_token(line: str, pos: int, limit: int) -> tuple[str, int] | None:
    """``" %Ns"``: skip white space, take up to ``limit`` non-space characters."""
    while pos < len(line) and line[pos] in _C_SPACE:
        pos += 1
    start = pos
    while pos < len(line) and line[pos] not in _C_SPACE and pos - start < limit:
        pos += 1
    return (line[start:pos], pos) if pos > start else None


def _skip_space(line: str, pos: int) -> int:
    while pos < len(line) and line[pos] in _C_SPACE:
        pos += 1
    return pos


def _parse_group_header(line: str) -> tuple[str, str | None] | None:
    """``[group "id"]`` or ``[group]``; the group name may swallow a newline, as QEMU's does."""
    if not line.startswith("["):
        return None
    token = _sscanf_token(line, 1, 63)
    if token is not None:
        name, pos = token
        pos = _skip_space(line, pos)
        if pos < len(line) and line[pos] == '"':
            end = pos + 1
            while end < len(line) and line[end] != '"' and end - pos - 1 < 63:
                end += 1
            if end > pos + 1:
                return name, line[pos + 1 : end]
    end = 1
    while end < len(line) and line[end] != "]" and end - 1 < 63:
        end += 1
    if end == 1:
        return None
    return line[1:end], None


def _parse_assignment(line: str) -> tuple[str, str] | None:
    """``key = "value"``. Anything that starts with a word is taken as that word with an empty
    value when the rest does not fit the pattern: QEMU accepts ``key = value`` as ``key=""``."""
    token = _sscanf_token(line, 0, 63)
    if token is None:
        return None
    key, pos = token
    pos = _skip_space(line, pos)
    if pos < len(line) and line[pos] == "=":
        pos = _skip_space(line, pos + 1)
        if pos < len(line) and line[pos] == '"':
            end = pos + 1
            while end < len(line) and line[end] != '"' and end - pos - 1 < 1023:
                end += 1
            return key, line[pos + 1 : end]
    return key, ""


@dataclass
class _Section:
    group: str
    ident: str | None
    values: dict[str, str] = field(default_factory=dict)


def parse_config_text(text: str) -> list[_Section]:
    """Split a blkdebug config file into sections, checking keys and value types.

    :raise OptionError: with QEMU's message for the first problem.
    """
    sections: list[_Section] = []
    current: _Section | None = None
    ids: set[tuple[str, str]] = set()
    for line in text.splitlines(keepends=True):
        if line.startswith("\n") or line.startswith("#"):
            continue
        header = _parse_group_header(line)
        if header is not None:
            if current is not None:
                _check_section(current)
            group, ident = header
            if group not in _SECTION_KEYS:
                raise OptionError(f"There is no option group '{group}'")
            if ident is not None:
                if (group, ident) in ids:
                    raise OptionError(f"Duplicate ID '{ident}' for {group}")
                ids.add((group, ident))
            current = _Section(group, ident)
            sections.append(current)
            continue
        assignment = _parse_assignment(line)
        if assignment is None:
            raise OptionError("parse error")
        if current is None:
            raise OptionError("no group defined")
        key, value = assignment
        # A repeated key replaces the earlier value before anything is checked.
        current.values[key] = value
    if current is not None:
        _check_section(current)
    return sections


def _check_section(section: _Section) -> None:
    allowed = _SECTION_KEYS[section.group]
    for key, value in section.values.items():
        if key not in allowed:
            raise OptionError(f"Invalid parameter '{key}'")
        _check_value(key, value)


def _check_value(key: str, value: str) -> None:
    if key in _NUMBER_KEYS:
        parse_qemuopts_number(key, value)
    elif key in _BOOL_KEYS:
        parse_qemuopts_bool(key, value)


# ---------------------------------------------------------------------------------------------
# The inject-error / set-state options (-blockdev lists, json: lists or a single dict).


def _list_sections(group: str, options: Mapping[str, Any]) -> list[_Section]:
    """Collect ``group`` from ``options``: a JSON list or dict, or flattened dotted keys."""
    value = options.get(group)
    flat = {k[len(group) + 1 :]: v for k, v in options.items() if k.startswith(group + ".")}
    if value is not None:
        if isinstance(value, Mapping):
            flat.update({str(k): v for k, v in value.items()})
        elif isinstance(value, list):
            for index, entry in enumerate(value):
                if not isinstance(entry, Mapping):
                    raise OptionError(
                        f"[{group}] section (index {index}) does not consist of keys"
                    )
                for key, item in entry.items():
                    flat[f"{index}.{key}"] = item
        else:
            raise OptionError(f"Invalid parameter type for '{group}', expected: array")
    if not flat:
        return []
    allowed = _SECTION_KEYS[group]
    direct = {k: v for k, v in flat.items() if k in allowed}
    if direct:
        # Keys of one section given without an index: one rule, and nothing else may be there.
        leftover = [k for k in flat if k not in allowed]
        if leftover:
            raise OptionError(f"Unknown option '{leftover[0]}' for [{group}]")
        section = _Section(group, None, {k: _scalar_text(v, k) for k, v in direct.items()})
        _check_section(section)
        return [section]
    by_index: dict[int, dict[str, Any]] = {}
    for key, item in flat.items():
        index_text, dot, sub = key.partition(".")
        if dot and index_text.isdigit() and str(int(index_text)) == index_text:
            by_index.setdefault(int(index_text), {})[sub] = item
    sections: list[_Section] = []
    index = 0
    while index in by_index:
        entry = by_index.pop(index)
        section = _Section(group, f"{group}.{index}")
        for key, item in entry.items():
            if key not in allowed:
                raise OptionError(f"[{group}] section doesn't support the option '{key}'")
            section.values[key] = _scalar_text(item, key)
        _check_section(section)
        sections.append(section)
        index += 1
    used = {f"{i}.{k}" for i, s in enumerate(sections) for k in s.values}
    unused = [k for k in flat if k not in used]
    if unused:
        raise OptionError(f"Unused option '{unused[0]}' for [{group}]")
    return sections


def _rule_number(section: _Section, key: str, default: int) -> int:
    text = section.values.get(key)
    return default if text is None else parse_qemuopts_number(key, text)


def _event_of(section: _Section) -> str:
    event = section.values.get("event")
    if event is None:
        raise OptionError("Missing event name for rule")
    if event not in _EVENT_SET:
        raise OptionError(f"invalid parameter value: {event}")
    return event


def build_config(sections: Iterable[_Section]) -> BlkdebugConfig:
    """Turn checked sections into rules; inject-error sections are examined first, as in QEMU.

    :raise OptionError: missing or unknown event names, unknown I/O types.
    """
    ordered = list(sections)
    config = BlkdebugConfig()
    for section in (s for s in ordered if s.group == "inject-error"):
        event = _event_of(section)
        iotype = section.values.get("iotype")
        if iotype is not None and iotype not in IOTYPES:
            raise OptionError(f"invalid parameter value: {iotype}")
        sector = _to_signed(_rule_number(section, "sector", _U64 - 1), 64)
        config.inject_error.append(
            InjectErrorRule(
                event=event,
                state=_to_signed(_rule_number(section, "state", 0), 32),
                errno=_to_signed(_rule_number(section, "errno", _errno.EIO), 32),
                offset=None if sector == -1 else (sector * SECTOR_SIZE) % _U64,
                once=parse_qemuopts_bool("once", section.values.get("once", "off")),
                immediately=parse_qemuopts_bool(
                    "immediately", section.values.get("immediately", "off")
                ),
                iotypes=frozenset({iotype}) if iotype is not None else DEFAULT_IOTYPES,
            )
        )
    for section in (s for s in ordered if s.group == "set-state"):
        event = _event_of(section)
        config.set_state.append(
            SetStateRule(
                event=event,
                state=_to_signed(_rule_number(section, "state", 0), 32),
                new_state=_to_signed(_rule_number(section, "new_state", 0), 32),
            )
        )
    return config


def read_config(path: str | None, options: Mapping[str, Any]) -> BlkdebugConfig:
    """The rules of the config file ``path`` (if any) followed by those in ``options``."""
    sections: list[_Section] = []
    if path is not None:
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as config_file:
                text = config_file.read()
        except OSError as exc:
            raise BlockError(
                f"Could not read blkdebug config file: {exc.strerror or 'Unknown error'}"
            ) from exc
        sections.extend(parse_config_text(text))
    for group in _LIST_OPTIONS:
        sections.extend(_list_sections(group, options))
    return build_config(sections)


def _permission_list(name: str, options: Mapping[str, Any]) -> tuple[str, ...]:
    value = options.get(name)
    items: list[object] = []
    if isinstance(value, list):
        items.extend(value)
    elif value is not None:
        raise OptionError(f"Invalid parameter type for '{name}', expected: array")
    flat = sorted(
        (int(k[len(name) + 1 :]), v)
        for k, v in options.items()
        if k.startswith(name + ".") and k[len(name) + 1 :].isdigit()
    )
    items.extend(v for _, v in flat)
    perms: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise OptionError("Invalid parameter type for 'null', expected: string")
        # QEMU names list elements 'null' in this message; kept verbatim.
        if item not in PERMISSIONS:
            raise OptionError(f"Parameter 'null' does not accept value '{item}'")
        perms.append(item)
    return tuple(perms)


# ---------------------------------------------------------------------------------------------


class BlkdebugDriver(BlockDriver):
    """The ``blkdebug`` filter over its ``image`` child."""

    format_name: ClassVar[str] = "blkdebug"
    is_format: ClassVar[bool] = False
    is_filter: ClassVar[bool] = True
    protocol_prefixes: ClassVar[tuple[str, ...]] = ("blkdebug",)
    runtime_options: ClassVar[Mapping[str, OptionSpec]] = {
        "config": opt(OptType.STRING),
        "x-image": opt(OptType.STRING),
        "align": opt(OptType.SIZE),
        "max-transfer": opt(OptType.SIZE),
        "opt-write-zero": opt(OptType.SIZE),
        "max-write-zero": opt(OptType.SIZE),
        "opt-discard": opt(OptType.SIZE),
        "max-discard": opt(OptType.SIZE),
    }
    # The child's request layer emulates what its driver lacks, so every flag can pass through.
    supported_write_flags: ClassVar[RequestFlags] = (
        RequestFlags.FUA | RequestFlags.MAY_UNMAP | RequestFlags.NO_FALLBACK
    )
    # List-valued options the schema cannot describe: ``NAME`` (a JSON list, or a single dict for
    # the rule lists) or flattened ``NAME.N[.key]``. The graph must hand them to open() untouched.
    runtime_option_prefixes: ClassVar[tuple[str, ...]] = _LIST_OPTIONS + _PERM_OPTIONS
    # Options that, when the user gave them, keep the node from having a plain filename.
    _STRONG_OPTIONS: ClassVar[tuple[str, ...]] = (
        "align", "max-transfer", "opt-write-zero", "max-write-zero", "opt-discard", "max-discard",
    )

    def __init__(self) -> None:
        self.image: ChildAccess | None = None
        self.config_file: str | None = None
        self.rules = BlkdebugConfig()
        self.active_rules: list[InjectErrorRule] = []
        self.state = 1
        self.max_transfer = 0
        self.opt_write_zero = 0
        self.max_write_zero = 0
        self.opt_discard = 0
        self.max_discard = 0
        self.take_child_perms: tuple[str, ...] = ()
        self.unshare_child_perms: tuple[str, ...] = ()
        self._strong_options = False

    @classmethod
    def parse_filename(cls, filename: str, options: dict[str, Any]) -> None:
        """``blkdebug:CONFIG:IMAGE``; CONFIG may be empty, the colon after it may not."""
        rest = filename[len("blkdebug:") :] if filename.startswith("blkdebug:") else filename
        config, colon, image = rest.partition(":")
        if not colon:
            raise BlockError("blkdebug requires both config file and image path")
        if config:
            options["config"] = config
        # Everything after the second colon is the image's filename, colons and all.
        options["x-image"] = image

    async def open(self, ctx: OpenContext, options: dict[str, Any]) -> None:
        self.config_file = options.get("config")
        self.rules = read_config(self.config_file, options)
        self.take_child_perms = _permission_list("take-child-perms", options)
        self.unshare_child_perms = _permission_list("unshare-child-perms", options)
        self.active_rules = []
        self.state = 1

        x_image: str | None = options.get("x-image")
        if x_image is None and not ctx.has_child_options("image"):
            raise BlockError('A block device must be specified for "image"')
        # QEMU opens ``image`` with the role's inherited flags: blkdebug is no format, so the
        # child keeps the parent's "protocol" flag and is not format-probed (a qcow2 file below
        # blkdebug is read as raw bytes unless the user names its driver).
        self.image = await ctx.open_child("image", ChildRole.FILTERED_PRIMARY, filename=x_image)
        if self.image is None:
            raise BlockError('A block device must be specified for "image"')

        # The child's own request alignment is not visible here; QEMU takes the larger of the
        # two, so requests the child needs aligned are still aligned by the request layer below.
        align = int(options.get("align") or 0)
        if align and (align >= _INT_MAX or align & (align - 1)):
            raise BlockError(f"Cannot meet constraints with align {align}")
        align = max(align, 1)
        self.request_alignment = align
        self.max_transfer = self._checked(options, "max-transfer", align)
        self.opt_write_zero = self._checked(options, "opt-write-zero", align)
        self.max_write_zero = self._checked(options, "max-write-zero", max(self.opt_write_zero, align))
        self.opt_discard = self._checked(options, "opt-discard", align)
        self.max_discard = self._checked(options, "max-discard", max(self.opt_discard, align))
        self._strong_options = any(options.get(k) is not None for k in self._STRONG_OPTIONS) or any(
            k == p or k.startswith(p + ".") for k in options for p in _LIST_OPTIONS
        )
        # Rules for the event "none" take effect from the start: QEMU fires it once when the
        # node is opened (its set-state rules move the state, its errors are active until
        # another event activates rules of its own).
        await self.debug_event("none")

    @staticmethod
    def _checked(options: Mapping[str, Any], key: str, multiple_of: int) -> int:
        value = int(options.get(key) or 0)
        if value and (value >= _INT_MAX or value % multiple_of):
            raise BlockError(f"Cannot meet constraints with {key} {value}")
        return value

    async def close(self) -> None:
        self.active_rules = []
        self.image = None

    def _child(self) -> ChildAccess:
        if self.image is None:
            raise IOFailure(_errno.ENOMEDIUM)
        return self.image

    # -- events and rules ----------------------------------------------------------------------

    async def debug_event(self, name: str) -> None:
        """Fire the debug event ``name``: move the state machine, activate inject-error rules.

        :raise ValueError: ``name`` is no blkdebug event (a programming error in the caller).
        """
        if name not in _EVENT_SET:
            raise ValueError(f"unknown blkdebug event {name!r}")
        activated = [
            rule
            for rule in self.rules.inject_error
            if rule.event == name and (rule.state == 0 or rule.state == self.state)
        ]
        if activated:
            self.active_rules = activated
        new_state = self.state
        # The first defined rule wins: QEMU applies them last-defined first.
        for set_rule in reversed(self.rules.set_state):
            if set_rule.event == name and (set_rule.state == 0 or set_rule.state == self.state):
                new_state = set_rule.new_state
        if new_state != self.state:
            log.debug("blkdebug: event %s: state %d -> %d", name, self.state, new_state)
        self.state = new_state

    def _check_rules(self, offset: int, length: int, iotype: str) -> None:
        for rule in self.active_rules:
            if rule.matches(offset, length, iotype):
                break
        else:
            return
        if rule.errno <= 0:
            return
        if rule.once:
            self.active_rules.remove(rule)
            self.rules.inject_error.remove(rule)
        # ``immediately=off`` only delays the failure to a later main-loop iteration in QEMU;
        # the caller cannot tell the difference, so both fail here.
        raise IOFailure(rule.errno)

    # -- I/O -----------------------------------------------------------------------------------

    def getlength(self) -> int:
        return self._child().getlength()

    async def preadv(self, offset: int, buf: memoryview, flags: RequestFlags) -> None:
        self._check_rules(offset, len(buf), "read")
        await self._child().preadv(offset, buf, flags)

    async def pwritev(self, offset: int, buf: memoryview, flags: RequestFlags) -> None:
        self._check_rules(offset, len(buf), "write")
        await self._child().pwritev(offset, buf, flags)

    async def pwrite_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        self._check_rules(offset, length, "write-zeroes")
        await self._child().pwrite_zeroes(offset, length, flags)

    async def pdiscard(self, offset: int, length: int) -> None:
        self._check_rules(offset, length, "discard")
        await self._child().pdiscard(offset, length)

    async def flush_to_disk(self) -> None:
        # The request layer flushes the image child after this, as it does below every node.
        self._check_rules(0, 0, "flush")

    async def truncate(self, length: int, prealloc: PreallocMode = "off") -> None:
        await self._child().truncate(length, prealloc)

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        self._check_rules(offset, length, "block-status")
        status = await self._child().block_status(offset, length)
        if status.file is None and status.flags & BlockStatusFlags.OFFSET_VALID:
            # The child answered about itself; as our answer, it must name the child.
            status = dataclasses.replace(status, file=self.image)
        return status

    def filename(self) -> str | None:
        """``blkdebug:CONFIG:IMAGE`` unless options beyond ``config`` make it a json: name."""
        if self._strong_options or self.image is None:
            return None
        image = self.image.filename
        if not image or image.startswith("json:"):
            return None
        return f"blkdebug:{self.config_file or ''}:{image}"
