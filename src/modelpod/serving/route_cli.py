"""``modelpod route ...``: a client of a running server's routes extension (``/v2/routes``).

    modelpod route list|show|set|delete|report|rollout|rollback [NAME] --url URL [--token T] [--json]

Exit codes: 0 done, 2 refused by the server (4xx: bad input, unknown route, no token), 1 the
server failed or could not be reached, or (``rollout --wait``) the rollout was rolled back.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from modelpod.errors import ModelpodError, UsageError
from modelpod.settings import Settings

DEFAULT_URL = "http://127.0.0.1:8080"
# The server is named by --url: never through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
ACTIONS = ("list", "show", "set", "delete", "report", "rollout", "rollback")


class ServerError(ModelpodError):
    """The server answered with an error (exit 2 for a 4xx, 1 otherwise)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} (HTTP {status})" if status else message)
        self.exit_code = 2 if 400 <= status < 500 else 1


def add_arguments(c: argparse.ArgumentParser) -> None:
    """The ``route`` subcommands (``c`` is the ``modelpod route`` parser)."""
    sub = c.add_subparsers(dest="route_action", required=True, metavar="{" + ",".join(ACTIONS) + "}")

    def action(name: str, help: str, named: bool = True) -> argparse.ArgumentParser:
        a = sub.add_parser(name, help=help)
        if named:
            a.add_argument("name", metavar="ROUTE")
        a.add_argument("--url", default=DEFAULT_URL, help=f"the server (default {DEFAULT_URL})")
        a.add_argument("--token", help="bearer token (default $MODELPOD_TOKEN)")
        a.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
        return a

    action("list", "every route of the server", named=False)
    action("show", "a route: spec, weights in force, status, rollout, rollbacks")
    a = action("set", "create or replace a route (variants not loaded are loaded first)")
    a.add_argument("--file", help="YAML or JSON with the route (a config file's routes: entry); - for stdin")
    a.add_argument("--variant", action="append", metavar="REF=WEIGHT", help="a variant and its weight (repeat)")
    a.add_argument("--shadow", action="append", metavar="REF", help="a shadow model (repeat)")
    a.add_argument("--sticky-header", metavar="HEADER", help="requests with the same value get the same variant")
    a.add_argument("--policy", choices=("weighted", "bandit"))
    a.add_argument("--floor", type=float, help="bandit: least share per variant (default 0.05)")
    a.add_argument("--baseline", metavar="REF", help="the variant the report compares against")
    action("delete", "remove a route (its models stay served)")
    action("report", "per-variant requests, errors, latency, reward, agreement, and the comparison")
    a = action("rollout", "move traffic to a candidate step by step, rolled back on a breach")
    a.add_argument("--to", required=True, metavar="REF", help="the candidate, e.g. churn:3")
    a.add_argument("--steps", default="5,25,50,100", help="percentages (default 5,25,50,100)")
    a.add_argument("--every", default="60s", help="at least this long per step (default 60s)")
    a.add_argument("--max-error-rate", type=float)
    a.add_argument("--max-p95-ms", type=float)
    a.add_argument("--min-requests", type=int, default=100, help="candidate requests per step before judging")
    a.add_argument("--min-reward-delta", type=float, help="least candidate-minus-baseline reward")
    a.add_argument("--alias", help="move this alias to the candidate once it has 100 %%")
    a.add_argument("--wait", action="store_true", help="follow until the rollout ends (exit 1 if rolled back)")
    action("rollback", "back to the last completed state")


