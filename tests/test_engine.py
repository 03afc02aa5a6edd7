"""The engine's state machine, in-process: a fake host (no process is started or signalled) and a fake clock.

Real listening sockets on loopback trigger activations; everything about processes
(spawn, signals, exits, the process tree) goes through FakeHost, so each test runs
in milliseconds and asserts exactly which signals went where.
"""
from __future__ import annotations

import signal
import socket

import pytest

from activator import processes
from activator.addresses import parse_address
from activator.log import Log
from activator.loop import Loop
from activator.spawn import SpawnError
from activator.supervisor import Engine, Host
from activator.units import BindSpec, ServiceSpec, Unit

from conftest import free_port

FIRST_PID = 5_000_000  # above any real pid_max: nothing here can ever signal a real process


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeHost(Host):
    def __init__(self) -> None:
        self.next_pid = FIRST_PID
        self.spawned: list[int] = []
        self.signals: list[tuple[str, int, int]] = []  # (how, target, signal)
        self.exited: list[tuple[int, int]] = []
        self.table: dict[int, tuple[int, int]] = {}
        self.fail_spawn: Exception | None = None

    def spawn(self, spec):
        if self.fail_spawn is not None:
            raise self.fail_spawn
        pid = self.next_pid
        self.next_pid += 1
        self.spawned.append(pid)
        self.table[pid] = (self.pid, pid)
        return pid

    start = spawn  # per-connection starts: the same bookkeeping here

    def exec_failure(self, pid, name):
        return None

    def kill(self, pid, sig):
        self.signals.append(("kill", pid, sig))

    def killpg(self, pgid, sig):
        self.signals.append(("killpg", pgid, sig))

    def signal_tree(self, root, sig, tree, pgid):
        self.signals.append(("tree", root, sig))

    def tree(self):
        return processes.Tree(dict(self.table))

    def reap(self):
        done, self.exited = self.exited, []
        for pid, _ in done:
            self.table.pop(pid, None)
        return done

    def children_state(self):
        return "running" if self.table else "none"

    def socket_inodes(self, pid):
        return set()

    def children(self):
        return {pid for pid, (ppid, _) in self.table.items() if ppid == self.pid}

    def pgid(self, pid):
        entry = self.table.get(pid)
        return entry[1] if entry else None

    def group_alive(self, pgid):
        return any(g == pgid for _, g in self.table.values())

    @property
    def pid(self):
        return 4_999_999

    def exit(self, pid, code=0):
        self.exited.append((pid, code << 8))

    def sent(self, sig):
        return [(how, target) for how, target, s in self.signals if s == sig]


class Harness:
    def __init__(self, units, reloader=None, host=None):
        self.clock = Clock()
        self.host = host or FakeHost()
        self.loop = Loop(clock=self.clock)
        self.events: list[dict] = []
        self.engine = Engine(units, Log(stream=open("/dev/null", "w")), host=self.host, loop=self.loop,
                             reloader=reloader)
        self.engine.listeners.append(self.events.append)
        self.engine.open()
        for us in self.engine.units.values():
            self.engine._activate(us)

    def unit(self, name="u"):
        return self.engine.units[name]

    def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        self.loop.run_timers()

    def poll(self) -> None:
        self.loop.run_once(timeout=0)

    def reap(self, pid, code=0) -> None:
        self.host.exit(pid, code)
        self.engine.handle_signals([signal.SIGCHLD])

    def event_names(self, unit="u"):
        return [e["event"] for e in self.events if e["unit"] == unit]

    def close(self):
        self.engine.units.clear()
        self.engine._close_all()


def make_unit(name="u", port=None, **service) -> Unit:
    port = port or free_port()
    spec = BindSpec(parse_address(f"127.0.0.1:{port}"))
    svc = ServiceSpec(argv=["/bin/true"], **service)
    return Unit(name=name, sockets=[spec], service=svc)


def trigger(h: Harness, name="u") -> None:
    sock = h.unit(name).sockets[0].bound.sock
    c = socket.create_connection(sock.getsockname()[:2], timeout=5)
    c.close()
    h.poll()


