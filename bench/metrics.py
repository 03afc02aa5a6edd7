"""The seven benchmark metrics. Each returns a list of metric records (see ``record``)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time

from .util import (BenchError, Proc, activator_argv, activator_script, clean_env, free_ports, status_fields,
                   summarize, wait_idle, wait_listening)

LISTEN_RX = r"[Ll]istening on"
EXIT_RX = r"pid \d+ (exited|killed)"


def rotate(items: list, i: int) -> list:
    """The runs of one round: every peer once, the order rotated each round (A,B,C then B,C,A ...)."""
    k = i % len(items) if items else 0
    return items[k:] + items[:k]


def record(key, title, unit, better, results, subject="activator", targets=(), errors=None, notes=None, extra=None):
    """A metric: per-row summaries, the subject's ratio to every other row, and the targets checked.

    ``targets``: dicts with ``against`` (a row name, or None for an absolute bound on the subject's
    median), ``op`` ("ge" or "le") and ``bound`` (a ratio, or an absolute value).
    """
    rows = {name: summarize(samples) for name, samples in results.items()}
    ratios = {}
    subj = rows.get(subject, {}).get("median")
    for name, row in rows.items():
        if name != subject and subj is not None and row["median"]:
            ratios[name] = subj / row["median"]
    checked = []
    for t in targets:
        value = subj if t.get("against") is None else ratios.get(t["against"])
        met = None
        if value is not None:
            met = value >= t["bound"] if t["op"] == "ge" else value <= t["bound"]
        checked.append({**t, "value": value, "met": met})
    out = {"key": key, "title": title, "unit": unit, "higher_is_better": better, "subject": subject,
           "rows": rows, "ratios": ratios, "targets": checked, "errors": errors or {}, "notes": notes or []}
    if extra:
        out.update(extra)
    return out


class Context:
    def __init__(self, params: dict, tmp: str, helpers: dict[str, str], say):
        self.p = params
        self.tmp = tmp
        self.h = helpers
        self.say = say
        script = activator_script()
        self.act = activator_argv()
        self.act_script = script or self.act
        self.cat = shutil.which("cat") or "/bin/cat"

    def have(self, tool: str) -> bool:
        return shutil.which(tool) is not None


# --------------------------------------------------------------------------- peers
def _xinetd_conf(ctx: Context, name: str, port: int, server: list[str], instances: int) -> str:
    d = os.path.join(ctx.tmp, f"xinetd-{port}")
    os.makedirs(d, exist_ok=True)
    conf = os.path.join(d, "xinetd.conf")
    user = "user = root\n" if os.geteuid() == 0 else ""
    args = f"server_args = {' '.join(server[1:])}\n" if len(server) > 1 else ""
    with open(conf, "w") as f:
        f.write(
            "defaults\n{\n"
            f"  log_type = FILE {d}/xinetd.log\n"
            "  log_on_success =\n  log_on_failure =\n"
            "}\n"
            f"service {name}\n{{\n"
            "  type = UNLISTED\n  socket_type = stream\n  protocol = tcp\n  wait = no\n"
            f"  {user}  server = {server[0]}\n  {args}"
            f"  port = {port}\n  bind = 127.0.0.1\n"
            f"  instances = {instances}\n  per_source = UNLIMITED\n  cps = 1000000 1\n"
            "  flags = REUSE\n  disable = no\n"
            "}\n"
        )
    return conf


def start_inetd_peer(ctx: Context, peer: str, port: int, server: list[str], maxconn: int) -> Proc:
    """An accept-mode launcher passing each connection on stdin/stdout to ``server``."""
    if peer == "activator":
        argv = [*ctx.act, "run", "-a", "--inetd", "--max-connections", str(maxconn), "-l", f"127.0.0.1:{port}",
                "--", *server]
    elif peer == "tcpserver":
        argv = ["tcpserver", "-c", str(maxconn), "-H", "-R", "-l", "0", "127.0.0.1", str(port), *server]
    elif peer == "systemd-socket-activate":
        argv = ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "-a", "--inetd", *server]
    elif peer == "xinetd":
        conf = _xinetd_conf(ctx, "benchecho", port, server, maxconn)
        argv = ["xinetd", "-dontfork", "-f", conf, "-pidfile", os.path.join(os.path.dirname(conf), "pid")]
    else:
        raise ValueError(peer)
    return _launch(argv, port)


def _launch(argv: list[str], port: int) -> Proc:
    """Start a peer and wait until it listens on ``port``; stopped again if it never does."""
    if not shutil.which(argv[0]) and not os.path.exists(argv[0]):
        raise BenchError(f"{argv[0]} is not installed")
    proc = Proc(argv)
    try:
        wait_listening(port, proc)
    except BenchError:
        proc.stop()
        raise
    return proc


def start_fd3_peer(ctx: Context, peer: str, port: int, server: list[str], maxconn: int) -> Proc:
    if peer == "activator":
        argv = [*ctx.act, "run", "-a", "--max-connections", str(maxconn), "-l", f"127.0.0.1:{port}", "--", *server]
    elif peer == "systemd-socket-activate":
        argv = ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "-a", *server]
    else:
        raise ValueError(peer)
    return _launch(argv, port)


def connbench(ctx: Context, port: int, threads: int, seconds: float, maxconn: int) -> tuple[int, int, float]:
    out = subprocess.run([ctx.h["connbench"], "127.0.0.1", str(port), str(threads), f"{seconds:.3f}", str(maxconn)],
                         capture_output=True, text=True, timeout=seconds + 30)
    if out.returncode != 0:
        raise BenchError(f"connbench failed: {out.stderr.strip()}")
    ok, err, elapsed = out.stdout.split()
    return int(ok), int(err), float(elapsed)


def _conn_rate_metrics(ctx: Context, kind: str, peers: list[str], starter, server: list[str], targets_by_mode,
                       titles) -> list[dict]:
    p = ctx.p
    maxconn = 64
    procs, errors = {}, {}
    try:
        for peer in peers:
            port = free_ports(1)[0]
            try:
                procs[peer] = (starter(ctx, peer, port, server, maxconn), port)
            except BenchError as exc:
                errors[peer] = str(exc)
                ctx.say(f"  {peer}: skipped: {exc}")
        samples = {mode: {peer: [] for peer in procs} for mode in (1, 4)}
        failures = {mode: {peer: 0 for peer in procs} for mode in (1, 4)}
        for peer, (proc, port) in procs.items():  # warm-up, not recorded
            connbench(ctx, port, 1, p["warmup_s"], 1000)
        for rnd in range(p["rounds"]):
            for mode in (1, 4):
                for peer in rotate(list(procs), rnd):
                    proc, port = procs[peer]
                    ok, err, elapsed = connbench(ctx, port, mode, p["batch_s"], p["batch_max"])
                    samples[mode][peer].append(ok / elapsed if elapsed > 0 else 0.0)
                    failures[mode][peer] += err
            ctx.say(f"  round {rnd + 1}/{p['rounds']}: " + ", ".join(
                f"{peer} {samples[1][peer][-1]:.0f}/{samples[4][peer][-1]:.0f}" for peer in procs))
    finally:
        for proc, _ in procs.values():
            proc.stop()
    out = []
    for mode in (1, 4):
        key = f"{kind}_{'seq' if mode == 1 else 'conc4'}"
        errs = dict(errors)
        for peer, n in failures[mode].items():
            if n:
                errs[peer] = f"{n} failed connections"
        out.append(record(key, titles[mode], "conn/s", True, samples[mode], targets=targets_by_mode, errors=errs))
    return out


def accept_inetd(ctx: Context) -> list[dict]:
    peers = ["activator", "tcpserver", "systemd-socket-activate", "xinetd"]
    targets = [{"against": "tcpserver", "op": "ge", "bound": 1.1},
               {"against": "systemd-socket-activate", "op": "ge", "bound": 1.3}]
    titles = {1: "1. Accept mode, inetd style (cat), one connection per request, sequential",
              4: "1. Accept mode, inetd style (cat), one connection per request, 4 concurrent clients"}
    return _conn_rate_metrics(ctx, "accept_inetd", peers, start_inetd_peer, [ctx.cat], targets, titles)


def accept_fd3(ctx: Context) -> list[dict]:
    peers = ["activator", "systemd-socket-activate"]
    targets = [{"against": "systemd-socket-activate", "op": "ge", "bound": 1.3}]
    titles = {1: "2. Accept mode, connection at fd 3 (LISTEN_FDS=1), sequential",
              4: "2. Accept mode, connection at fd 3 (LISTEN_FDS=1), 4 concurrent clients"}
    return _conn_rate_metrics(ctx, "accept_fd3", peers, start_fd3_peer, [ctx.h["echo3"]], targets, titles)


# --------------------------------------------------------------------------- latency
def _first_byte(port: int, timeout: float = 10.0) -> float:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        t0 = time.perf_counter()
        s.connect(("127.0.0.1", port))
        data = s.recv(1)
        t1 = time.perf_counter()
    finally:
        s.close()
    if data != b"x":
        raise BenchError(f"daemon answered {data!r} instead of b'x'")
    return t1 - t0


def _launch_accept_no(ctx: Context, peer: str, ports: list[int], daemon: list[str], extra=()) -> Proc:
    listen = [a for port in ports for a in ("-l", f"127.0.0.1:{port}")]
    if peer == "activator":
        argv = [*ctx.act, "run", *extra, *listen, "--", *daemon]
    elif peer == "systemd-socket-activate":
        argv = ["systemd-socket-activate", *listen, *daemon]
    else:
        raise ValueError(peer)
    return Proc(argv)


def first_activation(ctx: Context) -> list[dict]:
    peers = ["activator", "systemd-socket-activate"]
    samples = {peer: [] for peer in peers}
    errors = {}
    if not ctx.have("systemd-socket-activate"):
        errors["systemd-socket-activate"] = "not installed"
        peers = ["activator"]
        samples = {"activator": []}
    for i in range(ctx.p["latency_samples"]):
        for peer in rotate(peers, i):
            port = free_ports(1)[0]
            proc = _launch_accept_no(ctx, peer, [port], [ctx.h["first"]])
            try:
                proc.wait_line(LISTEN_RX)
                wait_idle(proc.pid)
                samples[peer].append(_first_byte(port) * 1000)
            except (BenchError, OSError) as exc:
                errors[peer] = str(exc)
            finally:
                proc.stop()
    return [record("first_activation", "3. First activation, Accept=no: connect() to first byte of a fresh daemon",
                   "ms", False, samples,
                   targets=[{"against": "systemd-socket-activate", "op": "le", "bound": 1.1}], errors=errors,
                   notes=["daemon: a small C program that accepts once and writes one byte; a new launcher per sample, "
                          "measured once it logged that it listens and sleeps in its event loop"])]


# --------------------------------------------------------------------------- start-up
def _wall(argv: list[str], timeout: float = 30.0) -> float:
    """Exec to exit. Not ``subprocess.run(timeout=...)``: with a timeout, ``Popen.wait`` polls with sleeps
    doubling from 0.5 ms, so a process exiting after 18 ms was seen after 31.5 ms (every figure of a run
    that took 16-31 ms read 32 ms). A blocking ``waitpid`` sees the exit when it happens; the timeout is
    a timer that kills the process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=clean_env())
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        rc = proc.wait()
    finally:
        timer.cancel()
    t1 = time.perf_counter()
    if rc != 0:
        raise BenchError(f"{' '.join(argv)} exited with {rc}")
    return t1 - t0


