"""Environment files (systemd's ``EnvironmentFile=``), read without trusting the file.

A unit may name any path: a FIFO (a plain open blocks until a writer comes), ``/dev/zero`` (never
ends), a secret reached through a symlink (``/etc/shadow``). :func:`read_environment_file` opens
it without blocking, accepts only a regular file of bounded size, and its errors say which line
is wrong, never what the line holds: they end up in logs.

The syntax is systemd's (src/basic/env-file.c as of systemd 254, reimplemented here):

* ``NAME=VALUE`` assignments; blanks (space, tab) before and after NAME and before VALUE are
  skipped. ``\\n`` and ``\\r`` both end a line.
* A line whose first non-blank character is ``#`` or ``;`` is a comment, up to the end of that
  line; a backslash at its end does not continue it (it did before systemd 254).
* An unquoted value runs to the end of the line, trailing blanks removed. A backslash drops
  itself and keeps the next character as is (``\\n`` is ``n``, ``\\ `` a kept blank); a
  backslash at the end of a line joins the next one, whose leading blanks are kept. Quotes
  inside an unquoted value are ordinary characters.
* A value may begin with quoted parts: ``'...'`` is taken literally, newlines included;
  ``"..."`` unescapes ``\\"``, ``\\\\``, ``\\``` and ``\\$``, drops a backslash-newline, and
  keeps any other backslash. Blanks between and after quoted parts are skipped, and an unquoted
  rest may follow: ``A="x y" z`` is ``x yz``, ``A='it''s'`` is ``its``.
* No ``$VAR`` expansion, as in systemd's ``EnvironmentFile=``.

Where systemd logs a line and ignores it, activator refuses the file, naming the line: a line
without ``=``, an invalid name (``export NAME=...`` too: systemd takes ``export NAME`` as the name
and ignores the line, so the variable would silently be missing), an unterminated quote (systemd
takes the rest of the file as the value), invalid UTF-8 in a name or value. A NUL byte anywhere
is refused too (systemd refuses such a file as well).
"""
from __future__ import annotations

import os
import stat

from .values import ENV_NAME, lazy_pattern  # ENV_NAME: one definition, systemd's env_name_is_valid()

TYPE_CHECKING = False
if TYPE_CHECKING:
    import re

MAX_BYTES = 1 << 20

_BLANK_LINES_AND_COMMENTS = lazy_pattern(r"(?:[ \t\n\r]+|[#;][^\n\r]*)*")  # a comment starts where a name could
_NAME_PART = lazy_pattern(r"[^=\n\r]*")
_BLANKS = lazy_pattern(r"[ \t]*")
_UNQUOTED_TOKEN = lazy_pattern(r"[^\\\n\r]+|\\[\s\S]?")  # a run of plain characters, or a backslash and what it escapes
_DOUBLE_TOKEN = lazy_pattern(r'[^"\\]+|\\[\s\S]?|"')
_DOUBLE_ESCAPES = '"\\`$'


def read_environment_file(path: str, max_bytes: int = MAX_BYTES) -> dict[str, str]:
    """The variables of the environment file at ``path``.

    OSError when it cannot be opened or read (FileNotFoundError for a missing one: a ``-`` prefix
    may ignore that); ValueError when it is not a regular file, is larger than ``max_bytes``, or
    is not valid (the message names a line number, never the file's contents).
    """
    # stat() first, so that a device is never even opened (opening some has side effects: a tape
    # rewinds on close, a watchdog arms); fstat() of the open descriptor below is what counts,
    # since the path may be replaced in between.
    _check_regular(os.stat(path).st_mode)
    # O_NONBLOCK: should a FIFO be swapped in after the stat(), open() still returns at once.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        _check_regular(st.st_mode)
        # The read is bounded whatever st_size says: the file may grow, /proc files say 0.
        data = b"" if st.st_size > max_bytes else _read_at_most(fd, max_bytes + 1)
    finally:
        os.close(fd)
    if st.st_size > max_bytes or len(data) > max_bytes:
        raise ValueError(f"larger than {_size_text(max_bytes)}")
    # surrogateescape: invalid UTF-8 in a comment is fine (as in systemd); in a name or value it
    # is refused by the parser, which knows the line.
    return parse_environment_file(data.decode("utf-8", "surrogateescape"))


def _check_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise ValueError("not a regular file")


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks = []
    total = 0
    while total < limit:
        chunk = os.read(fd, min(limit - total, 1 << 16))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _size_text(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10} KiB"
    return f"{n} bytes"


