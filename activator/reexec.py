"""Re-executing activator in place (`activator ctl reexec`, or SIGRTMIN+25): the state hand-off.

The running activator writes its whole state as one JSON document (:data:`FORMAT`, :data:`VERSION`,
docs/reexec.md) to a memfd, marks every descriptor the state names inheritable, runs the target with
``--resume-check FD`` (the new code reads the state and the configuration and says whether it can take
over: it exits 0, or 1 with one line saying why), and only then execs ``TARGET`` with our own arguments
and ``$ACTIVATOR_RESUME_FD``: ps shows the same command line. The pid stays the same, so the daemons stay
our children. The new process rebuilds the engine around the same descriptors and pids
(:meth:`activator.supervisor.Engine.resume`) and goes on.

The target is ``sys.executable -m activator``: the same interpreter, and whatever version of the package is
installed now (``pip install -U`` then `ctl reexec` is an upgrade). ``ACTIVATOR_REEXEC_ARGV`` (tests only)
replaces it with a command line; ``ACTIVATOR_REEXEC_EXECUTABLE`` (tests only) replaces the program of the
final exec alone, after the check (an exec that fails after a good check).

Per-unit state is carried generically: every field of ``UnitState`` holding plain values (None, bool, int,
float, str), lists, tuples and sets of them, dicts of them (as pairs, so that int keys stay ints) and
dataclasses of them (``UnitStats``, ``RateLimit``) goes as it is, under its own name; a new field of such a
type needs nothing here. What is not carried is :data:`NOT_CARRIED`, each with why. A field that is neither
makes the export fail, so a reexec is refused rather than losing it.
"""
from __future__ import annotations

import os
from . import signalapi as signal
import sys
import time

from . import records
from .records import dataclass, field

TYPE_CHECKING = False  # typing is not imported at run time (start-up, memory); type checkers see it
if TYPE_CHECKING:
    from typing import Any

FORMAT = "activator-state"
VERSION = 1
STATE_MAX = 256 << 20  # bytes of state a resume reads at most
CHECK_TIMEOUT = 60.0  # seconds the target's --resume-check may take (we serve meanwhile)
# What systemd's manager takes as "re-execute yourself" (systemd(1)); SIGTERM, which systemd as PID 1 also
# reads so, is a stop for activator (a container stop), and SIGUSR1/SIGUSR2/SIGWINCH go to the daemons.
REEXEC_SIGNAL = signal.SIGRTMIN + 25
ENV_RESUME = "ACTIVATOR_RESUME_FD"  # the memfd, for the new process (its command line stays the user's)
ENV_ARGV = "ACTIVATOR_REEXEC_ARGV"
CHECK_OK = "resume-check: ok"  # the last line of a check that says yes
ENV_EXECUTABLE = "ACTIVATOR_REEXEC_EXECUTABLE"

# UnitState fields that are not carried, and why (the rest are, generically).
NOT_CARRIED = {
    "unit": "rebuilt from the configuration, which must be the one running (checked before the exec)",
    "sockets": "carried by descriptor, under 'sockets' (with their trigger limits and socket files)",
    "access": "rebuilt from the configuration (ip-address-allow/deny)",
    "credentials": "rebuilt from the configuration (user and group looked up again)",
    "base_env": "rebuilt from the configuration and our environment, which the exec keeps",
    "base_envp": "a cache of base_env, rebuilt at the next connection",
    "pause_timer": "re-armed from paused_until (monotonic time, which an exec keeps)",
    "restart_timer": "re-armed at its due time, carried under 'timers'",
    "kill_timer": "re-armed at its due time, carried under 'timers'",
    "waiting_for": "a retired generation still running: refused (busy) before the exec",
    "argv": "rebuilt from the configuration",
    "rlimits": "rebuilt from the configuration",
    "directories": "rebuilt from the configuration",
    "jobs": "control commands under way: refused (busy) before the exec",
    "live_jobs": "control commands under way: refused (busy) before the exec",
    "start_job": "a start under way: refused (busy) before the exec",
    "reload_job": "an exec-reload under way: refused (busy) before the exec",
    "waiters": "starts ordered after a unit: only while a start job runs, refused (busy)",
    "ordered_after": "rebuilt from the configuration",
    "leader": "rebuilt: workers 1..N-1 are carried under their unit's 'workers', in order",
    "workers": "carried under the unit's 'workers' (each worker's own fields and timers; they share its sockets)",
    "successor": "a graceful restart under way: refused (busy) before the exec",
    "replaces": "a graceful restart under way: refused (busy) before the exec",
    "ready_timer": "a graceful restart under way: refused (busy) before the exec",
}

