"""`activator run` end to end: every address family and socket type, the LISTEN_* environment,
--fdname, -E, --now, inherited fds, no descriptor leaks, respawn, --restart, --exit-with-service,
start failures, bind failures and stopping by signal. Real processes and sockets only."""
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from conftest import IN_CI, PROBE, Activator, connect, free_dual_port, free_port, pid_alive, read_probe, wait_for

PY = sys.executable


def probe(report, mode=None):
    return [PY, PROBE, str(report)] + ([mode] if mode else [])


def fds_of(info):
    return {f["fd"]: f for f in info["fds"]}


def hello(sock) -> int:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(100)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    assert data.startswith(b"hello from "), data
    return int(data.split()[-1])


def assert_gone(pid):
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 5, what=f"pid {pid} to be gone (no zombie, no orphan)")


# ------------------------------------------------------------------ address families

def test_tcp_v6_loopback(activator, tmp_path):
    port = free_port(socket.AF_INET6)
    report = tmp_path / "r.json"
    a = activator("run", "-l", f"[::1]:{port}", "--", *probe(report))
    a.wait_listening()
    with connect(("::1", port)) as c:
        pid = hello(c)
    fd3 = fds_of(read_probe(report))[3]
    assert fd3["family"] == "inet6" and fd3["type"] == "stream" and fd3["listening"]
    assert fd3["local"][:2] == ["::1", port]
    assert a.stop() == 0
    assert_gone(pid)


def test_bare_port_is_dual_stack(activator, tmp_path):
    port = free_dual_port()
    report = tmp_path / "r.json"
    a = activator("run", "-l", str(port), "--", *probe(report))
    a.wait_listening()
    assert f"[::]:{port}" in a.log
    with connect(("127.0.0.1", port)) as c:
        pid = hello(c)
    with connect(("::1", port)) as c:
        assert hello(c) == pid  # the same daemon serves both families through one socket
    fd3 = fds_of(read_probe(report))[3]
    assert fd3["family"] == "inet6" and fd3["local"][:2] == ["::", port]
    assert a.stop() == 0


def test_unix_path_socket_and_cleanup(activator, tmp_path):
    path = tmp_path / "d.sock"
    report = tmp_path / "r.json"
    a = activator("run", "-l", path, "--", *probe(report))
    a.wait_listening()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    with connect(str(path)) as c:
        pid = hello(c)
    fd3 = fds_of(read_probe(report))[3]
    assert fd3["family"] == "unix" and fd3["listening"] and fd3["local"] == str(path)
    assert a.stop() == 0
    assert not path.exists()
    assert_gone(pid)


def test_abstract_unix_socket(activator, tmp_path):
    name = f"@activator-test-{uuid.uuid4().hex}"
    report = tmp_path / "r.json"
    a = activator("run", "-l", name, "--", *probe(report))
    a.wait_listening()
    with connect(name) as c:
        hello(c)
    fd3 = fds_of(read_probe(report))[3]
    assert fd3["family"] == "unix" and fd3["local"] == name
    assert a.stop() == 0


def test_vsock_daemon_gets_listening_vsock_socket(activator, tmp_path):
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except OSError as exc:
        if IN_CI:
            pytest.fail(f"AF_VSOCK unavailable: {exc}")
        pytest.skip(f"AF_VSOCK unavailable: {exc}")
    port = 20000 + uuid.uuid4().int % 1_000_000
    report = tmp_path / "r.json"
    # Connecting to ourselves over vsock may be impossible here: --now starts the daemon at once.
    a = activator("run", "--now", "-l", f"vsock::{port}", "--", *probe(report, "exit"))
    a.wait_log(r"exited with status 0")
    info = read_probe(report)
    fd3 = fds_of(info)[3]
    assert fd3["family"] == "vsock" and fd3["type"] == "stream" and fd3["listening"]
    assert fd3["local"] == [0xFFFFFFFF, port]
    assert info["env"]["LISTEN_FDS"] == "1" and info["env"]["LISTEN_PID"] == str(info["pid"])
    assert a.stop() == 0


# ------------------------------------------------------------------ socket types