def parse_environment_file(text: str) -> dict[str, str]:
    """The variables of an environment file's text (decoded with ``surrogateescape``, or any str).

    ValueError ``line N: problem`` for the first problem; the message never quotes the text.
    """
    nul = text.find("\0")
    if nul >= 0:
        raise ValueError(f"line {_line_of(text, nul)}: NUL byte")
    env: dict[str, str] = {}
    pos = 0
    while True:
        pos = _end(_BLANK_LINES_AND_COMMENTS, text, pos)
        if pos >= len(text):
            return env
        start = pos
        pos = _end(_NAME_PART, text, pos)
        name_part = text[start:pos]
        if pos >= len(text) or text[pos] != "=":
            raise ValueError(f"line {_line_of(text, start)}: expected NAME=VALUE")
        name = name_part.rstrip(" \t")
        _check_name(name, text, start)
        value, pos = _value(text, pos + 1, start)
        if not _valid_utf8(value):
            raise ValueError(f"line {_line_of(text, start)}: invalid UTF-8 in the value")
        env[name] = value


def _check_name(name: str, text: str, start: int) -> None:
    if ENV_NAME.fullmatch(name):
        return
    where = f"line {_line_of(text, start)}"
    words = name.split(None, 1)
    if len(words) == 2 and words[0] == "export" and ENV_NAME.fullmatch(words[1]):
        raise ValueError(f"{where}: 'export' is not allowed in an environment file (systemd ignores such a line)")
    if not _valid_utf8(name):
        raise ValueError(f"{where}: invalid UTF-8 in the name")
    raise ValueError(f"{where}: invalid variable name (letters, digits and _, not starting with a digit)")


def _value(text: str, pos: int, start: int) -> tuple[str, int]:
    """The value that begins at ``pos`` (just after ``=``) and the position after it."""
    parts: list[str] = []
    while True:
        pos = _end(_BLANKS, text, pos)
        if pos >= len(text) or text[pos] in "\n\r":
            return "".join(parts), pos
        if text[pos] == "'":
            end = text.find("'", pos + 1)
            if end < 0:
                raise ValueError(f"line {_line_of(text, start)}: unterminated single quote")
            parts.append(text[pos + 1:end])
            pos = end + 1
        elif text[pos] == '"':
            part, pos = _double_quoted(text, pos + 1, start)
            parts.append(part)
        else:
            part, pos = _unquoted(text, pos)
            parts.append(part)
            return "".join(parts), pos


def _double_quoted(text: str, pos: int, start: int) -> tuple[str, int]:
    parts: list[str] = []
    while True:
        m = _DOUBLE_TOKEN.match(text, pos)
        if m is None or m.group() == "\\":  # the end of the text inside the quotes
            raise ValueError(f"line {_line_of(text, start)}: unterminated double quote")
        token = m.group()
        pos = m.end()
        if token == '"':
            return "".join(parts), pos
        if token[0] != "\\":
            parts.append(token)
        elif token[1] in _DOUBLE_ESCAPES:
            parts.append(token[1])
        elif token[1] != "\n":  # a backslash-newline joins the lines; any other backslash stays
            parts.append(token)


def _unquoted(text: str, pos: int) -> tuple[str, int]:
    parts: list[str] = []
    escaped_last = False
    while pos < len(text) and text[pos] not in "\n\r":
        end = _end(_UNQUOTED_TOKEN, text, pos)
        token, pos = text[pos:end], end
        escaped_last = token[0] == "\\"
        if escaped_last:
            # The escaped character as is; an escaped line end (or the end of the text) vanishes.
            parts.append(token[1:] if token[1:] not in ("\n", "\r") else "")
        else:
            parts.append(token)
    if parts and not escaped_last:
        parts[-1] = parts[-1].rstrip(" \t")  # trailing blanks go, unless escaped
    return "".join(parts), pos


def _end(pattern: re.Pattern[str], text: str, pos: int) -> int:
    """Where a match of ``pattern`` at ``pos`` ends (the callers' patterns cannot fail there)."""
    m = pattern.match(text, pos)
    assert m is not None
    return m.end()


def _valid_utf8(s: str) -> bool:
    """False when ``s`` holds bytes that were not UTF-8 (lone surrogates from surrogateescape)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _line_of(text: str, pos: int) -> int:
    """The line number (from 1) of position ``pos``; \\n, \\r\\n and a lone \\r each end a line."""
    before = text[:pos]
    return before.count("\n") + before.count("\r") - before.count("\r\n") + 1
