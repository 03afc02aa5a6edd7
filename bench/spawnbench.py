"""Micro-benchmark of the spawn mechanisms alone: ``python -m bench.spawnbench [--seconds S] [--rounds N]``.

A minimal accept loop (epoll, a batch of accepts per wake-up, SIGCHLD through the
wakeup fd, waitpid) starts one inetd-style ``cat`` per connection, the connection
on stdin and stdout, through each back end of activator.spawn, driven by the
bench's C client (one new connection per request) with 1 and 4 threads. Nothing
of activator's engine is in the loop, so the figures isolate the mechanism.
Printed per back end: connections/s (median of the rounds) and the server's own
CPU per connection (user + system, from /proc), interleaved round by round.

Back ends: ``wait`` (C extension, vfork: returns after the exec), ``start``
(C extension, returns while the child execs), ``posix_spawn``, ``fork``.
"""
from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile

from activator import spawn as S

from . import cdaemons
from .util import free_ports

BACKENDS = ["wait", "start", "posix_spawn", "fork"]
ACCEPT_BATCH = 32


def _starter(backend: str):
    if backend == "start":
        return S.start
    if backend == "wait":
        return S.spawn
    return {"posix_spawn": S._spawn_posix, "fork": S._spawn_fork}[backend]


def serve(backend: str, port: int) -> None:
    """The server process: accept, start cat, reap; until SIGTERM."""
    start = _starter(backend)
    cat = S.resolve("cat", os.environ.get("PATH"))
    base = S.encode_environment({k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")})
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", port))
    lsock.listen(4096)
    lsock.setblocking(False)
    sig_r, sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(sig_w, warn_on_full_buffer=False)
    stop = []
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, "accept")
    sel.register(sig_r, selectors.EVENT_READ, "signal")
    children: set[int] = set()
    failed = 0

    def reap() -> None:
        nonlocal failed
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            children.discard(pid)
            if backend == "start" and S.reaped(pid, "cat") is not None:
                failed += 1

    def accept() -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                fd, peer = lsock._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                return
            try:
                env = base + [f"REMOTE_ADDR={peer[0]}".encode(), f"REMOTE_PORT={peer[1]}".encode()]
                spec = S.SpawnSpec(cat, ["cat"], env, stdin=fd, stdout=fd, new_session=False, new_group=True)
                children.add(start(spec))
            finally:
                os.close(fd)

    print("ready", flush=True)
    while not stop:
        for key, _ in sel.select():
            if key.data == "accept":
                accept()
            else:
                try:
                    os.read(sig_r, 512)
                except BlockingIOError:
                    pass
                reap()
    if failed:
        print(f"failed {failed}", file=sys.stderr, flush=True)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _connbench(client: str, port: int, threads: int, seconds: float) -> tuple[int, int, float]:
    out = subprocess.run([client, "127.0.0.1", str(port), str(threads), f"{seconds:.3f}", "1000000"],
                         capture_output=True, text=True, timeout=seconds + 30, check=True)
    ok, err, elapsed = out.stdout.split()
    return int(ok), int(err), float(elapsed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.spawnbench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="length of one measured batch [2]")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds [5]")
    ap.add_argument("--backend", action="append", choices=BACKENDS, help="back ends to compare [all]")
    ap.add_argument("--serve", choices=BACKENDS, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port)
        return 0
    backends = args.backend or BACKENDS
    rates: dict[tuple[str, int], list[float]] = {(b, t): [] for b in backends for t in (1, 4)}
    cpu: dict[tuple[str, int], list[float]] = {(b, t): [] for b in backends for t in (1, 4)}
    errors = 0
    with tempfile.TemporaryDirectory(prefix="spawnbench-") as tmp:
        client = cdaemons.build(tmp)["connbench"]
        servers = {}
        try:
            for b in backends:
                port = free_ports(1)[0]
                p = subprocess.Popen([sys.executable, "-m", "bench.spawnbench", "--serve", b, "--port", str(port)],
                                     stdout=subprocess.PIPE, text=True)
                if p.stdout is None or p.stdout.readline().strip() != "ready":
                    raise SystemExit(f"spawnbench: the {b} server did not start")
                servers[b] = (p, port)
                _connbench(client, port, 1, 0.3)  # warm-up
            for rnd in range(args.rounds):
                for threads in (1, 4):
                    order = backends[rnd % len(backends):] + backends[:rnd % len(backends)]
                    for b in order:
                        p, port = servers[b]
                        c0 = _cpu_seconds(p.pid)
                        ok, err, elapsed = _connbench(client, port, threads, args.seconds)
                        c1 = _cpu_seconds(p.pid)
                        errors += err
                        rates[b, threads].append(ok / elapsed)
                        cpu[b, threads].append((c1 - c0) / max(ok, 1) * 1e6)
                print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(
                    f"{b} {rates[b, 1][-1]:.0f}/{rates[b, 4][-1]:.0f}" for b in backends), flush=True)
        finally:
            for p, _ in servers.values():
                p.send_signal(signal.SIGTERM)
                p.wait(10)
    print("\n| back end | seq conn/s | 4 clients conn/s | server CPU/conn seq | 4 clients |")
    print("|---|---:|---:|---:|---:|")
    for b in backends:
        print(f"| {b} | {statistics.median(rates[b, 1]):.0f} | {statistics.median(rates[b, 4]):.0f} "
              f"| {statistics.median(cpu[b, 1]):.0f} µs | {statistics.median(cpu[b, 4]):.0f} µs |")
    if errors:
        print(f"\n{errors} failed connections")
    return 0


if __name__ == "__main__":
    sys.exit(main())
