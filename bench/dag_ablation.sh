#!/usr/bin/env bash
# Issue 21 item 2: which of the three fixes matters. DAG-DB and DAG-KL at the benchmark's budget (320 trajectories,
# 3 seeds, the toy counting reward and JPEG), forward-looking prediction (guided / conditional) x gradient clipping
# (joint / per-module), the flow at the policy's learning rate; DDPO beside them. Per-epoch |DB residual|, both
# gradient norms and the training reward are in results.json ("epochs").
#   bash bench/dag_ablation.sh toy    # and, in a second shell, bash bench/dag_ablation.sh jpeg
# Results: bench/out/dag_ablation_<reward>/{results.json,table.md,curves.png}; resumable (finished runs are kept).
set -euo pipefail
cd "$(dirname "$0")/.."
reward=${1:-toy}
run() { OMP_NUM_THREADS=1 .venv/bin/python bench/sample_efficiency.py --rewards "$reward" --seeds 0 1 2 --budget 320 \
          --eval-every 5 --eval-samples 16 --lr 1e-3 --out "bench/out/dag_ablation_$reward" "$@"; }
run --algorithms ddpo
run --algorithms dag-kl dag-db --tag=-cond-permod   # the new defaults
run --algorithms dag-kl dag-db --tag=-guided-joint --set 'dag.forward_looking="guided"' --set 'train.grad_clip="joint"'
run --algorithms dag-kl dag-db --tag=-cond-joint --set 'train.grad_clip="joint"'
run --algorithms dag-kl dag-db --tag=-guided-permod --set 'dag.forward_looking="guided"'
