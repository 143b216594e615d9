"""What one engine step runs: the plan the runner executes, and the scheduler's record of whose
rows they are (so the engine can apply the step's outputs). Plain data, shared by scheduler,
runner and engine; none of them reaches into another's state through it."""

from __future__ import annotations

from dataclasses import dataclass, field

from sinkcache.core.sampling import SamplerVariant
from sinkcache.core.session import Request, Session


@dataclass
class PrefillChunk:
    """Consecutive tokens of one slot's stream to write, starting at token counter `start`."""

    slot: int
    tokens: list[int]
    start: int
    sample: bool = False  # sample the token that follows the chunk
    score_targets: list[int] | None = None  # the known next token after each chunk token


@dataclass
class StepPlan:
    """The runner's input: decode rows by slot, then prefill chunks."""

    decode_slots: list[int] = field(default_factory=list)
    prefill: list[PrefillChunk] = field(default_factory=list)
    variant: SamplerVariant = SamplerVariant.GREEDY
    # Changes whenever decode_slots changes, so the runner can keep its device copy of them.
    decode_version: int = -1

    @property
    def num_tokens(self) -> int:
        return len(self.decode_slots) + sum(len(c.tokens) for c in self.prefill)


@dataclass
class ChunkRecord:
    session: Session
    request: Request
    length: int
    sample: bool
    score_entries: int  # scores this chunk returns (one per token when scoring)
    valid_scores: int  # the leading entries that score a known next token
    first_scored_pos: int  # stream position of the token the first score is for
    last: bool  # the request's final chunk


@dataclass
class StepRecord:
    """A plan plus which session and request each of its rows belongs to."""

    plan: StepPlan
    decode: list[tuple[Session, Request]] = field(default_factory=list)
    chunks: list[ChunkRecord] = field(default_factory=list)
