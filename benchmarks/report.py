"""Tables for the terminal (and docs), the JSON file, and the targets of issue 6."""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def _num(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * float(value):.0f}%"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], title: str = "") -> str:
    """A plain-text table that is also valid Markdown."""
    widths = [len(h) for h in headers]
    for r in rows:
        for i, cell in enumerate(r):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    out = [f"### {title}", ""] if title else []
    out.append(line(headers))
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out.extend(line(r) for r in rows)
    return "\n".join(out)


def outbox_table(rows: Sequence[Row]) -> str:
    body = [
        [
            r["storage"],
            r["broker"],
            _num(r["events"]),
            _num(r["commit_rate"]),
            _num(r["relay_rate"]),
            _num(r["end_to_end_rate"]),
            _num(r["relay_cpu_cores"], 2),
            _num(r["raw_broker"]["rate"]),
            _num(r["raw_db"]["drain_rate"]),
            _num(r["raw_db"]["insert_then_drain_rate"]),
            _pct(r["relay_vs_raw_broker"]),
            _pct(r["e2e_vs_raw_db"]),
            _pct(r["e2e_vs_lower_baseline"]),
            _num(r["consistent"]),
        ]
        for r in rows
    ]
    return table(
        [
            "storage",
            "broker",
            "events",
            "commit ev/s",
            "relay ev/s",
            "e2e ev/s",
            "relay CPU",
            "raw broker ev/s",
            "raw db drain ev/s",
            "raw db ins+drain ev/s",
            "relay/raw broker",
            "e2e/raw db",
            "e2e/lower",
            "all relayed",
        ],
        body,
        "Outbox: N events committed, then relayed (ours vs. raw baselines, same run)",
    )


def ladder_table(rows: Sequence[Row]) -> str:
    """The database side, step by step: plain rows, plus the per-key table, then ours."""
    body = [
        [
            r["storage"],
            r["broker"],
            _num(r["raw_db"]["insert_rate"]),
            _num(r["raw_db"]["keyed_insert_rate"]),
            _num(r["commit_rate"]),
            _num(r["raw_db"]["drain_rate"]),
            _num(r["raw_db"]["keyed_drain_rate"]),
            _num(r["relay_rate"]),
            _num(r["raw_db"]["insert_then_drain_rate"]),
            _num(r["raw_db"]["keyed_insert_then_drain_rate"]),
            _num(r["end_to_end_rate"]),
        ]
        for r in rows
    ]
    return table(
        [
            "storage",
            "broker",
            "raw insert",
            "raw keyed insert",
            "our commit",
            "raw drain",
            "raw keyed drain",
            "our relay",
            "raw ins+drain",
            "raw keyed ins+drain",
            "our e2e",
        ],
        body,
        "Outbox, database side (ev/s): plain rows -> rows + per-key table (our design, raw SQL) "
        "-> ours",
    )


_PATHS = {
    "optimistic": "optimistic publish",
    "polling": "relay, polling",
    "notify": "relay, NOTIFY",
}


def latency_table(rows: Sequence[Row]) -> str:
    body = [
        [
            r["storage"],
            r["broker"],
            _PATHS[r["path"]],
            _num(r["events"]),
            _num(r["p50_ms"], 2),
            _num(r["p99_ms"], 2),
            _num(r["max_ms"], 2),
            _pct(r["optimistic_share"]),
            _num(r["consistent"]),
        ]
        for r in rows
    ]
    return table(
        [
            "storage",
            "broker",
            "path to the broker",
            "events",
            "p50 ms",
            "p99 ms",
            "max ms",
            "sent optimistically",
            "all acked",
        ],
        body,
        "Outbox: commit-to-broker latency (commit returned -> broker acknowledged)",
    )


def saga_table(rows: Sequence[Row]) -> str:
    body = [
        [
            r["storage"],
            r["shape"],
            _num(r["sequential"]),
            _num(r["p50_ms"], 2),
            _num(r["p99_ms"], 2),
            _num(r["concurrent"]),
            _num(r["sagas_per_s"]),
            _num(r["commits_per_saga"], 3),
            _num(r.get("renewals_per_saga"), 2),
            _num(r["cpu_cores"], 2),
            _num(r["consistent"]),
        ]
        for r in rows
    ]
    return table(
        [
            "storage",
            "saga",
            "sequential",
            "p50 ms",
            "p99 ms",
            "concurrent",
            "sagas/s",
            "commits/saga",
            "+ lease renewals/saga",
            "CPU cores",
            "all completed",
        ],
        body,
        "Sagas (ours): every step durably recorded",
    )


