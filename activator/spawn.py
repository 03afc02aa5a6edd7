"""Starting daemons with descriptors at fixed positions and a correct LISTEN_PID.

LISTEN_PID must be the pid of the exec'd daemon, which the parent learns only
after the child exists. Three ways to start a child, fastest first:

* ``_fastspawn`` (our C extension): clone a child that shares our memory, write
  the pid into LISTEN_PID in the child, exec. :func:`spawn` waits until the
  exec is done (vfork); :func:`start` returns at once, so that the kernel loads
  the program on another core while we accept the next connection, and an exec
  failure is learnt when the child (exit status 127) is reaped: :func:`reaped`.
* ``os.posix_spawn``: used when no LISTEN_PID and no credentials or directory
  change are needed (inetd-style instances).
* ``os.fork`` + ``os.execve``: always correct, slowest.

Every path moves the passed descriptors to their targets in two steps (first
above all targets, then down) so that a source already sitting on a target
number can never be clobbered, and every other descriptor is close-on-exec.
"""
from __future__ import annotations

import errno
import os
from . import signalapi as signal

from .records import dataclass, field

TYPE_CHECKING = False  # typing is not imported at run time (start-up, memory); type checkers see it
if TYPE_CHECKING:
    from typing import Any

_fastspawn: Any
try:  # the optional C fast path; absent when the package was installed without a compiler
    from . import _fastspawn  # type: ignore[attr-defined, no-redef]
except ImportError:  # pragma: no cover - depends on the build
    _fastspawn = None

# Python ignores these at start-up, and an ignored disposition survives exec: restore them.
RESET_SIGNALS = tuple(
    s for s in (signal.SIGPIPE, getattr(signal, "SIGXFSZ", None), signal.SIGCHLD, signal.SIGTERM, signal.SIGINT,
                signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGALRM,
                signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCONT)
    if s is not None
)


class SpawnError(Exception):
    """The command could not be started; the message names it and says why."""


@dataclass
class SpawnSpec:
    executable: str
    argv: list[str]
    env: dict[str, str] | list[bytes]  # a mapping, or entries already encoded as b"NAME=value"
    fds: list[int] = field(default_factory=list)  # placed at 3, 4, ...
    listen_pid: bool = False  # set LISTEN_PID to the child's own pid
    watchdog_pid: bool = False  # set WATCHDOG_PID to the child's own pid
    stdin: int | None = None  # a descriptor for fd 0, None to inherit ours
    stdout: int | None = None  # a descriptor for fd 1, None to inherit ours
    new_session: bool = True  # setsid(): no controlling terminal, a session (and process group) of its own
    new_group: bool = False  # setpgid(0, 0) instead: a process group of its own, in our session
    cwd: str | None = None
    uid: int = -1
    gid: int = -1
    groups: list[int] | None = None
    umask: int | None = None
    # setrlimit() in the child before exec: (RLIMIT_*, soft, hard), -1 for infinity. Only the fork path
    # applies them, so a spec with limits is always started that way.
    rlimits: list[tuple[int, int, int]] = field(default_factory=list)

    def fd_map(self) -> list[tuple[int, int]]:
        pairs = []
        if self.stdin is not None:
            pairs.append((self.stdin, 0))
        if self.stdout is not None:
            pairs.append((self.stdout, 1))
        pairs.extend((src, 3 + i) for i, src in enumerate(self.fds))
        return pairs


def resolve(command: str, path: str | None) -> str:
    """The executable for ``command``: a path as is, else searched in PATH; SpawnError when none."""
    if "/" in command:
        if not os.path.exists(command):
            raise SpawnError(f"{command}: command not found")
        if os.path.isdir(command) or not os.access(command, os.X_OK):
            raise SpawnError(f"{command}: not executable")
        return command
    for directory in (path if path is not None else os.defpath).split(os.pathsep):
        # What shutil.which does, without importing shutil: it brings bz2, lzma and zlib along
        # (0.3 MiB that a long-running engine would keep for one lookup).
        candidate = os.path.join(directory, command)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    raise SpawnError(f"{command}: command not found")


