"""Graceful restarts and workers (docs/restarts.md).

In-process engine tests with the FakeHost of tests/test_engine.py for the state machine
(overlap, readiness, failure, stop during the overlap, scale), then real `activator serve`
runs under activator.loadgen.ClientLoad: no connection refused or failed across a graceful
restart of a Python notify daemon and of nbdkit, a scale 2 -> 4 -> 1, and a failed graceful
restart.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from activator.loadgen import ClientLoad
from activator.units import ServiceSpec

from conftest import connect, free_port, json_events, pid_alive, wait_for
from test_engine import FIRST_PID, FakeHost, Harness, harness, make_unit, trigger  # noqa: F401 (harness)

PY = sys.executable
DAEMONS = Path(__file__).parent / "daemons"
GENERATION = DAEMONS / "generation.py"


# ------------------------------------------------------------------ in-process: the state machine
class EnvHost(FakeHost):
    """FakeHost that keeps each spawned daemon's environment."""

    def __init__(self) -> None:
        super().__init__()
        self.envs: dict[int, dict[str, str]] = {}

    def spawn(self, spec):
        pid = super().spawn(spec)
        env = spec.env if isinstance(spec.env, dict) else dict(e.decode().split("=", 1) for e in spec.env)
        self.envs[pid] = env
        return pid

    start = spawn


def running(h: Harness, name="u") -> list[int]:
    """Every main pid of the unit: its workers' and the new daemons of a graceful restart."""
    return sorted(s.main_pid for s in h.engine.states() if s.name == name and s.main_pid)


def ready(h: Harness, us) -> None:
    """What the notify hub does on READY=1 from the daemon of ``us`` (no real datagram: the pids are fake)."""
    h.engine.notify.runs[id(us)].ready = True
    h.engine.unit_ready(us)


def terms(h: Harness) -> list[int]:
    return [target for _, target in h.host.sent(signal.SIGTERM)]


def test_graceful_restart_overlaps_until_ready_then_stops_the_old_one(harness):
    h = harness([make_unit(type="notify")], host=EnvHost())
    trigger(h)
    old = h.unit()
    old_pid = old.main_pid
    ready(h, old)
    assert h.engine.graceful_restart(old) == (True, "graceful restart of 1 worker(s) under way")
    new = old.successor
    assert new is not None and new.main_pid == FIRST_PID + 1
    assert running(h) == [old_pid, new.main_pid] and terms(h) == []  # both run: the overlap
    assert h.unit() is old and not h.unit().armed
    again = h.engine.graceful_restart(old)
    assert again == (False, "a graceful restart is already under way")
    ready(h, new)
    assert terms(h) == [old_pid] and h.unit() is new  # the old one gets its kill signal once the new one is ready
    h.reap(old_pid)
    assert running(h) == [new.main_pid] and h.unit().state == "running" and not h.unit().armed
    assert [e["event"] for e in h.events if e["event"].startswith("graceful")] == ["graceful-start", "graceful-done"]


def test_graceful_restart_of_a_simple_daemon_waits_graceful_ready_sec(harness):
    h = harness([make_unit(graceful_ready_sec=2.0)], host=EnvHost())
    trigger(h)
    old_pid = h.unit().main_pid
    h.engine.graceful_restart(h.unit())
    h.advance(1.9)
    assert terms(h) == [] and len(running(h)) == 2
    h.advance(0.2)
    assert terms(h) == [old_pid]


