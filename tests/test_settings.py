"""The settings registry: run and TOML take the same settings, with the same parsing and bounds.

The walk below goes through every setting that `run` has an option for and feeds
each the same values, generated from its parser's kind and bounds, once as a
`run` option and once as a TOML key: a value one accepts the other accepts, with
the same result on the unit; a value one rejects the other rejects, in one line
naming the option (run, exit 2) or FILE: UNIT: KEY (TOML, exit 1).
"""
from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from activator import cli, commands, settings
from activator import values as v
from activator.addresses import parse_address
from activator.config import ConfigError, load_units
from activator.units import BindSpec, InheritedSpec, UnresolvedInherited

from conftest import ROOT, free_port, wait_for

RUN_ONLY = {"-l", "--listen", "-d", "--datagram", "--seqpacket", "--inetd", "-E", "--setenv", "--fdname", "--now",
            "--exit-with-service", "--forward-signal", "-v", "--verbose", "--log-format", "-h", "--help"}
# systemd spellings that a mechanical kebab-case does not give
KEBAB_EXCEPTIONS = {"BindIPv6Only": "bind-ipv6-only", "UMask": "umask"}


# ------------------------------------------------------------------ the registry itself
def test_each_setting_declared_once_and_complete():
    keys = [s.key for s in settings.SETTINGS]
    assert len(keys) == len(set(keys))
    flags = [f for s in settings.SETTINGS for f in s.flags]
    assert len(flags) == len(set(flags)) and not set(flags) & RUN_ONLY
    for s in settings.SETTINGS:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", s.key), s.key
        assert s.part in settings.PARTS and s.reload in settings.RELOAD_CLASSES, s
        assert s.doc and "\n" not in s.doc and s.doc.endswith("."), s.key
        assert s.flags or s.no_flag, f"{s.key}: no run option and no reason why"
        s.default  # the attribute exists on the object it fills
        if s.systemd:
            section, name = s.systemd
            kebab = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "-", name).lower()
            assert KEBAB_EXCEPTIONS.get(name, kebab) == s.key, (s.key, name)
            assert section in ("Unit", "Socket", "Service")


def test_reference_page_is_current():
    page = ROOT / "docs" / "settings.md"
    assert page.read_text() == settings.markdown(), \
        "docs/settings.md is out of date: python -m activator.settings --markdown > docs/settings.md"


