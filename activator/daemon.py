"""python-systemd's ``systemd.daemon`` in pure Python: no libsystemd, no compiler.

Same names, signatures, defaults, return types and errors (``OSError`` with the errno
libsystemd returns, ``ValueError``/``TypeError``/``OverflowError`` where python-systemd's
argument parsing raises them), so a program changes only its import line::

    try:
        from systemd import daemon
    except ImportError:
        from activator import daemon

``listen_fds()`` returns descriptor numbers (``[3, 4, ...]``) and ``listen_fds_with_names()``
a ``{fd: name}`` dict, as python-systemd does; :func:`activator.listen_sockets` is the form
that returns socket objects. The semantics are those of libsystemd's sd-daemon
(``sd_listen_fds(3)``, ``sd_notify(3)``, ``sd_is_fifo(3)``, ``sd_booted(3)``) as of
systemd 252, and of python-systemd 235's own address parser for
:func:`is_socket_sockaddr`; ``tests/test_daemon_compat.py`` runs both side by side.
"""
from __future__ import annotations

import array
import contextlib
import errno
import functools
import operator
import os
import socket
import stat
import struct
from typing import Any, Callable, Iterator, NamedTuple, Sequence

from . import protocol
from .protocol import INT_MAX, LONG_MAX, ULONG_MAX

__all__ = [
    "LISTEN_FDS_START", "booted", "is_fifo", "is_mq", "is_socket", "is_socket_inet", "is_socket_sockaddr",
    "is_socket_unix", "listen_fds", "listen_fds_with_names", "notify",
]

LISTEN_FDS_START = protocol.LISTEN_FDS_START
INT_MIN, LONG_MIN = -INT_MAX - 1, -LONG_MAX - 1
UINT_MAX = 2**32 - 1
SNDBUF_SIZE = 8 * 1024 * 1024  # libsystemd asks for this much, so that a long STATUS= fits one datagram
SO_SNDBUFFORCE = 32  # <asm-generic/socket.h>; the socket module does not define it
SUN_PATH_SIZE = 108
IFNAMSIZ = 16
BOOTED_PATH = "/run/systemd/system/"
MQUEUE_MOUNT = b"/dev/mqueue"
_UCRED = struct.Struct("iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid


# ------------------------------------------------------------ arguments and errors
def _error(err: int) -> OSError:
    return OSError(err, os.strerror(err))


@contextlib.contextmanager
def _raised_as_libsystemd(path: bytes | None = None) -> Iterator[None]:
    """Any OSError leaves as python-systemd's set_error() raises it: errno, strerror(errno), the path argument."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None:
            raise
        if path is None:
            raise _error(exc.errno) from None
        raise OSError(exc.errno, os.strerror(exc.errno), os.fsdecode(path)) from None


def _c_long(value: Any) -> int:
    """What PyLong_AsLong() accepts: an object with __index__, within a C long."""
    number = operator.index(value)
    if not LONG_MIN <= number <= LONG_MAX:
        raise OverflowError("Python int too large to convert to C long")
    return number


def _c_int(value: Any) -> int:
    """An ``int`` argument as PyArg_ParseTuple's "i" converts it."""
    number = _c_long(value)
    if number > INT_MAX:
        raise OverflowError("signed integer is greater than maximum")
    if number < INT_MIN:
        raise OverflowError("signed integer is less than minimum")
    return number


def _c_string(value: Any, what: str) -> bytes:
    """A ``str`` argument as PyArg_ParseTuple's "s" converts it: UTF-8, no NUL."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, not {type(value).__name__}")
    if "\0" in value:
        raise ValueError("embedded null character")
    return value.encode("utf-8")


def _c_path(path: Any) -> bytes | None:
    """A path argument as python-systemd converts it (PyUnicode_FSConverter; None stays None)."""
    if path is None:
        return None
    raw = os.fsencode(path)  # TypeError for anything but str, bytes and os.PathLike, as there
    if b"\0" in raw:
        raise ValueError("embedded null byte")
    return raw


def _fd(fileobj: Any) -> int:
    """The descriptor python-systemd takes: ``fileobj.fileno()`` where there is one, else ``fileobj`` itself."""
    try:
        fileobj = fileobj.fileno()
    except AttributeError:
        pass
    return _c_int(fileobj)


# ------------------------------------------------------------------- descriptors
@contextlib.contextmanager
def _borrowed(fd: int, detect: bool = False) -> Iterator[socket.socket]:
    """A socket object on the caller's descriptor, detached (never closed) afterwards.

    With ``detect`` its family is read with getsockname(), as libsystemd reads it; without,
    wrapping costs no system call. Wrapping sets O_NONBLOCK when socket.setdefaulttimeout()
    is in force, so the flag is put back: asking must not change the caller's socket.
    """
    blocking = os.get_blocking(fd) if socket.getdefaulttimeout() is not None else None
    if detect:
        sock = socket.socket(fileno=fd)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fd)
    try:
        yield sock
    finally:
        sock.detach()
        if blocking is not None:
            os.set_blocking(fd, blocking)


def _socket_name(fd: int) -> tuple[int, Any]:
    """(family, address as socket.getsockname() gives it) of a socket descriptor."""
    with _borrowed(fd, detect=True) as sock:
        return int(sock.family), sock.getsockname()


def _is_socket_of(fd: int, type: int, listening: int) -> bool:
    """libsystemd's is_socket_internal(): a socket, of ``type`` (0: any), listening or not (-1: either)."""
    if fd < 0:
        raise _error(errno.EBADF)
    if type < 0:
        raise _error(errno.EINVAL)
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        return False
    if type == 0 and listening < 0:
        return True
    with _borrowed(fd) as sock:
        if type != 0 and sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) != type:
            return False
        if listening >= 0 and bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)) != bool(listening):
            return False
    return True


