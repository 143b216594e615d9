"""StreamDecoder output, concatenated over any split of the ids, equals tokenizer.decode(all ids)."""

from __future__ import annotations

import json
import random
import time

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sinkcache.models.assets import load_default_tokenizer, shakespeare_text
from sinkcache.text.detokenize import StreamDecoder, TokenTable

MIXED_SCRIPTS = (
    "Héllo wörld — naïve café, Ελληνικά, Привет!\n\n你好，世界！日本語のテキスト。한국어\n"
    "Emoji: 😀🎉👩‍👩‍👧 🇫🇷 and math 𝕏 ∑ ∞ ☃\n\ttabs\r\nand  double  spaces  \n"
)


def sentencepiece_tokenizer(decoder: decoders.Decoder | None = None) -> PreTrainedTokenizerFast:
    """A small Llama-2/Mistral-style tokenizer, made here without network.

    BPE with byte fallback (ids 3..258 are <0x00>..<0xFF>) trained on Shakespeare, a Metaspace
    pre-tokenizer and, unless `decoder` is given, the Llama 2 decoder: Replace('▁', ' '),
    ByteFallback, Fuse, Strip(' ', 1, 0).
    """
    trainer_tokenizer = Tokenizer(models.BPE())
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=1000, show_progress=False)
    trainer_tokenizer.train_from_iterator([shakespeare_text(100_000)], trainer)
    trained = json.loads(trainer_tokenizer.to_str())["model"]

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{byte:02X}>": 3 + byte for byte in range(256)}
    for token in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(merge) for merge in trained["merges"]]
    backend = Tokenizer(
        models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    backend.decoder = decoder or decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    backend.add_special_tokens(
        [AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>", "[INST]")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def smollm2():
    return load_default_tokenizer()


@pytest.fixture(scope="module")
def sentencepiece():
    return sentencepiece_tokenizer()


def stream_decode(table: TokenTable, ids: list[int], rng: random.Random, max_batch: int = 8) -> str:
    """Feed `ids` in random batches (empty ones included) and join everything returned."""
    decoder = StreamDecoder(table)
    out, start = [], 0
    while start < len(ids):
        size = rng.randint(0, max_batch)
        out.append(decoder.feed(ids[start : start + size]))
        start += size
    out.append(decoder.flush())
    return "".join(out)


def real_text_ids(tokenizer) -> list[int]:
    text = shakespeare_text(30_000) + MIXED_SCRIPTS + shakespeare_text(2_000)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    # Special tokens and a character split right before one.
    split_char = tokenizer("😀", add_special_tokens=False).input_ids
    return [*ids, tokenizer.eos_token_id, *split_char[:1], tokenizer.eos_token_id, *ids[:50]]


def random_ids(tokenizer, rng: random.Random, count: int) -> list[int]:
    """Random ids, half of them pieces of multi-byte characters, so that UTF-8 breaks often."""
    partial_chars = tokenizer(MIXED_SCRIPTS, add_special_tokens=False).input_ids
    return [
        rng.choice(partial_chars) if rng.random() < 0.5 else rng.randrange(len(tokenizer))
        for _ in range(count)
    ]


def test_byte_level_table_is_recognized(smollm2):
    assert TokenTable.from_tokenizer(smollm2).kind == "byte_level"


def test_byte_level_real_text(smollm2):
    table = TokenTable.from_tokenizer(smollm2)
    ids = real_text_ids(smollm2)
    expected = smollm2.decode(ids)
    assert "😀" in expected and "你好" in expected and "<|im_end|>" in expected
    for seed in range(5):
        assert stream_decode(table, ids, random.Random(seed)) == expected


def test_byte_level_random_ids_match_decode_replacement_chars(smollm2):
    """Invalid UTF-8 becomes U+FFFD exactly where decode puts it; a dangling partial character
    is held back by feed and comes out of flush as U+FFFD."""
    table = TokenTable.from_tokenizer(smollm2)
    replacements = 0
    for seed in range(40):
        rng = random.Random(seed)
        ids = random_ids(smollm2, rng, 300)
        expected = smollm2.decode(ids)
        replacements += expected.count("\ufffd")
        assert stream_decode(table, ids, rng) == expected, seed
    assert replacements > 100  # the case under test did happen


def test_partial_character_waits_for_its_last_byte(smollm2):
    table = TokenTable.from_tokenizer(smollm2)
    pieces = smollm2("😀", add_special_tokens=False).input_ids
    assert len(pieces) > 1  # byte-level BPE splits this emoji
    decoder = StreamDecoder(table)
    assert [decoder.feed([piece]) for piece in pieces] == [""] * (len(pieces) - 1) + ["😀"]
    decoder.feed(pieces[:1])
    assert decoder.flush() == "\ufffd" == smollm2.decode(pieces[:1])


def test_ids_without_a_token_are_skipped_like_decode(smollm2, sentencepiece):
    for tokenizer in (smollm2, sentencepiece):
        table = TokenTable.from_tokenizer(tokenizer)
        ids = tokenizer("to be, or not", add_special_tokens=False).input_ids
        ids = [*ids[:2], len(tokenizer) + 7, *ids[2:]]
        assert stream_decode(table, ids, random.Random(0)) == tokenizer.decode(ids)


def test_sentencepiece_table_is_recognized(sentencepiece):
    table = TokenTable.from_tokenizer(sentencepiece)
    assert table.kind == "byte_fallback"
    assert (table.strip_count, table.strip_char) == (1, " ")
    assert len(table.byte_of_token) == 256


def test_sentencepiece_real_text(sentencepiece):
    table = TokenTable.from_tokenizer(sentencepiece)
    ids = real_text_ids(sentencepiece)
    assert any(token_id in table.byte_of_token for token_id in ids)  # byte fallback is exercised
    expected = sentencepiece.decode(ids)
    assert "😀" in expected and "你好" in expected
    for seed in range(5):
        assert stream_decode(table, ids, random.Random(seed)) == expected


def test_sentencepiece_random_ids(sentencepiece):
    """Byte runs that are not valid UTF-8 become one U+FFFD per byte, as tokenizers' ByteFallback."""
    table = TokenTable.from_tokenizer(sentencepiece)
    byte_tokens = sorted(table.byte_of_token)
    replacements = 0
    for seed in range(40):
        rng = random.Random(seed)
        ids = [
            rng.choice(byte_tokens) if rng.random() < 0.3 else token_id
            for token_id in random_ids(sentencepiece, rng, 300)
        ]
        expected = sentencepiece.decode(ids)
        replacements += expected.count("\ufffd")
        assert stream_decode(table, ids, rng) == expected, seed
    assert replacements > 100


def test_sentencepiece_leading_space_is_stripped_once_per_stream(sentencepiece):
    table = TokenTable.from_tokenizer(sentencepiece)
    first, later = sentencepiece(" the king", add_special_tokens=False).input_ids[:2]
    assert sentencepiece.convert_ids_to_tokens([first, later]) == ["▁the", "▁king"]
    decoder = StreamDecoder(table)
    assert decoder.feed([first]) == "the"  # Strip: the stream's text starts here
    assert decoder.feed([later]) == " king"  # later text keeps its space
    assert decoder.feed([first]) == " the"
    # A first token that is all space is stripped and the next one keeps its own space.
    space = sentencepiece.convert_tokens_to_ids("▁")
    decoder = StreamDecoder(table)
    assert decoder.feed([space]) == "" and decoder.feed([later]) == " king"


@pytest.mark.parametrize("make", ["sentencepiece_metaspace", "byte_level_wrapped"])
def test_unrecognized_decoder_uses_exact_fallback(make, smollm2):
    if make == "sentencepiece_metaspace":
        tokenizer = sentencepiece_tokenizer(decoders.Metaspace(prepend_scheme="first", split=False))
    else:
        tokenizer = load_default_tokenizer()
        tokenizer.backend_tokenizer.decoder = decoders.Sequence(
            [decoders.ByteLevel(), decoders.Fuse()]
        )
    table = TokenTable.from_tokenizer(tokenizer)
    assert table.kind == "exact"
    ids = real_text_ids(tokenizer)[-400:]
    assert stream_decode(table, ids, random.Random(0)) == tokenizer.decode(ids)
    for seed in range(10):
        rng = random.Random(seed)
        ids = random_ids(tokenizer, rng, 200)
        assert stream_decode(table, ids, rng) == tokenizer.decode(ids), seed


def per_token_micros(table: TokenTable, ids: list[int], batch: int) -> float:
    decoder = StreamDecoder(table)
    batches = [ids[start : start + batch] for start in range(0, len(ids), batch)]
    started = time.perf_counter()
    for token_batch in batches:
        decoder.feed(token_batch)
    return (time.perf_counter() - started) / len(ids) * 1e6


def test_per_token_cost(smollm2, sentencepiece, capsys):
    """The table paths cost well under a microsecond per token (printed; module docstring)."""
    exact_tokenizer = load_default_tokenizer()
    exact_tokenizer.backend_tokenizer.decoder = decoders.Sequence(
        [decoders.ByteLevel(), decoders.Fuse()]
    )
    report = []
    for name, tokenizer, count in [
        ("byte_level", smollm2, 100_000),
        ("byte_fallback", sentencepiece, 100_000),
        ("exact", exact_tokenizer, 5_000),
    ]:
        table = TokenTable.from_tokenizer(tokenizer)
        ids = tokenizer(shakespeare_text(count * 4) + MIXED_SCRIPTS * 20).input_ids[:count]
        batched = min(per_token_micros(table, ids, 16) for _ in range(3))
        single = min(per_token_micros(table, ids, 1) for _ in range(3))
        report.append(
            f"{name}: {batched:.3f} µs/token in 16-token feeds, {single:.3f} µs one by one"
        )
        if name != "exact":
            assert batched < 2.0 and single < 5.0, report[-1]
    with capsys.disabled():
        print("\nStreamDecoder cost per token: " + "; ".join(report))
