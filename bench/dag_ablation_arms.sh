#!/usr/bin/env bash
# Issue 21 item 2, the single-change arms on the toy counting reward (seed 0 first): the new defaults with one fix
# undone at a time. Results go to the same directory as dag_ablation.sh toy.
set -euo pipefail
cd "$(dirname "$0")/.."
run() { OMP_NUM_THREADS=1 .venv/bin/python bench/sample_efficiency.py --rewards toy --budget 320 \
          --eval-every 5 --eval-samples 16 --lr 1e-3 --out bench/out/dag_ablation_toy_arms "$@"; }
run --algorithms dag-db dag-kl --seeds 0 --tag=-guided-permod --set 'dag.forward_looking="guided"'
run --algorithms dag-db dag-kl --seeds 0 --tag=-cond-joint --set 'train.grad_clip="joint"'
run --algorithms dag-kl --seeds 0 --tag=-cond-permod-warmup2 --set 'dag.flow_warmup_epochs=2'
