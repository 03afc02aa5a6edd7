"""Plain definitions of units: what to listen on and what to start.

A unit pairs one or more listening sockets with one service, like a systemd
``.socket`` plus its ``.service``. ``activator run`` builds one unit from its
command line; ``activator serve`` builds units from TOML files. The engine
(:mod:`activator.supervisor`) only ever sees these dataclasses. Their defaults are
the defaults of the settings that fill them (activator.settings reads them here).
"""
from __future__ import annotations

import os
from . import signalapi as signal
from . import socketapi as socket

from .records import dataclass, field
from .addresses import Address


class ListenSpec:
    """One listening socket. Three kinds: :class:`BindSpec` (an address to bind), :class:`InheritedSpec`
    (a descriptor passed to activator) and :class:`UnresolvedInherited` (``check``: not looked up).

    Every kind answers ``address``, ``inherited_fd`` and ``remove_on_stop`` (None or False where
    they do not apply), so that code holding any spec reads them without asking which kind it is.
    """

    type: int
    name: str | None
    address: Address | None
    inherited_fd: int | None
    remove_on_stop: bool

    @property
    def label(self) -> str:
        raise NotImplementedError

    def _where(self) -> object:
        raise NotImplementedError

    def identity(self) -> tuple:
        """What must be equal for a reload to keep this very socket: where it is and its socket-rebind settings."""
        from .settings import reload_attrs

        return (self._where(), self.type, *(getattr(self, a, None) for a in reload_attrs("socket-rebind")))

    def live_options(self) -> dict[str, object]:
        """The socket-live settings: what a reload applies to the socket it keeps."""
        from .settings import reload_attrs

        return {a: getattr(self, a, None) for a in reload_attrs("socket-live")}


@dataclass
class BindSpec(ListenSpec):
    """An address activator binds and listens on."""

    address: Address
    type: int = socket.SOCK_STREAM
    name: str | None = None
    backlog: int = socket.SOMAXCONN
    bind_ipv6_only: str = "default"  # default | both | ipv6-only
    reuse_port: bool = False
    free_bind: bool = False
    keep_alive: bool = False
    no_delay: bool = False
    receive_buffer: int | None = None
    send_buffer: int | None = None
    socket_mode: int | None = 0o666  # None: as bind() creates it under the current umask
    socket_user: str | None = None
    socket_group: str | None = None
    directory_mode: int = 0o755
    remove_on_stop: bool = False
    inherited_fd = None  # not a field: a socket we bind was not inherited

    @property
    def label(self) -> str:
        return str(self.address)

    def _where(self) -> object:
        return self.address.text


@dataclass
class InheritedSpec(ListenSpec):
    """A descriptor our parent passed us (LISTEN_FDS), passed on as it is."""

    inherited_fd: int
    type: int = socket.SOCK_STREAM
    name: str | None = None
    address = None  # (not fields)
    remove_on_stop = False  # not ours: it stays

    @property
    def label(self) -> str:
        return f"inherited fd {self.inherited_fd}" + (f" ({self.name})" if self.name else "")

    def _where(self) -> object:
        return self.inherited_fd


@dataclass
class UnresolvedInherited(ListenSpec):
    """``activator check``: a listen-inherited selector (a name or an fd number); only ``serve`` has descriptors."""

    selector: str
    type: int = socket.SOCK_STREAM
    name: str | None = None
    address = None  # (not fields)
    inherited_fd = None
    remove_on_stop = False

    @property
    def label(self) -> str:
        return f"inherited {self.selector}"

    def _where(self) -> object:
        return ("unresolved", self.selector)


@dataclass(frozen=True)
class Command:
    """One command of exec-start and its companions (exec-start-pre, exec-reload, ...).

    ``argv`` may hold ``$VAR`` and ``${VAR}``: with ``expand_environment`` they are replaced when the
    command starts, from the environment it gets (activator.unitfile.expand_argv, systemd's rules).
    """

    argv: tuple[str, ...]
    path: str | None = None  # the executable when argv[0] is only the name it is given (systemd's @)
    ignore_failure: bool = False  # a failing exit counts as success (systemd's -)
    expand_environment: bool = False
    privileged: bool = False  # activator's own credentials instead of user/group (systemd's + and !)

    @property
    def executable(self) -> str:
        return self.path or self.argv[0]


@dataclass(frozen=True)
class ExitStatuses:
    """Exit codes and signals (restart-prevent-exit-status, success-exit-status, ...)."""

    codes: frozenset[int] = frozenset()
    signals: frozenset[int] = frozenset()

    def matches(self, status: int) -> bool:
        """Whether a wait() status is one of them."""
        if os.WIFEXITED(status):
            return os.WEXITSTATUS(status) in self.codes
        return os.WIFSIGNALED(status) and os.WTERMSIG(status) in self.signals


@dataclass(frozen=True)
class Condition:
    """One condition-*/assert-* on a path, checked before the unit starts (systemd.unit(5))."""

    kind: str  # the key without its condition-/assert- prefix: "path-exists", "file-not-empty", ...
    path: str
    negate: bool = False  # written with "!"
    trigger: bool = False  # written with "|": at least one triggering condition must hold
    assertion: bool = False  # assert-*: a failure is an error, not a quiet skip

    def __str__(self) -> str:
        prefix = ("|" if self.trigger else "") + ("!" if self.negate else "")
        return f"{'assert' if self.assertion else 'condition'}-{self.kind}={prefix}{self.path}"


