"""Cost of the training guards on the demo's settings (issue 18): time of each guard check next to the epochs.

    OMP_NUM_THREADS=1 .venv/bin/python bench/guard_overhead.py --epochs 3 --every 1 --out bench/out/guard_overhead

Runs configs/demo.toml for a few epochs with a guard check every ``--every`` epochs (the default guard settings
otherwise) and prints, per epoch, the sampling + training time and the check's time (the first check also
samples the base model once). Both come from the same process under the same load, so their ratio is the
overhead; the default's (a check every guards.every epochs) follows as
(one base generation + checks) x (time of one check) / (epochs x time of one epoch).
"""

from __future__ import annotations

import argparse
import json

from diffalign.config import load_config
from diffalign.trainer import train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--out", default="bench/out/guard_overhead")
    args = ap.parse_args()
    cfg = load_config("configs/demo.toml", [f'output_dir="{args.out}"', f"train.epochs={args.epochs}",
                                            f"guards.every={args.every}", "log.progress=false", "checkpoint.every=0"])
    default = load_config("configs/demo.toml")
    history = train(cfg).history
    epochs = [h["time_sample"] + h["time_train"] for h in history]
    checks = [h["time_guards"] for h in history if "time_guards" in h]
    for h in history:
        print(json.dumps({k: h[k] for k in ("epoch", "time_sample", "time_train", "time_guards") if k in h}))
    epoch = sum(epochs) / len(epochs)
    later = checks[1:] or checks  # a check without the one-off base generation
    check = sum(later) / len(later)
    base = checks[0] - check
    n = default.train.epochs // default.guards.every
    projected = (base + n * check) / (default.train.epochs * epoch)
    print(json.dumps({"epoch_s": epoch, "first_check_s": checks[0], "check_s": check,
                      f"overhead_demo_default (every {default.guards.every}, {default.train.epochs} epochs)": projected,
                      "overhead_this_run": sum(checks) / sum(epochs)}))


if __name__ == "__main__":
    main()
