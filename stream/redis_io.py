"""Redis for every livecopy process: the one client factory (sync and asyncio; a RedisCluster client with
``redis.cluster``), livecopy's Lua scripts run as pipelined EVALSHA calls (one pipeline per Redis node,
with ``WAIT`` after it when ``redis.wait_replicas`` asks), and the errors that mean "retry later".

Every Redis-side merge (profile.lua, feedback.lua, responses.lua) is idempotent, so a batch can
be redone: when Redis lost its script cache (restart, SCRIPT FLUSH) the script is loaded again
and the whole pipeline re-run; a Redis that cannot take the batch right now (unreachable, out
of memory, read-only after a failover, busy with a script...) surfaces as
:class:`TransientStoreError` (the worker's batch loop then pauses, backs off and rewinds): it is
never the record's fault, so nothing goes to the DLQ for it.
"""

from __future__ import annotations

import hashlib
import logging
import re
import weakref
from collections.abc import Callable, Hashable, Sequence
from importlib import resources
from typing import Any, TypeVar, cast

import redis
import redis.asyncio as aredis
from redis import exceptions as rex
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError

from core.settings import RedisSettings

# Redis refusing or failing a command for a reason of its own, which goes away by waiting: retry the
# batch later with backoff, never reject the record.
TRANSIENT_REDIS_ERRORS: tuple[type[BaseException], ...] = (
    rex.ConnectionError,  # unreachable; also LOADING (BusyLoadingError), max clients, auth, pool exhausted
    rex.TimeoutError,
    rex.BusyLoadingError,  # LOADING: loading its dataset after a restart
    rex.OutOfMemoryError,  # OOM: maxmemory reached under noeviction (or nothing evictable): writes refused
    rex.ReadOnlyError,  # READONLY: talking to a replica (a failover in progress, DNS not switched yet)
    rex.MasterDownError,  # MASTERDOWN: a replica that lost its master (replica-serve-stale-data no)
    rex.TryAgainError,  # TRYAGAIN: multi-key command on a slot being migrated
    rex.ClusterDownError,  # CLUSTERDOWN: the cluster has unserved slots
    rex.AskError,  # ASK and MOVED (a subclass): a slot moved or moving; the topology is refreshed
    rex.ClusterError,  # RedisCluster gave up following redirections for now ("TTL exhausted")
    rex.SlotNotCoveredError,  # RedisCluster: no node serves the slot (yet)
    OSError,
)

# The same, for refusals redis-py has no class for (a plain ResponseError), by error code: BUSY (a
# script or function running past lua-time-limit), NOREPLICAS (min-replicas-to-write not met),
# MISCONF (writes stopped after a failed RDB save). As the reply starts, or as Redis 6 quotes a
# refusal met by redis.call inside a script ("... @user_script:24: -OOM command not allowed ...").
_TRANSIENT_CODES = re.compile(r"(?:^|: -)(?:BUSY|NOREPLICAS|MISCONF|OOM|LOADING|READONLY|MASTERDOWN|TRYAGAIN|"
                              r"CLUSTERDOWN|MOVED|ASK) ")


def is_transient_redis_error(exc: BaseException) -> bool:
    """Whether ``exc`` (raised, or handed back by a pipeline) means "retry later", not "bad input"."""
    if isinstance(exc, TRANSIENT_REDIS_ERRORS):
        return True
    return isinstance(exc, rex.ResponseError) and _TRANSIENT_CODES.search(str(exc)) is not None


# The WAIT policy (replicas, timeout ms) of each client the factory built, for LuaScript.
_WAIT: weakref.WeakKeyDictionary[Any, tuple[int, int]] = weakref.WeakKeyDictionary()


def redis_client(r: RedisSettings, *, timeout_s: float | None = None) -> redis.Redis:
    """The Redis client of every livecopy process (workers, CLI, devstack probes): bounded connect and socket
    timeouts (``redis.socket_timeout_s``, or ``timeout_s``), so an outage is noticed. With ``redis.cluster`` a
    ``RedisCluster`` (``url`` names one node; it answers every command livecopy sends, so it is typed as Redis)."""
    t = r.socket_timeout_s if timeout_s is None else timeout_s
    client: Any
    if r.cluster:
        client = RedisCluster.from_url(r.url, socket_timeout=t, socket_connect_timeout=t)
    else:
        client = redis.Redis.from_url(r.url, socket_timeout=t, socket_connect_timeout=t)
    if r.wait_replicas:
        _WAIT[client] = (r.wait_replicas, r.wait_timeout_ms)
    return cast(redis.Redis, client)


