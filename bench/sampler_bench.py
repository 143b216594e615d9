"""What sampling costs per step on the device, by variant and batch (SmolLM2's vocabulary).

python bench/sampler_bench.py --json docs/sampler_bench.json
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import torch

from sinkcache.core.sampling import SamplerVariant, SlotSampler
from sinkcache.inputs import GenerationParams

VARIANTS = {
    SamplerVariant.GREEDY: GenerationParams(temperature=0.0),
    SamplerVariant.SAMPLE: GenerationParams(temperature=0.8),
    SamplerVariant.FILTER: GenerationParams(temperature=0.8, top_p=0.95),
}


def time_ms(fn, repeats: int, *args) -> float:
    fn(*args)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn(*args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 2000])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default="sampler_bench.json")
    args = parser.parse_args()
    device = torch.device("cuda")
    rows = []
    for batch in args.batches:
        sampler = SlotSampler(batch, args.vocab, device)
        slots = torch.arange(batch, device=device)
        position = torch.arange(batch, device=device) + 10_000
        # Peaked rows, like a trained model's (a random model's are near uniform: also timed).
        for shape, scale in (("peaked", 8.0), ("flat", 0.1)):
            logits = torch.randn(batch, args.vocab, device=device) * scale
            for variant, params in VARIANTS.items():
                for slot in range(batch):
                    sampler.configure(slot, params)
                ms = time_ms(sampler.sample, args.repeats, logits, slots, position, variant)
                rows.append(
                    {"batch": batch, "logits": shape, "variant": variant.name, "ms": round(ms, 3)}
                )
                print(f"B={batch:5d} {shape:6s} {variant.name:6s} {ms:8.3f} ms", flush=True)
    # The threshold kernel alone, by tile and warps, on the largest batch of flat rows.
    from sinkcache.core.ops.triton_sampling import nucleus_threshold

    batch = max(args.batches)
    probs = (torch.randn(batch, args.vocab, device=device) * 0.1).softmax(-1)
    top_p = torch.full((batch,), 0.95, device=device)
    top_k = torch.full((batch,), args.vocab, device=device)
    for block in (128, 256, 512):
        for warps in (4, 8):
            ms = time_ms(nucleus_threshold, args.repeats, probs, top_p, top_k, block, warps)
            rows.append(
                {
                    "batch": batch,
                    "kernel": "nucleus_threshold",
                    "block": block,
                    "num_warps": warps,
                    "ms": round(ms, 3),
                }
            )
            print(f"B={batch:5d} threshold kernel block={block} warps={warps} {ms:8.3f} ms")
    result = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "vocab": args.vocab,
        "rows": rows,
    }
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
