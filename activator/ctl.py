"""`activator ctl`: talk to a running activator over its control socket (activator.control).

Exit codes: 0 done, 1 refused or failed (the reason on stderr), 2 usage (or several
activators to choose from), 3 no such unit, 4 cannot reach activator.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, NoReturn

import click

from .settings import WORKERS_MAX


# ------------------------------------------------------------------ ctl
def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"activator ctl: error: {message}", err=True)
    sys.exit(code)


def _call(ctx: click.Context, command: str, **fields: Any) -> Any:
    from .control import ControlError, call

    target = ctx.find_object(dict) or {}
    try:
        return call(command, socket_path=target.get("socket"), pid=target.get("pid"), timeout=target.get("timeout", 10.0),
                    **fields)
    except ControlError as exc:
        if command == "reload" and isinstance(exc.result, dict) and exc.result.get("errors"):
            for line in exc.result["errors"]:
                click.echo(f"activator ctl: error: {line}", err=True)
            _fail("the new configuration was rejected; the running one stays", exc.exit_status)
        if not _report_units(exc.result):
            _fail(exc.message, exc.exit_status)
        sys.exit(exc.exit_status)


def _report_units(result: Any) -> bool:
    """Per-unit outcomes of start/stop/restart: done ones on stdout, refused ones on stderr. False when
    ``result`` has none."""
    if not isinstance(result, dict) or not isinstance(result.get("units"), list):
        return False
    outcomes = [o for o in result["units"] if isinstance(o, dict) and "message" in o]
    for outcome in outcomes:
        line = f"{outcome['unit']}: {outcome['message']}"
        click.echo(line if outcome.get("ok") else f"activator ctl: error: {line}", err=not outcome.get("ok"))
    return bool(outcomes)


@click.group(short_help="Control a running activator: status, start, stop, restart, reexec.")
@click.option("-s", "--socket", "socket_path", metavar="PATH",
              help="The control socket [default: $ACTIVATOR_CONTROL_SOCKET, else the only activator answering "
                   "in the default directory].")
@click.option("--pid", type=click.IntRange(1), metavar="PID",
              help="The activator with this pid (its socket in the default directory).")
@click.option("--timeout", type=click.FloatRange(0.1, 3600), default=10.0, show_default=True, metavar="SECONDS",
              help="How long to wait for an answer.")
@click.pass_context
def ctl(ctx: click.Context, socket_path: str | None, pid: int | None, timeout: float) -> None:
    """Control a running activator through its control socket.

    \b
    Exit status: 0 done, 1 refused or failed, 2 usage, 3 no such unit,
    4 cannot reach activator.
    """
    if socket_path and pid:
        raise click.UsageError("--socket and --pid are mutually exclusive")
    ctx.obj = {"socket": socket_path, "pid": pid, "timeout": timeout}


@ctl.command(short_help="State, counters and process statistics of units.")
@click.argument("units", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="The status as JSON (schema in docs/control.md).")
@click.pass_context
def status(ctx: click.Context, units: tuple[str, ...], as_json: bool) -> None:
    """Show the state, counters and process statistics of UNITS (default: all)."""
    result = _call(ctx, "status", units=list(units))
    if as_json:
        import json

        click.echo(json.dumps(result, indent=2))
        return
    click.echo(format_status(result), nl=False)


def _unit_command(name: str, help_text: str) -> Callable[..., Any]:
    @click.argument("units", nargs=-1, required=True)
    @click.pass_context
    def command(ctx: click.Context, units: tuple[str, ...], **fields: Any) -> None:
        _report_units(_call(ctx, name, units=list(units), **fields))

    command.__doc__ = help_text
    return command


ctl.command("start", short_help="Start daemons now.")(_unit_command(
    "start", "Start the daemon of each UNIT now (accept mode: listen again)."))
ctl.command("stop", short_help="Stop daemons; the sockets stay held.")(click.option(
    "--disarm", is_flag=True, help="Do not listen on the sockets either, until `ctl start`.")(_unit_command(
        "stop", "Stop the processes of each UNIT, without restart=. Its sockets stay open and are listened on "
                "again (connections then start it again), unless --disarm.")))
ctl.command("restart", short_help="Restart daemons: stop first, or --graceful.")(
    click.option("--graceful", "mode", flag_value="graceful", default=None,
                 help="Start the new daemon beside the old one, stop the old one once the new one is ready.")(
        click.option("--stop-first", "mode", flag_value="stop-first",
                     help="Stop the daemon, then start it again (whatever restart-style says).")(_unit_command(
            "restart", "Restart the daemon of each UNIT as its restart-style says (default: stop it, then start it "
                       "again; accept mode: listen again), or as the option says."))))


@ctl.command(short_help="Change the number of workers of a unit.")
@click.argument("unit")
@click.argument("workers", type=click.IntRange(1, WORKERS_MAX))
@click.pass_context
def scale(ctx: click.Context, unit: str, workers: int) -> None:
    """Run WORKERS instances of UNIT's daemon (accept = false); the highest-numbered ones stop first."""
    _report_units(_call(ctx, "scale", units=[unit], workers=workers))


@ctl.command(short_help="Load the configuration again (as SIGHUP) and say what changed.")
@click.pass_context
def reload(ctx: click.Context) -> None:
    """Load the unit files again, as SIGHUP does; exit 1 with every error when they are rejected."""
    result = _call(ctx, "reload")
    parts = [f"{len(result[key])} {key}" + (f" ({', '.join(result[key])})" if result[key] and key != "unchanged"
                                             else "") for key in ("unchanged", "changed", "added", "removed")]
    click.echo("reloaded: " + ", ".join(parts))


