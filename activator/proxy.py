"""The built-in proxy: units whose daemon binds its own port (``service.proxy-to``).

A proxy unit is accept-mode-like on its front sockets (activator accepts every connection
itself) and Accept=no-like for its service: one daemon, started with no descriptors, that
listens on the backend address. On the first connection the engine starts the daemon; the
connections wait here (none is refused) until the backend accepts one, then each client
is connected to the backend and the bytes are relayed both ways until both directions
are done, a half-close (FIN) passed on as ``shutdown(SHUT_WR)``.

Data path: each direction splices through a pipe of its own (the kernel moves the pages;
nothing is copied into Python), falling back to a bounded buffer where splice cannot be
used (no descriptor for a pipe, a socket type without splice). A direction reads its source
only when its pipe is empty and writes what it read at once: what a connection holds is
at most one pipe (or buffer) per direction, a receiver that does not read stops its sender
(its socket is no longer watched for reading) and nobody else, and a busy connection gives
the loop back after a bounded number of reads. The relay runs in C, in a thread of its
own (:mod:`activator._relay`, built with activator when a C compiler is there): the same
relay in Python, in the engine's loop, costs 1.3 to 2 times its CPU time per request and
falls short of systemd-socket-proxyd's rates by up to 28 % (docs/proxy.md has the figures).
Without the extension that Python relay runs (:class:`LoopRelays`), with an epoll set of
its own that is one reader of the engine's loop: the relay needs the event mask and changes
its interest on the fly.
A socket with nothing to wait for is taken out of the set, so that a hang-up, which epoll
reports whatever the mask, cannot spin the loop.

Waiting for the backend: after a start, connections to the backend are tried for the first
waiting client, with a backoff through one-shot timers, until one is accepted (a type =
"notify" daemon is tried only after READY=1); the others follow at once. A connection waits
at most timeout-start-sec: then every waiting client is closed, with a log line, and the
daemon, which never accepted anything, is stopped.

exit-idle-sec: when the unit has had no connection (waiting or relayed) for that long, its
daemon is stopped gracefully; the front sockets stay open and the next connection starts it
again. A connection that arrives while the daemon stops waits for it to be gone and for a
fresh start, so that no request is sent to a daemon on its way out.

The engine calls :meth:`Proxy.connection` for every accepted connection of a proxy unit
(the descriptor is ours from then on) and the lifecycle hooks :meth:`Proxy.started`,
:meth:`Proxy.ready`, :meth:`Proxy.exited`, :meth:`Proxy.idle` and :meth:`Proxy.failed`;
the proxy drives the unit only through the engine's public API (``start_unit``, ``stop_unit``).
"""
from __future__ import annotations

import errno
import fcntl
import itertools
import os
import select
import socket
import struct
from collections import deque
from functools import partial

from .records import dataclass, field
from .loop import TimerHandle, cancel

TYPE_CHECKING = False  # typing is not imported at run time (start-up, memory); type checkers see it
if TYPE_CHECKING:
    from typing import Any, Callable, Protocol

_relay: Any  # the C data path (optional: built when a C compiler was there)
try:
    from . import _relay  # type: ignore[attr-defined, no-redef]
except ImportError:
    _relay = None

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .supervisor import Engine, UnitState

IN, OUT = select.EPOLLIN, select.EPOLLOUT
READ_EVENTS = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
WRITE_EVENTS = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
PIPE_SIZE = 256 * 1024  # per direction and connection, as systemd-socket-proxyd
BUFFER_SIZE = 64 * 1024  # the copy fallback's buffer, per direction and connection
ROUNDS = 4  # reads per event and direction: a busy connection gives the loop back to the others
MAX_EVENTS = 256  # per wake-up; more stay ready for the next one
FIRST_RETRY = 0.005  # backoff of the connection attempts while the backend starts...
MAX_RETRY = 0.1  # ...doubling up to this
STOP_WAIT = 5.0  # how long close() waits for the relay thread
IP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
# The backend is not (yet, or any more) there: wait and try again, without a log line each time.
NOT_LISTENING = {errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN, errno.ECONNRESET, errno.ECONNABORTED,
                 errno.ETIMEDOUT}
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
INFINITY = float("inf")


