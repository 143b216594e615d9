"""A tiny random Llama on CPU, its engine on a thread, and a helper that reads one request."""

from __future__ import annotations

import torch

from sinkcache.config import ModelShape
from sinkcache.core.arena import KVArena
from sinkcache.core.attention.backend import REFERENCE
from sinkcache.core.engine import EngineCore
from sinkcache.core.runner import ModelRunner
from sinkcache.events import ScoresEvent, TokensEvent, TurnEndEvent
from sinkcache.families import shape_to_hf_config
from sinkcache.host.thread import ThreadEngine
from sinkcache.models.loader import from_hf_model

SHAPE = ModelShape(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)


def tiny_models():
    """(the transformers model, ours) with the same random weights, float32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    hf = AutoModelForCausalLM.from_config(shape_to_hf_config(SHAPE), dtype=torch.float32).eval()
    return hf, from_hf_model(hf, torch.float32, "cpu")


def make_engine(model, geometry, slots=8, eos=(), prefill_budget=64) -> ThreadEngine:
    arena = KVArena(model.shape, geometry, slots, torch.float32, "cpu")
    runner = ModelRunner(model, arena, REFERENCE)
    core = EngineCore(runner, None, prefill_budget, eos_ids=frozenset(eos))
    engine = ThreadEngine(core, flush_interval=0.0)
    engine.start()
    return engine


async def collect(stream) -> tuple[list[int], list[ScoresEvent], TurnEndEvent]:
    ids, scores, end = [], [], None
    async for event in stream:
        if isinstance(event, TokensEvent):
            ids += event.ids
        elif isinstance(event, ScoresEvent):
            scores.append(event)
        else:
            end = event
    return ids, scores, end
