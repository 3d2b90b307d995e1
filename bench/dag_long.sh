#!/usr/bin/env bash
# Issue 21 items 4-5: DDPO, DAG-DB and DAG-KL at the demo's budget (1,280 trajectories = 40 epochs of 32), 3 seeds,
# the toy counting reward on the hard counting prompts, with the reference's DAG (conditional forward-looking
# prediction, per-module clipping, flow at the policy's learning rate). Evaluated every 5 epochs (160 trajectories)
# on 48 fixed-seed images. Results: bench/out/dag_long/{results.json,table.md,curves.png}; resumable.
#   bash bench/dag_long.sh [extra sample_efficiency.py arguments, e.g. --algorithms dag-db --tag=-x --set ...]
set -euo pipefail
cd "$(dirname "$0")/.."
OMP_NUM_THREADS=1 .venv/bin/python bench/sample_efficiency.py --rewards toy --seeds 0 1 2 --budget 1280 \
  --eval-every 5 --eval-samples 16 --lr 1e-3 --out bench/out/dag_long "$@"
