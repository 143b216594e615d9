#!/usr/bin/env bash
# The two doors on one load: 1,000 endless sessions through gRPC, then the same workload through
# the OpenAI Responses API (POST /v1/responses, streamed, chained by previous_response_id), against
# one `sinkserve serve` (tiny model, 2 replicas) on this box. Results: OUT/loadtest_cpu_1000_*.json.
# Run it alone (under the box's Ray lock): flock /tmp/sinkserve-ray.lock bench/openai_vs_grpc.sh docs
set -euo pipefail
OUT=${1:-docs}
SESSIONS=${SESSIONS:-1000}
DURATION=${DURATION:-60}
GRPC_PORT=${GRPC_PORT:-50077}
HTTP_PORT=${HTTP_PORT:-8177}
LOG=$(mktemp)
sinkserve serve --model tiny --replicas 2 --slots 1100 --window 252 --port "$GRPC_PORT" \
  --openai-port "$HTTP_PORT" >"$LOG" 2>&1 &
SERVE=$!
trap 'kill -INT $SERVE 2>/dev/null || true; wait $SERVE || true' EXIT
until grep -q '^ready' "$LOG"; do
  kill -0 "$SERVE" 2>/dev/null || { cat "$LOG"; exit 1; }
  sleep 2
done
grep '^ready' "$LOG"
common=(--target "localhost:$GRPC_PORT" --sessions "$SESSIONS" --duration "$DURATION" --ramp 10)
sinkserve loadtest "${common[@]}" --json "$OUT/loadtest_cpu_${SESSIONS}_grpc.json"
sinkserve loadtest "${common[@]}" --protocol openai --openai-url "http://localhost:$HTTP_PORT/v1" \
  --json "$OUT/loadtest_cpu_${SESSIONS}_openai.json"
