"""Property-based tests: arbitrary input gives a valid result or a clear error, never a crash.

CI runs ACTIVATOR_PROPERTY_EXAMPLES examples per property (default 300); the
long run documented in the README uses ACTIVATOR_PROPERTY_EXAMPLES=10000.
"""
from __future__ import annotations

import math
import os
import re
import socket
import sys
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from activator import config as _config
from activator import settings as _settings
from activator.addresses import Address, AddressError, parse_address
from activator.values import Invalid

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXAMPLES = int(os.environ.get("ACTIVATOR_PROPERTY_EXAMPLES", "300"))
PROPERTY = settings(
    max_examples=EXAMPLES, deadline=None, database=None, derandomize=not os.environ.get("ACTIVATOR_PROPERTY_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


# ------------------------------------------------------------------ addresses
def _check_address(text: str) -> None:
    try:
        a = parse_address(text)
    except AddressError as exc:
        message = str(exc)
        assert message and "\n" not in message
        return
    assert isinstance(a, Address)
    assert a.family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX, socket.AF_VSOCK)
    assert str(a)
    if a.is_ip:
        assert 1 <= a.sockaddr[1] <= 65535
    if a.family == socket.AF_UNIX:
        assert len(a.sockaddr.encode(errors="surrogateescape")) <= 108
    if a.family == socket.AF_VSOCK:
        assert 0 <= a.sockaddr[0] <= 0xFFFFFFFF and 1 <= a.sockaddr[1] <= 0xFFFFFFFF
    # What it prints parses again to the same socket address (what --listen and the logs show).
    assert parse_address(a.text).sockaddr == a.sockaddr


# Strings built from the pieces of the grammar reach the deep branches more often than random text.
_piece = st.sampled_from([
    "", ":", "::", "[", "]", "]:", "%", "@", "/", ".", "vsock:", "vsock::", "127.0.0.1", "::1", "0", "1", "80",
    "65535", "65536", "99999999999", "-1", " ", "\t", "lo", "eth0", "fe80::1", "4294967295", "4294967296",
    "０", "١", "ffff", "1.2.3", "256.1.1.1", "a" * 120, "\x00", "é",
])
_grammar_text = st.lists(_piece, max_size=8).map("".join)


@PROPERTY
@given(st.text(max_size=200))
def test_parse_address_arbitrary_text(text):
    _check_address(text)


@PROPERTY
@given(_grammar_text)
def test_parse_address_grammar_pieces(text):
    _check_address(text)


@PROPERTY
@given(st.binary(max_size=100))
def test_parse_address_arbitrary_bytes_decoded(data):
    _check_address(data.decode("utf-8", "surrogateescape"))


# ------------------------------------------------------------------ TOML documents
# The keys come from the settings registry.
KNOWN_SOCKET = sorted(_config.SOCKET_KEYS)
KNOWN_SERVICE = sorted(_config.SERVICE_KEYS)
KNOWN_UNIT = sorted(_config.UNIT_KEYS)

_bare_key = st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)
_any_key = st.one_of(_bare_key, st.text(max_size=12))
_words = st.sampled_from([
    "127.0.0.1:0", "[::1]:0", "/tmp/activator-prop/x.sock", "@abstract", "vsock::5000", "8080", "0",
    "nobody", "root", "nogroup", "no-such-user-xyz", "SIGTERM", "SIGKILL", "9", "always", "no", "on-failure",
    "control-group", "mixed", "process", "null", "socket", "inherit", "journal", "infinity", "100ms", "1min 30s",
    "-5s", "0755", "0o600", "777", "rwx", "localhost", "any", "link-local", "192.0.2.0/24", "::1/128", "1.2.3.4/33",
    "true", "cat", "/bin/true", "²", "٣", "SIG²", "１０", "sh -c 'echo hi'", "'unterminated", "64K", "1G", "both", "ipv6-only", "",  # noqa: E501
    "24d", "24d 1s", "30d", "0o7777", "1777", "a\x00b", "A=a\x00b", "exec", "none", "notify", "٣s", "99999999999999999999y",
])
_scalar = st.one_of(
    _words,
    st.text(max_size=30),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([2**63, 2**64, -(2**64), 10**400, -(10**400)]),  # tomllib reads integers of any size
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)
_value = st.recursive(
    _scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_any_key, inner, max_size=3)),
    max_leaves=8,
)


def _part(known):
    return st.dictionaries(st.one_of(st.sampled_from(known), _any_key), _value, max_size=6)


_unit = st.fixed_dictionaries(
    {},
    optional={
        "socket": st.one_of(_part(KNOWN_SOCKET), st.lists(_part(KNOWN_SOCKET), max_size=3), _scalar),
        "service": st.one_of(_part(KNOWN_SERVICE), _scalar),
        "description": _value,
    },
).flatmap(lambda d: st.dictionaries(st.one_of(st.sampled_from(KNOWN_UNIT), _any_key), _value, max_size=2)
          .map(lambda extra: {**extra, **d}))
_document = st.dictionaries(st.one_of(_bare_key, _any_key), st.one_of(_unit, _value), max_size=4)


