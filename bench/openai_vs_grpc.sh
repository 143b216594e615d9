#!/usr/bin/env bash
# The two doors on one load: 1,000 endless sessions through gRPC, then the same workload through
# the OpenAI Responses API (POST /v1/responses, streamed, chained by previous_response_id), each
# against a fresh `sinkserve serve` (tiny model, 2 replicas) on this box, so that neither arm
# inherits the other's sessions. Results: OUT/loadtest_cpu_<sessions>_{grpc,openai}.json.
# Run it alone (under the box's Ray lock): flock /tmp/sinkserve-ray.lock bench/openai_vs_grpc.sh docs
set -euo pipefail
OUT=${1:-docs}
SESSIONS=${SESSIONS:-1000}
DURATION=${DURATION:-60}
GRPC_PORT=${GRPC_PORT:-50077}
HTTP_PORT=${HTTP_PORT:-8177}

arm() {  # arm PROTOCOL: serve, load, stop
  local log serve
  log=$(mktemp)
  sinkserve serve --model tiny --replicas 2 --slots 1100 --window 252 --port "$GRPC_PORT" \
    --openai-port "$HTTP_PORT" >"$log" 2>&1 &
  serve=$!
  until grep -q '^ready' "$log"; do
    kill -0 "$serve" 2>/dev/null || { cat "$log"; return 1; }
    sleep 2
  done
  grep '^ready' "$log"
  sinkserve loadtest --target "localhost:$GRPC_PORT" --sessions "$SESSIONS" \
    --duration "$DURATION" --ramp 10 --protocol "$1" --openai-url "http://localhost:$HTTP_PORT/v1" \
    --json "$OUT/loadtest_cpu_${SESSIONS}_$1.json"
  kill -INT "$serve"
  wait "$serve" || true
}

arm grpc
arm openai
