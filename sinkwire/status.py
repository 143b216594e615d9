"""StreamError: how a server ends a stream, with one gRPC status and a one-line message."""

from __future__ import annotations

import grpc


class StreamError(Exception):
    """End the stream with this status; `message` is what the client reads (one line)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        message = " ".join(message.split())
        super().__init__(message)
        self.code = code
        self.message = message