def async_redis_client(r: RedisSettings, *, max_connections: int | None = None,
                       pool_wait_s: float | None = None) -> aredis.Redis:
    """The asyncio twin (the HTTP API): the same timeouts. With ``max_connections`` the pool is bounded and
    *blocking*: a caller that finds every connection in use waits for one (up to ``pool_wait_s``), then
    gets ``PoolExhausted``, instead of redis-py's immediate "Too many connections". On a cluster the bound is
    per node and not blocking (redis-py's asyncio RedisCluster has no blocking pool)."""
    if r.cluster:
        extra = {} if max_connections is None else {"max_connections": max_connections}
        return cast(aredis.Redis, AsyncRedisCluster.from_url(r.url, socket_timeout=r.socket_timeout_s,
                                                             socket_connect_timeout=r.socket_timeout_s, **extra))
    if max_connections is None:
        return aredis.Redis.from_url(r.url, socket_timeout=r.socket_timeout_s,
                                     socket_connect_timeout=r.socket_timeout_s)
    wait = r.socket_timeout_s if pool_wait_s is None else pool_wait_s
    pool = aredis.BlockingConnectionPool.from_url(r.url, max_connections=max_connections, timeout=wait,
                                                  socket_timeout=r.socket_timeout_s,
                                                  socket_connect_timeout=r.socket_timeout_s)
    return aredis.Redis(connection_pool=pool)


def is_cluster(client: object) -> bool:
    return isinstance(client, (RedisCluster, AsyncRedisCluster))


def node_clients(client: redis.Redis, *, primaries_only: bool = False) -> list[tuple[str, redis.Redis]]:
    """(name, client) of each Redis server behind ``client``: itself, or each node of a cluster."""
    if isinstance(client, RedisCluster):
        nodes = client.get_primaries() if primaries_only else client.get_nodes()
        return [(n.name, client.get_redis_connection(n)) for n in nodes]
    return [("redis", client)]


def refresh_topology(client: object) -> None:
    """After a cluster error (a node gone, a slot moved): ask the cluster again who serves which slot.
    Best effort: while no node answers, the next try fails again and the batch is retried later."""
    if isinstance(client, RedisCluster):
        try:
            client.nodes_manager.initialize()
        except Exception:  # nothing reachable now: the caller backs off and retries
            pass


def pool_exhausted(exc: BaseException) -> bool:
    """The API's own Redis pool had no free connection in time: backpressure, not a Redis outage."""
    return isinstance(exc, rex.MaxConnectionsError) or (
        isinstance(exc, rex.ConnectionError) and "No connection available" in str(exc))


class NotDurable(RuntimeError):
    """Redis may lose writes it acknowledged (``redis.durability=require``)."""


def durability_problem(client: redis.Redis, r: RedisSettings | None = None) -> str | None:
    """Why an acknowledged write could be lost in a Redis crash, or None when Redis fsyncs every write
    before answering (``appendonly yes`` + ``appendfsync always``); on a cluster, every node is asked, and a
    failover loses the writes not yet on a replica unless ``redis.wait_replicas`` (given ``r``) is set.
    A Redis that hides CONFIG says so."""
    for name, node in node_clients(client):
        where = f" (node {name})" if is_cluster(client) else ""
        try:
            cfg = {**node.config_get("appendonly"), **node.config_get("appendfsync")}
        except rex.RedisError as exc:
            return (f"cannot read Redis's persistence settings{where} ({exc}); make sure appendonly=yes, "
                    "appendfsync=always")
        if str(cfg.get("appendonly")) != "yes":
            return f"appendonly is off{where}: a Redis restart loses every effect the workers committed"
        if str(cfg.get("appendfsync")) != "always":
            return (f"appendfsync is {cfg.get('appendfsync')}{where}: a Redis crash can lose the last second of "
                    "effects whose offsets the workers already committed (set appendfsync always)")
    if r is not None and r.cluster and r.wait_replicas == 0:
        return ("redis.wait_replicas is 0 on a Redis Cluster: a master failover can lose the writes its replica "
                "had not received yet, whose offsets the workers already committed (set wait_replicas 1)")
    return None


def check_durability(client: redis.Redis, r: RedisSettings, log: logging.Logger) -> None:
    """At a worker's start: warn (or refuse, ``redis.durability=require``) when Redis may lose acknowledged writes."""
    if r.durability == "off":
        return
    problem = durability_problem(client, r)
    if problem is None:
        return
    if r.durability == "require":
        raise NotDurable(problem)
    log.warning("Redis durability: %s", problem)


