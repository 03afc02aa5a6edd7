"""A supervisor nothing can knock over: what daemons, other users, signals and the OS do must not
crash activator, orphan a daemon, or make it act twice. Real processes, real sockets."""
from __future__ import annotations

import json
import os
import pwd
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from conftest import IN_CI, connect, free_port, pid_alive, wait_for

SYSTEM_PYTHON = "/usr/bin/python3"  # readable by nobody wherever the checkout is
needs_root = pytest.mark.skipif(os.geteuid() != 0 and not IN_CI, reason="needs root (runs daemons as nobody)")


def write_config(path: Path, text: str) -> Path:
    """Atomically: a SIGHUP still in flight must never make activator read a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(textwrap.dedent(text))
    os.replace(tmp, path)
    return path


def events(a, name: str) -> list[dict]:
    found = []
    for line in a.lines:
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("event") == name:
                found.append(record)
    return found


def wait_event(a, name: str, timeout: float = 10.0, count: int = 1) -> list[dict]:
    return wait_for(lambda: len(events(a, name)) >= count and events(a, name), timeout, what=f"event {name!r}")


def public_dir() -> str:
    """A directory any user can write to, for daemons that run as nobody (removed by the caller)."""
    d = tempfile.mkdtemp(prefix="activator-test-")
    os.chmod(d, 0o777)
    return d


NOTIFY_DAEMON = r"""
import os, socket, sys, time
addr = os.environ["NOTIFY_SOCKET"]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.connect("\0" + addr[1:] if addr.startswith("@") else addr)
for message in sys.argv[1:]:
    s.send(message.encode())
    time.sleep(0.05)
lsock = socket.socket(fileno=3)
while True:
    c, _ = lsock.accept()
    c.sendall(b"alive\n")
    c.close()