@ctl.command(short_help="Re-execute activator in place, keeping sockets and daemons.")
@click.pass_context
def reexec(ctx: click.Context) -> None:
    """Re-execute activator (the same interpreter, the package installed now): the new process takes over
    every socket, daemon, counter and rate limit, with no connection refused and no daemon restarted. Waits
    until it answers; exit 1 when the re-exec is refused or fails (the old one goes on). See docs/reexec.md."""
    from .control import ControlError, call, find_socket
    from .reexec import CHECK_TIMEOUT

    before = _call(ctx, "reexec")
    target = ctx.find_object(dict) or {}
    timeout = target.get("timeout", 10.0)
    deadline = time.monotonic() + CHECK_TIMEOUT + timeout  # the new code's check may take that long
    failures = before.get("failures", 0)
    path = find_socket(target.get("socket"), before["pid"])
    while time.monotonic() < deadline:  # bounded: until the new process answers, or the old one says it failed
        try:
            state = call("status", socket_path=target.get("socket"), pid=before["pid"], timeout=timeout,
                         units=[])["activator"]
        except ControlError as exc:
            if exc.code != "unreachable":
                _fail(exc.message, exc.exit_status)
            if not os.path.exists(path):  # kept across an exec; removed when activator exits
                _fail("activator exited during the re-exec (its log says why)", 1)
            time.sleep(0.1)
            continue
        if state.get("reexecs", 0) > before["reexecs"]:
            click.echo(f"re-executed: pid {state['pid']}, activator {state['version']}")
            return
        if state.get("reexec_failures", 0) > failures:
            _fail(f"the re-exec failed, the running activator goes on: {state.get('reexec_error')}", 1)
        time.sleep(0.1)
    _fail(f"no answer from the re-executed activator within {CHECK_TIMEOUT + timeout:g}s", 4)


@ctl.command("stop-all", short_help="Stop every daemon and exit, as SIGTERM.")
@click.pass_context
def stop_all(ctx: click.Context) -> None:
    """Stop every daemon and activator itself, as SIGTERM does."""
    _call(ctx, "shutdown")
    click.echo("stopping")


ctl.add_command(stop_all, "shutdown")


# ------------------------------------------------------------ the table
COLUMNS = ("UNIT", "STATE", "PID", "INST", "UPTIME", "ACTIV", "STARTS", "ACCEPT", "REFUSED", "DENIED", "RESTARTS",
           "LAST EXIT", "CPU", "CPU%", "RSS", "FDS", "THR", "LISTEN")
LEFT = {"UNIT", "STATE", "LAST EXIT", "LISTEN"}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    for unit, size, sub, subsize in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            return f"{s // size}{unit}{(s % size) // subsize:02d}{sub}"
    return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"


def _size(n: int) -> str:
    value = float(n)
    for suffix in ("B", "K", "M", "G"):
        if value < 1024 or suffix == "G":
            return f"{value:.0f}{suffix}" if suffix == "B" else f"{value:.1f}{suffix}"
        value /= 1024
    return str(n)


def _state(u: dict[str, Any]) -> str:
    if u["state"] == "paused" and u["paused_until"]:
        return "paused until " + time.strftime("%H:%M:%S", time.localtime(u["paused_until"]))
    return u["state"]


def _last_exit(u: dict[str, Any], now: float) -> str:
    last = u["last_exit"]
    if not last:
        return "-"
    how = last["status"].replace("exited with ", "").replace("killed by signal ", "")
    return f"{how}, {_duration(now - last['time'])} ago"


def _pids(u: dict[str, Any]) -> str:
    """The main pid; with workers each one's (comma-separated); during a graceful restart OLD+NEW."""
    workers = u.get("workers") or []
    if len(workers) <= 1 and not any(w["new_pid"] for w in workers):
        return str(u["main_pid"] or "-")
    return ",".join(str(w["main_pid"] or "-") + (f"+{w['new_pid']}" if w["new_pid"] else "") for w in workers)


def _row(u: dict[str, Any], now: float) -> list[str]:
    c, p = u["counters"], u["processes"]
    stats = ["-"] * 5 if not p or not p["count"] else [
        f"{p['cpu_seconds']:.2f}s", f"{p['cpu_percent']:.1f}", _size(p["rss_bytes"]), str(p["open_fds"]), str(p["threads"])]
    return [u["name"], _state(u), _pids(u), str(u["instances"]), _duration(u["uptime"]),
            *(str(c[k]) for k in ("activations", "starts", "accepted", "refused", "denied", "restarts")),
            _last_exit(u, now), *stats, ", ".join(u["listen"])]


def format_status(result: dict[str, Any]) -> str:
    """The status as an aligned table, one row per unit, and a line for each failed unit."""
    now = time.time()
    rows = [list(COLUMNS)] + [_row(u, now) for u in result["units"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = []
    for r in rows:
        cells = [cell.ljust(w) if name in LEFT else cell.rjust(w) for cell, w, name in zip(r, widths, COLUMNS)]
        lines.append("  ".join(cells).rstrip())
    for u in result["units"]:
        if u["failed"]:
            lines.append(f"{u['name']}: failed: {u['failed']}")
    note = result["activator"].get("process_statistics")
    if note:
        lines.append(f"note: {note}")
    return "\n".join(lines) + "\n"
