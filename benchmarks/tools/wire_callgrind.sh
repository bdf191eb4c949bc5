#!/usr/bin/env bash
# Instructions per request of the server, per wire format: JSON over REST, gRPC raw, gRPC typed.
#
# Usage: benchmarks/tools/wire_callgrind.sh [FEATURES [N1 N2 [MODES]]]
#   FEATURES: floats per request (20: workload A's row, 512: workload B's); MODES: "json grpc grpctyped"
#
# The server (tools/serve_addone.py: `modelpod serve`'s REST and gRPC servers, bearer token on,
# around a model that adds one, batches of 32 rows / 5 ms) runs under callgrind with instrumentation
# off while it starts. Per mode: a warm-up of 300 requests, N1 requests, a dump, N2 - N1 more, a
# dump; the second dump over N2 - N1 is the instructions per request (every thread of the server:
# the event loop, gRPC's own threads). Clients: tools/fixed_load.py (REST, 64 connections) and
# tools/grpc_load.py (gRPC, 64 calls in flight on one channel), both outside the measured process.
# SRC=path/to/src measures another tree's sources (an A/B against a checkout of an older commit).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
features=${1:-20}
n1=${2:-1000}
n2=${3:-4000}
modes=${4:-json grpc grpctyped}
work=$(mktemp -d)
export PYTHONPATH=${SRC:-$repo/src} OMP_NUM_THREADS=1
trap 'for p in $(cat "$work"/pids 2>/dev/null); do kill "$p" 2>/dev/null || true; done; [ -n "${KEEP:-}" ] && echo "kept $work" || rm -rf "$work"' EXIT

"$py" -c "import json, sys; f = int(sys.argv[1]); print(json.dumps({'inputs': [{'name': 'input-0', 'shape': [1, f], \
'datatype': 'FP32', 'data': [round(0.001 * i, 6) for i in range(f)]}]}))" "$features" >"$work/body.json"
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/cg.%p" \
    "$py" "$here/serve_addone.py" "$features" --token bench-token >"$work/server.out" 2>"$work/server.log" &
pid=$!
echo $pid >>"$work/pids"
for _ in $(seq 600); do [ -s "$work/server.out" ] && break; sleep 0.5; done
rest=$("$py" -c "import json, sys; print(json.loads(open(sys.argv[1]).readline())['rest'])" "$work/server.out")
grpc=$("$py" -c "import json, sys; print(json.loads(open(sys.argv[1]).readline())['grpc'])" "$work/server.out")

load() {  # MODE COUNT
    case $1 in
        json) "$py" "$here/fixed_load.py" "$rest/v2/models/m/infer" "$work/body.json" "$2" 64 \
                  "Authorization: Bearer bench-token" ;;
        grpc) "$py" "$here/grpc_load.py" "$grpc" m "$features" "$2" 64 --token bench-token ;;
        grpctyped) "$py" "$here/grpc_load.py" "$grpc" m "$features" "$2" 64 --token bench-token --typed ;;
        *) echo "unknown mode $1" >&2; return 2 ;;
    esac
}
collected() { grep -h "^summary:" "$1" | awk '{print $2}'; }

for mode in $modes; do load "$mode" 300 >/dev/null; done
callgrind_control -i on "$pid" >/dev/null
dumps=0
for mode in $modes; do
    load "$mode" "$n1" >/dev/null
    callgrind_control -d "$pid" >/dev/null
    load "$mode" $((n2 - n1)) >/dev/null
    callgrind_control -d "$pid" >/dev/null
    dumps=$((dumps + 2))
    files=$(ls "$work"/cg."$pid".* | sort -t. -k3 -n)
    first=$(for f in $files; do collected "$f"; done | sed -n "$((dumps - 1))p")
    second=$(for f in $files; do collected "$f"; done | sed -n "${dumps}p")
    echo "$mode ($features floats): $((second / (n2 - n1))) instructions/request over $((n2 - n1)) requests" \
         "($((first / n1)) over the first $n1)"
done
