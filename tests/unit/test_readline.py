"""The monitor's line editor, sans I/O (the byte-exact comparison with QEMU is in
tests/interop/test_hmp_socket.py)."""

from __future__ import annotations

from blockgraph.monitor.readline import HISTORY_SIZE, Readline


def _type(editor: Readline, data: bytes) -> tuple[bytes, list[bytes]]:
    out = bytearray()
    lines = []
    for echo, line in editor.feed(data):
        out += echo
        if line is not None:
            lines.append(line)
    return bytes(out), lines


def test_redraw_and_cursor_moves() -> None:
    editor = Readline()
    assert _type(editor, b"ab") == (b"a\x1b[K\x1b[Dab\x1b[K", [])
    # Moving the cursor alone sends only the move; an edit redraws from the line's start.
    assert _type(editor, b"\x01") == (b"\x1b[D\x1b[D", [])
    assert _type(editor, b"X") == (b"Xab\x1b[K\x1b[D\x1b[D", [])
    assert _type(editor, b"\n") == (b"\n", [b"Xab"])


def test_cr_and_lf_each_end_a_line() -> None:
    assert _type(Readline(), b"ab\r\n")[1] == [b"ab", b""]


def test_escape_sequences_split_across_feeds() -> None:
    editor = Readline()
    _type(editor, b"ab\x1b")
    assert _type(editor, b"[") == (b"", [])
    assert _type(editor, b"D") == (b"\x1b[D", [])
    assert _type(editor, b"\x1b[3~\n")[1] == [b"a"]


def test_history_keeps_one_copy_and_a_bounded_number() -> None:
    editor = Readline()
    for i in range(HISTORY_SIZE + 5):
        _type(editor, b"cmd%d\n" % i)
    _type(editor, b"cmd10\n")
    assert len(editor.history) == HISTORY_SIZE
    assert editor.history[-1] == b"cmd10" and editor.history.count(b"cmd10") == 1
    assert editor.history[0] == b"cmd5"
    # Up recalls the newest; down past the newest empties the line.
    assert _type(editor, b"\x1b[A")[0] == b"cmd10\x1b[K"
    assert _type(editor, b"\x1b[B\n")[1] == [b""]


def test_ctrl_w_deletes_the_word_before_the_cursor() -> None:
    editor = Readline()
    _type(editor, b"info  block")
    _type(editor, b"\x17")
    assert _type(editor, b"\n")[1] == [b"info  "]


def test_ctrl_l_redraws_prompt_and_line() -> None:
    editor = Readline()
    editor.prompt()
    _type(editor, b"ab\x1b[D")
    assert _type(editor, b"\x0c")[0] == b"\x1b[2J\x1b[1;1H(qemu) ab\x1b[K\x1b[D"