def _same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    """systemd's stat_inode_same(): same device, inode number and file type."""
    return stat.S_IFMT(a.st_mode) != 0 and stat.S_IFMT(a.st_mode) == stat.S_IFMT(b.st_mode) \
        and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def is_fifo(fileobj: Any, path: Any = None) -> bool:
    """True when the descriptor is a FIFO or a pipe (and, with ``path``, that FIFO); sd_is_fifo(3)."""
    fd, raw = _fd(fileobj), _c_path(path)
    with _raised_as_libsystemd(raw):
        if fd < 0:
            raise _error(errno.EBADF)
        st = os.fstat(fd)
        if not stat.S_ISFIFO(st.st_mode):
            return False
        if raw is None:
            return True
        try:
            other = os.stat(raw)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return _same_inode(st, other)


def is_socket(fileobj: Any, family: int = socket.AF_UNSPEC, type: int = 0, listening: int = -1) -> bool:
    """True when the descriptor is a socket of that family, type and listening state; sd_is_socket(3).

    ``family`` 0 (AF_UNSPEC) and ``type`` 0 match any; ``listening`` -1 matches either state.
    """
    fd, family, type, listening = _fd(fileobj), _c_int(family), _c_int(type), _c_int(listening)
    with _raised_as_libsystemd():
        if fd < 0:
            raise _error(errno.EBADF)
        if family < 0:
            raise _error(errno.EINVAL)
        if not _is_socket_of(fd, type, listening):
            return False
        return family == 0 or _socket_name(fd)[0] == family


def is_socket_inet(fileobj: Any, family: int = socket.AF_UNSPEC, type: int = 0, listening: int = -1,
                   port: int = 0) -> bool:
    """True for an AF_INET/AF_INET6 socket (of ``family`` unless 0), on ``port`` unless 0; sd_is_socket_inet(3)."""
    fd, family, type, listening, port = _fd(fileobj), _c_int(family), _c_int(type), _c_int(listening), _c_int(port)
    if not 0 <= port <= 0xFFFF:
        raise ValueError("port must fit into uint16_t")
    with _raised_as_libsystemd():
        if fd < 0:
            raise _error(errno.EBADF)
        if family not in (0, socket.AF_INET, socket.AF_INET6):
            raise _error(errno.EINVAL)
        if not _is_socket_of(fd, type, listening):
            return False
        sock_family, address = _socket_name(fd)
        if sock_family not in (socket.AF_INET, socket.AF_INET6) or family not in (0, sock_family):
            return False
        return port == 0 or address[1] == port


