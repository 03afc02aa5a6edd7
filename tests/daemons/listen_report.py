#!/usr/bin/env python3
"""Report what a listen_fds implementation makes of a crafted environment (for parity tests).

Usage: listen_report.py IMPL < CASES_JSON
  IMPL: systemd (python-systemd's systemd.daemon), activator (activator.daemon, the same
        calls) or sockets (activator.listen_sockets() and listen_sockets_with_names())
  CASES_JSON: a list of {"func": "with_names"|"plain", "unset": bool, "env": {"LISTEN_PID": "{pid}", ...}};
  "{pid}" becomes this process's pid, null leaves the variable out.
Five sockets of different kinds sit at fds 3-7. Before each case they are made inheritable
again and LISTEN_* cleared. Prints a JSON list, one object per case: result (list of
[fd, name, family, type]) or errno and exception, the variables as libc's getenv() sees them afterwards,
and the close-on-exec flag of fds 3-7.
"""
import ctypes
import fcntl
import json
import os
import socket
import sys

FIRST, COUNT = 3, 5


def place_sockets():
    made = [
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM),
        socket.socket(socket.AF_INET, socket.SOCK_STREAM),
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM),
        socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET),
    ]
    for i, s in enumerate(made):
        os.dup2(s.fileno(), 100 + i)
    for s in made:
        s.close()
    for i in range(COUNT):
        os.dup2(100 + i, FIRST + i, inheritable=True)
        os.close(100 + i)


def sockets_form(func, unset):
    """activator's socket-returning form, described as the descriptor-number form is."""
    import activator

    if func == "with_names":
        got = activator.listen_sockets_with_names(unset)
    else:
        got = [(None, s) for s in activator.listen_sockets(unset)]
    result = []
    for name, s in got:
        if not isinstance(s, socket.socket):
            raise AssertionError(f"not a socket: {s!r}")
        result.append([s.fileno(), name, int(s.family), int(s.type)])
        s.detach()
    return result


def run_case(impl, case):
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    for fd in range(FIRST, FIRST + COUNT):
        os.set_inheritable(fd, True)
    for key, value in case["env"].items():
        if value is not None:
            os.environ[key] = value.replace("{pid}", str(os.getpid()))
    unset = case["unset"]
    out = {}
    try:
        if impl == "sockets":
            result = sockets_form(case["func"], unset)
        else:
            if impl == "systemd":
                from systemd import daemon
            else:
                from activator import daemon

            if case["func"] == "with_names":
                pairs = sorted(daemon.listen_fds_with_names(unset).items())
            else:
                pairs = [(fd, None) for fd in daemon.listen_fds(unset)]
            result = []
            for fd, name in pairs:
                s = socket.socket(fileno=os.dup(fd))
                result.append([fd, name, int(s.family), int(s.type)])
                s.close()
        out["result"] = result
    except OSError as exc:
        out["errno"] = exc.errno
        out["exc"] = f"{type(exc).__name__}: {exc}"
    except UnicodeDecodeError:  # the names are decoded as strict UTF-8
        out["exc"] = "UnicodeDecodeError"
    except SystemError as exc:  # python-systemd 235's C code then returns a half-built tuple
        out["exc"] = f"{type(exc.__cause__).__name__} (as SystemError)"
    out["env"] = {}
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        value = LIBC.getenv(key.encode())
        out["env"][key] = None if value is None else value.decode("utf-8", "surrogateescape").replace(str(os.getpid()), "{pid}")
    out["cloexec"] = [bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) for fd in range(FIRST, FIRST + COUNT)]
    return out


LIBC = ctypes.CDLL(None)
LIBC.getenv.restype = ctypes.c_char_p


def main():
    impl = sys.argv[1]
    place_sockets()
    cases = json.load(sys.stdin)
    json.dump([run_case(impl, case) for case in cases], sys.stdout, sort_keys=True)


if __name__ == "__main__":
    main()
