"""Output shaping: what a request's rows produced, turned into its events.

Reply tokens collect per request and become one TokensEvent, with the text of all of them decoded
at once, when events are flushed: per-token host work is a few comparisons. A request with stop
strings decodes every token to look for them. Every event, a failure too, marks its sink dirty,
so the next flush delivers it.
"""

from __future__ import annotations

from typing import Any, Protocol

from sinkcache.core.session import Request, Session
from sinkcache.events import EndReason, Event, ScoresEvent, TokensEvent, TurnEndEvent


class OutputSink(Protocol):
    """Where a request's events go (sinkcache.host.commands.Outbox implements it)."""

    def push(self, event: Event) -> None: ...

    def fail(self, error: BaseException) -> None: ...


class ReplyOutputs:
    def __init__(self, eos_ids: frozenset[int]) -> None:
        self.eos_ids = eos_ids
        self._dirty: set[Any] = set()  # sinks with new events since the last flush
        # Requests holding reply tokens not yet sent, with their sessions. Those tokens join the
        # session's stream (session.tokens) when they become an event, in one extend.
        self._unsent: dict[Request, Session] = {}

    def token(self, session: Session, request: Request, token: int) -> tuple[EndReason, str] | None:
        """Take one reply token into the stream; returns (reason, detail) if the reply ends."""
        _, noted = self.tokens([(session, request)], [token], 0)
        return noted[0][2] if noted else None

    def tokens(
        self, rows: list[tuple[Session, Request]], tokens: list[int], snapshot_every: int
    ) -> tuple[int, list[tuple[Session, Request, tuple[EndReason, str] | None]]]:
        """Take a step's reply tokens, one per row (rows whose request has finished are skipped),
        in one pass. Returns how many were taken, and in row order the rows whose reply ends,
        with (reason, detail), and those whose reply reached a multiple of `snapshot_every`
        tokens without ending, with None (none if `snapshot_every` is 0)."""
        eos_ids, unsent = self.eos_ids, self._unsent
        noted: list[tuple[Session, Request, tuple[EndReason, str] | None]] = []
        taken = 0
        for (session, request), token in zip(rows, tokens, strict=True):
            if request.finished:
                continue
            taken += 1
            request.emitted += 1
            request.last_token = token
            if not request.unsent:
                unsent[request] = session
            request.unsent.append(token)
            params = request.generation
            if token in eos_ids and not params.ignore_eos:
                noted.append((session, request, (EndReason.EOS, "")))
            elif params.stop and self._hit_stop(request, self._materialize(request)):
                noted.append((session, request, (EndReason.STOP, request.text_tail)))
            elif request.emitted >= params.max_new_tokens:
                noted.append((session, request, (EndReason.LENGTH, "")))
            elif request.cancelled and request.emitted >= request.planned:
                noted.append((session, request, (EndReason.CANCELLED, "")))
            elif snapshot_every and request.emitted % snapshot_every == 0:
                noted.append((session, request, None))
        return taken, noted

    def scores(self, request: Request, logprobs: list[float], first_pos: int) -> None:
        self._push(request, ScoresEvent(logprobs, first_pos))

    def end(self, request: Request, event: TurnEndEvent) -> None:
        self._push(request, event)

    def fail(self, request: Request, error: BaseException) -> None:
        if request.unsent:
            self._materialize(request)
        request.sink.fail(error)
        self._dirty.add(request.sink)

    @property
    def pending_sinks(self) -> int:
        """About how many sinks the next flush will wake."""
        return len(self._unsent) + len(self._dirty)

    def settle(self, request: Request) -> None:
        """Have the request's reply tokens so far in its session's stream (before reading it)."""
        if request.unsent:
            self._materialize(request)

    def take_dirty(self) -> set[Any]:
        """Sinks with new events since the last call (pending reply tokens become events now)."""
        for request in list(self._unsent):
            self._materialize(request)
        dirty, self._dirty = self._dirty, set()
        return dirty

    def _push(self, request: Request, event: Event) -> None:
        if request.unsent:  # keep events in order: reply tokens first
            self._materialize(request)
        request.sink.push(event)
        self._dirty.add(request.sink)

    def _materialize(self, request: Request) -> str:
        """Turn a request's unsent reply tokens into one TokensEvent; returns its text."""
        ids, request.unsent = request.unsent, []
        session = self._unsent.pop(request, None)
        if not ids:
            return ""
        session.tokens.extend(ids)
        text = ""
        if request.decoder is not None:
            eos = ids[-1] in self.eos_ids and not request.generation.ignore_eos
            text = request.decoder.feed(ids[:-1] if eos else ids)  # EOS has no text
        request.sink.push(TokensEvent(ids, text, request.stream_start + request.emitted))
        self._dirty.add(request.sink)
        return text

    @staticmethod
    def _hit_stop(request: Request, text: str) -> bool:
        tail = request.text_tail + text
        for stop in request.generation.stop:
            if stop in tail:
                request.text_tail = stop
                return True
        longest = max(len(s) for s in request.generation.stop)
        request.text_tail = tail[-(longest - 1) :] if longest > 1 else ""
        return False
