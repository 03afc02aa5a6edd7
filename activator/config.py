"""Units from TOML files: ``activator serve`` and ``activator check``.

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
defaults. :func:`load_units` reports every problem it finds at once, one line
each, naming the file, the unit and the key; it never binds anything.
"""
from __future__ import annotations

import difflib
import os
import re
import shlex
import signal
import socket
import stat
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - depends on the interpreter
    import tomli as tomllib

from .access import parse_networks
from .addresses import AddressError, parse_address
from .processes import lookup_group, lookup_user, parse_signal
from .protocol import valid_fdname
from .timespan import parse_timespan
from .units import (
    KILL_MODES, RESTART_POLICIES, SERVICE_TYPES, STDIN_MODES, STDOUT_MODES, ListenSpec, ServiceSpec, Unit,
)


class ConfigError(Exception):
    """The configuration is invalid; ``messages`` has one line per problem, every problem found."""

    def __init__(self, messages: list[str]):
        super().__init__("\n".join(messages))
        self.messages = messages


class _Invalid(ValueError):
    """A value that does not fit its key; the message says why (the caller adds where)."""


UNIT_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,255}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SIZE_SUFFIXES = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5, "E": 1024**6}
LISTEN_KEYS = {
    "listen-stream": socket.SOCK_STREAM,
    "listen-datagram": socket.SOCK_DGRAM,
    "listen-sequential-packet": socket.SOCK_SEQPACKET,
}
BOOL_WORDS = ("yes", "no", "true", "false", "on", "off", "1", "0")


# ------------------------------------------------------------------ value parsers
def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "a table"}.get(type(value), type(value).__name__)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    hint = " (write it without quotes)" if isinstance(value, str) and value.strip().lower() in BOOL_WORDS else ""
    raise _Invalid(f"expected true or false, got {_type_name(value)} {value!r}{hint}")


def _int(minimum: int = 0, maximum: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            hint = " (write it without quotes)" if isinstance(value, str) and value.strip().isdigit() else ""
            raise _Invalid(f"expected an integer, got {_type_name(value)} {value!r}{hint}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"{minimum}..{maximum}" if maximum is not None else f"at least {minimum}"
            raise _Invalid(f"{value} is out of range ({bound})")
        return value
    return parse


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_type_name(value)} {value!r}")
    return value


def _nonempty(value: Any) -> str:
    text = _string(value)
    if not text:
        raise _Invalid("must not be empty")
    return text


def _strings(value: Any) -> list[str]:
    """A string or an array of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        for item in value:
            if not isinstance(item, str):
                raise _Invalid(f"expected strings, got {_type_name(item)} {item!r} in the array")
        return list(value)
    raise _Invalid(f"expected a string or an array of strings, got {_type_name(value)} {value!r}")


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = _string(value)
        if text not in choices:
            hint = _suggest(text, choices)
            raise _Invalid(f"invalid value {text!r}, expected one of: {', '.join(choices)}{hint}")
        return text
    return parse


def _timespan(value: Any) -> float:
    try:
        return parse_timespan(value)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _size(value: Any) -> int:
    """A byte count; strings take systemd's base-1024 suffixes K, M, G, T, P, E."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _Invalid(f"expected a size such as 65536 or \"1M\", got {_type_name(value)} {value!r}")
    if isinstance(value, int):
        number = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]?)\s*", value)
        if not m or m.group(2).upper() not in SIZE_SUFFIXES:
            raise _Invalid(f"invalid size {value!r} (expected a number with an optional K, M or G suffix)")
        number = int(float(m.group(1)) * SIZE_SUFFIXES[m.group(2).upper()])
    if not 1 <= number <= 2**31 - 1:
        raise _Invalid(f"size {value!r} is out of range (1..2G-1)")
    return number


