"""Opening, holding and closing listening sockets, without ever touching a file that is not ours.

activator runs as root and as PID 1, so every file-system step is defensive:

* Parent directories of a unix socket are resolved from ``/`` one component at
  a time (``O_PATH`` descriptors, never following a symbolic link blindly), in
  the spirit of sshd's StrictModes and systemd's path chasing. Every directory
  on the way must be owned by root, by us or by the socket's owner
  (``socket-user``), and must not be writable by group or others unless it is
  sticky (``/tmp``); a symbolic link is followed only when root, we or the
  socket's owner own it. In a sticky directory that others may write to, what
  we use inside it must be owned by one of those too: a directory is checked
  like any other, a socket file left by another user is refused (never
  replaced). Directories activator creates (``directory-mode``) are accepted
  with the mode the configuration asked for. ``..`` goes back to the directory
  resolved before it.
* A file at the socket's path is replaced only when it is provably a dead
  socket: owned by root, us or the socket's owner, and a connect() with the
  socket's own type gives ECONNREFUSED (nobody bound). EPROTOTYPE (a live socket
  of another type), EAGAIN (a listener with a full backlog), EACCES and anything
  else count as in use. A path whose inode is a socket activator itself holds
  is never probed (a probe would start its daemon with an empty connection):
  it is "in use by activator itself", unless the caller is replacing that very
  socket (a reload), when the path is taken over and given back on failure.
  Abstract sockets have no file: the kernel refuses a live name (EADDRINUSE)
  and a dead one is gone, so there is nothing to probe or remove.
* The (st_dev, st_ino) of a socket file is recorded right after bind(); it is
  removed (at close, remove-on-stop, discard) only when the path, resolved
  again the same way, holds that very inode and it is still a socket, with
  unlinkat() relative to the parent directory just checked. What remains is
  the window between that lstat and the unlink: only someone who may write the
  parent directory (root, the socket's owner, or, in a sticky directory,
  nobody but them for our entry) can swap the file in it, and the checks above
  exclude everyone else.
* bind() and the chown after it use the real path (so that getsockname() and
  sd_is_socket_unix() in the daemon see it); the parent checks ran just
  before, and the inode is taken from the parent we checked.
"""
from __future__ import annotations

import errno
import itertools
import os
from . import socketapi as socket
import stat
from _socket import socket as _raw_socket
from collections import deque
from collections.abc import Collection

from .records import dataclass, field
from .processes import lookup_group, lookup_user
from .units import BindSpec, ListenSpec

SOL_IP = getattr(socket, "SOL_IP", 0)
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
IPV6_FREEBIND = 78
MAX_SYMLINKS = 40  # the kernel's limit (ELOOP)
IP_FAMILIES = (socket.AF_INET, socket.AF_INET6)

Inode = tuple[int, int]  # (st_dev, st_ino)


class BindError(Exception):
    """One or more sockets could not be opened; ``messages`` has one line per problem."""

    def __init__(self, messages: list[str]):
        super().__init__("; ".join(messages))
        self.messages = messages


@dataclass(eq=False)
class SocketFile:
    """A socket file we bound: the only inode at that path we will ever remove, chmod or chown."""

    path: str
    parent: Inode  # the directory it was bound in
    inode: Inode
    ctime_ns: int  # as we last left it: a later change by anyone else makes it unknown again


@dataclass(eq=False)
class CreatedDir:
    path: str
    parent: Inode
    inode: Inode


@dataclass(eq=False)
class Takeover:
    """A reload moved a unix path from a socket we hold to a new one; ``backup``, a hard link in the same
    directory, keeps the old inode until commit() (dropped) or close() before it (put back)."""

    path: str
    parent: Inode
    old_inode: Inode
    backup: str  # file name in the parent directory


