"""``dataclass`` for the engine's model, without the :mod:`dataclasses` module at run time.

Importing :mod:`dataclasses` brings :mod:`inspect` and with it ``ast``, ``dis``, ``tokenize`` and
``linecache``: a third of the imports of ``activator run`` and about 2 MiB of an idle engine, and
creating a standard dataclass compiles the source of each of its methods, at every start
(``python -m bench.footprint``). This decorator builds the same classes for the forms the engine
uses (plain, ``frozen``, ``eq=False``, ``repr=False``, ``slots``, inheritance between records,
``field(default=..., default_factory=..., repr=, compare=, hash=, init=)``, ``__post_init__``):

- ``__init__`` is not compiled at import: a class's first instances are made from a plan of its
  fields, and its compiled ``__init__`` comes with its 17th (most classes of the model are made once
  or twice by a given run, or never);
- ``__repr__``, ``__eq__`` and ``__hash__`` are closures of one template each, reading the fields
  with one ``operator.attrgetter`` (nothing compiled): the same text, comparisons and hash (and ``__hash__ = None`` where the
  standard decorator sets it) as the generated ones;
- ``dataclasses.fields``, ``dataclasses.replace`` and ``dataclasses.is_dataclass`` still work on
  these classes (and ``dataclasses.dataclass`` on a subclass of one): ``__dataclass_fields__`` is
  made of real :class:`dataclasses.Field` objects the first time something asks for it.

Anything else (``order``, ``unsafe_hash``, ``kw_only``, ``InitVar``, a ``__repr__``/``__eq__`` the
class writes itself, a base made by the standard decorator) goes to :func:`dataclasses.dataclass`,
imported then. Type checkers see :mod:`dataclasses` itself.
"""
from __future__ import annotations

import reprlib
import sys
from operator import attrgetter

TYPE_CHECKING = False  # typing is not imported at run time (start-up, memory); type checkers see it
if TYPE_CHECKING:
    from typing import Any, Callable

__all__ = ["dataclass", "field", "fields", "replace", "is_record", "MISSING"]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()
_HAS_FACTORY: Any = _Missing()  # the default of an __init__ parameter whose field has a default_factory
_STANDARD_ONLY = ("order", "unsafe_hash", "kw_only", "match_args", "weakref_slot")


def _frozen(message: str) -> Exception:
    """dataclasses.FrozenInstanceError itself, so that code catching it catches ours (imported then: the
    error is a bug of the caller's, never on the engine's way)."""
    import dataclasses

    return dataclasses.FrozenInstanceError(message)


class Field:
    """One field of a record: what :func:`dataclasses.field` records, for the forms used here."""

    __slots__ = ("name", "type", "default", "default_factory", "init", "repr", "hash", "compare")

    def __init__(self, default: Any = MISSING, default_factory: Any = MISSING, init: bool = True,
                 repr: bool = True, hash: bool | None = None, compare: bool = True) -> None:
        if default is not MISSING and default_factory is not MISSING:
            raise ValueError("cannot specify both default and default_factory")
        self.name = ""
        self.type: Any = None
        self.default, self.default_factory = default, default_factory
        self.init, self.repr, self.hash, self.compare = init, repr, hash, compare

    def to_standard(self) -> Any:
        """The :func:`dataclasses.field` call this field stands for."""
        import dataclasses

        return dataclasses.field(default=_standard_value(self.default),
                                 default_factory=_standard_value(self.default_factory),
                                 init=self.init, repr=self.repr, hash=self.hash, compare=self.compare)

    def __repr__(self) -> str:
        return f"Field(name={self.name!r}, default={self.default!r}, default_factory={self.default_factory!r})"

    def standard(self) -> Any:
        """The same field as a :class:`dataclasses.Field` (for code that asks dataclasses about a record)."""
        import dataclasses

        made = self.to_standard()
        made.name, made.type, made.kw_only = self.name, self.type, False
        made._field_type = dataclasses._FIELD  # type: ignore[attr-defined]  # what fields() selects
        return made


