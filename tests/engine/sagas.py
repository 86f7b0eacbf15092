"""Saga classes shared by the engine tests. Each records what ran, per saga id, in ``LOG``."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any

import anyio

from saga_core import DeclarativeSaga, RetryPolicy, StepContext, StepRejected, compensate, step

# saga_id -> ordered list of ("do"|"undo", step, extra); one lock because sync steps use threads.
LOG: dict[str, list[tuple[str, str, Any]]] = defaultdict(list)
_lock = threading.Lock()


def record(ctx: StepContext, kind: str, extra: Any = None) -> None:
    with _lock:
        LOG[ctx.saga_id].append((kind, ctx.step, extra))


def undone(saga_id: str) -> list[str]:
    return [s for k, s, _ in LOG[saga_id] if k == "undo"]


def done(saga_id: str) -> list[str]:
    return [s for k, s, _ in LOG[saga_id] if k == "do"]


class OrderSaga(DeclarativeSaga):
    """The user's example: refund waits for cancel although charge depended on create."""

    saga_type = "test-order"

    @step(name="create_order", aggregate_type="order")
    async def create_order(self, ctx: StepContext) -> dict[str, Any]:
        record(ctx, "do")
        return {"order_id": f"ORD-{ctx.saga_id}"}

    @compensate("create_order")
    async def cancel_order(self, ctx: StepContext) -> None:
        await anyio.sleep(0.02)  # a slow cancel shows that refund really waits for it
        record(ctx, "undo", ctx.outcome)

    @step(name="charge_payment", depends_on=["create_order"])
    def charge_payment(self, ctx: StepContext) -> dict[str, Any]:
        record(ctx, "do")
        if ctx["amount"] > 1000:
            raise RuntimeError("gateway timeout")  # unknown outcome: refund must run
        return {"charge_id": f"CHG-{ctx['order_id']}"}

    @compensate("charge_payment", depends_on=["create_order"])
    async def refund_payment(self, ctx: StepContext) -> None:
        record(ctx, "undo", (ctx.outcome, ctx.get("charge_id"), ctx.compensation_key))

    @step(name="ship", depends_on=["charge_payment"])
    async def ship(self, ctx: StepContext) -> dict[str, Any]:
        record(ctx, "do")
        if ctx.get("fail_ship"):
            raise StepRejected("no courier")
        return {"tracking": "T-1"}


class ChainSaga(DeclarativeSaga):
    """a -> b -> c, all compensatable, c fails: default order undoes b before a."""

    saga_type = "test-chain"

    @step()
    async def a(self, ctx: StepContext) -> dict[str, Any]:
        record(ctx, "do")
        return {"a": 1}

    @compensate("a")
    async def undo_a(self, ctx: StepContext) -> None:
        record(ctx, "undo")

    @step(depends_on=["a"])
    def b(self, ctx: StepContext) -> dict[str, Any]:
        record(ctx, "do")
        return {"b": ctx["a"] + 1}

    @compensate("b")
    def undo_b(self, ctx: StepContext) -> None:
        time.sleep(0.01)
        record(ctx, "undo")

    @step(depends_on=["b"])
    async def c(self, ctx: StepContext) -> dict[str, Any]:
        record(ctx, "do")
        if ctx.get("fail_c"):
            raise StepRejected("c refuses")
        return {"c": ctx["b"] + 1}

    @compensate("c")
    async def undo_c(self, ctx: StepContext) -> None:
        record(ctx, "undo")


class DiamondSaga(DeclarativeSaga):
    """top -> (fast_fail, slow) -> bottom. fast_fail fails while slow still runs."""

    saga_type = "test-diamond"

    @step()
    async def top(self, ctx: StepContext) -> dict[str, Any]:
        record(ctx, "do")
        return {}

    @compensate("top")
    async def undo_top(self, ctx: StepContext) -> None:
        record(ctx, "undo", ctx.outcome)

    @step(depends_on=["top"])
    async def fast_fail(self, ctx: StepContext) -> dict[str, Any]:
        await anyio.sleep(0.01)
        record(ctx, "do")
        raise RuntimeError("boom")

    @compensate("fast_fail")
    async def undo_fast_fail(self, ctx: StepContext) -> None:
        record(ctx, "undo", ctx.outcome)

    @step(depends_on=["top"])
    async def slow(self, ctx: StepContext) -> dict[str, Any]:
        record(ctx, "start")
        await anyio.sleep(ctx.get("slow_seconds", 0.3))
        record(ctx, "do")
        return {"slow": True}

    @compensate("slow")
    async def undo_slow(self, ctx: StepContext) -> None:
        record(ctx, "undo", ctx.outcome)

    @step(depends_on=["fast_fail", "slow"])
    async def bottom(self, ctx: StepContext) -> dict[str, Any]:
        record(ctx, "do")
        return {}


