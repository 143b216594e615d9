# shellcheck shell=bash
# Source at the start of a command on the lent GPU machine (no package registry there):
#
#     source bench/gpu_env.sh || exit 1
#
# Installs the wheel bundle made here by `python bench/gpu_bundle.py` (carry `.whl`) into
# /tmp/site, puts it and this checkout on PYTHONPATH (Ray's local cluster, its workers and Serve's
# replicas inherit the driver's environment), puts `sinkserve`, `ray`, `serve` and `py-spy` on
# PATH, and prints one line of versions. Returns non-zero if anything is missing or fails.
# Sourcing it twice reinstalls nothing when the bundle is unchanged.

_gpu_env() {
    local repo site stamp bin
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
    site="${SINKSERVE_SITE:-/tmp/site}"
    if ! compgen -G "$repo/.whl/*.whl" >/dev/null; then
        # A later call on a machine still warm from one that installed the bundle needs no wheels.
        if [ ! -f "$site/.bundle-stamp" ]; then
            echo "gpu_env: no wheels in $repo/.whl: run 'python bench/gpu_bundle.py' on the dev machine and carry .whl" >&2
            return 1
        fi
    else
        # Ray's big binaries are LZMA members (gpu_bundle.py); pip unpacks them through zipfile.
        if ! python3 -c 'import lzma' 2>/dev/null; then
            echo "gpu_env: this python3 has no lzma module: rebuild the bundle with 'python bench/gpu_bundle.py --ray-deflate'" >&2
            return 1
        fi
        stamp="$(cd "$repo/.whl" && stat -c '%n %s %Y' -- *.whl | md5sum)"
        if [ "$(cat "$site/.bundle-stamp" 2>/dev/null)" != "$stamp" ]; then
            PIP_DISABLE_PIP_VERSION_CHECK=1 python3 -m pip install -q --no-index --no-deps --no-compile \
                --no-cache-dir --upgrade --target "$site" "$repo"/.whl/*.whl || {
                echo "gpu_env: installing the bundle into $site failed" >&2
                return 1
            }
            echo "$stamp" >"$site/.bundle-stamp"
        fi
    fi

    export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}"
    export SINKSERVE_SITE="$site"
    bin="${SINKSERVE_BIN:-/tmp/bin}"
    mkdir -p "$bin" || return 1
    printf '#!/bin/sh\nexec python3 -m sinkserve.cli "$@"\n' >"$bin/sinkserve"
    chmod +x "$bin/sinkserve" || return 1
    case ":$PATH:" in *":$bin:$site/bin:"*) ;; *) export PATH="$bin:$site/bin:$PATH" ;; esac
    export RAY_USAGE_STATS_ENABLED=0
    # Nothing outside the machine can be reached: fail fast instead of waiting on the hub.
    export HF_HUB_OFFLINE=1
    # The workplace keeps NVLink multicast off on its multi-GPU hosts (device/KINDS.md); Ray's
    # workers inherit these, so they stay set wherever the driver has them.
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

    python3 - <<'EOF' || { echo "gpu_env: the bundle does not import" >&2; return 1; }
import platform

import google.protobuf
import grpc
import ray
import torch
import transformers

print(
    f"gpu_env: python {platform.python_version()} torch {torch.__version__}"
    f" ray {ray.__version__} grpcio {grpc.__version__} protobuf {google.protobuf.__version__}"
    f" transformers {transformers.__version__}"
    f" cuda {torch.cuda.is_available() and torch.cuda.get_device_name()}"
)
EOF
}

_gpu_env
_gpu_env_rc=$?
unset -f _gpu_env
# `return` when sourced (the normal use), `exit` when run as a script.
# shellcheck disable=SC2317
return "$_gpu_env_rc" 2>/dev/null || exit "$_gpu_env_rc"