def _to_listening(argv: list[str], count: int = 1, timeout: float = 30.0) -> float:
    proc = Proc(argv)
    try:
        t = proc.wait_line(LISTEN_RX, count=count, timeout=timeout)
        return t - proc.t0
    finally:
        proc.stop()


def startup(ctx: Context) -> list[dict]:
    py = sys.executable
    act = ctx.act_script
    label = "activator" if act is not ctx.act else "python -m activator"
    cases = {
        "python3 -c pass": lambda: _wall([py, "-c", "pass"]),
        f"{label} --version": lambda: _wall([*act, "--version"]),
        f"{label} --help": lambda: _wall([*act, "--help"]),
        "python -m activator --version": lambda: _wall([*ctx.act, "--version"]),
        f"{label} run (exec to listening)": lambda: _to_listening(
            [*act, "run", "-l", f"127.0.0.1:{free_ports(1)[0]}", "--", "true"]),
    }
    if ctx.have("systemd-socket-activate"):
        cases["systemd-socket-activate (exec to listening)"] = lambda: _to_listening(
            ["systemd-socket-activate", "-l", f"127.0.0.1:{free_ports(1)[0]}", "true"])
    samples = {name: [] for name in cases}
    errors = {}
    for i in range(ctx.p["startup_runs"]):
        for name in rotate(list(cases), i):
            fn = cases[name]
            try:
                samples[name].append(fn() * 1000)
            except (BenchError, subprocess.TimeoutExpired) as exc:
                errors[name] = str(exc)
    base = "python3 -c pass"
    note = [f"interpreter: {py}; '{label}' is the installed console script" if act is not ctx.act else
            f"interpreter: {py}"]
    out = []
    for key, row, title in (
        ("startup_listen", f"{label} run (exec to listening)", "4. Start-up: exec to listening vs python3 -c pass"),
        ("startup_help", f"{label} --help", "4. Start-up: activator --help vs python3 -c pass"),
        ("startup_version", f"{label} --version", "4. Start-up: activator --version vs python3 -c pass"),
    ):
        rows = {row: samples[row], base: samples[base]}
        if key == "startup_listen" and "systemd-socket-activate (exec to listening)" in samples:
            rows["systemd-socket-activate (exec to listening)"] = samples["systemd-socket-activate (exec to listening)"]
        if key == "startup_version":
            rows["python -m activator --version"] = samples["python -m activator --version"]
        out.append(record(key, title, "ms", False, rows, subject=row,
                          targets=[{"against": base, "op": "le", "bound": 1.3}],
                          errors={k: v for k, v in errors.items() if k in rows}, notes=note))
    return out


