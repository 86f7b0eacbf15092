"""Kafka adapter (``kafka://``) on kafka-python, a sync client run in worker threads.

Each message goes to its topic with the event key as the Kafka key (so one key's events share a
partition and its order) and every header as a Kafka header (UTF-8 values). Consumers are
members of a consumer group that commit offsets by hand, after handling.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import anyio

with warnings.catch_warnings():
    # kafka-python 3.0 loads its protocol schemas with importlib.resources.read_text, which
    # warns on Python 3.11/3.12; applications running with -W error must still import it.
    warnings.filterwarnings(
        "ignore", r"(read|open)_text is deprecated", category=DeprecationWarning
    )
    import kafka.errors as kafka_errors
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.partitioner import DefaultPartitioner, murmur2
    from kafka.structs import OffsetAndMetadata, TopicPartition

from saga_brokers._common import dead_letter_copy, fail_rest_of_key
from saga_brokers._kafka_partitions import KeyPartitioner, known_partitions
from saga_brokers._url import BrokerUrl, parse_url
from saga_core.consumer import Delivery, default_consumer_name
from saga_core.errors import BrokerError, BrokerUnavailable, PublishFailed
from saga_core.events import Message

__all__ = ["KafkaBroker", "KafkaGroupConsumer"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Refusals about one message, not about reaching Kafka: they count as a delivery attempt.
_MESSAGE_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    *(
        getattr(kafka_errors, name)
        for name in (
            "MessageSizeTooLargeError",
            "RecordListTooLargeError",
            "InvalidTopicError",
            "TopicAuthorizationFailedError",
            "CorruptRecordError",
            "CorruptRecordException",
            "InvalidRecordError",
            "UnsupportedForMessageFormatError",
            "PolicyViolationError",
            "InvalidTimestampError",
        )
        if hasattr(kafka_errors, name)
    ),
)

# Settings that make an acknowledgement mean "stored"; not configurable from the URL.
_MANAGED = frozenset(
    {
        "bootstrap_servers",
        "acks",
        "enable_idempotence",
        "transactional_id",
        "retries",
        "max_in_flight_requests_per_connection",
        "key_serializer",
        "value_serializer",
        "key_deserializer",
        "value_deserializer",
        "group_id",
        "enable_auto_commit",
        "auto_offset_reset",
        "max_block_ms",
        "delivery_timeout_ms",
        "bootstrap_timeout_ms",
        "api_version_auto_timeout_ms",
    }
)


class KafkaBroker:
    """Publishes with ``acks="all"`` and an idempotent producer; consumes as a group member.

    An acknowledgement means every in-sync replica of the partition has the message. A key's
    messages share a partition; the idempotent producer (or one request in flight where
    kafka-python lacks idempotence) keeps them in order across retries, and a message refused
    before sending (too large, bad topic) stops the rest of its key in the batch from being
    sent. Each publish is bounded by ``timeout``; when
    Kafka cannot be reached ``BrokerUnavailable`` is raised and the producer is replaced (an
    idempotent producer does not survive a cluster that lost its state).

    Args:
        bootstrap_servers: ``["host:port", ...]``.
        timeout: seconds allowed to connect, or to publish one batch and get it acknowledged.
        producer_config / consumer_config: further kafka-python settings (security, client id,
            session timeouts...); see :func:`_from_url` for how URL options map onto them.
    """

    def __init__(
        self,
        bootstrap_servers: Sequence[str],
        *,
        timeout: float = 5.0,
        producer_config: dict[str, Any] | None = None,
        consumer_config: dict[str, Any] | None = None,
        redacted_url: str | None = None,
    ) -> None:
        self.bootstrap_servers = list(bootstrap_servers)
        self.timeout = timeout
        self._producer_config = dict(producer_config or {})
        self._consumer_config = dict(consumer_config or {})
        self._redacted = redacted_url or ",".join(self.bootstrap_servers)
        self._producer: Any = None
        self._producer_lock = threading.Lock()
        self._idle = threading.Condition()
        self._in_flight = 0  # publishing threads, including ones whose caller was cancelled
        self._limiter = anyio.CapacityLimiter(4)
        self._keys = KeyPartitioner(murmur2)
        self._closed = False

    def __repr__(self) -> str:
        return f"KafkaBroker({self._redacted!r})"

    async def publish(self, messages: Sequence[Message]) -> Sequence[BaseException | None]:
        """Send the batch, then wait for every acknowledgement (all within ``timeout``)."""
        if self._closed:
            raise BrokerUnavailable(f"{self!r} is closed")
        if not messages:
            return []
        batch = list(messages)
        # A cancelled publish has an unknown outcome whatever the thread does next, so the
        # caller need not wait for it (it ends within about ``timeout`` on its own).
        results = await anyio.to_thread.run_sync(
            self._publish, batch, limiter=self._limiter, abandon_on_cancel=True
        )
        return fail_rest_of_key(batch, results)

    async def consumer(
        self, topics: Sequence[str], group: str, *, name: str | None = None
    ) -> KafkaGroupConsumer:
        """Join ``group`` on ``topics``; a group without committed offsets starts at the
        oldest retained message. Joining completes during the first ``receive``."""
        if isinstance(topics, str) or not topics:
            raise ValueError("consumer() needs a non-empty sequence of topic names")
        if self._closed:
            raise BrokerUnavailable(f"{self!r} is closed")
        member = KafkaGroupConsumer(self, tuple(topics), group, name or default_consumer_name())
        await member._call(member._open)
        return member

    async def aclose(self) -> None:
        """Flush nothing more: close the producer (unsent records are dropped)."""
        if self._closed:
            return
        self._closed = True

        def close() -> None:
            # Publishes whose callers were cancelled still run: let them end (each is bounded
            # by the timeout) so that no thread or socket outlives the broker.
            with self._idle:
                self._idle.wait_for(lambda: self._in_flight == 0, timeout=2 * self.timeout + 1)
            self._discard_producer(self.timeout)  # nothing is buffered: this joins its thread

        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(close, limiter=anyio.CapacityLimiter(1))

    # -- worker threads ------------------------------------------------------------------------

    def _unavailable(self, exc: BaseException) -> BrokerUnavailable:
        return BrokerUnavailable(f"Kafka at {self._redacted} is unavailable: {exc}")

    def _get_producer(self) -> Any:
        with self._producer_lock:
            if self._producer is None:
                ms = int(self.timeout * 1000)
                config: dict[str, Any] = {
                    "bootstrap_servers": self.bootstrap_servers,
                    "acks": "all",
                    "max_block_ms": ms,
                    "request_timeout_ms": ms,
                    **self._producer_config,
                }
                config["delivery_timeout_ms"] = config["request_timeout_ms"] + config.get(
                    "linger_ms", 0
                )
                defaults = KafkaProducer.DEFAULT_CONFIG
                for key in ("bootstrap_timeout_ms", "api_version_auto_timeout_ms"):
                    if key in defaults:
                        config[key] = ms
                if "enable_idempotence" in defaults:
                    config["enable_idempotence"] = True
                else:  # no idempotence: one request in flight keeps a key's order on retries
                    config["max_in_flight_requests_per_connection"] = 1
                self._producer = _construct(KafkaProducer, **config)
            return self._producer

    def _discard_producer(self, timeout: float = 0) -> None:
        with self._producer_lock:
            producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            producer.close(timeout=timeout)
        except Exception as exc:
            # kafka-python flushes first and, when records cannot be delivered, raises before
            # it stops its network thread, which would then retry forever. Close it without
            # flushing: what is still buffered is dropped (it was never acknowledged).
            logger.debug("closing the Kafka producer failed (%s); closing without flushing", exc)
            producer.flush = lambda timeout=None: None
            try:
                producer.close(timeout=0)
            except Exception as again:
                logger.warning("could not close the Kafka producer: %s", again)

    def _publish(self, messages: list[Message]) -> list[BaseException | None]:
        with self._idle:
            self._in_flight += 1
        try:
            return self._publish_batch(messages)
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def _publish_batch(self, messages: list[Message]) -> list[BaseException | None]:
        deadline = time.monotonic() + self.timeout
        try:
            producer = self._get_producer()
            sent: list[Any] = []
            refused: dict[str, str] = {}  # key -> event refused before sending
            layouts: dict[str, tuple[int, ...]] = {}  # topic -> its partitions, if known
            for m in messages:
                if m.key in refused:
                    # Never let a later event of a key out after an earlier one was refused.
                    sent.append(
                        PublishFailed(
                            f"not sent: event {refused[m.key]} of the same key failed before it"
                        )
                    )
                    continue
                try:
                    sent.append(self._send(producer, m, layouts))
                except _MESSAGE_ERRORS as exc:
                    sent.append(exc)
                    refused[m.key] = m.headers.get("event_id", "?")
            producer.flush(timeout=max(0.0, deadline - time.monotonic()))
            return [_outcome(item, m) for m, item in zip(messages, sent, strict=True)]
        except _MESSAGE_ERRORS:
            raise
        except Exception as exc:
            # Timeouts, lost connections, a producer fenced by a restarted cluster: nothing in
            # this batch is known to be stored, and the producer starts afresh next time.
            self._discard_producer()
            raise self._unavailable(exc) from exc

    def _send(self, producer: Any, m: Message, layouts: dict[str, tuple[int, ...]]) -> Any:
        """``producer.send`` for ``m``, with the partition the default partitioner would pick
        when the topic's partitions are known (``layouts`` keeps them for the batch)."""
        key = m.key.encode()  # a lone surrogate refuses this message only
        headers = [(k, v.encode()) for k, v in m.headers.items()]
        partitions = layouts.get(m.topic)
        if partitions is None:
            partitions = layouts[m.topic] = known_partitions(producer, m.topic, DefaultPartitioner)
        if not partitions:
            return producer.send(m.topic, key=key, value=m.value, headers=headers)
        partition = self._keys.partition(partitions, key)
        try:
            # The default partitioner's choice, made for less (see the module).
            return producer.send(
                m.topic, key=key, value=m.value, headers=headers, partition=partition
            )
        except ValueError:
            # The producer's metadata may have changed since the batch read it (a topic
            # recreated with fewer partitions): then choose again from what it knows now.
            # Any other refusal is this message's own (send enqueues nothing before raising).
            fresh = known_partitions(producer, m.topic, DefaultPartitioner)
            if partition in fresh:
                raise
            layouts[m.topic] = fresh
            return producer.send(
                m.topic,
                key=key,
                value=m.value,
                headers=headers,
                partition=self._keys.partition(fresh, key) if fresh else None,
            )


