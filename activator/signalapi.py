"""The part of the ``signal`` module the engine uses, on the C module ``_signal`` alone.

``signal.py`` builds the ``Signals``, ``Handlers`` and ``Sigmasks`` enums when it is imported: time
and memory at every start-up, for what two small functions give here. The run-path modules import
this module *as* ``signal``; its constants are the plain ints of ``_signal`` (equal to the enums),
``pthread_sigmask`` and ``valid_signals`` give sets of ints, ``signal()`` the previous handler as
an int or a callable. Signal names come from :func:`name` and :func:`number`.
"""
from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
    from signal import *  # noqa: F403 - checkers see the standard module's names and types
else:
    import _signal
    from _signal import *  # noqa: F403

# As signal.Signals: every SIG name (not SIG_DFL and the like), and for a number with several names
# (SIGABRT and SIGIOT) the first by number then name, the one Signals(number).name gives.
_NUMBERS: dict[str, int] = {k: v for k, v in vars(_signal).items()
                            if k.isupper() and k.startswith("SIG") and not k.startswith("SIG_") and type(v) is int}
_NAMES: dict[int, str] = {}
for _name, _num in sorted(_NUMBERS.items(), key=lambda kv: (kv[1], kv[0])):
    _NAMES.setdefault(_num, _name)


def name(num: int) -> str:
    """``signal.Signals(num).name``: "SIGTERM" for 15; ValueError for a number with no name (SIGRTMIN+1)."""
    try:
        return _NAMES[num]
    except (KeyError, TypeError):
        raise ValueError(f"{num!r} is not a valid signal number") from None


def number(text: str) -> int:
    """``int(signal.Signals[text])``: 15 for "SIGTERM"; KeyError for a name that is not a signal's."""
    return _NUMBERS[text]


def names() -> list[str]:
    """``[s.name for s in signal.Signals]``: one name per signal, by number."""
    return [_NAMES[num] for num in sorted(_NAMES)]


def label(num: int) -> str:
    """The name of signal ``num``, or its number for one with no name (a real-time signal): never fails."""
    return _NAMES.get(num, str(num))
