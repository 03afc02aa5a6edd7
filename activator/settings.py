"""Every setting of a unit, declared once: its TOML key, where it sits, its parser and bounds, its doc.

From :data:`SETTINGS` come the TOML schema and validation of ``serve``/``check``
(activator.config), the options of ``run`` (activator.commands), what a reload must
do when a value changes (:func:`reload_attrs`, used by ``ListenSpec.identity()``)
and the reference page docs/settings.md (``python -m activator.settings --markdown``).
A setting's default is the default of the dataclass attribute it fills
(activator.units), so it is written once there.

``reload`` says what a changed value needs when ``serve`` reloads:

* ``socket-rebind``: a new socket (the address, the socket type, bind-ipv6-only, reuse-port);
* ``socket-live``: applied to the socket that is kept (backlog, free-bind, keep-alive, buffers, modes, owners, names);
* ``service``: the unit's daemon must be restarted for it to apply;
* ``unit``: limits and timeouts, applied in place from the next event on.

``systemd`` is the directive's (section, name) in systemd.socket(5), systemd.service(5),
systemd.exec(5), systemd.kill(5) and systemd.unit(5).
"""
from __future__ import annotations

import os
from . import signalapi as signal
from . import socketapi as socket
import sys

from . import values as v
from .records import MISSING, dataclass, fields
from .units import BindSpec, InheritedSpec, ServiceSpec, Unit

TYPE_CHECKING = False  # typing is not imported at run time (start-up, memory); type checkers see it
if TYPE_CHECKING:
    from typing import Any

RESTART_STYLES = ("stop-first", "graceful")
WORKERS_MAX = 1024
RESTART_POLICIES = ("no", "on-success", "on-failure", "on-abnormal", "on-abort", "always")
KILL_MODES = ("control-group", "mixed", "process", "none")
SERVICE_TYPES = ("simple", "exec", "notify")
NOTIFY_ACCESS = ("main", "exec", "all", "none")
STDIN_MODES = ("null", "socket", "inherit")
STDOUT_MODES = ("inherit", "null", "socket", "journal")
BIND_IPV6_ONLY = ("default", "both", "ipv6-only")
PARTS = ("unit", "socket", "service")
RELOAD_CLASSES = ("socket-rebind", "socket-live", "service", "unit")
LISTEN_TYPES = {
    "listen-stream": socket.SOCK_STREAM,
    "listen-datagram": socket.SOCK_DGRAM,
    "listen-sequential-packet": socket.SOCK_SEQPACKET,
}
_TARGETS: dict[str, tuple[type, ...]] = {"spec": (BindSpec, InheritedSpec), "unit": (Unit,), "service": (ServiceSpec,)}


@dataclass(frozen=True)
class Setting:
    key: str  # the TOML key: systemd's directive name in kebab-case
    part: str  # where it is written in a unit: "unit" (top level), "socket" or "service"
    target: str  # the object whose attribute it fills: "spec" (a socket), "unit" or "service"
    attr: str  # that attribute
    parse: v.Parser  # checks and converts the value (with its bounds); raises values.Invalid
    doc: str  # one line
    systemd: tuple[str, str] | None  # (section, directive); None: activator's own
    reload: str  # one of RELOAD_CLASSES
    flags: tuple[str, ...] = ()  # the options of `run`; none: `no_flag` says why
    no_flag: str = ""
    default_doc: str = ""  # the default in words, where the value alone would not say it
    run_default: Any = None  # the TOML value `run` uses when the option is absent (a callable: computed then)
    merge: bool = False  # several keys fill one attribute: their lists are joined, their tables merged

    @property
    def default(self) -> Any:
        """The attribute's value when the key is absent (the dataclass's default)."""
        for cls in _TARGETS[self.target]:
            for f in fields(cls):
                if f.name == self.attr:
                    factory: Any = f.default_factory
                    if factory is not MISSING:
                        return factory()
                    return None if f.default is MISSING else f.default
        raise AttributeError(f"no {self.target} attribute {self.attr!r}")

    @property
    def metavar(self) -> str:
        if isinstance(self.parse, v.Choice):
            return "[" + "|".join(self.parse.choices) + "]"
        return self.parse.placeholder()


