#!/usr/bin/env python3
"""Run calls of a ``systemd.daemon`` implementation and report what happened (for parity tests).

Usage: daemon_cases.py IMPL [--mounts] < CASES_JSON > RESULTS_JSON
  IMPL: systemd (python-systemd's systemd.daemon) or activator (activator.daemon)
  --mounts: we run as root in private mount and IPC namespaces (unshare): mount an
            empty tmpfs on /run and on /dev with a fresh mqueue at /dev/mqueue, so that
            booted() and is_mq(path=) see states the cases set up.

Each case is {"f": NAME, "args": [...], "kwargs": {...}} with optional "env" (variables to
set first, null to remove), "defaulttimeout" (socket.setdefaulttimeout() during the call;
the result then says which of our sockets are non-blocking after it) and "booted" (what
/run/systemd/system is: "absent", "dir", "file", "link" to a directory, "dangling" link;
--mounts only). Arguments are plain JSON
values or one-key objects resolved here, so that both implementations get the same thing:
  {"fd": NAME}       a descriptor made below (sockets of every family and type, pipe, fifo,
                     file, directory, /dev/null, memfd, eventfd, message queue, a closed number)
  {"obj": NAME}      a file or socket object, or an object with a strange fileno()
  {"path": NAME}     a path in our directory ("" stays ""), {"bytespath": NAME} the same as
                     bytes, {"pathlike": NAME} as a pathlib.Path
  {"fmt": TEXT}      TEXT with {dir}, {pid}, {tcp4}, {udp4}, {tcp6}, {udp6} (bound ports),
                     {mq}, {mq2} (queue names) filled in
  {"value": NAME}    the same as a number: pid, tcp4, udp4, tcp6, udp6
  {"repeat": [ARG, N]}  a list of N times ARG; {"bytes": TEXT} TEXT in latin-1;
  {"dict": [[K, V], ...]}, {"set": [...]}, {"tuple": [...]} those containers
A case whose fixture does not exist on this kernel gives {"missing": NAME}.
Prints a JSON list, one object per case: "result" (repr of the return value) or "exc"
(exception type name, with errno, strerror and filename for OSError); for notify also
the datagrams our two receivers got (text, sender pid as "self"/"1"/"other", the
descriptors received as fixture names) and NOTIFY_SOCKET as libc's getenv() sees it.
Paths, our pid and ports are replaced by their placeholders in the output.
"""
import array
import ctypes
import hashlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile

IMPL = sys.argv[1]
MOUNTS = "--mounts" in sys.argv[2:]
if IMPL == "systemd":
    from systemd import daemon
else:
    from activator import daemon

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.getenv.restype = ctypes.c_char_p
LIBC.mq_open.restype = ctypes.c_int
LIBC.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
LIBC.mq_unlink.argtypes = [ctypes.c_char_p]
CLOSED_FD = 1000  # below the usual 1024 limit, never opened here
RECEIVE_MAX = 16 * 1024 * 1024 + 1
SCM_MAX_FD = 253


