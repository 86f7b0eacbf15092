"""``OutboxWorker``: relays committed outbox events to the broker, one publisher per key.

It claims *keys* (not rows), publishes each key's events in sequence order, waits for the
broker's acknowledgement, then advances the key guarded by its claim token. No database
transaction is open while publishing (DESIGN.md section 4).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from saga_core._publish_batches import PublishBatches
from saga_core.errors import BrokerUnavailable, ErrorRecord, StorageError
from saga_core.events import Message, OutboxEvent
from saga_core.ports import Broker, OutboxStore
from saga_core.records import ClaimedKey

log = logging.getLogger("saga.outbox")

#: A claimed key's publish result: the claim, how many of its events were acknowledged, and
#: the error of the first one refused.
_Outcome = tuple[ClaimedKey, int, str | None]


def to_message(event_topic: str, key: str, payload: str, headers: Mapping[str, str]) -> Message:
    """The broker message for a stored event (the same shape on every broker).

    ``headers`` is used as it is, not copied: adapters only read a message's headers.
    """
    return Message(topic=event_topic, key=key, value=payload.encode(), headers=headers)


@dataclass
class _Flight:
    """What one relay pass holds between the database and the broker.

    Every round it claimed is in ``unpublished`` from its claim until its publish returns, then
    its outcomes are in ``unrecorded`` until their completion commits. However the pass ends,
    the published rounds are recorded and the others given back (``OutboxWorker._settle``).
    """

    unpublished: list[list[ClaimedKey]] = field(default_factory=list)
    unrecorded: list[_Outcome] = field(default_factory=list)
    #: The first failure of a publish or of the database work beside it, raised once both end.
    error: Exception | None = None
    sent: int = 0

    async def keep_failure(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """``await fn(*args)``, keeping a failure here instead of raising it: the work beside
        it (a publish, a recording) must be allowed to finish."""
        try:
            await fn(*args)
        except Exception as exc:
            self.fail(exc)

    def fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc
        else:
            log.debug("relay: another failure in the same step: %r", exc)

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


class OutboxWorker:
    """Relays pending outbox events from ``storage`` to ``broker``.

    ``drain()`` relays everything pending and returns (scripts, tests); ``run()`` keeps polling
    until cancelled. Broker outages pause the relay with backoff and use up no attempts; an event
    the broker refuses ``max_attempts`` times is marked ``DEAD`` and blocks its key (later events
    of that key wait, so order is kept; other keys flow).

    While it has work, the database side and the broker overlap: round n is published while
    round n-1 is recorded and round n+1 claimed. Rounds in flight hold disjoint keys (a key
    stays claimed until its completion commits), so each key keeps its order.

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
        # Whether to claim the next round while one is published: not after a failed publish
        # (during an outage it would only be given back), again after one that went through.
        self._claim_ahead = True

    async def relay_once(self) -> int:
        """Claim one batch of keys, publish it, record the outcome; returns events published.

        Raises ``BrokerUnavailable`` (after giving the keys back) when the broker is down.
        """
        flight = _Flight()
        async with self._settling(flight):
            claims = await self._claim(flight)
            if claims:
                await self._publish(flight, claims)
                flight.raise_error()
                await self._record(flight)
        return flight.sent

    async def drain(self) -> int:
        """Relay until no key is claimable; returns how many events were published.

        When it returns, everything it published is recorded. A key backing off after a refused
        event is not claimable until its retry time, so ``drain`` can return while such a key
        still has events pending.
        """
        return await self._pass()

    async def run(self) -> None:
        """Relay until cancelled: poll with jitter, back off while the broker is unavailable."""
        outage = 0.0
        while True:
            try:
                await self._pass()
                outage = 0.0
            except (BrokerUnavailable, StorageError) as exc:
                # Neither an outage of the broker nor of the database may stop the relay (or
                # whatever runs beside it); back off and try again.
                outage = min(max(outage * 2, 0.5), 30.0)
                log.warning("relay paused %.1fs: %s", outage, exc)
                await anyio.sleep(outage)
                continue
            # A pass ends when a claim found nothing. Polling with jitter is the guarantee; a
            # storage with notifications opted in wakes us as soon as a writer commits.
            wait = getattr(self.storage, "wait_for_outbox", None)
            timeout = self.poll_interval * random.uniform(0.5, 1.5)
            if wait is None:
                await anyio.sleep(timeout)
            else:
                await wait(timeout)

    async def _pass(self) -> int:
        """Relay until a claim, made after every earlier round was recorded, finds nothing;
        returns how many events were published."""
        flight = _Flight()
        async with self._settling(flight):
            claims = await self._claim(flight)
            while claims or flight.unrecorded:
                if claims:
                    claims = await self._overlap(flight, claims)
                else:  # the last round is published: record it, then look for more
                    await self._record(flight)
                    claims = await self._claim(flight)
        return flight.sent

    async def _overlap(self, flight: _Flight, claims: list[ClaimedKey]) -> list[ClaimedKey]:
        """Publish ``claims`` while recording the rounds published before and claiming the next
        round; returns the next round. None of the three stops another: once all end, the first
        failure is raised (and ``_settling`` records or gives back what each round holds).

        Recording and claiming go side by side too: neither ever waits for a lock the other
        holds (the claim skips locked rows and takes only unclaimed keys, so never those being
        recorded), and a key is claimable again only once its recording committed.
        """
        # Only the rounds published before this one: a pass ends on a claim made after every
        # recording, so this round is recorded by the next step, before the next claim.
        earlier = len(flight.unrecorded)
        following: list[ClaimedKey] = []

        async def claim_next() -> None:
            following.extend(await self._claim(flight))

        async with anyio.create_task_group() as tg:
            tg.start_soon(flight.keep_failure, self._record, flight, earlier)
            if self._claim_ahead:
                tg.start_soon(flight.keep_failure, claim_next)
            await self._publish(flight, claims)
        flight.raise_error()
        return following

    async def _claim(self, flight: _Flight) -> list[ClaimedKey]:
        # Shielded: a claim made must be known, to be published or given back.
        with anyio.CancelScope(shield=True):
            claims = await self.storage.claim_outbox(
                self.owner,
                max_keys=self.batch_keys,
                max_events=self.batch_events,
                claim_seconds=self.claim_seconds,
            )
            if claims:
                flight.unpublished.append(claims)
        return claims

    async def _publish(self, flight: _Flight, claims: list[ClaimedKey]) -> None:
        """Publish one round: its outcomes wait in ``flight`` to be recorded. A failure is kept
        in ``flight``, not raised, so that the database work beside it can finish."""
        try:
            results = await self.broker.publish(_messages(claims))
        except Exception as exc:
            self._claim_ahead = False
            flight.fail(exc)
            return
        self._claim_ahead = True
        outcomes = _outcomes(claims, results)
        flight.unpublished = [r for r in flight.unpublished if r is not claims]
        flight.unrecorded.extend(outcomes)
        sent = sum(n for _, n, _ in outcomes)
        flight.sent += sent
        self.published += sent

    async def _record(self, flight: _Flight, count: int | None = None) -> None:
        """Record the outcomes of the published rounds (the first ``count`` outcomes, or all).
        Shielded: what the broker took must not be left unrecorded by a cancellation (it would
        be sent again)."""
        with anyio.CancelScope(shield=True):
            outcomes = flight.unrecorded[:count]
            del flight.unrecorded[:count]
            if not outcomes:
                return
            try:
                await self.storage.complete_outbox_many(
                    outcomes, retry_in=self.retry_backoff, dead_after=self.max_attempts
                )
            except BaseException:
                flight.unrecorded[:0] = outcomes
                raise

    @contextlib.asynccontextmanager
    async def _settling(self, flight: _Flight) -> AsyncIterator[None]:
        """On any way out but success (a failure, a cancellation), record the rounds the broker
        took and give back the keys of the others, then let the exception go on."""
        try:
            yield
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._settle(flight)
            raise

    async def _settle(self, flight: _Flight) -> None:
        # Best effort: a claim left behind expires after claim_seconds and is sent again.
        if flight.unrecorded:
            try:
                await self._record(flight)
            except Exception as exc:
                log.warning(
                    "relay: a published round is not recorded, it will be sent again: %s", exc
                )
        for claims in flight.unpublished:
            for claim in claims:
                try:
                    await self.storage.release_outbox(claim, retry_in=0.0)
                except Exception as exc:
                    log.warning("relay: claims not given back, they expire instead: %s", exc)
                    return
        flight.unpublished = []


