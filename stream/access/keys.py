"""API keys in Redis, stored hashed: a key is shown once when created; Redis keeps only its SHA-256,
its id, name, scopes and whether it was revoked (one hash, ``<prefix>apikeys``)."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
import redis
import redis.asyncio as aredis

SCOPES = ("copy", "profile:read", "admin", "debug", "events")  # events: POST /v1/events for any shopper
KEY_PREFIX = "lck_"


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    name: str
    scopes: tuple[str, ...]
    created_ms: int
    revoked_ms: int | None = None

    @property
    def active(self) -> bool:
        return self.revoked_ms is None

    def allows(self, scope: str) -> bool:
        return self.active and (scope in self.scopes or "admin" in self.scopes)

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> ApiKey:
        d: dict[str, Any] = orjson.loads(raw)
        return cls(d["key_id"], d["name"], tuple(d["scopes"]), int(d["created_ms"]), d.get("revoked_ms"))


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> tuple[str, str]:
    """(key id, the full key shown once): ``lck_<id>_<secret>``, 8 + 43 URL-safe characters of randomness."""
    key_id = secrets.token_hex(4)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def check_scopes(scopes: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise ValueError(f"scopes must be among {', '.join(SCOPES)} (got {', '.join(scopes) or 'none'})")
    return tuple(dict.fromkeys(scopes))


@dataclass
class KeyStore:
    """Create, list and revoke keys (the CLI); look one up by the secret a request carries (the API)."""

    client: redis.Redis
    prefix: str = "lc:"
    clock: Any = field(default=time.time)

    @property
    def hash_key(self) -> str:
        return f"{self.prefix}apikeys"

    def create(self, name: str, scopes: list[str] | tuple[str, ...]) -> tuple[ApiKey, str]:
        key_id, secret = new_secret()
        key = ApiKey(key_id, name, check_scopes(scopes), int(self.clock() * 1000))
        self.client.hset(self.hash_key, digest(secret), key.to_json())
        return key, secret

    def list(self) -> list[ApiKey]:
        raw = self.client.hgetall(self.hash_key)
        return sorted((ApiKey.from_json(v) for v in raw.values()), key=lambda k: (k.created_ms, k.key_id))

    def revoke(self, key_id: str) -> bool:
        for h, v in self.client.hgetall(self.hash_key).items():
            k = ApiKey.from_json(v)
            if k.key_id == key_id and k.active:
                revoked = ApiKey(k.key_id, k.name, k.scopes, k.created_ms, int(self.clock() * 1000))
                self.client.hset(self.hash_key, h, revoked.to_json())
                return True
        return False


async def lookup(client: aredis.Redis, prefix: str, secret: str) -> ApiKey | None:
    """The key ``secret`` names (revoked ones too: the caller checks), or None."""
    if not secret.startswith(KEY_PREFIX) or len(secret) > 128:
        return None
    raw = await client.hget(f"{prefix}apikeys", digest(secret))
    return ApiKey.from_json(raw) if raw is not None else None


CACHE_S = 5.0  # a revoked key stops working within this long
CACHE_MAX = 10_000


@dataclass
class KeyCache:
    """Recently seen keys (hits and misses), so a request costs no Redis round trip for its key."""

    entries: dict[str, tuple[float, ApiKey | None]]

    def get(self, secret: str, now: float) -> tuple[bool, ApiKey | None]:
        hit = self.entries.get(secret)
        if hit is None or hit[0] < now:
            return False, None
        return True, hit[1]

    def put(self, secret: str, key: ApiKey | None, now: float) -> None:
        if len(self.entries) >= CACHE_MAX:
            self.entries.clear()
        self.entries[secret] = (now + CACHE_S, key)
