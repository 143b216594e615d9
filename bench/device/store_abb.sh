#!/bin/bash
# On the lent GPU machine (docs/BENCHMARKS.md section 5, "The session store, off and on"):
# carry .whl (python bench/gpu_bundle.py), .carry/cache (the tokenizer and texts from
# $SINKSERVE_CACHE) and run `bash bench/device/store_abb.sh`. Installs the bundle, keeps the cache
# in /tmp/keep for later calls on the same (warm) machine, and runs the Ray arms store off, on, on,
# off. Results in $OUT. LOCAL=1 skips the bundle (a dry run on the CPU box with MODEL=tiny etc.).
set -o pipefail
cd "$(dirname "$0")/../.." || exit 1
# shellcheck disable=SC2317  # gpu_env.sh returns its status when sourced
if [ -z "$LOCAL" ]; then source bench/gpu_env.sh || exit 1; fi
mkdir -p /tmp/keep && cp -r .carry/cache /tmp/keep/
export SINKSERVE_CACHE=/tmp/keep/cache PYTHONUNBUFFERED=1
L=$OUT/a_log.txt
date -u | tee "$L"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>&1 | tee -a "$L"
timeout "${A_LIMIT:-540}" python3 bench/serve_bench.py --model "${MODEL:-random:smollm2-135m}" \
  --window "${WINDOW:-1020}" --sessions "${SESSIONS:-2000}" --duration "${DURATION:-30}" \
  --ramp "${RAMP:-8}" --arms "${ARMS:-ray,ray+store,ray+store,ray}" --out /tmp/sba \
  --json "$OUT/serve_bench_store_h200.json" 2>&1 | tee -a "$L"
date -u | tee -a "$L"
