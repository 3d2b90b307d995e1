"""How long until DDPO on JPEG compressibility hacks the toy model (issue 18): toy success on fixed seeds
every few epochs while training on a score that ignores the prompt.

    OMP_NUM_THREADS=1 .venv/bin/python bench/reward_hacking.py --lr 3e-3 --epochs 60 --every 3 --out bench/out/hack

Writes one JSON line per measurement (epoch, trajectories, training reward, JPEG kB, toy success and partial
score, drift and Vendi on the measurement images) to <out>/curve.jsonl and prints it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from diffalign.config import load_config
from diffalign.evaluate import generate
from diffalign.metrics import diversity, drift, toy_success
from diffalign.prompts import resolve_prompts
from diffalign.trainer import Trainer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--prompts", default="hard_counting")
    ap.add_argument("--samples", type=int, default=8, help="measurement images per prompt")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16, help="sample.batch_size")
    ap.add_argument("--batches", type=int, default=2, help="sample.num_batches_per_epoch")
    ap.add_argument("--out", default="bench/out/hack")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config("configs/ddpo_jpeg.toml", [
        f'output_dir="{out / "run"}"', f'sample.prompts="{args.prompts}"', f"train.learning_rate={args.lr}",
        f"train.epochs={args.epochs}", f"sample.num_steps={args.steps}",
        f"sample.batch_size={args.batch}", f"sample.num_batches_per_epoch={args.batches}", "guards.every=0", f"train.seed={args.seed}",
        "log.progress=false", 'log.tracker="none"', "checkpoint.every=0"])
    trainer = Trainer(cfg, log=print)
    prompts = resolve_prompts(args.prompts)
    kw = dict(samples_per_prompt=args.samples, seed=4321, num_steps=args.steps,
              guidance_scale=cfg.sample.guidance_scale, eta=cfg.sample.eta)
    unet = trainer.pipe.unet
    unet.disable_adapters()
    base = generate(trainer.pipe, prompts, **kw)
    unet.enable_adapters()

    def measure(epoch: int, reward_mean: float | None) -> None:
        now = generate(trainer.pipe, prompts, **kw)
        success, partial = toy_success(now.images, now.prompts)
        row = {"epoch": epoch, "trajectories": trainer.state.trajectories, "lr": args.lr, "reward_mean": reward_mean,
               "success": success, "partial": partial, "drift": drift(base.images, now.images),
               "diversity": diversity(now.images, now.prompts), "time": round(time.time() - t0, 1)}
        print(json.dumps(row), flush=True)
        with open(out / "curve.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    t0 = time.time()
    measure(0, None)
    for epoch in range(args.epochs):
        m = trainer.run_epoch(epoch)
        if (epoch + 1) % args.every == 0:
            measure(epoch + 1, m["reward_mean"])


if __name__ == "__main__":
    main()