def _mode(value: Any) -> int:
    """A file mode: an octal string ("0660") or a TOML integer (0o660)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _Invalid(f"expected an octal mode such as \"0660\", got {_type_name(value)} {value!r}")
    if isinstance(value, str):
        text = value.strip()
        if text.lower().startswith("0o"):
            text = text[2:]
        if not text or any(c not in "01234567" for c in text):
            raise _Invalid(f"invalid mode {value!r} (expected octal digits such as \"0660\")")
        mode = int(text, 8)
        if mode > 0o7777:
            raise _Invalid(f"mode {value!r} is out of range (at most 7777)")
        return mode
    if not 0 <= value <= 0o777:
        raise _Invalid(f"mode {value} is out of range; write octal modes as a string (\"0660\") or as 0o660")
    return value


def _signal(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _Invalid(f"expected a signal name such as \"SIGINT\" or a number, got {_type_name(value)} {value!r}")
    try:
        return parse_signal(value)
    except ValueError as exc:
        text = str(value).strip().upper()
        guess = _suggest(text if text.startswith("SIG") else "SIG" + text, [s.name for s in signal.Signals])
        raise _Invalid(f"{exc}{guess}") from None


def _user(value: Any) -> str:
    text = _nonempty(value if not isinstance(value, int) or isinstance(value, bool) else str(value))
    try:
        lookup_user(text)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None
    return text


def _group(value: Any) -> str:
    text = _nonempty(value if not isinstance(value, int) or isinstance(value, bool) else str(value))
    try:
        lookup_group(text)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None
    return text


def _networks(value: Any) -> list[str]:
    entries = _strings(value)
    try:
        parse_networks(entries)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None
    return entries


def _fdname(value: Any) -> str:
    text = _nonempty(value)
    if not valid_fdname(text):
        raise _Invalid(f"invalid file descriptor name {text!r} (printable ASCII without ':', at most 255 characters)")
    return text


def _argv(value: Any) -> list[str]:
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            raise _Invalid(f"cannot split {value!r}: {exc}") from None
    elif isinstance(value, list):
        for item in value:
            if not isinstance(item, str):
                raise _Invalid(f"expected an array of strings, got {_type_name(item)} {item!r} in it")
        argv = list(value)
    else:
        raise _Invalid(f"expected an array of strings or a command line string, got {_type_name(value)} {value!r}")
    if not argv or not argv[0]:
        raise _Invalid("empty command")
    return argv


def _env_value(name: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _Invalid(f"variable {name!r}: expected a string, got {_type_name(value)} {value!r}")
    return str(value)


def _check_env_name(name: str) -> None:
    if not ENV_NAME.match(name):
        raise _Invalid(f"invalid variable name {name!r}")


def _environment(value: Any) -> dict[str, str]:
    """A table, or systemd's form: "K=V" strings (an array, or one string split as a shell would)."""
    env: dict[str, str] = {}
    if isinstance(value, dict):
        for name, val in value.items():
            _check_env_name(name)
            env[name] = _env_value(name, val)
        return env
    if isinstance(value, str):
        try:
            items = shlex.split(value)
        except ValueError as exc:
            raise _Invalid(f"cannot split {value!r}: {exc}") from None
    elif isinstance(value, list):
        items = value
    else:
        raise _Invalid(f"expected a table of variables or an array of \"NAME=VALUE\", got {_type_name(value)} {value!r}")
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise _Invalid(f"expected \"NAME=VALUE\", got {item!r}")
        name, _, val = item.partition("=")
        _check_env_name(name)
        env[name] = val
    return env


def parse_environment_file(text: str) -> dict[str, str]:
    """systemd's EnvironmentFile= format: NAME=VALUE lines, # and ; comments, quotes, backslash continuation."""
    env: dict[str, str] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        lineno = i + 1
        i += 1
        while line.endswith("\\") and not line.endswith("\\\\") and i < len(lines):
            line = line[:-1] + lines[i]
            i += 1
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if stripped.startswith("export ") and "=" in stripped:
            stripped = stripped[len("export "):].lstrip()
        name, sep, raw = stripped.partition("=")
        name = name.strip()
        if not sep or not ENV_NAME.match(name):
            raise _Invalid(f"line {lineno}: expected NAME=VALUE, got {stripped!r}")
        env[name] = _unquote(raw.strip(), lineno)
    return env


def _unquote(raw: str, lineno: int) -> str:
    out = []
    pos = 0
    while pos < len(raw):
        c = raw[pos]
        if c == "'":
            end = raw.find("'", pos + 1)
            if end < 0:
                raise _Invalid(f"line {lineno}: unterminated single quote")
            out.append(raw[pos + 1:end])
            pos = end + 1
        elif c == '"':
            pos += 1
            while True:
                if pos >= len(raw):
                    raise _Invalid(f"line {lineno}: unterminated double quote")
                c = raw[pos]
                if c == '"':
                    pos += 1
                    break
                if c == "\\" and pos + 1 < len(raw) and raw[pos + 1] in '"\\`$':
                    out.append(raw[pos + 1])
                    pos += 2
                    continue
                out.append(c)
                pos += 1
        elif c == "\\" and pos + 1 < len(raw):
            out.append(raw[pos + 1])
            pos += 2
        else:
            out.append(c)
            pos += 1
    return "".join(out)