def is_socket_unix(fileobj: Any, type: int = 0, listening: int = -1, path: Any = None) -> bool:
    """True for an AF_UNIX socket, bound to ``path`` when given ("" : unnamed); sd_is_socket_unix(3)."""
    fd, type, listening, raw = _fd(fileobj), _c_int(type), _c_int(listening), _c_path(path)
    with _raised_as_libsystemd(raw):
        if fd < 0:
            raise _error(errno.EBADF)
        if not _is_socket_of(fd, type, listening):
            return False
        sock_family, name = _socket_name(fd)
        if sock_family != socket.AF_UNIX:
            return False
        if raw is None:
            return True
        # Python gives an unnamed socket as "", an abstract one as bytes, a path as str.
        return isinstance(name, str) and os.fsencode(name) == raw


class _Target(NamedTuple):
    """A parsed is_socket_sockaddr() address; port 0 and scope_id 0 match any."""

    family: int
    packed: bytes
    port: int
    scope_id: int = 0


_IN6ADDR_ANY = bytes(16)


def _safe_atou(text: bytes) -> int:
    """python-systemd's safe_atou(): strtoul() in base 0, all of the text, a leading '-' refused."""
    value, end = protocol.strto(text, 0)
    if end and abs(value) > ULONG_MAX:
        raise _error(errno.ERANGE)
    if end == 0 or end != len(text):
        raise _error(errno.EINVAL)
    if text[:1] == b"-":
        raise _error(errno.ERANGE)
    value %= ULONG_MAX + 1
    if value > UINT_MAX:
        raise _error(errno.ERANGE)
    return value


def _port(text: bytes) -> int:
    port = _safe_atou(text)
    if not 0 < port <= 0xFFFF:
        raise _error(errno.EINVAL)
    return port


def _pton(family: int, text: bytes) -> bytes | None:
    try:
        return socket.inet_pton(family, text.decode("utf-8"))
    except OSError:
        return None


def _host(text: bytes, port: int) -> _Target:
    """An IPv4 address, or else an interface name (any IPv6 address on that interface)."""
    packed = _pton(socket.AF_INET, text)
    if packed is not None:
        return _Target(socket.AF_INET, packed, port)
    if len(text) > IFNAMSIZ - 1:
        raise _error(errno.EINVAL)
    try:
        index = socket.if_nametoindex(text.decode("utf-8"))
    except OSError:
        raise _error(errno.EINVAL) from None
    return _Target(socket.AF_INET6, _IN6ADDR_ANY, port, index)


def _parse_sockaddr(text: bytes) -> _Target:
    """python-systemd's parse_sockaddr(): ``[IPv6]:PORT``, ``IPv4:PORT``, ``IFNAME:PORT``, no port, or ``PORT``."""
    if text[:1] == b"[":
        end = text.find(b"]", 1)
        if end < 0:
            raise _error(errno.EINVAL)
        packed = _pton(socket.AF_INET6, text[1:end])
        rest = text[end + 1:]
        if packed is None or rest[:1] not in (b"", b":"):
            raise _error(errno.EINVAL)
        return _Target(socket.AF_INET6, packed, _port(rest[1:]) if rest else 0)
    host, colon, port_text = text.partition(b":")
    if colon:
        return _host(host, _port(port_text))
    try:
        port = _safe_atou(text)
    except OSError:
        return _host(text, 0)
    if not 0 < port <= 0xFFFF:
        raise _error(errno.EINVAL)
    if os.access("/proc/net/if_inet6", os.F_OK):
        return _Target(socket.AF_INET6, _IN6ADDR_ANY, port)
    return _Target(socket.AF_INET, bytes(4), port)


def _matches(target: _Target, flowinfo: int, name: Any) -> bool:
    """sd_is_socket_sockaddr()'s comparison of a parsed address with getsockname()'s."""
    if target.port and name[1] != target.port:
        return False
    if target.family == socket.AF_INET6:
        # python-systemd stores flowinfo unconverted and libsystemd compares it with the raw
        # (network order) field; socket.getsockname() gives that field in host order.
        if flowinfo and socket.htonl(name[2]) != flowinfo % 2**32:
            return False
        if target.scope_id and name[3] != target.scope_id:
            return False
    return socket.inet_pton(target.family, name[0]) == target.packed


