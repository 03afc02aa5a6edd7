"""`run` and `serve` without click: their options, declared once, what each command does with them, and a
parser for plain command lines.

The options of both commands are the settings of activator.settings that have flags plus the table
below (:data:`RUN_OPTIONS`, :data:`SERVE_OPTIONS`). activator.cli turns them into click options, and
:func:`parse` reads a plain command line of ``run`` or ``serve`` with them into the very parameters click
would hand the command (``tests/test_fastcli.py`` walks a corpus of command lines through both). click
costs about as much as the rest of activator's start-up, so ``activator run`` and ``activator serve`` parse
their command line here when it is plain (long and short options, ``--opt=value``, ``-lVALUE``, flags,
``--``, positionals) and every value checks out; anything else (``--help``, an unknown or abbreviated
option, combined short flags, a value or usage error) goes to click, which stays the authority for help
texts and error messages: it parses the command line again from the start.
"""
from __future__ import annotations

import gc
import os
from . import signalapi as signal
import sys

from .settings import BY_KEY, SETTINGS, Setting, format_default, get
from .values import Bool, Invalid

TYPE_CHECKING = False  # typing is not imported at run time (start-up, memory); type checkers see it
if TYPE_CHECKING:
    from typing import Any, Callable, NoReturn

if TYPE_CHECKING:
    from .control import ControlSettings
    from .units import Unit


class Usage(Exception):
    """A usage error (exit 2): click's BadParameter when ``hint`` names the option, else its UsageError."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def fail(message: str, code: int = 1) -> NoReturn:
    sys.stderr.write(f"activator: error: {message}\n")
    sys.exit(code)


_FLAG_OFF: Any = object()  # the default of a flag not given: False (None for a boolean setting's: not given)


class Option:
    """One option of run or serve: click's declaration in data. ``check`` (not called for absent options:
    None, or () when ``multiple``) returns the value the command gets, or raises values.Invalid (exit 2)."""

    __slots__ = ("decls", "dest", "flag", "multiple", "metavar", "help", "choices", "default", "check")

    def __init__(self, decls: tuple[str, ...], dest: str, help: str, *, flag: bool = False, multiple: bool = False,
                 metavar: str | None = None, choices: tuple[str, ...] | None = None, default: Any = _FLAG_OFF,
                 check: Callable[[Any], Any] | None = None) -> None:
        self.decls, self.dest, self.help, self.flag, self.multiple = decls, dest, help, flag, multiple
        self.metavar, self.choices, self.check = metavar, choices, check
        self.default = (False if flag else None) if default is _FLAG_OFF else default

    @property
    def absent(self) -> Any:
        """The value of an option not given."""
        return () if self.multiple else self.default


# ------------------------------------------------------------------ the settings' options (the registry)
# socket options first, then the unit's, then the service's.
RUN_SETTINGS = tuple(sorted((s for s in SETTINGS if s.flags), key=lambda s: ("socket", "unit", "service").index(s.part)))
# Keys that `run` sets from its own options, for naming the option in an error.
_RUN_ONLY_FLAGS = {"listen-stream": "--listen", "listen-datagram": "--listen", "listen-sequential-packet": "--listen",
                   "file-descriptor-name": "--fdname", "environment": "--setenv", "exec-start": "COMMAND",
                   "standard-input": "--inetd"}


def dest(setting: Setting) -> str:
    return setting.key.replace("-", "_")


def _checked(setting: Setting, raw: Any) -> Any:
    """``raw`` (what TOML would hold) after the setting's own parser accepted it (else values.Invalid)."""
    setting.parse(raw)
    return raw


def _setting_check(setting: Setting) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value is None or value == ():
            return None  # not given: the TOML default (or the setting's run_default) applies
        if setting.parse.multiple:
            return _checked(setting, [setting.parse.from_text(item) for item in value])
        return _checked(setting, setting.parse.from_text(value))
    return check


def _run_default_text(setting: Setting) -> str:
    if callable(setting.run_default):
        return setting.run_default.__doc__ or ""
    if setting.run_default is not None:
        return str(setting.run_default)
    return format_default(setting)


