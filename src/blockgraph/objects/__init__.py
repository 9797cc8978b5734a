"""User-creatable objects: what ``--object`` (and ``object-add``) make, looked up by id.

Rules of this package:

* One :class:`ObjectRegistry` per :class:`~blockgraph.graph.layer.BlockLayer` (no globals); the
  tools fill it from their ``--object`` options, the NBD client driver and the NBD server look
  TLS credentials up in it. It sits below ``drivers/`` so that both can import it.
* :func:`add_object` is the one way in, for every tool: it checks an object's options the way
  QEMU 7.2's ``user_creatable_add_qapi`` does, in QEMU's order and with QEMU's texts — first the
  QAPI members in schema order (types, enums), then unknown members, then the id, then duplicate
  ids, and only then the object's own completion (reading files). A failure adds nothing.
* Object types blockgraph has no use for (``iothread``, ``main-loop``, ...) are accepted and
  only take their id, so a command line written for QEMU still runs.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from blockgraph.errors import BlockError
from blockgraph.objects.throttle import (
    LIMIT_KEYS,
    MAX_LENGTH,
    ThrottleGroup,
    ThrottleLimits,
    ThrottleMember,
    parse_limit,
)
from blockgraph.options.schema import parse_bool

if TYPE_CHECKING:
    from blockgraph.objects.tls import TlsCredsX509

__all__ = [
    "OBJECT_TYPES", "TOOL_OBJECT_TYPES", "AuthzList", "AuthzRule", "AuthzSimple",
    "ThrottleGroupObject", "ObjectCreationError", "UserObject", "Secret", "ObjectRegistry", "add_object",
    "parse_object", "object_help",
]

# ``--object help`` of qemu-nbd and qemu-storage-daemon 7.2.
OBJECT_TYPES: tuple[str, ...] = (
    "authz-list", "authz-list-file", "authz-simple", "iothread", "main-loop", "pr-manager-helper",
    "secret", "secret_keyring", "thread-context", "throttle-group", "tls-cipher-suites",
    "tls-creds-anon", "tls-creds-psk", "tls-creds-x509",
)
# qemu-img and qemu-io offer every type but ``iothread``.
TOOL_OBJECT_TYPES: tuple[str, ...] = tuple(t for t in OBJECT_TYPES if t != "iothread")

_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")
_ID_HINT = "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter."


class ObjectCreationError(BlockError):
    """A failure after the options were accepted: a duplicate id, or the object's own files.

    qemu-system-x86_64 reports these without the ``-object ...:`` location it gives option
    errors, because it creates objects after parsing the command line.
    """


@dataclass
class UserObject:
    """An object that is only an id here (blockgraph does nothing with its type)."""

    qom_type: str
    id: str


@dataclass
class AuthzSimple(UserObject):
    """``authz-simple``: exactly one identity (a TLS client's distinguished name) is allowed."""

    identity: str = ""

    def is_allowed(self, identity: str) -> bool:
        return identity == self.identity


@dataclass(frozen=True)
class AuthzRule:
    """One rule of an ``authz-list``: ``match`` is a name or, with ``glob``, a pattern."""

    match: str
    allow: bool
    glob: bool = False

    def matches(self, identity: str) -> bool:
        if not self.glob:
            return identity == self.match
        # GLib's simple patterns: only '*' and '?' are special (no classes, no escapes).
        pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c)
                          for c in self.match)
        return re.fullmatch(pattern, identity, re.DOTALL) is not None


@dataclass
class AuthzList(UserObject):
    """``authz-list``: the first rule matching an identity decides; ``policy`` otherwise."""

    rules: tuple[AuthzRule, ...] = ()
    allow: bool = False

    def is_allowed(self, identity: str) -> bool:
        for rule in self.rules:
            if rule.matches(identity):
                return rule.allow
        return self.allow


@dataclass
class ThrottleGroupObject(UserObject):
    """``throttle-group``: limits that throttle nodes naming this id share."""

    group: ThrottleGroup = field(default_factory=lambda: ThrottleGroup(""))


