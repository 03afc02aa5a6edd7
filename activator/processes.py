"""Process-tree helpers read from /proc, and the init duties of becoming a subreaper.

KillMode=control-group is emulated without cgroups: each daemon starts in its
own session (so its process group is its pid), and stopping it signals that
group plus every descendant found through /proc (which catches children that
moved to a session of their own).
"""
from __future__ import annotations

import os
import signal

PR_SET_CHILD_SUBREAPER = 36


def set_child_subreaper() -> bool:
    """Make orphaned descendants our children, so we reap them (what PID 1 does anyway)."""
    if os.getpid() == 1:
        return True
    try:
        from ._fastspawn import set_child_subreaper as c_set_child_subreaper  # type: ignore[attr-defined]

        c_set_child_subreaper()
        return True
    except ImportError:
        pass  # no C extension: ctypes below
    except OSError:
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def lookup_user(name: str):
    """The passwd entry of a user name or uid; ValueError "unknown user" when there is none."""
    import pwd

    try:
        return pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (KeyError, ValueError, OverflowError):  # a uid out of range is just as unknown
        raise ValueError(f"unknown user {name!r}") from None


def lookup_group(name: str) -> int:
    """The gid of a group name or number; ValueError "unknown group" when there is none."""
    import grp

    try:
        return (grp.getgrgid(int(name)) if name.isdigit() else grp.getgrnam(name)).gr_gid
    except (KeyError, ValueError, OverflowError):
        raise ValueError(f"unknown group {name!r}") from None


def parent_map() -> dict[int, int]:
    """pid -> ppid for every process we can see."""
    result = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields after the last ')' are safe.
        fields = data[data.rindex(b")") + 2:].split()
        result[int(entry)] = int(fields[1])
    return result


def descendants(roots: set[int], parents: dict[int, int] | None = None) -> set[int]:
    """Every process below any of ``roots`` (not the roots themselves)."""
    parents = parent_map() if parents is None else parents
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def signal_tree(root: int, sig: int, group: bool = True, parents: dict[int, int] | None = None) -> None:
    """Send ``sig`` to ``root``'s process group and all its descendants.

    ``parents`` (from parent_map()) lets a caller signalling many trees read /proc once, not per tree.
    """
    targets = descendants({root}, parents)
    if group:
        try:
            os.killpg(root, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in targets | {root}:
        try:
            if group and os.getpgid(pid) == root:
                continue  # killpg() reached it: a second SIGTERM can land after its handler ran, and kill it
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def cloexec_all_above(lowest: int = 3, keep: set[int] | None = None) -> None:
    """Mark every descriptor >= lowest close-on-exec, so nothing we inherited leaks into daemons."""
    keep = keep or set()
    try:
        fds = [int(x) for x in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        if fd >= lowest and fd not in keep:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass


def describe_status(status: int) -> tuple[str, int]:
    """('exited with status 3' | 'killed by signal SIGKILL', exit code as a shell reports it)."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        core = " (core dumped)" if os.WCOREDUMP(status) else ""
        return f"killed by signal {name}{core}", 128 + sig
    code = os.WEXITSTATUS(status)
    return f"exited with status {code}", code


def parse_signal(value: str | int) -> int:
    """A signal number from "SIGTERM", "term", "15"; ValueError naming the value otherwise."""
    text = str(value).strip().upper()
    if text.isdigit() and text.isascii():
        num = int(text)
        if 0 < num < signal.NSIG:
            return num
        raise ValueError(f"invalid signal number {value!r}")
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return int(signal.Signals[text])
    except KeyError:
        raise ValueError(f"unknown signal {value!r}") from None


CLEAN_SIGNALS = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE}


def should_restart(policy: str, status: int, forced: str | None = None) -> bool:
    """systemd's Restart= table; ``forced`` is 'timeout' or 'watchdog' when we ended the daemon."""
    if policy == "always":
        return True
    if policy == "no":
        return False
    clean = forced is None and (
        (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0)
        or (os.WIFSIGNALED(status) and os.WTERMSIG(status) in CLEAN_SIGNALS)
    )
    unclean_signal = os.WIFSIGNALED(status) and os.WTERMSIG(status) not in CLEAN_SIGNALS
    if policy == "on-success":
        return clean
    if policy == "on-failure":
        return not clean
    if policy == "on-abnormal":
        return unclean_signal or forced is not None
    if policy == "on-abort":
        return unclean_signal
    return False
