"""TOML unit files: every key maps to what it says, every mistake is one clear line (no traceback)."""
from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from activator.config import ConfigError, load_configuration, load_units
from activator.units import ServiceSpec

ROOT = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def load(tmp_path: Path, text: str, **kw):
    return load_units([str(write(tmp_path / "units.toml", text))], **kw)


def errors(tmp_path: Path, text: str, **kw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, **kw)
    return info.value.messages


def cli(*args, env=None) -> subprocess.CompletedProcess:
    full = dict(os.environ)
    full.pop("LISTEN_PID", None)
    full.pop("LISTEN_FDS", None)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "activator", *map(str, args)], capture_output=True, text=True,
                          timeout=30, env=full)


# ------------------------------------------------------------------ mapping
def test_issue_example_and_defaults(tmp_path):
    [unit] = load(tmp_path, """
        [nbd]
        description = "RAM disk over NBD"
        socket.listen-stream = ["127.0.0.1:10809", "/run/nbd.sock"]
        socket.file-descriptor-name = "nbd"
        service.exec-start = ["nbdkit", "memory", "1G"]
        service.restart = "on-failure"
    """)
    assert unit.name == "nbd" and unit.description == "RAM disk over NBD"
    assert [s.label for s in unit.sockets] == ["127.0.0.1:10809", "/run/nbd.sock"]
    assert [s.type for s in unit.sockets] == [socket.SOCK_STREAM] * 2
    assert unit.fd_names() == ["nbd", "nbd"]
    assert unit.service.argv == ["nbdkit", "memory", "1G"] and unit.service.restart == "on-failure"
    # systemd's defaults where nothing is said
    s = unit.sockets[0]
    assert (s.backlog, s.bind_ipv6_only, s.socket_mode, s.directory_mode, s.remove_on_stop) == (
        socket.SOMAXCONN, "default", 0o666, 0o755, False)
    assert not unit.accept and unit.max_connections == 64 and unit.effective_trigger_burst == 20
    assert unit.trigger_limit_interval == 2.0
    d = ServiceSpec(argv=["x"])
    svc = unit.service
    assert (svc.kill_mode, svc.kill_signal, svc.standard_input, svc.start_limit_burst, svc.start_limit_interval) == (
        "control-group", signal.SIGTERM, "null", 5, 10.0)
    assert svc.timeout_stop == d.timeout_stop and svc.restart_sec == 0.1 and svc.type == "simple"


def test_default_fd_name_is_unit_name_and_connection_in_accept_mode(tmp_path):
    units = load(tmp_path, """
        [web]
        socket.listen-stream = "127.0.0.1:8080"
        service.exec-start = "probe"

        [echo]
        socket.listen-stream = "127.0.0.1:8081"
        socket.accept = true
        service.exec-start = "cat"
    """)
    web, echo = units
    assert web.fd_names() == ["web"]
    assert echo.accept and echo.sockets[0].name is None  # the engine names the connection "connection"
    assert echo.effective_trigger_burst == 0


