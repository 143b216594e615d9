"""Request intake: refuse a bad append before it is queued, and lay out a good one once it runs.

Validation happens at submit time, so a caller gets its error at once and nothing is queued.
Encoding waits until the request becomes the session's active one, because a chat turn's tokens
depend on how the session's previous reply ended (an unfinished reply is closed first).
"""

from __future__ import annotations

from typing import Any, Protocol

from sinkcache.core.sampling import SamplerVariant, SlotSampler
from sinkcache.core.session import Request, Session
from sinkcache.errors import InvalidRequestError
from sinkcache.inputs import (
    CHAT_ROLES,
    AppendInput,
    ChatTurn,
    GenerationParams,
    SamplingError,
    TextInput,
    TokenInput,
)

MAX_APPEND_TOKENS = 1 << 22


class TextCodec(Protocol):
    """Tokenizer-side services the engine needs (sinkcache.text.codec.TokenizerCodec)."""

    vocab_size: int
    eos_ids: frozenset[int]

    def encode(
        self, item: AppendInput, first: bool, close_reply: int | None, reply: bool
    ) -> list[int]: ...

    def new_decoder(self) -> Any: ...


class RequestIntake:
    def __init__(
        self, codec: TextCodec | None, vocab_size: int, window: int, sampler: SlotSampler
    ) -> None:
        self.codec = codec
        self.vocab_size = vocab_size
        self.window = window
        self.sampler = sampler

    def new_request(
        self,
        item: AppendInput,
        generation: GenerationParams | None,
        score: bool,
        sink: Any,
        max_chunk: int | None,
    ) -> Request:
        """A validated request (raises InvalidRequestError, before anything is queued).

        `max_chunk` caps the prefill chunk (1 feeds a token per step, as the paper's evaluation).
        """
        self._validate(item, generation)
        if max_chunk is not None and not 1 <= max_chunk <= self.window:
            raise InvalidRequestError(f"chunk must be in [1, {self.window}], got {max_chunk}")
        return Request(
            input=item,
            generation=generation,
            score=score,
            sink=sink,
            chat=isinstance(item, ChatTurn),
            max_chunk=max_chunk,
        )

    def lay_out(self, session: Session, request: Request) -> None:
        """Encode the now-active request and decide what it feeds: the session's pending token,
        then its input; without a reply the input's last token stays pending. Its tokens join the
        session's stream. Raises InvalidRequestError if there is nothing it could run."""
        try:
            tokens = self._encode(session, request)
        except Exception as error:  # a template that cannot render this turn, say
            raise InvalidRequestError(f"cannot encode append: {error}") from None
        stream = session.pending + tokens
        if request.generation is not None and not stream:
            raise InvalidRequestError("nothing to continue from: append some input")
        session.tokens.extend(tokens)
        request.tokens = tokens
        if request.generation is None:
            request.feed, session.pending = stream[:-1], stream[-1:]
            tail = session.pending
        else:
            request.feed, session.pending, tail = stream, [], [-1]
            request.variant = SamplerVariant.for_params(request.generation)
            self.sampler.configure(session.slot, request.generation)
            request.decoder = self.codec.new_decoder() if self.codec is not None else None
        if request.score:
            request.targets = request.feed[1:] + tail
        request.stream_start = session.stream_pos + len(request.feed)

    def _encode(self, session: Session, request: Request) -> list[int]:
        item = request.input
        first = session.stream_pos == 0
        if isinstance(item, TokenInput):
            session.open_reply = None
            return list(item.ids)
        close_reply = session.open_reply if request.chat else None
        session.open_reply = None
        return self.codec.encode(item, first, close_reply, request.generation is not None)

    def _validate(self, item: AppendInput, generation: GenerationParams | None) -> None:
        if isinstance(item, TokenInput):
            if len(item.ids) > MAX_APPEND_TOKENS:
                raise InvalidRequestError(f"append too long: {len(item.ids)} tokens")
            bad = [t for t in item.ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(f"token id {bad[0]} out of range [0, {self.vocab_size})")
        elif isinstance(item, ChatTurn | TextInput):
            if self.codec is None:
                raise InvalidRequestError("this model has no tokenizer: append token ids")
            if isinstance(item, ChatTurn) and item.role not in CHAT_ROLES:
                raise InvalidRequestError(
                    f"unknown chat role {item.role[:32]!r} (use {', '.join(CHAT_ROLES)})"
                )
            text = item.text if isinstance(item, TextInput) else item.content
            if len(text) > 4 * MAX_APPEND_TOKENS:
                raise InvalidRequestError(f"append too long: {len(text)} characters")
        else:
            raise InvalidRequestError(f"unsupported append input {type(item).__name__}")
        if generation is not None:
            try:
                generation.validate(self.vocab_size)
            except SamplingError as error:
                raise InvalidRequestError(str(error)) from None
            if generation.stop and self.codec is None:
                raise InvalidRequestError("stop strings need a tokenizer")