def _umask_mode() -> str:
    """what the umask gives"""
    # `run` leaves a socket's mode to the umask, as systemd-socket-activate does: bind() creates
    # it 0777 & ~umask. Reading the umask means setting it; it is put back at once (one thread).
    mask = os.umask(0o022)
    os.umask(mask)
    return f"{0o777 & ~mask:04o}"


_RATE_INFINITY = ("activator pauses activation until the interval ends, so an endless interval would stop "
                  "the unit for good; write 0 to turn the limit off")


_UNIT_FILES = "units only"
# kind, where, what happens at stop
DIRECTORIES = (("runtime", "/run", ", removed when it stops"), ("state", "/var/lib", ""), ("cache", "/var/cache", ""),
               ("logs", "/var/log", ""), ("configuration", "/etc", ""))
# RLIMIT_ name, its number on Linux (Python's resource module lacks RLIMIT_LOCKS), the unit of its value, what
# it limits
LIMITS = (("CPU", 0, "seconds", "CPU time"), ("FSIZE", 1, "bytes", "file size"), ("DATA", 2, "bytes", "data segment"),
          ("STACK", 3, "bytes", "stack"), ("CORE", 4, "bytes", "core file size"), ("RSS", 5, "bytes", "resident set"),
          ("NPROC", 6, "count", "processes of the user"), ("NOFILE", 7, "count", "open files"),
          ("MEMLOCK", 8, "bytes", "locked memory"), ("AS", 9, "bytes", "address space"),
          ("LOCKS", 10, "count", "file locks"), ("SIGPENDING", 11, "count", "queued signals"),
          ("MSGQUEUE", 12, "bytes", "POSIX message queues"), ("NICE", 13, "nice", "the lowest nice level"),
          ("RTPRIO", 14, "count", "real-time priority"),
          ("RTTIME", 15, "usec", "real-time CPU time without a blocking call"))
PATH_CONDITIONS = (
    ("path-exists", "The path exists."), ("path-exists-glob", "The glob pattern matches a path."),
    ("path-is-directory", "The path is a directory."), ("path-is-symbolic-link", "The path is a symbolic link."),
    ("path-is-mount-point", "The path is a mount point."),
    ("path-is-read-write", "The path is on a file system mounted read-write."),
    ("path-is-encrypted", "The path is on an encrypted block device (dm-crypt)."),
    ("directory-not-empty", "The path is a directory with an entry."),
    ("file-not-empty", "The path is a regular file that is not empty."),
    ("file-is-executable", "The path is an executable regular file."),
)


def _camel(kebab: str) -> str:
    """path-is-read-write -> PathIsReadWrite: the directive's name."""
    return "".join(part.capitalize() for part in kebab.split("-"))


def _socket(key, attr, parse, doc, directive, reload, **kw) -> Setting:
    return Setting(key, "socket", "spec", attr, parse, doc, ("Socket", directive), reload, **kw)


def _unit_wide(key, attr, parse, doc, directive, **kw) -> Setting:
    """A setting of the whole unit written in the socket part (systemd has it in the .socket)."""
    return Setting(key, "socket", "unit", attr, parse, doc, ("Socket", directive), kw.pop("reload", "unit"), **kw)


def _service(key, attr, parse, doc, directive, reload, **kw) -> Setting:
    return Setting(key, "service", "service", attr, parse, doc, ("Service", directive), reload, **kw)