# ====================================================================== data path
if TYPE_CHECKING:
    class Relays(Protocol):
        """Where established connections are relayed; each one ends with ``proxy.relay_ended(id, errno)``:
        at once with ``notify`` (the unit counts its idle time), else by the next :meth:`collect` at the latest."""

        def add(self, client: Client, backend: socket.socket, rid: int, notify: bool) -> None:
            """Relay between the two; both descriptors are the relay's from now on (closed on an error, which
            ends the connection as any other end). The client's socket is made non-blocking."""

        def collect(self) -> None:
            """Report the connections that have ended by now."""

        def close(self) -> None: ...


class ThreadedRelays:
    """The C relay (activator._relay) in a thread of its own, which never takes the GIL; the
    connections that ended come back to the engine's loop through an eventfd."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.handle = _relay.new(PIPE_SIZE)
        self.failure: BaseException | None = None
        import threading  # only for a proxy unit's relays, not at start-up

        self.thread = threading.Thread(target=self._run, name="activator-relay", daemon=True)
        self.fd = _relay.fileno(self.handle)
        proxy.engine.loop.add_reader(self.fd, self._on_ended)
        self.thread.start()

    def _run(self) -> None:
        try:
            _relay.run(self.handle)
        except BaseException as exc:  # noqa: BLE001 - reported by the loop's thread in _on_ended
            self.failure = exc

    def add(self, client: Client, backend: socket.socket, rid: int, notify: bool) -> None:
        _relay.add(self.handle, client.fd, backend.detach(), rid, notify)

    def collect(self, ack: bool = False) -> None:
        for rid, err in _relay.ended(self.handle, ack):
            self.proxy.relay_ended(rid, err)

    def _on_ended(self) -> None:
        self.collect(ack=True)
        if self.failure is not None:
            exc, self.failure = self.failure, None
            raise RuntimeError(f"the relay thread failed: {exc!r}")  # outside any unit: activator stops

    def close(self) -> None:
        _relay.stop(self.handle)
        self.thread.join(STOP_WAIT)
        self.proxy.engine.loop.remove(self.fd)
        if not self.thread.is_alive():
            _relay.close(self.handle)


def _pipe() -> tuple[int, int] | None:
    """A non-blocking pipe of PIPE_SIZE, or None without descriptors (the connection then copies)."""
    try:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # over the user's pipe quota: the default size works as well, in more steps
    return r, w


@dataclass(eq=False, slots=True)
class Flow:
    """One direction of a relay: bytes read from ``src`` go to ``dst`` through a pipe or a buffer."""

    src: int
    dst: socket.socket
    dfd: int
    pipe: tuple[int, int] | None
    buf: memoryview | None = None
    pending: int = 0  # read but not yet written
    start: int = 0  # copy mode: where the pending bytes begin
    eof: bool = False  # src has sent its FIN
    shut: bool = False  # ... and it has been passed on (shutdown(SHUT_WR) of dst)

    def __post_init__(self) -> None:
        if self.pipe is None:
            self.buf = memoryview(bytearray(BUFFER_SIZE))

    @property
    def readable(self) -> bool:
        return not self.eof and not self.pending

    @property
    def cap(self) -> int:
        return PIPE_SIZE if self.pipe is not None else BUFFER_SIZE

    def fill(self) -> int:
        """Read what src has (only when nothing is pending): the count, 0 at EOF; BlockingIOError when none."""
        if self.pipe is not None:
            try:
                n = os.splice(self.src, self.pipe[1], PIPE_SIZE, flags=SPLICE_FLAGS)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.close()  # this socket type cannot splice: copy
                self.buf = memoryview(bytearray(BUFFER_SIZE))
                return self.fill()
        else:
            assert self.buf is not None
            n = os.readv(self.src, [self.buf])
            self.start = 0
        self.pending = n
        return n

    def drain(self) -> bool:
        """Write what is pending to dst; False when dst cannot take it all now."""
        try:
            while self.pending:
                if self.pipe is not None:
                    n = os.splice(self.pipe[0], self.dfd, self.pending, flags=SPLICE_FLAGS)
                else:
                    assert self.buf is not None
                    n = os.write(self.dfd, self.buf[self.start:self.start + self.pending])
                    self.start += n
                self.pending -= n
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        if self.pipe is not None:
            os.close(self.pipe[0])
            os.close(self.pipe[1])
            self.pipe = None


class LoopRelays:
    """The relay in Python, in the engine's loop (when activator._relay is not built): an epoll set
    of its own, one reader of the loop, because a relay needs the event mask."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.ep = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        self.relays: set[Relay] = set()
        proxy.engine.loop.add_reader(self.ep.fileno(), self._on_events)

    def add(self, client: Client, backend: socket.socket, rid: int, notify: bool) -> None:
        sock = socket.socket(client.family, socket.SOCK_STREAM, 0, fileno=client.fd)
        try:
            sock.setblocking(False)
            if client.family in IP_FAMILIES:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small writes go on as they come
        except OSError:
            sock.close()
            backend.close()
            raise
        relay = Relay(self, sock, backend, rid)
        self.relays.add(relay)
        relay.on_client(IN)  # the request is most likely there already; this also registers both sockets

    def collect(self) -> None:
        pass  # ends are reported as they happen

    def watch(self, fd: int, mask: int, old: int) -> None:
        """Change what ``fd`` is watched for (0: not at all, so that a hang-up cannot wake us for nothing)."""
        if not mask:
            self.ep.unregister(fd)
        elif not old:
            self.ep.register(fd, mask)
        else:
            self.ep.modify(fd, mask)

    def _on_events(self) -> None:
        handlers = self.handlers
        # A descriptor closed and reused within one batch may get its predecessor's event: every
        # handler takes a spurious event (EAGAIN) in its stride.
        for fd, events in self.ep.poll(0, MAX_EVENTS):
            handler = handlers.get(fd)
            if handler is None:
                continue
            try:
                handler(events)
            except Exception as exc:  # noqa: BLE001 - a fault of ours: that connection goes, its unit fails
                relay = getattr(handler, "__self__")
                self.proxy.fault(relay.rid, exc)
                relay.close(errno.EIO)

    def ended(self, relay: Relay, err: int) -> None:
        self.relays.discard(relay)
        self.proxy.relay_ended(relay.rid, err)

    def close(self) -> None:
        for relay in list(self.relays):
            relay.close(0, report=False)
        self.proxy.engine.loop.remove(self.ep.fileno())
        self.ep.close()


