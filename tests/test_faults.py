"""Faults: descriptor exhaustion, crash-looping daemons, daemons killed, deaf or wedged.

In each case activator must notice, log, keep its sockets, stay cheap on CPU,
carry on once the fault is gone, and leak nothing.

The crash loop runs for CRASH_WINDOW seconds with start limits scaled to it
(8 s with StartLimitIntervalSec=2s in CI); ACTIVATOR_LONG_TESTS=1 runs it for
30 s with systemd's defaults (5 starts in 10 s), as the issue asks.
"""
from __future__ import annotations

import os
import resource
import signal
import socket
import sys
import textwrap
import threading
import time

from conftest import children, fd_count, free_port, wait_for

LONG = bool(os.environ.get("ACTIVATOR_LONG_TESTS"))
CLK_TCK = os.sysconf("SC_CLK_TCK")

# A small Accept=no daemon whose behaviour is chosen by a file, so a test can change it between starts.
DAEMON = textwrap.dedent(
    """
    import os, socket, sys, time
    mode = open(sys.argv[1]).read().strip()
    with open(sys.argv[2], "a") as f:
        f.write(f"{os.getpid()} {mode}\\n")
    if mode == "crash":
        sys.exit(1)
    lsock = socket.socket(fileno=3)
    if mode == "close-and-stay":
        lsock.close()
        time.sleep(3600)
    if mode == "never-accept":
        time.sleep(3600)
    if mode == "hold":  # accept one client, greet it, then hang on to it
        conn, _ = lsock.accept()
        conn.sendall(b"held\\n")
        time.sleep(3600)
    while True:  # serve
        conn, _ = lsock.accept()
        conn.sendall(b"hello from %d\\n" % os.getpid())
        conn.close()
    """
)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Daemon:
    def __init__(self, tmp_path, mode: str):
        self.script = tmp_path / "daemon.py"
        self.script.write_text(DAEMON)
        self.mode_file = tmp_path / "mode"
        self.starts_file = tmp_path / "starts"
        self.set(mode)

    def set(self, mode: str) -> None:
        tmp = self.mode_file.with_suffix(".tmp")
        tmp.write_text(mode)
        os.rename(tmp, self.mode_file)

    def argv(self) -> list[str]:
        return [sys.executable, str(self.script), str(self.mode_file), str(self.starts_file)]

    def starts(self) -> list[tuple[int, str]]:
        if not self.starts_file.exists():
            return []
        return [(int(p), m) for p, m in (line.split() for line in self.starts_file.read_text().splitlines())]


