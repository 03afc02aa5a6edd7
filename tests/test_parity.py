"""Parity with systemd-socket-activate: the same scenario under both launchers, same probe daemon,
same addresses; the daemon's descriptor layout and LISTEN_* environment must be the same.

Known, deliberate differences (not compared):
* systemd-socket-activate gives the daemon a minimal environment (PATH, LC_CTYPE, LISTEN_*, -E ones);
  activator passes its whole environment on (minus LISTEN_*/NOTIFY_SOCKET/WATCHDOG_*).
  Only LISTEN_* and the -E variables are compared.
* Accept mode without --fdname: systemd-socket-activate sets no LISTEN_FDNAMES, activator sets
  LISTEN_FDNAMES=connection, which is what systemd itself does for Accept=yes services.
* Accept mode: activator sets REMOTE_ADDR/REMOTE_PORT for IP peers (as systemd does);
  systemd-socket-activate (252) does not.
* --inetd: systemd-socket-activate 252 puts the *listening* socket on stdin/stdout (a bug fixed in later
  systemd); activator puts the accepted connection there (tests/test_accept.py), so that is not compared.
* In Accept=no mode systemd-socket-activate execs the daemon (it is gone); activator stays its parent.
"""
import os
import select
import signal
import socket
import subprocess
import sys
import time


from conftest import PROBE, free_port, read_probe, require, wait_for

PY = sys.executable
SSA = "systemd-socket-activate"


def layout(info):
    """What must match: per fd, whether it is a socket and its kind, state and flags."""
    result = []
    for f in info["fds"]:
        if "family" not in f:
            result.append((f["fd"], "not-a-socket"))
            continue
        local = f.get("local")
        if f["type"] == "stream" and not f["listening"] and isinstance(local, list):
            local = local[:2]
        result.append((f["fd"], f["family"], f["type"], f["listening"], f["nonblocking"], f["cloexec"],
                       str(local)))
    return result


def listen_env(info, extra=()):
    env = info["env"]
    assert env.get("LISTEN_PID") == str(info["pid"]), env  # exact in both
    picked = {k: v for k, v in env.items() if k in ("LISTEN_FDS", "LISTEN_FDNAMES") or k in extra}
    return picked


def tcp_trigger(port, payload=b""):
    def trigger():
        c = socket.create_connection(("127.0.0.1", port), timeout=10)
        if payload:
            c.sendall(payload)
        return c
    return trigger


def unix_trigger(path, kind=socket.SOCK_STREAM):
    def trigger():
        c = socket.socket(socket.AF_UNIX, kind)
        c.settimeout(10)
        c.connect(str(path))
        return c
    return trigger


def udp_trigger(port):
    def trigger():
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.sendto(b"go", ("127.0.0.1", port))
        return c
    return trigger


def wait_listening_ssa(proc, n, lines):
    fd = proc.stderr.fileno()

    def ready():
        if select.select([fd], [], [], 0.1)[0]:  # unbuffered, never blocking beyond wait_for's deadline
            lines.append(os.read(fd, 65536).decode(errors="replace"))
        return "".join(lines).count("Listening on") >= n or proc.poll() is not None
    wait_for(ready, 10, interval=0, what="systemd-socket-activate to listen")
    assert proc.poll() is None, "".join(lines)


