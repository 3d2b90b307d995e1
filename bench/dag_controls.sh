#!/usr/bin/env bash
# Issue 21, what the first ablation pass left: the third seed of the default DAG arms, the critic control
# (DAG-KL with the flow network trained alone for 2 epochs first, 3 seeds), the cost of a smaller flow network,
# and the third JPEG seed. One run at a time (one thread): on this 2-core machine tests run beside it.
#   bash bench/dag_controls.sh            # resumable: finished runs are kept in each results directory
set -euo pipefail
cd "$(dirname "$0")/.."
run() { OMP_NUM_THREADS=1 .venv/bin/python bench/sample_efficiency.py --budget 320 --eval-every 5 --eval-samples 16 \
          --lr 1e-3 "$@"; }
run --rewards toy --out bench/out/dag_ablation_toy --seeds 2 --algorithms dag-kl dag-db --tag=-cond-permod
run --rewards toy --out bench/out/dag_ablation_toy_arms --seeds 0 1 2 --algorithms dag-kl --tag=-cond-permod-warmup2 \
    --set 'dag.flow_warmup_epochs=2'
OMP_NUM_THREADS=1 .venv/bin/python bench/dag_profile.py --epochs 3 --tiny-decoder --small-flow '[16, 32, 32]' \
    > bench/out/profile_small_flow.log 2>&1
run --rewards toy --out bench/out/dag_ablation_toy_arms --seeds 0 1 2 --algorithms dag-kl --tag=-small-flow \
    --set 'dag.forward_decoder="toy"' --set 'dag.flow_channels=[16, 32, 32]'
run --rewards jpeg --out bench/out/dag_ablation_jpeg --seeds 2 --algorithms dag-kl dag-db --tag=-cond-permod
