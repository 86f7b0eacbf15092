"""How several runs of an outbox case become one reported row."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from benchmarks.outbox import RATIOS, combine_runs

rates = st.floats(min_value=1.0, max_value=1e6, allow_nan=False)


def _run(broker: float, db: float, e2e: float) -> dict[str, Any]:
    lower = min(broker, db)
    return {
        "raw_broker": {"rate": broker},
        "raw_db": {"insert_then_drain_rate": db},
        "end_to_end_rate": e2e,
        "relay_vs_raw_broker": e2e / broker,
        "e2e_vs_raw_db": e2e / db,
        "lower_baseline": lower,
        "e2e_vs_lower_baseline": e2e / lower,
        "relayed": 10,
        "sent": 10,
        "pending": 0,
        "dead": 0,
        "on_broker": 10,
        "keys_in_order": None,
        "consistent": True,
    }


@given(st.lists(st.tuples(rates, rates, rates), min_size=1, max_size=5))
def test_lower_baseline_is_the_lower_of_the_reported_baselines(
    runs: list[tuple[float, float, float]],
) -> None:
    combined = combine_runs([_run(*r) for r in runs])
    assert combined["lower_baseline"] == min(
        combined["raw_broker"]["rate"], combined["raw_db"]["insert_then_drain_rate"]
    )
    # Ratios stay each run's own, so they lie within the runs' range.
    for ratio in RATIOS:
        low, high = combined["spread"][ratio]
        assert low <= combined[ratio] <= high


def test_baselines_that_swap_places_between_runs() -> None:
    # The broker is the lower baseline in one run, the database in the other: the median of each
    # run's lower baseline (150) is neither reported baseline's median (200 and 250).
    combined = combine_runs([_run(100, 300, 50), _run(300, 200, 50)])
    assert combined["raw_broker"]["rate"] == 200
    assert combined["raw_db"]["insert_then_drain_rate"] == 250
    assert combined["lower_baseline"] == 200
