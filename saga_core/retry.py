"""Retry policies: how often a step or compensation is tried and how long to wait between tries."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from saga_core.errors import StepRejected


@dataclass(frozen=True)
class RetryPolicy:
    """How a step (or compensation) is retried after it raised.

    Args:
        max_attempts: total tries including the first; ``None`` means unbounded (retriable
            steps after a pivot). A step runs once unless its policy says otherwise.
        backoff: delay before the second try, in seconds.
        multiplier: each later delay is the previous one times this.
        max_backoff: upper bound of one delay.
        jitter: fraction of each delay that is randomised (0.5: between 50% and 100% of it),
            so that many sagas failing together do not retry in lock-step.
        retry_on: exception types worth retrying; others fail at once. ``StepRejected`` is a
            clean refusal and is never retried.
    """

    max_attempts: int | None = 1
    backoff: float = 0.1
    multiplier: float = 2.0
    max_backoff: float = 10.0
    jitter: float = 0.5
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(
                f"RetryPolicy.max_attempts must be >= 1 or None, got {self.max_attempts}"
            )
        for name in ("backoff", "max_backoff"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):  # refuses NaN too
                raise ValueError(f"RetryPolicy.{name} must be a finite number >= 0, got {value}")
        if not (math.isfinite(self.multiplier) and self.multiplier >= 1):
            raise ValueError(
                f"RetryPolicy.multiplier must be a finite number >= 1, got {self.multiplier}"
            )
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"RetryPolicy.jitter must be within [0, 1], got {self.jitter}")
        retry_on = tuple(self.retry_on)
        bad = [t for t in retry_on if not (isinstance(t, type) and issubclass(t, BaseException))]
        if bad:
            raise ValueError(f"RetryPolicy.retry_on must list exception types, got {bad!r}")
        object.__setattr__(self, "retry_on", retry_on)

    def should_retry(self, attempt: int, exc: BaseException) -> bool:
        """Whether a try numbered ``attempt`` (1-based) that raised ``exc`` earns another try."""
        if isinstance(exc, StepRejected) or not isinstance(exc, self.retry_on):
            return False
        return self.max_attempts is None or attempt < self.max_attempts

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after try number ``attempt`` (1-based) failed."""
        try:
            raw = min(self.max_backoff, self.backoff * self.multiplier ** max(0, attempt - 1))
        except OverflowError:  # a long outage: the cap was reached long ago
            raw = self.max_backoff
        if self.jitter == 0 or raw == 0:
            return raw
        r = (rng or random).random()
        return raw * (1 - self.jitter * r)


#: Compensations are retried by default and give up within about 30 seconds
#: (0.2 + 0.4 + ... capped at 8 s, 8 tries: at most ~21 s of waiting plus the tries themselves).
DEFAULT_COMPENSATION_RETRY = RetryPolicy(max_attempts=8, backoff=0.2, max_backoff=8.0)

#: Retriable steps without a policy of their own are retried without bound.
DEFAULT_RETRIABLE_RETRY = RetryPolicy(max_attempts=None, backoff=0.2, max_backoff=30.0)

#: Steps without a policy run once.
RUN_ONCE = RetryPolicy(max_attempts=1)
