"""Watch mode: restart a unit's daemon when a file under its ``watch-paths`` changes (``run --watch``).

inotify is used directly, through ctypes on libc (``inotify_init1``, ``inotify_add_watch``,
``inotify_rm_watch``; the events are read with ``os.read``), rather than through a library
such as watchfiles: the engine is one thread around one selector, and what it needs is a
descriptor that becomes readable when something changed, which an inotify instance is. The
loop watches it like any socket; nothing polls, and while nothing changes nothing wakes up.
watchfiles would add a Rust extension to install and a thread of its own to hand events over
from. The price is Linux only, which activator is anyway.

One inotify instance per unit that has watch-paths. A PATH that is a directory is watched
with every directory under it (those that the ignore patterns leave out are not entered),
and directories created or moved in later are added as they come. A PATH that is a file is
watched through its directory, by name, so that an editor that saves by writing a new file
and renaming it over the old one is seen. Events that count as a change: a file written and
closed, created, deleted, moved in or out, or an overflow of the kernel's queue (something
changed, we do not know what). Ignored names (``*.pyc``, ``.git/``, editors' swap files)
never count.

A change starts the debounce: the restart comes once the files have been quiet for
``watch-debounce-sec`` (at most ten times that after the first change, so that a file written
continuously still restarts the daemon). Only then is a timer armed; it is the only one.

Out of inotify watches (``fs.inotify.max_user_watches``): one warning, and what is watched
stays watched. Each wake-up reads a bounded number of events, so that a flood of changes
cannot keep the loop from the sockets: what is left is read at the next turn.
"""
from __future__ import annotations

import errno
import os
import struct
from fnmatch import fnmatchcase

from .loop import TimerHandle, cancel
from .records import dataclass

TYPE_CHECKING = False  # typing is not imported at run time (start-up, memory); type checkers see it
if TYPE_CHECKING:
    from typing import Any

if TYPE_CHECKING:
    from .supervisor import Engine, UnitState

# <sys/inotify.h>
IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_UNMOUNT = 0x2000
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

# What a directory is watched for: files written and closed (not each write: a daemon restarted
# half-way through a save would read half a file), and entries created, deleted, or moved.
MASK = (IN_CLOSE_WRITE | IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF
        | IN_ONLYDIR | IN_EXCL_UNLINK)
CHANGES = IN_CLOSE_WRITE | IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name, NUL-padded)
READ_SIZE = 65536  # bytes per read(): room for hundreds of events (one is 16 bytes plus its name)
READS_PER_WAKEUP = 4  # then back to the loop: the rest is read at its next turn
DEBOUNCE_CAP = 10  # the restart comes at most this many debounce periods after the first change

# Never a change: compiled files, version control, editors' swap, backup and lock files (vim's
# 4913 is the file it creates to test that a directory is writable). watch-ignore adds to these.
DEFAULT_IGNORE = ("*.pyc", "*.pyo", "__pycache__/", ".git/", ".hg/", ".svn/", ".mypy_cache/", ".pytest_cache/",
                  ".ruff_cache/", "*.swp", "*.swx", "*~", ".#*", "#*#", "4913")


class _Libc:
    """The three inotify calls, looked up once, the first time a unit watches something."""

    def __init__(self) -> None:
        import ctypes  # only once a unit watches: ctypes costs every other start-up a megabyte and milliseconds

        self.get_errno = ctypes.get_errno
        libc = ctypes.CDLL(None, use_errno=True)
        self.init1 = libc.inotify_init1
        self.init1.argtypes, self.init1.restype = [ctypes.c_int], ctypes.c_int
        self.add_watch = libc.inotify_add_watch
        self.add_watch.argtypes, self.add_watch.restype = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32], ctypes.c_int
        self.rm_watch = libc.inotify_rm_watch
        self.rm_watch.argtypes, self.rm_watch.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int


_libc: _Libc | None = None


def _lib() -> _Libc:
    global _libc
    if _libc is None:
        _libc = _Libc()
    return _libc


def _check(result: int, what: str) -> int:
    if result < 0:
        code = _lib().get_errno()
        raise OSError(code, os.strerror(code), what)
    return result


