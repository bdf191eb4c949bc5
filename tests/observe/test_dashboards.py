"""``modelpod observe grafana|alerts``: the rules pass ``promtool check rules``, ``promtool test rules``
fires each alert on synthetic series (and not below its threshold), the dashboard uses the contract."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from servutil import PYTHON, REPO
from test_metric_contract import documented

from modelpod.observe.dashboards import alert_rules, grafana_dashboard

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (.ci/setup-system.sh)")
L = 'model="m",version="1"'


def _cli(*args: str) -> str:
    proc = subprocess.run([str(PYTHON), "-m", "modelpod", "observe", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _case(alert: str, series: list[tuple[str, str]], eval_time: str, labels: dict[str, str] | None,
          annotations: dict[str, str] | None = None) -> dict[str, Any]:
    expected = [] if labels is None else [{"exp_labels": labels, "exp_annotations": annotations or {}}]
    return {"interval": "1m", "input_series": [{"series": s, "values": v} for s, v in series],
            "alert_rule_test": [{"eval_time": eval_time, "alertname": alert, "exp_alerts": expected}]}


def _descriptions() -> dict[str, str]:
    return {r["alert"]: r["annotations"]["description"] for r in alert_rules()["groups"][0]["rules"]}


def _cases() -> list[dict[str, Any]]:
    d = _descriptions()
    crit = {"severity": "critical", "model": "m", "version": "1"}
    warn = {"severity": "warning", "model": "m", "version": "1"}
    req = "modelpod_requests_total{%s,protocol=\"rest\",outcome=\"%s\"}"
    lat = 'modelpod_request_duration_seconds_bucket{%s,outcome="success",le="%s"}'
    return [
        _case("ModelpodHighErrorRate", [(req % (L, "error"), "0+10x20"), (req % (L, "success"), "0+10x20")], "15m",
              crit, {"summary": "m:1 fails 50% of its requests", "description": d["ModelpodHighErrorRate"]}),
        _case("ModelpodHighErrorRate", [(req % (L, "error"), "0+1x20"), (req % (L, "success"), "0+99x20")], "15m",
              None),
        _case("ModelpodHighLatencyP99", [(lat % (L, "0.5"), "0+0x20"), (lat % (L, "2.5"), "0+10x20"),
                                         (lat % (L, "+Inf"), "0+10x20")], "15m",
              warn, {"summary": "m:1 p99 latency is 2.48s", "description": d["ModelpodHighLatencyP99"]}),
        _case("ModelpodHighLatencyP99", [(lat % (L, "0.5"), "0+10x20"), (lat % (L, "2.5"), "0+10x20"),
                                         (lat % (L, "+Inf"), "0+10x20")], "15m", None),
        _case("ModelpodQueueSaturated", [(f"modelpod_queue_depth{{{L}}}", "90x10"),
                                         (f"modelpod_queue_capacity{{{L}}}", "100x10")], "5m",
              warn, {"summary": "m:1 queue is 90% full", "description": d["ModelpodQueueSaturated"]}),
        _case("ModelpodQueueSaturated", [(f"modelpod_queue_depth{{{L}}}", "10x10"),
                                         (f"modelpod_queue_capacity{{{L}}}", "100x10")], "5m", None),
        _case("ModelpodInputDrift", [(f'modelpod_drift_score{{{L},variant="m:1"}}', "0.5x30")], "20m",
              {**warn, "variant": "m:1"},
              {"summary": "m:1 inputs drifted (PSI 0.5)", "description": d["ModelpodInputDrift"]}),
        _case("ModelpodInputDrift", [(f'modelpod_drift_score{{{L},variant="m:1"}}', "0.05x30")], "20m", None),
        _case("ModelpodReplicasAtMax", [(f"modelpod_replicas{{{L}}}", "4x30"), (f"modelpod_replicas_max{{{L}}}",
                                                                                 "4x30")], "20m",
              warn, {"summary": "m:1 runs at its maximum replicas", "description": d["ModelpodReplicasAtMax"]}),
        _case("ModelpodReplicasAtMax", [(f"modelpod_replicas{{{L}}}", "2x30"), (f"modelpod_replicas_max{{{L}}}",
                                                                                 "4x30")], "20m", None),
    ]


@needs_promtool
def test_alert_rules_pass_promtool_check(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(_cli("alerts"))
    proc = subprocess.run([str(PROMTOOL), "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = {r["alert"] for r in yaml.safe_load(rules.read_text())["groups"][0]["rules"]}
    assert names == {"ModelpodHighErrorRate", "ModelpodHighLatencyP99", "ModelpodQueueSaturated",
                     "ModelpodInputDrift", "ModelpodReplicasAtMax"}


@needs_promtool
def test_each_alert_fires_on_synthetic_series(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(_cli("alerts"))
    cases = _cases()
    fired = {c["alert_rule_test"][0]["alertname"] for c in cases if c["alert_rule_test"][0]["exp_alerts"]}
    assert fired == {r["alert"] for r in alert_rules()["groups"][0]["rules"]}  # every alert has a firing case
    test = tmp_path / "test.yaml"
    test.write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": cases}))
    proc = subprocess.run([str(PROMTOOL), "test", "rules", str(test)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_grafana_dashboard_variables_and_metrics() -> None:
    board = json.loads(_cli("grafana"))
    assert board == grafana_dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert {"model", "version", "variant"} <= set(variables)
    assert all(variables[n]["multi"] and variables[n]["includeAll"] for n in ("model", "version", "variant"))
    known = set(documented())
    used: set[str] = set()
    for panel in board["panels"]:
        assert panel["targets"] and panel["gridPos"]["w"] > 0
        for target in panel["targets"]:
            assert "$model" in target["expr"]  # every panel follows the model variable
            used |= {m.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
                     for m in re.findall(r"\bmodelpod_[a-z_]+", target["expr"])}
    assert used <= known, used - known
    assert {"modelpod_requests_total", "modelpod_request_duration_seconds", "modelpod_drift_psi",
            "modelpod_queue_depth"} <= used
    rule_metrics = {m for r in alert_rules()["groups"][0]["rules"]
                    for m in re.findall(r"\bmodelpod_[a-z_]+", r["expr"])}
    assert {m.removesuffix("_bucket") for m in rule_metrics} <= known