def _construct(cls: Any, *args: Any, **config: Any) -> Any:
    """``cls(*args, **config)``, closing its network client if the constructor fails (it
    bootstraps, and kafka-python leaves the client's sockets open when that times out)."""
    clients: list[Any] = []
    make_client = config.pop("kafka_client", cls.DEFAULT_CONFIG["kafka_client"])

    def tracked(**client_config: Any) -> Any:
        client = make_client(**client_config)
        clients.append(client)
        return client

    try:
        return cls(*args, **config, kafka_client=tracked)
    except BaseException:
        for client in clients:
            try:
                client.close()
            except Exception as exc:  # already broken: nothing more to release
                logger.debug("closing a Kafka client failed: %s", exc)
        raise


def _outcome(item: Any, message: Message) -> PublishFailed | None:
    """``None`` for an acknowledged send; raises what is not about this one message."""
    if isinstance(item, PublishFailed):
        return item
    if isinstance(item, BaseException):
        exc: BaseException | None = item
    elif not item.is_done:
        raise kafka_errors.KafkaTimeoutError("no acknowledgement within the timeout")
    else:
        exc = item.exception
    if exc is None:
        return None
    if not isinstance(exc, _MESSAGE_ERRORS):
        raise exc
    event = message.headers.get("event_id", "?")
    return PublishFailed(f"Kafka refused event {event} on {message.topic!r}: {exc}")