def _exec_error(name: str, err: int, step: str) -> SpawnError:
    what = {errno.ENOENT: "command not found", errno.EACCES: "permission denied", errno.ENOEXEC: "not an executable format"}
    reason = what.get(err, os.strerror(err)) if step == "exec" else f"{step}: {os.strerror(err)}"
    return SpawnError(f"{name}: {reason}")


def encode_environment(env: dict[str, str]) -> list[bytes]:
    """b"NAME=value" entries, as execve takes them (what a caller can prepare once and reuse)."""
    return [f"{k}={v}".encode("utf-8", "surrogateescape") for k, v in env.items()]


def _env_list(env: dict[str, str] | list[bytes]) -> list[bytes]:
    return list(env) if isinstance(env, list) else encode_environment(env)


def _env_dict(env: dict[str, str] | list[bytes]) -> dict[str, str]:
    if not isinstance(env, list):
        return env
    result: dict[str, str] = {}
    for entry in env:
        key, _, value = os.fsdecode(entry).partition("=")
        result.setdefault(key, value)  # as getenv(): the first entry of a name wins
    return result


def _spawn_fast(spec: SpawnSpec, wait: bool = True) -> int:
    """The C path: ``_fastspawn.spawn`` (wait for the exec) or ``_fastspawn.start``."""
    envp = _env_list(spec.env)
    pid_index = watchdog_index = -1
    if spec.listen_pid:
        pid_index = len(envp)
        envp.append(b"LISTEN_PID=")
    if spec.watchdog_pid:
        watchdog_index = len(envp)
        envp.append(b"WATCHDOG_PID=")
    try:
        return (_fastspawn.spawn if wait else _fastspawn.start)(
            os.fsencode(spec.executable), [os.fsencode(a) for a in spec.argv], envp, spec.fd_map(), pid_index,
            1 if spec.new_session else 2 if spec.new_group else 0,
            os.fsencode(spec.cwd) if spec.cwd else None, spec.uid, spec.gid,
            spec.groups, -1 if spec.umask is None else spec.umask, RESET_SIGNALS, watchdog_index,
        )
    except OSError as exc:
        step = getattr(exc, "filename", None) or "exec"
        raise _exec_error(spec.argv[0], exc.errno or errno.EIO, step) from None


def _spawn_posix(spec: SpawnSpec) -> int:
    pairs = spec.fd_map()
    top = max([d for _, d in pairs] + [s for s, _ in pairs] + [2]) + 1
    actions: list[tuple[int, ...]] = [(os.POSIX_SPAWN_DUP2, src, top + i) for i, (src, _) in enumerate(pairs)]
    actions += [(os.POSIX_SPAWN_DUP2, top + i, dst) for i, (_, dst) in enumerate(pairs)]
    actions += [(os.POSIX_SPAWN_CLOSE, top + i) for i in range(len(pairs))]
    group: dict[str, Any] = {"setpgroup": 0} if spec.new_group and not spec.new_session else {}
    try:
        return os.posix_spawn(
            spec.executable, spec.argv, _env_dict(spec.env), file_actions=actions, setsid=spec.new_session,
            setsigmask=(), setsigdef=RESET_SIGNALS, **group,
        )
    except OSError as exc:
        raise _exec_error(spec.argv[0], exc.errno or errno.EIO, "exec") from None


