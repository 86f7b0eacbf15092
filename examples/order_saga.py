"""The user's order example, ported to saga-outbox.

``create_order`` then ``charge_payment`` then ``reserve_inventory``. If a step fails, the order is
cancelled *before* the payment is refunded: ``refund_payment`` declares
``@compensate("charge_payment", depends_on=["create_order"])``, which overrides the default
reverse order (see docs/concepts.md, "Compensation order").

Run it with ``saga demo`` or ``python -m examples.order_saga``.
"""

from __future__ import annotations

import uuid
from typing import Any

import anyio

from saga_core import (
    DeclarativeSaga,
    OutboxWorker,
    RetryPolicy,
    SagaFailed,
    SagaOrchestrator,
    StepContext,
    StepRejected,
    compensate,
    step,
)

OUT_OF_STOCK = {"GADGET-404"}


class OrderService:
    """Stands in for a remote order service: keeps orders in memory."""

    orders: dict[str, dict[str, Any]] = {}

    @classmethod
    async def create(cls, data: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
        order_id = "ORD-" + uuid.uuid5(uuid.NAMESPACE_URL, idempotency_key).hex[:6].upper()
        cls.orders[order_id] = {"items": data["items"], "status": "created"}
        return {"order_id": order_id}

    @classmethod
    async def delete(cls, order_id: str | None) -> None:
        if order_id in cls.orders:  # tolerate "nothing to undo"
            cls.orders[order_id]["status"] = "cancelled"


class PaymentService:
    """Stands in for a payment provider."""

    refunds: list[str] = []

    @staticmethod
    def charge(amount: float, idempotency_key: str) -> dict[str, Any]:
        if amount > 1000:
            raise StepRejected(f"payment of {amount} declined")  # clean: nothing was charged
        return {
            "charge_id": "CHG-" + uuid.uuid5(uuid.NAMESPACE_URL, idempotency_key).hex[:6].upper()
        }

    @classmethod
    async def refund(cls, charge_id: str | None) -> None:
        if charge_id is not None:
            cls.refunds.append(charge_id)


class OrderPlacementSaga(DeclarativeSaga):
    """Create an order, charge it, reserve its items; undo in the declared order on failure."""

    saga_type = "order-placement"

    @step(name="create_order", aggregate_type="order")
    async def create_order(self, ctx: StepContext) -> dict[str, Any]:
        return await OrderService.create(ctx["order_data"], ctx.idempotency_key)

    @compensate("create_order")
    async def cancel_order(self, ctx: StepContext) -> None:
        await OrderService.delete(ctx.get("order_id"))

    @step(
        name="charge_payment",
        depends_on=["create_order"],
        aggregate_type="payment",
        retry=RetryPolicy(max_attempts=3),
        timeout=5.0,
    )
    def charge_payment(self, ctx: StepContext) -> dict[str, Any]:  # sync steps run in a thread
        return PaymentService.charge(ctx["order_data"]["amount"], ctx.idempotency_key)

    @compensate("charge_payment", depends_on=["create_order"])
    async def refund_payment(self, ctx: StepContext) -> None:
        # Runs after cancel_order finished; ctx.outcome says whether the charge surely happened.
        await PaymentService.refund(ctx.get("charge_id"))

    @step(name="reserve_inventory", depends_on=["charge_payment"], aggregate_type="inventory")
    async def reserve_inventory(self, ctx: StepContext) -> dict[str, Any]:
        missing = [i for i in ctx["order_data"]["items"] if i in OUT_OF_STOCK]
        if missing:
            raise StepRejected(f"out of stock: {', '.join(missing)}")
        return {"reservation_id": "RES-" + ctx["order_id"][4:]}


async def main() -> None:
    """Run one order that succeeds and one that is compensated, on the embedded defaults."""
    from saga_brokers import create_broker
    from saga_storage import create_storage

    storage = create_storage("sqlite:///order_saga_example.db")
    broker = create_broker("memory://")
    orchestrator = SagaOrchestrator(storage, broker)
    ok = await OrderPlacementSaga().execute(
        orchestrator,
        saga_id=str(uuid.uuid4()),
        initial_context={"order_data": {"items": ["WIDGET-001"], "amount": 99.99}},
    )
    print("Success!", dict(ok))
    try:
        await orchestrator.execute(
            OrderPlacementSaga(),
            context={"order_data": {"items": ["GADGET-404"], "amount": 25.0}},
        )
    except SagaFailed as exc:
        print("Failed (compensated):", exc)
    relayed = await OutboxWorker(storage, broker).drain()
    print(f"{relayed} events relayed")
    await storage.aclose()


if __name__ == "__main__":
    anyio.run(main)
