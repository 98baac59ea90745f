"""Forgetting a shopper: every Redis key that carries the shopper's hash tag goes (profile, dedupe
marks, style responses, cached copies), and a tombstone stays for the dedupe window so that events
dated before the forget, re-delivered or replayed, do not bring the profile back (the profile script
skips them). What Redis cannot forget: the events in Kafka until their retention, and the feedback
joiner's open state (keyed by impression, not by shopper) until it closes or expires
(``feedback.state_ttl_s``). See docs/durability.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
from redis.cluster import RedisCluster

from core.settings import Settings
from stream.profile.store import ProfileKeys


@dataclass(frozen=True)
class Forgotten:
    user_id: str
    deleted: int  # keys removed
    tombstone: str
    at_ms: int


def shopper_keys(client: redis.Redis, prefix: str, user_id: str) -> list[str]:
    """Every key of the shopper (one hash slot: the user id is the hash tag)."""
    pattern = f"{prefix}{{{user_id}}}:*"  # user ids are [A-Za-z0-9_.:@-]: no glob characters
    # on a cluster, only the node serving the shopper's slot (RedisCluster would scan every master)
    where: dict[str, Any] = {}
    if isinstance(client, RedisCluster):
        where["target_nodes"] = client.get_node_from_key(pattern)
    return sorted(k.decode() if isinstance(k, bytes) else k
                  for k in client.scan_iter(match=pattern, count=1000, **where))


def forget(client: redis.Redis, settings: Settings, user_id: str, now_ms: int) -> Forgotten:
    keys = ProfileKeys(settings.redis.key_prefix)
    tomb = keys.tombstone(user_id)
    # the tombstone first: a batch applied meanwhile already skips the shopper's older events
    client.set(tomb, now_ms, px=max(1, settings.profile.dedupe_window_s * 1000))
    doomed = [k for k in shopper_keys(client, settings.redis.key_prefix, user_id) if k != tomb]
    deleted = 0
    for i in range(0, len(doomed), 500):
        deleted += int(client.delete(*doomed[i:i + 500]))
    return Forgotten(user_id, deleted, tomb, now_ms)