def test_several_sockets_in_order_with_their_own_names_and_options(tmp_path):
    [unit] = load(tmp_path, """
        [multi.service]
        exec-start = ["daemon", "--flag"]

        [[multi.socket]]
        listen-stream = ["127.0.0.1:1000", "[::1]:1001"]
        file-descriptor-name = "tcp"
        backlog = 16
        no-delay = true
        keep-alive = true
        reuse-port = true
        free-bind = true
        bind-ipv6-only = "ipv6-only"
        receive-buffer = "1M"
        send-buffer = 65536

        [[multi.socket]]
        listen-datagram = "/tmp/x/dgram.sock"
        file-descriptor-name = "dgram"
        socket-mode = "0600"
        directory-mode = 0o750
        remove-on-stop = true

        [[multi.socket]]
        listen-sequential-packet = "@abstract"
    """)
    assert [s.label for s in unit.sockets] == ["127.0.0.1:1000", "[::1]:1001", "/tmp/x/dgram.sock", "@abstract"]
    assert [s.type for s in unit.sockets] == [socket.SOCK_STREAM, socket.SOCK_STREAM, socket.SOCK_DGRAM,
                                              socket.SOCK_SEQPACKET]
    assert unit.fd_names() == ["tcp", "tcp", "dgram", "multi"]
    tcp = unit.sockets[0]
    assert (tcp.backlog, tcp.no_delay, tcp.keep_alive, tcp.reuse_port, tcp.free_bind, tcp.bind_ipv6_only) == (
        16, True, True, True, True, "ipv6-only")
    assert tcp.receive_buffer == 1 << 20 and tcp.send_buffer == 65536
    dgram = unit.sockets[2]
    assert (dgram.socket_mode, dgram.directory_mode, dgram.remove_on_stop) == (0o600, 0o750, True)
    assert unit.sockets[3].socket_mode == 0o666


def test_service_keys(tmp_path):
    (tmp_path / "env").write_text(textwrap.dedent(f"""\
        # comment
        ; another comment
        FROM_FILE=plain value{'  '}
        QUOTED="a \\"quoted\\" value"
        SINGLE='it''s'
        CONT=one \\
        two
        OVERRIDE=from-file
    """))
    [unit] = load(tmp_path, f"""
        [svc]
        socket.listen-stream = "127.0.0.1:9"
        socket.max-connections = 5
        socket.trigger-limit-interval-sec = "500ms"
        socket.trigger-limit-burst = 3
        start-limit-burst = 7
        [svc.service]
        exec-start = "sh -c 'echo \\"hi there\\"' arg"
        environment = {{ A = "1", B = 2, OVERRIDE = "from-table" }}
        environment-file = ["env", "-{tmp_path}/missing"]
        working-directory = "{tmp_path}"
        restart = "always"
        restart-sec = "1min 30s"
        start-limit-interval-sec = 20
        timeout-start-sec = "infinity"
        timeout-stop-sec = 2.5
        watchdog-sec = "100ms"
        kill-signal = "INT"
        kill-mode = "mixed"
        standard-input = "inherit"
        standard-output = "null"
        type = "notify"
        file-descriptor-store-max = 4
        umask = "0027"
        user = "root"
        group = "0"
    """)
    svc = unit.service
    assert svc.argv == ["sh", "-c", 'echo "hi there"', "arg"]
    assert svc.environment == {
        "A": "1", "B": "2", "OVERRIDE": "from-file", "FROM_FILE": "plain value", "QUOTED": 'a "quoted" value',
        "SINGLE": "its", "CONT": "one two",
    }
    assert svc.working_directory == str(tmp_path)
    assert (svc.restart, svc.restart_sec, svc.start_limit_interval, svc.start_limit_burst) == ("always", 90.0, 20.0, 7)
    assert svc.timeout_start == float("inf") and svc.timeout_stop == 2.5 and svc.watchdog_sec == 0.1
    assert svc.kill_signal == signal.SIGINT and svc.kill_mode == "mixed"
    assert (svc.standard_input, svc.standard_output, svc.type) == ("inherit", "null", "notify")
    assert svc.file_descriptor_store_max == 4 and svc.umask == 0o027
    assert (svc.user, svc.group) == ("root", "0")
    assert unit.max_connections == 5 and unit.trigger_limit_interval == 0.5 and unit.trigger_limit_burst == 3


