"""Tools built on the engine (perplexity evaluation)."""
