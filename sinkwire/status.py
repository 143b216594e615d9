"""StreamError: how a server ends a stream, with one gRPC status and a one-line message."""

from __future__ import annotations

import re

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


# How a refusal that passes says when to try again: RESOURCE_EXHAUSTED for a full service or a key
# over its tokens_per_s quota ends its message with "retry in N s" (whole seconds).
_RETRY_HINT = re.compile(r"retry in (\d+) s")


def retry_after_s(message: str) -> float | None:
    """The seconds a status message says to wait before trying again, or None."""
    found = _RETRY_HINT.search(message)
    return float(found.group(1)) if found else None


class StreamError(Exception):
    """End the stream with this status; `message` is what the client reads (one short line)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        message = one_line(message)
        super().__init__(message)
        self.code = code
        self.message = message
