"""Headers read back from the outbox (``StoredHeaders``): a read-only mapping equal to the
headers that were stored, which keeps their stored JSON text and parses it only when read.

Properties, for any str -> str headers encoded as the outbox stores them:

* the mapping equals the headers (both ways round), with the same keys, values, items,
  length, ``get`` and ``in`` answers and iteration order as the parsed text;
* ``json`` is the stored text itself, and handing it on (as the Redis adapter does) parses
  nothing: a relay round publishing to Redis never decodes its events' headers.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from saga_core._json import dumps
from saga_core._stored_headers import StoredHeaders

headers = st.dictionaries(st.text(max_size=12), st.text(max_size=24), max_size=8)


@settings(max_examples=200, deadline=None)
@given(headers, st.text(max_size=12))
def test_stored_headers_read_as_the_headers_stored(stored: dict[str, str], probe: str) -> None:
    text = dumps(stored)
    h = StoredHeaders(text)
    assert h == stored and stored == h
    assert dict(h) == stored and len(h) == len(stored)
    assert list(h) == list(json.loads(text))
    assert h.get(probe) == stored.get(probe) and h.get(probe, "-") == stored.get(probe, "-")
    for name, value in stored.items():
        assert h[name] == value
    assert h != {**stored, "extra-header": "x"}
    # The views are the parsed dict's own (faster than the Mapping mixins), and read-only.
    parsed = json.loads(text)
    assert list(h.items()) == list(parsed.items())
    assert list(h.keys()) == list(parsed) and list(h.values()) == list(parsed.values())
    assert (probe in h) == (probe in stored)
    assert not hasattr(h.items(), "__setitem__")


@settings(max_examples=50, deadline=None)
@given(headers)
def test_the_stored_text_is_handed_on_without_parsing(stored: dict[str, str]) -> None:
    text = dumps(stored)
    h = StoredHeaders(text)
    assert h.json is text
    assert h._parsed is None  # nothing read yet: nothing parsed
    h.get("event_id")
    assert h._parsed == stored