class Relay:
    """Two sockets and two flows between them (LoopRelays); ends when both directions are done, or on an error."""

    __slots__ = ("owner", "client", "backend", "rid", "cfd", "bfd", "up", "down", "cmask", "bmask")

    def __init__(self, owner: LoopRelays, client: socket.socket, backend: socket.socket, rid: int) -> None:
        self.owner, self.client, self.backend, self.rid = owner, client, backend, rid
        self.cfd, self.bfd = client.fileno(), backend.fileno()
        self.up = Flow(self.cfd, backend, self.bfd, _pipe())  # client -> backend
        self.down = Flow(self.bfd, client, self.cfd, _pipe())  # backend -> client
        self.cmask = self.bmask = 0
        owner.handlers[self.cfd] = self.on_client
        owner.handlers[self.bfd] = self.on_backend

    def on_client(self, events: int) -> None:
        self._event(events, self.up, self.down)

    def on_backend(self, events: int) -> None:
        self._event(events, self.down, self.up)

    def _event(self, events: int, reading: Flow, writing: Flow) -> None:
        """``reading`` takes from the socket that has the event, ``writing`` writes to it."""
        try:
            if events & WRITE_EVENTS and writing.pending:
                self._flush(writing)
            if events & READ_EVENTS and reading.readable:
                self._pump(reading)
        except OSError as exc:  # ECONNRESET, EPIPE, ...: this connection is over, nobody else's
            self.close(exc.errno or errno.EIO)
            return
        if self.up.shut and self.down.shut:
            self.close(0)
        else:
            self.update()

    def _pump(self, flow: Flow) -> None:
        for _ in range(ROUNDS):
            try:
                n = flow.fill()
            except BlockingIOError:
                return
            if n == 0:
                flow.eof = True
                self._pass_eof(flow)
                return
            if not flow.drain() or n < flow.cap:
                return  # the receiver is full, or the sender had no more for now

    def _flush(self, flow: Flow) -> None:
        if flow.drain():
            if flow.eof:
                self._pass_eof(flow)
            else:
                self._pump(flow)  # it has most likely sent more while we waited

    @staticmethod
    def _pass_eof(flow: Flow) -> None:
        if not flow.pending and not flow.shut:
            flow.shut = True
            flow.dst.shutdown(socket.SHUT_WR)

    def update(self) -> None:
        """Watch each socket for what its flows wait for: reading when empty, writing when full."""
        up, down = self.up, self.down
        cmask = (IN if up.readable else 0) | (OUT if down.pending else 0)
        bmask = (IN if down.readable else 0) | (OUT if up.pending else 0)
        if cmask != self.cmask:
            self.owner.watch(self.cfd, cmask, self.cmask)
            self.cmask = cmask
        if bmask != self.bmask:
            self.owner.watch(self.bfd, bmask, self.bmask)
            self.bmask = bmask

    def close(self, err: int, report: bool = True) -> None:
        """Both sockets close; a reset on one side (TCP) is passed on as a reset."""
        if err in (errno.ECONNRESET, errno.EPIPE):
            for sock in (self.client, self.backend):
                if sock.family in IP_FAMILIES:
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                    except OSError:
                        pass
        owner = self.owner
        for fd, mask in ((self.cfd, self.cmask), (self.bfd, self.bmask)):
            if mask:
                owner.watch(fd, 0, mask)
            owner.handlers.pop(fd, None)
        self.cmask = self.bmask = 0
        self.up.close()
        self.down.close()
        self.client.close()
        self.backend.close()
        if report:
            owner.ended(self, err)
        else:
            owner.relays.discard(self)


