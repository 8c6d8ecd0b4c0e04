#!/usr/bin/env bash
# GPU smoke test of the vLLM path: one command, no network, a few minutes on one H100/H200-class GPU.
#
#   CV_RAY_TORCH="torch==2.14.0 torchvision==0.29.0" CV_RAY_EXTRAS=dev,vllm bash tools/setup_env.sh   # once
#   bash tools/gpu_smoke.sh                 # [RUN_ROOT] (default runs/), the run goes to RUN_ROOT/gpu_smoke
#
# 1. builds the tiny Qwen2.5-VL / Qwen3-VL models (no hub access);
# 2. runs the `gpu`-marked tests (real vLLM: log-probs under the placeholder ban, a weight update through
#    CUDA IPC, no prefix-cache reuse across an update; DeepSpeed ZeRO-3 bf16 on one GPU); a skipped
#    GPU test fails the smoke test;
# 3. runs a short `cv-ray` pipeline with experiment=single_gpu: the vLLM rollout worker and one
#    DeepSpeed learner rank (bf16, NCCL) sharing the GPU (data -> SFT -> 3 GRPO steps -> eval);
# 4. prints, per RL step, rollout tokens/s (sampled tokens / rollout wall time), weight-sync seconds
#    (gather + CUDA-IPC update of the engine) and step time, from the run's metrics.jsonl.
# Each phase has a time limit (8 minutes in all); the first failing phase stops the script.
set -euo pipefail
cd "$(dirname "$0")/.."

run_root=${1:-runs}
run_dir=$run_root/gpu_smoke
py=.venv/bin/python
# Nothing may reach a network: the models are built locally and every hub client is told so.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 WANDB_MODE=disabled

phase() { printf '\n== gpu_smoke: %s (%s)\n' "$1" "$(date +%T)"; }

phase "checks"
"$py" - <<'EOF'
import importlib.util
import sys

import torch

problems = []
if not torch.cuda.is_available():
    problems.append("torch sees no CUDA GPU")
if importlib.util.find_spec("vllm") is None:
    problems.append('vLLM is not installed in .venv: CV_RAY_TORCH="torch==2.14.0 torchvision==0.29.0" '
                    "CV_RAY_EXTRAS=dev,vllm bash tools/setup_env.sh")
if problems:
    sys.exit("gpu_smoke: " + "; ".join(problems))
import vllm

print(f"torch {torch.__version__}, vllm {vllm.__version__}, {torch.cuda.get_device_name(0)}, "
      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF

phase "tiny models"
timeout 120 "$py" tools/make_tiny_model.py --out "$run_dir/tiny"

phase "gpu tests"
log=$(mktemp)
PYTHONPATH=$PWD timeout 240 "$py" -m pytest -q -m gpu -rs -p no:cacheprovider tests | tee "$log"
if grep -qE "[0-9]+ skipped" "$log"; then
  echo "gpu_smoke: a GPU test was skipped (see above)" >&2
  exit 1
fi

phase "cv-ray pipeline, experiment=single_gpu"
rm -rf "$run_dir/run"
timeout 300 .venv/bin/cv-ray experiment=single_gpu trainer.name=gpu_smoke "trainer.work_dir=$run_dir/run" \
  model=checkpoint "model.path=$run_dir/tiny/qwen2_5_vl" \
  data.num_rl_tasks=48 data.num_sft_trajectories=16 data.num_val_tasks=4 data.suite_size=2 data.image_size=224 \
  trainer.sft.max_steps=4 trainer.sft.batch_size=8 trainer.sft.lr=1e-3 \
  trainer.rl.steps=3 trainer.rl.batch_size=8 rollout.n_samples=4 rollout.max_turns=3 \
  rollout.max_new_tokens_per_turn=128 rollout.max_response_tokens=2048 rollout.vllm.max_model_len=8192 \
  rollout.vllm.enforce_eager=true learner.micro_batch_size=4 eval.suites=[orientation]

phase "figures"
"$py" - "$run_dir/run/metrics.jsonl" <<'EOF'
import json
import statistics
import sys

rows = [json.loads(line) for line in open(sys.argv[1])]
steps = [r for r in rows if r.get("stage") == "rl"]
if not steps:
    sys.exit(f"gpu_smoke: no RL step in {sys.argv[1]}")
print(f"{'step':>4} {'rollout tok/s':>14} {'sampled tok':>12} {'weight sync s':>14} {'step s':>8}")
for r in steps:
    rate = r["rollout/sampled_tokens"] / r["rollout/wall_s"]
    print(f"{r['step']:>4} {rate:>14.1f} {r['rollout/sampled_tokens']:>12.0f} {r['time/weight_push_s']:>14.2f} "
          f"{r['time/step_s']:>8.2f}")
later = steps[1:] or steps  # step 0 pays for first-call warm-up
print(f"median over steps {later[0]['step']}..{later[-1]['step']}: "
      f"rollout {statistics.median(r['rollout/sampled_tokens'] / r['rollout/wall_s'] for r in later):.1f} tok/s, "
      f"weight sync {statistics.median(r['time/weight_push_s'] for r in later):.2f} s, "
      f"step {statistics.median(r['time/step_s'] for r in later):.2f} s")
EOF
echo "gpu_smoke: passed ($run_dir/run)"
