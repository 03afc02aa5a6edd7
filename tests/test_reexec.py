"""Re-exec in place (`activator ctl reexec`, SIGRTMIN+25): a real `activator serve` under a client load.

What a user sees: the same activator pid, the same daemon pid, no connection refused or failed
(activator.loadgen.ClientLoad), counters that go on, a reload and a stop that work afterwards;
a new activator that cannot read the state, or an exec that fails, leave the old one serving.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from activator import reexec
from activator.control import ControlError, call
from activator.loadgen import ClientLoad
from activator.supervisor import UnitState
from conftest import DAEMONS, free_port, pid_alive, wait_for

PY = sys.executable
ECHO = str(DAEMONS / "echo_listen.py")


def events(a) -> list[dict]:
    found = []
    for line in a.lines:
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found


def wait_event(a, name: str, count: int = 1, timeout: float = 30.0) -> dict:
    return wait_for(lambda: ([e for e in events(a) if e.get("event") == name][count - 1:count] or [None])[0],
                    timeout, what=f"event {name} x{count}; log:\n{a.log}")


def ctl(sock: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "activator", "ctl", "-s", str(sock), "--timeout", "30", *args],
                          capture_output=True, text=True, timeout=timeout)


def unit(sock: Path, name: str) -> dict:
    [found] = call("status", socket_path=str(sock), units=[name])["units"]
    return found


@pytest.fixture
def two_units(activator, tmp_path):
    """serve: an accept-mode echo (cat on the connection) and an Accept=no echo daemon (tcp and unix)."""
    ports = {"echo": free_port(), "daemon": free_port()}
    path = tmp_path / "daemon.sock"
    config = tmp_path / "units.toml"
    config.write_text(f"""
[echo]
socket.listen-stream = "127.0.0.1:{ports['echo']}"
socket.accept = true
socket.max-connections = 64
service.exec-start = ["cat"]
service.standard-input = "socket"

