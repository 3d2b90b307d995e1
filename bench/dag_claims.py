"""The DAG paper's two claims, read off sample_efficiency.py results (issue 21 item 5).

1. Sample efficiency: for each method and seed, the first evaluated budget at which the evaluation reward
   reaches DDPO's mean evaluation reward at ``--target-budget`` trajectories (or "not reached").
2. Reward / diversity trade-off: Vendi diversity against reward at every evaluated checkpoint of every run,
   one colour per method (a Pareto plot), and, at matched reward, the diversity of each method.

    .venv/bin/python bench/dag_claims.py --results bench/out/dag_long bench/out/dag_ablation_toy --target-budget 1280

Writes ``<first results dir>/claims.md`` and ``pareto.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def load(dirs: list[Path], partial: bool = False) -> list[dict]:
    """Finished runs of every results directory; with ``partial``, also the runs still under way (their
    ``runs/<reward>-<algorithm>-s<seed>/partial.json``, written at each evaluation), marked ``partial``."""
    runs, seen = [], set()
    for d in dirs:
        path = d / "results.json"
        for r in json.loads(path.read_text()) if path.exists() else []:
            key = (r["reward"], r["algorithm"], r["seed"], r["points"][-1]["trajectories"])
            if key not in seen:
                seen.add(key)
                runs.append(r)
    if partial:
        finished = {(r["reward"], r["algorithm"], r["seed"]) for r in runs}
        for d in dirs:
            for f in sorted(d.glob("runs/*/partial.json")):
                reward, rest = f.parent.name.split("-", 1)
                algorithm, seed = rest.rsplit("-s", 1)
                if (reward, algorithm, int(seed)) not in finished:
                    runs.append({"reward": reward, "algorithm": algorithm, "seed": int(seed), "partial": True,
                                 **{k: v for k, v in json.loads(f.read_text()).items() if k in ("points", "epochs")}})
    return runs


def ddpo_target(runs: list[dict], reward: str, target_budget: int) -> tuple[float, int] | None:
    """DDPO's mean evaluation reward at ``target_budget`` trajectories and its number of seeds (None: no run)."""
    ddpo = [p["reward_mean"] for r in runs if r["reward"] == reward and r["algorithm"] == "ddpo"
            for p in r["points"] if p["trajectories"] == target_budget]
    return (float(np.mean(ddpo)), len(ddpo)) if ddpo else None


def efficiency(runs: list[dict], reward: str, target_budget: int) -> list[str]:
    found = ddpo_target(runs, reward, target_budget)
    if found is None:
        return [f"no DDPO run of {reward} reached {target_budget} trajectories"]
    target, n = found
    lines = [f"**{reward}**: DDPO's mean evaluation reward at {target_budget} trajectories = {target:.3f} "
             f"({n} seeds)", "", "| method | seed | evaluated up to | first budget reaching it | best reward |",
             "|---|---|---|---|---|"]
    for r in sorted((r for r in runs if r["reward"] == reward), key=lambda r: (r["algorithm"], r["seed"])):
        hit = next((p["trajectories"] for p in r["points"] if p["reward_mean"] >= target), None)
        last = r["points"][-1]["trajectories"]
        best = max(p["reward_mean"] for p in r["points"])
        lines.append(f"| {r['algorithm']} | {r['seed']} | {last}{' (under way)' if r.get('partial') else ''} | {hit if hit is not None else 'not reached'} | "
                     f"{best:.3f} |")
    return lines


