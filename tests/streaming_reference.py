"""A plain, separate re-implementation of the reference StreamingLLM semantics (test oracle).

Written the way the MIT reference works, sharing no code with sinkcache: per layer it keeps a list
of *un-rotated* keys (sinks first, then recent tokens oldest first); before each chunk it evicts
from the front of the recent part to make room; then it rotates every key by its place in the
cache and each query by its own place, and attends causally. The layer weights come from a
transformers model (its norms, projections and MLP are used as they are).
"""

from __future__ import annotations

import torch


def _rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float):
    """x [heads, n, d] rotated at integer cache positions [n] (rotate-half layout)."""
    angles = positions.double()[:, None] * inv_freq.double()[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = (emb.cos() * scaling).float(), (emb.sin() * scaling).float()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class ReferenceStream:
    """One session's stream through `hf_model` with `sink` sinks and a window of `window` tokens."""

    def __init__(self, hf_model, sink: int, window: int) -> None:
        self.model = hf_model.model
        self.lm_head = hf_model.lm_head
        self.config = hf_model.config
        self.sink, self.window = sink, window
        rotary = self.model.rotary_emb
        self.inv_freq, self.scaling = rotary.inv_freq, rotary.attention_scaling
        layers = self.config.num_hidden_layers
        self.keys: list[list[torch.Tensor]] = [[] for _ in range(layers)]  # per token [kv, d]
        self.values: list[list[torch.Tensor]] = [[] for _ in range(layers)]

    def _evict_for(self, incoming: int) -> None:
        for layer in range(len(self.keys)):
            keys, values = self.keys[layer], self.values[layer]
            recent = len(keys) - min(len(keys), self.sink)
            excess = recent + incoming - self.window
            if excess > 0 and recent > 0:
                del keys[self.sink : self.sink + excess]
                del values[self.sink : self.sink + excess]

    @torch.no_grad()
    def feed(self, tokens: list[int]) -> torch.Tensor:
        """Feed a chunk (at most `window` tokens); returns next-token logits [len(tokens), vocab]."""
        assert 0 < len(tokens) <= self.window
        self._evict_for(len(tokens))
        cfg = self.config
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        group = heads // kv_heads
        n = len(tokens)
        x = self.model.embed_tokens(torch.tensor(tokens))  # [n, hidden]
        for layer_index, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(n, heads, dim).transpose(0, 1)  # [H, n, d]
            k = attn.k_proj(h).view(n, kv_heads, dim)
            v = attn.v_proj(h).view(n, kv_heads, dim)
            keys, values = self.keys[layer_index], self.values[layer_index]
            keys.extend(k.unbind(0))
            values.extend(v.unbind(0))
            total = len(keys)
            all_k = torch.stack(keys, dim=1)  # [kv, total, d], un-rotated
            all_v = torch.stack(values, dim=1)
            cache_pos = torch.arange(total)
            all_k = _rotate(all_k, cache_pos, self.inv_freq, self.scaling)
            q = _rotate(q, cache_pos[total - n :], self.inv_freq, self.scaling)
            all_k = all_k.repeat_interleave(group, dim=0)
            all_v = all_v.repeat_interleave(group, dim=0)
            scores = q @ all_k.transpose(1, 2) * dim**-0.5  # [H, n, total]
            causal = cache_pos[None, :] <= cache_pos[total - n :, None]
            scores = scores.masked_fill(~causal, float("-inf"))
            out = torch.softmax(scores, dim=-1) @ all_v  # [H, n, d]
            x = x + attn.o_proj(out.transpose(0, 1).reshape(n, heads * dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.model.norm(x))
