"""Labels needed to reach 80% success: HERO vs D3PO vs DDPO-binary, with the simulated evaluator.

For each hard toy prompt (base success <= 30%), algorithm, seed and label-noise rate, a feedback session
runs round after round (``feedback.images_per_round`` labels per round) until the toy success measured on
fixed evaluation seeds reaches the target (``feedback.stop_at_success``: the session ends and saves its
LoRA), or the label budget runs out. The number reported is the labels used at the first measurement at or
above the target, censored at the budget otherwise ("> budget").

    .venv/bin/python bench/feedback_efficiency.py --prompts "four green triangles" --seeds 0 1 2 --noise 0 0.1
    .venv/bin/python bench/feedback_efficiency.py --shard a --noise 0 &   # shards: separate result files,
    .venv/bin/python bench/feedback_efficiency.py --shard b --noise 0.1 & # one process each
    .venv/bin/python bench/feedback_efficiency.py --report                # merge shards: table + plot
    .venv/bin/python bench/feedback_efficiency.py --transfer              # HERO LoRAs on unseen related prompts
    .venv/bin/python bench/feedback_efficiency.py --algorithms hero-features --shard c   # a HERO variant (VARIANTS)
    .venv/bin/python bench/feedback_efficiency.py --study fine --eval-every 1 ...   # a separate study (own results)
    .venv/bin/python bench/feedback_efficiency.py --hold 320 ...   # continue sessions past 80%: does it last?

Resumable: finished sessions are in ``results*.json`` (written after each one) and skipped; an interrupted
session continues from its last per-round checkpoint. Writes ``bench/out/feedback_efficiency/`` (results,
table.md, transfer-METHOD.md, runs/) and the plot ``bench/figures/feedback_efficiency.png``; with ``--study NAME``,
``bench/out/feedback_efficiency/NAME/`` and ``bench/figures/feedback_efficiency-NAME.png``, so that sessions run
with other measurement settings never mix with (or resume from) these.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "feedback_efficiency"
FIGURE = ROOT / "bench" / "figures" / "feedback_efficiency.png"
METHODS = ["hero", "hero-features", "hero-features-unlabeled", "hero-features-unlabeled-clip", "d3po", "d3po-clip",
           "d3po-group4", "d3po-group8", "d3po-group4-lr", "d3po-group4-batch8", "d3po-lr",
           "ddpo-binary", "ddpo-binary-clip"]
# HERO's settings on top of configs/hero_toy.toml: the paper's (the reference's encoder, labelled images only),
# the UNet-feature encoder, and that with 48 unlabelled images per round. Each pins every key the toy config has
# changed since, so that the recorded sessions stay reproducible.
VARIANTS = {
    "hero": ["hero.encoder='latent-cnn'", "hero.unlabeled_per_round=0", "ddpo.clip_range=1e-4"],
    "hero-features": ["hero.encoder='unet-features'", "hero.unlabeled_per_round=0", "ddpo.clip_range=1e-4"],
    "hero-features-unlabeled": ["hero.encoder='unet-features'", "hero.unlabeled_per_round=48", "ddpo.clip_range=1e-4"],
    # ... with a 10x wider PPO clip, so that a round's update can move the policy further (what the toy config ships).
    "hero-features-unlabeled-clip": ["hero.encoder='unet-features'", "hero.unlabeled_per_round=48",
                                     "ddpo.clip_range=1e-3"],
    "ddpo-binary": ["ddpo.clip_range=1e-4"],
    # The same wider clip for the baseline that shares HERO's update, for a fair comparison.
    "ddpo-binary-clip": ["ddpo.clip_range=1e-3"],
    # D3PO tuned as hard as HERO was, one knob at a time: its own clip on the ratio to the reference (5x wider),
    # four or eight images per shared noise (up to 6 or 28 pairs per group from the same labels instead of 1), a 3x
    # larger step.
    "d3po-clip": ["d3po.ratio_clip=0.5"],
    "d3po-group4": ["d3po.group_size=4"],
    "d3po-group8": ["d3po.group_size=8"],
    # More pairs per round means more optimizer steps, and D3PO's ratio clamp (on mean-reduced per-step
    # log-probabilities) holds little back; so the same pairs with a 3x smaller step, or 4 pairs per step.
    "d3po-group4-lr": ["d3po.group_size=4", "train.learning_rate=3e-4"],
    "d3po-group4-batch8": ["d3po.group_size=4", "train.batch_size=8"],
    "d3po-lr": ["train.learning_rate=3e-3"],
}


def base_algorithm(method: str) -> str:
    """The feedback.algorithm a benchmark method runs: 'hero-features-...' -> 'hero', 'd3po-clip' -> 'd3po'."""
    return next(a for a in ("hero", "d3po", "ddpo-binary") if method.startswith(a))


def session_name(prompt: str, algorithm: str, seed: int, noise: float) -> str:
    return f"{algorithm}-{prompt.replace(' ', '_')}-s{seed}-n{noise}"


def session_config(prompt: str, algorithm: str, seed: int, noise: float, args):
    from diffalign.config import load_config

    name = session_name(prompt, algorithm, seed, noise)
    base = base_algorithm(algorithm)
    return load_config(ROOT / "configs" / ("d3po_toy.toml" if base == "d3po" else "hero_toy.toml"), overrides=[
        f'output_dir="{OUT / "runs" / name}"', f'feedback.algorithm="{base}"', f"feedback.prompts=['{prompt}']",
        f"feedback.rounds={args.max_labels // args.images_per_round}", f"feedback.images_per_round={args.images_per_round}",
        f"feedback.simulated_noise_rate={noise}", f"feedback.eval_every={args.eval_every}",
        f"feedback.eval_samples={args.eval_samples}", f"feedback.stop_at_success={args.target}", f"train.seed={seed}",
        'log.tracker="none"', "log.progress=false", "checkpoint.every=1", "checkpoint.keep=1",
        *VARIANTS.get(algorithm, []),
    ])


def run_session(prompt: str, algorithm: str, seed: int, noise: float, args) -> dict:
    from diffalign.feedback.loop import run_feedback

    name = session_name(prompt, algorithm, seed, noise)
    cfg = session_config(prompt, algorithm, seed, noise, args)
    t0 = time.time()
    # resume=True: a session killed mid-way continues after its last finished round (same labels, same noises).
    result = run_feedback(cfg, evaluator="simulated", resume=True, log=lambda m: print(f"  {name}: {m}", flush=True))
    history = result.history
    reached = next((h["labels_used"] for h in history if h.get("success", -1.0) >= args.target), None)
    return {"prompt": prompt, "algorithm": algorithm, "seed": seed, "noise": noise, "labels_to_target": reached,
            "budget": args.max_labels, "target": args.target, "seconds": round(time.time() - t0, 1),
            "history": [{k: h[k] for k in ("round", "labels_used", "success", "good", "encoder_collapsed") if k in h}
                        for h in history]}


def base_success(prompt: str, args) -> float:
    """The base model's success on the sessions' evaluation seeds (what every curve starts from)."""
    from diffalign.config import load_config
    from diffalign.evaluate import generate
    from diffalign.metrics import toy_success
    from diffalign.pipeline import load_pipeline

    cfg = load_config(ROOT / "configs" / "hero_toy.toml")
    pipe = load_pipeline(cfg.model.id)
    images = generate(pipe, [prompt], args.eval_samples, cfg.eval.seed, cfg.sample.num_steps,
                      cfg.sample.guidance_scale, cfg.sample.eta)
    return float(toy_success(images.images, images.prompts)[0])


def load_results(include_unfinished: bool = True) -> tuple[list[dict], dict]:
    """Finished sessions from the result files, plus (``include_unfinished``) sessions cut short before
    their budget, read from their run's metrics.jsonl and censored at the labels they had used."""
    results, bases = [], {}
    for path in sorted(OUT.glob("results*.json")):
        data = json.loads(path.read_text())
        results += data["sessions"]
        bases.update(data["base"])
    if include_unfinished:
        done = {session_name(r["prompt"], r["algorithm"], r["seed"], r["noise"]) for r in results}
        target = results[0]["target"] if results else 0.8
        for metrics in sorted((OUT / "runs").glob("*/metrics.jsonl")):
            history = [json.loads(x) for x in metrics.read_text().splitlines()]
            measured = [h for h in history if "success" in h]
            if metrics.parent.name in done or not measured:
                continue
            match = re.fullmatch(rf"({'|'.join(sorted(METHODS, key=len, reverse=True))})-(.+)-s(\d+)-n([\d.]+)",
                                 metrics.parent.name)
            if match is None:
                continue
            algorithm, prompt = match[1], match[2].replace("_", " ")
            seed, noise = int(match[3]), float(match[4])
            reached = next((h["labels_used"] for h in measured if h["success"] >= target), None)
            results.append({"prompt": prompt, "algorithm": algorithm, "seed": seed, "noise": noise,
                            "labels_to_target": reached, "budget": measured[-1]["labels_used"], "target": target,
                            "unfinished": True, "history": [{k: h[k] for k in ("round", "labels_used", "success", "good")
                                                             if k in h} for h in history]})
    return results, bases


