"""Entry point of the `activator` command and of `python -m activator`.

`--version` and the top-level `--help` are answered before the command-line
machinery (click) is imported: they are what scripts, health checks and
newcomers call most, and they should cost no more than starting the
interpreter. `run` and `serve` parse a plain command line without click too
(activator.commands), since click costs as much as the rest of their start-up.
The help text below is click's own rendering of `activator.cli`;
tests/test_cli_help.py fails when the two drift apart.
"""
import os
import sys

HELP = """\
Usage: activator [OPTIONS] COMMAND [ARGS]...

  Socket-activation launcher and supervisor.

  Holds listening sockets, starts daemons on demand with them
  at fd 3, 4, ... (LISTEN_FDS), supervises and restarts them.

Options:
  --version   Show the version and exit.
  -h, --help  Show this message and exit.

Commands:
  check    Validate unit files without binding anything.
  convert  Print systemd unit files as TOML units.
  ctl      Control a running activator: status, start, stop, restart, reexec.
  run      Start COMMAND on demand with the sockets at fd 3, 4, ...
  serve    Run the units of TOML and systemd unit files; SIGHUP reloads.
"""


def _narrow_terminal() -> bool:
    # click wraps to the terminal below 80 columns; there the text above would not be its rendering.
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns < 80
    except (OSError, ValueError):
        return False


def main() -> None:
    args = sys.argv[1:]
    resume = os.environ.pop("ACTIVATOR_RESUME_FD", None)  # a re-exec (activator.reexec), never for daemons
    if resume is not None or args[:1] == ["--resume-check"]:
        from .reexec import resume_main

        resume_main(["--resume", resume] if resume is not None else args)
        args = sys.argv[1:]  # the command line of the activator that re-executed
    if args == ["--version"]:
        from . import __version__

        sys.stdout.write(f"activator {__version__}\n")
        return
    if args in (["--help"], ["-h"]) and os.path.basename(sys.argv[0]) == "activator" and not _narrow_terminal():
        sys.stdout.write(HELP)
        return
    if args and args[0] in ("run", "serve"):
        import gc

        gc.disable()  # before the imports, whose allocations would trigger collections (commands.main says why)
        from . import commands

        commands.main(args)  # returns when the command line is click's to parse
    from .cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
