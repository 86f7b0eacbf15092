"""``saga demo``: the order example on a SQLite file and the in-memory broker, with a trace."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import uuid

import anyio

from saga_brokers import InMemoryBroker
from saga_cli.examples.order_saga import OrderPlacementSaga, OrderService, PaymentService
from saga_core import OutboxWorker, SagaFailed, SagaOrchestrator, render_mermaid
from saga_storage import create_storage


class _TraceHandler(logging.Handler):
    """Prints the orchestrator's trace lines as they happen."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.INFO)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "saga_event", None)
        if event in (None, "step_started"):
            return
        line = record.getMessage()
        self.lines.append(line)
        print(line, flush=True)


async def _demo(url: str) -> int:
    run = uuid.uuid4().hex[:6]  # fresh ids, so the demo can run again on the same database
    storage = create_storage(url)
    broker = InMemoryBroker()
    orchestrator = SagaOrchestrator(storage, broker)
    saga = OrderPlacementSaga()
    print("Order 1: one widget for 99.99 (succeeds)")
    ok = await orchestrator.execute(
        saga,
        context={"order_data": {"items": ["WIDGET-001"], "amount": 99.99}},
        saga_id=f"order-1-{run}",
    )
    shown = {k: v for k, v in ok.items() if k != "order_data"}
    print(f"  -> result {shown}\n")

    print("Order 2: an out-of-stock gadget (fails at reserve_inventory, compensated)")
    status = "?"
    try:
        await orchestrator.execute(
            saga,
            context={"order_data": {"items": ["GADGET-404"], "amount": 25.0}},
            saga_id=f"order-2-{run}",
        )
    except SagaFailed as exc:
        status = exc.status.value
        print(f"  -> SagaFailed: step {exc.step!r} failed ({exc.error}); saga is {status}")
    state = await orchestrator.get(f"order-2-{run}")
    comp_order = sorted(
        (s for s in state.steps.values() if s.status.value == "COMPENSATED"),
        key=lambda s: s.finished_at or 0.0,
    )
    print("  -> compensated in order: " + " -> ".join(s.name for s in comp_order))
    print(f"  -> orders: {OrderService.orders}")
    print(f"  -> refunds: {PaymentService.refunds}\n")

    # Step events went out right after each commit (optimistic path); the relay sends the rest.
    relayed = await OutboxWorker(storage, broker).drain()
    published = len(broker.messages())
    print(
        f"Outbox: {published} events published to the in-memory broker "
        f"({published - relayed} right after their commit, {relayed} by the relay)"
    )
    for m in broker.messages():
        print(f"  {m.topic:10} key={m.key:14} {m.headers['event_type']}")
    print("\nCompensation graph (Mermaid; from the repository root:")
    print("  saga graph examples.order_saga:OrderPlacementSaga)")
    print(render_mermaid(OrderPlacementSaga.definition()))
    await storage.aclose()
    ok_all = status == "COMPENSATED" and published == 7
    return 0 if ok_all else 1


def run_demo(args: argparse.Namespace) -> int:
    """Entry point of ``saga demo``."""
    lines: list[str] = []
    handler = _TraceHandler(lines)
    logger = logging.getLogger("saga")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        if args.database:
            url: str = args.database
            print(f"saga-outbox demo: storage {url}, in-memory broker\n")
            return anyio.run(_demo, url)
        with tempfile.TemporaryDirectory(prefix="saga-demo-") as tmp:
            path = os.path.join(tmp, "saga-demo.db")
            print(f"saga-outbox demo: SQLite file {path}, in-memory broker\n")
            return anyio.run(_demo, f"sqlite:///{path}")
    finally:
        logger.removeHandler(handler)