# ------------------------------------------------------------------ the schema
# key -> (parser, target): target is ("spec"|"unit"|"service", attribute)
SOCKET_KEYS: dict[str, tuple[Callable[[Any], Any], str, str]] = {
    "accept": (_bool, "unit", "accept"),
    "file-descriptor-name": (_fdname, "spec", "name"),
    "backlog": (_int(0, 2**31 - 1), "spec", "backlog"),
    "bind-ipv6-only": (_choice(("default", "both", "ipv6-only")), "spec", "bind_ipv6_only"),
    "reuse-port": (_bool, "spec", "reuse_port"),
    "free-bind": (_bool, "spec", "free_bind"),
    "keep-alive": (_bool, "spec", "keep_alive"),
    "no-delay": (_bool, "spec", "no_delay"),
    "receive-buffer": (_size, "spec", "receive_buffer"),
    "send-buffer": (_size, "spec", "send_buffer"),
    "socket-mode": (_mode, "spec", "socket_mode"),
    "socket-user": (_user, "spec", "socket_user"),
    "socket-group": (_group, "spec", "socket_group"),
    "directory-mode": (_mode, "spec", "directory_mode"),
    "remove-on-stop": (_bool, "spec", "remove_on_stop"),
    "max-connections": (_int(1), "unit", "max_connections"),
    "max-connections-per-source": (_int(0), "unit", "max_connections_per_source"),
    "trigger-limit-interval-sec": (_timespan, "unit", "trigger_limit_interval"),
    "trigger-limit-burst": (_int(0), "unit", "trigger_limit_burst"),
    "ip-address-allow": (_networks, "unit", "ip_address_allow"),
    "ip-address-deny": (_networks, "unit", "ip_address_deny"),
}
SOCKET_LISTEN_KEYS = (*LISTEN_KEYS, "listen-inherited")

SERVICE_KEYS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "exec-start": (_argv, "argv"),
    "environment": (_environment, "environment"),
    "working-directory": (_nonempty, "working_directory"),
    "user": (_user, "user"),
    "group": (_group, "group"),
    "supplementary-groups": (lambda v: [_group(g) for g in _strings(v)], "supplementary_groups"),
    "type": (_choice(SERVICE_TYPES), "type"),
    "restart": (_choice(RESTART_POLICIES), "restart"),
    "restart-sec": (_timespan, "restart_sec"),
    "start-limit-interval-sec": (_timespan, "start_limit_interval"),
    "start-limit-burst": (_int(0), "start_limit_burst"),
    "timeout-start-sec": (_timespan, "timeout_start"),
    "timeout-stop-sec": (_timespan, "timeout_stop"),
    "watchdog-sec": (_timespan, "watchdog_sec"),
    "kill-signal": (_signal, "kill_signal"),
    "kill-mode": (_choice(KILL_MODES), "kill_mode"),
    "standard-input": (_choice(STDIN_MODES), "standard_input"),
    "standard-output": (_choice(STDOUT_MODES), "standard_output"),
    "file-descriptor-store-max": (_int(0), "file_descriptor_store_max"),
    "umask": (_mode, "umask"),
}
SERVICE_SPECIAL = ("environment-file",)
UNIT_KEYS = ("description", "socket", "service", "start-limit-interval-sec", "start-limit-burst")
ALL_SOCKET_KEYS = (*SOCKET_LISTEN_KEYS, *SOCKET_KEYS)
ALL_SERVICE_KEYS = (*SERVICE_KEYS, *SERVICE_SPECIAL)


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ------------------------------------------------------------------ loading
@dataclass
class _Context:
    errors: list[str] = field(default_factory=list)
    inherited: list[tuple[int, str]] | None = None
    claimed_fds: dict[int, str] = field(default_factory=dict)  # inherited fd -> unit
    addresses: dict[tuple[str, int], str] = field(default_factory=dict)  # (address, type) -> "unit in file"


