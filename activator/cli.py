"""The command line: a thin layer that builds units and hands them to the engine.

Exit codes: 2 for usage errors (bad options, bad addresses), 1 for invalid
configuration or runtime failures (a socket that cannot be bound), otherwise
what the engine returns. User mistakes get one line on stderr, never a traceback.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING, Any, Callable, NoReturn

import click

from . import __version__
from .ctl import control_options, ctl
from .processes import parse_signal
from .settings import BY_KEY, SETTINGS, Setting, format_default, get
from .values import Bool, Invalid

if TYPE_CHECKING:
    from .units import Unit


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"activator: error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="activator", message="%(prog)s %(version)s")
def main() -> None:
    """Socket-activation launcher and supervisor.

    \b
    Holds listening sockets, starts daemons on demand with them
    at fd 3, 4, ... (LISTEN_FDS), supervises and restarts them.
    """


def _logging_options(f):
    f = click.option("-v", "--verbose", is_flag=True, help="Log every event, including each connection.")(f)
    f = click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
                     help="Log lines as text or as one JSON object per line.")(f)
    return f


def _forward_option(f):
    return click.option(
        "--forward-signal", "forward", multiple=True, metavar="SIGNAL",
        help="Signal forwarded to the daemons (repeatable; default SIGUSR1, SIGUSR2, SIGWINCH).",
    )(f)


def _forward_signals(values: tuple[str, ...]) -> tuple[int, ...]:
    from .supervisor import DEFAULT_FORWARD

    if not values:
        return DEFAULT_FORWARD
    result = []
    for v in values:
        for part in v.split(","):
            try:
                sig = parse_signal(part)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--forward-signal") from None
            if sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD):
                raise click.BadParameter(f"{signal.Signals(sig).name} cannot be forwarded", param_hint="--forward-signal")
            result.append(sig)
    return tuple(result)


# ------------------------------------------------------------------ run
# The options of `run` that are settings come from the registry (same parser, bounds and doc as TOML);
# socket options first, then the unit's, then the service's.
RUN_SETTINGS = tuple(sorted((s for s in SETTINGS if s.flags), key=lambda s: ("socket", "unit", "service").index(s.part)))
# Keys that `run` sets from its own options, for naming the option in an error.
_RUN_ONLY_FLAGS = {"listen-stream": "--listen", "listen-datagram": "--listen", "listen-sequential-packet": "--listen",
                   "file-descriptor-name": "--fdname", "environment": "--setenv", "exec-start": "COMMAND",
                   "standard-input": "--inetd"}


def _dest(setting: Setting) -> str:
    return setting.key.replace("-", "_")


def _check(setting: Setting, raw: Any) -> Any:
    """``raw`` (what TOML would hold) after the setting's own parser accepted it; exit 2 when it does not."""
    try:
        setting.parse(raw)
    except Invalid as exc:
        raise click.BadParameter(str(exc)) from None
    return raw


