"""Footprint and start-up profile of ``activator run``: ``python -m bench.footprint [--runs N]``.

Prints, for the interpreter running it (the venv's python):

1. resident memory of an idle ``activator run`` with 100 sockets next to a bare
   interpreter (VmRSS, and its anonymous and file-backed parts);
2. what each group of imports adds to the anonymous memory, cumulatively in one
   fresh interpreter, in the order ``run`` imports them;
3. what dropping modules after use gives back (``del sys.modules[...]`` and
   ``gc.collect()``, then ``malloc_trim``);
4. start-up by phase: CPU time (the scheduler's, robust to a busy machine) and
   wall time, the minimum of N runs, of the interpreter alone and with each
   import group, and of ``activator run`` until its last "listening" line;
5. how much of the import time of ``run`` goes into creating the engine's
   dataclasses (the floor of a model written as dataclasses).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from .util import free_ports, wait_idle

# Cumulative import steps, in the order a plain `activator run` (activator.commands, no click) needs them.
STEPS = [
    ("the C modules the engine needs (_socket, select, _signal)", "_socket select _signal errno time"),
    ("the model: records, units, addresses, values, the settings registry", "activator.records activator.units "
     "activator.addresses activator.values activator.settings"),
    ("run's command line without click (activator.commands)", "activator.commands"),
    ("config (the loader of run and serve)", "activator.config"),
    ("log, sockets, control", "activator.log activator.sockets activator.control"),
    ("spawn (+ the C extension)", "activator.spawn"),
    ("supervisor (+ jobs, directories, conditions, re-exec)", "activator.supervisor"),
]
# What the engine no longer imports at start-up (section 2 shows what they would add).
NOT_IMPORTED = [
    ("dataclasses (+ inspect, ast, dis, tokenize)", "dataclasses"),
    ("typing", "typing"),
    ("socket, signal, selectors (the engine has socketapi, signalapi, epoll)", "socket signal selectors"),
    ("math, struct, array, fcntl, heapq (C extensions)", "math struct array fcntl heapq"),
    ("json, shlex (control requests, re-exec, commands as one string)", "json shlex"),
    ("the notify hub (units with a NOTIFY_SOCKET)", "activator.sdnotify"),
    ("proxy and watch (units that use them)", "activator.proxy activator.watch"),
]
# What `activator run` imports, for the class-creation profile (section 5).
RUN_PATH = "activator.commands activator.config activator.control activator.log activator.supervisor"

_ANON = "\n".join([
    "def anon():",
    "    for line in open('/proc/self/status'):",
    "        if line.startswith('RssAnon'):",
    "            return int(line.split()[1])",
])

STEPS_CODE = _ANON + """
import gc, sys
steps = sys.argv[1:]
prev = anon()
print(prev)
for group in steps:
    for name in group.split():
        __import__(name)
    gc.collect()
    cur = anon()
    print(cur - prev)
    prev = cur
"""

DROP_CODE = _ANON + """
import gc, sys
before = set(sys.modules)
a0 = anon()
import click
@click.command()
@click.option("-l", multiple=True)
@click.argument("command", nargs=-1)
def main(l, command):
    pass
main(["-l", "2000", "--", "cat"], standalone_mode=False)
del main
a1 = anon()
for name in set(sys.modules) - before:
    del sys.modules[name]
del click
gc.collect()
a2 = anon()
import ctypes
a3 = anon()
ctypes.CDLL(None).malloc_trim(0)
a4 = anon()
print(a1 - a0, a2 - a1, a3 - a2, a4 - a3)
"""


CLASSES_CODE = """
import sys, time
t0 = time.perf_counter()
import activator.records as records
spent = {}
make = records._dataclass
def timed(cls=None, /, **kwargs):
    def wrap(cls):
        t = time.perf_counter()
        try:
            return make(cls, **kwargs)
        finally:
            spent[f"{cls.__module__}.{cls.__qualname__}"] = time.perf_counter() - t
    return wrap if cls is None else wrap(cls)
records.dataclass = timed  # before the modules of the model import it
for name in sys.argv[1].split():
    __import__(name)
total = time.perf_counter() - t0
print(total, sum(spent.values()), len(spent), int("dataclasses" in sys.modules))
"""


def status(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) for k in ("VmRSS", "RssAnon", "RssFile")}


def cpu_seconds(pid: int = 0) -> float:
    """Time on a CPU so far, from the scheduler (nanoseconds; /proc/PID/stat counts 10 ms ticks)."""
    with open(f"/proc/{pid or 'self'}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def run_argv(n: int) -> list[str]:
    return [sys.executable, "-m", "activator", "run", *[a for p in free_ports(n) for a in ("-l", f"127.0.0.1:{p}")],
            "--", "cat"]


def until_listening(argv: list[str], n: int, keep=None) -> tuple[float, float]:
    """Start argv, wait for its n-th 'listening' line: (CPU seconds, wall seconds) up to then."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert p.stderr is not None
        seen = 0
        deadline = time.monotonic() + 60
        while seen < n and time.monotonic() < deadline:
            line = p.stderr.readline()
            if not line:
                raise SystemExit(f"footprint: activator exited with {p.wait()}")
            seen += b"listening on" in line
        wall = time.perf_counter() - t0
        used = cpu_seconds(p.pid)
        if keep is not None:
            keep(p)
        return used, wall
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(10)
        if p.stderr is not None:
            p.stderr.close()


