#!/usr/bin/env bash
# Smoke test of the wheel bundle on the lent GPU machine, well under 90 s; one PASS/FAIL line per
# check, exit status the number of failures (0: all passed). Run from the repository root, with
# `.whl` carried (made here by `python bench/gpu_bundle.py`):
#
#     bash bench/gpu_smoke.sh
#
# or inside a bigger command after `source bench/gpu_env.sh` (then it does not reinstall).
set -u
cd "$(dirname "$0")/.." || exit 1
started=$SECONDS
passes=0
fails=0
check() { # check NAME COMMAND...: run it, print PASS/FAIL NAME and the output's last line
    local name=$1 out rc
    shift
    out=$("$@" 2>&1)
    rc=$?
    if [ "$rc" -eq 0 ]; then
        passes=$((passes + 1))
        echo "PASS $name: $(printf '%s\n' "$out" | tail -n 1 | sed 's/^ *//')"
    else
        fails=$((fails + 1))
        echo "FAIL $name (exit $rc):"
        printf '%s\n' "$out" | tail -n 15 | sed 's/^/    /'
    fi
}

# shellcheck source=/dev/null
if ! source bench/gpu_env.sh; then
    echo "FAIL gpu_env: the bundle did not install or import"
    echo "gpu_smoke: 0 PASS, 1 FAIL"
    exit 1
fi
passes=1
echo "PASS gpu_env: installed in ${SINKSERVE_SITE} ($((SECONDS - started)) s)"

check imports python3 -c 'import ray, ray.serve, grpc_health, grpc_reflection, gguf, hdrh, redis
print("ray", ray.__version__, "from", ray.__file__)'
check closure python3 bench/gpu_bundle.py --check-installed
check "sinkserve CLI" sinkserve --help
check "ray CLI" ray --version

# One local cluster for the Ray checks; each prints its own PASS/FAIL line.
ray_out=$(timeout 75 python3 - 2>&1 <<'EOF'
import os
import time

import ray
from ray import serve

failed = 0


def report(name, ok, detail):
    global failed
    failed += not ok
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)


try:
    from ray._private.accelerators import get_accelerator_manager_for_resource

    found = get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators()
    report("ray GPU autodetect", found >= 1, f"{found} GPU(s) seen without num_gpus (sinkserve serve relies on it)")
except Exception as error:
    report("ray GPU autodetect", False, repr(error))

t = time.time()
ray.init(num_gpus=1, include_dashboard=False, log_to_driver=False)
resources = ray.cluster_resources()
report("ray.init", True, f"{time.time() - t:.1f} s")
report("cluster GPU", resources.get("GPU", 0) >= 1, f"GPU={resources.get('GPU')} CPU={resources.get('CPU')}")


@ray.remote(num_gpus=1)
def on_gpu():
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return os.environ.get("CUDA_VISIBLE_DEVICES"), name, torch.__version__


try:
    visible, name, torch_version = ray.get(on_gpu.remote(), timeout=45)
    report(
        "GPU task",
        bool(visible) and name is not None,
        f"CUDA_VISIBLE_DEVICES={visible!r} device={name!r} torch {torch_version}",
    )
except Exception as error:
    report("GPU task", False, repr(error))

try:
    t = time.time()
    serve.start(proxy_location="Disabled")
    report("serve.start", True, f"{time.time() - t:.1f} s")
    t = time.time()
    serve.shutdown()
    report("serve.shutdown", True, f"{time.time() - t:.1f} s")
except Exception as error:
    report("serve", False, repr(error))
ray.shutdown()
raise SystemExit(failed)
EOF
)
ray_rc=$?
printf '%s\n' "$ray_out" | grep -E '^(PASS|FAIL) '
ray_fails=$(printf '%s\n' "$ray_out" | grep -c '^FAIL ')
if [ "$ray_rc" -ne 0 ] && [ "$ray_fails" -eq 0 ]; then # died or timed out before reporting
    ray_fails=1
    echo "FAIL ray checks (exit $ray_rc):"
    printf '%s\n' "$ray_out" | tail -n 15 | sed 's/^/    /'
fi
fails=$((fails + ray_fails))
passes=$((passes + $(printf '%s\n' "$ray_out" | grep -c '^PASS ')))
echo "gpu_smoke: ${passes} PASS, ${fails} FAIL in $((SECONDS - started)) s"
exit "$fails"
