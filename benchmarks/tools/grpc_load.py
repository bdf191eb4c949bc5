"""Send exactly N OIP v2 ModelInfer calls over gRPC with C in flight, then exit (a load of known size).

The gRPC twin of fixed_load.py: instructions per request need a count, not a duration. One
grpc.aio channel (one HTTP/2 connection) unless ``--channels K``; each of the C workers sends its
next call when the previous one is answered. The input is one row of FEATURES float32 zeros named
``input-0`` as ``raw_input_contents`` (what perf_analyzer and tritonclient send), or as typed
``fp32_contents`` with ``--typed``. Every answer is checked for an output; anything else is counted.

Usage: python grpc_load.py HOST:PORT MODEL FEATURES N C [--typed] [--channels K] [--token T]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import time

import numpy as np
from grpc import aio

from modelpod.protocols._generated import open_inference_pb2 as pb

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def request(model: str, features: int, typed: bool) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    tensor = req.inputs.add(name="input-0", datatype="FP32", shape=[1, features])
    row = np.zeros(features, dtype=np.float32)
    if typed:
        tensor.contents.fp32_contents.extend(row.tolist())
    else:
        req.raw_input_contents.append(row.tobytes())
    return req


async def main(opts: argparse.Namespace) -> collections.Counter[str]:
    channels = [aio.insecure_channel(opts.target) for _ in range(opts.channels)]
    metadata = (("authorization", f"Bearer {opts.token}"),) if opts.token else None
    req = request(opts.model, opts.features, opts.typed)
    outcomes: collections.Counter[str] = collections.Counter()
    counts = [opts.n // opts.c + (1 if i < opts.n % opts.c else 0) for i in range(opts.c)]

    async def worker(index: int, count: int) -> None:
        call = channels[index % len(channels)].unary_unary(
            METHOD, request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString)
        for _ in range(count):
            try:
                answer = await call(req, metadata=metadata, timeout=opts.timeout)
            except aio.AioRpcError as exc:
                outcomes[f"{exc.code().name}: {exc.details()}"] += 1
                continue
            outcomes["ok" if answer.outputs else "no outputs"] += 1

    try:
        await asyncio.gather(*(worker(i, k) for i, k in enumerate(counts) if k))
    finally:
        for ch in channels:
            await ch.close()
    return outcomes


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target")
    parser.add_argument("model")
    parser.add_argument("features", type=int)
    parser.add_argument("n", type=int)
    parser.add_argument("c", type=int)
    parser.add_argument("--typed", action="store_true", help="fp32_contents instead of raw_input_contents")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--token")
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline of each call, seconds")
    options = parser.parse_args()
    started = time.perf_counter()
    result = asyncio.run(main(options))
    elapsed = time.perf_counter() - started
    print(f"{dict(result)} in {elapsed:.2f}s ({options.n / elapsed:,.0f} calls/s)")
    raise SystemExit(0 if result["ok"] == options.n else 1)
