#!/usr/bin/env python3
"""A test daemon that reads back the options of the sockets it was given, then serves.

Usage: sockopts.py REPORT
Appends one JSON line to REPORT per start: its pid, LISTEN_FDNAMES and, for each
passed socket (fd 3, 4, ...), what getsockopt() and stat() say: keep-alive,
no-delay, buffer sizes, reuse-port, free-bind, IPv6-only, the bound address,
and for a unix socket file its mode and owner. Then it accepts every connection
on its stream sockets (and appends a line "connection on fd N" for each, with
the bytes the client sent before closing) and reads every datagram, until
SIGTERM.
"""
import json
import os
import select
import signal
import socket
import stat
import sys

IPV6_FREEBIND = 78
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
TYPES = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "datagram", socket.SOCK_SEQPACKET: "seqpacket"}


def option(sock, level, name):
    try:
        return sock.getsockopt(level, name)
    except OSError:
        return None


def describe(sock):
    info = {
        "fd": sock.fileno(),
        "type": TYPES.get(sock.type, int(sock.type)),
        "listening": bool(option(sock, socket.SOL_SOCKET, socket.SO_ACCEPTCONN)),
        "keepalive": option(sock, socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        "rcvbuf": option(sock, socket.SOL_SOCKET, socket.SO_RCVBUF),
        "sndbuf": option(sock, socket.SOL_SOCKET, socket.SO_SNDBUF),
        "reuseport": option(sock, socket.SOL_SOCKET, socket.SO_REUSEPORT),
    }
    if sock.family == socket.AF_INET:
        info["freebind"] = option(sock, socket.SOL_IP, IP_FREEBIND)
    if sock.family == socket.AF_INET6:
        info["freebind"] = option(sock, socket.IPPROTO_IPV6, IPV6_FREEBIND)
        info["v6only"] = option(sock, socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        info["nodelay"] = option(sock, socket.IPPROTO_TCP, socket.TCP_NODELAY)
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        name = name.decode(errors="replace") if isinstance(name, bytes) else name
        info["local"] = "@" + name[1:] if name.startswith("\0") else name
        if name and not name.startswith("\0"):
            st = os.lstat(name)
            info["file"] = {"mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
                            "ino": st.st_ino}
    else:
        info["local"] = list(name)
    return info


def append(report, record):
    with open(report, "a") as f:
        f.write(json.dumps(record) + "\n")


def main():
    report = sys.argv[1]
    n = int(os.environ.get("LISTEN_FDS", "0")) if os.environ.get("LISTEN_PID") == str(os.getpid()) else 0
    socks = [socket.socket(fileno=fd) for fd in range(3, 3 + n)]
    append(report, {"pid": os.getpid(), "names": os.environ.get("LISTEN_FDNAMES"),
                    "sockets": [describe(s) for s in socks]})
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    while True:
        ready, _, _ = select.select(socks, [], [])
        for s in ready:
            if s.type == socket.SOCK_DGRAM:
                data = s.recv(65536)
                append(report, {"datagram": s.fileno(), "data": data.decode(errors="replace")})
                continue
            conn, _ = s.accept()
            conn.settimeout(5)
            data = b""
            try:
                while chunk := conn.recv(65536):
                    data += chunk
            except OSError:
                pass
            conn.close()
            append(report, {"connection": s.fileno(), "data": data.decode(errors="replace")})


if __name__ == "__main__":
    sys.exit(main())
