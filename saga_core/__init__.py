"""saga-outbox core: sagas with flexible compensation on a transactional outbox.

Pure model and engine; depends on anyio only. Storage (``saga_storage``) and brokers
(``saga_brokers``) plug in through the ports in :mod:`saga_core.ports`.
"""

from saga_core.consumer import ConsumerRunner, ConsumingBroker, Delivery, dead_letter_topic
from saga_core.context import StepContext
from saga_core.definition import (
    CompensationDefinition,
    DeclarativeSaga,
    SagaDefinition,
    StepDefinition,
    compensate,
    registered_saga,
    registered_sagas,
    step,
)
from saga_core.errors import (
    BlockingCallInEventLoop,
    BrokerError,
    BrokerUnavailable,
    ErrorRecord,
    IllegalTransition,
    LeaseLost,
    PublishFailed,
    SagaConflict,
    SagaDefinitionError,
    SagaError,
    SagaFailed,
    SagaNotFound,
    StepRejected,
    StorageError,
)
from saga_core.events import Message, OutboxEvent
from saga_core.graph import SagaCompensationGraph
from saga_core.inbox import Inbox, InboxStore
from saga_core.mermaid import render_mermaid
from saga_core.operator import resolve_saga, retry_saga
from saga_core.orchestrator import SagaOrchestrator, SagaResult
from saga_core.outbox import OptimisticPublisher, OutboxWorker
from saga_core.ports import Broker, OutboxStore, SagaStore
from saga_core.records import SagaState, StepState
from saga_core.retry import RetryPolicy
from saga_core.states import OutboxStatus, SagaStatus, StepStatus
from saga_core.sync import SyncSagaOrchestrator
from saga_core.worker import SagaWorker

__all__ = [
    "BlockingCallInEventLoop",
    "Broker",
    "BrokerError",
    "BrokerUnavailable",
    "CompensationDefinition",
    "ConsumerRunner",
    "ConsumingBroker",
    "DeclarativeSaga",
    "Delivery",
    "ErrorRecord",
    "IllegalTransition",
    "Inbox",
    "InboxStore",
    "LeaseLost",
    "Message",
    "OptimisticPublisher",
    "OutboxEvent",
    "OutboxStatus",
    "OutboxStore",
    "OutboxWorker",
    "PublishFailed",
    "RetryPolicy",
    "SagaCompensationGraph",
    "SagaConflict",
    "SagaDefinition",
    "SagaDefinitionError",
    "SagaError",
    "SagaFailed",
    "SagaNotFound",
    "SagaOrchestrator",
    "SagaResult",
    "SagaState",
    "SagaStatus",
    "SagaStore",
    "SagaWorker",
    "StepContext",
    "StepDefinition",
    "StepRejected",
    "StepState",
    "StepStatus",
    "StorageError",
    "SyncSagaOrchestrator",
    "compensate",
    "dead_letter_topic",
    "registered_saga",
    "registered_sagas",
    "render_mermaid",
    "resolve_saga",
    "retry_saga",
    "step",
]
