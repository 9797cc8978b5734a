"""json: filenames and QEMU's JSON dialect; messages checked against qemu-img 7.2."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from blockgraph.errors import OptionError
from blockgraph.options.keyval import parse_json_filename
from blockgraph.options.qjson import parse_json

PARSE = "Could not parse the JSON options: "


def test_nested_options_are_flattened() -> None:
    assert parse_json_filename(
        'json:{"driver":"qcow2","file":{"driver":"file","filename":"a.img"},'
        '"cache":{"direct":true},"l":[1,{"x":null}]}') == {
        "driver": "qcow2", "file.driver": "file", "file.filename": "a.img",
        "cache.direct": True, "l.0": 1, "l.1.x": None}


def test_single_quotes_and_escapes() -> None:
    assert parse_json_filename("json:{'driver':'raw','file':{'filename':'it\\'s \"x\"'}}") == {
        "driver": "raw", "file.filename": "it's \"x\""}
    assert parse_json('"\\u00e9\\ud83d\\ude00\\/\\b\\f\\n\\r\\t\\\'\\u0000"') == (
        "\u00e9\U0001F600/\b\f\n\r\t'\x00")
    assert parse_json("'x\"y'") == 'x"y'


def test_numbers_and_keywords() -> None:
    assert parse_json("[0, -0, 12, -7, 1.5, 1E+2, 18446744073709551615, "
                      "99999999999999999999, -99999999999999999999, true, false, null]") == [
        0, 0, 12, -7, 1.5, 100.0, 18446744073709551615, 1e20, -1e20, True, False, None]


def test_whitespace_is_allowed_around() -> None:
    assert parse_json_filename('json: {"a" : 1 }  ') == {"a": 1}


def test_nested_object_wins_over_dotted_key() -> None:
    assert parse_json_filename(
        'json:{"driver":"raw","file.filename":"x","file":{"filename":"y"}}')["file.filename"] == "y"


@pytest.mark.parametrize(("text", "message"), [
    ("json:", PARSE + "Expecting a JSON value"),
    ("json: ", PARSE + "Expecting a JSON value"),
    ("json:1", "Invalid JSON object given"),
    ("json:[1]", "Invalid JSON object given"),
    ('json:"x"', "Invalid JSON object given"),
    ("json:null", "Invalid JSON object given"),
    ("json:{", PARSE + "JSON parse error, premature EOI"),
    ('json:{"a":01}', PARSE + "JSON parse error, stray '01'"),
    ('json:{"driver":"raw"} x', PARSE + "Expecting at most one JSON value"),
])
def test_filename_errors(text: str, message: str) -> None:
    with pytest.raises(OptionError) as info:
        parse_json_filename(text)
    assert info.value.desc == message


@pytest.mark.parametrize(("text", "message"), [
    ('{"a"}', "JSON parse error, missing : in object pair"),
    ('{"a":}', "JSON parse error, expecting value"),
    ('{"a":1,}', "JSON parse error, expecting value"),
    ("{,}", "JSON parse error, expecting value"),
    ("{1:2}", "JSON parse error, key is not a string in object"),
    ('{"a" 1}', "JSON parse error, missing : in object pair"),
    ('{"a":1 "b":2}', "JSON parse error, expected separator in dict"),
    ('{"a":tru}', "JSON parse error, invalid keyword 'tru'"),
    ('{"a":nul}', "JSON parse error, invalid keyword 'nul'"),
    ('{"a":infinity}', "JSON parse error, invalid keyword 'infinity'"),
    ('{"a":[1,]}', "JSON parse error, expecting value"),
    ('{"a":[1 2]}', "JSON parse error, expected separator in list"),
    ('{"a":[}', "JSON parse error, expecting value"),
    ('{"a":"\\x"}', "JSON parse error, invalid escape sequence in string"),
    ('{"a":"\\U0041"}', "JSON parse error, invalid escape sequence in string"),
    ('{"a":"\\u12"}', 'JSON parse error, \\u12" is not a valid Unicode character'),
    ('{"a":"\\u12g4"}', "JSON parse error, \\u12g4 is not a valid Unicode character"),
    ('{"a":"\\ud800"}', "JSON parse error, \\ud800 is not a valid Unicode character"),
    ('{"a":"\\uD83D"}', "JSON parse error, \\uD83D is not a valid Unicode character"),
    ('{"a":"\\ude00"}', "JSON parse error, \\ude00 is not a valid Unicode character"),
    ('{"a":"\\ud83d\\u0041"}', "JSON parse error, \\ud83d is not a valid Unicode character"),
    ('{"a":01}', "JSON parse error, stray '01'"),
    ('{"a":-}', "JSON parse error, stray '-}'"),
    ('{"a":1.}', "JSON parse error, stray '1.}'"),
    ('{"a":.5}', "JSON parse error, stray '.'"),
    ('{"a":1e}', "JSON parse error, stray '1e}'"),
    ('{"a":%d}', "JSON parse error, stray '%'"),
    ('{"a":@}', "JSON parse error, stray '@'"),
    ('{"a":NaN}', "JSON parse error, stray 'N'"),
    ('{"a":"abc', "JSON parse error, stray '\"abc'"),
    ('{"a":"\t"}', "JSON parse error, stray '\"\t'"),
    ('{"a":1}}', "Expecting at most one JSON value"),
    ('{"a":1} @', "Expecting at most one JSON value"),
    ('{"a":1} {', "Expecting at most one JSON value"),
    ('{"a" 1, @}', "JSON parse error, stray '@'"),  # the lexer speaks first ...
    ('{"a" 1}@', "JSON parse error, missing : in object pair"),  # ... unless the value is done
    ('{"a":[1,2],"a":3}', "JSON parse error, duplicate key"),
    ('{"a":"x"', "JSON parse error, premature EOI"),
    ('{"a"', "JSON parse error, premature EOI"),
    ('{"a":{"b":1}', "JSON parse error, premature EOI"),
    ('{"a":1,', "JSON parse error, premature EOI"),
    # At the end of the input QEMU parses what it has: a syntax error beats "premature EOI".
    ('{"a":[1 2', "JSON parse error, expected separator in list"),
    ('{"a" 1', "JSON parse error, missing : in object pair"),
    ("", "Expecting a JSON value"),
])
def test_json_errors(text: str, message: str) -> None:
    with pytest.raises(OptionError) as info:
        parse_json(text)
    assert info.value.desc == message


def test_not_a_json_filename_is_a_caller_bug() -> None:
    with pytest.raises(ValueError):
        parse_json_filename("a.img")


QEMU_IMG = shutil.which("qemu-img")


@pytest.mark.skipif(QEMU_IMG is None and not os.environ.get("BLOCKGRAPH_REQUIRE_ORACLES"),
                    reason="qemu-img not installed")
@pytest.mark.parametrize("filename", [
    "json:[1]", "json:{", "json:", 'json:{"a":1.}', 'json:{"a":"\\u12"}', 'json:{1:2}',
    "json:{'a':1,'a':2}",
])
def test_live_messages(filename: str) -> None:
    assert QEMU_IMG is not None, "BLOCKGRAPH_REQUIRE_ORACLES is set but qemu-img is missing"
    proc = subprocess.run([QEMU_IMG, "info", filename], capture_output=True, text=True,
                          timeout=20, stdin=subprocess.DEVNULL)
    prefix = f"qemu-img: Could not open '{filename}': "
    assert proc.stderr.startswith(prefix), proc.stderr
    with pytest.raises(OptionError) as info:
        parse_json_filename(filename)
    assert info.value.desc == proc.stderr[len(prefix):].rstrip("\n")
