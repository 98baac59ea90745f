"""The API's typed application container: what the app and its extensions share, one attribute
(``app.state.livecopy``) instead of loose string attributes on FastAPI's ``app.state``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry

from core.settings import Settings
from stream.access.keys import KeyCache

if TYPE_CHECKING:
    import redis.asyncio as aredis

    from services.api.app import ApiMetrics
    from services.api.copy import CopyService
    from services.api.dashboard import Sampler
    from services.api.events import EventCollector
    from stream.model_updates import ModelUpdateFollower
    from stream.profile.store import AsyncProfileReader

Hook = Callable[[FastAPI], Awaitable[None]]


@dataclass
class AppState:
    settings: Settings
    http: ApiMetrics | None = None  # the API's own request metrics (the dashboard reads its latency)
    registries: list[CollectorRegistry] = field(default_factory=list)  # exported on /metrics
    startup: list[Hook] = field(default_factory=list)  # run in order by the lifespan
    shutdown: list[Hook] = field(default_factory=list)  # run in reverse order
    health_checks: list[Callable[[], dict[str, Any]]] = field(default_factory=list)  # merged into /healthz
    redis: aredis.Redis | None = None  # set by the lifespan
    profiles: AsyncProfileReader | None = None
    copy: CopyService | None = None  # GET /v1/copy (services.api.copy)
    copy_follower: ModelUpdateFollower | None = None
    copy_owns_engine: bool = False
    dashboard: Sampler | None = None
    events: EventCollector | None = None  # POST /v1/events (services.api.events)
    keys_cache: KeyCache = field(default_factory=lambda: KeyCache({}))  # API keys seen lately (services.api.auth)

    def require_redis(self) -> aredis.Redis:
        assert self.redis is not None, "used before the app's lifespan started"
        return self.redis

    def require_profiles(self) -> AsyncProfileReader:
        assert self.profiles is not None, "used before the app's lifespan started"
        return self.profiles


def state_of(app: FastAPI | Request) -> AppState:
    """The container of ``app`` (or of the app serving ``request``)."""
    a = app.app if isinstance(app, Request) else app
    st: AppState = a.state.livecopy
    return st
