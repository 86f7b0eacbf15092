"""Random (version 4) UUID strings, drawn from the OS's randomness in blocks.

``str(uuid.uuid4())`` reads 16 bytes from ``os.urandom`` per id: a system call that releases the
GIL, and a thread that releases the GIL while another one computes waits up to the switch
interval (5 ms) to get it back. The event loop makes an id per event (and per saga), next to
the worker threads writing to the database, so it reads 4 KiB at a time instead: the same
randomness, one call per 256 ids. Each thread has its own block, and a forked child starts
afresh, so that no two processes hand out the same ids.
"""

from __future__ import annotations

import os
import threading

_BLOCK = 16 * 256

# Version 4 (random) and the RFC 4122 variant, as ``uuid.uuid4`` sets them.
_CLEAR = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_SET = (0x4000 << 64) | (0x8000 << 48)


class _Block(threading.local):
    data = b""
    pos = 0


_block = _Block()


def _forget_block() -> None:
    global _block
    _block = _Block()


os.register_at_fork(after_in_child=_forget_block)


def new_uuid4() -> str:
    """A random UUID in its canonical text form (what ``str(uuid.uuid4())`` returns)."""
    block = _block
    pos = block.pos
    if pos >= len(block.data):
        block.data, pos = os.urandom(_BLOCK), 0
    block.pos = pos + 16
    h = "%032x" % (int.from_bytes(block.data[pos : pos + 16], "big") & _CLEAR | _SET)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
