"""`activator serve`: real sockets and daemons from TOML units, the shipped configs, and SIGHUP reload."""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import PROBE, ROOT, connect, free_dual_port, free_port, pid_alive, read_probe, require, wait_for

CONFIGS = ROOT / "configs"
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by `nobody`, unlike a venv under /root


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def listener_inode(port: int) -> int:
    """The inode of the socket listening on TCP ``port`` (IPv4 or IPv6), from /proc/net."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    return int(fields[9])
    raise AssertionError(f"nothing listens on port {port}")


def fd_targets(pid: int) -> set[str]:
    result = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            result.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return result


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def echo_once(port: int, payload: bytes = b"ping\n") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            chunk = c.recv(4096)
            if not chunk:
                return data
            data += chunk


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------ shipped configs
def rewrite(text: str, tmp: Path) -> tuple[str, dict[int, int]]:
    """A copy of a shipped config on free ports and under ``tmp`` instead of /run/activator."""
    ports: dict[int, int] = {}

    def port_for(old: str) -> int:
        # Free on [::] dual-stack, which a bare "PORT" binds (free on 127.0.0.1 alone is not enough).
        return ports.setdefault(int(old), free_dual_port())

    out = []
    for line in text.splitlines():
        if not line.lstrip().startswith("#") and "listen-" in line:
            line = re.sub(r'"127\.0\.0\.1:(\d+)"', lambda m: f'"127.0.0.1:{port_for(m.group(1))}"', line)
            line = re.sub(r'"(\d+)"', lambda m: f'"{port_for(m.group(1))}"', line)
            line = re.sub(r'"vsock::(\d+)"', lambda m: f'"vsock::{random.randint(20000, 60000)}"', line)
        out.append(line.replace("/run/activator", str(tmp)))
    return "\n".join(out) + "\n", ports


def nbdinfo_size(uri: str) -> int:
    r = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


# config -> the tools its daemons and clients need
SHIPPED = {
    "echo.toml": [],
    "nbdkit.toml": ["nbdkit", "nbdinfo"],
    "qemu-nbd.toml": ["qemu-nbd", "qemu-img", "nbdinfo"],
    "qemu-ga.toml": ["/usr/sbin/qemu-ga", "socat"],
    "multi.toml": ["nbdkit", "nbdinfo"],
    "default/activator.toml": ["nbdkit", "nbdinfo"],
}


def test_every_shipped_config_is_covered():
    assert sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.toml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_serve_shipped_config(activator, tmp_path, name):
    require(*SHIPPED[name])
    text, ports = rewrite((CONFIGS / name).read_text(), tmp_path)
    cfg = write_config(tmp_path / "units.toml", text)
    n_listen = sum(len(re.findall(r'"(?:127|[0-9/@v])[^"]*"', line)) for line in text.splitlines()
                   if "listen-" in line and not line.lstrip().startswith("#"))
    if name == "qemu-nbd.toml":
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(tmp_path / "disk.img"), "64M"], check=True)
    a = activator("serve", cfg)
    a.wait_listening(n_listen)
    if name == "echo.toml":
        assert echo_once(ports[7007], b"hello\n") == b"hello\n"
    elif name == "nbdkit.toml":
        assert nbdinfo_size(f"nbd://127.0.0.1:{ports[10809]}") == 1 << 30
        assert nbdinfo_size(f"nbd+unix:///?socket={tmp_path}/nbdkit.sock") == 1 << 30
    elif name == "qemu-nbd.toml":
        assert nbdinfo_size(f"nbd://127.0.0.1:{ports[10810]}") == 64 << 20
        assert nbdinfo_size(f"nbd://127.0.0.1:{ports[10810]}") == 64 << 20  # --persistent: still there
    elif name == "qemu-ga.toml":
        out = subprocess.run(["socat", "-t", "5", "-", f"UNIX-CONNECT:{tmp_path}/qemu-ga.sock"],
                             input=b'{"execute":"guest-ping"}\n', capture_output=True, timeout=30)
        assert b'{"return": {}}' in out.stdout, out
        assert "qemu-ga-vsock: listening on vsock::" in a.log
    elif name == "multi.toml":
        assert echo_once(ports[7008]) == b"ping\n"
        assert re.match(rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\+00:00\n", echo_once(ports[7013], b""))
        assert nbdinfo_size(f"nbd://127.0.0.1:{ports[10811]}") == 64 << 20
        assert nbdinfo_size(f"nbd+unix:///?socket={tmp_path}/ram.sock") == 64 << 20
    elif name == "default/activator.toml":
        assert echo_once(ports[8080]) == b"ping\n"
        assert nbdinfo_size(f"nbd://127.0.0.1:{ports[10809]}") == 64 << 20
    assert a.stop() == 0
    assert "Traceback" not in a.log and "error" not in a.log, a.log


# ------------------------------------------------------------------ keys doing what they say
def test_socket_and_service_keys_with_a_real_daemon(activator, tmp_path):
    root = os.geteuid() == 0
    port = free_port()
    # a directory that `nobody` can use (pytest's tmp_path is private to root)
    shared = Path(tempfile.mkdtemp(prefix="activator-serve-"))
    try:
        shared.chmod(0o1777)  # sticky: a socket directory in it is refused unless it is ours
        sock_dir = shared / "run" / "sub"
        work = shared / "work"
        work.mkdir()
        (shared / "env").write_text('FROM_FILE="quoted value"\nOVERRIDDEN=by-file\n# comment\n')
        report = shared / "report.json"
        # The daemon runs as nobody: it needs a copy of the probe it can read wherever the checkout is.
        probe = shared / "probe.py"
        shutil.copy(PROBE, probe)
        probe.chmod(0o755)
        owner = 'socket-user = "nobody"\nsocket-group = "nogroup"\n' if root else ""
        creds = 'user = "nobody"\ngroup = "nogroup"\n' if root else ""
        cfg = write_config(tmp_path / "units.toml", f"""
