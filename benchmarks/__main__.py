"""Command line: ``python -m benchmarks {outbox,saga,peers,all} [--quick] [--json PATH]``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import anyio

from benchmarks._measure import GC_ENV, apply_gc_threshold, parse_gc_threshold
from benchmarks._servers import BROKERS, STORAGES
from benchmarks.report import render, write_json
from benchmarks.runner import EXTRA_SUITES, PEERS, SUITES, SuiteConfig, run_suite


def _csv(allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in items if x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(bad)}; choose from {', '.join(allowed)}"
            )
        return items

    return parse


def _gc_threshold(text: str) -> str:
    try:
        parse_gc_threshold(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="saga-outbox benchmarks: outbox relay, sagas, and peers, against "
        "baselines measured in the same run.",
    )
    p.add_argument(
        "suite",
        choices=(*SUITES, *EXTRA_SUITES, "all"),
        help="what to run (all: " + ", ".join(SUITES) + ")",
    )
    p.add_argument("--quick", action="store_true", help="small sizes (all --quick: < 3 min)")
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="PATH",
        help="where to write the results (default: bench-results-<suite>.json)",
    )
    p.add_argument(
        "--storages",
        type=_csv(STORAGES),
        default=STORAGES,
        help=f"comma-separated subset of {','.join(STORAGES)}",
    )
    p.add_argument(
        "--brokers",
        type=_csv(BROKERS),
        default=BROKERS,
        help=f"comma-separated subset of {','.join(BROKERS)}",
    )
    p.add_argument(
        "--peers",
        type=_csv(PEERS),
        default=PEERS,
        help=f"comma-separated subset of {','.join(PEERS)}",
    )
    p.add_argument("--events", type=int, default=None, help="outbox events per case")
    p.add_argument("--per-key", type=int, default=None, help="outbox events per key")
    p.add_argument(
        "--sagas", type=int, default=None, help="concurrent 3-step sagas (10-step: a fifth of it)"
    )
    p.add_argument("--sequential", type=int, default=None, help="sagas run one by one")
    p.add_argument(
        "--saga-broker",
        default=None,
        metavar="URL",
        help="give our saga orchestrator this broker (e.g. memory://): each step's event is "
        "published as it commits (optimistic publishing), as in a deployment with a broker",
    )
    p.add_argument("--no-latency", action="store_true", help="skip the outbox latency runs")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    p.add_argument(
        "--gc-threshold",
        type=_gc_threshold,
        default=None,
        metavar="G0,G1,G2",
        help="garbage collector thresholds for ours and the peers alike (gc.set_threshold; "
        "Python's default is 700,10,10; docs/workers.md explains 700,10,100)",
    )
    return p


def config_from(args: argparse.Namespace) -> SuiteConfig:
    suites = SUITES if args.suite == "all" else (args.suite,)
    config = SuiteConfig.make(
        quick=args.quick,
        suites=suites,
        storages=args.storages,
        brokers=args.brokers,
        peers=args.peers,
        latency=not args.no_latency,
        progress=not args.no_progress,
    )
    outbox = config.outbox
    if args.events is not None:
        outbox = replace(outbox, events=args.events, rabbitmq_events=None)
    if args.per_key is not None:
        outbox = replace(outbox, per_key=args.per_key)
    saga = config.saga
    if args.sagas is not None:
        saga = replace(
            saga, concurrent={"3-step": args.sagas, "10-step fan-out": max(1, args.sagas // 5)}
        )
    if args.sequential is not None:
        saga = replace(saga, sequential=args.sequential)
    if args.saga_broker is not None:
        saga = replace(saga, broker=args.saga_broker)
    return replace(config, outbox=outbox, saga=saga)


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    inherited = os.environ.get(GC_ENV)
    if args.gc_threshold is None and inherited:
        try:
            parse_gc_threshold(inherited)
        except ValueError as exc:
            p.error(f"${GC_ENV}: {exc}")
    if args.gc_threshold is not None:
        os.environ[GC_ENV] = args.gc_threshold  # inherited by the peers' processes
    apply_gc_threshold()
    config = config_from(args)
    started = time.perf_counter()
    results = anyio.run(run_suite, config)
    results["command"] = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(render(results))
    path = args.json or Path(f"bench-results-{args.suite}{'-quick' if args.quick else ''}.json")
    write_json(results, path)
    print(f"results written to {path} ({results['seconds']}s)")
    for err in results["errors"]:
        print(f"ERROR in {err['case']}: {err['error']}", file=sys.stderr)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
