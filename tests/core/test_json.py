"""``check_json``: inputs and results are stored as JSON, so anything else is refused up front.

Properties:

* every JSON value (nested dicts with str keys, lists, tuples, str, int, bool, None, finite
  floats) is accepted, and what is accepted can be stored: ``dumps`` succeeds and ``loads`` gives
  the value back (tuples as lists);
* a single bad part planted anywhere in such a value (a set, bytes, an object, NaN or infinity,
  a non-str key) raises ``TypeError`` whose message names the full key path to it, e.g.
  ``context['order'][2]['amount']``;
* ``dumps`` writes exactly what ``json.dumps`` (sorted keys, no NaN) writes, also after it
  refused a value midway through the same containers;
* ``loads`` of any text returns what ``json.loads`` returns, or raises what it raises: JSON as
  ``dumps`` writes it, as other writers space it, cut short, padded, or any other text;
* ``copy_json`` of a JSON value (also one holding subclasses, e.g. an ``OrderedDict``) equals
  ``copy.deepcopy`` of it, keeps every container's type, and shares no mutable container.
"""

from __future__ import annotations

import copy
import datetime
import decimal
import json
import math
from collections import OrderedDict, UserDict
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saga_core._json import check_json, check_json_object, copy_json, dumps, loads

keys = st.text(max_size=8)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=20,
)

BAD_VALUES: list[object] = [
    {1, 2},
    b"bytes",
    object(),
    math.nan,
    math.inf,
    -math.inf,
    1j,
    decimal.Decimal("1.5"),
    datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc),
]
BAD_KEYS: list[object] = [1, None, (1, 2), 1.5, True]


def normalise(value: Any) -> Any:
    """What a JSON round trip gives back: tuples become lists."""
    if isinstance(value, Mapping):
        return {k: normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalise(v) for v in value]
    return value


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_json_values_are_accepted_and_round_trip(value: Any) -> None:
    check_json(value, "context")
    assert loads(dumps(value)) == normalise(value)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(keys, json_values, max_size=4))
def test_check_json_object_returns_an_equal_dict(value: dict[str, Any]) -> None:
    result = check_json_object(value, "context")
    assert result == value
    assert type(result) is dict


@st.composite
def planted(draw: st.DrawFn) -> tuple[Any, str]:
    """A JSON value with exactly one bad part, and the path that must be named."""
    value = draw(json_values)
    bad_key = draw(st.booleans())
    bad: object = draw(st.sampled_from(BAD_KEYS if bad_key else BAD_VALUES))

    def plant(node: Any, path: str) -> tuple[Any, str]:
        """Go down a random child or plant the bad part here (always, at a scalar)."""
        children: list[Any] = []
        if isinstance(node, dict):
            children = list(node)
        elif isinstance(node, (list, tuple)):
            children = list(range(len(node)))
        go_down: bool = draw(st.booleans())
        if children and go_down:
            child = draw(st.sampled_from(children))
            sub, where = plant(node[child], f"{path}[{child!r}]")
            if isinstance(node, tuple):
                return (*node[:child], sub, *node[child + 1 :]), where
            copy = dict(node) if isinstance(node, dict) else list(node)
            copy[child] = sub
            return copy, where
        if bad_key:
            return {bad: node}, path
        if isinstance(node, dict):
            key = draw(keys.filter(lambda k: k not in node))
            return {**node, key: bad}, f"{path}[{key!r}]"
        if isinstance(node, list):
            index = draw(st.integers(0, len(node)))
            return [*node[:index], bad, *node[index:]], f"{path}[{index}]"
        return bad, path

    return plant(value, "context")


@settings(max_examples=300, deadline=None)
@given(planted())
def test_one_bad_part_is_named_by_its_full_path(case: tuple[Any, str]) -> None:
    value, path = case
    with pytest.raises(TypeError) as info:
        check_json(value, "context")
    assert path in str(info.value)


def test_examples() -> None:
    with pytest.raises(TypeError, match=r"context\['order'\]\[2\]\['amount'\]"):
        check_json({"order": [1, 2, {"amount": decimal.Decimal("1")}]}, "context")
    with pytest.raises(TypeError, match=r"result\['when'\]"):
        check_json({"when": datetime.date(2024, 1, 1)}, "result")
    with pytest.raises(TypeError, match="nan"):
        check_json({"x": math.nan}, "context")
    with pytest.raises(TypeError, match=r"context\['m'\].*key 3"):
        check_json({"m": {3: "x"}}, "context")


def test_check_json_object_needs_a_mapping() -> None:
    value: object
    for value in ([], "text", 1, None):
        with pytest.raises(TypeError, match="context"):
            check_json_object(value, "context")


