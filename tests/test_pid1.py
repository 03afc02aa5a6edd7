"""Init duties, for real: activator as PID 1 of a new PID namespace, and as a subreaper when it is not.

PID 1 runs under ``unshare --pid --fork --mount-proc --kill-child`` (util-linux):
inside the namespace activator is pid 1, as in a container. The test looks at the
namespace's processes from outside through /proc (each process's ``NSpid`` line
gives its pid inside) and sends signals to activator's outer pid.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from conftest import DAEMONS, PROBE, connect, free_port, read_probe, require, wait_for

INITD = str(DAEMONS / "initd.py")
SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def unshare_prefix() -> list[str]:
    require("unshare")
    prefix = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
    if os.geteuid() != 0:
        prefix[1:1] = ["--user", "--map-root-user"]
    return [*prefix, sys.executable, "-m", "activator"]


class Pid1:
    """An activator running as PID 1 of its own PID namespace (``a`` is the unshare process)."""

    def __init__(self, a):
        self.a = a
        self.pid = wait_for(self._child, 10, what="activator inside the namespace")  # its pid outside
        self.ns = os.readlink(f"/proc/{self.pid}/ns/pid")

    def _child(self) -> int | None:
        kids = self.a.children()
        return kids[0] if kids else None

    def processes(self) -> dict[int, tuple[int, str]]:
        """inner pid -> (outer pid, state letter) for every process of the namespace."""
        result = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") != self.ns:
                    continue
                with open(f"/proc/{entry}/status") as f:
                    fields = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
            except OSError:
                continue
            result[int(fields["NSpid"].split()[-1])] = (int(entry), fields["State"].split()[0])
        return result

    def outer(self, inner: int) -> int:
        return self.processes()[inner][0]

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 20.0) -> int:
        return self.a.wait(timeout)


@pytest.fixture
def pid1(activator):
    def start(*args, **kw) -> Pid1:
        a = activator(*args, argv_prefix=unshare_prefix(), **kw)
        return Pid1(a)

    return start


def read_json(path: Path, timeout: float = 10.0) -> dict:
    return read_probe(path, timeout)


def sigterm_ignored(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            ign = int(f.read().split("SigIgn:")[1].split()[0], 16)
    except OSError:
        return False
    return bool(ign & SIGTERM_BIT)


def gone(pid: int) -> bool:
    """Not even a zombie any more."""
    return not os.path.exists(f"/proc/{pid}")


# --------------------------------------------------------------- as PID 1
def test_pid1_reaps_zombies_of_double_forked_grandchildren(pid1, tmp_path):
    report = tmp_path / "r.json"
    p = pid1("run", "-v", "--now", "-l", f"127.0.0.1:{free_port()}", "--", sys.executable, INITD, report, "doublefork")
    daemon = read_json(report)
    assert daemon["ppid"] == 1
    grandchild = read_json(Path(f"{report}.grandchild"))
    assert grandchild["ppid"] == 1, "the orphan is adopted by PID 1"
    assert grandchild["sid"] != daemon["pid"], "it left the daemon's session"
    # It has exited by now or will at once: PID 1 must reap it, leaving no zombie in the namespace.
    wait_for(lambda: grandchild["pid"] not in p.processes(), 10, what="the grandchild to be reaped")
    p.a.wait_log(rf"reaped orphan pid {grandchild['pid']}\b")
    procs = p.processes()
    assert sorted(procs) == [1, daemon["pid"]]
    assert all(state != "Z" for _, state in procs.values()), procs
    p.signal(signal.SIGTERM)
    assert p.wait() == 0


def test_pid1_sigterm_stops_a_daemon_that_ignores_it_within_timeout_stop(pid1, tmp_path):
    report = tmp_path / "r.json"
    p = pid1("run", "--now", "--timeout-stop", "1s", "-l", f"127.0.0.1:{free_port()}", "--",
             sys.executable, PROBE, report, "ignore-term")
    info = read_json(report)
    outer = p.outer(info["pid"])
    wait_for(lambda: sigterm_ignored(outer), 10, what="the daemon to ignore SIGTERM")
    t0 = time.monotonic()
    p.signal(signal.SIGTERM)
    code = p.wait()
    elapsed = time.monotonic() - t0
    assert code == 0, p.a.log
    assert 0.9 <= elapsed < 5, elapsed
    assert gone(outer)
    assert "SIGTERM received, stopping" in p.a.log
    assert "sending SIGKILL" in p.a.log
    assert "killed by signal SIGKILL" in p.a.log
    assert "stopped, exit status 0" in p.a.log


@pytest.mark.parametrize("script, expected", [
    ("exit 0", 0),
    ("exit 7", 7),
    ("kill -USR1 $$", 128 + signal.SIGUSR1),
    ("kill -KILL $$", 128 + signal.SIGKILL),
])
def test_pid1_exit_with_service_propagates_the_daemons_status(pid1, script, expected):
    p = pid1("run", "--exit-with-service", "--now", "-l", f"127.0.0.1:{free_port()}", "--", "sh", "-c", script)
    assert p.wait() == expected, p.a.log
    assert f"stopped, exit status {expected}" in p.a.log


def test_pid1_passes_inherited_listen_fds_on_with_the_daemons_own_pid(pid1, tmp_path):
    """What podman does with socket activation: LISTEN_FDS=1 LISTEN_PID=1, the socket at fd 3."""
    report = tmp_path / "r.json"
    outside = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    outside.bind(("127.0.0.1", 0))
    outside.listen(16)
    port = outside.getsockname()[1]
    inode = os.readlink(f"/proc/self/fd/{outside.fileno()}")
    fd = outside.fileno()
    try:
        p = pid1("run", "--", sys.executable, PROBE, report,
                 env={"LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "web"},
                 pass_fds=(3,), preexec_fn=lambda: os.dup2(fd, 3))
        # The daemon starts on the first connection, through activator's copy of the socket.
        with connect(("127.0.0.1", port)) as c:
            data = c.recv(100)
    finally:
        outside.close()
    info = read_json(report)
    assert data == b"hello from %d\n" % info["pid"]
    assert info["ppid"] == 1 and info["pid"] != 1
    env = info["env"]
    assert env["LISTEN_PID"] == str(info["pid"])
    assert env["LISTEN_FDS"] == "1"
    assert env["LISTEN_FDNAMES"] == "web"
    fds = {f["fd"]: f for f in info["fds"]}
    assert sorted(fds) == [0, 1, 2, 3]
    assert fds[3]["target"] == inode, "the very socket we passed in"
    assert fds[3]["listening"] and fds[3]["local"] == ["127.0.0.1", port]
    p.signal(signal.SIGTERM)
    assert p.wait() == 0


def test_pid1_forwards_signals_and_logs_json_lines(pid1, tmp_path):
    report = tmp_path / "r.json"
    p = pid1("run", "--log-format", "json", "-v", "--now", "-l", f"127.0.0.1:{free_port()}", "--",
             sys.executable, INITD, report, "signals")
    daemon = read_json(report)
    received = Path(f"{report}.signals")
    for n, sig in enumerate((signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH), 1):
        p.signal(sig)
        wait_for(lambda: received.exists() and len(received.read_text().split()) == n, 10,
                 what=f"the daemon to receive {sig.name}")
    assert received.read_text().split() == ["SIGUSR1", "SIGUSR2", "SIGWINCH"]
    p.signal(signal.SIGTERM)
    assert p.wait() == 0

    records = []
    for line in p.a.lines:
        record = json.loads(line)  # every line is one JSON object
        assert set(record) == {"time", "level", "unit", "pid", "event", "message"}, record
        assert record["level"] in ("debug", "info", "warning", "error")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"]), record["time"]
        datetime.strptime(record["time"], "%Y-%m-%dT%H:%M:%S.%fZ")
        records.append(record)
    events = [r["event"] for r in records]
    for expected in ("listen", "start", "forward", "stop", "exit", "stopped"):
        assert expected in events, events
    start = next(r for r in records if r["event"] == "start")
    assert start["pid"] == daemon["pid"] and start["unit"] == "python"
    assert records[-1]["event"] == "stopped" and records[-1]["message"] == "stopped, exit status 0"


# ---------------------------------------------------------- not PID 1
def test_subreaper_adopts_and_reaps_an_orphaned_grandchild(activator, tmp_path):
    report = tmp_path / "r.json"
    a = activator("run", "-v", "--now", "-l", f"127.0.0.1:{free_port()}", "--", sys.executable, INITD, report,
                  "doublefork")
    daemon = read_json(report)
    assert daemon["ppid"] == a.pid
    grandchild = read_json(Path(f"{report}.grandchild"))
    assert grandchild["ppid"] == a.pid, "activator is a child subreaper: the orphan comes to it, not to init"
    wait_for(lambda: gone(grandchild["pid"]), 10, what="the grandchild to be reaped")
    a.wait_log(rf"reaped orphan pid {grandchild['pid']}\b")
    assert a.stop() == 0


def test_stop_ends_an_orphaned_grandchild_that_ignores_sigterm(activator, tmp_path):
    report = tmp_path / "r.json"
    a = activator("run", "--now", "--timeout-stop", "1s", "-l", f"127.0.0.1:{free_port()}", "--",
                  sys.executable, INITD, report, "linger")
    daemon = read_json(report)
    grandchild = read_json(Path(f"{report}.grandchild"))
    assert grandchild["ppid"] == a.pid
    assert sigterm_ignored(grandchild["pid"])
    t0 = time.monotonic()
    assert a.stop() == 0
    assert time.monotonic() - t0 < 5
    assert gone(daemon["pid"]) and gone(grandchild["pid"]), "stop ends every process, orphans included"


def test_pid1_serve_exit_with_service_exits_with_the_daemons_status(pid1, tmp_path):
    port = free_port()
    config = tmp_path / "units.toml"
    config.write_text(
        "[web]\n"
        f'socket.listen-stream = "127.0.0.1:{port}"\n'
        'service.exec-start = ["sh", "-c", "exit 3"]\n'
        "[other]\n"
        f'socket.listen-stream = "127.0.0.1:{free_port()}"\n'
        'service.exec-start = ["sleep", "60"]\n'
    )
    p = pid1("serve", "--exit-with-service", config)
    p.a.wait_listening(2)
    with connect(("127.0.0.1", port)):
        pass  # the first connection starts the daemon, which exits with status 3
    assert p.wait() == 3, p.a.log
    assert "web: pid 2 exited with status 3" in p.a.log
    assert "stopped, exit status 3" in p.a.log


def test_pid1_serve_unit_takes_an_inherited_fd_by_its_name(pid1, tmp_path):
    """podman/systemd pass fds named by LISTEN_FDNAMES; a unit selects one with listen-inherited."""
    report = tmp_path / "r.json"
    outside = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(2)]
    for s in outside:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
    ports = [s.getsockname()[1] for s in outside]
    fds = [s.fileno() for s in outside]
    config = tmp_path / "units.toml"
    config.write_text(
        "[api]\n"
        'socket.listen-inherited = "api"\n'
        f"service.exec-start = [{json.dumps(sys.executable)}, {json.dumps(PROBE)}, {json.dumps(str(report))}]\n"
    )

    def place():
        os.dup2(fds[0], 3)
        os.dup2(fds[1], 4)

    try:
        p = pid1("serve", config, env={"LISTEN_FDS": "2", "LISTEN_PID": "1", "LISTEN_FDNAMES": "metrics:api"},
                 pass_fds=(3, 4), preexec_fn=place)
        with connect(("127.0.0.1", ports[1])) as c:  # "api" is the second one
            data = c.recv(100)
    finally:
        for s in outside:
            s.close()
    info = read_json(report)
    assert data == b"hello from %d\n" % info["pid"]
    assert info["env"]["LISTEN_PID"] == str(info["pid"]) and info["env"]["LISTEN_FDS"] == "1"
    assert info["env"]["LISTEN_FDNAMES"] == "api"
    fd3 = next(f for f in info["fds"] if f["fd"] == 3)
    assert fd3["local"] == ["127.0.0.1", ports[1]]
    assert 4 not in {f["fd"] for f in info["fds"]}, "the unit gets only the fd it named"
    p.signal(signal.SIGTERM)
    assert p.wait() == 0
