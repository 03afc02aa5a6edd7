"""Real socket-activated daemons from Debian packages: nbdkit and qemu-nbd, read with nbdinfo.

Both check LISTEN_PID against their own pid, so these also prove it is exact.
"""
import os
import signal
import subprocess

import pytest

from conftest import free_port, require, wait_for


def nbd_size(uri: str) -> int:
    r = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip())


def gone(pid):
    return not os.path.exists(f"/proc/{pid}")


@pytest.fixture(params=["tcp", "unix"])
def where(request, tmp_path):
    if request.param == "tcp":
        port = free_port()
        return f"127.0.0.1:{port}", f"nbd://127.0.0.1:{port}"
    path = tmp_path / "nbd.sock"
    return str(path), f"nbd+unix:///?socket={path}"


def test_nbdkit(activator, where):
    require("nbdkit", "nbdinfo")
    listen, uri = where
    a = activator("run", "-l", listen, "--", "nbdkit", "memory", "1M")
    a.wait_listening()
    assert a.children() == []  # nothing started before the first connection
    assert nbd_size(uri) == 1024 * 1024
    m = a.wait_log(r"started nbdkit as pid (\d+)")
    first = int(m.group(1))
    assert nbd_size(uri) == 1024 * 1024  # nbdkit keeps serving: the same instance
    assert a.children() == [first]
    # Served again after the daemon exits: a new instance on the next connection.
    os.kill(first, signal.SIGTERM)
    a.wait_log(rf"pid {first} exited")
    wait_for(lambda: gone(first), 5, what="the first nbdkit to be reaped")
    assert nbd_size(uri) == 1024 * 1024
    m = a.wait_log(r"started nbdkit as pid (\d+)", count=2)
    second = int(m.group(1))
    assert second != first
    assert a.stop() == 0
    assert gone(second)
    if listen.startswith("/"):
        assert not os.path.exists(listen)


def test_qemu_nbd(activator, where, tmp_path):
    require("qemu-nbd", "nbdinfo")
    listen, uri = where
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(3 * 1024 * 1024)
    a = activator("run", "-l", listen, "--", "qemu-nbd", "-f", "raw", image)
    a.wait_listening()
    assert nbd_size(uri) == 3 * 1024 * 1024
    # qemu-nbd without --persistent exits when its client leaves; the next connection starts another.
    m = a.wait_log(r"pid (\d+) exited with status 0")
    first = int(m.group(1))
    assert nbd_size(uri) == 3 * 1024 * 1024
    m = a.wait_log(r"pid (\d+) exited with status 0", count=2)
    assert int(m.group(1)) != first
    assert a.log.count("started qemu-nbd") == 2
    assert a.stop() == 0


def test_nbdkit_inetd_mode(activator):
    """--inetd with `nbdkit -s`: one nbdkit per connection, serving on its stdin/stdout.

    (nbdkit takes fds passed by socket activation as listening sockets, so it is used inetd-style here.)
    """
    require("nbdkit", "nbdinfo")
    port = free_port()
    a = activator("run", "--inetd", "-l", f"127.0.0.1:{port}", "--", "nbdkit", "-s", "memory", "2M")
    a.wait_listening()
    for _ in range(2):
        assert nbd_size(f"nbd://127.0.0.1:{port}") == 2 * 1024 * 1024
    wait_for(lambda: a.children() == [], 10, what="per-connection nbdkits to exit")
    assert a.stop() == 0
