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

import array
import os
import select
import selectors
import shutil
import signal
import socket
import struct
import tempfile
import time
from dataclasses import dataclass, field

NOTIFY_BUFFER_MAX = 4096  # systemd's PIPE_BUF-sized datagrams; longer ones are dropped
NOTIFY_FD_MAX = 768  # descriptors per message, as systemd
RECEIVE_BATCH = 64  # messages handled per wake-up
DEFAULT_STORED_NAME = "stored"
_UCRED = struct.Struct("3i")


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


class NotifySocket:
    """A datagram socket daemons send sd_notify messages to, with the sender's credentials on each."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="activator-notify-")
        os.chmod(self.directory, 0o711)  # a daemon running as another user reaches the socket, lists nothing
        self.path = os.path.join(self.directory, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            if len(os.fsencode(self.path)) < 108:
                self.sock.bind(self.path)
                os.chmod(self.path, 0o666)
                self.address = self.path
            else:  # TMPDIR too long for sun_path: the abstract namespace
                name = f"activator-notify/{os.getpid()}/{os.path.basename(self.directory)}"
                self.sock.bind("\0" + name)
                self.address = "@" + name
        except BaseException:
            self.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> NotifyMessage | None:
        """The next message, None when there is none. Truncated messages are dropped (their fds closed)."""
        anc_size = socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(4 * NOTIFY_FD_MAX)
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
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                    fds.extend(arr)
                elif kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
                    cred = _UCRED.unpack(payload[: _UCRED.size])
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
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass(eq=False)
class _Run:
    """What we know about one run of a unit's daemon."""

    pid: int
    ready: bool = False
    status: str | None = None
    start_timer: list | None = None
    start_deadline: float = 0.0
    watchdog_timer: list | None = None
    watchdog_usec: int = 0
    pidfd: int | None = None  # watching a MAINPID= that is not our child


@dataclass(eq=False)
class StoredFd:
    name: str
    fd: int
    key: tuple[int, int]
    polled: bool