class TransientStoreError(Exception):
    """The store cannot be reached right now; retry the batch later (nothing was lost)."""


T = TypeVar("T")
G = TypeVar("G", bound=Hashable)


class LuaScript:
    """One of ``stream/*.lua``, run as pipelined EVALSHA calls: one pipeline per Redis node (on a cluster,
    the node serving the slot of each call's keys; every call's keys are in one slot), then ``WAIT`` on the
    same connection when the client's settings ask for replicas (``redis.wait_replicas``)."""

    def __init__(self, client: redis.Redis, filename: str) -> None:
        self.client = client
        self.filename = filename
        self.source = resources.files("stream").joinpath(*filename.split("/")).read_text()
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()  # Redis names scripts by their SHA-1
        self.wait = _WAIT.get(client, (0, 0))

    def _by_node(self, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]) -> list[tuple[redis.Redis, list[int]]]:
        if not isinstance(self.client, RedisCluster):
            return [(self.client, list(range(len(calls))))]
        groups: dict[str, tuple[redis.Redis, list[int]]] = {}
        for i, (keys, _args) in enumerate(calls):
            node = self.client.get_node_from_key(keys[0])
            groups.setdefault(node.name, (self.client.get_redis_connection(node), []))[1].append(i)
        return list(groups.values())

    def _run_on(self, node: redis.Redis, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
        replicas, timeout_ms = self.wait
        for _attempt in range(2):
            pipe = node.pipeline(transaction=False)
            for keys, args in calls:
                pipe.evalsha(self.sha, len(keys), *keys, *args)
            if replicas:
                pipe.wait(replicas, timeout_ms)
            results = pipe.execute(raise_on_error=False)
            if any(isinstance(r, NoScriptError) for r in results):
                # Redis restarted, flushed its scripts, or is a promoted replica: load it there and redo
                # these calls (those that did apply are duplicates now and take no second effect).
                node.script_load(self.source)
                continue
            break
        else:  # pragma: no cover - the script vanished twice in a row
            raise TransientStoreError(f"{self.filename} keeps disappearing from Redis")
        if replicas:
            acked = results.pop()
            for r in results:  # a slot moved, a node demoted...: that, rather than what WAIT says of it
                if isinstance(r, BaseException) and is_transient_redis_error(r):
                    raise r
            if isinstance(acked, BaseException):
                if "WAIT cannot be used with replica" in str(acked):  # the node was demoted since the last lookup
                    raise TransientStoreError(f"redis unavailable: {acked}") from acked
                raise acked
            if int(acked) < replicas:
                raise TransientStoreError(f"only {acked} of {replicas} Redis replicas acknowledged the batch "
                                          f"within {timeout_ms} ms")
        return results

    def run(self, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
        """Results of ``EVALSHA sha len(keys) *keys *args`` per call, in order."""
        if not calls:
            return []
        results: list[Any] = [None] * len(calls)
        try:
            for node, idxs in self._by_node(calls):
                for i, r in zip(idxs, self._run_on(node, [calls[i] for i in idxs]), strict=True):
                    results[i] = r
        except TransientStoreError:
            refresh_topology(self.client)
            raise
        except Exception as exc:
            if is_transient_redis_error(exc):
                refresh_topology(self.client)
                raise TransientStoreError(f"redis unavailable: {type(exc).__name__}: {exc}") from exc
            raise
        for r in results:
            if isinstance(r, BaseException) and is_transient_redis_error(r):
                refresh_topology(self.client)
                raise TransientStoreError(f"redis unavailable: {type(r).__name__}: {r}") from r
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results

    def run_grouped(self, items: Sequence[T], group_of: Callable[[T], G],
                    call_of: Callable[[G, list[T]], tuple[Sequence[str], Sequence[Any]]]) -> list[bool]:
        """One call per group of ``items`` (a user, a shard: one Cluster slot), the groups'
        items in order; the script answers one flag per item, handed back in the items' order."""
        groups: dict[G, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(group_of(it), []).append(i)
        results = self.run([call_of(g, [items[i] for i in idxs]) for g, idxs in groups.items()])
        out = [False] * len(items)
        for idxs, res in zip(groups.values(), results, strict=True):
            for i, flag in zip(idxs, res, strict=True):
                out[i] = bool(flag)
        return out
