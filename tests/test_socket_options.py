"""Socket options, read back from the socket the daemon receives, and their changes on reload.

Each option is set in a TOML unit for `activator serve`; the daemon
(tests/daemons/sockopts.py) getsockopt()s the fds it got and reports. The
backlog cannot be read with getsockopt: `ss` shows it (Send-Q of a listening
socket). Every test fails if the code setting its option is removed: the values
asked for differ from the kernel's defaults (checked by the defaults test).
IPV6_V6ONLY matters only on the wildcard [::], which is bound in a network
namespace of our own whose net.ipv6.bindv6only is set both ways. The reload
primitives of activator.sockets (needs_new_socket, apply_live_options, the
takeover of a path) are exercised on real sockets in this process.
"""
from __future__ import annotations

import grp
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from activator.addresses import parse_address
from activator.sockets import apply_live_options, needs_new_socket, open_socket
from activator.units import BindSpec
from conftest import DAEMONS, free_port, require, wait_for

SOCKOPTS = str(DAEMONS / "sockopts.py")
LISTEN_KEYS = {socket.SOCK_STREAM: "listen-stream", socket.SOCK_DGRAM: "listen-datagram",
               socket.SOCK_SEQPACKET: "listen-sequential-packet"}


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)


def unit_config(tmp_path: Path, address: str, keys: dict, sock_type: int = socket.SOCK_STREAM,
                name: str = "opts") -> Path:
    lines = [f"[{name}]", f"socket.{LISTEN_KEYS[sock_type]} = {json.dumps(address)}"]
    lines += [f"socket.{key} = {toml_value(value)}" for key, value in keys.items()]
    lines.append(f'service.exec-start = ["{sys.executable}", "{SOCKOPTS}", "{tmp_path / (name + ".jsonl")}"]')
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def records(report: Path) -> list[dict]:
    if not report.exists():
        return []
    return [json.loads(line) for line in report.read_text().splitlines() if line.endswith("}")]


def first_start(report: Path, timeout: float = 10.0) -> dict:
    return wait_for(lambda: next((r for r in records(report) if "sockets" in r), None), timeout,
                    what=f"a report in {report}")


def trigger(address: str, sock_type: int = socket.SOCK_STREAM) -> None:
    """One connection (or datagram) so that the Accept=no daemon starts."""
    if address.startswith("/"):
        with socket.socket(socket.AF_UNIX, sock_type) as s:
            s.settimeout(10)
            s.connect(address)
            if sock_type == socket.SOCK_DGRAM:
                s.send(b"start")
        return
    host, _, port = address.rpartition(":")
    with socket.create_connection((host.strip("[]"), int(port)), timeout=10):
        pass


