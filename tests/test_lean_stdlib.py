"""The engine's own thin layers over ``_socket``, ``_signal`` and epoll (activator.socketapi,
activator.signalapi, activator.loop): the same answers as socket.py, signal.py and selectors, on
real sockets, signals and descriptors, and none of those three modules imported by a plain `run`."""
from __future__ import annotations

import os
import subprocess
import sys
import signal
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from activator import signalapi, socketapi
from activator.loop import Loop


# ------------------------------------------------------------------ signals
def test_signal_names_and_numbers_are_signal_modules():
    for num in range(-1, signal.NSIG + 2):
        try:
            want = signal.Signals(num).name
        except ValueError:
            with pytest.raises(ValueError):
                signalapi.name(num)
            assert signalapi.label(num) == str(num)
        else:
            assert signalapi.name(num) == signalapi.label(num) == want
    for text, member in signal.Signals.__members__.items():  # aliases too: SIGIOT, SIGCLD, SIGPOLL
        assert signalapi.number(text) == int(member)
    for text in ("SIG_DFL", "SIG_IGN", "SIG_BLOCK", "NSIG", "sigterm", "TERM", ""):
        with pytest.raises(KeyError):
            signalapi.number(text)
    assert signalapi.names() == [s.name for s in signal.Signals]
    with pytest.raises(ValueError):
        signalapi.name("15")  # type: ignore[arg-type]


def test_signal_functions_are_the_c_modules():
    assert signalapi.SIGTERM == signal.SIGTERM and signalapi.SIG_DFL == signal.SIG_DFL
    old = signalapi.pthread_sigmask(signalapi.SIG_BLOCK, {signalapi.SIGUSR2})
    try:
        assert signalapi.SIGUSR2 in signalapi.pthread_sigmask(signalapi.SIG_BLOCK, set())
    finally:
        signalapi.pthread_sigmask(signalapi.SIG_SETMASK, old)
    assert signalapi.valid_signals() == signal.valid_signals()


# ------------------------------------------------------------------ sockets
def test_socket_constants_equal_the_socket_modules():
    for name in socket.__all__:
        if name.isupper() and isinstance(getattr(socket, name), int):
            assert getattr(socketapi, name) == getattr(socket, name), name


