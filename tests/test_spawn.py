"""activator.spawn with real processes, through every back end.

Back ends (the ``backend`` fixture):

* ``fast``  - ``spawn()`` with the C extension ``activator._fastspawn``;
* ``fork``  - ``_spawn_fork`` (``_fastspawn`` patched to None);
* ``posix`` - ``_spawn_posix`` (``_fastspawn`` patched to None); it cannot set
  LISTEN_PID, a directory, credentials or a umask, so those tests skip it;
* ``auto``  - ``spawn()`` with ``_fastspawn`` patched to None, i.e. the
  fallback selection between the two above.

Most checks start ``sleep 60`` and read what the exec'd child actually has from
/proc/PID (descriptors, signal masks, session, directory, umask, environment,
credentials), then kill and reap it.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import inspect
import os
import select
import shutil
import signal
import socket
import stat
import sys
import threading
import time

import pytest

from activator import spawn as S

TIMEOUT = 10.0
SLEEP = shutil.which("sleep") or "/bin/sleep"
SH = shutil.which("sh") or "/bin/sh"
TRUE = shutil.which("true") or "/bin/true"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only (/proc)")


# ---------------------------------------------------------------- helpers


def reap(pid: int, timeout: float = TIMEOUT) -> int:
    """Wait for pid (bounded) and return its exit code (negative: killed by that signal)."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"child {pid} did not exit within {timeout}s")
        time.sleep(0.002)


