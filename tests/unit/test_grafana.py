"""deploy/: the Grafana dashboard uses only metric names the services really export, it is what
deploy/grafana/build_dashboard.py builds, and Prometheus scrapes every service docker-compose.yml runs."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from core.metrics import TrainerMetrics
from models.drafts import NGramDrafts
from models.prefix_cache import PrefixCache
from services.api.app import ApiMetrics
from services.api.copy import CopyMetrics
from services.api.events import CollectorMetrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",), "summary": ("", "_sum", "_count"), "info": ("_info",), "unknown": ("",)}


def builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_dashboard", DEPLOY / "grafana" / "build_dashboard.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def exported() -> set[str]:
    """Every sample name the workers and the API expose (families with no samples yet included)."""
    copy = CopyMetrics()
    stats = SimpleNamespace(checked=0, reasons={"x": 1}, fallback_reasons={"x": 1})
    copy.service = SimpleNamespace(  # type: ignore[assignment]
        engine=SimpleNamespace(model="m", version="v", queue_depth=lambda: 0, executor=SimpleNamespace(
            filter_stats=stats, drafts=NGramDrafts(), prompt_cache=PrefixCache(1))),
        publisher=SimpleNamespace(failed=0, queued=lambda: 0, congested=lambda: False))
    registries: list[CollectorRegistry] = [TrainerMetrics("w").registry, ApiMetrics().registry, copy.registry,
                                           CollectorMetrics().registry]
    names = set()
    for reg in registries:
        for fam in reg.collect():
            names |= {fam.name + s for s in SUFFIXES[fam.type]}
            names |= {s.name for s in fam.samples}
    return names


def expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return exprs + [a["expr"] for a in dashboard["annotations"]["list"]]


def test_the_dashboard_uses_only_exported_metric_names() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "livecopy.json").read_text())
    names = exported()
    assert {"livecopy_records_total", "livecopy_consumer_lag", "livecopy_dlq_records_total",
            "livecopy_http_seconds_bucket", "livecopy_copy_fallbacks_total", "livecopy_model_info"} <= names
    used = {m for e in expressions(dashboard) for m in re.findall(r"\blivecopy_[a-z0-9_]+", e)}
    assert len(used) >= 20
    assert used - names == set(), f"not exported by any service: {sorted(used - names)}"
    # each of the figures has a panel
    titles = " | ".join(p["title"] for p in dashboard["panels"])
    for what in ("Records/s", "lag", "DLQ", "latency", "Fallbacks", "model version", "Trainer"):
        assert what.lower() in titles.lower(), what


def test_the_committed_dashboard_is_what_the_builder_builds() -> None:
    mod = builder()
    assert (DEPLOY / "grafana" / "dashboards" / "livecopy.json").read_text() == mod.render()
    dashboard = mod.build()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:  # inside the 24-column grid
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24


def test_grafana_provisioning_matches_compose_and_the_dashboard() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana, prom = compose["services"]["grafana"], compose["services"]["prometheus"]
    for svc in (grafana, prom):
        assert re.fullmatch(r"[a-z/]+:v?\d+\.\d+\.\d+", svc["image"]), svc["image"]  # pinned
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "livecopy.json").read_text())
    assert {p["datasource"]["uid"] for p in dash["panels"] if "datasource" in p} == {ds["uid"]}
    assert ds["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/livecopy.yml").read_text())["providers"][0]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].startswith(provider["options"]["path"])


def test_prometheus_scrapes_every_service_compose_runs() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    prom_mounts = dict(v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"] if v.startswith("./"))
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert prom_mounts["./deploy/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    scraped: dict[str, int] = {}
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    for job in jobs.values():
        for sd in job.get("dns_sd_configs", []):
            for name in sd["names"]:
                scraped[name] = sd["port"]
    for name, svc in compose["services"].items():
        cmd = svc.get("command") or []
        if "--metrics-port" in cmd:
            assert scraped.get(name) == int(cmd[cmd.index("--metrics-port") + 1]), name
        if cmd[:1] == ["serve"]:
            assert scraped.get(name) == int(cmd[cmd.index("--port") + 1]), name
            api = next(j for j in jobs.values() if name in [n for sd in j["dns_sd_configs"] for n in sd["names"]])
            assert api["metrics_path"] == "/metrics" and api["authorization"]["type"] == "Bearer"
            key = Path(api["authorization"]["credentials_file"])
            mounted = {c: h for h, c in prom_mounts.items()}
            assert str(key.parent) in mounted and (ROOT / mounted[str(key.parent)]).is_dir()
