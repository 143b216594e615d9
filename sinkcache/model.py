"""A Llama-family decoder whose attention runs over KVArena slots.

Reads top to bottom like gpt-fast: RMSNorm, Attention, FeedForward, Block, Transformer. One
forward takes a flat batch of tokens from many sessions (decode rows first, then prefill chunks),
writes their keys and values into the arena, and attends over each token's slot. q/k/v and
gate/up projections are fused into single matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from sinkcache.arena import KVArena
from sinkcache.attention.backend import AttentionBackend
from sinkcache.config import ModelShape
from sinkcache.rope import apply_rotary


@dataclass
class ForwardBatch:
    """Device tensors describing every token of one forward pass.

    T tokens in all: the first `num_decode` are decode rows (one token each, shape [Bd]); the rest
    are prefill chunks, one per prefill row (R rows), laid out by `cu_seqlens` (offsets relative to
    the start of the prefill part).
    """

    token_ids: torch.Tensor  # [T] int64
    slots: torch.Tensor  # [T] int64, the slot each token is written into
    write_index: torch.Tensor  # [T] int64, physical index within the slot
    cos: torch.Tensor  # [T, D] float32, rotary position (recent-key numbering)
    sin: torch.Tensor  # [T, D]
    sink_cos: torch.Tensor  # [T, D] float32, cache position (what the sinks see)
    sink_sin: torch.Tensor  # [T, D]
    num_decode: int
    decode_slots: torch.Tensor  # [Bd] int64
    decode_seen: torch.Tensor  # [Bd] int64, tokens in the slot after this step's write
    prefill_slots: torch.Tensor  # [R] int64
    prefill_cu_seqlens: torch.Tensor  # [R + 1] int64
    prefill_seen: torch.Tensor  # [R] int64
    logits_index: torch.Tensor  # [L] int64, tokens whose next-token logits are wanted


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, shape: ModelShape, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = (
            shape.num_heads,
            shape.num_kv_heads,
            shape.head_dim,
        )
        q_size, kv_size = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv_proj = nn.Linear(shape.hidden_size, sum(self.split), bias=shape.qkv_bias)
        self.o_proj = nn.Linear(q_size, shape.hidden_size, bias=False)
        self.scale = shape.head_dim**-0.5

    def forward(
        self, x: torch.Tensor, batch: ForwardBatch, arena: KVArena, attn: AttentionBackend
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        q_sink = apply_rotary(q, batch.sink_cos, batch.sink_sin)
        q = apply_rotary(q, batch.cos, batch.sin)
        k = apply_rotary(k, batch.cos, batch.sin)

        k_cache, v_cache = arena.layer(self.layer)  # [slots + 1, Hkv, C, D]
        k_cache[batch.slots, :, batch.write_index] = k.to(k_cache.dtype)
        v_cache[batch.slots, :, batch.write_index] = v.to(v_cache.dtype)

        geometry = arena.geometry
        out = torch.empty_like(q)
        nd = batch.num_decode
        if nd:
            out[:nd] = attn.decode(
                q[:nd],
                q_sink[:nd],
                k_cache,
                v_cache,
                batch.decode_slots,
                batch.decode_seen,
                geometry.sink,
                self.scale,
            )
        if tokens > nd:
            out[nd:] = attn.prefill(
                q[nd:],
                q_sink[nd:],
                k_cache,
                v_cache,
                batch.prefill_slots,
                batch.prefill_cu_seqlens,
                batch.prefill_seen,
                geometry.sink,
                geometry.window,
                self.scale,
            )
        return self.o_proj(out.view(tokens, -1))


class FeedForward(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.intermediate = shape.intermediate_size
        self.gate_up_proj = nn.Linear(shape.hidden_size, 2 * shape.intermediate_size, bias=False)
        self.down_proj = nn.Linear(shape.intermediate_size, shape.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, shape: ModelShape, layer: int) -> None:
        super().__init__()
        self.input_norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.attention = Attention(shape, layer)
        self.post_attention_norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.mlp = FeedForward(shape)

    def forward(
        self, x: torch.Tensor, batch: ForwardBatch, arena: KVArena, attn: AttentionBackend
    ) -> torch.Tensor:
        x = x + self.attention(self.input_norm(x), batch, arena, attn)
        return x + self.mlp(self.post_attention_norm(x))


class Transformer(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.shape = shape
        self.embed_tokens = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.layers = nn.ModuleList(Block(shape, i) for i in range(shape.num_layers))
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.lm_head = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)
        if shape.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, arena: KVArena, attn: AttentionBackend) -> torch.Tensor:
        """Returns next-token logits [L, vocab] (float32) for `batch.logits_index`."""
        x = self.embed_tokens(batch.token_ids)
        for block in self.layers:
            x = block(x, batch, arena, attn)
        x = self.norm(x[batch.logits_index])
        return self.lm_head(x).float()