def is_socket_sockaddr(fileobj: Any, address: str, type: int = 0, flowinfo: int = 0, listening: int = -1) -> bool:
    """True for an IP socket bound to ``address`` (ListenStream= syntax, port optional); sd_is_socket_sockaddr(3).

    A malformed address raises ValueError("Cannot parse address") (OSError(ERANGE) for a
    port too large for strtoul), as python-systemd does.
    """
    fd, text = _fd(fileobj), _c_string(address, "is_socket_sockaddr() argument 2")
    type, flowinfo, listening = _c_int(type), _c_int(flowinfo), _c_int(listening)
    try:
        target = _parse_sockaddr(text)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise ValueError("Cannot parse address") from None
        raise
    if flowinfo and target.family != socket.AF_INET6:
        raise ValueError("flowinfo is only applicable to IPv6 addresses")
    with _raised_as_libsystemd():
        if fd < 0:
            raise _error(errno.EBADF)
        if not _is_socket_of(fd, type, listening):
            return False
        sock_family, name = _socket_name(fd)
        return sock_family == target.family and _matches(target, flowinfo, name)


@functools.lru_cache(maxsize=None)
def _mq_getattr() -> Callable[[int, Any], int]:
    """libc's mq_getattr() (in libc since glibc 2.34 and in musl, in librt before)."""
    import ctypes  # only for is_mq(): Python has no message queue calls of its own
    import ctypes.util

    for name in (None, ctypes.util.find_library("rt")):
        try:
            function = ctypes.CDLL(name, use_errno=True).mq_getattr
        except (OSError, AttributeError):
            continue
        function.argtypes = [ctypes.c_int, ctypes.c_void_p]
        function.restype = ctypes.c_int
        return function  # type: ignore[no-any-return]
    raise _error(errno.ENOSYS)


def _is_message_queue(fd: int) -> bool:
    import ctypes

    attributes = (ctypes.c_long * 8)()  # struct mq_attr: four longs and four reserved
    if _mq_getattr()(fd, attributes) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EBADF:  # an open descriptor that is not a queue
        return False
    raise _error(err)


def is_mq(fileobj: Any, path: Any = None) -> bool:
    """True for a POSIX message queue (and, with ``path`` such as "/name", that queue in /dev/mqueue); sd_is_mq(3)."""
    fd, raw = _fd(fileobj), _c_path(path)
    with _raised_as_libsystemd(raw):
        if fd < 0:
            raise _error(errno.EBADF)
        os.get_inheritable(fd)  # fcntl(F_GETFD): EBADF for a descriptor that is not open
        if not _is_message_queue(fd):
            return False
        if raw is None:
            return True
        if not raw.startswith(b"/"):
            raise _error(errno.EINVAL)
        st = os.fstat(fd)
        return _same_inode(st, os.stat(MQUEUE_MOUNT + raw))


def booted() -> bool:
    """True when the system runs under systemd (/run/systemd/system/ exists); sd_booted(3)."""
    if os.access(BOOTED_PATH, os.F_OK, follow_symlinks=False):
        return True
    with _raised_as_libsystemd():
        try:
            os.lstat(BOOTED_PATH)
        except FileNotFoundError:
            return False
    raise _error(errno.EACCES)  # there for our effective ids, not for the real ones access() checks


# ----------------------------------------------------------------------- LISTEN_*
def _inherited(unset_environment: bool, with_names: bool) -> list[tuple[int, str]]:
    try:
        return protocol.inherited_fds(os.environ, unset_environment, with_names)
    except OSError as exc:
        if exc.errno is None:
            raise
        raise _error(exc.errno) from exc  # the chained ProtocolError says which variable is wrong


def listen_fds(unset_environment: bool = True) -> list[int]:
    """The descriptors passed by socket activation, ``[3, 4, ...]`` ([] when none are for us); sd_listen_fds(3).

    They get close-on-exec; LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES are removed unless
    ``unset_environment`` is false, even on error. Malformed variables raise OSError
    (EINVAL, ERANGE; EBADF when a descriptor is not open).
    """
    return [fd for fd, _ in _inherited(bool(unset_environment), with_names=False)]


def listen_fds_with_names(unset_environment: bool = True) -> dict[int, str]:
    """``{fd: name}`` of the passed descriptors, names from LISTEN_FDNAMES ("unknown" without it).

    sd_listen_fds_with_names(3); the same side effects and errors as :func:`listen_fds`.
    """
    pairs = _inherited(bool(unset_environment), with_names=True)
    # python-systemd decodes the names as strict UTF-8 (UnicodeDecodeError otherwise).
    return {fd: os.fsencode(name).decode("utf-8") for fd, name in pairs}


