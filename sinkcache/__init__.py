"""sinkcache: the StreamingLLM engine (arena, model runner, scheduler); no Ray, no network."""
