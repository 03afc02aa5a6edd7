"""activator.records.dataclass behaves as dataclasses.dataclass: the same repr, equality, hash and
hashability, for every form the engine's model uses (and the unusual ones it hands back untouched)."""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import field

import pytest

import activator
from activator import records
from activator.records import _dataclass


def _pair(body: str, decorator: str = "@dataclass"):
    """The same class body made by both decorators."""
    made = []
    for dc, fd in ((dataclasses.dataclass, field), (_dataclass, records.field)):
        ns: dict = {"dataclass": dc, "field": fd}
        exec(f"{decorator}\nclass C:\n{body}", ns)
        made.append(ns["C"])
    return made


BODIES = [
    ("@dataclass", "    a: int\n    b: str = 'x'\n"),
    ("@dataclass", "    a: int\n"),
    ("@dataclass", "    pass\n"),
    ("@dataclass(frozen=True)", "    a: int\n    b: tuple = ()\n"),
    ("@dataclass(frozen=True)", "    a: int\n    hidden: int = field(default=0, repr=False, compare=False)\n"),
    ("@dataclass(frozen=True)", "    a: int\n    b: int = field(default=0, hash=False)\n"),
    ("@dataclass(eq=False)", "    a: int\n"),
    ("@dataclass(eq=False, slots=True)", "    a: int\n    b: list = field(default_factory=list)\n"),
    ("@dataclass(slots=True)", "    a: int\n"),
    ("@dataclass(repr=False)", "    a: int\n"),
    ("@dataclass", "    a: int\n    def __hash__(self):\n        return 7\n"),
    ("@dataclass", "    a: int\n    def __repr__(self):\n        return 'mine'\n"),
    ("@dataclass(order=True)", "    a: int\n"),
    ("@dataclass(unsafe_hash=True)", "    a: int\n"),
]


@pytest.mark.parametrize("decorator, body", BODIES)
def test_same_behaviour_as_the_standard_decorator(decorator, body):
    std, ours = _pair(body, decorator)
    fields = [f.name for f in dataclasses.fields(std)]
    args = [(1, "y"), (1, "y"), (2, "y")] if len(fields) > 1 else [(1,), (1,), (2,)] if fields else [(), (), ()]
    s = [std(*a[:len(fields)]) for a in args]
    o = [ours(*a[:len(fields)]) for a in args]
    assert [f.name for f in dataclasses.fields(ours)] == fields
    if std.__repr__ is not object.__repr__:
        assert [repr(x).replace("test_records._pair.<locals>.", "") for x in o] == \
            [repr(x).replace("test_records._pair.<locals>.", "") for x in s]
    assert (o[0] == o[1], o[0] == o[2], o[0] != o[1], o[0] == 1) == (s[0] == s[1], s[0] == s[2], s[0] != s[1],
                                                                     s[0] == 1)
    assert (ours.__hash__ is None) == (std.__hash__ is None)
    if std.__hash__ is not None:
        same_hash = hash(s[0]) == hash(s[1])
        assert (hash(o[0]) == hash(o[1])) == same_hash
        if std.__hash__ is not object.__hash__:
            assert hash(o[0]) == hash(s[0])
    assert dataclasses.replace(o[0]) == o[0] or std.__eq__ is object.__eq__


def test_subclasses_and_recursion():
    std, ours = _pair("    a: int\n    b: object = None\n")
    for cls in (std, ours):
        sub = dataclasses.dataclass(type("Sub", (cls,), {"__annotations__": {"c": "int"}, "c": 0}))
        assert sub(1, None, 2) != sub(1, None, 3) and sub(1, None, 2) == sub(1, None, 2)
        assert sub(1) != cls(1)  # another class: not equal, as the standard __eq__
    loop_std, loop_ours = std(1), ours(1)
    loop_std.b, loop_ours.b = loop_std, loop_ours
    assert repr(loop_ours).replace("test_records._pair.<locals>.", "") == \
        repr(loop_std).replace("test_records._pair.<locals>.", "")


