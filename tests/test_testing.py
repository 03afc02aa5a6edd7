"""activator.testing and the socket_activated fixture, on nbdkit and on a small Python daemon."""
from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from activator.testing import DaemonDied, activate
from conftest import DAEMONS, PROBE, ROOT, pid_alive, read_probe, require

ECHO = str(DAEMONS / "echo_listen.py")
NOTIFIER = str(DAEMONS / "notifier.py")


def recv_exactly(conn, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise AssertionError(f"connection closed after {len(data)} of {n} bytes: {data!r}")
        data += chunk
    return data


def nbd_export_size(conn) -> int:
    """The NBD newstyle handshake up to the export size (NBD_OPT_EXPORT_NAME, default export)."""
    assert recv_exactly(conn, 8) == b"NBDMAGIC"
    assert recv_exactly(conn, 8) == b"IHAVEOPT"
    (flags,) = struct.unpack(">H", recv_exactly(conn, 2))
    assert flags & 1  # NBD_FLAG_FIXED_NEWSTYLE
    no_zeroes = flags & 2
    conn.sendall(struct.pack(">I", 1 | (2 if no_zeroes else 0)))  # C_FIXED_NEWSTYLE | C_NO_ZEROES
    conn.sendall(b"IHAVEOPT" + struct.pack(">II", 1, 0))  # NBD_OPT_EXPORT_NAME, ""
    size, _transmission_flags = struct.unpack(">QH", recv_exactly(conn, 10))
    return size


@pytest.mark.parametrize("listen", ["tcp", "unix"])
def test_nbdkit_memory_under_activation(listen):
    require("nbdkit")
    with activate(["nbdkit", "memory", "1M"], listen=listen) as nbd:
        if listen == "tcp":
            assert nbd.address[0] == "127.0.0.1" and nbd.address[1] > 0
        else:
            assert os.path.basename(nbd.address) == "sock" and os.path.exists(nbd.address)
        with nbd.connect() as c:
            assert nbd_export_size(c) == 1024 * 1024
        pid = nbd.pid
        assert pid_alive(pid)
        tempdir = nbd.tempdir
    assert not pid_alive(pid)
    assert nbd.returncode is not None
    if listen == "unix":
        assert not os.path.exists(tempdir)


def test_python_daemon_with_listen_fds():
    with activate([sys.executable, ECHO], fdname="echo") as d:
        with d.connect() as c:
            c.sendall(b"hello\nworld\n")
            f = c.makefile("rb")
            assert f.readline() == b"%d: hello\n" % d.pid
            assert f.readline() == b"%d: world\n" % d.pid
            f.close()
        with d.connect() as c2:  # the same daemon serves the next connection
            c2.sendall(b"again\n")
            assert c2.recv(100) == b"%d: again\n" % d.pid
        assert f"echo_listen: pid {d.pid} got 1 socket(s)" in d.stderr
        assert d.returncode is None
    assert d.returncode == 0  # SIGTERM at the end: a clean exit


def test_exact_environment_and_descriptors(tmp_path):
    report = tmp_path / "report.json"
    with activate([sys.executable, PROBE, str(report)], listen="unix", env={"EXTRA": "1", "HOME": None},
                  fdname="web") as d:
        info = read_probe(report)
        assert info["pid"] == d.pid
        env = info["env"]
        assert env["LISTEN_PID"] == str(d.pid) and env["LISTEN_FDS"] == "1" and env["LISTEN_FDNAMES"] == "web"
        assert env["EXTRA"] == "1" and "HOME" not in env and "NOTIFY_SOCKET" not in env
        fds = {f["fd"]: f for f in info["fds"]}
        assert sorted(fds) == [0, 1, 2, 3]
        assert fds[3]["listening"] and fds[3]["local"] == d.address and not fds[3]["cloexec"]


def test_daemon_that_dies_raises_with_status_and_stderr():
    code = "import sys; sys.stderr.write('boom: cannot start\\n'); sys.exit(7)"
    with activate([sys.executable, "-c", code], timeout=10) as d:
        started = time.monotonic()
        with pytest.raises(DaemonDied) as info:
            with d.connect() as c:  # accepted by the kernel: the listening socket is ours
                c.recv(10)
        assert time.monotonic() - started < 5  # not a timeout: noticed as soon as it died
        assert info.value.returncode == 7
        assert "boom: cannot start" in info.value.stderr
        assert "exited with status 7 before answering" in str(info.value)
        with pytest.raises(DaemonDied):
            d.connect()
        with pytest.raises(DaemonDied):
            d.wait_ready()


def test_daemon_killed_by_a_signal_mid_connection():
    code = "import os, signal, socket; s = socket.socket(fileno=3); c, _ = s.accept(); os.kill(os.getpid(), signal.SIGSEGV)"
    with activate([sys.executable, "-c", code]) as d:
        with pytest.raises(DaemonDied) as info:
            with d.connect() as c:
                c.recv(10)
        assert info.value.returncode == -signal.SIGSEGV
        assert "killed by signal SIGSEGV" in str(info.value)


def test_stubborn_daemon_is_killed_and_reaped_at_exit():
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    started = time.monotonic()
    with activate([sys.executable, "-c", code], stop_timeout=0.5) as d:
        deadline = time.monotonic() + 10
        while "up" not in d.stdout and time.monotonic() < deadline:
            time.sleep(0.02)
        assert d.stdout == "up\n"
    assert d.returncode == -signal.SIGKILL
    assert not pid_alive(d.pid)
    assert time.monotonic() - started < 10


def test_accept_mode_runs_one_instance_per_connection():
    with activate([sys.executable, ECHO], accept=True) as d:
        pids = set()
        for i in range(2):
            with d.connect() as c:
                c.sendall(b"ping %d\n" % i)
                line = c.recv(100)
                pid, _, rest = line.partition(b": ")
                assert rest == b"ping %d\n" % i
                pids.add(int(pid))
        assert len(pids) == 2 and d.pid not in pids  # .pid is the activator engine's
    assert not any(pid_alive(p) for p in pids)
    assert "listening" not in d.stderr  # the socket came from us, bound already


@pytest.mark.parametrize("impl", ["activator", "systemd"])
def test_notify_waits_for_ready_and_reads_status(impl):
    python = sys.executable
    env = {}
    if impl == "systemd":
        require("/usr/bin/python3")
        python = "/usr/bin/python3"
        env["PYTHONPATH"] = str(ROOT)
        if subprocess.run([python, "-c", "import systemd.daemon"], capture_output=True, timeout=30).returncode:
            require("python3-systemd-for-/usr/bin/python3")
    with activate([python, NOTIFIER, impl, "ready"], notify=True, env=env) as d:
        assert d.wait_ready() is d
        assert d.status == "serving"
        with d.connect() as c:
            assert c.recv(100) == b"hello from %d\n" % d.pid


def test_notify_wait_ready_times_out():
    with activate([sys.executable, NOTIFIER, "activator", "never-ready"], notify=True) as d:
        with pytest.raises(TimeoutError):
            d.wait_ready(timeout=0.3)
        deadline = time.monotonic() + 10
        while d.status is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert d.status == "warming up"


def test_socket_activated_fixture_cleans_up_at_teardown(tmp_path):
    """Through the pytest11 entry point, in a pytest of its own."""
    pid_file = tmp_path / "pids"
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(f"""
        import sys

        def test_two(socket_activated):
            a = socket_activated([sys.executable, {ECHO!r}])
            b = socket_activated([sys.executable, {ECHO!r}], listen="unix")
            for d in (a, b):
                with d.connect() as c:
                    c.sendall(b"x\\n")
                    assert c.recv(100) == b"%d: x\\n" % d.pid
            open({str(pid_file)!r}, "w").write(f"{{a.pid}} {{b.pid}} {{b.tempdir}}")
    """))
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_inner.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b, tempdir = pid_file.read_text().split()
    assert not pid_alive(int(a)) and not pid_alive(int(b))
    assert not os.path.exists(tempdir)
