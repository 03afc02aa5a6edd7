"""systemd's own unit files (``*.socket`` and ``*.service``) as activator units.

activator reads a socket unit and the service it activates and translates them
into the document that activator's TOML loader takes: ``{unit: {"description":
..., "socket": {...} or [{...}, ...], "service": {...}}}`` with the TOML
kebab-case keys and values as a TOML user writes them. Values are not
validated here: that is the one settings model's job, so bounds and messages
are the same for both formats. What this module does is systemd's syntax
(systemd.syntax(7), systemd.unit(5)) and the mapping of each directive:

* lines, comments, continuations, sections, repeated directives, an empty
  assignment resetting a directive; unit names, templates and instances;
  drop-ins (``NAME.d/*.conf``); specifiers (``%i``, ``%n``, ``%t``, ...);
* ``ExecStart=`` and friends split with systemd's quoting rules, with the
  prefixes ``-@:+!`` (:class:`Command`); ``$VAR`` and ``${VAR}`` are kept and
  expanded when the command starts (:func:`expand_argv`), as systemd does;
* every directive classified (:data:`RULES`): supported (a TOML key),
  a dependency (kept among the units loaded together), ignored quietly
  (meaningless without systemd) or unsupported (reported: what happens
  instead).

Entry points: :func:`load_unit_files` (paths to a document plus warnings),
:func:`to_toml` (the document as TOML, for ``activator convert``),
:func:`parse_unit_text` (the syntax layer) and :func:`expand_argv`.
"""
from __future__ import annotations

import functools
import grp
import os
import platform
import pwd
import re
from . import socketapi as socket
import stat
from typing import Any, Callable, Iterator, Mapping, NamedTuple

from .records import dataclass, field

LONG_LINE_MAX = 1024 * 1024  # systemd's limit for a line, continuations included
MAX_FILE_SIZE = 4 * 1024 * 1024  # ours (systemd has none): bounds the memory a hostile file can take
MAX_DROPINS = 256  # per unit; more is an error rather than minutes of parsing
WHITESPACE = " \t\n\r"
COMMENTS = "#;"
BOM = "\ufeff"
UNIT_TYPES = ("socket", "service")
SECTIONS = {"socket": ("Unit", "Socket", "Install"), "service": ("Unit", "Service", "Install")}
# Unit types that mean nothing without systemd: references to them are dropped quietly.
SYSTEMD_ONLY_TYPES = ("target", "slice", "mount", "automount", "swap", "device", "path", "timer", "scope")

SUPPORTED, IGNORED, UNSUPPORTED, DEPENDENCY = "supported", "ignored", "unsupported", "dependency"
# Diagnostic kinds; --strict turns all but NOTE into errors.
UNKNOWN, SYNTAX, NOTE = "unknown", "syntax", "note"


class UnitFileError(Exception):
    """The unit files cannot be used; ``messages`` has one line per problem, every problem found."""

    def __init__(self, messages: list[str]):
        super().__init__("\n".join(messages))
        self.messages = messages


class _Problem(ValueError):
    """A value that systemd itself would refuse; the message says why (the caller adds where)."""


@dataclass(frozen=True)
class Diagnostic:
    """A warning about a unit file: ``str()`` is the one line shown to the user."""

    path: str
    message: str
    section: str = ""
    key: str = ""
    kind: str = NOTE

    def __str__(self) -> str:
        if not self.key:
            return f"{self.path}: {self.message}"
        separator = " " if self.kind == UNSUPPORTED else ": "
        return f"{self.path}: [{self.section}] {self.key}={separator}{self.message}"


# ====================================================================== syntax
@dataclass(frozen=True)
class Assignment:
    """One ``Key=value`` line (continuations joined), in its section."""

    section: str
    key: str
    value: str
    path: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}: [{self.section}] {self.key}="


def _physical_lines(text: str) -> list[str]:
    # systemd's read_line(): \n, \r, \r\n and \n\r each end a line; nothing after the last break is a line.
    lines = re.split(r"\r\n|\n\r|\n|\r", text)
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _ends_escaped(line: str) -> bool:
    """A line continues when it ends in an odd number of backslashes (the last one escapes the newline)."""
    return (len(line) - len(line.rstrip("\\"))) % 2 == 1


def parse_unit_text(text: str, path: str) -> tuple[list[Assignment], list[Diagnostic]]:
    """The assignments of a unit file or drop-in, in order, with systemd's syntax rules.

    Lines whose first non-blank character is ``#`` or ``;`` are comments, also inside a
    continuation; a line ending in a backslash continues on the next one (the backslash
    becomes a space); ``[Section]`` headers; keys and values are stripped. What systemd
    ignores with a warning (no ``=``, an assignment before any section) comes back as a
    warning; what systemd refuses (a bad section header, a NUL, an overlong line) raises
    :class:`UnitFileError`.
    """
    assignments: list[Assignment] = []
    warnings: list[Diagnostic] = []
    section: str | None = None
    pieces: list[str] = []  # the lines of a continuation so far (kept apart: joining each time is quadratic)
    size = start = 0
    bom_seen = False
    for number, raw in enumerate(_physical_lines(text), 1):
        if len(raw) > LONG_LINE_MAX:
            raise UnitFileError([f"{path}: line {number}: line too long (more than {LONG_LINE_MAX} bytes)"])
        if "\0" in raw:
            raise UnitFileError([f"{path}: line {number}: contains a NUL byte"])
        stripped = raw.lstrip(WHITESPACE)
        if stripped and stripped[0] in COMMENTS:
            continue
        line = raw
        if not bom_seen and line.startswith(BOM):
            line, bom_seen = line[1:], True
        if not pieces:
            start = number
        size += len(line)
        if size > LONG_LINE_MAX:
            raise UnitFileError([f"{path}: line {number}: continued line too long (more than {LONG_LINE_MAX} bytes)"])
        # The piece before ends in the space that replaced its backslash, so escapes start afresh here.
        if _ends_escaped(line):
            pieces.append(line[:-1] + " ")
            continue
        section = _parse_line("".join(pieces) + line, path, start, section, assignments, warnings)
        pieces, size = [], 0
    if pieces:
        _parse_line("".join(pieces), path, start, section, assignments, warnings)
    return assignments, warnings


def _parse_line(line: str, path: str, number: int, section: str | None,
                assignments: list[Assignment], warnings: list[Diagnostic]) -> str | None:
    """Parse one logical line; returns the section in force after it."""
    line = line.strip(WHITESPACE)
    if not line:
        return section
    if line[0] == "[":
        if line[-1] != "]":
            raise UnitFileError([f"{path}: line {number}: invalid section header {line!r}"])
        name = line[1:-1]
        if not _string_is_safe(name):
            raise UnitFileError([f"{path}: line {number}: bad characters in section header {line!r}"])
        return name
    if section is None:
        warnings.append(Diagnostic(path, f"line {number}: assignment outside of a section: ignored", kind=SYNTAX))
        return section
    key, equals, value = line.partition("=")
    if not equals:
        warnings.append(Diagnostic(path, f"line {number}: missing '=': line ignored", kind=SYNTAX))
    elif not key.strip(WHITESPACE):
        warnings.append(Diagnostic(path, f"line {number}: missing key name before '=': line ignored", kind=SYNTAX))
    else:
        assignments.append(Assignment(section, key.strip(WHITESPACE), value.strip(WHITESPACE), path, number))
    return section


def _string_is_safe(text: str) -> bool:
    return not any(c < " " or c == "\x7f" or c in "\"'\\" for c in text)


def _read_text(path: str) -> str:
    """A unit file's text; UnitFileError for anything but a readable regular UTF-8 file of sane size."""
    try:
        # O_NONBLOCK: a FIFO named like a unit must not hang us; it is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise UnitFileError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    with os.fdopen(fd, "rb") as f:
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UnitFileError([f"{path}: not a regular file"])
            data = f.read(MAX_FILE_SIZE + 1)
        except OSError as exc:
            raise UnitFileError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    if len(data) > MAX_FILE_SIZE:
        raise UnitFileError([f"{path}: too large (more than {MAX_FILE_SIZE // (1024 * 1024)} MiB)"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UnitFileError([f"{path}: line {line}: not valid UTF-8"]) from None


# ====================================================================== words and escapes
_C_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92, '"': 34, "'": 39, "s": 32}
_HEX = frozenset("0123456789abcdefABCDEF")


def _c_escape(text: str, pos: int) -> tuple[bytes, int] | None:
    """The C escape starting at text[pos] (just after a backslash): (bytes, length), None if invalid.

    systemd's set: \\a \\b \\f \\n \\r \\t \\v \\\\ \\" \\' \\s (space), \\xHH, \\uHHHH,
    \\UHHHHHHHH and \\ooo (octal); none of them may produce a NUL.
    """
    c = text[pos] if pos < len(text) else ""
    if c in _C_ESCAPES and c:
        return bytes([_C_ESCAPES[c]]), 1
    if c == "x":
        digits = text[pos + 1:pos + 3]
        if len(digits) == 2 and set(digits) <= _HEX and int(digits, 16):
            return bytes([int(digits, 16)]), 3
    elif c in ("u", "U"):
        n = 4 if c == "u" else 8
        digits = text[pos + 1:pos + 1 + n]
        if len(digits) == n and set(digits) <= _HEX:
            code = int(digits, 16)
            if 0 < code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF:
                return chr(code).encode(), n + 1
    elif c and c in "01234567":
        digits = text[pos:pos + 3]
        if len(digits) == 3 and set(digits) <= set("01234567") and 0 < int(digits, 8) <= 255:
            return bytes([int(digits, 8)]), 3
    return None


def _skip_blanks(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in WHITESPACE:
        pos += 1
    return pos


def _next_word(text: str, pos: int, cunescape: bool = True, lenient: bool = False) -> tuple[str | None, int, bool]:
    """One word of ``text`` from ``pos``, as systemd's extract_first_word() with EXTRACT_UNQUOTE.

    Quotes (anywhere in a word) group and are removed; a backslash escapes the next
    character, or with ``cunescape`` starts a C escape (an unknown one is kept verbatim,
    as systemd does after warning). ``lenient`` (EXTRACT_RELAX) accepts an unterminated
    quote and drops a trailing backslash. Returns (word or None at the end, the position
    of the next word, whether an unknown escape was kept). Raises _Problem.
    """
    pos = _skip_blanks(text, pos)
    if pos >= len(text):
        return None, len(text), False
    # Bytes, since \xHH makes a byte; a value from the environment may hold surrogate escapes.
    errors = "strict" if cunescape else "surrogateescape"
    out = bytearray()
    quote = ""
    kept = False
    while pos < len(text):
        c = text[pos]
        if c == "\\":
            piece, pos, unknown = _backslash(text, pos, cunescape, lenient, quote)
            out += piece
            kept = kept or unknown
            continue
        if quote and c == quote:
            quote = ""
        elif not quote and c in "'\"":
            quote = c
        elif not quote and c in WHITESPACE:
            break
        else:
            out += c.encode("utf-8", errors)
        pos += 1
    if quote and not lenient:
        raise _Problem("unbalanced quoting")
    try:
        word = out.decode("utf-8", errors)
    except UnicodeDecodeError:
        raise _Problem("escape sequences that do not make valid UTF-8") from None
    return word, _skip_blanks(text, pos), kept


def _backslash(text: str, pos: int, cunescape: bool, lenient: bool, quote: str) -> tuple[bytes, int, bool]:
    """What the backslash at text[pos] stands for: (bytes, the position after it, an unknown escape kept)."""
    if pos + 1 >= len(text):  # a trailing backslash
        if cunescape and not quote:
            return b"\\", pos + 1, True  # kept verbatim, as systemd does after warning
        if lenient:
            return b"", pos + 1, False
        raise _Problem("unbalanced quoting" if quote else "trailing backslash")
    if not cunescape:
        return text[pos + 1].encode("utf-8", "surrogateescape"), pos + 2, False
    escape = _c_escape(text, pos + 1)
    if escape is None:
        return text[pos:pos + 2].encode(), pos + 2, True
    return escape[0], pos + 1 + escape[1], False


def split_words(text: str, cunescape: bool = False, lenient: bool = False) -> list[str]:
    """All words of ``text`` (see :func:`_next_word`); raises ValueError on bad quoting."""
    words: list[str] = []
    pos = 0
    while True:
        word, pos, _ = _next_word(text, pos, cunescape, lenient)
        if word is None:
            return words
        words.append(word)


# ====================================================================== unit names
_UNIT_NAME = re.compile(r"(?P<prefix>[A-Za-z0-9:_.\\-]+)(?:@(?P<instance>[A-Za-z0-9:_.\\@-]*))?\."
                        r"(?P<type>[a-z]+)")
UNIT_NAME_MAX = 255


@dataclass(frozen=True)
class UnitName:
    """``prefix[@instance].type``; ``instance`` is None for a plain unit and "" for a template."""

    prefix: str
    instance: str | None
    type: str

    @classmethod
    def parse(cls, name: str) -> UnitName:
        m = _UNIT_NAME.fullmatch(name)
        if not m or len(name) > UNIT_NAME_MAX:
            raise ValueError(f"invalid unit name {name!r}")
        return cls(m.group("prefix"), m.group("instance"), m.group("type"))

    def __str__(self) -> str:
        middle = "" if self.instance is None else "@" + self.instance
        return f"{self.prefix}{middle}.{self.type}"

    @property
    def stem(self) -> str:
        """The name without its type suffix (``%N``)."""
        return str(self)[:-len(self.type) - 1]

    @property
    def is_template(self) -> bool:
        return self.instance == ""

    def template(self) -> UnitName:
        return UnitName(self.prefix, "", self.type)

    def with_type(self, unit_type: str) -> UnitName:
        return UnitName(self.prefix, self.instance, unit_type)


def _unescape_name(text: str) -> str:
    """systemd's unit_name_unescape(): ``-`` is ``/``, ``\\xHH`` a byte."""
    out = bytearray()
    pos = 0
    while pos < len(text):
        c = text[pos]
        if c == "-":
            out += b"/"
        elif c == "\\" and text[pos + 1:pos + 2] == "x" and len(text[pos + 2:pos + 4]) == 2 \
                and set(text[pos + 2:pos + 4]) <= _HEX:
            out.append(int(text[pos + 2:pos + 4], 16))
            pos += 3
        else:
            out += c.encode()
        pos += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise _Problem(f"{text!r} unescapes to invalid UTF-8") from None


def _unescape_path(text: str) -> str:
    return "/" if text in ("", "-") else "/" + _unescape_name(text)


# ====================================================================== specifiers
@dataclass
class Context:
    """What specifiers refer to: the unit whose file is read, and its main file (``%y``)."""

    unit: UnitName
    fragment: str
    # Accept=yes: the service is instantiated per connection, which activator does not name.
    per_connection: bool = False
    used_per_connection: set[str] = field(default_factory=set)


def _manager_is_system() -> bool:
    # activator as root plays systemd's system manager; otherwise a user manager.
    return os.geteuid() == 0


def _own_account(field: str, fallback: str) -> str:
    """A field of the passwd entry of activator's user (pw_dir, pw_shell, pw_name), or ``fallback``."""
    try:
        return str(getattr(pwd.getpwuid(os.geteuid()), field))
    except KeyError:
        return fallback


def _home() -> str:
    home = os.environ.get("HOME", "")
    if os.path.isabs(home) and ".." not in home.split("/"):  # systemd: absolute and normalized
        return home
    home = "/root" if os.geteuid() == 0 else _own_account("pw_dir", "")
    if not home:
        raise _Problem("%h: the home directory of activator's user is unknown")
    return home


def _shell() -> str:
    shell = os.environ.get("SHELL", "")
    if shell.startswith("/"):
        return shell
    return "/bin/sh" if os.geteuid() == 0 else _own_account("pw_shell", "/bin/sh")


def _user_name() -> str:
    return "root" if _manager_is_system() else _own_account("pw_name", str(os.geteuid()))


def _group_name() -> str:
    if _manager_is_system():
        return "root"
    try:
        return grp.getgrgid(os.getegid()).gr_name
    except KeyError:
        return str(os.getegid())


def _xdg(variable: str, fallback: str) -> str:
    value = os.environ.get(variable, "")
    return value if value.startswith("/") else os.path.join(_home(), fallback)


def _runtime_dir() -> str:
    if _manager_is_system():
        return "/run"
    value = os.environ.get("XDG_RUNTIME_DIR", "")
    if not value.startswith("/"):
        raise _Problem("%t: XDG_RUNTIME_DIR is not set (activator runs without root, as a user manager would)")
    return value


def _state_dir() -> str:
    return "/var/lib" if _manager_is_system() else _xdg("XDG_STATE_HOME", ".local/state")


def _temp_dir(default: str) -> str:
    for variable in ("TMPDIR", "TMP", "TEMP"):
        value = os.environ.get(variable, "")
        if value.startswith("/"):
            return value
    return default


@functools.lru_cache(maxsize=None)
def _read_first_line(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().strip()
    except OSError as exc:
        raise _Problem(f"{what} is unknown: cannot read {path}: {exc.strerror or exc}") from None


@functools.lru_cache(maxsize=None)
def _os_release() -> dict[str, str]:
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read(65536)
        except OSError:
            continue
        fields = {}
        for line in text.splitlines():
            name, equals, value = line.strip().partition("=")
            if equals and not name.startswith("#"):
                fields[name] = value.strip().strip("\"'")
        return fields
    return {}


@functools.lru_cache(maxsize=None)
def _pretty_hostname() -> str:
    try:
        with open("/etc/machine-info", encoding="utf-8", errors="replace") as f:
            for line in f.read(65536).splitlines():
                name, _, value = line.strip().partition("=")
                if name == "PRETTY_HOSTNAME" and value.strip("\"'"):
                    return value.strip("\"'")
    except OSError:
        pass
    return socket.gethostname().split(".")[0]


ARCHITECTURES = {
    "x86_64": "x86-64", "i386": "x86", "i486": "x86", "i586": "x86", "i686": "x86", "aarch64": "arm64",
    "aarch64_be": "arm64-be", "armv7l": "arm", "armv6l": "arm", "ppc64le": "ppc64-le", "ppc64": "ppc64",
    "ppc": "ppc", "s390x": "s390x", "s390": "s390", "riscv64": "riscv64", "loongarch64": "loongarch64",
    "mips64": "mips64", "sparc64": "sparc64", "alpha": "alpha", "ia64": "ia64", "m68k": "m68k",
}


def _per_connection(letter: str, resolve: Callable[[Context], str]) -> Callable[[Context], str]:
    """A specifier that names the instance: per connection for an Accept=yes service (noted in ctx)."""
    def specifier(ctx: Context) -> str:
        if ctx.per_connection:
            ctx.used_per_connection.add(letter)
        return resolve(ctx)
    return specifier


def _filename(ctx: Context) -> str:
    return _unescape_path(ctx.unit.instance if ctx.unit.instance else ctx.unit.prefix)


def _last_component(ctx: Context) -> str:
    return ctx.unit.prefix.rpartition("-")[2]


def _cgroup(ctx: Context) -> str:
    raise _Problem("cgroup specifiers (%c, %r, %R) are not supported: activator has no cgroups")


SPECIFIERS: dict[str, Callable[[Context], str]] = {
    "i": _per_connection("i", lambda ctx: ctx.unit.instance or ""),
    "I": _per_connection("I", lambda ctx: _unescape_name(ctx.unit.instance or "")),
    "n": _per_connection("n", lambda ctx: str(ctx.unit)),
    "N": _per_connection("N", lambda ctx: ctx.unit.stem),
    "f": _per_connection("f", _filename),
    "d": _per_connection("d", lambda ctx: os.path.join(_runtime_dir(), "credentials", str(ctx.unit))),
    "p": lambda ctx: ctx.unit.prefix,
    "P": lambda ctx: _unescape_name(ctx.unit.prefix),
    "j": _last_component,
    "J": lambda ctx: _unescape_name(_last_component(ctx)),
    "y": lambda ctx: os.path.realpath(ctx.fragment),
    "Y": lambda ctx: os.path.dirname(os.path.realpath(ctx.fragment)),
    "t": lambda ctx: _runtime_dir(),
    "S": lambda ctx: _state_dir(),
    "C": lambda ctx: "/var/cache" if _manager_is_system() else _xdg("XDG_CACHE_HOME", ".cache"),
    "L": lambda ctx: "/var/log" if _manager_is_system() else os.path.join(_state_dir(), "log"),
    "E": lambda ctx: "/etc" if _manager_is_system() else _xdg("XDG_CONFIG_HOME", ".config"),
    "T": lambda ctx: _temp_dir("/tmp"),
    "V": lambda ctx: _temp_dir("/var/tmp"),
    "h": lambda ctx: _home(),
    "s": lambda ctx: _shell(),
    "u": lambda ctx: _user_name(),
    "U": lambda ctx: "0" if _manager_is_system() else str(os.geteuid()),
    "g": lambda ctx: _group_name(),
    "G": lambda ctx: "0" if _manager_is_system() else str(os.getegid()),
    "H": lambda ctx: socket.gethostname(),
    "l": lambda ctx: socket.gethostname().split(".")[0],
    "q": lambda ctx: _pretty_hostname(),
    "m": lambda ctx: _read_first_line("/etc/machine-id", "%m (the machine ID)"),
    "b": lambda ctx: _read_first_line("/proc/sys/kernel/random/boot_id", "%b (the boot ID)").replace("-", ""),
    "v": lambda ctx: os.uname().release,
    "a": lambda ctx: ARCHITECTURES.get(platform.machine(), platform.machine()),
    "o": lambda ctx: _os_release().get("ID", ""),
    "w": lambda ctx: _os_release().get("VERSION_ID", ""),
    "W": lambda ctx: _os_release().get("VARIANT_ID", ""),
    "B": lambda ctx: _os_release().get("BUILD_ID", ""),
    "M": lambda ctx: _os_release().get("IMAGE_ID", ""),
    "A": lambda ctx: _os_release().get("IMAGE_VERSION", ""),
    "c": _cgroup, "r": _cgroup, "R": _cgroup,
}
_SPECIFIER = re.compile(r"%(.?)", re.S)


def expand_specifiers(text: str, ctx: Context) -> str:
    """``text`` with systemd's specifiers replaced; ``%%`` is ``%``; an unknown one raises _Problem."""
    def one(m: re.Match[str]) -> str:
        letter = m.group(1)
        if letter in ("", "%"):  # a stray % at the very end stays, as in systemd
            return "%"
        resolve = SPECIFIERS.get(letter)
        if resolve is None:
            raise _Problem(f"unknown specifier %{letter} (write %% for a percent sign)")
        return resolve(ctx)

    return _SPECIFIER.sub(one, text)


# ====================================================================== commands
@dataclass(frozen=True)
class Command:
    """One command of ``ExecStart=`` and friends, as systemd.service(5) reads it.

    ``argv`` is the argument vector (``argv[0]`` included) with ``$VAR``/``${VAR}`` still
    in it; ``path`` is the executable when ``@`` gave ``argv[0]`` separately (otherwise
    ``argv[0]``). Prefixes: ``-`` ignore_failure (a failing exit counts as success);
    ``:`` no variable expansion; ``+`` and ``!`` privileged (run with activator's
    credentials, not ``User=``/``Group=``: without sandboxing the two mean the same);
    ``!!`` has no effect, as on any kernel with ambient capabilities.
    """

    argv: tuple[str, ...]
    path: str | None = None
    ignore_failure: bool = False
    expand_environment: bool = True
    privileged: bool = False

    def to_document(self) -> list[str] | dict[str, Any]:
        """A plain argv array when nothing else is needed, else a table for the engine."""
        expand = self.expand_environment and any("$" in word for word in self.argv)
        if self.path is None and not (self.ignore_failure or self.privileged or expand):
            return list(self.argv)
        doc: dict[str, Any] = {"argv": list(self.argv)}
        if self.path is not None:
            doc["path"] = self.path
        if self.ignore_failure:
            doc["ignore-failure"] = True
        if expand:
            doc["expand-environment"] = True
        if self.privileged:
            doc["privileged"] = True
        return doc


@dataclass
class _Prefixes:
    ignore: bool = False
    argv0: bool = False
    no_expand: bool = False
    full: bool = False  # +
    no_setuid: bool = False  # !
    ambient: bool = False  # !!

    def take(self, c: str) -> bool:
        """Consume one prefix character; False when it is not one (it starts the path)."""
        privileged = self.full or self.no_setuid or self.ambient
        if c == "-" and not self.ignore:
            self.ignore = True
        elif c == "@" and not self.argv0:
            self.argv0 = True
        elif c == ":" and not self.no_expand:
            self.no_expand = True
        elif c == "+" and not privileged:
            self.full = True
        elif c == "!" and not privileged:
            self.no_setuid = True
        elif c == "!" and not (self.full or self.ambient):
            self.no_setuid, self.ambient = False, True
        else:
            return False
        return True


def _check_executable(path: str) -> None:
    if not path:
        raise _Problem("empty path in command line")
    if not _string_is_safe(path):
        raise _Problem(f"executable name contains special characters: {path!r}")
    if path.endswith("/"):
        raise _Problem(f"executable path specifies a directory: {path}")
    if path.startswith("/"):
        valid = len(path.encode()) < 4096 and all(len(part.encode()) <= 255 for part in path.split("/"))
    else:
        valid = "/" not in path and path not in (".", "..") and len(path.encode()) <= 255
    if not valid:
        raise _Problem(f"neither a valid executable name nor an absolute path: {path}")


def parse_command_line(value: str, resolve: Callable[[str], str]) -> tuple[list[Command], list[str]]:
    """The commands of one ``Exec*=`` value (several when separated by a lone ``;``).

    ``resolve`` expands specifiers in each word. Returns (commands, warnings). A bad
    command raises _Problem, unless its ``-`` prefix says to ignore it (then it is
    dropped with a warning, as systemd does).
    """
    commands: list[Command] = []
    warnings: list[str] = []
    pos = 0
    while True:
        word, pos, kept = _next_word(value, pos)
        if kept:
            warnings.append("unknown escape sequences kept verbatim")
        if word is None:
            return commands, warnings
        if word == ";":
            continue
        prefixes = _Prefixes()
        i = 0
        while i < len(word) and prefixes.take(word[i]):
            i += 1
        try:
            command, pos, more = _command_rest(value, pos, word[i:], prefixes, resolve, warnings)
        except _Problem as exc:
            if not prefixes.ignore:
                raise
            warnings.append(f"{exc}: command ignored ('-' prefix)")
            return commands, warnings
        commands.append(command)
        if not more:
            return commands, warnings


def _command_rest(value: str, pos: int, first: str, prefixes: _Prefixes, resolve: Callable[[str], str],
                  warnings: list[str]) -> tuple[Command, int, bool]:
    """The executable and arguments after the first word's prefixes; (command, position, another follows)."""
    path = resolve(first)
    _check_executable(path)
    argv = [] if prefixes.argv0 else [path]
    more = False
    while pos < len(value):
        if value[pos] == ";" and (pos + 1 == len(value) or value[pos + 1] in WHITESPACE):
            pos, more = _skip_blanks(value, pos + 1), True
            break
        if value.startswith("\\;", pos) and (pos + 2 == len(value) or value[pos + 2] in WHITESPACE):
            argv.append(";")  # an escaped semicolon is an argument, not a separator
            pos = _skip_blanks(value, pos + 2)
            continue
        word, pos, kept = _next_word(value, pos)
        if kept:
            warnings.append("unknown escape sequences kept verbatim")
        if word is None:
            break
        argv.append(resolve(word))
    if not argv:
        raise _Problem("empty executable name or zeroeth argument")
    return Command(
        argv=tuple(argv), path=path if prefixes.argv0 else None, ignore_failure=prefixes.ignore,
        expand_environment=not prefixes.no_expand, privileged=prefixes.full or prefixes.no_setuid,
    ), pos, more


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BRACED = re.compile(r"\$\$|\$\{([^}]*)\}")


def expand_argv(argv: list[str] | tuple[str, ...], env: Mapping[str, str]) -> list[str]:
    """systemd's variable expansion of a command line, done when the command starts.

    A word that is exactly ``$NAME`` becomes the variable's value split at whitespace
    (quotes group, as in systemd), so zero or more words; ``${NAME}`` inside any word is
    replaced by the value as is; ``$$`` is ``$``. Unset or invalid names expand to
    nothing. ``env`` is the environment the command gets (for ``ExecReload=``, with
    ``MAINPID``).
    """
    out: list[str] = []
    for word in argv:
        if word.startswith("$") and word[1:2] not in ("{", "$"):
            name = word[1:]
            value = env.get(name) if _ENV_NAME.fullmatch(name) else None
            if value is not None:
                out.extend(split_words(value, cunescape=False, lenient=True))
            continue
        out.append(_BRACED.sub(lambda m: "$" if m.group(0) == "$$" else _braced(m.group(1), env), word))
    return out


def _braced(name: str, env: Mapping[str, str]) -> str:
    return env.get(name, "") if _ENV_NAME.fullmatch(name) else ""


# ====================================================================== the directive table
@dataclass(frozen=True)
class Rule:
    """How one directive maps: its class, the TOML key(s) it sets and how its value translates.

    shape: scalars (the last assignment counts) ``text`` (specifiers expanded), ``raw``,
    ``bool``, ``int``; lists (every assignment, an empty one resets) ``lines``,
    ``words``, ``exec``, ``env``, ``deps``; special ``type``, ``stdout``.
    ``note``: what happens instead (unsupported) or why it means nothing (ignored).
    ``default``: an unsupported directive set to this value (systemd's default, which
    is what activator does; ``|`` separates several) is not reported.
    """

    kind: str
    keys: tuple[str, ...] = ()
    shape: str = "text"
    note: str = ""
    default: str | None = None


LIST_SHAPES = ("lines", "words", "exec", "env", "deps", "listen")
SANDBOX = "the daemon runs without this sandboxing"
NO_CGROUP = "activator puts no daemon in a cgroup of its own: nothing is limited or accounted"
NO_ACTION = "no such action is taken"
NO_CHECK = "not checked: the unit runs as if the condition held"
JOURNAL = "output goes to activator's stdout and stderr (its log), not to a journal"
_STDOUT_ALIASES = ("journal", "syslog", "kmsg", "journal+console", "syslog+console", "kmsg+console")
SOCKET_EXEC = "applies to the socket unit's own commands, which activator does not run"


def _same(kind: str, names: str, **kw: Any) -> dict[str, Rule]:
    return {name: Rule(kind, **kw) for name in names.split()}


def _kebab(name: str) -> str:
    """ListenStream -> listen-stream, OOMScoreAdjust -> oom-score-adjust, LimitNOFILE -> limit-nofile."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "-", name).lower()


def _keyed(kind: str, names: str, shape: str = "text", **kw: Any) -> dict[str, Rule]:
    return {name: Rule(kind, (_kebab(name),), shape, **kw) for name in names.split()}


_PATH_CONDITIONS = ("PathExists PathExistsGlob PathIsDirectory PathIsSymbolicLink PathIsMountPoint PathIsReadWrite "
                    "PathIsEncrypted DirectoryNotEmpty FileNotEmpty FileIsExecutable").split()
_OTHER_CONDITIONS = ("Architecture Firmware Virtualization Host KernelCommandLine KernelVersion Credential "
                     "Environment Security Capability ACPower NeedsUpdate FirstBoot User Group "
                     "ControlGroupController Memory CPUs CPUFeature OSRelease MemoryPressure CPUPressure "
                     "IOPressure").split()
_DEPENDENCIES = {
    "Requires": ("requires",), "Wants": ("wants",), "After": ("after",), "Before": ("before",),
    "BindsTo": (), "Requisite": (), "PartOf": (), "Upholds": (), "Conflicts": (), "OnFailure": (), "OnSuccess": (),
    "PropagatesReloadTo": (), "ReloadPropagatedFrom": (), "PropagatesStopTo": (), "StopPropagatedFrom": (),
    "JoinsNamespaceOf": (),
}
# Dependencies whose target must exist for systemd to start the unit: a missing one is reported.
_HARD_DEPENDENCIES = ("Requires", "BindsTo", "Requisite")

UNIT_RULES: dict[str, Rule] = {
    "Description": Rule(SUPPORTED, ("description",)),
    **_same(IGNORED, "Documentation RequiresMountsFor OnFailureJobMode IgnoreOnIsolate StopWhenUnneeded "
                     "RefuseManualStart RefuseManualStop AllowIsolate DefaultDependencies CollectMode "
                     "JobTimeoutSec JobRunningTimeoutSec JobTimeoutAction JobTimeoutRebootArgument SourcePath "
                     "SurviveFinalKillSignal", note="means nothing without systemd's job engine"),
    "StartLimitIntervalSec": Rule(SUPPORTED, ("start-limit-interval-sec",), "raw"),
    "StartLimitBurst": Rule(SUPPORTED, ("start-limit-burst",), "int"),
    **_same(UNSUPPORTED, "StartLimitAction FailureAction SuccessAction FailureActionExitStatus "
                         "SuccessActionExitStatus RebootArgument", note=NO_ACTION, default="none"),
    **{name: Rule(DEPENDENCY, keys, "deps", note="not enforced: only Requires=, Wants=, After= and Before= "
                                                 "among the loaded units are") for name, keys in _DEPENDENCIES.items()},
    **{f"{what}{name}": Rule(SUPPORTED, (f"{what.lower()}-{_kebab(name)}",), "lines")
       for what in ("Condition", "Assert") for name in _PATH_CONDITIONS},
    **{f"{what}{name}": Rule(UNSUPPORTED, note=NO_CHECK) for what in ("Condition", "Assert")
       for name in _OTHER_CONDITIONS},
}
INSTALL_RULES = _same(IGNORED, "Alias WantedBy RequiredBy UpheldBy Also DefaultInstance",
                      note="installation (systemctl enable) means nothing without systemd")

_EXEC_CONTEXT = """WorkingDirectory RootDirectory RootImage RootImageOptions RootHash RootHashSignature RootVerity
MountAPIVFS ProtectProc ProcSubset BindPaths BindReadOnlyPaths MountImages ExtensionImages ExtensionDirectories
User Group DynamicUser SupplementaryGroups PAMName CapabilityBoundingSet AmbientCapabilities NoNewPrivileges
SecureBits SELinuxContext AppArmorProfile SmackProcessLabel UMask CoredumpFilter KeyringMode OOMScoreAdjust
TimerSlackNSec Personality IgnoreSIGPIPE Nice CPUSchedulingPolicy CPUSchedulingPriority CPUSchedulingResetOnFork
CPUAffinity NUMAPolicy NUMAMask IOSchedulingClass IOSchedulingPriority ProtectSystem ProtectHome RuntimeDirectory
StateDirectory CacheDirectory LogsDirectory ConfigurationDirectory RuntimeDirectoryMode StateDirectoryMode
CacheDirectoryMode LogsDirectoryMode ConfigurationDirectoryMode RuntimeDirectoryPreserve TimeoutCleanSec
ReadWritePaths ReadOnlyPaths InaccessiblePaths ExecPaths NoExecPaths TemporaryFileSystem PrivateTmp
PrivateDevices PrivateNetwork NetworkNamespacePath PrivateIPC IPCNamespacePath PrivateUsers ProtectHostname
ProtectClock ProtectKernelTunables ProtectKernelModules ProtectKernelLogs ProtectControlGroups
RestrictAddressFamilies RestrictFileSystems RestrictNamespaces LockPersonality MemoryDenyWriteExecute
RestrictRealtime RestrictSUIDSGID RemoveIPC PrivateMounts MountFlags SystemCallFilter SystemCallErrorNumber
SystemCallArchitectures SystemCallLog Environment EnvironmentFile PassEnvironment UnsetEnvironment StandardInput
StandardOutput StandardError StandardInputText StandardInputData LogLevelMax LogExtraFields
LogRateLimitIntervalSec LogRateLimitBurst LogFilterPatterns LogNamespace SyslogIdentifier SyslogFacility
SyslogLevel SyslogLevelPrefix TTYPath TTYReset TTYVHangup TTYRows TTYColumns TTYVTDisallocate LoadCredential
LoadCredentialEncrypted ImportCredential SetCredential SetCredentialEncrypted UtmpIdentifier UtmpMode
ExecSearchPath KillMode KillSignal RestartKillSignal SendSIGHUP SendSIGKILL FinalKillSignal WatchdogSignal""".split()
_RESOURCE_CONTROL = """CPUAccounting CPUWeight StartupCPUWeight CPUQuota CPUQuotaPeriodSec AllowedCPUs
StartupAllowedCPUs AllowedMemoryNodes StartupAllowedMemoryNodes MemoryAccounting MemoryMin MemoryLow MemoryHigh
MemoryMax MemorySwapMax MemoryZSwapMax TasksAccounting TasksMax IOAccounting IOWeight StartupIOWeight
IODeviceWeight IOReadBandwidthMax IOWriteBandwidthMax IOReadIOPSMax IOWriteIOPSMax IODeviceLatencyTargetSec
IPAccounting IPIngressFilterPath IPEgressFilterPath BPFProgram SocketBindAllow SocketBindDeny
RestrictNetworkInterfaces DeviceAllow DevicePolicy Slice Delegate DisableControllers ManagedOOMSwap
ManagedOOMMemoryPressure ManagedOOMMemoryPressureLimit ManagedOOMPreference CPUShares StartupCPUShares
MemoryLimit BlockIOAccounting BlockIOWeight StartupBlockIOWeight BlockIODeviceWeight BlockIOReadBandwidth
BlockIOWriteBandwidth""".split()
_LIMITS = ("CPU FSIZE DATA STACK CORE RSS NOFILE AS NPROC MEMLOCK LOCKS SIGPENDING MSGQUEUE NICE RTPRIO "
           "RTTIME").split()
_BOOLEAN_SANDBOX = """NoNewPrivileges PrivateTmp PrivateDevices PrivateNetwork PrivateIPC PrivateUsers
ProtectHostname ProtectClock ProtectKernelTunables ProtectKernelModules ProtectKernelLogs ProtectControlGroups
LockPersonality MemoryDenyWriteExecute RestrictRealtime RestrictSUIDSGID RemoveIPC PrivateMounts DynamicUser
MountAPIVFS""".split()

SERVICE_RULES: dict[str, Rule] = {
    # what the daemon is and how it runs
    "ExecStart": Rule(SUPPORTED, ("exec-start",), "exec"),
    **_keyed(SUPPORTED, "ExecStartPre ExecStartPost ExecCondition ExecReload", "exec"),
    "ExecStop": Rule(UNSUPPORTED, note="not run: a stop sends KillSignal= to the daemon"),
    "ExecStopPost": Rule(UNSUPPORTED, note="not run after the daemon stops"),
    "Environment": Rule(SUPPORTED, ("environment",), "env"),
    "EnvironmentFile": Rule(SUPPORTED, ("environment-file",), "lines"),
    "PassEnvironment": Rule(IGNORED, note="activator passes its whole environment to the daemon"),
    "UnsetEnvironment": Rule(UNSUPPORTED, note="the variables are passed to the daemon"),
    "WorkingDirectory": Rule(SUPPORTED, ("working-directory",)),
    "User": Rule(SUPPORTED, ("user",)),
    "Group": Rule(SUPPORTED, ("group",)),
    "SupplementaryGroups": Rule(SUPPORTED, ("supplementary-groups",), "words"),
    "UMask": Rule(SUPPORTED, ("umask",), "raw"),
    "Type": Rule(SUPPORTED, ("type",), "type"),
    "Restart": Rule(SUPPORTED, ("restart",), "raw"),
    **_keyed(SUPPORTED, "RestartSec TimeoutStartSec TimeoutStopSec WatchdogSec KillSignal KillMode", "raw"),
    "TimeoutSec": Rule(SUPPORTED, ("timeout-start-sec", "timeout-stop-sec"), "raw"),
    "StandardInput": Rule(SUPPORTED, ("standard-input",), "raw"),
    "StandardOutput": Rule(SUPPORTED, ("standard-output",), "stdout"),
    # A daemon's stderr is always activator's, which is what inherit, journal and the like come to.
    "StandardError": Rule(UNSUPPORTED, note="errors go to activator's stderr",
                          default="|".join(("inherit", *_STDOUT_ALIASES))),
    "FileDescriptorStoreMax": Rule(SUPPORTED, ("file-descriptor-store-max",), "int"),
    "StartLimitInterval": Rule(SUPPORTED, ("start-limit-interval-sec",), "raw"),
    "StartLimitBurst": Rule(SUPPORTED, ("start-limit-burst",), "int"),
    "Sockets": Rule(SUPPORTED, ("@sockets",), "words"),
    # the lifecycle around the daemon: commands, exit statuses, directories, process settings
    "NotifyAccess": Rule(SUPPORTED, ("notify-access",), "raw"),
    **_keyed(SUPPORTED, "RestartPreventExitStatus RestartForceExitStatus SuccessExitStatus", "words"),
    **_keyed(SUPPORTED, "RuntimeDirectory StateDirectory CacheDirectory LogsDirectory ConfigurationDirectory", "words"),
    **_keyed(SUPPORTED, "RuntimeDirectoryMode StateDirectoryMode CacheDirectoryMode LogsDirectoryMode "
                        "ConfigurationDirectoryMode", "raw"),
    "RuntimeDirectoryPreserve": Rule(SUPPORTED, ("runtime-directory-preserve",), "bool"),
    "OOMScoreAdjust": Rule(SUPPORTED, ("oom-score-adjust",), "int"),
    "Nice": Rule(SUPPORTED, ("nice",), "int"),
    **{f"Limit{name}": Rule(SUPPORTED, (f"limit-{name.lower()}",), "int") for name in _LIMITS},
    # what activator cannot do
    **_same(UNSUPPORTED, " ".join(_RESOURCE_CONTROL), note=NO_CGROUP, default="no"),
    "Delegate": Rule(UNSUPPORTED, note="the daemon gets no cgroup subtree of its own to manage", default="no"),
    "IPAddressAllow": Rule(UNSUPPORTED, note="the daemon's own traffic is not filtered (in the .socket unit, "
                                             "connections are)"),
    "IPAddressDeny": Rule(UNSUPPORTED, note="the daemon's own traffic is not filtered (in the .socket unit, "
                                            "connections are)"),
    **_same(UNSUPPORTED, " ".join(_BOOLEAN_SANDBOX), note=SANDBOX, default="no"),
    **_same(UNSUPPORTED, "RootDirectory RootImage RootImageOptions RootHash RootHashSignature RootVerity "
                         "BindPaths BindReadOnlyPaths MountImages ExtensionImages "
                         "ExtensionDirectories CapabilityBoundingSet AmbientCapabilities SecureBits SELinuxContext "
                         "AppArmorProfile SmackProcessLabel ReadWritePaths "
                         "ReadOnlyPaths InaccessiblePaths ExecPaths NoExecPaths TemporaryFileSystem "
                         "NetworkNamespacePath IPCNamespacePath RestrictAddressFamilies RestrictFileSystems "
                         "RestrictNamespaces MountFlags SystemCallFilter SystemCallErrorNumber "
                         "SystemCallArchitectures SystemCallLog Personality", note=SANDBOX),
    **_same(UNSUPPORTED, "ProtectSystem ProtectHome", note=SANDBOX, default="no"),
    "ProtectProc": Rule(UNSUPPORTED, note=SANDBOX, default="default"),
    "ProcSubset": Rule(UNSUPPORTED, note=SANDBOX, default="all"),
    "KeyringMode": Rule(UNSUPPORTED, note="the daemon shares activator's kernel keyring", default="private"),
    "RootDirectoryStartOnly": Rule(IGNORED, note="without RootDirectory= it has no effect"),
    "PAMName": Rule(UNSUPPORTED, note="no PAM session is opened"),
    **_same(UNSUPPORTED, "CPUSchedulingPolicy CPUSchedulingPriority CPUSchedulingResetOnFork CPUAffinity "
                         "NUMAPolicy NUMAMask IOSchedulingClass IOSchedulingPriority TimerSlackNSec CoredumpFilter",
            note="the daemon gets activator's scheduling and process settings"),
    "IgnoreSIGPIPE": Rule(UNSUPPORTED, note="the daemon gets activator's SIGPIPE disposition", default="yes"),
    **_same(IGNORED, "LogLevelMax LogExtraFields LogRateLimitIntervalSec LogRateLimitBurst LogFilterPatterns "
                     "LogNamespace SyslogIdentifier SyslogFacility SyslogLevel SyslogLevelPrefix", note=JOURNAL),
    **_same(UNSUPPORTED, "TTYPath TTYReset TTYVHangup TTYRows TTYColumns TTYVTDisallocate",
            note="no terminal is set up"),
    **_same(UNSUPPORTED, "StandardInputText StandardInputData", note="the daemon's stdin is /dev/null"),
    **_same(UNSUPPORTED, "LoadCredential LoadCredentialEncrypted ImportCredential SetCredential "
                         "SetCredentialEncrypted", note="no credentials are passed"),
    **_same(IGNORED, "UtmpIdentifier UtmpMode", note="no utmp records are written"),
    "ExecSearchPath": Rule(UNSUPPORTED, note="commands are looked up in $PATH"),
    "TimeoutCleanSec": Rule(IGNORED, note="only for systemctl clean"),
    "RestartKillSignal": Rule(UNSUPPORTED, note="a restart stops the daemon with KillSignal="),
    "SendSIGHUP": Rule(UNSUPPORTED, note="no SIGHUP is sent after the kill signal", default="no"),
    "SendSIGKILL": Rule(UNSUPPORTED, note="what is left after TimeoutStopSec= is killed", default="yes"),
    "FinalKillSignal": Rule(UNSUPPORTED, note="SIGKILL is the final signal", default="SIGKILL"),
    "WatchdogSignal": Rule(UNSUPPORTED, note="a watchdog timeout sends SIGABRT", default="SIGABRT"),
    "TimeoutAbortSec": Rule(UNSUPPORTED, note="a watchdog abort waits TimeoutStopSec="),
    **_same(UNSUPPORTED, "TimeoutStartFailureMode TimeoutStopFailureMode", note="the kill signal is sent",
            default="terminate"),
    **_same(UNSUPPORTED, "RuntimeMaxSec RuntimeRandomizedExtraSec", note="the daemon is not stopped after a time",
            default="infinity"),
    "RemainAfterExit": Rule(UNSUPPORTED, note="the service counts as stopped when its process exits",
                            default="no"),
    "GuessMainPID": Rule(IGNORED, note="only for Type=forking"),
    "PIDFile": Rule(UNSUPPORTED, note="not read: Type=forking is not supported"),
    "BusName": Rule(UNSUPPORTED, note="readiness on D-Bus is not watched"),
    "ExitType": Rule(UNSUPPORTED, note="the service ends when its main process exits", default="main"),
    "NonBlocking": Rule(UNSUPPORTED, note="the sockets are passed blocking", default="no"),
    "FileDescriptorStorePreserve": Rule(UNSUPPORTED, note="the descriptor store is kept until activator stops "
                                                          "or the unit is removed"),
    **_same(UNSUPPORTED, "RestartSteps RestartMaxDelaySec", note="every restart waits RestartSec="),
    "OOMPolicy": Rule(UNSUPPORTED, note="an OOM kill is handled like any other exit"),
    "OpenFile": Rule(UNSUPPORTED, note="no files are opened for the daemon"),
    "ReloadSignal": Rule(UNSUPPORTED, note="no reload signal is sent"),
    **_same(UNSUPPORTED, "USBFunctionDescriptors USBFunctionStrings", note="no USB function is set up"),
}

SOCKET_RULES: dict[str, Rule] = {
    # The socket's exec, kill and cgroup settings apply to its own commands (reported below).
    **_same(IGNORED, " ".join(_EXEC_CONTEXT + _RESOURCE_CONTROL), note=SOCKET_EXEC),
    # Every Listen*= is one list, in file order (the daemon's fd order); an empty one resets them all.
    **_same(SUPPORTED, "ListenStream ListenDatagram ListenSequentialPacket", keys=("@listen",), shape="listen"),
    **_keyed(SUPPORTED, "Accept ReusePort FreeBind KeepAlive NoDelay RemoveOnStop", "bool"),
    **_keyed(SUPPORTED, "Backlog MaxConnections MaxConnectionsPerSource TriggerLimitBurst ReceiveBuffer "
                        "SendBuffer", "int"),
    "BindIPv6Only": Rule(SUPPORTED, ("bind-ipv6-only",), "raw"),
    **_keyed(SUPPORTED, "SocketMode DirectoryMode TriggerLimitIntervalSec", "raw"),
    **_keyed(SUPPORTED, "FileDescriptorName SocketUser SocketGroup"),
    **_keyed(SUPPORTED, "IPAddressAllow IPAddressDeny", "words"),
    "Service": Rule(SUPPORTED, ("@service",)),
    **_same(UNSUPPORTED, "ListenFIFO ListenSpecial ListenNetlink ListenMessageQueue ListenUSBFunction",
            keys=("@listen",), shape="listen",
            note="not opened: activator passes stream, datagram and sequential-packet sockets only"),
    **_same(UNSUPPORTED, "Writable FlushPending PipeSize MessageQueueMaxMessages MessageQueueMessageSize",
            note="only for FIFOs, special files and message queues, which activator does not open"),
    "SocketProtocol": Rule(UNSUPPORTED, note="the socket uses the default protocol (TCP, UDP)"),
    "BindToDevice": Rule(UNSUPPORTED, note="the socket is not bound to a device"),
    **_same(UNSUPPORTED, "KeepAliveTimeSec KeepAliveIntervalSec KeepAliveProbes",
            note="the kernel's keep-alive settings are used"),
    "DeferAcceptSec": Rule(UNSUPPORTED, note="connections are accepted as soon as they are made", default="0"),
    **_same(UNSUPPORTED, "Priority IPTOS IPTTL Mark TCPCongestion Timestamping SELinuxContextFromNet SmackLabel "
                         "SmackLabelIPIn SmackLabelIPOut", note="the socket option is not set"),
    **_same(UNSUPPORTED, "Transparent Broadcast PassCredentials PassSecurity PassPacketInfo",
            note="the socket option is not set", default="no"),
    "Symlinks": Rule(UNSUPPORTED, note="no symlinks to the socket are created"),
    **_same(UNSUPPORTED, "ExecStartPre ExecStartPost ExecStopPre ExecStopPost",
            note="the socket unit's commands are not run"),
    "TimeoutSec": Rule(IGNORED, note="the socket unit runs no commands"),
    **_same(UNSUPPORTED, "PollLimitIntervalSec PollLimitBurst", note="not applied: only TriggerLimit*= is"),
}

RULES: dict[str, dict[str, Rule]] = {
    "Unit": UNIT_RULES, "Install": INSTALL_RULES, "Socket": SOCKET_RULES, "Service": SERVICE_RULES,
}


def classify(section: str, key: str) -> Rule | None:
    """The rule for ``[section] key=``; None for a directive unknown to activator."""
    return RULES.get(section, {}).get(key)


# ====================================================================== value translation
_TRUE = ("1", "yes", "y", "true", "t", "on")
_FALSE = ("0", "no", "n", "false", "f", "off")


def systemd_bool(text: str) -> bool | None:
    lowered = text.strip().lower()
    return True if lowered in _TRUE else False if lowered in _FALSE else None


def _int_or_text(text: str) -> int | str:
    # A plain decimal number becomes a TOML integer; anything else is left for the settings model.
    return int(text) if re.fullmatch(r"-?[0-9]{1,18}", text) else text


_TYPE_NOTES = {
    "dbus": ("simple", "not supported with 'dbus': readiness on D-Bus is not watched; started like Type=simple"),
    "notify-reload": ("notify", "not supported with 'notify-reload': reloads send no signal; run as Type=notify"),
    "idle": ("simple", None),  # idle only delays the start until systemd's jobs are done
}


@dataclass
class _Translation:
    """The state of one translation: where values came from, and the warnings found."""

    ctx: Context
    resolve_unit: Callable[[str], str | None]
    own: set[str]  # the systemd names that belong to this activator unit
    warnings: list[Diagnostic]

    def warn(self, a: Assignment, message: str, kind: str = UNSUPPORTED) -> None:
        self.warnings.append(Diagnostic(a.path, message, a.section, a.key, kind))

    def printf(self, a: Assignment, text: str) -> str:
        value = expand_specifiers(text, self.ctx)
        try:
            value.encode()
        except UnicodeEncodeError:  # %y or %h of a path that is not UTF-8: TOML cannot hold it
            raise _Problem(f"specifiers give a value that is not valid UTF-8: {value!r}") from None
        if self.ctx.used_per_connection:
            letters = ", ".join(f"%{c}" for c in sorted(self.ctx.used_per_connection))
            self.ctx.used_per_connection.clear()
            self.warn(a, f"not supported with {letters}: an Accept=yes service is named after each connection "
                         "in systemd; activator expands it with an empty instance (the peer is in $REMOTE_ADDR "
                         "and $REMOTE_PORT)")
        return value


def _translate_scalar(shape: str, a: Assignment, t: _Translation) -> Any:
    if shape == "text":
        return t.printf(a, a.value)
    if shape == "bool":
        flag = systemd_bool(a.value)
        return a.value if flag is None else flag
    if shape == "int":
        return _int_or_text(a.value)
    if shape == "type":
        value, note = _TYPE_NOTES.get(a.value, (a.value, None))
        if note:
            t.warn(a, note)
        return value
    if shape == "stdout":
        return _stdout(a, t)
    return a.value  # raw


def _stdout(a: Assignment, t: _Translation) -> str:
    if a.value in _STDOUT_ALIASES:
        return "journal"
    if a.value in ("inherit", "null", "socket"):
        return a.value
    t.warn(a, f"not supported with {a.value!r}: output goes to activator's stdout")
    return "journal"


def _translate_list(shape: str, items: list[Assignment], t: _Translation, key: str) -> Any:
    if shape == "lines":
        return [t.printf(a, a.value) for a in items]
    if shape == "words":
        return [t.printf(a, word) for a in items for word in split_words(a.value)]
    if shape == "env":
        return [pair for a in items for pair in _environment(a, t)]
    if shape == "exec":
        return _commands(items, t, key)
    return _dependencies(items, t, key)


def _environment(a: Assignment, t: _Translation) -> list[str]:
    try:
        words = split_words(a.value, cunescape=True)
    except _Problem as exc:
        t.warn(a, f"{exc}: line ignored, as systemd does", SYNTAX)
        return []
    pairs = []
    for word in words:
        pair = t.printf(a, word)
        name, equals, _ = pair.partition("=")
        if not equals or not _ENV_NAME.fullmatch(name):
            t.warn(a, f"invalid assignment {pair!r}: ignored, as systemd does", SYNTAX)
            continue
        pairs.append(pair)
    return pairs


def _commands(items: list[Assignment], t: _Translation, key: str) -> Any:
    result: list[Any] = []
    for a in items:
        commands, warnings = parse_command_line(a.value, functools.partial(t.printf, a))
        for message in warnings:
            t.warn(a, message, SYNTAX)
        result.extend(command.to_document() for command in commands)
    if key != "exec-start":
        return result
    if len(result) > 1:
        raise _Problem(f"{len(result)} commands: only Type=oneshot takes several, and activator does not run "
                       "oneshot services")
    return result[0] if result else None


def _dependencies(items: list[Assignment], t: _Translation, key: str) -> list[str] | None:
    """The activator units a dependency names; references to units not loaded are dropped."""
    names: list[str] = []
    for a in items:
        for word in split_words(a.value):
            name = t.printf(a, word)
            target = t.resolve_unit(name)
            if name in t.own:
                continue
            if target is None:
                _missing_dependency(a, name, t)
            elif t.ctx.unit.type == "socket":
                t.warn(a, f"not supported ({name}): every socket is opened at start, all together")
            elif key.startswith("!"):
                t.warn(a, f"not supported ({name}): {RULES[a.section][a.key].note}")
            elif target not in names:
                names.append(target)
    return names or None


def _missing_dependency(a: Assignment, name: str, t: _Translation) -> None:
    """Ordering against a unit that is not loaded means nothing, as in systemd; requiring one is reported."""
    try:
        unit_type = UnitName.parse(name).type
    except ValueError:
        t.warn(a, f"invalid unit name {name!r}: ignored, as systemd does", SYNTAX)
        return
    if a.key in _HARD_DEPENDENCIES and unit_type not in SYSTEMD_ONLY_TYPES:
        t.warn(a, f"not supported ({name} is not among the loaded units): ignored, where systemd would not "
                  "start without it")


# ====================================================================== one unit file with its drop-ins
@dataclass
class _Entry:
    """The assignments that make one TOML key's value (for a scalar, the last one)."""

    rule: Rule
    items: list[Assignment]


@dataclass
class _UnitFile:
    name: UnitName
    fragment: str
    files: list[str]
    entries: dict[str, _Entry]
    ctx: Context

    def raw(self, key: str) -> str | None:
        entry = self.entries.get(key)
        return entry.items[-1].value if entry else None

    @property
    def accept(self) -> bool:
        return systemd_bool(self.raw("accept") or "") is True


def _apply(unit_type: str, assignments: list[Assignment], warnings: list[Diagnostic]) -> dict[str, _Entry]:
    """The directives after resets, by TOML key, processed in file order as systemd does."""
    entries: dict[str, _Entry] = {}
    reported: set[tuple[str, str, str]] = set()
    for a in assignments:
        rule = _rule_for(unit_type, a, reported, warnings)
        if rule is None or rule.kind == IGNORED:
            continue
        if a.value == "" and a.key.startswith(("Condition", "Assert")):
            # An empty condition resets every condition of the unit, of any kind (systemd.unit(5)).
            prefix = a.key[:9] if a.key.startswith("Condition") else a.key[:6]
            for key in [k for k in entries if k.startswith((prefix.lower() + "-", "!" + prefix))]:
                del entries[key]
            continue
        for key in rule.keys or (f"!{a.key}",):
            if a.value == "":
                entries.pop(key, None)
            elif rule.shape in LIST_SHAPES:
                entries.setdefault(key, _Entry(rule, [])).items.append(a)
            else:
                entries[key] = _Entry(rule, [a])
    return entries


def _rule_for(unit_type: str, a: Assignment, reported: set[tuple[str, str, str]],
              warnings: list[Diagnostic]) -> Rule | None:
    if a.section not in SECTIONS[unit_type]:
        if not a.section.startswith("X-") and (a.path, a.section, "") not in reported:
            reported.add((a.path, a.section, ""))
            warnings.append(Diagnostic(a.path, f"unknown section [{a.section}] in a .{unit_type} unit: ignored",
                                       kind=UNKNOWN))
        return None
    rule = classify(a.section, a.key)
    if rule is None and not a.key.startswith("X-") and (a.path, a.section, a.key) not in reported:
        reported.add((a.path, a.section, a.key))
        warnings.append(Diagnostic(a.path, "unknown directive: ignored, as systemd does", a.section, a.key,
                                   UNKNOWN))
    return rule


def _unsupported(entries: dict[str, _Entry], warnings: list[Diagnostic]) -> None:
    """Report each unsupported directive that survived the resets and is not set to its default."""
    for key, entry in entries.items():
        rule, a = entry.rule, entry.items[-1]
        if key == "@listen" or rule.kind != UNSUPPORTED or _is_default(rule, a.value):
            continue
        warnings.append(Diagnostic(a.path, f"not supported: {rule.note}", a.section, a.key, UNSUPPORTED))


def _is_default(rule: Rule, value: str) -> bool:
    if rule.default is None:
        return False
    flag, default = systemd_bool(value), systemd_bool(rule.default)
    if flag is not None and default is not None:
        return flag == default
    return value.strip().lower() in rule.default.lower().split("|")


# ====================================================================== finding files
@dataclass
class _Catalog:
    """The unit files named and the directories searched, in priority order (first wins)."""

    dirs: list[str] = field(default_factory=list)
    named: dict[str, str] = field(default_factory=dict)  # unit name -> file the user named
    roots: list[str] = field(default_factory=list)  # socket units to run
    scanned_services: dict[str, str] = field(default_factory=dict)  # services found in directories
    errors: list[str] = field(default_factory=list)

    def add_dir(self, path: str) -> None:
        if all(os.path.realpath(d) != os.path.realpath(path) for d in self.dirs):
            self.dirs.append(path)

    def find(self, name: str) -> str | None:
        """The file of a unit name: one the user named, else the first in the search directories."""
        if name in self.named:
            return self.named[name]
        for directory in self.dirs:
            path = os.path.join(directory, name)
            if os.path.lexists(path):
                return path
        return None

    def dropins(self, name: UnitName) -> list[str]:
        """``*.conf`` of every drop-in directory of the unit, sorted by file name; a name met twice
        counts once, from the directory that comes first (systemd.unit(5))."""
        chosen: dict[str, str] = {}
        for directory in self.dirs:
            for candidate in _dropin_names(name):
                _collect_conf(os.path.join(directory, candidate + ".d"), chosen)
        for directory in self.dirs:
            _collect_conf(os.path.join(directory, name.type + ".d"), chosen)  # e.g. service.d/: every service
        if len(chosen) > MAX_DROPINS:
            raise UnitFileError([f"{name}: more than {MAX_DROPINS} drop-in files"])
        return [chosen[base] for base in sorted(chosen)]


def _collect_conf(directory: str, chosen: dict[str, str]) -> None:
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        raise UnitFileError([f"{directory}: cannot list drop-ins: {exc.strerror or exc}"]) from None
    for base in names:
        if base.endswith(".conf") and not base.startswith(".") and base not in chosen:
            chosen[base] = os.path.join(directory, base)


def _dropin_names(name: UnitName) -> list[str]:
    """foo-bar@x.service: itself, its template, then the dash prefixes (foo-@x.service, foo-@.service)."""
    names = [str(name)]
    if name.instance:
        names += [n for n in _dropin_names(name.template()) if n not in names]
    prefix = _shorter_prefix(name.prefix)
    if prefix:
        names += [n for n in _dropin_names(UnitName(prefix, name.instance, name.type)) if n not in names]
    return names


def _shorter_prefix(prefix: str) -> str | None:
    """foo-bar-baz -> foo-bar-, foo-bar- -> foo-, foo -> None (systemd's drop-in hierarchy)."""
    stem = prefix[:-1] if prefix.endswith("-") else prefix
    dash = stem.rfind("-")
    return stem[:dash + 1] if dash > 0 else None


def _is_masked(path: str) -> bool:
    """systemd's masked unit: a link to /dev/null, or an empty regular file."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return os.path.realpath(path) == "/dev/null" or stat.S_ISREG(st.st_mode) and st.st_size == 0


def _unit_name_of(path: str) -> UnitName | None:
    try:
        name = UnitName.parse(os.path.basename(path))
    except ValueError:
        return None
    return name if name.type in UNIT_TYPES else None


def _catalog(paths: list[str]) -> _Catalog:
    catalog = _Catalog()
    for path in paths:
        if os.path.isdir(path):
            catalog.add_dir(path)
            _scan(catalog, path)
            continue
        name = _unit_name_of(path)
        if name is None:
            catalog.errors.append(f"{path}: not a .socket or .service unit file")
            continue
        if name.is_template:
            catalog.errors.append(f"{path}: a template runs only as an instance: name one, such as "
                                  f"{name.prefix}@NAME.{name.type}")
            continue
        catalog.add_dir(os.path.dirname(path) or ".")
        if os.path.lexists(path):
            catalog.named.setdefault(str(name), path)
        elif not (name.instance and os.path.lexists(os.path.join(os.path.dirname(path), str(name.template())))):
            catalog.errors.append(f"{path}: no such file")
            continue
        if name.type == "socket" and str(name) not in catalog.roots:
            catalog.roots.append(str(name))
        elif name.type == "service":
            catalog.scanned_services.setdefault(str(name), path)
    return catalog


def _scan(catalog: _Catalog, directory: str) -> None:
    try:
        entries = sorted(os.listdir(directory))
    except OSError as exc:
        catalog.errors.append(f"{directory}: cannot list directory: {exc.strerror or exc}")
        return
    for base in entries:
        name = _unit_name_of(base)
        path = os.path.join(directory, base)
        if name is None or base.startswith(".") or name.is_template or _is_alias(path, name):
            continue
        if os.path.isdir(path):
            continue
        if name.type == "socket" and base not in catalog.roots:
            catalog.roots.append(base)
        elif name.type == "service":
            catalog.scanned_services.setdefault(base, path)


def _is_alias(path: str, name: UnitName) -> bool:
    """A symlink to another unit (``sshd.service -> ssh.service``) is an alias, not a unit of its own;
    a link to a template (``foo@bar.socket -> foo@.socket``) is an instance."""
    if not os.path.islink(path):
        return False
    target = _unit_name_of(os.path.realpath(path))
    return target is not None and target != name and not (name.instance and target == name.template())


# ====================================================================== pairing and the document
class Loaded(NamedTuple):
    """What :func:`load_unit_files` found.

    ``document``: the TOML-shaped units. ``warnings``: one :class:`Diagnostic` per
    problem that does not stop loading. ``origins``: per unit, the settings model's
    location of a value (``"socket.backlog"``, ``"socket[2].listen-stream"``,
    ``"service.exec-start"``, ``"description"``, ``"socket"``, ``"service"``) to the unit
    file line it came from (``"FILE: [Socket] Backlog="``, or the file for a table), so
    that the model's messages can name the directive. ``sources``: per unit, the files read.
    """

    document: dict[str, dict[str, Any]]
    warnings: list[Diagnostic]
    origins: dict[str, dict[str, str]]
    sources: dict[str, list[str]]


@dataclass
class _Group:
    """One activator unit: a service (or the Accept=yes template) and the sockets that activate it."""

    name: str
    service: _UnitFile
    sockets: list[_UnitFile] = field(default_factory=list)


@dataclass
class _Loader:
    catalog: _Catalog
    errors: list[str] = field(default_factory=list)
    warnings: list[Diagnostic] = field(default_factory=list)
    units: dict[str, _UnitFile | None] = field(default_factory=dict)  # by systemd name; None: failed

    def load(self, name: UnitName, per_connection: bool = False, required_by: str = "") -> _UnitFile | None:
        key = str(name) + ("#connection" if per_connection else "")
        if key not in self.units:
            self.units[key] = self._load(name, per_connection, required_by)
        return self.units[key]

    def _load(self, name: UnitName, per_connection: bool, required_by: str) -> _UnitFile | None:
        fragment = self.catalog.find(str(name))
        if fragment is None and name.instance:
            fragment = self.catalog.find(str(name.template()))
        if fragment is None:
            self.errors.append(f"{required_by or name}: unit {name} not found in {', '.join(self.catalog.dirs)}")
            return None
        if _is_masked(fragment):
            self.errors.append(f"{fragment}: unit {name} is masked (an empty file or a link to /dev/null)")
            return None
        try:
            files = [fragment, *self.catalog.dropins(name)]
            assignments: list[Assignment] = []
            for path in files:
                found, warnings = parse_unit_text(_read_text(path), path)
                assignments += found
                self.warnings += warnings
        except UnitFileError as exc:
            self.errors += exc.messages
            return None
        entries = _apply(name.type, assignments, self.warnings)
        _unsupported(entries, self.warnings)
        return _UnitFile(name, fragment, files, entries, Context(name, fragment, per_connection))

    def group_of(self, sock: _UnitFile) -> tuple[str, UnitName, bool] | None:
        """(activator unit name, service to run, per connection) for a socket unit."""
        explicit = sock.entries.get("@service")
        if sock.accept:
            if explicit:
                self.errors.append(f"{explicit.items[-1].where}: not allowed with Accept=yes (systemd "
                                   f"instantiates {sock.name.prefix}@.service per connection)")
                return None
            return sock.name.stem, UnitName(sock.name.prefix, "", "service"), True
        if explicit is None:
            service = sock.name.with_type("service")
        else:
            a = explicit.items[-1]
            try:
                service = UnitName.parse(expand_specifiers(a.value, sock.ctx))
            except (ValueError, _Problem) as exc:
                self.errors.append(f"{a.where}: {exc}")
                return None
            if service.type != "service" or service.is_template:
                self.errors.append(f"{a.where}: {service} is not a service unit name (nor may it be a template)")
                return None
        return service.stem, service, False


def load_unit_files(paths: list[str], strict: bool = False) -> Loaded:
    """The activator units defined by systemd unit files.

    ``paths``: ``*.socket``/``*.service`` files (an instance such as ``foo@bar.socket`` may
    be named when ``foo@.socket`` exists) and directories, which are also the search
    path for services and drop-ins, in priority order. Every socket unit in a directory
    (templates excepted) becomes an activator unit with the service it activates: the
    one of the same name, the one its ``Service=`` names, or with ``Accept=yes`` the
    template ``NAME@.service``. ``strict``: unsupported and unknown directives and
    syntax warnings are errors. Raises :class:`UnitFileError` listing every error.
    """
    catalog = _catalog([str(p) for p in paths])
    loader = _Loader(catalog, errors=list(catalog.errors))
    groups = _groups(loader)
    document: dict[str, dict[str, Any]] = {}
    origins: dict[str, dict[str, str]] = {}
    sources: dict[str, list[str]] = {}
    resolver = _resolver(groups)
    for group in groups.values():
        try:
            document[group.name], origins[group.name] = _group_document(group, resolver, loader.warnings)
        except UnitFileError as exc:
            loader.errors += exc.messages
        sources[group.name] = [f for unit in (*group.sockets, group.service) for f in unit.files]
    _standalone_services(loader, groups)
    if strict:
        loader.errors += [str(w) for w in loader.warnings if w.kind != NOTE]
        loader.warnings = [w for w in loader.warnings if w.kind == NOTE]
    if loader.errors:
        raise UnitFileError(_unique(loader.errors))
    return Loaded(document, _unique(loader.warnings), origins, sources)


def _unique(items: list[Any]) -> list[Any]:
    return list(dict.fromkeys(items))


def _groups(loader: _Loader) -> dict[str, _Group]:
    groups: dict[str, _Group] = {}
    owner: dict[str, str] = {}  # socket name -> group
    for root in loader.catalog.roots:
        fragment = loader.catalog.find(root)
        if fragment and _is_masked(fragment) and root not in loader.catalog.named:
            continue  # masked in a directory that comes first: not a unit, as in systemd
        sock = loader.load(UnitName.parse(root))
        pairing = loader.group_of(sock) if sock else None
        if sock is None or pairing is None:
            continue
        name, service_name, per_connection = pairing
        group = groups.get(name)
        if group is None:
            service = loader.load(service_name, per_connection, required_by=sock.fragment)
            if service is None:
                continue
            group = groups[name] = _Group(name, service)
        if group.service.name != service_name:
            loader.errors.append(f"{sock.fragment}: activates {service_name}, but activator unit {name!r} is "
                                 f"already {group.service.name}")
            continue
        _add_socket(loader, group, sock, owner)
        _listed_sockets(loader, group, owner)
    return groups


def _add_socket(loader: _Loader, group: _Group, sock: _UnitFile, owner: dict[str, str]) -> None:
    previous = owner.setdefault(str(sock.name), group.name)
    if previous != group.name:
        loader.errors.append(f"{sock.fragment}: activates both {previous!r} and {group.name!r}")
    elif sock not in group.sockets:
        group.sockets.append(sock)


def _listed_sockets(loader: _Loader, group: _Group, owner: dict[str, str]) -> None:
    """The service's own Sockets= list joins those sockets to it, as in systemd."""
    entry = group.service.entries.get("@sockets")
    for a in entry.items if entry else []:
        try:
            names = [UnitName.parse(expand_specifiers(word, group.service.ctx)) for word in split_words(a.value)]
        except ValueError as exc:  # _Problem included
            loader.errors.append(f"{a.where}: {exc}")
            continue
        for name in names:
            if name.type != "socket":
                loader.errors.append(f"{a.where}: {name} is not a socket unit")
                continue
            sock = loader.load(name, required_by=a.where)
            if sock is not None:
                _add_socket(loader, group, sock, owner)


def _resolver(groups: dict[str, _Group]) -> Callable[[str], str | None]:
    names = {str(unit.name): group.name for group in groups.values() for unit in (group.service, *group.sockets)}
    return names.get


def _standalone_services(loader: _Loader, groups: dict[str, _Group]) -> None:
    used = {str(group.service.name) for group in groups.values()}
    for name, path in loader.catalog.scanned_services.items():
        if name in used:
            continue
        if name in loader.catalog.named:
            loader.errors.append(f"{path}: no socket unit activates this service (activator starts services "
                                 "through their sockets only)")
        else:
            loader.warnings.append(Diagnostic(path, "no socket unit activates this service: not loaded"))


def _group_document(group: _Group, resolve: Callable[[str], str | None],
                    warnings: list[Diagnostic]) -> tuple[dict[str, Any], dict[str, str]]:
    own = {str(unit.name) for unit in (group.service, *group.sockets)}
    errors: list[str] = []
    origins: dict[str, str] = {}
    service, found = _table(group.service, _Translation(group.service.ctx, resolve, own, warnings), errors)
    description = _take(service, found, "description")
    unit_level: dict[str, Any] = {}
    _take_unit_level(service, found, unit_level, origins)
    origins["service"] = group.service.fragment
    origins.update({f"service.{key}": origin for key, origin in found.items()})
    sockets: list[tuple[dict[str, Any], dict[str, str], str]] = []
    for sock in group.sockets:
        t = _Translation(sock.ctx, resolve, own, warnings)
        options, found = _table(sock, t, errors)
        own_description = _take(options, found, "description")
        description = description or own_description
        _take_unit_level(options, found, unit_level, origins)
        for key in ("start-limit-interval-sec", "start-limit-burst"):
            _take(options, found, key)  # a socket's own start limit means nothing: sockets are not restarted
        if not sock.accept:
            # systemd names a socket after its unit by default; activator's TOML default is the unit's name.
            options.setdefault("file-descriptor-name", str(sock.name))
        sockets += [(table, {**found, **listen_origins}, sock.fragment)
                    for table, listen_origins in _listen_tables(sock, options, t, errors)]
    if errors:
        raise UnitFileError(errors)
    for i, (_, found, fragment) in enumerate(sockets, 1):
        where = "socket" if len(sockets) == 1 else f"socket[{i}]"
        origins[where] = fragment
        origins.update({f"{where}.{key}": origin for key, origin in found.items()})
    doc: dict[str, Any] = {}
    if description:
        doc["description"], origins["description"] = description
    doc.update(unit_level)
    doc["socket"] = sockets[0][0] if len(sockets) == 1 else [table for table, _, _ in sockets]
    doc["service"] = service
    return doc, origins


_UNIT_LEVEL = ("condition-", "assert-", "requires", "wants", "after", "before")


def _take_unit_level(table: dict[str, Any], found: dict[str, str], unit_level: dict[str, Any],
                     origins: dict[str, str]) -> None:
    """Conditions and dependencies are the activator unit's, whichever unit file wrote them: the socket's and
    the service's are checked together when the unit starts (a path both name counts once)."""
    for key in [k for k in table if k.startswith(_UNIT_LEVEL)]:
        value, origins[key] = _take(table, found, key) or ([], "")
        unit_level[key] = _unique([*unit_level.get(key, []), *value])


def _listen_tables(sock: _UnitFile, options: dict[str, Any], t: _Translation,
                   errors: list[str]) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """The socket unit's ports in their order, which is the daemon's fd order: a kind that comes
    back after another starts a new table, with the same options (TOML keys have no order of their
    own across kinds otherwise). Returns (table, origins of its listen keys) pairs."""
    entry = sock.entries.get("@listen")
    runs: list[tuple[dict[str, Any], dict[str, str]]] = [({}, {})]
    last = ""
    for a in entry.items if entry else []:
        rule = classify(a.section, a.key)
        if rule is None or rule.kind == UNSUPPORTED:
            t.warn(a, f"not supported: {rule.note if rule else ''}")
            continue
        try:
            address = t.printf(a, a.value)
        except _Problem as exc:
            errors.append(f"{a.where}: {exc}")
            continue
        kind = _kebab(a.key)
        if kind in runs[-1][0] and kind != last:
            runs.append(({}, {}))
        runs[-1][0].setdefault(kind, []).append(address)
        runs[-1][1][kind] = a.where
        last = kind
    return [({**listens, **options}, found) for listens, found in runs]


def _take(table: dict[str, Any], origins: dict[str, str], key: str) -> tuple[Any, str] | None:
    """Remove a key from a translated table: (value, origin), or None when absent."""
    if key not in table:
        return None
    return table.pop(key), origins.pop(key)


def _table(unit: _UnitFile, t: _Translation, errors: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The TOML table of one unit file: (table, key -> where its value came from)."""
    table: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for key, entry in unit.entries.items():
        if key.startswith("@") or entry.rule.kind == UNSUPPORTED:
            continue
        last = entry.items[-1]
        try:
            if entry.rule.shape in LIST_SHAPES:
                value = _translate_list(entry.rule.shape, entry.items, t, key)
            else:
                value = _translate_scalar(entry.rule.shape, last, t)
        except _Problem as exc:
            errors.append(f"{last.where}: {exc}")
            continue
        if value is not None and value != [] and not key.startswith("!"):
            table[key] = value
            origins[key] = last.where
    return table, origins


# ====================================================================== TOML output
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(text: str) -> str:
    def escape(c: str) -> str:
        if c in _TOML_ESCAPES:
            return _TOML_ESCAPES[c]
        return f"\\u{ord(c):04x}" if c < " " or c == "\x7f" else c

    return '"' + "".join(escape(c) for c in text) + '"'


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, Mapping) for item in value)


def _toml_table(path: list[str], table: Mapping[str, Any], out: list[str]) -> None:
    # Headers for units and their socket/service parts; everything deeper is written inline.
    headed = len(path) < 2
    for key, value in table.items():
        if not (headed and (isinstance(value, Mapping) or _is_table_array(value))):
            out.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in table.items():
        if not headed:
            break
        header = ".".join(_toml_key(part) for part in (*path, key))
        if isinstance(value, Mapping):
            out += ["", f"[{header}]"]
            _toml_table([*path, key], value, out)
        elif _is_table_array(value):
            for item in value:
                out += ["", f"[[{header}]]"]
                _toml_table([*path, key, "*"], item, out)


def to_toml(document: Mapping[str, Any]) -> str:
    """The document as TOML text that tomllib reads back to the same document."""
    out: list[str] = []
    _toml_table([], document, out)
    return "\n".join(out).lstrip("\n") + "\n"


def directives(kind: str) -> Iterator[tuple[str, str, Rule]]:
    """(section, directive, rule) of every directive of one class, for the documentation."""
    for section, rules in RULES.items():
        for key, rule in rules.items():
            if rule.kind == kind:
                yield section, key, rule
