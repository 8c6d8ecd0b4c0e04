#!/usr/bin/env bash
# Sweep the dense reward's weights with Hydra multirun: 4 jobs, each in its own run directory
# (runs/tiny_cpu-sweep/<job>), sharing one Ray cluster; summary.md across jobs at the end.
#
#   bash examples/sweep_reward_weights.sh                 # tiny CPU model
#   bash examples/sweep_reward_weights.sh experiment=qwen3_vl_8b_2x8 model.path=/ckpt   # real run
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
.venv/bin/cv-ray -m reward.alpha=0.5,1.0 reward.gamma=0.25,0.5 trainer.stage=rl "$@"
