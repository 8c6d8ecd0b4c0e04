"""A stand-in for the slice of vLLM's API that VLLMEngine calls (vLLM cannot be installed here).

It mirrors the documented behaviour the engine relies on, and checks the engine keeps to it:
``LLM(**engine_args)`` with known argument names; ``generate(prompts, sampling_params, use_tqdm)``
with ``TokensPrompt`` dicts that hold **one** image placeholder per image in ``multi_modal_data``
(vLLM expands them itself); a ``CompletionOutput`` with ``token_ids``, per-token ``logprobs``
dicts holding the sampled token, and the stop token included; the weight-transfer protocol
``start_weight_update`` -> ``update_weights({"update_info": ...})`` (IPC handles keyed by GPU UUID,
rebuilt with ``func(*args)``) -> ``finish_weight_update``.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

_LLM_ARGS = {"model", "tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "enable_sleep_mode",
             "limit_mm_per_prompt", "mm_processor_kwargs", "logprobs_mode", "weight_transfer_config", "seed"}


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    bad_words: list[str] = field(default_factory=list)
    logprobs: int | None = None
    seed: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True


@dataclass
class WeightTransferConfig:
    backend: str = "nccl"


@dataclass
class Logprob:
    logprob: float


@dataclass
class CompletionOutput:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]]
    finish_reason: str


@dataclass
class RequestOutput:
    outputs: list[CompletionOutput]


def TokensPrompt(**kwargs):
    return dict(kwargs)


class LLM:
    """Emits ``script`` (class attribute) and then a stop token; records weight updates."""

    script: tuple[int, ...] = (40, 41, 42, 43)
    image_token_id: int = -1
    uuid: str = "GPU-standin"

    def __init__(self, **kwargs):
        unknown = set(kwargs) - _LLM_ARGS
        assert not unknown, f"not vLLM LLM arguments: {unknown}"
        self.kwargs = kwargs
        self.events: list[str] = []
        self.weights: dict = {}
        self.prompts: list[dict] = []

    def generate(self, prompts, sampling_params, use_tqdm=True):
        assert len(prompts) == len(sampling_params)
        results = []
        for prompt, params in zip(prompts, sampling_params):
            ids = prompt["prompt_token_ids"]
            images = prompt.get("multi_modal_data", {}).get("image", [])
            placeholders = ids.count(self.image_token_id)
            assert placeholders == len(images), f"{placeholders} placeholders for {len(images)} images"
            assert params.logprobs == 0 and not params.detokenize
            self.prompts.append(prompt)
            tokens = (list(self.script) + params.stop_token_ids[:1])[: params.max_tokens]
            finish = "stop" if tokens and tokens[-1] in params.stop_token_ids else "length"
            logprobs = [{t: Logprob(-0.25 * (k + 1))} for k, t in enumerate(tokens)]
            results.append(RequestOutput([CompletionOutput(tokens, logprobs, finish)]))
        return results

    def start_weight_update(self, is_checkpoint_format: bool = True):
        self.events.append(f"start(checkpoint={is_checkpoint_format})")

    def update_weights(self, request):
        info = request["update_info"]
        n = len(info["names"])
        assert len(info["dtype_names"]) == len(info["shapes"]) == len(info["ipc_handles"]) == n
        for name, handle in zip(info["names"], info["ipc_handles"]):
            func, args = handle[self.uuid]
            self.weights[name] = func(*args).clone()
        self.events.append(f"update({n})")

    def finish_weight_update(self):
        self.events.append("finish")


def install(monkeypatch) -> types.ModuleType:
    """Put the stand-in in ``sys.modules`` as ``vllm``, ``vllm.config`` and ``vllm.inputs``."""
    root = types.ModuleType("vllm")
    root.LLM, root.SamplingParams = LLM, SamplingParams
    config = types.ModuleType("vllm.config")
    config.WeightTransferConfig = WeightTransferConfig
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = TokensPrompt
    root.config, root.inputs = config, inputs
    for name, module in (("vllm", root), ("vllm.config", config), ("vllm.inputs", inputs)):
        monkeypatch.setitem(sys.modules, name, module)
    return root