@pytest.mark.parametrize("how", ["exits", "timeout", "spawn-error"])
def test_failed_graceful_restart_leaves_the_old_daemon_serving(harness, how):
    h = harness([make_unit(type="notify", timeout_start=5.0)], host=EnvHost())
    trigger(h)
    old = h.unit()
    old_pid = old.main_pid
    ready(h, old)
    if how == "spawn-error":
        from activator.spawn import SpawnError
        h.host.fail_spawn = SpawnError("no such file: /bin/true")
    h.engine.graceful_restart(old)
    if how == "exits":
        h.reap(old.successor.main_pid, code=1)
    elif how == "timeout":
        new_pid = old.successor.main_pid
        h.advance(5.0)
        assert terms(h) == [new_pid]  # only the new one is stopped
        h.reap(new_pid)
    failed = [e for e in h.events if e["event"] == "graceful-failed"]
    assert len(failed) == 1 and old_pid not in terms(h)
    reason = failed[0]["reason"]
    assert {"exits": "exited with status 1", "timeout": "no READY=1 within 5s",
            "spawn-error": "cannot start"}[how] in reason, reason
    assert h.unit() is old and old.successor is None and running(h) == [old_pid]
    # the next graceful restart is possible
    h.host.fail_spawn = None
    assert h.engine.graceful_restart(old)[0]


def test_stop_during_the_overlap_stops_both_generations(harness):
    h = harness([make_unit(type="notify")], host=EnvHost())
    trigger(h)
    old = h.unit()
    h.engine.graceful_restart(old)
    both = running(h)
    h.engine.stop(0)
    assert sorted(terms(h)) == both
    for pid in both:
        h.reap(pid)
    assert h.engine.done


def test_old_daemon_exiting_during_the_overlap_is_not_restarted(harness):
    h = harness([make_unit(type="notify", restart="always", restart_sec=0.0)], host=EnvHost())
    trigger(h)
    old = h.unit()
    h.engine.graceful_restart(old)
    new = old.successor
    h.reap(old.main_pid, code=1)
    h.advance(1.0)
    assert running(h) == [new.main_pid] and len(h.host.spawned) == 2
    ready(h, new)
    assert h.unit() is new and running(h) == [new.main_pid]


def test_workers_start_together_each_with_its_index_and_restart_on_their_own(harness):
    h = harness([make_unit(workers=3, restart="always", restart_sec=0.0)], host=EnvHost())
    trigger(h)
    pids = running(h)
    assert len(pids) == 3
    assert [h.host.envs[p]["ACTIVATOR_WORKER"] for p in pids] == ["0", "1", "2"]
    assert [h.engine.unit_of_pid(p).worker for p in pids] == [0, 1, 2]
    h.reap(pids[1], code=1)  # worker 1 alone is restarted
    h.advance(0.0)
    after = running(h)
    assert len(after) == 3 and pids[0] in after and pids[2] in after and pids[1] not in after
    assert h.host.envs[max(after)]["ACTIVATOR_WORKER"] == "1"


def test_workers_are_armed_again_only_once_all_have_exited(harness):
    h = harness([make_unit(workers=2)], host=EnvHost())
    trigger(h)
    a, b = running(h)
    h.reap(a)
    assert not h.unit().armed  # worker 1 still holds the sockets
    h.reap(b)
    assert h.unit().armed
    trigger(h)
    assert len(running(h)) == 2


def test_scale_up_and_down(harness):
    h = harness([make_unit(workers=2)], host=EnvHost())
    trigger(h)
    assert h.engine.scale_unit(h.unit(), 4) == (True, "2 -> 4 workers")
    pids = running(h)
    assert len(pids) == 4
    assert h.engine.scale_unit(h.unit(), 1) == (True, "4 -> 1 workers")
    assert sorted(terms(h)) == pids[1:]  # the highest-numbered ones go, worker 0 stays
    assert h.engine.scale_unit(h.unit(), 0)[0] is False and h.engine.scale_unit(h.unit(), 1025)[0] is False
    for pid in pids[1:]:
        h.reap(pid)
    assert running(h) == pids[:1] and len(h.unit().group) == 1


