"""Accept=yes (`-a`): one instance per connection, the connection at fd 3 or on stdin/stdout (--inetd),
REMOTE_ADDR/REMOTE_PORT, --fdname, --max-connections. Real processes and sockets only."""
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import PROBE, connect, free_dual_port, free_port, read_probe, wait_for

PY = sys.executable


def fds_of(info):
    return {f["fd"]: f for f in info["fds"]}


def echo(sock, payload: bytes) -> bytes:
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def assert_gone(pid):
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 5, what=f"pid {pid} to be gone")


def test_accept_connection_at_fd3_with_exact_env(activator, tmp_path):
    port = free_port()
    report = tmp_path / "r.json"
    a = activator("run", "-a", "-l", f"127.0.0.1:{port}", "--", PY, PROBE, report, "echo-fd3")
    a.wait_listening()
    with connect(("127.0.0.1", port)) as c:
        assert echo(c, b"ping over fd 3") == b"ping over fd 3"
        client_port = c.getsockname()[1]
    info = read_probe(report)
    env = info["env"]
    assert env["LISTEN_FDS"] == "1"
    assert env["LISTEN_PID"] == str(info["pid"])
    assert env["LISTEN_FDNAMES"] == "connection"
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["REMOTE_PORT"] == str(client_port)
    fds = fds_of(info)
    assert sorted(fds) == [0, 1, 2, 3]
    assert fds[3]["family"] == "inet" and fds[3]["type"] == "stream" and not fds[3]["listening"]
    assert fds[3]["local"] == ["127.0.0.1", port]
    assert not fds[3]["nonblocking"] and not fds[3]["cloexec"]  # accepted blocking, as systemd does
    assert info["ppid"] == a.pid
    assert_gone(info["pid"])
    assert a.stop() == 0


def test_accept_one_instance_per_connection_concurrently(activator, tmp_path):
    port = free_port()
    a = activator("run", "-a", "-l", f"127.0.0.1:{port}", "--", PY, PROBE, tmp_path / "r.json", "echo-fd3")
    a.wait_listening()
    clients = [connect(("127.0.0.1", port)) for _ in range(3)]
    try:
        wait_for(lambda: len(a.children()) == 3, what="three instances")
        pids = a.children()
        for i, c in enumerate(clients):
            assert echo(c, b"client %d" % i) == b"client %d" % i
    finally:
        for c in clients:
            c.close()
    for pid in pids:
        assert_gone(pid)
    assert a.stop() == 0


def test_accept_ipv6_and_dual_stack_remote_addr(activator, tmp_path):
    port = free_dual_port()
    report = tmp_path / "r.json"
    a = activator("run", "-a", "-l", str(port), "--", PY, PROBE, report, "echo-fd3")
    a.wait_listening()
    with connect(("::1", port)) as c:
        assert echo(c, b"v6") == b"v6"
        cport = c.getsockname()[1]
    env = read_probe(report)["env"]
    assert env["REMOTE_ADDR"] == "::1" and env["REMOTE_PORT"] == str(cport)
    report.unlink()
    with connect(("127.0.0.1", port)) as c:
        assert echo(c, b"v4") == b"v4"
        cport = c.getsockname()[1]
    env = read_probe(report)["env"]
    assert env["REMOTE_ADDR"] == "127.0.0.1" and env["REMOTE_PORT"] == str(cport)  # not ::ffff:127.0.0.1
    assert a.stop() == 0


def test_accept_unix_has_no_remote_addr(activator, tmp_path):
    path = tmp_path / "a.sock"
    report = tmp_path / "r.json"
    a = activator("run", "-a", "-l", path, "--", PY, PROBE, report, "echo-fd3")
    a.wait_listening()
    with connect(str(path)) as c:
        assert echo(c, b"unix") == b"unix"
    info = read_probe(report)
    assert "REMOTE_ADDR" not in info["env"] and "REMOTE_PORT" not in info["env"]
    assert fds_of(info)[3]["family"] == "unix"
    assert a.stop() == 0
    assert not path.exists()


def test_accept_seqpacket(activator, tmp_path):
    path = tmp_path / "sp.sock"
    report = tmp_path / "r.json"
    a = activator("run", "-a", "--seqpacket", "-l", path, "--", PY, PROBE, report, "echo-fd3")
    a.wait_listening()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as c:
        c.settimeout(10)
        c.connect(str(path))
        c.sendall(b"one packet")
        assert c.recv(100) == b"one packet"
    assert fds_of(read_probe(report))[3]["type"] == "seqpacket"
    assert a.stop() == 0