def _child(spec: SpawnSpec, report: int) -> None:
    """Runs in the forked child; never returns."""
    import fcntl  # loaded by _spawn_fork before the fork: a lookup here

    step = "setup"
    try:
        signal.set_wakeup_fd(-1)
        for sig in RESET_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        if spec.new_session:
            step = "setsid"
            os.setsid()
        elif spec.new_group:
            step = "setsid"
            os.setpgid(0, 0)
        pairs = spec.fd_map()
        step = "descriptors"
        top = max([d for _, d in pairs] + [s for s, _ in pairs] + [2]) + 1
        # The report pipe must not sit where the moves below go, or an error would go unreported.
        report = fcntl.fcntl(report, fcntl.F_DUPFD_CLOEXEC, top + len(pairs))
        for i, (src, _) in enumerate(pairs):
            os.dup2(src, top + i, inheritable=False)
        for i, (_, dst) in enumerate(pairs):
            os.dup2(top + i, dst, inheritable=True)
            os.close(top + i)
        if spec.umask is not None:
            os.umask(spec.umask)
        if spec.rlimits:
            import resource

            step = "setrlimit"
            for which, soft, hard in spec.rlimits:  # before setuid: raising a hard limit needs privileges
                resource.setrlimit(which, (soft, hard))
        if spec.cwd:
            step = "chdir"
            os.chdir(spec.cwd)
        if spec.groups is not None:
            step = "setgroups"
            os.setgroups(spec.groups)
        if spec.gid != -1:
            step = "setgid"
            os.setgid(spec.gid)
        if spec.uid != -1:
            step = "setuid"
            os.setuid(spec.uid)
        env = dict(_env_dict(spec.env))
        if spec.listen_pid:
            env["LISTEN_PID"] = str(os.getpid())
        if spec.watchdog_pid:
            env["WATCHDOG_PID"] = str(os.getpid())
        step = "exec"
        os.execve(spec.executable, spec.argv, env)
    except OSError as exc:
        os.write(report, f"{exc.errno or errno.EIO}:{step}".encode())
    except BaseException:
        os.write(report, f"{errno.EIO}:setup".encode())
    finally:
        os._exit(127)


def _spawn_fork(spec: SpawnSpec) -> int:
    import fcntl  # noqa: F401 - for _child, loaded before the fork (here: the C path never needs it)

    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(r)
            _child(spec, w)
        os.close(w)
        w = -1
        data = os.read(r, 128)
    finally:
        os.close(r)
        if w != -1:
            os.close(w)
    if data:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        err, _, step = data.decode().partition(":")
        raise _exec_error(spec.argv[0], int(err), step)
    return pid


def spawn(spec: SpawnSpec) -> int:
    """Start the child and return its pid; SpawnError with a one-line reason when it cannot start."""
    if spec.rlimits:
        return _spawn_fork(spec)
    if _fastspawn is not None:
        return _spawn_fast(spec)
    simple = spec.cwd is None and spec.uid == -1 and spec.gid == -1 and spec.groups is None and spec.umask is None
    if simple and not spec.listen_pid and not spec.watchdog_pid:
        return _spawn_posix(spec)
    return _spawn_fork(spec)


def start(spec: SpawnSpec) -> int:
    """Start the child and return its pid without waiting for its exec.

    The caller may close its copies of ``spec``'s descriptors at once. SpawnError for what is
    known at once (bad descriptors are not: they are an exec-time failure here); when the exec
    fails the child exits with status 127 and :func:`reaped` names the reason. Where the C
    extension cannot start without waiting (no extension, or not x86_64/aarch64) this is
    :func:`spawn`, and every failure is raised here.
    """
    if _fastspawn is None or spec.rlimits:  # setrlimit is done only by the fork back end
        return spawn(spec)
    return _spawn_fast(spec, wait=False)


def reaped(pid: int, name: str) -> SpawnError | None:
    """``pid``, a child of :func:`start`, has been reaped: forget it; why it could not start, if so.

    ``name`` is the command's name for the message (``argv[0]``). Call it for every reaped child
    of start(): that is when a failure is claimed (unclaimed ones are kept, at most 1,024). A call
    for a pid that is still running is harmless: a copy is freed only once its child is gone.
    """
    if _fastspawn is None:
        return None
    failure = _fastspawn.reaped(pid)
    return None if failure is None else _exec_error(name, *failure)