def fmt_labels(values: list[int | None], budget: int) -> str:
    reached = [v for v in values if v is not None]
    censored = len(values) - len(reached)
    if not reached:
        return f"> {budget} (all {censored} censored)"
    text = f"{np.mean(reached):.0f} ± {np.std(reached):.0f}" if len(reached) > 1 else f"{reached[0]}"
    return text + (f", {censored} censored (> {budget})" if censored else "")


def report(args) -> str:
    results, bases = load_results()
    if not results:
        raise SystemExit(f"no results in {OUT}: run the benchmark first")
    target = results[0]["target"]
    noises = sorted({r["noise"] for r in results})
    lines = [f"| algorithm | label noise | labels to {target:.0%} (per seed) | labels to {target:.0%}: mean ± std / censored | "
             f"labels to {args.secondary:.0%} (per seed) | success at the last measurement (mean ± std) |",
             "|---|---|---|---|---|---|"]
    for algo in METHODS:
        for noise in noises:
            runs = sorted((r for r in results if r["algorithm"] == algo and r["noise"] == noise), key=lambda r: r["seed"])
            if not runs:
                continue
            budget = runs[0]["budget"]
            vals = [r["labels_to_target"] for r in runs]
            sec = [next((h["labels_used"] for h in r["history"] if h.get("success", -1.0) >= args.secondary), None)
                   for r in runs]
            last = [next(h["success"] for h in reversed(r["history"]) if "success" in h) for r in runs]
            def cut(r, v):
                # "*": the session was cut short (time), censored at the labels it had used, not at the budget.
                return str(v) if v is not None else f">{r['budget']}" + ("*" if r.get("unfinished") else "")
            per_seed = ", ".join(cut(r, v) for r, v in zip(runs, vals, strict=True))
            sec_seed = ", ".join(cut(r, v) for r, v in zip(runs, sec, strict=True))
            budget = min(r["budget"] for r in runs)
            lines.append(f"| {algo} | {noise:.0%} | {per_seed} | {fmt_labels(vals, budget)} | {sec_seed} | "
                         f"{np.mean(last):.2f} ± {np.std(last):.2f} (n={len(runs)}) |")
    base_line = ", ".join(f"{p}: {b:.2f}" for p, b in bases.items())
    table = "\n".join(lines) + (f"\n\nBase success on the same evaluation seeds: {base_line}. "
                                 "\\* = session cut short by the time limit, censored at the labels it had used.\n")
    (OUT / "table.md").write_text(table)
    plot(results, bases, noises)
    return table


