"""DDPO vs DAG-DB vs DAG-KL at equal trajectory budgets on the toy world.

Three rewards: the judge's partial score on the hard counting prompts (base success <= 30%), JPEG
compressibility (negated JPEG size in kB) on the same prompts, and the judge's partial score on three relation
prompts (bench/prompts/relation_diversity.txt: many layouts are equally right, the diversity question). For every (reward, algorithm, seed) the same sampler settings and the same number of
trajectories per epoch; every ``--eval-every`` epochs the tuned model is measured on fixed evaluation seeds:
mean reward, toy success, diversity (Vendi, per prompt) and drift from the base model (same noises).

    .venv/bin/python bench/sample_efficiency.py --budget 640 --seeds 0 1 2            # the full comparison
    .venv/bin/python bench/sample_efficiency.py --budget 128 --seeds 0 --rewards toy  # a quick look

Writes ``bench/out/sample_efficiency/{results.json, curves.png, table.md}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "sample_efficiency"

REWARDS = {
    "toy": {"terms": [{"name": "toy", "args": {"mode": "partial"}}], "prompts": "hard_counting"},
    # The same three prompts for JPEG: evaluation stays cheap, and diversity (Vendi per prompt) comparable.
    "jpeg": {"terms": [{"name": "jpeg_compressibility"}], "prompts": "hard_counting"},
    # Relation prompts: many layouts are equally right, so collapse onto one shows as lost diversity (issue 21).
    "relation": {"terms": [{"name": "toy", "args": {"mode": "partial"}}],
                 "prompts": str(ROOT / "bench" / "prompts" / "relation_diversity.txt")},
}


TRAIN_KEYS = ("epoch", "trajectories", "reward_mean", "reward_std", "time_sample", "time_train", "train/beta",
              "train/db_residual_abs", "train/grad_norm", "train/grad_norm_flow", "train/grad_norm_joint",
              "train/approx_kl", "train/clipfrac", "train/policy_loss", "train/db_loss")


def make_config(reward: str, algorithm: str, seed: int, epochs: int, args, out_dir: Path):
    from diffalign.config import load_config

    spec = REWARDS[reward]
    return load_config(overrides=[
        f'output_dir="{out_dir}"', f'train.algorithm="{algorithm}"', f"train.seed={seed}", f"train.epochs={epochs}",
        f'sample.prompts="{spec["prompts"]}"', f"sample.batch_size={args.batch}", "sample.num_batches_per_epoch=2",
        f"sample.num_steps={args.steps}", "sample.guidance_scale=4.0", f"train.batch_size={args.train_batch}",
        f"train.timestep_fraction={args.timestep_fraction}", f"train.learning_rate={args.lr}",
        f"dag.reward_exp={args.reward_exp[reward]}", 'log.tracker="none"', "log.progress=false", "checkpoint.every=0", "checkpoint.keep=1",
        f'eval.prompts="{spec["prompts"]}"', f"eval.samples_per_prompt={args.eval_samples}", "eval.seed=999",
        *args.set,
    ], reward={"terms": spec["terms"]})


def run_one(reward: str, algorithm: str, seed: int, args) -> dict:
    from diffalign.evaluate import generate, score
    from diffalign.metrics import drift
    from diffalign.pipeline import set_lora_enabled
    from diffalign.prompts import resolve_prompts
    from diffalign.trainer import Trainer

    per_epoch = 2 * args.batch
    epochs = args.budget // per_epoch
    out_dir = args.out / "runs" / f"{reward}-{algorithm}{args.tag}-s{seed}"
    cfg = make_config(reward, algorithm, seed, epochs, args, out_dir)
    trainer = Trainer(cfg, log=lambda m: None)
    unet = trainer.pipe.unet
    prompts = resolve_prompts(cfg.eval.prompts)

    def measure(lora_on: bool):
        set_lora_enabled(unet, lora_on)
        imgs = generate(trainer.pipe, prompts, cfg.eval.samples_per_prompt, cfg.eval.seed, cfg.sample.num_steps,
                        cfg.sample.guidance_scale, cfg.sample.eta)
        set_lora_enabled(unet, True)
        return imgs, score(imgs, trainer.reward)

    base_imgs, base = measure(False)
    points = [{"trajectories": 0, **base, "drift": 0.0, "seconds": 0.0}]
    epochs_log = []  # per-epoch training diagnostics: reward curve, |DB residual|, each module's gradient norm
    done_seconds, start = 0.0, 0
    # Long runs resume after a kill: a checkpoint and the points measured so far are written at every evaluation.
    partial_path = out_dir / "partial.json"
    if partial_path.exists() and trainer.load_checkpoint() is not None:
        partial = json.loads(partial_path.read_text())
        if partial["epoch"] == trainer.state.epoch:
            points, epochs_log, done_seconds, start = (partial["points"], partial["epochs"], partial["seconds"],
                                                       partial["epoch"])
            print(f"  resumed {out_dir.name} after epoch {start}", flush=True)
        else:
            raise SystemExit(f"{partial_path} (epoch {partial['epoch']}) does not match the newest checkpoint "
                             f"(epoch {trainer.state.epoch}); delete {out_dir} to rerun this run")
    t0 = time.time() - done_seconds
    for epoch in range(start, epochs):
        m = trainer.run_epoch(epoch)
        epochs_log.append({k: m[k] for k in TRAIN_KEYS if k in m})
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == epochs:
            elapsed = time.time() - t0
            imgs, metrics = measure(True)
            points.append({"trajectories": (epoch + 1) * per_epoch, **metrics,
                           "drift": drift(base_imgs.images, imgs.images), "seconds": elapsed})
            print(f"  {reward:5s} {algorithm:7s} seed {seed} traj {(epoch + 1) * per_epoch:4d}: "
                  + " ".join(f"{k} {v:.3f}" for k, v in points[-1].items() if k != "trajectories"), flush=True)
            if epoch + 1 < epochs:
                trainer.save_checkpoint()
                tmp = partial_path.with_suffix(".tmp")  # replaced atomically: a kill never leaves half a file
                tmp.write_text(json.dumps({"epoch": epoch + 1, "points": points, "epochs": epochs_log,
                                           "seconds": time.time() - t0}))
                tmp.replace(partial_path)
    return {"reward": reward, "algorithm": algorithm + args.tag, "seed": seed, "points": points, "set": args.set,
            "train_seconds": time.time() - t0, "epochs": epochs_log}


def summarize(results: list[dict], budgets: list[int]) -> str:
    lines = ["| reward | algorithm | trajectories | reward | success | diversity (Vendi) | drift | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for reward in dict.fromkeys(r["reward"] for r in results):
        for algo in dict.fromkeys(r["algorithm"] for r in results):
            runs = [r for r in results if r["reward"] == reward and r["algorithm"] == algo]
            if not runs:
                continue
            for budget in budgets:
                pts = [next((p for p in r["points"] if p["trajectories"] == budget), None) for r in runs]
                pts = [p for p in pts if p is not None]
                if not pts:
                    continue

                def ms(key, pts=pts):
                    vals = [p[key] for p in pts if key in p]
                    return f"{np.mean(vals):.3f} ± {np.std(vals):.3f}" if vals else "-"
                lines.append(f"| {reward} | {algo} | {budget} | {ms('reward_mean')} | {ms('success')} | "
                             f"{ms('diversity')} | {ms('drift')} | {len(pts)} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = list(dict.fromkeys(r["reward"] for r in results))
    fig, axes = plt.subplots(len(rewards), 2, figsize=(10, 3.5 * len(rewards)), squeeze=False)
    for row, reward in enumerate(rewards):
        for col, key in enumerate(("reward_mean", "success")):
            ax = axes[row][col]
            for algo in dict.fromkeys(r["algorithm"] for r in results):
                runs = [r for r in results if r["reward"] == reward and r["algorithm"] == algo]
                if not runs or key not in runs[0]["points"][0]:
                    continue
                x = [p["trajectories"] for p in runs[0]["points"]]
                ys = np.array([[p[key] for p in r["points"]] for r in runs])
                ax.plot(x, ys.mean(0), marker="o", ms=3, label=algo)
                ax.fill_between(x, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), alpha=0.2)
            ax.set_title(f"{reward}: {key}")
            ax.set_xlabel("trajectories")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rewards", nargs="+", default=["toy", "jpeg"], choices=list(REWARDS))
    ap.add_argument("--algorithms", nargs="+", default=["ddpo", "dag-db", "dag-kl"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--budget", type=int, default=640, help="Trajectories per run.")
    ap.add_argument("--eval-every", type=int, default=2, help="Epochs between measurements.")
    ap.add_argument("--eval-samples", type=int, default=4, help="Evaluation images per prompt.")
    ap.add_argument("--batch", type=int, default=16, help="Sampling batch (2 per epoch).")
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--timestep-fraction", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--reward-exp-toy", type=float, default=100.0)
    ap.add_argument("--reward-exp-jpeg", type=float, default=10.0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help='Extra config override for every run, e.g. --set dag.flow_learning_rate=3e-4 (repeatable).')
    ap.add_argument("--tag", default="", help="Suffix of the algorithm label for a variant, e.g. '-beta10'.")
    ap.add_argument("--out", type=Path, default=OUT, help="Results directory (results.json is resumed from it).")
    ap.add_argument("--merge", type=Path, nargs="*", default=[], metavar="DIR",
                    help="Take finished runs from these results directories first (runs split over processes).")
    ap.add_argument("--summary-only", action="store_true", help="Run nothing: table and plot of the runs there.")
    args = ap.parse_args()
    args.reward_exp = {"toy": args.reward_exp_toy, "jpeg": args.reward_exp_jpeg, "relation": args.reward_exp_toy}
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    for other in args.merge:
        key = lambda r: (r["reward"], r["algorithm"], r["seed"], r["points"][-1]["trajectories"])  # noqa: E731
        have = {key(r) for r in results}
        results += [r for r in json.loads((other / "results.json").read_text()) if key(r) not in have]
    done = {(r["reward"], r["algorithm"], r["seed"], r["points"][-1]["trajectories"]) for r in results}
    per_epoch = 2 * args.batch
    final = (args.budget // per_epoch) * per_epoch
    for reward in args.rewards:
        for seed in args.seeds:
            for algo in args.algorithms:
                if args.summary_only or (reward, algo + args.tag, seed, final) in done:
                    continue  # resumable: finished runs are kept
                print(f"{reward} / {algo} / seed {seed}", flush=True)
                results.append(run_one(reward, algo, seed, args))
                results_path.write_text(json.dumps(results, indent=1))
    results_path.write_text(json.dumps(results, indent=1))  # merged runs included
    budgets = sorted({p["trajectories"] for r in results for p in r["points"]})
    table = summarize(results, [b for b in budgets if b in (0, final // 2, final) or b == budgets[-1]])
    (args.out / "table.md").write_text(table + "\n")
    plot(results, args.out / "curves.png")
    print(table)
    labels = dict.fromkeys(r["algorithm"] for r in results)
    times = {a: np.mean([r["train_seconds"] for r in results if r["algorithm"] == a]) for a in labels}
    print("mean training seconds per run:", {k: round(v, 1) for k, v in times.items()})


if __name__ == "__main__":
    main()
