"""Privileges and access control.

As root: the daemon runs as the configured user with its groups (checked with
the daemon's own `id`), activator binds a privileged port first, and an unknown
user fails at load time. Accept mode: ip-address-allow / ip-address-deny close
denied peers before any process starts, and log them.
"""
from __future__ import annotations

import grp
import os
import pwd
import re
import socket
import sys
import time

import pytest

from conftest import free_port

ROOT_ONLY = pytest.mark.skipif(os.getuid() != 0, reason="needs root")
NOBODY = pwd.getpwnam("nobody")
NOGROUP = grp.getgrgid(NOBODY.pw_gid).gr_name
# A daemon every user can run: the system interpreter, not the test venv (which may sit under /root).
SYS_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
ACCEPT_THEN_ID = (
    "import os, socket; s = socket.socket(fileno=3); c, _ = s.accept(); os.dup2(c.fileno(), 1); "
    "os.execvp('id', ['id'])"
)


def read_all(address, family=socket.AF_INET, timeout=10.0) -> tuple[bytes, float]:
    start = time.monotonic()
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(address)
        data = b""
        while True:
            try:
                chunk = s.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    return data, time.monotonic() - start


def privileged_port() -> int:
    for port in range(1023, 600, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    pytest.skip("no free port under 1024 on 127.0.0.1")


def parse_id(text: str) -> dict:
    m = re.match(r"uid=(\d+)\(?[^)]*\)? gid=(\d+)\S* groups=(\S+)", text.strip())
    assert m, text
    return {"uid": int(m.group(1)), "gid": int(m.group(2)),
            "groups": sorted(int(g.split("(")[0]) for g in m.group(3).split(","))}


@ROOT_ONLY
def test_accept_instances_run_as_user_with_its_groups(activator):
    port = free_port()
    a = activator("run", "-a", "--inetd", "--user", "nobody", "--group", NOGROUP, "-l", f"127.0.0.1:{port}", "--", "id")
    a.wait_listening()
    out, _ = read_all(("127.0.0.1", port))
    ident = parse_id(out.decode())
    assert ident == {"uid": NOBODY.pw_uid, "gid": NOBODY.pw_gid,
                     "groups": sorted(set(os.getgrouplist("nobody", NOBODY.pw_gid)))}
    assert 0 not in ident["groups"], "root's groups leaked into the daemon"
    assert a.stop() == 0


@ROOT_ONLY
def test_privileged_port_then_unprivileged_daemon_with_supplementary_groups(activator, tmp_path):
    port = privileged_port()
    extra = grp.getgrnam("users").gr_gid if _has_group("users") else 1
    config = tmp_path / "priv.toml"
    config.write_text(
        f'[priv]\nsocket.listen-stream = "127.0.0.1:{port}"\n'
        f'service.exec-start = ["{SYS_PYTHON}", "-c", "{ACCEPT_THEN_ID}"]\n'
        f'service.user = "nobody"\nservice.group = "{NOGROUP}"\nservice.supplementary-groups = ["{extra}"]\n'
    )
    a = activator("serve", config)
    a.wait_log(rf"listening on 127\.0\.0\.1:{port}")
    out, _ = read_all(("127.0.0.1", port))
    ident = parse_id(out.decode())
    assert ident["uid"] == NOBODY.pw_uid and ident["gid"] == NOBODY.pw_gid
    assert extra in ident["groups"] and NOBODY.pw_gid in ident["groups"] and 0 not in ident["groups"]
    assert a.stop() == 0


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


@ROOT_ONLY
@pytest.mark.parametrize("how", ["run", "serve"])
def test_unknown_user_fails_at_load_before_binding(activator, tmp_path, how):
    port = privileged_port()
    if how == "run":
        a = activator("run", "--user", "no-such-user-activator", "-l", f"127.0.0.1:{port}", "--", "true")
    else:
        config = tmp_path / "u.toml"
        config.write_text(f'[u]\nsocket.listen-stream = "127.0.0.1:{port}"\nservice.exec-start = ["true"]\n'
                          'service.user = "no-such-user-activator"\n')
        a = activator("serve", config)
    assert a.wait(20) == (2 if how == "run" else 1)  # run: a bad option value, checked as TOML's user key is
    assert "no-such-user-activator" in a.log and "Traceback" not in a.log
    assert "listening" not in a.log
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


# ------------------------------------------------------------------ access control
def dual_port() -> int:
    for _ in range(50):
        port = free_port()
        try:
            with socket.socket(socket.AF_INET6) as s:
                s.bind(("::1", port))
            return port
        except OSError:
            continue
    pytest.skip("no port free on both 127.0.0.1 and ::1")


def v6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not v6_available(), reason="no IPv6 loopback")
@pytest.mark.parametrize("allow, deny, v4_ok, v6_ok", [
    (["127.0.0.0/8"], ["any"], True, False),
    ([], ["127.0.0.0/8"], False, True),
    (["localhost"], ["any"], True, True),
    (["link-local"], ["any"], False, False),
    (["::1/128"], ["127.0.0.1/32", "::/0"], False, True),
    ([], [], True, True),
])
def test_ip_address_allow_deny(activator, tmp_path, allow, deny, v4_ok, v6_ok):
    port = dual_port()
    seen = tmp_path / "seen"
    args = ["run", "-a", "--inetd", "-l", f"127.0.0.1:{port}", "-l", f"[::1]:{port}"]
    for a_ in allow:
        args += ["--ip-address-allow", a_]
    for d in deny:
        args += ["--ip-address-deny", d]
    a = activator(*args, "--", "sh", "-c", f'echo "$REMOTE_ADDR" >> {seen}; echo served')
    a.wait_listening(2)
    for family, host, ok in ((socket.AF_INET, "127.0.0.1", v4_ok), (socket.AF_INET6, "::1", v6_ok)):
        out, elapsed = read_all((host, port), family)
        if ok:
            assert out == b"served\n", (host, out)
        else:
            assert out == b"" and elapsed < 2.0, (host, out, elapsed)
            a.wait_log(rf"connection from {re.escape(host)}:\d+ denied")
    started = seen.read_text().split() if seen.exists() else []
    assert sorted(started) == sorted(h for h, ok in (("127.0.0.1", v4_ok), ("::1", v6_ok)) if ok)
    assert a.stop() == 0


def test_ip_address_rules_from_config(activator, tmp_path):
    port = free_port()
    seen = tmp_path / "seen"
    config = tmp_path / "acl.toml"
    config.write_text(
        f'[acl]\nsocket.listen-stream = "127.0.0.1:{port}"\nsocket.accept = true\n'
        'socket.ip-address-deny = "any"\nsocket.ip-address-allow = ["127.0.0.2/32", "192.0.2.0/24"]\n'
        f'service.exec-start = ["sh", "-c", "echo $REMOTE_ADDR >> {seen}; echo served"]\n'
        'service.standard-input = "socket"\n'
    )
    a = activator("serve", config)
    a.wait_listening()

    def from_source(source):
        with socket.socket() as s:
            s.settimeout(10)
            s.bind((source, 0))
            s.connect(("127.0.0.1", port))
            data = b""
            while chunk := s.recv(100):
                data += chunk
            return data

    assert from_source("127.0.0.2") == b"served\n"
    assert from_source("127.0.0.3") == b""
    a.wait_log(r"connection from 127\.0\.0\.3:\d+ denied by ip-address rules")
    assert seen.read_text().split() == ["127.0.0.2"]
    assert a.stop() == 0