def read_all(fd: int, timeout: float = TIMEOUT) -> bytes:
    """Read fd to EOF, bounded in time."""
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail("no EOF on the child's output in time")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            data = os.read(fd, 65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def open_fds(pid: int | str = "self") -> set[int]:
    names = os.listdir(f"/proc/{pid}/fd")
    fds = set()
    for name in names:
        n = int(name)
        if pid == "self":  # the directory's own descriptor is gone by now
            try:
                os.fstat(n)
            except OSError:
                continue
        fds.add(n)
    return fds


def inherited_fds() -> set[int]:
    """Descriptors of ours that any child inherits anyway (std streams, whatever our own parent leaked)."""
    return {n for n in open_fds() if os.get_inheritable(n)}


def identity(path_or_fd) -> tuple[int, int]:
    st = os.stat(path_or_fd) if isinstance(path_or_fd, str) else os.fstat(path_or_fd)
    return st.st_dev, st.st_ino


def status_fields(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def session_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[3])  # state ppid pgrp session


def wait_sleeping(pid: int, exe: str, timeout: float = TIMEOUT) -> None:
    """Wait until pid runs exe and has settled in its sleep.

    A vfork-style spawn returns as soon as the kernel has switched the child to the new
    program's memory, which is *before* the kernel closes the close-on-exec descriptors and
    resets caught signals; and then the dynamic loader briefly opens files (at the lowest free
    numbers). So /proc is read only once the child sleeps in nanosleep.
    """
    want = os.path.realpath(exe)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.readlink(f"/proc/{pid}/exe") == want:
                with open(f"/proc/{pid}/wchan") as f:
                    wchan = f.read().strip()
                if "nanosleep" in wchan:
                    return
                if wchan in ("", "0"):  # no wchan here: settle for "sleeping", plus a margin
                    with open(f"/proc/{pid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] == "S":
                            time.sleep(0.1)
                            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"child {pid} never ran {exe}")
        time.sleep(0.002)


def sigmask(signals) -> int:
    mask = 0
    for s in signals:
        mask |= 1 << (int(s) - 1)
    return mask


def env(**extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C", **extra}


@contextlib.contextmanager
def sockets_at(*numbers: int):
    """Temporarily put fresh sockets exactly on the given descriptor numbers, restoring what was there.

    Yields {number: (dev, ino)} of the socket placed on each number.
    """
    saved = []
    made = []
    try:
        for n in numbers:
            try:
                inheritable = os.get_inheritable(n)
                keep = fcntl.fcntl(n, fcntl.F_DUPFD_CLOEXEC, 200)
            except OSError:
                keep, inheritable = None, False
            saved.append((n, keep, inheritable))
            a, b = socket.socketpair()
            made += [a, b]
            os.dup2(a.fileno(), n, inheritable=False)
        yield {n: identity(n) for n in numbers}
    finally:
        for n, keep, inheritable in reversed(saved):
            if keep is None:
                os.close(n)
            else:
                os.dup2(keep, n, inheritable=inheritable)
                os.close(keep)
        for s in made:
            s.close()


# ---------------------------------------------------------------- back ends


def _posix_capable(spec: S.SpawnSpec) -> bool:
    return (not spec.listen_pid and not spec.watchdog_pid and spec.cwd is None and spec.uid == -1 and spec.gid == -1
            and spec.groups is None and spec.umask is None)


class Backend:
    def __init__(self, name: str, fn):
        self.name = name
        self._fn = fn
        self.pids: list[int] = []

    def spawn(self, spec: S.SpawnSpec) -> int:
        if self.name == "posix" and not _posix_capable(spec):
            pytest.skip("the posix_spawn path does not do LISTEN_PID, cwd, credentials or umask")
        pid = self._fn(spec)
        self.pids.append(pid)
        return pid

    def sleeper(self, **kw) -> int:
        """Start `sleep 60` and return its pid once it runs sleep."""
        kw.setdefault("env", env())
        pid = self.spawn(S.SpawnSpec(SLEEP, ["sleep", "60"], **kw))
        wait_sleeping(pid, SLEEP)
        return pid

    def finish(self, pid: int) -> int:
        """Kill (if still running) and reap pid."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        code = reap(pid)
        self.pids.remove(pid)
        return code

    def cleanup(self) -> None:
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                reap(pid)


@pytest.fixture(params=["fast", "fork", "posix", "auto"])
def backend(request, monkeypatch):
    name = request.param
    if name == "fast":
        if S._fastspawn is None:
            if os.environ.get("CI"):  # scripts/test installs gcc: under CI the C path must exist
                pytest.fail("activator._fastspawn is not built")
            pytest.skip("activator._fastspawn is not built")
        b = Backend(name, S.spawn)
    else:
        monkeypatch.setattr(S, "_fastspawn", None)
        b = Backend(name, {"fork": S._spawn_fork, "posix": S._spawn_posix, "auto": S.spawn}[name])
    yield b
    b.cleanup()


# ---------------------------------------------------------------- LISTEN_PID and environment


def shell_output(backend, script: str, **kw) -> tuple[int, list[str]]:
    """Spawn `sh -c script` with stdout on a pipe; its pid and the words it printed."""
    r, w = os.pipe()
    try:
        pid = backend.spawn(S.SpawnSpec(SH, ["sh", "-c", script], env(), stdout=w, **kw))
        os.close(w)
        w = -1
        return pid, read_all(r).decode().split()
    finally:
        os.close(r)
        if w != -1:
            os.close(w)


def test_listen_pid_is_the_daemons_own_pid(backend):
    pid, out = shell_output(backend, 'echo "$$ $LISTEN_PID"', listen_pid=True)
    assert backend.finish(pid) == 0
    assert out == [str(pid), str(pid)]


@pytest.mark.parametrize("listen_pid", [True, False])
def test_watchdog_pid_is_the_daemons_own_pid(backend, listen_pid):
    pid, out = shell_output(backend, 'echo "$$ ${LISTEN_PID:-none} $WATCHDOG_PID"', listen_pid=listen_pid,
                            watchdog_pid=True)
    assert backend.finish(pid) == 0
    assert out == [str(pid), str(pid) if listen_pid else "none", str(pid)]


def test_environment_is_exactly_what_was_given(backend):
    given = env(FOO="bar baz", EMPTY="", UNICODE="h\u00e9")
    for listen_pid in (False, True):
        pid = backend.sleeper(env=given, listen_pid=listen_pid)
        with open(f"/proc/{pid}/environ", "rb") as f:
            got = dict(item.decode().split("=", 1) for item in f.read().split(b"\0") if item)
        backend.finish(pid)
        expected = dict(given, LISTEN_PID=str(pid)) if listen_pid else given
        assert got == expected


def test_listen_pid_is_right_for_many_spawns(backend):
    pids = [backend.sleeper(listen_pid=True) for _ in range(5)]
    try:
        for pid in pids:
            with open(f"/proc/{pid}/environ", "rb") as f:
                assert f"LISTEN_PID={pid}".encode() in f.read().split(b"\0")
    finally:
        for pid in pids:
            backend.finish(pid)


# ---------------------------------------------------------------- descriptors


def test_passed_fds_land_at_3_and_up_and_nothing_else_is_open(backend):
    socks = [socket.socketpair() for _ in range(3)]
    try:
        fds = [a.fileno() for a, _ in socks]
        pid = backend.sleeper(fds=fds, listen_pid=backend.name != "posix")
        child = {n: identity(f"/proc/{pid}/fd/{n}") for n in open_fds(pid)}
        backend.finish(pid)
        for i, fd in enumerate(fds):
            assert child[3 + i] == identity(fd)
        extra = inherited_fds() - {3, 4, 5}
        assert set(child) == {3, 4, 5} | extra
        assert {0, 1, 2} <= set(child)
    finally:
        for a, b in socks:
            a.close()
            b.close()


@pytest.mark.parametrize("order", [[4, 3], [3, 4], [4, "x", 3], [3, 3]], ids=["swap", "same", "rotate", "twice"])
def test_sources_already_on_target_numbers(backend, order):
    """Sockets that are themselves fds 3 and 4 in the parent, passed in an order that moves them."""
    spare = socket.socketpair()
    try:
        with sockets_at(3, 4) as at:
            at["x"] = identity(spare[0].fileno())
            sources = [spare[0].fileno() if o == "x" else o for o in order]
            pid = backend.sleeper(fds=sources)
            child = {n: identity(f"/proc/{pid}/fd/{n}") for n in open_fds(pid)}
            backend.finish(pid)
            # the parent's own descriptors are untouched
            assert identity(3) == at[3] and identity(4) == at[4]
        targets = list(range(3, 3 + len(order)))
        for target, o in zip(targets, order):
            assert child[target] == at[o], f"fd {target} should be the parent's {o}"
        extra = inherited_fds() - set(targets)
        assert set(child) == set(targets) | extra
    finally:
        spare[0].close()
        spare[1].close()


def test_stdin_and_stdout_redirection(backend):
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        os.write(in_w, b"hello there\n")
        os.close(in_w)
        in_w = -1
        pid = backend.spawn(S.SpawnSpec(SH, ["sh", "-c", 'read line; echo "got: $line"; echo err >&2'], env(),
                                        stdin=in_r, stdout=out_w))
        os.close(out_w)
        out_w = -1
        out = read_all(out_r)
        assert backend.finish(pid) == 0
        assert out == b"got: hello there\n"
    finally:
        for fd in (in_r, in_w, out_r, out_w):
            if fd != -1:
                os.close(fd)


def test_stdout_redirection_together_with_passed_sockets(backend):
    a, b = socket.socketpair()
    out_r, out_w = os.pipe()
    try:
        script = 'echo ok >&3; ls /proc/self/fd >/dev/null; echo "$(readlink /proc/$$/fd/3)"'
        pid = backend.spawn(S.SpawnSpec(SH, ["sh", "-c", script], env(), fds=[a.fileno()], stdout=out_w))
        os.close(out_w)
        out_w = -1
        out = read_all(out_r).decode()
        assert backend.finish(pid) == 0
        assert b.recv(16) == b"ok\n"
        assert out.startswith("socket:[")
    finally:
        os.close(out_r)
        if out_w != -1:
            os.close(out_w)
        a.close()
        b.close()


# ---------------------------------------------------------------- signals, session, directory, umask


def test_signals_are_default_and_unblocked(backend):
    """Python ignores SIGPIPE; we also ignore SIGHUP, catch SIGUSR1 and block SIGUSR2 while spawning."""
    old_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    old_usr1 = signal.signal(signal.SIGUSR1, lambda *_: None)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])
    try:
        assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN
        parent_ign = int(status_fields(os.getpid())["SigIgn"], 16)
        assert parent_ign & sigmask([signal.SIGPIPE, signal.SIGHUP])
        pid = backend.sleeper()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        signal.signal(signal.SIGUSR1, old_usr1)
        signal.signal(signal.SIGHUP, old_hup)
    fields = status_fields(pid)
    backend.finish(pid)
    ign = int(fields["SigIgn"], 16)
    assert ign & sigmask([signal.SIGPIPE, signal.SIGHUP]) == 0
    if backend.name in ("posix", "auto"):  # "auto" takes the posix_spawn path here
        # glibc's posix_spawn sets its two internal signals (32, 33) to SIG_IGN in the child, and an
        # ignored disposition survives exec: a glibc property, tolerated here.
        ign &= ~sigmask([32, 33])
    # whatever we ignore that is not in RESET_SIGNALS stays ignored (normally nothing)
    assert ign == parent_ign & ~sigmask(S.RESET_SIGNALS)
    assert int(fields["SigBlk"], 16) == 0
    assert int(fields["SigCgt"], 16) == 0


def test_signal_handlers_in_parent_do_not_fire_for_the_child(backend):
    """A signal sent to the child around the spawn must never reach a handler in our process."""
    fired = []
    old = signal.signal(signal.SIGUSR1, lambda *_: fired.append(1))
    try:
        for _ in range(20):
            pid = backend.sleeper()
            os.kill(pid, signal.SIGUSR1)  # default action for the child: terminate
            assert reap(pid) == -signal.SIGUSR1
            backend.pids.remove(pid)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert fired == []


def test_spawning_while_signals_rain_on_us(backend):
    """Python signal handlers run normally in the parent while it keeps spawning; every child is right."""
    fired = []
    stop = threading.Event()
    old = signal.signal(signal.SIGUSR1, lambda *_: fired.append(1))

    def rain():
        while not stop.is_set():
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.0005)

    t = threading.Thread(target=rain)
    t.start()
    try:
        listen_pid = backend.name != "posix"
        for _ in range(30):
            pid, out = shell_output(backend, 'echo "$$ ${LISTEN_PID-none}"', listen_pid=listen_pid)
            assert reap(pid) == 0
            backend.pids.remove(pid)
            assert out == [str(pid), str(pid) if listen_pid else "none"]
    finally:
        stop.set()
        t.join(TIMEOUT)
        signal.signal(signal.SIGUSR1, old)
    assert fired


@pytest.mark.parametrize("new_session", [True, False])
def test_new_session(backend, new_session):
    pid = backend.sleeper(new_session=new_session)
    sid = session_of(pid)
    backend.finish(pid)
    assert sid == (pid if new_session else os.getsid(0))


def test_new_process_group_in_our_session(backend):
    pid = backend.sleeper(new_session=False, new_group=True)
    try:
        pgid, sid = os.getpgid(pid), session_of(pid)
    finally:
        backend.finish(pid)
    assert (pgid, sid) == (pid, os.getsid(0))


def test_cwd_and_umask(backend, tmp_path):
    pid = backend.sleeper(cwd=str(tmp_path), umask=0o027)
    cwd = os.readlink(f"/proc/{pid}/cwd")
    umask = status_fields(pid)["Umask"]
    backend.finish(pid)
    assert cwd == str(tmp_path)
    assert int(umask, 8) == 0o027


def test_umask_is_observed_by_the_daemon(backend, tmp_path):
    pid = backend.spawn(S.SpawnSpec(SH, ["sh", "-c", "touch made"], env(), cwd=str(tmp_path), umask=0o077))
    assert reap(pid) == 0
    backend.pids.remove(pid)
    assert stat.S_IMODE(os.stat(tmp_path / "made").st_mode) == 0o600


def test_spawn_from_another_thread(backend):
    result = {}

    def run():
        try:
            result["pid"] = backend.sleeper(listen_pid=backend.name != "posix")
        except BaseException as exc:  # pragma: no cover - reported below
            result["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(TIMEOUT)
    assert not t.is_alive()
    if isinstance(result.get("error"), pytest.skip.Exception):
        raise result["error"]
    assert "error" not in result, result.get("error")
    pid = result["pid"]
    if backend.name != "posix":
        with open(f"/proc/{pid}/environ", "rb") as f:
            assert f"LISTEN_PID={pid}".encode() in f.read().split(b"\0")
    backend.finish(pid)


# ---------------------------------------------------------------- credentials


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_credentials_change_only_the_child(backend):
    """uid/gid/groups apply to the daemon; no thread of ours changes identity (even with threads running)."""
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait, args=(TIMEOUT,))
    helper.start()
    try:
        pid = backend.sleeper(uid=65534, gid=65533, groups=[65532, 65531], listen_pid=True)
        fields = status_fields(pid)
        backend.finish(pid)
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/status") as f:
                lines = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
            assert lines["Uid"].split() == ["0"] * 4, f"thread {task} changed uid"
            assert lines["Gid"].split() == ["0"] * 4, f"thread {task} changed gid"
    finally:
        stop.set()
        helper.join(TIMEOUT)
    assert fields["Uid"].split() == ["65534"] * 4
    assert fields["Gid"].split() == ["65533"] * 4
    assert sorted(fields["Groups"].split()) == ["65531", "65532"]


def test_credential_failures_name_the_step(backend):
    """Without privileges, setgroups/setgid/setuid fail; the message names the step.

    Runs in a forked copy of this process that has dropped root first (when we are root).
    """
    cases = [("setgroups", dict(groups=[0])), ("setgid", dict(gid=0)), ("setuid", dict(uid=0))]
    if backend.name == "posix":
        pytest.skip("the posix_spawn path does not do credentials")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked copy
        lines = []
        try:
            os.close(r)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            for step, kw in cases:
                try:
                    child = backend._fn(S.SpawnSpec(TRUE, ["true"], env(), **kw))
                except S.SpawnError as exc:
                    lines.append(f"{step}|{exc}")
                else:
                    os.waitpid(child, 0)
                    lines.append(f"{step}|no error")
            try:
                os.waitpid(-1, os.WNOHANG)
                lines.append("leftover|a child was not reaped")
            except ChildProcessError:
                pass
        except BaseException as exc:
            lines.append(f"crash|{exc!r}")
        finally:
            os.write(w, "\n".join(lines).encode())
            os._exit(0)
    os.close(w)
    try:
        out = read_all(r).decode().splitlines()
    finally:
        os.close(r)
    assert reap(pid) == 0
    assert out == [f"{step}|true: {step}: Operation not permitted" for step, _ in cases]


# ---------------------------------------------------------------- errors


def assert_no_children():
    """The failed child has been reaped (the tests leave no other child behind)."""
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


def test_resolve():
    assert S.resolve("sh", os.environ.get("PATH")) == shutil.which("sh")
    with pytest.raises(S.SpawnError, match="command not found"):
        S.resolve("no-such-command-activator-test", os.environ.get("PATH"))
    with pytest.raises(S.SpawnError, match="command not found"):
        S.resolve("/no/such/dir/daemon", None)


def test_resolve_non_executable(tmp_path):
    script = tmp_path / "daemon"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    with pytest.raises(S.SpawnError, match="not executable"):
        S.resolve(str(script), None)
    with pytest.raises(S.SpawnError, match="not executable"):
        S.resolve(str(tmp_path), None)


@pytest.mark.parametrize("listen_pid", [False, True])
def test_missing_executable(backend, listen_pid):
    with pytest.raises(S.SpawnError, match=r"^mydaemon: command not found$"):
        backend.spawn(S.SpawnSpec("/no/such/dir/daemon", ["mydaemon"], env(), listen_pid=listen_pid))
    assert_no_children()


def test_non_executable_file(backend, tmp_path):
    script = tmp_path / "daemon"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    with pytest.raises(S.SpawnError, match=r"^daemon: permission denied$"):
        backend.spawn(S.SpawnSpec(str(script), ["daemon"], env()))
    assert_no_children()


def test_not_an_executable_format(backend, tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00\x01\x02 not a program\n")
    junk.chmod(0o755)
    with pytest.raises(S.SpawnError, match=r"^junk: not an executable format$"):
        backend.spawn(S.SpawnSpec(str(junk), ["junk"], env()))
    assert_no_children()


def test_bad_cwd(backend, tmp_path):
    with pytest.raises(S.SpawnError, match=r"^true: chdir: No such file or directory$"):
        backend.spawn(S.SpawnSpec(TRUE, ["true"], env(), cwd=str(tmp_path / "missing")))
    assert_no_children()


def test_bad_source_descriptor(backend):
    a, b = socket.socketpair()
    bad = a.fileno()
    a.close()
    b.close()
    with pytest.raises(S.SpawnError, match="Bad file descriptor"):
        backend.spawn(S.SpawnSpec(TRUE, ["true"], env(), fds=[bad]))
    assert_no_children()


@contextlib.contextmanager
def crowded_below(limit: int):
    """Occupy every free descriptor number below limit, so the next ones opened are limit, limit+1, ..."""
    held = []
    try:
        while True:
            fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            if fd >= limit:
                os.close(fd)
                break
            held.append(fd)
        yield
    finally:
        for fd in held:
            os.close(fd)


@pytest.mark.parametrize("what", ["missing", "cwd"])
def test_errors_are_reported_with_several_passed_fds(backend, request, tmp_path, what):
    """Two sockets at K, K+1 (so the moves go through K+2, K+3) and the next free numbers K+2, K+3.

    An implementation that opens anything of its own at spawn time (a pipe for error reports)
    gets exactly the numbers the moves use; the error must still be reported.
    """
    socks = [socket.socketpair() for _ in range(2)]
    k = max(open_fds()) + 10
    fds = [k, k + 1]
    try:
        for n, (a, _) in zip(fds, socks):
            os.dup2(a.fileno(), n, inheritable=False)
        if what == "missing":
            spec = S.SpawnSpec("/no/such/daemon", ["daemon"], env(), fds=fds, listen_pid=backend.name != "posix")
            pattern = "command not found"
        else:
            spec = S.SpawnSpec(TRUE, ["daemon"], env(), fds=fds, cwd=str(tmp_path / "missing"))
            pattern = "chdir"
        with crowded_below(k + 2):
            try:
                pid = backend.spawn(spec)
            except S.SpawnError as exc:
                assert pattern in str(exc)
            else:
                code = reap(pid)
                backend.pids.remove(pid)
                pytest.fail(f"no SpawnError; the child exited with {code}")
        assert_no_children()
    finally:
        for n in fds:
            with contextlib.suppress(OSError):
                os.close(n)
        for a, b in socks:
            a.close()
            b.close()


# ---------------------------------------------------------------- the C extension itself


@pytest.mark.skipif(S._fastspawn is None, reason="activator._fastspawn is not built")
class TestFastspawnInterface:
    def call(self, **kw):
        args = dict(path=TRUE.encode(), argv=[b"true"], envp=[b"A=1"], fd_map=[], listen_pid_index=-1,
                    setsid=True, cwd=None, uid=-1, gid=-1, groups=None, umask=-1, reset_signals=[13])
        args.update(kw)
        return S._fastspawn.spawn(*args.values())

    def test_plain_call(self):
        pid = self.call()
        assert reap(pid) == 0

    def test_oserror_carries_errno_and_step(self, tmp_path):
        with pytest.raises(OSError) as info:
            self.call(path=b"/no/such/daemon")
        assert info.value.errno == errno.ENOENT and info.value.filename == "exec"
        with pytest.raises(OSError) as info:
            self.call(cwd=os.fsencode(tmp_path / "missing"))
        assert info.value.errno == errno.ENOENT and info.value.filename == "chdir"
        with pytest.raises(OSError) as info:
            self.call(fd_map=[(999, 3)])
        assert info.value.errno == errno.EBADF and info.value.filename == "descriptors"
        assert_no_children()

    @pytest.mark.parametrize("bad", [
        dict(path=b"/bin/tr\0ue"),
        dict(argv=["true"]),
        dict(argv=[b"tr\0ue"]),
        dict(envp=[b"A=1"], listen_pid_index=1),
        dict(envp=[b"A=1"], listen_pid_index=0),
        dict(fd_map=[(3,)]),
        dict(fd_map=[(-1, 3)]),
        dict(cwd="/"),
        dict(uid=2 ** 32),
        dict(groups=[-5]),
        dict(reset_signals=[0]),
        dict(reset_signals=[10 ** 6]),
    ])
    def test_bad_arguments_start_nothing(self, bad):
        with pytest.raises((TypeError, ValueError, IndexError, OverflowError)):
            self.call(**bad)
        assert_no_children()


# ---------------------------------------------------------------- start(): no wait for the exec


def started(spec: S.SpawnSpec) -> int:
    """start(), then wait until the child has exec'd or failed: a stand-in for spawn() in the tests above.

    An exec failure is raised as spawn() raises it: the child (exit status 127) is reaped and
    reaped() says why.
    """
    pid = S.start(spec)
    ours = os.readlink("/proc/self/exe")
    deadline = time.monotonic() + TIMEOUT
    while True:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None:  # over already: a failed start, or a short program
            if info.si_code == os.CLD_EXITED and info.si_status == 127:
                os.waitpid(pid, 0)
                failure = S.reaped(pid, spec.argv[0])
                if failure is None:
                    pytest.fail(f"{spec.argv[0]} exited with 127 but reaped() reports no failure")
                raise failure
            return pid
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/exe") != ours:
                return pid
        if time.monotonic() > deadline:
            pytest.fail(f"child {pid} neither exec'd nor exited")
        time.sleep(0.001)


def require_fastspawn():
    if S._fastspawn is None:
        if os.environ.get("CI"):
            pytest.fail("activator._fastspawn is not built")
        pytest.skip("activator._fastspawn is not built")


class TestAgainWithStartAndClone:
    """Every back-end test above again: through start(), and through the C library's clone, the
    path taken where clone3 (CLONE_CLEAR_SIGHAND) is refused (Linux < 5.5, Docker's seccomp profile)."""

    @pytest.fixture(params=["start", "fast-clone", "start-clone"])
    def backend(self, request):
        require_fastspawn()
        name = request.param
        previous = S._fastspawn._set_clone3(not name.endswith("-clone"))
        b = Backend(name, S.spawn if name == "fast-clone" else started)
        yield b
        b.cleanup()
        S._fastspawn._set_clone3(previous)


for _name, _test in list(globals().items()):
    if _name.startswith("test_") and "backend" in inspect.signature(_test).parameters:
        setattr(TestAgainWithStartAndClone, _name, staticmethod(_test))
del _name, _test


def wait_exit(pid: int) -> int:
    """Reap pid and tell activator.spawn so; the exit code."""
    code = reap(pid)
    S.reaped(pid, "unused")
    return code


@pytest.fixture(params=["clone3", "clone"])
def fast(request):
    """The C start() path, with clone3 and with the C library's clone."""
    require_fastspawn()
    previous = S._fastspawn._set_clone3(request.param == "clone3")
    yield request.param
    S._fastspawn._set_clone3(previous)
    assert S._fastspawn.pending() == (0, 0), "a test left a record or an unclaimed failure"


@pytest.fixture
def fast_default():
    """The C start() path as it is (what keeps records is the same for both clone calls)."""
    require_fastspawn()
    yield
    assert S._fastspawn.pending() == (0, 0), "a test left a record or an unclaimed failure"


@pytest.mark.parametrize("case", ["missing", "not-executable", "cwd", "descriptor"])
def test_start_reports_exec_failures_once_reaped(fast, tmp_path, case):
    script = tmp_path / "daemon"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    a, b = socket.socketpair()
    bad = a.fileno()
    a.close()
    b.close()
    spec, message = {
        "missing": (S.SpawnSpec("/no/such/dir/daemon", ["mydaemon"], env(), listen_pid=True),
                    "mydaemon: command not found"),
        "not-executable": (S.SpawnSpec(str(script), ["daemon"], env()), "daemon: permission denied"),
        "cwd": (S.SpawnSpec(TRUE, ["true"], env(), cwd=str(tmp_path / "missing")),
                "true: chdir: No such file or directory"),
        "descriptor": (S.SpawnSpec(TRUE, ["true"], env(), fds=[bad]), "true: descriptors: Bad file descriptor"),
    }[case]
    if not S._fastspawn.ASYNC:  # start() waits for the exec on this machine: it raises as spawn() does
        with pytest.raises(S.SpawnError, match=f"^{message}$"):
            S.start(spec)
        return
    pid = S.start(spec)  # returns: the failure is only known once the child has tried
    assert reap(pid) == 127
    failure = S.reaped(pid, spec.argv[0])
    assert isinstance(failure, S.SpawnError) and str(failure) == message
    assert S.reaped(pid, spec.argv[0]) is None  # claimed once
    assert_no_children()


@pytest.mark.skipif(S._fastspawn is not None and not S._fastspawn.ASYNC, reason="start() waits for the exec here")
def test_start_returns_while_the_child_execs(fast):
    """With a 256 KiB environment the kernel takes a while to copy it in the exec: start() is back before."""
    big = env(**{f"BIG{i}": "x" * 4096 for i in range(64)})
    held = 0
    for _ in range(10):
        pid = S.start(S.SpawnSpec(TRUE, ["true"], big))
        held += S._fastspawn.pending()[0]  # the child has not let go of its copy of the arguments yet
        assert wait_exit(pid) == 0
    assert held > 0


def test_start_connection_closed_at_once(fast):
    """The engine closes its copy of the connection right after start(): the daemon has its own, at fd 3."""
    a, b = socket.socketpair()
    try:
        want = identity(a.fileno())
        pid = S.start(S.SpawnSpec(SLEEP, ["sleep", "60"], env(), fds=[a.fileno()], listen_pid=True))
        a.close()
        wait_sleeping(pid, SLEEP)
        fds = open_fds(pid)
        fd3 = identity(f"/proc/{pid}/fd/3")
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read().split(b"\0")
        fields = status_fields(pid)
        os.kill(pid, signal.SIGKILL)
        assert wait_exit(pid) == -signal.SIGKILL
        assert fds == {3} | inherited_fds() and {0, 1, 2} <= fds
        assert fd3 == want
        assert f"LISTEN_PID={pid}".encode() in environ
        assert int(fields["SigBlk"], 16) == 0 and int(fields["SigCgt"], 16) == 0
    finally:
        a.close()
        b.close()


def test_start_inetd_style_echo(fast):
    a, b = socket.socketpair()
    try:
        cat = S.resolve("cat", os.environ.get("PATH"))
        pid = S.start(S.SpawnSpec(cat, ["cat"], env(), stdin=a.fileno(), stdout=a.fileno(), new_session=False,
                                  new_group=True))
        a.close()
        b.sendall(b"ping\n")
        b.shutdown(socket.SHUT_WR)
        assert read_all(b.fileno()) == b"ping\n"
        assert wait_exit(pid) == 0
    finally:
        a.close()
        b.close()


def test_reaped_for_a_running_or_foreign_pid(fast):
    """reaped() for a pid that is not (or not yet) reaped frees nothing the child still uses."""
    pid = S.start(S.SpawnSpec(SLEEP, ["sleep", "60"], env(), listen_pid=True))
    try:
        assert S.reaped(pid, "sleep") is None  # wrong, but harmless
        assert S.reaped(os.getpid(), "me") is None
        wait_sleeping(pid, SLEEP)
        with open(f"/proc/{pid}/environ", "rb") as f:
            assert f"LISTEN_PID={pid}".encode() in f.read().split(b"\0")
    finally:
        os.kill(pid, signal.SIGKILL)
        wait_exit(pid)


@pytest.mark.skipif(S._fastspawn is not None and not S._fastspawn.ASYNC, reason="start() raises failures here")
def test_unclaimed_failures_are_bounded(fast_default):
    """A caller that never asks reaped() keeps at most 1024 failures: the oldest go first."""
    pids = []
    for _ in range(1100):
        pid = S.start(S.SpawnSpec("/no/such/daemon", ["daemon"], env()))
        assert reap(pid) == 127
        pids.append(pid)
    assert S._fastspawn.pending() == (0, 1024)
    claimed = [S.reaped(pid, "daemon") is not None for pid in pids]
    assert claimed == [False] * 76 + [True] * 1024


def test_start_in_a_forked_copy(fast):
    """After os.fork() the copy starts and reaps its own children; the parent's records are not its business."""
    keep = S.start(S.SpawnSpec(SLEEP, ["sleep", "60"], env()))
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked copy
        try:
            os.close(r)
            pid = S.start(S.SpawnSpec(SH, ["sh", "-c", "exit 7"], env()))
            _, status = os.waitpid(pid, 0)
            S.reaped(pid, "sh")
            os.write(w, f"{os.waitstatus_to_exitcode(status)} {S._fastspawn.pending()}".encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        out = read_all(r).decode()
    finally:
        os.close(r)
    assert reap(child) == 0
    os.kill(keep, signal.SIGKILL)
    wait_exit(keep)
    assert out == "7 (0, 0)"


def rss_kib() -> int:
    return int(status_fields(os.getpid())["VmRSS"].split()[0])


def test_memory_flat_over_20000_starts(fast_default):
    """Records and stacks are freed once the children have exec'd (or failed and been claimed)."""
    n = int(os.environ.get("ACTIVATOR_SPAWN_STARTS", "20000"))
    base = S.encode_environment(env())

    def burst(count: int) -> None:
        alive: list[int] = []
        for i in range(count):
            if i % 10 == 9:
                spec = S.SpawnSpec("/no/such/daemon", ["daemon"], base)
            else:
                spec = S.SpawnSpec(TRUE, ["true"], base + [b"REMOTE_PORT=%d" % i], listen_pid=True)
            try:
                alive.append(S.start(spec))
            except S.SpawnError:  # where start() waits for the exec (not ASYNC)
                assert not S._fastspawn.ASYNC
            if len(alive) >= 16:  # about what a busy accept loop has in flight
                for pid in alive:
                    code = reap(pid)
                    failure = S.reaped(pid, spec.argv[0])
                    assert (code, failure is None) in ((0, True), (127, False))
                alive.clear()
        for pid in alive:
            reap(pid)
            S.reaped(pid, "daemon")

    burst(500)  # warm-up: the stack pool, the allocator's arenas
    with open("/proc/self/maps") as f:
        maps0 = len(f.readlines())
    rss0 = rss_kib()
    burst(n)
    rss1 = rss_kib()
    with open("/proc/self/maps") as f:
        maps1 = len(f.readlines())
    assert S._fastspawn.pending() == (0, 0)
    assert_no_children()
    assert rss1 - rss0 < 1024, f"RSS grew from {rss0} to {rss1} KiB over {n} starts"
    assert maps1 - maps0 < 8, f"mappings grew from {maps0} to {maps1}"


@pytest.mark.skipif(S._fastspawn is None, reason="activator._fastspawn is not built")
class TestFastspawnStartInterface(TestFastspawnInterface):
    """The same argument checks for _fastspawn.start(); errors of the child come from reaped()."""

    @pytest.fixture(autouse=True)
    def through_start(self, monkeypatch):
        monkeypatch.setattr(S._fastspawn, "spawn", S._fastspawn.start)  # what call() above calls

    def test_plain_call(self):
        pid = self.call()
        assert reap(pid) == 0
        assert S._fastspawn.reaped(pid) is None

    def test_oserror_carries_errno_and_step(self, tmp_path):
        if not S._fastspawn.ASYNC:
            pytest.skip("start() waits for the exec here: errors are raised as by spawn()")
        for kw, want in [(dict(path=b"/no/such/daemon"), (errno.ENOENT, "exec")),
                         (dict(cwd=os.fsencode(tmp_path / "missing")), (errno.ENOENT, "chdir")),
                         (dict(fd_map=[(999, 3)]), (errno.EBADF, "descriptors"))]:
            pid = self.call(**kw)
            assert reap(pid) == 127
            assert S._fastspawn.reaped(pid) == want
        assert_no_children()


def test_resolve_searches_path_like_shutil_which(tmp_path, monkeypatch):
    """Skips a non-executable file and a directory of that name; empty entries mean the current directory."""
    first, second = tmp_path / "first", tmp_path / "second"
    for d in (first, second):
        d.mkdir()
    (first / "daemon").write_text("#!/bin/sh\n")
    (first / "daemon").chmod(0o644)
    (first / "tool").mkdir()
    for name in ("daemon", "tool"):
        (second / name).write_text("#!/bin/sh\n")
        (second / name).chmod(0o755)
    monkeypatch.chdir(second)
    for path in (f"{first}:{second}", f"{first}::{second}", f"{first}:"):
        for name in ("daemon", "tool"):
            assert S.resolve(name, path) == shutil.which(name, path=path)
    with pytest.raises(S.SpawnError, match=r"^daemon: command not found$"):
        S.resolve("daemon", str(first))
