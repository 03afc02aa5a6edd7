"""`activator ctl`, the control socket and --metrics-listen, against a real `activator serve`.

Real clients only: the `activator ctl` command line, the Python client, socat-like raw sockets,
curl for /metrics (parsed with prometheus_client's parser), a forked child as `nobody`.
"""
from __future__ import annotations

import json
import os
import pwd
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import PROBE, ROOT, free_port, pid_alive, require, wait_for
from test_limits import voluntary_switches

PY = sys.executable
SCHEMA_DOC = ROOT / "docs" / "control.md"


# ------------------------------------------------------------------ helpers
def ctl(sock: Path | str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ACTIVATOR_CONTROL_SOCKET"}
    return subprocess.run([PY, "-m", "activator", "ctl", "--socket", str(sock), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def status(sock: Path | str, *units: str) -> dict:
    from activator.control import call

    return call("status", socket_path=str(sock), units=list(units))


def unit(sock: Path | str, name: str) -> dict:
    return status(sock, name)["units"][0]


def recv_exactly(s: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = s.recv(min(n - len(data), 1 << 20))
        assert chunk, "connection closed"
        data += chunk
    return bytes(data)


def closed_at_once(address, family=socket.AF_INET) -> bool:
    """Whether a connection to ``address`` is accepted and closed by activator without an answer."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(address)
        try:
            return s.recv(10) == b""
        except ConnectionResetError:
            return True


class Echo:
    """A connection to the echo unit (one `cat` per connection) that has been answered once."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.roundtrip(b"x\n")

    def roundtrip(self, line: bytes) -> None:
        self.sock.sendall(line)
        assert recv_exactly(self.sock, len(line)) == line

    def close(self) -> None:
        self.sock.close()


def echo_load(port: int, threads: int, per_thread: int) -> int:
    """``threads`` clients, each making ``per_thread`` connections one after the other; bounded."""
    done = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for n in range(per_thread):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                line = b"load %d %d\n" % (i, n)
                s.sendall(line)
                assert recv_exactly(s, len(line)) == line
                s.shutdown(socket.SHUT_WR)
                assert s.recv(10) == b""  # cat saw the end and exited
            with lock:
                done.append(1)

    workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert not any(w.is_alive() for w in workers)
    return len(done)


class NBD:
    """Just enough of the NBD protocol (newstyle, NBD_OPT_EXPORT_NAME, simple replies) to read."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert recv_exactly(self.sock, 16) == b"NBDMAGICIHAVEOPT"
        (flags,) = struct.unpack(">H", recv_exactly(self.sock, 2))
        self.sock.sendall(struct.pack(">I", flags & 3))
        self.sock.sendall(b"IHAVEOPT" + struct.pack(">II", 1, 0))
        self.size, _ = struct.unpack(">QH", recv_exactly(self.sock, 10))
        if not flags & 2:
            recv_exactly(self.sock, 124)

    def read(self, offset: int, length: int, handle: int) -> bytes:
        self.sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, handle, offset, length))
        magic, error, got = struct.unpack(">IIQ", recv_exactly(self.sock, 16))
        assert (magic, error, got) == (0x67446698, 0, handle)
        return recv_exactly(self.sock, length)

    def close(self) -> None:
        self.sock.close()


def backlog(port: int) -> int:
    """Connections waiting in the accept queue of the socket listening on TCP ``port``."""
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"nothing listens on port {port}")


# ------------------------------------------------------- the documented schema
def documented_schema() -> dict:
    text = SCHEMA_DOC.read_text()
    m = re.search(r"<!-- status-schema -->\s*```json\n(.*?)```", text, re.S)
    assert m, "the status schema block is missing from docs/control.md"
    return json.loads(m.group(1))


TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def check_schema(value, schema: dict, where: str = "$") -> None:
    """The subset of JSON Schema docs/control.md uses: type (or a list), enum, properties, required,
    additionalProperties false, items."""
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        ok = any((isinstance(value, int) and not isinstance(value, bool)) if t == "integer" else
                 (isinstance(value, (int, float)) and not isinstance(value, bool)) if t == "number" else
                 isinstance(value, TYPES[t]) for t in names)
        assert ok, f"{where}: {value!r} is not {types}"
    if isinstance(value, dict) and "properties" in schema:
        props = schema["properties"]
        missing = set(schema.get("required", ())) - set(value)
        assert not missing, f"{where}: missing {sorted(missing)}"
        if schema.get("additionalProperties") is False:
            extra = set(value) - set(props)
            assert not extra, f"{where}: undocumented {sorted(extra)}"
        for key, sub in props.items():
            if key in value:
                check_schema(value[key], sub, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            check_schema(item, schema["items"], f"{where}[{i}]")


def test_the_schema_checker_can_fail():
    schema = documented_schema()
    good = {"activator": {"pid": 1, "version": "x", "protocol": 1, "started": 1.0, "uptime": 0.5,
                          "stopping": False, "process_statistics": None}, "units": []}
    check_schema(good, schema)
    for broken in ({**good, "extra": 1}, {"units": []},
                   {**good, "activator": {**good["activator"], "pid": "1"}},
                   {**good, "activator": {**good["activator"], "stopping": 0}}):
        with pytest.raises(AssertionError):
            check_schema(broken, schema)


# ------------------------------------------------------------------ fixtures
@pytest.fixture
def four_units(activator, tmp_path):
    """serve with an idle unit, nbdkit, an accept-mode echo and a unit that exits at once (it gets paused
    by its start limit at its first connection), a control socket and a metrics endpoint."""
    require("nbdkit", "curl")
    ports = {name: free_port() for name in ("idle", "nbd", "echo", "crashy", "metrics")}
    ports["echo6"] = free_port(socket.AF_INET6)
    config = tmp_path / "units.toml"
    config.write_text(f"""
[idle]
socket.listen-stream = "127.0.0.1:{ports['idle']}"
service.exec-start = ["{PY}", "{PROBE}", "{tmp_path / 'idle.json'}"]

[nbd]
socket.listen-stream = "127.0.0.1:{ports['nbd']}"
service.exec-start = ["nbdkit", "memory", "1M"]

[echo]
socket.listen-stream = ["127.0.0.1:{ports['echo']}", "[::1]:{ports['echo6']}"]
socket.accept = true
socket.max-connections = 8
socket.ip-address-deny = "::1"
service.exec-start = ["cat"]
service.standard-input = "socket"

[crashy]
socket.listen-stream = "127.0.0.1:{ports['crashy']}"
service.exec-start = ["true"]
service.start-limit-burst = 3
service.start-limit-interval-sec = "60s"
""")
    sock = tmp_path / "control.sock"
    a = activator("serve", "--control-socket", sock, "--metrics-listen", f"127.0.0.1:{ports['metrics']}", config)
    a.wait_listening(5)
    return a, sock, ports


# ------------------------------------------------------------------ the tests
def test_status_counters_statistics_restart_and_metrics(four_units):
    a, sock, ports = four_units
    schema = documented_schema()
    first = status(sock)
    check_schema(first, schema)
    assert [u["name"] for u in first["units"]] == ["idle", "nbd", "echo", "crashy"]
    assert {u["state"] for u in first["units"]} == {"listening"}
    assert first["activator"]["pid"] == a.pid

    # crashy: exits at once without accepting, so its waiting connection triggers it again: 3 starts,
    # then the 4th activation hits the start limit and pauses it for the rest of the 60 s interval.
    waiting = socket.create_connection(("127.0.0.1", ports["crashy"]), timeout=10)
    crashy = wait_for(lambda: (u := unit(sock, "crashy"))["state"] == "paused" and u, what="crashy paused")
    assert crashy["counters"]["starts"] == 3 and crashy["counters"]["activations"] == 4
    assert crashy["last_exit"]["code"] == 0 and crashy["last_exit"]["status"] == "exited with status 0"
    assert crashy["paused_until"] > time.time() + 30 and crashy["main_pid"] is None

    # nbd: a real nbdkit, started by the first connection.
    nbd = NBD(ports["nbd"])
    assert nbd.size == 1024 * 1024
    u = wait_for(lambda: (u := unit(sock, "nbd"))["state"] == "running" and u, what="nbd running")
    nbd_pid = u["main_pid"]
    assert Path(f"/proc/{nbd_pid}/comm").read_text().strip() == "nbdkit"
    assert nbd_pid in a.children()
    before = u["processes"]
    assert before["count"] >= 1 and before["rss_bytes"] > 1024 * 1024 and before["threads"] >= 1
    assert before["open_fds"] >= 4  # stdin/out/err, the listening socket, the connection
    assert u["uptime"] >= 0 and u["started"] <= time.time() and u["counters"]["starts"] == 1
    for i in range(2000):  # 500 MiB through nbdkit
        nbd.read((i % 4) * 256 * 1024, 256 * 1024, i)
    after = unit(sock, "nbd")["processes"]
    assert after["cpu_seconds"] > before["cpu_seconds"] and after["cpu_percent"] > 0

    # echo: 8 instances held (max-connections), 3 more refused, 2 denied (::1), then a load of 120.
    held = [Echo(ports["echo"]) for _ in range(8)]
    assert unit(sock, "echo")["instances"] == 8
    for _ in range(3):
        assert closed_at_once(("127.0.0.1", ports["echo"]))
    for _ in range(2):
        assert closed_at_once(("::1", ports["echo6"]), socket.AF_INET6)
    during = unit(sock, "echo")["processes"]
    assert during["count"] == 8 and during["rss_bytes"] > 0
    for e in held:
        e.close()
    wait_for(lambda: unit(sock, "echo")["instances"] == 0, what="echo instances gone")
    assert echo_load(ports["echo"], threads=3, per_thread=40) == 120
    echo = wait_for(lambda: (u := unit(sock, "echo"))["instances"] == 0 and u, what="the last instances reaped")
    assert echo["counters"] == {"activations": 133, "starts": 0, "start_failures": 0, "accepted": 128,
                                "refused": 3, "denied": 2, "restarts": 0}
    assert echo["accept"] and echo["main_pid"] is None and echo["state"] == "listening"
    assert echo["listen"] == [f"127.0.0.1:{ports['echo']}", f"[::1]:{ports['echo6']}"]

    idle = unit(sock, "idle")
    assert idle["state"] == "listening" and idle["main_pid"] is None and idle["last_exit"] is None
    assert set(idle["counters"].values()) == {0} and idle["processes"]["count"] == 0

    # The command line: --json is the same object; the table has a row per unit under aligned columns.
    r = ctl(sock, "status", "--json")
    assert r.returncode == 0, r.stderr
    full = json.loads(r.stdout)
    check_schema(full, schema)
    assert {u["state"] for u in full["units"]} == {"listening", "running", "paused"}
    r = ctl(sock, "status")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    print("\n" + r.stdout)  # the table in docs/control.md comes from here (pytest -s)
    assert lines[0].split()[:3] == ["UNIT", "STATE", "PID"] and [line.split()[0] for line in lines[1:]] == \
        ["idle", "nbd", "echo", "crashy"]
    listen_col = lines[0].index("LISTEN")
    assert all(line[listen_col:].startswith("127.0.0.1:") for line in lines[1:])
    assert re.search(r"^crashy\s+paused until \d\d:\d\d:\d\d\s", lines[4])
    assert re.search(rf"^nbd\s+running\s+{nbd_pid}\s", lines[2])

    # Metrics, through curl, parsed by Prometheus's own text parser: the same counters.
    families = scrape(ports["metrics"])
    assert families["activator_unit_accepted"][("echo",)] == 128
    assert families["activator_unit_refused"][("echo",)] == 3
    assert families["activator_unit_denied"][("echo",)] == 2
    assert families["activator_unit_activations"][("crashy",)] == 4
    assert families["activator_unit_starts"][("crashy",)] == 3
    assert families["activator_unit_state"][("crashy", "paused")] == 1
    assert families["activator_unit_state"][("crashy", "listening")] == 0
    assert families["activator_unit_resident_memory_bytes"][("nbd",)] > 1024 * 1024
    assert families["activator_unit_paused_until_seconds"][("crashy",)] == pytest.approx(crashy["paused_until"],
                                                                                          abs=0.5)
    assert families["activator_info"][(str(a.pid), "0.1.0")] == 1

    # restart nbd: a new nbdkit; the others keep their processes, sockets and counters.
    kept = Echo(ports["echo"])  # one instance alive through the restart
    nbd.close()
    r = ctl(sock, "restart", "nbd")
    assert r.returncode == 0 and "nbd: stopping 1 process(es), then starting again" in r.stdout, r
    u = wait_for(lambda: (u := unit(sock, "nbd"))["state"] == "running" and u["main_pid"] != nbd_pid and u,
                 what="a new nbdkit")
    assert not pid_alive(nbd_pid) and u["counters"]["starts"] == 2
    assert NBD(ports["nbd"]).size == 1024 * 1024
    kept.roundtrip(b"still here\n")
    others = {x["name"]: x for x in status(sock, "echo", "crashy", "idle")["units"]}
    assert others["echo"]["instances"] == 1 and others["echo"]["counters"]["accepted"] == 129
    assert others["crashy"]["state"] == "paused" and others["crashy"]["counters"]["starts"] == 3
    assert others["idle"]["state"] == "listening" and others["idle"]["counters"]["starts"] == 0

    # A paused unit cannot be started now: exit 1 with the end of the pause.
    r = ctl(sock, "start", "crashy")
    assert r.returncode == 1 and re.search(r"crashy: paused by a rate limit until \d\d:\d\d:\d\d", r.stderr), r
    kept.close()
    waiting.close()
    assert a.stop() == 0
    assert not sock.exists()


def scrape(port: int, path: str = "/metrics") -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    r = subprocess.run(["curl", "-sS", "--fail", "--max-time", "10", f"http://127.0.0.1:{port}{path}"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    families: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(r.stdout):
        for sample in family.samples:
            # Label values in the order of their names: (unit,), (pid, version); the state gauge as (unit, state).
            key = tuple(sample.labels[k] for k in sorted(sample.labels))
            families.setdefault(family.name, {})[key[::-1] if family.name == "activator_unit_state" else key] = \
                sample.value
    return families


def test_stop_keeps_the_socket_and_does_not_restart_disarm_waits_for_start(activator, tmp_path):
    port = free_port()
    config = tmp_path / "u.toml"
    config.write_text(f"""
[hello]
socket.listen-stream = "127.0.0.1:{port}"
service.exec-start = ["{PY}", "{PROBE}", "{tmp_path / 'r.json'}"]
service.restart = "always"
service.restart-sec = "50ms"
""")
    sock = tmp_path / "c.sock"
    a = activator("serve", "--control-socket", sock, config)
    a.wait_listening()

    def hello() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            return c.recv(100)

    assert hello().startswith(b"hello from")
    first = unit(sock, "hello")["main_pid"]
    r = ctl(sock, "stop", "hello")
    assert r.returncode == 0 and r.stdout == "hello: stopping 1 process(es)\n", r
    u = wait_for(lambda: (u := unit(sock, "hello"))["main_pid"] is None and u["state"] == "listening" and u,
                 what="stopped, listening")
    assert u["last_exit"] is not None and u["counters"]["starts"] == 1  # restart=always did not restart it
    assert hello() == b"hello from %d\n" % unit(sock, "hello")["main_pid"]  # the next connection starts it
    assert unit(sock, "hello")["main_pid"] != first

    r = ctl(sock, "stop", "--disarm", "hello")
    assert r.returncode == 0 and "not listened on" in r.stdout, r
    wait_for(lambda: unit(sock, "hello")["state"] == "stopped", what="stopped")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        wait_for(lambda: backlog(port) == 1, what="the connection waiting in the backlog")
        u = unit(sock, "hello")
        assert u["state"] == "stopped" and u["counters"]["starts"] == 2 and u["main_pid"] is None
        r = ctl(sock, "start", "hello")
        assert r.returncode == 0 and re.fullmatch(r"hello: started as pid \d+\n", r.stdout), r
        assert c.recv(100) == b"hello from %d\n" % unit(sock, "hello")["main_pid"]
    r = ctl(sock, "start", "hello")
    assert r.returncode == 0 and "already running" in r.stdout
    assert a.stop() == 0


def test_reload_reports_changes_and_rejections(activator, tmp_path):
    ports = free_port(), free_port()
    config = tmp_path / "u.toml"
    body = f"""
[one]
socket.listen-stream = "127.0.0.1:{ports[0]}"
service.exec-start = ["true"]
"""
    config.write_text(body)
    sock = tmp_path / "c.sock"
    a = activator("serve", "--control-socket", sock, config)
    a.wait_listening()
    config.write_text(body + f'\n[two]\nsocket.listen-stream = "127.0.0.1:{ports[1]}"\nservice.exec-start = ["true"]\n')
    r = ctl(sock, "reload")
    assert r.returncode == 0 and r.stdout == "reloaded: 1 unchanged, 0 changed, 1 added (two), 0 removed\n", r
    config.write_text(body + '\n[two]\nsocket.listen-stream = "127.0.0.1:1"\nservice.exec-start = ["true"]\nbogus = 1\n')
    r = ctl(sock, "reload")
    assert r.returncode == 1 and r.stdout == "", r
    errors = r.stderr.splitlines()
    assert errors[-1] == "activator ctl: error: the new configuration was rejected; the running one stays"
    assert any("bogus" in line for line in errors[:-1]), r.stderr
    assert [u["name"] for u in status(sock)["units"]] == ["one", "two"]  # the running configuration stays
    assert a.stop() == 0


def test_exit_codes_a_script_can_use(activator, tmp_path):
    port = free_port()
    sock = tmp_path / "c.sock"
    r = ctl(sock, "status")
    assert r.returncode == 4 and r.stderr.startswith("activator ctl: error: cannot reach activator at ") \
        and len(r.stderr.splitlines()) == 1, r
    a = activator("run", "--control-socket", sock, "-l", f"127.0.0.1:{port}", "--", "true")
    a.wait_listening()
    assert ctl(sock, "status", "true", "nosuch").returncode == 3
    r = ctl(sock, "start")
    assert r.returncode == 2 and "Missing argument" in r.stderr
    r = ctl(sock, "restart", "nosuch")
    assert r.returncode == 3 and r.stderr == "activator ctl: error: no such unit: nosuch\n"
    r = ctl(sock, "reload")
    assert r.returncode == 1 and "nothing to reload" in r.stderr, r
    assert ctl(sock, "--pid", "1", "status").returncode == 2  # --socket and --pid
    r = ctl(sock, "stop-all")
    assert r.returncode == 0 and r.stdout == "stopping\n"
    assert a.wait(20) == 0
    assert not sock.exists()


def test_control_socket_placement_and_collisions(activator, tmp_path):
    port, port2 = free_port(), free_port()
    sock = tmp_path / "c.sock"
    a = activator("run", "--control-socket", sock, "-l", f"127.0.0.1:{port}", "--", "true")
    a.wait_listening()
    st = os.lstat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    # A second activator on the same socket: one line naming it, exit 1, nothing bound.
    b = activator("run", "--control-socket", sock, "-l", f"127.0.0.1:{port2}", "--", "true")
    assert b.wait(20) == 1
    assert b.lines == [f"activator[{b.pid}]: error: cannot open the control socket {sock}: in use: a server is listening on it"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port2), timeout=5).close()
    assert unit(sock, "true")["state"] == "listening"  # the first one is untouched
    assert a.stop() == 0 and not sock.exists()

    # A stale socket (nobody listening) is replaced; a file that is not a socket is never removed.
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(sock))
    c = activator("run", "--control-socket", sock, "-l", f"127.0.0.1:{port}", "--", "true")
    c.wait_listening()
    assert unit(sock, "true")["state"] == "listening"
    assert c.stop() == 0 and not sock.exists()
    sock.write_text("precious")
    d = activator("run", "--control-socket", sock, "-l", f"127.0.0.1:{port}", "--", "true")
    assert d.wait(20) == 1 and "is not a socket" in d.log and sock.read_text() == "precious"

    # Usage errors.
    e = activator("run", "--control-socket", sock, "--no-control-socket", "-l", f"127.0.0.1:{port}", "--", "true")
    assert e.wait(20) == 2 and "mutually exclusive" in e.log
    f = activator("run", "--metrics-listen", "nowhere:x", "-l", f"127.0.0.1:{port}", "--", "true")
    assert f.wait(20) == 2 and "--metrics-listen" in f.log


def test_default_socket_per_instance(activator, tmp_path):
    """No option: DIR/PID.sock (root: /run/activator), found by `ctl --pid`, removed at exit."""
    port = free_port()
    a = activator("run", "-l", f"127.0.0.1:{port}", "--", "true")
    a.wait_listening()
    directory = "/run/activator" if os.geteuid() == 0 else None
    if directory is None:
        pytest.skip("the default directory checked here is root's")
    path = Path(directory) / f"{a.pid}.sock"
    wait_for(path.exists, what=str(path))
    st = os.lstat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    assert not (stat.S_IMODE(os.lstat(directory).st_mode) & 0o022)
    env = {k: v for k, v in os.environ.items() if k != "ACTIVATOR_CONTROL_SOCKET"}
    r = subprocess.run([PY, "-m", "activator", "ctl", "--pid", str(a.pid), "status", "--json"], capture_output=True,
                       text=True, timeout=30, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["activator"]["pid"] == a.pid
    none = activator("run", "--no-control-socket", "-l", f"127.0.0.1:{free_port()}", "--", "true")
    none.wait_listening()
    assert not (Path(directory) / f"{none.pid}.sock").exists()
    assert a.stop() == 0 and not path.exists()
    assert none.stop() == 0


def _as_nobody(code) -> dict:
    """Run ``code()`` in a forked child with nobody's uid and gid; its JSON result."""
    nobody = pwd.getpwnam("nobody")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no exceptions out of here
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            os.write(w, json.dumps(code()).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def test_another_user_cannot_control_it(activator):
    if os.geteuid() != 0:
        pytest.skip("needs root to become nobody")
    directory = Path(tempfile.mkdtemp(prefix="activator-ctl-", dir="/tmp"))
    try:
        directory.chmod(0o755)  # nobody may reach the socket file; its own mode decides
        sock = directory / "c.sock"
        a = activator("run", "--control-socket", sock, "-l", f"127.0.0.1:{free_port()}", "--", "true")
        a.wait_listening()

        def try_it():
            from activator.control import ControlError, call

            try:
                call("shutdown", socket_path=str(sock))
            except ControlError as exc:
                return {"code": exc.code, "exit": exc.exit_status, "message": exc.message}
            return {"code": None}

        denied = _as_nobody(try_it)  # the socket file is 0600: the kernel refuses
        assert denied["code"] == "unreachable" and denied["exit"] == 4 and "Permission denied" in denied["message"]
        sock.chmod(0o666)  # a careless chmod: SO_PEERCRED still refuses
        refused = _as_nobody(try_it)
        uid = pwd.getpwnam("nobody").pw_uid
        assert refused == {"code": "permission-denied", "exit": 1,
                           "message": f"uid {uid} may not control this activator (only root and uid 0)"}
        assert unit(sock, "true")["state"] == "listening" and a.proc.poll() is None
        assert a.stop() == 0
    finally:
        for p in directory.iterdir():
            p.unlink()
        directory.rmdir()


def raw(sock: Path, data: bytes, timeout: float = 10) -> bytes:
    """Send ``data`` on a new connection, return everything until the server closes or a line arrives."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it stopped reading (a request too large, busy): its answer is there to read
        reply = bytearray()
        while not reply.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
        return bytes(reply)


def test_hostile_clients_are_contained(activator, tmp_path):
    sock = tmp_path / "c.sock"
    mport = free_port()
    a = activator("run", "--control-socket", sock, "--metrics-listen", f"127.0.0.1:{mport}",
                  "-l", f"127.0.0.1:{free_port()}", "--", "true")
    a.wait_listening()

    def error_of(data: bytes) -> dict:
        reply = json.loads(raw(sock, data))
        assert reply["ok"] is False and reply["version"] == 1
        return reply["error"]

    assert error_of(b"not json\n")["code"] == "bad-request"
    assert error_of(b"[1, 2]\n")["code"] == "bad-request"
    assert error_of(b"[" * 60000 + b"\n")["code"] == "bad-request"  # nesting bomb
    assert error_of(b'{"command": "launch-missiles"}\n')["code"] == "bad-request"
    assert error_of(b'{"command": "status", "units": "true"}\n')["code"] == "bad-request"
    assert error_of(b'{"command": "status", "units": [1]}\n')["code"] == "bad-request"
    assert error_of(b'{"command": "stop", "units": ["true"], "disarm": "yes"}\n')["code"] == "bad-request"
    assert error_of(b'{"command": "status", "sudo": true}\n')["code"] == "bad-request"
    assert error_of(b'{"command": "status", "version": 2}\n')["code"] == "unsupported-version"
    assert error_of(b'{"command": "status", "id": {"a": 1}}\n')["code"] == "bad-request"
    assert error_of(b'{"command": "status", "units": ["nosuch"]}\n')["code"] == "no-such-unit"
    assert error_of(b"\xff\xfe\n")["code"] == "bad-request"
    # Over 64 KiB without a newline: an error, then closed.
    assert error_of(b"x" * (200 * 1024))["code"] == "bad-request"
    # Several requests on one connection, answered in order, ids echoed.
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(b'{"command": "status", "id": 1}\n{"command": "status", "id": "two"}\n')
        data = b""
        while data.count(b"\n") < 2:
            chunk = s.recv(65536)
            assert chunk
            data += chunk
        replies = [json.loads(line) for line in data.splitlines()]
        assert [(r["ok"], r["id"]) for r in replies] == [(True, 1), (True, "two")]
    # 16 idle connections are served at once; the next one is told so and closed.
    idle = []
    try:
        for _ in range(16):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(sock))
            idle.append(s)
        wait_for(lambda: json.loads(raw(sock, b'{"command": "status"}\n'))["error"]["code"] == "busy",
                 what="a busy answer")
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: json.loads(raw(sock, b'{"command": "status"}\n'))["ok"], what="served again")
    # A connection that sends nothing is closed after the timeout (10 s), not kept for ever.
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(str(sock))
        t0 = time.monotonic()
        assert s.recv(10) == b""
        assert 9 < time.monotonic() - t0 < 15
    # The metrics endpoint: only GET/HEAD /metrics, bounded requests.
    for request, answer in ((b"GET /nope HTTP/1.0\r\n\r\n", b"HTTP/1.1 404 "),
                            (b"POST /metrics HTTP/1.0\r\n\r\n", b"HTTP/1.1 405 "),
                            (b"hello\r\n\r\n", b"HTTP/1.1 400 "),
                            (b"GET /metrics HTTP/1.0\r\n" + b"X: " + b"y" * 9000 + b"\r\n\r\n", b"HTTP/1.1 431 "),
                            (b"HEAD /metrics HTTP/1.0\r\n\r\n", b"HTTP/1.1 200 ")):
        with socket.create_connection(("127.0.0.1", mport), timeout=10) as s:
            s.sendall(request)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            assert data.startswith(answer), (request[:40], data[:80])
            if request.startswith(b"HEAD"):
                assert data.endswith(b"\r\n\r\n")
    assert a.proc.poll() is None and unit(sock, "true")["state"] == "listening"
    assert "Traceback" not in a.log
    assert a.stop() == 0


def test_idle_with_control_socket_and_metrics_means_no_wakeups(activator, tmp_path):
    require("curl")
    sock = tmp_path / "c.sock"
    mport = free_port()
    a = activator("run", "--control-socket", sock, "--metrics-listen", f"127.0.0.1:{mport}",
                  "-l", f"127.0.0.1:{free_port()}", "--", "true")
    a.wait_listening()
    time.sleep(0.3)  # let start-up finish
    before = voluntary_switches(a.pid)
    time.sleep(2.0)
    assert voluntary_switches(a.pid) - before == 0
    assert "_psutil_linux" not in Path(f"/proc/{a.pid}/maps").read_text()  # start-up did not pay for psutil
    status(sock)  # a client came and went: no timer of its is left behind
    assert "_psutil_linux" in Path(f"/proc/{a.pid}/maps").read_text()
    scrape(mport)
    time.sleep(0.3)
    before = voluntary_switches(a.pid)
    time.sleep(1.5)
    assert voluntary_switches(a.pid) - before == 0
    assert a.stop() == 0


def test_without_psutil_status_still_answers(activator, tmp_path):
    blocker = tmp_path / "nopsutil"
    blocker.mkdir()
    (blocker / "psutil.py").write_text("raise ImportError('psutil hidden by the test')\n")
    sock = tmp_path / "c.sock"
    a = activator("run", "--control-socket", sock, "-l", f"127.0.0.1:{free_port()}", "--", "true",
                  env={"PYTHONPATH": str(blocker)})
    a.wait_listening()
    result = status(sock)
    check_schema(result, documented_schema())
    assert result["units"][0]["processes"] is None
    assert "psutil is not installed" in result["activator"]["process_statistics"]
    r = ctl(sock, "status")
    assert r.returncode == 0 and "note: psutil is not installed" in r.stdout
    assert a.stop() == 0


def test_metrics_without_prometheus_client_is_one_line_exit_1(activator, tmp_path):
    blocker = tmp_path / "noprom"
    (blocker / "prometheus_client").mkdir(parents=True)
    (blocker / "prometheus_client" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    port = free_port()
    a = activator("run", "--metrics-listen", f"127.0.0.1:{free_port()}", "-l", f"127.0.0.1:{port}", "--", "true",
                  env={"PYTHONPATH": str(blocker)})
    assert a.wait(20) == 1
    assert a.lines == [f"activator[{a.pid}]: error: --metrics-listen needs prometheus_client: "
                       f"pip install 'activator[metrics]'"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_requests_while_stopping(activator, tmp_path):
    """During a stop the control socket still answers: status shows it, actions are refused."""
    sock = tmp_path / "c.sock"
    report = tmp_path / "r.json"
    a = activator("run", "--control-socket", sock, "--now", "--timeout-stop", "30s", "-l", f"127.0.0.1:{free_port()}",
                  "--", PY, PROBE, report, "ignore-term")
    a.wait_listening()
    name = os.path.basename(PY)  # run names its unit after the command
    daemon = wait_for(lambda: unit(sock, name)["main_pid"] if report.exists() else None, what="the daemon")
    from activator.control import call

    assert call("shutdown", socket_path=str(sock)) == {"stopping": True}
    s = wait_for(lambda: (s := status(sock))["activator"]["stopping"] and s, what="stopping")
    assert s["units"][0]["state"] == "stopping" and s["units"][0]["main_pid"] == daemon
    for command in ("start", "restart", "stop"):
        r = ctl(sock, command, name)
        assert r.returncode == 1 and r.stderr == "activator ctl: error: activator is stopping\n", (command, r)
    r = ctl(sock, "reload")
    assert r.returncode == 1 and "stopping" in r.stderr
    assert ctl(sock, "stop-all").returncode == 0  # asked twice: still one stop
    assert pid_alive(daemon)  # SIGTERM is ignored; SIGKILL comes after timeout-stop (30 s)
    os.kill(a.pid, signal.SIGTERM)  # a second SIGTERM kills what is left at once
    assert a.wait(20) == 0 and not pid_alive(daemon) and not sock.exists()


def test_the_fixed_replies_are_what_json_would_write():
    """The busy and too-large replies are ready from the start, written without json (not imported then):
    byte for byte what the json path writes, and a message that would need escaping is refused."""
    from activator import control

    for code, message in (("busy", f"{control.CLIENTS_MAX} clients are connected already; try again"),
                          ("bad-request", f"request longer than {control.REQUEST_MAX} bytes"), ("x", "")):
        assert control._fixed_error(code, message) == control._encode_error(None, code, message)
    for message in ('say "hi"', "back\\slash", "caf\u00e9", "new\nline"):
        with pytest.raises(ValueError):
            control._fixed_error("bad-request", message)
