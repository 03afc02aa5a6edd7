"""Process, port and statistics helpers for the benchmark runner."""
from __future__ import annotations

import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

# x86_64 numbers of the system calls a process blocks in while it waits for events.
WAIT_SYSCALLS = {0, 7, 23, 34, 35, 43, 61, 202, 230, 232, 247, 270, 271, 281, 288, 441}


class BenchError(Exception):
    """A peer could not be started or measured; recorded in the results, the run goes on."""


def clean_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET")}
    if extra:
        env.update(extra)
    return env


def activator_argv() -> list[str]:
    """activator on the interpreter running the benchmark (the venv's python)."""
    return [sys.executable, "-m", "activator"]


def activator_script() -> list[str] | None:
    """The installed console script next to this interpreter, when there is one."""
    path = os.path.join(os.path.dirname(sys.executable), "activator")
    return [path] if os.access(path, os.X_OK) else None


class Proc:
    """A started peer: stderr collected line by line, stopped by pid (then its leftover children)."""

    def __init__(self, argv, env=None, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, cwd=None):
        self.argv = list(argv)
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE,
                                     env=clean_env(env), cwd=cwd)
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self):
        for raw in iter(self.proc.stderr.readline, b""):
            t = time.perf_counter()
            with self._cond:
                self.lines.append((t, raw.decode(errors="replace").rstrip("\n")))
                self._cond.notify_all()
        self.proc.stderr.close()
        with self._cond:
            self._cond.notify_all()

    def log(self) -> str:
        with self._cond:
            return "\n".join(line for _, line in self.lines)

    def wait_line(self, pattern: str, count: int = 1, timeout: float = 10.0) -> float:
        """Wait until ``pattern`` matched ``count`` stderr lines; returns the time the last one was read."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                seen = 0
                for t, line in self.lines:
                    if rx.search(line):
                        seen += 1
                        if seen >= count:
                            return t
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._thread.is_alive()):
                    tail = "\n".join(line for _, line in self.lines[-5:])
                    raise BenchError(f"{os.path.basename(self.argv[0])}: no log line {pattern!r} (x{count}) "
                                     f"within {timeout:g}s, exit={self.proc.poll()}: {tail}")
                self._cond.wait(min(left, 0.1))

    def count_lines(self, pattern: str) -> int:
        rx = re.compile(pattern)
        with self._cond:
            return sum(1 for _, line in self.lines if rx.search(line))

    def descendants(self) -> list[int]:
        result, todo = [], [self.pid]
        for _ in range(10000):
            if not todo:
                break
            pid = todo.pop()
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                kids = []
            result.extend(kids)
            todo.extend(kids)
        return result

    def stop(self, timeout: float = 10.0) -> int | None:
        kids = self.descendants()
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        for pid in kids:  # anything the peer left behind (started by us, through it)
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._thread.join(5)
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct free TCP ports (all bound at once, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def listening_ports() -> set[int]:
    ports = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A":
                        ports.add(int(parts[1].rsplit(":", 1)[1], 16))
        except OSError:
            pass
    return ports


def wait_listening(port: int, proc: Proc | None = None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port in listening_ports():
            return
        if proc is not None and proc.proc.poll() is not None:
            raise BenchError(f"{os.path.basename(proc.argv[0])} exited with {proc.proc.returncode}: {proc.log()[-400:]}")
        time.sleep(0.005)
    raise BenchError(f"nothing listening on port {port} after {timeout:g}s")


def proc_state(pid: int) -> tuple[str, int | None]:
    with open(f"/proc/{pid}/stat") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
    try:
        with open(f"/proc/{pid}/syscall") as f:
            nr = f.read().split()[0]
        call = int(nr) if nr.lstrip("-").isdigit() else None
    except OSError:
        call = None
    return state, call


def wait_idle(pid: int, timeout: float = 5.0) -> None:
    """Wait until every thread of ``pid`` sleeps in a waiting system call (twice in a row)."""
    deadline = time.monotonic() + timeout
    streak = 0
    while time.monotonic() < deadline:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            ok = True
            for tid in tids:
                state, call = proc_state(tid)
                if state != "S" or (call is not None and call not in WAIT_SYSCALLS):
                    ok = False
                    break
        except (OSError, ValueError, IndexError):
            raise BenchError(f"process {pid} is gone") from None
        streak = streak + 1 if ok else 0
        if streak >= 2:
            return
        time.sleep(0.002)
    raise BenchError(f"process {pid} did not become idle within {timeout:g}s")


def status_fields(pid: int) -> dict[str, int]:
    """VmRSS (KiB) and context switches summed over every thread of ``pid``."""
    out = {"rss_kib": 0, "voluntary": 0, "involuntary": 0}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss_kib"] = int(line.split()[1])
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        out["voluntary"] += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        out["involuntary"] += int(line.split()[1])
        except OSError:
            pass
    return out


def summarize(samples: list[float]) -> dict:
    xs = sorted(samples)
    if not xs:
        return {"n": 0, "median": None, "min": None, "max": None, "q1": None, "q3": None, "samples": []}
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"n": len(xs), "median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q1, "q3": q3,
            "samples": [round(x, 6) for x in samples]}


def raise_nofile(want: int = 65536) -> int:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
