#!/usr/bin/env bash
# Set up cv_ray on a fresh machine: a virtualenv in .venv with torch, cv_ray (editable) and its
# dependencies. Idempotent: a stamp of pyproject.toml and this script skips work already done.
#
#   bash tools/setup_env.sh            # then use .venv/bin/cv-ray and .venv/bin/python -m pytest
#
# CV_RAY_TORCH overrides the torch pin and CV_RAY_EXTRAS the extras. A GPU node with vLLM (README,
# "GPU nodes"): CV_RAY_TORCH="torch==2.14.0 torchvision==0.29.0" CV_RAY_EXTRAS=dev,vllm, the set vllm 0.33.0 pins.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
torch_spec=${CV_RAY_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
extras=${CV_RAY_EXTRAS:-dev}
stamp=.venv/.cv_ray-setup
want=$( (cat pyproject.toml tools/setup_env.sh; echo "$torch_spec [$extras]") | sha256sum | cut -c1-16)

# Debian's Chromium, for the dashboard's browser tests (tests/test_dashboard_browser.py) and its
# screenshots (python -m cv_ray.dashboard.browser). Checked on every run: it lives outside .venv.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "cv_ray setup: installing chromium (Debian package) for the dashboard's browser tests" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  else
    echo "cv_ray setup: chromium is missing and this is not root with apt-get: the dashboard's browser tests" \
         "will fail. Install it as root: apt-get update && apt-get install -y chromium" >&2
  fi
fi

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/cv-ray ]; then
  bash tools/setup_vllm_api.sh   # vLLM's Python code for the vllm_api tests (own stamp; see that script)
  exit 0
fi
echo "cv_ray setup: creating .venv and installing dependencies (first run takes a few minutes)" >&2
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned, so no other requirement pulls a different (multi-GB) build.
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q $torch_spec
.venv/bin/python -m pip install -q -e ".[$extras]"
# DeepSpeed compiles a CPU op the first time a learner starts (~1 min); build it now, into this
# virtualenv's own cache (cv_ray/learner/deepspeed_ops.py says why), so no run or test pays for it.
.venv/bin/python -m cv_ray.learner.deepspeed_ops
echo "$want" > "$stamp"
bash tools/setup_vllm_api.sh
echo "cv_ray setup: done" >&2