[daemon]
socket.listen-stream = ["127.0.0.1:{ports['daemon']}", "{path}"]
socket.remove-on-stop = true
service.exec-start = ["{PY}", "{ECHO}"]
""")
    sock = tmp_path / "control.sock"

    def start(env=None):
        a = activator("serve", "--log-format", "json", "--control-socket", sock, config, env=env)
        a.wait_listening(3, timeout=30)
        return a

    return start, sock, ports, path, config


def daemon_pid(sock: Path, port: int) -> int:
    with ClientLoad(("127.0.0.1", port), clients=1, max_seconds=20) as load:
        wait_for(lambda: load.report.served > 0, 20, what="the daemon to serve")
    return wait_for(lambda: unit(sock, "daemon")["main_pid"], 10, what="the daemon's pid")


def test_reexec_under_load_keeps_sockets_daemons_and_counters(two_units, capsys):
    start, sock, ports, path, _ = two_units
    a = start()
    pid = daemon_pid(sock, ports["daemon"])
    loads = [ClientLoad(("127.0.0.1", ports[name]), clients=4, max_seconds=60, timeout=20) for name in ("echo", "daemon")]
    for load in loads:
        load.start()
    try:
        wait_for(lambda: all(load.report.served >= 20 for load in loads), 30, what="both loads to be served")
        before = unit(sock, "echo")["counters"]["accepted"]
        served = [load.report.served for load in loads]
        done = ctl(sock, "reexec")
        assert done.returncode == 0, done.stderr + a.log
        assert f"re-executed: pid {a.pid}" in done.stdout
        # Served by the new process: more connections on both after the reexec-done line.
        wait_event(a, "reexec-done")
        wait_for(lambda: all(load.report.served >= s + 20 for load, s in zip(loads, served)), 30,
                 what="both loads to be served after the re-exec")
    finally:
        reports = [load.stop() for load in loads]
    pause = re.search(r"; (\d+) ms without an activator", wait_event(a, "reexec-done")["message"])
    assert pause, a.log
    for name, report in zip(("echo", "daemon"), reports):
        with capsys.disabled():
            print(f"\nre-exec under load ({pause[1]} ms without an activator), {name}: {report.summary()}")
        assert report.refused == 0 and report.failed == 0, (name, report.summary(), report.errors)
    status = call("status", socket_path=str(sock))
    assert status["activator"]["pid"] == a.pid and status["activator"]["reexecs"] == 1
    echo, daemon = status["units"]
    assert daemon["main_pid"] == pid and pid_alive(pid)
    assert daemon["counters"]["starts"] == 1, "no daemon restarted"
    assert echo["counters"]["accepted"] > before, "counters go on"
    assert echo["counters"]["accepted"] >= reports[0].served
    done = wait_event(a, "reexec-done")
    assert a.pid > 0 and done["unit"] is None
    assert [e["event"] for e in events(a) if e["event"].startswith("reexec")] == ["reexec", "reexec-done"]
    # A reload after the re-exec works (the configuration paths were carried), and so does a stop.
    a.signal(signal.SIGHUP)
    reloaded = wait_event(a, "reload")
    assert "2 unchanged" in reloaded["message"]
    assert a.stop() == 0
    assert not pid_alive(pid)
    assert not path.exists(), "remove-on-stop still removes the unix socket file"
    assert not sock.exists()


def test_a_new_version_that_cannot_read_the_state_refuses_before_the_exec(two_units):
    start, sock, ports, _, config = two_units
    older = "import activator.reexec as r; r.VERSION = 0; import activator.__main__ as m; m.main()"
    a = start(env={reexec.ENV_ARGV: shlex.join([PY, "-c", older])})
    pid = daemon_pid(sock, ports["daemon"])
    with ClientLoad(("127.0.0.1", ports["daemon"]), clients=2, max_seconds=30) as load:
        done = ctl(sock, "reexec")
        assert done.returncode == 1
        assert "state format version 1 is not supported (this activator reads 0)" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        served = load.report.served
        wait_for(lambda: load.report.served > served + 5, 20, what="still serving")
    assert load.report.refused == 0 and load.report.failed == 0, load.report.summary()
    failed = wait_event(a, "reexec-failed")
    assert "cannot take over" in failed["message"]
    assert not [e for e in events(a) if e["event"] == "reexec"], "no exec was tried"
    assert unit(sock, "daemon")["main_pid"] == pid
    # A configuration edited since it was loaded: refused too (the new process would load the new one).
    config.write_text(config.read_text().replace("max-connections = 64", "max-connections = 63"))
    done = ctl(sock, "reexec")
    assert done.returncode == 1 and "changed since they were loaded" in done.stderr, done.stderr
    assert a.stop() == 0


def test_an_exec_that_fails_leaves_the_old_activator_serving(two_units, tmp_path):
    start, sock, ports, _, _ = two_units
    a = start(env={reexec.ENV_EXECUTABLE: str(tmp_path / "no-such-python")})
    pid = daemon_pid(sock, ports["daemon"])
    with ClientLoad(("127.0.0.1", ports["echo"]), clients=2, max_seconds=30) as load:
        done = ctl(sock, "reexec")
        assert done.returncode == 1, done.stdout + done.stderr
        assert "the re-exec failed, the running activator goes on" in done.stderr
        assert "No such file or directory" in done.stderr
        served = load.report.served
        wait_for(lambda: load.report.served > served + 5, 20, what="still serving")
    assert load.report.refused == 0 and load.report.failed == 0, load.report.summary()
    assert [e["event"] for e in events(a) if e["event"].startswith("reexec")] == ["reexec", "reexec-failed"]
    status = call("status", socket_path=str(sock))
    assert status["activator"]["reexec_failures"] == 1 and status["activator"]["reexecs"] == 0
    assert unit(sock, "daemon")["main_pid"] == pid
    # Everything was put back: the descriptors are close-on-exec again (a new daemon does not get them).
    call("restart", socket_path=str(sock), units=["daemon"])
    new = wait_for(lambda: (p := unit(sock, "daemon")["main_pid"]) not in (None, pid) and p, 20, what="a new daemon")
    fds = os.listdir(f"/proc/{new}/fd")
    assert len(fds) <= 8, fds  # stdio, its two sockets, the interpreter's own: not the control socket and more
    assert a.stop() == 0


@pytest.mark.parametrize("content, message", [
    (b"{not json", "not valid JSON (corrupted)"),
    (json.dumps({"format": reexec.FORMAT, "version": 99}).encode(), "state format version 99 is not supported"),
    (b'{"format": "something else"}', "is not an activator-state document"),
])
def test_the_check_refuses_a_corrupted_or_unknown_state(content, message):
    fd = os.memfd_create("state")
    try:
        os.write(fd, content)
        done = subprocess.run([PY, "-m", "activator", "--resume-check", str(fd)], pass_fds=(fd,),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    finally:
        os.close(fd)
    assert done.returncode == 1
    assert message in done.stdout and len(done.stdout.strip().splitlines()) == 1, done.stdout


def test_every_unit_field_is_carried_or_said_not_to_be():
    """A field added to UnitState (workers, graceful restarts, ...) is carried when it holds plain values;
    else it must be in NOT_CARRIED with why, or the export would refuse every re-exec."""
    names = {f.name for f in dataclasses.fields(UnitState)}
    assert set(reexec.NOT_CARRIED) <= names, set(reexec.NOT_CARRIED) - names
    from activator.ratelimit import RateLimit
    from activator.units import Unit

    us = UnitState(Unit.__new__(Unit), [], RateLimit(10, 5))
    us.instances = {12: "127.0.0.1", 13: None}
    us.leftovers = {7}
    us.paused_until = float("inf")
    encoded = json.loads(json.dumps(reexec.encode_fields(us, "u", {**reexec.NOT_CARRIED, "stats": ""})))
    back = UnitState(Unit.__new__(Unit), [], RateLimit(10, 5))
    reexec.decode_fields(back, encoded, "u", reexec.NOT_CARRIED)
    assert back.instances == us.instances and back.leftovers == {7} and back.paused_until == float("inf")
    assert back.start_limit == us.start_limit
    with pytest.raises(reexec.StateError, match="u.bogus: unknown to this version"):
        reexec.decode_fields(back, {"bogus": 1}, "u", reexec.NOT_CARRIED)


def test_reexec_by_signal_as_pid1_of_a_pid_namespace(activator, tmp_path):
    """`activator run` as PID 1 (a container): SIGRTMIN+25 re-executes it; the daemon (pid 2 inside) goes on."""
    from test_pid1 import Pid1, unshare_prefix

    port = free_port()
    sock = tmp_path / "control.sock"
    a = activator("run", "--log-format", "json", "--control-socket", sock, "--now", "-l", f"127.0.0.1:{port}", "--",
                  PY, ECHO, argv_prefix=unshare_prefix())
    p = Pid1(a)
    wait_for(lambda: unit_pid(sock), 20, what="the daemon")
    pid = unit_pid(sock)
    with ClientLoad(("127.0.0.1", port), clients=4, max_seconds=60, timeout=20) as load:
        wait_for(lambda: load.report.served >= 20, 30, what="the load to be served")
        p.signal(reexec.REEXEC_SIGNAL)
        done = wait_event(a, "reexec-done")
        served = load.report.served
        wait_for(lambda: load.report.served >= served + 20, 30, what="served after the re-exec")
    assert load.report.refused == 0 and load.report.failed == 0, load.report.summary()
    assert done["message"].startswith("took over 1 unit(s), 1 process(es)")
    status = call("status", socket_path=str(sock))
    assert status["activator"]["pid"] == 1 and status["activator"]["reexecs"] == 1
    assert unit_pid(sock) == pid
    p.signal(signal.SIGTERM)
    assert p.wait() == 0


def serve_one(activator, tmp_path: Path, units: str):
    """`activator serve` of the TOML ``units`` (one socket), JSON log, a control socket: (activator, socket)."""
    config = tmp_path / "u.toml"
    config.write_text(units)
    sock = tmp_path / "control.sock"
    a = activator("serve", "--log-format", "json", "--control-socket", sock, config)
    a.wait_listening()
    return a, sock


def unit_pid(sock: Path) -> int | None:
    try:
        return call("status", socket_path=str(sock))["units"][0]["main_pid"]
    except ControlError:
        return None


def test_a_busy_unit_refuses_the_reexec_saying_what_is_busy(activator, tmp_path):
    port = free_port()
    a, sock = serve_one(activator, tmp_path, f"""
