"""ModelRunner: turns a scheduled step into device tensors, runs the model, samples, and hands back
host arrays without stalling the device.

Decode rows are described by slot indices alone: the token to feed, its counter and rotary offset
are read from the arena on the device, and the sampled token and new counter are written back there.
So a steady decode batch needs no host-to-device traffic, and its step can be a CUDA graph replay.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sinkcache.core.arena import KVArena
from sinkcache.core.attention.backend import AttentionBackend
from sinkcache.core.model import ForwardBatch, Transformer
from sinkcache.core.plan import PrefillChunk, StepPlan
from sinkcache.core.policy import rotary_position, sink_query_position, write_index
from sinkcache.core.rope import RotaryTable
from sinkcache.core.sampling import SamplerVariant, SlotSampler


@dataclass
class StepResult:
    """Host copies of a step's outputs; `wait()` before reading (the copies may be in flight)."""

    decode_tokens: np.ndarray  # [Bd] int64, the token each decode row produced
    prefill_tokens: np.ndarray  # [sampled prefill rows] int64, in plan order
    scores: np.ndarray  # [sum of scored tokens] float32, logprob of each score target
    event: torch.cuda.Event | None = None

    def wait(self) -> StepResult:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self


DECODE_BUCKETS = (
    1,
    2,
    4,
    8,
    16,
    24,
    32,
    48,
    64,
    96,
    128,
    192,
    256,
    384,
    512,
    768,
    1024,
    1536,
    2048,
)


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        arena: KVArena,
        attention: AttentionBackend,
        use_cuda_graphs: bool = False,
    ) -> None:
        self.model = model
        self.arena = arena
        self.attention = attention
        self.device = arena.device
        self.geometry = arena.geometry
        self.rope = RotaryTable(model.shape, self.device)
        self.sampler = SlotSampler(arena.num_slots + 1, model.shape.vocab_size, self.device)
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[tuple[int, SamplerVariant], _DecodeGraph] = {}
        self._graph_pool = None
        self._decode_slots_cache: tuple[int, torch.Tensor] | None = None

    # -- public -----------------------------------------------------------------------------------
    def execute(self, plan: StepPlan) -> StepResult:
        """Enqueue one step; the returned result's arrays are valid after `wait()`.

        With CUDA graphs the decode rows always run as a graph replay; prefill chunks in the same
        step then run as a second, eager forward (the rows belong to different sessions, so the
        order does not matter). Thousands of chatting sessions start a turn almost every step,
        and a step that fell back to eager for everyone would be launch-bound.
        """
        self.sampler.commit()  # parameters configured since the last step (graphs read them)
        nd = len(plan.decode_slots)
        if nd and self.use_cuda_graphs and nd <= DECODE_BUCKETS[-1]:
            decode_tokens = self._replay_decode(plan)
            if not plan.prefill:
                return self._to_host(decode_tokens, None, None)
            prefill_only = StepPlan(prefill=plan.prefill, variant=plan.variant)
            _, prefill_tokens, scores = self._eager(prefill_only)
            return self._to_host(decode_tokens, prefill_tokens, scores)
        return self._to_host(*self._eager(plan))

    def forward_logits(
        self, plan: StepPlan, decode_tokens: list[int] | None = None
    ) -> torch.Tensor:
        """Run one step and return next-token logits [L, vocab] for every token it feeds: the decode
        rows, then every token of each chunk in order. Nothing is sampled. For tests and evaluation.

        `decode_tokens` sets what the decode rows feed (otherwise each slot's last sampled token).
        """
        decode_slots = self._decode_slot_tensor(plan)
        if decode_tokens is not None:
            self.arena.next_token[decode_slots] = self._tensor(decode_tokens)
        chunks = [
            PrefillChunk(c.slot, c.tokens, c.start, score_targets=[-1] * len(c.tokens))
            for c in plan.prefill
        ]
        batch, _, _ = self._build_batch(decode_slots, chunks)
        logits = self.model(batch, self.arena, self.attention)
        self.arena.seen[batch.decode_slots] = batch.decode_seen
        self.arena.seen[batch.prefill_slots] = batch.prefill_seen
        return logits

    # -- eager path --------------------------------------------------------------------------------
    def _eager(
        self, plan: StepPlan
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """One eager forward; (decode tokens, sampled prefill tokens, scores) on the device."""
        decode_slots = self._decode_slot_tensor(plan)
        batch, sample_rows, score_targets = self._build_batch(decode_slots, plan.prefill)
        logits = self.model(batch, self.arena, self.attention)
        nd, ns = len(plan.decode_slots), len(sample_rows)
        tokens = None
        if nd + ns:
            rows = self._tensor(sample_rows)
            sample_slots = torch.cat([decode_slots, batch.prefill_slots[rows]])
            seen_after = torch.cat([batch.decode_seen, batch.prefill_seen[rows]])
            positions = self.arena.base[sample_slots] + seen_after
            tokens = self.sampler.sample(logits[: nd + ns], sample_slots, positions, plan.variant)
            self.arena.next_token[sample_slots] = tokens
        scores = None
        if score_targets is not None:
            logprobs = torch.log_softmax(logits[nd + ns :], dim=-1)
            scores = logprobs.gather(1, score_targets[:, None].clamp_min(0))[:, 0]
        self.arena.seen[batch.decode_slots] = batch.decode_seen
        self.arena.seen[batch.prefill_slots] = batch.prefill_seen
        decode_tokens = tokens[:nd] if tokens is not None else None
        prefill_tokens = tokens[nd:] if tokens is not None else None
        return decode_tokens, prefill_tokens, scores

    def _tensor(self, values: list[int]) -> torch.Tensor:
        host = torch.tensor(values, dtype=torch.int64)
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host.to(self.device)

    def _decode_slot_tensor(self, plan: StepPlan) -> torch.Tensor:
        cached = self._decode_slots_cache
        if cached is not None and plan.decode_version >= 0 and cached[0] == plan.decode_version:
            return cached[1]
        slots = self._tensor(plan.decode_slots)
        if plan.decode_version >= 0:  # unversioned plans (tests, prefill-only halves) are not kept
            self._decode_slots_cache = (plan.decode_version, slots)
        return slots

    def _build_batch(
        self, decode_slots: torch.Tensor, chunks: list[PrefillChunk]
    ) -> tuple[ForwardBatch, list[int], torch.Tensor | None]:
        """Decode rows from arena state; prefill rows from the host lists (one upload)."""
        arena, geometry = self.arena, self.geometry
        nd = decode_slots.shape[0]
        t_decode = arena.seen[decode_slots]
        ids_decode = arena.next_token[decode_slots]

        lengths = [len(c.tokens) for c in chunks]
        total_prefill = sum(lengths)
        # Packed upload: ids, slot, counter, row-end per prefill token, then cu_seqlens.
        ids_p, slot_p, t_p, end_p = [], [], [], []
        for chunk in chunks:
            n = len(chunk.tokens)
            ids_p += chunk.tokens
            slot_p += [chunk.slot] * n
            t_p += range(chunk.start, chunk.start + n)
            end_p += [chunk.start + n] * n
        cu = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).tolist()
        row_slots = [c.slot for c in chunks]
        row_seen = [c.start + n for c, n in zip(chunks, lengths, strict=True)]
        sample_rows = [r for r, c in enumerate(chunks) if c.sample]
        logits_p = [nd + cu[r + 1] - 1 for r in sample_rows]
        targets: list[int] = []
        for r, chunk in enumerate(chunks):
            if chunk.score_targets is not None:
                logits_p += range(nd + cu[r], nd + cu[r + 1])
                targets += chunk.score_targets
        packed = self._tensor(
            ids_p + slot_p + t_p + end_p + cu + row_slots + row_seen + logits_p + targets
        )
        fields = np.cumsum(
            [
                0,
                *[total_prefill] * 4,
                len(cu),
                len(chunks),
                len(chunks),
                len(logits_p),
                len(targets),
            ]
        )
        part = [packed[fields[i] : fields[i + 1]] for i in range(len(fields) - 1)]
        ids_p_t, slot_p_t, t_p_t, end_p_t, cu_t, row_slots_t, row_seen_t, logits_p_t, targets_t = (
            part
        )

        slots = torch.cat([decode_slots, slot_p_t])
        t = torch.cat([t_decode, t_p_t])
        seen_after = torch.cat([t_decode + 1, end_p_t])
        base = arena.base[slots]
        rot = rotary_position(t, base, geometry.sink)
        sink_pos = sink_query_position(t, seen_after, geometry.capacity)
        cos, sin = self.rope.cos_sin(rot)
        sink_cos, sink_sin = self.rope.cos_sin(sink_pos)
        index = write_index(t, geometry.sink, geometry.window)
        token_ids = torch.cat([ids_decode, ids_p_t])
        logits_index = torch.cat([torch.arange(nd, device=self.device), logits_p_t])
        batch = ForwardBatch(
            token_ids=token_ids,
            slots=slots,
            write_index=index,
            cos=cos,
            sin=sin,
            sink_cos=sink_cos,
            sink_sin=sink_sin,
            num_decode=nd,
            decode_slots=decode_slots,
            decode_seen=t_decode + 1,
            prefill_slots=row_slots_t,
            prefill_cu_seqlens=cu_t,
            prefill_seen=row_seen_t,
            logits_index=logits_index,
        )
        return batch, sample_rows, (targets_t if targets else None)

    # -- CUDA graph path ---------------------------------------------------------------------------
    def capture_graphs(self) -> int:
        """Capture every (bucket, sampler variant) decode graph this arena can use, now: a
        capture stalls the engine loop for a moment, and in the middle of serving that moment
        holds up every session. Returns how many graphs exist."""
        if not self.use_cuda_graphs:
            return 0
        largest = min(self.arena.num_slots, DECODE_BUCKETS[-1])
        for bucket in DECODE_BUCKETS:
            for variant in SamplerVariant:
                if (bucket, variant) not in self._graphs:
                    self._graphs[bucket, variant] = _DecodeGraph(self, bucket, variant)
            if bucket >= largest:
                break
        return len(self._graphs)

    def _replay_decode(self, plan: StepPlan) -> torch.Tensor:
        nd = len(plan.decode_slots)
        bucket = next(b for b in DECODE_BUCKETS if b >= nd)
        key = (bucket, plan.variant)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = _DecodeGraph(self, bucket, plan.variant)
        graph.set_slots(plan.decode_slots, plan.decode_version)
        graph.replay()
        return graph.tokens[:nd]

    def decode_batch(self, slots: torch.Tensor) -> ForwardBatch:
        """A decode-only batch from the slots' arena state, in one op (backend.decode_prep)."""
        arena, geometry = self.arena, self.geometry
        token_ids, index, seen_after, cos, sin, sink_cos, sink_sin = self.attention.decode_prep(
            slots, arena.seen, arena.base, arena.next_token, self.rope.inv_freq,
            self.rope.scaling, geometry.sink, geometry.window,
        )  # fmt: skip
        empty = torch.empty(0, dtype=torch.int64, device=self.device)
        return ForwardBatch(
            token_ids=token_ids,
            slots=slots,
            write_index=index,
            cos=cos,
            sin=sin,
            sink_cos=sink_cos,
            sink_sin=sink_sin,
            num_decode=slots.shape[0],
            decode_slots=slots,
            decode_seen=seen_after,
            prefill_slots=empty,
            prefill_cu_seqlens=empty,
            prefill_seen=empty,
            logits_index=None,
        )

    def decode_step_tensors(self, slots: torch.Tensor, variant: SamplerVariant) -> torch.Tensor:
        """The whole decode step on device tensors only (what a CUDA graph captures)."""
        batch = self.decode_batch(slots)
        logits = self.model(batch, self.arena, self.attention)
        positions = self.arena.base[slots] + batch.decode_seen
        tokens = self.sampler.sample(logits, slots, positions, variant)
        self.arena.next_token[slots] = tokens
        self.arena.seen[slots] = batch.decode_seen
        return tokens

    # -- results -----------------------------------------------------------------------------------
    def _to_host(
        self,
        decode_tokens: torch.Tensor | None,
        prefill_tokens: torch.Tensor | None,
        scores: torch.Tensor | None,
    ) -> StepResult:
        empty_i, empty_f = torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.float32)
        parts = [
            decode_tokens if decode_tokens is not None else empty_i,
            prefill_tokens if prefill_tokens is not None else empty_i,
            scores.float() if scores is not None else empty_f,
        ]
        if self.device.type != "cuda":
            return StepResult(*(p.numpy() for p in parts))
        host = []
        for p in parts:
            buf = torch.empty(p.shape, dtype=p.dtype, pin_memory=True)
            buf.copy_(p, non_blocking=True)
            host.append(buf)
        event = torch.cuda.Event()
        event.record()
        return StepResult(*(h.numpy() for h in host), event=event)


class _DecodeGraph:
    """One captured decode step for a padded batch size and sampler variant."""

    def __init__(self, runner: ModelRunner, bucket: int, variant: SamplerVariant) -> None:
        self.runner = runner
        self.bucket = bucket
        self.version = -2
        scratch = runner.arena.scratch_slot
        self.slots = torch.full((bucket,), scratch, dtype=torch.int64, device=runner.device)
        # Warm up on a side stream (allocations, autotuning), then capture.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                runner.decode_step_tensors(self.slots, variant)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=runner._graph_pool):
            self.tokens = runner.decode_step_tensors(self.slots, variant)
        runner._graph_pool = self.graph.pool()

    def set_slots(self, slots: list[int], version: int) -> None:
        if version >= 0 and version == self.version:
            return
        # A fresh pinned buffer each time: the previous step's copy may not have run yet, and the
        # caching host allocator keeps a buffer alive until its copy has.
        padded = slots + [self.runner.arena.scratch_slot] * (self.bucket - len(slots))
        host = torch.tensor(padded, dtype=torch.int64).pin_memory()
        self.slots.copy_(host, non_blocking=True)
        self.version = version

    def replay(self) -> None:
        self.graph.replay()
