"""Perplexity of a long text streamed through the engine, in the four modes of the paper.

  streaming   S sink tokens + a window of W (StreamingLLM)
  window      the same cache size, no sinks (window attention)
  recompute   every token predicted from the last S + W tokens recomputed from scratch (the
              quality oracle: sliding window with re-computation)
  dense       no eviction at all (positions grow past the training window)

Scored one token per step by default, as the paper's evaluation does: each token sees the cache as
it was at its own position. The streamed modes get those per-token scores from the fast exact
scorer (sinkcache/tools/exact_nll.py: many tokens per forward, the same NLL to 1e-4 in float32);
`scorer="engine"` streams through the engine itself (one session appending the text with scores
on), as does recompute, a `chunk` above 1 (the engine's chunked prefill, which is not per-token)
and an fp8 arena (the fast scorer keeps keys in the model dtype).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sinkcache.config import EngineConfig
from sinkcache.core.attention.backend import select_backend
from sinkcache.core.engine import EngineCore
from sinkcache.events import ScoresEvent, TurnEndEvent
from sinkcache.host.builder import build_core
from sinkcache.inputs import TokenInput
from sinkcache.models.loader import LoadedModel
from sinkcache.tools.exact_nll import ExactScorer, Visibility

MODES = ("streaming", "window", "recompute", "dense")
SCORERS = ("fast", "engine")
FORWARD_TOKENS = 1024  # tokens the fast scorer puts through one forward
# Dense attention is O(n^2) in time (and its cache O(n)): longer streams are cut here, said where
# it happens (sinkserve eval-ppl --dense-max-tokens moves it).
DENSE_MAX_TOKENS = 65_536

# progress(tokens predicted so far, tokens to predict), called as the evaluation goes
Progress = Callable[[int, int], None]


@dataclass
class EvalResult:
    mode: str
    sink: int
    window: int
    tokens: int  # tokens streamed; tokens - 1 of them are predicted
    chunk: int
    ppl: float
    model: str
    text: str
    seconds: float
    ppl_after: dict[str, float] = field(default_factory=dict)  # ppl over tokens past a position
    segments: list[dict[str, float]] = field(default_factory=list)  # ppl per segment
    curve: list[dict[str, float]] = field(default_factory=list)  # ppl over log-spaced spans
    scorer: str = "engine"  # what computed the NLL: "fast" (exact_nll) or "engine"
    nll: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("nll")
        return data


class _Collect:
    """An output sink that keeps scores and notes the end of the request."""

    def __init__(self) -> None:
        self.logprobs: list[float] = []
        self.done = False
        self.error: BaseException | None = None

    def push(self, event: Any) -> None:
        if isinstance(event, ScoresEvent):
            self.logprobs += event.logprobs
        elif isinstance(event, TurnEndEvent):
            self.done = True

    def fail(self, error: BaseException) -> None:
        self.error, self.done = error, True


def _run_until(core: EngineCore, sinks: list[_Collect], on_step=None) -> None:
    while not all(s.done for s in sinks):
        core.step()
        if on_step is not None:
            on_step()
        if not core.busy and not all(s.done for s in sinks):
            raise RuntimeError("engine went idle with requests unfinished")
    for sink in sinks:
        if sink.error is not None:
            raise sink.error


def _core_for(
    loaded: LoadedModel, sink: int, window: int, slots: int, base: EngineConfig
) -> EngineCore:
    config = dataclasses.replace(base, model=loaded.name, sink=sink, window=window, slots=slots)
    return build_core(config, loaded)


def stream_nll(
    core: EngineCore, ids: list[int], chunk: int, progress: Progress | None = None
) -> list[float]:
    """-log p(token | stream so far) for ids[1:], one session fed `chunk` tokens per step."""
    core.open_session("eval")
    sink = _Collect()
    core.submit("eval", TokenInput(tuple(ids)), None, True, sink, max_chunk=chunk)
    on_step = None
    if progress is not None:

        def on_step() -> None:
            progress(len(sink.logprobs), len(ids) - 1)

    _run_until(core, [sink], on_step)
    core.close("eval")
    return [-lp for lp in sink.logprobs]


def recompute_nll(
    core: EngineCore,
    ids: list[int],
    span: int,
    progress: Progress | None = None,
    first_target: int = 1,
) -> list[float]:
    """-log p(ids[p+1] | ids[max(0, p-span+1) : p+1]), each window prefilled in a fresh session
    (for the positions from `first_target` on; the others stay NaN)."""
    todo = deque(range(first_target, len(ids)))  # the position being predicted
    running: dict[str, tuple[int, _Collect]] = {}
    nll = [math.nan] * (len(ids) - 1)
    done = 0

    def refill() -> None:
        nonlocal done
        for name, (target, sink) in list(running.items()):
            if sink.done:
                if sink.error is not None:
                    raise sink.error
                nll[target - 1] = -sink.logprobs[-1]
                core.close(name)
                del running[name]
                done += 1
        if progress is not None:
            progress(done, len(ids) - first_target)
        while todo and core.arena.free_slots:
            target = todo.popleft()
            name = f"w{target}"
            window = ids[max(0, target - span) : target + 1]  # context + the target token
            core.open_session(name)
            sink = _Collect()
            core.submit(name, TokenInput(tuple(window)), None, True, sink)
            running[name] = (target, sink)

    refill()
    while running:
        core.step()
        refill()
        if not core.busy and running and not any(s.done for _, s in running.values()):
            raise RuntimeError("engine went idle with windows unfinished")
    return nll


def evaluate(
    loaded: LoadedModel,
    ids: list[int],
    mode: str,
    sink: int,
    window: int,
    chunk: int,
    text_name: str,
    base: EngineConfig | None = None,
    recompute_slots: int = 64,
    progress: Progress | None = None,
    scorer: str = "fast",
    forward_tokens: int = FORWARD_TOKENS,
) -> EvalResult:
    base = base or EngineConfig()
    used = scorer_for(mode, chunk, base, scorer)
    started = time.perf_counter()
    if used == "fast":
        nll = _fast_scorer(loaded, mode, sink, window, base, forward_tokens).nll(ids, progress)
    elif mode in STREAMED:
        core, fed = _streamed_core(loaded, ids, mode, sink, window, chunk, base)
        nll = stream_nll(core, ids, fed, progress)
    elif mode == "recompute":
        span = sink + window
        core = _core_for(loaded, sink, window, recompute_slots, base)
        nll = recompute_nll(core, ids, span, progress)
    else:
        raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
    seconds = time.perf_counter() - started
    result = EvalResult(
        mode, sink, window, len(ids), chunk, _ppl(nll), loaded.name, text_name, seconds
    )
    result.scorer = used
    result.nll = nll
    train = loaded.shape.max_position_embeddings
    if len(ids) > train + 1:
        result.ppl_after[str(train)] = _ppl(nll[train:])
    # Segments of 256 tokens or more (per-segment perplexity is noisy), but at least ten on a
    # short run so that its plot has a shape.
    step = max(min(256, len(nll) // 10), len(nll) // 40, 1)
    result.segments = [
        {"start": i + 1, "end": min(i + step, len(nll)) + 1, "ppl": _ppl(nll[i : i + step])}
        for i in range(0, len(nll), step)
    ]
    result.curve = log_curve(nll)
    return result


def log_curve(
    nll: list[float], per_decade: int = 20, min_tokens: int = 64
) -> list[dict[str, float]]:
    """Perplexity over consecutive spans of the stream that end at log-spaced token counts (about
    `per_decade` to a decade, none narrower than `min_tokens`): the shape of a log-x plot, as the
    StreamingLLM paper draws its million-token figure."""
    spans, start = [], 0
    while start < len(nll):
        end = max(start + min_tokens, round(10 ** (math.log10(start + 1) + 1 / per_decade)))
        if len(nll) - end < min_tokens:  # no sliver of a last span (its perplexity is noise)
            end = len(nll)
        spans.append({"start": start + 1, "end": end + 1, "ppl": _ppl(nll[start:end])})
        start = end
    return spans


def scorer_for(mode: str, chunk: int, base: EngineConfig, scorer: str) -> str:
    """The scorer that runs: `scorer` ("fast" or "engine"), except that only a streamed mode fed
    one token per step into a plain arena has a fast exact path."""
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; scorers: {', '.join(SCORERS)}")
    if scorer == "fast" and mode in STREAMED and chunk == 1 and base.kv_dtype == "auto":
        return "fast"
    return "engine"


def _fast_scorer(
    loaded: LoadedModel, mode: str, sink: int, window: int, base: EngineConfig, forward_tokens: int
) -> ExactScorer:
    device = loaded.model.embed_tokens.weight.device
    backend = select_backend(device, base.attention)
    visibility = Visibility.for_mode(mode, sink, window)
    return ExactScorer(loaded.model, backend, visibility, forward_tokens)


STREAMED = ("streaming", "window", "dense")


def _streamed_core(
    loaded: LoadedModel,
    ids: list[int],
    mode: str,
    sink: int,
    window: int,
    chunk: int,
    base: EngineConfig,
) -> tuple[EngineCore, int]:
    """The one-session engine a streamed mode runs on, and the tokens it is fed per step."""
    if mode == "streaming":
        return _core_for(loaded, sink, window, 1, base), min(chunk, window)
    if mode == "window":
        span = sink + window
        return _core_for(loaded, 0, span, 1, base), min(chunk, span)
    return _core_for(loaded, 0, len(ids), 1, base), chunk  # dense: room for every token


def estimate_seconds(
    loaded: LoadedModel,
    ids: list[int],
    mode: str,
    sink: int,
    window: int,
    chunk: int,
    base: EngineConfig | None = None,
    recompute_slots: int = 64,
    sample_tokens: int = 32,
    sample_windows: int = 8,
    scorer: str = "fast",
    forward_tokens: int = FORWARD_TOKENS,
) -> float:
    """How long `evaluate` will take for this mode, from a short run of the same mode on this
    machine (a few seconds): streamed modes time `sample_tokens` tokens fed as in the run,
    recompute times `sample_windows` full windows and scales by the tokens all windows prefill.
    The fast scorer is timed on its second forward (the first pays warm-up), a short stream's on
    forwards shorter than the run's (an overestimate).
    Dense attention slows as the stream grows, so that estimate is a lower bound."""
    base = base or EngineConfig()
    if scorer_for(mode, chunk, base, scorer) == "fast":
        # Two forwards of at most an eighth of the stream each, so that a short run is not timed
        # by running it; the second one is warm.
        forward = max(16, min(forward_tokens, (len(ids) - 1) // 16))
        fast = _fast_scorer(loaded, mode, sink, window, base, forward)
        marks = [(0, time.perf_counter())]  # (tokens scored, when)
        sample = ids[: min(len(ids), 2 * forward + 1)]
        fast.nll(sample, lambda done, _total: marks.append((done, time.perf_counter())))
        (done0, t0), (done1, t1) = marks[-2:]  # the last forward: warm unless it is the only one
        return (t1 - t0) / max(1, done1 - done0) * (len(ids) - 1)
    if mode in STREAMED:
        sample = ids[: min(len(ids), sample_tokens + 1)]
        core, fed = _streamed_core(loaded, ids, mode, sink, window, chunk, base)
        started = time.perf_counter()
        stream_nll(core, sample, fed)
        per_token = (time.perf_counter() - started) / max(1, len(sample) - 1)
        return per_token * (len(ids) - 1)
    if mode == "recompute":
        span = sink + window
        first = min(span, len(ids) - 1)
        sample = ids[: min(len(ids), first + sample_windows + 1)]
        core = _core_for(loaded, sink, window, recompute_slots, base)
        started = time.perf_counter()
        recompute_nll(core, sample, span, first_target=first)
        elapsed = time.perf_counter() - started
        sampled = sum(_window_tokens(t, span) for t in range(first, len(sample)))
        total = sum(_window_tokens(t, span) for t in range(1, len(ids)))
        return elapsed * total / max(1, sampled)
    raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")


def _window_tokens(target: int, span: int) -> int:
    """Tokens prefilled to predict position `target` in recompute mode."""
    return min(target, span) + 1


def cache_description(mode: str, sink: int, window: int) -> str:
    """What the cache holds in each mode, for tables and plot labels."""
    return {
        "streaming": f"{sink} sinks + {window} recent",
        "window": f"{sink + window} recent, no sinks",
        "recompute": f"last {sink + window} recomputed",
        "dense": "everything",
    }[mode]


def _ppl(nll: list[float]) -> float:
    return math.exp(sum(nll) / len(nll)) if nll else math.nan


def write_json(results: list[EvalResult], path: Path) -> None:
    data: Any = results[0].summary() if len(results) == 1 else [r.summary() for r in results]
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_nll(results: list[EvalResult], path: Path) -> None:
    """One line per predicted token: position, then the NLL of each mode."""
    lines = ["position\t" + "\t".join(r.mode for r in results)]
    for i in range(len(results[0].nll)):
        lines.append(f"{i + 1}\t" + "\t".join(f"{r.nll[i]:.6f}" for r in results))
    path.write_text("\n".join(lines) + "\n")


def plot(
    results: list[EvalResult], path: Path, train_window: int | None = None, log_x: bool = False
) -> None:
    """Perplexity over the stream (per segment) for each mode, log scale; with `log_x` over
    log-spaced spans (`EvalResult.curve`) on a log token axis, as the paper's long-stream figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for r in results:
        spans = r.curve if log_x and r.curve else r.segments
        xs = [s["end"] for s in spans]
        ys = [s["ppl"] for s in spans]
        chunk = f", chunk {r.chunk}" if r.chunk != 1 else ""
        cut = f", first {r.tokens:,} tokens" if r.tokens < max(x.tokens for x in results) else ""
        label = (
            f"{r.mode}: {cache_description(r.mode, r.sink, r.window)}{chunk}{cut} (ppl {r.ppl:.2f})"
        )
        ax.plot(xs, ys, marker=".", label=label)
    # The training-window line only where the run reaches it: on a short run it would stretch the
    # x-axis and squeeze the data to its left.
    streamed = max((s["end"] for r in results for s in r.segments), default=0)
    if train_window and streamed >= train_window:
        ax.axvline(
            train_window, color="grey", linestyle=":", label=f"training window {train_window}"
        )
    if log_x:
        ax.set_xscale("log")
    else:
        ax.set_xlim(0, max(streamed, 1) * 1.02)
    ax.set_yscale("log")
    ax.set_xlabel("tokens streamed")
    ax.set_ylabel("perplexity (per span of the stream)" if log_x else "perplexity (per segment)")
    r0 = results[0]
    fed = "1 token" if r0.chunk == 1 else f"up to {r0.chunk} tokens"
    ax.set_title(f"{r0.model} model, {r0.text}, cache {r0.sink}+{r0.window}, fed {fed} per step")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
