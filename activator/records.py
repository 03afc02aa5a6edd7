"""``dataclass`` for the engine's model: the standard one, with ``__repr__``, ``__eq__`` and ``__hash__`` shared.

Creating a dataclass generates the source of its methods and compiles each of them, at every start:
for the 36 dataclasses that ``activator run`` imports that was half of the time its imports take
(``python -m bench.footprint``, section 5). This decorator lets :func:`dataclasses.dataclass` generate
``__init__`` (and, for frozen classes, ``__setattr__``/``__delattr__``), and gives the class
``__repr__``, ``__eq__`` and ``__hash__`` that read the same fields with one ``operator.attrgetter``:
the same text, the same comparisons and the same hash (and ``__hash__ = None`` where the standard
decorator sets it) as the generated ones. Anything unusual (``order``, ``unsafe_hash``, a method the
class writes itself) is left to the standard decorator as it is. Type checkers see
:func:`dataclasses.dataclass` itself.
"""
from __future__ import annotations

import dataclasses
import reprlib
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Callable

__all__ = ["dataclass"]


def _getter(names: tuple[str, ...]) -> Callable[[Any], tuple]:
    """The values of ``names`` as one tuple (attrgetter returns a bare value for one name)."""
    if not names:
        return lambda obj: ()
    if len(names) == 1:
        get = attrgetter(names[0])
        return lambda obj: (get(obj),)
    return attrgetter(*names)


def _methods(cls: type, repr: bool, eq: bool, frozen: bool, explicit_hash: bool) -> None:
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    if repr:
        shown = tuple(f.name for f in fields if f.repr)

        @reprlib.recursive_repr()
        def __repr__(self: Any) -> str:
            return f"{self.__class__.__qualname__}({', '.join(f'{n}={getattr(self, n)!r}' for n in shown)})"

        __repr__.__qualname__ = f"{cls.__qualname__}.__repr__"
        setattr(cls, "__repr__", __repr__)
    if eq:
        compared = _getter(tuple(f.name for f in fields if f.compare))

        def __eq__(self: Any, other: Any) -> Any:
            if other.__class__ is self.__class__:
                return compared(self) == compared(other)
            return NotImplemented

        __eq__.__qualname__ = f"{cls.__qualname__}.__eq__"
        setattr(cls, "__eq__", __eq__)
        if not explicit_hash:
            if frozen:  # hashable by its fields, as the standard decorator makes it
                hashed = _getter(tuple(f.name for f in fields if (f.compare if f.hash is None else f.hash)))

                def __hash__(self: Any) -> int:
                    return hash(hashed(self))

                __hash__.__qualname__ = f"{cls.__qualname__}.__hash__"
                setattr(cls, "__hash__", __hash__)
            else:  # mutable and compared by value: unhashable, as the standard decorator makes it
                setattr(cls, "__hash__", None)


def _dataclass(cls: type | None = None, /, **kwargs: Any) -> Any:
    def wrap(cls: type) -> type:
        repr, eq, frozen = kwargs.get("repr", True), kwargs.get("eq", True), kwargs.get("frozen", False)
        own = cls.__dict__
        class_hash = own.get("__hash__", dataclasses.MISSING)
        explicit_hash = not (class_hash is dataclasses.MISSING or (class_hash is None and "__eq__" in own))
        if (kwargs.get("order") or kwargs.get("unsafe_hash") or "__repr__" in own or "__eq__" in own
                or (frozen and explicit_hash)):
            return dataclasses.dataclass(cls, **kwargs)  # type: ignore[call-overload, no-any-return]
        made: type = dataclasses.dataclass(cls, **{**kwargs, "repr": False, "eq": False})  # type: ignore[call-overload]
        _methods(made, repr, eq, frozen, explicit_hash)
        return made

    return wrap if cls is None else wrap(cls)


if TYPE_CHECKING:
    from dataclasses import dataclass as dataclass
else:
    dataclass = _dataclass
