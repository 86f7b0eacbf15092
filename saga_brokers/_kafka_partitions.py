"""Keyed partitioning for the Kafka adapter, as kafka-python's ``DefaultPartitioner`` does it.

The default partitioner puts a keyed message on ``sorted(partitions)[murmur2(key) & 0x7fffffff
% len(partitions)]`` (the Java client's choice, so other producers agree). kafka-python computes
that for every ``send``: a pure-Python murmur2 of the key, plus sorting the topic's partitions
and listing the available ones, about a fifth of a send's CPU here. The relay sends the same
keys again and again (every event of an aggregate has its key), so the adapter remembers each
key's hash and, once per batch, each topic's sorted partitions, and passes the partition to
``send``: the same partition, chosen for less.

Only with kafka-python's own default partitioner (a user's partitioner decides for itself) and
no key serializer (the partitioner hashes the serialized key), and only once the producer knows
the topic's partitions: until then ``send`` chooses (and waits for the metadata, and reports
what fails, as it always did). Should the partitions shrink after the batch read them (a topic
recreated), ``send`` refuses the partition and the adapter lets it choose instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["KeyPartitioner", "known_partitions"]

#: Keys whose hash is kept (a few MB at most). A relay round holds 100 keys by default
#: (``OutboxWorker(batch_keys=...)``); past this many the memory is given back and hashing
#: starts afresh.
MAX_KEYS = 16_384


class KeyPartitioner:
    """Each key's partition as kafka-python's ``DefaultPartitioner`` would choose it, given
    its hash function (``kafka.partitioner.murmur2``; passed in, so that this module does not
    import kafka-python, whose import must be guarded, see saga_brokers.kafka)."""

    def __init__(self, hash_key: Callable[[bytes], int], max_keys: int = MAX_KEYS) -> None:
        self._hash_key = hash_key
        self._max_keys = max_keys
        self._hashes: dict[bytes, int] = {}  # threads share it: dict get/set are atomic

    def partition(self, partitions: Sequence[int], key: bytes) -> int:
        """``key``'s partition among ``partitions`` (sorted, not empty)."""
        h = self._hashes.get(key)
        if h is None:
            if len(self._hashes) >= self._max_keys:
                self._hashes.clear()
            h = self._hashes[key] = self._hash_key(key) & 0x7FFFFFFF
        return partitions[h % len(partitions)]


def known_partitions(producer: Any, topic: str, default: type) -> tuple[int, ...]:
    """The topic's partitions, sorted, if ``producer``'s partitioner is of type ``default``
    (kafka-python's ``DefaultPartitioner``), it has no key serializer, and it already knows
    them; else ``()``: let ``send`` choose.

    Reads the producer's cluster metadata as ``send`` does before it partitions (kafka-python
    has no public call that does not wait for metadata it lacks); a client without it is
    left to partition for itself.
    """
    if type(producer.config.get("partitioner")) is not default:
        return ()
    if producer.config.get("key_serializer") is not None:
        return ()  # the partitioner hashes the serialized key, which only send computes
    metadata = getattr(producer, "_metadata", None)
    lookup = getattr(metadata, "partitions_for_topic", None)
    if lookup is None:
        return ()
    return tuple(sorted(lookup(topic) or ()))