def idle_memory() -> None:
    print("## 1. Idle resident memory (KiB)\n")
    print("| process | VmRSS | anonymous | file-backed |\n|---|---:|---:|---:|")
    got: dict[str, dict[str, int]] = {}

    def measure(p: subprocess.Popen) -> None:
        wait_idle(p.pid, timeout=10)
        got["run"] = status(p.pid)

    until_listening(run_argv(100), 100, keep=measure)
    rows = [("activator run, 100 sockets, idle", got["run"])]
    for label, flags in (("bare interpreter (python -c sleep)", []), ("bare interpreter without site (-S)", ["-S"])):
        p = subprocess.Popen([sys.executable, *flags, "-c", "import time; time.sleep(60)"])
        try:
            wait_idle(p.pid, timeout=10)
            rows.append((label, status(p.pid)))
        finally:
            p.kill()
            p.wait()
    for label, s in rows:
        print(f"| {label} | {s['VmRSS']:,} | {s['RssAnon']:,} | {s['RssFile']:,} |")
    print(f"\nratio to the bare interpreter: {rows[0][1]['VmRSS'] / rows[1][1]['VmRSS']:.2f}x\n")


def import_steps() -> None:
    print("## 2. Anonymous memory added by each import group (cumulative, one fresh interpreter)\n")
    out = subprocess.run([sys.executable, "-c", STEPS_CODE, *[mods for _, mods in STEPS]], capture_output=True,
                         text=True, check=True).stdout.split()
    print(f"| group | + KiB |\n|---|---:|\n| interpreter after site | {int(out[0]):,} |")
    for (label, _), added in zip(STEPS, out[1:]):
        print(f"| {label} | {int(added):,} |")
    print(f"| **total added** | **{sum(int(x) for x in out[1:]):,}** |")
    more = subprocess.run([sys.executable, "-c", STEPS_CODE, " ".join(m for _, m in STEPS),
                           *[mods for _, mods in NOT_IMPORTED]], capture_output=True, text=True, check=True).stdout.split()
    for (label, _), added in zip(NOT_IMPORTED, more[2:]):
        print(f"| (not imported by the engine) {label} | {int(added):,} |")
    print()
    drop = [int(x) for x in subprocess.run([sys.executable, "-c", DROP_CODE], capture_output=True, text=True,
                                           check=True).stdout.split()]
    print("## 3. Dropping click after parsing (KiB of anonymous memory)\n")
    print(f"import click and parse a command line: +{drop[0]:,}; del sys.modules + gc.collect(): {drop[1]:+,}; "
          f"import ctypes (for malloc_trim): {drop[2]:+,}; malloc_trim(0): {drop[3]:+,}\n")


def class_creation(runs: int) -> None:
    print(f"## 5. Where the imports of `run` spend their time: creating the model's records (median of {runs} runs)\n")
    samples = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", CLASSES_CODE, RUN_PATH], capture_output=True, text=True,
                             check=True).stdout.split()
        samples.append((float(out[0]), float(out[1]), int(out[2]), int(out[3])))
    samples.sort()
    total, classes, count, std = samples[len(samples) // 2]
    print(f"importing {RUN_PATH} (after site): {total * 1000:.1f} ms, of which {classes * 1000:.1f} ms "
          f"({classes / total:.0%}) in activator.records for the {count} record classes of the engine's model "
          f"(the first 16 instances of each are made without compiling its __init__); "
          f"dataclasses imported: {'yes' if std else 'no'}\n")


def startup(runs: int) -> None:
    print(f"## 4. Start-up, minimum of {runs} runs (ms)\n")
    cases = [("python -c pass", ["-c", "pass"]), ("python -S -c pass (no site)", ["-S", "-c", "pass"])]
    acc = ""
    for label, mods in STEPS:
        acc += " " + mods
        cases.append((f"+ {label}", ["-c", "import " + ", ".join(acc.split())]))
    results: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in cases}
    results["activator run, 1 socket, to 'listening'"] = []
    results["activator run, 1000 sockets, to 'listening'"] = []
    report = "import sys; sys.stdout.write(open('/proc/self/schedstat').read().split()[0])"
    for i in range(runs):
        for label, args in cases:
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, *args[:-1], args[-1] + "; " + report], capture_output=True,
                                 text=True, check=True).stdout
            results[label].append((int(out) / 1e9, time.perf_counter() - t0))
        results["activator run, 1 socket, to 'listening'"].append(until_listening(run_argv(1), 1))
        if i < max(3, runs // 3):
            results["activator run, 1000 sockets, to 'listening'"].append(until_listening(run_argv(1000), 1000))
    print("| what | CPU | wall |\n|---|---:|---:|")
    for label, samples in results.items():
        print(f"| {label} | {min(c for c, _ in samples) * 1000:.1f} | {min(w for _, w in samples) * 1000:.1f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.footprint", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=15, help="start-up runs per case [15]")
    args = ap.parse_args(argv)
    import activator

    pkg = os.path.dirname(os.path.abspath(activator.__file__))
    subprocess.run([sys.executable, "-m", "compileall", "-q", pkg], capture_output=True, timeout=120)
    print(f"# activator footprint ({sys.executable}; load {os.getloadavg()[0]:.2f})\n")
    idle_memory()
    import_steps()
    startup(args.runs)
    class_creation(args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