# ------------------------------------------------------------------------- notify
def _notify_address(value: str) -> bytes:
    """NOTIFY_SOCKET as libsystemd's sockaddr_un_set_path() takes it: "/path" or "@abstract"."""
    raw = os.fsencode(value)
    if len(raw) < 2 or raw[:1] not in (b"/", b"@"):
        raise _error(errno.EINVAL)
    if len(raw) + 1 > SUN_PATH_SIZE:
        raise _error(errno.EINVAL if raw[:1] == b"@" else errno.ENAMETOOLONG)
    return b"\0" + raw[1:] if raw[:1] == b"@" else raw


def _descriptors(fds: Any) -> list[int]:
    """``fds`` as python-systemd reads it: a sequence (len() and indexing) of C ints."""
    if isinstance(fds, dict):
        raise TypeError("dict is not a sequence")
    numbers = []
    for i in range(len(fds)):  # TypeError without len(), as PySequence_Length()
        number = _c_long(fds[i])
        if not INT_MIN <= number <= INT_MAX:
            raise OverflowError("Value to large for an integer")
        numbers.append(number)
    return numbers


def _grow_send_buffer(sock: socket.socket) -> None:
    """libsystemd's fd_inc_sndbuf(): SO_SNDBUF, then SO_SNDBUFFORCE if the kernel capped it; best effort."""
    try:
        for option in (socket.SO_SNDBUF, SO_SNDBUFFORCE):
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 2 * SNDBUF_SIZE:
                return
            sock.setsockopt(socket.SOL_SOCKET, option, SNDBUF_SIZE)
    except OSError:
        pass  # SO_SNDBUFFORCE needs CAP_NET_ADMIN; a long message may then fail with ENOBUFS


def _credentials(pid: int) -> list[tuple[int, int, bytes]]:
    """SCM_CREDENTIALS as sd_pid_notify() sends them: only for another pid, or when set-uid/set-gid."""
    if (pid == 0 or pid == os.getpid()) and os.getuid() == os.geteuid() and os.getgid() == os.getegid():
        return []
    return [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, _UCRED.pack(pid or os.getpid(), os.getuid(), os.getgid()))]


def _send(state: bytes, pid: int, fds: list[int], address: bytes) -> None:
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    credentials = _credentials(pid)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        _grow_send_buffer(sock)
        if credentials:
            try:
                sock.sendmsg([state], rights + credentials, socket.MSG_NOSIGNAL, address)
                return
            except OSError:
                pass  # a pid not ours needs CAP_SYS_ADMIN (EPERM): libsystemd sends as itself then
        sock.sendmsg([state], rights, socket.MSG_NOSIGNAL, address)


def notify(status: str, unset_environment: bool = False, pid: int = 0, fds: Sequence[int] = ()) -> bool:
    """Send ``status`` ("READY=1", "STATUS=...\\nWATCHDOG=1", ...) to $NOTIFY_SOCKET; sd_pid_notify_with_fds(3).

    Returns False without NOTIFY_SOCKET, True once sent; raises OSError when it is malformed
    or the message cannot be sent. ``pid`` other than ours goes as SCM_CREDENTIALS (the
    kernel allows it with CAP_SYS_ADMIN; otherwise it is sent again as ourselves), for
    ``MAINPID=``. ``fds``, a sequence of descriptor numbers, go as SCM_RIGHTS (``FDSTORE=1``);
    an explicit ``fds=None`` is a TypeError, as in python-systemd. ``unset_environment``
    removes NOTIFY_SOCKET afterwards, whatever happened.
    """
    state = _c_string(status, "notify() argument 1")
    unset = bool(unset_environment)
    pid = _c_int(pid)
    if pid < 0:
        raise OverflowError("Bad pid_t")
    numbers = _descriptors(fds)
    value = os.environ.get("NOTIFY_SOCKET")
    if value is None:
        return False
    try:
        with _raised_as_libsystemd():
            _send(state, pid, numbers, _notify_address(value))
        return True
    finally:
        if unset:
            os.environ.pop("NOTIFY_SOCKET", None)