[probe]
description = "keys"

[[probe.socket]]
listen-stream = "{sock_dir}/probe.sock"
file-descriptor-name = "local"
socket-mode = "0640"
directory-mode = "0710"
remove-on-stop = true
{owner}
[[probe.socket]]
listen-stream = "127.0.0.1:{port}"
listen-datagram = "127.0.0.1:{port}"
keep-alive = true
receive-buffer = "256K"

[probe.service]
exec-start = ["{SYSTEM_PYTHON}", "{probe}", "{report}"]
environment = {{ GREETING = "hello world", OVERRIDDEN = "by-table" }}
environment-file = ["{shared}/env", "-{shared}/missing"]
working-directory = "{work}"
{creds}""")
        a = activator("serve", cfg)
        a.wait_listening(3)
        st = os.stat(sock_dir / "probe.sock")
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
        assert stat.S_IMODE(os.stat(sock_dir).st_mode) == 0o710
        assert stat.S_IMODE(os.stat(sock_dir.parent).st_mode) == 0o710
        if root:
            import grp
            import pwd

            assert (st.st_uid, st.st_gid) == (pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)
        with connect(str(sock_dir / "probe.sock")) as c:
            assert c.recv(100).startswith(b"hello from")
        info = read_probe(report)
        env = info["env"]
        assert env["LISTEN_FDS"] == "3" and env["LISTEN_PID"] == str(info["pid"])
        assert env["LISTEN_FDNAMES"] == "local:probe:probe"  # unnamed sockets take the unit's name
        assert env["GREETING"] == "hello world" and env["FROM_FILE"] == "quoted value"
        assert env["OVERRIDDEN"] == "by-file"  # systemd: environment-file wins over environment
        assert info["cwd"] == str(work)
        fds = {f["fd"]: f for f in info["fds"]}
        assert fds[3]["family"] == "unix" and fds[3]["listening"]
        assert fds[4]["family"] == "inet" and fds[4]["type"] == "stream"
        assert fds[5]["family"] == "inet" and fds[5]["type"] == "datagram"
        if root:
            assert (info["uid"], info["gid"]) == (65534, 65534)
        assert a.stop() == 0
        assert not (sock_dir / "probe.sock").exists()  # remove-on-stop
        assert not pid_alive(info["pid"])
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_kill_modes_end_the_whole_tree_or_only_the_main_process(activator, tmp_path):
    script = 'echo $$ > {d}/main; {child} & echo $! > {d}/child; wait'
    units = {
        # the whole tree gets the kill signal
        "cg": ("control-group", "SIGTERM", "sleep 300"),
        # the main process gets SIGINT, what is left gets SIGKILL, even a child that ignores SIGTERM
        "mixed": ("mixed", "SIGINT", "(trap '' TERM; exec sleep 300)"),
        # only the main process
        "process": ("process", "SIGTERM", "sleep 300"),
    }
    parts = []
    for name, (mode, sig, child) in units.items():
        d = tmp_path / name
        d.mkdir()
        trap = f"trap 'echo INT > {d}/got; exit 0' INT; " if sig == "SIGINT" else ""
        cmd = trap + script.format(d=d, child=child)
        parts.append(f"""
