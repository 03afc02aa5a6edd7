"""The control socket: ``activator ctl``'s server in the engine's loop, its protocol and a Python client.

Protocol (docs/control.md): a unix stream socket; the client sends one JSON object on
one line, the server answers with one JSON object on one line, and the connection may
carry further requests. Peers must be root or activator's own user (``SO_PEERCRED``),
on top of the socket file's mode 0600.

Where the socket is: ``--control-socket PATH``, or per instance ``DIR/PID.sock`` in a
directory of the user's (``/run/activator`` for root, ``$XDG_RUNTIME_DIR/activator``,
else ``/tmp/activator-UID``), so that any number of activators can run side by side;
:func:`find_socket` picks the one that answers there. A problem with the default place
(read-only, insecure, a live socket of another PID namespace) leaves activator running
without a control socket, with a warning; a problem with an explicit path is an error.

The server is :class:`StreamServer`, a small non-blocking line/request server that the
metrics endpoint (:mod:`activator.metrics`) uses too: no threads, no timer unless a
client is connected, every request and reply bounded, and no exception from a client
ever reaches the engine's fault handler.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
from . import socketapi as socket
import stat
import sys
import time

from .records import dataclass
from . import __version__, processes
from .loop import TimerHandle, cancel
from .sockets import remove_stale_socket

TYPE_CHECKING = False  # typing is not imported at run time (start-up, memory); type checkers see it
if TYPE_CHECKING:
    from typing import Any, Callable, Iterator

if TYPE_CHECKING:
    from .log import Log
    from .loop import Loop
    from .supervisor import Engine, UnitState

PROTOCOL = 1
REQUEST_MAX = 64 * 1024  # bytes of one request line
CLIENTS_MAX = 16  # connections served at once; more are answered "busy" and closed
CLIENT_TIMEOUT = 10.0  # seconds a connection may take to send a request or read a reply
PIPELINE_MAX = 64  # requests taken from one client's buffer at once
ACCEPT_BATCH = 16
EMFILE_PAUSE = 1.0
UNITS_MAX = 10_000  # unit names in one request
SAMPLE_MAX = 20_000  # processes whose statistics one request reads
FIND_MAX = 256  # sockets looked at in the default directory (by ctl, and for stale ones at start-up)

# Error codes of the protocol and the exit status `activator ctl` gives each.
EXIT_STATUS = {"bad-request": 2, "ambiguous": 2, "no-such-unit": 3, "unreachable": 4}


class ControlError(Exception):
    """A request that was refused or failed: ``code`` (see docs/control.md), a one-line ``message``,
    ``result`` (per-unit outcomes, when there are some) and the ``exit_status`` of ``activator ctl``."""

    def __init__(self, code: str, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.result = result

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS.get(self.code, 1)


@dataclass
class ControlSettings:
    """What `run` and `serve` were told on the command line."""

    socket_path: str | None = None  # --control-socket: it must work, or activator exits 1
    enabled: bool = True  # --no-control-socket
    metrics_listen: str | None = None  # --metrics-listen ADDR


# ------------------------------------------------------------------ where
def runtime_directory() -> tuple[str, int]:
    """The default directory of control sockets for this user, and the mode it is created with."""
    uid = os.geteuid()
    if uid == 0:
        return "/run/activator", 0o755  # the sockets in it are 0600 themselves
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "activator"), 0o700
    return f"/tmp/activator-{uid}", 0o700


def directory_problem(path: str) -> str | None:
    """Why ``path`` is not a safe place for our sockets (someone else could swap them), or None."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid not in (0, os.geteuid()):
        return f"{path} belongs to uid {st.st_uid}, not to us"
    if st.st_mode & 0o022:
        return f"{path} is writable by other users"
    return None


def _prepare_directory(path: str, mode: int) -> None:
    """Create the default directory (one level); OSError naming the problem when it is unusable."""
    try:
        os.mkdir(path, mode)
        os.chmod(path, mode)  # mkdir's mode went through the umask
    except FileExistsError:
        pass
    problem = directory_problem(path)
    if problem:
        raise OSError(errno.EPERM, problem)


