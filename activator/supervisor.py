"""The engine: hold the sockets, start daemons on demand, supervise, reap, stop.

The loop machinery (selector, timers, signal pipe) is :mod:`activator.loop`; this
module is the unit lifecycle. Both ``activator run`` (one unit built from the
command line) and ``activator serve`` (units from files) drive this :class:`Engine`.

The lifecycle's public API, for the notify hub and the control interface:
:meth:`Engine.start_unit`, :meth:`Engine.stop_unit`, :meth:`Engine.restart_unit`, :meth:`Engine.halt_unit`,
:meth:`Engine.adopt_main_pid`, :meth:`Engine.child_exited`, :meth:`Engine.unit_ready`,
:meth:`Engine.fail_unit`, :meth:`Engine.unit_of_pid`, :meth:`Engine.reload`,
:meth:`Engine.stop`; events go to every callable in :attr:`Engine.listeners`.

Faults are contained: an exception while handling one unit (its socket, its timers,
its exited process) is logged with its traceback and puts that unit into the
``failed`` state (its processes stopped, its sockets kept but not watched) while the
other units carry on; an exception anywhere else stops everything cleanly and exits 1.

Processes are reached through a :class:`Host`, so that the state machine can be
driven in-process with a fake one (tests/test_engine.py).
"""
from __future__ import annotations

import errno
import os
from . import signalapi as signal
import sys
import time
from functools import partial

from .records import dataclass, field, replace
from . import conditions, directories, processes
from .access import AccessList
from .addresses import format_peer
from .directories import Directory
from .jobs import Job, JobRunner
from .log import Log
from .loop import Loop, TimerHandle, cancel
from .protocol import STRIP_ENV, listen_environment
from .ratelimit import RateLimit
from .reexec import (NOT_CARRIED, REEXEC_SIGNAL, StateError, carry_socket, decode_fields, decode_into, encode,
                     encode_fields)
from .settings import WORKERS_MAX
from .sockets import BindError, BoundSocket, apply_live_options, family_of, needs_new_socket, open_all
from .spawn import SpawnError, SpawnSpec, encode_environment, reaped, resolve, spawn, start
from .units import Command, Unit

TYPE_CHECKING = False  # typing is not imported at run time (start-up, memory); type checkers see it
if TYPE_CHECKING:
    from .proxy import Proxy
    from .sdnotify import NotifyHub
    from .watch import Watcher
    from typing import Any, Callable

ACCEPT_BATCH = 32  # connections accepted per wake-up, so that one busy socket cannot starve the rest
EMFILE_PAUSE = 1.0  # how long to stop accepting when out of descriptors (or until an instance exits)
FINAL_GRACE = 5.0  # after SIGKILL, how long to wait for the dead to be reaped before giving up
MAX_GLOBAL_FAULTS = 5  # faults outside any unit while stopping before we give up on a clean stop
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
DEFAULT_FORWARD = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)
PER_CONNECTION_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "REMOTE_ADDR", "REMOTE_PORT")


