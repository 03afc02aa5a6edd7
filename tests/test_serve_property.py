"""Anything `check` accepts, `serve` runs: generated units, from every setting of the registry.

Hypothesis draws units whose keys come from activator.settings.SETTINGS and whose values are
valid, boundary or hostile for each parser kind. The same loader `check` uses decides; for each
accepted configuration `activator serve` runs it, a client connects to every socket, and the
test asserts no traceback, a clean exit (0) on SIGTERM, no socket file left that activator
created (remove-on-stop), and no orphan: this test process is a subreaper, so anything that
outlives activator comes back to it.

CI runs ACTIVATOR_SERVE_EXAMPLES (default 40) examples; a longer run:
ACTIVATOR_SERVE_EXAMPLES=1000 .venv/bin/python -m pytest tests/test_serve_property.py
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import tempfile
import time

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from activator import values as v
from activator.config import ConfigError, load_units
from activator.settings import SETTINGS

from conftest import Activator, free_port, wait_for

EXAMPLES = int(os.environ.get("ACTIVATOR_SERVE_EXAMPLES", "40"))
SKIP_KEYS = {
    "exec-start",  # the command is chosen below (a harmless one that may exit or stay)
    "user", "group", "supplementary-groups", "socket-user", "socket-group",  # drawn from a fixed set below
    "working-directory", "environment-file",  # paths: drawn below
    # directories created under /run, /var/lib, ... of this machine: tests/test_unitfile.py has them
    *(f"{kind}-directory" for kind in ("runtime", "state", "cache", "logs", "configuration")),
}
COMMANDS = [["true"], ["sleep", "5"], ["cat"], ["sh", "-c", "exit 3"], ["/nonexistent/daemon"]]


def _subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans of activator come to us


def value_for(parser: v.Parser) -> st.SearchStrategy:
    """Values for one parser: mostly valid ones, with its bounds and some that must be refused."""
    if isinstance(parser, v.Bool):
        return st.booleans()
    if isinstance(parser, v.Choice):
        return st.sampled_from(parser.choices)
    if isinstance(parser, v.Int):
        lo, hi = parser.minimum, parser.maximum
        return st.sampled_from([lo, lo + 1, min(hi, 3), min(hi, 64), hi, hi + 1, -1])
    if isinstance(parser, v.Size):
        return st.sampled_from([parser.minimum, 4096, "64K", "1M", parser.maximum, parser.maximum + 1, 0])
    if isinstance(parser, v.Mode):
        return st.sampled_from(["0600", "0660", "0666", "0755", "7777", "1777", 0o777, "8", "0o7777"])
    if isinstance(parser, v.Time):
        return st.sampled_from(["0", "100ms", "1s", "2s", "24d", "25d", "30d", "infinity", "1min 30s", "-1", "1x"])
    if isinstance(parser, v.Signal):
        return st.sampled_from(["SIGTERM", "SIGINT", "SIGKILL", "SIGHUP", "²", "SIGNOPE", 15, 0, 64, 65])
    if isinstance(parser, v.FdName):
        return st.sampled_from(["a", "conn", "x" * 255, "x" * 256, "a:b", "\u00e9"])
    if isinstance(parser, v.Networks):
        return st.sampled_from([["any"], ["localhost"], ["127.0.0.0/8"], ["::1"], ["nope"]])
    if isinstance(parser, v.Environment):
        return st.sampled_from([{"A": "1"}, {"A": "a\u0000b"}, ["B=2"], {"1X": "y"}, {}])
    return st.sampled_from(["x", "", "a\u0000b"])


def socket_table(draw, tmp: str, index: int) -> dict:
    kind = draw(st.sampled_from(["tcp", "unix", "abstract"]))
    if kind == "tcp":
        address = f"127.0.0.1:{free_port()}"
    elif kind == "unix":
        address = f"{tmp}/s{index}.sock"
    else:
        address = f"@activator-prop-{os.getpid()}-{index}-{time.monotonic_ns()}"
    return {"listen-stream": address}


@st.composite
def configurations(draw, tmp: str) -> dict:
    units = {}
    for i in range(draw(st.integers(1, 2))):
        unit: dict = {"socket": socket_table(draw, tmp, i), "service": {"exec-start": draw(st.sampled_from(COMMANDS))}}
        for s in draw(st.lists(st.sampled_from([s for s in SETTINGS if s.key not in SKIP_KEYS]), max_size=6)):
            value = draw(value_for(s.parse))
            table = unit if s.part == "unit" else unit[s.part]
            table[s.key] = value
        if draw(st.booleans()):
            unit["service"]["user"] = draw(st.sampled_from(["root", "nobody", "nonexistent-user"]))
        units[f"u{i}"] = unit
    return units


def to_toml(doc: dict) -> str:
    def value(x):
        if isinstance(x, bool):
            return "true" if x else "false"
        if isinstance(x, int):
            return str(x)
        if isinstance(x, str):
            return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" for c in x) + '"'
        if isinstance(x, list):
            return "[" + ", ".join(value(i) for i in x) + "]"
        if isinstance(x, dict):
            return "{ " + ", ".join(f"{value(k)} = {value(i)}" for k, i in x.items()) + " }"
        raise TypeError(x)

    lines = []
    for name, unit in doc.items():
        lines.append(f"[{name}]")
        for key, x in unit.items():
            if isinstance(x, dict) and key in ("socket", "service"):
                for k, i in x.items():
                    lines.append(f"{key}.{k} = {value(i)}")
            else:
                lines.append(f"{key} = {value(x)}")
    return "\n".join(lines) + "\n"


def connect_to(address: str) -> None:
    try:
        if address.startswith("@") or address.startswith("/"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: object = "\0" + address[1:] if address.startswith("@") else address
        else:
            host, port = address.rsplit(":", 1)
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            target = (host, int(port))
        s.settimeout(2)
        with s:
            s.connect(target)
            s.sendall(b"x\n")
    except OSError:
        pass  # refused by the unit's rules, or the daemon closed it: what matters is activator


def orphans() -> list[int]:
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        return []
    mine = []
    for pid in kids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"activator" not in cmd and b"pytest" not in cmd:  # not the ones this test itself runs
            mine.append(pid)
    return mine


@pytest.fixture(scope="module", autouse=True)
def subreaper():
    _subreaper()


@hsettings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=not
           os.environ.get("ACTIVATOR_PROPERTY_RANDOM"))
@given(data=st.data())
def test_what_check_accepts_serve_runs(data):
    tmp = tempfile.mkdtemp(prefix="activator-prop-")
    doc = data.draw(configurations(tmp))
    path = os.path.join(tmp, "units.toml")
    with open(path, "w") as f:
        f.write(to_toml(doc))
    try:
        units = load_units([path])
    except ConfigError as exc:
        assert all("\n" not in m and m for m in exc.messages)
        return
    a = Activator(["serve", "--log-format", "json", path])
    try:
        wait_for(lambda: a.proc.poll() is not None or len([line for line in a.lines if '"listen"' in line]) >= len(units),
                 timeout=10, what="serve to listen")
        assert a.proc.poll() is None, f"serve exited {a.proc.returncode} on a configuration check accepted:\n{a.log}"
        for unit in doc.values():
            connect_to(unit["socket"]["listen-stream"])
        code = a.stop(30)
    finally:
        if a.proc.poll() is None:
            a.proc.kill()
            a.wait(5)
    assert "Traceback" not in a.log, a.log
    assert code == 0, a.log
    left = orphans()
    for pid in left:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert not left, f"processes outlived activator: {left}\n{a.log}"
    for unit in doc.values():
        sock = unit["socket"]["listen-stream"]
        if sock.startswith("/") and unit["socket"].get("remove-on-stop") is True:
            assert not os.path.exists(sock), f"{sock} left behind"
