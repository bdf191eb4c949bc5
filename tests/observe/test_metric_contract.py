"""The metric contract: the families a server exposes are exactly the ones docs/observe.md lists,
with the same type and labels; a rename or a new family is a deliberate change of both."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from servutil import REPO, EchoModel, LiveServer, echo_request, wait_for

from modelpod.observe.drift import build_reference
from modelpod.observe.payload import parse_specs
from modelpod.serving.engine import InferenceEngine
from modelpod.settings import Settings

DOC = REPO / "docs" / "observe.md"
_ROW = re.compile(r"^\| `(modelpod_[a-z_]+)` \| (\w+) \| ([^|]*) \|")
# Families of features on other pages that a server exposes only when they run (process replicas).
_PENDING = "From process replicas"


def _tables() -> tuple[dict[str, tuple[str, tuple[str, ...]]], set[str]]:
    text = DOC.read_text(encoding="utf-8")
    contract = text.split("## Metric contract", 1)[1].split("\n## ", 1)[0]
    main, _, pending = contract.partition(_PENDING)

    def rows(part: str) -> dict[str, tuple[str, tuple[str, ...]]]:
        out = {}
        for line in part.splitlines():
            m = _ROW.match(line)
            if m:
                labels = tuple(x.strip() for x in m.group(3).split(",") if x.strip())
                out[m.group(1)] = (m.group(2), labels)
        return out

    return rows(main), set(rows(pending))


def documented() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every family docs/observe.md documents: name -> (type, labels)."""
    main, _ = _tables()
    return {**main, **{n: ("", ()) for n in _tables()[1]}}


def test_exposed_families_match_the_documented_contract() -> None:
    engine = InferenceEngine(Settings())
    exposed = {f.name: (f.kind, f.labelnames) for f in engine.metrics.registry.families}
    main, pending = _tables()
    assert main, "no table found in docs/observe.md"
    undocumented = set(exposed) - set(main) - pending
    assert not undocumented, f"exposed but not in docs/observe.md: {sorted(undocumented)}"
    missing = set(main) - set(exposed)
    assert not missing, f"documented but not exposed: {sorted(missing)}"
    for name, (kind, labels) in main.items():
        assert exposed[name] == (kind, labels), f"{name}: exposed {exposed[name]}, documented {(kind, labels)}"


def test_a_scrape_with_every_feature_on_passes_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (.ci/setup-system.sh)")
    ref = build_reference({"x": np.random.default_rng(1).normal(size=(500, 2))})
    assert ref is not None

    def setup(engine: InferenceEngine) -> None:
        engine.add_model(EchoModel(), name="echo", version=1)
        engine.observe.configure_payload(parse_specs({"": {"sink": str(tmp_path / "p.jsonl"), "sample": 1}}))

    with LiveServer(Settings(), setup) as live:
        entry = live.engine.registry.versions("echo")[1]
        from modelpod.observe.drift import DriftMonitor

        live.engine.observe.monitors[("echo", "1")] = monitor = DriftMonitor(ref, "echo", "1", "echo:1")
        for _ in range(3):
            x = np.random.default_rng(2).normal(size=(60, 2)).astype(np.float32)
            assert httpx.post(f"{live.url}/v2/models/echo/infer", json=echo_request(x), timeout=30).status_code == 200
            monitor.observe({"x": x})
        text = wait_for(lambda: (lambda t: t if "modelpod_payload_log_records_total" in t else None)(
            httpx.get(f"{live.url}/metrics", timeout=30).text), 10, "the payload counter")
        assert entry.ready
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert {"modelpod_drift_psi", "modelpod_drift_score", "modelpod_queue_capacity"} <= names
    assert names <= set(documented())
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
