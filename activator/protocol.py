"""The LISTEN_* socket-activation protocol (sd_listen_fds(3)), both sides.

Launcher side: :func:`inherited_fds` reads what our own parent passed us, and
:func:`listen_environment` builds what we pass on (LISTEN_PID is set by the
spawner, because only the child knows its pid before exec).

Daemon side: :func:`listen_sockets` and :func:`listen_sockets_with_names` read
the variables exactly as ``sd_listen_fds()`` and ``sd_listen_fds_with_names()`` of
libsystemd do (number parsing included: leading blanks, a sign, ``0x``/``0o``/``0b``
and C octal prefixes) and return socket objects. Where libsystemd returns
``-EINVAL``/``-ERANGE``/``-EBADF`` these raise ``OSError`` with that errno.
:mod:`activator.daemon` gives the same as python-systemd's descriptor numbers.
"""
from __future__ import annotations

import errno
import os

TYPE_CHECKING = False  # typing is not imported at run time (start-up, memory); type checkers see it
if TYPE_CHECKING:
    import socket
    from typing import Mapping, MutableMapping

LISTEN_FDS_START = 3
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
# Addressed to activator itself by its parent (sd_listen_fds(3), sd_notify(3), sd_watchdog_enabled(3)):
# never passed on, since each daemon gets its own. The one list of them.
STRIP_ENV = (*LISTEN_VARIABLES, "NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC",
             "ACTIVATOR_WORKER")  # an activator started by another one: its worker index is not ours
MAX_FDNAME = 255
INT_MAX = 2**31 - 1
LONG_MAX = 2**63 - 1
ULONG_MAX = 2**64 - 1

_C_SPACE = b" \t\n\v\f\r"  # isspace() in the C locale: what strtol() skips
_SD_WHITESPACE = b" \t\n\r"  # systemd's WHITESPACE, skipped by safe_atolu()


class ProtocolError(OSError):
    """Malformed LISTEN_* variables (libsystemd returns -EINVAL or -ERANGE for these)."""

    def __init__(self, message: str, err: int = errno.EINVAL):
        super().__init__(err, message)


def _digit(c: int) -> int:
    if 48 <= c <= 57:
        return c - 48
    if 97 <= c <= 122:
        return c - 87
    if 65 <= c <= 90:
        return c - 55
    return 99


def strto(s: bytes, base: int) -> tuple[int, int]:
    """glibc strtol()/strtoul() without the range check: (signed value, end index); end 0 when nothing parsed.

    A magnitude beyond ULONG_MAX comes as ULONG_MAX + 1: out of every range the callers
    check, and a long run of digits costs linear time, not quadratic.
    """
    i, n = 0, len(s)
    while i < n and s[i] in _C_SPACE:
        i += 1
    negative = False
    if i < n and s[i] in b"+-":
        negative = s[i] == 45
        i += 1
    has_hex_prefix = s[i:i + 1] == b"0" and s[i + 1:i + 2] in (b"x", b"X") and _digit(s[i + 2] if i + 2 < n else 0) < 16
    if base == 0:
        if has_hex_prefix:
            base, i = 16, i + 2
        elif s[i:i + 1] == b"0":
            base = 8
        else:
            base = 10
    elif base == 16 and has_hex_prefix:
        i += 2
    start, value = i, 0
    while i < n and _digit(s[i]) < base:
        value = min(value * base + _digit(s[i]), ULONG_MAX + 1)
        i += 1
    if i == start:
        return 0, 0
    return (-value if negative else value), i


def _mangle_base(s: bytes) -> tuple[bytes, int]:
    """systemd's mangle_base(): Python-style 0b/0o prefixes (0x and 0 are left to strtol)."""
    if s[:2] in (b"0b", b"0B"):
        return s[2:], 2
    if s[:2] in (b"0o", b"0O"):
        return s[2:], 8
    return s, 0


def _safe_atoi(text: str, what: str) -> int:
    """systemd's safe_atoi()."""
    s, base = _mangle_base(os.fsencode(text).lstrip(_SD_WHITESPACE))
    value, end = strto(s, base)
    if end and not -LONG_MAX - 1 <= value <= LONG_MAX:
        raise ProtocolError(f"{what}={text!r} is out of range", errno.ERANGE)
    if end == 0 or end != len(s):
        raise ProtocolError(f"{what}={text!r} is not a number")
    if not -INT_MAX - 1 <= value <= INT_MAX:
        raise ProtocolError(f"{what}={text!r} is out of range", errno.ERANGE)
    return value


