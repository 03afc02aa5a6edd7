"""`run` and `serve` parse a plain command line without click (activator.commands), exactly as click does.

The corpus: every setting `run` has a flag for, with every value the registry walk of test_settings.py
tries (each alias), plus run's and serve's own options and the odd command lines. A command line the fast
parser takes gives the very parameters click gives, hence the same unit handed to the engine; one it
declines, or whose parameters the command rejects, is click's: it exits 2 with click's message.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import click
import pytest

from activator import cli, commands
from activator import values as v

from conftest import free_port
from test_settings import _cases, _context


@pytest.fixture(autouse=True)
def _no_inherited(monkeypatch):
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(commands, "_inherited", None)
    monkeypatch.setenv("FROM_OUR_ENV", "x y")


def _click(command: str, args: list[str]):
    """click's parameters for the command line, or the click exception it raises (Exit: after --help)."""
    try:
        with cli.main.commands[command].make_context(command, list(args)) as ctx:
            return ctx.params
    except (click.ClickException, click.exceptions.Exit) as exc:
        return exc


def _launched(command: str, params: dict):
    """What the command hands the engine (compared field by field), or the Usage error it raises."""
    try:
        launch = commands.BUILD[command](params)
    except commands.Usage as exc:
        return exc
    return {"units": launch.units, "verbose": launch.verbose, "log_format": launch.log_format,
            "forward": launch.forward, "control": launch.control, "exit_with_service": launch.exit_with_service,
            "warnings": list(launch.warnings), "reload_daemons": launch.reload_daemons,
            "reloads": launch.reloader is not None}


def _same_as_click(command: str, args: list[str]) -> bool | str:
    """True when the fast path takes the command line (and gives click's parameters and unit); False when it
    leaves it to click, which then rejects it (or shows the help); "click" when click takes what the fast
    path leaves it."""
    fast = commands.parse(command, args)
    slow = _click(command, args)
    if fast is None:
        if isinstance(slow, click.exceptions.Exit):
            assert "--help" in args or "-h" in args
            return False
        if isinstance(slow, dict):
            return "click"
        assert slow.exit_code == 2, (args, slow)
        return False
    assert isinstance(slow, dict), (args, slow)
    assert fast == slow, args
    fast_launch, slow_launch = _launched(command, fast), _launched(command, slow)
    if isinstance(fast_launch, commands.Usage):
        assert isinstance(slow_launch, commands.Usage) and slow_launch.message == fast_launch.message
        return False
    assert fast_launch == slow_launch, args
    return True


@pytest.mark.parametrize("setting", commands.RUN_SETTINGS, ids=lambda s: s.key)
def test_every_setting_of_run_parses_as_click_does(setting, tmp_path):
    port = free_port()
    taken = rejected = 0
    for case in _cases(setting, tmp_path):
        if case.cli is None:
            continue
        context, _ = _context(setting)
        for flag in setting.flags:
            value = [case.cli] if case.cli or not isinstance(setting.parse, v.Bool) else []
            for args in ([*context, flag, *value], [*context, f"{flag}={case.cli}"] if value and flag[:2] == "--"
                         else [*context, f"{flag}{case.cli}"] if value else None):
                if args is None:
                    continue
                took = _same_as_click("run", [*args, "-l", f"127.0.0.1:{port}", "--", "true"])
                assert took == case.good, (args, case)
                taken += took
                rejected += not took
    assert taken  # every setting has a good value