def ss_backlog(address: str) -> int:
    """Send-Q of the listening socket at ``address``: its backlog (min(backlog, somaxconn))."""
    require("ss")
    if address.startswith("/"):
        argv = ["ss", "-Hxl", "src", address]
    else:
        argv = ["ss", "-Hltn", f"sport = :{address.rpartition(':')[2]}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True).stdout.split()
    at = out.index("LISTEN")
    return int(out[at + 2])


def tcp4() -> str:
    return f"127.0.0.1:{free_port()}"


def tcp6() -> str:
    return f"[::1]:{free_port(socket.AF_INET6)}"


def reported(activator, tmp_path: Path, address: str, keys: dict, sock_type: int = socket.SOCK_STREAM) -> dict:
    a = activator("serve", unit_config(tmp_path, address, keys, sock_type))
    a.wait_listening()
    trigger(address, sock_type)
    (sock,) = first_start(tmp_path / "opts.jsonl")["sockets"]
    return sock


# (address maker, TOML keys, what the daemon must read back)
OPTIONS = {
    "keep-alive": (tcp4, {"keep-alive": True}, {"keepalive": 1}),
    "no-delay": (tcp4, {"no-delay": True}, {"nodelay": 1}),
    "receive-buffer": (tcp4, {"receive-buffer": 40000}, {"rcvbuf": 80000}),  # the kernel doubles it
    "send-buffer": (tcp4, {"send-buffer": "48K"}, {"sndbuf": 2 * 48 * 1024}),
    "reuse-port": (tcp4, {"reuse-port": True}, {"reuseport": 1}),
    "free-bind": (tcp4, {"free-bind": True}, {"freebind": 1}),
    "free-bind-ipv6": (tcp6, {"free-bind": True}, {"freebind": 1}),
    "unix-keep-alive": (None, {"keep-alive": True}, {"keepalive": 1}),
    "unix-receive-buffer": (None, {"receive-buffer": 30000}, {"rcvbuf": 60000}),
    "unix-send-buffer": (None, {"send-buffer": 30000}, {"sndbuf": 60000}),
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_option_reaches_the_daemon(activator, tmp_path, option):
    make, keys, expected = OPTIONS[option]
    address = make() if make else str(tmp_path / "o.sock")
    sock = reported(activator, tmp_path, address, keys)
    assert {k: sock.get(k) for k in expected} == expected, sock


def test_defaults_differ_from_every_option(activator, tmp_path):
    """Without the keys the daemon reads the kernel's defaults: the values above are the options' doing."""
    address = tcp4()
    sock = reported(activator, tmp_path, address, {})
    assert (sock["keepalive"], sock["nodelay"], sock["reuseport"], sock["freebind"]) == (0, 0, 0, 0), sock
    assert sock["rcvbuf"] != 80000 and sock["sndbuf"] != 2 * 48 * 1024, sock
    assert ss_backlog(address) == min(socket.SOMAXCONN, int(Path("/proc/sys/net/core/somaxconn").read_text()))


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_backlog(activator, tmp_path, kind):
    address = tcp4() if kind == "tcp" else str(tmp_path / "b.sock")
    sock = reported(activator, tmp_path, address, {"backlog": 17})
    assert sock["listening"]
    assert ss_backlog(address) == 17


def test_unix_datagram_receive_buffer(activator, tmp_path):
    address = str(tmp_path / "d.sock")
    sock = reported(activator, tmp_path, address, {"receive-buffer": 30000}, socket.SOCK_DGRAM)
    assert sock["type"] == "datagram" and sock["rcvbuf"] == 60000, sock


def test_socket_file_mode_and_owner_seen_by_the_daemon(activator, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("changing the owner needs root")
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_name
    address = str(tmp_path / "m.sock")
    sock = reported(activator, tmp_path, address,
                    {"socket-mode": "0640", "socket-user": "nobody", "socket-group": group})
    assert sock["local"] == address
    assert sock["file"]["mode"] == 0o640 and (sock["file"]["uid"], sock["file"]["gid"]) == (nobody.pw_uid,
                                                                                          nobody.pw_gid)


# ------------------------------------------------------------------ IPv6-only and dual stack
def in_netns(pid: int, code: str) -> None:
    subprocess.run(["nsenter", f"--target={pid}", "--net", sys.executable, "-c", code], check=True, timeout=20)


def connects(pid: int, host: str, port: int) -> bool:
    try:
        in_netns(pid, f"import socket; socket.create_connection(({host!r}, {port}), timeout=10).close()")
    except subprocess.CalledProcessError:
        return False
    return True


# The wildcard [::] is where IPV6_V6ONLY matters (the kernel makes a socket bound to a specific IPv6
# address IPv6-only anyway), and binding it is only harmless in a network namespace of our own, with
# nothing but lo; there net.ipv6.bindv6only can be set too, so that each option differs from the default.
@pytest.mark.parametrize("bindv6only, address_form, keys, v6only", [
    (1, "[::]:{port}", {}, 1),  # the namespace's default, so that the next two are the options' doing
    (1, "[::]:{port}", {"bind-ipv6-only": "both"}, 0),
    (1, "{port}", {}, 0),  # a bare PORT is dual-stack by default, as in systemd
    (0, "[::]:{port}", {}, 0),
    (0, "[::]:{port}", {"bind-ipv6-only": "ipv6-only"}, 1),
])
def test_ipv6_only_and_dual_stack(activator, tmp_path, bindv6only, address_form, keys, v6only):
    if os.geteuid() != 0:
        pytest.skip("a network namespace of our own needs root")
    require("unshare", "nsenter", "ip")
    port = 10000 + os.getpid() % 20000  # a private namespace: nothing else binds there
    config = unit_config(tmp_path, address_form.format(port=port), keys)
    a = activator("serve", config, argv_prefix=[
        "unshare", "--net", "sh", "-c",
        f'ip link set lo up && echo {bindv6only} > /proc/sys/net/ipv6/bindv6only && exec "$@"', "sh",
        sys.executable, "-m", "activator",
    ])
    a.wait_listening()
    assert connects(a.pid, "::1", port)
    (sock,) = first_start(tmp_path / "opts.jsonl")["sockets"]
    assert sock["v6only"] == v6only, sock
    assert connects(a.pid, "127.0.0.1", port) is (v6only == 0)  # IPv4 clients get in only when dual-stack
    assert a.stop() == 0


# ------------------------------------------------------------------ reload: changed options take effect
def reload_with(a, tmp_path: Path, address: str, keys: dict) -> None:
    unit_config(tmp_path, address, keys)
    a.signal(signal.SIGHUP)
    a.wait_log(r"reloaded: ")


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_reload_applies_changed_options_to_the_kept_socket(activator, tmp_path, kind):
    address = tcp4() if kind == "tcp" else str(tmp_path / "r.sock")
    before = {"backlog": 5, "keep-alive": False, "receive-buffer": 30000}
    if kind == "unix":
        before["socket-mode"] = "0600"
    config = unit_config(tmp_path, address, before)
    a = activator("serve", "--log-format", "json", config)
    a.wait_listening()
    after = {"backlog": 9, "keep-alive": True, "receive-buffer": 40000}
    if kind == "unix":
        after["socket-mode"] = "0660"
        inode = os.lstat(address).st_ino
    reload_with(a, tmp_path, address, after)
    assert "error" not in a.log, a.log
    assert ss_backlog(address) == 9
    if kind == "unix":
        st = os.lstat(address)
        assert st.st_ino == inode and st.st_mode & 0o777 == 0o660  # the same socket file, chmod'ed
    trigger(address)
    (sock,) = first_start(tmp_path / "opts.jsonl")["sockets"]
    assert (sock["keepalive"], sock["rcvbuf"]) == (1, 80000), sock
    assert a.stop() == 0


# ------------------------------------------------------------------ the reload primitives themselves
# What the engine calls during an all-or-nothing reload, on real sockets in this process.
def spec(address: str, **kw) -> BindSpec:
    return BindSpec(parse_address(address), **kw)


def connect_type(path: Path, sock_type: int) -> str:
    with socket.socket(socket.AF_UNIX, sock_type) as c:
        try:
            c.connect(str(path))
        except OSError as exc:
            return os.strerror(exc.errno)
    return "ok"


def test_takeover_of_a_path_is_given_back_or_committed(tmp_path):
    path = tmp_path / "t.sock"
    old = open_socket(spec(str(path)))
    inode = os.lstat(path).st_ino
    new_spec = spec(str(path), type=socket.SOCK_SEQPACKET)
    with pytest.raises(OSError, match="in use by activator itself"):
        open_socket(new_spec)  # not being replaced: ours, in use, never probed
    new = open_socket(new_spec, replacing=[old])
    assert connect_type(path, socket.SOCK_SEQPACKET) == "ok"  # the path is the new socket's at once
    new.discard()  # the reload failed elsewhere: the old socket gets its path back
    assert os.lstat(path).st_ino == inode and connect_type(path, socket.SOCK_STREAM) == "ok"
    assert sorted(os.listdir(tmp_path)) == ["t.sock"]

    new = open_socket(new_spec, replacing=[old])
    new.commit()
    old.close(remove_file=True)  # the retired socket must not remove the path it gave away
    assert connect_type(path, socket.SOCK_SEQPACKET) == "ok"
    assert sorted(os.listdir(tmp_path)) == ["t.sock"]  # no backup link left
    new.close(remove_file=True)
    assert os.listdir(tmp_path) == []


def test_apply_live_options_on_a_kept_tcp_socket():
    address = tcp4()
    bound = open_socket(spec(address, backlog=5, receive_buffer=30000))
    try:
        new = spec(address, backlog=9, keep_alive=True, no_delay=True, receive_buffer=40000)
        assert needs_new_socket(bound, new) is None
        apply_live_options(bound, new)
        s = bound.sock
        assert (s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)) == (1, 1, 80000)
        assert ss_backlog(address) == 9 and bound.spec is new
        apply_live_options(bound, spec(address, backlog=9, receive_buffer=40000))  # and off again
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
    finally:
        bound.close()


@pytest.mark.parametrize("change, reason", [
    ({"type": socket.SOCK_DGRAM}, "socket type"),
    ({"reuse_port": True}, "reuse-port"),
    ({"receive_buffer": None}, "receive-buffer went back"),
])
def test_what_needs_a_new_socket(change, reason):
    address = tcp4()
    bound = open_socket(spec(address, receive_buffer=30000))
    try:
        assert reason in needs_new_socket(bound, spec(address, **{"receive_buffer": 30000, **change}))
    finally:
        bound.close()


def test_apply_live_options_on_a_socket_file(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("changing the owner needs root")
    nobody = pwd.getpwnam("nobody")
    path = tmp_path / "f.sock"
    bound = open_socket(spec(str(path), socket_mode=0o600))
    try:
        inode = os.lstat(path).st_ino
        apply_live_options(bound, spec(str(path), socket_mode=0o660, socket_user="nobody"))
        st = os.lstat(path)
        assert (st.st_ino, st.st_mode & 0o777, st.st_uid) == (inode, 0o660, nobody.pw_uid)
        # Someone replaces the file: nothing of theirs is changed, and the socket's options are rolled back.
        os.unlink(path)
        path.write_text("theirs")
        os.chmod(path, 0o644)
        with pytest.raises(OSError, match="replaced by someone else"):
            apply_live_options(bound, spec(str(path), socket_mode=0o666, keep_alive=True))
        assert os.lstat(path).st_mode & 0o777 == 0o644 and path.read_text() == "theirs"
        assert bound.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        assert bound.spec.socket_mode == 0o660
    finally:
        bound.close(remove_file=True)
    assert path.read_text() == "theirs"  # not ours: left alone at close too