class KafkaGroupConsumer:
    """A member of a Kafka consumer group, committing offsets only when told to (``ack``).

    Acknowledgements are cumulative per partition: acknowledging a message commits the
    offset after it. ``reject(requeue=True)`` seeks back, so later messages of that partition
    come again too. Attempts are counted only within this member (Kafka keeps no count).
    """

    def __init__(self, broker: KafkaBroker, topics: tuple[str, ...], group: str, name: str) -> None:
        self._broker = broker
        self.topics = topics
        self.group = group
        self.name = name
        self._consumer: Any = None
        self._limiter = anyio.CapacityLimiter(1)  # KafkaConsumer is not thread-safe
        self._attempts: dict[tuple[TopicPartition, int], int] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"KafkaGroupConsumer(group={self.group!r}, name={self.name!r})"

    async def __aenter__(self) -> KafkaGroupConsumer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _call(self, fn: Callable[[], T]) -> T:
        try:
            return await anyio.to_thread.run_sync(fn, limiter=self._limiter)
        except BrokerError:
            raise
        except kafka_errors.CommitFailedError as exc:
            raise BrokerError(
                f"{self!r}: commit refused (partitions were reassigned): {exc}"
            ) from exc
        except (kafka_errors.KafkaError, OSError) as exc:
            raise self._broker._unavailable(exc) from exc

    def _open(self) -> None:
        ms = int(self._broker.timeout * 1000)
        config: dict[str, Any] = {"client_id": self.name, **self._broker._consumer_config}
        if "bootstrap_timeout_ms" in KafkaConsumer.DEFAULT_CONFIG:
            config["bootstrap_timeout_ms"] = ms
        self._consumer = _construct(
            KafkaConsumer,
            *self.topics,
            bootstrap_servers=self._broker.bootstrap_servers,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **config,
        )

    async def receive(self, max_messages: int = 100, max_wait: float = 1.0) -> list[Delivery]:
        """Poll up to ``max_messages`` records; per partition in offset order."""
        if self._closed:
            raise BrokerError(f"{self!r} is closed")
        taken: list[Delivery] = []

        def poll() -> list[Delivery]:
            batches = self._consumer.poll(timeout_ms=int(max_wait * 1000), max_records=max_messages)
            for records in batches.values():
                taken.extend(self._delivery(r) for r in records)
            return taken

        try:
            return await self._call(poll)
        except BaseException:
            if taken:  # cancelled after polling: rewind so they are fetched again
                self._rewind(taken)
            raise

    def _delivery(self, record: Any) -> Delivery:
        tp = TopicPartition(record.topic, record.partition)
        attempt = self._attempts.get((tp, record.offset), 0) + 1
        self._attempts[(tp, record.offset)] = attempt
        headers = {k: (v or b"").decode("utf-8", "replace") for k, v in record.headers or ()}
        key = (record.key or b"").decode("utf-8", "replace")
        message = Message(record.topic, key, record.value or b"", headers)
        return Delivery(message, attempt, (tp, record.offset))

    def _rewind(self, deliveries: Sequence[Delivery]) -> None:
        first: dict[TopicPartition, int] = {}
        for d in deliveries:
            tp, offset = _token(d)
            first[tp] = min(offset, first.get(tp, offset))
        for tp, offset in first.items():
            try:
                if tp in self._consumer.assignment():
                    self._consumer.seek(tp, offset)
            except kafka_errors.KafkaError as exc:  # no longer assigned: the new owner reads it
                logger.debug("rewinding %s failed: %s", tp, exc)

    async def ack(self, delivery: Delivery) -> None:
        """Commit the offset after this message (and so everything before it in its partition)."""
        tp, offset = _token(delivery)
        await self._call(lambda: self._commit(tp, offset))

    def _commit(self, tp: TopicPartition, offset: int) -> None:
        fields = [offset + 1, ""] + [-1] * (len(OffsetAndMetadata._fields) - 2)
        self._consumer.commit(
            {tp: OffsetAndMetadata(*fields)}, timeout_ms=int(self._broker.timeout * 1000)
        )
        self._attempts = {k: v for k, v in self._attempts.items() if k[0] != tp or k[1] > offset}

    async def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        """Seek back to it (``requeue``), or publish a copy to ``<group>.dlq`` and commit."""
        tp, offset = _token(delivery)
        if requeue:
            await self._call(lambda: self._rewind([delivery]))
            return
        copy = dead_letter_copy(delivery.message, self.group, reason)

        def move() -> None:
            (result,) = self._broker._publish([copy])
            if result is not None:
                raise BrokerError(f"could not dead-letter to {copy.topic!r}: {result}")
            self._commit(tp, offset)

        await self._call(move)

    async def aclose(self) -> None:
        """Leave the group without committing; uncommitted messages are delivered again."""
        if self._closed:
            return
        self._closed = True
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            timeout_ms = int(self._broker.timeout * 1000)

            def close() -> None:
                try:
                    consumer.close(autocommit=False, timeout_ms=timeout_ms)
                except Exception as exc:  # leaving is best effort: the session expires anyway
                    logger.debug("closing %r failed: %s", self, exc)

            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(close, limiter=self._limiter)


