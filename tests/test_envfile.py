"""Environment files: read only regular files of bounded size, parse as systemd does, never echo contents."""
from __future__ import annotations

import functools
import os
import re
import socket
import subprocess
import tempfile
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from activator.envfile import parse_environment_file, read_environment_file

from conftest import require

# systemd's own parser (parse_env_file_internal), as used for environment.d: it prints what it read.
GENERATOR = "/usr/lib/systemd/user-environment-generators/30-systemd-environment-d-generator"

ERROR_TEMPLATES = re.compile(
    r"line \d+: (expected NAME=VALUE|NUL byte|unterminated (single|double) quote|invalid UTF-8 in the (name|value)"
    r"|invalid variable name \(letters, digits and _, not starting with a digit\)"
    r"|'export' is not allowed in an environment file \(systemd ignores such a line\))"
)


def bounded(fn, timeout: float = 5.0):
    """fn() in a thread; a hang fails the test instead of hanging it (the thread is left behind)."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(_outcome(fn)), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still running after {timeout}s"
    kind, value = result[0]
    if kind == "raise":
        raise value
    return value


def _outcome(fn):
    try:
        return "return", fn()
    except BaseException as exc:  # noqa: BLE001 - handed to the test thread
        return "raise", exc


# ---------------------------------------------------------------- what may be read
def test_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # no writer: a plain open() would block forever
    with pytest.raises(ValueError, match="^not a regular file$"):
        bounded(lambda: read_environment_file(str(fifo)))


def test_symlink_to_a_fifo_is_refused_at_once(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "env").symlink_to(tmp_path / "fifo")
    with pytest.raises(ValueError, match="^not a regular file$"):
        bounded(lambda: read_environment_file(str(tmp_path / "env")))


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null", "/dev/urandom"])
def test_devices_are_refused(device):
    with pytest.raises(ValueError, match="^not a regular file$"):
        bounded(lambda: read_environment_file(device))


def test_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match="^not a regular file$"):
        read_environment_file(str(tmp_path))


def test_socket_is_refused(tmp_path):
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "sock"))
        with pytest.raises(ValueError, match="^not a regular file$"):
            read_environment_file(str(tmp_path / "sock"))


def test_large_file_is_refused(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(b"A=" + b"x" * (2 << 20) + b"\n")
    with pytest.raises(ValueError, match=r"^larger than 1 MiB$"):
        read_environment_file(str(big))


def test_size_bound_is_exact(tmp_path):
    path = tmp_path / "env"
    path.write_bytes(b"A=" + b"x" * 98)  # 100 bytes
    assert read_environment_file(str(path), max_bytes=100) == {"A": "x" * 98}
    with pytest.raises(ValueError, match=r"^larger than 99 bytes$"):
        read_environment_file(str(path), max_bytes=99)


def test_size_is_bounded_even_when_stat_says_zero():
    # /proc files say st_size 0 whatever they hold: the read itself is bounded.
    with pytest.raises(ValueError, match=r"^larger than 64 bytes$"):
        read_environment_file("/proc/self/status", max_bytes=64)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_environment_file(str(tmp_path / "missing"))


def test_secret_behind_a_symlink_never_appears_in_errors(tmp_path):
    shadow = tmp_path / "shadow"
    shadow.write_text("root:$y$j9T$S3CRETsalt$S3CREThash:19000:0:99999:7:::\nuser pass=hunter2\n")
    shadow.chmod(0o600)
    link = tmp_path / "env"
    link.symlink_to(shadow)
    with pytest.raises(ValueError) as info:
        read_environment_file(str(link))
    assert str(info.value) == "line 1: expected NAME=VALUE"
    shadow.write_text("# fine\nuser pass=hunter2\n")
    with pytest.raises(ValueError) as info:
        read_environment_file(str(link))
    assert str(info.value) == "line 2: invalid variable name (letters, digits and _, not starting with a digit)"


@pytest.mark.parametrize(("data", "message"), [
    (b"A=1\nB=x\0y\n", "line 2: NUL byte"),
    (b"A=1\n# \0 in a comment too\n", "line 2: NUL byte"),
    (b"A=1\nB=caf\xe9\n", "line 2: invalid UTF-8 in the value"),
    (b"\xe9=1\n", "line 1: invalid UTF-8 in the name"),
])
def test_bytes_refused_with_their_line(tmp_path, data, message):
    path = tmp_path / "env"
    path.write_bytes(data)
    with pytest.raises(ValueError) as info:
        read_environment_file(str(path))
    assert str(info.value) == message


def test_invalid_utf8_in_a_comment_is_fine(tmp_path):
    path = tmp_path / "env"
    path.write_bytes(b"# caf\xe9 in Latin-1, only a comment\nA=1\n")
    assert read_environment_file(str(path)) == {"A": "1"}  # as systemd: comments are not checked


def test_a_regular_file_is_read(tmp_path):
    path = tmp_path / "env"
    path.write_text("# settings\nPORT=8080\nGREETING=\"hello world\"\n")
    assert read_environment_file(str(path)) == {"PORT": "8080", "GREETING": "hello world"}


# ---------------------------------------------------------------- syntax, as systemd
ACCEPTED = [
    ("A=1", {"A": "1"}),
    ("A=1\nB=2\n", {"A": "1", "B": "2"}),
    ("  A \t=  1  \t", {"A": "1"}),
    ("A=plain value  \t", {"A": "plain value"}),
    ("A=", {"A": ""}),
    ('A=""', {"A": ""}),
    ("A=1\nA=2", {"A": "2"}),
    ("# comment\n; comment\n   # indented comment\nA=1", {"A": "1"}),
    ("\n\n  \n\t\nA=1\n\n", {"A": "1"}),
    ("A=x # not a comment", {"A": "x # not a comment"}),
    ("A=x;y", {"A": "x;y"}),
    ("A=a=b", {"A": "a=b"}),
    ('A="x y" z', {"A": "x yz"}),  # blanks after a quoted part are skipped
    ("A='it''s'", {"A": "its"}),
    ('A="a"   "b"', {"A": "ab"}),
    ('A=  "q"  ', {"A": "q"}),
    ('A=a"b c"', {"A": 'a"b c"'}),  # quotes inside an unquoted value are plain characters
    ("A=a'b", {"A": "a'b"}),
    ('A="a\\"b\\\\c\\`d\\$e"', {"A": 'a"b\\c`d$e'}),
    ('A="a\\nb\\x"', {"A": "a\\nb\\x"}),  # other backslashes stay inside double quotes
    ("A='a\\nb\\'", {"A": "a\\nb\\"}),  # single quotes: all literal
    ("A=a\\nb\\\\c", {"A": "anb\\c"}),  # unquoted: a backslash keeps the next character as is
    ('A=\\"x\\"', {"A": '"x"'}),
    ("A=a\\ \t ", {"A": "a "}),  # an escaped blank stays, the blanks after it go
    ("A=a\\ ", {"A": "a "}),
    ("A=x \\\n", {"A": "x "}),  # blanks before a continuation stay
    ("A=x \\\n  ", {"A": "x "}),
    ("A=one \\\ntwo", {"A": "one two"}),
    ("A=one\\\n   two", {"A": "one   two"}),  # the continued line keeps its leading blanks
    ("A=one\\\n", {"A": "one"}),
    ("A=x\\", {"A": "x"}),
    ('A="multi\nline"', {"A": "multi\nline"}),
    ("A='multi\nline'", {"A": "multi\nline"}),
    ('A="joined\\\nline"', {"A": "joinedline"}),
    ("A='not\\\njoined'", {"A": "not\\\njoined"}),
    ("A=1\r\nB=2\r\n", {"A": "1", "B": "2"}),
    ("A=1\rB=2", {"A": "1", "B": "2"}),
    ("A=$HOME ${X} `id`", {"A": "$HOME ${X} `id`"}),  # no expansion in EnvironmentFile=
    ("A=café ünïcode", {"A": "café ünïcode"}),
    ("A=x\x0by\x0cz\x85w\u2028v", {"A": "x\x0by\x0cz\x85w\u2028v"}),  # only \n and \r end a line
    ("_a_1=x", {"_a_1": "x"}),
]

# systemd 254 stopped continuing comments with a trailing backslash; the systemd here may be older.
COMMENT_CONTINUATION = [("# comment \\\nA=1", {"A": "1"})]

REJECTED = [
    ("A=1\nnot an assignment", "line 2: expected NAME=VALUE"),
    ("A=1\n\n1A=x", "line 3: invalid variable name"),
    ("A B=x", "line 1: invalid variable name"),
    ("=x", "line 1: invalid variable name"),
    ("\ufeffA=1", "line 1: invalid variable name"),
    ("A-B=1", "line 1: invalid variable name"),
    ("export A=1", "line 1: 'export' is not allowed in an environment file (systemd ignores such a line)"),
    ("A='open\nB=2", "line 1: unterminated single quote"),
    ('A=1\nB="open\nC=2', "line 2: unterminated double quote"),
    ('A="x\\', "line 1: unterminated double quote"),
    ("A=1\r\nB=2\r\nC", "line 3: expected NAME=VALUE"),
    ("A=1\rC", "line 2: expected NAME=VALUE"),
    ("A=1\nB=x\0y", "line 2: NUL byte"),
]


@pytest.mark.parametrize(("text", "expected"), ACCEPTED + COMMENT_CONTINUATION)
def test_accepted(text, expected):
    assert parse_environment_file(text) == expected


@pytest.mark.parametrize(("text", "message"), REJECTED)
def test_rejected_with_the_line_and_without_the_text(text, message):
    with pytest.raises(ValueError) as info:
        parse_environment_file(text)
    assert str(info.value).startswith(message)
    assert ERROR_TEMPLATES.fullmatch(str(info.value))


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_any_bytes_give_variables_or_a_templated_error(data):
    try:
        env = parse_environment_file(data.decode("utf-8", "surrogateescape"))
    except ValueError as exc:
        assert ERROR_TEMPLATES.fullmatch(str(exc)), str(exc)
    else:
        assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) for name in env)
        assert all("\0" not in v for v in env.values())


# ---------------------------------------------------------------- against systemd itself
def systemd_parse(text: str) -> dict[str, str]:
    """What systemd's parser makes of text: the environment.d generator reads it and prints the result."""
    require(GENERATOR)
    with tempfile.TemporaryDirectory() as home:
        os.mkdir(os.path.join(home, "environment.d"))
        with open(os.path.join(home, "environment.d", "zz-test.conf"), "w") as f:
            f.write(text)
        got = _run_generator(home)
    return {k: v for k, v in got.items() if k not in _system_variables()}


