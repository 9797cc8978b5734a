"""The QMP server protocol, sans I/O: bytes in, commands out, bytes out.

:class:`QMPConnection` is one client session. Feed it what the client sent with
:meth:`~QMPConnection.receive_data`; it returns events: a :class:`Command` to execute, or a
:class:`Reply` it answered itself (a parse error, a malformed request, anything refused by the
capabilities negotiation). Answer a command with :meth:`~QMPConnection.send_return` or
:meth:`~QMPConnection.send_error`; send events with :meth:`~QMPConnection.send_event`. Every
``send_*`` returns the exact bytes to write, ``\\r\\n``-terminated, as QEMU 7.2 writes them.

Rules (QEMU 7.2, observed on qemu-storage-daemon and qemu-system-x86_64):

* the session starts in capabilities negotiation: only ``qmp_capabilities`` runs; any other
  command is refused with ``CommandNotFound`` ``Expecting capabilities negotiation with
  'qmp_capabilities'`` and no events are sent;
* ``qmp_capabilities`` enters command mode (``enable: ["oob"]`` allows ``exec-oob``); a second
  one is refused with ``CommandNotFound`` ``Capabilities negotiation is already complete,
  command ignored``;
* a request is checked in this order: JSON syntax (no ``id`` in the reply), JSON object
  (``QMP input must be a JSON object``, no ``id``), its members in QEMU's member order
  (``execute``/``exec-oob`` strings, ``arguments`` an object, nothing else), exactly one of
  ``execute``/``exec-oob``; from there on the reply carries ``id`` if the request had one
  (``null`` included), verbatim;
* no command of QEMU 7.2's storage daemon supports out-of-band execution.

Every state change of a session happens in :meth:`QMPConnection._transition`, by the table
``TRANSITIONS``.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field

from blockgraph.monitor.qmp.encode import encode, qdict_order
from blockgraph.monitor.qmp.jsonstream import JSONStream
from blockgraph.version import BLOCKGRAPH_VERSION, QEMU_VERSION

__all__ = ["QMPConnection", "Command", "Reply", "State", "StateError", "version_info",
           "CAPABILITIES"]

CAPABILITIES = ("oob",)
NEGOTIATION_REQUIRED = "Expecting capabilities negotiation with 'qmp_capabilities'"
NEGOTIATION_DONE = "Capabilities negotiation is already complete, command ignored"


class State(enum.Enum):
    NEGOTIATION = "negotiation"
    COMMAND = "command"
    CLOSED = "closed"


class Transition(enum.Enum):
    CAPABILITIES = "qmp_capabilities"
    CLOSE = "close"


TRANSITIONS: dict[tuple[State, Transition], State] = {
    (State.NEGOTIATION, Transition.CAPABILITIES): State.COMMAND,
    (State.NEGOTIATION, Transition.CLOSE): State.CLOSED,
    (State.COMMAND, Transition.CLOSE): State.CLOSED,
    (State.CLOSED, Transition.CLOSE): State.CLOSED,
}


class StateError(Exception):
    """An operation needs the session in another state.

    :param state: the state the session is in.
    :param required: the state the operation needs.
    """

    def __init__(self, state: State, required: State) -> None:
        super().__init__(f"QMP session is {state.value}, operation needs {required.value}")
        self.state = state
        self.required = required


@dataclass(frozen=True)
class Command:
    """A well-formed request for the dispatcher.

    :param name: the command name.
    :param arguments: the ``arguments`` object (empty if absent).
    :param id: the request's ``id`` (meaningful only if ``has_id``).
    :param oob: sent with ``exec-oob``.
    """

    name: str
    arguments: dict[str, object] = field(default_factory=dict)
    id: object = None
    has_id: bool = False
    oob: bool = False


@dataclass(frozen=True)
class Reply:
    """A request the protocol answered by itself; write ``data`` to the client."""

    data: bytes


Event = Command | Reply


def version_info(package: str | None = None) -> dict[str, object]:
    """``query-version``'s return value (and the greeting's ``version``)."""
    major, minor, micro = QEMU_VERSION
    return {"qemu": {"major": major, "minor": minor, "micro": micro},
            "package": package if package is not None else f"blockgraph {BLOCKGRAPH_VERSION}"}


def _line(value: object, pretty: bool = False) -> bytes:
    text = encode(value, pretty=pretty) + "\n"
    return text.replace("\n", "\r\n").encode("ascii")


def error_object(error_class: str, desc: str) -> dict[str, object]:
    return {"class": error_class, "desc": desc}


class QMPConnection:
    """One QMP session, server side.

    :param known_commands: the names the dispatcher knows (for ``CommandNotFound`` and the
        out-of-band check, which come before argument checking).
    :param package: the ``package`` string of the greeting and ``query-version``.
    :param clock: wall-clock time for event timestamps (tests pass a fixed one).
    :param pretty: write every message pretty-printed (the monitor's ``pretty=on``).
    """

    def __init__(
        self,
        known_commands: Container[str] = (),
        *,
        package: str | None = None,
        clock: Callable[[], float] = time.time,
        pretty: bool = False,
    ) -> None:
        self.pretty = pretty
        self.state = State.NEGOTIATION
        self.oob_enabled = False
        self._known = known_commands
        self._package = package
        self._clock = clock
        self._stream = JSONStream()

    # -- state ----------------------------------------------------------------------------------

    def _transition(self, event: Transition) -> None:
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            raise StateError(self.state, State.NEGOTIATION)
        self.state = new

    def close(self) -> None:
        """End the session: nothing more is parsed or sent."""
        self._transition(Transition.CLOSE)

    # -- output ---------------------------------------------------------------------------------

    def greeting(self) -> bytes:
        """The banner the server sends as soon as a client connects."""
        return _line({"QMP": {"version": version_info(self._package),
                              "capabilities": list(CAPABILITIES)}}, self.pretty)

    def send_return(self, command: Command, value: object) -> bytes:
        """The success reply to ``command`` (``value`` is ``{}`` for commands without data)."""
        reply: dict[str, object] = {"return": value}
        if command.has_id:
            reply["id"] = command.id
        return self._out(reply)

    def send_error(self, command: Command | None, error_class: str, desc: str) -> bytes:
        """The error reply to ``command`` (``None``: a request whose ``id`` is unknown)."""
        return self._out(self._error(command is not None and command.has_id,
                                     command.id if command else None, error_class, desc))

    def send_event(self, name: str, data: dict[str, object] | None = None,
                   timestamp: float | None = None) -> bytes:
        """An event; ``b""`` while negotiating (QEMU sends events in command mode only)."""
        if self.state is not State.COMMAND:
            return b""
        now = self._clock() if timestamp is None else timestamp
        seconds = int(now)
        event: dict[str, object] = {
            "timestamp": {"seconds": seconds, "microseconds": int(round((now - seconds) * 1e6)) % 1000000},
            "event": name,
        }
        if data is not None:
            event["data"] = data
        return self._out(event)

    def _out(self, message: dict[str, object]) -> bytes:
        if self.state is State.CLOSED:
            return b""
        return _line(message, self.pretty)

    @staticmethod
    def _error(has_id: bool, ident: object, error_class: str, desc: str) -> dict[str, object]:
        reply: dict[str, object] = {"error": error_object(error_class, desc)}
        if has_id:
            reply["id"] = ident
        return reply

    # -- input ----------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Take bytes from the client; return the events they completed, in order.

        :raise StateError: the session is closed.
        """
        if self.state is State.CLOSED:
            raise StateError(self.state, State.COMMAND)
        events: list[Event] = []
        for message in self._stream.feed(data):
            if message.error is not None:
                events.append(Reply(_line(self._error(False, None, "GenericError", message.error),
                                          self.pretty)))
            else:
                events.append(self._request(message.value))
        return events

    def _request(self, request: object) -> Event:
        if not isinstance(request, dict):
            return Reply(self._out(self._error(False, None, "GenericError",
                                               "QMP input must be a JSON object")))
        has_id = "id" in request
        ident = request.get("id")

        def refuse(error_class: str, desc: str) -> Reply:
            return Reply(self._out(self._error(has_id, ident, error_class, desc)))

        for key in qdict_order(request.keys()):
            value = request[key]
            if key == "execute" or (key == "exec-oob" and self.oob_enabled):
                if not isinstance(value, str):
                    return refuse("GenericError", f"QMP input member '{key}' must be a string")
            elif key == "arguments":
                if not isinstance(value, dict):
                    return refuse("GenericError", "QMP input member 'arguments' must be an object")
            elif key != "id":
                return refuse("GenericError", f"QMP input member '{key}' is unexpected")
        execute = request.get("execute")
        exec_oob = request.get("exec-oob")
        if execute is not None and exec_oob is not None:
            return refuse("GenericError", "QMP input member 'execute' clashes with 'exec-oob'")
        name = execute if execute is not None else exec_oob
        if not isinstance(name, str):
            return refuse("GenericError", "QMP input lacks member 'execute'")
        arguments = request.get("arguments", {})
        assert isinstance(arguments, dict)
        oob = exec_oob is not None
        if self.state is State.NEGOTIATION:
            if name != "qmp_capabilities":
                return refuse("CommandNotFound", NEGOTIATION_REQUIRED)
        elif name != "qmp_capabilities" and name not in self._known:
            return refuse("CommandNotFound", f"The command {name} has not been found")
        if oob:
            return refuse("GenericError", f"The command {name} does not support OOB")
        if name == "qmp_capabilities":
            return self._capabilities(arguments, refuse, has_id, ident)
        return Command(name, arguments, ident, has_id, oob)

    def _capabilities(
        self, arguments: dict[str, object], refuse: Callable[[str, str], Reply],
        has_id: bool, ident: object,
    ) -> Reply:
        enable = arguments.get("enable")
        wanted: list[str] = []
        if "enable" in arguments:
            if not isinstance(enable, list):
                return refuse("GenericError", "Invalid parameter type for 'enable', expected: array")
            for index, capability in enumerate(enable):
                if not isinstance(capability, str):
                    return refuse("GenericError", f"Invalid parameter type for 'enable[{index}]', "
                                                  "expected: string")
                if capability not in CAPABILITIES:
                    # QEMU 7.2 names the member 'null' here (sic).
                    return refuse("GenericError",
                                  f"Parameter 'null' does not accept value '{capability}'")
                wanted.append(capability)
        for key in qdict_order(arguments.keys()):
            if key != "enable":
                return refuse("GenericError", f"Parameter '{key}' is unexpected")
        if self.state is not State.NEGOTIATION:
            return refuse("CommandNotFound", NEGOTIATION_DONE)
        self._transition(Transition.CAPABILITIES)
        self.oob_enabled = "oob" in wanted
        reply: dict[str, object] = {"return": {}}
        if has_id:
            reply["id"] = ident
        return Reply(self._out(reply))
