"""Start a daemon under socket activation inside a test, and talk to it.

The way libnbd's ``nbd_connect_systemd_socket_activation`` runs qemu-nbd or nbdkit
as a captive subprocess: bind a socket (an ephemeral loopback port, or a unix
socket in a private temporary directory), start the daemon with it at fd 3 and an
exact ``LISTEN_PID``, capture its output, and stop and reap it at the end::

    from activator.testing import activate

    def test_nbdkit_greets():
        with activate(["nbdkit", "memory", "1M"]) as d:
            with d.connect() as c:
                assert c.recv(16) == b"NBDMAGICIHAVEOPT"

How: with ``accept=False`` (the default) the daemon is spawned directly from the
test process (:func:`activator.spawn.spawn`, the same path activator itself uses);
no activator process is involved. With ``accept=True`` an ``activator run --accept``
engine is started in a subprocess (``python -m activator``) with the socket passed
to it, and it starts one daemon instance per connection: ``.pid`` is then the
engine's, and ``.stderr`` holds the engine's log and the instances' stderr.
"""
from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from .records import dataclass
from .protocol import STRIP_ENV
from .spawn import SpawnSpec, resolve, spawn

if TYPE_CHECKING:
    from .sdnotify import NotifySocket

__all__ = ["Activated", "DaemonDied", "activate", "start"]

POLL = 0.05  # how often a blocked read checks that the daemon is still alive


class DaemonDied(RuntimeError):
    """The daemon exited before answering; carries its exit status and what it wrote on stderr."""

    def __init__(self, argv: Sequence[str], pid: int, returncode: int | None, stderr: str):
        self.argv = list(argv)
        self.pid = pid
        self.returncode = returncode
        self.stderr = stderr
        if returncode is None:
            how = "ended"
        elif returncode < 0:
            how = f"killed by signal {_signal_name(-returncode)}"
        else:
            how = f"exited with status {returncode}"
        tail = stderr.rstrip()
        super().__init__(f"{self.argv[0]} (pid {pid}) {how} before answering"
                         + (f"; its stderr:\n{tail}" if tail else " (no stderr output)"))


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return str(num)


class _Capture(threading.Thread):
    """Collects everything written to a pipe, until end of file."""

    def __init__(self, fd: int, name: str):
        super().__init__(name=name, daemon=True)
        self.fd = fd
        self.data = bytearray()
        self.lock = threading.Lock()

    def run(self) -> None:
        try:
            while True:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    break
                with self.lock:
                    self.data += chunk
        except OSError:
            pass

    def text(self) -> str:
        with self.lock:
            return self.data.decode("utf-8", "replace")


