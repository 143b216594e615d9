"""An endless chat as one token stream, formatted by the model's own chat template.

A session never re-renders its history: each turn appends the tokens of that turn alone. Chat
templates render whole conversations, so a turn's own text is found by difference: render
[prefix + new message] and [prefix] and keep what the new message added, with dummy prefix messages
chosen so that the template accepts the conversation (ChatML, Llama 3, Mistral/Llama 2 with their
user/assistant alternation). The message content is rendered as a placeholder and split out, so
template text is tokenized with special tokens recognized while user content is tokenized with
`split_special_tokens=True`: content can never inject a control token. Rendering is done once per
(role, first); a turn then costs only tokenizing.

Tokenizers that put a space before the first word of a text (SentencePiece `Metaspace`, a
`Prepend('▁')` normalizer, ByteLevel with `add_prefix_space`) do so only at the start of the
stream here: text appended later is tokenized as a continuation, by a copy of the tokenizer with
that prefix turned off, so the stream's text is exactly the template's text.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jinja2

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")

_CONTENT = "SINKSERVEchatCONTENTplaceholder"  # letters only: no template or tokenizer alters it
_PADDED_CONTENT = f" \n{_CONTENT}\n "
_DUMMY_CONTENT = {"system": "Be brief.", "user": "Hi.", "assistant": "Hello."}
# Conversations a later turn of each role may follow, tried in order until the template accepts one.
_PREFIXES_BEFORE = {
    "user": (("user", "assistant"), ("system", "user", "assistant")),
    "system": (("user", "assistant"), ("system", "user", "assistant")),
    "assistant": (("user",), ("system", "user")),
}
_PREFIXES_BEFORE_GENERATION = (("user",), ("system", "user"))


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot be used turn by turn (or has no such turn)."""


@dataclass(frozen=True)
class _TurnTemplate:
    """The text a template puts around one message's content."""

    before: str
    after: str
    strips_content: bool  # the template trims the content (Llama 3 `| trim`, Llama 2 `.strip()`)


