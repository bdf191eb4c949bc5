"""`modelpod serve`'s server (REST and gRPC, bearer token on) around a model that adds one.

What is measured is the serving path of each protocol, not a framework: the model is the one of
rest_loop.py (FEATURES float32 in, the first ten plus one out), batched like the benchmark's
(32 rows, 5 ms). Prints one JSON line with the ports once it serves; stops on SIGTERM.

Usage: python serve_addone.py FEATURES [--token T] [--grpc-port G] [--port P]
"""

from __future__ import annotations

import argparse

from rest_loop import add_one

from modelpod.serving.config import BatchPolicy
from modelpod.serving.engine import InferenceEngine
from modelpod.serving.server import run
from modelpod.settings import Settings

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("features", type=int)
    parser.add_argument("--token", default="bench-token")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--grpc-port", type=int, default=0)
    opts = parser.parse_args()
    settings = Settings(token=opts.token or None, port=opts.port, grpc_port=opts.grpc_port, log_level="warning")
    engine = InferenceEngine(settings)
    engine.add_model(add_one(opts.features), name="m", version=1,
                     policy=BatchPolicy(max_batch_rows=32, max_batch_wait_ms=5))
    raise SystemExit(run(engine, settings, grpc="required", as_json=True))
