"""Redis Streams adapter (``redis://``, ``rediss://``) on redis-py's sync client.

One stream per topic; an entry holds the fields ``key``, ``value`` and ``headers`` (JSON). A
consumer group is a stream consumer group of the same name on each topic's stream. The sync
client runs in worker threads of the adapter's own (``redis.asyncio`` is asyncio-only).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import anyio
import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from saga_brokers._common import dead_letter_copy, fail_rest_of_key
from saga_brokers._url import parse_url, redact_url
from saga_core._stored_headers import StoredHeaders
from saga_core.consumer import Delivery, default_consumer_name
from saga_core.errors import BrokerError, BrokerUnavailable, PublishFailed
from saga_core.events import Message

__all__ = ["RedisStreamsBroker", "RedisStreamsConsumer"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Trims a stream to about ARGV[1] entries, but never past an entry some consumer group has not
# finished with: the oldest entry pending in a group, or the first one it has not read yet.
# LIMIT caps the trim at the excess over maxlen, so it never keeps fewer than maxlen either.
_TRIM = """
local len = redis.call('XLEN', KEYS[1])
local excess = len - tonumber(ARGV[1])
if excess <= 0 then return 0 end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local floor_ms, floor_seq = nil, nil
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  local ms, seq
  if info['pending'] > 0 then
    ms, seq = parse(redis.call('XPENDING', KEYS[1], info['name'])[2])
  else
    ms, seq = parse(info['last-delivered-id'])
    seq = seq + 1
  end
  if floor_ms == nil or ms < floor_ms or (ms == floor_ms and seq < floor_seq) then
    floor_ms, floor_seq = ms, seq
  end
end
if floor_ms == nil then
  return redis.call('XTRIM', KEYS[1], 'MAXLEN', '~', ARGV[1])
end
local floor = string.format('%d-%d', floor_ms, floor_seq)
return redis.call('XTRIM', KEYS[1], 'MINID', '~', floor, 'LIMIT', excess)
"""

# Adds each message (KEYS[i]: its stream; ARGV: key, value, headers of each in turn) in order,
# atomically; once one fails, later messages of the same key are not added at all, so a
# consumer can never see a key's event n+1 while event n is being retried.
_ADD = """
local out, failed = {}, {}
for i = 1, #KEYS do
  local key = ARGV[3 * i - 2]
  if failed[key] then
    out[i] = 'skip'
  else
    local res = redis.pcall('XADD', KEYS[i], '*', 'key', key,
                            'value', ARGV[3 * i - 1], 'headers', ARGV[3 * i])
    if type(res) == 'table' and res.err then
      failed[key] = true
      out[i] = res.err
    else
      out[i] = 'ok'
    end
  end