@pytest.fixture
def harness():
    made = []

    def make(units, **kw):
        h = Harness(units, **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def test_first_connection_starts_the_daemon_and_disarms(harness):
    h = harness([make_unit()])
    assert h.unit().state == "listening"
    trigger(h)
    assert h.host.spawned == [FIRST_PID]
    assert h.unit().state == "running" and not h.unit().armed
    h.reap(FIRST_PID)
    assert h.unit().state == "listening"
    assert h.event_names() == ["started", "exited"]


def test_start_limit_pauses_then_resumes_without_a_busy_loop(harness):
    h = harness([make_unit(start_limit_burst=2, start_limit_interval=10.0)])
    for _ in range(2):
        trigger(h)
        h.reap(h.host.spawned[-1])
    trigger(h)
    assert len(h.host.spawned) == 2
    assert h.unit().state == "paused" and "paused" in h.event_names()
    h.advance(10.0)
    assert h.unit().state == "listening"


def test_restart_always_after_a_start_limit_pause_restarts_without_a_connection(harness):
    # --now --restart always: the daemon is owed a start after the pause, not just a listening socket.
    unit = make_unit(restart="always", restart_sec=0.0, start_limit_burst=3, start_limit_interval=5.0)
    unit.start_now = True
    h = harness([unit])
    for _ in range(3):
        h.reap(h.host.spawned[-1], code=1)
        h.advance(0.0)
    assert len(h.host.spawned) == 3 and h.unit().state == "paused"
    h.advance(5.0)
    assert len(h.host.spawned) == 4, "restarted when the pause ended, with no client"


def test_stop_sends_one_kill_signal_per_process_then_sigkill_after_the_timeout(harness):
    h = harness([make_unit(timeout_stop=3.0, kill_signal=signal.SIGINT)])
    trigger(h)
    h.engine.stop(0)
    assert h.host.sent(signal.SIGINT) == [("tree", FIRST_PID)]
    h.advance(2.9)
    assert not h.host.sent(signal.SIGKILL)
    h.advance(0.2)
    assert ("tree", FIRST_PID) in h.host.sent(signal.SIGKILL)
    h.reap(FIRST_PID)
    assert h.engine.done


def test_second_stop_signal_in_the_same_batch_kills_at_once(harness):
    h = harness([make_unit(timeout_stop=60.0)])
    trigger(h)
    h.engine.handle_signals([signal.SIGTERM, signal.SIGTERM])
    assert h.host.sent(signal.SIGKILL), "the second SIGTERM must not be merged into the first"


def test_sighup_after_sigterm_in_the_same_batch_does_not_reload(harness):
    calls = []
    h = harness([make_unit()], reloader=lambda: calls.append(1) or [])
    h.engine.handle_signals([signal.SIGTERM, signal.SIGHUP])
    assert calls == [] and h.engine.stopping


def test_reloads_in_a_row_never_run_two_generations(harness):
    port = free_port()
    current = [make_unit(port=port, kill_signal=signal.SIGTERM)]
    h = harness(list(current), reloader=lambda: list(current))
    trigger(h)
    first = FIRST_PID
    for i in range(5):  # each reload changes the unit while the first daemon still drains
        current[:] = [make_unit(port=port, environment={"GEN": str(i)})]
        h.engine.handle_signals([signal.SIGHUP])
        assert h.unit().state == "waiting"
        trigger(h)
        assert h.host.spawned == [first], "a new generation started while the old one runs"
        assert h.engine.start_unit(h.unit()) is False  # ctl start neither
        h.engine.restart_unit(h.unit())  # nor ctl restart
        assert h.host.spawned == [first] and h.unit().state == "waiting"
    h.reap(first)
    assert h.unit().state == "listening"
    trigger(h)
    assert len(h.host.spawned) == 2


def test_reload_is_all_or_nothing(harness):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    try:
        good, new_port = make_unit("good"), free_port()
        h = harness([good], reloader=lambda: [good, make_unit("new", port=new_port), make_unit("bad", port=busy)])
        result = h.engine.reload()
        assert not result.ok and any("bad" in e for e in result.errors)
        assert set(h.engine.units) == {"good"}, "a failed reload must change nothing"
        with pytest.raises(ConnectionRefusedError):  # the new unit's socket was not left bound
            socket.create_connection(("127.0.0.1", new_port), timeout=1)
    finally:
        taken.close()


def test_a_fault_in_one_unit_fails_it_and_the_others_carry_on(harness):
    h = harness([make_unit("a"), make_unit("b")])
    h.host.fail_spawn = RuntimeError("boom")
    trigger(h, "a")
    assert h.unit("a").state == "failed"
    assert any(e["event"] == "failed" for e in h.events)
    h.host.fail_spawn = None
    trigger(h, "b")
    assert h.unit("b").state == "running" and not h.engine.stopping
    h.engine.start_unit(h.unit("a"))  # a failed unit can be started again by hand
    assert h.unit("a").state == "running"


def test_a_fault_outside_any_unit_stops_everything_with_exit_1(harness):
    h = harness([make_unit()])
    trigger(h)
    h.loop.call_later(0.0, lambda: 1 / 0)
    h.advance(0.0)
    assert h.engine.stopping and h.engine.exit_code == 1
    assert h.host.sent(signal.SIGTERM)


def test_a_spawn_error_is_a_start_failure_not_a_fault(harness):
    h = harness([make_unit()])
    h.host.fail_spawn = SpawnError("/bin/true: command not found")
    trigger(h)
    assert h.unit().state == "listening" and h.unit().stats.start_failures == 1


def test_leftover_processes_are_stopped_before_the_unit_is_armed_again(harness):
    h = harness([make_unit(timeout_stop=2.0)])
    trigger(h)
    child = FIRST_PID + 100
    h.host.table[child] = (h.host.pid, FIRST_PID)  # reparented to us, still in the daemon's group
    h.reap(FIRST_PID)
    us = h.unit()
    assert child in us.leftovers and us.state == "running" and not us.armed
    assert ("killpg", FIRST_PID) in h.host.sent(signal.SIGTERM)
    h.advance(2.0)
    assert ("tree", child) in h.host.sent(signal.SIGKILL)
    h.reap(child)
    assert us.state == "listening"


def test_kill_mode_process_leaves_the_rest_and_rearms(harness):
    h = harness([make_unit(kill_mode="process")])
    trigger(h)
    h.host.table[FIRST_PID + 1] = (h.host.pid, FIRST_PID)
    h.reap(FIRST_PID)
    assert h.unit().state == "listening" and not h.host.signals


def test_huge_timers_do_not_overflow_the_loop(harness):
    h = harness([make_unit(timeout_stop=30 * 86400.0)])
    trigger(h)
    h.engine.stop(0)
    assert 0 < h.loop.timeout() <= (2**31 - 1) / 1000


def resumed(h: Harness, units) -> Harness:
    """``h``'s state through a re-exec's JSON into a new engine on a new loop (same host and clock), as
    the new process does; the sockets change hands (the old engine lets go of them)."""
    import json

    state, _ = h.engine.export_state()
    state = json.loads(json.dumps(state))
    for us in h.engine.units.values():
        for ss in us.sockets:
            h.loop.remove(ss.bound.sock)
            ss.bound.sock.detach()
    h.engine.units.clear()
    # The notify sockets change hands too: left to the old engine's objects, the collector would close
    # their descriptors whenever it frees them, by then another test's pipes or sockets (EBADF there).
    for notify in h.engine.notify.sockets.values():
        h.loop.remove(notify.sock)
        notify.sock.detach()
    h.engine.notify.sockets.clear()
    new = Harness.__new__(Harness)
    new.clock, new.host, new.events = h.clock, h.host, []
    new.loop = Loop(clock=new.clock)
    new.engine = Engine(units, Log(stream=open("/dev/null", "w")), host=new.host, loop=new.loop)
    new.engine.listeners.append(new.events.append)
    new.engine.resume(state)
    new.engine._link_order()
    new.engine._go_on()
    return new


def test_a_reexec_carries_pids_counters_limits_and_timers(harness):
    """Through the state a re-exec hands over: a restart due in 5 s fires 5 s after the first exit, a running
    daemon is still the unit's (its exit is handled), a pause by the start limit ends when it would have."""
    restarting = make_unit("r", restart="always", restart_sec=5.0)
    running = make_unit("run")
    paused = make_unit("p", start_limit_burst=1, start_limit_interval=30.0)
    h = harness([restarting, running, paused])
    trigger(h, "r")
    first = h.host.spawned[-1]
    h.reap(first, code=1)
    trigger(h, "run")
    daemon = h.host.spawned[-1]
    trigger(h, "p")
    h.reap(h.host.spawned[-1])
    trigger(h, "p")
    assert h.unit("p").state == "paused" and h.unit("r").restart_pending
    h.advance(2.0)
    new = resumed(h, [restarting, running, paused])
    try:
        check_resumed(new, daemon)
    finally:
        new.close()


def check_resumed(new: Harness, daemon: int) -> None:
    r, run, p = (new.engine.units[name] for name in ("r", "run", "p"))
    assert r.stats.starts == 1 and r.stats.last_exit_code == 1 and r.restart_pending
    assert run.main_pid == daemon and new.engine.unit_of_pid(daemon) is run and run.state == "running"
    assert p.state == "paused" and p.start_limit.count == 1
    spawned = len(new.host.spawned)
    new.advance(2.9)
    assert len(new.host.spawned) == spawned, "the restart is due 5 s after the exit, not 5 s after the re-exec"
    new.advance(0.2)
    assert len(new.host.spawned) == spawned + 1 and r.stats.restarts == 1
    new.host.exit(daemon)
    new.engine.handle_signals([signal.SIGCHLD])
    assert run.main_pid is None and run.stats.last_exit_code == 0 and run.state == "listening"
    new.advance(26.0)
    assert p.state == "listening", "the pause ends 30 s after it began"
