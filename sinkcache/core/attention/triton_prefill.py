"""Prefill attention over sink + ring arena slots: a fused flash-attention style Triton kernel.

Each row is a chunk of consecutive queries already written into its slot (at most `window` long).
One program owns (query block, row, kv_head): BLOCK_Q queries times the G query heads of that kv
head, packed as BLOCK_Q * next_pow2(G) rows of one tile so each K/V tile is read once per group.
It streams the slot's valid keys with an online softmax in fp32, q_sink against index < sink.

Causality is decided by *ages*, counted back from the slot's newest token (seen - 1): query i of a
chunk of L has age L - 1 - i, the key at index j has age (last - j) for a sink and
(newest_ring_index - j) mod W in the ring, and the query sees the key iff key age >= query age.
This is the reference's `kt <= tq` on token counters, kept in int32 however long the stream.

The grid is (blocks of the longest possible chunk, R, Hkv); the bound min(window, T) is known on
the host, and programs past their row's chunk exit at once. No host sync, graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sinkcache.core.attention.triton_tiles import (
    LOG2E,
    dot_f32,
    gdc_enter,
    load_kv_tile,
    pdl_enabled,
    pdl_launch,
    running_interpreted,
    tile_count,
)

# Ages past this never decide anything (query ages are < window); caps sink ages to fit int32.
_AGE_CAP = tl.constexpr(1 << 30)


@triton.jit
def _prefill_tile(
    q,  # [BLOCK_M, HEAD_DIM] input dtype
    q_sink,  # [BLOCK_M, HEAD_DIM] input dtype
    query_age,  # [BLOCK_M] int32
    k_base,
    v_base,
    k_scale_base,
    v_scale_base,
    stride_k_pos,
    stride_v_pos,
    start,
    n_valid,
    newest_ring,
    last_capped,
    window,
    m_i,  # [BLOCK_M] fp32, running max (log2 units)
    l_i,  # [BLOCK_M] fp32
    acc,  # [BLOCK_M, HEAD_DIM] fp32
    qk_scale,
    SINK: tl.constexpr,
    SINK_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    QUANT: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """Fold keys [start, start + BLOCK_N) ∩ [0, n_valid) into the running softmax, causally."""
    pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    in_range = pos < n_valid
    k, v, k_scale, v_scale = load_kv_tile(
        k_base,
        v_base,
        k_scale_base,
        v_scale_base,
        stride_k_pos,
        stride_v_pos,
        pos,
        in_range,
        HEAD_DIM,
        QUANT,
    )  # fmt: skip  [BLOCK_N, HEAD_DIM] each
    if QUANT:  # e4m3 codes; the scales are applied to scores and probabilities
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    scores = dot_f32(q, tl.trans(k), INTERPRETER)  # [BLOCK_M, BLOCK_N]
    ring_age = newest_ring - pos
    key_age = tl.where(ring_age < 0, ring_age + window, ring_age)  # [BLOCK_N]
    if SINK_TILE:
        sink_scores = dot_f32(q_sink, tl.trans(k), INTERPRETER)
        is_sink = pos < SINK
        scores = tl.where(is_sink[None, :], sink_scores, scores)
        key_age = tl.where(is_sink, last_capped - pos, key_age)
    if QUANT:
        scores = scores * k_scale[None, :]
    visible = in_range[None, :] & (key_age[None, :] >= query_age[:, None])
    scores = tl.where(visible, scores * qk_scale, float("-inf"))
    # A query may see nothing in this tile (nor before it): keep exp2 away from (-inf) - (-inf).
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(scores - m_safe[:, None])  # [BLOCK_M, BLOCK_N]
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if QUANT:
        p = p * v_scale[None, :]
    acc = acc * alpha[:, None] + dot_f32(p.to(v.dtype), v, INTERPRETER)
    return m_new, l_i, acc


@triton.jit
def _prefill_kernel(
    q_ptr,
    q_sink_ptr,
    k_ptr,
    v_ptr,
    k_scale_ptr,
    v_scale_ptr,
    row_slots_ptr,
    cu_seqlens_ptr,
    row_seen_ptr,
    out_ptr,
    qk_scale,
    stride_q_tok,
    stride_q_head,
    stride_qs_tok,
    stride_qs_head,
    stride_k_slot,
    stride_k_head,
    stride_k_pos,
    stride_v_slot,
    stride_v_head,
    stride_v_pos,
    stride_ks_slot,
    stride_ks_head,
    stride_vs_slot,
    stride_vs_head,
    stride_o_tok,
    stride_o_head,
    capacity,
    window,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SINK: tl.constexpr,
    SINK_TILES: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    QUANT: tl.constexpr,
    INTERPRETER: tl.constexpr,
    MAX_TILES: tl.constexpr,
    PDL: tl.constexpr,
):
    """One (query block, row, kv_head): BLOCK_Q queries x GROUP heads against the row's slot."""
    gdc_enter(PDL)
    q_block = tl.program_id(0)
    row = tl.program_id(1)
    kv_head = tl.program_id(2)
    chunk_start = tl.load(cu_seqlens_ptr + row).to(tl.int64)
    length = (tl.load(cu_seqlens_ptr + row + 1) - chunk_start).to(tl.int32)
    if q_block * BLOCK_Q < length:
        sink_end: tl.constexpr = SINK_TILES * BLOCK_N
        BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
        seen = tl.load(row_seen_ptr + row).to(tl.int64)
        last = seen - 1
        n_valid = tl.minimum(seen, capacity).to(tl.int32)
        # Physical index of the newest ring token (meaningful once last >= SINK).
        newest_ring = (SINK + tl.maximum(last - SINK, 0) % window).to(tl.int32)
        last_capped = tl.minimum(last, _AGE_CAP).to(tl.int32)

        slot = tl.load(row_slots_ptr + row).to(tl.int64)
        k_base = k_ptr + slot * stride_k_slot + kv_head.to(tl.int64) * stride_k_head
        v_base = v_ptr + slot * stride_v_slot + kv_head.to(tl.int64) * stride_v_head
        ks_base = k_scale_ptr + slot * stride_ks_slot + kv_head.to(tl.int64) * stride_ks_head
        vs_base = v_scale_ptr + slot * stride_vs_slot + kv_head.to(tl.int64) * stride_vs_head

        # Tile row m is query q_block * BLOCK_Q + m // GROUP_PAD of the chunk, head m % GROUP_PAD.
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        query = q_block * BLOCK_Q + offs_m // GROUP_PAD  # [BLOCK_M] index in the chunk
        member = offs_m % GROUP_PAD
        row_ok = (query < length) & (member < GROUP)
        token = chunk_start + query  # [BLOCK_M] int64
        head = kv_head * GROUP + member
        q = tl.load(
            q_ptr + token[:, None] * stride_q_tok + head[:, None] * stride_q_head + offs_d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )  # [BLOCK_M, HEAD_DIM]
        query_age = length - 1 - query  # [BLOCK_M]

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        if SINK > 0:
            q_sink = tl.load(
                q_sink_ptr
                + token[:, None] * stride_qs_tok
                + head[:, None] * stride_qs_head
                + offs_d[None, :],
                mask=row_ok[:, None],
                other=0.0,
            )  # [BLOCK_M, HEAD_DIM]
            for tile in range(SINK_TILES):
                m_i, l_i, acc = _prefill_tile(
                    q, q_sink, query_age, k_base, v_base, ks_base, vs_base,
                    stride_k_pos, stride_v_pos,
                    tile * BLOCK_N, n_valid, newest_ring, last_capped, window,
                    m_i, l_i, acc, qk_scale,
                    SINK, True, BLOCK_N, HEAD_DIM, QUANT, INTERPRETER,
                )  # fmt: skip
        for tile in range(tile_count(n_valid - sink_end, BLOCK_N, INTERPRETER, MAX_TILES)):
            m_i, l_i, acc = _prefill_tile(
                q, q, query_age, k_base, v_base, ks_base, vs_base, stride_k_pos, stride_v_pos,
                sink_end + tile * BLOCK_N, n_valid, newest_ring, last_capped, window,
                m_i, l_i, acc, qk_scale,
                SINK, False, BLOCK_N, HEAD_DIM, QUANT, INTERPRETER,
            )  # fmt: skip

        # Every real query sees at least its own key; l_i == 0 only on padding rows.
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr
            + token[:, None] * stride_o_tok
            + head[:, None] * stride_o_head
            + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None],
        )


