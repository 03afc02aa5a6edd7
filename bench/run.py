"""Benchmark runner: ``python -m bench [--smoke | --quick] [--only GROUP] [--output FILE.json]``.

Every peer is started and stopped by this runner on 127.0.0.1 with free ports;
runs of the peers are interleaved round by round (A, B, C, A, B, C, ...) so that
background load hits them alike. Results: a table per metric (median, min–max,
IQR, activator's ratio to each peer, the target and whether it is met), printed
and saved as JSON plus a markdown file next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

from . import cdaemons, metrics, proxy, report
from .util import raise_nofile

HERE = os.path.dirname(os.path.abspath(__file__))

MODES = {
    "full": dict(rounds=5, warmup_s=0.5, batch_s=2.0, batch_max=100000, latency_samples=30, startup_runs=30,
                 idle_s=10.0, scale_n=1000, scale_rounds=5, dispatch_samples=50, hold_n=2000, nbd_size="1G",
                 nbd_rounds=15, proxy_rounds=15, proxy_s=1.0, proxy_bulk=2**30),
    "quick": dict(rounds=3, warmup_s=0.3, batch_s=1.0, batch_max=100000, latency_samples=15, startup_runs=15,
                  idle_s=5.0, scale_n=1000, scale_rounds=3, dispatch_samples=20, hold_n=2000, nbd_size="256M",
                  nbd_rounds=3, proxy_rounds=5, proxy_s=0.5, proxy_bulk=2**28),
    "smoke": dict(rounds=1, warmup_s=0.1, batch_s=0.2, batch_max=300, latency_samples=2, startup_runs=2,
                  idle_s=1.0, scale_n=50, scale_rounds=1, dispatch_samples=2, hold_n=40, nbd_size="16M",
                  nbd_rounds=1, proxy_rounds=1, proxy_s=0.2, proxy_bulk=2**24),
}

# Every metric key each group produces, so that a group that failed still leaves its entries.
EXPECTED = {
    "accept_inetd": ["accept_inetd_seq", "accept_inetd_conc4"],
    "accept_fd3": ["accept_fd3_seq", "accept_fd3_conc4"],
    "first_activation": ["first_activation"],
    "startup": ["startup_listen", "startup_help", "startup_version"],
    "idle": ["idle_wakeups", "idle_rss"],
    "scale": ["scale_startup", "scale_dispatch", "scale_hold_rss"],
    "nbd": ["nbd_throughput"],
    "proxy": proxy.KEYS,
}
GROUPS = [*metrics.ALL, ("proxy", proxy.proxy)]


def _first_line(argv) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        text = (out.stdout or out.stderr).strip().splitlines()
        return text[0] if text else "?"
    except (OSError, subprocess.SubprocessError):
        return "not installed"


def _deb_version(pkg: str) -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", pkg], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "not installed"
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine() -> dict:
    cpu = "?"
    mem = 0.0
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) / 2**20
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "python": platform.python_version(),
            "executable": sys.executable, "memory_gib": mem, "loadavg_start": _loadavg()}


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def peers() -> dict:
    from activator import __version__

    return {"activator": __version__, "systemd-socket-activate": "systemd " + _deb_version("systemd"),
            "tcpserver": "ucspi-tcp " + _deb_version("ucspi-tcp"), "xinetd": _deb_version("xinetd"),
            "nbdkit": _deb_version("nbdkit"), "nbdcopy": "libnbd-bin " + _deb_version("libnbd-bin")}


def _placeholder(key: str, error: str) -> dict:
    return metrics.record(key, key, "", False, {"activator": []}, errors={"activator": error})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--smoke", action="store_true", help="tiny counts, under a minute (what CI runs)")
    g.add_argument("--quick", action="store_true", help="fewer rounds, 256 MiB nbdcopy (about 3 minutes)")
    ap.add_argument("--only", action="append", choices=list(EXPECTED), metavar="GROUP",
                    help=f"run only this group (repeatable): {', '.join(EXPECTED)}")
    ap.add_argument("--output", metavar="FILE.json",
                    help="where to write the JSON (the markdown goes next to it, .md); default "
                         "bench/results/latest.json (smoke: bench/results/smoke.json)")
    ap.add_argument("--note", action="append", default=[], help="a note saved with the results (repeatable)")
    ap.add_argument("--rounds", type=int, help="override the number of interleaved rounds")
    ap.add_argument("--scale-with-run", action="store_true",
                    help="scale metric: use `run` with many -l options even when `serve` is available")
    args = ap.parse_args(argv)

    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    params = dict(MODES[mode])
    if args.rounds:
        params["rounds"] = params["scale_rounds"] = params["nbd_rounds"] = params["proxy_rounds"] = args.rounds
    params["force_run"] = args.scale_with_run
    output = args.output or os.path.join(HERE, "results", "smoke.json" if mode == "smoke" else "latest.json")
    groups = args.only or list(EXPECTED)

    def say(msg: str) -> None:
        print(msg, flush=True)

    nofile = raise_nofile(65536)
    started = time.time()
    t0 = time.monotonic()
    results = {"mode": mode, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
               "machine": machine(), "peers": peers(), "params": params, "rlimit_nofile": nofile,
               "notes": [], "metrics": {}}
    say(f"activator benchmarks, {mode} mode: {results['machine']['cores']} cores, kernel "
        f"{results['machine']['kernel']}, Python {results['machine']['python']}, "
        f"load {results['machine']['loadavg_start']}")
    results["notes"].extend(args.note)
    # Byte-compile activator first: with PYTHONDONTWRITEBYTECODE set (or a fresh checkout) every start
    # would otherwise compile its sources again, which a normal installation never does.
    import activator

    pkg = os.path.dirname(os.path.abspath(activator.__file__))
    subprocess.run([sys.executable, "-m", "compileall", "-q", pkg], capture_output=True, timeout=120)
    results["notes"].append(f"activator's modules byte-compiled before the run ({pkg})")
    failed = False
    with tempfile.TemporaryDirectory(prefix="activator-bench-") as tmp:
        try:
            helpers = cdaemons.build(tmp)
        except cdaemons.BuildError as exc:
            say(f"bench: error: {exc}")
            return 1
        ctx = metrics.Context(params, tmp, helpers, say)
        funcs = dict(GROUPS)
        for group in groups:
            say(f"[{group}]")
            g0 = time.monotonic()
            try:
                produced = funcs[group](ctx)
            except Exception as exc:  # a broken group must not lose the others' results
                failed = True
                say(f"  failed: {exc!r}")
                traceback.print_exc()
                produced = [_placeholder(k, f"benchmark failed: {exc!r}") for k in EXPECTED[group]]
            for m in produced:
                results["metrics"][m["key"]] = m
                say(report.metric_markdown(m))
            say(f"  ({time.monotonic() - g0:.1f} s)")
    results["duration_s"] = time.monotonic() - t0
    results["loadavg_end"] = _loadavg()
    results["machine"]["loadavg_end"] = results["loadavg_end"]
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(results, f, indent=1, sort_keys=False)
        f.write("\n")
    md = os.path.splitext(output)[0] + ".md"
    with open(md, "w") as f:
        f.write(report.full_markdown(results))
    say("## Targets\n\n" + report.summary_markdown(results))
    say(f"wrote {output} and {md} in {results['duration_s']:.0f} s")
    return 1 if failed else 0
