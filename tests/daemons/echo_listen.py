#!/usr/bin/env python3
"""A small socket-activated daemon: takes its sockets with activator.listen_sockets() and echoes.

Says on stderr what it got, then serves every connection of every passed listening
socket: each line comes back prefixed with its pid ("PID: line"). Exits 0 on SIGTERM.
With no socket passed it says so on stderr and exits 2. The connection-mode variant
(Accept=yes) is the same program: a connected socket at fd 3 is served alone.
"""
import os
import selectors
import signal
import sys

import activator


def main() -> int:
    socks = activator.listen_sockets()
    if not socks:
        print("echo_listen: no socket passed (LISTEN_FDS)", file=sys.stderr, flush=True)
        return 2
    print(f"echo_listen: pid {os.getpid()} got {len(socks)} socket(s)", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    sel = selectors.DefaultSelector()
    buffers = {}

    def serve(conn):
        data = conn.recv(65536)
        if not data:
            sel.unregister(conn)
            conn.close()
            return data
        buffers[conn] = buffers.get(conn, b"") + data
        while b"\n" in buffers[conn]:
            line, buffers[conn] = buffers[conn].split(b"\n", 1)
            conn.sendall(b"%d: %s\n" % (os.getpid(), line))
        return data

    connected = []
    for s in socks:
        try:
            s.getpeername()
            connected.append(s)
            sel.register(s, selectors.EVENT_READ, serve)
        except OSError:
            sel.register(s, selectors.EVENT_READ, lambda lsock: sel.register(lsock.accept()[0], selectors.EVENT_READ, serve))
    while True:
        for key, _ in sel.select():
            data = key.data(key.fileobj)
            if connected and key.fileobj in connected and not data:
                return 0  # Accept=yes: one connection, then done


if __name__ == "__main__":
    sys.exit(main())
