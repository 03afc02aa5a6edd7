"""Parsers for the values of settings: each checks the type, the syntax and the bounds of one kind of value.

A parser takes a value as TOML gives it (a string, an integer, a boolean, an
array, a table) and returns what the engine uses, or raises :class:`Invalid`
with a one-line message that says what is wrong (the caller adds where).
``from_text`` turns what a command-line option received into the value TOML
would have given, so that ``activator run`` and TOML files go through the very
same checks.

Bounds are those of what consumes the value: time spans end within one
``epoll_wait()`` (:data:`TIME_MAX`), modes fit ``chmod()``, umasks ``umask()``,
strings that reach argv, the environment, a path or a user name hold no NUL.
"""
from __future__ import annotations

import reprlib

TYPE_CHECKING = False  # typing is not imported at run time (start-up, memory); type checkers see it
if TYPE_CHECKING:
    import re
    from typing import Any, Iterable

# The longest single wait of epoll_wait() is 2**31-1 ms (24.8 days). Every timer activator arms
# (restart delay, stop and start timeouts, watchdog, rate-limit pause) stays below it, so the loop
# never has to split or clamp a wait and no arithmetic on a span overflows. Longer waits are spelled
# "infinity" where systemd gives infinity a meaning that activator can apply.
TIME_MAX = 24 * 86400.0
TIME_MAX_TEXT = "24d"
UINT_MAX = 2**32 - 1  # systemd's unsigned settings (bursts, connection counts)
INT_MAX = 2**31 - 1  # what the kernel takes as an int (backlog, buffer sizes)
MODE_MAX = 0o7777  # chmod(): permission bits plus setuid, setgid and sticky
UMASK_MAX = 0o777  # umask() keeps only the permission bits
SIZE_SUFFIXES = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5, "E": 1024**6}
INFINITY = float("inf")


def is_infinite(value: float) -> bool:
    """math.isinf, for the spans and limits that have infinity as a value."""
    return value == INFINITY or value == -INFINITY


