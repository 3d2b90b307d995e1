"""Sampler overhead: diffalign's trajectory sampler vs the plain diffusers pipeline call, side by side.

Same pipeline, prompts, steps, guidance, eta and batch; the two are timed alternately (A B A B ...) so
that machine noise hits both alike, and the ratio of medians is reported. Goal: <= 1.05.

    .venv/bin/python bench/sampler_overhead.py [--model toy] [--batch 16] [--steps 20] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffalign.pipeline import load_pipeline
from diffalign.sampling import sample_trajectories
from diffalign.toy.prompts import load_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    pipe = load_pipeline(args.model)
    prompts = (load_prompts("eval_count") * 4)[: args.batch]

    def plain():
        pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, eta=1.0,
             generator=torch.Generator().manual_seed(0), output_type="pt")

    def ours():
        sample_trajectories(pipe, prompts, args.steps, args.guidance, 1.0, generator=torch.Generator().manual_seed(0))

    with torch.no_grad():
        plain(), ours()  # warm-up
        times = {"plain": [], "diffalign": []}
        for _ in range(args.repeats):
            for name, fn in (("plain", plain), ("diffalign", ours)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model={args.model} batch={args.batch} steps={args.steps} cfg={args.guidance} threads={torch.get_num_threads()}")
    for k, v in times.items():
        print(f"  {k:<10} median {med[k]:.3f}s  all {[round(x, 3) for x in v]}")
    print(f"ratio diffalign / plain = {med['diffalign'] / med['plain']:.3f}  (goal <= 1.05)")


if __name__ == "__main__":
    main()