def test_socket_class_does_what_the_engine_asks_of_socket_py(tmp_path):
    with socketapi.socket(socketapi.AF_INET, socketapi.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert isinstance(server, socket.socket.__mro__[1])  # the same C object as socket.socket's
        assert server.family == socket.AF_INET and server.type == socket.SOCK_STREAM
        assert not server.get_inheritable()
        server.set_inheritable(True)
        assert os.get_inheritable(server.fileno())
        server.set_inheritable(False)
        with socket.create_connection(server.getsockname(), timeout=10) as client:
            conn, peer = server.accept()
            with conn:
                assert isinstance(conn, socketapi.socket) and peer == client.getsockname()
                assert conn.gettimeout() is None and not conn.get_inheritable()
                copy = conn.dup()
                with copy:
                    assert copy.fileno() not in (-1, conn.fileno()) and not copy.get_inheritable()
                    client.sendall(b"ping")
                    assert copy.recv(4) == b"ping"
        assert "fd=" in repr(server)
    assert server.fileno() == -1 and "[closed]" in repr(server)
    a, b = socketapi.socketpair()
    with a, b:
        assert isinstance(a, socketapi.socket) and a.family == socket.AF_UNIX
        a.sendall(b"x")
        assert b.recv(1) == b"x"
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as std:
        with socketapi.socket(fileno=os.dup(std.fileno())) as wrapped:  # family and type read from the fd
            assert (wrapped.family, wrapped.type) == (socket.AF_INET6, socket.SOCK_DGRAM)


# ----------------------------------------------------------------- the loop
def test_loop_watches_like_selectors():
    loop = Loop()
    a, b = socket.socketpair()
    seen: list[str] = []
    try:
        loop.add_reader(a, lambda: seen.append(a.recv(10).decode() or "eof"))
        with pytest.raises(KeyError):
            loop.add_reader(a.fileno(), lambda: None)  # watched already, by number or by object
        with pytest.raises(KeyError):
            loop.add_writer(a, lambda: None)
        with pytest.raises(ValueError):
            loop.add_reader(-1, lambda: None)
        with pytest.raises(ValueError):
            loop.add_reader(object(), lambda: None)
        assert loop.watching(a) and loop.watching(a.fileno())
        loop.run_once(0)
        assert seen == []  # nothing to read: not called
        b.sendall(b"hi")
        loop.run_once(5)
        assert seen == ["hi"]
        b.close()  # a hang-up wakes the reader
        loop.run_once(5)
        assert seen == ["hi", "eof"]
        a.close()
        assert loop.watching(a)  # closed, still registered: found by identity, as selectors does
        loop.remove(a)
        assert not loop.watching(a)
        loop.remove(a)  # twice: fine
        loop.remove(12345)  # never watched: fine
    finally:
        loop.close()
        a.close()
        b.close()


def test_a_batch_runs_the_callbacks_registered_when_it_was_read():
    """Two ready descriptors; each callback stops watching the other: as with selectors, the second
    callback of the batch still runs (callbacks are written to tolerate it), and then nothing is watched."""
    loop = Loop()
    pairs = [socket.socketpair() for _ in range(2)]
    calls: list[int] = []
    try:
        def first(i: int) -> None:
            calls.append(i)
            other = pairs[1 - i][0]
            loop.remove(other)

        for i, (r, w) in enumerate(pairs):
            loop.add_reader(r, lambda i=i: first(i))
            w.sendall(b"x")
        loop.run_once(5)
        assert sorted(calls) == [0, 1]
        assert not any(loop.watching(r) for r, _ in pairs)
        loop.run_once(0)
        assert len(calls) == 2  # still readable, but no longer watched
    finally:
        loop.close()
        for r, w in pairs:
            r.close()
            w.close()


def test_the_writer_is_woken_and_the_loop_sleeps_until_the_timer():
    loop = Loop()
    r, w = socket.socketpair()
    woke: list[str] = []
    try:
        loop.add_writer(w, lambda: (woke.append("w"), loop.remove(w)))
        loop.run_once(5)
        assert woke == ["w"]
        t0 = loop.clock()
        loop.call_later(0.05, lambda: woke.append("t"))
        while "t" not in woke and loop.clock() - t0 < 5:
            loop.run_once()
        assert woke == ["w", "t"] and loop.clock() - t0 >= 0.05
    finally:
        loop.close()
        r.close()
        w.close()


def test_timers_come_due_in_time_order_then_creation_order():
    import random

    from activator.loop import Timers

    rng = random.Random(7)
    timers = Timers()
    made = []
    for i in range(2000):
        when = rng.choice([rng.random() * 100, 50.0, 0.0])  # ties, in numbers
        made.append((when, i, timers.add(when, lambda: None, owner=i)))
    cancelled = {i for _, i, _ in made if i % 7 == 0}
    for when, i, handle in made:
        if i in cancelled:
            handle.cancel()
    assert len(timers) == 2000 - len(cancelled)
    want = [i for when, i, _ in sorted(made) if i not in cancelled]
    got = []
    now = -1.0
    while (due := timers.next_due()) is not None:
        assert due >= now
        now = due
        got.extend(h.owner for h in timers.pop_due(now))
    assert got == want and len(timers) == 0


_NAMEISH = st.text(alphabet=st.sampled_from("aZ09_.@-:/ \n\u00e9\u0131\u212a\x00"), max_size=300) | st.text(max_size=70)


@settings(max_examples=3000, deadline=None)
@given(_NAMEISH)
def test_unit_names_and_plain_keys_are_the_patterns_they_replace(text):
    import re

    from activator import values

    assert values.is_unit_name(text) == bool(re.fullmatch(r"[A-Za-z0-9_.@-]{1,255}", text))
    assert values.is_plain_key(text) == bool(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", text))


def test_a_lazy_pattern_compiles_on_first_use_and_is_the_compiled_one():
    import re

    from activator.values import lazy_pattern

    rx = lazy_pattern(r"\s*([0-9]+)\s*")
    assert "fullmatch" not in vars(rx)
    assert rx.fullmatch(" 42 ").group(1) == "42" and rx.match("x") is None
    assert "fullmatch" in vars(rx)  # compiled once: its methods are the instance's now
    assert rx.sub("#", "a1b22") == re.sub(r"\s*([0-9]+)\s*", "#", "a1b22") and rx.pattern == r"\s*([0-9]+)\s*"
    assert rx.flags == re.compile(r"\s*([0-9]+)\s*").flags


def test_timers_cancelled_and_armed_again_behind_an_earlier_one_do_not_pile_up():
    """A watchdog or a control client re-arms its timer at every message while another timer is due
    earlier (found by review): the cancelled entries are dropped as the queue grows, so it stays within
    twice the active timers, and they still come due in order."""
    from activator.loop import COMPACT_MIN, Timers, cancel

    timers = Timers()
    early = timers.add(30.0, lambda: None, owner="early")
    handle, now = None, 0.0
    for _ in range(100_000):
        cancel(handle)
        now += 1e-5
        handle = timers.add(now + 60.0, lambda: None, owner="late")
        assert timers.queued <= 2 * 2 + COMPACT_MIN
    assert len(timers) == 2 and timers.next_due() == 30.0
    assert [h.owner for h in timers.pop_due(1e9)] == ["early", "late"] and early.active


def test_a_negative_timeout_returns_at_once():
    """selectors returned at once for a timeout of 0 or less; epoll.poll would wait for ever (found by review)."""
    code = "from activator.loop import Loop\nLoop().run_once(-0.25)\nLoop().run_once(0)\nprint('returned')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20).stdout
    assert out.strip() == "returned"
