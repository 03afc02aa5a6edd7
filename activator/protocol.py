"""The LISTEN_* socket-activation protocol (sd_listen_fds(3)), both sides.

Launcher side: :func:`inherited_fds` reads what our own parent passed us, and
:func:`listen_environment` builds what we pass on (LISTEN_PID is set by the
spawner, because only the child knows its pid before exec).

Daemon side: :func:`listen_fds` and :func:`listen_fds_with_names` mirror
``sd_listen_fds_with_names()`` exactly, so a Python daemon needs no libsystemd.
"""
from __future__ import annotations

import errno
import os
import socket
from typing import Mapping, MutableMapping

LISTEN_FDS_START = 3
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
MAX_FDNAME = 255


class ProtocolError(OSError):
    """Malformed LISTEN_* variables (libsystemd returns -EINVAL for these)."""

    def __init__(self, message: str):
        super().__init__(errno.EINVAL, message)


def _parse_int(text: str) -> int:
    # libsystemd's safe_atoi(): strtol() semantics, so leading blanks and a sign are allowed,
    # trailing garbage is not.
    stripped = text.lstrip(" \t\n\r\f\v")
    try:
        if not stripped or stripped[0] not in "+-0123456789" or stripped != stripped.strip():
            raise ValueError
        return int(stripped, 10)
    except ValueError:
        raise ProtocolError(f"not a number: {text!r}") from None


def valid_fdname(name: str) -> bool:
    """systemd's fdname_is_valid(): printable ASCII, no ':', at most 255 characters."""
    return len(name) <= MAX_FDNAME and all(" " <= c <= "~" and c != ":" for c in name)


def parse_listen_environment(environ: Mapping[str, str], pid: int) -> list[tuple[int, str]]:
    """The (fd, name) pairs passed to process ``pid`` by ``environ``; [] when none are for it.

    Raises ProtocolError where sd_listen_fds_with_names() would return -EINVAL.
    """
    names: list[str] | None = None
    if "LISTEN_FDNAMES" in environ:
        raw = environ["LISTEN_FDNAMES"]
        names = raw.split(":") if raw else []
    pid_text = environ.get("LISTEN_PID")
    if pid_text is None:
        return []
    listen_pid = _parse_int(pid_text)
    if listen_pid <= 0:
        raise ProtocolError(f"invalid LISTEN_PID={pid_text!r}")
    if listen_pid != pid:
        return []
    fds_text = environ.get("LISTEN_FDS")
    if fds_text is None:
        return []
    n = _parse_int(fds_text)
    if n <= 0 or n > 2**31 - 1 - LISTEN_FDS_START:
        raise ProtocolError(f"invalid LISTEN_FDS={fds_text!r}")
    if names:
        if len(names) != n:
            raise ProtocolError(f"LISTEN_FDNAMES has {len(names)} names for {n} descriptors")
    else:
        names = ["unknown"] * n
    return list(zip(range(LISTEN_FDS_START, LISTEN_FDS_START + n), names))


def _unset(environ: MutableMapping[str, str]) -> None:
    for name in LISTEN_VARIABLES:
        environ.pop(name, None)
    if environ is os.environ:
        return


def inherited_fds(environ: MutableMapping[str, str] | None = None, unset: bool = True) -> list[tuple[int, str]]:
    """Descriptors our parent passed us, close-on-exec set; LISTEN_* removed when ``unset``."""
    environ = os.environ if environ is None else environ
    try:
        pairs = parse_listen_environment(environ, os.getpid())
        for fd, _ in pairs:
            os.set_inheritable(fd, False)
        return pairs
    finally:
        if unset:
            _unset(environ)


def listen_fds_with_names(unset_environment: bool = True) -> list[tuple[str, socket.socket]]:
    """(name, socket) for every descriptor passed to this process, like sd_listen_fds_with_names(3)."""
    result = []
    for fd, name in inherited_fds(os.environ, unset_environment):
        result.append((name, socket.socket(fileno=fd)))
    return result


def listen_fds(unset_environment: bool = True) -> list[socket.socket]:
    """The sockets passed to this process (fd 3 onwards), like sd_listen_fds(3)."""
    return [sock for _, sock in listen_fds_with_names(unset_environment)]


def listen_environment(n_fds: int, names: list[str] | None) -> dict[str, str]:
    """LISTEN_FDS and LISTEN_FDNAMES for a child receiving ``n_fds`` descriptors (LISTEN_PID comes at spawn)."""
    env = {"LISTEN_FDS": str(n_fds)}
    if names is not None:
        env["LISTEN_FDNAMES"] = ":".join(names)
    return env