class _UnitLoader:
    def __init__(self, ctx: _Context, path: str, name: str, table: Any):
        self.ctx = ctx
        self.path = path
        self.name = name
        self.table = table
        self.ok = True

    def error(self, where: str | None, message: str) -> None:
        self.ok = False
        prefix = f"{self.path}: {self.name}"
        if where:
            prefix += f": {where}"
        self.ctx.errors.append(f"{prefix}: {message}")

    def parse(self, where: str, parser: Callable[[Any], Any], value: Any) -> Any:
        try:
            return parser(value)
        except _Invalid as exc:
            self.error(where, str(exc))
            return None

    def unknown(self, where: str, key: str, known) -> None:
        self.error(where, f"unknown key{_suggest(key, known)}")

    def load(self) -> Unit | None:
        if not UNIT_NAME.match(self.name):
            self.error(None, "invalid unit name: use letters, digits and '_', '.', '@', '-' only")
        if not isinstance(self.table, dict):
            self.error(None, f"expected a table [{self.name}] with socket and service parts, "
                             f"got {_type_name(self.table)}")
            return None
        unit_values: dict[str, tuple[Any, str]] = {}  # attribute -> (value, where it was set)
        description = ""
        for key, value in self.table.items():
            if key not in UNIT_KEYS:
                self.unknown(key, key, UNIT_KEYS)
        if "description" in self.table:
            description = self.parse("description", _string, self.table["description"]) or ""

        socket_part = self.table.get("socket")
        specs: list[ListenSpec] = []
        if socket_part is None:
            self.error("socket", "missing: a unit needs a socket part with listen-stream, listen-datagram, "
                                 "listen-sequential-packet or listen-inherited")
        elif isinstance(socket_part, dict):
            specs = self.load_socket("socket", socket_part, unit_values)
        elif isinstance(socket_part, list) and socket_part:
            for i, part in enumerate(socket_part, 1):
                where = f"socket[{i}]"
                if not isinstance(part, dict):
                    self.error(where, f"expected a table, got {_type_name(part)}")
                    continue
                specs.extend(self.load_socket(where, part, unit_values))
        else:
            self.error("socket", f"expected a table or an array of tables, got {_type_name(socket_part)}")

        service = self.load_service(unit_values)

        unit = Unit(name=self.name, sockets=specs, service=service or ServiceSpec(argv=["?"]),
                    description=description, source=self.path)
        for attr, (value, _) in unit_values.items():
            setattr(unit, attr, value)
        self.check_unit(unit, service is not None)
        return unit if self.ok else None

    def _set_unit_value(self, unit_values: dict, attr: str, value: Any, where: str) -> None:
        if attr in unit_values and unit_values[attr][0] != value:
            self.error(where, f"conflicts with {unit_values[attr][1]} (one value per unit)")
            return
        unit_values[attr] = (value, where)

    def load_socket(self, where: str, part: dict, unit_values: dict) -> list[ListenSpec]:
        options: dict[str, Any] = {}
        listens: list[tuple[str, Any]] = []  # (kind, address or inherited selector)
        for key, value in part.items():
            at = f"{where}.{key}"
            if key in LISTEN_KEYS:
                for text in self.parse(at, _strings, value) or []:
                    try:
                        listens.append((key, parse_address(text)))
                    except AddressError as exc:
                        self.error(at, str(exc))
            elif key == "listen-inherited":
                items = value if isinstance(value, list) else [value]
                for item in items:
                    if isinstance(item, bool) or not isinstance(item, (str, int)) or item == "":
                        self.error(at, f"expected a descriptor name or number, got {_type_name(item)} {item!r}")
                        continue
                    listens.append((key, str(item)))
            elif key in SOCKET_KEYS:
                parser, target, attr = SOCKET_KEYS[key]
                parsed = self.parse(at, parser, value)
                if parsed is None:
                    continue
                if target == "unit":
                    self._set_unit_value(unit_values, attr, parsed, at)
                else:
                    options[attr] = parsed
            else:
                self.unknown(at, key, ALL_SOCKET_KEYS)
        if not listens:
            self.error(where, "no address: give listen-stream, listen-datagram, listen-sequential-packet "
                              "or listen-inherited")
        specs = []
        for kind, target in listens:
            if kind == "listen-inherited":
                specs.extend(self.inherited_specs(f"{where}.listen-inherited", target, options))
                continue
            sock_type = LISTEN_KEYS[kind]
            key = (target.text, sock_type)
            owner = self.ctx.addresses.get(key)
            here = f"{self.name} in {self.path}"
            if owner is not None:
                what = "earlier in this unit" if owner == here else f"by unit {owner}"
                self.error(f"{where}.{kind}", f"address {target.text} is already used {what}")
            self.ctx.addresses.setdefault(key, here)
            specs.append(ListenSpec(target, type=sock_type, **options))
        return specs

    def inherited_specs(self, at: str, selector: str, options: dict) -> list[ListenSpec]:
        inherited = self.ctx.inherited
        extra = {k: v for k, v in options.items() if k == "name"}
        if inherited is None:  # `check`: descriptors are only known to `serve`
            return [ListenSpec(None, name=extra.get("name", selector), inherited_fd=None)]
        if selector.isdigit() and selector.isascii():
            matches = [(fd, name) for fd, name in inherited if fd == int(selector)]
        else:
            matches = [(fd, name) for fd, name in inherited if name == selector]
        if not matches:
            passed = ", ".join(f"{name} (fd {fd})" for fd, name in inherited) or "none"
            self.error(at, f"no inherited descriptor {selector!r} was passed to activator (passed: {passed})")
            return []
        specs = []
        for fd, name in matches:
            owner = self.ctx.claimed_fds.get(fd)
            if owner is not None:
                self.error(at, f"inherited fd {fd} ({name}) is already used by unit {owner}")
                continue
            self.ctx.claimed_fds[fd] = self.name
            try:
                probe = socket.socket(fileno=os.dup(fd))
                sock_type = probe.type
                probe.close()
            except OSError as exc:
                self.error(at, f"inherited fd {fd} ({name}) is not a usable socket: {exc.strerror or exc}")
                continue
            own = extra.get("name") or (None if name == "unknown" else name)
            specs.append(ListenSpec(None, type=sock_type, name=own, inherited_fd=fd))
        return specs

    def load_service(self, unit_values: dict) -> ServiceSpec | None:
        part = self.table.get("service")
        for key in ("start-limit-interval-sec", "start-limit-burst"):
            if key in self.table:
                parser, attr = SERVICE_KEYS[key]
                parsed = self.parse(key, parser, self.table[key])
                if parsed is not None:
                    self._set_unit_value(unit_values, "service." + attr, parsed, key)
        if part is None:
            self.error("service", "missing: a unit needs a service part with exec-start")
            return None
        if not isinstance(part, dict):
            self.error("service", f"expected a table, got {_type_name(part)}")
            return None
        values: dict[str, Any] = {}
        env_files: dict[str, str] = {}
        for key, value in part.items():
            at = f"service.{key}"
            if key in SERVICE_KEYS:
                parser, attr = SERVICE_KEYS[key]
                parsed = self.parse(at, parser, value)
                if parsed is None:
                    continue
                if key.startswith("start-limit-"):
                    self._set_unit_value(unit_values, "service." + attr, parsed, at)
                else:
                    values[attr] = parsed
            elif key == "environment-file":
                env_files = self.load_environment_files(at, value) or {}
            else:
                self.unknown(at, key, ALL_SERVICE_KEYS)
        if "working_directory" in values:
            values["working_directory"] = self.working_directory(values["working_directory"], values.get("user"))
            if values["working_directory"] is None:
                del values["working_directory"]
        if "argv" not in values:
            if "exec-start" not in part:
                self.error("service.exec-start", "missing: the command to start")
            return None
        # As in systemd, variables from environment-file override those of environment.
        env = dict(values.pop("environment", {}))
        env.update(env_files)
        values["environment"] = env
        for attr in ("start_limit_interval", "start_limit_burst"):
            if "service." + attr in unit_values:
                values[attr] = unit_values.pop("service." + attr)[0]
        return ServiceSpec(**values)

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
                self.error(at, "cannot find the home directory")
                return None
        if not os.path.isabs(text):
            self.error(at, f"{text!r} is not an absolute path")
            return None
        if not os.path.isdir(text):
            if optional:
                return None
            self.error(at, f"{text!r} is not a directory (prefix it with '-' to ignore a missing one)")
            return None
        return text

    def load_environment_files(self, at: str, value: Any) -> dict[str, str] | None:
        try:
            paths = _strings(value)
        except _Invalid as exc:
            self.error(at, str(exc))
            return None
        env: dict[str, str] = {}
        for entry in paths:
            optional = entry.startswith("-")
            path = entry[1:] if optional else entry
            if not path or "\0" in path:
                self.error(at, f"invalid path {entry!r}")
                continue
            if not os.path.isabs(path):
                path = os.path.join(os.path.dirname(os.path.abspath(self.path)), path)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as exc:
                if optional and isinstance(exc, FileNotFoundError):
                    continue
                self.error(at, f"cannot read {path}: {exc.strerror or exc}")
                continue
            try:
                env.update(parse_environment_file(data.decode("utf-8")))
            except UnicodeDecodeError:
                self.error(at, f"{path} is not valid UTF-8")
            except _Invalid as exc:
                self.error(at, f"{path}: {exc}")
        return env

    def check_unit(self, unit: Unit, have_service: bool) -> None:
        if not unit.sockets:
            return
        svc = unit.service
        if unit.accept:
            for spec in unit.sockets:
                if spec.type == socket.SOCK_DGRAM:
                    self.error("socket.accept", "accept = true needs stream or sequential-packet sockets, "
                                                f"not the datagram socket {spec.label}")
                    break
        if have_service and svc.standard_input == "socket" and not unit.accept:
            self.error("service.standard-input", "'socket' needs accept = true in the socket part "
                                                 "(one connection per instance)")
        if have_service and svc.standard_output == "socket" and not unit.accept:
            self.error("service.standard-output", "'socket' needs accept = true in the socket part")