def greet(port: int, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        return s.recv(100)


# ------------------------------------------------------------- descriptor exhaustion
def test_descriptor_exhaustion_no_busy_loop_and_recovery(activator):
    port = free_port()
    a = activator("run", "-a", "--inetd", "-l", f"127.0.0.1:{port}", "--", "cat")
    a.wait_listening()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as warm:  # first spawn opens what it keeps
        warm.sendall(b"x")
        assert warm.recv(1) == b"x"
    wait_for(lambda: not children(a.pid), 10, what="the warm-up instance to exit")
    idle_fds = fd_count(a.pid)
    # Daemons holding connections while activator runs out of descriptors.
    held = []
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"a")
        assert s.recv(1) == b"a"
        held.append(s)
    # activator closes its copy of each connection right after the spawn: wait for that, so no hole is left.
    wait_for(lambda: fd_count(a.pid) == idle_fds, 10, what="activator's descriptors back to idle")
    base_fds = fd_count(a.pid)
    used = {int(x) for x in os.listdir(f"/proc/{a.pid}/fd")}
    lowest_free = min(set(range(len(used) + 1)) - used)
    soft, hard = resource.prlimit(a.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(a.pid, resource.RLIMIT_NOFILE, (lowest_free, hard))  # the next accept gets EMFILE
    try:
        waiting = socket.create_connection(("127.0.0.1", port), timeout=10)
        waiting.sendall(b"w")
        a.wait_log(r"cannot accept on 127\.0\.0\.1:\d+: Too many open files; pausing")
        cpu0, t0 = cpu_seconds(a.pid), time.monotonic()
        time.sleep(2.0)  # measuring CPU over a fixed window is the point here
        cpu = (cpu_seconds(a.pid) - cpu0) / (time.monotonic() - t0)
        assert cpu < 0.05, f"activator used {cpu:.0%} CPU while out of descriptors"
        for s in held:  # the daemons keep serving their connections meanwhile
            s.sendall(b"b")
            assert s.recv(1) == b"b"
        warnings = a.log.count("Too many open files")
        assert warnings <= 4, f"{warnings} log lines in 2s: the pause is not working"
    finally:
        resource.prlimit(a.pid, resource.RLIMIT_NOFILE, (soft, hard))  # descriptors free again
    waiting.settimeout(10)
    assert waiting.recv(1) == b"w", "the connection waiting in the backlog was not served after recovery"
    waiting.close()
    for s in held:
        s.close()
    wait_for(lambda: not children(a.pid), 10, what="instances to exit")
    assert fd_count(a.pid) == base_fds
    print(f"\nEMFILE: {warnings} warning line(s), activator CPU {cpu:.1%} over 2s, recovered; fds {base_fds}")
    assert a.stop() == 0


# ------------------------------------------------------------- crash loop
def test_crash_loop_bounded_and_recovers(activator, tmp_path):
    window = 30.0 if LONG else 8.0
    interval, burst = (10.0, 5) if LONG else (2.0, 5)
    port = free_port()
    d = Daemon(tmp_path, "crash")
    a = activator(
        "run", "--restart", "always", "--restart-sec", "0", "--start-limit-interval", f"{interval:g}s",
        "--start-limit-burst", burst, "-l", f"127.0.0.1:{port}", "--now", "--", *d.argv(),
    )
    a.wait_listening()
    refused = []
    connected = [0]
    halt = threading.Event()

    def client():  # keeps connecting; the socket must stay held (no ECONNREFUSED)
        while not halt.is_set():
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                connected[0] += 1
                s.close()
            except ConnectionRefusedError:
                refused.append(time.monotonic())
            halt.wait(0.1)

    cpu0, t0 = cpu_seconds(a.pid), time.monotonic()
    th = threading.Thread(target=client, daemon=True)
    th.start()
    time.sleep(window)  # the test is "for a given time": the window itself is what is measured
    halt.set()
    th.join(10)
    wall = time.monotonic() - t0
    cpu = (cpu_seconds(a.pid) - cpu0) / wall
    starts = len(d.starts())
    allowed = burst * (int(wall / interval) + 2)
    assert starts <= allowed, f"{starts} starts in {wall:.0f}s, start limit allows {allowed}"
    assert starts >= burst
    assert cpu < 0.05, f"activator CPU {cpu:.1%} during the crash loop"
    assert not refused, f"{len(refused)} connections refused while crash-looping"
    assert "start limit hit" in a.log
    # Fix the daemon: the next start (at the latest when the start limit window ends) serves.
    d.set("serve")
    fixed = time.monotonic()
    reply = greet(port, timeout=interval + 10)
    assert reply.startswith(b"hello from ")
    recovery = time.monotonic() - fixed
    print(
        f"\ncrash loop: {wall:.0f}s, {starts} starts (limit {burst}/{interval:g}s allows {allowed}), "
        f"activator CPU {cpu:.2%}, {connected[0]} connects, 0 refused, served again {recovery:.1f}s after the fix"
    )
    assert a.stop() == 0


def test_dies_on_every_connection(activator, tmp_path):
    """Accept=no daemon that exits on each activation without accepting: connections wait, never refused."""
    port = free_port()
    d = Daemon(tmp_path, "crash")
    a = activator("run", "--start-limit-interval", "2s", "-l", f"127.0.0.1:{port}", "--", *d.argv())
    a.wait_listening()
    cpu0, t0 = cpu_seconds(a.pid), time.monotonic()
    pending = socket.create_connection(("127.0.0.1", port), timeout=10)  # waits in the backlog
    a.wait_log(r"start limit hit", timeout=10)
    time.sleep(1.5)
    wall = time.monotonic() - t0
    cpu = (cpu_seconds(a.pid) - cpu0) / wall
    assert cpu < 0.05, f"activator CPU {cpu:.1%}"
    assert len(d.starts()) <= 5 * (int(wall / 2.0) + 1), f"{len(d.starts())} starts in {wall:.1f}s"
    d.set("serve")
    pending.settimeout(10)
    assert pending.recv(100).startswith(b"hello from "), "the waiting connection was lost"
    pending.close()
    assert a.stop() == 0


# ------------------------------------------------------------- daemon faults
def _idle_baseline(a, port, d) -> int:
    d.set("serve")
    assert greet(port).startswith(b"hello")
    pid = d.starts()[-1][0]
    os.kill(pid, signal.SIGTERM)
    a.wait_log(rf"pid {pid} (exited|killed)")
    wait_for(lambda: not children(a.pid), 10, what="the daemon to be reaped")
    return fd_count(a.pid)


def test_daemon_sigkilled_mid_connection(activator, tmp_path):
    port = free_port()
    d = Daemon(tmp_path, "serve")
    a = activator("run", "-l", f"127.0.0.1:{port}", "--", *d.argv())
    a.wait_listening()
    base = _idle_baseline(a, port, d)
    d.set("hold")
    c = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert c.recv(100) == b"held\n"
    pid = d.starts()[-1][0]
    os.kill(pid, signal.SIGKILL)
    a.wait_log(rf"pid {pid} killed by signal SIGKILL")
    assert c.recv(100) == b""  # the client sees the end, not a hang
    c.close()
    d.set("serve")
    assert greet(port).startswith(b"hello from ")  # carries on
    newest = d.starts()[-1][0]
    os.kill(newest, signal.SIGTERM)
    a.wait_log(rf"pid {newest} (exited|killed)")
    wait_for(lambda: not children(a.pid), 10, what="the daemon to be reaped")
    assert fd_count(a.pid) == base
    assert a.stop() == 0


def test_accept_instance_sigkilled_mid_connection(activator):
    port = free_port()
    a = activator("run", "-v", "-a", "--inetd", "--max-connections-per-source", "1", "-l", f"127.0.0.1:{port}",
                  "--", "cat")
    a.wait_listening()
    base = fd_count(a.pid)  # before: once cat echoes, activator may not have closed its copy of the connection yet
    c = socket.create_connection(("127.0.0.1", port), timeout=10)
    c.sendall(b"x")
    assert c.recv(1) == b"x"
    (pid,) = children(a.pid)
    os.kill(pid, signal.SIGKILL)
    a.wait_log(rf"pid {pid} killed by signal SIGKILL")
    assert c.recv(10) == b""
    c.close()
    # Its per-source slot was given back: the same source is served again.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c2:
        c2.sendall(b"y")
        assert c2.recv(1) == b"y"
    wait_for(lambda: not children(a.pid), 10, what="instances to be reaped")
    assert fd_count(a.pid) == base
    assert a.stop() == 0


def test_daemon_closes_listening_socket_and_stays(activator, tmp_path):
    port = free_port()
    d = Daemon(tmp_path, "serve")
    a = activator("run", "-l", f"127.0.0.1:{port}", "--", *d.argv())
    a.wait_listening()
    base = _idle_baseline(a, port, d)
    d.set("close-and-stay")
    first = socket.create_connection(("127.0.0.1", port), timeout=10)
    wait_for(lambda: d.starts()[-1][1] == "close-and-stay", 10, what="the deaf daemon to start")
    pid = d.starts()[-1][0]
    wait_for(lambda: not os.path.exists(f"/proc/{pid}/fd/3"), 10, what="the daemon to close fd 3")
    # activator still holds the socket: new clients are queued, not refused, and it does not spin.
    second = socket.create_connection(("127.0.0.1", port), timeout=10)
    cpu0, t0 = cpu_seconds(a.pid), time.monotonic()
    time.sleep(1.0)
    assert (cpu_seconds(a.pid) - cpu0) / (time.monotonic() - t0) < 0.05
    d.set("serve")
    os.kill(pid, signal.SIGTERM)  # the operator (or a watchdog) ends the wedged daemon
    a.wait_log(rf"pid {pid} killed by signal SIGTERM")
    for c in (first, second):  # both waiting clients are served by the next start
        c.settimeout(10)
        assert c.recv(100).startswith(b"hello from ")
        c.close()
    newest = d.starts()[-1][0]
    os.kill(newest, signal.SIGTERM)
    wait_for(lambda: not children(a.pid), 10, what="the daemon to be reaped")
    assert fd_count(a.pid) == base
    assert a.stop() == 0


def test_daemon_never_accepts_no_spin(activator, tmp_path):
    port = free_port()
    d = Daemon(tmp_path, "serve")
    a = activator("run", "--timeout-stop", "2s", "-l", f"127.0.0.1:{port}", "--", *d.argv())
    a.wait_listening()
    base = _idle_baseline(a, port, d)
    d.set("never-accept")
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(5)]
    wait_for(lambda: d.starts()[-1][1] == "never-accept", 10, what="the daemon to start")
    pid = d.starts()[-1][0]
    cpu0, t0 = cpu_seconds(a.pid), time.monotonic()
    time.sleep(1.5)  # pending connections on a socket activator does not poll while the daemon runs
    cpu = (cpu_seconds(a.pid) - cpu0) / (time.monotonic() - t0)
    assert cpu < 0.05, f"activator CPU {cpu:.1%} with a daemon that never accepts"
    assert len(d.starts()) == 2, "only one daemon may run"
    d.set("serve")
    os.kill(pid, signal.SIGKILL)
    a.wait_log(rf"pid {pid} killed by signal SIGKILL")
    for c in clients:
        c.settimeout(10)
        assert c.recv(100).startswith(b"hello from ")
        c.close()
    newest = d.starts()[-1][0]
    os.kill(newest, signal.SIGTERM)
    wait_for(lambda: not children(a.pid), 10, what="the daemon to be reaped")
    assert fd_count(a.pid) == base
    assert a.stop() == 0
