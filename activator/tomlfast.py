"""A fast path for the line-oriented TOML that unit files use, exactly equal to tomllib or declining.

`loads(text)` returns the dict `tomllib.loads(text)` would return, or None ("decline") when the text uses
anything outside a small subset, or anything that might be an error or a table-definition conflict; the
caller then parses with tomllib, which gives the proper result or the proper error message. tomllib is
pure Python and takes ~27 ms for 1,000 units; this takes a few ms, since each line is one regular
expression match.

The subset: blank lines, comments, `[a.b]` headers and `a.b = value` lines with bare keys, values that
are basic strings without a backslash, literal strings, decimal integers, booleans and one-line arrays
of those. Every other thing declines (quoted keys, floats, dates, inline tables, `[[x]]`, multi-line
strings or arrays, escapes, ...), and so does each case where TOML's rules on defining a table or a key
twice could apply: a header is declined when it repeats or is a prefix of another (legal in some orders,
never needed by a unit file), a root-level key when it is dotted.
"""

from __future__ import annotations

import re

# Characters tomllib rejects in strings and comments: ASCII control characters except tab, and DEL.
_CTRL = r"\x00-\x08\x0a-\x1f\x7f"
_KEY = r"[A-Za-z0-9_-]+"
_DOTTED = rf"{_KEY}(?:[ \t]*\.[ \t]*{_KEY})*"  # TOML allows spaces and tabs around the dots
# A scalar value; its groups tell which kind it is. A backslash declines a basic string (escapes are
# tomllib's work); integers are TOML's decimal form (no leading zero; an underscore between two digits).
_SCALAR = rf"""
    "(?P<basic>[^"\\{_CTRL}]*)"
  | '(?P<literal>[^'{_CTRL}]*)'
  | (?P<int>[+-]?(?:0|[1-9](?:_?[0-9])*))
  | (?P<bool>true|false)
"""
# The same without groups, for the one-line array: items separated by commas, a trailing comma allowed.
_ITEM = rf"""(?:"[^"\\{_CTRL}]*"|'[^'{_CTRL}]*'|[+-]?(?:0|[1-9](?:_?[0-9])*)|true|false)"""

_LINE = re.compile(
    rf"""
    [ \t]*
    (?:
        \[ [ \t]* (?P<header>{_DOTTED}) [ \t]* \]
      |
        (?P<key>{_DOTTED}) [ \t]* = [ \t]*
        (?:
            {_SCALAR}
          | \[ (?P<array> [ \t]* (?:{_ITEM} [ \t]* , [ \t]*)* (?:{_ITEM} [ \t]*)? ) \]
        )
    )?
    [ \t]* (?:\#[^{_CTRL}]*)?
    """,
    re.VERBOSE,
)
# The items of an array that _LINE has matched: what lies between them is only spaces, tabs and commas,
# none of which can start an item, so a scan finds exactly the items that the match saw.
_ITEMS = re.compile(_SCALAR, re.VERBOSE)
_DOT = re.compile(r"[ \t]*\.[ \t]*")


class _Decline(Exception):
    pass


def _value(m: re.Match[str]) -> object:
    """The value of the scalar that matched last in `m` (a line of _LINE, or an item of _ITEMS)."""
    kind = m.lastgroup
    text = m.group(m.lastindex or 0)
    if kind == "basic" or kind == "literal":
        return text
    if kind == "int":
        # tomllib's int() has no size limit of its own, but Python's digit limit (sys.set_int_max_str_digits)
        # would raise here: a long integer is left to tomllib.
        if len(text) > 100:
            raise _Decline
        return int(text)
    return text == "true"


def _keys(dotted: str) -> list[str]:
    return dotted.split(".") if " " not in dotted and "\t" not in dotted else _DOT.split(dotted)


def loads(text: str) -> dict[str, object] | None:
    """tomllib.loads(text), or None where the text is outside the subset or might be an error."""
    try:
        return _loads(text)
    except _Decline:
        return None
    except (RecursionError, ValueError, TypeError, AttributeError):
        # Not expected (each case is checked before it could raise), but the contract is to never raise:
        # if one slipped through, tomllib still gives the right result or the right message.
        return None


def _loads(text: str) -> dict[str, object] | None:
    if not isinstance(text, str):
        return None
    # tomllib reads "\r\n" as "\n" everywhere; any other "\r" is an error, in a string or a comment too
    # (the line patterns exclude it as well: this says so once, up front).
    text = text.replace("\r\n", "\n")
    if "\r" in text:
        return None
    root: dict[str, object] = {}
    table = root
    at_root = True  # until the first header
    explicit: set[int] = set()  # id() of each table a header made
    paths: dict[str, list[str]] = {}
    match = _LINE.fullmatch
    for line in text.split("\n"):
        m = match(line)
        if m is None:
            return None
        # The last group that matched names the line's kind: None for a blank or comment line, "header",
        # or the kind of the value (the key's group closes before the value's).
        kind = m.lastgroup
        if kind is None:
            continue
        if kind == "header":
            # A fresh table at the end of the path: every dict on the way must be a table that only
            # headers made implicitly (a root value, a table of a header, or a table that dotted keys
            # made, all decline), and the path must be new (a repeated header, or one that is a prefix of
            # an earlier one, declines). With root-level dotted keys declined, dicts under a header's
            # table are made by that header's own keys, so "no header's table on the way" covers them.
            node = root
            *parents, last = _keys(m.group("header"))
            for name in parents:
                child = node.get(name)
                if child is None:
                    child = node[name] = {}
                elif type(child) is not dict or id(child) in explicit:
                    return None
                node = child
            if last in node:
                return None
            table = node[last] = {}
            explicit.add(id(table))
            at_root = False
            continue
        if kind == "basic" or kind == "literal":
            value: object = m[kind]  # the common case, without a call
        elif kind == "array":
            value = [_value(i) for i in _ITEMS.finditer(m[kind])]
        else:
            value = _value(m)
        # Units repeat their keys: each dotted key is split once.
        key = m["key"]
        path = paths.get(key)
        if path is None:
            path = paths[key] = _keys(key)
        *parents, last = path
        if parents and at_root:
            return None  # root-level dotted keys: declined
        # Within one table the key paths must be prefix-free: a dict met on the way was made by an
        # earlier dotted key of this same table (extending it is legal); a value on the way, or
        # anything at the end, is a duplicate or a conflict.
        node = table
        for name in parents:
            child = node.get(name)
            if child is None:
                child = node[name] = {}
            elif type(child) is not dict:
                return None
            node = child
        if last in node:
            return None
        node[last] = value
    return root