def _setting_option(setting: Setting) -> Option:
    doc = setting.doc.replace("`", "")  # the docs page's markup
    if isinstance(setting.parse, Bool):  # every boolean setting is off by default: a flag turns it on
        return Option(setting.flags, dest(setting), doc, flag=True, default=None)
    repeat = " (repeatable)" if setting.parse.multiple else ""
    return Option(setting.flags, dest(setting), f"{doc}{repeat} [default: {_run_default_text(setting).replace('`', '')}]",
                  multiple=setting.parse.multiple, metavar=setting.metavar, check=_setting_check(setting))


# ------------------------------------------------------------------ run's own options
def _check_listen(value: tuple[str, ...]) -> tuple[str, ...]:
    _checked(get("listen-stream"), list(value))
    return value


def _check_setenv(value: tuple[str, ...]) -> list[str]:
    # As systemd-socket-activate: NAME alone passes our value through, "" when we have none.
    items = [item if "=" in item else f"{item}={os.environ.get(item, '')}" for item in value]
    return _checked(get("environment"), items)


def _check_fdnames(value: tuple[str, ...]) -> list[str]:
    names = [name for entry in value for name in entry.split(":")]
    for name in names:
        _checked(get("file-descriptor-name"), name)
    return names


FORWARD = Option(("--forward-signal",), "forward", "Signal forwarded to the daemons (repeatable; default SIGUSR1, "
                 "SIGUSR2, SIGWINCH).", multiple=True, metavar="SIGNAL")
LOG_FORMAT = Option(("--log-format",), "log_format", "Log lines as text or as one JSON object per line.",
                    choices=("text", "json"), default="text")
VERBOSE = Option(("-v", "--verbose"), "verbose", "Log every event, including each connection.", flag=True)
CONTROL = (
    Option(("--control-socket",), "control_socket", "Control socket for `activator ctl` [default: DIR/PID.sock, DIR "
           "being /run/activator for root, else $XDG_RUNTIME_DIR/activator or /tmp/activator-UID].", metavar="PATH"),
    Option(("--no-control-socket",), "no_control_socket", "No control socket.", flag=True),
    Option(("--metrics-listen",), "metrics_listen", "Serve Prometheus metrics at http://ADDR/metrics (needs "
           "prometheus_client).", metavar="ADDR"),
)
STRICT = Option(("--strict",), "strict", "Directives of unit files that activator cannot honour are errors, not "
                "warnings.", flag=True)
# In the order of the help texts.
RUN_OPTIONS: tuple[Option, ...] = (
    Option(("-l", "--listen"), "listen", "Listen on ADDR: PORT, IPv4:PORT, [IPv6]:PORT, /path, @abstract, "
           "vsock:CID:PORT (repeatable).", multiple=True, metavar="ADDR", check=_check_listen),
    Option(("-d", "--datagram"), "datagram", "Datagram sockets instead of stream sockets.", flag=True),
    Option(("--seqpacket",), "seqpacket", "SOCK_SEQPACKET sockets instead of stream sockets.", flag=True),
    Option(("--inetd",), "inetd", "Pass each connection on stdin and stdout instead of fd 3, without LISTEN_* "
           "(implies -a).", flag=True),
    Option(("-E", "--setenv"), "setenv", "Set a variable for the daemon; without =VALUE take it from our "
           "environment.", multiple=True, metavar="NAME[=VALUE]", check=_check_setenv),
    Option(("--fdname",), "fdnames", "Names for LISTEN_FDNAMES: one for all sockets, or one per socket.",
           multiple=True, metavar="NAME[:NAME...]", check=_check_fdnames),
    Option(("--now",), "now", "Start the daemon at once instead of at the first connection.", flag=True),
    Option(("--exit-with-service",), "exit_with_service", "Exit when the daemon exits, with its status.", flag=True),
    *(_setting_option(s) for s in RUN_SETTINGS),
    FORWARD, LOG_FORMAT, VERBOSE, *CONTROL,
)
SERVE_OPTIONS: tuple[Option, ...] = (
    Option(("--exit-with-service",), "exit_with_service", "Stop everything and exit, with its status, as soon as any "
           "unit's daemon exits.", flag=True),
    Option(("--reload-daemons",), "reload_daemons", "At each reload (SIGHUP), also run exec-reload of the units left "
           "unchanged whose daemon runs.", flag=True),
    STRICT, FORWARD, LOG_FORMAT, VERBOSE, *CONTROL,
)
# The positional parameters: (name, required, options end at the first one).
POSITIONALS = {"run": ("command", True, True), "serve": ("paths", False, False)}
OPTIONS = {"run": RUN_OPTIONS, "serve": SERVE_OPTIONS}