@dataclass
class Secret(UserObject):
    """``secret``: bytes given inline (``data``) or read from ``file``."""

    data: bytes = b""


# -- member checking (QEMU's keyval/QAPI visitors) ----------------------------------------------

# (name, kind): kind is "str", "bool", or a tuple of enum values. Order is QEMU's schema order,
# which decides which of several bad values is reported.
Member = tuple[str, "str | tuple[str, ...]"]

_POLICY = ("deny", "allow")

_SECRET_MEMBERS: tuple[Member, ...] = (
    ("format", ("raw", "base64")), ("keyid", "str"), ("iv", "str"), ("data", "str"),
    ("file", "str"),
)
_TLS_MEMBERS: tuple[Member, ...] = (
    ("verify-peer", "bool"), ("dir", "str"), ("endpoint", ("client", "server")),
    ("priority", "str"),
)
_MEMBERS: dict[str, tuple[Member, ...]] = {
    "secret": _SECRET_MEMBERS,
    "tls-creds-x509": (*_TLS_MEMBERS, ("sanity-check", "bool"), ("passwordid", "str")),
    "tls-creds-psk": (*_TLS_MEMBERS, ("username", "str")),
    "tls-creds-anon": _TLS_MEMBERS,
    "authz-simple": (("identity", "str"),),
    "authz-list": (("policy", _POLICY), ("rules", "rules")),
    # QAPI knows this one by another name than QOM's authz-list-file, so QEMU 7.2 checks its
    # options and then finds no such object type (see _QAPI_TYPES).
    "authz-listfile": (("filename", "str"), ("refresh", "bool")),
    "authz-list-file": (("filename", "str"), ("refresh", "bool")),
    "authz-pam": (("service", "str"),),
    "throttle-group": (("limits", "limits"),
                       *((f"x-{key}", "int") for key in LIMIT_KEYS)),
}
# QAPI's names of object types: a type outside them is refused before its options are read;
# one inside them that the program cannot make is refused after ("invalid object type").
_QAPI_TYPES = frozenset(OBJECT_TYPES) - {"authz-list-file"} | {"authz-listfile", "authz-pam"}
_RULE_MEMBERS: tuple[Member, ...] = (("match", "str"), ("policy", _POLICY),
                                     ("format", ("exact", "glob")))
# The QOM type names ``--object TYPE,help`` shows for members that are not plain.
_HELP_TYPES = {"str": "string", "bool": "bool", "endpoint": "QCryptoTLSCredsEndpoint",
               "policy": "QAuthZListPolicy", "rules": "QAuthZListRule", "int": "int",
               "limits": "ThrottleLimits"}
# Members QEMU's schema makes mandatory, checked with the types.
_REQUIRED: dict[str, tuple[str, ...]] = {
    "authz-simple": ("identity",), "authz-listfile": ("filename",),
    "authz-list-file": ("filename",), "authz-pam": ("service",),
}


def _check_members(members: Sequence[Member], props: dict[str, Any], keyval: bool,
                   path: str = "") -> None:
    """Check ``props`` as QEMU's visitors do; ``path`` prefixes the names of nested members
    (``rules.0.`` from keyval, ``rules[0].`` from JSON), except in enum errors, which QEMU
    reports with the bare member name."""
    for name, kind in members:
        if name not in props:
            continue
        value = props[name]
        if kind == "rules":
            _check_rules(value, keyval, f"{path}{name}")
        elif kind == "limits":
            if not isinstance(value, dict):
                raise BlockError(f"Invalid parameter type for '{path}{name}', expected: object")
            _check_members([(key, "int") for key in LIMIT_KEYS], value, keyval, f"{name}.")
        elif keyval and isinstance(value, dict | list):
            # A scalar given sub-keys (file.x=1): the keyval visitor leaves them unvisited.
            raise BlockError(f"Parameters '{path}{name}.*' are unexpected")
        elif kind == "int":
            if not keyval and (isinstance(value, bool) or not isinstance(value, int)):
                raise BlockError(f"Invalid parameter type for '{path}{name}', expected: integer")
            props[name] = parse_limit(f"{path}{name}", value)
        elif kind == "bool":
            if keyval and isinstance(value, str):
                props[name] = parse_bool(name, value)
            elif not isinstance(value, bool):
                raise BlockError(f"Invalid parameter type for '{path}{name}', expected: boolean")
        elif not isinstance(value, str):
            raise BlockError(f"Invalid parameter type for '{path}{name}', expected: string")
        elif isinstance(kind, tuple) and value not in kind:
            raise BlockError(f"Parameter '{name}' does not accept value '{value}'")
    known = {name for name, _ in members}
    for name in props:
        if name not in known:
            raise BlockError(f"Parameter '{path}{name}' is unexpected")