# A TOML writer: enough of TOML 1.0 for any nesting of these values.
def _toml_string(s: str) -> str:
    out = ['"']
    for ch in s:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_string(k)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def to_toml(doc: dict, style: int) -> str:
    """style 0: inline tables; 1: [unit] headers with dotted keys; 2: [unit.part] headers / [[unit.socket]]."""
    lines = []
    for name, unit in doc.items():
        if not isinstance(unit, dict) or style == 0:
            lines.append(f"{_toml_key(name)} = {_toml_value(unit)}")
            continue
        lines.append(f"[{_toml_key(name)}]")
        nested = []
        for k, v in unit.items():
            if style == 2 and isinstance(v, dict):
                nested.append((k, v, False))
            elif style == 2 and isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                nested.append((k, v, True))
            elif style == 1 and isinstance(v, dict):
                for k2, v2 in v.items():
                    lines.append(f"{_toml_key(k)}.{_toml_key(k2)} = {_toml_value(v2)}")
            else:
                lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v, array in nested:
            for table in (v if array else [v]):
                lines.append(f"[{'[' if array else ''}{_toml_key(name)}.{_toml_key(k)}{']' if array else ''}]")
                for k2, v2 in table.items():
                    lines.append(f"{_toml_key(k2)} = {_toml_value(v2)}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="activator-prop-") as d:
        yield d


def _check_load(path: str) -> None:
    from activator.config import ConfigError, load_units
    from activator.units import Unit

    try:
        units = load_units([path])
    except ConfigError as exc:
        assert exc.messages
        for line in exc.messages:
            assert isinstance(line, str) and line.strip(), exc.messages
            assert "Traceback" not in line
        return
    assert isinstance(units, list) and all(isinstance(u, Unit) for u in units)
    for u in units:
        assert u.sockets and u.service.argv


@PROPERTY
@given(doc=_document, style=st.integers(0, 2))
def test_load_units_arbitrary_documents(scratch, doc, style):
    text = to_toml(doc, style)
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        # Our writer only fails on documents TOML itself forbids (a key defined twice by different routes);
        # those still go to the loader below, which must report them as a syntax error.
        pass
    path = os.path.join(scratch, "units.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    _check_load(path)


@PROPERTY
@given(st.text(max_size=300))
def test_load_units_arbitrary_text(scratch, text):
    path = os.path.join(scratch, "text.toml")
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(text)
    _check_load(path)


@PROPERTY
@given(st.binary(max_size=300))
def test_load_units_arbitrary_bytes(scratch, data):
    path = os.path.join(scratch, "bytes.toml")
    with open(path, "wb") as f:
        f.write(data)
    _check_load(path)


_simple = st.one_of(_scalar, st.lists(_scalar, max_size=3))
_plausible_unit = st.fixed_dictionaries({
    "socket": st.fixed_dictionaries(
        {"listen-stream": st.one_of(_words, st.lists(_words, max_size=3))},
        optional={k: _simple for k in ("accept", "socket-mode", "max-connections", "ip-address-allow",
                                     "file-descriptor-name", "backlog", "trigger-limit-burst")},
    ),
    "service": st.fixed_dictionaries(
        {"exec-start": st.one_of(_words, st.lists(_words, min_size=1, max_size=3))},
        optional={k: _simple for k in ("user", "group", "restart", "kill-signal", "timeout-stop-sec",
                                     "environment", "standard-input", "kill-mode")},
    ),
})


def test_integers_of_any_size_and_odd_floats_are_refused_in_one_line_by_every_setting():
    """TOML integers have no size limit in tomllib (nor in activator.tomlfast): a 400-digit number in a
    time setting once escaped as an OverflowError traceback from `check` (math.isnan converts to float)."""
    odd = [10**400, -(10**400), 2**64, -(2**64), [10**400], {"a": 10**400}, float("inf"), float("-inf"),
           float("nan"), [float("nan")]]
    for setting in _settings.SETTINGS:
        for value in odd:
            try:
                setting.parse(value)
            except Invalid as exc:
                assert "\n" not in str(exc) and len(str(exc)) < 500, (setting.key, str(exc))


@PROPERTY
@given(st.sampled_from(_settings.SETTINGS), _value)
def test_every_setting_parses_or_says_why_in_one_line(setting, value):
    """Any TOML value into any setting's parser: a value within its bounds, or Invalid with one short line."""
    try:
        parsed = setting.parse(value)
    except Invalid as exc:
        message = str(exc)
        assert message and "\n" not in message and len(message) < 500, message
        return
    if setting.parse.kind == "time":
        assert parsed == math.inf or 0 <= parsed <= 24 * 86400
    if setting.parse.kind == "mode":
        assert 0 <= parsed <= setting.parse.maximum
    if isinstance(parsed, str):
        assert "\0" not in parsed
    if isinstance(parsed, list):
        assert all("\0" not in item for item in parsed if isinstance(item, str))
    if isinstance(parsed, dict):
        assert all("\0" not in k + val for k, val in parsed.items() if isinstance(k, str))  # not a limit's


@PROPERTY
@given(st.dictionaries(_bare_key, _plausible_unit, min_size=1, max_size=3), st.integers(0, 2))
def test_load_units_nearly_valid_documents(scratch, doc, style):
    """Documents shaped like real units with random values: many load, the rest are clear errors."""
    path = os.path.join(scratch, "plausible.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(to_toml(doc, style))
    _check_load(path)