def _load_file(ctx: _Context, path: str, seen: dict[str, str]) -> list[Unit]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        ctx.errors.append(f"{path}: cannot read: {exc.strerror or exc}")
        return []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        ctx.errors.append(f"{path}: line {line}, column {column}: not valid UTF-8")
        return []
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        m = re.search(r"\s*\(at line (\d+), column (\d+)\)\s*$", message)
        if m:
            message = f"line {m.group(1)}, column {m.group(2)}: {message[:m.start()]}"
        elif "(at end of document)" in message:
            line = text.count("\n") + (0 if text.endswith("\n") else 1)
            message = f"line {max(line, 1)}: {message.replace('(at end of document)', '').strip()} (at end of document)"
        ctx.errors.append(f"{path}: TOML syntax error: {message}")
        return []
    units = []
    for name, table in doc.items():
        if not isinstance(table, dict):
            ctx.errors.append(
                f"{path}: {name}: a top-level key must be a unit table such as [{name}] "
                f"with socket and service parts, got {_type_name(table)}"
            )
            continue
        if name in seen:
            ctx.errors.append(f"{path}: {name}: unit name already defined in {seen[name]}")
            continue
        seen[name] = path
        unit = _UnitLoader(ctx, path, name, table).load()
        if unit is not None:
            units.append(unit)
    return units