# ------------------------------------------------------------------ the fast parser
def parse(command: str, args: list[str]) -> dict[str, Any] | None:
    """The parameters click would give ``command`` for ``args`` (its own arguments), checked; None when the
    command line is not plain or a value does not check out: click must parse it."""
    options = OPTIONS[command]
    by_flag = {decl: o for o in options for decl in o.decls}
    given: dict[str, list[Any]] = {}
    name, required, stop_at_positional = POSITIONALS[command]
    positionals: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            positionals += args[i:]
            break
        if arg[:1] != "-" or arg == "-":
            positionals.append(arg)
            if stop_at_positional:
                positionals += args[i:]
                break
            continue
        if arg[:2] == "--":
            flag, eq, attached = arg.partition("=")
        else:
            flag, attached = arg[:2], arg[2:]
            eq = "=" if attached else ""
        option = by_flag.get(flag)
        if option is None:
            return None  # --help, an unknown option, a negative number: click says what it is
        if option.flag:
            if eq:
                return None  # --flag=x, or short flags combined: click's
            value: Any = True
        elif eq:
            value = attached
        elif i < len(args):
            value = args[i]
            i += 1
        else:
            return None  # no value
        if option.choices is not None and value not in option.choices:
            return None
        given.setdefault(option.dest, []).append(value)
    if required and not positionals:
        return None
    params: dict[str, Any] = {}
    for option in options:
        values = given.get(option.dest)
        value = tuple(values) if option.multiple and values else values[-1] if values else option.absent
        if option.check is not None:  # as click's callbacks: given or not
            try:
                value = option.check(value)
            except Invalid:
                return None
        params[option.dest] = value
    params[name] = tuple(positionals)
    return params


# ------------------------------------------------------------------ what the commands do
class Launch:
    """What a command hands the engine (:func:`engine_main`)."""

    def __init__(self, units: list, verbose: bool, log_format: str, forward: tuple[int, ...],
                 control: "ControlSettings", exit_with_service: bool = False,
                 reloader: Callable[[], Any] | None = None, warnings: tuple[str, ...] | list[str] = (),
                 reload_daemons: bool = False) -> None:
        self.units, self.verbose, self.log_format, self.forward = units, verbose, log_format, forward
        self.control, self.exit_with_service, self.reloader = control, exit_with_service, reloader
        self.warnings, self.reload_daemons = warnings, reload_daemons


def forward_signals(values: tuple[str, ...]) -> tuple[int, ...]:
    from .processes import parse_signal
    from .supervisor import DEFAULT_FORWARD

    if not values:
        return DEFAULT_FORWARD
    result = []
    for v in values:
        for part in v.split(","):
            try:
                sig = parse_signal(part)
            except ValueError as exc:
                raise Usage(str(exc), "--forward-signal") from None
            if sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD):
                raise Usage(f"{signal.name(sig)} cannot be forwarded", "--forward-signal")
            result.append(sig)
    return tuple(result)


def control_settings(params: dict[str, Any]) -> "ControlSettings":
    """--control-socket PATH, --no-control-socket and --metrics-listen ADDR, as one ControlSettings."""
    from .control import ControlSettings

    control_socket, no_control_socket = params["control_socket"], params["no_control_socket"]
    metrics_listen = params["metrics_listen"]
    if control_socket and no_control_socket:
        raise Usage("--control-socket and --no-control-socket are mutually exclusive")
    if metrics_listen:
        from .addresses import AddressError, parse_address

        try:
            parse_address(metrics_listen)
        except AddressError as exc:
            raise Usage(str(exc), "'--metrics-listen'") from None
    return ControlSettings(os.path.abspath(control_socket) if control_socket else None, not no_control_socket,
                           metrics_listen)


