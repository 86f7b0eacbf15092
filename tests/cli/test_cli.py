"""The ``saga`` command, run as a user would: in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def saga(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    return subprocess.run(
        [sys.executable, "-m", "saga_cli.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def test_demo_runs_with_no_configuration(tmp_path: Path) -> None:
    out = saga("demo", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert re.search(r"saga order-1-\w+ COMPLETED", text)
    assert re.search(r"saga order-2-\w+ COMPENSATED", text)
    assert "step reserve_inventory failed" in text
    # the declared order: cancel the order first, then refund
    assert "compensated in order: create_order -> charge_payment" in text
    assert text.index("cancel_order undid create_order") < text.index(
        "refund_payment undid charge_payment"
    )
    assert "Outbox: 7 events published" in text
    assert "flowchart TB" in text
    assert list(tmp_path.iterdir()) == []  # nothing left behind in the working directory


def test_demo_then_ls_and_show(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    assert saga("demo", "--database", url).returncode == 0
    assert saga("demo", "--database", url).returncode == 0  # runs again on the same database
    ls = saga("ls", "--database", url)
    assert ls.returncode == 0, ls.stderr
    ids = re.findall(r"^(order-[12]-\w+)\s+order-placement\s+(\w+)", ls.stdout, re.M)
    assert len(ids) == 4
    assert {status for sid, status in ids if sid.startswith("order-1")} == {"COMPLETED"}
    assert {status for sid, status in ids if sid.startswith("order-2")} == {"COMPENSATED"}
    only = saga("ls", "--database", url, "--status", "compensated")
    assert "order-2-" in only.stdout and "order-1-" not in only.stdout
    failed_id = next(sid for sid, _ in ids if sid.startswith("order-2"))
    show = saga("show", failed_id, "--database", url)
    assert show.returncode == 0, show.stderr
    assert "reserve_inventory" in show.stdout and "REJECTED" in show.stdout
    assert "out of stock" in show.stdout
    assert show.stdout.count("COMPENSATED") >= 3  # the saga and two steps


def test_show_unknown_saga(tmp_path: Path) -> None:
    out = saga("show", "nope", "--database", f"sqlite:///{tmp_path / 'x.db'}")
    assert out.returncode == 1
    assert "no saga with id 'nope'" in out.stderr


def test_bad_database_url() -> None:
    out = saga("ls", "--database", "definitely not a url")
    assert out.returncode == 2
    assert "invalid database URL" in out.stderr


def test_graph_prints_mermaid_with_dropped_edge() -> None:
    out = saga("graph", "examples.order_saga:OrderPlacementSaga")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("flowchart TB")
    assert "s_create_order --> s_charge_payment" in out.stdout
    assert "c_s_create_order --> c_s_charge_payment" in out.stdout  # explicit: cancel, refund
    assert "dropped" in out.stdout


def test_graph_bad_target() -> None:
    out = saga("graph", "examples.order_saga:Nope")
    assert out.returncode != 0
    assert "not a DeclarativeSaga subclass" in out.stderr


def test_outbox_commands(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'o.db'}"
    # Make a dead event through the library, as a relay would after repeated refusals.
    code = f"""
import anyio
from collections.abc import Sequence
from saga_brokers import InMemoryBroker
from saga_core import Message, OutboxEvent, OutboxWorker, PublishFailed
from saga_storage import create_storage

class Refusing(InMemoryBroker):
    async def publish(self, messages: Sequence[Message]):
        return [PublishFailed("too big") for _ in messages]

s = create_storage({url!r})
with s.engine.begin() as conn:
    s.append_outbox(OutboxEvent(aggregate_id="k1", event_type="big", payload={{}}), conn=conn)
    s.append_outbox(OutboxEvent(aggregate_id="k1", event_type="next", payload={{}}), conn=conn)
