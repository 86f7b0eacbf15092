"""The saga and outbox repository, shared by every dialect (DESIGN.md sections 3 and 4).

Methods come in pairs: a sync ``_name`` that runs one short transaction, and the async ``name``
that runs it in a worker thread under this storage's own limiter (never anyio's shared default).
Dialect subclasses supply engine setup, the database clock, the upsert and claim locking.
"""

from __future__ import annotations

from saga_storage.saga_repository import SagaRepository

__all__ = ["SqlStorage"]


class SqlStorage(SagaRepository):
    """Saga and outbox storage on a SQLAlchemy engine. Create it with ``create_storage(url)``.

    ``engine`` is public: application code opens its own transactions on it and calls
    :meth:`append_outbox` inside them.
    """