[slow]
socket.listen-stream = "127.0.0.1:{port}"
service.exec-start-pre = ["sleep", "30"]
service.exec-start = ["{PY}", "{ECHO}"]
""")
    client = socket.create_connection(("127.0.0.1", port), timeout=10)  # triggers the start: sleep 30 first
    try:
        wait_for(lambda: unit(sock, "slow")["state"] == "starting", 20, what="the start job")
        done = ctl(sock, "reexec")
        assert done.returncode == 1
        assert "busy: unit slow: a start, exec-reload or control command is under way" in done.stderr, done.stderr
        assert call("status", socket_path=str(sock))["activator"]["reexecs"] == 0
    finally:
        client.close()
    assert a.stop() == 0


def test_a_notify_daemon_keeps_its_notify_socket_and_watchdog(activator, tmp_path):
    """type = notify with a watchdog: its NOTIFY_SOCKET, readiness and watchdog deadline are carried; the
    daemon's pings after the re-exec reach the new process, whose watchdog fires once they stop."""
    port = free_port()
    a, sock = serve_one(activator, tmp_path, f"""
[dog]
socket.listen-stream = "127.0.0.1:{port}"
service.type = "notify"
service.watchdog-sec = "3s"
service.exec-start = ["{PY}", "{DAEMONS / 'notifier.py'}", "activator", "watchdog", "{tmp_path}"]
""")
    call("start", socket_path=str(sock), units=["dog"])
    ready = wait_event(a, "ready")
    done = ctl(sock, "reexec")  # while it pings (3 pings a second apart, then it hangs)
    assert done.returncode == 0, done.stderr + a.log
    wait_event(a, "reexec-done")
    fired = wait_event(a, "watchdog", timeout=30)
    assert fired["pid"] == ready["pid"] and "no WATCHDOG=1 within 3s" in fired["message"]
    order = [e["event"] for e in events(a) if e["event"] in ("ready", "reexec-done", "watchdog")]
    assert order == ["ready", "reexec-done", "watchdog"], order
    assert a.stop() == 0