def default_config(head_dim: int) -> dict:
    """Tile shape for the H100: BLOCK_M packed query rows (queries x group) by BLOCK_N keys.

    From bench/kernel_check.py --sweep on an H100 at C=2048: for D=128 (Llama-3-8B heads) 128 x 64
    with 8 warps and 3 stages ran at 230-250 TFLOP/s against 130-140 for 64 x 64 with 4 warps;
    for D=64 (SmolLM2) 64 x 64 with 4 warps was best, the larger tile 1.3-1.6x slower.
    """
    if head_dim >= 128:
        return {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}
    return {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3}


def prefill_attention_launch(
    q: torch.Tensor,
    q_sink: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    row_slots: torch.Tensor,
    cu_seqlens: torch.Tensor,
    row_seen: torch.Tensor,
    sink: int,
    window: int,
    scale: float,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """prefill_attention with the launch choices exposed (tests use small tiles).

    `k_scale`, `v_scale` [N, Hkv, C] float32: the per-position scales of an fp8 arena."""
    total, heads, head_dim = q.shape
    _, kv_heads, capacity, _ = k_cache.shape
    group = heads // kv_heads
    rows = row_slots.shape[0]
    assert heads == group * kv_heads, "query heads must be a multiple of kv heads"
    assert head_dim & (head_dim - 1) == 0 and head_dim >= 16, (
        "head_dim must be a power of two >= 16"
    )
    assert sink + window == capacity, "arena capacity must be sink + window"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "arena rows must be contiguous"
    assert rows < 65536, "rows ride on grid axis 1"
    quant = k_scale is not None
    if quant:
        assert v_scale is not None and k_scale.stride(-1) == 1 and v_scale.stride(-1) == 1
        assert k_scale.shape == k_cache.shape[:3] and v_scale.shape == v_cache.shape[:3]
    else:
        k_scale = v_scale = k_cache  # unused
    q = q if q.stride(-1) == 1 else q.contiguous()
    q_sink = q_sink if q_sink.stride(-1) == 1 else q_sink.contiguous()
    if out is None:
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)  # [T, H, D]
    if total == 0 or rows == 0:
        return out

    config = default_config(head_dim)
    block_n = block_n or config["block_n"]
    group_pad = triton.next_power_of_2(group)
    # At least 16 packed rows: tl.dot's smallest M.
    block_q = max(1, (block_m or config["block_m"]) // group_pad, triton.cdiv(16, group_pad))
    sink_tiles = triton.cdiv(sink, block_n)
    recent_tiles = triton.cdiv(max(capacity - sink_tiles * block_n, 0), block_n)
    q_blocks = triton.cdiv(min(window, total), block_q)  # no chunk is longer than this
    interpreter = running_interpreted(_prefill_kernel)
    _prefill_kernel[(q_blocks, rows, kv_heads)](
        q, q_sink, k_cache, v_cache, k_scale, v_scale, row_slots, cu_seqlens, row_seen, out,
        scale * LOG2E,
        q.stride(0), q.stride(1), q_sink.stride(0), q_sink.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *((k_scale.stride(0), k_scale.stride(1)) if quant else (0, 0)),
        *((v_scale.stride(0), v_scale.stride(1)) if quant else (0, 0)),
        out.stride(0), out.stride(1),
        capacity, window,
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, SINK=sink, SINK_TILES=sink_tiles,
        BLOCK_Q=block_q, BLOCK_N=block_n, QUANT=quant,
        INTERPRETER=interpreter, MAX_TILES=recent_tiles if interpreter else 0,
        PDL=pdl_enabled(), **pdl_launch(),
        num_warps=num_warps or config["num_warps"],
        num_stages=num_stages or config["num_stages"],
    )  # fmt: skip
    return out


def prefill_attention(
    q: torch.Tensor,
    q_sink: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    row_slots: torch.Tensor,
    cu_seqlens: torch.Tensor,
    row_seen: torch.Tensor,
    sink: int,
    window: int,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chunks of consecutive queries, one chunk per row, already written into their slots.

    q, q_sink [T, H, D]; row r owns queries cu_seqlens[r]:cu_seqlens[r+1] -> [T, H, D] in q's
    dtype. Same function as reference.prefill_attention (`k_scale`, `v_scale`: an fp8 arena's).
    """
    return prefill_attention_launch(
        q, q_sink, k_cache, v_cache, row_slots, cu_seqlens, row_seen, sink, window, scale,
        k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip
