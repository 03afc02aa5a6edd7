"""The documentation works as written: every example in README.md and docs/*.md is run, every link resolves.

Fenced blocks say what they are in their info string, after the language::

    ```sh run            bash (set -e, pipefail): must exit 0 within timeout=SECONDS (default 60)
    ```sh server         one long-running command, as a reader starts it in a terminal of its own:
                         started in the background and awaited until it prints "listening on";
                         stopped with SIGINT (Ctrl-C) at the end of its section (the next heading of
                         the same or a higher level), when it must exit 0
    ```text output       what the `run` block just before prints (stdout and stderr); "..." stands
                         for any text within a line, a line "..." for any number of lines
    ```python run        run with the installed python
    ```LANG file=PATH    saved as PATH in the example directory (executable when it starts with #!)
    ```LANG no-run       shown only: the text around it says why (a VM, podman, root-only paths...)
    ```toml              a unit document: `activator check` must accept it

A shell or Python block without one of these marks is an error, so that no command in the docs
escapes this test.

The examples of one document run in order in a sandbox of their own: a network namespace with
only a loopback interface (so the documented fixed ports, 10809 or 7007, cannot collide with
anything on the machine, and an example cannot reach anything but loopback), a PID namespace
(nothing an example starts outlives its document; after every block no process may be left but
the running servers' trees) and a mount namespace with private /tmp and /run (documented paths
such as /run/activator/nbd.sock are the example's own, and nothing is left behind). The working directory,
/tmp/checkout, holds copies of configs/, scripts/ and bench/, as a checkout does; activator is the
installed one (the venv's bin comes first on PATH, as after `. .venv/bin/activate`).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import IN_CI, ROOT, children, require, wait_for

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Pages others are writing: links to them may dangle until they land.
PENDING_PAGES = {"docs/proxy.md"}
COPIED = ("configs", "scripts", "bench")  # not activator/: the examples use the installed package
WORKDIR = "/tmp/checkout"
SHELLS = {"sh", "bash", "shell", "console"}
MARKS = {"run", "server", "output", "no-run"}
RUN_TIMEOUT = 60.0
LISTEN_TIMEOUT = 20.0
STOP_TIMEOUT = 30.0
BIN = Path(sys.executable).parent
# What the examples run besides activator: missing ones skip a document, or fail it under CI.
TOOLS = ("socat", "nbdkit", "nbdinfo", "qemu-img", "qemu-nbd", "qemu-ga", "systemd-socket-activate")
BENCH_TOOLS = ("gcc", "tcpserver", "systemd-socket-activate", "xinetd", "nbdkit", "nbdcopy", "nbdinfo")


@dataclass
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    lang: str
    marks: set[str]
    attrs: dict[str, str]
    text: str
    level: int  # of the heading it sits under (0: none)
    bad_words: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    @property
    def runnable(self) -> bool:
        return bool(self.marks & {"run", "server"}) or "file" in self.attrs or (
            self.lang == "toml" and not self.marks)


@dataclass
class Heading:
    level: int
    line: int
    text: str


FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^`]*)$")


def parse(doc: Path) -> list[Block | Heading]:
    """The fenced blocks and headings of a Markdown file, in order."""
    events: list[Block | Heading] = []
    lines = doc.read_text().splitlines()
    level = 0
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m:
            indent, fence, info = m.groups()
            close = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
            body = []
            j = i + 1
            while j < len(lines) and not close.match(lines[j]):
                body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
                j += 1
            events.append(_block(doc, i + 1, info, "\n".join(body) + "\n", level))
            i = j + 1
            continue
        h = re.match(r"^(#{1,6})\s", lines[i])
        if h:
            level = len(h.group(1))
            events.append(Heading(level, i + 1, lines[i][level:].strip()))
        i += 1
    return events


def _block(doc: Path, line: int, info: str, text: str, level: int) -> Block:
    words = info.split()
    block = Block(doc, line, words[0].lower() if words else "", set(), {}, text, level)
    for word in words[1:]:
        key, eq, value = word.partition("=")
        if eq and key in ("file", "timeout"):
            block.attrs[key] = value
        elif word in MARKS:
            block.marks.add(word)
        else:
            block.bad_words.append(word)
    return block


def problems(events: list[Block | Heading]) -> list[str]:
    """What is wrong with the marks of a document's blocks (empty when all is well)."""
    found = []
    previous: Block | None = None
    for block in events:
        if isinstance(block, Heading):
            continue
        where = block.where
        if block.bad_words:
            found.append(f"{where}: unknown mark(s) {' '.join(block.bad_words)} (known: {' '.join(sorted(MARKS))}, "
                         "file=PATH, timeout=SECONDS)")
        if len(block.marks - {"output"}) > 1 or (block.marks and "file" in block.attrs):
            found.append(f"{where}: more than one of run, server, no-run, file=")
        code = block.lang in SHELLS or block.lang == "python"
        if code and not (block.marks - {"output"} or "file" in block.attrs):
            found.append(f"{where}: unmarked {block.lang} block: mark it `run`, `server`, `file=PATH` or `no-run` "
                         "(see tests/test_docs.py)")
        if "server" in block.marks and (block.lang not in SHELLS or len(_commands(block.text)) != 1):
            found.append(f"{where}: a server block is one shell command")
        if "run" in block.marks and not code:
            found.append(f"{where}: only shell and Python blocks run")
        if "output" in block.marks and (previous is None or "run" not in previous.marks):
            found.append(f"{where}: an output block must follow a run block")
        path = block.attrs.get("file")
        if path is not None and (not path or path.startswith("/") or ".." in Path(path).parts):
            found.append(f"{where}: file={path}: give a relative path inside the example directory")
        if "timeout" in block.attrs and not re.fullmatch(r"\d+", block.attrs["timeout"]):
            found.append(f"{where}: timeout={block.attrs['timeout']}: give whole seconds")
        previous = block
    return found