def _answers(path: str) -> bool:
    """Whether a server listens on the unix socket ``path`` (a full backlog counts as listening)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _instance_sockets(directory: str) -> list[tuple[int, str]]:
    """(pid, path) of the per-instance sockets (``PID.sock``) in ``directory``, at most FIND_MAX."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    found = []
    for name in names:
        stem, dot, ext = name.partition(".")
        if dot and ext == "sock" and stem.isascii() and stem.isdigit():
            path = os.path.join(directory, name)
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    found.append((int(stem), path))
    return sorted(found)[:FIND_MAX]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep(directory: str) -> None:
    """Remove the sockets of activators that died without cleaning up (SIGKILL). Safe: a live one
    is only ever visible under its name once it listens (see _bind)."""
    for pid, path in _instance_sockets(directory):
        # Only the sockets of activators that are gone are probed: connecting to a live one would
        # wake it (idle means idle, for every other activator on the machine too).
        if _pid_alive(pid):
            continue
        if not _answers(path):
            with contextlib.suppress(OSError):
                os.unlink(path)


def _bind(path: str) -> socket.socket:
    """A listening socket at ``path``, mode 0600. It is bound under a temporary name and linked into
    place only once it listens, so that nobody sees the name before it answers; link() fails when
    the name exists, so two activators never both take it. OSError with a message on failure."""
    try:
        remove_stale_socket(path, socket.SOCK_STREAM)
    except OSError as exc:
        raise OSError(exc.errno, f"{path}: {exc.strerror}") from None
    # A random name: short (sun_path has 108 bytes) and never one that another activator is binding.
    temporary = os.path.join(os.path.dirname(path) or ".", f".ctl-{os.urandom(4).hex()}.tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(temporary)
        finally:
            os.umask(old)
        try:
            sock.listen(CLIENTS_MAX)
            os.link(temporary, path)
        finally:
            os.unlink(temporary)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EEXIST:
            raise OSError(errno.EADDRINUSE, f"{path}: another activator took it just now") from None
        raise OSError(exc.errno, f"{path}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def find_socket(path: str | None = None, pid: int | None = None) -> str:
    """The control socket `activator ctl` talks to: ``path``, else $ACTIVATOR_CONTROL_SOCKET, else the
    one of activator ``pid`` in the default directory, else the only one there that answers."""
    if path:
        return path
    env = os.environ.get("ACTIVATOR_CONTROL_SOCKET")
    if env:
        return env
    directory, _ = runtime_directory()
    if pid is not None:
        return os.path.join(directory, f"{pid}.sock")
    problem = directory_problem(directory)
    if problem and os.path.lexists(directory):
        raise ControlError("unreachable", f"refusing the control directory: {problem}")
    # By pid, not by connecting: a probe would wake every activator on the machine.
    live = [(p, sock) for p, sock in _instance_sockets(directory) if _pid_alive(p)]
    if not live:
        raise ControlError("unreachable", f"no activator found in {directory} "
                                          f"(give --socket PATH, or set ACTIVATOR_CONTROL_SOCKET)")
    if len(live) > 1:
        pids = ", ".join(str(p) for p, _ in live)
        raise ControlError("ambiguous", f"{len(live)} activators answer in {directory} (pids {pids}): "
                                        f"choose one with --pid PID or --socket PATH")
    return live[0][1]


# ------------------------------------------------------------------ client
def call(command: str, *, socket_path: str | None = None, pid: int | None = None, timeout: float = 10.0,
         **fields: Any) -> Any:
    """Send one request (``command`` plus ``fields``, e.g. ``units=["nbd"]``) and return its result.

    Raises ControlError: ``unreachable`` when no activator answers, otherwise the code of its reply.
    Example: ``call("status", units=["nbd"])["units"][0]["main_pid"]``.
    """
    import json

    path = find_socket(socket_path, pid)
    request = json.dumps({"version": PROTOCOL, "command": command, **fields}, separators=(",", ":")) + "\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            try:
                sock.sendall(request.encode())
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused before it read anything (permission, busy): the reason waits to be read
            line = _read_line(sock)
    except OSError as exc:
        raise ControlError("unreachable", f"cannot reach activator at {path}: {exc.strerror or exc}") from None
    try:
        reply = json.loads(line)
        ok = reply["ok"]
    except (ValueError, KeyError, TypeError):
        raise ControlError("unreachable", f"{path} did not answer with the control protocol") from None
    if ok:
        return reply.get("result")
    error = reply.get("error") or {}
    raise ControlError(str(error.get("code", "failed")), str(error.get("message", "refused")), reply.get("result"))


def _read_line(sock: socket.socket) -> bytes:
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = sock.recv(1 << 20)
        if not chunk:
            if not data:
                raise OSError(errno.ECONNRESET, "the connection was closed without an answer")
            break
        data += chunk
    return bytes(data)


# ------------------------------------------------- a stream server in the loop
class Client:
    """One connection: what it sent that is not handled yet, what we owe it, its timeout."""

    __slots__ = ("sock", "inbuf", "outbuf", "timer", "close_after", "writing")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.timer: TimerHandle | None = None
        self.close_after = False
        self.writing = False


if TYPE_CHECKING:
    Handler = Callable[[Client, bytes], "tuple[bytes, bool]"]


class StreamServer:
    """Serve requests ending in ``terminator`` on a listening socket, from the engine's loop.

    ``handler(client, request) -> (reply, close_after)``; ``greet(client)`` may return a reply
    that refuses the connection. Bounded everywhere: a request longer than ``request_max`` gets
    ``too_large`` and is closed, at most ``clients_max`` connections (the next get ``busy``), each
    closed after ``timeout`` s without a complete request or with a reply it does not read. While
    a reply is being written, nothing more is read from that client. Every callback catches its
    own exceptions: one client's trouble closes that client, never anything else.
    """

    def __init__(self, loop: Loop, log: Log, name: str, sock: socket.socket, terminator: bytes, handler: Handler,
                 *, request_max: int, too_large: bytes, busy: bytes, greet: Callable[[Client], bytes | None] | None
                 = None, clients_max: int = CLIENTS_MAX, timeout: float = CLIENT_TIMEOUT) -> None:
        self.loop, self.log, self.name, self.sock = loop, log, name, sock
        self.terminator, self.handler, self.greet = terminator, handler, greet
        self.request_max, self.too_large, self.busy = request_max, too_large, busy
        self.clients_max, self.timeout = clients_max, timeout
        self.clients: dict[int, Client] = {}
        self._resume: TimerHandle | None = None

    def start(self) -> None:
        self.sock.setblocking(False)
        self.loop.add_reader(self.sock, self._on_accept)

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._close(client)
        cancel(self._resume)
        self.loop.remove(self.sock)
        self.sock.close()

    # ------------------------------------------------------------ accepting
    def _on_accept(self) -> None:
        try:
            self._accept_batch()
        except Exception as exc:  # noqa: BLE001 - never into the engine's fault handler
            self.log.error("control-fault", f"{self.name}: cannot accept: {exc!r}")

    def _accept_batch(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.log.warning("control", f"{self.name}: cannot accept: {exc.strerror}; "
                                                f"pausing for {EMFILE_PAUSE:g}s")
                    self.loop.remove(self.sock)
                    self._resume = self.loop.call_later(EMFILE_PAUSE, self.start)
                    return
                continue  # that connection is gone already
            conn.setblocking(False)
            client = Client(conn)
            if len(self.clients) >= self.clients_max:
                self._send_now(client, self.busy)
                conn.close()
                continue
            self.clients[conn.fileno()] = client
            self._guard(client, functools.partial(self._welcome, client))

    def _welcome(self, client: Client) -> None:
        self._restart_timer(client)  # first: even a refusal that cannot be written at once ends in time
        refusal = self.greet(client) if self.greet else None
        if refusal is not None:
            self._reply(client, refusal, close_after=True)
            return
        self._listen_to(client)

    # ------------------------------------------------------------ a client
    def _guard(self, client: Client, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - a bad client or a bug here closes that client only
            self.log.error("control-fault", f"{self.name}: closing a connection after an internal error: {exc!r}")
            self._close(client)

    def _listen_to(self, client: Client) -> None:
        self.loop.add_reader(client.sock, lambda: self._guard(client, lambda: self._readable(client)))

    def _restart_timer(self, client: Client) -> None:
        cancel(client.timer)
        client.timer = self.loop.call_later(self.timeout, lambda: self._close(client))

    def _readable(self, client: Client) -> None:
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(client)
            return
        client.inbuf += data
        self._process(client)

    def _process(self, client: Client) -> None:
        """Handle the complete requests in the client's buffer, in order, until a reply has to wait."""
        for _ in range(PIPELINE_MAX):
            end = client.inbuf.find(self.terminator)
            if end < 0 or end > self.request_max:
                if end > self.request_max or len(client.inbuf) > self.request_max:
                    self._reply(client, self.too_large, close_after=True)
                return
            request = bytes(client.inbuf[:end])
            del client.inbuf[:end + len(self.terminator)]
            reply, close_after = self.handler(client, request)
            self._restart_timer(client)
            self._reply(client, reply, close_after)
            if client.writing or client.sock.fileno() < 0:
                return
        self._close(client)  # a flood of requests in one go: not what any client of ours does

    def _reply(self, client: Client, data: bytes, close_after: bool) -> None:
        client.outbuf += data
        client.close_after = client.close_after or close_after
        self._flush(client)

    def _flush(self, client: Client) -> None:
        while client.outbuf:
            try:
                sent = client.sock.send(client.outbuf, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                if not client.writing:
                    self.loop.remove(client.sock)
                    self.loop.add_writer(client.sock, lambda: self._guard(client, lambda: self._writable(client)))
                    client.writing = True
                return
            except OSError:
                self._close(client)
                return
            del client.outbuf[:sent]
        if client.close_after:
            self._close(client)
        elif client.writing:
            self.loop.remove(client.sock)
            client.writing = False
            self._listen_to(client)

    def _writable(self, client: Client) -> None:
        self._flush(client)
        if not client.writing and client.sock.fileno() >= 0:
            self._process(client)  # requests that came along with the last one

    @staticmethod
    def _send_now(client: Client, data: bytes) -> None:
        with contextlib.suppress(OSError):
            client.sock.send(data, socket.MSG_NOSIGNAL)

    def _close(self, client: Client) -> None:
        cancel(client.timer)
        client.timer = None
        if client.sock.fileno() >= 0:
            self.clients.pop(client.sock.fileno(), None)
            self.loop.remove(client.sock)
            client.sock.close()


# --------------------------------------------------------- process statistics
class ProcessSampler:
    """CPU, memory, descriptors and threads of a unit's whole process tree, read with psutil.

    CPU percent is the CPU time used since the previous sample of the same process (by an
    earlier status request), or since the process started, over that wall time: 100 is one
    CPU. psutil is imported at the first sample, so start-up does not pay for it.
    """

    def __init__(self) -> None:
        self.previous: dict[str, dict[int, tuple[float, float, float]]] = {}  # unit -> pid -> (created, cpu, when)
        self.missing: str | None = None

    def tree(self) -> processes.Tree:
        try:
            return processes.Tree.read()
        except OSError:
            return processes.EMPTY_TREE

    def sample(self, name: str, roots: set[int], tree: processes.Tree, budget: list[int]) -> dict[str, Any] | None:
        """The statistics of ``roots`` and their descendants; None without psutil. ``budget`` ([n]) is
        how many processes may still be read for this request (each read here takes one)."""
        try:
            import psutil
        except ImportError:
            self.missing = "psutil is not installed: no process statistics"
            return None
        pids = roots | tree.descendants(roots)
        now = time.time()
        seen: dict[int, tuple[float, float, float]] = {}
        before = self.previous.get(name, {})
        totals = {"count": 0, "cpu_seconds": 0.0, "cpu_percent": 0.0, "rss_bytes": 0, "open_fds": 0, "threads": 0}
        partial = False
        for pid in sorted(pids):
            if budget[0] <= 0:
                partial = True
                break
            budget[0] -= 1
            try:
                proc = psutil.Process(pid)
                with proc.oneshot():
                    created = proc.create_time()
                    t = proc.cpu_times()
                    rss = proc.memory_info().rss
                    threads = proc.num_threads()
                    fds = proc.num_fds()
            except psutil.NoSuchProcess:
                continue  # gone (or a zombie) since the tree was read
            except psutil.Error:
                partial = True  # another user's process we may not read
                continue
            cpu = t.user + t.system + t.children_user + t.children_system
            last = before.get(pid)
            since_cpu, since = (last[1], last[2]) if last and last[0] == created else (0.0, created)
            totals["cpu_percent"] += 100.0 * max(0.0, cpu - since_cpu) / max(now - since, 1e-3)
            seen[pid] = (created, cpu, now)
            totals["count"] += 1
            totals["cpu_seconds"] += cpu
            totals["rss_bytes"] += rss
            totals["open_fds"] += fds
            totals["threads"] += threads
        self.previous[name] = seen
        totals["cpu_seconds"] = round(totals["cpu_seconds"], 3)
        totals["cpu_percent"] = round(totals["cpu_percent"], 2)
        totals["partial"] = partial
        return totals

    def forget_except(self, names: set[str]) -> None:
        for name in list(self.previous):
            if name not in names:
                del self.previous[name]


def wall_time(engine: Engine, monotonic: float) -> float:
    """A time on the engine's clock as seconds since the epoch."""
    return time.time() + (monotonic - engine.clock())


def unit_status(engine: Engine, us: UnitState, stats: dict[str, Any] | None) -> dict[str, Any]:
    """One unit's entry of a status reply (the schema is in docs/control.md)."""
    st = us.stats
    running = us.main_pid is not None and st.started_time is not None
    return {
        "name": us.name,
        "state": us.state,
        "accept": us.unit.accept,
        "listen": [ss.bound.spec.label for ss in us.sockets],
        "main_pid": us.main_pid,
        "instances": len(us.instances),
        "started": st.started_time if running else None,
        "uptime": round(time.time() - st.started_time, 3) if st.started_time is not None and running else None,
        "paused_until": round(wall_time(engine, us.paused_until), 3) if us.paused_until else None,
        "failed": us.failed,
        "counters": {
            "activations": st.activations, "starts": st.starts, "start_failures": st.start_failures,
            "accepted": st.accepted, "refused": st.refused, "denied": st.denied, "restarts": st.restarts,
        },
        "last_exit": None if st.last_exit is None else {
            "status": st.last_exit, "code": st.last_exit_code, "time": st.last_exit_time,
        },
        "processes": stats,
        "workers": [{"worker": w.worker, "state": w.state, "main_pid": w.main_pid,
                     "new_pid": w.successor.main_pid if w.successor is not None else None} for w in us.group],
    }


def _unit_pids(us: UnitState) -> set[int]:
    """Every process of the unit: each worker's, and the new daemons of a graceful restart."""
    return {pid for w in us.group for s in (w, w.successor) if s is not None for pid in s.pids()}


def status_snapshot(engine: Engine, sampler: ProcessSampler, started: float,
                    names: list[str] | None = None) -> dict[str, Any]:
    """The result of a status request for ``names`` (every unit when None)."""
    selected = [engine.units[n] for n in names] if names else list(engine.units.values())
    tree = sampler.tree() if any(_unit_pids(us) for us in selected) else processes.EMPTY_TREE
    budget = [SAMPLE_MAX]
    units = [unit_status(engine, us, sampler.sample(us.name, _unit_pids(us), tree, budget)) for us in selected]
    sampler.forget_except(set(engine.units))
    return {
        "activator": {
            "pid": os.getpid(), "version": __version__, "protocol": PROTOCOL, "started": started,
            "uptime": round(time.time() - started, 3), "stopping": engine.stopping,
            "process_statistics": sampler.missing,
            **(engine.reexec.status() if engine.reexec is not None else {}),
        },
        "units": units,
    }


# ------------------------------------------------------------ the control server
class ControlServer:
    """The control protocol on a unix socket, served from the engine's loop."""

    kind = "control"  # its entry in the state of a re-exec

    def __init__(self, engine: Engine, path: str, sock: socket.socket, started: float | None = None) -> None:
        self.engine = engine
        self.path = path
        self.started = time.time() if started is None else started
        self.sampler = ProcessSampler()
        self._inode = os.lstat(path).st_ino  # the file's, to remove it at the end only if it is still ours
        self.server = StreamServer(
            engine.loop, engine.log, "control socket", sock, b"\n", self._handle, request_max=REQUEST_MAX,
            too_large=_fixed_error("bad-request", f"request longer than {REQUEST_MAX} bytes"),
            busy=_fixed_error("busy", f"{CLIENTS_MAX} clients are connected already; try again"),
            greet=self._check_peer,
        )
        self.commands: dict[str, Callable[[dict[str, Any]], Any]] = {
            "status": self._status, "start": self._start, "stop": self._stop, "restart": self._restart,
            "reload": self._reload, "shutdown": self._shutdown, "reexec": self._reexec,
            "scale": self._scale,
        }

    def start(self) -> None:
        self.server.start()

    def reexec_state(self) -> tuple[dict[str, Any], list[int]]:
        """What a re-exec carries of this server: its listening socket (clients connected now are not
        carried: the one asking for the re-exec has its answer before it)."""
        fd = self.server.sock.fileno()
        return {"fd": fd, "path": self.path, "started": self.started}, [fd]

    def close(self) -> None:
        self.server.close()
        # Only our own socket: another activator may have replaced a file we no longer hold.
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if stat.S_ISSOCK(st.st_mode) and st.st_ino == self._inode:
                os.unlink(self.path)

    # ---------------------------------------------------------------- peers
    @staticmethod
    def _check_peer(client: Client) -> bytes | None:
        _, uid, _ = processes.native_ints(client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                 processes.UCRED_SIZE))
        if uid == 0 or uid == os.geteuid():
            return None
        return _encode_error(None, "permission-denied", f"uid {uid} may not control this activator "
                                                        f"(only root and uid {os.geteuid()})")

    # ------------------------------------------------------------- requests
    def _handle(self, client: Client, line: bytes) -> tuple[bytes, bool]:
        import json

        request_id = None
        try:
            request = _parse_request(line, self.commands)
            request_id = request.get("id")
            result = self.commands[request["command"]](request)
            reply: dict[str, Any] = {"version": PROTOCOL, "ok": True, "id": request_id, "result": result}
        except ControlError as exc:
            reply = _error_reply(request_id, exc.code, exc.message, exc.result)
        except Exception as exc:  # noqa: BLE001 - a bug answers this request with an error, nothing more
            self.engine.log.error("control-fault", f"control request failed: {exc!r}")
            reply = _error_reply(request_id, "internal", f"internal error: {exc!r}")
        return json.dumps(reply, separators=(",", ":")).encode() + b"\n", False

    def _units(self, request: dict[str, Any], required: bool) -> list[UnitState]:
        names = list(dict.fromkeys(request.get("units") or []))
        if not names:
            if required:
                raise ControlError("bad-request", f"{request['command']} needs at least one unit")
            return list(self.engine.units.values())
        unknown = [n for n in names if n not in self.engine.units]
        if unknown:
            raise ControlError("no-such-unit", "no such unit: " + ", ".join(unknown), {"units": unknown})
        return [self.engine.units[n] for n in names]

    def _status(self, request: dict[str, Any]) -> dict[str, Any]:
        names = [us.name for us in self._units(request, required=False)]
        return status_snapshot(self.engine, self.sampler, self.started, names)

    def _not_stopping(self) -> None:
        if self.engine.stopping:
            raise ControlError("refused", "activator is stopping")

    def _each(self, request: dict[str, Any], action: Callable[[UnitState], tuple[bool, str]]) -> dict[str, Any]:
        """Apply ``action`` to every unit named (all must exist), collecting (ok, message) per unit."""
        units = self._units(request, required=True)
        self._not_stopping()
        outcomes = []
        for us in units:
            ok, message = action(us)
            outcomes.append({"unit": us.name, "ok": ok, "message": message, "state": us.state,
                             "main_pid": us.main_pid, "instances": len(us.instances)})
        result = {"units": outcomes}
        refused = [o for o in outcomes if not o["ok"]]
        if refused:
            raise ControlError("refused", "; ".join(f"{o['unit']}: {o['message']}" for o in refused), result)
        return result

    def _start(self, request: dict[str, Any]) -> dict[str, Any]:
        return self._each(request, self._start_one)

    def _start_one(self, us: UnitState) -> tuple[bool, str]:
        engine = self.engine
        if us.unit.accept:
            engine.arm_unit(us)
            return True, "listening: accept mode starts an instance per connection"
        if any(w.state == "stopping" for w in us.group):
            return False, "still stopping; start it once it has stopped"
        if us.main_pid is not None:
            if len(us.group) > 1 and engine.start_unit(us):
                return True, "started the workers that were not running"
            return True, f"already running as pid {us.main_pid}"
        if us.waiting_for is not None:
            return False, "waiting for its previous generation to stop"
        failures = us.stats.start_failures
        if engine.start_unit(us):
            return True, f"started as pid {us.main_pid}"
        if us.paused_until:
            return False, f"paused by a rate limit until {_clock(wall_time(engine, us.paused_until))}"
        if us.stats.start_failures > failures:
            return False, "the daemon could not be started (activator's log says why)"
        return False, f"cannot start now (state {us.state})"

    def _stop(self, request: dict[str, Any]) -> dict[str, Any]:
        disarm = request.get("disarm", False)

        def stop_one(us: UnitState) -> tuple[bool, str]:
            had = len(_unit_pids(us))  # every worker's, and a graceful restart's new daemons
            self.engine.halt_unit(us, disarm=disarm)
            what = f"stopping {had} process(es)" if had else "not running"
            return True, what + ("; sockets held, not listened on" if disarm else "")

        return self._each(request, stop_one)

    def _restart(self, request: dict[str, Any]) -> dict[str, Any]:
        mode = request.get("mode")

        def restart_one(us: UnitState) -> tuple[bool, str]:
            style = mode or ("graceful" if us.unit.service.restart_style == "graceful" else "stop-first")
            if style == "graceful":
                return self.engine.graceful_restart(us)
            had = [pid for w in us.group for pid in w.pids()]
            self.engine.restart_unit(us)
            if had:
                return True, f"stopping {len(had)} process(es), then starting again"
            if us.main_pid is not None:
                return True, f"started as pid {us.main_pid}"
            return (us.unit.accept or us.state == "listening"), f"state {us.state}"

        return self._each(request, restart_one)

    def _scale(self, request: dict[str, Any]) -> dict[str, Any]:
        count = request.get("workers")
        if type(count) is not int:
            raise ControlError("bad-request", "scale needs workers, an integer")
        return self._each(request, lambda us: self.engine.scale_unit(us, count))

    def _reload(self, request: dict[str, Any]) -> dict[str, Any]:
        self._not_stopping()
        result = self.engine.reload()
        summary = {"unchanged": result.unchanged, "changed": result.changed, "added": result.added,
                   "removed": result.removed, "errors": result.errors}
        if not result.ok:
            raise ControlError("failed", "the new configuration was rejected: " + "; ".join(result.errors), summary)
        return summary

    def _reexec(self, request: dict[str, Any]) -> dict[str, Any]:
        from .reexec import StateError

        self._not_stopping()
        reexec = self.engine.reexec
        if reexec is None:
            raise ControlError("refused", "this activator cannot re-exec")
        try:
            return reexec.request()
        except StateError as exc:
            reexec.failed(str(exc))
            raise ControlError("refused", str(exc)) from None

    def _shutdown(self, request: dict[str, Any]) -> dict[str, Any]:
        if not self.engine.stopping:
            self.engine.log.info("stop", "stop requested on the control socket, stopping")
            # After this reply is written: the loop runs until every process is gone.
            self.engine.loop.call_later(0, lambda: self.engine.stop(0))
        return {"stopping": True}


def _clock(when: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(when))


def _error_reply(request_id: Any, code: str, message: str, result: Any = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"version": PROTOCOL, "ok": False, "id": request_id,
                             "error": {"code": code, "message": message}}
    if result is not None:
        reply["result"] = result
    return reply


def _encode_error(request_id: Any, code: str, message: str) -> bytes:
    import json

    return json.dumps(_error_reply(request_id, code, message), separators=(",", ":")).encode() + b"\n"


def _fixed_error(code: str, message: str) -> bytes:
    """What ``_encode_error(None, code, message)`` gives, for the replies the server has ready from its
    start (printable ASCII, no quote or backslash: nothing to escape), without importing json then."""
    if not all(" " <= c <= "~" and c not in '"\\' for c in code + message):
        raise ValueError(f"not a plain message: {message!r}")
    return (f'{{"version":{PROTOCOL},"ok":false,"id":null,"error":{{"code":"{code}","message":"{message}"}}}}'
            "\n").encode()


REQUEST_FIELDS = {"version", "command", "units", "disarm", "mode", "workers", "id"}
RESTART_MODES = ("graceful", "stop-first")


def _parse_request(line: bytes, commands: dict[str, Any]) -> dict[str, Any]:
    """A request checked field by field; ControlError('bad-request') naming what is wrong."""
    import json

    try:
        request = json.loads(line)
    except (ValueError, RecursionError):
        raise ControlError("bad-request", "a request is one JSON object on one line") from None
    if not isinstance(request, dict):
        raise ControlError("bad-request", "a request is one JSON object on one line")
    unknown = sorted(set(request) - REQUEST_FIELDS)
    if unknown:
        raise ControlError("bad-request", f"unknown field(s): {', '.join(unknown)[:200]}")
    version = request.get("version", PROTOCOL)
    if type(version) is not int or version < 1:
        raise ControlError("bad-request", "version must be a positive integer")
    if version > PROTOCOL:
        raise ControlError("unsupported-version", f"this activator speaks protocol version {PROTOCOL}")
    request_id = request.get("id")
    if not (request_id is None or type(request_id) in (str, int)) or len(str(request_id)) > 256:
        raise ControlError("bad-request", "id must be a string or an integer (at most 256 characters)")
    command = request.get("command")
    if not isinstance(command, str) or command not in commands:
        raise ControlError("bad-request", f"command must be one of {', '.join(sorted(commands))}")
    units = request.get("units", [])
    if not isinstance(units, list) or len(units) > UNITS_MAX or \
            not all(isinstance(u, str) and 0 < len(u) <= 255 for u in units):
        raise ControlError("bad-request", f"units must be a list of at most {UNITS_MAX} unit names")
    if type(request.get("disarm", False)) is not bool:
        raise ControlError("bad-request", "disarm must be true or false")
    if request.get("mode") not in (None, *RESTART_MODES):
        raise ControlError("bad-request", f"mode must be one of {', '.join(RESTART_MODES)}")
    if "workers" in request and type(request["workers"]) is not int:
        raise ControlError("bad-request", "workers must be an integer")
    return request


# ------------------------------------------------------------- wiring
def _open_control(engine: Engine, settings: ControlSettings) -> ControlServer | None:
    """The control socket, or None: SystemExit(1) when an explicit path cannot be used; a warning
    (and no control socket) when the default place cannot."""
    if settings.socket_path:
        try:
            sock = _bind(settings.socket_path)
        except OSError as exc:
            engine.log.error("control", f"cannot open the control socket {exc.strerror}")
            sys.exit(1)
        engine.log.info("control", f"control socket {settings.socket_path}")
        return ControlServer(engine, settings.socket_path, sock)
    directory, mode = runtime_directory()
    path = os.path.join(directory, f"{os.getpid()}.sock")
    try:
        _prepare_directory(directory, mode)
        _sweep(directory)
        sock = _bind(path)
    except OSError as exc:
        engine.log.warning("control", f"no control socket: {exc.strerror} (choose one with --control-socket PATH, "
                                      f"or --no-control-socket)")
        return None
    engine.log.debug("control", f"control socket {path}")
    return ControlServer(engine, path, sock)


def _carried(kind: str) -> dict[str, Any] | None:
    """After a re-exec: the state's entry of the server ``kind`` (control, metrics), or None."""
    from . import reexec

    entry = (reexec.RESUMED or {}).get("servers", {}).get(kind) if not reexec.CHECK_ONLY else None
    return entry if isinstance(entry, dict) else None


def _resumed_control(engine: Engine, entry: dict[str, Any]) -> ControlServer:
    """After a re-exec: the control socket we held before it."""
    sock = socket.socket(fileno=int(entry["fd"]))
    os.set_inheritable(sock.fileno(), False)
    return ControlServer(engine, str(entry["path"]), sock, float(entry["started"]))


@contextlib.contextmanager
def attach_control(engine: Engine, settings: ControlSettings | None) -> Iterator[list[Any]]:
    """Open the control socket and the metrics endpoint for ``engine`` (before its own sockets, so
    that a failure here leaves nothing bound), serve them from its loop, close them at the end."""
    servers: list[Any] = []
    try:
        if settings is not None and settings.metrics_listen:
            from .metrics import open_metrics

            servers.append(open_metrics(engine, settings.metrics_listen, _carried("metrics")))
        carried = _carried("control")
        if carried is not None:
            servers.append(_resumed_control(engine, carried))
        elif settings is not None and settings.enabled:
            control = _open_control(engine, settings)
            if control is not None:
                servers.append(control)
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in reversed(servers):
            server.close()
