"""Real Apache Kafka (KRaft, broker+controller per node) without Docker, from Maven Central jars.

Owns: fetching and caching the jars (Maven + livecopy/kafka_pom.xml), writing a node's
server.properties, formatting its storage once, and starting/stopping the JVM
(``KafkaKraft`` for one node, ``KafkaCluster`` for several). Stdlib only.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

__all__ = [
    "DEFAULT_JVM_OPTS",
    "KAFKA_VERSION",
    "THROUGHPUT_JVM_OPTS",
    "KafkaCluster",
    "KafkaKraft",
    "KafkaUnavailable",
    "default_cache_dir",
    "fetch_jars",
    "find_pom",
    "java_available",
    "kafka_available",
    "version",
]

# Keep in step with <kafka.version> in livecopy/kafka_pom.xml (fetch_jars passes it to Maven anyway).
KAFKA_VERSION = "4.4.0"
MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL_CLASS = "kafka.tools.StorageTool"
_MARKER = ".complete"
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
_STARTED_RE = re.compile(r"Kafka Server started|started \(kafka\.server\.KafkaRaftServer\)")

# Small heap, one GC thread, C1 only: starts in about half the time of full tiered JIT
# and burns less CPU on a 2-core box. THROUGHPUT_JVM_OPTS for broker-bound benchmarks.
DEFAULT_JVM_OPTS: tuple[str, ...] = (
    "-Xms64m",
    "-Xmx512m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)
THROUGHPUT_JVM_OPTS: tuple[str, ...] = (
    "-Xms256m",
    "-Xmx1g",
    "-XX:+UseG1GC",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)
_TOOL_JVM_OPTS: tuple[str, ...] = ("-Xmx128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1")


class KafkaUnavailable(RuntimeError):
    """Kafka cannot be fetched, formatted or started here (the message says why)."""


def version() -> str:
    """The pinned Apache Kafka version."""
    return KAFKA_VERSION


def default_cache_dir() -> Path:
    """``.livecopy/kafka-cache`` under the current directory (``dev.kafka_cache_dir`` in the settings)."""
    return Path.cwd() / ".livecopy" / "kafka-cache"


def find_pom() -> Path | None:
    """The pom that lists the broker's jars, shipped beside this module."""
    pom = Path(__file__).with_name("kafka_pom.xml")
    return pom if pom.is_file() else None


# ---------------------------------------------------------------- java / jars


def _java_cmd() -> str | None:
    home = os.environ.get("JAVA_HOME")
    if home and os.access(Path(home) / "bin" / "java", os.X_OK):
        return str(Path(home) / "bin" / "java")
    return shutil.which("java")


@lru_cache(maxsize=4)
def _java_major(java: str) -> int | None:
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


def java_available() -> bool:
    """A Java 17+ runtime (what a Kafka 4.x broker needs) is on PATH or in $JAVA_HOME."""
    java = _java_cmd()
    major = _java_major(java) if java else None
    return major is not None and major >= 17


def _libs_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / f"kafka-{KAFKA_VERSION}" / "libs"


def _jars_cached(cache_dir: Path) -> bool:
    return (_libs_dir(cache_dir) / _MARKER).is_file()