def _check_rules(value: object, keyval: bool, path: str) -> None:
    if not isinstance(value, list):
        raise BlockError(f"Invalid parameter type for '{path}', expected: array")
    for index, rule in enumerate(value):
        where = f"{path}.{index}" if keyval else f"{path}[{index}]"
        if not isinstance(rule, dict):
            raise BlockError(f"Invalid parameter type for '{where}', expected: object")
        for name in ("match", "policy"):
            if name not in rule:
                raise BlockError(f"Parameter '{where}.{name}' is missing")
        _check_members(_RULE_MEMBERS, rule, keyval, f"{where}.")


# -- the registry ---------------------------------------------------------------------------------


class ObjectRegistry:
    """The objects of one process, by id, in creation order."""

    def __init__(self) -> None:
        self.objects: dict[str, UserObject] = {}
        # Throttle groups by name: those of throttle-group objects and the anonymous ones of
        # -drive throttling.group (one namespace, as in QEMU).
        self.throttle_groups: dict[str, ThrottleGroup] = {}

    def join_throttle_group(self, name: str, limits: ThrottleLimits | None) -> ThrottleMember:
        """A new member of the group ``name`` (made if there is none); ``limits``, if given,
        become the group's (the last member configured wins, as in QEMU)."""
        group = self.throttle_groups.get(name)
        if group is None:
            group = self.throttle_groups[name] = ThrottleGroup(name)
        if limits is not None:
            group.configure(limits)
        return group.join()

    def leave_throttle_group(self, member: ThrottleMember) -> None:
        """``member`` leaves (its waiting requests go now); an anonymous group goes with its
        last member, a throttle-group object's stays."""
        group = member.group
        group.leave(member)
        owned = isinstance(self.objects.get(group.name), ThrottleGroupObject)
        if group.members <= 0 and not owned and self.throttle_groups.get(group.name) is group:
            del self.throttle_groups[group.name]

    def get(self, ident: str) -> UserObject | None:
        return self.objects.get(ident)

    def secret(self, ident: str) -> Secret:
        """The secret ``ident``.

        :raise BlockError: QEMU's text when there is none.
        """
        found = self.objects.get(ident)
        if not isinstance(found, Secret):
            raise BlockError(f"No secret with id '{ident}'")
        return found

    def tls_creds(self, ident: str, endpoint: str) -> TlsCredsX509:
        """The TLS credentials ``ident`` for an ``endpoint`` ("server" or "client").

        :raise BlockError: QEMU's texts for a missing object, an object of another type, and
            credentials made for the other endpoint.
        """
        from blockgraph.objects.tls import TlsCredsX509  # tls builds on this module

        found = self.objects.get(ident)
        if found is None:
            raise BlockError(f"No TLS credentials with id '{ident}'")
        if found.qom_type.startswith("tls-creds-") and not isinstance(found, TlsCredsX509):
            raise BlockError(f"TLS credentials of type '{found.qom_type}' are not supported "
                             "by blockgraph")
        if not isinstance(found, TlsCredsX509):
            raise BlockError(f"Object with id '{ident}' is not TLS credentials")
        if found.endpoint != endpoint:
            raise BlockError(f"Expected TLS credentials for a {endpoint} endpoint")
        return found

    def authorize(self, authz_id: str, identity: str | None) -> str | None:
        """Why the TLS client ``identity`` (its distinguished name) is refused, or None.

        The object is looked up for each client, as QEMU does: one added later counts, and an
        id naming nothing refuses everyone.
        """
        found = self.objects.get(authz_id)
        if found is None:
            return f"Cannot find QAuthZ object ID {authz_id}"
        if not isinstance(found, AuthzSimple | AuthzList):
            return f"Object '{authz_id}' is not a QAuthZ subclass"
        if identity is None or not found.is_allowed(identity):
            return f"TLS x509 authz check for {identity} is denied"
        return None

    def remove(self, ident: str) -> None:
        """Delete the object ``ident``.

        :raise BlockError: QEMU's text for a throttle group that nodes still use.
        """
        found = self.objects.get(ident)
        if isinstance(found, ThrottleGroupObject):
            if found.group.members > 0:
                raise BlockError(f"object '{ident}' is in use, can not be deleted")
            self.throttle_groups.pop(ident, None)
        self.objects.pop(ident, None)