@dataclass(eq=False)
class BoundSocket:
    spec: ListenSpec
    sock: socket.socket
    trusted: frozenset[int] = frozenset({0})  # uids whose directories and files we accept on the way
    file: SocketFile | None = None
    created_dirs: list[CreatedDir] = field(default_factory=list)
    takeover: Takeover | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def discard(self) -> None:
        """Undo an open that is not kept: close, remove the socket file and the directories made for it."""
        self.close(remove_file=True)
        own = {d.inode for d in self.created_dirs}
        for directory in reversed(self.created_dirs):
            _remove(directory.path, directory.parent, directory.inode, self.trusted, own, rmdir=True)
        self.created_dirs = []

    def close(self, remove_file: bool = True) -> None:
        """Close; with ``remove_file``, remove the socket file if the path still holds our inode.

        A path taken over from a running socket and not committed goes back to that socket."""
        _OPEN.discard(self)
        file, self.file = self.file, None
        takeover, self.takeover = self.takeover, None
        # Files first: while the socket is open its inode cannot be freed, so no other file can have its number.
        if takeover is not None:
            _give_back(takeover, file.inode if file else None, self.trusted)
        elif file is not None and remove_file:
            _remove(file.path, file.parent, file.inode, self.trusted, {d.inode for d in self.created_dirs})
        elif file is not None:
            _RELEASED[file.inode] = file.ctime_ns
        if file is not None:
            _HELD.pop(file.inode, None)
        self.sock.close()

    def commit(self) -> None:
        """A reload that took over a path is final: drop the old socket's backup link."""
        takeover, self.takeover = self.takeover, None
        if takeover is None:
            return
        old = _HELD.pop(takeover.old_inode, None)  # no path leads to that inode any more
        if old is not None:
            old.file = None  # the path is the new socket's now: closing the old one must not touch it
        try:
            with _checked_parent(takeover.path, self.trusted, takeover.parent) as parent:
                if _ident(_lstat(parent, takeover.backup)) == takeover.old_inode:
                    os.unlink(takeover.backup, dir_fd=parent.fd)
        except OSError:
            pass  # the backup is not what we made: leave it


# Every socket we hold (for messages), and the socket files among them by inode: a probe never connects
# to one of these. _RELEASED: socket files we closed and left in place (ctime as we left them).
_OPEN: set[BoundSocket] = set()
_HELD: dict[Inode, BoundSocket] = {}
_RELEASED: dict[Inode, int] = {}
_BACKUP_NUMBERS = itertools.count(1)


def _ident(st: os.stat_result) -> Inode:
    return (st.st_dev, st.st_ino)


def _refuse(message: str, code: int = errno.EPERM) -> OSError:
    return OSError(code, message)


# ---------------------------------------------------------------- parent directories
@dataclass
class _Parent:
    """The directory holding a socket file, opened O_PATH after a checked walk from /."""

    fd: int
    path: str
    name: str  # the socket's file name in it
    inode: Inode

    def __enter__(self) -> _Parent:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