def scale_table(rows: Sequence[Row]) -> str:
    body = []
    for r in rows:
        if r.get("skipped"):
            body.append([r["engine"], "-", "-", "-", "-", "-", "not run: " + r["skipped"]])
            continue
        for run in r["runs"]:
            body.append(
                [
                    r["engine"],
                    _num(run["processes"]),
                    _num(run["sagas"]),
                    _num(run["sagas_per_s"]),
                    " + ".join(_num(x) for x in run["per_process"]),
                    f"{run['vs_one_process']:.2f}x",
                    _num(run["consistent"]),
                ]
            )
    return table(
        [
            "engine",
            "processes",
            "sagas",
            "sagas/s (all processes)",
            "each process (own window)",
            "vs. 1 process",
            "all completed",
        ],
        body,
        "Scale-out: 3-step sagas over processes started together (PostgreSQL, a schema each)",
    )


def scale_relay_table(rows: Sequence[Row]) -> str:
    body = []
    for r in rows:
        if r.get("skipped"):
            body.append([r["broker"], "-", "-", "-", "-", "-", "-", "not run: " + r["skipped"]])
            continue
        for run in r["runs"]:
            body.append(
                [
                    f"{r['storage']} -> {r['broker']}",
                    _num(run["processes"]),
                    _num(r["events"]),
                    _num(run["relay_rate"]),
                    " + ".join(_num(x) for x in run["per_process"]),
                    f"{run['vs_one_process']:.2f}x",
                    f"{_num(r['raw_broker']['rate'])} ({_pct(run['vs_raw_broker'])})",
                    _num(run["consistent"]),
                ]
            )
    return table(
        [
            "relay",
            "processes",
            "events",
            "relay ev/s (all processes)",
            "each process (own window)",
            "vs. 1 process",
            "raw client, 1 process (ours/raw)",
            "all relayed once",
        ],
        body,
        "Scale-out: one outbox relayed by processes started together",
    )


def peers_table(rows: Sequence[Row], ours: Row | None) -> str:
    body = []
    for r in rows:
        if r.get("skipped"):
            body.append(
                [
                    r["peer"],
                    r["workload"] + _broker(r),
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "not run: " + r["skipped"],
                ]
            )
            continue
        if r["workload"] == "outbox":
            ratio = r.get("ours_vs_peer")
            body.append(
                [
                    r["peer"],
                    "outbox" + _broker(r),
                    "-",
                    "-",
                    _num(r["events"]),
                    _num(r["end_to_end_rate"]) + " ev/s e2e, " + _num(r["relay_rate"]) + " relay",
                    "-" if ratio is None else f"{ratio:.2f}x",
                    _num(r["consistent"]),
                ]
            )
            continue
        ratio = r.get("ours_vs_peer")
        body.append(
            [
                r["peer"],
                r["workload"],
                _num(r["p50_ms"], 2),
                _num(r["p99_ms"], 2),
                _num(r["concurrent"]),
                _num(r["sagas_per_s"]) + " sagas/s",
                "-" if ratio is None else f"{ratio:.2f}x",
                _num(r["consistent"]),
            ]
        )
    if ours is not None:
        body.insert(
            0,
            [
                "saga-outbox",
                "3-step saga",
                _num(ours["p50_ms"], 2),
                _num(ours["p99_ms"], 2),
                _num(ours["concurrent"]),
                _num(ours["sagas_per_s"]) + " sagas/s",
                "1.00x",
                _num(ours["consistent"]),
            ],
        )
    out = table(
        [
            "engine",
            "workload (PostgreSQL)",
            "p50 ms",
            "p99 ms",
            "concurrent",
            "throughput",
            "ours/peer",
            "consistent",
        ],
        body,
        "Peers: same workload (ours/peer > 1 means we are faster)",
    )
    persists = [("saga-outbox", _persists("saga-outbox"))] if ours is not None else []
    seen = set()
    for r in rows:
        key = "sagaz-outbox" if r["workload"] == "outbox" else r["peer"]
        if key not in seen:
            seen.add(key)
            persists.append((key, r["persists"]))
    notes = ["", "What each engine persists (compare durable with durable):"]
    for name, text in persists:
        notes.append(textwrap.fill(text, 96, initial_indent=f"- {name}: ", subsequent_indent="  "))
    return out + "\n" + "\n".join(notes)


def _persists(name: str) -> str:
    from benchmarks.peers import PERSISTS

    return PERSISTS[name]


def _broker(r: Row) -> str:
    return f" -> {r['broker']}" if r.get("broker") else ""