def plot(results: list[dict], bases: dict, noises: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(noises), figsize=(5.5 * len(noises), 4), sharey=True, squeeze=False)
    colours = {"hero": "tab:red", "hero-features": "tab:orange", "hero-features-unlabeled": "tab:purple",
               "hero-features-unlabeled-clip": "tab:brown", "d3po": "tab:blue", "d3po-clip": "tab:cyan",
               "d3po-group4": "tab:pink", "d3po-group8": "magenta", "d3po-group4-lr": "navy",
               "d3po-group4-batch8": "teal", "d3po-lr": "tab:gray", "ddpo-binary": "tab:green", "ddpo-binary-clip": "tab:olive"}
    for ax, noise in zip(axes[0], noises, strict=True):
        for algo in METHODS:
            runs = [r for r in results if r["algorithm"] == algo and r["noise"] == noise]
            for i, r in enumerate(runs):
                pts = [(0, bases.get(r["prompt"], np.nan))] + [(h["labels_used"], h["success"]) for h in r["history"]
                                                               if "success" in h]
                x, y = zip(*pts, strict=True)
                ax.plot(x, y, color=colours[algo], alpha=0.8, marker="o", ms=3,
                        label=f"{algo} ({len(runs)} seeds)" if i == 0 else None)
        ax.axhline(results[0]["target"], color="grey", ls="--", lw=1)
        ax.set_title(f"label noise {noise:.0%}")
        ax.set_xlabel("labels used")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("toy success on fixed eval seeds")
    labelled = {}  # every method once, whichever panel drew it
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            labelled.setdefault(label, handle)
    axes[0][-1].legend(labelled.values(), labelled.keys(), loc="lower right", fontsize=7)
    fig.suptitle(", ".join(sorted({r["prompt"] for r in results})))
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=110)


