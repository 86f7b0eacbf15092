"""``saga``: demo, graph, and operator commands.

Storage and broker come from ``--database`` / ``--broker`` or ``SAGA_DATABASE_URL`` /
``SAGA_BROKER_URL``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import anyio

from saga_cli import demo
from saga_core import DeclarativeSaga, SagaState, SagaStatus, render_mermaid
from saga_core.errors import SagaError


def _load_class(target: str) -> type[DeclarativeSaga]:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"saga graph: expected MODULE:CLASS, got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"saga graph: cannot import {module_name!r}: {exc}") from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, DeclarativeSaga)):
        raise SystemExit(f"saga graph: {target!r} is not a DeclarativeSaga subclass")
    return cls


def _cmd_graph(args: argparse.Namespace) -> int:
    sys.path.insert(0, ".")
    cls = _load_class(args.target)
    print(render_mermaid(cls.definition()), end="")
    return 0


def _storage(args: argparse.Namespace) -> Any:
    from saga_storage import create_storage

    return create_storage(args.database)


def _age(ts: float) -> str:
    secs = max(0.0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs / size:.0f}{unit}"
    return f"{secs:.0f}s"


def _cmd_ls(args: argparse.Namespace) -> int:
    storage = _storage(args)
    status = SagaStatus(args.status.upper()) if args.status else None
    sagas = anyio.run(
        lambda: storage.list_sagas(
            status=status, saga_type=args.type, older_than=args.older_than, limit=args.limit
        )
    )
    print(f"{'ID':38} {'TYPE':24} {'STATUS':13} {'AGE':>5}  REASON")
    for s in sagas:
        age = _age(s.created_at)
        print(f"{s.saga_id:38} {s.saga_type:24} {s.status.value:13} {age:>5}  {s.reason or ''}")
    storage.dispose()
    return 0


def _show(state: SagaState) -> str:
    lines = [
        f"saga      {state.saga_id}",
        f"type      {state.saga_type} (definition {state.definition_hash})",
        f"status    {state.status.value}" + (f" (reason: {state.reason})" if state.reason else ""),
        f"created   {state.created_time.isoformat()}  updated {state.updated_time.isoformat()}",
    ]
    if state.lease_owner:
        lines.append(f"lease     {state.lease_owner} (epoch {state.lease_epoch})")
    if state.wake_at:
        lines.append(
            f"waits     until {datetime.fromtimestamp(state.wake_at, timezone.utc).isoformat()}"
        )
    if state.error:
        where = f"failed at {state.failed_step}" if state.failed_step else "stopped"
        lines.append(f"{where}: {state.error}")
    if state.note:
        lines.append(f"note      {state.note}")
    lines.append(f"input     {json.dumps(state.input, sort_keys=True)}")
    lines.append("steps:")
    for st in state.steps.values():
        took = ""
        if st.started_at and st.finished_at:
            took = f" {1000 * (st.finished_at - st.started_at):.1f}ms"
        crashes = f" crashes={st.crashes}" if st.crashes else ""
        lines.append(f"  {st.name:24} {st.status.value:20} attempts={st.attempts}{crashes}{took}")
        if st.result is not None:
            lines.append(f"  {'':24} result {json.dumps(st.result, sort_keys=True)}")
        if st.error:
            lines.append(f"  {'':24} error  {st.error}")
        if st.compensation_attempts:
            lines.append(f"  {'':24} compensation attempts={st.compensation_attempts}")
        if st.compensation_error:
            lines.append(f"  {'':24} compensation error {st.compensation_error}")
    return "\n".join(lines)


def _cmd_show(args: argparse.Namespace) -> int:
    storage = _storage(args)
    try:
        state = anyio.run(storage.load_saga, args.saga_id)
    except LookupError as exc:
        print(f"saga show: {exc}", file=sys.stderr)
        return 1
    finally:
        storage.dispose()
    print(_show(state))
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    from saga_core import SagaOrchestrator

    sys.path.insert(0, ".")
    _import_modules(args.imports)
    storage = _storage(args)
    try:
        state = anyio.run(SagaOrchestrator(storage).cancel, args.saga_id)
    except (SagaError, LookupError) as exc:
        print(f"saga cancel: {exc}", file=sys.stderr)
        return 1
    finally:
        storage.dispose()
    print(_show(state))
    return 0


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"saga: {name} must be a number, got {raw!r}") from None


def _import_modules(modules: Sequence[str] | None) -> None:
    sys.path.insert(0, ".")
    for module in modules or ():
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise SystemExit(f"saga: cannot import {module!r}: {exc}") from exc


def _cmd_worker(args: argparse.Namespace) -> int:
    from saga_brokers import create_broker, redact_url
    from saga_core import SagaWorker, registered_sagas

    _import_modules(args.imports)
    sagas = registered_sagas()
    if not sagas:
        print("saga worker: no saga classes found; pass --import MODULE", file=sys.stderr)
        return 2
    storage = _storage(args)
    broker = (
        create_broker(args.broker) if (args.broker or os.environ.get("SAGA_BROKER_URL")) else None
    )
    worker = SagaWorker(
        storage,
        broker,
        concurrency=args.concurrency,
        lease_seconds=args.lease,
        relay=broker is not None,
    )
    where = redact_url(str(args.broker or os.environ.get("SAGA_BROKER_URL", ""))) or "no broker"
    print(
        f"saga worker {worker.owner}: {', '.join(sorted(sagas))} "
        f"(concurrency {args.concurrency}, lease {args.lease:g}s, relay: {where})",
        flush=True,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        anyio.run(worker.run_until_signalled)
    finally:
        storage.dispose()
    print("saga worker stopped", flush=True)
    return 0


def _act_on_saga(args: argparse.Namespace, action: Callable[..., Awaitable[SagaState]]) -> int:
    """Run ``action(storage, saga_id, ...)``, print the saga it returns, map refusals to exit 1."""
    storage = _storage(args)
    try:
        state = anyio.run(action, storage, args.saga_id)
    except (SagaError, LookupError) as exc:
        print(f"saga {args.command}: {exc}", file=sys.stderr)
        return 1
    finally:
        storage.dispose()
    print(_show(state))
    return 0


def _cmd_retry(args: argparse.Namespace) -> int:
    from saga_core import retry_saga

    return _act_on_saga(args, retry_saga)


def _cmd_resolve(args: argparse.Namespace) -> int:
    from saga_core import resolve_saga

    status = SagaStatus(args.as_status.upper())
    return _act_on_saga(
        args, lambda storage, saga_id: resolve_saga(storage, saga_id, status, args.note)
    )


def _cmd_outbox(args: argparse.Namespace) -> int:
    storage = _storage(args)
    try:
        return _outbox(storage, args)
    except LookupError as exc:
        print(f"saga outbox {args.action}: {exc}", file=sys.stderr)
        return 1
    finally:
        storage.dispose()


def _outbox(storage: Any, args: argparse.Namespace) -> int:
    if args.action == "stats":
        st = anyio.run(storage.outbox_stats)
        age = "-" if st.oldest_pending_age is None else f"{st.oldest_pending_age:.1f}s"
        print(f"pending             {st.pending}")
        print(f"in flight (keys)    {st.claimed_keys}")
        print(f"dead                {st.dead}")
        print(f"blocked keys        {st.blocked_keys}")
        print(f"sent (not pruned)   {st.sent}")
        print(f"oldest pending age  {age}")
    elif args.action == "dead":
        dead = anyio.run(storage.dead_events, args.limit)
        print(f"{'EVENT ID':36}  {'KEY':24} {'SEQ':>5} {'TYPE':24} ATTEMPTS  LAST ERROR")
        for d in dead:
            print(
                f"{d.event_id:36}  {d.key:24} {d.seq:>5} {d.event_type:24} {d.attempts:>8}  "
                f"{d.last_error or ''}"
            )
    elif args.action == "replay":
        rec = anyio.run(storage.replay_key, args.key)
        print(f"key {rec.key!r} resumes at event {rec.event_id} (seq {rec.seq})")
    elif args.action == "skip":
        rec = anyio.run(storage.skip_event, args.event_id, args.note)
        print(f"event {rec.event_id} (key {rec.key!r}, seq {rec.seq}) skipped; the key flows on")
    elif args.action == "prune":
        n = anyio.run(lambda: storage.prune_outbox(args.older_than, batch=args.batch))
        print(f"pruned {n} sent events older than {args.older_than:g}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``saga`` command."""
    p = argparse.ArgumentParser(prog="saga", description="Sagas on a transactional outbox.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the order example on SQLite + in-memory broker")
    d.add_argument("--database", help="SQLAlchemy URL (default: a new SQLite file in a temp dir)")
    d.set_defaults(func=demo.run_demo)

    g = sub.add_parser(
        "graph", help="print a saga's forward graph and compensation order (Mermaid)"
    )
    g.add_argument("target", metavar="MODULE:CLASS")
    g.set_defaults(func=_cmd_graph)

    def with_db(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--database", help="SQLAlchemy URL (default: $SAGA_DATABASE_URL)")

    ls = sub.add_parser("ls", help="list sagas")
    with_db(ls)
    ls.add_argument("--status", choices=[s.value.lower() for s in SagaStatus])
    ls.add_argument("--type", help="saga type")
    ls.add_argument(
        "--older-than", type=float, metavar="SECONDS", help="created at least this long ago"
    )
    ls.add_argument("--limit", type=int, default=50)
    ls.set_defaults(func=_cmd_ls)

    sh = sub.add_parser("show", help="show one saga: per-step status, attempts, results, errors")
    with_db(sh)
    sh.add_argument("saga_id")
    sh.set_defaults(func=_cmd_show)

    c = sub.add_parser("cancel", help="abort a saga and compensate it")
    with_db(c)
    c.add_argument("saga_id")
    c.add_argument(
        "--import",
        dest="imports",
        action="append",
        metavar="MODULE",
        help="module defining the saga class",
    )
    c.set_defaults(func=_cmd_cancel)

    w = sub.add_parser("worker", help="run pending and recovered sagas (and the outbox relay)")
    with_db(w)
    w.add_argument("--broker", help="broker URL for the relay (default: $SAGA_BROKER_URL; none)")
    w.add_argument(
        "--import",
        dest="imports",
        action="append",
        metavar="MODULE",
        help="module defining saga classes (repeatable)",
    )
    w.add_argument(
        "--concurrency",
        type=int,
        default=int(_env_float("SAGA_WORKER_CONCURRENCY", 16)),
        help="sagas run at once (default: $SAGA_WORKER_CONCURRENCY or 16)",
    )
    w.add_argument(
        "--lease",
        type=float,
        default=_env_float("SAGA_LEASE_SECONDS", 30.0),
        metavar="SECONDS",
        help="lease length (default: $SAGA_LEASE_SECONDS or 30)",
    )
    w.set_defaults(func=_cmd_worker)

    r = sub.add_parser("retry", help="send a FAILED saga back to the workers")
    with_db(r)
    r.add_argument("saga_id")
    r.set_defaults(func=_cmd_retry)

    rs = sub.add_parser("resolve", help="close a FAILED saga by hand, with a note")
    with_db(rs)
    rs.add_argument("saga_id")
    rs.add_argument("--as", dest="as_status", choices=["completed", "compensated"], required=True)
    rs.add_argument("--note", required=True, help="what was done by hand")
    rs.set_defaults(func=_cmd_resolve)

    o = sub.add_parser("outbox", help="inspect and repair the outbox")
    osub = o.add_subparsers(dest="action", required=True)
    o_stats = osub.add_parser("stats", help="pending, in flight, dead, blocked keys, oldest age")
    o_dead = osub.add_parser("dead", help="list dead events with their last error")
    o_dead.add_argument("--limit", type=int, default=100)
    o_replay = osub.add_parser("replay", help="resume a blocked key at its dead event")
    o_replay.add_argument("key")
    o_skip = osub.add_parser("skip", help="mark a dead event sent without publishing it")
    o_skip.add_argument("event_id")
    o_skip.add_argument("--note", required=True, help="why it is skipped (stored with it)")
    o_prune = osub.add_parser("prune", help="delete sent events past their retention")
    o_prune.add_argument(
        "--older-than",
        type=float,
        default=7 * 86400,
        metavar="SECONDS",
        help="retention of sent events (default: 7 days)",
    )
    o_prune.add_argument("--batch", type=int, default=1000, help="rows per transaction")
    for sp in (o_stats, o_dead, o_replay, o_skip, o_prune):
        with_db(sp)
    o.set_defaults(func=_cmd_outbox)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``saga`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, ImportError) as exc:
        print(f"saga {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
