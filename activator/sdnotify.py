"""The sd_notify(3) protocol, both sides.

Daemon side: sending is :func:`activator.daemon.notify` (python-systemd's
``notify()``, libsystemd's ``sd_pid_notify_with_fds()``); :func:`notify` here takes one
assignment per argument, for activator's own ``READY=1``; :func:`watchdog_usec` is
``sd_watchdog_enabled()``.

Launcher side: :class:`NotifySocket` is the engine's one ``AF_UNIX``/``SOCK_DGRAM``
socket (``SO_PASSCRED``, in a private directory), and :class:`NotifyHub` holds
all the logic the engine needs for ``type = "notify"``, the watchdog and the
file descriptor store; the engine only calls its hooks (``service_env``,
``stored_fds``, ``started``, ``exited``, ``close``).
"""
from __future__ import annotations

import os
import select
from . import signalapi as signal
from . import socketapi as socket
from functools import partial

from .records import dataclass, field
from . import processes
from .loop import TimerHandle, cancel
from .protocol import valid_fdname
from .ratelimit import RateLimit
from .values import bounded_usec

TYPE_CHECKING = False  # typing is not imported at run time (start-up, memory); type checkers see it
if TYPE_CHECKING:
    from typing import Any

NOTIFY_BUFFER_MAX = 4096  # systemd's PIPE_BUF-sized datagrams; longer ones are dropped
NOTIFY_FD_MAX = 768  # descriptors per message, as systemd
RECEIVE_BATCH = 64  # messages handled per wake-up
DEFAULT_STORED_NAME = "stored"
STRANGER_BURST = 200  # messages per second from processes that are not ours before we stop looking them up
ANCESTRY_MAX = 32  # how far up a sender's ancestry we look for the unit's main process
STATUS_MAX = 1024  # characters of STATUS= kept and logged


# ---------------------------------------------------------------- daemon side
def notify(*assignments: str, fds: list[int] | tuple[int, ...] = (), unset_environment: bool = False) -> bool:
    """:func:`activator.daemon.notify` with one assignment per argument (activator's own READY=1)."""
    from . import daemon

    return daemon.notify("\n".join(assignments), unset_environment, fds=fds)


def watchdog_usec(unset_environment: bool = False) -> int:
    """The watchdog interval our supervisor expects WATCHDOG=1 within, in µs; 0 when none (sd_watchdog_enabled)."""
    try:
        text = os.environ.get("WATCHDOG_USEC")
        if not text:
            return 0
        usec = int(text)
        if usec <= 0:
            raise OSError(22, f"invalid WATCHDOG_USEC={text!r}")
        pid_text = os.environ.get("WATCHDOG_PID")
        if pid_text and int(pid_text) != os.getpid():
            return 0
        return usec
    except ValueError:
        raise OSError(22, "invalid WATCHDOG_USEC or WATCHDOG_PID") from None
    finally:
        if unset_environment:
            os.environ.pop("WATCHDOG_USEC", None)
            os.environ.pop("WATCHDOG_PID", None)