async def _publish_outcomes(
    storage: OutboxStore,
    broker: Broker,
    claims: Sequence[ClaimedKey],
    *,
    retry_backoff: float,
    dead_after: int,
    follow: int = 0,
) -> list[_Outcome]:
    """Publish the events of claimed keys in one batch and record the outcome per key;
    returns the outcome of every claim published, follow-ups included.

    Each key advances past its acknowledged prefix only; the first refused event counts an
    attempt (and goes ``DEAD`` after ``dead_after``). ``BrokerUnavailable`` gives every key back
    untouched and is raised again. With ``follow``, a key whose events were all sent is kept
    while more of its events are committed, and those are published too.
    """
    outcomes: list[_Outcome] = []
    while claims:
        done, claims = await _publish_round(
            storage,
            broker,
            claims,
            retry_backoff=retry_backoff,
            dead_after=dead_after,
            follow=follow,
        )
        outcomes.extend(done)
    return outcomes


async def _publish_round(
    storage: OutboxStore,
    broker: Broker,
    claims: Sequence[ClaimedKey],
    *,
    retry_backoff: float,
    dead_after: int,
    follow: int,
) -> tuple[list[_Outcome], list[ClaimedKey]]:
    try:
        results = await broker.publish(_messages(claims))
    except BrokerUnavailable:
        with anyio.CancelScope(shield=True):
            for claim in claims:
                await storage.release_outbox(claim, retry_in=0.0)
        raise
    outcomes = _outcomes(claims, results)
    following = await storage.complete_outbox_many(
        outcomes, retry_in=retry_backoff, dead_after=dead_after, follow=follow
    )
    return outcomes, following