def test_the_metrics_endpoint_is_carried(two_units, activator, tmp_path):
    pytest.importorskip("prometheus_client")
    import urllib.request

    _, sock, ports, _, config = two_units
    metrics = free_port()
    a = activator("serve", "--log-format", "json", "--control-socket", sock, "--metrics-listen",
                  f"127.0.0.1:{metrics}", config)
    a.wait_listening(3, timeout=30)

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=20) as reply:
            return reply.read().decode()

    assert "activator_" in scrape()
    done = ctl(sock, "reexec")
    assert done.returncode == 0, done.stderr + a.log
    assert "activator_" in scrape()
    assert a.stop() == 0


def test_the_descriptor_store_is_carried(activator, tmp_path):
    """A connection a daemon put in its descriptor store before the re-exec is handed to its next run by the
    new process: the client keeps talking on the same connection to three generations of the daemon."""
    port = free_port()
    a, sock = serve_one(activator, tmp_path, f"""
[store]
socket.listen-stream = "127.0.0.1:{port}"
service.type = "notify"
service.file-descriptor-store-max = 4
service.restart = "on-failure"
service.restart-sec = "0.1s"
service.exec-start = ["{PY}", "{DAEMONS / 'notifier.py'}", "activator", "fdstore"]
""")
    client = socket.create_connection(("127.0.0.1", port), timeout=20)
    reader = client.makefile("rb")

    def ping(n: int) -> int:
        client.sendall(b"ping %d\n" % n)
        line = reader.readline()
        assert line.startswith(b"pong %d from " % n), line
        return int(line.split()[-1])

    def taken_back(count: int) -> None:  # the next run has the stored connection (before that, a ping is lost)
        wait_for(lambda: len([e for e in events(a) if e["event"] == "status" and "1 connection(s) taken back"
                              in e["message"]]) >= count, 30, what=f"run {count + 1} to take the connection back")

    try:
        first = ping(1)
        client.sendall(b"restart\n")  # stored, exits 3, restarted with it
        taken_back(1)
        second = ping(2)
        assert second != first
        done = ctl(sock, "reexec")
        assert done.returncode == 0, done.stderr + a.log
        wait_event(a, "reexec-done")
        client.sendall(b"restart\n")  # stored again; the new activator restarts it with the store it carried
        taken_back(2)
        third = ping(3)
        assert third not in (first, second)
        assert unit(sock, "store")["main_pid"] == third
    finally:
        reader.close()
        client.close()
    assert a.stop() == 0


