"""The event loop: a selector, one-shot timers and the signal pipe. It knows nothing of units.

One thread. Signals are turned into bytes on a pipe (``signal.set_wakeup_fd``) and
handed to one callback between events, like gunicorn's arbiter. The loop sleeps in
the kernel until a descriptor is ready or the next timer is due; with no timer it
never wakes.

Every callback runs through :meth:`Loop.dispatch`: an exception in it does not end
the loop but goes to ``on_fault(owner, exc)`` with the ``owner`` the callback was
registered with (the engine passes a unit's state, or None for its own machinery),
so one unit's fault can be contained while a fault outside any unit stops
everything cleanly.
"""
from __future__ import annotations

import heapq
import itertools
import os
import selectors
import signal
import time

TYPE_CHECKING = False  # typing is not imported at run time (start-up, memory); type checkers see it
if TYPE_CHECKING:
    from typing import Any, Callable

# epoll takes its timeout in milliseconds as a C int: longer waits are cut to this and the
# loop simply goes back to sleep, so a timer of any length is safe (it wakes at most once
# every 24.8 days on the way).
MAX_WAIT = (2**31 - 1) / 1000.0 - 1.0

if TYPE_CHECKING:
    Callback = Callable[[], Any]


class TimerHandle:
    """A pending timer; ``cancel()`` makes it a no-op. Cheap: the heap skips cancelled entries."""

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
    """A heap of one-shot timers ordered by due time, then by creation."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()

    def add(self, when: float, callback: Callback, owner: object = None) -> TimerHandle:
        handle = TimerHandle(when, callback, owner)
        heapq.heappush(self._heap, (when, next(self._seq), handle))
        return handle

    def next_due(self) -> float | None:
        while self._heap and not self._heap[0][2].active:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[TimerHandle]:
        due = []
        while self._heap and self._heap[0][0] <= now:
            handle = heapq.heappop(self._heap)[2]
            if handle.active:
                due.append(handle)
        return due

    def __len__(self) -> int:
        return sum(1 for _, _, h in self._heap if h.active)


class Loop:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.timers = Timers()
        self.sel = selectors.DefaultSelector()
        self.on_fault: Callable[[object, BaseException], None] = _reraise
        self._signal_r = self._signal_w = -1
        self._signals: tuple[int, ...] = ()

    # ----------------------------------------------------------- descriptors
    def add_reader(self, fd: Any, callback: Callback, owner: object = None) -> None:
        self.sel.register(fd, selectors.EVENT_READ, (callback, owner))

    def add_writer(self, fd: Any, callback: Callback, owner: object = None) -> None:
        self.sel.register(fd, selectors.EVENT_WRITE, (callback, owner))

    def remove(self, fd: Any) -> None:
        """Stop watching ``fd``; a descriptor not watched (or already closed) is fine."""
        try:
            self.sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    def watching(self, fd: Any) -> bool:
        try:
            self.sel.get_key(fd)
            return True
        except (KeyError, ValueError):
            return False

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
            wait = min(wait, MAX_WAIT)
        for key, _ in self.sel.select(wait):
            callback, owner = key.data
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
        self.sel.close()


def _noop(signum, frame) -> None:  # the wakeup fd carries the signal to the loop
    pass


def _reraise(owner: object, exc: BaseException) -> None:
    raise exc
