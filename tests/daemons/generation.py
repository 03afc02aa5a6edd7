#!/usr/bin/env python3
"""A daemon for graceful restarts and workers: it answers each connection with its generation.

Usage: generation.py TAG [--ready-after SECONDS] [--fail-if PATH] [--hold SECONDS]

It takes its one socket from LISTEN_FDS (checking LISTEN_PID), accepts connections and
answers each one, once the client has sent its request and half-closed, with
``TAG pid=PID worker=ACTIVATOR_WORKER\\n``. With NOTIFY_SOCKET it sends READY=1 once it
is ready to serve (after --ready-after SECONDS). --fail-if PATH: exit 1 at once, never
ready, when PATH exists (a new generation that cannot start).
--hold: keep each connection that long before answering (connections in flight).

It drains on SIGTERM, as docs/restarts.md asks of a daemon: it stops accepting (the
connections still queued on the shared socket go to the other generation) and exits 0
once every connection it accepted has been answered.
"""
import os
import select
import signal
import socket
import sys
import threading
import time


def notify(message: str) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect("\0" + path[1:] if path.startswith("@") else path)
        s.send(message.encode())


def main() -> int:
    args = sys.argv[1:]
    tag = args[0]
    ready_after = float(args[args.index("--ready-after") + 1]) if "--ready-after" in args else 0.0
    hold = float(args[args.index("--hold") + 1]) if "--hold" in args else 0.0
    if "--fail-if" in args and os.path.exists(args[args.index("--fail-if") + 1]):
        return 1
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        sys.stderr.write(f"generation.py: LISTEN_PID {os.environ.get('LISTEN_PID')} is not {os.getpid()}\n")
        return 2
    listener = socket.socket(fileno=3)
    reply = f"{tag} pid={os.getpid()} worker={os.environ.get('ACTIVATOR_WORKER', '-')}\n".encode()
    in_flight: list[threading.Thread] = []

    def answer(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                while conn.recv(4096):
                    pass
                if hold:
                    time.sleep(hold)
                conn.sendall(reply)
            except OSError:
                pass

    stop_r, stop_w = os.pipe()
    os.set_blocking(stop_w, False)
    signal.set_wakeup_fd(stop_w)
    signal.signal(signal.SIGTERM, lambda *_: None)  # the wake-up fd says it; the loop below stops
    if ready_after:
        time.sleep(ready_after)
    notify("READY=1")
    # Non-blocking accept after select: the other generation (or worker) may take the connection first.
    listener.setblocking(False)
    while True:
        readable, _, _ = select.select([listener, stop_r], [], [])
        if stop_r in readable:
            break
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            continue
        conn.setblocking(True)
        t = threading.Thread(target=answer, args=(conn,))
        t.start()
        in_flight = [t for t in in_flight if t.is_alive()] + [t]
    listener.close()  # no more accepting; the socket itself stays open in activator and the other daemons
    for t in in_flight:
        t.join(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