class Inotify:
    """One inotify instance: a non-blocking, close-on-exec descriptor."""

    def __init__(self) -> None:
        self.fd = _check(_lib().init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1")

    def fileno(self) -> int:
        return self.fd

    def add(self, path: str, mask: int = MASK) -> int:
        """The watch descriptor of ``path`` (the same one again for a directory already watched)."""
        return _check(_lib().add_watch(self.fd, os.fsencode(path), mask), path)

    def remove(self, wd: int) -> None:
        _lib().rm_watch(self.fd, wd)  # EINVAL: already gone (IN_IGNORED is on its way)

    def read(self) -> list[tuple[int, int, str]]:
        """The events waiting, as (wd, mask, name); [] when there is none."""
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return []
        events = []
        offset = 0
        while offset + EVENT.size <= len(data):
            wd, mask, _cookie, size = EVENT.unpack_from(data, offset)
            offset += EVENT.size
            name = os.fsdecode(data[offset:offset + size].rstrip(b"\0"))
            offset += size
            events.append((wd, mask, name))
        return events

    def close(self) -> None:
        if self.fd != -1:
            os.close(self.fd)
            self.fd = -1


# ------------------------------------------------------------------ ignore patterns
@dataclass(frozen=True)
class Pattern:
    """One ignore pattern, gitignore-like: ``NAME`` (a glob) matches an entry of that name at any depth,
    ``DIR/`` only a directory (and so all under it), and a pattern with a ``/`` inside matches the path
    relative to the watched PATH, one component per component (a leading ``/`` only anchors it there)."""

    globs: tuple[str, ...]  # one per component; a single one unless anchored
    dir_only: bool
    anchored: bool

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        dir_only = text.endswith("/")
        glob = text.rstrip("/")
        anchored = "/" in glob
        return cls(tuple(g for g in glob.split("/") if g), dir_only, anchored)

    def matches(self, parts: tuple[str, ...]) -> bool:
        """Whether the entry at ``parts`` (its last component) is what this pattern names."""
        if not self.anchored:
            return fnmatchcase(parts[-1], self.globs[0])
        return len(parts) == len(self.globs) and all(map(fnmatchcase, parts, self.globs))


def compile_patterns(texts: list[str] | tuple[str, ...]) -> tuple[Pattern, ...]:
    return tuple(Pattern.parse(t) for t in (*DEFAULT_IGNORE, *texts))


def ignored(patterns: tuple[Pattern, ...], parts: tuple[str, ...], is_dir: bool) -> bool:
    """Whether the entry at ``parts`` (relative to the watched PATH) or a directory above it is ignored."""
    for i in range(len(parts)):
        entry_is_dir = is_dir or i < len(parts) - 1
        for p in patterns:
            if p.dir_only and not entry_is_dir:
                continue
            if p.matches(parts[:i + 1]):
                return True
    return False


# ------------------------------------------------------------------ one unit's watches
@dataclass
class _View:
    """How one watched directory is seen from one PATH: its place under it, or the one file it is watched for."""

    parts: tuple[str, ...]  # the directory relative to the PATH
    only: str | None  # a PATH that is a file: the directory is watched for this name alone
    root: str  # the PATH


class UnitWatch:
    """The watches of one unit: its inotify instance, the directories watched, the pending change."""

    def __init__(self, watcher: "Watcher", us: "UnitState") -> None:
        svc = us.unit.service
        self.watcher = watcher
        self.us = us
        self.key = watch_key(us)
        self.patterns = compile_patterns(svc.watch_ignore)
        self.debounce = svc.watch_debounce_sec
        self.dirs: dict[int, tuple[str, list[_View]]] = {}  # wd -> (directory, views)
        self.inotify: Inotify | None = None
        self.full = False  # out of watches: warned once
        self.first: float | None = None  # when the pending change began
        self.first_path = ""
        self.changes = 0
        self.fresh = False  # changes counted since the timer was last armed
        self.timer: TimerHandle | None = None

    @property
    def log(self):
        return self.watcher.engine.log

    def open(self) -> None:
        try:
            self.inotify = Inotify()
        except OSError as exc:  # EMFILE: fs.inotify.max_user_instances, or out of descriptors
            self.log.warning("watch", f"cannot watch files: inotify_init1: {exc.strerror}", unit=self.us.name)
            return
        self.scan()
        loop = self.watcher.engine.loop
        loop.add_reader(self.inotify, self.on_readable, self.us)

    def scan(self) -> None:
        """Watch every PATH: a directory and every directory under it, or a file through its directory.
        Also after an overflow: directories created meanwhile are added (the ones known are kept)."""
        for root in self.us.unit.service.watch_paths:
            if os.path.isdir(root):
                self.add_tree(root, root, ())
            elif os.path.lexists(root):
                parent, name = os.path.split(root)
                self.add_dir(parent or ".", _View((), name, root))
            else:
                self.log.warning("watch", f"{root} does not exist: not watched", unit=self.us.name)

    def add_dir(self, path: str, view: _View) -> bool:
        """Watch one directory; False when it cannot be (gone, not a directory, out of watches)."""
        assert self.inotify is not None
        if self.full:
            return False
        try:
            wd = self.inotify.add(path)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self.full = True
                self.log.warning("watch", f"out of inotify watches (fs.inotify.max_user_watches) at {path}: "
                                 f"{len(self.dirs)} directories are watched, the rest is not", unit=self.us.name)
            elif exc.errno not in (errno.ENOENT, errno.ENOTDIR):  # gone already: nothing to watch
                self.log.warning("watch", f"cannot watch {path}: {exc.strerror}", unit=self.us.name)
            return False
        views = self.dirs.setdefault(wd, (path, []))[1]
        if view not in views:
            views.append(view)
        return True

    def add_tree(self, root: str, top: str, parts: tuple[str, ...]) -> bool:
        """Watch ``top`` (at ``parts`` under ``root``) and the directories under it; True when a file
        that counts was found in them (created before its directory was watched: a change)."""
        found = False
        for dirpath, dirnames, filenames in os.walk(top):
            rel = parts + tuple(p for p in os.path.relpath(dirpath, top).split(os.sep) if p != ".")
            if not self.add_dir(dirpath, _View(rel, None, root)):
                dirnames[:] = []
                if self.full:
                    break
                continue
            dirnames[:] = [d for d in dirnames if not ignored(self.patterns, rel + (d,), True)]
            found = found or any(not ignored(self.patterns, rel + (f,), False) for f in filenames)
        return found

    # ------------------------------------------------------------ events
    def on_readable(self) -> None:
        assert self.inotify is not None
        for _ in range(READS_PER_WAKEUP):
            events = self.inotify.read()
            if not events:
                break
            for wd, mask, name in events:
                self.event(wd, mask, name)
        self.arm()

    def event(self, wd: int, mask: int, name: str) -> None:
        if mask & IN_Q_OVERFLOW:
            self.changed(self.us.unit.service.watch_paths[0], 1)
            self.scan()
            return
        entry = self.dirs.get(wd)
        if entry is None:
            return
        path, views = entry
        if mask & IN_IGNORED:  # the directory is gone (or no longer ours to watch)
            del self.dirs[wd]
            return
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
            if any(v.parts == () and v.only is None for v in views):
                self.log.warning("watch", f"{path} was removed or moved: no longer watched", unit=self.us.name)
                self.forget(path)  # moved, the kernel would go on watching it where it is now
                self.changed(path, 1)
            return
        if not mask & CHANGES:
            return
        is_dir = bool(mask & IN_ISDIR)
        if is_dir and mask & IN_MOVED_FROM:
            self.forget(os.path.join(path, name))  # moved away: watched again if it is moved back in
        counts = False
        for view in views:
            if view.only is not None and name != view.only:
                continue
            if ignored(self.patterns, view.parts + (name,), is_dir):
                continue
            if is_dir and mask & (IN_CREATE | IN_MOVED_TO) and view.only is None:
                # A new directory: watched from now on. Files already in it count, an empty one does not.
                found = self.add_tree(view.root, os.path.join(path, name), view.parts + (name,))
                counts = counts or found or bool(mask & IN_MOVED_TO)
            else:
                counts = True
        if counts:
            self.changed(os.path.join(path, name), 1)

    def forget(self, top: str) -> None:
        """Stop watching ``top`` and the directories under it (the kernel confirms with IN_IGNORED)."""
        assert self.inotify is not None
        prefix = top.rstrip("/") + "/"
        for wd, (path, _) in list(self.dirs.items()):
            if path == top or path.startswith(prefix):
                self.inotify.remove(wd)
                del self.dirs[wd]

    def changed(self, path: str, n: int) -> None:
        """A change, counted; :meth:`arm` (once per wake-up, not per event) starts the debounce again."""
        if self.first is None:
            self.first, self.first_path, self.changes = self.watcher.engine.loop.clock(), path, 0
        self.changes += n
        self.fresh = True

    def arm(self) -> None:
        """After new changes: the restart is due once the files are quiet for the debounce (or at the cap)."""
        if not self.fresh or self.first is None:
            return
        self.fresh = False
        loop = self.watcher.engine.loop
        cancel(self.timer)
        self.timer = loop.call_at(min(loop.clock() + self.debounce, self.first + self.debounce * DEBOUNCE_CAP),
                                  self.settled, self.us)

    def settled(self) -> None:
        self.timer = None
        path, n = self.first_path, self.changes
        self.first, self.first_path, self.changes = None, "", 0
        self.watcher.changed(self.us, path, n)

    def rebind(self, us: "UnitState") -> None:
        """The unit's new state after a reload: faults in its watches are now contained to it."""
        self.us = us
        if self.timer is not None:
            self.timer.owner = us
        if self.inotify is not None:
            loop = self.watcher.engine.loop
            loop.remove(self.inotify)
            loop.add_reader(self.inotify, self.on_readable, us)

    def close(self) -> None:
        cancel(self.timer)
        self.timer = None
        if self.inotify is not None:
            self.watcher.engine.loop.remove(self.inotify)
            self.inotify.close()
            self.inotify = None
        self.dirs.clear()


def watch_key(us: "UnitState") -> tuple[Any, ...]:
    """What a unit's watches are made of: the same key across a reload keeps them (and a pending change)."""
    svc = us.unit.service
    return tuple(svc.watch_paths), tuple(svc.watch_ignore), svc.watch_debounce_sec


# ------------------------------------------------------------------ the engine's part
class Watcher:
    """Every unit's watches. The engine calls :meth:`sync` once its units are set up and after each reload,
    and :meth:`close` when it stops; a settled change comes back through the engine's public API."""

    def __init__(self, engine: "Engine") -> None:
        self.engine = engine
        self.units: dict[str, UnitWatch] = {}

    def sync(self) -> None:
        """Watch what each unit asks for now: unchanged watches are kept, the others made again or closed."""
        if self.engine.stopping:
            return
        current = {name: us for name, us in self.engine.units.items()
                   if us.unit.service.watch_paths and not us.skipped}
        for name in list(self.units):
            uw = self.units[name]
            us = current.get(name)
            if us is not None and watch_key(us) == uw.key and uw.inotify is not None:
                if us is not uw.us:  # a unit changed otherwise keeps its watches: only its state is new
                    uw.rebind(us)
                continue
            uw.close()
            del self.units[name]
        for name, us in current.items():
            if name not in self.units:
                uw = self.units[name] = UnitWatch(self, us)
                uw.open()

    def changed(self, us: "UnitState", path: str, n: int) -> None:
        """A settled change under the unit's watch-paths: restart its daemon if one runs."""
        engine = self.engine
        if engine.stopping or engine.units.get(us.name) is not us:
            return
        what = f"{path} changed ({n} event{'s' if n != 1 else ''})"
        state = us.state
        restart = False
        if us.unit.accept:
            action = "new connections start the new code, running instances are left alone"
        elif state in ("running", "starting"):
            action, restart = "restarting the daemon", True
        elif state == "stopping" and us.restart_pending:
            action = "a restart is under way: the new daemon reads the new files"
        elif state == "listening" and us.unit.start_now:
            action, restart = "starting the daemon (--now)", True
        elif state == "listening":
            action = "not running: the next connection starts the new code"
        else:  # stopping (ctl stop), stopped, paused, waiting for the old generation, failed
            action = f"the unit is {state}: not restarted"
        engine.log.info("watch-change", f"{what}: {action}", unit=us.name, fields={"path": path, "changes": n})
        engine.publish("watch-change", us, path=path, changes=n)
        if not restart:
            return
        pid = us.main_pid
        graceful = self.restart(us)
        if graceful:
            how = f"{graceful}: pid {pid} stops once the new daemon is ready"
        else:
            how = f"pid {pid} stopped, the new daemon starts once it has exited" if pid else "daemon started"
        engine.log.info("watch-restart", f"restart for {path}: {how}", unit=us.name,
                        fields={"path": path, "graceful": bool(graceful)})
        engine.publish("watch-restart", us, path=path, pid=pid, graceful=bool(graceful))

    def restart(self, us: "UnitState") -> str | None:
        """The one place a change restarts a daemon: gracefully when the unit's restart-style says so (what
        the engine answered), else stop first (None). A change during a graceful restart under way ends it
        and restarts stop-first: the new daemon of that restart may have read the files before the change."""
        if us.unit.service.restart_style == "graceful":
            ok, message = self.engine.graceful_restart(us)
            if ok:
                return message
        self.engine.restart_unit(us)
        return None

    def close(self) -> None:
        for uw in self.units.values():
            uw.close()
        self.units.clear()
