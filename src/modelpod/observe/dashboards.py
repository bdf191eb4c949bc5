"""A Grafana dashboard and Prometheus alerting rules over modelpod's metric contract (docs/observe.md).

``modelpod observe grafana > dashboard.json`` and ``modelpod observe alerts > rules.yaml``. Both only
use the documented metric names, so they keep working as long as the contract does (a test pins it).
"""

from __future__ import annotations

from typing import Any

import yaml

# The replica gauges come from the replicas feature (issue 12): current and configured maximum.
REPLICAS = "modelpod_replicas"
REPLICAS_MAX = "modelpod_replicas_max"
SEL = 'model=~"$model", version=~"$version"'
VSEL = 'model=~"$model", version=~"$version", variant=~"$variant"'


def _variable(name: str, query: str) -> dict[str, Any]:
    return {"name": name, "label": name, "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": {"query": query, "refId": name}, "definition": query, "refresh": 2, "includeAll": True,
            "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"}, "sort": 1}


def _panel(pid: int, title: str, exprs: list[tuple[str, str]], unit: str, x: int, y: int, w: int = 12,
           h: int = 8, kind: str = "timeseries") -> dict[str, Any]:
    return {
        "id": pid, "title": title, "type": kind, "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i),
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for i, (expr, legend) in enumerate(exprs)],
    }


def grafana_dashboard() -> dict[str, Any]:
    """The dashboard JSON (Grafana's schema 39), with model/version/variant variables."""
    lat = f"sum by (le, model, version) (rate(modelpod_request_duration_seconds_bucket{{{SEL}}}[$__rate_interval]))"
    req = f"modelpod_requests_total{{{SEL}}}"
    panels = [
        _panel(1, "Requests per second", [(f"sum by (model, version, outcome) (rate({req}[$__rate_interval]))",
                                           "{{model}}:{{version}} {{outcome}}")], "reqps", 0, 0),
        _panel(2, "Error ratio", [(
            f'sum by (model, version) (rate(modelpod_requests_total{{{SEL}, outcome=~"error|timeout"}}'
            f"[$__rate_interval])) / sum by (model, version) (rate({req}[$__rate_interval]))",
            "{{model}}:{{version}}")], "percentunit", 12, 0),
        _panel(3, "Latency p50 / p99", [(f"histogram_quantile(0.5, {lat})", "p50 {{model}}:{{version}}"),
                                        (f"histogram_quantile(0.99, {lat})", "p99 {{model}}:{{version}}")],
               "s", 0, 8),
        _panel(4, "Rows per batch (mean)", [(
            f"sum by (model, version) (rate(modelpod_batch_rows_sum{{{SEL}}}[$__rate_interval])) / "
            f"sum by (model, version) (rate(modelpod_batch_rows_count{{{SEL}}}[$__rate_interval]))",
            "{{model}}:{{version}}")], "short", 12, 8),
        _panel(5, "Queue depth and capacity", [
            (f"sum by (model, version) (modelpod_queue_depth{{{SEL}}})", "queued {{model}}:{{version}}"),
            (f"sum by (model, version) (modelpod_queue_capacity{{{SEL}}})", "capacity {{model}}:{{version}}"),
            (f"sum by (model, version) (modelpod_inflight_requests{{{SEL}}})", "in flight {{model}}:{{version}}")],
            "short", 0, 16),
        _panel(6, "Requests per variant (routes)", [(
            f"sum by (route, variant) (rate(modelpod_requests_total{{{VSEL}, route!=\"\"}}[$__rate_interval]))",
            "{{route}} {{variant}}")], "reqps", 12, 16),
        _panel(7, "Drift score (largest PSI)", [(f"max by (model, version, variant) (modelpod_drift_score{{{VSEL}}})",
                                                 "{{variant}}")], "short", 0, 24),
        _panel(8, "PSI per feature", [(f"modelpod_drift_psi{{{VSEL}}}", "{{variant}} {{feature}}")], "short", 12, 24),
        _panel(9, "Models ready, memory", [
            (f"sum by (model, version) (modelpod_model_ready{{{SEL}}})", "ready {{model}}:{{version}}"),
            (f"sum by (model, version) (modelpod_model_memory_bytes{{{SEL}}})", "bytes {{model}}:{{version}}")],
            "short", 0, 32),
        _panel(10, "Replicas", [(f"sum by (model, version) ({REPLICAS}{{{SEL}}})", "{{model}}:{{version}}"),
                                (f"max by (model, version) ({REPLICAS_MAX}{{{SEL}}})", "max {{model}}:{{version}}")],
               "short", 12, 32),
        _panel(11, "Payload log: written and dropped", [
            (f"sum by (model, version) (rate(modelpod_payload_log_records_total{{{SEL}}}[$__rate_interval]))",
             "written {{model}}:{{version}}"),
            (f"sum by (model, version, reason) (rate(modelpod_payload_log_dropped_total{{{SEL}}}[$__rate_interval]))",
             "dropped {{reason}} {{model}}:{{version}}")], "ops", 0, 40),
        _panel(12, "Model loads", [(f"sum by (model, version, outcome) (increase(modelpod_model_loads_total{{{SEL}}}"
                                    "[$__range]))", "{{model}}:{{version}} {{outcome}}")], "short", 12, 40),
    ]
    return {
        "title": "modelpod", "uid": "modelpod-serving", "tags": ["modelpod"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0},
            _variable("model", "label_values(modelpod_requests_total, model)"),
            _variable("version", 'label_values(modelpod_requests_total{model=~"$model"}, version)'),
            _variable("variant", 'label_values(modelpod_drift_score{model=~"$model"}, variant)'),
        ]},
        "panels": panels,
    }


