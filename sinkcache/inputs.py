"""What an append carries: raw text, token ids, or one chat turn."""

from __future__ import annotations

from dataclasses import dataclass

CHAT_ROLES = ("system", "user", "assistant")


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
