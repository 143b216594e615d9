"""The fast exact scorer (sinkcache/tools/exact_nll.py) gives the engine's per-token NLL.

The definition is the engine fed one token per step (every mode of `eval-ppl` ran that way before):
each token sees the sinks and the window as they were at its own position. The fast scorer puts
many tokens through one forward; here both run on a random model over a stream ten times longer
than sink + window, in float32 on the CPU, for chunks shorter than, equal to and longer than the
window, and must agree to 1e-4 per token. The model's attention and output are sharpened so that
what a token sees moves its NLL far more than that: a window one token too long or short, or the
sinks met at the wrong position, is caught (test_near_misses_are_caught shows it).
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from sinkcache.config import EngineConfig
from sinkcache.core.attention.backend import REFERENCE
from sinkcache.models.loader import LoadedModel
from sinkcache.tools.eval_ppl import evaluate, log_curve
from sinkcache.tools.exact_nll import ExactScorer, Visibility
from tests.tiny_engine import tiny_models

SEED = 5
SINK, WINDOW = 3, 9
TOKENS = 120  # the cache first evicts at token 12; ten times sink + window
TOLERANCE = 1e-4
BASE = EngineConfig(device="cpu", dtype="float32")
STREAMED = ("streaming", "window", "dense")


@pytest.fixture(scope="module")
def sharp() -> LoadedModel:
    """The tiny random Llama, q/k/v weights x8 and lm_head x20: peaked attention, confident
    predictions."""
    _, model = tiny_models()
    with torch.no_grad():
        for block in model.layers:
            block.attention.qkv_proj.weight.mul_(8.0)
        model.lm_head.weight.mul_(20.0)
    return LoadedModel("tiny-sharp", model.shape, model, None)


@pytest.fixture(scope="module")
def stream(sharp: LoadedModel) -> list[int]:
    print(f"stream seed {SEED}")
    rng = random.Random(SEED)
    return [rng.randrange(sharp.shape.vocab_size) for _ in range(TOKENS)]


@pytest.fixture(scope="module")
def engine_nll(sharp: LoadedModel, stream: list[int]) -> dict[str, list[float]]:
    """Per-token NLL of each streamed mode through the engine, one token per step."""
    out = {}
    for mode in STREAMED:
        result = evaluate(sharp, stream, mode, SINK, WINDOW, 1, "random", BASE, scorer="engine")
        assert result.scorer == "engine"
        out[mode] = result.nll
    return out


def _fast(sharp: LoadedModel, visibility: Visibility, ids: list[int], chunk: int, **kw):
    return ExactScorer(sharp.model, REFERENCE, visibility, chunk, **kw).nll(ids)


def _gap(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("mode", STREAMED)
@pytest.mark.parametrize("chunk", [1, 4, WINDOW, SINK + WINDOW, 40])
def test_fast_scorer_equals_the_engine_token_for_token(
    sharp, stream, engine_nll, mode: str, chunk: int
) -> None:
    got = _fast(sharp, Visibility.for_mode(mode, SINK, WINDOW), stream, chunk)
    assert len(got) == TOKENS - 1
    gap = _gap(got, engine_nll[mode])
    assert gap < TOLERANCE, f"{mode}, chunk {chunk}: largest per-token NLL gap {gap:.2e}"


@pytest.mark.parametrize("mode", STREAMED)
def test_query_blocks_do_not_change_the_scores(sharp, stream, engine_nll, mode: str) -> None:
    """A score budget of one element splits every chunk into one-query blocks (what a long dense
    stream does to bound memory)."""
    got = _fast(sharp, Visibility.for_mode(mode, SINK, WINDOW), stream, 30, score_budget=1)
    assert _gap(got, engine_nll[mode]) < TOLERANCE


class _SinksAtStreamPosition(Visibility):
    """Wrong on purpose: queries meet the sinks at their stream position, not their cache one."""

    def sink_query_position(self, t: torch.Tensor) -> torch.Tensor:
        return t


@pytest.mark.parametrize(
    "wrong",
    [
        Visibility(SINK, WINDOW + 1),
        Visibility(SINK, WINDOW - 1),
        Visibility(0, WINDOW),
        _SinksAtStreamPosition(SINK, WINDOW),
    ],
    ids=["window+1", "window-1", "no-sinks", "sinks-at-stream-position"],
)
def test_near_misses_are_caught(sharp, stream, engine_nll, wrong: Visibility) -> None:
    """The comparison above can fail: each near miss of the semantics is off by far more than
    the tolerance on this model."""
    gap = _gap(_fast(sharp, wrong, stream, 5), engine_nll["streaming"])
    assert gap > 100 * TOLERANCE, f"{wrong}: gap only {gap:.2e}"


def test_evaluate_picks_the_fast_scorer_only_where_it_is_exact(sharp, stream) -> None:
    ids = stream[:24]
    fast = evaluate(sharp, ids, "streaming", SINK, WINDOW, 1, "random", BASE)
    assert fast.scorer == "fast" and len(fast.nll) == len(ids) - 1
    # The engine's chunked prefill (chunk > 1) is other semantics; recompute and an fp8 arena
    # have no fast path: each stays on the engine.
    assert evaluate(sharp, ids, "streaming", SINK, WINDOW, 4, "random", BASE).scorer == "engine"
    assert evaluate(sharp, ids, "recompute", SINK, WINDOW, 1, "random", BASE).scorer == "engine"
    fp8 = EngineConfig(device="cpu", dtype="float32", kv_dtype="fp8_e4m3")
    assert evaluate(sharp, ids, "streaming", SINK, WINDOW, 1, "random", fp8).scorer == "engine"
    with pytest.raises(ValueError, match="unknown scorer"):
        evaluate(sharp, ids, "streaming", SINK, WINDOW, 1, "random", BASE, scorer="quick")


def test_log_curve_covers_the_stream_in_log_spaced_spans() -> None:
    nll = [math.log(7.0)] * 100_000
    spans = log_curve(nll)
    assert spans[0]["start"] == 1 and spans[-1]["end"] == len(nll) + 1
    assert all(a["end"] == b["start"] for a, b in itertools.pairwise(spans))
    assert all(s["ppl"] == pytest.approx(7.0) for s in spans)
    assert all(s["end"] - s["start"] >= 64 for s in spans[:-1])
    # about 20 spans a decade once the spans are wider than the 64-token floor
    assert 45 <= len(spans) <= 65, len(spans)


@pytest.mark.slow
def test_real_smollm2_fast_equals_engine_on_shakespeare() -> None:
    """The real model on real text, cache 4+28 (evicting from token 32), 96 tokens: the engine
    takes about 0.1 s a token here (minutes on a loaded box), so the stream is short."""
    from sinkcache.models.assets import shakespeare_text
    from sinkcache.models.loader import load_model

    loaded = load_model("default", torch.float32, "cpu")
    ids = loaded.tokenizer(shakespeare_text(min_chars=2_000)).input_ids[:96]
    engine = evaluate(loaded, ids, "streaming", 4, 28, 1, "shakespeare", BASE, scorer="engine")
    for chunk in (16, 40):
        fast = evaluate(
            loaded, ids, "streaming", 4, 28, 1, "shakespeare", BASE, forward_tokens=chunk
        )
        assert fast.scorer == "fast"
        gap = _gap(fast.nll, engine.nll)
        assert gap < TOLERANCE, f"forward of {chunk}: largest per-token NLL gap {gap:.2e}"