def _parse_pid(text: str) -> int:
    """systemd's parse_pid() (safe_atolu(), then a positive pid_t)."""
    s, base = _mangle_base(os.fsencode(text).lstrip(_SD_WHITESPACE))
    value, end = strto(s, base)
    if end and abs(value) > ULONG_MAX:
        raise ProtocolError(f"LISTEN_PID={text!r} is out of range", errno.ERANGE)
    if end == 0 or end != len(s):
        raise ProtocolError(f"LISTEN_PID={text!r} is not a number")
    ul = value % (ULONG_MAX + 1)
    if ul != 0 and s[:1] == b"-":
        raise ProtocolError(f"LISTEN_PID={text!r} is out of range", errno.ERANGE)
    pid = ul & 0xFFFFFFFF
    if pid > INT_MAX:
        pid -= 2**32
    if pid % (ULONG_MAX + 1) != ul or pid <= 0:
        raise ProtocolError(f"LISTEN_PID={text!r} is out of range", errno.ERANGE)
    return pid


def split_fdnames(text: str) -> list[str]:
    """LISTEN_FDNAMES split as libsystemd does: at ':', a backslash takes the next character as is."""
    names: list[str] = []
    current: list[str] = []
    chars = iter(text)
    for c in chars:
        if c == "\\":
            nxt = next(chars, None)
            if nxt is None:
                raise ProtocolError(f"LISTEN_FDNAMES={text!r} ends in a backslash")
            current.append(nxt)
        elif c == ":":
            names.append("".join(current))
            current = []
        else:
            current.append(c)
    names.append("".join(current))
    return names


def valid_fdname(name: str) -> bool:
    """systemd's fdname_is_valid(): printable ASCII, no ':', at most 255 characters."""
    return len(name) <= MAX_FDNAME and all(" " <= c <= "~" and c != ":" for c in name)


def _count(environ: Mapping[str, str], pid: int) -> int:
    """sd_listen_fds() without its side effects: how many descriptors are for ``pid``."""
    pid_text = environ.get("LISTEN_PID")
    if pid_text is None:
        return 0
    if _parse_pid(pid_text) != pid:
        return 0
    fds_text = environ.get("LISTEN_FDS")
    if fds_text is None:
        return 0
    n = _safe_atoi(fds_text, "LISTEN_FDS")
    if n <= 0 or n > INT_MAX - LISTEN_FDS_START:
        raise ProtocolError(f"invalid LISTEN_FDS={fds_text!r}")
    return n


def _read(environ: Mapping[str, str], pid: int, with_names: bool) -> list[tuple[int, str]]:
    names = None
    if with_names and "LISTEN_FDNAMES" in environ:
        names = split_fdnames(environ["LISTEN_FDNAMES"])
    n = _count(environ, pid)
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + n):
        os.set_inheritable(fd, False)  # OSError(EBADF) for a descriptor that is not open, as libsystemd
    if n and names is not None and len(names) != n:
        raise ProtocolError(f"LISTEN_FDNAMES has {len(names)} names for {n} descriptors")
    if names is None:
        names = ["unknown"] * n
    return list(zip(range(LISTEN_FDS_START, LISTEN_FDS_START + n), names))


def _unset(environ: MutableMapping[str, str]) -> None:
    for name in LISTEN_VARIABLES:
        environ.pop(name, None)  # os.environ.pop() calls unsetenv() too


def inherited_fds(
    environ: MutableMapping[str, str] | None = None, unset: bool = True, with_names: bool = True
) -> list[tuple[int, str]]:
    """Descriptors our parent passed us, close-on-exec set; LISTEN_* removed when ``unset`` (even on error)."""
    environ = os.environ if environ is None else environ
    try:
        return _read(environ, os.getpid(), with_names)
    finally:
        if unset:
            _unset(environ)


def _wrap(fd: int) -> socket.socket | int:
    import socket  # here: the engine reads this module too, and never wraps (socket.py costs it start-up time)

    try:
        return socket.socket(fileno=fd)  # family, type and protocol are read from the descriptor
    except OSError as exc:
        if exc.errno == errno.ENOTSOCK:
            return fd  # a pipe, memfd or file (from a descriptor store) comes as its number
        raise


def listen_sockets_with_names(unset_environment: bool = True) -> list[tuple[str, socket.socket | int]]:
    """(name, socket) for every descriptor passed to this process, like sd_listen_fds_with_names(3).

    Sockets come as ``socket.socket`` (family and type detected); a descriptor that is
    not a socket comes as its ``int``. Raises OSError where libsystemd returns an error.
    """
    return [(name, _wrap(fd)) for fd, name in inherited_fds(os.environ, unset_environment)]


def listen_sockets(unset_environment: bool = True) -> list[socket.socket | int]:
    """The sockets passed to this process (fd 3 onwards), like sd_listen_fds(3) (LISTEN_FDNAMES is not read)."""
    return [_wrap(fd) for fd, _ in inherited_fds(os.environ, unset_environment, with_names=False)]


def listen_environment(n_fds: int, names: list[str] | None) -> dict[str, str]:
    """LISTEN_FDS and LISTEN_FDNAMES for a child receiving ``n_fds`` descriptors (LISTEN_PID comes at spawn)."""
    env = {"LISTEN_FDS": str(n_fds)}
    if names is not None:
        env["LISTEN_FDNAMES"] = ":".join(names)
    return env
