"""``modelpod route ...`` against a live server: every action, --json, exit codes, the token."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from traffic_util import Failing, Offset, body, route_server

from modelpod.cli import main
from modelpod.settings import Settings

ROUTE = {"churn": {"variants": [{"model": "churn:2", "weight": 100}]}}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_route_cli_end_to_end(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    models = {"churn:2": Offset(0), "churn:3": Offset(100), "churn:4": Failing(0)}
    with route_server(models, ROUTE, settings=Settings(token="tok")) as live:
        conn = ("--url", live.url, "--token", "tok")
        code, out, _ = run(capsys, "route", "list", *conn)
        assert code == 0 and out.startswith("churn") and "churn:2 100.0%" in out
        code, out, _ = run(capsys, "route", "set", "churn", "--variant", "churn:2=90", "--variant", "churn:3=10",
                           "--sticky-header", "x-user-id", "--json", *conn)
        assert code == 0
        shown = json.loads(out)
        assert shown["weights"] == {"churn:2": 90, "churn:3": 10} and shown["sticky"] == {"header": "x-user-id"}
        spec = tmp_path / "route.yaml"
        spec.write_text("variants:\n  - {model: 'churn:2', weight: 95}\n  - {model: 'churn:3', weight: 5}\n")
        code, out, _ = run(capsys, "route", "set", "churn", "--file", str(spec), *conn)
        assert code == 0 and "share   5.00%" in out
        with httpx.Client(base_url=live.url, timeout=30, headers={"authorization": "Bearer tok"}) as c:
            for _ in range(40):
                assert c.post("/v2/models/churn/infer", json=body()).status_code == 200
        code, out, _ = run(capsys, "route", "report", "churn", *conn)
        assert code == 0 and "churn:2" in out and "P95 ms" in out and "baseline" in out
        code, out, _ = run(capsys, "route", "report", "churn", "--json", *conn)
        assert sum(v["requests"] for v in json.loads(out)["variants"]) == 40
        # A rollout that breaches: --wait follows it and exits 1 with the reason.
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(base_url=live.url, timeout=30, headers={"authorization": "Bearer tok"}) as c:
                while not stop.is_set():
                    c.post("/v2/models/churn/infer", json=body())

        t = threading.Thread(target=load, daemon=True)
        t.start()
        try:
            code, out, _ = run(capsys, "route", "rollout", "churn", "--to", "churn:4", "--steps", "50,100",
                               "--every", "1s", "--max-error-rate", "0.01", "--min-requests", "5", "--wait", *conn)
        finally:
            stop.set()
            t.join(30)
        assert code == 1 and "rolled_back" in out and "error rate" in out
        code, out, _ = run(capsys, "route", "show", "churn", *conn)
        assert code == 0 and "rolled_back" in out and "error rate" in out
        code, out, _ = run(capsys, "route", "rollback", "churn", "--json", *conn)
        assert code == 0 and json.loads(out)["weights"] == {"churn:2": 90, "churn:3": 10}
        # Refusals: exit 2 with the server's message; no token: exit 2 too.
        code, _, err = run(capsys, "route", "set", "churn", "--variant", "churn:2=-5", *conn)
        assert code == 2 and "negative" in err
        code, _, err = run(capsys, "route", "show", "nope", *conn)
        assert code == 2 and "no route 'nope'" in err
        code, _, err = run(capsys, "route", "list", "--url", live.url)
        assert code == 2 and "token" in err
        code, _, err = run(capsys, "route", "set", "churn", "--variant", "churn:2", *conn)
        assert code == 2 and "REF=WEIGHT" in err
        code, out, _ = run(capsys, "route", "delete", "churn", *conn)
        assert code == 0 and "deleted route churn" in out
    code, _, err = run(capsys, "route", "list", "--url", "http://127.0.0.1:9")
    assert code == 1 and "cannot reach" in err


def test_serve_with_only_routes_in_the_config(tmp_path: Path, served_home: Any) -> None:
    from servutil import modelpod_serve

    home, _ = served_home
    config = tmp_path / "serve.yaml"
    config.write_text("routes:\n  scorer:\n    variants:\n      - {model: 'lr:1', weight: 1}\n"
                      "  lr:\n    variants:\n      - {model: 'lr:1', weight: 1}\n")  # two routes, one model
    with modelpod_serve(home, "--config", str(config), "--no-grpc") as proc, \
            httpx.Client(base_url=proc.url, timeout=30) as c:
        assert [m["name"] for m in proc.info["models"]] == ["lr"]  # the route's model is served
        assert {r["name"]: r["share"] for r in proc.info["routes"]} == {"scorer": {"lr:1": 1.0}, "lr": {"lr:1": 1.0}}
        x = {"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [1, 20], "data": [0.1] * 20}]}
        r = c.post("/v2/models/scorer/infer", json=x)
        assert r.status_code == 200 and r.headers["modelpod-variant"] == "lr:1"


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("routes:\n  scorer:\n    variants:\n      - {model: 'lr:1', weight: -1}\n", "negative"),
    ("routes:\n  scorer:\n    variants:\n      - {model: 'lr:9', weight: 1}\n", "unknown model lr:9"),
    ("routes:\n  lr:\n    variants:\n      - {model: 'other:1', weight: 1}\n", "unknown model"),
    ("routes: [1, 2]\n", "'routes' must map"),
])
def test_bad_routes_in_the_config_exit_2(tmp_path: Path, served_home: Any, yaml_text: str, message: str) -> None:
    import subprocess

    from servutil import PYTHON, REPO

    home, _ = served_home
    config = tmp_path / "serve.yaml"
    config.write_text(yaml_text)
    proc = subprocess.run([str(PYTHON), "-m", "modelpod", "--home", str(home), "serve", "lr", "--config", str(config),
                           "--port", "0", "--no-grpc"], capture_output=True, text=True, timeout=120, cwd=REPO,
                          check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and proc.stderr.count("error:") == 1