def _field(*, default: Any = MISSING, default_factory: Any = MISSING, init: bool = True, repr: bool = True,
           hash: bool | None = None, compare: bool = True, metadata: Any = None, kw_only: Any = MISSING) -> Any:
    if metadata is not None or kw_only is True:  # the standard field, and with it the standard decorator
        import dataclasses

        return dataclasses.field(default=_standard_value(default), default_factory=_standard_value(default_factory),
                                 init=init, repr=repr, hash=hash, compare=compare, metadata=metadata,
                                 kw_only=_standard_value(kw_only))
    return Field(default, default_factory, init, repr, hash, compare)


def _standard_value(value: Any) -> Any:
    import dataclasses

    return dataclasses.MISSING if value is MISSING else value


class _Params:
    """What ``dataclasses`` reads of a base class's parameters (``__dataclass_params__``)."""

    __slots__ = ("init", "repr", "eq", "order", "unsafe_hash", "frozen")

    def __init__(self, repr: bool, eq: bool, frozen: bool) -> None:
        self.init, self.repr, self.eq, self.order, self.unsafe_hash, self.frozen = True, repr, eq, False, False, frozen


class _StandardFields:
    """``__dataclass_fields__``, made of real :class:`dataclasses.Field` objects on first use."""

    def __get__(self, instance: Any, owner: type) -> dict[str, Any]:
        made = {f.name: f.standard() for f in owner.__record_fields__}  # type: ignore[attr-defined]
        if "__record_fields__" in owner.__dict__:
            type.__setattr__(owner, "__dataclass_fields__", made)
        return made


def _is_classvar(annotation: Any) -> bool:
    if isinstance(annotation, str):
        return annotation.startswith(("ClassVar", "typing.ClassVar", "t.ClassVar"))
    typing = sys.modules.get("typing")
    return typing is not None and (annotation is typing.ClassVar
                                   or getattr(annotation, "__origin__", None) is typing.ClassVar)


def _unusual(annotation: Any) -> bool:
    """An annotation only the standard decorator handles (InitVar, KW_ONLY)."""
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return "InitVar" in text or "KW_ONLY" in text


def _own_fields(cls: type) -> list[Field] | None:
    """The fields the class body declares, in order; None where the standard decorator must do it."""
    own = cls.__dict__
    standard = sys.modules.get("dataclasses")  # a dataclasses.field(...) can only exist once it is loaded
    made = []
    for name, annotation in own.get("__annotations__", {}).items():
        if _is_classvar(annotation):
            continue
        if _unusual(annotation):
            return None
        value = own.get(name, MISSING)
        if standard is not None and isinstance(value, standard.Field):
            return None  # a dataclasses.field(...): the standard decorator reads it
        f = value if isinstance(value, Field) else Field(default=value)
        f.name, f.type = name, annotation
        if f.default is not MISSING and f.default.__class__.__hash__ is None:
            raise ValueError(f"mutable default {type(f.default)} for field {name} is not allowed: "
                             "use default_factory")
        if isinstance(value, Field):  # the class attribute becomes the default, or goes (as dataclasses does)
            if f.default is MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, f.default)
        made.append(f)
    return made


def _getter(names: tuple[str, ...]) -> Callable[[Any], tuple]:
    """The values of ``names`` as one tuple (attrgetter returns a bare value for one name)."""
    if not names:
        return lambda obj: ()
    if len(names) == 1:
        get = attrgetter(names[0])
        return lambda obj: (get(obj),)
    return attrgetter(*names)


