"""Who may call the API: API keys with scopes (``copy`` for a site's servers, ``profile:read``,
``admin`` for metrics, dashboard and the OpenAPI document, ``debug`` for a copy's features), sent as
``Authorization: Bearer <key>`` or ``X-Api-Key``. Keys are required unless ``api.auth=open`` (dev and
demo), which the service announces loudly at start and on every response."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.responses import JSONResponse

from services.api.state import state_of
from stream.access.keys import ApiKey, lookup
from stream.redis_io import TRANSIENT_REDIS_ERRORS

log = logging.getLogger(__name__)

OPEN = ApiKey("open", "open (api.auth=open)", ("copy", "profile:read", "admin", "debug"), 0)


class Denied(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": 'Bearer realm="livecopy"'} if self.status == 401 else None
        return JSONResponse({"error": self.code, "message": self.message}, status_code=self.status, headers=headers)


def presented(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return request.headers.get("x-api-key") or None


async def authorize(request: Request, scope: str) -> ApiKey:
    """The caller's key if it may use ``scope``; raises ``Denied`` (401 no or unknown key, 403 no scope)."""
    st = state_of(request)
    if st.settings.api.auth == "open":
        return OPEN
    secret = presented(request)
    if secret is None:
        raise Denied(401, "unauthorized", "an API key is required (Authorization: Bearer <key>)")
    now = time.monotonic()
    found, key = st.keys_cache.get(secret, now)
    if not found:
        try:
            key = await lookup(st.require_redis(), st.settings.redis.key_prefix, secret)
        except TRANSIENT_REDIS_ERRORS as exc:
            raise Denied(503, "unavailable", f"redis: {str(exc)[:200]}") from exc
        st.keys_cache.put(secret, key, now)
    if key is None or not key.active:
        raise Denied(401, "unauthorized", "unknown or revoked API key")
    if not key.allows(scope):
        raise Denied(403, "forbidden", f"this key may not use {scope!r}")
    return key


def need(scope: str) -> Callable[[Request], Awaitable[ApiKey]]:
    """A FastAPI dependency: the caller's key for ``scope`` (the app turns ``Denied`` into its answer)."""

    async def dependency(request: Request) -> ApiKey:
        key = await authorize(request, scope)
        request.state.api_key = key
        return key

    return dependency


async def denied_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Denied)
    return exc.response()


# What the OpenAPI document says a guarded route may answer besides 200.
DENIALS: dict[int | str, dict[str, str]] = {
    401: {"description": "no API key, or an unknown or revoked one"},
    403: {"description": "the key lacks the scope this route needs"},
    503: {"description": "Redis or the engine is unavailable right now (Retry-After)"},
}