def test_ip_address_rules_apply_to_accept_units_only(tmp_path):
    [unit] = load(tmp_path, """
        [echo]
        socket.listen-stream = "127.0.0.1:9"
        socket.accept = true
        socket.ip-address-allow = ["localhost", "192.0.2.0/24"]
        socket.ip-address-deny = "any"
        service.exec-start = "cat"
    """)
    assert unit.ip_address_allow == ["localhost", "192.0.2.0/24"] and unit.ip_address_deny == ["any"]
    # With accept = false the daemon accepts by itself: a rule activator cannot apply is an error, not ignored.
    msgs = errors(tmp_path, """
        [web]
        socket.listen-stream = "127.0.0.1:9"
        socket.ip-address-deny = "any"
        service.exec-start = "httpd"
    """)
    assert msgs == [f"{tmp_path / 'units.toml'}: web: socket.ip-address-deny: only applies to accept = true units "
                    "and proxy units (with accept = false the daemon accepts its connections itself)"]


@pytest.mark.parametrize("value, expected", [('"SIGHUP"', signal.SIGHUP), ('"hup"', signal.SIGHUP),
                                             ("9", signal.SIGKILL), ('"15"', signal.SIGTERM)])
def test_kill_signal_forms(tmp_path, value, expected):
    [unit] = load(tmp_path, f"""
        [u]
        socket.listen-stream = "127.0.0.1:9"
        service.exec-start = "x"
        service.kill-signal = {value}
    """)
    assert unit.service.kill_signal == expected


def test_environment_as_systemd_list(tmp_path):
    [unit] = load(tmp_path, """
        [u]
        socket.listen-stream = "127.0.0.1:9"
        service.exec-start = "x"
        service.environment = ["A=1", "B=two words", "C="]
    """)
    assert unit.service.environment == {"A": "1", "B": "two words", "C": ""}


def test_directory_is_read_sorted_and_names_are_unique_across_files(tmp_path):
    d = tmp_path / "units"
    d.mkdir()
    write(d / "b.toml", '[b]\nsocket.listen-stream = "127.0.0.1:2"\nservice.exec-start = "x"\n')
    write(d / "a.toml", '[a]\nsocket.listen-stream = "127.0.0.1:1"\nservice.exec-start = "x"\n')
    write(d / "ignored.txt", "not toml at all [")
    assert [u.name for u in load_units([str(d)])] == ["a", "b"]
    # the same file named twice counts once
    assert [u.name for u in load_units([str(d), str(d / "a.toml")])] == ["a", "b"]
    other = write(tmp_path / "other.toml", '[a]\nsocket.listen-stream = "127.0.0.1:3"\nservice.exec-start = "x"\n')
    with pytest.raises(ConfigError) as info:
        load_units([str(d), str(other)])
    assert info.value.messages == [f"{other}: a: unit name already defined in {d / 'a.toml'}"]


def test_listen_inherited(tmp_path):
    a, b = socket.socketpair()  # stand-ins for what our parent passed
    listener = socket.socket()
    try:
        inherited = [(listener.fileno(), "web"), (a.fileno(), "unknown")]
        units = load(tmp_path, f"""
            [web]
            socket.listen-inherited = "web"
            service.exec-start = "x"
            [other]
            socket.listen-inherited = [{a.fileno()}]
            socket.file-descriptor-name = "mine"
            service.exec-start = "x"
        """, inherited=inherited)
        assert [(s.inherited_fd, s.name, s.address) for s in units[0].sockets] == [(listener.fileno(), "web", None)]
        assert [(s.inherited_fd, s.name) for s in units[1].sockets] == [(a.fileno(), "mine")]
        msgs = errors(tmp_path, """
            [web]
            socket.listen-inherited = "nope"
            service.exec-start = "x"
        """, inherited=inherited)
        assert len(msgs) == 1 and "socket.listen-inherited" in msgs[0] and "'nope'" in msgs[0]
        assert "web (fd" in msgs[0]  # says what was passed
        # check (inherited=None) accepts the name without descriptors
        [unit] = load(tmp_path, '[w]\nsocket.listen-inherited = "nope"\nservice.exec-start = "x"\n')
        assert unit.sockets[0].label == "inherited nope"
    finally:
        for s in (a, b, listener):
            s.close()