class NotifyHub:
    """The engine's side of sd_notify: readiness, status, MAINPID, the watchdog and the fd store.

    Units get a NOTIFY_SOCKET when their service is ``type = "notify"``, has a watchdog
    or has a descriptor store (Accept=no units only). Messages are accepted only from the
    unit's main process and its descendants (sender pid from SCM_CREDENTIALS).
    """

    def __init__(self, engine) -> None:
        self.engine = engine
        self.socket: NotifySocket | None = None
        self.runs: dict[int, _Run] = {}  # id(UnitState) -> _Run
        self.stores: dict[str, list[StoredFd]] = {}  # unit name -> stored descriptors, in arrival order
        self._hup: select.epoll | None = None  # stored descriptors, watched for EPOLLHUP/EPOLLERR only

    # ------------------------------------------------------------- hooks
    @staticmethod
    def wants(unit) -> bool:
        svc = unit.service
        return not unit.accept and (svc.type == "notify" or svc.watchdog_sec > 0 or svc.file_descriptor_store_max > 0)

    def service_env(self, us) -> dict[str, str]:
        """NOTIFY_SOCKET (and WATCHDOG_USEC) for the daemon about to start."""
        if not self.wants(us.unit):
            return {}
        if self.socket is None:
            self.socket = NotifySocket()
            self.engine.sel.register(self.socket.fileno(), selectors.EVENT_READ, self._on_readable)
        env = {"NOTIFY_SOCKET": self.socket.address}
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
        if not self.wants(us.unit):
            return
        if 0 < svc.watchdog_sec < float("inf"):
            run.watchdog_usec = int(svc.watchdog_sec * 1_000_000)
        if svc.type == "notify":
            if 0 < svc.timeout_start < float("inf"):
                self._set_start_timer(us, run, time.monotonic() + svc.timeout_start)
        elif run.watchdog_usec:
            self._arm_watchdog(us, run)  # a notify daemon's watchdog starts at READY=1

    def exited(self, us) -> None:
        self._forget(us)

    def close(self) -> None:
        for run in self.runs.values():
            self._cancel(run)
        self.runs.clear()
        for name in list(self.stores):
            self._drop_store(name)
        if self._hup is not None:
            self._unregister(self._hup.fileno())
            self._hup.close()
            self._hup = None
        if self.socket is not None:
            self._unregister(self.socket.fileno())
            self.socket.close()
            self.socket = None

    def drop_unit(self, name: str) -> None:
        """A unit removed by a reload: its stored descriptors are closed."""
        self._drop_store(name)

    # ----------------------------------------------------------- internals
    def _unregister(self, fd: int) -> None:
        try:
            self.engine.sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _cancel(self, run: _Run) -> None:
        from .supervisor import Timers

        Timers.cancel(run.start_timer)
        Timers.cancel(run.watchdog_timer)
        run.start_timer = run.watchdog_timer = None
        if run.pidfd is not None:
            self._unregister(run.pidfd)
            os.close(run.pidfd)
            run.pidfd = None

    def _forget(self, us) -> None:
        run = self.runs.pop(id(us), None)
        if run is not None:
            self._cancel(run)

    def _set_start_timer(self, us, run: _Run, deadline: float) -> None:
        from .supervisor import Timers

        Timers.cancel(run.start_timer)
        run.start_deadline = deadline
        run.start_timer = self.engine.timers.add(deadline, lambda: self._start_timeout(us, run))

    def _arm_watchdog(self, us, run: _Run) -> None:
        from .supervisor import Timers

        Timers.cancel(run.watchdog_timer)
        run.watchdog_timer = None
        if run.watchdog_usec > 0:
            when = time.monotonic() + run.watchdog_usec / 1e6
            run.watchdog_timer = self.engine.timers.add(when, lambda: self._watchdog_fired(us, run))

    def _current(self, us, run: _Run) -> bool:
        return self.runs.get(id(us)) is run and us.main_pid is not None and not self.engine.stopping

    def _start_timeout(self, us, run: _Run) -> None:
        run.start_timer = None
        if not self._current(us, run) or run.ready:
            return
        timeout = us.unit.service.timeout_start
        self.engine.log.warning("start-timeout", f"no READY=1 within {timeout:g}s, stopping", unit=us.name, pid=us.main_pid)
        self.engine._stop_unit(us, reason="timeout")

    def _watchdog_fired(self, us, run: _Run) -> None:
        run.watchdog_timer = None
        if not self._current(us, run):
            return
        from .supervisor import Timers

        self.engine.log.warning(
            "watchdog", f"watchdog timeout (no WATCHDOG=1 within {run.watchdog_usec / 1e6:g}s), sending SIGABRT",
            unit=us.name, pid=us.main_pid,
        )
        us.forced = "watchdog"
        self.engine._signal_unit(us, signal.SIGABRT)
        timeout = us.unit.service.timeout_stop
        Timers.cancel(us.kill_timer)
        if timeout != float("inf"):
            us.kill_timer = self.engine.timers.add(time.monotonic() + timeout, lambda: self.engine._kill_unit(us))

    def _owner(self, pid: int):
        """The unit whose main process is ``pid`` or an ancestor of it; None when no daemon of ours sent it."""
        us = self.engine.pids.get(pid)
        if us is not None:
            return us if pid == us.main_pid and self.wants(us.unit) else None
        from . import processes

        candidates = {u for u in self.engine.pids.values() if u.main_pid and self.wants(u.unit)}
        if not candidates:
            return None
        parents = processes.parent_map()
        for u in candidates:
            if pid in processes.descendants({u.main_pid}, parents):
                return u
        return None

    def _on_readable(self) -> None:
        if self.socket is None:
            return
        for _ in range(RECEIVE_BATCH):
            message = self.socket.receive()
            if message is None:
                return
            try:
                us = self._owner(message.pid)
                if us is None:
                    self.engine.log.debug("notify", f"ignored a message from pid {message.pid}: not a daemon of ours")
                    continue
                self._handle(us, message)
            finally:
                message.close_fds()

    def _handle(self, us, message: NotifyMessage) -> None:
        log = self.engine.log
        run = self.runs.get(id(us))
        if run is None:
            return
        svc = us.unit.service
        main_pid = message.get("MAINPID")
        if main_pid is not None:
            self._main_pid(us, run, main_pid)
        status = message.get("STATUS")
        if status is not None and status != run.status:
            run.status = status
            log.info("status", f"status: {status}", unit=us.name, pid=message.pid)
        if message.get("EXTEND_TIMEOUT_USEC") is not None and not run.ready and run.start_timer is not None:
            try:
                extra = int(message.get("EXTEND_TIMEOUT_USEC")) / 1e6
            except ValueError:
                extra = 0.0
            if time.monotonic() + extra > run.start_deadline:
                self._set_start_timer(us, run, time.monotonic() + extra)
        if message.get("READY") == "1" and not run.ready:
            run.ready = True
            from .supervisor import Timers

            Timers.cancel(run.start_timer)
            run.start_timer = None
            log.info("ready", "ready", unit=us.name, pid=us.main_pid)
            if run.watchdog_usec:
                self._arm_watchdog(us, run)
        if message.get("RELOADING") == "1":
            log.info("reloading", "reloading", unit=us.name, pid=message.pid)
        if message.get("STOPPING") == "1":
            log.info("stopping", "stopping", unit=us.name, pid=message.pid)
        if message.get("ERRNO") is not None:
            log.info("errno", f"errno: {message.get('ERRNO')}", unit=us.name, pid=message.pid)
        new_usec = message.get("WATCHDOG_USEC")
        if new_usec is not None:
            try:
                value = int(new_usec)
            except ValueError:
                value = -1
            if value > 0:
                run.watchdog_usec = value
                self._arm_watchdog(us, run)
        watchdog = message.get("WATCHDOG")
        if watchdog == "1" and run.watchdog_timer is not None:
            self._arm_watchdog(us, run)
        elif watchdog == "trigger":
            from .supervisor import Timers

            Timers.cancel(run.watchdog_timer)
            self._watchdog_fired(us, run)
        if message.get("FDSTOREREMOVE") == "1":
            name = message.get("FDNAME")
            if name:
                self._remove_stored(us.name, name)
        if message.get("FDSTORE") == "1" and message.fds:
            self._store(us, message)

    def _main_pid(self, us, run: _Run, text: str) -> None:
        from . import processes

        log = self.engine.log
        try:
            new = int(text)
        except ValueError:
            log.warning("notify", f"ignored invalid MAINPID={text!r}", unit=us.name)
            return
        old = us.main_pid
        if new == old:
            return
        if new <= 0 or new not in processes.descendants({old}):
            log.warning("notify", f"ignored MAINPID={new}: not a process of this daemon", unit=us.name)
            return
        self.engine.pids.pop(old, None)
        us.instances[old] = None  # the former main process is still ours to reap and to stop
        self.engine.pids[old] = us
        us.main_pid = new
        self.engine.pids[new] = us
        run.pid = new
        log.info("main-pid", f"main pid is now {new}", unit=us.name, pid=new)
        if processes.parent_map().get(new) != os.getpid():
            self._watch_foreign(us, run, new)

    def _watch_foreign(self, us, run: _Run, pid: int) -> None:
        """A main process that is not our child: its exit comes through a pidfd (its parent reaps it)."""
        try:
            fd = os.pidfd_open(pid)
        except (OSError, AttributeError):
            return
        run.pidfd = fd
        self.engine.sel.register(fd, selectors.EVENT_READ, lambda: self._foreign_exited(us, run, pid))

    def _foreign_exited(self, us, run: _Run, pid: int) -> None:
        if run.pidfd is not None:
            self._unregister(run.pidfd)
            os.close(run.pidfd)
            run.pidfd = None
        if us.main_pid != pid or self.engine.pids.get(pid) is not us:
            return
        try:
            reaped, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            reaped, status = pid, 0  # reaped by its own parent: its status is not ours to know
        if reaped == 0:
            return  # our child after all: SIGCHLD brings it
        self.engine.pids.pop(pid, None)
        self.engine._main_exited(us, pid, status)
        if not us.pids():
            self.engine._unit_idle(us)
        if self.engine.stopping:
            self.engine._check_stopped()  # it may have been the last process we waited for

    # ------------------------------------------------------------- fd store
    def _store(self, us, message: NotifyMessage) -> None:
        log = self.engine.log
        limit = us.unit.service.file_descriptor_store_max
        if limit <= 0:
            log.warning("fdstore", f"{len(message.fds)} descriptor(s) sent with FDSTORE=1 but "
                        "file-descriptor-store-max is 0: closed", unit=us.name)
            return
        from .protocol import valid_fdname

        name = message.get("FDNAME") or DEFAULT_STORED_NAME
        if not valid_fdname(name):
            log.warning("fdstore", f"invalid FDNAME={name!r}: descriptors closed", unit=us.name)
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
                log.warning("fdstore", f"descriptor store full ({limit}): descriptor closed", unit=us.name)
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
            log.info("fdstore", f"stored {len(kept)} descriptor(s) as {name!r} ({len(store)} in store)", unit=us.name)

    def _watch_stored(self, fd: int) -> None:
        if self._hup is None:
            self._hup = select.epoll()
            self.engine.sel.register(self._hup.fileno(), selectors.EVENT_READ, self._on_hup)
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
                self.engine.log.info("fdstore", f"stored descriptor {item.name!r} hung up: removed", unit=name)

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
            self.engine.log.info("fdstore", f"removed {len(gone)} stored descriptor(s) named {name!r}", unit=unit_name)

    def _drop_store(self, name: str) -> None:
        for item in self.stores.pop(name, []):
            self._close_stored(item)
