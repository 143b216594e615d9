"""Per-token NLL of a long stream, many tokens per forward, exactly as if fed one token per step.

Fed one token per step (the paper's evaluation), token `t` is written into its slot and then
attends to what the slot holds (sinkcache/core/policy.py): the sinks, tokens `0..S-1` at cache
positions `0..S-1`, and the recent tokens `max(S, t-W+1)..t`, `t` last at cache position
`min(t, S+W-1)`. That set depends only on `t`, not on which tokens came in the same step, so a chunk
of C tokens can be scored in one forward with the same result. Per layer this keeps the sinks'
keys and values and those of the last W-1 tokens; each query of a chunk attends to the kept and
new recent keys through a banded causal mask and to the sinks with a second rotation at its own
cache position, both parts in one softmax. Recent keys are rotated by stream position, as in the
arena (RoPE sees only the distance), with the same float64 angle tables.

The engine fed one token per step is the definition; tests/test_exact_nll.py holds the two to 1e-4
in float32. Attention here is computed as explicit scores in query blocks of bounded size, which
is simple and fast enough on a GPU for a million tokens (bench/device/ppl_million.sh).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sinkcache.core.attention.backend import AttentionBackend
from sinkcache.core.model import Transformer
from sinkcache.core.rope import RotaryTable, apply_rotary

# progress(tokens predicted so far, tokens to predict)
Progress = Callable[[int, int], None]

# Score elements (float32) one query block may hold at once; the block shrinks as the keys grow.
SCORE_BUDGET = {"cpu": 1 << 24, "cuda": 1 << 28}


@dataclass(frozen=True)
class Visibility:
    """What query token `t` attends to: the sinks (tokens `0..sink-1`) and the `recent` tokens
    ending at `t`, sinks excluded; `recent` None: every token up to `t` (no eviction)."""

    sink: int
    recent: int | None

    @classmethod
    def for_mode(cls, mode: str, sink: int, window: int) -> Visibility:
        """The three streamed modes of sinkcache.tools.eval_ppl as the engine runs them."""
        if mode == "streaming":
            return cls(sink, window)
        if mode == "window":
            return cls(0, sink + window)
        if mode == "dense":
            return cls(0, None)
        raise ValueError(f"no per-token visibility for mode {mode!r} (streaming, window, dense)")

    def sink_query_position(self, t: torch.Tensor) -> torch.Tensor:
        """Cache position of query `t` as the sinks see it (policy.sink_query_position)."""
        if self.recent is None:
            return t
        return torch.clamp(t, max=self.sink + self.recent - 1)

    def kept_after(self, end: int) -> int:
        """The first stream index a query at `end` or later can still see in the recent part."""
        if self.recent is None:
            return 0
        return max(self.sink, end - self.recent + 1)


class _LayerKeys:
    """One layer's keys and values: the sinks, then the recent tokens still visible.

    keys [Hkv, S + capacity, Dk], values [Hkv, S + capacity, D]. With sinks, Dk = 2D: a sink's key
    sits in the second half and a recent key in the first, the other half zero, so that one matmul
    with the query [q, q_sink] gives every score (q.k for recent keys, q_sink.k for sinks) and no
    score tensor is ever concatenated. Recent rows hold stream indices `start..start+size-1`; the
    buffer is sized once: the kept W-1 tokens plus one chunk (windowed modes) or the whole stream.
    """

    def __init__(
        self, sink: int, capacity: int, kv_heads: int, dim: int, dtype: torch.dtype, device
    ) -> None:
        key_dim = 2 * dim if sink else dim
        self.keys = torch.zeros(kv_heads, sink + capacity, key_dim, dtype=dtype, device=device)
        self.values = torch.zeros(kv_heads, sink + capacity, dim, dtype=dtype, device=device)
        self.sink, self.dim = sink, dim
        self.sinks = 0  # sink rows filled so far
        self.start, self.size = 0, 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [n, Hkv, D] for the next n stream indices (k rotated by stream position)."""
        n, at = k.shape[0], self.sink + self.size
        self.keys[:, at : at + n, : self.dim] = k.transpose(0, 1)
        self.values[:, at : at + n] = v.transpose(0, 1)
        self.size += n

    def add_sinks(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [n, Hkv, D]: the next sink tokens (rotated at their own cache positions)."""
        n, at = k.shape[0], self.sinks
        self.keys[:, at : at + n, self.dim :] = k.transpose(0, 1)
        self.values[:, at : at + n] = v.transpose(0, 1)
        self.sinks += n

    def drop_before(self, index: int) -> None:
        """Forget recent entries with stream index < `index` (moves the kept tail to the front)."""
        drop = min(max(0, index - self.start), self.size)
        if drop == 0:
            return
        keep, base = self.size - drop, self.sink
        for buffer in (self.keys, self.values):
            buffer[:, base : base + keep] = buffer[:, base + drop : base + self.size].clone()
        self.start, self.size = self.start + drop, keep


def _attend(
    q: torch.Tensor,
    q_sink: torch.Tensor | None,
    cache: _LayerKeys,
    first: int,
    visibility: Visibility,
    scale: float,
    budget: int,
) -> torch.Tensor:
    """Queries for stream indices `first..first+C-1`, q and q_sink [C, H, D] -> [C, H, D].

    Scores are float32 (as the reference attention): recent keys meet q, sinks meet q_sink, one
    softmax over both, in blocks of queries whose scores fit `budget` elements. A block reads the
    sinks and the recent rows up to its last query (rows it cannot see are masked).
    """
    count, heads, dim = q.shape
    kv_heads = cache.keys.shape[0]
    group = heads // kv_heads
    device = q.device
    query = q if q_sink is None else torch.cat((q, q_sink), dim=-1)  # [C, H, Dk]
    query = query.float().view(count, kv_heads, group, -1).permute(1, 2, 0, 3)  # [Hkv, G, C, Dk]
    rows_at_most = cache.sink + cache.size
    block = max(1, min(count, budget // max(1, heads * rows_at_most)))
    out = torch.empty(kv_heads, group, count, dim, dtype=torch.float32, device=device)
    sink_index = torch.arange(cache.sink, device=device)
    for b0 in range(0, count, block):
        b1 = min(count, b0 + block)
        query_t = torch.arange(first + b0, first + b1, device=device)[:, None]  # [B, 1]
        recent_rows = first + b1 - cache.start  # keys past the block's last query: never seen
        rows = cache.sink + recent_rows
        key_t = torch.arange(cache.start, first + b1, device=device)[None, :]  # [1, L]
        visible = (key_t <= query_t) & (key_t >= visibility.sink)
        if visibility.recent is not None:
            visible &= key_t > query_t - visibility.recent
        if cache.sink:
            sink_visible = (sink_index[None, :] < cache.sinks) & (sink_index[None, :] <= query_t)
            visible = torch.cat((sink_visible, visible), dim=-1)
        bias = torch.zeros(visible.shape, dtype=torch.float32, device=device)
        bias.masked_fill_(~visible, float("-inf"))  # [B, rows]
        keys = cache.keys[:, :rows].float()  # [Hkv, rows, Dk]
        values = cache.values[:, :rows].float()
        q_block = query[:, :, b0:b1].reshape(kv_heads, group * (b1 - b0), -1)
        scores = torch.matmul(q_block, keys.transpose(1, 2)).mul_(scale)  # [Hkv, G*B, rows]
        scores.view(kv_heads, group, b1 - b0, rows).add_(bias)
        probs = torch.softmax(scores, dim=-1)
        out[:, :, b0:b1] = torch.matmul(probs, values).view(kv_heads, group, b1 - b0, dim)
    return out.permute(2, 0, 1, 3).reshape(count, heads, dim)


class ExactScorer:
    """Scores one stream with `model`; `visibility` says what each token attends to."""

    def __init__(
        self,
        model: Transformer,
        backend: AttentionBackend,
        visibility: Visibility,
        chunk: int = 1024,
        score_budget: int | None = None,
    ) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.model, self.backend, self.visibility, self.chunk = model, backend, visibility, chunk
        self.shape = model.shape
        self.device = model.embed_tokens.weight.device
        self.dtype = model.embed_tokens.weight.dtype
        self.rotary = RotaryTable(self.shape, self.device)
        self.score_budget = score_budget or SCORE_BUDGET.get(self.device.type, 1 << 24)

    @torch.inference_mode()
    def nll(self, ids: list[int], progress: Progress | None = None) -> list[float]:
        """-log p(ids[i+1] | ids[:i+1] as the cache holds them), for i in 0..len(ids)-2."""
        total = len(ids) - 1
        if total < 1:
            return []
        vis, shape = self.visibility, self.shape
        capacity = len(ids) if vis.recent is None else vis.recent - 1 + self.chunk
        caches = [
            _LayerKeys(
                vis.sink, capacity, shape.num_kv_heads, shape.head_dim, self.dtype, self.device
            )
            for _ in range(shape.num_layers)
        ]
        stream = torch.tensor(ids, dtype=torch.long, device=self.device)
        nll: list[torch.Tensor] = []
        for first in range(0, total, self.chunk):
            end = min(first + self.chunk, total)  # scores the tokens first..end-1
            logits = self._forward(stream[first:end], first, caches)
            targets = stream[first + 1 : end + 1]
            logprobs = torch.log_softmax(logits, dim=-1)
            nll.append(-logprobs.gather(1, targets[:, None])[:, 0])
            if progress is not None:
                progress(end, total)
        return torch.cat(nll).cpu().tolist()

    def _forward(self, tokens: torch.Tensor, first: int, caches: list[_LayerKeys]) -> torch.Tensor:
        """Logits [C, vocab] float32 for stream indices first..first+C-1; updates the caches."""
        vis, backend = self.visibility, self.backend
        count = tokens.shape[0]
        positions = torch.arange(first, first + count, device=self.device)
        cos, sin = self.rotary.cos_sin(positions)
        new_sinks = max(0, min(vis.sink, first + count) - first)
        if vis.sink:
            sink_cos, sink_sin = self.rotary.cos_sin(vis.sink_query_position(positions))
        hidden, residual = self.model.embed_tokens(tokens), None
        for block, cache in zip(self.model.layers, caches, strict=True):
            attention = block.attention
            hidden, residual = block.input_norm(hidden, residual, backend)
            qkv = attention.qkv_proj(hidden)
            heads, kv_heads, dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
            q, k, v = qkv.split((heads * dim, kv_heads * dim, kv_heads * dim), dim=-1)
            q = q.view(count, heads, dim)
            k = apply_rotary(k.view(count, kv_heads, dim), cos, sin)
            v = v.view(count, kv_heads, dim)
            q_sink = apply_rotary(q, sink_cos, sink_sin) if vis.sink else None
            q = apply_rotary(q, cos, sin)
            if new_sinks:
                cache.add_sinks(k[:new_sinks], v[:new_sinks])
            cache.append(k, v)
            out = _attend(q, q_sink, cache, first, vis, attention.scale, self.score_budget)
            hidden = attention.o_proj(out.to(hidden.dtype).reshape(count, -1))
            hidden, residual = block.post_attention_norm(hidden, residual, backend)
            hidden = block.mlp(hidden, backend)
            cache.drop_before(vis.kept_after(first + count))
        hidden, _ = self.model.norm(hidden, residual, backend)
        return self.model.lm_head(hidden).float()
