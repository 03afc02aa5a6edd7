#!/usr/bin/env python3
"""A backend that binds its own socket, for proxy units (tests/test_proxy.py). Knows nothing of LISTEN_FDS.

Usage: proxy_backend.py MODE ADDRESS [ARG]
ADDRESS is 127.0.0.1:PORT, [::1]:PORT or a unix socket path. One thread per connection. MODE:
  echo      copy what the client sends back to it; at its EOF, shut down writing and close.
  digest    read to EOF, then answer "<sha256 hex> <byte count>\\n" (only a half-close gets a reply).
  source    send ARG bytes (a repeating pattern), counting what was sent in the file ARG2; then close.
  slowstop  echo; on SIGTERM keep accepting for 0.5 s, closing each new connection at once (a daemon
            on its way out), then exit.
  notify    listen at once, answer "early\\n" to every connection until READY=1 is sent to NOTIFY_SOCKET
            (0.5 s after the start), "ready\\n" after it.
It prints "listening" on stdout once its socket listens.
"""
import hashlib
import os
import signal
import socket
import sys
import threading
import time

PATTERN = bytes(range(256)) * 256  # 64 KiB


def listen(address: str) -> socket.socket:
    if address.startswith("/"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(address):
            os.unlink(address)
        s.bind(address)
    elif address.startswith("["):
        host, _, port = address[1:].partition("]:")
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, int(port)))
    else:
        host, _, port = address.rpartition(":")
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, int(port)))
    s.listen(128)
    return s


def echo(c: socket.socket) -> None:
    while True:
        data = c.recv(65536)
        if not data:
            c.shutdown(socket.SHUT_WR)
            return
        c.sendall(data)


def digest(c: socket.socket) -> None:
    h, n = hashlib.sha256(), 0
    while True:
        data = c.recv(65536)
        if not data:
            break
        h.update(data)
        n += len(data)
    c.sendall(f"{h.hexdigest()} {n}\n".encode())


def source(c: socket.socket, size: int, progress: str) -> None:
    sent = 0
    while sent < size:
        chunk = PATTERN[: min(len(PATTERN), size - sent)]
        c.sendall(chunk)
        sent += len(chunk)
        with open(progress + ".tmp", "w") as f:
            f.write(str(sent))
        os.replace(progress + ".tmp", progress)


def serve(listener: socket.socket, handle) -> None:
    while True:
        c, _ = listener.accept()
        threading.Thread(target=_run, args=(c, handle), daemon=True).start()


def _run(c: socket.socket, handle) -> None:
    try:
        handle(c)
    except OSError:
        pass
    finally:
        c.close()


def main() -> int:
    mode, address, *args = sys.argv[1:]
    listener = listen(address)
    print("listening", flush=True)
    if mode == "echo":
        serve(listener, echo)
    elif mode == "digest":
        serve(listener, digest)
    elif mode == "source":
        serve(listener, lambda c: source(c, int(args[0]), args[1]))
    elif mode == "slowstop":
        stopping = threading.Event()

        def on_term(signum, frame):
            stopping.set()
            threading.Timer(0.5, lambda: os._exit(0)).start()

        signal.signal(signal.SIGTERM, on_term)
        serve(listener, lambda c: None if stopping.is_set() else echo(c))
    elif mode == "notify":
        ready = threading.Event()

        def announce():
            time.sleep(0.5)
            ready.set()
            target = os.environ["NOTIFY_SOCKET"]
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as n:
                n.sendto(b"READY=1", "\0" + target[1:] if target.startswith("@") else target)

        threading.Thread(target=announce, daemon=True).start()
        serve(listener, lambda c: c.sendall(b"ready\n" if ready.is_set() else b"early\n"))
    else:
        print(f"unknown mode {mode}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
