"""Opening, holding and closing listening sockets.

Unix sockets are bound under a umask derived from ``socket-mode`` so that the
socket never exists with a wider mode than asked; the owner is changed after
(root-owned in between, which is narrower, not wider). A path that exists and
is not a socket is never removed; a stale socket nobody listens on is replaced.
"""
from __future__ import annotations

import errno
import os
import socket
import stat
from dataclasses import dataclass, field

from .processes import lookup_group, lookup_user
from .units import ListenSpec

SOL_IP = getattr(socket, "SOL_IP", 0)
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
IPV6_FREEBIND = 78


class BindError(Exception):
    """One or more sockets could not be opened; ``messages`` has one line per problem."""

    def __init__(self, messages: list[str]):
        super().__init__("; ".join(messages))
        self.messages = messages


@dataclass(eq=False)
class BoundSocket:
    spec: ListenSpec
    sock: socket.socket
    created_path: str | None = None
    created_dirs: list[str] = field(default_factory=list)

    def fileno(self) -> int:
        return self.sock.fileno()

    def discard(self) -> None:
        """Undo an open that is not kept: close, and remove the socket file and the directories made for it."""
        self.close(remove_file=True)
        for directory in reversed(self.created_dirs):
            try:
                os.rmdir(directory)
            except OSError:
                pass  # not empty: something else lives there now

    def close(self, remove_file: bool = True) -> None:
        self.sock.close()
        if remove_file and self.created_path:
            _unlink_socket(self.created_path)
            self.created_path = None


def _unlink_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


def _lookup_ids(user: str | None, group: str | None) -> tuple[int, int]:
    uid = gid = -1
    try:
        if user:
            uid = int(user) if user.isdigit() else lookup_user(user).pw_uid
        if group:
            gid = int(group) if group.isdigit() else lookup_group(group)
    except ValueError as exc:
        raise OSError(errno.EINVAL, str(exc)) from None
    return uid, gid


def _make_parents(path: str, mode: int) -> list[str]:
    created = []
    parent = os.path.dirname(path)
    missing = []
    while parent and not os.path.isdir(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    for directory in reversed(missing):
        os.mkdir(directory, mode)
        os.chmod(directory, mode)  # mkdir's mode is filtered by the umask; directory-mode is exact
        created.append(directory)
    return created


def _clear_stale(path: str, sock_type: int) -> None:
    """Remove a leftover socket at ``path``; refuse anything else or a socket still in use."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, "path exists and is not a socket; refusing to remove it")
    if sock_type != socket.SOCK_DGRAM:
        probe = socket.socket(socket.AF_UNIX, sock_type)
        probe.setblocking(False)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # nobody listens: stale
        except BlockingIOError:
            raise OSError(errno.EADDRINUSE, "a server is listening on it") from None
        except OSError:
            pass
        else:
            raise OSError(errno.EADDRINUSE, "a server is listening on it")
        finally:
            probe.close()
    os.unlink(path)


def _bind_unix_path(sock: socket.socket, spec: ListenSpec, bound: BoundSocket) -> None:
    path = spec.address.path
    uid, gid = _lookup_ids(spec.socket_user, spec.socket_group)
    bound.created_dirs = _make_parents(path, spec.directory_mode)
    _clear_stale(path, spec.type)
    old = os.umask(0o777 & ~spec.socket_mode)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    bound.created_path = path
    if uid != -1 or gid != -1:
        os.chown(path, uid, gid, follow_symlinks=False)


def _apply_options(sock: socket.socket, spec: ListenSpec) -> None:
    family = sock.family
    if family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            if spec.bind_ipv6_only == "both" or (spec.bind_ipv6_only == "default" and spec.address.any_port):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            elif spec.bind_ipv6_only == "ipv6-only":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if spec.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if spec.free_bind:
            if family == socket.AF_INET:
                sock.setsockopt(SOL_IP, IP_FREEBIND, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        if spec.no_delay and spec.type == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if spec.keep_alive:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if spec.receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, spec.receive_buffer)
    if spec.send_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, spec.send_buffer)


def _new_socket(spec: ListenSpec) -> socket.socket:
    addr = spec.address
    if addr.any_port:
        try:
            return socket.socket(socket.AF_INET6, spec.type)
        except OSError as exc:
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
                raise
            # No IPv6 on this host: "PORT" means 0.0.0.0:PORT, as in systemd.
            return socket.socket(socket.AF_INET, spec.type)
    return socket.socket(addr.family, spec.type)


def open_socket(spec: ListenSpec) -> BoundSocket:
    """Create, bind and listen; raises OSError with the file left clean on failure."""
    if spec.inherited_fd is not None:
        sock = socket.socket(fileno=spec.inherited_fd)
        return BoundSocket(spec, sock)
    sock = _new_socket(spec)
    bound = BoundSocket(spec, sock)
    try:
        _apply_options(sock, spec)
        addr = spec.address
        if addr.path is not None:
            _bind_unix_path(sock, spec, bound)
        elif sock.family == socket.AF_INET and addr.any_port:
            sock.bind(("0.0.0.0", addr.sockaddr[1]))
        else:
            sock.bind(addr.sockaddr)
        if spec.type != socket.SOCK_DGRAM:
            sock.listen(spec.backlog)
    except BaseException:
        bound.discard()
        raise
    return bound


def describe_error(spec: ListenSpec, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.EINVAL and exc.args and len(exc.args) >= 2:
        reason = exc.args[1]
    return f"cannot listen on {spec.label}: {reason}"


def open_all(specs: list[ListenSpec]) -> list[BoundSocket]:
    """Open every socket or none: on any failure close what was opened and raise BindError listing all problems."""
    bound: list[BoundSocket] = []
    errors: list[str] = []
    for spec in specs:
        try:
            bound.append(open_socket(spec))
        except OSError as exc:
            errors.append(describe_error(spec, exc))
    if errors:
        for b in bound:
            b.discard()
        raise BindError(errors)
    return bound


def apply_live_options(bound: BoundSocket, spec: ListenSpec) -> None:
    """Apply to a kept socket the options a reload changed that need no new socket (OSError on failure)."""
    sock = bound.sock
    if spec.keep_alive != bound.spec.keep_alive:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(spec.keep_alive))
    if spec.no_delay != bound.spec.no_delay and sock.family in (socket.AF_INET, socket.AF_INET6) \
            and spec.type == socket.SOCK_STREAM:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(spec.no_delay))
    if spec.receive_buffer and spec.receive_buffer != bound.spec.receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, spec.receive_buffer)
    if spec.send_buffer and spec.send_buffer != bound.spec.send_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, spec.send_buffer)
    if spec.backlog != bound.spec.backlog and spec.type != socket.SOCK_DGRAM:
        sock.listen(spec.backlog)
