"""Exceptions raised by saga-outbox.

Every error a user can meet is defined here so that adapters and storage can map their own
failures onto a small, documented set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from saga_core.states import SagaStatus


class SagaError(Exception):
    """Base class of every error raised by saga-outbox."""


class SagaDefinitionError(SagaError, ValueError):
    """A saga class is invalid; the message names the offending steps.

    Raised when the class is defined, not when it first runs.
    """

    def __init__(self, message: str, steps: Sequence[str] = ()) -> None:
        super().__init__(message)
        #: The step names the problem is about (for tools; the message names them too).
        self.steps: tuple[str, ...] = tuple(steps)


class SagaNotFound(SagaError, LookupError):
    """No saga with this id exists in the storage."""

    def __init__(self, saga_id: str) -> None:
        super().__init__(f"no saga with id {saga_id!r}")
        self.saga_id = saga_id


class SagaConflict(SagaError, ValueError):
    """A saga id is already used by a saga with another type or input."""

    def __init__(self, saga_id: str, detail: str) -> None:
        super().__init__(f"saga {saga_id!r} already exists with {detail}")
        self.saga_id = saga_id


class StepRejected(SagaError):
    """Raised by a step to say it cleanly refused: nothing happened, so it is not compensated.

    Use it for business rejections such as "card declined". Any other exception means the
    outcome is unknown and the step's compensation runs.
    """


class IllegalTransition(SagaError, RuntimeError):
    """A status change that the state machine does not allow (a bug, or a concurrent writer)."""


class LeaseLost(SagaError):
    """This process no longer owns the saga: another worker took it over. Nothing was written."""

    def __init__(self, saga_id: str) -> None:
        super().__init__(f"lease on saga {saga_id!r} was lost; another worker owns it now")
        self.saga_id = saga_id


class StorageError(SagaError):
    """The database failed for a reason that is not about the data (connection, lock, timeout)."""


class BrokerError(SagaError):
    """Base class of broker failures."""


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached; publishing should pause and retry later.

    An outage consumes no delivery attempts.
    """


class PublishFailed(BrokerError):
    """The broker refused one message (too large, unroutable, unknown topic...).

    Counts as a delivery attempt for that event.
    """


class BlockingCallInEventLoop(SagaError, RuntimeError):
    """A blocking (sync) call where it would deadlock: inside an event loop or a step thread."""


@dataclass(frozen=True)
class ErrorRecord:
    """A stored description of an exception: survives restarts, unlike the exception object."""

    type: str
    message: str

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorRecord:
        """Describe ``exc`` by its qualified type name and message."""
        kind = type(exc)
        name = (
            kind.__qualname__
            if kind.__module__ == "builtins"
            else (f"{kind.__module__}.{kind.__qualname__}")
        )
        return cls(type=name, message=str(exc) or repr(exc))

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"


class SagaFailed(SagaError):
    """A saga did not complete. Raised by ``execute()`` and ``result()``.

    Attributes:
        saga_id: the saga.
        status: ``SagaStatus.COMPENSATED`` (everything undone) or ``SagaStatus.FAILED``
            (needs an operator; ``reason`` says why).
        step: the forward step whose failure started compensation (``None`` if cancelled).
        error: a record (type, message) of that failure.
        cause: the exception itself, when it happened in this process.
        compensation_errors: per step, the last error of compensations that gave up.
        reason: why a ``FAILED`` saga stopped (``compensation_failed``, ``forward_stuck``...).
    """

    def __init__(
        self,
        saga_id: str,
        status: SagaStatus,
        step: str | None,
        error: ErrorRecord | None,
        *,
        cause: BaseException | None = None,
        compensation_errors: dict[str, ErrorRecord] | None = None,
        reason: str | None = None,
    ) -> None:
        self.saga_id = saga_id
        self.status = status
        self.step = step
        self.error = error
        self.cause = cause
        self.compensation_errors = dict(compensation_errors or {})
        self.reason = reason
        where = f" at step {step!r}" if step else ""
        why = f": {error}" if error else ""
        tail = f" (reason: {reason})" if reason else ""
        super().__init__(f"saga {saga_id!r} failed{where}{why}; now {status.value}{tail}")
