"""The read-only context a step or compensation receives (DESIGN.md section 2)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any


class StepContext(Mapping[str, Any]):
    """What a step sees: the saga input merged with the results of the steps it depends on.

    It is a read-only mapping (``ctx["order_id"]``), plus attributes:

    * ``saga_id``, ``step``, ``attempt`` (1-based);
    * ``idempotency_key``: ``"<saga_id>:<step>"``, the same on every retry and after recovery, so a
      downstream service can deduplicate;
    * ``deadline``: ``time.monotonic()`` value when the step's timeout expires (``None`` without a
      timeout); long sync steps poll ``time_left()``;
    * ``connection``: for ``transactional=True`` steps, the SQLAlchemy connection whose transaction
      also records the step;
    * for compensations: ``outcome`` (``"succeeded"`` or ``"unknown"``), ``compensation_key``
      (``"<saga_id>:<step>:compensate"``) and ``idempotency_key`` of the forward step.

    Each step gets its own copy of the data, so nothing it does to nested values leaks into
    another step.
    """

    __slots__ = (
        "_data",
        "attempt",
        "compensation_key",
        "connection",
        "deadline",
        "idempotency_key",
        "outcome",
        "saga_id",
        "step",
    )

    def __init__(
        self,
        data: Mapping[str, Any],
        *,
        saga_id: str,
        step: str,
        attempt: int,
        deadline: float | None = None,
        connection: Any = None,
        outcome: str | None = None,
    ) -> None:
        self._data = dict(data)
        self.saga_id = saga_id
        self.step = step
        self.attempt = attempt
        self.idempotency_key = f"{saga_id}:{step}"
        self.deadline = deadline
        self.connection = connection
        self.outcome = outcome
        self.compensation_key = f"{saga_id}:{step}:compensate" if outcome is not None else None

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def time_left(self) -> float | None:
        """Seconds until ``deadline`` (never negative), or ``None`` without a timeout."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def __repr__(self) -> str:
        return f"StepContext(saga_id={self.saga_id!r}, step={self.step!r}, attempt={self.attempt})"
