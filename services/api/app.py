"""The site-facing HTTP API (FastAPI): profiles, health, metrics (and copy, see services.api.copy; the live
dashboard, see services.api.dashboard)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aredis
from fastapi import Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from core.contracts import USER_PATTERN, is_user_id
from core.metrics import LATENCY_BUCKETS
from core.settings import Settings
from services.api.auth import DENIALS, Denied, denied_handler, need
from services.api.state import AppState, state_of
from stream.forget import Forgotten, forget
from stream.profile.logic import render
from stream.profile.store import AsyncProfileReader
from stream.redis_io import TRANSIENT_REDIS_ERRORS, async_redis_client
from stream.redis_io import redis_client as sync_redis_client

log = logging.getLogger(__name__)


def error(status: int, code: str, message: str) -> JSONResponse:
    """livecopy's error answer; every 503 says when to come back (``Retry-After: 1``)."""
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """A parameter outside what the OpenAPI document declares: 422 in livecopy's error shape
    (``invalid_<parameter>``), as the contract's invalid ids are."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    loc = errors[0].get("loc", ()) if errors else ()
    name = str(loc[-1]) if loc else "request"
    msg = str(errors[0].get("msg", "invalid")) if errors else "invalid"
    return error(422, f"invalid_{name}", f"{name}: {msg}"[:300])


# The ids as the contract defines them, declared in the OpenAPI document (and checked again in the handlers).
UserIdPath: Any = Path(pattern=USER_PATTERN, description="1-128 chars of [A-Za-z0-9_.:@-]")


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("livecopy_http_requests", "HTTP requests", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("livecopy_http_seconds", "HTTP request latency", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)


def create_app(
    settings: Settings,
    *,
    extensions: list[Callable[[FastAPI], None]] | None = None,
    redis_client: aredis.Redis | None = None,
) -> FastAPI:
    """The API app. `extensions` add routes (the copy service registers GET /v1/copy this way)."""
    metrics = ApiMetrics()

    open_mode = settings.api.auth == "open"

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if open_mode:
            log.warning("API AUTH IS OPEN (api.auth=open): anyone who reaches this port reads shoppers' profiles and "
                        "steers the trainer. Dev and demo only; production runs with api.auth=keys.")
        client = redis_client or async_redis_client(settings.redis, max_connections=settings.api.redis_connections,
                                                             pool_wait_s=settings.api.redis_pool_wait_s)
        st = state_of(app)
        st.redis = client
        st.profiles = AsyncProfileReader(client, settings.redis.key_prefix)
        async with contextlib_aclosing_all(app):
            yield
        if redis_client is None:
            await client.aclose()

    # The OpenAPI document and its pages are the admin's (GET /openapi.json with an admin key); open mode
    # serves /docs and /redoc as FastAPI does.
    app = FastAPI(title="livecopy", version="1", lifespan=lifespan, openapi_url="/openapi.json" if open_mode else None,
                  docs_url="/docs" if open_mode else None, redoc_url="/redoc" if open_mode else None)
    app.state.livecopy = AppState(settings, http=metrics, registries=[metrics.registry])
    app.add_exception_handler(Denied, denied_handler)
    app.add_exception_handler(RequestValidationError, invalid_request)

    @app.middleware("http")
    async def measure(request: Request, call_next: Any) -> Any:
        start = time.perf_counter()
        response = await call_next(request)
        # The route is known only once routing ran; unmatched paths share one label (no series per URL).
        route = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.latency.labels(route).observe(time.perf_counter() - start)
        metrics.requests.labels(route, str(response.status_code)).inc()
        if open_mode:
            response.headers["X-Livecopy-Auth"] = "open"
        return response

    @app.get("/v1/profile/{user_id}", dependencies=[Depends(need("profile:read"))],
             responses={**DENIALS, 404: {"description": "no profile"}, 422: {"description": "invalid user_id"}})
    async def get_profile(request: Request, user_id: str = UserIdPath) -> Any:
        if not is_user_id(user_id):
            return error(422, "invalid_user_id", "user_id must be 1-128 chars of [A-Za-z0-9_.:@-]")
        try:
            state = await state_of(request).require_profiles().load(user_id)
        except TRANSIENT_REDIS_ERRORS as exc:
            return error(503, "unavailable", f"redis: {str(exc)[:200]}")
        if state is None:
            return error(404, "not_found", f"no profile for user {user_id!r}")
        return render(user_id, state, settings.profile).model_dump()

    @app.delete("/v1/profile/{user_id}", dependencies=[Depends(need("admin"))],
                responses={**DENIALS, 422: {"description": "invalid user_id"}})
    async def forget_profile(user_id: str = UserIdPath) -> Any:
        """Forget a shopper: every Redis key of theirs goes; a tombstone keeps replays out (stream/forget.py)."""
        if not is_user_id(user_id):
            return error(422, "invalid_user_id", "user_id must be 1-128 chars of [A-Za-z0-9_.:@-]")

        def run() -> Forgotten:
            client = sync_redis_client(settings.redis)
            try:
                return forget(client, settings, user_id, int(time.time() * 1000))
            finally:
                client.close()

        try:
            done = await asyncio.to_thread(run)
        except TRANSIENT_REDIS_ERRORS as exc:
            return error(503, "unavailable", f"redis: {str(exc)[:200]}")
        return {"forgotten": done.user_id, "keys_deleted": done.deleted, "tombstone_until_ms":
                done.at_ms + settings.profile.dedupe_window_s * 1000}

    @app.get("/healthz")
    async def healthz(request: Request) -> Any:
        try:
            await state_of(request).require_redis().ping()
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "redis": str(exc)[:200]}, status_code=503)
        checks = {"status": "ok", "redis": "ok", "auth": settings.api.auth}
        for check in state_of(request).health_checks:
            checks.update(check())
        return checks

    @app.get("/metrics", dependencies=[Depends(need("admin"))], response_class=PlainTextResponse, responses=DENIALS)
    async def prometheus() -> Response:
        body = b"".join(generate_latest(r) for r in state_of(app).registries)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    if not open_mode:
        @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(need("admin"))])
        async def openapi() -> Any:
            return app.openapi()

    for ext in extensions or []:
        ext(app)
    if settings.api.dashboard:
        from services.api.dashboard import dashboard_extension

        dashboard_extension(settings)(app)
    return app


@asynccontextmanager
async def contextlib_aclosing_all(app: FastAPI) -> AsyncIterator[None]:
    """Run the start/stop hooks extensions registered on the app's ``AppState.startup`` / ``shutdown``."""
    st = state_of(app)
    for hook in st.startup:
        await hook(app)
    try:
        yield
    finally:
        for hook in reversed(st.shutdown):
            await hook(app)
