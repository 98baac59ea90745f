"""Making one copy: the one flow behind ``GET /v1/copy`` and the generator worker.

Both ask the same questions in the same order and differ only in how they reach Redis (asyncio in the
API, threads in the worker): the cache key of (shopper, product, slot, profile version, model
version), the engine request built from the rendered profile and the shopper's style response, and
the copy made from the engine's result (its record, its bytes, and the key of the version that made
it: a hot swap may happen while a request waits), and a cached copy refilled from the product as it
is now (``refill``: the cache keeps the slotted copy, so a price or title change shows at once).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import orjson

from core.catalog import Product
from core.contracts import GeneratedCopy, Profile
from core.settings import Settings
from core.styles import StyleResponse
from engine.executor import CopyRequest, CopyResult, StudentExecutor
from models.text.context import context_from_profile, product_context
from models.text.filter import check_copy, fallback_copy, max_chars
from stream.copy_store import CopyKeys, encode_copy
from stream.profile.logic import ProfileState, render


@dataclass(frozen=True)
class MadeCopy:
    copy: GeneratedCopy
    body: bytes  # the contract JSON: the livecopy.copy value, the cached value and the HTTP body
    key: str  # the cache key, for the model version that made it


class CopyFlow:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = CopyKeys(settings.redis.key_prefix, settings.generation.catalog_key)

    @property
    def uses_style_response(self) -> bool:
        """Whether a request reads the shopper's style response (``generation.style_response_strength`` > 0)."""
        return self.settings.generation.style_response_strength > 0

    @staticmethod
    def profile_version(state: ProfileState | None) -> int:
        return state.version if state is not None else 0  # 0: cold start, non-personalized copy

    def profile(self, user_id: str, state: ProfileState | None) -> Profile | None:
        return render(user_id, state, self.settings.profile) if state is not None else None

    def key(self, user_id: str, product_id: str, slot: str | None, state: ProfileState | None,
            model_version: str) -> str:
        return self.keys.copy(user_id, product_id, slot, self.profile_version(state), model_version)

    def request(self, user_id: str, product: Product, state: ProfileState | None, profile: Profile | None,
                slot: str | None, response: StyleResponse | None,
                lookup: Callable[[str], Product | None]) -> CopyRequest:
        """The engine request: the product in the shopper's context (``lookup`` resolves the recent products)."""
        return CopyRequest(user_id, context_from_profile(product, profile, slot, lookup=lookup),
                           self.profile_version(state), style_response=response)

    def made(self, request: CopyRequest, result: CopyResult, slot: str | None) -> MadeCopy:
        """The copy of ``result``, keyed by the version that made it (a swap may happen while it waits)."""
        copy = result.to_copy()
        key = self.keys.copy(request.user_id, request.product_id, slot, request.profile_version, result.model_version)
        return MadeCopy(copy, encode_copy(copy), key)

    @staticmethod
    def refill(cached: bytes, product: Product) -> bytes | None:
        """A cached copy with its facts filled from ``product`` as it is now; None when the copy no
        longer fits the record (a slot it names is gone, e.g. the discount ended, or it is now too
        long): the caller generates a new one."""
        doc = orjson.loads(cached)
        ctx = product_context(product, doc.get("slot"))
        template = doc.get("template")
        if template:
            text, res = StudentExecutor.render(template, ctx)
            if not res.ok:
                return None
        elif doc.get("policy") == "fallback":
            text = fallback_copy(ctx)
        else:  # an unslotted model's copy has its facts baked in: kept only while they still hold
            return cached if check_copy(doc.get("text") or "", ctx, limit=max_chars(ctx.slot)).ok else None
        if text == doc.get("text"):
            return cached
        doc["text"] = text
        return orjson.dumps(doc)
