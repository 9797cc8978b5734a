"""``--object`` parsing and the object registry: QEMU 7.2's checks, order and texts."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from blockgraph.errors import BlockError
from blockgraph.objects import (
    OBJECT_TYPES,
    TOOL_OBJECT_TYPES,
    ObjectCreationError,
    ObjectRegistry,
    Secret,
    UserObject,
    add_object,
    object_help,
)

ID_HINT = "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter."


def _error(spec: str | dict[str, object], registry: ObjectRegistry | None = None,
           types: tuple[str, ...] = OBJECT_TYPES) -> str:
    registry = registry if registry is not None else ObjectRegistry()
    before = dict(registry.objects)
    with pytest.raises(BlockError) as info:
        add_object(registry, spec, types)
    assert registry.objects == before  # a failure adds nothing
    return str(info.value)


@pytest.mark.parametrize(("spec", "message"), [
    ("id=t0", "Parameter 'qom-type' is missing"),
    ("nosuch,id=t0", "Parameter 'qom-type' does not accept value 'nosuch'"),
    ("tls-creds-x509", "Parameter 'id' is missing"),
    ("tls-creds-x509,id=0t,dir=/x", f"Parameter 'id' expects an identifier\n{ID_HINT}"),
    ("tls-creds-x509,id=t0,endpoint=foo", "Parameter 'endpoint' does not accept value 'foo'"),
    # Members are checked in QEMU's schema order, whatever the order given.
    ("tls-creds-x509,id=t0,endpoint=foo,verify-peer=maybe", "Parameter 'verify-peer' expects 'on' or 'off'"),
    ("tls-creds-x509,id=t0,passwordid=p,sanity-check=x", "Parameter 'sanity-check' expects 'on' or 'off'"),
    # Unknown members after the known ones' values, before the id.
    ("tls-creds-x509,id=t0,bogus=1,endpoint=foo", "Parameter 'endpoint' does not accept value 'foo'"),
    ("tls-creds-x509,id=0t,bogus=1", "Parameter 'bogus' is unexpected"),
    ("tls-creds-x509,id=t0", "Missing 'dir' property value"),
    ("tls-creds-x509,id=t0,dir=/nonexistent",
     "Unable to access credentials /nonexistent/ca-cert.pem: No such file or directory"),
    ("tls-creds-psk,id=p0,username=u,bogus=1", "Parameter 'bogus' is unexpected"),
    ("tls-creds-psk,id=p0", "Missing 'dir' property value"),
    ("tls-creds-psk,id=p0,dir=/nonexistent",
     "Unable to access credentials /nonexistent/keys.psk: No such file or directory"),
    ("tls-creds-anon,id=a0,sanity-check=on", "Parameter 'sanity-check' is unexpected"),
    ("secret,id=s0", "Either 'file' or 'data' must be provided"),
    ("secret,id=s0,data=x,file=/etc/hostname", "'file' and 'data' are mutually exclusive"),
    ("secret,id=s0,data=x,format=hex", "Parameter 'format' does not accept value 'hex'"),
    ("secret,id=s0,file=/nonexistent",
     "Unable to read /nonexistent: Failed to open file \u201c/nonexistent\u201d: No such file or directory"),
])
def test_object_errors(spec: str, message: str) -> None:
    assert _error(spec) == message


def test_json_objects_need_real_types() -> None:
    assert _error({"qom-type": "tls-creds-x509", "id": "t0", "verify-peer": "on"}) == \
        "Invalid parameter type for 'verify-peer', expected: boolean"
    assert _error({"qom-type": "tls-creds-x509", "id": "t0", "dir": 5}) == \
        "Invalid parameter type for 'dir', expected: string"
    assert _error('{"qom-type": "secret", "id": "s0"}') == "Either 'file' or 'data' must be provided"


@pytest.mark.parametrize("word", ["on", "yes", "true", "y", "off", "no", "false", "n"])
def test_keyval_bool_words(word: str) -> None:
    # The value is accepted; what fails is the missing directory, checked after it.
    assert _error(f"tls-creds-x509,id=t0,verify-peer={word}") == "Missing 'dir' property value"


def test_duplicate_ids_and_creation_errors() -> None:
    registry = ObjectRegistry()
    add_object(registry, "secret,id=s0,data=x")
    with pytest.raises(ObjectCreationError) as info:
        add_object(registry, "tls-creds-x509,id=s0,dir=/nonexistent")
    assert str(info.value) == "attempt to add duplicate property 's0' to object (type 'container')"
    with pytest.raises(ObjectCreationError):
        add_object(registry, "tls-creds-x509,id=t0,dir=/nonexistent")
    # Option errors are not creation errors (qemu-system prefixes only those with the option).
    with pytest.raises(BlockError) as option_error:
        add_object(registry, "tls-creds-x509,id=t0,endpoint=x")
    assert not isinstance(option_error.value, ObjectCreationError)


def test_secrets(tmp_path: Path) -> None:
    registry = ObjectRegistry()
    add_object(registry, "secret,id=s0,data=hunter2")
    add_object(registry, f"secret,id=s1,data={base64.b64encode(b'pass').decode()},format=base64")
    path = tmp_path / "pw"
    path.write_bytes(b"from-file")
    add_object(registry, f"secret,id=s2,file={path}")
    assert [registry.secret(i).data for i in ("s0", "s1", "s2")] == [b"hunter2", b"pass", b"from-file"]
    with pytest.raises(BlockError, match="^No secret with id 'nope'$"):
        registry.secret("nope")


def test_other_types_only_take_an_id() -> None:
    registry = ObjectRegistry()
    obj = add_object(registry, "iothread,id=io0")
    assert obj == UserObject("iothread", "io0") and registry.get("io0") is obj
    # qemu-img and qemu-io have no iothread.
    assert _error("iothread,id=io1", types=TOOL_OBJECT_TYPES) == "invalid object type: iothread"


def test_tls_creds_lookup_errors() -> None:
    registry = ObjectRegistry()
    add_object(registry, "secret,id=s0,data=x")
    add_object(registry, "tls-creds-anon,id=a0,endpoint=server")
    with pytest.raises(BlockError, match="^TLS credentials of type 'tls-creds-anon' are not supported"):
        registry.tls_creds("a0", "server")
    with pytest.raises(BlockError, match="^No TLS credentials with id 't0'$"):
        registry.tls_creds("t0", "server")
    with pytest.raises(BlockError, match="^Object with id 's0' is not TLS credentials$"):
        registry.tls_creds("s0", "client")
    assert isinstance(registry.get("s0"), Secret)


def test_object_help() -> None:
    lines = object_help("help")
    assert lines is not None and lines[0] == "List of user creatable objects:"
    assert "  tls-creds-x509" in lines and "  iothread" in lines
    tool_lines = object_help("help", TOOL_OBJECT_TYPES)
    assert tool_lines is not None and "  iothread" not in tool_lines
    assert object_help("tls-creds-x509,help") == [
        "tls-creds-x509 options:", "  dir=<string>", "  endpoint=<QCryptoTLSCredsEndpoint>",
        "  passwordid=<string>", "  priority=<string>", "  sanity-check=<bool>", "  verify-peer=<bool>"]
    assert object_help("secret,id=s0,data=x") is None


def test_authz_simple() -> None:
    assert _error("authz-simple,id=a0") == "Parameter 'identity' is missing"
    assert _error("authz-simple,id=a0,identity=x,bogus=1") == "Parameter 'bogus' is unexpected"
    registry = ObjectRegistry()
    add_object(registry, "authz-simple,id=a0,identity=C=GB,,CN=client")
    add_object(registry, "authz-list,id=l0")
    assert registry.authorize("a0", "C=GB,CN=client") is None
    assert registry.authorize("a0", "CN=client") == "TLS x509 authz check for CN=client is denied"
    assert registry.authorize("a0", None) == "TLS x509 authz check for None is denied"
    assert registry.authorize("zz", "CN=client") == "Cannot find QAuthZ object ID zz"
    # An authz-list without rules applies its policy, deny by default.
    assert registry.authorize("l0", "C=GB,CN=client") is not None
    assert object_help("authz-simple,help") == ["authz-simple options:", "  identity=<string>"]


def test_authz_list_first_matching_rule_decides() -> None:
    registry = ObjectRegistry()
    add_object(registry, "authz-list,id=a,policy=allow,"
               "rules.0.match=CN=bad*,rules.0.format=glob,rules.0.policy=deny,"
               "rules.1.match=CN=bad-but-listed,rules.1.policy=allow")
    assert registry.authorize("a", "CN=good") is None
    assert registry.authorize("a", "CN=bad-but-listed") is not None  # rule 0 came first
    assert registry.authorize("a", None) is not None


def test_authz_list_globs_are_glib_simple_patterns() -> None:
    registry = ObjectRegistry()
    add_object(registry, {"qom-type": "authz-list", "id": "a", "rules": [
        {"match": "CN=[ab]?", "policy": "allow", "format": "glob"}]})
    # '[' is literal, '?' is one character, and the whole name must match.
    assert registry.authorize("a", "CN=[ab]x") is None
    assert registry.authorize("a", "CN=ax") is not None
    assert registry.authorize("a", "CN=[ab]xy") is not None
    assert registry.authorize("a", "O=x,CN=[ab]x") is not None