ODD_RUN = [
    # (the command line, whether the fast path takes it)
    (["-l", "PORT", "--", "cat"], True),
    (["--listen=PORT", "cat", "--help"], True),  # options end at COMMAND: --help is cat's
    (["-lPORT", "-l", "/tmp/activator-fastcli.sock", "-l", "@activator-fastcli", "--", "cat", "-x"], True),
    (["-l", "PORT", "-d", "--", "cat"], True),
    (["-l", "PORT", "--seqpacket", "-l", "/tmp/activator-fastcli.sock", "cat"], True),  # TCP fails at bind
    (["-l", "PORT", "--inetd", "cat"], True),
    (["-l", "PORT", "-E", "A=1", "--setenv", "FROM_OUR_ENV", "-EB=", "cat"], True),
    (["-l", "PORT", "-l", "/tmp/activator-fastcli.sock", "--fdname", "a:b", "cat"], True),
    (["-l", "PORT", "--fdname", "one", "cat"], True),
    (["-l", "PORT", "--now", "--exit-with-service", "cat"], True),
    (["-l", "PORT", "--forward-signal", "USR1,HUP", "--forward-signal", "SIGTERM", "cat"], True),
    (["-l", "PORT", "-v", "--log-format", "json", "--log-format=text", "cat"], True),
    (["-l", "PORT", "--control-socket", "ctl.sock", "--metrics-listen", "127.0.0.1:9", "cat"], True),
    (["-l", "PORT", "--no-control-socket", "cat"], True),
    (["-l", "PORT", "--backlog", "5", "--backlog", "7", "cat"], True),  # the last one counts, as in click
    (["-l", "PORT", "--environment-file", "-/nonexistent", "cat"], True),  # a value that starts with -
    (["-l", "PORT", "-a", "--max-connections", "3", "--", "cat", "--", "x"], True),
    (["-l", "PORT", "cat", "--", "-l", "x"], True),  # after COMMAND, -- and options are its own
    (["-l", "PORT", "--", ""], False),  # an empty argv[0]: the loader's usage error
    (["-l", "PORT", "-", "x"], True),  # "-" is a COMMAND
    # click's: help, unknown, abbreviated or combined options, missing values, bad values and usage errors
    (["--help"], False), (["-h"], False), (["-l", "PORT", "--help", "cat"], False),
    (["-l", "PORT", "--bogus", "cat"], False), (["--list", "PORT", "cat"], False), (["-va", "-l", "PORT", "cat"], "click"),
    (["-l", "PORT", "--now=1", "cat"], False), (["-l"], False), (["-l", "PORT"], False), (["-l", "PORT", "--"], False),
    (["-l", "PORT", "--log-format", "xml", "cat"], False), (["-l", "PORT", "-5", "cat"], False),
    (["-l", "PORT", "-d", "--seqpacket", "cat"], False), (["-l", "PORT", "--now", "-a", "cat"], False),
    (["-l", "PORT", "--exit-with-service", "--inetd", "cat"], False),
    (["-l", "PORT", "--control-socket", "x", "--no-control-socket", "cat"], False),
    (["-l", "PORT", "--forward-signal", "KILL", "cat"], False), (["-l", "PORT", "--forward-signal", "BOGUS", "cat"], False),
    (["-l", "PORT", "--metrics-listen", "nowhere", "cat"], False),
    (["-l", "PORT", "--fdname", "a:b:c", "cat"], False), (["-l", "PORT", "--fdname", "", "cat"], False),
    (["-l", "PORT", "-E", "=x", "cat"], False), (["-l", "256.0.0.1:80", "cat"], False), (["cat"], False),
    (["-l", "PORT", "--ip-address-deny", "any", "cat"], False),
]