_PLAIN = (type(None), bool, int, float, str)


class StateError(Exception):
    """The state cannot be written or read; the message is one line for the user."""


# ------------------------------------------------------------ generic values
def encode(value: Any, where: str) -> Any:
    """``value`` as JSON; StateError naming ``where`` for what has no faithful form."""
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return {"float": "inf" if value > 0 else "-inf"}
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [encode(v, where) for v in items]
    if isinstance(value, dict):
        return {"pairs": [[encode(k, where), encode(v, where)] for k, v in value.items()]}
    if records.is_record(value):
        return {"fields": {f.name: encode(getattr(value, f.name), f"{where}.{f.name}")
                           for f in records.fields(value)}}
    raise StateError(f"{where}: a {type(value).__name__} cannot be carried over a re-exec")


def decode_into(current: Any, data: Any, where: str) -> Any:
    """``data`` (from :func:`encode`) as a value of the kind ``current`` is; a dataclass is updated in place."""
    if isinstance(data, dict) and "float" in data:
        return float(data["float"])
    if records.is_record(current):
        if not isinstance(data, dict) or not isinstance(data.get("fields"), dict):
            raise StateError(f"{where}: expected the fields of a {type(current).__name__}")
        known = {f.name for f in records.fields(current)}
        for name, item in data["fields"].items():
            if name not in known:
                raise StateError(f"{where}.{name}: unknown to this version of activator")
            setattr(current, name, decode_into(getattr(current, name), item, f"{where}.{name}"))
        return current
    if isinstance(current, dict):
        if not isinstance(data, dict) or not isinstance(data.get("pairs"), list):
            raise StateError(f"{where}: expected pairs")
        return {_tuples(k): _tuples(v) for k, v in data["pairs"]}
    if isinstance(current, (set, frozenset)):
        return type(current)(_tuples(v) for v in _list(data, where))
    if isinstance(current, tuple):
        return tuple(_tuples(v) for v in _list(data, where))
    if isinstance(current, list):
        return [_tuples(v) for v in _list(data, where)]
    if isinstance(current, float) and isinstance(data, int) and not isinstance(data, bool):
        return float(data)
    if current is not None and data is not None and type(data) is not type(current):
        raise StateError(f"{where}: expected a {type(current).__name__}, not a {type(data).__name__}")
    if isinstance(data, (dict, list)):
        raise StateError(f"{where}: expected a plain value")
    return data


def _list(data: Any, where: str) -> list:
    if not isinstance(data, list):
        raise StateError(f"{where}: expected a list")
    return data


