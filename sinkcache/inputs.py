"""What an append carries: the input (raw text, token ids, or one chat turn) and, when a reply is
wanted, its generation parameters. Plain data, torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field

CHAT_ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


@dataclass(frozen=True)
class TextInput:
    text: str


@dataclass(frozen=True)
class TokenInput:
    ids: tuple[int, ...]


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


AppendInput = TextInput | TokenInput | ChatTurn


class SamplingError(ValueError):
    """Generation parameters out of range."""


@dataclass(frozen=True)
class GenerationParams:
    """What a request asks of one generated reply. temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None  # None: drawn at random for the request
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def validate(self, vocab_size: int) -> None:
        if not 1 <= self.max_new_tokens <= 1_000_000_000:
            raise SamplingError(f"max_new_tokens must be in [1, 1e9], got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 100.0 or self.temperature != self.temperature:
            raise SamplingError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0 <= self.top_k <= vocab_size:
            raise SamplingError(f"top_k must be in [0, {vocab_size}], got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise SamplingError(f"seed must be in [0, 2^63), got {self.seed}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for stop in self.stop:
            if not 0 < len(stop) <= MAX_STOP_LENGTH:
                raise SamplingError(f"stop strings must be 1..{MAX_STOP_LENGTH} characters")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def filtered(self) -> bool:
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)