[{name}]
socket.listen-stream = "{tmp_path}/{name}.sock"
service.exec-start = ["sh", "-c", "{cmd}"]
service.kill-mode = "{mode}"
service.kill-signal = "{sig}"
service.timeout-stop-sec = 60
""")
    keep = f'[keep]\nsocket.listen-stream = "{tmp_path}/keep.sock"\nservice.exec-start = "true"\n'
    cfg = write_config(tmp_path / "units.toml", "".join(parts) + keep)
    a = activator("serve", cfg)
    a.wait_listening(4)
    pids = {}
    for name in units:
        connect(str(tmp_path / f"{name}.sock")).close()
        d = tmp_path / name
        wait_for(lambda: (d / "child").exists() and (d / "child").read_text().strip(), what=f"{name} started")
        pids[name] = (int((d / "main").read_text()), int((d / "child").read_text()))
    try:
        # Removing the units stops them (reload), each by its kill mode; timeout-stop-sec is far away.
        write_config(cfg, keep)
        a.signal(signal.SIGHUP)
        a.wait_log("reloaded: 1 unchanged, 0 changed, 0 added, 3 removed")
        for name in ("cg", "mixed"):
            main, child = pids[name]
            wait_for(lambda: not pid_alive(main) and not pid_alive(child), timeout=10, what=f"{name} tree gone")
        assert (tmp_path / "mixed" / "got").read_text() == "INT\n"  # kill-signal reached the main process
        main, child = pids["process"]
        wait_for(lambda: not pid_alive(main), timeout=10, what="process main gone")
        assert pid_alive(child), "kill-mode=process must leave the other processes alone"
        for name in ("cg", "mixed"):  # (the process-mode leftover still holds its copy of the socket)
            # awaited: pid_alive() counts a zombie as gone, and the socket closes once activator has reaped it
            wait_for(lambda: refused_unix(tmp_path / f"{name}.sock"), timeout=10, what=f"{name}'s socket closed")
    finally:
        for main, child in pids.values():
            kill_pid(child)
    assert a.stop() == 0


def refused_unix(path: Path) -> bool:
    try:
        connect(str(path), timeout=2).close()
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    return False


def test_serve_binds_everything_or_nothing(activator, tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = busy.getsockname()[1]
    ok_port = free_port()
    (tmp_path / "file").write_text("not a directory")
    cfg = write_config(tmp_path / "units.toml", f"""
