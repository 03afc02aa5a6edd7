"""Proxy units (service.proxy-to, run --proxy-to): activator accepts, starts a daemon that binds its own
port, relays each connection to it; exit-idle-sec stops the daemon when nobody uses it.

Real clients (curl, nbdinfo, nbdcopy, sockets), real backends (http.server, nbdkit, the modes of
tests/daemons/proxy_backend.py), the structured log's ``event`` fields. The data-path tests run with
the C relay (activator._relay, in a thread of its own) and with the Python relay that replaces it
when the extension is not built.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import DAEMONS, IN_CI, connect, events, free_port, pid_alive, require, wait_event, wait_for

PY = sys.executable
BACKEND = str(DAEMONS / "proxy_backend.py")
# activator with the C relay hidden: what runs where the extension could not be built
PY_RELAY = ("import sys; sys.modules['activator._relay'] = None; sys.argv[0] = 'activator'; "
            "from activator.__main__ import main; main()")
MiB = 1024 * 1024


@pytest.fixture(params=["c", "python"])
def relay(request):
    """Which relay: the argv prefix that starts activator with it."""
    if request.param == "c" and importlib.util.find_spec("activator._relay") is None:
        message = "activator._relay is not built (no C compiler at install time?)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return None if request.param == "c" else [PY, "-c", PY_RELAY]


def proxy(activator, backend: list[str], to: str, *options, relay=None):
    """activator run --proxy-to TO for BACKEND on a free front port: (activator, front port)."""
    front = free_port()
    a = activator("run", "--log-format", "json", "-l", f"127.0.0.1:{front}", "--proxy-to", to, *options, "--",
                  *backend, argv_prefix=relay)
    a.wait_listening()
    return a, front


def backend(mode: str, address: str, *args) -> list[str]:
    return [PY, BACKEND, mode, address, *map(str, args)]


def exchange(port: int, payload: bytes, timeout: float = 30.0) -> bytes:
    """Send payload, half-close, read the reply to EOF."""
    with connect(("127.0.0.1", port), timeout=timeout) as c:
        def send():
            try:
                c.sendall(payload)
                c.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the reading side sees what went wrong

        sender = threading.Thread(target=send)
        sender.start()
        chunks = []
        while True:
            data = c.recv(MiB)
            if not data:
                break
            chunks.append(data)
        sender.join(timeout)
        return b"".join(chunks)


def attempt(port: int, payload: bytes) -> bytes | None:
    """exchange(), None when the connection is refused or reset."""
    try:
        return exchange(port, payload)
    except ConnectionError:
        return None


def closed(c: socket.socket) -> bool:
    """The connection ends: EOF, or a reset (what closing a socket with unread data sends)."""
    try:
        return c.recv(16) == b""
    except ConnectionResetError:
        return True


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            out.add(target)
    return out


def settled(read, timeout: float = 10.0):
    """The value of ``read()`` once it has not changed for a while."""
    last, since = read(), time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= 0.5:
            return now
    raise AssertionError(f"still changing after {timeout}s: {last}")


# ------------------------------------------------------------------ real clients
def test_http_server_started_by_the_first_request_without_listen_fds(activator, tmp_path):
    require("curl")
    (tmp_path / "hello.txt").write_text("hello through the proxy\n")
    port = free_port()
    a, front = proxy(activator, [PY, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory",
                                 str(tmp_path)], f"127.0.0.1:{port}")
    assert not events(a, "start")  # nothing runs before the first connection
    for _ in range(3):
        out = subprocess.run(["curl", "-sS", "--max-time", "30", f"http://127.0.0.1:{front}/hello.txt"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout == "hello through the proxy\n"
    [start] = events(a, "start")  # one daemon for every request
    env = Path(f"/proc/{start['pid']}/environ").read_bytes().split(b"\0")
    assert not [v for v in env if v.startswith((b"LISTEN_FDS=", b"LISTEN_PID=", b"LISTEN_FDNAMES="))]
    assert a.stop() == 0
    assert not pid_alive(start["pid"])


def test_nbdinfo_and_nbdcopy_through_the_proxy_to_nbdkit(activator, tmp_path):
    require("nbdkit", "nbdinfo", "nbdcopy")
    port = free_port()
    a, front = proxy(activator, ["nbdkit", "-f", "-p", str(port), "-i", "127.0.0.1", "memory", "64M"],
                     f"127.0.0.1:{port}")
    out = subprocess.run(["nbdinfo", "--size", f"nbd://127.0.0.1:{front}"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(64 * MiB)
    image = tmp_path / "in.img"
    image.write_bytes(os.urandom(64 * MiB))
    back = tmp_path / "out.img"
    for argv in (["nbdcopy", str(image), f"nbd://127.0.0.1:{front}"], ["nbdcopy", f"nbd://127.0.0.1:{front}", str(back)]):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    assert hashlib.sha256(back.read_bytes()).hexdigest() == hashlib.sha256(image.read_bytes()).hexdigest()
    assert len(events(a, "start")) == 1
    assert a.stop() == 0


def test_unix_socket_backend(activator, tmp_path):
    path = str(tmp_path / "backend.sock")
    a, front = proxy(activator, backend("echo", path), path)
    assert exchange(front, b"over a unix socket") == b"over a unix socket"
    assert a.stop() == 0


# ------------------------------------------------------------------ the data path
def test_half_close_is_passed_through(activator, relay):
    """The backend answers only after the client's FIN: the reply must still come back."""
    port = free_port()
    a, front = proxy(activator, backend("digest", f"127.0.0.1:{port}"), f"127.0.0.1:{port}", relay=relay)
    payload = os.urandom(3 * MiB + 17)
    reply = exchange(front, payload)
    assert reply == f"{hashlib.sha256(payload).hexdigest()} {len(payload)}\n".encode()
    assert threads_of(a.pid) == (1 if relay else 2)  # the C relay runs in a thread of its own
    assert a.stop() == 0


