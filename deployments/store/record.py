"""SessionRecord: everything needed to rebuild one StreamingLLM session anywhere.

A session's cache is a function of the ids it holds (the sinks, then the window tail), so the
record keeps those ids rather than any KV: a rebuild is one prefill of `tokens`. The byte form is
what the stores keep; it is versioned so that a store outliving a release can still be read.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

RECORD_VERSION = 1

# version, has_open_reply, open_reply, stream_pos, epoch, sink, window, updated_at, token count
_HEADER = struct.Struct("<BBiQQIIdI")
_TEXT_LENGTH = struct.Struct("<H")
_TOKEN_BYTES = array("i").itemsize
assert _TOKEN_BYTES == 4, "array('i') must hold int32 on this platform"


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One session's checkpoint. `epoch` and `replica_id` say who may write it (fencing)."""

    session_id: str
    tokens: Sequence[int]  # held ids in stream order: the sinks, then the tail
    stream_pos: int  # tokens in the stream so far, >= len(tokens)
    open_reply: int | None  # chat state: None, -1, or the EOS id that ended the last reply
    owner: str  # API key name that opened the session; "" when auth is off
    model: str
    sink: int
    window: int
    epoch: int
    replica_id: str  # who holds it now; "" when nobody does (offloaded)
    updated_at: float  # unix seconds

    def __post_init__(self) -> None:
        if self.stream_pos < len(self.tokens):
            raise ValueError(
                f"session {self.session_id}: stream_pos {self.stream_pos} < {len(self.tokens)} held tokens"
            )

    @classmethod
    def from_snapshot_bytes(cls, token_bytes: bytes, **fields: object) -> SessionRecord:
        """A record whose tokens come as native int32 bytes (an engine snapshot's), unconverted."""
        tokens = array("i")
        tokens.frombytes(token_bytes)
        return cls(tokens=tokens, **fields)

    def token_bytes(self) -> bytes:
        """The tokens as native int32 bytes (what an engine restores a session from)."""
        return array("i", self.tokens).tobytes()

    def to_bytes(self) -> bytes:
        """The stored form; ValueError when a field does not fit it (an id outside int32...)."""
        try:
            tokens = array("i", self.tokens)
            header = _HEADER.pack(
                RECORD_VERSION,
                self.open_reply is not None,
                0 if self.open_reply is None else self.open_reply,
                self.stream_pos,
                self.epoch,
                self.sink,
                self.window,
                self.updated_at,
                len(tokens),
            )
            texts = b"".join(
                _encode_text(text)
                for text in (self.session_id, self.owner, self.model, self.replica_id)
            )
        except (struct.error, OverflowError, TypeError) as error:
            raise ValueError(f"session {self.session_id} cannot be encoded: {error}") from None
        if sys.byteorder != "little":
            tokens.byteswap()
        return header + texts + tokens.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> SessionRecord:
        if not data or data[0] != RECORD_VERSION:
            version = data[0] if data else None
            raise ValueError(f"session record version {version} is not {RECORD_VERSION}")
        (
            _,
            has_open_reply,
            open_reply,
            stream_pos,
            epoch,
            sink,
            window,
            updated_at,
            token_count,
        ) = _HEADER.unpack_from(data)
        offset = _HEADER.size
        session_id, offset = _decode_text(data, offset)
        owner, offset = _decode_text(data, offset)
        model, offset = _decode_text(data, offset)
        replica_id, offset = _decode_text(data, offset)
        if len(data) - offset != token_count * _TOKEN_BYTES:
            raise ValueError(f"session record {session_id}: {token_count} tokens do not fit")
        tokens = array("i")
        tokens.frombytes(data[offset:])
        if sys.byteorder != "little":
            tokens.byteswap()
        return cls(
            session_id=session_id,
            tokens=tuple(tokens),
            stream_pos=stream_pos,
            open_reply=open_reply if has_open_reply else None,
            owner=owner,
            model=model,
            sink=sink,
            window=window,
            epoch=epoch,
            replica_id=replica_id,
            updated_at=updated_at,
        )


def _encode_text(text: str) -> bytes:
    raw = text.encode()
    return _TEXT_LENGTH.pack(len(raw)) + raw


def _decode_text(data: bytes, offset: int) -> tuple[str, int]:
    (length,) = _TEXT_LENGTH.unpack_from(data, offset)
    start = offset + _TEXT_LENGTH.size
    return data[start : start + length].decode(), start + length