class Fixtures:
    def __init__(self, directory):
        self.dir = directory
        self.fds = {}
        self.objs = {}
        self.keep = []  # socket objects whose descriptors are in self.fds
        self.queues = []
        self.values = {"dir": directory, "pid": str(os.getpid())}

    # -------------------------------------------------------------- sockets
    def sock(self, name, family, kind, bind=None, listen=False, proto=0):
        try:
            s = socket.socket(family, kind, proto)
        except OSError:
            return None  # not on this kernel: both implementations see the same set
        if bind is not None:
            s.bind(bind)
        if listen:
            s.listen()
        self.keep.append(s)
        self.fds[name] = s.fileno()
        return s

    def make_sockets(self):
        d = self.dir
        af_unix, stream, dgram, seq = socket.AF_UNIX, socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET
        self.sock("unix-stream-listen", af_unix, stream, f"{d}/stream.sock", listen=True)
        self.sock("unix-stream-bound", af_unix, stream, f"{d}/bound.sock")
        self.sock("unix-stream-unbound", af_unix, stream)
        self.sock("unix-dgram-path", af_unix, dgram, f"{d}/dgram.sock")
        self.sock("unix-dgram-abstract", af_unix, dgram, f"\0activator-cases-{os.getpid()}")
        self.sock("unix-seqpacket-listen", af_unix, seq, f"{d}/seq.sock", listen=True)
        self.sock("unix-abstract-listen", af_unix, stream, f"\0activator-cases-listen-{os.getpid()}", listen=True)
        os.chdir(d)
        self.sock("unix-relative", af_unix, stream, "rel.sock", listen=True)  # getsockname() says "rel.sock"
        a, b = socket.socketpair()
        self.keep += [a, b]
        self.fds["unix-pair"] = a.fileno()
        listener = self.sock("tcp4-listen", socket.AF_INET, stream, ("127.0.0.1", 0), listen=True)
        self.values["tcp4"] = listener.getsockname()[1]
        client = self.sock("tcp4-connected", socket.AF_INET, stream)
        client.connect(listener.getsockname())
        accepted, _ = listener.accept()
        self.keep.append(accepted)
        self.fds["tcp4-accepted"] = accepted.fileno()
        self.sock("tcp4-unbound", socket.AF_INET, stream)
        self.values["udp4"] = self.sock("udp4", socket.AF_INET, dgram, ("127.0.0.1", 0)).getsockname()[1]
        listener6 = self.sock("tcp6-listen", socket.AF_INET6, stream, ("::1", 0), listen=True)
        self.values["tcp6"] = listener6.getsockname()[1]
        self.values["udp6"] = self.sock("udp6", socket.AF_INET6, dgram, ("::1", 0)).getsockname()[1]
        self.sock("tcp6-unbound", socket.AF_INET6, stream)
        mapped = self.sock("tcp6-v4mapped", socket.AF_INET6, stream)
        mapped.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        mapped.bind(("::ffff:127.0.0.1", 0))
        self.values["mapped"] = mapped.getsockname()[1]
        self.sock("netlink", socket.AF_NETLINK, socket.SOCK_RAW, proto=0)
        self.sock("packet", socket.AF_PACKET, socket.SOCK_RAW, proto=0)  # protocol 0: receives nothing
        self.sock("vsock", socket.AF_VSOCK, stream)
        self.sock("alg", socket.AF_ALG, seq)  # getsockname() fails with EOPNOTSUPP
        # IPPROTO_RAW: send-only, so they receive nothing; their "port" is the protocol number
        self.sock("raw4", socket.AF_INET, socket.SOCK_RAW, proto=socket.IPPROTO_RAW)
        self.sock("raw6", socket.AF_INET6, socket.SOCK_RAW, proto=socket.IPPROTO_RAW)

    # ---------------------------------------------------------- the others
    def make_files(self):
        d = self.dir
        r, w = os.pipe()
        self.fds.update({"pipe-r": r, "pipe-w": w})
        for name in ("fifo", "fifo2"):
            os.mkfifo(f"{d}/{name}")
        self.fds["fifo"] = os.open(f"{d}/fifo", os.O_RDWR | os.O_NONBLOCK)
        with open(f"{d}/file", "w") as f:
            f.write("data\n")
        self.fds["file"] = os.open(f"{d}/file", os.O_RDONLY)
        self.fds["dir"] = os.open(d, os.O_RDONLY)
        self.fds["devnull"] = os.open("/dev/null", os.O_RDWR)
        self.fds["memfd"] = os.memfd_create("activator-cases")
        self.fds["eventfd"] = os.eventfd(0)
        os.symlink("loop", f"{d}/loop")
        os.symlink("fifo", f"{d}/fifo-link")
        for name in ("mq", "mq2"):
            queue = f"/activator-cases-{name}-{os.getpid()}"
            fd = LIBC.mq_open(queue.encode(), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600, None)
            if fd < 0:
                raise OSError(ctypes.get_errno(), f"mq_open {queue}")
            self.queues.append(queue)
            self.values[name] = queue
            if name == "mq":
                self.fds[name] = fd
        try:
            os.fstat(CLOSED_FD)
            raise AssertionError(f"fd {CLOSED_FD} is open")
        except OSError:
            self.fds["closed"] = CLOSED_FD

    def make_objects(self):
        d = self.dir
        sockobj = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sockobj.bind(f"{d}/obj.sock")
        sockobj.listen()
        self.keep.append(sockobj)
        closed_sock = socket.socket()
        closed_sock.close()
        fileobj = open(f"{d}/file")
        closed_file = open(f"{d}/file")
        closed_file.close()
        listen_fd = self.fds["tcp4-listen"]

        class StrFileno:
            def fileno(self):
                return "3"

        class BrokenFileno:
            def fileno(self):
                raise AttributeError("inside fileno()")

        class Index:
            def __index__(self):
                return listen_fd

        self.objs.update({
            "sockobj": sockobj, "closed-sockobj": closed_sock, "fileobj": fileobj, "closed-fileobj": closed_file,
            "str-fileno": StrFileno(), "broken-fileno": BrokenFileno(), "index": Index(),
        })

    def make_receivers(self):
        """Two datagram sockets notify() cases send to: a path and an abstract name."""
        self.receivers = {}
        for name, address in (("notify-path", f"{self.dir}/notify"),
                              ("notify-abstract", f"\0activator-cases-notify-{os.getpid()}")):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            s.bind(address)
            s.setblocking(False)
            self.receivers[name] = s
        self.values["notify_abstract"] = f"@activator-cases-notify-{os.getpid()}"

    def close(self):
        for queue in self.queues:
            LIBC.mq_unlink(queue.encode())

    # ------------------------------------------------------------ arguments
    def path(self, name):
        return name if name == "" or name.startswith("/") else os.path.join(self.dir, name)

    def resolve(self, arg):
        if isinstance(arg, list):
            return [self.resolve(a) for a in arg]
        if not isinstance(arg, dict):
            return arg
        (kind, value), = arg.items()
        if kind == "fd":
            return self.fds[value]
        if kind == "obj":
            return self.objs[value]
        if kind == "path":
            return self.path(value)
        if kind == "bytespath":
            return os.fsencode(self.path(value))
        if kind == "pathlike":
            return pathlib.Path(self.path(value))
        if kind == "fmt":
            return value.format_map(self.values)
        if kind == "value":
            return int(self.values[value])
        if kind == "repeat":
            return [self.resolve(value[0])] * value[1]
        if kind == "bytes":
            return value.encode("latin-1")
        if kind == "dict":
            return {self.resolve(k): self.resolve(v) for k, v in value}
        if kind == "set":
            return set(self.resolve(value))
        if kind == "tuple":
            return tuple(self.resolve(value))
        raise ValueError(f"unknown argument kind {kind!r}")

    def normalize(self, text):
        if text is None:
            return None
        text = str(text).replace(self.dir, "{dir}").replace(str(os.getpid()), "{pid}")
        for name in ("mq", "mq2"):
            text = text.replace(self.values[name], "{%s}" % name)
        return text

    def fixture_of(self, fd):
        """The name of the fixture a received descriptor is a copy of."""
        st = os.fstat(fd)
        for name, mine in self.fds.items():
            try:
                other = os.fstat(mine)
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                return name
        return "?"


