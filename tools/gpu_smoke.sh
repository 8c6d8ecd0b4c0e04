#!/usr/bin/env bash
# GPU smoke test of the vLLM path: one command, no network, about 10 minutes on one H100/H200-class GPU.
#
#   CV_RAY_TORCH="torch==2.14.0 torchvision==0.29.0" CV_RAY_EXTRAS=dev,vllm bash tools/setup_env.sh   # once
#   bash tools/gpu_smoke.sh                 # [RUN_ROOT] (default runs/), the runs go to RUN_ROOT/gpu_smoke
#
# 1. builds the tiny Qwen2.5-VL / Qwen3-VL models (no hub access);
# 2. runs the `gpu`-marked tests: real vLLM's AsyncLLM (log-probs under the placeholder ban, a weight
#    update through CUDA IPC, no prefix-cache reuse across an update, a turn in flight straddling an
#    update through pause/resume, the colocated IPC path from this process's own parameters, the NCCL
#    path when there are two GPUs); DeepSpeed ZeRO-3 bf16 on one GPU. A skipped GPU test fails the smoke
#    test (the two-GPU NCCL test is deselected, and said so, on a one-GPU machine);
# 3. runs a short `cv-ray` pipeline with experiment=single_gpu: the vLLM rollout worker and one
#    DeepSpeed learner rank (bf16, NCCL) sharing the GPU (data -> SFT -> 3 GRPO steps -> eval); the
#    weights take the `ipc` path (rank 0's parameters read in place by the engine);
# 4. runs 2 more GRPO steps from the same SFT model with rollout.vllm.weight_sync=object_store (the
#    CPU path, for the comparison), and with two GPUs or more, 2 steps with the engine and the learner
#    on a GPU each (the `nccl` path);
# 5. prints, per RL step of each run, the weight path, rollout tokens/s (sampled tokens / rollout wall
#    time), weight-sync seconds and bytes, and step time, from the runs' metrics.jsonl.
# Each phase has a time limit (12 minutes in all); the first failing phase stops the script.
set -euo pipefail
cd "$(dirname "$0")/.."

run_root=${1:-runs}
run_dir=$run_root/gpu_smoke
py=.venv/bin/python
# Nothing may reach a network: the models are built locally and every hub client is told so.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 WANDB_MODE=disabled

phase() { printf '\n== gpu_smoke: %s (%s)\n' "$1" "$(date +%T)"; }

phase "checks"
gpus=$("$py" - <<'EOF'
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

print(f"torch {torch.__version__}, vllm {vllm.__version__}, {torch.cuda.device_count()} x "
      f"{torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB",
      file=sys.stderr)
print(torch.cuda.device_count())
EOF
)

phase "tiny models"
timeout 120 "$py" tools/make_tiny_model.py --out "$run_dir/tiny"

phase "gpu tests"
log=$(mktemp)
deselect=()
if [ "$gpus" -lt 2 ]; then
  echo "gpu_smoke: one GPU: the two-GPU NCCL test is deselected (the NCCL path is not run)"
  deselect=(--deselect tests/rollout/test_vllm_gpu.py::test_nccl_broadcast_on_two_gpus)
fi
PYTHONPATH=$PWD timeout 300 "$py" -m pytest -q -m gpu -rs -p no:cacheprovider ${deselect[@]+"${deselect[@]}"} tests | tee "$log"
if grep -qE "[0-9]+ skipped" "$log"; then
  echo "gpu_smoke: a GPU test was skipped (see above)" >&2
  exit 1
fi

common=(experiment=single_gpu model=checkpoint "model.path=$run_dir/tiny/qwen2_5_vl"
  data.num_rl_tasks=48 data.num_sft_trajectories=16 data.num_val_tasks=4 data.suite_size=2 data.image_size=224
  trainer.sft.max_steps=4 trainer.sft.batch_size=8 trainer.sft.lr=1e-3 trainer.rl.batch_size=8 rollout.n_samples=4
  rollout.max_turns=3 rollout.max_new_tokens_per_turn=128 rollout.max_response_tokens=2048
  rollout.vllm.max_model_len=8192 rollout.vllm.enforce_eager=true learner.micro_batch_size=4 eval.suites=[orientation])

phase "cv-ray pipeline, experiment=single_gpu (weights: ipc)"
rm -rf "$run_dir/run"
timeout 300 .venv/bin/cv-ray "${common[@]}" trainer.name=gpu_smoke "trainer.work_dir=$run_dir/run" trainer.rl.steps=3

# More RL steps from the pipeline's data and SFT model, with another weight path.
rl_again() {  # NAME, extra overrides...
  local name=$1
  shift
  rm -rf "${run_dir:?}/$name"
  mkdir -p "$run_dir/$name"
  cp -r "$run_dir/run/data" "$run_dir/run/sft_model" "$run_dir/$name/"
  timeout 180 .venv/bin/cv-ray "${common[@]}" trainer.stage=rl trainer.name="gpu_smoke_$name" \
    "trainer.work_dir=$run_dir/$name" trainer.rl.steps=2 "$@"
}

phase "2 GRPO steps, weights through the object store (the CPU path)"
rl_again object_store rollout.vllm.weight_sync=object_store

if [ "$gpus" -ge 2 ]; then
  phase "2 GRPO steps, engine and learner on a GPU each (weights: nccl)"
  rl_again nccl rollout.gpus_per_worker=1 learner.gpus_per_rank=1 rollout.vllm.gpu_memory_utilization=0.6
fi

phase "figures"
"$py" - "$run_dir" <<'EOF'
import json
import statistics
import sys
from pathlib import Path

root = Path(sys.argv[1])
print(f"{'run':<13} {'step':>4} {'path':<12} {'rollout tok/s':>13} {'sync s':>7} {'sync MB':>8} {'step s':>7}")
for run in ("run", "object_store", "nccl"):
    path = root / run / "metrics.jsonl"
    if not path.exists():
        continue
    steps = [r for r in map(json.loads, path.open()) if r.get("stage") == "rl"]
    if not steps:
        sys.exit(f"gpu_smoke: no RL step in {path}")
    for r in steps:
        way = next(k.removeprefix("weights/path/") for k in r if k.startswith("weights/path/"))
        print(f"{run:<13} {r['step']:>4} {way:<12} {r['rollout/sampled_tokens'] / r['rollout/wall_s']:>13.1f} "
              f"{r['weights/sync_s']:>7.3f} {r['weights/bytes'] / 1e6:>8.2f} {r['time/step_s']:>7.2f}")
    later = steps[1:] or steps  # the first step pays for first-call warm-up
    print(f"{run:<13} median over steps {later[0]['step']}..{later[-1]['step']}: rollout "
          f"{statistics.median(r['rollout/sampled_tokens'] / r['rollout/wall_s'] for r in later):.1f} tok/s, "
          f"weight sync {statistics.median(r['weights/sync_s'] for r in later):.3f} s, "
          f"step {statistics.median(r['time/step_s'] for r in later):.2f} s")
EOF
echo "gpu_smoke: passed ($run_dir)"