def test_graceful_restart_of_workers_replaces_one_at_a_time(harness):
    h = harness([make_unit(workers=3, type="notify")], host=EnvHost())
    trigger(h)
    old = running(h)
    sockets = [h.host.envs[p]["NOTIFY_SOCKET"] for p in old]
    assert len(set(sockets)) == 3  # each worker its own: its READY=1 and MAINPID= are its own
    h.engine.graceful_restart(h.unit())
    for k in range(3):
        assert len(running(h)) == 4 and len(terms(h)) == k  # one new daemon at a time: never below N
        [new] = [s for s in h.engine.states() if s.replaces is not None]
        assert new.worker == k and h.host.envs[new.main_pid]["ACTIVATOR_WORKER"] == str(k)
        assert h.host.envs[new.main_pid]["NOTIFY_SOCKET"] == sockets[k]  # its worker's, told apart by pid
        ready(h, new)
        assert terms(h)[-1] == old[k]
        h.reap(old[k])
    assert len(running(h)) == 3 and not set(running(h)) & set(old)
    assert [s.worker for s in h.unit().group] == [0, 1, 2]


def test_reload_changing_workers_only_scales_and_a_graceful_reload_overlaps(harness):
    port = free_port()
    current = [make_unit(port=port, workers=2, type="notify", restart_style="graceful")]
    h = harness(current, reloader=lambda: current, host=EnvHost())
    trigger(h)
    first = running(h)
    unit = current[0]
    current[:] = [type(unit)(name="u", sockets=unit.sockets, service=ServiceSpec(
        argv=["/bin/true"], workers=3, type="notify", restart_style="graceful"))]
    result = h.engine.reload()
    assert result.unchanged == ["u"]
    h.poll()
    assert len(running(h)) == 3 and set(first) < set(running(h)) and terms(h) == []
    current[:] = [type(unit)(name="u", sockets=unit.sockets, service=ServiceSpec(
        argv=["/bin/true"], workers=3, type="notify", restart_style="graceful", environment={"NEW": "1"}))]
    assert h.engine.reload().changed == ["u"]
    h.poll()
    before = [s.main_pid for s in h.engine.states() if s.replaces is None]
    for k in range(3):
        [new] = [s for s in h.engine.states() if s.replaces is not None]
        assert h.host.envs[new.main_pid].get("NEW") == "1" and new.worker == k
        ready(h, new)
        assert terms(h)[-1] == before[k]
        h.reap(before[k])
    assert len(running(h)) == 3 and not set(running(h)) & set(before)
    assert all(h.host.envs[p].get("NEW") == "1" for p in running(h))


# ------------------------------------------------------------------ real daemons under a client load
def serve(activator, tmp_path: Path, body: str, name: str = "g"):
    """`activator serve` of one unit listening on a free port; (activator, port, control socket)."""
    port = free_port()
    units = tmp_path / "units"
    units.mkdir(exist_ok=True)
    (units / f"{name}.toml").write_text(f'[{name}]\nsocket.listen-stream = "127.0.0.1:{port}"\n{body}')
    sock = tmp_path / "ctl.sock"
    a = activator("serve", "--log-format", "json", "--control-socket", sock, units)
    a.wait_listening()
    return a, port, sock


def ctl(sock: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "activator", "ctl", "--socket", str(sock), *args], capture_output=True,
                          text=True, timeout=60)


def status(sock: Path, name: str = "g") -> dict:
    r = ctl(sock, "status", "--json", name)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["units"][0]


def wait_event(a, event: str, count: int = 1, timeout: float = 30.0) -> list[dict]:
    return wait_for(lambda: len(json_events(a, event)) >= count and json_events(a, event), timeout, what=f"{count} {event}")


def main_pids(sock: Path) -> list[int]:
    return [w["main_pid"] for w in status(sock)["workers"] if w["main_pid"]]


def generation_unit(*args: str, workers: int = 1) -> str:
    argv = json.dumps([PY, str(GENERATION), "g", *args])
    return (f"service.exec-start = {argv}\nservice.type = \"notify\"\nservice.restart-style = \"graceful\"\n"
            f"service.workers = {workers}\n")


def warm(port: int) -> bytes:
    """One connection before the load: it starts the daemon, so the load's latency is that of the switch."""
    with connect(("127.0.0.1", port), timeout=30) as c:
        c.shutdown(socket.SHUT_WR)
        return c.recv(100)