[a]
socket.listen-stream = ["127.0.0.1:{ok_port}", "{tmp_path}/new-dir/a.sock"]
service.exec-start = ["{sys.executable}", "{PROBE}", "{tmp_path}/a.json"]
[b]
socket.listen-stream = "127.0.0.1:{taken}"
service.exec-start = "true"
[c]
socket.listen-stream = "{tmp_path}/file/c.sock"
service.exec-start = "true"
""")
    try:
        a = activator("serve", cfg)
        assert a.wait(20) == 1
        assert f"cannot listen on 127.0.0.1:{taken}: Address already in use" in a.log
        assert f"cannot listen on {tmp_path}/file/c.sock" in a.log
        assert "Traceback" not in a.log and "started" not in a.log
        assert not (tmp_path / "new-dir").exists()  # the socket and the directory made for it are gone
        with socket.socket() as s:
            s.bind(("127.0.0.1", ok_port))  # not held
    finally:
        busy.close()


def test_listen_inherited_from_our_own_parent(activator, tmp_path):
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    port = lsock.getsockname()[1]
    report = tmp_path / "r.json"
    cfg = write_config(tmp_path / "units.toml", f"""
[web]
socket.listen-inherited = "web"
service.exec-start = ["{sys.executable}", "{PROBE}", "{report}"]
""")
    bad = write_config(tmp_path / "bad.toml", '[w]\nsocket.listen-inherited = "nope"\nservice.exec-start = "true"\n')

    def place_fd():
        os.dup2(lsock.fileno(), 3)

    prefix = ["sh", "-c", 'LISTEN_PID=$$ exec "$0" "$@"', sys.executable, "-m", "activator"]
    env = {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "web"}
    try:
        a = activator("serve", bad, argv_prefix=prefix, env=env, pass_fds=(3,), preexec_fn=place_fd)
        assert a.wait(20) == 1
        assert "socket.listen-inherited: no inherited descriptor 'nope' was passed" in a.log
        assert "web (fd 3)" in a.log and "Traceback" not in a.log

        a = activator("serve", cfg, argv_prefix=prefix, env=env, pass_fds=(3,), preexec_fn=place_fd)
        lsock.close()  # only activator holds it now
        wait_for(lambda: a.children() == [] and a.proc.poll() is None and "socket:" in str(fd_targets(a.pid)),
                 what="activator up")
        with connect(("127.0.0.1", port)) as c:
            assert c.recv(100).startswith(b"hello from")
        info = read_probe(report)
        assert info["env"]["LISTEN_FDNAMES"] == "web" and info["env"]["LISTEN_FDS"] == "1"
        assert info["env"]["LISTEN_PID"] == str(info["pid"])
        fd3 = [f for f in info["fds"] if f["fd"] == 3][0]
        assert fd3["local"] == ["127.0.0.1", port] and fd3["listening"]
        assert a.stop() == 0
    finally:
        lsock.close()


# ------------------------------------------------------------------ reload
class Hammer(threading.Thread):
    """Connects to an echo port again and again; counts answers and failures."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.ok = 0
        self.failures: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 60
        while not self.halt.is_set() and time.monotonic() < deadline:
            try:
                data = echo_once(self.port, b"x%d\n" % self.ok)
                if data == b"x%d\n" % self.ok:
                    self.ok += 1
                else:
                    self.failures.append(f"answer {data!r}")
            except OSError as exc:
                self.failures.append(repr(exc))

    def stop(self) -> None:
        self.halt.set()
        self.join(20)


