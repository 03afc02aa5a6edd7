"""systemd time spans: ``90``, ``100ms``, ``2s``, ``1min 30s``, ``1h5m``, ``infinity`` (see systemd.time(7))."""
from __future__ import annotations

import math
import re

UNITS = {
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
_PART = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Zµ]*)")


def parse_timespan(value) -> float:
    """Seconds as a float (``inf`` for infinity); ValueError with the reason when malformed."""
    if isinstance(value, bool):
        raise ValueError(f"invalid time span {value!r}")
    if isinstance(value, (int, float)):
        if value < 0 or (isinstance(value, float) and math.isnan(value)):
            raise ValueError(f"invalid time span {value!r}: must not be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"invalid time span {value!r}: expected a number or a string")
    text = value.strip()
    if text == "infinity":
        return math.inf
    if not text:
        raise ValueError("empty time span")
    total = 0.0
    pos = 0
    while pos < len(text):
        m = _PART.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"invalid time span {value!r}")
        number, unit = m.groups()
        if unit not in UNITS:
            raise ValueError(f"invalid time span {value!r}: unknown unit {unit!r}")
        total += float(number) * UNITS[unit]
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return total