class ChatFormat:
    """Token ids for chat turns appended one by one to a session's stream."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if not tokenizer.chat_template:
            raise ChatTemplateError("the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self._continuation_backend = _without_prefix_space(tokenizer)
        self._backend = _plain_backend(tokenizer)
        plain_ids = tokenizer.encode("a")
        bos = tokenizer.bos_token_id
        self._bos_ids = [bos] if bos is not None and plain_ids[:1] == [bos] else []
        self._special_ids = {
            i for i, token in tokenizer.added_tokens_decoder.items() if token.special
        }
        self._turn_templates: dict[tuple[str, bool], _TurnTemplate] = {}
        self._template_cache: dict[tuple[str, bool], tuple[int, ...]] = {}  # template text's ids

    def turn_tokens(self, role: str, content: str, first: bool) -> list[int]:
        """One message: the whole template render for a session's first turn, else only its own text."""
        turn = self._turn_template(_checked_role(role), first)
        if turn.strips_content:
            content = content.strip()
        return self._encode_pieces(
            [(turn.before, False), (content, True), (turn.after, False)], first
        )

    def generation_prompt_tokens(self) -> list[int]:
        """What opens an assistant reply (ChatML: "<|im_start|>assistant\\n"; Mistral: nothing)."""
        return list(self._generation_prompt_ids)

    def reply_closing_tokens(self, ended_with_eos: bool) -> list[int]:
        """What must follow a generated reply before the next turn.

        The template closes an assistant message with `reply_stop_token_id` and more (ChatML:
        "<|im_end|>\\n"). A reply that ended with that token needs only the rest ("\\n"); one cut
        short (max tokens, cancel) needs all of it. Text the template puts before the stop token
        (Llama 2's " </s>") counts as the model's to write.
        """
        after_ids = self._assistant_closing_ids
        stop_at = self._assistant_stop_index
        if ended_with_eos and stop_at is not None:
            return after_ids[stop_at + 1 :]
        return list(after_ids)

    @property
    def reply_stop_token_id(self) -> int | None:
        """The special token the template ends an assistant message with: generation stops on it."""
        stop_at = self._assistant_stop_index
        return None if stop_at is None else self._assistant_closing_ids[stop_at]

    def text_tokens(self, text: str, first: bool, special_tokens: bool = False) -> list[int]:
        """Raw text appended to a stream; a session's first append gets the BOS the tokenizer adds
        to plain text, if any. Special tokens in `text` are plain text unless `special_tokens`."""
        ids = self._encode(text, at_start=first, as_text=not special_tokens)
        return self._bos_ids + ids if first else ids

    # rendering

    def _turn_template(self, role: str, first: bool) -> _TurnTemplate:
        if (role, first) not in self._turn_templates:
            self._turn_templates[role, first] = self._find_turn_template(role, first)
        return self._turn_templates[role, first]

    def _find_turn_template(self, role: str, first: bool) -> _TurnTemplate:
        prefixes = [()] if first else _PREFIXES_BEFORE[role]
        errors = []
        for prefix_roles in prefixes:
            try:
                before, after = self._own_text(prefix_roles, role, _CONTENT).split(_CONTENT)
                padded = self._own_text(prefix_roles, role, _PADDED_CONTENT)
            except ChatTemplateError as error:
                errors.append(str(error))
                continue
            if padded == before + _PADDED_CONTENT + after:
                return _TurnTemplate(before, after, strips_content=False)
            if padded == before + _CONTENT + after:
                return _TurnTemplate(before, after, strips_content=True)
            errors.append("the template changes message content other than by trimming it")
        where = "a session's first turn" if first else "a later turn"
        raise ChatTemplateError(f"cannot format a {role!r} message as {where}: {'; '.join(errors)}")

    def _own_text(self, prefix_roles: tuple[str, ...], role: str, content: str) -> str:
        """The text that appending message (role, content) after the prefix adds to the render."""
        prefix = [{"role": r, "content": _DUMMY_CONTENT[r]} for r in prefix_roles]
        base = self._render(prefix) if prefix else ""
        full = self._render([*prefix, {"role": role, "content": content}])
        if not full.startswith(base):
            raise ChatTemplateError(f"rendering after {list(prefix_roles)} changes earlier text")
        own = full[len(base) :]
        if own.count(_CONTENT) != 1:
            raise ChatTemplateError(
                f"after {list(prefix_roles)} the content appears {own.count(_CONTENT)} times"
            )
        return own

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except jinja2.TemplateError as error:
            roles = [m["role"] for m in messages]
            raise ChatTemplateError(f"the template rejects roles {roles}: {error}") from error

    @functools.cached_property
    def _generation_prompt_ids(self) -> list[int]:
        errors = []
        for prefix_roles in _PREFIXES_BEFORE_GENERATION:
            prefix = [{"role": r, "content": _DUMMY_CONTENT[r]} for r in prefix_roles]
            try:
                base, prompted = (
                    self._render(prefix),
                    self._render(prefix, add_generation_prompt=True),
                )
            except ChatTemplateError as error:
                errors.append(str(error))
                continue
            if prompted.startswith(base):
                return self._encode_pieces([(prompted[len(base) :], False)], first=False)
            errors.append("the generation prompt changes earlier text")
        raise ChatTemplateError(f"cannot find the generation prompt: {'; '.join(errors)}")

    @functools.cached_property
    def _assistant_closing_ids(self) -> list[int]:
        return self._encode_pieces(
            [(self._turn_template("assistant", False).after, False)], first=False
        )

    @functools.cached_property
    def _assistant_stop_index(self) -> int | None:
        ids = self._assistant_closing_ids
        return next((i for i, token_id in enumerate(ids) if token_id in self._special_ids), None)

    # tokenizing

    def _encode_pieces(self, pieces: list[tuple[str, bool]], first: bool) -> list[int]:
        """Tokenize (text, is_content) pieces in order; only the stream's first text is at its start.
        The template's own pieces are the same few strings turn after turn: tokenized once."""
        ids: list[int] = []
        for text, is_content in pieces:
            if text:
                at_start = first and not ids
                if is_content:
                    ids += self._encode(text, at_start=at_start, as_text=True)
                else:
                    ids += self._template_ids(text, at_start)
        return ids

    def _template_ids(self, text: str, at_start: bool) -> tuple[int, ...]:
        key = (text, at_start)
        ids = self._template_cache.get(key)
        if ids is None:
            ids = self._template_cache[key] = tuple(self._encode(text, at_start, as_text=False))
        return ids

    def _encode(self, text: str, at_start: bool, as_text: bool) -> list[int]:
        """Tokenize `text`; `as_text` makes special-token strings in it plain text."""
        backend = self._continuation_backend
        if at_start or backend is None:
            backend = self._backend
            if backend is None:
                return self.tokenizer.encode(
                    text, add_special_tokens=False, split_special_tokens=as_text
                )
        backend.encode_special_tokens = as_text
        return backend.encode(text, add_special_tokens=False).ids


def _checked_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown chat role {role!r}: expected one of {', '.join(ROLES)}")
    return role


def _plain_backend(tokenizer: PreTrainedTokenizerBase) -> Tokenizer | None:
    """The fast tokenizer's backend, to be called directly: what `tokenizer.encode(text,
    add_special_tokens=False, split_special_tokens=...)` runs, without its Python wrapping (most
    of a short turn's encoding time). None for a slow tokenizer, or a backend set to truncate or
    pad (which encode would turn off first)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return None
    return backend


def _without_prefix_space(tokenizer: PreTrainedTokenizerBase) -> Tokenizer | None:
    """A copy of the tokenizer's backend that adds no prefix space; None if it adds none anyway."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    config = json.loads(backend.to_str())
    changed = False
    for key in ("normalizer", "pre_tokenizer"):
        component, component_changed = _drop_prefix_space(config.get(key))
        config[key] = component
        changed |= component_changed
    if not changed:
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_str(json.dumps(config))


def _drop_prefix_space(component: dict[str, Any] | None) -> tuple[dict[str, Any] | None, bool]:
    """(component without the step that prefixes a space, whether there was one)."""
    if component is None:
        return None, False
    kind = component["type"]
    if kind == "Prepend":
        return None, True
    if kind == "Metaspace" and component.get("prepend_scheme") != "never":
        return {**component, "prepend_scheme": "never"}, True
    if kind == "ByteLevel" and component.get("add_prefix_space"):
        return {**component, "add_prefix_space": False}, True
    if kind == "Sequence":
        key = "normalizers" if "normalizers" in component else "pretokenizers"
        parts = [_drop_prefix_space(part) for part in component[key]]
        kept = [part for part, _ in parts if part is not None]
        return {**component, key: kept}, any(changed for _, changed in parts)
    return component, False
