"""condition-* and assert-* on paths (systemd.unit(5)), checked when a unit starts.

All the conditions of a unit must hold, except those written with ``|`` (triggering): of
those, at least one must. A condition written with ``!`` holds when the check fails. Each
check is a few system calls on one path (a glob: one directory listing per pattern level);
nothing here blocks on anything but the file system.
"""
from __future__ import annotations

import os
import stat

from .units import Condition

TYPE_CHECKING = False  # typing is not imported at run time (start-up, memory); type checkers see it
if TYPE_CHECKING:
    from typing import Callable


def _glob_matches(pattern: str) -> bool:
    import glob  # only for the units that have this condition, not at start-up

    return bool(glob.glob(pattern))


MAX_SLAVE_DEPTH = 8  # device-mapper stacks (LVM on LUKS on ...) are a few levels deep, never this many


def _stat(path: str, follow: bool = True) -> os.stat_result | None:
    try:
        return os.stat(path, follow_symlinks=follow)
    except OSError:
        return None


def _is(path: str, test: Callable[[int], bool], follow: bool = True) -> bool:
    st = _stat(path, follow)
    return st is not None and test(st.st_mode)


def _directory_not_empty(path: str) -> bool:
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is not None
    except OSError:
        return False


def _file_not_empty(path: str) -> bool:
    st = _stat(path)
    return st is not None and stat.S_ISREG(st.st_mode) and st.st_size > 0


def _file_is_executable(path: str) -> bool:
    return _is(path, stat.S_ISREG) and os.access(path, os.X_OK)


def _read_write(path: str) -> bool:
    try:
        return not os.statvfs(path).f_flag & os.ST_RDONLY
    except OSError:
        return False


def _encrypted(path: str) -> bool:
    """The file system of ``path`` is on a dm-crypt device, or on one stacked on such a device."""
    st = _stat(path)
    if st is None:
        return False
    return _device_encrypted(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}", MAX_SLAVE_DEPTH)


def _device_encrypted(sys_path: str, depth: int) -> bool:
    try:
        with open(os.path.join(sys_path, "dm", "uuid"), encoding="ascii", errors="replace") as f:
            if f.read(64).startswith("CRYPT-"):
                return True
    except OSError:
        pass
    try:
        slaves = os.listdir(os.path.join(sys_path, "slaves"))
    except OSError:
        return False
    return depth > 0 and any(_device_encrypted(os.path.join(sys_path, "slaves", s), depth - 1) for s in slaves)


CHECKS: dict[str, Callable[[str], bool]] = {
    "path-exists": os.path.exists,
    "path-exists-glob": _glob_matches,
    "path-is-directory": lambda path: _is(path, stat.S_ISDIR),
    "path-is-symbolic-link": lambda path: _is(path, stat.S_ISLNK, follow=False),
    "path-is-mount-point": os.path.ismount,
    "path-is-read-write": _read_write,
    "path-is-encrypted": _encrypted,
    "directory-not-empty": _directory_not_empty,
    "file-not-empty": _file_not_empty,
    "file-is-executable": _file_is_executable,
}


def holds(condition: Condition) -> bool:
    return CHECKS[condition.kind](condition.path) != condition.negate


def failed(conditions: list[Condition]) -> Condition | None:
    """The condition that stops the unit from starting, or None when they all hold as systemd combines them:
    every plain one, and at least one of the triggering ones (the first of them is named when none does)."""
    triggers = [c for c in conditions if c.trigger]
    for condition in conditions:
        if not condition.trigger and not holds(condition):
            return condition
    if triggers and not any(holds(c) for c in triggers):
        return triggers[0]
    return None


def check(conditions: list[Condition]) -> tuple[Condition, bool] | None:
    """What stops the unit: (the condition, whether it is an assertion), conditions first; None: it may start."""
    for assertion in (False, True):
        bad = failed([c for c in conditions if c.assertion == assertion])
        if bad is not None:
            return bad, assertion
    return None
