"""The copy engine: a `ContinuousEngine` (or, with ``generation.engine=static``, a `BatchingEngine`)
over a `StudentExecutor`, plus hot reload.

``CopyEngine.submit`` queues one request (Future of a ``CopyResult``); ``CopyEngine.apply_update``
takes a ``ModelVersion`` (a ``livecopy.model-updates`` record), loads that checkpoint beside the
serving one (on the caller's thread, not the engine's), smoke-checks it, and swaps it in between
two batches (static engine) or two steps (continuous engine, ``generation.engine``): what is in
flight finishes on the old model, queued requests run on the new one, nothing is dropped. A
version that fails to load or fails the smoke check is refused and the old one keeps serving.
``pick_update`` (pure) decides which record of a batch of updates to apply.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from core.contracts import ModelVersion
from core.settings import CopySettings, Settings
from engine.batching import BatchConfig, BatchingEngine
from engine.continuous import ContinuousEngine
from engine.executor import CopyRequest, CopyResult, SmokeCheckFailed, StudentExecutor, load_executor, smoke_check
from models.paths import shipped_student_dir

log = logging.getLogger(__name__)

def settle_heap() -> None:
    """Collect once, then freeze what is left alive (``gc.freeze``): the model, torch and every library
    loaded at start are no longer scanned by the cyclic collector. A full collection over them took
    ~200 ms on the 2-core dev host (~440k objects): a pause for every decode in flight, each time
    enough objects outlived younger collections; after the freeze, ~12 ms. What is frozen is freed by
    reference counting as before; only a reference cycle among it would outlive its use."""
    gc.collect()
    gc.freeze()


def model_dir_for(settings: Settings) -> Path:
    """The checkpoint a fresh engine starts from (before any model-updates record is applied)."""
    return settings.generation.model_dir or settings.models.student_dir or shipped_student_dir()


def resolve_model_path(path: str, registry_dir: Path | None) -> Path:
    """Absolute paths as they are; relative ones under ``registry_dir`` when it holds them, else
    relative to the working directory."""
    p = Path(path)
    if p.is_absolute():
        return p
    if registry_dir is not None and (registry_dir / p).exists():
        return registry_dir / p
    return p


@dataclass
class ReloadEvent:
    version: str
    action: str
    outcome: str  # swapped | refused | unchanged
    reason: str = ""


@dataclass
class ReloadLog:
    events: list[ReloadEvent] = field(default_factory=list)

    def add(self, ev: ReloadEvent) -> None:
        self.events.append(ev)
        del self.events[:-100]


Loader = Callable[[Path, CopySettings, str], StudentExecutor]


def _default_loader(path: Path, cfg: CopySettings, version: str) -> StudentExecutor:
    return load_executor(path, cfg, version=version)


class CopyEngine:
    def __init__(
        self,
        executor: StudentExecutor,
        cfg: CopySettings,
        *,
        loader: Loader = _default_loader,
        on_batch: Callable[[int, float, str], None] | None = None,
        on_reload: Callable[[ReloadEvent], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.loader = loader
        self.on_reload = on_reload
        bcfg = BatchConfig(max_batch_size=cfg.max_batch_size, max_wait_ms=cfg.max_wait_ms, max_queue=cfg.max_queue,
                           default_timeout_ms=cfg.timeout_ms)
        self.batching: BatchingEngine[CopyRequest, CopyResult] | ContinuousEngine[CopyRequest, CopyResult]
        if cfg.engine == "continuous" and executor.supports_continuous:
            self.batching = ContinuousEngine(executor, bcfg, on_batch=on_batch)
        else:
            if cfg.engine == "continuous":
                log.warning("%s cannot decode continuously (not a GPT-2 trunk): static batching", executor.name)
            self.batching = BatchingEngine(executor, bcfg, on_batch=on_batch)
        self.reloads = ReloadLog()
        self._reload_lock = threading.Lock()
        self._serving: StudentExecutor = executor  # the newest accepted executor

    @classmethod
    def from_dir(cls, path: str | Path, cfg: CopySettings, **kw: object) -> CopyEngine:
        """Load the checkpoint at ``path`` (not started: call :meth:`start`)."""
        return cls(load_executor(path, cfg), cfg, **kw)  # type: ignore[arg-type]

    @classmethod
    def from_settings(cls, settings: Settings, **kw: object) -> CopyEngine:
        """The engine of ``livecopy serve`` / ``livecopy worker generator``: the checkpoint at
        ``generation.model_dir``, else ``models.student_dir``, else the shipped student; relative
        ``ModelVersion.path`` values resolve against ``generation.registry_dir``, else
        ``trainer.registry_dir``. Not started."""
        cfg = settings.generation
        if cfg.registry_dir is None:
            cfg = cfg.model_copy(update={"registry_dir": settings.trainer.registry_dir})
        return cls.from_dir(model_dir_for(settings), cfg, **kw)

    # -- serving ------------------------------------------------------------------------------
    def start(self) -> CopyEngine:
        """Start the batching thread (once; a second call does nothing), the heap settled first
        (:func:`settle_heap`)."""
        if not self.running:
            settle_heap()
            self.batching.start()
        return self

    @property
    def running(self) -> bool:
        return self.batching._thread is not None

    def stop(self, timeout: float = 10.0) -> None:
        self.batching.stop(timeout)

    def submit(self, request: CopyRequest, timeout_ms: float | None = None) -> Future[CopyResult]:
        """Queue one request; the Future resolves to its ``CopyResult`` (or raises
        ``DeadlineExceeded`` / the executor's error). Raises ``engine.batching.Overloaded`` at once
        when the queue is full and ``EngineStopped`` after :meth:`stop`. ``timeout_ms`` (default
        ``timeout_ms`` of the settings) is the deadline for starting to run it (static engine) or
        for its answer (continuous engine: checked at every decode step)."""
        return self.batching.submit(request, timeout_ms)

    def generate(self, requests: Sequence[CopyRequest], timeout_s: float = 60.0) -> list[CopyResult]:
        """Blocking helper: submit all, wait for all (raises the first failure)."""
        futs = [self.submit(r, timeout_s * 1000) for r in requests]
        return [f.result(timeout_s) for f in futs]

    @property
    def model(self) -> str:
        return self._serving.name

    @property
    def version(self) -> str:
        """The version new requests will be served by (the accepted one, even if the swap is pending
        until the batch in flight ends)."""
        return self._serving.version

    @property
    def executor(self) -> StudentExecutor:
        return self._serving

    def queue_depth(self) -> int:
        return self.batching.queue_depth()

    # -- hot reload ---------------------------------------------------------------------------
    def apply_update(self, update: ModelVersion) -> ReloadEvent:
        """Load, smoke-check and swap in ``update`` (or refuse it). Safe from any thread."""
        with self._reload_lock:
            if update.name != self.model:
                ev = ReloadEvent(update.version, update.action, "refused", f"model {update.name!r} is not ours")
            elif update.version == self.version:
                ev = ReloadEvent(update.version, update.action, "unchanged")
            else:
                ev = self._load_and_swap(update)
            self.reloads.add(ev)
        if ev.outcome == "refused":
            log.warning("model %s %s refused: %s", update.version, update.action, ev.reason)
        elif ev.outcome == "swapped":
            log.info("model %s %s: now serving it", update.version, update.action)
        if self.on_reload:
            self.on_reload(ev)
        return ev

    def _load_and_swap(self, update: ModelVersion) -> ReloadEvent:
        path = resolve_model_path(update.path, self.cfg.registry_dir)
        try:
            new = self.loader(path, self.cfg, update.version)
        except Exception as exc:
            return ReloadEvent(update.version, update.action, "refused", f"load failed: {type(exc).__name__}: {exc}")
        try:
            smoke_check(new, min_pass_rate=self.cfg.smoke_min_pass_rate, expected_name=self.model)
        except SmokeCheckFailed as exc:
            return ReloadEvent(update.version, update.action, "refused", f"smoke check: {exc}")
        new.filter_stats = self._serving.filter_stats  # counters continue across versions
        if new.drafts is not None and self._serving.drafts is not None:
            new.drafts = self._serving.drafts  # guesses learned so far keep speeding the new version up
        self._serving = new
        self.batching.swap_executor(new)
        return ReloadEvent(update.version, update.action, "swapped")