class Connection(socket.socket):
    """A connected socket whose blocking reads and writes raise :class:`DaemonDied` when the daemon has died
    (instead of waiting for a timeout), and whose first read raises it when the daemon closed the
    connection by dying before sending anything."""

    _activated: "Activated | None" = None
    _answered = False

    def _wait(self, write: bool) -> None:
        timeout = self.gettimeout()
        if timeout == 0:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = POLL if deadline is None else max(0.0, min(POLL, deadline - time.monotonic()))
            r, w, _ = select.select([] if write else [self], [self] if write else [], [], step)
            if r or w:
                return
            owner = self._activated
            if owner is not None and owner.returncode is not None:
                raise owner._died()
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("timed out")

    def _check_eof(self, data_len: int) -> None:
        if data_len:
            self._answered = True
            return
        owner = self._activated
        if not self._answered and owner is not None and not owner.accept:
            owner._exited.wait(0.5)  # a dying daemon's sockets close just before it can be reaped
            if owner.returncode is not None:
                raise owner._died()

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if not flags & socket.MSG_DONTWAIT:
            self._wait(False)
        data = super().recv(bufsize, flags)
        if bufsize:
            self._check_eof(len(data))
        return data

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:
        if not flags & socket.MSG_DONTWAIT:
            self._wait(False)
        n = super().recv_into(buffer, nbytes, flags)
        if nbytes or len(buffer):
            self._check_eof(n)
        return n

    def send(self, data, flags: int = 0) -> int:
        self._wait(True)
        return super().send(data, flags)

    def sendall(self, data, flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        while view:
            sent = self.send(view, flags)
            view = view[sent:]


class Activated:
    """A daemon started under socket activation, see :func:`activate`."""

    def __init__(self, argv: Sequence[str], listen=None, accept: bool = False, env: Mapping[str, str | None] | None = None,
                 timeout: float = 10.0, fdname: str | None = None, notify: bool = False, stop_timeout: float = 5.0):
        if isinstance(argv, str) or not argv:
            raise ValueError("argv must be a non-empty list of strings")
        self.argv = [os.fspath(a) for a in argv]
        self.accept = accept
        self.timeout = timeout
        self.stop_timeout = stop_timeout
        self.fdname = fdname
        self.pid: int = 0
        self.address: Any = None  # what socket.connect() takes: a path, or (host, port)
        self.status: str | None = None  # the last STATUS= (notify=True)
        self.tempdir: str | None = None
        self._listener: socket.socket | None = None
        self._exited = threading.Event()
        self._ready = threading.Event()
        self._status_value: int | None = None
        self._captures: list[_Capture] = []
        self._stderr: _Capture | None = None
        self._stdout: _Capture | None = None
        self._notify: NotifySocket | None = None
        self._notify_stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._want_notify = notify
        try:
            self._bind(listen)
            self._launch(env or {})
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ starting
    def _bind(self, listen) -> None:
        if listen is None or listen in ("tcp", "tcp4"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
        elif listen == "tcp6":
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.bind(("::1", 0))
        elif listen == "unix":
            self.tempdir = tempfile.mkdtemp(prefix="activator-test-")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(os.path.join(self.tempdir, "sock"))
        elif isinstance(listen, tuple):
            family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.bind(listen)
        elif isinstance(listen, str):
            from .addresses import parse_address
            from .sockets import open_socket
            from .units import BindSpec

            bound = open_socket(BindSpec(parse_address(listen), remove_on_stop=True))
            self._bound = bound
            sock = bound.sock
        else:
            raise ValueError(f"listen must be None, 'tcp', 'tcp6', 'unix', an address string or a (host, port) tuple, "
                             f"not {listen!r}")
        if sock.type != socket.SOCK_DGRAM:
            sock.listen(socket.SOMAXCONN)
        self._listener = sock
        name = sock.getsockname()
        if sock.family == socket.AF_UNIX:
            self.address = name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else name
            if isinstance(name, bytes) and name[:1] == b"\0":
                self.address = "\0" + name[1:].decode("utf-8", "surrogateescape")
        else:
            self.address = name[:2]

    def _environment(self, env: Mapping[str, str | None]) -> dict[str, str]:
        result = {k: v for k, v in os.environ.items() if k not in STRIP_ENV}
        for key, value in env.items():
            if value is None:
                result.pop(key, None)
            else:
                result[key] = str(value)
        return result

    def _launch(self, env: Mapping[str, str | None]) -> None:
        environment = self._environment(env)
        if self._want_notify:
            environment["NOTIFY_SOCKET"] = self._start_notify().address
        err_r, err_w = os.pipe()
        out_r, out_w = os.pipe()
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self._stderr = _Capture(err_r, "activator-testing-stderr")
        self._stdout = _Capture(out_r, "activator-testing-stdout")
        try:
            if self.accept:
                argv = [sys.executable, "-m", "activator", "run", "--accept"]
                if self.fdname:
                    argv += ["--fdname", self.fdname]
                argv += ["--", *self.argv]
                environment["PYTHONPATH"] = os.pathsep.join(
                    p for p in [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), environment.get("PYTHONPATH")] if p)
            else:
                argv = list(self.argv)
                if self.fdname:
                    environment["LISTEN_FDNAMES"] = self.fdname
            environment["LISTEN_FDS"] = "1"
            spec = _SpawnWithStderr(
                executable=resolve(argv[0], environment.get("PATH", os.defpath)), argv=argv, env=environment,
                fds=[self._require_listener().fileno()], listen_pid=True, stdin=devnull, stdout=out_w, stderr=err_w,
            )
            with _no_stray_inheritance():
                self.pid = spawn(spec)
        finally:
            os.close(err_w)
            os.close(out_w)
            os.close(devnull)
        self._captures = [self._stderr, self._stdout]
        for capture in self._captures:
            capture.start()
        reaper = threading.Thread(target=self._reap, name="activator-testing-reaper", daemon=True)
        reaper.start()
        self._threads.append(reaper)

    def _reap(self) -> None:
        while True:
            try:
                _, status = os.waitpid(self.pid, 0)
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                continue
            except ChildProcessError:
                status = 0
            break
        self._status_value = status
        self._exited.set()

    def _start_notify(self) -> NotifySocket:
        from .sdnotify import NotifySocket

        self._notify = sock = NotifySocket()
        t = threading.Thread(target=self._notify_loop, name="activator-testing-notify", daemon=True)
        t.start()
        self._threads.append(t)
        return sock

    def _notify_loop(self) -> None:
        from . import processes

        sock = self._notify
        assert sock is not None
        while not self._notify_stop.is_set():
            r, _, _ = select.select([sock.fileno()], [], [], 0.1)
            if not r:
                continue
            while True:
                try:
                    message = sock.receive()
                except OSError:
                    return
                if message is None:
                    break
                message.close_fds()
                if message.pid != self.pid and message.pid not in processes.descendants({self.pid}):
                    continue
                if message.get("STATUS") is not None:
                    self.status = message.get("STATUS")
                if message.get("READY") == "1":
                    self._ready.set()

    # ------------------------------------------------------------- queries
    @property
    def returncode(self) -> int | None:
        """None while the daemon runs; its exit code, or -N when killed by signal N (as subprocess)."""
        if self._status_value is None:
            return None
        return os.waitstatus_to_exitcode(self._status_value)

    @property
    def stderr(self) -> str:
        """What the daemon wrote on stderr so far."""
        return self._stderr.text() if self._stderr else ""

    @property
    def stdout(self) -> str:
        """What the daemon wrote on stdout so far."""
        return self._stdout.text() if self._stdout else ""

    def _died(self) -> DaemonDied:
        if self._stderr is not None:
            self._stderr.join(2.0)  # the rest of what it wrote, bounded: a grandchild may hold the pipe
        return DaemonDied(self.argv, self.pid, self.returncode, self.stderr)

    def _require_listener(self) -> socket.socket:
        if self._listener is None:
            raise RuntimeError("the daemon's socket is closed")
        return self._listener

    def connect(self, timeout: float | None = None) -> Connection:
        """A new connection to the daemon; DaemonDied if it has exited."""
        if self.returncode is not None:
            raise self._died()
        sock = socket.socket(self._require_listener().family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout if timeout is None else timeout)
            sock.connect(self.address)
            conn = Connection(sock.family, sock.type, sock.proto, fileno=sock.detach())
        finally:
            sock.close()
        conn.settimeout(self.timeout if timeout is None else timeout)
        conn._activated = self
        return conn

    def wait_ready(self, timeout: float | None = None) -> "Activated":
        """With ``notify=True``, wait for READY=1; otherwise only check the daemon runs.

        Socket activation needs no readiness wait: connections made before the daemon
        accepts wait in the listen backlog. Raises DaemonDied or TimeoutError.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            if self.returncode is not None:
                raise self._died()
            if not self._want_notify or self._ready.is_set():
                return self
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.argv[0]} (pid {self.pid}) sent no READY=1 within "
                                   f"{self.timeout if timeout is None else timeout:g}s")
            self._ready.wait(min(POLL, left))

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the daemon to exit by itself; its return code. TimeoutError after ``timeout``."""
        if not self._exited.wait(self.timeout if timeout is None else timeout):
            raise TimeoutError(f"{self.argv[0]} (pid {self.pid}) still running")
        code = self.returncode
        assert code is not None  # set before _exited
        return code

    # ------------------------------------------------------------- stopping
    def stop(self) -> int | None:
        """SIGTERM to the daemon and its processes, SIGKILL after ``stop_timeout``; reaped. Its return code."""
        from . import processes

        if self.pid and not self._exited.is_set():
            processes.signal_tree(self.pid, signal.SIGTERM)
            if not self._exited.wait(self.stop_timeout):
                processes.signal_tree(self.pid, signal.SIGKILL)
                self._exited.wait(10.0)
        return self.returncode

    def close(self) -> None:
        """Stop the daemon, close the socket, remove the temporary directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.stop()
        finally:
            self._notify_stop.set()
            for t in self._threads:
                t.join(2.0)
            for capture in self._captures:
                capture.join(2.0)
                if not capture.is_alive():
                    os.close(capture.fd)
            if self._notify is not None:
                self._notify.close()
            bound = getattr(self, "_bound", None)
            if bound is not None:
                bound.close(remove_file=True)
            elif self._listener is not None:
                self._listener.close()
            if self.tempdir:
                shutil.rmtree(self.tempdir, ignore_errors=True)

    def __enter__(self) -> "Activated":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.returncode is None else f"returncode={self.returncode}"
        return f"<Activated {self.argv[0]} pid={self.pid} address={self.address!r} {state}>"


@contextlib.contextmanager
def _no_stray_inheritance() -> Iterator[None]:
    """Descriptors of the test process that are inheritable (pytest's, a test's) are made close-on-exec
    while the daemon is spawned, so that it gets exactly 0-2 and its sockets; restored after."""
    flipped = []
    try:
        for entry in os.listdir("/proc/self/fd"):
            fd = int(entry)
            if fd < 3:
                continue
            try:
                if os.get_inheritable(fd):
                    os.set_inheritable(fd, False)
                    flipped.append(fd)
            except OSError:
                pass
    except OSError:
        pass
    try:
        yield
    finally:
        for fd in flipped:
            try:
                os.set_inheritable(fd, True)
            except OSError:
                pass


@dataclass
class _SpawnWithStderr(SpawnSpec):
    """SpawnSpec plus a descriptor for fd 2 (moved into place with the others)."""

    stderr: int | None = None

    def fd_map(self) -> list[tuple[int, int]]:
        pairs = super().fd_map()
        if self.stderr is not None:
            pairs.append((self.stderr, 2))
        return pairs


def start(argv: Sequence[str], listen=None, accept: bool = False, env: Mapping[str, str | None] | None = None,
          timeout: float = 10.0, fdname: str | None = None, notify: bool = False, stop_timeout: float = 5.0) -> Activated:
    """Like :func:`activate`, without the ``with``: call ``.close()`` (or use it as a context manager)."""
    return Activated(argv, listen=listen, accept=accept, env=env, timeout=timeout, fdname=fdname, notify=notify,
                     stop_timeout=stop_timeout)


@contextlib.contextmanager
def activate(argv: Sequence[str], listen=None, accept: bool = False, env: Mapping[str, str | None] | None = None,
             timeout: float = 10.0, fdname: str | None = None, notify: bool = False,
             stop_timeout: float = 5.0) -> Iterator[Activated]:
    """Start ``argv`` under socket activation for the duration of a ``with`` block.

    listen: None or "tcp" (127.0.0.1, an ephemeral port), "tcp6" (::1), "unix" (a socket in a
    private temporary directory), an activator address string ("/path", "@name",
    "127.0.0.1:PORT", ...) or a (host, port) tuple.
    accept: False passes the listening socket (Accept=no); True runs ``activator run --accept``
    which starts the daemon once per connection with the connection at fd 3.
    env: variables added to ours (None removes one); LISTEN_*/NOTIFY_SOCKET/WATCHDOG_* are never inherited.
    timeout: default timeout of connect(), reads on its connections and wait_ready().
    fdname: LISTEN_FDNAMES for the socket (default: none passed).
    notify: give the daemon a NOTIFY_SOCKET; wait_ready() then waits for READY=1 and .status has STATUS=.
    stop_timeout: how long SIGTERM gets before SIGKILL at the end.
    """
    activated = start(argv, listen=listen, accept=accept, env=env, timeout=timeout, fdname=fdname, notify=notify,
                      stop_timeout=stop_timeout)
    try:
        yield activated
    finally:
        activated.close()