class _LazyPattern:
    """``re.compile(pattern)`` on first use, then its methods straight from the instance: a module's
    patterns cost nothing until one is matched (compiling them all at import was 2.3 ms of every
    start-up; importing ``re`` itself, where nothing else has, costs more)."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern

    def __getattr__(self, name: str) -> Any:  # only for what the instance does not have yet
        import re

        compiled = re.compile(self.pattern)
        for method in ("match", "fullmatch", "search", "sub", "finditer", "findall", "split"):
            setattr(self, method, getattr(compiled, method))
        return getattr(compiled, name)


def lazy_pattern(pattern: str) -> re.Pattern[str]:
    """A compiled regular expression to be: compiled when first used (see _LazyPattern)."""
    return _LazyPattern(pattern)  # type: ignore[return-value]


ENV_NAME = lazy_pattern(r"[A-Za-z_][A-Za-z0-9_]*")
BOOL_WORDS = ("yes", "no", "true", "false", "on", "off", "1", "0")
_INTEGER = lazy_pattern(r"\s*[+-]?[0-9]+\s*")
# systemd.time(7): a span is a sequence of numbers each with an optional unit ("1min 30s", "1h5m", "100ms").
TIME_UNITS = {
    "usec": 1e-6, "us": 1e-6, "µs": 1e-6,
    "msec": 1e-3, "ms": 1e-3,
    "seconds": 1.0, "second": 1.0, "sec": 1.0, "s": 1.0, "": 1.0,
    "minutes": 60.0, "minute": 60.0, "min": 60.0, "m": 60.0,
    "hours": 3600.0, "hour": 3600.0, "hr": 3600.0, "h": 3600.0,
    "days": 86400.0, "day": 86400.0, "d": 86400.0,
    "weeks": 604800.0, "week": 604800.0, "w": 604800.0,
    "months": 2629800.0, "month": 2629800.0, "M": 2629800.0,
    "years": 31557600.0, "year": 31557600.0, "y": 31557600.0,
}
_SIZE = lazy_pattern(r"\s*([0-9]{1,30}(?:\.[0-9]{1,30})?)\s*([A-Za-z]?)\s*")
_TIME_PART = lazy_pattern(r"[ \t\n\r]*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)[ \t\n\r]*([a-zA-Zµ]*)[ \t\n\r]*")

_repr = reprlib.Repr()
_repr.maxstring = 80
_repr.maxother = 80
_repr.maxlevel = 2
_repr.maxlist = _repr.maxdict = 4


class Invalid(ValueError):
    """A value that does not fit its setting; the message (one line) says why."""


def show(value: Any) -> str:
    """A value quoted for an error message: repr() cut to a bounded length and depth (one line, always)."""
    return _repr.repr(value)


def type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "a table"}.get(type(value), type(value).__name__)


def described(value: Any) -> str:
    """``a string 'x'``: the type and the value, for "expected …, got …"."""
    return f"{type_name(value)} {show(value)}"


def suggest(word: str, choices: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def text(value: Any, what: str = "a string") -> str:
    """A string without NUL: every string that reaches argv, the environment, a path or a user name."""
    if not isinstance(value, str):
        raise Invalid(f"expected {what}, got {described(value)}")
    if "\0" in value:
        raise Invalid(f"{show(value)} contains a NUL character")
    return value


def strings(value: Any) -> list[str]:
    """A string or an array of strings."""
    if isinstance(value, str):
        return [text(value)]
    if isinstance(value, list):
        return [text(item, "strings") for item in value]
    raise Invalid(f"expected a string or an array of strings, got {described(value)}")


def parse_timespan(value: Any) -> float:
    """Seconds from a systemd time span or a TOML number; ``inf`` only for "infinity" or a TOML inf.

    No upper bound here: the settings that take a span bound it (:class:`Time`).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise Invalid(f"invalid time span {show(value)}: expected a number or a string")
    if isinstance(value, (int, float)):
        if value != value:  # NaN (math is not imported: a C extension to load, for three comparisons)
            raise Invalid("invalid time span nan")
        if value < 0:
            raise Invalid(f"invalid time span {show(value)}: must not be negative")
        if isinstance(value, int) and value > 2**53:  # float() would round it, or overflow
            raise Invalid(f"time span {show(value)} is out of range")
        return float(value)
    spec = value.strip()
    if spec == "infinity":
        return INFINITY
    if not spec:
        raise Invalid("empty time span")
    total = 0.0
    pos = 0
    while pos < len(spec):
        m = _TIME_PART.match(spec, pos)
        if not m:
            raise Invalid(f"invalid time span {show(value)}")
        number, unit = m.groups()
        if unit not in TIME_UNITS:
            raise Invalid(f"invalid time span {show(value)}: unknown unit {show(unit)}")
        total += float(number) * TIME_UNITS[unit]
        pos = m.end()
    if not -INFINITY < total < INFINITY:  # enough digits to overflow a float: not a way to write infinity
        raise Invalid(f"time span {show(value)} is out of range")
    return total


class Parser:
    """Base of every parser: ``parser(value)`` checks and converts; subclasses set ``kind`` and ``describe``.

    Plain classes, not dataclasses: `run` creates them at every start, and each dataclass costs
    about a millisecond to create.
    """

    kind = "text"
    multiple = False  # a list of values: a repeatable command-line option
    metavar = "TEXT"

    def __call__(self, value: Any) -> Any:
        raise NotImplementedError

    def from_text(self, value: str) -> Any:
        """What TOML would hold for this command-line text (only integers differ: TOML has them unquoted)."""
        return value

    def placeholder(self) -> str:
        """The command line's name for a value (``--backlog N``)."""
        return self.metavar

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"

    def describe(self) -> str:
        return "string"