def _call(args: argparse.Namespace, settings: Settings, method: str, path: str, body: Any = None) -> Any:
    url = args.url.rstrip("/") + path
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("content-type", "application/json")
    token = args.token or settings.token
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with _OPENER.open(req, timeout=120) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            message = json.loads(raw)["error"]
        except (ValueError, KeyError, TypeError):
            message = raw.decode("utf-8", "replace").strip() or exc.reason
        raise ServerError(exc.code, str(message)) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServerError(0, f"cannot reach {args.url}: {reason}") from None


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if args.file:
        path = Path(args.file)
        try:
            text = sys.stdin.read() if args.file == "-" else path.read_text(encoding="utf-8")
            loaded = yaml.safe_load(text)
        except OSError as exc:
            raise UsageError(f"--file {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise UsageError(f"--file {path}: not valid YAML or JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"--file {path}: must hold a mapping with 'variants'")
        spec = loaded
    if args.variant:
        variants = []
        for item in args.variant:
            ref, sep, weight = item.rpartition("=")
            try:
                w = float(weight)
            except ValueError:
                w = float("nan")
            if not sep or not ref or w != w:
                raise UsageError(f"--variant {item!r}: use REF=WEIGHT, e.g. churn:3=10")
            variants.append({"model": ref, "weight": int(w) if w.is_integer() else w})
        spec["variants"] = variants
    if args.shadow:
        spec["shadow"] = list(args.shadow)
    if args.sticky_header:
        spec["sticky"] = {"header": args.sticky_header}
    for key in ("policy", "floor", "baseline"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    if "variants" not in spec:
        raise UsageError("route set: give --variant REF=WEIGHT (one or more) or --file")
    return spec


def route_command(args: argparse.Namespace, settings: Settings) -> int:
    action = args.route_action
    path = "/v2/routes" + (f"/{quote(args.name, safe='')}" if action != "list" else "")
    if action in ("list", "show"):
        data = _call(args, settings, "GET", path)
    elif action == "set":
        data = _call(args, settings, "PUT", path, _spec(args))
    elif action == "delete":
        data = _call(args, settings, "DELETE", path)
    elif action == "report":
        data = _call(args, settings, "GET", path + "/report")
    elif action == "rollback":
        data = _call(args, settings, "POST", path + "/rollback")
    else:
        body = {"to": args.to, "steps": args.steps, "every": args.every, "min_requests": args.min_requests}
        for key in ("max_error_rate", "max_p95_ms", "min_reward_delta", "alias"):
            if getattr(args, key) is not None:
                body[key] = getattr(args, key)
        data = _call(args, settings, "POST", path + "/rollout", body)
        if args.wait:
            return _follow(args, settings, path, data)
    _print(args, action, data)
    return 0


def _follow(args: argparse.Namespace, settings: Settings, path: str, data: Any) -> int:
    as_json = getattr(args, "json", False)
    seen = None
    while True:
        rollout = data.get("rollout") or {}
        step = (rollout.get("state"), rollout.get("step"))
        if step != seen and not as_json:
            print(f"{data['name']}: rollout to {rollout.get('candidate')} {rollout.get('state')}"
                  f" at {rollout.get('step')} %" + (f" ({rollout['reason']})" if rollout.get("reason") else ""))
            seen = step
        if rollout.get("state") != "running":
            if as_json:
                print(json.dumps(data, sort_keys=True))
            return 0 if rollout.get("state") == "completed" else 1
        time.sleep(0.5)
        data = _call(args, settings, "GET", path)


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _num(x: Any, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _print(args: argparse.Namespace, action: str, data: Any) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, sort_keys=True))
    elif action == "list":
        if not data:
            print("no routes")
        for r in data:
            print(_route_line(r))
    elif action == "report":
        _print_report(data)
    elif action == "delete":
        print(f"deleted route {data['deleted']}")
    else:
        _print_route(data)


def _route_line(r: dict[str, Any]) -> str:
    shares = "  ".join(f"{k} {100 * v:.1f}%" for k, v in r["share"].items())
    extra = f"  shadow {', '.join(r['shadow'])}" if r.get("shadow") else ""
    rollout = r.get("rollout")
    if rollout:
        extra += f"  rollout {rollout['state']}"
    return f"{r['name']:<20} {r['status']:<10} {shares}{extra}"


def _print_route(r: dict[str, Any]) -> None:
    print(f"route {r['name']}  ({r['policy']}, baseline {r['baseline']})  status: {r['status']}")
    for name, share in r["share"].items():
        print(f"  variant {name:<24} weight {r['weights'][name]:<10g} share {100 * share:6.2f}%  "
              f"{r['models'][name]}")
    for name in r.get("shadow", []):
        print(f"  shadow  {name}")
    if r.get("sticky"):
        print(f"  sticky  header {r['sticky']['header']}")
    rollout = r.get("rollout")
    if rollout:
        line = f"  rollout to {rollout['candidate']}: {rollout['state']}"
        if rollout.get("step") is not None:
            line += f" at {rollout['step']:g} %"
        if rollout.get("reason"):
            line += f" - {rollout['reason']}"
        elif rollout.get("waiting"):
            line += f" - waiting: {rollout['waiting']}"
        print(line)
    for event in r.get("events", []):
        reason = f": {event['reason']}" if event.get("reason") else ""
        print(f"  {event['at']}  {event['event']}{reason}")


def _print_report(rep: dict[str, Any]) -> None:
    print(f"route {rep['route']}  ({rep['policy']}, baseline {rep['baseline']})  status: {rep['status']}")
    head = ("VARIANT", "ROLE", "SHARE", "REQUESTS", "ERROR RATE", "P50 ms", "P95 ms", "P99 ms", "REWARD (95% CI)",
            "ACCURACY", "AGREEMENT", "DELTA", "P-VALUE")
    rows = [head]
    for v in rep["variants"]:
        reward = v["reward"]
        ci = reward["ci"]
        rtext = "-" if reward["mean"] is None else (
            f"{reward['mean']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "") + f" n={reward['n']}")
        vs = v.get("vs_baseline") or {}
        rows.append((v["variant"], v["role"], _pct(v["share"]), str(v["requests"]), _pct(v["error_rate"]),
                     _num(v["latency_ms"]["p50"]), _num(v["latency_ms"]["p95"]), _num(v["latency_ms"]["p99"]),
                     rtext, _pct(v["accuracy"]["value"]), _pct((v.get("shadow") or {}).get("agreement")),
                     _num(vs.get("reward_delta"), "+.4f"), _num(vs.get("reward_p_value"), ".4f")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print(f"p-values: {rep['test']}")

