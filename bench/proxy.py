"""The proxy group: activator's proxy units against systemd-socket-proxyd, and a direct connection.

Every peer relays to the same kind of backend (``pxbackend``, a small C program that binds its own
port, one thread per connection), on 127.0.0.1:

* ``activator``: ``activator run --proxy-to`` with the backend as the unit's daemon (started by the
  warm-up connection), the C relay in its thread;
* ``activator (Python relay)``: the same with ``activator._relay`` hidden, the relay that runs where
  the extension is not built (a row for the record, no target);
* ``systemd-socket-proxyd``: under ``systemd-socket-activate`` (which execs it at the first
  connection), relaying to a backend of its own started beforehand;
* ``direct``: the client connects to that backend itself: what a proxy costs.

The client is ``pxclient`` (C, threads): the data path is measured, not a Python client. Runs are
interleaved round by round with the order rotated, so that background load hits every peer alike.
Besides each rate, the CPU time each proxy process used per request (all its threads, from
/proc/PID/task/*/schedstat) is noted: it is what a loaded machine charges for the proxy.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from .metrics import Context, record, rotate
from .util import BenchError, Proc, free_ports, wait_listening

PROXYD = next((p for p in ("/lib/systemd/systemd-socket-proxyd", "/usr/lib/systemd/systemd-socket-proxyd")
               if os.access(p, os.X_OK)), None)
# activator with its C relay hidden (what runs where activator._relay could not be built)
PY_RELAY = ("import sys; sys.modules['activator._relay'] = None; sys.argv[0] = 'activator'; "
            "from activator.__main__ import main; main()")
SMALL = 64  # bytes per request
# (key, pxclient mode, threads, title)
CASES = [
    ("proxy_rr_1", "rr", 1, f"8. Proxy: {SMALL}-byte requests on a kept connection, 1 client"),
    ("proxy_rr_16", "rr", 16, f"8. Proxy: {SMALL}-byte requests on kept connections, 16 concurrent clients"),
    ("proxy_conn_1", "conn", 1, f"8. Proxy: one connection per {SMALL}-byte request, 1 client"),
    ("proxy_conn_16", "conn", 16, f"8. Proxy: one connection per {SMALL}-byte request, 16 concurrent clients"),
]
KEYS = ["proxy_throughput", *(key for key, *_ in CASES)]


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far, in ns (0 when it is gone)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def pxclient(ctx: Context, port: int, mode: str, threads: int, seconds: float, size: int) -> tuple[int, int, float]:
    out = subprocess.run([ctx.h["pxclient"], "127.0.0.1", str(port), mode, str(threads), f"{seconds:.3f}", str(size)],
                         capture_output=True, text=True, timeout=seconds + 120)
    if out.returncode != 0:
        raise BenchError(f"pxclient failed: {out.stderr.strip()}")
    count, errors, elapsed = out.stdout.split()
    return int(count), int(errors), float(elapsed)


class Peer:
    """One way to reach a backend: the process whose CPU is counted (None: direct), and its port."""

    def __init__(self, name: str, port: int, procs: list[Proc], measured: Proc | None):
        self.name, self.port, self.procs, self.measured = name, port, procs, measured

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


def _backend(ctx: Context) -> tuple[Proc, int]:
    port = free_ports(1)[0]
    proc = Proc([ctx.h["pxbackend"], "127.0.0.1", str(port)])
    try:
        wait_listening(port, proc)
    except BenchError:
        proc.stop()
        raise
    return proc, port


def _activator(ctx: Context, name: str, prefix: list[str]) -> Peer:
    front, back = free_ports(2)
    proc = Proc([*prefix, "run", "--max-connections", "4096", "--proxy-to", f"127.0.0.1:{back}",
                 "-l", f"127.0.0.1:{front}", "--", ctx.h["pxbackend"], "127.0.0.1", str(back)])
    peer = Peer(name, front, [proc], proc)
    try:
        proc.wait_line(r"[Ll]istening on")
    except BenchError:
        peer.stop()
        raise
    return peer


def _proxyd(ctx: Context, backend_port: int) -> Peer:
    if PROXYD is None or not shutil.which("systemd-socket-activate"):
        raise BenchError("systemd-socket-proxyd or systemd-socket-activate is not installed")
    front = free_ports(1)[0]
    proc = Proc(["systemd-socket-activate", "-l", f"127.0.0.1:{front}", PROXYD, "--connections-max=4096",
                 f"127.0.0.1:{backend_port}"])
    peer = Peer("systemd-socket-proxyd", front, [proc], proc)
    try:
        wait_listening(front, proc)
    except BenchError:
        peer.stop()
        raise
    return peer


def _peers(ctx: Context, errors: dict[str, str]) -> tuple[list[Peer], list[Proc]]:
    peers: list[Peer] = []
    backend, port = _backend(ctx)
    starters = [
        ("activator", lambda: _activator(ctx, "activator", list(ctx.act))),
        ("activator (Python relay)", lambda: _activator(ctx, "activator (Python relay)", [sys.executable, "-c",
                                                                                        PY_RELAY])),
        ("systemd-socket-proxyd", lambda: _proxyd(ctx, port)),
        ("direct", lambda: Peer("direct", port, [], None)),
    ]
    for name, start in starters:
        try:
            peers.append(start())
        except BenchError as exc:
            errors[name] = str(exc)
            ctx.say(f"  {name}: skipped: {exc}")
    return peers, [backend]


def proxy(ctx: Context) -> list[dict]:
    p = ctx.p
    errors: dict[str, str] = {}
    peers, others = _peers(ctx, errors)
    rates: dict[str, dict[str, list[float]]] = {key: {peer.name: [] for peer in peers} for key in KEYS}
    cpu = {key: {peer.name: [0, 0] for peer in peers if peer.measured} for key in KEYS}  # ns, requests
    failures = {key: {peer.name: 0 for peer in peers} for key in KEYS}
    bulk = p["proxy_bulk"]
    try:
        for peer in peers:  # warm-up: starts the daemons (activator's backend, socket-proxyd itself)
            pxclient(ctx, peer.port, "rr", 1, p["warmup_s"], SMALL)
        for rnd in range(p["proxy_rounds"]):
            runs = [("proxy_throughput", "bulk", 1, 0.0, bulk)] + [(k, m, t, p["proxy_s"], SMALL) for k, m, t, _ in CASES]
            for key, mode, threads, seconds, size in runs:
                for peer in rotate(peers, rnd):
                    before = cpu_ns(peer.measured.pid) if peer.measured else 0
                    count, failed, elapsed = pxclient(ctx, peer.port, mode, threads, seconds, size)
                    if peer.measured:
                        cpu[key][peer.name][0] += cpu_ns(peer.measured.pid) - before
                        cpu[key][peer.name][1] += count if mode != "bulk" else count // 2**20
                    rate = count / elapsed if elapsed > 0 else 0.0
                    rates[key][peer.name].append(rate / 2**20 if mode == "bulk" else rate)
                    failures[key][peer.name] += failed
            ctx.say(f"  round {rnd + 1}/{p['proxy_rounds']}: " + "; ".join(
                f"{peer.name} {rates['proxy_rr_1'][peer.name][-1]:.0f} rr/s" for peer in peers))
    finally:
        for peer in peers:
            peer.stop()
        for proc in others:
            proc.stop()
    targets = {"proxy_throughput": 0.95}
    titles = {"proxy_throughput": f"8. Proxy: throughput of one {bulk // 2**20} MiB transfer", **{k: t for k, *_, t in CASES}}
    out = []
    for key in KEYS:
        errs = dict(errors)
        errs.update({name: f"{n} failed requests" for name, n in failures[key].items() if n})
        per = "MiB" if key == "proxy_throughput" else "request"
        notes = ["CPU per " + per + ": " + ", ".join(
            f"{name} {ns / count / 1000:.1f} µs" for name, (ns, count) in cpu[key].items() if count)]
        if key == "proxy_throughput":
            notes.append("pxclient bulk: one connection reads a stream of zeros from pxbackend until EOF")
        out.append(record(key, titles[key], "MiB/s" if key == "proxy_throughput" else "req/s", True, rates[key],
                          targets=[{"against": "systemd-socket-proxyd", "op": "ge",
                                    "bound": targets.get(key, 1.0)}], errors=errs, notes=notes))
    return out
