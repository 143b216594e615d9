"""EngineConfig, `build_engine` and `start_engine`: from settings to a running engine.

Placement decisions live here and nowhere else: device and dtype, the attention backend, CUDA graphs,
and how many slots the arena gets (set directly or from a memory budget).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import torch

from sinkcache.arena import CacheGeometry, KVArena, slots_for_budget
from sinkcache.async_engine import AsyncEngine
from sinkcache.attention.backend import select_backend
from sinkcache.engine import EngineCore
from sinkcache.engine_process import ProcessEngine
from sinkcache.loader import LoadedModel, load_model
from sinkcache.runner import ModelRunner

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    model: str = "default"
    sink: int = 4
    window: int = 1020
    slots: int | None = None  # None: from kv_memory_gib, or a device default
    kv_memory_gib: float | None = None
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"
    prefill_budget: int | None = None  # prefill tokens per step (decode rows always run)
    cuda_graphs: bool = True
    attention: str = "auto"  # auto | reference | triton
    seed: int = 0
    torch_threads: int | None = None  # CPU engines: intra-op threads
    flush_interval_s: float = 0.005  # how often reply events are flushed (coalescing)
    max_events_per_s: float = 5000.0  # under load, coalesce more so events/s stay near this

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}")
        return DTYPES[self.dtype]


def _slot_count(
    config: EngineConfig, loaded: LoadedModel, geometry: CacheGeometry, dtype: torch.dtype, device
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
    slots = slots_for_budget(loaded.shape, geometry, dtype, budget)
    if slots < 1:
        raise ValueError(
            f"a KV budget of {budget} bytes holds no slot of capacity {geometry.capacity}"
        )
    return slots


def build_core(config: EngineConfig, loaded: LoadedModel | None = None) -> EngineCore:
    """Load the model (unless given), size and allocate the arena, wire the runner."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    device = config.resolved_device()
    dtype = config.resolved_dtype(device)
    geometry = CacheGeometry(config.sink, config.window)
    if loaded is None:
        loaded = load_model(config.model, dtype, device, seed=config.seed)
    num_slots = _slot_count(config, loaded, geometry, dtype, device)
    arena = KVArena(loaded.shape, geometry, num_slots, dtype, device)
    runner = ModelRunner(
        loaded.model,
        arena,
        select_backend(device, config.attention),
        use_cuda_graphs=config.cuda_graphs,
    )
    codec = None
    if loaded.tokenizer is not None:
        from sinkcache.text import TokenizerCodec

        codec = TokenizerCodec(loaded.tokenizer, loaded.shape)
    prefill_budget = config.prefill_budget or (2048 if device.type == "cuda" else 512)
    log.info(
        "engine: model=%s device=%s dtype=%s slots=%d capacity=%d (%d sink + %d window), kv=%.1f MiB",
        config.model,
        device,
        dtype,
        num_slots,
        geometry.capacity,
        geometry.sink,
        geometry.window,
        arena.nbytes() / 2**20,
    )
    core = EngineCore(runner, codec, prefill_budget, eos_ids=frozenset(loaded.shape.eos_token_ids))
    if device.type == "cuda":
        started = time.perf_counter()
        core.warm_up()
        log.info(
            "engine warmed up in %.1f s (kernels compiled, graphs captured)",
            time.perf_counter() - started,
        )
    return core


def build_engine(config: EngineConfig, loaded: LoadedModel | None = None) -> AsyncEngine:
    """An AsyncEngine ready to `start()` inside a running event loop."""
    return AsyncEngine(build_core(config, loaded), config.flush_interval_s, config.max_events_per_s)


async def start_engine(
    config: EngineConfig, in_process: bool = False
) -> AsyncEngine | ProcessEngine:
    """A running engine for a server: by default in a child process of its own (so the engine
    loop never waits for the server's GIL), or on a thread of this one (`in_process`)."""
    if not in_process:
        return await ProcessEngine.launch(config)
    loop = asyncio.get_running_loop()
    engine = await loop.run_in_executor(None, build_engine, config)
    engine.start(loop)
    return engine
