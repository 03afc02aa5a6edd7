"""activator.daemon against python-systemd's systemd.daemon, side by side, on the same calls.

tests/daemons/daemon_cases.py runs a table of calls in /usr/bin/python3 (where Debian's
python3-systemd lives), once with each implementation, on descriptors of every kind it can
make (unix, inet, inet6, netlink, packet, vsock, raw sockets of every type, listening or
not; pipes, fifos, files, directories, /dev/null, memfd, eventfd, a message queue, a
closed number), file and socket objects, paths that exist, do not, loop or are too long,
every address form of is_socket_sockaddr(), and notify() with every NOTIFY_SOCKET,
status, pid and fds shape. Results, exception types, errno, strerror and filename,
the datagrams received (text, credentials, descriptors) and the environment left
behind must be identical. As root the runs happen in private mount and IPC namespaces,
so booted() and is_mq(path=) are tried against every state of /run/systemd/system and
a mounted /dev/mqueue; notify() is tried again as nobody, where pid= needs the retry.
Then: python-systemd's users run unchanged (tests/daemons/notifier.py) under
systemd-socket-activate, activator run and activator serve.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from conftest import DAEMONS, ROOT, connect, free_port, json_events, require, wait_for
from test_notify import no_core, receive, receiver, write_unit
from test_protocol import python_systemd  # noqa: F401 - the fixture

SYSTEM_PYTHON = "/usr/bin/python3"
RUNNER = str(DAEMONS / "daemon_cases.py")
NOTIFIER = str(DAEMONS / "notifier.py")
IS_ROOT = os.geteuid() == 0

SOCKETS = [
    "unix-stream-listen", "unix-stream-bound", "unix-stream-unbound", "unix-dgram-path", "unix-dgram-abstract",
    "unix-seqpacket-listen", "unix-abstract-listen", "unix-relative", "unix-pair", "tcp4-listen", "tcp4-connected",
    "tcp4-accepted", "tcp4-unbound", "udp4", "tcp6-listen", "udp6", "tcp6-unbound", "tcp6-v4mapped", "netlink",
    "packet", "vsock", "alg", "raw4", "raw6",
]
OTHERS = ["pipe-r", "pipe-w", "fifo", "file", "dir", "devnull", "memfd", "eventfd", "mq", "closed"]
OBJECTS = ["sockobj", "closed-sockobj", "fileobj", "closed-fileobj", "str-fileno", "broken-fileno", "index"]
STRANGE = [-1, -(2**31) - 1, 2**31, 2**64, 3.0, None, "3", True]
ALL_FDS = [{"fd": n} for n in SOCKETS + OTHERS] + [{"obj": n} for n in OBJECTS] + STRANGE
TYPES = [0, socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET, socket.SOCK_RAW,
         socket.SOCK_STREAM | socket.SOCK_CLOEXEC, -1]
FAMILIES = [0, socket.AF_UNIX, socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK, socket.AF_PACKET,
            socket.AF_VSOCK, -1, 2**31]
LISTENING = [-1, 0, 1, 7, -5]


def call(f: str, *args, env=None, booted=None, **kwargs) -> dict:
    case = {"f": f, "args": list(args), "kwargs": kwargs}
    if env is not None:
        case["env"] = env
    if booted is not None:
        case["booted"] = booted
    return case


def socket_cases() -> list[dict]:
    cases = []
    for fd in ALL_FDS:
        cases += [call("is_socket", fd, family=f, type=t) for f in FAMILIES for t in TYPES]
        cases += [call("is_socket", fd, type=t, listening=lst) for t in TYPES for lst in LISTENING]
        cases += [call("is_socket", fd, f, 0, lst) for f in (0, socket.AF_INET6) for lst in (-1, 1)]  # positionally
        ports = [0, {"value": "tcp4"}, {"value": "udp6"}, {"value": "tcp6"}, 1, 65535, 65536, -1]
        cases += [call("is_socket_inet", fd, family=f, port=p)
                  for f in (0, socket.AF_INET, socket.AF_INET6, socket.AF_UNIX, -1) for p in ports]
        cases += [call("is_socket_inet", fd, 0, t, lst) for t in TYPES for lst in (-1, 0, 1)]
        cases += [call("is_socket_unix", fd, type=t, listening=lst) for t in TYPES for lst in (-1, 0, 1)]
        cases += [call("is_socket_unix", fd, path=p) for p in UNIX_PATHS]
    cases += [call("is_socket", {"fd": "tcp4-listen"}, 0, 0, -1, 1), call("is_socket"), call("is_socket", 3, x=1)]
    cases += [call("is_socket_unix", {"fd": "unix-stream-listen"}, socket.SOCK_STREAM, 1, {"path": "stream.sock"})]
    for fd in ({"fd": "tcp4-listen"}, {"fd": "unix-dgram-path"}, {"obj": "sockobj"}):  # asking changes nothing
        cases += [dict(call("is_socket", fd, socket.AF_INET, socket.SOCK_STREAM, 1), defaulttimeout=5),
                  dict(call("is_socket_unix", fd, path="x"), defaulttimeout=0),
                  dict(call("is_socket_inet", fd, port=1), defaulttimeout=2.5),
                  dict(call("is_socket_sockaddr", fd, "127.0.0.1", socket.SOCK_STREAM), defaulttimeout=1)]
    return cases


UNIX_PATHS = [
    None, "", {"path": "stream.sock"}, {"path": "dgram.sock"}, {"path": "seq.sock"}, {"path": "bound.sock"},
    {"path": "obj.sock"}, "rel.sock", {"path": "rel.sock"}, {"path": "missing"}, {"bytespath": "stream.sock"},
    {"pathlike": "stream.sock"}, {"bytespath": "dgram.sock"}, {"fmt": "\0activator-cases-{pid}"},
    {"fmt": "@activator-cases-{pid}"}, "x\0y", {"bytes": "a\0"}, 5, {"path": "stream.sock/"}, "/" + "a" * 200,
]
ADDRESSES = [
    "127.0.0.1", "127.0.0.1:{tcp4}", "127.0.0.1:{udp4}", "127.0.0.1:0", "127.0.0.1:1", "127.0.0.1:65535",
    "127.0.0.1:65536", "127.0.0.1:-1", "127.0.0.1:-0", "127.0.0.1: {tcp4}", "127.0.0.1:+{tcp4}", "127.0.0.1:{tcp4} ",
    "127.0.0.1:0x10", "127.0.0.1:010", "127.0.0.1:99999999999999999999", "127.0.0.1:4294967296",
    "127.0.0.1:18446744073709551615", "127.0.0.1:", "127.0.0.2:{tcp4}", "0.0.0.0", "0.0.0.0:0", "127.0.0.1:1:2",
    "[::1]", "[::1]:{tcp6}", "[::1]:{udp6}", "[::1]:", "[::1]x", "[::1]:x", "[::1", "[]", "[::]", "[::]:0",
    "[::ffff:127.0.0.1]", "[::ffff:127.0.0.1]:{mapped}", "[fe80::1%lo]:80", "[::1]:65536", "[192.0.2.1]",
    "::1", "{tcp4}", "{tcp6}", "80", "0", "65536", "-80", " 80", "0x50", "lo", "lo:80", "lo:{tcp6}",
    "nosuchinterface0", "averyveryverylonginterfacename", "", ":", ":80", "192.0.2", "192.0.2.1.5", "192.0.02.1",
    "256.0.2.1", "192.0.2.1:{tcp4}", "é", "é:80", "127.0.0.1\t",
]
LONG_PORTS = ["127.0.0.1:" + "9" * 100_000, "[::1]:0x" + "f" * 100_000]  # ERANGE, in linear time


def sockaddr_cases() -> list[dict]:
    cases = []
    targets = [{"fd": n} for n in SOCKETS] + [{"fd": "pipe-r"}, {"fd": "closed"}, -1, {"obj": "sockobj"}]
    for fd in targets:
        cases += [call("is_socket_sockaddr", fd, {"fmt": a}) for a in ADDRESSES]
        cases += [call("is_socket_sockaddr", fd, {"fmt": a}, flowinfo=fl)
                  for a in ("[::1]:{tcp6}", "[::1]", "127.0.0.1", "lo") for fl in (1, -1, 2**31)]
        cases += [call("is_socket_sockaddr", fd, {"fmt": "127.0.0.1:{tcp4}"}, t, 0, lst)
                  for t in TYPES for lst in (-1, 0, 1)]
        cases += [call("is_socket_sockaddr", fd, {"fmt": "[::1]:{udp6}"}, type=t) for t in TYPES]
    cases += [call("is_socket_sockaddr", {"fd": "tcp4-listen"}, a) for a in LONG_PORTS]
    for bad in ({"bytes": "127.0.0.1"}, "127.0.0.1\0", None, 5, "\udcff"):
        cases += [call("is_socket_sockaddr", {"fd": "tcp4-listen"}, bad), call("is_socket_sockaddr", -1, bad)]
    return cases


FIFO_PATHS = [
    None, {"path": "fifo"}, {"path": "fifo2"}, {"path": "fifo-link"}, {"path": "file"}, {"path": "missing"},
    {"path": "file/sub"}, {"path": "missing-dir/x"}, {"path": "loop"}, {"path": "loop/x"}, "/" + "a" * 5000,
    "", {"bytespath": "fifo"}, {"pathlike": "fifo"}, {"pathlike": "fifo2"}, 5, "a\0b", {"path": "."},
]
MQ_PATHS = [None, {"fmt": "{mq}"}, {"fmt": "{mq2}"}, {"fmt": "{mq}x"}, "relative", "", "/", "/missing-queue",
            {"bytes": "/x"}, 5, "/a\0b", "/" + "a" * 5000, {"fmt": "/{mq}"}, {"fmt": "{mq}/"}]


def file_cases() -> list[dict]:
    cases = []
    for fd in ALL_FDS:
        cases += [call("is_fifo", fd)] + [call("is_fifo", fd, path=p) for p in FIFO_PATHS]
        cases += [call("is_mq", fd)] + [call("is_mq", fd, p) for p in MQ_PATHS]
    cases += [call("booted"), call("booted", 1), call("is_fifo"), call("is_mq", 3, None, 4)]
    return cases


def booted_cases() -> list[dict]:
    return [call("booted", booted=state) for state in ("absent", "dir", "file", "link", "dangling", "dir")]


HERE = {"NOTIFY_SOCKET": {"fmt": "{dir}/notify"}}


def notify_cases() -> list[dict]:
    cases = []
    sockets = [None, "", "x", "@", "/", {"fmt": "{dir}/notify"}, {"fmt": "{notify_abstract}"},
               {"fmt": "{dir}/missing"}, {"fmt": "{dir}/stream.sock"}, {"fmt": "{dir}/seq.sock"},
               {"fmt": "{dir}/file"}, {"fmt": "{dir}/notify/"}, {"fmt": "{dir}/dgram.sock"},
               "/" + "a" * 107, "/" + "a" * 106, "@" + "a" * 107, "@" + "a" * 106, " /x", "vsock:2:1234",
               "vsock::9", "\udcff/x", "/\udcff", "@activator-cases-nobody-listens"]
    for value in sockets:
        cases.append(call("notify", "READY=1", env={"NOTIFY_SOCKET": value}))
        cases.append(call("notify", "READY=1", True, env={"NOTIFY_SOCKET": value}))
    statuses = ["READY=1", "", "READY=1\nSTATUS=serving 3 clients\nMAINPID=1", "STATUS=é ✓", "\n\n", "X" * 300_000,
                "X" * (9 * 1024 * 1024), {"bytes": "READY=1"}, "A\0B", "\udcff", 5, None]
    cases += [call("notify", s, env=HERE) for s in statuses]
    cases += [call("notify", status="READY=1", env=HERE), call("notify", env=HERE),
              call("notify", "READY=1", False, 0, [], 5, env=HERE), call("notify", "READY=1", fd=[], env=HERE)]
    for unset in (False, True, "yes", 0, [], None):
        cases.append(call("notify", "READY=1", unset, env=HERE))
        cases.append(call("notify", "READY=1", unset_environment=unset, env={"NOTIFY_SOCKET": "relative"}))
    for pid in (0, {"value": "pid"}, 1, 99_999_999, -1, 2**31, 2**63, "1", 1.5, True, None):
        cases.append(call("notify", "MAINPID=1", pid=pid, env=HERE))
        cases.append(call("notify", "READY=1", pid=pid, fds=[{"fd": "pipe-w"}], env=HERE))
    fd_lists = [[], [{"fd": "pipe-r"}], [{"fd": "pipe-r"}, {"fd": "unix-pair"}, {"fd": "memfd"}],
                [{"obj": "sockobj"}], [{"obj": "index"}], [-1], [{"fd": "closed"}], [2**31], [2**63], [2**64],
                {"repeat": [{"fd": "pipe-r"}, 253]}, {"repeat": [{"fd": "pipe-r"}, 254]}, None, 3,
                {"dict": [[0, {"fd": "pipe-r"}]]}, {"set": [{"fd": "pipe-r"}]}, {"tuple": [{"fd": "eventfd"}]},
                {"bytes": "\x00"}, "abc", [True], [3.0], [None]]
    for fds in fd_lists:
        cases.append(call("notify", "FDSTORE=1\nFDNAME=x", fds=fds, env=HERE))
    cases.append(call("notify", "FDSTORE=1", False, 0, [{"fd": "pipe-r"}], env={"NOTIFY_SOCKET": None}))
    cases.append(call("notify", "FDSTORE=1", True, 1, [{"fd": "fifo"}], env={"NOTIFY_SOCKET": {"fmt": "{dir}/x"}}))
    return cases


# ------------------------------------------------------------------ running
def run_cases(impl: str, cases: list[dict], mounts: bool = False, runner: str = RUNNER,
              pythonpath: str = str(ROOT), user: int | None = None, env: dict | None = None) -> dict:
    argv = [SYSTEM_PYTHON, runner, impl]
    if mounts:
        argv = ["unshare", "--mount", "--ipc", "--propagation", "private", "--", *argv, "--mounts"]
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))}
    environ.update(PYTHONPATH=pythonpath, **(env or {}))
    creds = {"user": user, "group": user, "extra_groups": []} if user is not None else {}
    proc = subprocess.run(argv, input=json.dumps(cases), capture_output=True, text=True, env=environ, timeout=300,
                          cwd="/", **creds)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def compare(cases: list[dict], theirs: dict, ours: dict) -> dict[str, dict]:
    """The results by case (as JSON), after checking that both implementations gave the same."""
    assert theirs["fixtures"] == ours["fixtures"]
    assert len(theirs["results"]) == len(ours["results"]) == len(cases)
    mismatches = [f"{json.dumps(c)[:300]}\n  systemd:   {str(t)[:400]}\n  activator: {str(o)[:400]}"
                  for c, t, o in zip(cases, theirs["results"], ours["results"]) if t != o]
    assert not mismatches, f"{len(mismatches)} of {len(cases)} differ:\n" + "\n".join(mismatches[:15])
    return {json.dumps(c): r for c, r in zip(cases, ours["results"])}


def outcomes(results: dict[str, dict]) -> set[str]:
    """What the table exercised: return values, exception types and errno messages."""
    seen = set()
    for r in results.values():
        seen.add(r.get("result") or r.get("exc") or "missing")
        if r.get("errno"):
            seen.add(os.strerror(r["errno"]))
    return seen


def test_the_is_functions_match_python_systemd(python_systemd):
    if IS_ROOT:
        require("unshare", "mount")
    cases = socket_cases() + sockaddr_cases() + file_cases() + (booted_cases() if IS_ROOT else [])
    assert len(cases) > 5000
    results = compare(cases, run_cases("systemd", cases, IS_ROOT), run_cases("activator", cases, IS_ROOT))
    expected = {"True", "False", "TypeError", "ValueError", "OverflowError"}
    expected |= {os.strerror(e) for e in (errno.EBADF, errno.EINVAL, errno.ERANGE, errno.ENAMETOOLONG, errno.ELOOP)}
    assert expected <= outcomes(results), expected - outcomes(results)

    def result(case):
        return results[json.dumps(case)]

    assert result(call("is_socket_sockaddr", {"fd": "tcp4-listen"}, {"fmt": "127.0.0.1:{tcp4}"})) == {"result": "True"}
    assert result(call("is_socket_unix", {"fd": "unix-stream-listen"}, path={"path": "stream.sock"})) == \
        {"result": "True"}
    assert result(call("is_fifo", {"fd": "fifo"}, path={"path": "fifo-link"})) == {"result": "True"}
    assert result(call("is_fifo", {"fd": "fifo"}, path={"path": "loop"}))["errno"] == errno.ELOOP
    if IS_ROOT:
        states = [result(call("booted", booted=s)) for s in ("absent", "dir", "file", "link", "dangling")]
        assert states == [{"result": "False"}, {"result": "True"},
                          {"exc": "NotADirectoryError", "errno": errno.ENOTDIR, "strerror": os.strerror(errno.ENOTDIR),
                           "filename": None}, {"result": "True"}, {"result": "False"}]
        assert result(call("is_mq", {"fd": "mq"}, {"fmt": "{mq}"})) == {"result": "True"}
        assert result(call("is_mq", {"fd": "mq"}, {"fmt": "{mq2}"})) == {"result": "False"}
        assert result(call("is_mq", {"fd": "mq"}, "/missing-queue"))["errno"] == errno.ENOENT


def test_notify_matches_python_systemd(python_systemd):
    cases = notify_cases()
    results = compare(cases, run_cases("systemd", cases), run_cases("activator", cases))
    expected = {"True", "False", "TypeError", "ValueError", "OverflowError", "UnicodeEncodeError"}
    expected |= {os.strerror(e) for e in (errno.ENOENT, errno.EBADF, errno.EINVAL, errno.ENAMETOOLONG,
                                           errno.ECONNREFUSED, errno.EPROTOTYPE)}
    assert expected <= outcomes(results), expected - outcomes(results)
    fds = [{"fd": "pipe-r"}, {"fd": "unix-pair"}, {"fd": "memfd"}]
    stored = results[json.dumps(call("notify", "FDSTORE=1\nFDNAME=x", fds=fds, env=HERE))]
    assert stored["result"] == "True"
    assert stored["received"] == [{"to": "notify-path", "flags": 0, "pid": "self", "uid": os.geteuid(),
                                   "data": "FDSTORE=1\nFDNAME=x", "fds": ["pipe-r", "unix-pair", "memfd"]}]
    mainpid = results[json.dumps(call("notify", "MAINPID=1", pid=1, env=HERE))]
    # As root the kernel lets us speak for pid 1; otherwise libsystemd's retry sends as ourselves.
    assert mainpid["result"] == "True" and mainpid["received"][0]["pid"] == ("1" if IS_ROOT else "self")
    gone = results[json.dumps(call("notify", "READY=1", True, env={"NOTIFY_SOCKET": "x"}))]
    assert gone["errno"] == errno.EINVAL and gone["NOTIFY_SOCKET"] is None


def test_notify_pid_without_privilege_is_sent_again_as_ourselves(python_systemd):
    if not IS_ROOT:
        pytest.skip("unprivileged already: test_notify_matches_python_systemd covers the retry")
    cases = notify_cases()
    shared = Path(tempfile.mkdtemp(prefix="activator-compat-"))
    try:  # nobody cannot read a checkout under /root: a copy it can
        shared.chmod(0o755)
        shutil.copytree(ROOT / "activator", shared / "activator", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
        shutil.copy(RUNNER, shared / "daemon_cases.py")
        (shared / "tmp").mkdir()
        (shared / "tmp").chmod(0o777)
        kw = {"runner": str(shared / "daemon_cases.py"), "pythonpath": str(shared), "user": 65534,
              "env": {"TMPDIR": str(shared / "tmp")}}
        results = compare(cases, run_cases("systemd", cases, **kw), run_cases("activator", cases, **kw))
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    for pid in (1, 99_999_999):
        got = results[json.dumps(call("notify", "MAINPID=1", pid=pid, env=HERE))]
        assert got["result"] == "True" and got["received"][0]["pid"] == "self"


# ------------------------------------------------- python-systemd's users, unchanged
def wait_event(a, event: str, count: int = 1, timeout: float = 10.0, **fields) -> dict:
    found = wait_for(lambda: len(json_events(a, event, **fields)) >= count, timeout=timeout, what=f"{event} {fields}")
    assert found
    return json_events(a, event, **fields)[count - 1]


def try_connect(port: int) -> socket.socket | None:
    try:
        return connect(("127.0.0.1", port))
    except ConnectionRefusedError:
        return None


@pytest.mark.parametrize("impl", ["systemd", "activator"])
def test_notify_daemon_under_systemd_socket_activate(python_systemd, tmp_path, impl):
    """systemd-socket-activate execs it: we are its supervisor, at NOTIFY_SOCKET."""
    require("systemd-socket-activate")
    port = free_port()
    path = str(tmp_path / "notify")
    with receiver(path) as r:
        proc = subprocess.Popen(
            ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "-E", f"NOTIFY_SOCKET={path}",
             "-E", "WATCHDOG_USEC=300000", "-E", f"PYTHONPATH={ROOT}", SYSTEM_PYTHON, NOTIFIER, impl, "fdstore"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            c = wait_for(lambda: try_connect(port), what="systemd-socket-activate listening")
            with c, c.makefile("rb") as f:
                c.sendall(b"ping 1\n")
                assert f.readline() == b"pong 1 from %d\n" % proc.pid  # the daemon it exec'd
                assert receive(r) == ("READY=1\nSTATUS=0 connection(s) taken back", proc.pid, [])
                assert [receive(r) for _ in range(3)] == [("WATCHDOG=1", proc.pid, [])] * 3
                c.sendall(b"restart\n")
                stored = next(m for m in (receive(r) for _ in range(100)) if m[0] != "WATCHDOG=1")  # pings first
                assert stored[:2] == ("FDSTORE=1\nFDNAME=conn", proc.pid) and len(stored[2]) == 1
                assert proc.wait(10) == 3
                with socket.socket(fileno=stored[2][0]) as kept:  # the client's connection, handed to us
                    kept.sendall(b"through the store\n")
                    assert f.readline() == b"through the store\n"
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("impl", ["systemd", "activator"])
def test_notify_daemon_under_activator_run(python_systemd, activator, impl):
    port = free_port()
    a = activator("run", "--log-format", "json", "--type", "notify", "-l", f"127.0.0.1:{port}",
                  "-E", f"PYTHONPATH={ROOT}", "--", SYSTEM_PYTHON, NOTIFIER, impl, "ready")
    a.wait_listening()
    with connect(("127.0.0.1", port)) as c:
        hello = c.recv(100)
    pid = wait_event(a, "start")["pid"]
    assert hello == b"hello from %d\n" % pid
    assert wait_event(a, "status", message="status: starting")["pid"] == pid
    assert wait_event(a, "status", message="status: serving")["pid"] == pid
    assert wait_event(a, "ready")["pid"] == pid
    assert a.stop() == 0


@pytest.mark.parametrize("impl", ["systemd", "activator"])
def test_watchdog_and_descriptor_store_under_activator_serve(python_systemd, activator, tmp_path, impl):
    port = free_port()
    unit = write_unit(tmp_path, port, [SYSTEM_PYTHON, NOTIFIER, impl, "fdstore"], type="notify", watchdog_sec="1s",
                      restart="on-failure", restart_sec="100ms", file_descriptor_store_max=4,
                      environment={"PYTHONPATH": str(ROOT)})
    a = activator("serve", "--log-format", "json", unit, preexec_fn=no_core)
    a.wait_listening()
    with connect(("127.0.0.1", port)) as c, c.makefile("rb") as f:
        c.sendall(b"ping 0\n")
        first = int(re.fullmatch(rb"pong 0 from (\d+)\n", f.readline()).group(1))
        wait_event(a, "ready")
        # Talk for 2.5 watchdog periods: the daemon's WATCHDOG=1 every third of one keeps it alive.
        started = time.monotonic()
        for i in range(1, 1000):
            if time.monotonic() - started > 2.5:
                break
            c.sendall(b"ping %d\n" % i)
            assert f.readline() == b"pong %d from %d\n" % (i, first)
            time.sleep(0.05)  # pacing the conversation, not waiting for anything
        assert not json_events(a, "watchdog")
        c.sendall(b"restart\n")  # FDSTORE=1 with our connection, then exit 3
        wait_event(a, "fdstore", message="stored 1 descriptor(s) as 'conn' (1 in store)")
        wait_event(a, "exit", pid=first)
        second = wait_event(a, "start", count=2)["pid"]
        wait_event(a, "status", message="status: 1 connection(s) taken back", pid=second)
        c.sendall(b"ping again\n")
        assert f.readline() == b"pong again from %d\n" % second  # the same connection, kept by activator
        c.sendall(b"hang\n")  # no more WATCHDOG=1
        hung = time.time()
        fired = datetime.strptime(wait_event(a, "watchdog")["time"], "%Y-%m-%dT%H:%M:%S.%fZ")
        assert fired.replace(tzinfo=timezone.utc).timestamp() - hung >= 0.8  # a period after the last ping
        wait_event(a, "exit", pid=second)
    assert a.stop() == 0


# ------------------------------------------------------------------ the module itself
SIGNATURES = r"""
import inspect, json, sys
if sys.argv[1] == "systemd":
    from systemd import daemon
