"""The model registry: versioned student checkpoints on disk, with lineage and a serving pointer.

Layout (one directory per model name under ``registry_dir``)::

    <registry_dir>/<name>/<version>/      save_pretrained checkpoint (safetensors) + livecopy.json
    <registry_dir>/<name>/registry.json   {"current": version, "history": [...], "versions": {...}}

``versions`` maps each version to its parent, creation time, metrics and status; ``history`` is
the append-only log of promotions and rollbacks (what served when). Every write goes to a temp
file then ``os.replace`` (readers never see half a file) under an exclusive ``flock`` on
``<name>/.lock``, so the trainer and ``livecopy models promote|rollback`` may run at once.

``ModelVersion.path`` is the checkpoint directory as ``registry_dir / name / version`` (absolute
when ``registry_dir`` is), which ``engine.serving.resolve_model_path`` resolves.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.contracts import ModelVersion, now_rfc3339

INDEX = "registry.json"


class RegistryError(Exception):
    """A registry operation that cannot be done (unknown version, nothing to roll back to)."""


@dataclass(frozen=True)
class VersionInfo:
    version: str
    parent_version: str | None
    created_at: str
    path: str
    metrics: dict[str, Any]
    status: str  # candidate | serving | retired


class Registry:
    def __init__(self, registry_dir: str | Path, name: str) -> None:
        self.root = Path(registry_dir)
        self.name = name
        self.dir = self.root / name

    # -- low level ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The index, exclusively locked; written back when the block ends without error."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                index = self._read()
                yield index
                self._write(index)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any]:
        p = self.dir / INDEX
        if not p.exists():
            return {"name": self.name, "current": None, "versions": {}, "history": []}
        data: dict[str, Any] = json.loads(p.read_text(encoding="utf-8"))
        return data

    def _write(self, index: dict[str, Any]) -> None:
        p = self.dir / INDEX
        tmp = p.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, p)

    def path_of(self, version: str) -> Path:
        return self.dir / version

    def _record(self, index: dict[str, Any], version: str, action: str) -> ModelVersion:
        v = index["versions"][version]
        return ModelVersion(
            name=self.name, version=version, parent_version=v.get("parent_version"), path=str(self.path_of(version)),
            created_at=now_rfc3339(), metrics=v.get("metrics", {}), action=action,
        )

    @staticmethod
    def _set_current(index: dict[str, Any], version: str, action: str, reason: str) -> None:
        old = index.get("current")
        if old and old in index["versions"] and old != version:
            index["versions"][old]["status"] = "retired"
        index["versions"][version]["status"] = "serving"
        index["current"] = version
        index["history"].append({"at": now_rfc3339(), "action": action, "version": version, "from": old,
                                 "reason": reason})

    # -- reads ---------------------------------------------------------------------------------
    def current(self) -> str | None:
        cur: str | None = self._read().get("current")
        return cur

    def versions(self) -> list[VersionInfo]:
        """All versions, oldest first."""
        index = self._read()
        out = [
            VersionInfo(version=k, parent_version=v.get("parent_version"), created_at=v.get("created_at", ""),
                        path=str(self.path_of(k)), metrics=v.get("metrics", {}), status=v.get("status", "candidate"))
            for k, v in index["versions"].items()
        ]
        return sorted(out, key=lambda i: (i.created_at, i.version))

    def history(self) -> list[dict[str, Any]]:
        h: list[dict[str, Any]] = self._read()["history"]
        return h

    def lineage(self, version: str) -> list[str]:
        """``version``, its parent, the parent's parent ... (as far as the registry knows)."""
        index = self._read()
        out: list[str] = []
        v: str | None = version
        while v is not None and v not in out:
            out.append(v)
            v = index["versions"].get(v, {}).get("parent_version")
        return out

    def current_record(self) -> ModelVersion | None:
        index = self._read()
        cur = index.get("current")
        return self._record(index, cur, self._last_action(index, cur)) if cur else None

    @staticmethod
    def _last_action(index: dict[str, Any], version: str) -> str:
        for h in reversed(index["history"]):
            if h.get("version") == version and h.get("action") in ("promote", "rollback"):
                return str(h["action"])
        return "promote"

    def unannounced(self) -> ModelVersion | None:
        """The serving version's record when it was never announced on ``livecopy.model-updates``
        (a promotion whose announcement a crash cut off); None when it was, or nothing serves."""
        index = self._read()
        cur = index.get("current")
        if cur is None or index.get("announced") == cur:
            return None
        return self._record(index, cur, self._last_action(index, cur))

    def mark_announced(self, version: str) -> None:
        with self._locked() as index:
            index["announced"] = version

    # -- writes --------------------------------------------------------------------------------
    def import_base(self, src: str | Path, version: str, metrics: dict[str, Any] | None = None) -> ModelVersion:
        """Copy an existing checkpoint in as the first serving version (no-op if it is there)."""
        with self._locked() as index:
            if version not in index["versions"]:
                dst = self.path_of(version)
                if not dst.exists():
                    tmp = self.dir / f".{version}.tmp"
                    shutil.rmtree(tmp, ignore_errors=True)
                    shutil.copytree(src, tmp)
                    os.replace(tmp, dst)
                index["versions"][version] = {"parent_version": None, "created_at": now_rfc3339(),
                                              "metrics": metrics or {}, "status": "candidate", "source": str(src)}
            if index.get("current") is None:
                self._set_current(index, version, "import", f"base {src}")
                index["announced"] = version  # the base serves from the start: nothing to announce
            return self._record(index, version, "promote")

    def add(self, version: str, parent_version: str | None, metrics: dict[str, Any], *, promote: bool,
            reason: str = "") -> ModelVersion:
        """Register a checkpoint already written to :meth:`path_of` ``(version)``."""
        if not (self.path_of(version) / "config.json").exists():
            raise RegistryError(f"{self.path_of(version)} holds no checkpoint")
        with self._locked() as index:
            index["versions"][version] = {"parent_version": parent_version, "created_at": now_rfc3339(),
                                          "metrics": metrics, "status": "candidate"}
            if promote:
                self._set_current(index, version, "promote", reason)
            return self._record(index, version, "promote")

    def promote(self, version: str, reason: str = "manual") -> ModelVersion:
        with self._locked() as index:
            if version not in index["versions"]:
                raise RegistryError(f"unknown version {version!r} of {self.name}")
            self._set_current(index, version, "promote", reason)
            return self._record(index, version, "promote")

    def rollback(self, to: str | None = None, reason: str = "manual") -> ModelVersion:
        """Serve ``to`` (default: the parent of the current version) again."""
        with self._locked() as index:
            cur = index.get("current")
            target = to
            if target is None:
                if cur is None:
                    raise RegistryError("nothing is serving: nothing to roll back")
                target = index["versions"].get(cur, {}).get("parent_version")
                if target is None:
                    raise RegistryError(f"{cur} has no parent version to roll back to")
            if target not in index["versions"]:
                raise RegistryError(f"unknown version {target!r} of {self.name}")
            self._set_current(index, target, "rollback", reason)
            return self._record(index, target, "rollback")