def test_many_concurrent_clients_with_large_transfers(activator, relay):
    n = 64
    port = free_port()
    a, front = proxy(activator, backend("echo", f"127.0.0.1:{port}"), f"127.0.0.1:{port}",
                     "--max-connections", str(2 * n), relay=relay)
    payloads = [os.urandom(MiB) for _ in range(n)]
    results: list[bytes | None] = [None] * n

    def client(i):
        results[i] = exchange(front, payloads[i], timeout=60)

    workers = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    bad = [i for i in range(n) if results[i] is None or hashlib.sha256(results[i]).digest()
           != hashlib.sha256(payloads[i]).digest()]
    assert not bad, f"{len(bad)} of {n} transfers came back wrong"
    assert len(events(a, "start")) == 1
    # Nothing leaks: another round of connections leaves activator with as many descriptors (the C
    # relay keeps a bounded pool of empty pipes for the next connections).
    after_first = settled(lambda: fd_count(a.pid))
    for i in range(16):
        assert exchange(front, payloads[i][:1000]) == payloads[i][:1000]
    assert settled(lambda: fd_count(a.pid)) == after_first
    assert a.stop() == 0


def test_a_client_that_does_not_read_stalls_nobody_and_bounds_what_is_buffered(activator, relay, tmp_path):
    port = free_port()
    progress = tmp_path / "sent"
    size = 256 * MiB
    a, front = proxy(activator, backend("source", f"127.0.0.1:{port}", size, progress), f"127.0.0.1:{port}",
                     relay=relay)
    with connect(("127.0.0.1", front)) as lazy:
        lazy.sendall(b"x")  # it never reads what comes back
        wait_for(lambda: progress.exists() and int(progress.read_text() or 0) > 0, what="the backend sending")

        def sent():
            return int(progress.read_text() or 0)

        # The backend stalls once the buffers between it and the lazy client are full.
        last, deadline = -1, time.monotonic() + 20
        while sent() != last and time.monotonic() < deadline:
            last = sent()
            time.sleep(0.3)
        assert sent() == last, "the backend never stopped sending"
        assert sent() < 64 * MiB  # socket buffers and one pipe per direction, not the whole transfer
        # Meanwhile others are served, at full speed.
        other = free_port()
        b, front_b = proxy(activator, backend("echo", f"127.0.0.1:{other}"), f"127.0.0.1:{other}", relay=relay)
        payload = os.urandom(8 * MiB)
        assert exchange(front_b, payload) == payload
        with connect(("127.0.0.1", front)) as eager:  # the same unit as the lazy client
            eager.sendall(b"x")
            got = 0
            while got < 16 * MiB:
                data = eager.recv(MiB)
                assert data
                got += len(data)
        assert b.stop() == 0
    assert a.stop() == 0