def report(what: str, load) -> None:
    print(f"\n{what}: {load.report.summary()}")  # the figures of docs/restarts.md (pytest -s)


def test_graceful_restart_of_a_notify_daemon_under_load_refuses_nothing(activator, tmp_path):
    a, port, sock = serve(activator, tmp_path, generation_unit("--ready-after", "3"))
    warm(port)
    with ClientLoad(("127.0.0.1", port), clients=4, max_seconds=90) as load:
        assert load.wait_served(20, timeout=30)
        [old] = main_pids(sock)
        r = ctl(sock, "restart", "g")  # restart-style = graceful: the default of ctl restart
        assert r.returncode == 0 and r.stdout == "g: graceful restart of 1 worker(s) under way\n", r
        overlap = status(sock)["workers"][0]  # the new one takes 3 s to be ready
        assert overlap["main_pid"] == old and overlap["new_pid"] and pid_alive(overlap["new_pid"])
        assert f"{old}+{overlap['new_pid']}" in ctl(sock, "status").stdout
        [done] = wait_event(a, "graceful-done")
        new = done["pid"]
        assert done["old_pid"] == old and new == overlap["new_pid"]
        wait_for(lambda: not pid_alive(old), 20, what="the old daemon to drain and exit")
        assert load.wait_served(20, timeout=30)
    report("graceful restart, Python notify daemon", load)
    assert load.report.refused == 0 and load.report.failed == 0, load.report.errors
    served_by = {line.split()[1] for line in map(bytes.decode, load.report.replies)}
    assert {f"pid={old}", f"pid={new}"} <= served_by
    assert json_events(a, "graceful-failed") == [] and [r["pid"] for r in json_events(a, "exit")] == [old]


def test_failed_graceful_restart_keeps_the_old_daemon_serving(activator, tmp_path):
    flag = tmp_path / "broken"
    a, port, sock = serve(activator, tmp_path, generation_unit("--fail-if", str(flag)))
    warm(port)
    with ClientLoad(("127.0.0.1", port), clients=4, max_seconds=90) as load:
        assert load.wait_served(20, timeout=30)
        [old] = main_pids(sock)
        flag.touch()  # the new generation exits 1 at once
        r = ctl(sock, "restart", "--graceful", "g")
        assert r.returncode == 0, r
        [failed] = wait_event(a, "graceful-failed")
        assert "exited with status 1 before it was ready" in failed["reason"] and failed["pid"] == old
        assert load.wait_served(20, timeout=30)
    report("failed graceful restart", load)
    assert load.report.refused == 0 and load.report.failed == 0, load.report.errors
    assert main_pids(sock) == [old] and set(load.report.replies) == {f"g pid={old} worker=-".encode()}


def test_second_graceful_restart_during_one_is_refused_and_sigterm_stops_both(activator, tmp_path):
    a, port, sock = serve(activator, tmp_path, generation_unit("--ready-after", "30"))
    with ClientLoad(("127.0.0.1", port), clients=1, max_seconds=60):
        wait_for(lambda: main_pids(sock), 20, what="the daemon")
    # (the first daemon is slow to be ready too, which does not matter: it already holds the socket)
    [old] = main_pids(sock)
    assert ctl(sock, "restart", "g").returncode == 0
    new = wait_for(lambda: status(sock)["workers"][0]["new_pid"], 20, what="the new daemon")
    r = ctl(sock, "restart", "--graceful", "g")
    assert r.returncode == 1 and r.stderr == "activator ctl: error: g: a graceful restart is already under way\n"
    assert a.stop() == 0
    assert not pid_alive(old) and not pid_alive(new)
    assert sorted(r["pid"] for r in json_events(a, "exit")) == sorted([old, new])


