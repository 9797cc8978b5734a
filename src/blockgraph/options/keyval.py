"""The option syntaxes of QEMU's command lines, and the dotted-key dictionaries they produce.

Three syntaxes meet here, each with its own rules and error texts (all checked against the
QEMU 7.2 binaries):

* **QemuOpts** (``-drive``, ``--image-opts``, ``-chardev``, ``-mon``): :func:`parse_qemu_opts`
  (:func:`parse_drive_opts` for ``-drive``). Lenient: any key is
  accepted at this stage, a bare ``key`` means ``key=on`` and ``nokey`` means ``key=off`` (both
  deprecated, with a warning), the last duplicate wins, and only ``id`` is checked.
* **keyval** (``-blockdev``, qemu-storage-daemon): :func:`parse_keyval`. Strict key syntax,
  ``key.0``-style lists, and an *implied key* for a leading bare value.
* **JSON** (``-blockdev '{...}'`` and ``json:`` filenames): :func:`parse_blockdev`,
  :func:`parse_json_filename`, in QEMU's dialect (see :mod:`.qjson`).

The block layer works on flat dictionaries whose keys are dotted paths (``file.cache.direct``);
:func:`flatten`, :func:`crumple` and :func:`extract_subdict` convert between the flat and the
nested forms with QEMU's ``qdict_flatten`` / ``qdict_crumple`` / ``qdict_extract_subqdict``
semantics. Everything here is pure: strings in, dictionaries or :class:`OptionError` out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeAlias

from blockgraph.errors import OptionError

__all__ = [
    "crumple",
    "extract_subdict",
    "flatten",
    "parse_blockdev",
    "parse_drive_opts",
    "parse_json_filename",
    "parse_qemu_opts",
    "parse_keyval",
]

JSON_PREFIX = "json:"

# --------------------------------------------------------------------------------------------
# QemuOpts (-drive, -chardev)
# --------------------------------------------------------------------------------------------

_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")
_HELP_WORDS = ("help", "?")


def _opts_value(text: str, pos: int) -> tuple[str, int]:
    """Read a value up to the next single ``,`` (``,,`` is a literal comma).

    :return: the value and the position after its terminating comma.
    """
    parts: list[str] = []
    while True:
        comma = text.find(",", pos)
        if comma < 0:
            parts.append(text[pos:])
            return "".join(parts), len(text)
        parts.append(text[pos:comma])
        if text.startswith(",,", comma):
            parts.append(",")
            pos = comma + 2
            continue
        return "".join(parts), comma + 1


def parse_qemu_opts(text: str, implied: str | None = None,
                    warnings: list[str] | None = None) -> dict[str, str]:
    """Parse a QemuOpts argument (``-drive``, ``--image-opts``, ``-chardev``, ``-mon``).

    Keys are not checked here (``-drive`` accepts everything, and the block layer later
    rejects what nobody consumed, e.g. an empty key from ``-drive ,file=x``). ``,,`` in a value
    is a literal comma. A bare first word is the value of ``implied`` when the option list
    has one (``-chardev socket,...``). Any other bare ``key`` means ``key=on`` and a bare
    ``nokey`` means ``key=off``, each with QEMU's deprecation warning; ``help`` and ``?``
    become ``on`` without one. The first ``id`` counts, and it must be an identifier; for
    every other key the last occurrence wins.

    :param text: the argument as typed, e.g. ``file=a,,b.img,if=none,cache=none``.
    :param implied: the key a bare first word is the value of, if any.
    :param warnings: if given, QEMU's deprecation warnings are appended to it (the text after
        ``warning: ``; one entry spans two lines).
    :return: the options in order of first appearance, dotted keys kept flat.
    :raise OptionError: ``Parameter 'id' expects an identifier`` (and QEMU's second line).
    """
    opts: dict[str, str] = {}
    ident: str | None = None
    pos = 0
    while pos < len(text):
        name_end = pos
        while name_end < len(text) and text[name_end] not in "=,":
            name_end += 1
        name = text[pos:name_end]
        if name_end < len(text) and text[name_end] == "=":
            key = name
            value, pos = _opts_value(text, name_end + 1)
        elif pos == 0 and implied is not None:
            key = implied
            value, pos = _opts_value(text, 0)
        else:
            pos = name_end + 1
            if name in _HELP_WORDS:
                key, value = name, "on"
            else:
                negated = name.startswith("no")
                key, value = (name[2:], "off") if negated else (name, "on")
                if warnings is not None:
                    # QEMU's hint for the socket chardev's "delay" names the option that
                    # replaced it, nodelay, with the opposite value.
                    hint = (f"nodelay={'on' if negated else 'off'}" if key == "delay"
                            else f"{key}={value}")
                    warnings.append(f"short-form boolean option '{name}' deprecated\n"
                                    f"Please use {hint} instead")
        if key == "id":
            if ident is None:
                ident = value
            continue
        opts[key] = value
    if ident is not None:
        if not _ID_RE.match(ident):
            raise OptionError("Parameter 'id' expects an identifier\n"
                              "Identifiers consist of letters, digits, '-', '.', '_', "
                              "starting with a letter.")
        opts["id"] = ident
    return opts


def parse_drive_opts(text: str, warnings: list[str] | None = None) -> dict[str, str]:
    """A ``-drive`` (or ``--image-opts``) argument: QemuOpts with no implied key."""
    return parse_qemu_opts(text, None, warnings)


# --------------------------------------------------------------------------------------------
# keyval (-blockdev)
# --------------------------------------------------------------------------------------------

# A key is fragments joined by '.'; the first names a member, later ones may also be a list
# index. 127 characters per fragment is QEMU's buffer size.
_NAME_FRAGMENT = re.compile(r"[A-Za-z][A-Za-z0-9_-]*\Z")
_INDEX_FRAGMENT = re.compile(r"[0-9]+\Z")
_MAX_FRAGMENT = 127

_Tree: TypeAlias = dict[str, "_Tree | str"]


def _check_key(key: str) -> list[str]:
    fragments = key.split(".")
    for number, fragment in enumerate(fragments):
        if not (_NAME_FRAGMENT.match(fragment)
                or (number > 0 and _INDEX_FRAGMENT.match(fragment))):
            raise OptionError(f"Invalid parameter '{key}'")
    for number, fragment in enumerate(fragments):
        if len(fragment) > _MAX_FRAGMENT:
            kind = "Parameter fragment" if number else "Parameter"
            raise OptionError(f"{kind} '{fragment}' is too long")
    return fragments


def _insert(tree: _Tree, fragments: list[str], value: str) -> None:
    node = tree
    for depth, fragment in enumerate(fragments[:-1]):
        child = node.setdefault(fragment, {})
        if isinstance(child, str):
            raise OptionError(f"Parameters '{'.'.join(fragments[:depth + 1])}.*' "
                              "used inconsistently")
        node = child
    if isinstance(node.get(fragments[-1]), dict):
        raise OptionError(f"Parameters '{'.'.join(fragments)}.*' used inconsistently")
    node[fragments[-1]] = value


def _check_lists(tree: _Tree, path: str) -> None:
    """Check keyval's list rules over ``tree`` (whose keys are below ``path``).

    A member whose keys are all digits is a list: indices are read as numbers (``a.00`` is
    ``a.0``) and must leave no gap below the largest one. Children are checked before their
    parent, which decides which error QEMU reports first.
    """
    for fragment, child in tree.items():
        if isinstance(child, dict):
            _check_lists(child, f"{path}{fragment}.")
    indexed = [key for key in tree if _INDEX_FRAGMENT.match(key)]
    if not indexed:
        return
    if len(indexed) != len(tree):
        raise OptionError(f"Parameters '{path}*' used inconsistently")
    present = {int(key) for key in indexed}
    missing = next(i for i in range(len(present) + 1) if i not in present)
    if missing < max(present):
        raise OptionError(f"Parameter '{path}{missing}' missing")


def _emit(tree: _Tree, path: str, out: dict[str, str]) -> None:
    keys: list[str] = list(tree)
    if keys and all(_INDEX_FRAGMENT.match(key) for key in keys):
        # Lists come out in index order and canonical spelling; of two spellings of one
        # index ("0", "00") the later one wins, as for any duplicate.
        keys.sort(key=int)
    for key in keys:
        child = tree[key]
        name = f"{path}{int(key)}" if _INDEX_FRAGMENT.match(key) else f"{path}{key}"
        if isinstance(child, str):
            out[name] = child
        else:
            _emit(child, f"{name}.", out)


def parse_keyval(text: str, implied_key: str | None = None) -> dict[str, str]:
    """Parse QEMU's keyval syntax (``-blockdev``, qemu-storage-daemon objects).

    ``key=value`` pairs separated by ``,`` (``,,`` is a literal comma in a value); keys are
    dotted paths of fragments ``[A-Za-z][A-Za-z0-9_-]*`` (or digits after the first, for list
    indices), at most 127 characters each. With ``implied_key``, a first element without ``=``
    is the value of that key (it ends at the first comma: ``,,`` does not escape there). The last
    duplicate wins. A bare ``help`` or ``?`` is rejected, since no caller here offers help.

    :param text: the argument as typed.
    :param implied_key: the key a leading bare value stands for (``driver`` for -blockdev).
    :return: flat dotted keys to string values; list indices in canonical form (``a.0``).
    :raise OptionError: ``Invalid parameter 'k'``, ``Expected '=' after parameter 'k'``,
        ``Parameter 'k' is too long``, ``Parameter fragment 'f' is too long``,
        ``Parameters 'k.*' used inconsistently``, ``Parameter 'k.N' missing`` or
        ``Help is not available for this option``.
    """
    tree: _Tree = {}
    wants_help = False
    pos = 0
    first = True
    while pos < len(text):
        key_end = pos
        while key_end < len(text) and text[key_end] not in "=,":
            key_end += 1
        key = text[pos:key_end]
        has_value = key_end < len(text) and text[key_end] == "="
        if not has_value and key in _HELP_WORDS:
            wants_help = True
            pos = key_end + 1
            first = False
            continue
        if not has_value and first and implied_key is not None and key:
            _insert(tree, implied_key.split("."), key)
            pos = key_end + 1
            first = False
            continue
        fragments = _check_key(key)
        if not has_value:
            raise OptionError(f"Expected '=' after parameter '{key}'")
        value, pos = _opts_value(text, key_end + 1)
        _insert(tree, fragments, value)
        first = False
    if wants_help:
        raise OptionError("Help is not available for this option")
    _check_lists(tree, "")
    out: dict[str, str] = {}
    _emit(tree, "", out)
    return out


def parse_blockdev(text: str) -> dict[str, object]:
    """Parse a ``-blockdev`` argument, either keyval (implied key ``driver``) or JSON.

    The JSON form is recognised by a ``{`` as the very first character (a leading space makes
    it keyval, as in QEMU).

    :param text: the argument as typed.
    :return: flat dotted keys; values are strings for keyval and typed for JSON.
    :raise OptionError: keyval errors as in :func:`parse_keyval`; JSON errors as QEMU words
        them (``JSON parse error, ...``, ``Expecting at most one JSON value``).
    """
    if text.startswith("{"):
        from blockgraph.options.qjson import parse_json  # only for JSON values: lazy

        value = parse_json(text)
        assert isinstance(value, dict)  # a '{'-led single value is always an object
        return flatten(value)
    return dict(parse_keyval(text, implied_key="driver"))


def parse_json_filename(filename: str) -> dict[str, object]:
    """Parse a ``json:{...}`` pseudo-filename into flat options.

    :param filename: the whole filename, starting with ``json:``.
    :return: flat dotted keys with typed values (nested objects win over literal dotted keys
        that name the same option, as in QEMU).
    :raise OptionError: ``Could not parse the JSON options: <JSON error>`` or
        ``Invalid JSON object given``.
    :raise ValueError: if ``filename`` does not start with ``json:`` (a caller bug).
    """
    if not filename.startswith(JSON_PREFIX):
        raise ValueError(f"not a json: filename: {filename!r}")
    from blockgraph.options.qjson import parse_json  # only for json: names: lazy

    try:
        value = parse_json(filename[len(JSON_PREFIX):])
    except OptionError as err:
        raise err.prepend("Could not parse the JSON options: ") from err
    if not isinstance(value, dict):
        raise OptionError("Invalid JSON object given")
    return flatten(value)


# --------------------------------------------------------------------------------------------
# flatten / crumple / extract_subdict
# --------------------------------------------------------------------------------------------


def _flatten_into(items: list[tuple[str, object]], prefix: str, out: dict[str, object]) -> None:
    # Scalars first, containers second: a nested {"file": {"filename": ...}} overrides a
    # literal "file.filename" key whatever their order, as QEMU's json: handling shows.
    containers: list[tuple[str, Mapping[str, object] | list[object]]] = []
    for key, value in items:
        if isinstance(value, Mapping | list) and len(value) > 0:
            containers.append((key, value))
        elif isinstance(value, Mapping):
            out[prefix + key] = {}
        elif isinstance(value, list):
            out[prefix + key] = []
        else:
            out[prefix + key] = value
    for key, container in containers:
        if isinstance(container, list):
            _flatten_into([(str(i), v) for i, v in enumerate(container)], f"{prefix}{key}.", out)
        else:
            _flatten_into(list(container.items()), f"{prefix}{key}.", out)


def flatten(nested: Mapping[str, object]) -> dict[str, object]:
    """Flatten nested dictionaries and lists into dotted keys (``qdict_flatten``).

    ``{"file": {"driver": "file"}, "l": [1, 2]}`` becomes
    ``{"file.driver": "file", "l.0": 1, "l.1": 2}``. Empty dictionaries and lists are kept as
    values, so that ``{"file": {}}`` still says that a ``file`` child was given.

    :param nested: the nested options; not modified.
    :return: a new flat dictionary.
    """
    out: dict[str, object] = {}
    _flatten_into(list(nested.items()), "", out)
    return out


def _split_key(key: str) -> tuple[str, str | None]:
    """Split at the first ``.`` that is not part of a ``..`` escape.

    :return: the unescaped prefix and the rest (escapes untouched), or ``None`` for no rest.
    """
    prefix: list[str] = []
    pos = 0
    while pos < len(key):
        if key[pos] == ".":
            if key.startswith("..", pos):
                prefix.append(".")
                pos += 2
                continue
            return "".join(prefix), key[pos + 1:]
        prefix.append(key[pos])
        pos += 1
    return "".join(prefix), None


_LIST_INDEX = re.compile(r"\s*[+-]?[0-9]+\Z")


def _crumple_level(flat: Mapping[str, object]) -> dict[str, object]:
    """Nest one level of ``flat``; the levels below are crumpled and listified first."""
    level: dict[str, object] = {}
    subtrees: dict[str, dict[str, object]] = {}
    for key, value in flat.items():
        prefix, rest = _split_key(key)
        if rest is None:
            if prefix in subtrees:
                raise OptionError("Cannot mix scalar and non-scalar keys")
            level[prefix] = value
            continue
        if prefix in level and prefix not in subtrees:
            raise OptionError("Cannot mix scalar and non-scalar keys")
        subtree = subtrees.setdefault(prefix, {})
        level[prefix] = subtree
        subtree[rest] = value
    for prefix, subtree in subtrees.items():
        level[prefix] = _listify(_crumple_level(subtree))
    return level


def _listify(level: dict[str, object]) -> dict[str, object] | list[object]:
    indexed = [key for key in level if _LIST_INDEX.match(key)]
    if not indexed:
        return level
    if len(indexed) != len(level):
        raise OptionError("Cannot mix list and non-list keys")
    largest = max(int(key) for key in indexed)
    if largest + 1 != len(level):
        raise OptionError(f"List indices are not contiguous, saw {len(level)} elements but "
                          f"{largest} largest index")
    items: list[object] = []
    for index in range(len(level)):
        if str(index) not in level:
            raise OptionError(f"Missing list index {index}")
        items.append(level[str(index)])
    return items


def crumple(flat: Mapping[str, object]) -> dict[str, object]:
    """Turn dotted keys back into nested dictionaries and lists (``qdict_crumple``).

    ``..`` in a key is a literal dot. A dictionary whose keys are all integers becomes a list;
    the top level always stays a dictionary.

    :param flat: the flat options; not modified. Values are taken as leaves, whatever type.
    :return: a new nested dictionary.
    :raise OptionError: ``Cannot mix scalar and non-scalar keys``, ``Cannot mix list and
        non-list keys``, ``List indices are not contiguous, saw N elements but M largest
        index`` or ``Missing list index N``.
    """
    return _crumple_level(flat)


def extract_subdict(options: dict[str, object], prefix: str) -> dict[str, object]:
    """Move every ``prefix.*`` option out of ``options`` (``qdict_extract_subqdict``).

    :param options: flat options; the extracted keys are removed from it.
    :param prefix: the child's name, without the trailing dot (``file``, ``backing``).
    :return: the extracted options with ``prefix.`` stripped from their keys.
    """
    start = prefix + "."
    extracted = {key[len(start):]: value for key, value in options.items()
                 if key.startswith(start)}
    for key in extracted:
        del options[start + key]
    return extracted
