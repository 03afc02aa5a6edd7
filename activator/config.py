"""Units from TOML files and systemd unit files: ``activator serve``, ``check`` and ``convert``.

A file holds any number of units. A unit is a top-level table named after it,
with a ``socket`` part (a table, or an array of tables when one service has
several sockets with different options) and a ``service`` part::

    [nbd]
    description = "RAM disk over NBD"
    socket.listen-stream = ["127.0.0.1:10809", "/run/nbd.sock"]
    socket.file-descriptor-name = "nbd"
    service.exec-start = ["nbdkit", "memory", "1G"]
    service.restart = "on-failure"

Keys are systemd's directive names in kebab-case, with systemd's meaning and
defaults; each is declared in activator.settings, which parses and bounds its
value. :func:`load_units` reports every problem it finds at once, one line
each, naming the file, the unit and the key; it never binds anything.
:class:`Loader` also takes documents of the same shape that come from elsewhere:
``activator run`` builds one from its options, and :mod:`activator.unitfile`
translates systemd's ``*.socket`` and ``*.service`` files into one, so that all
of them go through the same checks (a unit file's problems name the file and
the directive, ``FILE: [Socket] Backlog=: ...``).
"""
from __future__ import annotations

import os
from . import socketapi as socket
import stat
import sys

from .records import dataclass, field
from .envfile import read_environment_file
from .settings import BY_KEY, LISTEN_TYPES, Setting, keys_in
from .units import BindSpec, InheritedSpec, ListenSpec, ServiceSpec, UnresolvedInherited, Unit
from .values import Invalid, is_plain_key, is_unit_name, lazy_pattern, show, suggest, type_name

TYPE_CHECKING = False  # typing is not imported at run time (start-up, memory); type checkers see it
if TYPE_CHECKING:
    from typing import Any, Iterator

CONFIG_MAX_BYTES = 16 << 20  # a unit file is small; this bounds what a mistake (a log, a disk image) costs
_PART = lazy_pattern(r"socket(\[[0-9]+\])?|service")  # where a whole part of a unit is at fault
_TOML_POSITION = lazy_pattern(r"\s*\(at line (\d+), column (\d+)\)\s*$")  # in tomllib's messages
PARTS = ("socket", "service")
UNIT_FILE_SUFFIXES = (".socket", ".service")
# What makes a directory one of systemd unit files (or drop-ins of them) rather than of TOML files.
_UNIT_DIR_ENTRIES = (".socket", ".service", ".socket.d", ".service.d")
UNIT_KEYS = (*keys_in("unit"), *PARTS)
SOCKET_KEYS = keys_in("socket")
SERVICE_KEYS = keys_in("service")


@dataclass(frozen=True)
class Problem:
    """One thing wrong: where (the file, the unit, the key) and why."""

    message: str
    origin: str = ""  # the file (or what stands for it, such as "run")
    unit: str | None = None
    where: str | None = None  # "socket[2].backlog", "service.user"
    key: str | None = None  # the setting at fault, if one is

    def __str__(self) -> str:
        parts = [path_label(self.origin)] if self.origin else []
        if self.unit is not None:
            parts.append(unit_label(self.unit))
        if self.where:
            parts.append(self.where)
        return ": ".join([*parts, self.message])


class ConfigError(Exception):
    """The configuration is invalid; ``messages`` has one line per problem, every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        self.messages = [str(p) for p in problems]
        super().__init__("\n".join(self.messages))


def unit_label(name: str) -> str:
    """A unit name as messages show it: quoted unless it is a valid one, so that no name can forge a line."""
    return name if is_unit_name(name) else show(name)


def path_label(path: str) -> str:
    """A path as messages show it: as it is, or quoted when it holds a newline or another control character."""
    return path if path.isprintable() else show(path)


def key_label(key: str) -> str:
    return key if is_plain_key(key) else show(key)


# ------------------------------------------------------------------ reading files
def _read_config(path: str) -> bytes:
    """A regular file of at most CONFIG_MAX_BYTES: a FIFO or a device named by mistake must not hang or flood us."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= CONFIG_MAX_BYTES:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
        raise OSError(0, f"larger than {CONFIG_MAX_BYTES >> 20} MiB")
    finally:
        os.close(fd)


