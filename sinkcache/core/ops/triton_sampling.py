"""Top-k / top-p without sorting: each row's nucleus threshold found by a 16-way search.

A token with probability p is in the nucleus when fewer than top_k tokens, and less than top_p of
the mass, lie strictly above p (the rule the CPU rejection sampler uses). Both counts fall as p
rises, so the nucleus is {p >= tau} for one threshold tau per row, and tau is the smallest float
for which the rule holds. Non-negative float32 values order like their bit patterns, so tau is
found exactly by searching the 2^31 patterns: each pass over the row tests 16 candidate
thresholds at once (one read of the row, 16 comparisons per element) and keeps the sixteenth of
the range that holds the switch, so 8 passes pin it to the bit.

Sorting a [2000, 49152] batch to do the same took 11.6 ms a step on the H100; this kernel takes
3.2 ms (it reads each row 8 times and never writes it). Grid and passes depend on shapes only: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sinkcache.core.attention.triton_tiles import running_interpreted, tile_count

FANOUT = 16
PASSES = 8  # 16^8 = 2^32 >= the 2^31 + 1 candidate patterns (0 .. +inf, and "none")
INF_BITS = 0x7F800000


@triton.jit
def _nucleus_threshold_kernel(
    probs_ptr,
    row_stride,
    vocab,
    top_p_ptr,
    top_k_ptr,
    out_ptr,
    BLOCK: tl.constexpr,
    FANOUT: tl.constexpr,
    PASSES: tl.constexpr,
    INF_BITS: tl.constexpr,
    INTERPRETER: tl.constexpr,
    MAX_TILES: tl.constexpr,
):
    row = tl.program_id(0)
    base = probs_ptr + row.to(tl.int64) * row_stride
    top_p = tl.load(top_p_ptr + row)
    top_k = tl.load(top_k_ptr + row).to(tl.int32)
    pick = tl.arange(0, FANOUT)
    # The rule fails at `lo` (-1: below every candidate) and holds at `hi` (+inf: nothing above).
    lo = tl.full((), -1, tl.int64)
    hi = tl.full((), INF_BITS, tl.int64)
    for _ in range(PASSES):
        step = (hi - lo + FANOUT - 1) // FANOUT
        bits = tl.minimum(lo + step * (pick + 1).to(tl.int64), hi)  # [FANOUT], the last is hi
        threshold = bits.to(tl.int32).to(tl.float32, bitcast=True)
        # Elementwise accumulators; one reduction per pass, not per tile.
        count_acc = tl.zeros((FANOUT, BLOCK), tl.int32)
        mass_acc = tl.zeros((FANOUT, BLOCK), tl.float32)
        for tile in range(tile_count(vocab, BLOCK, INTERPRETER, MAX_TILES)):
            offs = tile * BLOCK + tl.arange(0, BLOCK)
            p = tl.load(base + offs, mask=offs < vocab, other=0.0)
            above = p[None, :] > threshold[:, None]  # [FANOUT, BLOCK]
            count_acc += above.to(tl.int32)
            mass_acc += tl.where(above, p[None, :], 0.0)
        count = tl.sum(count_acc, axis=1)
        mass = tl.sum(mass_acc, axis=1)
        holds = (count < top_k) & (mass < top_p)
        first = tl.min(tl.where(holds, pick, FANOUT), axis=0)
        new_hi = tl.sum(tl.where(pick == first, bits, 0), axis=0)
        new_lo = tl.sum(tl.where(pick == first - 1, bits, 0), axis=0)
        lo = tl.where(first > 0, new_lo, lo)
        hi = new_hi
    tl.store(out_ptr + row, hi.to(tl.int32).to(tl.float32, bitcast=True))


def nucleus_threshold(
    probs: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    block: int = 128,  # H100, B=2000, V=49152: 3.2 ms (256: 5.8 ms, 512: 5.0 ms; 4 warps: 4-4.8)
    num_warps: int = 8,
) -> torch.Tensor:
    """probs [B, V] float32 (rows of a distribution), top_p [B] float32, top_k [B] (V: off) ->
    tau [B] float32 such that the nucleus of row b is exactly {i : probs[b, i] >= tau[b]}."""
    batch, vocab = probs.shape
    probs = probs.contiguous()
    out = torch.empty(batch, dtype=torch.float32, device=probs.device)
    block = min(block, triton.next_power_of_2(vocab))
    interpreter = running_interpreted(_nucleus_threshold_kernel)
    _nucleus_threshold_kernel[(batch,)](
        probs,
        probs.stride(0),
        vocab,
        top_p.to(torch.float32).contiguous(),
        top_k.to(torch.int32).contiguous(),
        out,
        BLOCK=block,
        FANOUT=FANOUT,
        PASSES=PASSES,
        INF_BITS=INF_BITS,
        INTERPRETER=interpreter,
        MAX_TILES=triton.cdiv(vocab, block) if interpreter else 0,
        num_warps=num_warps,
    )
    return out
