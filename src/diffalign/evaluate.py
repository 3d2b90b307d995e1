"""Before/after evaluation of a LoRA on fixed seeds: reward, toy success, diversity, drift.

Base and tuned images come from the same prompts, the same initial noises and the same DDIM noises
(one generator per batch, re-seeded identically for both), so every difference is the LoRA's doing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .metrics import diversity, drift, toy_success
from .prompts import resolve_prompts
from .rewards import build_reward, to_uint8_images
from .sampling import sample_trajectories


@dataclass
class EvalImages:
    prompts: list[str]
    images: np.ndarray  # (N, H, W, 3) uint8


def generate(pipe, prompts: list[str], samples_per_prompt: int, seed: int, num_steps: int, guidance_scale: float,
             eta: float, batch_size: int = 16, unet=None) -> EvalImages:
    """``samples_per_prompt`` images of every prompt from seed-determined noises (with ``unet`` if given, else
    the pipeline's)."""
    expanded = [p for p in prompts for _ in range(samples_per_prompt)]
    images = []
    for b, start in enumerate(range(0, len(expanded), batch_size)):
        chunk = expanded[start:start + batch_size]
        gen = torch.Generator().manual_seed(seed * 100_003 + b)
        traj = sample_trajectories(pipe, chunk, num_steps, guidance_scale, eta, generator=gen, unet=unet)
        images.append(to_uint8_images(traj.images))
    return EvalImages(expanded, np.concatenate(images))


def score(images: EvalImages, reward=None) -> dict:
    out: dict = {}
    if reward is not None:
        total, _ = reward(images.images, images.prompts, [{} for _ in images.prompts], batch="eval")
        out["reward_mean"] = float(np.mean(total))
    toy = toy_success(images.images, images.prompts)
    if toy is not None:
        out["success"], out["partial"] = toy
    out["diversity"] = diversity(images.images, images.prompts)
    return out


MIN_DIVERSITY_SAMPLES = 8  # below this many images per prompt, Vendi (bounded by n) says little


def evaluate_lora(pipe, cfg, reward=None, set_lora=None, log=print) -> dict:
    """Metrics of the base model (LoRA off) and of the tuned one (LoRA on), plus drift between them.

    ``set_lora(enabled)`` switches the adapter (default: the stock pipeline's enable/disable_lora).
    """
    prompts = resolve_prompts(cfg.eval.prompts)
    if cfg.eval.samples_per_prompt < MIN_DIVERSITY_SAMPLES:
        log(f"warning: eval.samples_per_prompt = {cfg.eval.samples_per_prompt}: diversity (Vendi, at most "
            f"{cfg.eval.samples_per_prompt} per prompt) needs at least {MIN_DIVERSITY_SAMPLES} images per prompt to "
            f"mean something; set eval.samples_per_prompt = {MIN_DIVERSITY_SAMPLES} or more")
    reward = reward if reward is not None else build_reward(cfg.reward.terms)
    set_lora = set_lora or (lambda on: pipe.enable_lora() if on else pipe.disable_lora())
    kw = dict(samples_per_prompt=cfg.eval.samples_per_prompt, seed=cfg.eval.seed, num_steps=cfg.sample.num_steps,
              guidance_scale=cfg.sample.guidance_scale, eta=cfg.sample.eta)
    set_lora(False)
    base = generate(pipe, prompts, **kw)
    set_lora(True)
    tuned = generate(pipe, prompts, **kw)
    result = {"base": score(base, reward), "tuned": score(tuned, reward), "drift": drift(base.images, tuned.images),
              "num_images": len(base.prompts), "prompts": cfg.eval.prompts if isinstance(cfg.eval.prompts, str) else "list"}
    return result | {"_images": {"base": base, "tuned": tuned}}


def load_tuned_pipeline(run_dir: str | Path):
    """The run's base pipeline with its LoRA loaded through stock diffusers, and the run's config."""
    from .config import load_config
    from .pipeline import load_pipeline

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.toml")
    pipe = load_pipeline(cfg.model.id, cfg.model.revision)
    lora = run_dir / "lora"
    if not lora.is_dir():
        raise FileNotFoundError(f"{run_dir} has no lora/ directory: is it a finished diffalign run?")
    pipe.load_lora_weights(str(lora))
    return pipe, cfg


def evaluate_run(run_dir: str | Path, write: bool = True) -> dict:
    run_dir = Path(run_dir)
    pipe, cfg = load_tuned_pipeline(run_dir)
    result = evaluate_lora(pipe, cfg)
    if write:
        (run_dir / "eval.json").write_text(json.dumps({k: v for k, v in result.items() if not k.startswith("_")}, indent=2))
        images = result["_images"]
        np.savez_compressed(run_dir / "eval_images.npz", base=images["base"].images, tuned=images["tuned"].images,
                            prompts=np.array(images["base"].prompts))
        from .modelcard import write_model_card

        write_model_card(run_dir, cfg)  # the card gains the before/after table
    return result