def targets_table(targets: Sequence[Row]) -> str:
    body = [[t["target"], t["measured"], t["verdict"]] for t in targets]
    return table(["target (issue 6)", "measured in this run", "met?"], body, "Targets")


# --- targets ------------------------------------------------------------------------------
def _spread(r: Row, ratio: str) -> str:
    """`` (median of 3: 61%-83%)`` for a case run several times, else nothing."""
    low_high = r.get("spread", {}).get(ratio)
    if not low_high or r.get("runs", 1) < 2:
        return ""
    return f" (median of {r['runs']}: {_pct(low_high[0])}-{_pct(low_high[1])})"


def evaluate_targets(results: Row) -> list[Row]:
    """The four targets of issue 6, judged on this run's numbers."""
    out: list[Row] = []
    outbox = {(r["storage"], r["broker"]): r for r in results.get("outbox", [])}
    latency = {(r["storage"], r["broker"], r["path"]): r for r in results.get("latency", [])}
    sagas = {(r["storage"], r["shape"]): r for r in results.get("saga", [])}
    peers = {r["peer"]: r for r in results.get("peers", []) if r["workload"] != "outbox"}

    def add(target: str, measured: str, ok: bool | None, verdict: str | None = None) -> None:
        if verdict is None:
            verdict = "not measured" if ok is None else ("MET" if ok else "NOT MET")
        out.append({"target": target, "measured": measured, "verdict": verdict, "met": ok})

    r = outbox.get(("postgresql", "kafka"))
    add(
        "relay PostgreSQL -> Kafka >= 80% of raw kafka-python publish",
        "-"
        if r is None
        else f"{_pct(r['relay_vs_raw_broker'])}{_spread(r, 'relay_vs_raw_broker')} "
        f"({_num(r['relay_rate'])} vs {_num(r['raw_broker']['rate'])} ev/s)",
        None if r is None else r["relay_vs_raw_broker"] >= 0.8,
    )
    for row in results.get("scale_relay", []):
        two = next((run for run in row.get("runs", []) if run["processes"] == 2), None)
        if two is not None:  # a deployment's answer: more relay processes on one outbox
            add(
                "  for information: 2 relay processes vs. 1 raw producer process",
                f"{_pct(two['vs_raw_broker'])} ({_num(two['relay_rate'])} vs "
                f"{_num(row['raw_broker']['rate'])} ev/s, one raw run)",
                None,  # two cores against one: not the target's comparison
                verdict="not judged",
            )
    r = outbox.get(("postgresql", "redis"))
    add(
        "PostgreSQL -> Redis >= 80% of raw db insert-then-drain",
        "-"
        if r is None
        else f"{_pct(r['e2e_vs_raw_db'])}{_spread(r, 'e2e_vs_raw_db')} "
        f"({_num(r['end_to_end_rate'])} vs {_num(r['raw_db']['insert_then_drain_rate'])} ev/s)",
        None if r is None else r["e2e_vs_raw_db"] >= 0.8,
    )
    lat = latency.get(("postgresql", "memory", "optimistic"))
    add(
        "optimistic commit-to-broker p50 < 2 ms, p99 < 10 ms (memory, PostgreSQL)",
        "-" if lat is None else f"p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms",
        None if lat is None else lat["p50_ms"] < 2 and lat["p99_ms"] < 10,
    )
    ours = sagas.get(("postgresql", "3-step"))
    for peer, factor in (("sagaz", 2.0), ("dbos", 10.0)):
        p = peers.get(peer)
        if ours is None or p is None or p.get("skipped"):
            why = "" if p is None or not p.get("skipped") else f" ({p['skipped']})"
            add(f"3-step saga (PostgreSQL) >= {factor:g}x {peer}", "-" + why, None)
            continue
        ratio = ours["sagas_per_s"] / p["sagas_per_s"]
        sizes = ""
        if p.get("concurrent") != ours["concurrent"]:
            sizes = f", {_num(ours['concurrent'])} vs {_num(p['concurrent'])} at once"
        add(
            f"3-step saga (PostgreSQL, every step durable) >= {factor:g}x {peer}",
            f"{ratio:.2f}x ({_num(ours['sagas_per_s'])} vs {_num(p['sagas_per_s'])} sagas/s"
            f"{sizes})",
            ratio >= factor,
        )
    if ours is not None:
        add(
            "concurrent runs of 1,000+ sagas",
            f"{_num(ours['concurrent'])} at once, {'all' if ours['consistent'] else 'NOT all'}"
            " completed",
            ours["concurrent"] >= 1000 and bool(ours["consistent"]),
        )
    return out


