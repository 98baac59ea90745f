"""Builds deploy/grafana/dashboards/livecopy.json, the Grafana dashboard over livecopy's Prometheus metrics.

    python deploy/grafana/build_dashboard.py            # rewrite the JSON
    python deploy/grafana/build_dashboard.py --check    # exit 1 if the committed JSON differs

The metric names are those the workers (core/metrics.py) and the API (services/api/: app, copy,
events) export; tests/unit/test_grafana.py checks every name used here against what they expose.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "livecopy.json"
DS = {"type": "prometheus", "uid": "prometheus"}  # provisioning/datasources/prometheus.yml
ANNOTATION = "livecopy_model_info unless livecopy_model_info offset 1m"


class Layout:
    """Panels in a 24-column grid, two or three per line, rows between sections."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.y = 0
        self.x = 0
        self.h = 0

    def row(self, title: str) -> None:
        self.newline()
        self.panels.append({"id": len(self.panels) + 1, "type": "row", "title": title, "collapsed": False,
                            "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1}, "panels": []})
        self.y += 1

    def newline(self) -> None:
        self.y += self.h
        self.x = self.h = 0

    def add(self, panel: dict[str, Any], w: int = 8, h: int = 8) -> None:
        if self.x + w > 24:
            self.newline()
        panel["id"] = len(self.panels) + 1
        panel["gridPos"] = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.panels.append(panel)
        self.x += w
        self.h = max(self.h, h)


def timeseries(title: str, targets: list[tuple[str, str]], unit: str = "short", description: str = "",
               stack: bool = False, min0: bool = True) -> dict[str, Any]:
    custom: dict[str, Any] = {"lineWidth": 1, "fillOpacity": 10 if stack else 0, "showPoints": "never",
                              "spanNulls": False}
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    defaults: dict[str, Any] = {"unit": unit, "custom": custom}
    if min0:
        defaults["min"] = 0
    return {
        "type": "timeseries", "title": title, "description": description, "datasource": DS,
        "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(targets)],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
    }


def stat(title: str, expr: str, legend: str, unit: str = "short", description: str = "") -> dict[str, Any]:
    return {
        "type": "stat", "title": title, "description": description, "datasource": DS,
        "targets": [{"refId": "A", "datasource": DS, "expr": expr, "legendFormat": legend, "instant": True}],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "textMode": "value_and_name", "colorMode": "none", "graphMode": "none"},
    }


def quantiles(metric: str, by: str, match: str = "") -> list[tuple[str, str]]:
    sel = f"{{{match}}}" if match else ""
    lead = f"{{{{{by}}}}} " if by else ""
    group = f"{by}, le" if by else "le"
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{sel}[$__rate_interval])))",
             f"{lead}p{int(q * 100)}") for q in (0.5, 0.99)]