def test_scale_2_4_1_under_load_refuses_nothing(activator, tmp_path):
    a, port, sock = serve(activator, tmp_path, generation_unit(workers=2))
    warm(port)
    with ClientLoad(("127.0.0.1", port), clients=4, max_seconds=90) as load:
        assert load.wait_served(20, timeout=30)
        wait_for(lambda: len(main_pids(sock)) == 2, 20, what="2 workers")
        r = ctl(sock, "scale", "g", "4")
        assert r.returncode == 0 and r.stdout == "g: 2 -> 4 workers\n", r
        four = wait_for(lambda: len(main_pids(sock)) == 4 and main_pids(sock), 20, what="4 workers")
        assert load.wait(lambda rep: {f"worker={k}".encode() for k in range(4)} <=
                         {line.split()[2] for line in rep.replies}, timeout=30), load.report.replies
        assert ctl(sock, "scale", "g", "1").stdout == "g: 4 -> 1 workers\n"
        wait_for(lambda: not any(pid_alive(p) for p in four[1:]), 20, what="workers 1-3 to exit")
        assert main_pids(sock) == four[:1]
        assert load.wait_served(20, timeout=30)
    report("scale 2 -> 4 -> 1", load)
    assert load.report.refused == 0 and load.report.failed == 0, load.report.errors
    envs = {line.split()[1]: line.split()[2] for line in map(bytes.decode, load.report.replies)}
    assert envs[f"pid={four[0]}"] == "worker=0"
    assert [r["to"] for r in json_events(a, "scale")] == [4, 1]
    assert set(four) <= {r["pid"] for r in json_events(a, "ready")}  # each worker's READY=1 counted as its own


def test_graceful_restart_of_nbdkit_under_load_refuses_nothing(activator, tmp_path):
    if shutil.which("nbdkit") is None:
        pytest.skip("nbdkit is not installed")
    body = ('service.exec-start = ["nbdkit", "memory", "1M"]\nservice.restart-style = "graceful"\n'
            'service.graceful-ready-sec = "500ms"\n')
    a, port, sock = serve(activator, tmp_path, body, name="g")
    warm(port)
    with ClientLoad(("127.0.0.1", port), clients=4, request=b"", reply_bytes=16, max_seconds=90) as load:
        assert load.wait_served(20, timeout=30)
        [old] = main_pids(sock)
        assert ctl(sock, "restart", "g").returncode == 0
        [done] = wait_event(a, "graceful-done")
        wait_for(lambda: not pid_alive(old), 20, what="the old nbdkit to exit")
        assert load.wait_served(20, timeout=30)
    report("graceful restart, nbdkit", load)
    # nbdkit does not drain: on SIGTERM it closes the connections it has accepted and not answered yet
    # (docs/restarts.md). At most the one each client has in flight then; none is refused.
    assert load.report.refused == 0 and load.report.failed <= 4, load.report.errors
    assert set(load.report.errors) <= {"no reply (EOF)"}, load.report.errors
    assert set(load.report.replies) == {b"NBDMAGICIHAVEOPT"} and main_pids(sock) == [done["pid"]]


