"""livecopy: Kafka-driven real-time copy personalization.

The producer SDK is importable from here: ``from livecopy import EventProducer``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["DeliveryError", "EventProducer", "InvalidEvent", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import livecopy` (and `livecopy --help`) does not load the Kafka client.
    if name in ("EventProducer", "DeliveryError", "InvalidEvent"):
        from stream import producer

        return getattr(producer, name)
    raise AttributeError(name)