_inherited: list[tuple[int, str]] | None = None


def inherited_fds() -> list[tuple[int, str]]:
    """The descriptors our parent passed us (read once: reading unsets LISTEN_*, and click may come second);
    a one-line error when its LISTEN_* are wrong."""
    global _inherited
    from .protocol import ProtocolError, inherited_fds as read
    from .reexec import RESUMED

    if _inherited is None and RESUMED is not None:  # a re-exec: what our parent passed the first activator
        _inherited = [(int(fd), str(name)) for fd, name in RESUMED["inherited"]]
    if _inherited is None:
        try:
            _inherited = read()
        except ProtocolError as exc:
            fail(f"invalid socket-activation environment from our parent: {exc.strerror}")
        except OSError as exc:  # EBADF: LISTEN_FDS counts descriptors that are not open (a stale environment)
            fail(f"invalid socket-activation environment from our parent: LISTEN_FDS names a descriptor that is "
                 f"not open ({exc.strerror})")
    return _inherited


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
    raise Usage(f"{len(names)} names for {total} sockets: give one name for all, or one per socket", "'--fdname'")


def _run_unit_name(argv0: str) -> str:
    """The unit's name in the log: the command's base name, with what a unit name may not hold replaced."""
    name = "".join(c if c.isascii() and (c.isalnum() or c in "_.@-") else "_" for c in os.path.basename(argv0))
    return name[:255] or "run"


def _run_document(values: dict[str, Any], listen_key: str, listen: tuple[str, ...], names: list[str | None],
                  inherited: list[tuple[int, str]], command: tuple[str, ...], env: list[str], inetd: bool) -> dict:
    """The TOML table of the unit `run` starts, as a user would write it."""
    # None: not given (flags too default to None). Not `if value`: 0 is a value (--start-limit-burst 0).
    given = {s.key: values[dest(s)] for s in RUN_SETTINGS if values[dest(s)] is not None}
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
            fail("; ".join(p.message for p in exc.problems))
        raise Usage("; ".join(f"{o}: {p.message}" for o, p in zip(options, exc.problems))) from None
    return unit


def run(params: dict[str, Any]) -> Launch:
    """`run`: one unit from the command line."""
    control = control_settings(params)
    values = params
    inetd, command = params["inetd"], params["command"]
    accept = bool(values["accept"]) or inetd
    if params["datagram"] and params["seqpacket"]:
        raise Usage("--datagram and --seqpacket are mutually exclusive")
    if params["now"] and accept:
        raise Usage("--now cannot be used with --accept")
    if params["exit_with_service"] and accept:
        raise Usage("--exit-with-service cannot be used with --accept")
    inherited = inherited_fds()
    listen = params["listen"]
    if not inherited and not listen:
        raise Usage("no sockets: give at least one --listen ADDR (or be socket-activated yourself)")
    names = _socket_names(params["fdnames"], len(inherited), len(listen))
    listen_key = ("listen-datagram" if params["datagram"] else "listen-sequential-packet" if params["seqpacket"]
                  else "listen-stream")
    table = _run_document(values, listen_key, listen, names, inherited, command, params["setenv"], inetd)
    unit = _run_unit(_run_unit_name(command[0]), table, inherited)
    unit.start_now = params["now"]
    unit.default_fd_name = None  # as systemd-socket-activate: no LISTEN_FDNAMES unless a socket is named
    return Launch([unit], params["verbose"], params["log_format"], forward_signals(params["forward"]), control,
                  exit_with_service=params["exit_with_service"])


def config_paths(paths: tuple[str, ...]) -> list[str]:
    if paths:
        return list(paths)
    env = os.environ.get("ACTIVATOR_CONFIG")
    if env:
        return [p for p in env.split(os.pathsep) if p]
    return ["/etc/activator"]


def print_errors(messages: list[str]) -> NoReturn:
    for line in messages:
        sys.stderr.write(f"activator: error: {line}\n")
    sys.exit(1)