class Bool(Parser):
    kind = "bool"
    metavar = ""

    def __call__(self, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        hint = " (write it without quotes)" if isinstance(value, str) and value.strip().lower() in BOOL_WORDS else ""
        raise Invalid(f"expected true or false, got {described(value)}{hint}")

    def describe(self) -> str:
        return "boolean"


class Int(Parser):
    kind = "int"
    metavar = "N"

    def __init__(self, minimum: int = 0, maximum: int = UINT_MAX):
        self.minimum, self.maximum = minimum, maximum

    def __call__(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            hint = " (write it without quotes)" if isinstance(value, str) and _INTEGER.fullmatch(value) else ""
            raise Invalid(f"expected an integer, got {described(value)}{hint}")
        if not self.minimum <= value <= self.maximum:
            raise Invalid(f"{show(value)} is out of range ({self.minimum}..{self.maximum})")
        return value

    def from_text(self, value: str) -> Any:
        return int(value) if _INTEGER.fullmatch(value) else value

    def describe(self) -> str:
        return f"integer {self.minimum}..{self.maximum}"


class Size(Parser):
    """A byte count; strings take systemd's base-1024 suffixes K, M, G, T, P, E."""

    kind = "size"
    metavar = "BYTES"

    def __init__(self, minimum: int = 1, maximum: int = INT_MAX):
        self.minimum, self.maximum = minimum, maximum

    def __call__(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise Invalid(f"expected a size such as 65536 or \"1M\", got {described(value)}")
        if isinstance(value, int):
            number = value
        else:
            m = _SIZE.fullmatch(value)
            if not m or m.group(2).upper() not in SIZE_SUFFIXES:
                raise Invalid(f"invalid size {show(value)} (expected a number with an optional K, M or G suffix)")
            number = int(float(m.group(1)) * SIZE_SUFFIXES[m.group(2).upper()])
        if not self.minimum <= number <= self.maximum:
            raise Invalid(f"size {show(value)} is out of range ({self.minimum}..{self.maximum})")
        return number

    def describe(self) -> str:
        return f"bytes {self.minimum}..{self.maximum} (suffixes K, M, G)"


class Mode(Parser):
    """An octal mode: a string ("0660", "0o660") or a TOML integer (0o660); one range for both spellings."""

    kind = "mode"
    metavar = "OCTAL"

    def __init__(self, maximum: int = MODE_MAX, what: str = "mode"):
        self.maximum, self.what = maximum, what

    def __call__(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise Invalid(f"expected an octal {self.what} such as \"0660\", got {described(value)}")
        if isinstance(value, str):
            digits = value.strip()
            if digits.lower().startswith("0o"):
                digits = digits[2:]
            if not digits or len(digits) > 12 or any(c not in "01234567" for c in digits):
                raise Invalid(f"invalid {self.what} {show(value)} (expected octal digits such as \"0660\")")
            mode = int(digits, 8)
        else:
            mode = value
        if not 0 <= mode <= self.maximum:
            raise Invalid(f"{self.what} {show(value)} is out of range (0000..{self.maximum:04o}; a TOML integer is "
                          "taken as it is: write 0o660 or \"0660\")")
        return mode

    def describe(self) -> str:
        return f"octal 0000..{self.maximum:04o} (\"0660\" or 0o660)"


class Time(Parser):
    """A systemd time span, at most TIME_MAX.

    ``infinity``: "accept" (kept as ``inf``), "off" (``0``: systemd gives it the meaning of no
    watchdog), or "reject" with ``why`` (systemd takes it, but activator cannot apply it).
    """

    kind = "time"
    metavar = "TIME"

    def __init__(self, infinity: str = "reject", why: str = "", zero_is_infinity: bool = False):
        self.infinity, self.why = infinity, why
        self.zero_is_infinity = zero_is_infinity  # systemd's TimeoutStartSec=/TimeoutStopSec=: 0 turns it off

    def __call__(self, value: Any) -> float:
        seconds = parse_timespan(value)
        if seconds == 0 and self.zero_is_infinity:
            return INFINITY
        if is_infinite(seconds):
            if self.infinity == "accept":
                return seconds
            if self.infinity == "off":
                return 0.0
            raise Invalid(f"infinity is not accepted here: {self.why}")
        if seconds > TIME_MAX:
            hint = " or \"infinity\"" if self.infinity != "reject" else ""
            raise Invalid(f"time span {show(value)} is too long (at most {TIME_MAX_TEXT}{hint})")
        return seconds

    def describe(self) -> str:
        extra = {"accept": ", or infinity", "off": ", or infinity (off)", "reject": ""}[self.infinity]
        zero = " (0: infinity)" if self.zero_is_infinity else ""
        return f"time span 0..{TIME_MAX_TEXT}{extra}{zero}"


class Text(Parser):
    """A string without NUL; ``empty``: whether "" is allowed."""


    def __init__(self, empty: bool = False):
        self.empty = empty

    def __call__(self, value: Any) -> str:
        result = text(value)
        if not result and not self.empty:
            raise Invalid("must not be empty")
        return result


class Path(Text):
    metavar = "PATH"

    def describe(self) -> str:
        return "path"


class Choice(Parser):
    kind = "choice"

    def __init__(self, choices: tuple[str, ...]):
        self.choices = choices

    def __call__(self, value: Any) -> str:
        word = text(value)
        if word not in self.choices:
            raise Invalid(f"invalid value {show(word)}, expected one of: {', '.join(self.choices)}"
                          f"{suggest(word, self.choices)}")
        return word

    def describe(self) -> str:
        return " | ".join(f"`{c}`" for c in self.choices)


class Signal(Parser):
    kind = "signal"
    metavar = "SIGNAL"

    def __call__(self, value: Any) -> int:
        from . import signalapi as signal

        from .processes import parse_signal

        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise Invalid(f"expected a signal name such as \"SIGINT\" or a number, got {described(value)}")
        if isinstance(value, str):
            text(value)
        try:
            return parse_signal(value)
        except ValueError as exc:
            word = str(value).strip().upper()
            guess = suggest(word if word.startswith("SIG") else "SIG" + word, signal.names())
            raise Invalid(f"{exc}{guess}") from None

    def describe(self) -> str:
        return "signal name or number"


class Account(Parser):
    """A user or group (``what``): a name or a number that exists on this system, looked up at load time."""

    kind = "account"

    def placeholder(self) -> str:
        return self.what.upper()

    def __init__(self, what: str = "user"):
        self.what = what

    def __call__(self, value: Any) -> str:
        from .processes import lookup_group, lookup_user

        if isinstance(value, int) and not isinstance(value, bool):  # TOML may give a number unquoted
            value = str(value)
        name = Text()(value)
        try:
            (lookup_user if self.what == "user" else lookup_group)(name)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        return name

    def describe(self) -> str:
        return f"{self.what} name or {self.what[0]}id"


class Groups(Parser):
    kind = "groups"
    multiple = True
    metavar = "GROUP"

    def __call__(self, value: Any) -> list[str]:
        return [Account("group")(name) for name in strings(value)]

    def describe(self) -> str:
        return "group names or gids (a string or an array)"


class Networks(Parser):
    """IPAddressAllow=/IPAddressDeny= entries: addresses, prefixes, or any, localhost, link-local, multicast."""

    kind = "networks"
    multiple = True
    metavar = "PREFIX"

    def __call__(self, value: Any) -> list[str]:
        from .access import parse_networks

        entries = strings(value)
        try:
            parse_networks(entries)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        return entries

    def describe(self) -> str:
        return "addresses, CIDR prefixes, `any`, `localhost`, `link-local`, `multicast`"


class FdName(Parser):
    kind = "fdname"
    metavar = "NAME"

    def __call__(self, value: Any) -> str:
        from .protocol import valid_fdname

        name = Text()(value)
        if not valid_fdname(name):
            raise Invalid(f"invalid file descriptor name {show(name)} (printable ASCII without ':', "
                          "at most 255 characters)")
        return name

    def describe(self) -> str:
        return "printable ASCII without `:`, 1..255 characters"


class Paths(Parser):
    """One or more paths (a string or an array), none empty; a leading ``-`` marks one as optional."""

    kind = "paths"
    multiple = True
    metavar = "PATH"

    def __call__(self, value: Any) -> list[str]:
        paths = strings(value)
        for entry in paths:
            self.check(entry)
        return paths

    def check(self, entry: str) -> None:
        if entry in ("", "-"):
            raise Invalid(f"invalid path {show(entry)}")

    def describe(self) -> str:
        return "paths (a string or an array); `-PATH`: optional"


class Patterns(Paths):
    """Glob patterns (watch-ignore): a string or an array, none empty nor only slashes."""

    kind = "patterns"
    metavar = "PATTERN"

    def check(self, entry: str) -> None:
        if not entry.strip("/") or len(entry) > PATH_MAX:
            raise Invalid(f"invalid pattern {show(entry)}: a glob of 1..{PATH_MAX} characters, not only '/'")

    def describe(self) -> str:
        return "glob patterns (a string or an array): `NAME`, `DIR/`, `PATH/UNDER/IT`"


class Addresses(Parser):
    """ListenStream=-style addresses: PORT, IPv4:PORT, [IPv6]:PORT, /path, @abstract, vsock:CID:PORT."""

    kind = "addresses"
    multiple = True
    metavar = "ADDR"

    def __call__(self, value: Any) -> list:
        from .addresses import AddressError, parse_address

        result = []
        for item in strings(value):
            try:
                result.append(parse_address(item))
            except AddressError as exc:
                raise Invalid(str(exc)) from None
        return result

    def describe(self) -> str:
        return "addresses: `PORT`, `IPv4:PORT`, `[IPv6]:PORT`, `/path`, `@abstract`, `vsock:CID:PORT`"


class Backend(Parser):
    """Where a proxy unit's daemon listens: IPv4:PORT, [IPv6]:PORT, /path or @abstract (a stream socket)."""

    kind = "backend"
    metavar = "ADDR"

    def __call__(self, value: Any):
        from .addresses import AddressError, parse_address

        try:
            address = parse_address(text(value, "an address"))
        except AddressError as exc:
            raise Invalid(str(exc)) from None
        if address.any_port:
            raise Invalid(f"{show(value)} has no host: activator connects to it, give 127.0.0.1:PORT or "
                          "[::1]:PORT")
        if address.kind == "vsock":
            raise Invalid(f"{show(value)}: the backend is a TCP or unix socket (IPv4:PORT, [IPv6]:PORT, /path, "
                          "@abstract)")
        return address

    def describe(self) -> str:
        return "address: `IPv4:PORT`, `[IPv6]:PORT`, `/path`, `@abstract`"


class Inherited(Parser):
    """Descriptors passed to activator: LISTEN_FDNAMES names, or fd numbers (3 and up); one or an array."""

    kind = "inherited"
    multiple = True
    metavar = "NAME|FD"

    def __call__(self, value: Any) -> list[str]:
        from .protocol import LISTEN_FDS_START, valid_fdname

        selectors = []
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, bool) or not isinstance(item, (str, int)):
                raise Invalid(f"expected a descriptor name or number, got {described(item)}")
            selector = str(item) if isinstance(item, int) else Text()(item)
            if selector.isascii() and selector.lstrip("-").isdigit():
                if int(selector) < LISTEN_FDS_START:
                    raise Invalid(f"descriptor {selector} is not an inherited socket (they start at fd 3)")
                selector = str(int(selector))
            elif not valid_fdname(selector):
                raise Invalid(f"invalid file descriptor name {show(selector)}")
            selectors.append(selector)
        return selectors

    def describe(self) -> str:
        return "LISTEN_FDNAMES names or fd numbers (3 and up)"


def _split(value: str) -> list[str]:
    import shlex  # here: a command given as one string is the rarer form (and `run` never has one)

    try:
        return shlex.split(value)
    except ValueError as exc:
        raise Invalid(f"cannot split {show(value)}: {exc}") from None


class Argv(Parser):
    """A command: an array of strings, or a string split as a shell would (quotes, backslashes)."""

    kind = "argv"
    metavar = "COMMAND"

    def __call__(self, value: Any) -> list[str]:
        if isinstance(value, str):
            argv = _split(text(value))
        elif isinstance(value, list):
            argv = [text(item, "an array of strings") for item in value]
        else:
            raise Invalid(f"expected an array of strings or a command line string, got {described(value)}")
        if not argv or not argv[0]:
            raise Invalid("empty command")
        return argv

    def describe(self) -> str:
        return "array of strings, or a command line"


def env_name(name: Any) -> str:
    """systemd's env_name_is_valid(): a shell variable name."""
    if not isinstance(name, str) or not ENV_NAME.fullmatch(name):
        raise Invalid(f"invalid variable name {show(name)}")
    return name


class Environment(Parser):
    """A table ``{ NAME = "value" }``, or systemd's ``"NAME=value"`` strings (an array, or one string split)."""

    kind = "environment"
    metavar = "NAME=VALUE"

    def __call__(self, value: Any) -> dict[str, str]:
        if isinstance(value, dict):
            return {env_name(name): self._value(name, val) for name, val in value.items()}
        if isinstance(value, str):
            items: list[Any] = _split(text(value))
        elif isinstance(value, list):
            items = value
        else:
            raise Invalid(f"expected a table of variables or an array of \"NAME=VALUE\", got {described(value)}")
        env: dict[str, str] = {}
        for item in items:
            if not isinstance(item, str) or "=" not in item:
                raise Invalid(f"expected \"NAME=VALUE\", got {show(item)}")
            name, _, val = item.partition("=")
            env[env_name(name)] = text(val)
        return env

    @staticmethod
    def _value(name: str, value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise Invalid(f"variable {name!r}: expected a string, got {described(value)}")
        return text(str(value))

    def describe(self) -> str:
        return "table of strings, or array of `NAME=VALUE`"


def bounded_usec(value: str) -> float | None:
    """Seconds from a count of microseconds a daemon sent (WATCHDOG_USEC=, EXTEND_TIMEOUT_USEC=).

    None when it is not a plain decimal number; at most TIME_MAX (a daemon may ask for more,
    but the loop waits no longer than that in one go, and the number must not overflow).
    """
    digits = value.strip()
    if not digits or len(digits) > 20 or not digits.isascii() or not digits.isdigit():
        return None
    return min(int(digits) / 1e6, TIME_MAX)


# ---------------------------------------------------------------- commands and the service's lifecycle
_COMMAND_FLAGS = {"ignore-failure": "ignore_failure", "expand-environment": "expand_environment",
                  "privileged": "privileged"}


class Exec(Parser):
    """One command: an argv array, a command line (split as a shell would), or a table
    ``{ argv = [...], path = "...", ignore-failure = true, expand-environment = true, privileged = true }``
    (what systemd's ``@``, ``-``, ``$VAR`` and ``+`` prefixes give)."""

    kind = "argv"
    metavar = "COMMAND"

    def __call__(self, value: Any):
        from .units import Command

        if not isinstance(value, dict):
            return Command(tuple(Argv()(value)))
        unknown = [key for key in value if key not in ("argv", "path", *_COMMAND_FLAGS)]
        if unknown:
            raise Invalid(f"unknown key {show(unknown[0])} in a command table (argv, path, "
                          f"{', '.join(_COMMAND_FLAGS)})")
        if "argv" not in value:
            raise Invalid("a command table needs argv")
        argv = value["argv"]
        if not isinstance(argv, list) or not argv:
            raise Invalid(f"argv: expected a non-empty array of strings, got {described(argv)}")
        flags = {attr: Bool()(value[key]) for key, attr in _COMMAND_FLAGS.items() if key in value}
        path = Text()(value["path"]) if "path" in value else None
        command = Command(tuple(text(item, "an array of strings") for item in argv), path, **flags)
        if not command.executable:
            raise Invalid("empty command")
        return command

    def describe(self) -> str:
        return "array of strings, a command line, or a table with argv"


class Commands(Parser):
    """Commands run one after the other: one command (as :class:`Exec` takes it) or an array of them; an array
    of strings only is one argv (as for exec-start), so several commands are arrays, tables or lines among them."""

    kind = "commands"
    metavar = "COMMAND"

    def __call__(self, value: Any) -> list:
        if isinstance(value, list) and any(isinstance(item, (list, dict)) for item in value):
            return [Exec()(item) for item in value]
        return [Exec()(value)]

    def describe(self) -> str:
        return "a command, or an array of commands (argv arrays, command lines or tables)"


EXIT_CODE_MAX = 255


class ExitStatuses(Parser):
    """Exit codes 0..255 and signal names: an array, a number, or a string of them separated by blanks."""

    kind = "exit-statuses"
    metavar = "STATUS"

    def __call__(self, value: Any):
        from . import signalapi as signal

        from .units import ExitStatuses as Statuses

        items = value.split() if isinstance(value, str) else value if isinstance(value, list) else [value]
        codes, signals = set(), set()
        for item in items:
            if isinstance(item, str) and _INTEGER.fullmatch(item):
                item = int(item)
            if isinstance(item, bool) or not isinstance(item, (int, str)):
                raise Invalid(f"expected exit codes and signal names, got {described(item)}")
            if isinstance(item, int):
                if not 0 <= item <= EXIT_CODE_MAX:
                    raise Invalid(f"exit code {show(item)} is out of range (0..{EXIT_CODE_MAX})")
                codes.add(item)
            else:
                name = text(item).upper()
                try:
                    signals.add(signal.number(name if name.startswith("SIG") else "SIG" + name))
                except KeyError:
                    raise Invalid(f"{show(item)} is neither an exit code nor a signal name") from None
        return Statuses(frozenset(codes), frozenset(signals))

    def describe(self) -> str:
        return f"exit codes 0..{EXIT_CODE_MAX} and signal names"


PATH_MAX = 4096


class Directories(Paths):
    """Paths relative to the directory of their kind (/run for runtime-directory, ...): no ``..``, not absolute."""

    kind = "directories"

    def check(self, entry: str) -> None:
        parts = entry.split("/")
        if not entry or entry.startswith("/") or len(entry) > PATH_MAX or any(p in ("", ".", "..") for p in parts):
            raise Invalid(f"invalid directory {show(entry)}: a relative path without '.', '..' or empty parts")

    def describe(self) -> str:
        return "relative paths (a string or an array)"


class Preserve(Parser):
    """runtime-directory-preserve: true or false (or "yes", "no"), or "restart"."""

    kind = "choice"
    choices = ("no", "yes", "restart")

    def __call__(self, value: Any) -> str:
        if isinstance(value, bool):
            return "yes" if value else "no"
        return Choice(self.choices)(value)

    def describe(self) -> str:
        return "boolean, or `restart`"


class Conditions(Parser):
    """Absolute paths (or glob patterns) a condition is checked on; ``!PATH`` negates, ``|PATH`` triggers."""

    kind = "conditions"
    metavar = "PATH"

    def __init__(self, condition: str, assertion: bool):
        self.condition, self.assertion = condition, assertion

    def __call__(self, value: Any) -> list:
        from .units import Condition

        result = []
        for item in strings(value):
            path = item
            trigger = path.startswith("|")
            path = path[1:] if trigger else path
            negate = path.startswith("!")
            path = path[1:] if negate else path
            if not path.startswith("/") or len(path) > PATH_MAX:
                raise Invalid(f"invalid path {show(item)}: expected an absolute path, optionally after | and !")
            result.append(Condition(self.condition, path, negate, trigger, self.assertion))
        return result

    def describe(self) -> str:
        return "absolute paths (a string or an array); `!PATH` negates, `|PATH` triggers"


_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_UNIT_NAME_CHARS = _NAME_CHARS | {".", "@"}


def is_unit_name(name: str) -> bool:
    """A unit's name: 1 to 255 ASCII letters, digits, '_', '.', '@' and '-' (a set, not a pattern: every
    start-up asks, and re need not be imported for it)."""
    return 0 < len(name) <= 255 and _UNIT_NAME_CHARS.issuperset(name)


def is_plain_key(key: str) -> bool:
    """A key messages show as it is: 1 to 64 ASCII letters, digits, '_' and '-'."""
    return 0 < len(key) <= 64 and _NAME_CHARS.issuperset(key)


class UnitNames(Parser):
    """Names of other units loaded together (requires, after, ...)."""

    kind = "units"
    metavar = "UNIT"

    def __call__(self, value: Any) -> list[str]:
        names = strings(value)
        for name in names:
            if not is_unit_name(name):
                raise Invalid(f"invalid unit name {show(name)}")
        return list(dict.fromkeys(names))

    def describe(self) -> str:
        return "unit names (a string or an array)"


RLIM_INFINITY = -1  # what resource.setrlimit() takes for RLIM_INFINITY
RLIMIT_MAX = 2**63 - 1
_LIMIT_UNITS = {"bytes": "a size (K, M, G, ...)", "count": "a number", "seconds": "a time span",
                "usec": "a time span", "nice": "a nice level +N or -N, or 0..40"}


class Limit(Parser):
    """A resource limit (setrlimit): ``N``, ``infinity`` or ``SOFT:HARD``, in the resource's own unit.
    Returns ``{resource: (soft, hard)}`` (-1: infinity), so that every limit-* key adds to one table."""

    kind = "limit"
    metavar = "LIMIT"

    def __init__(self, resource: int, unit: str):
        self.resource, self.unit = resource, unit

    def __call__(self, value: Any) -> dict[int, tuple[int, int]]:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise Invalid(f"expected a limit such as 1024, \"infinity\" or \"1024:4096\", got {described(value)}")
        parts = text(value).split(":") if isinstance(value, str) else [value]
        if len(parts) > 2:
            raise Invalid(f"invalid limit {show(value)}: expected N, infinity or SOFT:HARD")
        soft, hard = (self._one(parts[0]), self._one(parts[-1]))
        if hard != RLIM_INFINITY and (soft == RLIM_INFINITY or soft > hard):
            raise Invalid(f"invalid limit {show(value)}: the soft limit is above the hard one")
        return {self.resource: (soft, hard)}

    def _one(self, part: Any) -> int:
        if isinstance(part, str) and part.strip() == "infinity":
            return RLIM_INFINITY
        try:
            number = self._number(part)
        except Invalid as exc:
            raise Invalid(f"invalid limit {show(part)}: expected {_LIMIT_UNITS[self.unit]} or infinity "
                          f"({exc})") from None
        if not 0 <= number <= RLIMIT_MAX:
            raise Invalid(f"limit {show(part)} is out of range (0..{RLIMIT_MAX}, or infinity)")
        return number

    def _number(self, part: Any) -> int:
        if isinstance(part, int):
            return part
        if self.unit == "bytes":
            return Size(0, RLIMIT_MAX)(part)
        if self.unit in ("seconds", "usec"):
            import math  # here: a limit in time units is rare (see parse_timespan)

            seconds = parse_timespan(part)
            return math.ceil(seconds * (1e6 if self.unit == "usec" else 1))
        if self.unit == "nice" and part.strip()[:1] in "+-" and _INTEGER.fullmatch(part):
            level = int(part)
            if not -20 <= level <= 19:
                raise Invalid("a nice level is -20..19")
            return 20 - level  # RLIMIT_NICE is 20 - the lowest nice level allowed
        if _INTEGER.fullmatch(part):
            return int(part)
        raise Invalid("not a number")

    def describe(self) -> str:
        return f"{_LIMIT_UNITS[self.unit]}, `infinity`, or `SOFT:HARD`"
