#!/usr/bin/env python3
"""A socket-activated daemon that drains on SIGTERM, for the watch-mode and restart proofs.

Reads its version from the file ``version`` beside it, once, at start (as a daemon reads its
code), and answers every connection of fd 3 with that version and its pid, after reading the
request to its end. On SIGTERM it stops accepting, finishes the connection it is serving and
exits 0: connections still in the backlog are left there for the next generation.

The signal reaches the loop through a wakeup pipe checked before every accept(), so that no
connection is accepted once the signal has come: each accept() follows a select() that saw no
signal, and takes the oldest queued connection, which was queued before that select() returned.
"""
import os
import select
import signal
import socket
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    with open(os.path.join(HERE, "version"), "rb") as f:
        version = f.read().strip()
    reply = b"%s %d\n" % (version, os.getpid())
    listener = socket.socket(fileno=3)
    listener.setblocking(False)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, lambda *a: None)  # the wakeup pipe carries it to the loop
    while True:
        ready = select.select([listener, wake_r], [], [])[0]
        if wake_r in ready or select.select([wake_r], [], [], 0)[0]:
            return 0
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            continue
        with conn:
            conn.settimeout(5)
            try:
                for _ in range(64):  # the request, to its end (bounded)
                    if not conn.recv(4096):
                        break
                conn.sendall(reply)
            except OSError as exc:
                print(f"drain_server: {exc}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
