"""The decoder of every family in sinkcache.families, its attention over KVArena slots: the Llama
block, with a family's differences as ModelShape flags (q/k/v and o biases, Qwen3's q/k norm).

Reads top to bottom like gpt-fast: RMSNorm, Attention, FeedForward, Block, Transformer. One
forward takes a flat batch of tokens from many sessions (decode rows first, then prefill chunks),
writes their keys and values into the arena, and attends over each token's slot. q/k/v and
gate/up projections are fused into single matmuls.

Everything between the matmuls is a fused op of the backend (PyTorch on CPU, Triton on CUDA), so
a layer is about ten kernels. The residual stream runs beside the hidden state, vLLM style: each
norm adds the previous sublayer's output into the residual and normalises the sum in one op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sinkcache.config import ModelShape
from sinkcache.core.arena import KVArena
from sinkcache.core.attention.backend import AttentionBackend


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
    logits_index: torch.Tensor | None  # [L] int64, tokens whose logits are wanted; None: all


class RMSNorm(nn.Module):
    """Holds the weight; the backend's add_rms_norm does the work (with the residual add)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, backend: AttentionBackend
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised residual + x, residual + x); residual None means x starts the stream."""
        return backend.add_rms_norm(x, residual, self.weight, self.eps)


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
        self.qkv_proj = nn.Linear(shape.hidden_size, q_size + 2 * kv_size, bias=shape.qkv_bias)
        self.o_proj = nn.Linear(q_size, shape.hidden_size, bias=shape.o_proj_bias)
        self.scale = shape.head_dim**-0.5
        self.qk_norm = shape.qk_norm
        if shape.qk_norm:
            self.q_norm = RMSNorm(shape.head_dim, shape.rms_norm_eps)
            self.k_norm = RMSNorm(shape.head_dim, shape.rms_norm_eps)

    def norm_heads(self, qkv: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        """qkv with each q and each k head RMS-normalised (Qwen3's q/k norm, before RoPE), by the
        backend's norm over [tokens * heads, D] rows; v as it was. Unfused: two norms and a copy."""
        tokens, d = qkv.shape[0], self.head_dim
        q, k, v = qkv.split((self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d), -1)
        q, _ = self.q_norm(q.reshape(-1, d), None, backend)
        k, _ = self.k_norm(k.reshape(-1, d), None, backend)
        return torch.cat((q.view(tokens, -1), k.view(tokens, -1), v), dim=-1)

    def forward(
        self, x: torch.Tensor, batch: ForwardBatch, arena: KVArena, backend: AttentionBackend
    ) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (H + 2 Hkv) D]
        if self.qk_norm:
            qkv = self.norm_heads(qkv, backend)
        k_cache, v_cache = arena.layer(self.layer)  # [slots + 1, Hkv, C, D]
        k_scale, v_scale = arena.layer_scales(self.layer)  # [slots + 1, Hkv, C] (fp8) or None
        # Rotates q (twice: recent and sink positions) and k; writes k, v into the arena.
        q, q_sink = backend.rope_store(
            qkv,
            batch.cos,
            batch.sin,
            batch.sink_cos,
            batch.sink_sin,
            k_cache,
            v_cache,
            batch.slots,
            batch.write_index,
            self.num_heads,
            self.num_kv_heads,
            k_scale,
            v_scale,
        )  # [T, H, D] each

        geometry = arena.geometry
        nd = batch.num_decode
        parts = []  # decode rows, then prefill chunks: [rows, H, D] each
        if nd:
            parts.append(
                backend.decode(
                    q[:nd],
                    q_sink[:nd],
                    k_cache,
                    v_cache,
                    batch.decode_slots,
                    batch.decode_seen,
                    geometry.sink,
                    self.scale,
                    k_scale,
                    v_scale,
                )
            )
        if tokens > nd:
            parts.append(
                backend.prefill(
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
                    k_scale,
                    v_scale,
                )
            )
        # A decode-only or prefill-only step (every CUDA-graph step) skips the concatenation.
        out = parts[0] if len(parts) == 1 else torch.cat(parts)  # [T, H, D]
        return self.o_proj(out.view(tokens, -1))


class FeedForward(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(shape.hidden_size, 2 * shape.intermediate_size, bias=False)
        self.down_proj = nn.Linear(shape.intermediate_size, shape.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        return self.down_proj(backend.silu_mul(self.gate_up_proj(x)))


class Block(nn.Module):
    def __init__(self, shape: ModelShape, layer: int) -> None:
        super().__init__()
        self.input_norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.attention = Attention(shape, layer)
        self.post_attention_norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.mlp = FeedForward(shape)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
        arena: KVArena,
        backend: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mlp output, residual stream before it): the next norm adds the two."""
        hidden, residual = self.input_norm(hidden, residual, backend)
        hidden = self.attention(hidden, batch, arena, backend)
        hidden, residual = self.post_attention_norm(hidden, residual, backend)
        return self.mlp(hidden, backend), residual


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
    def forward(
        self, batch: ForwardBatch, arena: KVArena, backend: AttentionBackend
    ) -> torch.Tensor:
        """Returns next-token logits [L, vocab] (float32) for `batch.logits_index`."""
        hidden, residual = self.embed_tokens(batch.token_ids), None  # [T, hidden]
        for block in self.layers:
            hidden, residual = block(hidden, residual, batch, arena, backend)
        hidden, _ = self.norm(hidden, residual, backend)  # row-wise, so norm all rows, then pick
        if batch.logits_index is not None:
            hidden = hidden[batch.logits_index]
        return self.lm_head(hidden).float()