@dataclass
class _Walk:
    trusted: frozenset[int]
    own_dirs: set[Inode]  # created by us with directory-mode: accepted as they are
    directory_mode: int | None = None  # None: create nothing (removal, live changes)
    created: list[CreatedDir] = field(default_factory=list)

    def check_dir(self, st: os.stat_result, where: str) -> None:
        if _ident(st) in self.own_dirs:
            return
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o022 and not mode & stat.S_ISVTX:
            raise _refuse(f"{where} is writable by others (mode {mode:04o}, owner {st.st_uid}); refusing")
        if st.st_uid not in self.trusted:
            raise _refuse(f"{where} is owned by uid {st.st_uid}, not by root or the socket's owner; refusing")

    def entry(self, dir_fd: int, name: str, where: str) -> os.stat_result:
        """lstat of ``name``; a missing directory is created when we may create."""
        try:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            if self.directory_mode is None:
                raise
        old = os.umask(0)  # directory-mode is exact, whatever our umask
        try:
            os.mkdir(name, self.directory_mode, dir_fd=dir_fd)
            made = True
        except FileExistsError:
            made = False  # someone was faster: checked below like any other directory
        finally:
            os.umask(old)
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if made:
            self.created.append(CreatedDir(where, _ident(os.fstat(dir_fd)), _ident(st)))
            self.own_dirs.add(_ident(st))
        return st

    def parent_of(self, path: str) -> _Parent:
        head, name = os.path.split(path)
        if name in ("", ".", "..") or not head.startswith("/"):
            raise _refuse(f"{path} is not an absolute path ending in a file name", errno.EINVAL)
        fds = [os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)]
        names: list[str] = []
        try:
            self.check_dir(os.fstat(fds[0]), "/")
            self._descend(deque(head.split("/")), fds, names)
            inode = _ident(os.fstat(fds[-1]))
            return _Parent(fds.pop(), "/" + "/".join(names), name, inode)
        finally:
            for fd in fds:
                os.close(fd)

    def _descend(self, todo: deque[str], fds: list[int], names: list[str]) -> None:
        links = 0
        while todo:
            name = todo.popleft()
            if name in ("", "."):
                continue
            if name == "..":  # the directory resolved before this one, already checked
                if names:
                    os.close(fds.pop())
                    names.pop()
                continue
            where = "/" + "/".join([*names, name])
            st = self.entry(fds[-1], name, where)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_SYMLINKS:
                    raise _refuse(f"too many symbolic links at {where}", errno.ELOOP)
                if st.st_uid not in self.trusted:
                    raise _refuse(f"{where} is a symbolic link owned by uid {st.st_uid}; refusing to follow it")
                target = os.readlink(name, dir_fd=fds[-1])
                if not target:
                    raise _refuse(f"{where} is an empty symbolic link", errno.ENOENT)
                if target.startswith("/"):
                    while names:
                        os.close(fds.pop())
                        names.pop()
                todo.extendleft(reversed(target.split("/")))
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise _refuse(f"{where} is not a directory", errno.ENOTDIR)
            fds.append(os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fds[-1]))
            names.append(name)
            opened = os.fstat(fds[-1])
            if _ident(opened) != _ident(st):
                raise _refuse(f"{where} changed while it was being checked", errno.EAGAIN)
            self.check_dir(opened, where)


def _checked_parent(path: str, trusted: frozenset[int], inode: Inode, own: Collection[Inode] = ()) -> _Parent:
    """The parent of a file we made, resolved again: it must be the very directory we made it in."""
    parent = _Walk(trusted, set(own)).parent_of(path)
    if parent.inode != inode:
        os.close(parent.fd)
        raise _refuse(f"{parent.path} is not the directory the socket was created in")
    return parent


def _lstat(parent: _Parent, name: str) -> os.stat_result:
    return os.stat(name, dir_fd=parent.fd, follow_symlinks=False)


def _remove(path: str, parent: Inode, inode: Inode, trusted: frozenset[int], own: set[Inode],
            rmdir: bool = False) -> None:
    """Remove ``path`` only if it still is that inode in that directory (and a socket, or with ``rmdir``
    an empty directory)."""
    try:
        with _checked_parent(path, trusted, parent, own) as found:
            st = _lstat(found, found.name)
            if _ident(st) != inode:
                return  # replaced by someone: not ours any more
            if rmdir and stat.S_ISDIR(st.st_mode):
                os.rmdir(found.name, dir_fd=found.fd)
            elif not rmdir and stat.S_ISSOCK(st.st_mode):
                os.unlink(found.name, dir_fd=found.fd)
    except OSError:
        pass  # not empty, gone, or no longer safely reachable: leave it


