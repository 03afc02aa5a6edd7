"""activator's listen_fds()/listen_fds_with_names() against python-systemd (libsystemd) on the same environments.

Both run in /usr/bin/python3 (where Debian's python3-systemd lives) in one process per
implementation, over a table of environments, malformed ones included; the results,
exceptions and errno values, the environment left behind (as libc sees it) and the
close-on-exec flags must be identical, for activator.daemon's descriptor numbers and,
but for the exception's text, for activator.listen_sockets()'s socket objects.
"""
from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import DAEMONS, ROOT, require

SYSTEM_PYTHON = "/usr/bin/python3"
REPORT = str(DAEMONS / "listen_report.py")

NUMBERS = [
    "2", "1", "5", " 2", "\t2", "\n2", "\v2", "\f2", "\r2", "+2", " +2", "2 ", "2\n", "-1", "-0", "0", "", "2a", "a",
    "0x2", "0X2", "0x", "0x-2", "-0x2", "+0x2", " 0x2", "02", "010", "08", "00002", "0b10", "0B10", "0b", "0b-1",
    "+0b10", " 0b10", "\v0b10", " 0o2", "0b 10", "0b+10", "0o-2", "0o2", "0O2", "0o8", "0o", "+ 2", "- 2", "+-2", "0_2", "２", "99999999999", "2147483644",  # noqa: E501
    "2147483645", "4294967298", "-2147483649", "9223372036854775808", "9" * 100_000, "-" + "1" * 100_000,
]
PIDS = [
    "{pid}", " {pid}", "\t{pid}", "\n{pid}", "+{pid}", "{pid} ", "{pid}\n", "{pid}x", "017", "019", "0x1f", "1", "0", "-0",
    "-1", " -1", "-+1", "", "x", "0x", "0b", "0o", "4294967296", "2147483648", "18446744073709551616", "-0x1",
    "+ {pid}",
]
NAMES = [
    None, "", "a", "a:b", "a:b:c", "a:", ":", "::", "a::b", "a\\:b", "a\\b:c", "a\\", "\\", "\\\\", "a\\\\:b",
    "'a:b'", "\"x\":y", " a: b", "é:b", "x" * 300 + ":y", "stored:conn", "\udcff:b",
]


def _case(func: str, unset: bool, env: dict) -> dict:
    return {"func": func, "unset": unset, "env": env}