def test_inetd_with_cat(activator, tmp_path):
    port = free_port()
    a = activator("run", "--inetd", "-l", f"127.0.0.1:{port}", "--", "cat")
    a.wait_listening()
    payload = os.urandom(200_000)
    with connect(("127.0.0.1", port)) as c:
        assert echo(c, payload) == payload
    with connect(("127.0.0.1", port)) as c:
        assert echo(c, b"again\n") == b"again\n"
    assert a.stop() == 0


def test_inetd_env_and_fds(activator, tmp_path):
    port = free_port()
    report = tmp_path / "r.json"
    a = activator("run", "-a", "--inetd", "-l", f"127.0.0.1:{port}", "--", PY, PROBE, report, "echo-inetd")
    a.wait_listening()
    with connect(("127.0.0.1", port)) as c:
        assert echo(c, b"via stdin") == b"via stdin"
        cport = c.getsockname()[1]
    info = read_probe(report)
    fds = fds_of(info)
    assert sorted(fds) == [0, 1, 2]
    assert fds[0]["family"] == "inet" and fds[1]["family"] == "inet"
    assert fds[0]["target"] == fds[1]["target"]  # the same connection on both
    assert not any(k.startswith("LISTEN_") for k in info["env"])
    assert info["env"]["REMOTE_ADDR"] == "127.0.0.1" and info["env"]["REMOTE_PORT"] == str(cport)
    assert a.stop() == 0


def test_accept_fdname(activator, tmp_path):
    port = free_port()
    report = tmp_path / "r.json"
    a = activator("run", "-a", "--fdname", "client", "-l", f"127.0.0.1:{port}", "--", PY, PROBE, report, "echo-fd3")
    a.wait_listening()
    with connect(("127.0.0.1", port)) as c:
        echo(c, b"x")
    assert read_probe(report)["env"]["LISTEN_FDNAMES"] == "client"
    assert a.stop() == 0


def test_max_connections_closes_extra_at_once(activator, tmp_path):
    port = free_port()
    a = activator("run", "-a", "--max-connections", "2", "-l", f"127.0.0.1:{port}", "--",
                  PY, PROBE, tmp_path / "r.json", "echo-fd3")
    a.wait_listening()
    held = [connect(("127.0.0.1", port)) for _ in range(2)]
    try:
        wait_for(lambda: len(a.children()) == 2, what="two instances")
        extra = connect(("127.0.0.1", port))
        t0 = time.monotonic()
        try:
            assert extra.recv(10) == b""  # closed at once, no instance
        except ConnectionResetError:
            pass
        assert time.monotonic() - t0 < 5
        extra.close()
        a.wait_log(r"too many connections \(2\)")
        assert len(a.children()) == 2
        # the held ones still work; once one ends, a new connection gets an instance again
        assert echo(held[0], b"still here") == b"still here"
        wait_for(lambda: len(a.children()) == 1, what="one instance to end")
        with connect(("127.0.0.1", port)) as c:
            assert echo(c, b"room again") == b"room again"
    finally:
        for c in held:
            c.close()
    assert a.stop() == 0


@pytest.mark.parametrize("extra", [["-d"], ["--now"], ["--exit-with-service"]])
def test_accept_incompatible_options_are_usage_errors(tmp_path, extra):
    r = subprocess.run([PY, "-m", "activator", "run", "-a", *extra, "-l", str(tmp_path / "s.sock"), "--", "true"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "s.sock").exists()


def test_accept_stop_ends_running_instances(activator, tmp_path):
    port = free_port()
    path = tmp_path / "s.sock"
    a = activator("run", "-a", "-l", f"127.0.0.1:{port}", "-l", path, "--", PY, PROBE, tmp_path / "r.json", "echo-fd3")
    a.wait_listening(2)
    c1, c2 = connect(("127.0.0.1", port)), connect(str(path))
    try:
        wait_for(lambda: len(a.children()) == 2, what="two instances")
        pids = a.children()
        assert a.stop() == 0
    finally:
        c1.close()
        c2.close()
    for pid in pids:
        assert_gone(pid)
    assert not path.exists()
