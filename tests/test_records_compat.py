"""activator.records.dataclass where it once differed from dataclasses.dataclass (found by a review)."""
from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest

from activator import records


@records.dataclass
class Base:
    x: int = 0


@dataclasses.dataclass
class StandardSub(Base):  # dataclasses.dataclass on a subclass of a record (the module says this works)
    y: int = 0


@records.dataclass(order=True)  # a form records hands to dataclasses, on a record base
class OrderedSub(Base):
    z: int = 0


@records.dataclass(frozen=True, slots=True)
class FrozenSlots:
    a: int
    b: tuple = ()


@pytest.mark.parametrize("obj", [StandardSub(1, 2), OrderedSub(1, 2)], ids=type)
def test_fields_and_replace_see_the_fields_of_a_standard_subclass(obj):
    """records.fields found the base's __record_fields__ by inheritance: the subclass's own fields were
    missing, so records.replace() reset them and reexec.encode() silently dropped them."""
    assert [f.name for f in records.fields(obj)] == [f.name for f in dataclasses.fields(obj)]
    assert records.replace(obj, x=5) == dataclasses.replace(obj, x=5)


def test_reexec_encode_carries_the_fields_of_a_standard_subclass():
    from activator.reexec import encode

    assert set(encode(OrderedSub(1, 2), "x")["fields"]) == {"x", "z"}


def test_a_dataclasses_field_is_not_taken_as_the_default():
    """Type checkers see records.field as dataclasses.field, and activator's modules imported
    dataclasses.field until this change: that Field object became the (shared) default value."""

    @records.dataclass
    class C:
        items: list = dataclasses.field(default_factory=list)
        n: int = dataclasses.field(default=3, repr=False)

    a, b = C(), C()
    assert a.items == [] and a.items is not b.items
    assert a.n == 3 and repr(a).endswith("(items=[])")


def test_field_accepts_what_dataclasses_field_accepts():
    records.field(default=1, metadata={"doc": "x"})
    records.field(default=1, kw_only=False)


def test_frozen_error_is_a_dataclasses_frozen_instance_error():
    with pytest.raises(dataclasses.FrozenInstanceError):
        records.dataclass(frozen=True)(type("F", (), {"__annotations__": {"a": "int"}}))(1).a = 2


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))],
                         ids=["copy", "deepcopy", "pickle"])
def test_frozen_slots_records_copy_and_pickle(how):
    """dataclasses gives frozen slots classes __getstate__/__setstate__; without them the copy assigns
    the slots with the frozen __setattr__ (FrozenInstanceError)."""
    assert how(FrozenSlots(1, (2,))) == FrozenSlots(1, (2,))


def test_frozen_record_cannot_inherit_from_a_mutable_one():
    with pytest.raises(TypeError, match="cannot inherit frozen"):
        records.dataclass(frozen=True)(type("G", (Base,), {"__annotations__": {"y": "int"}, "y": 0}))
    frozen = records.dataclass(frozen=True)(type("H", (), {"__annotations__": {"a": "int"}, "a": 0}))
    with pytest.raises(TypeError, match="cannot inherit non-frozen"):
        records.dataclass(type("I", (frozen,), {"__annotations__": {"b": "int"}, "b": 0}))
