#!/usr/bin/env bash
# Submit the Qwen3-VL-8B CodeVision recipe (SFT then RL) to a running Ray cluster.
#
#   RAY_ADDRESS=http://head-node:8265 MODEL=/checkpoints/Qwen3-VL-8B-Instruct bash examples/cluster/submit.sh
#
# Resources per group come from the config: rollout workers take GPU bundles
# (rollout.gpus_per_worker), learner ranks one GPU each (learner.gpus_per_rank), sandbox executors and
# reward workers CPUs only — add CPU-only nodes to scale sandbox.num_executors without touching GPUs.
# Extra arguments are passed to cv-ray as Hydra overrides (e.g. sandbox.num_executors=32).
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster's dashboard address, e.g. http://head:8265}"
: "${MODEL:?set MODEL to the checkpoint directory (present on every node)}"
cd "$(dirname "$0")/../.."
ray job submit --address "$RAY_ADDRESS" --runtime-env examples/cluster/runtime_env.yaml -- \
  cv-ray experiment=qwen3_vl_8b_2x8 model.path="$MODEL" trainer.run_root=/shared/runs "$@"
