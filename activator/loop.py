"""The event loop: epoll, one-shot timers and the signal pipe. It knows nothing of units.

One thread. Signals are turned into bytes on a pipe (``signal.set_wakeup_fd``) and
handed to one callback between events, like gunicorn's arbiter. The loop sleeps in
the kernel until a descriptor is ready or the next timer is due; with no timer it
never wakes.

Every callback runs through :meth:`Loop.dispatch`: an exception in it does not end
the loop but goes to ``on_fault(owner, exc)`` with the ``owner`` the callback was
registered with (the engine passes a unit's state, or None for its own machinery),
so one unit's fault can be contained while a fault outside any unit stops
everything cleanly.

epoll directly rather than ``selectors``: that module (with what it imports) costs an init's
start-up time and memory, for the one selector Linux needs. Its semantics are kept: a descriptor
is watched for reading or for writing, never both; an error or hang-up wakes its callback; a
batch's callbacks are the ones registered when the batch was read; a closed socket can still be
removed by the object that was registered.
"""
from __future__ import annotations

import itertools
import os
import select
import time

from . import signalapi as signal

TYPE_CHECKING = False  # typing is not imported at run time (start-up, memory); type checkers see it
if TYPE_CHECKING:
    from typing import Any, Callable

# epoll takes its timeout in milliseconds as a C int: longer waits are cut to this and the
# loop simply goes back to sleep, so a timer of any length is safe (it wakes at most once
# every 24.8 days on the way).
MAX_WAIT = (2**31 - 1) / 1000.0 - 1.0

if TYPE_CHECKING:
    Callback = Callable[[], Any]

COMPACT_MIN = 64  # timer entries before cancelled ones are dropped (see Timers)


class TimerHandle:
    """A pending timer; ``cancel()`` makes it a no-op. Cheap: the queue skips cancelled entries."""

    __slots__ = ("when", "callback", "owner")

    def __init__(self, when: float, callback: Callback | None, owner: object) -> None:
        self.when = when
        self.callback = callback
        self.owner = owner

    def cancel(self) -> None:
        self.callback = None

    @property
    def active(self) -> bool:
        return self.callback is not None


def cancel(handle: TimerHandle | None) -> None:
    """Cancel ``handle`` if there is one (most timers are optional)."""
    if handle is not None:
        handle.cancel()


class Timers:
    """One-shot timers ordered by due time, then by creation.

    A list kept sorted latest first (the next due is at the end, popped in O(1)), an insertion found by
    bisection: timers are few (a unit's restart, stop or pause, a watchdog, a control client's timeout;
    never one per connection), and heapq's C module would be one more shared library to load at every
    start-up. Cancelled entries are skipped when they come due, and dropped all at once whenever the
    queue has doubled since the last time: a timer cancelled and armed again at every message (a
    watchdog, a pipelining client) behind one due earlier would otherwise pile up, each insertion
    moving them all."""

    def __init__(self) -> None:
        self._queue: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._compact_at = COMPACT_MIN

    @property
    def queued(self) -> int:
        """Entries held, cancelled ones included: at most twice the active ones (or COMPACT_MIN)."""
        return len(self._queue)

    def add(self, when: float, callback: Callback, owner: object = None) -> TimerHandle:
        handle = TimerHandle(when, callback, owner)
        entry = (when, next(self._seq), handle)  # the sequence number is unique: handles are never compared
        queue = self._queue
        if len(queue) >= self._compact_at:  # amortized O(1): at most once per len(queue) / 2 insertions
            queue[:] = [e for e in queue if e[2].active]
            self._compact_at = max(COMPACT_MIN, 2 * len(queue))
        lo, hi = 0, len(queue)
        while lo < hi:
            mid = (lo + hi) // 2
            if queue[mid] > entry:
                lo = mid + 1
            else:
                hi = mid
        queue.insert(lo, entry)
        return handle

    def next_due(self) -> float | None:
        queue = self._queue
        while queue and not queue[-1][2].active:
            queue.pop()
        return queue[-1][0] if queue else None

    def pop_due(self, now: float) -> list[TimerHandle]:
        due = []
        queue = self._queue
        while queue and queue[-1][0] <= now:
            handle = queue.pop()[2]
            if handle.active:
                due.append(handle)
        return due

    def __len__(self) -> int:
        return sum(1 for _, _, h in self._queue if h.active)


