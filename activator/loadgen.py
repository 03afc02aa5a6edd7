"""A bounded client load: several clients connecting in a loop, counting what the server did.

Used by the zero-downtime proofs (graceful restarts, workers, watch mode, re-exec) and
available to daemon authors who want the same proof for their own daemon::

    from activator.loadgen import ClientLoad

    with ClientLoad(("127.0.0.1", port), clients=4, request=b"ping\\n") as load:
        ...  # restart, scale, re-exec while the clients run
    report = load.report
    assert report.refused == 0 and report.failed == 0 and report.served > 0

Every client connects, sends ``request``, half-closes, and reads the reply until EOF
(or ``reply_bytes`` bytes). A connection the kernel refuses counts as ``refused``; one
that connects but gets no reply, a reset, or times out counts as ``failed``. Replies
are counted by their first line (``replies``), so a daemon that answers with its
version or pid shows which generation served; ``last_reply`` is the newest one.
The load is bounded in time (``max_seconds``) and per operation (``timeout``).
"""
from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from typing import Union

from .records import dataclass, field

Address = Union[str, tuple]


@dataclass
class LoadReport:
    served: int = 0
    refused: int = 0
    failed: int = 0
    max_latency: float = 0.0  # seconds, connect to end of reply, over served connections
    replies: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)  # the first few failures, for the assertion message
    last_reply: bytes = b""

    def summary(self) -> str:
        return (f"served {self.served}, refused {self.refused}, failed {self.failed}, "
                f"max latency {self.max_latency * 1000:.1f} ms")


class ClientLoad:
    """Start with ``start()`` (or ``with``); ``stop()`` joins the clients and returns the report."""

    def __init__(self, address: Address, clients: int = 4, request: bytes = b"ping\n", reply_bytes: int = 0,
                 timeout: float = 5.0, max_seconds: float = 60.0, pause: float = 0.0):
        self.address = address
        self.clients = clients
        self.request = request
        self.reply_bytes = reply_bytes
        self.timeout = timeout
        self.max_seconds = max_seconds
        self.pause = pause
        self.report = LoadReport()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._changed = threading.Condition(self._lock)

    def start(self) -> "ClientLoad":
        self._deadline = time.monotonic() + self.max_seconds
        for i in range(self.clients):
            t = threading.Thread(target=self._client, name=f"load-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> LoadReport:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 1.0)
        return self.report

    def __enter__(self) -> "ClientLoad":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait(self, predicate, timeout: float = 10.0) -> bool:
        """Wait until ``predicate(report)`` is true (checked on every reply); False on timeout."""
        end = time.monotonic() + timeout
        with self._changed:
            while not predicate(self.report):
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True

    def wait_served(self, n: int, timeout: float = 10.0) -> bool:
        """Wait until ``n`` more connections than now have been served."""
        with self._lock:
            target = self.report.served + n
        return self.wait(lambda r: r.served >= target, timeout)

    def _family(self) -> int:
        if isinstance(self.address, str):
            return socket.AF_UNIX
        return socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET

    def _client(self) -> None:
        family = self._family()
        address = self.address
        if isinstance(address, str) and address.startswith("@"):
            address = "\0" + address[1:]
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            self._one(family, address)
            if self.pause:
                self._stop.wait(self.pause)

    def _one(self, family: int, address) -> None:
        t0 = time.monotonic()
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            try:
                s.connect(address)
            except ConnectionRefusedError as exc:
                self._record("refused", t0, error=f"connect: {exc}")
                return
            except OSError as exc:
                self._record("failed", t0, error=f"connect: {exc}")
                return
            try:
                if self.request:
                    s.sendall(self.request)
                s.shutdown(socket.SHUT_WR)
                reply = self._read(s)
            except OSError as exc:
                self._record("failed", t0, error=f"exchange: {exc!r}")
                return
            if not reply:
                self._record("failed", t0, error="no reply (EOF)")
                return
            self._record("served", t0, reply=reply)
        finally:
            s.close()

    def _read(self, s: socket.socket) -> bytes:
        chunks, size = [], 0
        while True:
            want = 65536 if not self.reply_bytes else min(65536, self.reply_bytes - size)
            data = s.recv(want)
            if not data:
                break
            chunks.append(data)
            size += len(data)
            if self.reply_bytes and size >= self.reply_bytes:
                break
        return b"".join(chunks)

    def _record(self, outcome: str, t0: float, reply: bytes = b"", error: str = "") -> None:
        elapsed = time.monotonic() - t0
        with self._changed:
            r = self.report
            if outcome == "served":
                r.served += 1
                r.max_latency = max(r.max_latency, elapsed)
                first = reply.split(b"\n", 1)[0][:80]
                if first in r.replies or len(r.replies) < 1000:
                    r.replies[first] += 1
                r.last_reply = first
            else:
                setattr(r, outcome, getattr(r, outcome) + 1)
                if len(r.errors) < 10:
                    r.errors.append(error)
            self._changed.notify_all()