def _messages(claims: Sequence[ClaimedKey]) -> list[Message]:
    """The messages of claimed keys, key after key, each key's in sequence order."""
    return [to_message(e.topic, e.key, e.payload, e.headers) for c in claims for e in c.events]


def _outcomes(
    claims: Sequence[ClaimedKey], results: Sequence[BaseException | None]
) -> list[_Outcome]:
    """Each claim with its acknowledged prefix, from the broker's results of ``_messages``."""
    outcomes: list[_Outcome] = []
    start = 0
    for claim in claims:
        end = start + len(claim.events)
        sent, error = _acked_prefix(results[start:end])
        outcomes.append((claim, sent, error))
        start = end
    return outcomes


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
        # Concurrent publishes (thousands of sagas' steps) share broker calls and completions.
        self._batches = PublishBatches(f"optimistic_publishes_{id(self)}", self._publish_all)

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
            sent = await self._batches.submit(live)
        except Exception as exc:
            log.warning("optimistic publish failed (%s); the relay will send it", exc)
            return 0
        self.published += sent
        return sent

    async def _publish_all(self, claims: list[ClaimedKey]) -> list[_Outcome]:
        # Keep each key while its writer commits more of its events (a saga's next step), so
        # they go out at once too instead of waiting for the relay's next poll.
        return await _publish_outcomes(
            self.storage,
            self.broker,
            claims,
            retry_backoff=self.retry_backoff,
            dead_after=self.max_attempts,
            follow=100,
        )


def _acked_prefix(results: Sequence[BaseException | None]) -> tuple[int, str | None]:
    """How many leading messages were acknowledged, and the error of the first that was not.

    Events after a refused one are never counted: a key's order would break.
    """
    for i, r in enumerate(results):
        if r is not None:
            return i, str(ErrorRecord.from_exception(r))
    return len(results), None