def _setting_callback(setting: Setting) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def validate(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None or value == ():
            return None  # not given: the TOML default (or the setting's run_default) applies
        if setting.parse.multiple:
            return _check(setting, [setting.parse.from_text(item) for item in value])
        return _check(setting, setting.parse.from_text(value))
    return validate


def _run_default_text(setting: Setting) -> str:
    if callable(setting.run_default):
        return setting.run_default.__doc__ or ""
    if setting.run_default is not None:
        return str(setting.run_default)
    return format_default(setting)


def _setting_option(setting: Setting) -> Callable:
    doc = setting.doc.replace("`", "")  # the docs page's markup
    if isinstance(setting.parse, Bool):  # every boolean setting is off by default: a flag turns it on
        return click.option(*setting.flags, _dest(setting), is_flag=True, default=None, help=doc)
    repeat = " (repeatable)" if setting.parse.multiple else ""
    return click.option(*setting.flags, _dest(setting), multiple=setting.parse.multiple, metavar=setting.metavar,
                        callback=_setting_callback(setting),
                        help=f"{doc}{repeat} [default: {_run_default_text(setting).replace('`', '')}]")


def _setting_options(f: Callable) -> Callable:
    for setting in reversed(RUN_SETTINGS):
        f = _setting_option(setting)(f)
    return f


def _check_listen(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    _check(get("listen-stream"), list(value))
    return value


def _check_setenv(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[str]:
    # As systemd-socket-activate: NAME alone passes our value through, "" when we have none.
    items = [item if "=" in item else f"{item}={os.environ.get(item, '')}" for item in value]
    return _check(get("environment"), items)


def _check_fdnames(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[str]:
    names = [name for entry in value for name in entry.split(":")]
    for name in names:
        _check(get("file-descriptor-name"), name)
    return names


def _socket_names(names: list[str], n_inherited: int, n_listen: int) -> list[str | None]:
    """--fdname: one name for every --listen socket (or every socket without --listen), or one name each."""
    total = n_inherited + n_listen
    unnamed: list[str | None] = [None] * n_inherited  # inherited sockets keep the names our parent gave them
    if not names:
        return unnamed + [None] * n_listen
    if len(names) == 1:
        return unnamed + [names[0]] * n_listen if n_listen else [names[0]] * total
    if len(names) == n_listen:
        return unnamed + list(names)
    if len(names) == total:
        return list(names)
    raise click.BadParameter(f"{len(names)} names for {total} sockets: give one name for all, or one per socket",
                             param_hint="'--fdname'")


def _run_unit_name(argv0: str) -> str:
    """The unit's name in the log: the command's base name, with what a unit name may not hold replaced."""
    name = "".join(c if c.isascii() and (c.isalnum() or c in "_.@-") else "_" for c in os.path.basename(argv0))
    return name[:255] or "run"


def _run_document(values: dict[str, Any], listen_key: str, listen: tuple[str, ...], names: list[str | None],
                  inherited: list[tuple[int, str]], command: tuple[str, ...], env: list[str], inetd: bool) -> dict:
    """The TOML table of the unit `run` starts, as a user would write it."""
    # None: not given (flags too default to None). Not `if value`: 0 is a value (--start-limit-burst 0).
    given = {s.key: values[_dest(s)] for s in RUN_SETTINGS if values[_dest(s)] is not None}
    for s in SETTINGS:
        if s.run_default is not None and s.key not in given:
            given[s.key] = s.run_default() if callable(s.run_default) else s.run_default
    if inetd:  # as in systemd-socket-activate, --inetd implies one instance per connection
        given.update({"accept": True, "standard-input": "socket"})
    by_part: dict[tuple[str, str], dict[str, Any]] = {}
    for key, value in given.items():
        s = get(key)
        by_part.setdefault((s.part, s.target), {})[key] = value
    sockets: list[dict[str, Any]] = [{"listen-inherited": fd} for fd, _ in inherited]
    sockets += [{listen_key: text, **by_part.get(("socket", "spec"), {})} for text in listen]
    for table, name in zip(sockets, names):
        if name is not None:
            table["file-descriptor-name"] = name
    sockets[0].update(by_part.get(("socket", "unit"), {}))
    service = {**by_part.get(("service", "service"), {}), "exec-start": list(command)}
    if env:
        service["environment"] = env
    return {**by_part.get(("unit", "service"), {}), "socket": sockets, "service": service}


def _option_of(key: str | None) -> str | None:
    """The option of `run` that gave a key its value; None for what comes from our parent (listen-inherited)."""
    if key in _RUN_ONLY_FLAGS:
        return _RUN_ONLY_FLAGS[key]
    flags = BY_KEY[key].flags if key in BY_KEY else ()
    return next((f for f in flags if f.startswith("--")), None)


def _run_unit(name: str, table: dict, inherited: list[tuple[int, str]]) -> "Unit":
    """The unit, built by the same loader as TOML units; its complaints name our options."""
    from .config import ConfigError, Loader

    loader = Loader(inherited)
    loader.add_document({name: table}, "run")
    try:
        [unit] = loader.finish()
    except ConfigError as exc:
        options = [_option_of(p.key) for p in exc.problems]
        if None in options:  # not about an option: about what our parent passed us
            _fail("; ".join(p.message for p in exc.problems))
        raise click.UsageError("; ".join(f"{o}: {p.message}" for o, p in zip(options, exc.problems))) from None
    return unit


@main.command(context_settings={"allow_interspersed_args": False},
              short_help="Start COMMAND on demand with the sockets at fd 3, 4, ...")
@click.option("-l", "--listen", "listen", multiple=True, metavar="ADDR", callback=_check_listen,
              help="Listen on ADDR: PORT, IPv4:PORT, [IPv6]:PORT, /path, @abstract, vsock:CID:PORT (repeatable).")
@click.option("-d", "--datagram", is_flag=True, help="Datagram sockets instead of stream sockets.")
@click.option("--seqpacket", is_flag=True, help="SOCK_SEQPACKET sockets instead of stream sockets.")
@click.option("--inetd", is_flag=True,
              help="Pass each connection on stdin and stdout instead of fd 3, without LISTEN_* (implies -a).")
@click.option("-E", "--setenv", "setenv", multiple=True, metavar="NAME[=VALUE]", callback=_check_setenv,
              help="Set a variable for the daemon; without =VALUE take it from our environment.")
@click.option("--fdname", "fdnames", multiple=True, metavar="NAME[:NAME...]", callback=_check_fdnames,
              help="Names for LISTEN_FDNAMES: one for all sockets, or one per socket.")
@click.option("--now", is_flag=True, help="Start the daemon at once instead of at the first connection.")
@click.option("--exit-with-service", is_flag=True, help="Exit when the daemon exits, with its status.")
@_setting_options
@_forward_option
@_logging_options
@control_options
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(listen, datagram, seqpacket, inetd, setenv, fdnames, now, exit_with_service, forward, verbose, log_format,
        command, control, **values):
    """Listen on sockets and start COMMAND on the first connection, passing them as fd 3, 4, ...

    Options are those of systemd-socket-activate, plus supervision: the daemon is
    restarted by the next connection after it exits.
    """
    accept = bool(values["accept"]) or inetd
    if datagram and seqpacket:
        raise click.UsageError("--datagram and --seqpacket are mutually exclusive")
    if now and accept:
        raise click.UsageError("--now cannot be used with --accept")
    if exit_with_service and accept:
        raise click.UsageError("--exit-with-service cannot be used with --accept")
    inherited = _inherited_fds()
    if not inherited and not listen:
        raise click.UsageError("no sockets: give at least one --listen ADDR (or be socket-activated yourself)")
    names = _socket_names(fdnames, len(inherited), len(listen))
    listen_key = "listen-datagram" if datagram else "listen-sequential-packet" if seqpacket else "listen-stream"
    table = _run_document(values, listen_key, listen, names, inherited, command, setenv, inetd)
    unit = _run_unit(_run_unit_name(command[0]), table, inherited)
    unit.start_now = now
    unit.default_fd_name = None  # as systemd-socket-activate: no LISTEN_FDNAMES unless a socket is named
    _engine_main([unit], verbose, log_format, forward, exit_with_service=exit_with_service, control=control)


_INHERITED: list[tuple[int, str]] | None = None


def _inherited_fds() -> list[tuple[int, str]]:
    """The descriptors our parent passed us (read once, kept for a re-exec); a one-line error when its
    LISTEN_* are wrong."""
    global _INHERITED
    from .protocol import ProtocolError, inherited_fds
    from .reexec import RESUMED

    if _INHERITED is not None:
        return _INHERITED
    if RESUMED is not None:  # a re-exec: what our parent passed the first activator, LISTEN_* long unset
        _INHERITED = [(int(fd), str(name)) for fd, name in RESUMED["inherited"]]
        return _INHERITED
    try:
        _INHERITED = inherited_fds()
        return _INHERITED
    except ProtocolError as exc:
        _fail(f"invalid socket-activation environment from our parent: {exc.strerror}")
    except OSError as exc:  # EBADF: LISTEN_FDS counts descriptors that are not open (a stale environment)
        _fail(f"invalid socket-activation environment from our parent: LISTEN_FDS names a descriptor that is "
              f"not open ({exc.strerror})")


def _engine_main(units, verbose, log_format, forward, exit_with_service=False, reloader=None, warnings=(),
                 reload_daemons=False, control=None) -> None:
    """Run the engine. ``reloader`` (serve) returns a Configuration: its warnings are logged at each reload,
    as ``warnings`` are at start (event ``unit-file``)."""
    from . import reexec
    from .control import attach_control
    from .log import Log
    from .sockets import BindError
    from .processes import cloexec_all_above
    from .supervisor import Engine

    if reexec.RESUMED is not None:
        problem = reexec.check_units(reexec.RESUMED, units)
        if problem is not None:
            _fail(f"cannot resume: {problem}")
        if reexec.CHECK_ONLY:
            click.echo(reexec.CHECK_OK)
            sys.exit(0)

    # Descriptors our parent leaked to us (not close-on-exec) must not reach the daemons;
    # the ones passed to us by socket activation are passed on explicitly, by position.
    cloexec_all_above(3)
    log = Log(verbose=verbose, fmt=log_format)
    for line in warnings:
        log.warning("unit-file", line)

    def reload_units() -> list:
        configuration = reloader()
        for line in configuration.warnings:
            log.warning("unit-file", line)
        return configuration.units

    engine = Engine(units, log, exit_with_service=exit_with_service, forward_signals=_forward_signals(forward),
                    reloader=reload_units if reloader else None, reload_daemons=reload_daemons)
    with attach_control(engine, control) as servers:  # opened first: when it fails, nothing is bound
        engine.reexec = reexec.Reexec(engine, servers, _inherited_fds())
        try:
            if reexec.RESUMED is not None:
                engine.resume(reexec.RESUMED)
            else:
                engine.open()
        except BindError as exc:
            for line in exc.messages:
                log.error("bind", line)
            sys.exit(1)
        except (reexec.StateError, OSError, KeyError, TypeError, ValueError) as exc:
            # After the exec, with no way back: the daemons are stopped rather than left unsupervised.
            log.error("reexec-failed", f"cannot take over the state: {exc!r}; stopping everything")
            reexec.unblock_signals()  # blocked across the exec: the stop needs SIGCHLD
            engine.reexec.count -= 1  # what `ctl reexec` sees while this process stops: a failure
            engine.reexec.failures, engine.reexec.last_error = 1, f"the new process cannot take over: {exc!r}"
            engine.stop(1)
        code = engine.run()
    sys.exit(code)


def _config_paths(paths: tuple[str, ...]) -> list[str]:
    if paths:
        return list(paths)
    env = os.environ.get("ACTIVATOR_CONFIG")
    if env:
        return [p for p in env.split(os.pathsep) if p]
    return ["/etc/activator"]


def _strict_option(f):
    return click.option("--strict", is_flag=True,
                        help="Directives of unit files that activator cannot honour are errors, not warnings.")(f)


def _print_errors(messages: list[str]) -> NoReturn:
    for line in messages:
        click.echo(f"activator: error: {line}", err=True)
    sys.exit(1)


def _print_warnings(messages: list[str]) -> None:
    for line in messages:
        click.echo(f"activator: warning: {line}", err=True)


@main.command(short_help="Run the units of TOML and systemd unit files; SIGHUP reloads.")
@click.argument("paths", nargs=-1, type=click.Path(readable=False))
@click.option("--exit-with-service", is_flag=True,
              help="Stop everything and exit, with its status, as soon as any unit's daemon exits.")
@click.option("--reload-daemons", is_flag=True,
              help="At each reload (SIGHUP), also run exec-reload of the units left unchanged whose daemon runs.")
@_strict_option
@_forward_option
@_logging_options
@control_options
def serve(paths, exit_with_service, reload_daemons, strict, forward, verbose, log_format, control):
    """Run the units of PATH: TOML files, systemd *.socket and *.service files, or directories of them.

    Without PATH: $ACTIVATOR_CONFIG, else /etc/activator. SIGHUP reloads.
    """
    from .config import ConfigError, load_configuration

    sources = _config_paths(paths)
    inherited = _inherited_fds()  # read once: units take them with listen-inherited
    try:
        configuration = load_configuration(sources, inherited=inherited, strict=strict)
    except ConfigError as exc:
        _print_errors(exc.messages)
    if not configuration.units:
        _fail(f"no units found in {', '.join(sources)}")
    _engine_main(configuration.units, verbose, log_format, forward, exit_with_service=exit_with_service,
                 reloader=lambda: load_configuration(sources, inherited=inherited, strict=strict),
                 warnings=configuration.warnings, reload_daemons=reload_daemons, control=control)


@main.command(short_help="Validate unit files without binding anything.")
@click.argument("paths", nargs=-1, type=click.Path(readable=False))
@_strict_option
def check(paths, strict):
    """Validate unit files (TOML, systemd *.socket and *.service) without binding anything: exit 0 when
    valid, 1 listing every error. What unit files hold that activator cannot honour is listed too."""
    from .config import ConfigError, load_configuration

    sources = _config_paths(paths)
    try:
        configuration = load_configuration(sources, strict=strict)
    except ConfigError as exc:
        _print_errors(exc.messages)
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
        _print_errors(exc.messages)
    _print_warnings(warnings)
    click.echo(to_toml(document), nl=False)


main.add_command(ctl)