# ------------------------------------------------------------------ cases
def set_booted(state):
    path = "/run/systemd/system"
    shutil.rmtree("/run/systemd", ignore_errors=True)
    os.makedirs("/run/systemd/target", exist_ok=True)
    if state == "dir":
        os.mkdir(path)
    elif state == "file":
        open(path, "w").close()
    elif state == "link":
        os.symlink("target", path)
    elif state == "dangling":
        os.symlink("nowhere", path)


def received(fx):
    out = []
    for name, s in fx.receivers.items():
        while True:
            try:
                data, anc, flags, _ = s.recvmsg(RECEIVE_MAX, socket.CMSG_SPACE(12) + socket.CMSG_SPACE(4 * SCM_MAX_FD))
            except BlockingIOError:
                break
            msg = {"to": name, "flags": flags, "pid": None, "fds": []}
            if len(data) > 4096:
                msg["data"] = f"{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}"
            else:
                msg["data"] = data.decode("utf-8", "backslashreplace")
            for level, kind, payload in anc:
                if kind == socket.SCM_CREDENTIALS:
                    pid = int.from_bytes(payload[:4], sys.byteorder)
                    msg["pid"] = "self" if pid == os.getpid() else "1" if pid == 1 else "other"
                    msg["uid"] = int.from_bytes(payload[4:8], sys.byteorder)
                elif kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    for fd in fds:
                        msg["fds"].append(fx.fixture_of(fd))
                        os.close(fd)
            out.append(msg)
    return out


def is_nonblocking(fd):
    try:
        return not os.get_blocking(fd)
    except OSError:
        return None


def run_case(fx, case):
    for key, value in case.get("env", {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = fx.resolve(value)
    if "booted" in case:
        set_booted(case["booted"])
    function = getattr(daemon, case["f"])
    try:
        args = [fx.resolve(a) for a in case.get("args", [])]
        kwargs = {k: fx.resolve(v) for k, v in case.get("kwargs", {}).items()}
    except KeyError as exc:
        return {"missing": exc.args[0]}
    out = {}
    if "defaulttimeout" in case:
        socket.setdefaulttimeout(case["defaulttimeout"])
    try:
        out["result"] = repr(function(*args, **kwargs))
    except OSError as exc:
        out["exc"] = type(exc).__name__
        out["errno"] = exc.errno
        out["strerror"] = exc.strerror
        out["filename"] = fx.normalize(exc.filename)
    except Exception as exc:  # noqa: BLE001 - the type is what we compare
        out["exc"] = type(exc).__name__
    finally:
        socket.setdefaulttimeout(None)
    if "defaulttimeout" in case:
        out["nonblocking"] = sorted(name for name, fd in fx.fds.items() if is_nonblocking(fd))
    if case["f"] == "notify":
        out["received"] = received(fx)
        value = LIBC.getenv(b"NOTIFY_SOCKET")
        out["NOTIFY_SOCKET"] = fx.normalize(None if value is None else os.fsdecode(value))
    return out


def private_mounts():
    """(--mounts) empty /run and /dev with an mqueue: only this process's namespace sees them."""
    for where in ("/run", "/dev"):
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", where], check=True)
    os.mkdir("/dev/mqueue")
    subprocess.run(["mount", "-t", "mqueue", "mqueue", "/dev/mqueue"], check=True)


def main():
    cases = json.load(sys.stdin)
    directory = tempfile.mkdtemp(prefix="activator-cases-")
    fx = Fixtures(directory)
    try:
        fx.make_sockets()
        fx.make_files()  # opens /dev/null before --mounts hides it
        if MOUNTS:
            private_mounts()
        fx.make_objects()
        fx.make_receivers()
        results = [run_case(fx, case) for case in cases]
    finally:
        fx.close()
        os.chdir("/")
        shutil.rmtree(directory, ignore_errors=True)
    json.dump({"fixtures": sorted(fx.fds) + sorted(fx.objs), "results": results}, sys.stdout, sort_keys=True)


if __name__ == "__main__":
    main()
