"""Unix socket files: mode and owner without a wider window, directories, stale and live sockets,
and files that are not ours: never removed, replaced or used through a directory others may write.

Driven through `activator serve FILE.toml` (socket-mode, socket-user,
socket-group, directory-mode, remove-on-stop) and `activator run`. Files of
another user are made by a helper running as `nobody` (setpriv).
"""
from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import click

import activator as activator_package

from conftest import DAEMONS, PROBE, require, wait_for

NOBODY = pwd.getpwnam("nobody")
NOGROUP_GID = NOBODY.pw_gid
NOGROUP = grp.getgrgid(NOGROUP_GID).gr_name


def unit_file(tmp_path, sock_path, listen="listen-stream", **socket_keys) -> str:
    lines = ["[files]", f'socket.{listen} = "{sock_path}"']
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
    # the chown names the socket relative to the parent directory checked before (fchownat), never following a link
    after = [c for c in calls[bind_at:] if str(sock) in c or f'"{sock.name}"' in c]
    assert any((c.startswith("lchown(") or (c.startswith("fchownat(") and "AT_SYMLINK_NOFOLLOW" in c))
               and f"{NOBODY.pw_uid}, {NOGROUP_GID}" in c for c in after), after
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


# ------------------------------------------------------------------ sockets that are not ours
TYPES = {"stream": socket.SOCK_STREAM, "datagram": socket.SOCK_DGRAM, "seqpacket": socket.SOCK_SEQPACKET}
LISTEN = {"stream": "listen-stream", "datagram": "listen-datagram", "seqpacket": "listen-sequential-packet"}


def bound_socket(path, kind: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, TYPES[kind])
    s.bind(str(path))
    if kind != "datagram":
        s.listen()
    return s


def still_serves(live: socket.socket, path) -> None:
    """The other program's socket still works at its path."""
    with socket.socket(socket.AF_UNIX, live.type) as c:
        c.settimeout(10)
        c.connect(str(path))
        if live.type == socket.SOCK_DGRAM:
            c.send(b"still mine")
            live.settimeout(10)
            assert live.recv(100) == b"still mine"
        else:
            conn, _ = live.accept()
            conn.close()


@pytest.mark.parametrize("live, ours", [("datagram", "datagram"), ("datagram", "stream"), ("stream", "datagram"),
                                        ("seqpacket", "stream"), ("stream", "seqpacket")])
def test_live_socket_of_any_type_is_never_replaced(activator, tmp_path, live, ours):
    """Probed with our own type: a live socket of another type answers EPROTOTYPE, which is "in use" too."""
    path = tmp_path / "live.sock"
    other = bound_socket(path, live)
    try:
        inode = os.lstat(path).st_ino
        a = activator("serve", unit_file(tmp_path, path, listen=LISTEN[ours]))
        assert a.wait(20) == 1
        assert "Traceback" not in a.log
        assert re.search(rf"cannot listen on {re.escape(str(path))}: .*in use", a.log), a.log
        assert os.lstat(path).st_ino == inode
        still_serves(other, path)
    finally:
        other.close()


@pytest.mark.parametrize("dead, ours", [("stream", "stream"), ("datagram", "datagram"), ("seqpacket", "seqpacket"),
                                        ("stream", "datagram")])
def test_dead_socket_of_each_type_is_replaced(activator, tmp_path, dead, ours):
    path = tmp_path / "dead.sock"
    bound_socket(path, dead).close()  # the file stays, nobody is bound to it
    os.link(path, tmp_path / "old")  # keeps the old inode allocated, so that a new one has another number
    old_inode = os.lstat(path).st_ino
    a = activator("serve", unit_file(tmp_path, path, listen=LISTEN[ours]))
    a.wait_listening()
    assert os.lstat(path).st_ino != old_inode
    with socket.socket(socket.AF_UNIX, TYPES[ours]) as c:
        c.connect(str(path))  # live now, with our type
    assert a.stop() == 0


@pytest.mark.parametrize("replacement", ["socket", "file"])
def test_socket_file_replaced_before_stop_is_not_removed(activator, tmp_path, replacement):
    path = tmp_path / "r.sock"
    a = activator("serve", unit_file(tmp_path, path, remove_on_stop=True))
    a.wait_listening()
    os.unlink(path)
    other = None
    if replacement == "socket":
        other = bound_socket(path, "stream")
    else:
        path.write_text("someone else's")
    inode = os.lstat(path).st_ino
    try:
        assert a.stop() == 0
        assert os.lstat(path).st_ino == inode  # remove-on-stop removes only the inode activator bound
        if other is not None:
            still_serves(other, path)
        else:
            assert path.read_text() == "someone else's"
    finally:
        if other is not None:
            other.close()


