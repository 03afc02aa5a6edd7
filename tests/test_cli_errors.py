"""No Python traceback ever reaches a user for a user mistake.

Each case runs the real CLI and checks: the exit code (2 for usage errors, 1 for
configuration and runtime errors), a single error line that names the problem,
no traceback, and nothing left bound or created.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from conftest import free_port, require

NO_SUCH_USER = "no-such-user-activator"
NO_SUCH_GROUP = "no-such-group-activator"


def cli(*args, env=None, timeout=20, preexec_fn=None, cwd=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "activator", *map(os.fsencode, args)], capture_output=True, env=full_env,
        timeout=timeout, preexec_fn=preexec_fn, cwd=cwd, stdin=subprocess.DEVNULL,
    )
    return proc.returncode, proc.stderr.decode(errors="replace"), proc.stdout.decode(errors="replace")


def assert_user_error(code, err, expected_code, *needles, max_error_lines=1):
    assert "Traceback" not in err, err
    assert code == expected_code, f"exit {code}, expected {expected_code}:\n{err}"
    error_lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert 1 <= len(error_lines) <= max_error_lines, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


# ------------------------------------------------------------------ usage errors: exit 2
@pytest.mark.parametrize("args, needle", [
    (["run", "--bogus", "--", "true"], "--bogus"),
    (["run", "-l"], "-l"),
    (["run", "-l", "127.0.0.1:0"], "COMMAND"),
    (["run", "--", "true"], "--listen"),
    (["run", "--max-connections", "0", "-l", "127.0.0.1:1", "--", "true"], "--max-connections"),
    (["run", "--max-connections", "many", "-l", "127.0.0.1:1", "--", "true"], "--max-connections"),
    (["run", "--restart", "sometimes", "-l", "127.0.0.1:1", "--", "true"], "--restart"),
    (["run", "--timeout-stop", "5parsecs", "-l", "127.0.0.1:1", "--", "true"], "--timeout-stop"),
    (["run", "--kill-signal", "SIGFOO", "-l", "127.0.0.1:1", "--", "true"], "SIGFOO"),
    (["run", "--kill-signal", "\u00b2", "-l", "127.0.0.1:1", "--", "true"], "unknown signal"),
    (["run", "--forward-signal", "KILL", "-l", "127.0.0.1:1", "--", "true"], "SIGKILL"),
    (["run", "--fdname", "a:b:c", "-l", "127.0.0.1:1", "--", "true"], "--fdname"),
    (["run", "--fdname", "bad\x01name", "-l", "127.0.0.1:1", "--", "true"], "--fdname"),
    (["run", "--setenv", "=x", "-l", "127.0.0.1:1", "--", "true"], "--setenv"),
    (["run", "--datagram", "--accept", "-l", "127.0.0.1:1", "--", "true"], "not the datagram socket"),
    (["run", "--ip-address-deny", "any", "-l", "127.0.0.1:1", "--", "true"], "only applies to accept = true"),
    (["run", "--ip-address-allow", "1.2.3.4/33", "-a", "-l", "127.0.0.1:1", "--", "true"], "1.2.3.4/33"),
    (["run", "--ip-address-deny", "nowhere", "-a", "-l", "127.0.0.1:1", "--", "true"], "nowhere"),
    (["run", "--log-format", "xml", "-l", "127.0.0.1:1", "--", "true"], "--log-format"),
    (["frobnicate"], "frobnicate"),
])
def test_usage_errors(args, needle):
    code, err, _ = cli(*args)
    assert_user_error(code, err, 2, needle)


@pytest.mark.parametrize("address", [
    "127.0.0.1:99999", "127.0.0.1:0x50", "foo", "localhost:80", "[::1]", "[::1]:", "[::1%]:80", "[::1%nosuchif0]:80",
    "1.2.3:80", "256.0.0.1:80", "vsock:x:1", "vsock:1", "@", "relative/path", " 80", "",
    "/" + "x" * 200, "/tmp/\udc80" + "y" * 120,
])
def test_bad_address_is_usage_error_and_nothing_bound(address, tmp_path):
    port = free_port()
    path = tmp_path / "first.sock"
    code, err, _ = cli("run", "-l", f"127.0.0.1:{port}", "-l", path, "-l", address, "--", "true")
    assert_user_error(code, err, 2, "--listen")
    assert port_free(port) and not path.exists()


@pytest.mark.parametrize("args, needle", [
    (["--timeout-stop", "30d"], "--timeout-stop"),
    (["--watchdog-sec", "30d"], "--watchdog-sec"),
    (["--trigger-limit-interval", "infinity"], "--trigger-limit-interval"),
    (["--start-limit-interval", "infinity"], "--start-limit-interval"),
    (["--restart-sec", "infinity"], "--restart-sec"),
    (["--umask", "1777"], "--umask"),
    (["--socket-mode", "17777"], "--socket-mode"),
    (["--backlog", "2147483648"], "--backlog"),
    (["--kill-mode", "mixd"], "did you mean 'mixed'?"),
])
def test_run_rejects_values_the_engine_cannot_apply(args, needle):
    """The same bounds as TOML's: what run accepts, the engine can run (issue #10)."""
    code, err, _ = cli("run", *args, "-l", f"127.0.0.1:{free_port()}", "--", "true")
    assert_user_error(code, err, 2, needle)