def test_the_engine_model_uses_it():
    """Every dataclass of activator's modules gets the shared methods (a new module using the standard
    decorator still works, it only starts slower)."""
    plain = []
    for info in pkgutil.iter_modules(activator.__path__):
        if info.name.startswith("_") or info.name in ("pytest_plugin",):
            continue
        module = importlib.import_module(f"activator.{info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and dataclasses.is_dataclass(value) and value.__module__ == module.__name__:
                made_by = {getattr(getattr(value, m), "__code__", None) and getattr(value, m).__code__.co_filename
                           for m in ("__repr__", "__eq__")}
                if made_by & {"<string>", dataclasses.__file__}:  # compiled for this class at import
                    plain.append(f"{module.__name__}.{value.__qualname__}")
    assert plain == []


def test_frozen_slots_post_init_and_factories():
    """What the engine's classes rely on, beside the standard decorator's own behaviour."""
    made = []
    for dc, fd in ((dataclasses.dataclass, field), (_dataclass, records.field)):
        @dc(frozen=True)
        class Frozen:
            a: int
            b: list = fd(default_factory=list)

        @dc(eq=False, slots=True)
        class Slotted:
            a: int
            b: dict = fd(default_factory=dict)

        @dc
        class Post:
            a: int
            doubled: int = 0

            def __post_init__(self):
                self.doubled = 2 * self.a

        made.append((Frozen, Slotted, Post))
    for Frozen, Slotted, Post in made:
        f = Frozen(1)
        with pytest.raises(AttributeError):
            f.a = 2
        with pytest.raises(AttributeError):
            del f.a
        assert f.b == [] and Frozen(1).b is not f.b  # a fresh default per instance
        s = Slotted(1)
        assert not hasattr(s, "__dict__") and s.b == {}
        with pytest.raises(AttributeError):
            s.c = 1
        assert Post(3).doubled == 6 and Post(a=4).doubled == 8
        assert dataclasses.replace(Post(3), a=5).doubled == 10
        with pytest.raises(TypeError):
            Post()
        with pytest.raises(TypeError):
            Post(1, 2, 3)
    ours = made[1]
    assert records.replace(ours[2](3), a=7).doubled == 14
    assert [f.name for f in records.fields(ours[0])] == ["a", "b"]
    assert records.is_record(ours[0](1)) and not records.is_record(ours[0])
    assert ours[2].__match_args__ == ("a", "doubled")


def test_mistakes_are_refused_as_the_standard_decorator_does():
    with pytest.raises(ValueError):
        @_dataclass
        class Mutable:
            a: list = []  # noqa: RUF012 - the mistake under test
    with pytest.raises(TypeError):
        @_dataclass
        class Order:
            a: int = 0
            b: int
    with pytest.raises(ValueError):
        records.field(default=1, default_factory=int)


def test_the_run_path_does_not_import_dataclasses():
    """The point of the module: `activator run` never imports dataclasses (nor inspect with it)."""
    import subprocess
    import sys

    code = ("import sys, activator.commands, activator.supervisor, activator.config, activator.control; "
            "print(sorted(m for m in ('dataclasses', 'inspect', 'ast', 'dis', 'tokenize') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


_EVERY_KIND = (
    "    a: int\n"
    "    b: str = 'x'\n"
    "    c: list = field(default_factory=list)\n"
    "    d: int = field(default=5, init=False)\n"
    "    e: dict = field(default_factory=dict, init=False)\n"
    "    def __post_init__(self):\n"
    "        object.__setattr__(self, 'seen', (self.a, self.b, list(self.c), self.d, dict(self.e)))\n"
)
_CALLS = [((1,), {}), ((1, "y"), {}), ((1, "y", [2]), {}), ((), {"a": 1, "c": [3]}), ((1,), {"b": "z"}),
          ((), {"c": [], "b": "", "a": 0})]
_BAD_CALLS = [((), {}), ((1, "y", [], 4), {}), ((1,), {"a": 2}), ((1,), {"d": 2}), ((1,), {"zz": 0}),
              ((), {"b": "only"}), ((1,), {"self": 0})]


@pytest.mark.parametrize("decorator", ["@dataclass", "@dataclass(frozen=True)", "@dataclass(slots=True)",
                                       "@dataclass(frozen=True, slots=True)", "@dataclass(eq=False)"])
def test_the_first_instances_and_the_compiled_init_make_the_same_objects(decorator):
    """A class's first COMPILE_AFTER instances are made without compiling anything, the rest by the compiled
    __init__: the same fields, defaults, fresh factory values and __post_init__ as the standard decorator's,
    and for a call that does not bind, the interpreter's own TypeError, word for word."""
    without_post_init = _EVERY_KIND.split("    def __post_init__")[0]
    # (a slots class has no room for the attribute __post_init__ sets)
    std, ours = _pair(without_post_init if "slots" in decorator else _EVERY_KIND, decorator)

    def state(obj):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)} | (
            {"seen": obj.seen} if hasattr(obj, "seen") else {})

    assert "<record" not in getattr(ours.__init__, "__code__").co_filename
    made = []
    for round_ in range(records.COMPILE_AFTER // len(_CALLS) + 2):
        for args, kwargs in _CALLS:
            expect, got = std(*args, **kwargs), ours(*args, **kwargs)
            assert state(got) == state(expect), (round_, args, kwargs)
            made.append(got)
    assert getattr(ours.__init__, "__code__").co_filename.startswith("<record")  # compiled by now
    assert made[0].c is not made[len(_CALLS)].c and made[0].e is not made[1].e  # factories called each time
    fresh_std, fresh_ours = _pair(without_post_init, decorator)
    for args, kwargs in _BAD_CALLS:  # before any instance: the generic path hands these to the compiled one
        with pytest.raises(TypeError) as want:
            fresh_std(*args, **kwargs)
        with pytest.raises(TypeError) as have:
            fresh_ours(*args, **kwargs)
        assert str(have.value).split("__init__()")[-1] == str(want.value).split("__init__()")[-1]


def test_the_factory_sentinel_means_the_factory_on_both_paths():
    """The compiled __init__ calls the factory for its own placeholder; so does the plan (found by review)."""
    @records.dataclass
    class R:
        x: int
        items: list = records.field(default_factory=list)

    made = [R(1, records._HAS_FACTORY) for _ in range(records.COMPILE_AFTER + 2)]
    assert getattr(R.__init__, "__code__").co_filename.startswith("<record")
    assert all(r.items == [] for r in made) and made[0].items is not made[-1].items
