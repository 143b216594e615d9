"""From an EngineConfig to an engine: `build_core` (the EngineCore) and `build_engine` (on a thread).

Placement decisions live here and nowhere else: device and dtype, the attention backend, CUDA graphs,
and how many slots the arena gets (set directly or from a memory budget).
"""

from __future__ import annotations

import logging
import time

import torch

from sinkcache.config import CacheGeometry, EngineConfig
from sinkcache.core.arena import KV_DTYPES, KVArena, slots_for_budget
from sinkcache.core.attention.backend import select_backend
from sinkcache.core.engine import EngineCore
from sinkcache.core.runner import ModelRunner
from sinkcache.host.thread import ThreadEngine
from sinkcache.models.loader import LoadedModel, load_model

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(config: EngineConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def resolve_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return TORCH_DTYPES[config.dtype]


def resolve_kv_dtype(config: EngineConfig, dtype: torch.dtype) -> torch.dtype:
    """What the arena stores: the model dtype, or fp8 codes with scales."""
    return dtype if config.kv_dtype == "auto" else KV_DTYPES[config.kv_dtype]


def _slot_count(
    config: EngineConfig,
    loaded: LoadedModel,
    geometry: CacheGeometry,
    kv_dtype: torch.dtype,
    device: torch.device,
) -> int:
    if config.slots is not None:
        return config.slots
    if config.kv_memory_gib is not None:
        budget = int(config.kv_memory_gib * 2**30)
    elif device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = int(free * 0.80)  # leave room for activations, graphs and the allocator
    else:
        return 64
    slots = slots_for_budget(loaded.shape, geometry, kv_dtype, budget)
    if slots < 1:
        raise ValueError(
            f"a KV budget of {budget} bytes holds no slot of capacity {geometry.capacity}"
        )
    return slots


def build_core(
    config: EngineConfig, loaded: LoadedModel | None = None, warm_up: bool = True
) -> EngineCore:
    """Load the model (unless given), size and allocate the arena, wire the runner; on CUDA, warm
    up (compile every kernel, capture every decode graph) unless `warm_up` is False (benchmarks
    that use one batch size)."""
    config.validate()
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    device = resolve_device(config)
    dtype = resolve_dtype(config, device)
    geometry = CacheGeometry(config.sink, config.window)
    if loaded is None:
        loaded = load_model(config.model, dtype, device, seed=config.seed)
    kv_dtype = resolve_kv_dtype(config, dtype)
    num_slots = _slot_count(config, loaded, geometry, kv_dtype, device)
    arena = KVArena(loaded.shape, geometry, num_slots, dtype, device, kv_dtype=kv_dtype)
    runner = ModelRunner(
        loaded.model,
        arena,
        select_backend(device, config.attention, loaded.shape.head_dim),
        use_cuda_graphs=config.cuda_graphs,
    )
    codec = None
    if loaded.tokenizer is not None:
        from sinkcache.text.codec import TokenizerCodec

        codec = TokenizerCodec(loaded.tokenizer, loaded.shape)
    prefill_budget = config.prefill_budget or (2048 if device.type == "cuda" else 512)
    log.info(
        "engine: model=%s device=%s dtype=%s kv=%s slots=%d capacity=%d (%d sink + %d window), "
        "kv=%.1f MiB",
        config.model,
        device,
        dtype,
        kv_dtype,
        num_slots,
        geometry.capacity,
        geometry.sink,
        geometry.window,
        arena.nbytes() / 2**20,
    )
    core = EngineCore(runner, codec, prefill_budget, eos_ids=frozenset(loaded.shape.eos_token_ids))
    if device.type == "cuda" and warm_up:
        started = time.perf_counter()
        core.warm_up()
        log.info(
            "engine warmed up in %.1f s (kernels compiled, graphs captured)",
            time.perf_counter() - started,
        )
    return core


def build_engine(config: EngineConfig, loaded: LoadedModel | None = None) -> ThreadEngine:
    """A ThreadEngine ready to `start()` inside a running event loop."""
    return ThreadEngine(
        build_core(config, loaded), config.flush_interval_s, config.max_events_per_s
    )
