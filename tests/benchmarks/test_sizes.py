"""How big each outbox case is, as the command line sets it (docs/benchmarks.md)."""

from __future__ import annotations

from benchmarks.__main__ import config_from, parser
from benchmarks.outbox import OutboxSizes


def test_quick_relays_fewer_events_against_rabbitmq_only() -> None:
    outbox = config_from(parser().parse_args(["all", "--quick"])).outbox
    assert outbox.for_broker("rabbitmq").events == 2_000
    for kind in ("memory", "kafka", "redis"):
        assert outbox.for_broker(kind).events == outbox.events == 5_000
    full = config_from(parser().parse_args(["all"])).outbox
    assert {full.for_broker(k).events for k in ("memory", "kafka", "rabbitmq", "redis")} == {20_000}


def test_events_sets_every_brokers_count() -> None:
    outbox = config_from(parser().parse_args(["outbox", "--quick", "--events", "300"])).outbox
    assert {outbox.for_broker(k).events for k in ("memory", "kafka", "rabbitmq", "redis")} == {300}


def test_for_broker_changes_nothing_but_the_count() -> None:
    sizes = OutboxSizes(events=50, per_key=5, repeats=2, rabbitmq_events=20)
    rabbit = sizes.for_broker("rabbitmq")
    assert rabbit == OutboxSizes(events=20, per_key=5, repeats=2, rabbitmq_events=20)
    assert rabbit.round_size == 20