# ------------------------------------------------------------------ errors
def test_every_error_reported_naming_file_unit_and_key(tmp_path):
    msgs = errors(tmp_path, """
        [echo]
        socket.listen-steam = "127.0.0.1:8080"
        socket.listen-stream = "127.0.0.1:99999"
        socket.accept = "yes"
        socket.backlog = "12"
        socket.socket-mode = "0999"
        socket.socket-user = "no-such-user-xyz"
        socket.socket-group = "no-such-group-xyz"
        socket.receive-buffer = "1Q"
        socket.bind-ipv6-only = "ipv6only"
        socket.ip-address-allow = ["1.2.3.4/33"]
        socket.file-descriptor-name = "a:b"
        service.exec-start = "cat 'x"
        service.kill-signal = "SIGTREM"
        service.kill-mode = "group"
        service.restart = "sometimes"
        service.timeout-stop-sec = "5 parsecs"
        service.environment = { "BAD NAME" = "x" }
        service.user = "no-such-user-xyz"
        service.working-directory = "relative/dir"
        service.environmnet = {}
        descripton = "typo"
    """)
    f = tmp_path / "units.toml"
    expect = {
        "socket.listen-steam": "did you mean 'listen-stream'?",
        "socket.listen-stream": "port out of range",
        "socket.accept": "expected true or false",
        "socket.backlog": "expected an integer, got a string '12'",
        "socket.socket-mode": "invalid mode '0999'",
        "socket.socket-user": "unknown user 'no-such-user-xyz'",
        "socket.socket-group": "unknown group 'no-such-group-xyz'",
        "socket.receive-buffer": "invalid size '1Q'",
        "socket.bind-ipv6-only": "did you mean 'ipv6-only'?",
        "socket.ip-address-allow": "invalid IP address or prefix '1.2.3.4/33'",
        "socket.file-descriptor-name": "invalid file descriptor name",
        "service.exec-start": "No closing quotation",
        "service.kill-signal": "did you mean 'SIGTERM'?",
        "service.kill-mode": "expected one of: control-group, mixed, process",
        "service.restart": "expected one of",
        "service.timeout-stop-sec": "unknown unit 'parsecs'",
        "service.environment": "invalid variable name 'BAD NAME'",
        "service.user": "unknown user",
        "service.working-directory": "not an absolute path",
        "service.environmnet": "did you mean 'environment'?",
        "descripton": "did you mean 'description'?",
    }
    for key, text in expect.items():
        prefix = f"{f}: echo: {key}: "
        hits = [m for m in msgs if m.startswith(prefix)]
        assert hits and text in hits[0], (key, msgs)
    assert all("\n" not in m for m in msgs)


def test_structural_errors(tmp_path):
    msgs = errors(tmp_path, """
        top = 1
        [nosocket]
        service.exec-start = "x"
        [noservice]
        socket.listen-stream = "127.0.0.1:1"
        [noexec]
        socket.listen-stream = "127.0.0.1:2"
        service.restart = "always"
        [dgram-accept]
        socket.listen-datagram = "127.0.0.1:3"
        socket.accept = true
        service.exec-start = "x"
        [inetd-without-accept]
        socket.listen-stream = "127.0.0.1:4"
        service.exec-start = "x"
        service.standard-input = "socket"
        [dup]
        socket.listen-stream = "127.0.0.1:1"
        service.exec-start = "x"
        ["bad name"]
        socket.listen-stream = "127.0.0.1:5"
        service.exec-start = "x"
        [[arr.socket]]
        listen-stream = "127.0.0.1:6"
        max-connections = 3
        [[arr.socket]]
        listen-stream = "127.0.0.1:7"
        max-connections = 4
        [arr.service]
        exec-start = []
    """)
    text = "\n".join(msgs)
    for needle in [
        "top: a top-level key must be a unit table",
        "nosocket: socket: missing",
        "noservice: service: missing",
        "noexec: service.exec-start: missing",
        "dgram-accept: socket.accept: accept = true needs stream",
        "inetd-without-accept: service.standard-input: 'socket' needs accept = true",
        "dup: socket.listen-stream: address 127.0.0.1:1 is already used by unit noservice",
        "'bad name': invalid unit name",  # quoted: a name must not be able to forge a line
        "arr: socket[2].max-connections: conflicts with socket[1].max-connections",
        "arr: service.exec-start: empty command",
    ]:
        assert needle in text, (needle, msgs)