# Alert thresholds (documented in docs/observe.md); change them in the generated YAML to taste.
ERROR_RATIO = 0.05
P99_SECONDS = 1.0
QUEUE_SHARE = 0.8
DRIFT_SCORE = 0.25


def alert_rules() -> dict[str, Any]:
    """The Prometheus rule file (one group); ``promtool check rules`` accepts it."""
    by = "model, version"
    rules = [
        {"alert": "ModelpodHighErrorRate",
         "expr": (f'sum by ({by}) (rate(modelpod_requests_total{{outcome=~"error|timeout"}}[5m])) '
                  f"/ sum by ({by}) (rate(modelpod_requests_total[5m])) > {ERROR_RATIO}"),
         "for": "5m", "labels": {"severity": "critical"},
         "annotations": {"summary": "{{ $labels.model }}:{{ $labels.version }} fails {{ $value | humanizePercentage }}"
                                    " of its requests",
                         "description": f"More than {ERROR_RATIO:.0%} of inference requests ended in a server "
                                        "error or a timeout over 5 minutes."}},
        {"alert": "ModelpodHighLatencyP99",
         "expr": (f"histogram_quantile(0.99, sum by (le, {by}) (rate(modelpod_request_duration_seconds_bucket"
                  f'{{outcome="success"}}[5m]))) > {P99_SECONDS:g}'),
         "for": "10m", "labels": {"severity": "warning"},
         "annotations": {"summary": "{{ $labels.model }}:{{ $labels.version }} p99 latency is {{ $value }}s",
                         "description": f"The 99th percentile of successful requests is above {P99_SECONDS:g}s."}},
        {"alert": "ModelpodQueueSaturated",
         "expr": f"max by ({by}) (modelpod_queue_depth) / max by ({by}) (modelpod_queue_capacity) > {QUEUE_SHARE}",
         "for": "2m", "labels": {"severity": "warning"},
         "annotations": {"summary": "{{ $labels.model }}:{{ $labels.version }} queue is "
                                    "{{ $value | humanizePercentage }} full",
                         "description": "Requests are close to being refused with 429: add replicas or capacity."}},
        {"alert": "ModelpodInputDrift",
         "expr": f"max by ({by}, variant) (modelpod_drift_score) > {DRIFT_SCORE}",
         "for": "15m", "labels": {"severity": "warning"},
         "annotations": {"summary": "{{ $labels.variant }} inputs drifted (PSI {{ $value }})",
                         "description": "The live inputs' distribution differs from the pod's reference; "
                                        "`modelpod drift URL MODEL` shows which features."}},
        {"alert": "ModelpodReplicasAtMax",
         "expr": f"max by ({by}) ({REPLICAS}) >= max by ({by}) ({REPLICAS_MAX})",
         "for": "15m", "labels": {"severity": "warning"},
         "annotations": {"summary": "{{ $labels.model }}:{{ $labels.version }} runs at its maximum replicas",
                         "description": "The autoscaler cannot add replicas: raise replicas.max or add capacity."}},
    ]
    return {"groups": [{"name": "modelpod", "rules": rules}]}


def alert_rules_yaml() -> str:
    return yaml.safe_dump(alert_rules(), sort_keys=False, width=200)
