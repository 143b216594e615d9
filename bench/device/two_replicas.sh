#!/bin/bash
# On the lent GPU machine, warm from store_abb.sh (its bundle in /tmp/site, cache in /tmp/keep):
# two replicas sharing the GPU, a 60 s load test with its plot, the same with two kills; then the
# Ray-free launcher store off and on under py-spy. It also keeps the first half of the default
# model's GGUF (carry .carry/model1) in /tmp/keep for smollm2.sh: the whole file and the bundle
# do not fit one call's 64 MiB.
set -o pipefail
cd "$(dirname "$0")/../.." || exit 1
# shellcheck disable=SC2317  # gpu_env.sh returns its status when sourced
if [ -z "$LOCAL" ]; then source bench/gpu_env.sh || exit 1; fi
mkdir -p /tmp/keep && cp .carry/model1/part1 /tmp/keep/part1
export SINKSERVE_CACHE=/tmp/keep/cache PYTHONUNBUFFERED=1
L=$OUT/b_log.txt
M="${MODEL:-random:smollm2-135m}"; S="${SESSIONS:-2000}"; D="${DURATION:-60}"
date -u | tee "$L"
sinkserve serve --model "$M" --window "${WINDOW:-1020}" --slots "$S" --replicas 2 \
  --gpus-per-replica "${GPR:-0.5}" --session-store sqlite --host 127.0.0.1 --port 50051 >/tmp/serve_b.log 2>&1 &
SERVE=$!
for _ in $(seq 1 150); do grep -q "^ready" /tmp/serve_b.log && break; sleep 1; done
grep "ready" /tmp/serve_b.log | tee -a "$L" || { tail -40 /tmp/serve_b.log | tee -a "$L"; exit 1; }
date -u | tee -a "$L"
timeout 110 sinkserve loadtest --target localhost:50051 --sessions "$S" --duration "$D" --ramp 10 \
  --json "$OUT/loadtest_ray_h200.json" --plot "$OUT/loadtest_ray_h200.png" 2>&1 | tee -a "$L"
sinkserve stats --target localhost:50051 2>&1 | tee -a "$L"
timeout 110 sinkserve loadtest --target localhost:50051 --sessions "$S" --duration "$D" --ramp 10 \
  --chaos-kill-every 15 --chaos-target alternate --chaos-kills 2 \
  --json "$OUT/loadtest_ray_h200_kills.json" 2>&1 | tee -a "$L"
sinkserve stats --target localhost:50051 2>&1 | tee -a "$L"
kill -INT $SERVE; timeout 60 tail --pid=$SERVE -f /dev/null; kill -9 $SERVE 2>/dev/null
grep -i "error\|traceback" /tmp/serve_b.log | head -20 | tee -a "$L"
date -u | tee -a "$L"
timeout "${P_LIMIT:-200}" python3 bench/serve_bench.py --model "$M" --window "${WINDOW:-1020}" \
  --sessions "$S" --duration "${PDURATION:-30}" --ramp 8 --arms standalone,standalone+store \
  --profile --out /tmp/sbp --json "$OUT/serve_bench_profile_h200.json" 2>&1 | tee -a "$L"
cp /tmp/sbp/standalone_replica_profile.txt "$OUT/profile_store_off.txt"
cp "/tmp/sbp/standalone+store_replica_profile.txt" "$OUT/profile_store_on.txt"
date -u | tee -a "$L"
