"""The engine: hold the sockets, start daemons on demand, supervise, reap, stop.

One thread, one epoll loop. Signals are turned into bytes on a pipe
(``signal.set_wakeup_fd``) and handled in one place, between events, like
gunicorn's arbiter. The loop sleeps in the kernel until a socket, a signal or
the next timer (restart delay, stop timeout, end of a rate-limit pause) is due;
with nothing to do there is no timer and it never wakes.

Both ``activator run`` (one unit built from the command line) and
``activator serve`` (units from TOML) drive this same :class:`Engine`.
"""
from __future__ import annotations

import errno
import heapq
import itertools
import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

from . import processes
from .access import AccessList
from .addresses import format_peer
from .log import Log
from .protocol import listen_environment
from .ratelimit import RateLimit
from .sockets import BindError, BoundSocket, open_all
from .spawn import SpawnError, SpawnSpec, encode_environment, resolve, spawn
from .units import Unit

ACCEPT_BATCH = 32  # connections accepted per wake-up, so that one busy socket cannot starve the rest
EMFILE_PAUSE = 1.0  # how long to stop accepting when out of descriptors (or until an instance exits)
FINAL_GRACE = 5.0  # after SIGKILL, how long to wait for the dead to be reaped before giving up
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
DEFAULT_FORWARD = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)
PER_CONNECTION_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "REMOTE_ADDR", "REMOTE_PORT")
STRIP_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC")


