"""A device-free engine for measuring the host: the real EngineCore (scheduler, intake with chat
encoding, sampler set-up, outputs, detokenizer) around a stand-in for the model step.

On a GPU the forward and the sampling are device work that the host only launches; on a CPU box
the real forward would swamp what the host does, and at 10,000 sessions even logits [rows, vocab]
would be gigabytes per step. So `StandInRunner.execute` answers each step at once with the tokens a
step would have sampled (a fixed cycle of ordinary word tokens per slot, so detokenizing does real
work and no reply ends by EOS), while everything on the host around it is the real code. Benchmarks
only (bench/host_bench.py): the numbers it gives are the host's, not the model's.

`build_stand_in_core` is what ProcessEngine's child calls instead of `build_core` when launched
with `builder="sinkcache.host.stand_in:build_stand_in_core"`.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import torch

from sinkcache.config import PRESETS, CacheGeometry, EngineConfig
from sinkcache.core.arena import KVArena
from sinkcache.core.engine import EngineCore
from sinkcache.core.plan import StepPlan
from sinkcache.core.runner import StepResult
from sinkcache.core.sampling import SlotSampler

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "and",
    "then",
    "it",
    "runs",
    "away",
    "into",
    "deep",
    "woods",
]


class StandInRunner:
    """The ModelRunner interface (execute, capture_graphs, model.shape, arena, sampler) with no
    model: each step's sampled tokens come back at once, from host arithmetic alone."""

    def __init__(self, shape, arena: KVArena, cycle: list[int]) -> None:
        self.model = SimpleNamespace(shape=shape)
        self.arena = arena
        self.geometry = arena.geometry
        self.device = arena.device
        self.sampler = SlotSampler(arena.num_slots + 1, shape.vocab_size, "cpu")
        self._cycle = np.asarray(cycle, dtype=np.int64)
        self._step = 0

    def execute(self, plan: StepPlan) -> StepResult:
        self.sampler.commit()  # as the real runner does: the sampler front end is host work
        self._step += 1
        slots = np.asarray(plan.decode_slots, dtype=np.int64)
        cycle = self._cycle
        decode = cycle[(slots * 7 + self._step) % len(cycle)]
        sampled = [c.slot for c in plan.prefill if c.sample]
        prefill = cycle[(np.asarray(sampled, dtype=np.int64) + self._step) % len(cycle)]
        scored = sum(len(c.tokens) for c in plan.prefill if c.score_targets is not None)
        return StepResult(decode, prefill, np.zeros(scored, dtype=np.float32))

    def capture_graphs(self) -> int:
        return 0


def build_stand_in_core(config: EngineConfig) -> EngineCore:
    """An EngineCore for `config` with the default model's tokenizer and a stand-in model step.
    The arena keeps the slot bookkeeping of `config.slots` slots but a minimal K/V pool (one layer,
    one head of two floats), which the stand-in never reads."""
    from sinkcache.models.loader import load_tokenizer
    from sinkcache.text.codec import TokenizerCodec

    config.validate()
    shape = PRESETS["smollm2-135m"]
    tokenizer = load_tokenizer("default")
    geometry = CacheGeometry(config.sink, config.window)
    small = dataclasses.replace(shape, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=2)
    arena = KVArena(small, geometry, config.slots or 64, torch.float16, "cpu")
    cycle = [tokenizer.convert_tokens_to_ids("Ġ" + word) for word in WORDS]
    cycle = [t for t in cycle if t is not None and t != tokenizer.unk_token_id]
    runner = StandInRunner(shape, arena, cycle)
    codec = TokenizerCodec(tokenizer, shape)
    return EngineCore(runner, codec, config.prefill_budget or 2048)
