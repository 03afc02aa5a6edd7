"""Accept mode under a connection flood: limits hold, refusals are immediate, nothing leaks.

Figures reached here are printed (run pytest with -s to see them) and quoted in
the README's "Reliability" section.
"""
from __future__ import annotations

import os
import socket
import statistics
import threading
import time

from conftest import children, fd_count, free_port, wait_for

FLOOD_CONNECTIONS = int(os.environ.get("ACTIVATOR_FLOOD_CONNECTIONS", "3000"))
FLOOD_THREADS = 40
FLOOD_MAX_CONNECTIONS = 10
FLOOD_PER_SOURCE = 3
FLOOD_SOURCES = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
LEAK_CONNECTIONS = int(os.environ.get("ACTIVATOR_LEAK_CONNECTIONS", "10000"))
LEAK_THREADS = 4


# ------------------------------------------------------------------ /proc helpers
def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def zombies(pid: int) -> list[int]:
    found = []
    for child in children(pid):
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    found.append(child)
        except OSError:
            pass
    return found


def remote_addr(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(b"REMOTE_ADDR="):
                    return item[len(b"REMOTE_ADDR="):].decode()
    except OSError:
        pass
    return None


def echo_once(port: int, source: str = "127.0.0.1", hold: float = 0.0, timeout: float = 10.0):
    """One client: ('answered'|'refused', seconds until answer or EOF)."""
    start = time.monotonic()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        try:
            s.sendall(b"ping\n")
            data = b""
            while len(data) < 5:
                chunk = s.recv(64)
                if not chunk:
                    break
                data += chunk
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        elapsed = time.monotonic() - start
        if data == b"ping\n":
            if hold:
                time.sleep(hold)
            return "answered", elapsed
        assert data == b"", f"unexpected reply {data!r}"
        return "refused", elapsed
    finally:
        s.close()


class Sampler(threading.Thread):
    """Samples activator's children (and their REMOTE_ADDR) as fast as it can until stopped."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.halt = threading.Event()
        self.samples = 0
        self.max_children = 0
        self.max_per_source = 0

    def run(self):
        while not self.halt.is_set():
            kids = children(self.pid)
            self.samples += 1
            self.max_children = max(self.max_children, len(kids))
            per: dict[str, int] = {}
            for k in kids:
                addr = remote_addr(k)
                if addr:
                    per[addr] = per.get(addr, 0) + 1
            if per:
                self.max_per_source = max(self.max_per_source, max(per.values()))
            time.sleep(0.001)


def settle(pid: int, timeout: float = 15.0) -> None:
    wait_for(lambda: not children(pid), timeout, what="every instance to be gone")


def test_flood_limits_and_return_to_baseline(activator):
    port = free_port()
    a = activator(
        "run", "-a", "--inetd", "--max-connections", FLOOD_MAX_CONNECTIONS,
        "--max-connections-per-source", FLOOD_PER_SOURCE, "-l", f"127.0.0.1:{port}", "--", "cat",
    )
    a.wait_listening()
    # Warm up (lazy imports, allocator arenas), then take the baseline.
    for i in range(100):
        assert echo_once(port, FLOOD_SOURCES[i % len(FLOOD_SOURCES)])[0] == "answered"
    settle(a.pid)
    base_fds, base_rss = fd_count(a.pid), rss_kib(a.pid)

    sampler = Sampler(a.pid)
    sampler.start()
    results: list[tuple[str, float]] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 90
    counter = iter(range(FLOOD_CONNECTIONS))

    def worker(n: int):
        source = FLOOD_SOURCES[n % len(FLOOD_SOURCES)]
        mine = []
        while time.monotonic() < deadline:
            with lock:
                if next(counter, None) is None:
                    break
            mine.append(echo_once(port, source, hold=0.005))
        with lock:
            results.extend(mine)

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(FLOOD_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic() + 5))
    elapsed = time.monotonic() - t0
    sampler.halt.set()
    sampler.join(5)

    answered = [e for r, e in results if r == "answered"]
    refused = sorted(e for r, e in results if r == "refused")
    assert len(results) == FLOOD_CONNECTIONS, f"only {len(results)} of {FLOOD_CONNECTIONS} finished in time"
    assert answered, "nothing was served"
    assert sampler.max_children <= FLOOD_MAX_CONNECTIONS, sampler.max_children
    assert sampler.max_per_source <= FLOOD_PER_SOURCE, sampler.max_per_source
    assert refused, "40 clients against 10 instances: some connections must have been refused"
    p95 = refused[int(len(refused) * 0.95)]
    assert p95 < 1.0, f"refusals are not immediate: 95th percentile {p95:.3f}s"
    assert "too many connections" in a.log

    settle(a.pid)
    assert not zombies(a.pid)
    after_fds, after_rss = fd_count(a.pid), rss_kib(a.pid)
    assert after_fds == base_fds, (base_fds, after_fds)
    assert after_rss <= base_rss + 2048, f"RSS grew from {base_rss} to {after_rss} KiB"
    print(
        f"\nflood: {len(results)} connections, {FLOOD_THREADS} threads, {elapsed:.1f}s "
        f"({len(results) / elapsed:.0f}/s): {len(answered)} answered, {len(refused)} refused "
        f"(median {statistics.median(refused) * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms, max {refused[-1] * 1000:.1f} ms); "
        f"max children {sampler.max_children}/{FLOOD_MAX_CONNECTIONS}, max per source "
        f"{sampler.max_per_source}/{FLOOD_PER_SOURCE} ({sampler.samples} samples); "
        f"fds {base_fds}->{after_fds}, RSS {base_rss}->{after_rss} KiB"
    )
    assert a.stop() == 0


def test_per_source_limit_exact(activator):
    """Two held connections from one address; the third from it is closed at once, others still served."""
    port = free_port()
    a = activator(
        "run", "-a", "--inetd", "--max-connections-per-source", "2", "-l", f"127.0.0.1:{port}", "--", "cat",
    )
    a.wait_listening()
    held = []
    for _ in range(2):
        s = socket.socket()
        s.settimeout(10)
        s.bind(("127.0.0.2", 0))
        s.connect(("127.0.0.1", port))
        s.sendall(b"hi\n")
        assert s.recv(10) == b"hi\n"
        held.append(s)
    outcome, elapsed = echo_once(port, "127.0.0.2")
    assert outcome == "refused" and elapsed < 2.0
    a.wait_log(r"too many connections from 127\.0\.0\.2 \(2\)")
    assert echo_once(port, "127.0.0.3")[0] == "answered"
    for s in held:
        s.close()
    settle(a.pid)
    assert echo_once(port, "127.0.0.2")[0] == "answered"
    assert a.stop() == 0


def test_many_connections_no_descriptor_leak(activator):
    """LEAK_CONNECTIONS connections with the connection at fd 3: each daemon sees fds 0-3 only
    (plus the directory `ls` itself opens to list them); activator's fd count ends at its baseline."""
    port = free_port()
    a = activator("run", "-a", "-l", f"127.0.0.1:{port}", "--", "sh", "-c", "exec ls -l /proc/self/fd/ >&3")
    a.wait_listening()

    def listing():
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    return data.decode()
                data += chunk

    listing()
    settle(a.pid)
    base_fds, base_rss = fd_count(a.pid), rss_kib(a.pid)
    bad: list[str] = []
    done = [0]
    lock = threading.Lock()
    counter = iter(range(LEAK_CONNECTIONS))
    deadline = time.monotonic() + 120

    def check(text: str) -> str | None:
        fds = {}
        for line in text.splitlines():
            if " -> " in line:
                left, target = line.split(" -> ", 1)
                fds[int(left.split()[-1])] = target
        if sorted(fds) != [0, 1, 2, 3, 4]:
            return f"fds {sorted(fds)}"
        if not fds[3].startswith("socket:") or fds[1] != fds[3]:  # fd 1 is the shell's >&3
            return f"fd 3 is {fds[3]}"
        if not (fds[4].startswith("/proc/") and fds[4].endswith("/fd")):
            return f"fd 4 is {fds[4]}"
        return None

    def worker():
        while time.monotonic() < deadline:
            with lock:
                if next(counter, None) is None:
                    return
            problem = check(listing())
            with lock:
                done[0] += 1
                if problem and len(bad) < 5:
                    bad.append(problem)

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(LEAK_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic() + 5))
    elapsed = time.monotonic() - t0
    assert done[0] == LEAK_CONNECTIONS, f"only {done[0]} connections in time"
    assert not bad, (bad, [line for line in a.log.splitlines() if "error" in line or "warning" in line][:10])
    settle(a.pid)
    assert not zombies(a.pid)
    after_fds, after_rss = fd_count(a.pid), rss_kib(a.pid)
    assert after_fds == base_fds
    assert after_rss <= base_rss + 2048
    print(
        f"\nleak check: {done[0]} connections ({LEAK_THREADS} threads) in {elapsed:.1f}s ({done[0] / elapsed:.0f}/s); "
        f"every daemon saw fds 0-3 only; fds {base_fds}->{after_fds}, RSS {base_rss}->{after_rss} KiB"
    )
    assert a.stop() == 0


# ------------------------------------------------------------------ stopping many instances
HELD_INSTANCES = 1000


def test_stop_with_a_thousand_instances_is_quick(activator):
    """Stopping reads /proc once for all instances: with one read per instance, 2,000 instances
    took 41 s to stop (longer than a container engine's grace period); now well under a second."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = HELD_INSTANCES + 200
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(need, soft), hard), hard))
    port = free_port()
    a = activator("run", "-a", "--inetd", "--max-connections", HELD_INSTANCES + 10, "-l", f"127.0.0.1:{port}",
                  "--", "cat")
    a.wait_listening()
    conns = []
    try:
        for _ in range(HELD_INSTANCES):
            conns.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        wait_for(lambda: len(children(a.pid)) >= HELD_INSTANCES, 60, interval=0.1,
                 what=f"{HELD_INSTANCES} instances")
        kids = children(a.pid)
        started = time.monotonic()
        assert a.stop(timeout=30) == 0
        took = time.monotonic() - started
        print(f"\nstop with {len(kids)} instances took {took:.2f}s")
        assert took < 5.0
        assert not [pid for pid in kids if os.path.exists(f"/proc/{pid}")]
    finally:
        for c in conns:
            c.close()