def _tuples(value: Any) -> Any:
    """Lists inside a carried list or dict come back as tuples (hashable, as they were: (uid, gid, ...))."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def carry_socket(bound: Any) -> dict[str, Any]:
    """A BoundSocket as the state holds it (activator.sockets.adopt takes it back)."""
    return {"fd": bound.fileno(), "file": encode(bound.file, "file") if bound.file is not None else None,
            "created_dirs": encode(bound.created_dirs, "created_dirs"), "trusted": sorted(bound.trusted)}


def encode_fields(obj: Any, where: str, skip: dict[str, str]) -> dict[str, Any]:
    """Every dataclass field of ``obj`` but those in ``skip``, encoded."""
    return {f.name: encode(getattr(obj, f.name), f"{where}.{f.name}") for f in records.fields(obj)
            if f.name not in skip}


def decode_fields(obj: Any, data: Any, where: str, skip: dict[str, str]) -> None:
    """The carried fields back into ``obj``; StateError for a field this version does not know."""
    if not isinstance(data, dict):
        raise StateError(f"{where}: expected an object")
    known = {f.name for f in records.fields(obj)}
    for name, item in data.items():
        if name not in known or name in skip:
            raise StateError(f"{where}.{name}: unknown to this version of activator")
        setattr(obj, name, decode_into(getattr(obj, name), item, f"{where}.{name}"))


# ------------------------------------------------------------- reading
def parse(raw: bytes) -> dict[str, Any]:
    """The state document, its format and version checked; StateError saying what is wrong."""
    try:
        import json

        state = json.loads(raw)
    except (ValueError, RecursionError):
        raise StateError("the state is not valid JSON (corrupted)") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise StateError(f"the state is not an {FORMAT} document")
    version = state.get("version")
    if version != VERSION:
        raise StateError(f"state format version {version!r} is not supported (this activator reads {VERSION})")
    for key, kind in (("argv", list), ("units", list), ("stats", dict), ("inherited", list), ("notify", dict)):
        if not isinstance(state.get(key), kind):
            raise StateError(f"the state has no valid {key!r}")
    return state


def read_fd(fd: int) -> dict[str, Any]:
    """The state from descriptor ``fd`` (read from its start); StateError."""
    chunks = []
    total = 0
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        while total <= STATE_MAX:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise StateError(f"cannot read the state from fd {fd}: {exc.strerror or exc}") from None
    if total > STATE_MAX:
        raise StateError(f"the state is larger than {STATE_MAX} bytes")
    return parse(b"".join(chunks))


# What a resuming process found (set by resume_main, read by the command line and the engine).
RESUMED: dict[str, Any] | None = None
CHECK_ONLY = False


def resume_main(args: list[str]) -> None:
    """``--resume FD`` ($ACTIVATOR_RESUME_FD) / ``--resume-check FD``: read the state and take the command line
    it carries (activator.__main__ goes on with it; the engine resumes instead of binding). A state this
    version cannot read: one line, exit 1."""
    global RESUMED, CHECK_ONLY
    if args[0] == "--resume-check":
        os.dup2(1, 2)  # every answer, a refusal from the command line too, on the pipe the old process reads
    if len(args) != 2 or not args[1].isascii() or not args[1].isdigit():
        sys.stderr.write(f"activator: error: usage: activator {args[0]} FD\n")
        sys.exit(2)
    fd = int(args[1])
    try:
        state = read_fd(fd)
    except StateError as exc:
        sys.stderr.write(f"activator: error: cannot resume: {exc}\n")
        sys.exit(1)
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    RESUMED, CHECK_ONLY = state, args[0] == "--resume-check"
    sys.argv = [sys.argv[0], *[str(a) for a in state["argv"]]]  # activator.__main__ goes on with them


def check_units(state: dict[str, Any], units: list) -> str | None:
    """Why the loaded ``units`` are not the ones the state carries (names and sockets), or None."""
    carried = {str(u.get("name")): u for u in state["units"] if isinstance(u, dict)}
    names = [u.name for u in units]
    if sorted(carried) != sorted(names):
        return f"the configuration has units {', '.join(names) or 'none'}, the running activator " \
               f"{', '.join(str(n) for n in carried) or 'none'}"
    for unit in units:
        socks = carried[unit.name].get("sockets")
        if not isinstance(socks, list):
            return f"{unit.name}: no sockets in the state"
        labels = [s.get("label") for s in socks if isinstance(s, dict)]
        if socks and labels != [s.label for s in unit.sockets]:
            return f"{unit.name}: its sockets differ ({', '.join(map(str, labels))} running)"
    return None


# ------------------------------------------------------------- writing
def target_argv() -> list[str]:
    """The command that takes over: ``sys.executable -m activator``, or $ACTIVATOR_REEXEC_ARGV (tests)."""
    custom = os.environ.get(ENV_ARGV)
    if custom:
        import shlex

        return shlex.split(custom)
    return [sys.executable, "-m", "activator"]


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("activator-state", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(eq=False)
class _Check:
    """The target's --resume-check, running while we go on serving: its answer comes on a pipe."""

    pid: int
    pipe: int
    memfd: int
    argv: list[str]
    layout: list[tuple[str, list[str]]]
    output: bytearray = field(default_factory=bytearray)
    timer: Any = None


