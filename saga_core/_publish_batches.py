"""Concurrent optimistic publishes share their broker calls and completions.

Thousands of sagas at once each publish a step's event right after its commit. Alone, each is a
broker call (on Kafka, RabbitMQ or Redis a thread hop or a round trip) followed by the record
of its outcome. Here the first publisher that finds nobody publishing leads: it publishes every
claim queued so far in one broker call, records their outcomes together and follows up on each
key, then hands the lead to the oldest publisher still waiting, whose claims came in meanwhile.
Each caller returns once its own claims are done, with how many of its events were
acknowledged. A batch never reorders a key: a key has one claim at a time, so its events are in
one claim, in sequence order, and a key's follow-up is published only after its claim's events.

A caller cancelled while waiting leaves its claims queued: the leader publishes them before it
lets go (the caller never learns how it went); only if the lead had just been handed to that
caller and nobody else waits do they stay queued, for the next caller's batch or, once they
expire, the relay. A leader cancelled during a batch fails the batch's callers, whose claims
then expire and go out through the relay, as a cancelled publish of its own always did.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import anyio

from saga_core._loop_local import LoopLocal, new_event
from saga_core.records import ClaimedKey

#: A claim's publish result: the claim, events acknowledged, the error of the first refused.
Outcome = tuple[ClaimedKey, int, str | None]


class PublishAbandoned(Exception):
    """The batch holding these claims was cancelled: the relay sends them once they expire."""


@dataclass(eq=False)
class _Item:
    """One caller's claims and, once published, how many of their events were acknowledged."""

    claims: Sequence[ClaimedKey]
    sent: int = 0
    error: Exception | None = None
    done: bool = False
    #: Set when the item is done, or when its caller is to lead the next batch.
    wake: anyio.Event | None = None
    lead: bool = False
    abandoned: bool = False


@dataclass(eq=False)
class _Queue:
    items: list[_Item] = field(default_factory=list)
    leading: bool = False


class PublishBatches:
    """Runs ``publish(claims)`` (which returns every outcome, follow-ups included) for the
    claims of concurrent callers, one batch at a time per event loop."""

    def __init__(
        self,
        name: str,
        publish: Callable[[list[ClaimedKey]], Awaitable[list[Outcome]]],
        max_claims: int = 1000,
    ) -> None:
        self._publish = publish
        self._max_claims = max_claims
        self._queue = LoopLocal(name, _Queue)

    async def submit(self, claims: Sequence[ClaimedKey]) -> int:
        """Publish ``claims`` (with others queued meanwhile); returns how many of their
        events were acknowledged. Raises what failed the batch holding them."""
        q = self._queue.get()
        item = _Item(claims)
        q.items.append(item)
        if q.leading:
            item.wake = new_event()
            try:
                await item.wake.wait()
            except BaseException:
                item.abandoned = True
                if item.lead and not item.done:  # the lead handed to us goes on
                    item.lead = False
                    self._hand_over(q, only_waiting=True)
                raise
            if item.done:
                return _result(item)
        else:
            q.leading = True
        try:
            # Until ours is done; then the lead goes to a waiting caller, but claims left by
            # callers that stopped waiting are published first: left queued, they could go
            # out after their claims expired and the relay sent them.
            while not (item.done and self._hand_over(q)):
                await self._flush(self._take(q))
        except BaseException:
            self._hand_over(q, only_waiting=True)
            raise
        return _result(item)

    def _take(self, q: _Queue) -> list[_Item]:
        """The oldest queued items, up to ``max_claims`` claims (at least one item)."""
        count = 0
        for i, item in enumerate(q.items):
            count += len(item.claims)
            if count >= self._max_claims:
                batch, q.items = q.items[: i + 1], q.items[i + 1 :]
                return batch
        batch, q.items = q.items, []
        return batch

    async def _flush(self, batch: list[_Item]) -> None:
        owner: dict[tuple[str, str], _Item] = {}
        claims: list[ClaimedKey] = []
        for item in batch:
            for claim in item.claims:
                owner[claim.key, claim.token] = item
                claims.append(claim)
        try:
            outcomes = await self._publish(claims)
        except Exception as exc:
            _finish(batch, exc)
            return
        except BaseException:
            _finish(batch, PublishAbandoned("the publishing task was cancelled"))
            raise
        for claim, sent, _ in outcomes:
            owner[claim.key, claim.token].sent += sent
        _finish(batch, None)

    @staticmethod
    def _hand_over(q: _Queue, *, only_waiting: bool = False) -> bool:
        """Wake the oldest waiting caller to lead the next batch; else stop leading, unless
        claims of callers that stopped waiting are queued (False: publish them first)."""
        for waiting in q.items:
            if waiting.wake is not None and not waiting.abandoned:
                waiting.lead = True
                waiting.wake.set()
                return True
        if q.items and not only_waiting:
            return False
        # Nobody waits: what is still queued goes with the next caller's batch (or, once its
        # claims expire, with the relay).
        q.leading = False
        return True


def _finish(batch: list[_Item], error: Exception | None) -> None:
    for item in batch:
        item.error = error
        item.done = True
        if item.wake is not None:
            item.wake.set()


def _result(item: _Item) -> int:
    if item.error is not None:
        raise item.error
    return item.sent