"""


@needs_root
@pytest.mark.parametrize("messages,refused", [
    (["READY=1", "WATCHDOG_USEC=2200000000000"], False),  # 25 days: beyond epoll's range, within the bound
    (["EXTEND_TIMEOUT_USEC=2200000000000", "READY=1"], False),
    (["READY=1", "WATCHDOG_USEC=99999999999999999999999999"], True),
    (["EXTEND_TIMEOUT_USEC=99999999999999999999999999", "READY=1"], True),
    (["MAINPID=99999999999999999999", "READY=1"], True),
])
def test_hostile_notify_values_from_an_unprivileged_daemon(activator, tmp_path, messages, refused):
    port, other = free_port(), free_port()
    cfg = write_config(tmp_path / "u.toml", f"""
        [hostile]
        socket.listen-stream = "127.0.0.1:{port}"
        service.exec-start = {json.dumps([SYSTEM_PYTHON, "-c", NOTIFY_DAEMON, *messages])}
        service.type = "notify"
        service.user = "nobody"
        [other]
        socket.listen-stream = "127.0.0.1:{other}"
        socket.accept = true
        service.exec-start = ["echo", "other"]
        service.standard-input = "socket"
    """)
    a = activator("serve", "--log-format", "json", cfg)
    a.wait_listening(2)
    c = connect(("127.0.0.1", port))
    assert c.recv(100) == b"alive\n"
    c.close()
    wait_event(a, "ready")
    if refused:
        wait_event(a, "notify")  # the value was refused, with a warning
    assert a.proc.poll() is None, a.log
    with connect(("127.0.0.1", other)) as c:
        assert c.recv(100) == b"other\n"
    assert a.stop() == 0
    assert "Traceback" not in a.log


def test_stop_reaches_the_daemon_when_activator_is_out_of_descriptors(activator, tmp_path):
    # The daemon fills activator's descriptor table through the fd store; /proc cannot be read then.
    script = tmp_path / "hog.py"
    script.write_text(textwrap.dedent(r"""
        import array, os, resource, signal, socket, sys
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # ours is activator's low soft limit
        addr = os.environ["NOTIFY_SOCKET"]
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.connect(addr)
        s.send(b"READY=1")
        for i in range(200):
            r, w = os.pipe()  # one descriptor a message: the store fills activator's table to the last slot
            try:
                s.sendmsg([b"FDSTORE=1\nFDNAME=p%d" % i],
                          [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]).tobytes())])
            except OSError:
                pass  # activator out of descriptors: what it could not take is lost
        open(sys.argv[1], "w").write(str(os.getpid()))
        while True:
            signal.pause()
    """))
    cfg = write_config(tmp_path / "u.toml", f"""
        [hog]
        socket.listen-stream = "{tmp_path}/hog.sock"
        socket.remove-on-stop = true
        service.exec-start = ["{sys.executable}", "{script}", "{tmp_path}/pid"]
        service.type = "notify"
        service.file-descriptor-store-max = 1000
        service.timeout-stop-sec = 5
    """)

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 4096))

    a = activator("serve", "--log-format", "json", cfg, preexec_fn=low_limit)
    a.wait_listening()
    connect(str(tmp_path / "hog.sock")).close()
    pid_file = tmp_path / "pid"
    wait_for(lambda: pid_file.exists() and pid_file.read_text(), what="the daemon to fill the store")
    daemon = int(pid_file.read_text())
    assert a.stop() == 0
    assert events(a, "proc"), "the stop did not run out of descriptors: the test proves nothing"
    assert not pid_alive(daemon), "the daemon was orphaned"
    assert not (tmp_path / "hog.sock").exists()
    assert "Traceback" not in a.log


def test_reload_storm_never_runs_two_generations(activator, tmp_path):
    port = free_port()
    pids = tmp_path / "pids"
    daemon = f"trap '' TERM; echo $$ >> {pids}; exec sleep 60"

    def config(gen):
        return write_config(tmp_path / "u.toml", f"""
            [drain]
            socket.listen-stream = "127.0.0.1:{port}"
            service.exec-start = ["sh", "-c", "{daemon}"]
            service.environment = {{ GEN = "{gen}" }}
            service.timeout-stop-sec = 30
        """)

    cfg = config(0)
    a = activator("serve", cfg)
    a.wait_listening()
    connect(("127.0.0.1", port)).close()
    wait_for(lambda: pids.exists() and pids.read_text().strip(), what="the first daemon")
    for gen in range(1, 4):
        config(gen)
        for _ in range(30):
            a.signal(signal.SIGHUP)
        a.wait_log(r"reloaded: 0 unchanged, 1 changed", count=gen, timeout=20)
        c = socket.socket()
        c.settimeout(0.3)
        try:
            c.connect(("127.0.0.1", port))  # waits in the backlog: nobody may start for it yet
        except OSError:
            pass
        finally:
            c.close()
    time.sleep(0.3)  # give a wrongly started second generation the time to write its pid
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 1, f"{len(started)} daemons started while the first was still draining"
    assert a.stop(40) == 0


def test_sighup_during_a_stop_binds_nothing(activator, tmp_path):
    port, added = free_port(), free_port()
    cfg = write_config(tmp_path / "u.toml", f"""
        [slow]
        socket.listen-stream = "127.0.0.1:{port}"
        service.exec-start = ["sh", "-c", "trap '' TERM USR1; exec sleep 60"]
        service.timeout-stop-sec = 30
    """)
    a = activator("serve", "-v", cfg)
    a.wait_listening()
    connect(("127.0.0.1", port)).close()
    wait_for(lambda: a.children(), what="the daemon")
    a.signal(signal.SIGTERM)
    a.wait_log("stopping")
    cfg.write_text(cfg.read_text() + f'\n[added]\nsocket.listen-stream = "127.0.0.1:{added}"\n'
                                      'service.exec-start = "true"\n')
    a.signal(signal.SIGHUP)
    a.signal(signal.SIGUSR1)  # a signal handled after the SIGHUP: once it is logged, the SIGHUP was seen
    a.wait_log("forwarded SIGUSR1")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", added), timeout=1)
    assert "reloaded" not in a.log
    a.signal(signal.SIGTERM)
    assert a.wait(10) == 0


def test_a_second_sigterm_sent_at_once_still_kills_at_once(activator):
    port = free_port()
    a = activator("run", "--timeout-stop", "60s", "-l", f"127.0.0.1:{port}", "--",
                  "sh", "-c", "trap '' TERM; exec sleep 120")
    a.wait_listening()
    connect(("127.0.0.1", port)).close()
    wait_for(lambda: a.children(), what="the daemon")
    # Two SIGTERMs sent back to back are merged by the kernel when the first is still pending;
    # two that were both delivered before the loop read its signal pipe are two (tests/test_engine.py).
    os.kill(a.pid, signal.SIGTERM)
    a.wait_log("SIGTERM received, stopping")
    os.kill(a.pid, signal.SIGTERM)
    assert a.wait(10) == 0
    assert "again: killing what is left" in a.log


def test_the_kill_signal_reaches_the_main_process_once(activator, tmp_path):
    # A real-time signal as the kill signal: those queue instead of merging, so the daemon can
    # count exactly how many it was sent (a daemon that force-quits on a second SIGINT cares).
    port = free_port()
    seen = tmp_path / "count"
    rt = signal.SIGRTMIN
    daemon = textwrap.dedent(f"""
        import signal, time
        signal.pthread_sigmask(signal.SIG_BLOCK, [{int(rt)}])
        open({str(seen)!r}, "w").write("ready")
        count = 0
        while signal.sigtimedwait([{int(rt)}], 60) is not None:
            count += 1
            while signal.sigtimedwait([{int(rt)}], 0.3) is not None:
                count += 1
            break
        open({str(seen)!r}, "w").write(str(count))
    """)
    a = activator("run", "--kill-signal", str(int(rt)), "-l", f"127.0.0.1:{port}", "--", sys.executable, "-c", daemon)
    a.wait_listening()
    connect(("127.0.0.1", port)).close()
    wait_for(lambda: seen.exists() and seen.read_text() == "ready", what="the daemon")
    assert a.stop() == 0
    assert seen.read_text() == "1", f"the daemon got the kill signal {seen.read_text()} times"


def test_processes_left_behind_are_stopped_before_the_unit_is_armed_again(activator, tmp_path):
    port = free_port()
    left = tmp_path / "left"
    starts = tmp_path / "starts"
    # The main process leaves a child in a session of its own, ignoring SIGTERM, holding the socket.
    daemon = (f"echo x >> {starts}; setsid sh -c 'trap \"\" TERM; echo $$ > {left}; exec sleep 120' "
              "</dev/null >/dev/null 2>&1 & sleep 0.2; exit 0")
    a = activator("run", "--log-format", "json", "--timeout-stop", "1s", "-l", f"127.0.0.1:{port}", "--",
                  "sh", "-c", daemon)
    a.wait_listening()
    connect(("127.0.0.1", port)).close()
    wait_for(lambda: left.exists() and left.read_text().strip(), what="the left-over child")
    child = int(left.read_text())
    wait_event(a, "leftovers")
    wait_for(lambda: not pid_alive(child), timeout=10, what="the left-over child to be killed")
    with connect(("127.0.0.1", port)):
        wait_for(lambda: starts.read_text().count("x") == 2, what="a fresh daemon for the next client")
    assert a.stop() == 0


def test_now_restart_always_is_restarted_after_a_start_limit_pause(activator, tmp_path):
    port = free_port()
    starts = tmp_path / "starts"
    a = activator("run", "--now", "--restart", "always", "--restart-sec", "0", "--start-limit-burst", "3",
                  "--start-limit-interval", "1s", "-l", f"127.0.0.1:{port}", "--",
                  "sh", "-c", f"echo x >> {starts}; exit 1")
    a.wait_log("start limit hit")
    wait_for(lambda: starts.read_text().count("x") >= 4, timeout=10, what="a restart after the pause, no client")
    assert a.stop() == 0


@needs_root
def test_user_daemons_get_user_logname_home_and_shell(activator, tmp_path):
    port = free_port()
    out = Path(public_dir()) / "env"
    try:
        cfg = write_config(tmp_path / "u.toml", f"""
            [env]
            socket.listen-stream = "127.0.0.1:{port}"
            service.exec-start = ["/bin/sh", "-c", "env > {out}"]
            service.user = "nobody"
        """)
        a = activator("serve", cfg, env={"HOME": "/root", "USER": "root"})
        a.wait_listening()
        connect(("127.0.0.1", port)).close()
        wait_for(lambda: out.exists() and "HOME=" in out.read_text(), what="the daemon's environment")
        env = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
        pw = pwd.getpwnam("nobody")
        assert (env["USER"], env["LOGNAME"], env["HOME"], env["SHELL"]) == ("nobody", "nobody", pw.pw_dir, pw.pw_shell)
        assert a.stop() == 0
    finally:
        subprocess.run(["rm", "-rf", str(out.parent)], check=False)


def _send_as(uid: int, gid: int, address: str, count: int) -> int:
    """Fork a process running as uid/gid that sends ``count`` datagrams to address; its exit code
    is 13 when the socket refused it (EACCES), 0 when they were sent."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            for _ in range(count):
                s.sendto(b"READY=1", address)
            code = 0
        except PermissionError:
            code = 13
        except OSError:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@needs_root