class Reexec:
    """The old process's side: what to carry besides the engine (the control socket), the check, the exec."""

    def __init__(self, engine: Any, servers: list[Any], inherited: list[tuple[int, str]]) -> None:
        self.engine = engine
        self.servers = servers
        self.inherited = inherited  # what our parent passed us (listen-inherited): kept open, named again
        self.count = int(RESUMED.get("reexecs", 0)) if RESUMED else 0
        self.failures = 0
        self.last_error: str | None = None
        self._check: _Check | None = None

    def status(self) -> dict[str, Any]:
        return {"reexecs": self.count, "reexec_failures": self.failures, "reexec_error": self.last_error}

    def busy(self) -> str | None:
        """What cannot be carried now (the reexec is refused), or None."""
        found = self.engine.reexec_busy()
        if found:
            return found
        for server in self.servers:
            if not hasattr(server, "reexec_state"):
                return f"the {getattr(server, 'label', 'metrics endpoint')} is not carried over a re-exec yet"
        return None

    def _layout(self) -> list[tuple[str, list[str]]]:
        return [(us.name, [ss.bound.spec.label for ss in us.sockets]) for us in self.engine.units.values()]

    def _state(self) -> tuple[bytes, list[int]]:
        """The state document as it is now, and the descriptors it names; StateError."""
        engine_state, fds = self.engine.export_state()
        fds += [fd for fd, _ in self.inherited if fd not in fds and _is_open(fd)]  # for a later listen-inherited
        servers: dict[str, Any] = {}
        for server in self.servers:
            entry, more = server.reexec_state()
            servers[server.kind] = entry
            fds += more
        from . import __version__

        state = {"format": FORMAT, "version": VERSION, "activator_version": __version__, "pid": os.getpid(),
                 "saved_monotonic": time.monotonic(), "saved_wall": time.time(), "argv": sys.argv[1:],
                 "reexecs": self.count + 1, "servers": servers,
                 "inherited": [list(pair) for pair in self.inherited], **engine_state}
        import json  # here, not at start-up: a re-exec is rare

        return json.dumps(state, separators=(",", ":")).encode(), fds

    def request(self) -> dict[str, Any]:
        """Start the target's check; the exec follows when it says yes (the loop serves meanwhile). StateError
        when refused at once (busy, the configuration changed, the target cannot be started)."""
        from .spawn import SpawnError, SpawnSpec, resolve

        if self._check is not None:
            raise StateError("busy: a re-exec is under way")
        why = self.busy()
        if why:
            raise StateError(f"busy: {why}")
        changed = self.engine.configuration_changed()
        if changed:
            raise StateError(changed)
        data, _ = self._state()
        memfd = _memfd(data)
        argv = target_argv()
        read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            program = resolve(argv[0], os.environ.get("PATH", os.defpath))
            # fd 3 of the check is the memfd; its answer (and any error) comes on its stdout, our pipe.
            pid = self.engine.host.spawn(SpawnSpec(executable=program, argv=[*argv, "--resume-check", "3"],
                                                   env=dict(os.environ), fds=[memfd], stdout=write_end,
                                                   new_session=False, new_group=True))
        except SpawnError as exc:
            os.close(read_end)
            os.close(memfd)
            raise StateError(f"the new activator cannot take over: {exc}") from None
        finally:
            os.close(write_end)
        check = self._check = _Check(pid, read_end, memfd, argv, self._layout())
        self.engine.loop.add_reader(read_end, self._on_check_output)
        check.timer = self.engine.loop.call_later(CHECK_TIMEOUT, self._check_timeout)
        return {"pid": os.getpid(), "command": argv, "reexecs": self.count, "failures": self.failures}

    def signalled(self) -> None:
        """REEXEC_SIGNAL: the same, a refusal logged."""
        try:
            self.request()
        except StateError as exc:
            self.failed(str(exc))

    def failed(self, why: str) -> None:
        self.failures += 1
        self.last_error = why
        # Collapsed by reason: a storm of REEXEC_SIGNALs while one is under way is a few lines, not one each.
        self.engine.log.error("reexec-failed", f"re-exec refused, going on: {why}", collapse_key=why,
                              collapse_what="re-execs refused")

    def _end_check(self) -> _Check:
        check = self._check
        assert check is not None
        self._check = None
        self.engine.loop.remove(check.pipe)
        os.close(check.pipe)
        if check.timer is not None:
            check.timer.cancel()
        return check

    def _check_timeout(self) -> None:
        check = self._end_check()
        os.close(check.memfd)
        self.engine.host.kill(check.pid, signal.SIGKILL)  # reaped by the engine as an orphan
        self.failed(f"the new activator did not answer its check within {CHECK_TIMEOUT:g}s")

    def _on_check_output(self) -> None:
        check = self._check
        if check is None:
            return
        try:
            data = os.read(check.pipe, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            if len(check.output) < 65536:
                check.output += data
            return
        check = self._end_check()
        lines = [line for line in check.output.decode(errors="replace").splitlines() if line.strip()]
        if lines[-1:] != [CHECK_OK]:
            os.close(check.memfd)
            why = lines[-1].removeprefix("activator: error: ") if lines else "its check ended without an answer"
            self.failed(f"the new activator cannot take over: {why}")
            return
        # Yes: the state again, as it is now (counters, pids and timers moved on during the check).
        busy = self.busy() or (None if self._layout() == check.layout else "a reload came during the check")
        if busy:
            os.close(check.memfd)
            self.failed(f"busy: {busy}")
            return
        changed = self.engine.configuration_changed()  # edited during the check: the new one would load it
        if changed:
            os.close(check.memfd)
            self.failed(changed)
            return
        try:
            data, fds = self._state()
            os.ftruncate(check.memfd, 0)
            os.pwrite(check.memfd, data, 0)
        except (StateError, OSError) as exc:
            os.close(check.memfd)
            self.failed(str(exc))
            return
        self.execute(check.memfd, fds, check.argv)

    def execute(self, fd: int, fds: list[int], argv: list[str]) -> None:
        """Exec ``argv`` with our arguments, the state at $ACTIVATOR_RESUME_FD; on failure everything is put
        back and we go on."""
        engine = self.engine
        log = engine.log
        log.info("reexec", f"re-executing {' '.join(argv)} with {len(engine.pids)} process(es) and "
                           f"{len(fds)} descriptor(s)")
        log.flush_final()
        everything = [fd, *fds]
        # Blocked across the exec: a signal then waits for the new process (pending signals and the mask are
        # kept by execve) instead of killing us with its default action while no handler is installed.
        program = os.environ.get(ENV_EXECUTABLE) or argv[0]
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP})
        try:
            for each in everything:
                os.set_inheritable(each, True)
            os.execve(program, [*argv, *sys.argv[1:]], {**os.environ, ENV_RESUME: str(fd)})
        except OSError as exc:
            for each in everything:
                try:
                    os.set_inheritable(each, False)
                except OSError:
                    pass
            os.close(fd)
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            self.failed(f"exec {program}: {exc.strerror or exc}")


def unblock_signals() -> None:
    """The new process: signals blocked across the exec are delivered from here on (handlers installed)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
