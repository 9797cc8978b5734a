"""-drive (QemuOpts), -blockdev (keyval) syntax and flatten/crumple.

Every error text below was checked against qemu-system-x86_64 7.2; the live test at the end
re-checks a sample against the installed binary.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockgraph.errors import OptionError
from blockgraph.options.keyval import (
    crumple,
    extract_subdict,
    flatten,
    parse_blockdev,
    parse_drive_opts,
    parse_keyval,
    parse_qemu_opts,
)

ID_ERROR = ("Parameter 'id' expects an identifier\n"
            "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.")

# --- -drive -------------------------------------------------------------------------------


def test_drive_basic_and_dotted_keys() -> None:
    assert parse_drive_opts("file=a.img,if=none,file.cache.direct=on") == {
        "file": "a.img", "if": "none", "file.cache.direct": "on"}


@pytest.mark.parametrize(("text", "expected"), [
    ("file=a,,b", {"file": "a,b"}),
    ("file=a,,,if=none", {"file": "a,", "if": "none"}),
    ("file=x,", {"file": "x"}),
    ("if=none,,", {"if": "none,"}),
    ("a=b=c", {"a": "b=c"}),
    ("file=x,readonly=on,readonly=off", {"file": "x", "readonly": "off"}),
    ("", {}),
    ("file=", {"file": ""}),
])
def test_drive_values(text: str, expected: dict[str, str]) -> None:
    assert parse_drive_opts(text) == expected


def test_drive_short_form_booleans_warn() -> None:
    warnings: list[str] = []
    opts = parse_drive_opts("file=x,readonly,nocache.direct,file.nofoo", warnings)
    assert opts == {"file": "x", "readonly": "on", "cache.direct": "off", "file.nofoo": "on"}
    assert warnings == [
        "short-form boolean option 'readonly' deprecated\nPlease use readonly=on instead",
        "short-form boolean option 'nocache.direct' deprecated\nPlease use cache.direct=off instead",
        "short-form boolean option 'file.nofoo' deprecated\nPlease use file.nofoo=on instead",
    ]


def test_drive_empty_keys_are_accepted_at_parse_time() -> None:
    # QEMU only complains later ("Block format 'raw' does not support the option ''").
    warnings: list[str] = []
    assert parse_drive_opts(",file=x", warnings) == {"": "on", "file": "x"}
    assert warnings == ["short-form boolean option '' deprecated\nPlease use =on instead"]
    assert parse_drive_opts("file=x,no") == {"file": "x", "": "off"}
    assert parse_drive_opts("file=x,=on") == {"file": "x", "": "on"}
    assert parse_drive_opts("readonly,,file=x") == {"readonly": "on", "": "on", "file": "x"}


@pytest.mark.parametrize(("text", "expected"), [
    ("socket,id=c0", {"backend": "socket", "id": "c0"}),
    ("so,,ck,id=c0", {"backend": "so,ck", "id": "c0"}),  # the implied value takes ',,'
    ("id=c0,socket", {"id": "c0", "socket": "on"}),  # only a bare *first* word is implied
    ("backend=a,b", {"backend": "a", "b": "on"}),
    ("", {}),
])
def test_qemu_opts_implied_first_word(text: str, expected: dict[str, str]) -> None:
    assert parse_qemu_opts(text, "backend") == expected


def test_qemu_opts_nodelay_hint() -> None:
    # QEMU's generic parser names "nodelay" in the hint for a bare delay or nodelay.
    warnings: list[str] = []
    assert parse_qemu_opts("nodelay", None, warnings) == {"delay": "off"}
    parse_qemu_opts("delay", None, warnings)
    assert [w.split("\n")[1] for w in warnings] == ["Please use nodelay=on instead",
                                                    "Please use nodelay=off instead"]


def test_drive_help_is_an_option_without_warning() -> None:
    warnings: list[str] = []
    assert parse_drive_opts("file=x,help,?", warnings) == {"file": "x", "help": "on", "?": "on"}
    assert warnings == []


def test_drive_id() -> None:
    assert parse_drive_opts("id=a.b-c_d,file=x") == {"file": "x", "id": "a.b-c_d"}
    assert parse_drive_opts("id=a,id=1b")["id"] == "a"  # the first id counts
    assert parse_drive_opts("id")["id"] == "on"
    assert parse_drive_opts("noid")["id"] == "off"


@pytest.mark.parametrize("text", ["id=1a", "id=", "id=a,,b", "id=1b,id=a", "id=_a"])
def test_drive_bad_id(text: str) -> None:
    with pytest.raises(OptionError) as info:
        parse_drive_opts(text)
    assert info.value.desc == ID_ERROR


# --- -blockdev keyval -----------------------------------------------------------------------


def test_keyval_basic() -> None:
    assert parse_keyval("driver=file,filename=a,,b,cache.direct=on") == {
        "driver": "file", "filename": "a,b", "cache.direct": "on"}


def test_keyval_implied_key() -> None:
    assert parse_keyval("qcow2,file=f", "driver") == {"driver": "qcow2", "file": "f"}
    assert parse_keyval("[1]", "driver") == {"driver": "[1]"}
    assert parse_keyval("x.y,node-name=n", "driver") == {"driver": "x.y", "node-name": "n"}
    assert parse_keyval("null-co,", "driver") == {"driver": "null-co"}


def test_keyval_duplicates_last_wins_and_lists() -> None:
    assert parse_keyval("node-name=a,node-name=b") == {"node-name": "b"}
    assert parse_keyval("a.b=1,a.b=2") == {"a.b": "2"}
    assert parse_keyval("c.1=y,c.0=x,c.2.k=z") == {"c.0": "x", "c.1": "y", "c.2.k": "z"}
    assert parse_keyval("a.00=1") == {"a.0": "1"}
    assert parse_keyval("a.0=1,a.00=2") == {"a.0": "2"}
    assert parse_keyval("a-b=1,a_b=2,A=3,x=") == {"a-b": "1", "a_b": "2", "A": "3", "x": ""}
    assert parse_keyval("") == {}
    assert parse_keyval("a=1,") == {"a": "1"}
    assert parse_keyval("a=1,,") == {"a": "1,"}


K127 = "k" * 127
K128 = "k" * 128


@pytest.mark.parametrize(("text", "message"), [
    ("x", "Expected '=' after parameter 'x'"),
    ("a=1,cache.direct", "Expected '=' after parameter 'cache.direct'"),
    ("a=1,noreadonly", "Expected '=' after parameter 'noreadonly'"),
    ("a=1,x.a=1,x", "Expected '=' after parameter 'x'"),
    ("=1", "Invalid parameter ''"),
    (",a=1", "Invalid parameter ''"),
    (",", "Invalid parameter ''"),
    ("a..b=1", "Invalid parameter 'a..b'"),
    (".a=1", "Invalid parameter '.a'"),
    ("a.=1", "Invalid parameter 'a.'"),
    ("a b=1", "Invalid parameter 'a b'"),
    ("1a=1", "Invalid parameter '1a'"),
    ("0=1", "Invalid parameter '0'"),
    ("_a=1", "Invalid parameter '_a'"),
    ("-a=1", "Invalid parameter '-a'"),
    ("a.1b=1", "Invalid parameter 'a.1b'"),
    ("a._b=1", "Invalid parameter 'a._b'"),
    ("a.-1=1", "Invalid parameter 'a.-1'"),
    ("a.0x0=1", "Invalid parameter 'a.0x0'"),
    ("a@=1", "Invalid parameter 'a@'"),
    ("a@b.c=1", "Invalid parameter 'a@b.c'"),
    ("a.b@c.d,e=1", "Invalid parameter 'a.b@c.d'"),
    ("a.b@c.d", "Invalid parameter 'a.b@c.d'"),
    (f"{K128}@=1", f"Invalid parameter '{K128}@'"),
    ("a=1,a.b@=2", "Invalid parameter 'a.b@'"),
    (f"{K128}=1", f"Parameter '{K128}' is too long"),
    (f"{K128}.b=1", f"Parameter '{K128}' is too long"),
    (f"a.{K128}=1", f"Parameter fragment '{K128}' is too long"),
    (f"a.b=1,a.b.{K128}=2", f"Parameter fragment '{K128}' is too long"),
    ("a=1,a.b=2", "Parameters 'a.*' used inconsistently"),
    ("a.b=2,a=1", "Parameters 'a.*' used inconsistently"),
    ("a.b.c=1,a.b=2", "Parameters 'a.b.*' used inconsistently"),
    ("a.b=1,a.b.c=2", "Parameters 'a.b.*' used inconsistently"),
    ("cache.direct=on,cache=x", "Parameters 'cache.*' used inconsistently"),
    ("a.0=1,a.0.b=1", "Parameters 'a.0.*' used inconsistently"),
    ("a.0=1,a.b=2", "Parameters 'a.*' used inconsistently"),
    ("a.b=2,a.0=1", "Parameters 'a.*' used inconsistently"),
    ("a.b.0=1,a.b.x=1", "Parameters 'a.b.*' used inconsistently"),
    ("a.0=1,a.b=2,c", "Expected '=' after parameter 'c'"),
    ("a.1=1", "Parameter 'a.0' missing"),
    ("a.01=1", "Parameter 'a.0' missing"),
    ("a.10=1", "Parameter 'a.0' missing"),
    ("a.0=1,a.2=1", "Parameter 'a.1' missing"),
    ("a.0=1,a.00=2,a.2=3", "Parameter 'a.1' missing"),
    ("a.0=1,a.1=1,a.3=1,a.5=1", "Parameter 'a.2' missing"),
    ("a.99999999999999999999.b=1", "Parameter 'a.0' missing"),
    ("x.a.1=1", "Parameter 'x.a.0' missing"),
    ("a.1.b.1=x", "Parameter 'a.1.b.0' missing"),
    ("a.1=1,a.b.1=2", "Parameter 'a.b.0' missing"),
    ("a.1=1,c", "Expected '=' after parameter 'c'"),
    ("help,a=1", "Help is not available for this option"),
    ("a=1,?", "Help is not available for this option"),
    ("d=1,help,a.1=x", "Help is not available for this option"),
    ("a=1,help,x", "Expected '=' after parameter 'x'"),
])
def test_keyval_errors(text: str, message: str) -> None:
    with pytest.raises(OptionError) as info:
        parse_keyval(text)
    assert info.value.desc == message


def test_keyval_long_fragments_are_fine_up_to_127() -> None:
    assert parse_keyval(f"{K127}=1,a.{K127}=2") == {K127: "1", f"a.{K127}": "2"}


@pytest.mark.parametrize(("text", "message"), [
    ("null-co,,x,node-name=n", "Invalid parameter ''"),  # ',,' does not escape an implied value
    ("null-co,,", "Invalid parameter ''"),
    ("null-co,node-name=n,null-co", "Expected '=' after parameter 'null-co'"),
    ("help,driver=null-co", "Help is not available for this option"),
    ("=null-co", "Invalid parameter ''"),
])
def test_keyval_implied_errors(text: str, message: str) -> None:
    with pytest.raises(OptionError) as info:
        parse_keyval(text, "driver")
    assert info.value.desc == message


def test_blockdev_keyval_and_json() -> None:
    assert parse_blockdev("qcow2,file.driver=file,file.filename=x") == {
        "driver": "qcow2", "file.driver": "file", "file.filename": "x"}
    assert parse_blockdev('{"driver":"qcow2","file":{"driver":"file","filename":"x"},'
                          '"read-only":true,"l":[1,2]}') == {
        "driver": "qcow2", "file.driver": "file", "file.filename": "x", "read-only": True,
        "l.0": 1, "l.1": 2}
    assert parse_blockdev("{'driver':'null-co','size':1.5e3}") == {"driver": "null-co",
                                                                   "size": 1500.0}
    # Only a '{' in first position selects JSON.
    assert parse_blockdev(" {'driver':'null-co'}") == {"driver": " {'driver':'null-co'}"}


@pytest.mark.parametrize(("text", "message"), [
    ("{", "JSON parse error, premature EOI"),
    ('{"driver":"null-co"} x', "Expecting at most one JSON value"),
    ('{"driver":"null-co"}{}', "Expecting at most one JSON value"),
    ('{"x":1,"x":2}', "JSON parse error, duplicate key"),
    ('{"a":tru}', "JSON parse error, invalid keyword 'tru'"),
])
def test_blockdev_json_errors(text: str, message: str) -> None:
    with pytest.raises(OptionError) as info:
        parse_blockdev(text)
    assert info.value.desc == message


# --- flatten / crumple / extract_subdict ----------------------------------------------------


def test_flatten() -> None:
    assert flatten({"a": {"b": {"c": 1}, "l": [{"x": "y"}, 2]}, "e": {}, "f": [], "n": None}) == {
        "a.b.c": 1, "a.l.0.x": "y", "a.l.1": 2, "e": {}, "f": [], "n": None}


def test_flatten_nested_wins_over_literal_dotted_key() -> None:
    # As qemu-img shows for json:{"file.filename":"x","file":{"filename":"y"}}: 'y' is opened.
    assert flatten({"file.filename": "x", "file": {"filename": "y"}}) == {"file.filename": "y"}
    assert flatten({"file": {"filename": "x"}, "file.filename": "y"}) == {"file.filename": "x"}


def test_crumple() -> None:
    assert crumple({"a.b.c": 1, "a.l.0.x": "y", "a.l.1": 2, "s": "t", "d..e": 3}) == {
        "a": {"b": {"c": 1}, "l": [{"x": "y"}, 2]}, "s": "t", "d.e": 3}
    assert crumple({"0": "top", "1": "level"}) == {"0": "top", "1": "level"}
    assert crumple({"a.": 1, "b.c..d.e": 2}) == {"a": {"": 1}, "b": {"c.d": {"e": 2}}}


@pytest.mark.parametrize(("flat", "message"), [
    ({"a.b": 1, "a.b.c": 2}, "Cannot mix scalar and non-scalar keys"),
    ({"a.b.c": 1, "a.b": 2}, "Cannot mix scalar and non-scalar keys"),
    ({"a": 1, "a.b": 2}, "Cannot mix scalar and non-scalar keys"),
    ({"a.0": 1, "a.0.x": 2}, "Cannot mix scalar and non-scalar keys"),
    ({"a.0": 1, "a.b": 2}, "Cannot mix list and non-list keys"),
    ({"a.1": 1}, "List indices are not contiguous, saw 1 elements but 1 largest index"),
    ({"a.0": 1, "a.00": 2}, "List indices are not contiguous, saw 2 elements but 0 largest index"),
    ({"a.-1": 1}, "List indices are not contiguous, saw 1 elements but -1 largest index"),
    ({"a.00": 1}, "Missing list index 0"),
])
def test_crumple_errors(flat: dict[str, object], message: str) -> None:
    with pytest.raises(OptionError) as info:
        crumple(flat)
    assert info.value.desc == message


def test_extract_subdict() -> None:
    options: dict[str, object] = {"file.driver": "file", "file.x.y": 1, "file": "no-dot",
                                  "filex.a": 2, "backing.file.a": 3}
    assert extract_subdict(options, "file") == {"driver": "file", "x.y": 1}
    assert options == {"file": "no-dot", "filex.a": 2, "backing.file.a": 3}
    assert extract_subdict(options, "backing") == {"file.a": 3}
    assert extract_subdict(options, "none") == {}


# --- properties -----------------------------------------------------------------------------

_names = st.from_regex(r"[a-z][a-z0-9_-]{0,6}", fullmatch=True)
_leaves = st.one_of(st.text(max_size=8), st.integers(), st.booleans(), st.none())
_nested: st.SearchStrategy[dict[str, object]] = st.recursive(
    st.dictionaries(_names, _leaves, min_size=1, max_size=4),
    lambda children: st.dictionaries(
        _names, st.one_of(_leaves, children, st.lists(children, min_size=1, max_size=3)),
        min_size=1, max_size=4),
    max_leaves=20,
)


@given(_nested)
def test_flatten_crumple_round_trip(nested: dict[str, object]) -> None:
    assert crumple(flatten(nested)) == nested


@given(_nested)
def test_flat_keys_are_dotted_paths(nested: dict[str, object]) -> None:
    flat = flatten(nested)
    assert all(not isinstance(v, dict | list) for v in flat.values())
    assert flatten(crumple(flat)) == flat


_keyval_keys = st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,10}(\.[A-Za-z][A-Za-z0-9_-]{0,5})?",
                             fullmatch=True)


@given(st.dictionaries(_keyval_keys, st.text(alphabet=st.characters(exclude_categories=["Cs"]),
                                             max_size=12), max_size=6))
def test_keyval_escape_round_trip(options: dict[str, str]) -> None:
    # Keep the generated keys consistent (no "a" next to "a.b").
    try:
        crumple(dict(options))
    except OptionError:
        return
    text = ",".join(f"{k}={v.replace(',', ',,')}" for k, v in options.items())
    assert parse_keyval(text) == options
    assert parse_drive_opts(text) == options


# --- live comparison with QEMU ---------------------------------------------------------------

QEMU_SYSTEM = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(
    QEMU_SYSTEM is None and not os.environ.get("BLOCKGRAPH_REQUIRE_ORACLES"),
    reason="qemu-system-x86_64 not installed")


def _qemu_error(option: str, argument: str) -> str:
    assert QEMU_SYSTEM is not None, "BLOCKGRAPH_REQUIRE_ORACLES is set but QEMU is missing"
    proc = subprocess.run(
        [QEMU_SYSTEM, "-machine", "none", "-nodefaults", "-display", "none", "-S",
         "-monitor", "none", option, argument],
        capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr
    prefix = f"{os.path.basename(QEMU_SYSTEM)}: {option} {argument}: "
    lines = [line for line in proc.stderr.split(prefix) if line and "warning:" not in line]
    return lines[-1].rstrip("\n")


@needs_qemu
@pytest.mark.parametrize("argument", [
    "driver=null-co,x", "driver=null-co,a..b=1", "driver=null-co,a=1,a.b=2",
    "driver=null-co,a.1=1", f"driver=null-co,a.{K128}=1", "driver=null-co,help",
    "null-co,,x,node-name=n", "{", '{"a":1} x', '{"a":1,"a":2}',
])
def test_live_blockdev_messages(argument: str) -> None:
    if argument.startswith("{"):
        with pytest.raises(OptionError) as info:
            parse_blockdev(argument)
    else:
        with pytest.raises(OptionError) as info:
            parse_keyval(argument, "driver")
    assert info.value.desc == _qemu_error("-blockdev", argument)


@needs_qemu
@pytest.mark.parametrize("argument", ["file=x,if=none,id=1a", "file=x,if=none,cache=bogus"])
def test_live_drive_messages(argument: str) -> None:
    from blockgraph.options.cache import apply_legacy_cache

    with pytest.raises(OptionError) as info:
        apply_legacy_cache(parse_drive_opts(argument))
    assert info.value.desc == _qemu_error("-drive", argument)
