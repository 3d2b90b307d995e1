"""Where DAG's extra time goes: DAG-KL epoch time / DDPO epoch time at equal batch, split by phase.

Both algorithms run in one process on the same config (toy pipeline, hard counting prompts, toy reward),
one warm-up epoch each, then ``--epochs`` timed epochs each, interleaved (DDPO, DAG, DDPO, DAG, ...) so that
load on this shared machine hits both alike. Each epoch is split into:

    sample       trajectory sampling (UNet, CFG) + VAE decode of the final images + terminal reward
    fl_decode    DAG only: VAE decode of the states' x0-predictions (forward-looking term; a state is decoded
                 on first use by a trained transition, so this happens inside the update)
    fl_reward    DAG only: reward calls on those decodes
    fl_states    DAG only: states decoded per epoch (of 32 x 20)
    train        the update: UNet forward/backward through the LoRA (+ flow network for DAG)

and the DAG update is split further by timing the flow network's forward+backward on one training minibatch
against the policy's (UNet) forward+backward on the same minibatch.

    .venv/bin/python bench/dag_profile.py --epochs 3
    .venv/bin/python bench/dag_profile.py --epochs 3 --tiny-decoder --small-flow '[16, 32, 32]'
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

OVERRIDES = [
    'sample.prompts="hard_counting"', "sample.batch_size=16", "sample.num_batches_per_epoch=2",
    "sample.num_steps=20", "sample.guidance_scale=4.0", "train.batch_size=8", "train.timestep_fraction=0.5",
    "train.learning_rate=3e-4", 'log.tracker="none"', "log.progress=false", "checkpoint.every=0",
]


@contextmanager
def patched(obj, name, wrapper):
    original = getattr(obj, name)
    setattr(obj, name, wrapper(original))
    try:
        yield
    finally:
        setattr(obj, name, original)


def timed(bucket: dict, key: str):
    def wrap(fn):
        def inner(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                bucket[key] += time.perf_counter() - t
        return inner
    return wrap


def build(algorithm: str, epochs: int, out: str, extra: tuple[str, ...] = (), name: str = ""):
    from diffalign.config import load_config
    from diffalign.trainer import Trainer

    cfg = load_config(overrides=[*OVERRIDES, f'output_dir="{out}/{name or algorithm}"', f'train.algorithm="{algorithm}"',
                                 f"train.epochs={epochs}", *extra], reward={"terms": [{"name": "toy", "args": {"mode": "partial"}}]})
    return Trainer(cfg, log=lambda m: None)


def epoch_phases(trainer, epoch: int) -> dict:
    import diffalign.algorithms.dag as dag_mod
    import diffalign.algorithms.flow as flow_mod

    phases = defaultdict(float)
    caches = []

    class Recorded(flow_mod.ForwardLookingRewards):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            caches.append(self)

        def score_x0(self, *a, **k):  # decode (VAE via the family, or the small decoder) + reward call
            return timed(phases, "fl_score")(super().score_x0)(*a, **k)

    reward = trainer.reward
    with patched(dag_mod, "ForwardLookingRewards", lambda _: Recorded):
        original_call = type(reward).__call__

        def counting_call(self, *a, **k):
            t = time.perf_counter()
            try:
                return original_call(self, *a, **k)
            finally:
                if "forward-looking" in str(k.get("batch", "")):
                    phases["fl_reward"] += time.perf_counter() - t
        type(reward).__call__ = counting_call
        try:
            t0 = time.perf_counter()
            metrics = trainer.run_epoch(epoch)
            phases["epoch"] = time.perf_counter() - t0
        finally:
            type(reward).__call__ = original_call
    phases["fl_decode"] = phases.pop("fl_score", 0.0) - phases["fl_reward"]
    phases["fl_states"] = sum(c.decoded for c in caches)
    phases["sample"] = metrics["time_sample"]
    phases["train"] = metrics["time_train"]
    return dict(phases)


def minibatch_split(trainer, repeats: int = 3) -> dict:
    """Forward+backward seconds of the policy (UNet via LoRA) and of the flow network on one DAG minibatch."""
    from diffalign.trainer import _transition

    cfg = trainer.cfg
    traj, rewards, _ = trainer.sample_epoch(99)
    rows = torch.arange(cfg.train.batch_size)
    k = torch.randint(traj.num_steps, (cfg.train.batch_size,), generator=torch.Generator().manual_seed(0))
    tr = _transition(traj, rows, k, trainer.accelerator.device)
    flow = trainer.algorithm.flow
    out = {}
    for name, fn in {
        "policy_fwd_bwd": lambda: trainer.policy.log_prob(tr)[0].sum().backward(),
        "flow_fwd_bwd": lambda: flow(torch.cat([tr.latents, tr.next_latents]), torch.cat([tr.timesteps, tr.timesteps]),
                                     torch.cat([tr.prompt_embeds, tr.prompt_embeds])).sum().backward(),
    }.items():
        fn()  # warm-up
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        out[name] = (time.perf_counter() - t) / repeats
    trainer.optimizer.zero_grad(set_to_none=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per algorithm (after one warm-up each)")
    ap.add_argument("--algorithm", default="dag-kl", choices=["dag-kl", "dag-db"])
    ap.add_argument("--out", default="bench/out/dag_profile")
    ap.add_argument("--tiny-decoder", action="store_true",
                    help="also time the DAG algorithm with dag.forward_decoder = 'toy' (the distilled small decoder)")
    ap.add_argument("--small-flow", default="",
                    help="also time the algorithm with the small decoder and this flow network, e.g. '[16, 32, 32]'")
    args = ap.parse_args()
    torch.manual_seed(0)

    trainers = {"ddpo": build("ddpo", args.epochs + 1, args.out), args.algorithm: build(args.algorithm, args.epochs + 1, args.out)}
    if args.tiny_decoder:
        trainers[f"{args.algorithm}+tiny"] = build(args.algorithm, args.epochs + 1, args.out,
                                                   ('dag.forward_decoder="toy"',), name=f"{args.algorithm}-tiny")
    if args.small_flow:
        trainers[f"{args.algorithm}+small"] = build(
            args.algorithm, args.epochs + 1, args.out, ('dag.forward_decoder="toy"', f"dag.flow_channels={args.small_flow}"),
            name=f"{args.algorithm}-small")
    for t in trainers.values():
        t.run_epoch(0)  # warm-up (first-call overheads, allocator)
    totals = {name: defaultdict(float) for name in trainers}
    for e in range(1, args.epochs + 1):
        for name, t in trainers.items():
            for key, v in epoch_phases(t, e).items():
                totals[name][key] += v / args.epochs
    split = minibatch_split(trainers[args.algorithm])

    keys = ["epoch", "sample", "train", "fl_decode", "fl_reward", "fl_states"]
    print(f"\nmean seconds per epoch of 32 trajectories ({args.epochs} timed epochs each, interleaved)")
    print(f"{'phase':10s} " + " ".join(f"{n:>9s}" for n in trainers))
    for key in keys:
        print(f"{key:10s} " + " ".join(f"{totals[n].get(key, 0.0):9.2f}" for n in trainers))
    for name in list(trainers)[1:]:
        ratio = totals[name]["epoch"] / totals["ddpo"]["epoch"]
        train_ratio = totals[name]["train"] / totals["ddpo"]["train"]
        print(f"\nepoch ratio {name} / ddpo: {ratio:.2f}   train-phase ratio: {train_ratio:.2f}")
    share = split["flow_fwd_bwd"] / (split["flow_fwd_bwd"] + split["policy_fwd_bwd"])
    print(f"one minibatch of {trainers[args.algorithm].cfg.train.batch_size}: policy fwd+bwd {split['policy_fwd_bwd']:.3f} s, "
          f"flow fwd+bwd (x_t and x_t') {split['flow_fwd_bwd']:.3f} s -> flow share of the update {share:.0%}")


if __name__ == "__main__":
    main()
