"""Runs the chosen suites and collects one result document (see :mod:`benchmarks.report`)."""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from benchmarks._measure import Progress, machine
from benchmarks._servers import BROKERS, STORAGES, Services, postgres_available
from benchmarks.outbox import (
    FULL_OUTBOX,
    LATENCY_PATHS,
    QUICK_OUTBOX,
    OutboxSizes,
    latency_case,
    relay_case,
)
from benchmarks.peers import peer_outbox, peer_saga
from benchmarks.report import attach_peer_ratios, evaluate_targets
from benchmarks.saga import FULL_SAGA, QUICK_SAGA, SHAPES, SagaSizes, saga_case
from benchmarks.scale import ENGINES, relay_scale_case, scale_case

SUITES = ("outbox", "saga", "peers")
#: Suites run only when named (not part of ``all``, which must stay under 3 minutes quick).
EXTRA_SUITES = ("scale",)
PEERS = ("sagaz", "sagaz+outbox", "dbos")


@dataclass
class SuiteConfig:
    """What to run, and how big."""

    suites: tuple[str, ...] = SUITES
    quick: bool = False
    storages: tuple[str, ...] = STORAGES
    brokers: tuple[str, ...] = BROKERS
    peers: tuple[str, ...] = PEERS
    outbox: OutboxSizes = field(default_factory=lambda: FULL_OUTBOX)
    saga: SagaSizes = field(default_factory=lambda: FULL_SAGA)
    latency: bool = True
    progress: bool = True

    @classmethod
    def make(cls, *, quick: bool, **changes: Any) -> SuiteConfig:
        base = cls(
            quick=quick,
            outbox=QUICK_OUTBOX if quick else FULL_OUTBOX,
            saga=QUICK_SAGA if quick else FULL_SAGA,
        )
        return replace(base, **changes)


async def run_suite(config: SuiteConfig) -> dict[str, Any]:
    """Run the configured suites; failures of one case are recorded, not raised."""
    # Our own warnings (e.g. a relay backing off) would garble the progress line.
    saga_log = logging.getLogger("saga")
    level = saga_log.level
    saga_log.setLevel(logging.ERROR)
    try:
        return await _run_suite(config)
    finally:
        saga_log.setLevel(level)


async def _run_suite(config: SuiteConfig) -> dict[str, Any]:
    storages = tuple(s for s in config.storages if s != "postgresql" or postgres_available())
    skipped: dict[str, str] = {}
    if len(storages) < len(config.storages):
        skipped["postgresql"] = "PostgreSQL is not reachable"
    results: dict[str, Any] = {
        "mode": "quick" if config.quick else "full",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "sizes": {"outbox": config.outbox.__dict__, "saga": config.saga.__dict__},
        "outbox": [],
        "latency": [],
        "saga": [],
        "peers": [],
        "scale": [],
        "scale_relay": [],
        "errors": [],
        "skipped": skipped,
    }
    brokers = config.brokers if {"outbox", "peers"} & set(config.suites) else ()
    # The peers never use our Kafka (sagaz's needs aiokafka): start tansu for the outbox only.
    wanted = brokers if "outbox" in config.suites else tuple(b for b in brokers if b != "kafka")
    if "scale" in config.suites and "kafka" in config.brokers and "kafka" not in wanted:
        wanted = (*wanted, "kafka")  # the relay scale-out runs against Kafka only
    steps: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]], str]] = []
    with Services(wanted) as services:
        skipped.update(services.skipped)
        if "outbox" in config.suites:
            for st in storages:
                for kind, target in services.targets.items():
                    steps.append(
                        (
                            f"outbox {st} -> {kind}",
                            _bind(relay_case, st, target, config.outbox),
                            "outbox",
                        )
                    )
                    if config.latency:
                        for path in LATENCY_PATHS:
                            if path == "notify" and st != "postgresql":
                                continue  # SQLite has no notifications: its relay polls
                            steps.append(
                                (
                                    f"latency {st} -> {kind} via {path}",
                                    _bind(latency_case, st, target, config.outbox, path=path),
                                    "latency",
                                )
                            )
        if "saga" in config.suites:
            for st in storages:
                for shape in SHAPES:
                    steps.append(
                        (f"saga {st} {shape}", _bind(saga_case, st, shape, config.saga), "saga")
                    )
        if "peers" in config.suites:
            seq = config.saga.sequential
            for peer in config.peers:
                conc = config.saga.concurrent_for_peer(peer)
                steps.append(
                    (f"peer {peer} 3-step saga", _bind(peer_saga, peer, seq, conc), "peers")
                )
            if "sagaz" in config.peers:
                o = config.outbox
                for kind in brokers:
                    if kind in services.skipped:
                        continue
                    steps.append(
                        (
                            f"peer sagaz outbox -> {kind}",
                            _bind(
                                peer_outbox,
                                kind,
                                o.peer_events or o.events,
                                o.per_key,
                                o.commit_batch,
                            ),
                            "peers",
                        )
                    )
        if "scale" in config.suites:
            sagas = config.saga.concurrent_for("3-step")
            for engine in ENGINES:
                steps.append((f"scale-out {engine}", _bind(scale_case, engine, sagas), "scale"))
            # Kafka only: the relay bound by its client's CPU (docs/benchmarks.md).
            kafka, o = services.targets.get("kafka"), config.outbox
            if kafka is not None:
                steps.append(
                    (
                        "scale-out relay -> kafka",
                        _bind(relay_scale_case, kafka, o.events, o.per_key, o.commit_batch),
                        "scale_relay",
                    )
                )
        progress = Progress(len(steps), enabled=config.progress)
        for label, fn, bucket in steps:
            progress.step(label)
            load = os.getloadavg()[0]
            try:
                row = await fn()
            except Exception as exc:
                results["errors"].append(
                    {
                        "case": label,
                        "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc(),
                    }
                )
                progress.note(f"{label} failed: {type(exc).__name__}: {exc}")
                continue
            # Other processes on the machine depress every number; say when they were busy.
            row["load_avg"] = round(max(load, os.getloadavg()[0]), 2)
            results[bucket].append(row)
            if row.get("skipped"):
                progress.note(f"{label}: not run: {row['skipped']}")
            elif row.get("consistent") is False:
                progress.note(f"{label}: INCONSISTENT result")
            services.cleanup()
        progress.finish()
    attach_peer_ratios(results)
    results["targets"] = evaluate_targets(results)
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return results


def _bind(
    fn: Callable[..., Awaitable[dict[str, Any]]], *args: Any, **kwargs: Any
) -> Callable[[], Awaitable[dict[str, Any]]]:
    async def call() -> dict[str, Any]:
        return await fn(*args, **kwargs)

    return call