end
return out
"""

_Entry = tuple[bytes, dict[bytes, bytes]]


class RedisStreamsBroker:
    """Publishes each batch as one script of ``XADD`` commands; consumes with consumer groups.

    An acknowledgement means the entry is in the primary's memory (and its AOF, under the
    server's fsync policy); with ``replicas=N`` it also means ``WAIT`` saw ``N`` replicas take
    it. ``maxlen`` trims streams to about that many entries without ever dropping one a
    consumer group still needs (so a lagging group makes the stream grow past it).

    Args:
        url: ``redis://[:password@]host:port/db`` (``rediss://`` for TLS).
        timeout: seconds allowed to connect or for one command (blocking reads excepted).
        maxlen: keep about this many entries per stream (default: no trimming).
        replicas: after publishing, ``WAIT`` for this many replicas.
        claim_idle: seconds after which a message a consumer received and did not acknowledge
            is taken over by another member of the group (it is presumed dead). Must exceed
            the longest time a handler needs, retries included.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        maxlen: int | None = None,
        replicas: int = 0,
        claim_idle: float = 60.0,
    ) -> None:
        self._redacted = redact_url(url)
        self.timeout = timeout
        self.maxlen = maxlen
        self.replicas = replicas
        self.claim_idle = claim_idle
        # One immediate retry on a fresh connection covers a pooled socket the server closed
        # (e.g. it restarted); more retries, or retrying timeouts, would only delay
        # BrokerUnavailable.
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            decode_responses=False,
        )
        self._add = self._client.register_script(_ADD)
        self._trim = self._client.register_script(_TRIM) if maxlen is not None else None
        self._limiter = anyio.CapacityLimiter(8)
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisStreamsBroker({self._redacted!r})"

    async def publish(self, messages: Sequence[Message]) -> Sequence[BaseException | None]:
        """``XADD`` every message in order, in one script call (one round trip, atomic)."""
        if self._closed:
            raise BrokerUnavailable(f"{self!r} is closed")
        if not messages:
            return []
        batch = list(messages)
        # A cancelled publish has an unknown outcome whatever the thread does next, so the
        # caller need not wait for it (it ends within ``timeout`` on its own).
        results = await self._call(lambda: self._publish(batch), self._limiter, abandon=True)
        return fail_rest_of_key(batch, results)

    async def consumer(
        self, topics: Sequence[str], group: str, *, name: str | None = None
    ) -> RedisStreamsConsumer:
        """Create group ``group`` on each topic's stream (from its first entry) if missing."""
        if isinstance(topics, str) or not topics:
            raise ValueError("consumer() needs a non-empty sequence of topic names")
        if self._closed:
            raise BrokerUnavailable(f"{self!r} is closed")
        consumer = RedisStreamsConsumer(self, tuple(topics), group, name or default_consumer_name())
        await self._call(consumer._create_groups, consumer._limiter)
        return consumer

    async def aclose(self) -> None:
        """Close the connection pool."""
        if not self._closed:
            self._closed = True
            self._client.close()

    async def _call(
        self, fn: Callable[[], T], limiter: anyio.CapacityLimiter, *, abandon: bool = False
    ) -> T:
        try:
            return await anyio.to_thread.run_sync(fn, limiter=limiter, abandon_on_cancel=abandon)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise BrokerUnavailable(f"Redis at {self._redacted} is unavailable: {exc}") from exc
        except RedisError as exc:
            raise BrokerError(f"Redis at {self._redacted} failed: {exc}") from exc

    def _publish(self, messages: list[Message]) -> list[BaseException | None]:
        args: list[Any] = []
        for m in messages:
            args += _fields(m)
        pipe = self._client.pipeline(transaction=False)
        self._add(keys=[m.topic for m in messages], args=args, client=pipe)
        topics = list(dict.fromkeys(m.topic for m in messages))
        if self._trim is not None:
            for topic in topics:
                self._trim(keys=[topic], args=[int(self.maxlen or 0)], client=pipe)
        if self.replicas:
            pipe.wait(self.replicas, int(self.timeout * 1000))
        replies = pipe.execute(raise_on_error=False)
        for topic, reply in zip(topics, replies[1 : 1 + len(topics)], strict=False):
            if self._trim is not None and isinstance(reply, Exception):
                logger.warning("trimming stream %r failed: %s", topic, reply)
        if self.replicas:
            acked = replies[-1]
            if isinstance(acked, Exception) or int(acked) < self.replicas:
                raise RedisTimeoutError(f"only {acked} of {self.replicas} replicas acknowledged")
        return _add_results(messages, replies[0])


def _add_results(messages: list[Message], reply: Any) -> list[BaseException | None]:
    """Per message: ``None`` if added, else why not (see ``_ADD``)."""
    if isinstance(reply, Exception):  # the whole script was refused (e.g. out of memory)
        return [PublishFailed(f"Redis refused the batch: {reply}") for _ in messages]
    results: list[BaseException | None] = []
    first_failure: dict[str, str] = {}
    for m, status in zip(messages, reply, strict=True):
        text = _text(status)
        if text == "ok":
            results.append(None)
            continue
        event = m.headers.get("event_id", "?")
        if text == "skip":
            earlier = first_failure.get(m.key, "?")
            results.append(
                PublishFailed(f"not sent: event {earlier} of the same key failed before it")
            )
        else:
            first_failure.setdefault(m.key, event)
            results.append(PublishFailed(f"Redis refused event {event} on {m.topic!r}: {text}"))
    return results


#: An entry's fields, in the order ``_fields`` returns them and the publish script adds them.
_FIELD_NAMES = ("key", "value", "headers")

# One encoder for every message: ``json.dumps`` with options builds a new one each time.
_HEADERS = json.JSONEncoder(separators=(",", ":"))


