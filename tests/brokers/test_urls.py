"""Choosing and configuring a broker by URL (no server needed: adapters connect lazily)."""

from __future__ import annotations

import sys

import pytest

import saga_brokers
from saga_brokers import InMemoryBroker, create_broker, redact_url, register_broker
from saga_brokers.kafka import KafkaBroker
from saga_brokers.rabbitmq import RabbitMQBroker
from saga_brokers.redis_streams import RedisStreamsBroker
from saga_core.consumer import ConsumingBroker


def test_each_scheme_picks_its_adapter() -> None:
    assert isinstance(create_broker("memory://"), InMemoryBroker)
    assert isinstance(create_broker("kafka://127.0.0.1:9092"), KafkaBroker)
    assert isinstance(create_broker("amqp://guest:guest@127.0.0.1:5672/"), RabbitMQBroker)
    assert isinstance(create_broker("amqps://u:p@rabbit.example/vhost"), RabbitMQBroker)
    assert isinstance(create_broker("redis://127.0.0.1:6379/0"), RedisStreamsBroker)
    assert isinstance(create_broker("rediss://cache.example:6380/1"), RedisStreamsBroker)


@pytest.mark.parametrize(
    "url",
    ["memory://", "kafka://h:9092", "amqp://guest:guest@h/", "redis://h:6379/0"],
)
def test_every_adapter_can_consume(url: str) -> None:
    assert isinstance(create_broker(url), ConsumingBroker)


def test_saga_broker_url_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGA_BROKER_URL", "redis://127.0.0.1:6379/3?maxlen=10")
    broker = create_broker()
    assert isinstance(broker, RedisStreamsBroker)
    assert broker.maxlen == 10
    monkeypatch.delenv("SAGA_BROKER_URL")
    assert isinstance(create_broker(), InMemoryBroker)


def test_an_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(
        ValueError, match=r"unknown broker URL scheme 'nats'.*amqp.*kafka.*redis"
    ) as info:
        create_broker("nats://user:secret@127.0.0.1:4222")
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "module", "extra"),
    [
        ("kafka://h:9092", "kafka", "kafka"),
        ("amqp://h/", "aio_pika", "rabbitmq"),
        ("redis://h:6379/0", "redis", "redis"),
    ],
)
def test_a_missing_client_library_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, url: str, module: str, extra: str
) -> None:
    scheme = url.split(":", 1)[0]
    adapter = saga_brokers._REGISTRY[scheme][0].split(":")[0]
    monkeypatch.setitem(sys.modules, module, None)  # makes "import <module>" fail
    monkeypatch.delitem(sys.modules, adapter, raising=False)
    monkeypatch.setattr(saga_brokers, "_FACTORIES", {})
    with pytest.raises(ImportError, match=rf"pip install 'saga-outbox\[{extra}\]'"):
        create_broker(url)


def test_register_broker_adds_a_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(saga_brokers, "_FACTORIES", dict(saga_brokers._FACTORIES))
    monkeypatch.setattr(saga_brokers, "_REGISTRY", dict(saga_brokers._REGISTRY))
    made = InMemoryBroker()
    register_broker("custom", lambda url: made)
    assert create_broker("custom://x") is made


def test_redact_url_hides_passwords_and_secret_options() -> None:
    assert redact_url("amqp://guest:guest@h:5672/v") == "amqp://guest:***@h:5672/v"
    assert redact_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    redacted = redact_url("kafka://h1:9092,h2:9092?sasl_plain_password=s3&client_id=a")
    assert "s3" not in redacted and "client_id=a" in redacted
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


def test_kafka_options_map_onto_producer_and_consumer_settings() -> None:
    broker = create_broker(
        "kafka://alice:s3cret@k1:9093,k2?timeout=2.5&client_id=shop&linger_ms=5"
        "&session_timeout_ms=6000&security_protocol=SASL_SSL&sasl_mechanism=PLAIN"
        "&ssl_check_hostname=false"
    )
    assert isinstance(broker, KafkaBroker)
    assert broker.bootstrap_servers == ["k1:9093", "k2:9092"]
    assert broker.timeout == 2.5
    producer, consumer = broker._producer_config, broker._consumer_config
    assert producer["linger_ms"] == 5 and "linger_ms" not in consumer
    assert consumer["session_timeout_ms"] == 6000 and "session_timeout_ms" not in producer
    for config in (producer, consumer):
        assert config["client_id"] == "shop"
        assert config["security_protocol"] == "SASL_SSL"
        assert config["sasl_plain_username"] == "alice"
        assert config["sasl_plain_password"] == "s3cret"
        assert config["ssl_check_hostname"] is False
    assert "s3cret" not in repr(broker)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("kafka://h:9092?acks=1", "fixed by saga-outbox"),
        ("kafka://h:9092?enable_idempotence=false", "fixed by saga-outbox"),
        ("kafka://h:9092?no_such_option=1", "unknown option"),
        ("kafka://h:9092?linger_ms=soon", "not a number"),
        ("kafka://h:9092?timeout=0", "out of range"),
        ("kafka://h:9092?timeout=1&timeout=2", "given twice"),
        ("kafka://", "at least one host"),
        ("kafka://h:99999", "bad port"),
        ("redis://h:6379/0?maxlen=0", ">= 1"),
        ("redis://a,b/0", "one host"),
        ("amqp://u:p@h/?prefetch=x", "not an integer"),
        ("memory://?x=1", "takes no"),
    ],
)
def test_bad_urls_are_refused_clearly(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_broker(url)


def test_bad_url_errors_never_show_the_password() -> None:
    with pytest.raises(ValueError, match="unknown option") as info:
        create_broker("kafka://u:hunter2@h:9092?bogus=1")
    assert "hunter2" not in str(info.value)


def test_redis_and_rabbitmq_options() -> None:
    redis_broker = create_broker(
        "redis://127.0.0.1:6379/2?timeout=1.5&maxlen=1000&replicas=1&claim_idle=30"
        "&health_check_interval=10"  # not ours: handed to redis-py
    )
    assert isinstance(redis_broker, RedisStreamsBroker)
    assert (redis_broker.timeout, redis_broker.maxlen) == (1.5, 1000)
    assert (redis_broker.replicas, redis_broker.claim_idle) == (1, 30.0)
    rabbit = create_broker("amqp://u:pw@127.0.0.1:5672/shop?timeout=4&prefetch=10&heartbeat=30")
    assert isinstance(rabbit, RabbitMQBroker)
    assert (rabbit.timeout, rabbit.prefetch) == (4.0, 10)
    assert "heartbeat=30" in rabbit._url and "prefetch" not in rabbit._url
    assert "pw" not in repr(rabbit)
