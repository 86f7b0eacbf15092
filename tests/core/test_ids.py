"""Random UUID strings drawn from blocks of OS randomness (saga_core._ids)."""

from __future__ import annotations

import os
import threading
import uuid

import pytest

from saga_core._ids import new_uuid4


def test_ids_are_canonical_version_4_uuids_and_distinct() -> None:
    ids = [new_uuid4() for _ in range(3 * 256 + 7)]  # across several blocks
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert str(parsed) == text  # canonical: lower-case, hyphenated


def test_threads_draw_distinct_ids() -> None:
    seen: list[list[str]] = [[] for _ in range(4)]

    def draw(out: list[str]) -> None:
        out.extend(new_uuid4() for _ in range(1000))

    threads = [threading.Thread(target=draw, args=(out,)) for out in seen]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for out in seen for i in out]
    assert len(set(every)) == len(every) == 4000


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    """The block is process memory: a child that kept it would hand out the very ids the
    parent hands out next (two workers forked from one parent, the same event ids)."""
    new_uuid4()  # a block is loaded, with ids left in it
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids and leave at once
        try:
            os.write(write, ",".join(new_uuid4() for _ in range(10)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        child = f.read().split(",")
    os.waitpid(pid, 0)
    parent = [new_uuid4() for _ in range(10)]
    assert len(child) == 10
    assert not set(child) & set(parent)