def _files(ctx: _Context, path: str) -> list[str]:
    try:
        st = os.stat(path)
    except OSError as exc:
        ctx.errors.append(f"{path}: {exc.strerror or exc}")
        return []
    if stat.S_ISDIR(st.st_mode):
        try:
            names = sorted(n for n in os.listdir(path) if n.endswith(".toml") and not n.startswith("."))
        except OSError as exc:
            ctx.errors.append(f"{path}: cannot list directory: {exc.strerror or exc}")
            return []
        files = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
        if not files:
            ctx.errors.append(f"{path}: no *.toml files in this directory")
        return files
    return [path]


def load_units(paths: list[str], inherited: list[tuple[int, str]] | None = None) -> list[Unit]:
    """Every unit of every file (or directory of ``*.toml``, sorted) in ``paths``.

    ``inherited``: the (fd, name) pairs activator itself was passed (LISTEN_FDS);
    ``listen-inherited`` keys select from them. None (``check``): not verified.
    Raises ConfigError listing every problem found.
    """
    ctx = _Context(inherited=inherited)
    units: list[Unit] = []
    seen: dict[str, str] = {}
    if not paths:
        raise ConfigError(["no configuration path given"])
    done: set[str] = set()
    for path in paths:
        for file in _files(ctx, str(path)):
            real = os.path.realpath(file)
            if real not in done:  # the same file named twice (itself and its directory) counts once
                done.add(real)
                units.extend(_load_file(ctx, file, seen))
    if ctx.errors:
        raise ConfigError(ctx.errors)
    return units
