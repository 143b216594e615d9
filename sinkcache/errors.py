"""The errors an engine caller can act on; each maps to one gRPC status (deployments.convert).

Torch-free, so the front ends (the replica's gRPC process, gateways, tests) can tell them apart
without loading the engine. They pickle, so they cross the engine process's socket intact.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of the errors a caller can act on."""


class SessionNotFoundError(EngineError):
    """No such session (never opened, closed, or expired)."""


class SessionExistsError(EngineError):
    """A session with this id is already open."""


class InvalidRequestError(EngineError):
    """The request is malformed or out of range; nothing was queued."""


class ArenaFullError(EngineError):
    """Every cache slot is taken."""


class EngineStoppedError(EngineError):
    """The engine is not running (stopping, failed, or its process is gone)."""
