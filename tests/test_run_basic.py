"""The core path of `activator run`: the daemon gets its sockets at fd 3.. and an exact LISTEN_* environment."""
import os
import sys

from conftest import PROBE, connect, free_port, pid_alive, read_probe


def test_accept_no_passes_listening_socket_and_exact_env(activator, tmp_path):
    port = free_port()
    sock_path = tmp_path / "s.sock"
    report = tmp_path / "report.json"
    a = activator("run", "-l", f"127.0.0.1:{port}", "-l", sock_path, "--", sys.executable, PROBE, report)
    a.wait_listening(2)
    with connect(("127.0.0.1", port)) as c:
        data = c.recv(100)
    info = read_probe(report)
    assert data == b"hello from %d\n" % info["pid"]
    env = info["env"]
    assert env["LISTEN_PID"] == str(info["pid"])
    assert env["LISTEN_FDS"] == "2"
    assert "LISTEN_FDNAMES" not in env
    fds = {f["fd"]: f for f in info["fds"]}
    assert sorted(fds) == [0, 1, 2, 3, 4]
    assert fds[3]["family"] == "inet" and fds[3]["listening"] and fds[3]["local"] == ["127.0.0.1", port]
    assert fds[4]["family"] == "unix" and fds[4]["local"] == str(sock_path)
    assert not fds[3]["nonblocking"] and not fds[3]["cloexec"]
    # (SigIgn is checked with a shell daemon in test_spawn: Python ignores SIGPIPE itself.)
    # A process group of its own (what a stop signals), in activator's session.
    assert info["ppid"] == a.pid and info["pgid"] == info["pid"] and info["sid"] == os.getsid(a.pid)
    assert a.stop() == 0
    assert not sock_path.exists()
    assert not pid_alive(info["pid"])
    assert "started" in a.log and "stopped" in a.log