# -------------------------------------------------------------- launcher side
@dataclass
class NotifyMessage:
    pid: int
    uid: int
    gid: int
    fields: list[tuple[str, str]]
    fds: list[int] = field(default_factory=list)

    def get(self, key: str) -> str | None:
        """The last value given for ``key`` (systemd reads the last one too)."""
        for k, v in reversed(self.fields):
            if k == key:
                return v
        return None

    def close_fds(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


def _remove_directory(directory: str) -> None:
    """Remove one of our notify directories (it holds only our sockets: no tree to walk)."""
    try:
        for name in os.listdir(directory):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass
        os.rmdir(directory)
    except OSError:
        pass


def _private_directory() -> str:
    """A directory of ours for notify sockets: 0711, so a daemon running as another user reaches the
    socket it is given (which is only its own user's, mode 0600) and lists nothing."""
    import tempfile  # here: only a unit with a notify socket pays for it (its imports cost ~1 MiB idle)

    directory = tempfile.mkdtemp(prefix="activator-notify-")
    if len(os.fsencode(directory)) > 90:  # leave room in sun_path (108 bytes) for the socket's name
        _remove_directory(directory)
        directory = tempfile.mkdtemp(prefix="activator-notify-", dir="/tmp")
    os.chmod(directory, 0o711)
    return directory


class NotifySocket:
    """A datagram socket daemons send sd_notify messages to, with the sender's credentials on each.

    ``owner`` (uid, gid): who may send to it besides root. The socket file is mode 0600 and
    owned by that user, so no other local user can reach it at all; the credentials of each
    message are checked against it too (abstract sockets, which have no permissions, are used
    only when no path fits in sun_path).
    """

    def __init__(self, directory: str | None = None, name: str = "notify", owner: tuple[int, int] = (-1, -1)) -> None:
        self.own_directory = directory is None
        self.directory = _private_directory() if directory is None else directory
        self.path = os.path.join(self.directory, name)
        self.owner = owner
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            if len(os.fsencode(self.path)) < 108:
                old = os.umask(0o177)
                try:
                    self.sock.bind(self.path)
                finally:
                    os.umask(old)
                if owner != (-1, -1):
                    os.chown(self.path, owner[0], owner[1], follow_symlinks=False)
                self.address = self.path
            else:  # TMPDIR too long for sun_path: the abstract namespace (credentials are still checked)
                abstract = f"activator-notify/{os.getpid()}/{os.path.basename(self.directory)}/{name}"
                self.sock.bind("\0" + abstract)
                self.address = "@" + abstract
        except BaseException:
            self.close()
            raise

    @classmethod
    def adopt(cls, fd: int, directory: str, path: str, address: str, owner: tuple[int, int]) -> "NotifySocket":
        """The socket we held before a re-exec (activator.reexec): bound already, its file in place."""
        self = cls.__new__(cls)
        self.own_directory = False
        self.directory, self.path, self.address, self.owner = directory, path, address, owner
        self.sock = socket.socket(fileno=fd)
        os.set_inheritable(fd, False)
        return self

    def fileno(self) -> int:
        return self.sock.fileno()

    def allowed(self, uid: int) -> bool:
        return uid == 0 or uid == os.getuid() or (self.owner[0] != -1 and uid == self.owner[0])

    def receive(self) -> NotifyMessage | None:
        """The next message, None when there is none. Truncated messages are dropped (their fds closed)."""
        anc_size = socket.CMSG_SPACE(processes.UCRED_SIZE) + socket.CMSG_SPACE(4 * NOTIFY_FD_MAX)
        while True:
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(NOTIFY_BUFFER_MAX, anc_size, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return None
            fds: list[int] = []
            cred = None
            for level, kind, payload in ancdata:
                if level != socket.SOL_SOCKET:
                    continue
                if kind == socket.SCM_RIGHTS:
                    fds.extend(processes.native_ints(payload))
                elif kind == socket.SCM_CREDENTIALS and len(payload) >= processes.UCRED_SIZE:
                    cred = processes.native_ints(payload[: processes.UCRED_SIZE])
            fields = []
            for line in data.decode("utf-8", "replace").split("\n"):
                key, sep, value = line.partition("=")
                if key and sep:
                    fields.append((key, value))
            message = NotifyMessage(cred[0] if cred else 0, cred[1] if cred else -1, cred[2] if cred else -1, fields, fds)
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or cred is None or cred[0] <= 0:
                message.close_fds()
                continue
            return message

    def close(self) -> None:
        self.sock.close()
        if self.own_directory:
            _remove_directory(self.directory)
        else:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def _positive_usec(text: str) -> float | None:
    """A daemon's µs count as seconds, bounded like configured time spans; None unless positive."""
    seconds = bounded_usec(text)
    return seconds if seconds else None


@dataclass(eq=False)
class _Run:
    """What we know about one run of a unit's daemon."""

    pid: int
    ready: bool = False
    status: str | None = None
    start_timer: TimerHandle | None = None
    start_deadline: float = 0.0
    watchdog_timer: TimerHandle | None = None
    watchdog_usec: int = 0


@dataclass(eq=False)
class StoredFd:
    name: str
    fd: int
    key: tuple[int, int]
    polled: bool


class NotifyHub:
    """The engine's side of sd_notify: readiness, status, MAINPID, the watchdog and the fd store.

    Units get a NOTIFY_SOCKET when their service is ``type = "notify"``, has a watchdog,
    a descriptor store or a notify-access (Accept=no units only): a socket of their own,
    which only the unit's user (and root) can send to. Messages are accepted from the
    unit's main process and its descendants; notify-access narrows that to the main process
    (``main``), to it and the unit's control commands (``exec``), or widens it to every
    process of the unit and their descendants (``all``); ``none`` accepts nothing. The
    sender is found in O(1) of the number of processes (our own table first, then a bounded
    walk up the sender's ancestry), and messages from senders that are not ours are
    rate-limited before any lookup.

    It drives the unit lifecycle only through the engine's public API.
    """

    def __init__(self, engine) -> None:
        self.engine = engine
        self.directory: str | None = None
        self.sockets: dict[str, NotifySocket] = {}  # unit name -> its socket
        self.runs: dict[int, _Run] = {}  # id(UnitState) -> _Run
        self.stores: dict[str, list[StoredFd]] = {}  # unit name -> stored descriptors, in arrival order
        self.strangers = RateLimit(1.0, STRANGER_BURST)  # messages not from a daemon of ours, per second
        self.dropped = 0
        self._hup: select.epoll | None = None  # stored descriptors, watched for EPOLLHUP/EPOLLERR only
        # pid -> pidfd of each MAINPID= that is not our child, kept until it exits (after its run too:
        # a former main process stays the unit's to reap)
        self.foreign: dict[int, int] = {}
        self._counter = 0

    @property
    def log(self):
        return self.engine.log

    @property
    def loop(self):
        return self.engine.loop

    # ------------------------------------------------------------- hooks
    @staticmethod
    def _key(us) -> str:
        """Whose socket: the unit's, or one per worker (``NAME/K``), so that each worker's messages are its own."""
        return f"{us.name}/{us.worker}" if us.worker else us.name

    def _socket_for(self, us) -> NotifySocket:
        key = self._key(us)
        sock = self.sockets.get(key)
        uid, gid, _ = us.credentials
        if sock is not None and sock.owner == (uid, gid):
            return sock
        if sock is not None:  # the unit's user changed (a reload): a new socket for the new owner
            self._close_socket(key)
        if self.directory is None:
            self.directory = _private_directory()
        self._counter += 1
        sock = NotifySocket(self.directory, f"n{self._counter}", (uid, gid))
        self.sockets[key] = sock
        self.loop.add_reader(sock.fileno(), lambda: self._on_readable(key, sock))
        return sock

    def socket_address(self, us) -> str | None:
        """The unit's NOTIFY_SOCKET, None when it gets none."""
        return self._socket_for(us).address if us.unit.notify_socket else None

    def service_env(self, us) -> dict[str, str]:
        """NOTIFY_SOCKET (and WATCHDOG_USEC) for the daemon about to start."""
        address = self.socket_address(us)
        if address is None:
            return {}
        env = {"NOTIFY_SOCKET": address}
        wd = us.unit.service.watchdog_sec
        if 0 < wd < float("inf"):
            env["WATCHDOG_USEC"] = str(int(wd * 1_000_000))
        return env

    def stored_fds(self, us) -> list[tuple[str, int]]:
        """(name, fd) of the unit's stored descriptors, passed after its sockets on the next start."""
        return [(s.name, s.fd) for s in self.stores.get(us.name, [])]

    def started(self, us, pid: int) -> None:
        self._forget(us)
        run = _Run(pid)
        self.runs[id(us)] = run
        svc = us.unit.service
        if not us.unit.notify_socket:
            return
        if 0 < svc.watchdog_sec < float("inf"):
            run.watchdog_usec = int(svc.watchdog_sec * 1_000_000)
        if svc.type == "notify":
            if 0 < svc.timeout_start < float("inf"):
                self._set_start_timer(us, run, self.engine.clock() + svc.timeout_start)
        elif run.watchdog_usec:
            self._arm_watchdog(us, run)  # a notify daemon's watchdog starts at READY=1

    def exited(self, us) -> None:
        self._forget(us)

    def close(self) -> None:
        for run in self.runs.values():
            self._cancel(run)
        self.runs.clear()
        for pid in list(self.foreign):
            self._unwatch_foreign(pid)
        for name in list(self.stores):
            self._drop_store(name)
        if self._hup is not None:
            self.loop.remove(self._hup.fileno())
            self._hup.close()
            self._hup = None
        for name in list(self.sockets):
            self._close_socket(name)
        if self.directory is not None:
            _remove_directory(self.directory)
            self.directory = None

    def export_state(self) -> tuple[dict[str, Any], list[int]]:
        """The notify sockets (by unit name), each running daemon's readiness, status and deadlines, the
        descriptor stores and the pidfds of MAINPID= processes that are not our children."""
        sockets = {name: {"fd": sock.fileno(), "path": sock.path, "address": sock.address, "owner": list(sock.owner)}
                   for name, sock in self.sockets.items()}
        runs = {}
        for us in self.engine.states():  # keyed as the sockets are: NAME, or NAME/K for worker K
            run = self.runs.get(id(us))
            if run is None:
                continue
            runs[self._key(us)] = {
                "pid": run.pid, "ready": run.ready, "status": run.status, "watchdog_usec": run.watchdog_usec,
                "start_deadline": run.start_deadline if run.start_timer is not None and run.start_timer.active else None,
                "watchdog_due": run.watchdog_timer.when if run.watchdog_timer is not None and run.watchdog_timer.active
                else None,
            }
        stores = {name: [{"name": s.name, "fd": s.fd, "key": list(s.key), "polled": s.polled} for s in store]
                  for name, store in self.stores.items() if store}
        state = {"directory": self.directory, "counter": self._counter, "sockets": sockets, "runs": runs,
                 "stores": stores, "foreign": [[pid, fd] for pid, fd in self.foreign.items()]}
        fds = [sock.fileno() for sock in self.sockets.values()] + [s.fd for store in self.stores.values() for s in store]
        return state, fds + list(self.foreign.values())

    def resume(self, state: dict[str, Any]) -> None:
        """After a re-exec: the same sockets (daemons keep their NOTIFY_SOCKET), runs and deadlines."""
        self.directory = state["directory"]
        self._counter = int(state["counter"])
        for name, entry in state["sockets"].items():
            sock = NotifySocket.adopt(int(entry["fd"]), str(self.directory), entry["path"], entry["address"],
                                      (int(entry["owner"][0]), int(entry["owner"][1])))
            self.sockets[name] = sock
            self.loop.add_reader(sock.fileno(), partial(self._on_readable, name, sock))
        for pid, fd in state["foreign"]:  # MAINPID= processes that are not our children: their pidfds
            os.set_inheritable(fd, False)
            owner = self.engine.unit_of_pid(pid)
            if owner is None:
                os.close(fd)
                continue
            self.foreign[pid] = fd
            self.loop.add_reader(fd, partial(self._foreign_exited, owner, pid), owner)
        for name, items in state["stores"].items():
            store = self.stores.setdefault(name, [])
            for item in items:
                fd = int(item["fd"])
                os.set_inheritable(fd, False)
                store.append(StoredFd(str(item["name"]), fd, (int(item["key"][0]), int(item["key"][1])),
                                      bool(item["polled"])))
                if item["polled"]:
                    self._watch_stored(fd)
        for key, entry in state["runs"].items():
            name, _, worker = key.partition("/")
            states = self.engine.states_of(name, int(worker) if worker.isdigit() else 0)
            if not states:
                continue
            us = states[0]
            run = _Run(int(entry["pid"]), bool(entry["ready"]), entry["status"], watchdog_usec=int(entry["watchdog_usec"]))
            self.runs[id(us)] = run
            if entry["start_deadline"] is not None:
                self._set_start_timer(us, run, float(entry["start_deadline"]))
            if entry["watchdog_due"] is not None:
                run.watchdog_timer = self.loop.call_at(float(entry["watchdog_due"]), partial(self._watchdog_fired, us, run),
                                                       us)

    def drop_unit(self, name: str) -> None:
        """A unit removed by a reload: its stored descriptors are closed, its socket too."""
        self._drop_store(name)
        for key in [k for k in self.sockets if k == name or k.startswith(name + "/")]:
            self._close_socket(key)

    # ----------------------------------------------------------- internals
    def _close_socket(self, name: str) -> None:
        sock = self.sockets.pop(name, None)
        if sock is not None:
            self.loop.remove(sock.fileno())
            sock.close()

    def _cancel(self, run: _Run) -> None:
        cancel(run.start_timer)
        cancel(run.watchdog_timer)
        run.start_timer = run.watchdog_timer = None

    def _forget(self, us) -> None:
        run = self.runs.pop(id(us), None)
        if run is not None:
            self._cancel(run)

    def _set_start_timer(self, us, run: _Run, deadline: float) -> None:
        cancel(run.start_timer)
        run.start_deadline = deadline
        run.start_timer = self.loop.call_at(deadline, lambda: self._start_timeout(us, run), us)

    def _arm_watchdog(self, us, run: _Run) -> None:
        cancel(run.watchdog_timer)
        run.watchdog_timer = None
        if run.watchdog_usec > 0:
            run.watchdog_timer = self.loop.call_later(run.watchdog_usec / 1e6, lambda: self._watchdog_fired(us, run), us)

    def _current(self, us, run: _Run) -> bool:
        return self.runs.get(id(us)) is run and us.main_pid is not None and not self.engine.stopping

    def _start_timeout(self, us, run: _Run) -> None:
        run.start_timer = None
        if not self._current(us, run) or run.ready:
            return
        timeout = us.unit.service.timeout_start
        self.log.warning("start-timeout", f"no READY=1 within {timeout:g}s, stopping", unit=us.name, pid=us.main_pid)
        self.engine.stop_unit(us, reason="timeout")

    def _watchdog_fired(self, us, run: _Run) -> None:
        run.watchdog_timer = None
        if not self._current(us, run) or us.forced is not None:
            return  # already being stopped: a WATCHDOG=trigger loop must not signal it again and again
        why = f"no WATCHDOG=1 within {run.watchdog_usec / 1e6:g}s" if run.watchdog_usec else "WATCHDOG=trigger"
        self.log.warning("watchdog", f"watchdog timeout ({why}), sending SIGABRT", unit=us.name, pid=us.main_pid)
        self.engine.stop_unit(us, reason="watchdog", sig=signal.SIGABRT)

    def _owner(self, key: str, pid: int):
        """The state of the unit (or worker) ``key`` whose main process ``pid`` is, or a descendant of it; else
        None. During a graceful restart two states share the key: the old daemon and the new one.

        O(1) in the number of processes: our own pid table first, then a walk up the
        sender's ancestry, at most ANCESTRY_MAX steps of one /proc read each.
        """
        name, _, worker = key.partition("/")
        states = [us for us in self.engine.states_of(name, int(worker or 0))
                  if us.main_pid is not None and us.unit.notify_socket and us.unit.service.notify_access != "none"]
        if not states:
            return None
        owner = self.engine.unit_of_pid(pid)
        if owner is not None:
            if owner not in states:
                return None
            access = owner.unit.service.notify_access
            mine = pid == owner.main_pid or access == "all" or (access == "exec" and pid in owner.jobs)
            return owner if mine else None
        states = [us for us in states if us.unit.service.notify_access not in ("main", "exec")]
        if not states:
            return None  # not a process of ours: only descendants are left, which these do not take
        if not self.strangers.allow(self.engine.clock()):
            return False  # a flood of messages from processes that are not ours: not even looked up
        current = pid
        for _ in range(ANCESTRY_MAX):
            parent = processes.parent_of(current)
            if parent is None or parent <= 1:
                return None
            for us in states:
                access = us.unit.service.notify_access
                if parent == us.main_pid or (access == "all" and self.engine.unit_of_pid(parent) is us):
                    return us
            if self.engine.unit_of_pid(parent) is not None:
                return None  # a process of ours that is not this unit's main process
            current = parent
        return None

    def _on_readable(self, name: str, sock: NotifySocket) -> None:
        for _ in range(RECEIVE_BATCH):
            message = sock.receive()
            if message is None:
                return
            try:
                if not sock.allowed(message.uid):
                    self.dropped += 1
                    continue
                us = self._owner(name, message.pid)
                if not us:
                    self.dropped += 1
                    if us is None:
                        self.log.debug("notify", f"ignored a message from pid {message.pid}: not a daemon of ours",
                                       unit=name)
                    continue
                self.loop.dispatch(lambda: self._handle(us, message), us)
            finally:
                message.close_fds()

    def _handle(self, us, message: NotifyMessage) -> None:
        run = self.runs.get(id(us))
        if run is None:
            return
        main_pid = message.get("MAINPID")
        if main_pid is not None:
            self._main_pid(us, run, main_pid)
        status = message.get("STATUS")
        if status is not None and status != run.status:
            run.status = status[:STATUS_MAX]
            self.log.info("status", f"status: {run.status}", unit=us.name, pid=message.pid)
        extend = message.get("EXTEND_TIMEOUT_USEC")
        if extend is not None and not run.ready and run.start_timer is not None:
            extra = _positive_usec(extend)
            if extra is None:
                self.log.warning("notify", f"ignored EXTEND_TIMEOUT_USEC={extend[:40]!r}: not a positive number of µs",
                                 unit=us.name)
            elif self.engine.clock() + extra > run.start_deadline:
                self._set_start_timer(us, run, self.engine.clock() + extra)
        if message.get("READY") == "1" and not run.ready:
            run.ready = True
            cancel(run.start_timer)
            run.start_timer = None
            self.log.info("ready", "ready", unit=us.name, pid=us.main_pid)
            self.engine.unit_ready(us)
            if run.watchdog_usec:
                self._arm_watchdog(us, run)
        for key, event in (("RELOADING", "reloading"), ("STOPPING", "stopping")):
            if message.get(key) == "1":
                self.log.info(event, event, unit=us.name, pid=message.pid)
        errno_text = message.get("ERRNO")
        if errno_text is not None:
            self.log.info("errno", f"errno: {errno_text[:40]}", unit=us.name, pid=message.pid)
        new_usec = message.get("WATCHDOG_USEC")
        if new_usec is not None:
            seconds = _positive_usec(new_usec)
            if seconds is None:
                self.log.warning("notify", f"ignored WATCHDOG_USEC={new_usec[:40]!r}: not a positive number of µs", unit=us.name)
            else:
                run.watchdog_usec = int(seconds * 1e6)
                self._arm_watchdog(us, run)
        watchdog = message.get("WATCHDOG")
        if watchdog == "1" and run.watchdog_timer is not None:
            self._arm_watchdog(us, run)
        elif watchdog == "trigger":
            cancel(run.watchdog_timer)
            self._watchdog_fired(us, run)
        if message.get("FDSTOREREMOVE") == "1":
            name = message.get("FDNAME")
            if name:
                self._remove_stored(us.name, name)
        if message.get("FDSTORE") == "1" and message.fds:
            self._store(us, message)

    def _main_pid(self, us, run: _Run, text: str) -> None:
        try:
            new = int(text) if text.isascii() and text.isdigit() and len(text) < 12 else -1
        except ValueError:
            new = -1
        if new == us.main_pid:
            return
        if new <= 0:
            self.log.warning("notify", f"ignored invalid MAINPID={text[:40]!r}", unit=us.name)
            return
        fd = None
        if processes.parent_of(new) != os.getpid():
            # Not our child: its exit comes through a pidfd (its parent reaps it). Opened before the
            # checks, so it names the process checked, and a process we cannot watch is refused.
            try:
                fd = os.pidfd_open(new)
            except (OSError, AttributeError):
                self.log.warning("notify", f"ignored MAINPID={new}: gone, or cannot be watched", unit=us.name)
                return
        if not self.engine.adopt_main_pid(us, new):
            if fd is not None:
                os.close(fd)
            self.log.warning("notify", f"ignored MAINPID={new}: not a process of this daemon", unit=us.name)
            return
        run.pid = new
        self.log.info("main-pid", f"main pid is now {new}", unit=us.name, pid=new)
        if fd is not None:
            self._unwatch_foreign(new)
            self.foreign[new] = fd
            self.loop.add_reader(fd, partial(self._foreign_exited, us, new), us)

    def _unwatch_foreign(self, pid: int) -> None:
        fd = self.foreign.pop(pid, None)
        if fd is not None:
            self.loop.remove(fd)
            os.close(fd)

    def _foreign_exited(self, us, pid: int) -> None:
        self._unwatch_foreign(pid)  # its own pidfd only: a readable pidfd left watched spins the loop
        if self.engine.unit_of_pid(pid) is not us:
            return
        try:
            reaped, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            reaped, status = pid, 0  # reaped by its own parent: its status is not ours to know
        if reaped == 0:
            return  # our child after all: SIGCHLD brings it
        self.engine.child_exited(pid, status)

    # ------------------------------------------------------------- fd store
    def _store(self, us, message: NotifyMessage) -> None:
        limit = us.unit.service.file_descriptor_store_max
        if limit <= 0:
            self.log.warning("fdstore", f"{len(message.fds)} descriptor(s) sent with FDSTORE=1 but "
                             "file-descriptor-store-max is 0: closed", unit=us.name)
            return
        name = message.get("FDNAME") or DEFAULT_STORED_NAME
        if not valid_fdname(name):
            self.log.warning("fdstore", f"invalid FDNAME={name[:80]!r}: descriptors closed", unit=us.name)
            return
        polled = message.get("FDPOLL") != "0"
        store = self.stores.setdefault(us.name, [])
        known = {s.key for s in store}
        kept = []
        for fd in message.fds:
            try:
                st = os.fstat(fd)
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in known:
                continue  # the same descriptor again (the daemon got it back and stored it anew)
            if len(store) >= limit:
                self.log.warning("fdstore", f"descriptor store full ({limit}): descriptor closed", unit=us.name)
                break
            os.set_inheritable(fd, False)
            item = StoredFd(name, fd, key, polled)
            store.append(item)
            known.add(key)
            kept.append(fd)
            if polled:
                self._watch_stored(fd)
        message.fds = [fd for fd in message.fds if fd not in kept]
        if kept:
            self.log.info("fdstore", f"stored {len(kept)} descriptor(s) as {name!r} ({len(store)} in store)", unit=us.name)

    def _watch_stored(self, fd: int) -> None:
        if self._hup is None:
            self._hup = select.epoll()
            self.loop.add_reader(self._hup.fileno(), self._on_hup)
        try:
            self._hup.register(fd, 0)  # no events asked: EPOLLHUP and EPOLLERR come anyway
        except OSError:
            pass

    def _on_hup(self) -> None:
        if self._hup is None:
            return
        dead = {fd for fd, _ in self._hup.poll(0)}
        for name, store in list(self.stores.items()):
            for item in [s for s in store if s.fd in dead]:
                store.remove(item)
                self._close_stored(item)
                self.log.info("fdstore", f"stored descriptor {item.name!r} hung up: removed", unit=name)

    def _close_stored(self, item: StoredFd) -> None:
        if item.polled and self._hup is not None:
            try:
                self._hup.unregister(item.fd)
            except (OSError, ValueError):
                pass
        try:
            os.close(item.fd)
        except OSError:
            pass

    def _remove_stored(self, unit_name: str, name: str) -> None:
        store = self.stores.get(unit_name, [])
        gone = [s for s in store if s.name == name]
        for item in gone:
            store.remove(item)
            self._close_stored(item)
        if gone:
            self.log.info("fdstore", f"removed {len(gone)} stored descriptor(s) named {name[:80]!r}", unit=unit_name)

    def _drop_store(self, name: str) -> None:
        for item in self.stores.pop(name, []):
            self._close_stored(item)