def stability(runs: list[dict], reward: str) -> list[str]:
    """Issue 21 item 4's no-collapse test per run: after the training reward's peak epoch, the largest fall between
    consecutive epochs (bar: <= 0.1), and the final evaluation reward against the base model's."""
    lines = [f"**{reward}**, no collapse (training reward per epoch; bar: no fall > 0.1 after the peak, final "
             f"evaluation >= base):", "", "| method | seed | epochs | peak (epoch) | largest fall after it | "
             "base eval | final eval | holds |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in runs if r["reward"] == reward), key=lambda r: (r["algorithm"], r["seed"])):
        curve = [e["reward_mean"] for e in r.get("epochs", []) if "reward_mean" in e]
        if not curve:
            continue
        peak = int(np.argmax(curve))
        falls = [curve[i] - curve[i + 1] for i in range(peak, len(curve) - 1)]
        fall = max(falls, default=0.0)
        base, final = r["points"][0]["reward_mean"], r["points"][-1]["reward_mean"]
        ok = fall <= 0.1 and final >= base
        lines.append(f"| {r['algorithm']} | {r['seed']} | {len(curve)}{' (under way)' if r.get('partial') else ''} | {curve[peak]:.3f} ({peak + 1}) | {fall:.3f} | "
                     f"{base:.3f} | {final:.3f} | {'yes' if ok else '**no**'} |")
    return lines


def pareto(runs: list[dict], reward: str, path: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    lines = [f"**{reward}**, diversity (Vendi per prompt) at matched reward (checkpoints binned by reward):", "",
             "| reward bin | " + " | ".join(sorted({r['algorithm'] for r in runs if r['reward'] == reward})) + " |"]
    algos = sorted({r["algorithm"] for r in runs if r["reward"] == reward})
    lines.append("|---|" + "---|" * len(algos))
    pts = {a: np.array([(p["reward_mean"], p["diversity"]) for r in runs if r["reward"] == reward and r["algorithm"] == a
                        for p in r["points"][1:]]) for a in algos}
    for a in algos:
        if len(pts[a]):
            ax.scatter(pts[a][:, 0], pts[a][:, 1], s=14, label=a, alpha=0.7)
    base = [r["points"][0] for r in runs if r["reward"] == reward][:1]
    if base:
        ax.scatter([base[0]["reward_mean"]], [base[0]["diversity"]], marker="*", s=120, c="k", label="base")
    ax.set_xlabel("evaluation reward")
    ax.set_ylabel("diversity (Vendi, per prompt)")
    ax.set_title(f"{reward}: reward vs diversity at every checkpoint")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    allr = np.concatenate([v[:, 0] for v in pts.values() if len(v)])
    edges = np.quantile(allr, [0, 0.25, 0.5, 0.75, 1.0])
    for lo, hi in zip(edges[:-1], edges[1:]):
        cells = []
        for a in algos:
            v = pts[a]
            sel = v[(v[:, 0] >= lo) & (v[:, 0] <= hi)] if len(v) else v
            cells.append(f"{sel[:, 1].mean():.2f} (n={len(sel)})" if len(sel) else "-")
        lines.append(f"| {lo:.3f}-{hi:.3f} | " + " | ".join(cells) + " |")
    return lines


def diversity_at_target(runs: list[dict], reward: str, target_budget: int) -> list[str]:
    """Seed-level version of the matched-reward comparison: per run, the mean Vendi of its checkpoints whose
    evaluation reward is at least DDPO's mean at ``target_budget``; then mean +- std over the runs that got there
    (checkpoints of one run are not independent, seeds are)."""
    found = ddpo_target(runs, reward, target_budget)
    if found is None:
        return []
    target = found[0]
    lines = [f"**{reward}**, diversity of the checkpoints at or above DDPO's {target_budget}-trajectory reward "
             f"({target:.3f}), one value per run:", "", "| method | runs there | per run | mean ± sample std |", "|---|---|---|---|"]
    for a in sorted({r["algorithm"] for r in runs if r["reward"] == reward}):
        vals = [float(np.mean(v)) for r in runs if r["reward"] == reward and r["algorithm"] == a
                for v in [[p["diversity"] for p in r["points"][1:] if p["reward_mean"] >= target]] if v]
        total = sum(1 for r in runs if r["reward"] == reward and r["algorithm"] == a)
        per = ", ".join(f"{v:.2f}" for v in vals) or "-"
        stat = f"{np.mean(vals):.2f} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0:.2f}" if vals else "-"
        lines.append(f"| {a} | {len(vals)} of {total} | {per} | {stat} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, nargs="+", required=True)
    ap.add_argument("--target-budget", type=int, default=1280)
    ap.add_argument("--partial", action="store_true", help="also the runs still under way (marked as such)")
    args = ap.parse_args()
    runs = load(args.results, args.partial)
    out = args.results[0]
    md = []
    for reward in dict.fromkeys(r["reward"] for r in runs):
        md += efficiency(runs, reward, args.target_budget) + [""]
        md += stability(runs, reward) + [""]
        md += pareto(runs, reward, out / f"pareto_{reward}.png") + [""]
        md += diversity_at_target(runs, reward, args.target_budget) + [""]
    (out / "claims.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
