"""Model families: one row of data per decoder family the engine runs.

A row says, as gpt-fast's `ModelArgs` and `convert_hf_checkpoint.py` weight map do: which Hugging
Face config fields fill a `ModelShape` (beyond those every family shares), which block differences
the family fixes (Qwen2's q/k/v bias, Qwen3's per-head q/k norm), and which checkpoint tensors make
each of our weights. The map is keyed by our name, because one fused weight of ours (qkv_proj,
gate_up_proj) is several tensors in some checkpoints and one in others (Phi-3).

Adding a family is one row; the model (sinkcache/core/model.py) changes only where its block
really differs, as a flag on `ModelShape` that it reads. Torch-free: transformers is imported only
to build a config for tests and RoPE tables.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sinkcache.config import ModelShape, UnsupportedModelError

# RoPE variants whose frequencies do not depend on the sequence length: with them attention
# depends only on the distance between query and key, which StreamingLLM positions rely on.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

# ModelShape field <- the HF config attribute holding it, alike in every family here.
SHARED_CONFIG_FIELDS: Mapping[str, str] = MappingProxyType(
    {
        "vocab_size": "vocab_size",
        "hidden_size": "hidden_size",
        "intermediate_size": "intermediate_size",
        "num_layers": "num_hidden_layers",
        "num_heads": "num_attention_heads",
        "num_kv_heads": "num_key_value_heads",
        "head_dim": "head_dim",
        "rms_norm_eps": "rms_norm_eps",
        "max_position_embeddings": "max_position_embeddings",
        "tie_word_embeddings": "tie_word_embeddings",
        "bos_token_id": "bos_token_id",
    }
)

# How the blocks of families differ: ModelShape flags, False unless a row fixes or reads them.
BLOCK_FLAGS = ("qkv_bias", "o_proj_bias", "qk_norm")

# How a config's value is read into the ModelShape field (the rest as they are).
_CASTS = {
    "rms_norm_eps": float,
    "max_position_embeddings": int,
    "tie_word_embeddings": bool,
    **dict.fromkeys(BLOCK_FLAGS, bool),
}


def _same(value: Any) -> Any:
    return value


_LAYER = "model.layers.{}."

# Our parameter name ("{}" = layer) <- the checkpoint tensors concatenated (dim 0) to make it, in
# the Llama layout that most families share. Entries for parameters a shape does not have (biases,
# q/k norm) are simply not looked up.
LLAMA_WEIGHTS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "embed_tokens.weight": ("model.embed_tokens.weight",),
        "layers.{}.input_norm.weight": (_LAYER + "input_layernorm.weight",),
        "layers.{}.attention.qkv_proj.weight": tuple(
            _LAYER + f"self_attn.{p}_proj.weight" for p in "qkv"
        ),
        "layers.{}.attention.qkv_proj.bias": tuple(
            _LAYER + f"self_attn.{p}_proj.bias" for p in "qkv"
        ),
        "layers.{}.attention.q_norm.weight": (_LAYER + "self_attn.q_norm.weight",),
        "layers.{}.attention.k_norm.weight": (_LAYER + "self_attn.k_norm.weight",),
        "layers.{}.attention.o_proj.weight": (_LAYER + "self_attn.o_proj.weight",),
        "layers.{}.attention.o_proj.bias": (_LAYER + "self_attn.o_proj.bias",),
        "layers.{}.post_attention_norm.weight": (_LAYER + "post_attention_layernorm.weight",),
        "layers.{}.mlp.gate_up_proj.weight": (
            _LAYER + "mlp.gate_proj.weight",
            _LAYER + "mlp.up_proj.weight",
        ),
        "layers.{}.mlp.down_proj.weight": (_LAYER + "mlp.down_proj.weight",),
        "norm.weight": ("model.norm.weight",),
        "lm_head.weight": ("lm_head.weight",),
    }
)


@dataclass(frozen=True)
class ModelFamily:
    """One decoder family: how its HF config and checkpoint map onto a ModelShape and our weights."""

    model_type: str  # config.model_type, also ModelShape.family
    architecture: str  # the CausalLM class in config.architectures
    label: str  # how docs and messages name it
    # ModelShape field <- HF config attribute, beyond SHARED_CONFIG_FIELDS (block flags mostly).
    config_fields: Mapping[str, str] = field(default_factory=dict)
    # ModelShape fields every model of the family has, whatever its config says.
    fixed: Mapping[str, Any] = field(default_factory=dict)
    weights: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: LLAMA_WEIGHTS)


FAMILIES: dict[str, ModelFamily] = {
    row.model_type: row
    for row in (
        # Llama's attention_bias puts a bias on q, k, v and o alike.
        ModelFamily(
            "llama",
            "LlamaForCausalLM",
            "Llama 2/3",
            config_fields={"qkv_bias": "attention_bias", "o_proj_bias": "attention_bias"},
        ),
        ModelFamily("mistral", "MistralForCausalLM", "Mistral"),
        ModelFamily("qwen2", "Qwen2ForCausalLM", "Qwen2", fixed={"qkv_bias": True}),
        ModelFamily(
            "qwen3",
            "Qwen3ForCausalLM",
            "Qwen3",
            config_fields={"qkv_bias": "attention_bias", "o_proj_bias": "attention_bias"},
            fixed={"qk_norm": True},
        ),
        # Phi-3 checkpoints store q/k/v and gate/up already fused, in our order. Its LongRoPE
        # models (128k) are refused with the RoPE check; Phi-3-mini's head_dim (96) is one the
        # Triton kernels cannot tile (sinkcache.core.attention.backend).
        ModelFamily(
            "phi3",
            "Phi3ForCausalLM",
            "Phi-3",
            weights={
                **LLAMA_WEIGHTS,
                "layers.{}.attention.qkv_proj.weight": (_LAYER + "self_attn.qkv_proj.weight",),
                "layers.{}.mlp.gate_up_proj.weight": (_LAYER + "mlp.gate_up_proj.weight",),
            },
        ),
    )
}


def supported_architectures() -> list[str]:
    """The CausalLM class names sinkserve runs, sorted (for messages and checks)."""
    return sorted(row.architecture for row in FAMILIES.values())


def family_of(config: Any) -> ModelFamily:
    """The table row of a transformers config, refusing a family sinkserve does not run."""
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not any(a in supported_architectures() for a in archs):
        raise UnsupportedModelError(
            f"unsupported architecture {archs[0]!r}: sinkserve runs "
            f"{', '.join(supported_architectures())}"
        )
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}: sinkserve runs {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def shape_from_hf_config(config: Any) -> ModelShape:
    """Read a transformers `PretrainedConfig` into a `ModelShape`, refusing what we cannot run."""
    family = family_of(config)
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"unsupported activation {config.hidden_act!r} (need silu)")
    if getattr(config, "mlp_bias", False):
        raise UnsupportedModelError("unsupported: MLP bias")
    rope = _rope_parameters(config)
    if rope.get("rope_type", "default") not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported RoPE type {rope.get('rope_type')!r}: StreamingLLM needs position-independent "
            f"frequencies ({', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    rotary_share = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if rotary_share != 1.0:
        raise UnsupportedModelError(
            f"unsupported partial RoPE (partial_rotary_factor {rotary_share}): sinkserve rotates "
            "whole heads"
        )

    values: dict[str, Any] = {}
    for name, attr in {**SHARED_CONFIG_FIELDS, **family.config_fields}.items():
        value = getattr(config, attr, None)
        if value is not None:
            values[name] = _CASTS.get(name, _same)(value)
    values.setdefault("num_kv_heads", values["num_heads"])
    values.setdefault("head_dim", values["hidden_size"] // values["num_heads"])
    eos = getattr(config, "eos_token_id", None)
    eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (int(eos),))
    return ModelShape(
        **values,
        **family.fixed,
        family=family.model_type,
        rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        rope_parameters=rope,
        eos_token_ids=eos_ids,
    )


def shape_to_hf_config(shape: ModelShape) -> Any:
    """A transformers config of the shape's family (tests build reference models from it; RoPE
    tables read their frequencies through it). Refuses a shape its family cannot express."""
    from transformers import AutoConfig

    family = FAMILIES[shape.family]
    fields = {**SHARED_CONFIG_FIELDS, **family.config_fields}
    kwargs: dict[str, Any] = {}
    for name, attr in fields.items():
        value = getattr(shape, name)
        if kwargs.setdefault(attr, value) != value:
            sharing = " and ".join(other for other, same in fields.items() if same == attr)
            raise ValueError(
                f"{family.label} configs set {sharing} together ({attr}), this shape apart: {shape}"
            )
    defaults = {f.name: f.default for f in dataclasses.fields(ModelShape)}
    for flag in BLOCK_FLAGS:
        expected = family.fixed.get(flag, defaults[flag])
        if flag not in fields and getattr(shape, flag) != expected:
            raise ValueError(f"a {family.label} model has {flag}={expected}: {shape}")
    rope = dict(shape.rope_parameters)
    rope["rope_theta"] = shape.rope_theta
    kwargs.update(
        rope_parameters=rope,
        eos_token_id=list(shape.eos_token_ids) or None,
        pad_token_id=None,  # Phi-3's default (32000) would not fit a small test vocabulary
    )
    return AutoConfig.for_model(family.model_type, **kwargs)


def hf_weight_names(family: ModelFamily, our_name: str) -> tuple[str, ...]:
    """The checkpoint tensors that, concatenated on dim 0, make our parameter `our_name`."""
    layer = re.match(r"layers\.(\d+)\.", our_name)
    template = our_name if layer is None else our_name.replace(layer.group(0), "layers.{}.", 1)
    if template not in family.weights:
        raise UnsupportedModelError(f"{family.label} has no checkpoint tensor for {our_name!r}")
    return tuple(
        name.format(layer.group(1)) if layer else name for name in family.weights[template]
    )


def _rope_parameters(config: Any) -> dict[str, Any]:
    """transformers 5 keeps RoPE settings in `rope_parameters`; older configs in `rope_scaling`."""
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = dict(params)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    return params
