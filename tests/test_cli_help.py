"""The top-level help and version are answered without click; they must say what click would."""
import os
import subprocess
import sys

from click.testing import CliRunner

from activator import __main__ as entry
from activator import __version__
from activator.cli import main

ACTIVATOR = os.path.join(os.path.dirname(sys.executable), "activator")


def test_static_help_is_clicks_rendering():
    rendered = CliRunner().invoke(main, ["--help"], prog_name="activator")
    assert rendered.exit_code == 0
    assert entry.HELP == rendered.output


def test_activator_help_and_version_without_importing_click():
    code = (
        "import sys; sys.argv = ['activator', ARG]; import activator.__main__ as m; m.main(); "
        "print('click' in sys.modules, file=sys.stderr)"
    )
    for arg, expected in (("--help", entry.HELP), ("-h", entry.HELP), ("--version", f"activator {__version__}\n")):
        r = subprocess.run([sys.executable, "-c", code.replace("ARG", repr(arg))], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, r.stderr
        assert r.stdout == expected
        assert r.stderr.strip() == "False", f"{arg} imported click"


def test_console_script_help_matches():
    r = subprocess.run([ACTIVATOR, "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout == entry.HELP
    # Anything else goes through click as usual.
    r = subprocess.run([ACTIVATOR, "run", "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "--listen ADDR" in r.stdout