def serve(params: dict[str, Any]) -> Launch:
    """`serve`: the units of unit files."""
    from .config import ConfigError, load_configuration

    control = control_settings(params)
    sources = config_paths(params["paths"])
    strict = params["strict"]
    inherited = inherited_fds()  # read once: units take them with listen-inherited
    try:
        configuration = load_configuration(sources, inherited=inherited, strict=strict)
    except ConfigError as exc:
        print_errors(exc.messages)
    if not configuration.units:
        fail(f"no units found in {', '.join(sources)}")
    forward = forward_signals(params["forward"])
    return Launch(configuration.units, params["verbose"], params["log_format"], forward, control,
                  exit_with_service=params["exit_with_service"],
                  reloader=lambda: load_configuration(sources, inherited=inherited, strict=strict),
                  warnings=configuration.warnings, reload_daemons=params["reload_daemons"])


BUILD = {"run": run, "serve": serve}


def engine_main(launch: Launch) -> NoReturn:
    """Run the engine. ``launch.reloader`` (serve) returns a Configuration: its warnings are logged at each
    reload, as ``launch.warnings`` are at start (event ``unit-file``). After a re-exec (activator.reexec) the
    engine resumes the carried state instead of binding."""
    from . import reexec
    from .control import attach_control
    from .log import Log
    from .processes import cloexec_all_above, release_memory
    from .sockets import BindError
    from .supervisor import Engine

    if reexec.RESUMED is not None:
        problem = reexec.check_units(reexec.RESUMED, launch.units)
        if problem is not None:
            fail(f"cannot resume: {problem}")
        if reexec.CHECK_ONLY:
            sys.stdout.write(reexec.CHECK_OK + "\n")
            sys.stdout.flush()
            sys.exit(0)

    # Descriptors our parent leaked to us (not close-on-exec) must not reach the daemons;
    # the ones passed to us by socket activation are passed on explicitly, by position.
    cloexec_all_above(3)
    log = Log(verbose=launch.verbose, fmt=launch.log_format)
    for line in launch.warnings:
        log.warning("unit-file", line)
    reloader = launch.reloader

    def reload_units() -> list:
        assert reloader is not None
        # What the start-up froze (below) includes the units and states a reload replaces: back under
        # the collector, or those in reference cycles would never be freed.
        gc.unfreeze()
        configuration = reloader()
        for line in configuration.warnings:
            log.warning("unit-file", line)
        return configuration.units

    engine = Engine(launch.units, log, exit_with_service=launch.exit_with_service, forward_signals=launch.forward,
                    reloader=reload_units if reloader else None, reload_daemons=launch.reload_daemons)
    with attach_control(engine, launch.control) as servers:  # opened first: when it fails, nothing is bound
        engine.reexec = reexec.Reexec(engine, servers, inherited_fds())
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
        # The start-up allocated much and freed little: the cyclic collector, off since main(), would only
        # have rescanned it (a fifth of the start-up of 1,000 units). The sockets listen now: collected once,
        # then frozen out of every later collection (which then scans only what serving allocates); what
        # the start-up freed goes back to the system (-0.4 MiB idle).
        gc.collect()
        release_memory()
        gc.freeze()
        gc.enable()
        code = engine.run()
    sys.exit(code)


def main(args: list[str]) -> None:
    """``activator run|serve ...`` without click when the command line is plain; returns when click must
    parse it (nothing has been done then but reading LISTEN_*, which click's path reads from here)."""
    if "_ACTIVATOR_COMPLETE" in os.environ:
        return  # click's shell completion
    gc.disable()  # until the sockets listen (engine_main); click's path, if it comes to that, runs with it off too
    try:
        params = parse(args[0], args[1:])
        if params is None:
            return
        try:
            launch = BUILD[args[0]](params)
        except Usage:
            return  # click says it, in its words
        engine_main(launch)
    except (EOFError, KeyboardInterrupt):  # as click's standalone mode
        sys.stderr.write("\nAborted!\n")
        sys.exit(1)
    except BrokenPipeError:  # as click's: a closed stdout or stderr ends us without a traceback
        sys.exit(1)
