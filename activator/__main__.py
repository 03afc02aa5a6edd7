"""Entry point of the `activator` command and of `python -m activator`.

`--version` is answered before the command-line machinery (click) is imported:
it is what scripts and health checks call most, and it should cost no more
than starting the interpreter.
"""
import sys


def main() -> None:
    if sys.argv[1:] == ["--version"]:
        from . import __version__

        sys.stdout.write(f"activator {__version__}\n")
        return
    from .cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