def _commands(text: str) -> list[str]:
    """The command lines of a shell block: comments and blank lines dropped, continuations joined."""
    joined = re.sub(r"\\\n", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def output_matches(expected: str, actual: str) -> bool:
    pattern = []
    for line in expected.rstrip("\n").splitlines():
        if line.strip() == "...":
            pattern.append(r"(?:.*\n)*?")
        else:
            pattern.append(".*".join(re.escape(part) for part in line.rstrip().split("...")) + r"\n")
    normal = "".join(line.rstrip() + "\n" for line in actual.splitlines())
    return re.fullmatch("".join(pattern), normal) is not None


# ------------------------------------------------------------------ the sandbox
HOLDER = r"""
import fcntl, os, signal, socket, struct, subprocess, sys
# Directories under /tmp or /run the examples still need (the checkout, the venv): kept visible.
keep = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in sys.argv[2:]}
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # bring up lo: SIOCGIFFLAGS, SIOCSIFFLAGS
    flags = struct.unpack("16sh22x", fcntl.ioctl(s, 0x8913, struct.pack("16sh22x", b"lo", 0)))[1]
    fcntl.ioctl(s, 0x8914, struct.pack("16sh22x", b"lo", flags | 1))
for path, mode in (("/tmp", "1777"), ("/run", "0755")):
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=" + mode, "tmpfs", path], check=True)
for path, fd in keep.items():
    os.makedirs(path, exist_ok=True)
    # -c: mount(8) must not resolve the source: by its name it is now inside the new /tmp.
    subprocess.run(["mount", "-c", "--bind", f"/proc/self/fd/{fd}", path], check=True, pass_fds=[fd])
os.makedirs(sys.argv[1])
print("ready", flush=True)
# PID 1 of the namespace: reap whatever is orphaned to us, without ever waking up otherwise.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
while True:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass
    signal.sigwaitinfo({signal.SIGCHLD})
"""


def _kept_dirs() -> list[str]:
    dirs = {os.path.realpath(p) for p in (ROOT, sys.prefix, sys.base_prefix)}
    return sorted(d for d in dirs if d.startswith(("/tmp/", "/run/")))


class Sandbox:
    """Private network, PID and mount namespaces held by a reaper, entered with nsenter for each command."""

    def __init__(self):
        for tool in ("unshare", "nsenter", "mount", "bash"):
            if not shutil.which(tool):
                _unavailable(f"{tool} is not installed")
        self.user = os.geteuid() != 0
        argv = ["unshare", "--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc"]
        if self.user:
            argv.insert(1, "--map-root-user")
        self.proc = subprocess.Popen([*argv, sys.executable, "-c", HOLDER, WORKDIR, *_kept_dirs()],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready = self.proc.stdout.readline()
        if ready != "ready\n":
            error = self.proc.stderr.read()
            self.proc.wait()
            _unavailable(f"cannot create namespaces: {error.strip()}")
        try:
            self.holder = wait_for(lambda: children(self.proc.pid)[:1], 10, what="the sandbox's reaper")[0]
            self.pidns = os.readlink(f"/proc/{self.holder}/ns/pid")
            self.root = Path(f"/proc/{self.holder}/root{WORKDIR}")
            for name in COPIED:
                shutil.copytree(ROOT / name, self.root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        except BaseException:
            self.close()
            raise
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("LISTEN_", "WATCHDOG_", "PYTEST_")) and k != "NOTIFY_SOCKET"}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        self.env = env

    def popen(self, script: str) -> subprocess.Popen:
        """bash -c SCRIPT inside, in the example directory; stdout and stderr together on one pipe."""
        enter = ["nsenter", f"--target={self.holder}", "--net", "--mount", "--pid"]
        if self.user:
            enter += ["--user", "--preserve-credentials"]
        return subprocess.Popen([*enter, "--", "bash", "-c", f"cd {WORKDIR} || exit 1\n{script}"], env=self.env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def processes(self) -> dict[int, tuple[int, str]]:
        """host pid -> (parent's host pid, command line) of every process inside but the reaper."""
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self.holder:
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") != self.pidns:
                    continue
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
            found[int(entry)] = (ppid, cmdline)
        return found

    def close(self) -> None:
        """SIGKILL to unshare: --kill-child takes the reaper, and with it everything in the namespace."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def _unavailable(message: str):
    if IN_CI:
        pytest.fail(f"the docs sandbox needs namespaces: {message}")
    pytest.skip(f"the docs sandbox needs namespaces: {message}")


class Output(threading.Thread):
    """Collects what a process writes to its pipe, line by line, until end of file."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.start()

    def run(self) -> None:
        for line in self.stream:
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()

    @property
    def text(self) -> str:
        with self.cond:
            return "".join(self.lines)


class Server:
    """A `server` block: one command running in the background, as in a terminal of its own."""

    def __init__(self, sandbox: Sandbox, block: Block):
        self.block = block
        self.proc = sandbox.popen("exec " + _commands(block.text)[0])
        self.out = Output(self.proc.stdout)
        deadline = time.monotonic() + LISTEN_TIMEOUT
        with self.out.cond:
            while not any("listening on" in line.lower() for line in self.out.lines):
                left = deadline - time.monotonic()
                if left <= 0 or not self.out.is_alive():
                    raise AssertionError(f"{block.where}: no 'listening on' within {LISTEN_TIMEOUT:g}s "
                                         f"(exit status {self.proc.poll()}):\n{''.join(self.out.lines)}")
                self.out.cond.wait(min(left, 0.1))
        # nsenter forks: the command itself (bash exec'd it) is its child, in the namespace.
        self.pid = wait_for(lambda: children(self.proc.pid)[:1], 10, what="the server process")[0]

    def stop(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.block.where}: the server exited on its own with status "
                                 f"{self.proc.returncode}:\n{self.out.text}")
        os.kill(self.pid, signal.SIGINT)
        try:
            code = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.block.where}: still running {STOP_TIMEOUT:g}s after Ctrl-C (SIGINT):\n"
                                 + self.out.text) from None
        self.out.join(5)
        assert code == 0, f"{self.block.where}: exit status {code} after Ctrl-C (SIGINT):\n{self.out.text}"