# ------------------------------------------------------------------ values: what check accepts, serve can run (#10)
UNIT = '[u]\nsocket.listen-stream = "127.0.0.1:9"\nservice.exec-start = ["true"]\n'


@pytest.mark.parametrize("line, key, needle", [
    ('service.umask = "1777"', "service.umask", "out of range (0000..0777"),
    ("service.umask = 0o1777", "service.umask", "out of range (0000..0777"),
    ('socket.socket-mode = "17777"', "socket.socket-mode", "out of range (0000..7777"),
    ("socket.socket-mode = 0o17777", "socket.socket-mode", "out of range (0000..7777"),
    ('service.watchdog-sec = "30d"', "service.watchdog-sec", "too long (at most 24d"),
    ('service.timeout-stop-sec = "30d"', "service.timeout-stop-sec", "too long (at most 24d or \"infinity\")"),
    ("service.timeout-stop-sec = 1e300", "service.timeout-stop-sec", "too long"),
    (f'service.timeout-stop-sec = "{"9" * 400}s"', "service.timeout-stop-sec", "out of range"),
    ('service.restart-sec = "infinity"', "service.restart-sec", "infinity is not accepted here"),
    ('service.start-limit-interval-sec = "infinity"', "service.start-limit-interval-sec", "infinity is not accepted"),
    ('start-limit-interval-sec = "infinity"', "start-limit-interval-sec", "infinity is not accepted"),
    ('socket.trigger-limit-interval-sec = "infinity"', "socket.trigger-limit-interval-sec", "write 0 to turn"),
    ('service.environment = { A = "a\\u0000b" }', "service.environment", "contains a NUL character"),
    ('service.environment = ["A=a\\u0000b"]', "service.environment", "contains a NUL character"),
    ('service.environment = { "A\\n" = "x" }', "service.environment", "invalid variable name 'A\\n'"),
    ('service.working-directory = "/tmp\\u0000x"', "service.working-directory", "contains a NUL character"),
    ('service.supplementary-groups = ["ro\\u0000ot"]', "service.supplementary-groups", "NUL"),
    ('socket.ip-address-deny = "any"', "socket.ip-address-deny", "only applies to accept = true units"),
])
def test_toml_values_check_accepts_are_values_serve_can_run(tmp_path, line, key, needle):
    msgs = errors(tmp_path, UNIT + line + "\n")
    assert len(msgs) == 1 and msgs[0].startswith(f"{tmp_path / 'units.toml'}: u: {key}: "), msgs
    assert needle in msgs[0] and "\n" not in msgs[0], msgs


@pytest.mark.parametrize("exec_start", ['["a\\u0000b"]', '"a\\u0000b"', '["true", "x\\u0000"]'])
def test_nul_in_the_command_is_an_error_at_load(tmp_path, exec_start):
    msgs = errors(tmp_path, f'[u]\nsocket.listen-stream = "127.0.0.1:9"\nservice.exec-start = {exec_start}\n')
    assert msgs == [f"{tmp_path / 'units.toml'}: u: service.exec-start: {msgs[0].split(': ', 3)[3]}"]
    assert "NUL" in msgs[0]


