"""Sampler overhead: diffalign's trajectory sampler vs each family's plain diffusers pipeline call, side by side.

Same pipeline, prompts, steps, guidance, eta and batch; the two are timed alternately (A B A B ...) so
that machine noise hits both alike, and the ratios of medians and of minima are reported per model.
Goal: <= 1.05 each.

    .venv/bin/python bench/sampler_overhead.py [--models toy,tiny-sd-v,tiny-sdxl,tiny-sd3,tiny-flux,small-flux] [--batch 16]

Models: "toy" (SD 1.x, StableDiffusionPipeline), "tiny-sd-v" (the toy architecture with random weights and a
v-prediction scheduler: SD 2.x), "tiny-sdxl" (a random StableDiffusionXLPipeline at 64 px with two CLIP
encoders, pooled embeddings and add_time_ids), "tiny-sd3" (a random StableDiffusion3Pipeline, flow matching),
"tiny-flux" (a random FluxPipeline with the guidance embedding: packed latents, no CFG batch; the stock call gets
the height, width and T5 length the family samples at), "small-flux" (the same with 2 + 4 blocks of width 4 x 32,
a step ~10x the tiny one's), each built by tests/helpers/ into a temporary directory;
or any pipeline directory. Tiny denoisers are the
hard case for this ratio: the sampler's own Python work (log-probs, stored tensors) is a larger share of a
step than on a real checkpoint.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffalign.families import FluxFamily, family_for
from diffalign.pipeline import load_pipeline
from diffalign.sampling import sample_trajectories
from diffalign.toy.prompts import load_prompts


def _model_dir(name: str, tmp: Path) -> str:
    if name not in ("tiny-sd-v", "tiny-sdxl", "tiny-sd3", "tiny-flux", "small-flux"):
        return name
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ is not installed
    from tests.helpers.tiny_families import build_sd_v_prediction, build_sdxl
    from tests.helpers.tiny_flow import build_flux_pipeline, build_sd3_pipeline

    build = {"tiny-sd-v": build_sd_v_prediction, "tiny-sdxl": build_sdxl, "tiny-sd3": build_sd3_pipeline,
             "tiny-flux": build_flux_pipeline,
             # 2 double- + 4 single-stream blocks of width 4 x 32: a transformer step ~10x the tiny one's, to show the
             # SDE step's cost is fixed per step and shrinks as a share of a larger model's
             "small-flux": lambda d: build_flux_pipeline(d, blocks=(2, 4), heads=4, head_dim=32)}[name]
    build(tmp / name)
    return str(tmp / name)


def measure(model: str, args, prompts: list[str]) -> tuple[str, dict[str, list[float]]]:
    """(the pipeline class and prediction type, seconds per call of each side)."""
    pipe = load_pipeline(model)
    # Flow-matching pipelines (SD3) sample an ODE and take no eta; diffalign's sampler draws its SDE step with
    # noise level eta there, the same denoiser calls plus one Gaussian per step.
    eta = {"eta": 1.0} if "eta" in inspect.signature(type(pipe).__call__).parameters else {}
    family = family_for(pipe)
    if isinstance(family, FluxFamily):  # FluxPipeline defaults to 128 x the VAE factor; the family reads the VAE
        side = family.latent_shape(1)[-1] * pipe.vae_scale_factor
        eta |= {"height": side, "width": side, "max_sequence_length": family.max_sequence_length()}

    def plain():
        pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, **eta,
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
    prediction = pipe.scheduler.config.get("prediction_type", "velocity (flow matching)")
    return f"{type(pipe).__name__}, {prediction}", times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="toy,tiny-sd-v,tiny-sdxl,tiny-sd3,tiny-flux", help="comma-separated: toy, small-flux, "
                    "tiny-sd-v, tiny-sdxl, tiny-sd3, tiny-flux or pipeline directories")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()  # building and loading the tiny pipelines is not the point
    transformers.utils.logging.disable_progress_bar()
    prompts = (load_prompts("eval_count") * 4)[: args.batch]
    print(f"batch={args.batch} steps={args.steps} cfg={args.guidance} eta=1 threads={torch.get_num_threads()} "
          f"repeats={args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            klass, times = measure(_model_dir(name, Path(tmp)), args, prompts)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"{name} ({klass})")
            for k, v in times.items():
                print(f"  {k:<10} median {med[k]:.3f}s  all {[round(x, 3) for x in v]}")
            # The ratio of minima too: on a shared machine a slow outlier is other load, never a faster call.
            low = {k: min(v) for k, v in times.items()}
            # Paired: each diffalign call against the plain call just before it (the same load, mostly).
            paired = statistics.median(d / p for p, d in zip(times["plain"], times["diffalign"], strict=True))
            print(f"  ratio diffalign / plain = {med['diffalign'] / med['plain']:.3f} of medians, "
                  f"{paired:.3f} median of paired ratios, {sum(times['diffalign']) / sum(times['plain']):.3f} of "
                  f"sums, {low['diffalign'] / low['plain']:.3f} of minima  (goal <= 1.05)")


if __name__ == "__main__":
    main()
