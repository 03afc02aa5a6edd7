"""runtime-directory and its siblings (systemd.exec(5)): directories a daemon gets, made before it starts.

Each is a path relative to the base of its kind (``/run``, ``/var/lib``, ``/var/cache``,
``/var/log``, ``/etc`` as root; the XDG directories otherwise, as systemd's user manager),
created before each start with the parents it needs (0755, activator's), the last
component with the unit's mode and owned by its user and group. The daemon gets the
paths in ``$RUNTIME_DIRECTORY``, ``$STATE_DIRECTORY``, ... (colon-separated).

Creation walks the path one component at a time through directory descriptors and never
follows a symbolic link below the base, so a link planted where a directory is expected is
refused rather than followed. Runtime directories go when the daemon stops: the directory is
first renamed away (at once, so that the next start makes a fresh one), then removed by a
child process, since a daemon may have filled it with more files than the loop should spend
time on.
"""
from __future__ import annotations

import errno
import itertools
import os
import sys

from .records import dataclass
from .units import ServiceSpec

KINDS = ("runtime", "state", "cache", "logs", "configuration")
_SYSTEM = {"runtime": "/run", "state": "/var/lib", "cache": "/var/cache", "logs": "/var/log", "configuration": "/etc"}
_USER = {"state": ("XDG_STATE_HOME", ".local/state"), "cache": ("XDG_CACHE_HOME", ".cache"),
         "logs": ("XDG_STATE_HOME", ".local/state/log"), "configuration": ("XDG_CONFIG_HOME", ".config")}
# A separate interpreter removes what a daemon left: no site, no user site, only shutil.
REMOVER = "import shutil, sys; shutil.rmtree(sys.argv[1], ignore_errors=True)"
_removals = itertools.count()


@dataclass(frozen=True)
class Directory:
    kind: str
    root: str  # the base of its kind
    relative: str
    mode: int

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.relative)


def base(kind: str) -> str:
    """Where directories of ``kind`` go; ValueError when it is unknown (no XDG_RUNTIME_DIR without root)."""
    if os.geteuid() == 0:
        return _SYSTEM[kind]
    if kind == "runtime":
        runtime = os.environ.get("XDG_RUNTIME_DIR", "")
        if not runtime.startswith("/"):
            raise ValueError("runtime-directory: XDG_RUNTIME_DIR is not set (activator runs without root, as a "
                             "user manager would)")
        return runtime
    variable, fallback = _USER[kind]
    value = os.environ.get(variable, "")
    if value.startswith("/"):
        return value if kind != "logs" else os.path.join(value, "log")
    return os.path.join(os.path.expanduser("~"), fallback)


_ATTRS = tuple((kind, f"{kind}_directory", f"{kind}_directory_mode") for kind in KINDS)


def planned(svc: ServiceSpec) -> list[Directory]:
    """The directories of a service, in the order of the keys; ValueError when a base is unknown."""
    # Called for every unit at start (twice): most have none, so nothing is formatted or built for them.
    return [Directory(kind, base(kind), relative, getattr(svc, mode))
            for kind, attr, mode in _ATTRS for relative in getattr(svc, attr)]


def environment(directories: list[Directory]) -> dict[str, str]:
    """$RUNTIME_DIRECTORY, $STATE_DIRECTORY, ...: the absolute paths of each kind, colon-separated."""
    env: dict[str, list[str]] = {}
    for d in directories:
        env.setdefault(f"{d.kind.upper()}_DIRECTORY", []).append(d.path)
    return {name: ":".join(paths) for name, paths in env.items()}


def create(directory: Directory, uid: int, gid: int) -> None:
    """Make the directory (and its parents) and give it its mode and owner; OSError (its filename: the path at
    fault; a symbolic link where a directory is expected is "not a directory")."""
    root = directory.root
    os.makedirs(root, 0o755, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    parts = directory.relative.split("/")
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            try:
                os.mkdir(part, directory.mode if last else 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as exc:
                reason = "not a directory" if exc.errno in (errno.ENOTDIR, errno.ELOOP) else exc.strerror
                raise OSError(exc.errno, reason, os.path.join(root, *parts[:i + 1])) from None
            os.close(fd)
            fd = child
        os.fchmod(fd, directory.mode)
        if (uid, gid) != (-1, -1):
            os.fchown(fd, uid, gid)
    finally:
        os.close(fd)


def retire(path: str) -> str | None:
    """Rename a runtime directory out of the way; the name to remove it under, None when it is not there."""
    parent, name = os.path.split(path)
    hidden = os.path.join(parent, f".#{name}.removing.{os.getpid()}.{next(_removals)}")
    try:
        os.rename(path, hidden)
    except FileNotFoundError:
        return None
    return hidden


def remover_argv(path: str) -> list[str]:
    return [sys.executable, "-I", "-S", "-c", REMOVER, path]