def _token(delivery: Delivery) -> tuple[TopicPartition, int]:
    token = delivery.token
    if not (isinstance(token, tuple) and len(token) == 2 and isinstance(token[0], TopicPartition)):
        raise TypeError(f"{delivery!r} was not received by a Kafka consumer")
    return token[0], int(token[1])


#: Settings a URL can carry: those whose default is a plain value (not a class or object).
_SCALARS = (str, int, float, bool, type(None))


def _convert(parsed: BrokerUrl, name: str, raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise parsed._bad(f"option {name}={raw!r} is not a boolean")
    if isinstance(default, (int, float)):
        try:
            return type(default)(raw)
        except ValueError:
            raise parsed._bad(f"option {name}={raw!r} is not a number") from None
    return raw


def _from_url(url: str) -> KafkaBroker:
    """``kafka://[user:password@]host:port[,host2:port]?timeout=5&client_id=...&...``.

    Query options are kafka-python settings (``client_id``, ``security_protocol``,
    ``sasl_mechanism``, ``ssl_cafile``, ``session_timeout_ms``, ...), each passed to the
    producer and/or consumer that knows it; ``timeout`` (seconds) is the adapter's own. A user
    and password become ``sasl_plain_username`` / ``sasl_plain_password``. Settings that decide
    what an acknowledgement means (``acks``, ``enable_idempotence``...) are refused.
    """
    parsed = parse_url(url, default_port=9092, schemes=("kafka",))
    if not parsed.hosts:
        raise ValueError(f"kafka:// needs at least one host:port, got {parsed.redacted!r}")
    timeout = parsed.pop_float("timeout", 5.0)
    producer: dict[str, Any] = {}
    consumer: dict[str, Any] = {}
    if parsed.username is not None:
        producer["sasl_plain_username"] = consumer["sasl_plain_username"] = parsed.username
    if parsed.password is not None:
        producer["sasl_plain_password"] = consumer["sasl_plain_password"] = parsed.password
    for name in list(parsed.options):
        if name in _MANAGED:
            raise parsed._bad(f"option {name} is fixed by saga-outbox (acks mean stored)")
        known = False
        for target, defaults in (
            (producer, KafkaProducer.DEFAULT_CONFIG),
            (consumer, KafkaConsumer.DEFAULT_CONFIG),
        ):
            if name in defaults and isinstance(defaults[name], _SCALARS):
                target[name] = _convert(parsed, name, parsed.options[name], defaults[name])
                known = True
        if known:
            del parsed.options[name]
    parsed.reject_unknown("timeout and kafka-python producer/consumer settings")
    hosts = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in parsed.hosts]
    return KafkaBroker(
        hosts,
        timeout=timeout,
        producer_config=producer,
        consumer_config=consumer,
        redacted_url=parsed.redacted,
    )
