"""One log line per event on stderr, as text or as JSON (one object per line), never blocking.

A supervisor must not stop because nobody reads its stderr: a stalled pipe to a container
engine once left activator stuck in write(2), ignoring SIGTERM. So :class:`Log` never waits:

* Each line is written at once if the output takes it without blocking; what it does not take
  waits in a buffer of at most ``buffer_bytes`` (256 KiB). When that is full, new lines are
  dropped and counted, and where the gap is, one line ``N log lines dropped (output stalled)``
  (event ``log-dropped``) is written once there is room again.
* Floods of one event collapse: a line logged with ``collapse_key=`` (the same event, unit and
  key) is written once per ``collapse_window`` (5 s); the rest of the window is counted and
  summed up in one line of the same event and level, ``N more <what> from <key>``, when the
  window ends (through ``schedule``) or, without ``schedule``, with the next collapsible event
  or at :meth:`Log.close`. At most 1024 keys are followed at once; beyond that, keys share one
  summary, ``from other sources``. The caller says what collapses, keyed by the address and not
  the port (every connection has a new port)::

      log.warning("denied", f"connection from {addr}:{port} denied by ip-address rules",
                  unit=name, collapse_key=addr, collapse_what="connections denied")
      # later, once: "41 more connections denied from 192.0.2.7" (JSON: "count": 41)

How the output is written without blocking depends on what fd 2 is. Setting O_NONBLOCK on fd 2
itself is not an option: the open file description is shared with our parent and with the
daemons, which inherit stderr, and a daemon would start getting EAGAIN from its own writes.

* a pipe, FIFO or terminal: reopened through ``/proc/self/fd/2``, which gives a new open file
  description of the same pipe or terminal whose O_NONBLOCK is ours alone. Each write is whole
  lines of at most PIPE_BUF bytes in all (unless one line is longer), which a pipe takes
  atomically: our lines never interleave with a daemon's output.
  When the reopen is refused (a pipe created by another user, no /proc), a zero-timeout poll()
  before each write of at most PIPE_BUF bytes: POLLOUT on a pipe means a free page, so such a
  write does not block, unless a daemon writing to the same pipe takes that page first (a
  narrow race, the only one left).
* a socket (journald's stdout stream): ``send(MSG_DONTWAIT)``, non-blocking per call.
* a regular file, ``/dev/null``, other devices: plain writes; they never wait for a reader.

Engine API (the loop stays idle unless there is something to write):

* ``fileno_to_watch() -> int | None``: the descriptor to watch for EVENT_WRITE, or None when
  nothing is pending (then unregister it). ``wants_write()`` is the same as a bool. Check after
  each round of events: any log call may leave lines pending.
* ``flush_some()``: writes what the output takes now, never blocks; call it when the watched
  descriptor is writable. (Every log call tries too, so without the engine's help pending
  lines still go out with the next line logged.)
* ``schedule``: an optional ``(when, callback)`` hook, ``when`` on the ``time.monotonic()``
  clock, that calls ``callback()`` once at ``when`` (``Timers.add`` fits); Log uses it only
  for the summary at the end of a collapse window, one call per flood.
* ``close(timeout=1.0)``: at exit; sums up the running floods, writes what is pending for at
  most ``timeout`` seconds (``flush_final(timeout)``, which does only that), then gives up and
  releases the output. Registered with atexit, so that the last lines are not lost when the
  caller forgets.

Wiring, in short::

    log.schedule = engine.timers.add
    # after each round of events:
    fd = log.fileno_to_watch()   # register fd for EVENT_WRITE with data=log.flush_some, or unregister
    # at exit:
    log.close()

JSON lines have the keys ``time``, ``level``, ``unit``, ``pid``, ``event``, ``message``, plus
``count`` on the lines that stand for several events: a collapse summary (how many more) and
``log-dropped`` (how many lines were lost).
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import errno
import itertools
import os
import select
from . import socketapi as socket
import stat
import sys
import time

from .records import dataclass

TYPE_CHECKING = False  # typing is not imported at run time (start-up, memory); type checkers see it
if TYPE_CHECKING:
    from typing import Any, Callable, Iterator

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
BUFFER_BYTES = 256 * 1024
COLLAPSE_WINDOW = 5.0
MAX_FLOODS = 1024
FINAL_TIMEOUT = 1.0
BATCH_BYTES = 64 * 1024  # per write to a file; also how much a hold() collects before it writes
MARKER_ROOM = 512  # at least what a log-dropped line takes, in either format
OTHER_SOURCES = object()  # the shared collapse key once MAX_FLOODS keys are followed

if TYPE_CHECKING:
    Schedule = Callable[[float, Callable[[], None]], object]

# Text lines: control characters in a message (a TOML key, a socket name) must not start a fake line.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(32), 127)} | {0x85: "\\x85", 0x2028: "\\u2028", 0x2029: "\\u2029"}


@dataclass
class _Output:
    """Writing to the log's descriptor without blocking."""

    write: Callable[[bytes], int]  # bytes taken (0: it would block); OSError when the output fails
    ready: Callable[[], bool]  # room for a write now (cheap: checked before a batch is put together)
    release: Callable[[], None]
    fileno: int | None  # what to watch for writability; None: writes never wait
    batch: int  # bytes per write