def test_datagram_socket_started_by_a_datagram(activator, tmp_path):
    port = free_port()
    report = tmp_path / "r.json"
    a = activator("run", "-d", "-l", f"127.0.0.1:{port}", "--", *probe(report))
    a.wait_listening()
    assert not report.exists()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        s.sendto(b"ping", ("127.0.0.1", port))
        data, _ = s.recvfrom(100)  # the datagram that started the daemon is the one it reads
    info = read_probe(report)
    assert data == b"hello from %d\n" % info["pid"]
    fd3 = fds_of(info)[3]
    assert fd3["type"] == "datagram" and fd3["family"] == "inet" and not fd3["listening"]
    assert a.stop() == 0


def test_datagram_unix(activator, tmp_path):
    path = tmp_path / "dg.sock"
    report = tmp_path / "r.json"
    a = activator("run", "--datagram", "-l", path, "--", *probe(report))
    a.wait_listening()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", str(path))
    fd3 = fds_of(read_probe(report))[3]
    assert fd3["type"] == "datagram" and fd3["family"] == "unix"
    assert a.stop() == 0
    assert not path.exists()


def test_seqpacket_unix(activator, tmp_path):
    path = tmp_path / "sp.sock"
    report = tmp_path / "r.json"
    a = activator("run", "--seqpacket", "-l", path, "--", *probe(report))
    a.wait_listening()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(10)
        s.connect(str(path))
        data = s.recv(100)
    info = read_probe(report)
    assert data == b"hello from %d\n" % info["pid"]
    fd3 = fds_of(info)[3]
    assert fd3["type"] == "seqpacket" and fd3["listening"]
    assert a.stop() == 0


