"""JSON checks: inputs and results are stored as JSON, so anything else is refused up front."""

from __future__ import annotations

import copy
import json
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any

JSON = Any  # a value made of dict/list/str/int/float/bool/None; checked at run time by check_json


def _find_bad(value: object, path: str) -> str | None:
    if value is None or isinstance(value, (str, bool, int)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} (non-finite float {value!r})"
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"{path} (key {k!r} is a {type(k).__name__}, keys must be str)"
            bad = _find_bad(v, f"{path}[{k!r}]")
            if bad:
                return bad
        return None
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            bad = _find_bad(v, f"{path}[{i}]")
            if bad:
                return bad
        return None
    return f"{path} (a {type(value).__name__})"


def check_json(value: object, what: str) -> None:
    """Raise ``TypeError`` naming the first part of ``value`` that JSON cannot store.

    Accepts exactly what ``json.dumps`` stores: dict (str keys), list, tuple, str, int, finite
    float, bool and None. Other mappings are refused rather than silently converted.
    """
    try:
        bad = _find_bad(value, what)
    except RecursionError:
        bad = f"{what} (nested too deeply, or contains itself)"
    if bad:
        raise TypeError(f"not JSON-serialisable: {bad}")


def check_json_object(value: object, what: str) -> dict[str, Any]:
    """Like :func:`check_json`, and the value must be a mapping with str keys."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a mapping (dict), got {type(value).__name__}")
    data = dict(value)
    check_json(data, what)
    return data


def copy_json(value: Any) -> Any:
    """A deep copy of a checked JSON value (what ``copy.deepcopy`` gives, faster): dicts, lists
    and tuples are copied, the immutable leaves shared; anything else (a subclass) is handed
    to ``copy.deepcopy``."""
    kind = type(value)
    if kind is dict:
        return {k: copy_json(v) for k, v in value.items()}
    if kind is list:
        return [copy_json(v) for v in value]
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    if kind is tuple:
        return tuple(copy_json(v) for v in value)
    return copy.deepcopy(value)


# One encoder for every call: ``json.dumps`` with options builds a new one each time.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False)


class _Encoder(threading.local):
    """The C encoder behind ``_CANONICAL``, built once per thread.

    ``JSONEncoder.encode`` builds a new one (and a closure) on every call, which cost as much
    as encoding a saga step's payload (commit CPU: 7.8 -> 5.4 us per payload here). One per
    thread, because its marker dict (how it detects a value that contains itself) is shared
    by the calls that use it.
    """

    def __init__(self) -> None:
        #: This thread is inside ``encode``: a ``dumps`` called meanwhile (from a dict
        #: subclass's ``items()``, a ``__del__`` or a gc callback run midway) must not share
        #: its markers, or it would see the outer call's containers as circular and clear them.
        self.busy = False
        self.markers: dict[int, object] = {}
        self.encode: Callable[[object, int], Iterable[str]] | None = None
        if c_make_encoder is not None:
            self.encode = c_make_encoder(
                self.markers, _CANONICAL.default, encode_basestring_ascii, None,
                ":", ",", True, False, False,
            )  # fmt: skip


_LOCAL = _Encoder()


def dumps(value: object) -> str:
    """Canonical JSON text (sorted keys, no NaN) so equal inputs compare equal as text."""
    local = _LOCAL
    if local.encode is None or local.busy:  # no C accelerator, or a call within a call
        return _CANONICAL.encode(value)
    local.busy = True
    try:
        return "".join(local.encode(value, 0))
    except BaseException:
        local.markers.clear()  # a failure midway leaves the containers it was in marked
        raise
    finally:
        local.busy = False


# The C scanner ``json.loads`` ends in. ``json.loads`` first checks the argument's type, skips
# leading whitespace with a regular expression, then checks what follows the value, all in
# Python: three times the cost of the scan itself for a relayed event's headers (1.1 against
# 4.3 us here), paid for every event of a relay round. Text stored by this library has no
# whitespace around it, so the scan alone says everything; anything else goes the long way.
_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def loads(text: str | bytes | None) -> Any:
    """Parse JSON text (what ``json.loads`` returns, or raises); ``None`` stays ``None``."""
    if type(text) is str:
        try:
            value, end = _scan(text, 0)
        except (StopIteration, ValueError):
            pass  # not JSON from its first character: json.loads says why
        else:
            if end == len(text):
                return value
    return None if text is None else json.loads(text)
