#!/usr/bin/env bash
# vLLM's own Python code for the `vllm_api` tests, in a side directory (.cache/vllm-api), apart from .venv.
#
#   bash tools/setup_vllm_api.sh        # tools/setup_env.sh runs it; idempotent (a stamp skips done work)
#
# The tests check cv_ray's vLLM path against vLLM's real classes (EngineArgs, SamplingParams, the input
# processor, the msgpack serializer, the IPC weight receiver, the Qwen-VL model classes), which import
# and run on a CPU. vLLM pins torch==2.14.0 and transformers<5.21, so installing it into .venv would
# replace the project's torch/transformers: instead its wheel goes in with --no-deps, beside the few
# pure-Python packages its imports need (found by importing, pinned here), and only the vllm_api tests
# put this directory on sys.path (tests/rollout/vllm_api.py). GPU nodes install vLLM normally: see the
# README's GPU section (`pip install 'cv-ray[vllm]'`).
set -euo pipefail
cd "$(dirname "$0")/.."

target=.cache/vllm-api
# Keep `vllm==` in step with the `vllm` extra of pyproject.toml (tests/rollout/test_vllm_api.py checks it).
packages=(
  vllm==0.33.0
  aiohappyeyeballs==2.7.1 aiohttp==3.14.5 aiosignal==1.4.0 apache-tvm-ffi==0.1.11 blake3==1.0.11
  cachetools==8.0.2 cbor2==6.3.0 cloudpickle==3.1.3 fastapi==0.136.3 frozenlist==1.8.0 llguidance==1.7.6
  msgspec==0.23.0 multidict==7.2.1 openai==3.57.0 oss-harmony==0.0.11 partial-json-parser==0.2.1.1.post7
  prometheus-client==0.26.0 propcache==0.5.4 pybase64==1.5.1 pyzmq==27.3.0 starlette==1.10.0
  uvloop==0.23.0 xgrammar==0.2.8 yarl==1.25.1
)
want=$(printf '%s\n' "${packages[@]}" | sha256sum | cut -c1-16)
stamp=$target/.cv_ray-stamp
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "cv_ray setup: vLLM's Python package for the vllm_api tests -> $target" >&2
# Install next to the target and swap it in, so an interrupted run never leaves a half directory
# that looks done. --no-compile: Python compiles only the modules the tests import.
rm -rf "$target.new"
.venv/bin/python -m pip install -q --no-deps --no-compile --target "$target.new" "${packages[@]}"
echo "$want" > "$target.new/.cv_ray-stamp"
rm -rf "$target"
mv "$target.new" "$target"
