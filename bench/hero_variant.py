"""One HERO session as in bench/feedback_efficiency.py (four green triangles, seed 0, clean labels, 16 per
round, success on 32 evaluation images every 4 rounds, up to 640 labels; the paper's HERO: encoder "latent-cnn",
no unlabelled images, DDPO clip 1e-4), with config overrides on top:

    .venv/bin/python bench/hero_variant.py NAME [section.key=value ...]
    .venv/bin/python bench/hero_variant.py all_steps train.timestep_fraction=1.0

Writes bench/out/hero_variants/NAME/ and prints the success curve as one JSON line; resumable.
"""
import json
import sys
import time
from pathlib import Path

import torch

from diffalign.config import load_config
from diffalign.feedback.loop import run_feedback

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
name, extra = sys.argv[1], sys.argv[2:]
out = ROOT / "bench" / "out" / "hero_variants" / name
cfg = load_config(ROOT / "configs" / "hero_toy.toml", overrides=[
    f'output_dir="{out}"', "feedback.prompts=['four green triangles']", "feedback.rounds=40",
    "feedback.images_per_round=16", "feedback.eval_every=4", "feedback.eval_samples=32",
    "feedback.stop_at_success=0.8", "train.seed=0", 'log.tracker="none"', "log.progress=false",
    "checkpoint.every=1", "checkpoint.keep=1", "hero.encoder='latent-cnn'", "hero.unlabeled_per_round=0", "ddpo.clip_range=1e-4", *extra])
t0 = time.time()
res = run_feedback(cfg, evaluator="simulated", resume=True, log=lambda m: print(m, flush=True))
curve = [(h["labels_used"], h.get("success")) for h in res.history if "success" in h]
print(json.dumps({"name": name, "extra": extra, "curve": curve, "seconds": round(time.time() - t0)}), flush=True)