@pytest.mark.parametrize("line, attr, expected", [
    ('service.timeout-stop-sec = "infinity"', "timeout_stop", math.inf),
    ("service.timeout-stop-sec = 0", "timeout_stop", math.inf),  # systemd: 0 turns the timeout off
    ('service.timeout-start-sec = "infinity"', "timeout_start", math.inf),
    ('service.timeout-stop-sec = "24d"', "timeout_stop", 24 * 86400.0),
    ('service.watchdog-sec = "infinity"', "watchdog_sec", 0.0),  # systemd: no watchdog
    ('service.umask = "0777"', "umask", 0o777),
    ("service.umask = 0o027", "umask", 0o027),
])
def test_bounded_values_that_are_accepted(tmp_path, line, attr, expected):
    path = tmp_path / "units.toml"
    path.write_text(UNIT + line + "\n")
    [unit] = load_units([str(path)])
    assert getattr(unit.service, attr) == expected



def test_deep_nesting_is_a_toml_error_not_a_recursion_error(tmp_path):
    f = write(tmp_path / "deep.toml", "a = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError) as info:
        load_units([str(f)])
    assert info.value.messages == [f"{f}: TOML syntax error: arrays or tables nested too deeply"]
    r = cli("check", f)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1


def test_unit_names_are_whole_matches_and_quoted_when_invalid(tmp_path):
    msgs = errors(tmp_path, """
        ["web\\n"]
        socket.listen-stream = "127.0.0.1:1"
        service.exec-start = "x"
        ["fake: line\\nactivator: error: injected"]
        socket.listen-stream = "127.0.0.1:2"
        service.exec-start = "x"
    """)
    f = tmp_path / "units.toml"
    assert msgs == [f"{f}: 'web\\n': invalid unit name: use letters, digits and '_', '.', '@', '-' only "
                    "(at most 255 characters)",
                    f"{f}: 'fake: line\\nactivator: error: injected': invalid unit name: use letters, digits and "
                    "'_', '.', '@', '-' only (at most 255 characters)"]
    assert all("\n" not in m for m in msgs)


def test_unknown_keys_and_values_are_echoed_quoted_and_bounded(tmp_path):
    msgs = errors(tmp_path, f"""
        [u]
        socket.listen-stream = "127.0.0.1:1"
        socket."bad\\nkey" = 1
        service.exec-start = "x"
        service.restart = "{'x' * 5000}"
    """)
    assert len(msgs) == 2 and all("\n" not in m and len(m) < 400 for m in msgs), msgs
    assert "socket.'bad\\nkey': unknown key" in msgs[0]


def test_config_files_are_regular_and_bounded(tmp_path):
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.toml"
    with open(huge, "w") as f:
        line = "# " + "x" * 1021 + "\n"
        for _ in range(17 * 1024):
            f.write(line)
    r = cli("check", fifo, huge)  # a FIFO must not hang check (the 30 s timeout of cli() would fail the test)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{fifo}: cannot read: not a regular file" in r.stderr
    assert f"{huge}: cannot read: larger than 16 MiB" in r.stderr


def test_check_cli_reports_errors_one_per_line_without_traceback(tmp_path):
    good = write(tmp_path / "good.toml", """
        [echo]
        socket.listen-stream = "127.0.0.1:7"
        socket.accept = true
        service.exec-start = "cat"
        service.standard-input = "socket"
    """)
    syntax = write(tmp_path / "syntax.toml", '[a]\nsocket.listen-stream = "x"\nthis is = = wrong\n')
    typo = write(tmp_path / "typo.toml", '[t]\nsocket.listen-steam = "127.0.0.1:8"\nservice.exec-start = "x"\n')
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b'[b]\ndescription = "\xff\xfe"\n')
    unreadable = write(tmp_path / "unreadable.toml", "[u]\n")
    unreadable.chmod(0)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    env_file_missing = write(tmp_path / "envfile.toml", """
        [e]
        socket.listen-stream = "127.0.0.1:9"
        service.exec-start = "x"
        service.environment-file = "/nonexistent/env"
    """)
    bad_user = write(tmp_path / "user.toml", """
        [u]
        socket.listen-stream = "127.0.0.1:10"
        service.exec-start = "x"
        service.user = "no-such-user-xyz"
        service.group = "no-such-group-xyz"
    """)

    r = cli("check", good)
    assert r.returncode == 0, r.stderr
    assert "echo: 127.0.0.1:7 -> cat" in r.stdout and "1 unit(s) OK" in r.stdout

    r = cli("check", good, syntax, typo, binary, empty_dir, tmp_path / "missing.toml", env_file_missing, bad_user,
            unreadable)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert all(line.startswith("activator: error: ") for line in lines), lines
    assert f"{syntax}: TOML syntax error: line 3, column 6:" in r.stderr
    assert f"{typo}: t: socket.listen-steam: unknown key (did you mean 'listen-stream'?)" in r.stderr
    assert f"{typo}: t: socket: no address" in r.stderr
    assert f"{binary}: line 2, column 16: not valid UTF-8" in r.stderr
    assert f"{empty_dir}: no *.toml files in this directory" in r.stderr
    assert f"{tmp_path / 'missing.toml'}: No such file or directory" in r.stderr
    assert f"{env_file_missing}: e: service.environment-file: cannot read /nonexistent/env" in r.stderr
    assert f"{bad_user}: u: service.user: unknown user 'no-such-user-xyz'" in r.stderr
    assert f"{bad_user}: u: service.group: unknown group 'no-such-group-xyz'" in r.stderr
    if os.geteuid() != 0:  # root reads anything
        assert f"{unreadable}: cannot read: Permission denied" in r.stderr
    assert len(lines) == 10 + (os.geteuid() != 0)

    # serve reports the same way and binds nothing
    r = cli("serve", typo)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "did you mean 'listen-stream'?" in r.stderr and "listening" not in r.stderr