# --------------------------------------------------------------------------- idle
def idle(ctx: Context) -> list[dict]:
    n = 100
    secs = ctx.p["idle_s"]
    procs, errors = {}, {}
    try:
        ports = free_ports(2 * n)  # all at once: a port released by the first set is never in the second
        procs["activator"] = _launch_accept_no(ctx, "activator", ports[:n], ["true"])
        if ctx.have("systemd-socket-activate"):
            procs["systemd-socket-activate"] = _launch_accept_no(ctx, "systemd-socket-activate", ports[n:], ["true"])
        procs["python3 (idle sleep)"] = Proc([sys.executable, "-c", "import time; time.sleep(1000)"])
        for name, proc in procs.items():
            if not name.startswith("python3"):
                proc.wait_line(LISTEN_RX, count=n, timeout=30)
            wait_idle(proc.pid, timeout=10)
        before = {name: status_fields(proc.pid) for name, proc in procs.items()}
        time.sleep(secs)  # the measurement itself: nothing happens for this long
        after = {name: status_fields(proc.pid) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.stop()
    wake = {name: [float(after[name]["voluntary"] + after[name]["involuntary"]
                         - before[name]["voluntary"] - before[name]["involuntary"])] for name in procs}
    rss = {name: [after[name]["rss_kib"] / 1024] for name in procs}
    notes = [f"{n} listening TCP sockets held for {secs:g} s with no traffic; wake-ups = context switches "
             "(voluntary + involuntary, all threads) during that time"]
    return [
        record("idle_wakeups", f"5. Idle: wake-ups while holding {n} sockets for {secs:g} s", "switches", False,
               wake, targets=[{"against": None, "op": "le", "bound": 0}], errors=errors, notes=notes),
        record("idle_rss", f"5. Idle: resident memory holding {n} sockets vs a bare idle interpreter", "MiB", False,
               rss, targets=[{"against": "python3 (idle sleep)", "op": "le", "bound": 1.3}], errors=errors,
               notes=notes),
    ]


# --------------------------------------------------------------------------- scale
def _config_supported(ctx: Context) -> bool:
    if ctx.p.get("force_run"):
        return False
    path = os.path.join(ctx.tmp, "probe.toml")
    with open(path, "w") as f:
        f.write(_toml_units([free_ports(1)[0]], ctx.h["first"]))
    try:
        rc = subprocess.run([*ctx.act, "check", path], capture_output=True, timeout=30, env=clean_env()).returncode
    except subprocess.TimeoutExpired:
        return False
    return rc == 0


def _toml_units(ports: list[int], daemon: str) -> str:
    parts = []
    for i, port in enumerate(ports):
        parts.append(f'[u{i:04d}]\nsocket.listen-stream = "127.0.0.1:{port}"\nservice.exec-start = ["{daemon}"]\n')
    return "\n".join(parts)


def _scale_launcher(ctx: Context, serve: bool, ports: list[int], tag: str) -> list[str]:
    if serve:
        path = os.path.join(ctx.tmp, f"scale-{tag}.toml")
        with open(path, "w") as f:
            f.write(_toml_units(ports, ctx.h["first"]))
        return [*ctx.act, "serve", path]
    listen = [a for port in ports for a in ("-l", f"127.0.0.1:{port}")]
    return [*ctx.act, "run", "--trigger-limit-burst", "0", "--start-limit-burst", "0", *listen, "--", ctx.h["first"]]


def scale(ctx: Context) -> list[dict]:
    n = ctx.p["scale_n"]
    serve = _config_supported(ctx)
    how = (f"`activator serve` with {n} units of one socket each" if serve
           else f"`activator run` with {n} -l options (one unit; the TOML config was not available)")
    ctx.say(f"  using {how}")
    out = []
    ports = free_ports(n + 1)
    ports_n, ports_1 = ports[:n], ports[n:]
    argv_n = _scale_launcher(ctx, serve, ports_n, "n")
    argv_1 = _scale_launcher(ctx, serve, ports_1, "1")
    start = {"1 socket": [], f"{n} sockets": []}
    cases = [("1 socket", argv_1, 1), (f"{n} sockets", argv_n, n)]
    if serve:  # for the analysis: the same sockets from the command line, without TOML parsing
        run_name = f"{n} sockets, `run` with {n} -l"
        start[run_name] = []
        cases.append((run_name, _scale_launcher(ctx, False, ports_n, "run"), n))
    errors = {}
    for i in range(ctx.p["scale_rounds"]):
        for name, argv, count in rotate(cases, i):
            try:
                start[name].append(_to_listening(argv, count=count, timeout=60) * 1000)
            except BenchError as exc:
                errors[name] = str(exc)
    out.append(record("scale_startup", f"6. Scale: start-up (exec to listening) with {n} sockets vs 1", "ms", False,
                      start, subject=f"{n} sockets", targets=[{"against": "1 socket", "op": "le", "bound": 1.5}],
                      errors=errors, notes=[how]))

    # dispatch: activation latency on the last socket vs the first
    lat = {"last socket": [], "first socket": []}
    errors = {}
    proc = Proc(argv_n)
    try:
        proc.wait_line(LISTEN_RX, count=n, timeout=60)
        wait_idle(proc.pid, timeout=20)
        served = 0
        for i in range(ctx.p["dispatch_samples"]):
            for name in ("first socket", "last socket"):
                idx = (i if name == "first socket" else n - 1 - i) if serve else (0 if name == "first socket" else n - 1)
                lat[name].append(_first_byte(ports_n[idx]) * 1000)
                served += 1
                # wait for that daemon to exit and be reaped (one unit: its sockets re-armed)
                proc.wait_line(EXIT_RX, count=served, timeout=20)
                _wait_children(proc.pid, 0, 20)
                wait_idle(proc.pid, timeout=20)
    except (BenchError, OSError) as exc:
        errors["activator"] = str(exc)
    finally:
        proc.stop()
    out.append(record("scale_dispatch", f"6. Scale: activation latency on the last of {n} sockets vs the first", "ms",
                      False, lat, subject="last socket", targets=[{"against": "first socket", "op": "le", "bound": 1.1}],
                      errors=errors, notes=[how]))
    out.append(_hold(ctx))
    return out


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _wait_children(pid: int, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(_children(pid)) == n:
            return
        time.sleep(0.02)
    raise BenchError(f"expected {n} daemons, found {len(_children(pid))} after {timeout:g}s")


def _hold(ctx: Context) -> dict:
    hold = ctx.p["hold_n"]
    warm = 20
    port = free_ports(1)[0]
    proc = Proc([*ctx.act, "run", "-a", "--max-connections", str(hold + 1000), "-l", f"127.0.0.1:{port}", "--",
                 ctx.h["echo3"]])
    clients: list[socket.socket] = []
    result: dict[str, list[float]] = {}
    errors = {}
    extra = {}
    try:
        proc.wait_line(LISTEN_RX)
        # warm-up: a few connections opened and closed, so that one-time allocations are not counted
        for _ in range(warm):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            clients.append(s)
        _wait_children(proc.pid, warm, 30)
        for s in clients:
            s.close()
        clients.clear()
        _wait_children(proc.pid, 0, 30)
        wait_idle(proc.pid, 10)
        rss0 = status_fields(proc.pid)["rss_kib"]
        marks = {}
        for i in range(hold):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            if i + 1 == hold // 2:
                _wait_children(proc.pid, hold // 2, 60)
                wait_idle(proc.pid, 10)
                marks["half"] = status_fields(proc.pid)["rss_kib"]
        _wait_children(proc.pid, hold, 120)
        wait_idle(proc.pid, 10)
        rss1 = status_fields(proc.pid)["rss_kib"]
        per_conn = (rss1 - rss0) / hold
        slope = (rss1 - marks["half"]) / (hold - hold // 2)
        result = {"activator": [per_conn]}
        extra = {"rss_before_kib": rss0, "rss_half_kib": marks["half"], "rss_after_kib": rss1,
                 "marginal_kib_per_connection": slope}
    except (BenchError, OSError) as exc:
        errors["activator"] = str(exc)
        result = {"activator": []}
    finally:
        for s in clients:
            s.close()
        try:
            _wait_children(proc.pid, 0, 60)
        except BenchError:
            pass
        proc.stop()
    notes = [f"{hold} connections held open by their daemons (a C program echoing on fd 3); "
             f"RSS growth from after {warm} warm-up connections to {hold} held, divided by {hold}"]
    if extra:
        notes.append(f"RSS {extra['rss_before_kib']} KiB -> {extra['rss_half_kib']} KiB at {hold // 2} -> "
                     f"{extra['rss_after_kib']} KiB; marginal growth over the second half "
                     f"{extra['marginal_kib_per_connection']:.2f} KiB/connection")
    return record("scale_hold_rss", f"6. Scale: activator memory growth per held connection ({hold} open)",
                  "KiB/conn", False, result, targets=[{"against": None, "op": "le", "bound": 4.0}],
                  errors=errors, notes=notes, extra=extra)


# --------------------------------------------------------------------------- nbd
def nbd(ctx: Context) -> list[dict]:
    size = ctx.p["nbd_size"]
    nbytes = _size_bytes(size)
    peers = ["activator", "systemd-socket-activate"]
    procs, errors = {}, {}
    samples = {}
    for tool in ("nbdkit", "nbdcopy", "nbdinfo"):
        if not ctx.have(tool):
            errors["activator"] = f"{tool} is not installed"
    try:
        if not errors:
            for peer in peers:
                if peer != "activator" and not ctx.have(peer):
                    errors[peer] = "not installed"
                    continue
                port = free_ports(1)[0]
                proc = _launch_accept_no(ctx, peer, [port], ["nbdkit", "memory", size])
                procs[peer] = (proc, port)
                proc.wait_line(LISTEN_RX)
                # activate nbdkit first: the data path is measured, not the activation
                subprocess.run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}"], check=True, capture_output=True,
                               timeout=30)
                samples[peer] = []
            for i in range(ctx.p["nbd_rounds"]):
                for peer in rotate(list(procs), i):
                    proc, port = procs[peer]
                    t0 = time.perf_counter()
                    subprocess.run(["nbdcopy", "--no-extents", f"nbd://127.0.0.1:{port}", "null:"], check=True,
                                   capture_output=True, timeout=300)
                    samples[peer].append(nbytes / (time.perf_counter() - t0) / 2**20)
    except (BenchError, subprocess.SubprocessError, OSError) as exc:
        errors.setdefault("activator", str(exc))
    finally:
        for proc, _ in procs.values():
            proc.stop()
    return [record("nbd_throughput", f"7. Data path: nbdcopy of {size} from nbdkit memory (Accept=no)", "MiB/s", True,
                   samples or {"activator": []},
                   targets=[{"against": "systemd-socket-activate", "op": "ge", "bound": 0.98}], errors=errors,
                   notes=["nbdcopy --no-extents nbd://127.0.0.1:PORT null: (nbdkit activated before timing)"])]


def _size_bytes(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


ALL = [
    ("accept_inetd", accept_inetd),
    ("accept_fd3", accept_fd3),
    ("first_activation", first_activation),
    ("startup", startup),
    ("idle", idle),
    ("scale", scale),
    ("nbd", nbd),
]
