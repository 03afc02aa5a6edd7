#!/usr/bin/env python3
"""A test daemon for the init duties (tests/test_pid1.py).

Usage: initd.py REPORT MODE

Modes:
  doublefork:  fork a child that starts a new session, forks a grandchild and
               exits at once (the classic daemonising double fork). The
               grandchild waits until it has been reparented (bounded), writes
               REPORT.grandchild (JSON: its pid and new ppid) and exits, so it
               becomes a zombie unless whoever adopted it reaps it. The daemon
               itself reaps its child, writes REPORT and then waits for SIGTERM.
  linger:      like doublefork, but the grandchild ignores SIGTERM and stays
               (sleeping) after writing REPORT.grandchild.
  signals:     record every SIGUSR1/SIGUSR2/SIGWINCH/SIGHUP received by
               appending its name to REPORT.signals; exit 0 on SIGTERM.

REPORT (JSON) holds the daemon's pid and ppid, written after its set-up.
"""
import json
import os
import signal
import sys
import time


def write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.rename(tmp, path)


def grandchild(report, linger, original):
    deadline = time.monotonic() + 10
    while os.getppid() == original and time.monotonic() < deadline:
        time.sleep(0.005)
    if linger:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    write_json(report + ".grandchild", {"pid": os.getpid(), "ppid": os.getppid(), "sid": os.getsid(0)})
    if linger:
        end = time.monotonic() + 60  # bounded, in case nobody kills it
        while time.monotonic() < end:
            time.sleep(1)
    os._exit(0)


def double_fork(report, linger):
    child = os.fork()
    if child == 0:
        try:
            os.setsid()
            me = os.getpid()
            if os.fork() == 0:
                grandchild(report, linger, me)
        finally:
            os._exit(0)
    os.waitpid(child, 0)


def main():
    report, mode = sys.argv[1], sys.argv[2]
    stop = signal.SIGTERM
    signal.signal(stop, lambda *a: sys.exit(0))
    if mode in ("doublefork", "linger"):
        double_fork(report, linger=mode == "linger")
    elif mode == "signals":
        log = report + ".signals"

        def record(signum, frame):
            with open(log, "a") as f:
                f.write(signal.Signals(signum).name + "\n")

        for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGHUP):
            signal.signal(sig, record)
    else:
        print(f"initd.py: unknown mode {mode!r}", file=sys.stderr)
        return 2
    write_json(report, {"pid": os.getpid(), "ppid": os.getppid()})
    end = time.monotonic() + 120  # bounded: a test that forgets us does not leave us for ever
    while time.monotonic() < end:
        time.sleep(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