SETTINGS: tuple[Setting, ...] = (
    # ---------------------------------------------------------------- the unit itself
    Setting("description", "unit", "unit", "description", v.Text(empty=True), "What the unit is, for people.",
            ("Unit", "Description"), "unit", no_flag="run names its unit after the command", default_doc='""'),
    Setting("start-limit-interval-sec", "unit", "service", "start_limit_interval",
            v.Time(why=_RATE_INFINITY), "Daemon starts are counted over this interval (0: no limit); "
            "also accepted in the service part, as systemd does.", ("Unit", "StartLimitIntervalSec"), "unit",
            flags=("--start-limit-interval-sec", "--start-limit-interval")),
    Setting("start-limit-burst", "unit", "service", "start_limit_burst", v.Int(0), "Daemon starts allowed per "
            "interval before starting pauses (0: no limit); also accepted in the service part.",
            ("Unit", "StartLimitBurst"), "unit", flags=("--start-limit-burst",)),
    # ---------------------------------------------------------------- sockets
    _socket("listen-stream", "address", v.Addresses(), "Stream (TCP, unix) addresses to listen on.",
            "ListenStream", "socket-rebind", no_flag="--listen, stream unless -d or --seqpacket",
            default_doc="none"),
    _socket("listen-datagram", "address", v.Addresses(), "Datagram (UDP, unix) addresses to listen on.",
            "ListenDatagram", "socket-rebind", no_flag="--listen with -d", default_doc="none"),
    _socket("listen-sequential-packet", "address", v.Addresses(), "SOCK_SEQPACKET (unix, vsock) addresses to "
            "listen on.", "ListenSequentialPacket", "socket-rebind", no_flag="--listen with --seqpacket",
            default_doc="none"),
    Setting("listen-inherited", "socket", "spec", "inherited_fd", v.Inherited(), "Descriptors passed to activator "
            "itself (LISTEN_FDS), by LISTEN_FDNAMES name or fd number, instead of binding.",
            None, "socket-rebind", no_flag="run takes every inherited descriptor", default_doc="none"),
    _unit_wide("accept", "accept", v.Bool(), "One instance per connection (inetd style); not with datagram "
               "sockets.", "Accept", reload="service", flags=("-a", "--accept")),
    _socket("file-descriptor-name", "name", v.FdName(), "The socket's name in LISTEN_FDNAMES.",
            "FileDescriptorName", "socket-live", no_flag="--fdname: one name for all sockets, or one each",
            default_doc="the unit's name; `connection` with accept"),
    _socket("backlog", "backlog", v.Int(0, v.INT_MAX), "listen() backlog.", "Backlog", "socket-live",
            flags=("--backlog",), default_doc="SOMAXCONN (4096)"),
    _socket("bind-ipv6-only", "bind_ipv6_only", v.Choice(BIND_IPV6_ONLY), "IPv6 sockets: `default` (only a bare "
            "PORT is dual-stack), `both`, `ipv6-only`.", "BindIPv6Only", "socket-rebind", flags=("--bind-ipv6-only",)),
    _socket("reuse-port", "reuse_port", v.Bool(), "SO_REUSEPORT.", "ReusePort", "socket-rebind",
            flags=("--reuse-port",)),
    _socket("free-bind", "free_bind", v.Bool(), "IP_FREEBIND: bind to an address not (yet) configured.",
            "FreeBind", "socket-live", flags=("--free-bind",)),
    _socket("keep-alive", "keep_alive", v.Bool(), "SO_KEEPALIVE.", "KeepAlive", "socket-live",
            flags=("--keep-alive",)),
    _socket("no-delay", "no_delay", v.Bool(), "TCP_NODELAY.", "NoDelay", "socket-live", flags=("--no-delay",)),
    _socket("receive-buffer", "receive_buffer", v.Size(), "SO_RCVBUF.", "ReceiveBuffer", "socket-live",
            flags=("--receive-buffer",), default_doc="the kernel's"),
    _socket("send-buffer", "send_buffer", v.Size(), "SO_SNDBUF.", "SendBuffer", "socket-live",
            flags=("--send-buffer",), default_doc="the kernel's"),
    _socket("socket-mode", "socket_mode", v.Mode(), "Mode of a unix socket file (never wider while it is "
            "created).", "SocketMode", "socket-live", flags=("--socket-mode",),
            default_doc='"0666"; run: what the umask gives (0777 & ~umask), as systemd-socket-activate',
            run_default=_umask_mode),
    _socket("socket-user", "socket_user", v.Account("user"), "Owner of a unix socket file.", "SocketUser", "socket-live",
            flags=("--socket-user",), default_doc="activator's"),
    _socket("socket-group", "socket_group", v.Account("group"), "Group of a unix socket file.", "SocketGroup",
            "socket-live", flags=("--socket-group",), default_doc="activator's"),
    _socket("directory-mode", "directory_mode", v.Mode(), "Mode of the parent directories created for a unix "
            "socket.", "DirectoryMode", "socket-live", flags=("--directory-mode",)),
    _socket("remove-on-stop", "remove_on_stop", v.Bool(), "Remove the unix socket file when the unit stops.",
            "RemoveOnStop", "unit", no_flag="run always removes the socket files it created",
            default_doc="false; run: true", run_default=True),
    _unit_wide("max-connections", "max_connections", v.Int(1), "Accept mode: instances at most; more "
               "connections are closed at once.", "MaxConnections", flags=("--max-connections",)),
    _unit_wide("max-connections-per-source", "max_connections_per_source", v.Int(0), "Accept mode: instances at "
               "most per client IP address (0: no limit).", "MaxConnectionsPerSource",
               flags=("--max-connections-per-source",)),
    _unit_wide("trigger-limit-interval-sec", "trigger_limit_interval", v.Time(why=_RATE_INFINITY),
               "Activations are counted over this interval (0: no limit).", "TriggerLimitIntervalSec",
               flags=("--trigger-limit-interval-sec", "--trigger-limit-interval")),
    _unit_wide("trigger-limit-burst", "trigger_limit_burst", v.Int(0), "Activations per interval and socket "
               "before activation pauses (0: no limit).", "TriggerLimitBurst", flags=("--trigger-limit-burst",),
               default_doc="20; 0 (no limit) with accept"),
    _unit_wide("ip-address-allow", "ip_address_allow", v.Networks(), "Accept mode: peers let in (the allow list "
               "wins over the deny list).", "IPAddressAllow", flags=("--ip-address-allow",), default_doc="none"),
    _unit_wide("ip-address-deny", "ip_address_deny", v.Networks(), "Accept mode: peers closed before any "
               "process starts, unless allowed.", "IPAddressDeny", flags=("--ip-address-deny",), default_doc="none"),
    # ---------------------------------------------------------------- the service
    _service("exec-start", "argv", v.Exec(), "The command: an argv array, or a string split as a shell would "
             "(without running a shell), or a table: argv, path (the executable, argv[0] being its name), "
             "ignore-failure, expand-environment ($VAR and ${VAR} at start), privileged (not as user).",
             "ExecStart", "service", no_flag="COMMAND [ARGS...]", default_doc="required"),
    _service("environment", "environment", v.Environment(), "Variables for the daemon: a table, or an array of "
             "\"NAME=VALUE\".", "Environment", "service",
             no_flag="-E/--setenv NAME[=VALUE]", default_doc="none"),
    _service("environment-file", "environment", v.Paths(), "Files of NAME=VALUE lines (systemd's format) read at "
             "load; `-PATH`: optional; relative to the unit file; they override environment.", "EnvironmentFile",
             "service", flags=("--environment-file",), default_doc="none"),
    _service("working-directory", "working_directory", v.Path(), "The daemon's working directory: an absolute "
             "path or `~`; `-PATH`: ignored when missing.", "WorkingDirectory", "service",
             flags=("--working-directory",), default_doc="activator's"),
    _service("user", "user", v.Account("user"), "Run the daemon as this user (activator must be root).", "User", "service",
             flags=("--user",), default_doc="activator's"),
    _service("group", "group", v.Account("group"), "Run the daemon with this group.", "Group", "service",
             flags=("--group",), default_doc="activator's"),
    _service("supplementary-groups", "supplementary_groups", v.Groups(), "Supplementary groups of the daemon.",
             "SupplementaryGroups", "service", flags=("--supplementary-groups",), default_doc="none"),
    _service("umask", "umask", v.Mode(v.UMASK_MAX, "umask"), "The daemon's umask.", "UMask", "service",
             flags=("--umask",), default_doc="activator's"),
    _service("type", "type", v.Choice(SERVICE_TYPES), "`notify`: the daemon reports readiness with sd_notify "
             "(READY=1).", "Type", "service", flags=("--type",)),
    _service("restart", "restart", v.Choice(RESTART_POLICIES), "When to restart the daemon after it exits, without "
             "waiting for a connection (systemd's table).", "Restart", "unit", flags=("--restart",)),
    _service("restart-sec", "restart_sec", v.Time(why="a restart that never comes is restart = \"no\""),
             "Delay before such a restart.", "RestartSec", "unit", flags=("--restart-sec",)),
    _service("timeout-start-sec", "timeout_start", v.Time("accept", zero_is_infinity=True), "type = notify: how "
             "long the daemon has to send READY=1; proxy units: how long a connection waits for the backend to "
             "accept (0 or infinity: no limit).", "TimeoutStartSec", "unit", flags=("--timeout-start-sec",)),
    _service("timeout-stop-sec", "timeout_stop", v.Time("accept", zero_is_infinity=True), "How long a stopping "
             "daemon gets after its kill signal before SIGKILL (0 or infinity: never; systemd's default is 90s, 10s "
             "is a container engine's grace period).", "TimeoutStopSec",
             "unit", flags=("--timeout-stop-sec", "--timeout-stop")),
    _service("watchdog-sec", "watchdog_sec", v.Time("off"), "Restart a daemon that stops sending WATCHDOG=1 "
             "within this (0 or infinity: off).", "WatchdogSec", "service", flags=("--watchdog-sec",),
             default_doc="0 (off)"),
    _service("kill-signal", "kill_signal", v.Signal(), "The first signal of a stop.", "KillSignal", "unit",
             flags=("--kill-signal",)),
    _service("kill-mode", "kill_mode", v.Choice(KILL_MODES), "What a stop signals: the daemon's whole tree "
             "(control-group), the main process then SIGKILL to the rest (mixed), the main process only, or "
             "nothing.", "KillMode", "unit", flags=("--kill-mode",)),
    _service("standard-input", "standard_input", v.Choice(STDIN_MODES), "`socket`: the connection on stdin and "
             "stdout (inetd style, needs accept).", "StandardInput", "service", no_flag="--inetd",
             default_doc="`null`; run: `inherit`", run_default="inherit"),
    _service("standard-output", "standard_output", v.Choice(STDOUT_MODES), "Where the daemon's stdout goes.",
             "StandardOutput", "service", no_flag="activator's stdout, or the connection with --inetd",
             default_doc="`socket` with standard-input = socket, else `journal` (activator's stdout)"),
    _service("file-descriptor-store-max", "file_descriptor_store_max", v.Int(0), "Descriptors the daemon may keep "
             "in activator with FDSTORE=1.", "FileDescriptorStoreMax", "service",
             flags=("--file-descriptor-store-max",)),
    # ---------------------------------------------------------------- restarts and workers (docs/restarts.md)
    Setting("restart-style", "service", "service", "restart_style", v.Choice(RESTART_STYLES), "How `ctl restart` "
            "and a reload that changes the unit restart its daemon: stop it first, or `graceful`: start the new one "
            "on the same sockets beside it and stop the old one once the new one is ready (accept = false).", None,
            "unit", flags=("--restart-style",)),
    Setting("graceful-ready-sec", "service", "service", "graceful_ready_sec",
            v.Time(why="a new daemon that never counts as ready would never replace the old one"),
            "Graceful restarts of type simple and exec: how long the new daemon must run to count as ready "
            "(type notify: READY=1, within timeout-start-sec).", None, "unit", flags=("--graceful-ready-sec",)),
    Setting("workers", "service", "service", "workers", v.Int(1, WORKERS_MAX), "Instances of the daemon that "
            "share the sockets (accept = false), each with its own LISTEN_PID and ACTIVATOR_WORKER; a reload that "
            "changes only this scales the unit.", None, "unit", flags=("--workers",)),
    # ---------------------------------------------------------------- proxy units (docs/proxy.md)
    Setting("proxy-to", "service", "service", "proxy_to", v.Backend(), "A daemon that binds its own port: "
            "activator accepts the connections (accept = false), starts the daemon on the first one and "
            "relays each connection to this address (systemd-socket-proxyd's argument).", None, "service",
            flags=("--proxy-to",), default_doc="none (the daemon gets the sockets)"),
    Setting("exit-idle-sec", "service", "service", "exit_idle_sec", v.Time("accept"), "Proxy units: stop the "
            "daemon once it has had no connection for this long; the next connection starts it again "
            "(systemd-socket-proxyd's --exit-idle-time).", None, "unit",
            flags=("--exit-idle-sec", "--exit-idle-time"), default_doc="infinity (never)"),
    # ---------------------------------------------------------------- watch mode (docs/watch.md)
    Setting("watch-paths", "service", "service", "watch_paths", v.Paths(), "Restart the daemon when a file under "
            "these paths changes (inotify; a directory with every directory under it); relative to the unit file; "
            "`-PATH`: optional.", None, "service", flags=("--watch",), default_doc="none"),
    Setting("watch-ignore", "service", "service", "watch_ignore", v.Patterns(), "Changes that do not count, besides "
            "the built-in *.pyc, __pycache__/, .git/ and editors' swap and backup files: `NAME`, `DIR/`, or a "
            "path under the watched one.", None, "service", flags=("--watch-ignore",), default_doc="none"),
    Setting("watch-debounce-sec", "service", "service", "watch_debounce_sec",
            v.Time(why="a change would never restart the daemon: leave watch-paths out"), "How long the watched "
            "files must be quiet after a change before the restart (at most ten times this after the first).",
            None, "service", flags=("--watch-debounce-sec",)),
    # ---------------------------------------------------------------- around the main command (unit files)
    *(_service(key, key.replace("-", "_"), parse, doc, _camel(key), reload, no_flag=_UNIT_FILES, default_doc="none")
      for key, parse, reload, doc in (
          ("exec-condition", v.Commands(), "service", "Commands run before each start: an exit status of 1 to 254 "
           "skips the start quietly (the unit keeps listening), 255 or a signal fails it."),
          ("exec-start-pre", v.Commands(), "service", "Commands run one after the other before each start; one "
           "that fails (unless ignore-failure) fails the start."),
          ("exec-start-post", v.Commands(), "service", "Commands run once the daemon is up (started; READY=1 for "
           "type = notify); one that fails stops it."),
          ("exec-reload", v.Commands(), "service", "Commands that make the running daemon reload (with $MAINPID), "
           "run by a reload of `serve --reload-daemons` that leaves the unit unchanged."),
          ("success-exit-status", v.ExitStatuses(), "unit", "Exit codes and signals of the main process that count "
           "as success, besides 0, SIGHUP, SIGINT, SIGTERM and SIGPIPE."),
          ("restart-prevent-exit-status", v.ExitStatuses(), "unit", "Exit codes and signals after which restart "
           "never restarts the daemon."),
          ("restart-force-exit-status", v.ExitStatuses(), "unit", "Exit codes and signals after which the daemon "
           "is restarted whatever restart says."))),
    _service("notify-access", "notify_access", v.Choice(NOTIFY_ACCESS), "Whose sd_notify messages count: the main "
             "process only, also the exec-* commands (exec), every process of the unit (all), or none.",
             "NotifyAccess", "service", no_flag=_UNIT_FILES,
             default_doc="the main process and its descendants (systemd: main)"),
    *(setting for kind, base, removed in DIRECTORIES for setting in (
        _service(f"{kind}-directory", f"{kind}_directory", v.Directories(), f"Directories created under {base} "
                 f"before each start, owned by user and group{removed}; the daemon gets their paths in "
                 f"${kind.upper()}_DIRECTORY.", f"{kind.capitalize()}Directory", "service", no_flag=_UNIT_FILES,
                 default_doc="none"),
        _service(f"{kind}-directory-mode", f"{kind}_directory_mode", v.Mode(), f"Mode of the {kind}-directory "
                 "directories.", f"{kind.capitalize()}DirectoryMode", "service", no_flag=_UNIT_FILES))),
    _service("runtime-directory-preserve", "runtime_directory_preserve", v.Preserve(), "Keep the runtime "
             "directories when the daemon stops (true), or only across restarts by restart (`restart`).",
             "RuntimeDirectoryPreserve", "service", no_flag=_UNIT_FILES, default_doc="false"),
    _service("oom-score-adjust", "oom_score_adjust", v.Int(-1000, 1000), "The daemon's /proc/PID/oom_score_adj "
             "(written by activator right after the start).", "OOMScoreAdjust", "service", no_flag=_UNIT_FILES,
             default_doc="activator's"),
    _service("nice", "nice", v.Int(-20, 19), "The daemon's nice level (set by activator right after the start).",
             "Nice", "service", no_flag=_UNIT_FILES, default_doc="activator's"),
    *(Setting(f"limit-{name.lower()}", "service", "service", "limits", v.Limit(number, unit),
              f"RLIMIT_{name} of the daemon: {what}.", ("Service", f"Limit{name}"), "service", no_flag=_UNIT_FILES,
              default_doc="activator's", merge=True)
      for name, number, unit, what in LIMITS),
    # ---------------------------------------------------------------- conditions and dependencies (unit files)
    *(Setting(f"{what}-{kind}", "unit", "unit", "conditions", v.Conditions(kind, what == "assert"),
              f"{doc} Checked when the unit starts: else it is "
              f"{'not started (an error is logged).' if what == 'assert' else 'skipped (logged, not failed).'}",
              ("Unit", f"{what.capitalize()}{_camel(kind)}"), "unit", no_flag=_UNIT_FILES, default_doc="none",
              merge=True)
      for what in ("condition", "assert") for kind, doc in PATH_CONDITIONS),
    *(Setting(key, "unit", "unit", key, v.UnitNames(), doc, ("Unit", key.capitalize()), "unit", no_flag=_UNIT_FILES,
              default_doc="none")
      for key, doc in (
          ("requires", "Units started with this one's daemon; one it is also after that does not come up stops "
           "it from starting."),
          ("wants", "Units started with this one's daemon, whether they come up or not."),
          ("after", "Of the units started with this one, those its daemon waits for (their daemon up)."),
          ("before", "Of the units started with this one, those that wait for this one's daemon."))),
)

BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}


def get(key: str) -> Setting:
    return BY_KEY[key]


def keys_in(part: str) -> tuple[str, ...]:
    """The keys that may be written in one part of a unit (unit-level service settings also in "service")."""
    return tuple(s.key for s in SETTINGS if s.part == part or (part == "service" and s.part == "unit"
                                                               and s.target == "service"))


def reload_attrs(reload: str) -> tuple[str, ...]:
    """The socket attributes of one reload class (for ListenSpec.identity())."""
    return tuple(dict.fromkeys(s.attr for s in SETTINGS if s.target == "spec" and s.reload == reload
                               and s.attr not in ("address", "inherited_fd")))


# ---------------------------------------------------------------- the reference page
def format_default(s: Setting) -> str:
    if s.default_doc:
        return s.default_doc
    value = s.default
    if isinstance(value, bool):
        return str(value).lower()
    if s.parse.kind == "time":
        return format_timespan(value)
    if s.parse.kind == "mode":
        return f'"{value:04o}"'
    if s.parse.kind == "signal":
        return signal.name(value)
    if isinstance(value, str):
        return f"`{value}`"
    return str(value)


def format_timespan(seconds: float) -> str:
    if v.is_infinite(seconds):
        return "infinity"
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s" if seconds else "0"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown() -> str:
    lines = [
        "# Unit settings",
        "",
        "Generated from `activator/settings.py` by `python -m activator.settings --markdown`; "
        "`tests/test_settings.py` fails when this page is out of date. Do not edit it by hand.",
        "",
        "Keys are systemd's directive names in kebab-case, with systemd's meaning. `run` takes the options "
        "named in the `run` column, with the same parsing and bounds as TOML.",
        "",
        f"Time spans: a number of seconds or a systemd time span (`100ms`, `2s`, `1min 30s`), at most "
        f"{v.TIME_MAX_TEXT}: the longest wait of one `epoll_wait()` is 2^31-1 ms (24.8 days), so every timer "
        "activator arms fits one wait. `infinity` only where the table says so. Modes: an octal string "
        '(`"0660"`) or a TOML integer (`0o660`), one range for both. Strings never hold NUL.',
        "",
        "Reload: `socket-rebind` needs a new socket; `socket-live` is applied to the socket that is kept; "
        "`service` restarts the unit's daemon; `unit` applies in place.",
    ]
    for part, title in (("unit", "Unit (top level)"), ("socket", "Socket part"), ("service", "Service part")):
        lines += ["", f"## {title}", "", "| key | run | systemd | value | default | reload | meaning |",
                  "|---|---|---|---|---|---|---|"]
        for s in SETTINGS:
            if s.part != part:
                continue
            flags = ", ".join(f"`{f}`" for f in s.flags) if s.flags else f"— ({s.no_flag})"
            directive = f"[{s.systemd[0]}] {s.systemd[1]}=" if s.systemd else "—"
            lines.append(f"| `{s.key}` | {_cell(flags)} | {directive} | {_cell(s.parse.describe())} | "
                         f"{_cell(format_default(s))} | {s.reload} | {_cell(s.doc)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if argv != ["--markdown"]:
        sys.stderr.write("usage: python -m activator.settings --markdown\n")
        return 2
    sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