@pytest.mark.parametrize(
    "value",
    [
        {"nested": MappingProxyType({"a": 1})},
        {"nested": UserDict({"a": 1})},
        [MappingProxyType({})],
    ],
    ids=["mappingproxy", "userdict", "mappingproxy-in-list"],
)
def test_what_is_accepted_can_be_stored(value: object) -> None:
    """Accepted input must be storable: otherwise the error comes later, from ``json.dumps``,
    without the key path (and, for a step result, after the step acted)."""
    try:
        check_json(value, "context")
    except TypeError:
        return
    assert loads(dumps(value)) is not None


def _containers(value: Any) -> list[Any]:
    """Every dict, list and tuple inside ``value``, itself included."""
    found: list[Any] = []
    if isinstance(value, (dict, list, tuple)):
        found.append(value)
        children = value.values() if isinstance(value, dict) else value
        for child in children:
            found.extend(_containers(child))
    return found


@settings(max_examples=200, deadline=None)
@given(json_values | st.dictionaries(keys, json_values, max_size=3).map(OrderedDict))
def test_copy_json_is_a_deep_copy(value: Any) -> None:
    copied = copy_json(value)
    assert copied == copy.deepcopy(value)
    originals, copies = _containers(value), _containers(copied)
    assert [type(c) for c in copies] == [type(c) for c in originals]
    mutable_ids = {id(c) for c in originals if not isinstance(c, tuple)}
    assert not any(id(c) in mutable_ids for c in copies if not isinstance(c, tuple))


@given(json_values, st.sampled_from(BAD_VALUES), st.booleans())
def test_dumps_is_the_canonical_json_dumps_even_after_a_failure(
    value: Any, bad: object, fail_first: bool
) -> None:
    """``dumps`` (one C encoder per thread, reused) writes exactly what ``json.dumps`` with
    sorted keys and no NaN writes; a value it refuses leaves nothing behind that changes a
    later call, even one on the very containers the failure happened in."""
    box: list[Any] = [value]
    if fail_first:
        box.append(bad)
        with pytest.raises((TypeError, ValueError)):
            dumps({"wrapped": box})  # fails inside ``box``, after marking it
        box.pop()
    expected = json.dumps({"wrapped": box}, sort_keys=True, separators=(",", ":"), allow_nan=False)
    assert dumps({"wrapped": box}) == expected
    assert dumps(value) == json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def test_dumps_refuses_a_value_that_contains_itself_and_recovers() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular reference"):
        dumps(loop)
    loop.clear()
    assert dumps(loop) == "[]"
    assert dumps({"a": loop, "b": loop}) == '{"a":[],"b":[]}'  # shared, not circular


def test_a_dumps_made_while_another_runs_on_the_same_thread_is_independent() -> None:
    """Code that runs midway through an encoding (a dict subclass's ``items()``, a ``__del__``,
    a gc callback) may call ``dumps`` itself: it must not see the outer call's containers as
    circular, nor clear what the outer call has marked."""
    nested: list[str] = []

    class Chatty(dict[str, Any]):
        def items(self) -> Any:
            if not nested:
                nested.append("")  # the nested call meets this dict too: do not nest again
                nested[0] = dumps(outer)  # ``outer`` is being encoded by the calling dumps
            return super().items()

    outer = {"list": [1, 2], "chatty": Chatty(b=2, a=1)}
    expected = '{"chatty":{"a":1,"b":2},"list":[1,2]}'
    assert dumps(outer) == expected
    assert nested == [expected]
    assert dumps(outer) == expected  # nothing was left marked


def _json_texts() -> st.SearchStrategy[str]:
    written = json_values.map(dumps)
    spaced = json_values.map(lambda v: json.dumps(v, indent=1))  # jsonb-like spacing
    return st.one_of(
        written,
        spaced,
        st.tuples(written, st.integers(0, 40)).map(lambda t: t[0][: t[1]]),  # cut short
        st.tuples(
            st.sampled_from(["", " ", "\n", "x", "}"]),
            written,
            st.sampled_from(["", " ", "\t", "1", "{"]),
        ).map("".join),
        st.text(max_size=20),
        st.sampled_from(["NaN", "-Infinity", '"\\ud800"', "[1,]", "{}", '{"a":1}{"b":2}', "1e999"]),
    )


@given(_json_texts())
def test_loads_is_json_loads(text: str) -> None:
    """``loads`` (the C scanner alone, when the text is one value with nothing around it) is
    ``json.loads`` for any text, errors included."""
    try:
        expected: Any = json.loads(text)
    except ValueError as exc:
        with pytest.raises(type(exc)) as caught:
            loads(text)
        assert str(caught.value) == str(exc)
        return
    got = loads(text)
    assert got == expected or (got != got and expected != expected)  # NaN is not equal to NaN
    assert type(got) is type(expected)
    assert loads(None) is None
