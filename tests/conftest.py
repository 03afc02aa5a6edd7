"""Shared test helpers: real activator processes, free ports, probe daemons, required tools."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DAEMONS = Path(__file__).resolve().parent / "daemons"
PROBE = str(DAEMONS / "probe.py")
IN_CI = bool(os.environ.get("CI"))


def require(*tools: str) -> None:
    """Skip when a tool is missing; under CI a missing tool is a failure, never a skip."""
    missing = [t for t in tools if not (shutil.which(t) or os.path.exists(t))]
    if missing:
        message = f"required tool(s) not installed: {', '.join(missing)}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_RANDOM_PORTS = random.Random(os.getpid())


def _pick_port(bind_one) -> int:
    """A port below the kernel's ephemeral range, so that no client connection of the suite (which
    takes ephemeral ports) can hold it between this check and the bind by activator."""
    low = _ephemeral_low()
    for _ in range(200):
        port = _RANDOM_PORTS.randrange(10000, max(low, 10001))
        try:
            bind_one(port)
        except OSError:
            continue
        return port
    raise AssertionError("no free port found in 200 tries")


def free_port(family: int = socket.AF_INET) -> int:
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"

    def bind_one(port):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, port))

    return _pick_port(bind_one)


def free_dual_port() -> int:
    """A port free for both IPv4 and IPv6 (what a bare PORT binds: [::] dual-stack)."""

    def bind_one(port):
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(("::", port))

    return _pick_port(bind_one)


def fd_count(pid: int) -> int:
    """Descriptors held by ``pid``, leaving out the /proc files it reads for an instant (process trees)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/proc/"):
                count += 1
        except OSError:
            pass  # closed while we looked: it was transient
    return count


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (empty once it is gone)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def connect(address, family=None, timeout: float = 10.0) -> socket.socket:
    if isinstance(address, str):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect("\0" + address[1:] if address.startswith("@") else address)
        return s
    return socket.create_connection(address, timeout=timeout)


class Activator:
    """An activator process with its stderr collected line by line."""

    def __init__(self, args, env=None, cwd=None, stdin=subprocess.DEVNULL, pass_fds=(), preexec_fn=None,
                 argv_prefix=None):
        full_env = dict(os.environ)
        full_env.pop("LISTEN_PID", None)
        full_env.pop("LISTEN_FDS", None)
        full_env.pop("LISTEN_FDNAMES", None)
        full_env.pop("NOTIFY_SOCKET", None)
        if env:
            full_env.update(env)
        prefix = argv_prefix or [sys.executable, "-m", "activator"]
        self.argv = [*prefix, *args]
        self.proc = subprocess.Popen(
            self.argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, cwd=cwd,
            pass_fds=pass_fds, preexec_fn=preexec_fn,
        )
        self.lines: list[str] = []
        self.out: list[str] = []
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.lines), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, stream, sink):
        for raw in iter(stream.readline, b""):
            with self._cond:
                sink.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        stream.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_log(self, pattern: str, timeout: float = 10.0, count: int = 1) -> re.Match:
        """Wait until ``pattern`` (a regex) has matched ``count`` log lines; returns the last match."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                matches = [m for m in (rx.search(line) for line in self.lines) if m]
                if len(matches) >= count:
                    return matches[count - 1]
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not any(t.is_alive() for t in self._threads)):
                    raise AssertionError(
                        f"log line {pattern!r} (x{count}) not seen within {timeout}s; "
                        f"exit={self.proc.poll()}; log:\n" + "\n".join(self.lines)
                    )
                self._cond.wait(min(left, 0.1))

    def wait_listening(self, n: int = 1, timeout: float = 10.0) -> None:
        self.wait_log(r"listening on", timeout=timeout, count=n)

    def children(self) -> list[int]:
        return children(self.pid)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float = 20.0) -> int:
        code = self.proc.wait(timeout)
        for t in self._threads:
            t.join(5)
        return code

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        if self.proc.poll() is None:
            kids = self.children()
            os.kill(self.pid, signal.SIGTERM)
            try:
                return self.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in kids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.proc.kill()
                self.wait(5)
                raise
        return self.wait(timeout)


@pytest.fixture
def activator():
    """Factory: ``activator(args...)`` starts one; every one started is stopped at the end."""
    started: list[Activator] = []

    def start(*args, **kw) -> Activator:
        a = Activator([str(x) for x in args], **kw)
        started.append(a)
        return a

    yield start
    for a in started:
        try:
            a.stop()
        except Exception:
            pass


def events(a: Activator, name: str) -> list[dict]:
    """The records of event ``name`` in activator's --log-format json log (the daemon's own lines skipped)."""
    out = []
    for line in list(a.lines):
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == name:
                out.append(record)
    return out


def wait_event(a: Activator, name: str, count: int = 1, timeout: float = 15.0) -> dict:
    """The ``count``-th record of event ``name``, once it is logged."""
    a.wait_log(f'"event":"{name}"', timeout=timeout, count=count)
    return events(a, name)[count - 1]


def read_probe(path: Path, timeout: float = 10.0) -> dict:
    """The JSON report written by tests/daemons/probe.py."""
    wait_for(lambda: path.exists() and path.stat().st_size > 0, timeout, what=f"probe report {path}")

    def load():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    return wait_for(load, timeout, what="a complete probe report")


def json_events(a, event: str, **fields) -> list[dict]:
    """activator's --log-format json records of ``event`` (with these field values)."""
    records = []
    for line in a.log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the daemon's own stderr
        if record.get("event") == event and all(record.get(k) == v for k, v in fields.items()):
            records.append(record)
    return records


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False
