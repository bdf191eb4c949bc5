"""``modelpod serve`` with observe/'s per-second rates scaled by FACTOR, for instruction counts.

Usage: python serve_dilated.py FACTOR serve ARGS...

Under callgrind the server answers ~50-100x fewer requests a second, so a rate capped per second
of wall time (new traces: 10 a second; drift: 100 batches a second) would cover a far larger
share of the requests than at full speed. Scaling those rates by FACTOR (callgrind's req/s over
the real req/s) keeps each share per request what it is at full speed.
"""

from __future__ import annotations

import sys

from modelpod.cli import main
from modelpod.observe import drift, tracing

if __name__ == "__main__":
    factor = float(sys.argv[1])
    tracing.DEFAULT_ROOT_RATE *= factor
    drift.BATCHES_PER_S *= factor
    raise SystemExit(main(sys.argv[2:]))