def _init_source(cls: type, all_fields: tuple[Field, ...], frozen: bool) -> tuple[str, dict[str, Any]]:
    names: dict[str, Any] = {"__MISSING": _HAS_FACTORY, "__set": object.__setattr__}
    params, body = [], []
    for f in all_fields:
        if f.init:
            if f.default is not MISSING:
                names[f"__d_{f.name}"] = f.default
                params.append(f"{f.name}=__d_{f.name}")
            elif f.default_factory is not MISSING:
                names[f"__f_{f.name}"] = f.default_factory
                params.append(f"{f.name}=__MISSING")
            else:
                params.append(f.name)
            value = (f"__f_{f.name}() if {f.name} is __MISSING else {f.name}"
                     if f.default_factory is not MISSING else f.name)
        elif f.default is not MISSING:
            names[f"__d_{f.name}"] = f.default
            value = f"__d_{f.name}"
        elif f.default_factory is not MISSING:
            names[f"__f_{f.name}"] = f.default_factory
            value = f"__f_{f.name}()"
        else:
            continue
        body.append(f"__set(self, {f.name!r}, {value})" if frozen else f"self.{f.name} = {value}")
    if hasattr(cls, "__post_init__"):
        body.append("self.__post_init__()")
    source = f"def __init__(self, {', '.join(params)}):\n    " + ("\n    ".join(body) or "pass") + "\n"
    return source, names


# Instances a class makes with the generic __init__ before it gets its compiled one: compiling costs
# 0.1-0.4 ms a class (3 ms of a one-unit start-up, for classes instantiated once or twice); a class
# made more often (a thousand units, a spawn per connection) is worth its compiled __init__.
COMPILE_AFTER = 16


def _generic_plan(all_fields: tuple[Field, ...]) -> tuple[tuple[str, ...], frozenset[str], tuple[tuple[str, int, Any], ...]]:
    """(parameters, their set, steps): each step (name, how, default), ``how`` 0 for an argument, 1 an
    argument or the default, 2 an argument or default(), 3 the default, 4 default() (not init fields)."""
    params = tuple(f.name for f in all_fields if f.init)
    steps = []
    for f in all_fields:
        if f.default is not MISSING:
            steps.append((f.name, 1 if f.init else 3, f.default))
        elif f.default_factory is not MISSING:
            steps.append((f.name, 2 if f.init else 4, f.default_factory))
        elif f.init:
            steps.append((f.name, 0, None))
    return params, frozenset(params), tuple(steps)


def _lazy_init(cls: type, all_fields: tuple[Field, ...], frozen: bool) -> Callable[..., None]:
    """An ``__init__`` that sets the fields from a plan (nothing compiled) for the class's first
    COMPILE_AFTER instances, then compiles the real one (the code dataclasses would generate). A call the
    plan cannot bind (a missing, unknown or repeated argument) goes to the compiled one at once, which
    raises the interpreter's own TypeError."""
    made = 0
    plan: Any = None
    setter = object.__setattr__ if frozen else setattr
    post_init = hasattr(cls, "__post_init__")

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal made, plan
        if made < COMPILE_AFTER:
            if plan is None:
                plan = _generic_plan(all_fields)
            params, known, steps = plan
            given = dict(zip(params, args))
            if len(args) <= len(params) and known.issuperset(kwargs) and given.keys().isdisjoint(kwargs):
                given.update(kwargs)
                if all(name in given for name, how, _ in steps if how == 0):
                    made += 1
                    for name, how, default in steps:
                        if how <= 2 and name in given and not (how == 2 and given[name] is _HAS_FACTORY):
                            setter(self, name, given[name])
                        else:
                            setter(self, name, default() if how in (2, 4) else default)
                    if post_init:
                        self.__post_init__()
                    return
        _compiled_init(cls, all_fields, frozen)(self, *args, **kwargs)

    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    return __init__


def _compiled_init(cls: type, all_fields: tuple[Field, ...], frozen: bool) -> Callable[..., None]:
    """The class's compiled ``__init__``, made now and set on the class."""
    source, names = _init_source(cls, all_fields, frozen)
    # exec of the text, not of compile(): compile() first asks whether its argument is an AST, and that
    # question builds the ast module's hundred-odd node types in C (2.5 ms and 200 KiB, for good).
    exec(source, names)  # noqa: S102 - our own template
    real = names["__init__"]
    real.__code__ = real.__code__.replace(co_filename=f"<record {cls.__qualname__}>")  # for tracebacks
    real.__qualname__ = f"{cls.__qualname__}.__init__"
    type.__setattr__(cls, "__init__", real)
    return real


def _methods(cls: type, all_fields: tuple[Field, ...], repr: bool, eq: bool, frozen: bool,
             explicit_hash: bool) -> None:
    if repr:
        shown = tuple(f.name for f in all_fields if f.repr)

        @reprlib.recursive_repr()
        def __repr__(self: Any) -> str:
            return f"{self.__class__.__qualname__}({', '.join(f'{n}={getattr(self, n)!r}' for n in shown)})"

        __repr__.__qualname__ = f"{cls.__qualname__}.__repr__"
        setattr(cls, "__repr__", __repr__)
    if eq:
        compared = _getter(tuple(f.name for f in all_fields if f.compare))

        def __eq__(self: Any, other: Any) -> Any:
            if other.__class__ is self.__class__:
                return compared(self) == compared(other)
            return NotImplemented

        __eq__.__qualname__ = f"{cls.__qualname__}.__eq__"
        setattr(cls, "__eq__", __eq__)
        if not explicit_hash:
            if frozen:  # hashable by its fields, as the standard decorator makes it
                hashed = _getter(tuple(f.name for f in all_fields if (f.compare if f.hash is None else f.hash)))

                def __hash__(self: Any) -> int:
                    return hash(hashed(self))

                __hash__.__qualname__ = f"{cls.__qualname__}.__hash__"
                setattr(cls, "__hash__", __hash__)
            else:  # mutable and compared by value: unhashable, as the standard decorator makes it
                setattr(cls, "__hash__", None)
    if frozen:
        names = frozenset(f.name for f in all_fields)

        def __setattr__(self: Any, name: str, value: Any) -> None:
            if type(self) is cls or name in names:
                raise _frozen(f"cannot assign to field {name!r}")
            super(cls, self).__setattr__(name, value)  # type: ignore[arg-type]

        def __delattr__(self: Any, name: str) -> None:
            if type(self) is cls or name in names:
                raise _frozen(f"cannot delete field {name!r}")
            super(cls, self).__delattr__(name)  # type: ignore[arg-type]

        setattr(cls, "__setattr__", __setattr__)
        setattr(cls, "__delattr__", __delattr__)


def _with_slots(cls: type, all_fields: tuple[Field, ...]) -> type:
    """The class again with ``__slots__`` for its fields (a class's slots can only be set at creation)."""
    inherited = {name for base in cls.__mro__[1:-1] for name in base.__dict__.get("__slots__", ())}
    body = dict(cls.__dict__)
    body["__slots__"] = tuple(f.name for f in all_fields if f.name not in inherited)
    for f in all_fields:
        body.pop(f.name, None)
    body.pop("__dict__", None)
    body.pop("__weakref__", None)
    made = type(cls)(cls.__name__, cls.__bases__, body)
    made.__qualname__ = cls.__qualname__
    return made


def _slots_getstate(self: Any) -> list[Any]:
    return [getattr(self, f.name) for f in _fields(self)]


def _slots_setstate(self: Any, state: list[Any]) -> None:
    for f, value in zip(_fields(self), state):
        object.__setattr__(self, f.name, value)


def _standard(cls: type, kwargs: dict[str, Any]) -> type:
    """The standard decorator, for what this one does not make (its fields turned into standard ones)."""
    import dataclasses

    for name, value in list(cls.__dict__.items()):
        if isinstance(value, Field):
            setattr(cls, name, value.to_standard())
    return dataclasses.dataclass(cls, **kwargs)  # type: ignore[call-overload, no-any-return]


