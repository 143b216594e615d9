#!/usr/bin/env bash
# One call on the lent H200: checks, then timings (docs/BENCHMARKS.md, section 7). Each step has
# its own time limit so a stuck one cannot take the rest; everything is logged to $OUT/log.txt
# and each step's JSON lands in $OUT.  Usage: bash bench/device_run.sh 1|2
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
step() {
    local limit=$1
    shift
    echo "=== $(date -u +%FT%TZ) [limit ${limit}s] $*"
    timeout "$limit" "$@"
    echo "=== exit $?"
}
call1() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    step 110 python bench/gpu_check.py --pdl
    step 70 python bench/engine_bench.py --rows "smollm2-135m:1020:1,256" \
        --variants unfused,fused,fusedall+pdl --no-baselines --json "$OUT/engine_smollm2.json"
    step 50 python bench/profile_step.py --rows "smollm2-135m:1020:1,256" \
        --variants unfused,fused --json "$OUT/profile_smollm2.json"
    step 90 python bench/engine_bench.py --rows "llama3-8b:1020:128" --steps 30 \
        --variants unfused,fusedall --no-baselines --json "$OUT/engine_llama.json"
    step 60 python bench/engine_bench.py --rows "smollm2-135m:2044:1024" --steps 30 \
        --kv-dtype auto,fp8_e4m3 --no-baselines --json "$OUT/engine_fp8.json"
    step 50 python bench/prefill_bench.py --models smollm2-135m --repeats 3 \
        --json "$OUT/prefill_smollm2.json"
    step 45 python bench/fused_sweep.py --rows "smollm2-135m:1020:1" --budget-s 30 \
        --json "$OUT/sweep_smollm2.json"
}
call2() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    step 110 python bench/gpu_check.py --pdl
    step 90 python bench/engine_bench.py --rows "smollm2-135m:1020:1,64,256" \
        --variants unfused,fused,fused+pdl --no-baselines --json "$OUT/engine_smollm2.json"
    step 60 python bench/engine_bench.py --rows "smollm2-135m:2044:1024" --steps 30 \
        --kv-dtype auto,fp8_e4m3 --no-baselines --json "$OUT/engine_fp8.json"
    step 50 python bench/profile_step.py --rows "smollm2-135m:1020:1,256" \
        --variants unfused,fused --json "$OUT/profile_smollm2.json"
    step 85 python bench/prefill_bench.py --models smollm2-135m,llama3-8b --repeats 3 \
        --json "$OUT/prefill_smollm2.json"
    step 35 python bench/fused_sweep.py --rows "smollm2-135m:1020:1" --budget-s 22 \
        --json "$OUT/sweep_linear.json"
    step 30 python bench/fused_sweep.py --rows "smollm2-135m:2044:1024" --sweep decode --fused-rows 256 \
        --kv-dtype fp8_e4m3 --budget-s 15 --json "$OUT/sweep_decode_fp8.json"
}
call3() {
    step 60 python bench/gpu_check.py --fp8-only --pdl --steps 12 --prompts 3 --reply 100
    step 40 python bench/engine_bench.py --rows "smollm2-135m:2044:1024" --steps 30 \
        --kv-dtype auto,fp8_e4m3 --no-baselines --json "$OUT/engine_fp8.json"
    step 20 python bench/engine_bench.py --rows "smollm2-135m:1020:1,256" --variants unfused+pdl \
        --no-baselines --json "$OUT/engine_pdl.json"
    step 25 python bench/fused_sweep.py --rows "smollm2-135m:2044:1024" --sweep decode \
        --fused-rows 0 --kv-dtype fp8_e4m3 --budget-s 14 --json "$OUT/sweep_decode_fp8.json"
}
case "${1:-1}" in
    3) call3 2>&1 | tee "$OUT/log.txt" ;;
    1) call1 2>&1 | tee "$OUT/log.txt" ;;
    2) call2 2>&1 | tee "$OUT/log.txt" ;;
    *) echo "unknown plan $1" ;;
esac