def _toml_error(exc: ValueError, text: str) -> str:
    message = str(exc)
    m = _TOML_POSITION.search(message)
    if m:
        return f"line {m.group(1)}, column {m.group(2)}: {message[:m.start()]}"
    if "(at end of document)" in message:
        line = text.count("\n") + (0 if text.endswith("\n") else 1)
        return f"line {max(line, 1)}: {message.replace('(at end of document)', '').strip()} (at end of document)"
    return message


def _parse_toml(data: bytes) -> dict[str, Any]:
    """The document, or Invalid with a one-line reason (position included)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise Invalid(f"line {line}, column {column}: not valid UTF-8") from None
    # The common line-oriented subset first (a few ms for 1,000 units where tomllib takes ~27); it
    # declines anything else, and every error, so that tomllib gives the result or the message.
    from . import tomlfast
    document = tomlfast.loads(text)
    if document is not None:
        return document
    # Imported here: `run` builds its unit through this module without any TOML to parse.
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - depends on the interpreter
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise Invalid(f"TOML syntax error: {_toml_error(exc, text)}") from None
    except RecursionError:  # tomllib recurses once per level of nested arrays and inline tables
        raise Invalid("TOML syntax error: arrays or tables nested too deeply") from None


def _socket_type(fd: int) -> int:
    """SO_TYPE of a descriptor, through a copy so that the probe leaves it as it is; OSError if not a socket."""
    copy = os.dup(fd)
    try:
        probe = socket.socket(fileno=copy)
    except OSError:
        os.close(copy)
        raise
    with probe:
        return probe.type


def _merged(old: Any, new: Any) -> Any:
    """What several keys that fill one attribute give together (conditions, limits)."""
    if old is None:
        return new
    return {**old, **new} if isinstance(new, dict) else [*old, *new]


# ------------------------------------------------------------------ loading
@dataclass
class _Context:
    problems: list[Problem] = field(default_factory=list)
    inherited: list[tuple[int, str]] | None = None
    claimed_fds: dict[int, str] = field(default_factory=dict)  # inherited fd -> unit
    addresses: dict[tuple[str, int], str] = field(default_factory=dict)  # (address, type) -> "unit in file"


class _UnitLoader:
    """One unit table: every key parsed by its setting, problems added to the context."""

    def __init__(self, ctx: _Context, origin: str, name: str, table: dict, locations: dict[str, str] | None = None):
        self.ctx = ctx
        self.origin = origin
        self.name = name
        self.table = table
        self.locations = locations or {}
        self.ok = True
        self.unit_wide: dict[tuple[str, str], tuple[Any, str]] = {}  # (target, attr) -> (value, where)

    def error(self, where: str | None, message: str, key: str | None = None) -> None:
        self.ok = False
        self.ctx.problems.append(self._problem(where, message, key))

    def _problem(self, where: str | None, message: str, key: str | None) -> Problem:
        """A problem named where it was written: for a unit file, the directive (``FILE: [Socket] Backlog=``)
        or at least the file of the part (``socket[2]``); for TOML, the file, the unit and the key."""
        directive = self.locations.get(where or "")
        if directive is not None and where and not _PART.fullmatch(where):
            return Problem(message, directive, key=key)
        part = (where or "").partition(".")[0]
        return Problem(message, self.locations.get(part, self.origin), self.name, where, key)

    def parse(self, where: str, setting: Setting, value: Any) -> Any:
        """The parsed value, or None after reporting why it is invalid (no parser returns None)."""
        try:
            return setting.parse(value)
        except Invalid as exc:
            self.error(where, str(exc), setting.key)
            return None

    def unknown(self, where: str, key: str, known: tuple[str, ...]) -> None:
        self.error(where, f"unknown key{suggest(key, known)}", key)

    def set_unit_wide(self, setting: Setting, where: str, value: Any) -> None:
        """A value of the whole unit, which several socket tables may repeat but must not contradict."""
        slot = (setting.target, setting.attr)
        if setting.merge:
            self.unit_wide[slot] = (_merged(self.unit_wide.get(slot, (None, ""))[0], value), where)
            return
        if slot in self.unit_wide and self.unit_wide[slot][0] != value:
            self.error(where, f"conflicts with {self.unit_wide[slot][1]} (one value per unit)", setting.key)
            return
        self.unit_wide[slot] = (value, where)

    def load(self) -> Unit | None:
        if not is_unit_name(self.name):
            self.error(None, "invalid unit name: use letters, digits and '_', '.', '@', '-' only "
                             "(at most 255 characters)")
        for key, value in self.table.items():
            if key in PARTS:
                continue
            setting = BY_KEY.get(key)
            if setting is None or setting.part != "unit":
                self.unknown(key_label(key), key, UNIT_KEYS)
                continue
            parsed = self.parse(key, setting, value)
            if parsed is not None:
                self.set_unit_wide(setting, key, parsed)
        specs = self.load_sockets()
        service = self.load_service()
        unit_attrs = {attr: value for (target, attr), (value, _) in self.unit_wide.items() if target == "unit"}
        unit = Unit(name=self.name, sockets=specs, service=service or ServiceSpec(argv=["?"]), **unit_attrs)
        self.check_unit(unit, service is not None)
        return unit if self.ok else None

    # -------------------------------------------------------------- sockets
    def load_sockets(self) -> list[ListenSpec]:
        part = self.table.get("socket")
        if part is None:
            self.error("socket", "missing: a unit needs a socket part with listen-stream, listen-datagram, "
                                 "listen-sequential-packet or listen-inherited")
            return []
        if isinstance(part, dict):
            return self.load_socket("socket", part)
        if isinstance(part, list) and part:
            specs: list[ListenSpec] = []
            for i, table in enumerate(part, 1):
                where = f"socket[{i}]"
                if isinstance(table, dict):
                    specs.extend(self.load_socket(where, table))
                else:
                    self.error(where, f"expected a table, got {type_name(table)}")
            return specs
        self.error("socket", f"expected a table or an array of tables, got {type_name(part)}")
        return []

    def load_socket(self, where: str, part: dict) -> list[ListenSpec]:
        options: dict[str, Any] = {}
        listens: list[tuple[str, list]] = []  # (key, addresses or inherited selectors), in the table's order
        listen_invalid = False  # reported already: "no address" would say it twice
        for key, value in part.items():
            at = f"{where}.{key_label(key)}"
            setting = BY_KEY.get(key)
            if setting is None or setting.part != "socket":
                self.unknown(at, key, SOCKET_KEYS)
                continue
            is_listen = key in LISTEN_TYPES or key == "listen-inherited"
            parsed = self.parse(at, setting, value)
            if parsed is None:
                listen_invalid |= is_listen
            elif is_listen:
                listens.append((key, parsed))
            elif setting.target == "unit":
                self.set_unit_wide(setting, at, parsed)
            else:
                options[setting.attr] = parsed
        if not listen_invalid and not any(items for _, items in listens):
            self.error(where, "no address: give listen-stream, listen-datagram, listen-sequential-packet "
                              "or listen-inherited")
        specs: list[ListenSpec] = []
        for key, items in listens:
            for item in items:
                if key == "listen-inherited":
                    specs.extend(self.inherited_specs(f"{where}.{key}", item, options.get("name")))
                else:
                    specs.extend(self.bind_spec(f"{where}.{key}", key, item, options))
        return specs

    def bind_spec(self, at: str, key: str, address: Any, options: dict[str, Any]) -> list[ListenSpec]:
        sock_type = LISTEN_TYPES[key]
        here = f"{unit_label(self.name)} in {self.origin}"
        owner = self.ctx.addresses.get((address.text, sock_type))
        if owner is not None:
            what = "earlier in this unit" if owner == here else f"by unit {owner}"
            self.error(at, f"address {address.text} is already used {what}", key)
        self.ctx.addresses.setdefault((address.text, sock_type), here)
        return [BindSpec(address, type=sock_type, **options)]

    def inherited_specs(self, at: str, selector: str, name: str | None) -> list[ListenSpec]:
        inherited = self.ctx.inherited
        if inherited is None:  # `check`: descriptors are only known to `serve`
            return [UnresolvedInherited(selector, name=name or selector)]
        if selector.isdigit():
            matches = [(fd, passed) for fd, passed in inherited if fd == int(selector)]
        else:
            matches = [(fd, passed) for fd, passed in inherited if passed == selector]
        if not matches:
            passed = ", ".join(f"{n} (fd {fd})" for fd, n in inherited) or "none"
            self.error(at, f"no inherited descriptor {selector!r} was passed to activator (passed: {passed})",
                       "listen-inherited")
            return []
        specs: list[ListenSpec] = []
        for fd, passed in matches:
            owner = self.ctx.claimed_fds.setdefault(fd, self.name)
            if owner != self.name:
                self.error(at, f"inherited fd {fd} ({passed}) is already used by unit {unit_label(owner)}",
                           "listen-inherited")
                continue
            try:
                sock_type = _socket_type(fd)
            except OSError as exc:
                self.error(at, f"inherited fd {fd} ({passed}) is not a usable socket: {exc.strerror or exc}",
                           "listen-inherited")
                continue
            own = name or (None if passed == "unknown" else passed)
            specs.append(InheritedSpec(fd, type=sock_type, name=own))
        return specs

    # -------------------------------------------------------------- the service
    def load_service(self) -> ServiceSpec | None:
        part = self.table.get("service")
        if part is None:
            self.error("service", "missing: a unit needs a service part with exec-start")
            return None
        if not isinstance(part, dict):
            self.error("service", f"expected a table, got {type_name(part)}")
            return None
        attrs: dict[str, Any] = {}
        env_files: list[str] = []
        for key, value in part.items():
            at = f"service.{key_label(key)}"
            setting = BY_KEY.get(key)
            if setting is None or key not in SERVICE_KEYS:
                self.unknown(at, key, SERVICE_KEYS)
                continue
            parsed = self.parse(at, setting, value)
            if parsed is None:
                continue
            if setting.part == "unit":
                self.set_unit_wide(setting, at, parsed)
            elif key == "environment-file":
                env_files = parsed
            elif key == "watch-paths":
                attrs["watch_paths"] = self.watch_paths(parsed)
            elif key == "exec-start":
                attrs.update(argv=list(parsed.argv), exec_path=parsed.path, ignore_failure=parsed.ignore_failure,
                             expand_environment=parsed.expand_environment, privileged=parsed.privileged)
            else:
                attrs[setting.attr] = _merged(attrs.get(setting.attr), parsed) if setting.merge else parsed
        if "working_directory" in attrs:
            attrs["working_directory"] = self.working_directory(attrs["working_directory"], attrs.get("user"))
        # As in systemd, variables from environment-file override those of environment.
        attrs["environment"] = {**attrs.get("environment", {}), **self.environment_files(env_files)}
        if "argv" not in attrs:
            if "exec-start" not in part:
                self.error("service.exec-start", "missing: the command to start", "exec-start")
            return None
        for (target, attr), (value, _) in self.unit_wide.items():
            if target == "service":
                attrs[attr] = value
        return ServiceSpec(**attrs)

    def working_directory(self, text: str, user: str | None) -> str | None:
        at = "service.working-directory"
        optional = text.startswith("-")
        if optional:
            text = text[1:]
        if text == "~":
            import pwd

            try:
                text = pwd.getpwnam(user).pw_dir if user and not user.isdigit() else \
                    pwd.getpwuid(int(user) if user else os.getuid()).pw_dir
            except (KeyError, ValueError, OverflowError):
                self.error(at, "cannot find the home directory", "working-directory")
                return None
        if not os.path.isabs(text):
            self.error(at, f"{show(text)} is not an absolute path", "working-directory")
            return None
        if not os.path.isdir(text):
            if not optional:
                self.error(at, f"{show(text)} is not a directory (prefix it with '-' to ignore a missing one)",
                           "working-directory")
            return None
        return text

    def beside(self, path: str) -> str:
        """A path relative to the unit file (for `run`: to the current directory), made absolute."""
        return os.path.join(os.path.dirname(os.path.abspath(self.origin)), path)

    def watch_paths(self, entries: list[str]) -> list[str]:
        """The watch-paths that exist, absolute; a missing one is an error unless written `-PATH`."""
        paths = []
        for entry in entries:
            optional = entry.startswith("-")
            path = os.path.normpath(self.beside(entry[1:] if optional else entry))
            if not os.path.exists(path):
                if not optional:
                    self.error("service.watch-paths", f"{path_label(path)} does not exist (prefix it with '-' to "
                                                      "ignore a missing one)", "watch-paths")
                continue
            paths.append(path)
        return list(dict.fromkeys(paths))

    def environment_files(self, entries: list[str]) -> dict[str, str]:
        at = "service.environment-file"
        env: dict[str, str] = {}
        for entry in entries:
            optional = entry.startswith("-")
            path = entry[1:] if optional else entry
            path = self.beside(path)
            try:
                variables = read_environment_file(path)
            except FileNotFoundError:
                if not optional:
                    self.error(at, f"cannot read {path_label(path)}: No such file or directory", "environment-file")
                continue
            except OSError as exc:
                self.error(at, f"cannot read {path_label(path)}: {exc.strerror or exc}", "environment-file")
                continue
            except ValueError as exc:  # the message names the line, never its text
                self.error(at, f"{path_label(path)}: {exc}", "environment-file")
                continue
            env.update(variables)
        return env

    # -------------------------------------------------------------- the unit as a whole
    def check_unit(self, unit: Unit, have_service: bool) -> None:
        if not unit.sockets:
            return
        if have_service:
            self.check_proxy(unit)
        if unit.accept:
            for spec in unit.sockets:
                if spec.type == socket.SOCK_DGRAM:
                    self.error("socket.accept", "accept = true needs stream or sequential-packet sockets, "
                                                f"not the datagram socket {spec.label}", "accept")
                    break
        elif (unit.ip_address_allow or unit.ip_address_deny) and not unit.proxy:
            key = "ip-address-allow" if unit.ip_address_allow else "ip-address-deny"
            self.error(f"socket.{key}", "only applies to accept = true units and proxy units (with accept = false "
                                        "the daemon accepts its connections itself)", key)
        svc = unit.service
        if have_service and svc.standard_input == "socket" and not unit.accept:
            self.error("service.standard-input", "'socket' needs accept = true in the socket part "
                                                 "(one connection per instance)", "standard-input")
        if have_service and svc.standard_output == "socket" and not unit.accept:
            self.error("service.standard-output", "'socket' needs accept = true in the socket part",
                       "standard-output")
        if have_service and (unit.accept or unit.proxy):
            what = "accept = true starts one instance per connection" if unit.accept else \
                "a proxy unit's daemon binds its own port"
            if svc.workers > 1:
                self.error("service.workers", f"needs a daemon that gets the sockets: {what}", "workers")
            if svc.restart_style == "graceful":
                self.error("service.restart-style", f"graceful needs a daemon that gets the sockets: {what}",
                           "restart-style")


    def check_proxy(self, unit: Unit) -> None:
        """proxy-to: activator accepts stream connections for one daemon; exit-idle-sec only applies there."""
        svc = unit.service
        if svc.proxy_to is None:
            if svc.exit_idle_sec != float("inf"):
                self.error("service.exit-idle-sec", "only applies to proxy units (service.proxy-to): with "
                           "accept = false the daemon holds its connections, which activator does not see (let "
                           "the daemon exit when idle: the next connection starts it again; docs/proxy.md)",
                           "exit-idle-sec")
            return
        if unit.accept:
            self.error("socket.accept", "a proxy unit (service.proxy-to) accepts its connections itself: "
                                        "leave accept false", "accept")
        for spec in unit.sockets:
            if spec.type != socket.SOCK_STREAM:
                self.error("service.proxy-to", f"relays stream connections: {spec.label} is not a stream "
                                               "socket", "proxy-to")
            elif spec.address is not None and spec.address.text == svc.proxy_to.text:
                self.error("service.proxy-to", f"{svc.proxy_to} is the unit's own socket: it would connect "
                                               "to itself", "proxy-to")


class Loader:
    """Units from TOML files, systemd unit files and TOML-shaped documents, with every problem collected;
    :meth:`finish` returns them.

    ``inherited``: the (fd, name) pairs activator itself was passed (LISTEN_FDS);
    ``listen-inherited`` keys select from them. None (``check``): not looked up.
    ``strict``: what unit files hold that activator cannot honour is an error, not a warning.
    """

    def __init__(self, inherited: list[tuple[int, str]] | None = None, strict: bool = False):
        self.ctx = _Context(inherited=inherited)
        self.strict = strict
        self.units: list[Unit] = []
        self.seen: dict[str, str] = {}  # unit name -> where it was defined
        self.files: set[str] = set()
        self.warnings: list[str] = []  # one line each: what unit files hold that activator does not honour
        self.unit_documents: dict[str, dict[str, Any]] = {}  # the translated unit files, for `convert`

    def problem(self, origin: str, message: str) -> None:
        self.ctx.problems.append(Problem(message, origin))

    def add_paths(self, paths: list[str]) -> None:
        """TOML files, unit files, and directories of either (or both); unit files go to the unit-file
        reader together, in the order given, since their directories are one search path."""
        if not paths:
            self.problem("activator", "no configuration path given")
        unit_paths: list[str] = []
        for path in map(str, paths):
            if path.endswith(UNIT_FILE_SUFFIXES):  # may name an instance of a template: no file of its own
                unit_paths.append(path)
                continue
            for file in self._files(path, unit_paths):
                real = os.path.realpath(file)
                if real not in self.files:  # the same file named twice (itself and its directory) counts once
                    self.files.add(real)
                    self.add_file(file)
        if unit_paths:
            self.add_unit_files(unit_paths)

    def _files(self, path: str, unit_paths: list[str]) -> list[str]:
        """The TOML files of ``path``; a directory that holds unit files is added to ``unit_paths``."""
        try:
            st = os.stat(path)
        except OSError as exc:
            self.problem(path, str(exc.strerror or exc))
            return []
        if not stat.S_ISDIR(st.st_mode):
            return [path]
        try:
            names = sorted(n for n in os.listdir(path) if not n.startswith("."))
        except OSError as exc:
            self.problem(path, f"cannot list directory: {exc.strerror or exc}")
            return []
        files = [os.path.join(path, n) for n in names if n.endswith(".toml") and os.path.isfile(os.path.join(path, n))]
        if any(n.endswith(_UNIT_DIR_ENTRIES) or n in ("socket.d", "service.d") for n in names):
            unit_paths.append(path)
        elif not files:
            self.problem(path, "no *.toml files in this directory (nor *.socket or *.service unit files)")
        return files

    def add_unit_files(self, paths: list[str]) -> None:
        """The units of systemd ``*.socket``/``*.service`` files and directories (activator.unitfile)."""
        from .unitfile import UnitFileError, load_unit_files

        try:
            loaded = load_unit_files(paths, self.strict)
        except UnitFileError as exc:
            self.ctx.problems.extend(Problem(line) for line in exc.messages)
            return
        self.warnings.extend(str(w) for w in loaded.warnings)
        for name, table in loaded.document.items():
            self.unit_documents[name] = table
            self.add_document({name: table}, loaded.sources[name][0], loaded.origins[name])

    def add_file(self, path: str) -> None:
        try:
            data = _read_config(path)
        except OSError as exc:
            self.problem(path, f"cannot read: {exc.strerror or exc}")
            return
        try:
            document = _parse_toml(data)
        except Invalid as exc:
            self.problem(path, str(exc))
            return
        self.add_document(document, path)

    def add_document(self, document: dict[str, Any], origin: str, locations: dict[str, str] | None = None) -> None:
        """Every unit of a TOML-shaped document (``{name: {"socket": …, "service": …}}``) from ``origin``.

        ``locations``: where each value was written, by the loader's names for them (``"socket.backlog"``,
        ``"socket[2]"``, ``"service"``), for problems to name (a unit file's directive).
        """
        for name, table in document.items():
            if not isinstance(table, dict):
                self.ctx.problems.append(Problem(
                    f"a top-level key must be a unit table such as [{unit_label(name)}] with socket and service "
                    f"parts, got {type_name(table)}", origin, name))
                continue
            if name in self.seen:
                self.ctx.problems.append(Problem(f"unit name already defined in {self.seen[name]}", origin, name))
                continue
            self.seen[name] = origin
            unit = _UnitLoader(self.ctx, origin, name, table, locations).load()
            if unit is not None:
                self.units.append(unit)

    def finish(self) -> list[Unit]:
        self._check_dependencies()
        if self.ctx.problems:
            raise ConfigError(self.ctx.problems)
        return self.units

    def _check_dependencies(self) -> None:
        """requires, wants, after and before name units loaded together, and their order has no cycle."""
        for unit in self.units:
            for key in DEPENDENCY_KEYS:
                for name in getattr(unit, key):
                    if name == unit.name:
                        message = "names the unit itself"
                    elif name not in self.seen:
                        message = f"no unit {unit_label(name)} is loaded{suggest(name, self.seen)}"
                    else:
                        continue
                    self.ctx.problems.append(Problem(message, self.seen[unit.name], unit.name, key, key))
        cycle = _ordering_cycle(self.units)
        if cycle:
            self.ctx.problems.append(Problem(f"ordering cycle: {' after '.join(map(unit_label, cycle))} (after and "
                                             "before)", self.seen[cycle[0]], cycle[0], "after", "after"))


DEPENDENCY_KEYS = ("requires", "wants", "after", "before")


def _ordering_cycle(units: list[Unit]) -> list[str] | None:
    """A cycle of after/before among the units, as names from its start back to it; None when there is none."""
    first: dict[str, set[str]] = {u.name: set() for u in units}  # unit -> the units that start before it
    for u in units:
        first[u.name].update(name for name in u.after if name in first)
        for name in u.before:
            if name in first:
                first[name].add(u.name)
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done
    for root in first:
        if root in state:
            continue
        path = [root]
        stack = [iter(sorted(first[root]))]
        state[root] = 1
        while stack:
            step = next(stack[-1], None)
            if step is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(step) == 1:
                return [*path[path.index(step):], step]
            elif step not in state:
                state[step] = 1
                path.append(step)
                stack.append(iter(sorted(first[step])))
    return None


@dataclass
class Configuration:
    units: list[Unit]
    warnings: list[str]  # what unit files hold that activator does not honour, one line each

    def __iter__(self) -> Iterator[Any]:
        """``units, warnings = load_configuration(...)``, as when this was a named tuple."""
        return iter((self.units, self.warnings))


def load_configuration(paths: list[str], inherited: list[tuple[int, str]] | None = None,
                       strict: bool = False) -> Configuration:
    """Every unit of every file (TOML, or systemd unit files) or directory in ``paths``, with the warnings
    about unit files; ConfigError lists every problem (with ``strict``, the warnings are problems too)."""
    loader = Loader(inherited, strict)
    loader.add_paths(paths)
    return Configuration(loader.finish(), loader.warnings)


def load_units(paths: list[str], inherited: list[tuple[int, str]] | None = None, strict: bool = False) -> list[Unit]:
    """The units of :func:`load_configuration`, without its warnings."""
    return load_configuration(paths, inherited, strict).units


def convert_unit_files(paths: list[str], strict: bool = False) -> tuple[dict[str, Any], list[str]]:
    """``activator convert``: the TOML-shaped document of systemd unit files, checked by the settings model
    as ``serve`` would check it, and the warnings; ConfigError lists every problem."""
    loader = Loader(strict=strict)
    unit_paths = [path for path in paths if path.endswith(UNIT_FILE_SUFFIXES) or os.path.isdir(path)]
    for path in paths:
        if path not in unit_paths:
            loader.problem(path, "not a systemd unit file (convert reads *.socket and *.service files and "
                                 "directories of them)")
    loader.add_unit_files(unit_paths)
    loader.finish()
    return loader.unit_documents, loader.warnings
