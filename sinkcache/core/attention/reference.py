"""Reference attention over sink + ring slots, in plain PyTorch (float32 accumulation).

Both functions read K/V straight from the arena layer tensors [slots, kv_heads, capacity, dim].
Keys at index < sink meet `q_sink` (the query rotated at its cache position); all other keys meet
`q` (rotated at its rotary position): see sinkcache/policy.py. An fp8 arena (e4m3 codes with a
float32 scale per token and head, sinkcache.core.attention.triton_tiles) is dequantised here.
"""

from __future__ import annotations

import torch

from sinkcache.core.policy import key_token_counters


def _attend(
    q: torch.Tensor,
    q_sink: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    sink: int,
    scale: float,
) -> torch.Tensor:
    """q, q_sink [N, Hkv, G, Q, D]; keys/values [N, Hkv, C, D]; mask [N, 1, 1, Q, C] -> [N, Hkv, G, Q, D]."""
    k = keys.float()[:, :, None]  # [N, Hkv, 1, C, D]
    scores = torch.matmul(q.float(), k.transpose(-1, -2))
    if sink > 0:
        sink_scores = torch.matmul(q_sink.float(), k[..., :sink, :].transpose(-1, -2))
        scores[..., :sink] = sink_scores
    scores = scores * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, values.float()[:, :, None])


def dequantize(cache: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Arena rows [..., C, D] as float32: e4m3 codes times their [..., C] scales, or as stored."""
    if scale is None:
        return cache.float()
    return cache.float() * scale[..., None]


def decode_attention(
    q: torch.Tensor,
    q_sink: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    seen: torch.Tensor,
    sink: int,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per row. q, q_sink [B, H, D]; slots, seen [B] (seen counts the query's own token).
    `k_scale`, `v_scale` [N, Hkv, C]: the scales of an fp8 arena (None for a plain one).

    Returns [B, H, D] in q's dtype.
    """
    batch, heads, dim = q.shape
    kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    keys = dequantize(k_cache[slots], None if k_scale is None else k_scale[slots])  # [B, Hkv, C, D]
    values = dequantize(v_cache[slots], None if v_scale is None else v_scale[slots])
    filled = torch.clamp(seen, max=capacity)
    mask = torch.arange(capacity, device=q.device)[None, :] < filled[:, None]  # [B, C]
    out = _attend(
        q.view(batch, kv_heads, group, 1, dim),
        q_sink.view(batch, kv_heads, group, 1, dim),
        keys,
        values,
        mask[:, None, None, None, :],
        sink,
        scale,
    )
    return out.reshape(batch, heads, dim).to(q.dtype)


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

    q, q_sink [T, H, D]; row r owns queries cu_seqlens[r]:cu_seqlens[r+1], the last chunk tokens of
    a slot that now holds row_seen[r] tokens. Query i of a chunk attends causally: to the sinks, to
    the recent keys kept before the chunk, and to chunk tokens up to itself. Returns [T, H, D].
    """
    _, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    counters = key_token_counters(row_seen, sink, window)  # [R, C]
    bounds = cu_seqlens.tolist()
    for row in range(len(bounds) - 1):
        start, end = bounds[row], bounds[row + 1]
        if end == start:
            continue
        length = end - start
        seen = row_seen[row]
        query_t = seen - length + torch.arange(length, device=q.device)  # [Q]
        key_t = counters[row]  # [C]
        mask = (key_t[None, :] >= 0) & (key_t[None, :] <= query_t[:, None])  # [Q, C]
        slot = row_slots[row]
        qr = q[start:end].view(length, kv_heads, group, dim).permute(1, 2, 0, 3)[None]
        qs = q_sink[start:end].view(length, kv_heads, group, dim).permute(1, 2, 0, 3)[None]
        keys = dequantize(k_cache[slot], None if k_scale is None else k_scale[slot])
        values = dequantize(v_cache[slot], None if v_scale is None else v_scale[slot])
        res = _attend(qr, qs, keys[None], values[None], mask[None, None, None], sink, scale)
        out[start:end] = res[0].permute(2, 0, 1, 3).reshape(length, heads, dim).to(q.dtype)
    return out