def test_backend_killed_mid_transfer(activator, relay, tmp_path):
    port = free_port()
    a, front = proxy(activator, backend("source", f"127.0.0.1:{port}", 1 << 40, tmp_path / "sent"),
                     f"127.0.0.1:{port}", relay=relay)
    with connect(("127.0.0.1", front), timeout=20) as c:
        c.sendall(b"x")
        assert len(c.recv(65536)) > 0
        pid = events(a, "start")[0]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_event(a, "exit")
        deadline = time.monotonic() + 20
        ended = False
        while time.monotonic() < deadline:
            try:
                if not c.recv(MiB):
                    ended = True
                    break
            except ConnectionResetError:
                ended = True
                break
        assert ended, "the client's connection did not end with its backend"
    # activator goes on: the next connection starts the daemon again and is served.
    with connect(("127.0.0.1", front), timeout=20) as c:
        c.sendall(b"x")
        assert len(c.recv(65536)) > 0
        wait_for(lambda: len(events(a, "start")) == 2, what="a second start")
        # The new daemon holds none of activator's sockets (the relay's are close-on-exec).
        assert not socket_inodes(events(a, "start")[1]["pid"]) & socket_inodes(a.pid)
    assert a.stop() == 0


def test_reload_changes_the_unit_and_loses_no_connection(activator, tmp_path):
    port, front = free_port(), free_port()
    units = tmp_path / "units"
    units.mkdir()

    def write(description):
        (units / "web.toml").write_text(
            f'[web]\ndescription = "{description}"\nsocket.listen-stream = "127.0.0.1:{front}"\n'
            f'service.exec-start = {backend("slowstop", f"127.0.0.1:{port}")!r}\n'
            f'service.proxy-to = "127.0.0.1:{port}"\n'.replace("'", '"'))

    write("first")
    a = activator("serve", "--log-format", "json", str(units))
    a.wait_listening()
    assert exchange(front, b"before") == b"before"
    write("second")
    a.signal(signal.SIGHUP)
    # While the old daemon goes (it accepts and drops connections for 0.5 s after SIGTERM) and the new
    # one comes, every connection is answered.
    results = [attempt(front, b"during %d" % i) for i in range(40)]
    assert results == [b"during %d" % i for i in range(40)]
    wait_event(a, "reload")
    assert len(events(a, "start")) == 2
    assert a.stop() == 0


def test_activator_stop_ends_open_relays(activator, relay):
    port = free_port()
    a, front = proxy(activator, backend("echo", f"127.0.0.1:{port}"), f"127.0.0.1:{port}", relay=relay)
    with connect(("127.0.0.1", front), timeout=20) as c:
        c.sendall(b"ping")
        assert c.recv(4) == b"ping"
        pid = events(a, "start")[0]["pid"]
        assert a.stop() == 0
        assert c.recv(16) == b""  # closed, not left hanging
    assert not pid_alive(pid)


# ------------------------------------------------------------------ waiting for the backend
def test_connections_wait_for_a_slow_backend_and_none_is_refused(activator, tmp_path):
    """The daemon takes a second before it listens: every connection made meanwhile is served."""
    port = free_port()
    script = f"import time, runpy, sys; time.sleep(1); sys.argv = {['x', 'echo', f'127.0.0.1:{port}']!r}; " \
             f"runpy.run_path({BACKEND!r}, run_name='__main__')"
    a, front = proxy(activator, [PY, "-c", script], f"127.0.0.1:{port}")
    results: dict[int, bytes] = {}

    def client(i):
        results[i] = exchange(front, f"client {i}".encode())

    workers = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert results == {i: f"client {i}".encode() for i in range(20)}
    assert len(events(a, "start")) == 1
    assert a.stop() == 0


