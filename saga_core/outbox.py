"""``OutboxWorker``: relays committed outbox events to the broker, one publisher per key.

It claims *keys* (not rows), publishes each key's events in sequence order, waits for the
broker's acknowledgement, then advances the key guarded by its claim token. No database
transaction is open while publishing (DESIGN.md section 4).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import uuid
from collections.abc import Sequence
from typing import Any

import anyio

from saga_core.errors import BrokerUnavailable, ErrorRecord, StorageError
from saga_core.events import Message, OutboxEvent
from saga_core.ports import Broker, OutboxStore
from saga_core.records import ClaimedKey

log = logging.getLogger("saga.outbox")


def to_message(event_topic: str, key: str, payload: str, headers: dict[str, str]) -> Message:
    """The broker message for a stored event (the same shape on every broker)."""
    return Message(topic=event_topic, key=key, value=payload.encode(), headers=headers)


class OutboxWorker:
    """Relays pending outbox events from ``storage`` to ``broker``.

    ``drain()`` relays everything pending and returns (scripts, tests); ``run()`` keeps polling
    until cancelled. Broker outages pause the relay with backoff and use up no attempts; an event
    the broker refuses ``max_attempts`` times is marked ``DEAD`` and blocks its key (later events
    of that key wait, so order is kept; other keys flow).

    Args:
        storage: the outbox store.
        broker: the broker to publish to.
        batch_keys: keys claimed per round trip.
        batch_events: events per key per round.
        claim_seconds: how long a claim lasts (a relay that dies frees its keys after this).
        poll_interval: idle polling period of ``run()``, jittered.
        max_attempts: refusals before an event goes ``DEAD``.
        retry_backoff: seconds a key waits after a refused event.
    """

    def __init__(
        self,
        storage: OutboxStore,
        broker: Broker,
        *,
        batch_keys: int = 100,
        batch_events: int = 100,
        claim_seconds: float = 30.0,
        poll_interval: float = 0.2,
        max_attempts: int = 10,
        retry_backoff: float = 1.0,
        owner: str | None = None,
    ) -> None:
        if batch_keys < 1 or batch_events < 1 or max_attempts < 1:
            raise ValueError("batch_keys, batch_events and max_attempts must be >= 1")
        self.storage = storage
        self.broker = broker
        self.batch_keys = batch_keys
        self.batch_events = batch_events
        self.claim_seconds = claim_seconds
        self.poll_interval = poll_interval
        self.max_attempts = max_attempts
        self.retry_backoff = retry_backoff
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        #: Events acknowledged by the broker since this worker was created.
        self.published = 0

    async def relay_once(self) -> int:
        """Claim one batch of keys, publish it, record the outcome; returns events published.

        Raises ``BrokerUnavailable`` (after giving the keys back) when the broker is down.
        """
        return (await self._round())[1]

    async def _round(self) -> tuple[int, int]:
        """One claim-publish-record round: (keys claimed, events published)."""
        claims = await self.storage.claim_outbox(
            self.owner,
            max_keys=self.batch_keys,
            max_events=self.batch_events,
            claim_seconds=self.claim_seconds,
        )
        if not claims:
            return 0, 0
        sent_total = await publish_claims(
            self.storage,
            self.broker,
            claims,
            retry_backoff=self.retry_backoff,
            dead_after=self.max_attempts,
        )
        self.published += sent_total
        return len(claims), sent_total

    async def drain(self) -> int:
        """Relay until no key is claimable; returns how many events were published.

        A key backing off after a refused event is not claimable until its retry time, so
        ``drain`` can return while such a key still has events pending.
        """
        total = 0
        while True:
            claimed, n = await self._round()
            if claimed == 0:
                return total
            total += n

    async def run(self) -> None:
        """Relay until cancelled: poll with jitter, back off while the broker is unavailable."""
        outage = 0.0
        while True:
            try:
                claimed, _ = await self._round()
                outage = 0.0
            except (BrokerUnavailable, StorageError) as exc:
                # Neither an outage of the broker nor of the database may stop the relay (or
                # whatever runs beside it); back off and try again.
                outage = min(max(outage * 2, 0.5), 30.0)
                log.warning("relay paused %.1fs: %s", outage, exc)
                await anyio.sleep(outage)
                continue
            if claimed == 0:
                # Polling with jitter is the guarantee; a storage with notifications opted in
                # wakes us as soon as a writer commits.
                wait = getattr(self.storage, "wait_for_outbox", None)
                timeout = self.poll_interval * random.uniform(0.5, 1.5)
                if wait is None:
                    await anyio.sleep(timeout)
                else:
                    await wait(timeout)


async def publish_claims(
    storage: OutboxStore,
    broker: Broker,
    claims: Sequence[ClaimedKey],
    *,
    retry_backoff: float,
    dead_after: int,
    follow: int = 0,
) -> int:
    """Publish the events of claimed keys in one batch and record the outcome per key.

    Each key advances past its acknowledged prefix only; the first refused event counts an
    attempt (and goes ``DEAD`` after ``dead_after``). ``BrokerUnavailable`` gives every key back
    untouched and is raised again. With ``follow``, a key whose events were all sent is kept
    while more of its events are committed, and those are published too. Returns how many
    events were acknowledged.
    """
    total = 0
    while claims:
        sent, claims = await _publish_round(
            storage,
            broker,
            claims,
            retry_backoff=retry_backoff,
            dead_after=dead_after,
            follow=follow,
        )
        total += sent
    return total


async def _publish_round(
    storage: OutboxStore,
    broker: Broker,
    claims: Sequence[ClaimedKey],
    *,
    retry_backoff: float,
    dead_after: int,
    follow: int,
) -> tuple[int, list[ClaimedKey]]:
    messages: list[Message] = []
    spans: list[tuple[ClaimedKey, int, int]] = []
    for claim in claims:
        start = len(messages)
        for e in claim.events:
            messages.append(to_message(e.topic, e.key, e.payload, dict(e.headers)))
        spans.append((claim, start, len(messages)))
    try:
        results = await broker.publish(messages)
    except BrokerUnavailable:
        with anyio.CancelScope(shield=True):
            for claim in claims:
                await storage.release_outbox(claim, retry_in=0.0)
        raise
    outcomes = []
    for claim, start, end in spans:
        sent, error = _acked_prefix(results[start:end])
        outcomes.append((claim, sent, error))
    # One transaction for the whole round: per-key transactions dominated the relay's time.
    following = await storage.complete_outbox_many(
        outcomes, retry_in=retry_backoff, dead_after=dead_after, follow=follow
    )
    return sum(sent for _, sent, _ in outcomes), following


class OptimisticPublisher:
    """Publishes an event right after its transaction commits, when that cannot reorder its key.

    In the writer's transaction the event's key is claimed if nobody holds it and the event is
    the key's next one; after commit this publisher sends it and advances the key. Otherwise
    (or if anything goes wrong) the relay sends it: either way one key has one publisher at a
    time, so the shortcut never reorders a key. ``SagaOrchestrator`` and ``SagaWorker`` use it
    for step events when given a broker; application code uses it like this::

        with storage.engine.begin() as conn:
            conn.execute(...)
            claim = publisher.append_outbox(event, conn=conn)
        await publisher.publish([claim])   # after commit
    """

    def __init__(
        self,
        storage: OutboxStore,
        broker: Broker,
        *,
        retry_backoff: float = 1.0,
        max_attempts: int = 10,
    ) -> None:
        self.storage = storage
        self.broker = broker
        self.retry_backoff = retry_backoff
        self.max_attempts = max_attempts
        #: Events acknowledged through the optimistic path.
        self.published = 0

    def append_outbox(self, event: OutboxEvent, *, conn: Any) -> ClaimedKey | None:
        """``storage.append_outbox`` that also claims the key when the event may go at once."""
        return self.storage.append_outbox(event, conn=conn, claim=True)

    async def publish(self, claims: Sequence[ClaimedKey | None], *, committed: bool = False) -> int:
        """Publish claimed events after their commit; returns how many were acknowledged.

        Unless ``committed`` says the caller knows the transaction committed, the claims are
        checked first: a rolled-back transaction left no claim, and publishes nothing. Errors
        are logged, not raised: the relay sends whatever this did not.
        """
        live = [c for c in claims if c is not None]
        if not live:
            return 0
        try:
            if not committed:
                live = await self.storage.committed_claims(live)
                if not live:
                    return 0
            # Keep the key while the writer commits more of its events (a saga's next step),
            # so they go out at once too instead of waiting for the relay's next poll.
            sent = await publish_claims(
                self.storage,
                self.broker,
                live,
                retry_backoff=self.retry_backoff,
                dead_after=self.max_attempts,
                follow=100,
            )
        except Exception as exc:
            log.warning("optimistic publish failed (%s); the relay will send it", exc)
            return 0
        self.published += sent
        return sent


def _acked_prefix(results: Sequence[BaseException | None]) -> tuple[int, str | None]:
    """How many leading messages were acknowledged, and the error of the first that was not.

    Events after a refused one are never counted: a key's order would break.
    """
    for i, r in enumerate(results):
        if r is not None:
            return i, str(ErrorRecord.from_exception(r))
    return len(results), None
