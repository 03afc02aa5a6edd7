"""What runs around a daemon: its control commands, and the waits of a start for the units it is ordered after.

A :class:`Job` is the commands of one step of a unit's life, run one after the other:
before a start (exec-condition, then exec-start-pre), once the daemon is up (exec-start-post),
to reload it (exec-reload). Each command is a child process of the engine, started like
the daemon (its user, directory, limits); its exit comes with SIGCHLD like any other, so
the loop never waits for one. A job fails at the first command that fails (unless it is
marked ignore-failure); an exec-condition that exits 1 to 254 skips the start instead; a
job that is still running after timeout-start-sec is killed (SIGKILL) and fails.

A start job may first wait for units it is ordered after (``after``/``before``) that are
starting too: it goes on once each of them is up, and fails when one it requires does not
come up. In accept mode a start job is one connection's: it holds a copy of the connection
until its instance starts.

:class:`JobRunner` drives jobs through the engine (its spawn, its pid table, its log); what
happens once a job ends is the ``done`` callback the engine gave it.
"""
from __future__ import annotations

import os
from . import signalapi as signal
from functools import partial

from .records import dataclass, field
from .loop import TimerHandle, cancel
from .processes import EMPTY_TREE, describe_status
from .spawn import SpawnError
from .units import Command

TYPE_CHECKING = False  # typing is not imported at run time (start-up, memory); type checkers see it
if TYPE_CHECKING:
    from typing import Any, Callable

if TYPE_CHECKING:  # the engine's types; it imports this module
    from .supervisor import Engine, UnitState


@dataclass(eq=False)
class Job:
    kind: str  # "start", "post" or "reload"
    commands: list[tuple[str, Command]]  # (the key that gave it, the command), in the order they run
    done: Callable[["Job", str | None, str | None], None]  # (job, why it failed, why it skipped the start)
    main_pid: int | None = None  # $MAINPID of its commands
    conn: int | None = None  # accept mode: a copy of the connection, until its instance starts
    socket_name: str = "connection"
    peer: tuple[str | None, str | None] = (None, None)  # the address and port of the connection
    waiting: set[Any] = field(default_factory=set)  # the units (UnitState) it waits for
    index: int = 0  # the command that runs (or runs next)
    pid: int | None = None
    timer: TimerHandle | None = None
    timed_out: bool = False
    ended: bool = False
    abandoned: bool = False  # ended because the unit (or activator) stops: what it led to is not wanted

    @property
    def current(self) -> tuple[str, Command]:
        return self.commands[self.index]


class JobRunner:
    def __init__(self, engine: "Engine") -> None:
        self.engine = engine

    @property
    def log(self):
        return self.engine.log

    def run(self, us: "UnitState", job: Job, wait_for: tuple["UnitState", ...] = ()) -> None:
        """Start ``job`` (after the units in ``wait_for`` are up); its ``done`` is called once, when it ends."""
        us.live_jobs.append(job)
        timeout = us.unit.service.timeout_start
        if timeout != float("inf"):
            job.timer = self.engine.loop.call_later(timeout, partial(self._timeout, us, job), us)
        for dep in wait_for:
            job.waiting.add(dep)
            dep.waiters.append((us, job))
        self._advance(us, job)

    def _advance(self, us: "UnitState", job: Job) -> None:
        """Start the job's next command, or end it when none is left."""
        if job.ended or job.waiting:
            return
        if self.engine.abandoned(us, job):
            self._end(us, job, "stopped", abandoned=True)
            return
        while job.index < len(job.commands):
            key, command = job.current
            try:
                pid = self.engine.spawn_command(us, command, job.main_pid)
            except SpawnError as exc:
                if not command.ignore_failure:
                    self._end(us, job, f"{key}: {exc}")
                    return
                self.log.warning("exec-failed", f"{key}: {exc} (ignore-failure: going on)", unit=us.name)
                job.index += 1
                continue
            job.pid = pid
            us.jobs[pid] = job
            self.engine.pids[pid] = us
            self.log.debug("exec", f"{key}: started {command.executable} as pid {pid}", unit=us.name, pid=pid)
            return
        self._end(us, job, None)

    def exited(self, us: "UnitState", pid: int, status: int) -> None:
        """A command of one of the unit's jobs exited (the engine took it out of its pid table)."""
        job = us.jobs.pop(pid, None)
        if job is None or job.ended:
            return
        job.pid = None
        key, command = job.current
        how, code = describe_status(status)
        if job.timed_out:
            self._end(us, job, f"{key}: {command.executable} did not finish within "
                               f"{us.unit.service.timeout_start:g}s (timeout-start-sec): killed")
        elif self.engine.abandoned(us, job):
            self._end(us, job, "stopped", abandoned=True)
        elif key == "exec-condition" and os.WIFEXITED(status) and 0 < code < 255:
            self._end(us, job, None, skipped=f"exec-condition {command.executable} {how}")
        elif status != 0 and not command.ignore_failure:
            self._end(us, job, f"{key}: {command.executable} {how}")
        else:
            if status != 0:
                self.log.info("exec", f"{key}: {command.executable} {how} (ignore-failure: going on)", unit=us.name)
            job.index += 1
            self._advance(us, job)

    def abandon(self, us: "UnitState") -> None:
        """The unit stops: its jobs that wait (no command running) end now; the others end when their command,
        which the stop signals, exits."""
        for job in list(us.live_jobs):
            if job.pid is None:
                self._end(us, job, "stopped", abandoned=True)

    def _end(self, us: "UnitState", job: Job, error: str | None, skipped: str | None = None,
             abandoned: bool = False) -> None:
        if job.ended:
            return
        job.ended = True
        job.abandoned = abandoned
        cancel(job.timer)
        job.timer = None
        us.live_jobs.remove(job)
        for dep in job.waiting:
            dep.waiters = [(u, j) for u, j in dep.waiters if j is not job]
        job.waiting.clear()
        job.done(job, error, skipped)

    def _timeout(self, us: "UnitState", job: Job) -> None:
        job.timer = None
        if job.ended:
            return
        timeout = us.unit.service.timeout_start
        if job.pid is None:
            names = ", ".join(sorted(dep.name for dep in job.waiting))
            self._end(us, job, f"not up within {timeout:g}s (timeout-start-sec): waited for {names}")
            return
        job.timed_out = True
        key, command = job.current
        self.log.warning("exec-timeout", f"{key}: {command.executable} still running after {timeout:g}s, "
                                         "sending SIGKILL", unit=us.name, pid=job.pid)
        # Each command is a process group of its own: killing the group needs no walk of /proc.
        self.engine.host.signal_tree(job.pid, signal.SIGKILL, EMPTY_TREE, job.pid)

    # ------------------------------------------------------------ ordering among units
    def became_up(self, dep: "UnitState") -> None:
        """``dep``'s daemon is up: the starts that waited for it go on."""
        waiters, dep.waiters = dep.waiters, []
        for us, job in waiters:
            job.waiting.discard(dep)
            self.engine.loop.dispatch(partial(self._advance, us, job), us)

    def went_down(self, dep: "UnitState") -> None:
        """``dep`` did not come up (its start failed, or its daemon exited first): the starts that require it
        fail, the others go on."""
        waiters, dep.waiters = dep.waiters, []
        for us, job in waiters:
            job.waiting.discard(dep)
            if dep.name in us.unit.requires:
                self.engine.loop.dispatch(partial(self._end, us, job, f"required unit {dep.name} did not start"), us)
            else:
                self.engine.loop.dispatch(partial(self._advance, us, job), us)