# ------------------------------------------------------------------ directories others may write
def as_nobody(code: str) -> None:
    """Run Python code as nobody/nogroup (files it makes belong to another user)."""
    require("setpriv")
    subprocess.run(["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOGROUP_GID}", "--clear-groups",
                    sys.executable, "-c", code], check=True, timeout=20)


@pytest.fixture
def public():
    """A directory that nobody can reach (pytest's tmp_path is private to root), owned by root, mode 0755."""
    top = Path(tempfile.mkdtemp(prefix="activator-files-"))
    top.chmod(0o755)
    yield top
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def sticky(public):
    """Like /tmp: mode 1777, root's."""
    top = public / "sticky"
    top.mkdir()
    top.chmod(0o1777)
    return top


def refused(a, path, reason: str) -> None:
    assert a.wait(20) == 1
    assert "Traceback" not in a.log
    assert re.search(rf"cannot listen on {re.escape(str(path))}: {reason}", a.log), a.log


@pytest.mark.parametrize("mode, owner", [(0o777, 0), (0o777, "nobody"), (0o770, 0), (0o757, 0), (0o755, "nobody")])
def test_parent_others_may_write_is_refused(activator, tmp_path, public, mode, owner):
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directory away")
    uid = NOBODY.pw_uid if owner == "nobody" else owner
    shared = public / "shared"
    shared.mkdir()
    os.chown(shared, uid, -1)
    shared.chmod(mode)
    path = shared / "sub" / "s.sock"  # the directory below is made by activator: it must not get that far
    a = activator("serve", unit_file(tmp_path, path))
    if mode & 0o022:
        refused(a, path, re.escape(f"{shared} is writable by others (mode {mode:04o}, owner {uid}); refusing"))
    else:
        refused(a, path, re.escape(f"{shared} is owned by uid {uid}, not by root or the socket's owner; refusing"))
    assert os.listdir(shared) == []


def test_sticky_directory_takes_our_socket_and_our_directory(activator, tmp_path, public, sticky):
    """Like /tmp (1777, root's): a socket directly in it, or in a directory activator makes there, is fine."""
    direct, nested = sticky / "direct.sock", sticky / "ours" / "nested.sock"
    config = tmp_path / "two.toml"
    config.write_text(f'[direct]\nsocket.listen-stream = "{direct}"\nservice.exec-start = "true"\n'
                      f'[nested]\nsocket.listen-stream = "{nested}"\nsocket.directory-mode = "0700"\n'
                      f'service.exec-start = "true"\n')
    a = activator("serve", config)
    a.wait_listening(2)
    assert stat.S_ISSOCK(os.lstat(direct).st_mode) and stat.S_ISSOCK(os.lstat(nested).st_mode)
    assert stat.S_IMODE(os.lstat(sticky / "ours").st_mode) == 0o700
    assert a.stop() == 0


def test_sticky_directory_with_another_users_socket_is_refused(activator, tmp_path, public, sticky):
    path = sticky / "s.sock"
    # a dead socket: nobody listens, but it is not ours to remove
    as_nobody(f"import socket; socket.socket(socket.AF_UNIX).bind({str(path)!r})")
    inode = os.lstat(path).st_ino
    a = activator("serve", unit_file(tmp_path, path))
    refused(a, path, re.escape(f"a socket owned by uid {NOBODY.pw_uid} is there; refusing to replace it"))
    assert os.lstat(path).st_ino == inode


def test_sticky_directory_with_another_users_directory_is_refused(activator, tmp_path, public, sticky):
    theirs = sticky / "activator"  # what the attacker pre-creates in /tmp
    as_nobody(f"import os; os.mkdir({str(theirs)!r}, 0o755)")
    path = theirs / "s.sock"
    a = activator("serve", unit_file(tmp_path, path))
    refused(a, path, re.escape(f"{theirs} is owned by uid {NOBODY.pw_uid}, not by root or the socket's owner"))
    assert os.listdir(theirs) == []


def test_symlinked_parent_owned_by_another_user_is_refused(activator, tmp_path, public, sticky):
    """With fs.protected_symlinks=0 the kernel would follow it; activator does not, so nothing elsewhere goes."""
    elsewhere = public / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "s.sock"
    bound_socket(victim, "stream").close()  # root's dead socket: activator would replace it if it got there
    link = sticky / "link"
    as_nobody(f"import os; os.symlink({str(elsewhere)!r}, {str(link)!r})")
    path = link / "s.sock"
    a = activator("serve", unit_file(tmp_path, path))
    refused(a, path, re.escape(f"{link} is a symbolic link owned by uid {NOBODY.pw_uid}; refusing to follow it"))
    assert stat.S_ISSOCK(os.lstat(victim).st_mode)


