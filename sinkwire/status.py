"""StreamError: how a server ends a stream, with one gRPC status and a one-line message."""

from __future__ import annotations

import grpc

# A status message travels in a trailer (grpc-message), and trailers are small (16 KiB hard limit
# by default): a message that quotes client text must stay short, or the client gets a transport
# error ("Stream removed") instead of it.
MAX_MESSAGE_CHARS = 300
MAX_QUOTE_CHARS = 40


def one_line(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message` on one line, at most `limit` characters (cut with an ellipsis)."""
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 1] + "…"


def quoted(text: str, limit: int = MAX_QUOTE_CHARS) -> str:
    """Client text as it may appear inside a message: repr'd, at most `limit` characters of it."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"


class StreamError(Exception):
    """End the stream with this status; `message` is what the client reads (one short line)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        message = one_line(message)
        super().__init__(message)
        self.code = code
        self.message = message
