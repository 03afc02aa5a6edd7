#!/usr/bin/env python3
"""A notify-type test daemon written against python-systemd's systemd.daemon.

Usage: notifier.py IMPL MODE [STATE_DIR]

IMPL: systemd (python-systemd, for /usr/bin/python3) or activator (activator.daemon): the
import line is the only difference, the rest of the program is the same for both.
MODE:
  ready        STATUS=starting, then READY=1 with STATUS=serving; answers b"hello from PID\\n"
               on each connection to its first socket until SIGTERM.
  never-ready  sends STATUS=warming up but never READY=1; sleeps.
  mainpid      forks a child that becomes the main process (MAINPID=) and sends READY=1; the
               parent waits for it and exits with its status.
  watchdog     READY=1, then WATCHDOG=1 at a third of WATCHDOG_USEC; the first run (no
               STATE_DIR/first file yet) stops pinging after 3 pings and hangs.
  fdstore      the descriptor store: answers "pong N from PID" to "ping N" lines on every
               connection; on "restart" it hands the connection to the store (FDSTORE=1,
               FDNAME=conn) and exits 3. A later run takes back the stored connections
               (LISTEN_FDNAMES "conn") and goes on talking on them. With WATCHDOG_USEC set it
               sends WATCHDOG=1 at a third of it meanwhile, until a "hang" line.
"""
import os
import select
import signal
import socket
import sys
import time

IMPL, MODE = sys.argv[1], sys.argv[2]
STATE = sys.argv[3] if len(sys.argv) > 3 else None

if IMPL == "systemd":
    from systemd import daemon
else:
    from activator import daemon


def passed():
    """(name, socket) for what we were given, stored connections included."""
    return [(name, socket.socket(fileno=fd)) for fd, name in sorted(daemon.listen_fds_with_names().items())]


def watchdog_interval():
    """A third of WATCHDOG_USEC in seconds, None without a watchdog (python-systemd leaves this to us)."""
    usec = os.environ.get("WATCHDOG_USEC")
    return int(usec) / 1e6 / 3 if usec else None


def serve_hello(sock):
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    while True:
        conn, _ = sock.accept()
        conn.sendall(b"hello from %d\n" % os.getpid())
        conn.close()


def main():
    fds = passed()
    listeners = [s for name, s in fds if name != "conn"]
    if MODE == "ready":
        daemon.notify("STATUS=starting")
        daemon.notify("READY=1\nSTATUS=serving")
        serve_hello(listeners[0])
    elif MODE == "never-ready":
        daemon.notify("STATUS=warming up")
        while True:
            time.sleep(3600)
    elif MODE == "mainpid":
        pid = os.fork()
        if pid == 0:
            daemon.notify(f"MAINPID={os.getpid()}\nREADY=1")
            serve_hello(listeners[0])
        signal.signal(signal.SIGTERM, lambda *a: None)  # (the stop reaches the child too)
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    elif MODE == "watchdog":
        interval = watchdog_interval()
        first = not os.path.exists(os.path.join(STATE, "first"))
        open(os.path.join(STATE, "first"), "a").close()
        daemon.notify("READY=1")
        pings = 0
        while not first or pings < 3:
            daemon.notify("WATCHDOG=1")
            pings += 1
            time.sleep(interval)
        while True:
            time.sleep(3600)
    elif MODE == "fdstore":
        listener = listeners[0]
        conns = [s for name, s in fds if name == "conn"]
        daemon.notify(f"READY=1\nSTATUS={len(conns)} connection(s) taken back")
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
        buffers = {}
        interval = watchdog_interval()
        while True:
            ready, _, _ = select.select([listener, *conns], [], [], interval)
            if interval:
                daemon.notify("WATCHDOG=1")
            for s in ready:
                if s is listener:
                    conn, _ = listener.accept()
                    conns.append(conn)
                    continue
                data = s.recv(4096)
                if not data:
                    daemon.notify("FDSTOREREMOVE=1\nFDNAME=conn")  # (all of them: this daemon keeps one client)
                    conns.remove(s)
                    s.close()
                    continue
                buffers[s] = buffers.get(s, b"") + data
                while b"\n" in buffers[s]:
                    line, buffers[s] = buffers[s].split(b"\n", 1)
                    if line == b"restart":
                        daemon.notify("FDSTORE=1\nFDNAME=conn", fds=[s.fileno()])
                        sys.exit(3)
                    if line == b"hang":
                        interval = None
                    if line.startswith(b"ping"):
                        s.sendall(b"pong%s from %d\n" % (line[4:], os.getpid()))


if __name__ == "__main__":
    main()