@pytest.mark.parametrize("command", ["serve", "run"])
def test_stale_listen_fds_is_one_line_not_a_traceback(command, tmp_path):
    """LISTEN_PID is ours but LISTEN_FDS counts descriptors that are not open (a stale environment)."""
    config = write(tmp_path, "u.toml", GOOD.format(port=free_port()))
    args = ["serve", str(config)] if command == "serve" else ["run", "-l", f"127.0.0.1:{free_port()}", "--", "true"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    proc = subprocess.run(["sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=40 exec "$@"', "sh", sys.executable, "-m",
                           "activator", *args], capture_output=True, text=True, timeout=20, env=env,
                          stdin=subprocess.DEVNULL)
    assert_user_error(proc.returncode, proc.stderr, 1, "invalid socket-activation environment", "LISTEN_FDS")


# ------------------------------------------------------------------ runtime errors: exit 1
def test_address_in_use_exits_1_and_releases_the_rest(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    first = free_port()
    path = tmp_path / "a.sock"
    try:
        code, err, _ = cli("run", "-l", f"127.0.0.1:{first}", "-l", path, "-l", f"127.0.0.1:{port}", "--", "true")
    finally:
        busy.close()
    assert_user_error(code, err, 1, f"127.0.0.1:{port}", "in use")
    assert port_free(first) and not path.exists()


def test_parent_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err, _ = cli("run", "-l", blocker / "sub" / "s.sock", "--", "true")
    assert_user_error(code, err, 1, str(blocker / "sub" / "s.sock"))
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("option, value, needle", [
    ("--user", NO_SUCH_USER, NO_SUCH_USER),
    ("--group", NO_SUCH_GROUP, NO_SUCH_GROUP),
    ("--user", "4294967296", "4294967296"),
    ("--group", "99999999999999999999", "99999999999999999999"),
])
def test_unknown_user_or_group_before_binding(option, value, needle, tmp_path):
    """Checked by the same parser as TOML's user/group keys: a bad option value, so a usage error (exit 2)."""
    port = free_port()
    path = tmp_path / "u.sock"
    code, err, _ = cli("run", option, value, "-l", f"127.0.0.1:{port}", "-l", path, "--", "true")
    assert_user_error(code, err, 2, needle, option)
    assert "listening" not in err
    assert port_free(port) and not path.exists()


def test_command_not_found_is_one_line_and_carries_on(activator):
    port = free_port()
    a = activator("run", "-l", f"127.0.0.1:{port}", "--", "/nonexistent/daemon")
    a.wait_listening()
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    a.wait_log(r"/nonexistent/daemon: command not found")
    assert a.proc.poll() is None
    assert a.stop() == 0
    assert "Traceback" not in a.log


# ------------------------------------------------------------------ configs: exit 1
def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


GOOD = '[u]\nsocket.listen-stream = "127.0.0.1:{port}"\nservice.exec-start = ["true"]\n'


@pytest.mark.parametrize("command", ["check", "serve"])
@pytest.mark.parametrize("text, needles", [
    ("[u\nsocket.listen-stream = 1", ["line 1"]),
    ('[u]\nsocket.listen-steam = "127.0.0.1:1"\nservice.exec-start = ["true"]\n', ["listen-steam", "listen-stream"]),
    ('[u]\nsocket.listen-stream = "127.0.0.1:99999"\nservice.exec-start = ["true"]\n', ["99999"]),
    ('[u]\nsocket.listen-stream = "127.0.0.1:1"\nservice.exec-start = ["true"]\nservice.user = "%s"\n' % NO_SUCH_USER,
     [NO_SUCH_USER, "service.user"]),
    ('[u]\nsocket.listen-stream = "127.0.0.1:1"\nservice.exec-start = ["true"]\nservice.group = 99999999999999999999\n',
     ["service.group"]),
    ('[u]\nsocket.listen-stream = "127.0.0.1:1"\nservice.exec-start = []\n', ["exec-start"]),
    ('[u]\nsocket.listen-stream = "127.0.0.1:1"\nsocket.socket-mode = "rwx"\nservice.exec-start = ["true"]\n',
     ["socket-mode"]),
    ('[u]\nsocket.listen-stream = "127.0.0.1:1"\nsocket.ip-address-allow = "192.0.2.0/99"\n'
     'service.exec-start = ["true"]\n', ["ip-address-allow"]),
    ("u = 3\n", ["u"]),
])
def test_bad_config(command, text, needles, tmp_path):
    path = write(tmp_path, "bad.toml", text)
    code, err, _ = cli(command, path)
    assert_user_error(code, err, 1, str(path), *needles, max_error_lines=3)


def test_config_reports_every_error_at_once(tmp_path):
    path = write(tmp_path, "two.toml", '[a]\nsocket.listen-steam = "x"\nservice.exec-start = ["true"]\n'
                                       '[b]\nsocket.listen-stream = "nope"\nservice.exec-start = ["true"]\n')
    code, err, _ = cli("check", path)
    assert_user_error(code, err, 1, "listen-steam", "nope", max_error_lines=4)
    assert len([line for line in err.splitlines() if "error" in line]) >= 2


@pytest.mark.parametrize("command", ["check", "serve"])
def test_missing_and_odd_paths(command, tmp_path):
    code, err, _ = cli(command, tmp_path / "missing.toml")
    assert_user_error(code, err, 1, "missing.toml")
    code, err, _ = cli(command, tmp_path)  # a directory without *.toml
    assert_user_error(code, err, 1, str(tmp_path))
    code, err, _ = cli(command, env={"ACTIVATOR_CONFIG": str(tmp_path / "nowhere")})
    assert_user_error(code, err, 1, "nowhere")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[u]\ndescription = "caf\xe9"\n')
    code, err, _ = cli(command, bad)
    assert_user_error(code, err, 1, "UTF-8")


def test_unreadable_file(tmp_path):
    """A config file activator may not read (as root: run without the DAC-override capabilities)."""
    path = write(tmp_path, "secret.toml", GOOD.format(port=1))
    os.chmod(path, 0o000)
    prefix = []
    if os.getuid() == 0:
        require("setpriv")
        prefix = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                  "--bounding-set=-dac_override,-dac_read_search"]
    for command in ("check", "serve"):
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        proc = subprocess.run([*prefix, sys.executable, "-m", "activator", command, str(path)], capture_output=True,
                              env=full_env, timeout=20, stdin=subprocess.DEVNULL)
        assert_user_error(proc.returncode, proc.stderr.decode(), 1, str(path), "Permission denied")


def test_serve_second_unit_unbindable_leaves_nothing(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = busy.getsockname()[1]
    first = free_port()
    sock_path = tmp_path / "run" / "a.sock"
    path = write(tmp_path, "two.toml",
                 f'[a]\nsocket.listen-stream = ["127.0.0.1:{first}", "{sock_path}"]\nservice.exec-start = ["true"]\n'
                 f'[b]\nsocket.listen-stream = "127.0.0.1:{taken}"\nservice.exec-start = ["true"]\n')
    try:
        code, err, _ = cli("serve", path)
    finally:
        busy.close()
    assert_user_error(code, err, 1, f"127.0.0.1:{taken}")
    assert port_free(first)
    assert not sock_path.exists() and not sock_path.parent.exists()