# ====================================================================== connections
@dataclass(eq=False, slots=True)
class Client:
    """An accepted connection: its descriptor (no socket object: the C relay takes the number)."""

    fd: int
    family: int
    addr: str | None  # the peer's IP address (max-connections-per-source), None for local peers

    def close(self) -> None:
        os.close(self.fd)


@dataclass(eq=False, slots=True)
class Dial:
    """A connection to the backend in progress, for one client."""

    pu: ProxyUnit
    client: Client
    sock: socket.socket
    probe: bool  # the attempt that finds out whether the backend is there yet


@dataclass(eq=False)
class ProxyUnit:
    """The proxy's side of one unit: connections waiting, being connected and relayed."""

    us: UnitState
    pending: deque[Client] = field(default_factory=deque)
    dials: set[Dial] = field(default_factory=set)
    relays: set[int] = field(default_factory=set)  # ids of the relayed connections
    reachable: bool = False  # the backend of the current run has accepted a connection
    ready: bool = False  # READY=1 seen for the current run (type = "notify")
    gave_up: bool = False  # the last run exited by itself, with connections waiting, before it accepted one
    probing: bool = False
    backoff: float = FIRST_RETRY
    retry_timer: TimerHandle | None = None
    deadline_timer: TimerHandle | None = None
    idle_timer: TimerHandle | None = None

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.dials or self.relays)

    def count(self) -> int:
        return len(self.pending) + len(self.dials) + len(self.relays)