class Walk:
    """Runs one document's blocks in order in one sandbox."""

    def __init__(self, sandbox: Sandbox):
        self.sandbox = sandbox
        self.servers: list[Server] = []
        self.last_output: str | None = None

    def heading(self, heading: Heading) -> None:
        """A heading ends the servers started under a heading of the same or a deeper level."""
        ending = [s for s in self.servers if s.block.level >= heading.level]
        if ending:
            self.stop(ending)

    def stop(self, servers: list[Server]) -> None:
        for server in reversed(servers):
            self.servers.remove(server)
            server.stop()
        self.check_nothing_left(f"after stopping the server(s) of {', '.join(s.block.where for s in servers)}")

    def check_nothing_left(self, when: str) -> None:
        """Only the running servers and their descendants may be left, once what exits has exited."""
        def strays():
            procs = self.sandbox.processes()
            allowed = {s.pid for s in self.servers}
            changed = True
            while changed:
                more = {pid for pid, (ppid, _) in procs.items() if ppid in allowed} - allowed
                allowed |= more
                changed = bool(more)
            return {pid: cmd for pid, (_, cmd) in procs.items() if pid not in allowed}

        deadline = time.monotonic() + 10
        while (left := strays()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not left, f"{when}: processes left running: " + "; ".join(f"{p}: {c}" for p, c in left.items())

    def block(self, block: Block) -> None:
        if "output" in block.marks:
            assert self.last_output is not None
            assert output_matches(block.text, self.last_output), (
                f"{block.where}: the output differs from what the docs show.\nshown:\n{block.text}\n"
                f"printed:\n{self.last_output}")
            return
        self.last_output = None
        if "file" in block.attrs:
            self.write(block.attrs["file"], block.text)
        elif "server" in block.marks:
            self.servers.append(Server(self.sandbox, block))
        elif "run" in block.marks and block.lang in SHELLS:
            self.last_output = self.run(block, "set -eo pipefail\n" + block.text)
        elif "run" in block.marks:
            name = f".example-{block.line}.py"
            self.write(name, block.text)
            self.last_output = self.run(block, f"exec python {name}")
        elif block.lang == "toml" and not block.marks:
            name = f".check-{block.line}.toml"
            self.write(name, block.text)
            self.run(block, f"activator check {name} && rm {name}")
        else:
            return
        self.check_nothing_left(f"{block.where}: after the block")

    def write(self, name: str, text: str) -> None:
        path = self.sandbox.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if text.startswith("#!"):
            path.chmod(0o755)

    def run(self, block: Block, script: str) -> str:
        timeout = float(block.attrs.get("timeout", RUN_TIMEOUT))
        proc = self.sandbox.popen(script)
        out = Output(proc.stdout)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{block.where}: still running after {timeout:g}s:\n{out.text}") from None
        # A process left in the background may hold the pipe open: check_nothing_left names it.
        out.join(2)
        assert code == 0, f"{block.where}: exit status {code}:\n{out.text}"
        return out.text


def _doc_id(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_blocks_are_marked(doc):
    assert problems(parse(doc)) == []


@pytest.mark.timeout(900)
@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_examples_work_as_written(doc):
    events = parse(doc)
    assert problems(events) == []
    if not any(isinstance(e, Block) and e.runnable for e in events):
        return
    assert (BIN / "activator").exists(), f"activator is not installed next to {sys.executable} (pip install -e .)"
    code = "".join(e.text for e in events if isinstance(e, Block) and e.marks & {"run", "server"})
    named = [t for t in TOOLS if re.search(rf"(?<![\w-]){re.escape(t)}(?![\w-])", code)]
    require(*named, *(BENCH_TOOLS if "-m bench" in code else ()))
    sandbox = Sandbox()
    walk = Walk(sandbox)
    try:
        for event in events:
            if isinstance(event, Heading):
                walk.heading(event)
            else:
                walk.block(event)
        if walk.servers:
            walk.stop(list(walk.servers))
    finally:
        sandbox.close()


# ------------------------------------------------------------------ links
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)


def _prose(doc: Path) -> str:
    """The document without its fenced blocks and inline code, where links are not links."""
    text = doc.read_text()
    text = re.sub(r"^(\s*)(`{3,}|~{3,}).*?^\s*\2\s*$", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def slugs(doc: Path) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file (a repeated one gets -1, -2, ...)."""
    counts: dict[str, int] = {}
    found = set()
    for event in parse(doc):
        if isinstance(event, Heading):
            base = re.sub(r"[^\w\- ]", "", event.text.lower()).replace(" ", "-")
            n = counts.get(base, 0)
            counts[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_relative_links_resolve(doc):
    broken = []
    for m in LINK.finditer(_prose(doc)):
        target = m.group(1) or m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        rel = os.path.relpath(dest, ROOT)
        if not dest.exists():
            if rel not in PENDING_PAGES:
                broken.append(f"{target}: no such file {rel}")
            continue
        if anchor and dest.suffix == ".md" and anchor not in slugs(dest):
            broken.append(f"{target}: no heading #{anchor} in {rel}")
    assert broken == []


# ------------------------------------------------------------------ tables that follow the code
def _first_column(doc: Path, header: str) -> list[str]:
    """The first cells of the rows of every table in ``doc`` whose first header cell is ``header``."""
    cells_found: list[str] = []
    inside = False
    for line in doc.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else []
        if not inside:
            inside = bool(cells) and cells[0] == header
        elif not cells:
            inside = False
        elif not set(cells[0]) <= set("-: "):
            cells_found.append(cells[0])
    return cells_found


def _option_table(doc: Path) -> set[str]:
    """The long options named in the tables headed `| option |` in ``doc`` (one table, or several by topic)."""
    return {name for cell in _first_column(doc, "option") for name in re.findall(r"--[a-z][a-z0-9-]*", cell)}


@pytest.mark.parametrize("command, doc", [("run", "docs/run.md"), ("serve", "docs/units.md")])
def test_option_tables_match_the_command_line(command, doc):
    import click

    from activator.cli import main

    params = main.commands[command].params
    actual = {o for p in params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)
              if o.startswith("--")} | {"--help"}
    documented = _option_table(ROOT / doc)
    assert documented, f"no `| option |` table in {doc}"
    assert {"documented, not accepted": sorted(documented - actual),
            "accepted, not documented": sorted(actual - documented)} == {
        "documented, not accepted": [], "accepted, not documented": []}


# A log call with its event name written out: log.info("start", ...), self.log.warning(\n "kill", ...).
LOG_CALL = re.compile(r"\blog\.(?:debug|info|warning|error)\(\s*\"([a-z][a-z-]*)\"")


def test_every_logged_event_is_in_the_events_table():
    logged = {name for source in (ROOT / "activator").glob("*.py") for name in LOG_CALL.findall(source.read_text())}
    documented = {name for cell in _first_column(ROOT / "docs/containers.md", "event")
                  for name in re.findall(r"`([a-z][a-z-]*)`", cell)}
    assert len(logged) > 20, "the pattern no longer finds the log calls"
    assert sorted(logged - documented) == [], "events logged but missing from the table in docs/containers.md#logs"