def under_ssa(args, n_sockets, mode, trigger, report, env):
    proc = subprocess.Popen([SSA, *args, "--", PY, PROBE, str(report), mode], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    lines = []
    try:
        wait_listening_ssa(proc, n_sockets, lines)
        client = trigger()
        try:
            info = read_probe(report)
        finally:
            client.close()
    finally:
        kids = []
        try:
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            pass
        for pid in [proc.pid, *kids]:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        proc.wait(10)
        proc.stderr.close()
    return info


def under_activator(activator, args, n_sockets, mode, trigger, report, env):
    a = activator("run", *args, "--", PY, PROBE, report, mode, env=env)
    a.wait_listening(n_sockets)
    client = trigger()
    try:
        info = read_probe(report)
    finally:
        client.close()
    assert a.stop() == 0
    return info


def compare(activator, tmp_path, args, n_sockets, mode, trigger, extra_env=(), cleanup=()):
    require(SSA)
    env = {"PATH": os.environ["PATH"], "PASSED_THROUGH": "from parent"}
    r1, r2 = tmp_path / "ssa.json", tmp_path / "act.json"
    ssa = under_ssa(args, n_sockets, mode, trigger, r1, env)
    for path in cleanup:  # systemd-socket-activate leaves its unix socket files behind
        if os.path.exists(path):
            os.unlink(path)
    act = under_activator(activator, args, n_sockets, mode, trigger, r2, env)
    assert layout(act) == layout(ssa)
    assert listen_env(act, extra_env) == listen_env(ssa, extra_env)
    return ssa, act


def test_two_sockets_with_fdnames_and_setenv(activator, tmp_path):
    port = free_port()
    path = tmp_path / "u.sock"
    args = ["-l", f"127.0.0.1:{port}", "-l", str(path), "--fdname", "a:b",
            "-E", "PASSED_THROUGH", "-E", "SET=1", "-E", "UNSET_HERE"]
    ssa, act = compare(activator, tmp_path, args, 2, "serve", tcp_trigger(port),
                       extra_env=("PASSED_THROUGH", "SET", "UNSET_HERE"), cleanup=[path])
    assert act["env"]["LISTEN_FDNAMES"] == "a:b" and act["env"]["LISTEN_FDS"] == "2"
    assert act["env"]["PASSED_THROUGH"] == "from parent" and act["env"]["UNSET_HERE"] == ""
    assert [f["fd"] for f in act["fds"]] == [0, 1, 2, 3, 4]


def test_three_families_without_names(activator, tmp_path):
    port, port6 = free_port(), free_port(socket.AF_INET6)
    path = tmp_path / "u.sock"
    args = ["-l", f"127.0.0.1:{port}", "-l", f"[::1]:{port6}", "-l", str(path)]
    ssa, act = compare(activator, tmp_path, args, 3, "serve", unix_trigger(path), cleanup=[path])
    assert "LISTEN_FDNAMES" not in act["env"] and act["env"]["LISTEN_FDS"] == "3"


def test_one_name_for_all(activator, tmp_path):
    path1, path2 = tmp_path / "1.sock", tmp_path / "2.sock"
    args = ["-l", str(path1), "-l", str(path2), "--fdname", "same"]
    ssa, act = compare(activator, tmp_path, args, 2, "serve", unix_trigger(path2), cleanup=[path1, path2])
    assert act["env"]["LISTEN_FDNAMES"] == "same:same"


def test_datagram(activator, tmp_path):
    port = free_port()
    ssa, act = compare(activator, tmp_path, ["-d", "-l", f"127.0.0.1:{port}"], 1, "serve", udp_trigger(port))
    assert layout(act)[3][2] == "datagram"


def test_seqpacket(activator, tmp_path):
    path = tmp_path / "sp.sock"
    compare(activator, tmp_path, ["--seqpacket", "-l", str(path)], 1, "serve",
            unix_trigger(path, socket.SOCK_SEQPACKET), cleanup=[path])


def test_accept_with_fdname(activator, tmp_path):
    port = free_port()
    ssa, act = compare(activator, tmp_path, ["-a", "-l", f"127.0.0.1:{port}", "--fdname", "client"], 1,
                       "echo-fd3", tcp_trigger(port, b"x"))
    assert act["env"]["LISTEN_FDNAMES"] == "client" and act["env"]["LISTEN_FDS"] == "1"
    assert not layout(act)[3][3]  # fd 3 is the connection, not listening


def test_accept_without_fdname(activator, tmp_path):
    require(SSA)
    port = free_port()
    env = {"PATH": os.environ["PATH"]}
    args = ["-a", "-l", f"127.0.0.1:{port}"]
    ssa = under_ssa(args, 1, "echo-fd3", tcp_trigger(port, b"x"), tmp_path / "ssa.json", env)
    act = under_activator(activator, args, 1, "echo-fd3", tcp_trigger(port, b"x"), tmp_path / "act.json", env)
    assert layout(act) == layout(ssa)
    assert act["env"]["LISTEN_FDS"] == ssa["env"]["LISTEN_FDS"] == "1"
    assert act["env"]["LISTEN_PID"] == str(act["pid"]) and ssa["env"]["LISTEN_PID"] == str(ssa["pid"])
    # The documented difference: systemd (proper) names an accepted connection "connection";
    # systemd-socket-activate sets no LISTEN_FDNAMES at all. activator follows systemd.
    assert "LISTEN_FDNAMES" not in ssa["env"]
    assert act["env"]["LISTEN_FDNAMES"] == "connection"
    # activator also sets REMOTE_ADDR/REMOTE_PORT, as systemd does for IP peers.
    assert act["env"]["REMOTE_ADDR"] == "127.0.0.1"


def test_drop_in_replacement_command_line(tmp_path):
    """The same argv with only the program name changed starts the daemon the same way (smoke)."""
    require(SSA)
    port = free_port()
    for prog in ([SSA], [PY, "-m", "activator", "run"]):
        report = tmp_path / f"{len(prog)}.json"
        proc = subprocess.Popen([*prog, "-l", f"127.0.0.1:{port}", "--", PY, PROBE, str(report), "once"],
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    c = socket.create_connection(("127.0.0.1", port), timeout=10)
                    break
                except ConnectionRefusedError:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
            with c:
                assert c.recv(100).startswith(b"hello from ")
        finally:
            for pid in [proc.pid] + [read_probe(report)["pid"]] if report.exists() else [proc.pid]:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            proc.wait(10)


def test_activator_under_systemd_socket_activate(tmp_path):
    """systemd-socket-activate -l A -- activator run -l B -- daemon: A (inherited) at fd 3, then B at fd 4."""
    require(SSA)
    outer, inner = free_port(), free_port()
    report = tmp_path / "r.json"
    proc = subprocess.Popen(
        [SSA, "-l", f"127.0.0.1:{outer}", "--fdname", "outer", "--", PY, "-m", "activator", "run",
         "-l", f"127.0.0.1:{inner}", "--", PY, PROBE, str(report)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={"PATH": os.environ["PATH"]}, cwd=str(tmp_path),
    )
    lines = []
    try:
        # systemd-socket-activate starts activator on the first connection to the outer socket;
        # activator then starts the daemon on the connection still waiting in that socket's backlog.
        wait_listening_ssa(proc, 1, lines)
        with socket.create_connection(("127.0.0.1", outer), timeout=10) as c:
            assert c.recv(100).startswith(b"hello from ")
        info = read_probe(report)
        assert info["ppid"] == proc.pid  # activator is the process systemd-socket-activate exec'd
        fds = {f["fd"]: f for f in info["fds"]}
        assert sorted(fds) == [0, 1, 2, 3, 4]
        assert fds[3]["local"] == ["127.0.0.1", outer] and fds[4]["local"] == ["127.0.0.1", inner]
        assert fds[3]["listening"] and fds[4]["listening"]
        env = info["env"]
        assert env["LISTEN_PID"] == str(info["pid"]) and env["LISTEN_FDS"] == "2"
        assert env["LISTEN_FDNAMES"] == "outer:unknown"
        with socket.create_connection(("127.0.0.1", inner), timeout=10) as c:
            assert c.recv(100) == b"hello from %d\n" % info["pid"]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(20) == 0
        proc.stderr.close()
    wait_for(lambda: not os.path.exists(f"/proc/{info['pid']}"), 5, what="the daemon to be gone")