def kafka_available(cache_dir: Path | None = None, *, mvn: str = "mvn") -> bool:
    """Java 17+ is here, and the jars are cached in ``cache_dir`` or Maven can fetch them."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not java_available():
        return False
    return _jars_cached(cache) or (shutil.which(mvn) is not None and find_pom() is not None)


def fetch_jars(cache_dir: Path, *, mvn: str = "mvn", pom: Path | None = None, timeout_s: float = 900) -> Path:
    """The lib dir ``cache_dir/kafka-<version>/libs``, filled by Maven on the first call.

    Later calls (any process) find the marker file and return at once; concurrent first
    calls serialize on a lock file. Raises ``KafkaUnavailable`` with Maven's last lines on failure.
    """
    libs = _libs_dir(Path(cache_dir).resolve())  # Maven resolves relative paths against the pom's dir
    if (libs / _MARKER).is_file():
        return libs
    libs.parent.mkdir(parents=True, exist_ok=True)
    with open(libs.parent / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (libs / _MARKER).is_file():
            return libs
        pom = pom or find_pom()
        if pom is None:
            raise KafkaUnavailable("livecopy/kafka_pom.xml not found (it ships beside this module)")
        if shutil.which(mvn) is None and not Path(mvn).is_file():
            raise KafkaUnavailable(f"Maven ({mvn!r}) not found: needed once to fetch the Kafka {KAFKA_VERSION} jars")
        tmp = libs.parent / f"libs.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [
            mvn,
            "-B",
            "-q",
            "-Dstyle.color=never",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={tmp}",
            f"-Dkafka.version={KAFKA_VERSION}",
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise KafkaUnavailable(f"Maven timed out after {timeout_s:.0f}s fetching Kafka jars") from e
        jars = sorted(p.name for p in tmp.glob("*.jar")) if tmp.is_dir() else []
        if proc.returncode != 0 or not any(j.startswith(f"kafka_2.13-{KAFKA_VERSION}") for j in jars):
            shutil.rmtree(tmp, ignore_errors=True)
            out = _ANSI_RE.sub("", proc.stdout + proc.stderr).strip()
            tail = "\n".join(out.splitlines()[-25:]) or "(no output)"
            raise KafkaUnavailable(
                f"Maven could not fetch Kafka {KAFKA_VERSION} jars (exit {proc.returncode}): {' '.join(cmd)}\n{tail}"
            )
        (tmp / _MARKER).write_text("\n".join(jars) + "\n")
        shutil.rmtree(libs, ignore_errors=True)
        tmp.rename(libs)
    return libs


# ---------------------------------------------------------------- helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def new_cluster_id() -> str:
    """A random Kafka cluster id (22 chars, url-safe base64 of a UUID, never starting with '-')."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def api_versions_ok(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when ``host:port`` answers a Kafka ApiVersions v0 request with no error."""
    client_id = b"livecopy-probe"
    body = struct.pack(">hhih", 18, 0, 7, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(struct.pack(">i", len(body)) + body)
            head = _recv_exact(s, 4)
            (size,) = struct.unpack(">i", head)
            resp = _recv_exact(s, min(size, 64 * 1024))
    except OSError:
        return False
    if len(resp) < 6:
        return False
    corr, err = struct.unpack(">ih", resp[:6])
    return corr == 7 and err == 0


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise OSError("connection closed")
        buf += chunk
    return buf


def _format_props(props: Mapping[str, object]) -> str:
    lines = ["# written by livecopy.kafka_kraft; rewritten on every start"]
    lines += [f"{k}={v}" for k, v in props.items()]
    return "\n".join(lines) + "\n"


_LOG4J2 = """\
status = warn
name = livecopy-kafka
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.filePattern = {log}.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 2
rootLogger.level = {level}
rootLogger.appenderRef.file.ref = FILE
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
"""

_live: set[KafkaKraft] = set()  # started here and not stopped yet: stopped at interpreter exit


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGKILL the child when this process dies (None elsewhere)."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL)

    return preexec


@atexit.register
def _stop_all_at_exit() -> None:
    for node in list(_live):
        with contextlib.suppress(Exception):
            node.stop(timeout=10)


# ---------------------------------------------------------------- one node


class KafkaKraft:
    """One Kafka node, broker+controller in one JVM, listening on ``host`` (127.0.0.1).

    ``data_dir`` holds server.properties, node.json (ports, cluster id), logs/ and the
    Kafka log dir data/, so a restart (or a new object on the same dir) keeps data and ports.
    Ports 0 mean: reuse those in node.json if still free, else pick free ones.
    ``voters`` maps node id -> controller port of every controller in the cluster
    (default: just this node). ``extra_props`` override any generated property.
    ``reap_stale``: SIGKILL any JVM still running this data dir's server.properties (left by a
    process that died; at construction and at start), else start() raises KafkaUnavailable.
    ``die_with_parent``: Linux kills the JVM if this process dies (only set it when start()
    runs on a thread that outlives the node, e.g. the main thread).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        cache_dir: Path | None = None,
        libs_dir: Path | None = None,
        node_id: int = 1,
        port: int = 0,
        controller_port: int = 0,
        host: str = "127.0.0.1",
        advertised_host: str | None = None,
        voters: Mapping[int, int] | None = None,
        cluster_id: str | None = None,
        replication_factor: int = 1,
        min_insync_replicas: int = 1,
        extra_props: Mapping[str, object] | None = None,
        jvm_opts: Sequence[str] = DEFAULT_JVM_OPTS,
        log_level: str = "INFO",
        mvn: str = "mvn",
        reap_stale: bool = False,
        die_with_parent: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._libs_dir = Path(libs_dir) if libs_dir is not None else None
        self.node_id = node_id
        self.host = host
        self.advertised_host = advertised_host or host
        self.replication_factor = replication_factor
        self.min_insync_replicas = min_insync_replicas
        self.extra_props = dict(extra_props or {})
        self.jvm_opts = list(jvm_opts)
        self.log_level = log_level
        self.mvn = mvn
        self.reap_stale = reap_stale
        self.die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._lock = threading.Lock()

        if reap_stale:
            self._reap_stale()  # before choosing ports, so those of node.json are free again
        saved = self._load_state()
        self.port = port or self._reuse(saved.get("port"))
        self.controller_port = controller_port or self._reuse(saved.get("controller_port"), avoid={self.port})
        self.cluster_id = cluster_id or saved.get("cluster_id") or new_cluster_id()
        self.voters: dict[int, int] = dict(voters) if voters else {node_id: self.controller_port}
        if self.voters.get(node_id) != self.controller_port:
            raise ValueError(
                f"voters {self.voters} must map node {node_id} to its controller_port {self.controller_port}"
            )

    # ---- paths and state

    @property
    def log_dir(self) -> Path:
        """Kafka's log.dirs (topic data and the KRaft metadata log)."""
        return self.data_dir / "data"

    @property
    def server_log(self) -> Path:
        return self.data_dir / "logs" / "server.log"

    @property
    def stdout_log(self) -> Path:
        return self.data_dir / "logs" / "stdout.log"

    @property
    def properties_file(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.advertised_host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def is_running(self) -> bool:
        return self.pid is not None

    def _state_file(self) -> Path:
        return self.data_dir / "node.json"

    def _load_state(self) -> dict:
        try:
            return json.loads(self._state_file().read_text())
        except (OSError, ValueError):
            return {}

    def _reuse(self, port: object, avoid: frozenset[int] | set[int] = frozenset()) -> int:
        if isinstance(port, int) and port not in avoid and _port_free(self.host, port):
            return port
        while True:
            p = free_port(self.host)
            if p not in avoid:
                return p

    def _save_state(self) -> None:
        state = {
            "node_id": self.node_id,
            "port": self.port,
            "controller_port": self.controller_port,
            "cluster_id": self.cluster_id,
            "kafka_version": KAFKA_VERSION,
        }
        self._state_file().write_text(json.dumps(state, indent=1) + "\n")

    # ---- config

    def properties(self) -> dict[str, object]:
        """The server.properties this node runs with."""
        voters = ",".join(f"{nid}@{self.host}:{cport}" for nid, cport in sorted(self.voters.items()))
        rf, isr = self.replication_factor, self.min_insync_replicas
        props: dict[str, object] = {
            "process.roles": "broker,controller",
            "node.id": self.node_id,
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.advertised_host}:{self.port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": self.log_dir,
            # test/dev friendly; the project creates its own topics
            "auto.create.topics.enable": "false",
            "num.partitions": 1,
            "default.replication.factor": rf,
            "min.insync.replicas": isr,
            "offsets.topic.replication.factor": rf,
            "offsets.topic.num.partitions": 10,
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": isr,
            "transaction.state.log.num.partitions": 10,
            "share.coordinator.state.topic.replication.factor": rf,
            "share.coordinator.state.topic.min.isr": isr,
            "group.initial.rebalance.delay.ms": 0,
            # a small box: few threads
            "num.network.threads": 2,
            "num.io.threads": 4,
            "background.threads": 4,
            "num.recovery.threads.per.data.dir": 1,
            "num.replica.fetchers": 1,
            # compaction that runs soon in tests (topics still need small segment.ms / ratios)
            "log.cleaner.enable": "true",
            "log.cleaner.threads": 1,
            "log.cleaner.backoff.ms": 500,
            "log.cleaner.dedupe.buffer.size": 16 * 1024 * 1024,
            "log.initial.task.delay.ms": 1000,
            "controlled.shutdown.enable": "true",
            # after a SIGKILL the restarted broker may only register once the old session expired
            "broker.session.timeout.ms": 3000,
            "broker.heartbeat.interval.ms": 750,
        }
        props.update(self.extra_props)
        return props

    def _write_config(self) -> None:
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.properties_file.write_text(_format_props(self.properties()))
        (self.data_dir / "log4j2.properties").write_text(_LOG4J2.format(log=self.server_log, level=self.log_level))
        self._save_state()

    def is_formatted(self) -> bool:
        return (self.log_dir / "meta.properties").is_file()

    # ---- lifecycle

    def _classpath(self) -> str:
        libs = self._libs_dir or fetch_jars(self.cache_dir, mvn=self.mvn)
        return f"{libs}/*"

    def _java(self) -> str:
        java = _java_cmd()
        if java is None or not java_available():
            raise KafkaUnavailable("Java 17+ not found (PATH or JAVA_HOME): the Kafka 4.x broker needs it")
        return java

    def format_storage(self) -> bool:
        """Format the log dir with ``kafka.tools.StorageTool`` unless done already. True if it formatted."""
        if self.is_formatted():
            return False
        self._write_config()
        cmd = [
            self._java(),
            *_TOOL_JVM_OPTS,
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            "-cp",
            self._classpath(),
            STORAGE_TOOL_CLASS,
            "format",
            "--config",
            str(self.properties_file),
            "--cluster-id",
            self.cluster_id,
            "--ignore-formatted",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
        if proc.returncode != 0 or not self.is_formatted():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
            raise KafkaUnavailable(f"formatting {self.log_dir} failed (exit {proc.returncode}):\n{tail}")
        return True

    def start(self, *, wait: bool = True, timeout: float = 90.0) -> KafkaKraft:
        """Format if needed, start the JVM, and (by default) wait until the broker answers.

        If it does not get ready within ``timeout`` s the JVM is killed and KafkaUnavailable raised
        (with the log's tail).
        """
        with self._lock:
            if self.is_running():
                return self
            self._reap_stale()
            if not self._port_usable():
                raise KafkaUnavailable(f"port {self.port} or {self.controller_port} on {self.host} is taken")
            self._write_config()
            self.format_storage()
            cmd = [
                self._java(),
                *self.jvm_opts,
                f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
                f"-Dkafka.logs.dir={self.data_dir / 'logs'}",
                "-cp",
                self._classpath(),
                MAIN_CLASS,
                str(self.properties_file),
            ]
            self._log_offset = self.server_log.stat().st_size if self.server_log.exists() else 0
            with open(self.stdout_log, "wb") as out:
                self._proc = subprocess.Popen(
                    cmd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=self.data_dir,
                    start_new_session=True,
                    preexec_fn=_pdeathsig_preexec() if self.die_with_parent else None,
                )
            (self.data_dir / "kafka.pid").write_text(f"{self._proc.pid}\n")
            _live.add(self)
        if wait:
            try:
                self.wait_ready(timeout)
            except BaseException:
                self.kill()
                raise
        return self

    def _port_usable(self) -> bool:
        return _port_free(self.host, self.port) and _port_free(self.host, self.controller_port)

    def _reap_stale(self) -> None:
        """A JVM left running on this data dir by a dead earlier process: kill it (or refuse)."""
        pid_file = self.data_dir / "kafka.pid"
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return
        if str(self.properties_file).encode() not in cmdline:
            return
        if not self.reap_stale:
            raise KafkaUnavailable(f"a Kafka JVM (pid {pid}) already runs on {self.data_dir}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _log_says_started(self) -> bool:
        """Scan server.log from where this start began (incrementally) for the started line."""
        try:
            with open(self.server_log, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                if self._log_offset > size:  # rolled over
                    self._log_offset = 0
                f.seek(self._log_offset)
                chunk = f.read()
        except OSError:
            return False
        cut = chunk.rfind(b"\n") + 1  # only whole lines; the rest is read again next time
        self._log_offset += cut
        return bool(_STARTED_RE.search(chunk[:cut].decode("utf-8", "replace")))

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the JVM's stdout and of server.log (for error messages)."""
        parts = []
        for p in (self.stdout_log, self.server_log):
            with contextlib.suppress(OSError):
                txt = p.read_text(errors="replace").strip().splitlines()[-lines:]
                if txt:
                    parts.append(f"--- {p}\n" + "\n".join(txt))
        return "\n".join(parts)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Wait until server.log says the server started and the broker port answers ApiVersions."""
        deadline = time.monotonic() + timeout
        started = False
        while True:
            proc = self._proc
            if proc is None:
                raise KafkaUnavailable("node not started")
            if proc.poll() is not None:
                raise KafkaUnavailable(f"Kafka node {self.node_id} exited with {proc.returncode}:\n{self.log_tail()}")
            started = started or self._log_says_started()
            if started and api_versions_ok(self.host, self.port, timeout=1.0):
                return
            if time.monotonic() > deadline:
                raise KafkaUnavailable(
                    f"Kafka node {self.node_id} not ready after {timeout:.0f}s (log says started: {started}):\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (controlled shutdown), wait ``timeout`` s, then SIGKILL."""
        self._signal_and_wait(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL the JVM at once (fault tests); the data dir stays."""
        self._signal_and_wait(signal.SIGKILL, 10.0)

    def _signal_and_wait(self, sig: signal.Signals, timeout: float) -> None:
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
            self._proc = None
            _live.discard(self)
            with contextlib.suppress(OSError):
                (self.data_dir / "kafka.pid").unlink()

    def detach(self) -> None:
        """Leave the JVM running after this process exits (``livecopy dev up``; stop it by its pid)."""
        _live.discard(self)

    def restart(self, *, wait: bool = True, timeout: float = 90.0) -> KafkaKraft:
        """Stop, then start again on the same ports and data dir."""
        self.stop()
        return self.start(wait=wait, timeout=timeout)

    def rss_bytes(self) -> int | None:
        """Resident memory of the JVM (Linux /proc), None when not running."""
        pid = self.pid
        if pid is None:
            return None
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def __enter__(self) -> KafkaKraft:
        if not self.is_running():
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"KafkaKraft(node_id={self.node_id}, bootstrap={self.bootstrap_servers}, pid={self.pid})"


# ---------------------------------------------------------------- several nodes


class KafkaCluster:
    """``n`` combined broker+controller nodes forming one cluster (static quorum of all n).

    Node i (1..n) lives in ``data_dir/node-i``; the ports and cluster id persist there.
    With n >= 3: default.replication.factor=3 and min.insync.replicas=2.
    """

    def __init__(
        self,
        data_dir: Path,
        n: int = 3,
        *,
        cache_dir: Path | None = None,
        host: str = "127.0.0.1",
        extra_props: Mapping[str, object] | None = None,
        jvm_opts: Sequence[str] = DEFAULT_JVM_OPTS,
        mvn: str = "mvn",
        reap_stale: bool = False,
        die_with_parent: bool = False,
    ) -> None:
        if n < 1:
            raise ValueError("n must be >= 1")
        self.data_dir = Path(data_dir).resolve()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.mvn = mvn
        saved: dict[int, dict] = {}
        for i in range(1, n + 1):
            with contextlib.suppress(OSError, ValueError):
                saved[i] = json.loads((self.data_dir / f"node-{i}" / "node.json").read_text())
        cluster_id = next((s["cluster_id"] for s in saved.values() if s.get("cluster_id")), None) or new_cluster_id()
        taken: set[int] = set()
        ports: dict[int, tuple[int, int]] = {}
        for i in range(1, n + 1):
            pair = []
            for key in ("port", "controller_port"):
                p = saved.get(i, {}).get(key)
                if not (isinstance(p, int) and p not in taken and _port_free(host, p)):
                    p = free_port(host)
                    while p in taken:
                        p = free_port(host)
                taken.add(p)
                pair.append(p)
            ports[i] = (pair[0], pair[1])
        voters = {i: cp for i, (_, cp) in ports.items()}
        rf, isr = (3, 2) if n >= 3 else (n, 1)
        self.nodes: list[KafkaKraft] = [
            KafkaKraft(
                self.data_dir / f"node-{i}",
                cache_dir=self.cache_dir,
                node_id=i,
                port=ports[i][0],
                controller_port=ports[i][1],
                host=host,
                voters=voters,
                cluster_id=cluster_id,
                replication_factor=rf,
                min_insync_replicas=isr,
                extra_props=extra_props,
                jvm_opts=jvm_opts,
                mvn=mvn,
                reap_stale=reap_stale,
                die_with_parent=die_with_parent,
            )
            for i in range(1, n + 1)
        ]

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(node.bootstrap_servers for node in self.nodes)

    def node(self, node_id: int) -> KafkaKraft:
        return self.nodes[node_id - 1]

    def __iter__(self) -> Iterator[KafkaKraft]:
        return iter(self.nodes)

    def start(self, *, timeout: float = 120.0) -> KafkaCluster:
        """Start all nodes at once (they need each other for the quorum), then wait for each."""
        libs = fetch_jars(self.cache_dir, mvn=self.mvn)
        for node in self.nodes:
            node._libs_dir = libs
            node.start(wait=False)
        deadline = time.monotonic() + timeout
        try:
            for node in self.nodes:
                node.wait_ready(max(1.0, deadline - time.monotonic()))
        except BaseException:
            for node in self.nodes:
                node.kill()
            raise
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every node (SIGTERM to all, then wait; SIGKILL stragglers)."""
        for node in self.nodes:
            if node._proc is not None and node._proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node._proc.pid, signal.SIGTERM)
        for node in self.nodes:
            node.stop(timeout)

    def kill(self, node_id: int) -> None:
        self.node(node_id).kill()

    def restart(self, node_id: int, *, timeout: float = 90.0) -> KafkaKraft:
        return self.node(node_id).restart(timeout=timeout)

    def __enter__(self) -> KafkaCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
