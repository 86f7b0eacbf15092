"""A faster ``__init__`` for the frozen, slotted dataclasses built on hot paths.

A frozen dataclass's generated ``__init__`` stores each field with ``object.__setattr__`` (its
own ``__setattr__`` refuses): a global lookup and a generic call per field, which made building
the records of a relay round (12 fields each, a thousand per round) cost more than reading them
from the database. Storing through the slots' own descriptors does the same thing at a third of
the cost. The class stays frozen: only ``__init__`` changes, with the same signature, defaults,
default factories and ``__post_init__`` call.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["fast_init", "fast_replace", "unchecked_init"]

T = TypeVar("T")


def fast_init(cls: type[T]) -> type[T]:
    """Give ``cls`` (a frozen dataclass with ``slots=True``) an ``__init__`` that stores through
    the slot descriptors. Refuses, at import time, what it does not reproduce: keyword-only or
    ``init=False`` fields, ``InitVar`` parameters."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"fast_init: {cls.__qualname__} is not a frozen dataclass with slots")
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    generated = list(inspect.signature(cls.__init__).parameters.values())[1:]
    # An InitVar is a parameter of the generated __init__ but not a field: not reproduced here.
    if [p.name for p in generated] != [f.name for f in fields]:
        raise TypeError(f"fast_init: {cls.__qualname__}'s __init__ takes more than its fields")
    # What the body needs, passed into a factory as arguments (as dataclasses does): the
    # generated function keeps the class module's globals, so its annotations resolve
    # (typing.get_type_hints, inspect.signature(eval_str=True)) as the original's do.
    closure: dict[str, Any] = {}
    args: list[str] = []
    body: list[str] = []
    for i, f in enumerate(fields):
        if not f.init or f.kw_only:
            raise TypeError(f"fast_init: {cls.__qualname__}.{f.name} is init=False or kw_only")
        closure[f"_set{i}"] = _slot(cls, f.name).__set__
        value = f.name
        if f.default is not dataclasses.MISSING:
            closure[f"_default{i}"] = f.default
            args.append(f"{f.name}=_default{i}")
        elif f.default_factory is not dataclasses.MISSING:
            # The generated __init__'s own "not given" marker, so the signatures are equal.
            closure[f"_given{i}"] = generated[i].default
            closure[f"_factory{i}"] = f.default_factory
            args.append(f"{f.name}=_given{i}")
            value = f"_factory{i}() if {f.name} is _given{i} else {f.name}"
        else:
            args.append(f.name)
        body.append(f"        _set{i}(self, {value})")
    clash = {f.name for f in fields} & {*closure, "self", "__init__", "unchecked"}
    if clash:
        raise TypeError(f"fast_init: {cls.__qualname__} has a field named {sorted(clash)[0]}")
    stores = "\n".join(body or ["        pass"])
    post_init = "\n        self.__post_init__()" if hasattr(cls, "__post_init__") else ""
    # ``unchecked``: the same stores without ``__post_init__`` (see ``unchecked_init``).
    source = (
        f"def __create_fn__({', '.join(closure)}):\n"
        f"    def __init__(self, {', '.join(args)}) -> None:\n{stores}{post_init}\n"
        f"    def unchecked(self, {', '.join(args)}) -> None:\n{stores}\n"
        "    return __init__, unchecked"
    )
    module = sys.modules.get(cls.__module__)
    namespace: dict[str, Any] = {}
    # Our own generated source, as dataclasses itself does.
    exec(source, module.__dict__ if module is not None else {}, namespace)
    init, unchecked = namespace["__create_fn__"](**closure)
    _UNCHECKED[cls] = unchecked
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    init.__doc__ = cls.__init__.__doc__
    init.__annotations__ = dict(cls.__init__.__annotations__)
    setattr(cls, "__init__", init)  # noqa: B010 - mypy refuses assigning a method
    return cls


_UNCHECKED: dict[type, Callable[..., None]] = {}


def unchecked_init(cls: type) -> Callable[..., None]:
    """The ``__init__`` that ``fast_init`` gave ``cls``, without its ``__post_init__`` call:
    ``unchecked_init(cls)(object.__new__(cls), ...)`` builds an instance (defaults and
    factories applied) from values the caller has already checked."""
    return _UNCHECKED[cls]


def _slot(cls: type, name: str) -> types.MemberDescriptorType:
    for klass in cls.__mro__:
        found = klass.__dict__.get(name)
        if isinstance(found, types.MemberDescriptorType):
            return found
    raise TypeError(f"fast_init: {cls.__qualname__}.{name} is not a slot")


_KEEP: Any = object()


def fast_replace(cls: type[T]) -> Callable[..., T]:
    """``dataclasses.replace`` for ``cls`` (a ``fast_init`` class), at about half the cost.

    ``replace`` reads the class's fields and builds a dict of keyword arguments on every call;
    this function's keyword-only parameters are the fields, each defaulting to "keep". An
    unknown field is a ``TypeError``, as with ``replace``. Saga runs replace a step record a
    few times per step.
    """
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    names = [f.name for f in fields]
    clash = set(names) & {"obj", "_KEEP", "_cls"}
    if clash:
        raise TypeError(f"fast_replace: {cls.__qualname__} has a field named {sorted(clash)[0]}")
    params = ", ".join(f"{n}=_KEEP" for n in names)
    values = ", ".join(f"obj.{n} if {n} is _KEEP else {n}" for n in names)
    namespace: dict[str, Any] = {}
    # Our own generated source, as fast_init's.
    exec(
        f"def replace(obj, /, *, {params}):\n    return _cls({values})\n",
        {"_KEEP": _KEEP, "_cls": cls},
        namespace,
    )
    function: Callable[..., T] = namespace["replace"]
    function.__qualname__ = f"replace_{cls.__name__}"
    return function