anyio.run(OutboxWorker(s, Refusing(), max_attempts=1).drain)
print(anyio.run(s.dead_events)[0].event_id)
"""
    made = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert made.returncode == 0, made.stderr
    event_id = made.stdout.strip()
    stats = saga("outbox", "stats", "--database", url)
    assert stats.returncode == 0, stats.stderr
    assert re.search(r"dead\s+1", stats.stdout)
    assert re.search(r"blocked keys\s+1", stats.stdout)
    assert re.search(r"pending\s+1", stats.stdout)
    dead = saga("outbox", "dead", "--database", url)
    assert event_id in dead.stdout and "too big" in dead.stdout
    skip = saga("outbox", "skip", event_id, "--note", "oversized", "--database", url)
    assert skip.returncode == 0, skip.stderr
    after = saga("outbox", "stats", "--database", url)
    assert re.search(r"dead\s+0", after.stdout)
    assert re.search(r"blocked keys\s+0", after.stdout)
    again = saga("outbox", "replay", "k1", "--database", url)
    assert again.returncode == 1
    assert "no dead event" in again.stderr
    prune = saga("outbox", "prune", "--older-than", "0", "--database", url)
    assert prune.returncode == 0
    assert "pruned 1 sent events" in prune.stdout  # the skipped one counts as sent


def test_worker_runs_started_sagas_and_stops_on_sigterm(tmp_path: Path) -> None:
    import signal
    import time

    url = f"sqlite:///{tmp_path / 'w.db'}"
    start = f"""
import anyio
from saga_core import SagaOrchestrator
from saga_storage import create_storage
from tests.engine.sagas import OrderSaga
s = create_storage({url!r})
async def main():
    o = SagaOrchestrator(s)
    for i in range(5):
        await o.start(OrderSaga(), context={{"amount": 1, "fail_ship": i == 0}}, saga_id=f"w-{{i}}")
anyio.run(main)
"""
    made = subprocess.run([sys.executable, "-c", start], cwd=ROOT, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    env["SAGA_DATABASE_URL"] = url
    env["SAGA_LEASE_SECONDS"] = "5"
    worker = subprocess.Popen(
        [sys.executable, "-m", "saga_cli.main", "worker", "--import", "tests.engine.sagas"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ls = saga("ls", "--database", url)
            if ls.stdout.count("COMPLETED") == 4 and ls.stdout.count("COMPENSATED") == 1:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"sagas did not settle:\n{ls.stdout}")
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert worker.returncode == 0, out
    assert "lease 5s" in out  # read from SAGA_LEASE_SECONDS
    assert "test-order" in out
    assert "saga worker stopped" in out


def test_retry_and_resolve_a_failed_saga(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    code = f"""
import anyio
from saga_core import SagaFailed, SagaOrchestrator
from saga_storage import create_storage
from tests.engine.sagas import BadCompensationSaga
s = create_storage({url!r})
async def main():
    for sid in ("bad-1", "bad-2"):
        try:
            await SagaOrchestrator(s).execute(BadCompensationSaga(), saga_id=sid)
        except SagaFailed as exc:
            print(exc.status.value, exc.reason)
anyio.run(main)
"""
    made = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert made.stdout.split("\n")[:2] == ["FAILED compensation_failed"] * 2, made.stderr
    retried = saga("retry", "bad-1", "--database", url)
    assert retried.returncode == 0, retried.stderr
    assert "status    COMPENSATING" in retried.stdout
    assert "retried by operator" in retried.stdout
    done = saga(
        "resolve", "bad-1", "--as", "compensated", "--note", "refunded b by hand", "--database", url
    )
    assert done.returncode == 1  # COMPENSATING now, not FAILED: nothing to resolve
    assert "only FAILED sagas" in done.stderr
    resolved = saga(
        "resolve", "bad-2", "--as", "compensated", "--note", "refunded b by hand", "--database", url
    )
    assert resolved.returncode == 0, resolved.stderr
    assert "status    COMPENSATED" in resolved.stdout
    assert "resolved by operator: refunded b by hand" in resolved.stdout
    ok = saga("resolve", "nope", "--as", "completed", "--note", "x", "--database", url)
    assert ok.returncode == 1
    assert "no saga with id 'nope'" in ok.stderr