def test_datagram_with_seqpacket_is_usage_error():
    r = subprocess.run([PY, "-m", "activator", "run", "-d", "--seqpacket", "-l", "/tmp/x", "--", "true"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and "Traceback" not in r.stderr


# ------------------------------------------------------------------ env, names, --now

def test_multiple_sockets_in_order_with_exact_fds(activator, tmp_path):
    p1, p2 = free_port(), free_port()
    path = tmp_path / "u.sock"
    report = tmp_path / "r.json"
    a = activator("run", "-l", f"127.0.0.1:{p2}", "-l", path, "-l", f"127.0.0.1:{p1}", "--", *probe(report))
    a.wait_listening(3)
    assert f"127.0.0.1:{p2} as fd 3" in a.log and "as fd 4" in a.log and f"127.0.0.1:{p1} as fd 5" in a.log
    with connect(str(path)) as c:  # any of the sockets triggers the start
        hello(c)
    info = read_probe(report)
    fds = fds_of(info)
    assert sorted(fds) == [0, 1, 2, 3, 4, 5]
    assert fds[3]["local"] == ["127.0.0.1", p2] and fds[4]["local"] == str(path) and fds[5]["local"] == ["127.0.0.1", p1]
    assert all(not fds[n]["cloexec"] and not fds[n]["nonblocking"] for n in (3, 4, 5))
    assert info["env"]["LISTEN_FDS"] == "3" and info["env"]["LISTEN_PID"] == str(info["pid"])
    assert "LISTEN_FDNAMES" not in info["env"]
    assert a.stop() == 0


@pytest.mark.parametrize(
    "names, expected",
    [(["--fdname", "one"], "one:one"), (["--fdname", "a:b"], "a:b"), (["--fdname", "a", "--fdname", "b"], "a:b")],
)
def test_fdname(activator, tmp_path, names, expected):
    report = tmp_path / "r.json"
    a = activator("run", "--now", "-l", tmp_path / "1.sock", "-l", tmp_path / "2.sock", *names, "--",
                  *probe(report, "exit"))
    info = read_probe(report)
    assert info["env"]["LISTEN_FDNAMES"] == expected
    assert info["env"]["LISTEN_FDS"] == "2"
    a.wait_log("exited")
    assert a.stop() == 0


@pytest.mark.parametrize("names", ["a:b:c", "a::b", "bad:na:me"])
def test_fdname_count_mismatch_is_usage_error(tmp_path, names):
    r = subprocess.run(
        [PY, "-m", "activator", "run", "-l", str(tmp_path / "1.sock"), "-l", str(tmp_path / "2.sock"),
         "--fdname", names, "--", "true"], capture_output=True, text=True, timeout=20,
    )
    assert r.returncode == 2, r.stderr
    assert "--fdname" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "1.sock").exists()


def test_setenv_value_and_from_our_environment(activator, tmp_path):
    report = tmp_path / "r.json"
    a = activator("run", "--now", "-E", "GREETING=hi=there", "-E", "FROM_PARENT", "-E", "EMPTY=",
                  "-E", "NOT_SET_ANYWHERE", "-l", tmp_path / "s.sock", "--", *probe(report, "exit"),
                  env={"FROM_PARENT": "inherited value", "PLAIN_PARENT": "x"})
    env = read_probe(report)["env"]
    assert env["GREETING"] == "hi=there"
    assert env["FROM_PARENT"] == "inherited value"
    assert env["EMPTY"] == ""
    assert env["NOT_SET_ANYWHERE"] == ""  # as systemd-socket-activate: passthrough of an unset name is ""
    assert env["PLAIN_PARENT"] == "x"  # activator passes its own environment on
    a.wait_log("exited")
    assert a.stop() == 0


def test_now_starts_before_any_connection(activator, tmp_path):
    report = tmp_path / "r.json"
    port = free_port()
    a = activator("run", "--now", "-l", f"127.0.0.1:{port}", "--", *probe(report))
    info = read_probe(report)  # no connection made
    assert info["env"]["LISTEN_PID"] == str(info["pid"]) and fds_of(info)[3]["listening"]
    with connect(("127.0.0.1", port)) as c:
        assert hello(c) == info["pid"]
    assert a.log.count("started") == 1
    assert a.stop() == 0
    assert_gone(info["pid"])


# ------------------------------------------------------------------ inherited fds, no leaks

LAUNCHER = r"""
import os, socket, sys
# Bind one socket, put it at fd 3, leave a stray non-CLOEXEC fd 7, exec activator with LISTEN_PID = its pid.
src = socket.create_server(("127.0.0.1", int(sys.argv[1]))).detach()
if src != 3:
    os.dup2(src, 3)
    os.close(src)
os.set_inheritable(3, True)
stray = os.open("/dev/null", os.O_RDONLY)
os.dup2(stray, 7)
os.close(stray)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="inherited")
os.execv(sys.executable, [sys.executable, "-m", "activator"] + sys.argv[2:])
"""


def test_inherited_fds_come_first_and_no_stray_fd_leaks(tmp_path):
    """activator socket-activated itself: the inherited socket at fd 3, then --listen ones; fd 7 does not leak."""
    inh_port, own_port = free_port(), free_port()
    report = tmp_path / "r.json"
    a = Activator(
        [str(inh_port), "run", "-l", f"127.0.0.1:{own_port}", "--", *probe(report)],
        argv_prefix=[PY, "-c", LAUNCHER],
    )
    try:
        a.wait_listening()
        with connect(("127.0.0.1", inh_port)) as c:  # the inherited socket triggers the start
            pid = hello(c)
        with connect(("127.0.0.1", own_port)) as c:
            assert hello(c) == pid
        info = read_probe(report)
        fds = fds_of(info)
        assert sorted(fds) == [0, 1, 2, 3, 4], info["fds"]  # no fd 7, nothing else
        assert fds[3]["local"] == ["127.0.0.1", inh_port] and fds[4]["local"] == ["127.0.0.1", own_port]
        env = info["env"]
        assert env["LISTEN_FDS"] == "2" and env["LISTEN_PID"] == str(info["pid"])
        assert env["LISTEN_FDNAMES"] == "inherited:unknown"
        # activator itself holds both; its own LISTEN_* were not passed on as such
        assert a.stop() == 0
        assert_gone(pid)
    finally:
        if a.proc.poll() is None:
            a.proc.kill()
            a.wait()


def test_stray_fd_from_parent_does_not_reach_daemon(tmp_path):
    report = tmp_path / "r.json"
    stray = os.open("/dev/null", os.O_RDONLY)  # inheritable when passed with pass_fds
    try:
        a = Activator(["run", "--now", "-l", str(tmp_path / "s.sock"), "--", *probe(report, "exit")],
                      pass_fds=(stray,))
        try:
            info = read_probe(report)
            assert sorted(fds_of(info)) == [0, 1, 2, 3], info["fds"]
            assert os.path.exists(f"/proc/{a.pid}/fd/{stray}")  # activator did have it
            a.wait_log("exited")
        finally:
            assert a.stop() == 0
    finally:
        os.close(stray)


def test_daemon_env_has_exact_listen_vars_even_if_ours_are_stale(activator, tmp_path):
    """LISTEN_* in activator's environment for another pid are not for it, and never passed on as they were."""
    report = tmp_path / "r.json"
    a = activator("run", "--now", "-l", tmp_path / "s.sock", "--", *probe(report, "exit"),
                  env={"LISTEN_PID": "1", "LISTEN_FDS": "4", "LISTEN_FDNAMES": "w:x:y:z"})
    info = read_probe(report)
    assert info["env"]["LISTEN_FDS"] == "1" and info["env"]["LISTEN_PID"] == str(info["pid"])
    assert "LISTEN_FDNAMES" not in info["env"]
    assert sorted(fds_of(info)) == [0, 1, 2, 3]
    a.wait_log("exited")
    assert a.stop() == 0


# ------------------------------------------------------------------ respawn and restart

def test_respawn_after_daemon_exits(activator, tmp_path):
    port = free_port()
    report = tmp_path / "r.json"
    a = activator("run", "-l", f"127.0.0.1:{port}", "--", *probe(report, "once"))
    a.wait_listening()
    with connect(("127.0.0.1", port)) as c:
        first = hello(c)
    a.wait_log(rf"pid {first} exited with status 0")
    with connect(("127.0.0.1", port)) as c:
        second = hello(c)
    assert second != first
    assert_gone(first)
    a.wait_log(rf"pid {second} exited with status 0")
    assert a.log.count("started") == 2
    assert a.stop() == 0


def test_restart_always_restarts_without_a_connection(activator, tmp_path):
    port = free_port()
    report = tmp_path / "r.json"
    a = activator("run", "--restart", "always", "--restart-sec", "50ms", "-l", f"127.0.0.1:{port}", "--",
                  *probe(report, "once"))
    a.wait_listening()
    with connect(("127.0.0.1", port)) as c:
        first = hello(c)
    a.wait_log(r"restarting in")
    m = a.wait_log(r"started .* as pid (\d+)", count=2)  # no second connection needed
    second = int(m.group(1))
    assert second != first
    wait_for(lambda: read_probe(report)["pid"] == second, what="the restarted daemon's report")
    with connect(("127.0.0.1", port)) as c:
        assert hello(c) == second
    assert a.stop() == 0


def test_restart_on_failure(activator, tmp_path):
    marker = tmp_path / "count"
    script = f'echo x >> {marker}; exit 3'
    a = activator("run", "--now", "--restart", "on-failure", "--restart-sec", "0", "--start-limit-burst", "3",
                  "--start-limit-interval", "30s", "-l", tmp_path / "s.sock", "--", "sh", "-c", script)
    a.wait_log(r"start limit hit")
    assert a.log.count("exited with status 3") == 3
    assert len(marker.read_text().split()) == 3
    assert a.stop() == 0


def test_restart_on_failure_not_after_success(activator, tmp_path):
    a = activator("run", "--now", "--restart", "on-failure", "--restart-sec", "0", "-l", tmp_path / "s.sock",
                  "--", "sh", "-c", "exit 0")
    a.wait_log(r"exited with status 0")
    time.sleep(0.3)  # a restart would have happened by now (restart-sec 0)
    assert "restarting" not in a.log and a.log.count("started") == 1
    assert a.stop() == 0


# ------------------------------------------------------------------ --exit-with-service

@pytest.mark.parametrize("script, code", [("exit 7", 7), ("exit 0", 0), ("kill -9 $$", 137), ("kill -TERM $$", 143)])
def test_exit_with_service_status(activator, tmp_path, script, code):
    path = tmp_path / "s.sock"
    a = activator("run", "--exit-with-service", "-l", path, "--", "sh", "-c", script)
    a.wait_listening()
    connect(str(path)).close()
    assert a.wait() == code
    assert not path.exists()


def test_exit_with_service_now(activator, tmp_path):
    a = activator("run", "--exit-with-service", "--now", "-l", tmp_path / "s.sock", "--", "sh", "-c", "exit 5")
    assert a.wait() == 5


# ------------------------------------------------------------------ start failures

@pytest.mark.parametrize("kind", ["missing-path", "missing-name", "not-executable", "directory"])
def test_start_failure_is_one_line_and_counts_toward_start_limit(activator, tmp_path, kind):
    if kind == "missing-path":
        command, reason = str(tmp_path / "no-such-daemon"), "command not found"
    elif kind == "missing-name":
        command, reason = "no-such-daemon-anywhere", "command not found"
    elif kind == "not-executable":
        command, reason = str(tmp_path / "plain.txt"), "not executable"
        (tmp_path / "plain.txt").write_text("#!/bin/sh\nexit 0\n")
    else:
        command, reason = str(tmp_path), "not executable"
    port = free_port()
    a = activator("run", "--start-limit-burst", "2", "--start-limit-interval", "30s",
                  "-l", f"127.0.0.1:{port}", "--", command, "arg")
    a.wait_listening()
    c = connect(("127.0.0.1", port))  # stays in the backlog: each failure re-arms, the start limit ends it
    try:
        a.wait_log(r"start limit hit")
        failures = [line for line in a.lines if "cannot start" in line]
        assert len(failures) == 2, a.log
        assert command in failures[0] and reason in failures[0]
        assert "Traceback" not in a.log
        assert a.proc.poll() is None  # still holding the socket
    finally:
        c.close()
    assert a.stop() == 0


# ------------------------------------------------------------------ bind failures

def run_cli(*args, timeout=20, **kw):
    return subprocess.run([PY, "-m", "activator", "run", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)


def test_bind_address_in_use_names_address_and_leaves_nothing(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        first = tmp_path / "first.sock"
        newdir = tmp_path / "new" / "dir"
        r = run_cli("-l", first, "-l", newdir / "x.sock", "-l", f"127.0.0.1:{port}", "--", "true")
    assert r.returncode == 1, r.stderr
    assert f"127.0.0.1:{port}" in r.stderr and "in use" in r.stderr
    assert "Traceback" not in r.stderr
    assert not first.exists()  # unix socket files created so far are removed
    assert not (tmp_path / "new").exists()  # and the directories created for them


def test_bind_parent_is_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    target = tmp_path / "file" / "s.sock"
    r = run_cli("-l", tmp_path / "ok.sock", "-l", target, "--", "true")
    assert r.returncode == 1, r.stderr
    assert str(target) in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "ok.sock").exists()
    assert (tmp_path / "file").is_file()


def test_bind_refuses_to_replace_a_regular_file(tmp_path):
    target = tmp_path / "not-a-socket"
    target.write_text("precious")
    r = run_cli("-l", target, "--", "true")
    assert r.returncode == 1 and str(target) in r.stderr
    assert target.read_text() == "precious"


def test_missing_directory_is_created_and_removed(activator, tmp_path):
    path = tmp_path / "a" / "b" / "s.sock"
    a = activator("run", "-l", path, "--", "true")
    a.wait_listening()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert a.stop() == 0
    assert not path.exists()


def _drop_all_capabilities():
    """Still uid 0, but without any capability after exec: DAC and privileged ports apply to us."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP; fails harmlessly past the last capability


@pytest.mark.skipif(os.geteuid() != 0, reason="runs as root without capabilities")
def test_bind_permission_denied():
    top = tempfile.mkdtemp(prefix="activator-perm-")
    try:
        # root's own (a directory owned by another user is refused before bind), but not writable for
        # root without CAP_DAC_OVERRIDE
        os.chmod(top, 0o555)
        sock = os.path.join(top, "s.sock")
        for bad in (sock, "127.0.0.1:1"):  # a privileged port without CAP_NET_BIND_SERVICE
            r = run_cli("-l", bad, "--", "true", preexec_fn=_drop_all_capabilities)
            assert r.returncode == 1, r.stderr
            assert bad in r.stderr and "ermission denied" in r.stderr, r.stderr
            assert "Traceback" not in r.stderr
        assert os.listdir(top) == []
    finally:
        os.rmdir(top)


# ------------------------------------------------------------------ stopping

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_daemon_and_cleans_up(activator, tmp_path, sig):
    path = tmp_path / "s.sock"
    report = tmp_path / "r.json"
    a = activator("run", "-l", path, "--", *probe(report))
    a.wait_listening()
    with connect(str(path)) as c:
        pid = hello(c)
    assert a.children() == [pid]
    a.signal(sig)
    assert a.wait() == 0
    assert_gone(pid)
    assert not path.exists()
    assert f"{signal.Signals(sig).name} received" in a.log and "stopped" in a.log


def _ignores(pid: int, sig: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    return False


def test_daemon_ignoring_sigterm_is_killed_after_timeout_stop(activator, tmp_path):
    path = tmp_path / "s.sock"
    report = tmp_path / "r.json"
    a = activator("run", "--now", "--timeout-stop", "500ms", "-l", path, "--", *probe(report, "ignore-term"))
    info = read_probe(report)
    wait_for(lambda: _ignores(info["pid"], signal.SIGTERM), what="the daemon to ignore SIGTERM")
    t0 = time.monotonic()
    a.signal(signal.SIGTERM)
    assert a.wait() == 0
    elapsed = time.monotonic() - t0
    assert 0.4 <= elapsed < 5, elapsed
    assert_gone(info["pid"])
    assert "SIGKILL" in a.log
    assert not path.exists()


def test_stop_while_idle_exits_at_once(activator, tmp_path):
    a = activator("run", "-l", tmp_path / "s.sock", "-l", f"127.0.0.1:{free_port()}", "--", "true")
    a.wait_listening(2)
    t0 = time.monotonic()
    assert a.stop() == 0
    assert time.monotonic() - t0 < 3
    assert not (tmp_path / "s.sock").exists()


def test_stop_ends_daemon_tree_and_double_forked_orphans(activator, tmp_path):
    """No orphan left: a child of the daemon and a grandchild that escaped with setsid are ended too."""
    report = tmp_path / "r.json"
    pids = tmp_path / "pids"
    script = (f'sleep 300 & echo $! >> "{pids}"; '
              f'(setsid sleep 301 & echo $! >> "{pids}"); '
              f'exec "{PY}" "{PROBE}" "{report}"')
    a = activator("run", "--now", "-l", tmp_path / "s.sock", "--", "sh", "-c", script)
    info = read_probe(report)
    extra = wait_for(lambda: [int(x) for x in pids.read_text().split()] if pids.exists() and
                     len(pids.read_text().split()) == 2 else None, what="the background pids")
    assert all(pid_alive(p) for p in extra)
    assert a.stop() == 0
    for pid in [info["pid"], *extra]:
        assert_gone(pid)


@pytest.mark.parametrize(
    "args",
    [["run", "--", "true"], ["run", "-l", "/tmp/activator-never.sock"], ["run", "--bogus-option", "-l", "1234", "true"],
     ["run", "-l", "1234", "--restart", "sometimes", "--", "true"], ["run", "-l", "1234", "--timeout-stop", "soon", "true"],
     ["run", "-l", "1234", "-E", "1BAD=x", "true"], ["run", "-l", "1234", "-E", "=x", "true"],
     ["run", "-l", "1234", "-E", "A-B", "true"]],
)
def test_usage_errors_exit_2(args):
    r = subprocess.run([PY, "-m", "activator", *args], capture_output=True, text=True, timeout=20)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert not os.path.exists("/tmp/activator-never.sock")


def test_abstract_address_in_use(activator, tmp_path):
    name = f"@activator-busy-{uuid.uuid4().hex}"
    a = activator("run", "-l", name, "--", "true")
    a.wait_listening()
    r = run_cli("-l", tmp_path / "x.sock", "-l", name, "--", "true")
    assert r.returncode == 1 and name in r.stderr and "in use" in r.stderr, r.stderr
    assert not (tmp_path / "x.sock").exists()
    assert a.stop() == 0


def test_exit_with_service_when_command_cannot_start(activator, tmp_path):
    """systemd-socket-activate fails when exec fails; with --exit-with-service activator exits (127) too."""
    path = tmp_path / "s.sock"
    a = activator("run", "--exit-with-service", "--now", "-l", path, "--", tmp_path / "missing")
    assert a.wait() == 127
    assert "cannot start" in a.log and str(tmp_path / "missing") in a.log
    assert not path.exists()