def parse_object(text: str) -> tuple[dict[str, Any], bool]:
    """An ``--object`` argument as a dict, and whether it was keyval (strings) or JSON."""
    from blockgraph.options.keyval import crumple, parse_keyval
    from blockgraph.options.qjson import parse_json

    if text.startswith("{"):
        parsed = parse_json(text)
        if not isinstance(parsed, dict):
            raise BlockError("JSON argument must be an object")
        return dict(parsed), False
    # Nested members (authz-list's rules.0.match) as the keyval visitor sees them.
    return crumple(parse_keyval(text, implied_key="qom-type")), True


def object_help(text: str, types: Sequence[str] = OBJECT_TYPES) -> list[str] | None:
    """The lines QEMU prints for ``--object help`` / ``--object tls-creds-x509,help``, or None."""
    if text in ("help", "?"):
        return ["List of user creatable objects:", *(f"  {t}" for t in types)]
    kind, _, rest = text.partition(",")
    if rest not in ("help", "?"):
        return None
    if kind not in types:
        # No such object class in this program: QEMU lists the ones it has.
        return object_help("help", types)
    if kind in _MEMBERS and kind != "secret":
        # QEMU sorts the printed "name=<type>" strings: x-bps-read-max=<int> comes before
        # x-bps-read=<int>.
        return [f"{kind} options:",
                *sorted(f"  {name}=<{_HELP_TYPES.get(name) or _HELP_TYPES[str(t)]}>"
                        for name, t in _MEMBERS[kind])]
    return None


