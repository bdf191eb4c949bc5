#!/usr/bin/env bash
# Instructions per request of a whole `modelpod serve` (workload A) with observability off and on.
#
# Usage: benchmarks/tools/observe_callgrind.sh MODEL_DIR [N1 N2]
#   MODEL_DIR: workload A's files (model.skops, sample.npy, body.json; benchmarks/.work/models/A)
#
# For each mode the server runs under callgrind with instrumentation off while it starts (so the
# imports cost no time), then: a warm-up, `callgrind_control -i on`, N1 requests (tools/fixed_load.py,
# 64 connections), a dump (`-d` zeroes the counters), N2 - N1 more requests, a pause for the
# background threads (drift, payload sink, span exporter), a dump. The second dump over N2 - N1 is
# the instructions per request, background threads included; the first (over N1) is printed too.
# "on" is issue 16's defaults: tracing to an OTLP/HTTP receiver, payload_log to a file, drift.
# Callgrind runs the server ~100x slower, so rates capped per second of wall time (new traces,
# drift's batches) would cover a far larger share of the requests than at full speed: "on" runs
# through tools/serve_dilated.py with those rates scaled by callgrind's req/s (timed on "off")
# over REAL_RPS (default 20000, workload A c=64 on a quiet machine of this kind).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
py=$repo/.venv/bin/python
models=${1:?MODEL_DIR}
n1=${2:-1000}
n2=${3:-4000}
work=$(mktemp -d)
export MODELPOD_HOME=$work/home PYTHONPATH=$repo/src OMP_NUM_THREADS=1
trap 'for p in $(cat "$work"/pids 2>/dev/null); do kill "$p" 2>/dev/null || true; done; [ -n "${KEEP:-}" ] && echo "kept $work" || rm -rf "$work"' EXIT

"$py" -c "import numpy as np; np.save('$work/ref.npy', np.random.default_rng(0).normal(size=(2000, 20)).astype(np.float32))"
"$py" -m modelpod pack "$models/model.skops" --name logreg --sample "$models/sample.npy" \
    --reference "$work/ref.npy" --json >/dev/null
echo '{"drift": "off"}' >"$work/off.yaml"
echo "{\"payload_log\": {\"sink\": \"$work/payloads.jsonl\"}}" >"$work/on.yaml"
# One feature at a time (MODES="tracing payload drift"):
cp "$work/off.yaml" "$work/tracing.yaml"
echo "{\"drift\": \"off\", \"payload_log\": {\"sink\": \"$work/payloads.jsonl\"}}" >"$work/payload.yaml"
echo '{}' >"$work/drift.yaml"
# An OTLP/HTTP receiver that answers 200 to every export.
"$py" - "$work/otlp.port" <<'EOF' &
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", "0"))); self.send_response(200)
        self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
open(sys.argv[1], "w").write(str(s.server_port)); s.serve_forever()
EOF
echo $! >>"$work/pids"
for _ in $(seq 100); do [ -s "$work/otlp.port" ] && break; sleep 0.1; done

free_port() { "$py" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }
collected() { grep -h "^summary:" "$1" | awk '{print $2}'; }

factor=${FACTOR:-1}
for mode in ${MODES:-off on}; do
    port=$(free_port)
    env=()
    case $mode in on|tracing) env=(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$(cat "$work/otlp.port")" OTEL_SERVICE_NAME=bench) ;; esac
    env "${env[@]}" valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/cg-$mode.%p" \
        "$py" "$here/serve_dilated.py" "$factor" serve logreg --config "$work/$mode.yaml" --host 127.0.0.1 --port "$port" \
        --max-batch-rows 32 --max-batch-wait-ms 5 --no-grpc >"$work/server-$mode.log" 2>&1 &
    pid=$!
    echo $pid >>"$work/pids"
    url=http://127.0.0.1:$port/v2/models/logreg/infer
    for _ in $(seq 600); do curl -sf -o /dev/null "http://127.0.0.1:$port/v2/health/ready" && break; sleep 0.5; done
    "$py" "$here/fixed_load.py" "$url" "$models/body.json" 500 64 >/dev/null
    callgrind_control -i on "$pid" >/dev/null
    "$py" "$here/fixed_load.py" "$url" "$models/body.json" "$n1" 64 >/dev/null
    callgrind_control -d "$pid" >/dev/null
    t0=$(date +%s.%N)
    "$py" "$here/fixed_load.py" "$url" "$models/body.json" $((n2 - n1)) 64 >/dev/null
    t1=$(date +%s.%N)
    sleep 3  # the background threads finish what the last requests handed them
    t2=$(date +%s.%N)
    callgrind_control -d "$pid" >/dev/null
    # Idle: what the threads' timed wake-ups cost a second with no requests (callgrind stretches
    # the window ~100x, so per request they would count ~100x what they do at full speed).
    sleep "${IDLE_S:-20}"
    t3=$(date +%s.%N)
    callgrind_control -d "$pid" >/dev/null
    kill "$pid"; wait "$pid" || true
    files=$(ls "$work"/cg-$mode.$pid.* | sort -t. -k3 -n)
    first=$(for f in $files; do collected "$f"; done | sed -n 1p)
    second=$(for f in $files; do collected "$f"; done | sed -n 2p)
    idle=$(for f in $files; do collected "$f"; done | sed -n 3p)
    rps=$("$py" -c "print(round($((n2 - n1)) / ($t1 - $t0), 1))")
    net=$("$py" -c "w = $t2 - $t0; i = $idle / ($t3 - $t2); print(int(($second - i * w) / $((n2 - n1))), int(i))")
    echo "$mode: $((second / (n2 - n1))) instructions/request over $((n2 - n1)) requests ($((first / n1)) over the first $n1); $rps req/s under callgrind, rates x $factor"
    echo "  less the idle wake-ups (instructions/request, idle instructions/s): $net"
    [ "$mode" = off ] && factor=$("$py" -c "print($rps / ${REAL_RPS:-20000})")
    [ -f "$work/payloads.jsonl" ] && echo "  payload lines: $(wc -l <"$work/payloads.jsonl")"
done
