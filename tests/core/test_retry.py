"""``RetryPolicy``: when a failed try earns another one, and how long to wait before it.

Properties (the expected values are computed here from the documented meaning of each field):

* ``delay(n)`` lies in ``[raw * (1 - jitter), raw]`` where ``raw`` is ``backoff * multiplier **
  (n - 1)`` capped by ``max_backoff``; raw delays never decrease with ``n``; without jitter the
  delay is ``raw``; the same ``rng`` state gives the same delay;
* ``delay`` works for any attempt number: unbounded retriable steps can be retried for days;
* ``should_retry`` is false for ``StepRejected`` (whatever ``retry_on`` says), for exceptions not
  in ``retry_on`` and once ``max_attempts`` tries were made; ``None`` means unbounded;
* invalid arguments (including NaN) raise ``ValueError`` when the policy is created.
"""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saga_core.errors import StepRejected
from saga_core.retry import (
    DEFAULT_COMPENSATION_RETRY,
    DEFAULT_RETRIABLE_RETRY,
    RUN_ONCE,
    RetryPolicy,
)

finite = st.floats(min_value=0, max_value=100, allow_nan=False, allow_infinity=False)


@st.composite
def policies(draw: st.DrawFn, max_multiplier: float = 2.0) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=draw(st.none() | st.integers(1, 20)),
        backoff=draw(finite),
        multiplier=draw(st.floats(1, max_multiplier)),
        max_backoff=draw(finite),
        jitter=draw(st.floats(0, 1)),
    )


def raw_delay(policy: RetryPolicy, attempt: int) -> float:
    """Wait after try ``attempt`` without jitter: grow by ``multiplier`` from ``backoff`` for each
    earlier try, never above ``max_backoff`` (computed step by step, so it cannot overflow)."""
    value = min(policy.backoff, policy.max_backoff)
    for _ in range(attempt - 1):
        if value >= policy.max_backoff:
            break
        value = min(value * policy.multiplier, policy.max_backoff)
    return value


def close_le(a: float, b: float) -> bool:
    return a <= b or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@settings(max_examples=300, deadline=None)
@given(policies(), st.integers(1, 1000), st.integers(0, 2**32))
def test_delay_is_within_the_jitter_band_and_capped(
    policy: RetryPolicy, attempt: int, seed: int
) -> None:
    raw = raw_delay(policy, attempt)
    delay = policy.delay(attempt, random.Random(seed))
    assert close_le(raw * (1 - policy.jitter), delay)
    assert close_le(delay, raw)
    assert delay <= policy.max_backoff
    assert delay >= 0
    assert policy.delay(attempt, random.Random(seed)) == delay


@settings(max_examples=200, deadline=None)
@given(policies(), st.integers(1, 200))
def test_raw_delays_never_decrease(policy: RetryPolicy, attempt: int) -> None:
    steady = RetryPolicy(
        backoff=policy.backoff,
        multiplier=policy.multiplier,
        max_backoff=policy.max_backoff,
        jitter=0,
    )
    assert steady.delay(attempt) <= steady.delay(attempt + 1)
    assert math.isclose(
        steady.delay(attempt), raw_delay(steady, attempt), rel_tol=1e-9, abs_tol=1e-12
    )


@settings(max_examples=200, deadline=None)
@given(policies(max_multiplier=10.0), st.integers(1, 10**6), st.integers(0, 2**32))
def test_delay_works_for_any_attempt_number(policy: RetryPolicy, attempt: int, seed: int) -> None:
    """Retriable steps retry without bound, so the attempt number grows without bound too."""
    delay = policy.delay(attempt, random.Random(seed))
    assert 0 <= delay <= policy.max_backoff


def test_default_retriable_policy_after_a_long_outage() -> None:
    """About 8.5 hours of 30 s waits: the default unbounded policy must still compute a wait."""
    assert DEFAULT_RETRIABLE_RETRY.max_attempts is None
    delay = DEFAULT_RETRIABLE_RETRY.delay(1100, random.Random(0))
    assert delay <= DEFAULT_RETRIABLE_RETRY.max_backoff


def test_delay_examples() -> None:
    p = RetryPolicy(max_attempts=5, backoff=1.0, multiplier=2.0, max_backoff=5.0, jitter=0)
    assert [p.delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert RetryPolicy(backoff=0, jitter=0.5).delay(3) == 0
    half = RetryPolicy(backoff=2.0, jitter=0.5)
    assert 1.0 <= half.delay(1, random.Random(1)) <= 2.0


class Transient(Exception):
    pass


class Other(Exception):
    pass


EXCEPTIONS: list[BaseException] = [
    Transient(),
    Other(),
    ValueError(),
    StepRejected("declined"),
    KeyboardInterrupt(),
]


@settings(max_examples=300, deadline=None)
@given(
    st.none() | st.integers(1, 10),
    st.sampled_from([(Exception,), (Transient,), (Transient, ValueError), (BaseException,), ()]),
    st.integers(1, 50),
    st.sampled_from(EXCEPTIONS),
)
def test_should_retry(
    max_attempts: int | None,
    retry_on: tuple[type[BaseException], ...],
    attempt: int,
    exc: BaseException,
) -> None:
    policy = RetryPolicy(max_attempts=max_attempts, retry_on=retry_on)
    expected = (
        not isinstance(exc, StepRejected)
        and any(isinstance(exc, kind) for kind in retry_on)
        and (max_attempts is None or attempt < max_attempts)
    )
    assert policy.should_retry(attempt, exc) == expected


def test_should_retry_examples() -> None:
    three = RetryPolicy(max_attempts=3)
    assert three.should_retry(1, RuntimeError())
    assert three.should_retry(2, RuntimeError())
    assert not three.should_retry(3, RuntimeError())
    assert not three.should_retry(2, StepRejected("no"))
    assert not RetryPolicy(max_attempts=3, retry_on=(StepRejected,)).should_retry(1, StepRejected())
    assert not RetryPolicy(max_attempts=3, retry_on=(KeyError,)).should_retry(1, ValueError())
    assert RetryPolicy(max_attempts=None).should_retry(10**9, RuntimeError())


def test_defaults() -> None:
    assert RetryPolicy().max_attempts == 1  # a step runs once unless told otherwise
    assert not RetryPolicy().should_retry(1, RuntimeError())
    assert RUN_ONCE.max_attempts == 1
    assert DEFAULT_RETRIABLE_RETRY.max_attempts is None
    assert DEFAULT_COMPENSATION_RETRY.max_attempts is not None
    assert DEFAULT_COMPENSATION_RETRY.max_attempts > 1
    assert RetryPolicy(3).max_attempts == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"max_attempts": -1},
        {"backoff": -0.1},
        {"max_backoff": -1},
        {"multiplier": 0.5},
        {"jitter": -0.1},
        {"jitter": 1.5},
        {"jitter": math.nan},
        {"backoff": math.nan},
        {"max_backoff": math.nan},
        {"multiplier": math.nan},
    ],
    ids=repr,
)
def test_invalid_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - any message will do
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("retry_on", [("Transient",), (int,), (Transient, None)], ids=repr)
def test_retry_on_must_list_exception_types(retry_on: tuple[object, ...]) -> None:
    """Otherwise ``should_retry`` raises ``TypeError`` in the middle of a saga, not at import."""
    with pytest.raises((ValueError, TypeError)):
        RetryPolicy(retry_on=retry_on)  # type: ignore[arg-type]
