"""sd_notify, both sides, with real sockets and real processes.

The client (activator.notify) against a receiving datagram socket; the launcher side
(type = "notify", watchdog, MAINPID, descriptor store) with daemons that use either
python-systemd's systemd.daemon.notify (run by /usr/bin/python3) or ours; and activator's
own READY=1 to its supervisor.
"""
from __future__ import annotations

import array
import errno
import json
import os
import re
import resource
import socket
import struct
import subprocess
import sys
import time

import pytest

import activator as act
from conftest import DAEMONS, PROBE, ROOT, connect, free_port, pid_alive, read_probe, require

NOTIFIER = str(DAEMONS / "notifier.py")
SYSTEM_PYTHON = "/usr/bin/python3"


def receiver(address: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    s.bind("\0" + address[1:] if address.startswith("@") else address)
    s.settimeout(10)
    return s


def receive(s: socket.socket):
    """(text, sender pid, received fds)."""
    data, anc, flags, _ = s.recvmsg(4096, socket.CMSG_SPACE(12) + socket.CMSG_SPACE(4 * 16))
    fds, pid = [], None
    for level, kind, payload in anc:
        if kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(payload)
            fds.extend(a)
        elif kind == socket.SCM_CREDENTIALS:
            pid = int.from_bytes(payload[:4], "little")
    return data.decode(), pid, fds


def python_systemd() -> None:
    require(SYSTEM_PYTHON)
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import systemd.daemon"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        require("python3-systemd-for-/usr/bin/python3")


def interpreter(impl: str) -> str:
    if impl == "systemd":
        python_systemd()
        return SYSTEM_PYTHON
    return sys.executable


# ------------------------------------------------------------------ the client
def test_notify_sends_every_assignment_to_a_path_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    with receiver(path) as r:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert act.notify("READY=1") is True
        assert receive(r)[:2] == ("READY=1", os.getpid())
        assert act.notify(f"STATUS=serving 3 clients\nMAINPID={os.getpid()}")
        assert receive(r)[0] == f"STATUS=serving 3 clients\nMAINPID={os.getpid()}"
        for line in ("STOPPING=1", "WATCHDOG=1", "RELOADING=1"):
            act.notify(line)
            assert receive(r)[0] == line
        a, b = socket.socketpair()
        with a, b:
            assert act.notify("FDSTORE=1\nFDNAME=conn", fds=[a.fileno()])
            text, pid, fds = receive(r)
            assert text == "FDSTORE=1\nFDNAME=conn" and pid == os.getpid() and len(fds) == 1
            with socket.socket(fileno=fds[0]) as got:
                got.sendall(b"through the stored descriptor")
                assert b.recv(100) == b"through the stored descriptor"
        assert act.notify("READY=1", unset_environment=True)
        assert "NOTIFY_SOCKET" not in os.environ


def test_notify_to_an_abstract_socket(monkeypatch):
    name = f"@activator-test-notify-{os.getpid()}-{time.monotonic_ns()}"
    with receiver(name) as r:
        monkeypatch.setenv("NOTIFY_SOCKET", name)
        assert act.notify("READY=1\nSTATUS=abstract")
        assert receive(r)[0] == "READY=1\nSTATUS=abstract"


def test_notify_without_socket_is_a_no_op_and_errors_are_oserrors(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert act.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    with pytest.raises(OSError) as info:
        act.notify("READY=1")
    assert info.value.errno == errno.EINVAL
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    with pytest.raises(OSError):
        act.notify("READY=1", unset_environment=True)
    assert "NOTIFY_SOCKET" not in os.environ


def test_same_datagrams_as_python_systemd(tmp_path):
    python_systemd()
    path = str(tmp_path / "notify")
    state = "READY=1\nSTATUS=same bytes"
    code = "import sys\n{imp}\nsys.exit(0 if {call} else 1)"
    with receiver(path) as r:
        env = dict(os.environ, NOTIFY_SOCKET=path, PYTHONPATH=str(ROOT))
        theirs = subprocess.run([SYSTEM_PYTHON, "-c", code.format(
            imp="from systemd import daemon", call=f"daemon.notify({state!r})")], env=env, timeout=30)
        ours = subprocess.run([SYSTEM_PYTHON, "-c", code.format(
            imp="import activator", call=f"activator.notify({state!r})")], env=env, timeout=30)
        assert theirs.returncode == ours.returncode == 0
        assert receive(r)[0] == receive(r)[0] == state


# ------------------------------------------------------------- launcher side
def toml_value(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)  # strings, numbers and arrays of strings read the same in TOML


def write_unit(tmp_path, port: int, argv: list[str], **service) -> str:
    """A TOML unit "notif" listening on 127.0.0.1:PORT, with these service keys (kebab-cased)."""
    lines = ["[notif]", f'socket.listen-stream = "127.0.0.1:{port}"', f"service.exec-start = {toml_value(argv)}"]
    for key, value in service.items():
        if value != {}:
            lines.append(f"service.{key.replace('_', '-')} = {toml_value(value)}")
    path = tmp_path / "notif.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def no_core():
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


@pytest.mark.parametrize("impl", ["systemd", "activator"])
def test_type_notify_daemon_reports_status_and_ready(activator, tmp_path, impl):
    port = free_port()
    unit = write_unit(tmp_path, port, [interpreter(impl), NOTIFIER, impl, "ready"], type="notify",
                      environment={"PYTHONPATH": str(ROOT)} if impl == "systemd" else {})
    a = activator("serve", unit)
    a.wait_listening()
    with connect(("127.0.0.1", port)) as c:
        hello = c.recv(100)
    pid = int(a.wait_log(r"notif: started \S+ as pid (\d+)").group(1))
    assert hello == b"hello from %d\n" % pid
    a.wait_log(r"notif: status: starting")
    a.wait_log(r"notif: status: serving")
    a.wait_log(r"notif: ready$")
    assert a.stop() == 0


def test_readiness_timeout_stops_the_daemon_and_counts_as_a_failure(activator, tmp_path):
    port = free_port()
    unit = write_unit(tmp_path, port, [sys.executable, NOTIFIER, "activator", "never-ready"], type="notify",
                      timeout_start_sec="500ms", restart="on-failure", restart_sec="30s")
    a = activator("serve", unit)
    a.wait_listening()
    started = time.monotonic()
    connect(("127.0.0.1", port)).close()
    a.wait_log(r"notif: status: warming up")
    a.wait_log(r"no READY=1 within 0.5s, stopping")
    assert time.monotonic() - started >= 0.45
    a.wait_log(r"notif: pid \d+ exited|killed by signal SIGTERM")
    a.wait_log(r"restarting in 30s \(restart=on-failure\)")
    assert "notif: ready" not in a.log
    assert a.stop() == 0


def test_watchdog_restarts_a_daemon_that_stops_pinging(activator, tmp_path):
    port = free_port()
    unit = write_unit(tmp_path, port, [sys.executable, NOTIFIER, "activator", "watchdog", str(tmp_path)],
                      type="notify", watchdog_sec="600ms", restart="on-failure", restart_sec="100ms")
    a = activator("serve", unit, preexec_fn=no_core)
    a.wait_listening()
    connect(("127.0.0.1", port)).close()
    first = int(a.wait_log(r"notif: started \S+ as pid (\d+)").group(1))
    a.wait_log(r"notif: ready$")
    a.wait_log(r"watchdog timeout \(no WATCHDOG=1 within 0.6s\), sending SIGABRT")
    a.wait_log(rf"notif: pid {first} killed by signal SIGABRT")
    a.wait_log(r"restarting in 0.1s \(restart=on-failure\)")
    second = int(a.wait_log(r"notif: started \S+ as pid (\d+)", count=2).group(1))
    a.wait_log(r"notif: ready$", count=2)
    assert second != first
    # The second run keeps pinging: no second timeout over several watchdog periods.
    time.sleep(2.0)
    assert len(re.findall("watchdog timeout", a.log)) == 1
    assert pid_alive(second)
    assert a.stop() == 0


def test_watchdog_environment_names_the_daemon_itself(activator, tmp_path):
    # sd_watchdog_enabled() ignores WATCHDOG_USEC when WATCHDOG_PID names another process:
    # like LISTEN_PID, it is written in the child, so it is the daemon's own pid.
    port = free_port()
    report = tmp_path / "report.json"
    unit = write_unit(tmp_path, port, [sys.executable, PROBE, str(report)], watchdog_sec="30s")
    a = activator("serve", unit)
    a.wait_listening()
    with connect(("127.0.0.1", port)) as c:
        c.recv(100)
    info = read_probe(report)
    assert info["env"]["WATCHDOG_PID"] == str(info["pid"]) == info["env"]["LISTEN_PID"]
    assert info["env"]["WATCHDOG_USEC"] == "30000000"
    assert a.stop() == 0


def test_mainpid_moves_supervision_to_the_child(activator, tmp_path):
    port = free_port()
    unit = write_unit(tmp_path, port, [sys.executable, NOTIFIER, "activator", "mainpid"], type="notify")
    a = activator("serve", unit)
    a.wait_listening()
    with connect(("127.0.0.1", port)) as c:
        hello = c.recv(100)
    child = int(a.wait_log(r"notif: main pid is now (\d+)").group(1))
    assert hello == b"hello from %d\n" % child
    a.wait_log(r"notif: ready$")
    started = time.monotonic()
    assert a.stop() == 0
    assert time.monotonic() - started < 5  # the stop saw both processes go, whichever went first
    assert "did not go away" not in a.log and "SIGKILL" not in a.log
    assert not pid_alive(child)


def test_messages_from_other_processes_are_ignored(activator, tmp_path, monkeypatch):
    port = free_port()
    report = tmp_path / "report.json"
    a = activator("run", "-v", "--type", "notify", "-l", f"127.0.0.1:{port}", "--", sys.executable, PROBE, report)
    a.wait_listening()
    connect(("127.0.0.1", port)).close()
    info = read_probe(report)
    monkeypatch.setenv("NOTIFY_SOCKET", info["env"]["NOTIFY_SOCKET"])
    act.notify("READY=1\nSTATUS=spoofed")
    a.wait_log(rf"ignored a message from pid {os.getpid()}: not a daemon of ours")
    assert "spoofed" not in a.log and "ready" not in a.log.replace("unit(s) ready", "")
    assert a.stop() == 0


@pytest.mark.parametrize("impl", ["systemd", "activator"])
def test_fd_store_keeps_a_client_connection_across_a_restart(activator, tmp_path, impl):
    port = free_port()
    unit = write_unit(tmp_path, port, [interpreter(impl), NOTIFIER, impl, "fdstore"], type="notify",
                      restart="on-failure", restart_sec="100ms", file_descriptor_store_max=4,
                      environment={"PYTHONPATH": str(ROOT)} if impl == "systemd" else {})
    a = activator("serve", unit)
    a.wait_listening()
    with connect(("127.0.0.1", port)) as c:
        f = c.makefile("rb")
        c.sendall(b"ping 1\n")
        first = int(re.fullmatch(rb"pong 1 from (\d+)\n", f.readline()).group(1))
        c.sendall(b"restart\n")
        a.wait_log(r"notif: stored 1 descriptor\(s\) as 'conn' \(1 in store\)")
        a.wait_log(rf"notif: pid {first} exited with status 3")
        second = int(a.wait_log(r"notif: started \S+ as pid (\d+)", count=2).group(1))
        a.wait_log(r"notif: status: 1 connection\(s\) taken back")
        c.sendall(b"ping 2\n")
        assert f.readline() == b"pong 2 from %d\n" % second
        assert second != first
        f.close()
    a.wait_log(r"removed 1 stored descriptor\(s\) named 'conn'")
    assert a.stop() == 0


def test_stored_connection_that_hangs_up_leaves_the_store(activator, tmp_path):
    port = free_port()
    unit = write_unit(tmp_path, port, [sys.executable, NOTIFIER, "activator", "fdstore"], type="notify",
                      restart="on-failure", restart_sec="60s", file_descriptor_store_max=1)
    a = activator("serve", unit)
    a.wait_listening()
    c = connect(("127.0.0.1", port))
    c.sendall(b"restart\n")
    a.wait_log(r"notif: stored 1 descriptor\(s\) as 'conn' \(1 in store\)")
    a.wait_log(r"restarting in 60s")
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()  # a reset: the stored end gets EPOLLHUP|EPOLLERR
    a.wait_log(r"notif: stored descriptor 'conn' hung up: removed")
    assert a.stop() == 0


def test_fd_store_disabled_by_default_closes_what_is_sent(activator, tmp_path):
    port = free_port()
    unit = write_unit(tmp_path, port, [sys.executable, NOTIFIER, "activator", "fdstore"], type="notify",
                      restart="on-failure", restart_sec="100ms")
    a = activator("serve", unit)
    a.wait_listening()
    with connect(("127.0.0.1", port)) as c:
        c.sendall(b"restart\n")
        a.wait_log(r"sent with FDSTORE=1 but file-descriptor-store-max is 0: closed")
        c.settimeout(10)
        assert c.recv(100) == b""  # nobody holds the connection any more
    assert a.stop() == 0


# ---------------------------------------------------- activator as a notify daemon
def test_activator_sends_ready_once_bound_and_strips_notify_socket(activator, tmp_path):
    path = str(tmp_path / "outer-notify")
    port = free_port()
    report = tmp_path / "report.json"
    with receiver(path) as r:
        a = activator("run", "-l", f"127.0.0.1:{port}", "--", sys.executable, PROBE, report,
                      env={"NOTIFY_SOCKET": path})
        text, pid, _ = receive(r)
        assert pid == a.pid
        assert set(text.split("\n")) == {"READY=1", f"MAINPID={a.pid}"}
        # READY=1 means bound: the port answers at once.
        with connect(("127.0.0.1", port)) as c:
            assert c.recv(100).startswith(b"hello from")
    env = read_probe(report)["env"]
    assert "NOTIFY_SOCKET" not in env and "WATCHDOG_USEC" not in env
    assert a.stop() == 0


def test_notify_daemon_gets_activators_own_socket_not_the_outer_one(activator, tmp_path):
    path = str(tmp_path / "outer-notify")
    port = free_port()
    report = tmp_path / "report.json"
    with receiver(path) as r:
        a = activator("run", "--type", "notify", "-l", f"127.0.0.1:{port}", "--", sys.executable, PROBE, report,
                      env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
        receive(r)
        connect(("127.0.0.1", port)).close()
        env = read_probe(report)["env"]
    assert env["NOTIFY_SOCKET"] != path and "activator-notify-" in env["NOTIFY_SOCKET"]
    assert "WATCHDOG_USEC" not in env
    notify_dir = os.path.dirname(env["NOTIFY_SOCKET"])
    assert os.path.isdir(notify_dir)
    assert a.stop() == 0
    assert not os.path.exists(notify_dir)