def _fields(message: Message) -> tuple[bytes, bytes, bytes]:
    """The entry's ``key``, ``value`` and ``headers`` fields, in the script's order."""
    headers = message.headers
    if type(headers) is StoredHeaders:  # read from the outbox: sent as stored
        text = headers.json
    else:
        text = _HEADERS.encode(headers if type(headers) is dict else dict(headers))
    return message.key.encode(), message.value, text.encode()


def _message(topic: str, fields: dict[bytes, bytes]) -> Message:
    raw_headers = fields.get(b"headers")
    headers = json.loads(raw_headers) if raw_headers else {}
    return Message(
        topic,
        fields.get(b"key", b"").decode("utf-8", "replace"),
        fields.get(b"value", b""),
        {str(k): str(v) for k, v in headers.items()},
    )


class RedisStreamsConsumer:
    """A member of a stream consumer group.

    It first takes back what it left unacknowledged under the same name, then (every
    ``claim_idle / 2`` seconds) takes over messages other members left unacknowledged for
    ``claim_idle`` seconds, then reads new entries.
    """

    def __init__(
        self, broker: RedisStreamsBroker, topics: tuple[str, ...], group: str, name: str
    ) -> None:
        self._broker = broker
        self._client = broker._client
        self.topics = topics
        self.group = group
        self.name = name
        self._limiter = anyio.CapacityLimiter(1)  # one call at a time, like the protocol
        self._own_from: dict[str, bytes] | None = dict.fromkeys(topics, b"0")
        self._claim_from = dict.fromkeys(topics, b"0-0")
        self._next_claim = 0.0
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisStreamsConsumer(group={self.group!r}, name={self.name!r})"

    async def __aenter__(self) -> RedisStreamsConsumer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def receive(self, max_messages: int = 100, max_wait: float = 1.0) -> list[Delivery]:
        """Own pending messages first, then claimed ones, then new ones (blocking read)."""
        if self._closed:
            raise BrokerError(f"{self!r} is closed")
        taken: list[Delivery] = []

        def work() -> list[Delivery]:
            taken.extend(self._receive(max_messages, max_wait))
            return taken

        try:
            return await self._broker._call(work, self._limiter)
        except BaseException:
            if taken:  # cancelled after reading: they are in our PEL, read them again
                self._own_from = dict.fromkeys(self.topics, b"0")
            raise

    async def ack(self, delivery: Delivery) -> None:
        """``XACK``: the group is done with it."""
        topic, entry_id = _token(delivery)
        await self._broker._call(
            lambda: self._client.xack(topic, self.group, entry_id), self._limiter
        )

    async def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        """Requeue (it stays pending and is read again), or ``XADD`` a copy to the dead-letter
        stream and ``XACK`` it in one transaction."""
        topic, entry_id = _token(delivery)
        if requeue:
            self._own_from = dict.fromkeys(self.topics, b"0")
            return
        copy = dead_letter_copy(delivery.message, self.group, reason)

        def move() -> None:
            pipe = self._client.pipeline(transaction=True)
            pipe.xadd(copy.topic, dict(zip(_FIELD_NAMES, _fields(copy), strict=True)))
            pipe.xack(topic, self.group, entry_id)
            pipe.execute()

        await self._broker._call(move, self._limiter)

    async def aclose(self) -> None:
        """Leave: forget this member's name if it holds nothing (what it holds is claimed by
        another member after ``claim_idle``)."""
        if self._closed or self._broker._closed:
            self._closed = True
            return
        self._closed = True
        with anyio.CancelScope(shield=True), anyio.move_on_after(self._broker.timeout):
            try:
                await self._broker._call(self._forget_name, self._limiter)
            except BrokerError as exc:
                logger.debug("leaving group %r failed: %s", self.group, exc)

    # -- worker thread ---------------------------------------------------------------------

    def _create_groups(self) -> None:
        for topic in self.topics:
            try:
                self._client.xgroup_create(topic, self.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def _forget_name(self) -> None:
        for topic in self.topics:
            mine = self._client.xpending_range(
                topic, self.group, min="-", max="+", count=1, consumername=self.name
            )
            if mine:
                return
        for topic in self.topics:
            self._client.xgroup_delconsumer(topic, self.group, self.name)

    def _receive(self, limit: int, max_wait: float) -> list[Delivery]:
        if self._own_from is not None:
            own = self._read_own(limit)
            if own:
                return own
        now = time.monotonic()
        if now >= self._next_claim:
            self._next_claim = now + self._broker.claim_idle / 2
            claimed = self._claim(limit)
            if claimed:
                return claimed
        block = int(max(0.0, min(max_wait, self._broker.timeout / 2)) * 1000)
        reply = self._client.xreadgroup(
            self.group, self.name, dict.fromkeys(self.topics, ">"), count=limit, block=block or None
        )
        return [
            Delivery(_message(topic, fields), 1, (topic, entry_id))
            for topic, entries in _by_topic(reply)
            for entry_id, fields in entries
        ]

    def _read_own(self, limit: int) -> list[Delivery]:
        assert self._own_from is not None
        streams: Any = self._own_from
        reply = self._client.xreadgroup(self.group, self.name, streams, count=limit)
        out: list[tuple[str, bytes, dict[bytes, bytes]]] = []
        more = False
        for topic, entries in _by_topic(reply):
            if len(entries) == limit:
                more = True
            if entries:
                self._own_from[topic] = entries[-1][0]
            for entry_id, fields in entries:
                if fields:
                    out.append((topic, entry_id, fields))
                else:  # trimmed or deleted while pending: nothing left to deliver
                    self._client.xack(topic, self.group, entry_id)
        if not more:
            self._own_from = None
        return self._with_attempts(out)

    def _claim(self, limit: int) -> list[Delivery]:
        out: list[tuple[str, bytes, dict[bytes, bytes]]] = []
        idle_ms = int(self._broker.claim_idle * 1000)
        for topic in self.topics:
            if len(out) >= limit:
                break
            reply = self._client.xautoclaim(
                topic,
                self.group,
                self.name,
                idle_ms,
                start_id=self._claim_from[topic],
                count=limit - len(out),
            )
            self._claim_from[topic] = reply[0]
            out.extend((topic, entry_id, fields) for entry_id, fields in reply[1] if fields)
            if reply[0] != b"0-0":
                self._next_claim = 0.0  # more to scan: keep going on the next receive
        return self._with_attempts(out)

    def _with_attempts(self, found: list[tuple[str, bytes, dict[bytes, bytes]]]) -> list[Delivery]:
        counts: dict[tuple[str, bytes], int] = {}
        for topic in dict.fromkeys(t for t, _, _ in found):
            ids = [entry_id for t, entry_id, _ in found if t == topic]
            for row in self._client.xpending_range(
                topic,
                self.group,
                min=min(ids, key=_id_key),
                max=max(ids, key=_id_key),
                count=len(ids) * 2,
                consumername=self.name,
            ):
                counts[(topic, cast(bytes, row["message_id"]))] = int(row["times_delivered"])
        return [
            Delivery(_message(topic, fields), counts.get((topic, entry_id), 2), (topic, entry_id))
            for topic, entry_id, fields in found
        ]


def _id_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def _by_topic(reply: Any) -> list[tuple[str, list[_Entry]]]:
    """XREADGROUP's reply (RESP2 list or RESP3 dict) as ``[(topic, entries)]``."""
    if not reply:
        return []
    items = reply.items() if isinstance(reply, dict) else reply
    return [(_text(stream), cast(list[_Entry], entries)) for stream, entries in items]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _token(delivery: Delivery) -> tuple[str, bytes]:
    token = delivery.token
    if not (isinstance(token, tuple) and len(token) == 2 and isinstance(token[1], bytes)):
        raise TypeError(f"{delivery!r} was not received by a Redis Streams consumer")
    return cast(tuple[str, bytes], token)


def _from_url(url: str) -> RedisStreamsBroker:
    """``redis://host:port/db?timeout=5&maxlen=100000&replicas=1&claim_idle=60``."""
    parsed = parse_url(url, default_port=6379, schemes=("redis", "rediss"))
    if len(parsed.hosts) > 1:
        raise ValueError(f"redis:// takes one host, got {parsed.redacted!r}")
    timeout = parsed.pop_float("timeout", 5.0)
    maxlen = parsed.pop_int("maxlen", None, minimum=1)
    replicas = parsed.pop_int("replicas", 0) or 0
    claim_idle = parsed.pop_float("claim_idle", 60.0)
    from urllib.parse import urlencode, urlsplit

    rest = urlsplit(url)._replace(query=urlencode(parsed.options)).geturl()
    return RedisStreamsBroker(
        rest, timeout=timeout, maxlen=maxlen, replicas=replicas, claim_idle=claim_idle
    )