def transfer(args) -> str:
    """HERO-tuned LoRAs (clean labels) on related prompts never seen in feedback, vs the base model."""
    import torch

    from diffalign.config import load_config
    from diffalign.evaluate import generate
    from diffalign.metrics import toy_success
    from diffalign.pipeline import load_pipeline

    results, _ = load_results()
    method = args.transfer_method
    runs = sorted((r for r in results if r["algorithm"] == method and r["noise"] == 0.0), key=lambda r: r["seed"])
    if not runs:
        raise SystemExit("no finished clean-label HERO session to transfer from")
    cfg = load_config(ROOT / "configs" / "hero_toy.toml")
    kw = dict(seed=args.transfer_seed, num_steps=cfg.sample.num_steps, guidance_scale=cfg.sample.guidance_scale,
              eta=cfg.sample.eta)

    def success(pipe, prompt):
        images = generate(pipe, [prompt], args.transfer_samples, **kw)
        return float(toy_success(images.images, images.prompts)[0])

    pipe = load_pipeline(cfg.model.id)
    rows = {}
    for prompt in args.transfer_prompts:
        rows[prompt] = {"base": success(pipe, prompt), "tuned": []}
    for r in runs:
        lora = OUT / "runs" / session_name(r["prompt"], method, r["seed"], 0.0) / "lora"
        pipe = load_pipeline(cfg.model.id)
        pipe.load_lora_weights(str(lora))
        with torch.no_grad():
            for prompt in args.transfer_prompts:
                rows[prompt]["tuned"].append(success(pipe, prompt))
    trained = sorted({r["prompt"] for r in runs})
    lines = [f"| prompt | seen in feedback | base | {method}-tuned (seeds {', '.join(str(r['seed']) for r in runs)}) | mean |",
             "|---|---|---|---|---|"]
    for prompt, row in rows.items():
        lines.append(f"| {prompt} | {'yes' if prompt in trained else 'no'} | {row['base']:.2f} | "
                     f"{', '.join(f'{v:.2f}' for v in row['tuned'])} | {np.mean(row['tuned']):.2f} |")
    table = "\n".join(lines) + f"\n\n{args.transfer_samples} images per prompt from evaluation seed {args.transfer_seed}.\n"
    (OUT / f"transfer-{method}.json").write_text(json.dumps(rows, indent=1))
    (OUT / f"transfer-{method}.md").write_text(table)
    return table