class Host:
    """The operating system as the engine uses it: starting, signalling, reaping and reading processes."""

    def spawn(self, spec: SpawnSpec) -> int:
        """Start and wait until the child has exec'd: an exec failure is a SpawnError here."""
        return spawn(spec)

    def start(self, spec: SpawnSpec) -> int:
        """Start without waiting for the exec (per-connection instances): an exec failure is
        known only once the child is reaped (exec_failure)."""
        return start(spec)

    def exec_failure(self, pid: int, name: str) -> SpawnError | None:
        """Why a child made with start() could not exec, once it has been reaped; None when it did."""
        return reaped(pid, name)

    def kill(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def killpg(self, pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def signal_tree(self, root: int, sig: int, tree: processes.Tree, pgid: int) -> None:
        processes.signal_tree(root, sig, tree, pgid)

    def tree(self) -> processes.Tree:
        return processes.Tree.read()

    def reap(self) -> list[tuple[int, int]]:
        """Every child that has exited, without blocking."""
        done = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            done.append((pid, status))
        return done

    def children_state(self) -> str:
        """'none' (no child at all), 'exited' (one waits to be reaped) or 'running'."""
        try:
            waiting = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return "none"
        return "running" if waiting is None else "exited"

    def socket_inodes(self, pid: int) -> set[int]:
        return processes.socket_inodes(pid)

    def adjust(self, pid: int, oom_score_adjust: int | None, nice: int | None) -> None:
        processes.adjust(pid, oom_score_adjust, nice)

    def pgid(self, pid: int) -> int | None:
        return processes.pgid_of(pid)

    def group_alive(self, pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def children(self) -> set[int]:
        """Our own child processes (from /proc/self/task/*/children, or the whole tree without it)."""
        kids = processes.own_children()
        if kids is None:
            me = os.getpid()
            try:
                kids = {pid for pid, (ppid, _) in self.tree().table.items() if ppid == me}
            except OSError:
                kids = set()  # /proc unreadable (out of descriptors): nothing to find, nothing to wait for
        return kids

    @property
    def pid(self) -> int:
        return os.getpid()


@dataclass
class UnitStats:
    """Counters since activator started (kept across reloads of the unit), for status and metrics."""

    activations: int = 0  # Accept=no triggers and accepted connections
    starts: int = 0
    start_failures: int = 0
    accepted: int = 0
    refused: int = 0  # over max-connections or max-connections-per-source
    denied: int = 0  # by ip-address rules
    restarts: int = 0  # automatic restarts (restart=)
    last_exit: str | None = None
    last_exit_code: int | None = None
    last_exit_time: float | None = None  # wall clock
    started_time: float | None = None  # wall clock of the current main process's start


@dataclass(eq=False)
class SocketState:
    bound: BoundSocket
    trigger: RateLimit
    armed: bool = False
    family: int = 0  # the socket's, kept at hand for every accepted connection
    inode: int = 0  # to recognise processes that still hold it (after the socket is closed here too)


@dataclass(eq=False)
class UnitState:
    unit: Unit
    sockets: list[SocketState]
    start_limit: RateLimit
    access: AccessList | None = None
    main_pid: int | None = None
    main_pgid: int | None = None  # the group the main process was started in (stays on MAINPID=)
    instances: dict[int, str | None] = field(default_factory=dict)  # pid -> peer address
    per_source: dict[str, int] = field(default_factory=dict)
    leftovers: set[int] = field(default_factory=set)  # processes the main process left behind
    executable: str | None = None
    credentials: tuple[int, int, list[int] | None] = (-1, -1, None)
    base_env: dict[str, str] = field(default_factory=dict)
    base_envp: list[bytes] | None = None  # base_env encoded at the first connection, for per-connection starts
    paused_until: float = 0.0
    pause_timer: TimerHandle | None = None
    restart_timer: TimerHandle | None = None
    restart_pending: bool = False  # a restart= restart that waits for the end of a rate-limit pause
    kill_timer: TimerHandle | None = None
    retired: bool = False  # removed or replaced by a reload: never start again
    failed: str | None = None  # why the unit failed (a fault in its handling): no activation until restarted
    waiting_for: "UnitState | None" = None  # a retired generation still running on our name or sockets
    forced: str | None = None  # why we ended the daemon ourselves ('stop', 'timeout', 'watchdog', 'start-post')
    held: bool = False  # `ctl stop --disarm`: not listened on until started again
    manual_stop: bool = False  # `ctl stop`: no restart= after this exit
    stats: UnitStats = field(default_factory=UnitStats)
    # Unit files: control commands, dependencies, conditions, directories (activator.jobs)
    argv: list[str] = field(default_factory=list)  # the main command, its $VARs expanded
    rlimits: list[tuple[int, int, int]] = field(default_factory=list)
    directories: list[Directory] = field(default_factory=list)
    jobs: dict[int, Job] = field(default_factory=dict)  # pid -> the job whose command it runs
    live_jobs: list[Job] = field(default_factory=list)  # every job not ended yet, running or waiting
    start_job: Job | None = None  # Accept=no: the start (or its exec-start-post) under way
    reload_job: Job | None = None
    held_connections: int = 0  # accept mode: connections whose instance waits for its start job
    waiters: list[tuple["UnitState", Job]] = field(default_factory=list)  # starts ordered after this unit
    ordered_after: tuple[str, ...] = ()  # the units its starts wait for (its after, and their before)
    up: bool = False  # the daemon is started, ready (type notify) and past exec-start-post
    skipped: str | None = None  # a condition or assertion that did not hold: not started until a reload
    # Workers and graceful restarts (docs/restarts.md). Plain fields, so that the state can be handed over.
    worker: int = 0  # this daemon's worker index (ACTIVATOR_WORKER); 0: the unit's own state, in Engine.units
    leader: "UnitState | None" = None  # workers 1..N-1: the unit's state (worker 0), which holds the group
    workers: list["UnitState"] = field(default_factory=list)  # on worker 0: the states of workers 1..N-1
    successor: "UnitState | None" = None  # a graceful restart under way: the new daemon, not ready yet
    replaces: "UnitState | None" = None  # on that new daemon's state: the state it replaces once ready
    rolling: list[int] = field(default_factory=list)  # on worker 0: the workers a graceful restart has yet to replace
    target_workers: int = 0  # on worker 0: the count a graceful reload scales to once done (0: keep)
    ready_timer: TimerHandle | None = None  # graceful-ready-sec of a new simple or exec daemon
    exit_deferred: int | None = None  # the old daemon's exit status during a graceful overlap (for restart=)

    @property
    def name(self) -> str:
        return self.unit.name

    @property
    def group(self) -> list["UnitState"]:
        """The unit's workers, worker 0 first (one state for a unit with one worker)."""
        lead = self.leader or self
        return [lead, *lead.workers]

    def pids(self) -> list[int]:
        return ([self.main_pid] if self.main_pid else []) + list(self.instances) + list(self.leftovers) + \
            list(self.jobs)

    def has_processes(self) -> bool:
        """Cheap, unlike pids(): asked after every reaped child, with thousands of instances."""
        return self.main_pid is not None or bool(self.instances) or bool(self.leftovers) or bool(self.jobs)

    @property
    def armed(self) -> bool:
        return any(ss.armed for ss in self.sockets)

    @property
    def state(self) -> str:
        """listening, starting, running, paused, stopping, waiting (for an older generation), failed, skipped
        (a condition did not hold), stopped (by `ctl stop --disarm`) or idle."""
        if self.failed:
            return "failed"
        if self.skipped:
            return "skipped"
        if self.start_job is not None and self.main_pid is None:
            return "starting"
        if self.has_processes():
            return "stopping" if self.forced == "stop" or self.retired else "running"
        if self.held:
            return "stopped"
        if self.waiting_for is not None:
            return "waiting"
        if self.paused_until:
            return "paused"
        return "listening" if self.armed else "idle"


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


def user_environment(user: str) -> dict[str, str]:
    """USER, LOGNAME, HOME and SHELL from the passwd entry of User=, as systemd sets them."""
    pw = processes.lookup_user(user)
    return {"USER": pw.pw_name, "LOGNAME": pw.pw_name, "HOME": pw.pw_dir or "/", "SHELL": pw.pw_shell or "/bin/sh"}


@dataclass
class ReloadResult:
    ok: bool
    unchanged: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        units: list[Unit],
        log: Log | None = None,
        *,
        exit_with_service: bool = False,
        forward_signals: tuple[int, ...] = DEFAULT_FORWARD,
        reloader: Callable[[], list[Unit]] | None = None,
        host: Host | None = None,
        loop: Loop | None = None,
        reload_daemons: bool = False,
    ) -> None:
        self.log = log or Log()
        self.exit_with_service = exit_with_service
        self.reload_daemons = reload_daemons  # a reload also runs exec-reload of the units it leaves unchanged
        self.forward_signals = tuple(forward_signals)
        self.reloader = reloader
        self.host = host or Host()
        self.loop = loop or Loop()
        self.loop.on_fault = self._on_fault
        self.clock = self.loop.clock
        self.units: dict[str, UnitState] = {}
        self.pids: dict[int, UnitState] = {}
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.stopping = False
        self.exit_code = 0
        self.done = False
        self.global_faults = 0
        self.stats_by_name: dict[str, UnitStats] = {}
        self.draining: list[UnitState] = []  # retired units whose daemons still run: their sockets stay open
        self._devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self._env = {k: v for k, v in os.environ.items() if k not in STRIP_ENV}
        self._pending = units
        self._notify: NotifyHub | None = None  # sd_notify (readiness, watchdog, fd store): see the property
        # Made with the first unit that needs them (their modules cost start-up and memory otherwise):
        self._proxy: Proxy | None = None  # proxy units (service.proxy-to): their connections and relays
        self._watch: Watcher | None = None  # watch-paths: restart a daemon when its files change
        self.jobs = JobRunner(self)  # control commands (exec-start-pre, ...) and ordered starts
        self.reexec: Any = None  # activator.reexec.Reexec, set by the command line: ctl reexec, REEXEC_SIGNAL
        self.resumed: dict[str, Any] | None = None  # the state this engine took over (a re-exec), if any

    @property
    def notify(self) -> NotifyHub:
        """The sd_notify side of units with a NOTIFY_SOCKET (activator.sdnotify), made with the first such
        unit's start (or a carried state): the others never need it, nor its module's start-up and memory."""
        if self._notify is None:
            from .sdnotify import NotifyHub

            self._notify = NotifyHub(self)
        return self._notify

    @property
    def proxy(self) -> Proxy:
        """The connections and relays of proxy units (activator.proxy), made on first use."""
        if self._proxy is None:
            from .proxy import Proxy

            self._proxy = Proxy(self)
        return self._proxy

    @property
    def watch(self) -> Watcher:
        """The watches of units with watch-paths (activator.watch), made on first use."""
        if self._watch is None:
            from .watch import Watcher

            self._watch = Watcher(self)
        return self._watch

    def _sync_watches(self) -> None:
        """Watch what each unit's watch-paths ask for now (nothing to do while no unit ever had any)."""
        if self._watch is not None or any(us.unit.service.watch_paths for us in self.units.values()):
            self.watch.sync()

    def _close_watches(self) -> None:
        if self._watch is not None:
            self._watch.close()

    def _close_notify(self) -> None:
        if self._notify is not None:
            self._notify.close()

    def _close_proxy(self) -> None:
        if self._proxy is not None:
            self._proxy.close()

    def states(self) -> list[UnitState]:
        """Every current state: each unit's workers and, during a graceful restart, their new daemons."""
        return [s for us in self.units.values() for w in us.group for s in (w, w.successor) if s is not None]

    def states_of(self, name: str, worker: int = 0) -> list[UnitState]:
        """The states that run worker ``worker`` of the unit ``name``: the current one and, during a graceful
        restart, the new one (for the notify hub: whose messages come on that worker's socket)."""
        us = self.units.get(name)
        if us is None:
            return []
        return [s for w in us.group if w.worker == worker for s in (w, w.successor) if s is not None]

    # ----------------------------------------------------------------- events
    def publish(self, event: str, us: UnitState | None = None, **data: Any) -> None:
        """Tell every listener (control interface, metrics, tests) what happened; they must not raise."""
        if not self.listeners:
            return
        record = {"event": event, "unit": us.name if us is not None else None, **data}
        for listener in list(self.listeners):
            listener(record)

    # ----------------------------------------------------------------- setup
    def _plan_state(self, unit: Unit, bound: list[BoundSocket]) -> UnitState:
        """A unit's state, without touching its sockets yet; ValueError when its user or group is unknown."""
        svc = unit.service
        states = [SocketState(b, RateLimit(unit.trigger_limit_interval, unit.effective_trigger_burst)) for b in bound]
        us = UnitState(unit, states, RateLimit(svc.start_limit_interval, svc.start_limit_burst))
        if unit.accepts_connections and (unit.ip_address_allow or unit.ip_address_deny):
            us.access = AccessList(unit.ip_address_allow, unit.ip_address_deny)
        us.credentials = credentials(svc.user, svc.group, svc.supplementary_groups)
        env = dict(self._env) if svc.inherit_environment else {}
        if svc.user:
            env.update(user_environment(svc.user))
        env.update(svc.environment)
        us.directories = directories.planned(svc)
        env.update(directories.environment(us.directories))
        us.base_env = env
        us.argv = _expanded(svc.main_command, env)
        us.rlimits = [(which, soft, hard) for which, (soft, hard) in svc.limits.items()]
        us.stats = self.stats_by_name.setdefault(unit.name, UnitStats())
        return us

    @staticmethod
    def _claim_sockets(us: UnitState) -> None:
        """Set each socket up for how this unit uses it (done at commit: a reload may share them)."""
        for s in us.sockets:
            s.family = family_of(s.bound.sock)
            s.inode = os.fstat(s.bound.fileno()).st_ino
            if us.unit.accepts_connections:
                s.bound.sock.setblocking(False)
            elif s.bound.spec.inherited_fd is None and not s.bound.sock.getblocking():
                s.bound.sock.setblocking(True)  # kept by a reload from an accept = true unit

    def validate(self) -> list[str]:
        """Problems that would stop units from starting, found before binding anything."""
        errors = []
        for unit in self._pending:
            svc = unit.service
            try:
                credentials(svc.user, svc.group, svc.supplementary_groups)
                directories.planned(svc)
            except ValueError as exc:
                errors.append(f"{unit.name}: {exc}")
        return errors

    def open(self) -> None:
        """Bind every socket of every unit, or none (BindError lists every problem)."""
        # Before binding: a SIGTERM that comes once we listen must stop us cleanly (removing
        # the socket files), not kill us with the default action.
        self._setup_signals()
        errors = self.validate()
        if errors:
            raise BindError(errors)
        # A unit whose conditions do not hold is skipped: none of its sockets is bound.
        skipped = {unit.name: why for unit in self._pending if (why := _skip_reason(unit)) is not None}
        all_specs = [spec for unit in self._pending if unit.name not in skipped for spec in unit.sockets]
        bound = open_all(all_specs)
        it = iter(bound)
        with self.log.hold():
            for unit in self._pending:
                mine = [] if unit.name in skipped else [next(it) for _ in unit.sockets]
                us = self._plan_state(unit, mine)
                self._claim_sockets(us)
                self.units[unit.name] = us
                self._add_workers(us, unit.service.workers)
                for fd, b in enumerate(mine, start=3):
                    if b.spec.address is not None:
                        where = f"proxied to {unit.service.proxy_to}" if unit.proxy else f"as fd {fd}"
                        self.log.info("listen", f"listening on {b.spec.label} {where}", unit=unit.name)
                if unit.name in skipped:
                    self._skip(us, *skipped[unit.name])
        self._pending = []
        self._sync_watches()

    def _link_order(self) -> None:
        """Each unit's ordered_after: its own after, and the units whose before names it."""
        before: dict[str, list[str]] = {}
        for us in self.units.values():
            for name in us.unit.before:
                before.setdefault(name, []).append(us.name)
        for us in self.units.values():
            us.ordered_after = tuple(dict.fromkeys([*us.unit.after, *before.get(us.name, [])]))

    def _skip(self, us: UnitState, why: str, assertion: bool) -> None:
        """A condition (or an assertion) of the unit does not hold: it is not started, its sockets not bound."""
        us.skipped = why
        if assertion:
            self.log.error("assert", f"not started: {why}", unit=us.name)
        else:
            self.log.info("condition", f"skipped: {why}", unit=us.name)
        self.publish("skipped", us, reason=why)

    def _setup_signals(self) -> None:
        handled = {signal.SIGCHLD, signal.SIGHUP, REEXEC_SIGNAL, *STOP_SIGNALS, *self.forward_signals}
        self.loop.handle_signals(handled, self.handle_signals)

    # ------------------------------------------------------------- the loop
    def run(self) -> int:
        """Serve until stopped; returns the exit code. Never leaves a daemon or a file of ours behind."""
        try:
            if self._pending:
                self.open()
            processes.set_child_subreaper()
            self._setup_signals()
            self._link_order()
            if self.resumed is not None:
                self._go_on()
            else:
                for us in _in_start_order(list(self.units.values())):
                    self.loop.dispatch(partial(self._activate, us), us)
            self.log.debug("ready", f"{len(self.units)} unit(s) ready")
            self._notify_ready()
            self.log.schedule = self.loop.call_at  # collapsed floods are summed up when their window ends
            while not self.done:
                self.loop.run_once()
                self._watch_log()
        except BaseException as exc:  # noqa: BLE001 - the last line of defence: stop what we started
            self._emergency_stop(exc)
        finally:
            self._close_all()
            self.log.close()
        return self.exit_code

    def _watch_log(self) -> None:
        """Log lines that stderr could not take yet go out when it is writable again (never blocking)."""
        fd = self.log.fileno_to_watch()
        if fd is None:
            return
        wanted = self.log.wants_write()
        if wanted != self.loop.watching(fd):
            if wanted:
                self.loop.add_writer(fd, self.log.flush_some)
            else:
                self.loop.remove(fd)

    def _notify_ready(self) -> None:
        if os.environ.get("NOTIFY_SOCKET"):
            try:
                from .sdnotify import notify

                notify("READY=1", f"MAINPID={os.getpid()}")
            except Exception as exc:  # noqa: BLE001 - readiness is best effort
                self.log.debug("notify", f"could not notify our own supervisor: {exc}")

    def _activate(self, us: UnitState) -> None:
        if us.unit.start_now and not us.unit.accept:
            self._start_group(us)
        else:
            self._arm(us)

    def _start_group(self, us: UnitState) -> bool:
        """Start every worker of the unit that does not run (all N start on the first connection)."""
        started = False
        for w in us.group:
            if w.main_pid is None and w.start_job is None and not w.leftovers:
                started = self._start(w) or started
        return started

    # ---------------------------------------------------------------- faults
    def _on_fault(self, owner: object, exc: BaseException) -> None:
        import traceback  # only for a bug: not at start-up

        trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
        if isinstance(owner, UnitState) and not self.stopping:
            self.log.error("unit-fault", f"internal error, unit failed: {exc!r}\n{trace}", unit=owner.name)
            self.fail_unit(owner, f"internal error: {exc!r}")
            return
        self.global_faults += 1
        self.log.error("engine-fault", f"internal error, stopping everything: {exc!r}\n{trace}")
        if self.global_faults > MAX_GLOBAL_FAULTS:
            raise exc  # run() ends with the emergency stop
        if not self.stopping:
            self.stop(1)
        else:
            self.exit_code = 1

    def _emergency_stop(self, exc: BaseException) -> None:
        """The loop itself failed: stop every daemon without it (bounded), then the files go in _close_all."""
        self.exit_code = 1
        try:
            self.log.error("engine-fault", f"fatal: {exc!r}; stopping every daemon")
        except Exception:  # noqa: BLE001 - even logging may be what failed
            pass
        try:
            tree = self._tree()
            for sig, grace in ((None, 5.0), (signal.SIGKILL, FINAL_GRACE)):
                for us in self.states():
                    self._signal_unit(us, sig or us.unit.service.kill_signal, tree)
                deadline = time.monotonic() + grace
                while self.pids and time.monotonic() < deadline:
                    for pid, _ in self.host.reap():
                        self._forget_pid(pid)
                    if self.pids:
                        time.sleep(0.01)  # no loop any more: a short bounded poll is all that is left
                if not self.pids:
                    break
        except BaseException:  # noqa: BLE001 - nothing more can be done; the files are still removed
            pass

    def _quiesce(self, us: UnitState) -> None:
        """No more activation of ``us`` (failed or retired): not watched, no pending restart or resume,
        its jobs abandoned, and the starts waiting for it released (they must not wait for a unit that is gone)."""
        self._disarm(us)
        cancel(us.restart_timer)
        cancel(us.pause_timer)
        cancel(us.ready_timer)  # a graceful restart's new daemon that goes never counts as ready
        us.restart_pending = False
        self.jobs.abandon(us)
        self.jobs.went_down(us)

    def fail_unit(self, us: UnitState, reason: str) -> None:
        """Put ``us`` in the failed state: processes stopped, sockets held but not watched, no restarts."""
        us.failed = reason
        self._quiesce(us)
        try:
            self.stop_unit(us, "stop")
        except Exception as exc:  # noqa: BLE001 - a unit that cannot even be stopped must not stop the others
            self.log.error("unit-fault", f"cannot stop the failed unit's processes: {exc!r}", unit=us.name)
        self.publish("failed", us, reason=reason)
        if self._proxy is not None:
            self._proxy.failed(us)

    # --------------------------------------------------------------- signals
    def handle_signals(self, received: list[int]) -> None:
        """Every signal received since the last wake-up, in order, one entry each (they are not merged)."""
        reap = reload = False
        for sig in received:
            if sig == signal.SIGCHLD:
                reap = True
            elif sig == signal.SIGHUP and self.reloader is not None:
                reload = True  # several in a row are one reload
            else:
                self.handle_signal(sig)
        if reap:
            self._reap()
        if reload and not self.stopping:  # a stop wins over a reload
            self.reload()

    def handle_signal(self, sig: int) -> None:
        if sig == signal.SIGCHLD:
            self._reap()
        elif sig in STOP_SIGNALS:
            name = signal.name(sig)
            if self.stopping:
                self.log.info("stop", f"{name} again: killing what is left")
                self._kill_everything(signal.SIGKILL)
            else:
                self.log.info("stop", f"{name} received, stopping")
                self.stop(0)
        elif sig == signal.SIGHUP and self.reloader is not None:
            if not self.stopping:
                self.reload()
        elif sig == REEXEC_SIGNAL and sig not in self.forward_signals:
            if self.reexec is not None and not self.stopping:
                self.reexec.signalled()
        else:
            self._forward(sig)

    def _forward(self, sig: int) -> None:
        for us in self.states():
            for pid in us.pids():
                self.host.kill(pid, sig)
        self.log.debug("forward", f"forwarded {signal.label(sig)}")

    # ------------------------------------------------------------ arming
    def _arm(self, us: UnitState) -> None:
        if us.replaces is not None or us.retired:
            return  # a new daemon of a graceful restart: the state it replaces holds the sockets
        us = us.leader or us  # a unit's sockets are watched by its worker 0, for the whole group
        if self.stopping or us.retired or us.failed or us.held or us.skipped or us.waiting_for is not None \
                or us.start_job is not None or us.successor is not None:
            return
        if self.clock() < us.paused_until:
            return
        if any(w.main_pid is not None or w.leftovers or w.start_job is not None for w in us.group) \
                and not us.unit.proxy:
            return  # the daemon has the sockets (a proxy unit keeps accepting for its daemon)
        for ss in us.sockets:
            if not ss.armed:
                if us.unit.accepts_connections:
                    self.loop.add_reader(ss.bound.sock, partial(self._on_accept, us, ss), us)
                else:
                    self.loop.add_reader(ss.bound.sock, partial(self._on_ready, us, ss), us)
                ss.armed = True

    def _disarm(self, us: UnitState) -> None:
        for ss in us.sockets:
            if ss.armed:
                self.loop.remove(ss.bound.sock)
                ss.armed = False

    def _pause(self, us: UnitState, until: float) -> None:
        """Stop listening for this unit until ``until``; connections wait in the backlog."""
        self._disarm(us)
        us.paused_until = until
        cancel(us.pause_timer)
        us.pause_timer = self.loop.call_at(until, lambda: self._unpause(us), us)

    def _unpause(self, us: UnitState) -> None:
        us.pause_timer = None
        us.paused_until = 0.0
        if self.stopping or us.retired or us.failed:
            return
        self.log.debug("resume", "resuming", unit=us.name)
        if us.restart_pending and us.main_pid is None:
            self._restart(us)  # restart= (or --now) is owed a start, not just a listening socket
        else:
            self._arm(us)

    def _limit_hit(self, us: UnitState, event: str, what: str, limit: RateLimit) -> None:
        """One log line, then no activation until the limit's interval ends; connections wait in the backlog."""
        left = limit.reset_time() - self.clock()
        self.log.warning(event, f"{what} ({limit.describe()}), pausing activation for {left:.1f}s; sockets stay open",
                         unit=us.name)
        self._pause(us, limit.reset_time())
        self.publish("paused", us, until=limit.reset_time(), reason=event)

    # ------------------------------------------------------ Accept=no path
    def _on_ready(self, us: UnitState, ss: SocketState) -> None:
        if not ss.armed or us.main_pid is not None:
            return  # a stale event from the same batch
        if not ss.trigger.allow(self.clock()):
            self._limit_hit(us, "trigger-limit", f"trigger limit hit on {ss.bound.spec.label}", ss.trigger)
            return
        us.stats.activations += 1
        self.log.debug("trigger", f"incoming traffic on {ss.bound.spec.label}", unit=us.name)
        self._start_group(us)

    def _service_env(self, us: UnitState, n_fds: int, names: list[str] | None) -> dict[str, str]:
        env = dict(us.base_env)
        if n_fds:  # a proxy unit's daemon binds its own port: no LISTEN_FDS=0 for it
            env.update(listen_environment(n_fds, names))
        current = us.replaces or us
        if us.worker or len(current.group) > 1 or us.unit.service.workers > 1:
            env["ACTIVATOR_WORKER"] = str(us.worker)
        return env

    def _spawn(self, us: UnitState, fds: list[int], env: dict[str, str] | list[bytes], conn: int | None) -> int:
        svc = us.unit.service
        if us.executable is None:
            us.executable = resolve(svc.exec_path or svc.argv[0], us.base_env.get("PATH", os.defpath))
        stdin = {"null": self._devnull, "inherit": None, "socket": conn}[svc.standard_input]
        out_mode = svc.standard_output or ("socket" if svc.standard_input == "socket" else "journal")
        if out_mode == "inherit":
            stdout = stdin
        else:
            stdout = {"null": self._devnull, "journal": None, "socket": conn}[out_mode]
        spec = self._spawn_spec(
            us, svc.privileged, executable=us.executable, argv=list(us.argv), env=env, fds=fds,
            listen_pid=bool(fds), watchdog_pid=isinstance(env, dict) and "WATCHDOG_USEC" in env,
            stdin=stdin, stdout=stdout,
        )
        try:
            # An instance does not wait for its exec: the engine goes back to accepting while the kernel
            # loads the program (an exec failure is reported when the instance is reaped).
            pid = self.host.start(spec) if conn is not None else self.host.spawn(spec)
        except SpawnError:
            us.executable = None  # look it up again next time: it may be installed by then
            raise
        self._adjust(us, pid)
        return pid

    def _spawn_spec(self, us: UnitState, privileged: bool, **kw: Any) -> SpawnSpec:
        """How every process of the unit starts: the daemon, its instances and its control commands."""
        svc = us.unit.service
        uid, gid, groups = (-1, -1, None) if privileged else us.credentials
        return SpawnSpec(
            # A process group of its own (what a stop signals), but not a session of its own: with
            # Linux's scheduler autogroups a new session slowed nbdkit's data path by about 10 %.
            new_session=False, new_group=True, cwd=svc.working_directory, uid=uid, gid=gid, groups=groups,
            umask=svc.umask, rlimits=us.rlimits, **kw,
        )

    def _adjust(self, us: UnitState, pid: int) -> None:
        """oom-score-adjust and nice, written from here right after the start (the spawner knows neither): a
        daemon may run for a moment, and start children, before they apply."""
        svc = us.unit.service
        if svc.oom_score_adjust is None and svc.nice is None:
            return
        try:
            self.host.adjust(pid, svc.oom_score_adjust, svc.nice)
        except OSError as exc:
            self.log.warning("adjust", f"cannot set oom-score-adjust or nice of pid {pid}: {exc.strerror or exc}",
                             unit=us.name, collapse_key="adjust", collapse_what="processes not adjusted")

    def spawn_command(self, us: UnitState, command: Command, main_pid: int | None) -> int:
        """Start one control command of the unit (exec-start-pre, ...): the daemon's environment, user and
        limits, ``$MAINPID``, stdin /dev/null; SpawnError when it cannot start."""
        svc = us.unit.service
        env = dict(us.base_env)
        if main_pid is not None:
            env["MAINPID"] = str(main_pid)
        if svc.notify_access in ("exec", "all"):
            address = self.notify.socket_address(us)
            if address:
                env["NOTIFY_SOCKET"] = address
        executable = resolve(command.executable, env.get("PATH", os.defpath))
        stdout = self._devnull if svc.standard_output == "null" else None
        pid = self.host.spawn(self._spawn_spec(us, command.privileged, executable=executable,
                                               argv=_expanded(command, env), env=env, stdin=self._devnull,
                                               stdout=stdout))
        self._adjust(us, pid)
        return pid

    def abandoned(self, us: UnitState, job: Job) -> bool:
        """Whether what ``job`` leads to is no longer wanted (the unit or activator stops)."""
        if self.stopping or us.retired or us.failed is not None:
            return True
        return job.kind != "reload" and not us.unit.accept and us.forced == "stop"

    def _start(self, us: UnitState) -> bool:
        """Start the daemon (Accept=no): at once, or through a start job (exec-condition, exec-start-pre, the
        units it requires or waits for). False when it cannot start now."""
        if self.stopping or us.retired or us.failed or us.skipped or us.main_pid is not None or us.leftovers \
                or us.start_job is not None:
            return False
        if not us.start_limit.allow(self.clock()):
            self._limit_hit(us, "start-limit", "start limit hit", us.start_limit)
            return False
        us.restart_pending = False
        us.manual_stop = False
        error = self._make_directories(us)
        if error is not None:
            self._start_failed(us, error)
            return False
        commands = self._start_commands(us)
        if not commands and not us.unit.requires and not us.unit.wants and not self._starting_before(us):
            return self._launch(us)
        us.forced = None
        self._disarm(us)
        job = us.start_job = Job("start", commands, partial(self._start_done, us))
        error = self._start_dependencies(us)
        if error is not None:
            us.start_job = None
            self._start_failed(us, error)
            return False
        self.jobs.run(us, job, self._starting_before(us))
        return True

    @staticmethod
    def _start_commands(us: UnitState) -> list[tuple[str, Command]]:
        svc = us.unit.service
        return [("exec-condition", c) for c in svc.exec_condition] + \
            [("exec-start-pre", c) for c in svc.exec_start_pre]

    def _make_directories(self, us: UnitState) -> str | None:
        """runtime-directory and the others, made (again) before a start; why they cannot be, or None."""
        uid, gid, _ = us.credentials
        for d in us.directories:
            try:
                directories.create(d, uid, gid)
            except OSError as exc:
                return f"{d.kind}-directory: {exc.filename or d.path}: {exc.strerror or exc}"
        return None

    def _start_dependencies(self, us: UnitState) -> str | None:
        """Start the units this one requires or wants (those that are not running); why it cannot start, or
        None. As in systemd, only a required unit it is also ordered after can stop it from starting, and a
        unit skipped by its conditions does not."""
        for name in dict.fromkeys([*us.unit.requires, *us.unit.wants]):
            dep = self.units.get(name)
            if dep is None or dep is us or dep.unit.accept or dep.skipped:
                continue  # an accept unit is up as long as it listens
            if dep.main_pid is None and dep.start_job is None and not self._start(dep) \
                    and name in us.unit.requires and name in us.ordered_after:
                return f"required unit {name} cannot start ({dep.state})"
        return None

    def _starting_before(self, us: UnitState) -> tuple[UnitState, ...]:
        """The units this one is ordered after (after, or their before) that are starting and not up yet."""
        found = []
        for name in us.ordered_after:
            dep = self.units.get(name)
            if dep is not None and dep is not us and not dep.up and (dep.start_job is not None or dep.main_pid):
                found.append(dep)
        return tuple(found)

    def _start_done(self, us: UnitState, job: Job, error: str | None, skipped: str | None) -> None:
        if job.conn is not None:
            self._instance_start_done(us, job, error, skipped)
            return
        us.start_job = None
        if job.abandoned:
            self.jobs.went_down(us)
        elif skipped is not None:
            self.log.info("start-skipped", f"start skipped: {skipped}", unit=us.name)
            self.publish("start-skipped", us, reason=skipped)
            self.jobs.went_down(us)
            self._arm(us)
        elif error is not None:
            self._start_failed(us, error)
        else:
            self._launch(us)

    def _start_failed(self, us: UnitState, reason: str, code: int = 1) -> None:
        us.stats.start_failures += 1
        self.log.error("start-failed", f"cannot start: {reason}", unit=us.name)
        self.jobs.went_down(us)
        if us.replaces is not None:
            self._graceful_failed(us, f"cannot start: {reason}")
            return
        if self.exit_with_service:
            self.stop(code)
            return
        self._arm(us)

    def _launch(self, us: UnitState) -> bool:
        """Spawn the daemon with its sockets (Accept=no)."""
        proxy = us.unit.proxy
        names = None if proxy else us.unit.fd_names()
        fds = [] if proxy else [s.bound.fileno() for s in us.sockets]
        stored = self._notify.stored_fds(us) if self._notify is not None else []  # after the sockets, named
        if stored:
            names = (names or ["unknown"] * len(fds)) + [name for name, _ in stored]
            fds += [fd for _, fd in stored]
        env = self._service_env(us, len(fds), names)
        if us.unit.notify_socket:
            env.update(self.notify.service_env(us))
        try:
            pid = self._spawn(us, fds, env, None)
        except SpawnError as exc:
            # The daemon could not even start: with --exit-with-service, exit as a shell would (command not run).
            self._start_failed(us, str(exc), 127)
            return False
        us.main_pid = us.main_pgid = pid
        us.forced = None
        us.stats.starts += 1
        us.stats.started_time = time.time()
        self.pids[pid] = us
        if self._notify is not None or us.unit.notify_socket:
            self.notify.started(us, pid)
        if not proxy:
            self._disarm(us.leader or us)
        worker = self._worker_field(us)
        self.log.info("start", f"started {us.unit.service.argv[0]} as pid {pid}" +
                      (f" (worker {us.worker})" if worker else ""), unit=us.name, pid=pid, **worker)
        self.publish("started", us, pid=pid)
        if us.unit.proxy:
            self.proxy.started(us)
        if us.unit.service.type != "notify":
            self._start_post(us)
        return True

    def _start_post(self, us: UnitState) -> None:
        """The daemon is started (and ready, for type = notify): exec-start-post, then it is up."""
        svc = us.unit.service
        if not svc.exec_start_post:
            self._became_up(us)
            return
        job = us.start_job = Job("post", [("exec-start-post", c) for c in svc.exec_start_post],
                                 partial(self._post_done, us), main_pid=us.main_pid)
        self.jobs.run(us, job)

    def _post_done(self, us: UnitState, job: Job, error: str | None, skipped: str | None) -> None:
        us.start_job = None
        if us.main_pid is None or job.abandoned:
            return  # it exited meanwhile: _main_exited told the units that wait for it
        if error is not None:
            self.log.error("start-failed", f"stopping the daemon: {error}", unit=us.name, pid=us.main_pid)
            self.jobs.went_down(us)
            self.stop_unit(us, "start-post")
            return
        self._became_up(us)

    def _became_up(self, us: UnitState) -> None:
        us.up = True
        self.jobs.became_up(us)
        if us.replaces is not None:
            if us.unit.service.type == "notify":
                self._graceful_done(us)
            else:
                us.ready_timer = self.loop.call_later(us.unit.service.graceful_ready_sec,
                                                      partial(self._graceful_ready, us), us)

    def reload_unit(self, us: UnitState) -> bool:
        """Run exec-reload for the unit's running daemon (with $MAINPID); False when there is nothing to run."""
        svc = us.unit.service
        if us.unit.accept or us.main_pid is None or not svc.exec_reload or us.reload_job is not None:
            return False
        job = us.reload_job = Job("reload", [("exec-reload", c) for c in svc.exec_reload],
                                  partial(self._reload_done, us), main_pid=us.main_pid)
        self.log.info("reload-unit", "reloading the daemon (exec-reload)", unit=us.name, pid=us.main_pid)
        self.jobs.run(us, job)
        return True

    def _reload_done(self, us: UnitState, job: Job, error: str | None, skipped: str | None) -> None:
        us.reload_job = None
        if job.abandoned:
            return
        if error is not None:
            self.log.warning("reload-unit", f"exec-reload failed: {error}", unit=us.name)
        else:
            self.log.info("reload-unit", "daemon reloaded", unit=us.name)
        self.publish("unit-reloaded", us, error=error)

    # ----------------------------------------------------- Accept=yes path
    def _on_accept(self, us: UnitState, ss: SocketState) -> None:
        sock = ss.bound.sock
        for _ in range(ACCEPT_BATCH):
            if not ss.armed:
                return
            if ss.trigger.enabled and not ss.trigger.allow(self.clock()):
                self._limit_hit(us, "trigger-limit", f"trigger limit hit on {ss.bound.spec.label}", ss.trigger)
                return
            try:
                fd, peer = sock._accept()  # type: ignore[attr-defined]  # the raw fd: no socket object per connection
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.log.warning(
                        "accept-failed", f"cannot accept on {ss.bound.spec.label}: {exc.strerror}; "
                        f"pausing accept for {EMFILE_PAUSE:g}s or until a connection ends", unit=us.name,
                    )
                    self._pause(us, self.clock() + EMFILE_PAUSE)
                    return
                continue  # ECONNABORTED, EPROTO, ...: that connection is gone, carry on
            handed_over = False
            try:
                handed_over = self._connection(us, ss, fd, peer)
            finally:
                if not handed_over:
                    os.close(fd)

    def _open_connections(self, us: UnitState) -> int:
        return self.proxy.count(us) if us.unit.proxy else len(us.instances)

    def _connection(self, us: UnitState, ss: SocketState, fd: int, peer) -> bool:
        """Admit one accepted connection; True when ``fd`` was handed over (to the proxy), else the caller closes it."""
        unit = us.unit
        addr, port = format_peer(ss.family, peer)
        who = f"{addr}:{port}" if addr else "a local peer"
        us.stats.activations += 1
        if us.access is not None and addr is not None and not us.access.allowed(addr):
            us.stats.denied += 1
            self.log.warning("denied", f"connection from {who} denied by ip-address rules", unit=us.name,
                             collapse_key=addr, collapse_what="connections denied")
            return False
        per_source = unit.max_connections_per_source
        if not unit.proxy and (len(us.instances) + us.held_connections >= unit.max_connections or (
            per_source and addr is not None and us.per_source.get(addr, 0) >= per_source
        )):
            # Instances that have exited but whose SIGCHLD is not handled yet (a busy accept batch) do not count.
            self._reap()
        open_now = self._open_connections(us) + us.held_connections
        if open_now >= unit.max_connections:
            us.stats.refused += 1
            self.log.warning(
                "too-many", f"too many connections ({open_now}), closing connection from {who}", unit=us.name,
                collapse_key=addr or "local", collapse_what="connections refused (too many)",
            )
            return False
        if per_source and addr is not None and us.per_source.get(addr, 0) >= per_source:
            us.stats.refused += 1
            self.log.warning(
                "too-many-per-source",
                f"too many connections from {addr} ({us.per_source[addr]}), closing connection", unit=us.name,
                collapse_key=addr, collapse_what="connections refused (too many from one source)",
            )
            return False
        if unit.proxy:
            us.stats.accepted += 1
            self.proxy.connection(us, fd, ss.family, addr)
            return True
        name = ss.bound.spec.name or "connection"
        if self._instance_needs_job(us):
            self._hold(us, name, fd, addr, port)
        else:
            self._spawn_instance(us, name, fd, addr, port)
        return False

    def _spawn_instance(self, us: UnitState, name: str, fd: int, addr: str | None, port: str | None,
                        counted: bool = False) -> None:
        """One instance for the connection ``fd`` (``counted``: its source is counted already, by _hold)."""
        inetd = us.unit.service.standard_input == "socket"
        # This runs for every connection: the environment is extended in its encoded form.
        if us.base_envp is None:
            us.base_envp = encode_environment({k: v for k, v in us.base_env.items() if k not in PER_CONNECTION_ENV})
        env = list(us.base_envp)
        if inetd:
            fds: list[int] = []
        else:
            env += [b"LISTEN_FDS=1", b"LISTEN_FDNAMES=" + name.encode()]
            fds = [fd]
        if addr is not None:
            env += [f"REMOTE_ADDR={addr}".encode(), f"REMOTE_PORT={port}".encode()]
        try:
            pid = self._spawn(us, fds, env, fd)
        except SpawnError as exc:
            us.stats.start_failures += 1
            self.log.error("start-failed", f"cannot start instance: {exc}", unit=us.name)
            if counted:
                self._uncount_source(us, addr)
            return
        us.stats.accepted += 1
        us.instances[pid] = addr
        if addr is not None and not counted:
            us.per_source[addr] = us.per_source.get(addr, 0) + 1
        self.pids[pid] = us
        if self.log.enabled("debug"):
            who = f"{addr}:{port}" if addr else "a local peer"
            self.log.debug("start", f"connection from {who}: started pid {pid}", unit=us.name, pid=pid)
        if us.unit.service.exec_start_post:
            self.jobs.run(us, Job("post", [("exec-start-post", c) for c in us.unit.service.exec_start_post],
                                  partial(self._instance_post_done, us), main_pid=pid))

    def _instance_needs_job(self, us: UnitState) -> bool:
        unit = us.unit
        return bool(us.directories or unit.service.exec_condition or unit.service.exec_start_pre or unit.requires
                    or unit.wants or self._starting_before(us))

    def _hold(self, us: UnitState, name: str, fd: int, addr: str | None, port: str | None) -> None:
        """Accept mode with a start job: the connection waits (a copy of it, counted against the limits)
        while the job runs; its instance starts when the job is done."""
        error = self._make_directories(us) or self._start_dependencies(us)
        if error is not None:
            us.stats.start_failures += 1
            self.log.error("start-failed", f"cannot start instance: {error}", unit=us.name)
            return
        try:
            conn = os.dup(fd)
        except OSError as exc:  # out of descriptors: this connection is dropped, as accept() would have
            self.log.warning("accept-failed", f"cannot keep the connection for its start: {exc.strerror}",
                             unit=us.name, collapse_key="dup", collapse_what="connections dropped")
            return
        job = Job("start", self._start_commands(us), partial(self._start_done, us), conn=conn, socket_name=name,
                  peer=(addr, port))
        us.held_connections += 1
        if addr is not None:
            us.per_source[addr] = us.per_source.get(addr, 0) + 1
        self.jobs.run(us, job, self._starting_before(us))

    def _instance_start_done(self, us: UnitState, job: Job, error: str | None, skipped: str | None) -> None:
        conn = job.conn
        assert conn is not None
        us.held_connections -= 1
        addr, port = job.peer
        try:
            if error is None and skipped is None and not job.abandoned:
                self._spawn_instance(us, job.socket_name, conn, addr, port, counted=True)
                return
            self._uncount_source(us, addr)
            if skipped is not None:
                self.log.debug("start-skipped", f"instance skipped: {skipped}", unit=us.name)
            elif not job.abandoned:
                us.stats.start_failures += 1
                self.log.error("start-failed", f"cannot start instance: {error}", unit=us.name)
        finally:
            os.close(conn)

    def _instance_post_done(self, us: UnitState, job: Job, error: str | None, skipped: str | None) -> None:
        if error is not None and not job.abandoned and job.main_pid in us.instances:
            self.log.error("start-failed", f"stopping the instance: {error}", unit=us.name, pid=job.main_pid)
            self.host.kill(job.main_pid, us.unit.service.kill_signal)

    def _uncount_source(self, us: UnitState, addr: str | None) -> None:
        if addr is None:
            return
        left = us.per_source.get(addr, 1) - 1
        if left > 0:
            us.per_source[addr] = left
        else:
            us.per_source.pop(addr, None)

    # --------------------------------------------------------------- reaping
    def _reap(self) -> None:
        for pid, status in self.host.reap():
            us = self.pids.get(pid)
            if us is None:
                self.log.debug("reap", f"reaped orphan pid {pid}")
                continue
            self.loop.dispatch(lambda: self.child_exited(pid, status), us)
        if self.stopping:
            self._check_stopped()

    def unit_of_pid(self, pid: int) -> UnitState | None:
        """The unit a process we track belongs to (main, instance or left-over process)."""
        return self.pids.get(pid)

    def _forget_pid(self, pid: int) -> UnitState | None:
        us = self.pids.pop(pid, None)
        if us is not None:
            if us.main_pid == pid:
                us.main_pid = None
            us.instances.pop(pid, None)
            us.leftovers.discard(pid)
        return us

    def child_exited(self, pid: int, status: int) -> None:
        """A process of ours ended (reaped, or seen through a pidfd when it was not our child)."""
        us = self.pids.pop(pid, None)
        if us is None:
            return
        if pid == us.main_pid:
            self._main_exited(us, pid, status)
        elif pid in us.leftovers:
            us.leftovers.discard(pid)
        elif pid in us.jobs:
            self.jobs.exited(us, pid, status)
        else:
            self._instance_exited(us, pid, status)
        if not us.has_processes():
            self._unit_idle(us)
        if self.stopping:
            self._check_stopped()

    def _instance_exited(self, us: UnitState, pid: int, status: int) -> None:
        failed = self.host.exec_failure(pid, us.unit.service.argv[0])
        if failed is not None:
            us.stats.start_failures += 1
            us.executable = None  # look it up again next time: it may be installed by then
            self.log.error("start-failed", f"cannot start instance: {failed}", unit=us.name, pid=pid)
        self._uncount_source(us, us.instances.pop(pid, None))
        if self.log.enabled("debug"):
            how, _ = processes.describe_status(status)
            self.log.debug("exit", f"pid {pid} {how}", unit=us.name, pid=pid)

    def _main_exited(self, us: UnitState, pid: int, status: int) -> None:
        how, code = processes.describe_status(status)
        us.main_pid = None
        was_up, us.up = us.up, False
        if not was_up:
            self.jobs.went_down(us)  # the units that waited for it to come up
        us.stats.last_exit, us.stats.last_exit_code, us.stats.last_exit_time = how, code, time.time()
        us.stats.started_time = None
        if self._notify is not None:
            self._notify.exited(us)
        if self._proxy is not None:
            self._proxy.exited(us)
        self.log.info("exit", f"pid {pid} {how}", unit=us.name, pid=pid)
        self.publish("exited", us, pid=pid, status=code)
        self._collect_leftovers(us)
        if self.stopping or us.retired or us.failed:
            return
        if us.replaces is not None:
            self._graceful_failed(us, f"no READY=1 within {us.unit.service.timeout_start:g}s" if us.forced == "timeout"
                                  else f"the new daemon {how} before it was ready")
            return
        if us.successor is not None:  # its new daemon is starting: the unit carries on with it, or with
            us.exit_deferred = status  # this exit's consequences (restart=) should that one fail
            return
        self._after_exit(us, status)

    def _after_exit(self, us: UnitState, status: int) -> None:
        """What a main process's exit leads to: activator's exit (--exit-with-service), a restart=, or
        listening again."""
        code = processes.describe_status(status)[1]
        if self.exit_with_service and not us.restart_pending:  # a restart asked for (ctl, watch) is no exit
            self.stop(code)
            return
        svc = us.unit.service
        forced = us.forced if us.forced in ("timeout", "watchdog", "start-post") else None
        decided = 0 if svc.ignore_failure else status  # "-" on exec-start: any exit counts as success
        if not us.manual_stop and processes.should_restart(svc.restart, decided, forced, svc.success_exit_status,
                                                           svc.restart_prevent_exit_status,
                                                           svc.restart_force_exit_status):
            delay = us.unit.service.restart_sec
            self.log.info("restart", f"restarting in {delay:g}s (restart={us.unit.service.restart})", unit=us.name)
            cancel(us.restart_timer)
            us.restart_pending = True
            us.restart_timer = self.loop.call_later(delay, lambda: self._restart(us), us)
        else:
            self._arm(us)

    def _collect_leftovers(self, us: UnitState) -> None:
        """What the main process left behind is the unit's until it is gone, as in a systemd cgroup.

        Without cgroups they are found among our own children (the main process is gone, so
        its descendants were reparented to us, the subreaper) by their process group or by the
        unit's listening sockets they still hold. With kill-mode control-group or mixed they get
        the kill signal (SIGKILL for mixed) and SIGKILL after timeout-stop-sec; the unit is
        re-armed or restarted only once they are gone. kill-mode process and none leave them.
        """
        mode = us.unit.service.kill_mode
        if mode not in ("control-group", "mixed"):
            return
        inodes = {ss.inode for ss in us.sockets}
        found = set()
        for pid in self.host.children() - self.pids.keys():
            if self.host.pgid(pid) == us.main_pgid or inodes & self.host.socket_inodes(pid):
                found.add(pid)
        group_alive = bool(us.main_pgid) and self.host.group_alive(us.main_pgid or 0)
        if not found and not group_alive:
            return
        for pid in found:
            us.leftovers.add(pid)
            self.pids[pid] = us
        sig = signal.SIGKILL if mode == "mixed" else us.unit.service.kill_signal
        if group_alive and us.main_pgid:
            self.host.killpg(us.main_pgid, sig)
        if found:
            tree = self._tree()
            for pid in found:
                self.host.signal_tree(pid, sig, tree, pid)
            self.log.info("leftovers", f"{len(found)} process(es) left behind by the main process: "
                                       f"sent {signal.label(sig)}", unit=us.name)
            self._kill_after_timeout(us)

    def _restart(self, us: UnitState) -> None:
        us.restart_timer = None
        if us.main_pid is None and not self.stopping and not us.retired and not us.failed:
            if us.leftovers:
                return  # _unit_idle restarts it once they are gone
            us.stats.restarts += 1
            if not self._start(us) and not us.paused_until:
                us.restart_pending = False
                self._arm(us)

    def _unit_idle(self, us: UnitState) -> None:
        """The unit has no process left."""
        cancel(us.kill_timer)
        us.kill_timer = None
        if us.directories and not us.live_jobs:
            self._remove_runtime_directories(us)
        if us.retired and us in self.draining:
            self.draining.remove(us)
            self._close_unit(us, keep=self._sockets_in_use())
        if us.retired:
            for succ in [s for s in self.units.values() if s.waiting_for is us]:
                succ.waiting_for = self._blocker(succ)  # another donor of its sockets may still run
                if succ.waiting_for is None:
                    self.loop.dispatch(partial(self._activate, succ), succ)
        if self._proxy is not None:
            self._proxy.idle(us)  # connections waiting for a proxy unit's daemon
        if us.retired or us.failed or self.stopping:
            return
        if us.restart_pending and us.restart_timer is None and not us.paused_until:
            self._restart(us)  # it waited for left-over processes
        elif us.unit.accept and us.paused_until:
            # Out-of-descriptor pauses end when a connection ends.
            cancel(us.pause_timer)
            self._unpause(us)
        elif not us.unit.accept and not us.restart_pending:
            self._arm(us)

    def _remove_runtime_directories(self, us: UnitState) -> None:
        """The daemon stopped: its runtime directories go, unless runtime-directory-preserve keeps them (for
        good, or for a restart that is coming)."""
        preserve = us.unit.service.runtime_directory_preserve
        if preserve == "yes" or (preserve == "restart" and us.restart_pending):
            return
        if any(s is not us and s.name == us.name and s.has_processes() for s in self.states()):
            return  # another worker, or the other generation of a graceful restart, still runs in them
        for d in us.directories:
            if d.kind != "runtime":
                continue
            try:
                hidden = directories.retire(d.path)
                if hidden is not None:  # removed by a child of its own, which no unit tracks: we reap it
                    self.host.spawn(SpawnSpec(executable=sys.executable, argv=directories.remover_argv(hidden),
                                              env={}, stdin=self._devnull, new_session=False, new_group=True))
            except (OSError, SpawnError) as exc:
                self.log.warning("runtime-directory", f"cannot remove {d.path}: {exc}", unit=us.name)

    # ---------------------------------------------------------------- stopping
    def _tree(self) -> processes.Tree:
        """The process tree, or an empty one when /proc cannot be read (out of descriptors):
        a stop then still reaches every daemon through its process group and its pid."""
        try:
            return self.host.tree()
        except OSError as exc:
            self.log.warning("proc", f"cannot read /proc ({exc.strerror or exc}): signalling by process group only")
            return processes.EMPTY_TREE

    def _signal_unit(self, us: UnitState, sig: int, tree: processes.Tree | None = None) -> None:
        """One ``sig`` to each process of the unit that kill-mode says to reach."""
        mode = us.unit.service.kill_mode
        if mode == "none" or not us.has_processes():
            return
        whole_tree = mode == "control-group" or (mode == "mixed" and sig == signal.SIGKILL)
        if whole_tree and tree is None:
            tree = self._tree()  # one /proc read for all instances of the unit
        for pid in us.pids():
            if whole_tree:
                pgid = us.main_pgid if pid == us.main_pid and us.main_pgid else pid
                self.host.signal_tree(pid, sig, tree or processes.EMPTY_TREE, pgid)
            else:
                self.host.kill(pid, sig)
            if sig not in (signal.SIGKILL, signal.SIGCONT):
                self.host.kill(pid, signal.SIGCONT)  # a stopped daemon must see the signal now

    def stop_unit(self, us: UnitState, reason: str = "stop", sig: int | None = None,
                  tree: processes.Tree | None = None) -> None:
        """Ask the unit's processes to end (its kill signal, or ``sig``); SIGKILL what remains after
        timeout-stop-sec. ``reason`` is why ('stop', 'timeout', 'watchdog'): restart= reads it."""
        if not us.has_processes():
            return
        us.forced = reason
        self._signal_unit(us, sig if sig is not None else us.unit.service.kill_signal, tree)
        self._kill_after_timeout(us)
        self.publish("stopping", us, reason=reason)

    def _kill_after_timeout(self, us: UnitState) -> None:
        if us.kill_timer is not None and us.kill_timer.active:
            return  # the first deadline holds: asking again (WATCHDOG=trigger, ctl stop) must not postpone SIGKILL
        timeout = us.unit.service.timeout_stop
        us.kill_timer = None
        if timeout != float("inf"):
            us.kill_timer = self.loop.call_later(timeout, lambda: self._kill_unit(us), us)

    def _kill_unit(self, us: UnitState) -> None:
        us.kill_timer = None
        if us.has_processes():
            self.log.warning("kill", f"still running after {us.unit.service.timeout_stop:g}s, sending SIGKILL", unit=us.name)
            tree = self._tree()
            # A stop must end everything: after the timeout even kill-mode process reaches the whole tree.
            for pid in us.pids():
                pgid = us.main_pgid if pid == us.main_pid and us.main_pgid else pid
                self.host.signal_tree(pid, signal.SIGKILL, tree, pgid)

    def start_unit(self, us: UnitState) -> bool:
        """Start the daemon now (Accept=no), as a connection would; a failed unit is revived. False when
        it cannot start now (running, stopping, rate-limited, accept mode: the log says why)."""
        if us.unit.accept or self.stopping or us.retired or us.skipped or us.waiting_for is not None:
            return False  # waiting: it starts by itself once its previous generation has stopped
        if us.failed:
            us.failed = None
        us.held = False
        return self._start_group(us)  # with workers: those that do not run (scaled up, not restarted)

    def restart_unit(self, us: UnitState) -> None:
        """Stop the unit's processes; once they are gone start it again (Accept=no) or re-arm it. Every
        worker does so on its own; a graceful restart under way is ended (its new daemons stopped)."""
        self._abort_graceful(us, "a restart (stop first) was asked for")
        for w in us.group:
            self._restart_one(w)

    def _restart_one(self, us: UnitState) -> None:
        if us.failed:
            us.failed = None
        us.held = us.manual_stop = False
        if us.has_processes():
            us.restart_pending = not us.unit.accept
            self.stop_unit(us, "stop")
        elif us.waiting_for is not None:
            pass  # never two generations at once: it is activated once its previous one has stopped
        elif not us.unit.accept:
            self._start(us)
        else:
            self._arm(us)

    def arm_unit(self, us: UnitState) -> None:
        """Listen again for this unit (after a failure or a manual disarm)."""
        us.failed = None
        us.held = False
        self._arm(us)

    def halt_unit(self, us: UnitState, disarm: bool = False) -> None:
        """`ctl stop`: end the unit's processes with no restart= afterwards. Its sockets stay open and
        are listened on again once the processes are gone, or with ``disarm`` not until start_unit,
        restart_unit or arm_unit (connections wait in the backlog meanwhile)."""
        self._abort_graceful(us, "the unit was stopped")
        for w in us.group:
            w.held = disarm
            cancel(w.restart_timer)
            w.restart_timer = None
            w.restart_pending = False
            if disarm:
                self._disarm(w)
            if w.has_processes():
                w.manual_stop = True
                self.stop_unit(w, "stop")
        if not disarm and not any(w.has_processes() for w in us.group):
            self._arm(us)

    def disarm_unit(self, us: UnitState) -> None:
        self._disarm(us)

    def adopt_main_pid(self, us: UnitState, pid: int) -> bool:
        """MAINPID=: ``pid`` (a descendant of the current main process) becomes the unit's main process;
        the former one is still ours to reap and to stop."""
        old = us.main_pid
        if old is None or pid == old or pid <= 0:
            return False
        if pid not in self._tree().descendants({old}):
            return False
        us.instances[old] = None
        us.main_pid = pid
        self.pids[pid] = us
        return True

    def unit_ready(self, us: UnitState) -> None:
        """READY=1 from the unit's daemon."""
        self.publish("ready", us, pid=us.main_pid)
        if self._proxy is not None:
            self._proxy.ready(us)
        if us.unit.service.type == "notify" and not us.up and us.start_job is None:
            self._start_post(us)


    # ------------------------------------------------- workers and graceful restarts (docs/restarts.md)
    @staticmethod
    def _worker_field(us: UnitState) -> dict[str, Any]:
        """The ``worker`` field of a log line, for units with more than one worker."""
        current = us.replaces or us
        return {"fields": {"worker": us.worker}} if len(current.group) > 1 or us.worker else {}

    def _new_state(self, like: UnitState, unit: Unit, bound: list[BoundSocket], worker: int) -> UnitState:
        """Another state for ``unit`` on the same sockets: a worker, or the new daemon of a graceful restart."""
        state = self._plan_state(unit, bound)
        self._claim_sockets(state)
        state.worker = worker
        state.ordered_after = like.ordered_after  # (set by _link_order for the units in self.units)
        lead = like.leader or like
        state.leader = None if worker == 0 else lead
        if like.worker == worker:
            state.start_limit = like.start_limit  # each worker has its start limit; its new daemons count in it
        return state

    def _add_workers(self, lead: UnitState, count: int) -> list[UnitState]:
        """Workers up to ``count`` in all (not started here)."""
        added = []
        bound = [ss.bound for ss in lead.sockets]
        while 1 + len(lead.workers) < count:
            w = self._new_state(lead, lead.unit, bound, 1 + len(lead.workers))
            lead.workers.append(w)
            added.append(w)
        return added

    def scale_unit(self, us: UnitState, count: int) -> tuple[bool, str]:
        """`ctl scale`: run ``count`` workers. New ones start at once when the unit runs (else with the
        others, on the next connection); the highest-numbered ones go, with their kill signal."""
        lead = us.leader or us
        why = self._no_workers(lead)
        if why is not None:
            return False, why
        if not 1 <= count <= WORKERS_MAX:
            return False, f"the worker count must be 1..{WORKERS_MAX}"
        before = len(lead.group)
        if count > before and (lead.rolling or any(w.successor is not None for w in lead.group)):
            # a new worker would run the old generation's unit, which the roll has already passed
            return False, "a graceful restart is under way: scale up once it is done"
        if count > before and any(d.name == lead.name for d in self.draining):
            return False, "workers scaled away (or a previous generation) are still stopping: scale up once they are gone"
        if count > before:
            active = not lead.held and not lead.manual_stop and any(
                (w.main_pid is not None and w.forced != "stop") or w.start_job is not None for w in lead.group)
            for w in self._add_workers(lead, count):
                if active:
                    self._start(w)
        while len(lead.group) > count:
            self._remove_worker(lead, lead.workers[-1])
        self.log.info("scale", f"workers: {before} -> {count}", unit=lead.name, fields={"from": before, "to": count})
        self.publish("scaled", lead, workers=count, previous=before)
        return True, f"{before} -> {count} workers"

    def _no_workers(self, lead: UnitState) -> str | None:
        if lead.unit.accept or lead.unit.proxy:
            return "needs accept = false and no proxy-to (a daemon that gets the sockets)"
        if self.stopping or lead.retired:
            return "activator is stopping" if self.stopping else "the unit is being replaced"
        return None

    def _remove_worker(self, lead: UnitState, w: UnitState) -> None:
        rolling, target = lead.rolling, lead.target_workers
        replacing = w.successor is not None
        self._abort_graceful_of(w, "its worker was removed")
        lead.workers.remove(w)
        self._retire_state(w)
        if replacing and rolling:  # a graceful restart of the workers goes on with the next one
            lead.rolling, lead.target_workers = rolling, target
            self._graceful_next(lead)

    def _retire_state(self, us: UnitState, keep: set[int] | None = None) -> None:
        """One state ends: not started again, its processes stopped. Its sockets stay open (not watched)
        while its daemon drains: a later reload that adds the unit back, or gives its address to another
        unit, takes them instead of failing to bind beside it. Then they are closed but for ``keep`` (default:
        the sockets still in use)."""
        us.retired = True
        self._quiesce(us)
        self.stop_unit(us)
        if us.has_processes():
            self.draining.append(us)
        else:
            self._close_unit(us, keep=self._sockets_in_use() if keep is None else keep)

    def graceful_restart(self, us: UnitState) -> tuple[bool, str]:
        """Start a new daemon on the same sockets beside each running worker, one worker at a time; each
        old one is stopped once its new one is ready. (False, why) when refused."""
        lead = us.leader or us
        why = self._no_workers(lead)
        if why is not None:
            return False, why
        if lead.rolling or any(w.successor is not None for w in lead.group):
            return False, "a graceful restart is already under way"
        running = [w.worker for w in lead.group if w.main_pid is not None]
        if not running:
            self.restart_unit(lead)
            return True, "not running: started as a plain restart"
        lead.rolling = list(running)
        lead.stats.restarts += 1
        self._graceful_next(lead)
        return True, f"graceful restart of {len(running)} worker(s) under way"

    def _graceful_next(self, lead: UnitState, given: UnitState | None = None) -> None:
        """Replace the next worker of ``lead.rolling`` (``given``: the new daemon's state, made by a reload)."""
        while lead.rolling and not self.stopping:
            index = lead.rolling.pop(0)
            old = next((w for w in lead.group if w.worker == index), None)
            if old is None or (old.main_pid is None and given is None):
                continue  # removed by a scale, or stopped meanwhile: nothing to replace
            try:
                new = given or self._new_state(old, lead.unit, [ss.bound for ss in lead.sockets], index)
            except ValueError as exc:  # the user or group is gone since the unit was loaded
                self._graceful_log_failed(old, str(exc))
                lead.rolling = []
                return
            new.worker, new.replaces, old.successor = index, old, new
            if index:
                new.leader = lead
            self.log.info("graceful-start", f"graceful restart: starting a new daemon beside pid {old.main_pid}",
                          unit=old.name, pid=old.main_pid, fields={"worker": index, "old_pid": old.main_pid})
            self.publish("graceful-start", old, worker=index, old_pid=old.main_pid)
            if not self._start(new) and new.replaces is not None:
                self._graceful_failed(new, "cannot start now (start limit)" if new.paused_until else "cannot start")
            return
        if not lead.rolling and lead.target_workers and not self.stopping:
            count, lead.target_workers = lead.target_workers, 0
            if count != len(lead.group):
                self.scale_unit(lead, count)

    def _graceful_ready(self, new: UnitState) -> None:
        new.ready_timer = None
        if new.replaces is not None and new.main_pid is not None:
            self._graceful_done(new)

    def _graceful_done(self, new: UnitState) -> None:
        """The new daemon is ready: it takes the old one's place, which is stopped with its kill signal."""
        old = new.replaces
        assert old is not None
        new.replaces = old.successor = None
        if old.leader is None:  # worker 0: the unit's own state, with the group
            new.workers, old.workers = old.workers, []
            new.rolling, old.rolling = old.rolling, []
            new.target_workers, old.target_workers = old.target_workers, 0
            new.held = old.held
            for w in new.workers:
                w.leader = new
            if self.units.get(old.name) is old:
                self.units[old.name] = new
                self._sync_watches()  # its watches follow the unit's new state (and new watch-paths of a reload)
            lead = new
        else:
            lead = old.leader
            lead.workers[lead.workers.index(old)] = new
        old_pid = old.main_pid
        self.log.info("graceful-done", f"graceful restart: pid {new.main_pid} is ready, stopping pid {old_pid}",
                      unit=new.name, pid=new.main_pid, fields={"worker": new.worker, "old_pid": old_pid})
        self.publish("graceful-done", new, worker=new.worker, pid=new.main_pid, old_pid=old_pid)
        self._retire_state(old)
        if not old_pid:
            self._arm(lead)
        self._graceful_next(lead)

    def _graceful_failed(self, new: UnitState, reason: str, aborted: bool = False) -> None:
        """The new daemon did not become ready: it is stopped, the old one keeps serving. ``aborted``: ended
        by a stop or a restart asked for, which decide what comes next."""
        old = new.replaces
        assert old is not None
        new.replaces = old.successor = None
        lead = old.leader or old
        lead.rolling, lead.target_workers = [], 0
        self._graceful_log_failed(old, reason)
        self._retire_state(new)
        deferred, old.exit_deferred = old.exit_deferred, None
        if old.has_processes() or self.stopping:
            return
        if deferred is not None and not aborted:  # the old one ended during the overlap: its exit counts now
            self._after_exit(old, deferred)
        elif old.leader is None:
            self._arm(old)
        else:
            self._start(old)

    def _graceful_log_failed(self, old: UnitState, reason: str) -> None:
        self.log.error("graceful-failed", f"graceful restart failed: {reason}; pid {old.main_pid} keeps serving",
                       unit=old.name, pid=old.main_pid, fields={"worker": old.worker, "reason": reason})
        self.publish("graceful-failed", old, worker=old.worker, reason=reason, pid=old.main_pid)

    def _abort_graceful(self, us: UnitState, reason: str) -> None:
        """End a graceful restart under way for the unit: its new daemons are stopped, the old ones stay."""
        lead = us.leader or us
        lead.rolling, lead.target_workers = [], 0
        for w in lead.group:
            self._abort_graceful_of(w, reason)

    def _abort_graceful_of(self, w: UnitState, reason: str) -> None:
        if w.successor is not None:
            self._graceful_failed(w.successor, reason, aborted=True)

    def stop(self, exit_code: int = 0) -> None:
        """Stop everything; the loop ends once every process is gone."""
        if self.stopping:
            return
        self.stopping = True
        self.exit_code = exit_code
        self._close_watches()  # no restart for a change while everything stops
        every = self.states()  # the workers and the new daemons of a graceful restart too
        for us in every:
            self._disarm(us)
            cancel(us.restart_timer)
            cancel(us.pause_timer)
            cancel(us.ready_timer)
            self.jobs.abandon(us)
        tree = self._tree()  # read once for every unit: there may be thousands of processes
        for us in every:
            self.loop.dispatch(partial(self.stop_unit, us, tree=tree))
        # Orphans that no unit claims (double-forked away, reparented to us) are ended too.
        me = self.host.pid
        for pid, (ppid, _) in tree.table.items():
            if ppid == me and pid not in self.pids:
                self.host.kill(pid, signal.SIGTERM)
        longest = max([us.unit.service.timeout_stop for us in every] + [0.0])
        if longest != float("inf"):
            self.loop.call_later(longest, lambda: self._kill_everything(signal.SIGKILL))
        self._check_stopped()

    def _kill_everything(self, sig: int) -> None:
        tree = self._tree()
        for us in self.states():
            self._signal_unit(us, sig, tree)
        for pid in tree.descendants({self.host.pid}):
            self.host.kill(pid, sig)
        if sig == signal.SIGKILL:
            # Bounded: a process stuck in the kernel must not keep us alive for ever.
            self.loop.call_later(FINAL_GRACE, self._give_up)

    def _give_up(self) -> None:
        left = sorted(self.pids)
        self.log.error("stop", f"processes did not go away after SIGKILL: {left}")
        self.done = True

    def _check_stopped(self) -> None:
        if self.pids:
            return
        state = self.host.children_state()
        if state == "none":
            self.done = True
        elif state == "exited":
            self._reap()  # an exited orphan is waiting: reap it, and _reap checks again

    def _close_unit(self, us: UnitState, keep: set[int]) -> None:
        self._disarm(us)
        for ss in us.sockets:
            if id(ss.bound) in keep:
                continue
            ss.bound.close(remove_file=ss.bound.spec.remove_on_stop)

    def _close_all(self) -> None:
        steps: list[Callable[[], None]] = [partial(self._close_unit, us, set())
                                           for us in [*self.states(), *self.draining]]
        for step in [*steps, self._close_watches, self._close_proxy, self._close_notify,
                     self.loop.restore_signals]:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - every step runs: files must go even if one fails
                self.log.error("engine-fault", f"while closing: {exc!r}")
        self.log.info("stopped", f"stopped, exit status {self.exit_code}")

    # ---------------------------------------------------------------- reload
    def reload(self) -> ReloadResult:
        """Load the configuration again and apply it, all or nothing."""
        if self.stopping or self.reloader is None:
            return ReloadResult(False, errors=["activator is stopping"] if self.stopping else ["nothing to reload"])
        try:
            new_units = self.reloader()
        except Exception as exc:  # noqa: BLE001 - the loader reports user errors; keep running
            lines = getattr(exc, "messages", None) or [str(exc)]
            for line in lines:
                self.log.error("reload", f"reload failed, keeping the running configuration: {line}")
            return ReloadResult(False, errors=list(lines))
        if not new_units:
            # An empty or half-written file (an editor saving in place) must not stop every unit.
            line = "no units in the new configuration"
            self.log.error("reload", f"reload failed, keeping the running configuration: {line}")
            return ReloadResult(False, errors=[line])
        return self.apply(new_units)

    def apply(self, new_units: list[Unit]) -> ReloadResult:
        """Apply a new set of units, all or nothing: unchanged ones keep running with the very same
        sockets; a changed unit keeps every socket whose address and kind are the same (option
        changes are applied to it) and gets new ones bound for the rest. When anything fails
        (a bind, an unknown user), nothing changes and every error is reported."""
        result = ReloadResult(True)
        if self.stopping:
            return ReloadResult(False, errors=["activator is stopping"])
        old = self.units
        new_by_name = {u.name: u for u in new_units}
        keep_as_is = {u.name for u in new_units if u.name in old and _same_but_workers(old[u.name].unit, u)
                      and not old[u.name].failed and not old[u.name].skipped}  # a skipped unit's conditions are checked again
        # Sockets of units that change or go are a pool the new units take theirs from.
        retiring = [ss.bound for name, us in old.items() if name not in keep_as_is for ss in us.sockets]
        held = {id(ss.bound) for us in old.values() for ss in us.sockets}
        retiring += [ss.bound for us in self.draining for ss in us.sockets if id(ss.bound) not in held]
        retiring = list({id(b): b for b in retiring}.values())
        pool: dict[tuple, list[BoundSocket]] = {}
        for b in retiring:
            pool.setdefault(_socket_key(b.spec), []).append(b)
        plans: list[tuple[Unit, UnitState, list[BoundSocket]]] = []
        fresh: list[BoundSocket] = []
        errors: list[str] = []
        skipped: dict[str, tuple[str, bool]] = {}
        for unit in new_units:
            if unit.name in keep_as_is:
                continue
            bound: list[BoundSocket] = []
            ok = True
            why = _skip_reason(unit)
            if why is not None:
                skipped[unit.name] = why
            for spec in unit.sockets if why is None else ():
                candidates = pool.get(_socket_key(spec), [])
                kept = next((c for c in candidates if needs_new_socket(c, spec) is None), None)
                if kept is not None:
                    candidates.remove(kept)
                    b = kept
                else:
                    try:  # a unix path held by a retiring socket is taken over, and given back on failure
                        b = open_all([spec], replacing=retiring)[0]
                    except BindError as exc:
                        errors.extend(f"{unit.name}: {m}" for m in exc.messages)
                        ok = False
                        continue
                    fresh.append(b)
                bound.append(b)
            if not ok:
                continue
            try:
                state = self._plan_state(unit, bound)
            except ValueError as exc:
                errors.append(f"{unit.name}: {exc}")
                continue
            plans.append((unit, state, bound))
        if errors:
            for b in reversed(fresh):
                b.discard()
            for line in errors:
                self.log.error("reload", f"reload failed, keeping the running configuration: {line}")
            return ReloadResult(False, errors=errors)
        for b in fresh:
            b.commit()
        for name, us in old.items():
            if name not in keep_as_is:  # a graceful restart under way ends: the unit changes again, or goes
                self._abort_graceful(us, "the unit changed again (reload)")
        # Commit: nothing below can fail for a reason the user could fix.
        taken = {id(b) for _, _, bound in plans for b in bound}
        units: dict[str, UnitState] = {}
        rescale: list[UnitState] = []
        for name, us in old.items():
            if name in keep_as_is:
                units[name] = us
                if us.unit != new_by_name[name]:  # only workers changed: scale, do not restart
                    for w in us.group:
                        w.unit = new_by_name[name]
                    rescale.append(us)
                result.unchanged.append(name)
            elif name not in new_by_name:
                self._retire(us, taken)
                if self._notify is not None:
                    self._notify.drop_unit(name)
                result.removed.append(name)
        fresh_ids = {id(b) for b in fresh}
        graceful: list[tuple[UnitState, UnitState]] = []  # (running state, the new one that replaces it once ready)
        for unit, state, bound in plans:
            prev = old.get(unit.name)
            for b, spec in zip(bound, unit.sockets):
                if id(b) not in fresh_ids:
                    self._apply_live(state, b, spec)
            self._claim_sockets(state)
            units[unit.name] = state
            if prev is not None:
                result.changed.append(unit.name)
                if unit.name not in skipped and self._replaces_gracefully(prev, unit):
                    graceful.append((prev, state))
                    units[unit.name] = prev  # until its new daemon is ready
                else:
                    self._retire(prev, taken)
            else:
                result.added.append(unit.name)
            for b in bound:
                if id(b) in fresh_ids:
                    self.log.info("listen", f"listening on {b.spec.label}", unit=unit.name)
            if unit.name in skipped:
                self._skip(state, *skipped[unit.name])
        self.units = {u.name: units[u.name] for u in new_units}
        self._sync_watches()
        self._link_order()
        replacing = {id(state) for _, state in graceful}
        planned = [state for _, state, _ in plans if id(state) not in replacing]
        for state in planned:
            state.waiting_for = self._blocker(state)
            self._add_workers(state, state.unit.service.workers)
        for state in _in_start_order(planned):
            if state.waiting_for is None:
                self.loop.dispatch(partial(self._activate, state), state)
        for prev, state in graceful:
            state.ordered_after = prev.ordered_after  # prev is the one in self.units until the switch
            prev.rolling = [w.worker for w in prev.group if w.worker and w.main_pid is not None]
            prev.rolling.insert(0, 0)
            prev.target_workers = state.unit.service.workers
            self.loop.dispatch(partial(self._graceful_next, prev, state), prev)
        for us in rescale:
            self.loop.dispatch(partial(self.scale_unit, us, us.unit.service.workers), us)
        self.log.info("reload", f"reloaded: {len(result.unchanged)} unchanged, {len(result.changed)} changed, "
                                f"{len(result.added)} added, {len(result.removed)} removed")
        self.publish("reloaded", None, changed=result.changed, added=result.added, removed=result.removed)
        for name in result.unchanged if self.reload_daemons else ():  # as systemctl reload does
            self.loop.dispatch(partial(self.reload_unit, self.units[name]), self.units[name])
        return result

    def _blocker(self, state: UnitState) -> UnitState | None:
        """A retired generation still running that ``state`` must wait for: never two generations of a
        unit at once, nor two daemons on one socket (a unit renamed by a reload keeps its socket)."""
        mine = {id(ss.bound) for ss in state.sockets}
        for us in set(self.pids.values()):  # every unit with a process, retired ones included
            if us is not state and us.retired and (us.name == state.name or
                                                   any(id(ss.bound) in mine for ss in us.sockets)):
                return us
        return None

    def _apply_live(self, state: UnitState, b: BoundSocket, spec) -> None:
        """Options of a kept socket that changed (backlog, buffers, mode, ...) take effect now. A failure
        (a chown refused) leaves that socket as it was, says so, and the rest of the reload goes on."""
        if b.spec == spec:
            return
        try:
            apply_live_options(b, spec)
        except OSError as exc:
            self.log.warning("reload", f"cannot apply the new options of {spec.label}: {exc.strerror or exc}",
                             unit=state.name)

    def _retire(self, us: UnitState, keep: set[int]) -> None:
        """A unit removed or replaced by a reload: each of its workers ends (``keep``: the sockets taken by the
        new units)."""
        for w in us.group:
            self._retire_state(w, keep)

    @staticmethod
    def _replaces_gracefully(prev: UnitState, unit: Unit) -> bool:
        """Whether a reload replaces the running ``prev`` by ``unit`` with a graceful restart."""
        return unit.service.restart_style == "graceful" and not unit.accept and not unit.proxy and \
            not prev.unit.accept and not prev.unit.proxy and prev.main_pid is not None and not prev.retired

    def _sockets_in_use(self) -> set[int]:
        return {id(ss.bound) for us in [*self.states(), *self.draining] for ss in us.sockets}

    # ---------------------------------------------------------------- re-exec
    def reexec_busy(self) -> str | None:
        """What a re-exec cannot carry right now (it is refused, saying so), or None (docs/reexec.md)."""
        if self.stopping:
            return "activator is stopping"
        if self.draining:
            return f"unit {self.draining[0].name}: a previous generation is still stopping"
        for us in self.states():  # workers, and the new daemons of a graceful restart
            if us.live_jobs or us.jobs or us.start_job is not None or us.reload_job is not None \
                    or us.held_connections or us.waiters:
                return f"unit {us.name}: a start, exec-reload or control command is under way"
            if us.waiting_for is not None:
                return f"unit {us.name}: waiting for its previous generation to stop"
            if us.rolling or any(w.successor is not None for w in us.group):
                return f"unit {us.name}: a graceful restart is under way"
            if us.unit.proxy and (us.has_processes() or self.proxy.count(us)):
                return f"unit {us.name}: a proxy unit with a daemon or connections (not carried yet)"
        return None

    def configuration_changed(self) -> str | None:
        """Why the configuration on disk is not the running one (the new process loads it), or None."""
        if self.reloader is None:
            return None  # `run`: its units come from the command line, which the new process gets as it is
        try:
            loaded = self.reloader()
        except Exception as exc:  # noqa: BLE001 - the loader reports user errors
            lines = getattr(exc, "messages", None) or [str(exc)]
            return f"the configuration no longer loads ({lines[0]}): fix it first"
        if list(loaded) != [us.unit for us in self.units.values()]:
            return "the configuration files changed since they were loaded: `activator ctl reload` first"
        return None

    def export_state(self) -> tuple[dict[str, Any], list[int]]:
        """The engine's part of the re-exec state, and the descriptors it names; StateError for what has no
        faithful form (the re-exec is refused)."""
        units = []
        fds: list[int] = []
        skip = {**NOT_CARRIED, "stats": ""}
        for us in self.units.values():
            sockets = []
            for ss in us.sockets:
                sockets.append({"label": ss.bound.spec.label, "trigger": encode(ss.trigger, "trigger"),
                                **carry_socket(ss.bound)})
                fds.append(ss.bound.fileno())
            workers = [{"fields": encode_fields(w, f"{us.name}/{w.worker}", skip), "timers": _due_timers(w)}
                       for w in us.workers]  # they share the unit's sockets
            units.append({"name": us.name, "fields": encode_fields(us, us.name, skip), "sockets": sockets,
                          "timers": _due_timers(us), "workers": workers})
        stats = {name: encode(st, f"stats.{name}") for name, st in self.stats_by_name.items()}
        notify, more = self.notify.export_state()
        return {"units": units, "stats": stats, "exit_code": self.exit_code, "notify": notify}, fds + more

    def resume(self, state: dict[str, Any]) -> None:
        """Instead of open(): take over the sockets, processes, counters, limits and timers of ``state`` (a
        re-exec); StateError when it does not fit the units (the check before the exec says so first)."""
        from .sockets import adopt

        self._setup_signals()
        for name, data in state["stats"].items():
            self.stats_by_name[name] = decode_into(UnitStats(), data, f"stats.{name}")
        carried = {u["name"]: u for u in state["units"]}
        skip = {**NOT_CARRIED, "stats": ""}
        with self.log.hold():
            for unit in self._pending:
                entry = carried.get(unit.name)
                if entry is None or (entry["sockets"] and len(entry["sockets"]) != len(unit.sockets)):
                    raise StateError(f"{unit.name}: not in the state as configured")
                bound = [adopt(spec, s) for spec, s in zip(unit.sockets, entry["sockets"])]
                us = self._plan_state(unit, bound)
                self._claim_sockets(us)
                decode_fields(us, entry["fields"], unit.name, skip)
                for ss, s in zip(us.sockets, entry["sockets"]):
                    decode_into(ss.trigger, s["trigger"], f"{unit.name}.trigger")
                self.units[unit.name] = us
                self._resume_state(us, entry)
                for k, carried_worker in enumerate(entry.get("workers") or [], 1):
                    w = self._new_state(us, unit, bound, k)
                    us.workers.append(w)
                    decode_fields(w, carried_worker["fields"], f"{unit.name}/{k}", skip)
                    self._resume_state(w, carried_worker)
        self._pending = []
        self.notify.resume(state["notify"])
        self.exit_code = int(state.get("exit_code", 0))
        self.resumed = state

    def _resume_state(self, us: UnitState, entry: dict[str, Any]) -> None:
        """A carried unit's (or worker's) processes and timers, into the engine."""
        for pid in us.pids():
            self.pids[pid] = us
        timers = entry.get("timers", {})
        if "restart" in timers:
            us.restart_timer = self.loop.call_at(timers["restart"], partial(self._restart, us), us)
        if "kill" in timers:
            us.kill_timer = self.loop.call_at(timers["kill"], partial(self._kill_unit, us), us)
        if us.paused_until:
            us.pause_timer = self.loop.call_at(us.paused_until, partial(self._unpause, us), us)

    def _go_on(self) -> None:
        """The first steps of a resumed engine: signals from the exec window, exits during it, listening."""
        from .reexec import unblock_signals

        unblock_signals()
        self._reap()  # daemons that ended while no one was there to reap them
        self._sync_watches()  # inotify watches are not carried: made again (a change during the exec is missed)
        for us in self.units.values():
            if not us.restart_pending:
                self.loop.dispatch(partial(self._arm, us), us)
        carried = self.resumed or {}
        pause = time.monotonic() - float(carried.get("saved_monotonic") or time.monotonic())
        self.log.info("reexec-done", f"took over {len(self.units)} unit(s), {len(self.pids)} process(es), "
                                     f"{sum(len(us.sockets) for us in self.units.values())} socket(s); "
                                     f"{pause * 1000:.0f} ms without an activator "
                                     f"(re-exec #{carried.get('reexecs')}, from activator "
                                     f"{carried.get('activator_version')})")
        self.publish("reexec-done", None, units=len(self.units), pids=sorted(self.pids),
                     reexecs=carried.get("reexecs"), pause=round(pause, 3))


def _due_timers(us: UnitState) -> dict[str, float]:
    """The pending restart and kill timers of ``us``, by their due (monotonic) time, for a re-exec."""
    return {name: handle.when for name, handle in (("restart", us.restart_timer), ("kill", us.kill_timer))
            if handle is not None and handle.active}


def _in_start_order(states: list[UnitState]) -> list[UnitState]:
    """``states`` with each unit after those it is ordered after, otherwise in the order given (a cycle
    is refused when the units are loaded; what is left of one would come last, as given)."""
    names = {us.name for us in states}
    order: list[UnitState] = []
    placed: set[str] = set()
    while len(order) < len(states):
        ready = [us for us in states if us.name not in placed and
                 all(dep in placed or dep not in names for dep in us.ordered_after)]
        for us in ready or [us for us in states if us.name not in placed]:
            order.append(us)
            placed.add(us.name)
    return order


def _skip_reason(unit: Unit) -> tuple[str, bool] | None:
    """(what does not hold, whether it is an assertion) when the unit must not start now, else None."""
    found = conditions.check(unit.conditions)
    if found is None:
        return None
    condition, assertion = found
    return f"{condition} does not hold", assertion


def _expanded(command: Command, env: dict[str, str]) -> list[str]:
    """The command's argv with its $VARs replaced from ``env``, as systemd does when a command starts."""
    if not command.expand_environment:
        return list(command.argv)
    from .unitfile import expand_argv  # only for commands that ask for it: the module is large

    return expand_argv(command.argv, env) or [command.executable]


def _same_but_workers(old: Unit, new: Unit) -> bool:
    """Whether two units differ at most in their worker count (a reload then scales, without a restart)."""
    return old == new or old == replace(new, service=replace(new.service, workers=old.service.workers))


def _socket_key(spec) -> tuple:
    """What a kept socket must share with its new spec: the same address (or inherited fd) and type."""
    return (spec.address.text if spec.address is not None else None, spec.inherited_fd, spec.type)
