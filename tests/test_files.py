"""Unix socket files: mode and owner without a wider window, directories, stale and live sockets.

Driven through `activator serve FILE.toml` (socket-mode, socket-user,
socket-group, directory-mode, remove-on-stop) and `activator run`.
"""
from __future__ import annotations

import grp
import os
import pwd
import re
import socket
import stat
import sys

import pytest

from conftest import PROBE, require, wait_for

NOBODY = pwd.getpwnam("nobody")
NOGROUP_GID = NOBODY.pw_gid
NOGROUP = grp.getgrgid(NOGROUP_GID).gr_name


def unit_file(tmp_path, sock_path, **socket_keys) -> str:
    lines = ["[files]", f'socket.listen-stream = "{sock_path}"']
    for key, value in socket_keys.items():
        key = key.replace("_", "-")
        lines.append(f"socket.{key} = " + ("true" if value is True else "false" if value is False else f'"{value}"'))
    lines.append(f'service.exec-start = ["{sys.executable}", "{PROBE}", "{tmp_path / "report.json"}"]')
    path = tmp_path / "files.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def hello(path) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        return s.recv(100)


@pytest.mark.parametrize("mode", [0o600, 0o660, 0o666])
def test_socket_mode_and_owner(activator, tmp_path, mode):
    if os.getuid() != 0:
        pytest.skip("changing the owner needs root")
    sock = tmp_path / "m.sock"
    a = activator("serve", unit_file(tmp_path, sock, socket_mode=f"{mode:04o}", socket_user="nobody",
                                     socket_group=NOGROUP))
    a.wait_listening()
    st = os.lstat(sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == mode  # exact, whatever activator's own umask (022 here)
    assert (st.st_uid, st.st_gid) == (NOBODY.pw_uid, NOGROUP_GID)
    assert hello(sock).startswith(b"hello from ")
    assert a.stop() == 0


def test_bind_happens_under_the_requested_umask(activator, tmp_path):
    """The code path: umask(~mode) right before bind(), restored after, chown after; never a chmod that widens."""
    require("strace")
    sock = tmp_path / "u.sock"
    trace = tmp_path / "trace.txt"
    config = unit_file(tmp_path, sock, socket_mode="0600", socket_user="nobody", socket_group=NOGROUP)
    a = activator("serve", config, argv_prefix=[
        "strace", "-f", "-qq", "-o", str(trace), "-e",
        "trace=umask,bind,chmod,fchmod,fchmodat,chown,lchown,fchown,fchownat",
        sys.executable, "-m", "activator",
    ])
    a.wait_listening(timeout=30)
    (pid,) = wait_for(lambda: a.children(), 10, what="activator under strace")
    os.kill(pid, 15)  # stop activator itself; strace follows it out
    a.wait(30)
    calls = [line.split(None, 1)[1] for line in trace.read_text().splitlines() if " " in line]
    path = re.escape(str(sock))
    bind_at = next(i for i, c in enumerate(calls) if re.match(rf'bind\(\d+, \{{sa_family=AF_UNIX, sun_path="{path}"', c))
    before = calls[bind_at - 1]
    m = re.match(r"umask\((0?\d+)\)", before)
    assert m, f"no umask right before bind: {calls[max(0, bind_at - 3):bind_at + 3]}"
    assert int(m.group(1), 8) == 0o177, before
    assert re.match(r"umask\(", calls[bind_at + 1]), "umask not restored right after bind"
    after = [c for c in calls[bind_at:] if str(sock) in c]
    assert any(re.match(r"(l|f)?chown(at)?\(", c) and f"{NOBODY.pw_uid}, {NOGROUP_GID}" in c for c in after), after
    assert not any("chmod" in c for c in after), after


def test_parent_directories_get_directory_mode(activator, tmp_path):
    sock = tmp_path / "a" / "b" / "s.sock"
    a = activator("serve", unit_file(tmp_path, sock, directory_mode="0750", socket_mode="0660"))
    a.wait_listening()
    for d in (tmp_path / "a", tmp_path / "a" / "b"):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o750, d
    assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o660
    assert hello(sock).startswith(b"hello from ")
    assert a.stop() == 0


@pytest.mark.parametrize("kind", ["file", "directory", "symlink", "fifo"])
def test_existing_non_socket_is_never_removed(activator, tmp_path, kind):
    sock = tmp_path / "taken"
    if kind == "file":
        sock.write_text("precious")
    elif kind == "directory":
        sock.mkdir()
        (sock / "inside").write_text("precious")
    elif kind == "symlink":
        target = tmp_path / "target"
        target.write_text("precious")
        sock.symlink_to(target)
    else:
        os.mkfifo(sock)
    a = activator("serve", unit_file(tmp_path, sock))
    assert a.wait(20) == 1
    assert "Traceback" not in a.log
    assert re.search(rf"cannot listen on {re.escape(str(sock))}: .*(not a socket|[Ee]xists)", a.log), a.log
    assert os.path.lexists(sock)
    if kind == "file":
        assert sock.read_text() == "precious"
    elif kind == "directory":
        assert (sock / "inside").read_text() == "precious"
    elif kind == "symlink":
        assert sock.is_symlink() and (tmp_path / "target").read_text() == "precious"
    else:
        assert stat.S_ISFIFO(os.lstat(sock).st_mode)


@pytest.mark.parametrize("remove", [True, False])
def test_remove_on_stop(activator, tmp_path, remove):
    sock = tmp_path / "r.sock"
    a = activator("serve", unit_file(tmp_path, sock, remove_on_stop=remove))
    a.wait_listening()
    assert sock.exists()
    assert a.stop() == 0
    # systemd's RemoveOnStop=: removed when asked; by default (no) left in place for the next run.
    assert sock.exists() is (not remove)


def test_stale_socket_of_previous_run_is_replaced(activator, tmp_path):
    sock = tmp_path / "stale.sock"
    old = socket.socket(socket.AF_UNIX)
    old.bind(str(sock))
    old.close()  # the file stays, nobody listens: what a crashed previous run leaves
    with socket.socket(socket.AF_UNIX) as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(str(sock))
    a = activator("serve", unit_file(tmp_path, sock))
    a.wait_listening()
    assert stat.S_ISSOCK(os.lstat(sock).st_mode)
    assert hello(sock).startswith(b"hello from ")
    assert a.stop() == 0


def test_stale_socket_left_by_remove_on_stop_false_is_reused_next_run(activator, tmp_path):
    sock = tmp_path / "again.sock"
    config = unit_file(tmp_path, sock, remove_on_stop=False)
    a = activator("serve", config)
    a.wait_listening()
    assert a.stop() == 0
    assert sock.exists()
    b = activator("serve", config)
    b.wait_listening()
    assert hello(sock).startswith(b"hello from ")
    assert b.stop() == 0


def test_live_socket_is_refused_as_in_use(activator, tmp_path):
    sock = tmp_path / "live.sock"
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(sock))
    live.listen()
    try:
        a = activator("serve", unit_file(tmp_path, sock))
        assert a.wait(20) == 1
        assert "Traceback" not in a.log
        assert re.search(rf"cannot listen on {re.escape(str(sock))}: .*(listening|in use)", a.log), a.log
        # The other server keeps its socket and its clients.
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(sock))
            conn, _ = live.accept()
            conn.close()
    finally:
        live.close()


def test_run_removes_its_socket_and_created_dirs_on_failure(activator, tmp_path):
    """A later bind failure removes the socket file and the directories created for it."""
    sock = tmp_path / "new" / "dir" / "s.sock"
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    a = activator("run", "-l", sock, "-l", blocker, "--", "true")
    assert a.wait(20) == 1
    assert not (tmp_path / "new").exists()
    assert blocker.read_text() == "x"