def hold(args) -> str:
    """Does the success last? Sessions of ``--algorithms`` that reached the target are continued from their last
    checkpoint (same labels, same noises) without stopping, to ``--hold`` labels, measured at every
    ``--eval-every`` rounds; a method that reaches 80% by drifting (and then collapses) shows here."""
    from diffalign.feedback.loop import run_feedback

    path = OUT / (f"hold-{args.shard}.json" if args.shard else "hold.json")
    data = json.loads(path.read_text()) if path.exists() else {}
    results, _ = load_results(include_unfinished=False)
    for r in sorted(results, key=lambda r: (r["algorithm"], r["noise"], r["seed"])):
        name = session_name(r["prompt"], r["algorithm"], r["seed"], r["noise"])
        if r["algorithm"] not in args.algorithms or r["noise"] not in args.noise or r["seed"] not in args.seeds \
                or r["labels_to_target"] is None or name in data:
            continue
        cfg = session_config(r["prompt"], r["algorithm"], r["seed"], r["noise"], args)
        cfg.feedback.stop_at_success = None
        cfg.feedback.rounds = args.hold // args.images_per_round
        result = run_feedback(cfg, evaluator="simulated", resume=True, log=lambda m, n=name: print(f"  {n}: {m}", flush=True))
        after = [(h["labels_used"], h["success"]) for h in result.history
                 if "success" in h and h["labels_used"] > r["labels_to_target"]]
        data[name] = {"algorithm": r["algorithm"], "seed": r["seed"], "noise": r["noise"],
                      "reached": r["labels_to_target"], "to": args.hold, "after": after}
        path.write_text(json.dumps(data, indent=1))
    merged = {}  # every shard's continued sessions
    for other in sorted(OUT.glob("hold*.json")):
        merged.update(json.loads(other.read_text()))
    lines = [f"| algorithm | label noise | seed | labels to {args.target:.0%} | continued to | success at each "
             "measurement after it | lowest | last |", "|---|---|---|---|---|---|---|---|"]
    for h in sorted(merged.values(), key=lambda h: (h["algorithm"], h["noise"], h["seed"])):
        values = [v for _, v in h["after"]]
        if values:
            lines.append(f"| {h['algorithm']} | {h['noise']:.0%} | {h['seed']} | {h['reached']} | "
                         f"{h.get('to', h['after'][-1][0])} | "
                         f"{' '.join(f'{v:.2f}' for v in values)} | {min(values):.2f} | {values[-1]:.2f} |")
    table = "\n".join(lines) + "\n"
    (OUT / "hold.md").write_text(table)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", nargs="+", default=["four green triangles"])
    ap.add_argument("--algorithms", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--noise", nargs="+", type=float, default=[0.0, 0.1])
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--secondary", type=float, default=0.5, help="a second, lower threshold reported from the same curves")
    ap.add_argument("--max-labels", type=int, default=256)
    ap.add_argument("--images-per-round", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--shard", default="", help="write results-SHARD.json (run shards in separate processes)")
    ap.add_argument("--hold", type=int, default=0, metavar="LABELS",
                    help="continue the sessions that reached the target to LABELS labels, without stopping")
    ap.add_argument("--study", default="", help="a separate result directory and plot (other eval settings)")
    ap.add_argument("--report", action="store_true", help="only merge the result files into the table and plot")
    ap.add_argument("--transfer", action="store_true", help="only the transfer table of the HERO LoRAs")
    ap.add_argument("--transfer-prompts", nargs="+", default=[
        "four green triangles", "four yellow triangles", "four blue triangles", "four red triangles",
        "three green triangles", "four green circles"])
    ap.add_argument("--transfer-method", default="hero", choices=[m for m in METHODS if m.startswith("hero")])
    ap.add_argument("--transfer-samples", type=int, default=32)
    ap.add_argument("--transfer-seed", type=int, default=4321)
    args = ap.parse_args()
    if args.study:
        global OUT, FIGURE
        OUT = OUT / args.study
        FIGURE = FIGURE.with_name(f"{FIGURE.stem}-{args.study}.png")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.transfer:
        print(transfer(args))
        return
    if args.hold:
        print(hold(args))
        return
    if not args.report:
        path = OUT / (f"results-{args.shard}.json" if args.shard else "results.json")
        data = json.loads(path.read_text()) if path.exists() else {"sessions": [], "base": {}}
        # A session that stopped at a smaller budget without reaching the target is continued (it resumes from
        # its last round's checkpoint) rather than skipped.
        short = [r for r in data["sessions"] if r["labels_to_target"] is None and r["budget"] < args.max_labels]
        data["sessions"] = [r for r in data["sessions"] if r not in short]
        done = {(r["prompt"], r["algorithm"], r["seed"], r["noise"]) for r in data["sessions"]}
        for prompt in args.prompts:
            if prompt not in data["base"]:
                data["base"][prompt] = base_success(prompt, args)
                path.write_text(json.dumps(data, indent=1))
            for noise in args.noise:
                for seed in args.seeds:
                    for algo in args.algorithms:
                        if (prompt, algo, seed, noise) in done:
                            continue
                        data["sessions"].append(run_session(prompt, algo, seed, noise, args))
                        path.write_text(json.dumps(data, indent=1))  # after every session: a kill loses little
    print(report(args))


if __name__ == "__main__":
    main()