@functools.lru_cache(maxsize=None)
def _system_variables() -> frozenset[str]:
    """What the generator prints from the system's own environment.d files, without ours."""
    with tempfile.TemporaryDirectory() as home:
        return frozenset(_run_generator(home))


def _run_generator(home: str) -> dict[str, str]:
    out = subprocess.run([GENERATOR], env={"XDG_CONFIG_HOME": home}, capture_output=True, timeout=10,
                         check=True).stdout
    # One NAME=VALUE a line, VALUE in double quotes when it needs them, with C escapes inside
    # (\n, \t, \177...) and \" \\ \` \$ escaped, as a shell would read it.
    env = {}
    pos = 0
    entry = re.compile(rb'([A-Za-z_][A-Za-z0-9_]*)=("(?:[^"\\]|\\.)*"|[^\n]*)\n', re.DOTALL)
    while pos < len(out):
        m = entry.match(out, pos)
        assert m, f"unexpected generator output at {pos}: {out[pos:pos + 80]!r}"
        value = m.group(2)
        if value.startswith(b'"'):
            value = re.sub(rb"\\([0-7]{3}|x[0-9a-fA-F]{2}|.)", _c_unescape, value[1:-1], flags=re.DOTALL)
        env[m.group(1).decode()] = value.decode()
        pos = m.end()
    return env


