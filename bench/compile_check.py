"""Compile every Triton kernel the engine launches for sm_90 (H100/H200) on a machine with no GPU.

Triton's interpreter (the CPU test path) runs kernels in numpy and forgives what the compiler does
not: shape mismatches in binary ops, types that differ between the branches of an `if`, operand
sizes `tl.dot` refuses. This script installs a stand-in driver that reports an sm_90 target and
turns every launch into a compile (Triton's own `warmup` path, down to a cubin through the ptxas
Triton ships), then runs real engine paths on CPU tensors: the graph decode step (decode_prep and
the op kernels, at 1, 128 and 256 rows), a mixed step and a prefill step, with an arena in the
model dtype and an fp8 arena, and a Qwen3 layer (its per-head q/k norm). Outputs are garbage (nothing runs); what matters is that every
kernel compiles. For each it prints registers, spills and shared memory (cuobjdump's report).

    python bench/compile_check.py
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, do not interpret

import pathlib
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from sinkcache.config import PRESETS, CacheGeometry, ModelShape
from sinkcache.core.arena import FP8, KVArena
from sinkcache.core.attention.backend import triton_backend
from sinkcache.core.model import Transformer
from sinkcache.core.plan import PrefillChunk, StepPlan
from sinkcache.core.runner import ModelRunner
from sinkcache.core.sampling import SamplerVariant


class _CompileOnlyDriver:
    """Enough of a CUDA driver for Triton to compile (not launch) for sm_90."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


COMPILED: dict[str, object] = {}


def _compile_only(original):
    def run(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        COMPILED.setdefault(f"{self.fn.__name__}#{kernel.hash[:8]}", kernel)
        return kernel

    return run


def resources(kernel) -> str:
    """registers / spills / shared memory of a compiled kernel, from cuobjdump."""
    tool = pathlib.Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run(
            [str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return (
        f"regs {regs.group(1) if regs else '?'}, stack {stack.group(1) if stack else '?'}, "
        f"shared {kernel.metadata.shared} B"
    )


# Qwen3-0.6B's layer shape: its per-head q/k norm runs the norm kernel on head_dim-wide rows.
QWEN3_0_6B = ModelShape(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_layers=28,
    num_heads=16,
    num_kv_heads=8,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    qk_norm=True,
    family="qwen3",
)


def small(shape, layers: int = 1, vocab: int = 512):
    """The preset's layer shapes with fewer layers and a small vocabulary (CPU memory)."""
    return shape.replace(num_layers=layers, vocab_size=vocab, tie_word_embeddings=False)


def exercise(shape, kv_dtype, rows: int, label: str) -> None:
    model = Transformer(shape).to(torch.bfloat16).eval()
    arena = KVArena(shape, CacheGeometry(4, 1020), rows + 1, torch.bfloat16, "cpu", kv_dtype)
    for _ in range(rows):
        arena.allocate()
    runner = ModelRunner(model, arena, triton_backend())
    slots = torch.arange(rows)
    runner.decode_step_tensors(slots, SamplerVariant.GREEDY)  # graph decode: decode_prep, layers
    chunks = [PrefillChunk(0, list(range(300)), 0)]
    runner.forward_logits(StepPlan(decode_slots=[1] if rows > 1 else [], prefill=chunks))
    print(f"  {label}: {len(COMPILED)} kernels compiled so far", flush=True)


def main() -> int:
    # Nothing runs, so outputs keep what they were made with: zeros, valid as indices.
    empty, empty_like = torch.empty, torch.empty_like
    torch.empty = lambda *a, **k: torch.zeros(*a, **k)
    torch.empty_like = lambda *a, **k: torch.zeros_like(*a, **k)
    driver.set_active(_CompileOnlyDriver())
    JITFunction.run = _compile_only(JITFunction.run)
    torch.manual_seed(0)
    cases = [
        ("smollm2", small(PRESETS["smollm2-135m"]), None, 1),
        ("smollm2", small(PRESETS["smollm2-135m"]), None, 256),
        ("smollm2 fp8", small(PRESETS["smollm2-135m"]), FP8, 1),
        ("smollm2 fp8", small(PRESETS["smollm2-135m"]), FP8, 256),
        ("llama3-8b", small(PRESETS["llama3-8b"]), None, 128),
        ("llama3-8b fp8", small(PRESETS["llama3-8b"]), FP8, 1),
        ("qwen3 q/k norm", small(QWEN3_0_6B), None, 128),
    ]
    failures = 0
    for name, shape, kv_dtype, rows in cases:
        label = f"{name} x{rows}"
        try:
            exercise(shape, kv_dtype, rows, label)
        except Exception as error:  # report every failing case
            failures += 1
            print(f"FAILED {label}: {type(error).__name__}: {error}", flush=True)
    torch.empty, torch.empty_like = empty, empty_like
    for key, kernel in sorted(COMPILED.items()):
        print(f"{key:45s} {resources(kernel)}")
    print(f"{len(COMPILED)} kernels compiled, {failures} failing cases")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