def test_other_users_cannot_reach_a_units_notify_socket(activator, tmp_path):
    port = free_port()
    report = tmp_path / "notify"
    daemon = f"import os; open({str(report)!r}, 'w').write(os.environ['NOTIFY_SOCKET']); import time; time.sleep(60)"
    cfg = write_config(tmp_path / "u.toml", f"""
        [n]
        socket.listen-stream = "127.0.0.1:{port}"
        service.exec-start = ["{sys.executable}", "-c", "{daemon}"]
        service.type = "notify"
        service.timeout-start-sec = 60
    """)
    a = activator("serve", cfg)
    a.wait_listening()
    connect(("127.0.0.1", port)).close()
    address = wait_for(lambda: report.exists() and report.read_text(), what="the daemon's NOTIFY_SOCKET")
    assert not address.startswith("@")
    nobody = pwd.getpwnam("nobody")
    assert _send_as(nobody.pw_uid, nobody.pw_gid, address, 1000) == 13
    assert "ready" not in a.log
    assert a.stop() == 0


def test_notify_flood_from_a_stranger_costs_little_and_other_units_keep_their_latency(activator, tmp_path):
    """A process that is not the daemon (same user) floods the unit's notify socket for 2 s."""
    port, other = free_port(), free_port()
    report = tmp_path / "notify"
    daemon = f"import os, time; open({str(report)!r}, 'w').write(os.environ['NOTIFY_SOCKET']); time.sleep(60)"
    cfg = write_config(tmp_path / "u.toml", f"""
        [n]
        socket.listen-stream = "127.0.0.1:{port}"
        service.exec-start = ["{sys.executable}", "-c", "{daemon}"]
        service.type = "notify"
        service.timeout-start-sec = 60
        [echo]
        socket.listen-stream = "127.0.0.1:{other}"
        socket.accept = true
        service.exec-start = ["cat"]
        service.standard-input = "socket"
    """)
    a = activator("serve", cfg)
    a.wait_listening(2)
    connect(("127.0.0.1", port)).close()
    address = wait_for(lambda: report.exists() and report.read_text(), what="the daemon's NOTIFY_SOCKET")

    def cpu() -> float:
        with open(f"/proc/{a.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    flood = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import socket, time
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.setblocking(False)
        end = time.monotonic() + 2
        while time.monotonic() < end:
            try:
                s.sendto(b"READY=1\\nSTATUS=flood", {address!r})
            except BlockingIOError:
                time.sleep(0.0005)
    """)])
    before = cpu()
    latencies = []
    try:
        while flood.poll() is None and len(latencies) < 200:
            t = time.monotonic()
            with connect(("127.0.0.1", other)) as c:
                c.sendall(b"x")
                assert c.recv(1) == b"x"
            latencies.append(time.monotonic() - t)
    finally:
        flood.wait(10)
    used = cpu() - before
    latencies.sort()
    print(f"flood: activator CPU {used:.2f}s over 2s; echo latency median {latencies[len(latencies) // 2] * 1000:.1f} ms, "
          f"max {latencies[-1] * 1000:.1f} ms over {len(latencies)} connections")
    assert "status: flood" not in a.log and "ready" not in a.log.split("listening")[-1]
    assert used < 1.5, f"activator used {used:.2f}s of CPU in 2s of flood"
    assert a.stop() == 0


def test_changed_socket_options_reach_the_next_daemon_after_a_reload(activator, tmp_path):
    port = free_port()
    report = tmp_path / "opts"
    daemon = (f"import socket; s = socket.socket(fileno=3); "
              f"open({str(report)!r}, 'w').write(str(s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)))")

    def config(keep_alive):
        return write_config(tmp_path / "u.toml", f"""
            [opts]
            socket.listen-stream = "127.0.0.1:{port}"
            socket.keep-alive = {str(keep_alive).lower()}
            service.exec-start = ["{sys.executable}", "-c", "{daemon}"]
        """)

    cfg = config(False)
    a = activator("serve", cfg)
    a.wait_listening()
    connect(("127.0.0.1", port)).close()
    wait_for(lambda: report.exists() and report.read_text() == "0", what="the first report")
    a.wait_log("exited with status 0")
    report.unlink()
    config(True)
    a.signal(signal.SIGHUP)
    a.wait_log(r"reloaded: 0 unchanged, 1 changed")
    connect(("127.0.0.1", port)).close()
    wait_for(lambda: report.exists() and report.read_text(), what="the second report")
    assert report.read_text() == "1"
    assert a.stop() == 0


def test_a_unit_removed_and_added_back_while_its_daemon_drains(activator, tmp_path):
    """Removed, then added back before its old daemon has gone: it takes the socket the old one still
    holds (instead of failing to bind beside it) and starts once that daemon is gone."""
    port = free_port()
    pids = tmp_path / "pids"
    unit = f"""
        [drain]
        socket.listen-stream = "127.0.0.1:{port}"
        service.exec-start = ["sh", "-c", "trap '' TERM USR1; echo $$ >> {pids}; exec sleep 60"]
        service.timeout-stop-sec = 30
    """
    other = '\n[other]\nsocket.listen-stream = "@activator-test-other-%d"\nservice.exec-start = "true"\n' % os.getpid()
    cfg = write_config(tmp_path / "u.toml", unit + other)
    a = activator("serve", cfg)
    a.wait_listening(2)
    connect(("127.0.0.1", port)).close()
    first = int(wait_for(lambda: pids.exists() and pids.read_text().split(), what="the daemon")[0])
    write_config(cfg, other)
    a.signal(signal.SIGHUP)
    a.wait_log(r"reloaded: 1 unchanged, 0 changed, 0 added, 1 removed")
    write_config(cfg, unit + other)
    a.signal(signal.SIGHUP)
    a.wait_log(r"reloaded: 1 unchanged, 0 changed, 1 added, 0 removed")
    with connect(("127.0.0.1", port)):  # waits in the backlog of the very same socket
        assert pids.read_text().split() == [str(first)], "a second daemon started while the first drains"
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: len(pids.read_text().split()) == 2, what="the daemon of the unit added back")
    assert a.stop(40) == 0


def test_a_reload_that_reads_no_units_keeps_the_running_ones(activator, tmp_path):
    port = free_port()
    cfg = write_config(tmp_path / "u.toml", f'[u]\nsocket.listen-stream = "127.0.0.1:{port}"\nservice.exec-start = "true"\n')
    a = activator("serve", cfg)
    a.wait_listening()
    cfg.write_text("")  # an editor that truncates before it writes
    a.signal(signal.SIGHUP)
    a.wait_log("reload failed, keeping the running configuration: no units")
    connect(("127.0.0.1", port)).close()  # still listening
    assert a.stop() == 0


def test_an_instance_that_cannot_exec_is_reported_when_it_is_reaped(activator, tmp_path):
    """Per-connection instances do not wait for their exec: a failure (here ENOEXEC) is logged once reaped."""
    port = free_port()
    bogus = tmp_path / "bogus"
    bogus.write_bytes(b"\x7fELF not really")
    bogus.chmod(0o755)
    a = activator("run", "--log-format", "json", "-a", "-l", f"127.0.0.1:{port}", "--", str(bogus))
    a.wait_listening()
    with connect(("127.0.0.1", port)) as c:
        assert c.recv(1) == b""  # the instance never ran: the connection just ends
    failed = wait_event(a, "start-failed")
    assert "not an executable format" in failed[0]["message"]
    assert a.proc.poll() is None
    assert a.stop() == 0