def test_symlink_of_root_is_followed(activator, tmp_path, public):
    real = public / "real"
    real.mkdir()
    (public / "alias").symlink_to("real")  # relative, like /var/run -> /run on some systems
    path = public / "alias" / "s.sock"
    a = activator("serve", unit_file(tmp_path, path, remove_on_stop=True))
    a.wait_listening()
    assert stat.S_ISSOCK(os.lstat(real / "s.sock").st_mode)
    assert hello(path).startswith(b"hello from ")
    assert a.stop() == 0
    assert not (real / "s.sock").exists()  # removed through the same checked walk


def run_as_nobody(activator, public, *args, **kw):
    """activator run as nobody, from readable copies of its package and of click (the checkout and its venv
    may be private to root)."""
    require("setpriv")
    copy = public / "pkg"
    if not copy.exists():
        for package in (activator_package, click):
            source = Path(package.__file__).parent
            shutil.copytree(source, copy / source.name, ignore=shutil.ignore_patterns("__pycache__"))
        for path in [copy, *copy.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644 | (path.stat().st_mode & 0o111))
    env = {**kw.pop("env", {}), "PYTHONPATH": str(copy)}
    return activator(*args, argv_prefix=["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOGROUP_GID}",
                                         "--clear-groups", sys.executable, "-m", "activator"], env=env, **kw)


def test_not_root_uses_its_own_directory_and_refuses_a_shared_one(activator, public):
    """As non-root, "the socket's owner" is activator's own user."""
    if os.geteuid() != 0:
        pytest.skip("needs root to become nobody")
    mine = public / "mine"
    mine.mkdir(mode=0o700)
    os.chown(mine, NOBODY.pw_uid, NOGROUP_GID)
    a = run_as_nobody(activator, public, "run", "-l", mine / "s.sock", "--", "true")
    a.wait_listening()
    st = os.lstat(mine / "s.sock")
    assert stat.S_ISSOCK(st.st_mode) and st.st_uid == NOBODY.pw_uid
    assert a.stop() == 0
    assert not (mine / "s.sock").exists()

    shared = public / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    b = run_as_nobody(activator, public, "run", "-l", shared / "s.sock", "--", "true")
    refused(b, shared / "s.sock", re.escape(f"{shared} is writable by others (mode 0777, owner 0)"))
    assert os.listdir(shared) == []


# ------------------------------------------------------------------ activator's own sockets are never probed
def daemon_records(report: Path) -> list[dict]:
    if not report.exists():
        return []
    return [json.loads(line) for line in report.read_text().splitlines() if line.endswith("}")]


@pytest.mark.parametrize("address", ["{tmp}/same.sock", "@activator-test-{pid}"])
def test_an_address_twice_is_ours_in_use_never_probed(activator, tmp_path, address):
    """The second socket finds the first one's inode (or name) held by activator: no probe, no connection.
    (`run -l X -l X` and TOML refuse the same address twice before binding; sockets.py must hold on its own.)"""
    from activator.addresses import parse_address
    from activator.sockets import BindError, open_all
    from activator.units import BindSpec

    address = address.format(tmp=tmp_path, pid=os.getpid())
    with pytest.raises(BindError) as info:
        open_all([BindSpec(parse_address(address)), BindSpec(parse_address(address))])
    assert any("in use by activator itself (another of its sockets holds it" in m for m in info.value.messages)
    assert not any("listening on it" in m for m in info.value.messages)
    assert not os.path.lexists(address) or address.startswith("@")  # all or nothing: ours removed again


def reload_config(tmp_path: Path, a_keys: str = "", b_exec: str = "true", a_name: str = "a") -> str:
    report = tmp_path / "a.jsonl"
    return (f'[{a_name}]\nsocket.listen-stream = "{tmp_path / "a.sock"}"\n{a_keys}'
            f'service.exec-start = ["{sys.executable}", "{DAEMONS / "sockopts.py"}", "{report}"]\n'
            f'[b]\nsocket.listen-stream = "{tmp_path / "b.sock"}"\nservice.exec-start = ["{b_exec}"]\n')


def reload(a, config: Path, text: str, count: int = 1) -> None:
    config.write_text(text)
    a.signal(signal.SIGHUP)
    a.wait_log(r'"event":"reload"', count=count)


