"""What a request's token check costs on the hot path: the scoped check (SHA-256 lookup, scope, model,
rate bucket) next to the single-token ``hmac.compare_digest`` it replaced, and next to nothing.

Usage: .venv/bin/python benchmarks/auth.py [--n N]

Prints nanoseconds per check and the ratio to the old check; a request at workload A's rate
(~20k req/s) has ~50 000 ns to spend in all, so the line to read is the absolute cost.
"""

from __future__ import annotations

import argparse
import hmac
import time
from collections.abc import Callable

from modelpod.protocols.auth import INFER, Auth, Bucket, Grant, digest


def per_call_ns(fn: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(n):
        fn()
    return (time.perf_counter_ns() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    n = ap.parse_args().n
    token = "tok-3f9c2d7e5b1a8c0d"
    header = f"Bearer {token}"
    secret = token.encode()

    def old() -> None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), secret):
            raise AssertionError

    single = Auth.single(token)
    limited = Auth({digest(token): Grant("app", frozenset({INFER}), frozenset({"churn"}),
                                         Bucket(rate=1e12, burst=1e12))})
    base = per_call_ns(old, n)
    rows = [("hmac.compare_digest (before)", base),
            ("Auth.check, one token", per_call_ns(lambda: single.check(header, INFER, "churn"), n)),
            ("Auth.check, scoped + model + rate", per_call_ns(lambda: limited.check(header, INFER, "churn"), n))]
    for name, ns in rows:
        print(f"{name:<36} {ns:8.0f} ns/check   {ns / base:5.2f}x the old check")


if __name__ == "__main__":
    main()