def test_reference_page_command():
    r = subprocess.run([sys.executable, "-m", "activator.settings", "--markdown"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and r.stdout == settings.markdown()
    r = subprocess.run([sys.executable, "-m", "activator.settings"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr


def test_run_help_describes_every_option():
    r = CliRunner().invoke(cli.main, ["run", "--help"], prog_name="activator")
    assert r.exit_code == 0
    for param in cli.run.params:
        if isinstance(param, cli.click.Option):
            assert param.help, f"{param.opts} has no help"
    assert "implies -a" in " ".join(r.output.split())
    for s in commands.RUN_SETTINGS:
        for flag in s.flags:
            assert flag in r.output


def test_identity_comes_from_the_reload_classes():
    base = BindSpec(parse_address("127.0.0.1:1"))
    changed = {"bind_ipv6_only": "both", "reuse_port": True, "free_bind": True, "backlog": 5, "keep_alive": True,
               "no_delay": True, "receive_buffer": 4096, "send_buffer": 4096, "socket_mode": 0o600,
               "socket_user": "root", "socket_group": "root", "directory_mode": 0o700, "name": "x"}
    spec_settings = {s.attr: s for s in settings.SETTINGS if s.target == "spec" and s.attr in changed}
    assert set(spec_settings) == set(changed)
    for attr, value in changed.items():
        other = BindSpec(parse_address("127.0.0.1:1"), **{attr: value})
        rebind = spec_settings[attr].reload == "socket-rebind"
        assert (other.identity() != base.identity()) == rebind, attr
        assert (other.live_options() != base.live_options()) == (spec_settings[attr].reload == "socket-live"), attr
    assert BindSpec(parse_address("127.0.0.1:2")).identity() != base.identity()
    assert BindSpec(parse_address("127.0.0.1:1"), type=socket.SOCK_SEQPACKET).identity() != base.identity()
    assert InheritedSpec(3).identity() != InheritedSpec(4).identity()
    assert InheritedSpec(3).identity() == InheritedSpec(3, name="other").identity()
    assert UnresolvedInherited("web").label == "inherited web"


def test_bounded_usec():
    assert v.bounded_usec("1500000") == 1.5
    assert v.bounded_usec(" 0 ") == 0.0
    assert v.bounded_usec(str(2**64 - 1)) == v.TIME_MAX  # a daemon may ask for more than the loop waits
    assert v.bounded_usec("9" * 20) == v.TIME_MAX
    for bad in ("", "-1", "1.5", "1e6", "９", "1" * 21, "12abc", "infinity"):
        assert v.bounded_usec(bad) is None, bad
    # the bound is below what one epoll_wait() can wait (an int of milliseconds)
    assert v.TIME_MAX * 1000 < 2**31 - 1


# ------------------------------------------------------------------ the walk: run and TOML agree
@dataclass
class Case:
    toml: str  # the value as written in TOML
    cli: str | None  # the same value as run's option takes it (None: TOML only)
    good: bool


def word(text: str, good: bool) -> Case:
    """A string value: quoted in TOML, as it is on the command line."""
    return Case(f'"{text}"', text, good)


def num(text: str, good: bool) -> Case:
    """A number: unquoted in TOML."""
    return Case(text, text, good)


def _cases(s: settings.Setting, tmp_path: Path) -> list[Case]:
    p = s.parse
    kind = p.kind
    if kind == "int":
        return [num(str(p.minimum), True), num(str(p.maximum), True), num(str(p.minimum - 1), False),
                num(str(p.maximum + 1), False), num("1.5", False), word("many", False),
                Case('"12"', None, False), Case("true", None, False)]
    if kind == "size":
        return [num("1", True), word("1M", True), num(str(p.maximum), True), word("2G", False), num("0", False),
                word("1Q", False)]
    if kind == "time":
        inf = p.infinity != "reject"
        return [word("100ms", True), word("1min 30s", True), num("0", True), word(v.TIME_MAX_TEXT, True),
                word(f"{v.TIME_MAX_TEXT} 1s", False), word("30d", False), word("5 parsecs", False), num("-1", False),
                word("infinity", inf), Case("inf", None, inf), Case('"1s\\u0000"', None, False),
                Case("nan", None, False), Case("[1]", None, False)]
    if kind == "mode":
        top = p.maximum
        return [word("0", True), word("0640", True), word(f"{top:04o}", True), word(f"{top + 1:o}", False),
                word("0999", False), word("rwx", False), Case(f"0o{top:o}", None, True),
                Case(f"0o{top + 1:o}", None, False), Case("-1", None, False)]
    if kind == "choice":
        return [word(c, True) for c in p.choices] + [word("bogus", False), Case("1", None, False)]
    if kind == "signal":
        return [word("SIGINT", True), word("hup", True), num("9", True), word("SIGFOO", False), num("0", False),
                num("65", False)]
    if kind == "account":
        return [word("root", True), num("0", True), word("no-such-account-xyz", False), word("4294967296", False),
                Case('"ro\\u0000ot"', None, False)]
    if kind == "groups":
        return [word("root", True), word("no-such-group-xyz", False)]
    if kind == "networks":
        return [word("192.0.2.0/24", True), word("any", True), word("1.2.3.4/33", False), word("nowhere", False)]
    if kind == "paths":
        envfile = tmp_path / "env"
        envfile.write_text("FROM_FILE=1\n")
        return [word(str(envfile), True), word(f"-{tmp_path}/missing", True), word(f"{tmp_path}/missing", False),
                word("", False)]
    if kind == "patterns":  # watch-ignore
        return [word("*.log", True), word("build/", True), word("/docs/*.md", True), word("", False),
                word("//", False), Case('"a\\u0000"', None, False), Case("[1]", None, False)]
    if kind == "text":  # working-directory
        return [word(str(tmp_path), True), word("-/nonexistent-activator", True), word("relative", False),
                word("/nonexistent-activator", False), word("", False), Case('"/tmp\\u0000"', None, False)]
    if kind == "bool":
        return [Case("true", "", True), Case('"yes"', None, False)]
    if kind == "backend":  # proxy-to
        return [word("127.0.0.1:8080", True), word("[::1]:8080", True), word("/run/app.sock", True), word("@app", True),
                word("8080", False), word("vsock:2:8080", False), word("localhost:8080", False),
                Case("8080", None, False)]
    raise AssertionError(f"no cases for parser kind {kind!r} of {s.key}")


def _context(s: settings.Setting) -> tuple[list[str], str]:
    """What a setting needs from the rest of the unit to be valid (run options, TOML lines)."""
    if s.key.startswith("ip-address"):
        return ["-a"], "socket.accept = true\n"
    if s.key == "exit-idle-sec":
        return ["--proxy-to", "127.0.0.1:9"], 'service.proxy-to = "127.0.0.1:9"\n'
    return [], ""


def _toml_unit(tmp_path: Path, s: settings.Setting, literal: str, port: int) -> tuple[Path, str]:
    prefix = {"unit": "", "socket": "socket.", "service": "service."}[s.part]
    _, extra = _context(s)
    path = tmp_path / "u.toml"
    path.write_text(f'[u]\n{prefix}{s.key} = {literal}\n{extra}socket.listen-stream = "127.0.0.1:{port}"\n'
                    'service.exec-start = ["true"]\n')
    return path, f"{prefix}{s.key}"


def _value_on(unit, s: settings.Setting):
    owner = {"spec": unit.sockets[0], "unit": unit, "service": unit.service}[s.target]
    return getattr(owner, s.attr)


@pytest.fixture
def run_unit(monkeypatch):
    """Invoke `run` in this process; the unit it would hand to the engine, or the CliRunner result on error."""
    started = []
    monkeypatch.setattr(commands, "engine_main", lambda launch: started.extend(launch.units))
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(name, raising=False)

    def invoke(args: list[str]):
        started.clear()
        result = CliRunner().invoke(cli.main, ["run", *args, "--", "true"], prog_name="activator")
        return (started[0] if started else None), result

    return invoke


@pytest.mark.parametrize("setting", [s for s in settings.SETTINGS if s.flags], ids=lambda s: s.key)
def test_run_and_toml_accept_and_reject_the_same_values(setting, tmp_path, run_unit):
    port = free_port()
    for case in _cases(setting, tmp_path):
        path, where = _toml_unit(tmp_path, setting, case.toml, port)
        try:
            [toml_unit] = load_units([str(path)])
            toml_error = None
        except ConfigError as exc:
            toml_unit, toml_error = None, exc.messages
        if case.good:
            assert toml_error is None, (case, toml_error)
        else:
            assert toml_error and len(toml_error) == 1, (case, toml_error)
            assert toml_error[0].startswith(f"{path}: u: {where}: ") and "\n" not in toml_error[0], toml_error
        if case.cli is None:
            continue
        context, _ = _context(setting)
        for flag in setting.flags:  # every alias the same way
            args = [*context, flag] + ([case.cli] if case.cli or not isinstance(setting.parse, v.Bool) else [])
            unit, result = run_unit([*args, "-l", f"127.0.0.1:{port}"])
            if case.good:
                assert result.exit_code == 0 and unit is not None, (flag, case, result.output)
                assert _value_on(unit, setting) == _value_on(toml_unit, setting), (flag, case)
            else:
                assert result.exit_code == 2 and unit is None, (flag, case, result.output)
                errors = [line for line in result.output.splitlines() if line.startswith("Error")]
                assert len(errors) == 1 and (flag in errors[0] or any(f in errors[0] for f in setting.flags)), \
                    (case, result.output)


def test_every_shipped_config_loads_through_the_registry():
    files = sorted((ROOT / "configs").rglob("*.toml"))
    assert files
    for path in files:
        units = load_units([str(path)])
        assert units and all(u.sockets and u.service.argv for u in units), path


# ------------------------------------------------------------------ run, for real
def test_run_socket_mode_follows_the_umask_unless_given(activator, tmp_path):
    """As systemd-socket-activate: bind() under our umask; --socket-mode sets it (was 0666 whatever the umask)."""
    for umask, extra, expected in ((0o077, [], 0o700), (0o022, [], 0o755), (0o077, ["--socket-mode", "0660"], 0o660)):
        path = tmp_path / f"s{umask:o}{len(extra)}.sock"
        a = activator("run", *extra, "-l", path, "--", "true", preexec_fn=lambda m=umask: os.umask(m))
        a.wait_listening()
        assert stat.S_IMODE(os.stat(path).st_mode) == expected, (umask, extra)
        assert a.stop() == 0
        wait_for(lambda: not path.exists(), what="socket file removed at exit")


def test_run_takes_the_new_settings_to_the_daemon(activator, tmp_path):
    """type exec, umask, working-directory and kill-mode none from run's options reach the daemon."""
    out, term = tmp_path / "out", tmp_path / "term"
    a = activator("run", "--now", "--type", "exec", "--kill-mode", "none", "--timeout-stop", "1s", "--umask", "0027",
                  "--working-directory", tmp_path, "-l", f"127.0.0.1:{free_port()}", "--",
                  "sh", "-c", f'trap "echo term > {term}" TERM; echo "$(umask) $(pwd)" > {out}; sleep 60 & wait')
    wait_for(lambda: out.exists() and out.read_text().strip(), what="the daemon's report")
    assert out.read_text().split() == ["0027", str(tmp_path)]
    assert a.stop() == 0  # kill-mode none: no signal to the daemon; what is left is killed at the end
    assert not term.exists()