def attach_peer_ratios(results: Row) -> None:
    """``ours_vs_peer`` on each peer row, from our own rows of the same run."""
    ours_saga = next(
        (
            r
            for r in results.get("saga", [])
            if r["storage"] == "postgresql" and r["shape"] == "3-step"
        ),
        None,
    )
    outbox = {(r["storage"], r["broker"]): r for r in results.get("outbox", [])}
    for p in results.get("peers", []):
        if p.get("skipped"):
            continue
        if p["workload"] == "outbox":
            mine = outbox.get(("postgresql", p["broker"]))
            if mine is not None:
                p["ours_vs_peer"] = mine["end_to_end_rate"] / p["end_to_end_rate"]
        elif ours_saga is not None:
            p["ours_vs_peer"] = ours_saga["sagas_per_s"] / p["sagas_per_s"]


def _gc_note(threshold: Any) -> str:
    """The collector's thresholds, when a run set them (ours and the peers alike)."""
    if not threshold or tuple(threshold) == (700, 10, 10):
        return ""
    return f", GC thresholds {','.join(str(t) for t in threshold)} (ours and peers)"


def render(results: Row) -> str:
    """Every table of a run, ready to print (or paste into docs/benchmarks.md)."""
    m = results["machine"]
    parts = [
        f"saga-outbox benchmarks ({results['mode']}) at {m.get('commit') or '?'}: "
        f"{m.get('cpus')} CPUs ({m.get('cpu_model', '?')}), Python {m.get('python')}"
        + _gc_note(m.get("gc_threshold"))
    ]
    if results.get("outbox"):
        parts.append(outbox_table(results["outbox"]))
        runs = max(r.get("runs", 1) for r in results["outbox"])
        if runs > 1:
            parts.append(
                f"Each case ran {runs} times (a fresh schema or file each time, ours then its"
                " baselines):\nrates are medians, ratios the median of each run's own ratio;"
                " the lowest and highest are in the JSON (spread)."
            )
        parts.append(ladder_table(results["outbox"]))
    if results.get("latency"):
        parts.append(latency_table(results["latency"]))
    if results.get("saga"):
        parts.append(saga_table(results["saga"]))
    if results.get("peers"):
        ours = next(
            (
                r
                for r in results.get("saga", [])
                if r["storage"] == "postgresql" and r["shape"] == "3-step"
            ),
            None,
        )
        parts.append(peers_table(results["peers"], ours))
    if results.get("scale"):
        parts.append(scale_table(results["scale"]))
    if results.get("scale_relay"):
        parts.append(scale_relay_table(results["scale_relay"]))
    busy, total = _busy_cases(results)
    if busy:
        worst = max(load for _, load in busy)
        parts.append(
            textwrap.fill(
                f"Note: {len(busy)} of {total} cases ran while the 1-minute load average was above "
                f"{_busy_limit(results):g} (up to {worst:.1f}); a case itself keeps about two "
                "processes busy (the benchmark and the database server), so other processes "
                "shared the machine and those numbers are low. Ratios within a case (ours vs. "
                "its baselines) hold better than ratios across cases. Each case's load is in "
                "the JSON (load_avg).",
                100,
            )
        )
    if results.get("skipped"):
        parts.append("Not run: " + "; ".join(f"{k}: {v}" for k, v in results["skipped"].items()))
    if results.get("targets"):
        parts.append(targets_table(results["targets"]))
    return "\n\n".join(parts) + "\n"


def _busy_limit(results: Row) -> float:
    return float(results["machine"].get("cpus") or 1) + 1.0


def _busy_cases(results: Row) -> tuple[list[tuple[str, float]], int]:
    """Cases run on a busy machine (label, load) and how many cases there were."""
    limit = _busy_limit(results)
    out, total = [], 0
    for bucket in ("outbox", "latency", "saga", "peers"):
        for r in results.get(bucket, []):
            if r.get("skipped"):
                continue
            total += 1
            load = float(r.get("load_avg") or 0.0)
            if load > limit:
                label = " ".join(
                    str(r[k]) for k in ("peer", "storage", "broker", "shape", "path") if k in r
                )
                out.append((f"{bucket} {label}", load))
    return out, total


def write_json(results: Row, path: Path) -> None:
    """The whole run as JSON (NaN written as null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(results), indent=2, default=str) + "\n")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def main() -> None:
    """``python -m benchmarks.report RESULTS.json``: print the tables of a saved run again."""
    import sys

    for path in sys.argv[1:]:
        print(render(json.loads(Path(path).read_text())))


if __name__ == "__main__":
    main()