def test_config_path_from_environment(tmp_path):
    write(tmp_path / "a.toml", '[a]\nsocket.listen-stream = "127.0.0.1:1"\nservice.exec-start = "x"\n')
    r = cli("check", env={"ACTIVATOR_CONFIG": str(tmp_path)})
    assert r.returncode == 0 and "1 unit(s) OK" in r.stdout
    r = cli("check", env={"ACTIVATOR_CONFIG": str(tmp_path / "nope")})
    assert r.returncode == 1 and "No such file or directory" in r.stderr and "Traceback" not in r.stderr


def test_check_binds_nothing(tmp_path):
    """check on a config whose port is taken and whose socket dir does not exist: valid, nothing created."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        sock_dir = tmp_path / "not-yet"
        f = write(tmp_path / "u.toml", f"""
            [u]
            socket.listen-stream = ["127.0.0.1:{port}", "{sock_dir}/u.sock"]
            service.exec-start = "x"
        """)
        r = cli("check", f)
        assert r.returncode == 0, r.stderr
        assert not sock_dir.exists()


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.toml")))
def test_check_every_shipped_config(path):
    r = cli("check", ROOT / path)
    assert r.returncode == 0, r.stderr
    assert "unit(s) OK" in r.stdout


def test_load_configuration_still_unpacks_as_before(tmp_path):
    """Configuration was a NamedTuple (units, warnings): it still unpacks as one."""
    unit = tmp_path / "u.toml"
    unit.write_text('[u]\nsocket.listen-stream = "127.0.0.1:8999"\nservice.exec-start = ["true"]\n')
    units, warnings = load_configuration([str(unit)])
    assert [u.name for u in units] == ["u"] and warnings == []


def test_a_huge_integer_in_a_unit_file_is_a_one_line_error(tmp_path):
    """tomllib reads a 400-digit integer; a time setting once turned it into an OverflowError traceback."""
    path = tmp_path / "big.toml"
    path.write_text('[u]\nsocket.listen-stream = "127.0.0.1:1"\nservice.exec-start = ["true"]\n'
                    f'service.timeout-stop-sec = {"9" * 400}\n')
    r = cli("check", path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().endswith("is out of range") and len(r.stderr.strip().splitlines()) == 1
