"""The command line in click: its help texts and error messages, and the commands that have no fast path.

`run` and `serve` are declared in activator.commands (their options, what they do); click is their
parser for what activator.commands.parse leaves it (help, unusual spellings, every usage error).

Exit codes: 2 for usage errors (bad options, bad addresses), 1 for invalid
configuration or runtime failures (a socket that cannot be bound), otherwise
what the engine returns. User mistakes get one line on stderr, never a traceback.
"""
from __future__ import annotations

from typing import Any, Callable, NoReturn

import click

from . import __version__, commands
from .ctl import ctl
from .values import Invalid


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="activator", message="%(prog)s %(version)s")
def main() -> None:
    """Socket-activation launcher and supervisor.

    \b
    Holds listening sockets, starts daemons on demand with them
    at fd 3, 4, ... (LISTEN_FDS), supervises and restarts them.
    """


def _callback(check: Callable[[Any], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def validate(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        try:
            return check(value)
        except Invalid as exc:
            raise click.BadParameter(str(exc)) from None
    return validate


def _click_option(option: commands.Option) -> Callable:
    kwargs: dict[str, Any] = {"help": option.help}
    if option.flag:
        kwargs.update(is_flag=True, default=option.default)
    else:
        kwargs.update(multiple=option.multiple, metavar=option.metavar)
        if option.choices is not None:
            kwargs.update(type=click.Choice(option.choices), default=option.default, show_default=True)
        if option.check is not None:
            kwargs["callback"] = _callback(option.check)
    return click.option(*option.decls, option.dest, **kwargs)


def _options(options: tuple[commands.Option, ...]) -> Callable[[Callable], Callable]:
    """The click options of a table of activator.commands, in its order."""
    def decorate(f: Callable) -> Callable:
        for option in reversed(options):
            f = _click_option(option)(f)
        return f
    return decorate


def _launch(build: Callable[[dict[str, Any]], commands.Launch], params: dict[str, Any]) -> NoReturn:
    """What the fast path of activator.commands does, with its usage errors in click's words."""
    try:
        launch = build(params)
    except commands.Usage as exc:
        if exc.hint:
            raise click.BadParameter(exc.message, param_hint=exc.hint) from None
        raise click.UsageError(exc.message) from None
    commands.engine_main(launch)


# ------------------------------------------------------------------ run
# Its options: activator.commands.RUN_OPTIONS (the settings of the registry that have flags among them).
@main.command(context_settings={"allow_interspersed_args": False},
              short_help="Start COMMAND on demand with the sockets at fd 3, 4, ...")
@_options(commands.RUN_OPTIONS)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(**params: Any) -> None:
    """Listen on sockets and start COMMAND on the first connection, passing them as fd 3, 4, ...

    Options are those of systemd-socket-activate, plus supervision: the daemon is
    restarted by the next connection after it exits.
    """
    _launch(commands.run, params)


@main.command(short_help="Run the units of TOML and systemd unit files; SIGHUP reloads.")
@click.argument("paths", nargs=-1, type=click.Path(readable=False))
@_options(commands.SERVE_OPTIONS)
def serve(**params: Any) -> None:
    """Run the units of PATH: TOML files, systemd *.socket and *.service files, or directories of them.

    Without PATH: $ACTIVATOR_CONFIG, else /etc/activator. SIGHUP reloads.
    """
    _launch(commands.serve, params)


def _strict_option(f):
    return _click_option(commands.STRICT)(f)


def _print_warnings(messages: list[str]) -> None:
    for line in messages:
        click.echo(f"activator: warning: {line}", err=True)


@main.command(short_help="Validate unit files without binding anything.")
@click.argument("paths", nargs=-1, type=click.Path(readable=False))
@_strict_option
def check(paths, strict):
    """Validate unit files (TOML, systemd *.socket and *.service) without binding anything: exit 0 when
    valid, 1 listing every error. What unit files hold that activator cannot honour is listed too."""
    from .config import ConfigError, load_configuration

    sources = commands.config_paths(paths)
    try:
        configuration = load_configuration(sources, strict=strict)
    except ConfigError as exc:
        commands.print_errors(exc.messages)
    _print_warnings(configuration.warnings)
    for unit in configuration.units:
        listens = ", ".join(s.label for s in unit.sockets)
        via = f" (proxied to {unit.service.proxy_to})" if unit.service.proxy_to is not None else ""
        click.echo(f"{unit.name}: {listens} -> {' '.join(unit.service.argv)}{via}")
    click.echo(f"{len(configuration.units)} unit(s) OK")


@main.command(short_help="Print systemd unit files as TOML units.")
@click.argument("paths", nargs=-1, required=True, type=click.Path(readable=False))
@_strict_option
def convert(paths, strict):
    """Print the TOML units equivalent to systemd *.socket and *.service files (or directories of them):
    what serve would run. Exit 1 listing every error; warnings go to stderr."""
    from .config import ConfigError, convert_unit_files
    from .unitfile import to_toml

    try:
        document, warnings = convert_unit_files(list(paths), strict=strict)
    except ConfigError as exc:
        commands.print_errors(exc.messages)
    _print_warnings(warnings)
    click.echo(to_toml(document), nl=False)


main.add_command(ctl)
