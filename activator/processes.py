"""Process-tree helpers read from /proc, and the init duties of becoming a subreaper.

KillMode=control-group is emulated without cgroups: each daemon starts in a
process group of its own (its pgid is its pid), and stopping it signals that
group plus every descendant found through /proc (which catches children that
moved to a group or session of their own). Each process gets one signal per
stop step: a daemon that force-quits on a second SIGINT must not see two.
"""
from __future__ import annotations

import os
from . import signalapi as signal

TYPE_CHECKING = False  # typing is not imported at run time (start-up, memory); type checkers see it
if TYPE_CHECKING:
    from typing import Protocol

PR_SET_CHILD_SUBREAPER = 36


def adjust(pid: int, oom_score_adjust: int | None, nice: int | None) -> None:
    """oom-score-adjust and nice of a process we just started (OSError when the kernel refuses)."""
    if oom_score_adjust is not None:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(oom_score_adjust))
    if nice is not None:
        os.setpriority(os.PRIO_PROCESS, pid, nice)


UCRED_SIZE = 12  # struct ucred (SO_PEERCRED, SCM_CREDENTIALS): pid, uid, gid, three C ints


def native_ints(raw: bytes) -> list[int]:
    """The C ints in ``raw`` (native order), as ``array("i")`` or ``struct`` read them, a trailing partial
    one dropped: descriptors of SCM_RIGHTS, a struct ucred. Without either module: each is a C extension to
    load at every start-up, for these two reads."""
    return memoryview(raw[: len(raw) - len(raw) % 4]).cast("i").tolist()


def release_memory() -> bool:
    """Give the heap's free memory back to the system (malloc_trim), once the start-up has freed what
    it parsed: an idle init's resident memory. False without the C extension (no ctypes: importing it
    would cost more than the trim gives back) or where there is nothing to give."""
    try:
        from ._fastspawn import trim  # type: ignore[attr-defined]
    except ImportError:
        return False
    return bool(trim())


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


def _stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name; None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields after the last ')' are safe.
    return data[data.rindex(b")") + 2:].split()


class Tree:
    """A snapshot of the process tree: pid -> (ppid, pgid), with a children index built once.

    Read once per stop step for every unit: with thousands of processes, one /proc walk
    per unit (or per instance) took tens of seconds.
    """

    def __init__(self, table: dict[int, tuple[int, int]]) -> None:
        self.table = table
        self.children: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            self.children.setdefault(ppid, []).append(pid)

    @classmethod
    def read(cls) -> "Tree":
        """The current tree; OSError when /proc cannot be listed (out of descriptors, no /proc)."""
        table = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            fields = _stat_fields(entry)
            if fields is not None and len(fields) > 2:
                table[int(entry)] = (int(fields[1]), int(fields[2]))
        return cls(table)

    def descendants(self, roots: set[int]) -> set[int]:
        """Every process below any of ``roots`` (not the roots themselves)."""
        found: set[int] = set()
        stack = list(roots)
        while stack:
            for child in self.children.get(stack.pop(), ()):
                if child not in found:
                    found.add(child)
                    stack.append(child)
        return found

    def parent(self, pid: int) -> int | None:
        entry = self.table.get(pid)
        return entry[0] if entry else None


EMPTY_TREE = Tree({})


def parent_of(pid: int) -> int | None:
    """The parent of ``pid`` (one /proc read), None when it is gone."""
    fields = _stat_fields(pid)
    return int(fields[1]) if fields is not None and len(fields) > 1 else None


def descendants(roots: set[int], tree: Tree | None = None) -> set[int]:
    """Every process below any of ``roots`` (not the roots themselves)."""
    return (tree or Tree.read()).descendants(roots)


def signal_tree(root: int, sig: int, tree: Tree | None = None, pgid: int | None = None) -> None:
    """Send ``sig`` once to every process of ``root``'s tree: killpg() for its group, kill() for the rest.

    ``pgid``: the group the daemon was started in (its first pid; default ``root``). Processes
    of the tree outside that group (moved to a group or session of their own) get a kill()
    each; without a snapshot (``EMPTY_TREE``: /proc unreadable) only the group and ``root``.
    """
    tree = tree if tree is not None else Tree.read()
    group = root if pgid is None else pgid
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        pass
    singles = {pid for pid in tree.descendants({root}) if tree.table[pid][1] != group}
    entry = tree.table.get(root)
    if (entry[1] if entry else root) != group:
        singles.add(root)  # a main process (MAINPID=) that is not in the daemon's group
    for pid in singles:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def pgid_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[2]) if fields is not None and len(fields) > 2 else None


def own_children() -> set[int] | None:
    """Our child processes, read from /proc/self/task/*/children (O(children), not O(processes));
    None when the kernel does not offer that file (CONFIG_PROC_CHILDREN)."""
    kids: set[int] = set()
    try:
        tasks = os.listdir("/proc/self/task")
        for tid in tasks:
            with open(f"/proc/self/task/{tid}/children", "rb") as f:
                kids.update(int(x) for x in f.read().split())
    except (OSError, ValueError):
        return None
    return kids


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets ``pid`` holds open (empty when it is gone or unreadable)."""
    found: set[int] = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for name in names:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            try:
                found.add(int(link[8:-1]))
            except ValueError:
                pass
    return found


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
            name = signal.name(sig)
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
        return signal.number(text)
    except KeyError:
        raise ValueError(f"unknown signal {value!r}") from None


CLEAN_SIGNALS = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE}


if TYPE_CHECKING:
    class StatusSet(Protocol):
        def matches(self, status: int) -> bool: ...


def should_restart(policy: str, status: int, forced: str | None = None, success: StatusSet | None = None,
                   prevent: StatusSet | None = None, force: StatusSet | None = None) -> bool:
    """systemd's Restart= table; ``forced`` is why we ended the daemon ('timeout', 'watchdog') or why its start
    failed after it was spawned. ``success`` (SuccessExitStatus=) adds to the clean exits; a status in
    ``prevent`` (RestartPreventExitStatus=) never restarts, one in ``force`` (RestartForceExitStatus=) always
    does, whatever the policy, as in systemd."""
    if prevent is not None and prevent.matches(status):
        return False
    if force is not None and force.matches(status):
        return True
    if policy == "always":
        return True
    if policy == "no":
        return False
    clean = forced is None and (
        (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0)
        or (os.WIFSIGNALED(status) and os.WTERMSIG(status) in CLEAN_SIGNALS)
        or (success is not None and success.matches(status))
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