class Loop:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.timers = Timers()
        self._epoll = select.epoll()  # close-on-exec
        self._watched: dict[int, tuple[Any, Callback, object]] = {}  # fd: (what was registered, callback, owner)
        self.on_fault: Callable[[object, BaseException], None] = _reraise
        self._signal_r = self._signal_w = -1
        self._signals: tuple[int, ...] = ()

    # ----------------------------------------------------------- descriptors
    def add_reader(self, fd: Any, callback: Callback, owner: object = None) -> None:
        """Call ``callback`` when ``fd`` (a number or an object with ``fileno()``) is readable; KeyError when
        it is watched already, ValueError when it is not a descriptor, OSError when epoll refuses it."""
        self._register(fd, select.EPOLLIN, callback, owner)

    def add_writer(self, fd: Any, callback: Callback, owner: object = None) -> None:
        self._register(fd, select.EPOLLOUT, callback, owner)

    def _register(self, fd: Any, events: int, callback: Callback, owner: object) -> None:
        num = _fileno(fd)
        if num in self._watched:
            raise KeyError(f"{fd!r} (fd {num}) is already watched")
        self._epoll.register(num, events)
        self._watched[num] = (fd, callback, owner)

    def _lookup(self, fd: Any) -> int | None:
        """The number ``fd`` is watched under, or None; a closed socket is found by identity."""
        try:
            num = _fileno(fd)
        except ValueError:
            return next((n for n, (obj, _, _) in self._watched.items() if obj is fd), None)
        return num if num in self._watched else None

    def remove(self, fd: Any) -> None:
        """Stop watching ``fd``; a descriptor not watched (or already closed) is fine."""
        num = self._lookup(fd)
        if num is None:
            return
        del self._watched[num]
        try:
            self._epoll.unregister(num)
        except OSError:
            pass  # closed already: the kernel dropped it

    def watching(self, fd: Any) -> bool:
        return self._lookup(fd) is not None

    # ---------------------------------------------------------------- timers
    def call_at(self, when: float, callback: Callback, owner: object = None) -> TimerHandle:
        return self.timers.add(when, callback, owner)

    def call_later(self, delay: float, callback: Callback, owner: object = None) -> TimerHandle:
        return self.timers.add(self.clock() + delay, callback, owner)

    # --------------------------------------------------------------- signals
    def handle_signals(self, signals: set[int] | tuple[int, ...], callback: Callable[[list[int]], None]) -> None:
        """Deliver ``signals`` to ``callback`` as a list, one entry per signal received, in order.

        Installed before anything is bound, so that a SIGTERM that comes once we listen
        stops us cleanly instead of killing us with the default action.
        """
        if self._signal_r != -1:
            return
        self._signal_r, self._signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._signal_w, warn_on_full_buffer=False)
        self._signals = tuple(signals)
        for sig in self._signals:
            signal.signal(sig, _noop)
        self.add_reader(self._signal_r, lambda: self._on_signal_pipe(callback))

    def _on_signal_pipe(self, callback: Callable[[list[int]], None]) -> None:
        received: list[int] = []
        for _ in range(64):  # bounded: a signal storm cannot keep us here
            try:
                data = os.read(self._signal_r, 4096)
            except BlockingIOError:
                break
            if not data:
                break
            received.extend(data)
            if len(data) < 4096:
                break
        if received:
            callback(received)

    def restore_signals(self) -> None:
        for sig in self._signals:
            signal.signal(sig, signal.SIG_DFL)
        if self._signal_r != -1:
            signal.set_wakeup_fd(-1)
            self.remove(self._signal_r)
            os.close(self._signal_r)
            os.close(self._signal_w)
            self._signal_r = self._signal_w = -1

    # ------------------------------------------------------------------ run
    def dispatch(self, callback: Callback, owner: object = None) -> None:
        try:
            callback()
        except Exception as exc:  # noqa: BLE001 - contained: the engine decides what a fault means
            self.on_fault(owner, exc)

    def timeout(self) -> float | None:
        due = self.timers.next_due()
        if due is None:
            return None
        return min(MAX_WAIT, max(0.0, due - self.clock()))

    def run_once(self, timeout: float | None = -1.0) -> None:
        """Wait for one batch of events (``timeout`` -1: until the next timer) and run them, then due timers."""
        wait = self.timeout() if timeout == -1.0 else timeout
        if wait is not None:
            wait = min(max(wait, 0.0), MAX_WAIT)  # negative: at once, as selectors did (epoll would wait for ever)
        watched = self._watched
        ready = self._epoll.poll(-1 if wait is None else wait, max(len(watched), 1))
        for _, callback, owner in [watched[fd] for fd, _ in ready if fd in watched]:
            self.dispatch(callback, owner)
        self.run_timers()

    def run_timers(self) -> None:
        """Run the timers that are due now."""
        for handle in self.timers.pop_due(self.clock()):
            callback = handle.callback
            if callback is not None:  # an earlier timer of this batch may have cancelled it
                handle.callback = None
                self.dispatch(callback, handle.owner)

    def close(self) -> None:
        self.restore_signals()
        self._epoll.close()
        self._watched.clear()


def _fileno(fd: Any) -> int:
    """As selectors: a descriptor's number from an int or an object with ``fileno()``; ValueError otherwise."""
    if not isinstance(fd, int):
        try:
            fd = int(fd.fileno())
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"invalid file object: {fd!r}") from None
    if fd < 0:
        raise ValueError(f"invalid file descriptor: {fd}")
    return fd


def _noop(signum, frame) -> None:  # the wakeup fd carries the signal to the loop
    pass


def _reraise(owner: object, exc: BaseException) -> None:
    raise exc