def test_reload_keeps_unchanged_sockets_and_applies_the_rest(activator, tmp_path):
    p_keep, p_gone, p_same, p_old, p_new, p_added = (free_port() for _ in range(6))

    def probe(name, extra=""):
        return f'service.exec-start = ["{sys.executable}", "{PROBE}", "{tmp_path}/{name}.json"]\n{extra}'

    keep = f"""
[keep]
socket.listen-stream = "127.0.0.1:{p_keep}"
socket.accept = true
service.exec-start = "cat"
service.standard-input = "socket"
"""
    gone = f"""
[gone]
socket.listen-stream = ["127.0.0.1:{p_gone}", "{tmp_path}/gone.sock"]
socket.remove-on-stop = true
""" + probe("gone")
    changed_v1 = f"""
[changed]
socket.listen-stream = ["127.0.0.1:{p_same}", "127.0.0.1:{p_old}"]
""" + probe("changed1", 'service.environment = { VERSION = "1" }\n')
    changed_v2 = f"""
[changed]
socket.listen-stream = ["127.0.0.1:{p_same}", "127.0.0.1:{p_new}"]
""" + probe("changed2", 'service.environment = { VERSION = "2" }\n')
    added = f"""
[added]
socket.listen-stream = "127.0.0.1:{p_added}"
socket.accept = true
service.exec-start = "cat"
service.standard-input = "socket"
"""
    cfg = write_config(tmp_path / "units.toml", keep + gone + changed_v1)
    a = activator("serve", cfg)
    a.wait_listening(5)
    keep_inode = listener_inode(p_keep)
    same_inode = listener_inode(p_same)
    assert f"socket:[{keep_inode}]" in fd_targets(a.pid) and f"socket:[{same_inode}]" in fd_targets(a.pid)
    # start the daemons of "gone" and "changed"
    with connect(("127.0.0.1", p_gone)) as c:
        assert c.recv(100).startswith(b"hello from")
    with connect(("127.0.0.1", p_same)) as c:
        assert c.recv(100).startswith(b"hello from")
    gone_pid = read_probe(tmp_path / "gone.json")["pid"]
    v1 = read_probe(tmp_path / "changed1.json")
    assert v1["env"]["VERSION"] == "1"

    hammer = Hammer(p_keep)
    hammer.start()
    try:
        wait_for(lambda: hammer.ok >= 5, what="echo answers before the reload")
        write_config(cfg, keep + changed_v2 + added)
        a.signal(signal.SIGHUP)
        a.wait_log(r"reloaded: 1 unchanged, 1 changed, 1 added, 1 removed")
        before = hammer.ok
        wait_for(lambda: hammer.ok >= before + 5, what="echo answers after the reload")
        for i in range(2, 6):  # reloads in a row, each while the client keeps connecting
            a.signal(signal.SIGHUP)
            a.wait_log(r"reloaded: 3 unchanged, 0 changed, 0 added, 0 removed", count=i - 1)

        # an invalid config changes nothing and every error is logged
        write_config(cfg, keep + '[broken]\nsocket.listen-steam = "x"\nservice.exec-start = 5\n')
        a.signal(signal.SIGHUP)
        a.wait_log(r"reload failed, keeping the running configuration: .*broken: socket.listen-steam: "
                   r"unknown key \(did you mean 'listen-stream'\?\)")
        a.wait_log(r"reload failed.*broken: service.exec-start: expected an array of strings")
        a.wait_log(r"reload failed.*broken: socket: no address")
        before = hammer.ok
        wait_for(lambda: hammer.ok >= before + 5, what="echo answers after the failed reload")
    finally:
        hammer.stop()
    assert hammer.failures == [] and hammer.ok >= 15, hammer.failures[:5]

    # unchanged: the very same listening socket
    assert listener_inode(p_keep) == keep_inode and f"socket:[{keep_inode}]" in fd_targets(a.pid)
    # removed: daemon stopped, sockets closed, socket file removed
    wait_for(lambda: not pid_alive(gone_pid), what="the removed unit's daemon to end")
    assert refused(p_gone) and not (tmp_path / "gone.sock").exists()
    # changed: old daemon stopped; the kept address keeps its descriptor; the dropped one is closed
    wait_for(lambda: not pid_alive(v1["pid"]), what="the changed unit's old daemon to end")
    assert listener_inode(p_same) == same_inode and f"socket:[{same_inode}]" in fd_targets(a.pid)
    assert refused(p_old)
    with connect(("127.0.0.1", p_new)) as c:
        assert c.recv(100).startswith(b"hello from")
    v2 = read_probe(tmp_path / "changed2.json")
    assert v2["env"]["VERSION"] == "2" and v2["env"]["LISTEN_FDS"] == "2"
    fds = {f["fd"]: f for f in v2["fds"]}
    assert fds[3]["local"] == ["127.0.0.1", p_same] and fds[4]["local"] == ["127.0.0.1", p_new]
    assert not fds[3]["nonblocking"]
    # added: serving
    assert echo_once(p_added) == b"ping\n"
    assert "Traceback" not in a.log
    assert a.stop() == 0