def _dataclass(cls: type | None = None, /, **kwargs: Any) -> Any:
    def wrap(cls: type) -> type:
        repr, eq, frozen = kwargs.get("repr", True), kwargs.get("eq", True), kwargs.get("frozen", False)
        own = cls.__dict__
        class_hash = own.get("__hash__", MISSING)
        explicit_hash = not (class_hash is MISSING or (class_hash is None and "__eq__" in own))
        standard_bases = any("__dataclass_fields__" in b.__dict__ and "__record_fields__" not in b.__dict__
                             for b in cls.__mro__[1:])
        if (any(kwargs.get(k) for k in _STANDARD_ONLY) or not kwargs.get("init", True) or "__repr__" in own
                or "__eq__" in own or (frozen and explicit_hash) or standard_bases):
            return _standard(cls, kwargs)
        mine = _own_fields(cls)
        if mine is None:
            return _standard(cls, kwargs)
        bases = [b.__dict__["__dataclass_params__"].frozen for b in cls.__mro__[1:] if "__record_fields__" in b.__dict__]
        if bases and frozen and not any(bases):  # the rules of dataclasses: any frozen base decides
            raise TypeError("cannot inherit frozen dataclass from a non-frozen one")
        if any(bases) and not frozen:
            raise TypeError("cannot inherit non-frozen dataclass from a frozen one")
        inherited: dict[str, Field] = {}
        for base in cls.__mro__[-1:0:-1]:
            for f in base.__dict__.get("__record_fields__", ()):
                inherited[f.name] = f
        for f in mine:
            inherited[f.name] = f
        all_fields = tuple(inherited.values())
        seen_default = ""
        for f in all_fields:
            if f.init and (f.default is not MISSING or f.default_factory is not MISSING):
                seen_default = f.name
            elif f.init and seen_default:
                raise TypeError(f"non-default argument {f.name!r} follows default argument")
        if kwargs.get("slots"):
            cls = _with_slots(cls, all_fields)
            if frozen:  # as dataclasses: copy and pickle would assign the slots through the frozen __setattr__
                setattr(cls, "__getstate__", _slots_getstate)
                setattr(cls, "__setstate__", _slots_setstate)
        cls.__record_fields__ = all_fields  # type: ignore[attr-defined]
        cls.__dataclass_fields__ = _StandardFields()  # type: ignore[attr-defined]
        cls.__dataclass_params__ = _Params(repr, eq, frozen)  # type: ignore[attr-defined]
        cls.__match_args__ = tuple(f.name for f in all_fields if f.init)  # type: ignore[attr-defined, misc]
        cls.__init__ = _lazy_init(cls, all_fields, frozen)  # type: ignore[misc]
        _methods(cls, all_fields, repr, eq, frozen, explicit_hash)
        return cls

    return wrap if cls is None else wrap(cls)


def _fields(obj: Any) -> tuple[Any, ...]:
    # The nearest class that declares fields decides: a standard dataclass made on a record base inherits
    # the base's __record_fields__, which lack its own fields.
    for klass in (obj if isinstance(obj, type) else type(obj)).__mro__:
        own = klass.__dict__
        if "__record_fields__" in own:
            return own["__record_fields__"]  # type: ignore[no-any-return]
        if "__dataclass_fields__" in own:
            break
    import dataclasses

    return dataclasses.fields(obj)


def _replace(obj: Any, /, **changes: Any) -> Any:
    for f in _fields(obj):
        if not f.init:
            if f.name in changes:
                raise ValueError(f"field {f.name} is declared with init=False, it cannot be specified with replace()")
        elif f.name not in changes:
            changes[f.name] = getattr(obj, f.name)
    return obj.__class__(**changes)


def is_record(obj: Any) -> bool:
    """Whether ``obj`` is an instance of a record or of a standard dataclass (not a class)."""
    kind = type(obj)
    if isinstance(obj, type):
        return False
    return hasattr(kind, "__record_fields__") or ("dataclasses" in sys.modules
                                                 and hasattr(kind, "__dataclass_fields__"))


if TYPE_CHECKING:
    from dataclasses import dataclass as dataclass
    from dataclasses import field as field
    from dataclasses import fields as fields
    from dataclasses import replace as replace
else:
    dataclass, field, fields, replace = _dataclass, _field, _fields, _replace