class Proxy:
    """Every proxy unit's connections: waiting for the backend, being connected, relayed."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.units: dict[UnitState, ProxyUnit] = {}
        self.open: dict[int, tuple[ProxyUnit, str | None]] = {}  # relay id -> its unit and client address
        self._ids = itertools.count(1)
        self._relays: Relays | None = None
        self._poller = select.poll()

    @property
    def log(self):
        return self.engine.log

    @property
    def relays(self) -> Relays:
        if self._relays is None:  # made at the first connection: units without a proxy pay nothing
            self._relays = ThreadedRelays(self) if _relay is not None else LoopRelays(self)
        return self._relays

    # ------------------------------------------------------------------ hooks
    def unit(self, us: UnitState) -> ProxyUnit:
        pu = self.units.get(us)
        if pu is None:
            pu = self.units[us] = ProxyUnit(us)
        return pu

    def count(self, us: UnitState) -> int:
        """Connections of the unit: waiting, being connected and relayed (max-connections counts them)."""
        pu = self.units.get(us)
        if pu is None:
            return 0
        if self._relays is not None:
            self._relays.collect()  # connections that have ended do not count (nor count per source)
        return pu.count()

    def connection(self, us: UnitState, fd: int, family: int, addr: str | None) -> None:
        """A connection accepted on a front socket of ``us``; ``fd`` is ours from now on."""
        client = Client(fd, family, addr)
        pu = self.unit(us)
        if addr is not None:
            us.per_source[addr] = us.per_source.get(addr, 0) + 1
        cancel(pu.idle_timer)
        pu.idle_timer = None
        if pu.reachable:
            self._dial(pu, client, probe=False)
        else:
            pu.pending.append(client)
            self._advance(pu)

    def started(self, us: UnitState) -> None:
        """A new run of the unit's daemon."""
        if us.unit.service.proxy_to is None:
            return
        pu = self.unit(us)
        pu.reachable = pu.ready = pu.gave_up = False
        cancel(pu.retry_timer)
        pu.retry_timer = None
        pu.backoff = FIRST_RETRY
        self._advance(pu)
        self._check_idle(pu)

    def ready(self, us: UnitState) -> None:
        """READY=1 from the daemon."""
        pu = self.units.get(us)
        if pu is not None:
            pu.ready = True
            self._advance(pu)

    def exited(self, us: UnitState) -> None:
        """The daemon's main process ended: relays to it end by themselves, new connections wait."""
        pu = self.units.get(us)
        if pu is not None:
            # A daemon that fails before it accepts anything is not started again for the connections
            # that wait (unless restart= says so): they are closed. One we stopped is started again.
            pu.gave_up = (bool(pu.pending or pu.dials) and not pu.reachable and not us.forced)
            pu.reachable = pu.ready = False
            cancel(pu.idle_timer)
            pu.idle_timer = None

    def idle(self, us: UnitState) -> None:
        """The unit has no process left: connections that wait get a fresh start (or the next generation)."""
        pu = self.units.get(us)
        if pu is None:
            return
        if us.retired:
            self._hand_over(pu)
        else:
            self._advance(pu)

    def failed(self, us: UnitState) -> None:
        pu = self.units.get(us)
        if pu is not None:
            self._give_up(pu, "the unit failed")

    def close(self) -> None:
        """activator stops: every connection and descriptor of ours is closed."""
        for pu in list(self.units.values()):
            self._give_up(pu, None)
            cancel(pu.idle_timer)
        if self._relays is not None:
            self._relays.close()
            self._relays = None
        self.units.clear()
        self.open.clear()

    def fault(self, rid: int, exc: Exception) -> None:
        """An internal error while relaying (LoopRelays): contained as the engine contains a unit's callbacks."""
        entry = self.open.get(rid)
        self.engine.loop.on_fault(entry[0].us if entry else None, exc)

    # -------------------------------------------------------- the backend
    def _advance(self, pu: ProxyUnit) -> None:
        """Bring the backend to the waiting connections: start the daemon, or try to connect."""
        if not pu.pending:
            return
        us = pu.us
        if us.failed or us.retired:
            if us.retired and not us.has_processes():
                self._hand_over(pu)
            return  # a failed unit's clients were closed; a retired one's wait for its processes to go
        if us.held:  # `ctl stop --disarm`: nothing is started until the unit is started again
            self._give_up(pu, "the unit is stopped")
            return
        if pu.reachable:
            self._dispatch(pu)
            return
        self._arm_deadline(pu)
        if us.main_pid is None or us.forced:  # not running, or on its way out
            if us.has_processes() or us.restart_pending or pu.retry_timer is not None:
                return  # idle(), started() or the retry comes back here
            if pu.gave_up:
                pu.gave_up = False
                self._give_up(pu, "the service exited before it accepted a connection")
                return
            if self.engine.start_unit(us) or us.has_processes():
                return  # started() tried the backend already
            if us.paused_until and not self.engine.stopping:  # start-limit: wait for the end of the pause
                pu.retry_timer = self.engine.loop.call_at(us.paused_until, partial(self._retry, pu), us)
            else:
                self._give_up(pu, None if self.engine.stopping else "the service cannot be started now")
            return
        if us.unit.service.type == "notify" and not pu.ready:
            return
        if pu.probing or pu.retry_timer is not None:
            return
        pu.probing = True
        self._dial(pu, pu.pending.popleft(), probe=True)

    def _dispatch(self, pu: ProxyUnit) -> None:
        while pu.pending and pu.reachable:
            self._dial(pu, pu.pending.popleft(), probe=False)

    def _dial(self, pu: ProxyUnit, client: Client, probe: bool) -> None:
        address = pu.us.unit.service.proxy_to
        assert address is not None
        try:
            sock = socket.socket(address.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:  # out of descriptors: this client cannot be served, the others may
            self.log.warning("proxy-connect", f"cannot connect to {address}: {exc.strerror or exc}",
                             unit=pu.us.name, collapse_key="socket", collapse_what="backend connections failed")
            if probe:
                pu.probing = False
            self._drop(pu, client)
            return
        if address.family in IP_FAMILIES:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(address.sockaddr)
        if err == errno.EINPROGRESS and self._connected_now(sock):
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            self._connected(pu, client, sock, probe)
        elif err == errno.EINPROGRESS:
            dial = Dial(pu, client, sock, probe)
            pu.dials.add(dial)
            self.engine.loop.add_writer(sock.fileno(), partial(self._dial_event, dial), pu.us)
        else:
            sock.close()
            self._refused(pu, client, err, probe)

    def _connected_now(self, sock: socket.socket) -> bool:
        """Whether a connection in progress is complete already: over loopback the handshake is done
        before connect() returns, which saves a round of the loop for every connection."""
        poller = self._poller
        poller.register(sock, select.POLLOUT)
        try:
            return bool(poller.poll(0))
        finally:
            poller.unregister(sock)

    def _dial_event(self, dial: Dial) -> None:
        if dial not in dial.pu.dials:
            return  # closed earlier in this batch (the loop delivers events it collected before)
        sock = dial.sock
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self._unwatch_dial(dial)
        if err:
            sock.close()
            self._refused(dial.pu, dial.client, err, dial.probe)
        else:
            self._connected(dial.pu, dial.client, sock, dial.probe)

    def _unwatch_dial(self, dial: Dial) -> None:
        self.engine.loop.remove(dial.sock.fileno())
        dial.pu.dials.discard(dial)

    def _close_dial(self, dial: Dial) -> None:
        self._unwatch_dial(dial)
        dial.sock.close()
        self._drop(dial.pu, dial.client)

    def _connected(self, pu: ProxyUnit, client: Client, sock: socket.socket, probe: bool) -> None:
        rid = next(self._ids)
        self.open[rid] = (pu, client.addr)
        pu.relays.add(rid)
        try:
            self.relays.add(client, sock, rid, pu.us.unit.service.exit_idle_sec != INFINITY)
        except OSError as exc:  # out of memory or descriptors: this connection cannot be relayed (and is closed)
            self.log.warning("proxy-relay", f"cannot relay a connection: {exc.strerror or exc}", unit=pu.us.name,
                             collapse_key="relay", collapse_what="connections not relayed")
            self.relay_ended(rid, exc.errno or errno.EIO)
        if probe:
            pu.probing = False
        if not pu.reachable:
            pu.reachable = True
            pu.backoff = FIRST_RETRY
            cancel(pu.deadline_timer)
            pu.deadline_timer = None
            self._dispatch(pu)

    def _refused(self, pu: ProxyUnit, client: Client, err: int, probe: bool) -> None:
        us = pu.us
        if err not in NOT_LISTENING:
            self.log.warning("proxy-connect", f"cannot connect to {us.unit.service.proxy_to}: {os.strerror(err)}",
                             unit=us.name, collapse_key="connect", collapse_what="backend connections failed")
        pu.reachable = False
        pu.pending.appendleft(client)
        if not probe:
            self._advance(pu)  # find out again: the backend may have gone
            return
        pu.probing = False
        pu.retry_timer = self.engine.loop.call_later(pu.backoff, partial(self._retry, pu), us)
        pu.backoff = min(pu.backoff * 2, MAX_RETRY)

    def _retry(self, pu: ProxyUnit) -> None:
        pu.retry_timer = None
        self._advance(pu)

    def _arm_deadline(self, pu: ProxyUnit) -> None:
        timeout = pu.us.unit.service.timeout_start
        if pu.deadline_timer is None and 0 < timeout < INFINITY:
            pu.deadline_timer = self.engine.loop.call_later(timeout, partial(self._expire, pu), pu.us)

    def _expire(self, pu: ProxyUnit) -> None:
        pu.deadline_timer = None
        if pu.reachable or not pu.pending:
            return
        us = pu.us
        timeout = us.unit.service.timeout_start
        self.log.warning("proxy-timeout", f"the backend {us.unit.service.proxy_to} accepted no connection within "
                                          f"{timeout:g}s: closing {len(pu.pending) + len(pu.dials)} waiting "
                                          "connection(s)", unit=us.name)
        self._give_up(pu, None)
        if us.main_pid is not None and not us.forced:
            self.engine.stop_unit(us, "timeout")

    def _give_up(self, pu: ProxyUnit, why: str | None) -> None:
        """Close every connection that waits for the backend (relays go on); ``why`` is logged."""
        n = len(pu.pending) + len(pu.dials)
        if why and n:
            self.log.warning("proxy-closed", f"{why}: closing {n} waiting connection(s)", unit=pu.us.name)
        for dial in list(pu.dials):
            self._close_dial(dial)
        while pu.pending:
            self._drop(pu, pu.pending.popleft())
        pu.probing = False
        cancel(pu.retry_timer)
        cancel(pu.deadline_timer)
        pu.retry_timer = pu.deadline_timer = None
        self._check_idle(pu)

    def _hand_over(self, pu: ProxyUnit) -> None:
        """A retired unit's waiting connections go to the unit that replaced it, if it is a proxy too."""
        successor = self.engine.units.get(pu.us.name)
        if (successor is not None and successor is not pu.us and successor.unit.service.proxy_to is not None
                and successor.waiting_for is None):  # one that still waits for another generation cannot start
            waiting, pu.pending = pu.pending, deque()
            for client in waiting:
                self._release(pu, client.addr)
                self.connection(successor, client.fd, client.family, client.addr)
        self._give_up(pu, "the unit was removed")
        self._forget(pu)

    # ------------------------------------------------------- bookkeeping
    def _release(self, pu: ProxyUnit, addr: str | None) -> None:
        if addr is not None:
            left = pu.us.per_source.get(addr, 1) - 1
            if left > 0:
                pu.us.per_source[addr] = left
            else:
                pu.us.per_source.pop(addr, None)

    def _drop(self, pu: ProxyUnit, client: Client) -> None:
        self._release(pu, client.addr)
        client.close()

    def relay_ended(self, rid: int, err: int) -> None:
        """A relayed connection is over (``err`` 0: both directions done, else the errno that ended it)."""
        entry = self.open.pop(rid, None)
        if entry is None:
            return
        pu, addr = entry
        pu.relays.discard(rid)
        self._release(pu, addr)
        if err and self.log.enabled("debug"):
            self.log.debug("proxy-end", f"connection ended: {os.strerror(err)}", unit=pu.us.name)
        if pu.us.retired:
            self._forget(pu)
        else:
            self._check_idle(pu)

    def _forget(self, pu: ProxyUnit) -> None:
        if not pu.busy and self.units.get(pu.us) is pu:
            cancel(pu.idle_timer)
            del self.units[pu.us]

    # ------------------------------------------------------- exit-idle-sec
    def _check_idle(self, pu: ProxyUnit) -> None:
        """Count the idle time from now if nothing uses the running daemon."""
        us = pu.us
        limit = us.unit.service.exit_idle_sec
        if limit == INFINITY or pu.idle_timer is not None or pu.busy or us.main_pid is None or us.forced:
            return
        pu.idle_timer = self.engine.loop.call_later(limit, partial(self._idle_stop, pu), us)

    def _idle_stop(self, pu: ProxyUnit) -> None:
        pu.idle_timer = None
        us = pu.us
        if pu.busy or us.main_pid is None or us.forced or us.retired or self.engine.stopping:
            return
        self.log.info("idle-stop", f"no connection for {us.unit.service.exit_idle_sec:g}s, stopping the service",
                      unit=us.name, pid=us.main_pid)
        pu.reachable = False  # from now on connections wait for the next run
        self.engine.halt_unit(us)  # no restart= afterwards; the front sockets stay armed