@pytest.mark.parametrize("args, taken", ODD_RUN, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_odd_run_command_lines(args, taken):
    port = str(free_port())
    assert _same_as_click("run", [a.replace("PORT", port) for a in args]) == taken


def test_serve_parses_as_click_does(tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    for i, path in enumerate((a, b)):
        path.write_text(f'[u{i}]\nsocket.listen-stream = "127.0.0.1:{free_port()}"\nservice.exec-start = ["true"]\n')
    for args, taken in (
        ([str(a)], True), ([str(a), "-v", str(b), "--strict"], True),  # serve's options go anywhere
        (["--exit-with-service", "--reload-daemons", "--log-format", "json", "--", str(a)], True),
        (["--forward-signal", "HUP", "--control-socket=c.sock", str(a)], True),
        (["--help", str(a)], False), ([str(a), "--bogus"], False), (["--strict=yes", str(a)], False),
        ([str(a), "--forward-signal", "STOP"], False),
    ):
        assert _same_as_click("serve", args) == taken, args


def _run_modules(tmp_path, *args: str) -> tuple[int, list[str]]:
    """Run `activator` (its entry point) to the end; the modules it had imported by then."""
    out = tmp_path / "modules.json"
    code = ("import atexit, sys\n"  # not json: whether the run path imports it is a question asked here
            f"atexit.register(lambda: open({str(out)!r}, 'w').write(repr(sorted(sys.modules))))\n"
            f"sys.argv = ['activator', *{list(args)!r}]\n"
            "from activator.__main__ import main\n"
            "main()\n")
    env = {k: val for k, val in os.environ.items() if not k.startswith("LISTEN_")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    return proc.returncode, ast.literal_eval(out.read_text())


# Not needed to run one unit from a plain command line: neither the command line machinery nor what only
# some units use.
NOT_ON_THE_RUN_PATH = ("click", "activator.cli", "activator.ctl", "activator.unitfile", "activator.metrics",
                       "tomllib", "difflib", "traceback", "threading", "glob", "ctypes", "typing", "dataclasses",
                       "inspect", "activator.proxy", "activator.watch", "activator.tomlfast", "json", "shlex",
                       "socket", "signal", "selectors")  # the engine has its own layers: socketapi, signalapi, loop


def test_plain_run_does_not_import_click_or_what_only_some_units_need(tmp_path):
    code, modules = _run_modules(tmp_path, "run", "--now", "--exit-with-service", "-l", f"127.0.0.1:{free_port()}",
                                 "--", sys.executable, "-c", "raise SystemExit(3)")
    assert code == 3  # it ran the daemon, and passed its status on
    assert "activator.supervisor" in modules
    assert [m for m in NOT_ON_THE_RUN_PATH if m in modules] == []


def test_a_command_line_that_is_not_plain_goes_to_click(tmp_path):
    code, modules = _run_modules(tmp_path, "run", "--now", "--exit-with-service", "-vl", f"127.0.0.1:{free_port()}",
                                 "--", sys.executable, "-c", "raise SystemExit(3)")
    assert code == 3 and "click" in modules  # -vl: combined short options are click's


def _spied_start(tmp_path, spies: str, *args: str):
    """``activator ARGS`` in a real process, with ``spies`` (code replacing engine methods) run first; what
    the spies wrote to ``OUT`` as JSON."""
    out = tmp_path / "spied.json"
    code = (f"import gc, json, sys\nfrom activator import supervisor\nOUT = {str(out)!r}\n{spies}"
            f"sys.argv = ['activator', *{list(args)!r}]\n"
            "from activator.__main__ import main\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def test_the_collector_is_off_during_start_up_and_on_while_serving(tmp_path):
    """The cyclic collector is off while `run` parses and binds (it would rescan the start-up's objects
    over and over) and on once the engine serves, with what the start-up left frozen out of its scans."""
    seen = _spied_start(tmp_path, (
        "seen = {'at_import': gc.isenabled()}\n"
        "from activator import processes\n"
        "release = processes.release_memory\n"
        "def spy_release():\n"
        "    seen['released_with_gc'] = gc.isenabled()\n"
        "    return release()\n"
        "processes.release_memory = spy_release\n"
        "open_ = supervisor.Engine.open\n"
        "def spy_open(self):\n"
        "    seen['while_binding'] = gc.isenabled()\n"
        "    open_(self)\n"
        "def spy_run(self):\n"
        "    seen.update(serving=gc.isenabled(), frozen=gc.get_freeze_count())\n"
        "    open(OUT, 'w').write(json.dumps(seen))\n"
        "    return 0\n"
        "supervisor.Engine.open, supervisor.Engine.run = spy_open, spy_run\n"),
        "run", "-l", f"127.0.0.1:{free_port()}", "--", "true")
    assert seen["at_import"] and not seen["while_binding"] and seen["serving"]
    assert seen["released_with_gc"] is False  # the heap given back once, after binding, before serving
    assert seen["frozen"] > 1000  # the modules, the units and the sockets of the start-up


def test_a_reload_puts_what_the_start_up_froze_back_under_the_collector(tmp_path):
    """`serve` freezes the start-up's objects; the units a reload replaces are among them, and would never
    be freed if they are in reference cycles: the reload unfreezes first."""
    units = tmp_path / "u.toml"
    units.write_text(f'[u]\nsocket.listen-stream = "127.0.0.1:{free_port()}"\nservice.exec-start = ["true"]\n')
    before, after = _spied_start(tmp_path, (
        "def spy_run(self):\n"
        "    before = gc.get_freeze_count()\n"
        "    self.reloader()\n"
        "    open(OUT, 'w').write(json.dumps([before, gc.get_freeze_count()]))\n"
        "    return 0\n"
        "supervisor.Engine.run = spy_run\n"), "serve", str(units))
    assert before > 1000 and after == 0