def build() -> dict[str, Any]:
    g = Layout()
    g.row("Stream: workers (each worker's --metrics-port)")
    g.add(timeseries("Records/s by worker and outcome",
                     [("sum by (worker, outcome) (rate(livecopy_records_total[$__rate_interval]))",
                       "{{worker}} {{outcome}}")], "ops",
                     "What each worker did with the records it consumed (applied, duplicate, rejected -> DLQ, "
                     "emitted, trained, published ...)."), w=12)
    g.add(timeseries("Consumer lag by worker and topic",
                     [("sum by (worker, topic) (livecopy_consumer_lag)", "{{worker}} {{topic}}")], "short",
                     "Records between each worker's position and the high watermark of its assigned partitions."),
          w=12)
    g.add(timeseries("DLQ records/s by reason", [
        ("sum by (worker, reason) (rate(livecopy_dlq_records_total[$__rate_interval]))", "{{worker}} {{reason}}"),
        ('sum by (reason) (rate(livecopy_collector_events_total{outcome="rejected"}[$__rate_interval]))',
         "collector {{reason}}"),
    ], "ops", "Records sent to livecopy.events.dlq by reason: each worker's rejects (not_json, missing_field, "
              "...) and the feedback joiner's orphans (copy_not_found, impression_not_found); events the HTTP "
              "collector rejected (unknown_copy goes to the DLQ, the others are answered to the caller).",
              stack=True))
    g.add(timeseries("Event to effect latency (p50, p99)",
                     quantiles("livecopy_event_to_effect_seconds", "worker"), "s",
                     "Record timestamp (producer CreateTime) to its effect acknowledged."))
    g.add(timeseries("Batches: size p50 and retries/s", [
        *quantiles("livecopy_batch_size", "worker")[:1],
        ("sum by (worker) (rate(livecopy_batch_retries_total[$__rate_interval]))", "{{worker}} retries/s"),
    ], "short", "Records per batch; batches retried after a transient failure (Redis or broker away)."))
    g.add(stat("Workers up", "sum by (worker) (livecopy_worker_up)", "{{worker}}"), w=12, h=5)
    g.add(stat("Scrape targets up", "sum by (job) (up)", "{{job}}",
               description="Prometheus' own `up`: targets that answered the last scrape."), w=12, h=5)

    g.row("Copy API (GET /v1/copy; /metrics with an admin key)")
    g.add(timeseries("Copy requests/s by status",
                     [('sum by (status) (rate(livecopy_http_requests_total{route="/v1/copy"}[$__rate_interval]))',
                       "{{status}}")], "reqps", stack=True))
    g.add(timeseries("Copy latency (p50, p99)",
                     quantiles("livecopy_http_seconds", "", 'route="/v1/copy"'), "s"))
    g.add(timeseries("Generation of a miss: queue + engine (p50, p99)",
                     [*quantiles("livecopy_copy_generate_seconds", ""),
                      *[(e, f"engine batch {lg}") for e, lg in quantiles("livecopy_copy_batch_seconds", "")]],
                     "s"))
    g.add(timeseries("Copies served by source and policy",
                     [("sum by (source, policy) (rate(livecopy_copy_served_total[$__rate_interval]))",
                       "{{source}} {{policy}}")], "ops", stack=True))
    g.add(timeseries("Fallbacks and refusals by reason", [
        ("sum by (reason) (rate(livecopy_copy_fallbacks_total[$__rate_interval]))", "fallback {{reason}}"),
        ("sum by (reason) (rate(livecopy_copy_refused_total[$__rate_interval]))", "refused {{reason}}"),
        ("sum by (reason) (rate(livecopy_copy_candidates_rejected_total[$__rate_interval]))",
         "candidate rejected {{reason}}"),
    ], "ops", "Fallback copy served (no candidate passed the filter), by the commonest rejection; requests "
              "refused (503/429); candidates the filter rejected."))
    g.add(timeseries("Queues", [
        ("sum(livecopy_copy_queue_depth)", "engine queue"),
        ("sum(livecopy_copy_publish_queue)", "copy producer queue"),
        ("sum(livecopy_copy_publish_congested)", "congested (misses refused)"),
        ("sum(rate(livecopy_copy_publish_failed_total[$__rate_interval]))", "publish failed/s"),
        ("sum(rate(livecopy_copy_uncached_total[$__rate_interval]))", "uncached/s"),
    ], "short"))

    g.row("Models: serving version, reloads, the online trainer")
    g.add(timeseries("Serving model version",
                     [("count by (version) (livecopy_model_info == 1)", "{{version}}")], "short",
                     "API processes serving each version: a version change shows as one line ending, another "
                     "starting.", stack=True), w=12)
    g.add(stat("Serving now", "count by (model, version) (livecopy_model_info == 1)", "{{model}} {{version}}"),
          w=12, h=8)
    g.add(timeseries("Model updates handled by the API (gate at load)",
                     [("sum by (outcome) (increase(livecopy_model_reloads_total[$__rate_interval]))", "{{outcome}}")],
                     "short", "swapped: now serving; refused: failed to load or the smoke check; unchanged."))
    g.add(timeseries("Trainer: gate decisions, versions published and records", [
        ('sum(increase(livecopy_records_total{worker="trainer", outcome="published"}[$__rate_interval]))',
         "versions published (passed the gate)"),
        ("sum by (decision, reason) (increase(livecopy_trainer_gate_decisions_total[$__rate_interval]))",
         "gate {{decision}} {{reason}}"),
        ('sum by (outcome) (rate(livecopy_records_total{worker="trainer", outcome=~"trained|heldout|duplicate|'
         'skipped"}[$__rate_interval]))', "{{outcome}}/s"),
    ], "short", "A version is published when it passes the gate (held-out log-loss, KL, SNIPS; docs/feedback.md)."))
    g.add(timeseries("HTTP collector (POST /v1/events)", [
        ("sum by (outcome) (rate(livecopy_collector_events_total[$__rate_interval]))", "events {{outcome}}"),
        ("sum by (reason) (rate(livecopy_collector_refused_total[$__rate_interval]))", "request refused {{reason}}"),
        *[(e, f"write {lg}") for e, lg in quantiles("livecopy_collector_write_seconds", "")[1:]],
    ], "short"))
    g.add(timeseries("Speculative decode: guessed tokens kept", [
        ('sum(rate(livecopy_copy_draft_tokens_total{outcome="kept"}[$__rate_interval])) / '
         "sum(rate(livecopy_copy_draft_tokens_total[$__rate_interval]))", "share of guesses kept"),
    ], "percentunit", "Guesses fed by the continuous engine's speculative steps (small batches) that the "
       "rows' own sampling kept; low: the draft table does not fit the traffic (docs/generation.md)."))
    g.add(timeseries("Prompt prefix cache: prompt tokens reused", [
        ('sum(rate(livecopy_copy_prompt_tokens_total{source="cached"}[$__rate_interval])) / '
         "sum(rate(livecopy_copy_prompt_tokens_total[$__rate_interval]))", "share of prompt tokens reused"),
    ], "percentunit", "Prompt tokens whose keys/values came from a recently prefilled prompt sharing the prefix "
       "(continuous engine); low: prompts rarely repeat, or generation.prompt_cache_mb is small (docs/generation.md)."))
    return {
        "uid": "livecopy", "title": "livecopy", "description": "livecopy's Prometheus metrics "
        "(deploy/grafana/build_dashboard.py builds this file)", "tags": ["livecopy", "kafka"],
        "timezone": "browser", "schemaVersion": 39, "version": 1, "editable": True, "graphTooltip": 1,
        "refresh": "10s", "time": {"from": "now-1h", "to": "now"}, "templating": {"list": []},
        "annotations": {"list": [{
            "name": "Model version changes", "datasource": DS, "enable": True, "iconColor": "purple",
            # a version label that was not there a minute before: the API started serving it
            "expr": ANNOTATION, "titleFormat": "serving {{version}}", "step": "60s",
            "target": {"refId": "Anno", "datasource": DS, "expr": ANNOTATION},  # the form Grafana >= 10 keeps
        }]},
        "panels": g.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv[1:]:
        if not OUT.exists() or OUT.read_text() != text:
            sys.exit(f"{OUT} is out of date: run python {Path(__file__).name}")
        print(f"{OUT}: up to date")
    else:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(text)
        print(OUT)
