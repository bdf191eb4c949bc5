"""``modelpod observe grafana|alerts`` (print a dashboard or rule file) and ``modelpod drift URL MODEL``.

``modelpod drift`` reads ``GET /v2/models/{MODEL}[/versions/{V}]/drift`` of a running server and
prints one row per variant and feature (``--json``: the server's answer as is). Exit codes as for
``modelpod route``: 2 refused (4xx), 1 unreachable or failed.
"""

from __future__ import annotations

import argparse
import json
from typing import Any
from urllib.parse import quote

from modelpod.settings import Settings


def add_observe_arguments(c: argparse.ArgumentParser) -> None:
    sub = c.add_subparsers(dest="observe_action", required=True, metavar="{grafana,alerts}")
    sub.add_parser("grafana", help="print a Grafana dashboard (JSON) over modelpod's metrics")
    sub.add_parser("alerts", help="print Prometheus alerting rules (YAML): errors, p99, queue, drift, replicas")


def add_drift_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("url", metavar="URL", help="the server, e.g. http://127.0.0.1:8080")
    c.add_argument("model", metavar="MODEL", help="a model or a route (every variant)")
    c.add_argument("--version", dest="model_version", help="one version only")
    c.add_argument("--token", help="bearer token (default $MODELPOD_TOKEN)")


def observe_command(args: argparse.Namespace, settings: Settings) -> int:
    from modelpod.observe.dashboards import alert_rules_yaml, grafana_dashboard

    if args.observe_action == "grafana":
        print(json.dumps(grafana_dashboard(), indent=2))
    else:
        print(alert_rules_yaml(), end="")
    return 0


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def drift_command(args: argparse.Namespace, settings: Settings) -> int:
    from modelpod.cli import print_table
    from modelpod.serving.route_cli import _call

    path = f"/v2/models/{quote(args.model, safe='')}"
    if args.model_version:
        path += f"/versions/{quote(args.model_version, safe='')}"
    data = _call(args, settings, "GET", path + "/drift")
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    rows: list[list[str]] = []
    for v in data.get("variants", []):
        rows.append([v["variant"], "(score)", _fmt(v.get("score")), str(v.get("rows", 0)), v.get("status", "")])
        for f in v.get("features", []):
            rows.append([v["variant"], f["feature"], _fmt(f.get("psi")), str(f.get("rows", 0)), f.get("status", "")])
    if not rows:
        print(f"no served version of {args.model}")
        return 0
    print_table(("VARIANT", "FEATURE", "PSI", "ROWS", "STATUS"), rows)
    return 0
