"""systemd unit files (activator/unitfile.py): syntax, drop-ins, specifiers, ExecStart, the directive table,
the TOML writer, and the real .socket/.service files of Debian packages, parsed and run with real clients."""
from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from activator import config, unitfile
from activator.unitfile import (
    SUPPORTED, UNSUPPORTED, Context, UnitFileError, UnitName, expand_argv, expand_specifiers,
    load_unit_files, parse_command_line, parse_unit_text, to_toml,
)
from conftest import ROOT, connect, free_port, pid_alive, require, wait_for

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

UNITFILES = Path(__file__).resolve().parent / "unitfiles"
EXAMPLES = int(os.environ.get("ACTIVATOR_PROPERTY_EXAMPLES", "300"))
# A long run (ACTIVATOR_PROPERTY_EXAMPLES=10000) must not hit pytest-timeout's 120 s per test.
LONG_ENOUGH = pytest.mark.timeout(max(120, EXAMPLES // 10))
PROPERTY = settings(
    max_examples=EXAMPLES, deadline=None, database=None, derandomize=not os.environ.get("ACTIVATOR_PROPERTY_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


def write_units(root: Path, files: dict[str, str | bytes]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
    return root


def load(root: Path, files: dict[str, str | bytes], **kw) -> unitfile.Loaded:
    return load_unit_files([str(write_units(root, files))], **kw)


def errors_of(paths: list[str], **kw) -> list[str]:
    with pytest.raises(UnitFileError) as info:
        load_unit_files(paths, **kw)
    for line in info.value.messages:
        assert line and "\n" not in line and "Traceback" not in line
    return info.value.messages


def warnings_text(loaded: unitfile.Loaded) -> list[str]:
    return [str(w) for w in loaded.warnings]


def assert_round_trip(document: dict) -> None:
    assert tomllib.loads(to_toml(document)) == document


# ====================================================================== the syntax layer
SYNTAX = [
    ("comments only at line start", "# c\n; c\n[S]\n  # indented comment\nA=1 # kept\nB=2;3\n",
     [("S", "A", "1 # kept"), ("S", "B", "2;3")]),
    ("continuation: the backslash becomes a space", "[S]\nA=a \\\n  b\n", [("S", "A", "a" + " " * 4 + "b")]),
    ("comment lines inside a continuation", "[S]\nA=1 \\\n# skipped\n  ; skipped too\n  2\n",
     [("S", "A", "1" + " " * 4 + "2")]),
    ("an empty line ends a continuation", "[S]\nA=1\\\n\nB=2\n", [("S", "A", "1"), ("S", "B", "2")]),
    ("an even number of backslashes does not continue", "[S]\nA=x\\\\\nB=y\n", [("S", "A", "x\\\\"), ("S", "B", "y")]),
    ("a continuation at the end of the file", "[S]\nA=x \\", [("S", "A", "x")]),
    ("keys and values are stripped", "[S]\n  Key  =  value with  spaces \t\n", [("S", "Key", "value with  spaces")]),
    ("repeated keys and empty assignments are kept in order", "[S]\nA=1\nA=\nA=2\n",
     [("S", "A", "1"), ("S", "A", ""), ("S", "A", "2")]),
    ("CRLF, CR and LF end lines", "[S]\r\nA=1\r\nB=2\rC=3\n", [("S", "A", "1"), ("S", "B", "2"), ("S", "C", "3")]),
    ("a byte order mark is skipped", "\ufeff[S]\nA=1\n", [("S", "A", "1")]),
    ("the first = splits", "[S]\nA=b=c\n", [("S", "A", "b=c")]),
    ("sections", "[A]\nx=1\n[B]\nx=2\n[A]\ny=3\n", [("A", "x", "1"), ("B", "x", "2"), ("A", "y", "3")]),
    ("blank lines and trailing blanks", "\n\n[S]\n\n   \nA=1\n\n", [("S", "A", "1")]),
]


@pytest.mark.parametrize("text,expected", [c[1:] for c in SYNTAX], ids=[c[0] for c in SYNTAX])
def test_syntax(text, expected):
    assignments, warnings = parse_unit_text(text, "x.service")
    assert [(a.section, a.key, a.value) for a in assignments] == expected
    assert warnings == []


def test_a_continued_line_is_reported_at_its_first_line():
    assignments, _ = parse_unit_text("[S]\n\nA=1 \\\n 2 \\\n 3\nB=4\n", "x.service")
    assert [(a.key, a.line) for a in assignments] == [("A", 3), ("B", 6)]


SYNTAX_WARNINGS = [
    ("A=1\n[S]\n", "x.service: line 1: assignment outside of a section: ignored"),
    ("[S]\nfoo\n", "x.service: line 2: missing '=': line ignored"),
    ("[S]\n=x\n", "x.service: line 2: missing key name before '=': line ignored"),
    ("[S]\n.include /etc/other.service\n", "x.service: line 2: missing '=': line ignored"),
]


@pytest.mark.parametrize("text,message", SYNTAX_WARNINGS)
def test_syntax_warnings(text, message):
    assignments, warnings = parse_unit_text(text, "x.service")
    assert assignments == [] and [str(w) for w in warnings] == [message]


SYNTAX_ERRORS = [
    ("[S\nA=1\n", "x.service: line 1: invalid section header '[S'"),
    ('[S"x]\n', "x.service: line 1: bad characters in section header"),
    ("[S\x01]\n", "x.service: line 1: bad characters in section header"),
    ("[S]\nA=1\0\n", "x.service: line 2: contains a NUL byte"),
    ("[S]\nA=" + "x" * (1024 * 1024) + "\n", "x.service: line 2: line too long"),
    ("[S]\nA=" + "x \\\n" * 400_000, "continued line too long"),
]


@pytest.mark.parametrize("text,message", SYNTAX_ERRORS, ids=range(len(SYNTAX_ERRORS)))
def test_syntax_errors(text, message):
    with pytest.raises(UnitFileError) as info:
        parse_unit_text(text, "x.service")
    assert len(info.value.messages) == 1 and message in info.value.messages[0]


# ====================================================================== commands
COMMANDS = [
    ("/bin/echo a  b", [["/bin/echo", "a", "b"]]),
    ("/bin/echo \"a b\" 'c d'", [["/bin/echo", "a b", "c d"]]),
    ('/bin/echo a"b c"d', [["/bin/echo", "ab cd"]]),
    (r'/bin/echo \x41\t\s\101 "\n" "q\"q"', [["/bin/echo", "A\t A", "\n", 'q"q']]),
    (r"/bin/echo \u00e9\U0001F600", [["/bin/echo", "é\U0001F600"]]),
    ('/bin/echo ""', [["/bin/echo", ""]]),
    (r"/bin/echo \;", [["/bin/echo", ";"]]),
    ('/bin/echo ";"', [["/bin/echo", ";"]]),
    ("/bin/echo a; b", [["/bin/echo", "a;", "b"]]),
    ("/bin/echo 1 ; /bin/echo 2 ;", [["/bin/echo", "1"], ["/bin/echo", "2"]]),
    ("; /bin/true", [["/bin/true"]]),
    ("-/bin/false", [{"argv": ["/bin/false"], "ignore-failure": True}]),
    ("@/bin/sh sh -c x", [{"argv": ["sh", "-c", "x"], "path": "/bin/sh"}]),
    (":/bin/echo $A ${B}", [["/bin/echo", "$A", "${B}"]]),
    ("/bin/echo $A ${B}", [{"argv": ["/bin/echo", "$A", "${B}"], "expand-environment": True}]),
    ("+/bin/id", [{"argv": ["/bin/id"], "privileged": True}]),
    ("!/bin/id", [{"argv": ["/bin/id"], "privileged": True}]),
    ("!!/bin/id", [["/bin/id"]]),  # as on any kernel with ambient capabilities: User= applies
    ("-@:+/bin/x y $Z", [{"argv": ["y", "$Z"], "path": "/bin/x", "ignore-failure": True, "privileged": True}]),
    ("echo hi", [["echo", "hi"]]),  # a bare name is looked up at start
    ("//bin///echo x", [["//bin///echo", "x"]]),
    ("-/bin/x 'open", []),  # broken, but the '-' prefix says to ignore it
    ("-", []),
    ("--/bin/x", []),  # the second - is not a prefix: an invalid path, ignored
    ("/bin/a ; -@/bin/b", [["/bin/a"]]),
]


@pytest.mark.parametrize("value,expected", COMMANDS)
def test_command_lines(value, expected):
    commands, _ = parse_command_line(value, lambda word: word)
    assert [c.to_document() for c in commands] == expected


COMMAND_ERRORS = [
    ('/bin/echo "open', "unbalanced quoting"),
    ("/bin/echo 'x\\", "unbalanced quoting"),
    ("/bin/", "executable path specifies a directory"),
    ("@/bin/sh", "empty executable name or zeroeth argument"),
    ("@@/bin/x a", "neither a valid executable name nor an absolute path"),
    ("..", "neither a valid executable name nor an absolute path"),
    (r"/bin/e\x01cho", "special characters"),
    (r"/bin/echo \xff", "valid UTF-8"),
]


@pytest.mark.parametrize("value,message", COMMAND_ERRORS)
def test_command_line_errors(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_command_line(value, lambda word: word)


def test_unknown_escapes_are_kept_with_a_warning():
    commands, warnings = parse_command_line(r"/bin/echo \q \x4 end\\", lambda word: word)
    assert commands[0].argv == ("/bin/echo", "\\q", "\\x4", "end\\")
    assert warnings == ["unknown escape sequences kept verbatim"] * 2


def test_specifiers_are_resolved_per_word():
    seen = []
    commands, _ = parse_command_line('/bin/%p "a %i"', lambda word: seen.append(word) or word.replace("%i", "x y"))
    assert seen == ["/bin/%p", "a %i"] and commands[0].argv == ("/bin/%p", "a x y")


ENV = {"A": "x  y 'z w' \"q\\\"q\"", "B": "b", "EMPTY": "", "MAINPID": "4242"}
EXPANSIONS = [
    (["$A"], ["x", "y", "z w", 'q"q']),
    (["$UNSET"], []),
    (["$EMPTY"], []),
    (["a${A}b"], ["ax  y 'z w' \"q\\\"q\"b"]),
    (["$$A"], ["$A"]),
    (["${UNSET}"], [""]),
    (["$1"], []),
    (["$"], []),
    (["pre$B"], ["pre$B"]),
    (["${B"], ["${B"]),
    (["${B}${B}", "x$$y${B}", "$$"], ["bb", "x$yb", "$"]),
    (["/bin/kill", "-HUP", "$MAINPID"], ["/bin/kill", "-HUP", "4242"]),
    (["${bad-name}"], [""]),
]


@pytest.mark.parametrize("argv,expected", EXPANSIONS)
def test_expand_argv(argv, expected):
    assert expand_argv(argv, ENV) == expected


# ====================================================================== specifiers
def test_specifiers_of_an_instance(monkeypatch):
    monkeypatch.setenv("TMPDIR", "/scratch")
    ctx = Context(UnitName.parse("foo-bar@a-b\\x2dc.service"), "/etc/units/foo-bar@.service")
    expected = {
        "%i": "a-b\\x2dc", "%I": "a/b-c", "%n": "foo-bar@a-b\\x2dc.service", "%N": "foo-bar@a-b\\x2dc",
        "%p": "foo-bar", "%P": "foo/bar", "%j": "bar", "%J": "bar", "%f": "/a/b-c", "%%": "%", "50%": "50%",
        "%y": os.path.realpath("/etc/units/foo-bar@.service"), "%Y": os.path.dirname(os.path.realpath("/etc/units/x")),
        "%H": socket.gethostname(), "%l": socket.gethostname().split(".")[0], "%v": os.uname().release,
        "%T": "/scratch", "%V": "/scratch", "%U": "0" if os.geteuid() == 0 else str(os.geteuid()),
        "%%i": "%i", "a%%%p": "a%foo-bar",
    }
    for text, value in expected.items():
        assert expand_specifiers(text, ctx) == value, text


def test_specifiers_of_a_plain_unit(monkeypatch):
    monkeypatch.delenv("TMPDIR", raising=False)
    monkeypatch.delenv("TMP", raising=False)
    monkeypatch.delenv("TEMP", raising=False)
    ctx = Context(UnitName.parse("ssh.service"), "/lib/systemd/system/ssh.service")
    assert [expand_specifiers(f"%{c}", ctx) for c in "iIpPjfnNTV"] == \
        ["", "", "ssh", "ssh", "ssh", "/ssh", "ssh.service", "ssh", "/tmp", "/var/tmp"]
    if os.geteuid() == 0:  # activator as root plays systemd's system manager
        assert [expand_specifiers(f"%{c}", ctx) for c in "tSCLEuUgGh"] == \
            ["/run", "/var/lib", "/var/cache", "/var/log", "/etc", "root", "0", "root", "0",
             os.environ.get("HOME") or "/root"]
    if os.uname().machine == "x86_64":
        assert expand_specifiers("%a", ctx) == "x86-64"


@pytest.mark.parametrize("text,message", [("%z", "unknown specifier %z"), ("a%!b", "unknown specifier %!"),
                                          ("%c", "cgroup specifiers")])
def test_bad_specifiers(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        expand_specifiers(text, Context(UnitName.parse("a.service"), "/x/a.service"))


# ====================================================================== files, drop-ins, templates
BASE = {"web-api.socket": "[Socket]\nListenStream=/run/web.sock\nBacklog=1\n",
        "web-api.service": "[Service]\nExecStart=/bin/true\n"}


def test_drop_ins_are_applied_in_file_name_order_across_directories(tmp_path):
    first, second = tmp_path / "etc", tmp_path / "lib"
    write_units(first, {**BASE, "web-api.socket.d/20-x.conf": "[Socket]\nBacklog=20\n",
                        "web-.socket.d/15-dash.conf": "[Socket]\nBacklog=15\nKeepAlive=yes\n",
                        "web-api.socket.d/README": "[Socket]\nBacklog=1000\n",
                        "web-api.socket.d/.hidden.conf": "[Socket]\nBacklog=1001\n"})
    write_units(second, {"web-api.socket.d/10-x.conf": "[Socket]\nBacklog=10\nReusePort=yes\n",
                         "web-api.socket.d/20-x.conf": "[Socket]\nBacklog=99\n",  # masked by etc's 20-x.conf
                         "socket.d/30-every-socket.conf": "[Socket]\nNoDelay=yes\n"})
    loaded = load_unit_files([str(first), str(second)])
    sock = loaded.document["web-api"]["socket"]
    assert sock["backlog"] == 20 and sock["keep-alive"] is True and sock["reuse-port"] is True
    assert sock["no-delay"] is True
    assert loaded.sources["web-api"] == [
        str(first / "web-api.socket"), str(second / "web-api.socket.d/10-x.conf"),
        str(first / "web-.socket.d/15-dash.conf"), str(first / "web-api.socket.d/20-x.conf"),
        str(second / "socket.d/30-every-socket.conf"), str(first / "web-api.service"),
    ]
    assert loaded.origins["web-api"]["socket.backlog"] == f"{first}/web-api.socket.d/20-x.conf: [Socket] Backlog="


def test_a_drop_in_moves_the_socket(tmp_path):
    loaded = load(tmp_path, {**BASE, "web-api.socket.d/port.conf":
                             "[Socket]\nListenStream=\nListenStream=127.0.0.1:8080\nListenStream=[::1]:8080\n"})
    assert loaded.document["web-api"]["socket"]["listen-stream"] == ["127.0.0.1:8080", "[::1]:8080"]


def test_an_empty_listen_resets_every_port_and_the_order_of_kinds_is_kept(tmp_path):
    loaded = load(tmp_path, {**BASE, "web-api.socket": "[Socket]\nListenDatagram=/run/a\nListenStream=/run/b\n"
                                                       "ListenDatagram=\nListenStream=/run/s1\nListenDatagram=/run/d\n"
                                                       "ListenStream=/run/s2\nListenStream=/run/s3\nBacklog=5\n"})
    sockets = loaded.document["web-api"]["socket"]
    assert [list(s.items())[:2] for s in sockets] == [
        [("listen-stream", ["/run/s1"]), ("listen-datagram", ["/run/d"])],
        [("listen-stream", ["/run/s2", "/run/s3"]), ("backlog", 5)]]
    assert all(s["backlog"] == 5 and s["file-descriptor-name"] == "web-api.socket" for s in sockets)
    assert loaded.origins["web-api"]["socket[2].listen-stream"].endswith("web-api.socket: [Socket] ListenStream=")


def test_the_corner_cases_fixture(tmp_path):
    """tests/unitfiles/corners: comments, continuations, resets, drop-ins (type-level too), quoting,
    specifiers and prefixes, in real files."""
    loaded = load_unit_files([str(UNITFILES / "corners")])
    assert loaded.document == {"corner": {
        "description": "Corner cases for corner.service",
        "socket": [
            {"listen-stream": ["127.0.0.1:10000"], "listen-datagram": ["127.0.0.1:10001"], "backlog": 32,
             "no-delay": True, "file-descriptor-name": "corner.socket"},
            {"listen-stream": ["127.0.0.1:10002"], "backlog": 32, "no-delay": True,
             "file-descriptor-name": "corner.socket"}],
        "service": {
            "environment": ["GREETING=hello world", "NAME=corner", "EMPTY="],
            "exec-start": {"argv": ["corner", "-c", 'echo "$$GREETING" A', ";", "${NAME}"], "path": "/bin/sh",
                           "expand-environment": True},
            "exec-start-pre": [{"argv": ["/bin/false"], "ignore-failure": True}, ["/bin/echo", "$NOT_EXPANDED"],
                               {"argv": ["/bin/true"], "privileged": True},
                               {"argv": ["/bin/true"], "privileged": True}, ["/bin/true"]],
            "timeout-start-sec": "5", "timeout-stop-sec": "7"}}}
    assert warnings_text(loaded) == [f"{UNITFILES}/corners/corner.service: [Service] ProtectSystem= not supported: "
                                     "the daemon runs without this sandboxing"]
    argv = expand_argv(loaded.document["corner"]["service"]["exec-start"]["argv"], {"NAME": "corner"})
    assert argv == ["corner", "-c", 'echo "$GREETING" A', ";", "corner"]
    assert_round_trip(loaded.document)


TEMPLATE = {"svc@.socket": "[Socket]\nListenStream=/run/%i.sock\nFileDescriptorName=%p-%i\n",
            "svc@.service": "[Unit]\nDescription=Service for %I\n[Service]\nExecStart=/bin/echo %i %I %n\n"}


def test_an_instance_of_a_template_pair(tmp_path):
    write_units(tmp_path, {**TEMPLATE, "svc@.socket.d/10-t.conf": "[Socket]\nBacklog=10\nKeepAlive=yes\n",
                           "svc@blue.socket.d/10-t.conf": "[Socket]\nBacklog=11\n",  # same name: instance wins
                           "svc@blue.socket.d/20-i.conf": "[Socket]\nNoDelay=yes\n"})
    assert load_unit_files([str(tmp_path)]).document == {}  # templates alone are not units
    loaded = load_unit_files([str(tmp_path / "svc@blue.socket")])
    assert loaded.document == {"svc@blue": {
        "description": "Service for blue",
        "socket": {"listen-stream": ["/run/blue.sock"], "file-descriptor-name": "svc-blue", "backlog": 11,
                   "no-delay": True},
        "service": {"exec-start": ["/bin/echo", "blue", "blue", "svc@blue.service"]}}}


def test_an_instance_linked_in_the_directory(tmp_path):
    write_units(tmp_path, TEMPLATE)
    (tmp_path / "svc@red.socket").symlink_to("svc@.socket")
    (tmp_path / "alias.socket").symlink_to("svc@red.socket")  # an alias is not a unit of its own
    assert list(load_unit_files([str(tmp_path)]).document) == ["svc@red"]


def test_accept_yes_uses_the_template_service(tmp_path):
    loaded = load(tmp_path, {"echo.socket": "[Socket]\nListenStream=127.0.0.1:7\nAccept=yes\n",
                             "echo@.service": "[Service]\nExecStart=/bin/cat %p\nStandardInput=socket\n",
                             "echo.service": "[Service]\nExecStart=/bin/false\n"})
    assert loaded.document == {"echo": {"socket": {"listen-stream": ["127.0.0.1:7"], "accept": True},
                                        "service": {"exec-start": ["/bin/cat", "echo"], "standard-input": "socket"}}}
    assert warnings_text(loaded) == [f"{tmp_path}/echo.service: no socket unit activates this service: not loaded"]


def test_accept_yes_instance_specifiers_are_reported(tmp_path):
    loaded = load(tmp_path, {"echo.socket": "[Socket]\nListenStream=127.0.0.1:7\nAccept=yes\n",
                             "echo@.service": "[Service]\nExecStart=/bin/echo %i\n"})
    assert loaded.document["echo"]["service"]["exec-start"] == ["/bin/echo", ""]
    assert warnings_text(loaded) == [
        f"{tmp_path}/echo@.service: [Service] ExecStart= not supported with %i: an Accept=yes service is named "
        "after each connection in systemd; activator expands it with an empty instance (the peer is in "
        "$REMOTE_ADDR and $REMOTE_PORT)"]


def test_service_names_the_service_and_sockets_join(tmp_path):
    write_units(tmp_path, {"front.socket": "[Socket]\nListenStream=/run/front\nService=back.service\n",
                           "back.service": "[Service]\nExecStart=/bin/true\nSockets=extra.socket\n",
                           "extra.socket": "[Socket]\nListenStream=/run/extra\nFileDescriptorName=x\n"})
    loaded = load_unit_files([str(tmp_path / "front.socket")])
    assert loaded.document == {"back": {"socket": [
        {"listen-stream": ["/run/front"], "file-descriptor-name": "front.socket"},
        {"listen-stream": ["/run/extra"], "file-descriptor-name": "x"}],
        "service": {"exec-start": ["/bin/true"]}}}


def test_dependencies_among_loaded_units(tmp_path):
    loaded = load(tmp_path, {
        "db.socket": "[Socket]\nListenStream=/run/db\n", "db.service": "[Service]\nExecStart=/bin/db\n",
        "web.socket": "[Socket]\nListenStream=/run/web\n[Unit]\nAfter=db.socket\n",
        "web.service": "[Unit]\nRequires=db.service web.socket\nAfter=db.service network.target auditd.service\n"
                       "Wants=db.socket\nBindsTo=db.service\nRequires=missing.service\nRequisite=basic.target\n"
                       "[Service]\nExecStart=/bin/web\n"})
    unit = loaded.document["web"]
    assert unit["requires"] == ["db"] and unit["after"] == ["db"] and unit["wants"] == ["db"]
    path = f"{tmp_path}/web.service"
    assert sorted(warnings_text(loaded)) == [
        f"{path}: [Unit] BindsTo= not supported (db.service): not enforced: only Requires=, Wants=, After= and "
        "Before= among the loaded units are",
        f"{path}: [Unit] Requires= not supported (missing.service is not among the loaded units): ignored, where "
        "systemd would not start without it",
        f"{tmp_path}/web.socket: [Unit] After= not supported (db.socket): every socket is opened at start, "
        "all together"]


def test_masked_units(tmp_path):
    first, second = tmp_path / "etc", tmp_path / "lib"
    write_units(second, BASE)
    first.mkdir()
    (first / "web-api.socket").symlink_to("/dev/null")
    assert load_unit_files([str(first), str(second)]).document == {}
    messages = errors_of([str(first / "web-api.socket"), str(second)])
    assert messages == [f"{first}/web-api.socket: unit web-api.socket is masked (an empty file or a link to /dev/null)"]


def test_standalone_services_are_noted_and_named_ones_refused(tmp_path):
    write_units(tmp_path, {"lonely.service": "[Service]\nExecStart=/bin/true\n"})
    assert warnings_text(load_unit_files([str(tmp_path)])) == \
        [f"{tmp_path}/lonely.service: no socket unit activates this service: not loaded"]
    assert errors_of([str(tmp_path / "lonely.service")]) == [
        f"{tmp_path}/lonely.service: no socket unit activates this service (activator starts services through "
        "their sockets only)"]


def test_conditions_reset_together(tmp_path):
    loaded = load(tmp_path, {**BASE, "web-api.service": "[Unit]\nConditionPathExists=/a\nConditionVirtualization=vm\n"
                                                        "AssertPathExists=/b\nConditionFileNotEmpty=\n"
                                                        "ConditionPathIsDirectory=|/c\n[Service]\nExecStart=/x\n"})
    unit = loaded.document["web-api"]
    assert unit["condition-path-is-directory"] == ["|/c"] and unit["assert-path-exists"] == ["/b"]
    assert "condition-path-exists" not in unit and warnings_text(loaded) == []


# ====================================================================== errors: one line each, nothing else
def test_file_errors(tmp_path):
    cases = {
        "utf8.socket": b"[Socket]\nListenStream=\xff\n",
        "nul.socket": b"[Socket]\nListenStream=/x\0\n",
        "big.socket": b"# " + b"x" * (4 * 1024 * 1024) + b"\n",
        "header.socket": b"[Socket\n",
    }
    write_units(tmp_path, cases)
    os.mkfifo(tmp_path / "fifo.socket")  # must not hang: opened without blocking and refused
    (tmp_path / "loop.socket").symlink_to("loop.socket")
    messages = errors_of([str(tmp_path), str(tmp_path / "nothere.socket"), str(tmp_path / "x.target")])
    p = str(tmp_path)
    assert messages == [
        f"{p}/nothere.socket: no such file",
        f"{p}/x.target: not a .socket or .service unit file",
        f"{p}/big.socket: too large (more than 4 MiB)",
        f"{p}/fifo.socket: not a regular file",
        f"{p}/header.socket: line 1: invalid section header '[Socket'",
        f"{p}/loop.socket: cannot read: Too many levels of symbolic links",
        f"{p}/nul.socket: line 2: contains a NUL byte",
        f"{p}/utf8.socket: line 2: not valid UTF-8",
    ]


def test_value_errors_name_the_directive(tmp_path):
    messages = errors_of([str(write_units(tmp_path, {
        "a.socket": "[Socket]\nListenStream=/run/%z\nService=not-a-service.target\n",
        "b.socket": "[Socket]\nListenStream=/run/b\nAccept=yes\nService=b.service\n",
        "c.socket": "[Socket]\nListenStream=/run/c\n",
        "c.service": "[Service]\nExecStart=/bin/a\nExecStart=/bin/b\nExecStartPre='/bin/x\n",
        "d.socket": "[Socket]\nListenStream=/run/d\n",
        "e.socket": "[Socket]\nListenStream=/run/%z\nFileDescriptorName=%b%\n",
        "e.service": "[Service]\nExecStart=/bin/true %i\nUser=%m%x\n",
    }))])
    p = str(tmp_path)
    assert messages == [
        f"{p}/a.socket: [Socket] Service=: not-a-service.target is not a service unit name (nor may it be a template)",
        f"{p}/b.socket: [Socket] Service=: not allowed with Accept=yes (systemd instantiates b@.service per "
        "connection)",
        f"{p}/d.socket: unit d.service not found in {p}",
        f"{p}/c.service: [Service] ExecStart=: 2 commands: only Type=oneshot takes several, and activator does not "
        "run oneshot services",
        f"{p}/c.service: [Service] ExecStartPre=: unbalanced quoting",
        f"{p}/e.service: [Service] User=: unknown specifier %x (write %% for a percent sign)",
        f"{p}/e.socket: [Socket] ListenStream=: unknown specifier %z (write %% for a percent sign)",
    ]


def test_too_many_drop_ins(tmp_path):
    files = {f"web-api.socket.d/{i:04}.conf": "" for i in range(unitfile.MAX_DROPINS + 1)}
    assert errors_of([str(write_units(tmp_path, {**BASE, **files}))]) == \
        [f"web-api.socket: more than {unitfile.MAX_DROPINS} drop-in files"]


def test_strict_turns_warnings_into_errors(tmp_path):
    write_units(tmp_path, {**BASE, "web-api.service": "[Service]\nExecStart=/bin/true\nPrivateTmp=yes\nFoo=1\n"
                                                      "X-Ours=1\n[Timer]\nOnBootSec=1\n"})
    warnings = warnings_text(load_unit_files([str(tmp_path)]))
    assert warnings == [
        f"{tmp_path}/web-api.service: [Service] Foo=: unknown directive: ignored, as systemd does",
        f"{tmp_path}/web-api.service: unknown section [Timer] in a .service unit: ignored",
        f"{tmp_path}/web-api.service: [Service] PrivateTmp= not supported: the daemon runs without this sandboxing",
    ]
    assert errors_of([str(tmp_path)], strict=True) == warnings


def test_unsupported_directives_reset_or_set_to_their_default_are_not_reported(tmp_path):
    loaded = load(tmp_path, {**BASE, "web-api.service": "[Service]\nExecStart=/bin/true\nPrivateTmp=yes\n",
                             "web-api.service.d/x.conf": "[Service]\nPrivateTmp=\nProtectHome=no\nSendSIGKILL=yes\n"
                                                         "MemoryAccounting=false\n"})
    assert warnings_text(loaded) == []


# ====================================================================== every directive, classified
def _classification_value(rule: unitfile.Rule) -> str:
    if rule.kind == UNSUPPORTED:
        return "no" if rule.default and unitfile.systemd_bool(rule.default) else "yes"
    return {"exec": "/bin/true", "env": "A=1", "lines": "/x", "words": "a", "listen": "/run/x", "bool": "yes",
            "int": "5", "type": "simple", "stdout": "null", "stderr": "null", "deps": "x.target"}.get(rule.shape, "x")


CLASSIFIED = [(section, key, rule) for section, rules in unitfile.RULES.items() for key, rule in rules.items()
              if (section, key) not in (("Socket", "Service"), ("Service", "Sockets"))]


@pytest.mark.parametrize("section,key,rule", CLASSIFIED, ids=[f"{s}.{k}" for s, k, _ in CLASSIFIED])
def test_every_directive_is_classified(tmp_path, section, key, rule):
    target = "web-api.socket" if section == "Socket" else "web-api.service"
    files = {"web-api.socket": "[Socket]\n", "web-api.service": "[Service]\n", "web-api@.service": "[Service]\n"}
    value = _classification_value(rule)
    files[target] += f"[{section}]\n{key}={value}\n"
    loaded = load(tmp_path, files)
    unit = loaded.document["web-api"]
    table = unit["socket"] if section == "Socket" else unit["service"]
    mine = [str(w) for w in loaded.warnings if w.key == key]
    if rule.kind == SUPPORTED:
        keys = [k for k in rule.keys if not k.startswith("@")] or [_listen_key(key)]
        where = unit if keys == ["description"] or keys[0].startswith(("condition-", "assert-")) else table
        assert all(k in where for k in keys) and mine == []
    elif rule.kind == UNSUPPORTED:
        assert mine == [f"{tmp_path}/{target}: [{section}] {key}= not supported: {rule.note}"]
    else:  # ignored, and dependencies on units that are not loaded
        assert mine == [] and set(table) <= {"file-descriptor-name"}


def _listen_key(key: str) -> str:
    return {"ListenStream": "listen-stream", "ListenDatagram": "listen-datagram",
            "ListenSequentialPacket": "listen-sequential-packet"}[key]


def test_supported_keys_are_the_settings_models_keys():
    known = {"Socket": set(config.SOCKET_KEYS), "Service": set(config.SERVICE_KEYS),
             "Unit": set(config.UNIT_KEYS) | set(config.SERVICE_KEYS), "Install": set()}
    for section, key, rule in unitfile.directives(SUPPORTED):
        for name in rule.keys:
            assert name.startswith("@") or name in known[section], f"[{section}] {key}= -> {name}"


def test_the_documentation_lists_every_directive():
    text = (ROOT / "docs" / "unit-files.md").read_text()
    rows = {(s, k): c for s, k, c in re.findall(r"^\| `\[(\w+)\] (\w+)=` \| ([\w ]+?) \|", text, re.M)}
    names = {unitfile.SUPPORTED: "supported", unitfile.IGNORED: "ignored", unitfile.UNSUPPORTED: "not supported",
             unitfile.DEPENDENCY: "dependency"}
    expected = {(s, k): names[r.kind] for s, rules in unitfile.RULES.items() for k, r in rules.items()}
    assert rows == expected


# ====================================================================== properties: clean results or clean errors
_unit_piece = st.sampled_from([
    "[Unit]\n", "[Socket]\n", "[Service]\n", "[Install]\n", "[X-A]\n", "[", "]", "\n", "\\\n", "\\", "# c\n", "; c\n",
    "ListenStream=", "ListenDatagram=", "Accept=", "yes", "no", "Service=", "Sockets=", "ExecStart=", "ExecStartPre=",
    "Environment=", "EnvironmentFile=", "Type=", "User=", "Requires=", "After=", "ConditionPathExists=",
    "ProtectSystem=", "Backlog=", "/bin/true", "127.0.0.1:8", "/run/x", " ", "\t", "=", "\"", "'", "%", "%i", "%z",
    "%t", "%%", "$X", "${X}", "-", "@", ":", "+", "!", ";", "\\;", "\\x41", "\\u00e9", "\\q", "a.service",
    "x.socket", "a@.service", "\r", "\ufeff", "é", "\x00", "\x7f",
])
_directive = st.sampled_from(sorted({key for rules in unitfile.RULES.values() for key in rules}))
_line = st.tuples(st.sampled_from(["", "[Unit]\n", "[Socket]\n", "[Service]\n"]), _directive,
                  st.lists(_unit_piece, max_size=6).map("".join)).map(lambda t: f"{t[0]}{t[1]}={t[2]}\n")
_unit_text = st.one_of(st.lists(_unit_piece, max_size=40).map("".join), st.text(max_size=300),
                       st.lists(_line, max_size=25).map(lambda lines: "[Socket]\nListenStream=/run/a\n" +
                                                        "".join(lines)))


@LONG_ENOUGH
@PROPERTY
@given(socket_text=_unit_text, service_text=_unit_text, template_text=_unit_text)
def test_property_any_text_gives_a_document_or_one_line_errors(tmp_path_factory, socket_text, service_text,
                                                               template_text):
    root = tmp_path_factory.mktemp("p")
    files = {"a.socket": socket_text, "a.service": service_text, "a@.service": template_text}
    write_units(root, {name: text.encode("utf-8", "surrogatepass") for name, text in files.items()})
    for strict in (False, True):
        try:
            loaded = load_unit_files([str(root)], strict=strict)
        except UnitFileError as exc:
            assert exc.messages and all(m and "\n" not in m for m in exc.messages)
            continue
        assert all("\n" not in str(w) for w in loaded.warnings)
        assert_round_trip(loaded.document)


@LONG_ENOUGH
@PROPERTY
@given(value=st.one_of(st.lists(_unit_piece, max_size=20).map("".join), st.text(max_size=200)))
def test_property_any_command_line_gives_commands_or_a_clean_error(value):
    try:
        commands, warnings = parse_command_line(value, lambda word: word)
    except ValueError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    for command in commands:
        assert command.argv and isinstance(command.to_document(), (list, dict))
    assert expand_argv(commands[0].argv if commands else [], {"X": value}) is not None


_toml_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)


def _table_of(values, size: int):
    # Pairs mapped to a dict rather than st.dictionaries (whose unique keys made hypothesis report flaky draws).
    return st.lists(st.tuples(_toml_text, values), max_size=size).map(dict)


_leaf = st.one_of(_toml_text, st.booleans(), st.integers(-2**63, 2**63 - 1), st.lists(_toml_text, max_size=4))
_inline = st.one_of(_leaf, _table_of(_leaf, 3), st.lists(st.one_of(st.lists(_toml_text, max_size=3),
                                                                   _table_of(_leaf, 3)), max_size=3))
_part = _table_of(_inline, 4)
_unit = st.fixed_dictionaries({"socket": st.one_of(_part, st.lists(_part, min_size=1, max_size=3)),
                               "service": _part}, optional={"description": _toml_text})


@LONG_ENOUGH
@PROPERTY
@given(document=_table_of(_unit, 3))
def test_property_to_toml_round_trips(document):
    assert_round_trip(document)


def test_to_toml_quotes_keys_and_strings():
    document = {"a@b.c": {"description": 'q"\\\b\t\n\f\r\x00\x1f\x7f é \U0001F600', "socket": {},
                          "service": {"exec-start": {"argv": ["x"], "expand-environment": True}, "ü key": []}}}
    text = to_toml(document)
    assert '["a@b.c"]' in text and '"ü key" = []' in text and "\\u0000" in text and "\\u007f" in text
    assert_round_trip(document)


# ====================================================================== Debian's own unit files
@pytest.fixture(scope="session")
def deb_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("debs")


@pytest.fixture
def debian_units(tmp_path, deb_cache):
    """``debian_units(package)``: the package's unit directory, extracted from the .deb that apt-get
    downloads (cached for the session); the repository holds no copy of them."""
    def extract(package: str) -> Path:
        require("apt-get", "dpkg-deb")
        cache = deb_cache / package
        if not cache.exists():
            cache.mkdir()
            result = subprocess.run(["apt-get", "download", "-q", package], cwd=cache, capture_output=True,
                                    text=True, timeout=300)
            if result.returncode != 0:
                shutil.rmtree(cache)
                pytest.fail(f"apt-get download {package} failed: {result.stderr.strip()[-500:]}")
        (deb,) = cache.glob("*.deb")
        root = tmp_path / "deb" / package
        root.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, timeout=120)
        for candidate in ("lib/systemd/system", "usr/lib/systemd/system"):
            if (root / candidate).is_dir():
                return root / candidate
        pytest.fail(f"{package} ships no system units")
    return extract


def test_openssh_server(debian_units):
    units = debian_units("openssh-server")
    loaded = load_unit_files([str(units)])
    # The socket and the service have the same condition: it counts once, for the whole unit.
    assert loaded.document["ssh"]["condition-path-exists"] == ["!/etc/ssh/sshd_not_to_be_run"]
    assert loaded.document["ssh"]["socket"] == {"listen-stream": ["22"], "accept": False,
                                                "file-descriptor-name": "ssh.socket"}
    service = loaded.document["ssh"]["service"]
    assert service["exec-start"] == {"argv": ["/usr/sbin/sshd", "-D", "$SSHD_OPTS"], "expand-environment": True}
    assert service["exec-start-pre"] == [["/usr/sbin/sshd", "-t"]]
    assert service["exec-reload"] == [["/usr/sbin/sshd", "-t"],
                                      {"argv": ["/bin/kill", "-HUP", "$MAINPID"], "expand-environment": True}]
    assert {k: service[k] for k in ("environment-file", "type", "kill-mode", "restart", "restart-prevent-exit-status",
                                    "runtime-directory", "runtime-directory-mode")} == {
        "environment-file": ["-/etc/default/ssh"], "type": "notify", "kill-mode": "process", "restart": "on-failure",
        "restart-prevent-exit-status": ["255"], "runtime-directory": ["sshd"], "runtime-directory-mode": "0755"}
    assert [w for w in loaded.warnings if w.kind != unitfile.NOTE] == []
    assert_round_trip(loaded.document)


def test_podman(debian_units):
    loaded = load_unit_files([str(debian_units("podman"))])
    assert loaded.document["podman"] == {
        "description": "Podman API Service",
        "socket": {"listen-stream": ["/run/podman/podman.sock" if os.geteuid() == 0 else
                                     os.environ.get("XDG_RUNTIME_DIR", "") + "/podman/podman.sock"],
                   "socket-mode": "0660", "file-descriptor-name": "podman.socket"},
        "service": {"start-limit-interval-sec": "0", "type": "exec", "kill-mode": "process",
                    "environment": ["LOGGING=--log-level=info"],
                    "exec-start": {"argv": ["/usr/bin/podman", "$LOGGING", "system", "service"],
                                   "expand-environment": True}}}
    assert expand_argv(loaded.document["podman"]["service"]["exec-start"]["argv"],
                       {"LOGGING": "--log-level=info"}) == ["/usr/bin/podman", "--log-level=info", "system", "service"]
    podman = [str(w) for w in loaded.warnings if "podman.service" in w.path]
    assert podman == [f"{units_path(loaded, 'podman')}/podman.service: [Service] Delegate= not supported: the daemon "
                      "gets no cgroup subtree of its own to manage"]
    assert_round_trip(loaded.document)


def units_path(loaded: unitfile.Loaded, unit: str) -> str:
    return os.path.dirname(loaded.sources[unit][0])


def test_tinysshd_accept_yes_template_pair(debian_units):
    loaded = load_unit_files([str(debian_units("tinysshd"))])
    assert loaded.document["tinysshd"] == {
        "description": "Tiny SSH server", "condition-path-exists": ["!/etc/tinyssh/disable_tinysshd"],
        "socket": {"listen-stream": ["22"], "accept": True},
        "service": {
            "exec-start-pre": [{"argv": ["/usr/sbin/tinysshd-makekey", "-q", "/etc/tinyssh/sshkeydir"],
                                "ignore-failure": True}],
            "environment-file": ["-/etc/default/tinysshd"],
            "exec-start": {"argv": ["/usr/sbin/tinysshd", "${TINYSSHDOPTS}", "--", "/etc/tinyssh/sshkeydir"],
                           "expand-environment": True},
            "kill-mode": "process", "success-exit-status": ["111"], "standard-input": "socket"}}
    assert loaded.warnings == [] and loaded.sources["tinysshd"][-1].endswith("tinysshd@.service")
    assert_round_trip(loaded.document)


def test_systemd_coredump_accept_yes_seqpacket(debian_units):
    loaded = load_unit_files([str(debian_units("systemd-coredump"))])
    unit = loaded.document["systemd-coredump"]
    assert unit["socket"] == {"listen-sequential-packet": ["/run/systemd/coredump"], "socket-mode": "0600",
                              "accept": True, "max-connections": 16}
    assert unit["service"]["exec-start"] == {"argv": ["/lib/systemd/systemd-coredump"], "ignore-failure": True}
    assert {k: unit["service"][k] for k in ("nice", "oom-score-adjust", "state-directory")} == {
        "nice": 9, "oom-score-adjust": 500, "state-directory": ["systemd/coredump"]}
    reported = {w.key for w in loaded.warnings}
    assert {"ProtectSystem", "SystemCallFilter", "PrivateNetwork", "IPAddressDeny", "RuntimeMaxSec",
            "Requires"} <= reported
    assert_round_trip(loaded.document)


@pytest.mark.parametrize("package,unit", [("uuid-runtime", "uuidd"), ("cups-daemon", "cups")])
def test_fully_supported_units_pass_the_settings_model(debian_units, tmp_path, package, unit):
    loaded = load_unit_files([str(debian_units(package))])
    service = loaded.document[unit]["service"]
    if "user" in service:
        try:
            pwd.getpwnam(service["user"])
        except KeyError:
            pytest.skip(f"user {service['user']} exists once {package} is installed")
    path = tmp_path / "units.toml"
    path.write_text(to_toml(loaded.document))
    (built,) = config.load_units([str(path)])
    assert built.name == unit and built.service.argv == service["exec-start"]
    assert [s.name for s in built.sockets] == [f"{unit}.socket"]


# ====================================================================== the keys unit files brought, in TOML
def test_the_new_keys_fill_the_unit(tmp_path):
    path = tmp_path / "u.toml"
    path.write_text("""
[u]
requires = "db"
after = ["db", "db"]
condition-path-exists = ["!/etc/nope", "|/a"]
assert-file-not-empty = "/etc/os-release"
socket.listen-stream = "127.0.0.1:1"
service.exec-start = { argv = ["sshd", "-D", "$OPTS"], path = "/usr/sbin/sshd", expand-environment = true }
service.exec-start-pre = [["/bin/true"], "/bin/echo 'a b'", { argv = ["/bin/false"], ignore-failure = true }]
service.exec-reload = ["/bin/kill", "-HUP", "$MAINPID"]
service.notify-access = "exec"
service.success-exit-status = "111 SIGUSR1"
service.restart-prevent-exit-status = [255, "SIGKILL"]
service.runtime-directory = ["a", "b/c"]
service.runtime-directory-mode = "0750"
service.runtime-directory-preserve = "restart"
service.state-directory = "s"
service.oom-score-adjust = -500
service.nice = 5
service.limit-nofile = "1024:4096"
service.limit-core = "infinity"
service.limit-as = "1G"
service.limit-nice = "-5"
[db]
socket.listen-stream = "127.0.0.1:2"
service.exec-start = "db"
""")
    u, _ = config.load_units([str(path)])
    svc = u.service
    from activator.units import Command, Condition, ExitStatuses
    assert (svc.argv, svc.exec_path, svc.expand_environment, svc.ignore_failure) == (
        ["sshd", "-D", "$OPTS"], "/usr/sbin/sshd", True, False)
    assert svc.main_command.executable == "/usr/sbin/sshd"
    assert svc.exec_start_pre == [Command(("/bin/true",)), Command(("/bin/echo", "a b")),
                                  Command(("/bin/false",), ignore_failure=True)]
    assert svc.exec_reload == [Command(("/bin/kill", "-HUP", "$MAINPID"))]
    assert svc.notify_access == "exec"
    assert svc.success_exit_status == ExitStatuses(frozenset({111}), frozenset({signal.SIGUSR1}))
    assert svc.restart_prevent_exit_status == ExitStatuses(frozenset({255}), frozenset({signal.SIGKILL}))
    assert (svc.runtime_directory, svc.runtime_directory_mode, svc.runtime_directory_preserve) == (
        ["a", "b/c"], 0o750, "restart")
    assert svc.state_directory == ["s"] and svc.state_directory_mode == 0o755
    assert (svc.oom_score_adjust, svc.nice) == (-500, 5)
    assert svc.limits == {7: (1024, 4096), 4: (-1, -1), 9: (1 << 30, 1 << 30), 13: (25, 25)}
    assert u.requires == ["db"] and u.after == ["db"] and u.wants == []
    assert u.conditions == [Condition("path-exists", "/etc/nope", negate=True), Condition("path-exists", "/a",
                                                                                        trigger=True),
                            Condition("file-not-empty", "/etc/os-release", assertion=True)]
    assert [str(c) for c in u.conditions] == ["condition-path-exists=!/etc/nope", "condition-path-exists=|/a",
                                              "assert-file-not-empty=/etc/os-release"]


BAD_VALUES = [
    ('service.exec-start = { path = "/bin/x" }', "service.exec-start: a command table needs argv"),
    ('service.exec-start = { argv = ["x"], shell = true }', "unknown key 'shell' in a command table"),
    ('service.exec-start-pre = [[]]', "empty command"),
    ('service.success-exit-status = 256', "exit code 256 is out of range (0..255)"),
    ('service.restart-prevent-exit-status = "SIGNOPE"', "'SIGNOPE' is neither an exit code nor a signal name"),
    ('service.runtime-directory = "../etc"', "invalid directory '../etc'"),
    ('service.runtime-directory = "/run/x"', "invalid directory '/run/x'"),
    ('service.state-directory = "a//b"', "invalid directory 'a//b'"),
    ('service.runtime-directory-preserve = "sometimes"', "invalid value 'sometimes'"),
    ('service.oom-score-adjust = 1001', "1001 is out of range (-1000..1000)"),
    ('service.nice = -21', "-21 is out of range (-20..19)"),
    ('service.limit-nofile = "10:5"', "the soft limit is above the hard one"),
    ('service.limit-nofile = "lots"', "invalid limit 'lots'"),
    ('service.limit-nofile = -1', "limit -1 is out of range"),
    ('service.limit-nice = "+20"', "a nice level is -20..19"),
    ('service.notify-access = "some"', "invalid value 'some', expected one of: main, exec, all, none"),
    ('condition-path-exists = "relative"', "invalid path 'relative': expected an absolute path"),
    ('requires = "no such"', "invalid unit name 'no such'"),
]


@pytest.mark.parametrize("line,message", BAD_VALUES)
def test_bad_values_of_the_new_keys(tmp_path, line, message):
    path = tmp_path / "u.toml"
    start = "" if line.startswith("service.exec-start =") else 'service.exec-start = "x"\n'
    path.write_text(f'[u]\nsocket.listen-stream = "127.0.0.1:1"\n{start}{line}\n')
    with pytest.raises(config.ConfigError) as info:
        config.load_units([str(path)])
    (error,) = info.value.messages
    assert error.startswith(f"{path}: u: ") and message in error, error


# ====================================================================== serve, check and convert take unit files
def cli(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "activator", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=full)


def drop_in(units: Path, unit: str, text: str, name: str = "test.conf") -> None:
    directory = units / f"{unit}.d"
    directory.mkdir(exist_ok=True)
    (directory / name).write_text(text)


ECHO_PAIR = {"echo.socket": "[Socket]\nListenStream=127.0.0.1:{port}\nAccept=yes\n",
             "echo@.service": "[Unit]\nDescription=Echo\n[Service]\nExecStart=/bin/cat\nStandardInput=socket\n"
                              "PrivateTmp=yes\nNoSuchDirective=1\n"}


def echo_units(root: Path, port: int = 7) -> Path:
    return write_units(root, {name: text.format(port=port) for name, text in ECHO_PAIR.items()})


def test_check_lists_what_it_cannot_honour_one_line_each(tmp_path):
    units = echo_units(tmp_path / "units")
    r = cli("check", units)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "echo: 127.0.0.1:7 -> /bin/cat\n1 unit(s) OK\n"
    assert r.stderr.splitlines() == [
        f"activator: warning: {units}/echo@.service: [Service] NoSuchDirective=: unknown directive: ignored, as "
        "systemd does",
        f"activator: warning: {units}/echo@.service: [Service] PrivateTmp= not supported: the daemon runs without "
        "this sandboxing"]
    strict = cli("check", "--strict", units)
    assert strict.returncode == 1 and strict.stdout == ""
    assert strict.stderr.splitlines() == [line.replace("warning", "error") for line in r.stderr.splitlines()]


def test_settings_model_errors_name_the_file_and_the_directive(tmp_path):
    units = write_units(tmp_path / "units", {
        "port.socket": "[Socket]\nListenStream=127.0.0.1:80\nListenStream=127.0.0.1:99999\n",
        "port.service": "[Service]\nExecStart=/bin/true\n",
        "web.socket": "[Socket]\nListenStream=127.0.0.1:80\nBacklog=lots\nSocketMode=0999\n",
        "web.service": "[Unit]\nDescription=Web\n[Service]\nExecStart=/bin/true\nRestart=sometimes\n"
                       "StandardInput=socket\n"})
    r = cli("check", units)
    assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr
    sock, svc = f"{units}/web.socket", f"{units}/web.service"
    assert r.stderr.splitlines() == [
        f"activator: error: {units}/port.socket: [Socket] ListenStream=: port out of range in address "
        "'127.0.0.1:99999' (1-65535)",
        f"activator: error: {sock}: [Socket] Backlog=: expected an integer, got a string 'lots'",
        f"activator: error: {sock}: [Socket] SocketMode=: invalid mode '0999' (expected octal digits such as "
        '"0660")',
        f"activator: error: {svc}: [Service] Restart=: invalid value 'sometimes', expected one of: no, on-success, "
        "on-failure, on-abnormal, on-abort, always",
        f"activator: error: {svc}: [Service] StandardInput=: 'socket' needs accept = true in the socket part "
        "(one connection per instance)"]


def test_unit_files_and_toml_side_by_side(tmp_path):
    units = echo_units(tmp_path / "units")
    (units / "more.toml").write_text('[more]\nsocket.listen-stream = "127.0.0.1:8"\nservice.exec-start = "cat"\n'
                                     '[echo]\nsocket.listen-stream = "127.0.0.1:9"\nservice.exec-start = "cat"\n')
    r = cli("check", units)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1] == f"activator: error: {units}/echo.socket: echo: unit name already defined " \
                                        f"in {units}/more.toml"
    (units / "more.toml").write_text('[more]\nsocket.listen-stream = "127.0.0.1:8"\nservice.exec-start = "cat"\n')
    r = cli("check", units)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "2 unit(s) OK", r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("check", empty)
    assert r.returncode == 1 and r.stderr == f"activator: error: {empty}: no *.toml files in this directory (nor " \
                                             "*.socket or *.service unit files)\n"


def test_convert_prints_what_serve_runs(tmp_path):
    units = echo_units(tmp_path / "units")
    drop_in(units, "echo.socket", "[Socket]\nBacklog=12\n")
    r = cli("convert", units)
    assert r.returncode == 0 and len(r.stderr.splitlines()) == 2, r.stderr
    assert tomllib.loads(r.stdout) == {"echo": {
        "description": "Echo", "socket": {"listen-stream": ["127.0.0.1:7"], "accept": True, "backlog": 12},
        "service": {"exec-start": ["/bin/cat"], "standard-input": "socket"}}}
    (tmp_path / "echo.toml").write_text(r.stdout)
    assert cli("check", tmp_path / "echo.toml").stdout == cli("check", units).stdout
    bad = cli("convert", units, tmp_path / "echo.toml", tmp_path / "missing.socket")
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.splitlines() == [
        f"activator: error: {tmp_path}/echo.toml: not a systemd unit file (convert reads *.socket and *.service "
        "files and directories of them)",
        f"activator: error: {tmp_path}/missing.socket: no such file"]
    assert cli("convert").returncode == 2


# ====================================================================== running them (real daemons, real clients)
def test_run_the_echo_fixture(activator, tmp_path):
    units = tmp_path / "units"
    shutil.copytree(UNITFILES / "echo", units)
    port = free_port()
    drop_in(units, "echo.socket", f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n")
    a = activator("serve", units)
    a.wait_listening()
    for line in (b"one\n", b"two\n"):
        with connect(("127.0.0.1", port)) as c:
            c.sendall(line)
            c.shutdown(socket.SHUT_WR)
            assert c.recv(100) == line
    assert a.stop() == 0


def test_serve_logs_the_warnings_and_a_reload_reads_the_unit_files_again(activator, tmp_path):
    port, moved = free_port(), free_port()
    units = echo_units(tmp_path / "units", port)
    a = activator("serve", "--log-format", "json", units)
    a.wait_listening()
    warnings = [json.loads(line) for line in a.lines if '"unit-file"' in line]
    assert [(w["level"], w["message"].split(": ", 1)[1]) for w in warnings] == [
        ("warning", "[Service] NoSuchDirective=: unknown directive: ignored, as systemd does"),
        ("warning", "[Service] PrivateTmp= not supported: the daemon runs without this sandboxing")]
    drop_in(units, "echo.socket", f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{moved}\n")
    a.signal(signal.SIGHUP)
    a.wait_log(r'"event":"reload"')
    assert len([line for line in a.lines if '"unit-file"' in line]) == 4  # logged again at the reload
    with connect(("127.0.0.1", moved)) as c:
        c.sendall(b"moved\n")
        c.shutdown(socket.SHUT_WR)
        assert c.recv(100) == b"moved\n"
    wait_for(lambda: not _listening(port), what="the old port closed")
    (units / "echo@.service").write_text("[Service]\nExecStart=/bin/cat\nStandardInput=sockets\n")
    a.signal(signal.SIGHUP)
    failed = a.wait_log(r'"event":"reload".*reload failed')
    assert f"{units}/echo@.service: [Service] StandardInput=: invalid value 'sockets'" in failed.string
    assert _listening(moved)
    assert a.stop() == 0


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def test_run_uuidd(activator, debian_units, tmp_path):
    require("/usr/sbin/uuidd")
    units = debian_units("uuid-runtime")
    request = tmp_path / "request"
    drop_in(units, "uuidd.socket", f"[Socket]\nListenStream=\nListenStream={request}\n")
    a = activator("serve", units)
    a.wait_listening()
    out = subprocess.run(["uuidd", "--random", "--socket", str(request)], capture_output=True, text=True, timeout=30)
    assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}\n", out.stdout), out
    pid = int(a.wait_log(r"started /usr/sbin/uuidd as pid (\d+)").group(1))
    with open(f"/proc/{pid}/status") as f:
        uid = int(re.search(r"^Uid:\s+(\d+)", f.read(), re.M).group(1))
    assert uid == pwd.getpwnam("uuidd").pw_uid  # User=uuidd from the unit
    assert a.stop() == 0


def test_run_sshd(activator, debian_units, tmp_path):
    require("/usr/sbin/sshd", "ssh", "ssh-keygen")
    units = debian_units("openssh-server")
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name)], check=True,
                       timeout=60)
    (tmp_path / "authorized_keys").write_text((tmp_path / "client.pub").read_text())
    port = free_port()
    (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{port} {(tmp_path / 'host.pub').read_text()}")
    # Only drop-ins: the socket on a loopback port, and sshd options (host key, our client's key).
    options = (f"-o HostKey={tmp_path}/host -o AuthorizedKeysFile={tmp_path}/authorized_keys -o StrictModes=no "
               "-o UsePAM=no -o PidFile=none")
    (tmp_path / "sshd.env").write_text(f'SSHD_OPTS="{options}"\n')
    drop_in(units, "ssh.socket", f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n")
    # /run/sshd is every sshd's on this machine: this one must not remove it when it stops.
    drop_in(units, "ssh.service", f"[Service]\nEnvironmentFile={tmp_path}/sshd.env\nRuntimeDirectoryPreserve=yes\n")
    a = activator("serve", "--log-format", "json", units)
    a.wait_listening(timeout=10)
    ssh = ["ssh", "-p", str(port), "-i", str(tmp_path / "client"), "-o", "BatchMode=yes", "-o",
           "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={tmp_path}/known_hosts", "-o", "ConnectTimeout=10",
           "root@127.0.0.1", "echo", "ok"]
    out = subprocess.run(ssh, capture_output=True, text=True, timeout=60)
    assert out.stdout == "ok\n", out.stderr + a.log
    events = [json.loads(line) for line in a.lines]
    assert [e["event"] for e in events if e["event"] in ("exec", "start", "ready")][:2] == ["start", "ready"]
    pid = next(e["pid"] for e in events if e["event"] == "start")
    with open(f"/proc/{pid}/cmdline", "rb") as f:  # sshd shows its argv, $SSHD_OPTS split into words at start
        assert f"sshd -D -o HostKey={tmp_path}/host -o AuthorizedKeysFile=".encode() in f.read()
    assert stat.S_IMODE(os.stat("/run/sshd").st_mode) == 0o755
    again = subprocess.run(ssh, capture_output=True, text=True, timeout=60)  # the same sshd, started once
    assert again.stdout == "ok\n", again.stderr + a.log
    assert len([line for line in a.lines if '"event":"start"' in line]) == 1
    assert a.stop() == 0
    assert not pid_alive(pid)


def test_run_podman(activator, debian_units, tmp_path, request):
    require("/usr/bin/podman", "curl")
    units = debian_units("podman")
    sock = tmp_path / "podman.sock"
    drop_in(units, "podman.socket", f"[Socket]\nListenStream=\nListenStream={sock}\n")
    # Keep podman's storage in a directory of the test's (also through $LOGGING, split into words at start);
    # podman wants a run root of at most 50 characters.
    storage = Path(tempfile.mkdtemp(prefix="activator-podman-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(storage, ignore_errors=True))
    drop_in(units, "podman.service", f'[Service]\nEnvironment="LOGGING=--log-level=info --root={storage}/root '
                                     f'--runroot={storage}/run"\n')
    a = activator("serve", units)
    a.wait_listening(timeout=10)
    out = subprocess.run(["curl", "-sS", "--max-time", "30", "--unix-socket", str(sock),
                          "http://d/v4.0.0/libpod/_ping"], capture_output=True, text=True, timeout=60)
    assert out.stdout == "OK", out.stderr + a.log
    assert a.stop() == 0


def test_run_tinysshd(activator, debian_units, tmp_path, request):
    require("/usr/sbin/tinysshd", "ssh-keyscan", "tinysshd-printkey")
    units = debian_units("tinysshd")
    keydir = Path("/etc/tinyssh/sshkeydir")  # the unit's ExecStartPre= makes the host keys there
    if not keydir.exists():
        request.addfinalizer(lambda: shutil.rmtree(keydir, ignore_errors=True))
    port = free_port()
    drop_in(units, "tinysshd.socket", f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n")
    a = activator("serve", units)
    a.wait_listening(timeout=10)
    # One instance per connection; the key exchange completes, so the host key is the daemon's.
    out = subprocess.run(["ssh-keyscan", "-T", "20", "-t", "ed25519", "-p", str(port), "127.0.0.1"],
                         capture_output=True, text=True, timeout=60)
    key = subprocess.run(["tinysshd-printkey", "/etc/tinyssh/sshkeydir"], capture_output=True, text=True,
                         timeout=30).stdout.split()
    assert out.stdout.split()[1:3] == key[:2], out.stderr
    assert a.stop() == 0


def test_a_template_is_named_only_as_an_instance(tmp_path):
    write_units(tmp_path, TEMPLATE)
    assert errors_of([str(tmp_path / "svc@.socket")]) == [
        f"{tmp_path}/svc@.socket: a template runs only as an instance: name one, such as svc@NAME.socket"]


def test_a_specifier_that_gives_invalid_utf8_is_an_error(tmp_path):
    root = tmp_path / os.fsdecode(b"dir\xff")
    write_units(root, {"a.socket": "[Socket]\nListenStream=%Y/a.sock\n", "a.service": "[Service]\nExecStart=/x\n"})
    (message,) = errors_of([str(root)])
    assert message.endswith("a.socket: [Socket] ListenStream=: specifiers give a value that is not valid UTF-8: "
                            f"{os.path.join(str(root), 'a.sock')!r}")


def test_expand_argv_keeps_undecodable_environment_values():
    value = os.fsdecode(b"a\xff b")  # an environment value that is not UTF-8 (surrogate escapes)
    assert expand_argv(["$V", "x${V}"], {"V": value}) == [os.fsdecode(b"a\xff"), "b", "x" + value]


# ====================================================================== what the engine does with them
def sock(port: int, extra: str = "") -> str:
    """A socket unit on a loopback port."""
    return f"[Socket]\nListenStream=127.0.0.1:{port}\n{extra}"


def unique_name(tmp_path: Path) -> str:
    """A unit name no other test run uses: its directories under /run and /var/lib are its own."""
    return f"activator-t{os.getpid()}-{tmp_path.name[-12:].strip('_').replace('_', '-')}"


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def wait_lines(path: Path, count: int, timeout: float = 15.0) -> list[str]:
    return wait_for(lambda: len(lines_of(path)) >= count and lines_of(path), timeout=timeout,
                    what=f"{count} lines in {path}")


def events(a, name: str) -> list[dict]:
    """The JSON log lines of one event (the daemons' own output, on the same stderr, is left out)."""
    return [e for e in map(json.loads, (line for line in list(a.lines) if line.startswith("{"))) if e["event"] == name]


def test_control_commands_directories_and_variables(activator, tmp_path, request):
    name, port, log = unique_name(tmp_path), free_port(), tmp_path / "log"
    run_dir, state_dir = Path("/run") / name / "sub", Path("/var/lib") / name
    request.addfinalizer(lambda: shutil.rmtree(state_dir, ignore_errors=True))
    request.addfinalizer(lambda: shutil.rmtree(run_dir.parent, ignore_errors=True))
    units = write_units(tmp_path / "units", {
        f"{name}.socket": sock(port),
        f"{name}.service": f"""[Service]
Environment=GREETING=hello "WORDS=a b"
ExecStartPre=/bin/sh -c 'echo "pre1 $$GREETING" >> {log}'
ExecStartPre=-/bin/false
ExecStartPre=-/nonexistent/command
ExecStartPre=/bin/sh -c 'test -d "$RUNTIME_DIRECTORY" && echo "pre2 $$RUNTIME_DIRECTORY" >> {log}'
ExecStart=/bin/sh -c 'echo "main $$1 $$2 $$STATE_DIRECTORY" >> {log}; trap "echo hup >> {log}" HUP; \\
  while :; do sleep 1 & wait; done' sh $WORDS
ExecStartPost=/bin/sh -c 'echo "post $$MAINPID" >> {log}'
ExecReload=/bin/sh -c 'echo "reload $$MAINPID" >> {log}'
ExecReload=/bin/kill -HUP $MAINPID
RuntimeDirectory=%N/sub
RuntimeDirectoryMode=0700
StateDirectory=%N
"""})
    a = activator("serve", "--log-format", "json", "--reload-daemons", units)
    a.wait_listening()
    with connect(("127.0.0.1", port)):
        lines = wait_lines(log, 4)
    a.wait_log(r'"event":"start"')
    pid = events(a, "start")[0]["pid"]
    # exec-start-post runs as soon as a type = simple daemon is started: the two may write in either order.
    assert lines[:2] == ["pre1 hello", f"pre2 {run_dir}"]
    assert sorted(lines[2:]) == [f"main a b {state_dir}", f"post {pid}"]
    assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700 and state_dir.is_dir()
    a.signal(signal.SIGHUP)
    assert wait_lines(log, 6)[4:] == [f"reload {pid}", "hup"]
    assert [e["message"] for e in events(a, "reload-unit")] == ["reloading the daemon (exec-reload)",
                                                                "daemon reloaded"]
    assert a.stop() == 0
    wait_for(lambda: not run_dir.exists(), what="the runtime directory removed")
    assert state_dir.is_dir() and not list(run_dir.parent.glob(".#*"))


def test_a_failing_start_command_fails_the_start_without_a_busy_loop(activator, tmp_path):
    port, log = free_port(), tmp_path / "log"
    units = write_units(tmp_path / "units", {
        "u.socket": sock(port),
        "u.service": f"[Unit]\nStartLimitBurst=3\nStartLimitIntervalSec=30\n[Service]\n"
                     f"ExecStartPre=/bin/sh -c 'echo pre >> {log}; exit 3'\nExecStart=/bin/sh -c 'echo main >> {log}'\n"})
    a = activator("serve", "--log-format", "json", units)
    a.wait_listening()
    with connect(("127.0.0.1", port)):  # stays in the backlog: every re-arm triggers again, until the limit
        a.wait_log(r'"event":"start-limit"')
    failures = events(a, "start-failed")
    assert len(failures) == 3 and lines_of(log) == ["pre"] * 3
    assert failures[0]["message"] == "cannot start: exec-start-pre: /bin/sh exited with status 3"
    assert a.stop() == 0


def test_exec_condition_skips_and_timeouts_kill(activator, tmp_path):
    skip_port, slow_port, log = free_port(), free_port(), tmp_path / "log"
    units = write_units(tmp_path / "units", {
        "skip.socket": sock(skip_port),
        "skip.service": f"[Service]\nExecCondition=/bin/sh -c 'exit 1'\nExecStart=/bin/sh -c 'echo skip >> {log}'\n",
        "slow.socket": sock(slow_port),
        "slow.service": f"[Service]\nTimeoutStartSec=1\nExecStartPre=/bin/sh -c 'echo $$$$ >> {log}; exec sleep 60'\n"
                        "ExecStart=/bin/true\n"})
    a = activator("serve", "--log-format", "json", units)
    a.wait_listening(2)
    with connect(("127.0.0.1", skip_port)):
        a.wait_log(r'"event":"start-skipped".*exec-condition /bin/sh exited with status 1')
    with connect(("127.0.0.1", slow_port)):
        a.wait_log(r'"event":"exec-timeout"')
        failed = a.wait_log(r'"event":"start-failed"')
    assert "exec-start-pre: /bin/sh did not finish within 1s (timeout-start-sec): killed" in failed.string
    sleeper = int(lines_of(log)[0])
    wait_for(lambda: not pid_alive(sleeper), what="the command killed")
    assert "skip" not in lines_of(log) and not events(a, "start")
    assert a.stop() == 0


def test_conditions_skip_a_unit_until_a_reload_finds_them_true(activator, tmp_path):
    port, flag = free_port(), tmp_path / "flag"
    units = write_units(tmp_path / "units", {
        "c.socket": f"[Unit]\nConditionPathExists={flag}\n[Socket]\nListenStream=127.0.0.1:{port}\nAccept=yes\n",
        "c@.service": f"[Unit]\nConditionPathExists=!{tmp_path}/nothing\nAssertPathIsDirectory={tmp_path}\n"
                      "[Service]\nExecStart=/bin/cat\nStandardInput=socket\n",
        "a.socket": sock(free_port()),
        "a.service": f"[Unit]\nAssertFileNotEmpty={flag}\n[Service]\nExecStart=/bin/true\n"})
    a = activator("serve", "--log-format", "json", units)
    skipped = a.wait_log(r'"event":"condition"')
    assert f"skipped: condition-path-exists={flag} does not hold" in skipped.string
    assert f"not started: assert-file-not-empty={flag} does not hold" in a.wait_log(r'"event":"assert"').string
    assert not events(a, "listen")  # a skipped unit binds nothing
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    flag.write_text("x\n")
    a.signal(signal.SIGHUP)
    a.wait_log(r'"event":"listen"', count=2)
    with connect(("127.0.0.1", port)) as c:
        c.sendall(b"now\n")
        c.shutdown(socket.SHUT_WR)
        assert c.recv(100) == b"now\n"
    assert a.stop() == 0


def test_a_unit_starts_what_it_requires_and_waits_for_what_it_is_after(activator, tmp_path):
    db_port, web_port, bad_port, log = free_port(), free_port(), free_port(), tmp_path / "log"
    units = write_units(tmp_path / "units", {
        "db.socket": sock(db_port),
        "db.service": f"[Service]\nExecStart=/bin/sh -c 'echo db >> {log}; exec sleep 60'\n"
                      f"ExecStartPost=/bin/sh -c 'sleep 1; echo db-up >> {log}'\n",
        "web.socket": sock(web_port),
        "web.service": f"[Unit]\nRequires=db.service\nAfter=db.service\n[Service]\n"
                       f"ExecStart=/bin/sh -c 'echo web >> {log}; exec sleep 60'\n",
        "bad.socket": sock(bad_port),
        "bad.service": f"[Unit]\nRequires=broken.service\nAfter=broken.service\n[Service]\n"
                       f"ExecStart=/bin/sh -c 'echo bad >> {log}'\n",
        "broken.socket": sock(free_port()),
        "broken.service": "[Service]\nExecStart=/nonexistent/daemon\n"})
    a = activator("serve", "--log-format", "json", units)
    a.wait_listening(4)
    with connect(("127.0.0.1", web_port)):
        assert wait_lines(log, 3) == ["db", "db-up", "web"]
    a.wait_log(r'"event":"start"', count=2)
    assert [e["unit"] for e in events(a, "start")] == ["db", "web"]
    with connect(("127.0.0.1", bad_port)):
        failed = a.wait_log(r'"unit":"bad".*"event":"start-failed"')
    assert "cannot start: required unit broken cannot start" in failed.string
    assert "bad" not in lines_of(log)
    assert a.stop() == 0


def test_exit_statuses_decide_the_restart(activator, tmp_path):
    ports = {code: free_port() for code in (3, 4, 7)}
    files = {}
    for code, port in ports.items():
        files[f"x{code}.socket"] = sock(port)
        files[f"x{code}.service"] = (f"[Service]\nExecStart=/bin/sh -c 'exit {code}'\nRestart=on-failure\n"
                                     "RestartSec=0.1\nRestartPreventExitStatus=3 SIGKILL\nSuccessExitStatus=7\n")
    a = activator("serve", "--log-format", "json", write_units(tmp_path / "units", files))
    a.wait_listening(3)
    for port in ports.values():
        with connect(("127.0.0.1", port)):
            pass
    a.wait_log(r'"unit":"x4".*"event":"restart"', count=2)
    wait_for(lambda: {e["unit"] for e in events(a, "exit")} >= {"x3", "x7"}, what="x3 and x7 to exit")
    assert {e["unit"] for e in events(a, "restart")} == {"x4"}  # 3: prevented; 7: a success
    assert a.stop() == 0


def test_limits_oom_score_and_nice_reach_the_daemon(activator, tmp_path):
    port = free_port()
    units = write_units(tmp_path / "units", {
        "lim.socket": sock(port),
        "lim.service": "[Service]\nExecStart=/bin/sleep 60\nLimitNOFILE=123:456\nLimitCORE=infinity\n"
                       "OOMScoreAdjust=321\nNice=7\n"})
    a = activator("serve", "--log-format", "json", units)
    a.wait_listening()
    with connect(("127.0.0.1", port)):
        pid = int(a.wait_log(r'started /bin/sleep as pid (\d+)').group(1))
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert re.search(r"^Max open files\s+123\s+456\s", limits, re.M), limits
    assert re.search(r"^Max core file size\s+unlimited\s+unlimited\s", limits, re.M), limits
    wait_for(lambda: Path(f"/proc/{pid}/oom_score_adj").read_text().strip() == "321", what="oom_score_adj")
    assert int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16]) == 7  # nice
    assert a.stop() == 0


def test_accept_mode_runs_the_start_commands_for_each_connection(activator, tmp_path):
    port, log = free_port(), tmp_path / "log"
    units = write_units(tmp_path / "units", {
        "e.socket": sock(port, "Accept=yes\nMaxConnections=2\n"),
        "e@.service": f"[Service]\nExecStartPre=/bin/sh -c 'echo pre >> {log}; sleep 0.3'\n"
                      "ExecStart=/bin/cat\nStandardInput=socket\n"})
    a = activator("serve", "--log-format", "json", units)
    a.wait_listening()
    for line in (b"one\n", b"two\n"):
        with connect(("127.0.0.1", port)) as c:
            c.sendall(line)
            c.shutdown(socket.SHUT_WR)
            assert c.recv(100) == line
    assert lines_of(log) == ["pre", "pre"]
    assert a.stop() == 0


@pytest.mark.parametrize("access,ready", [("main", False), ("all", True), ("none", False)])
def test_notify_access(activator, tmp_path, access, ready):
    """READY=1 from a child of the main process: the default and all take it, main and none do not."""
    port, child = free_port(), tmp_path / "child.py"
    child.write_text("from activator import daemon\ndaemon.notify('READY=1')\n")
    units = write_units(tmp_path / "units", {
        "n.socket": sock(port),
        "n.service": f"[Service]\nType=notify\nNotifyAccess={access}\nTimeoutStartSec=2\n"
                     f"ExecStart=/bin/sh -c '{sys.executable} {child}; exec sleep 60'\n"})
    a = activator("serve", "--log-format", "json", units)
    a.wait_listening()
    with connect(("127.0.0.1", port)):
        a.wait_log(r'"event":"ready"' if ready else r'"event":"start-timeout"', timeout=15)
    assert bool(events(a, "ready")) == ready
    assert a.stop() == 0


def test_command_prefixes_reach_the_processes(activator, tmp_path, request):
    """@ names argv[0], + runs a command with activator's credentials instead of User=, - on ExecStart=
    makes a failing exit a success (no restart=on-failure)."""
    port, out = free_port(), Path(tempfile.mkdtemp(prefix="activator-prefixes-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(out, ignore_errors=True))
    os.chmod(out, 0o777)  # User=nobody writes here too
    units = write_units(tmp_path / "units", {
        "p.socket": sock(port),
        "p.service": f"[Service]\nUser=nobody\nRestart=on-failure\nRestartSec=0.1\n"
                     # Each file written whole (a rename): the connection, still pending when the daemon
                     # exits, activates the unit again, and a rerun truncating the file raced the reads.
                     f"ExecStartPre=+/bin/sh -c 'id -u > {out}/pre.new; mv {out}/pre.new {out}/pre'\n"
                     f"ExecStartPre=/bin/sh -c 'id -u > {out}/pre-user.new; mv {out}/pre-user.new {out}/pre-user'\n"
                     f"ExecStart=-@/bin/sh my-name -c 'echo $$0 > {out}/main.new; mv {out}/main.new {out}/main; "
                     "exit 3'\n"})
    a = activator("serve", "--log-format", "json", units)
    a.wait_listening()
    with connect(("127.0.0.1", port)):
        a.wait_log(r'"event":"exit".*exited with status 3')
    assert (out / "pre").read_text() == "0\n"
    assert (out / "pre-user").read_text() == f"{pwd.getpwnam('nobody').pw_uid}\n"
    assert (out / "main").read_text() == "my-name\n"
    assert not events(a, "restart")
    assert a.stop() == 0


def test_a_stop_during_a_start_ends_the_command_and_starts_nothing(activator, tmp_path):
    port, held_port, log = free_port(), free_port(), tmp_path / "log"
    units = write_units(tmp_path / "units", {
        "s.socket": sock(port),
        "s.service": f"[Service]\nExecStartPre=/bin/sh -c 'echo $$$$ >> {log}; exec sleep 60'\n"
                     f"ExecStart=/bin/sh -c 'echo main >> {log}'\n",
        "h.socket": sock(held_port, "Accept=yes\n"),
        "h@.service": f"[Service]\nExecStartPre=/bin/sh -c 'echo $$$$ >> {log}; exec sleep 60'\n"
                      "ExecStart=/bin/cat\nStandardInput=socket\n"})
    a = activator("serve", "--log-format", "json", units)
    a.wait_listening(2)
    with connect(("127.0.0.1", port)), connect(("127.0.0.1", held_port)) as held:
        commands = [int(pid) for pid in wait_lines(log, 2)]
        started = time.monotonic()
        assert a.stop() == 0
        assert held.recv(10) == b""  # the connection that waited for its instance is closed, not served
    assert time.monotonic() - started < 5 and not any(map(pid_alive, commands))
    assert lines_of(log) == [str(pid) for pid in commands] and not events(a, "start")


def test_a_reload_during_a_start_replaces_it(activator, tmp_path):
    """A changed unit's start under way is abandoned (its command stopped); the new unit starts afresh."""
    port, log = free_port(), tmp_path / "log"
    units = write_units(tmp_path / "units", {
        "r.socket": sock(port),
        "r.service": f"[Service]\nExecStartPre=/bin/sh -c 'echo $$$$ >> {log}; exec sleep 60'\nExecStart=/bin/true\n"})
    a = activator("serve", "--log-format", "json", units)
    a.wait_listening()
    with connect(("127.0.0.1", port)):
        (first,) = map(int, wait_lines(log, 1))
        drop_in(units, "r.service", "[Service]\nEnvironment=CHANGED=1\n")
        a.signal(signal.SIGHUP)
        second = int(wait_lines(log, 2)[1])  # the connection still waits: the new unit starts for it
        assert not pid_alive(first) and pid_alive(second)
    assert a.stop() == 0
    assert not pid_alive(second)


# ====================================================================== the pieces, on their own
def test_restart_decision_with_exit_statuses():
    from activator.processes import should_restart
    from activator.units import ExitStatuses

    exited = lambda code: code << 8  # noqa: E731 - wait() statuses
    killed = signal.SIGKILL
    prevent, force = ExitStatuses(frozenset({3}), frozenset({killed})), ExitStatuses(frozenset({4}))
    success = ExitStatuses(frozenset({7}))
    cases = [("on-failure", exited(3), None, False), ("on-failure", killed, None, False),
             ("always", exited(3), None, False), ("no", exited(4), None, True), ("on-success", exited(4), None, True),
             ("on-failure", exited(7), None, False), ("on-success", exited(7), None, True),
             ("on-failure", exited(5), None, True), ("on-failure", exited(0), "start-post", True)]
    for policy, status, forced, expected in cases:
        assert should_restart(policy, status, forced, success, prevent, force) is expected, (policy, status)


def test_conditions_combine_as_systemd_does(tmp_path):
    from activator.conditions import check
    from activator.units import Condition

    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").touch()
    (tmp_path / "link").symlink_to("file")
    here, missing = str(tmp_path / "file"), str(tmp_path / "missing")
    holding = [Condition("path-exists", here), Condition("path-exists", missing, negate=True),
               Condition("file-not-empty", here), Condition("path-is-symbolic-link", str(tmp_path / "link")),
               Condition("directory-not-empty", str(tmp_path)), Condition("path-exists-glob", f"{tmp_path}/f*"),
               Condition("path-is-read-write", str(tmp_path)), Condition("path-is-mount-point", "/"),
               Condition("file-is-executable", "/bin/sh"), Condition("path-is-directory", str(tmp_path))]
    assert check(holding) is None
    bad = Condition("file-not-empty", str(tmp_path / "empty"))
    assert check([*holding, bad]) == (bad, False)
    triggers = [Condition("path-exists", missing, trigger=True), Condition("path-exists", here, trigger=True)]
    assert check(triggers) is None and check(triggers[:1]) == (triggers[0], False)
    assertion = Condition("path-exists", missing, assertion=True)
    assert check([assertion]) == (assertion, True) and check([bad, assertion]) == (bad, False)


def test_directories_never_follow_a_link(tmp_path):
    from activator.directories import Directory, create

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "planted").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError) as info:
        create(Directory("state", str(tmp_path), "planted/sub", 0o700), -1, -1)
    assert info.value.filename == f"{tmp_path}/planted" and not (tmp_path / "elsewhere" / "sub").exists()
    create(Directory("state", str(tmp_path), "a/b", 0o750), os.getuid(), os.getgid())
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "b").st_mode) == 0o750
    create(Directory("state", str(tmp_path), "a/b", 0o700), -1, -1)  # again: the mode is set again
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "b").st_mode) == 0o700