@pytest.mark.parametrize("change", ["other unit", "own socket-mode", "own backlog"])
def test_reload_never_connects_to_our_own_listener(activator, tmp_path, change):
    config = tmp_path / "units.toml"
    config.write_text(reload_config(tmp_path, a_keys='socket.socket-mode = "0600"\nsocket.backlog = 5\n'))
    a = activator("serve", "--log-format", "json", config)
    a.wait_listening(2)
    if change == "other unit":
        text = reload_config(tmp_path, a_keys='socket.socket-mode = "0600"\nsocket.backlog = 5\n', b_exec="false")
    elif change == "own socket-mode":
        text = reload_config(tmp_path, a_keys='socket.socket-mode = "0660"\nsocket.backlog = 5\n')
    else:
        text = reload_config(tmp_path, a_keys='socket.socket-mode = "0600"\nsocket.backlog = 7\n')
    reload(a, config, text)
    assert not (tmp_path / "a.jsonl").exists(), "a probe connection started the daemon"
    assert '"event":"start"' not in a.log
    hello_a = socket.socket(socket.AF_UNIX)
    hello_a.connect(str(tmp_path / "a.sock"))  # the socket still works: one real connection, one start
    hello_a.close()
    wait_for(lambda: any("connection" in r for r in daemon_records(tmp_path / "a.jsonl")), what="the connection")
    assert [r for r in daemon_records(tmp_path / "a.jsonl") if "connection" in r] == [{"connection": 3, "data": ""}]
    assert a.stop() == 0


def test_reload_moving_a_path_to_a_new_unit_does_not_probe_the_old_daemon(activator, tmp_path):
    """The old unit's daemon still holds the listening socket while it stops: a probe would reach it."""
    config = tmp_path / "units.toml"
    config.write_text(reload_config(tmp_path))
    a = activator("serve", "--log-format", "json", config)
    a.wait_listening(2)
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(str(tmp_path / "a.sock"))
        c.sendall(b"one")
    wait_for(lambda: any("connection" in r for r in daemon_records(tmp_path / "a.jsonl")), what="the connection")
    reload(a, config, reload_config(tmp_path, a_name="renamed"))
    assert "error" not in a.log, a.log
    assert [r for r in daemon_records(tmp_path / "a.jsonl") if "connection" in r] == [{"connection": 3, "data": "one"}]
    assert a.stop() == 0


def test_reload_changing_the_type_at_the_same_path_takes_it_over(activator, tmp_path):
    config = tmp_path / "units.toml"
    config.write_text(reload_config(tmp_path))
    a = activator("serve", "--log-format", "json", config)
    a.wait_listening(2)
    reload(a, config, reload_config(tmp_path).replace(
        '[a]\nsocket.listen-stream', '[a]\nsocket.listen-sequential-packet'))
    assert "error" not in a.log, a.log
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as c:
        c.connect(str(tmp_path / "a.sock"))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".a.sock")] == []  # no backup left
    assert a.stop() == 0


# ------------------------------------------------------------------ socket-mode left to the umask
def test_socket_mode_none_is_what_bind_gives_under_the_umask(tmp_path):
    """BindSpec(socket_mode=None), for `activator run`: 0777 & ~umask, as bind() itself creates it."""
    path = tmp_path / "u.sock"
    code = ("import os, sys; from activator.addresses import parse_address; from activator.units import BindSpec; "
            "from activator.sockets import open_socket; os.umask(0o027); "
            f"b = open_socket(BindSpec(parse_address({str(path)!r}), socket_mode=None)); "
            "print(oct(os.lstat(sys.argv[1]).st_mode & 0o7777)); b.close(remove_file=True)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0o750"
    assert not path.exists()


def test_run_socket_follows_the_umask(activator, tmp_path):
    path = tmp_path / "run.sock"
    a = activator("run", "-l", path, "--", "true", preexec_fn=lambda: os.umask(0o077))
    a.wait_listening()
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o700  # not 0666: only its owner may connect
    assert a.stop() == 0


# ------------------------------------------------------------------ the shipped examples
@pytest.mark.parametrize("config", sorted(str(p) for p in (Path(__file__).parent.parent / "configs").rglob("*.toml")))
def test_shipped_configs_put_no_socket_where_others_may_write(config):
    from activator.config import load_units

    paths = [s.address.path for u in load_units([config]) for s in u.sockets if s.address and s.address.path]
    for path in paths:
        existing = Path(path).parent
        while not existing.exists():
            existing = existing.parent
        for directory in (existing, *existing.parents):
            assert not os.stat(directory).st_mode & 0o002, f"{config}: {path} is under world-writable {directory}"
