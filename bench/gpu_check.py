"""A prepared GPU check (issue 19): diffalign at Stable Diffusion 1.5 size on one CUDA GPU, in one command.

    python bench/gpu_check.py --out bench/out/gpu_check             # one CUDA GPU, well under 8 minutes
    python bench/gpu_check.py --dry-run --out /tmp/gpu_check_dry    # the same code, tiny, on the CPU (tested)

What it measures, for each model family diffalign supports (SD 1.5 now; SDXL is skipped with a line until
diffalign has an SDXL family), with random weights built from the family's public configs (nothing is
downloaded), bf16, LoRA rank 4 on the UNet's attention projections:

1. ``sampler``: diffalign's ``sample_trajectories`` vs the stock ``StableDiffusionPipeline.__call__``, same
   pipeline, prompts, steps, guidance, eta and generator; timed alternately after a warm-up; the ratio of
   medians (the sampler's overhead: log-probs, stored latents and noise predictions).
2. ``ddpo``, ``ddpo+ckpt``, ``dag-kl``, ``dag-kl+ckpt``: epochs of diffalign's ``Trainer`` (JPEG
   compressibility reward, on the critical path as in a real run), without and with gradient checkpointing:
   trajectories per second (median over the timed epochs, after a warm-up epoch), the sampling and training
   phases' seconds, the peak of ``torch.cuda.max_memory_allocated`` over an epoch, and the increase over the
   training phase, next to docs/scale_out.md's estimate of one training step for the same setting (ratio).
3. ``hero``: HERO feedback rounds (the feedback loop's own round function, its store and UNet-feature
   embedding) with the simulated evaluator replaced by a random labeler: seconds per round, peak memory.

Method: ``torch.cuda.synchronize()`` around every timed region; medians. Each part runs guarded: a failure
is recorded in the JSON (type, message, traceback tail) and the next part runs. A global time budget
(``--budget-s``) skips the parts that no longer fit (judged by the longest part so far) rather than overrun,
and cuts timed repetitions short; the JSON is rewritten after every part, so a killed run keeps what it had.

The dry run (``--dry-run``) runs the same code on the CPU at tiny sizes (same block types, narrow widths,
64 px, 2 steps, one repetition, fp32); memory there is the process's peak resident memory, and the estimate is the
same method as bench/memory_estimate.py (tensors autograd saves for the backward) applied at the dry run's
own size. Its numbers say nothing about GPUs; it proves the script runs end to end.

Limits: random weights give noise images, so the reward's values (and its JPEG encoding time) are not those of
a trained model; the timings are of one GPU, one process. The estimate covers the UNet's training step only:
DAG-KL's training phase also holds its flow network and decodes x0-predictions for the forward-looking reward.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded: the GPU machine has no network
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/memory_estimate.py: SD 1.5 configs, estimator

GiB = 2**30
PROMPTS = ["three red circles", "two blue squares", "one green triangle", "four yellow circles"]
ALGORITHM_PARTS = (("ddpo", "ddpo", False), ("ddpo+ckpt", "ddpo", True),
                   ("dag-kl", "dag-kl", False), ("dag-kl+ckpt", "dag-kl", True))

# docs/scale_out.md, "One training step" table (bench/memory_estimate.py, 2026-11-23): memory held for the
# backward of one LoRA training step of the SD 1.5 UNet at 512 px, fused attention, bf16 autocast, GiB, by
# UNet rows (a trajectory with classifier-free guidance is 2 rows). A fresh bench/memory_estimate.json, when
# present, replaces these.
SCALE_OUT_ESTIMATE_GIB = {
    "bf16/plain": {2: 3.18, 4: 4.84, 8: 8.18},
    "bf16/checkpointing": {2: 0.61, 4: 1.03, 8: 1.85},
}


@dataclass(frozen=True)
class Sizes:
    """How much of everything one check runs. ``gpu()`` is the real check; ``dry()`` the CPU rehearsal."""

    resolution: int
    steps: int  # DDIM steps per trajectory
    sample_batch: int  # trajectories per sampling batch (also the sampler comparison's batch)
    sample_batches: int  # sampling batches per epoch
    train_batch: int  # trajectories per training minibatch (>= 2: DAG-KL's leave-one-out baseline)
    warmup: int  # untimed repetitions first (epochs, rounds, sampler calls)
    repeats: int  # timed repetitions (epochs, rounds); medians are reported
    sampler_repeats: int  # timed pairs of sampler calls
    hero_images: int  # images per HERO round
    hero_embed_steps: int  # HERO encoder steps per round
    precision: str  # "bf16": autocast over fp32 weights, as the trainer runs; "no": fp32
    guidance: float = 5.0

    @staticmethod
    def gpu() -> Sizes:
        # One epoch: 8 trajectories x 20 steps = 40 sampling calls of 8 UNet rows and 80 training calls of 4.
        return Sizes(resolution=512, steps=20, sample_batch=4, sample_batches=2, train_batch=2, warmup=1,
                     repeats=2, sampler_repeats=3, hero_images=8, hero_embed_steps=100, precision="bf16")

    @staticmethod
    def dry() -> Sizes:
        # fp32: this CPU emulates bf16 (4x slower than fp32 here). No warm-up and one repetition: the dry run
        # is a fast test of the code path, its timings mean nothing.
        return Sizes(resolution=64, steps=2, sample_batch=2, sample_batches=1, train_batch=2, warmup=0,
                     repeats=1, sampler_repeats=1, hero_images=4, hero_embed_steps=5, precision="no")


# ------------------------------------------------------------------------------------------------------
# Model families: configs and whether diffalign supports the family yet


@dataclass(frozen=True)
class Family:
    name: str
    unet: dict
    vae: dict
    text: dict
    text_positions: int


def _sd15(tiny: bool) -> Family:
    from memory_estimate import CLIP_VIT_L14_TEXT, SD15_UNET, SD15_VAE

    if not tiny:
        return Family("sd15", dict(SD15_UNET), dict(SD15_VAE), dict(CLIP_VIT_L14_TEXT), 77)
    # SD 1.5's block types, depth of downsampling (latent = image / 8) and text states (77 x 768), narrow
    # widths: the estimator's step (memory_estimate.training_step) feeds (rows, 77, 768) text states.
    unet = {**SD15_UNET, "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1, "norm_num_groups": 8}
    vae = {**SD15_VAE, "block_out_channels": (8, 16, 32, 32), "layers_per_block": 1, "norm_num_groups": 8}
    text = {**CLIP_VIT_L14_TEXT, "intermediate_size": 256, "num_hidden_layers": 2}
    return Family("sd15", unet, vae, text, 77)


def _sdxl_missing() -> str | None:
    import importlib.util

    try:
        found = importlib.util.find_spec("diffalign.families.sdxl") is not None
    except ModuleNotFoundError:  # no diffalign.families package at all
        found = False
    if not found:
        return ("diffalign has no SDXL family yet (no diffalign.families.sdxl): skipped. To add it, give _sdxl() "
                "SDXL's UNet/VAE/text-encoder configs, a builder of its pipeline, and 1024 px in Sizes")
    # The family exists (diffalign.families.sdxl) but this check does not build an SDXL pipeline yet.
    return ("the SDXL part of this check is not written yet (diffalign.families.sdxl exists): skipped. To add it, give "
            "_sdxl() SDXL's UNet/VAE/text-encoder configs, a builder of its pipeline, and 1024 px in Sizes")


def families(tiny: bool) -> list[tuple[str, Callable[[], Family], Callable[[], str | None]]]:
    """(name, builder, why-skipped) per family, in the order the check runs them."""
    return [("sd15", lambda: _sd15(tiny), lambda: None), ("sdxl", lambda: None, _sdxl_missing)]


def build_pipeline(family: Family, sizes: Sizes, device: str, dtype=None, seed: int = 0):
    """A StableDiffusionPipeline with random weights, built directly on ``device``, frozen."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from diffalign.pipeline import TOY_MODEL_DIR
    from diffalign.toy.model import build_inference_scheduler

    # The toy model's CLIP BPE tokenizer, padded to SD's 77 positions so cross-attention has SD's shape.
    tokenizer = CLIPTokenizer.from_pretrained(str(TOY_MODEL_DIR / "tokenizer"), model_max_length=family.text_positions)
    text_cfg = CLIPTextConfig(**{**family.text, "vocab_size": len(tokenizer), "max_position_embeddings": family.text_positions,
                                 "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                                 "pad_token_id": tokenizer.pad_token_id})
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the GPU: random init of 860M parameters on a CPU takes long
        unet = UNet2DConditionModel(**{**family.unet, "sample_size": sizes.resolution // 8})
        vae = AutoencoderKL(**{**family.vae, "sample_size": sizes.resolution})
        text = CLIPTextModel(text_cfg)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=build_inference_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for m in (vae, text, unet):
        m.requires_grad_(False)
    if dtype is not None:
        pipe.to(dtype=dtype)
    return pipe


# ------------------------------------------------------------------------------------------------------
# Clocks and memory meters


class Device:
    """Synchronisation and memory of the device the check runs on (a CUDA GPU, or the CPU for the dry run).

    On the CPU, memory is the process's peak resident set (VmHWM), reset by writing 5 to /proc/self/clear_refs
    (Linux >= 4.0). Not a sampling thread: on a loaded machine a thread that takes the GIL every few ms made
    the dry run several times slower."""

    def __init__(self, name: str):
        import torch

        self.name, self.torch = name, torch
        self.cuda = name.startswith("cuda")

    @property
    def meter(self) -> str:
        return "torch.cuda.max_memory_allocated" if self.cuda else "peak resident memory (VmHWM)"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {field}")

    def reset_peak(self) -> None:
        self.sync()
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def current(self) -> int:
        return self.torch.cuda.memory_allocated() if self.cuda else self._status("VmRSS")

    def peak(self) -> int:
        self.sync()
        return self.torch.cuda.max_memory_allocated() if self.cuda else self._status("VmHWM")

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()


class Clock:
    """The run's time budget: parts and repetitions ask it whether they still fit."""

    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.monotonic(), budget_s
        self.longest_part = 0.0

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def fits(self, seconds: float) -> bool:
        return self.left() >= seconds


def timed(device: Device, fn: Callable[[], object]) -> tuple[float, object]:
    device.sync()
    t0 = time.perf_counter()
    result = fn()
    device.sync()
    return time.perf_counter() - t0, result


def repeat(clock: Clock, warmup: int, repeats: int, run_once: Callable[[int], float]) -> list[float]:
    """Warm-up runs, then up to ``repeats`` timed runs; stops early (after one timed run) when the next
    would not fit in the budget. Returns the timed durations."""
    for i in range(warmup):
        run_once(i)
    times: list[float] = []
    for i in range(warmup, warmup + repeats):
        if times and not clock.fits(1.5 * max(times)):
            break
        times.append(run_once(i))
    return times


# ------------------------------------------------------------------------------------------------------
# Memory estimate (docs/scale_out.md, bench/memory_estimate.py) for the same setting


def _by_rows(table: dict[int, float], rows: int) -> float:
    """Activations are linear in UNet rows (docs/scale_out.md): the table's value, or the line through the
    two nearest measured row counts."""
    if rows in table:
        return table[rows]
    (r1, v1), (r2, v2) = sorted(table.items(), key=lambda kv: abs(kv[0] - rows))[:2]
    return v1 + (v2 - v1) * (rows - r1) / (r2 - r1)


def scale_out_estimate(rows: int, checkpointing: bool) -> dict:
    """Bytes held for one SD 1.5 training step at 512 px, bf16, from bench/memory_estimate.json if a run of
    bench/memory_estimate.py left one, else from the table docs/scale_out.md publishes."""
    key = "bf16/checkpointing" if checkpointing else "bf16/plain"
    fresh = Path(__file__).with_name("memory_estimate.json")
    if fresh.is_file():
        per_step = json.loads(fresh.read_text())["per_step_at_512px"][f"fused/{key}"]
        table = {int(r): v["peak_estimate"] / GiB for r, v in per_step.items() if r.isdigit()}
        source = str(fresh.name)
    else:
        table, source = SCALE_OUT_ESTIMATE_GIB[key], "docs/scale_out.md (One training step table)"
    return {"bytes": _by_rows(table, rows) * GiB, "source": source}


def live_estimate(family: Family, sizes: Sizes, rows: int, checkpointing: bool) -> dict:
    """The estimate's own method at the dry run's size: tensors autograd saves in one bf16-autocast step of a
    fresh UNet with the same LoRA, plus (checkpointing) the recomputation of the largest block."""
    import torch
    from diffusers import UNet2DConditionModel
    from memory_estimate import training_step

    from diffalign.pipeline import attach_lora

    torch.manual_seed(0)
    latent = sizes.resolution // 8
    unet = UNet2DConditionModel(**{**family.unet, "sample_size": latent})
    attach_lora(unet, rank=4, alpha=4.0)
    step = training_step(unet, latent, rows, checkpointing, "fused", autocast=True)
    held = step["saved"] + sum(step["held_inputs"])
    if checkpointing:  # the backward recomputes one block at a time: the largest one's saved tensors on top
        plain = training_step(unet, latent, rows, False, "fused", autocast=True)
        blocks: dict[str, int] = {}
        for size, owner in zip(plain["saved_sizes"], plain["owners"]):
            if owner is not None:
                blocks[owner] = blocks.get(owner, 0) + size
        held += max(blocks.values(), default=0)
    return {"bytes": held, "source": "bench/memory_estimate.py method at this size (saved tensors, CPU)"}


# ------------------------------------------------------------------------------------------------------
# The parts


@dataclass
class Context:
    family: Family
    sizes: Sizes
    device: Device
    clock: Clock
    work: Path
    dry_run: bool
    log: Callable[[str], None] = print
    notes: list[str] = field(default_factory=list)


def _autocast(ctx: Context):
    import contextlib

    import torch

    if ctx.sizes.precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast("cuda" if ctx.device.cuda else "cpu", dtype=torch.bfloat16)


def part_sampler(ctx: Context) -> dict:
    """diffalign's sampler vs the stock pipeline call, same pipeline (rank-4 LoRA) and precision: bf16 autocast
    over fp32 weights, which is how the trainer samples (accelerate autocasts the prepared UNet)."""
    import torch

    from diffalign.pipeline import attach_lora
    from diffalign.sampling import sample_trajectories

    s = ctx.sizes
    pipe = build_pipeline(ctx.family, s, ctx.device.name)
    attach_lora(pipe.unet, rank=4, alpha=4.0)
    prompts = (PROMPTS * s.sample_batch)[: s.sample_batch]
    out: dict[str, torch.Tensor] = {}

    def ours():
        return sample_trajectories(pipe, prompts, s.steps, s.guidance, 1.0, generator=torch.Generator().manual_seed(0)).images

    def stock():
        return pipe(prompts, num_inference_steps=s.steps, guidance_scale=s.guidance, eta=1.0,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    times: dict[str, list[float]] = {"diffalign": [], "stock": []}

    def once(i: int) -> float:
        pair = (("diffalign", ours), ("stock", stock)) if i % 2 == 0 else (("stock", stock), ("diffalign", ours))
        total = 0.0
        for name, fn in pair:  # alternated, so drifting clocks or thermals hit both alike
            with torch.no_grad(), _autocast(ctx):
                seconds, images = timed(ctx.device, fn)
            out[name] = images.float().cpu()
            if i >= s.warmup:
                times[name].append(seconds)
            total += seconds
        return total
    repeat(ctx.clock, s.warmup, s.sampler_repeats, once)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"batch": len(prompts), "steps": s.steps, "guidance": s.guidance, "precision": s.precision,
              "diffalign_s": med["diffalign"], "stock_s": med["stock"], "ratio": med["diffalign"] / med["stock"],
              "timed_runs": len(times["diffalign"]),
              "max_abs_image_difference": (out["diffalign"] - out["stock"]).abs().max().item()}
    # Half-precision weights (what users run for inference): are the samples finite? One untimed call each.
    pipe.to(dtype=torch.bfloat16)
    with torch.no_grad():
        result["bf16_weights_finite"] = {"diffalign": bool(ours().isfinite().all()), "stock": bool(stock().isfinite().all())}
    return result


def _config(ctx: Context, name: str, algorithm: str, checkpointing: bool, **extra):
    from diffalign.config import RunConfig

    s = ctx.sizes
    data = {
        "output_dir": str(ctx.work / name),
        "model": {"lora_rank": 4, "lora_alpha": 4.0, "mixed_precision": "bf16", "gradient_checkpointing": checkpointing},
        "sample": {"prompts": PROMPTS, "batch_size": s.sample_batch, "num_batches_per_epoch": s.sample_batches,
                   "num_steps": s.steps, "guidance_scale": s.guidance},
        "train": {"algorithm": algorithm, "epochs": s.warmup + s.repeats, "batch_size": s.train_batch, "seed": 0},
        "reward": {"terms": [{"name": "jpeg_compressibility"}], "workers": 1},
        "log": {"tracker": "none", "image_every": 0, "progress": False},
        "checkpoint": {"every": 0},
    }
    for section, values in extra.items():
        data.setdefault(section, {}).update(values)
    return RunConfig.model_validate(data)


class PhaseMeter:
    """Wraps a trainer's sampling and training phases: synchronised seconds, memory at the start of each
    phase and its peak (reset at the phase's start)."""

    def __init__(self, trainer, device: Device, names=("sample_epoch", "train_on")):
        self.device, self.last = device, {}
        for name in names:
            setattr(trainer, name, self._wrap(name, getattr(trainer, name)))

    def _wrap(self, name, fn):
        def wrapped(*args, **kwargs):
            self.device.reset_peak()
            base = self.device.current()
            t0 = time.perf_counter()
            result = fn(*args, **kwargs)
            self.device.sync()
            self.last[name] = {"seconds": time.perf_counter() - t0, "base": base, "peak": self.device.peak()}
            return result
        return wrapped


def _memory_comparison(ctx: Context, measured_increase: float, rows: int, checkpointing: bool) -> dict:
    est = live_estimate(ctx.family, ctx.sizes, rows, checkpointing) if ctx.dry_run else \
        scale_out_estimate(rows, checkpointing)
    return {"unet_rows": rows, "measured_train_increase_gib": measured_increase / GiB,
            "estimate_gib": est["bytes"] / GiB, "ratio_measured_to_estimate": measured_increase / est["bytes"],
            "estimate_source": est["source"]}


def part_trainer(ctx: Context, name: str, algorithm: str, checkpointing: bool) -> dict:
    """Epochs of the Trainer: a warm-up epoch, then timed ones; throughput and memory per phase."""
    from diffalign.trainer import Trainer

    s = ctx.sizes
    cfg = _config(ctx, name, algorithm, checkpointing)
    pipe = build_pipeline(ctx.family, s, ctx.device.name)
    trainer = Trainer(cfg, pipe=pipe, log=lambda m: None)
    try:
        meter = PhaseMeter(trainer, ctx.device)
        epochs: list[dict] = []

        def once(epoch: int) -> float:
            ctx.device.reset_peak()
            seconds, metrics = timed(ctx.device, lambda: trainer.run_epoch(epoch))
            if metrics.get("skipped"):
                raise RuntimeError(f"epoch {epoch} skipped: every reward batch failed")
            epochs.append({"seconds": seconds, "peak": ctx.device.peak(), **{k: dict(v) for k, v in meter.last.items()}})
            return seconds
        times = repeat(ctx.clock, s.warmup, s.repeats, once)
        timed_epochs = epochs[s.warmup:]
        n = s.sample_batch * s.sample_batches
        train = [e["train_on"] for e in timed_epochs]
        increase = statistics.median(t["peak"] - t["base"] for t in train)
        return {
            "algorithm": algorithm, "gradient_checkpointing": checkpointing, "trajectories_per_epoch": n,
            "timed_epochs": len(times), "trajectories_per_s": statistics.median(n / t for t in times),
            "epoch_s": statistics.median(times),
            "sample_phase_s": statistics.median(e["sample_epoch"]["seconds"] for e in timed_epochs),
            "train_phase_s": statistics.median(t["seconds"] for t in train),
            "peak_gib": max(e["peak"] for e in timed_epochs) / GiB, "meter": ctx.device.meter,
            "allocated_before_train_gib": statistics.median(t["base"] for t in train) / GiB,
            "memory_vs_estimate": _memory_comparison(ctx, increase, 2 * s.train_batch, checkpointing),
        }
    finally:
        trainer.accelerator.free_memory()


@dataclass
class RandomLabeler:
    """Stands in for the simulated evaluator (whose toy judge means nothing on SD images): labels each image
    good or bad at random, at least one of each so the round trains, and picks a random good image as best."""

    seed: int = 0
    name: str = "random"

    def label_round(self, store, round_id: int) -> int:
        import numpy as np

        ids = list(store.get_round(round_id).image_ids)
        rng = np.random.default_rng([self.seed, round_id])
        good = rng.random(len(ids)) < 0.5
        good[rng.choice(len(ids), 2, replace=False)] = [True, False]
        best = int(rng.choice([i for i, g in zip(ids, good) if g]))
        store.submit(round_id, self.name, {i: "good" if g else "bad" for i, g in zip(ids, good)}, best)
        return len(ids)


def part_hero(ctx: Context) -> dict:
    """HERO rounds through the feedback loop's round function (sample, store, label, embed, update)."""
    from diffalign.algorithms.ddpo import DDPO
    from diffalign.feedback.loop import LoopState, _build_hero, _check, _NoReward, _round
    from diffalign.feedback.store import FeedbackStore
    from diffalign.trainer import Trainer

    s = ctx.sizes
    cfg = _config(ctx, "hero", "ddpo", False,
                  feedback={"algorithm": "hero", "prompts": PROMPTS[:1], "rounds": s.warmup + s.repeats,
                            "images_per_round": s.hero_images, "eval_every": 0},
                  hero={"embed_steps": s.hero_embed_steps})
    cfg.sample.prompts = PROMPTS[:1]
    _check(cfg)
    trainer = Trainer(cfg, reward=_NoReward(), pipe=build_pipeline(ctx.family, s, ctx.device.name),
                      algorithm=DDPO(cfg.ddpo), log=lambda m: None)
    try:
        hero = _build_hero(cfg, trainer, PROMPTS[:1])
        state = LoopState(hero)
        out = Path(cfg.output_dir)
        (out / "rounds").mkdir(parents=True, exist_ok=True)
        store = FeedbackStore(out / "feedback")
        run_id = store.create_run("gpu-check", cfg.model_dump(mode="json"))
        labeler, rounds = RandomLabeler(), []

        def once(r: int) -> float:
            ctx.device.reset_peak()
            seconds, record = timed(ctx.device, lambda: _round(r, cfg, trainer, state, store, run_id, PROMPTS[0],
                                                                "simulated", labeler, lambda m: None))
            rounds.append({"seconds": seconds, "peak": ctx.device.peak(), "trained": "train/policy_loss" in record,
                           "good": record["good"]})
            return seconds
        times = repeat(ctx.clock, s.warmup, s.repeats, once)
        timed_rounds = rounds[s.warmup:]
        return {"images_per_round": s.hero_images, "encoder": cfg.hero.encoder, "embed_steps": s.hero_embed_steps,
                "timed_rounds": len(times), "round_s": statistics.median(times),
                "images_per_s": s.hero_images / statistics.median(times),
                "peak_gib": max(r["peak"] for r in timed_rounds) / GiB, "meter": ctx.device.meter,
                "rounds_trained": sum(r["trained"] for r in timed_rounds), "labels": store.label_count(run_id)}
    finally:
        trainer.accelerator.free_memory()


def parts(ctx: Context) -> list[tuple[str, Callable[[], dict]]]:
    return ([("sampler", lambda: part_sampler(ctx))]
            + [(name, lambda n=name, a=algo, c=ckpt: part_trainer(ctx, n, a, c)) for name, algo, ckpt in ALGORITHM_PARTS]
            + [("hero", lambda: part_hero(ctx))])


def run_guarded(named_parts, clock: Clock, on_result: Callable[[str, dict], None], free=lambda: None) -> None:
    """Run each part unless the budget no longer holds the longest part so far; record ok / error / skipped."""
    for name, fn in named_parts:
        if clock.left() <= 0 or not clock.fits(clock.longest_part):
            on_result(name, {"status": "skipped", "reason": f"time budget: {max(0.0, clock.left()):.0f} s left of "
                             f"{clock.budget_s:.0f} s, the longest part so far took {clock.longest_part:.0f} s"})
            continue
        t0 = time.monotonic()
        try:
            result = {"status": "ok", **fn()}
        except Exception as e:  # one part's failure (OOM included) must not cost the others their turn
            result = {"status": "error", "error": f"{type(e).__name__}: {str(e)[:500]}",
                      "traceback": traceback.format_exc().splitlines()[-12:]}
        result["part_s"] = time.monotonic() - t0
        clock.longest_part = max(clock.longest_part, result["part_s"])
        free()
        on_result(name, result)


# ------------------------------------------------------------------------------------------------------
# Report


def environment(device: Device) -> dict:
    import importlib.metadata as md

    import torch

    env = {"python": platform.python_version(), "device": device.name, "threads": torch.get_num_threads()}
    for pkg in ("torch", "diffusers", "transformers", "peft", "accelerate", "huggingface_hub", "safetensors"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    if device.cuda:
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / GiB
    return env


def table(report: dict) -> str:
    rows = [("family", "part", "result")]
    for fam, data in report["families"].items():
        if data.get("status") == "skipped":
            rows.append((fam, "-", f"skipped: {data['reason']}"))
            continue
        for part, r in data["parts"].items():
            if r["status"] != "ok":
                rows.append((fam, part, f"{r['status']}: {r.get('error') or r.get('reason')}"))
            elif part == "sampler":
                rows.append((fam, part, f"diffalign / stock = {r['ratio']:.3f} ({r['diffalign_s']:.2f} s vs "
                                        f"{r['stock_s']:.2f} s, batch {r['batch']}, {r['steps']} steps, median of "
                                        f"{r['timed_runs']}); max |image diff| {r['max_abs_image_difference']:.3g}"))
            elif part == "hero":
                rows.append((fam, part, f"{r['round_s']:.2f} s/round of {r['images_per_round']} images, peak "
                                        f"{r['peak_gib']:.2f} GiB, {r['rounds_trained']} of {r['timed_rounds']} timed rounds trained"))
            else:
                m = r["memory_vs_estimate"]
                rows.append((fam, part, f"{r['trajectories_per_s']:.3f} traj/s (sample {r['sample_phase_s']:.1f} s, "
                                        f"train {r['train_phase_s']:.1f} s), peak {r['peak_gib']:.2f} GiB; train step "
                                        f"+{m['measured_train_increase_gib']:.2f} GiB vs estimate {m['estimate_gib']:.2f} "
                                        f"(x{m['ratio_measured_to_estimate']:.2f})"))
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{a:<{width[0]}}  {b:<{width[1]}}  {c}" for a, b, c in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for gpu_check.json (created)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: proves the script, measures nothing real")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="time budget in seconds; parts that no longer fit are skipped (default 420 on a GPU, 300 dry)")
    ap.add_argument("--device", default=None, help="torch device (default cuda; cpu with --dry-run)")
    args = ap.parse_args(argv)
    started = time.monotonic()
    import torch

    name = args.device or ("cpu" if args.dry_run else "cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA GPU is visible to torch: run on a GPU machine, or rehearse with --dry-run", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = Device(name)
    sizes = Sizes.dry() if args.dry_run else Sizes.gpu()
    clock = Clock(args.budget_s if args.budget_s is not None else (300.0 if args.dry_run else 420.0))
    report = {"mode": "dry-run" if args.dry_run else "gpu", "environment": environment(device),
              "sizes": asdict(sizes), "budget_s": clock.budget_s, "families": {}}
    path = out / "gpu_check.json"

    def save():
        report["elapsed_s"] = time.monotonic() - started
        path.write_text(json.dumps(report, indent=1))
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        for fam, build, skipped in families(tiny=args.dry_run):
            reason = skipped()
            if reason is not None:
                print(f"{fam}: {reason}")
                report["families"][fam] = {"status": "skipped", "reason": reason}
                continue
            ctx = Context(build(), sizes, device, clock, Path(work) / fam, args.dry_run)
            report["families"][fam] = {"status": "ran", "parts": {}}

            def record(part: str, result: dict, fam=fam) -> None:
                report["families"][fam]["parts"][part] = result
                print(f"{fam} {part}: {result['status']} ({result.get('part_s', 0):.1f} s)", flush=True)
                save()
            run_guarded(parts(ctx), clock, record, free=device.free)
    save()
    print("\n" + table(report))
    print(f"\nwritten {path} ({report['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