@dataclass
class ServiceSpec:
    argv: list[str]
    environment: dict[str, str] = field(default_factory=dict)
    inherit_environment: bool = True
    working_directory: str | None = None
    user: str | None = None
    group: str | None = None
    supplementary_groups: list[str] = field(default_factory=list)
    type: str = "simple"
    restart: str = "no"
    restart_sec: float = 0.1
    start_limit_interval: float = 10.0
    start_limit_burst: int = 5
    timeout_start: float = 90.0
    timeout_stop: float = 10.0
    watchdog_sec: float = 0.0
    kill_signal: int = signal.SIGTERM
    kill_mode: str = "control-group"
    standard_input: str = "null"
    standard_output: str | None = None  # None: the socket when standard-input is socket, else "journal"
    file_descriptor_store_max: int = 0
    umask: int | None = None
    # Proxy units: the daemon listens here itself; activator accepts the connections and relays them.
    proxy_to: Address | None = None
    exit_idle_sec: float = float("inf")  # stop the daemon after this long without a connection (proxy units)
    # exec-start in its table form: the executable, "-", variable expansion and "+" of the main command
    exec_path: str | None = None
    ignore_failure: bool = False
    expand_environment: bool = False
    privileged: bool = False
    exec_condition: list[Command] = field(default_factory=list)
    exec_start_pre: list[Command] = field(default_factory=list)
    exec_start_post: list[Command] = field(default_factory=list)
    exec_reload: list[Command] = field(default_factory=list)
    notify_access: str | None = None  # None: the main process and its descendants
    success_exit_status: ExitStatuses = ExitStatuses()
    restart_prevent_exit_status: ExitStatuses = ExitStatuses()
    restart_force_exit_status: ExitStatuses = ExitStatuses()
    # Directories created before each start (relative to /run, /var/lib, ...), owned by user/group
    runtime_directory: list[str] = field(default_factory=list)
    runtime_directory_mode: int = 0o755
    runtime_directory_preserve: str = "no"  # no | yes | restart
    state_directory: list[str] = field(default_factory=list)
    state_directory_mode: int = 0o755
    cache_directory: list[str] = field(default_factory=list)
    cache_directory_mode: int = 0o755
    logs_directory: list[str] = field(default_factory=list)
    logs_directory_mode: int = 0o755
    configuration_directory: list[str] = field(default_factory=list)
    configuration_directory_mode: int = 0o755
    oom_score_adjust: int | None = None
    nice: int | None = None
    limits: dict[int, tuple[int, int]] = field(default_factory=dict)  # RLIMIT_* -> (soft, hard); -1: infinity
    # Graceful restarts and workers (docs/restarts.md)
    restart_style: str = "stop-first"  # graceful: the new daemon starts beside the old one, which stops once it is ready
    graceful_ready_sec: float = 1.0  # type simple/exec: how long a new daemon must run to count as ready
    workers: int = 1  # instances of the daemon sharing the sockets (accept = false)
    # Watch mode (activator.watch): restart the daemon when a file under these paths changes
    watch_paths: list[str] = field(default_factory=list)  # absolute, as the loader resolved them
    watch_ignore: list[str] = field(default_factory=list)  # patterns, besides activator.watch.DEFAULT_IGNORE
    watch_debounce_sec: float = 0.2

    @property
    def main_command(self) -> Command:
        return Command(tuple(self.argv), self.exec_path, self.ignore_failure, self.expand_environment, self.privileged)


@dataclass
class Unit:
    name: str
    sockets: list[ListenSpec]
    service: ServiceSpec
    accept: bool = False
    description: str = ""
    max_connections: int = 64
    max_connections_per_source: int = 0
    trigger_limit_interval: float = 2.0
    trigger_limit_burst: int | None = None  # None: 20 (Accept=no) or unlimited (Accept=yes)
    start_now: bool = False
    ip_address_allow: list[str] = field(default_factory=list)
    ip_address_deny: list[str] = field(default_factory=list)
    conditions: list[Condition] = field(default_factory=list)
    # Dependencies among the units loaded together, by unit name (systemd's [Unit] section)
    requires: list[str] = field(default_factory=list)
    wants: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)
    before: list[str] = field(default_factory=list)
    # Name of sockets without file-descriptor-name: "" means the unit's name (systemd's default);
    # None means pass no LISTEN_FDNAMES at all unless a socket is named (systemd-socket-activate).
    default_fd_name: str | None = ""

    @property
    def proxy(self) -> bool:
        """A proxy unit: one daemon, reached at service.proxy_to, fed with the connections activator accepts."""
        return self.service.proxy_to is not None

    @property
    def accepts_connections(self) -> bool:
        """activator accepts on the sockets itself (accept mode and proxy units), instead of the daemon."""
        return self.accept or self.service.proxy_to is not None

    @property
    def notify_socket(self) -> bool:
        """Its daemon gets a NOTIFY_SOCKET (activator.sdnotify): type notify, a watchdog, a descriptor store
        or a notify-access; never in accept mode."""
        svc = self.service
        return not self.accept and (svc.type == "notify" or svc.watchdog_sec > 0 or svc.file_descriptor_store_max > 0
                                    or svc.notify_access in ("main", "exec", "all"))

    @property
    def effective_trigger_burst(self) -> int:
        if self.trigger_limit_burst is not None:
            return self.trigger_limit_burst
        return 0 if self.accepts_connections else 20

    def fd_names(self) -> list[str] | None:
        """LISTEN_FDNAMES for Accept=no, None when it is to be left out."""
        if self.default_fd_name is None:
            if not any(s.name for s in self.sockets):
                return None
            default = "unknown"
        else:
            default = self.default_fd_name or self.name
        return [s.name or default for s in self.sockets]
