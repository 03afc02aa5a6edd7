"""The log never blocks the loop: real pipes, sockets and terminals whose reader stalls."""
from __future__ import annotations

import fcntl
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from activator.log import MAX_FLOODS, Log, _polled_output

from conftest import free_port

LINE = "x" * 80


class Fd:
    """A stream that is just a descriptor (what Log needs: fileno())."""

    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


def bounded(fn, timeout: float = 10.0, unblock=None):
    """Run fn in a thread; fail (instead of hanging) when it does not return within timeout."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        if unblock is not None:
            unblock()  # let the stuck thread go before we fail
        thread.join(5)
        pytest.fail(f"blocked for more than {timeout}s")
    return result[0] if result else None


def read_available(fd: int) -> bytes:
    """Everything that can be read from fd right now (fd stays as it was)."""
    was = os.get_blocking(fd)
    os.set_blocking(fd, False)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.set_blocking(fd, was)
    return b"".join(chunks)


def drain_like_the_engine(log: Log, r: int, timeout: float = 10.0) -> bytes:
    """Read the pipe and flush the log when its descriptor is writable, as the engine loop does."""
    got = []
    sel = selectors.DefaultSelector()
    deadline = time.monotonic() + timeout
    while log.wants_write():
        assert time.monotonic() < deadline, "the log never drained"
        got.append(read_available(r))
        fd = log.fileno_to_watch()
        assert fd is not None
        sel.register(fd, selectors.EVENT_WRITE)
        sel.select(1.0)
        sel.unregister(fd)
        log.flush_some()
    sel.close()
    got.append(read_available(r))
    return b"".join(got)


@pytest.fixture
def pipe():
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def emit_many(log: Log, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        log.info("test", f"line {i:06d} {LINE}")


def numbers(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"line (\d{6})", text)]


def dropped_count(text: str) -> int:
    """N of the one 'N log lines dropped' line in text."""
    [count] = re.findall(r"(\d+) log lines dropped", text)
    return int(count)


def test_stalled_pipe_never_blocks_and_counts_what_it_drops(pipe):
    r, w = pipe
    log = Log(stream=Fd(w), buffer_bytes=64 * 1024)
    bounded(lambda: emit_many(log, 20_000))  # ~2 MB into a 64 KiB pipe nobody reads
    assert not fcntl.fcntl(w, fcntl.F_GETFL) & os.O_NONBLOCK, "the shared descriptor must stay blocking"
    assert log.wants_write()
    text = drain_like_the_engine(log, r).decode()
    lines = text.splitlines()
    got = numbers(text)
    assert got == list(range(len(got))), "the lines that were kept come first, in order"
    # The pipe held its capacity, the buffer at most buffer_bytes: the rest was dropped.
    kept = len("".join(line + "\n" for line in lines[:len(got)]))
    capacity = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
    assert capacity <= kept <= capacity + 64 * 1024
    dropped = re.fullmatch(r"activator\[\d+\]: warning: (\d+) log lines dropped \(output stalled\)", lines[len(got)])
    assert dropped, lines[len(got)]
    assert int(dropped.group(1)) == 20_000 - len(got)
    assert len(lines) == len(got) + 1
    log.info("test", f"line {20_000:06d} after")
    assert read_available(r).decode().endswith("line 020000 after\n")
    assert log.close()


def test_lines_after_a_gap_come_after_the_dropped_line(pipe):
    r, w = pipe
    log = Log(stream=Fd(w), buffer_bytes=16 * 1024)
    bounded(lambda: emit_many(log, 2_000))
    first = read_available(r)  # room again, but the buffer still holds old lines
    bounded(lambda: emit_many(log, 10, start=2_000))
    text = (first + drain_like_the_engine(log, r)).decode()
    lines = text.splitlines()
    marker = [i for i, line in enumerate(lines) if "log lines dropped" in line]
    assert len(marker) == 1
    before, after = numbers("\n".join(lines[:marker[0]])), numbers("\n".join(lines[marker[0]:]))
    assert before == list(range(len(before)))
    assert after == list(range(2_000, 2_010)), "the newest lines, in order, after the gap"
    count = dropped_count(lines[marker[0]])
    assert len(before) + count + len(after) == 2_010


def test_polled_fallback_never_blocks_a_shared_blocking_pipe(pipe):
    """When the pipe cannot be reopened (another user's pipe), writes wait for poll(): still no block."""
    r, w = pipe
    out = _polled_output(w)
    total = 0

    def fill():
        nonlocal total
        for _ in range(1000):
            if not out.ready():
                return
            total += out.write(b"y" * 4096)

    bounded(fill, unblock=lambda: read_available(r))
    assert 0 < total <= fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
    assert len(read_available(r)) == total


def test_stalled_socket_never_blocks():
    a, b = socket.socketpair()
    with a, b:
        log = Log(stream=a, buffer_bytes=32 * 1024)
        bounded(lambda: emit_many(log, 20_000))
        assert a.getblocking(), "the shared socket must stay blocking"
        b.setblocking(False)
        received: list[bytes] = []
        deadline = time.monotonic() + 10
        while log.wants_write() or not received:
            assert time.monotonic() < deadline
            try:
                received.append(b.recv(1 << 20))
            except BlockingIOError:
                pass
            log.flush_some()
        received.append(read_available(b.fileno()))
        log.close()
        text = b"".join(received).decode()
        got = numbers(text)
        assert got == list(range(len(got)))
        count = dropped_count(text)
        assert count + len(got) == 20_000


def test_stalled_terminal_never_blocks():
    master, slave = os.openpty()
    try:
        log = Log(stream=Fd(slave), buffer_bytes=32 * 1024)
        bounded(lambda: emit_many(log, 5_000), unblock=lambda: read_available(master))
        assert not fcntl.fcntl(slave, fcntl.F_GETFL) & os.O_NONBLOCK
        assert log.wants_write()
        text = drain_like_the_engine(log, master).decode()
        assert "log lines dropped" in text
        assert numbers(text)[:3] == [0, 1, 2]
        log.close()
    finally:
        os.close(master)
        os.close(slave)


def test_json_lines_parse_and_carry_counts(pipe):
    r, w = pipe
    log = Log(stream=Fd(w), fmt="json", buffer_bytes=8 * 1024, verbose=True)
    log.info("start", "started x as pid 5", unit="u", pid=5)
    log.debug("trigger", "line with \"quotes\" and \n a newline")
    bounded(lambda: emit_many(log, 1_000))
    text = drain_like_the_engine(log, r).decode()
    records = [json.loads(line) for line in text.splitlines()]
    assert records[0] == {**records[0], "level": "info", "unit": "u", "pid": 5, "event": "start",
                          "message": "started x as pid 5"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", records[0]["time"])
    assert records[1]["message"] == "line with \"quotes\" and \n a newline"
    [dropped] = [rec for rec in records if rec["event"] == "log-dropped"]
    assert dropped["level"] == "warning" and dropped["count"] == 1_000 - len(numbers(text))
    assert all("count" not in rec for rec in records if rec["event"] != "log-dropped")


def test_json_lines_carry_an_events_own_fields_after_the_common_ones(pipe):
    r, w = pipe
    log = Log(stream=Fd(w), fmt="json")
    log.error("graceful-failed", "failed", unit="u", pid=5, fields={"reason": "exited", "worker": 1, "pid": 6})
    log.close()
    record = json.loads(os.read(r, 65536))
    assert list(record)[-2:] == ["reason", "worker"] and record["pid"] == 5  # a common key is never overwritten


def test_text_lines_cannot_be_forged_with_control_characters(pipe):
    r, w = pipe
    log = Log(stream=Fd(w))
    log.warning("reload", "unknown key 'a\nactivator[1]: fake line\r'", unit="u")
    log.info("listen", "path with a non-UTF-8 byte \udcff")
    lines = read_available(r).decode().splitlines()
    assert lines == [
        f"activator[{os.getpid()}]: u: warning: unknown key 'a\\x0aactivator[1]: fake line\\x0d'",
        f"activator[{os.getpid()}]: path with a non-UTF-8 byte \\udcff",
    ]


class Timers:
    """What the engine gives Log: one-shot callbacks at a time (here fired by the test)."""

    def __init__(self):
        self.entries: list = []

    def add(self, when, callback):
        self.entries.append((when, callback))
        return self.entries[-1]

    def fire_all(self):
        entries, self.entries = self.entries, []
        for _, callback in sorted(entries, key=lambda e: e[0]):
            callback()


def denied(log, who, unit="echo"):
    log.warning("denied", f"connection from {who}:1234 denied by ip-address rules", unit=unit,
                collapse_key=who, collapse_what="connections denied")


def test_collapse_counts_exactly_and_summarises_on_the_timer(pipe):
    r, w = pipe
    timers = Timers()
    log = Log(stream=Fd(w), fmt="json", schedule=timers.add, collapse_window=60)
    for _ in range(100):
        denied(log, "192.0.2.1")
    for _ in range(50):
        denied(log, "192.0.2.2")
    denied(log, "192.0.2.1", unit="other")  # another unit: its own flood
    log.info("start", "unrelated lines are never collapsed")
    log.info("start", "unrelated lines are never collapsed")
    records = [json.loads(line) for line in read_available(r).decode().splitlines()]
    assert [(rec["event"], rec["unit"]) for rec in records] == [
        ("denied", "echo"), ("denied", "echo"), ("denied", "other"), ("start", None), ("start", None)]
    assert len(timers.entries) == 2, "one timer per flood that has something to sum up"
    assert all(when > time.monotonic() + 50 for when, _ in timers.entries)
    timers.fire_all()
    summaries = [json.loads(line) for line in read_available(r).decode().splitlines()]
    assert [(s["event"], s["level"], s["unit"], s["message"], s["count"]) for s in summaries] == [
        ("denied", "warning", "echo", "99 more connections denied from 192.0.2.1", 99),
        ("denied", "warning", "echo", "49 more connections denied from 192.0.2.2", 49),
    ]
    denied(log, "192.0.2.1")  # the window was summed up: the next one is logged again
    assert "192.0.2.1:1234 denied" in read_available(r).decode()
    log.close()


def test_collapse_without_timer_sums_up_with_the_next_event_after_the_window(pipe):
    r, w = pipe
    log = Log(stream=Fd(w), collapse_window=0.2)
    for _ in range(10):
        denied(log, "192.0.2.7")
    assert read_available(r).decode().count("\n") == 1
    time.sleep(0.2)  # the window itself is what must pass
    denied(log, "192.0.2.7")
    lines = read_available(r).decode().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("echo: warning: 9 more connections denied from 192.0.2.7")
    assert "denied by ip-address rules" in lines[1]
    for _ in range(3):
        denied(log, "192.0.2.7")
    log.close()  # what is left is summed up at the end
    assert read_available(r).decode().splitlines()[-1].endswith("3 more connections denied from 192.0.2.7")


def test_collapse_follows_a_bounded_number_of_keys(pipe):
    r, w = pipe
    log = Log(stream=Fd(w), collapse_window=60)
    for i in range(MAX_FLOODS + 10):
        denied(log, f"2001:db8::{i:x}")
    text = drain_like_the_engine(log, r).decode()
    assert text.count("\n") == MAX_FLOODS + 1  # one line per followed key, one for the first of the rest
    log.close()
    assert read_available(r).decode().splitlines() == [
        f"activator[{os.getpid()}]: echo: warning: 9 more connections denied from other sources"]


def test_collapse_default_what_names_the_event(pipe):
    r, w = pipe
    log = Log(stream=Fd(w))
    for _ in range(3):
        log.warning("too-many", "too many connections", unit="u", collapse_key="192.0.2.9")
    log.close()
    assert read_available(r).decode().splitlines()[-1].endswith("u: warning: 2 more 'too-many' events from 192.0.2.9")


def test_hold_batches_writes_and_keeps_everything_for_a_file(tmp_path):
    path = tmp_path / "log"
    with open(path, "wb") as f:
        log = Log(stream=f)
        with log.hold():
            emit_many(log, 5_000)  # ~500 KB: more than the buffer, but a file takes it all
        assert not log.wants_write()
        log.close()
    assert numbers(path.read_text()) == list(range(5_000))


def test_close_gives_up_after_its_timeout(pipe):
    r, w = pipe
    log = Log(stream=Fd(w))
    bounded(lambda: emit_many(log, 3_000))
    started = time.monotonic()
    assert bounded(lambda: log.close(timeout=0.3)) is False
    assert time.monotonic() - started < 3
    log.info("test", "after close: discarded, never blocking")


def test_close_writes_everything_when_the_reader_keeps_up(pipe):
    r, w = pipe
    log = Log(stream=Fd(w))
    bounded(lambda: emit_many(log, 2_000))
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.extend(iter(lambda: os.read(r, 65536), b"")), daemon=True)
    reader.start()
    assert log.close(timeout=10)
    os.close(w)
    reader.join(10)
    assert numbers(b"".join(got).decode()) == list(range(2_000))


def test_a_reader_that_went_away_stops_the_writing(pipe):
    r, w = pipe
    log = Log(stream=Fd(w))
    os.close(r)
    bounded(lambda: emit_many(log, 2_000))
    assert not log.wants_write() and log.fileno_to_watch() is None  # nothing for the engine to spin on
    assert log.close()


def test_closed_stderr_is_not_an_error():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    log = Log(stream=Fd(w))
    log.error("stop", "nowhere to go")
    assert not log.wants_write()


def wait_connectable(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"activator exited with {proc.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "activator never listened"
            time.sleep(0.02)


def test_denied_flood_with_stalled_stderr_still_stops_on_sigterm():
    port = free_port()
    r, w = os.pipe()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_SOCKET"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "activator", "run", "-a", "--ip-address-deny", "any", "-l", f"127.0.0.1:{port}",
         "--", "cat"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=w, env=env)
    os.close(w)  # nobody reads r: activator's stderr stalls once the pipe is full
    try:
        wait_connectable(port, proc)
        deadline = time.monotonic() + 60
        for _ in range(3_000):
            if time.monotonic() > deadline:
                break
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            except OSError:
                break  # the backlog is full: activator is stuck; SIGTERM will tell
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert b"listening on" in read_available(r)
    finally:
        if proc.poll() is None:
            proc.kill()
            read_available(r)
            proc.wait(10)
        os.close(r)
