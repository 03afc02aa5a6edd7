"""Rate limits (TriggerLimit per socket, StartLimit per service), no spinning, and idle means idle."""
import os
import socket
import sys
import time

from conftest import PROBE, connect, free_port, read_probe, wait_for

PY = sys.executable
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def voluntary_switches(pid: int) -> int:
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


def flaky_daemon(tmp_path, failures: int):
    """A daemon that exits without accepting ``failures`` times, then serves (the probe)."""
    count = tmp_path / "count"
    script = tmp_path / "flaky.sh"
    script.write_text(
        "#!/bin/sh\n"
        f'echo x >> "{count}"\n'
        f'[ "$(wc -l < "{count}")" -gt {failures} ] || exit 0\n'
        f'exec "{PY}" "{PROBE}" "{tmp_path / "r.json"}" once\n'
    )
    script.chmod(0o755)
    return str(script), count


def hello(sock) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(100)
        assert chunk, data
        data += chunk
    return data


def test_trigger_limit_pauses_without_spinning_then_serves(activator, tmp_path):
    """TriggerLimit (20 in 2 s per socket): a daemon that exits without accepting re-triggers at once."""
    port = free_port()
    script, count = flaky_daemon(tmp_path, failures=24)
    a = activator("run", "--start-limit-burst", "0", "-l", f"127.0.0.1:{port}", "--", script)
    a.wait_listening()
    t0 = time.monotonic()
    c = connect(("127.0.0.1", port), timeout=15)  # waits in the backlog through every failure
    try:
        a.wait_log(r"trigger limit hit on 127\.0\.0\.1:\d+ \(20 in 2s\)")
        starts = len(count.read_text().split())
        assert starts == 20, a.log
        cpu0 = cpu_seconds(a.pid)
        time.sleep(1.0)  # within the pause
        assert cpu_seconds(a.pid) - cpu0 <= 0.05  # blocked in the kernel, not spinning
        assert len(count.read_text().split()) == 20  # nothing started during the pause
        data = hello(c)  # after the interval it carries on; the 25th start serves
        elapsed = time.monotonic() - t0
    finally:
        c.close()
    info = read_probe(tmp_path / "r.json")
    assert data == b"hello from %d\n" % info["pid"]
    assert 1.8 <= elapsed < 10, elapsed
    assert len(count.read_text().split()) == 25
    assert a.stop() == 0


def test_trigger_limit_options(activator, tmp_path):
    port = free_port()
    a = activator("run", "--start-limit-burst", "0", "--trigger-limit-burst", "3", "--trigger-limit-interval", "1s",
                  "-l", f"127.0.0.1:{port}", "--", "true")
    a.wait_listening()
    c = connect(("127.0.0.1", port))
    try:
        a.wait_log(r"trigger limit hit .*\(3 in 1s\)")
        assert a.log.count("started") == 3
        a.wait_log(r"trigger limit hit", count=2, timeout=5)  # carries on after the interval, limited again
        assert a.log.count("started") == 6
    finally:
        c.close()
    assert a.stop() == 0


def test_start_limit_pauses_then_serves(activator, tmp_path):
    """StartLimit (5 starts in the interval): the sixth start waits for the interval to end."""
    port = free_port()
    script, count = flaky_daemon(tmp_path, failures=6)
    a = activator("run", "--start-limit-interval", "2s", "-l", f"127.0.0.1:{port}", "--", script)
    a.wait_listening()
    t0 = time.monotonic()
    c = connect(("127.0.0.1", port), timeout=15)
    try:
        a.wait_log(r"start limit hit \(5 in 2s\)")
        assert len(count.read_text().split()) == 5
        assert a.log.count("started") == 5
        cpu0 = cpu_seconds(a.pid)
        time.sleep(0.8)
        assert cpu_seconds(a.pid) - cpu0 <= 0.05
        assert len(count.read_text().split()) == 5
        hello(c)  # 6th start fails, 7th serves: after the interval
        elapsed = time.monotonic() - t0
    finally:
        c.close()
    assert 1.8 <= elapsed < 10, elapsed
    assert len(count.read_text().split()) == 7
    assert a.stop() == 0


def test_crash_loop_cpu_stays_low(activator, tmp_path):
    """With the default limits, a daemon that exits at once costs activator almost nothing."""
    port = free_port()
    a = activator("run", "--start-limit-interval", "1s", "-l", f"127.0.0.1:{port}", "--", "true")
    a.wait_listening()
    cpu0 = cpu_seconds(a.pid)
    t0 = time.monotonic()
    c = connect(("127.0.0.1", port))
    try:
        a.wait_log(r"start limit hit", count=3, timeout=10)
    finally:
        c.close()
    wall = time.monotonic() - t0
    cpu = cpu_seconds(a.pid) - cpu0
    assert a.log.count("started") == 15  # 5 per interval
    assert cpu / wall < 0.10, (cpu, wall)
    assert a.stop() == 0


def wait_quiet(pid: int) -> None:
    """Until ``pid`` has gone 0.1 s without waking up (start-up or a connection is over)."""
    last = [voluntary_switches(pid), time.monotonic()]

    def quiet():
        now = voluntary_switches(pid)
        if now != last[0]:
            last[:] = [now, time.monotonic()]
        return time.monotonic() - last[1] >= 0.1

    wait_for(quiet, timeout=10, interval=0.02, what="activator to go quiet")


def test_idle_means_idle(activator, tmp_path):
    """Holding sockets with nothing happening: no wake-ups at all, before and while a daemon runs."""
    port = free_port()
    a = activator("run", "-l", f"127.0.0.1:{port}", "-l", tmp_path / "s.sock", "--",
                  PY, PROBE, tmp_path / "r.json")
    a.wait_listening(2)
    wait_quiet(a.pid)
    before = voluntary_switches(a.pid)
    time.sleep(2.0)
    assert voluntary_switches(a.pid) - before == 0
    with connect(("127.0.0.1", port)) as c:
        hello(c)
    read_probe(tmp_path / "r.json")
    wait_quiet(a.pid)
    before = voluntary_switches(a.pid)
    time.sleep(1.5)  # the daemon runs: activator does not poll the sockets
    assert voluntary_switches(a.pid) - before == 0
    assert a.stop() == 0


def test_idle_datagram_and_accept_mode(activator, tmp_path):
    a = activator("run", "-d", "-l", f"127.0.0.1:{free_port()}", "-l", tmp_path / "d.sock", "--", "true")
    b = activator("run", "-a", "-l", f"127.0.0.1:{free_port()}", "-l", f"[::1]:{free_port(socket.AF_INET6)}",
                  "--", "true")
    a.wait_listening(2)
    b.wait_listening(2)
    wait_quiet(a.pid)
    wait_quiet(b.pid)
    before = voluntary_switches(a.pid), voluntary_switches(b.pid)
    time.sleep(1.5)
    assert (voluntary_switches(a.pid), voluntary_switches(b.pid)) == before
    assert a.stop() == 0 and b.stop() == 0
