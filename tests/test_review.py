"""Findings of the hostile review of the engine (issue #10), each kept as a test that failed before its fix.
Real processes, real sockets, loopback and unix sockets in temporary directories only."""
from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

from conftest import connect, free_port, pid_alive, wait_for
from test_trust import events, write_config


def serve_notify_daemon(activator, tmp_path, source: str, arg: Path, timeout_stop: int):
    """activator serving one type = notify unit running the Python ``source`` with ``arg``, after a first connection."""
    port = free_port()
    script = tmp_path / "daemon.py"
    script.write_text(textwrap.dedent(source))
    cfg = write_config(tmp_path / "u.toml", f"""
        [n]
        socket.listen-stream = "127.0.0.1:{port}"
        service.exec-start = ["{sys.executable}", "{script}", "{arg}"]
        service.type = "notify"
        service.timeout-stop-sec = {timeout_stop}
    """)
    a = activator("serve", "--log-format", "json", cfg)
    a.wait_listening()
    connect(("127.0.0.1", port)).close()
    return a


def test_a_watchdog_trigger_loop_cannot_postpone_the_sigkill(activator, tmp_path):
    # The daemon ignores SIGTERM and SIGABRT and sends WATCHDOG=trigger every 0.2 s. Each trigger
    # used to stop the unit again, which re-armed the timeout-stop-sec timer: SIGKILL never came.
    pid_file = tmp_path / "pid"
    a = serve_notify_daemon(activator, tmp_path, r"""
        import os, signal, socket, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGABRT, signal.SIG_IGN)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.connect(os.environ["NOTIFY_SOCKET"])
        s.send(b"READY=1")
        open(sys.argv[1], "w").write(str(os.getpid()))
        end = time.monotonic() + 30
        while time.monotonic() < end:
            s.send(b"WATCHDOG=trigger")
            time.sleep(0.2)
    """, pid_file, timeout_stop=1)
    daemon = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), what="the daemon"))
    started = time.monotonic()
    wait_for(lambda: not pid_alive(daemon), timeout=6, what="SIGKILL about 1 s after the first trigger")
    assert time.monotonic() - started < 6
    assert len(events(a, "watchdog")) == 1, "the daemon was signalled once per trigger"
    assert a.proc.poll() is None
    assert a.stop() == 0


def test_a_unit_renamed_by_a_reload_waits_for_the_old_daemon_on_its_socket(activator, tmp_path):
    # [a] is renamed [b] with the same socket while a's daemon ignores SIGTERM and keeps the
    # listening socket: b used to be armed at once and start a second daemon on that socket.
    port = free_port()
    pids = tmp_path / "pids"

    def config(name):
        return write_config(tmp_path / "u.toml", f"""
            [{name}]
            socket.listen-stream = "127.0.0.1:{port}"
            service.exec-start = ["sh", "-c", "trap '' TERM; echo $$ >> {pids}; exec sleep 60"]
            service.timeout-stop-sec = 2
        """)

    cfg = config("a")
    a = activator("serve", "--log-format", "json", cfg)
    a.wait_listening()
    connect(("127.0.0.1", port)).close()
    wait_for(lambda: pids.exists() and pids.read_text().strip(), what="a's daemon")
    first = int(pids.read_text())
    config("b")
    a.signal(signal.SIGHUP)
    wait_for(lambda: events(a, "reload"), what="the reload")
    c = connect(("127.0.0.1", port))  # waits in the backlog until a's daemon is gone
    try:
        wait_for(lambda: len(pids.read_text().split()) == 2, what="b's daemon, for the waiting client")
    finally:
        c.close()
    assert not pid_alive(first)
    order = [(r["event"], r["unit"]) for r in map(json.loads, (x for x in a.lines if x.startswith("{")))
             if r.get("event") in ("start", "exit")]
    assert order == [("start", "a"), ("exit", "a"), ("start", "b")], "b started while a's daemon still ran"
    assert a.stop() == 0


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_former_main_pid_that_exits_does_not_spin_the_loop(activator, tmp_path):
    # D (our child) hands MAINPID to its child X, X hands it to its child Y, then X exits and D reaps
    # it. X's pidfd stayed watched after it was read (its run's pidfd was Y's by then): 100 % CPU.
    done = tmp_path / "done"
    a = serve_notify_daemon(activator, tmp_path, r"""
        import os, socket, sys, time
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.connect(os.environ["NOTIFY_SOCKET"])
        s.send(b"READY=1")
        ready = os.pipe()
        x = os.fork()
        if x == 0:
            os.read(ready[0], 1)  # D has sent MAINPID=X
            y = os.fork()
            if y == 0:
                time.sleep(60)
                os._exit(0)
            s.send(b"MAINPID=%d\nSTATUS=handed to y" % y)  # sent by X, the main process then
            time.sleep(0.5)
            os._exit(0)
        s.send(b"MAINPID=%d" % x)
        time.sleep(0.3)
        os.write(ready[1], b"x")
        os.waitpid(x, 0)
        open(sys.argv[1], "w").write("x reaped")
        time.sleep(60)
    """, done, timeout_stop=5)
    wait_for(lambda: len(events(a, "main-pid")) == 2, what="MAINPID handed over twice")
    wait_for(lambda: done.exists(), what="X to exit and be reaped by D")
    before = _cpu_seconds(a.pid)
    time.sleep(1.0)  # measuring: activator must be idle over this second
    used = _cpu_seconds(a.pid) - before
    assert used < 0.3, f"activator used {used:.2f}s of CPU in 1s of idling"
    assert a.stop() == 0
