"""How well does DAG's forward-looking reward r(decode(x0_hat(x_k))) predict the final reward, by source of x0_hat?

Issue 21, items 1 and 6. The base toy model samples ``--n`` trajectories of the hard counting prompts (20 DDIM
steps, eta 1, CFG 4); for every state x_k the x0-prediction is taken from the guided noise prediction (our first
implementation), the conditional one (the reference's kind, now the default), and the conditional one decoded by
the distilled small decoder (``dag.forward_decoder = "toy"``). Reported per source:

    corr_k        Pearson correlation of r~(x_k) with the final reward r(x_0), per step k
    var ratio     sum_k Var(r~(x_{k+1}) - r~(x_k)) / Var(r(x_0) - r~(x_0)): how much of the per-step reward
                  change is noise that cancels along the chain (1 = none)
    decode s/img  seconds per decoded image (the VAE vs the small decoder, measured side by side)

    .venv/bin/python bench/dag_forward_looking.py --n 48
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=48, help="trajectories (spread over the hard counting prompts)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--decoder", default="toy", help="dag.forward_decoder to compare ('' to skip)")
    ap.add_argument("--out", type=Path, default=Path("bench/out/dag_forward_looking.json"))
    args = ap.parse_args()

    from diffalign.algorithms.flow import load_forward_decoder
    from diffalign.pipeline import load_pipeline
    from diffalign.prompts import resolve_prompts
    from diffalign.rewards import build_reward
    from diffalign.sampling import decode_latents, predict_x0_eps, sample_trajectories

    pipe = load_pipeline("toy")
    from diffalign.config import RewardTerm

    reward = build_reward([RewardTerm(name="toy", args={"mode": "partial"})])
    prompts = resolve_prompts("hard_counting")
    batch = [prompts[i % len(prompts)] for i in range(args.n)]
    traj = sample_trajectories(pipe, batch, args.steps, 4.0, 1.0, generator=torch.Generator().manual_seed(0))
    final, _ = reward(traj.images, batch, [{} for _ in batch], batch="final")
    final = np.asarray(final, dtype=np.float64)
    decoders = {"vae": None}
    if args.decoder:
        decoders["small"] = load_forward_decoder(args.decoder)
    sources = {"guided": ("guided_eps", "vae"), "conditional": ("cond_eps", "vae")}
    if args.decoder:
        sources["conditional+small decoder"] = ("cond_eps", "small")
    b, t = args.n, args.steps
    x = traj.latents[:, :-1].flatten(0, 1)
    timesteps = traj.timesteps.repeat(b)
    results, decode_seconds = {}, {}
    for name, (field, dec) in sources.items():
        x0, _ = predict_x0_eps(pipe.scheduler, getattr(traj, field).flatten(0, 1), timesteps, x)
        scores, seconds = [], 0.0
        for start in range(0, len(x0), 64):
            tick = time.perf_counter()
            images = decode_latents(pipe, x0[start:start + 64], vae=decoders[dec])
            seconds += time.perf_counter() - tick
            s, _ = reward(images, [batch[i // t] for i in range(start, min(start + 64, len(x0)))],
                          [{} for _ in range(len(images))], batch=name)
            scores.append(np.asarray(s, dtype=np.float64))
        decode_seconds[dec] = seconds / len(x0)
        r = np.concatenate(scores).reshape(b, t)  # (B, T): r~(x_k)
        corr = [float(np.corrcoef(r[:, k], final)[0, 1]) if r[:, k].std() > 0 else float("nan") for k in range(t)]
        chain = np.concatenate([r, final[:, None]], axis=1)
        deltas = np.diff(chain, axis=1)  # (B, T): reward change of each transition, the last one to r(x_0)
        var_ratio = float(deltas.var(axis=0).sum() / max(deltas.sum(axis=1).var(), 1e-12))
        results[name] = {"corr_per_step": corr, "var_ratio": var_ratio,
                         "nonzero_change": float((np.abs(deltas) > 1e-9).mean())}
    if "small" in decoders:
        x0, _ = predict_x0_eps(pipe.scheduler, traj.cond_eps.flatten(0, 1), timesteps, x)
        sub = x0[:: max(1, len(x0) // 128)]
        big = decode_latents(pipe, sub)
        small = decode_latents(pipe, sub, vae=decoders["small"])
        results["small decoder |difference| (grey levels)"] = float((big - small).abs().mean() * 255)
    results["decode seconds per image"] = decode_seconds
    results["final reward mean"] = float(final.mean())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"{'source':28s} {'corr k=0-4':>11s} {'k=5-9':>7s} {'k=10-15':>8s} {'k=16-19':>8s} {'var ratio':>9s}")
    for name in sources:
        c = np.array(results[name]["corr_per_step"])
        print(f"{name:28s} {np.nanmean(c[0:5]):11.2f} {np.nanmean(c[5:10]):7.2f} {np.nanmean(c[10:16]):8.2f} "
              f"{np.nanmean(c[16:]):8.2f} {results[name]['var_ratio']:9.1f}")
    print("decode seconds per image:", {k: round(v, 4) for k, v in decode_seconds.items()})
    if "small" in decoders:
        print(f"small decoder vs VAE: mean |difference| {results['small decoder |difference| (grey levels)']:.1f} grey levels")


if __name__ == "__main__":
    main()
