"""The command line: a thin layer that builds units and hands them to the engine.

Exit codes: 2 for usage errors (bad options, bad addresses), 1 for invalid
configuration or runtime failures (a socket that cannot be bound), otherwise
what the engine returns. User mistakes get one line on stderr, never a traceback.
"""
from __future__ import annotations

import os
import signal
import socket
import sys

import click

from . import __version__
from .ctl import control_options, ctl
from .processes import parse_signal

RESTART_CHOICES = ["no", "on-success", "on-failure", "on-abnormal", "on-abort", "always"]


def _fail(message: str, code: int = 1) -> "NoReturn":  # noqa: F821
    click.echo(f"activator: error: {message}", err=True)
    sys.exit(code)


def _timespan(ctx, param, value):
    if value is None:
        return None
    from .timespan import parse_timespan

    try:
        return parse_timespan(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _signal_number(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_signal(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


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


@main.command(context_settings={"allow_interspersed_args": False},
              short_help="Start COMMAND on demand with the sockets at fd 3, 4, ...")
@click.option("-l", "--listen", "listen", multiple=True, metavar="ADDR",
              help="Listen on ADDR: PORT, IPv4:PORT, [IPv6]:PORT, /path, @abstract, vsock:CID:PORT (repeatable).")
@click.option("-a", "--accept", is_flag=True, help="Start one instance per connection (inetd style).")
@click.option("-d", "--datagram", is_flag=True, help="Datagram sockets instead of stream sockets.")
@click.option("--seqpacket", is_flag=True, help="SOCK_SEQPACKET sockets instead of stream sockets.")
@click.option("--inetd", is_flag=True, help="Pass the connection on stdin and stdout instead of fd 3.")
@click.option("-E", "--setenv", "setenv", multiple=True, metavar="NAME[=VALUE]",
              help="Set a variable for the daemon; without =VALUE take it from our environment.")
@click.option("--fdname", "fdnames", multiple=True, metavar="NAME[:NAME...]", help="Names for LISTEN_FDNAMES.")
@click.option("--now", is_flag=True, help="Start the daemon at once instead of at the first connection.")
@click.option("--restart", type=click.Choice(RESTART_CHOICES), default="no", show_default=True,
              help="When to restart the daemon after it exits (without waiting for a connection).")
@click.option("--restart-sec", callback=_timespan, default="100ms", show_default=True, metavar="TIME",
              help="Delay before such a restart.")
@click.option("--max-connections", type=click.IntRange(1), default=64, show_default=True,
              help="Accept mode: instances at most; more connections are closed at once.")
@click.option("--max-connections-per-source", type=click.IntRange(0), default=0, show_default=True,
              help="Accept mode: instances at most per client IP address (0: no limit).")
@click.option("--exit-with-service", is_flag=True, help="Exit when the daemon exits, with its status.")
@click.option("--timeout-stop", callback=_timespan, default="10s", show_default=True, metavar="TIME",
              help="How long a stopping daemon gets before SIGKILL.")
@click.option("--trigger-limit-interval", callback=_timespan, default="2s", show_default=True, metavar="TIME")
@click.option("--trigger-limit-burst", type=click.IntRange(0), default=None,
              help="Activations per interval and socket [default: 20; 0 (off) in accept mode].")
@click.option("--start-limit-interval", callback=_timespan, default="10s", show_default=True, metavar="TIME")
@click.option("--start-limit-burst", type=click.IntRange(0), default=5, show_default=True,
              help="Daemon starts per interval (0: no limit).")
@click.option("--backlog", type=click.IntRange(0), default=socket.SOMAXCONN, show_default=True)
@click.option("--kill-mode", type=click.Choice(["control-group", "mixed", "process"]), default="control-group",
              show_default=True, help="What a stop signals: the daemon's whole tree, or only its main process.")
@click.option("--kill-signal", callback=_signal_number, default="SIGTERM", show_default=True)
@click.option("--type", "service_type", type=click.Choice(["simple", "notify"]), default="simple", show_default=True,
              help="notify: the daemon reports readiness with sd_notify (NOTIFY_SOCKET).")
@click.option("--user", help="Run the daemon as this user (activator must be root).")
@click.option("--group", help="Run the daemon with this group.")
@click.option("--ip-address-allow", "ip_allow", multiple=True, metavar="PREFIX",
              help="Accept mode: let in peers matching PREFIX (CIDR, any, localhost, link-local; repeatable).")
@click.option("--ip-address-deny", "ip_deny", multiple=True, metavar="PREFIX",
              help="Accept mode: close connections from peers matching PREFIX unless allowed (repeatable).")
@_forward_option
@_logging_options
@control_options
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(listen, accept, datagram, seqpacket, inetd, setenv, fdnames, now, restart, restart_sec, max_connections,
        max_connections_per_source, exit_with_service, timeout_stop, trigger_limit_interval, trigger_limit_burst,
        start_limit_interval, start_limit_burst, backlog, kill_mode, kill_signal, service_type, user, group,
        ip_allow, ip_deny, forward, verbose, log_format, command, control):
    """Listen on sockets and start COMMAND on the first connection, passing them as fd 3, 4, ...

    Options are those of systemd-socket-activate, plus supervision: the daemon is
    restarted by the next connection after it exits.
    """
    from .addresses import AddressError, parse_address
    from .protocol import inherited_fds, valid_fdname
    from .units import ListenSpec, ServiceSpec, Unit

    if datagram and seqpacket:
        raise click.UsageError("--datagram and --seqpacket are mutually exclusive")
    if accept and datagram:
        raise click.UsageError("--datagram cannot be used with --accept: datagram sockets have no connections")
    if inetd and not accept:
        accept = True  # as in systemd-socket-activate, --inetd implies one instance per connection
    if now and accept:
        raise click.UsageError("--now cannot be used with --accept")
    if exit_with_service and accept:
        raise click.UsageError("--exit-with-service cannot be used with --accept")
    sock_type = socket.SOCK_DGRAM if datagram else socket.SOCK_SEQPACKET if seqpacket else socket.SOCK_STREAM

    addresses = []
    for text in listen:
        try:
            addresses.append(parse_address(text))
        except AddressError as exc:
            raise click.BadParameter(str(exc), param_hint="'--listen'") from None

    names: list[str] = []
    for entry in fdnames:
        names.extend(entry.split(":"))
    for name in names:
        if not valid_fdname(name):
            raise click.BadParameter(f"invalid file descriptor name {name!r}", param_hint="'--fdname'")

    try:
        inherited = inherited_fds()
    except OSError as exc:  # ProtocolError, or EBADF: LISTEN_FDS names a descriptor that is not open
        _fail(f"invalid socket-activation environment from our parent: {exc.strerror}")

    n_total = len(inherited) + len(addresses)
    if n_total == 0:
        raise click.UsageError("no sockets: give at least one --listen ADDR (or be socket-activated yourself)")
    specs: list[ListenSpec] = []
    for fd, name in inherited:
        try:
            kind = socket.socket(fileno=os.dup(fd))
            itype = kind.type
            kind.close()
        except OSError:
            _fail(f"inherited fd {fd} is not a socket")
        specs.append(ListenSpec(None, type=itype, name=None if name == "unknown" else name, inherited_fd=fd))
    for address in addresses:
        specs.append(ListenSpec(address, type=sock_type, backlog=backlog, remove_on_stop=True))
    if names:
        if len(names) == 1:
            targets = specs[len(inherited):] if addresses else specs
            for spec in targets:
                spec.name = names[0]
        elif len(names) == len(addresses):
            for spec, name in zip(specs[len(inherited):], names):
                spec.name = name
        elif len(names) == len(specs):
            for spec, name in zip(specs, names):
                spec.name = name
        else:
            raise click.BadParameter(
                f"{len(names)} names for {len(specs)} sockets: give one name for all, or one per socket",
                param_hint="'--fdname'",
            )

    if ip_allow or ip_deny:
        from .access import parse_networks

        for hint, entries in (("'--ip-address-allow'", ip_allow), ("'--ip-address-deny'", ip_deny)):
            try:
                parse_networks(list(entries))
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint=hint) from None

    env: dict[str, str] = {}
    for item in setenv:
        key, sep, value = item.partition("=")
        # systemd's env_name_is_valid(): a shell variable name
        if not key or key[0].isdigit() or not all(c.isascii() and (c.isalnum() or c == "_") for c in key):
            raise click.BadParameter(f"invalid variable {item!r}", param_hint="'--setenv'")
        if sep:
            env[key] = value
        else:
            # As systemd-socket-activate: NAME alone passes our value through, "" when we have none.
            env[key] = os.environ.get(key, "")

    service = ServiceSpec(
        argv=list(command), environment=env, type=service_type, restart=restart, restart_sec=restart_sec,
        start_limit_interval=start_limit_interval, start_limit_burst=start_limit_burst, timeout_stop=timeout_stop,
        kill_signal=kill_signal, kill_mode=kill_mode, user=user, group=group,
        standard_input="socket" if inetd else "inherit",
        standard_output="socket" if inetd else "journal",
    )
    unit = Unit(
        name=os.path.basename(command[0]) or command[0], sockets=specs, service=service, accept=accept,
        max_connections=max_connections, max_connections_per_source=max_connections_per_source,
        trigger_limit_interval=trigger_limit_interval, trigger_limit_burst=trigger_limit_burst,
        start_now=now, default_fd_name=None, ip_address_allow=list(ip_allow), ip_address_deny=list(ip_deny),
    )
    _engine_main([unit], verbose, log_format, forward, exit_with_service=exit_with_service, control=control)


def _engine_main(units, verbose, log_format, forward, exit_with_service=False, reloader=None, control=None) -> None:
    from .control import attach_control
    from .log import Log
    from .sockets import BindError
    from .processes import cloexec_all_above
    from .supervisor import Engine

    # Descriptors our parent leaked to us (not close-on-exec) must not reach the daemons;
    # the ones passed to us by socket activation are passed on explicitly, by position.
    cloexec_all_above(3)
    log = Log(verbose=verbose, fmt=log_format)
    engine = Engine(units, log, exit_with_service=exit_with_service, forward_signals=_forward_signals(forward),
                    reloader=reloader)
    with attach_control(engine, control):  # opened first: when it fails, nothing is bound
        try:
            engine.open()
        except BindError as exc:
            for line in exc.messages:
                log.error("bind", line)
            sys.exit(1)
        code = engine.run()
    sys.exit(code)


def _config_paths(paths: tuple[str, ...]) -> list[str]:
    if paths:
        return list(paths)
    env = os.environ.get("ACTIVATOR_CONFIG")
    if env:
        return [p for p in env.split(os.pathsep) if p]
    return ["/etc/activator"]


@main.command(short_help="Run the units of TOML files; SIGHUP reloads.")
@click.argument("paths", nargs=-1, type=click.Path(readable=False))
@click.option("--exit-with-service", is_flag=True,
              help="Stop everything and exit, with its status, as soon as any unit's daemon exits.")
@_forward_option
@_logging_options
@control_options
def serve(paths, exit_with_service, forward, verbose, log_format, control):
    """Run the units of PATH (TOML files, or directories of *.toml).

    Without PATH: $ACTIVATOR_CONFIG, else /etc/activator. SIGHUP reloads.
    """
    from .config import ConfigError, load_units
    from .protocol import ProtocolError, inherited_fds

    sources = _config_paths(paths)
    try:
        inherited = inherited_fds()  # read once: units take them with listen-inherited
    except ProtocolError as exc:
        _fail(f"invalid socket-activation environment from our parent: {exc.strerror}")
    try:
        units = load_units(sources, inherited=inherited)
    except ConfigError as exc:
        for line in exc.messages:
            click.echo(f"activator: error: {line}", err=True)
        sys.exit(1)
    if not units:
        _fail(f"no units found in {', '.join(sources)}")
    _engine_main(units, verbose, log_format, forward, exit_with_service=exit_with_service,
                 reloader=lambda: load_units(sources, inherited=inherited), control=control)


@main.command(short_help="Validate TOML unit files without binding anything.")
@click.argument("paths", nargs=-1, type=click.Path(readable=False))
def check(paths):
    """Validate unit files without binding anything: exit 0 when valid, 1 listing every error."""
    from .config import ConfigError, load_units

    sources = _config_paths(paths)
    try:
        units = load_units(sources)
    except ConfigError as exc:
        for line in exc.messages:
            click.echo(f"activator: error: {line}", err=True)
        sys.exit(1)
    for unit in units:
        listens = ", ".join(s.label for s in unit.sockets)
        click.echo(f"{unit.name}: {listens} -> {' '.join(unit.service.argv)}")
    click.echo(f"{len(units)} unit(s) OK")


main.add_command(ctl)