def test_backend_that_never_listens_closes_clients_after_the_start_timeout(activator):
    port = free_port()
    a, front = proxy(activator, ["sleep", "600"], f"127.0.0.1:{port}", "--timeout-start-sec", "1s")
    started = time.monotonic()
    with connect(("127.0.0.1", front), timeout=20) as c:
        c.sendall(b"anyone?")
        assert closed(c)
    waited = time.monotonic() - started
    assert 0.9 <= waited < 10
    record = wait_event(a, "proxy-timeout")
    assert record["level"] == "warning" and f"127.0.0.1:{port}" in record["message"]
    wait_event(a, "exit")  # the daemon that never listened is stopped
    assert a.stop() == 0


def test_a_daemon_that_fails_at_once_closes_the_waiting_clients(activator):
    port = free_port()
    a, front = proxy(activator, ["sh", "-c", "exit 3"], f"127.0.0.1:{port}")
    started = time.monotonic()
    with connect(("127.0.0.1", front), timeout=20) as c:
        c.sendall(b"anyone?")
        assert closed(c)
    assert time.monotonic() - started < 10  # not the start timeout (90 s): at once
    record = wait_event(a, "proxy-closed")
    assert "exited before it accepted a connection" in record["message"]
    assert len(events(a, "start")) == 1  # not started again for it
    assert a.stop() == 0


def test_notify_backend_is_used_only_after_ready(activator):
    port = free_port()
    a, front = proxy(activator, backend("notify", f"127.0.0.1:{port}"), f"127.0.0.1:{port}", "--type", "notify")
    with connect(("127.0.0.1", front), timeout=20) as c:
        assert c.recv(16) == b"ready\n"  # it listens at once, but says READY=1 only 0.5 s later
    assert events(a, "ready")
    assert a.stop() == 0


# ------------------------------------------------------------------ limits
def test_max_connections_counts_relayed_connections(activator):
    port = free_port()
    a, front = proxy(activator, backend("echo", f"127.0.0.1:{port}"), f"127.0.0.1:{port}", "--max-connections", "2")
    held = [connect(("127.0.0.1", front)) for _ in range(2)]
    try:
        for i, c in enumerate(held):
            c.sendall(b"%d" % i)
            assert c.recv(1) == b"%d" % i
        with connect(("127.0.0.1", front)) as third:
            assert closed(third)
        wait_event(a, "too-many")
    finally:
        for c in held:
            c.close()
    # once they are closed there is room again (once activator has seen them end)
    wait_for(lambda: attempt(front, b"again") == b"again", what="a connection once the others closed")
    assert a.stop() == 0


def test_ip_address_rules_apply_before_anything_starts(activator):
    port = free_port()
    a, front = proxy(activator, backend("echo", f"127.0.0.1:{port}"), f"127.0.0.1:{port}",
                     "--ip-address-deny", "any")
    with connect(("127.0.0.1", front)) as c:
        assert closed(c)
    wait_event(a, "denied")
    assert not events(a, "start")
    assert a.stop() == 0


# ------------------------------------------------------------------ exit-idle-sec
def test_idle_stop_and_restart_lose_no_request(activator):
    """Requests with pauses around the idle time, against a daemon that accepts (and drops) connections
    for a while after SIGTERM: every one must be answered by a live daemon."""
    port = free_port()
    a, front = proxy(activator, backend("slowstop", f"127.0.0.1:{port}"), f"127.0.0.1:{port}",
                     "--exit-idle-time", "300ms", "--start-limit-burst", "0")
    pauses = [0.05, 0.45, 0.3, 0.29, 0.31, 0.6, 0.0, 0.33, 0.4, 0.05, 0.32, 0.5] * 2
    for i, pause in enumerate(pauses):
        payload = f"request {i}".encode()
        assert exchange(front, payload) == payload, f"request {i} lost"
        time.sleep(pause)
    stops, starts = events(a, "idle-stop"), events(a, "start")
    assert len(stops) >= 3, f"only {len(stops)} idle stops"
    assert len(stops) <= len(starts) <= len(stops) + 1
    assert a.stop() == 0


