"""Broker adapters behind the ``Broker`` port, chosen by URL.

``create_broker(url)`` picks the adapter from the URL scheme; ``SAGA_BROKER_URL`` is used when no
URL is given, and ``memory://`` when neither is. New schemes register with
:func:`register_broker` without touching the core.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from urllib.parse import urlsplit

from saga_brokers._url import redact_url
from saga_brokers.memory import InMemoryBroker, InMemoryConsumer
from saga_core.ports import Broker

__all__ = ["InMemoryBroker", "InMemoryConsumer", "create_broker", "redact_url", "register_broker"]

BrokerFactory = Callable[[str], Broker]

# scheme -> ("module:attribute", extra to install). Imported lazily so a missing optional client
# library only matters to users of that broker.
_REGISTRY: dict[str, tuple[str, str | None]] = {
    "memory": ("saga_brokers.memory:_from_url", None),
    "kafka": ("saga_brokers.kafka:_from_url", "kafka"),
    "amqp": ("saga_brokers.rabbitmq:_from_url", "rabbitmq"),
    "amqps": ("saga_brokers.rabbitmq:_from_url", "rabbitmq"),
    "redis": ("saga_brokers.redis_streams:_from_url", "redis"),
    "rediss": ("saga_brokers.redis_streams:_from_url", "redis"),
}
_FACTORIES: dict[str, BrokerFactory] = {}


def register_broker(scheme: str, factory: BrokerFactory | str, extra: str | None = None) -> None:
    """Make ``create_broker`` accept ``scheme://`` URLs.

    ``factory`` is a callable taking the URL, or a ``"module:attribute"`` string imported on first
    use; ``extra`` names the pip extra that provides its client library (for the error message).
    """
    if isinstance(factory, str):
        _REGISTRY[scheme] = (factory, extra)
        _FACTORIES.pop(scheme, None)
    else:
        _FACTORIES[scheme] = factory
        _REGISTRY.pop(scheme, None)


def create_broker(url: str | None = None) -> Broker:
    """Return the broker for ``url`` (or ``$SAGA_BROKER_URL``, or ``memory://``).

    Raises ``ValueError`` for an unknown scheme or a malformed URL, and ``ImportError`` naming
    the extra to install when the broker's client library is missing.
    """
    url = url or os.environ.get("SAGA_BROKER_URL") or "memory://"
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"broker URL must look like scheme://..., got {redact_url(str(url))!r}")
    scheme = urlsplit(url).scheme.lower()
    factory = _FACTORIES.get(scheme)
    if factory is None:
        if scheme not in _REGISTRY:
            known = ", ".join(sorted({*_REGISTRY, *_FACTORIES}))
            raise ValueError(
                f"unknown broker URL scheme {scheme!r} in {redact_url(url)!r}; known: {known}"
            )
        target, extra = _REGISTRY[scheme]
        module_name, _, attr = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            hint = f"pip install 'saga-outbox[{extra}]'" if extra else "check your installation"
            raise ImportError(
                f"the {scheme}:// broker needs a library that is not installed "
                f"({exc.name or exc}); {hint}"
            ) from exc
        factory = getattr(module, attr)
        _FACTORIES[scheme] = factory
    return factory(url)
