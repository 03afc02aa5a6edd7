#!/usr/bin/env python3
"""A test daemon that reports what it received, then serves.

Usage: probe.py REPORT [MODE]
Writes REPORT (JSON): its pid, LISTEN_* and selected environment, and every open
descriptor with its kind (socket family/type/listening/address). Then MODE:
  serve (default): accept on every listening stream socket and answer
                   b"hello from PID\n" to each client, until SIGTERM.
  once:            answer one client, then exit 0.
  exit:            exit 0 at once.
  echo-inetd:      copy stdin to stdout (inetd style) and exit.
  echo-fd3:        copy fd 3 back to fd 3 (accept mode) and exit.
  ignore-term:     ignore SIGTERM and sleep for ever.
"""
import json
import os
import select
import signal
import socket
import sys
import time

KINDS = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "datagram", socket.SOCK_SEQPACKET: "seqpacket"}
FAMILIES = {socket.AF_INET: "inet", socket.AF_INET6: "inet6", socket.AF_UNIX: "unix", socket.AF_VSOCK: "vsock"}


def describe(fd):
    info = {"fd": fd, "target": os.readlink(f"/proc/self/fd/{fd}")}
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return info
    try:
        info["family"] = FAMILIES.get(s.family, int(s.family))
        info["type"] = KINDS.get(s.type, int(s.type))
        info["listening"] = bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        try:
            name = s.getsockname()
            if isinstance(name, bytes):
                name = "@" + name[1:].decode(errors="replace") if name[:1] == b"\0" else name.decode()
            info["local"] = name if isinstance(name, str) else list(name)
        except OSError:
            pass
        flags = int(open(f"/proc/self/fdinfo/{fd}").read().split("flags:")[1].split()[0], 8)
        info["nonblocking"] = bool(flags & os.O_NONBLOCK)
        info["cloexec"] = bool(flags & 0o2000000)
    finally:
        s.close()
    return info


def main():
    report = sys.argv[1]
    mode = sys.argv[2] if len(sys.argv) > 2 else "serve"
    listing = os.listdir("/proc/self/fd")  # the descriptor used to list is closed again by now
    fds = sorted(int(x) for x in listing if os.path.exists(f"/proc/self/fd/{x}"))
    data = {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "sid": os.getsid(0),
        "pgid": os.getpgid(0),
        "cwd": os.getcwd(),
        "uid": os.getuid(),
        "gid": os.getgid(),
        "groups": os.getgroups(),
        "env": {k: v for k, v in os.environ.items()},
        "fds": [describe(fd) for fd in fds],
        "sigign": open("/proc/self/status").read().split("SigIgn:")[1].split()[0],
    }
    tmp = f"{report}.{os.getpid()}.tmp"  # per pid: concurrent instances (accept mode) share REPORT
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.rename(tmp, report)

    if mode == "exit":
        return 0
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(3600)
    if mode == "echo-inetd":
        while True:
            chunk = os.read(0, 65536)
            if not chunk:
                return 0
            os.write(1, chunk)
    if mode == "echo-fd3":
        conn = socket.socket(fileno=3)
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                return 0
            conn.sendall(chunk)
    n = int(os.environ.get("LISTEN_FDS", "0")) if os.environ.get("LISTEN_PID") == str(os.getpid()) else 0
    socks = [socket.socket(fileno=fd) for fd in range(3, 3 + n)]
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    while True:
        ready, _, _ = select.select(socks, [], [])
        for s in ready:
            if s.type == socket.SOCK_DGRAM:
                msg, peer = s.recvfrom(65536)
                if peer:
                    s.sendto(b"hello from %d\n" % os.getpid(), peer)
                continue
            conn, _ = s.accept()
            conn.sendall(b"hello from %d\n" % os.getpid())
            conn.close()
            if mode == "once":
                return 0


if __name__ == "__main__":
    sys.exit(main())