def test_a_main_pid_that_is_not_our_child_is_still_watched(activator, tmp_path):
    """MAINPID= of a grandchild: its pidfd is carried, so the new process sees it exit."""
    port = free_port()
    a, sock = serve_one(activator, tmp_path, f"""
[main]
socket.listen-stream = "127.0.0.1:{port}"
service.type = "notify"
service.exec-start = ["{PY}", "{DAEMONS / 'notifier.py'}", "activator", "mainpid"]
""")
    call("start", socket_path=str(sock), units=["main"])
    wait_event(a, "ready")
    child = wait_for(lambda: unit_pid(sock), 20, what="the main pid")
    assert call("status", socket_path=str(sock))["units"][0]["main_pid"] == child
    done = ctl(sock, "reexec")
    assert done.returncode == 0, done.stderr + a.log
    wait_event(a, "reexec-done")
    assert unit_pid(sock) == child
    os.kill(child, signal.SIGKILL)  # the grandchild the test started through activator
    wait_for(lambda: [e for e in events(a) if e["event"] == "exit" and e["pid"] == child], 20,
             what="its exit, seen through the carried pidfd")
    assert a.stop() == 0


def test_a_new_process_that_fails_after_the_exec_stops_the_daemons(two_units, tmp_path):
    """No way back after the exec: a take-over that fails stops every daemon (none is left unsupervised)."""
    start, sock, ports, path, _ = two_units
    hook = ("import activator.supervisor as s\n"
            "def broken(self, state): raise OSError(5, 'broken on purpose')\n"
            "s.Engine.resume = broken\n"
            "from activator.__main__ import main; main()\n")
    wrapper = tmp_path / "broken-python"
    wrapper.write_text(f"#!/bin/sh\nexec {shlex.quote(PY)} -c {shlex.quote(hook)} \"$@\"\n")
    wrapper.chmod(0o755)
    a = start(env={reexec.ENV_EXECUTABLE: str(wrapper)})
    pid = daemon_pid(sock, ports["daemon"])
    done = ctl(sock, "reexec")  # the socket file goes when that activator exits: ctl says so at once
    assert done.returncode == 1 and ("exited during the re-exec" in done.stderr or "cannot take over" in done.stderr), \
        done.stdout + done.stderr
    failed = wait_event(a, "reexec-failed")
    assert "broken on purpose" in failed["message"] and "stopping everything" in failed["message"]
    assert a.wait(30) == 1
    assert not pid_alive(pid)