@dataclass
class _Flood:
    level: str
    event: str
    unit: str | None
    what: str
    who: str
    until: float  # end of the window, time.monotonic()
    more: int = 0


class Log:
    def __init__(self, verbose: bool = False, fmt: str = "text", stream: Any = None, prog: str = "activator", *,
                 buffer_bytes: int = BUFFER_BYTES, collapse_window: float = COLLAPSE_WINDOW,
                 schedule: Schedule | None = None):
        """``stream``: where to log, anything with ``fileno()`` (default ``sys.stderr``, fd 2);
        without a usable descriptor, lines are discarded."""
        self.threshold = LEVELS["debug"] if verbose else LEVELS["info"]
        self.json = fmt == "json"
        self.prog = prog
        self.pid = os.getpid()
        self.schedule = schedule
        self.buffer_bytes = buffer_bytes
        self.collapse_window = collapse_window
        self._output = _open_output(_fileno(sys.stderr if stream is None else stream))
        # Lines waiting for the output, each with the number of events it stands for (a
        # log-dropped line: its count), so that lines lost to a write error are counted exactly.
        self._pending: collections.deque[tuple[bytes, int]] = collections.deque()
        self._pending_bytes = 0
        self._dropped = 0
        self._drop_reason = "output stalled"
        self._holding = False
        self._floods: collections.OrderedDict[tuple, _Flood] = collections.OrderedDict()  # oldest window first
        atexit.register(self.close)

    # ------------------------------------------------------------ logging
    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Batch the lines logged inside into few writes (1,000 sockets: a few writes, not 1,000)."""
        was, self._holding = self._holding, True
        try:
            yield
        finally:
            self._holding = was
            if not was:
                self.flush_some()

    def enabled(self, level: str) -> bool:
        return LEVELS[level] >= self.threshold

    def emit(self, level: str, event: str, message: str, unit: str | None = None, pid: int | None = None,
             collapse_key: str | None = None, collapse_what: str | None = None,
             fields: dict[str, Any] | None = None) -> None:
        """Log one event (``fields``: more keys of its JSON record: a graceful restart's reason, a worker's index,
        the path of a watch-change). With ``collapse_key`` (say, the client's address), repeats of the same
        event, unit and key within the collapse window are counted instead of written, and summed
        up as ``N more <collapse_what> from <collapse_key>`` (default what: ``'EVENT' events``)."""
        if LEVELS[level] < self.threshold:
            return
        if collapse_key is not None and self._collapsed(level, event, unit, collapse_key, collapse_what):
            return
        self._add(self._format(level, event, message, unit, pid, fields=fields))

    def debug(self, event: str, message: str, **kw: Any) -> None:
        self.emit("debug", event, message, **kw)

    def info(self, event: str, message: str, **kw: Any) -> None:
        self.emit("info", event, message, **kw)

    def warning(self, event: str, message: str, **kw: Any) -> None:
        self.emit("warning", event, message, **kw)

    def error(self, event: str, message: str, **kw: Any) -> None:
        self.emit("error", event, message, **kw)

    def _format(self, level: str, event: str, message: str, unit: str | None, pid: int | None,
                count: int | None = None, fields: dict[str, Any] | None = None) -> bytes:
        if self.json:
            import json  # only for --log-format json: text logs do without it

            now = time.time()  # read once: seconds and milliseconds must come from the same instant
            record: dict[str, object] = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z",
                "level": level, "unit": unit, "pid": pid, "event": event, "message": message,
            }
            if count is not None:
                record["count"] = count
            if fields:  # an event's own fields (a graceful restart's reason, a worker's index): after the common ones
                record.update({k: v for k, v in fields.items() if k not in record})
            line = json.dumps(record, separators=(",", ":"))
        else:
            prefix = f"{self.prog}[{self.pid}]: "
            if unit:
                prefix += f"{unit}: "
            if level in ("warning", "error"):
                prefix += f"{level}: "
            line = prefix + message
            if not line.isprintable():
                line = line.translate(_ESCAPES)
        # backslashreplace: a path decoded with surrogateescape must not make logging fail.
        return (line + "\n").encode("utf-8", "backslashreplace")

    # ------------------------------------------------------------ floods
    def _collapsed(self, level: str, event: str, unit: str | None, key: str, what: str | None) -> bool:
        """True when this event is counted into a running flood instead of being written."""
        now = time.monotonic()
        self._end_floods(now)
        ident: tuple = (event, unit, key)
        flood = self._floods.get(ident)
        if flood is None and len(self._floods) >= MAX_FLOODS:
            ident = (event, unit, OTHER_SOURCES)
            flood = self._floods.get(ident)
            key = "other sources"
        if flood is None:
            self._floods[ident] = _Flood(level, event, unit, what or f"'{event}' events", key, now + self.collapse_window)
            return False
        flood.more += 1
        if flood.more == 1 and self.schedule is not None:
            self.schedule(flood.until, lambda: self._window_ended(ident, flood))
        return True

    def _end_floods(self, now: float) -> None:
        """Sum up the floods whose window has ended (they are in the order their windows end)."""
        while self._floods:
            ident, flood = next(iter(self._floods.items()))
            if flood.until > now:
                return
            self._end_flood(ident)

    def _window_ended(self, ident: tuple, flood: _Flood) -> None:
        if self._floods.get(ident) is flood:
            self._end_flood(ident)

    def _end_flood(self, ident: tuple) -> None:
        flood = self._floods.pop(ident)
        if flood.more:
            message = f"{flood.more} more {flood.what} from {flood.who}"
            self._add(self._format(flood.level, flood.event, message, flood.unit, None, count=flood.more))

    # ------------------------------------------------------------ output
    def _add(self, line: bytes) -> None:
        if self._output is None:
            return
        if self._pending_bytes + len(line) + (MARKER_ROOM if self._dropped else 0) > self.buffer_bytes:
            self.flush_some()  # drop only what the output cannot take now either
        if self._dropped:
            self._add_drop_marker(len(line))
        if self._dropped or self._pending_bytes + len(line) > self.buffer_bytes:
            self._dropped += 1
            self._drop_reason = "output stalled"
        else:
            self._pending.append((line, 1))
            self._pending_bytes += len(line)
        if not self._holding or self._pending_bytes >= BATCH_BYTES:
            self.flush_some()

    def _add_drop_marker(self, room_after: int = 0) -> None:
        """The line that says how many were lost, where they were lost, once it fits (with ``room_after`` more)."""
        # Room is checked before the line is formatted: this runs for every line that a stall drops.
        if self._pending_bytes + MARKER_ROOM + room_after > self.buffer_bytes:
            return
        marker = self._format("warning", "log-dropped", f"{self._dropped} log lines dropped ({self._drop_reason})",
                              None, None, count=self._dropped)
        self._pending.append((marker, self._dropped))
        self._pending_bytes += len(marker)
        self._dropped = 0

    def wants_write(self) -> bool:
        return self._output is not None and bool(self._pending)

    def fileno_to_watch(self) -> int | None:
        """The descriptor to watch for writability while lines are pending, else None."""
        return self._output.fileno if self._output is not None and self._pending else None

    def flush_some(self) -> None:
        """Write what the output takes now, without blocking."""
        out = self._output
        while out is not None and self._pending and out.ready():
            batch = self._next_batch(out.batch)
            try:
                written = out.write(batch)
            except OSError as exc:
                self._write_failed(exc)
                return
            self._consume(written)
            if written < len(batch):
                return
            if not self._pending and self._dropped:
                self._add_drop_marker()

    def _next_batch(self, limit: int) -> bytes:
        """Whole lines from the front, at most ``limit`` bytes unless the first line alone is longer."""
        lines = [self._pending[0][0]]
        size = len(lines[0])
        for line, _ in itertools.islice(self._pending, 1, None):
            if size + len(line) > limit:
                break
            lines.append(line)
            size += len(line)
        return b"".join(lines)

    def _consume(self, written: int) -> None:
        self._pending_bytes -= written
        while written:
            head, weight = self._pending[0]
            if written < len(head):
                self._pending[0] = (head[written:], weight)
                return
            written -= len(head)
            self._pending.popleft()

    def _write_failed(self, exc: OSError) -> None:
        if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.EBADF):
            self._release()  # nobody will ever read it: stop trying (and an epoll on it would spin)
            return
        # ENOSPC, EIO...: lose what was pending, say so once writing works again.
        self._dropped += sum(weight for _, weight in self._pending)
        self._drop_reason = f"write error: {exc.strerror or exc}"
        self._pending.clear()
        self._pending_bytes = 0

    # ------------------------------------------------------------ the end
    def close(self, timeout: float = FINAL_TIMEOUT) -> bool:
        """Sum up the floods, write what is pending for at most ``timeout`` seconds, then release
        the output (later lines are discarded). True when everything was written."""
        atexit.unregister(self.close)
        while self._floods:
            self._end_flood(next(iter(self._floods)))
        done = self.flush_final(timeout)
        self._release()
        return done

    def flush_final(self, timeout: float = FINAL_TIMEOUT) -> bool:
        """Write what is pending, waiting at most ``timeout`` seconds for the output; True when all is written."""
        deadline = time.monotonic() + timeout
        self.flush_some()
        while self.wants_write():
            fd = self.fileno_to_watch()
            left = deadline - time.monotonic()
            if fd is None or left <= 0:
                break
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            if not poller.poll(left * 1000):
                break
            self.flush_some()
        return not self.wants_write() and not self._dropped

    def _release(self) -> None:
        out, self._output = self._output, None
        self._pending.clear()
        self._pending_bytes = 0
        if out is not None:
            out.release()


# ---------------------------------------------------------------- outputs
def _fileno(stream: Any) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # None, closed, or not backed by a descriptor
        return None


def _open_output(fd: int | None) -> _Output | None:
    """The way to write to ``fd`` without blocking (see the module docstring), None when it is not open."""
    if fd is None:
        return None
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return None  # stderr closed: a supervisor does not need it
    if stat.S_ISSOCK(mode):
        return _socket_output(fd) or _polled_output(fd)
    if stat.S_ISFIFO(mode) or (stat.S_ISCHR(mode) and os.isatty(fd)):
        return _reopened_output(fd) or _polled_output(fd)
    return _Output(lambda data: _write_all(fd, data), lambda: True, lambda: None, None, BATCH_BYTES)


def _socket_output(fd: int) -> _Output | None:
    dup = os.dup(fd)  # our own descriptor (close-on-exec), the same socket
    try:
        sock = socket.socket(fileno=dup)
    except OSError:  # a socket of a kind Python cannot wrap
        os.close(dup)
        return None

    def send(data: bytes) -> int:
        try:
            return sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return 0

    return _Output(send, _poll_out(dup), sock.close, dup, select.PIPE_BUF)


def _reopened_output(fd: int) -> _Output | None:
    """A new open file description of the same pipe or terminal, non-blocking for us alone."""
    try:
        own = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    a, b = os.fstat(fd), os.fstat(own)
    if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):  # not what fd 2 is (no real /proc)
        os.close(own)
        return None

    def write(data: bytes) -> int:
        try:
            return os.write(own, data)
        except BlockingIOError:
            return 0

    return _Output(write, _poll_out(own), lambda: os.close(own), own, select.PIPE_BUF)


def _polled_output(fd: int) -> _Output:
    """fd stays blocking (it is shared): write at most PIPE_BUF bytes, each only after poll() said there is room."""
    return _Output(lambda data: os.write(fd, data[:select.PIPE_BUF]), _poll_out(fd), lambda: None, fd, select.PIPE_BUF)


def _poll_out(fd: int) -> Callable[[], bool]:
    """A zero-timeout check for room to write (also true on an error: the write then reports it)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return lambda: bool(poller.poll(0))


def _write_all(fd: int, data: bytes) -> int:
    """Files and devices that never wait for a reader: write everything."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return len(data)