def table() -> list[dict]:
    cases = []
    # Named scenarios, for both functions and both unset_environment values.
    scenarios = [
        {"LISTEN_PID": "{pid}", "LISTEN_FDS": "2"},  # normal, no names
        {"LISTEN_PID": "{pid}", "LISTEN_FDS": "5", "LISTEN_FDNAMES": "a:b:c:d:e"},  # every socket kind
        {"LISTEN_PID": "1", "LISTEN_FDS": "2"},  # wrong LISTEN_PID
        {"LISTEN_FDS": "2"},  # no LISTEN_PID
        {"LISTEN_PID": "{pid}"},  # no LISTEN_FDS
        {},  # nothing at all
        {"LISTEN_FDNAMES": "a:b"},  # names only
        {"LISTEN_PID": "{pid}", "LISTEN_FDS": "0"},
        {"LISTEN_PID": "{pid}", "LISTEN_FDS": "-2"},
        {"LISTEN_PID": "{pid}", "LISTEN_FDS": "garbage"},
        {"LISTEN_PID": "{pid}", "LISTEN_FDS": "+2"},
        {"LISTEN_PID": "{pid}", "LISTEN_FDS": " 2"},
        {"LISTEN_PID": "{pid}", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b:c"},  # count mismatch
        {"LISTEN_PID": "{pid}", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a"},
        {"LISTEN_PID": "{pid}", "LISTEN_FDS": "2", "LISTEN_FDNAMES": ""},  # empty names
        {"LISTEN_PID": "{pid}", "LISTEN_FDS": "1", "LISTEN_FDNAMES": ""},
        {"LISTEN_PID": "{pid}", "LISTEN_FDS": "8"},  # fds 8-10 are not open: EBADF
        {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "bad\\"},  # names fail before the pid check
        {"LISTEN_PID": "garbage", "LISTEN_FDS": "2"},
    ]
    for env, func, unset in itertools.product(scenarios, ("with_names", "plain"), (True, False)):
        cases.append(_case(func, unset, env))
    # Number parsing, exhaustively on both variables.
    for value in NUMBERS:
        cases.append(_case("with_names", False, {"LISTEN_PID": "{pid}", "LISTEN_FDS": value}))
    for value in PIDS:
        cases.append(_case("with_names", False, {"LISTEN_PID": value, "LISTEN_FDS": "1"}))
    for names, n in itertools.product(NAMES, ("1", "2", "3")):
        env = {"LISTEN_PID": "{pid}", "LISTEN_FDS": n}
        if names is not None:
            env["LISTEN_FDNAMES"] = names
        cases.append(_case("with_names", True, env))
    return cases


def run_report(impl: str, cases: list[dict]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [SYSTEM_PYTHON, REPORT, impl], input=json.dumps(cases), capture_output=True, text=True, env=env, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def python_systemd():
    require(SYSTEM_PYTHON)
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import systemd.daemon"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        require("python3-systemd (import systemd.daemon in /usr/bin/python3)-missing")


def mismatches(cases: list[dict], theirs: list[dict], ours: list[dict]) -> str:
    lines = [
        f"{case['func']} unset={case['unset']} env={case['env']!r}:\n  systemd:   {t}\n  activator: {o}"
        for case, t, o in zip(cases, theirs, ours) if t != o
    ]
    return f"{len(lines)} of {len(cases)} differ:\n" + "\n".join(lines[:20]) if lines else ""


def test_parity_with_python_systemd_on_every_environment(python_systemd):
    cases = table()
    assert len(cases) > 200
    theirs = run_report("systemd", cases)
    ours = run_report("activator", cases)
    # The table does exercise every outcome.
    assert {None, 22, 34, 9} <= {r.get("errno") for r in theirs}
    # A name that is not UTF-8: python-systemd's C code fails to build its tuple (SystemError,
    # caused by UnicodeDecodeError); activator raises the UnicodeDecodeError itself.
    undecodable = [i for i, r in enumerate(theirs) if r.get("exc") == "UnicodeDecodeError (as SystemError)"]
    assert undecodable == [i for i, r in enumerate(ours) if r.get("exc") == "UnicodeDecodeError"] != []
    for i in undecodable:
        ours[i].pop("exc")
        theirs[i].pop("exc")
    assert not mismatches(cases, theirs, ours)


def test_the_socket_form_reads_the_same(python_systemd):
    """listen_sockets*(): the same descriptors and side effects, as socket objects; its errors say more."""
    cases = [c for c in table() if "\udcff" not in c["env"].get("LISTEN_FDNAMES", "")]  # names kept as they are
    theirs = run_report("systemd", cases)
    ours = run_report("sockets", cases)
    for r in theirs + ours:
        r.pop("exc", None)
    assert not mismatches(cases, theirs, ours)


def test_named_scenarios_give_what_the_man_page_says(python_systemd):
    cases = [
        _case("with_names", True, {"LISTEN_PID": "{pid}", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:admin"}),
        _case("with_names", False, {"LISTEN_PID": "{pid}", "LISTEN_FDS": "2"}),
        _case("with_names", True, {"LISTEN_PID": "1", "LISTEN_FDS": "2"}),
        _case("with_names", True, {"LISTEN_PID": "{pid}", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b:c"}),
    ]
    ours = run_report("sockets", cases)
    unix, inet = int(socket.AF_UNIX), int(socket.AF_INET)
    assert ours[0]["result"] == [[3, "web", unix, int(socket.SOCK_STREAM)], [4, "admin", inet, int(socket.SOCK_STREAM)]]
    assert ours[0]["env"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}
    assert ours[0]["cloexec"] == [True, True, False, False, False]
    assert [r[1] for r in ours[1]["result"]] == ["unknown", "unknown"]
    assert ours[1]["env"]["LISTEN_FDS"] == "2" and ours[1]["env"]["LISTEN_PID"] == "{pid}"
    assert ours[2]["result"] == [] and ours[2]["cloexec"] == [False] * 5
    assert ours[2]["env"]["LISTEN_PID"] is None
    assert ours[3] == {"errno": 22, "env": {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None},
                       "cloexec": [True, True, False, False, False],
                       "exc": "ProtocolError: [Errno 22] LISTEN_FDNAMES has 3 names for 2 descriptors"}


def test_not_a_socket_comes_as_its_number(tmp_path):
    code = (
        "import os, activator\n"
        "r, w = os.pipe()\n"
        "os.dup2(r, 3)\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='pipe')\n"
        "print(activator.listen_sockets_with_names())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[('pipe', 3)]"


def test_nothing_passed_gives_an_empty_list():
    code = ("import activator; print(activator.listen_fds(), activator.listen_fds_with_names(), "
            "activator.listen_sockets(), activator.listen_sockets_with_names())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=env, cwd=ROOT)
    assert out.stdout.strip() == "[] {} [] []", out.stderr
