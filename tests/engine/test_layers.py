"""Architecture rules that code review alone would miss."""

from __future__ import annotations

import subprocess
import sys


def test_core_imports_no_storage_or_broker_code() -> None:
    code = (
        "import sys, saga_core; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('sqlalchemy', 'psycopg', 'kafka', 'aio_pika', 'redis', 'saga_storage', 'saga_brokers')]; "
        "print(','.join(sorted(bad)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_names_have_docstrings() -> None:
    import saga_brokers
    import saga_core
    import saga_storage

    missing = [
        f"{mod.__name__}.{name}"
        for mod in (saga_core, saga_storage, saga_brokers)
        for name in mod.__all__
        if not (getattr(mod, name).__doc__ or "").strip()
    ]
    assert missing == []