def _c_unescape(m: re.Match) -> bytes:
    code = m.group(1)
    if code[:1].isdigit():
        return bytes([int(code, 8)])
    if code[:1] == b"x":
        return bytes([int(code[1:], 16)])
    return {b"a": b"\a", b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}.get(code, code)


def comparable(env: dict[str, str]) -> dict[str, str]:
    # The generator drops empty values (EnvironmentFile= keeps them): compare the others.
    return {k: v for k, v in env.items() if v}


@pytest.mark.parametrize(("text", "expected"), [case for case in ACCEPTED if "$" not in case[0]])
def test_accepted_table_matches_systemd(text, expected):
    """(Without $: the environment.d generator expands $VAR, EnvironmentFile= does not.)"""
    assert systemd_parse(text) == comparable(expected)


@functools.lru_cache(maxsize=None)
def systemd_continues_comments() -> bool:
    out = subprocess.run(["systemctl", "--version"], capture_output=True, text=True, check=True).stdout
    version = re.match(r"systemd (\d+)", out)
    assert version, out
    return int(version.group(1)) < 254


NAMES = st.sampled_from(["KA", "KB", "K_C"])
BLANKS = st.sampled_from(["", " ", "\t", "  "])
VALUE_PARTS = st.sampled_from(["x", "y z", " ", "\t", "'", '"', "\\", "\n", "\r", "#", ";", "=", "é", "`",
                               "\\\n", "\\ ", '\\"', "\\\\", "\\`", "\\x"])
PARTS = st.lists(VALUE_PARTS, max_size=6).map("".join)
QUOTED = st.one_of(PARTS.map(lambda s: f'"{s}"'), PARTS.map(lambda s: f"'{s}'"))
VALUES = st.lists(st.one_of(VALUE_PARTS, QUOTED), max_size=6).map("".join)
ASSIGNMENTS = st.builds(lambda b1, n, b2, v: f"{b1}{n}{b2}={v}", BLANKS, NAMES, BLANKS, VALUES)
COMMENTS = st.builds(lambda b, c, rest: f"{b}{c}{rest}", BLANKS, st.sampled_from("#;"), VALUES)
LINES = st.lists(st.one_of(ASSIGNMENTS, ASSIGNMENTS, COMMENTS, BLANKS), min_size=1, max_size=5)
FILES = st.builds(lambda lines, nl: nl.join(lines), LINES, st.sampled_from(["\n", "\r\n", "\r"]))


@given(FILES)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_parser_agrees_with_systemd_on_what_it_accepts(text):
    if systemd_continues_comments() and re.search(r"[#;][^\n\r]*\\[\n\r]", text):
        return  # systemd < 254 continues a comment with a trailing backslash; we follow 254 and later
    try:
        ours = parse_environment_file(text)
    except ValueError:
        return  # stricter than systemd on purpose (see activator/envfile.py)
    empty = {k for k, v in ours.items() if not v}
    assert {k: v for k, v in systemd_parse(text).items() if k not in empty} == comparable(ours)