def test_idle_stop_keeps_an_active_connection_and_restarts_on_demand(activator):
    port = free_port()
    a, front = proxy(activator, backend("echo", f"127.0.0.1:{port}"), f"127.0.0.1:{port}",
                     "--exit-idle-time", "200ms")
    with connect(("127.0.0.1", front), timeout=20) as c:
        for i in range(5):  # a connection that stays open keeps the daemon, however quiet it is
            c.sendall(b"%d" % i)
            assert c.recv(1) == b"%d" % i
            time.sleep(0.3)
        assert not events(a, "idle-stop")
    record = wait_event(a, "idle-stop")
    assert record["pid"] == events(a, "start")[0]["pid"]
    wait_event(a, "exit")
    assert exchange(front, b"later") == b"later"
    assert len(events(a, "start")) == 2
    assert a.stop() == 0


def test_connections_wait_out_a_start_limit_pause(activator):
    port = free_port()
    a, front = proxy(activator, backend("echo", f"127.0.0.1:{port}"), f"127.0.0.1:{port}", "--exit-idle-time",
                     "100ms", "--start-limit-burst", "1", "--start-limit-interval", "2s")
    assert exchange(front, b"first") == b"first"
    wait_event(a, "exit")
    assert exchange(front, b"second") == b"second"  # waits for the end of the pause, then a fresh start
    wait_event(a, "start-limit")
    assert len(events(a, "start")) == 2
    assert a.stop() == 0


def test_check_refuses_what_a_proxy_unit_cannot_do(tmp_path):
    unit = tmp_path / "u.toml"
    unit.write_text("""
[accepts]
socket.listen-stream = "127.0.0.1:9"
socket.accept = true
service.exec-start = "cat"
service.proxy-to = "127.0.0.1:10"
[datagram]
socket.listen-datagram = "127.0.0.1:11"
service.exec-start = "cat"
service.proxy-to = "127.0.0.1:12"
[itself]
socket.listen-stream = "127.0.0.1:13"
service.exec-start = "cat"
service.proxy-to = "127.0.0.1:13"
[nohost]
socket.listen-stream = "127.0.0.1:14"
service.exec-start = "cat"
service.proxy-to = "8080"
""")
    out = subprocess.run([PY, "-m", "activator", "check", str(unit)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 4, lines
    assert "accepts: socket.accept: a proxy unit (service.proxy-to) accepts its connections itself" in lines[0]
    assert "datagram: service.proxy-to: relays stream connections" in lines[1]
    assert "itself: service.proxy-to: 127.0.0.1:13 is the unit's own socket" in lines[2]
    assert "nohost: service.proxy-to: '8080' has no host" in lines[3]
    run = subprocess.run([PY, "-m", "activator", "run", "-a", "--proxy-to", "127.0.0.1:10", "-l", "127.0.0.1:9", "--",
                          "cat"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--accept: a proxy unit" in run.stderr and "Traceback" not in run.stderr


def context_switches(pid: int) -> int:
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                    total += int(line.split()[1])
    return total


def test_idle_means_idle_with_the_relay_thread(activator, relay):
    """Once the daemon is stopped for idleness, activator and its relay thread sleep: no wake-up at all."""
    port = free_port()
    a, front = proxy(activator, backend("echo", f"127.0.0.1:{port}"), f"127.0.0.1:{port}",
                     "--exit-idle-time", "200ms", relay=relay)
    for i in range(5):
        assert exchange(front, b"%d" % i) == b"%d" % i
    wait_event(a, "exit")
    before = settled(lambda: context_switches(a.pid))  # the log flushed, everything asleep
    time.sleep(2)  # the measurement itself: nothing happens for this long
    assert context_switches(a.pid) == before
    assert a.stop() == 0


def test_exit_idle_needs_a_proxy_unit(activator, tmp_path):
    unit = tmp_path / "u.toml"
    unit.write_text('[u]\nsocket.listen-stream = "127.0.0.1:9"\nservice.exec-start = "cat"\n'
                    'service.exit-idle-sec = "5s"\n')
    out = subprocess.run([PY, "-m", "activator", "check", str(unit)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "service.exit-idle-sec: only applies to proxy units" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