else:
    from activator import daemon
out = {"LISTEN_FDS_START": daemon.LISTEN_FDS_START}
public = getattr(daemon, "__all__", None) or [n for n in dir(daemon) if not n.startswith("_")]
for name in (n for n in public if n != "LISTEN_FDS_START"):
    obj = getattr(daemon, name)
    try:
        parameters = inspect.signature(obj).parameters.values()
        out[name] = ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in parameters)
    except ValueError:  # a C function: the first line of its docstring says
        out[name] = obj.__doc__.splitlines()[0].partition("(")[2].partition(")")[0]
print(json.dumps(out))
"""


def test_same_names_and_signatures(python_systemd):
    def signatures(impl: str) -> dict:
        proc = subprocess.run([SYSTEM_PYTHON, "-c", SIGNATURES, impl], capture_output=True, text=True, timeout=30,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    theirs, ours = signatures("systemd"), signatures("activator")
    assert theirs["listen_fds"] == "unset_environment=True"
    assert theirs["is_socket_sockaddr"] == "fileobj, address, type=0, flowinfo=0, listening=-1"
    # The one difference: "fds=()" is what python-systemd does without fds (an explicit None is a TypeError in both).
    assert theirs.pop("notify") == "status, unset_environment=False, pid=0, fds=None"
    assert ours.pop("notify") == "status, unset_environment=False, pid=0, fds=()"
    assert ours == theirs


def test_needs_neither_libsystemd_nor_the_c_extension():
    code = (
        "import sys\n"
        "sys.modules['systemd'] = sys.modules['activator._fastspawn'] = None  # importing either fails now\n"
        "import activator\n"
        "from activator import daemon\n"
        "assert (activator.listen_fds, activator.listen_fds_with_names, activator.notify) == \\\n"
        "    (daemon.listen_fds, daemon.listen_fds_with_names, daemon.notify)\n"
        "print(daemon.listen_fds(), daemon.listen_fds_with_names(), daemon.notify('READY=1'), daemon.is_socket(0))\n"
        "print(sorted(m for m in sys.modules if m.startswith(('ctypes', 'click'))))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[] {} False False", "[]"]  # ctypes only for is_mq()
