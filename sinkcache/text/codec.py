"""TokenizerCodec: the engine's one door to the tokenizer (encode appends, decode replies)."""

from __future__ import annotations

from typing import Any

from sinkcache.config import ModelShape
from sinkcache.inputs import AppendInput, ChatTurn, TextInput
from sinkcache.text.chat import ChatFormat
from sinkcache.text.detokenize import StreamDecoder, TokenTable


class TokenizerCodec:
    def __init__(self, tokenizer: Any, shape: ModelShape) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = shape.vocab_size
        self.chat = ChatFormat(tokenizer)
        eos = set(shape.eos_token_ids)
        for token in (tokenizer.eos_token_id, self.chat.reply_stop_token_id):
            if token is not None:
                eos.add(token)
        self.eos_ids = frozenset(eos)
        self.table = TokenTable.from_tokenizer(tokenizer)

    def encode(
        self, item: AppendInput, first: bool, close_reply: int | None, reply: bool
    ) -> list[int]:
        """Tokens for one append; a chat turn first closes an unfinished assistant reply and, when
        a reply is wanted, ends with the generation prompt."""
        if isinstance(item, TextInput):
            return self.chat.text_tokens(item.text, first)
        assert isinstance(item, ChatTurn)
        tokens: list[int] = []
        if close_reply is not None and not first:
            ended_with_stop = close_reply == self.chat.reply_stop_token_id
            tokens += self.chat.reply_closing_tokens(ended_with_eos=ended_with_stop)
        tokens += self.chat.turn_tokens(item.role, item.content, first)
        if reply:
            tokens += self.chat.generation_prompt_tokens()
        return tokens

    def new_decoder(self) -> StreamDecoder:
        return StreamDecoder(self.table)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)