def add_object(registry: ObjectRegistry, spec: str | Mapping[str, Any],
               types: Sequence[str] = OBJECT_TYPES, keyval: bool | None = None) -> UserObject:
    """Create the object ``spec`` describes (an ``--object`` string or a QMP-style dict).

    :param types: the object types the calling program offers; a QOM type outside it gets
        qemu-io's ``invalid object type`` text.
    :raise BlockError: QEMU's text; nothing is added then.
    """
    if isinstance(spec, str):
        props, is_keyval = parse_object(spec)
    else:
        props, is_keyval = dict(spec), bool(keyval)
    qom_type = props.pop("qom-type", None)
    if qom_type is None:
        raise BlockError("Parameter 'qom-type' is missing")
    if not isinstance(qom_type, str):
        raise BlockError("Invalid parameter type for 'qom-type', expected: string")
    if qom_type not in _QAPI_TYPES:
        raise BlockError(f"Parameter 'qom-type' does not accept value '{qom_type}'")
    ident = props.pop("id", None)
    if ident is None:
        raise BlockError("Parameter 'id' is missing")
    if not isinstance(ident, str):
        raise BlockError("Invalid parameter type for 'id', expected: string")
    members = _MEMBERS.get(qom_type)
    if members is not None:
        for name, _ in members:
            if name in _REQUIRED.get(qom_type, ()) and name not in props:
                raise BlockError(f"Parameter '{name}' is missing")
        _check_members(members, props, is_keyval)
    if not _ID_RE.match(ident):
        raise BlockError(f"Parameter 'id' expects an identifier\n{_ID_HINT}")
    if qom_type not in types:
        raise BlockError(f"invalid object type: {qom_type}")
    # A throttle-group's properties check themselves as they are set, before the object is
    # added under its id.
    throttle_values = _throttle_values(props) if qom_type == "throttle-group" else {}
    if ident in registry.objects:
        raise ObjectCreationError(f"attempt to add duplicate property '{ident}' to object "
                                  "(type 'container')")
    obj: UserObject
    try:
        if qom_type == "secret":
            obj = Secret(qom_type, ident, _secret_data(props))
        elif qom_type == "tls-creds-x509":
            from blockgraph.objects.tls import TlsCredsX509

            obj = TlsCredsX509.create(ident, props, registry)
        elif qom_type == "tls-creds-psk":
            from blockgraph.objects.tls import check_psk_files

            # Checked as QEMU does, though Python's ssl cannot use PSK credentials.
            check_psk_files(props)
            obj = UserObject(qom_type, ident)
        elif qom_type == "authz-simple":
            obj = AuthzSimple(qom_type, ident, str(props["identity"]))
        elif qom_type == "throttle-group":
            obj = ThrottleGroupObject(qom_type, ident,
                                      _throttle_group(ident, throttle_values, registry))
        elif qom_type == "authz-list":
            rules = tuple(AuthzRule(str(r["match"]), r["policy"] == "allow",
                                    r.get("format") == "glob") for r in props.get("rules", ()))
            obj = AuthzList(qom_type, ident, rules, props.get("policy") == "allow")
        else:
            obj = UserObject(qom_type, ident)
    except ObjectCreationError:
        raise
    except BlockError as exc:
        raise ObjectCreationError(str(exc)) from None
    registry.objects[ident] = obj
    return obj


def _throttle_values(props: Mapping[str, Any]) -> dict[str, int]:
    """A ``throttle-group``'s limits from its properties, applied in the order given: an
    ``x-*`` property sets one value (checked for sign and range only); ``limits`` sets what it
    names and the whole configuration is checked then, as QEMU's setters do."""
    values: dict[str, int] = {}
    for name, value in props.items():
        if name == "limits":
            for key, number in value.items():
                if key.endswith("-max-length") and number > MAX_LENGTH:
                    raise BlockError(f"{key} value must be in the range [0, {MAX_LENGTH}]")
            values.update(value)
            ThrottleLimits(dict(values)).check()
            continue
        key = name[2:]
        if value < 0:
            raise BlockError("Property values cannot be negative")
        if key.endswith("-max-length") and value > MAX_LENGTH:
            # QEMU's text, missing space included.
            raise BlockError(f"{name} value must be in therange [0, {MAX_LENGTH}]")
        values[key] = value
    return values


def _throttle_group(ident: str, values: dict[str, int],
                    registry: ObjectRegistry) -> ThrottleGroup:
    """The group of a new ``throttle-group`` object: its name must be free (anonymous groups of
    ``-drive throttling.group`` count), its configuration valid."""
    if ident in registry.throttle_groups:
        raise BlockError("A group with this name already exists")
    limits = ThrottleLimits(values)
    limits.check()
    group = registry.throttle_groups[ident] = ThrottleGroup(ident, limits)
    return group


def _secret_data(props: Mapping[str, Any]) -> bytes:
    data, path = props.get("data"), props.get("file")
    if data is not None and path is not None:
        raise BlockError("'file' and 'data' are mutually exclusive")
    if data is None and path is None:
        raise BlockError("Either 'file' or 'data' must be provided")
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as exc:
            # QEMU reads it with GLib, whose message quotes the name this way.
            raise BlockError(f"Unable to read {path}: Failed to open file \u201c{path}\u201d: "
                             f"{exc.strerror}") from None
    else:
        raw = str(data).encode()
    if props.get("format") == "base64":
        try:
            return base64.b64decode(raw, validate=False)
        except ValueError:
            raise BlockError("Unable to decode base64 data") from None
    return raw