class FailFastDiamond(DiamondSaga):
    saga_type = "test-diamond-fail-fast"
    fail_fast = True


FLAKY_FAILURES: dict[str, int] = defaultdict(int)


class RetrySaga(DeclarativeSaga):
    """``flaky`` fails ``ctx['failures']`` times before it succeeds."""

    saga_type = "test-retry"

    @step(retry=RetryPolicy(max_attempts=3, backoff=0.01, jitter=0))
    async def flaky(self, ctx: StepContext) -> dict[str, Any]:
        record(ctx, "do", (ctx.attempt, ctx.idempotency_key))
        if ctx.attempt <= ctx["failures"]:
            raise ConnectionError(f"attempt {ctx.attempt} failed")
        return {"attempts_needed": ctx.attempt}

    @compensate("flaky")
    async def undo_flaky(self, ctx: StepContext) -> None:
        record(ctx, "undo", ctx.outcome)


class TimeoutSaga(DeclarativeSaga):
    """An async step and a sync step that outlive their timeouts."""

    saga_type = "test-timeout"

    @step()
    async def first(self, ctx: StepContext) -> dict[str, Any]:
        record(ctx, "do")
        return {"first": 1}

    @compensate("first")
    async def undo_first(self, ctx: StepContext) -> None:
        record(ctx, "undo", ctx.outcome)

    @step(depends_on=["first"], timeout=0.1)
    async def slow_async(self, ctx: StepContext) -> dict[str, Any]:
        if ctx.get("slow") == "async":
            await anyio.sleep(5)
        record(ctx, "do")
        return {"slow_async": 1}

    @compensate("slow_async")
    async def undo_slow_async(self, ctx: StepContext) -> None:
        record(ctx, "undo", ctx.outcome)

    @step(depends_on=["first"], timeout=0.1)
    def slow_sync(self, ctx: StepContext) -> dict[str, Any]:
        if ctx.get("slow") == "sync":
            time.sleep(0.4)
        record(ctx, "do")
        return {"late_value": 42}

    @compensate("slow_sync")
    def undo_slow_sync(self, ctx: StepContext) -> None:
        record(ctx, "undo", (ctx.outcome, ctx.get("late_value")))


class BadCompensationSaga(DeclarativeSaga):
    """a independent of b -> c; d after a and c fails. undo_b always fails, which blocks undo_c
    (explicitly after it); undo_a is independent and still runs."""

    saga_type = "test-bad-compensation"

    @step()
    async def a(self, ctx: StepContext) -> dict[str, Any]:
        return {}

    @compensate("a")
    async def undo_a(self, ctx: StepContext) -> None:
        record(ctx, "undo")

    @step()
    async def b(self, ctx: StepContext) -> dict[str, Any]:
        return {}

    @compensate("b", retry=RetryPolicy(max_attempts=3, backoff=0.01, jitter=0))
    async def undo_b(self, ctx: StepContext) -> None:
        record(ctx, "try-undo")
        raise RuntimeError("refund service down")

    @step(depends_on=["b"])
    async def c(self, ctx: StepContext) -> dict[str, Any]:
        return {}

    @compensate("c", depends_on=["b"])
    async def undo_c(self, ctx: StepContext) -> None:
        record(ctx, "undo")  # must never run: it waits for undo_b, which gave up

    @step(depends_on=["a", "c"])
    async def d(self, ctx: StepContext) -> dict[str, Any]:
        raise StepRejected("d refuses")


class BadResultSaga(DeclarativeSaga):
    """``leaky`` acts and then returns something JSON cannot store."""

    saga_type = "test-bad-result"

    @step()
    async def leaky(self, ctx: StepContext) -> Any:
        record(ctx, "do")
        return {"when": object()}

    @compensate("leaky")
    async def undo_leaky(self, ctx: StepContext) -> None:
        record(ctx, "undo", ctx.outcome)
