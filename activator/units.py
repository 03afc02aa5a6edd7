"""Plain definitions of units: what to listen on and what to start.

A unit pairs one or more listening sockets with one service, like a systemd
``.socket`` plus its ``.service``. ``activator run`` builds one unit from its
command line; ``activator serve`` builds units from TOML files. The engine
(:mod:`activator.supervisor`) only ever sees these dataclasses.
"""
from __future__ import annotations

import signal
import socket
from dataclasses import dataclass, field

from .addresses import Address

SOCKET_TYPES = {"stream": socket.SOCK_STREAM, "datagram": socket.SOCK_DGRAM, "seqpacket": socket.SOCK_SEQPACKET}
RESTART_POLICIES = ("no", "on-success", "on-failure", "on-abnormal", "on-abort", "always")
KILL_MODES = ("control-group", "mixed", "process", "none")
SERVICE_TYPES = ("simple", "exec", "notify")
STDIN_MODES = ("null", "socket", "inherit")
STDOUT_MODES = ("inherit", "null", "socket", "journal")
INFINITY = float("inf")


@dataclass
class ListenSpec:
    """One listening socket: either an address to bind or a descriptor inherited from our parent."""

    address: Address | None
    type: int = socket.SOCK_STREAM
    name: str | None = None
    inherited_fd: int | None = None
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

    @property
    def label(self) -> str:
        if self.address is not None:
            return str(self.address)
        if self.inherited_fd is None:  # `activator check`: resolved only by `serve`
            return f"inherited {self.name}"
        return f"inherited fd {self.inherited_fd}" + (f" ({self.name})" if self.name else "")

    def identity(self) -> tuple:
        """What must be equal for a reload to keep this very socket open."""
        return (
            self.address.text if self.address else None, self.inherited_fd, self.type, self.backlog,
            self.bind_ipv6_only, self.reuse_port, self.free_bind, self.socket_mode, self.socket_user,
            self.socket_group, self.directory_mode,
        )


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
    exit_idle_sec: float = INFINITY  # stop the daemon after this long without a connection (proxy units)


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
    source: str = field(default="", compare=False)  # the file it came from, for messages
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
