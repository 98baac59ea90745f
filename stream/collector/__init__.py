"""The HTTP collector's pieces (``POST /v1/events``, services/api/events.py): pure batch logic, the
per-shopper Redis state (served copies, written event ids), and the Kafka sink that waits for acks."""
