"""Real weights: attention sinks keep a streamed model stable where window attention breaks down.

The full-length comparison (20,000 tokens, all four modes) is `sinkserve eval-ppl` and lives in
docs/BENCHMARKS.md; this is the short version that CI can afford.
"""

from __future__ import annotations

import pytest
import torch

from sinkcache.models.assets import shakespeare_text
from sinkcache.models.loader import load_model
from sinkcache.tools.eval_ppl import evaluate

pytestmark = pytest.mark.slow

TOKENS = 2000


@pytest.fixture(scope="module")
def smollm2():
    return load_model("default", torch.float32, "cpu")


def test_sinks_beat_window_attention_on_real_text(smollm2) -> None:
    ids = smollm2.tokenizer(shakespeare_text(min_chars=20_000)).input_ids[:TOKENS]
    assert len(ids) == TOKENS
    streaming = evaluate(smollm2, ids, "streaming", 4, 252, 1, "shakespeare")
    window = evaluate(smollm2, ids, "window", 4, 252, 1, "shakespeare")
    # Identical until the cache first evicts (256 tokens in): same model, same positions.
    assert streaming.nll[:254] == pytest.approx(window.nll[:254], abs=1e-3)
    print(f"streaming ppl {streaming.ppl:.2f}, window ppl {window.ppl:.2f}")
    assert window.ppl >= 1.5 * streaming.ppl, (streaming.ppl, window.ppl)
    assert streaming.ppl < 40, streaming.ppl  # a sane language model on Shakespeare
