"""Run the real serving process over the custom test models of servutil.py.

    python custom_server.py '{"models": [{"kind": "slow", "name": "slow", "args": [0.2],
                                          "policy": {"max_batch_rows": 8}}],
                               "settings": {"drain_timeout_s": 20}, "grpc": "off"}'

It goes through ``modelpod.serving.server.run`` exactly as ``modelpod serve`` does (signals, drain,
exit code); only the models are Model objects instead of pods. Prints the one ``--json`` line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servutil import MODELS

from modelpod.serving import logs
from modelpod.serving.config import BatchPolicy
from modelpod.serving.engine import InferenceEngine
from modelpod.serving.server import run
from modelpod.settings import Settings


def main() -> int:
    spec = json.loads(sys.argv[1])
    settings = Settings.from_env(host="127.0.0.1", port=0, **spec.get("settings", {}))
    logs.configure(settings.log_level, settings.log_json)
    engine = InferenceEngine(settings)
    for m in spec["models"]:
        model = MODELS[m["kind"]](*m.get("args", ()))
        policy = BatchPolicy(**m["policy"]) if "policy" in m else None
        engine.add_model(model, name=m["name"], version=m.get("version", 1), policy=policy)
    return run(engine, settings, grpc=spec.get("grpc", "off"), as_json=True)


if __name__ == "__main__":
    raise SystemExit(main())