@pytest.mark.parametrize("extra, key", [
    ('socket.accept = true\nservice.workers = 2\n', "service.workers"),
    ('socket.accept = true\nservice.restart-style = "graceful"\n', "service.restart-style"),
    ('service.proxy-to = "127.0.0.1:9"\nservice.workers = 2\n', "service.workers"),
])
def test_check_refuses_workers_and_graceful_without_a_daemon_that_takes_the_sockets(tmp_path, extra, key):
    unit = tmp_path / "u.toml"
    unit.write_text(f'[u]\nsocket.listen-stream = "127.0.0.1:{free_port()}"\nservice.exec-start = ["cat"]\n{extra}')
    r = subprocess.run([PY, "-m", "activator", "check", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and f"u: {key}: " in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_ctl_scale_refuses_bad_counts_and_accept_units(activator, tmp_path):
    a, port, sock = serve(activator, tmp_path, 'socket.accept = true\nservice.exec-start = ["cat"]\n'
                                               'service.standard-input = "socket"\n')
    r = ctl(sock, "scale", "g", "0")
    assert r.returncode == 2 and "Invalid value for 'WORKERS'" in r.stderr
    r = ctl(sock, "scale", "g", "2")
    assert r.returncode == 1 and r.stderr == ("activator ctl: error: g: needs accept = false and no proxy-to "
                                              "(a daemon that gets the sockets)\n")
    r = ctl(sock, "restart", "--graceful", "g")
    assert r.returncode == 1 and "needs accept = false" in r.stderr
    assert ctl(sock, "scale", "nope", "2").returncode == 3


def test_reload_changing_the_unit_during_a_graceful_restart_ends_it(harness):
    port = free_port()
    current = [make_unit(port=port, type="notify")]
    h = harness(current, reloader=lambda: current, host=EnvHost())
    trigger(h)
    old = h.unit()
    old_pid = old.main_pid
    h.engine.graceful_restart(old)
    new_pid = old.successor.main_pid
    unit = current[0]
    current[:] = [type(unit)(name="u", sockets=unit.sockets, service=ServiceSpec(argv=["/bin/false"], type="notify"))]
    assert h.engine.reload().changed == ["u"]
    assert sorted(terms(h)) == [old_pid, new_pid]  # the new daemon of the restart, and the old one (stop-first)
    [failed] = [e for e in h.events if e["event"] == "graceful-failed"]
    assert failed["reason"] == "the unit changed again (reload)"
    h.reap(new_pid)
    h.reap(old_pid)
    h.poll()
    # the connection still in the backlog (nothing accepts here) starts the new configuration
    assert h.unit().unit.service.argv == ["/bin/false"] and h.unit().main_pid not in (None, old_pid, new_pid)


def test_scale_down_during_a_rolling_restart_goes_on_with_the_workers_left(harness):
    h = harness([make_unit(workers=3, type="notify")], host=EnvHost())
    trigger(h)
    old = running(h)
    h.engine.graceful_restart(h.unit())
    [new0] = [s for s in h.engine.states() if s.replaces is not None]
    ready(h, new0)
    [new1] = [s for s in h.engine.states() if s.replaces is not None]
    assert new1.worker == 1
    assert h.engine.scale_unit(h.unit(), 1) == (True, "3 -> 1 workers")  # worker 1 (and its new daemon) and 2 go
    assert set(terms(h)) == {old[0], old[1], old[2], new1.main_pid}
    assert [s.worker for s in h.unit().group] == [0] and h.unit() is new0 and h.unit().rolling == []


def test_start_unit_starts_the_workers_that_do_not_run(harness):
    h = harness([make_unit(workers=2)], host=EnvHost())
    trigger(h)
    a, b = running(h)
    h.reap(b)  # restart = no: worker 1 stays down while worker 0 runs
    h.poll()
    assert running(h) == [a] and not h.unit().armed
    assert h.engine.start_unit(h.unit()) is True
    assert len(running(h)) == 2 and h.host.envs[max(running(h))]["ACTIVATOR_WORKER"] == "1"


def test_runtime_directory_stays_while_another_generation_or_worker_runs(harness, tmp_path):
    name = f"activator-test-{os.getpid()}-{tmp_path.name}"
    path = Path("/run") / name
    if not os.access("/run", os.W_OK):
        pytest.skip("needs a writable /run")
    h = harness([make_unit(workers=2, type="notify", runtime_directory=[name])], host=EnvHost())
    try:
        trigger(h)
        a, b = running(h)
        assert path.is_dir()
        h.reap(b)  # worker 1 ends: worker 0 still runs in it
        assert path.is_dir()
        h.engine.graceful_restart(h.unit())
        new = h.unit().successor
        ready(h, new)
        h.reap(a)  # the old generation ends: the new one runs in it
        assert path.is_dir()
        h.reap(new.main_pid)
        assert not path.exists()  # the last one gone: removed, as for any stop
    finally:
        for leftover in Path("/run").glob(f"*{name}*"):
            shutil.rmtree(leftover, ignore_errors=True)


def test_a_reexec_carries_workers_and_is_refused_during_a_graceful_restart(harness):
    """Each worker's daemon, notify readiness and timers go through a re-exec's state; a graceful restart
    under way (two generations and the wait between them) is refused, saying so."""
    from test_engine import resumed

    units = [make_unit(type="notify", workers=3, restart="always", restart_sec=5.0)]
    h = harness(units, host=EnvHost())
    trigger(h)
    for w in h.unit().group:
        ready(h, w)
    old = h.unit().main_pid
    assert h.engine.graceful_restart(h.unit())[0]
    assert h.engine.reexec_busy() == "unit u: a graceful restart is under way"
    ready(h, h.unit().successor)
    h.reap(old)
    while h.unit().rolling or any(w.successor for w in h.unit().group):  # one worker at a time
        successor = next(w.successor for w in h.unit().group if w.successor)
        previous = successor.replaces.main_pid
        ready(h, successor)
        h.reap(previous)
    assert h.engine.reexec_busy() is None
    pids = sorted(w.main_pid for w in h.unit().group)
    second = h.unit().group[2].main_pid
    h.reap(second, code=1)  # worker 2 exits: its restart is due in 5 s, carried
    h.advance(2.0)
    new = resumed(h, units)
    try:
        group = new.unit().group
        assert [w.worker for w in group] == [0, 1, 2] and all(w.leader is new.unit() for w in group[1:])
        assert sorted(w.main_pid for w in group if w.main_pid) == sorted(set(pids) - {second})
        assert all(new.engine.unit_of_pid(w.main_pid) is w for w in group if w.main_pid)
        assert all(new.engine.notify.runs[id(w)].ready for w in group if w.main_pid)
        spawned = len(new.host.spawned)
        new.advance(2.9)
        assert len(new.host.spawned) == spawned, "the restart is due 5 s after the exit, not earlier"
        new.advance(0.2)
        assert len(new.host.spawned) == spawned + 1 and group[2].main_pid == new.host.spawned[-1]
        first = group[1].main_pid
        new.reap(first, code=1)  # each worker is still restarted on its own
        assert group[1].restart_timer is not None and group[0].main_pid is not None
    finally:
        new.close()


def test_workers_under_load_survive_a_reexec_and_are_restarted_on_their_own(activator, tmp_path):
    """`ctl reexec` with 3 workers serving: the same pids, no connection refused or failed, each worker's
    READY=1 still its own (a graceful restart after the re-exec completes), a worker killed afterwards is
    restarted alone."""
    a, port, sock = serve(activator, tmp_path, generation_unit(workers=3) + 'service.restart = "always"\n')
    warm(port)
    with ClientLoad(("127.0.0.1", port), clients=4, max_seconds=120, timeout=20) as load:
        assert load.wait_served(20, timeout=30)
        pids = wait_for(lambda: len(main_pids(sock)) == 3 and main_pids(sock), 20, what="3 workers")
        r = ctl(sock, "reexec")
        assert r.returncode == 0, r.stderr + a.log
        wait_for(lambda: json_events(a, "reexec-done"), 30, what="the re-exec")
        assert load.wait_served(50, timeout=30)
        assert main_pids(sock) == pids
        r = ctl(sock, "restart", "g")  # graceful: needs every new worker's READY=1 on its own socket
        assert r.returncode == 0, r.stderr
        wait_for(lambda: len(json_events(a, "graceful-done")) == 3, 60, what="3 workers replaced")
        new = wait_for(lambda: len(main_pids(sock)) == 3 and main_pids(sock), 20, what="3 new workers")
        assert not set(new) & set(pids)
        os.kill(new[1], signal.SIGKILL)
        wait_for(lambda: len(main_pids(sock)) == 3 and main_pids(sock) != new, 30, what="worker 1 restarted")
        after = main_pids(sock)
        assert after[0] == new[0] and after[2] == new[2] and after[1] != new[1]
        assert load.wait_served(20, timeout=30)
    report("re-exec with 3 workers", load)
    assert load.report.refused == 0, load.report.errors
    assert load.report.failed <= 1, load.report.errors  # the SIGKILLed worker's connection in flight, if any
    assert a.stop() == 0
    assert not any(pid_alive(p) for p in after)


# ------------------------------------------------------------------ found by the hostile review
def test_old_daemon_dying_in_the_overlap_then_a_failed_new_one_applies_restart(harness):
    """The old daemon exits during the overlap, then the new one fails: the old one's exit counts then
    (restart=always restarts the unit), instead of leaving it without a daemon."""
    h = harness([make_unit(type="notify", restart="always", restart_sec=1.0)], host=EnvHost())
    trigger(h)
    old = h.unit()
    ready(h, old)
    old_pid = old.main_pid
    assert h.engine.graceful_restart(old)[0]
    h.reap(old_pid, code=3)
    assert old.successor is not None and old.successor.main_pid  # the new one starts: the unit carries on with it
    h.reap(old.successor.main_pid, code=4)
    assert [e["event"] for e in h.events if e["event"].startswith("graceful")] == ["graceful-start", "graceful-failed"]
    assert h.unit().restart_pending
    spawned = len(h.host.spawned)
    h.advance(1.1)
    assert len(h.host.spawned) == spawned + 1 and h.unit().main_pid == h.host.spawned[-1]


def test_scale_is_refused_during_a_graceful_restart_and_while_scaled_away_workers_drain(harness):
    h = harness([make_unit(type="notify", workers=2)], host=EnvHost())
    trigger(h)
    for w in h.unit().group:
        ready(h, w)
    assert h.engine.graceful_restart(h.unit())[0]
    assert h.engine.scale_unit(h.unit(), 3) == (False, "a graceful restart is under way: scale up once it is done")
    new = h.unit().successor.main_pid
    h.engine.restart_unit(h.unit())  # ends the graceful restart (stop first)
    for pid in [w.main_pid for w in h.unit().group] + [new]:
        h.reap(pid)
    pids = running(h)
    assert len(pids) == 2
    assert h.engine.scale_unit(h.unit(), 1)[0]
    ok, why = h.engine.scale_unit(h.unit(), 3)  # worker 1 still drains: no second daemon in its slot
    assert not ok and "still stopping" in why and running(h) == pids[:1]
    h.reap(pids[1])
    assert h.engine.scale_unit(h.unit(), 3)[0] and len(running(h)) == 3


def test_scale_during_a_stop_starts_nothing(harness):
    h = harness([make_unit(workers=1)], host=EnvHost())
    trigger(h)
    [pid] = running(h)
    h.engine.halt_unit(h.unit())  # ctl stop: the daemon is stopping
    assert h.engine.scale_unit(h.unit(), 3)[0]
    assert running(h) == [pid], "no worker started while the unit stops"
    h.reap(pid)
    assert running(h) == [] and h.unit().state == "listening"
    trigger(h)
    assert len(running(h)) == 3  # the count holds for the next activation


def test_ctl_start_waits_for_every_worker_to_have_stopped(harness, tmp_path):
    """ctl stop, then ctl start while worker 1 is still stopping: refused (it was accepted, and worker 1 was
    never started again once it had exited)."""
    import socket as _socket

    from activator.control import ControlServer

    h = harness([make_unit(workers=2)], host=EnvHost())
    path = str(tmp_path / "ctl.sock")
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.bind(path)
    server = ControlServer(h.engine, path, sock)
    try:
        trigger(h)
        first, second = running(h)
        h.engine.halt_unit(h.unit())
        h.reap(first)  # worker 0 has stopped, worker 1 not yet
        ok, why = server._start_one(h.unit())
        assert (ok, why) == (False, "still stopping; start it once it has stopped")
        h.reap(second)
        assert server._start_one(h.unit())[0] and len(running(h)) == 2
    finally:
        sock.close()
