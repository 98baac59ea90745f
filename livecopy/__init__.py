"""livecopy: Kafka-driven real-time copy personalization."""

__version__ = "0.1.0"
