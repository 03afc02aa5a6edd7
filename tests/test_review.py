"""Findings of the hostile review of the engine (issue #10), each kept as a test that failed before its fix.
Real processes, real sockets, loopback and unix sockets in temporary directories only."""
from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

from conftest import connect, free_port, pid_alive, wait_for


def write_config(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
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


def test_a_watchdog_trigger_loop_cannot_postpone_the_sigkill(activator, tmp_path):
    # The daemon ignores SIGTERM and SIGABRT and sends WATCHDOG=trigger every 0.2 s. Each trigger
    # used to stop the unit again, which re-armed the timeout-stop-sec timer: SIGKILL never came.
    port = free_port()
    pid_file = tmp_path / "pid"
    script = tmp_path / "trigger.py"
    script.write_text(textwrap.dedent(r"""
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
    """))
    cfg = write_config(tmp_path / "u.toml", f"""
        [wd]
        socket.listen-stream = "127.0.0.1:{port}"
        service.exec-start = ["{sys.executable}", "{script}", "{pid_file}"]
        service.type = "notify"
        service.timeout-stop-sec = 1
    """)
    a = activator("serve", "--log-format", "json", cfg)
    a.wait_listening()
    connect(("127.0.0.1", port)).close()
    daemon = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), what="the daemon"))
    started = time.monotonic()
    wait_for(lambda: not pid_alive(daemon), timeout=6, what="SIGKILL about 1 s after the first trigger")
    assert time.monotonic() - started < 6
    assert len(events(a, "watchdog")) == 1, "the daemon was signalled once per trigger"
    assert a.proc.poll() is None
    assert a.stop() == 0