class Timers:
    """A heap of one-shot callbacks; cancelled entries are skipped when they come up."""

    def __init__(self) -> None:
        self._heap: list = []
        self._seq = itertools.count()

    def add(self, when: float, callback: Callable[[], None]) -> list:
        entry = [when, next(self._seq), callback]
        heapq.heappush(self._heap, entry)
        return entry

    @staticmethod
    def cancel(entry: list | None) -> None:
        if entry is not None:
            entry[2] = None

    def timeout(self, now: float) -> float | None:
        while self._heap and self._heap[0][2] is None:
            heapq.heappop(self._heap)
        if not self._heap:
            return None
        return max(0.0, self._heap[0][0] - now)

    def run_due(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            _, _, callback = heapq.heappop(self._heap)
            if callback is not None:
                callback()


@dataclass(eq=False)
class SocketState:
    bound: BoundSocket
    trigger: RateLimit
    armed: bool = False
    family: int = 0  # the socket's, kept at hand for every accepted connection


@dataclass(eq=False)
class UnitState:
    unit: Unit
    sockets: list[SocketState]
    start_limit: RateLimit
    access: AccessList | None = None
    main_pid: int | None = None
    instances: dict[int, str | None] = field(default_factory=dict)  # pid -> peer address
    per_source: dict[str, int] = field(default_factory=dict)
    executable: str | None = None
    credentials: tuple[int, int, list[int] | None] = (-1, -1, None)
    base_env: dict[str, str] = field(default_factory=dict)
    base_envp: list[bytes] | None = None  # base_env encoded at the first connection, for per-connection starts
    paused_until: float = 0.0
    pause_timer: list | None = None
    restart_timer: list | None = None
    kill_timer: list | None = None
    retired: bool = False  # removed or replaced by a reload: never start again
    successor: "UnitState | None" = None  # armed once this one's processes are gone
    waiting_for: "UnitState | None" = None
    forced: str | None = None  # why we ended the daemon ourselves ('stop', 'timeout', 'watchdog')

    @property
    def name(self) -> str:
        return self.unit.name

    def pids(self) -> list[int]:
        return ([self.main_pid] if self.main_pid else []) + list(self.instances)

    def has_processes(self) -> bool:
        """Cheap, unlike pids(): asked after every reaped child, with thousands of instances."""
        return self.main_pid is not None or bool(self.instances)


def credentials(user: str | None, group: str | None, supplementary: list[str]) -> tuple[int, int, list[int] | None]:
    """uid, gid and supplementary groups for User=/Group=; ValueError naming what is unknown."""
    uid = gid = -1
    groups: list[int] | None = None
    name = None
    if user:
        pw = processes.lookup_user(user)
        uid, gid, name = pw.pw_uid, pw.pw_gid, pw.pw_name
    if group:
        gid = processes.lookup_group(group)
    if user or group or supplementary:
        extra = [processes.lookup_group(g) for g in supplementary]
        base = os.getgrouplist(name, gid) if name else ([gid] if gid != -1 else [])
        groups = sorted(set(base + extra))
    return uid, gid, groups


class Engine:
    def __init__(
        self,
        units: list[Unit],
        log: Log | None = None,
        *,
        exit_with_service: bool = False,
        forward_signals: tuple[int, ...] = DEFAULT_FORWARD,
        reloader: Callable[[], list[Unit]] | None = None,
    ) -> None:
        self.log = log or Log()
        self.exit_with_service = exit_with_service
        self.forward_signals = tuple(forward_signals)
        self.reloader = reloader
        self.units: dict[str, UnitState] = {}
        self.pids: dict[int, UnitState] = {}
        self.timers = Timers()
        self.sel = selectors.DefaultSelector()
        self.stopping = False
        self.exit_code = 0
        self.done = False
        self._final_timer: list | None = None
        self._devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self._env = {k: v for k, v in os.environ.items() if k not in STRIP_ENV}
        self._pending = units
        self._signal_r = self._signal_w = -1
        from .sdnotify import NotifyHub

        self.notify = NotifyHub(self)  # sd_notify: readiness, watchdog, fd store (type = "notify" etc.)

    # ----------------------------------------------------------------- setup
    def _make_state(self, unit: Unit, bound: list[BoundSocket]) -> UnitState:
        svc = unit.service
        states = [SocketState(b, RateLimit(unit.trigger_limit_interval, unit.effective_trigger_burst)) for b in bound]
        for s in states:
            s.family = s.bound.sock.family
            if unit.accept:
                s.bound.sock.setblocking(False)
            elif s.bound.spec.inherited_fd is None and not s.bound.sock.getblocking():
                s.bound.sock.setblocking(True)  # kept by a reload from an accept = true unit
        us = UnitState(unit, states, RateLimit(svc.start_limit_interval, svc.start_limit_burst))
        if unit.ip_address_allow or unit.ip_address_deny:
            us.access = AccessList(unit.ip_address_allow, unit.ip_address_deny)
        us.credentials = credentials(svc.user, svc.group, svc.supplementary_groups)
        env = dict(self._env) if svc.inherit_environment else {}
        env.update(svc.environment)
        us.base_env = env
        return us

    def validate(self) -> list[str]:
        """Problems that would stop units from starting, found before binding anything."""
        errors = []
        for unit in self._pending:
            svc = unit.service
            try:
                credentials(svc.user, svc.group, svc.supplementary_groups)
            except ValueError as exc:
                errors.append(f"{unit.name}: {exc}")
        return errors

    def open(self) -> None:
        """Bind every socket of every unit, or none (BindError lists every problem)."""
        if self._signal_r == -1:
            # Before binding: a SIGTERM that comes once we listen must stop us cleanly (removing
            # the socket files), not kill us with the default action.
            self._setup_signals()
        errors = self.validate()
        if errors:
            raise BindError(errors)
        all_specs = [spec for unit in self._pending for spec in unit.sockets]
        bound = open_all(all_specs)
        it = iter(bound)
        with self.log.hold():
            for unit in self._pending:
                mine = [next(it) for _ in unit.sockets]
                self.units[unit.name] = self._make_state(unit, mine)
                for fd, b in enumerate(mine, start=3):
                    if b.spec.address is not None:
                        self.log.info("listen", f"listening on {b.spec.label} as fd {fd}", unit=unit.name)
        self._pending = []

    def _setup_signals(self) -> None:
        self._signal_r, self._signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._signal_w, warn_on_full_buffer=False)
        handled = {signal.SIGCHLD, signal.SIGHUP, *STOP_SIGNALS, *self.forward_signals}
        for sig in handled:
            signal.signal(sig, _noop)
        # Unbuffered bytes, so that a burst of signals can never block the handler.
        self.sel.register(self._signal_r, selectors.EVENT_READ, self._on_signal_pipe)

    # ------------------------------------------------------------- the loop
    def run(self) -> int:
        if self._pending:
            self.open()
        processes.set_child_subreaper()
        if self._signal_r == -1:
            self._setup_signals()
        for us in list(self.units.values()):
            self._activate(us)
        self.log.debug("ready", f"{len(self.units)} unit(s) ready")
        self._notify_ready()
        while not self.done:
            timeout = self.timers.timeout(time.monotonic())
            try:
                events = self.sel.select(timeout)
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
            for key, _ in events:
                key.data()
            self.timers.run_due(time.monotonic())
        self._close_all()
        return self.exit_code

    def _notify_ready(self) -> None:
        if os.environ.get("NOTIFY_SOCKET"):
            try:
                from .sdnotify import notify

                notify("READY=1", f"MAINPID={os.getpid()}")
            except Exception as exc:  # noqa: BLE001 - readiness is best effort
                self.log.debug("notify", f"could not notify our own supervisor: {exc}")

    def _activate(self, us: UnitState) -> None:
        if us.unit.start_now and not us.unit.accept:
            self._start(us)
        else:
            self._arm(us)

    # --------------------------------------------------------------- signals
    def _on_signal_pipe(self) -> None:
        try:
            data = os.read(self._signal_r, 512)
        except BlockingIOError:
            return
        for sig in dict.fromkeys(data):  # each kind once, in arrival order
            self.handle_signal(sig)

    def handle_signal(self, sig: int) -> None:
        if sig == signal.SIGCHLD:
            self._reap()
        elif sig in STOP_SIGNALS:
            name = signal.Signals(sig).name
            if self.stopping:
                self.log.info("stop", f"{name} again: killing what is left")
                self._kill_everything(signal.SIGKILL)
            else:
                self.log.info("stop", f"{name} received, stopping")
                self.stop(0)
        elif sig == signal.SIGHUP and self.reloader is not None:
            self.reload()
        else:
            self._forward(sig)

    def _forward(self, sig: int) -> None:
        for us in self.units.values():
            for pid in us.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        self.log.debug("forward", f"forwarded {signal.Signals(sig).name}")

    # ------------------------------------------------------------ arming
    def _arm(self, us: UnitState) -> None:
        if self.stopping or us.retired or us.waiting_for is not None:
            return
        if us.main_pid is not None or time.monotonic() < us.paused_until:
            return
        for ss in us.sockets:
            if not ss.armed:
                callback = (lambda s=ss: self._on_accept(us, s)) if us.unit.accept else (lambda s=ss: self._on_ready(us, s))
                self.sel.register(ss.bound.sock, selectors.EVENT_READ, callback)
                ss.armed = True

    def _disarm(self, us: UnitState) -> None:
        for ss in us.sockets:
            if ss.armed:
                self.sel.unregister(ss.bound.sock)
                ss.armed = False

    def _pause(self, us: UnitState, until: float) -> None:
        """Stop listening for this unit until ``until``; connections wait in the backlog."""
        self._disarm(us)
        us.paused_until = until
        Timers.cancel(us.pause_timer)
        us.pause_timer = self.timers.add(until, lambda: self._unpause(us))

    def _unpause(self, us: UnitState) -> None:
        us.pause_timer = None
        us.paused_until = 0.0
        self.log.debug("resume", "resuming", unit=us.name)
        self._arm(us)

    def _limit_hit(self, us: UnitState, event: str, what: str, limit: RateLimit) -> None:
        """One log line, then no activation until the limit's interval ends; connections wait in the backlog."""
        left = limit.reset_time() - time.monotonic()
        self.log.warning(event, f"{what} ({limit.describe()}), pausing activation for {left:.1f}s; sockets stay open",
                         unit=us.name)
        self._pause(us, limit.reset_time())

    # ------------------------------------------------------ Accept=no path
    def _on_ready(self, us: UnitState, ss: SocketState) -> None:
        if not ss.armed or us.main_pid is not None:
            return  # a stale event from the same batch
        if not ss.trigger.allow(time.monotonic()):
            self._limit_hit(us, "trigger-limit", f"trigger limit hit on {ss.bound.spec.label}", ss.trigger)
            return
        self.log.debug("trigger", f"incoming traffic on {ss.bound.spec.label}", unit=us.name)
        self._start(us)

    def _service_env(self, us: UnitState, n_fds: int, names: list[str] | None) -> dict[str, str]:
        env = dict(us.base_env)
        env.update(listen_environment(n_fds, names))
        return env

    def _spawn(self, us: UnitState, fds: list[int], env: dict[str, str] | list[bytes], conn: int | None) -> int:
        svc = us.unit.service
        if us.executable is None:
            us.executable = resolve(svc.argv[0], us.base_env.get("PATH", os.defpath))
        stdin = {"null": self._devnull, "inherit": None, "socket": conn}[svc.standard_input]
        out_mode = svc.standard_output or ("socket" if svc.standard_input == "socket" else "journal")
        if out_mode == "inherit":
            stdout = stdin
        else:
            stdout = {"null": self._devnull, "journal": None, "socket": conn}[out_mode]
        uid, gid, groups = us.credentials
        spec = SpawnSpec(
            # A process group of its own (what a stop signals), but not a session of its own: with
            # Linux's scheduler autogroups a new session slowed nbdkit's data path by about 10 %.
            new_session=False, new_group=True,
            executable=us.executable, argv=list(svc.argv), env=env, fds=fds, listen_pid=bool(fds),
            watchdog_pid=isinstance(env, dict) and "WATCHDOG_USEC" in env,
            stdin=stdin, stdout=stdout, cwd=svc.working_directory, uid=uid, gid=gid, groups=groups,
            umask=svc.umask,
        )
        try:
            return spawn(spec)
        except SpawnError:
            us.executable = None  # look it up again next time: it may be installed by then
            raise

    def _start(self, us: UnitState) -> bool:
        if self.stopping or us.retired:
            return False
        now = time.monotonic()
        if not us.start_limit.allow(now):
            self._limit_hit(us, "start-limit", "start limit hit", us.start_limit)
            return False
        names = us.unit.fd_names()
        fds = [s.bound.fileno() for s in us.sockets]
        stored = self.notify.stored_fds(us)  # the descriptor store comes after the sockets, named
        if stored:
            names = (names or ["unknown"] * len(fds)) + [name for name, _ in stored]
            fds += [fd for _, fd in stored]
        env = self._service_env(us, len(fds), names)
        env.update(self.notify.service_env(us))
        try:
            pid = self._spawn(us, fds, env, None)
        except SpawnError as exc:
            self.log.error("start-failed", f"cannot start: {exc}", unit=us.name)
            if self.exit_with_service:
                self.stop(127)  # the daemon could not even start: exit as a shell would (command not run)
                return False
            self._arm(us)
            return False
        us.main_pid = pid
        us.forced = None
        self.pids[pid] = us
        self.notify.started(us, pid)
        self._disarm(us)
        self.log.info("start", f"started {us.unit.service.argv[0]} as pid {pid}", unit=us.name, pid=pid)
        return True

    # ----------------------------------------------------- Accept=yes path
    def _on_accept(self, us: UnitState, ss: SocketState) -> None:
        sock = ss.bound.sock
        for _ in range(ACCEPT_BATCH):
            if not ss.armed:
                return
            if ss.trigger.enabled and not ss.trigger.allow(time.monotonic()):
                self._limit_hit(us, "trigger-limit", f"trigger limit hit on {ss.bound.spec.label}", ss.trigger)
                return
            try:
                fd, peer = sock._accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.log.warning(
                        "accept-failed", f"cannot accept on {ss.bound.spec.label}: {exc.strerror}; "
                        f"pausing accept for {EMFILE_PAUSE:g}s or until a connection ends", unit=us.name,
                    )
                    self._pause(us, time.monotonic() + EMFILE_PAUSE)
                    return
                continue  # ECONNABORTED, EPROTO, ...: that connection is gone, carry on
            try:
                self._connection(us, ss, fd, peer)
            finally:
                os.close(fd)

    def _connection(self, us: UnitState, ss: SocketState, fd: int, peer) -> None:
        unit = us.unit
        family = ss.family
        addr, port = format_peer(family, peer)
        who = f"{addr}:{port}" if addr else "a local peer"
        if us.access is not None and addr is not None and not us.access.allowed(addr):
            self.log.warning("denied", f"connection from {who} denied by ip-address rules", unit=us.name)
            return
        if len(us.instances) >= unit.max_connections or (
            unit.max_connections_per_source and addr is not None
            and us.per_source.get(addr, 0) >= unit.max_connections_per_source
        ):
            # Instances that have exited but whose SIGCHLD is not handled yet (a busy accept batch) do not count.
            self._reap()
        if len(us.instances) >= unit.max_connections:
            self.log.warning(
                "too-many", f"too many connections ({len(us.instances)}), closing connection from {who}", unit=us.name
            )
            return
        if unit.max_connections_per_source and addr is not None and us.per_source.get(addr, 0) >= unit.max_connections_per_source:
            self.log.warning(
                "too-many-per-source",
                f"too many connections from {addr} ({us.per_source[addr]}), closing connection", unit=us.name,
            )
            return
        svc = unit.service
        inetd = svc.standard_input == "socket"
        # This runs for every connection: the environment is extended in its encoded form.
        if us.base_envp is None:
            us.base_envp = encode_environment({k: v for k, v in us.base_env.items() if k not in PER_CONNECTION_ENV})
        env = list(us.base_envp)
        if inetd:
            fds: list[int] = []
        else:
            env += [b"LISTEN_FDS=1", b"LISTEN_FDNAMES=" + (ss.bound.spec.name or "connection").encode()]
            fds = [fd]
        if addr is not None:
            env += [f"REMOTE_ADDR={addr}".encode(), f"REMOTE_PORT={port}".encode()]
        try:
            pid = self._spawn(us, fds, env, fd)
        except SpawnError as exc:
            self.log.error("start-failed", f"cannot start instance: {exc}", unit=us.name)
            return
        us.instances[pid] = addr
        if addr is not None:
            us.per_source[addr] = us.per_source.get(addr, 0) + 1
        self.pids[pid] = us
        if self.log.enabled("debug"):
            self.log.debug("start", f"connection from {who}: started pid {pid}", unit=us.name, pid=pid)

    # --------------------------------------------------------------- reaping
    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            us = self.pids.pop(pid, None)
            if us is None:
                self.log.debug("reap", f"reaped orphan pid {pid}")
                continue
            if pid == us.main_pid:
                self._main_exited(us, pid, status)
            else:
                self._instance_exited(us, pid, status)
            if not us.has_processes():
                self._unit_idle(us)
        if self.stopping:
            self._check_stopped()

    def _instance_exited(self, us: UnitState, pid: int, status: int) -> None:
        addr = us.instances.pop(pid, None)
        if addr is not None:
            left = us.per_source.get(addr, 1) - 1
            if left > 0:
                us.per_source[addr] = left
            else:
                us.per_source.pop(addr, None)
        if self.log.enabled("debug"):
            how, _ = processes.describe_status(status)
            self.log.debug("exit", f"pid {pid} {how}", unit=us.name, pid=pid)

    def _main_exited(self, us: UnitState, pid: int, status: int) -> None:
        how, code = processes.describe_status(status)
        us.main_pid = None
        self.notify.exited(us)
        self.log.info("exit", f"pid {pid} {how}", unit=us.name, pid=pid)
        if us.unit.service.kill_mode in ("control-group", "mixed") and processes.group_alive(pid):
            # The main process is gone: what it left behind in its group goes too, as systemd does.
            sig = signal.SIGKILL if us.unit.service.kill_mode == "mixed" else us.unit.service.kill_signal
            processes.signal_tree(pid, sig)
        if self.stopping or us.retired:
            return
        if self.exit_with_service:
            self.stop(code)
            return
        forced = us.forced if us.forced in ("timeout", "watchdog") else None
        if processes.should_restart(us.unit.service.restart, status, forced):
            delay = us.unit.service.restart_sec
            self.log.info("restart", f"restarting in {delay:g}s (restart={us.unit.service.restart})", unit=us.name)
            Timers.cancel(us.restart_timer)
            us.restart_timer = self.timers.add(time.monotonic() + delay, lambda: self._restart(us))
        else:
            self._arm(us)

    def _restart(self, us: UnitState) -> None:
        us.restart_timer = None
        if us.main_pid is None and not self.stopping and not us.retired:
            if not self._start(us):
                self._arm(us)

    def _unit_idle(self, us: UnitState) -> None:
        """The unit has no process left."""
        Timers.cancel(us.kill_timer)
        us.kill_timer = None
        if us.successor is not None:
            succ, us.successor = us.successor, None
            succ.waiting_for = None
            self._activate(succ)
        if not us.retired and us.unit.accept and us.paused_until and not self.stopping:
            # Out-of-descriptor pauses end when a connection ends.
            Timers.cancel(us.pause_timer)
            self._unpause(us)

    # ---------------------------------------------------------------- stopping
    def _signal_unit(self, us: UnitState, sig: int, parents: dict[int, int] | None = None) -> None:
        """``parents``: a parent_map() the caller read once for many units (thousands of processes)."""
        mode = us.unit.service.kill_mode
        whole_tree = mode == "control-group" or (mode == "mixed" and sig == signal.SIGKILL)
        if whole_tree and parents is None and us.has_processes():
            parents = processes.parent_map()  # one /proc read for all instances of the unit
        for pid in us.pids():
            if mode == "none":
                continue
            if not whole_tree:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            else:
                processes.signal_tree(pid, sig, parents=parents)
            if sig not in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(pid, signal.SIGCONT)  # a stopped daemon must see the signal now
                except ProcessLookupError:
                    pass

    def _stop_unit(self, us: UnitState, reason: str = "stop", parents: dict[int, int] | None = None) -> None:
        """Ask the unit's processes to end; SIGKILL what remains after timeout-stop-sec."""
        if not us.has_processes():
            return
        us.forced = reason
        self._signal_unit(us, us.unit.service.kill_signal, parents)
        timeout = us.unit.service.timeout_stop
        Timers.cancel(us.kill_timer)
        if timeout != float("inf"):
            us.kill_timer = self.timers.add(time.monotonic() + timeout, lambda: self._kill_unit(us))

    def _kill_unit(self, us: UnitState) -> None:
        us.kill_timer = None
        if us.has_processes():
            self.log.warning("kill", f"still running after {us.unit.service.timeout_stop:g}s, sending SIGKILL", unit=us.name)
            parents = processes.parent_map()
            self._signal_unit(us, signal.SIGKILL, parents)
            if us.unit.service.kill_mode == "process":
                for pid in us.pids():
                    processes.signal_tree(pid, signal.SIGKILL, parents=parents)

    def stop(self, exit_code: int = 0) -> None:
        """Stop everything; the loop ends once every process is gone."""
        if self.stopping:
            return
        self.stopping = True
        self.exit_code = exit_code
        for us in self.units.values():
            self._disarm(us)
            Timers.cancel(us.restart_timer)
            Timers.cancel(us.pause_timer)
        parents = processes.parent_map()  # read once for every unit: there may be thousands of processes
        for us in self.units.values():
            self._stop_unit(us, parents=parents)
        # Orphans that no unit claims (double-forked away, reparented to us) are ended too.
        for pid in self._untracked_children(parents):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        longest = max([us.unit.service.timeout_stop for us in self.units.values()] + [0.0])
        if longest != float("inf"):
            self._final_timer = self.timers.add(time.monotonic() + longest, lambda: self._kill_everything(signal.SIGKILL))
        self._check_stopped()

    def _untracked_children(self, parents: dict[int, int]) -> list[int]:
        me = os.getpid()
        return [pid for pid, ppid in parents.items() if ppid == me and pid not in self.pids]

    def _kill_everything(self, sig: int) -> None:
        parents = processes.parent_map()
        for us in self.units.values():
            self._signal_unit(us, sig, parents)
        for pid in processes.descendants({os.getpid()}, parents):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGKILL:
            # Bounded: a process stuck in the kernel must not keep us alive for ever.
            self.timers.add(time.monotonic() + FINAL_GRACE, self._give_up)

    def _give_up(self) -> None:
        left = sorted(self.pids)
        self.log.error("stop", f"processes did not go away after SIGKILL: {left}")
        self.done = True

    def _check_stopped(self) -> None:
        if self.pids:
            return
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            self.done = True
            return
        if pid:
            self._reap()  # reaps and re-checks

    def _close_unit(self, us: UnitState, keep: set[int]) -> None:
        self._disarm(us)
        for ss in us.sockets:
            if id(ss.bound) in keep:
                continue
            remove = ss.bound.spec.remove_on_stop
            ss.bound.close(remove_file=remove)

    def _close_all(self) -> None:
        for us in self.units.values():
            self._close_unit(us, keep=set())
        self.notify.close()
        for sig in (signal.SIGCHLD, signal.SIGHUP, *STOP_SIGNALS, *self.forward_signals):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        self.log.info("stopped", f"stopped, exit status {self.exit_code}")

    # ---------------------------------------------------------------- reload
    def reload(self) -> None:
        """Apply a new set of units: unchanged ones keep running with the very same sockets."""
        try:
            new_units = self.reloader()
        except Exception as exc:  # noqa: BLE001 - the loader reports user errors; keep running
            for line in getattr(exc, "messages", None) or [str(exc)]:
                self.log.error("reload", f"reload failed, keeping the running configuration: {line}")
            return
        self.apply(new_units)

    def apply(self, new_units: list[Unit]) -> None:
        old = self.units
        new_by_name = {u.name: u for u in new_units}
        kept = removed = added = changed = 0
        result: dict[str, UnitState] = {}
        for name, us in old.items():
            if name not in new_by_name:
                self._retire(us)
                self.notify.drop_unit(name)
                removed += 1
        for unit in new_units:
            prev = old.get(unit.name)
            if prev is not None and prev.unit == unit:
                result[unit.name] = prev
                kept += 1
                continue
            reuse: dict[tuple, BoundSocket] = {}
            if prev is not None:
                reuse = {ss.bound.spec.identity(): ss.bound for ss in prev.sockets}
            bound: list[BoundSocket] = []
            errors = []
            fresh = []
            for spec in unit.sockets:
                b = reuse.pop(spec.identity(), None)
                if b is not None:
                    b.spec = spec
                    bound.append(b)
                    continue
                try:
                    nb = open_all([spec])[0]
                except BindError as exc:
                    errors.extend(exc.messages)
                    continue
                fresh.append(nb)
                bound.append(nb)
            if errors:
                for nb in fresh:
                    nb.close(remove_file=True)
                for line in errors:
                    self.log.error("reload", line, unit=unit.name)
                if prev is not None:
                    result[unit.name] = prev
                continue
            try:
                state = self._make_state(unit, bound)
            except ValueError as exc:
                self.log.error("reload", str(exc), unit=unit.name)
                for nb in fresh:
                    nb.close(remove_file=True)
                if prev is not None:
                    result[unit.name] = prev
                continue
            if prev is not None:
                changed += 1
                kept_ids = {id(b) for b in bound}
                self._retire(prev, keep=kept_ids)
                if prev.pids():
                    prev.successor, state.waiting_for = state, prev
            else:
                added += 1
            for nb in fresh:
                self.log.info("listen", f"listening on {nb.spec.label}", unit=unit.name)
            result[unit.name] = state
            if state.waiting_for is None:
                self._activate(state)
        self.units = result
        self.log.info("reload", f"reloaded: {kept} unchanged, {changed} changed, {added} added, {removed} removed")

    def _retire(self, us: UnitState, keep: set[int] | None = None) -> None:
        us.retired = True
        self._disarm(us)
        Timers.cancel(us.restart_timer)
        Timers.cancel(us.pause_timer)
        # Sockets not carried over close now; a daemon still running keeps its own copies until it exits.
        self._stop_unit(us)
        self._close_unit(us, keep=keep or set())


def _noop(signum, frame) -> None:  # the wakeup fd carries the signal to the loop
    pass
