"""Models: loading weights (local HF dirs, GGUF, random presets) and the embedded default assets."""
