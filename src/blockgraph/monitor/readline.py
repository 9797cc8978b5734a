"""The line editor of QEMU's human monitor on a character device, sans I/O.

QEMU does not leave echo to the other end of a monitor socket: its readline takes the client's
bytes one at a time, edits its own line buffer and redraws the changed line with terminal
escapes. A client (socat, nc, a script, a terminal) therefore sees exactly these bytes, and a
script that waits for them needs them to be the same. Observed on qemu-system-x86_64 7.2:

* a redraw moves the cursor back to the start of the line (``ESC [ D`` per column), prints the
  whole buffer and ``ESC [ K`` (erase to the end of line), then moves the cursor to its
  column (``ESC [ C`` / ``ESC [ D``); moving the cursor alone only sends the moves;
* CR and LF each end a line (CR LF is a line and then an empty line), echoed as ``\\n`` (the
  monitor sends every ``\\n`` as CR LF);
* editing keys: backspace (BS, DEL), Ctrl-A / Home, Ctrl-E / End, Ctrl-D / Delete,
  Ctrl-W (the word before the cursor), left and right arrows, up and down arrows (history),
  Ctrl-L (clear the screen, redraw prompt and line); other control bytes do nothing;
* bytes from 32 up, UTF-8 included, are inserted one byte at a time.

Tab completion is not provided: a tab does nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_LEFT = b"\x1b[D"
_RIGHT = b"\x1b[C"
_ERASE_EOL = b"\x1b[K"
_CLEAR_SCREEN = b"\x1b[2J\x1b[1;1H"

# QEMU keeps this many lines of history; the oldest goes first.
HISTORY_SIZE = 64

_NORMAL, _ESC, _CSI, _SS3 = range(4)


@dataclass
class Readline:
    """One monitor client's line editor.

    :meth:`feed` takes the client's bytes and returns what to send back and the lines that
    were completed, in order; the caller runs each line and then calls :meth:`prompt`.
    """

    prompt_text: bytes = b"(qemu) "
    history: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._buf = bytearray()
        self._index = 0
        # What the client's screen shows now: QEMU redraws only when the buffer changed.
        self._shown = b""
        self._shown_index = 0
        self._state = _NORMAL
        self._param = 0
        self._hist_entry = -1  # -1: not browsing the history

    def prompt(self) -> bytes:
        """The prompt, for a new line (after the greeting and after each command)."""
        self._shown = b""
        self._shown_index = 0
        return self.prompt_text

    def feed_byte(self, ch: int) -> tuple[bytes, bytes | None]:
        """Handle one byte: (bytes to send, the completed line or None)."""
        if self._state == _ESC:
            self._state = _NORMAL
            if ch == ord("["):
                self._state, self._param = _CSI, 0
            elif ch == ord("O"):
                self._state = _SS3
            return b"", None
        if self._state == _CSI:
            if ord("0") <= ch <= ord("9"):
                self._param = self._param * 10 + ch - ord("0")
                return b"", None
            self._state = _NORMAL
            if ch in (ord("A"), ord("F")):
                self._history_up()
            elif ch in (ord("B"), ord("E")):
                self._history_down()
            elif ch == ord("D"):
                self._index = max(0, self._index - 1)
            elif ch == ord("C"):
                self._index = min(len(self._buf), self._index + 1)
            elif ch == ord("~"):
                if self._param == 1:
                    self._index = 0
                elif self._param == 3:
                    self._delete()
                elif self._param == 4:
                    self._index = len(self._buf)
            return self._update(), None
        if self._state == _SS3:
            self._state = _NORMAL
            if ch == ord("H"):
                self._index = 0
            elif ch == ord("F"):
                self._index = len(self._buf)
            return self._update(), None
        if ch in (10, 13):
            line = bytes(self._buf)
            self._add_history(line)
            self._buf.clear()
            self._index = 0
            self._shown = b""
            self._shown_index = 0
            return b"\n", line
        if ch == 27:
            self._state = _ESC
            return b"", None
        if ch == 155:
            self._state, self._param = _CSI, 0
            return b"", None
        if ch == 12:
            self._shown = b""
            self._shown_index = 0
            return _CLEAR_SCREEN + self.prompt_text + self._update(), None
        if ch == 1:
            self._index = 0
        elif ch == 5:
            self._index = len(self._buf)
        elif ch == 4:
            self._delete()
        elif ch == 23:
            self._delete_word()
        elif ch in (8, 127):
            if self._index > 0:
                del self._buf[self._index - 1]
                self._index -= 1
        elif ch >= 32:
            self._buf.insert(self._index, ch)
            self._index += 1
        return self._update(), None

    def feed(self, data: bytes) -> list[tuple[bytes, bytes | None]]:
        """:meth:`feed_byte` for each byte of ``data``."""
        return [self.feed_byte(ch) for ch in data]

    # -- editing ------------------------------------------------------------------------------

    def _delete(self) -> None:
        if self._index < len(self._buf):
            del self._buf[self._index]

    def _delete_word(self) -> None:
        # Back over spaces, then over the word before them.
        start = self._index
        while start > 0 and self._buf[start - 1] == 0x20:
            start -= 1
        while start > 0 and self._buf[start - 1] != 0x20:
            start -= 1
        del self._buf[start : self._index]
        self._index = start

    def _add_history(self, line: bytes) -> None:
        self._hist_entry = -1
        if not line:
            return
        if line in self.history:
            # A repeated line moves to the newest place instead of being stored twice.
            self.history.remove(line)
        elif len(self.history) >= HISTORY_SIZE:
            del self.history[0]
        self.history.append(line)

    def _history_up(self) -> None:
        if self._hist_entry == 0 or not self.history:
            return
        self._hist_entry = len(self.history) - 1 if self._hist_entry < 0 else self._hist_entry - 1
        self._load(self.history[self._hist_entry])

    def _history_down(self) -> None:
        if self._hist_entry < 0:
            return
        if self._hist_entry + 1 < len(self.history):
            self._hist_entry += 1
            self._load(self.history[self._hist_entry])
        else:
            self._hist_entry = -1
            self._load(b"")

    def _load(self, line: bytes) -> None:
        self._buf[:] = line
        self._index = len(line)

    # -- drawing ------------------------------------------------------------------------------

    def _update(self) -> bytes:
        out = bytearray()
        if bytes(self._buf) != self._shown:
            out += _LEFT * self._shown_index
            out += self._buf
            out += _ERASE_EOL
            self._shown = bytes(self._buf)
            self._shown_index = len(self._buf)
        delta = self._index - self._shown_index
        out += (_RIGHT * delta) if delta > 0 else (_LEFT * -delta)
        self._shown_index = self._index
        return bytes(out)
