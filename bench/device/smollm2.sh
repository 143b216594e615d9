#!/bin/bash
# On the lent GPU machine, warm from two_replicas.sh: joins the default model's GGUF halves (carry
# .carry/model2), then serves it with Serve's own CLI (`serve run`) and chats with it, while
# eval-ppl runs the 20,000-token streaming perplexity in float32 on the same GPU. The halves, on
# the CPU box: g=~/.cache/sinkserve/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf;
# mkdir -p .carry/model1 .carry/model2; split -n 2 -d "$g" /tmp/half;
# mv /tmp/half00 .carry/model1/part1; mv /tmp/half01 .carry/model2/part2
set -o pipefail
cd "$(dirname "$0")/../.." || exit 1
# shellcheck disable=SC2317  # gpu_env.sh returns its status when sourced
if [ -z "$LOCAL" ]; then source bench/gpu_env.sh || exit 1; fi
export SINKSERVE_CACHE=/tmp/keep/cache PYTHONUNBUFFERED=1
L=$OUT/c_log.txt
date -u | tee "$L"
d=$SINKSERVE_CACHE/smollm2-135m-instruct-q4_1
mkdir -p "$d"
[ -f "$d/SmolLM2-135M-Instruct.Q4_1.gguf" ] || cat /tmp/keep/part1 .carry/model2/part2 >"$d/SmolLM2-135M-Instruct.Q4_1.gguf"
md5sum "$d/SmolLM2-135M-Instruct.Q4_1.gguf" | tee -a "$L"
timeout "${E_LIMIT:-545}" sinkserve eval-ppl --mode streaming --tokens "${TOKENS:-20000}" --sink 4 \
  --window 252 --dtype float32 --json "$OUT/ppl_h200_streaming_20k.json" >/tmp/eval.log 2>&1 &
EVAL=$!
serve run deployments.app:build_app model=default host=127.0.0.1 port=50051 >/tmp/serverun.log 2>&1 &
RUN=$!
for _ in $(seq 1 150); do sinkserve stats --target localhost:50051 >/tmp/stats.txt 2>&1 && ! grep -q "no replica" /tmp/stats.txt && break; sleep 2; done
tee -a "$L" </tmp/stats.txt
printf 'Name the three primary colours.\nNow say them in French.\n' | timeout 90 sinkserve chat \
  --target localhost:50051 --temperature 0 --max-new-tokens 60 2>&1 | tee -a "$L"
sinkserve stats --target localhost:50051 2>&1 | tee -a "$L"
kill -INT $RUN; timeout 20 tail --pid=$RUN -f /dev/null; kill -9 $RUN 2>/dev/null; ray stop --force >/dev/null 2>&1
grep -i "ready at\|listening\|error\|traceback" /tmp/serverun.log | head -20 | tee -a "$L"
cp /tmp/serverun.log "$OUT/serve_run_log.txt"
date -u | tee -a "$L"
wait $EVAL; echo "eval exit $?" | tee -a "$L"
tail -15 /tmp/eval.log | tee -a "$L"
date -u | tee -a "$L"