# ---------------------------------------------------------------- what is at the path
def _probe(path: str, sock_type: int) -> str | None:
    """None when nobody is bound at ``path`` with any type (provably dead), else why it counts as in use."""
    probe = socket.socket(socket.AF_UNIX, sock_type | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return None
    except BlockingIOError:
        return "a server is listening on it (its backlog is full)"
    except OSError as exc:
        if exc.errno == errno.EPROTOTYPE:
            return "in use by a socket of another type"
        return f"cannot tell whether it is in use ({exc.strerror}); refusing to replace it"
    finally:
        probe.close()
    if sock_type == socket.SOCK_DGRAM:
        return "in use: a datagram socket is bound to it"
    return "in use: a server is listening on it"


def remove_stale_socket(path: str, sock_type: int) -> None:
    """For a socket activator keeps at a fixed path of its own (the control socket): remove what is
    at ``path`` only when it is a socket nobody is bound to; OSError (EEXIST, EADDRINUSE) otherwise."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, "path exists and is not a socket; refusing to remove it")
    reason = _probe(path, sock_type)
    if reason is not None:
        raise OSError(errno.EADDRINUSE, reason)
    os.unlink(path)


def _clear_the_way(parent: _Parent, spec: BindSpec, trusted: frozenset[int],
                   replacing: Collection[BoundSocket]) -> Takeover | None:
    """Make room for the new socket file: nothing there, a dead socket we may replace, or our own being replaced."""
    try:
        st = _lstat(parent, parent.name)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(st.st_mode):
        raise _refuse("path exists and is not a socket; refusing to remove it", errno.EEXIST)
    holder = _HELD.get(_ident(st))
    if holder is not None:
        if holder in replacing:
            return _take_over(parent, spec.address.path, _ident(st))  # type: ignore[arg-type]
        raise _refuse("in use by activator itself (another of its sockets holds it)", errno.EADDRINUSE)
    if st.st_uid not in trusted:
        raise _refuse(f"a socket owned by uid {st.st_uid} is there; refusing to replace it", errno.EEXIST)
    if _RELEASED.get(_ident(st)) != st.st_ctime_ns:  # ours, closed and untouched since: no probe needed
        reason = _probe(spec.address.path, spec.type)  # type: ignore[arg-type]
        if reason:
            raise _refuse(reason, errno.EADDRINUSE)
    try:
        if _ident(_lstat(parent, parent.name)) != _ident(st):
            raise _refuse("the socket file changed while it was being checked", errno.EAGAIN)
        os.unlink(parent.name, dir_fd=parent.fd)
    except FileNotFoundError:
        pass  # gone meanwhile: the bind below creates it, or fails if someone else was faster
    _RELEASED.pop(_ident(st), None)
    return None


def _take_over(parent: _Parent, path: str, inode: Inode) -> Takeover:
    """Move the path away from a socket we hold, keeping its inode under a backup name next to it."""
    backup = f".{parent.name}.activator-{os.getpid()}-{next(_BACKUP_NUMBERS)}"
    os.link(parent.name, backup, src_dir_fd=parent.fd, dst_dir_fd=parent.fd, follow_symlinks=False)
    os.unlink(parent.name, dir_fd=parent.fd)
    return Takeover(path, parent.inode, inode, backup)


def _give_back(takeover: Takeover, new_inode: Inode | None, trusted: frozenset[int]) -> None:
    """Put the old socket's inode back at the path, atomically replacing the new socket's file if it is there."""
    try:
        with _checked_parent(takeover.path, trusted, takeover.parent) as parent:
            if _ident(_lstat(parent, takeover.backup)) != takeover.old_inode:
                return
            try:
                present: Inode | None = _ident(_lstat(parent, parent.name))
            except FileNotFoundError:
                present = None
            if present is not None and present == new_inode:
                os.rename(takeover.backup, parent.name, src_dir_fd=parent.fd, dst_dir_fd=parent.fd)
            elif present is None:  # link, not rename: never replaces what someone may have put there since
                os.link(takeover.backup, parent.name, src_dir_fd=parent.fd, dst_dir_fd=parent.fd,
                        follow_symlinks=False)
                os.unlink(takeover.backup, dir_fd=parent.fd)
    except OSError:
        pass  # nothing we can prove ours to move back


# ---------------------------------------------------------------- binding
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


def _trusted(uid: int) -> frozenset[int]:
    """Root, us, and the socket's owner: who may own the directories and files on the way."""
    return frozenset({0, os.geteuid(), uid} - {-1})


def _umask_mode() -> int:
    """What bind() creates under the current umask: 0777 & ~umask (the kernel's rule for AF_UNIX)."""
    current = os.umask(0)
    os.umask(current)
    return 0o777 & ~current


def _bind_unix_path(sock: socket.socket, spec: BindSpec, bound: BoundSocket,
                    replacing: Collection[BoundSocket]) -> None:
    path: str = spec.address.path  # type: ignore[assignment]
    uid, gid = _lookup_ids(spec.socket_user, spec.socket_group)
    bound.trusted = _trusted(uid)
    walk = _Walk(bound.trusted, set(), spec.directory_mode)
    try:
        parent = walk.parent_of(path)
    finally:
        bound.created_dirs = walk.created
    with parent:
        bound.takeover = _clear_the_way(parent, spec, bound.trusted, replacing)
        # socket-mode through the umask: the file never exists with a wider mode. None: the umask as it is.
        old = os.umask(0o777 & ~spec.socket_mode) if spec.socket_mode is not None else None
        try:
            sock.bind(path)
        finally:
            if old is not None:
                os.umask(old)
        st = _lstat(parent, parent.name)
        if not stat.S_ISSOCK(st.st_mode):
            raise _refuse("the socket file was replaced while it was created", errno.EAGAIN)
        bound.file = SocketFile(path, parent.inode, _ident(st), st.st_ctime_ns)
        _HELD[bound.file.inode] = bound
        if uid != -1 or gid != -1:
            os.chown(parent.name, uid, gid, dir_fd=parent.fd, follow_symlinks=False)
            bound.file.ctime_ns = _lstat(parent, parent.name).st_ctime_ns


def _v6only(spec: BindSpec) -> int | None:
    """IPV6_V6ONLY as configured; None: the kernel's default (net.ipv6.bindv6only)."""
    if spec.bind_ipv6_only == "both" or (spec.bind_ipv6_only == "default" and spec.address and spec.address.any_port):
        return 0
    if spec.bind_ipv6_only == "ipv6-only":
        return 1
    return None


# socket.socket.family converts the number to socket.AddressFamily each time (an enum call, about a
# microsecond): the start-up of 1,000 sockets asked six times per socket. The number compares the same.
family_of = _raw_socket.family.__get__


def _bind_time_options(sock: socket.socket, spec: BindSpec) -> None:
    if family_of(sock) not in IP_FAMILIES:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    v6only = _v6only(spec)
    if family_of(sock) == socket.AF_INET6 and v6only is not None:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
    if spec.reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


def _live_options(sock: socket.socket, spec: BindSpec) -> list[tuple[str, int, int]]:
    """(attribute, level, option) of the options a bound socket takes at any time."""
    options = [("keep_alive", socket.SOL_SOCKET, socket.SO_KEEPALIVE),
               ("receive_buffer", socket.SOL_SOCKET, socket.SO_RCVBUF),
               ("send_buffer", socket.SOL_SOCKET, socket.SO_SNDBUF)]
    if family_of(sock) == socket.AF_INET:
        options.append(("free_bind", SOL_IP, IP_FREEBIND))
    elif family_of(sock) == socket.AF_INET6:
        options.append(("free_bind", socket.IPPROTO_IPV6, IPV6_FREEBIND))
    if family_of(sock) in IP_FAMILIES and spec.type == socket.SOCK_STREAM:
        options.append(("no_delay", socket.IPPROTO_TCP, socket.TCP_NODELAY))
    return options


def _set_options(sock: socket.socket, spec: BindSpec, previous: BindSpec | None = None) -> None:
    """Set what ``spec`` asks for; with ``previous`` (a kept socket), only what differs from it."""
    for attr, level, option in _live_options(sock, spec):
        value = getattr(spec, attr)
        before = getattr(previous, attr) if previous is not None else None
        if value is not None and value != before and (value or previous is not None):
            sock.setsockopt(level, option, int(value))


def _new_socket(spec: BindSpec) -> socket.socket:
    addr = spec.address
    assert addr is not None
    if addr.any_port:
        try:
            return socket.socket(socket.AF_INET6, spec.type)
        except OSError as exc:
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
                raise
            # No IPv6 on this host: "PORT" means 0.0.0.0:PORT, as in systemd.
            return socket.socket(socket.AF_INET, spec.type)
    return socket.socket(addr.family, spec.type)


def _bind_address(sock: socket.socket, spec: BindSpec) -> None:
    """bind() an IP, vsock or abstract address; EADDRINUSE because we hold it ourselves says so."""
    addr = spec.address
    assert addr is not None
    try:
        sock.bind(("0.0.0.0", addr.sockaddr[1]) if family_of(sock) == socket.AF_INET and addr.any_port else addr.sockaddr)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE and any(
                held.spec.address is not None and held.spec.address.sockaddr == addr.sockaddr for held in _OPEN):
            raise _refuse("in use by activator itself (another of its sockets holds it; that one must close "
                          "before a socket with these options can be bound)", errno.EADDRINUSE) from None
        raise


def open_socket(spec: ListenSpec, replacing: Collection[BoundSocket] = ()) -> BoundSocket:
    """Create, bind and listen; raises OSError with nothing left behind on failure.

    ``replacing``: sockets of the running configuration that the caller will close if it commits (a
    reload). A unix path held by one of them is taken over (see Takeover): the new socket gets the path
    at once, ``commit()`` makes that final, ``close()``/``discard()`` before it gives the path back."""
    if not isinstance(spec, BindSpec):
        assert spec.inherited_fd is not None, "a listen-inherited spec that check did not resolve"
        bound = BoundSocket(spec, socket.socket(fileno=spec.inherited_fd))
        _OPEN.add(bound)
        return bound
    sock = _new_socket(spec)
    bound = BoundSocket(spec, sock)
    try:
        _bind_time_options(sock, spec)
        _set_options(sock, spec)
        if spec.address is not None and spec.address.path is not None:
            _bind_unix_path(sock, spec, bound, replacing)
        else:
            _bind_address(sock, spec)
        if spec.type != socket.SOCK_DGRAM:
            sock.listen(spec.backlog)
    except BaseException:
        bound.discard()
        raise
    _OPEN.add(bound)
    return bound


def adopt(spec: ListenSpec, carried: dict) -> BoundSocket:
    """A socket we held before a re-exec, as open_socket() left it: its file and directories still ours
    (``carried``: activator.reexec.carry_socket's); OSError when its fd is not a socket."""
    fd = int(carried["fd"])
    file, created_dirs = carried["file"], carried["created_dirs"]
    sock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    bound = BoundSocket(spec, sock, trusted=frozenset(carried["trusted"]))
    if file is not None:
        f = file["fields"]
        bound.file = SocketFile(f["path"], tuple(f["parent"]), tuple(f["inode"]), f["ctime_ns"])  # type: ignore[arg-type]
        _HELD[bound.file.inode] = bound
    for entry in created_dirs:
        d = entry["fields"]
        bound.created_dirs.append(CreatedDir(d["path"], tuple(d["parent"]), tuple(d["inode"])))  # type: ignore[arg-type]
    _OPEN.add(bound)
    return bound


def describe_error(spec: ListenSpec, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.EINVAL and exc.args and len(exc.args) >= 2:
        reason = exc.args[1]
    return f"cannot listen on {spec.label}: {reason}"


def open_all(specs: list[ListenSpec], replacing: Collection[BoundSocket] = ()) -> list[BoundSocket]:
    """Open every socket or none: on any failure close what was opened and raise BindError listing all problems."""
    bound: list[BoundSocket] = []
    errors: list[str] = []
    for spec in specs:
        try:
            bound.append(open_socket(spec, replacing))
        except OSError as exc:
            errors.append(describe_error(spec, exc))
    if errors:
        for b in bound:
            b.discard()
        raise BindError(errors)
    return bound


# ---------------------------------------------------------------- reload: options of a kept socket
def _kernel_v6only() -> int:
    try:
        with open("/proc/sys/net/ipv6/bindv6only") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def needs_new_socket(bound: BoundSocket, new: ListenSpec) -> str | None:
    """Why ``new`` cannot be had by changing ``bound`` in place (then a new socket is needed), or None.

    What needs a new socket is the registry's ``socket-rebind`` class (activator.settings), besides the
    address and the socket type; everything of ``socket-live`` is applied by apply_live_options().
    directory-mode applies only to directories still to be created."""
    from .settings import reload_attrs

    old = bound.spec
    if (old.address and old.address.text) != (new.address and new.address.text) or old.inherited_fd != new.inherited_fd:
        return "the address changed"
    if not isinstance(old, BindSpec) or not isinstance(new, BindSpec):
        return None
    if old.type != new.type:
        return "the socket type changed"
    family = family_of(bound.sock)
    for attr in reload_attrs("socket-rebind"):
        if attr == "bind_ipv6_only":
            if family == socket.AF_INET6 and _v6only_differs(bound, new):
                return "bind-ipv6-only changed (it applies at bind time)"
        elif family in IP_FAMILIES and getattr(old, attr) != getattr(new, attr):
            return f"{attr.replace('_', '-')} changed (it applies at bind time)"
    for attr in ("receive_buffer", "send_buffer"):
        if getattr(old, attr) is not None and getattr(new, attr) is None:
            return f"{attr.replace('_', '-')} went back to the kernel's default (only a new socket has it)"
    return None


def _v6only_differs(bound: BoundSocket, new: BindSpec) -> bool:
    """The kernel's IPV6_V6ONLY of ``bound`` against what ``new`` asks; it matters only on the wildcard
    address (elsewhere the kernel forces it on)."""
    if bound.sock.getsockname()[0] != "::":
        return False
    wanted = _v6only(new)
    wanted = _kernel_v6only() if wanted is None else wanted
    return bound.sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) != wanted


def apply_live_options(bound: BoundSocket, new: ListenSpec) -> None:
    """Bring a kept socket (needs_new_socket() is None) to ``new``'s options, then ``bound.spec = new``.

    On OSError the socket is put back as it was (best effort) and the error raised; calling it again with
    the previous spec undoes a successful call."""
    old = bound.spec
    if not isinstance(old, BindSpec) or not isinstance(new, BindSpec):
        bound.spec = new
        return
    try:
        _apply(bound, old, new)
    except OSError:
        try:
            _apply(bound, new, old)
        except OSError:
            pass  # already failing: report the first error
        raise
    bound.spec = new


def _apply(bound: BoundSocket, old: BindSpec, new: BindSpec) -> None:
    _set_options(bound.sock, new, previous=old)
    if new.type != socket.SOCK_DGRAM and new.backlog != old.backlog:
        bound.sock.listen(new.backlog)  # on a listening socket this only changes the backlog
    owner_changed = (old.socket_user, old.socket_group) != (new.socket_user, new.socket_group)
    if bound.file is not None and (owner_changed or old.socket_mode != new.socket_mode):
        _update_file(bound, new, owner_changed)


def _update_file(bound: BoundSocket, new: BindSpec, owner_changed: bool) -> None:
    """chown/chmod our socket file, after checking the path still holds our inode (never following links)."""
    file = bound.file
    assert file is not None
    uid, gid = _lookup_ids(new.socket_user, new.socket_group)
    mode = (new.socket_mode if new.socket_mode is not None else _umask_mode()) & 0o777
    trusted = _trusted(uid)
    with _checked_parent(file.path, trusted, file.parent, {d.inode for d in bound.created_dirs}) as parent:
        if _ident(_lstat(parent, parent.name)) != file.inode:
            raise _refuse("the socket file was replaced by someone else; refusing to change it")
        if owner_changed:  # as at bind: activator's own unless socket-user/-group say otherwise
            os.chown(parent.name, uid if uid != -1 else os.geteuid(), gid if gid != -1 else os.getegid(),
                     dir_fd=parent.fd, follow_symlinks=False)
        try:
            os.chmod(parent.name, mode, dir_fd=parent.fd, follow_symlinks=False)
        except NotImplementedError:
            raise _refuse("cannot change the mode without following symbolic links here", errno.ENOTSUP) from None
        file.ctime_ns = _lstat(parent, parent.name).st_ctime_ns
    bound.trusted = trusted
