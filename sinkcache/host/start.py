"""`start_engine`: a running engine for a server, in a child process or on a thread.

Torch-free on the default path: a replica whose engine runs in a child process never loads torch
in its own (gRPC) process.
"""

from __future__ import annotations

import asyncio

from sinkcache.config import EngineConfig
from sinkcache.host.process import ProcessEngine
from sinkcache.host.protocol import Engine


async def start_engine(config: EngineConfig, in_process: bool = False) -> Engine:
    """By default the engine runs in a child process of its own (so the engine loop never waits
    for the server's GIL); `in_process` runs it on a thread of this one."""
    config.validate()
    if not in_process:
        return await ProcessEngine.launch(config)
    from sinkcache.host.builder import build_engine

    loop = asyncio.get_running_loop()
    engine = await loop.run_in_executor(None, build_engine, config)
    engine.start(loop)
    return engine
