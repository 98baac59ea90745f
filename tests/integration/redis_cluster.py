"""A 6-node Redis Cluster on loopback for tests: 3 masters + 3 replicas, redis-server in cluster mode
(``appendonly yes``, ``appendfsync always``, ``cluster-node-timeout`` short so a failover takes about a
second), each node in its own folder of a temp dir; :meth:`kill` and :meth:`restart` a node."""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import redis
from redis.cluster import RedisCluster

from livecopy.devstack import redis_binary


@dataclass
class Node:
    port: int
    folder: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2)


@dataclass
class LocalCluster:
    node_timeout_ms: int = 1000
    nodes: list[Node] = field(default_factory=list)
    root: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.nodes[0].addr}/0"

    def start(self) -> LocalCluster:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> LocalCluster:
        self.root = Path(tempfile.mkdtemp(prefix="lc-cluster-"))
        for i in range(6):
            folder = self.root / f"n{i}"
            folder.mkdir()
            self.nodes.append(Node(_free_cluster_port({x.port for x in self.nodes}), folder))
        for n in self.nodes:
            self._launch(n)
        for n in self.nodes:
            _wait(partial(_pings, n), 10, f"redis node {n.port} ({_tail(n)})")
        cli = shutil.which("redis-cli") or shutil.which("valkey-cli")
        assert cli, "redis-cli is needed to create the cluster"
        subprocess.run([cli, "--cluster", "create", *(n.addr for n in self.nodes), "--cluster-replicas", "1",
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        _wait(self.healthy, 30, "cluster_state:ok on every node with 3 masters and 3 replicas")
        return self

    def _launch(self, n: Node) -> None:
        log = open(n.folder / "redis.log", "ab")  # noqa: SIM115 - handed to the child
        n.proc = subprocess.Popen(
            [redis_binary(), "--bind", "127.0.0.1", "--port", str(n.port), "--dir", str(n.folder),
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(self.node_timeout_ms), "--appendonly", "yes", "--appendfsync", "always",
             # a replica restarted after its master died may still take over (the tests' failover scenarios)
             "--cluster-replica-validity-factor", "0",
             "--save", "", "--protected-mode", "no", "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT, cwd=n.folder)
        log.close()

    def roles(self) -> dict[int, str]:
        """port -> master | slave | down."""
        out: dict[int, str] = {}
        for n in self.nodes:
            try:
                out[n.port] = str(n.client().info("replication")["role"])
            except redis.RedisError:
                out[n.port] = "down"
        return out

    def healthy(self) -> bool:
        try:
            for n in self.nodes:
                if n.client().cluster("info")["cluster_state"] != "ok":
                    return False
        except (redis.RedisError, KeyError):
            return False
        roles = list(self.roles().values())
        return roles.count("master") == 3 and roles.count("slave") == 3 and self.replicas_in_sync()

    def replicas_in_sync(self) -> bool:
        """Every live replica's link to its master is up (its initial sync done)."""
        try:
            for n in self.nodes:
                if n.proc is None:
                    continue
                info = n.client().info("replication")
                if info["role"] == "slave" and info.get("master_link_status") != "up":
                    return False
                if info["role"] == "master" and int(info.get("connected_slaves", 0)) < 1:
                    return False
        except redis.RedisError:
            return False
        return True

    def client(self) -> RedisCluster:
        return RedisCluster.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)

    def master_of(self, key: str) -> Node:
        """The node serving ``key``'s slot now (asked of a live node)."""
        slot = self.client().keyslot(key)
        for n in self.nodes:
            if n.proc is None or n.proc.poll() is not None:
                continue
            for start, end, master in _slots(n):
                if start <= slot <= end:
                    return next(x for x in self.nodes if x.port == master)
        raise AssertionError(f"no node serves slot {slot}")

    def kill(self, n: Node) -> None:
        assert n.proc is not None
        n.proc.send_signal(signal.SIGKILL)
        n.proc.wait(10)
        n.proc = None

    def restart(self, n: Node) -> None:
        self._launch(n)
        _wait(lambda: _pings(n), 10, f"redis node {n.port} back")

    def stop(self) -> None:
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is None:
                n.proc.terminate()
                try:
                    n.proc.wait(10)
                except subprocess.TimeoutExpired:
                    n.proc.kill()
                    n.proc.wait(5)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _slots(n: Node) -> list[tuple[int, int, int]]:
    """(first slot, last slot, master port) as ``n`` sees them."""
    raw = n.client().execute_command("CLUSTER SLOTS")
    return [(int(r[0]), int(r[1]), int(r[2][1])) for r in raw]


def _free_cluster_port(taken: set[int]) -> int:
    """A port p with p and its cluster bus port p + 10000 free (Redis wants p <= 55535)."""
    for _ in range(200):
        p = random.randint(20000, 45000)
        if p in taken:
            continue
        try:
            for q in (p, p + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", q))
        except OSError:
            continue
        return p
    raise AssertionError("no free port pair for a Redis Cluster node")


def _tail(n: Node) -> str:
    exit_code = n.proc.poll() if n.proc is not None else "not started"
    log = (n.folder / "redis.log").read_text(errors="replace").strip().splitlines()[-3:]
    return f"exit {exit_code}: " + " | ".join(log)


def _pings(n: Node) -> bool:
    try:
        return bool(n.client().ping())
    except redis.RedisError:
        return False


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
